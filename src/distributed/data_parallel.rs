//! Data-parallel training on a [`ProcessGroup`], as PyTorch's DistributedDataParallel does it: every rank holds
//! the whole model, trains on its shard of each global mini-batch, and applies the same averaged gradient, so the
//! ranks' weights stay identical without ever being sent after the start.
//!
//! [`crate::train::Trainer`] calls these when [`crate::train::TrainConfig::distributed`] is set; a custom loop
//! can call them the same way: [`broadcast_state`] once, [`average_gradients`] after each backward pass,
//! [`broadcast_buffers`] before each forward pass, [`check_in_sync`] now and then.
use std::hash::Hasher;

use tch::{Kind, Tensor};

use super::{ProcessGroup, ReduceOp};
use crate::metrics::MetricsAccumulator;
use crate::nn::Model;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// Applies `op` to `tensors` through one flat buffer per dtype (one collective each, not one per tensor), then
/// copies the results back into the tensors.
fn flat_collective(tensors: &[Tensor], mut op: impl FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let mut kinds: Vec<Kind> = Vec::new();
    for t in tensors {
        if !kinds.contains(&t.kind()) {
            kinds.push(t.kind());
        }
    }
    for kind in kinds {
        let members: Vec<&Tensor> = tensors.iter().filter(|t| t.kind() == kind && t.numel() > 0).collect();
        if members.is_empty() {
            continue;
        }
        let flat: Vec<Tensor> = members.iter().map(|t| t.f_reshape([-1])).collect::<Result<_, _>>()?;
        let mut flat = Tensor::f_cat(&flat, 0)?;
        op(&mut flat)?;
        let mut offset = 0;
        for t in members {
            let n = t.numel() as i64;
            let mut target = t.shallow_clone();
            target.f_copy_(&flat.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?)?;
            offset += n;
        }
    }
    Ok(())
}

/// Copies rank 0's parameters and buffers into every rank's model (DDP does this when it wraps a model), so
/// training starts from identical weights whatever each rank loaded or drew.
pub fn broadcast_state(group: &ProcessGroup, model: &Model) -> Result<()> {
    let tensors: Vec<Tensor> = model.state_dict().into_iter().map(|(_, t)| t).collect();
    flat_collective(&tensors, |flat| group.broadcast(flat, 0))
}

/// Copies rank 0's buffers (batch-norm running statistics, quantizer ranges) into every rank's model, as DDP's
/// `broadcast_buffers=True` does before each forward pass: the statistics are rank 0's, and every rank
/// validates and checkpoints the same model.
pub fn broadcast_buffers(group: &ProcessGroup, model: &Model) -> Result<()> {
    let tensors: Vec<Tensor> = model.named_buffers().into_iter().map(|(_, t)| t).collect();
    flat_collective(&tensors, |flat| group.broadcast(flat, 0))
}

/// Replaces each rank's gradients by their weighted sum over the ranks, where this rank's weight is
/// `local_samples / global_samples`: the gradient of the mean loss over the whole global mini-batch, even when
/// the ranks' shards differ in size. Parameters without a gradient are left alone (they have none on any rank).
pub fn average_gradients(group: &ProcessGroup, optimizer: &Optimizer, local_samples: usize, global_samples: usize) -> Result<()> {
    if global_samples == 0 || local_samples > global_samples {
        return Err(Error::invalid("gradient averaging", format!("{local_samples} local samples of a global batch of {global_samples}")));
    }
    let weight = local_samples as f64 / global_samples as f64;
    let grads: Vec<Tensor> = optimizer.groups().iter().flat_map(|g| g.params()).map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
    flat_collective(&grads, |flat| {
        let _ = flat.f_mul_scalar_(weight)?;
        group.all_reduce(flat, ReduceOp::Sum)
    })
}

/// Adds the ranks' metric sums together, so that every rank reports the metrics of all the samples.
pub fn reduce_metrics(group: &ProcessGroup, acc: &MetricsAccumulator) -> Result<MetricsAccumulator> {
    let mut sums = Tensor::f_from_slice(&acc.sums())?;
    group.all_reduce(&mut sums, ReduceOp::Sum)?;
    let v = Vec::<f64>::try_from(&sums)?;
    Ok(MetricsAccumulator::from_sums([v[0], v[1], v[2], v[3]]))
}

/// A 64-bit fingerprint of named tensors (names, shapes, dtypes and bytes).
pub fn fingerprint(tensors: &[(String, Tensor)]) -> Result<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, t) in tensors {
        h.write(name.as_bytes());
        for d in t.size() {
            h.write_i64(d);
        }
        h.write(format!("{:?}", t.kind()).as_bytes());
        let bytes = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?.f_view_dtype(Kind::Uint8)?.f_reshape([-1])?;
        h.write(&Vec::<u8>::try_from(&bytes)?);
    }
    Ok(h.finish())
}

/// Checks that every rank holds the same `tensors` (weights, buffers and pruning masks, say), by comparing
/// fingerprints; an error names the ranks that differ from rank 0. Identical inputs and identical averaged
/// gradients keep them equal, so a difference means non-determinism the run cannot recover from.
pub fn check_in_sync(group: &ProcessGroup, tensors: &[(String, Tensor)], what: &str) -> Result<()> {
    let own = fingerprint(tensors)?;
    let gathered = group.all_gather(&Tensor::f_from_slice(&[own as i64])?)?;
    let all: Vec<i64> = gathered.iter().map(|t| t.int64_value(&[0])).collect();
    let differ: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::Distributed(format!(
        "{what}: rank(s) {differ:?} differ from rank 0; the ranks' computations diverged (a non-deterministic kernel, or ranks started from different checkpoints)"
    )))
}
