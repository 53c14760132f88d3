//! Learning-rate schedules as scheduler policies, with PyTorch's closed forms and Distiller's two additions.
//!
//! As Distiller's `LRPolicy`, a schedule acts at the end of each epoch in which it is active and sets the
//! learning rate for epoch `e + 1` from each parameter group's initial learning rate; during the first active
//! epoch the optimizer's own learning rate is used.
use serde::{Deserialize, Serialize};

use super::{Policy, PolicyContext};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// A learning-rate schedule (the classes of `torch.optim.lr_scheduler` Distiller accepts, and Distiller's own).
/// Field names in YAML are PyTorch's (`T_max`, `T_0`, `T_mult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum LrSchedule {
    /// `lr = base · γ^⌊e / step_size⌋`.
    StepLR {
        /// Epochs between decays.
        step_size: usize,
        /// Decay factor.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
    /// `lr = base · γ^(number of milestones ≤ e)`.
    MultiStepLR {
        /// Epochs at which to decay, increasing.
        milestones: Vec<usize>,
        /// Decay factor.
        #[serde(default = "default_gamma")]
        gamma: f64,
    },
    /// `lr = base · γ^e`.
    ExponentialLR {
        /// Decay factor per epoch.
        gamma: f64,
    },
    /// `lr = η_min + (base − η_min)(1 + cos(π e / T_max)) / 2`.
    CosineAnnealingLR {
        /// Half-period in epochs.
        #[serde(rename = "T_max")]
        t_max: usize,
        /// Floor.
        #[serde(default)]
        eta_min: f64,
    },
    /// SGDR: cosine annealing restarted after `t_0`, then `t_0·t_mult`, ... epochs.
    CosineAnnealingWarmRestarts {
        /// First period.
        #[serde(rename = "T_0")]
        t_0: usize,
        /// Period growth factor (≥ 1).
        #[serde(rename = "T_mult", default = "default_one")]
        t_mult: usize,
        /// Floor.
        #[serde(default)]
        eta_min: f64,
    },
    /// Distiller's `PolynomialLR`: `lr = base · (1 − e / T_max)^power`.
    PolynomialLR {
        /// Epoch at which the rate reaches zero.
        #[serde(rename = "T_max")]
        t_max: usize,
        /// Exponent.
        #[serde(default = "default_power")]
        power: f64,
    },
    /// Distiller's `MultiStepMultiGammaLR`: at each milestone multiply by its own γ.
    MultiStepMultiGammaLR {
        /// Epochs at which to decay, increasing.
        milestones: Vec<usize>,
        /// One factor per milestone.
        gammas: Vec<f64>,
    },
    /// Divides the rate by `1/factor` after `patience` epochs without improvement of the validation loss
    /// (`mode: min`) or top-1 (`mode: max`).
    ReduceLROnPlateau {
        /// `min` watches the loss, `max` the top-1 accuracy.
        #[serde(default = "default_mode")]
        mode: PlateauMode,
        /// Multiplier applied on a plateau.
        #[serde(default = "default_gamma")]
        factor: f64,
        /// Epochs without improvement tolerated.
        #[serde(default = "default_patience")]
        patience: usize,
        /// Improvement that counts, relative or absolute per `threshold_mode`.
        #[serde(default = "default_threshold")]
        threshold: f64,
        /// `rel` or `abs`.
        #[serde(default = "default_threshold_mode")]
        threshold_mode: ThresholdMode,
        /// Epochs to wait after a reduction.
        #[serde(default)]
        cooldown: usize,
        /// Floor.
        #[serde(default)]
        min_lr: f64,
        /// Smallest change of the rate worth applying.
        #[serde(default = "default_eps")]
        eps: f64,
        /// Accepted for compatibility; distill always logs LR changes in its epoch lines.
        #[serde(default)]
        verbose: bool,
    },
}

fn default_gamma() -> f64 {
    0.1
}
fn default_one() -> usize {
    1
}
fn default_power() -> f64 {
    1.0
}
fn default_mode() -> PlateauMode {
    PlateauMode::Min
}
fn default_patience() -> usize {
    10
}
fn default_threshold() -> f64 {
    1e-4
}
fn default_threshold_mode() -> ThresholdMode {
    ThresholdMode::Rel
}
fn default_eps() -> f64 {
    1e-8
}

/// How [`LrSchedule::ReduceLROnPlateau`] measures improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMode {
    /// Better by a factor `1 ± threshold`.
    Rel,
    /// Better by `threshold`.
    Abs,
}

/// What [`LrSchedule::ReduceLROnPlateau`] watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlateauMode {
    /// Validation loss, lower is better.
    Min,
    /// Validation top-1, higher is better.
    Max,
}

