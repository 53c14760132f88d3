use tch::nn::Path;

use crate::nn::{Conv2d, Conv2dConfig, Linear, MaxPool2d, ReLU, Sequential, TensorOp};
use crate::Result;

/// Distiller's `simplenet_cifar` (the PyTorch CIFAR-10 tutorial network): 62,006 parameters.
pub(super) fn simplenet_cifar(p: &Path) -> Result<Sequential> {
    Ok(Sequential::new()
        .with_type_name("Simplenet")
        .add("conv1", Conv2d::new(p / "conv1", Conv2dConfig::new(3, 6, 5))?)
        .add("relu_conv1", ReLU)
        .add("pool1", MaxPool2d::new(2, 2))
        .add("conv2", Conv2d::new(p / "conv2", Conv2dConfig::new(6, 16, 5))?)
        .add("relu_conv2", ReLU)
        .add("pool2", MaxPool2d::new(2, 2))
        .add_op(TensorOp::Flatten)
        .add("fc1", Linear::new(p / "fc1", 16 * 5 * 5, 120, true)?)
        .add("relu_fc1", ReLU)
        .add("fc2", Linear::new(p / "fc2", 120, 84, true)?)
        .add("relu_fc2", ReLU)
        .add("fc3", Linear::new(p / "fc3", 84, 10, true)?))
}
