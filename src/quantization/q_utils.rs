//! Linear quantization primitives, as Distiller's `q_utils.py`.
//!
//! Convention (Distiller's): `q = round(scale·x − zero_point)` and `x̂ = (q + zero_point) / scale`; the scale
//! counts levels per unit (the reciprocal of PyTorch's scale) and the zero point is subtracted. Rounding is
//! half-to-even, as `torch.round`. Scales and zero points are tensors: 0-dimensional per tensor, `[C]` per channel.
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// How a tensor's range maps to integers (Distiller's `LinearQuantMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinearQuantMode {
    /// Signed, zero point 0, full range (8 bits: −128..127 with 127.5 levels per saturation unit).
    #[serde(rename = "SYMMETRIC")]
    Symmetric,
    /// Signed, zero point 0, restricted to ±(2^(b−1) − 1).
    #[serde(rename = "SYMMETRIC_RESTRICTED")]
    SymmetricRestricted,
    /// Unsigned `0..2^b − 1` with a zero point.
    #[serde(rename = "ASYMMETRIC_UNSIGNED")]
    AsymmetricUnsigned,
    /// Signed `−2^(b−1)..2^(b−1) − 1` with a zero point.
    #[serde(rename = "ASYMMETRIC_SIGNED")]
    AsymmetricSigned,
}

impl LinearQuantMode {
    /// Whether the integers are signed.
    pub fn signed(self) -> bool {
        !matches!(self, LinearQuantMode::AsymmetricUnsigned)
    }
    /// Whether the zero point is fixed at 0.
    pub fn symmetric(self) -> bool {
        matches!(self, LinearQuantMode::Symmetric | LinearQuantMode::SymmetricRestricted)
    }
    /// Whether the signed range drops its most negative value.
    pub fn restricted(self) -> bool {
        matches!(self, LinearQuantMode::SymmetricRestricted)
    }
}

impl FromStr for LinearQuantMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "SYMMETRIC" | "sym" => LinearQuantMode::Symmetric,
            "SYMMETRIC_RESTRICTED" | "sym_restr" => LinearQuantMode::SymmetricRestricted,
            "ASYMMETRIC_UNSIGNED" | "asym_u" => LinearQuantMode::AsymmetricUnsigned,
            "ASYMMETRIC_SIGNED" | "asym_s" => LinearQuantMode::AsymmetricSigned,
            other => {
                return Err(Error::unknown(
                    "quantization mode",
                    other,
                    ["SYMMETRIC", "SYMMETRIC_RESTRICTED", "ASYMMETRIC_UNSIGNED", "ASYMMETRIC_SIGNED", "sym", "sym_restr", "asym_u", "asym_s"],
                ))
            }
        })
    }
}

/// How activation ranges are clipped (Distiller's `ClipMode`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum ClipMode {
    /// The full observed range.
    None,
    /// The average over samples of per-sample minima and maxima.
    Avg,
    /// `mean ± n·std`, within the observed range.
    NStd(f64),
    /// ACIQ (Banner et al.) for a Gaussian.
    Gauss,
    /// ACIQ for a Laplace distribution.
    Laplace,
}

impl ClipMode {
    /// Parses Distiller's names (`NONE`, `AVG`, `N_STD`, `GAUSS`, `LAPLACE`, or lower case); `N_STD` needs `n_stds`.
    pub fn parse(s: &str, n_stds: Option<f64>) -> Result<Self> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "NONE" => ClipMode::None,
            "AVG" => ClipMode::Avg,
            "N_STD" => match n_stds {
                Some(n) if n > 0.0 && n.is_finite() => ClipMode::NStd(n),
                _ => return Err(Error::invalid("clip_n_stds", "N_STD clipping needs clip_n_stds > 0")),
            },
            "GAUSS" => ClipMode::Gauss,
            "LAPLACE" => ClipMode::Laplace,
            _ => return Err(Error::unknown("clip mode", s, ["NONE", "AVG", "N_STD", "GAUSS", "LAPLACE"])),
        })
    }
}

