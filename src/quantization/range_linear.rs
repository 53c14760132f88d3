//! Post-training range-linear quantization (Distiller's `PostTrainLinearQuantizer`): Conv/Linear layers run in
//! simulated integer arithmetic with requantization, element-wise adds rescale their integer inputs to the output
//! scale, and every other leaf quantizes its output ("fake" quantization). Ranges come from calibration
//! statistics (static) or from each batch (dynamic).
//!
//! As in Distiller, a quantized module's output carries the parameters it was quantized with to the next module
//! (attached to the tensor through [`Forward::annotate`]); a module whose input does not come straight from a
//! quantized module (the model's input, or after a reshape) quantizes it by its `input_overrides`, or with its
//! output's settings when `inputs_quant_auto_fallback` is on (the default).
use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::q_utils::{approx_scale_as_mult_and_shift, quantized_range, ClipMode, Histogram, LinearQuantMode, QParams, RangeStats};
use super::quantizer::{resolve_settings, InputOverride, ModeSpec, ModuleQuantSettings, Overrides, QBits, QuantDefaults, ReplaceFactory, Replaced, POST_TRAIN_OVERRIDE_KEYS};
use super::stats::{ActivationStats, ModuleStats, TensorStats};
use crate::nn::{BoxModule, Conv2d, Forward, Linear, Model, Module, Rollback};
use crate::{Error, Result};

/// The child `wrapped_module` of a wrapper that holds the module it replaced in its field `wrapped`.
macro_rules! wraps_one_module {
    () => {
        fn children(&self) -> Vec<(&str, &dyn Module)> {
            vec![("wrapped_module", self.wrapped.as_ref())]
        }
        fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
            vec![("wrapped_module", &mut self.wrapped)]
        }
        fn take_replaced(&mut self) -> Option<BoxModule> {
            Some(std::mem::replace(&mut self.wrapped, Box::new(crate::nn::Identity)))
        }
    };
}

/// How one activation tensor (a module's output, or one of its inputs) is quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActSettings {
    /// Bits.
    pub bits: u32,
    /// Mode.
    pub mode: LinearQuantMode,
    /// Clipping of the range.
    pub clip: ClipMode,
    /// The tensor is known non-negative (a fused ReLU): the range starts at 0 (Distiller's `clip_half_range`).
    pub half_range: bool,
}

impl ActSettings {
    /// `bits`-bit `mode` quantization of the full range.
    pub fn new(bits: u32, mode: LinearQuantMode) -> Self {
        ActSettings { bits, mode, clip: ClipMode::None, half_range: false }
    }
}

/// How a wrapper quantizes its activations: its output's settings and calibration statistics, and how inputs
/// that arrive without quantization parameters are quantized.
#[derive(Debug, Clone)]
pub struct ActQuant {
    /// The output's settings.
    pub output: ActSettings,
    /// Calibration statistics (static ranges); `None` = dynamic, from each batch.
    pub stats: Option<ModuleStats>,
    /// Settings for specific inputs (Distiller's `input_overrides`).
    pub input_overrides: BTreeMap<usize, ActSettings>,
    /// Quantize other inputs with the output's settings (Distiller's `inputs_quant_auto_fallback`); when off,
    /// such an input is an error.
    pub inputs_auto_fallback: bool,
    /// Accumulator bits (Distiller's `bits_accum`).
    pub accum_bits: u32,
    /// Approximate every scale by an integer multiplier of this many bits and a shift (Distiller's
    /// `scale_approx_mult_bits`).
    pub scale_approx_mult_bits: Option<u32>,
}

impl ActQuant {
    /// `output` settings with `stats`; inputs fall back to the output's settings, 32-bit accumulator, exact scales.
    pub fn new(output: ActSettings, stats: Option<ModuleStats>) -> Self {
        ActQuant { output, stats, input_overrides: BTreeMap::new(), inputs_auto_fallback: true, accum_bits: 32, scale_approx_mult_bits: None }
    }

    /// The parameters of a tensor with settings `s` and calibration statistics `stats`.
    fn params(&self, s: &ActSettings, stats: &TensorStats) -> Result<QParams> {
        let p = match (s.clip, &stats.histogram) {
            (ClipMode::Mse, Some(h)) => QParams::from_histogram_mse(h, (stats.range.min, stats.range.max), s.bits, s.mode)?.0,
            (ClipMode::Mse, None) => {
                return Err(Error::invalid(
                    "clip_acts",
                    "MSE clipping needs the activations' histograms, which these statistics lack (Distiller's files have none): collect them with distill (`distill quantize --calibrate N`, or `collect_activation_stats`)",
                ))
            }
            _ => QParams::from_stats(&stats.range, s.bits, s.mode, s.clip, s.half_range)?,
        };
        match self.scale_approx_mult_bits {
            Some(m) => p.approximated(m),
            None => Ok(p),
        }
    }

    /// Distiller's `_get_input_quant_metadata`: the parameters input `idx` was quantized with by the module that
    /// produced it, else its override, else (with the fallback) the output's settings without the half range.
    fn input_params(&self, idx: usize, x: &Tensor, ctx: &Forward) -> Result<QParams> {
        self.input_params_from(idx, ctx.annotation::<QParams>(x), || Ok(x.shallow_clone()))
    }

    /// The statistics of a batch's tensor `x`, for dynamic ranges (its histogram only when MSE clipping reads it).
    fn dynamic_stats(s: &ActSettings, x: &Tensor) -> Result<TensorStats> {
        let histogram = if s.clip == ClipMode::Mse { Some(Histogram::of(x)?) } else { None };
        Ok(TensorStats { range: RangeStats::of(x)?, shape: None, total_numel: None, histogram })
    }

    /// [`ActQuant::input_params`] given the parameters the input arrived with (`arrived`) and, for dynamic
    /// ranges, the input itself (`dynamic`, called only when needed).
    pub(crate) fn input_params_from(&self, idx: usize, arrived: Option<&QParams>, dynamic: impl FnOnce() -> Result<Tensor>) -> Result<QParams> {
        if let Some(p) = arrived {
            if self.input_overrides.contains_key(&idx) {
                return Err(Error::invalid(
                    "input_overrides",
                    format!("input {idx} comes quantized from the module before, which conflicts with its input override (as in Distiller); remove the override"),
                ));
            }
            return Ok(p.clone());
        }
        let settings = match self.input_overrides.get(&idx) {
            Some(s) => *s,
            None if self.inputs_auto_fallback => ActSettings { half_range: false, ..self.output },
            None => {
                return Err(Error::invalid(
                    "inputs_quant_auto_fallback",
                    format!("input {idx} does not come from a quantized module, so nothing says how to quantize it: quantize the module before it, give input_overrides for input {idx}, or set inputs_quant_auto_fallback: true"),
                ))
            }
        };
        match &self.stats {
            Some(m) => {
                let stats = m.inputs.get(&idx).ok_or_else(|| Error::invalid("model_activation_stats", format!("no statistics for input {idx} (the file has inputs {:?})", m.inputs.keys().collect::<Vec<_>>())))?;
                self.params(&settings, stats)
            }
            None => self.params(&settings, &Self::dynamic_stats(&settings, &dynamic()?)?),
        }
    }

