//! Distiller's pre-activation CIFAR ResNets (He et al., "Identity Mappings in Deep Residual Networks"), with the
//! default identity shortcut (strided average pooling, then zero-padding of the new channels).
use tch::nn::Path;
use tch::Tensor;

use super::resnet_cifar::{add_head, add_stages, conv3x3, stem};
use crate::nn::{AvgPool2d, BatchNorm2d, BoxModule, ConstantPad3d, Forward, Module, ReLU, Sequential, TensorOp};
use crate::Result;

/// BN-ReLU-conv twice, added to the (possibly downsampled) input.
#[derive(Debug)]
pub struct PreactBasicBlock {
    pre_bn: BoxModule,
    pre_relu: BoxModule,
    conv1: BoxModule,
    bn: BoxModule,
    relu: BoxModule,
    conv2: BoxModule,
    downsample: Option<BoxModule>,
}

impl PreactBasicBlock {
    /// A block from `inplanes` to `planes` channels.
    pub fn new(p: &Path, inplanes: i64, planes: i64, stride: i64) -> Result<Self> {
        let downsample: Option<BoxModule> = if stride != 1 || inplanes != planes {
            let pad = inplanes / 2;
            Some(Box::new(
                Sequential::new().push(AvgPool2d::new(2, 2)).push(ConstantPad3d { padding: [0, 0, 0, 0, pad, pad], value: 0.0 }),
            ))
        } else {
            None
        };
        Ok(PreactBasicBlock {
            pre_bn: Box::new(BatchNorm2d::new(p / "pre_bn", inplanes)?),
            pre_relu: Box::new(ReLU),
            conv1: Box::new(conv3x3(p / "conv1", inplanes, planes, stride)?),
            bn: Box::new(BatchNorm2d::new(p / "bn", planes)?),
            relu: Box::new(ReLU),
            conv2: Box::new(conv3x3(p / "conv2", planes, planes, 1)?),
            downsample,
        })
    }
}

impl Module for PreactBasicBlock {
    fn type_name(&self) -> &str {
        "PreactBasicBlock"
    }
    fn forward(&self, x: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let preact = ctx.call("pre_bn", self.pre_bn.as_ref(), x)?;
        let preact = ctx.call("pre_relu", self.pre_relu.as_ref(), &preact)?;
        let out = ctx.call("conv1", self.conv1.as_ref(), &preact)?;
        let out = ctx.call("bn", self.bn.as_ref(), &out)?;
        let out = ctx.call("relu", self.relu.as_ref(), &out)?;
        let out = ctx.call("conv2", self.conv2.as_ref(), &out)?;
        // Distiller's default (preact_downsample=False for the identity shortcut) downsamples the raw input.
        let residual = match &self.downsample {
            Some(d) => ctx.call("downsample", d.as_ref(), x)?,
            None => x.shallow_clone(),
        };
        ctx.op(TensorOp::Add, &[&out, &residual])
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        let mut c: Vec<(&str, &dyn Module)> = vec![
            ("pre_bn", self.pre_bn.as_ref()),
            ("pre_relu", self.pre_relu.as_ref()),
            ("conv1", self.conv1.as_ref()),
            ("bn", self.bn.as_ref()),
            ("relu", self.relu.as_ref()),
            ("conv2", self.conv2.as_ref()),
        ];
        c.extend(self.downsample.as_deref().map(|d| ("downsample", d)));
        c
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        let mut c = vec![
            ("pre_bn", &mut self.pre_bn),
            ("pre_relu", &mut self.pre_relu),
            ("conv1", &mut self.conv1),
            ("bn", &mut self.bn),
            ("relu", &mut self.relu),
            ("conv2", &mut self.conv2),
        ];
        c.extend(self.downsample.as_mut().map(|d| ("downsample", d)));
        c
    }
}

/// `PreactResNetCifar` with `blocks` blocks per stage.
pub(super) fn preact_resnet_cifar(p: &Path, blocks: usize) -> Result<Sequential> {
    let net = Sequential::new().with_type_name("PreactResNetCifar").add("conv1", stem(p)?);
    let net = add_stages(net, p, blocks, PreactBasicBlock::new)?
        .add("final_bn", BatchNorm2d::new(p / "final_bn", 64)?)
        .add("final_relu", ReLU);
    add_head(net, p)
}
