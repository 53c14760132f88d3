//! Fake quantization of a CPU `f32` tensor in one pass over its memory, and Distiller's QAT ranges and scales
//! computed on the host.
//!
//! Built from libtorch operations, `(round(scale·x − zp) + zp) / scale` with saturation and a gradient mask is
//! about ten passes over the tensor, and a QAT range update a dozen tiny operations, each with its own dispatch
//! and allocation; on the CPU these dominated the cost of quantization-aware training. Here autograd sees one
//! operation: the product with the gradient mask when values saturate (its backward pass multiplies by the
//! mask it saved), an identity otherwise. One loop then computes every element's integer level and writes both
//! the mask and the dequantized values into that operation's output, which nothing autograd saved holds. The
//! arithmetic is libtorch's, operation for operation, in single precision: the results are bit-identical to
//! the libtorch path of [`super::q_utils::fake_quantize`] (tests compare both).
use crate::{Error, Result};
use super::q_utils::{range_scale_f32, weight_range, LinearQuantMode};
use tch::{Device, Kind, Tensor};

/// The quantization grid of one tensor: a scale and zero point per channel (one channel when per tensor) and,
/// for saturating quantization, the integer range.
pub(crate) struct Grid {
    scale: Vec<f32>,
    /// `None` for a zero point of 0, whose subtraction and addition libtorch's path skips (which matters for
    /// the sign of a zero result).
    zero_point: Option<Vec<f32>>,
    /// Elements per channel block: the product of the dimensions after the channel axis.
    inner: usize,
    levels: Option<(f32, f32)>,
}

impl Grid {
    /// The grid for `x`, or `None` where the single-pass path does not apply (not a contiguous `f32` CPU
    /// tensor, no elements, or a scale that does not match `x`); the caller then uses libtorch operations.
    /// `scale` and `zp` are 0-d, or `[C]` along `axis`; `levels` is the integer range values saturate at.
    pub(crate) fn new(x: &Tensor, scale: &Tensor, zp: Option<&Tensor>, axis: Option<usize>, levels: Option<(f64, f64)>) -> Result<Option<Grid>> {
        let cpu_f32 = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float;
        if !cpu_f32(x) || !x.is_contiguous() || x.numel() == 0 || !cpu_f32(scale) || !zp.is_none_or(cpu_f32) {
            return Ok(None);
        }
        let shape = x.size();
        let (channels, inner) = match axis {
            None => (1, x.numel()),
            Some(a) if a < shape.len() => (shape[a] as usize, shape[a + 1..].iter().product::<i64>() as usize),
            Some(_) => return Ok(None),
        };
        let values = |t: &Tensor| -> Result<Option<Vec<f32>>> {
            let v = match host_values(t) {
                Some(v) => v,
                None => Vec::<f32>::try_from(t.f_reshape([-1])?)?,
            };
            Ok(match v.len() {
                1 => Some(vec![v[0]; channels]),
                n if n == channels => Some(v),
                _ => None,
            })
        };
        let Some(scale) = values(scale)? else { return Ok(None) };
        let zero_point = match zp {
            Some(zp) => match values(zp)? {
                Some(v) => Some(v),
                None => return Ok(None),
            },
            None => None,
        };
        Ok(Some(Grid { scale, zero_point, inner, levels: levels.map(|(lo, hi)| (lo as f32, hi as f32)) }))
    }

    /// The grid of a weight tensor's own range, per tensor or per output channel (dimension 0, when `w` has
    /// two or more), with Distiller's QAT scales ([`super::q_utils::weight_scale_fast`], computed on the host);
    /// `None` where the single-pass path does not apply.
    pub(crate) fn for_weights(w: &Tensor, bits: u32, mode: LinearQuantMode, per_channel: bool) -> Result<Option<Grid>> {
        if w.device() != Device::Cpu || w.kind() != Kind::Float || !w.is_contiguous() || w.numel() == 0 {
            return Ok(None);
        }
        let (min, max) = weight_range(w, per_channel)?;
        let (Some(min), Some(max)) = (host_values(&min), host_values(&max)) else { return Ok(None) };
        let (scale, zero_point): (Vec<f32>, Vec<Option<f32>>) = min.iter().zip(&max).map(|(&lo, &hi)| range_scale_f32(bits, mode, lo, hi)).unzip();
        let zero_point = zero_point.into_iter().collect::<Option<Vec<f32>>>();
        Ok(Some(Grid { inner: w.numel() / scale.len(), scale, zero_point, levels: None }))
    }

