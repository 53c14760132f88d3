//! The model zoo, with Distiller's module names and shapes so that Distiller's YAML schedules apply unchanged.
//!
//! | dataset | architectures |
//! |---|---|
//! | `mnist` | `simplenet_mnist`, `simplenet_v2_mnist`, `lenet` (LeNet-5), `mlp` (LeNet-300-100) |
//! | `cifar10` | `simplenet_cifar`, `resnet20_cifar`, `resnet32_cifar`, `resnet44_cifar`, `resnet56_cifar`, `plain20_cifar`, `preact_resnet20_cifar`, `preact_resnet32_cifar`, `preact_resnet44_cifar`, `preact_resnet56_cifar`, `vgg11_cifar` … `vgg19_bn_cifar` |
//! | `imagenet` | torchvision's `resnet18` … `resnet152` (with Distiller's blocks), `alexnet`, `vgg11` … `vgg19_bn`, `squeezenet1_0`, `squeezenet1_1`, `mobilenet_v2`; Distiller's `mobilenet` (v1), `alexnet_bn`, `preact_resnet18` … `preact_resnet152` |
//!
//! The ImageNet models have torchvision's (or Distiller's) parameter names and shapes, so their state dicts load
//! unchanged; `tests/imagenet_zoo.rs` compares every name, shape, parameter count and MAC count with PyTorch's.
//!
//! ```
//! let model = distill::models::create_model("resnet20_cifar", "cifar10", tch::Device::Cpu)?;
//! assert_eq!(model.num_parameters(), 272_474);
//! # Ok::<(), distill::Error>(())
//! ```
mod alexnet;
mod mnist;
mod mobilenet;
mod plain_cifar;
mod preact_resnet_cifar;
mod resnet;
mod resnet_cifar;
mod simplenet_cifar;
mod squeezenet;
mod vgg;

use tch::nn::{Path, VarStore};
use tch::Device;

use crate::nn::{Model, ModelInfo, Sequential};
use crate::{Error, Result};

pub use preact_resnet_cifar::PreactBasicBlock;
pub use resnet::ResidualBlock;
pub use resnet_cifar::BasicBlock;
pub use squeezenet::Fire;

/// Hyper-parameters that train a zoo model from scratch: what `distill train` uses for flags left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingDefaults {
    /// Initial learning rate.
    pub lr: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Anneal the learning rate to 0 along a cosine over the run.
    pub cosine_lr: bool,
}

/// The early exits the zoo defines for `arch`, for [`attach_exits`](crate::early_exit::attach_exits): Distiller's
/// exit after `layer1.2.relu2` of the CIFAR ResNets (AvgPool2d(3), Flatten, Linear(1600, 10)); for the MNIST
/// networks, one exit after the first stage. `None` for an architecture without a default exit (name one with
/// `--earlyexit-at`).
///
/// ```
/// let exits = distill::models::zoo_exits("resnet20_cifar").unwrap();
/// assert_eq!(exits, [distill::early_exit::ExitPoint::pooled("layer1.2.relu2", 3)]);
/// ```
pub fn zoo_exits(arch: &str) -> Option<Vec<crate::early_exit::ExitPoint>> {
    use crate::early_exit::ExitPoint;
    let exit = match arch {
        a if a.starts_with("resnet") && a.ends_with("_cifar") => ExitPoint::pooled("layer1.2.relu2", 3),
        "lenet" => ExitPoint::pooled("pool1", 2),
        "simplenet_mnist" | "simplenet_v2_mnist" => ExitPoint::pooled("pool1", 3),
        "mlp" => ExitPoint::linear("relu1"),
        _ => return None,
    };
    Some(vec![exit])
}