fn milestones_ok(name: &str, m: &[usize]) -> Result<()> {
    if m.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::invalid(name, format!("milestones {m:?} must be strictly increasing")));
    }
    Ok(())
}

impl LrSchedule {
    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: f64| if v.is_finite() && v > 0.0 { Ok(()) } else { Err(Error::invalid(name, format!("{v} must be positive"))) };
        match self {
            LrSchedule::StepLR { step_size, gamma } => {
                if *step_size == 0 {
                    return Err(Error::invalid("StepLR step_size", "must be at least 1"));
                }
                positive("StepLR gamma", *gamma)
            }
            LrSchedule::MultiStepLR { milestones, gamma } => {
                milestones_ok("MultiStepLR", milestones)?;
                positive("MultiStepLR gamma", *gamma)
            }
            LrSchedule::ExponentialLR { gamma } => positive("ExponentialLR gamma", *gamma),
            LrSchedule::CosineAnnealingLR { t_max, eta_min } => {
                if *t_max == 0 {
                    return Err(Error::invalid("CosineAnnealingLR T_max", "must be at least 1"));
                }
                if *eta_min < 0.0 { Err(Error::invalid("CosineAnnealingLR eta_min", "must be >= 0")) } else { Ok(()) }
            }
            LrSchedule::CosineAnnealingWarmRestarts { t_0, t_mult, eta_min } => {
                if *t_0 == 0 || *t_mult == 0 {
                    return Err(Error::invalid("CosineAnnealingWarmRestarts", "T_0 and T_mult must be at least 1"));
                }
                if *eta_min < 0.0 { Err(Error::invalid("CosineAnnealingWarmRestarts eta_min", "must be >= 0")) } else { Ok(()) }
            }
            LrSchedule::PolynomialLR { t_max, power } => {
                if *t_max == 0 {
                    return Err(Error::invalid("PolynomialLR T_max", "must be at least 1"));
                }
                positive("PolynomialLR power", *power)
            }
            LrSchedule::MultiStepMultiGammaLR { milestones, gammas } => {
                milestones_ok("MultiStepMultiGammaLR", milestones)?;
                if milestones.len() != gammas.len() {
                    return Err(Error::invalid(
                        "MultiStepMultiGammaLR",
                        format!("{} milestones but {} gammas; give one gamma per milestone", milestones.len(), gammas.len()),
                    ));
                }
                gammas.iter().try_for_each(|g| positive("MultiStepMultiGammaLR gamma", *g))
            }
            LrSchedule::ReduceLROnPlateau { factor, threshold, min_lr, eps, .. } => {
                if *eps < 0.0 {
                    return Err(Error::invalid("ReduceLROnPlateau eps", "must be >= 0"));
                }
                if !(*factor > 0.0 && *factor < 1.0) {
                    return Err(Error::invalid("ReduceLROnPlateau factor", format!("{factor} must lie in (0, 1)")));
                }
                if *threshold < 0.0 || *min_lr < 0.0 {
                    return Err(Error::invalid("ReduceLROnPlateau", "threshold and min_lr must be >= 0"));
                }
                Ok(())
            }
        }
    }

    /// The learning rate for epoch `epoch` of a closed-form schedule; `None` for `ReduceLROnPlateau`, which
    /// depends on the metrics.
    pub fn lr_at(&self, base: f64, epoch: usize) -> Option<f64> {
        let e = epoch as f64;
        let count_le = |m: &[usize]| m.iter().filter(|&&x| x <= epoch).count();
        Some(match self {
            LrSchedule::StepLR { step_size, gamma } => base * gamma.powi((epoch / step_size) as i32),
            LrSchedule::MultiStepLR { milestones, gamma } => base * gamma.powi(count_le(milestones) as i32),
            LrSchedule::ExponentialLR { gamma } => base * gamma.powi(epoch as i32),
            LrSchedule::CosineAnnealingLR { t_max, eta_min } => {
                eta_min + (base - eta_min) * (1.0 + (std::f64::consts::PI * e / *t_max as f64).cos()) / 2.0
            }
            LrSchedule::CosineAnnealingWarmRestarts { t_0, t_mult, eta_min } => {
                let (t_cur, t_i) = if epoch < *t_0 {
                    (epoch, *t_0)
                } else if *t_mult == 1 {
                    (epoch % t_0, *t_0)
                } else {
                    // Find the restart period containing `epoch` by walking the geometric periods.
                    let (mut start, mut period): (usize, usize) = (0, *t_0);
                    // Saturating: a huge T_mult ends the walk instead of wrapping around forever.
                    while epoch >= start.saturating_add(period) {
                        start += period;
                        period = period.saturating_mul(*t_mult);
                    }
                    (epoch - start, period)
                };
                eta_min + (base - eta_min) * (1.0 + (std::f64::consts::PI * t_cur as f64 / t_i as f64).cos()) / 2.0
            }
            LrSchedule::PolynomialLR { t_max, power } => base * (1.0 - e / *t_max as f64).max(0.0).powf(*power),
            LrSchedule::MultiStepMultiGammaLR { milestones, gammas } => base * gammas[..count_le(milestones)].iter().product::<f64>(),
            LrSchedule::ReduceLROnPlateau { .. } => return None,
        })
    }

    /// The class name Distiller's YAML uses.
    pub fn class_name(&self) -> &'static str {
        match self {
            LrSchedule::StepLR { .. } => "StepLR",
            LrSchedule::MultiStepLR { .. } => "MultiStepLR",
            LrSchedule::ExponentialLR { .. } => "ExponentialLR",
            LrSchedule::CosineAnnealingLR { .. } => "CosineAnnealingLR",
            LrSchedule::CosineAnnealingWarmRestarts { .. } => "CosineAnnealingWarmRestarts",
            LrSchedule::PolynomialLR { .. } => "PolynomialLR",
            LrSchedule::MultiStepMultiGammaLR { .. } => "MultiStepMultiGammaLR",
            LrSchedule::ReduceLROnPlateau { .. } => "ReduceLROnPlateau",
        }
    }
}

