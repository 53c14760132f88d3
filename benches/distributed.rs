//! Data-parallel scaling on this machine: training steps per second of LeNet (MNIST shapes) and resnet20 (CIFAR
//! shapes) in one process with one and with two libtorch threads, against two ranks joined by c10d's Gloo over
//! localhost, each rank one thread (`OMP_NUM_THREADS=1` is set below), with the same global mini-batch; and the time
//! of one gradient all-reduce (DistributedDataParallel's step cost) per model. The ranks run as threads of this process, each with its own
//! process group, as PyTorch's own multi-threaded c10d tests do.
//!
//! `cargo bench --bench distributed`. Run by `cargo test --all-targets` (without cargo bench's `--bench` flag) it
//! makes a short smoke run instead.
use std::thread;
use std::time::{Duration, Instant};

use distill::data::Dataset;
use distill::distributed::{data_parallel, ProcessGroup, Rendezvous};
use distill::models::create_model;
use distill::optim::{Optimizer, OptimizerConfig};
use distill::train::{train_epoch, EpochSettings};
use tch::Device;

struct Figures {
    seconds: f64,
    all_reduce_ms: Option<f64>,
}

/// One rank's timed epochs over `data` with a global mini-batch of `batch`.
fn rank_run(arch: &str, dataset: &str, data: &Dataset, batch: usize, epochs: usize, group: Option<&ProcessGroup>) -> Figures {
    let mut model = create_model(arch, dataset, Device::Cpu).unwrap();
    let mut optimizer = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    let settings = |epoch: u64| EpochSettings { group, ..EpochSettings::quiet(batch, epoch) };
    train_epoch(&mut model, data, &mut optimizer, None, 0, settings(0)).unwrap(); // warm-up
    if let Some(g) = group {
        g.barrier().unwrap();
    }
    let started = Instant::now();
    for epoch in 1..=epochs {
        train_epoch(&mut model, data, &mut optimizer, None, epoch, settings(epoch as u64)).unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let all_reduce_ms = group.map(|g| {
        let local = batch / g.world_size();
        let mut times: Vec<f64> = (0..30)
            .map(|_| {
                let t = Instant::now();
                data_parallel::average_gradients(g, &optimizer, local, batch).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    });
    Figures { seconds, all_reduce_ms }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        println!("smoke run (figures are not measurements; `cargo bench --bench distributed` for those)");
    }
    // One libtorch thread per rank, so that two ranks use the two cores one process would use with two threads.
    std::env::set_var("OMP_NUM_THREADS", "1");
    tch::set_num_threads(1);
    let cases: [(&str, &str, [i64; 3], usize, usize); 2] = [("lenet", "mnist", [1, 28, 28], 64, 64 * 40), ("resnet20_cifar", "cifar10", [3, 32, 32], 64, 64 * 8)];
    println!("{:<16} {:>6} {:>17} {:>10} {:>10} {:>9} {:>16}", "model", "batch", "processes", "steps/s", "samples/s", "speed-up", "all-reduce (ms)");
    for (arch, dataset, shape, batch, samples) in cases {
        let samples = if full { samples } else { batch * 2 };
        let epochs = if full { 3 } else { 1 };
        let data = Dataset::synthetic(samples, shape, 10, 1).unwrap();
        let steps = (epochs * data.steps(batch)) as f64;
        let one = rank_run(arch, dataset, &data, batch, epochs, None);
        // The other way to use two cores: one process, two libtorch threads.
        tch::set_num_threads(2);
        let threads = rank_run(arch, dataset, &data, batch, epochs, None);
        tch::set_num_threads(1);
        let handles: Vec<_> = Rendezvous::local_world(2, Duration::from_secs(120))
            .unwrap()
            .into_iter()
            .map(|rendezvous| {
                thread::spawn(move || {
                    let data = Dataset::synthetic(samples, shape, 10, 1).unwrap();
                    tch::set_num_threads(1);
                    let group = ProcessGroup::new(&rendezvous).unwrap();
                    rank_run(arch, dataset, &data, batch, epochs, Some(&group))
                })
            })
            .collect();
        let two: Vec<Figures> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let two_seconds = two.iter().map(|f| f.seconds).fold(0.0, f64::max);
        let all_reduce = two.iter().filter_map(|f| f.all_reduce_ms).fold(0.0, f64::max);
        println!("{arch:<16} {batch:>6} {:>17} {:>10.2} {:>10.1} {:>9} {:>16}", "1 (1 thread)", steps / one.seconds, steps * batch as f64 / one.seconds, "1.00", "-");
        println!(
            "{arch:<16} {batch:>6} {:>17} {:>10.2} {:>10.1} {:>9.2} {:>16}",
            "1 (2 threads)",
            steps / threads.seconds,
            steps * batch as f64 / threads.seconds,
            one.seconds / threads.seconds,
            "-"
        );
        println!(
            "{arch:<16} {batch:>6} {:>17} {:>10.2} {:>10.1} {:>9.2} {:>16.3}",
            "2 ranks",
            steps / two_seconds,
            steps * batch as f64 / two_seconds,
            one.seconds / two_seconds,
            all_reduce
        );
    }
}
