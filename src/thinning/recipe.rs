//! A thinning recipe: for each module, which input and output channels stay. Applying one shrinks the module's
//! parameters, gradients and buffers, the optimizer's state and the masks together, or changes nothing at all.
//! Checkpoints of thinned models store their recipes; loading replays them on the dense architecture before the
//! weights are read (Distiller's `thinning_recipes`).
use std::any::Any;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::nn::{BatchNorm2d, ConstantPad3d, Conv2d, Linear, MemoryFormat, Model};
use crate::optim::Optimizer;
use crate::scheduler::Masks;
use crate::{Error, Result};

/// Which channels of one module stay, as indices into its current input and output channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleCut {
    /// Dotted module name.
    pub module: String,
    /// Input channels kept (`None`: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Vec<i64>>,
    /// Output channels kept (`None`: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<i64>>,
}

/// One thinning step: the cuts of every module it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinningRecipe {
    /// Cuts, in the order the modules ran.
    pub cuts: Vec<ModuleCut>,
}

/// The new hyper-parameters of a thinned module.
enum NewConfig {
    Conv { in_channels: i64, out_channels: i64, groups: i64 },
    Linear { in_features: i64, out_features: i64 },
    BatchNorm { num_features: i64 },
    Pad { front: i64, back: i64 },
}

/// A tensor's selections: `(dimension, kept indices)`, applied in order.
type Selections = Vec<(i64, Tensor)>;

fn select(t: &Tensor, selections: &Selections) -> Result<Tensor> {
    let mut out = t.shallow_clone();
    for (dim, idx) in selections {
        out = out.f_index_select(*dim, &idx.f_to_device(t.device())?)?;
    }
    // Dense, in the layout of the tensor it replaces, so a channels-last model stays channels-last.
    MemoryFormat::of(t).apply(&out)
}

/// Kept indices as a tensor, checked against the dimension they select from.
fn kept(module: &str, what: &str, indices: &[i64], len: i64) -> Result<Tensor> {
    if indices.is_empty() {
        return Err(Error::invalid(
            "thinning recipe",
            format!("'{module}' would keep none of its {len} {what}; a layer needs at least one"),
        ));
    }
    if indices.windows(2).any(|w| w[0] >= w[1]) || indices[0] < 0 || indices[indices.len() - 1] >= len {
        return Err(Error::invalid(
            "thinning recipe",
            format!("'{module}': kept {what} must be increasing indices below {len}, got {indices:?}"),
        ));
    }
    Ok(Tensor::from_slice(indices).to_device(Device::Cpu))
}

/// The selections of a layer that mixes channels (a dense convolution, a fully connected layer): kept outputs
/// along dimension 0 of the weight and the bias, kept inputs along dimension 1 of the weight.
fn mix_selections(
    name: &str,
    ins: Option<&[i64]>,
    outs: Option<&[i64]>,
    in_len: i64,
    out_len: i64,
    (in_word, out_word): (&str, &str),
) -> Result<Vec<(&'static str, Selections)>> {
    let mut weight = Vec::new();
    let mut bias = Vec::new();
    if let Some(o) = outs {
        let o = kept(name, out_word, o, out_len)?;
        bias.push((0, o.shallow_clone()));
        weight.push((0, o));
    }
    if let Some(i) = ins {
        weight.push((1, kept(name, in_word, i, in_len)?));
    }
    Ok(vec![("weight", weight), ("bias", bias)])
}

