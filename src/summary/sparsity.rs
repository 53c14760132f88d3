//! Sparsity helpers, as Distiller's `utils.py` defines them. For a Linear weight `(out, in)`, "rows" counts
//! all-zero *input columns* and "cols" all-zero *output rows* (Distiller's transposed naming).
use tch::{Kind, Tensor};

use crate::Result;

fn count_nonzero(t: &Tensor) -> Result<i64> {
    Ok(t.f_ne(0.0)?.f_sum(Kind::Int64)?.f_int64_value(&[])?)
}

/// Fraction of non-zero elements.
pub fn density(t: &Tensor) -> Result<f64> {
    let n = t.numel();
    Ok(if n == 0 { 0.0 } else { count_nonzero(t)? as f64 / n as f64 })
}

/// Fraction of zero elements.
pub fn sparsity(t: &Tensor) -> Result<f64> {
    Ok(1.0 - density(t)?)
}

/// Fraction of all-zero groups among the rows of `rows` (`[n, m]`).
fn zero_rows(rows: &Tensor) -> Result<f64> {
    let n = rows.size()[0];
    if n == 0 {
        return Ok(0.0);
    }
    let nnz = count_nonzero(&rows.f_abs()?.f_sum_dim_intlist(1, false, Kind::Float)?)?;
    Ok(1.0 - nnz as f64 / n as f64)
}

/// 4-D: fraction of all-zero filters; other ranks 0.
pub fn sparsity_3d(t: &Tensor) -> Result<f64> {
    if t.dim() != 4 {
        return Ok(0.0);
    }
    zero_rows(&t.f_reshape([t.size()[0], -1])?)
}

/// 4-D: fraction of all-zero kernels (`kh×kw`); 2-D: fraction of all-zero rows (output neurons); else 0.
pub fn sparsity_2d(t: &Tensor) -> Result<f64> {
    let s = t.size();
    match s.len() {
        4 => zero_rows(&t.f_reshape([s[0] * s[1], -1])?),
        2 => zero_rows(t),
        _ => Ok(0.0),
    }
}

/// 4-D: fraction of input channels that are zero in every filter; else 0.
pub fn sparsity_ch(t: &Tensor) -> Result<f64> {
    if t.dim() != 4 {
        return Ok(0.0);
    }
    let c = t.size()[1];
    zero_rows(&t.f_transpose(0, 1)?.f_contiguous()?.f_reshape([c, -1])?)
}

/// 2-D: fraction of all-zero output rows (Distiller's "Cols"); else 0.
pub fn sparsity_cols(t: &Tensor) -> Result<f64> {
    if t.dim() != 2 {
        return Ok(0.0);
    }
    zero_rows(t)
}

/// 2-D: fraction of all-zero input columns (Distiller's "Rows"); else 0.
pub fn sparsity_rows(t: &Tensor) -> Result<f64> {
    if t.dim() != 2 {
        return Ok(0.0);
    }
    zero_rows(&t.f_transpose(0, 1)?.f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_tensors() {
        // Distiller's test_basic: a 2×3 matrix with one zero row and one zero column.
        let m = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 1.0, 0.0, 2.0]).view([2, 3]);
        assert!((sparsity(&m).unwrap() - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(sparsity_cols(&m).unwrap(), 0.5, "row 0 (an output neuron) is zero");
        assert!((sparsity_rows(&m).unwrap() - 1.0 / 3.0).abs() < 1e-12, "input column 1 is zero");
        assert_eq!(sparsity_2d(&m).unwrap(), 0.5);
        // 4-D: 2 filters × 2 channels × 1×2; filter 0 zero, channel 1 zero in both filters.
        let w = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]).view([2, 2, 1, 2]);
        assert_eq!(sparsity_3d(&w).unwrap(), 0.5);
        assert_eq!(sparsity_ch(&w).unwrap(), 0.5);
        assert_eq!(sparsity_2d(&w).unwrap(), 0.75);
        assert_eq!(density(&w).unwrap(), 0.125);
        assert_eq!(sparsity_3d(&m).unwrap(), 0.0);
    }
}
