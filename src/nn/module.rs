use std::any::Any;
use std::fmt::Debug;

use tch::Tensor;

use super::Forward;
use crate::{Error, Result};

/// A boxed module: how containers hold their children, so that any child can be replaced by name.
pub type BoxModule = Box<dyn Module>;

/// A node of the module tree.
///
/// Implement [`Module::forward`] (or [`Module::forward_many`] for modules with several inputs), list the
/// module's own parameters and buffers in registration order, and list its children. Children are called through
/// [`Forward::call`], never directly, so that observers see them and errors carry their names.
///
/// Parameters are tch tensors created through a [`tch::nn::Path`] of the model's `VarStore`, at the path that
/// matches the module's place in the tree (`&root / "layer1" / "0" / "conv1"`), so the store's names and the
/// tree's names agree.
pub trait Module: Any + Debug + Send {
    /// The PyTorch class name (`Conv2d`, `BatchNorm2d`, `Sequential`, `BasicBlock`, ...).
    fn type_name(&self) -> &str;

    /// Forward pass of a single-input module.
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let _ = (xs, ctx);
        Err(Error::invalid("forward", format!("{} takes several inputs; call it through Forward::call_many", self.type_name())))
    }

    /// Forward pass over several inputs; the default accepts exactly one and calls [`Module::forward`].
    fn forward_many(&self, inputs: &[&Tensor], ctx: &mut Forward) -> Result<Tensor> {
        match inputs {
            [xs] => self.forward(xs, ctx),
            _ => Err(Error::invalid(
                "inputs",
                format!("{} takes one input, got {}", self.type_name(), inputs.len()),
            )),
        }
    }

    /// Direct parameters (not the children's), in registration order, by leaf name (`weight`, `bias`).
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        Vec::new()
    }

    /// Direct buffers (state that is saved but not trained, e.g. `running_mean`), in registration order.
    fn buffers(&self) -> Vec<(&str, &Tensor)> {
        Vec::new()
    }

    /// Named children in registration order.
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        Vec::new()
    }

    /// The same children, mutably and boxed, so one can be swapped for another. Must list the same names in the
    /// same order as [`Module::children`].
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        Vec::new()
    }

    /// For a module that a transformation (a quantizer's wrapper, a folded layer) put in place of another: takes
    /// that original module out, so a transformation that fails half-way can put the tree back as it was. The
    /// wrapper is left unusable. `None` for every other module.
    fn take_replaced(&mut self) -> Option<BoxModule> {
        None
    }

    /// Called after values were copied into this module's buffers (a checkpoint or a snapshot was loaded), so a
    /// module that keeps a host-side copy of a buffer's value, to spare the device a read every step, drops it.
    fn buffers_loaded(&self) {}

    /// The text inside the parentheses when the tree is printed PyTorch-style, e.g. `1, 20, kernel_size=(5, 5)`.
    fn extra_repr(&self) -> String {
        String::new()
    }
}
