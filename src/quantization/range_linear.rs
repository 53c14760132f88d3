//! Post-training range-linear quantization (Distiller's `PostTrainLinearQuantizer`): Conv/Linear layers run in
//! simulated integer arithmetic with requantization, element-wise adds rescale their integer inputs to the output
//! scale, and every other leaf quantizes its output ("fake" quantization). Ranges come from calibration
//! statistics (static) or from each batch (dynamic).
use std::any::Any;

use tch::Tensor;

use super::q_utils::{linear_dequantize, linear_quantize_clamp, quantized_range, ClipMode, LinearQuantMode, QParams, RangeStats};
use super::quantizer::{resolve_settings, ModeSpec, ModuleQuantSettings, Overrides, QBits, QuantDefaults, ReplaceFactory, Replaced};
use super::stats::{ActivationStats, ModuleStats};
use crate::nn::{BoxModule, Conv2d, Forward, Linear, Model, Module};
use crate::{Error, Result};

/// How one wrapper quantizes activations.
#[derive(Debug, Clone)]
pub struct ActQuant {
    /// Bits of activations.
    pub bits: u32,
    /// Mode of activations.
    pub mode: LinearQuantMode,
    /// Clipping.
    pub clip: ClipMode,
    /// Output known non-negative.
    pub half_range: bool,
    /// Calibration statistics (static ranges); `None` = dynamic, from each batch.
    pub stats: Option<ModuleStats>,
}

impl ActQuant {
    fn params_for(&self, stats: Option<&RangeStats>, x: &Tensor) -> Result<QParams> {
        let dynamic;
        let s = match stats {
            Some(s) => s,
            None => {
                dynamic = RangeStats::of(x)?;
                &dynamic
            }
        };
        QParams::from_stats(s, self.bits, self.mode, self.clip, self.half_range)
    }

    fn input_params(&self, index: usize, x: &Tensor) -> Result<QParams> {
        let s = self.stats.as_ref().and_then(|m| m.inputs.get(&index).or(Some(&m.output)).map(|t| &t.range));
        self.params_for(s, x)
    }

    fn output_params(&self, y: &Tensor) -> Result<QParams> {
        self.params_for(self.stats.as_ref().map(|m| &m.output.range), y)
    }
}

/// Quantize-dequantize `x` with `p` (per tensor).
fn quant_dequant(x: &Tensor, p: &QParams) -> Result<Tensor> {
    let (s, z) = (p.scale.f_to_kind(x.kind())?, p.zero_point.f_to_kind(x.kind())?);
    linear_dequantize(&linear_quantize_clamp(x, &s, &z, p.range.0, p.range.1)?, &s, &z)
}

fn layer_weight(m: &dyn Module) -> Option<(&Tensor, Option<&Tensor>)> {
    let any = m as &dyn Any;
    if let Some(c) = any.downcast_ref::<Conv2d>() {
        Some((&c.weight, c.bias.as_ref()))
    } else {
        any.downcast_ref::<Linear>().map(|l| (&l.weight, l.bias.as_ref()))
    }
}

/// Runs the wrapped Conv2d or Linear with other weights and bias.
fn layer_forward(m: &dyn Module, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let any = m as &dyn Any;
    if let Some(c) = any.downcast_ref::<Conv2d>() {
        let k = &c.config;
        Ok(x.f_conv2d(w, b, k.stride, k.padding, k.dilation, k.groups)?)
    } else {
        Ok(x.f_linear(w, b)?)
    }
}

/// Distiller's `RangeLinearQuantParamLayerWrapper` for Conv2d and Linear: integer weights (per tensor or per
/// output channel), an integer bias at the accumulator's scale, integer-valued accumulation, and requantization of
/// the accumulator to the output's scale.
#[derive(Debug)]
pub struct RangeLinearQuantParamLayer {
    wrapped: BoxModule,
    w_params: QParams,
    weight_mode: LinearQuantMode,
    fp_bias: Option<Tensor>,
    acts: Option<ActQuant>,
    accum_bits: u32,
    /// Integer weights loaded from an export: when set, the layer computes in exact integer arithmetic
    /// (float64, whose 53-bit mantissa holds every product and sum exactly) instead of float32 simulation.
    exact_weight: Option<Tensor>,
}

