//! # distill
//!
//! Neural-network compression research in Rust, on libtorch through [tch]: a compression scheduler that plugs
//! into an ordinary training loop, with pruners, regularizers, quantizers and learning-rate schedules, in the
//! spirit of Intel's Distiller, made to be driven from Jupyter notebooks through the evcxr kernel.
//!
//! The pieces, each in its own module:
//! * [`nn`]: the named module tree (`layer1.0.conv1.weight`), replace-by-name and observers;
//! * [`graph`]: the data-flow graph of a forward pass and the channel groups it couples;
//! * [`thinning`]: physical removal of pruned filters and channels, residual-aware;
//! * [`export`]: ONNX files of the model for other runtimes;
//! * [`factorization`]: fully connected layers split in two by truncated SVD;
//! * [`models`]: the model zoo with Distiller's layer names, and [`models::create_model`];
//! * [`data`]: the bundled 5,000-digit MNIST subset, MNIST IDX and CIFAR-10 loaders, seeded batching;
//! * [`optim`]: SGD and Adam with inspectable, checkpointable state;
//! * [`scheduler`]: the compression scheduler, its policies and parameter masks;
//! * [`distillation`] and [`early_exit`]: knowledge distillation from a teacher, and exits part-way through a network;
//! * [`train`]: Distiller's training loop with every scheduler callback, validation and checkpoints.
//!
//! ```no_run
//! use distill::prelude::*;
//!
//! # fn main() -> distill::Result<()> {
//! let data = distill::data::mnist_bundled()?;
//! let mut model = distill::models::create_model("lenet", "mnist", Device::Cpu)?;
//! let config = TrainConfig { epochs: 2, ..TrainConfig::default() };
//! let run = distill::train::fit(&mut model, &data, None, &config)?;
//! println!("best top-1 {:.2}%", run.best.top1);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod distillation;
pub mod display;
pub mod distributed;
pub mod early_exit;
pub mod export;
pub mod factorization;
pub mod graph;
pub mod logging;
pub mod metrics;
pub mod summary;
mod error;
pub mod io;
pub mod models;
pub mod nn;
pub mod optim;
pub mod plot;
pub mod pruning;
pub mod quantization;
pub mod regularization;
pub mod scheduler;
pub mod sensitivity;
pub mod thinning;
pub mod train;

pub use error::{did_you_mean, Error, Result};
/// Re-exported so a notebook needs a single `:dep distill`.
pub use plotters;
/// Re-exported so a notebook needs a single `:dep distill`.
pub use polars;
/// Re-exported so a notebook needs a single `:dep distill`.
pub use tch;

/// The names most programs need: `use distill::prelude::*;`.
pub mod prelude {
    pub use crate::data::{DataSplits, Dataset};
    pub use crate::display::Rich;
    pub use crate::models::{copy_model, create_model, load_checkpoint};
    pub use crate::nn::{Model, Module};
    pub use crate::optim::{Optimizer, OptimizerConfig};
    pub use crate::quantization::post_train::Calibration;
    pub use crate::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
    pub use crate::scheduler::{CompressionScheduler, Policy, PolicyLoss, PolicySchedule};
    pub use crate::config::Schedule;
    pub use crate::train::{evaluate, fit, Progress, TrainConfig, TrainSummary};
    pub use crate::{plotters, polars, tch};
    pub use crate::{Error, Result};
    pub use tch::{Device, Kind, Tensor};
}
