use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::Masks;
use crate::metrics::Metrics;
use crate::nn::Model;
use crate::optim::Optimizer;
use crate::{Error, Result};

/// When a policy is active: Distiller's `starting_epoch`/`ending_epoch`/`frequency` or an explicit epoch list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySchedule {
    /// First active epoch.
    pub starting_epoch: usize,
    /// One past the last epoch of the range (exclusive, as Distiller).
    pub ending_epoch: usize,
    /// Epochs between activations; `None` for an explicit list.
    pub frequency: Option<usize>,
    epochs: Vec<usize>,
}

/// The most epochs a schedule, a preview or a run may span: every epoch costs a record, so a limit keeps a
/// mistyped `ending_epoch: 1000000000` from asking for gigabytes. Far beyond any real training run.
pub const MAX_EPOCHS: usize = 100_000;

/// Refuses an epoch count beyond [`MAX_EPOCHS`].
pub fn check_epochs(what: &str, epochs: usize) -> Result<()> {
    if epochs > MAX_EPOCHS {
        return Err(Error::invalid(what, format!("{epochs} epochs is beyond the limit of {MAX_EPOCHS}")));
    }
    Ok(())
}

impl PolicySchedule {
    /// Active at `starting_epoch, starting_epoch + frequency, ...` while below `ending_epoch`.
    ///
    /// As Distiller: requires `starting_epoch < ending_epoch` and `0 < frequency <= ending_epoch - starting_epoch`.
    ///
    /// ```
    /// let s = distill::scheduler::PolicySchedule::range(0, 10, 3)?;
    /// assert_eq!(s.epochs(), [0, 3, 6, 9]);
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn range(starting_epoch: usize, ending_epoch: usize, frequency: usize) -> Result<Self> {
        check_epochs("ending_epoch", ending_epoch)?;
        if starting_epoch >= ending_epoch {
            return Err(Error::invalid(
                "policy schedule",
                format!("starting_epoch {starting_epoch} must be below ending_epoch {ending_epoch} (ending_epoch is exclusive)"),
            ));
        }
        if frequency == 0 || frequency > ending_epoch - starting_epoch {
            return Err(Error::invalid(
                "policy schedule",
                format!("frequency {frequency} must lie in 1..={} for epochs {starting_epoch}..{ending_epoch}", ending_epoch - starting_epoch),
            ));
        }
        let epochs = (starting_epoch..ending_epoch).step_by(frequency).collect();
        Ok(PolicySchedule { starting_epoch, ending_epoch, frequency: Some(frequency), epochs })
    }

    /// Active exactly at `epochs`, which must be strictly increasing; `ending_epoch` is the last one plus one.
    pub fn epochs_list(epochs: Vec<usize>) -> Result<Self> {
        let (Some(&first), Some(&last)) = (epochs.first(), epochs.last()) else {
            return Err(Error::invalid("policy schedule", "the epochs list is empty"));
        };
        check_epochs("epochs", last.saturating_add(1))?;
        if epochs.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid("policy schedule", format!("epochs {epochs:?} must be strictly increasing")));
        }
        Ok(PolicySchedule { starting_epoch: first, ending_epoch: last + 1, frequency: None, epochs })
    }

    /// The epochs at which the policy runs.
    pub fn epochs(&self) -> &[usize] {
        &self.epochs
    }

    /// Whether the policy runs in `epoch`.
    pub fn is_active(&self, epoch: usize) -> bool {
        self.epochs.binary_search(&epoch).is_ok()
    }

    /// Distiller's `is_last_epoch`: `epoch == ending_epoch - 1`. With `frequency > 1` that epoch may not be
    /// scheduled at all; [`PolicySchedule::is_last_active_epoch`] is the corrected test.
    pub fn is_last_epoch(&self, epoch: usize) -> bool {
        epoch + 1 == self.ending_epoch
    }

    /// Whether `epoch` is the last epoch at which the policy actually runs.
    pub fn is_last_active_epoch(&self, epoch: usize) -> bool {
        self.epochs.last() == Some(&epoch)
    }
}