    /// The output's parameters: from the statistics, or (dynamic) from the output `y()` computes, which static
    /// ranges never need.
    pub(crate) fn output_params(&self, y: impl FnOnce() -> Result<Tensor>) -> Result<QParams> {
        match &self.stats {
            Some(m) => self.params(&self.output, &m.output),
            None => self.params(&self.output, &Self::dynamic_stats(&self.output, &y()?)?),
        }
    }

    /// The output's parameters when they are static (from calibration statistics); `None` when they are computed
    /// from each batch.
    pub fn static_output_params(&self) -> Result<Option<QParams>> {
        match &self.stats {
            Some(m) => self.params(&self.output, &m.output).map(Some),
            None => Ok(None),
        }
    }

    fn approx(&self, scale: Tensor) -> Result<Tensor> {
        match self.scale_approx_mult_bits {
            Some(m) => approx_scale_as_mult_and_shift(&scale, m),
            None => Ok(scale),
        }
    }
}

/// Quantize-dequantize `x` with `p` (per tensor), back in `x`'s dtype.
fn quant_dequant(x: &Tensor, p: &QParams) -> Result<Tensor> {
    Ok(p.dequantize(&p.quantize(x, 0)?, 0)?.f_to_kind(x.kind())?)
}

pub(crate) fn layer_weight(m: &dyn Module) -> Option<(&Tensor, Option<&Tensor>)> {
    let any = m as &dyn Any;
    if let Some(c) = any.downcast_ref::<Conv2d>() {
        Some((&c.weight, c.bias.as_ref()))
    } else {
        any.downcast_ref::<Linear>().map(|l| (&l.weight, l.bias.as_ref()))
    }
}

/// Runs the wrapped Conv2d or Linear with other weights and bias.
pub(crate) fn layer_forward(m: &dyn Module, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let any = m as &dyn Any;
    if let Some(c) = any.downcast_ref::<Conv2d>() {
        let k = &c.config;
        Ok(x.f_conv2d(w, b, k.stride, k.padding, k.dilation, k.groups)?)
    } else {
        Ok(x.f_linear(w, b)?)
    }
}

/// How a layer's weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightSettings {
    /// Bits.
    pub bits: u32,
    /// Mode.
    pub mode: LinearQuantMode,
    /// One scale per output channel.
    pub per_channel: bool,
    /// Clipping of the weights' range (Distiller's `also_clip_weights` applies the activations' clip mode);
    /// per tensor only.
    pub clip: ClipMode,
    /// Keep the floating-point weights as the buffer `float_weight` (Distiller's `save_fp_weights`).
    pub save_fp_weights: bool,
    /// MSE-optimal clipping of the range ([`QParams::from_weight_mse`]), per channel or per tensor; exclusive with
    /// `clip`.
    pub mse: bool,
}

impl WeightSettings {
    /// `bits`-bit `mode` weights over their full range, per channel or per tensor.
    pub fn new(bits: u32, mode: LinearQuantMode, per_channel: bool) -> Self {
        WeightSettings { bits, mode, per_channel, clip: ClipMode::None, save_fp_weights: false, mse: false }
    }

    fn params(&self, w: &Tensor) -> Result<QParams> {
        match self.clip {
            ClipMode::None if self.mse => Ok(QParams::from_weight_mse(w, self.bits, self.mode, self.per_channel)?.0),
            _ if self.mse => Err(Error::invalid("clip_weights", "MSE clipping of the weights and also_clip_weights each set the weights' range: choose one")),
            ClipMode::None => QParams::from_weight(w, self.bits, self.mode, self.per_channel),
            ClipMode::Mse => Ok(QParams::from_weight_mse(w, self.bits, self.mode, self.per_channel)?.0),
            _ if self.per_channel => Err(Error::invalid(
                "also_clip_weights",
                "clipped weight ranges are per tensor (Distiller averages per-channel ranges into one for AVG and refuses N_STD); turn per_channel_wts off or also_clip_weights off",
            )),
            clip => QParams::from_stats(&RangeStats::of(w)?, self.bits, self.mode, clip, false),
        }
    }
}

/// Distiller's `RangeLinearQuantParamLayerWrapper` for Conv2d and Linear: integer weights (per tensor or per
/// output channel), an integer bias at the accumulator's scale, integer-valued accumulation, and requantization of
/// the accumulator to the output's scale. Without activation bits the weights are quantized and dequantized back
/// and the layer runs in floating point.
#[derive(Debug)]
pub struct RangeLinearQuantParamLayer {
    wrapped: BoxModule,
    w_params: QParams,
    weights: WeightSettings,
    fp_bias: Option<Tensor>,
    fp_weight: Option<Tensor>,
    acts: Option<ActQuant>,
    half_range: bool,
    /// Integer weights loaded from an export: when set, the layer computes in exact integer arithmetic
    /// (float64, whose 53-bit mantissa holds every product and sum exactly) instead of float32 simulation.
    exact_weight: Option<Tensor>,
    /// `fp_bias` was corrected ([`RangeLinearQuantParamLayer::correct_bias`]) and replaces the wrapped layer's own
    /// bias in weights-only quantization too.
    bias_corrected: bool,
}

impl RangeLinearQuantParamLayer {
    /// Quantizes the weights of `wrapped` (a Conv2d or Linear) in place to integers.
    pub fn new(wrapped: BoxModule, weights: WeightSettings, acts: Option<ActQuant>) -> std::result::Result<Self, (BoxModule, Error)> {
        let (w, b) = match layer_weight(wrapped.as_ref()) {
            Some((w, b)) => (w.shallow_clone(), b.map(|b| b.shallow_clone())),
            None => {
                let e = Error::invalid("module", format!("{} has no weight to quantize", wrapped.type_name()));
                return Err((wrapped, e));
            }
        };
        let build = || -> Result<(QParams, Option<Tensor>, Option<Tensor>)> {
            // Under no_grad: libtorch gives detach_copy of a tensor that requires grad a grad_fn that fails any
            // backward pass through it (AdaRound differentiates through the kept float weights' rounding).
            let fp_bias = tch::no_grad(|| b.as_ref().map(|b| b.f_detach_copy()).transpose())?;
            let fp_weight = if weights.save_fp_weights { Some(tch::no_grad(|| w.f_detach_copy())?) } else { None };
            let p = weights.params(&w)?;
            let q = p.quantize(&w.f_detach()?, 0)?;
            // Without activation quantization the weights are dequantized back: weights-only fake quantization.
            let stored = if acts.is_none() { p.dequantize(&q, 0)? } else { q };
            tch::no_grad(|| w.shallow_clone().f_copy_(&stored))?;
            Ok((p, fp_bias, fp_weight))
        };
        let half_range = acts.as_ref().is_some_and(|a| a.output.half_range);
        match build() {
            Ok((w_params, fp_bias, fp_weight)) => Ok(RangeLinearQuantParamLayer { wrapped, w_params, weights, fp_bias, fp_weight, acts, half_range, exact_weight: None, bias_corrected: false }),
            Err(e) => Err((wrapped, e)),
        }
    }

