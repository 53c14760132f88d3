//! The typed contents of a schedule's sections: Distiller's class names with their parameters, as serde types
//! (field names are Distiller's YAML keys), and how each becomes a pruner or regularizer.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pruning::element::{AutomatedGradualPruner, BaiduRNNPruner, MagnitudeParameterPruner, SensitivityPruner, SparsityLevelParameterPruner, SplicingPruner};
use crate::pruning::structure::{Fraction, GroupType, RankedOptions, RankedStructurePruner, Ranking, StructureParameterPruner};
use crate::pruning::{PerParam, Pruner};
use crate::quantization::q_utils::ClipMode;
use crate::quantization::quantizer::{apply_override, ModuleQuantSettings, QuantDefaults, CLIPPED_OVERRIDE_KEYS, POST_TRAIN_OVERRIDE_KEYS, QAT_OVERRIDE_KEYS};
use crate::regularization::{GroupLassoRegularizer, GroupRegime, GroupVarianceRegularizer, L1Regularizer, Regularizer};
use crate::{Error, Result};

/// Distiller accepts `weights: name` as well as `weights: [names]` (it then does a substring test, a quirk not
/// copied: the single name must match exactly like any other).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `kwargs` of the ranked structure pruners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankedKwargs {
    /// `[repetitions, depth, 1, 1]` for `group_type: Blocks`.
    pub block_shape: Vec<i64>,
}

/// Parameters of `L1RankedStructureParameterPruner` and `L2RankedStructureParameterPruner`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankedParams {
    /// `Filters` (or `3D`), `Channels`, `Rows` or `Blocks`.
    pub group_type: String,
    /// Fraction of structures to prune.
    pub desired_sparsity: f64,
    #[serde(deserialize_with = "one_or_many")]
    /// Parameter names.
    pub weights: Vec<String>,
    /// `Leader`: all listed tensors lose the structures the first one loses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_dependency: Option<String>,
    /// `{block_shape: [r, d, 1, 1]}` for Blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<RankedKwargs>,
    /// Probability of noisy (ε-greedy) ranking.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub noise: f64,
    /// Structures per group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Parameters of the `_AGP` ranked structure pruners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankedAgpParams {
    /// Fraction pruned at the first pruning epoch.
    pub initial_sparsity: f64,
    /// Fraction pruned from the last pruning epoch on.
    pub final_sparsity: f64,
    /// Structure type.
    pub group_type: String,
    #[serde(deserialize_with = "one_or_many")]
    /// Parameter names.
    pub weights: Vec<String>,
    /// `Leader` or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_dependency: Option<String>,
    /// `{block_shape: [...]}` for Blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<RankedKwargs>,
}

/// Parameters of the filter pruners with a fixed fraction (random, Bernoulli, gradient, activation ranked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterParams {
    /// `Filters` or `3D`.
    pub group_type: String,
    /// Fraction of filters to prune.
    pub desired_sparsity: f64,
    #[serde(deserialize_with = "one_or_many")]
    /// Parameter names.
    pub weights: Vec<String>,
    /// `Leader` or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_dependency: Option<String>,
}

/// Parameters of the `_AGP` filter pruners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterAgpParams {
    /// Fraction pruned at the first pruning epoch.
    pub initial_sparsity: f64,
    /// Fraction pruned from the last pruning epoch on.
    pub final_sparsity: f64,
    /// `Filters` or `3D`.
    pub group_type: String,
    #[serde(deserialize_with = "one_or_many")]
    /// Parameter names.
    pub weights: Vec<String>,
    /// `Leader` or nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_dependency: Option<String>,
}

/// A `pruners:` entry.
#[allow(non_camel_case_types, missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum PrunerConfig {
    MagnitudeParameterPruner { thresholds: BTreeMap<String, f64> },
    SparsityLevelParameterPruner { levels: BTreeMap<String, f64> },
    SensitivityPruner { sensitivities: BTreeMap<String, f64> },
    SplicingPruner {
        sensitivities: BTreeMap<String, f64>,
        low_thresh_mult: f64,
        hi_thresh_mult: f64,
        #[serde(default)]
        sensitivity_multiplier: f64,
    },
    AutomatedGradualPruner {
        initial_sparsity: f64,
        final_sparsity: f64,
        #[serde(deserialize_with = "one_or_many")]
        weights: Vec<String>,
    },
    BaiduRNNPruner {
        q: f64,
        ramp_epoch_offset: usize,
        ramp_slope_mult: f64,
        #[serde(deserialize_with = "one_or_many")]
        weights: Vec<String>,
    },
    L1RankedStructureParameterPruner(RankedParams),
    L2RankedStructureParameterPruner(RankedParams),
    L1RankedStructureParameterPruner_AGP(RankedAgpParams),
    L2RankedStructureParameterPruner_AGP(RankedAgpParams),
    RandomLevelStructureParameterPruner {
        group_type: String,
        sparsity_range: Vec<f64>,
        #[serde(deserialize_with = "one_or_many")]
        weights: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_dependency: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kwargs: Option<RankedKwargs>,
    },
    RandomRankedFilterPruner(FilterParams),
    BernoulliFilterPruner(FilterParams),
    GradientRankedFilterPruner(FilterParams),
    ActivationAPoZRankedFilterPruner(FilterParams),
    ActivationMeanRankedFilterPruner(FilterParams),
    RandomRankedFilterPruner_AGP(FilterAgpParams),
    BernoulliFilterPruner_AGP(FilterAgpParams),
    GradientRankedFilterPruner_AGP(FilterAgpParams),
    ActivationAPoZRankedFilterPruner_AGP(FilterAgpParams),
    ActivationMeanRankedFilterPruner_AGP(FilterAgpParams),
    StructureParameterPruner { reg_regims: BTreeMap<String, (f64, String)>, threshold_criteria: String },
}

