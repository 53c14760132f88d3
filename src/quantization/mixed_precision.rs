//! Automatic mixed precision: each layer's weights get the bit width that costs the model least under a budget
//! on the weights' size or on the bit operations (BOPs) of a forward pass.
//!
//! The sensitivity of layer `l` at `b` bits is how much the quantized model gets worse on the calibration batches
//! when `l` alone drops from the widest candidate to `b` bits, every other searched layer staying at the widest.
//! "Worse" is one of two [`Measure`]s: the growth of the mean squared error of the outputs against the
//! floating-point model's ([`Measure::OutputMse`], smooth, needs no labels), or the drop of top-1 accuracy in points
//! against the labels ([`Measure::Top1`]: what a user reports, but counted in whole samples, so layers whose drop
//! is below one sample tie at 0; the output error decides between choices of equal top-1, and enough calibration
//! samples keep such ties few).
//! Taking those costs as additive, the choice minimizing their sum within the budget is a multiple-choice
//! knapsack, solved exactly by dynamic programming ([`choose_bits`]). The model with the chosen widths is then
//! measured too, which shows how far additivity held.
//!
//! The budget's resource of layer `l` at `b` weight bits is either its packed weights, `weights_l · b / 8` bytes,
//! or its BOPs per sample, `MACs_l · b · a_l` with `a_l` the bit width of its input activations (32 when they stay
//! in floating point) and MACs counted by Distiller's rules
//! ([`model_performance_summary`](crate::summary::tables::model_performance_summary)). BOPs weigh a convolution
//! applied at every pixel far above a fully connected layer of as many weights, so the two budgets choose
//! differently. Only the searched layers count towards either budget.
//!
//! The result is a set of `overrides` (`conv1: {bits_weights: 4}`), written into the quantizer's YAML so it can be
//! reviewed and reused. Layers that the configuration's own overrides already match keep them and are not
//! searched.
//!
//! ```no_run
//! use distill::quantization::mixed_precision::{Budget, Measure, MixedPrecision};
//! use distill::quantization::post_train::Calibration;
//! use distill::quantization::range_linear::PostTrainConfig;
//! # let (model, data) = (distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?, distill::data::mnist_bundled()?);
//! let config = PostTrainConfig { per_channel_wts: true, ..PostTrainConfig::default() };
//! let search = MixedPrecision { candidates: vec![2, 4, 8], budget: Budget::BopsOfUniform(4.0), measure: Measure::Top1 };
//! let choice = search.search(&model, &config, &Calibration::new(&data.valid, 4, 128))?;
//! println!("{}", choice.overrides_yaml());
//! # Ok::<(), distill::Error>(())
//! ```
use std::path::Path;

use polars::prelude::*;
use serde_yaml::{Mapping, Value};
use tch::{Kind, Tensor};

use super::post_train::Calibration;
use super::quantizer::Overrides;
use super::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
use super::stats::collect_activation_stats;
use crate::nn::Model;
use crate::{Error, Result};

/// The budget the chosen widths must fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this many bytes of packed weights (`weights · bits / 8`; biases and activations are not counted).
    Bytes(f64),
    /// At most this many bits per weight on average (4.0: the size of uniform 4-bit weights).
    AverageBits(f64),
    /// At most this many bit operations per sample (`Σ MACs · weight bits · activation bits`).
    Bops(f64),
    /// At most the BOPs of every searched layer at this many weight bits (4.0: the BOPs of uniform 4-bit weights).
    BopsOfUniform(f64),
}

/// What a [`Budget`] limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Bytes of packed weights.
    WeightBytes,
    /// Bit operations per sample.
    Bops,
}

impl Budget {
    /// The resource this budget limits.
    pub fn resource(&self) -> Resource {
        match self {
            Budget::Bytes(_) | Budget::AverageBits(_) => Resource::WeightBytes,
            Budget::Bops(_) | Budget::BopsOfUniform(_) => Resource::Bops,
        }
    }
}

impl Resource {
    /// The unit the resource is counted in.
    pub fn unit(&self) -> &'static str {
        match self {
            Resource::WeightBytes => "bytes of weights",
            Resource::Bops => "BOPs",
        }
    }
}

