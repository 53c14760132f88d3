//! Pruner masks against values computed by hand from Distiller's formulas, and the pruning policy's options.
use distill::config::{PolicyConfig, PrunerConfig, Schedule};
use distill::models::create_model;
use distill::pruning::element::{MagnitudeParameterPruner, SensitivityPruner, SplicingPruner};
use distill::pruning::structure::{Fraction, GroupType, RankedOptions, RankedStructurePruner, Ranking};
use distill::pruning::{PerParam, PruneContext, Pruner, PruningArgs, PruningPolicy};
use distill::scheduler::{CompressionScheduler, Masks, Minibatch, PolicySchedule};
use tch::{Device, Kind, Tensor};

fn vals(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn run(pruner: &mut dyn Pruner, w: &Tensor, epoch: usize, schedule: &PolicySchedule) -> Vec<f32> {
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut masks = Masks::new(["w".to_string()]);
    let ctx = PruneContext { epoch, schedule, model: &model };
    pruner.set_param_mask(w, "w", &mut masks, &ctx).unwrap();
    vals(masks.get("w").unwrap().mask.as_ref().unwrap())
}

#[test]
fn sensitivity_threshold_is_s_times_std_taken_once() {
    // std([-2, -1, 0, 1, 2]) (unbiased) = √2.5 = 1.5811; s = 0.7 → threshold 1.1068.
    let w = Tensor::from_slice(&[-2.0f32, -1.0, 0.0, 1.0, 2.0]);
    let mut p = SensitivityPruner::new("s", PerParam::from_pairs([("w".to_string(), 0.7)])).unwrap();
    let s = PolicySchedule::range(0, 2, 1).unwrap();
    assert_eq!(run(&mut p, &w, 0, &s), [1.0, 0.0, 0.0, 0.0, 1.0]);
    // Halved weights: the cached threshold (1.1068) now removes everything; a fresh std would keep ±1.
    assert_eq!(run(&mut p, &(&w * 0.5), 1, &s), [0.0; 5]);
}

#[test]
fn splicing_cuts_below_a_splices_above_b_keeps_between() {
    // |w| = [0.1, 0.5, 1.0, 2.0]: mean 0.9, unbiased std 0.8287; s = 0.5 → base 1.3143;
    // a = 0.8 base = 1.0515, b = 1.2 base = 1.5772.
    let w = Tensor::from_slice(&[0.1f32, -0.5, 1.0, -2.0]);
    let mut p = SplicingPruner::new("sp", PerParam::from_pairs([("w".to_string(), 0.5)]), 0.8, 1.2, 0.0).unwrap();
    let s = PolicySchedule::range(0, 3, 1).unwrap();
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut masks = Masks::new(["w".to_string()]);
    let ctx = PruneContext { epoch: 0, schedule: &s, model: &model };
    p.set_param_mask(&w, "w", &mut masks, &ctx).unwrap();
    assert_eq!(vals(masks.get("w").unwrap().mask.as_ref().unwrap()), [0.0, 0.0, 0.0, 1.0]);
    // 1.2 lies between a and b: its previous mask value (0) is kept; 1.6 ≥ b is spliced back.
    let w2 = Tensor::from_slice(&[1.6f32, -0.5, 1.2, -2.0]);
    p.set_param_mask(&w2, "w", &mut masks, &ctx).unwrap();
    assert_eq!(vals(masks.get("w").unwrap().mask.as_ref().unwrap()), [1.0, 0.0, 0.0, 1.0]);
}

#[test]
fn magnitude_pruner_uses_the_default_for_every_parameter() {
    let mut p = MagnitudeParameterPruner::new("m", PerParam::from_pairs([("*".to_string(), 0.5)])).unwrap();
    assert!(p.prunes("any.bias"));
    let s = PolicySchedule::range(0, 1, 1).unwrap();
    assert_eq!(run(&mut p, &Tensor::from_slice(&[0.5f32, -0.6, 0.1]), 0, &s), [0.0, 1.0, 0.0]);
}

#[test]
fn l1_filter_pruning_removes_whole_filters_and_leader_aligns_tensors() {
    // Distiller's test_pruning: pruning fraction r of F filters zeroes int(r·F) whole filters.
    let model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let names = ["layer1.0.conv1.weight".to_string(), "layer1.1.conv1.weight".to_string()];
    let s = PolicySchedule::range(0, 1, 1).unwrap();
    let ctx = PruneContext { epoch: 0, schedule: &s, model: &model };
    for leader in [false, true] {
        let mut p = RankedStructurePruner::new(
            "L1RankedStructureParameterPruner", "f", GroupType::Filters, Ranking::L1, Fraction::Fixed(0.5), &names,
            RankedOptions { leader, ..Default::default() },
        )
        .unwrap();
        let mut masks = Masks::new(names.iter().cloned());
        let mut kept = Vec::new();
        for n in &names {
            let w = model.parameter(n).unwrap();
            p.set_param_mask(&w, n, &mut masks, &ctx).unwrap();
            let mask = masks.get(n).unwrap().mask.as_ref().unwrap().shallow_clone();
            let per_filter = mask.reshape([16, -1]).sum_dim_intlist(1, false, Kind::Float);
            let filters: Vec<f32> = vals(&per_filter);
            assert_eq!(filters.iter().filter(|&&f| f == 0.0).count(), 8, "{n}: 8 of 16 filters zeroed");
            assert!(filters.iter().all(|&f| f == 0.0 || f == 144.0), "whole filters only");
            // The filters kept by L1 ranking are those with the largest mean |w|.
            let scores = w.abs().reshape([16, -1]).mean_dim(1, false, Kind::Float);
            if !leader || n == &names[0] {
                let order: Vec<i64> = Vec::try_from(&scores.argsort(0, true).narrow(0, 0, 8).sort(0, false).0).unwrap();
                let mine: Vec<i64> = filters.iter().enumerate().filter(|(_, &f)| f > 0.0).map(|(i, _)| i as i64).collect();
                assert_eq!(order, mine, "{n}");
            }
            kept.push(filters.iter().map(|&f| f > 0.0).collect::<Vec<_>>());
        }
        if leader {
            assert_eq!(kept[0], kept[1], "with group_dependency Leader both lose the leader's filters");
        }
    }
}

#[test]
fn channel_pruning_on_a_linear_layer_removes_input_columns() {
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let s = PolicySchedule::range(0, 1, 1).unwrap();
    let ctx = PruneContext { epoch: 0, schedule: &s, model: &model };
    let mut p = RankedStructurePruner::new("L2RankedStructureParameterPruner", "c", GroupType::Channels, Ranking::L2, Fraction::Fixed(0.25), &["fc3.weight".to_string()], RankedOptions::default()).unwrap();
    let w = model.parameter("fc3.weight").unwrap();
    let mut masks = Masks::new(["fc3.weight".to_string()]);
    p.set_param_mask(&w, "fc3.weight", &mut masks, &ctx).unwrap();
    let mask = masks.get("fc3.weight").unwrap().mask.as_ref().unwrap().shallow_clone();
    let cols = vals(&mask.sum_dim_intlist(0, false, Kind::Float));
    assert_eq!(cols.iter().filter(|&&c| c == 0.0).count(), 21, "⌊0.25·84⌋ = 21 input columns");
    assert!(cols.iter().all(|&c| c == 0.0 || c == 10.0));
}

#[test]
fn bernoulli_masks_are_rescaled_by_the_kept_fraction() {
    tch::manual_seed(3);
    let model = create_model("simplenet_cifar", "cifar10", Device::Cpu).unwrap();
    let s = PolicySchedule::range(0, 1, 1).unwrap();
    let ctx = PruneContext { epoch: 0, schedule: &s, model: &model };
    let mut p = RankedStructurePruner::new("BernoulliFilterPruner", "b", GroupType::Filters, Ranking::Bernoulli, Fraction::Fixed(0.5), &["conv2.weight".to_string()], RankedOptions::default()).unwrap();
    let mut masks = Masks::new(["conv2.weight".to_string()]);
    p.set_param_mask(&model.parameter("conv2.weight").unwrap(), "conv2.weight", &mut masks, &ctx).unwrap();
    let m = vals(masks.get("conv2.weight").unwrap().mask.as_ref().unwrap());
    let kept = m.chunks(150).filter(|c| c[0] != 0.0).count();
    let scale = 16.0 / kept as f32;
    assert!(m.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-5), "kept filters scaled by 16/{kept}");
}

