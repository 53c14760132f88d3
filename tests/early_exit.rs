//! Early exit: the loss against hand-computed values, exits attached by name and refused where samples could not
//! skip the rest, the skipping pass against the pass that runs everything, training on the bundled digits,
//! bit-identical resumption, and bad input.
use std::sync::{Arc, Mutex};

use distill::data::{DataSplits, Dataset};
use distill::early_exit::{attach_exits, early_exit_loss, evaluate, exit_scores, forward_exits, predict, EarlyExit, ExitCriterion, ExitOutputs, ExitPoint};
use distill::models::{copy_model, create_model, load_checkpoint, zoo_exits};
use distill::nn::{Model, ModuleCall, Observer};
use distill::optim::OptimizerConfig;
use distill::train::{Progress, TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

fn lenet_with_exit() -> Model {
    let mut m = create_model("lenet", "mnist", Device::Cpu).unwrap();
    attach_exits(&mut m, &zoo_exits("lenet").unwrap()).unwrap();
    m
}

#[test]
fn the_loss_weighs_each_exit_and_gives_the_final_classifier_the_rest() {
    // Two exits, a batch of two, three classes. Per-sample cross-entropies by hand (log-sum-exp minus the label's
    // logit), then batch means: exit 0 = (ln 3 + ln(1 + 2e)) / 2 ... computed below in f64.
    let z = |v: &[f32]| Tensor::from_slice(v).view([2, 3]);
    let ce = |v: [f64; 3], label: usize| v.iter().map(|x| x.exp()).sum::<f64>().ln() - v[label];
    let (a, b, f) = ([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]], [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], [[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]]);
    let labels = [0usize, 1];
    let mean = |x: [[f64; 3]; 2]| (ce(x[0], labels[0]) + ce(x[1], labels[1])) / 2.0;
    let flat = |x: [[f64; 3]; 2]| x.iter().flatten().map(|v| *v as f32).collect::<Vec<_>>();
    let out = ExitOutputs { exits: vec![z(&flat(a)), z(&flat(b))], final_: z(&flat(f)) };
    let loss = early_exit_loss(&out, &Tensor::from_slice(&[0i64, 1]), &[0.2, 0.3]).unwrap().double_value(&[]);
    let expected = 0.2 * mean(a) + 0.3 * mean(b) + 0.5 * mean(f);
    assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
    assert!(early_exit_loss(&out, &Tensor::from_slice(&[0i64, 1]), &[0.2]).is_err());
}

#[test]
fn exits_are_attached_by_name_with_distillers_names_and_shapes() {
    let mut resnet = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let before = resnet.num_parameters();
    attach_exits(&mut resnet, &zoo_exits("resnet20_cifar").unwrap()).unwrap();
    // Distiller's CIFAR exit: AvgPool2d(3) → Flatten → Linear(1600, 10).
    assert_eq!(resnet.parameter("layer1.2.relu2.branch_net.2.weight").unwrap().size(), [10, 1600]);
    assert_eq!(resnet.num_parameters(), before + 16010);
    assert!(resnet.module("layer1.2.relu2.branched_module").is_ok());
    let x = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let out = forward_exits(&resnet, &x, false).unwrap();
    assert_eq!(out.exits[0].size(), [2, 10]);
    // A plain forward pass still gives the final classifier's output.
    assert_eq!(resnet.forward_t(&x, false).unwrap().size(), [2, 10]);
    for arch in ["lenet", "simplenet_mnist", "mlp"] {
        let mut m = create_model(arch, "mnist", Device::Cpu).unwrap();
        attach_exits(&mut m, &zoo_exits(arch).unwrap()).unwrap();
        assert_eq!(m.early_exits().len(), 1, "{arch}");
    }
}

