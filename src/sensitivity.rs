//! Sensitivity analysis (Distiller's `perform_sensitivity_analysis`): prune one tensor at a time to each sparsity
//! level, evaluate, restore. The result is a DataFrame `parameter, sparsity, top1, top5, loss` (Distiller's
//! `sensitivity.csv` columns).
//!
//! Cheaper than Distiller's loop, which deep-copies the model for every tensor and evaluates the unpruned model
//! once per tensor: here the weights are masked in place and restored, the evaluation batches are built once and
//! kept on the device, the unpruned accuracy is measured once and shared, and results are cached by (tensor,
//! group, level, weights) so a notebook can re-run or extend a sweep for free.
use std::collections::HashMap;

use polars::prelude::*;
use tch::{Kind, Tensor};

use crate::data::Dataset;
use crate::metrics::{Metrics, MetricsAccumulator};
use crate::nn::Model;
use crate::pruning::criteria::{check_sparsity, level_mask};
use crate::pruning::structure::{l1_structure_mask, GroupType};
use crate::train::cross_entropy;
use crate::{Error, Result};

/// What is pruned at each level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SensitivityGroup {
    /// Individual weights by magnitude (Distiller's `element`).
    Element,
    /// Whole filters by L1 norm.
    Filter,
    /// Whole input channels by L1 norm.
    Channel,
}

impl std::str::FromStr for SensitivityGroup {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "element" => Ok(SensitivityGroup::Element),
            "filter" => Ok(SensitivityGroup::Filter),
            "channel" => Ok(SensitivityGroup::Channel),
            other => Err(Error::unknown("sensitivity group", other, ["element", "filter", "channel"])),
        }
    }
}

/// The most levels [`levels`] produces: each level costs one evaluation per tensor.
pub const MAX_LEVELS: usize = 1000;

/// `start, start + step, ...` below `stop`, as NumPy's `arange` (Distiller's `--sense-range 0.0 0.95 0.05` gives
/// 0.0 … 0.90). Levels must lie in [0, 1).
pub fn levels(start: f64, stop: f64, step: f64) -> Result<Vec<f64>> {
    if !(step > 0.0 && step.is_finite()) || !(0.0..1.0).contains(&start) || stop > 1.0 || stop <= start {
        return Err(Error::invalid("sensitivity range", format!("need 0 <= start ({start}) < stop ({stop}) <= 1 and step ({step}) > 0")));
    }
    let n = ((stop - start) / step - 1e-9).ceil().max(0.0) as usize;
    if n > MAX_LEVELS {
        return Err(Error::invalid("sensitivity range", format!("step {step} gives {n} levels; at most {MAX_LEVELS} (use a larger step)")));
    }
    Ok((0..n).map(|i| ((start + i as f64 * step) * 1e9).round() / 1e9).collect())
}

/// What a sweep prunes and how it evaluates, with named settings instead of positional flags.
///
/// ```
/// use distill::sensitivity::{Sweep, SensitivityGroup};
/// let sweep = Sweep::levels(0.0, 0.95, 0.05)?.group(SensitivityGroup::Filter).params(&["conv1.weight"]).quiet();
/// assert_eq!(sweep.sparsities.len(), 19);
/// # Ok::<(), distill::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// The tensors to prune one at a time; empty: every 2-D and 4-D weight.
    pub params: Vec<String>,
    /// The sparsity levels.
    pub sparsities: Vec<f64>,
    /// What is pruned at each level.
    pub group: SensitivityGroup,
    /// Evaluation batch size.
    pub batch_size: usize,
    /// No progress lines.
    pub quiet: bool,
}

impl Sweep {
    /// Every 2-D and 4-D weight at `sparsities`, element-wise, batches of 256, with progress lines.
    pub fn new(sparsities: Vec<f64>) -> Self {
        Sweep { params: Vec::new(), sparsities, group: SensitivityGroup::Element, batch_size: 256, quiet: false }
    }

    /// [`Sweep::new`] at [`levels`]`(start, stop, step)`.
    pub fn levels(start: f64, stop: f64, step: f64) -> Result<Self> {
        Ok(Sweep::new(levels(start, stop, step)?))
    }

    /// Only these tensors.
    pub fn params(mut self, names: &[&str]) -> Self {
        self.params = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Prunes `group`s (filters, channels) instead of elements.
    pub fn group(mut self, group: SensitivityGroup) -> Self {
        self.group = group;
        self
    }

    /// Evaluates in batches of `n`.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Prints no progress.
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }
}

