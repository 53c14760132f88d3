//! The training loop: callback order, masks, determinism, checkpoints and resume, accuracy on the bundled data.
use std::sync::{Arc, Mutex};

use distill::data::{DataSplits, Dataset};
use distill::metrics::Metrics;
use distill::models::{copy_model, create_model};
use distill::scheduler::lr::{LrPolicy, LrSchedule};
use distill::scheduler::{CompressionScheduler, LossComponent, Minibatch, Policy, PolicyContext, PolicyLoss, PolicySchedule};
use distill::train::{fit, Progress, TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

fn synthetic_splits(n: usize) -> DataSplits {
    DataSplits {
        train: Dataset::synthetic(n, [1, 28, 28], 10, 1).unwrap(),
        valid: Dataset::synthetic(8, [1, 28, 28], 10, 2).unwrap(),
        test: Dataset::synthetic(8, [1, 28, 28], 10, 3).unwrap(),
    }
}

fn quiet(epochs: usize, batch_size: usize) -> TrainConfig {
    TrainConfig { epochs, batch_size, lr: 0.01, progress: Progress::Quiet, ..TrainConfig::default() }
}

/// Records every callback it receives, and adds a constant to the loss.
struct Recorder {
    tag: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

impl Policy for Recorder {
    fn name(&self) -> String {
        format!("Recorder({})", self.tag)
    }
    fn on_epoch_begin(&mut self, ctx: &mut PolicyContext) -> distill::Result<()> {
        self.log.lock().unwrap().push(format!("{} epoch_begin {}", self.tag, ctx.epoch));
        Ok(())
    }
    fn on_minibatch_begin(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> distill::Result<()> {
        self.log.lock().unwrap().push(format!("{} minibatch_begin {}.{}/{}", self.tag, ctx.epoch, mb.index, mb.per_epoch));
        Ok(())
    }
    fn before_backward_pass(&mut self, ctx: &mut PolicyContext, mb: Minibatch, loss: &Tensor) -> distill::Result<Option<PolicyLoss>> {
        self.log.lock().unwrap().push(format!("{} before_backward {}.{}", self.tag, ctx.epoch, mb.index));
        let term = Tensor::from(1.0f32);
        Ok(Some(PolicyLoss { overall_loss: loss + &term, loss_components: vec![LossComponent { name: format!("{}_loss", self.tag), value: term }] }))
    }
    fn before_parameter_optimization(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> distill::Result<()> {
        self.log.lock().unwrap().push(format!("{} before_step {}.{}", self.tag, ctx.epoch, mb.index));
        Ok(())
    }
    fn on_minibatch_end(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> distill::Result<()> {
        self.log.lock().unwrap().push(format!("{} minibatch_end {}.{}", self.tag, ctx.epoch, mb.index));
        Ok(())
    }
    fn on_epoch_end(&mut self, ctx: &mut PolicyContext, _: &Metrics) -> distill::Result<()> {
        self.log.lock().unwrap().push(format!("{} epoch_end {}", self.tag, ctx.epoch));
        Ok(())
    }
}

#[test]
fn the_loop_calls_every_callback_in_distiller_order() {
    tch::manual_seed(0);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut scheduler = CompressionScheduler::new(&model);
    scheduler.add_policy(Box::new(Recorder { tag: "A", log: log.clone() }), PolicySchedule::range(0, 3, 2).unwrap());
    scheduler.add_policy(Box::new(Recorder { tag: "B", log: log.clone() }), PolicySchedule::epochs_list(vec![1]).unwrap());
    let summary = fit(&mut model, &synthetic_splits(12), Some(&mut scheduler), &quiet(3, 8)).unwrap();
    let mut expected = Vec::new();
    for (epoch, tags) in [(0, vec!["A"]), (1, vec!["B"]), (2, vec!["A"])] {
        expected.extend(tags.iter().map(|t| format!("{t} epoch_begin {epoch}")));
        for mb in 0..2 {
            for step in ["minibatch_begin", "before_backward", "before_step", "minibatch_end"] {
                for t in &tags {
                    expected.push(if step == "minibatch_begin" { format!("{t} {step} {epoch}.{mb}/2") } else { format!("{t} {step} {epoch}.{mb}") });
                }
            }
        }
        expected.extend(tags.iter().map(|t| format!("{t} epoch_end {epoch}")));
    }
    assert_eq!(*log.lock().unwrap(), expected);
    // The policy's constant term shows in the overall loss and as a named component.
    let e0 = &summary.history[0].train;
    assert!((e0.overall_loss - e0.objective.loss - 1.0).abs() < 1e-5, "{e0:?}");
    assert_eq!(e0.loss_components.len(), 1);
    assert_eq!(e0.loss_components[0].0, "A_loss");
    assert!(summary.history[1].train.loss_components.iter().all(|(n, _)| n == "B_loss"));
}

#[test]
fn masks_hold_through_momentum_and_weight_decay() {
    tch::manual_seed(0);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut scheduler = CompressionScheduler::new(&model);
    let w = model.parameter("fc1.weight").unwrap();
    let mask = Tensor::rand(w.size(), (Kind::Float, Device::Cpu)).ge(0.5).to_kind(Kind::Float);
    scheduler.masks_mut().set_mask("fc1.weight", mask.shallow_clone(), &w.size()).unwrap();
    let before_other = model.parameter("fc2.weight").unwrap().copy();
    let summary = fit(&mut model, &synthetic_splits(40), Some(&mut scheduler), &quiet(2, 8)).unwrap();
    let w = model.parameter("fc1.weight").unwrap();
    let unmasked: Tensor = 1.0 - &mask;
    let zeros_where_masked = (&w * &unmasked).abs().sum(Kind::Float).double_value(&[]);
    assert_eq!(zeros_where_masked, 0.0, "masked weights must stay exactly zero");
    assert!((&w * &mask).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(!model.parameter("fc2.weight").unwrap().equal(&before_other), "unmasked weights train");
    assert!(summary.sparsity > 0.3, "sparsity {}", summary.sparsity);
}

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let run = |seed: u64| {
        tch::manual_seed(seed as i64);
        let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
        let config = TrainConfig { seed, ..quiet(2, 8) };
        fit(&mut model, &synthetic_splits(24), None, &config).unwrap();
        model.state_dict()
    };
    let (a, b, c) = (run(5), run(5), run(6));
    assert!(a.iter().zip(&b).all(|((_, x), (_, y))| x.equal(y)));
    assert!(a.iter().zip(&c).any(|((_, x), (_, y))| !x.equal(y)));
}

#[test]
fn resuming_from_a_checkpoint_matches_the_uninterrupted_run() {
    let data = distill::data::mnist_bundled().unwrap();
    let small = DataSplits {
        train: data.train.subset("train", &(0..600).collect::<Vec<_>>()).unwrap().with_augmentation(data.train.augmentation().copied()),
        valid: data.valid.subset("valid", &(0..100).collect::<Vec<_>>()).unwrap(),
        test: data.test.subset("test", &(0..100).collect::<Vec<_>>()).unwrap(),
    };
    let dir = distill::io::TempDir::new().unwrap();
    let schedule = || {
        let mut s = CompressionScheduler::new(&create_model("simplenet_v2_mnist", "mnist", Device::Cpu).unwrap());
        s.add_policy(Box::new(LrPolicy::new(LrSchedule::StepLR { step_size: 1, gamma: 0.5 }).unwrap()), PolicySchedule::range(0, 3, 1).unwrap());
        s
    };
    let config = |out: &str, epochs| TrainConfig { out_dir: Some(dir.path().join(out)), ..quiet(epochs, 32) };

    tch::manual_seed(3);
    let mut full = create_model("simplenet_v2_mnist", "mnist", Device::Cpu).unwrap();
    let mut s = schedule();
    let full_summary = Trainer::new(&mut full, config("full", 3)).unwrap().with_scheduler(&mut s).run(&small).unwrap();

    tch::manual_seed(3);
    let mut first = create_model("simplenet_v2_mnist", "mnist", Device::Cpu).unwrap();
    let mut s = schedule();
    Trainer::new(&mut first, config("part", 2)).unwrap().with_scheduler(&mut s).run(&small).unwrap();

    tch::manual_seed(99); // the resumed model starts from other weights: the checkpoint must overwrite them
    let mut resumed = create_model("simplenet_v2_mnist", "mnist", Device::Cpu).unwrap();
    let mut s = schedule();
    let mut trainer = Trainer::new(&mut resumed, config("part", 3)).unwrap().with_scheduler(&mut s);
    trainer.resume(dir.path().join("part/checkpoint.safetensors")).unwrap();
    assert!((trainer.optimizer().lr() - 0.0025).abs() < 1e-15, "LR restored: {}", trainer.optimizer().lr());
    let resumed_summary = trainer.run(&small).unwrap();

    for ((n, a), (_, b)) in full.state_dict().iter().zip(resumed.state_dict().iter()) {
        assert!(a.equal(b), "{n} differs after resume");
    }
    let without_time = |h: &[distill::train::EpochRecord]| h.iter().map(|r| distill::train::EpochRecord { seconds: 0.0, ..r.clone() }).collect::<Vec<_>>();
    assert_eq!(without_time(&full_summary.history), without_time(&resumed_summary.history));
    let csv = std::fs::read_to_string(dir.path().join("part/metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header and three epochs:\n{csv}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("part/summary.json")).unwrap()).unwrap();
    for key in ["final", "best"] {
        for field in ["top1", "top5", "loss", "epoch"] {
            assert!(json[key][field].is_number(), "summary.json {key}.{field}");
        }
    }
    for key in ["params", "nnz_params", "sparsity", "wall_seconds"] {
        assert!(json[key].is_number(), "summary.json {key}");
    }
    assert!(dir.path().join("part/best.safetensors").is_file());
}

#[test]
fn resume_refuses_foreign_or_finished_checkpoints() {
    let dir = distill::io::TempDir::new().unwrap();
    let data = synthetic_splits(16);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    fit(&mut model, &data, None, &TrainConfig { out_dir: Some(dir.path().to_path_buf()), ..quiet(1, 8) }).unwrap();
    let ckpt = dir.path().join("checkpoint.safetensors");

    let mut other = create_model("simplenet_mnist", "mnist", Device::Cpu).unwrap();
    let err = Trainer::new(&mut other, quiet(3, 8)).unwrap().resume(&ckpt).unwrap_err().to_string();
    assert!(err.contains("saved from 'lenet' (mnist), the model is 'simplenet_mnist' (mnist)"), "{err}");
    assert!(err.contains("'conv1.weight': model has [20, 1, 5, 5], given [6, 1, 5, 5]"), "{err}");

    // The last epoch's checkpoint finishes the run (a kill between the last checkpoint and summary.json).
    let mut same = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut trainer = Trainer::new(&mut same, quiet(1, 8)).unwrap();
    trainer.resume(&ckpt).unwrap();
    let summary = trainer.run(&data).unwrap();
    assert_eq!(summary.epochs, 1);
    // Fewer epochs than the checkpoint has done is refused.
    let longer = distill::io::TempDir::new().unwrap();
    fit(&mut create_model("lenet", "mnist", Device::Cpu).unwrap(), &data, None, &TrainConfig { out_dir: Some(longer.path().to_path_buf()), ..quiet(2, 8) }).unwrap();
    let err = Trainer::new(&mut same, quiet(1, 8)).unwrap().resume(longer.path().join("checkpoint.safetensors")).unwrap_err().to_string();
    assert!(err.contains("already completed 2 epochs, more than the 1"), "{err}");

    let err = Trainer::new(&mut same, quiet(3, 8)).unwrap().resume(dir.path().join("missing.safetensors")).unwrap_err().to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
    std::fs::write(dir.path().join("junk.safetensors"), b"not a checkpoint").unwrap();
    let err = Trainer::new(&mut same, quiet(3, 8)).unwrap().resume(dir.path().join("junk.safetensors")).unwrap_err().to_string();
    assert!(err.contains("neither a safetensors checkpoint nor a PyTorch one"), "{err}");
}

#[test]
fn nan_weights_stop_training_with_a_clear_error() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::no_grad(|| {
        let _ = model.parameter("fc3.bias").unwrap().fill_(f64::NAN);
    });
    let err = fit(&mut model, &synthetic_splits(16), None, &quiet(1, 8)).unwrap_err().to_string();
    assert!(err.contains("the loss is NaN at epoch 0, mini-batch 0"), "{err}");
}

#[test]
fn bad_configurations_are_errors() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    assert!(Trainer::new(&mut model, quiet(0, 8)).err().unwrap().to_string().contains("epochs"));
    assert!(Trainer::new(&mut model, quiet(1, 0)).err().unwrap().to_string().contains("batch size"));
    let config = TrainConfig { lr: -1.0, ..quiet(1, 8) };
    assert!(Trainer::new(&mut model, config).err().unwrap().to_string().contains("learning rate"));
    assert!(PolicySchedule::range(5, 5, 1).is_err());
    assert!(PolicySchedule::range(0, 4, 5).is_err());
    assert!(PolicySchedule::epochs_list(vec![3, 1]).is_err());
}

/// The README's main job: LeNet-5 on the bundled digits, 10 epochs, cosine-annealed SGD.
#[test]
fn lenet_reaches_97_percent_on_the_held_out_digits() {
    tch::manual_seed(1);
    let data = distill::data::mnist_bundled().unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut scheduler = CompressionScheduler::new(&model);
    let cosine = LrPolicy::new(LrSchedule::CosineAnnealingLR { t_max: 10, eta_min: 0.0 }).unwrap();
    scheduler.add_policy(Box::new(cosine), PolicySchedule::range(0, 10, 1).unwrap());
    let config = TrainConfig { lr: 0.02, batch_size: 32, seed: 1, ..quiet(10, 32) };
    let summary = fit(&mut model, &data, Some(&mut scheduler), &config).unwrap();
    assert!(summary.test.top1 >= 97.0, "test top-1 {:.2}%", summary.test.top1);
    assert_eq!(summary.epochs, 10);
}

/// Resuming a pruning schedule whose thresholds are fixed at the first call (SensitivityPruner) needs the
/// pruner's state from the checkpoint, not just the masks.
#[test]
fn resuming_a_pruning_schedule_restores_pruner_state() {
    let data = synthetic_splits(48);
    let yaml = "pruners:\n  s:\n    class: SensitivityPruner\n    sensitivities: {fc1.weight: 0.6, conv2.weight: 0.4}\npolicies:\n  - pruner: {instance_name: s}\n    starting_epoch: 0\n    ending_epoch: 3\n    frequency: 1\n";
    let schedule = distill::config::Schedule::from_yaml_str(yaml, "s.yaml").unwrap();
    let dir = distill::io::TempDir::new().unwrap();
    let config = |out: &str, epochs| TrainConfig { out_dir: Some(dir.path().join(out)), lr: 0.05, ..quiet(epochs, 16) };
    // One draw of initial weights, copied into each run: reseeding the global generator before each run would let a
    // test running beside this one take draws in between.
    tch::manual_seed(11);
    let initial = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let train = |out: &str, epochs, resume: bool| {
        let mut model = copy_model(&initial).unwrap();
        let mut s = schedule.build(&model).unwrap();
        let mut t = Trainer::new(&mut model, config(out, epochs)).unwrap().with_scheduler(&mut s);
        if resume {
            t.resume(dir.path().join(out).join("checkpoint.safetensors")).unwrap();
        }
        t.run(&data).unwrap();
        model.state_dict()
    };
    let full = train("full", 3, false);
    train("part", 2, false);
    let resumed = train("part", 3, true);
    for ((n, a), (_, b)) in full.iter().zip(&resumed) {
        assert!(a.equal(b), "{n} differs after resume");
    }
}
