//! Time per training step of LeNet-5 (MNIST shape, batch 64) and ResNet-20 (CIFAR-10 shape, batch 32) on
//! synthetic data: a plain tch loop (tch::nn layers and tch's SGD) against `distill::train::train_epoch` with no
//! compression, so later work can show what compression costs on top. Below it, distill's step with the model
//! laid out row-major and channels-last (`Model::to_memory_format`), timed alternately.
//!
//! The next table reports what an AGP schedule over every 2-D and 4-D weight costs per training step (masks
//! applied before the forward pass and re-applied after the optimizer step), and, separately, the mask-update
//! step that recomputes all masks at an epoch's start.
//!
//! A further table reports quantization: the per-step cost of quantization-aware training (8-bit range-linear
//! fake quantization with STE on weights and ReLU outputs) against the float step, timed in alternating rounds
//! with the ratio taken round by round, and the time of a post-training calibration (two passes over the
//! calibration batches) plus quantization. A last table splits LeNet's step into forward, backward and optimizer
//! step for float, QAT, and QAT of activations or weights alone, interleaved step by step.
//!
//! `cargo bench --bench train_step [-- STEPS]` prints milliseconds per step and the ratios. Run by `cargo test
//! --all-targets` (without cargo bench's `--bench` flag) it makes a four-step smoke run instead (the calibration takes four batches).
use std::time::Instant;

use distill::config::{PolicyConfig, PrunerConfig, Schedule};
use distill::data::Dataset;
use distill::nn::MemoryFormat;
use distill::optim::{Optimizer, OptimizerConfig};
use distill::train::{train_epoch, EpochSettings};
use tch::nn::{self, ModuleT, OptimizerConfig as _};
use tch::{Device, Kind, Tensor};

