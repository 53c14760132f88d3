//! Data-parallel training on c10d (Gloo over localhost): the bridge's collectives, the launch variables and their
//! errors, a dead peer, sharded batches, and a 2-rank run against one process; then the CLI's `--nproc`, a
//! killed rank and `--resume`.
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use distill::config::Schedule;
use distill::data::{DataSplits, Dataset, RandomCrop};
use distill::distributed::{launch::free_local_port, ProcessGroup, ReduceOp, Rendezvous};
use distill::models::create_model;
use distill::train::{Progress, TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

/// The tests of this file one at a time, whatever the harness's thread count: `free_local_port` hands out a port
/// that is free *now*, and two tests running side by side could be handed the same one and join each other's
/// rendezvous.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static NETWORK: Mutex<()> = Mutex::new(());
    NETWORK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `body` on `world` ranks, one thread each, joined through a rendezvous on a local port that rank 0's store
/// serves on a socket bound beforehand (as `distill train --nproc` hands it over).
fn on_ranks<T: Send + 'static>(world: usize, body: impl Fn(ProcessGroup) -> T + Send + Sync + 'static) -> Vec<T> {
    let body = Arc::new(body);
    let handles: Vec<_> = Rendezvous::local_world(world, Duration::from_secs(60))
        .unwrap()
        .into_iter()
        .map(|rendezvous| {
            let body = body.clone();
            thread::spawn(move || body(ProcessGroup::new(&rendezvous).unwrap()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[test]
fn collectives_combine_every_rank() {
    let _one_at_a_time = one_at_a_time();
    let results = on_ranks(3, |g| {
        let r = g.rank() as f32 + 1.0;
        let reduce = |op| {
            let mut t = Tensor::from_slice(&[r, 10.0 * r]);
            g.all_reduce(&mut t, op).unwrap();
            values(&t)
        };
        let (sum, product, min, max) = (reduce(ReduceOp::Sum), reduce(ReduceOp::Product), reduce(ReduceOp::Min), reduce(ReduceOp::Max));
        let mut ints = Tensor::from_slice(&[g.rank() as i64 + 1]);
        g.all_reduce(&mut ints, ReduceOp::Sum).unwrap();
        let mut b = Tensor::from_slice(&[r; 4]).view([2, 2]);
        g.broadcast(&mut b, 2).unwrap();
        let gathered: Vec<Vec<f64>> = g.all_gather(&Tensor::from_slice(&[g.rank() as f64, 2.0 * g.rank() as f64])).unwrap().iter().map(values).collect();
        g.barrier().unwrap();
        (sum, product, min, max, ints.int64_value(&[0]), values(&b), gathered)
    });
    for (sum, product, min, max, ints, b, gathered) in results {
        assert_eq!(sum, [6.0, 60.0]);
        assert_eq!(product, [6.0, 6000.0]);
        assert_eq!(min, [1.0, 10.0]);
        assert_eq!(max, [3.0, 30.0]);
        assert_eq!(ints, 6);
        assert_eq!(b, [3.0; 4], "rank 2's tensor everywhere");
        assert_eq!(gathered, vec![vec![0.0, 0.0], vec![1.0, 2.0], vec![2.0, 4.0]]);
    }
}

#[test]
fn collectives_refuse_bad_tensors_and_roots() {
    let _one_at_a_time = one_at_a_time();
    let errors = on_ranks(2, |g| {
        let mut strided = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)).tr();
        let a = g.all_reduce(&mut strided, ReduceOp::Sum).unwrap_err().to_string();
        let mut t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let b = g.broadcast(&mut t, 2).unwrap_err().to_string();
        (a, b)
    });
    for (a, b) in errors {
        assert!(a.contains("not contiguous"), "{a}");
        assert!(b.contains("2 is not a rank of this group of 2"), "{b}");
    }
}

#[test]
fn launch_variables_are_read_like_torchrun_and_checked() {
    let _one_at_a_time = one_at_a_time();
    let env = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Rendezvous::from_vars(move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    };
    assert_eq!(env(&[]).unwrap(), None, "no launcher: a plain run");
    let ok = env(&[("RANK", "1"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "10.0.0.7"), ("MASTER_PORT", "29500"), ("LOCAL_RANK", "1"), ("DISTILL_DIST_TIMEOUT", "90")])
        .unwrap()
        .unwrap();
    assert_eq!(
        ok,
        Rendezvous { master_addr: "10.0.0.7".into(), master_port: 29500, rank: 1, world_size: 4, local_rank: 1, timeout: Duration::from_secs(90), listen_fd: None }
    );
    let handed = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("DISTILL_MASTER_LISTEN_FD", "7")]).unwrap().unwrap();
    assert_eq!(handed.listen_fd, Some(7));
    let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
    let with = |key: &str, value: &str| -> String {
        let pairs: Vec<(&str, &str)> = base.iter().map(|&(k, v)| if k == key { (k, value) } else { (k, v) }).collect();
        env(&pairs).unwrap_err().to_string()
    };
    let without = |key: &str| -> String {
        let pairs: Vec<(&str, &str)> = base.iter().copied().filter(|&(k, _)| k != key).collect();
        env(&pairs).unwrap_err().to_string()
    };
    for (message, expected) in [
        (with("RANK", "2"), "RANK=2 is outside WORLD_SIZE=2"),
        (with("RANK", "-1"), "RANK=\"-1\" is not a non-negative integer"),
        (with("WORLD_SIZE", "0"), "WORLD_SIZE=0 must lie in 1..="),
        (with("WORLD_SIZE", "99999999"), "must lie in 1..="),
        (with("MASTER_PORT", "70000"), "MASTER_PORT=\"70000\" is not a port number"),
        (with("MASTER_PORT", "0"), "is not a port number"),
        (with("MASTER_ADDR", " "), "MASTER_ADDR is not set"),
        (without("WORLD_SIZE"), "WORLD_SIZE is not set"),
        (without("MASTER_PORT"), "MASTER_PORT is not set"),
        (without("MASTER_ADDR"), "MASTER_ADDR is not set"),
        (env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("DISTILL_MASTER_LISTEN_FD", "7")]).unwrap_err().to_string(), "only rank 0 serves the rendezvous"),
        (env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1"), ("DISTILL_MASTER_LISTEN_FD", "x")]).unwrap_err().to_string(), "DISTILL_MASTER_LISTEN_FD=\"x\" is not a file descriptor"),
    ] {
        assert!(message.starts_with("distributed: "), "{message}");
        assert!(message.contains(expected), "expected '{expected}' in: {message}");
    }
    let timeout = env(&[("DISTILL_DIST_TIMEOUT", "-3"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err();
    assert!(timeout.to_string().contains("DISTILL_DIST_TIMEOUT=\"-3\""), "{timeout}");
}

#[test]
fn a_bad_rendezvous_fails_within_its_timeout() {
    let _one_at_a_time = one_at_a_time();
    let short = |rank, world, port| Rendezvous { timeout: Duration::from_secs(3), ..Rendezvous::local(rank, world, port) };
    // Nobody serves the rendezvous.
    let started = Instant::now();
    let e = ProcessGroup::new(&short(1, 2, free_local_port().unwrap())).unwrap_err().to_string();
    assert!(e.contains("rank 1 could not join the rendezvous at 127.0.0.1"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    // The port is taken.
    let taken = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let started = Instant::now();
    let e = ProcessGroup::new(&short(0, 1, port)).unwrap_err().to_string();
    assert!(e.contains("rank 0 could not join the rendezvous"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

/// A rank that cannot reach its rendezvous ends with distill's one-line error, not with c10d's log of every
/// failed try and its C++ stack trace; `TORCH_CPP_LOG_LEVEL` still brings c10d's own lines back for debugging.
#[test]
fn an_unreachable_rendezvous_is_one_clear_error_on_stderr() {
    let _one_at_a_time = one_at_a_time();
    let dir = distill::io::TempDir::new().unwrap();
    let run = |debug: bool| {
        let out = dir.path().join(if debug { "debug" } else { "quiet" });
        let mut cmd = distill_cmd(&["train", "--arch", "lenet", "--dataset", "mnist", "--epochs", "1", "--progress", "quiet", "--out", out.to_str().unwrap()]);
        let port = free_local_port().unwrap().to_string();
        cmd.env("RANK", "1").env("WORLD_SIZE", "2").env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", &port).env("DISTILL_DIST_TIMEOUT", "3");
        if debug {
            cmd.env("TORCH_CPP_LOG_LEVEL", "INFO");
        } else {
            cmd.env_remove("TORCH_CPP_LOG_LEVEL");
        }
        let output = cmd.output().unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let quiet = run(false);
    assert!(quiet.contains("could not join the rendezvous at 127.0.0.1"), "{quiet}");
    assert!(!quiet.contains("[c10d]") && !quiet.contains("frame #") && !quiet.contains("socket.cpp"), "c10d's log lines on stderr:\n{quiet}");
    let debug = run(true);
    assert!(debug.contains("[c10d]"), "TORCH_CPP_LOG_LEVEL=INFO shows c10d's lines:\n{debug}");
}

#[test]
fn a_rank_claimed_twice_is_refused() {
    let _one_at_a_time = one_at_a_time();
    let port = free_local_port().unwrap();
    let handles: Vec<_> = [0, 1, 1]
        .into_iter()
        .map(|rank| thread::spawn(move || ProcessGroup::new(&Rendezvous { timeout: Duration::from_secs(20), ..Rendezvous::local(rank, 2, port) }).map(|_| ())))
        .collect();
    let errors: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap().err()).map(|e| e.to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("two processes claim RANK=1")), "{errors:?}");
}

#[test]
fn ranks_with_different_world_sizes_are_refused_at_once() {
    let _one_at_a_time = one_at_a_time();
    let port = free_local_port().unwrap();
    let started = Instant::now();
    let handles: Vec<_> = [(0, 2), (1, 3)]
        .into_iter()
        .map(|(rank, world)| thread::spawn(move || ProcessGroup::new(&Rendezvous { timeout: Duration::from_secs(60), ..Rendezvous::local(rank, world, port) }).map(|_| ())))
        .collect();
    // Both fail; rank 1 may see rank 0's store close before it reads rank 0's size, so only one message is certain.
    let errors: Vec<String> = handles.into_iter().map(|h| h.join().unwrap().unwrap_err().to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("with WORLD_SIZE=2") && e.contains("give every process the same WORLD_SIZE")), "{errors:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?} (the timeout is 60 s)", started.elapsed());
}

#[test]
fn a_collective_with_a_dead_peer_fails_instead_of_hanging() {
    let _one_at_a_time = one_at_a_time();
    let results = on_ranks(2, |g| {
        if g.rank() == 1 {
            drop(g); // closes its connections, as a killed process's do
            return None;
        }
        thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let e = g.all_reduce(&mut t, ReduceOp::Sum).unwrap_err().to_string();
        Some((e, started.elapsed()))
    });
    let (e, took) = results[0].clone().unwrap();
    assert!(e.contains("all_reduce on rank 0 of 2 failed"), "{e}");
    assert!(took < Duration::from_secs(50), "took {took:?}");
}

#[test]
fn shards_together_are_the_single_process_batches_with_their_augmentation() {
    let _one_at_a_time = one_at_a_time();
    // Sample i is a 3x3 image of value i + 1; a 1-pixel random crop with flips moves zeros in from the border.
    let n = 103;
    let images = Tensor::arange(n, (Kind::Float, Device::Cpu)).f_add_scalar(1.0).unwrap().view([n, 1, 1, 1]).expand([n, 1, 3, 3], false).contiguous();
    let labels = Tensor::zeros([n], (Kind::Int64, Device::Cpu));
    let data = Dataset::new("ids", images, labels, 2).unwrap().with_augmentation(Some(RandomCrop { padding: 1, fill: 0.0, horizontal_flip: true }));
    let id = |x: &Tensor| x.amax([1, 2, 3], false).to_kind(Kind::Int64);
    let (batch, seed) = (16, 7);
    let single: Vec<Tensor> = data.train_batches(batch, seed, Device::Cpu).unwrap().map(|b| b.unwrap().0).collect();
    // 103 = 6 × 16 + 7: the last global batch has 7 samples, enough for 3 ranks; 4 × 26 ranks would leave it out.
    assert_eq!(data.shard_steps(batch, 3), 7);
    assert_eq!(data.shard_steps(batch, 8), 6);
    let world = 3;
    let shards: Vec<Vec<Tensor>> =
        (0..world).map(|r| data.train_shard_batches(batch, seed, r, world, Device::Cpu).unwrap().map(|b| b.unwrap().0).collect()).collect();
    for (step, whole) in single.iter().enumerate() {
        let ids = Vec::<i64>::try_from(id(whole)).unwrap();
        let mut seen = 0;
        for (r, shard) in shards.iter().enumerate() {
            let part = &shard[step];
            let part_ids = Vec::<i64>::try_from(id(part)).unwrap();
            let expected: Vec<i64> = ids.iter().skip(r).step_by(world).copied().collect();
            assert_eq!(part_ids, expected, "step {step}, rank {r}");
            for (k, _) in part_ids.iter().enumerate() {
                assert!(part.get(k as i64).equal(&whole.get((r + k * world) as i64)), "step {step}, rank {r}: the same crop as in one process");
            }
            seen += part_ids.len();
        }
        assert_eq!(seen, ids.len());
    }
    assert!(data.train_shard_batches(2, seed, 0, 3, Device::Cpu).is_err(), "fewer samples per batch than ranks");
    assert!(data.train_shard_batches(16, seed, 3, 3, Device::Cpu).is_err(), "rank outside the world");
}

/// LeNet under a schedule of `schedules/` (lr 0.02, global batch 64) on the first `samples` training digits, on one
/// process or as one rank of a group. Returns the parameters and buffers, and the masks.
type LenetRun = (Vec<(String, Tensor)>, Vec<(String, Tensor)>);

fn lenet_run(schedule: &str, group: Option<Arc<ProcessGroup>>, samples: i64, epochs: usize) -> LenetRun {
    lenet_run_in(Kind::Float, schedule, group, samples, epochs)
}

/// [`lenet_run`] with the model's parameters (and so its computation) in `kind`.
fn lenet_run_in(kind: Kind, schedule: &str, group: Option<Arc<ProcessGroup>>, samples: i64, epochs: usize) -> LenetRun {
    static INIT: Mutex<()> = Mutex::new(());
    let mut model = {
        // libtorch's generator is global: ranks in threads draw their initial weights one at a time.
        let _drawing = INIT.lock().unwrap();
        tch::manual_seed(1);
        create_model("lenet", "mnist", Device::Cpu).unwrap()
    };
    model.to_kind(kind).unwrap();
    let d = distill::data::mnist_bundled().unwrap();
    let data = DataSplits { train: d.train.subset("train", &(0..samples).collect::<Vec<_>>()).unwrap(), valid: d.valid, test: d.test };
    let path = if schedule.starts_with('/') { schedule.to_string() } else { format!("{}/schedules/{schedule}", env!("CARGO_MANIFEST_DIR")) };
    let mut scheduler = Schedule::from_file(path).unwrap().build(&model).unwrap();
    let config = TrainConfig { epochs, batch_size: 64, lr: 0.02, progress: Progress::Quiet, distributed: group, ..TrainConfig::default() };
    Trainer::new(&mut model, config).unwrap().with_scheduler(&mut scheduler).run(&data).unwrap();
    (model.state_dict(), scheduler.masks().tensors())
}

fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-12)
}

/// [`lenet_run`] in one process, then on two ranks: (one process's result, each rank's).
fn one_process_and_two_ranks(schedule: &str, samples: i64, epochs: usize) -> (LenetRun, Vec<LenetRun>) {
    let single = lenet_run(schedule, None, samples, epochs);
    let schedule = schedule.to_string();
    (single, on_ranks(2, move |g| lenet_run(&schedule, Some(Arc::new(g)), samples, epochs)))
}

/// Checks the ranks' tensors bit-identical to each other, and each floating-point one within 1e-5 relative of one
/// process's.
fn assert_ranks_agree_and_match(ranks: &[LenetRun], single: &[(String, Tensor)]) {
    assert_eq!(ranks[0].0.len(), single.len());
    for (((name, a), (_, b)), (_, c)) in ranks[0].0.iter().zip(&ranks[1].0).zip(single) {
        assert!(a.equal(b), "{name}: bit-identical on both ranks");
        assert_eq!(a.size(), c.size(), "{name}: the same shape as in one process");
        if a.is_floating_point() {
            let relative = relative_difference(a, c);
            assert!(relative <= 1e-5, "{name}: relative difference {relative:e} from one process");
        }
    }
}

/// 651 digits: ten global batches of 64 and a last one of 11, shared 6 + 5, so the gradient weights differ. Two
/// epochs: the second epoch's AGP masks come from trained weights. (Over a whole epoch of 4,000 digits the runs
/// drift apart to about 1e-2, as far as one process with 1 and with 2 libtorch threads drift apart: summation order
/// differs, and a ReLU that flips turns a rounding difference into a real one. README, Distributed training.)
#[test]
fn two_ranks_of_32_train_as_one_process_of_64() {
    let _one_at_a_time = one_at_a_time();
    let ((single, single_masks), ranks) = one_process_and_two_ranks("lenet_agp.yaml", 651, 2);
    assert_ranks_agree_and_match(&ranks, &single);
    let (m0, m1) = (&ranks[0].1, &ranks[1].1);
    assert_eq!(m0.len(), 3, "three pruned weights");
    for ((name, a), (_, b)) in m0.iter().zip(m1) {
        assert!(a.equal(b), "{name}: the ranks' masks are bit-identical");
    }
    for ((name, a), (_, b)) in m0.iter().zip(&single_masks) {
        assert!(a.equal(b), "{name}: the same mask as one process");
        assert!(a.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]) < 0.9, "{name} is pruned");
    }
}

/// The check over whole epochs: two epochs of every training digit under AGP (the second epoch's masks come
/// from trained weights), two ranks of 32 against one process of 64, the same sample order. In float32 the runs
/// drift apart as one process with 1 and with 2 threads does (above); in float64 a rounding difference starts nine
/// orders of magnitude smaller, so what is compared is the algorithm: averaged gradients and identical masks.
/// Weights agree within 1e-5 relative (the test prints the largest difference), masks bit-identical.
#[test]
fn two_ranks_of_32_train_as_one_process_of_64_for_whole_epochs_in_float64() {
    let _one_at_a_time = one_at_a_time();
    let samples = distill::data::mnist_bundled().unwrap().train.len() as i64;
    let single = lenet_run_in(Kind::Double, "lenet_agp.yaml", None, samples, 2);
    let ranks = on_ranks(2, move |g| lenet_run_in(Kind::Double, "lenet_agp.yaml", Some(Arc::new(g)), samples, 2));
    let mut largest = 0.0f64;
    for ((name, a), (_, c)) in ranks[0].0.iter().zip(&single.0) {
        if a.is_floating_point() {
            assert_eq!(a.kind(), Kind::Double, "{name} trained in float64");
            largest = largest.max(relative_difference(a, c));
        }
    }
    println!("largest relative difference from one process after two epochs in float64: {largest:e}");
    assert_ranks_agree_and_match(&ranks, &single.0);
    for ((name, a), (_, b)) in ranks[0].1.iter().zip(&single.1) {
        assert!(a.equal(b), "{name}: the same mask as one process");
    }
}

/// PACT's clip values are parameters: their gradients are averaged like the weights'. LeNet's QAT modules carry
/// buffers too (the weights' quantization state), which rank 0 broadcasts.
#[test]
fn quantization_aware_training_with_learned_clip_values_runs_on_two_ranks_as_in_one_process() {
    let _one_at_a_time = one_at_a_time();
    let ((single, _), ranks) = one_process_and_two_ranks("lenet_pact4.yaml", 320, 1);
    let clip: Vec<&String> = single.iter().map(|(n, _)| n).filter(|n| n.contains("clip_val")).collect();
    assert!(!clip.is_empty(), "PACT's clip values are in the state: {:?}", single.iter().map(|(n, _)| n).collect::<Vec<_>>());
    assert_ranks_agree_and_match(&ranks, &single);
}

/// Filter pruning, then thinning at the start of epoch 2: every rank removes the same filters from the model, the
/// optimizer's momentum and the masks, and training goes on in the smaller network.
#[test]
fn thinning_during_training_happens_alike_on_every_rank() {
    let _one_at_a_time = one_at_a_time();
    let dir = distill::io::TempDir::new().unwrap();
    let schedule = dir.path().join("thin.yaml");
    std::fs::write(
        &schedule,
        "version: 1\npruners:\n  filters:\n    class: L1RankedStructureParameterPruner_AGP\n    initial_sparsity: 0.25\n    final_sparsity: 0.5\n    group_type: Filters\n    weights: [conv1.weight, conv2.weight]\nextensions:\n  thinner:\n    class: FilterRemover\n    thinning_func_str: remove_filters\n    arch: lenet\n    dataset: mnist\npolicies:\n  - pruner:\n      instance_name: filters\n    starting_epoch: 0\n    ending_epoch: 2\n    frequency: 1\n  - extension:\n      instance_name: thinner\n    epochs: [2]\n",
    )
    .unwrap();
    let ((single, _), ranks) = one_process_and_two_ranks(schedule.to_str().unwrap(), 320, 3);
    let shape = |w: &[(String, Tensor)], name: &str| w.iter().find(|(n, _)| n == name).unwrap().1.size();
    assert_eq!(shape(&single, "conv1.weight"), [3, 1, 5, 5], "half of conv1's 6 filters removed");
    assert_eq!(shape(&single, "conv2.weight"), [8, 3, 5, 5]);
    assert_ranks_agree_and_match(&ranks, &single);
}

fn distill_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.args(args).env_remove("LD_LIBRARY_PATH").env("OMP_NUM_THREADS", "1");
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"] {
        c.env_remove(var);
    }
    c
}

