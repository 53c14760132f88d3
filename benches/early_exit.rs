//! Early exit: what leaving early saves at evaluation time. LeNet and Simplenet are trained with their zoo exit
//! on the bundled MNIST digits (5 epochs, loss weight 0.3 on the exit), the entropy threshold is set where 60% of
//! the validation digits would leave, and the test digits are evaluated three ways, interleaved so that noise
//! hits all alike: the network without its exit, the network computing every exit for every sample (Distiller),
//! and distill's pass that takes leaving samples out of the batch. Printed: ms per batch (100 digits, and 1),
//! the share that left, accuracies and MACs.
//!
//! `cargo bench --bench early_exit`. Run by `cargo test --all-targets` (without `--bench`) it makes a short smoke
//! run instead.
use std::time::Instant;

use distill::data::Dataset;
use distill::early_exit::{attach_exits, evaluate, exit_scores, forward_exits, predict, EarlyExit, ExitCriterion};
use distill::models::{create_model, zoo_exits};
use distill::nn::Model;
use distill::optim::OptimizerConfig;
use distill::train::{fit, Progress, TrainConfig};
use tch::{Device, Tensor};

/// Milliseconds per batch of `batch` test digits for each of the three passes, best of `rounds` interleaved rounds.
fn timings(plain: &Model, model: &mut Model, ee: &EarlyExit, test: &Dataset, batch: usize, limit: usize, rounds: usize) -> [f64; 3] {
    let batches: Vec<(Tensor, Tensor)> = test.batches(batch, Device::Cpu).unwrap().take(limit).map(|b| b.unwrap()).collect();
    let mut best = [f64::INFINITY; 3];
    for _ in 0..rounds {
        for which in 0..3 {
            let t = Instant::now();
            for (x, y) in &batches {
                match which {
                    0 => drop(tch::no_grad(|| plain.forward_t(x, false)).unwrap()),
                    1 => drop(tch::no_grad(|| forward_exits(model, x, false)).unwrap()),
                    _ => drop(predict(model, x, ee, Some(y)).unwrap()),
                }
            }
            best[which] = best[which].min(t.elapsed().as_secs_f64() * 1e3 / batches.len() as f64);
        }
    }
    best
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench early_exit` for those)");
    }
    tch::set_num_threads(1);
    let data = distill::data::mnist_bundled().unwrap();
    let epochs = if full { 5 } else { 1 };
    for arch in ["lenet", "simplenet_mnist"] {
        tch::manual_seed(1);
        let mut model = create_model(arch, "mnist", Device::Cpu).unwrap();
        attach_exits(&mut model, &zoo_exits(arch).unwrap()).unwrap();
        let train = EarlyExit::new(vec![0.3], vec![0.5]).unwrap();
        let d = distill::models::training_defaults(arch, "mnist");
        let config = TrainConfig { epochs, lr: d.lr, batch_size: d.batch_size, optimizer: OptimizerConfig::sgd(d.momentum, d.weight_decay), progress: Progress::Quiet, early_exit: Some(train), ..TrainConfig::default() };
        fit(&mut model, &data, None, &config).unwrap();
        let threshold = exit_scores(&mut model, &data.valid, 100).unwrap().quantile(ExitCriterion::Entropy, 0, 0.6).unwrap();
        let ee = EarlyExit::new(vec![0.3], vec![threshold]).unwrap().with_criterion(ExitCriterion::Entropy);
        let stats = evaluate(&mut model, &data.test, 100, &ee).unwrap();
        let scores = exit_scores(&mut model, &data.test, 100).unwrap();
        let final_alone = 100.0 * scores.hit1[1].iter().filter(|h| **h).count() as f64 / scores.len() as f64;
        let mut plain = create_model(arch, "mnist", Device::Cpu).unwrap();
        plain.load_state_dict(&model.state_dict(), false).unwrap();
        println!(
            "{arch}: entropy threshold {threshold:.4}: {:.1}% of the test digits leave at '{}'; top-1 {:.1}% with exits vs {final_alone:.1}% final exit alone; MACs per digit {:.0} vs {} ({:.1}% saved)",
            stats.exits[0].percent,
            stats.exits[0].exit,
            stats.overall.top1,
            stats.macs_per_sample,
            stats.macs_without_exits,
            100.0 * stats.macs_saved()
        );
        for (batch, limit) in [(100, 5), (1, 200)] {
            let rounds = if full { 7 } else { 1 };
            let limit = if full { limit } else { limit.min(2) };
            let [plain_ms, all_ms, skip_ms] = timings(&plain, &mut model, &ee, &data.test, batch, limit, rounds);
            println!(
                "  batch {batch:>3}: without exits {plain_ms:.3} ms, every exit computed {all_ms:.3} ms ({:.2}x), leaving samples skip the rest {skip_ms:.3} ms ({:.2}x of without exits)",
                all_ms / plain_ms,
                skip_ms / plain_ms
            );
        }
    }
}
