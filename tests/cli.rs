//! The `distill` binary: bad input is an error message and a non-zero exit, never a panic.
use std::process::{Command, Output};

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill")).args(args).env_remove("LD_LIBRARY_PATH").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn runs_without_ld_library_path_and_lists_models() {
    let o = distill(&["models"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("mnist: simplenet_mnist, simplenet_v2_mnist, lenet, mlp"), "{out}");
}

#[test]
fn bad_arguments_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--arch", "lenett", "--dataset", "mnist", "--out", out], "unknown architecture 'lenett'; did you mean 'lenet'"),
        (&["train", "--arch", "lenet", "--dataset", "mnits", "--out", out], "unknown dataset 'mnits'"),
        (&["train", "--arch", "resnet20_cifar", "--dataset", "cifar10", "--out", out], "cifar10 needs --data-dir"),
        (&["train", "--arch", "lenet", "--dataset", "mnist", "--epochs", "0", "--out", out], "invalid epochs"),
        (&["train", "--arch", "lenet", "--dataset", "mnist", "--lr", "nan", "--out", out], "invalid learning rate"),
        (&["train", "--arch", "lenet", "--dataset", "mnist", "--device", "tpu", "--out", out], "unknown device 'tpu'"),
        (&["train", "--arch", "lenet", "--dataset", "mnist", "--data-dir", "/nonexistent", "--out", out], "MNIST file not found"),
        (&["train", "--arch", "lenet", "--dataset", "mnist", "--resume", "/nonexistent.safetensors", "--epochs", "1", "--out", out], "/nonexistent.safetensors"),
        (&["train", "--arch", "lenet", "--dataset", "mnist", "--epochs", "abc", "--out", out], "invalid value 'abc'"),
    ];
    for (args, message) in cases {
        let o = distill(args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(message), "{args:?}: expected '{message}' in:\n{err}");
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    }
}

#[test]
fn cuda_request_on_a_cpu_machine_is_an_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = distill(&["train", "--arch", "lenet", "--dataset", "mnist", "--device", "cuda", "--out", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("libtorch sees no CUDA device"), "{}", stderr(&o));
}

#[test]
fn trains_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = distill(&["train", "--arch", "mlp", "--dataset", "mnist", "--epochs", "1", "--progress", "lines", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["checkpoint.safetensors", "best.safetensors", "metrics.csv", "summary.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["arch"], "mlp");
    assert!(summary["test"]["top1"].as_f64().unwrap() > 70.0, "{summary}");
}