/// Every pruner class a schedule may name.
pub const PRUNER_CLASSES: &[&str] = &[
    "MagnitudeParameterPruner",
    "SparsityLevelParameterPruner",
    "SensitivityPruner",
    "SplicingPruner",
    "AutomatedGradualPruner",
    "BaiduRNNPruner",
    "L1RankedStructureParameterPruner",
    "L2RankedStructureParameterPruner",
    "L1RankedStructureParameterPruner_AGP",
    "L2RankedStructureParameterPruner_AGP",
    "RandomLevelStructureParameterPruner",
    "RandomRankedFilterPruner",
    "BernoulliFilterPruner",
    "GradientRankedFilterPruner",
    "ActivationAPoZRankedFilterPruner",
    "ActivationMeanRankedFilterPruner",
    "RandomRankedFilterPruner_AGP",
    "BernoulliFilterPruner_AGP",
    "GradientRankedFilterPruner_AGP",
    "ActivationAPoZRankedFilterPruner_AGP",
    "ActivationMeanRankedFilterPruner_AGP",
    "StructureParameterPruner",
];

fn leader(dep: &Option<String>) -> Result<bool> {
    match dep.as_deref() {
        None => Ok(false),
        Some("Leader") => Ok(true),
        Some(other) => Err(Error::unknown("group_dependency", other, ["Leader"])),
    }
}

fn ranked_options(dep: &Option<String>, kwargs: &Option<RankedKwargs>, noise: f64, group_size: Option<i64>) -> Result<RankedOptions> {
    Ok(RankedOptions { leader: leader(dep)?, block_shape: kwargs.as_ref().map(|k| k.block_shape.clone()), group_size, noise })
}

fn class_name_of<T: Serialize>(v: &T) -> &'static str {
    match serde_yaml::to_value(v) {
        Ok(serde_yaml::Value::Tagged(t)) => PRUNER_CLASSES
            .iter()
            .chain(REGULARIZER_CLASSES)
            .chain(QUANTIZER_CLASSES)
            .find(|c| t.tag == **c)
            .copied()
            .unwrap_or("?"),
        _ => "?",
    }
}

