//! Truncated SVD of fully connected layers: exact values on weights of known singular values, the rank choices,
//! all-or-nothing errors, checkpoints that rebuild the factorized model, and fine-tuning after it.
use distill::factorization::{truncated_svd, Rank};
use distill::models::{copy_model, create_model};
use distill::nn::Model;
use distill::thinning::Thinner;
use distill::train::{fit, Checkpoint, Progress, TrainConfig};
use tch::{Device, Kind, Tensor};

fn input(seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::rand([8, 1, 28, 28], (Kind::Float, Device::Cpu))
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// fc3 (10 × 84) set to zeros with 5, 4, 3, 2, 1 on its diagonal: singular values 5..1, ‖W‖² = 55.
fn lenet_with_known_fc3() -> Model {
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::no_grad(|| {
        let w = model.parameter("fc3.weight").unwrap();
        let _ = w.shallow_clone().fill_(0.0);
        for (i, v) in [5.0, 4.0, 3.0, 2.0, 1.0].iter().enumerate() {
            let _ = w.get(i as i64).get(i as i64).fill_(*v);
        }
    });
    model
}

fn f64_at(df: &distill::polars::prelude::DataFrame, col: &str) -> f64 {
    df.column(col).unwrap().f64().unwrap().get(0).unwrap()
}

#[test]
fn the_kept_singular_values_give_exact_energy_error_and_sizes() {
    let mut model = lenet_with_known_fc3();
    let report = truncated_svd(&mut model, &[("fc3", Rank::Count(2))]).unwrap();
    assert_eq!(report.column("rank").unwrap().i64().unwrap().get(0), Some(2));
    assert_eq!(report.column("params before").unwrap().i64().unwrap().get(0), Some(10 * 84 + 10));
    assert_eq!(report.column("params after").unwrap().i64().unwrap().get(0), Some(2 * (10 + 84) + 10));
    assert!((f64_at(&report, "energy kept (%)") - 100.0 * 41.0 / 55.0).abs() < 1e-9, "{report}");
    assert!((f64_at(&report, "relative error") - (14.0f64 / 55.0).sqrt()).abs() < 1e-9, "{report}");
    // The product of the two layers is W with 3, 2 and 1 gone: diag(5, 4, 0, ...).
    let product = model.parameter("fc3.fc_u.weight").unwrap().matmul(&model.parameter("fc3.fc_sv.weight").unwrap());
    let expected = Tensor::zeros([10, 84], (Kind::Float, Device::Cpu));
    let _ = expected.get(0).get(0).fill_(5.0);
    let _ = expected.get(1).get(1).fill_(4.0);
    assert!(max_abs(&(product - expected)) < 1e-5);
    // The original bias moves to fc_u; fc_sv has none.
    assert_eq!(model.named_parameters().iter().filter(|(n, _)| n.starts_with("fc3.")).map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["fc3.fc_sv.weight", "fc3.fc_u.weight", "fc3.fc_u.bias"]);
    assert_eq!(model.module("fc3").unwrap().type_name(), "TruncatedSVD");
}

#[test]
fn ranks_follow_counts_distillers_ratio_and_energy() {
    // Energy 0.7: 25/55 = 0.45 is short, 41/55 = 0.745 is enough.
    for (rank, expected) in [(Rank::Energy(0.7), 2), (Rank::Energy(0.75), 3), (Rank::Energy(1.0), 5), (Rank::Ratio(0.25), 2), (Rank::Ratio(1.0), 10), (Rank::Count(7), 7)] {
        let mut model = lenet_with_known_fc3();
        let report = truncated_svd(&mut model, &[("fc3", rank)]).unwrap();
        assert_eq!(report.column("rank").unwrap().i64().unwrap().get(0), Some(expected), "{rank:?}");
    }
}

#[test]
fn at_full_rank_the_network_computes_what_it_did() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let x = input(1);
    let before = model.forward_t(&x, false).unwrap();
    let report = truncated_svd(&mut model, &[("fc1", Rank::Count(120)), ("fc2", Rank::Ratio(1.0))]).unwrap();
    assert_eq!(report.height(), 2);
    let after = model.forward_t(&x, false).unwrap();
    assert!(max_abs(&(&after - &before)) < 1e-4, "{}", max_abs(&(&after - &before)));
    // The replaced layers' variables left the store; the new ones are in it, so the model still moves whole.
    let store = model.var_store().variables();
    assert!(!store.contains_key("fc1.weight") && store.contains_key("fc1.fc_sv.weight") && store.contains_key("fc2.fc_u.bias"));
}