#[test]
fn apoz_pruner_removes_the_filters_whose_relu_is_always_zero() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::no_grad(|| {
        let b = model.parameter("conv1.bias").unwrap();
        let _ = b.narrow(0, 1, 2).fill_(-1000.0);
    });
    let schedule = Schedule::new()
        .pruner("apoz", PrunerConfig::ActivationAPoZRankedFilterPruner(distill::config::components::FilterParams {
            group_type: "Filters".into(),
            desired_sparsity: 0.34,
            weights: vec!["conv1.weight".into()],
            group_dependency: None,
        }))
        .policy(PolicyConfig::pruner("apoz").epochs_range(0, 2, 1));
    let mut scheduler = schedule.build(&model).unwrap();
    scheduler.on_epoch_begin(&mut model, 0, None).unwrap();
    assert!(scheduler.masks().get("conv1.weight").unwrap().mask.is_none(), "no statistics yet in the first epoch");
    let _ = model.forward(&Tensor::randn([8, 1, 28, 28], (Kind::Float, Device::Cpu))).unwrap();
    scheduler.on_epoch_begin(&mut model, 1, None).unwrap();
    let mask = scheduler.masks().get("conv1.weight").unwrap().mask.as_ref().unwrap().shallow_clone();
    let filters = vals(&mask.reshape([6, -1]).sum_dim_intlist(1, false, Kind::Float));
    assert_eq!(filters, [25.0, 0.0, 0.0, 25.0, 25.0, 25.0], "filters 1 and 2 feed an all-zero ReLU");
}

