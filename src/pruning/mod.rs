//! Pruners and the pruning policy (Distiller's `pruning/` and `PruningPolicy`).
//!
//! A [`Pruner`] decides masks; the [`PruningPolicy`] decides when: it asks the pruner for masks at the start of
//! each active epoch (and every `mini_batch_pruning_frequency` mini-batches), applies them before each
//! forward pass, and the scheduler re-applies them after every optimizer step.
//!
//! Element-wise pruners live in [`element`], structure pruners (filters, channels, rows, blocks) in
//! [`structure`]; [`criteria`] holds the shared thresholds and AGP's formula.
pub mod activations;
pub mod criteria;
pub mod element;
pub mod structure;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::nn::{canonical_param_name, normalize_name, Model, Observer, ObserverId};
use crate::scheduler::{Masks, Minibatch, Policy, PolicyContext, PolicySchedule};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// What a pruner sees besides the parameter: the epoch, its policy's schedule and the model.
pub struct PruneContext<'a> {
    /// The current epoch.
    pub epoch: usize,
    /// The pruning policy's schedule (`starting_epoch`, `ending_epoch`, `frequency`).
    pub schedule: &'a PolicySchedule,
    /// The model (activation-ranked and leader-dependent pruners read other tensors through it).
    pub model: &'a Model,
}

/// Decides parameter masks. Called for every named parameter; a pruner ignores those it does not prune.
pub trait Pruner: Send {
    /// The Distiller class name (`AutomatedGradualPruner`).
    fn class_name(&self) -> &'static str;

    /// The instance name from the schedule.
    fn name(&self) -> &str;

    /// Whether this pruner acts on `param_name`.
    fn prunes(&self, param_name: &str) -> bool;

    /// Sets (or leaves) the mask of `param_name` in `masks`.
    fn set_param_mask(&mut self, param: &Tensor, param_name: &str, masks: &mut Masks, ctx: &PruneContext) -> Result<()>;

    /// The sparsity this pruner aims at for `param_name` in `epoch`, when it is known without the weights
    /// (schedule previews).
    fn target_sparsity(&self, param_name: &str, epoch: usize, schedule: &PolicySchedule) -> Option<f64> {
        let _ = (param_name, epoch, schedule);
        None
    }

    /// Replaces the per-parameter sparsity levels (the `levels` argument of a pruning policy); only level
    /// pruners accept it.
    fn set_levels(&mut self, levels: &PerParam) -> Result<()> {
        let _ = levels;
        Err(Error::invalid("levels", format!("{} has no levels to override", self.class_name())))
    }

    /// An observer the pruner needs attached to the model while its policy runs (activation statistics).
    fn observer(&self) -> Option<Arc<Mutex<dyn Observer>>> {
        None
    }

    /// Called after each round of masks, e.g. to restart activation statistics.
    fn masks_computed(&mut self) {}

    /// What the pruner remembers between calls (thresholds fixed at the first call), for checkpoints.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores [`Pruner::state`].
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// A value per parameter name with an optional default (`'*'` in Distiller's YAML maps).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PerParam {
    /// Values by (normalized) parameter name, in file order.
    pub values: Vec<(String, f64)>,
    /// The `'*'` entry.
    pub default: Option<f64>,
}

impl PerParam {
    /// From a name → value map in which `*` is the default; names are normalized.
    pub fn from_map(map: &BTreeMap<String, f64>) -> Self {
        Self::from_pairs(map.iter().map(|(k, v)| (k.clone(), *v)))
    }

    /// From (name, value) pairs in order; `*` is the default.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, f64)>) -> Self {
        let mut p = PerParam::default();
        for (k, v) in pairs {
            if k == "*" {
                p.default = Some(v);
            } else {
                p.values.push((normalize_name(&k), v));
            }
        }
        p
    }

    /// The value for `name`, or the default.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| *v).or(self.default)
    }

    /// The explicitly named parameters.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.iter().map(|(n, _)| n.as_str())
    }
}

