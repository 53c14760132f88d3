//! Tensor operations that run inside a module's forward pass without being modules. Running them through
//! [`Forward::op`](super::Forward::op) lets observers see them, which is what lets the data-flow graph follow a
//! channel from a convolution through a flatten into a classifier, or through a residual add.
use tch::Tensor;

use crate::{Error, Result};

/// A tensor operation the data-flow graph understands, or an opaque one it only knows the place of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TensorOp {
    /// `x.flatten(1, -1)`: Distiller's `x.view(x.size(0), -1)` before a classifier.
    Flatten,
    /// Element-wise sum of same-shaped inputs: a residual add written inline.
    Add,
    /// Concatenation along a dimension (1: channels).
    Cat(i64),
    /// A function the library cannot interpret, with a label for messages and drawings.
    Opaque(String),
}

impl TensorOp {
    /// A short label: `flatten`, `add`, `cat(dim=1)`, or the opaque function's own.
    pub fn label(&self) -> String {
        match self {
            TensorOp::Flatten => "flatten".into(),
            TensorOp::Add => "add".into(),
            TensorOp::Cat(d) => format!("cat(dim={d})"),
            TensorOp::Opaque(label) => label.clone(),
        }
    }

    /// Computes the operation; an opaque one has no computation of its own and is an error here.
    pub fn apply(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        match (self, inputs) {
            (TensorOp::Flatten, [x]) => Ok(x.f_flatten(1, -1)?),
            (TensorOp::Add, [first, rest @ ..]) => rest.iter().try_fold(first.shallow_clone(), |acc, x| {
                if acc.size() != x.size() {
                    return Err(Error::Shape(format!("add: inputs differ: {:?} vs {:?}", acc.size(), x.size())));
                }
                Ok(acc.f_add(x)?)
            }),
            (TensorOp::Cat(dim), [_, ..]) => Ok(Tensor::f_cat(inputs, *dim)?),
            (TensorOp::Opaque(label), _) => {
                Err(Error::invalid("tensor op", format!("'{label}' is opaque: run it with Forward::opaque")))
            }
            (op, _) => Err(Error::invalid("inputs", format!("{} got {} input(s)", op.label(), inputs.len()))),
        }
    }
}
