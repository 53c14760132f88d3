//! Empirical bias correction (Nagel et al., 2019, §4.2): quantizing a layer's weights shifts the expectation of
//! its output by `(W_q − W)·E[x]`, a systematic error that rounding does not average away and that the next
//! layers amplify. Measured on calibration batches, the mean input of each Conv2d and Linear (for a convolution,
//! the mean of its input patches, zero padding included, so the correction is exact at the borders too) gives
//! that shift per output channel, and the quantized layer's bias absorbs it.
//!
//! ```no_run
//! use distill::quantization::bias_correction::{correct_biases, InputMeans};
//! use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
//! # let (mut model, data) = (distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?, distill::data::mnist_bundled()?);
//! let means = InputMeans::collect(&mut model, &data.valid, 4, 128)?; // the float model
//! let config = PostTrainConfig { save_fp_weights: true, ..PostTrainConfig::default() };
//! PostTrainLinearQuantizer::new(config).prepare_model(&mut model)?;
//! let corrected = correct_biases(&mut model, &means)?;
//! # Ok::<(), distill::Error>(())
//! ```
//!
//! Analytical bias correction ([`InputMeans::analytical`], data-free, the paper's §4.2 proper): where a layer's
//! input is a batch norm's output, through a ReLU or not (and through pooling, flatten or dropout, which keep a
//! channel's mean), the batch norm says what that input's mean is: its pre-activation is taken as
//! `N(β_c, γ_c²)`, so the mean is `β_c`, or after a ReLU `σ·φ(μ/σ) + μ·Φ(μ/σ)` with `μ = β_c`, `σ = |γ_c|`. Every
//! patch element of channel `c` gets that mean (zero padding is not accounted for). Layers whose input comes
//! from anything else (the model's input, a residual add, max pooling) are left uncorrected and listed.
//!
//! Not combined with AdaRound, which already learns the rounding against the layer's outputs (AIMET's guidance).
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use super::range_linear::RangeLinearQuantParamLayer;
use crate::data::Dataset;
use crate::graph::{Graph, NodeKind};
use crate::nn::{BatchNorm2d, Conv2d, Linear, Model, ModuleCall, Observer, TensorOp};
use crate::{Error, Result};

/// Where bias correction takes each layer's mean input from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasCorrection {
    /// Measured on calibration batches ([`InputMeans::collect`]).
    Empirical,
    /// From the batch norms before each layer, without data ([`InputMeans::analytical`]).
    Analytical,
}

impl BiasCorrection {
    /// `empirical` or `analytical`, as the YAML key takes it.
    pub fn name(self) -> &'static str {
        match self {
            BiasCorrection::Empirical => "empirical",
            BiasCorrection::Analytical => "analytical",
        }
    }

    /// A quantizer YAML's `bias_correction:` key: `true` or `empirical`, `analytical`, or `false`/`null` for none.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Option<Self>> {
        match value {
            serde_yaml::Value::Null | serde_yaml::Value::Bool(false) => Ok(None),
            serde_yaml::Value::Bool(true) => Ok(Some(BiasCorrection::Empirical)),
            serde_yaml::Value::String(s) if s.eq_ignore_ascii_case("empirical") => Ok(Some(BiasCorrection::Empirical)),
            serde_yaml::Value::String(s) if s.eq_ignore_ascii_case("analytical") => Ok(Some(BiasCorrection::Analytical)),
            serde_yaml::Value::String(s) => Err(Error::unknown("bias correction", s, ["empirical", "analytical", "true", "false"])),
            other => Err(Error::invalid("bias_correction", format!("expected true, false, empirical or analytical, got {other:?}"))),
        }
    }
}

/// The mean input of every Conv2d and Linear of a floating-point model: per input feature for a Linear, per
/// element of the input patch (`C·kh·kw`) for a convolution.
#[derive(Debug, Default)]
pub struct InputMeans {
    means: HashMap<String, (Tensor, i64)>,
    /// Layers the analytical means do not cover, with the reason.
    skipped: Vec<(String, String)>,
}

#[derive(Default)]
struct MeanCollector {
    sums: HashMap<String, (Tensor, i64)>,
    error: Option<String>,
}

