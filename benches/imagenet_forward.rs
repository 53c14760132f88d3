//! ImageNet models' forward pass on the CPU: distill's module tree against PyTorch running the same libtorch.
//! ResNet-50 and MobileNet-V2 at batch 32 (eval mode, no gradients), best of five timed passes after a warm-up,
//! with the thread count PyTorch is given set to libtorch's here. PyTorch's figure needs a Python with torch
//! 2.13.0 and torchvision 0.28.0 named by `DISTILL_TORCH_PYTHON` (the project's CPU set-up cannot import torch in
//! Python); without it only distill's figures are printed.
//!
//! `cargo bench --bench imagenet_forward`. Run by `cargo test --all-targets` (without `--bench`) it makes a short
//! smoke run instead.
use std::process::Command;
use std::time::Instant;

use distill::models::create_model;
use tch::{Device, Kind, Tensor};

const PYTORCH: &str = r#"
import sys, time, torch, torchvision
arch, batch, rounds, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
model = getattr(torchvision.models, arch)().eval()
x = torch.randn(batch, 3, 224, 224)
with torch.no_grad():
    model(x)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter(); model(x); best = min(best, time.perf_counter() - t)
print(best * 1e3)
"#;

fn pytorch_ms(arch: &str, batch: i64, rounds: usize) -> Option<f64> {
    let python = std::env::var("DISTILL_TORCH_PYTHON").ok()?;
    let threads = tch::get_num_threads().to_string();
    let out = Command::new(python).args(["-c", PYTORCH, arch, &batch.to_string(), &rounds.to_string(), &threads]).output().ok()?;
    if !out.status.success() {
        eprintln!("PyTorch run failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn distill_ms(arch: &str, batch: i64, rounds: usize) -> f64 {
    let model = create_model(arch, "imagenet", Device::Cpu).unwrap();
    let x = Tensor::randn([batch, 3, 224, 224], (Kind::Float, Device::Cpu));
    let run = || drop(tch::no_grad(|| model.forward_t(&x, false)).unwrap());
    run();
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (archs, batch, rounds): (&[&str], i64, usize) = if full { (&["resnet50", "mobilenet_v2"], 32, 5) } else { (&["resnet18"], 2, 1) };
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench imagenet_forward` for those)");
    }
    println!("{} libtorch threads, batch {batch}, best of {rounds}", tch::get_num_threads());
    println!("{:<14}{:>14}{:>14}{:>10}", "model", "distill ms", "PyTorch ms", "ratio");
    for arch in archs {
        let ours = distill_ms(arch, batch, rounds);
        let theirs = if full { pytorch_ms(arch, batch, rounds) } else { None };
        let (t, r) = theirs.map_or(("-".into(), "-".into()), |p| (format!("{p:.1}"), format!("{:.3}", ours / p)));
        println!("{arch:<14}{ours:>14.1}{t:>14}{r:>10}");
    }
}