impl RangeLinearQuantParamLayer {
    /// Quantizes the weights of `wrapped` (a Conv2d or Linear) in place to integers.
    pub fn new(wrapped: BoxModule, bits_weights: u32, weight_mode: LinearQuantMode, per_channel: bool, acts: Option<ActQuant>) -> std::result::Result<Self, (BoxModule, Error)> {
        let (w, b) = match layer_weight(wrapped.as_ref()) {
            Some((w, b)) => (w.shallow_clone(), b.map(|b| b.shallow_clone())),
            None => {
                let e = Error::invalid("module", format!("{} has no weight to quantize", wrapped.type_name()));
                return Err((wrapped, e));
            }
        };
        let build = || -> Result<(QParams, Option<Tensor>)> {
            let fp_bias = b.as_ref().map(|b| b.f_detach_copy()).transpose()?;
            let p = QParams::from_weight(&w, bits_weights, weight_mode, per_channel)?;
            let (s, z) = p.along(0, w.dim(), w.kind())?;
            let q = linear_quantize_clamp(&w.f_detach()?, &s, &z, p.range.0, p.range.1)?;
            tch::no_grad(|| w.shallow_clone().f_copy_(&q))?;
            // Without activation quantization the weights are dequantized back: weights-only fake quantization.
            if acts.is_none() {
                let dq = linear_dequantize(&q, &s, &z)?;
                tch::no_grad(|| w.shallow_clone().f_copy_(&dq))?;
            }
            Ok((p, fp_bias))
        };
        match build() {
            Ok((w_params, fp_bias)) => Ok(RangeLinearQuantParamLayer { wrapped, w_params, weight_mode, fp_bias, acts, accum_bits: 32, exact_weight: None }),
            Err(e) => Err((wrapped, e)),
        }
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

    /// Activation settings (None: weights-only).
    pub fn activation_quant(&self) -> Option<&ActQuant> {
        self.acts.as_ref()
    }

    /// The wrapped layer.
    pub fn wrapped(&self) -> &dyn Module {
        self.wrapped.as_ref()
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
            return ctx.call("wrapped_module", self.wrapped.as_ref(), x);
        };
        if ctx.is_training() {
            return Err(Error::invalid("mode", "post-training quantized layers run in eval mode only; call model.eval()"));
        }
        let (own, _) = layer_weight(self.wrapped.as_ref()).ok_or_else(|| Error::invalid("module", "wrapped layer lost its weight"))?;
        let out_kind = x.kind();
        let (w, x, kind) = match &self.exact_weight {
            Some(w) => (w.f_to_kind(tch::Kind::Double)?, x.f_to_kind(tch::Kind::Double)?, tch::Kind::Double),
            None => (own.shallow_clone(), x.shallow_clone(), out_kind),
        };
        let x = &x;
        let out_rank = if w.dim() == 4 { 4 } else { 2 };
        // Input.
        let in_p = acts.input_params(0, x)?;
        let (s_x, z_x) = (in_p.scale.f_to_kind(kind)?, in_p.zero_point.f_to_kind(kind)?);
        let x_q = linear_quantize_clamp(x, &s_x, &z_x, in_p.range.0, in_p.range.1)?;
        // Accumulator scale per output channel and the integer bias.
        let (w_s, w_z) = self.w_params.along(1, out_rank, kind)?;
        let accum_scale = w_s.f_mul(&s_x)?;
        let (acc_lo, acc_hi) = quantized_range(self.accum_bits, true, false);
        let b_q = match &self.fp_bias {
            Some(b) => Some(b.f_to_kind(kind)?.f_mul(&accum_scale.f_flatten(0, -1)?)?.f_round()?.f_clamp(acc_lo, acc_hi)?),
            None => None,
        };
        let w_eff = if self.weight_mode.symmetric() { w.shallow_clone() } else { w.f_add(&self.w_params.along(0, w.dim(), kind)?.1)? };
        let _ = w_z;
        let accum = layer_forward(self.wrapped.as_ref(), &x_q.f_add(&z_x)?, &w_eff, b_q.as_ref())?.f_clamp(acc_lo, acc_hi)?;
        let accum = if acts.half_range { accum.f_relu()? } else { accum };
        // Requantize to the output's scale.
        let out_p = acts.output_params(&accum.f_div(&accum_scale)?)?;
        let (s_y, z_y) = (out_p.scale.f_to_kind(kind)?, out_p.zero_point.f_to_kind(kind)?);
        let requant = s_y.f_div(&accum_scale)?;
        let out_q = accum.f_mul(&requant)?.f_sub(&z_y)?.f_round()?.f_clamp(out_p.range.0, out_p.range.1)?;
        Ok(linear_dequantize(&out_q, &s_y, &z_y)?.f_to_kind(out_kind)?)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("wrapped_module", self.wrapped.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("wrapped_module", &mut self.wrapped)]
    }
    fn extra_repr(&self) -> String {
        match &self.acts {
            Some(a) => format!("weights={:?}, activations={} bits {:?} clip={:?}", self.weight_mode, a.bits, a.mode, a.clip),
            None => format!("weights={:?}, activations=float", self.weight_mode),
        }
    }
}

