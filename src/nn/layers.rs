//! Built-in layers. Each creates its parameters through a [`tch::nn::Path`] (so they live in the model's
//! `VarStore` under the module's dotted name), initializes them as PyTorch does, and runs libtorch's fallible ops
//! so that a shape mismatch is an [`Error`], never a panic.
use tch::nn::{Init, Path};
use tch::Tensor;

use super::{Forward, Module};
use crate::{Error, Result};

/// PyTorch's default for Conv and Linear: `kaiming_uniform_(a=√5)` on weights and `U(-1/√fan_in, 1/√fan_in)` on
/// biases, which both reduce to a uniform bound of `1/√fan_in`.
fn pytorch_default_bound(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

fn check_positive(name: &str, values: &[i64]) -> Result<()> {
    match values.iter().find(|&&v| v <= 0) {
        Some(v) => Err(Error::invalid(name, format!("must be positive, got {v}"))),
        None => Ok(()),
    }
}

fn expect_dims(module: &str, xs: &Tensor, dims: usize, channels_dim: usize, channels: i64) -> Result<()> {
    let size = xs.size();
    if size.len() != dims || size[channels_dim] != channels {
        let mut wanted: Vec<String> = vec!["N".into(), "C".into(), "H".into(), "W".into()][..dims].to_vec();
        wanted[channels_dim] = channels.to_string();
        return Err(Error::Shape(format!("{module} expects input [{}], got {size:?}", wanted.join(", "))));
    }
    Ok(())
}

/// Hyper-parameters of a [`Conv2d`], kept because tch's own conv config cannot be read back (MAC counting,
/// thinning and printing need them).
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: i64,
    /// Output channels (filters).
    pub out_channels: i64,
    /// Kernel height and width.
    pub kernel_size: [i64; 2],
    /// Stride.
    pub stride: [i64; 2],
    /// Zero padding.
    pub padding: [i64; 2],
    /// Dilation.
    pub dilation: [i64; 2],
    /// Channel groups.
    pub groups: i64,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl Conv2dConfig {
    /// A square `kernel`×`kernel` convolution with stride 1, no padding and a bias (PyTorch's defaults).
    pub fn new(in_channels: i64, out_channels: i64, kernel: i64) -> Self {
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel_size: [kernel, kernel],
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
            bias: true,
        }
    }
    /// Sets the stride.
    pub fn stride(mut self, s: i64) -> Self {
        self.stride = [s, s];
        self
    }
    /// Sets the zero padding.
    pub fn padding(mut self, p: i64) -> Self {
        self.padding = [p, p];
        self
    }
    /// Sets the channel groups.
    pub fn groups(mut self, g: i64) -> Self {
        self.groups = g;
        self
    }
    /// Whether to add a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

/// 2-D convolution with PyTorch's parameter names (`weight` `[out, in/groups, kh, kw]`, `bias` `[out]`).
#[derive(Debug)]
pub struct Conv2d {
    /// `[out_channels, in_channels / groups, kh, kw]`.
    pub weight: Tensor,
    /// `[out_channels]`, if the layer has a bias.
    pub bias: Option<Tensor>,
    /// The layer's hyper-parameters.
    pub config: Conv2dConfig,
}

impl Conv2d {
    /// Creates the layer's parameters under `path`, initialized as PyTorch does.
    pub fn new(path: Path, config: Conv2dConfig) -> Result<Self> {
        let c = &config;
        check_positive("Conv2d channels, kernel_size and groups", &[c.in_channels, c.out_channels, c.groups])?;
        check_positive("Conv2d kernel_size, stride and dilation", &[c.kernel_size[0], c.kernel_size[1], c.stride[0], c.stride[1], c.dilation[0], c.dilation[1]])?;
        if c.in_channels % c.groups != 0 || c.out_channels % c.groups != 0 {
            return Err(Error::invalid(
                "Conv2d groups",
                format!("{} must divide in_channels {} and out_channels {}", c.groups, c.in_channels, c.out_channels),
            ));
        }
        let fan_in = c.in_channels / c.groups * c.kernel_size[0] * c.kernel_size[1];
        let weight = path.f_var(
            "weight",
            &[c.out_channels, c.in_channels / c.groups, c.kernel_size[0], c.kernel_size[1]],
            pytorch_default_bound(fan_in),
        )?;
        let bias = if c.bias { Some(path.f_var("bias", &[c.out_channels], pytorch_default_bound(fan_in))?) } else { None };
        Ok(Conv2d { weight, bias, config })
    }

    /// Re-initializes the weight as `normal(0, √(2/n))` with `n = kh·kw·out_channels` (He et al., fan-out),
    /// the initialization of Distiller's CIFAR ResNets and VGGs; a bias is zeroed.
    pub fn init_kaiming_fan_out(self) -> Self {
        let c = &self.config;
        let n = (c.kernel_size[0] * c.kernel_size[1] * c.out_channels) as f64;
        self.init_normal((2.0 / n).sqrt())
    }

    /// Re-initializes the weight as `normal(0, std)` and zeroes a bias.
    pub fn init_normal(self, std: f64) -> Self {
        tch::no_grad(|| {
            Init::Randn { mean: 0.0, stdev: std }.set(&mut self.weight.shallow_clone());
            if let Some(b) = &self.bias {
                Init::Const(0.0).set(&mut b.shallow_clone());
            }
        });
        self
    }
}

impl Module for Conv2d {
    fn type_name(&self) -> &str {
        "Conv2d"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let c = &self.config;
        expect_dims("Conv2d", xs, 4, 1, c.in_channels)?;
        Ok(xs.f_conv2d(&self.weight, self.bias.as_ref(), c.stride, c.padding, c.dilation, c.groups)?)
    }
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        let mut p = vec![("weight", &self.weight)];
        p.extend(self.bias.as_ref().map(|b| ("bias", b)));
        p
    }
    fn extra_repr(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "{}, {}, kernel_size=({}, {}), stride=({}, {})",
            c.in_channels, c.out_channels, c.kernel_size[0], c.kernel_size[1], c.stride[0], c.stride[1]
        );
        if c.padding != [0, 0] {
            s += &format!(", padding=({}, {})", c.padding[0], c.padding[1]);
        }
        if c.dilation != [1, 1] {
            s += &format!(", dilation=({}, {})", c.dilation[0], c.dilation[1]);
        }
        if c.groups != 1 {
            s += &format!(", groups={}", c.groups);
        }
        if !c.bias {
            s += ", bias=False";
        }
        s
    }
}