impl PrunerConfig {
    /// The Distiller class name.
    pub fn class_name(&self) -> &'static str {
        class_name_of(self)
    }

    /// The weight dimension whose structures this pruner removes whole: 0 for filters, 1 for channels; `None`
    /// for element-wise pruners and other structures (what thinning can take out afterwards).
    pub fn removed_dim(&self) -> Option<i64> {
        use PrunerConfig::*;
        let group = match self {
            L1RankedStructureParameterPruner(p) | L2RankedStructureParameterPruner(p) => p.group_type.as_str(),
            L1RankedStructureParameterPruner_AGP(p) | L2RankedStructureParameterPruner_AGP(p) => p.group_type.as_str(),
            RandomLevelStructureParameterPruner { group_type, .. } => group_type.as_str(),
            RandomRankedFilterPruner(p) | BernoulliFilterPruner(p) | GradientRankedFilterPruner(p) | ActivationAPoZRankedFilterPruner(p) | ActivationMeanRankedFilterPruner(p) => p.group_type.as_str(),
            RandomRankedFilterPruner_AGP(p) | BernoulliFilterPruner_AGP(p) | GradientRankedFilterPruner_AGP(p) | ActivationAPoZRankedFilterPruner_AGP(p) | ActivationMeanRankedFilterPruner_AGP(p) => p.group_type.as_str(),
            _ => return None,
        };
        match group {
            "Filters" | "3D" => Some(0),
            "Channels" => Some(1),
            _ => None,
        }
    }

    /// Every parameter name the entry lists (map keys other than `*` included), as written.
    pub fn parameter_names(&self) -> Vec<String> {
        use PrunerConfig::*;
        match self {
            MagnitudeParameterPruner { thresholds: m } | SparsityLevelParameterPruner { levels: m } | SensitivityPruner { sensitivities: m } | SplicingPruner { sensitivities: m, .. } => {
                m.keys().filter(|k| *k != "*").cloned().collect()
            }
            AutomatedGradualPruner { weights, .. } | BaiduRNNPruner { weights, .. } | RandomLevelStructureParameterPruner { weights, .. } => weights.clone(),
            L1RankedStructureParameterPruner(p) | L2RankedStructureParameterPruner(p) => p.weights.clone(),
            L1RankedStructureParameterPruner_AGP(p) | L2RankedStructureParameterPruner_AGP(p) => p.weights.clone(),
            RandomRankedFilterPruner(p) | BernoulliFilterPruner(p) | GradientRankedFilterPruner(p) | ActivationAPoZRankedFilterPruner(p) | ActivationMeanRankedFilterPruner(p) => p.weights.clone(),
            RandomRankedFilterPruner_AGP(p) | BernoulliFilterPruner_AGP(p) | GradientRankedFilterPruner_AGP(p) | ActivationAPoZRankedFilterPruner_AGP(p) | ActivationMeanRankedFilterPruner_AGP(p) => p.weights.clone(),
            StructureParameterPruner { reg_regims, .. } => reg_regims.keys().cloned().collect(),
        }
    }

    /// The pruner this entry describes, named `name`; checks every value.
    pub fn build(&self, name: &str) -> Result<Box<dyn Pruner>> {
        use PrunerConfig as P;
        let class = self.class_name();
        let ranked = |ranking, group: &str, fraction, weights: &[String], options| -> Result<Box<dyn Pruner>> {
            Ok(Box::new(RankedStructurePruner::new(class, name, group.parse()?, ranking, fraction, weights, options)?))
        };
        let agp = |i, f| Fraction::Agp { initial: i, final_: f };
        Ok(match self {
            P::MagnitudeParameterPruner { thresholds } => Box::new(MagnitudeParameterPruner::new(name, PerParam::from_map(thresholds))?),
            P::SparsityLevelParameterPruner { levels } => Box::new(SparsityLevelParameterPruner::new(name, PerParam::from_map(levels))?),
            P::SensitivityPruner { sensitivities } => Box::new(SensitivityPruner::new(name, PerParam::from_map(sensitivities))?),
            P::SplicingPruner { sensitivities, low_thresh_mult, hi_thresh_mult, sensitivity_multiplier } => {
                Box::new(SplicingPruner::new(name, PerParam::from_map(sensitivities), *low_thresh_mult, *hi_thresh_mult, *sensitivity_multiplier)?)
            }
            P::AutomatedGradualPruner { initial_sparsity, final_sparsity, weights } => {
                Box::new(AutomatedGradualPruner::new(name, *initial_sparsity, *final_sparsity, weights)?)
            }
            P::BaiduRNNPruner { q, ramp_epoch_offset, ramp_slope_mult, weights } => {
                Box::new(BaiduRNNPruner::new(name, *q, *ramp_epoch_offset, *ramp_slope_mult, weights)?)
            }
            P::L1RankedStructureParameterPruner(p) | P::L2RankedStructureParameterPruner(p) => {
                let r = if matches!(self, P::L1RankedStructureParameterPruner(_)) { Ranking::L1 } else { Ranking::L2 };
                ranked(r, &p.group_type, Fraction::Fixed(p.desired_sparsity), &p.weights, ranked_options(&p.group_dependency, &p.kwargs, p.noise, p.group_size)?)?
            }
            P::L1RankedStructureParameterPruner_AGP(p) | P::L2RankedStructureParameterPruner_AGP(p) => {
                let r = if matches!(self, P::L1RankedStructureParameterPruner_AGP(_)) { Ranking::L1 } else { Ranking::L2 };
                ranked(r, &p.group_type, agp(p.initial_sparsity, p.final_sparsity), &p.weights, ranked_options(&p.group_dependency, &p.kwargs, 0.0, None)?)?
            }
            P::RandomLevelStructureParameterPruner { group_type, sparsity_range, weights, group_dependency, kwargs } => {
                let [lo, hi] = sparsity_range[..] else {
                    return Err(Error::invalid("sparsity_range", format!("{sparsity_range:?} must be [low, high]")));
                };
                ranked(Ranking::L1, group_type, Fraction::Uniform { lo, hi }, weights, ranked_options(group_dependency, kwargs, 0.0, None)?)?
            }
            P::RandomRankedFilterPruner(p) | P::BernoulliFilterPruner(p) | P::GradientRankedFilterPruner(p) | P::ActivationAPoZRankedFilterPruner(p) | P::ActivationMeanRankedFilterPruner(p) => {
                let r = filter_ranking(self);
                ranked(r, &p.group_type, Fraction::Fixed(p.desired_sparsity), &p.weights, ranked_options(&p.group_dependency, &None, 0.0, None)?)?
            }
            P::RandomRankedFilterPruner_AGP(p) | P::BernoulliFilterPruner_AGP(p) | P::GradientRankedFilterPruner_AGP(p) | P::ActivationAPoZRankedFilterPruner_AGP(p) | P::ActivationMeanRankedFilterPruner_AGP(p) => {
                let r = filter_ranking(self);
                ranked(r, &p.group_type, agp(p.initial_sparsity, p.final_sparsity), &p.weights, ranked_options(&p.group_dependency, &None, 0.0, None)?)?
            }
            P::StructureParameterPruner { reg_regims, threshold_criteria } => {
                let regims = reg_regims.iter().map(|(n, (t, g))| Ok((n.clone(), *t, g.parse()?))).collect::<Result<Vec<_>>>()?;
                Box::new(StructureParameterPruner::new(name, regims, threshold_criteria)?)
            }
        })
    }
}