    /// Applies a ReLU to the output of a layer whose activations are not quantized (Distiller's
    /// `clip_half_range` on a pass-through wrapper).
    pub fn with_half_range(mut self, on: bool) -> Self {
        self.half_range = on;
        self
    }

    /// The shift of the layer's expected output that weight quantization causes, `(W_q − W)·mean` per output
    /// channel, for `mean` the layer's mean input (per input feature, or per element of a convolution's input
    /// patch). Needs the floating-point weights (`save_fp_weights`).
    pub fn weight_shift(&self, mean: &Tensor) -> Result<Tensor> {
        let fp = self.fp_weight.as_ref().ok_or_else(|| Error::invalid("save_fp_weights", "the floating-point weights were not kept: quantize with save_fp_weights: true"))?;
        let (own, _) = layer_weight(self.wrapped.as_ref()).ok_or_else(|| Error::invalid("module", "wrapped layer lost its weight"))?;
        let own = own.f_detach()?.f_to_kind(Kind::Double)?;
        // With activation quantization the layer holds integers; without, their dequantized values.
        let w_q = if self.acts.is_some() { self.w_params.dequantize(&own, 0)? } else { own };
        let out = w_q.size()[0];
        let error = w_q.f_sub(&fp.f_to_kind(Kind::Double)?)?.f_reshape([out, -1])?;
        let mean = mean.f_to_kind(Kind::Double)?;
        if mean.size() != [error.size()[1]] {
            return Err(Error::Shape(format!("a mean input of shape {:?} for a weight of {} inputs per output", mean.size(), error.size()[1])));
        }
        Ok(error.f_matmul(&mean)?)
    }

    /// Subtracts `shift` (one value per output channel) from the layer's bias, creating one if it had none.
    pub fn correct_bias(&mut self, shift: &Tensor) -> Result<()> {
        let (own, _) = layer_weight(self.wrapped.as_ref()).ok_or_else(|| Error::invalid("module", "wrapped layer lost its weight"))?;
        let (out, kind) = (own.size()[0], own.kind());
        if shift.size() != [out] {
            return Err(Error::Shape(format!("a bias correction of shape {:?} for {out} output channels", shift.size())));
        }
        let bias = match &self.fp_bias {
            Some(b) => b.f_to_kind(Kind::Double)?,
            None => Tensor::f_zeros([out], (Kind::Double, own.device()))?,
        };
        self.fp_bias = Some(bias.f_sub(&shift.f_to_kind(Kind::Double)?)?.f_to_kind(kind)?);
        self.bias_corrected = true;
        Ok(())
    }

    /// Replaces the integer weights (as [`RangeLinearQuantParamLayer::integer_weight`] gives them, without the zero
    /// point) with `q`, e.g. AdaRound's rounding of the same float weights. Each value must be an integer in the
    /// weights' range.
    pub fn set_integer_weight(&mut self, q: &Tensor) -> Result<()> {
        let (own, _) = layer_weight(self.wrapped.as_ref()).ok_or_else(|| Error::invalid("module", "wrapped layer lost its weight"))?;
        if q.size() != own.size() {
            return Err(Error::Shape(format!("integer weight {:?} does not fit the layer's {:?}", q.size(), own.size())));
        }
        let q = q.f_to_kind(Kind::Double)?;
        let (lo, hi) = self.w_params.range;
        let off_grid = q.f_sub(&q.f_round()?)?.f_abs()?.f_max()?.f_double_value(&[])?;
        let (min, max) = (q.f_min()?.f_double_value(&[])?, q.f_max()?.f_double_value(&[])?);
        if !(off_grid == 0.0 && min >= lo && max <= hi) {
            return Err(Error::invalid("integer weight", format!("values must be integers in [{lo}, {hi}]; these span [{min}, {max}] and lie up to {off_grid} off the grid")));
        }
        let stored = if self.acts.is_none() { self.w_params.dequantize(&q, 0)? } else { q };
        tch::no_grad(|| own.shallow_clone().f_copy_(&stored))?;
        Ok(())
    }

    /// Drops the kept floating-point weights (`save_fp_weights`), e.g. once bias correction has used them, so they
    /// are not saved or exported.
    pub fn discard_float_weight(&mut self) {
        self.fp_weight = None;
    }

    /// Weight scale and zero point.
    pub fn weight_params(&self) -> &QParams {
        &self.w_params
    }

    /// The integer weights (as stored, without the zero point added).
    pub fn integer_weight(&self) -> Option<Tensor> {
        layer_weight(self.wrapped.as_ref()).map(|(w, _)| w.shallow_clone())
    }

    /// The floating-point bias kept to be requantized at the accumulator's scale.
    pub fn float_bias(&self) -> Option<&Tensor> {
        self.fp_bias.as_ref()
    }

    /// The floating-point weights, when kept (`save_fp_weights`).
    pub fn float_weight(&self) -> Option<&Tensor> {
        self.fp_weight.as_ref()
    }

    /// Activation settings (None: weights-only).
    pub fn activation_quant(&self) -> Option<&ActQuant> {
        self.acts.as_ref()
    }

    /// The wrapped layer.
    pub fn wrapped(&self) -> &dyn Module {
        self.wrapped.as_ref()
    }

    /// Whether a ReLU is applied to the output (a fused ReLU, Distiller's `clip_half_range`).
    pub fn output_relu(&self) -> bool {
        self.acts.as_ref().map_or(self.half_range, |a| a.output.half_range)
    }

    /// Computes with these integer weights in exact integer arithmetic from now on (`None`: back to float32
    /// simulation with the layer's own weights).
    pub fn set_exact_weight(&mut self, w: Option<Tensor>) -> Result<()> {
        if let (Some(new), Some((own, _))) = (&w, layer_weight(self.wrapped.as_ref())) {
            if new.size() != own.size() {
                return Err(Error::Shape(format!("integer weight {:?} does not fit the layer's {:?}", new.size(), own.size())));
            }
        }
        self.exact_weight = w;
        Ok(())
    }
}