/// The hyper-parameters `distill train` uses for `arch` on `dataset` when no flag says otherwise (README,
/// "Training defaults"). The MNIST rows are measured on the bundled digits (≥ 97% test top-1 in 10 epochs for
/// every seed tried); the CIFAR-10 rows are Distiller's published settings for those families (SGD 0.1 with
/// momentum 0.9 and weight decay 1e-4, 5e-4 for VGG), with a cosine schedule in place of its step schedules.
///
/// ```
/// let d = distill::models::training_defaults("lenet", "mnist");
/// assert_eq!((d.lr, d.batch_size, d.cosine_lr), (0.02, 32, true));
/// ```
pub fn training_defaults(arch: &str, dataset: &str) -> TrainingDefaults {
    let sgd = |lr: f64, batch_size: usize, weight_decay: f64| TrainingDefaults { lr, batch_size, momentum: 0.9, weight_decay, cosine_lr: true };
    match (dataset, arch) {
        // Global average pooling before one small layer learns more slowly.
        ("mnist", "simplenet_v2_mnist") => sgd(0.05, 32, 1e-4),
        ("mnist", _) => sgd(0.02, 32, 1e-4),
        (_, a) if a.starts_with("vgg") => sgd(0.05, 128, 5e-4),
        _ => sgd(0.1, 128, 1e-4),
    }
}

/// The datasets the zoo has models for, with their input shape `[C, H, W]` and number of classes.
pub const DATASETS: &[(&str, [i64; 3], i64)] = &[("mnist", [1, 28, 28], 10), ("cifar10", [3, 32, 32], 10), ("imagenet", [3, 224, 224], 1000)];

type Builder = fn(&Path) -> Result<Sequential>;

/// One architecture of the zoo.
struct Arch {
    name: &'static str,
    dataset: &'static str,
    build: Builder,
}

const ZOO: &[Arch] = &[
    Arch { name: "simplenet_mnist", dataset: "mnist", build: mnist::simplenet_mnist },
    Arch { name: "simplenet_v2_mnist", dataset: "mnist", build: mnist::simplenet_v2_mnist },
    Arch { name: "lenet", dataset: "mnist", build: mnist::lenet },
    Arch { name: "mlp", dataset: "mnist", build: mnist::mlp },
    Arch { name: "simplenet_cifar", dataset: "cifar10", build: simplenet_cifar::simplenet_cifar },
    Arch { name: "resnet20_cifar", dataset: "cifar10", build: |p| resnet_cifar::resnet_cifar(p, 3) },
    Arch { name: "resnet32_cifar", dataset: "cifar10", build: |p| resnet_cifar::resnet_cifar(p, 5) },
    Arch { name: "resnet44_cifar", dataset: "cifar10", build: |p| resnet_cifar::resnet_cifar(p, 7) },
    Arch { name: "resnet56_cifar", dataset: "cifar10", build: |p| resnet_cifar::resnet_cifar(p, 9) },
    Arch { name: "plain20_cifar", dataset: "cifar10", build: plain_cifar::plain20_cifar },
    Arch { name: "preact_resnet20_cifar", dataset: "cifar10", build: |p| preact_resnet_cifar::preact_resnet_cifar(p, 3) },
    Arch { name: "preact_resnet32_cifar", dataset: "cifar10", build: |p| preact_resnet_cifar::preact_resnet_cifar(p, 5) },
    Arch { name: "preact_resnet44_cifar", dataset: "cifar10", build: |p| preact_resnet_cifar::preact_resnet_cifar(p, 7) },
    Arch { name: "preact_resnet56_cifar", dataset: "cifar10", build: |p| preact_resnet_cifar::preact_resnet_cifar(p, 9) },
    Arch { name: "vgg11_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG11, false) },
    Arch { name: "vgg11_bn_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG11, true) },
    Arch { name: "vgg13_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG13, false) },
    Arch { name: "vgg13_bn_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG13, true) },
    Arch { name: "vgg16_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG16, false) },
    Arch { name: "vgg16_bn_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG16, true) },
    Arch { name: "vgg19_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG19, false) },
    Arch { name: "vgg19_bn_cifar", dataset: "cifar10", build: |p| vgg::vgg_cifar(p, vgg::VGG19, true) },
    Arch { name: "resnet18", dataset: "imagenet", build: |p| resnet::resnet(p, resnet::Block::Basic, [2, 2, 2, 2]) },
    Arch { name: "resnet34", dataset: "imagenet", build: |p| resnet::resnet(p, resnet::Block::Basic, [3, 4, 6, 3]) },
    Arch { name: "resnet50", dataset: "imagenet", build: |p| resnet::resnet(p, resnet::Block::Bottleneck, [3, 4, 6, 3]) },
    Arch { name: "resnet101", dataset: "imagenet", build: |p| resnet::resnet(p, resnet::Block::Bottleneck, [3, 4, 23, 3]) },
    Arch { name: "resnet152", dataset: "imagenet", build: |p| resnet::resnet(p, resnet::Block::Bottleneck, [3, 8, 36, 3]) },
    Arch { name: "preact_resnet18", dataset: "imagenet", build: |p| resnet::preact_resnet(p, resnet::Block::Basic, [2, 2, 2, 2]) },
    Arch { name: "preact_resnet34", dataset: "imagenet", build: |p| resnet::preact_resnet(p, resnet::Block::Basic, [3, 4, 6, 3]) },
    Arch { name: "preact_resnet50", dataset: "imagenet", build: |p| resnet::preact_resnet(p, resnet::Block::Bottleneck, [3, 4, 6, 3]) },
    Arch { name: "preact_resnet101", dataset: "imagenet", build: |p| resnet::preact_resnet(p, resnet::Block::Bottleneck, [3, 4, 23, 3]) },
    Arch { name: "preact_resnet152", dataset: "imagenet", build: |p| resnet::preact_resnet(p, resnet::Block::Bottleneck, [3, 8, 36, 3]) },
    Arch { name: "mobilenet", dataset: "imagenet", build: mobilenet::mobilenet },
    Arch { name: "mobilenet_v2", dataset: "imagenet", build: mobilenet::mobilenet_v2 },
    Arch { name: "alexnet", dataset: "imagenet", build: alexnet::alexnet },
    Arch { name: "alexnet_bn", dataset: "imagenet", build: alexnet::alexnet_bn },
    Arch { name: "squeezenet1_0", dataset: "imagenet", build: |p| squeezenet::squeezenet(p, false) },
    Arch { name: "squeezenet1_1", dataset: "imagenet", build: |p| squeezenet::squeezenet(p, true) },
    Arch { name: "vgg11", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG11, false) },
    Arch { name: "vgg11_bn", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG11, true) },
    Arch { name: "vgg13", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG13, false) },
    Arch { name: "vgg13_bn", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG13, true) },
    Arch { name: "vgg16", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG16, false) },
    Arch { name: "vgg16_bn", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG16, true) },
    Arch { name: "vgg19", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG19, false) },
    Arch { name: "vgg19_bn", dataset: "imagenet", build: |p| vgg::vgg(p, vgg::VGG19, true) },
];