fn filter_ranking(p: &PrunerConfig) -> Ranking {
    use PrunerConfig as P;
    match p {
        P::RandomRankedFilterPruner(_) | P::RandomRankedFilterPruner_AGP(_) => Ranking::Random,
        P::BernoulliFilterPruner(_) | P::BernoulliFilterPruner_AGP(_) => Ranking::Bernoulli,
        P::GradientRankedFilterPruner(_) | P::GradientRankedFilterPruner_AGP(_) => Ranking::Gradient,
        P::ActivationAPoZRankedFilterPruner(_) | P::ActivationAPoZRankedFilterPruner_AGP(_) => Ranking::ActivationApoz,
        _ => Ranking::ActivationMean,
    }
}

/// A `regularizers:` entry.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum RegularizerConfig {
    L1Regularizer {
        reg_regims: BTreeMap<String, f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        threshold_criteria: Option<String>,
    },
    GroupLassoRegularizer {
        reg_regims: BTreeMap<String, (f64, String)>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        threshold_criteria: Option<String>,
    },
    GroupVarianceRegularizer { reg_regims: BTreeMap<String, (f64, String)> },
}

/// Every regularizer class a schedule may name.
pub const REGULARIZER_CLASSES: &[&str] = &["L1Regularizer", "GroupLassoRegularizer", "GroupVarianceRegularizer"];

impl RegularizerConfig {
    /// The Distiller class name.
    pub fn class_name(&self) -> &'static str {
        class_name_of(self)
    }

    /// The parameter names it lists.
    pub fn parameter_names(&self) -> Vec<String> {
        match self {
            RegularizerConfig::L1Regularizer { reg_regims, .. } => reg_regims.keys().cloned().collect(),
            RegularizerConfig::GroupLassoRegularizer { reg_regims, .. } | RegularizerConfig::GroupVarianceRegularizer { reg_regims } => reg_regims.keys().cloned().collect(),
        }
    }

    /// The regularizer this entry describes.
    pub fn build(&self, name: &str) -> Result<Box<dyn Regularizer>> {
        Ok(match self {
            RegularizerConfig::L1Regularizer { reg_regims, threshold_criteria } => {
                Box::new(L1Regularizer::new(name, reg_regims.iter().map(|(k, v)| (k.clone(), *v)).collect(), threshold_criteria.as_deref())?)
            }
            RegularizerConfig::GroupLassoRegularizer { reg_regims, threshold_criteria } => {
                let regims = reg_regims
                    .iter()
                    .map(|(param, (strength, groups))| {
                        // `Channels+4D` and `4D+Channels` sum two penalties.
                        let groups = match groups.as_str() {
                            "Channels+4D" | "4D+Channels" => vec![GroupType::Channels, GroupType::Layer],
                            g => vec![g.parse()?],
                        };
                        Ok(GroupRegime { param: param.clone(), strength: *strength, groups })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Box::new(GroupLassoRegularizer::new(name, regims, threshold_criteria.as_deref())?)
            }
            RegularizerConfig::GroupVarianceRegularizer { reg_regims } => {
                let regims = reg_regims.iter().map(|(p, (s, g))| Ok((p.clone(), *s, g.parse()?))).collect::<Result<Vec<_>>>()?;
                Box::new(GroupVarianceRegularizer::new(name, regims)?)
            }
        })
    }
}

/// A key that may be absent (`None`: the default), `null` (`Some(None)`: floating point) or a value.
fn explicit_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<u32>>, D::Error> {
    Option::<u32>::deserialize(d).map(Some)
}

/// Parameters of `PostTrainLinearQuantizer`. `bits_activations`/`bits_parameters`: absent = 8 bits, `null` =
/// floating point (Distiller's meaning).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostTrainParams {
    #[serde(deserialize_with = "explicit_null", skip_serializing_if = "Option::is_none")]
    pub bits_activations: Option<Option<u32>>,
    #[serde(deserialize_with = "explicit_null", skip_serializing_if = "Option::is_none")]
    pub bits_parameters: Option<Option<u32>>,
    pub bits_accum: Option<u32>,
    pub overrides: Option<serde_yaml::Mapping>,
    pub mode: Option<serde_yaml::Value>,
    pub clip_acts: Option<String>,
    pub per_channel_wts: Option<bool>,
    pub model_activation_stats: Option<serde_yaml::Value>,
    pub fp16: Option<bool>,
    pub clip_n_stds: Option<f64>,
    pub clip_half_range: Option<bool>,
    pub scale_approx_mult_bits: Option<u32>,
    pub inputs_quant_auto_fallback: Option<bool>,
    pub fpq_module: Option<u32>,
    pub save_fp_weights: Option<bool>,
    pub also_clip_weights: Option<bool>,
    /// distill's key (Distiller has no switch): `false` turns off the net-aware ReLU fusion and statistics clipping.
    pub net_aware: Option<bool>,
    /// distill's key: cross-layer equalization (Nagel et al. 2019) before quantizing.
    pub cross_layer_equalization: Option<bool>,
    /// distill's key: `MSE` for MSE-optimal weight ranges, `NONE` (the default) for the full range.
    pub clip_weights: Option<String>,
    /// distill's key: bias correction after quantizing, `true`/`empirical` (needs calibration data) or
    /// `analytical` (from the batch norms).
    pub bias_correction: Option<serde_yaml::Value>,
    /// distill's key: AdaRound after quantizing (`true`, or a mapping of its settings; needs calibration data).
    pub adaround: Option<serde_yaml::Value>,
}

