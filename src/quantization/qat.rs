//! Quantization-aware training: Distiller's `QuantAwareTrainRangeLinearQuantizer`, `DorefaQuantizer`,
//! `PACTQuantizer` and `WRPNQuantizer`.
//!
//! Weights keep a full-precision copy, `float_weight`, which is the parameter the optimizer updates; the layer
//! computes with `weight = q(float_weight)` on every forward pass, and gradients reach the copy through a
//! straight-through estimator. ReLUs are replaced by clipped (DoReFa, WRPN), learned-clip (PACT) or EMA-ranged
//! (range-linear) fake quantizers.
use std::any::Any;
use std::collections::HashMap;

use tch::nn::Init;
use tch::Tensor;

use super::fused::{with_host_values, Grid};
use super::q_utils::{fake_quantize, fake_quantize_ste, straight_through, symmetric_params, weight_scale_fast, LinearQuantMode};
use super::quantizer::{resolve_settings, ModeSpec, ModuleQuantSettings, Overrides, QBits, QuantDefaults, ReplaceFactory, Replaced, CLIPPED_OVERRIDE_KEYS, QAT_OVERRIDE_KEYS};
use crate::nn::{BoxModule, Conv2d, Forward, Linear, Model, Module, Rollback};
use crate::{Error, Result};

/// How a quantization-aware method quantizes weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightQuant {
    /// DoReFa (Zhou et al., 2016): `tanh`-normalized to [0, 1], k-bit uniform, mapped back to [−1, 1];
    /// binary (k = 1): `mean|w| · sign(w)`.
    Dorefa(u32),
    /// WRPN (Mishra et al.): clamp to [−1, 1], then `round(s·w)/s` with `s = (2^k − 1)/2` (Distiller's code).
    Wrpn(u32),
    /// Range-linear: scale and zero point from the weight's own range, per tensor or per output channel.
    RangeLinear {
        /// Bits.
        bits: u32,
        /// Mode.
        mode: LinearQuantMode,
        /// Per output channel.
        per_channel: bool,
    },
}

impl WeightQuant {
    /// The quantized weights, with gradients flowing to `w` through the straight-through estimator.
    pub fn apply(&self, w: &Tensor) -> Result<Tensor> {
        match *self {
            WeightQuant::Dorefa(1) => {
                let e = w.f_abs()?.f_mean(w.kind())?.f_detach()?;
                let sign = w.f_ge(0.0)?.f_to_kind(w.kind())?.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?;
                straight_through(w, &sign.f_mul(&e)?)
            }
            WeightQuant::Dorefa(k) => {
                let t = w.f_tanh()?;
                let max = t.f_abs()?.f_max()?.f_detach()?;
                let f = t.f_div(&max.f_mul_scalar(2.0)?)?.f_add_scalar(0.5)?;
                let n = 2f64.powi(k as i32) - 1.0;
                let fq = straight_through(&f, &f.f_mul_scalar(n)?.f_round()?.f_div_scalar(n)?.f_detach()?)?;
                // DoReFa maps 0 to f = ½, which rounds to a non-zero level; a pruned weight must stay pruned, so
                // exact zeros are kept at zero (Distiller revives them).
                let nonzero = w.f_ne(0.0)?.f_to_kind(w.kind())?;
                Ok(fq.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?.f_mul(&nonzero)?)
            }
            WeightQuant::Wrpn(k) => {
                let c = w.f_clamp(-1.0, 1.0)?;
                let (s, z) = symmetric_params(k, &Tensor::from(1.0), false)?;
                fake_quantize_ste(&c, &s.f_to_kind(w.kind())?, &z.f_to_kind(w.kind())?)
            }
            WeightQuant::RangeLinear { bits, mode, per_channel } => {
                if let Some(grid) = Grid::for_weights(w, bits, mode, per_channel)? {
                    return grid.fake_quantize(w);
                }
                let (scale, zp) = weight_scale_fast(w, bits, mode, per_channel)?;
                let axis = (scale.dim() == 1 && w.dim() >= 2).then_some(0);
                fake_quantize(w, bits, mode, &scale, zp.as_ref(), axis, false)
            }
        }
    }