impl Module for RangeLinearQuantParamLayer {
    fn type_name(&self) -> &str {
        "RangeLinearQuantParamLayerWrapper"
    }
    fn forward(&self, x: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let Some(acts) = &self.acts else {
            let y = match (&self.fp_bias, self.bias_corrected, layer_weight(self.wrapped.as_ref())) {
                (Some(b), true, Some((w, _))) => layer_forward(self.wrapped.as_ref(), x, w, Some(b))?,
                _ => ctx.call("wrapped_module", self.wrapped.as_ref(), x)?,
            };
            return if self.half_range { Ok(y.f_relu()?) } else { Ok(y) };
        };
        if ctx.is_training() {
            return Err(Error::invalid("mode", "post-training quantized layers run in eval mode only; call model.eval()"));
        }
        let (own, _) = layer_weight(self.wrapped.as_ref()).ok_or_else(|| Error::invalid("module", "wrapped layer lost its weight"))?;
        let out_kind = x.kind();
        // Integer values up to 2^24 are exact in float32, so the convolution itself may run in float32; every
        // scaling and rounding step runs in float64.
        let (w, compute) = match &self.exact_weight {
            Some(w) => (w.shallow_clone(), Kind::Double),
            None => (own.shallow_clone(), out_kind),
        };
        let out_rank = if w.dim() == 4 { 4 } else { 2 };
        let in_p = acts.input_params(0, x, ctx)?;
        let x_q = in_p.quantize(x, 0)?.f_add(&in_p.zero_point)?;
        // Accumulator scale per output channel and the integer bias.
        let (w_s, _) = self.w_params.along(1, out_rank, Kind::Double)?;
        let accum_scale = acts.approx(w_s.f_mul(&in_p.scale.f_to_kind(Kind::Double)?)?)?;
        let (acc_lo, acc_hi) = quantized_range(acts.accum_bits, true, false);
        let b_q = match &self.fp_bias {
            Some(b) => Some(b.f_to_kind(Kind::Double)?.f_mul(&accum_scale.f_flatten(0, -1)?)?.f_round()?.f_clamp(acc_lo, acc_hi)?.f_to_kind(compute)?),
            None => None,
        };
        let w_eff = if self.weights.mode.symmetric() { w.f_to_kind(compute)? } else { w.f_to_kind(Kind::Double)?.f_add(&self.w_params.along(0, w.dim(), Kind::Double)?.1)?.f_to_kind(compute)? };
        let accum = layer_forward(self.wrapped.as_ref(), &x_q.f_to_kind(compute)?, &w_eff, b_q.as_ref())?.f_to_kind(Kind::Double)?.f_clamp(acc_lo, acc_hi)?;
        let accum = if acts.output.half_range { accum.f_relu()? } else { accum };
        // Requantize to the output's scale.
        let out_p = acts.output_params(|| Ok(accum.f_div(&accum_scale)?))?;
        let requant = acts.approx(out_p.scale.f_to_kind(Kind::Double)?.f_div(&accum_scale)?)?;
        let out_q = accum.f_mul(&requant)?.f_sub(&out_p.zero_point)?.f_round()?.f_clamp(out_p.range.0, out_p.range.1)?;
        let y = out_p.dequantize(&out_q, 0)?.f_to_kind(out_kind)?;
        ctx.annotate(&y, out_p);
        Ok(y)
    }
    fn buffers(&self) -> Vec<(&str, &Tensor)> {
        self.fp_weight.iter().map(|w| ("float_weight", w)).collect()
    }
    wraps_one_module!();
    fn extra_repr(&self) -> String {
        match &self.acts {
            Some(a) => format!("weights={:?}, activations={} bits {:?} clip={:?}", self.weights.mode, a.output.bits, a.output.mode, a.output.clip),
            None => format!("weights={:?}, activations=float", self.weights.mode),
        }
    }
}

/// Distiller's `RangeLinearQuantEltwiseAddWrapper` (static ranges only, as Distiller): inputs quantized,
/// rescaled to the output's scale, summed.
#[derive(Debug)]
pub struct RangeLinearQuantEltwiseAdd {
    wrapped: BoxModule,
    acts: ActQuant,
}

impl RangeLinearQuantEltwiseAdd {
    /// Wraps an add; refuses (handing it back) without calibration statistics, where Distiller keeps the float
    /// add.
    pub fn new(wrapped: BoxModule, acts: ActQuant) -> Replaced {
        if acts.stats.is_none() {
            let e = Error::invalid("model_activation_stats", "a quantized add needs calibration statistics (dynamic ranges are not supported, as in Distiller)");
            return Err((wrapped, e));
        }
        Ok(Box::new(RangeLinearQuantEltwiseAdd { wrapped, acts }))
    }

    /// Activation settings.
    pub fn activation_quant(&self) -> &ActQuant {
        &self.acts
    }
}

impl Module for RangeLinearQuantEltwiseAdd {
    fn type_name(&self) -> &str {
        "RangeLinearQuantEltwiseAddWrapper"
    }
    fn forward_many(&self, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
        let kind = inputs.first().map_or(Kind::Float, |x| x.kind());
        let out_p = self.acts.output_params(|| Err(Error::invalid("model_activation_stats", "a quantized add needs calibration statistics")))?;
        let (acc_lo, acc_hi) = quantized_range(self.acts.accum_bits, true, false);
        let s_y = out_p.scale.f_to_kind(Kind::Double)?;
        let mut acc: Option<Tensor> = None;
        for (i, x) in inputs.iter().enumerate() {
            let p = self.acts.input_params(i, x, ctx)?;
            let q = p.quantize(x, 0)?.f_add(&p.zero_point)?;
            let re_q = q.f_mul(&s_y.f_div(&p.scale.f_to_kind(Kind::Double)?)?)?.f_round()?.f_clamp(acc_lo, acc_hi)?;
            acc = Some(match acc {
                Some(a) => a.f_add(&re_q)?,
                None => re_q,
            });
        }
        let acc = acc.ok_or_else(|| Error::invalid("inputs", "an add needs inputs"))?;
        let acc = if self.acts.output.half_range { acc.f_relu()? } else { acc };
        let out_q = acc.f_sub(&out_p.zero_point)?.f_round()?.f_clamp(out_p.range.0, out_p.range.1)?;
        let y = out_p.dequantize(&out_q, 0)?.f_to_kind(kind)?;
        ctx.annotate(&y, out_p);
        Ok(y)
    }
    wraps_one_module!();
}

/// The dtype of `fpq_module` (16, 32 or 64 bits).
fn fp_kind(bits: u32) -> Result<Kind> {
    match bits {
        16 => Ok(Kind::Half),
        32 => Ok(Kind::Float),
        64 => Ok(Kind::Double),
        _ => Err(Error::invalid("fpq_module", format!("{bits}: must be 16, 32 or 64"))),
    }
}