/// Per tensor, the highest sparsity of a sweep whose top-1 stays within `max_drop` points of the unpruned model
/// (the sweep's level 0, or its best top-1 when level 0 is missing): `parameter`, `sparsity`, `top1`, `drop`.
/// Distiller's sensitivity notebook picks levels this way before writing them into a schedule. Results within
/// the evaluation set's noise (one sample of 500 is 0.2 points) deserve a margin.
///
/// ```
/// use distill::polars::prelude::*;
/// let sweep = df!("parameter" => ["a", "a", "a", "b", "b"], "sparsity" => [0.0, 0.5, 0.9, 0.0, 0.5],
///                 "top1" => [98.0, 97.8, 90.0, 98.0, 95.0])?;
/// let chosen = distill::sensitivity::choose_sparsities(&sweep, 0.5)?;
/// let s = chosen.column("sparsity")?.f64()?;
/// assert_eq!((s.get(0), s.get(1)), (Some(0.5), Some(0.0)));
/// # Ok::<(), distill::Error>(())
/// ```
pub fn choose_sparsities(sweep: &DataFrame, max_drop: f64) -> Result<DataFrame> {
    if !(max_drop >= 0.0 && max_drop.is_finite()) {
        return Err(Error::invalid("max_drop", format!("{max_drop}: give the accuracy points you accept to lose, ≥ 0")));
    }
    let col = |name: &str| crate::summary::tables::column(sweep, name);
    let params: Vec<String> = col("parameter")?.str()?.iter().map(|v| v.unwrap_or("").to_string()).collect();
    let sparsity: Vec<f64> = col("sparsity")?.cast(&DataType::Float64)?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    let top1: Vec<f64> = col("top1")?.cast(&DataType::Float64)?.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    let mut order: Vec<String> = Vec::new();
    for p in &params {
        if !order.contains(p) {
            order.push(p.clone());
        }
    }
    let (mut chosen_s, mut chosen_t, mut drops) = (Vec::new(), Vec::new(), Vec::new());
    for p in &order {
        let rows: Vec<usize> = (0..params.len()).filter(|&i| &params[i] == p).collect();
        let base = rows.iter().find(|&&i| sparsity[i] == 0.0).map(|&i| top1[i]).unwrap_or_else(|| rows.iter().map(|&i| top1[i]).fold(f64::NEG_INFINITY, f64::max));
        let best = rows.iter().filter(|&&i| base - top1[i] <= max_drop).max_by(|&&a, &&b| sparsity[a].total_cmp(&sparsity[b]));
        let (s, t) = best.map_or((0.0, base), |&i| (sparsity[i], top1[i]));
        chosen_s.push(s);
        chosen_t.push(t);
        drops.push(base - t);
    }
    Ok(df!("parameter" => order, "sparsity" => chosen_s, "top1" => chosen_t, "drop" => drops)?)
}

/// A reusable analysis with its cache.
#[derive(Debug, Default)]
pub struct SensitivityAnalysis {
    cache: HashMap<(String, Option<SensitivityGroup>, u64, u64), Metrics>,
    evaluations: usize,
}

/// Identifies the model's weights: results are reused only while every parameter is unchanged.
fn fingerprint(model: &Model) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (_, t) in model.named_parameters() {
        let s = t.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        h = (h ^ s.to_bits()).wrapping_mul(0x0100_0000_01b3) ^ t.numel() as u64;
    }
    Ok(h)
}

impl SensitivityAnalysis {
    /// An empty analysis.
    pub fn new() -> Self {
        SensitivityAnalysis::default()
    }

    /// Model evaluations run so far (cache hits excluded).
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    /// Runs `sweep` on `model` over `data`: each tensor pruned alone at each level, evaluated, restored.
    ///
    /// ```no_run
    /// use distill::sensitivity::{SensitivityAnalysis, Sweep};
    /// # fn main() -> distill::Result<()> {
    /// let data = distill::data::mnist_bundled()?;
    /// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
    /// let df = SensitivityAnalysis::new().measure(&mut model, &data.valid, &Sweep::levels(0.0, 0.95, 0.1)?.quiet())?;
    /// # Ok(()) }
    /// ```
    pub fn measure(&mut self, model: &mut Model, data: &Dataset, sweep: &Sweep) -> Result<DataFrame> {
        self.run(model, data, &sweep.params, &sweep.sparsities, sweep.group, sweep.batch_size, sweep.quiet)
    }

