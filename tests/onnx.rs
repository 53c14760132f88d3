//! ONNX export checked by onnxruntime (from the project's `.venv`, installed by scripts/setup.sh): ONNX's full
//! checker passes and onnxruntime computes what distill computes, for every zoo model, masked and thinned ones
//! included; what the exporter cannot write is an error that leaves no file.
use std::path::{Path, PathBuf};
use std::process::Command;

use distill::export::onnx::export_onnx;
use distill::models::{architectures, create_model};
use distill::nn::{Conv2d, Conv2dConfig, Linear, Model, ModelInfo, Sequential, TensorOp};
use distill::thinning::Thinner;
use tch::{Device, Tensor};

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

/// Deterministic inputs in [-1, 1), independent of libtorch's shared random state.
fn input(model: &Model, n: i64) -> Tensor {
    let s = &model.info().input_shape;
    let count = n * s.iter().product::<i64>();
    let v: Vec<f32> = (0..count).map(|i| ((i * 7919 % 2000) as f32) / 1000.0 - 1.0).collect();
    let mut shape = vec![n];
    shape.extend(s);
    Tensor::from_slice(&v).reshape(shape.as_slice())
}

fn write_f32(path: &Path, t: &Tensor) {
    let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn read_f32(path: &Path, shape: &[i64]) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Tensor::from_slice(&v).reshape(shape)
}

/// Exports each model, runs all of them in one onnxruntime process, and returns the largest difference to
/// distill's eval-mode output relative to that output's scale, per model.
fn compare(models: &mut [(String, Model)], dir: &Path) -> Vec<(String, f64)> {
    let mut manifest = String::new();
    let mut expected = Vec::new();
    for (label, model) in models.iter_mut() {
        let x = input(model, 3);
        let y = tch::no_grad(|| model.forward_t(&x, false)).unwrap();
        let (onnx, inp, out) = (dir.join(format!("{label}.onnx")), dir.join(format!("{label}.in")), dir.join(format!("{label}.out")));
        export_onnx(model, &onnx).unwrap();
        write_f32(&inp, &x);
        let dims: Vec<String> = x.size().iter().map(|d| d.to_string()).collect();
        manifest += &format!("{} {} {} {}\n", onnx.display(), inp.display(), dims.join(" "), out.display());
        expected.push((label.clone(), y, out));
    }
    let list = dir.join("manifest.txt");
    std::fs::write(&list, manifest).unwrap();
    let run = Command::new(python()).arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/onnx_run.py")).arg(&list).output().unwrap();
    assert!(run.status.success(), "onnxruntime: {}", String::from_utf8_lossy(&run.stderr));
    expected
        .into_iter()
        .map(|(label, y, out)| {
            let theirs = read_f32(&out, &y.size());
            let diff = (&theirs - &y).abs().max().double_value(&[]) / y.abs().max().double_value(&[]).max(1e-12);
            (label, diff)
        })
        .collect()
}

#[test]
fn every_zoo_model_exports_and_onnxruntime_agrees() {
    let dir = distill::io::TempDir::new().unwrap();
    let mut models = Vec::new();
    for dataset in ["mnist", "cifar10"] {
        for arch in architectures(Some(dataset)) {
            models.push((arch.to_string(), create_model(arch, dataset, Device::Cpu).unwrap()));
        }
    }
    assert!(models.len() >= 20, "{} zoo models", models.len());
    for (label, diff) in compare(&mut models, dir.path()) {
        assert!(diff <= 1e-4, "{label}: onnxruntime differs by {diff:e} of the output scale");
    }
}

#[test]
fn masked_and_thinned_models_export_their_shapes() {
    let dir = distill::io::TempDir::new().unwrap();
    let dense = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
    let mut thinned = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
    thinned.load_state_dict(&dense.state_dict(), true).unwrap();
    tch::no_grad(|| {
        for (name, w) in thinned.named_parameters() {
            if name.starts_with("layer") && name.ends_with(".conv1.weight") {
                let _ = w.narrow(0, 0, w.size()[0] / 2).fill_(0.0);
            }
        }
    });
    let mut masked = create_model("resnet56_cifar", "cifar10", Device::Cpu).unwrap();
    masked.load_state_dict(&thinned.state_dict(), true).unwrap();
    Thinner::filters().apply(&mut thinned).unwrap();
    let (dense_params, thin_params) = (dense.num_parameters(), thinned.num_parameters());
    let mut models = vec![("dense".to_string(), dense), ("masked".to_string(), masked), ("thinned".to_string(), thinned)];
    for (label, diff) in compare(&mut models, dir.path()) {
        assert!(diff <= 1e-4, "{label}: onnxruntime differs by {diff:e}");
    }
    let size = |l: &str| std::fs::metadata(dir.path().join(format!("{l}.onnx"))).unwrap().len() as f64;
    // A masked model's zeros still take their bytes; a thinned one's file shrinks with its parameters.
    assert_eq!(size("masked"), size("dense"));
    let (file_ratio, param_ratio) = (size("thinned") / size("dense"), thin_params as f64 / dense_params as f64);
    assert!((file_ratio - param_ratio).abs() <= 0.05, "file {file_ratio:.3} vs parameters {param_ratio:.3}");
}

#[test]
fn what_the_exporter_cannot_write_is_an_error_and_no_file() {
    let dir = distill::io::TempDir::new().unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = Sequential::new()
        .add("conv", Conv2d::new(vs.root() / "conv", Conv2dConfig::new(1, 2, 3)).unwrap())
        .add_fn("square", |x| Ok(x * x))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(vs.root() / "fc", 2 * 4 * 4, 3, true).unwrap());
    let mut model = Model::new(vs, net, ModelInfo::new("custom", "toy", [1, 6, 6], 3)).unwrap();
    let path = dir.path().join("custom.onnx");
    let err = export_onnx(&mut model, &path).unwrap_err().to_string();
    assert!(err.contains("'square'") && err.contains("opaque"), "{err}");
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no partial file left");
    let mut lenet = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let err = export_onnx(&mut lenet, dir.path().join("missing/dir/lenet.onnx")).unwrap_err().to_string();
    assert!(err.contains("missing/dir"), "{err}");
}