fn tch_lenet(p: &nn::Path) -> nn::SequentialT {
    let conv = |c: nn::ConvConfig| c;
    nn::seq_t()
        .add(nn::conv2d(p / "conv1", 1, 6, 5, conv(nn::ConvConfig { padding: 2, ..Default::default() })))
        .add_fn(|x| x.relu().max_pool2d_default(2))
        .add(nn::conv2d(p / "conv2", 6, 16, 5, Default::default()))
        .add_fn(|x| x.relu().max_pool2d_default(2).flatten(1, -1))
        .add(nn::linear(p / "fc1", 400, 120, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(p / "fc2", 120, 84, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(p / "fc3", 84, 10, Default::default()))
}

fn conv_bn(p: &nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64) -> nn::SequentialT {
    let cfg = nn::ConvConfig { stride, padding: k / 2, bias: false, ..Default::default() };
    nn::seq_t().add(nn::conv2d(p / "conv", c_in, c_out, k, cfg)).add(nn::batch_norm2d(p / "bn", c_out, Default::default()))
}

fn tch_resnet20(p: &nn::Path) -> nn::SequentialT {
    let mut net = nn::seq_t().add(conv_bn(&(p / "stem"), 3, 16, 3, 1)).add_fn(|x| x.relu());
    let mut c_in = 16;
    for (stage, (planes, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
        for b in 0..3 {
            let bp = p / format!("l{stage}b{b}");
            let s = if b == 0 { stride } else { 1 };
            let body = nn::seq_t().add(conv_bn(&(&bp / "a"), c_in, planes, 3, s)).add_fn(|x| x.relu()).add(conv_bn(&(&bp / "b"), planes, planes, 3, 1));
            let shortcut = (s != 1 || c_in != planes).then(|| conv_bn(&(&bp / "down"), c_in, planes, 1, s));
            net = net.add_fn_t(move |x, train| {
                let residual = shortcut.as_ref().map_or_else(|| x.shallow_clone(), |d| d.forward_t(x, train));
                (body.forward_t(x, train) + residual).relu()
            });
            c_in = planes;
        }
    }
    net.add_fn(|x| x.avg_pool2d_default(8).flatten(1, -1)).add(nn::linear(p / "fc", 64, 10, Default::default()))
}

fn time_tch(build: fn(&nn::Path) -> nn::SequentialT, data: &Dataset, batch: i64, steps: usize) -> f64 {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = build(&vs.root());
    let mut opt = nn::Sgd { momentum: 0.9, wd: 1e-4, ..Default::default() }.build(&vs, 0.01).unwrap();
    let n = data.len() as i64;
    let mut run = |count: usize| {
        for i in 0..count {
            let start = (i as i64 * batch) % (n - batch + 1);
            let x = data.images().unwrap().narrow(0, start, batch);
            let y = data.labels().narrow(0, start, batch);
            let loss = net.forward_t(&x, true).cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            let _ = loss.double_value(&[]);
        }
    };
    run(3);
    let t = Instant::now();
    run(steps);
    t.elapsed().as_secs_f64() * 1e3 / steps as f64
}

fn time_distill(arch: &str, dataset: &str, data: &Dataset, batch: usize, steps: usize, format: MemoryFormat) -> f64 {
    let mut model = distill::models::create_model(arch, dataset, Device::Cpu).unwrap();
    model.to_memory_format(format).unwrap();
    let mut opt = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    let warm = data.subset("warm", &(0..3 * batch as i64).collect::<Vec<_>>()).unwrap();
    let timed = data.subset("timed", &(0..(steps * batch) as i64).collect::<Vec<_>>()).unwrap();
    train_epoch(&mut model, &warm, &mut opt, None, 0, EpochSettings::quiet(batch, 0)).unwrap();
    let t = Instant::now();
    train_epoch(&mut model, &timed, &mut opt, None, 0, EpochSettings::quiet(batch, 0)).unwrap();
    t.elapsed().as_secs_f64() * 1e3 / steps as f64
}

/// An AGP schedule (5% → 90%) over every 2-D and 4-D weight of `model`.
fn agp_everything(model: &distill::nn::Model) -> Schedule {
    let weights = model.named_parameters().into_iter().filter(|(_, t)| matches!(t.dim(), 2 | 4)).map(|(n, _)| n).collect();
    Schedule::new()
        .pruner("all", PrunerConfig::AutomatedGradualPruner { initial_sparsity: 0.05, final_sparsity: 0.9, weights })
        .policy(PolicyConfig::pruner("all").epochs_range(0, 10, 1))
}

/// (ms per step without scheduler, ms per step with the AGP scheduler, ms per mask update), one model each.
fn time_agp(arch: &str, dataset: &str, data: &Dataset, batch: usize, steps: usize) -> (f64, f64, f64) {
    let timed = data.subset("timed", &(0..(steps * batch) as i64).collect::<Vec<_>>()).unwrap();
    let mut plain = distill::models::create_model(arch, dataset, Device::Cpu).unwrap();
    let mut model = distill::models::create_model(arch, dataset, Device::Cpu).unwrap();
    let mut scheduler = agp_everything(&model).build(&model).unwrap();
    let mut opt_plain = Optimizer::for_model(&plain, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    let mut opt = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    let updates = 5;
    let t = Instant::now();
    for epoch in 0..updates {
        scheduler.on_epoch_begin(&mut model, epoch, Some(&mut opt)).unwrap();
    }
    let update_ms = t.elapsed().as_secs_f64() * 1e3 / updates as f64;
    // Alternate the two loops so that machine noise hits both alike.
    let (mut base, mut agp) = (0.0, 0.0);
    for round in 0..3 {
        let t = Instant::now();
        train_epoch(&mut plain, &timed, &mut opt_plain, None, round, EpochSettings::quiet(batch, round as u64)).unwrap();
        base += t.elapsed().as_secs_f64();
        let t = Instant::now();
        train_epoch(&mut model, &timed, &mut opt, Some(&mut scheduler), updates - 1, EpochSettings::quiet(batch, round as u64)).unwrap();
        agp += t.elapsed().as_secs_f64();
    }
    let per_step = |s: f64| s * 1e3 / (3 * steps) as f64;
    (per_step(base), per_step(agp), update_ms)
}

/// What QAT costs on one model: the float and QAT ms/step (medians over rounds), the QAT/float ratio's median
/// and quartiles over rounds, and the calibration + PTQ time in ms.
struct QuantTiming {
    float_ms: f64,
    qat_ms: f64,
    ratio: (f64, f64, f64),
    ptq_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times float and QAT training in alternating rounds of `steps` steps each (which goes first alternates too),
/// so that the machine's drift and noise hit both alike; the ratio is taken round by round.
fn time_quantization(arch: &str, dataset: &str, data: &Dataset, batch: usize, steps: usize, rounds: usize) -> QuantTiming {
    let timed = data.subset("timed", &(0..(steps * batch) as i64).collect::<Vec<_>>()).unwrap();
    let mut plain = distill::models::create_model(arch, dataset, Device::Cpu).unwrap();
    let mut model = distill::models::create_model(arch, dataset, Device::Cpu).unwrap();
    let mut scheduler = Schedule::from_yaml_str(&qat_yaml("8", "8"), "qat.yaml").unwrap().build(&model).unwrap();
    let mut opt_plain = Optimizer::for_model(&plain, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    let mut opt = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    scheduler.on_epoch_begin(&mut model, 0, Some(&mut opt)).unwrap();
    let mut float_epoch = |round: usize| {
        let t = Instant::now();
        train_epoch(&mut plain, &timed, &mut opt_plain, None, round, EpochSettings::quiet(batch, round as u64)).unwrap();
        t.elapsed().as_secs_f64() * 1e3 / steps as f64
    };
    let mut qat_epoch = |round: usize| {
        let t = Instant::now();
        train_epoch(&mut model, &timed, &mut opt, Some(&mut scheduler), 0, EpochSettings::quiet(batch, round as u64)).unwrap();
        t.elapsed().as_secs_f64() * 1e3 / steps as f64
    };
    // Warm-up, not reported.
    float_epoch(0);
    qat_epoch(0);
    let (mut base, mut qat, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (b, q) = if round % 2 == 0 {
            let b = float_epoch(round);
            (b, qat_epoch(round))
        } else {
            let q = qat_epoch(round);
            (float_epoch(round), q)
        };
        base.push(b);
        qat.push(q);
        ratios.push(q / b);
    }
    ratios.sort_by(f64::total_cmp);
    let spread = (ratios[ratios.len() / 4], ratios[(3 * ratios.len()) / 4]);
    let calib = data.subset("calib", &(0..(4 * batch) as i64).collect::<Vec<_>>()).unwrap();
    let t = Instant::now();
    let stats = distill::quantization::stats::collect_activation_stats(&mut plain, &calib, 4, batch).unwrap();
    let config = distill::quantization::range_linear::PostTrainConfig { stats: Some(stats), ..Default::default() };
    distill::quantization::range_linear::PostTrainLinearQuantizer::new(config).prepare_model(&mut plain).unwrap();
    let ptq_ms = t.elapsed().as_secs_f64() * 1e3;
    QuantTiming { float_ms: median(base), qat_ms: median(qat), ratio: (median(ratios), spread.0, spread.1), ptq_ms }
}

/// The YAML of 8-bit range-linear QAT, with `null` for what is not quantized.
fn qat_yaml(activations: &str, weights: &str) -> String {
    format!(
        "quantizers:\n  q:\n    class: QuantAwareTrainRangeLinearQuantizer\n    bits_activations: {activations}\n    bits_weights: {weights}\n\
         policies:\n  - quantizer: {{instance_name: q}}\n    starting_epoch: 0\n    ending_epoch: 10\n    frequency: 1\n"
    )
}

/// LeNet's training step in its phases (forward with the loss, backward, optimizer step) for float and three QAT
/// variants, interleaved step by step on one fixed batch so that the machine's drift hits all alike; medians.
fn qat_phases_lenet(steps: usize) {
    let variants = [("float", None), ("QAT", Some(("8", "8"))), ("activations only", Some(("8", "null"))), ("weights only", Some(("null", "8")))];
    let mut runs = Vec::new();
    for (name, bits) in variants {
        let mut model = distill::models::create_model("lenet", "mnist", Device::Cpu).unwrap();
        let mut scheduler = bits.map(|(a, w)| Schedule::from_yaml_str(&qat_yaml(a, w), "qat.yaml").unwrap().build(&model).unwrap());
        let mut opt = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
        if let Some(s) = scheduler.as_mut() {
            s.on_epoch_begin(&mut model, 0, Some(&mut opt)).unwrap();
        }
        model.train();
        runs.push((name, model, opt, Vec::new()));
    }
    distill::train::retain_freed_memory();
    let x = Tensor::randn([64, 1, 28, 28], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [64], (Kind::Int64, Device::Cpu));
    for step in 0..steps + 10 {
        for (_, model, opt, times) in runs.iter_mut() {
            let t0 = Instant::now();
            let loss = model.forward(&x).unwrap().cross_entropy_for_logits(&y);
            let t1 = Instant::now();
            opt.zero_grad();
            loss.backward();
            let t2 = Instant::now();
            opt.step().unwrap();
            let t3 = Instant::now();
            if step >= 10 {
                times.push([t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64() * 1e3));
            }
        }
    }
    let total = |times: &[[f64; 3]]| median(times.iter().map(|t| t.iter().sum()).collect());
    let float = total(&runs[0].3);
    println!("{:<18} {:>10} {:>10} {:>10} {:>10} {:>9}", "LeNet, batch 64", "forward", "backward", "opt step", "total", "overhead");
    for (name, _, _, times) in &runs {
        let phase = |i: usize| median(times.iter().map(|t| t[i]).collect());
        let t = total(times);
        println!("{name:<18} {:>10.3} {:>10.3} {:>10.3} {t:>10.3} {:>8.1}%", phase(0), phase(1), phase(2), 100.0 * (t / float - 1.0));
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let steps: usize = if full { std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(30) } else { 4 };
    let rounds = if full { 9 } else { 1 };
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench train_step` for those)");
    }
    tch::manual_seed(0);
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    println!("threads: {}, steps per measurement: {steps}", tch::get_num_threads());
    println!("{:<16} {:>6} {:>14} {:>18} {:>8}", "model", "batch", "tch ms/step", "distill ms/step", "ratio");
    let cases: [(&str, &str, [i64; 3], usize, fn(&nn::Path) -> nn::SequentialT); 2] =
        [("lenet", "mnist", [1, 28, 28], 64, tch_lenet), ("resnet20_cifar", "cifar10", [3, 32, 32], 32, tch_resnet20)];
    for (arch, dataset, shape, batch, build) in cases {
        let data = Dataset::synthetic(steps * batch + 3 * batch, shape, 10, 1).unwrap();
        let plain = time_tch(build, &data, batch as i64, steps);
        let ours = time_distill(arch, dataset, &data, batch, steps, MemoryFormat::Contiguous);
        println!("{arch:<16} {batch:>6} {plain:>14.2} {ours:>18.2} {:>8.3}", ours / plain);
    }
    println!();
    println!("Channels-last layout (Model::to_memory_format), distill's step, the two layouts alternately ({rounds} rounds, medians):");
    println!("{:<16} {:>6} {:>18} {:>22} {:>8}", "model", "batch", "row-major ms/step", "channels-last ms/step", "ratio");
    for (arch, dataset, shape, batch) in [("lenet", "mnist", [1, 28, 28], 64), ("resnet20_cifar", "cifar10", [3, 32, 32], 32), ("resnet20_cifar", "cifar10", [3, 32, 32], 64)] {
        let data = Dataset::synthetic(steps * batch + 3 * batch, shape, 10, 1).unwrap();
        let (mut rows, mut last) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            rows.push(time_distill(arch, dataset, &data, batch, steps, MemoryFormat::Contiguous));
            last.push(time_distill(arch, dataset, &data, batch, steps, MemoryFormat::ChannelsLast));
        }
        let (rows, last) = (median(rows), median(last));
        println!("{arch:<16} {batch:>6} {rows:>18.2} {last:>22.2} {:>8.3}", last / rows);
    }
    println!();
    println!("AGP over every 2-D/4-D weight, per training step (masks applied before forward and after the step):");
    println!("{:<16} {:>6} {:>16} {:>14} {:>10} {:>18}", "model", "batch", "no sched ms/step", "AGP ms/step", "overhead", "mask update ms");
    for (arch, dataset, shape, batch, _) in cases {
        let data = Dataset::synthetic(steps * batch, shape, 10, 2).unwrap();
        let (base, agp, update) = time_agp(arch, dataset, &data, batch, steps);
        println!("{arch:<16} {batch:>6} {base:>16.2} {agp:>14.2} {:>9.1}% {update:>18.2}", 100.0 * (agp / base - 1.0));
    }
    println!();
    // Short rounds, many of them: the machine's speed drifts within seconds, and the closer in time a QAT round
    // and its float round are, the less the drift moves their ratio. ResNet-20's steps are long enough alone.
    let qat_plan = |arch: &str| if arch == "lenet" { (12 * rounds + 1, steps.div_ceil(6)) } else { (rounds, steps) };
    let ((lenet_rounds, lenet_steps), (resnet_rounds, resnet_steps)) = (qat_plan("lenet"), qat_plan("resnet20_cifar"));
    println!("Quantization: 8-bit QAT step against the float step (alternating rounds: {lenet_rounds} of {lenet_steps} steps for LeNet,");
    println!("{resnet_rounds} of {resnet_steps} for ResNet-20; medians, and the overhead's quartiles over rounds); calibration (4 batches, two");
    println!("passes) + PTQ:");
    let allocator = if distill::train::retain_freed_memory() { "retained (distill::train::retain_freed_memory)" } else { "glibc's defaults" };
    println!("freed memory: {allocator}");
    println!("{:<16} {:>6} {:>14} {:>12} {:>10} {:>18} {:>14}", "model", "batch", "float ms/step", "QAT ms/step", "overhead", "quartiles", "calib+PTQ ms");
    for (arch, dataset, shape, batch, _) in cases {
        let (qat_rounds, qat_steps) = qat_plan(arch);
        let data = Dataset::synthetic(steps * batch, shape, 10, 3).unwrap();
        let t = time_quantization(arch, dataset, &data, batch, qat_steps, qat_rounds);
        let pct = |r: f64| 100.0 * (r - 1.0);
        let range = format!("{:.1}% .. {:.1}%", pct(t.ratio.1), pct(t.ratio.2));
        println!("{arch:<16} {batch:>6} {:>14.2} {:>12.2} {:>9.1}% {range:>18} {:>14.1}", t.float_ms, t.qat_ms, pct(t.ratio.0), t.ptq_ms);
    }
    println!();
    println!("QAT's cost by phase, steps interleaved (ms, medians of {} steps):", 20 * steps);
    qat_phases_lenet(20 * steps);
}