/// Fully connected layer (`weight` `[out, in]`, `bias` `[out]`).
#[derive(Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, if the layer has a bias.
    pub bias: Option<Tensor>,
    /// Input features.
    pub in_features: i64,
    /// Output features.
    pub out_features: i64,
}

impl Linear {
    /// Creates the layer's parameters under `path`, initialized as PyTorch does.
    pub fn new(path: Path, in_features: i64, out_features: i64, bias: bool) -> Result<Self> {
        check_positive("Linear features", &[in_features, out_features])?;
        let init = pytorch_default_bound(in_features);
        let weight = path.f_var("weight", &[out_features, in_features], init)?;
        let bias = if bias { Some(path.f_var("bias", &[out_features], init)?) } else { None };
        Ok(Linear { weight, bias, in_features, out_features })
    }

    /// Re-initializes the weight as `normal(0, std)` and zeroes the bias (Distiller's VGG classifier).
    pub fn init_normal(self, std: f64) -> Self {
        tch::no_grad(|| {
            Init::Randn { mean: 0.0, stdev: std }.set(&mut self.weight.shallow_clone());
            if let Some(b) = &self.bias {
                Init::Const(0.0).set(&mut b.shallow_clone());
            }
        });
        self
    }
}

impl Module for Linear {
    fn type_name(&self) -> &str {
        "Linear"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let size = xs.size();
        if size.last() != Some(&self.in_features) {
            return Err(Error::Shape(format!("Linear expects input [.., {}], got {size:?}", self.in_features)));
        }
        Ok(xs.f_linear(&self.weight, self.bias.as_ref())?)
    }
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        let mut p = vec![("weight", &self.weight)];
        p.extend(self.bias.as_ref().map(|b| ("bias", b)));
        p
    }
    fn extra_repr(&self) -> String {
        format!("in_features={}, out_features={}, bias={}", self.in_features, self.out_features, py_bool(self.bias.is_some()))
    }
}

fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Batch normalization over `[N, C, H, W]` with running statistics (momentum 0.1, eps 1e-5, as PyTorch).
#[derive(Debug)]
pub struct BatchNorm2d {
    /// Scale γ, `[C]`, initialized to 1.
    pub weight: Tensor,
    /// Shift β, `[C]`, initialized to 0.
    pub bias: Tensor,
    /// Running mean (buffer).
    pub running_mean: Tensor,
    /// Running variance (buffer).
    pub running_var: Tensor,
    /// Channels.
    pub num_features: i64,
    /// Added to the variance for stability.
    pub eps: f64,
    /// Weight of the newest batch in the running statistics.
    pub momentum: f64,
}

