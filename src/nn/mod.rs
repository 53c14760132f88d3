//! A named module tree on top of tch, the structure Distiller relies on and tch lacks.
//!
//! * [`Module`] is the trait every layer implements: a PyTorch type name, a forward pass, its direct
//!   parameters and buffers, and its named children. User-defined modules join the tree by implementing it.
//! * [`Model`] owns the tree and the tch [`VarStore`](tch::nn::VarStore) holding every parameter. It answers
//!   Distiller's questions: named parameters in registration order (`layer1.0.conv1.weight`), named modules with
//!   their types, replacement of a module by name, observers on module inputs and outputs, train/eval mode.
//! * [`layers`] holds the built-in layers (`Conv2d`, `Linear`, `BatchNorm2d`, `ReLU`, pooling, `Flatten`,
//!   `Dropout`, `EltwiseAdd`, ...) and [`Sequential`].
//!
//! ```
//! use distill::nn::{layers, Model, ModelInfo, Sequential};
//! use tch::{nn::VarStore, Device, Tensor};
//!
//! # fn main() -> distill::Result<()> {
//! let vs = VarStore::new(Device::Cpu);
//! let p = vs.root();
//! let net = Sequential::new()
//!     .add("fc1", layers::Linear::new(&p / "fc1", 784, 100, true)?)
//!     .add("relu1", layers::ReLU)
//!     .add("fc2", layers::Linear::new(&p / "fc2", 100, 10, true)?);
//! let model = Model::new(vs, net, ModelInfo::new("tiny_mlp", "mnist", [1, 28, 28], 10))?;
//! let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
//! assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
//! let logits = model.forward(&Tensor::zeros([2, 784], (tch::Kind::Float, Device::Cpu)))?;
//! assert_eq!(logits.size(), [2, 10]);
//! # Ok(()) }
//! ```
mod forward;
pub mod layers;
pub mod layout;
mod model;
mod module;
mod names;
mod observer;
mod ops;
mod rollback;
mod sequential;

pub use forward::Forward;
pub(crate) use forward::{tensor_key, TensorKey};
pub use layers::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, ConstantPad3d, Conv2d, Conv2dConfig, Dropout, EltwiseAdd,
    Flatten, Identity, Linear, MaxPool2d, ReLU, ReLU6,
};
pub use layout::MemoryFormat;
pub use model::{Model, ModelInfo, ModuleInfo, Snapshot};
pub use module::{BoxModule, Module};
pub use names::{canonical_param_name, normalize_name};
pub use observer::{run_observed, ModuleCall, Observer, ObserverId, OpCall, SharedObserver};
pub use ops::TensorOp;
pub use rollback::Rollback;
pub use sequential::Sequential;