/// How a layer's sensitivity is measured on the calibration batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Measure {
    /// Growth of the outputs' mean squared error against the floating-point model's.
    #[default]
    OutputMse,
    /// Drop of top-1 accuracy in points, against the batches' labels.
    Top1,
}

impl Measure {
    /// The measure's name, as in the sensitivity tables.
    pub fn name(&self) -> &'static str {
        match self {
            Measure::OutputMse => "output MSE",
            Measure::Top1 => "top-1",
        }
    }
}

/// The search's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPrecision {
    /// Bit widths a layer may get (each 2–16).
    pub candidates: Vec<u32>,
    /// The budget.
    pub budget: Budget,
    /// The sensitivity measure.
    pub measure: Measure,
}

impl Default for MixedPrecision {
    /// {2, 4, 8} bits at the size of uniform 4-bit weights, by output MSE.
    fn default() -> Self {
        MixedPrecision { candidates: vec![2, 4, 8], budget: Budget::AverageBits(4.0), measure: Measure::OutputMse }
    }
}

/// One layer at one bit width.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSensitivity {
    /// The layer.
    pub layer: String,
    /// Its weights.
    pub weights: i64,
    /// Its multiply-accumulates per sample.
    pub macs: i64,
    /// The bit width of its input activations (32 in floating point).
    pub activation_bits: u32,
    /// The bit width.
    pub bits: u32,
    /// How much worse the model gets with this layer alone at `bits`, in the measure's unit (0 at the widest
    /// candidate).
    pub sensitivity: f64,
    /// The growth of the outputs' mean squared error with this layer alone at `bits` (the sensitivity itself by
    /// output MSE; what decides between choices of equal top-1).
    pub output_mse_growth: f64,
}

/// A quantized model's score on the calibration batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Mean squared error of the outputs against the floating-point model's.
    pub output_mse: f64,
    /// Top-1 accuracy in percent.
    pub top1: f64,
}

impl Score {
    fn get(&self, measure: Measure) -> f64 {
        match measure {
            Measure::OutputMse => self.output_mse,
            Measure::Top1 => self.top1,
        }
    }
}

/// What [`MixedPrecision::search`] chose.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPrecisionChoice {
    /// The sensitivity measure.
    pub measure: Measure,
    /// What the budget limits.
    pub resource: Resource,
    /// The budget, in the resource's unit.
    pub limit: f64,
    /// Every searched layer at every candidate.
    pub sensitivities: Vec<LayerSensitivity>,
    /// The chosen bit width of each searched layer, in the model's order.
    pub bits: Vec<(String, u32)>,
    /// The chosen weights' packed size in bytes.
    pub weight_bytes: f64,
    /// The chosen widths' bit operations per sample.
    pub bops: f64,
    /// Every searched layer at the widest candidate.
    pub baseline: Score,
    /// The measure the additive model predicts for the choice (output MSE, or top-1 in percent).
    pub predicted: f64,
    /// Measured with the choice.
    pub measured: Score,
}

struct SearchedLayer {
    name: String,
    weights: i64,
    macs: i64,
    activation_bits: u32,
}

impl SearchedLayer {
    /// The budget's resource per weight bit.
    fn per_bit(&self, resource: Resource) -> f64 {
        match resource {
            Resource::WeightBytes => self.weights as f64 / 8.0,
            Resource::Bops => self.macs as f64 * self.activation_bits as f64,
        }
    }
}