impl PostTrainParams {
    /// The rules between top-level keys, with the key that breaks one: `fpq_module` is 16, 32 or 64; `fp16: true`
    /// agrees with it; `clip_n_stds` comes with `clip_acts: N_STD`.
    pub fn check(&self) -> std::result::Result<(), (&'static str, Error)> {
        let bias_correction = match &self.bias_correction {
            Some(v) => crate::quantization::bias_correction::BiasCorrection::from_yaml(v).map_err(|e| ("bias_correction", e))?,
            None => None,
        };
        if let Some(v) = &self.adaround {
            let adaround = crate::quantization::adaround::AdaRound::from_yaml(v).map_err(|e| ("adaround", e))?;
            if adaround.is_some() && bias_correction.is_some() {
                return Err(("adaround", crate::quantization::post_train::adaround_with_bias_correction()));
            }
        }
        match self.clip_weights.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("NONE") => {}
            Some("MSE") if self.also_clip_weights == Some(true) => {
                return Err(("clip_weights", Error::invalid("clip_weights", "MSE clipping and also_clip_weights each set the weights' range: choose one")));
            }
            Some("MSE") => {}
            Some(_) => return Err(("clip_weights", Error::unknown("clip_weights mode", self.clip_weights.as_deref().unwrap_or(""), ["NONE", "MSE"]))),
        }
        if let Some(f) = self.fpq_module {
            if ![16, 32, 64].contains(&f) {
                return Err(("fpq_module", Error::invalid("fpq_module", format!("{f}: the floating-point width must be 16, 32 or 64"))));
            }
        }
        if self.fp16 == Some(true) && self.fpq_module.is_some_and(|f| f != 16) {
            return Err(("fp16", Error::invalid("fp16", "fp16: true conflicts with fpq_module other than 16 (as in Distiller)")));
        }
        if self.clip_n_stds.is_some() && self.clip_acts.as_deref().map(str::to_ascii_uppercase).as_deref() != Some("N_STD") {
            return Err(("clip_n_stds", Error::invalid("clip_n_stds", "applies to N_STD clipping; add clip_acts: N_STD")));
        }
        Ok(())
    }
}

/// Parameters of `QuantAwareTrainRangeLinearQuantizer`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QatParams {
    pub bits_activations: Option<u32>,
    pub bits_weights: Option<u32>,
    pub bits_bias: Option<u32>,
    pub overrides: Option<serde_yaml::Mapping>,
    pub mode: Option<serde_yaml::Value>,
    pub ema_decay: Option<f64>,
    pub per_channel_wts: Option<bool>,
    pub quantize_inputs: Option<bool>,
    pub num_bits_inputs: Option<u32>,
}

/// Parameters of `DorefaQuantizer`, `WRPNQuantizer` and (with the two clip fields) `PACTQuantizer`.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClippedParams {
    pub bits_activations: Option<u32>,
    pub bits_weights: Option<u32>,
    pub bits_bias: Option<u32>,
    pub overrides: Option<serde_yaml::Mapping>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act_clip_init_val: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act_clip_decay: Option<f64>,
}

/// A `quantizers:` entry (checked against Distiller's schema; quantizers themselves arrive with the
/// quantization work).
#[allow(missing_docs, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum QuantizerConfig {
    PostTrainLinearQuantizer(PostTrainParams),
    QuantAwareTrainRangeLinearQuantizer(QatParams),
    DorefaQuantizer(ClippedParams),
    PACTQuantizer(ClippedParams),
    WRPNQuantizer(ClippedParams),
}

/// Every quantizer class a schedule may name.
pub const QUANTIZER_CLASSES: &[&str] = &["PostTrainLinearQuantizer", "QuantAwareTrainRangeLinearQuantizer", "DorefaQuantizer", "PACTQuantizer", "WRPNQuantizer"];

const MODES: &[&str] = &["SYMMETRIC", "SYMMETRIC_RESTRICTED", "ASYMMETRIC_UNSIGNED", "ASYMMETRIC_SIGNED"];
use crate::quantization::q_utils::CLIP_MODE_NAMES as CLIP_MODES;