/// Distiller's `RangeLinearQuantEltwiseAddWrapper`: inputs quantized, rescaled to the output's scale, summed.
#[derive(Debug)]
pub struct RangeLinearQuantEltwiseAdd {
    wrapped: BoxModule,
    acts: ActQuant,
}

impl Module for RangeLinearQuantEltwiseAdd {
    fn type_name(&self) -> &str {
        "RangeLinearQuantEltwiseAddWrapper"
    }
    fn forward_many(&self, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
        let fp = ctx.call_many("wrapped_module", self.wrapped.as_ref(), inputs)?;
        let out_p = self.acts.output_params(&fp)?;
        let kind = fp.kind();
        let (s_y, z_y) = (out_p.scale.f_to_kind(kind)?, out_p.zero_point.f_to_kind(kind)?);
        let mut acc = fp.f_zeros_like()?;
        for (i, x) in inputs.iter().enumerate() {
            let p = self.acts.input_params(i, x)?;
            let (s, z) = (p.scale.f_to_kind(kind)?, p.zero_point.f_to_kind(kind)?);
            let q = linear_quantize_clamp(x, &s, &z, p.range.0, p.range.1)?;
            acc = acc.f_add(&q.f_add(&z)?.f_mul(&s_y.f_div(&s)?)?.f_round()?)?;
        }
        let out_q = acc.f_sub(&z_y)?.f_round()?.f_clamp(out_p.range.0, out_p.range.1)?;
        linear_dequantize(&out_q, &s_y, &z_y)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("wrapped_module", self.wrapped.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("wrapped_module", &mut self.wrapped)]
    }
}

/// Distiller's `RangeLinearFakeQuantWrapper`: runs the module in floating point and quantizes its output.
#[derive(Debug)]
pub struct RangeLinearFakeQuant {
    wrapped: BoxModule,
    acts: ActQuant,
}

impl Module for RangeLinearFakeQuant {
    fn type_name(&self) -> &str {
        "RangeLinearFakeQuantWrapper"
    }
    fn forward_many(&self, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
        let y = ctx.call_many("wrapped_module", self.wrapped.as_ref(), inputs)?;
        quant_dequant(&y, &self.acts.output_params(&y)?)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("wrapped_module", self.wrapped.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("wrapped_module", &mut self.wrapped)]
    }
}

/// Settings of [`PostTrainLinearQuantizer`] (Distiller's constructor arguments).
#[derive(Debug, Clone)]
pub struct PostTrainConfig {
    /// Activation bits (`None`: weights only).
    pub bits_activations: Option<u32>,
    /// Weight bits.
    pub bits_parameters: Option<u32>,
    /// Modes.
    pub mode: ModeSpec,
    /// Activation clipping.
    pub clip_acts: ClipMode,
    /// Per-output-channel weight scales.
    pub per_channel_wts: bool,
    /// Ordered overrides.
    pub overrides: Overrides,
    /// Static ranges; `None` for dynamic quantization.
    pub stats: Option<ActivationStats>,
    /// Fold each batch norm that follows a convolution into it first (Distiller always does).
    pub fold_batch_norms: bool,
}

impl Default for PostTrainConfig {
    /// 8-bit symmetric activations and weights, no clipping, per-tensor, dynamic (Distiller's defaults).
    fn default() -> Self {
        PostTrainConfig {
            bits_activations: Some(8),
            bits_parameters: Some(8),
            mode: ModeSpec::both(LinearQuantMode::Symmetric),
            clip_acts: ClipMode::None,
            per_channel_wts: false,
            overrides: Overrides::default(),
            stats: None,
            fold_batch_norms: true,
        }
    }
}

/// Distiller's `PostTrainLinearQuantizer`.
pub struct PostTrainLinearQuantizer {
    config: PostTrainConfig,
}

fn act_quant(s: &ModuleQuantSettings, name: &str, stats: &Option<ActivationStats>) -> Option<ActQuant> {
    s.bits.acts.map(|bits| ActQuant {
        bits,
        mode: s.mode.activations,
        clip: s.clip_acts,
        half_range: s.clip_half_range,
        stats: stats.as_ref().and_then(|st| st.get(name).cloned()),
    })
}

fn replace_param_layer(m: BoxModule, acts: Option<ActQuant>, s: &ModuleQuantSettings) -> Replaced {
    match s.bits.wts {
        Some(bits) => RangeLinearQuantParamLayer::new(m, bits, s.mode.weights, s.per_channel_wts, acts).map(|w| Box::new(w) as BoxModule),
        None => fake_quant(m, acts),
    }
}

