//! Distiller's `plain20_cifar`: ResNet-20 without shortcuts.
use tch::nn::Path;

use super::resnet_cifar::{add_head, add_stages, conv3x3, stem};
use crate::nn::{BatchNorm2d, ReLU, Sequential};
use crate::Result;

fn plain_block(p: &Path, inplanes: i64, planes: i64, stride: i64) -> Result<Sequential> {
    Ok(Sequential::new()
        .with_type_name("BasicBlock")
        .add("conv1", conv3x3(p / "conv1", inplanes, planes, stride)?)
        .add("bn1", BatchNorm2d::new(p / "bn1", planes)?)
        .add("relu1", ReLU)
        .add("conv2", conv3x3(p / "conv2", planes, planes, 1)?)
        .add("bn2", BatchNorm2d::new(p / "bn2", planes)?)
        .add("relu2", ReLU))
}

pub(super) fn plain20_cifar(p: &Path) -> Result<Sequential> {
    let net = Sequential::new()
        .with_type_name("PlainCifar")
        .add("conv1", stem(p)?)
        .add("bn1", BatchNorm2d::new(p / "bn1", 16)?)
        .add("relu", ReLU);
    add_head(add_stages(net, p, 3, plain_block)?, p)
}
