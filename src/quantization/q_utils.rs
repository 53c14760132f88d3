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
    /// The range with the smallest quantization mean squared error on the calibration data, searched over
    /// MQBench's grid of shrunk ranges ([`QParams::from_histogram_mse`]); not in Distiller.
    Mse,
}

/// The clip modes' names in YAML: Distiller's five and distill's `MSE`.
pub const CLIP_MODE_NAMES: &[&str] = &["NONE", "AVG", "N_STD", "GAUSS", "LAPLACE", "MSE"];

impl ClipMode {
    /// Parses Distiller's names (`NONE`, `AVG`, `N_STD`, `GAUSS`, `LAPLACE`, or lower case) and distill's `MSE`;
    /// `N_STD` needs `n_stds`.
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
            "MSE" => ClipMode::Mse,
            _ => return Err(Error::unknown("clip mode", s, CLIP_MODE_NAMES.iter().copied())),
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
    let (levels, span, zp) = symmetric_span(bits, sat, restrict)?;
    Ok((span.f_full_like(levels)?.f_div(&span)?, zp))
}

/// `(n, span, zero_point)` with `scale = n / span`: quantizing as `x·n / span` divides once, so a value exactly
/// half-way between two levels stays a tie (rounded to even) instead of drifting with the rounding of `scale`.
fn symmetric_span(bits: u32, sat: &Tensor, restrict: bool) -> Result<(f64, Tensor, Tensor)> {
    check_bits("bits", bits)?;
    let sat = f64_tensor(sat)?;
    if sat.f_lt(0.0)?.f_any()?.f_int64_value(&[])? != 0 {
        return Err(Error::invalid("saturation", "must be >= 0 for symmetric quantization"));
    }
    let (n, span) = symmetric_span_unchecked(bits, &sat, restrict)?;
    let zp = span.f_zeros_like()?;
    Ok((n, span, zp))
}

/// `n` and the span of a saturation `sat` (a zero saturation spans `n`, i.e. scale 1), without validation.
fn symmetric_span_unchecked(bits: u32, sat: &Tensor, restrict: bool) -> Result<(f64, Tensor)> {
    let n = if restrict { 2f64.powi(bits as i32 - 1) - 1.0 } else { (2f64.powi(bits as i32) - 1.0) / 2.0 };
    Ok((n, sat.f_masked_fill(&sat.f_eq(0.0)?, n)?))
}

/// Asymmetric parameters for the range `[min, max]` (widened to include 0): `scale = (2^b − 1)/(max − min)`
/// (a zero-width range gives scale 1), `zero_point = round(scale·min)`, plus `2^(b−1)` when signed.
pub fn asymmetric_params(bits: u32, min: &Tensor, max: &Tensor, integral_zero_point: bool, signed: bool) -> Result<(Tensor, Tensor)> {
    let (levels, span, zp) = asymmetric_span(bits, min, max, integral_zero_point, signed)?;
    Ok((span.f_full_like(levels)?.f_div(&span)?, zp))
}

/// `(n, span, zero_point)` with `scale = n / span` (see [`symmetric_span`]).
fn asymmetric_span(bits: u32, min: &Tensor, max: &Tensor, integral_zero_point: bool, signed: bool) -> Result<(f64, Tensor, Tensor)> {
    check_bits("bits", bits)?;
    let (min, max) = (f64_tensor(min)?, f64_tensor(max)?);
    if min.f_gt_tensor(&max)?.f_any()?.f_int64_value(&[])? != 0 {
        return Err(Error::invalid("range", "min must not exceed max"));
    }
    asymmetric_span_unchecked(bits, &min, &max, integral_zero_point, signed)
}

/// [`asymmetric_span`] without validation.
fn asymmetric_span_unchecked(bits: u32, min: &Tensor, max: &Tensor, integral_zero_point: bool, signed: bool) -> Result<(f64, Tensor, Tensor)> {
    let n = 2f64.powi(bits as i32) - 1.0;
    let min = min.f_clamp_max(0.0)?;
    let max = max.f_clamp_min(0.0)?;
    let diff = max.f_sub(&min)?;
    let span = diff.f_masked_fill(&diff.f_eq(0.0)?, n)?;
    let mut zp = min.f_mul_scalar(n)?.f_div(&span)?;
    if integral_zero_point {
        zp = zp.f_round()?;
    }
    if signed {
        zp = zp.f_add_scalar(2f64.powi(bits as i32 - 1))?;
    }
    Ok((n, span, zp))
}

/// Distiller's QAT scale for a saturation `sat` ≥ 0 (any shape, on the device, no validation and no host
/// synchronization): `n / sat` as PyTorch evaluates it for a tensor, `sat.reciprocal() · n`, which can differ
/// from a true division in the last bit; a zero saturation gives scale 1.
pub fn symmetric_scale_fast(bits: u32, restrict: bool, sat: &Tensor) -> Result<Tensor> {
    let (n, mut span) = symmetric_span_unchecked(bits, sat, restrict)?;
    let _ = span.f_reciprocal_()?;
    let _ = span.f_mul_scalar_(n)?;
    Ok(span)
}

/// Distiller's QAT scale and zero point for the range `[min, max]` widened to include 0 (tensors of one shape,
/// no validation and no host synchronization): `scale = n / (max − min)` evaluated as in
/// [`symmetric_scale_fast`], `zero_point = round(scale · min)`, plus `2^(b−1)` when signed.
pub fn asymmetric_scale_fast(bits: u32, signed: bool, min: &Tensor, max: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = 2f64.powi(bits as i32) - 1.0;
    let min = min.f_clamp_max(0.0)?;
    let diff = max.f_clamp_min(0.0)?.f_sub(&min)?;
    let mut scale = diff.f_masked_fill(&diff.f_eq(0.0)?, n)?;
    let _ = scale.f_reciprocal_()?;
    let _ = scale.f_mul_scalar_(n)?;
    let mut zp = scale.f_mul(&min)?;
    let _ = zp.f_round_()?;
    if signed {
        let _ = zp.f_add_scalar_(2f64.powi(bits as i32 - 1))?;
    }
    Ok((scale, zp))
}

