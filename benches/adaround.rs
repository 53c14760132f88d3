//! AdaRound's cost: seconds per layer and for the whole of resnet20_cifar at W4A8 (per-channel weights), 256
//! calibration samples and 2,000 iterations per layer (goal: the whole model in at most 5 minutes on 2 cores).
//! The weights are untrained and the images synthetic (the project has no CIFAR-10 data): the time depends on the
//! shapes, not on the values.
//!
//! `cargo bench --bench adaround`. Run by `cargo test --all-targets` (without cargo bench's `--bench` flag) it
//! makes a short smoke run instead (8 samples, 2 iterations), so the test suite checks that it works without
//! timing anything.
use std::time::Instant;

use distill::data::Dataset;
use distill::models::{copy_model, create_model};
use distill::quantization::adaround::AdaRound;
use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
use distill::quantization::stats::collect_activation_stats;
use tch::Device;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench adaround` for those)");
    }
    let (samples, iterations) = if full { (256, 2000) } else { (8, 2) };
    println!("libtorch threads: {}", tch::get_num_threads());
    tch::manual_seed(0);
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let data = Dataset::synthetic(samples, [3, 32, 32], 10, 1).unwrap();
    let float = copy_model(&model).unwrap();
    let stats = collect_activation_stats(&mut model, &data, 1, samples).unwrap();
    let config = PostTrainConfig { bits_parameters: Some(4), per_channel_wts: true, save_fp_weights: true, stats: Some(stats), ..PostTrainConfig::default() };
    PostTrainLinearQuantizer::new(config).prepare_model(&mut model).unwrap();
    let started = Instant::now();
    let layers = AdaRound { samples, iterations, batch_size: samples.min(32), ..AdaRound::default() }.apply(&mut model, &float, &data).unwrap();
    let total = started.elapsed().as_secs_f64();
    for l in &layers {
        println!("{:<22} {:>6} weights  {:>6.2} s  ({:.2} ms per iteration)  output MSE {:.3e} -> {:.3e}", l.layer, l.weights, l.seconds, 1e3 * l.seconds / iterations as f64, l.mse_nearest, l.mse_adaround);
    }
    println!("resnet20_cifar: {} layers in {total:.1} s ({samples} samples, {iterations} iterations per layer)  [goal <= 300 s]", layers.len());
}
