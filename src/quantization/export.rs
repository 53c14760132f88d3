//! Beyond Distiller's simulation: a quantized model's weights exported as real integer tensors with their
//! scales and zero points (safetensors), sub-8-bit weights packed several to a byte
//! ([`bit_packing`]), its size on disk against FP32, and an evaluation of the exported
//! integers in exact integer arithmetic.
use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::bit_packing;
use super::range_linear::RangeLinearQuantParamLayer;
use crate::data::Dataset;
use crate::metrics::Metrics;
use crate::nn::Model;
use crate::{Error, Result};

/// What [`export_integer_model`] wrote.
#[derive(Debug, Clone)]
pub struct ExportedModel {
    /// The safetensors file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub file_bytes: u64,
    /// Modules whose weights are stored as integers, with the integer type used (`Uint8`, `Int8`, `Int16`,
    /// `Int`, or `packed N-bit`).
    pub integer_layers: Vec<(String, String)>,
}

/// Bytes the model's floating-point parameters and buffers take (4 per float32 element).
pub fn float_size_bytes(model: &Model) -> u64 {
    model.state_dict().iter().map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64).sum()
}

/// The smallest integer kind that holds `[lo, hi]`.
fn integer_kind(lo: f64, hi: f64) -> Kind {
    if lo >= 0.0 && hi <= 255.0 {
        Kind::Uint8
    } else if lo >= -128.0 && hi <= 127.0 {
        Kind::Int8
    } else if lo >= -32768.0 && hi <= 32767.0 {
        Kind::Int16
    } else {
        Kind::Int
    }
}

/// Writes every quantized layer's weights as integers with `<module>.weight_scale` and
/// `<module>.weight_zero_point` (float32, per channel or per tensor, Distiller's convention
/// `x = (q + zp) / scale`); every other parameter and buffer as float32. Creates the file's folder if needed.
/// Returns the file's size.
///
/// Weights of 8 bits and more are `<module>.weight` in the smallest integer type that holds their range (uint8
/// or int8 at 8 bits). Narrower weights are packed ([`bit_packing::pack`]):
/// `<module>.weight` is then the 1-D uint8 stream, with `<module>.weight_bits` (its bits per value),
/// `<module>.weight_low` (the integer the code 0 stands for) and `<module>.weight_shape`, each int64.
pub fn export_integer_model(model: &Model, path: impl AsRef<Path>) -> Result<ExportedModel> {
    let path = path.as_ref();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut integer_layers = Vec::new();
    let mut covered: Vec<String> = Vec::new();
    let mut failure = None;
    model.for_each_module(|name, m| {
        let Some(layer) = (m as &dyn Any).downcast_ref::<RangeLinearQuantParamLayer>() else { return };
        if layer.activation_quant().is_none() {
            return;
        }
        let result = (|| -> Result<()> {
            let w = layer.integer_weight().ok_or_else(|| Error::invalid("export", format!("{name} has no weight")))?;
            let p = layer.weight_params();
            let bits = bit_packing::bits_for_range(p.range.0, p.range.1);
            if bits < 8 {
                let low = p.range.0 as i64;
                tensors.push((format!("{name}.weight"), bit_packing::pack(&w, bits, low)?));
                tensors.push((format!("{name}.weight_bits"), Tensor::from_slice(&[bits as i64])));
                tensors.push((format!("{name}.weight_low"), Tensor::from_slice(&[low])));
                tensors.push((format!("{name}.weight_shape"), Tensor::from_slice(&w.size())));
                integer_layers.push((name.to_string(), format!("packed {bits}-bit")));
            } else {
                let kind = integer_kind(p.range.0, p.range.1);
                tensors.push((format!("{name}.weight"), w.f_to_kind(kind)?));
                integer_layers.push((name.to_string(), format!("{kind:?}")));
            }
            tensors.push((format!("{name}.weight_scale"), p.scale.f_to_kind(Kind::Float)?));
            tensors.push((format!("{name}.weight_zero_point"), p.zero_point.f_to_kind(Kind::Float)?));
            if let Some(b) = layer.float_bias() {
                tensors.push((format!("{name}.bias"), b.f_to_kind(Kind::Float)?));
            }
            covered.push(format!("{name}.wrapped_module.weight"));
            covered.push(format!("{name}.wrapped_module.bias"));
            Ok(())
        })();
        if let Err(e) = result {
            failure.get_or_insert(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    for (name, t) in model.state_dict() {
        if !covered.contains(&name) {
            tensors.push((name, t.f_to_kind(Kind::Float)?));
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let partial = crate::io::partial_path(path);
    Tensor::write_safetensors(&tensors, &partial)?;
    crate::io::commit_atomic(&partial, path)?;
    let file_bytes = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    Ok(ExportedModel { path: path.to_path_buf(), file_bytes, integer_layers })
}

/// Evaluates `model` with the integer weights read back from the export, each quantized layer computing in exact
/// integer arithmetic; the model is put back to its float32 simulation afterwards.
pub fn evaluate_integer(exported: &ExportedModel, model: &mut Model, data: &Dataset, batch_size: usize) -> Result<Metrics> {
    let stored: HashMap<String, Tensor> = Tensor::read_safetensors(&exported.path)?.into_iter().collect();
    let set = |model: &mut Model, on: bool| -> Result<()> {
        let mut failure = None;
        model.for_each_module_mut(|name, m| {
            let Some(layer) = (m as &mut dyn Any).downcast_mut::<RangeLinearQuantParamLayer>() else { return };
            if layer.activation_quant().is_none() {
                return;
            }
            let w = if on {
                match read_integer_weight(&stored, name) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        failure.get_or_insert(Error::checkpoint(&exported.path, e.to_string()));
                        return;
                    }
                }
            } else {
                None
            };
            if let Err(e) = layer.set_exact_weight(w) {
                failure.get_or_insert(e);
            }
        });
        failure.map_or(Ok(()), Err)
    };
    set(model, true)?;
    let result = crate::train::validate(model, data, batch_size);
    set(model, false)?;
    result
}

/// A quantized layer's integer weights as [`export_integer_model`] stored them, unpacked when packed.
pub fn read_integer_weight(stored: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    let get = |key: &str| stored.get(&format!("{name}.{key}")).ok_or_else(|| Error::invalid("integer weights", format!("no {name}.{key}")));
    let w = get("weight")?;
    if !stored.contains_key(&format!("{name}.weight_bits")) {
        return Ok(w.shallow_clone());
    }
    let ints = |key: &str| -> Result<Vec<i64>> { Ok(Vec::<i64>::try_from(&get(key)?.f_to_kind(Kind::Int64)?)?) };
    let (bits, low, shape) = (ints("weight_bits")?, ints("weight_low")?, ints("weight_shape")?);
    let (&[bits], &[low]) = (bits.as_slice(), low.as_slice()) else {
        return Err(Error::invalid("integer weights", format!("{name}.weight_bits and {name}.weight_low must hold one value each")));
    };
    let bits = u32::try_from(bits).map_err(|_| Error::invalid("integer weights", format!("{name}.weight_bits is {bits}")))?;
    bit_packing::unpack(w, bits, low, &shape)
}
