use std::any::Any;

use tch::Tensor;

use super::{Module, ModuleCall, OpCall, SharedObserver, TensorOp};
use crate::distributed::ProcessGroup;
use crate::{Error, Result};

/// The state of one forward pass: train or eval mode, the dotted name of the module being run, and the observers
/// to notify. Containers call their children through [`Forward::call`] so that every module of the tree is seen
/// once per call, with its full name.
pub struct Forward<'a> {
    train: bool,
    path: String,
    observers: &'a [SharedObserver],
    /// Values attached to tensors for the rest of the pass; each tensor is held so its storage cannot be reused
    /// by a later tensor that would then inherit the value.
    annotations: Vec<(Tensor, Box<dyn Any>)>,
    /// State of the caller's own for this pass (an early-exit pass keeps its exits' outputs here).
    state: Option<Box<dyn Any>>,
    /// Batch norms in training mode normalize over the samples of every rank of this group.
    batch_norm_group: Option<&'a ProcessGroup>,
}

/// A tensor's identity within a forward pass: storage address, shape, strides and dtype (a reshaped view is
/// another tensor). Whoever keys on it must hold the tensor, so that no later tensor reuses the address.
pub(crate) type TensorKey = (usize, Vec<i64>, Vec<i64>, tch::Kind);

pub(crate) fn tensor_key(t: &Tensor) -> TensorKey {
    (t.data_ptr() as usize, t.size(), t.stride(), t.kind())
}

fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    tensor_key(a) == tensor_key(b)
}

impl<'a> Forward<'a> {
    /// A forward pass in train (`true`) or eval mode, notifying `observers`.
    pub fn new(train: bool, observers: &'a [SharedObserver]) -> Self {
        Forward { train, path: String::new(), observers, annotations: Vec::new(), state: None, batch_norm_group: None }
    }

    /// Whether the pass runs in training mode (dropout active, batch-norm statistics updated).
    pub fn is_training(&self) -> bool {
        self.train
    }

    /// Dotted name of the module currently running (empty for the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Makes the pass's batch norms, in training mode, normalize with the mean and variance of the samples of every
    /// rank of `group` (PyTorch's `SyncBatchNorm`; see [`ProcessGroup::sync_batch_norm`]). Every rank must run the
    /// same model on a batch of its own.
    pub fn with_synchronized_batch_norm(mut self, group: &'a ProcessGroup) -> Self {
        self.batch_norm_group = Some(group);
        self
    }

