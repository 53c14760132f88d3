//! AlexNet (Krizhevsky et al., 2012): torchvision's single-tower version and Distiller's `alexnet_bn` (two-group
//! convolutions with batch norm, after TensorPack's DoReFa example).
use tch::nn::Path;

use crate::nn::{AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Conv2dConfig, Dropout, Linear, MaxPool2d, ReLU, Sequential, TensorOp};
use crate::Result;

/// torchvision's `AlexNet`: five convolutions, 6×6 adaptive pooling and three Linear layers (61,100,840 parameters).
pub(super) fn alexnet(p: &Path) -> Result<Sequential> {
    let (fp, cp) = (p / "features", p / "classifier");
    let conv = |i: i64, c: Conv2dConfig| Conv2d::new(&fp / i, c);
    let features = Sequential::new()
        .push(conv(0, Conv2dConfig::new(3, 64, 11).stride(4).padding(2))?)
        .push(ReLU)
        .push(MaxPool2d::new(3, 2))
        .push(conv(3, Conv2dConfig::new(64, 192, 5).padding(2))?)
        .push(ReLU)
        .push(MaxPool2d::new(3, 2))
        .push(conv(6, Conv2dConfig::new(192, 384, 3).padding(1))?)
        .push(ReLU)
        .push(conv(8, Conv2dConfig::new(384, 256, 3).padding(1))?)
        .push(ReLU)
        .push(conv(10, Conv2dConfig::new(256, 256, 3).padding(1))?)
        .push(ReLU)
        .push(MaxPool2d::new(3, 2));
    let classifier = Sequential::new()
        .push(Dropout::new(0.5)?)
        .push(Linear::new(&cp / 1, 256 * 6 * 6, 4096, true)?)
        .push(ReLU)
        .push(Dropout::new(0.5)?)
        .push(Linear::new(&cp / 4, 4096, 4096, true)?)
        .push(ReLU)
        .push(Linear::new(&cp / 6, 4096, 1000, true)?);
    Ok(Sequential::new()
        .with_type_name("AlexNet")
        .add("features", features)
        .add("avgpool", AdaptiveAvgPool2d::new(6, 6))
        .add_op(TensorOp::Flatten)
        .add("classifier", classifier))
}

/// Distiller's `AlexNetBN`: batch norms with eps 1e-4 and momentum 0.9 after every layer but the first and the
/// last, two-group convolutions in layers 1, 3 and 4, ceil-mode pooling after the second.
pub(super) fn alexnet_bn(p: &Path) -> Result<Sequential> {
    let (fp, cp) = (p / "features", p / "classifier");
    // Distiller's init: normal(0, √(2/(k·k·in_channels))), biases 0.
    let conv = |i: i64, c: Conv2dConfig| {
        let n = (c.kernel_size[0] * c.kernel_size[1] * c.in_channels) as f64;
        Ok::<_, crate::Error>(Conv2d::new(&fp / i, c)?.init_normal((2.0 / n).sqrt()))
    };
    let bn = |i: i64, n: i64| Ok::<_, crate::Error>(BatchNorm2d::new(&fp / i, n)?.with(1e-4, 0.9));
    let features = Sequential::new()
        .push(conv(0, Conv2dConfig::new(3, 96, 12).stride(4))?)
        .push(ReLU)
        .push(conv(2, Conv2dConfig::new(96, 256, 5).padding(2).groups(2).bias(false))?)
        .push(bn(3, 256)?)
        .push(MaxPool2d::new(3, 2).ceil_mode())
        .push(ReLU)
        .push(conv(6, Conv2dConfig::new(256, 384, 3).padding(1).bias(false))?)
        .push(bn(7, 384)?)
        .push(MaxPool2d::new(3, 2).padding(1))
        .push(ReLU)
        .push(conv(10, Conv2dConfig::new(384, 384, 3).padding(1).groups(2).bias(false))?)
        .push(bn(11, 384)?)
        .push(ReLU)
        .push(conv(13, Conv2dConfig::new(384, 256, 3).padding(1).groups(2).bias(false))?)
        .push(bn(14, 256)?)
        .push(MaxPool2d::new(3, 2))
        .push(ReLU);
    let linear = |i: i64, inputs: i64, outputs: i64, bias: bool| {
        Ok::<_, crate::Error>(Linear::new(&cp / i, inputs, outputs, bias)?.init_normal((2.0 / inputs as f64).sqrt()))
    };
    let bn1d = |i: i64| Ok::<_, crate::Error>(BatchNorm1d(BatchNorm1d::new(&cp / i, 4096)?.0.with(1e-4, 0.9)));
    let classifier = Sequential::new()
        .push(linear(0, 256 * 6 * 6, 4096, false)?)
        .push(bn1d(1)?)
        .push(ReLU)
        .push(linear(3, 4096, 4096, false)?)
        .push(bn1d(4)?)
        .push(ReLU)
        .push(linear(6, 4096, 1000, true)?);
    Ok(Sequential::new().with_type_name("AlexNetBN").add("features", features).add_op(TensorOp::Flatten).add("classifier", classifier))
}
