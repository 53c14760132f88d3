use std::fmt;

use tch::Tensor;

use super::{BoxModule, Forward, Module, TensorOp};
use crate::Result;

type StepFn = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send>;

enum Step {
    Module(String, BoxModule),
    /// A tensor operation that is not a module (Distiller's `x.view(x.size(0), -1)` inside `forward`).
    Op(TensorOp),
    /// A tensor function of the user's own, opaque to the data-flow graph.
    Function(&'static str, StepFn),
}

/// Runs its steps in order. Children are named explicitly with [`Sequential::add`] (a model's top level,
/// `conv1`, `relu1`, ...) or by position with [`Sequential::push`] (`0`, `1`, ... as `nn.Sequential`).
/// [`Sequential::add_op`] inserts an unnamed tensor operation (a flatten), which keeps the module list identical to
/// a PyTorch model that does the same step inline in its `forward`; [`Sequential::add_fn`] inserts a function of
/// your own.
#[derive(Default)]
pub struct Sequential {
    steps: Vec<Step>,
    type_name: Option<&'static str>,
}

impl Sequential {
    /// An empty container.
    pub fn new() -> Self {
        Sequential::default()
    }

    /// Reports `type_name` instead of `Sequential`, for a model or block whose PyTorch class only runs its
    /// children in order (`Simplenet`, `BasicBlock` of plain20, ...).
    pub fn with_type_name(mut self, type_name: &'static str) -> Self {
        self.type_name = Some(type_name);
        self
    }

    /// Appends a child named `name`.
    pub fn add(mut self, name: impl Into<String>, module: impl Module) -> Self {
        self.steps.push(Step::Module(name.into(), Box::new(module)));
        self
    }

    /// Appends an already boxed child named `name`.
    pub fn add_boxed(mut self, name: impl Into<String>, module: BoxModule) -> Self {
        self.steps.push(Step::Module(name.into(), module));
        self
    }

    /// Appends a child named by its position among the children (`0`, `1`, ...).
    pub fn push(self, module: impl Module) -> Self {
        let name = self.len().to_string();
        self.add(name, module)
    }

    /// Appends a tensor operation that is not a module, e.g. [`TensorOp::Flatten`] before a classifier.
    pub fn add_op(mut self, op: TensorOp) -> Self {
        self.steps.push(Step::Op(op));
        self
    }

    /// Appends a tensor function that is not a module. The data-flow graph cannot see inside it, so thinning
    /// leaves the channels that pass through it alone; prefer [`Sequential::add_op`] where an op fits.
    pub fn add_fn(mut self, label: &'static str, f: impl Fn(&Tensor) -> Result<Tensor> + Send + 'static) -> Self {
        self.steps.push(Step::Function(label, Box::new(f)));
        self
    }

    /// Number of child modules (functional steps not counted).
    pub fn len(&self) -> usize {
        self.steps.iter().filter(|s| matches!(s, Step::Module(..))).count()
    }

    /// Whether there are no child modules.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Sequential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for step in &self.steps {
            match step {
                Step::Module(name, m) => list.entry(&(name, m.type_name())),
                Step::Op(op) => list.entry(&op.label()),
                Step::Function(label, _) => list.entry(label),
            };
        }
        list.finish()
    }
}

impl Module for Sequential {
    fn type_name(&self) -> &str {
        self.type_name.unwrap_or("Sequential")
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let mut xs = xs.shallow_clone();
        for step in &self.steps {
            xs = match step {
                Step::Module(name, m) => ctx.call(name, m.as_ref(), &xs)?,
                Step::Op(op) => ctx.op(op.clone(), &[&xs])?,
                Step::Function(label, f) => ctx.opaque(label, &[&xs], || f(&xs))?,
            };
        }
        Ok(xs)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Module(n, m) => Some((n.as_str(), m.as_ref())),
                Step::Op(_) | Step::Function(..) => None,
            })
            .collect()
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        self.steps
            .iter_mut()
            .filter_map(|s| match s {
                Step::Module(n, m) => Some((n.as_str(), m)),
                Step::Op(_) | Step::Function(..) => None,
            })
            .collect()
    }
}
