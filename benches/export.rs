//! ONNX export speed: resnet56_cifar to an ONNX file (goal: at most 200 ms).
//!
//! `cargo bench --bench export`. Run by `cargo test --all-targets` (without cargo bench's `--bench` flag) it makes
//! a short smoke run instead, so the test suite checks that it works without timing anything.
use std::time::Instant;

use distill::export::onnx::export_onnx;
use distill::models::create_model;
use tch::Device;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench export` for those)");
    }
    let rounds = if full { 7 } else { 1 };
    let dir = distill::io::TempDir::new().unwrap();
    for arch in ["lenet", "resnet20_cifar", "resnet56_cifar"] {
        let dataset = if arch == "lenet" { "mnist" } else { "cifar10" };
        let mut model = create_model(arch, dataset, Device::Cpu).unwrap();
        let path = dir.path().join(format!("{arch}.onnx"));
        let mut times: Vec<f64> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                export_onnx(&mut model, &path).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let bytes = std::fs::metadata(&path).unwrap().len();
        println!("{arch}: export {:.1} ms (median of {rounds}), {bytes} bytes, {} parameters{}", times[rounds / 2], model.num_parameters(), if arch == "resnet56_cifar" { "  [goal <= 200 ms]" } else { "" });
    }
}
