use tch::Tensor;

use super::{Module, ModuleCall, SharedObserver};
use crate::{Error, Result};

/// The state of one forward pass: train or eval mode, the dotted name of the module being run, and the observers
/// to notify. Containers call their children through [`Forward::call`] so that every module of the tree is seen
/// once per call, with its full name.
pub struct Forward<'a> {
    train: bool,
    path: String,
    observers: &'a [SharedObserver],
}

impl<'a> Forward<'a> {
    /// A forward pass in train (`true`) or eval mode, notifying `observers`.
    pub fn new(train: bool, observers: &'a [SharedObserver]) -> Self {
        Forward { train, path: String::new(), observers }
    }

    /// Whether the pass runs in training mode (dropout active, batch-norm statistics updated).
    pub fn is_training(&self) -> bool {
        self.train
    }

    /// Dotted name of the module currently running (empty for the root).
    pub fn path(&self) -> &str {
        &self.path
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