/// Plateau bookkeeping of `ReduceLROnPlateau`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Plateau {
    best: Option<f64>,
    bad_epochs: usize,
    cooldown_left: usize,
}

/// Distiller's `LRPolicy`: drives an [`LrSchedule`] from the scheduler.
#[derive(Debug, Clone)]
pub struct LrPolicy {
    schedule: LrSchedule,
    plateau: Plateau,
}

impl LrPolicy {
    /// A policy for `schedule` (validated).
    pub fn new(schedule: LrSchedule) -> Result<Self> {
        schedule.validate()?;
        Ok(LrPolicy { schedule, plateau: Plateau::default() })
    }

    /// The schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }
}

impl Policy for LrPolicy {
    fn name(&self) -> String {
        format!("LRPolicy({})", self.schedule.class_name())
    }

    fn on_epoch_end(&mut self, ctx: &mut PolicyContext, metrics: &Metrics) -> Result<()> {
        let Some(optimizer) = ctx.optimizer.as_deref_mut() else {
            return Err(Error::invalid("LRPolicy", "the scheduler was called without an optimizer; pass Some(&mut optimizer)"));
        };
        let next = ctx.epoch + 1;
        if let LrSchedule::ReduceLROnPlateau { mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps, .. } = &self.schedule {
            let value = match mode {
                PlateauMode::Min => metrics.loss,
                PlateauMode::Max => metrics.top1,
            };
            let better = self.plateau.best.is_none_or(|b| match (mode, threshold_mode) {
                (PlateauMode::Min, ThresholdMode::Rel) => value < b * (1.0 - threshold),
                (PlateauMode::Min, ThresholdMode::Abs) => value < b - threshold,
                (PlateauMode::Max, ThresholdMode::Rel) => value > b * (1.0 + threshold),
                (PlateauMode::Max, ThresholdMode::Abs) => value > b + threshold,
            });
            let p = &mut self.plateau;
            if better {
                p.best = Some(value);
                p.bad_epochs = 0;
            } else {
                p.bad_epochs += 1;
            }
            if p.cooldown_left > 0 {
                p.cooldown_left -= 1;
                p.bad_epochs = 0;
            }
            if p.bad_epochs > *patience {
                for g in optimizer.groups_mut() {
                    let reduced = (g.lr * factor).max(*min_lr);
                    // PyTorch skips updates smaller than eps.
                    if g.lr - reduced > *eps {
                        g.lr = reduced;
                    }
                }
                p.cooldown_left = *cooldown;
                p.bad_epochs = 0;
            }
            return Ok(());
        }
        for g in optimizer.groups_mut() {
            g.lr = self.schedule.lr_at(g.initial_lr, next).unwrap_or(g.lr);
        }
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.plateau).unwrap_or(serde_json::Value::Null)
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        if !state.is_null() {
            self.plateau = serde_json::from_value(state.clone()).map_err(|e| Error::invalid("LRPolicy state", e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn closed_forms_match_pytorch_values() {
        // Values computed by hand from PyTorch's documented formulas.
        let s = LrSchedule::StepLR { step_size: 30, gamma: 0.1 };
        assert!(close(s.lr_at(0.1, 29).unwrap(), 0.1) && close(s.lr_at(0.1, 30).unwrap(), 0.01) && close(s.lr_at(0.1, 60).unwrap(), 0.001));
        let s = LrSchedule::MultiStepLR { milestones: vec![2, 5], gamma: 0.5 };
        assert_eq!([1, 2, 4, 5].map(|e| s.lr_at(1.0, e).unwrap()), [1.0, 0.5, 0.5, 0.25]);
        let s = LrSchedule::CosineAnnealingLR { t_max: 10, eta_min: 0.0 };
        assert!(close(s.lr_at(1.0, 5).unwrap(), 0.5) && close(s.lr_at(1.0, 10).unwrap(), 0.0));
        let s = LrSchedule::CosineAnnealingWarmRestarts { t_0: 2, t_mult: 2, eta_min: 0.0 };
        // Periods: [0,2), [2,6), [6,14): epoch 4 is 2 into a period of 4 → cos(π/2) → 0.5.
        assert!(close(s.lr_at(1.0, 4).unwrap(), 0.5) && close(s.lr_at(1.0, 6).unwrap(), 1.0));
        let s = LrSchedule::PolynomialLR { t_max: 4, power: 2.0 };
        assert!(close(s.lr_at(1.0, 2).unwrap(), 0.25));
        let s = LrSchedule::MultiStepMultiGammaLR { milestones: vec![1, 3], gammas: vec![0.5, 0.1] };
        assert!(close(s.lr_at(1.0, 0).unwrap(), 1.0) && close(s.lr_at(1.0, 1).unwrap(), 0.5) && close(s.lr_at(1.0, 3).unwrap(), 0.05));
    }

    #[test]
    fn exponential_and_plateau_schedules() {
        let s = LrSchedule::ExponentialLR { gamma: 0.5 };
        assert!(close(s.lr_at(0.8, 3).unwrap(), 0.1));
        assert!(s.lr_at(0.8, 0).is_some());
        // ReduceLROnPlateau(mode=min, factor=0.5, patience=1, threshold=0.1 rel, cooldown=1): a loss must drop
        // below best·0.9 to count as better.
        let plateau = LrSchedule::ReduceLROnPlateau {
            mode: PlateauMode::Min,
            factor: 0.5,
            patience: 1,
            threshold: 0.1,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 1,
            min_lr: 0.01,
            eps: 1e-8,
            verbose: false,
        };
        assert!(plateau.lr_at(1.0, 1).is_none(), "depends on metrics");
        let mut model = crate::models::create_model("mlp", "mnist", tch::Device::Cpu).unwrap();
        let mut opt = crate::optim::Optimizer::for_model(&model, crate::optim::OptimizerConfig::sgd(0.0, 0.0), 0.08).unwrap();
        let mut masks = crate::scheduler::Masks::default();
        let schedule = crate::scheduler::PolicySchedule::range(0, 20, 1).unwrap();
        let mut policy = LrPolicy::new(plateau).unwrap();
        // Losses: 1.0 (best), 0.95 (not 10% better: bad 1), 0.95 (bad 2 > patience → ×0.5, cooldown 1),
        // 0.95 (cooldown absorbs it), 0.95 (bad 1), 0.95 (bad 2 → ×0.5), then 0.5 (better), ...
        let mut lrs = Vec::new();
        for (epoch, loss) in [1.0, 0.95, 0.95, 0.95, 0.95, 0.95, 0.5, 0.5, 0.5, 0.5, 0.5].into_iter().enumerate() {
            let mut ctx = PolicyContext { model: &mut model, masks: &mut masks, optimizer: Some(&mut opt), epoch, schedule: &schedule };
            policy.on_epoch_end(&mut ctx, &Metrics { loss, top1: 0.0, top5: 0.0 }).unwrap();
            lrs.push(opt.lr());
        }
        assert_eq!(lrs, [0.08, 0.08, 0.04, 0.04, 0.04, 0.02, 0.02, 0.02, 0.01, 0.01, 0.01]);
    }

    #[test]
    fn bad_hyper_parameters_are_errors() {
        assert!(LrPolicy::new(LrSchedule::StepLR { step_size: 0, gamma: 0.1 }).is_err());
        let e = LrPolicy::new(LrSchedule::MultiStepMultiGammaLR { milestones: vec![1, 2], gammas: vec![0.1] }).unwrap_err();
        assert!(e.to_string().contains("one gamma per milestone"));
        assert!(LrPolicy::new(LrSchedule::MultiStepLR { milestones: vec![5, 2], gamma: 0.1 }).is_err());
    }
}
