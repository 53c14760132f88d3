//! Checkpoints written by PyTorch (`scripts/pytorch_fixtures.py`, torch 2.13.0): a plain state dict with
//! `num_batches_tracked`, a Distiller `.pth.tar` in the legacy container with `module.` prefixes, masks, epoch and
//! optimizer state, and a file of input and PyTorch's output. Loaded into distill's models they compute PyTorch's
//! output; broken or foreign files are clear errors.
use std::path::{Path, PathBuf};

use distill::models::create_model;
use distill::train::{Checkpoint, CheckpointFormat};
use tch::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pytorch").join(name)
}

fn input_and_output(path: &Path) -> (Tensor, Tensor) {
    let io = Checkpoint::load(path).unwrap();
    let get = |n: &str| io.model.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    (get("input"), get("output"))
}

fn relative_difference(ours: &Tensor, theirs: &Tensor) -> f64 {
    (ours - theirs).abs().max().double_value(&[]) / theirs.abs().max().double_value(&[])
}

fn check_output(model: &mut distill::nn::Model, io: &Path) -> f64 {
    let (x, y) = input_and_output(io);
    let ours = tch::no_grad(|| model.forward_t(&x, false)).unwrap();
    relative_difference(&ours, &y)
}

#[test]
fn a_pytorch_state_dict_loads_and_computes_pytorchs_output() {
    let path = fixture("resnet20_cifar.pth");
    let checkpoint = Checkpoint::load(&path).unwrap();
    assert_eq!(checkpoint.format, CheckpointFormat::PyTorch);
    assert!(checkpoint.meta.arch.is_empty(), "a plain state dict does not name its architecture");
    assert!(checkpoint.model.iter().all(|(n, _)| !n.ends_with("num_batches_tracked")));
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    checkpoint.restore_model(&mut model, &path).unwrap();
    let diff = check_output(&mut model, &fixture("resnet20_cifar_io.pth"));
    assert!(diff <= 1e-5, "distill differs from PyTorch by {diff:e} of the output scale");
}

#[test]
fn a_distiller_checkpoint_loads_with_its_metadata_and_masks() {
    let path = fixture("resnet20_cifar_distiller.pth.tar");
    let checkpoint = Checkpoint::load(&path).unwrap();
    assert_eq!(checkpoint.format, CheckpointFormat::Distiller { epoch: Some(7), best_top1: Some(91.25) });
    assert_eq!((checkpoint.meta.arch.as_str(), checkpoint.meta.dataset.as_str(), checkpoint.meta.epoch), ("resnet20_cifar", "cifar10", 7));
    // The None mask of conv1 is no mask; layer1.0.conv1's keeps every other filter.
    assert_eq!(checkpoint.masks.len(), 1);
    let (name, mask) = &checkpoint.masks[0];
    assert_eq!(name, "module.layer1.0.conv1.weight");
    assert_eq!(mask.sum(tch::Kind::Double).double_value(&[]), 8.0 * 16.0 * 9.0);
    // The optimizer's momentum buffers are not taken for weights.
    assert_eq!(checkpoint.model.len(), create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap().state_dict().len());
    let mut model = distill::models::load_checkpoint(&path, Device::Cpu).unwrap();
    let diff = check_output(&mut model, &fixture("resnet20_cifar_io.pth"));
    assert!(diff <= 1e-5, "distill differs from PyTorch by {diff:e} of the output scale");
}

#[test]
fn a_distiller_checkpoint_resumes_with_its_masks_and_epoch() {
    use distill::scheduler::CompressionScheduler;
    let path = fixture("resnet20_cifar_distiller.pth.tar");
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let yaml = "pruners:\n  p:\n    class: AutomatedGradualPruner\n    initial_sparsity: 0.05\n    final_sparsity: 0.5\n    weights: [layer1.0.conv1.weight]\npolicies:\n  - pruner: {instance_name: p}\n    starting_epoch: 0\n    ending_epoch: 10\n    frequency: 1\n";
    let mut scheduler: CompressionScheduler = distill::config::Schedule::from_yaml_str(yaml, "s.yaml").unwrap().build(&model).unwrap();
    let config = distill::train::TrainConfig { epochs: 10, progress: distill::train::Progress::Quiet, ..Default::default() };
    let mut trainer = distill::train::Trainer::new(&mut model, config).unwrap().with_scheduler(&mut scheduler);
    trainer.resume(&path).unwrap();
    assert_eq!(trainer.next_epoch(), 8);
    drop(trainer);
    let mask = scheduler.masks().tensors().into_iter().find(|(n, _)| n == "layer1.0.conv1.weight").unwrap().1;
    assert_eq!(mask.sum(tch::Kind::Double).double_value(&[]), 8.0 * 16.0 * 9.0);
}

