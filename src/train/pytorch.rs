//! Checkpoints written by PyTorch's `torch.save`, read without Python through the `pytorch-reader` crate (zip,
//! legacy and tar containers): a plain state dict, a whole model, or a Distiller checkpoint dict (`state_dict`,
//! `arch`, `dataset`, `epoch`, `best_top1`, `compression_sched` with its masks). DataParallel's `module.` prefixes
//! are dropped by the model when it loads, and BatchNorm's `num_batches_tracked` counters are left out: distill's
//! batch norms use a fixed momentum, for which PyTorch never reads the counter.
use std::path::Path;

use pytorch_reader::{DType, PickleValue, PytorchReader};
use tch::{Kind, Tensor};

use super::checkpoint::{Checkpoint, CheckpointFormat, CheckpointMeta};
use crate::{Error, Result};

/// Top-level keys under which checkpoints other than Distiller's commonly keep their state dict.
const STATE_DICT_KEYS: &[&str] = &["state_dict", "model", "model_state_dict", "net"];

fn kind(dtype: DType) -> Option<Kind> {
    Some(match dtype {
        DType::F64 => Kind::Double,
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::BF16 => Kind::BFloat16,
        DType::I64 => Kind::Int64,
        DType::I32 => Kind::Int,
        DType::I16 => Kind::Int16,
        DType::I8 => Kind::Int8,
        DType::U8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
        _ => return None,
    })
}

fn to_tch(path: &Path, t: &pytorch_reader::Tensor) -> Result<Tensor> {
    let bad = |m: String| Error::checkpoint(path, m);
    let kind = kind(t.dtype()).ok_or_else(|| bad(format!("'{}' has element type {:?}, which libtorch has no type for", t.name, t.dtype())))?;
    let bytes = t.read().map_err(|e| bad(format!("cannot read '{}': {e}", t.name)))?;
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(&bytes, &shape, kind)?)
}

/// Whether a file starts as safetensors does: a little-endian header length, then the header's `{`.
pub(crate) fn looks_like_safetensors(header: &[u8]) -> bool {
    header.len() > 8 && header[8] == b'{' && u64::from_le_bytes(header[..8].try_into().unwrap_or_default()) < 100_000_000
}

fn text(v: Option<&PickleValue>) -> Option<String> {
    match v {
        Some(PickleValue::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Reads a `torch.save` file as a [`Checkpoint`] with the metadata the file has (a plain state dict has none: its
/// `meta.arch` and `meta.dataset` are empty and the model to load it into must be named).
pub(crate) fn load(path: &Path) -> Result<Checkpoint> {
    let bad = |m: String| Error::checkpoint(path, m);
    let root = PytorchReader::read_pickle_data(path, None).map_err(|e| bad(format!("neither a safetensors checkpoint nor a PyTorch one ({e})")))?;
    // A whole model (`torch.save(model)`) is no dictionary here; the reader below still finds its state dict.
    let empty = std::collections::HashMap::new();
    let top = match &root {
        PickleValue::Dict(top) => top,
        _ => &empty,
    };
    let key = STATE_DICT_KEYS.iter().find(|k| matches!(top.get(**k), Some(PickleValue::Dict(_)))).copied();
    if let Some(PickleValue::List(recipes)) = top.get("thinning_recipes") {
        if !recipes.is_empty() {
            return Err(bad(format!(
                "a Distiller checkpoint of a thinned model ({} thinning recipe(s)): Distiller's recipes cannot be replayed here; \
                 load the dense checkpoint and thin it with distill, or export the thinned model's weights from Distiller",
                recipes.len()
            )));
        }
    }
    if top.get("quantizer_metadata").is_some_and(|q| *q != PickleValue::None) {
        return Err(bad("a Distiller checkpoint of a quantized model: load the floating-point checkpoint and quantize it with distill".into()));
    }
    let reader = PytorchReader::new(path).map_err(|e| bad(e.to_string()))?;
    let mut tensors: Vec<(&String, &pytorch_reader::Tensor)> = reader.tensors().iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    let (mut model, mut masks) = (Vec::new(), Vec::new());
    for (name, t) in tensors {
        let (target, name) = match key {
            Some(k) => match (name.strip_prefix(&format!("{k}.")), name.strip_prefix("compression_sched.masks_dict.")) {
                (Some(n), _) => (&mut model, n),
                (None, Some(n)) => (&mut masks, n),
                // Optimizer state and other extras: distill's optimizer keeps its state in its own form.
                (None, None) => continue,
            },
            None => (&mut model, name.as_str()),
        };
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        target.push((name.to_string(), to_tch(path, t)?));
    }
    if model.is_empty() {
        let mut keys: Vec<&String> = top.keys().collect();
        keys.sort();
        return Err(bad(format!("no tensors found (top-level keys: {keys:?}); a state dict is expected, alone or under one of {STATE_DICT_KEYS:?}")));
    }
    let distiller = key == Some("state_dict") && top.contains_key("arch");
    let epoch = match top.get("epoch") {
        Some(PickleValue::Int(e)) if *e >= 0 => Some(*e as usize),
        _ => None,
    };
    let best_top1 = match top.get("best_top1").or_else(|| match top.get("extras") {
        Some(PickleValue::Dict(extras)) => extras.get("best_top1"),
        _ => None,
    }) {
        Some(PickleValue::Float(f)) => Some(*f),
        _ => None,
    };
    let meta = CheckpointMeta {
        arch: text(top.get("arch")).unwrap_or_default(),
        dataset: text(top.get("dataset")).unwrap_or_default(),
        epoch: epoch.unwrap_or(0),
        ..CheckpointMeta::default()
    };
    let format = if distiller { CheckpointFormat::Distiller { epoch, best_top1 } } else { CheckpointFormat::PyTorch };
    Ok(Checkpoint { meta, model, masks, optimizer: Vec::new(), format })
}

/// The tensors of a safetensors file without distill's metadata: a bare state dict (as `safetensors.torch.save_file`
/// writes one).
pub(crate) fn bare_state_dict(tensors: Vec<(String, Tensor)>) -> Checkpoint {
    let model = tensors.into_iter().filter(|(n, _)| !n.ends_with("num_batches_tracked")).collect();
    Checkpoint { meta: CheckpointMeta::default(), model, masks: Vec::new(), optimizer: Vec::new(), format: CheckpointFormat::StateDict }
}