#[test]
fn keep_mask_and_forward_only_masks() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let levels = PerParam::from_pairs([("fc3.weight".to_string(), 0.5)]);
    let pruner = distill::pruning::element::SparsityLevelParameterPruner::new("lvl", levels).unwrap();
    let args = PruningArgs { mask_on_forward_only: true, use_double_copies: true, keep_mask: true, ..Default::default() };
    let mut scheduler = CompressionScheduler::new(&model);
    scheduler.add_policy(Box::new(PruningPolicy::new(Box::new(pruner), args).unwrap()), PolicySchedule::range(0, 2, 1).unwrap());
    let w = model.parameter("fc3.weight").unwrap();
    let before = w.copy();
    let mb = Minibatch { index: 0, per_epoch: 1 };
    scheduler.on_epoch_begin(&mut model, 0, None).unwrap();
    scheduler.on_minibatch_begin(&mut model, 0, mb, None).unwrap();
    assert!((distill::pruning::criteria::sparsity(&w).unwrap() - 0.5).abs() < 1e-9, "masked for the forward pass");
    scheduler.before_parameter_optimization(&mut model, 0, mb, None).unwrap();
    assert!(w.equal(&before), "double copies restore the weights before the step");
    scheduler.on_minibatch_end(&mut model, 0, mb, None).unwrap();
    assert!(w.equal(&before), "forward-only masks are not re-applied after the step");
    let metrics = distill::metrics::Metrics::default();
    scheduler.on_epoch_end(&mut model, 0, &metrics, None).unwrap();
    assert!(w.equal(&before), "keep_mask acts only at the last epoch");
    scheduler.on_epoch_begin(&mut model, 1, None).unwrap();
    scheduler.on_epoch_end(&mut model, 1, &metrics, None).unwrap();
    assert!((distill::pruning::criteria::sparsity(&w).unwrap() - 0.5).abs() < 1e-9, "keep_mask applied the mask for good");
    assert!(!scheduler.masks().get("fc3.weight").unwrap().mask_on_forward_only);
    let err = PruningPolicy::new(
        Box::new(distill::pruning::element::SparsityLevelParameterPruner::new("l", PerParam::default()).unwrap()),
        PruningArgs { mask_gradients: true, ..Default::default() },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("requires mask_on_forward_only"));
}

