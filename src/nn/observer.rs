use std::sync::{Arc, Mutex};

use tch::Tensor;

use super::{Module, TensorOp};

/// What an observer sees after a module ran: its dotted name, the module, its inputs and its output.
pub struct ModuleCall<'a> {
    /// Dotted module name (`layer1.0.conv1`; empty for the root).
    pub name: &'a str,
    /// The module itself; downcast with `(call.module as &dyn Any).downcast_ref::<Conv2d>()`.
    pub module: &'a dyn Module,
    /// The module's inputs.
    pub inputs: &'a [&'a Tensor],
    /// The module's output.
    pub output: &'a Tensor,
    /// Whether the pass runs in training mode.
    pub training: bool,
}

/// What an observer sees after a tensor operation ran through [`Forward::op`](super::Forward::op) or
/// [`Forward::opaque`](super::Forward::opaque).
pub struct OpCall<'a> {
    /// Dotted name of the module whose forward pass ran the operation (empty for the root).
    pub scope: &'a str,
    /// The operation.
    pub op: &'a TensorOp,
    /// Its inputs.
    pub inputs: &'a [&'a Tensor],
    /// Its output.
    pub output: &'a Tensor,
    /// Whether the pass runs in training mode.
    pub training: bool,
}

/// Watches module calls during forward passes: activation statistics, MAC counting, calibration.
///
/// Observers run after each module, innermost first (a container is reported after its children).
pub trait Observer: Send {
    /// Called once per module per forward pass.
    fn observe(&mut self, call: &ModuleCall);

    /// Called after each tensor operation that is not a module (flatten, inline add, concatenation, opaque
    /// functions); most observers only care about modules and keep this default.
    fn observe_op(&mut self, call: &OpCall) {
        let _ = call;
    }
}

/// An observer shared between the model (which notifies it) and the caller (who reads its results).
pub type SharedObserver = (ObserverId, Arc<Mutex<dyn Observer>>);

/// Handle returned by [`Model::attach_observer`](super::Model::attach_observer), used to detach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObserverId(pub(crate) u64);

/// Runs the first `batches` mini-batches of `data` (in order, eval mode, no gradients) through `model` with
/// `observer` attached: how calibration and activation statistics see a model. The observer is detached and the
/// model's mode restored whatever happens.
pub fn run_observed(model: &mut super::Model, observer: Arc<Mutex<dyn Observer>>, data: &crate::data::Dataset, batches: usize, batch_size: usize) -> crate::Result<()> {
    let id = model.attach_observer(observer);
    let was_training = model.is_training();
    model.eval();
    let run = tch::no_grad(|| -> crate::Result<()> {
        for batch in data.batches(batch_size, model.device())?.take(batches) {
            let (x, _) = batch?;
            let _ = model.forward(&x)?;
        }
        Ok(())
    });
    model.detach_observer(id);
    if was_training {
        model.train();
    }
    run
}
