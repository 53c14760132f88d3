//! The compression scheduler: Distiller's `CompressionScheduler`, which calls each scheduled policy at its place
//! in the training loop and keeps every parameter's mask.
//!
//! Call order inside one epoch (see [`crate::train`] for the loop that does it for you):
//!
//! ```text
//! on_epoch_begin(epoch)
//! for each mini-batch:
//!     on_minibatch_begin            (pruning policies apply their masks here)
//!     forward
//!     after_forward                 (knowledge distillation runs its teacher on the same input)
//!     objective loss
//!     before_backward_pass          (regularizers add their terms; returns the overall loss)
//!     zero_grad, backward
//!     before_parameter_optimization (gradient masks; double-copy weights restored)
//!     optimizer step
//!     on_minibatch_end              (first re-applies EVERY mask, then the policies)
//! validate
//! on_epoch_end(epoch, validation metrics)
//! ```
//!
//! Within an epoch, policies run in the order they were added.
//!
//! ```
//! use distill::scheduler::{CompressionScheduler, Minibatch, Policy, PolicyContext, PolicySchedule};
//!
//! struct Announce;
//! impl Policy for Announce {
//!     fn name(&self) -> String { "Announce".into() }
//!     fn on_epoch_begin(&mut self, ctx: &mut PolicyContext) -> distill::Result<()> {
//!         println!("epoch {} begins", ctx.epoch);
//!         Ok(())
//!     }
//! }
//! # fn main() -> distill::Result<()> {
//! let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let mut scheduler = CompressionScheduler::new(&model);
//! scheduler.add_policy(Box::new(Announce), PolicySchedule::range(0, 10, 2)?);
//! scheduler.on_epoch_begin(&mut model, 4, None)?;
//! # Ok(()) }
//! ```
pub mod lr;
mod masker;
mod policy;

use tch::Tensor;

use crate::metrics::Metrics;
use crate::nn::Model;
use crate::optim::Optimizer;
use crate::{Error, Result};

pub use masker::{Masks, ParameterMasker};
pub use policy::{check_epochs, LossComponent, Minibatch, Policy, PolicyContext, PolicyLoss, PolicySchedule, MAX_EPOCHS};

struct ScheduledPolicy {
    policy: Box<dyn Policy>,
    schedule: PolicySchedule,
}

/// Schedules policies over epochs and owns the parameter masks.
pub struct CompressionScheduler {
    policies: Vec<ScheduledPolicy>,
    masks: Masks,
}

/// Calls `$method` on every policy active in `$epoch`, with a fresh context for each.
macro_rules! dispatch {
    ($self:ident, $model:ident, $epoch:expr, $optimizer:ident, |$p:ident, $ctx:ident| $call:expr) => {{
        for sp in $self.policies.iter_mut().filter(|sp| sp.schedule.is_active($epoch)) {
            let mut $ctx = PolicyContext {
                model: &mut *$model,
                masks: &mut $self.masks,
                optimizer: $optimizer.as_deref_mut(),
                epoch: $epoch,
                schedule: &sp.schedule,
            };
            let $p = &mut sp.policy;
            $call?;
        }
    }};
}

impl CompressionScheduler {
    /// A scheduler with no policies and an empty mask for each of `model`'s parameters.
    pub fn new(model: &Model) -> Self {
        CompressionScheduler { policies: Vec::new(), masks: Masks::new(model.named_parameters().into_iter().map(|(n, _)| n)) }
    }

    /// Adds `policy`, active at the epochs of `schedule`.
    pub fn add_policy(&mut self, policy: Box<dyn Policy>, schedule: PolicySchedule) {
        self.policies.push(ScheduledPolicy { policy, schedule });
    }

    /// The policies with their schedules, in call order.
    pub fn policies(&self) -> impl Iterator<Item = (&dyn Policy, &PolicySchedule)> {
        self.policies.iter().map(|sp| (sp.policy.as_ref(), &sp.schedule))
    }

    /// The parameter masks (Distiller's `zeros_mask_dict`).
    pub fn masks(&self) -> &Masks {
        &self.masks
    }

    /// The parameter masks, mutably.
    pub fn masks_mut(&mut self) -> &mut Masks {
        &mut self.masks
    }

    /// Start of epoch `epoch`.
    pub fn on_epoch_begin(&mut self, model: &mut Model, epoch: usize, mut optimizer: Option<&mut Optimizer>) -> Result<()> {
        dispatch!(self, model, epoch, optimizer, |p, ctx| p.on_epoch_begin(&mut ctx));
        Ok(())
    }

    /// Before the forward pass of mini-batch `mb`.
    pub fn on_minibatch_begin(&mut self, model: &mut Model, epoch: usize, mb: Minibatch, mut optimizer: Option<&mut Optimizer>) -> Result<()> {
        dispatch!(self, model, epoch, optimizer, |p, ctx| p.on_minibatch_begin(&mut ctx, mb));
        Ok(())
    }

