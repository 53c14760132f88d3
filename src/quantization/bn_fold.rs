//! Batch-norm folding before post-training quantization (Distiller's `fold_batch_norms`, inference form): a
//! BatchNorm2d that directly consumes a Conv2d's output is merged into the convolution and replaced by Identity.
//! Which BN follows which conv is read from the data flow of one forward pass (the BN's input is the conv's
//! output tensor), not from names.
use std::any::Any;

use tch::Tensor;

use crate::graph::{Graph, NodeKind};
use crate::nn::{BatchNorm2d, Conv2d, Identity, Model, Rollback};
use crate::{Error, Result};

/// The (conv, bn) pairs where the BN's only input is the conv's output and nothing else reads that output, from
/// the model's data-flow graph.
pub fn conv_bn_pairs(model: &mut Model) -> Result<Vec<(String, String)>> {
    let graph = Graph::trace(model)?;
    let is = |kind: &NodeKind, t: &str| matches!(kind, NodeKind::Module(k) if k == t);
    let mut pairs = Vec::new();
    for conv in graph.nodes().iter().filter(|n| is(&n.kind, "Conv2d")) {
        let readers: Vec<&crate::graph::Node> = graph.nodes().iter().filter(|n| n.inputs.contains(&conv.output)).collect();
        if let [bn] = readers.as_slice() {
            if is(&bn.kind, "BatchNorm2d") && bn.inputs.len() == 1 {
                pairs.push((conv.name.clone(), bn.name.clone()));
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

/// `conv`'s weight scaled per filter by the batch norm's `γ/√(σ²_running + ε)`: the weight of the folded
/// convolution (what Distiller's pruning `fold_batchnorm` ranks).
pub(crate) fn folded_weight(conv: &Conv2d, bn: &BatchNorm2d) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let g = bn.weight.f_detach()?.f_div(&bn.running_var.f_add_scalar(bn.eps)?.f_sqrt()?)?;
    Ok(conv.weight.f_detach()?.f_mul(&g.f_reshape([-1, 1, 1, 1])?)?)
}

/// The convolution that computes `bn(conv(x))`.
fn fold(conv: &Conv2d, bn: &BatchNorm2d) -> Result<Conv2d> {
    let _guard = tch::no_grad_guard();
    let g = bn.weight.f_detach()?.f_div(&bn.running_var.f_add_scalar(bn.eps)?.f_sqrt()?)?;
    let weight = folded_weight(conv, bn)?;
    let b = match &conv.bias {
        Some(b) => b.f_detach()?,
        None => bn.bias.f_detach()?.f_zeros_like()?,
    };
    let bias = b.f_sub(&bn.running_mean.f_detach()?)?.f_mul(&g)?.f_add(&bn.bias.f_detach()?)?;
    Ok(Conv2d { weight: weight.set_requires_grad(true), bias: Some(bias.set_requires_grad(true)), config: crate::nn::Conv2dConfig { bias: true, ..conv.config.clone() } })
}
