//! AdaRound (Nagel et al., 2020, "Up or down? Adaptive rounding for post-training quantization"): rounding each
//! weight to the nearest level is not what minimizes a layer's output error; AdaRound learns, layer by layer on a
//! few hundred calibration samples, whether each weight rounds down or up.
//!
//! For a layer with float weights `W` and the quantizer's scale `s` and zero point `z` (unchanged: AdaRound only
//! decides the rounding), the integer weight is `floor(W·s − z) + h(V)`, where `h(V) = clamp(σ(V)·(ζ − γ) + γ, 0,
//! 1)` is a rectified sigmoid (`ζ = 1.1`, `γ = −0.1`) of one learned value per weight. `V` starts where `h(V)` equals
//! the weight's fractional part (the float weight itself) and Adam minimizes
//!
//! `‖f(Ŵ·x̂) − f(W·x)‖² + λ·Σ (1 − |2·h(V) − 1|^β)`,
//!
//! the squared error summed over output channels and averaged over samples and positions, with `x̂` the layer's
//! input in the quantized model (every earlier layer already rounded and its activations quantized), `x` and
//! `W·x` the floating-point model's, and `f` the ReLU when the layer absorbed one (net-aware fusion), else the
//! identity (the paper's asymmetric reconstruction). The regularizer is off for the first `warm_start` part of
//! the iterations, then its `β` anneals from `beta.0` to `beta.1` on a cosine, which drives every `h(V)` to 0 or
//! 1. The final rounding is up where `h(V) ≥ 0.5`.
//!
//! Layers are taken in the order the forward pass runs them, so each one is fitted to the inputs that the already
//! rounded layers before it produce.
//!
//! ```no_run
//! use distill::quantization::adaround::AdaRound;
//! use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
//! # let (mut model, data) = (distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?, distill::data::mnist_bundled()?);
//! let float = distill::models::copy_model(&model)?; // the model as prepare_model receives it
//! let config = PostTrainConfig { bits_parameters: Some(4), per_channel_wts: true, save_fp_weights: true, ..PostTrainConfig::default() };
//! PostTrainLinearQuantizer::new(config).prepare_model(&mut model)?;
//! let layers = AdaRound::default().apply(&mut model, &float, &data.valid)?;
//! for l in &layers {
//!     println!("{}: output MSE {:.3e} rounding to nearest, {:.3e} adaptive", l.layer, l.mse_nearest, l.mse_adaround);
//! }
//! # Ok::<(), distill::Error>(())
//! ```
//!
//! Not combined with bias correction, whose shift AdaRound's objective already removes (AIMET's guidance).
use std::any::Any;
use std::sync::{Arc, Mutex};

use tch::nn::OptimizerConfig;
use tch::{Kind, Tensor};

use super::range_linear::RangeLinearQuantParamLayer;
use crate::data::{Dataset, SplitMix64};
use crate::nn::{Model, ModuleCall, Observer};
use crate::{Error, Result};

/// The rectified sigmoid's stretch: `h` reaches 0 and 1 at finite `V`, so the regularizer can settle each weight.
const ZETA: f64 = 1.1;
const GAMMA: f64 = -0.1;

/// AdaRound's settings. The defaults follow the paper and AIMET (λ 0.01, β from 20 to 2, 20% warm start) except
/// for the iterations (2,000 instead of 10,000, with a learning rate of 0.01 instead of 0.001 so the rounding still
/// settles), chosen for CPU budgets.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaRound {
    /// Calibration samples: the first `samples` of the data set, in order.
    pub samples: usize,
    /// Adam steps per layer.
    pub iterations: usize,
    /// Samples per step, drawn from the calibration samples.
    pub batch_size: usize,
    /// λ, the weight of the rounding regularizer.
    pub reg_weight: f64,
    /// β at the end of the warm start and at the last iteration.
    pub beta: (f64, f64),
    /// The part of the iterations without the regularizer, in [0, 1).
    pub warm_start: f64,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Seeds the draw of each step's samples.
    pub seed: u64,
}

impl Default for AdaRound {
    fn default() -> Self {
        AdaRound { samples: 256, iterations: 2000, batch_size: 32, reg_weight: 0.01, beta: (20.0, 2.0), warm_start: 0.2, learning_rate: 0.01, seed: 0 }
    }
}