/// Checks a bit width is 1..=32.
pub fn check_bits(name: &str, bits: u32) -> Result<()> {
    if (1..=32).contains(&bits) {
        Ok(())
    } else {
        Err(Error::invalid(name, format!("{bits} bits: must be 1..=32")))
    }
}

/// The integer range of `bits` bits (Distiller's `get_quantized_range`).
pub fn quantized_range(bits: u32, signed: bool, restricted: bool) -> (f64, f64) {
    let b = bits as i32;
    if signed {
        let half = 2f64.powi(b - 1);
        (if restricted { -(half - 1.0) } else { -half }, half - 1.0)
    } else {
        (0.0, 2f64.powi(b) - 1.0)
    }
}

fn f64_tensor(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_kind(Kind::Double)?)
}

/// Symmetric parameters for saturation `sat` (≥ 0): `scale = n / sat` with `n = (2^b − 1)/2`, or `2^(b−1) − 1`
/// when restricted; a zero saturation gives scale 1. The zero point is 0.
pub fn symmetric_params(bits: u32, sat: &Tensor, restrict: bool) -> Result<(Tensor, Tensor)> {
    check_bits("bits", bits)?;
    let sat = f64_tensor(sat)?;
    if sat.f_lt(0.0)?.f_any()?.f_int64_value(&[])? != 0 {
        return Err(Error::invalid("saturation", "must be >= 0 for symmetric quantization"));
    }
    let n = if restrict { 2f64.powi(bits as i32 - 1) - 1.0 } else { (2f64.powi(bits as i32) - 1.0) / 2.0 };
    let sat = sat.f_masked_fill(&sat.f_eq(0.0)?, n)?;
    let scale = sat.f_full_like(n)?.f_div(&sat)?;
    let zp = scale.f_zeros_like()?;
    Ok((scale, zp))
}

/// Asymmetric parameters for the range `[min, max]` (widened to include 0): `scale = (2^b − 1)/(max − min)`
/// (a zero-width range gives scale 1), `zero_point = round(scale·min)`, plus `2^(b−1)` when signed.
pub fn asymmetric_params(bits: u32, min: &Tensor, max: &Tensor, integral_zero_point: bool, signed: bool) -> Result<(Tensor, Tensor)> {
    check_bits("bits", bits)?;
    let (min, max) = (f64_tensor(min)?, f64_tensor(max)?);
    if min.f_gt_tensor(&max)?.f_any()?.f_int64_value(&[])? != 0 {
        return Err(Error::invalid("range", "min must not exceed max"));
    }
    let n = 2f64.powi(bits as i32) - 1.0;
    let min = min.f_clamp_max(0.0)?;
    let max = max.f_clamp_min(0.0)?;
    let diff = max.f_sub(&min)?;
    let diff = diff.f_masked_fill(&diff.f_eq(0.0)?, n)?;
    let scale = diff.f_full_like(n)?.f_div(&diff)?;
    let mut zp = scale.f_mul(&min)?;
    if integral_zero_point {
        zp = zp.f_round()?;
    }
    if signed {
        zp = zp.f_add_scalar(2f64.powi(bits as i32 - 1))?;
    }
    Ok((scale, zp))
}

/// `round(scale·x − zero_point)`.
pub fn linear_quantize(x: &Tensor, scale: &Tensor, zp: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(scale)?.f_sub(zp)?.f_round()?)
}

/// `clamp(round(scale·x − zero_point), lo, hi)`.
pub fn linear_quantize_clamp(x: &Tensor, scale: &Tensor, zp: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    Ok(linear_quantize(x, scale, zp)?.f_clamp(lo, hi)?)
}

/// `(q + zero_point) / scale`.
pub fn linear_dequantize(q: &Tensor, scale: &Tensor, zp: &Tensor) -> Result<Tensor> {
    Ok(q.f_add(zp)?.f_div(scale)?)
}

/// Straight-through estimator: the forward value of `f(x)`, the gradient of the identity.
pub fn straight_through(x: &Tensor, fx: &Tensor) -> Result<Tensor> {
    Ok(x.f_add(&fx.f_sub(x)?.f_detach()?)?)
}

