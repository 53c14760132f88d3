//! Model summaries: sparsity helpers ([`sparsity`]), parameter counts, the tables of [`tables`], and what a network
//! computes inside ([`feature_maps`]: module outputs and Grad-CAM; [`activations`]: histograms of every layer's
//! outputs).
pub mod activations;
pub mod feature_maps;
pub mod sparsity;
pub mod tables;
use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::nn::Model;
use crate::Result;

/// Parameter counts of a model, and the sparsity of its weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParameterCounts {
    /// Elements of every parameter (weights, biases, batch-norm γ and β).
    pub params: i64,
    /// Non-zero elements among them.
    pub nnz_params: i64,
    /// Elements of the 2-D and 4-D parameters (Linear and Conv weights), which Distiller's sparsity counts.
    pub weights: i64,
    /// Non-zero elements among the 2-D and 4-D parameters (Distiller's `NNZ-Params`).
    pub nnz_weights: i64,
    /// Fraction of zeros among the 2-D and 4-D parameters.
    pub sparsity: f64,
}

/// Counts parameters and zeros.
pub fn parameter_counts(model: &Model) -> Result<ParameterCounts> {
    let (mut params, mut nnz_params, mut weights, mut nnz_weights) = (0, 0, 0, 0);
    for (_, t) in model.named_parameters() {
        let n = t.numel() as i64;
        let nnz = t.f_count_nonzero(None::<i64>)?.f_to_kind(Kind::Int64)?.f_int64_value(&[])?;
        params += n;
        nnz_params += nnz;
        if matches!(t.dim(), 2 | 4) {
            weights += n;
            nnz_weights += nnz;
        }
    }
    let sparsity = if weights == 0 { 0.0 } else { 1.0 - nnz_weights as f64 / weights as f64 };
    Ok(ParameterCounts { params, nnz_params, weights, nnz_weights, sparsity })
}

/// A histogram of `t`'s values in `bins` equal-width buckets from its minimum to its maximum (a constant tensor
/// gets the bucket range `[v, v + 1]`): `(edges, counts)`, with one more edge than counts.
pub fn histogram(t: &tch::Tensor, bins: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let v = t.f_detach()?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
    if v.numel() == 0 {
        return Err(crate::Error::invalid("histogram", "no values"));
    }
    let bins = bins.max(1);
    let (lo, hi) = (v.f_min()?.f_double_value(&[])?, v.f_max()?.f_double_value(&[])?);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    Ok((bucket_edges(lo, hi, bins), bucket_counts(&v, lo, hi, bins)?))
}

/// The `bins + 1` edges of `bins` equal-width buckets from `lo` to `hi`.
pub(crate) fn bucket_edges(lo: f64, hi: f64, bins: usize) -> Vec<f64> {
    (0..=bins).map(|i| lo + (hi - lo) * i as f64 / bins as f64).collect()
}

/// Counts of `v`'s values in `bins` equal-width buckets from `lo` to `hi` (`hi > lo`); values outside go to the
/// first or last bucket.
pub(crate) fn bucket_counts(v: &tch::Tensor, lo: f64, hi: f64, bins: usize) -> Result<Vec<f64>> {
    let idx = v.f_sub_scalar(lo)?.f_div_scalar((hi - lo) / bins as f64)?.f_floor()?.f_clamp(0.0, (bins - 1) as f64)?.f_to_kind(Kind::Int64)?;
    Ok(Vec::<f64>::try_from(&idx.f_flatten(0, -1)?.f_bincount(None::<tch::Tensor>, bins as i64)?.f_to_kind(Kind::Double)?)?)
}