#[test]
fn exits_that_samples_could_not_leave_by_are_refused_and_leave_the_model_unchanged() {
    let mut resnet = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let names = resnet.named_parameters().len();
    // Inside a residual block the block's input is added back after the exit.
    let err = attach_exits(&mut resnet, &[ExitPoint::pooled("layer1.2.relu2", 3), ExitPoint::pooled("layer2.0.relu1", 2)]).unwrap_err().to_string();
    assert!(err.contains("layer2.0.relu1") && err.contains("residual"), "{err}");
    assert!(resnet.early_exits().is_empty());
    assert_eq!(resnet.named_parameters().len(), names);
    assert!(resnet.module("layer1.2.relu2.branched_module").is_err());
    let mut lenet = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let err = attach_exits(&mut lenet, &[ExitPoint::pooled("pool", 2)]).unwrap_err().to_string();
    assert!(err.contains("pool1"), "did-you-mean: {err}");
    let err = attach_exits(&mut lenet, &[ExitPoint::pooled("pool1", 20)]).unwrap_err().to_string();
    assert!(err.contains("14×14"), "{err}");
    let err = attach_exits(&mut lenet, &[ExitPoint::linear("pool1")]).unwrap_err().to_string();
    assert!(err.contains("not flat"), "{err}");
    let err = attach_exits(&mut lenet, &[ExitPoint::pooled("relu3", 2)]).unwrap_err().to_string();
    assert!(err.contains("[N, C, H, W]"), "{err}");
    let err = attach_exits(&mut lenet, &[ExitPoint::pooled("pool1", 2), ExitPoint::pooled("pool1", 1)]).unwrap_err().to_string();
    assert!(err.contains("two exits"), "{err}");
    assert!(attach_exits(&mut lenet, &[]).is_err());
    attach_exits(&mut lenet, &[ExitPoint::pooled("pool1", 2)]).unwrap();
    let err = attach_exits(&mut lenet, &[ExitPoint::linear("pool1.branch_net.2")]).unwrap_err().to_string();
    assert!(err.contains("inside"), "{err}");
}

/// Counts the samples each module sees.
struct Rows(Vec<(String, i64)>);

impl Observer for Rows {
    fn observe(&mut self, call: &ModuleCall) {
        self.0.push((call.name.to_string(), call.output.size()[0]));
    }
}

#[test]
fn samples_that_leave_skip_the_rest_and_get_the_answers_of_the_full_pass() {
    let mut model = lenet_with_exit();
    let x = Dataset::synthetic(16, [1, 28, 28], 10, 3).unwrap().images().unwrap().shallow_clone();
    let full = tch::no_grad(|| forward_exits(&model, &x, false)).unwrap();
    let entropy = ExitCriterion::Entropy.scores(&full.exits[0], None).unwrap();
    // A threshold between the scores lets some samples leave and keeps the others.
    let threshold = entropy.median().double_value(&[]);
    let leaving = Vec::<bool>::try_from(&entropy.lt(threshold)).unwrap();
    let ee = EarlyExit::new(vec![0.3], vec![threshold]).unwrap().with_criterion(ExitCriterion::Entropy);
    let rows = Arc::new(Mutex::new(Rows(Vec::new())));
    let id = model.attach_observer(rows.clone());
    let p = predict(&mut model, &x, &ee, None).unwrap();
    model.detach_observer(id);
    let exits = Vec::<i64>::try_from(&p.exit).unwrap();
    let left = leaving.iter().filter(|l| **l).count() as i64;
    assert!(left > 0 && left < 16);
    assert_eq!(exits, leaving.iter().map(|l| if *l { 0 } else { 1 }).collect::<Vec<i64>>());
    let seen = |name: &str| rows.lock().unwrap().0.iter().find(|(n, _)| n == name).map(|(_, r)| *r).unwrap();
    assert_eq!(seen("conv1"), 16);
    assert_eq!(seen("conv2"), 16 - left, "the rest of the network runs on the samples still in it");
    for (i, leaves) in leaving.iter().enumerate() {
        let expected = if *leaves { full.exits[0].get(i as i64) } else { full.final_.get(i as i64) };
        let diff = (p.logits.get(i as i64) - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "sample {i}: {diff}");
    }
    // Distiller's criterion needs the labels.
    let ce = EarlyExit::new(vec![0.3], vec![0.5]).unwrap();
    assert!(predict(&mut model, &x, &ce, None).unwrap_err().to_string().contains("Entropy"));
    // Everything leaves: the rest of the network runs on no sample at all.
    let all = EarlyExit::new(vec![0.3], vec![10.0]).unwrap().with_criterion(ExitCriterion::Entropy);
    assert_eq!(Vec::<i64>::try_from(&predict(&mut model, &x, &all, None).unwrap().exit).unwrap(), vec![0; 16]);
}