#[test]
fn regularization_policy_adds_its_loss_and_thresholds_with_keep_mask() {
    let yaml = "regularizers:\n  gl:\n    class: GroupLassoRegularizer\n    reg_regims:\n      fc1.weight: [0.0005, Rows]\n    threshold_criteria: Mean_Abs\npolicies:\n  - regularizer:\n      instance_name: gl\n      args: {keep_mask: true}\n    starting_epoch: 0\n    ending_epoch: 2\n    frequency: 1\n";
    let schedule = Schedule::from_yaml_str(yaml, "gl.yaml").unwrap();
    tch::manual_seed(0);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    // Shrink ten rows of fc1 below the strength so thresholding removes them.
    tch::no_grad(|| {
        let _ = model.parameter("fc1.weight").unwrap().narrow(0, 0, 10).fill_(1e-5);
    });
    let mut scheduler = schedule.build(&model).unwrap();
    let data = distill::data::DataSplits {
        train: distill::data::Dataset::synthetic(32, [1, 28, 28], 10, 1).unwrap(),
        valid: distill::data::Dataset::synthetic(8, [1, 28, 28], 10, 2).unwrap(),
        test: distill::data::Dataset::synthetic(8, [1, 28, 28], 10, 3).unwrap(),
    };
    let config = distill::train::TrainConfig { epochs: 3, batch_size: 16, lr: 0.01, progress: distill::train::Progress::Quiet, ..Default::default() };
    let run = distill::train::fit(&mut model, &data, Some(&mut scheduler), &config).unwrap();
    let components = &run.history[0].train.loss_components;
    assert_eq!(components.len(), 1);
    assert_eq!(components[0].0, "GroupLassoRegularizer_loss");
    assert!(components[0].1 > 0.0);
    assert!(run.history[2].train.loss_components.is_empty(), "inactive after its last epoch");
    let w = model.parameter("fc1.weight").unwrap();
    let zero_rows = vals(&w.abs().sum_dim_intlist(1, false, Kind::Float)).iter().filter(|&&r| r == 0.0).count();
    assert!(zero_rows >= 10, "thresholded rows stay removed after the policy ends: {zero_rows}");
    let mask = scheduler.masks().get("fc1.weight").unwrap();
    assert!(mask.mask.is_some() && !mask.is_regularization_mask, "keep_mask made the last threshold mask permanent");
}

/// `fold_batchnorm: True` ranks conv1's filters by their L1 norm times the following batch norm's γ/σ, and the
/// mask still applies to the unfolded weights.
#[test]
fn fold_batchnorm_ranks_filters_with_the_batch_norm_folded_in() {
    let yaml = "pruners:\n  f:\n    class: L1RankedStructureParameterPruner\n    group_type: Filters\n    desired_sparsity: 0.5\n    weights: [conv1.weight]\npolicies:\n  - pruner:\n      instance_name: f\n      args:\n        fold_batchnorm: True\n    starting_epoch: 0\n    ending_epoch: 1\n    frequency: 1\n";
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let w = model.parameter("conv1.weight").unwrap();
    let l1 = Vec::<f32>::try_from(w.abs().sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float)).unwrap();
    // γ_i = (16 - i) / L1_i: folded, filter i ranks as 16 - i, so the weakest half is filters 8..16, whatever
    // the unfolded norms say.
    let gamma: Vec<f32> = l1.iter().enumerate().map(|(i, n)| (16 - i) as f32 / n).collect();
    tch::no_grad(|| model.parameter("bn1.weight").unwrap().copy_(&Tensor::from_slice(&gamma)));
    let before = w.copy();
    let schedule = Schedule::from_yaml_str(yaml, "fold.yaml").unwrap();
    let mut scheduler = schedule.build(&model).unwrap();
    scheduler.on_epoch_begin(&mut model, 0, None).unwrap();
    scheduler.on_minibatch_begin(&mut model, 0, Minibatch { index: 0, per_epoch: 1 }, None).unwrap();
    let zero: Vec<bool> = Vec::<f32>::try_from(w.abs().sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float)).unwrap().iter().map(|&n| n == 0.0).collect();
    assert_eq!(zero, (0..16).map(|i| i >= 8).collect::<Vec<_>>());
    assert!(w.narrow(0, 0, 8).equal(&before.narrow(0, 0, 8)), "kept filters are the unfolded weights");
}