    /// After the forward pass of mini-batch `mb` on `input`, which gave `output`.
    pub fn after_forward(&mut self, model: &mut Model, epoch: usize, mb: Minibatch, input: &Tensor, output: &Tensor, mut optimizer: Option<&mut Optimizer>) -> Result<()> {
        dispatch!(self, model, epoch, optimizer, |p, ctx| p.after_forward(&mut ctx, mb, input, output));
        Ok(())
    }

    /// Lets every active policy add terms to `loss`; returns the overall loss and the added terms.
    pub fn before_backward_pass(
        &mut self,
        model: &mut Model,
        epoch: usize,
        mb: Minibatch,
        loss: &Tensor,
        mut optimizer: Option<&mut Optimizer>,
    ) -> Result<PolicyLoss> {
        let mut overall = loss.shallow_clone();
        let mut components = Vec::new();
        dispatch!(self, model, epoch, optimizer, |p, ctx| p.before_backward_pass(&mut ctx, mb, &overall).map(|added| {
            if let Some(added) = added {
                overall = added.overall_loss;
                components.extend(added.loss_components);
            }
        }));
        Ok(PolicyLoss { overall_loss: overall, loss_components: components })
    }

    /// After `backward()`: multiplies the gradients of parameters whose masker has `mask_gradients` by their
    /// mask (what Distiller's gradient hooks do during backward), then calls the policies.
    pub fn before_parameter_optimization(&mut self, model: &mut Model, epoch: usize, mb: Minibatch, mut optimizer: Option<&mut Optimizer>) -> Result<()> {
        for (name, param) in model.named_parameters() {
            let Some(masker) = self.masks.find_mut(&name) else { continue };
            if masker.mask_gradients {
                let grad = param.grad();
                if grad.defined() {
                    masker.mask_tensor(&grad)?;
                }
            }
        }
        dispatch!(self, model, epoch, optimizer, |p, ctx| p.before_parameter_optimization(&mut ctx, mb));
        Ok(())
    }

    /// After the optimizer step: re-applies every mask (in every epoch, with or without active policies, so
    /// pruned weights cannot regrow), then calls the policies.
    pub fn on_minibatch_end(&mut self, model: &mut Model, epoch: usize, mb: Minibatch, mut optimizer: Option<&mut Optimizer>) -> Result<()> {
        self.mask_all_weights(model)?;
        dispatch!(self, model, epoch, optimizer, |p, ctx| p.on_minibatch_end(&mut ctx, mb));
        Ok(())
    }

    /// End of epoch `epoch`, with the validation metrics.
    pub fn on_epoch_end(&mut self, model: &mut Model, epoch: usize, metrics: &Metrics, mut optimizer: Option<&mut Optimizer>) -> Result<()> {
        dispatch!(self, model, epoch, optimizer, |p, ctx| p.on_epoch_end(&mut ctx, metrics));
        Ok(())
    }

    /// Lets every policy prepare the model before a checkpoint of `resumed_epoch` is loaded into it.
    pub fn before_restore(&mut self, model: &mut Model, resumed_epoch: usize, mut optimizer: Option<&mut Optimizer>) -> Result<()> {
        for sp in self.policies.iter_mut() {
            let mut ctx = PolicyContext { model: &mut *model, masks: &mut self.masks, optimizer: optimizer.as_deref_mut(), epoch: resumed_epoch, schedule: &sp.schedule };
            sp.policy.before_restore(&mut ctx, resumed_epoch)?;
        }
        Ok(())
    }

    /// Applies every mask whose masker is not `mask_on_forward_only` (Distiller's `mask_all_weights`).
    pub fn mask_all_weights(&mut self, model: &Model) -> Result<()> {
        for (name, param) in model.named_parameters() {
            let Some(masker) = self.masks.find_mut(&name) else { continue };
            if !masker.mask_on_forward_only {
                masker.apply_mask(&param)?;
            }
        }
        Ok(())
    }

    /// The policies' saved progress, in policy order, for checkpoints.
    pub fn policy_states(&self) -> Vec<serde_json::Value> {
        self.policies.iter().map(|sp| sp.policy.state()).collect()
    }

    /// Restores masks and policy progress saved by a checkpoint.
    pub fn load_state(&mut self, masks: &[(String, Tensor)], policy_states: &[serde_json::Value], model: &Model) -> Result<()> {
        if !policy_states.is_empty() && policy_states.len() != self.policies.len() {
            return Err(Error::invalid(
                "scheduler state",
                format!("the checkpoint has {} policies, this scheduler {}", policy_states.len(), self.policies.len()),
            ));
        }
        for m in self.masks.iter_mut() {
            m.mask = None;
        }
        let device = model.device();
        for (name, mask) in masks {
            let param = model.parameter(name)?;
            self.masks.set_mask(&crate::nn::normalize_name(name), mask.f_to_device(device)?, &param.size())?;
        }
        for (sp, state) in self.policies.iter_mut().zip(policy_states) {
            sp.policy.load_state(state)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CompressionScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for sp in &self.policies {
            list.entry(&(sp.policy.name(), sp.schedule.epochs()));
        }
        list.finish()
    }
}