/// What AdaRound did to one layer. The two errors are the objective's reconstruction term on all calibration
/// samples, with the same inputs `x̂`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRounding {
    /// The layer's name.
    pub layer: String,
    /// Its number of weights.
    pub weights: i64,
    /// How many of them round the other way than to nearest.
    pub flipped: i64,
    /// Output error with every weight rounded to nearest.
    pub mse_nearest: f64,
    /// Output error with AdaRound's rounding.
    pub mse_adaround: f64,
    /// Wall time spent on the layer, capturing its inputs and targets included.
    pub seconds: f64,
}

impl AdaRound {
    /// Checks the settings against a data set of `available` samples.
    fn check(&self, available: usize) -> Result<()> {
        self.validate()?;
        if available < self.samples {
            return Err(Error::invalid("samples", format!("{} calibration samples wanted but the data set holds {available}: use fewer or a larger split", self.samples)));
        }
        Ok(())
    }

    /// Checks the settings on their own (without data).
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, msg: String| Err(Error::invalid(name, msg));
        if self.batch_size == 0 {
            return bad("batch_size", "AdaRound needs at least 1 sample per step".into());
        }
        if self.samples < self.batch_size {
            return bad(
                "samples",
                format!("{} calibration samples are fewer than one step's batch of {}: AdaRound fits every weight's rounding to the layer's outputs and needs a few hundred samples (256 by default)", self.samples, self.batch_size),
            );
        }
        if self.iterations == 0 {
            return bad("iterations", "AdaRound needs at least 1 iteration per layer".into());
        }
        if !(0.0..1.0).contains(&self.warm_start) {
            return bad("warm_start", format!("{} is not in [0, 1): it is the part of the iterations without the regularizer", self.warm_start));
        }
        let (b0, b1) = self.beta;
        if !(b1.is_finite() && b0.is_finite() && b1 > 0.0 && b0 >= b1) {
            return bad("beta", format!("({b0}, {b1}): β anneals from the first value down to the second, both positive"));
        }
        if !(self.reg_weight.is_finite() && self.reg_weight >= 0.0) {
            return bad("reg_weight", format!("{} is not a finite value ≥ 0", self.reg_weight));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", format!("{} is not a finite value > 0", self.learning_rate));
        }
        Ok(())
    }

    /// The settings a quantizer YAML's `adaround:` key gives: `true` for the defaults, `false` or `null` for none,
    /// or a mapping of the fields (`samples`, `iterations`, `batch_size`, `reg_weight`, `beta: [20, 2]`,
    /// `warm_start`, `learning_rate`, `seed`), the others at their defaults.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Option<Self>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            samples: Option<usize>,
            iterations: Option<usize>,
            batch_size: Option<usize>,
            reg_weight: Option<f64>,
            beta: Option<(f64, f64)>,
            warm_start: Option<f64>,
            learning_rate: Option<f64>,
            seed: Option<u64>,
        }
        let f: Fields = match value {
            serde_yaml::Value::Null | serde_yaml::Value::Bool(false) => return Ok(None),
            serde_yaml::Value::Bool(true) => return Ok(Some(AdaRound::default())),
            serde_yaml::Value::Mapping(_) => serde_path_to_error::deserialize(value.clone()).map_err(|e| Error::invalid("adaround", format!("at '{}': {}", e.path(), e.inner())))?,
            other => return Err(Error::invalid("adaround", format!("expected true, false or a mapping of AdaRound's settings, got {other:?}"))),
        };
        let d = AdaRound::default();
        let settings = AdaRound {
            samples: f.samples.unwrap_or(d.samples),
            iterations: f.iterations.unwrap_or(d.iterations),
            batch_size: f.batch_size.unwrap_or(d.batch_size),
            reg_weight: f.reg_weight.unwrap_or(d.reg_weight),
            beta: f.beta.unwrap_or(d.beta),
            warm_start: f.warm_start.unwrap_or(d.warm_start),
            learning_rate: f.learning_rate.unwrap_or(d.learning_rate),
            seed: f.seed.unwrap_or(d.seed),
        };
        settings.validate()?;
        Ok(Some(settings))
    }

    /// β at iteration `it` (only asked after the warm start).
    fn beta_at(&self, it: usize, warm: usize) -> f64 {
        let span = (self.iterations - warm).max(1) as f64;
        let t = (it - warm) as f64 / span;
        let (b0, b1) = self.beta;
        b1 + 0.5 * (b0 - b1) * (1.0 + (t * std::f64::consts::PI).cos())
    }

    /// Rounds the weights of every post-training quantized Conv2d and Linear of `quantized` adaptively, in forward
    /// order, against `float`: the model exactly as it was handed to
    /// [`prepare_model`](super::range_linear::PostTrainLinearQuantizer::prepare_model) (its batch norms are
    /// folded here as the quantizer folds them). The quantized layers must keep their float weights
    /// (`save_fp_weights: true`); scales and zero points stay as the quantizer chose them. Returns each layer's
    /// result. On error every layer keeps its weights as before.
    pub fn apply(&self, quantized: &mut Model, float: &Model, data: &Dataset) -> Result<Vec<LayerRounding>> {
        self.check(data.len())?;
        let layers = quantized_layers_in_order(quantized, data)?;
        if layers.is_empty() {
            return Err(Error::invalid("AdaRound", "the model has no post-training quantized Conv2d or Linear: quantize it first"));
        }
        let mut reference = crate::models::copy_model(float)?;
        super::bn_fold::fold_batch_norms(&mut reference)?;
        reference.eval();
        let mut before = Vec::with_capacity(layers.len());
        for name in &layers {
            let layer = quantized_layer(quantized, name)?;
            check_reference(&reference, name, layer)?;
            let w = layer.integer_weight().ok_or_else(|| Error::invalid("AdaRound", format!("{name} lost its weight")))?;
            before.push(tch::no_grad(|| w.f_detach_copy())?);
        }
        let mut done = Vec::with_capacity(layers.len());
        for (i, name) in layers.iter().enumerate() {
            let result = self.round_layer(quantized, &mut reference, name, data, self.seed.wrapping_add(i as u64));
            match result {
                Ok(r) => done.push(r),
                Err(e) => {
                    for (name, w) in layers.iter().zip(&before).take(i) {
                        quantized_layer_mut(quantized, name)?.set_integer_weight(w)?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    fn round_layer(&self, quantized: &mut Model, reference: &mut Model, name: &str, data: &Dataset, seed: u64) -> Result<LayerRounding> {
        let started = std::time::Instant::now();
        let inputs = capture(quantized, name, Captured::Input, data, self.samples)?;
        let targets = capture(reference, name, Captured::Output, data, self.samples)?;
        let layer = quantized_layer(quantized, name)?;
        let relu = layer.output_relu();
        let targets = if relu { targets.f_relu()? } else { targets };
        let fp = layer.float_weight().ok_or_else(|| Error::invalid("save_fp_weights", format!("{name} did not keep its float weights: quantize with save_fp_weights: true")))?;
        let p = layer.weight_params();
        let scaled = p.scaled(fp, 0)?;
        let floor = scaled.f_floor()?;
        let rest = scaled.f_sub(&floor)?;
        let (lo, hi) = p.range;
        let device = fp.device();
        let kind = fp.kind();
        let (s, z) = p.along(0, fp.dim(), kind)?;
        let floor = floor.f_to_kind(kind)?;
        let weights = fp.numel() as i64;
        let bias = layer.float_bias().map(|b| b.f_detach()).transpose()?;
        let wrapped = layer.wrapped();
        let forward = |x: &Tensor, q: &Tensor| -> Result<Tensor> {
            let w = q.f_add(&z)?.f_div(&s)?;
            let y = super::range_linear::layer_forward(wrapped, x, &w, bias.as_ref())?;
            Ok(if relu { y.f_relu()? } else { y })
        };
        // h(V) = rest at the start: the soft weight starts as the float weight.
        let init = rest.f_sub_scalar(GAMMA)?.f_reciprocal()?.f_mul_scalar(ZETA - GAMMA)?.f_sub_scalar(1.0)?.f_log()?.f_neg()?.f_to_kind(kind)?;
        let vs = tch::nn::VarStore::new(device);
        let v = vs.root().f_var_copy("alpha", &init)?;
        let mut adam = tch::nn::Adam::default().build(&vs, self.learning_rate)?;
        let rectified = |v: &Tensor| -> Result<Tensor> { Ok(v.f_sigmoid()?.f_mul_scalar(ZETA - GAMMA)?.f_add_scalar(GAMMA)?.f_clamp(0.0, 1.0)?) };
        let n = inputs.size()[0] as u64;
        let mut rng = SplitMix64::new(seed);
        let warm = (self.warm_start * self.iterations as f64) as usize;
        for it in 0..self.iterations {
            let picks: Vec<i64> = (0..self.batch_size).map(|_| rng.below(n) as i64).collect();
            let idx = Tensor::from_slice(&picks).f_to_device(device)?;
            let h = rectified(&v)?;
            let q = floor.f_add(&h)?.f_clamp(lo, hi)?;
            let error = reconstruction_error(&forward(&inputs.f_index_select(0, &idx)?, &q)?, &targets.f_index_select(0, &idx)?)?;
            let loss = if it < warm {
                error
            } else {
                let beta = self.beta_at(it, warm);
                let reg = h.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?.f_abs()?.f_pow_tensor_scalar(beta)?.f_neg()?.f_add_scalar(1.0)?.f_sum(Kind::Float)?;
                error.f_add(&reg.f_mul_scalar(self.reg_weight)?)?
            };
            // One check in a hundred: a NaN, once there, stays, and each check waits for the step to finish.
            if (it % 100 == 0 || it + 1 == self.iterations) && !loss.f_double_value(&[])?.is_finite() {
                return Err(Error::invalid("AdaRound", format!("{name}: the objective is not finite at iteration {it} (NaN or infinite inputs or weights?)")));
            }
            adam.zero_grad();
            loss.f_backward()?;
            adam.step();
        }
        let (q_ada, q_near, flipped) = tch::no_grad(|| -> Result<(Tensor, Tensor, i64)> {
            let up = rectified(&v)?.f_ge(0.5)?.f_to_kind(kind)?;
            let q_ada = floor.f_add(&up)?.f_clamp(lo, hi)?;
            let q_near = p.quantize(fp, 0)?.f_to_kind(kind)?;
            let flipped = q_ada.f_ne_tensor(&q_near)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            Ok((q_ada, q_near, flipped))
        })?;
        let (mse_nearest, mse_adaround) = tch::no_grad(|| -> Result<(f64, f64)> {
            let mut sums = (0.0, 0.0);
            let chunks = inputs.f_split(256, 0)?.into_iter().zip(targets.f_split(256, 0)?);
            for (x, t) in chunks {
                let share = x.size()[0] as f64 / n as f64;
                sums.0 += share * reconstruction_error(&forward(&x, &q_near)?, &t)?.f_double_value(&[])?;
                sums.1 += share * reconstruction_error(&forward(&x, &q_ada)?, &t)?.f_double_value(&[])?;
            }
            Ok(sums)
        })?;
        let layer = quantized_layer_mut(quantized, name)?;
        layer.set_integer_weight(&q_ada)?;
        Ok(LayerRounding { layer: name.to_string(), weights, flipped, mse_nearest, mse_adaround, seconds: started.elapsed().as_secs_f64() })
    }
}

/// `‖y − t‖²` summed over the channel dimension (1), averaged over the others.
fn reconstruction_error(y: &Tensor, t: &Tensor) -> Result<Tensor> {
    Ok(y.f_sub(t)?.f_square()?.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?.f_mean(Kind::Float)?)
}

fn quantized_layer<'a>(model: &'a Model, name: &str) -> Result<&'a RangeLinearQuantParamLayer> {
    (model.module(name)? as &dyn Any).downcast_ref::<RangeLinearQuantParamLayer>().ok_or_else(|| Error::invalid("AdaRound", format!("{name} is not a post-training quantized layer")))
}

fn quantized_layer_mut<'a>(model: &'a mut Model, name: &str) -> Result<&'a mut RangeLinearQuantParamLayer> {
    (model.module_mut(name)? as &mut dyn Any).downcast_mut::<RangeLinearQuantParamLayer>().ok_or_else(|| Error::invalid("AdaRound", format!("{name} is not a post-training quantized layer")))
}

