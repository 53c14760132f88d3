//! YAML schedules: Distiller's corpus, located errors for bad input, and AGP on LeNet end to end.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use distill::config::{PolicyConfig, PrunerConfig, Schedule};
use distill::models::create_model;
use distill::scheduler::{Minibatch, Policy, PolicyContext};
use distill::train::{fit, Progress, TrainConfig};
use tch::{Device, Kind, Tensor};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/distiller-schedules")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml") {
            out.push(p);
        }
    }
}

/// The zoo model a corpus file was written for, from its name.
fn zoo_model(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        n if n.contains("preact_resnet20") || n.contains("preact_resnet_cifar") => ("preact_resnet20_cifar", "cifar10"),
        n if n.contains("resnet20") || n.starts_with("ssl_") => ("resnet20_cifar", "cifar10"),
        n if n.contains("resnet56") => ("resnet56_cifar", "cifar10"),
        n if n.contains("vgg16") => ("vgg16_cifar", "cifar10"),
        n if n.contains("vgg19") => ("vgg19", "imagenet"),
        n if n.contains("preact_resnet18") => ("preact_resnet18", "imagenet"),
        n if n.contains("resnet18") => ("resnet18", "imagenet"),
        n if n.contains("resnet50") => ("resnet50", "imagenet"),
        n if n.contains("alexnet_bn") => ("alexnet_bn", "imagenet"),
        n if n.contains("alexnet") => ("alexnet", "imagenet"),
        n if n.contains("mobilenet") => ("mobilenet", "imagenet"),
        n if n.contains("plain20") => ("plain20_cifar", "cifar10"),
        n if n.contains("simplenet_mnist") => ("simplenet_mnist", "mnist"),
        _ => return None,
    })
}

/// Corpus schedules written for a zoo model and checked against it: 37 for MNIST and CIFAR-10 models, 29 for
/// ImageNet ones (resnet50: 11, alexnet: 5, resnet18: 4, alexnet_bn: 3, preact_resnet18: 3, mobilenet: 2, vgg19: 1);
/// the two ImageNet statistics files are checked by the next test.
const VALIDATED: usize = 66;