impl MixedPrecision {
    /// Measures every searched layer's sensitivity on `calibration` and chooses the bit widths (see the module's
    /// text). `model` is the floating-point model (left unchanged); `config` the quantizer's settings, whose
    /// `bits_parameters` must quantize weights. With activation bits, calibration statistics are collected once
    /// and used throughout.
    pub fn search(&self, model: &Model, config: &PostTrainConfig, calibration: &Calibration) -> Result<MixedPrecisionChoice> {
        let candidates = self.checked_candidates()?;
        if config.bits_parameters.is_none() {
            return Err(Error::invalid("bits_parameters", "mixed precision chooses the weights' bit widths, but this configuration keeps weights in floating point: set bits_parameters"));
        }
        if calibration.batches == 0 || calibration.batch_size == 0 || calibration.data.is_empty() {
            return Err(Error::invalid("calibration", "mixed precision measures each layer on calibration batches: give at least one"));
        }
        let mut float = crate::models::copy_model(model)?;
        float.eval();
        let layers = searched_layers(&mut float, config)?;
        let resource = self.budget.resource();
        let per_bit: Vec<f64> = layers.iter().map(|l| l.per_bit(resource)).collect();
        let total_per_bit: f64 = per_bit.iter().sum();
        let limit = match self.budget {
            Budget::Bytes(v) | Budget::Bops(v) => v,
            Budget::AverageBits(bits) | Budget::BopsOfUniform(bits) => bits * total_per_bit,
        };
        let smallest = total_per_bit * candidates[0] as f64;
        if !(limit.is_finite() && limit >= smallest) {
            return Err(Error::invalid(
                "budget",
                format!("{limit} {}: no assignment fits, the smallest ({} bits everywhere) takes {smallest} for the {} searched layers", resource.unit(), candidates[0], layers.len()),
            ));
        }
        let batches: Vec<(Tensor, Tensor)> = calibration.data.batches(calibration.batch_size, model.device())?.take(calibration.batches).collect::<Result<_>>()?;
        let reference: Vec<Tensor> = batches.iter().map(|(x, _)| tch::no_grad(|| float.forward_t(x, false))).collect::<Result<_>>()?;
        let mut config = config.clone();
        if config.bits_activations.is_some() && config.stats.is_none() {
            config.stats = Some(collect_activation_stats(&mut float, calibration.data, calibration.batches, calibration.batch_size)?);
        }
        let widest = *candidates.last().unwrap_or(&8);
        let score = |bits: &[u32]| -> Result<Score> {
            let overrides = with_weight_bits(&config.overrides, layers.iter().map(|l| l.name.as_str()).zip(bits.iter().copied()))?;
            let mut quantized = crate::models::copy_model(model)?;
            PostTrainLinearQuantizer::new(PostTrainConfig { overrides, ..config.clone() }).prepare_model(&mut quantized)?;
            let (mut mse, mut correct, mut samples) = (0.0, 0i64, 0i64);
            for ((x, y), r) in batches.iter().zip(&reference) {
                let q = tch::no_grad(|| quantized.forward_t(x, false))?;
                mse += q.f_sub(r)?.f_square()?.f_mean(Kind::Double)?.f_double_value(&[])?;
                correct += q.f_argmax(1, false)?.f_eq_tensor(y)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
                samples += y.size()[0];
            }
            Ok(Score { output_mse: mse / batches.len().max(1) as f64, top1: 100.0 * correct as f64 / samples.max(1) as f64 })
        };
        // How much worse `s` is than the baseline, in the measure's unit.
        let worse = |s: &Score, base: &Score| match self.measure {
            Measure::OutputMse => s.output_mse - base.output_mse,
            Measure::Top1 => base.top1 - s.top1,
        };
        let all_widest = vec![widest; layers.len()];
        let baseline = score(&all_widest)?;
        let mut sensitivities = Vec::with_capacity(layers.len() * candidates.len());
        let (mut costs, mut ties) = (Vec::with_capacity(layers.len()), Vec::with_capacity(layers.len()));
        for (i, layer) in layers.iter().enumerate() {
            let (mut row, mut tie_row) = (Vec::with_capacity(candidates.len()), Vec::with_capacity(candidates.len()));
            for &b in &candidates {
                let (sensitivity, mse_growth) = if b == widest {
                    (0.0, 0.0)
                } else {
                    let mut bits = all_widest.clone();
                    bits[i] = b;
                    let s = score(&bits)?;
                    (worse(&s, &baseline), s.output_mse - baseline.output_mse)
                };
                tie_row.push(mse_growth);
                sensitivities.push(LayerSensitivity {
                    layer: layer.name.clone(),
                    weights: layer.weights,
                    macs: layer.macs,
                    activation_bits: layer.activation_bits,
                    bits: b,
                    sensitivity,
                    output_mse_growth: mse_growth,
                });
                row.push(sensitivity);
            }
            costs.push(row);
            ties.push(tie_row);
        }
        // Top-1 counts whole samples, so many choices tie on it: the output error decides between them.
        let chosen = choose_bits_with_ties(&per_bit, &candidates, &costs, Some(&ties), limit)?;
        let bits: Vec<u32> = chosen.iter().map(|&c| candidates[c]).collect();
        let measured = score(&bits)?;
        let total_cost: f64 = chosen.iter().enumerate().map(|(l, &c)| costs[l][c]).sum();
        let predicted = match self.measure {
            Measure::OutputMse => baseline.get(self.measure) + total_cost,
            Measure::Top1 => baseline.get(self.measure) - total_cost,
        };
        let spent = |resource: Resource| layers.iter().zip(&bits).map(|(l, &b)| l.per_bit(resource) * b as f64).sum();
        Ok(MixedPrecisionChoice {
            measure: self.measure,
            resource,
            limit,
            sensitivities,
            weight_bytes: spent(Resource::WeightBytes),
            bops: spent(Resource::Bops),
            bits: layers.into_iter().map(|l| l.name).zip(bits).collect(),
            baseline,
            predicted,
            measured,
        })
    }

