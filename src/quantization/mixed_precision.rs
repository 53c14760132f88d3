//! Automatic mixed precision: each layer's weights get the bit width that costs the model least under a budget
//! on the weights' size.
//!
//! The sensitivity of layer `l` at `b` bits is how much the mean squared error of the quantized model's outputs
//! (against the floating-point model's, on calibration batches) grows when `l` alone drops from the widest
//! candidate to `b` bits, every other searched layer staying at the widest. Taking those costs as additive, the
//! choice minimizing their sum with `Σ weights_l · b_l / 8` bytes within the budget is a multiple-choice knapsack,
//! solved exactly by dynamic programming over the size (in units of at most 1/200,000 of the budget, each layer's
//! size rounded up, so the choice never exceeds the budget). The model with the chosen widths is then measured
//! too, which shows how far additivity held.
//!
//! The result is a set of `overrides` (`conv1: {bits_weights: 4}`), written into the quantizer's YAML so it can be
//! reviewed and reused. Layers that the configuration's own overrides already match keep them and are not
//! searched.
//!
//! ```no_run
//! use distill::quantization::mixed_precision::{MixedPrecision, WeightBudget};
//! use distill::quantization::post_train::Calibration;
//! use distill::quantization::range_linear::PostTrainConfig;
//! # let (model, data) = (distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?, distill::data::mnist_bundled()?);
//! let config = PostTrainConfig { per_channel_wts: true, ..PostTrainConfig::default() };
//! let search = MixedPrecision { candidates: vec![2, 4, 8], budget: WeightBudget::AverageBits(4.0) };
//! let choice = search.search(&model, &config, &Calibration::new(&data.valid, 2, 128))?;
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

/// The budget on the quantized weights' size (packed: `weights · bits / 8` bytes; biases and activations are not
/// counted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightBudget {
    /// At most this many bytes.
    Bytes(f64),
    /// At most this many bits per weight on average (4.0: the size of uniform 4-bit weights).
    AverageBits(f64),
}

/// The search's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPrecision {
    /// Bit widths a layer may get (each 2–16).
    pub candidates: Vec<u32>,
    /// The size budget.
    pub budget: WeightBudget,
}

impl Default for MixedPrecision {
    /// {2, 4, 8} bits at the size of uniform 4-bit weights.
    fn default() -> Self {
        MixedPrecision { candidates: vec![2, 4, 8], budget: WeightBudget::AverageBits(4.0) }
    }
}

/// One layer at one bit width.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSensitivity {
    /// The layer.
    pub layer: String,
    /// Its weights.
    pub weights: i64,
    /// The bit width.
    pub bits: u32,
    /// The growth of the output MSE with this layer alone at `bits` (0 at the widest candidate).
    pub sensitivity: f64,
}