#[test]
fn distiller_corpus_loads_or_fails_precisely() {
    let dir = corpus();
    assert!(dir.is_dir(), "Distiller's schedules are expected in {} (vendored from Distiller, Apache-2.0)", dir.display());
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    files.sort();
    assert_eq!(files.len(), 87, "the corpus in tests/distiller-schedules");
    let (mut ok, mut thinning, mut stats, mut other) = (0, 0, 0, Vec::new());
    let mut thinning_validated = Vec::new();
    let mut validated = 0;
    for f in &files {
        match Schedule::from_file(f) {
            Ok(s) => {
                ok += 1;
                let name = f.file_name().unwrap().to_string_lossy();
                if let Some((arch, dataset)) = zoo_model(&name) {
                    let model = create_model(arch, dataset, Device::Cpu).unwrap();
                    s.check_model(&model).unwrap_or_else(|e| panic!("{} against {arch}: {e}", f.display()));
                    s.build(&model).unwrap_or_else(|e| panic!("{} builds for {arch}: {e}", f.display()));
                    validated += 1;
                    if !s.extensions.is_empty() {
                        thinning_validated.push(name.to_string());
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if msg.contains("thinning") {
                    thinning += 1;
                } else if msg.contains("is an activation-statistics file") {
                    stats += 1;
                } else {
                    other.push(msg);
                }
            }
        }
    }
    assert!(other.is_empty(), "unexpected failures:\n{}", other.join("\n"));
    assert_eq!((ok, thinning, stats), (81, 0, 6));
    assert_eq!(validated, VALIDATED, "schedules written for zoo models, checked against their parameter names");
    thinning_validated.sort();
    assert_eq!(
        thinning_validated,
        ["resnet20_filters.bn_fold.schedule_agp.yaml", "resnet20_filters.schedule_agp.yaml", "resnet20_filters.schedule_agp_2.yaml", "resnet20_filters.schedule_agp_3.yaml", "resnet20_filters.schedule_agp_4.yaml", "resnet50.filters.activation_apoz_agp.yaml", "resnet50.schedule_agp.filters.yaml", "resnet50.schedule_agp.filters_2.yaml", "resnet50.schedule_agp.filters_3.yaml", "resnet50.schedule_agp.filters_with_FC.yaml", "resnet56_cifar_activation_apoz.yaml", "resnet56_cifar_activation_apoz_v2.yaml", "resnet56_cifar_channel_rank.yaml", "resnet56_cifar_filter_rank.yaml", "resnet56_cifar_filter_rank_v2.yaml", "simplenet_mnist_pruning.yaml", "ssl_channels-removal_training.yaml", "ssl_channels-removal_training_x1.8.yaml", "ssl_filter-removal_training.yaml", "vgg16_cifar_ssl_channels_training.yaml", "vgg19.schedule_filter_rank.yaml"],
        "thinning schedules written for zoo models, checked and built"
    );
}

/// Distiller's activation statistics of its ResNet-18 and ResNet-50 name every module of ours, ours every one of
/// theirs: the ImageNet ResNets have Distiller's module names (`relu1`, `relu2`, `add`), not only its parameters.
#[test]
fn distillers_imagenet_statistics_name_our_modules() {
    for arch in ["resnet18", "resnet50"] {
        let path = corpus().join(format!("examples/quantization/post_train_quant/stats/{arch}_quant_stats.yaml"));
        let stats = distill::quantization::stats::ActivationStats::from_yaml_file(&path).unwrap();
        let model = create_model(arch, "imagenet", Device::Cpu).unwrap();
        let mut leaves: Vec<String> = model.named_modules().into_iter().filter(|m| m.is_leaf).map(|m| m.name).collect();
        let mut theirs: Vec<String> = stats.modules.iter().map(|(n, _)| n.clone()).collect();
        leaves.sort();
        theirs.sort();
        assert_eq!(leaves, theirs, "{arch}");
    }
}

fn problems(text: &str) -> String {
    Schedule::from_yaml_str(text, "s.yaml").unwrap_err().to_string()
}

const AGP: &str = "pruners:
  p:
    class: AutomatedGradualPruner
    initial_sparsity: 0.05
    final_sparsity: 0.8
    weights: [conv1.weight]
policies:
  - pruner:
      instance_name: p
    starting_epoch: 0
    ending_epoch: 4
    frequency: 1
";

#[test]
fn bad_schedules_fail_with_located_messages() {
    assert!(Schedule::from_yaml_str(AGP, "s.yaml").is_ok());
    let cases: &[(&str, &str, &str)] = &[
        ("weights: [conv1.weight]", "weights: [conv1.weight", "s.yaml:7:9: malformed YAML: did not find expected ',' or ']'"),
        ("AutomatedGradualPruner", "AutomaticGradualPruner", "s.yaml:3:12: unknown pruner class 'AutomaticGradualPruner'; did you mean 'AutomatedGradualPruner'?"),
        ("final_sparsity: 0.8", "final_sparsity: 1.2", "s.yaml:5:5: invalid final_sparsity: 1.2 must lie in [0, 1)"),
        ("final_sparsity: 0.8", "final_sparsity: 0.01", "s.yaml:5:5: invalid final_sparsity: 0.01 must be above initial_sparsity 0.05"),
        ("initial_sparsity: 0.05", "initial_sparsity: -0.1", "s.yaml:4:5: invalid initial_sparsity: -0.1 must lie in [0, 1)"),
        ("frequency: 1", "frequency: 0", "s.yaml:12:5: invalid policy schedule: frequency 0 must lie in 1..=4"),
        ("    starting_epoch: 0\n    ending_epoch: 4\n    frequency: 1\n", "    epochs: [3, 1]\n", "s.yaml:10:5: invalid policy schedule: epochs [3, 1] must be strictly increasing"),
        ("    initial_sparsity: 0.05\n", "    initial_sparsity: 0.05\n    final_sparsty: 0.3\n", "s.yaml:5:5: AutomatedGradualPruner: unknown field `final_sparsty`, expected one of `initial_sparsity`, `final_sparsity`, `weights`"),
        ("instance_name: p", "instance_name: q", "s.yaml:9:22: unknown pruner 'q'; did you mean 'p'? (valid: p)"),
        ("policies:", "polices:", "s.yaml:7:1: unknown top-level key 'polices'; did you mean 'policies'?"),
        ("    frequency: 1\n", "    frequency: 1\n    every: 2\n", "s.yaml:13:5: unknown policy key 'every' (valid: pruner, regularizer"),
        ("class: AutomatedGradualPruner", "class: StepLR", "s.yaml:3:12: StepLR is not a pruner class; it belongs in another section"),
        ("class: AutomatedGradualPruner", "kind: AutomatedGradualPruner", "s.yaml:2:3: 'p' has no 'class'"),
    ];
    for (from, to, expected) in cases {
        let text = AGP.replace(from, to);
        assert_ne!(text, AGP, "{from}");
        let err = problems(&text);
        assert!(err.contains(expected), "for {to:?}:\n  expected {expected:?}\n  got {err}");
    }
    let quant = "quantizers:\n  q:\n    class: DorefaQuantizer\n    bits_weights: 4\n    overrides:\n      'conv(1':\n        bits_weights: null\n";
    let err = problems(quant);
    assert!(err.contains("s.yaml:6:7: invalid overrides: 'conv(1' is not a valid regex"), "{err}");
    let err = problems("- just\n- a list\n");
    assert!(err.contains("s.yaml:1:1: a schedule must be a mapping"), "{err}");
}

#[test]
fn parameter_names_are_checked_against_the_model() {
    let model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let ok = Schedule::from_yaml_str(&AGP.replace("conv1.weight", "module.layer1.0.conv1.weight"), "s.yaml").unwrap();
    ok.check_model(&model).unwrap();
    let bad = Schedule::from_yaml_str(&AGP.replace("[conv1.weight]", "[conv1.weight, module.layer1.0.conv1.weigth]"), "s.yaml").unwrap();
    let err = bad.check_model(&model).unwrap_err().to_string();
    assert!(err.contains("s.yaml:6:29: unknown parameter 'module.layer1.0.conv1.weigth'; did you mean 'layer1.0.conv1.weight'"), "{err}");
    let err = bad.build(&model).err().unwrap().to_string();
    assert!(err.contains("unknown parameter"), "build checks names too: {err}");
}

#[test]
fn yaml_roundtrip_and_builders_agree() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules/lenet_agp.yaml");
    let loaded = Schedule::from_file(&path).unwrap();
    let again = Schedule::from_yaml_str(&loaded.to_yaml().unwrap(), "again.yaml").unwrap();
    assert_eq!(loaded, again);
    let built = Schedule::new()
        .pruner("p", PrunerConfig::AutomatedGradualPruner { initial_sparsity: 0.05, final_sparsity: 0.8, weights: vec!["conv1.weight".into()] })
        .policy(PolicyConfig::pruner("p").epochs_range(0, 4, 1));
    assert_eq!(built, Schedule::from_yaml_str(AGP, "s.yaml").unwrap());
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let err = Schedule::new().policy(PolicyConfig::pruner("p").epochs_range(0, 4, 0)).build(&model).err().unwrap().to_string();
    assert!(err.contains("frequency 0"), "{err}");
}

/// Checks, after every optimizer step, that every weight outside the final masks is exactly zero.
struct PrunedStayZero {
    masks: Arc<Mutex<Vec<(String, Tensor)>>>,
    checks: Arc<Mutex<usize>>,
}

impl PrunedStayZero {
    fn check(&self, ctx: &PolicyContext) -> distill::Result<()> {
        let masks = self.masks.lock().unwrap();
        if masks.is_empty() {
            return Ok(());
        }
        for (name, mask) in masks.iter() {
            let w = ctx.model.parameter(name)?;
            let revived = w.f_mul(&(1.0 - mask))?.f_count_nonzero(None::<i64>)?.int64_value(&[]);
            assert_eq!(revived, 0, "{name}: {revived} pruned weights became non-zero in epoch {}", ctx.epoch);
        }
        *self.checks.lock().unwrap() += 1;
        Ok(())
    }
}

impl Policy for PrunedStayZero {
    fn name(&self) -> String {
        "PrunedStayZero".into()
    }
    fn on_epoch_begin(&mut self, ctx: &mut PolicyContext) -> distill::Result<()> {
        let mut masks = self.masks.lock().unwrap();
        if masks.is_empty() {
            for name in ["conv2.weight", "fc1.weight", "fc2.weight"] {
                let m = ctx.masks.get(name)?.mask.as_ref().expect("pruning set a mask").copy();
                masks.push((name.to_string(), m));
            }
        }
        Ok(())
    }
    fn on_minibatch_begin(&mut self, ctx: &mut PolicyContext, _: Minibatch) -> distill::Result<()> {
        self.check(ctx)
    }
    fn on_minibatch_end(&mut self, ctx: &mut PolicyContext, _: Minibatch) -> distill::Result<()> {
        self.check(ctx)
    }
}

#[test]
fn agp_prunes_lenet_to_90_percent_and_masks_hold_while_fine_tuning() {
    let data = distill::data::mnist_bundled().unwrap();
    let agp = Schedule::from_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules/lenet_agp.yaml")).unwrap();
    let dense = Schedule::from_yaml_str(
        "lr_schedulers:\n  cosine: {class: CosineAnnealingLR, T_max: 10}\npolicies:\n  - lr_scheduler: {instance_name: cosine}\n    starting_epoch: 0\n    ending_epoch: 10\n    frequency: 1\n",
        "dense.yaml",
    )
    .unwrap();
    let (mut pruned_top1, mut dense_top1) = (Vec::new(), Vec::new());
    let mut total_checks = 0;
    for seed in 1..=3u64 {
        let config = TrainConfig { epochs: 10, lr: 0.02, batch_size: 32, seed, progress: Progress::Quiet, ..TrainConfig::default() };
        tch::manual_seed(seed as i64);
        let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
        let mut scheduler = agp.build(&model).unwrap();
        let checks = Arc::new(Mutex::new(0));
        let watcher = PrunedStayZero { masks: Arc::new(Mutex::new(Vec::new())), checks: checks.clone() };
        scheduler.add_policy(Box::new(watcher), distill::scheduler::PolicySchedule::range(6, 10, 1).unwrap());
        let run = fit(&mut model, &data, Some(&mut scheduler), &config).unwrap();
        for name in ["conv2.weight", "fc1.weight"] {
            let s = distill::pruning::criteria::sparsity(&model.parameter(name).unwrap()).unwrap();
            assert!(s >= 0.90, "{name} sparsity {s}");
        }
        total_checks += *checks.lock().unwrap();
        pruned_top1.push(run.test.top1);

        tch::manual_seed(seed as i64);
        let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
        let mut scheduler = dense.build(&model).unwrap();
        dense_top1.push(fit(&mut model, &data, Some(&mut scheduler), &config).unwrap().test.top1);
    }
    assert_eq!(total_checks, 3 * 4 * 2 * 125, "checked before and after every step of the 4 fine-tuning epochs");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (p, d) = (mean(&pruned_top1), mean(&dense_top1));
    assert!(d - p <= 1.0, "pruned {pruned_top1:?} (mean {p:.2}) vs dense {dense_top1:?} (mean {d:.2})");
    let _ = Kind::Float;
}