    fn checked_candidates(&self) -> Result<Vec<u32>> {
        let mut c = self.candidates.clone();
        c.sort_unstable();
        c.dedup();
        if c.is_empty() {
            return Err(Error::invalid("bit widths", "give at least one candidate bit width (2–16)"));
        }
        if let Some(b) = c.iter().find(|b| !(2..=16).contains(*b)) {
            return Err(Error::invalid("bit widths", format!("{b} is outside 2–16: 1-bit weights are not range-linear quantization, and above 16 bits there is nothing to choose")));
        }
        Ok(c)
    }
}

/// The Conv2d and Linear layers the search chooses widths for (those no override of `config` matches), with
/// their weights, MACs and input activation bits.
fn searched_layers(float: &mut Model, config: &PostTrainConfig) -> Result<Vec<SearchedLayer>> {
    let compute = crate::summary::tables::model_performance_summary(float, 1)?;
    let names = crate::summary::tables::column(&compute, "Name")?.str()?.clone();
    let macs = crate::summary::tables::column(&compute, "MACs")?.i64()?.clone();
    let settings = PostTrainLinearQuantizer::new(config.clone()).resolved_settings(float)?;
    let mut layers = Vec::new();
    for m in float.named_modules().into_iter().filter(|m| (m.type_name == "Conv2d" || m.type_name == "Linear") && !config.overrides.matches(&m.name)) {
        let row = names.iter().position(|n| n == Some(m.name.as_str()));
        let macs = row.and_then(|r| macs.get(r)).ok_or_else(|| Error::invalid("mixed precision", format!("{} did not run in a forward pass, so its MACs are unknown", m.name)))?;
        let activation_bits = settings.iter().find(|(n, ..)| *n == m.name).and_then(|(.., s)| s.bits.acts).unwrap_or(32);
        let weights = float.parameter(&format!("{}.weight", m.name))?.numel() as i64;
        layers.push(SearchedLayer { name: m.name, weights, macs, activation_bits });
    }
    if layers.is_empty() {
        return Err(Error::invalid("mixed precision", "no Conv2d or Linear to search: every one is matched by the configuration's overrides"));
    }
    Ok(layers)
}

/// The candidate index for each layer minimizing the summed `costs[layer][candidate]` with
/// `Σ per_bit[layer] · candidates[c] ≤ limit` (a layer's resource grows linearly with its bit width: bytes of
/// weights, or BOPs): a multiple-choice knapsack solved by dynamic programming over the resource, in units of the
/// greatest common divisor of every layer's resource at every width (exact, when those are whole numbers) while
/// that needs at most 4 million steps, else of 1/4,000,000 of the limit with each layer's resource rounded up (the
/// result still fits, and may miss an assignment that fits only to within that rounding). Negative costs count
/// as 0. Among assignments of equal cost, the one using more of the budget wins.
pub fn choose_bits(per_bit: &[f64], candidates: &[u32], costs: &[Vec<f64>], limit: f64) -> Result<Vec<usize>> {
    choose_bits_with_ties(per_bit, candidates, costs, None, limit)
}