/// Position of a mini-batch within its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minibatch {
    /// Index within the epoch, from 0.
    pub index: usize,
    /// Mini-batches per epoch (`ceil(samples / batch_size)`).
    pub per_epoch: usize,
}

/// A named term a policy added to the loss (Distiller's `LossComponent`), e.g. `GroupLassoRegularizer_loss`.
#[derive(Debug)]
pub struct LossComponent {
    /// The name it is logged under.
    pub name: String,
    /// Its value (a scalar tensor in the autograd graph).
    pub value: Tensor,
}

/// The loss after policies added their terms, and those terms (Distiller's `PolicyLoss`).
#[derive(Debug)]
pub struct PolicyLoss {
    /// Objective loss plus every policy term; what `backward()` is called on.
    pub overall_loss: Tensor,
    /// Only the terms added by policies, in the order they were added.
    pub loss_components: Vec<LossComponent>,
}

/// What a policy callback can reach: the model, the masks, the optimizer, the epoch and its own schedule.
pub struct PolicyContext<'a> {
    /// The model being trained.
    pub model: &'a mut Model,
    /// Every parameter's masker.
    pub masks: &'a mut Masks,
    /// The optimizer, when the caller passed one.
    pub optimizer: Option<&'a mut Optimizer>,
    /// The current epoch.
    pub epoch: usize,
    /// This policy's schedule.
    pub schedule: &'a PolicySchedule,
}

/// A training-time algorithm driven by the scheduler (Distiller's `ScheduledTrainingPolicy`): pruning,
/// regularization, quantization, LR schedules, or your own. Every callback defaults to doing nothing.
pub trait Policy: Send {
    /// A short description for logs and previews (`PruningPolicy(AutomatedGradualPruner 'agp1')`).
    fn name(&self) -> String;

    /// Start of an active epoch.
    fn on_epoch_begin(&mut self, ctx: &mut PolicyContext) -> Result<()> {
        let _ = ctx;
        Ok(())
    }

    /// Before the forward pass of each mini-batch.
    fn on_minibatch_begin(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> Result<()> {
        let _ = (ctx, mb);
        Ok(())
    }

    /// After the model's forward pass of a training mini-batch, with the batch's input and the model's output
    /// (the logits the objective loss is computed from): knowledge distillation runs its teacher here.
    fn after_forward(&mut self, ctx: &mut PolicyContext, mb: Minibatch, input: &Tensor, output: &Tensor) -> Result<()> {
        let _ = (ctx, mb, input, output);
        Ok(())
    }

    /// After the loss is computed, before `backward()`; may return the loss with terms added. `loss` already
    /// includes the terms of policies called earlier.
    fn before_backward_pass(&mut self, ctx: &mut PolicyContext, mb: Minibatch, loss: &Tensor) -> Result<Option<PolicyLoss>> {
        let _ = (ctx, mb, loss);
        Ok(None)
    }

    /// After `backward()`, before the optimizer step.
    fn before_parameter_optimization(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> Result<()> {
        let _ = (ctx, mb);
        Ok(())
    }

    /// After the optimizer step (and after the scheduler re-applied all masks).
    fn on_minibatch_end(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> Result<()> {
        let _ = (ctx, mb);
        Ok(())
    }

    /// End of an active epoch, after validation; `metrics` are the validation metrics.
    fn on_epoch_end(&mut self, ctx: &mut PolicyContext, metrics: &Metrics) -> Result<()> {
        let _ = (ctx, metrics);
        Ok(())
    }

    /// Called before a checkpoint of epoch `resumed_epoch` is restored, so the policy can bring the model to the
    /// shape the checkpoint was saved in (a quantizer replaces its modules).
    fn before_restore(&mut self, ctx: &mut PolicyContext, resumed_epoch: usize) -> Result<()> {
        let _ = (ctx, resumed_epoch);
        Ok(())
    }

    /// Progress to save in checkpoints (beyond masks), as JSON.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Restores what [`Policy::state`] saved.
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let _ = state;
        Ok(())
    }
}