/// Converts a module's parameters and buffers to `kind` in place (PyTorch's `module.to(dtype)`).
fn convert_module(m: &dyn Module, kind: Kind) -> Result<()> {
    let mut all = m.parameters();
    all.extend(m.buffers());
    tch::no_grad(|| -> Result<()> {
        for (_, t) in all {
            let converted = t.f_to_kind(kind)?;
            t.shallow_clone().set_data(&converted);
        }
        Ok(())
    })?;
    for (_, child) in m.children() {
        convert_module(child, kind)?;
    }
    Ok(())
}

fn run_in(kind: Option<Kind>, wrapped: &dyn Module, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
    match kind {
        None => ctx.call_many("wrapped_module", wrapped, inputs),
        Some(k) => {
            let cast: Vec<Tensor> = inputs.iter().map(|x| x.f_to_kind(k)).collect::<std::result::Result<_, _>>()?;
            let refs: Vec<&Tensor> = cast.iter().collect();
            ctx.call_many("wrapped_module", wrapped, &refs)
        }
    }
}

/// Distiller's `RangeLinearFakeQuantWrapper`: runs the module in floating point (float16/32/64 with
/// `fpq_module`) and quantizes its output; inputs that do not come quantized are quantized and dequantized
/// first when `quantize_inputs` is on.
#[derive(Debug)]
pub struct RangeLinearFakeQuant {
    wrapped: BoxModule,
    acts: ActQuant,
    quantize_inputs: bool,
    dtype: Option<Kind>,
}

impl RangeLinearFakeQuant {
    /// Wraps `wrapped`; with `fpq_module` the module's parameters are converted to that width.
    pub fn new(wrapped: BoxModule, acts: ActQuant, quantize_inputs: bool, fpq_module: Option<u32>) -> Replaced {
        let dtype = match fpq_module.map(fp_kind).transpose() {
            Ok(d) => d,
            Err(e) => return Err((wrapped, e)),
        };
        if let Some(k) = dtype {
            if let Err(e) = convert_module(wrapped.as_ref(), k) {
                return Err((wrapped, e));
            }
        }
        Ok(Box::new(RangeLinearFakeQuant { wrapped, acts, quantize_inputs, dtype }))
    }

    /// Activation settings.
    pub fn activation_quant(&self) -> &ActQuant {
        &self.acts
    }

    /// Whether inputs that arrive unquantized are quantized first.
    pub fn quantizes_inputs(&self) -> bool {
        self.quantize_inputs
    }

    /// The floating-point width the module runs in (`fpq_module`), if not the input's.
    pub fn dtype(&self) -> Option<Kind> {
        self.dtype
    }
}

impl Module for RangeLinearFakeQuant {
    fn type_name(&self) -> &str {
        "RangeLinearFakeQuantWrapper"
    }
    fn forward_many(&self, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
        let kind = inputs.first().map_or(Kind::Float, |x| x.kind());
        let mut prepared = Vec::with_capacity(inputs.len());
        for (i, x) in inputs.iter().enumerate() {
            if !self.quantize_inputs {
                prepared.push(x.shallow_clone());
                continue;
            }
            let arrived_quantized = ctx.annotation::<QParams>(x).is_some();
            // Checks an input override against parameters that came with the input, as Distiller does.
            let p = self.acts.input_params(i, x, ctx)?;
            prepared.push(if arrived_quantized { x.shallow_clone() } else { quant_dequant(x, &p)? });
        }
        let refs: Vec<&Tensor> = prepared.iter().collect();
        let y = run_in(self.dtype, self.wrapped.as_ref(), &refs, ctx)?.f_to_kind(kind)?;
        let y = if self.acts.output.half_range { y.f_relu()? } else { y };
        let p = self.acts.output_params(|| Ok(y.shallow_clone()))?;
        let out = quant_dequant(&y, &p)?;
        ctx.annotate(&out, p);
        Ok(out)
    }
    wraps_one_module!();
    fn extra_repr(&self) -> String {
        let a = &self.acts.output;
        format!("activations={} bits {:?} clip={:?}, quantize_inputs={}{}", a.bits, a.mode, a.clip, self.quantize_inputs, self.dtype.map(|k| format!(", dtype={k:?}")).unwrap_or_default())
    }
}

/// Distiller's `FPWrapper`: runs the module in float16, float32 or float64 and returns float32; nothing is
/// quantized (`fpq_module` without `fake`).
#[derive(Debug)]
pub struct FpWrapper {
    wrapped: BoxModule,
    dtype: Kind,
}

impl FpWrapper {
    /// Wraps `wrapped`, converting its parameters to `bits` (16, 32 or 64) bits.
    pub fn new(wrapped: BoxModule, bits: u32) -> Replaced {
        let dtype = match fp_kind(bits).and_then(|k| convert_module(wrapped.as_ref(), k).map(|_| k)) {
            Ok(k) => k,
            Err(e) => return Err((wrapped, e)),
        };
        Ok(Box::new(FpWrapper { wrapped, dtype }))
    }
}

impl Module for FpWrapper {
    fn type_name(&self) -> &str {
        "FPWrapper"
    }
    fn forward_many(&self, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
        Ok(run_in(Some(self.dtype), self.wrapped.as_ref(), inputs, ctx)?.f_to_kind(Kind::Float)?)
    }
    wraps_one_module!();
    fn extra_repr(&self) -> String {
        format!("dtype={:?}", self.dtype)
    }
}

