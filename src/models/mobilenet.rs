//! MobileNets: Distiller's v1 (`mobilenet`, Howard et al. 2017) and torchvision's v2 (`mobilenet_v2`, Sandler et
//! al. 2018) with Distiller's patch (the residual add as a module `residual_eltwiseadd`, the final spatial mean
//! as a module `mean32`).
use tch::nn::Path;

use super::resnet::ResidualBlock;
use crate::nn::{AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, BoxModule, Conv2d, Conv2dConfig, Dropout, Linear, Module, ReLU, ReLU6, Sequential, TensorOp};
use crate::Result;

/// Conv (no bias) → BN → activation, appended to `seq` as three positional children; `he_init` re-initializes the
/// convolution as torchvision's MobileNetV2 does (He normal, fan-out), otherwise PyTorch's default stays.
fn conv_bn_act(seq: Sequential, p: &Path, config: Conv2dConfig, act: impl Module, he_init: bool) -> Result<Sequential> {
    let first = seq.len();
    let out = config.out_channels;
    let conv = Conv2d::new(p / first, config.bias(false))?;
    let conv = if he_init { conv.init_kaiming_fan_out() } else { conv };
    Ok(seq.push(conv).push(BatchNorm2d::new(p / (first + 1), out)?).push(act))
}

/// Distiller's MobileNet v1 at width 1: a strided 3×3 stem, 13 depthwise-separable blocks (`model.1` …
/// `model.13`, each `dw conv, BN, ReLU, pw conv, BN, ReLU`), 7×7 average pooling (`model.14`) and `fc`.
pub(super) fn mobilenet(p: &Path) -> Result<Sequential> {
    let mp = p / "model";
    let mut model = Sequential::new().push(conv_bn_act(Sequential::new(), &(&mp / 0), Conv2dConfig::new(3, 32, 3).stride(2).padding(1), ReLU, false)?);
    let blocks = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
        .into_iter()
        .chain(std::iter::repeat_n((512, 512, 1), 5))
        .chain([(512, 1024, 2), (1024, 1024, 1)]);
    for (ifm, ofm, stride) in blocks {
        let bp = &mp / model.len();
        let block = conv_bn_act(Sequential::new(), &bp, Conv2dConfig::new(ifm, ifm, 3).stride(stride).padding(1).groups(ifm), ReLU, false)?;
        model = model.push(conv_bn_act(block, &bp, Conv2dConfig::new(ifm, ofm, 1), ReLU, false)?);
    }
    Ok(Sequential::new()
        .with_type_name("MobileNet")
        .add("model", model.push(AvgPool2d::new(7, 7)))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(p / "fc", 1024, 1000, true)?))
}

/// torchvision's `Conv2dNormActivation` with ReLU6, as one positional child of `features` or of a block's `conv`.
fn cna(p: &Path, config: Conv2dConfig) -> Result<Sequential> {
    let config = Conv2dConfig { padding: [config.kernel_size[0] / 2; 2], ..config };
    conv_bn_act(Sequential::new().with_type_name("Conv2dNormActivation"), p, config, ReLU6, true)
}

/// `InvertedResidual`: an optional 1×1 expansion, a 3×3 depthwise convolution, a linear 1×1 projection with BN,
/// and a residual add where the block keeps its shape.
fn inverted_residual(p: &Path, inp: i64, oup: i64, stride: i64, expand_ratio: i64) -> Result<ResidualBlock> {
    let hidden = inp * expand_ratio;
    let cp = p / "conv";
    let mut conv = Sequential::new();
    if expand_ratio != 1 {
        conv = conv.push(cna(&(&cp / 0), Conv2dConfig::new(inp, hidden, 1))?);
    }
    let i = conv.len();
    conv = conv.push(cna(&(&cp / i), Conv2dConfig::new(hidden, hidden, 3).stride(stride).groups(hidden))?);
    let i = conv.len();
    conv = conv.push(Conv2d::new(&cp / i, Conv2dConfig::new(hidden, oup, 1).bias(false))?.init_kaiming_fan_out()).push(BatchNorm2d::new(&cp / (i + 1), oup)?);
    let body: Vec<(&str, BoxModule)> = vec![("conv", Box::new(conv))];
    Ok(if stride == 1 && inp == oup {
        ResidualBlock::new("InvertedResidual", body).join("residual_eltwiseadd")
    } else {
        ResidualBlock::plain("InvertedResidual", body)
    })
}

/// torchvision's MobileNetV2 at width 1 (3,504,872 parameters): `features.0` … `features.18`, `mean32`, and
/// `classifier` (dropout 0.2, Linear 1280→1000).
pub(super) fn mobilenet_v2(p: &Path) -> Result<Sequential> {
    let fp = p / "features";
    let mut features = Sequential::new().push(cna(&(&fp / 0), Conv2dConfig::new(3, 32, 3).stride(2))?);
    let mut inp = 32;
    for (t, c, n, s) in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)] {
        for i in 0..n {
            let idx = features.len();
            features = features.push(inverted_residual(&(&fp / idx), inp, c, if i == 0 { s } else { 1 }, t)?);
            inp = c;
        }
    }
    let idx = features.len();
    features = features.push(cna(&(&fp / idx), Conv2dConfig::new(320, 1280, 1))?);
    let cp = p / "classifier";
    let classifier = Sequential::new().push(Dropout::new(0.2)?).push(Linear::new(&cp / 1, 1280, 1000, true)?.init_normal(0.01));
    Ok(Sequential::new()
        .with_type_name("MobileNetV2")
        .add("features", features)
        .add("mean32", Sequential::new().push(AdaptiveAvgPool2d::new(1, 1)).add_op(TensorOp::Flatten))
        .add("classifier", classifier))
}
