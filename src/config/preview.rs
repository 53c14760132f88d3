//! What a schedule will do, epoch by epoch, without training: active policies, each pruner's target sparsity
//! per tensor, the learning rate, and warnings about conflicts.
use std::fmt;

use super::{Epochs, PolicyKind, Schedule};
use crate::nn::{normalize_name, Model};
use crate::scheduler::lr::LrSchedule;
use crate::scheduler::PolicySchedule;
use crate::Result;

/// One epoch of a [`Preview`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewEpoch {
    /// Epoch number.
    pub epoch: usize,
    /// The policies active in this epoch (`pruner:agp`, `lr_scheduler:cosine`, ...).
    pub policies: Vec<String>,
    /// Learning rate during the epoch; `None` once a `ReduceLROnPlateau` schedule (which depends on the
    /// validation metrics) has acted.
    pub lr: Option<f64>,
    /// (tensor, target sparsity, pruner) for every pruner that prunes to a known target in this epoch.
    pub targets: Vec<(String, f64, String)>,
    /// In an epoch that thins (with a model): (tensor, filters or channels before, expected after) for each
    /// tensor a filter or channel pruner has a target for by then. Expected: `n − ⌊target·n⌋`, before residual
    /// couplings, which can keep more.
    pub thinning: Vec<(String, i64, i64)>,
}

/// A schedule's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// One row per training epoch.
    pub epochs: Vec<PreviewEpoch>,
    /// Conflicts and likely mistakes.
    pub warnings: Vec<String>,
}

impl Schedule {
    /// Previews `epochs` epochs starting from learning rate `lr`. With a `model`, `'*'` entries expand to its
    /// parameters and names are checked against it.
    pub fn preview(&self, epochs: usize, lr: f64, model: Option<&Model>) -> Result<Preview> {
        crate::scheduler::check_epochs("epochs", epochs)?;
        if let Some(m) = model {
            self.check_model(m)?;
        }
        let mut warnings = Vec::new();
        let mut pruning: Vec<(String, PolicySchedule, Box<dyn crate::pruning::Pruner>, Vec<String>, bool)> = Vec::new();
        let mut lrs: Vec<(PolicySchedule, LrSchedule)> = Vec::new();
        let mut thinning_epochs: Vec<usize> = Vec::new();
        let mut removed_dims: Vec<(String, i64)> = Vec::new();
        let mut rows: Vec<PreviewEpoch> =
            (0..epochs).map(|epoch| PreviewEpoch { epoch, policies: Vec::new(), lr: Some(lr), targets: Vec::new(), thinning: Vec::new() }).collect();
        for p in &self.policies {
            let Some(schedule) = p.epochs.as_ref().map(Epochs::schedule).transpose()? else { continue };
            if schedule.ending_epoch > epochs {
                warnings.push(format!(
                    "{} '{}' runs until epoch {} but training ends after {epochs} epochs",
                    p.kind.key(),
                    p.instance_name,
                    schedule.ending_epoch - 1
                ));
            }
            for &e in schedule.epochs().iter().filter(|&&e| e < epochs) {
                rows[e].policies.push(format!("{}:{}", p.kind.key(), p.instance_name));
            }
            match p.kind {
                PolicyKind::Pruner => {
                    if let Some((_, cfg)) = self.pruners.iter().find(|(n, _)| *n == p.instance_name) {
                        let names: Vec<String> = match model {
                            Some(m) => m.named_parameters().into_iter().map(|(n, _)| n).collect(),
                            None => cfg.parameter_names().iter().map(|n| normalize_name(n)).collect(),
                        };
                        let pruner = cfg.build(&p.instance_name)?;
                        let names: Vec<String> = names.into_iter().filter(|n| pruner.prunes(n)).collect();
                        if let Some(dim) = cfg.removed_dim() {
                            removed_dims.extend(names.iter().map(|n| (n.clone(), dim)));
                        }
                        pruning.push((p.instance_name.clone(), schedule, pruner, names, p.pruning_args.keep_mask));
                    }
                }
                PolicyKind::LrScheduler => {
                    if let Some((_, s)) = self.lr_schedulers.iter().find(|(n, _)| *n == p.instance_name) {
                        lrs.push((schedule, s.clone()));
                    }
                }
                PolicyKind::Quantizer => {
                    for (name, ps, _, _, keep) in &pruning {
                        if ps.epochs().last().is_some_and(|&last| last >= schedule.starting_epoch) && !keep {
                            warnings.push(format!(
                                "quantizer '{}' starts at epoch {} while pruner '{name}' is still active and does not keep its mask (add keep_mask: True)",
                                p.instance_name, schedule.starting_epoch
                            ));
                        }
                    }
                }
                PolicyKind::Extension => thinning_epochs.extend(schedule.epochs().iter().filter(|&&e| e < epochs)),
                PolicyKind::Regularizer | PolicyKind::Distiller => {}
            }
        }
        for (i, (a, sa, pa, na, _)) in pruning.iter().enumerate() {
            for (b, sb, _, nb, _) in &pruning[i + 1..] {
                let shared: Vec<&String> = na.iter().filter(|n| nb.contains(n)).collect();
                let overlap = sa.epochs().iter().any(|e| sb.is_active(*e));
                if !shared.is_empty() && overlap {
                    warnings.push(format!("pruners '{a}' and '{b}' both prune {} in overlapping epochs", shared.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")));
                }
            }
            for row in rows.iter_mut().filter(|r| sa.is_active(r.epoch)) {
                for n in na {
                    if let Some(t) = pa.target_sparsity(n, row.epoch, sa) {
                        row.targets.push((n.clone(), t, a.clone()));
                    }
                }
            }
        }
        if let Some(model) = model {
            let shapes: std::collections::HashMap<String, Vec<i64>> = model.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect();
            for &e in &thinning_epochs {
                for (name, dim) in &removed_dims {
                    let target = rows[..=e].iter().rev().find_map(|r| r.targets.iter().find(|(n, _, _)| n == name).map(|(_, t, _)| *t));
                    if let (Some(t), Some(shape)) = (target, shapes.get(name)) {
                        let n = shape[*dim as usize];
                        rows[e].thinning.push((name.clone(), n, n - (t * n as f64).floor() as i64));
                    }
                }
            }
        }
        // LR schedules act at the end of their active epochs, setting the rate of the next one.
        let mut current = Some(lr);
        for e in 0..epochs {
            rows[e].lr = current;
            for (s, sched) in &lrs {
                if s.is_active(e) {
                    current = current.and_then(|_| sched.lr_at(lr, e + 1));
                }
            }
        }
        Ok(Preview { epochs: rows, warnings })
    }
}

impl fmt::Display for Preview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:>5}  {:>10}  {:<40}  targets", "epoch", "lr", "active policies")?;
        for r in &self.epochs {
            let lr = r.lr.map_or("plateau".to_string(), |l| format!("{l:.6}"));
            let targets: Vec<String> = r.targets.iter().map(|(n, t, _)| format!("{n}={:.1}%", 100.0 * t)).collect();
            writeln!(f, "{:>5}  {:>10}  {:<40}  {}", r.epoch, lr, r.policies.join(", "), targets.join(" "))?;
            if !r.thinning.is_empty() {
                let counts: Vec<String> = r.thinning.iter().map(|(n, before, after)| format!("{n} {before}->{after}")).collect();
                writeln!(f, "{:>5}  {:>10}  thinning (expected structures left): {}", "", "", counts.join(" "))?;
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}
