//! Mask criteria shared by the pruners, and the AGP sparsity formula.
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// `mask = |w| > threshold` as a float tensor of `w`'s shape: values at or below the threshold are pruned.
pub fn threshold_mask(w: &Tensor, threshold: f64) -> Result<Tensor> {
    Ok(w.f_abs()?.f_gt(threshold)?.f_to_kind(w.kind())?)
}

/// Distiller's level criterion: prune the `floor(sparsity · numel)` smallest magnitudes. The threshold is the
/// k-th smallest magnitude and every value equal to it is pruned too, so ties can prune a little more than asked
/// (as Distiller). `k == 0` keeps everything (Distiller crashes there).
pub fn level_mask(w: &Tensor, sparsity: f64) -> Result<Tensor> {
    check_sparsity("sparsity", sparsity)?;
    let k = (sparsity * w.numel() as f64).floor() as i64;
    if k == 0 {
        return Ok(w.f_ones_like()?);
    }
    let (bottom, _) = w.f_abs()?.f_flatten(0, -1)?.f_topk(k, 0, false, true)?;
    threshold_mask(w, bottom.f_double_value(&[k - 1])?)
}

/// Checks a sparsity lies in [0, 1).
pub fn check_sparsity(name: &str, s: f64) -> Result<()> {
    if (0.0..1.0).contains(&s) {
        Ok(())
    } else {
        Err(Error::invalid(name, format!("{s} must lie in [0, 1)")))
    }
}

/// The fraction of zeros in a tensor.
pub fn sparsity(t: &Tensor) -> Result<f64> {
    let n = t.numel();
    if n == 0 {
        return Ok(0.0);
    }
    let nnz = t.f_count_nonzero(None::<i64>)?.f_to_kind(Kind::Int64)?.f_int64_value(&[])?;
    Ok(1.0 - nnz as f64 / n as f64)
}

/// AGP's target sparsity (Zhu & Gupta, 2017) exactly as Distiller computes it: with
/// `span = ⌊(end − start − 1) / freq⌋ · freq` (the offset of the last pruning epoch),
/// `target = final + (initial − final) · (1 − (epoch − start) / span)³`.
pub fn agp_target(initial: f64, final_: f64, epoch: usize, start: usize, end: usize, frequency: Option<usize>) -> Result<f64> {
    let freq = frequency.ok_or_else(|| {
        Error::invalid("AGP schedule", "AGP pruners need starting_epoch/ending_epoch/frequency, not an epochs list")
    })?;
    let span = ((end - start - 1) / freq) * freq;
    if span == 0 {
        return Err(Error::invalid(
            "AGP schedule",
            format!("epochs {start}..{end} with frequency {freq} give a single pruning step; AGP needs at least two"),
        ));
    }
    let progress = (epoch.saturating_sub(start)) as f64 / span as f64;
    Ok(final_ + (initial - final_) * (1.0 - progress.min(1.0)).powi(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agp_targets_match_distiller_worked_values() {
        // Reference table in distiller-semantics.md §4.1, recomputed here by hand from the formula.
        let t = |e| agp_target(0.10, 0.50, e, 0, 30, Some(2)).unwrap();
        for (e, want) in [(0, 0.1), (2, 0.179738), (14, 0.45), (26, 0.499854), (28, 0.5)] {
            assert!((t(e) - want).abs() < 5e-7, "epoch {e}: {} vs {want}", t(e));
        }
        let t = |e| agp_target(0.0, 0.8, e, 0, 10, Some(1)).unwrap();
        assert!((t(1) - (0.8 - 0.8 * (8.0f64 / 9.0).powi(3))).abs() < 1e-12);
        assert!((t(9) - 0.8).abs() < 1e-12);
        assert_eq!(agp_target(0.05, 0.20, 1, 0, 2, Some(1)).unwrap(), 0.20);
        assert!(agp_target(0.1, 0.5, 0, 0, 1, Some(1)).is_err());
        assert!(agp_target(0.1, 0.5, 0, 0, 5, None).is_err());
    }

    #[test]
    fn level_mask_prunes_k_smallest_and_ties() {
        let w = Tensor::from_slice(&[0.5f32, -0.1, 0.3, -0.7, 0.2, 0.0]);
        let m = Vec::<f32>::try_from(&level_mask(&w, 0.5).unwrap()).unwrap();
        assert_eq!(m, [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        let ties = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&level_mask(&ties, 0.25).unwrap()).unwrap(), [0.0, 0.0, 0.0, 1.0]);
        assert_eq!(Vec::<f32>::try_from(&level_mask(&w, 0.1).unwrap()).unwrap(), [1.0; 6]);
        assert!(level_mask(&w, 1.0).is_err());
    }

    #[test]
    fn threshold_mask_prunes_at_or_below() {
        let w = Tensor::from_slice(&[-2.0f32, -1.0, 0.0, 1.0, 2.0]);
        assert_eq!(Vec::<f32>::try_from(&threshold_mask(&w, 1.0).unwrap()).unwrap(), [1.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(sparsity(&(w * threshold_mask(&Tensor::from_slice(&[-2.0f32, -1.0, 0.0, 1.0, 2.0]), 1.0).unwrap())).unwrap(), 0.6);
    }
}
