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
//! Not combined with AdaRound, which already learns the rounding against the layer's outputs (AIMET's guidance).
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use super::range_linear::RangeLinearQuantParamLayer;
use crate::data::Dataset;
use crate::nn::{Conv2d, Linear, Model, ModuleCall, Observer};
use crate::{Error, Result};

/// The mean input of every Conv2d and Linear of a floating-point model: per input feature for a Linear, per
/// element of the input patch (`C·kh·kw`) for a convolution.
#[derive(Debug, Default)]
pub struct InputMeans {
    means: HashMap<String, (Tensor, i64)>,
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
        Ok(InputMeans { means })
    }

    /// The mean input of layer `name`, if it ran.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.means.get(name).map(|(m, _)| m)
    }
}

/// Corrects the bias of every post-training quantized Conv2d/Linear of `model` by its output shift
/// `(W_q − W)·E[x]`, with `E[x]` from `means` (collected on the floating-point model) and `W` from the layer's
/// `float_weight` (quantize with `save_fp_weights: true`). Returns each layer's largest correction.
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