/// Distiller's QAT scale and zero point for the range `[min, max]` (tensors of one shape): symmetric over
/// `max(|min|, |max|)` ([`symmetric_scale_fast`]; the zero point is `None`, it is 0), else
/// [`asymmetric_scale_fast`].
pub fn range_scale_fast(bits: u32, mode: LinearQuantMode, min: &Tensor, max: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    if mode.symmetric() {
        Ok((symmetric_scale_fast(bits, mode.restricted(), &min.f_abs()?.f_maximum(&max.f_abs()?)?)?, None))
    } else {
        let (scale, zp) = asymmetric_scale_fast(bits, mode == LinearQuantMode::AsymmetricSigned, min, max)?;
        Ok((scale, Some(zp)))
    }
}

/// [`range_scale_fast`] of one range, computed on the host in single precision with the same operations in the
/// same order, so bit-identical (the CPU path of QAT, where each libtorch operation costs microseconds).
pub(crate) fn range_scale_f32(bits: u32, mode: LinearQuantMode, min: f32, max: f32) -> (f32, Option<f32>) {
    let span_scale = |span: f32, n: f32| (1.0 / if span == 0.0 { n } else { span }) * n;
    if mode.symmetric() {
        let n = if mode.restricted() { 2f32.powi(bits as i32 - 1) - 1.0 } else { (2f32.powi(bits as i32) - 1.0) / 2.0 };
        // libtorch's maximum propagates NaN; f32::max drops it.
        let sat = if min.is_nan() || max.is_nan() { f32::NAN } else { min.abs().max(max.abs()) };
        (span_scale(sat, n), None)
    } else {
        let n = 2f32.powi(bits as i32) - 1.0;
        // libtorch's clamps keep a NaN and the sign of a zero: comparisons, not f32::min and f32::max.
        let (min, max) = (if min > 0.0 { 0.0 } else { min }, if max < 0.0 { 0.0 } else { max });
        let scale = span_scale(max - min, n);
        let mut zp = (scale * min).round_ties_even();
        if mode == LinearQuantMode::AsymmetricSigned {
            zp += 2f32.powi(bits as i32 - 1);
        }
        (scale, Some(zp))
    }
}

/// Distiller's QAT scale and zero point of a weight tensor's own range ([`range_scale_fast`]), per tensor (0-d)
/// or per output channel (`[C]`, along dimension 0). One pass over the weights (`aminmax`; libtorch's infinity
/// norm is an order of magnitude slower on the CPU), no host synchronization.
pub fn weight_scale_fast(w: &Tensor, bits: u32, mode: LinearQuantMode, per_channel: bool) -> Result<(Tensor, Option<Tensor>)> {
    let (min, max) = weight_range(w, per_channel)?;
    range_scale_fast(bits, mode, &min, &max)
}

/// A weight tensor's `(min, max)`: 0-d, or `[C]` per output channel (dimension 0) when `per_channel` and `w` has
/// two or more dimensions; one `aminmax` pass.
pub(crate) fn weight_range(w: &Tensor, per_channel: bool) -> Result<(Tensor, Tensor)> {
    let _guard = tch::no_grad_guard();
    Ok(if per_channel && w.dim() >= 2 { w.f_reshape([w.size()[0], -1])?.f_aminmax(1, false)? } else { w.f_aminmax(None, false)? })
}

/// Fake quantization of `x` over the range `[min, max]` (0-d tensors, or `[C]` along `axis` for per-channel
/// weights): [`fake_quantize`] with the scale and zero point of [`range_scale_fast`].
pub fn fake_quantize_range(x: &Tensor, bits: u32, mode: LinearQuantMode, min: &Tensor, max: &Tensor, axis: Option<usize>, clip: bool) -> Result<Tensor> {
    let (scale, zp) = range_scale_fast(bits, mode, min, max)?;
    fake_quantize(x, bits, mode, &scale, zp.as_ref(), axis, clip)
}

