//! Putting a model back after a transformation that failed half-way (a quantizer's preparation, batch-norm
//! folding): parameter and buffer values, the modules that were swapped out, and variables added to the
//! `VarStore`. A transformation records what it changes as it goes; on error it calls [`Rollback::undo`].
use std::collections::HashSet;

use tch::Tensor;

use super::{BoxModule, Model};
use crate::Result;

enum Swap {
    /// The module at this name was replaced and the original is held here.
    Original(String, BoxModule),
    /// The module at this name wraps the original, which [`super::Module::take_replaced`] hands back.
    Wrapped(String),
}

/// What a transformation changed so far.
pub struct Rollback {
    values: Vec<(String, Tensor)>,
    store_names: HashSet<String>,
    swaps: Vec<Swap>,
}

impl Rollback {
    /// Runs `f`, which records its changes in the rollback it is given; if `f` fails, the model is put back as it
    /// was before the call.
    pub fn transaction<T>(model: &mut Model, f: impl FnOnce(&mut Model, &mut Rollback) -> Result<T>) -> Result<T> {
        let mut rollback = Rollback::begin(model)?;
        let result = f(model, &mut rollback);
        if result.is_err() {
            rollback.undo(model);
        }
        result
    }

    /// Records the model's state before the transformation: a copy of every parameter and buffer.
    pub fn begin(model: &Model) -> Result<Self> {
        let values = tch::no_grad(|| model.state_dict().into_iter().map(|(n, t)| Ok((n, t.f_detach_copy()?))).collect::<Result<Vec<_>>>())?;
        let store_names = model.var_store().variables().into_keys().collect();
        Ok(Rollback { values, store_names, swaps: Vec::new() })
    }

    /// `original` was taken out of `name`.
    pub fn swapped(&mut self, name: &str, original: BoxModule) {
        self.swaps.push(Swap::Original(name.to_string(), original));
    }

    /// The module at `name` now wraps the original.
    pub fn wrapped(&mut self, name: &str) {
        self.swaps.push(Swap::Wrapped(name.to_string()));
    }

    /// Puts the model back as it was at [`Rollback::begin`]: swaps undone newest first, every value (and dtype)
    /// restored, new `VarStore` variables removed.
    pub fn undo(self, model: &mut Model) {
        for swap in self.swaps.into_iter().rev() {
            // Names come from the model itself, so these lookups succeed.
            let _ = match swap {
                Swap::Original(name, original) => model.try_map_module(&name, |_| Ok(original)),
                Swap::Wrapped(name) => model.restore_replaced(&name).map(|_| ()),
            };
        }
        let current: std::collections::HashMap<String, Tensor> = model.state_dict().into_iter().collect();
        tch::no_grad(|| {
            for (name, value) in &self.values {
                if let Some(t) = current.get(name) {
                    let mut t = t.shallow_clone();
                    t.set_data(value);
                }
            }
        });
        model.retain_variables(|n| self.store_names.contains(n));
    }
}
