//! Element-wise (fine-grained) pruners.
use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::criteria::{agp_target, check_sparsity, level_mask, threshold_mask};
use super::{normalized, PerParam, PruneContext, Pruner};
use crate::scheduler::{Masks, PolicySchedule};
use crate::{Error, Result};

/// Unbiased (N−1) standard deviation, as `torch.std`.
fn std_unbiased(t: &Tensor) -> Result<f64> {
    Ok(t.f_std(true)?.f_double_value(&[])?)
}

fn set(masks: &mut Masks, name: &str, mask: Tensor, param: &Tensor) -> Result<()> {
    masks.set_mask(name, mask, &param.size())
}

/// `MagnitudeParameterPruner`: `mask = |w| > threshold`, with a threshold per parameter and a mandatory `'*'`
/// default (so it prunes every parameter, biases included, as Distiller).
#[derive(Debug)]
pub struct MagnitudeParameterPruner {
    name: String,
    thresholds: PerParam,
}

impl MagnitudeParameterPruner {
    /// `thresholds` must have a default (`'*'`); thresholds must be ≥ 0.
    pub fn new(name: &str, thresholds: PerParam) -> Result<Self> {
        if thresholds.default.is_none() {
            return Err(Error::invalid("thresholds", "MagnitudeParameterPruner needs a '*' entry (the default threshold)"));
        }
        if let Some(t) = thresholds.values.iter().map(|(_, t)| *t).chain(thresholds.default).find(|t| !(t.is_finite() && *t >= 0.0)) {
            return Err(Error::invalid("thresholds", format!("{t} must be a finite value >= 0")));
        }
        Ok(MagnitudeParameterPruner { name: name.into(), thresholds })
    }
}

impl Pruner for MagnitudeParameterPruner {
    fn class_name(&self) -> &'static str {
        "MagnitudeParameterPruner"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.thresholds.get(param_name).is_some()
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, _: &PruneContext) -> Result<()> {
        match self.thresholds.get(name) {
            Some(t) => set(masks, name, threshold_mask(param, t)?, param),
            None => Ok(()),
        }
    }
}

/// `SparsityLevelParameterPruner`: prunes each listed parameter to its level (`'*'` for the rest); level 0
/// leaves the parameter alone.
#[derive(Debug)]
pub struct SparsityLevelParameterPruner {
    name: String,
    levels: PerParam,
}

impl SparsityLevelParameterPruner {
    /// Levels must lie in [0, 1).
    pub fn new(name: &str, levels: PerParam) -> Result<Self> {
        for (_, s) in &levels.values {
            check_sparsity("levels", *s)?;
        }
        if let Some(s) = levels.default {
            check_sparsity("levels", s)?;
        }
        Ok(SparsityLevelParameterPruner { name: name.into(), levels })
    }
}

impl Pruner for SparsityLevelParameterPruner {
    fn class_name(&self) -> &'static str {
        "SparsityLevelParameterPruner"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.levels.get(param_name).is_some()
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, _: &PruneContext) -> Result<()> {
        match self.levels.get(name) {
            Some(s) if s > 0.0 => set(masks, name, level_mask(param, s)?, param),
            _ => Ok(()),
        }
    }
    fn target_sparsity(&self, param_name: &str, _: usize, _: &PolicySchedule) -> Option<f64> {
        self.levels.get(param_name)
    }
    fn set_levels(&mut self, levels: &PerParam) -> Result<()> {
        *self = SparsityLevelParameterPruner::new(&self.name, levels.clone())?;
        Ok(())
    }
}

/// `SensitivityPruner` (Han et al., 2015): `mask = |w| > s · std(w)`, with `std` taken once, at the first call,
/// so the threshold stays fixed while the weights shrink (as Distiller).
#[derive(Debug)]
pub struct SensitivityPruner {
    name: String,
    sensitivities: PerParam,
    stds: HashMap<String, f64>,
}

impl SensitivityPruner {
    /// Sensitivities must be ≥ 0.
    pub fn new(name: &str, sensitivities: PerParam) -> Result<Self> {
        if let Some(s) = sensitivities.values.iter().map(|(_, s)| *s).chain(sensitivities.default).find(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(Error::invalid("sensitivities", format!("{s} must be a finite value >= 0")));
        }
        Ok(SensitivityPruner { name: name.into(), sensitivities, stds: HashMap::new() })
    }
}

impl Pruner for SensitivityPruner {
    fn class_name(&self) -> &'static str {
        "SensitivityPruner"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.sensitivities.get(param_name).is_some()
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, _: &PruneContext) -> Result<()> {
        let Some(s) = self.sensitivities.get(name) else { return Ok(()) };
        let std = match self.stds.get(name) {
            Some(&std) => std,
            None => {
                let std = std_unbiased(param)?;
                self.stds.insert(name.to_string(), std);
                std
            }
        };
        set(masks, name, threshold_mask(param, s * std)?, param)
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "stds": self.stds })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.stds = cached_from(state, "stds")?;
        Ok(())
    }
}

