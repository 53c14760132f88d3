//! ImageNet models' forward pass on the CPU: distill's module tree against PyTorch running the same libtorch.
//! ResNet-50 and MobileNet-V2 at batch 32 (eval mode, no gradients), best of five timed passes after a warm-up,
//! with the thread count PyTorch is given set to libtorch's here. PyTorch's figure needs a Python with torch
//! 2.13.0 and torchvision 0.28.0 named by `DISTILL_TORCH_PYTHON` (the project's CPU set-up cannot import torch in
//! Python); without it only distill's figures are printed.
//!
//! Then the image-folder loaders' throughput, in images/s with one thread and with all of them, on 200 generated
//! 500×375 JPEGs: `image_folder` (decoded, resized and center-cropped into memory) and a training pass over
//! `image_folder_streamed` (random-resized crops and flips, batches of 32 decoded ahead on the worker threads and
//! normalized into tensors).
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

/// Images per second through `image_folder` for `threads` decoding threads, best of `rounds`.
fn folder_throughput(root: &std::path::Path, images: usize, threads: usize, rounds: usize) -> f64 {
    let options = distill::data::ImageFolderOptions { threads, ..Default::default() };
    let best = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            drop(distill::data::image_folder(root, &options).unwrap());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    images as f64 / best
}

/// Images per second of one training pass over the streamed folder, batches of 32, best of `rounds`.
fn streamed_throughput(root: &std::path::Path, images: usize, threads: usize, rounds: usize) -> f64 {
    let options = distill::data::ImageFolderOptions { threads, ..Default::default() };
    let set = distill::data::image_folder_streamed(root, &options, Some(distill::data::RandomResizedCrop::imagenet(224))).unwrap();
    let best = (0..rounds)
        .map(|round| {
            let t = Instant::now();
            for batch in set.train_batches(32, round as u64, Device::Cpu).unwrap() {
                drop(batch.unwrap());
            }
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    images as f64 / best
}

fn image_folder_benchmark(images: usize, rounds: usize) {
    use image::{ImageBuffer, Rgb};
    let dir = distill::io::TempDir::new().unwrap();
    for i in 0..images {
        let class = dir.path().join(format!("c{}", i % 10));
        std::fs::create_dir_all(&class).unwrap();
        let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_fn(500, 375, |x, y| Rgb([((x + i as u32) % 256) as u8, ((x * y) % 253) as u8, (y % 256) as u8]));
        img.save(class.join(format!("{i}.jpg"))).unwrap();
    }
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("image folder, {images} JPEGs of 500×375 to 224×224: {:.0} images/s with 1 thread, {:.0} with {all}", folder_throughput(dir.path(), images, 1, rounds), folder_throughput(dir.path(), images, all, rounds));
    println!(
        "streamed training pass, same JPEGs, random-resized crops: {:.0} images/s with 1 thread, {:.0} with {all}",
        streamed_throughput(dir.path(), images, 1, rounds),
        streamed_throughput(dir.path(), images, all, rounds)
    );
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
    if full {
        image_folder_benchmark(200, 3);
    } else {
        image_folder_benchmark(10, 1);
    }
}
