//! Batch-norm folding before post-training quantization (Distiller's `fold_batch_norms`, inference form): a
//! BatchNorm2d that directly consumes a Conv2d's output is merged into the convolution and replaced by Identity.
//! Which BN follows which conv is read from the data flow of one forward pass (the BN's input is the conv's
//! output tensor), not from names.
use std::any::Any;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use crate::nn::{BatchNorm2d, Conv2d, Identity, Model, ModuleCall, Observer};
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
/// `σ = √(var + eps)`; the BN becomes an Identity (its name stays in the tree). Returns the folded pairs.
pub fn fold_batch_norms(model: &mut Model) -> Result<Vec<(String, String)>> {
    let pairs = conv_bn_pairs(model)?;
    for (conv_name, bn_name) in &pairs {
        let (gamma_over_sigma, shift) = {
            let bn = model.module(bn_name)?;
            let bn = (bn as &dyn Any).downcast_ref::<BatchNorm2d>().ok_or_else(|| Error::invalid("batch-norm folding", format!("{bn_name} is not a BatchNorm2d")))?;
            let sigma = bn.running_var.f_add_scalar(bn.eps)?.f_sqrt()?;
            let g = bn.weight.f_detach()?.f_div(&sigma)?;
            (g.shallow_clone(), (bn.bias.f_detach()?, bn.running_mean.f_detach()?, g))
        };
        let (beta, mean, g) = shift;
        let mut replaced = None;
        model.try_map_module(conv_name, |m| {
            let Some(conv) = (m.as_ref() as &dyn Any).downcast_ref::<Conv2d>() else {
                let e = Error::invalid("batch-norm folding", format!("{conv_name} is not a Conv2d"));
                return Err((m, e));
            };
            let fold = || -> Result<Conv2d> {
                let _guard = tch::no_grad_guard();
                let c = conv.weight.size()[0];
                let weight = conv.weight.f_mul(&gamma_over_sigma.f_reshape([c, 1, 1, 1])?)?.f_detach()?;
                let b = match &conv.bias {
                    Some(b) => b.f_detach()?,
                    None => beta.f_zeros_like()?,
                };
                let bias = b.f_sub(&mean)?.f_mul(&g)?.f_add(&beta)?;
                Ok(Conv2d { weight: weight.set_requires_grad(true), bias: Some(bias.set_requires_grad(true)), config: crate::nn::Conv2dConfig { bias: true, ..conv.config.clone() } })
            };
            match fold() {
                Ok(c) => {
                    replaced = Some(());
                    Ok(Box::new(c))
                }
                Err(e) => Err((m, e)),
            }
        })?;
        if replaced.is_some() {
            model.replace_module(bn_name, Identity)?;
        }
    }
    Ok(pairs)
}