/// Quantize-dequantize with a straight-through gradient (Distiller's `LinearQuantizeSTE` with dequantize).
pub fn fake_quantize_ste(x: &Tensor, scale: &Tensor, zp: &Tensor) -> Result<Tensor> {
    let fq = tch::no_grad(|| linear_quantize(x, scale, zp).and_then(|q| linear_dequantize(&q, scale, zp)))?;
    straight_through(x, &fq.f_to_kind(x.kind())?)
}

/// Reshapes a per-channel vector `[C]` to broadcast along dimension `dim` of a tensor of rank `rank`.
pub fn along(v: &Tensor, dim: usize, rank: usize) -> Result<Tensor> {
    if v.dim() == 0 {
        return Ok(v.shallow_clone());
    }
    if dim >= rank {
        return Err(Error::Shape(format!("per-channel values {:?} cannot lie along dimension {dim} of a rank-{rank} tensor", v.size())));
    }
    let mut shape = vec![1i64; rank];
    shape[dim] = v.size()[0];
    Ok(v.f_reshape(shape.as_slice())?)
}

/// ACIQ's α multipliers for a Laplace distribution (two-sided / half range), indexed by bits 0..=8.
const ACIQ_LAPLACE: [f64; 9] = [1.05, 1.86, 2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89];
const ACIQ_LAPLACE_HALF: [f64; 9] = [1.86, 2.83, 3.89, 5.02, 6.2, 7.41, 8.64, 9.89, 11.16];
/// … and for a Gaussian, indexed by bits 1..=8.
const ACIQ_GAUSS: [f64; 8] = [1.24, 1.71, 2.15, 2.55, 2.93, 3.28, 3.61, 3.92];
const ACIQ_GAUSS_HALF: [f64; 8] = [1.71, 2.15, 2.55, 2.93, 3.28, 3.61, 3.92, 4.2];

/// ACIQ's clipping α for `bits`: Laplace `b · A_L[bits]`, Gauss `std · A_G[bits]`.
pub fn aciq_alpha(mode: ClipMode, bits: u32, half_range: bool, b: f64, std: f64) -> Result<f64> {
    let too_many = || Error::invalid("bits", format!("ACIQ clipping has tables up to 8 bits, got {bits}"));
    match mode {
        ClipMode::Laplace => {
            let table = if half_range { ACIQ_LAPLACE_HALF } else { ACIQ_LAPLACE };
            Ok(b * table.get(bits as usize).ok_or_else(too_many)?)
        }
        ClipMode::Gauss => {
            let table = if half_range { ACIQ_GAUSS_HALF } else { ACIQ_GAUSS };
            Ok(std * table.get((bits as usize).wrapping_sub(1)).ok_or_else(too_many)?)
        }
        _ => Err(Error::invalid("clip mode", "ACIQ alpha applies to GAUSS and LAPLACE only")),
    }
}

/// Statistics of a tensor or a calibration record: what range functions read.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RangeStats {
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean over samples of each sample's minimum.
    pub avg_min: f64,
    /// Mean over samples of each sample's maximum.
    pub avg_max: f64,
    /// Mean of all values.
    pub mean: f64,
    /// Standard deviation of all values.
    pub std: f64,
    /// Mean absolute deviation from the mean (Laplace's b).
    pub b: f64,
}

impl RangeStats {
    /// The statistics of `x` (samples along dimension 0).
    pub fn of(x: &Tensor) -> Result<Self> {
        let x = x.f_detach()?.f_to_kind(Kind::Double)?;
        let n = x.size().first().copied().unwrap_or(1).max(1);
        let per_sample = x.f_reshape([n, -1])?;
        let mean = x.f_mean(Kind::Double)?.f_double_value(&[])?;
        Ok(RangeStats {
            min: x.f_min()?.f_double_value(&[])?,
            max: x.f_max()?.f_double_value(&[])?,
            avg_min: per_sample.f_amin(1, false)?.f_mean(Kind::Double)?.f_double_value(&[])?,
            avg_max: per_sample.f_amax(1, false)?.f_mean(Kind::Double)?.f_double_value(&[])?,
            mean,
            std: if x.numel() > 1 { x.f_std(true)?.f_double_value(&[])? } else { 0.0 },
            b: x.f_sub_scalar(mean)?.f_abs()?.f_mean(Kind::Double)?.f_double_value(&[])?,
        })
    }

