//! torchvision's ImageNet ResNets with Distiller's blocks (`DistillerBasicBlock`, `DistillerBottleneck`: one ReLU
//! module per use and the residual add as a module named `add`), and Distiller's pre-activation ImageNet ResNets.
//! Parameter names and shapes are torchvision's, so its state dicts load unchanged.
use tch::nn::Path;
use tch::Tensor;

use crate::nn::{
    AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, BoxModule, Conv2d, Conv2dConfig, EltwiseAdd, Forward, Linear, MaxPool2d, Module, ReLU,
    Sequential, TensorOp,
};
use crate::Result;

type Named = Vec<(String, BoxModule)>;

/// A residual block in the shape every ResNet variant shares: optional pre-activation layers, a body, an optional
/// downsampling shortcut, the join of body and shortcut, and layers after the join. Children are registered in
/// that order, as Distiller's blocks register theirs.
#[derive(Debug)]
pub struct ResidualBlock {
    type_name: &'static str,
    pre: Named,
    body: Named,
    downsample: Option<BoxModule>,
    /// The shortcut starts from the pre-activated input rather than the raw one (Distiller's preact blocks).
    downsample_preact: bool,
    /// Whether there is a shortcut at all (MobileNet-V2's strided blocks have none).
    residual: bool,
    /// The add as a named module, or `None` for an inline `out + residual`.
    join: Option<(String, BoxModule)>,
    post: Named,
}

fn named(children: Vec<(&str, BoxModule)>) -> Named {
    children.into_iter().map(|(n, m)| (n.to_string(), m)).collect()
}

impl ResidualBlock {
    /// A block of type `type_name` whose output is `post(join(body(pre(x)), shortcut))`.
    pub(super) fn new(type_name: &'static str, body: Vec<(&str, BoxModule)>) -> Self {
        ResidualBlock { type_name, pre: Vec::new(), body: named(body), downsample: None, downsample_preact: false, residual: true, join: None, post: Vec::new() }
    }

    /// The body alone, with no shortcut.
    pub(super) fn plain(type_name: &'static str, body: Vec<(&str, BoxModule)>) -> Self {
        ResidualBlock { residual: false, ..Self::new(type_name, body) }
    }

    fn pre(mut self, pre: Vec<(&str, BoxModule)>) -> Self {
        self.pre = named(pre);
        self
    }

    fn downsample(mut self, downsample: Option<BoxModule>, from_preact: bool) -> Self {
        (self.downsample, self.downsample_preact) = (downsample, from_preact);
        self
    }

    pub(super) fn join(mut self, name: &str) -> Self {
        self.join = Some((name.to_string(), Box::new(EltwiseAdd)));
        self
    }

    fn post(mut self, post: Vec<(&str, BoxModule)>) -> Self {
        self.post = named(post);
        self
    }
}

fn run_chain(chain: &Named, x: Tensor, ctx: &mut Forward) -> Result<Tensor> {
    chain.iter().try_fold(x, |x, (name, m)| ctx.call(name, m.as_ref(), &x))
}

impl Module for ResidualBlock {
    fn type_name(&self) -> &str {
        self.type_name
    }
    fn forward(&self, x: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let preact = run_chain(&self.pre, x.shallow_clone(), ctx)?;
        let out = run_chain(&self.body, preact.shallow_clone(), ctx)?;
        if !self.residual {
            return run_chain(&self.post, out, ctx);
        }
        let residual = match &self.downsample {
            Some(d) => ctx.call("downsample", d.as_ref(), if self.downsample_preact { &preact } else { x })?,
            None => x.shallow_clone(),
        };
        let joined = match &self.join {
            Some((name, add)) => ctx.call_many(name, add.as_ref(), &[&out, &residual])?,
            None => ctx.op(TensorOp::Add, &[&out, &residual])?,
        };
        run_chain(&self.post, joined, ctx)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        fn chain(c: &Named) -> impl Iterator<Item = (&str, &dyn Module)> {
            c.iter().map(|(n, m)| (n.as_str(), m.as_ref() as &dyn Module))
        }
        let mut c: Vec<(&str, &dyn Module)> = chain(&self.pre).collect();
        c.extend(chain(&self.body));
        c.extend(self.downsample.as_deref().map(|d| ("downsample", d)));
        c.extend(self.join.as_ref().map(|(n, m)| (n.as_str(), m.as_ref() as &dyn Module)));
        c.extend(chain(&self.post));
        c
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        let mut c: Vec<(&str, &mut BoxModule)> = self.pre.iter_mut().map(|(n, m)| (n.as_str(), m)).collect();
        c.extend(self.body.iter_mut().map(|(n, m)| (n.as_str(), m)));
        c.extend(self.downsample.as_mut().map(|d| ("downsample", d)));
        c.extend(self.join.as_mut().map(|(n, m)| (n.as_str(), m)));
        c.extend(self.post.iter_mut().map(|(n, m)| (n.as_str(), m)));
        c
    }
}

