//! The deployment report's figures (distill::export::deploy): LeNet trained on the bundled digits, and untrained
//! resnet20/56_cifar on synthetic images (their accuracy column is chance on random labels: only sizes and
//! latencies mean something there), each as dense, masked, thinned and 8-bit quantized variants, measured in
//! libtorch and onnxruntime at batch 1 and 32 on this machine.
//!
//! `cargo bench --bench deploy`. Run by `cargo test --all-targets` (without cargo bench's `--bench` flag) it makes
//! a short smoke run instead (LeNet and resnet20 on 32 images), so the test suite checks that it works without
//! timing anything.
use std::path::Path;

use distill::config::Schedule;
use distill::data::Dataset;
use distill::export::deploy::{deploy_report, DeployOptions};
use distill::models::create_model;
use distill::nn::Model;
use distill::quantization::q_utils::LinearQuantMode;
use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
use distill::thinning::Thinner;
use distill::train::{fit, Progress, TrainConfig};
use tch::{Device, Kind};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn copy_of(model: &Model) -> Model {
    distill::models::copy_model(model).unwrap()
}

/// `model` quantized to 8 bits with static ranges from `calibration`: asymmetric unsigned activations and
/// `weights`-mode per-channel weights.
fn quantized(model: &Model, calibration: &Dataset, weights: LinearQuantMode) -> Model {
    let mut m = copy_of(model);
    let stats = distill::quantization::stats::collect_activation_stats(&mut m, calibration, 2, 64).unwrap();
    let mut config = PostTrainConfig { stats: Some(stats), per_channel_wts: true, clip_acts: distill::quantization::q_utils::ClipMode::Avg, ..PostTrainConfig::default() };
    config.mode.activations = LinearQuantMode::AsymmetricUnsigned;
    config.mode.weights = weights;
    PostTrainLinearQuantizer::new(config).prepare_model(&mut m).unwrap();
    m
}

fn trained_lenet(schedule: Option<&str>, epochs: usize) -> Model {
    let data = distill::data::mnist_bundled().unwrap();
    tch::manual_seed(1);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut s = schedule.map(|f| Schedule::from_file(root().join("schedules").join(f)).unwrap().build(&model).unwrap());
    let config = TrainConfig { epochs, lr: 0.02, batch_size: 32, seed: 1, progress: Progress::Quiet, ..TrainConfig::default() };
    fit(&mut model, &data, s.as_mut(), &config).unwrap();
    model
}

/// Zeroes the weakest 70% (by magnitude) of every convolution's weights.
fn masked(model: &Model) -> Model {
    let m = copy_of(model);
    tch::no_grad(|| {
        for (name, w) in m.named_parameters() {
            if name.ends_with("conv1.weight") || name.ends_with("conv2.weight") {
                let k = (w.numel() as f64 * 0.7) as i64;
                let threshold = w.abs().flatten(0, -1).kthvalue(k, 0, false).0;
                w.shallow_clone().copy_(&w.where_self(&w.abs().gt_tensor(&threshold), &w.zeros_like()));
            }
        }
    });
    m
}

/// Half of the filters of every residual block's first convolution (weakest by L1) zeroed with their batch
/// norm, then thinned away.
fn thinned(model: &Model) -> Model {
    let mut m = copy_of(model);
    tch::no_grad(|| {
        for (name, w) in m.named_parameters() {
            if !(name.starts_with("layer") && name.ends_with(".conv1.weight")) {
                continue;
            }
            let norms = w.abs().sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float);
            let (_, weakest) = norms.topk(w.size()[0] / 2, 0, false, true);
            let bn = name.replace("conv1.weight", "bn1");
            for mut t in [w.shallow_clone(), m.parameter(&format!("{bn}.weight")).unwrap(), m.parameter(&format!("{bn}.bias")).unwrap()] {
                let _ = t.index_fill_(0, &weakest, 0.0);
            }
        }
    });
    Thinner::filters().apply(&mut m).unwrap();
    m
}

fn report(title: &str, variants: &mut [(String, Model)], test: &Dataset, options: &DeployOptions) {
    let dir = distill::io::TempDir::new().unwrap();
    let r = deploy_report(variants, test, dir.path(), options).unwrap();
    println!("\n== {title} ({} threads, onnxruntime {}, median of {} runs)", r.threads, r.onnxruntime_version, options.runs);
    print!("{}", distill::summary::tables::to_text_table(&r.frame().unwrap()).unwrap());
    for v in r.verdicts() {
        println!("- {v}");
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench deploy` for those)");
    }
    let options = if full { DeployOptions::default() } else { DeployOptions { batch_sizes: vec![1, 4], warmup: 0, runs: 1, ..DeployOptions::default() } };
    let epochs = if full { 10 } else { 1 };

    let data = distill::data::mnist_bundled().unwrap();
    let (dense, agp, thin) = (trained_lenet(None, epochs), trained_lenet(Some("lenet_agp.yaml"), epochs), trained_lenet(Some("lenet_filters_thin.yaml"), epochs));
    let mut lenet = vec![
        ("int8-readme".to_string(), quantized(&agp, &data.valid, LinearQuantMode::AsymmetricUnsigned)),
        ("int8-symmetric".to_string(), quantized(&agp, &data.valid, LinearQuantMode::Symmetric)),
    ];
    lenet.insert(0, ("thinned".into(), thin));
    lenet.insert(0, ("masked-agp".into(), agp));
    lenet.insert(0, ("dense".into(), dense));
    report("lenet, trained 10 epochs on the bundled digits (int8 of the AGP-pruned model)", &mut lenet, &data.test, &options);

    // The smoke run checks the residual path on the smaller network and fewer images.
    let (archs, images): (&[&str], usize) = if full { (&["resnet20_cifar", "resnet56_cifar"], 256) } else { (&["resnet20_cifar"], 32) };
    for &arch in archs {
        let test = Dataset::synthetic(images, [3, 32, 32], 10, 11).unwrap();
        let calibration = Dataset::synthetic(images.min(128), [3, 32, 32], 10, 12).unwrap();
        let dense = create_model(arch, "cifar10", Device::Cpu).unwrap();
        let thin = thinned(&dense);
        let mut variants = vec![
            ("masked-70".to_string(), masked(&dense)),
            ("int8".to_string(), quantized(&dense, &calibration, LinearQuantMode::Symmetric)),
            ("thinned-int8".to_string(), quantized(&thin, &calibration, LinearQuantMode::Symmetric)),
        ];
        variants.insert(1, ("thinned".into(), thin));
        variants.insert(0, ("dense".into(), dense));
        report(&format!("{arch}, untrained, synthetic images"), &mut variants, &test, &options);
    }
}