/// [`choose_bits`], with equal summed `costs` decided by the summed `ties` (same layout), then by the budget used.
pub fn choose_bits_with_ties(per_bit: &[f64], candidates: &[u32], costs: &[Vec<f64>], ties: Option<&[Vec<f64>]>, limit: f64) -> Result<Vec<usize>> {
    const STEPS: f64 = 4_000_000.0;
    // Bytes of weights count in bits, so that a layer's size at any width is a whole number.
    let (scale, whole) = if per_bit.iter().all(|p| (p * 8.0).fract() == 0.0) { (8.0, true) } else { (1.0, false) };
    let budget_bits = limit * scale;
    let sizes: Vec<f64> = per_bit.iter().map(|p| p * scale).collect();
    let gcd = sizes.iter().filter(|_| whole).flat_map(|&n| candidates.iter().map(move |&b| (n as u64) * b as u64)).fold(0u64, |a, b| {
        let (mut a, mut b) = (a, b);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    });
    let unit = if gcd > 0 && budget_bits / gcd as f64 <= STEPS { gcd as f64 } else { (budget_bits / STEPS).max(1.0) };
    // The small slack keeps a budget that is an exact multiple of the unit from losing its last unit to rounding.
    let cap = (budget_bits / unit + 1e-9).floor() as usize;
    let units: Vec<Vec<usize>> = sizes.iter().map(|n| candidates.iter().map(|&b| (n * b as f64 / unit).ceil() as usize).collect()).collect();
    let cost = |l: usize, c: usize| (costs[l][c].max(0.0), ties.map_or(0.0, |t| t[l][c].max(0.0)));
    // Costs are compared with a tolerance, so that sums of the same costs in another order still tie.
    let better = |a: (f64, f64), b: (f64, f64)| {
        if !b.0.is_finite() {
            return a.0.is_finite();
        }
        let tol = 1e-9 * a.0.abs().max(b.0.abs()).max(1.0);
        a.0 < b.0 - tol || (a.0 <= b.0 + tol && a.1 < b.1 - 1e-9 * a.1.abs().max(b.1.abs()).max(1e-300))
    };
    const NONE: (f64, f64) = (f64::INFINITY, f64::INFINITY);
    let mut best = vec![NONE; cap + 1];
    best[0] = (0.0, 0.0);
    // choice[l][u]: the candidate layer l takes in the best assignment of layers 0..=l using u units.
    let mut choice: Vec<Vec<u8>> = Vec::with_capacity(sizes.len());
    for (l, layer_units) in units.iter().enumerate() {
        let mut next = vec![NONE; cap + 1];
        let mut picked = vec![u8::MAX; cap + 1];
        for (u, &so_far) in best.iter().enumerate() {
            if !so_far.0.is_finite() {
                continue;
            }
            for (c, &w) in layer_units.iter().enumerate() {
                let add = cost(l, c);
                let (v, total) = (u + w, (so_far.0 + add.0, so_far.1 + add.1));
                if v <= cap && better(total, next[v]) {
                    (next[v], picked[v]) = (total, c as u8);
                }
            }
        }
        best = next;
        choice.push(picked);
    }
    // The last of the cheapest: the one using the most of the budget.
    let mut found: Option<usize> = None;
    for (u, &c) in best.iter().enumerate().filter(|(_, c)| c.0.is_finite()) {
        if found.map_or(true, |f| !better(best[f], c)) {
            found = Some(u);
        }
    }
    let mut u = found.ok_or_else(|| {
        Error::invalid("budget", format!("{limit}: no assignment of the candidate widths fits (each layer's share rounded up to units of {:.1})", unit / scale))
    })?;
    let mut result = vec![0; sizes.len()];
    for l in (0..sizes.len()).rev() {
        let c = choice[l][u] as usize;
        result[l] = c;
        u -= units[l][c];
    }
    Ok(result)
}