#[test]
fn bad_requests_are_errors_and_leave_the_model_as_it_was() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let before: Vec<(String, Tensor)> = model.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let store_before: std::collections::BTreeSet<String> = model.var_store().variables().into_keys().collect();
    let err = |model: &mut Model, layers: &[(&str, Rank)]| truncated_svd(model, layers).unwrap_err().to_string();
    assert!(err(&mut model, &[("fc9", Rank::Count(2))]).contains("fc1"), "did-you-mean");
    assert!(err(&mut model, &[("conv2", Rank::Count(2))]).contains("Conv2d"));
    assert!(err(&mut model, &[("fc1", Rank::Count(0))]).contains("1..=120"));
    assert!(err(&mut model, &[("fc1", Rank::Count(121))]).contains("1..=120"));
    assert!(err(&mut model, &[("fc3", Rank::Ratio(0.05))]).contains("raise the preserve ratio"));
    assert!(err(&mut model, &[("fc1", Rank::Ratio(1.5))]).contains("(0, 1]"));
    assert!(err(&mut model, &[("fc1", Rank::Energy(0.0))]).contains("(0, 1]"));
    assert!(err(&mut model, &[("fc1", Rank::Count(4)), ("fc1", Rank::Count(5))]).contains("twice"));
    assert!(err(&mut model, &[]).contains("no layer"));
    // A valid first layer, then an impossible rank: nothing is changed, not even the first.
    assert!(err(&mut model, &[("fc1", Rank::Count(4)), ("fc2", Rank::Count(200))]).contains("fc2"));
    let _ = tch::no_grad(|| model.parameter("fc2.weight").unwrap().get(0).get(0).fill_(f64::NAN));
    assert!(err(&mut model, &[("fc1", Rank::Count(4)), ("fc2", Rank::Count(2))]).contains("NaN"));
    let _ = tch::no_grad(|| model.parameter("fc2.weight").unwrap().get(0).get(0).copy_(&before.iter().find(|(n, _)| n == "fc2.weight").unwrap().1.get(0).get(0)));
    let after = model.state_dict();
    assert_eq!(after.iter().map(|(n, _)| n).collect::<Vec<_>>(), before.iter().map(|(n, _)| n).collect::<Vec<_>>());
    for ((n, a), (_, b)) in after.iter().zip(&before) {
        assert!(a.equal(b), "{n} changed");
    }
    assert!(model.factorizations().is_empty());
    assert_eq!(model.var_store().variables().into_keys().collect::<std::collections::BTreeSet<_>>(), store_before);
}

#[test]
fn checkpoints_and_copies_rebuild_the_factorized_model() {
    let dir = distill::io::TempDir::new().unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    truncated_svd(&mut model, &[("fc1", Rank::Count(16))]).unwrap();
    let path = dir.path().join("svd.safetensors");
    Checkpoint::capture(&model, None, None, 0, 1, Vec::new()).save(&path).unwrap();
    let x = input(2);
    let expected = model.forward_t(&x, false).unwrap();
    let loaded = distill::models::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(loaded.parameter("fc1.fc_sv.weight").unwrap().size(), [16, 400]);
    assert!(loaded.forward_t(&x, false).unwrap().equal(&expected));
    assert_eq!(loaded.factorizations(), model.factorizations());
    let copy = copy_model(&model).unwrap();
    assert!(copy.forward_t(&x, false).unwrap().equal(&expected));
    // A model factorized another way is refused.
    let mut other = create_model("lenet", "mnist", Device::Cpu).unwrap();
    truncated_svd(&mut other, &[("fc2", Rank::Count(8))]).unwrap();
    let ckpt = Checkpoint::load(&path).unwrap();
    assert!(ckpt.restore_model(&mut other, &path).unwrap_err().to_string().contains("fc2"));
}

#[test]
fn a_factorized_network_fine_tunes() {
    let data = distill::data::mnist_bundled().unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::manual_seed(3);
    let config = TrainConfig { epochs: 1, batch_size: 32, lr: 0.01, progress: Progress::Quiet, ..TrainConfig::default() };
    fit(&mut model, &data, None, &config).unwrap();
    truncated_svd(&mut model, &[("fc1", Rank::Count(8))]).unwrap();
    let before = model.parameter("fc1.fc_sv.weight").unwrap().copy();
    let run = fit(&mut model, &data, None, &config).unwrap();
    assert!(!model.parameter("fc1.fc_sv.weight").unwrap().equal(&before), "the new layers train");
    assert!(run.best.top1 > 80.0, "{}", run.best.top1);
}

/// conv2's filters 0..6 zeroed, so that thinning removes them and, after the flatten, the matching blocks of
/// fc1's (or fc1.fc_sv's) input columns.
fn zero_conv2_filters(model: &Model) {
    tch::no_grad(|| {
        let _ = model.parameter("conv2.weight").unwrap().narrow(0, 0, 6).fill_(0.0);
        let _ = model.parameter("conv2.bias").unwrap().narrow(0, 0, 6).fill_(0.0);
    });
}

#[test]
fn factorized_layers_thin_and_checkpoints_replay_both_in_either_order() {
    let dir = distill::io::TempDir::new().unwrap();
    let x = input(3);
    for svd_first in [true, false] {
        let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
        zero_conv2_filters(&model);
        if svd_first {
            truncated_svd(&mut model, &[("fc1", Rank::Count(16))]).unwrap();
        }
        let before = model.forward_t(&x, false).unwrap();
        Thinner::filters().apply(&mut model).unwrap();
        assert_eq!(model.parameter("conv2.weight").unwrap().size(), [10, 6, 5, 5]);
        let after = model.forward_t(&x, false).unwrap();
        assert!(max_abs(&(&after - &before)) < 1e-4, "thinning changed the outputs (svd first: {svd_first})");
        if !svd_first {
            truncated_svd(&mut model, &[("fc1", Rank::Count(16))]).unwrap();
        }
        // After the thinning the factorized layer reads 10 · 25 columns.
        assert_eq!(model.parameter("fc1.fc_sv.weight").unwrap().size(), [16, 250], "svd first: {svd_first}");
        let path = dir.path().join(format!("both-{svd_first}.safetensors"));
        Checkpoint::capture(&model, None, None, 0, 1, Vec::new()).save(&path).unwrap();
        let loaded = distill::models::load_checkpoint(&path, Device::Cpu).unwrap();
        let expected = model.forward_t(&x, false).unwrap();
        assert!(loaded.forward_t(&x, false).unwrap().equal(&expected), "svd first: {svd_first}");
        assert_eq!(loaded.factorizations()[0].after_thinning, if svd_first { 0 } else { 1 });
    }
}