/// Settings of [`PostTrainLinearQuantizer`] (Distiller's constructor arguments).
#[derive(Debug, Clone)]
pub struct PostTrainConfig {
    /// Activation bits (`None`: activations stay in floating point).
    pub bits_activations: Option<u32>,
    /// Weight bits (`None`: weights stay in floating point).
    pub bits_parameters: Option<u32>,
    /// Accumulator bits.
    pub bits_accum: u32,
    /// Modes.
    pub mode: ModeSpec,
    /// Activation clipping.
    pub clip_acts: ClipMode,
    /// Per-output-channel weight scales.
    pub per_channel_wts: bool,
    /// Every output known non-negative (Distiller's `clip_half_range`).
    pub clip_half_range: bool,
    /// Approximate scales by integer multipliers of this many bits and shifts.
    pub scale_approx_mult_bits: Option<u32>,
    /// Quantize an input that does not come from a quantized module with the module's output settings.
    pub inputs_quant_auto_fallback: bool,
    /// Run modules in this floating-point width (16, 32, 64): with `fake: true` overrides, quantizing their
    /// outputs; otherwise not quantized at all.
    pub fpq_module: Option<u32>,
    /// Keep each quantized layer's floating-point weights as `float_weight`.
    pub save_fp_weights: bool,
    /// Clip weight ranges with the activations' clip mode.
    pub also_clip_weights: bool,
    /// Ordered overrides.
    pub overrides: Overrides,
    /// Static ranges; `None` for dynamic quantization.
    pub stats: Option<ActivationStats>,
    /// Fold each batch norm that follows a convolution into it first (Distiller always does).
    pub fold_batch_norms: bool,
    /// Distiller's net-aware preparation (on by default, as in Distiller, which has no switch for it): a quantized
    /// module whose only consumer is a ReLU/ReLU6 absorbs it (`clip_half_range`, the ReLU made an `Identity`), and
    /// with statistics, the output range of a module whose only consumer is a ReLU, ReLU6, Tanh or Sigmoid is
    /// clipped to what that activation keeps. YAML: `net_aware: false` turns it off (distill's key).
    pub net_aware: bool,
    /// Cross-layer equalization ([`super::equalization`]) after batch-norm folding. It changes the activation
    /// ranges, so statistics must be collected after it: with `stats`, the model must already be equalized (run
    /// [`super::equalization::equalize_cross_layer`], then calibrate), else it is an error. YAML:
    /// `cross_layer_equalization: true` (distill's key).
    pub cross_layer_equalization: bool,
    /// MSE-optimal weight ranges ([`QParams::from_weight_mse`]; per channel with `per_channel_wts`). YAML:
    /// `clip_weights: MSE` (distill's key; `NONE` is the default).
    pub clip_weights_mse: bool,
    /// Bias correction ([`super::bias_correction`]) after quantizing, run by [`PostTrainLinearQuantizer::quantize`]:
    /// empirical on its calibration data, or analytical from the batch norms. YAML: `bias_correction: true` (or
    /// `empirical`) or `analytical` (distill's key).
    pub bias_correction: Option<super::bias_correction::BiasCorrection>,
    /// AdaRound ([`super::adaround`]) after quantizing, on the calibration data set of
    /// [`PostTrainLinearQuantizer::quantize`] (its first `samples`, whatever the calibration batches). YAML:
    /// `adaround: true` for the defaults, or a mapping of `AdaRound`'s fields (distill's key).
    pub adaround: Option<super::adaround::AdaRound>,
}

impl Default for PostTrainConfig {
    /// 8-bit symmetric activations and weights, 32-bit accumulator, no clipping, per-tensor, dynamic, inputs
    /// falling back to output settings (Distiller's defaults).
    fn default() -> Self {
        PostTrainConfig {
            bits_activations: Some(8),
            bits_parameters: Some(8),
            bits_accum: 32,
            mode: ModeSpec::both(LinearQuantMode::Symmetric),
            clip_acts: ClipMode::None,
            per_channel_wts: false,
            clip_half_range: false,
            scale_approx_mult_bits: None,
            inputs_quant_auto_fallback: true,
            fpq_module: None,
            save_fp_weights: false,
            also_clip_weights: false,
            overrides: Overrides::default(),
            stats: None,
            fold_batch_norms: true,
            net_aware: true,
            cross_layer_equalization: false,
            clip_weights_mse: false,
            bias_correction: None,
            adaround: None,
        }
    }
}

/// Distiller's `PostTrainLinearQuantizer`.
pub struct PostTrainLinearQuantizer {
    config: PostTrainConfig,
}

/// What [`PostTrainLinearQuantizer::prepare_model`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PtqPrepared {
    /// Modules replaced by wrappers.
    pub replaced: Vec<String>,
    /// Batch norms folded into the convolution before them, as (convolution, batch norm).
    pub folded: Vec<(String, String)>,
    /// Modules left in floating point although their settings quantize them, with the reason (an add without
    /// calibration statistics, as Distiller).
    pub kept_float: Vec<(String, String)>,
    /// ReLUs fused into the quantized module before them, as (module, ReLU); each ReLU is now an `Identity`.
    pub fused_relus: Vec<(String, String)>,
    /// Modules whose output statistics were clipped to the range of the activation after them, as (module,
    /// activation).
    pub clipped_stats: Vec<(String, String)>,
    /// Layer pairs equalized (`cross_layer_equalization`), as (first, second).
    pub equalized: Vec<(String, String)>,
}

impl PostTrainLinearQuantizer {
    /// A quantizer with `config`.
    pub fn new(config: PostTrainConfig) -> Self {
        PostTrainLinearQuantizer { config }
    }

    fn act_quant(&self, s: &ModuleQuantSettings, name: &str, stats: &Option<ActivationStats>) -> Option<ActQuant> {
        let c = &self.config;
        let bits = s.bits.acts?;
        let output = ActSettings { bits, mode: s.mode.activations, clip: s.clip_acts, half_range: s.clip_half_range };
        let input_overrides = s
            .input_overrides
            .iter()
            .map(|(i, o)| {
                let settings = match *o {
                    InputOverride::FromOutput => ActSettings { half_range: false, ..output },
                    InputOverride::Settings { bits, mode, clip } => ActSettings { bits: bits.unwrap_or(output.bits), mode: mode.unwrap_or(output.mode), clip: clip.unwrap_or(output.clip), half_range: false },
                };
                (*i, settings)
            })
            .collect();
        Some(ActQuant {
            output,
            stats: stats.as_ref().and_then(|st| st.get(name).cloned()),
            input_overrides,
            inputs_auto_fallback: c.inputs_quant_auto_fallback,
            accum_bits: s.bits_accum.unwrap_or(c.bits_accum),
            scale_approx_mult_bits: s.scale_approx_mult_bits.or(c.scale_approx_mult_bits),
        })
    }

