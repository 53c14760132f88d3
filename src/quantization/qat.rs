//! Quantization-aware training: Distiller's `QuantAwareTrainRangeLinearQuantizer`, `DorefaQuantizer`,
//! `PACTQuantizer` and `WRPNQuantizer`.
//!
//! Weights keep a full-precision copy, `float_weight`, which is the parameter the optimizer updates; the layer
//! computes with `weight = q(float_weight)` on every forward pass, and gradients reach the copy through a
//! straight-through estimator. ReLUs are replaced by clipped (DoReFa, WRPN), learned-clip (PACT) or EMA-ranged
//! (range-linear) fake quantizers.
use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;

use tch::nn::Init;
use tch::Tensor;

use super::q_utils::{fake_quantize_ste, straight_through, symmetric_params, LinearQuantMode, QParams};
use super::quantizer::{resolve_settings, ModeSpec, ModuleQuantSettings, Overrides, QBits, QuantDefaults, ReplaceFactory, Replaced};
use crate::nn::{BoxModule, Conv2d, Forward, Linear, Model, Module};
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
                let p = tch::no_grad(|| QParams::from_weight(w, bits, mode, per_channel))?;
                let (s, z) = p.along(0, w.dim(), w.kind())?;
                fake_quantize_ste(w, &s, &z)
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

    fn parts(&self) -> (&Tensor, Option<&Tensor>) {
        let any = self.layer.as_ref() as &dyn Any;
        match any.downcast_ref::<Conv2d>() {
            Some(c) => (&c.weight, c.bias.as_ref()),
            None => {
                let l = any.downcast_ref::<Linear>().expect("checked in new");
                (&l.weight, l.bias.as_ref())
            }
        }
    }

    /// The quantized weight the layer computes with.
    pub fn quantized_weight(&self) -> Result<Tensor> {
        self.weight.apply(self.parts().0)
    }
}

impl Module for FpCopyLayer {
    fn type_name(&self) -> &str {
        self.layer.type_name()
    }
    fn forward(&self, x: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let (w, b) = self.parts();
        let wq = self.weight.apply(w)?;
        let bq = match (b, &self.bias) {
            (Some(b), Some(q)) => Some(q.apply(b)?),
            (Some(b), None) => Some(b.shallow_clone()),
            (None, _) => None,
        };
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
        let (w, b) = self.parts();
        let mut p = vec![("float_weight", w)];
        p.extend(b.map(|b| (if self.bias.is_some() { "float_bias" } else { "bias" }, b)));
        p
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
    fn extra_repr(&self) -> String {
        format!("num_bits={}, clip_val={:.4}", self.bits, self.clip_val.f_double_value(&[0]).unwrap_or(f64::NAN))
    }
}

/// Range-linear activation fake quantization with EMA-tracked ranges (Distiller's `FakeLinearQuantization`
/// inside a `FakeQuantizationWrapper`): the wrapped module runs, then its output is clamped to the tracked range
/// and quantized.
#[derive(Debug)]
pub struct FakeQuantizationWrapper {
    wrapped: BoxModule,
    bits: u32,
    mode: LinearQuantMode,
    ema_decay: f64,
    state: Mutex<EmaState>,
}

#[derive(Debug, Default, Clone)]
struct EmaState {
    iter: i32,
    min_biased: f64,
    max_biased: f64,
    min: f64,
    max: f64,
}

impl FakeQuantizationWrapper {
    /// Wraps `wrapped` (a ReLU) with `bits`-bit fake quantization of its output.
    pub fn new(wrapped: BoxModule, bits: u32, mode: LinearQuantMode, ema_decay: f64) -> Self {
        FakeQuantizationWrapper { wrapped, bits, mode, ema_decay, state: Mutex::new(EmaState::default()) }
    }

    /// The tracked (bias-corrected) range.
    pub fn tracked_range(&self) -> (f64, f64) {
        self.state.lock().map(|s| (s.min, s.max)).unwrap_or((0.0, 0.0))
    }
}

impl Module for FakeQuantizationWrapper {
    fn type_name(&self) -> &str {
        "FakeQuantizationWrapper"
    }
    fn forward(&self, x: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let y = ctx.call("wrapped_module", self.wrapped.as_ref(), x)?;
        let mut st = self.state.lock().map_err(|_| Error::invalid("fake quantization", "state poisoned"))?;
        if ctx.is_training() {
            let (lo, hi) = (y.f_min()?.f_double_value(&[])?, y.f_max()?.f_double_value(&[])?);
            st.iter += 1;
            let d = self.ema_decay;
            st.min_biased = st.min_biased * d + (1.0 - d) * lo;
            st.max_biased = st.max_biased * d + (1.0 - d) * hi;
            let correction = 1.0 - d.powi(st.iter);
            st.min = st.min_biased / correction;
            st.max = st.max_biased / correction;
        }
        if st.iter == 0 {
            return Ok(y);
        }
        let (lo, hi) = if self.mode.symmetric() {
            let m = st.min.abs().max(st.max.abs());
            (-m, m)
        } else {
            (st.min, st.max)
        };
        let p = QParams::from_stats(
            &super::q_utils::RangeStats { min: lo, max: hi, avg_min: lo, avg_max: hi, mean: 0.0, std: 0.0, b: 0.0 },
            self.bits,
            self.mode,
            super::q_utils::ClipMode::None,
            false,
        )?;
        let (s, z) = (p.scale.f_to_kind(y.kind())?, p.zero_point.f_to_kind(y.kind())?);
        fake_quantize_ste(&y.f_clamp(lo, hi)?, &s, &z)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("wrapped_module", self.wrapped.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("wrapped_module", &mut self.wrapped)]
    }
    fn extra_repr(&self) -> String {
        format!("num_bits={}, mode={:?}, ema_decay={}", self.bits, self.mode, self.ema_decay)
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
        let mode = match &self.method {
            QatMethod::RangeLinear { mode, .. } => *mode,
            _ => ModeSpec::both(LinearQuantMode::Symmetric),
        };
        let defaults = QuantDefaults { bits: self.bits, mode, clip_acts: super::q_utils::ClipMode::None, per_channel_wts: false };
        let settings = resolve_settings(model, &defaults, &self.overrides)?;
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
            Ok(match &self.method {
                QatMethod::Dorefa | QatMethod::Wrpn => Box::new(ClippedLinearQuantization { bits, clip_val: 1.0 }),
                QatMethod::Pact { .. } => match alphas.borrow_mut().remove(name) {
                    Some(clip_val) => Box::new(LearnedClippedLinearQuantization { bits, clip_val }),
                    None => return Err((m, Error::invalid("PACT", format!("no clipping value was created for {name}")))),
                },
                QatMethod::RangeLinear { .. } => Box::new(FakeQuantizationWrapper::new(m, bits, s.mode.activations, ema_decay)),
            })
        };
        let factory = ReplaceFactory::default().with("Conv2d", layer).with("Linear", layer).with("ReLU", relu);
        let replaced = factory.prepare(model, &settings, self.method.class_name())?;
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