/// A cache saved by [`Pruner::state`] under `key`, or empty for a null state.
fn cached_from<T: serde::de::DeserializeOwned + Default>(state: &serde_json::Value, key: &str) -> Result<T> {
    match state.get(key) {
        None | Some(serde_json::Value::Null) => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| Error::invalid("pruner state", e.to_string())),
    }
}

/// `SplicingPruner` (Guo et al., 2016, dynamic network surgery): weights below `a` are cut, above `b` spliced
/// back, in between unchanged, with `a, b = (mean|w| + std|w|·s) · (low, high)` fixed at the first call.
#[derive(Debug)]
pub struct SplicingPruner {
    name: String,
    sensitivities: PerParam,
    low_thresh_mult: f64,
    hi_thresh_mult: f64,
    sensitivity_multiplier: f64,
    stats: HashMap<String, (f64, f64)>,
}

impl SplicingPruner {
    /// `low_thresh_mult <= hi_thresh_mult`; multipliers ≥ 0.
    pub fn new(name: &str, sensitivities: PerParam, low_thresh_mult: f64, hi_thresh_mult: f64, sensitivity_multiplier: f64) -> Result<Self> {
        if !(0.0 <= low_thresh_mult && low_thresh_mult <= hi_thresh_mult && hi_thresh_mult.is_finite()) {
            return Err(Error::invalid("low_thresh_mult/hi_thresh_mult", format!("need 0 <= {low_thresh_mult} <= {hi_thresh_mult}")));
        }
        if !(sensitivity_multiplier >= 0.0 && sensitivity_multiplier.is_finite()) {
            return Err(Error::invalid("sensitivity_multiplier", format!("{sensitivity_multiplier} must be >= 0")));
        }
        Ok(SplicingPruner { name: name.into(), sensitivities, low_thresh_mult, hi_thresh_mult, sensitivity_multiplier, stats: HashMap::new() })
    }
}

impl Pruner for SplicingPruner {
    fn class_name(&self) -> &'static str {
        "SplicingPruner"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.sensitivities.get(param_name).is_some()
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, ctx: &PruneContext) -> Result<()> {
        let Some(mut s) = self.sensitivities.get(name) else { return Ok(()) };
        if self.sensitivity_multiplier > 0.0 {
            s *= (ctx.epoch.saturating_sub(ctx.schedule.starting_epoch)) as f64 * self.sensitivity_multiplier + 1.0;
        }
        let abs = param.f_abs()?;
        let (mean, std) = match self.stats.get(name) {
            Some(&st) => st,
            None => {
                let st = (abs.f_mean(Kind::Double)?.f_double_value(&[])?, std_unbiased(&abs)?);
                self.stats.insert(name.to_string(), st);
                st
            }
        };
        let base = mean + std * s;
        let (a, b) = (base * self.low_thresh_mult, base * self.hi_thresh_mult);
        let current = match &masks.get(name)?.mask {
            Some(m) => m.shallow_clone(),
            None => param.f_ones_like()?,
        };
        let cut = abs.f_lt(a)?;
        let keep = abs.f_ge(b)?;
        let mask = current.f_masked_fill(&cut, 0.0)?.f_masked_fill(&keep, 1.0)?;
        set(masks, name, mask, param)
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "stats": self.stats })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.stats = cached_from(state, "stats")?;
        Ok(())
    }
}

/// `AutomatedGradualPruner` (Zhu & Gupta, 2017): the level criterion with a sparsity that rises from
/// `initial_sparsity` to `final_sparsity` over the policy's epochs along AGP's cubic.
#[derive(Debug)]
pub struct AutomatedGradualPruner {
    name: String,
    initial_sparsity: f64,
    final_sparsity: f64,
    weights: Vec<String>,
}

/// Checks AGP's sparsities: both in [0, 1), initial below final.
pub fn check_agp(initial: f64, final_: f64) -> Result<()> {
    check_sparsity("initial_sparsity", initial)?;
    check_sparsity("final_sparsity", final_)?;
    if final_ <= initial {
        return Err(Error::invalid("final_sparsity", format!("{final_} must be above initial_sparsity {initial}")));
    }
    Ok(())
}

impl AutomatedGradualPruner {
    /// Prunes `weights` (parameter names) from `initial_sparsity` to `final_sparsity`.
    pub fn new(name: &str, initial_sparsity: f64, final_sparsity: f64, weights: &[String]) -> Result<Self> {
        check_agp(initial_sparsity, final_sparsity)?;
        if weights.is_empty() {
            return Err(Error::invalid("weights", "AutomatedGradualPruner needs at least one parameter name"));
        }
        Ok(AutomatedGradualPruner { name: name.into(), initial_sparsity, final_sparsity, weights: normalized(weights) })
    }
}