    /// Fake quantization of `x` with a straight-through gradient: identity, or with saturating levels, the
    /// mask of the elements whose level lies inside the range.
    pub(crate) fn fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        if !x.requires_grad() || self.levels.is_none() {
            let y = if x.requires_grad() { x.f_add_scalar(0.0)? } else { x.f_empty_like()? };
            self.run(x, &y, None)?;
            return Ok(y);
        }
        // The product with the mask is the autograd operation, whose backward pass multiplies by the mask it
        // saved. Its output's values and the mask are both written afterwards, in one pass: the mask's
        // contents matter only in the backward pass, and the output's are replaced.
        let mask = x.f_empty_like()?;
        let y = x.f_mul(&mask)?;
        self.run(x, &y, Some(&mask))?;
        Ok(y)
    }

    /// Writes `(clamp(q) + zp) / scale` of every element of `x` into `out` and, if given, into `mask` 1 where
    /// the level `q = round(scale·x − zp)` lies inside the integer range, 0 elsewhere (and for NaN).
    fn run(&self, x: &Tensor, out: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        let n = x.numel();
        let fits = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() && t.numel() == n;
        let ptrs = [Some(x), Some(out), mask].map(|t| t.map(|t| t.data_ptr() as usize));
        let distinct = (0..3).all(|i| (i + 1..3).all(|j| ptrs[i].is_none() || ptrs[i] != ptrs[j]));
        if !fits(x) || !fits(out) || !mask.is_none_or(fits) || !distinct || self.inner == 0 || n % self.inner != 0 {
            return Err(Error::Shape(format!("fused fake quantization: {:?} into {:?} does not fit the grid", x.size(), out.size())));
        }
        // SAFETY: contiguous f32 CPU tensors of n > 0 elements (checked above), alive for the whole call and
        // with distinct memory (the outputs are freshly allocated by the caller), so the slices are valid and
        // disjoint.
        let (xs, ys, mut ms) = unsafe {
            (
                std::slice::from_raw_parts(x.data_ptr() as *const f32, n),
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
                mask.map(|m| std::slice::from_raw_parts_mut(m.data_ptr() as *mut f32, n)),
            )
        };
        let (lo, hi) = self.levels.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let channels = self.scale.len();
        for (block, (xb, yb)) in xs.chunks_exact(self.inner).zip(ys.chunks_exact_mut(self.inner)).enumerate() {
            let c = block % channels;
            // Without a zero point, subtracting 0 and adding −0 leave every value (and the sign of every zero)
            // as libtorch's path, which skips both, leaves it.
            let (sub, add) = self.zero_point.as_ref().map_or((0.0, -0.0), |z| (z[c], z[c]));
            let mb = ms.as_mut().map(|m| &mut m[block * self.inner..(block + 1) * self.inner]);
            levels(xb, yb, mb, Step { scale: self.scale[c], sub, add, lo, hi });
        }
        Ok(())
    }
}

/// One channel's arithmetic: `q = round(scale·x − sub)`, saturated to `[lo, hi]`, dequantized as
/// `(q + add) / scale`.
#[derive(Clone, Copy)]
struct Step {
    scale: f32,
    sub: f32,
    add: f32,
    lo: f32,
    hi: f32,
}