/// The `args` of a pruning policy entry, with Distiller's defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruningArgs {
    /// Overrides a level pruner's levels at each epoch begin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub levels: Option<BTreeMap<String, f64>>,
    /// At the policy's last epoch, make masks permanent (apply them for good, drop forward-only/double copies).
    pub keep_mask: bool,
    /// Recompute masks every this many mini-batches (0: only at epoch begin).
    pub mini_batch_pruning_frequency: usize,
    /// Apply masks only before the forward pass, not after the optimizer step.
    pub mask_on_forward_only: bool,
    /// Mask gradients before the optimizer step (needs `mask_on_forward_only`).
    pub mask_gradients: bool,
    /// Keep unmasked weights and restore them before the optimizer step.
    pub use_double_copies: bool,
    /// Drop masks at every mini-batch end.
    pub discard_masks_at_minibatch_end: bool,
    /// Compute the first masks at the second mini-batch instead of at epoch begin.
    pub skip_first_minibatch: bool,
    /// Rank each convolution's weights as if the batch norm right after it were folded in (filters scaled by
    /// `γ/√(σ²_running + ε)`); the masks still apply to the unfolded weights.
    pub fold_batchnorm: bool,
}

impl PruningArgs {
    /// Checks combinations Distiller rejects.
    pub fn validate(&self) -> Result<()> {
        if self.mask_gradients && !self.mask_on_forward_only {
            return Err(Error::invalid("mask_gradients", "requires mask_on_forward_only: True (as in Distiller)"));
        }
        Ok(())
    }
}

/// Distiller's `PruningPolicy`: drives a [`Pruner`] over the epochs of its schedule.
pub struct PruningPolicy {
    pruner: Box<dyn Pruner>,
    args: PruningArgs,
    levels: Option<PerParam>,
    /// Distiller's `is_initialized`: the first epoch has begun (saved in checkpoints).
    initialized: bool,
    /// The maskers' flags and the observer are set up in this process (not saved: a resumed run redoes it).
    attached: bool,
    observer: Option<ObserverId>,
    /// With `fold_batchnorm`: the batch norm after each convolution, by the convolution's weight name (found
    /// again at every epoch begin, as Distiller rebuilds its graph then).
    batch_norms: HashMap<String, String>,
}

impl PruningPolicy {
    /// A policy for `pruner` with `args`.
    pub fn new(pruner: Box<dyn Pruner>, args: PruningArgs) -> Result<Self> {
        args.validate()?;
        let levels = args.levels.as_ref().map(PerParam::from_map);
        Ok(PruningPolicy { pruner, args, levels, initialized: false, attached: false, observer: None, batch_norms: HashMap::new() })
    }

    /// The pruner.
    pub fn pruner(&self) -> &dyn Pruner {
        self.pruner.as_ref()
    }

    fn set_masks(&mut self, ctx: &mut PolicyContext) -> Result<()> {
        let pctx = PruneContext { epoch: ctx.epoch, schedule: ctx.schedule, model: ctx.model };
        for (name, param) in ctx.model.named_parameters() {
            let name = canonical_param_name(&name);
            if self.pruner.prunes(&name) {
                let ranked = match self.batch_norms.get(&name) {
                    Some(bn) => folded(ctx.model, name.trim_end_matches(".weight"), bn)?,
                    None => param,
                };
                self.pruner.set_param_mask(&ranked, &name, ctx.masks, &pctx)?;
            }
        }
        self.pruner.masks_computed();
        Ok(())
    }
}

impl Policy for PruningPolicy {
    fn name(&self) -> String {
        format!("PruningPolicy({} '{}')", self.pruner.class_name(), self.pruner.name())
    }

    fn on_epoch_begin(&mut self, ctx: &mut PolicyContext) -> Result<()> {
        if let Some(levels) = &self.levels {
            self.pruner.set_levels(levels)?;
        }
        if !self.attached {
            // Activation-ranked pruners read statistics gathered while the model trains; the first masks
            // therefore come one epoch (or mini-batch frequency period) after the statistics start.
            if let Some(obs) = self.pruner.observer() {
                self.observer = Some(ctx.model.attach_observer(obs));
            }
            // Distiller sets these flags on every parameter's masker; here only on the pruner's own
            // parameters, so one policy's options cannot leak into another pruner's masks.
            for (name, _) in ctx.model.named_parameters() {
                if self.pruner.prunes(&canonical_param_name(&name)) {
                    let m = ctx.masks.get_mut(&name)?;
                    m.use_double_copies = self.args.use_double_copies;
                    m.mask_on_forward_only = self.args.mask_on_forward_only;
                    m.mask_gradients = self.args.mask_gradients;
                }
            }
            self.attached = true;
        }
        if self.args.fold_batchnorm {
            let pairs = crate::quantization::bn_fold::conv_bn_pairs(ctx.model)?;
            self.batch_norms = pairs.into_iter().map(|(conv, bn)| (format!("{conv}.weight"), bn)).collect();
        }
        if !self.initialized {
            self.initialized = true;
            if self.args.skip_first_minibatch {
                return Ok(());
            }
        }
        self.set_masks(ctx)
    }