impl MixedPrecisionChoice {
    /// `config` with the chosen widths as exact-name overrides.
    pub fn apply(&self, config: &PostTrainConfig) -> Result<PostTrainConfig> {
        let overrides = with_weight_bits(&config.overrides, self.bits.iter().map(|(l, b)| (l.as_str(), *b)))?;
        Ok(PostTrainConfig { overrides, ..config.clone() })
    }

    /// The chosen widths as YAML `overrides` entries.
    pub fn overrides_yaml(&self) -> String {
        let mut text = String::from("overrides:\n");
        for (layer, b) in &self.bits {
            text.push_str(&format!("  {layer}: {{bits_weights: {b}}}\n"));
        }
        text
    }

    /// Writes the schedule at `base` (one `PostTrainLinearQuantizer`) to `out` with the chosen widths added to its
    /// `overrides` (the base's own entries first; comments are not kept). The result loads with
    /// [`PostTrainConfig::from_schedule_file`].
    pub fn write_schedule(&self, base: impl AsRef<Path>, out: impl AsRef<Path>) -> Result<()> {
        let base = base.as_ref();
        let text = crate::config::read_text_file(base)?;
        let mut doc: Value = serde_yaml::from_str(&text).map_err(|e| Error::data(base, format!("malformed YAML: {e}")))?;
        let quantizers = doc.get_mut("quantizers").and_then(Value::as_mapping_mut).ok_or_else(|| Error::data(base, "has no quantizers section"))?;
        let mut sections = quantizers.values_mut().filter(|q| q.get("class").and_then(Value::as_str) == Some("PostTrainLinearQuantizer"));
        let (Some(section), None) = (sections.next(), sections.next()) else {
            return Err(Error::data(base, "must define exactly one PostTrainLinearQuantizer"));
        };
        let section = section.as_mapping_mut().ok_or_else(|| Error::data(base, "the quantizer is not a mapping"))?;
        // A statistics file named relative to the base schedule stays found from the new one's folder.
        if let Some(Value::String(stats)) = section.get_mut("model_activation_stats") {
            let path = Path::new(stats.as_str());
            if path.is_relative() {
                let absolute = base.parent().unwrap_or(Path::new(".")).join(path);
                *stats = std::fs::canonicalize(&absolute).unwrap_or(absolute).display().to_string();
            }
        }
        let overrides = section.entry("overrides".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
        if overrides.is_null() {
            *overrides = Value::Mapping(Mapping::new());
        }
        let overrides = overrides.as_mapping_mut().ok_or_else(|| Error::data(base, "its overrides are not a mapping"))?;
        for (layer, b) in &self.bits {
            overrides.insert(layer.clone().into(), Value::Mapping(bits_override(*b)));
        }
        let text = serde_yaml::to_string(&doc).map_err(|e| Error::invalid("mixed precision", e.to_string()))?;
        crate::io::write_atomic(out.as_ref(), text.as_bytes())
    }

    /// The sensitivities, one row per layer and width (`layer`, `weights`, `MACs`, `activation bits`, `bits`,
    /// `sensitivity (output MSE)` or `sensitivity (top-1)`, `chosen`), with the chosen width marked.
    pub fn frame(&self) -> Result<DataFrame> {
        let chosen: Vec<bool> = self.sensitivities.iter().map(|s| self.bits.iter().any(|(l, b)| *l == s.layer && *b == s.bits)).collect();
        let sensitivity = format!("sensitivity ({})", self.measure.name());
        Ok(df!(
            "layer" => self.sensitivities.iter().map(|s| s.layer.as_str()).collect::<Vec<_>>(),
            "weights" => self.sensitivities.iter().map(|s| s.weights).collect::<Vec<_>>(),
            "MACs" => self.sensitivities.iter().map(|s| s.macs).collect::<Vec<_>>(),
            "activation bits" => self.sensitivities.iter().map(|s| s.activation_bits).collect::<Vec<_>>(),
            "bits" => self.sensitivities.iter().map(|s| s.bits).collect::<Vec<_>>(),
            sensitivity.as_str() => self.sensitivities.iter().map(|s| s.sensitivity).collect::<Vec<_>>(),
            "chosen" => chosen,
        )?)
    }
}

/// The override `{bits_weights: b}`.
fn bits_override(bits: u32) -> Mapping {
    let mut settings = Mapping::new();
    settings.insert("bits_weights".into(), Value::from(bits));
    settings
}

/// `overrides` plus an exact-name `{bits_weights: b}` for each `(layer, b)`.
fn with_weight_bits<'a>(overrides: &Overrides, bits: impl IntoIterator<Item = (&'a str, u32)>) -> Result<Overrides> {
    let mut overrides = overrides.clone();
    for (layer, b) in bits {
        overrides = overrides.with_exact(layer, bits_override(b))?;
    }
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The knapsack against every assignment tried by hand, over budgets from the smallest to beyond the largest.
    #[test]
    fn the_choice_is_the_cheapest_assignment_that_fits() {
        let sizes = [150.0, 2400.0, 30720.0, 10080.0, 840.0];
        let candidates = [2, 4, 8];
        let costs: Vec<Vec<f64>> = vec![vec![0.9, 0.2, 0.0], vec![0.5, 0.05, 0.0], vec![0.3, 0.01, 0.0], vec![0.4, 0.02, 0.0], vec![2.0, 0.3, 0.0]];
        let total: f64 = sizes.iter().sum();
        for avg in [2.0, 2.5, 3.0, 3.7, 4.0, 5.0, 6.5, 8.0, 9.0] {
            let budget = avg * total / 8.0;
            let per_bit: Vec<f64> = sizes.iter().map(|n| n / 8.0).collect();
            let got = choose_bits(&per_bit, &candidates, &costs, budget).unwrap();
            let (mut best, mut best_cost) = (Vec::new(), f64::INFINITY);
            for code in 0..3usize.pow(5) {
                let pick: Vec<usize> = (0..5).map(|l| code / 3usize.pow(l as u32) % 3).collect();
                let bytes: f64 = pick.iter().enumerate().map(|(l, &c)| sizes[l] * candidates[c] as f64 / 8.0).sum();
                let cost: f64 = pick.iter().enumerate().map(|(l, &c)| costs[l][c]).sum();
                if bytes <= budget && cost < best_cost - 1e-12 {
                    (best, best_cost) = (pick, cost);
                }
            }
            let got_cost: f64 = got.iter().enumerate().map(|(l, &c)| costs[l][c]).sum();
            assert!((got_cost - best_cost).abs() < 1e-12, "{avg} bits: {got:?} ({got_cost}) vs {best:?} ({best_cost})");
        }
        let per_bit: Vec<f64> = sizes.iter().map(|n| n / 8.0).collect();
        assert!(choose_bits(&per_bit, &candidates, &costs, 1.9 * total / 8.0).unwrap_err().to_string().contains("no assignment"));
    }

    /// Equal costs: the tie-breaking costs decide, then the budget used.
    #[test]
    fn ties_go_to_the_smaller_second_cost_then_to_the_larger_spend() {
        let (per_bit, candidates) = ([1.0, 1.0], [2, 4]);
        let zero = vec![vec![0.0, 0.0]; 2];
        // One layer can have 4 bits within 6: the one whose output error grows more at 2 bits.
        let ties = vec![vec![1.0, 0.0], vec![0.5, 0.0]];
        assert_eq!(choose_bits_with_ties(&per_bit, &candidates, &zero, Some(&ties), 6.0).unwrap(), vec![1, 0]);
        let ties = vec![vec![0.5, 0.0], vec![1.0, 0.0]];
        assert_eq!(choose_bits_with_ties(&per_bit, &candidates, &zero, Some(&ties), 6.0).unwrap(), vec![0, 1]);
        // Nothing to decide by: the budget is used, 4 + 4 within 8.
        assert_eq!(choose_bits(&per_bit, &candidates, &zero, 8.0).unwrap(), vec![1, 1]);
        // The first cost still comes first.
        let costs = vec![vec![0.0, 0.0], vec![0.1, 0.0]];
        let ties = vec![vec![9.0, 0.0], vec![0.0, 0.0]];
        assert_eq!(choose_bits_with_ties(&per_bit, &candidates, &costs, Some(&ties), 6.0).unwrap(), vec![0, 1]);
    }
}