/// The reference's layer `name` must hold the weights the quantized layer was made from: otherwise its outputs
/// are not the targets of this layer (the float model was changed, or equalized inside prepare_model).
fn check_reference(reference: &Model, name: &str, layer: &RangeLinearQuantParamLayer) -> Result<()> {
    let fp = layer.float_weight().ok_or_else(|| Error::invalid("save_fp_weights", format!("{name} did not keep its float weights: quantize with save_fp_weights: true")))?;
    let module = reference.module(name).map_err(|_| Error::invalid("AdaRound", format!("the float model has no layer {name}: pass the model exactly as it was given to prepare_model")))?;
    let Some((w, _)) = super::range_linear::layer_weight(module) else {
        return Err(Error::invalid("AdaRound", format!("{name} of the float model is a {}, not a Conv2d or Linear", module.type_name())));
    };
    if w.size() != fp.size() {
        return Err(Error::Shape(format!("{name}: the float model's weight {:?} against the quantized layer's {:?}: pass the model exactly as it was given to prepare_model", w.size(), fp.size())));
    }
    let scale = fp.f_abs()?.f_max()?.f_double_value(&[])?.max(f64::MIN_POSITIVE);
    let diff = w.f_sub(fp)?.f_abs()?.f_max()?.f_double_value(&[])?;
    if !(diff <= 1e-5 * scale) {
        return Err(Error::invalid(
            "AdaRound",
            format!("{name}: the float model's weights differ from those the layer was quantized from (largest difference {diff:.3e}): pass the model exactly as it was given to prepare_model; with cross-layer equalization, equalize it before (as `distill quantize --equalize` does) so prepare_model has nothing left to change"),
        ));
    }
    Ok(())
}