    /// Distiller's `replace_param_layer`, `replace_non_param_layer` and `replace_fake_quant` in one: which
    /// wrapper a module gets.
    fn replace(&self, m: BoxModule, name: &str, s: &ModuleQuantSettings, stats: &Option<ActivationStats>, kept: &RefCell<Vec<(String, String)>>) -> Replaced {
        let c = &self.config;
        let type_name = m.type_name().to_string();
        let fpq = s.fpq_module.or(c.fpq_module);
        let refuse = |m: BoxModule, key: &str, msg: String| -> Replaced { Err((m, Error::invalid(key, format!("{name}: {msg}")))) };
        let is_layer = matches!(type_name.as_str(), "Conv2d" | "Linear");
        let acts = self.act_quant(s, name, stats);
        if !is_layer && type_name != "EltwiseAdd" {
            // Every other leaf: fake quantization of its output.
            if !s.fake.unwrap_or(true) {
                return match fpq {
                    Some(bits) => FpWrapper::new(m, bits),
                    None => refuse(m, "fake", "fake: false leaves a module unquantized only together with fpq_module (Distiller's FPWrapper)".into()),
                };
            }
            let Some(mut acts) = acts else { return Ok(m) };
            if type_name == "ReLU" {
                // Distiller: a ReLU's output is non-negative; ACIQ clipping reads the statistics before the ReLU.
                acts.output.half_range = true;
                if let (ClipMode::Gauss | ClipMode::Laplace, Some(st)) = (acts.output.clip, acts.stats.as_mut()) {
                    if let Some(input) = st.inputs.get(&0).map(|t| t.range) {
                        let out = &mut st.output.range;
                        (out.mean, out.std, out.b) = (input.mean, input.std, input.b);
                    }
                }
            }
            return RangeLinearFakeQuant::new(m, acts, s.quantize_inputs.unwrap_or(true), fpq);
        }
        if s.quantize_inputs.is_some() {
            return refuse(m, "quantize_inputs", format!("quantize_inputs applies to fake-quantized modules, not to a {type_name} (Distiller refuses it too)"));
        }
        if let (Some(bits), false) = (fpq, s.fake == Some(true)) {
            return FpWrapper::new(m, bits);
        }
        // Quantizing only the activations of a layer is fake quantization.
        let fake = s.fake == Some(true) || is_layer && s.bits.acts.is_some() && s.bits.wts.is_none();
        if fake {
            let Some(acts) = acts else { return Ok(m) };
            return RangeLinearFakeQuant::new(m, acts, false, fpq);
        }
        if is_layer {
            let Some(bits) = s.bits.wts else { return Ok(m) };
            let weights = WeightSettings {
                bits,
                mode: s.mode.weights,
                per_channel: s.per_channel_wts,
                clip: if c.also_clip_weights { s.clip_acts } else { ClipMode::None },
                save_fp_weights: c.save_fp_weights,
                mse: c.clip_weights_mse,
            };
            return RangeLinearQuantParamLayer::new(m, weights, acts).map(|l| Box::new(l.with_half_range(s.clip_half_range)) as BoxModule);
        }
        let Some(acts) = acts else { return Ok(m) };
        match RangeLinearQuantEltwiseAdd::new(m, acts) {
            Ok(w) => Ok(w),
            Err((m, e)) => {
                kept.borrow_mut().push((name.to_string(), e.to_string()));
                Ok(m)
            }
        }
    }

    /// Replaces `model`'s modules by quantized wrappers (names kept) and quantizes its weights in place; the model
    /// is then for evaluation only. All or nothing: on any error the model is left exactly as it was.
    pub fn prepare_model(&self, model: &mut Model) -> Result<PtqPrepared> {
        let c = &self.config;
        if let Some(step) = c.after_quantizing() {
            let key = step.key();
            return Err(Error::invalid(key, "runs after quantizing, on calibration data or the float model's batch norms, which prepare_model does not take: use PostTrainLinearQuantizer::quantize"));
        }
        Rollback::transaction(model, |model, rollback| self.prepare_steps(model, rollback))
    }

    /// The configuration.
    pub fn config(&self) -> &PostTrainConfig {
        &self.config
    }

    /// Every module's settings (name, type, settings) as [`prepare_model`](Self::prepare_model) resolves them from
    /// the configuration's defaults and overrides; every override must match a module.
    pub fn resolved_settings(&self, model: &Model) -> Result<Vec<(String, String, ModuleQuantSettings)>> {
        let c = &self.config;
        let defaults = QuantDefaults {
            bits: QBits { acts: c.bits_activations, wts: c.bits_parameters, bias: c.bits_parameters.map(|_| 32) },
            mode: c.mode,
            clip_acts: c.clip_acts,
            per_channel_wts: c.per_channel_wts,
            clip_half_range: c.clip_half_range,
        };
        resolve_settings(model, &defaults, &c.overrides, POST_TRAIN_OVERRIDE_KEYS)
    }

    /// [`prepare_model`](Self::prepare_model)'s work, recording its changes in `rollback`.
    pub(crate) fn prepare_steps(&self, model: &mut Model, rollback: &mut Rollback) -> Result<PtqPrepared> {
        let c = &self.config;
        if let Some(st) = &c.stats {
            st.check_model(model)?;
        }
        // Settings are resolved (and every override checked) before anything changes.
        let mut settings = self.resolved_settings(model)?;
        let mut stats = c.stats.clone();
        let mut folded = Vec::new();
        if c.fold_batch_norms {
            for (conv, bn) in super::bn_fold::fold_batch_norms_recorded(model, rollback)? {
                // The folded convolution now produces what the batch norm produced.
                if let Some(st) = stats.as_mut() {
                    let bn_out = st.get(&bn).map(|s| s.output.clone());
                    if let (Some(out), Some(entry)) = (bn_out, st.get_mut(&conv)) {
                        entry.output = out;
                    }
                }
                // The batch norm is an Identity now, which Distiller leaves unwrapped: wrapping it would quantize
                // the convolution's output a second time, with the batch norm's unclipped range.
                if let Some((_, type_name, _)) = settings.iter_mut().find(|(n, ..)| *n == bn) {
                    *type_name = "Identity".into();
                }
                folded.push((conv, bn));
            }
        }
        let mut equalized = Vec::new();
        if c.cross_layer_equalization {
            let eq = super::equalization::equalize_cross_layer(model)?;
            eq.check_statistics_still_valid(
                stats.is_some(),
                "equalize the model (distill::quantization::equalization::equalize_cross_layer, or `distill quantize --calibrate N`, which equalizes before calibrating), then calibrate",
            )?;
            equalized = eq.pairs.into_iter().map(|p| (p.first, p.second)).collect();
        }
        let (mut clipped_stats, mut fusing) = (Vec::new(), Vec::new());
        if c.net_aware {
            let quantized = |name: &str| settings.iter().any(|(n, _, s)| n == name && (s.bits.acts.is_some() || s.bits.wts.is_some()));
            let followed: Vec<_> = super::net_aware::activations_after_modules(model)?.into_iter().filter(|a| quantized(&a.module)).collect();
            for after in followed {
                if let Some(st) = stats.as_mut() {
                    if let Some(entry) = st.get_mut(&after.module) {
                        let (lo, hi) = after.kept_range();
                        super::net_aware::clip_stats(&mut entry.output.range, lo, hi);
                        let clipped = entry.output.clone();
                        if let Some(activation) = st.get_mut(&after.activation) {
                            activation.inputs.insert(0, clipped);
                        }
                        clipped_stats.push((after.module.clone(), after.activation.clone()));
                    }
                }
                if after.fuses() {
                    if let Some((.., s)) = settings.iter_mut().find(|(n, ..)| *n == after.module) {
                        s.clip_half_range = true;
                    }
                    fusing.push((after.module, after.activation));
                }
            }
        }
        let stats = &stats;
        let kept = RefCell::new(Vec::new());
        let replace = |m: BoxModule, name: &str, s: &ModuleQuantSettings| -> Replaced { self.replace(m, name, s, stats, &kept) };
        let factory = ReplaceFactory::default().with_default(replace).keeping("Dropout").keeping("Identity");
        let replaced = factory.prepare(model, &settings, rollback)?;
        drop(factory);
        // A fused ReLU goes once the module before it is wrapped (a module kept in float still needs it).
        let mut fused_relus = Vec::new();
        for (module, relu) in fusing {
            if crate::graph::is_wrapper(model.module(&module)?) {
                let original = model.replace_module(&relu, crate::nn::Identity)?;
                rollback.swapped(&relu, original);
                fused_relus.push((module, relu));
            }
        }
        model.eval();
        Ok(PtqPrepared { replaced, folded, kept_float: kept.into_inner(), fused_relus, clipped_stats, equalized })
    }
}

