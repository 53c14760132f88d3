//! Post-training quantization end to end, with the methods composed in the order the literature uses:
//! cross-layer equalization, calibration, the range-linear quantizer, then AdaRound or bias correction (never
//! both, as AIMET advises). [`PostTrainLinearQuantizer::prepare_model`] is the quantizer step alone and takes no
//! data; [`PostTrainLinearQuantizer::quantize`] runs the whole pipeline a `PostTrainLinearQuantizer` YAML section
//! asks for, on calibration data.
//!
//! ```no_run
//! use distill::quantization::post_train::Calibration;
//! use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
//! # let (mut model, data) = (distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?, distill::data::mnist_bundled()?);
//! // cross_layer_equalization, clip_acts: MSE, bias_correction: true ... in the quantizer's YAML section
//! let config = PostTrainConfig::from_schedule_file("schedules/lenet_ptq8.yaml")?;
//! let report = PostTrainLinearQuantizer::new(config).quantize(&mut model, Some(&Calibration::new(&data.valid, 4, 128)))?;
//! println!("{} layers quantized on {} calibration samples", report.prepared.replaced.len(), report.calibration_samples);
//! # Ok::<(), distill::Error>(())
//! ```
use std::any::Any;

use super::adaround::LayerRounding;
use super::bias_correction::{correct_biases, BiasCorrection, InputMeans};
use super::equalization::{equalize_cross_layer, EqualizedPair};
use super::range_linear::{PostTrainLinearQuantizer, PtqPrepared, RangeLinearQuantParamLayer};
use super::stats::{collect_activation_stats, ActivationStats};
use crate::data::Dataset;
use crate::nn::{Model, Rollback};
use crate::{Error, Result};

/// Calibration data: the first `batches` mini-batches of `batch_size` samples of `data`, in order.
#[derive(Debug, Clone, Copy)]
pub struct Calibration<'a> {
    /// The data set (a validation or training split: never the test set you report).
    pub data: &'a Dataset,
    /// Mini-batches.
    pub batches: usize,
    /// Samples per mini-batch.
    pub batch_size: usize,
}

impl<'a> Calibration<'a> {
    /// `batches` mini-batches of `batch_size` from `data`.
    pub fn new(data: &'a Dataset, batches: usize, batch_size: usize) -> Self {
        Calibration { data, batches, batch_size }
    }

    /// The samples the batches hold (fewer when `data` runs out).
    pub fn samples(&self) -> usize {
        self.data.len().min(self.batches.min(self.data.steps(self.batch_size)) * self.batch_size)
    }
}

/// What [`PostTrainLinearQuantizer::quantize`] did.
#[derive(Debug, Clone, Default)]
pub struct PostTrainReport {
    /// Layer pairs equalized before calibration (`cross_layer_equalization` with calibration data).
    pub equalized: Vec<EqualizedPair>,
    /// The statistics collected on the calibration data (`None` without calibration: those of the configuration
    /// were used, or dynamic ranges).
    pub stats: Option<ActivationStats>,
    /// Samples the calibration ran on (0 without calibration).
    pub calibration_samples: usize,
    /// What the quantizer step did.
    pub prepared: PtqPrepared,
    /// Bias correction (`bias_correction`): each corrected layer and the largest shift it removed.
    pub bias_corrections: Vec<(String, f64)>,
    /// Layers analytical bias correction left alone, with the reason.
    pub bias_skipped: Vec<(String, String)>,
    /// AdaRound (`adaround`): each layer's rounding.
    pub adaround: Vec<LayerRounding>,
}