/// The loop over one block, compiled for AVX2 (8 lanes, a rounding instruction) where the CPU has it.
fn levels(xs: &[f32], ys: &mut [f32], mask: Option<&mut [f32]>, step: Step) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { levels_avx2(xs, ys, mask, step) };
    }
    levels_body::<false>(xs, ys, mask, step)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn levels_avx2(xs: &[f32], ys: &mut [f32], mask: Option<&mut [f32]>, step: Step) {
    levels_body::<true>(xs, ys, mask, step)
}

/// `NATIVE_ROUND`: round with `f32::round_ties_even`, one instruction where SSE4.1 is enabled and a library
/// call per element where it is not.
#[inline(always)]
fn levels_body<const NATIVE_ROUND: bool>(xs: &[f32], ys: &mut [f32], mask: Option<&mut [f32]>, step: Step) {
    let Step { scale: s, sub, add, lo, hi } = step;
    let level = |v: f32| {
        let v = v * s - sub;
        if NATIVE_ROUND { v.round_ties_even() } else { round_half_even(v) }
    };
    // Comparisons, not f32::clamp: a NaN stays NaN, as with libtorch's clamp.
    let saturate = |q: f32| if q < lo { lo } else if q > hi { hi } else { q };
    match mask {
        Some(ms) => {
            for ((y, m), &v) in ys.iter_mut().zip(ms.iter_mut()).zip(xs) {
                let q = level(v);
                *m = if lo <= q && q <= hi { 1.0 } else { 0.0 };
                *y = (saturate(q) + add) / s;
            }
        }
        None => {
            for (y, &v) in ys.iter_mut().zip(xs) {
                *y = (saturate(level(v)) + add) / s;
            }
        }
    }
}

/// The elements of a contiguous `f32` CPU tensor, read without a libtorch operation; `None` for any other.
pub(crate) fn host_values(t: &Tensor) -> Option<Vec<f32>> {
    with_host_values(t, |v| v.to_vec())
}

/// Runs `f` on the elements of a contiguous `f32` CPU tensor, which it may change in place (in every tensor
/// sharing its storage); `None` for any other tensor. `f` must not touch `t` through libtorch.
pub(crate) fn with_host_values<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Option<R> {
    if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        return Some(f(&mut []));
    }
    // SAFETY: a contiguous f32 CPU tensor of n > 0 elements, kept alive by the borrow for the whole call; no
    // other Rust reference to its memory exists meanwhile (f gets the only one and may not use libtorch on t).
    Some(f(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }))
}

/// Rounding half to even, as `torch.round`, in a form the compiler vectorizes on any x86-64 (`f32::round_ties_even`
/// becomes a library call per element without SSE4.1): adding and subtracting 2^23 rounds in the FPU's default
/// mode, which is half to even. Magnitudes from 2^23 up are integers already; the sign keeps `-0.0` for `-0.3`.
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let big = TWO_23.copysign(v);
    let r = ((v + big) - big).copysign(v);
    if v.abs() < TWO_23 { r } else { v }
}

#[cfg(test)]
mod tests {
    use super::round_half_even;

    #[test]
    fn rounds_half_to_even_like_torch() {
        let cases = [
            (0.5f32, 0.0f32), (1.5, 2.0), (2.5, 2.0), (-0.5, -0.0), (-2.5, -2.0), (-3.5, -4.0), (0.49999997, 0.0),
            (4_194_304.5, 4_194_304.0), (4_194_305.5, 4_194_306.0), (8_388_607.5, 8_388_608.0), (8_388_609.0, 8_388_609.0),
            (-8_388_607.5, -8_388_608.0), (1e30, 1e30), (f32::INFINITY, f32::INFINITY), (-f32::INFINITY, -f32::INFINITY),
        ];
        for (v, want) in cases {
            let got = round_half_even(v);
            assert_eq!(got.to_bits(), want.to_bits(), "round({v}) = {got}, want {want}");
            assert_eq!(got.to_bits(), v.round_ties_even().to_bits());
        }
        assert_eq!(round_half_even(-0.3).to_bits(), (-0.0f32).to_bits());
        assert!(round_half_even(f32::NAN).is_nan());
    }
}
