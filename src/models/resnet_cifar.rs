//! Distiller's CIFAR ResNets (He et al., 2016): 3 stages of `n` basic blocks with 16, 32, 64 filters.
use tch::nn::Path;
use tch::Tensor;

use crate::nn::{AvgPool2d, BatchNorm2d, BoxModule, Conv2d, Conv2dConfig, EltwiseAdd, Forward, Linear, Module, ReLU, Sequential, TensorOp};
use crate::Result;

/// A 3×3 convolution with padding 1 and no bias, initialized as Distiller's CIFAR models.
pub(super) fn conv3x3(p: Path, in_planes: i64, out_planes: i64, stride: i64) -> Result<Conv2d> {
    Ok(Conv2d::new(p, Conv2dConfig::new(in_planes, out_planes, 3).stride(stride).padding(1).bias(false))?
        .init_kaiming_fan_out())
}

/// Two 3×3 conv-BN layers with a shortcut; the residual add is a module (`residual_eltwiseadd`) as in Distiller.
#[derive(Debug)]
pub struct BasicBlock {
    conv1: BoxModule,
    bn1: BoxModule,
    relu1: BoxModule,
    conv2: BoxModule,
    bn2: BoxModule,
    relu2: BoxModule,
    downsample: Option<BoxModule>,
    residual_eltwiseadd: BoxModule,
}

impl BasicBlock {
    /// A block from `inplanes` to `planes` channels; a 1×1 conv-BN shortcut when the shape changes.
    pub fn new(p: &Path, inplanes: i64, planes: i64, stride: i64) -> Result<Self> {
        let downsample: Option<BoxModule> = if stride != 1 || inplanes != planes {
            let d = p / "downsample";
            Some(Box::new(
                Sequential::new()
                    .push(
                        Conv2d::new(&d / "0", Conv2dConfig::new(inplanes, planes, 1).stride(stride).bias(false))?
                            .init_kaiming_fan_out(),
                    )
                    .push(BatchNorm2d::new(&d / "1", planes)?),
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: Box::new(conv3x3(p / "conv1", inplanes, planes, stride)?),
            bn1: Box::new(BatchNorm2d::new(p / "bn1", planes)?),
            relu1: Box::new(ReLU),
            conv2: Box::new(conv3x3(p / "conv2", planes, planes, 1)?),
            bn2: Box::new(BatchNorm2d::new(p / "bn2", planes)?),
            relu2: Box::new(ReLU),
            downsample,
            residual_eltwiseadd: Box::new(EltwiseAdd),
        })
    }
}

impl Module for BasicBlock {
    fn type_name(&self) -> &str {
        "BasicBlock"
    }
    fn forward(&self, x: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let out = ctx.call("conv1", self.conv1.as_ref(), x)?;
        let out = ctx.call("bn1", self.bn1.as_ref(), &out)?;
        let out = ctx.call("relu1", self.relu1.as_ref(), &out)?;
        let out = ctx.call("conv2", self.conv2.as_ref(), &out)?;
        let out = ctx.call("bn2", self.bn2.as_ref(), &out)?;
        let residual = match &self.downsample {
            Some(d) => ctx.call("downsample", d.as_ref(), x)?,
            None => x.shallow_clone(),
        };
        let out = ctx.call_many("residual_eltwiseadd", self.residual_eltwiseadd.as_ref(), &[&residual, &out])?;
        ctx.call("relu2", self.relu2.as_ref(), &out)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        let mut c: Vec<(&str, &dyn Module)> = vec![
            ("conv1", self.conv1.as_ref()),
            ("bn1", self.bn1.as_ref()),
            ("relu1", self.relu1.as_ref()),
            ("conv2", self.conv2.as_ref()),
            ("bn2", self.bn2.as_ref()),
            ("relu2", self.relu2.as_ref()),
        ];
        c.extend(self.downsample.as_deref().map(|d| ("downsample", d)));
        c.push(("residual_eltwiseadd", self.residual_eltwiseadd.as_ref()));
        c
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        let mut c = vec![
            ("conv1", &mut self.conv1),
            ("bn1", &mut self.bn1),
            ("relu1", &mut self.relu1),
            ("conv2", &mut self.conv2),
            ("bn2", &mut self.bn2),
            ("relu2", &mut self.relu2),
        ];
        c.extend(self.downsample.as_mut().map(|d| ("downsample", d)));
        c.push(("residual_eltwiseadd", &mut self.residual_eltwiseadd));
        c
    }
}

/// The three stages shared by Distiller's CIFAR ResNet family: `layer1`..`layer3` with 16, 32 and 64 planes,
/// the last two starting with stride 2, `blocks` blocks each, appended to `net`.
pub(super) fn add_stages<B: Module>(
    mut net: Sequential,
    p: &Path,
    blocks: usize,
    block: impl Fn(&Path, i64, i64, i64) -> Result<B>,
) -> Result<Sequential> {
    let mut inplanes = 16;
    for (stage, (planes, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
        let name = format!("layer{}", stage + 1);
        let lp = p / name.as_str();
        let mut layer = Sequential::new();
        for i in 0..blocks {
            layer = layer.push(block(&(&lp / i), inplanes, planes, if i == 0 { stride } else { 1 })?);
            inplanes = planes;
        }
        net = net.add(name, layer);
    }
    Ok(net)
}

/// The 3×3 stem convolution from RGB to 16 channels.
pub(super) fn stem(p: &Path) -> Result<Conv2d> {
    Ok(Conv2d::new(p / "conv1", Conv2dConfig::new(3, 16, 3).padding(1).bias(false))?.init_kaiming_fan_out())
}

/// Global 8×8 average pooling, flattening and the 64→10 classifier that end every CIFAR ResNet.
pub(super) fn add_head(net: Sequential, p: &Path) -> Result<Sequential> {
    Ok(net
        .add("avgpool", AvgPool2d::new(8, 1))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(p / "fc", 64, 10, true)?))
}

/// `ResNetCifar` with `blocks` blocks per stage: 20, 32, 44 and 56 layers for 3, 5, 7 and 9.
pub(super) fn resnet_cifar(p: &Path, blocks: usize) -> Result<Sequential> {
    let net = Sequential::new()
        .with_type_name("ResNetCifar")
        .add("conv1", stem(p)?)
        .add("bn1", BatchNorm2d::new(p / "bn1", 16)?)
        .add("relu", ReLU);
    add_head(add_stages(net, p, blocks, BasicBlock::new)?, p)
}