/// The pipeline step that runs on the quantized model, after the quantizer ([`PostTrainConfig::after_quantizing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterQuantizing {
    AdaRound,
    BiasCorrection(super::bias_correction::BiasCorrection),
}

impl AfterQuantizing {
    /// The YAML key that asks for it.
    pub(crate) fn key(self) -> &'static str {
        match self {
            AfterQuantizing::AdaRound => "adaround",
            AfterQuantizing::BiasCorrection(_) => "bias_correction",
        }
    }

    /// Whether it fits the model to calibration data (analytical bias correction reads the batch norms instead).
    pub(crate) fn needs_data(self) -> bool {
        self != AfterQuantizing::BiasCorrection(super::bias_correction::BiasCorrection::Analytical)
    }
}

impl PostTrainConfig {
    /// The step asked for after quantizing: AdaRound, else bias correction (asking for both is refused where the
    /// configuration is checked).
    pub(crate) fn after_quantizing(&self) -> Option<AfterQuantizing> {
        match (self.adaround.is_some(), self.bias_correction) {
            (true, _) => Some(AfterQuantizing::AdaRound),
            (false, Some(kind)) => Some(AfterQuantizing::BiasCorrection(kind)),
            (false, None) => None,
        }
    }

    /// From a schedule file whose `quantizers:` section holds exactly one `PostTrainLinearQuantizer`.
    pub fn from_schedule_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_schedule(&crate::config::Schedule::from_file(path)?, &path.display().to_string(), path.parent().unwrap_or(std::path::Path::new(".")))
    }

    /// From schedule text (named `name` in messages) whose `quantizers:` section holds exactly one
    /// `PostTrainLinearQuantizer`; a statistics path in it is read relative to the working directory.
    ///
    /// ```
    /// let config = distill::quantization::range_linear::PostTrainConfig::from_yaml_str(
    ///     "quantizers:\n  q:\n    class: PostTrainLinearQuantizer\n    bits_parameters: 4\n    clip_acts: MSE\n",
    ///     "ptq.yaml",
    /// )?;
    /// assert_eq!(config.bits_parameters, Some(4));
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn from_yaml_str(text: &str, name: &str) -> Result<Self> {
        Self::from_schedule(&crate::config::Schedule::from_yaml_str(text, name)?, name, std::path::Path::new("."))
    }

    fn from_schedule(schedule: &crate::config::Schedule, name: &str, base_dir: &std::path::Path) -> Result<Self> {
        match schedule.quantizers.as_slice() {
            [(_, crate::config::QuantizerConfig::PostTrainLinearQuantizer(p))] => Self::from_params(p, base_dir),
            _ => Err(Error::invalid("quantizers", format!("{name} must define exactly one PostTrainLinearQuantizer in its quantizers section"))),
        }
    }

    /// From a schedule's `PostTrainLinearQuantizer` entry. A `model_activation_stats` path is read relative to
    /// `base_dir` (the schedule's folder).
    pub fn from_params(p: &crate::config::components::PostTrainParams, base_dir: &std::path::Path) -> Result<Self> {
        let defaults = PostTrainConfig::default();
        // Absent: Distiller's default (8); `null` (or 0, as Distiller's command line): floating point.
        let bits = |b: Option<Option<u32>>, default: Option<u32>, name: &str| -> Result<Option<u32>> {
            match b {
                None => Ok(default),
                Some(None) | Some(Some(0)) => Ok(None),
                Some(Some(b)) => super::q_utils::check_bits(name, b).map(|_| Some(b)),
            }
        };
        let stats = match &p.model_activation_stats {
            None | Some(serde_yaml::Value::Null) => None,
            Some(serde_yaml::Value::String(path)) => Some(ActivationStats::from_yaml_file(base_dir.join(path))?),
            Some(other) => Some(ActivationStats::from_value(other)?),
        };
        p.check().map_err(|(_, e)| e)?;
        let bits_accum = match p.bits_accum {
            Some(b) => super::q_utils::check_bits("bits_accum", b).map(|_| b)?,
            None => defaults.bits_accum,
        };
        if let Some(m) = p.scale_approx_mult_bits {
            super::q_utils::check_bits("scale_approx_mult_bits", m)?;
        }
        Ok(PostTrainConfig {
            bits_activations: bits(p.bits_activations, defaults.bits_activations, "bits_activations")?,
            bits_parameters: bits(p.bits_parameters, defaults.bits_parameters, "bits_parameters")?,
            bits_accum,
            mode: match &p.mode {
                Some(m) => ModeSpec::from_yaml(m)?,
                None => defaults.mode,
            },
            clip_acts: match &p.clip_acts {
                Some(c) => ClipMode::parse(c, p.clip_n_stds)?,
                None => defaults.clip_acts,
            },
            per_channel_wts: p.per_channel_wts.unwrap_or(false),
            clip_half_range: p.clip_half_range.unwrap_or(false),
            scale_approx_mult_bits: p.scale_approx_mult_bits,
            inputs_quant_auto_fallback: p.inputs_quant_auto_fallback.unwrap_or(true),
            fpq_module: match (p.fpq_module, p.fp16) {
                (Some(b), _) => Some(b),
                (None, Some(true)) => Some(16),
                _ => None,
            },
            save_fp_weights: p.save_fp_weights.unwrap_or(false),
            also_clip_weights: p.also_clip_weights.unwrap_or(false),
            overrides: match &p.overrides {
                Some(o) => Overrides::from_mapping(o)?,
                None => Overrides::default(),
            },
            stats,
            fold_batch_norms: true,
            net_aware: p.net_aware.unwrap_or(true),
            cross_layer_equalization: p.cross_layer_equalization.unwrap_or(false),
            // `check` above accepted NONE and MSE only.
            clip_weights_mse: p.clip_weights.as_deref().is_some_and(|c| c.eq_ignore_ascii_case("MSE")),
            bias_correction: match &p.bias_correction {
                Some(v) => super::bias_correction::BiasCorrection::from_yaml(v)?,
                None => None,
            },
            adaround: match &p.adaround {
                Some(v) => super::adaround::AdaRound::from_yaml(v)?,
                None => None,
            },
        })
    }
}
