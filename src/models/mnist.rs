//! MNIST models: Distiller's two Simplenets, LeNet-5 and LeNet-300-100.
use tch::nn::Path;

use crate::nn::{AvgPool2d, Conv2d, Conv2dConfig, Flatten, Linear, MaxPool2d, ReLU, Sequential, TensorOp};
use crate::Result;

/// The two conv-ReLU-pool stages both Simplenets start with.
fn simplenet_features(p: &Path, type_name: &'static str) -> Result<Sequential> {
    Ok(Sequential::new()
        .with_type_name(type_name)
        .add("conv1", Conv2d::new(p / "conv1", Conv2dConfig::new(1, 20, 5))?)
        .add("relu1", ReLU)
        .add("pool1", MaxPool2d::new(2, 2))
        .add("conv2", Conv2d::new(p / "conv2", Conv2dConfig::new(20, 50, 5))?)
        .add("relu2", ReLU)
        .add("pool2", MaxPool2d::new(2, 2)))
}

/// Distiller's `simplenet_mnist` (the PyTorch MNIST example): 431,080 parameters.
pub(super) fn simplenet_mnist(p: &Path) -> Result<Sequential> {
    Ok(simplenet_features(p, "Simplenet")?
        .add_op(TensorOp::Flatten)
        .add("fc1", Linear::new(p / "fc1", 4 * 4 * 50, 500, true)?)
        .add("relu3", ReLU)
        .add("fc2", Linear::new(p / "fc2", 500, 10, true)?))
}

/// Distiller's `simplenet_v2_mnist`: Simplenet with global average pooling and one small Linear layer.
pub(super) fn simplenet_v2_mnist(p: &Path) -> Result<Sequential> {
    Ok(simplenet_features(p, "Simplenet_v2")?
        .add("avgpool", AvgPool2d::new(4, 1))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(p / "fc", 50, 10, true)?))
}

/// LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, the first convolution padded so 28×28 digits keep the
/// original 32×32 geometry: 61,706 parameters.
pub(super) fn lenet(p: &Path) -> Result<Sequential> {
    Ok(Sequential::new()
        .with_type_name("LeNet5")
        .add("conv1", Conv2d::new(p / "conv1", Conv2dConfig::new(1, 6, 5).padding(2))?)
        .add("relu1", ReLU)
        .add("pool1", MaxPool2d::new(2, 2))
        .add("conv2", Conv2d::new(p / "conv2", Conv2dConfig::new(6, 16, 5))?)
        .add("relu2", ReLU)
        .add("pool2", MaxPool2d::new(2, 2))
        .add("flatten", Flatten)
        .add("fc1", Linear::new(p / "fc1", 16 * 5 * 5, 120, true)?)
        .add("relu3", ReLU)
        .add("fc2", Linear::new(p / "fc2", 120, 84, true)?)
        .add("relu4", ReLU)
        .add("fc3", Linear::new(p / "fc3", 84, 10, true)?))
}

/// LeNet-300-100, the fully connected network of the pruning literature: 266,610 parameters.
pub(super) fn mlp(p: &Path) -> Result<Sequential> {
    Ok(Sequential::new()
        .with_type_name("MLP")
        .add("flatten", Flatten)
        .add("fc1", Linear::new(p / "fc1", 28 * 28, 300, true)?)
        .add("relu1", ReLU)
        .add("fc2", Linear::new(p / "fc2", 300, 100, true)?)
        .add("relu2", ReLU)
        .add("fc3", Linear::new(p / "fc3", 100, 10, true)?))
}
