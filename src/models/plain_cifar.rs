//! Distiller's `plain20_cifar`: ResNet-20 without shortcuts.
use tch::nn::Path;

use super::flatten;
use super::resnet_cifar::conv3x3;
use crate::nn::{AvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Linear, ReLU, Sequential};
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
    let mut net = Sequential::new()
        .with_type_name("PlainCifar")
        .add("conv1", Conv2d::new(p / "conv1", Conv2dConfig::new(3, 16, 3).padding(1).bias(false))?.init_kaiming_fan_out())
        .add("bn1", BatchNorm2d::new(p / "bn1", 16)?)
        .add("relu", ReLU);
    let mut inplanes = 16;
    for (stage, (planes, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
        let name = format!("layer{}", stage + 1);
        let lp = p / name.as_str();
        let mut layer = Sequential::new();
        for i in 0..3 {
            layer = layer.push(plain_block(&(&lp / i), inplanes, planes, if i == 0 { stride } else { 1 })?);
            inplanes = planes;
        }
        net = net.add(name, layer);
    }
    Ok(net
        .add("avgpool", AvgPool2d::new(8, 1))
        .add_fn("view(N, -1)", flatten)
        .add("fc", Linear::new(p / "fc", 64, 10, true)?))
}