fn checkpoint_weights(path: &std::path::Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(path).unwrap();
    t.retain(|(n, _)| n.ends_with(".weight") || n.ends_with(".bias"));
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn cli_nproc_2_matches_one_process_and_a_killed_rank_stops_the_run_which_resumes() {
    let _one_at_a_time = one_at_a_time();
    let dir = distill::io::TempDir::new().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let args = |name: &str, epochs: &str| -> Vec<String> {
        ["train", "--arch", "lenet", "--dataset", "mnist", "--epochs", epochs, "--lr", "0.02", "--batch-size", "64", "--progress", "quiet", "--out", &out(name)]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run = |a: Vec<String>| {
        let o = distill_cmd(&a.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
        assert!(o.status.success(), "{a:?}:\n{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let summary = |name: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(dir.path().join(name).join("summary.json")).unwrap()).unwrap() };
    run(args("one", "1"));
    for name in ["two", "again"] {
        let mut two = args(name, "1");
        two.extend(["--nproc".into(), "2".into()]);
        let stdout = run(two);
        assert!(stdout.contains("data-parallel on 2 ranks"), "{stdout}");
        assert_eq!(stdout.matches("distill: lenet on mnist").count(), 1, "rank 0 alone reports:\n{stdout}");
    }
    let weights = |name: &str| checkpoint_weights(&dir.path().join(name).join("checkpoint.safetensors"));
    let (one, two, again) = (weights("one"), weights("two"), weights("again"));
    assert_eq!(one.len(), two.len());
    for (((name, x), (_, y)), (_, z)) in one.iter().zip(&two).zip(&again) {
        assert!(y.equal(z), "{name}: two runs of 2 ranks are bit-identical");
        // A whole epoch: summation order differs, so only close (the library test checks 1e-5 over 22 steps).
        let relative = relative_difference(y, x);
        assert!(relative <= 5e-2, "{name}: {relative:e} from one process");
    }
    let (top1, top1_two) = (summary("one")["test"]["top1"].as_f64().unwrap(), summary("two")["test"]["top1"].as_f64().unwrap());
    assert!((top1 - top1_two).abs() <= 2.0, "test top-1 {top1} in one process, {top1_two} on 2 ranks");

    // torchrun-style: two processes from the environment; rank 1 is killed after the first epoch's checkpoint.
    let port = free_local_port().unwrap().to_string();
    let spawn = |rank: &str, extra: &[&str]| {
        let mut a = args("killed", "3");
        a.extend(extra.iter().map(|s| s.to_string()));
        let mut c = distill_cmd(&a.iter().map(String::as_str).collect::<Vec<_>>());
        c.env("RANK", rank).env("WORLD_SIZE", "2").env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", &port).env("DISTILL_DIST_TIMEOUT", "60");
        c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let (rank0, mut rank1) = (spawn("0", &[]), spawn("1", &[]));
    let checkpoint = dir.path().join("killed/checkpoint.safetensors");
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint after 300 s");
        thread::sleep(Duration::from_millis(50));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed_at = Instant::now();
    let o = rank0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "rank 0 must fail when rank 1 dies");
    assert!(err.contains("distributed: ") && err.contains("rank 0 of 2 failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(killed_at.elapsed() < Duration::from_secs(60), "rank 0 took {:?} to notice", killed_at.elapsed());

    let port = free_local_port().unwrap().to_string();
    let resume = out("killed") + "/checkpoint.safetensors";
    let resumed: Vec<_> = ["0", "1"]
        .into_iter()
        .map(|rank| {
            let mut a = args("killed", "3");
            a.extend(["--resume".to_string(), resume.clone()]);
            let mut c = distill_cmd(&a.iter().map(String::as_str).collect::<Vec<_>>());
            c.env("RANK", rank).env("WORLD_SIZE", "2").env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", &port);
            c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for child in resumed {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(summary("killed")["epochs"], 3, "the resumed run completed all three epochs");
}


/// Knowledge distillation from the command line on two ranks: each rank runs the teacher on its own share of the
/// batch, and the distillation term is summed over the ranks like the other loss terms.
#[test]
fn knowledge_distillation_runs_on_two_ranks() {
    let _one_at_a_time = one_at_a_time();
    let dir = distill::io::TempDir::new().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let common = ["train", "--dataset", "mnist", "--epochs", "1", "--lr", "0.02", "--batch-size", "64", "--progress", "quiet"];
    let teacher = distill_cmd(&[&common[..], &["--arch", "simplenet_mnist", "--out", &out("teacher")]].concat()).output().unwrap();
    assert!(teacher.status.success(), "{}", String::from_utf8_lossy(&teacher.stderr));
    let kd = ["--arch", "lenet", "--kd-teacher", "simplenet_mnist", "--kd-resume", &(out("teacher") + "/checkpoint.safetensors"), "--kd-temperature", "4"];
    let mut runs = Vec::new();
    for (name, nproc) in [("one", "1"), ("two", "2")] {
        let o = distill_cmd(&[&common[..], &kd[..], &["--out", &out(name), "--nproc", nproc]].concat()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(name).join("summary.json")).unwrap()).unwrap();
        let terms = &summary["history"][0]["train"]["loss_components"];
        let distill_loss = terms.as_array().unwrap().iter().find(|t| t[0] == "Distill Loss").map(|t| t[1].as_f64().unwrap());
        runs.push((distill_loss.expect("a Distill Loss term"), summary["test"]["top1"].as_f64().unwrap()));
    }
    let ((kd1, top1), (kd2, top2)) = (runs[0], runs[1]);
    assert!((kd1 - kd2).abs() <= 0.02 * kd1.abs(), "the distillation term averaged over all digits: {kd1} in one process, {kd2} on 2 ranks");
    assert!((top1 - top2).abs() <= 2.0, "test top-1 {top1} and {top2}");
}

/// Synchronized batch norm on two ranks of three samples each is batch norm over all six in one process: the
/// same outputs and running statistics on both ranks, and, with each rank's loss the mean over its own samples,
/// input gradients twice the single process's (each rank's loss weighs its samples by 1/3 instead of 1/6) and
/// weight and bias gradients whose average across ranks is the single process's.
#[test]
fn synchronized_batch_norm_is_batch_norm_over_every_ranks_samples() {
    let _one_at_a_time = one_at_a_time();
    tch::manual_seed(7);
    let x = Tensor::randn([6, 4, 5, 5], (Kind::Float, Device::Cpu)) * 3.0 + 1.5;
    let c = Tensor::randn([6, 4, 5, 5], (Kind::Float, Device::Cpu));
    let gamma = Tensor::from_slice(&[1.0f32, 0.5, 2.0, -1.0]);
    let beta = Tensor::from_slice(&[0.0f32, 0.1, -0.2, 0.3]);
    // One process: PyTorch's batch norm over all six samples, loss = mean over samples of Σ y·c.
    let (xs, w, b) = (x.copy().set_requires_grad(true), gamma.copy().set_requires_grad(true), beta.copy().set_requires_grad(true));
    let (rm, rv) = (Tensor::zeros([4], (Kind::Float, Device::Cpu)), Tensor::ones([4], (Kind::Float, Device::Cpu)));
    let y = xs.batch_norm(Some(&w), Some(&b), Some(&rm), Some(&rv), true, 0.1, 1e-5, true);
    ((&y * &c).sum(Kind::Float) / 6.0).backward();
    let single = (y.detach(), xs.grad(), w.grad(), b.grad(), rm, rv);
    // Tensors cannot be shared with the rank threads; their values can.
    let floats = |t: &Tensor| Vec::<f32>::try_from(t.reshape([-1])).unwrap();
    let parts = (floats(&x), floats(&c), floats(&gamma), floats(&beta));
    let ranks = on_ranks(2, move |g| {
        let r = g.rank() as i64;
        let tensor = |v: &[f32], shape: &[i64]| Tensor::from_slice(v).reshape(shape);
        let (x, c) = (tensor(&parts.0, &[6, 4, 5, 5]).narrow(0, 3 * r, 3).copy().set_requires_grad(true), tensor(&parts.1, &[6, 4, 5, 5]).narrow(0, 3 * r, 3));
        let (w, b) = (tensor(&parts.2, &[4]).set_requires_grad(true), tensor(&parts.3, &[4]).set_requires_grad(true));
        let (rm, rv) = (Tensor::zeros([4], (Kind::Float, Device::Cpu)), Tensor::ones([4], (Kind::Float, Device::Cpu)));
        let y = g.sync_batch_norm(&x, &w, &b, &rm, &rv, 0.1, 1e-5).unwrap();
        ((&y * &c).sum(Kind::Float) / 3.0).backward();
        // A wrong shape is refused before any collective, on every rank alike.
        let err = g.sync_batch_norm(&x, &w.narrow(0, 0, 3), &b, &rm, &rv, 0.1, 1e-5).unwrap_err().to_string();
        assert!(err.contains("weight is [3] for 4 channels"), "{err}");
        (y.detach(), x.grad(), w.grad(), b.grad(), rm, rv)
    });
    let close = |what: &str, a: &Tensor, b: &Tensor| {
        let d = relative_difference(a, b);
        assert!(d <= 1e-5, "{what}: relative difference {d:e}");
    };
    for (r, rank) in ranks.iter().enumerate() {
        let slice = |t: &Tensor| t.narrow(0, 3 * r as i64, 3);
        close("output", &rank.0, &slice(&single.0));
        close("input gradient", &(&rank.1 / 2.0), &slice(&single.1));
        close("running mean", &rank.4, &single.4);
        close("running variance", &rank.5, &single.5);
    }
    close("weight gradient, averaged", &((&ranks[0].2 + &ranks[1].2) / 2.0), &single.2);
    close("bias gradient, averaged", &((&ranks[0].3 + &ranks[1].3) / 2.0), &single.3);
}

/// ResNet-20 (batch norms after every convolution) on synthetic CIFAR-shaped images, one step of global batch 32
/// through the trainer: with synchronized batch norms two ranks end within 1e-5 of one process, parameters and
/// running statistics alike; with DDP's default (each rank normalizes its own 16 samples) the running statistics
/// differ. One step, because this network amplifies rounding: a second step leaves batch-norm biases up to 2e-2
/// apart, and so does scaling one initial weight tensor by 1 + 1e-7 in a single process (measured while writing
/// this test), so more steps would test the network's conditioning, not the synchronization.
#[test]
fn synchronized_batch_norm_makes_two_ranks_train_a_resnet_as_one_process() {
    let _one_at_a_time = one_at_a_time();
    fn resnet_run(group: Option<Arc<ProcessGroup>>, sync_batch_norm: bool) -> Vec<(String, Tensor)> {
        static INIT: Mutex<()> = Mutex::new(());
        let mut model = {
            let _drawing = INIT.lock().unwrap();
            tch::manual_seed(5);
            create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap()
        };

        let data = DataSplits {
            train: Dataset::synthetic(32, [3, 32, 32], 10, 1).unwrap(),
            valid: Dataset::synthetic(32, [3, 32, 32], 10, 2).unwrap(),
            test: Dataset::synthetic(32, [3, 32, 32], 10, 3).unwrap(),
        };
        let config = TrainConfig { epochs: 1, batch_size: 32, lr: 0.05, progress: Progress::Quiet, distributed: group, sync_batch_norm, ..TrainConfig::default() };
        Trainer::new(&mut model, config).unwrap().run(&data).unwrap();
        model.state_dict()
    }
    let single = resnet_run(None, false);
    let synced = on_ranks(2, |g| resnet_run(Some(Arc::new(g)), true));
    for (((name, a), (_, b)), (_, c)) in synced[0].iter().zip(&synced[1]).zip(&single) {
        assert!(a.equal(b), "{name}: bit-identical on both ranks");
        if a.is_floating_point() {
            let d = relative_difference(a, c);
            assert!(d <= 1e-5, "{name}: relative difference {d:e} from one process");
        }
    }
    let local = on_ranks(2, |g| resnet_run(Some(Arc::new(g)), false));
    let (name, a) = local[0].iter().find(|(n, _)| n == "bn1.running_var").unwrap();
    let (_, c) = single.iter().find(|(n, _)| n == name).unwrap();
    let d = relative_difference(a, c);
    assert!(d > 1e-4, "{name}: without synchronization the running variance should differ from one process's, but differs by {d:e}");
    // The option needs data-parallel training, and a batch norm to synchronize.
    let mut lenet = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let err = Trainer::new(&mut lenet, TrainConfig { sync_batch_norm: true, ..TrainConfig::default() }).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("set `distributed`"), "{err}");
    let errs = on_ranks(2, |g| {
        let mut lenet = create_model("lenet", "mnist", Device::Cpu).unwrap();
        Trainer::new(&mut lenet, TrainConfig { sync_batch_norm: true, distributed: Some(Arc::new(g)), ..TrainConfig::default() }).map(|_| ()).unwrap_err().to_string()
    });
    assert!(errs[0].contains("no batch norm to synchronize"), "{}", errs[0]);
}