/// The architectures available for `dataset` (all of them for `None`), in the zoo's order.
pub fn architectures(dataset: Option<&str>) -> Vec<&'static str> {
    ZOO.iter().filter(|a| dataset.is_none_or(|d| a.dataset == d)).map(|a| a.name).collect()
}

/// The dataset architecture `arch` is built for (each zoo architecture has exactly one), or `None` for a name the
/// zoo does not know.
///
/// ```
/// assert_eq!(distill::models::dataset_of("resnet18"), Some("imagenet"));
/// assert_eq!(distill::models::dataset_of("resnet19"), None);
/// ```
pub fn dataset_of(arch: &str) -> Option<&'static str> {
    ZOO.iter().find(|a| a.name == arch).map(|a| a.dataset)
}

/// Input shape `[C, H, W]` and number of classes of a dataset the zoo knows.
pub fn dataset_shape(dataset: &str) -> Result<([i64; 3], i64)> {
    DATASETS
        .iter()
        .find(|(d, ..)| *d == dataset)
        .map(|(_, shape, classes)| (*shape, *classes))
        .ok_or_else(|| Error::unknown("dataset", dataset, DATASETS.iter().map(|(d, ..)| *d)))
}

/// Builds architecture `arch` for `dataset` on `device`, with freshly initialized weights drawn from libtorch's
/// generator (seed it with `tch::manual_seed` for reproducible weights).
///
/// Unknown names are errors that list the valid ones, and an architecture asked for on the wrong dataset says
/// which dataset it belongs to.
pub fn create_model(arch: &str, dataset: &str, device: Device) -> Result<Model> {
    let (input_shape, num_classes) = dataset_shape(dataset)?;
    let Some(spec) = ZOO.iter().find(|a| a.name == arch && a.dataset == dataset) else {
        if let Some(other) = dataset_of(arch) {
            return Err(Error::invalid(
                "architecture",
                format!("'{arch}' is a {other} model, not a {dataset} one (for {dataset}: {})", architectures(Some(dataset)).join(", ")),
            ));
        }
        return Err(Error::unknown("architecture", arch, architectures(Some(dataset))));
    };
    let vs = VarStore::new(device);
    let root = (spec.build)(&vs.root())?;
    Model::new(vs, root, ModelInfo::new(arch, dataset, input_shape, num_classes))
}