    /// The integer grid of [`WeightQuant::apply`]'s values for weights `w`, in Distiller's convention: scale
    /// and zero point (0-d, or `[C]` along dimension 0) such that every quantized weight is `(q + zp) / scale`
    /// for an integer `q`. DoReFa's k-bit levels `(2l − n)/n` are the odd or even integers over `n = 2^k − 1`;
    /// binary DoReFa's are `±mean|w|`; WRPN's are integers over `(2^k − 1)/2`.
    pub fn grid(&self, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let w = w.f_detach()?;
        let per_tensor = |scale: f64| -> Result<(Tensor, Tensor)> { Ok((Tensor::from(scale), Tensor::from(0.0))) };
        match *self {
            WeightQuant::Dorefa(1) => per_tensor(1.0 / w.f_abs()?.f_mean(w.kind())?.f_double_value(&[])?),
            WeightQuant::Dorefa(k) => per_tensor(2f64.powi(k as i32) - 1.0),
            WeightQuant::Wrpn(k) => per_tensor((2f64.powi(k as i32) - 1.0) / 2.0),
            WeightQuant::RangeLinear { bits, mode, per_channel } => {
                let (scale, zp) = weight_scale_fast(&w, bits, mode, per_channel)?;
                let zp = match zp {
                    Some(zp) => zp,
                    None => scale.f_zeros_like()?,
                };
                Ok((scale, zp))
            }
        }
    }
}

/// A Conv2d or Linear whose weight is trained in full precision (`float_weight`) and used quantized.
#[derive(Debug)]
pub struct FpCopyLayer {
    layer: BoxModule,
    weight: WeightQuant,
    bias: Option<WeightQuant>,
}

impl FpCopyLayer {
    /// Wraps `layer` (Conv2d or Linear); hands it back if it is neither.
    pub fn new(layer: BoxModule, weight: WeightQuant, bias: Option<WeightQuant>) -> Replaced {
        let any = layer.as_ref() as &dyn Any;
        if !(any.is::<Conv2d>() || any.is::<Linear>()) {
            let e = Error::invalid("module", format!("{} has no weight to quantize", layer.type_name()));
            return Err((layer, e));
        }
        Ok(Box::new(FpCopyLayer { layer, weight, bias }))
    }

    fn parts(&self) -> Result<(&Tensor, Option<&Tensor>)> {
        let any = self.layer.as_ref() as &dyn Any;
        if let Some(c) = any.downcast_ref::<Conv2d>() {
            return Ok((&c.weight, c.bias.as_ref()));
        }
        match any.downcast_ref::<Linear>() {
            Some(l) => Ok((&l.weight, l.bias.as_ref())),
            None => Err(Error::invalid("module", "the quantized layer no longer holds a Conv2d or Linear")),
        }
    }

    /// The quantized weight the layer computes with.
    pub fn quantized_weight(&self) -> Result<Tensor> {
        self.weight.apply(self.parts()?.0)
    }

    /// The bias the layer computes with (quantized when the method quantizes biases).
    pub fn quantized_bias(&self) -> Result<Option<Tensor>> {
        match (self.parts()?.1, &self.bias) {
            (Some(b), Some(q)) => Ok(Some(q.apply(b)?)),
            (b, _) => Ok(b.map(|b| b.shallow_clone())),
        }
    }

    /// How the weights are quantized.
    pub fn weight_quant(&self) -> &WeightQuant {
        &self.weight
    }

    /// The full-precision weights (the trained copy).
    pub fn float_weight(&self) -> Result<&Tensor> {
        Ok(self.parts()?.0)
    }

    /// The wrapped Conv2d or Linear.
    pub fn layer(&self) -> &dyn Module {
        self.layer.as_ref()
    }
}

impl Module for FpCopyLayer {
    fn type_name(&self) -> &str {
        self.layer.type_name()
    }
    fn forward(&self, x: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let wq = self.quantized_weight()?;
        let bq = self.quantized_bias()?;
        let any = self.layer.as_ref() as &dyn Any;
        match any.downcast_ref::<Conv2d>() {
            Some(c) => {
                let k = &c.config;
                Ok(x.f_conv2d(&wq, bq.as_ref(), k.stride, k.padding, k.dilation, k.groups)?)
            }
            None => Ok(x.f_linear(&wq, bq.as_ref())?),
        }
    }
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        let Ok((w, b)) = self.parts() else { return Vec::new() };
        let mut p = vec![("float_weight", w)];
        p.extend(b.map(|b| (if self.bias.is_some() { "float_bias" } else { "bias" }, b)));
        p
    }
    fn take_replaced(&mut self) -> Option<BoxModule> {
        Some(std::mem::replace(&mut self.layer, Box::new(crate::nn::Identity)))
    }
    fn extra_repr(&self) -> String {
        format!("{}, weights={:?}", self.layer.extra_repr(), self.weight)
    }
}

/// DoReFa's and WRPN's activation quantizer, which replaces a ReLU: `clamp(x, 0, clip)` then `k` bits.
#[derive(Debug)]
pub struct ClippedLinearQuantization {
    /// Bits.
    pub bits: u32,
    /// The clipping value.
    pub clip_val: f64,
}