/// A convolution without bias, initialized as torchvision's ResNets (He normal, fan-out).
fn conv(p: Path, in_planes: i64, out_planes: i64, kernel: i64, stride: i64) -> Result<BoxModule> {
    let config = Conv2dConfig::new(in_planes, out_planes, kernel).stride(stride).padding(kernel / 2).bias(false);
    Ok(Box::new(Conv2d::new(p, config)?.init_kaiming_fan_out()))
}

fn bn(p: Path, planes: i64) -> Result<BoxModule> {
    Ok(Box::new(BatchNorm2d::new(p, planes)?))
}

/// The two block families and how many channels a block's output has per `planes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Block {
    Basic,
    Bottleneck,
}

impl Block {
    fn expansion(self) -> i64 {
        match self {
            Block::Basic => 1,
            Block::Bottleneck => 4,
        }
    }

    /// Distiller's blocks: `conv1 bn1 relu1 conv2 bn2 [relu2 conv3 bn3] [downsample] add relu{2,3}`, the stride on
    /// the 3×3 convolution (torchvision's "ResNet v1.5").
    fn distiller(self, p: &Path, inplanes: i64, planes: i64, stride: i64, downsample: Option<BoxModule>) -> Result<ResidualBlock> {
        let relu = || -> BoxModule { Box::new(ReLU) };
        let block = match self {
            Block::Basic => ResidualBlock::new(
                "DistillerBasicBlock",
                vec![
                    ("conv1", conv(p / "conv1", inplanes, planes, 3, stride)?),
                    ("bn1", bn(p / "bn1", planes)?),
                    ("relu1", relu()),
                    ("conv2", conv(p / "conv2", planes, planes, 3, 1)?),
                    ("bn2", bn(p / "bn2", planes)?),
                ],
            )
            .post(vec![("relu2", relu())]),
            Block::Bottleneck => ResidualBlock::new(
                "DistillerBottleneck",
                vec![
                    ("conv1", conv(p / "conv1", inplanes, planes, 1, 1)?),
                    ("bn1", bn(p / "bn1", planes)?),
                    ("relu1", relu()),
                    ("conv2", conv(p / "conv2", planes, planes, 3, stride)?),
                    ("bn2", bn(p / "bn2", planes)?),
                    ("relu2", relu()),
                    ("conv3", conv(p / "conv3", planes, planes * 4, 1, 1)?),
                    ("bn3", bn(p / "bn3", planes * 4)?),
                ],
            )
            .post(vec![("relu3", relu())]),
        };
        Ok(block.downsample(downsample, false).join("add"))
    }