    /// The clipped range `(lo, hi)` for `clip` at `bits` (Distiller's saturation functions).
    pub fn range(&self, clip: ClipMode, bits: u32, half_range: bool) -> Result<(f64, f64)> {
        Ok(match clip {
            ClipMode::None => (self.min, self.max),
            ClipMode::Avg => (self.avg_min, self.avg_max),
            ClipMode::NStd(n) => ((self.mean - n * self.std).max(self.min), (self.mean + n * self.std).min(self.max)),
            ClipMode::Gauss | ClipMode::Laplace => {
                let alpha = aciq_alpha(clip, bits, half_range, self.b, self.std)?;
                let lo = (self.mean - alpha).max(self.avg_min.min(self.min));
                (lo, lo + if half_range { alpha } else { 2.0 * alpha })
            }
        })
    }

    /// The saturation value for symmetric modes: `max(|lo|, |hi|)`; ACIQ: `|mean| + α`.
    pub fn symmetric_sat(&self, clip: ClipMode, bits: u32, half_range: bool) -> Result<f64> {
        match clip {
            ClipMode::Gauss | ClipMode::Laplace => Ok(self.mean.abs() + aciq_alpha(clip, bits, half_range, self.b, self.std)?),
            _ => {
                let (lo, hi) = self.range(clip, bits, half_range)?;
                Ok(lo.abs().max(hi.abs()))
            }
        }
    }
}

/// Scale and zero point.
#[derive(Debug)]
pub struct QParams {
    /// Levels per unit; 0-d per tensor, `[C]` per channel.
    pub scale: Tensor,
    /// Subtracted zero point, same shape as `scale`.
    pub zero_point: Tensor,
    /// Integer range.
    pub range: (f64, f64),
}

impl QParams {
    /// Parameters of `mode` at `bits` for statistics `stats` clipped by `clip`.
    pub fn from_stats(stats: &RangeStats, bits: u32, mode: LinearQuantMode, clip: ClipMode, half_range: bool) -> Result<Self> {
        let range = quantized_range(bits, mode.signed(), mode.restricted());
        let (scale, zero_point) = if mode.symmetric() {
            symmetric_params(bits, &Tensor::from(stats.symmetric_sat(clip, bits, half_range)?), mode.restricted())?
        } else {
            let (lo, hi) = stats.range(clip, bits, half_range)?;
            asymmetric_params(bits, &Tensor::from(lo), &Tensor::from(hi), true, mode == LinearQuantMode::AsymmetricSigned)?
        };
        Ok(QParams { scale, zero_point, range })
    }

    /// Parameters from a weight tensor's own range, per output channel (dimension 0) or per tensor; no clipping.
    pub fn from_weight(w: &Tensor, bits: u32, mode: LinearQuantMode, per_channel: bool) -> Result<Self> {
        let range = quantized_range(bits, mode.signed(), mode.restricted());
        let w = w.f_detach()?.f_to_kind(Kind::Double)?;
        let (min, max) = if per_channel && w.dim() >= 2 {
            let c = w.size()[0];
            let rows = w.f_reshape([c, -1])?;
            (rows.f_amin(1, false)?, rows.f_amax(1, false)?)
        } else {
            (w.f_min()?, w.f_max()?)
        };
        let (scale, zero_point) = if mode.symmetric() {
            symmetric_params(bits, &min.f_abs()?.f_maximum(&max.f_abs()?)?, mode.restricted())?
        } else {
            asymmetric_params(bits, &min, &max, true, mode == LinearQuantMode::AsymmetricSigned)?
        };
        Ok(QParams { scale, zero_point, range })
    }