    fn on_minibatch_begin(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> Result<()> {
        let global = ctx.epoch * mb.per_epoch + mb.index;
        let freq = self.args.mini_batch_pruning_frequency;
        let recompute = (mb.index > 0 && freq != 0 && global % freq == 0) || (self.args.skip_first_minibatch && global == 1);
        if recompute {
            self.set_masks(ctx)?;
        }
        for (name, param) in ctx.model.named_parameters() {
            if let Some(m) = ctx.masks.find_mut(&name) {
                m.apply_mask(&param)?;
            }
        }
        Ok(())
    }

    fn before_parameter_optimization(&mut self, ctx: &mut PolicyContext, _: Minibatch) -> Result<()> {
        for (name, param) in ctx.model.named_parameters() {
            if let Some(m) = ctx.masks.find_mut(&name) {
                m.revert_weights(&param)?;
            }
        }
        Ok(())
    }

    fn on_minibatch_end(&mut self, ctx: &mut PolicyContext, _: Minibatch) -> Result<()> {
        if self.args.discard_masks_at_minibatch_end {
            for (name, _) in ctx.model.named_parameters() {
                if self.pruner.prunes(&canonical_param_name(&name)) {
                    ctx.masks.get_mut(&name)?.mask = None;
                }
            }
        }
        Ok(())
    }

    fn on_epoch_end(&mut self, ctx: &mut PolicyContext, _: &Metrics) -> Result<()> {
        // Distiller tests `epoch == ending_epoch - 1`, which never holds when `frequency > 1` leaves that epoch
        // unscheduled; the last epoch the policy actually runs is what keep_mask means.
        if !ctx.schedule.is_last_active_epoch(ctx.epoch) {
            return Ok(());
        }
        self.attached = false;
        if let Some(id) = self.observer.take() {
            ctx.model.detach_observer(id);
        }
        for (name, param) in ctx.model.named_parameters() {
            if !self.pruner.prunes(&canonical_param_name(&name)) {
                continue;
            }
            let m = ctx.masks.get_mut(&name)?;
            if self.args.keep_mask {
                m.use_double_copies = false;
                m.mask_on_forward_only = false;
                m.mask_tensor(&param)?;
            }
            m.mask_gradients = false;
        }
        Ok(())
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "initialized": self.initialized, "pruner": self.pruner.state() })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        if state.is_null() {
            return Ok(());
        }
        self.initialized = state["initialized"].as_bool().ok_or_else(|| Error::invalid("pruning policy state", "no 'initialized' flag"))?;
        self.pruner.load_state(&state["pruner"])
    }
}

/// The weight of convolution `conv` with the batch norm `bn` folded in, for ranking.
fn folded(model: &Model, conv: &str, bn: &str) -> Result<Tensor> {
    use std::any::Any;
    let conv_module = model.module(conv)?;
    let bn_module = model.module(bn)?;
    match ((conv_module as &dyn Any).downcast_ref::<crate::nn::Conv2d>(), (bn_module as &dyn Any).downcast_ref::<crate::nn::BatchNorm2d>()) {
        (Some(c), Some(b)) => crate::quantization::bn_fold::folded_weight(c, b),
        _ => Err(Error::invalid("fold_batchnorm", format!("'{conv}' followed by '{bn}' is not a Conv2d and a BatchNorm2d"))),
    }
}

/// The parameter names a pruner lists (`weights:`), normalized.
pub(crate) fn normalized(weights: &[String]) -> Vec<String> {
    weights.iter().map(|w| normalize_name(w)).collect()
}