/// The post-training quantized layers in the order one forward pass runs them.
fn quantized_layers_in_order(model: &mut Model, data: &Dataset) -> Result<Vec<String>> {
    #[derive(Default)]
    struct Order(Vec<String>);
    impl Observer for Order {
        fn observe(&mut self, call: &ModuleCall) {
            if (call.module as &dyn Any).is::<RangeLinearQuantParamLayer>() && !self.0.iter().any(|n| n == call.name) {
                self.0.push(call.name.to_string());
            }
        }
    }
    let order = Arc::new(Mutex::new(Order::default()));
    crate::nn::run_observed(model, order.clone(), data, 1, 1)?;
    let names = std::mem::take(&mut order.lock().map_err(|_| Error::invalid("AdaRound", "observer poisoned"))?.0);
    Ok(names)
}

#[derive(Clone, Copy, PartialEq)]
enum Captured {
    Input,
    Output,
}

/// The input or output of module `name` for the first `samples` samples of `data`, in order.
fn capture(model: &mut Model, name: &str, what: Captured, data: &Dataset, samples: usize) -> Result<Tensor> {
    struct Capture {
        name: String,
        what: Captured,
        taken: Vec<Tensor>,
        error: Option<String>,
    }
    impl Observer for Capture {
        fn observe(&mut self, call: &ModuleCall) {
            if call.name != self.name {
                return;
            }
            let t = match self.what {
                Captured::Input => call.inputs.first().copied(),
                Captured::Output => Some(call.output),
            };
            match t.map(|t| t.f_detach_copy()) {
                Some(Ok(t)) => self.taken.push(t),
                Some(Err(e)) => {
                    self.error.get_or_insert(e.to_string());
                }
                None => {
                    self.error.get_or_insert("the module was called without an input".into());
                }
            }
        }
    }
    let batch = samples.min(256);
    let observer = Arc::new(Mutex::new(Capture { name: name.to_string(), what, taken: Vec::new(), error: None }));
    crate::nn::run_observed(model, observer.clone(), data, samples.div_ceil(batch), batch)?;
    let mut c = observer.lock().map_err(|_| Error::invalid("AdaRound", "observer poisoned"))?;
    if let Some(e) = c.error.take() {
        return Err(Error::invalid("AdaRound", format!("{name}: {e}")));
    }
    if c.taken.is_empty() {
        return Err(Error::invalid("AdaRound", format!("{name} did not run in a forward pass of the model")));
    }
    Ok(Tensor::f_cat(&c.taken, 0)?.f_narrow(0, 0, samples as i64)?)
}