impl QuantizerConfig {
    /// The Distiller class name.
    pub fn class_name(&self) -> &'static str {
        class_name_of(self)
    }

    /// The `overrides` patterns, in order.
    pub fn override_patterns(&self) -> Vec<String> {
        let o = match self {
            QuantizerConfig::PostTrainLinearQuantizer(p) => &p.overrides,
            QuantizerConfig::QuantAwareTrainRangeLinearQuantizer(p) => &p.overrides,
            QuantizerConfig::DorefaQuantizer(p) | QuantizerConfig::PACTQuantizer(p) | QuantizerConfig::WRPNQuantizer(p) => &p.overrides,
        };
        o.iter().flat_map(|m| m.keys()).filter_map(|k| k.as_str().map(String::from)).collect()
    }

    /// Checks modes, clipping modes, bit widths and the overrides (valid regexes, known keys). Returns the
    /// offending YAML key with the error.
    pub fn validate(&self) -> std::result::Result<(), (Vec<String>, Error)> {
        let mode_ok = |m: &Option<serde_yaml::Value>| -> std::result::Result<(), (Vec<String>, Error)> {
            let check = |v: &serde_yaml::Value, at: Vec<String>| match v.as_str() {
                Some(s) if MODES.contains(&s) => Ok(()),
                _ => Err((at, Error::unknown("quantization mode", &yaml_text(v), MODES.iter().copied()))),
            };
            match m {
                None => Ok(()),
                Some(serde_yaml::Value::Mapping(map)) => {
                    for (k, v) in map {
                        let key = yaml_text(k);
                        if key != "activations" && key != "weights" {
                            return Err((vec!["mode".into(), key.clone()], Error::unknown("mode key", &key, ["activations", "weights"])));
                        }
                        check(v, vec!["mode".into(), key])?;
                    }
                    Ok(())
                }
                Some(v) => check(v, vec!["mode".into()]),
            }
        };
        let bits_ok = |name: &str, b: Option<u32>| match b {
            Some(b) if b == 0 || b > 32 => Err((vec![name.to_string()], Error::invalid(name, format!("{b} bits: must be 1..=32")))),
            _ => Ok(()),
        };
        let (overrides, bits) = match self {
            QuantizerConfig::PostTrainLinearQuantizer(p) => {
                mode_ok(&p.mode)?;
                if let Some(c) = &p.clip_acts {
                    if !CLIP_MODES.contains(&c.as_str()) {
                        return Err((vec!["clip_acts".into()], Error::unknown("clip mode", c, CLIP_MODES.iter().copied())));
                    }
                }
                p.check().map_err(|(key, e)| (vec![key.to_string()], e))?;
                (
                    &p.overrides,
                    vec![
                        ("bits_activations", p.bits_activations.flatten().filter(|b| *b != 0)),
                        ("bits_parameters", p.bits_parameters.flatten().filter(|b| *b != 0)),
                        ("bits_accum", p.bits_accum),
                        ("scale_approx_mult_bits", p.scale_approx_mult_bits),
                    ],
                )
            }
            QuantizerConfig::QuantAwareTrainRangeLinearQuantizer(p) => {
                mode_ok(&p.mode)?;
                if let Some(d) = p.ema_decay {
                    if !(0.0..1.0).contains(&d) {
                        return Err((vec!["ema_decay".into()], Error::invalid("ema_decay", format!("{d} must lie in [0, 1)"))));
                    }
                }
                (&p.overrides, vec![("bits_activations", p.bits_activations), ("bits_weights", p.bits_weights), ("bits_bias", p.bits_bias)])
            }
            QuantizerConfig::DorefaQuantizer(p) | QuantizerConfig::PACTQuantizer(p) | QuantizerConfig::WRPNQuantizer(p) => {
                (&p.overrides, vec![("bits_activations", p.bits_activations), ("bits_weights", p.bits_weights), ("bits_bias", p.bits_bias)])
            }
        };
        for (name, b) in bits {
            bits_ok(name, b)?;
        }
        let (allowed, start) = match self {
            QuantizerConfig::PostTrainLinearQuantizer(p) => {
                let clip = match &p.clip_acts {
                    Some(c) => ClipMode::parse(c, p.clip_n_stds).map_err(|e| (vec!["clip_acts".to_string()], e))?,
                    None => ClipMode::None,
                };
                (POST_TRAIN_OVERRIDE_KEYS, ModuleQuantSettings::from_defaults(&QuantDefaults { clip_acts: clip, ..QuantDefaults::float() }))
            }
            QuantizerConfig::QuantAwareTrainRangeLinearQuantizer(_) => (QAT_OVERRIDE_KEYS, ModuleQuantSettings::from_defaults(&QuantDefaults::float())),
            _ => (CLIPPED_OVERRIDE_KEYS, ModuleQuantSettings::from_defaults(&QuantDefaults::float())),
        };
        for (pattern, settings) in overrides.iter().flatten() {
            let pattern = yaml_text(pattern);
            let at = vec!["overrides".to_string(), pattern.clone()];
            if let Err(e) = regex::Regex::new(&pattern) {
                return Err((at, Error::invalid("overrides", format!("'{pattern}' is not a valid regex: {e}"))));
            }
            match settings {
                serde_yaml::Value::Mapping(m) => {
                    // Each key alone, so that the error points at it.
                    for (k, v) in m {
                        let key = yaml_text(k);
                        let mut one = serde_yaml::Mapping::new();
                        one.insert(k.clone(), v.clone());
                        if key == "clip_acts" {
                            if let Some(n) = m.get("clip_n_stds") {
                                one.insert("clip_n_stds".into(), n.clone());
                            }
                        }
                        if key == "clip_n_stds" && m.contains_key("clip_acts") {
                            continue;
                        }
                        if let Err(e) = apply_override(&mut start.clone(), &one, allowed) {
                            let mut at = at.clone();
                            at.push(key.clone());
                            let e = if allowed.contains(&key.as_str()) {
                                e
                            } else {
                                Error::invalid("overrides", format!("{}: {}", self.class_name(), e))
                            };
                            return Err((at, e));
                        }
                    }
                }
                serde_yaml::Value::Null => {}
                other => return Err((at, Error::invalid("overrides", format!("settings for '{pattern}' must be a mapping, got {}", yaml_text(other))))),
            }
        }
        Ok(())
    }
}