/// What [`MixedPrecision::search`] chose.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPrecisionChoice {
    /// Every searched layer at every candidate.
    pub sensitivities: Vec<LayerSensitivity>,
    /// The chosen bit width of each searched layer, in the model's order.
    pub bits: Vec<(String, u32)>,
    /// The chosen weights' packed size in bytes.
    pub weight_bytes: f64,
    /// The budget in bytes.
    pub budget_bytes: f64,
    /// Output MSE with every searched layer at the widest candidate.
    pub baseline_mse: f64,
    /// Output MSE the additive model predicts for the choice.
    pub predicted_mse: f64,
    /// Output MSE measured with the choice.
    pub measured_mse: f64,
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
        let layers: Vec<(String, i64)> = model
            .named_modules()
            .into_iter()
            .filter(|m| (m.type_name == "Conv2d" || m.type_name == "Linear") && !config.overrides.matches(&m.name))
            .map(|m| Ok((m.name.clone(), model.parameter(&format!("{}.weight", m.name))?.numel() as i64)))
            .collect::<Result<_>>()?;
        if layers.is_empty() {
            return Err(Error::invalid("mixed precision", "no Conv2d or Linear to search: every one is matched by the configuration's overrides"));
        }
        let total: i64 = layers.iter().map(|(_, n)| n).sum();
        let budget_bytes = match self.budget {
            WeightBudget::Bytes(b) => b,
            WeightBudget::AverageBits(bits) => bits * total as f64 / 8.0,
        };
        let smallest = total as f64 * candidates[0] as f64 / 8.0;
        if !(budget_bytes.is_finite() && budget_bytes >= smallest) {
            return Err(Error::invalid(
                "budget",
                format!("{budget_bytes} bytes: no assignment fits, the smallest ({} bits everywhere) takes {smallest} bytes for the {total} searched weights", candidates[0]),
            ));
        }
        let mut float = crate::models::copy_model(model)?;
        float.eval();
        let batches: Vec<Tensor> = calibration.data.batches(calibration.batch_size, model.device())?.take(calibration.batches).map(|b| b.map(|(x, _)| x)).collect::<Result<_>>()?;
        let reference: Vec<Tensor> = batches.iter().map(|x| tch::no_grad(|| float.forward_t(x, false))).collect::<Result<_>>()?;
        let mut config = config.clone();
        if config.bits_activations.is_some() && config.stats.is_none() {
            config.stats = Some(collect_activation_stats(&mut float, calibration.data, calibration.batches, calibration.batch_size)?);
        }
        let widest = *candidates.last().unwrap_or(&8);
        let output_mse = |bits: &[u32]| -> Result<f64> {
            let overrides = with_weight_bits(&config.overrides, layers.iter().map(|(l, _)| l.as_str()).zip(bits.iter().copied()))?;
            let mut quantized = crate::models::copy_model(model)?;
            PostTrainLinearQuantizer::new(PostTrainConfig { overrides, ..config.clone() }).prepare_model(&mut quantized)?;
            let mut sum = 0.0;
            for (x, y) in batches.iter().zip(&reference) {
                let q = tch::no_grad(|| quantized.forward_t(x, false))?;
                sum += q.f_sub(y)?.f_square()?.f_mean(Kind::Double)?.f_double_value(&[])?;
            }
            Ok(sum / batches.len().max(1) as f64)
        };
        let all_widest = vec![widest; layers.len()];
        let baseline_mse = output_mse(&all_widest)?;
        let mut sensitivities = Vec::with_capacity(layers.len() * candidates.len());
        let mut costs = Vec::with_capacity(layers.len());
        for (i, (layer, weights)) in layers.iter().enumerate() {
            let mut row = Vec::with_capacity(candidates.len());
            for &b in &candidates {
                let sensitivity = if b == widest {
                    0.0
                } else {
                    let mut bits = all_widest.clone();
                    bits[i] = b;
                    output_mse(&bits)? - baseline_mse
                };
                sensitivities.push(LayerSensitivity { layer: layer.clone(), weights: *weights, bits: b, sensitivity });
                row.push(sensitivity);
            }
            costs.push(row);
        }
        let sizes: Vec<f64> = layers.iter().map(|(_, n)| *n as f64).collect();
        let chosen = choose_bits(&sizes, &candidates, &costs, budget_bytes)?;
        let bits: Vec<u32> = chosen.iter().map(|&c| candidates[c]).collect();
        let measured_mse = output_mse(&bits)?;
        let predicted_mse = baseline_mse + chosen.iter().enumerate().map(|(l, &c)| costs[l][c]).sum::<f64>();
        let weight_bytes = sizes.iter().zip(&bits).map(|(n, &b)| n * b as f64 / 8.0).sum();
        Ok(MixedPrecisionChoice {
            sensitivities,
            bits: layers.into_iter().map(|(l, _)| l).zip(bits).collect(),
            weight_bytes,
            budget_bytes,
            baseline_mse,
            predicted_mse,
            measured_mse,
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

/// The candidate index for each layer minimizing the summed `costs[layer][candidate]` with
/// `Σ sizes[layer] · candidates[c] / 8 ≤ budget_bytes` (`sizes` in weights): a multiple-choice knapsack solved by
/// dynamic programming over the size, in units of the greatest common divisor of every layer's size in bits
/// (exact) while that needs at most 4 million steps, else of 1/4,000,000 of the budget with each size rounded up
/// (the result still fits, and may miss an assignment that fits only to within that rounding).
pub fn choose_bits(sizes: &[f64], candidates: &[u32], costs: &[Vec<f64>], budget_bytes: f64) -> Result<Vec<usize>> {
    const STEPS: f64 = 4_000_000.0;
    let budget_bits = budget_bytes * 8.0;
    let gcd = sizes.iter().flat_map(|&n| candidates.iter().map(move |&b| (n as u64) * b as u64)).fold(0u64, |a, b| {
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
    let mut best = vec![f64::INFINITY; cap + 1];
    best[0] = 0.0;
    // choice[l][u]: the candidate layer l takes in the best assignment of layers 0..=l using u units.
    let mut choice: Vec<Vec<u8>> = Vec::with_capacity(sizes.len());
    for (l, layer_units) in units.iter().enumerate() {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut picked = vec![u8::MAX; cap + 1];
        for (u, &cost_so_far) in best.iter().enumerate() {
            if !cost_so_far.is_finite() {
                continue;
            }
            for (c, &w) in layer_units.iter().enumerate() {
                let (v, total) = (u + w, cost_so_far + costs[l][c].max(0.0));
                if v <= cap && total < next[v] {
                    (next[v], picked[v]) = (total, c as u8);
                }
            }
        }
        best = next;
        choice.push(picked);
    }
    let (mut u, _) = best.iter().enumerate().filter(|(_, c)| c.is_finite()).min_by(|a, b| a.1.total_cmp(b.1)).ok_or_else(|| {
        Error::invalid("budget", format!("{budget_bytes} bytes: no assignment of the candidate widths fits (sizes rounded up to units of {:.1} bits)", unit))
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

    /// The sensitivities, one row per layer and width, with the chosen width marked.
    pub fn frame(&self) -> Result<DataFrame> {
        let chosen: Vec<bool> = self.sensitivities.iter().map(|s| self.bits.iter().any(|(l, b)| *l == s.layer && *b == s.bits)).collect();
        Ok(df!(
            "layer" => self.sensitivities.iter().map(|s| s.layer.as_str()).collect::<Vec<_>>(),
            "weights" => self.sensitivities.iter().map(|s| s.weights).collect::<Vec<_>>(),
            "bits" => self.sensitivities.iter().map(|s| s.bits).collect::<Vec<_>>(),
            "sensitivity" => self.sensitivities.iter().map(|s| s.sensitivity).collect::<Vec<_>>(),
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
            let got = choose_bits(&sizes, &candidates, &costs, budget).unwrap();
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
        assert!(choose_bits(&sizes, &candidates, &costs, 1.9 * total / 8.0).unwrap_err().to_string().contains("no assignment"));
    }
}