fn replace_add(m: BoxModule, acts: Option<ActQuant>) -> Replaced {
    match acts {
        Some(acts) => Ok(Box::new(RangeLinearQuantEltwiseAdd { wrapped: m, acts })),
        None => Ok(m),
    }
}

fn fake_quant(m: BoxModule, acts: Option<ActQuant>) -> Replaced {
    match acts {
        Some(acts) => Ok(Box::new(RangeLinearFakeQuant { wrapped: m, acts })),
        None => Ok(m),
    }
}

impl PostTrainLinearQuantizer {
    /// A quantizer with `config`.
    pub fn new(config: PostTrainConfig) -> Self {
        PostTrainLinearQuantizer { config }
    }

    /// Replaces `model`'s modules by quantized wrappers (names kept) and quantizes its weights in place; the model
    /// is then for evaluation only. Returns the names of the replaced modules.
    pub fn prepare_model(&self, model: &mut Model) -> Result<Vec<String>> {
        if let Some(st) = &self.config.stats {
            st.check_model(model)?;
        }
        let mut stats = self.config.stats.clone();
        if self.config.fold_batch_norms {
            for (conv, bn) in super::bn_fold::fold_batch_norms(model)? {
                // The folded convolution now produces what the batch norm produced.
                if let Some(st) = stats.as_mut() {
                    let bn_out = st.get(&bn).map(|s| s.output.clone());
                    if let (Some(out), Some(entry)) = (bn_out, st.modules.iter_mut().find(|(n, _)| crate::nn::normalize_name(n) == conv)) {
                        entry.1.output = out;
                    }
                }
            }
        }
        let c = &self.config;
        let defaults = QuantDefaults {
            bits: QBits { acts: c.bits_activations, wts: c.bits_parameters, bias: c.bits_parameters.map(|_| 32) },
            mode: c.mode,
            clip_acts: c.clip_acts,
            per_channel_wts: c.per_channel_wts,
        };
        let settings = resolve_settings(model, &defaults, &c.overrides)?;
        let stats = &stats;
        let factory = ReplaceFactory::default()
            .with("Conv2d", |m, name, s| replace_param_layer(m, act_quant(s, name, stats), s))
            .with("Linear", |m, name, s| replace_param_layer(m, act_quant(s, name, stats), s))
            .with("EltwiseAdd", |m, name, s| replace_add(m, act_quant(s, name, stats)))
            .with_default(|m, name, s| fake_quant(m, act_quant(s, name, stats)))
            .keeping("Dropout")
            .keeping("Identity");
        let result = factory.prepare(model, &settings, "PostTrainLinearQuantizer");
        model.eval();
        result
    }
}

impl PostTrainConfig {
    /// From a schedule's `PostTrainLinearQuantizer` entry. A `model_activation_stats` path is read relative to
    /// `base_dir` (the schedule's folder).
    pub fn from_params(p: &crate::config::components::PostTrainParams, base_dir: &std::path::Path) -> Result<Self> {
        let defaults = PostTrainConfig::default();
        let bits = |b: Option<u32>, default: Option<u32>, name: &str| -> Result<Option<u32>> {
            match b.or(default) {
                Some(0) => Ok(None),
                Some(b) => super::q_utils::check_bits(name, b).map(|_| Some(b)),
                None => Ok(None),
            }
        };
        let stats = match &p.model_activation_stats {
            None | Some(serde_yaml::Value::Null) => None,
            Some(serde_yaml::Value::String(path)) => Some(ActivationStats::from_yaml_file(base_dir.join(path))?),
            Some(other) => {
                let tmp = std::env::temp_dir().join(format!("distill-inline-stats-{}.yaml", std::process::id()));
                std::fs::write(&tmp, serde_yaml::to_string(other).map_err(|e| Error::invalid("model_activation_stats", e.to_string()))?)
                    .map_err(|e| Error::io(&tmp, e))?;
                let s = ActivationStats::from_yaml_file(&tmp);
                let _ = std::fs::remove_file(&tmp);
                Some(s?)
            }
        };
        Ok(PostTrainConfig {
            bits_activations: bits(p.bits_activations, defaults.bits_activations, "bits_activations")?,
            bits_parameters: bits(p.bits_parameters, defaults.bits_parameters, "bits_parameters")?,
            mode: match &p.mode {
                Some(m) => ModeSpec::from_yaml(m)?,
                None => defaults.mode,
            },
            clip_acts: match &p.clip_acts {
                Some(c) => ClipMode::parse(c, p.clip_n_stds)?,
                None => defaults.clip_acts,
            },
            per_channel_wts: p.per_channel_wts.unwrap_or(false),
            overrides: match &p.overrides {
                Some(o) => Overrides::from_mapping(o)?,
                None => Overrides::default(),
            },
            stats,
            fold_batch_norms: true,
        })
    }
}