impl Observer for MeanCollector {
    fn observe(&mut self, call: &ModuleCall) {
        let Some(x) = call.inputs.first() else { return };
        let any = call.module as &dyn Any;
        let rows = if let Some(c) = any.downcast_ref::<Conv2d>() {
            patches(c, x)
        } else if any.is::<Linear>() {
            x.f_to_kind(Kind::Double).and_then(|x| x.f_reshape([-1, *x.size().last().unwrap_or(&1)])).map_err(Error::from)
        } else {
            return;
        };
        let result = rows.and_then(|rows| {
            let sum = rows.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
            let n = rows.size()[0];
            match self.sums.get_mut(call.name) {
                Some((s, count)) => {
                    *s = s.f_add(&sum)?;
                    *count += n;
                }
                None => {
                    self.sums.insert(call.name.to_string(), (sum, n));
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            self.error.get_or_insert(format!("{}: {e}", call.name));
        }
    }
}

/// A convolution's input patches, one row per output position: `[N·L, C·kh·kw]` in float64.
fn patches(c: &Conv2d, x: &Tensor) -> Result<Tensor> {
    let k = &c.config;
    if k.groups != 1 {
        return Err(Error::invalid("bias correction", format!("a grouped convolution (groups={}) is not supported", k.groups)));
    }
    let cols = x.f_to_kind(Kind::Double)?.f_im2col(k.kernel_size, k.dilation, k.padding, k.stride)?;
    Ok(cols.f_transpose(1, 2)?.f_reshape([-1, cols.size()[1]])?)
}

impl InputMeans {
    /// Runs `batches` mini-batches of `data` (in order, eval mode, no gradients) through the floating-point
    /// `model` and records the mean input of each Conv2d and Linear.
    pub fn collect(model: &mut Model, data: &Dataset, batches: usize, batch_size: usize) -> Result<Self> {
        if batches == 0 {
            return Err(Error::invalid("calibration batches", "bias correction needs at least 1"));
        }
        let collector = Arc::new(Mutex::new(MeanCollector::default()));
        crate::nn::run_observed(model, collector.clone(), data, batches, batch_size)?;
        let mut collector = collector.lock().map_err(|_| Error::invalid("bias correction", "collector poisoned"))?;
        if let Some(e) = collector.error.take() {
            return Err(Error::invalid("bias correction", e));
        }
        let means = collector.sums.drain().map(|(name, (sum, n))| Ok((name, (sum.f_div_scalar(n.max(1) as f64)?, n)))).collect::<Result<_>>()?;
        Ok(InputMeans { means, skipped: Vec::new() })
    }

    /// The mean input of every Conv2d and Linear whose input a BatchNorm2d produces, from the batch norm's
    /// parameters alone (see the module's text): no data. Call it on the floating-point model before its batch
    /// norms are folded. Layers it cannot cover are in [`InputMeans::skipped`].
    pub fn analytical(model: &mut Model) -> Result<Self> {
        let graph = Graph::trace(model)?;
        let (nodes, tensors) = (graph.nodes(), graph.tensors());
        let mut means = HashMap::new();
        let mut skipped = Vec::new();
        for node in nodes {
            let NodeKind::Module(kind) = &node.kind else { continue };
            if !(kind == "Conv2d" || kind == "Linear") || node.name.contains('#') {
                continue;
            }
            let name = node.module_name().to_string();
            // Walk back from the layer's input: steps that keep a channel's mean, at most one ReLU, a batch norm.
            let (mut tensor, mut relu, mut block) = (node.inputs[0], false, 1i64);
            let found = loop {
                let Some(p) = tensors[tensor].producer else { break Err("its input is the model's input".to_string()) };
                let producer = &nodes[p];
                match &producer.kind {
                    NodeKind::Module(k) if k == "BatchNorm2d" => break Ok(producer.module_name().to_string()),
                    NodeKind::Module(k) if k == "ReLU" && !relu => relu = true,
                    NodeKind::Module(k) if k == "Identity" || k == "Dropout" => {}
                    NodeKind::Module(k) if (k == "AvgPool2d" || k == "AdaptiveAvgPool2d") && !relu => {}
                    NodeKind::Op(TensorOp::Flatten) if !relu => {
                        let shape = &tensors[producer.inputs[0]].shape;
                        block = shape.iter().skip(2).product();
                    }
                    other => break Err(format!("its input comes from {} ({}), not from a batch norm", producer.module_name(), other.label())),
                }
                tensor = producer.inputs[0];
            };
            let bn_name = match found {
                Ok(bn) => bn,
                Err(reason) => {
                    skipped.push((name, reason));
                    continue;
                }
            };
            let bn = model.module(&bn_name)?;
            let bn = (bn as &dyn Any).downcast_ref::<BatchNorm2d>().ok_or_else(|| Error::invalid("bias correction", format!("{bn_name} is not a BatchNorm2d")))?;
            let channel_means = expected_output(bn, relu)?;
            let layer = model.module(&name)?;
            let repeat = match (layer as &dyn Any).downcast_ref::<Conv2d>() {
                Some(c) if c.config.groups != 1 => {
                    skipped.push((name, format!("a grouped convolution (groups={}) is not supported", c.config.groups)));
                    continue;
                }
                Some(c) => c.config.kernel_size[0] * c.config.kernel_size[1],
                None => block,
            };
            means.insert(name, (channel_means.f_repeat_interleave_self_int(repeat, 0, None)?, 0));
        }
        Ok(InputMeans { means, skipped })
    }

    /// The mean input of layer `name`, if it ran.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.means.get(name).map(|(m, _)| m)
    }

    /// Layers [`InputMeans::analytical`] could not cover, with the reason.
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }

    /// Divides the mean of each input channel `c` of layer `name` by `scales[c]`: what cross-layer equalization
    /// does to the activations between two layers (`EqualizedPair::scales`).
    pub fn rescale_input_channels(&mut self, name: &str, scales: &[f64]) -> Result<()> {
        let Some((mean, _)) = self.means.get_mut(name) else { return Ok(()) };
        let channels = scales.len() as i64;
        if channels == 0 || mean.numel() as i64 % channels != 0 {
            return Err(Error::invalid("bias correction", format!("{name}: {} scales do not divide its {} input means", scales.len(), mean.numel())));
        }
        let s = Tensor::f_from_slice(scales)?.f_view([channels, 1])?;
        *mean = mean.f_view([channels, -1])?.f_div(&s)?.f_flatten(0, -1)?;
        Ok(())
    }
}

/// The per-channel mean of a batch norm's output taken as `N(β, γ²)`, through a ReLU when `relu`, in float64.
fn expected_output(bn: &BatchNorm2d, relu: bool) -> Result<Tensor> {
    let beta = Vec::<f64>::try_from(&bn.bias.f_detach()?.f_to_kind(Kind::Double)?)?;
    if !relu {
        return Ok(Tensor::f_from_slice(&beta)?);
    }
    let gamma = Vec::<f64>::try_from(&bn.weight.f_detach()?.f_to_kind(Kind::Double)?)?;
    let means = beta.iter().zip(&gamma).map(|(&mu, &g)| expected_relu_mean(mu, g.abs())).collect::<Result<Vec<f64>>>()?;
    Ok(Tensor::f_from_slice(&means)?)
}

/// `E[max(0, y)]` for `y ~ N(μ, σ²)`: `σ·φ(μ/σ) + μ·Φ(μ/σ)`, and `max(μ, 0)` for `σ = 0`.
pub fn expected_relu_mean(mu: f64, sigma: f64) -> Result<f64> {
    if sigma <= 0.0 {
        return Ok(mu.max(0.0));
    }
    let z = mu / sigma;
    let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    // std has no erf; libtorch's, on one value.
    let cdf = 0.5 * (1.0 + Tensor::from(z / std::f64::consts::SQRT_2).f_erf()?.f_double_value(&[])?);
    Ok(sigma * pdf + mu * cdf)
}

/// Corrects the bias of every post-training quantized Conv2d/Linear of `model` by its output shift
/// `(W_q − W)·E[x]`, with `E[x]` from `means` (collected on the floating-point model) and `W` from the layer's
/// `float_weight` (quantize with `save_fp_weights: true`). Layers analytical means skipped are left alone.
/// Returns each corrected layer's largest correction.
pub fn correct_biases(model: &mut Model, means: &InputMeans) -> Result<Vec<(String, f64)>> {
    let mut names = Vec::new();
    model.for_each_module(|name, m| {
        if (m as &dyn Any).is::<RangeLinearQuantParamLayer>() {
            names.push(name.to_string());
        }
    });
    if names.is_empty() {
        return Err(Error::invalid("bias correction", "the model has no post-training quantized Conv2d or Linear: quantize it first"));
    }
    let mut corrected = Vec::with_capacity(names.len());
    for name in names {
        if means.skipped.iter().any(|(s, _)| *s == name) {
            continue;
        }
        let mean = means.get(&name).ok_or_else(|| Error::invalid("bias correction", format!("no mean input recorded for {name}: collect InputMeans on this model before quantizing it")))?;
        let module = model.module_mut(&name)?;
        let layer = (module as &mut dyn Any).downcast_mut::<RangeLinearQuantParamLayer>().ok_or_else(|| Error::invalid("bias correction", format!("{name} is not a quantized layer")))?;
        let shift = layer.weight_shift(mean).map_err(|e| Error::invalid("bias correction", format!("{name}: {e}")))?;
        let largest = shift.f_abs()?.f_max()?.f_double_value(&[])?;
        layer.correct_bias(&shift)?;
        corrected.push((name, largest));
    }
    Ok(corrected)
}
