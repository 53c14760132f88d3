//! Model summaries. For now the parameter and sparsity totals that training reports.
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
