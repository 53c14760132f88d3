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

    /// Prunes each of `params` (all 2-D and 4-D weights when empty) alone at each level of `sparsities`,
    /// evaluates on `data`, and restores it. Progress lines go to stdout unless `quiet`.
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
}