impl Module for ClippedLinearQuantization {
    fn type_name(&self) -> &str {
        "ClippedLinearQuantization"
    }
    fn forward(&self, x: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let c = x.f_clamp(0.0, self.clip_val)?;
        let s = Tensor::from((2f64.powi(self.bits as i32) - 1.0) / self.clip_val).f_to_kind(x.kind())?;
        fake_quantize_ste(&c, &s, &s.f_zeros_like()?)
    }
    fn take_replaced(&mut self) -> Option<BoxModule> {
        // It only ever replaces a ReLU, which holds no state.
        Some(Box::new(crate::nn::ReLU))
    }
    fn extra_repr(&self) -> String {
        format!("num_bits={}, clip_val={}", self.bits, self.clip_val)
    }
}

/// PACT's activation quantizer (Choi et al., 2018): `min(relu(x), α)` with a learned α, then `k` bits; α gets
/// gradient from the saturated inputs.
#[derive(Debug)]
pub struct LearnedClippedLinearQuantization {
    /// Bits.
    pub bits: u32,
    /// α, a `[1]` parameter.
    pub clip_val: Tensor,
}

impl Module for LearnedClippedLinearQuantization {
    fn type_name(&self) -> &str {
        "LearnedClippedLinearQuantization"
    }
    fn forward(&self, x: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let r = x.f_relu()?;
        let alpha = self.clip_val.f_to_kind(x.kind())?;
        let c = r.f_where_self(&r.f_lt_tensor(&alpha)?, &alpha.f_expand_as(&r)?)?;
        let n = 2f64.powi(self.bits as i32) - 1.0;
        let s = tch::no_grad(|| alpha.f_reciprocal().and_then(|a| a.f_mul_scalar(n)))?;
        fake_quantize_ste(&c, &s, &s.f_zeros_like()?)
    }
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        vec![("clip_val", &self.clip_val)]
    }
    fn take_replaced(&mut self) -> Option<BoxModule> {
        // It only ever replaces a ReLU, which holds no state.
        Some(Box::new(crate::nn::ReLU))
    }
    fn extra_repr(&self) -> String {
        format!("num_bits={}, clip_val={:.4}", self.bits, self.clip_val.f_double_value(&[0]).unwrap_or(f64::NAN))
    }
}

/// Distiller's `FakeLinearQuantization`: range-linear fake quantization with ranges tracked by a bias-corrected
/// exponential moving average of each training batch's min and max. The state lives on the model's device in
/// Distiller's buffers (`tracked_min_biased`, `tracked_min`, `tracked_max_biased`, `tracked_max`, `iter_count`,
/// `scale`, `zero_point`), so a training step never waits for the device and checkpoints carry the ranges.
///
/// The buffers are views of one tensor, so that a step updates them in a handful of small operations (each
/// costs microseconds on the CPU, whatever its size); the step count is also kept on the host, where the bias
/// correction `1 − decay^step` is computed in single precision, as Distiller's tensor arithmetic does.
#[derive(Debug)]
pub struct FakeLinearQuantization {
    bits: u32,
    mode: LinearQuantMode,
    ema_decay: f64,
    /// Views of one tensor `[min_biased, max_biased, min, max, iter_count, scale, zero_point]`: the biased and
    /// the tracked `[min, max]` pairs.
    biased: Tensor,
    tracked: Tensor,
    /// Views of the same tensor in Distiller's buffer order.
    buffers: [Tensor; 7],
    /// The tensor itself.
    state: Tensor,
    /// The last batch's `[min, max]` and 0-d views of its two entries, written in place every step.
    batch: Tensor,
    batch_ends: [Tensor; 2],
    /// `iter_count` as the host knows it; `UNKNOWN_STEPS` until read from the device (after construction or a
    /// checkpoint load).
    steps: std::sync::atomic::AtomicU64,
}

const EMA_BUFFERS: [&str; 7] = ["tracked_min_biased", "tracked_min", "tracked_max_biased", "tracked_max", "iter_count", "scale", "zero_point"];
const UNKNOWN_STEPS: u64 = u64::MAX;

impl FakeLinearQuantization {
    /// `bits`-bit `mode` quantization with EMA decay `ema_decay`, its state on `device`.
    pub fn new(bits: u32, mode: LinearQuantMode, ema_decay: f64, device: tch::Device) -> Result<Self> {
        let state = Tensor::f_zeros([7], (tch::Kind::Float, device))?;
        let view = |i: i64| state.f_narrow(0, i, 1);
        let buffers = [view(0)?, view(2)?, view(1)?, view(3)?, view(4)?, view(5)?, view(6)?];
        let _ = buffers[5].shallow_clone().f_fill_(1.0)?;
        let batch = Tensor::f_zeros([2], (tch::Kind::Float, device))?;
        let batch_ends = [batch.f_select(0, 0)?, batch.f_select(0, 1)?];
        Ok(FakeLinearQuantization {
            bits,
            mode,
            ema_decay,
            biased: state.f_narrow(0, 0, 2)?,
            tracked: state.f_narrow(0, 2, 2)?,
            buffers,
            state,
            batch,
            batch_ends,
            steps: std::sync::atomic::AtomicU64::new(UNKNOWN_STEPS),
        })
    }

