//! Analysis speed: the summaries of resnet56_cifar, reading scalar events into a DataFrame, and sensitivity
//! analysis against a plain serial loop in Distiller's manner (a model copy per tensor, every level evaluated,
//! batches rebuilt for each evaluation).
//!
//! `cargo bench --bench analysis`. Run by `cargo test --all-targets` (without cargo bench's `--bench` flag) it
//! makes a short smoke run instead, so the test suite checks that it works without timing anything.
use std::time::Instant;

use distill::data::Dataset;
use distill::models::create_model;
use distill::nn::Model;
use distill::pruning::criteria::level_mask;
use distill::sensitivity::{levels, SensitivityAnalysis, SensitivityGroup};
use distill::summary::tables::{model_performance_summary, weights_sparsity_summary};
use tch::Device;

fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let _ = f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// Distiller's loop: per tensor a fresh copy of the model, pruned cumulatively level by level, each level
/// evaluated on batches built anew.
fn serial_loop(model: &Model, data: &Dataset, params: &[String], levels: &[f64]) -> usize {
    let state = model.state_dict();
    let mut evaluations = 0;
    for p in params {
        let mut copy = create_model(&model.info().arch, &model.info().dataset, Device::Cpu).unwrap();
        copy.load_state_dict(&state, true).unwrap();
        let w = copy.parameter(p).unwrap();
        for &s in levels {
            if s > 0.0 {
                let mask = level_mask(&w, s).unwrap();
                tch::no_grad(|| {
                    let _ = w.shallow_clone().f_mul_(&mask).unwrap();
                });
            }
            distill::train::validate(&mut copy, data, 256).unwrap();
            evaluations += 1;
        }
    }
    evaluations
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench analysis` for those)");
    }
    let repeats = if full { 5 } else { 1 };
    let mut resnet56 = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
    let sparsity_ms = best_of(repeats, || weights_sparsity_summary(&resnet56).unwrap());
    let compute_ms = best_of(repeats, || model_performance_summary(&mut resnet56, 1).unwrap());
    println!("resnet56_cifar summaries (best of {repeats}): weights sparsity {sparsity_ms:.1} ms, compute (MACs) {compute_ms:.1} ms  [goal <= 20 ms]");

    let dir = std::env::temp_dir().join(format!("distill-bench-events-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let mut w = distill::logging::EventWriter::create(&dir).unwrap();
        for i in 0..if full { 100_000i64 } else { 1_000 } {
            w.add_scalar(["Performance/Training/Overall Loss", "Performance/Training/Top1", "LR", "sparsity/weights/total"][(i % 4) as usize], i as f64 * 1e-3, i / 4).unwrap();
        }
    }
    let read_ms = best_of(repeats.min(3), || distill::logging::read_runs(&[&dir]).unwrap());
    let (df, _) = distill::logging::read_runs(&[&dir]).unwrap();
    println!("read {} scalar events into a DataFrame in {read_ms:.1} ms: {:.2} M events/s  [goal >= 1 M/s]", df.height(), df.height() as f64 / read_ms / 1e3);
    let _ = std::fs::remove_dir_all(&dir);

    let data = distill::data::mnist_bundled().unwrap();
    tch::manual_seed(0);
    let mut lenet = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let params: Vec<String> = lenet.named_parameters().into_iter().filter(|(_, t)| matches!(t.dim(), 2 | 4)).map(|(n, _)| n).collect();
    let lv = if full { levels(0.0, 0.95, 0.05) } else { levels(0.0, 0.5, 0.25) }.unwrap();
    let t = Instant::now();
    let evaluations = serial_loop(&lenet, &data.valid, &params, &lv);
    let serial = t.elapsed().as_secs_f64();
    let mut analysis = SensitivityAnalysis::new();
    let t = Instant::now();
    analysis.run(&mut lenet, &data.valid, &params, &lv, SensitivityGroup::Element, 256, true).unwrap();
    let ours = t.elapsed().as_secs_f64();
    let t = Instant::now();
    analysis.run(&mut lenet, &data.valid, &params, &lv, SensitivityGroup::Element, 256, true).unwrap();
    let cached = t.elapsed().as_secs_f64();
    println!(
        "sensitivity, LeNet, {} tensors x {} levels on 500 digits: serial loop {:.2} s ({evaluations} evaluations), distill {:.2} s ({} evaluations): {:.2}x faster; repeated sweep from the cache {:.1} ms",
        params.len(),
        lv.len(),
        serial,
        ours,
        analysis.evaluations(),
        serial / ours,
        cached * 1e3
    );
}
