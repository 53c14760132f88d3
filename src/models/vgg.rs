//! VGGs (Simonyan and Zisserman, 2014): torchvision's ImageNet models and Distiller's CIFAR ones, which share the
//! feature extractor and differ in the classifier.
use tch::nn::Path;

use crate::nn::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Conv2dConfig, Dropout, Linear, MaxPool2d, ReLU, Sequential, TensorOp};
use crate::Result;

/// 0 stands for a 2×2 max-pool ('M' in torchvision's tables); other entries are 3×3 conv widths.
pub(super) const VGG11: &[i64] = &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
pub(super) const VGG13: &[i64] = &[64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
pub(super) const VGG16: &[i64] = &[64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0];
pub(super) const VGG19: &[i64] =
    &[64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0];

/// `features`: 3×3 convolutions (each followed by BN if `batch_norm`, then ReLU) and 2×2 max-pools as `cfg` says.
fn features(p: &Path, cfg: &[i64], batch_norm: bool) -> Result<Sequential> {
    let fp = p / "features";
    let mut features = Sequential::new();
    let mut in_channels = 3;
    for &v in cfg {
        if v == 0 {
            features = features.push(MaxPool2d::new(2, 2));
            continue;
        }
        let idx = features.len();
        // kaiming_normal_(mode='fan_out', nonlinearity='relu') is normal(0, √(2/(out·k·k))), bias 0.
        features = features.push(Conv2d::new(&fp / idx, Conv2dConfig::new(in_channels, v, 3).padding(1))?.init_kaiming_fan_out());
        if batch_norm {
            features = features.push(BatchNorm2d::new(&fp / (idx + 1), v)?);
        }
        features = features.push(ReLU);
        in_channels = v;
    }
    Ok(features)
}

/// Distiller's CIFAR VGG: the features and one 512→10 Linear classifier.
pub(super) fn vgg_cifar(p: &Path, cfg: &[i64], batch_norm: bool) -> Result<Sequential> {
    Ok(Sequential::new()
        .with_type_name("VGGCifar")
        .add("features", features(p, cfg, batch_norm)?)
        .add_op(TensorOp::Flatten)
        .add("classifier", Linear::new(p / "classifier", 512, 10, true)?.init_normal(0.01)))
}

/// torchvision's ImageNet VGG: the features, 7×7 adaptive average pooling, and a classifier of two 4096-wide
/// hidden layers with dropout 0.5.
pub(super) fn vgg(p: &Path, cfg: &[i64], batch_norm: bool) -> Result<Sequential> {
    let cp = p / "classifier";
    let linear = |i: i64, inputs: i64, outputs: i64| Ok::<_, crate::Error>(Linear::new(&cp / i, inputs, outputs, true)?.init_normal(0.01));
    let classifier = Sequential::new()
        .push(linear(0, 512 * 7 * 7, 4096)?)
        .push(ReLU)
        .push(Dropout::new(0.5)?)
        .push(linear(3, 4096, 4096)?)
        .push(ReLU)
        .push(Dropout::new(0.5)?)
        .push(linear(6, 4096, 1000)?);
    Ok(Sequential::new()
        .with_type_name("VGG")
        .add("features", features(p, cfg, batch_norm)?)
        .add("avgpool", AdaptiveAvgPool2d::new(7, 7))
        .add_op(TensorOp::Flatten)
        .add("classifier", classifier))
}
