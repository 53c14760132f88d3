//! Batch-norm folding before post-training quantization (Distiller's `fold_batch_norms`, inference form): a
//! BatchNorm2d that directly consumes a Conv2d's output is merged into the convolution and replaced by Identity.
//! Which BN follows which conv is read from the data flow of one forward pass (the BN's input is the conv's
//! output tensor), not from names.
use std::any::Any;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use crate::nn::{BatchNorm2d, Conv2d, Identity, Model, ModuleCall, Observer, Rollback};
use crate::{Error, Result};

#[derive(Default)]
struct Flow {
    calls: Vec<(String, String, Vec<usize>, usize)>,
    /// Every output is kept alive for the whole pass so that no later tensor reuses its address.
    keep: Vec<Tensor>,
}

impl Observer for Flow {
    fn observe(&mut self, call: &ModuleCall) {
        if call.module.children().is_empty() && !call.name.is_empty() {
            let inputs = call.inputs.iter().map(|t| t.data_ptr() as usize).collect();
            self.calls.push((call.name.to_string(), call.module.type_name().to_string(), inputs, call.output.data_ptr() as usize));
            self.keep.push(call.output.shallow_clone());
        }
    }
}

/// The (conv, bn) pairs where the BN's only input is the conv's output and nothing else reads that output.
pub fn conv_bn_pairs(model: &mut Model) -> Result<Vec<(String, String)>> {
    let flow = Arc::new(Mutex::new(Flow::default()));
    let id = model.attach_observer(flow.clone());
    let was_training = model.is_training();
    model.eval();
    let s = &model.info().input_shape;
    let x = Tensor::f_randn([1, s[0], s[1], s[2]], (Kind::Float, model.device()))?;
    let result = tch::no_grad(|| model.forward(&x));
    model.detach_observer(id);
    if was_training {
        model.train();
    }
    let _ = result?;
    let flow = flow.lock().map_err(|_| Error::invalid("batch-norm folding", "observer poisoned"))?;
    let mut pairs = Vec::new();
    for (conv, ty, _, out) in &flow.calls {
        if ty != "Conv2d" {
            continue;
        }
        let readers: Vec<&(String, String, Vec<usize>, usize)> = flow.calls.iter().filter(|(_, _, ins, _)| ins.contains(out)).collect();
        if let [(bn, bn_ty, _, _)] = readers.as_slice() {
            if bn_ty == "BatchNorm2d" {
                pairs.push((conv.clone(), bn.clone()));
            }
        }
    }
    Ok(pairs)
}

/// Folds every batch norm that directly follows a convolution into it: `w' = w·γ/σ`, `b' = (b − μ)·γ/σ + β` with
/// `σ = √(var + eps)`; the BN becomes an Identity (its name stays in the tree). Returns the folded pairs. On
/// error the model is left as it was.
pub fn fold_batch_norms(model: &mut Model) -> Result<Vec<(String, String)>> {
    Rollback::transaction(model, fold_batch_norms_recorded)
}

/// [`fold_batch_norms`], recording every module it swaps out in `rollback` (for a caller that undoes more).
pub(crate) fn fold_batch_norms_recorded(model: &mut Model, rollback: &mut Rollback) -> Result<Vec<(String, String)>> {
    let pairs = conv_bn_pairs(model)?;
    for (conv_name, bn_name) in &pairs {
        let folded = {
            let bn = model.module(bn_name)?;
            let bn = (bn as &dyn Any).downcast_ref::<BatchNorm2d>().ok_or_else(|| Error::invalid("batch-norm folding", format!("{bn_name} is not a BatchNorm2d")))?;
            let conv = model.module(conv_name)?;
            let conv = (conv as &dyn Any).downcast_ref::<Conv2d>().ok_or_else(|| Error::invalid("batch-norm folding", format!("{conv_name} is not a Conv2d")))?;
            fold(conv, bn)?
        };
        let mut original = None;
        model.try_map_module(conv_name, |m| {
            original = Some(m);
            Ok(Box::new(folded))
        })?;
        if let Some(m) = original {
            rollback.swapped(conv_name, m);
        }
        let bn = model.replace_module(bn_name, Identity)?;
        rollback.swapped(bn_name, bn);
    }
    Ok(pairs)
}

/// The convolution that computes `bn(conv(x))`.
fn fold(conv: &Conv2d, bn: &BatchNorm2d) -> Result<Conv2d> {
    let _guard = tch::no_grad_guard();
    let sigma = bn.running_var.f_add_scalar(bn.eps)?.f_sqrt()?;
    let g = bn.weight.f_detach()?.f_div(&sigma)?;
    let c = conv.weight.size()[0];
    let weight = conv.weight.f_mul(&g.f_reshape([c, 1, 1, 1])?)?.f_detach()?;
    let b = match &conv.bias {
        Some(b) => b.f_detach()?,
        None => bn.bias.f_detach()?.f_zeros_like()?,
    };
    let bias = b.f_sub(&bn.running_mean.f_detach()?)?.f_mul(&g)?.f_add(&bn.bias.f_detach()?)?;
    Ok(Conv2d { weight: weight.set_requires_grad(true), bias: Some(bias.set_requires_grad(true)), config: crate::nn::Conv2dConfig { bias: true, ..conv.config.clone() } })
}