/// A YAML scalar as text (for messages and keys).
pub(crate) fn yaml_text(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Null => "null".into(),
        other => serde_yaml::to_string(other).map(|s| s.trim().to_string()).unwrap_or_default(),
    }
}

impl QuantizerConfig {
    /// The quantization-aware quantizer this entry describes; `PostTrainLinearQuantizer` is applied after
    /// training (`distill quantize`), not scheduled, as in Distiller.
    pub fn qat(&self) -> Result<crate::quantization::qat::QatQuantizer> {
        use crate::quantization::qat::{QatMethod, QatQuantizer};
        use crate::quantization::quantizer::{ModeSpec, Overrides, QBits};
        let bits = |b: Option<u32>, name: &str| -> Result<Option<u32>> {
            match b {
                Some(b) => crate::quantization::q_utils::check_bits(name, b).map(|_| Some(b)),
                None => Ok(None),
            }
        };
        let overrides = |o: &Option<serde_yaml::Mapping>| o.as_ref().map(Overrides::from_mapping).transpose().map(Option::unwrap_or_default);
        Ok(match self {
            QuantizerConfig::PostTrainLinearQuantizer(_) => {
                return Err(Error::invalid(
                    "quantizer policy",
                    "PostTrainLinearQuantizer is applied after training with `distill quantize`, not scheduled (as in Distiller)",
                ))
            }
            QuantizerConfig::QuantAwareTrainRangeLinearQuantizer(p) => QatQuantizer {
                method: QatMethod::RangeLinear {
                    mode: match &p.mode {
                        Some(m) => ModeSpec::from_yaml(m)?,
                        None => ModeSpec::both(crate::quantization::q_utils::LinearQuantMode::Symmetric),
                    },
                    ema_decay: p.ema_decay.unwrap_or(0.999),
                    per_channel_wts: p.per_channel_wts.unwrap_or(false),
                    quantize_inputs: p.quantize_inputs.unwrap_or(true),
                    num_bits_inputs: bits(p.num_bits_inputs, "num_bits_inputs")?,
                },
                bits: QBits { acts: bits(p.bits_activations, "bits_activations")?, wts: bits(p.bits_weights, "bits_weights")?, bias: bits(p.bits_bias.or(Some(32)), "bits_bias")? },
                overrides: overrides(&p.overrides)?,
            },
            QuantizerConfig::DorefaQuantizer(p) | QuantizerConfig::PACTQuantizer(p) | QuantizerConfig::WRPNQuantizer(p) => QatQuantizer {
                method: match self {
                    QuantizerConfig::DorefaQuantizer(_) => QatMethod::Dorefa,
                    QuantizerConfig::WRPNQuantizer(_) => QatMethod::Wrpn,
                    _ => QatMethod::Pact { act_clip_init_val: p.act_clip_init_val.unwrap_or(8.0), act_clip_decay: p.act_clip_decay },
                },
                bits: QBits { acts: bits(p.bits_activations, "bits_activations")?, wts: bits(p.bits_weights, "bits_weights")?, bias: None },
                overrides: overrides(&p.overrides)?,
            },
        })
    }
}

/// `thinning_func_str` of a remover: which of Distiller's thinning functions it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThinningFunc {
    /// Remove zero filters.
    RemoveFilters,
    /// Remove zero input channels.
    RemoveChannels,
    /// Filters, then channels.
    ContractModel,
}

/// Parameters of `FilterRemover`, `ChannelRemover` and `StructureRemover` (one class under three names in
/// Distiller: `thinning_func_str` decides what is removed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoverParams {
    /// `remove_filters`, `remove_channels` or `contract_model`.
    pub thinning_func_str: ThinningFunc,
    /// Distiller's architecture name; accepted and not needed (the data-flow graph comes from the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Distiller's dataset name, which it used for a dummy input; accepted and not needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Beyond Distiller: keep every thinned channel count a multiple of this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_to: Option<i64>,
    /// Beyond Distiller: `Leader` lets the first member of a coupled channel decide for all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_dependency: Option<String>,
}