    /// The tracked (bias-corrected) range.
    pub fn tracked_range(&self) -> Result<(f64, f64)> {
        Ok((self.buffers[1].f_double_value(&[0])?, self.buffers[3].f_double_value(&[0])?))
    }

    /// The scale and zero point in use (Distiller's convention), with the integer range values saturate at;
    /// `None` before any range was tracked (the quantizer then passes its input through).
    pub fn quant_params(&self) -> Result<Option<super::q_utils::QParams>> {
        if self.steps()? == 0 {
            return Ok(None);
        }
        let [.., scale, zero_point] = &self.buffers;
        let (lo, mut hi) = super::q_utils::quantized_range(self.bits, self.mode.signed(), self.mode.restricted());
        if self.mode == LinearQuantMode::Symmetric {
            // As in fake_quantize: the full symmetric range saturates at ±2^(b−1).
            hi = -lo;
        }
        let squeeze = |t: &Tensor| t.f_reshape([] as [i64; 0]);
        Ok(Some(super::q_utils::QParams::from_scale(squeeze(scale)?, squeeze(zero_point)?, (lo, hi))))
    }

    /// Distiller's training-time update: `iter += 1`; `biased = biased·decay + (1 − decay)·batch` for min and
    /// max; `tracked = biased / (1 − decay^iter)`; scale and zero point from the tracked range. On the CPU the
    /// arithmetic runs on the host (`on_host`), on other devices as tensor operations, with identical results.
    fn update(&self, y: &Tensor, on_host: bool) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let y = if y.kind() == tch::Kind::Float { y.shallow_clone() } else { y.f_to_kind(tch::Kind::Float)? };
        let [lo, hi] = &self.batch_ends;
        let _ = y.f_aminmax_out(lo, hi, None, false)?;
        let step = self.steps()?.saturating_add(1);
        let d = self.ema_decay;
        let correction = 1.0 - (d as f32).powf(step as f32);
        let batch = if on_host { super::fused::host_values(&self.batch) } else { None };
        let updated = batch.and_then(|batch| {
            with_host_values(&self.state, |state| {
                let [min_biased, max_biased, min, max, iter_count, scale, zero_point] = state else { return };
                *min_biased = *min_biased * d as f32 + batch[0] * (1.0 - d) as f32;
                *max_biased = *max_biased * d as f32 + batch[1] * (1.0 - d) as f32;
                (*min, *max) = (*min_biased / correction, *max_biased / correction);
                *iter_count = step as f64 as f32;
                let (s, z) = super::q_utils::range_scale_f32(self.bits, self.mode, *min, *max);
                *scale = s;
                if let Some(z) = z {
                    *zero_point = z;
                }
            })
        });
        if updated.is_none() {
            let _ = self.biased.shallow_clone().f_mul_scalar_(d)?;
            let _ = self.batch.shallow_clone().f_mul_scalar_(1.0 - d)?;
            let _ = self.biased.shallow_clone().f_add_(&self.batch)?;
            let _ = self.buffers[4].shallow_clone().f_fill_(step as f64)?;
            let _ = self.biased.f_div_scalar_out(&self.tracked, correction as f64)?;
            let [_, tracked_min, _, tracked_max, _, scale, zero_point] = &self.buffers;
            let (s, z) = super::q_utils::range_scale_fast(self.bits, self.mode, tracked_min, tracked_max)?;
            scale.shallow_clone().f_copy_(&s)?;
            if let Some(z) = z {
                zero_point.shallow_clone().f_copy_(&z)?;
            }
        }
        self.steps.store(step, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// `iter_count`, read from the device only when the host does not know it.
    fn steps(&self) -> Result<u64> {
        use std::sync::atomic::Ordering;
        let known = self.steps.load(Ordering::Relaxed);
        if known != UNKNOWN_STEPS {
            return Ok(known);
        }
        // A negative or NaN count from a foreign checkpoint reads as 0 (nothing tracked).
        let read = self.buffers[4].f_double_value(&[0])?.max(0.0) as u64;
        self.steps.store(read, Ordering::Relaxed);
        Ok(read)
    }
}

impl Module for FakeLinearQuantization {
    fn type_name(&self) -> &str {
        "FakeLinearQuantization"
    }
    fn forward(&self, y: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        if ctx.is_training() {
            self.update(y, true)?;
        } else if self.steps()? == 0 {
            // No range has been seen yet: pass the input through.
            return Ok(y.shallow_clone());
        }
        let [.., scale, zero_point] = &self.buffers;
        fake_quantize(y, self.bits, self.mode, scale, (!self.mode.symmetric()).then_some(zero_point), None, true)
    }
    fn buffers(&self) -> Vec<(&str, &Tensor)> {
        EMA_BUFFERS.iter().copied().zip(self.buffers.iter()).collect()
    }
    fn buffers_loaded(&self) {
        self.steps.store(UNKNOWN_STEPS, std::sync::atomic::Ordering::Relaxed);
    }
    fn extra_repr(&self) -> String {
        format!("mode={:?}, num_bits={}, ema_decay={:.4}", self.mode, self.bits, self.ema_decay)
    }
}

/// Range-linear activation fake quantization of a module's output (Distiller's `FakeQuantizationWrapper`): the
/// wrapped module (a ReLU) runs, then `fake_q`.
#[derive(Debug)]
pub struct FakeQuantizationWrapper {
    wrapped: BoxModule,
    fake_q: BoxModule,
}

impl FakeQuantizationWrapper {
    /// Wraps `wrapped` (a ReLU) with `bits`-bit fake quantization of its output, its state on `device`.
    pub fn new(wrapped: BoxModule, bits: u32, mode: LinearQuantMode, ema_decay: f64, device: tch::Device) -> Replaced {
        match FakeLinearQuantization::new(bits, mode, ema_decay, device) {
            Ok(q) => Ok(Box::new(FakeQuantizationWrapper { wrapped, fake_q: Box::new(q) })),
            Err(e) => Err((wrapped, e)),
        }
    }

