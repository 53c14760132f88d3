//! Low-bit post-training quantization of one trained network, with three sets of calibration samples: top-1 drop
//! of plain min/max PTQ against AdaRound at W4A8 and W3A8 (weights per channel, asymmetric; activations 8 bits).
//!
//! ```text
//! cargo run --release --example low_bit_ptq -- ARCH [EPOCHS] [ADAROUND_ITERATIONS]
//! cargo run --release --example low_bit_ptq -- simplenet_mnist 10 2000
//! cargo run --release --example low_bit_ptq -- resnet20_cifar 6 500
//! ```
//!
//! The network trains on the bundled digits (a CIFAR-shaped network sees them padded to 32×32 and repeated on
//! three channels: the project has no CIFAR-10). Each calibration seed draws 256 training digits; the test digits
//! (500) give every top-1. One digit is 0.2 points.
use distill::data::Dataset;
use distill::prelude::*;

/// Digits as the network's input shape: as they are, or padded to 32×32 and repeated on three channels.
fn shaped(data: &Dataset, shape: &[i64]) -> distill::Result<Dataset> {
    if shape == data.sample_shape().as_slice() {
        return Ok(data.subset(data.name().to_string(), &(0..data.len() as i64).collect::<Vec<_>>())?);
    }
    let images = data.images()?;
    let (h, w) = (shape[1] - images.size()[2], shape[2] - images.size()[3]);
    let padded = images.f_constant_pad_nd([w / 2, w - w / 2, h / 2, h - h / 2])?.f_repeat([1, shape[0], 1, 1])?;
    Dataset::new(data.name(), padded, data.labels().shallow_clone(), data.num_classes())
}

/// 256 training samples drawn without replacement by `seed`.
fn calibration_samples(train: &Dataset, seed: i64) -> distill::Result<Dataset> {
    tch::manual_seed(seed);
    let order = tch::Tensor::f_randperm(train.len() as i64, (tch::Kind::Int64, Device::Cpu))?.f_narrow(0, 0, 256)?;
    train.subset(format!("calibration-{seed}"), &Vec::<i64>::try_from(&order)?)
}

fn main() -> distill::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let arch = args.first().map(String::as_str).unwrap_or("simplenet_mnist");
    let epochs: usize = args.get(1).map_or(Ok(10), |e| e.parse()).map_err(|_| distill::Error::invalid("EPOCHS", "a whole number"))?;
    let iterations: usize = args.get(2).map_or(Ok(2000), |e| e.parse()).map_err(|_| distill::Error::invalid("ADAROUND_ITERATIONS", "a whole number"))?;
    let dataset = if arch.ends_with("_cifar") { "cifar10" } else { "mnist" };
    let digits = distill::data::mnist_bundled()?;
    tch::manual_seed(1);
    let mut model = create_model(arch, dataset, Device::Cpu)?;
    let shape = model.info().input_shape.clone();
    let data = DataSplits {
        train: shaped(&digits.train, &shape)?,
        valid: shaped(&digits.valid, &shape)?,
        test: shaped(&digits.test, &shape)?,
    };
    let config = TrainConfig { epochs, lr: 0.05, batch_size: 32, seed: 1, progress: Progress::Quiet, ..TrainConfig::default() };
    let started = std::time::Instant::now();
    let float = fit(&mut model, &data, None, &config)?.test.top1;
    println!("{arch}: float top-1 {float:.2}% after {epochs} epochs ({:.0} s); AdaRound {iterations} iterations per layer", started.elapsed().as_secs_f64());
    let head = "quantizers:\n  q:\n    class: PostTrainLinearQuantizer\n    per_channel_wts: true\n    mode: ASYMMETRIC_UNSIGNED\n";
    println!("{:<5} {:<9} {:>6} {:>7} {:>7} {:>7}", "bits", "method", "seed", "top-1", "drop", "seconds");
    let mut rows = Vec::new();
    for bits in [4, 3] {
        for (method, extra) in [("min/max", String::new()), ("AdaRound", format!("    adaround: {{iterations: {iterations}, samples: 256}}\n"))] {
            let mut drops = Vec::new();
            for seed in [1i64, 2, 3] {
                let calibration_data = calibration_samples(&data.train, seed)?;
                let yaml = format!("{head}    bits_parameters: {bits}\n{extra}");
                let config = PostTrainConfig::from_yaml_str(&yaml, "ptq.yaml")?;
                let mut q = copy_model(&model)?;
                let started = std::time::Instant::now();
                PostTrainLinearQuantizer::new(config).quantize(&mut q, Some(&Calibration::new(&calibration_data, 2, 128)))?;
                let seconds = started.elapsed().as_secs_f64();
                let top1 = distill::train::validate(&mut q, &data.test, 256)?.top1;
                println!("{:<5} {:<9} {:>6} {:>6.2}% {:>7.2} {:>7.1}", format!("W{bits}A8"), method, seed, top1, float - top1, seconds);
                drops.push(float - top1);
            }
            let mean = drops.iter().sum::<f64>() / drops.len() as f64;
            let (lo, hi) = drops.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &d| (l.min(d), h.max(d)));
            rows.push((bits, method, mean, lo, hi));
        }
    }
    println!("\nmean top-1 drop over the three calibration sets (lowest to highest), float {float:.2}%:");
    for (bits, method, mean, lo, hi) in &rows {
        println!("  W{bits}A8 {method:<9} {mean:>5.2} points ({lo:.2} to {hi:.2})");
    }
    for bits in [4, 3] {
        let drop = |m: &str| rows.iter().find(|r| r.0 == bits && r.1 == m).map_or(f64::NAN, |r| r.2);
        println!("  W{bits}A8: AdaRound's mean drop is {:.2} of min/max's", drop("AdaRound") / drop("min/max"));
    }
    Ok(())
}