/// An independent copy of a floating-point zoo model: the same architecture, the same thinning, and copies of its
/// weights and buffers, on the same device, in the same memory format. For comparing variants of one trained model
/// (masked, thinned, quantized) without training it again. A model built outside the zoo, or a quantized one, is
/// an error: build it again and load its state dict.
///
/// ```
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// let _ = tch::no_grad(|| model.parameter("conv1.weight").map(|w| w.narrow(0, 0, 3).fill_(0.0)))?;
/// distill::thinning::thin_filters(&mut model)?;
/// let copy = distill::models::copy_model(&model)?;
/// assert_eq!(copy.parameter("conv1.weight")?.size(), [3, 1, 5, 5]);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn copy_model(model: &Model) -> Result<Model> {
    let info = model.info();
    let mut copy = create_model(&info.arch, &info.dataset, model.device())?;
    crate::train::replay_structure(&mut copy, crate::train::StructureLog::of(model), None)?;
    copy.load_state_dict(&model.state_dict(), true)?;
    copy.to_memory_format(model.memory_format())?;
    Ok(copy)
}

/// The zoo model a distill checkpoint was saved from, rebuilt in one call: its architecture and dataset from the
/// checkpoint's metadata, its thinning replayed, its weights loaded, on `device`. A checkpoint of a
/// quantization-aware run needs its schedule's quantizers first: build the model and use
/// [`Checkpoint::restore_model_compressed`](crate::train::Checkpoint::restore_model_compressed).
///
/// ```
/// # let dir = distill::io::TempDir::new()?;
/// # let data = distill::data::DataSplits { train: distill::data::Dataset::synthetic(32, [1, 28, 28], 10, 1)?, valid: distill::data::Dataset::synthetic(8, [1, 28, 28], 10, 2)?, test: distill::data::Dataset::synthetic(8, [1, 28, 28], 10, 3)? };
/// # let mut trained = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// # let config = distill::train::TrainConfig { epochs: 1, out_dir: Some(dir.path().to_path_buf()), progress: distill::train::Progress::Quiet, ..Default::default() };
/// # distill::train::fit(&mut trained, &data, None, &config)?;
/// let model = distill::models::load_checkpoint(dir.path().join("checkpoint.safetensors"), tch::Device::Cpu)?;
/// assert_eq!(model.info().arch, "lenet");
/// # Ok::<(), distill::Error>(())
/// ```
pub fn load_checkpoint(path: impl AsRef<std::path::Path>, device: Device) -> Result<Model> {
    let path = path.as_ref();
    let checkpoint = crate::train::Checkpoint::load(path)?;
    let arch = &checkpoint.meta.arch;
    if arch.is_empty() {
        return Err(Error::checkpoint(
            path,
            format!("a {} does not name its architecture: build the model with create_model and load it with Checkpoint::restore_model", checkpoint.format),
        ));
    }
    // Older Distiller checkpoints do not record the dataset; each zoo architecture has one.
    let dataset = match checkpoint.meta.dataset.as_str() {
        "" => dataset_of(arch).unwrap_or_default(),
        d => d,
    };
    let mut model = create_model(arch, dataset, device)?;
    checkpoint.restore_model(&mut model, path)?;
    Ok(model)
}