    /// The tracked (bias-corrected) range.
    pub fn tracked_range(&self) -> Result<(f64, f64)> {
        match (self.fake_q.as_ref() as &dyn Any).downcast_ref::<FakeLinearQuantization>() {
            Some(q) => q.tracked_range(),
            None => Err(Error::invalid("module", "fake_q is not a FakeLinearQuantization")),
        }
    }
}

impl Module for FakeQuantizationWrapper {
    fn type_name(&self) -> &str {
        "FakeQuantizationWrapper"
    }
    fn forward(&self, x: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let y = ctx.call("wrapped_module", self.wrapped.as_ref(), x)?;
        ctx.call("fake_q", self.fake_q.as_ref(), &y)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("wrapped_module", self.wrapped.as_ref()), ("fake_q", self.fake_q.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("wrapped_module", &mut self.wrapped), ("fake_q", &mut self.fake_q)]
    }
    fn take_replaced(&mut self) -> Option<BoxModule> {
        Some(std::mem::replace(&mut self.wrapped, Box::new(crate::nn::Identity)))
    }
}

/// The model's root with its input fake-quantized first (Distiller's `inputs_quant`, added to the model by
/// `QuantAwareTrainRangeLinearQuantizer` with `quantize_inputs`). It lists the root's own parameters and
/// children, then `inputs_quant`, so every other name stays.
#[derive(Debug)]
pub struct InputQuantized {
    inner: BoxModule,
    inputs_quant: BoxModule,
}

impl Module for InputQuantized {
    fn type_name(&self) -> &str {
        self.inner.type_name()
    }
    fn forward_many(&self, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
        let quantized = inputs.iter().map(|x| ctx.call("inputs_quant", self.inputs_quant.as_ref(), x)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = quantized.iter().collect();
        self.inner.forward_many(&refs, ctx)
    }
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        self.inner.parameters()
    }
    fn buffers(&self) -> Vec<(&str, &Tensor)> {
        self.inner.buffers()
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        let mut c = self.inner.children();
        c.push(("inputs_quant", self.inputs_quant.as_ref()));
        c
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        let mut c = self.inner.children_mut();
        c.push(("inputs_quant", &mut self.inputs_quant));
        c
    }
    fn take_replaced(&mut self) -> Option<BoxModule> {
        Some(std::mem::replace(&mut self.inner, Box::new(crate::nn::Identity)))
    }
    fn extra_repr(&self) -> String {
        self.inner.extra_repr()
    }
}

/// Which quantization-aware method.
#[derive(Debug, Clone, PartialEq)]
pub enum QatMethod {
    /// `DorefaQuantizer`.
    Dorefa,
    /// `PACTQuantizer`: α starts at `act_clip_init_val`; `act_clip_decay` is α's weight decay (`None`: the
    /// optimizer's).
    Pact {
        /// Initial α.
        act_clip_init_val: f64,
        /// α's own L2 penalty.
        act_clip_decay: Option<f64>,
    },
    /// `WRPNQuantizer`.
    Wrpn,
    /// `QuantAwareTrainRangeLinearQuantizer`.
    RangeLinear {
        /// Modes of activations and weights.
        mode: ModeSpec,
        /// EMA decay of activation ranges.
        ema_decay: f64,
        /// Per-channel weights.
        per_channel_wts: bool,
        /// Fake-quantize the model's input (Distiller's default).
        quantize_inputs: bool,
        /// Bits of the input (`None`: the activations').
        num_bits_inputs: Option<u32>,
    },
}

impl QatMethod {
    /// Distiller's class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            QatMethod::Dorefa => "DorefaQuantizer",
            QatMethod::Pact { .. } => "PACTQuantizer",
            QatMethod::Wrpn => "WRPNQuantizer",
            QatMethod::RangeLinear { .. } => "QuantAwareTrainRangeLinearQuantizer",
        }
    }
}