#[test]
fn bad_settings_are_refused_before_training() {
    assert!(EarlyExit::new(vec![0.5, 0.5], vec![1.0, 1.0]).unwrap_err().to_string().contains("less than 1"));
    assert!(EarlyExit::new(vec![0.3], vec![]).is_err());
    assert!(EarlyExit::new(vec![-0.1], vec![1.0]).is_err());
    assert!(EarlyExit::new(vec![0.1], vec![f64::NAN]).is_err());
    assert!(EarlyExit::new(vec![0.1], vec![-1.0]).is_err());
    let mut plain = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let ee = EarlyExit::new(vec![0.3, 0.2], vec![1.0, 1.0]).unwrap();
    let config = TrainConfig { early_exit: Some(ee.clone()), progress: Progress::Quiet, ..Default::default() };
    let err = Trainer::new(&mut plain, config.clone()).err().unwrap().to_string();
    assert!(err.contains("0 exit(s)"), "{err}");
    let mut model = lenet_with_exit();
    let err = Trainer::new(&mut model, config).err().unwrap().to_string();
    assert!(err.contains("2 threshold(s)") && err.contains("pool1"), "{err}");
    assert!(ExitCriterion::parse("entropie").unwrap_err().to_string().contains("entropy"));
}

fn config(epochs: usize, dir: Option<std::path::PathBuf>, ee: EarlyExit) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr: 0.02,
        optimizer: OptimizerConfig::sgd(0.9, 1e-4),
        seed: 3,
        out_dir: dir,
        progress: Progress::Quiet,
        early_exit: Some(ee),
        distributed: None,
        sync_batch_norm: false,
    }
}

#[test]
fn early_exit_on_lenet_keeps_accuracy_while_most_digits_leave_early() {
    let data = distill::data::mnist_bundled().unwrap();
    let mut model = lenet_with_exit();
    let summary = distill::train::fit(&mut model, &data, None, &config(5, None, EarlyExit::new(vec![0.3], vec![0.5]).unwrap())).unwrap();
    let exits = summary.test_exits.as_ref().unwrap();
    assert_eq!(exits.exits.iter().map(|e| e.taken).sum::<i64>(), 500);
    assert!(summary.history.iter().all(|r| r.exits.is_some()));
    // The threshold under which 60% of the *validation* digits leave, used on the test digits.
    let valid = exit_scores(&mut model, &data.valid, 100).unwrap();
    let test = exit_scores(&mut model, &data.test, 100).unwrap();
    let final_alone = 100.0 * test.hit1[1].iter().filter(|h| **h).count() as f64 / 500.0;
    for criterion in [ExitCriterion::Entropy, ExitCriterion::CrossEntropy] {
        let t = valid.quantile(criterion, 0, 0.6).unwrap();
        let stats = test.stats(criterion, &[t]).unwrap();
        println!("{criterion:?} threshold {t:.4}, final exit alone {final_alone:.1}%: {}", stats.log_lines().join(" | "));
        assert!(stats.exits[0].percent >= 50.0, "{criterion:?}: {}% left early", stats.exits[0].percent);
        assert!(stats.overall.top1 >= final_alone - 1.0, "{criterion:?}: {} vs final exit alone {final_alone}", stats.overall.top1);
        assert!(stats.macs_saved() > 0.3, "{}", stats.macs_saved());
        // The pass that really skips agrees with the one that runs everything.
        let ee = EarlyExit::new(vec![0.3], vec![t]).unwrap().with_criterion(criterion);
        let skipped = evaluate(&mut model, &data.test, 64, &ee).unwrap();
        assert_eq!(skipped.exits.iter().map(|e| e.taken).collect::<Vec<_>>(), stats.exits.iter().map(|e| e.taken).collect::<Vec<_>>());
        assert!((skipped.overall.top1 - stats.overall.top1).abs() < 1e-9);
    }
}