    /// Distiller's `PreactBasicBlock` / `PreactBottleneck`: `[pre_bn pre_relu] conv1 bn1_2 relu1_2 conv2 [bn2_3
    /// relu2_3 conv3]`, the shortcut taken from the pre-activated input, an inline add.
    fn preact(self, p: &Path, inplanes: i64, planes: i64, stride: i64, downsample: Option<BoxModule>, preactivate: bool) -> Result<ResidualBlock> {
        let relu = || -> BoxModule { Box::new(ReLU) };
        let body = match self {
            Block::Basic => vec![
                ("conv1", conv(p / "conv1", inplanes, planes, 3, stride)?),
                ("bn1_2", bn(p / "bn1_2", planes)?),
                ("relu1_2", relu()),
                ("conv2", conv(p / "conv2", planes, planes, 3, 1)?),
            ],
            Block::Bottleneck => vec![
                ("conv1", conv(p / "conv1", inplanes, planes, 1, 1)?),
                ("bn1_2", bn(p / "bn1_2", planes)?),
                ("relu1_2", relu()),
                ("conv2", conv(p / "conv2", planes, planes, 3, stride)?),
                ("bn2_3", bn(p / "bn2_3", planes)?),
                ("relu2_3", relu()),
                ("conv3", conv(p / "conv3", planes, planes * 4, 1, 1)?),
            ],
        };
        let type_name = if self == Block::Basic { "PreactBasicBlock" } else { "PreactBottleneck" };
        let pre = if preactivate { vec![("pre_bn", bn(p / "pre_bn", inplanes)?), ("pre_relu", relu())] } else { Vec::new() };
        Ok(ResidualBlock::new(type_name, body).pre(pre).downsample(downsample, true))
    }
}

/// Stages `layer1`..`layer4` of 64, 128, 256 and 512 planes, the last three starting with stride 2, `blocks[i]`
/// blocks each (torchvision's `_make_layer`).
fn stages(mut net: Sequential, p: &Path, block: Block, blocks: [usize; 4], preact: bool) -> Result<Sequential> {
    let mut inplanes = 64;
    for (stage, (planes, stride)) in [(64, 1), (128, 2), (256, 2), (512, 2)].into_iter().enumerate() {
        let name = format!("layer{}", stage + 1);
        let lp = p / name.as_str();
        let mut layer = Sequential::new();
        for i in 0..blocks[stage] {
            let bp = &lp / i;
            let (s, out) = (if i == 0 { stride } else { 1 }, planes * block.expansion());
            let downsample: Option<BoxModule> = if s != 1 || inplanes != out {
                let d = &bp / "downsample";
                let seq = Sequential::new().add_boxed("0", conv(&d / "0", inplanes, out, 1, s)?);
                Some(Box::new(if preact { seq } else { seq.add_boxed("1", bn(&d / "1", out)?) }))
            } else {
                None
            };
            // Distiller's preact ResNets pre-activate the first block of a stage only when it is strided: the
            // stem's BN-ReLU already precedes layer1.0.
            let b = if preact { block.preact(&bp, inplanes, planes, s, downsample, i > 0 || s != 1)? } else { block.distiller(&bp, inplanes, planes, s, downsample)? };
            layer = layer.add(i.to_string(), b);
            inplanes = out;
        }
        net = net.add(name, layer);
    }
    Ok(net)
}

fn stem(p: &Path, relu: &str) -> Result<Sequential> {
    Ok(Sequential::new()
        .add_boxed("conv1", conv(p / "conv1", 3, 64, 7, 2)?)
        .add_boxed("bn1", bn(p / "bn1", 64)?)
        .add(relu, ReLU)
        .add("maxpool", MaxPool2d::new(3, 2).padding(1)))
}

/// torchvision's `ResNet` with Distiller's blocks: resnet18/34 (`Basic`, [2,2,2,2] / [3,4,6,3]) and
/// resnet50/101/152 (`Bottleneck`, [3,4,6,3] / [3,4,23,3] / [3,8,36,3]).
pub(super) fn resnet(p: &Path, block: Block, blocks: [usize; 4]) -> Result<Sequential> {
    let net = stages(stem(p, "relu")?.with_type_name("ResNet"), p, block, blocks, false)?;
    Ok(net
        .add("avgpool", AdaptiveAvgPool2d::new(1, 1))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(p / "fc", 512 * block.expansion(), 1000, true)?))
}

/// Distiller's `PreactResNet` for ImageNet (preact_resnet18 … preact_resnet152).
pub(super) fn preact_resnet(p: &Path, block: Block, blocks: [usize; 4]) -> Result<Sequential> {
    let net = stages(stem(p, "relu1")?.with_type_name("PreactResNet"), p, block, blocks, true)?;
    let features = 512 * block.expansion();
    Ok(net
        .add("final_bn", BatchNorm2d::new(p / "final_bn", features)?)
        .add("final_relu", ReLU)
        .add("avgpool", AvgPool2d::new(7, 1))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(p / "fc", features, 1000, true)?))
}