/// What applying a cut to one module changes: its tensors' selections (by leaf name) and its new config.
fn plan_module(model: &Model, cut: &ModuleCut) -> Result<(Vec<(&'static str, Selections)>, NewConfig)> {
    let name = cut.module.as_str();
    let module = model.module(name)?;
    let any = module as &dyn Any;
    let (ins, outs) = (cut.inputs.as_deref(), cut.outputs.as_deref());
    if let Some(conv) = any.downcast_ref::<Conv2d>() {
        let c = &conv.config;
        if c.groups == 1 {
            let config = NewConfig::Conv {
                in_channels: ins.map_or(c.in_channels, |i| i.len() as i64),
                out_channels: outs.map_or(c.out_channels, |o| o.len() as i64),
                groups: 1,
            };
            return Ok((mix_selections(name, ins, outs, c.in_channels, c.out_channels, ("channels", "filters"))?, config));
        }
        if c.groups == c.in_channels && c.groups == c.out_channels {
            let sel = match (ins, outs) {
                (Some(i), Some(o)) if i != o => {
                    return Err(Error::invalid("thinning recipe", format!("depthwise '{name}' must keep the same inputs and outputs")))
                }
                (_, Some(s)) | (Some(s), None) => s,
                (None, None) => return Err(Error::invalid("thinning recipe", format!("'{name}': nothing to cut"))),
            };
            let n = sel.len() as i64;
            let idx = kept(name, "channels", sel, c.out_channels)?;
            let config = NewConfig::Conv { in_channels: n, out_channels: n, groups: n };
            return Ok((vec![("weight", vec![(0, idx.shallow_clone())]), ("bias", vec![(0, idx)])], config));
        }
        return Err(Error::invalid(
            "thinning recipe",
            format!("'{name}' is a grouped convolution (groups={}); only dense and depthwise convolutions can be thinned", c.groups),
        ));
    }
    if let Some(l) = any.downcast_ref::<Linear>() {
        let config = NewConfig::Linear {
            in_features: ins.map_or(l.in_features, |i| i.len() as i64),
            out_features: outs.map_or(l.out_features, |o| o.len() as i64),
        };
        return Ok((mix_selections(name, ins, outs, l.in_features, l.out_features, ("columns", "rows"))?, config));
    }
    if let Some(bn) = any.downcast_ref::<BatchNorm2d>() {
        let sel = outs.or(ins).ok_or_else(|| Error::invalid("thinning recipe", format!("'{name}': nothing to cut")))?;
        let idx = kept(name, "features", sel, bn.num_features)?;
        let config = NewConfig::BatchNorm { num_features: sel.len() as i64 };
        let all = ["weight", "bias", "running_mean", "running_var"].map(|leaf| (leaf, vec![(0, idx.shallow_clone())]));
        return Ok((all.into(), config));
    }
    if let Some(pad) = any.downcast_ref::<ConstantPad3d>() {
        let (Some(i), Some(o)) = (ins, outs) else {
            return Err(Error::invalid("thinning recipe", format!("padding '{name}' needs both its kept inputs and outputs")));
        };
        let [.., front, back] = pad.padding;
        let new_front = o.iter().filter(|&&c| c < front).count() as i64;
        let new_back = o.len() as i64 - new_front - i.len() as i64;
        if new_back < 0 || new_back > back {
            return Err(Error::invalid("thinning recipe", format!("padding '{name}': kept inputs {i:?} and outputs {o:?} disagree")));
        }
        return Ok((Vec::new(), NewConfig::Pad { front: new_front, back: new_back }));
    }
    Err(Error::invalid(
        "thinning recipe",
        format!("'{name}' is a {}; thinning can change Conv2d, Linear, BatchNorm2d and ConstantPad3d", module.type_name()),
    ))
}

fn set_config(model: &mut Model, name: &str, config: &NewConfig) -> Result<()> {
    let module = model.module_mut(name)?;
    let any = module as &mut dyn Any;
    match *config {
        NewConfig::Conv { in_channels, out_channels, groups } => {
            if let Some(conv) = any.downcast_mut::<Conv2d>() {
                conv.config.in_channels = in_channels;
                conv.config.out_channels = out_channels;
                conv.config.groups = groups;
            }
        }
        NewConfig::Linear { in_features, out_features } => {
            if let Some(l) = any.downcast_mut::<Linear>() {
                l.in_features = in_features;
                l.out_features = out_features;
            }
        }
        NewConfig::BatchNorm { num_features } => {
            if let Some(bn) = any.downcast_mut::<BatchNorm2d>() {
                bn.num_features = num_features;
            }
        }
        NewConfig::Pad { front, back } => {
            if let Some(pad) = any.downcast_mut::<ConstantPad3d>() {
                pad.padding[4] = front;
                pad.padding[5] = back;
            }
        }
    }
    Ok(())
}

impl ThinningRecipe {
    /// Whether the recipe changes nothing.
    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty()
    }

    /// Shrinks `model` as the recipe says, together with the optimizer's per-parameter state and the masks when
    /// given, and records the recipe in the model (so checkpoints carry it). Every new tensor is computed before
    /// anything changes: on error the model, optimizer and masks are as they were.
    pub fn apply(&self, model: &mut Model, optimizer: Option<&mut Optimizer>, masks: Option<&mut Masks>) -> Result<()> {
        let mut selections: HashMap<String, Selections> = HashMap::new();
        let mut configs = Vec::new();
        for cut in &self.cuts {
            let (tensors, config) = plan_module(model, cut)?;
            for (leaf, sel) in tensors {
                if !sel.is_empty() {
                    let name = format!("{}.{leaf}", cut.module);
                    if selections.insert(name.clone(), sel).is_some() {
                        return Err(Error::invalid("thinning recipe", format!("'{}' is cut twice in one recipe", cut.module)));
                    }
                }
            }
            configs.push((cut.module.clone(), config));
        }
        // Every tensor to replace, with its new value: parameters, buffers, gradients, optimizer state, masks.
        // Every tensor to replace, with its new value: parameters, buffers, gradients, optimizer state, masks.
        let mut pending: Vec<(Tensor, Tensor)> = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in model.state_dict() {
                if let Some(sel) = selections.get(&name) {
                    pending.push((t.shallow_clone(), select(&t, sel)?));
                    let grad = t.grad();
                    if grad.defined() {
                        pending.push((grad.shallow_clone(), select(&grad, sel)?));
                    }
                }
            }
            let state = optimizer.as_ref().map(|o| o.state_tensors()).unwrap_or_default();
            for (key, t) in state {
                if let Some(sel) = key.rsplit_once('/').and_then(|(param, _)| selections.get(param)).filter(|_| t.dim() > 0) {
                    pending.push((t.shallow_clone(), select(&t, sel)?));
                }
            }
            let mask_tensors = masks.as_ref().map(|m| m.tensors()).unwrap_or_default();
            for (name, t) in mask_tensors {
                if let Some(sel) = selections.get(&name) {
                    pending.push((t.shallow_clone(), select(&t, sel)?));
                }
            }
            Ok(())
        })?;
        // `set_data` keeps a parameter's gradient accumulator while some graph built before (an output still
        // held) is alive, and that accumulator remembers the old shape, so the next backward pass would fail.
        // libtorch drops the accumulator when the new data has another dtype: a parameter passes through an empty
        // tensor of another dtype first (allocated here, so that nothing below can fail).
        let detour = |old: &Tensor| -> Result<Option<Tensor>> {
            let other = if old.kind() == Kind::Double { Kind::Float } else { Kind::Double };
            Ok(if old.requires_grad() { Some(Tensor::f_empty([0], (other, old.device()))?) } else { None })
        };
        let pending = pending.into_iter().map(|(old, new)| Ok((detour(&old)?, old, new))).collect::<Result<Vec<_>>>()?;
        for (detour, mut old, new) in pending {
            if let Some(detour) = detour {
                old.set_data(&detour);
            }
            old.set_data(&new);
        }
        for (name, config) in &configs {
            set_config(model, name, config)?;
        }
        if let Some(masks) = masks {
            masks.drop_unmasked_copies();
        }
        model.push_thinning_recipe(self.clone());
        Ok(())
    }
}
