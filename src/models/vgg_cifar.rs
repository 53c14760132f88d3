//! Distiller's CIFAR VGGs: the ImageNet feature extractors with one 512→10 Linear classifier.
use tch::nn::Path;

use crate::nn::{BatchNorm2d, Conv2d, Conv2dConfig, Linear, MaxPool2d, ReLU, Sequential, TensorOp};
use crate::Result;

/// 0 stands for a 2×2 max-pool ('M' in torchvision's tables); other entries are 3×3 conv widths.
pub(super) const VGG11: &[i64] = &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
pub(super) const VGG13: &[i64] = &[64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
pub(super) const VGG16: &[i64] = &[64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0];
pub(super) const VGG19: &[i64] =
    &[64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0];

pub(super) fn vgg_cifar(p: &Path, cfg: &[i64], batch_norm: bool) -> Result<Sequential> {
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
    Ok(Sequential::new()
        .with_type_name("VGGCifar")
        .add("features", features)
        .add_op(TensorOp::Flatten)
        .add("classifier", Linear::new(p / "classifier", 512, 10, true)?.init_normal(0.01)))
}
