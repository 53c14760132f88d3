//! SqueezeNet (Iandola et al., 2016) as torchvision builds it: versions 1.0 and 1.1.
use tch::nn::Path;
use tch::Tensor;

use crate::nn::{AdaptiveAvgPool2d, BoxModule, Conv2d, Conv2dConfig, Dropout, Forward, MaxPool2d, Module, ReLU, Sequential, TensorOp};
use crate::Result;

/// A Fire module: a 1×1 squeeze, then 1×1 and 3×3 expansions side by side, concatenated along the channels.
#[derive(Debug)]
pub struct Fire {
    children: Vec<(&'static str, BoxModule)>,
}

impl Fire {
    /// A Fire module from `inplanes` channels to `expand1x1 + expand3x3`.
    pub fn new(p: &Path, inplanes: i64, squeeze: i64, expand1x1: i64, expand3x3: i64) -> Result<Self> {
        Ok(Fire {
            children: vec![
                ("squeeze", Box::new(Conv2d::new(p / "squeeze", Conv2dConfig::new(inplanes, squeeze, 1))?)),
                ("squeeze_activation", Box::new(ReLU)),
                ("expand1x1", Box::new(Conv2d::new(p / "expand1x1", Conv2dConfig::new(squeeze, expand1x1, 1))?)),
                ("expand1x1_activation", Box::new(ReLU)),
                ("expand3x3", Box::new(Conv2d::new(p / "expand3x3", Conv2dConfig::new(squeeze, expand3x3, 3).padding(1))?)),
                ("expand3x3_activation", Box::new(ReLU)),
            ],
        })
    }
}

impl Module for Fire {
    fn type_name(&self) -> &str {
        "Fire"
    }
    fn forward(&self, x: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let [squeeze, squeeze_act, expand1, expand1_act, expand3, expand3_act] = std::array::from_fn(|i| (self.children[i].0, self.children[i].1.as_ref()));
        let mut call = |(name, m): (&str, &dyn Module), x: &Tensor| ctx.call(name, m, x);
        let squeezed = call(squeeze, x)?;
        let squeezed = call(squeeze_act, &squeezed)?;
        let left = call(expand1, &squeezed)?;
        let left = call(expand1_act, &left)?;
        let right = call(expand3, &squeezed)?;
        let right = call(expand3_act, &right)?;
        ctx.op(TensorOp::Cat(1), &[&left, &right])
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        self.children.iter().map(|(n, m)| (*n, m.as_ref() as &dyn Module)).collect()
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        self.children.iter_mut().map(|(n, m)| (*n, m)).collect()
    }
}

/// torchvision's `SqueezeNet`, version "1_0" (1,248,424 parameters) or "1_1" (1,235,496).
pub(super) fn squeezenet(p: &Path, v1_1: bool) -> Result<Sequential> {
    let fp = p / "features";
    let pool = || MaxPool2d::new(3, 2).ceil_mode();
    // (inplanes, squeeze, expand) per Fire module; 0 marks a max-pool.
    let (stem, fires): (Conv2dConfig, &[(i64, i64, i64)]) = if v1_1 {
        (Conv2dConfig::new(3, 64, 3).stride(2), &[(64, 16, 64), (128, 16, 64), (0, 0, 0), (128, 32, 128), (256, 32, 128), (0, 0, 0), (256, 48, 192), (384, 48, 192), (384, 64, 256), (512, 64, 256)])
    } else {
        (Conv2dConfig::new(3, 96, 7).stride(2), &[(96, 16, 64), (128, 16, 64), (128, 32, 128), (0, 0, 0), (256, 32, 128), (256, 48, 192), (384, 48, 192), (384, 64, 256), (0, 0, 0), (512, 64, 256)])
    };
    let mut features = Sequential::new().push(Conv2d::new(&fp / 0, stem)?).push(ReLU).push(pool());
    for &(inplanes, squeeze, expand) in fires {
        let fire = &fp / features.len();
        features = if inplanes == 0 { features.push(pool()) } else { features.push(Fire::new(&fire, inplanes, squeeze, expand, expand)?) };
    }
    let cp = p / "classifier";
    let final_conv = Conv2d::new(&cp / 1, Conv2dConfig::new(512, 1000, 1))?.init_normal(0.01);
    let classifier = Sequential::new().push(Dropout::new(0.5)?).push(final_conv).push(ReLU).push(AdaptiveAvgPool2d::new(1, 1));
    Ok(Sequential::new().with_type_name("SqueezeNet").add("features", features).add("classifier", classifier).add_op(TensorOp::Flatten))
}