impl BatchNorm2d {
    /// Creates γ, β and the running statistics under `path`.
    pub fn new(path: Path, num_features: i64) -> Result<Self> {
        check_positive("BatchNorm2d num_features", &[num_features])?;
        Ok(BatchNorm2d {
            weight: path.f_var("weight", &[num_features], Init::Const(1.0))?,
            bias: path.f_var("bias", &[num_features], Init::Const(0.0))?,
            running_mean: path.f_zeros_no_train("running_mean", &[num_features])?,
            running_var: path.f_ones_no_train("running_var", &[num_features])?,
            num_features,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// Sets eps and momentum (Distiller's AlexNet-BN uses 1e-4 and 0.9).
    pub fn with(mut self, eps: f64, momentum: f64) -> Self {
        (self.eps, self.momentum) = (eps, momentum);
        self
    }

    fn normalize(&self, xs: &Tensor, ctx: &Forward) -> Result<Tensor> {
        let training = ctx.is_training();
        if let (true, Some(group)) = (training, ctx.batch_norm_group()) {
            return group.sync_batch_norm(xs, &self.weight, &self.bias, &self.running_mean, &self.running_var, self.momentum, self.eps);
        }
        Ok(xs.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            training,
            self.momentum,
            self.eps,
            true,
        )?)
    }

    fn repr(&self) -> String {
        format!("{}, eps={:e}, momentum={}, affine=True, track_running_stats=True", self.num_features, self.eps, self.momentum)
    }
}

impl Module for BatchNorm2d {
    fn type_name(&self) -> &str {
        "BatchNorm2d"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        expect_dims("BatchNorm2d", xs, 4, 1, self.num_features)?;
        self.normalize(xs, ctx)
    }
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        vec![("weight", &self.weight), ("bias", &self.bias)]
    }
    fn buffers(&self) -> Vec<(&str, &Tensor)> {
        vec![("running_mean", &self.running_mean), ("running_var", &self.running_var)]
    }
    fn extra_repr(&self) -> String {
        self.repr()
    }
}

/// Batch normalization over the features of `[N, C]` (a classifier's hidden layer in Distiller's AlexNet-BN):
/// the same parameters, buffers and arithmetic as [`BatchNorm2d`], for 2-D input.
#[derive(Debug)]
pub struct BatchNorm1d(pub BatchNorm2d);

impl BatchNorm1d {
    /// Creates γ, β and the running statistics under `path` (momentum 0.1, eps 1e-5, as PyTorch).
    pub fn new(path: Path, num_features: i64) -> Result<Self> {
        check_positive("BatchNorm1d num_features", &[num_features])?;
        Ok(BatchNorm1d(BatchNorm2d::new(path, num_features)?))
    }
}

impl Module for BatchNorm1d {
    fn type_name(&self) -> &str {
        "BatchNorm1d"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        expect_dims("BatchNorm1d", xs, 2, 1, self.0.num_features)?;
        self.0.normalize(xs, ctx)
    }
    fn parameters(&self) -> Vec<(&str, &Tensor)> {
        self.0.parameters()
    }
    fn buffers(&self) -> Vec<(&str, &Tensor)> {
        self.0.buffers()
    }
    fn extra_repr(&self) -> String {
        self.0.repr()
    }
}

/// Rectified linear unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReLU;

impl Module for ReLU {
    fn type_name(&self) -> &str {
        "ReLU"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        Ok(xs.f_relu()?)
    }
}

/// `min(max(x, 0), 6)`, MobileNet-V2's activation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReLU6;

impl Module for ReLU6 {
    fn type_name(&self) -> &str {
        "ReLU6"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        Ok(xs.f_clamp(0.0, 6.0)?)
    }
}

/// 2-D max pooling.
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    /// Window size.
    pub kernel_size: i64,
    /// Step between windows.
    pub stride: i64,
    /// Implicit padding.
    pub padding: i64,
    /// Round the output size up rather than down, so the last partial window is kept (SqueezeNet, AlexNet-BN).
    pub ceil_mode: bool,
}

impl MaxPool2d {
    /// `kernel`×`kernel` windows every `stride` pixels, no padding.
    pub fn new(kernel_size: i64, stride: i64) -> Self {
        MaxPool2d { kernel_size, stride, padding: 0, ceil_mode: false }
    }
    /// Sets the implicit padding.
    pub fn padding(mut self, padding: i64) -> Self {
        self.padding = padding;
        self
    }
    /// Rounds the output size up (PyTorch's `ceil_mode=True`).
    pub fn ceil_mode(mut self) -> Self {
        self.ceil_mode = true;
        self
    }
}

impl Module for MaxPool2d {
    fn type_name(&self) -> &str {
        "MaxPool2d"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let (k, s, p) = (self.kernel_size, self.stride, self.padding);
        Ok(xs.f_max_pool2d([k, k], [s, s], [p, p], [1, 1], self.ceil_mode)?)
    }
    fn extra_repr(&self) -> String {
        let (k, s, p, c) = (self.kernel_size, self.stride, self.padding, py_bool(self.ceil_mode));
        format!("kernel_size={k}, stride={s}, padding={p}, dilation=1, ceil_mode={c}")
    }
}