impl PostTrainLinearQuantizer {
    /// Quantizes `model` with everything the configuration asks for, in this order: cross-layer equalization
    /// (`cross_layer_equalization`, before calibrating, since it changes the activation ranges), calibration on
    /// `calibration` (its statistics replace any the configuration holds), the quantizer
    /// ([`prepare_model`](Self::prepare_model)), then AdaRound (`adaround`) or bias correction
    /// (`bias_correction`). Without calibration data the configuration's statistics (or dynamic ranges) are used,
    /// and asking for AdaRound or empirical bias correction is an error; analytical bias correction needs no data.
    /// All or nothing: on any error the model is exactly as before.
    pub fn quantize(&self, model: &mut Model, calibration: Option<&Calibration>) -> Result<PostTrainReport> {
        let c = self.config();
        let needs_data = c.after_quantizing().filter(|step| step.needs_data()).map(|step| step.key());
        match (needs_data, calibration) {
            (Some(key), None) => {
                let also = if key == "bias_correction" { " (or use `bias_correction: analytical`, which needs none)" } else { "" };
                return Err(Error::invalid(key, format!("fits the quantized model to calibration data: give calibration batches (`distill quantize --calibrate N`, or a `Calibration`){also}")));
            }
            (_, Some(cal)) if cal.batches == 0 || cal.batch_size == 0 || cal.data.is_empty() => {
                return Err(Error::invalid("calibration", format!("{} batches of {} from a split of {} samples hold no data", cal.batches, cal.batch_size, cal.data.len())))
            }
            _ => {}
        }
        if c.adaround.is_some() && c.bias_correction.is_some() {
            return Err(adaround_with_bias_correction());
        }
        Rollback::transaction(model, |model, rollback| self.quantize_steps(model, calibration, rollback))
    }

    fn quantize_steps(&self, model: &mut Model, calibration: Option<&Calibration>, rollback: &mut Rollback) -> Result<PostTrainReport> {
        let mut config = self.config().clone();
        let mut report = PostTrainReport::default();
        // From the batch norms, which folding (below, or in the quantizer) turns into the convolutions' weights.
        let mut means = match config.bias_correction {
            Some(BiasCorrection::Analytical) => Some(InputMeans::analytical(model)?),
            _ => None,
        };
        if config.cross_layer_equalization {
            // Folded under the rollback, so that equalize_cross_layer's own folding finds nothing left to do, and
            // before calibrating, since equalization changes the activation ranges.
            super::bn_fold::fold_batch_norms_recorded(model, rollback)?;
            let eq = equalize_cross_layer(model)?;
            eq.check_statistics_still_valid(
                calibration.is_none() && config.stats.is_some(),
                "calibrate after equalizing (give calibration batches)",
            )?;
            if let Some(means) = means.as_mut() {
                for pair in &eq.pairs {
                    means.rescale_input_channels(&pair.second, &pair.scales)?;
                }
            }
            report.equalized = eq.pairs;
        }
        let mut adaround = None;
        if let Some(cal) = calibration {
            let stats = collect_activation_stats(model, cal.data, cal.batches, cal.batch_size)?;
            report.calibration_samples = cal.samples();
            config.stats = Some(stats.clone());
            report.stats = Some(stats);
            if let Some(settings) = &config.adaround {
                // The float model as the quantizer receives it: the target of every layer's rounding.
                adaround = Some((crate::models::copy_model(model)?, settings.clone()));
            }
            if config.bias_correction == Some(BiasCorrection::Empirical) {
                means = Some(InputMeans::collect(model, cal.data, cal.batches, cal.batch_size)?);
            }
        }
        let keep_float_weights = config.save_fp_weights;
        config.save_fp_weights |= adaround.is_some() || means.is_some();
        report.prepared = PostTrainLinearQuantizer::new(config).prepare_steps(model, rollback)?;
        if let (Some((float, settings)), Some(cal)) = (&adaround, calibration) {
            report.adaround = settings.apply(model, float, cal.data)?;
        }
        if let Some(means) = &means {
            report.bias_corrections = correct_biases(model, means)?;
            report.bias_skipped = means.skipped().to_vec();
        }
        if !keep_float_weights && (adaround.is_some() || means.is_some()) {
            discard_float_weights(model);
        }
        Ok(report)
    }
}

/// The error for a configuration that asks for both AdaRound and bias correction.
pub(crate) fn adaround_with_bias_correction() -> Error {
    Error::invalid("adaround", "AdaRound and bias correction are not combined (AIMET's guidance): AdaRound's objective already removes the mean output shift; choose one")
}

/// Drops the float weights every quantized layer kept (`save_fp_weights`), so the model and its export keep
/// their size.
pub fn discard_float_weights(model: &mut Model) {
    model.for_each_module_mut(|_, m| {
        if let Some(layer) = (m as &mut dyn Any).downcast_mut::<RangeLinearQuantParamLayer>() {
            layer.discard_float_weight();
        }
    });
}