    /// Prunes each of `params` (all 2-D and 4-D weights when empty) alone at each level of `sparsities`,
    /// evaluates on `data`, and restores it. Progress lines go to stdout unless `quiet`. [`SensitivityAnalysis::measure`]
    /// takes the same settings by name.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        model: &mut Model,
        data: &Dataset,
        params: &[String],
        sparsities: &[f64],
        group: SensitivityGroup,
        batch_size: usize,
        quiet: bool,
    ) -> Result<DataFrame> {
        let names: Vec<String> = if params.is_empty() {
            model.named_parameters().into_iter().filter(|(_, t)| matches!(t.dim(), 2 | 4)).map(|(n, _)| n).collect()
        } else {
            params.iter().map(|p| model.parameter(p).map(|_| crate::nn::normalize_name(p))).collect::<Result<_>>()?
        };
        sparsities.iter().try_for_each(|&s| check_sparsity("sparsity", s))?;
        let batches: Vec<(Tensor, Tensor)> = data.batches(batch_size, model.device())?.collect::<Result<_>>()?;
        let was_training = model.is_training();
        model.eval();
        let result = self.sweep(model, &batches, &names, sparsities, group, quiet);
        if was_training {
            model.train();
        }
        let rows = result?;
        Ok(df!(
            "parameter" => rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            "sparsity" => rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            "top1" => rows.iter().map(|r| r.2.top1).collect::<Vec<_>>(),
            "top5" => rows.iter().map(|r| r.2.top5).collect::<Vec<_>>(),
            "loss" => rows.iter().map(|r| r.2.loss).collect::<Vec<_>>()
        )?)
    }

    fn evaluate(&mut self, model: &Model, batches: &[(Tensor, Tensor)]) -> Result<Metrics> {
        self.evaluations += 1;
        tch::no_grad(|| {
            let mut acc = MetricsAccumulator::default();
            for (x, y) in batches {
                let logits = model.forward(x)?;
                acc.add(&logits, y, cross_entropy(&logits, y)?.f_double_value(&[])?)?;
            }
            Ok(acc.metrics())
        })
    }

    fn sweep(
        &mut self,
        model: &mut Model,
        batches: &[(Tensor, Tensor)],
        names: &[String],
        sparsities: &[f64],
        group: SensitivityGroup,
        quiet: bool,
    ) -> Result<Vec<(String, f64, Metrics)>> {
        let mut rows = Vec::new();
        let fp = fingerprint(model)?;
        let baseline_key = || (String::new(), None, 0, fp);
        for name in names {
            let w = model.parameter(name)?;
            let original = w.f_detach_copy()?;
            for &s in sparsities {
                let key = (name.clone(), Some(group), s.to_bits(), fp);
                if let Some(m) = self.cache.get(&key) {
                    rows.push((name.clone(), s, *m));
                    continue;
                }
                let mask = match group {
                    _ if s == 0.0 => None,
                    SensitivityGroup::Element => Some(level_mask(&original, s)?),
                    SensitivityGroup::Filter => l1_structure_mask(&original, GroupType::Filters, s)?,
                    SensitivityGroup::Channel => l1_structure_mask(&original, GroupType::Channels, s)?,
                };
                let m = match mask {
                    // Nothing pruned: the unpruned model's result, measured once for every tensor.
                    None => match self.cache.get(&baseline_key()) {
                        Some(m) => *m,
                        None => {
                            let m = self.evaluate(model, batches)?;
                            self.cache.insert(baseline_key(), m);
                            m
                        }
                    },
                    Some(mask) => {
                        let _ = tch::no_grad(|| w.shallow_clone().f_mul_(&mask))?;
                        let m = self.evaluate(model, batches);
                        tch::no_grad(|| w.shallow_clone().f_copy_(&original))?;
                        m?
                    }
                };
                if !quiet {
                    println!("{name:<32} sparsity {s:.2}: top1 {:.2}  top5 {:.2}  loss {:.4}", m.top1, m.top5, m.loss);
                }
                self.cache.insert(key, m);
                rows.push((name.clone(), s, m));
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_numpy_arange() {
        assert_eq!(levels(0.0, 0.95, 0.05).unwrap().len(), 19);
        assert_eq!(*levels(0.0, 0.95, 0.05).unwrap().last().unwrap(), 0.9);
        assert_eq!(levels(0.0, 0.3, 0.1).unwrap(), [0.0, 0.1, 0.2]);
        assert!(levels(0.5, 0.2, 0.1).is_err());
        assert!(levels(0.0, 1.5, 0.1).is_err());
        assert!(levels(0.0, 0.9, 1e-300).unwrap_err().to_string().contains("larger step"));
        assert!("row".parse::<SensitivityGroup>().is_err());
    }

    #[test]
    fn choices_keep_the_highest_sparsity_within_the_drop() {
        // a: baseline 98.0; 0.5 costs 0.2 points, 0.7 costs 0.6 (beyond 0.5), 0.9 is back within (a noisy curve:
        // the highest level within the drop wins). b: no level 0, its best top-1 is the baseline.
        let sweep = df!("parameter" => ["a", "a", "a", "a", "b", "b"], "sparsity" => [0.0, 0.5, 0.7, 0.9, 0.3, 0.6],
                        "top1" => [98.0, 97.8, 97.4, 97.6, 96.0, 95.0]).unwrap();
        let chosen = choose_sparsities(&sweep, 0.5).unwrap();
        let get = |c: &str| chosen.column(c).unwrap().f64().unwrap().iter().map(|v| v.unwrap()).collect::<Vec<_>>();
        assert_eq!(get("sparsity"), [0.9, 0.3]);
        assert!((get("drop")[0] - 0.4).abs() < 1e-9);
        assert!(choose_sparsities(&sweep, -1.0).is_err());
        assert!(choose_sparsities(&df!("param" => ["a"]).unwrap(), 0.5).is_err());
    }
}