/// An `extensions:` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExtensionConfig {
    /// Distiller's alias of `StructureRemover`.
    FilterRemover(RemoverParams),
    /// Distiller's alias of `StructureRemover`.
    ChannelRemover(RemoverParams),
    /// Physical removal of zero structures.
    StructureRemover(RemoverParams),
}

/// Every extension class.
pub const EXTENSION_CLASSES: &[&str] = &["FilterRemover", "ChannelRemover", "StructureRemover"];

impl ExtensionConfig {
    fn params(&self) -> &RemoverParams {
        match self {
            ExtensionConfig::FilterRemover(p) | ExtensionConfig::ChannelRemover(p) | ExtensionConfig::StructureRemover(p) => p,
        }
    }

    /// The thinning policy this entry describes; checks every value.
    pub fn build(&self, name: &str) -> Result<crate::thinning::ThinningPolicy> {
        use crate::thinning::{Structure, Thinner};
        let p = self.params();
        let mut thinner = Thinner::filters();
        if let Some(n) = p.round_to {
            if n < 1 {
                return Err(Error::invalid("round_to", format!("must be at least 1, got {n}")));
            }
            thinner = thinner.round_to(n);
        }
        match p.group_dependency.as_deref() {
            None => {}
            Some("Leader") => thinner = thinner.leader(),
            Some(other) => return Err(Error::invalid("group_dependency", format!("'{other}' is not a coupling; the one value is Leader"))),
        }
        let steps = match p.thinning_func_str {
            ThinningFunc::RemoveFilters => vec![Structure::Filters],
            ThinningFunc::RemoveChannels => vec![Structure::Channels],
            ThinningFunc::ContractModel => vec![Structure::Filters, Structure::Channels],
        };
        Ok(crate::thinning::ThinningPolicy::new(name, thinner, steps))
    }
}

/// Parameters of `KnowledgeDistillation` (beyond Distiller, where distillation is set on the command line only:
/// its issue #483). Weights and temperature default to Distiller's command-line defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnowledgeDistillationParams {
    /// The teacher's architecture (a zoo model of the student's dataset).
    pub teacher: String,
    /// The teacher's trained checkpoint; a relative path is read from the schedule file's folder.
    pub teacher_checkpoint: String,
    /// Softmax temperature (1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Weight of the distillation term (0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill_weight: Option<f64>,
    /// Weight of the student's loss (0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student_weight: Option<f64>,
    /// Weight of a teacher loss: must be 0 (0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_weight: Option<f64>,
}

/// A `distillers:` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DistillerConfig {
    /// Knowledge distillation from a trained teacher.
    KnowledgeDistillation(KnowledgeDistillationParams),
}

/// Every distiller class.
pub const DISTILLER_CLASSES: &[&str] = &["KnowledgeDistillation"];

impl DistillerConfig {
    fn params(&self) -> &KnowledgeDistillationParams {
        match self {
            DistillerConfig::KnowledgeDistillation(p) => p,
        }
    }

    /// The temperature.
    pub fn temperature(&self) -> f64 {
        self.params().temperature.unwrap_or(1.0)
    }

    /// The loss weights.
    pub fn weights(&self) -> crate::distillation::LossWeights {
        let p = self.params();
        let d = crate::distillation::LossWeights::default();
        crate::distillation::LossWeights { distill: p.distill_weight.unwrap_or(d.distill), student: p.student_weight.unwrap_or(d.student), teacher: p.teacher_weight.unwrap_or(d.teacher) }
    }

    /// The teacher's checkpoint, resolved against `base_dir` (the schedule file's folder).
    pub fn teacher_checkpoint(&self, base_dir: &std::path::Path) -> std::path::PathBuf {
        base_dir.join(&self.params().teacher_checkpoint)
    }

    /// Checks every value that needs no model: the temperature, the weights and the teacher's architecture.
    pub fn validate(&self) -> Result<()> {
        crate::distillation::check_temperature(self.temperature())?;
        self.weights().validate().map_err(|e| match e {
            Error::InvalidArgument { name, message } => Error::InvalidArgument { name: name.replace(' ', "_"), message },
            other => other,
        })?;
        let zoo = crate::models::architectures(None);
        if !zoo.contains(&self.params().teacher.as_str()) {
            return Err(Error::invalid("teacher", Error::unknown("architecture", &self.params().teacher, zoo).to_string()));
        }
        Ok(())
    }

    /// The policy for `student`: the teacher built for the student's dataset and device and loaded from its
    /// checkpoint, checked against the student.
    pub fn build(&self, student: &crate::nn::Model, base_dir: &std::path::Path) -> Result<crate::distillation::KnowledgeDistillationPolicy> {
        self.validate()?;
        let info = student.info();
        let teacher = crate::models::create_model(&self.params().teacher, &info.dataset, student.device())?;
        let path = self.teacher_checkpoint(base_dir);
        crate::distillation::KnowledgeDistillationPolicy::from_checkpoint(teacher, &path, self.temperature(), self.weights(), student)
    }
}