fn small_data() -> DataSplits {
    let set = |n, seed| Dataset::synthetic(n, [1, 28, 28], 10, seed).unwrap();
    DataSplits { train: set(96, 1), valid: set(32, 2), test: set(32, 3) }
}

#[test]
fn a_run_with_exits_resumes_bit_exactly_and_its_checkpoint_loads_with_its_exits() {
    let data = small_data();
    let ee = EarlyExit::new(vec![0.4], vec![1.0]).unwrap();
    let whole = distill::io::TempDir::new().unwrap();
    // Copies of one model: libtorch's generator is shared by the tests running in parallel.
    let mut a = lenet_with_exit();
    let (mut b, mut c) = (copy_model(&a).unwrap(), copy_model(&a).unwrap());
    distill::train::fit(&mut a, &data, None, &config(2, Some(whole.path().to_path_buf()), ee.clone())).unwrap();
    let part = distill::io::TempDir::new().unwrap();
    distill::train::fit(&mut b, &data, None, &config(1, Some(part.path().to_path_buf()), ee.clone())).unwrap();
    let mut trainer = Trainer::new(&mut c, config(2, Some(part.path().to_path_buf()), ee.clone())).unwrap();
    trainer.resume(part.path().join("checkpoint.safetensors")).unwrap();
    trainer.run(&data).unwrap();
    drop(trainer);
    for ((name, x), (_, y)) in a.state_dict().iter().zip(c.state_dict().iter()) {
        assert!(x.equal(y), "{name} differs after resuming");
    }
    // The checkpoint names its exits: loading attaches them, and so does copying.
    let loaded = load_checkpoint(whole.path().join("checkpoint.safetensors"), Device::Cpu).unwrap();
    assert_eq!(loaded.early_exits(), a.early_exits());
    assert!(loaded.parameter("pool1.branch_net.2.weight").unwrap().equal(&a.parameter("pool1.branch_net.2.weight").unwrap()));
    assert_eq!(copy_model(&a).unwrap().early_exits(), a.early_exits());
    // Resuming into a model without the exits is refused with the way out.
    let mut plain = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut trainer = Trainer::new(&mut plain, TrainConfig { epochs: 2, progress: Progress::Quiet, ..Default::default() }).unwrap();
    let err = trainer.resume(whole.path().join("checkpoint.safetensors")).unwrap_err().to_string();
    assert!(err.contains("attach the same exits"), "{err}");
    let csv = std::fs::read_to_string(whole.path().join("metrics.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with("valid_exit_0_percent,valid_exit_0_top1,valid_exit_1_percent,valid_exit_1_top1,valid_macs_saved"), "{csv}");
    let json = std::fs::read_to_string(whole.path().join("summary.json")).unwrap();
    assert!(json.contains("\"test_exits\""));
    // TensorBoard gets the same figures under Performance/Validation/.
    let (runs, _) = distill::logging::posthoc::read_runs(&[whole.path()]).unwrap();
    let tags = distill::summary::tables::column(&runs, "tag").unwrap().str().unwrap().iter().flatten().map(String::from).collect::<Vec<_>>();
    for tag in ["Performance/Validation/Exit 0 Percent", "Performance/Validation/Exit 1 Top1", "Performance/Validation/MACs Saved"] {
        assert!(tags.iter().any(|t| t == tag), "{tag} not among {tags:?}");
    }
}