    /// The group batch norms synchronize over in this pass, if any.
    pub fn batch_norm_group(&self) -> Option<&'a ProcessGroup> {
        self.batch_norm_group
    }

    /// Gives the pass a state of the caller's own, which modules of the tree reach with [`Forward::state_mut`]
    /// (an early-exit pass collects its exits' outputs this way); replaces any earlier state.
    pub fn with_state<T: Any>(mut self, state: T) -> Self {
        self.state = Some(Box::new(state));
        self
    }

    /// The pass's state, if it is a `T`.
    pub fn state_mut<T: Any>(&mut self) -> Option<&mut T> {
        self.state.as_mut().and_then(|s| s.downcast_mut::<T>())
    }

    /// Takes the pass's state out, if it is a `T`.
    pub fn take_state<T: Any>(&mut self) -> Option<T> {
        match self.state.take()?.downcast::<T>() {
            Ok(state) => Some(*state),
            Err(other) => {
                self.state = Some(other);
                None
            }
        }
    }

    /// Attaches `value` to `tensor` for the rest of this pass, replacing an earlier value of the same type. This is
    /// how a quantized layer tells the next one the scale its output was quantized with (Distiller sets a
    /// `quant_metadata` attribute on the tensor). A view with another shape, or any new tensor, carries nothing.
    pub fn annotate<T: Any>(&mut self, tensor: &Tensor, value: T) {
        self.annotations.retain(|(t, v)| !(same_tensor(t, tensor) && v.is::<T>()));
        self.annotations.push((tensor.shallow_clone(), Box::new(value)));
    }

    /// The value of type `T` attached to `tensor` in this pass, if any.
    pub fn annotation<T: Any>(&self, tensor: &Tensor) -> Option<&T> {
        self.annotations.iter().rev().filter(|(t, _)| same_tensor(t, tensor)).find_map(|(_, v)| v.downcast_ref::<T>())
    }

    /// Runs child `name` on one input.
    pub fn call(&mut self, name: &str, module: &dyn Module, xs: &Tensor) -> Result<Tensor> {
        self.call_many(name, module, &[xs])
    }

    /// Runs child `name` on several inputs (element-wise add, concatenation, ...).
    pub fn call_many(&mut self, name: &str, module: &dyn Module, inputs: &[&Tensor]) -> Result<Tensor> {
        let parent_len = self.path.len();
        if !self.path.is_empty() && !name.is_empty() {
            self.path.push('.');
        }
        self.path.push_str(name);
        let result = self.run(module, inputs);
        self.path.truncate(parent_len);
        result
    }

    /// Runs a tensor operation that is not a module (a flatten, an inline residual add, a concatenation) so that
    /// observers, and the data-flow graph built from them, see it.
    ///
    /// ```
    /// # use distill::nn::{Forward, TensorOp};
    /// # use tch::Tensor;
    /// let mut ctx = Forward::new(false, &[]);
    /// let x = Tensor::ones([2, 3, 4, 4], (tch::Kind::Float, tch::Device::Cpu));
    /// let y = ctx.op(TensorOp::Add, &[&x, &x])?;
    /// assert_eq!(ctx.op(TensorOp::Flatten, &[&y])?.size(), [2, 48]);
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn op(&mut self, op: TensorOp, inputs: &[&Tensor]) -> Result<Tensor> {
        let output = op.apply(inputs).map_err(|e| Error::Forward { module: self.display_path(), source: Box::new(e) })?;
        self.notify_op(&op, inputs, &output);
        Ok(output)
    }

    /// Runs `f`, a tensor function the library cannot interpret (any reshape or arithmetic of your own), and
    /// reports it to observers as [`TensorOp::Opaque`] with `label`. The data-flow graph then knows where the
    /// function is and keeps thinning from changing the channels that pass through it.
    pub fn opaque(&mut self, label: &str, inputs: &[&Tensor], f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let output = f().map_err(|e| Error::Forward { module: self.display_path(), source: Box::new(e) })?;
        self.notify_op(&TensorOp::Opaque(label.to_string()), inputs, &output);
        Ok(output)
    }

    fn notify_op(&self, op: &TensorOp, inputs: &[&Tensor], output: &Tensor) {
        if self.observers.is_empty() {
            return;
        }
        let call = OpCall { scope: &self.path, op, inputs, output, training: self.train };
        for observer in self.observers {
            if let Ok(mut o) = observer.1.lock() {
                o.observe_op(&call);
            }
        }
    }

    /// Runs the root module (name "").
    pub(crate) fn run(&mut self, module: &dyn Module, inputs: &[&Tensor]) -> Result<Tensor> {
        let output = module.forward_many(inputs, self).map_err(|e| match e {
            Error::Forward { .. } => e,
            other => Error::Forward { module: self.display_path(), source: Box::new(other) },
        })?;
        if !self.observers.is_empty() {
            let call = ModuleCall { name: &self.path, module, inputs, output: &output, training: self.train };
            for observer in self.observers {
                // A poisoned lock means an observer panicked earlier; its state is suspect, so skip it.
                if let Ok(mut o) = observer.1.lock() {
                    o.observe(&call);
                }
            }
        }
        Ok(output)
    }

    fn display_path(&self) -> String {
        if self.path.is_empty() { "<root>".to_string() } else { self.path.clone() }
    }
}