impl Pruner for AutomatedGradualPruner {
    fn class_name(&self) -> &'static str {
        "AutomatedGradualPruner"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.weights.iter().any(|w| w == param_name)
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, ctx: &PruneContext) -> Result<()> {
        let s = ctx.schedule;
        let target = agp_target(self.initial_sparsity, self.final_sparsity, ctx.epoch, s.starting_epoch, s.ending_epoch, s.frequency)?;
        set(masks, name, level_mask(param, target)?, param)
    }
    fn target_sparsity(&self, param_name: &str, epoch: usize, s: &PolicySchedule) -> Option<f64> {
        if !self.prunes(param_name) {
            return None;
        }
        agp_target(self.initial_sparsity, self.final_sparsity, epoch, s.starting_epoch, s.ending_epoch, s.frequency).ok()
    }
}

/// `BaiduRNNPruner` (Narang et al., 2017): a magnitude threshold that grows linearly per epoch, faster after a
/// ramp epoch, so that about `q` of the weights are pruned by the end.
#[derive(Debug)]
pub struct BaiduRNNPruner {
    name: String,
    q: f64,
    ramp_epoch_offset: usize,
    ramp_slope_mult: f64,
    weights: Vec<String>,
}

impl BaiduRNNPruner {
    /// `q` > 0, `ramp_slope_mult` > 0.
    pub fn new(name: &str, q: f64, ramp_epoch_offset: usize, ramp_slope_mult: f64, weights: &[String]) -> Result<Self> {
        if !(q > 0.0 && q.is_finite()) || !(ramp_slope_mult > 0.0 && ramp_slope_mult.is_finite()) {
            return Err(Error::invalid("BaiduRNNPruner", format!("q ({q}) and ramp_slope_mult ({ramp_slope_mult}) must be positive")));
        }
        Ok(BaiduRNNPruner { name: name.into(), q, ramp_epoch_offset, ramp_slope_mult, weights: normalized(weights) })
    }

    /// The threshold ε at `epoch` (Distiller's formula, per epoch rather than per step).
    pub fn threshold(&self, epoch: usize, s: &PolicySchedule) -> Result<f64> {
        let freq = s.frequency.ok_or_else(|| Error::invalid("BaiduRNNPruner schedule", "needs starting_epoch/ending_epoch/frequency"))? as f64;
        let (start, end) = (s.starting_epoch as f64, s.ending_epoch as f64);
        let ramp = start + self.ramp_epoch_offset as f64;
        let start_slope = 2.0 * self.q * freq / (2.0 * (ramp - start) + 3.0 * (end - ramp));
        let ramp_slope = start_slope * self.ramp_slope_mult;
        let e = epoch as f64;
        Ok(if e < ramp {
            start_slope * (e - start + 1.0) / freq
        } else {
            (start_slope * (ramp - start + 1.0) + ramp_slope * (e - ramp + 1.0)) / freq
        })
    }
}

impl Pruner for BaiduRNNPruner {
    fn class_name(&self) -> &'static str {
        "BaiduRNNPruner"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.weights.iter().any(|w| w == param_name)
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, ctx: &PruneContext) -> Result<()> {
        let eps = self.threshold(ctx.epoch, ctx.schedule)?;
        set(masks, name, threshold_mask(param, eps)?, param)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baidu_threshold_follows_the_two_slopes() {
        let p = BaiduRNNPruner::new("b", 0.2, 2, 1.5, &["w".into()]).unwrap();
        let s = PolicySchedule::range(0, 6, 1).unwrap();
        // ramp = 2; start_slope = 2·0.2·1 / (2·2 + 3·4) = 0.025; ramp_slope = 0.0375
        assert!((p.threshold(0, &s).unwrap() - 0.025).abs() < 1e-12);
        assert!((p.threshold(1, &s).unwrap() - 0.05).abs() < 1e-12);
        assert!((p.threshold(3, &s).unwrap() - (0.025 * 3.0 + 0.0375 * 2.0)).abs() < 1e-12);
    }

    #[test]
    fn agp_parameters_are_checked() {
        let w = ["w".to_string()];
        assert!(AutomatedGradualPruner::new("a", 0.5, 0.2, &w).unwrap_err().to_string().contains("must be above initial_sparsity"));
        assert!(AutomatedGradualPruner::new("a", 0.0, 1.0, &w).unwrap_err().to_string().contains("[0, 1)"));
        assert!(AutomatedGradualPruner::new("a", 0.0, 0.5, &[]).is_err());
        assert!(MagnitudeParameterPruner::new("m", PerParam::from_pairs([("w".to_string(), 0.1)])).unwrap_err().to_string().contains("'*'"));
    }
}