/// Fake quantization of `x` with a known scale and zero point (0-d, or `[C]` along `axis`; the zero point is
/// `None` for 0), on `x`'s device and with no host synchronization: Distiller's `(round(scale·x − zp) + zp) /
/// scale` with a straight-through gradient.
///
/// With `clip` (activations, Distiller's `FakeLinearQuantization`) values beyond the range saturate at the
/// integer range's ends and get no gradient. The saturation and the gradient mask are taken on the integers, as
/// PyTorch's fused fake quantization does: an input less than half a level beyond the range still gets its
/// gradient, where Distiller's `clamp` of the input stops it at the range's ends. Without `clip` (weights, whose
/// range is their own) nothing saturates and the gradient is the identity. The value is exactly the dequantized
/// one, as Distiller's STE returns it. A contiguous `f32` CPU tensor is quantized in single passes over its
/// memory (`fused.rs`; on the CPU, each libtorch pass and operation costs more than the arithmetic, and
/// `clamp`'s backward pass and libtorch's own fused kernel are several times slower); other tensors by libtorch
/// operations, with bit-identical results.
pub fn fake_quantize(x: &Tensor, bits: u32, mode: LinearQuantMode, scale: &Tensor, zp: Option<&Tensor>, axis: Option<usize>, clip: bool) -> Result<Tensor> {
    let kind = x.kind();
    let shaped = |t: &Tensor| -> Result<Tensor> {
        let t = match axis {
            Some(a) => along(t, a, x.dim())?,
            None => t.shallow_clone(),
        };
        if t.kind() == kind { Ok(t) } else { Ok(t.f_to_kind(kind)?) }
    };
    let levels = clip.then(|| {
        let (qmin, qmax) = quantized_range(bits, mode.signed(), mode.restricted());
        // The full symmetric range's ends map to ±(2^b − 1)/2, which round (to even) to ±2^(b−1).
        if mode == LinearQuantMode::Symmetric { (qmin, -qmin) } else { (qmin, qmax) }
    });
    if let Some(grid) = super::fused::Grid::new(x, scale, zp, axis, levels)? {
        return grid.fake_quantize(x);
    }
    let scale = shaped(scale)?;
    let zp = zp.map(shaped).transpose()?;
    tch::no_grad(|| -> Result<(Tensor, Option<Tensor>)> {
        // Inside no_grad, x serves as its own detached copy; q becomes the dequantized value.
        let mut q = x.f_mul(&scale)?;
        if let Some(zp) = &zp {
            let _ = q.f_sub_(zp)?;
        }
        let _ = q.f_round_()?;
        let mask = match levels {
            Some((qmin, qmax)) => {
                let clamped = q.f_clamp(qmin, qmax)?;
                let mask = q.f_eq_tensor(&clamped)?.f_to_kind(kind)?;
                q = clamped;
                Some(mask)
            }
            None => None,
        };
        if let Some(zp) = &zp {
            let _ = q.f_add_(zp)?;
        }
        let _ = q.f_div_(&scale)?;
        Ok((q, mask))
    })
    .and_then(|(dq, mask)| {
        // One autograd operation gives the gradient (the mask, or the identity); its output, which nothing
        // in the graph saved, then takes the dequantized values.
        let y = match &mask {
            Some(mask) => x.f_mul(mask)?,
            None => x.f_add_scalar(0.0)?,
        };
        tch::no_grad(|| y.f_detach()?.f_copy_(&dq))?;
        Ok(y)
    })
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

/// Candidate ranges of the MSE clip search ([`QParams::from_weight_mse`]).
pub const MSE_CLIP_GRID: usize = 100;

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

    /// The first of the seven values that is NaN or infinite, with its name.
    pub fn non_finite(&self) -> Option<(&'static str, f64)> {
        [("min", self.min), ("max", self.max), ("avg_min", self.avg_min), ("avg_max", self.avg_max), ("mean", self.mean), ("std", self.std), ("b", self.b)]
            .into_iter()
            .find(|(_, v)| !v.is_finite())
    }

    /// The clipped range `(lo, hi)` for `clip` at `bits` (Distiller's saturation functions). MSE clipping
    /// needs the values' histogram, not these seven numbers: [`QParams::from_histogram_mse`].
    pub fn range(&self, clip: ClipMode, bits: u32, half_range: bool) -> Result<(f64, f64)> {
        Ok(match clip {
            ClipMode::Mse => return Err(Error::invalid("clip mode", "MSE clipping searches the values' histogram; min, max, mean, std and b do not define it")),
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

/// Bins of a [`Histogram`] as the calibration collects it: at 8 bits a quantization step spans eight bins.
pub const HISTOGRAM_BINS: usize = 2048;

/// The distribution of an activation's values, for the MSE range search: `counts[i]` values in the `i`-th of
/// equal bins over `[lo, hi]`, and the values that are exactly zero counted apart (`zeros`): a ReLU's output is
/// often half zeros, every range the quantizer builds represents zero exactly, and a bin's centre would not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Lower edge of the first bin.
    pub lo: f64,
    /// Upper edge of the last bin.
    pub hi: f64,
    /// Values equal to zero.
    pub zeros: u64,
    /// Non-zero values per bin (written as one line of space-separated integers).
    #[serde(with = "counts_as_text")]
    pub counts: Vec<u64>,
}

impl Histogram {
    /// No values yet, `bins` bins over `[lo, hi]`.
    pub fn empty(lo: f64, hi: f64, bins: usize) -> Result<Self> {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) || bins == 0 {
            return Err(Error::invalid("histogram", format!("needs finite lo <= hi and at least one bin, got [{lo}, {hi}] with {bins} bins")));
        }
        Ok(Histogram { lo, hi, zeros: 0, counts: vec![0; bins] })
    }

    /// The histogram of `x` over its own range in [`HISTOGRAM_BINS`] bins.
    pub fn of(x: &Tensor) -> Result<Self> {
        let x = x.f_detach()?.f_to_kind(Kind::Double)?;
        let (lo, hi) = if x.numel() == 0 { (0.0, 0.0) } else { (x.f_min()?.f_double_value(&[])?, x.f_max()?.f_double_value(&[])?) };
        let mut h = Self::empty(lo, hi, HISTOGRAM_BINS).map_err(|_| Error::invalid("histogram", format!("a tensor of shape {:?} holds NaN or infinite values", x.size())))?;
        h.add(&x)?;
        Ok(h)
    }

    /// Counts the values of `x`; values outside `[lo, hi]` are an error (the bins were sized by a first pass).
    pub fn add(&mut self, x: &Tensor) -> Result<()> {
        match host_values(x)? {
            HostValues::F32(v) => self.add_values(&v),
            HostValues::F64(v) => self.add_values(&v),
        }
    }

    /// [`Histogram::add`] for values already on the host. One pass in Rust: libtorch's `histogram` took 14 ms
    /// for a ResNet-20 activation (half a million values), this loop about one.
    pub fn add_values<T: Copy + Into<f64>>(&mut self, values: &[T]) -> Result<()> {
        let (lo, hi, bins) = (self.lo, self.hi, self.counts.len());
        let per_unit = if hi > lo { bins as f64 / (hi - lo) } else { 0.0 };
        let mut counts = vec![0u64; bins];
        let (mut zeros, mut outside) = (0u64, false);
        // Without branches: half of a ReLU's outputs are zero, in no predictable order.
        for &v in values {
            let v: f64 = v.into();
            let zero = (v == 0.0) as u64;
            zeros += zero;
            outside |= zero == 0 && !(lo <= v && v <= hi);
            // As torch.histogram, the upper edge belongs to the last bin; `as` saturates below 0 and maps NaN to 0.
            counts[(((v - lo) * per_unit) as usize).min(bins - 1)] += 1 - zero;
        }
        if outside {
            return Err(Error::invalid("histogram", format!("values outside its range [{lo}, {hi}] (the data changed between the calibration passes?)")));
        }
        if zeros > 0 && !(lo <= 0.0 && 0.0 <= hi) {
            return Err(Error::invalid("histogram", format!("zeros outside its range [{lo}, {hi}] (the data changed between the calibration passes?)")));
        }
        for (c, add) in self.counts.iter_mut().zip(counts) {
            *c += add;
        }
        self.zeros += zeros;
        Ok(())
    }

    /// Every value the histogram stands for, as `(values, weights)`: each bin's centre clamped to `[lo, hi]` (a
    /// range clipped after collection, such as a fused ReLU's), and zero.
    fn points(&self, lo: f64, hi: f64) -> Result<(Tensor, Tensor)> {
        let bins = self.counts.len();
        let width = (self.hi - self.lo) / bins as f64;
        let mut values: Vec<f64> = (0..bins).map(|i| (self.lo + (i as f64 + 0.5) * width).clamp(lo, hi)).collect();
        let mut weights: Vec<f64> = self.counts.iter().map(|&c| c as f64).collect();
        values.push(0.0);
        weights.push(self.zeros as f64);
        Ok((Tensor::f_from_slice(&values)?, Tensor::f_from_slice(&weights)?))
    }
}

/// A tensor's values copied to the host, in its own precision (float64 stays float64, anything else becomes
/// float32).
pub(crate) enum HostValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

pub(crate) fn host_values(x: &Tensor) -> Result<HostValues> {
    let x = x.f_detach()?.f_flatten(0, -1)?;
    Ok(if x.kind() == Kind::Double { HostValues::F64(Vec::try_from(&x)?) } else { HostValues::F32(Vec::try_from(&x.f_to_kind(Kind::Float)?)?) })
}

/// `counts` as one line of text: a list of 2,048 numbers would take 2,048 lines of YAML.
mod counts_as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(counts: &[u64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&counts.iter().map(u64::to_string).collect::<Vec<_>>().join(" "))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        let text = String::deserialize(d)?;
        let counts = text.split_whitespace().map(|c| c.parse::<u64>().map_err(|_| serde::de::Error::custom(format!("histogram count '{c}' is not a non-negative integer")))).collect::<Result<Vec<_>, _>>()?;
        if counts.is_empty() {
            return Err(serde::de::Error::custom("a histogram needs at least one bin"));
        }
        Ok(counts)
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
    /// `scale = levels / span`: the two are kept apart so that [`QParams::quantize`] divides once. `None` when
    /// the scale is used as it is (an approximated scale).
    span: Option<(f64, Tensor)>,
}

impl Clone for QParams {
    fn clone(&self) -> Self {
        QParams {
            scale: self.scale.shallow_clone(),
            zero_point: self.zero_point.shallow_clone(),
            range: self.range,
            span: self.span.as_ref().map(|(n, s)| (*n, s.shallow_clone())),
        }
    }
}

/// `scale` approximated as `mult / 2^shift` with a `mult_bits`-bit integer multiplier (Distiller's
/// `approx_scale_as_mult_and_shift`): `shift = ⌊log2((2^m − 1)/scale)⌋`, `mult = ⌊scale·2^shift⌋`.
pub fn approx_scale_as_mult_and_shift(scale: &Tensor, mult_bits: u32) -> Result<Tensor> {
    if !(1..=32).contains(&mult_bits) {
        return Err(Error::invalid("scale_approx_mult_bits", format!("{mult_bits}: must be 1..=32")));
    }
    let scale = scale.f_to_kind(Kind::Double)?;
    let limit = 2f64.powi(mult_bits as i32) - 1.0;
    let shift = scale.f_reciprocal()?.f_mul_scalar(limit)?.f_log2()?.f_floor()?;
    let pow = shift.f_exp2()?;
    Ok(scale.f_mul(&pow)?.f_floor()?.f_div(&pow)?)
}

impl QParams {
    /// The same parameters with the scale approximated by a `mult_bits`-bit multiplier and a shift
    /// ([`approx_scale_as_mult_and_shift`]); the zero point is kept.
    pub fn approximated(&self, mult_bits: u32) -> Result<Self> {
        let scale = approx_scale_as_mult_and_shift(&self.scale, mult_bits)?;
        // x·scale is exact in float64 for a float32 x and a multiplier of at most 29 bits.
        Ok(QParams { scale, zero_point: self.zero_point.shallow_clone(), range: self.range, span: None })
    }

    /// Parameters as they are: `scale` and `zero_point` (0-d, or `[C]` per channel) and the integer range.
    pub fn from_scale(scale: Tensor, zero_point: Tensor, range: (f64, f64)) -> Self {
        QParams { scale, zero_point, range, span: None }
    }

    fn from_span(levels: f64, span: Tensor, zero_point: Tensor, range: (f64, f64)) -> Result<Self> {
        let scale = span.f_full_like(levels)?.f_div(&span)?;
        Ok(QParams { scale, zero_point, range, span: Some((levels, span)) })
    }

    /// Parameters of `mode` at `bits` for statistics `stats` clipped by `clip`.
    pub fn from_stats(stats: &RangeStats, bits: u32, mode: LinearQuantMode, clip: ClipMode, half_range: bool) -> Result<Self> {
        let range = quantized_range(bits, mode.signed(), mode.restricted());
        if stats.non_finite().is_some() {
            return Err(Error::invalid("statistics", format!("ranges must be finite numbers, got {stats:?}")));
        }
        let (levels, span, zero_point) = if mode.symmetric() {
            symmetric_span(bits, &Tensor::from(stats.symmetric_sat(clip, bits, half_range)?), mode.restricted())?
        } else {
            let (lo, hi) = stats.range(clip, bits, half_range)?;
            asymmetric_span(bits, &Tensor::from(lo), &Tensor::from(hi), true, mode == LinearQuantMode::AsymmetricSigned)?
        };
        QParams::from_span(levels, span, zero_point, range)
    }

    /// Parameters from a weight tensor's own range, per output channel (dimension 0) or per tensor; no clipping.
    pub fn from_weight(w: &Tensor, bits: u32, mode: LinearQuantMode, per_channel: bool) -> Result<Self> {
        let (min, max) = Self::weight_extremes(w, per_channel)?;
        Self::from_range(&min, &max, bits, mode)
    }

    /// A weight's `(min, max)` in float64, per output channel (`[C]`) or per tensor (0-d); an error for NaN or
    /// infinite values.
    fn weight_extremes(w: &Tensor, per_channel: bool) -> Result<(Tensor, Tensor)> {
        let w = w.f_detach()?.f_to_kind(Kind::Double)?;
        let (min, max) = if per_channel && w.dim() >= 2 {
            let rows = w.f_reshape([w.size()[0], -1])?;
            (rows.f_amin(1, false)?, rows.f_amax(1, false)?)
        } else {
            (w.f_min()?, w.f_max()?)
        };
        if min.f_isfinite()?.f_logical_and(&max.f_isfinite()?)?.f_all()?.f_int64_value(&[])? == 0 {
            return Err(Error::invalid("weights", format!("a tensor of shape {:?} holds NaN or infinite values; it cannot be quantized", w.size())));
        }
        Ok((min, max))
    }

    /// Parameters of `mode` at `bits` for the range `[min, max]` (0-d, or `[C]` per channel).
    fn from_range(min: &Tensor, max: &Tensor, bits: u32, mode: LinearQuantMode) -> Result<Self> {
        let range = quantized_range(bits, mode.signed(), mode.restricted());
        let (levels, span, zero_point) = if mode.symmetric() {
            symmetric_span(bits, &min.f_abs()?.f_maximum(&max.f_abs()?)?, mode.restricted())?
        } else {
            asymmetric_span(bits, min, max, true, mode == LinearQuantMode::AsymmetricSigned)?
        };
        QParams::from_span(levels, span, zero_point, range)
    }

    /// MSE-optimal clipping of a weight tensor (per output channel or per tensor): among the ranges
    /// `[k·min, k·max]` for `k = (100 − i)/100`, `i = 0..99` (MQBench's MSE observer grid), the one whose
    /// quantized weights have the smallest mean squared error against the weights; each channel chooses on its
    /// own, the largest `k` on ties. Returns the parameters and the chosen `k` (0-d or `[C]`).
    pub fn from_weight_mse(w: &Tensor, bits: u32, mode: LinearQuantMode, per_channel: bool) -> Result<(Self, Tensor)> {
        let (min, max) = Self::weight_extremes(w, per_channel)?;
        let w = w.f_detach()?.f_to_kind(Kind::Double)?;
        Self::mse_search(&w, None, &min, &max, bits, mode)
    }

    /// MSE-optimal clipping of an activation from its calibration histogram, per tensor: the search of
    /// [`QParams::from_weight_mse`] over `[k·lo, k·hi]`, with the mean squared error taken over the histogram's
    /// values (each bin's centre, clamped to `[lo, hi]`, weighted by its count; zeros exactly). `(lo, hi)` is the
    /// range the statistics give, which a fused activation may have clipped. Returns the parameters and `k`.
    pub fn from_histogram_mse(h: &Histogram, (lo, hi): (f64, f64), bits: u32, mode: LinearQuantMode) -> Result<(Self, f64)> {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(Error::invalid("statistics", format!("MSE clipping needs a finite range, got [{lo}, {hi}]")));
        }
        let (values, weights) = h.points(lo, hi)?;
        let (p, k) = Self::mse_search(&values, Some(&weights), &Tensor::from(lo), &Tensor::from(hi), bits, mode)?;
        Ok((p, k.f_double_value(&[])?))
    }

    /// The grid search behind both MSE clippings: `values` one row per channel when `min` is `[C]`, with
    /// optional `weights` (shaped like `values`) for a weighted mean.
    fn mse_search(values: &Tensor, weights: Option<&Tensor>, min: &Tensor, max: &Tensor, bits: u32, mode: LinearQuantMode) -> Result<(Self, Tensor)> {
        let channel_mse = |p: &QParams| -> Result<Tensor> {
            let err = p.dequantize(&p.quantize(values, 0)?, 0)?.f_sub(values)?.f_square()?;
            Ok(match weights {
                Some(w) => err.f_mul(w)?.f_sum(Kind::Double)?.f_div(&w.f_sum(Kind::Double)?.f_clamp_min(1.0)?)?,
                None if min.dim() == 1 => err.f_reshape([min.size()[0], -1])?.f_mean_dim(1, false, Kind::Double)?,
                None => err.f_mean(Kind::Double)?,
            })
        };
        let mut best_k = min.f_ones_like()?;
        let mut best = channel_mse(&Self::from_range(min, max, bits, mode)?)?;
        for i in 1..MSE_CLIP_GRID {
            let k = (MSE_CLIP_GRID - i) as f64 / MSE_CLIP_GRID as f64;
            let mse = channel_mse(&Self::from_range(&min.f_mul_scalar(k)?, &max.f_mul_scalar(k)?, bits, mode)?)?;
            let better = mse.f_lt_tensor(&best)?;
            best = mse.f_where_self(&better, &best)?;
            best_k = best_k.f_masked_fill(&better, k)?;
        }
        Ok((Self::from_range(&min.f_mul(&best_k)?, &max.f_mul(&best_k)?, bits, mode)?, best_k))
    }

    /// `clamp(round(x·scale − zero_point))` in float64, per channel along dimension `dim` of `x` when the
    /// parameters are per channel. Computed as `x·n / span` (one rounding, and none for `x·n` when `x` is float32
    /// and `n` has at most 29 bits), so a value exactly half-way between two levels rounds to even as in exact
    /// arithmetic: a symmetric range's most negative value lands on −2^(b−1), never one level above.
    pub fn quantize(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        Ok(self.scaled(x, dim)?.f_round()?.f_clamp(self.range.0, self.range.1)?)
    }

    /// `x·scale − zero_point` in float64 before rounding and clamping (what [`QParams::quantize`] rounds; AdaRound
    /// decides the rounding itself).
    pub fn scaled(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let rank = x.dim();
        let x = x.f_to_kind(Kind::Double)?;
        let scaled = match &self.span {
            Some((levels, span)) => x.f_mul_scalar(*levels)?.f_div(&along(span, dim, rank)?)?,
            None => x.f_mul(&along(&self.scale, dim, rank)?.f_to_kind(Kind::Double)?)?,
        };
        let zp = along(&self.zero_point, dim, rank)?;
        Ok(scaled.f_sub(&zp)?)
    }

    /// `(q + zero_point) / scale` in float64, per channel along dimension `dim` of `q`.
    pub fn dequantize(&self, q: &Tensor, dim: usize) -> Result<Tensor> {
        let (s, z) = self.along(dim, q.dim(), Kind::Double)?;
        linear_dequantize(&q.f_to_kind(Kind::Double)?, &s, &z)
    }

    /// The quantization step `1 / scale` in float64 (PyTorch's and ONNX's scale), from the span where known so
    /// that it is not the reciprocal of a rounded reciprocal.
    pub fn step(&self) -> Result<Tensor> {
        Ok(match &self.span {
            Some((levels, span)) => span.f_to_kind(Kind::Double)?.f_div_scalar(*levels)?,
            None => self.scale.f_to_kind(Kind::Double)?.f_reciprocal()?,
        })
    }

    /// The parameters shaped to broadcast along dimension `dim` of a rank-`rank` tensor, as `kind`.
    pub fn along(&self, dim: usize, rank: usize, kind: Kind) -> Result<(Tensor, Tensor)> {
        Ok((along(&self.scale, dim, rank)?.f_to_kind(kind)?, along(&self.zero_point, dim, rank)?.f_to_kind(kind)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MSE clip search against a brute force written out by hand: every `k` of the grid, Distiller's formulas
    /// per row, the first minimum.
    #[test]
    fn mse_weight_clipping_equals_a_brute_force_search() {
        // Three rows of 64: small values and one outlier of 3.0, an even spread, small values and one of 0.9.
        let rows: Vec<Vec<f64>> = (0..3)
            .map(|r| {
                (0..64)
                    .map(|i| match (r, i) {
                        (0, 63) => 3.0,
                        (2, 0) => 0.9,
                        (1, _) => (i as f64 - 31.5) / 60.0,
                        _ => ((i * 37 % 41) as f64 - 20.0) / 100.0,
                    })
                    .collect()
            })
            .collect();
        let w = Tensor::from_slice(&rows.concat()).view([3, 64]).to_kind(Kind::Float);
        let f = |v: f64| v as f32 as f64;
        for (mode, per_channel) in [(LinearQuantMode::AsymmetricUnsigned, true), (LinearQuantMode::Symmetric, true), (LinearQuantMode::Symmetric, false)] {
            let (p, k) = QParams::from_weight_mse(&w, 4, mode, per_channel).unwrap();
            let groups: Vec<Vec<f64>> = if per_channel { rows.iter().map(|r| r.iter().map(|&v| f(v)).collect()).collect() } else { vec![rows.concat().iter().map(|&v| f(v)).collect()] };
            for (c, g) in groups.iter().enumerate() {
                let (lo, hi) = g.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                let (mut best, mut best_k, mut best_scale) = (f64::INFINITY, 0.0, 0.0);
                for i in 0..MSE_CLIP_GRID {
                    let kk = (MSE_CLIP_GRID - i) as f64 / MSE_CLIP_GRID as f64;
                    let (scale, zp, qlo, qhi) = if mode == LinearQuantMode::Symmetric {
                        let sat = (kk * lo).abs().max((kk * hi).abs());
                        (7.5 / sat, 0.0, -8.0, 7.0)
                    } else {
                        let (l, h) = ((kk * lo).min(0.0), (kk * hi).max(0.0));
                        let scale = 15.0 / (h - l);
                        (scale, (scale * l).round_ties_even(), 0.0, 15.0)
                    };
                    let mse = g.iter().map(|&v| {
                        let q = (v * scale - zp).round_ties_even().clamp(qlo, qhi);
                        (v - (q + zp) / scale).powi(2)
                    }).sum::<f64>() / g.len() as f64;
                    if mse < best - 1e-15 {
                        (best, best_k, best_scale) = (mse, kk, scale);
                    }
                }
                let got_k = if per_channel { k.double_value(&[c as i64]) } else { k.double_value(&[]) };
                let got_scale = if per_channel { p.scale.double_value(&[c as i64]) } else { p.scale.double_value(&[]) };
                assert_eq!(got_k, best_k, "{mode:?} per_channel {per_channel} group {c}");
                assert!((got_scale - best_scale).abs() <= 1e-9 * best_scale, "{got_scale} vs {best_scale}");
            }
            // At 4 asymmetric bits the outlier's row is clipped (symmetric, the small values round to 0 either way).
            if mode == LinearQuantMode::AsymmetricUnsigned {
                assert!(k.double_value(&[0]) < 1.0, "{k}");
            }
        }
    }

    /// A long-tailed activation (a ReLU's output: zeros, a Laplace-like body, a few outliers): the histogram's MSE
    /// search picks the grid point a brute force over the same weighted points picks, and that range quantizes
    /// the raw values within 3% of the best range a brute force over the raw values finds, with a fifth less
    /// error than the full range at 4 bits (a half less, symmetric).
    #[test]
    fn mse_activation_clipping_equals_a_brute_force_search() {
        let raw: Vec<f64> = (0..4000)
            .map(|i| match i % 10 {
                0..=3 => 0.0,
                _ if i % 997 == 0 => 9.0 + (i as f64) / 4000.0,
                _ => -((1.0 - ((i * 7919 % 4001) as f64 + 0.5) / 4001.0).ln()) * 0.5,
            })
            .collect();
        let x = Tensor::from_slice(&raw);
        let h = Histogram::of(&x).unwrap();
        assert_eq!(h.zeros, 1600);
        assert_eq!(h.counts.iter().sum::<u64>() + h.zeros, 4000);
        let (lo, hi) = (h.lo, h.hi);
        assert_eq!(lo, 0.0);
        let mse_of = |values: &[f64], weights: &[f64], k: f64, mode: LinearQuantMode| -> f64 {
            let (l, r) = ((k * lo).min(0.0), (k * hi).max(0.0));
            let (scale, zp, qlo, qhi) = if mode == LinearQuantMode::Symmetric {
                (7.5 / l.abs().max(r.abs()), 0.0, -8.0, 7.0)
            } else {
                let scale = 15.0 / (r - l);
                (scale, (scale * l).round_ties_even(), 0.0, 15.0)
            };
            let total: f64 = weights.iter().sum();
            values.iter().zip(weights).map(|(&v, &w)| w * (v - ((v * scale - zp).round_ties_even().clamp(qlo, qhi) + zp) / scale).powi(2)).sum::<f64>() / total
        };
        let width = (hi - lo) / HISTOGRAM_BINS as f64;
        let mut centres: Vec<f64> = (0..HISTOGRAM_BINS).map(|i| lo + (i as f64 + 0.5) * width).collect();
        let mut weights: Vec<f64> = h.counts.iter().map(|&c| c as f64).collect();
        centres.push(0.0);
        weights.push(h.zeros as f64);
        let ones = vec![1.0; raw.len()];
        let grid = || (0..MSE_CLIP_GRID).map(|i| (MSE_CLIP_GRID - i) as f64 / MSE_CLIP_GRID as f64);
        for mode in [LinearQuantMode::AsymmetricUnsigned, LinearQuantMode::Symmetric] {
            let (p, k) = QParams::from_histogram_mse(&h, (lo, hi), 4, mode).unwrap();
            let best_k = grid().fold((f64::INFINITY, 0.0), |(best, bk), k| {
                let m = mse_of(&centres, &weights, k, mode);
                if m < best - 1e-15 { (m, k) } else { (best, bk) }
            }).1;
            assert_eq!(k, best_k, "{mode:?}");
            assert!(k * hi < 9.0, "{mode:?}: the outliers should be clipped, k = {k}");
            let raw_best = grid().map(|k| mse_of(&raw, &ones, k, mode)).fold(f64::INFINITY, f64::min);
            let chosen = mse_of(&raw, &ones, k, mode);
            assert!(chosen <= 1.03 * raw_best, "{mode:?}: {chosen} vs {raw_best}");
            assert!(chosen < 0.8 * mse_of(&raw, &ones, 1.0, mode), "{mode:?}");
            let step = p.step().unwrap().double_value(&[]);
            let expected = if mode == LinearQuantMode::Symmetric { k * hi / 7.5 } else { k * hi / 15.0 };
            assert!((step - expected).abs() <= 1e-12 * expected, "{step} vs {expected}");
        }
        // A range clipped after collection (a fused ReLU6) clamps the values the search sees.
        let (_, k6) = QParams::from_histogram_mse(&h, (0.0, 6.0), 4, LinearQuantMode::AsymmetricUnsigned).unwrap();
        assert!(k6 * 6.0 < hi);
    }

    #[test]
    fn histograms_count_every_value_once_and_refuse_what_they_cannot_hold() {
        let mut h = Histogram::empty(-1.0, 1.0, 4).unwrap();
        h.add(&Tensor::from_slice(&[-1.0f32, -0.5, 0.0, 0.0, 0.25, 1.0, 0.999])).unwrap();
        assert_eq!((h.zeros, h.counts.clone()), (2, vec![1, 1, 1, 2]));
        assert!(h.add(&Tensor::from_slice(&[1.5f32])).unwrap_err().to_string().contains("outside its range"));
        assert!(h.add(&Tensor::from_slice(&[f32::NAN])).is_err());
        assert!(Histogram::empty(1.0, 2.0, 4).unwrap().add(&Tensor::from_slice(&[1.5f32, 0.0])).is_err());
        assert_eq!(h.counts.iter().sum::<u64>() + h.zeros, 7, "a refused batch counts nothing");
        let constant = Histogram::of(&Tensor::from_slice(&[2.0f32, 2.0])).unwrap();
        assert_eq!((constant.lo, constant.hi, constant.zeros, constant.counts[0], constant.counts[1..].iter().sum::<u64>()), (2.0, 2.0, 0, 2, 0));
        assert!(Histogram::of(&Tensor::from_slice(&[f32::INFINITY])).is_err());
        assert!(Histogram::empty(1.0, 0.0, 4).is_err());
        let text = serde_yaml::to_string(&h).unwrap();
        assert!(text.contains("counts: 1 1 1 2"), "{text}");
        assert_eq!(serde_yaml::from_str::<Histogram>(&text).unwrap(), h);
        assert!(serde_yaml::from_str::<Histogram>("lo: 0\nhi: 1\nzeros: 0\ncounts: 1 x 2\n").unwrap_err().to_string().contains("'x'"));
        assert!(ClipMode::parse("mse", None).unwrap() == ClipMode::Mse);
        let st = RangeStats { min: 0.0, max: 1.0, ..RangeStats::default() };
        assert!(QParams::from_stats(&st, 8, LinearQuantMode::Symmetric, ClipMode::Mse, false).unwrap_err().to_string().contains("histogram"));
    }

    fn v(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// Every 8-bit level and tie dequantized by the single-pass path against the libtorch path, over 60 scales.
    #[test]
    fn single_pass_dequantization_matches_libtorchs_division_at_every_level() {
        let bits32 = |t: &Tensor| -> Vec<u32> { Vec::<f32>::try_from(&t.contiguous().flatten(0, -1)).unwrap().iter().map(|v| v.to_bits()).collect() };
        for k in 0..60 {
            let s = 0.37f32 * 1.113f32.powi(k);
            let x: Vec<f32> = (-300..300).map(|i| i as f32 * 0.5 / s).collect();
            let base = Tensor::from_slice(&x).reshape([2, 300]);
            for (mode, zp) in [(LinearQuantMode::Symmetric, None), (LinearQuantMode::AsymmetricUnsigned, Some(Tensor::from(-77.0f32)))] {
                let run = |x: &Tensor| bits32(&fake_quantize(x, 8, mode, &Tensor::from(s), zp.as_ref(), None, true).unwrap());
                assert_eq!(run(&base.copy()), run(&base.t_copy().t_()), "scale {s} {mode:?}");
            }
        }
    }

    /// The host twin of the QAT scale against libtorch's tensor arithmetic, bit for bit, over ranges with
    /// signed zeros, ties, tiny, huge and non-finite ends.
    #[test]
    fn host_and_tensor_qat_scales_agree_bit_for_bit() {
        let ends = [0.0f32, -0.0, 1.0, -1.0, 0.3, -2.3841906, 0.16494401, 1e-30, -1e-38, 3e38, -3e38, 127.5, f32::INFINITY, f32::NAN];
        let modes = [LinearQuantMode::Symmetric, LinearQuantMode::SymmetricRestricted, LinearQuantMode::AsymmetricUnsigned, LinearQuantMode::AsymmetricSigned];
        let bits = |v: f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
        for mode in modes {
            for b in [2u32, 4, 8] {
                for &lo in &ends {
                    for &hi in &ends {
                        let (scale, zp) = range_scale_fast(b, mode, &Tensor::from(lo), &Tensor::from(hi)).unwrap();
                        let tensor = (bits(scale.double_value(&[]) as f32), zp.map(|z| bits(z.double_value(&[]) as f32)));
                        let (hs, hz) = range_scale_f32(b, mode, lo, hi);
                        assert_eq!((bits(hs), hz.map(bits)), tensor, "{mode:?} {b} bits [{lo}, {hi}]");
                    }
                }
            }
        }
    }

    /// The single-pass CPU path (contiguous input) against the libtorch path (the same values through a
    /// transposed, non-contiguous view): values and gradients bit for bit, ties and saturation included.
    #[test]
    fn single_pass_and_libtorch_fake_quantization_agree_bit_for_bit() {
        let bits32 = |t: &Tensor| -> Vec<u32> {
            Vec::<f32>::try_from(&t.contiguous().flatten(0, -1)).unwrap().iter().map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() }).collect()
        };
        // [3, 40]: level ties (k + 0.5)/4 with scale 4, values beyond the range, signed zeros, a NaN, and noise.
        let mut data: Vec<f32> = (-20..20).map(|k| (k as f32 + 0.5) / 4.0).collect();
        data.extend((0..40).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.37));
        data.extend((0..40).map(|i| (i as f32 * 0.61).sin() * 3.0));
        data[3] = f32::NAN;
        data[4] = -0.0;
        data[5] = -0.01;
        let base = Tensor::from_slice(&data).reshape([3, 40]);
        let scale = Tensor::from(4.0f32);
        let channel_scale = Tensor::from_slice(&[4.0f32, 2.5, 7.3]);
        let zp = Tensor::from(-3.0f32);
        let channel_zp = Tensor::from_slice(&[-3.0f32, 0.0, 5.0]);
        let cases: [(&Tensor, Option<&Tensor>, Option<usize>, LinearQuantMode); 4] = [
            (&scale, None, None, LinearQuantMode::Symmetric),
            (&scale, Some(&zp), None, LinearQuantMode::AsymmetricUnsigned),
            (&channel_scale, None, Some(0), LinearQuantMode::Symmetric),
            (&channel_scale, Some(&channel_zp), Some(0), LinearQuantMode::AsymmetricSigned),
        ];
        for (scale, zp, axis, mode) in cases {
            for clip in [false, true] {
                let run = |x: &Tensor| {
                    let x = x.set_requires_grad(true);
                    let y = fake_quantize(&x, 4, mode, scale, zp, axis, clip).unwrap();
                    y.sum(Kind::Float).backward();
                    (bits32(&y), bits32(&x.grad()))
                };
                let single_pass = run(&base.copy());
                let libtorch = run(&base.t_copy().t_());
                assert_eq!(single_pass, libtorch, "{mode:?} axis {axis:?} clip {clip}");
            }
        }
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
    fn ties_at_the_range_ends_round_as_exact_arithmetic() {
        // Symmetric 8 bits: the range's most negative value −sat maps to exactly −127.5, a tie that rounds to even
        // (−128). Look for a saturation where float32's rounded scale misses the tie.
        let sat = (1..10_000)
            .map(|k| 0.1f32 + k as f32 * 1e-3)
            .find(|&s| -s * (127.5f32 / s) > -127.5)
            .expect("a saturation where float32 rounding moves the product off the tie");
        assert_eq!((-sat * (127.5f32 / sat)).round(), -127.0, "the case the test is about");
        let st = RangeStats { min: -sat as f64, max: sat as f64 / 2.0, avg_min: 0.0, avg_max: 0.0, mean: 0.0, std: 0.0, b: 0.0 };
        let p = QParams::from_stats(&st, 8, LinearQuantMode::Symmetric, ClipMode::None, false).unwrap();
        let x = Tensor::from_slice(&[-sat, sat]);
        assert_eq!(v(&p.quantize(&x, 0).unwrap()), [-128.0, 127.0]);
        // The same through a weight tensor (per channel), and the asymmetric zero point: min·n/span = −127.5 → −128.
        let w = Tensor::from_slice(&[-sat, sat / 2.0, -sat, 0.25]).reshape([2, 2]);
        let p = QParams::from_weight(&w, 8, LinearQuantMode::Symmetric, true).unwrap();
        assert_eq!(v(&p.quantize(&w, 0).unwrap())[..2], [-128.0, 64.0]);
        let (_, z) = asymmetric_params(8, &Tensor::from(-(sat as f64)), &Tensor::from(sat as f64), true, false).unwrap();
        assert_eq!(z.double_value(&[]), -128.0);
        // Non-finite statistics and weights are refused.
        assert!(QParams::from_stats(&RangeStats { max: f64::NAN, ..st }, 8, LinearQuantMode::Symmetric, ClipMode::None, false).is_err());
        let nan = Tensor::from_slice(&[1.0f32, f32::NAN]);
        assert!(QParams::from_weight(&nan, 8, LinearQuantMode::Symmetric, false).unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn scale_approximation_is_a_multiplier_and_a_shift() {
        // 0.3 with 8 bits: shift ⌊log2(255/0.3)⌋ = 9, mult ⌊0.3·512⌋ = 153; 100: shift 1, mult 200.
        let s = approx_scale_as_mult_and_shift(&Tensor::from_slice(&[0.3f64, 100.0]), 8).unwrap();
        assert_eq!(v(&s), [153.0 / 512.0, 100.0]);
        assert!(approx_scale_as_mult_and_shift(&Tensor::from(1.0f64), 0).is_err());
    }

    #[test]
    fn range_fake_quantization_matches_distillers_formula_and_masks_saturated_gradients() {
        // Asymmetric unsigned 2 bits over [−1, 2]: scale 1, zero point −1; levels −1, 0, 1, 2.
        let x = Tensor::from_slice(&[-3.0f32, -0.6, 0.4, 0.5, 1.6, 2.2, 9.0]).set_requires_grad(true);
        let (lo, hi) = (Tensor::from(-1.0f32), Tensor::from(2.0f32));
        let y = fake_quantize_range(&x, 2, LinearQuantMode::AsymmetricUnsigned, &lo, &hi, None, true).unwrap();
        // 0.5 ↦ 1.5, a tie, rounds to the even level 2, i.e. 1.0; 2.2 is beyond the range but rounds onto its end.
        assert_eq!(v(&y), [-1.0, -1.0, 0.0, 1.0, 2.0, 2.0, 2.0]);
        y.sum(Kind::Float).backward();
        assert_eq!(v(&x.grad()), [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0], "no gradient through saturated values");
        // Weights: no saturation, identity gradient; symmetric 8 bits over ±2: scale 63.75.
        let w = Tensor::from_slice(&[-2.0f32, 0.01, 1.0]).set_requires_grad(true);
        let q = fake_quantize_range(&w, 8, LinearQuantMode::Symmetric, &Tensor::from(-2.0f32), &Tensor::from(1.0f32), None, false).unwrap();
        let expected: Vec<f64> = [-2.0f32, 0.01, 1.0].iter().map(|x| ((x * 63.75f32).round_ties_even() / 63.75f32) as f64).collect();
        assert_eq!(v(&q), expected);
        q.sum(Kind::Float).backward();
        assert_eq!(v(&w.grad()), [1.0, 1.0, 1.0]);
    }

    #[test]
    fn qat_zero_point_is_distillers_scale_times_min() {
        // Distiller's QAT computes zero_point = round(scale·min) with scale = (1/span)·255 in float32; here that
        // is −238.50002 → −239, where min·255/span is the tie −238.5 → −238 (what the PTQ parameters use).
        let (min, max) = (Tensor::from(-2.3841906f32), Tensor::from(0.16494401f32));
        let (scale, zp) = asymmetric_scale_fast(8, false, &min, &max).unwrap();
        let span = 0.16494401f32 - -2.3841906f32;
        assert_eq!(scale.double_value(&[]) as f32, (1.0 / span) * 255.0);
        assert_eq!(zp.double_value(&[]), -239.0);
        let (_, exact) = asymmetric_params(8, &min, &max, true, false).unwrap();
        assert_eq!(exact.double_value(&[]), -238.0);
        // Signed: shifted by 128; symmetric QAT scale: (1/sat)·127.5, a zero saturation giving 1.
        assert_eq!(asymmetric_scale_fast(8, true, &min, &max).unwrap().1.double_value(&[]), -111.0);
        let s = symmetric_scale_fast(8, false, &Tensor::from_slice(&[0.0f32, 3.7])).unwrap();
        assert_eq!(v(&s), [1.0, ((1.0 / 3.7f32) * 127.5) as f64]);
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