#[test]
fn a_whole_saved_model_reads_as_its_state_dict() {
    let checkpoint = Checkpoint::load(fixture("whole_model.pt")).unwrap();
    let mut names: Vec<&str> = checkpoint.model.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["0.bias", "0.weight", "1.bias", "1.running_mean", "1.running_var", "1.weight"]);
    let w = &checkpoint.model.iter().find(|(n, _)| n == "0.weight").unwrap().1;
    assert_eq!(w.size(), [3, 4]);
    assert!((w.double_value(&[0, 0]) - 0.2576315999031067).abs() < 1e-7);
}

#[test]
fn a_safetensors_state_dict_without_metadata_loads() {
    let dir = distill::io::TempDir::new().unwrap();
    let source = distill::models::load_checkpoint(fixture("resnet20_cifar_distiller.pth.tar"), Device::Cpu).unwrap();
    let path = dir.path().join("bare.safetensors");
    let mut named = source.state_dict();
    // As a PyTorch state dict saved by safetensors.torch has it.
    named.push(("bn1.num_batches_tracked".into(), Tensor::from(1234i64)));
    Tensor::write_safetensors(&named, &path).unwrap();
    let checkpoint = Checkpoint::load(&path).unwrap();
    assert_eq!(checkpoint.format, CheckpointFormat::StateDict);
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    checkpoint.restore_model(&mut model, &path).unwrap();
    let diff = check_output(&mut model, &fixture("resnet20_cifar_io.pth"));
    assert!(diff <= 1e-5, "{diff:e}");
    let err = distill::models::load_checkpoint(&path, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("does not name its architecture"), "{err}");
}

#[test]
fn broken_and_foreign_checkpoints_are_clear_errors() {
    let dir = distill::io::TempDir::new().unwrap();
    // Truncated and corrupted copies.
    let bytes = std::fs::read(fixture("resnet20_cifar.pth")).unwrap();
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::load(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated.pth"), "{err}");
    let garbage = dir.path().join("garbage.pth");
    std::fs::write(&garbage, b"this is not a checkpoint at all").unwrap();
    let err = Checkpoint::load(&garbage).unwrap_err().to_string();
    assert!(err.contains("garbage.pth") && err.contains("not a PyTorch checkpoint"), "{err}");
    // Distiller checkpoints of thinned and of quantized models.
    let err = Checkpoint::load(fixture("distiller_thinned.pth.tar")).unwrap_err().to_string();
    assert!(err.contains("thinned model (1 thinning recipe(s))"), "{err}");
    let err = Checkpoint::load(fixture("distiller_quantized.pth.tar")).unwrap_err().to_string();
    assert!(err.contains("quantized model: load the floating-point checkpoint"), "{err}");
    // A pickle of an object the reader does not know holds no tensors.
    let err = Checkpoint::load(fixture("unknown_class.pth")).unwrap_err().to_string();
    assert!(err.contains("no tensors found"), "{err}");
    // Another architecture: the Distiller checkpoint names its own.
    let path = fixture("resnet20_cifar_distiller.pth.tar");
    let mut other = create_model("resnet32_cifar", "cifar10", Device::Cpu).unwrap();
    let err = Checkpoint::load(&path).unwrap().restore_model(&mut other, &path).unwrap_err().to_string();
    assert!(err.contains("Distiller checkpoint saved from 'resnet20_cifar' (cifar10), the model is 'resnet32_cifar'"), "{err}");
    // A plain state dict into the wrong model: every differing tensor is listed.
    let path = fixture("resnet20_cifar.pth");
    let err = Checkpoint::load(&path).unwrap().restore_model(&mut other, &path).unwrap_err().to_string();
    assert!(err.contains("missing 'layer1.3.conv1.weight'"), "{err}");
    // A plain state dict cannot be resumed.
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let mut trainer = distill::train::Trainer::new(&mut model, distill::train::TrainConfig::default()).unwrap();
    let err = trainer.resume(&path).unwrap_err().to_string();
    assert!(err.contains("--load-weights"), "{err}");
}

/// torchvision's resnet18 in a Distiller-layout file: needs a Python with torch and torchvision, named by
/// `DISTILL_TORCH_PYTHON` (the project's CPU set-up has no importable torch in Python), so it does not run in CI.
#[test]
fn torchvision_resnet18_computes_pytorchs_output() {
    let Ok(python) = std::env::var("DISTILL_TORCH_PYTHON") else {
        eprintln!("skipped: set DISTILL_TORCH_PYTHON to a Python with torch 2.13.0 and torchvision 0.28.0 to run it");
        return;
    };
    let dir = distill::io::TempDir::new().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pytorch_fixtures.py");
    let status = std::process::Command::new(python).arg(script).arg("--resnet18").arg(dir.path()).status().unwrap();
    assert!(status.success());
    let mut model = distill::models::load_checkpoint(dir.path().join("resnet18.pth.tar"), Device::Cpu).unwrap();
    let diff = check_output(&mut model, &dir.path().join("resnet18_io.pth"));
    println!("resnet18: distill differs from PyTorch by {diff:.2e} of the output scale");
    assert!(diff <= 1e-5, "{diff:e}");
}