/// A quantization-aware quantizer: the method, default bit widths and overrides.
#[derive(Debug, Clone)]
pub struct QatQuantizer {
    /// Method.
    pub method: QatMethod,
    /// Default bits (Distiller: 32 = float for activations and weights unless given).
    pub bits: QBits,
    /// Ordered overrides.
    pub overrides: Overrides,
}

/// What preparing a model added: new trainable parameters with the weight decay of their group.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Modules replaced.
    pub replaced: Vec<String>,
    /// New parameters (PACT's α) and their weight decay (`None`: the optimizer's default).
    pub new_params: Vec<(String, Tensor)>,
    /// Weight decay for `new_params`.
    pub new_params_weight_decay: Option<f64>,
}

impl QatQuantizer {
    /// Replaces the model's Conv2d/Linear layers and ReLUs, names kept.
    pub fn prepare_model(&self, model: &mut Model) -> Result<Prepared> {
        Rollback::transaction(model, |model, rollback| self.prepare_steps(model, rollback))
    }

    fn prepare_steps(&self, model: &mut Model, rollback: &mut Rollback) -> Result<Prepared> {
        let (mode, allowed) = match &self.method {
            QatMethod::RangeLinear { mode, .. } => (*mode, QAT_OVERRIDE_KEYS),
            _ => (ModeSpec::both(LinearQuantMode::Symmetric), CLIPPED_OVERRIDE_KEYS),
        };
        let defaults = QuantDefaults { bits: self.bits, mode, ..QuantDefaults::float() };
        let settings = resolve_settings(model, &defaults, &self.overrides, allowed)?;
        let device = model.device();
        // PACT's α are created in the VarStore under their module's path before the tree is changed.
        let mut alphas: HashMap<String, Tensor> = HashMap::new();
        if let QatMethod::Pact { act_clip_init_val, .. } = self.method {
            for (name, type_name, s) in &settings {
                if type_name == "ReLU" && s.bits.acts.is_some() {
                    let mut p = model.var_store().root();
                    for part in name.split('.') {
                        p = p.sub(part);
                    }
                    alphas.insert(name.clone(), p.f_var("clip_val", &[1], Init::Const(act_clip_init_val))?);
                }
            }
        }
        let method = self.method.clone();
        let weight_quant = move |s: &ModuleQuantSettings, bits: u32| match &method {
            QatMethod::Dorefa | QatMethod::Pact { .. } => WeightQuant::Dorefa(bits),
            QatMethod::Wrpn => WeightQuant::Wrpn(bits),
            QatMethod::RangeLinear { per_channel_wts, .. } => WeightQuant::RangeLinear { bits, mode: s.mode.weights, per_channel: *per_channel_wts || s.per_channel_wts },
        };
        let is_range_linear = matches!(self.method, QatMethod::RangeLinear { .. });
        let ema_decay = match self.method {
            QatMethod::RangeLinear { ema_decay, .. } => ema_decay,
            _ => 0.999,
        };
        let layer = |m: BoxModule, _: &str, s: &ModuleQuantSettings| -> Replaced {
            match s.bits.wts {
                Some(bits) => {
                    let bias = if is_range_linear { s.bits.bias.map(|b| WeightQuant::RangeLinear { bits: b, mode: s.mode.weights, per_channel: false }) } else { None };
                    FpCopyLayer::new(m, weight_quant(s, bits), bias)
                }
                None => Ok(m),
            }
        };
        let alphas = std::cell::RefCell::new(alphas);
        let relu = |m: BoxModule, name: &str, s: &ModuleQuantSettings| -> Replaced {
            let Some(bits) = s.bits.acts else { return Ok(m) };
            match &self.method {
                QatMethod::Dorefa | QatMethod::Wrpn => Ok(Box::new(ClippedLinearQuantization { bits, clip_val: 1.0 })),
                QatMethod::Pact { .. } => match alphas.borrow_mut().remove(name) {
                    Some(clip_val) => Ok(Box::new(LearnedClippedLinearQuantization { bits, clip_val })),
                    None => Err((m, Error::invalid("PACT", format!("no clipping value was created for {name}")))),
                },
                QatMethod::RangeLinear { .. } => FakeQuantizationWrapper::new(m, bits, s.mode.activations, ema_decay, device),
            }
        };
        let factory = ReplaceFactory::default().with("Conv2d", layer).with("Linear", layer).with("ReLU", relu);
        let mut replaced = factory.prepare(model, &settings, rollback)?;
        if let QatMethod::RangeLinear { quantize_inputs: true, num_bits_inputs, mode, ema_decay, .. } = &self.method {
            if let Some(bits) = num_bits_inputs.or(self.bits.acts) {
                let inputs_quant: BoxModule = Box::new(FakeLinearQuantization::new(bits, mode.activations, *ema_decay, device)?);
                model.try_map_root(|inner| Ok(Box::new(InputQuantized { inner, inputs_quant })))?;
                rollback.wrapped("");
                replaced.push("inputs_quant".into());
            }
        }
        let new_params: Vec<(String, Tensor)> =
            model.named_parameters().into_iter().filter(|(n, _)| n.ends_with(".clip_val")).collect();
        let new_params_weight_decay = match self.method {
            QatMethod::Pact { act_clip_decay, .. } => act_clip_decay,
            _ => None,
        };
        Ok(Prepared { replaced, new_params, new_params_weight_decay })
    }
}