    /// The parameters shaped to broadcast along dimension `dim` of a rank-`rank` tensor, as `kind`.
    pub fn along(&self, dim: usize, rank: usize, kind: Kind) -> Result<(Tensor, Tensor)> {
        Ok((along(&self.scale, dim, rank)?.f_to_kind(kind)?, along(&self.zero_point, dim, rank)?.f_to_kind(kind)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    #[test]
    fn along_reshapes_for_broadcast_and_rejects_a_missing_dimension() {
        let v = Tensor::from_slice(&[1.0f64, 2.0]);
        assert_eq!(along(&v, 1, 4).unwrap().size(), [1, 2, 1, 1]);
        assert!(along(&v, 1, 1).unwrap_err().to_string().contains("dimension 1 of a rank-1"));
    }

    #[test]
    fn symmetric_params_match_distiller_tests() {
        let (s, z) = symmetric_params(8, &Tensor::from(4.0), false).unwrap();
        assert_eq!((s.double_value(&[]), z.double_value(&[])), (31.875, 0.0));
        assert_eq!(symmetric_params(8, &Tensor::from(4.0), true).unwrap().0.double_value(&[]), 31.75);
        assert_eq!(symmetric_params(8, &Tensor::from(0.0), false).unwrap().0.double_value(&[]), 1.0, "zero range: scale n/n");
        let sat = Tensor::from_slice(&[4.0f64, 10.0, 0.0]);
        assert_eq!(v(&symmetric_params(8, &sat, false).unwrap().0), [31.875, 12.75, 1.0]);
        assert_eq!(v(&symmetric_params(8, &sat, true).unwrap().0), [31.75, 12.7, 1.0]);
        assert!(symmetric_params(8, &Tensor::from(-5.0), false).is_err());
        assert!(symmetric_params(0, &Tensor::from(1.0), false).is_err());
        assert!(symmetric_params(33, &Tensor::from(1.0), false).is_err());
    }

    #[test]
    fn asymmetric_params_match_distiller_tests() {
        let (s, z) = asymmetric_params(8, &Tensor::from(-2.0), &Tensor::from(10.0), true, false).unwrap();
        assert_eq!((s.double_value(&[]), z.double_value(&[])), (21.25, -42.0));
        let (_, z) = asymmetric_params(8, &Tensor::from(-2.0), &Tensor::from(10.0), true, true).unwrap();
        assert_eq!(z.double_value(&[]), 86.0);
        // Positive-only range: min widened to 0.
        let (s, z) = asymmetric_params(8, &Tensor::from(2.0), &Tensor::from(5.0), true, false).unwrap();
        assert_eq!((s.double_value(&[]), z.double_value(&[])), (51.0, 0.0));
        // Negative-only range: max widened to 0; zero point −255.
        let (s, z) = asymmetric_params(8, &Tensor::from(-5.0), &Tensor::from(-2.0), true, false).unwrap();
        assert_eq!((s.double_value(&[]), z.double_value(&[])), (51.0, -255.0));
        // Zero-width range at 0: scale 1.
        let (s, z) = asymmetric_params(8, &Tensor::from(0.0), &Tensor::from(0.0), true, false).unwrap();
        assert_eq!((s.double_value(&[]), z.double_value(&[])), (1.0, 0.0));
        // Per channel.
        let (s, z) = asymmetric_params(8, &Tensor::from_slice(&[-2.0f64, 0.0]), &Tensor::from_slice(&[10.0f64, 5.0]), true, false).unwrap();
        assert_eq!(v(&s), [21.25, 51.0]);
        assert_eq!(v(&z), [-42.0, 0.0]);
        assert!(asymmetric_params(8, &Tensor::from(5.0), &Tensor::from(4.0), true, false).is_err());
    }

    #[test]
    fn rounding_is_half_to_even_and_ranges_are_distillers() {
        let x = Tensor::from_slice(&[-42.5f64, 76.5, 127.5, 0.5, 1.5]);
        let one = Tensor::from(1.0f64);
        let zero = Tensor::from(0.0f64);
        assert_eq!(v(&linear_quantize(&x, &one, &zero).unwrap()), [-42.0, 76.0, 128.0, 0.0, 2.0]);
        assert_eq!(v(&linear_quantize_clamp(&x, &one, &zero, -128.0, 127.0).unwrap()), [-42.0, 76.0, 127.0, 0.0, 2.0]);
        assert_eq!(quantized_range(8, true, false), (-128.0, 127.0));
        assert_eq!(quantized_range(8, true, true), (-127.0, 127.0));
        assert_eq!(quantized_range(4, false, false), (0.0, 15.0));
        // s = 21.25, zp = −42: 0 ↦ 42 exactly; 10 ↦ round(254.5) = 254 (half to even).
        let (s, z) = asymmetric_params(8, &Tensor::from(-2.0), &Tensor::from(10.0), true, false).unwrap();
        let q = linear_quantize(&Tensor::from_slice(&[0.0f64, 10.0]), &s, &z).unwrap();
        assert_eq!(v(&q), [42.0, 254.0]);
        assert_eq!(v(&linear_dequantize(&q, &s, &z).unwrap())[0], 0.0);
    }

    #[test]
    fn weight_params_per_channel_and_clip_ranges() {
        let w = Tensor::from_slice(&[-1.0f64, 0.5, 2.0, -4.0]).reshape([2, 2]);
        let p = QParams::from_weight(&w, 8, LinearQuantMode::Symmetric, true).unwrap();
        assert_eq!(v(&p.scale), [127.5, 127.5 / 4.0]);
        let p = QParams::from_weight(&w, 8, LinearQuantMode::Symmetric, false).unwrap();
        assert_eq!(v(&p.scale), [127.5 / 4.0]);
        let st = RangeStats { min: -10.0, max: 8.0, avg_min: -4.0, avg_max: 6.0, mean: 1.0, std: 2.0, b: 1.5 };
        assert_eq!(st.range(ClipMode::None, 8, false).unwrap(), (-10.0, 8.0));
        assert_eq!(st.range(ClipMode::Avg, 8, false).unwrap(), (-4.0, 6.0));
        assert_eq!(st.range(ClipMode::NStd(2.0), 8, false).unwrap(), (-3.0, 5.0));
        assert_eq!(st.symmetric_sat(ClipMode::Avg, 8, false).unwrap(), 6.0);
        // Laplace at 4 bits: α = b · 5.03 = 7.545; symmetric sat = |mean| + α.
        assert!((st.symmetric_sat(ClipMode::Laplace, 4, false).unwrap() - (1.0 + 1.5 * 5.03)).abs() < 1e-12);
        // Gauss asymmetric at 8 bits: α = 2 · 3.92; lo = max(mean − α, min) = −6.84, hi = lo + 2α.
        let (lo, hi) = st.range(ClipMode::Gauss, 8, false).unwrap();
        assert!((lo + 6.84).abs() < 1e-12 && (hi - (-6.84 + 15.68)).abs() < 1e-12);
        assert!(ClipMode::parse("N_STD", None).is_err());
        assert!(ClipMode::parse("MEDIAN", None).unwrap_err().to_string().contains("unknown clip mode"));
        assert!("sym".parse::<LinearQuantMode>().is_ok() && "SYM".parse::<LinearQuantMode>().is_err());
    }

    #[test]
    fn range_stats_of_a_batch() {
        let x = Tensor::from_slice(&[-1.0f64, 3.0, 0.0, 2.0]).reshape([2, 2]);
        let s = RangeStats::of(&x).unwrap();
        assert_eq!((s.min, s.max, s.avg_min, s.avg_max, s.mean), (-1.0, 3.0, -0.5, 2.5, 1.0));
        assert!((s.b - 1.5).abs() < 1e-12);
        assert!((s.std - (10.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn straight_through_passes_the_gradient() {
        let x = Tensor::from_slice(&[0.26f64, -0.74]).set_requires_grad(true);
        let y = fake_quantize_ste(&x, &Tensor::from(10.0f64), &Tensor::from(0.0f64)).unwrap();
        assert_eq!(v(&y), [0.3, -0.7]);
        y.sum(Kind::Double).backward();
        assert_eq!(v(&x.grad()), [1.0, 1.0]);
    }
}
