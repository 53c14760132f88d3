//! Knowledge distillation: what one extra teacher forward pass costs per training step (LeNet from LeNet,
//! ResNet-20 from ResNet-20 and from ResNet-56, synthetic data), and what distillation buys a student on the
//! bundled MNIST digits: an MLP trained alone against the same MLP distilled from a trained LeNet (T = 4,
//! distill weight 0.7, student weight 0.3), same seeds (1, 2, 3), epochs (10) and settings (`distill train`'s
//! defaults for the MLP, cosine learning rate), test top-1 per seed, mean and spread.
//!
//! `cargo bench --bench distillation`. Run by `cargo test --all-targets` (without cargo bench's `--bench` flag) it
//! makes a short smoke run instead.
use std::time::Instant;

use distill::data::Dataset;
use distill::distillation::{KnowledgeDistillationPolicy, LossWeights};
use distill::models::create_model;
use distill::optim::{Optimizer, OptimizerConfig};
use distill::scheduler::{CompressionScheduler, PolicySchedule};
use distill::train::{fit, train_epoch, EpochSettings, Progress, TrainConfig};
use tch::Device;

fn kd_scheduler(student: &distill::nn::Model, teacher: &str, dataset: &str, t: f64) -> CompressionScheduler {
    let teacher = create_model(teacher, dataset, Device::Cpu).unwrap();
    let policy = KnowledgeDistillationPolicy::new(teacher, t, LossWeights { distill: 0.7, student: 0.3, teacher: 0.0 }).unwrap();
    let mut s = CompressionScheduler::new(student);
    s.add_policy(Box::new(policy), PolicySchedule::range(0, 1, 1).unwrap());
    s
}

/// (ms per step alone, ms per step with distillation), alternating the two loops so noise hits both alike.
fn overhead(student: &str, teacher: &str, dataset: &str, batch: usize, steps: usize) -> (f64, f64) {
    let (shape, classes) = distill::models::dataset_shape(dataset).unwrap();
    let data = Dataset::synthetic(steps * batch, shape, classes, 1).unwrap();
    let mut plain = create_model(student, dataset, Device::Cpu).unwrap();
    let mut model = create_model(student, dataset, Device::Cpu).unwrap();
    let mut scheduler = kd_scheduler(&model, teacher, dataset, 4.0);
    let mut opt_plain = Optimizer::for_model(&plain, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    let mut opt = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    scheduler.on_epoch_begin(&mut model, 0, Some(&mut opt)).unwrap();
    let (mut base, mut kd) = (0.0, 0.0);
    for round in 0..3 {
        let t = Instant::now();
        train_epoch(&mut plain, &data, &mut opt_plain, None, 0, EpochSettings::quiet(batch, round)).unwrap();
        base += t.elapsed().as_secs_f64();
        let t = Instant::now();
        train_epoch(&mut model, &data, &mut opt, Some(&mut scheduler), 0, EpochSettings::quiet(batch, round)).unwrap();
        kd += t.elapsed().as_secs_f64();
    }
    let per_step = |s: f64| s * 1e3 / (3 * steps) as f64;
    (per_step(base), per_step(kd))
}

/// A scheduler annealing the learning rate along a cosine, as `distill train` does by default for MNIST models.
fn cosine(model: &distill::nn::Model, epochs: usize) -> CompressionScheduler {
    use distill::scheduler::lr::{LrPolicy, LrSchedule};
    let mut s = CompressionScheduler::new(model);
    s.add_policy(Box::new(LrPolicy::new(LrSchedule::CosineAnnealingLR { t_max: epochs, eta_min: 0.0 }).unwrap()), PolicySchedule::range(0, epochs, 1).unwrap());
    s
}

fn mean_spread(v: &[f64]) -> (f64, f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, lo, hi)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench distillation` for those)");
    }
    let steps = if full { 30 } else { 2 };
    println!("per training step, student alone vs distilled (one extra teacher forward, eval mode, no gradients):");
    for (student, teacher, dataset, batch) in [("lenet", "lenet", "mnist", 64), ("resnet20_cifar", "resnet20_cifar", "cifar10", 32), ("resnet20_cifar", "resnet56_cifar", "cifar10", 32)] {
        let (alone, kd) = overhead(student, teacher, dataset, batch, steps);
        println!("  {student} from {teacher} (batch {batch}): {alone:.2} -> {kd:.2} ms/step (+{:.1}%)", 100.0 * (kd / alone - 1.0));
    }

    let data = distill::data::mnist_bundled().unwrap();
    let epochs = if full { 10 } else { 1 };
    let d = distill::models::training_defaults("mlp", "mnist");
    let config = |seed: u64| TrainConfig { epochs, lr: d.lr, batch_size: d.batch_size, seed, optimizer: OptimizerConfig::sgd(d.momentum, d.weight_decay), progress: Progress::Quiet, ..TrainConfig::default() };
    tch::manual_seed(1);
    let mut teacher = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let t = distill::models::training_defaults("lenet", "mnist");
    let mut s = cosine(&teacher, epochs);
    let teacher_run = fit(&mut teacher, &data, Some(&mut s), &TrainConfig { lr: t.lr, batch_size: t.batch_size, optimizer: OptimizerConfig::sgd(t.momentum, t.weight_decay), ..config(1) }).unwrap();
    println!("teacher: lenet, {epochs} epochs, test top-1 {:.1}%", teacher_run.test.top1);
    let seeds: &[u64] = if full { &[1, 2, 3] } else { &[1] };
    let (mut alone, mut distilled) = (Vec::new(), Vec::new());
    for &seed in seeds {
        tch::manual_seed(seed as i64);
        let mut student = create_model("mlp", "mnist", Device::Cpu).unwrap();
        let start = student.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect::<Vec<_>>();
        let mut s = cosine(&student, epochs);
        alone.push(fit(&mut student, &data, Some(&mut s), &config(seed)).unwrap().test.top1);
        let mut student = create_model("mlp", "mnist", Device::Cpu).unwrap();
        student.load_state_dict(&start, true).unwrap();
        let policy = KnowledgeDistillationPolicy::new(distill::models::copy_model(&teacher).unwrap(), 4.0, LossWeights { distill: 0.7, student: 0.3, teacher: 0.0 }).unwrap();
        let mut s = cosine(&student, epochs);
        s.add_policy(Box::new(policy), PolicySchedule::range(0, epochs, 1).unwrap());
        distilled.push(fit(&mut student, &data, Some(&mut s), &config(seed)).unwrap().test.top1);
        println!("  seed {seed}: mlp alone {:.1}%, distilled {:.1}%", alone.last().unwrap(), distilled.last().unwrap());
    }
    let (a, d) = (mean_spread(&alone), mean_spread(&distilled));
    println!(
        "mlp test top-1 over seeds {seeds:?}: alone {:.2}% ({:.1}–{:.1}), distilled {:.2}% ({:.1}–{:.1}); difference {:+.2} points (one test digit is 0.2)",
        a.0, a.1, a.2, d.0, d.1, d.2, d.0 - a.0
    );
}