/// Every quantized parameter of a prepared model in one go (Distiller's `quantize_params()`), as
/// `<module>.weight` → its quantized value computed from `float_weight`; for inspection and export.
pub fn quantized_params(model: &Model) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut failure = None;
    model.for_each_module(|name, m| {
        if let Some(layer) = (m as &dyn Any).downcast_ref::<FpCopyLayer>() {
            match tch::no_grad(|| layer.quantized_weight()) {
                Ok(q) => out.push((format!("{name}.weight"), q)),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
    });
    failure.map_or(Ok(out), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn v(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    /// Distiller's `FakeLinearQuantization` update in single precision, written out independently: the float
    /// tensors' arithmetic (`biased·decay + (1 − decay)·value`, `1 − decay^iter` with `iter` a float tensor,
    /// `scale = sat.reciprocal() · n` as PyTorch evaluates `n / sat`, `zero_point = round(scale · min)`).
    fn distiller_ema(batches: &[(f32, f32)], decay: f64, symmetric: bool) -> Vec<[f32; 4]> {
        let (d, one_minus_d) = (decay as f32, (1.0 - decay) as f32);
        let (mut lo_b, mut hi_b) = (0.0f32, 0.0f32);
        let mut out = Vec::new();
        for (step, &(lo, hi)) in batches.iter().enumerate() {
            lo_b = lo_b * d + one_minus_d * lo;
            hi_b = hi_b * d + one_minus_d * hi;
            let correction = 1.0f32 - d.powf((step + 1) as f32);
            let (lo_t, hi_t) = (lo_b / correction, hi_b / correction);
            let (scale, zp) = if symmetric {
                let sat = lo_t.abs().max(hi_t.abs());
                ((1.0 / sat) * 127.5, 0.0)
            } else {
                let (min, max) = (lo_t.min(0.0), hi_t.max(0.0));
                let scale = (1.0 / (max - min)) * 255.0;
                (scale, (scale * min).round_ties_even())
            };
            out.push([lo_t, hi_t, scale, zp]);
        }
        out
    }

    #[test]
    fn ema_ranges_scale_and_zero_point_match_distillers_float_arithmetic_bit_for_bit() {
        let batches = [(-0.3f32, 1.7f32), (-1.1, 2.9), (0.2, 0.9), (-2.6, 0.4), (-0.05, 3.3)];
        let cases = [(LinearQuantMode::Symmetric, true), (LinearQuantMode::AsymmetricUnsigned, false)];
        // Through a training forward pass (the host arithmetic on the CPU), and the tensor arithmetic of other
        // devices.
        for ((mode, symmetric), on_host) in cases.into_iter().flat_map(|c| [(c, true), (c, false)]) {
            let q = FakeLinearQuantization::new(8, mode, 0.999, tch::Device::Cpu).unwrap();
            let mut ctx = Forward::new(true, &[]);
            for (&(lo, hi), expected) in batches.iter().zip(distiller_ema(&batches, 0.999, symmetric)) {
                let y = Tensor::from_slice(&[lo, (lo + hi) / 2.0, hi]);
                if on_host {
                    let _ = q.forward(&y, &mut ctx).unwrap();
                } else {
                    q.update(&y, false).unwrap();
                }
                let buffer = |name: &str| q.buffers().into_iter().find(|(n, _)| *n == name).unwrap().1.double_value(&[0]) as f32;
                let got = [buffer("tracked_min"), buffer("tracked_max"), buffer("scale"), buffer("zero_point")];
                assert_eq!(got.map(f32::to_bits), expected.map(f32::to_bits), "{mode:?} on host {on_host}: got {got:?}, Distiller {expected:?}");
            }
            assert_eq!(q.buffers()[4].1.double_value(&[0]), 5.0, "iter_count");
        }
    }

    /// Range-linear weight quantization on the CPU's host path (contiguous weights) against the tensor path
    /// (the same values through a transposed view), bit for bit, per tensor and per channel in every mode.
    #[test]
    fn host_and_tensor_weight_quantization_agree_bit_for_bit() {
        let bits32 = |t: &Tensor| -> Vec<u32> { Vec::<f32>::try_from(&t.contiguous().flatten(0, -1)).unwrap().iter().map(|v| v.to_bits()).collect() };
        let mut data: Vec<f32> = (0..120).map(|i| ((i * 37 % 53) as f32 - 26.0) * 0.173 + if i % 40 == 0 { 0.0 } else { 0.01 }).collect();
        // A pruned channel: zeros of both signs (a mask zeroes negative weights to -0.0).
        for (i, v) in data[40..80].iter_mut().enumerate() {
            *v = if i % 3 == 0 { -0.0 } else { 0.0 };
        }
        let base = Tensor::from_slice(&data).reshape([3, 40]);
        let modes = [LinearQuantMode::Symmetric, LinearQuantMode::SymmetricRestricted, LinearQuantMode::AsymmetricUnsigned, LinearQuantMode::AsymmetricSigned];
        for mode in modes {
            for per_channel in [false, true] {
                let quant = WeightQuant::RangeLinear { bits: 4, mode, per_channel };
                let run = |w: &Tensor| {
                    let w = w.set_requires_grad(true);
                    let q = quant.apply(&w).unwrap();
                    (&q * Tensor::from_slice(&[1.0f32, -2.0, 3.0]).reshape([3, 1])).sum(tch::Kind::Float).backward();
                    (bits32(&q), bits32(&w.grad()))
                };
                assert_eq!(run(&base.copy()), run(&base.t_copy().t_()), "{mode:?} per channel {per_channel}");
            }
        }
    }

    #[test]
    fn dorefa_levels() {
        let w = Tensor::from_slice(&[-1.0f64, -0.2, 0.0, 0.3, 2.0]);
        // k = 2: f = tanh(w)/(2·max|tanh|) + 0.5, rounded to thirds, mapped to 2f − 1 ∈ {−1, −1/3, 1/3, 1}.
        let t: Vec<f64> = [-1.0f64, -0.2, 0.0, 0.3, 2.0].iter().map(|x| x.tanh()).collect();
        let m = t.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let mut expected: Vec<f64> = t.iter().map(|x| 2.0 * ((x / (2.0 * m) + 0.5) * 3.0).round_ties_even() / 3.0 - 1.0).collect();
        expected[2] = 0.0; // an exact zero stays zero (DoReFa's formula would give 1/3)
        assert!(close(&v(&WeightQuant::Dorefa(2).apply(&w).unwrap()), &expected));
        // k = 1: mean|w| · sign(w), sign(0) = +1.
        assert!(close(&v(&WeightQuant::Dorefa(1).apply(&w).unwrap()), &[-0.7, -0.7, 0.7, 0.7, 0.7]));
    }

    #[test]
    fn wrpn_levels_have_no_clamp_of_q() {
        // 4 bits: s = 7.5; round(7.5·clamp(w)) / 7.5 ∈ {−8..8}/7.5 (17 levels): ±1 ↦ round(±7.5) = ±8.
        let w = Tensor::from_slice(&[-3.0f64, -0.5, 0.1, 1.0]);
        assert!(close(&v(&WeightQuant::Wrpn(4).apply(&w).unwrap()), &[-8.0 / 7.5, -4.0 / 7.5, 1.0 / 7.5, 8.0 / 7.5]));
    }

    #[test]
    fn pact_alpha_gets_gradient_from_saturated_inputs_only() {
        let alpha = Tensor::from_slice(&[2.0f64]).set_requires_grad(true);
        let m = LearnedClippedLinearQuantization { bits: 2, clip_val: alpha.shallow_clone() };
        let x = Tensor::from_slice(&[-1.0f64, 0.5, 1.0, 3.0, 5.0]).set_requires_grad(true);
        let y = m.forward(&x, &mut Forward::new(true, &[])).unwrap();
        // scale = 3/2: levels 0, 2/3, 4/3, 2.
        assert!(close(&v(&y), &[0.0, 2.0 / 3.0, 4.0 / 3.0, 2.0, 2.0]));
        y.sum(Kind::Double).backward();
        assert!(close(&v(&alpha.grad()), &[2.0]), "two inputs saturate");
        assert!(close(&v(&x.grad()), &[0.0, 1.0, 1.0, 0.0, 0.0]));
    }

    #[test]
    fn clipped_linear_quantization_levels() {
        let m = ClippedLinearQuantization { bits: 2, clip_val: 1.0 };
        let x = Tensor::from_slice(&[-0.5f64, 0.2, 0.5, 0.9, 3.0]);
        // scale 3: round(0.6) = 1 → 1/3; round(1.5) = 2 (half to even) → 2/3; round(2.7) = 3 → 1.
        assert!(close(&v(&m.forward(&x, &mut Forward::new(true, &[])).unwrap()), &[0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0]));
    }
}