/// 2-D average pooling to a fixed output size, whatever the input's (`nn.AdaptiveAvgPool2d`): the global pooling
/// that ends torchvision's ResNets, and the 7×7 / 6×6 pooling before VGG's and AlexNet's classifiers.
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveAvgPool2d {
    /// Output height and width.
    pub output_size: [i64; 2],
}

impl AdaptiveAvgPool2d {
    /// Pools to `height`×`width`.
    pub fn new(height: i64, width: i64) -> Self {
        AdaptiveAvgPool2d { output_size: [height, width] }
    }
}

impl Module for AdaptiveAvgPool2d {
    fn type_name(&self) -> &str {
        "AdaptiveAvgPool2d"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        if xs.dim() != 4 {
            return Err(Error::Shape(format!("AdaptiveAvgPool2d expects input [N, C, H, W], got {:?}", xs.size())));
        }
        Ok(xs.f_adaptive_avg_pool2d(self.output_size)?)
    }
    fn extra_repr(&self) -> String {
        format!("output_size=({}, {})", self.output_size[0], self.output_size[1])
    }
}

/// 2-D average pooling.
#[derive(Debug, Clone, Copy)]
pub struct AvgPool2d {
    /// Window size.
    pub kernel_size: i64,
    /// Step between windows.
    pub stride: i64,
}

impl AvgPool2d {
    /// `kernel`×`kernel` windows every `stride` pixels.
    pub fn new(kernel_size: i64, stride: i64) -> Self {
        AvgPool2d { kernel_size, stride }
    }
}

impl Module for AvgPool2d {
    fn type_name(&self) -> &str {
        "AvgPool2d"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        let (k, s) = (self.kernel_size, self.stride);
        Ok(xs.f_avg_pool2d([k, k], [s, s], [0, 0], false, true, None::<i64>)?)
    }
    fn extra_repr(&self) -> String {
        format!("kernel_size={}, stride={}, padding=0", self.kernel_size, self.stride)
    }
}

/// Flattens all dimensions after the batch dimension, like `x.view(x.size(0), -1)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flatten;

impl Module for Flatten {
    fn type_name(&self) -> &str {
        "Flatten"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        super::TensorOp::Flatten.apply(&[xs])
    }
    fn extra_repr(&self) -> String {
        "start_dim=1, end_dim=-1".into()
    }
}

/// Dropout: zeroes each element with probability `p` in training mode and rescales by `1/(1-p)`.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    /// Probability of zeroing an element.
    pub p: f64,
}

impl Dropout {
    /// Dropout with probability `p`, which must lie in `[0, 1)`.
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid("Dropout p", format!("must lie in [0, 1), got {p}")));
        }
        Ok(Dropout { p })
    }
}

impl Module for Dropout {
    fn type_name(&self) -> &str {
        "Dropout"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        Ok(xs.f_dropout(self.p, ctx.is_training())?)
    }
    fn extra_repr(&self) -> String {
        format!("p={}, inplace=False", self.p)
    }
}

/// Passes its input through unchanged (a placeholder that keeps a name in the tree).
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl Module for Identity {
    fn type_name(&self) -> &str {
        "Identity"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        Ok(xs.shallow_clone())
    }
}

/// Pads the last three dimensions with a constant, as PyTorch's `ConstantPad3d((left, right, top, bottom, front,
/// back), value)`; Distiller's pre-activation ResNets use it to zero-pad channels in their identity shortcuts.
#[derive(Debug, Clone, Copy)]
pub struct ConstantPad3d {
    /// `(left, right, top, bottom, front, back)`.
    pub padding: [i64; 6],
    /// The fill value.
    pub value: f64,
}

impl Module for ConstantPad3d {
    fn type_name(&self) -> &str {
        "ConstantPad3d"
    }
    fn forward(&self, xs: &Tensor, _: &mut Forward) -> Result<Tensor> {
        if self.value == 0.0 {
            Ok(xs.f_constant_pad_nd(self.padding)?)
        } else {
            Ok(xs.f_pad(self.padding, "constant", Some(self.value))?)
        }
    }
    fn extra_repr(&self) -> String {
        format!("padding={:?}, value={}", self.padding, self.value)
    }
}

/// Element-wise sum of its inputs (Distiller's `EltwiseAdd`, the residual add of ResNets). Being a module lets
/// observers and quantizers see the add.
#[derive(Debug, Clone, Copy, Default)]
pub struct EltwiseAdd;

impl Module for EltwiseAdd {
    fn type_name(&self) -> &str {
        "EltwiseAdd"
    }
    fn forward_many(&self, inputs: &[&Tensor], _: &mut Forward) -> Result<Tensor> {
        super::TensorOp::Add.apply(inputs)
    }
}
