//! Thinning as a scheduled policy: Distiller's `StructureRemover` extension.
use super::{Structure, Thinner};
use crate::metrics::Metrics;
use crate::scheduler::{Minibatch, Policy, PolicyContext};
use crate::Result;

/// Thins the model once in each of its epochs, at the first mini-batch (after the policies declared before it have
/// applied their masks), shrinking the optimizer's state and the masks with it.
#[derive(Debug)]
pub struct ThinningPolicy {
    name: String,
    thinner: Thinner,
    steps: Vec<Structure>,
    done: bool,
}

impl ThinningPolicy {
    /// A policy named `name` that runs `thinner` once per structure of `steps` (filters, then channels, for
    /// Distiller's `contract_model`).
    pub fn new(name: &str, thinner: Thinner, steps: Vec<Structure>) -> Self {
        ThinningPolicy { name: name.to_string(), thinner, steps, done: false }
    }

    /// What it removes, in Distiller's words.
    pub fn function(&self) -> &'static str {
        match self.steps.as_slice() {
            [Structure::Filters] => "remove_filters",
            [Structure::Channels] => "remove_channels",
            _ => "contract_model",
        }
    }
}

impl Policy for ThinningPolicy {
    fn name(&self) -> String {
        format!("ThinningPolicy({} '{}')", self.function(), self.name)
    }

    fn on_minibatch_begin(&mut self, ctx: &mut PolicyContext, _: Minibatch) -> Result<()> {
        if self.done {
            return Ok(());
        }
        for &structure in &self.steps {
            let thinner = Thinner { structure, ..self.thinner };
            thinner.apply_with(ctx.model, ctx.optimizer.as_deref_mut(), Some(ctx.masks))?;
        }
        self.done = true;
        Ok(())
    }

    fn on_epoch_end(&mut self, _: &mut PolicyContext, _: &Metrics) -> Result<()> {
        self.done = false;
        Ok(())
    }
}
