//! Every quantizer setting is honoured with Distiller's meaning or refused at its YAML position; preparing a
//! model is all or nothing; quantized modules hand their output's scale to the next module.
use std::any::Any;

use distill::config::{QuantizerConfig, Schedule};
use distill::models::create_model;
use distill::nn::Model;
use distill::quantization::qat::FakeQuantizationWrapper;
use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer, PtqPrepared, RangeLinearQuantParamLayer};
use distill::quantization::stats::collect_activation_stats;
use tch::{Device, Kind, Tensor};

/// The PTQ configuration of a schedule's single `PostTrainLinearQuantizer` entry (`body` indented 4 spaces).
fn ptq(body: &str) -> distill::Result<PostTrainConfig> {
    let yaml = format!("quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n{body}");
    let schedule = Schedule::from_yaml_str(&yaml, "ptq.yaml")?;
    let QuantizerConfig::PostTrainLinearQuantizer(p) = &schedule.quantizers[0].1 else { unreachable!("one PTQ entry") };
    PostTrainConfig::from_params(p, std::path::Path::new("."))
}

fn lenet() -> Model {
    tch::manual_seed(3);
    create_model("lenet", "mnist", Device::Cpu).unwrap()
}

fn digits() -> Tensor {
    distill::data::mnist_bundled().unwrap().valid.batches(16, Device::Cpu).unwrap().next().unwrap().unwrap().0
}

fn prepare(model: &mut Model, config: PostTrainConfig) -> distill::Result<PtqPrepared> {
    PostTrainLinearQuantizer::new(config).prepare_model(model)
}

fn type_of(model: &Model, name: &str) -> String {
    model.module(name).unwrap().type_name().to_string()
}

#[test]
fn explicit_null_bits_mean_floating_point_and_only_overrides_quantize() {
    let mut model = lenet();
    let config = ptq("    bits_activations: null\n    bits_parameters: null\n    overrides:\n      conv2: {bits_activations: 8, bits_weights: 8}\n").unwrap();
    assert_eq!((config.bits_activations, config.bits_parameters), (None, None));
    let prepared = prepare(&mut model, config).unwrap();
    assert_eq!(prepared.replaced, ["conv2"]);
    assert_eq!(type_of(&model, "conv1"), "Conv2d");
    assert_eq!(type_of(&model, "relu1"), "ReLU");
    // Absent keys keep Distiller's default of 8 bits.
    let config = ptq("    mode: SYMMETRIC\n").unwrap();
    assert_eq!((config.bits_activations, config.bits_parameters), (Some(8), Some(8)));
}

#[test]
fn fake_fpq_module_and_save_fp_weights() {
    let mut model = lenet();
    let conv1 = model.parameter("conv1.weight").unwrap().copy();
    let fc1 = model.parameter("fc1.weight").unwrap().copy();
    let config = ptq("    save_fp_weights: true\n    overrides:\n      conv1: {fake: true}\n      fc3: {fpq_module: 64}\n").unwrap();
    prepare(&mut model, config).unwrap();
    // fake: the layer runs in floating point (its weights untouched) and only its output is quantized.
    assert_eq!(type_of(&model, "conv1"), "RangeLinearFakeQuantWrapper");
    assert!(model.parameter("conv1.wrapped_module.weight").unwrap().equal(&conv1));
    // fpq_module without fake: Distiller's FPWrapper, the layer in float64, nothing quantized.
    assert_eq!(type_of(&model, "fc3"), "FPWrapper");
    assert_eq!(model.parameter("fc3.wrapped_module.weight").unwrap().kind(), Kind::Double);
    // save_fp_weights keeps the float weights next to the integer ones.
    let saved: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).filter(|n| n.ends_with("float_weight")).collect();
    assert_eq!(saved, ["conv2.float_weight", "fc1.float_weight", "fc2.float_weight"]);
    let layer = model.module("fc1").unwrap();
    let layer = (layer as &dyn Any).downcast_ref::<RangeLinearQuantParamLayer>().unwrap();
    assert!(layer.float_weight().unwrap().equal(&fc1));
    let y = tch::no_grad(|| model.forward(&digits())).unwrap();
    assert_eq!((y.kind(), y.size()), (Kind::Float, vec![16, 10]));
    // fake: false on a module that is not a layer needs fpq_module (Distiller's FPWrapper would have no width).
    let err = prepare(&mut lenet(), ptq("    overrides:\n      relu1: {fake: false}\n").unwrap()).unwrap_err().to_string();
    assert!(err.contains("fake: false") && err.contains("relu1"), "{err}");
}

#[test]
fn accumulator_bits_half_range_and_scale_approximation_change_the_arithmetic() {
    let x = digits();
    // One set of weights for every variant (tests run in parallel and share libtorch's generator).
    let weights: Vec<(String, Tensor)> = lenet().state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let run = |body: &str| -> Tensor {
        let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
        model.load_state_dict(&weights, true).unwrap();
        prepare(&mut model, ptq(body).unwrap()).unwrap();
        tch::no_grad(|| model.forward(&x)).unwrap()
    };
    let exact = run("    mode: SYMMETRIC\n");
    // An 8-bit accumulator saturates the sums of fc1.
    let narrow = run("    overrides:\n      fc1: {bits_accum: 8}\n");
    assert!(!narrow.allclose(&exact, 1e-6, 1e-6, false));
    // Every output non-negative with clip_half_range (a ReLU fused into each layer).
    let half = run("    clip_half_range: true\n");
    assert!(exact.lt(0.0).any().int64_value(&[]) == 1 && half.lt(0.0).any().int64_value(&[]) == 0);
    // 8-bit multipliers change every scale by less than 1/128, and so the outputs by a few percent.
    let approx = run("    scale_approx_mult_bits: 8\n");
    assert!(!approx.allclose(&exact, 1e-6, 1e-6, false));
    let change = (approx - &exact).abs().max().double_value(&[]) / exact.abs().max().double_value(&[]);
    assert!(change < 0.2, "{change}");
}

#[test]
fn also_clip_weights_clips_weight_ranges_with_the_activation_clip_mode() {
    let weight_scale = |body: &str| -> f64 {
        let mut model = lenet();
        prepare(&mut model, ptq(body).unwrap()).unwrap();
        let layer = model.module("fc1").unwrap();
        (layer as &dyn Any).downcast_ref::<RangeLinearQuantParamLayer>().unwrap().weight_params().scale.double_value(&[])
    };
    let plain = weight_scale("    clip_acts: AVG\n");
    let clipped = weight_scale("    clip_acts: AVG\n    also_clip_weights: true\n");
    // The average of per-row maxima is below the overall maximum: a larger scale.
    assert!(clipped > plain, "{clipped} vs {plain}");
    let err = prepare(&mut lenet(), ptq("    clip_acts: AVG\n    also_clip_weights: true\n    per_channel_wts: true\n").unwrap()).unwrap_err().to_string();
    assert!(err.contains("also_clip_weights"), "{err}");
}

#[test]
fn quantization_parameters_travel_with_tensors_and_inputs_without_them_need_a_rule() {
    let x = digits();
    // Simplenet reshapes functionally between pool2 and fc1, as Distiller's models do with view().
    let forward = |body: &str| -> distill::Result<Tensor> {
        tch::manual_seed(3);
        let mut model = create_model("simplenet_mnist", "mnist", Device::Cpu)?;
        prepare(&mut model, ptq(body)?)?;
        tch::no_grad(|| model.forward(&x))
    };
    // Without the fallback the model's input has no quantization parameters.
    let err = forward("    inputs_quant_auto_fallback: false\n").unwrap_err().to_string();
    assert!(err.contains("conv1") && err.contains("input 0"), "{err}");
    // conv1's input from its override; every later module reads its predecessor's parameters, except fc1, whose
    // input is a reshaped view (Distiller loses the metadata there too).
    let err = forward("    inputs_quant_auto_fallback: false\n    overrides:\n      conv1: {input_overrides: {0: {from_output: true}}}\n").unwrap_err().to_string();
    assert!(err.contains("fc1") && err.contains("input 0"), "{err}");
    let both = "    inputs_quant_auto_fallback: false\n    overrides:\n      conv1: {input_overrides: {0: {from_output: true}}}\n      fc1: {input_overrides: {0: {bits_activations: 6}}}\n";
    assert_eq!(forward(both).unwrap().size(), [16, 10]);
    // An input that arrives quantized conflicts with an override for it (Distiller refuses it too), for a layer
    // and for a fake-quantized module (pool1: relu1 is fused into conv1 and gone).
    for module in ["conv2", "pool1"] {
        let err = forward(&format!("    overrides:\n      {module}: {{input_overrides: {{0: {{from_output: true}}}}}}\n")).unwrap_err().to_string();
        assert!(err.contains(module) && err.contains("conflicts"), "{err}");
    }
    // quantize_inputs is for fake-quantized modules only.
    assert!(forward("    overrides:\n      pool1: {quantize_inputs: false}\n").is_ok());
    let err = forward("    overrides:\n      conv1: {quantize_inputs: false}\n").unwrap_err().to_string();
    assert!(err.contains("quantize_inputs"), "{err}");
}

#[test]
fn unhonoured_settings_are_refused_at_their_position() {
    let qat = "quantizers:\n  q:\n    class: QuantAwareTrainRangeLinearQuantizer\n    bits_activations: 8\n    overrides:\n      conv1:\n        fpq_module: 16\n";
    let err = Schedule::from_yaml_str(qat, "q.yaml").unwrap_err().to_string();
    assert!(err.starts_with("q.yaml:7:9:") && err.contains("fpq_module"), "{err}");
    let pact = "quantizers:\n  q:\n    class: PACTQuantizer\n    overrides:\n      conv1: {mode: SYMMETRIC}\n";
    let err = Schedule::from_yaml_str(pact, "q.yaml").unwrap_err().to_string();
    assert!(err.starts_with("q.yaml:5:") && err.contains("PACTQuantizer"), "{err}");
    for (body, key) in [
        ("    fpq_module: 8\n", "fpq_module"),
        ("    fp16: true\n    fpq_module: 32\n", "fp16"),
        ("    clip_n_stds: 2\n", "clip_n_stds"),
        ("    overrides:\n      conv1: {input_overrides: {0: {bits_weights: 4}}}\n", "bits_weights"),
        ("    overrides:\n      conv1: {fake: 3}\n", "fake"),
        ("    overrides:\n      conv1: {scale_approx_mult_bits: 0}\n", "scale_approx_mult_bits"),
    ] {
        let err = ptq(body).unwrap_err().to_string();
        assert!(err.starts_with("ptq.yaml:") && err.contains(key), "{body}: {err}");
    }
}

/// Everything a user can see of a model: its printed tree, its state's names, and every value bit for bit.
fn snapshot(model: &Model) -> (String, Vec<(String, Tensor)>) {
    (format!("{model}"), model.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect())
}

/// Equal values, NaN where the other has NaN.
fn identical(t: &Tensor, u: &Tensor) -> bool {
    t.kind() == u.kind() && t.size() == u.size() && t.isnan().equal(&u.isnan()) && t.masked_fill(&t.isnan(), 0.0).equal(&u.masked_fill(&u.isnan(), 0.0))
}

fn same(a: &(String, Vec<(String, Tensor)>), b: &(String, Vec<(String, Tensor)>)) -> bool {
    a.0 == b.0 && a.1.len() == b.1.len() && a.1.iter().zip(&b.1).all(|((n, t), (m, u))| n == m && identical(t, u))
}

#[test]
fn a_failed_preparation_leaves_the_model_exactly_as_it_was() {
    // ResNet-20: batch norms are folded and several layers are quantized before the NaN in the last layer stops
    // the preparation.
    tch::manual_seed(5);
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    model.eval();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    tch::no_grad(|| {
        let _ = model.parameter("fc.weight").unwrap().narrow(0, 3, 1).fill_(f64::NAN);
    });
    let before = snapshot(&model);
    let y_before = tch::no_grad(|| model.forward(&x)).unwrap();
    let err = prepare(&mut model, PostTrainConfig::default()).unwrap_err().to_string();
    assert!(err.contains("fc") && err.contains("NaN"), "{err}");
    assert!(same(&before, &snapshot(&model)), "tree, names or values changed");
    assert!(identical(&tch::no_grad(|| model.forward(&x)).unwrap(), &y_before));
    // Same with fp16/fp64 conversions undone: FPWrapper converts a layer's dtype before the failure.
    let err = prepare(&mut model, ptq("    overrides:\n      conv1: {fpq_module: 64}\n").unwrap()).unwrap_err();
    assert!(err.to_string().contains("NaN"));
    assert!(same(&before, &snapshot(&model)));
    // A QAT preparation that fails (an override matching no module) adds nothing either, PACT's α included.
    let yaml = "quantizers:\n  q:\n    class: PACTQuantizer\n    bits_activations: 4\n    bits_weights: 4\n    overrides:\n      layer9: {bits_weights: 8}\n";
    let schedule = Schedule::from_yaml_str(yaml, "q.yaml").unwrap();
    let vars_before = model.var_store().variables().len();
    assert!(schedule.quantizers[0].1.qat().unwrap().prepare_model(&mut model).is_err());
    assert_eq!(model.var_store().variables().len(), vars_before);
    assert!(same(&before, &snapshot(&model)));
}

#[test]
fn modules_a_quantizer_cannot_replace_are_left_as_they_are() {
    // Distiller's QAT replaces ReLUs and quantizes Conv/Linear weights; a pattern that also matches batch norms
    // leaves them alone.
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let yaml = "quantizers:\n  q:\n    class: QuantAwareTrainRangeLinearQuantizer\n    bits_activations: 8\n    bits_weights: 8\n    overrides:\n      'layer1\\..*': {bits_activations: 4, bits_weights: 4}\n";
    let schedule = Schedule::from_yaml_str(yaml, "q.yaml").unwrap();
    let prepared = schedule.quantizers[0].1.qat().unwrap().prepare_model(&mut model).unwrap();
    assert_eq!(type_of(&model, "layer1.0.bn1"), "BatchNorm2d");
    assert!(prepared.replaced.contains(&"layer1.0.relu1".to_string()));
}

#[test]
fn dynamic_ptq_keeps_residual_adds_in_floating_point_as_distiller() {
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let prepared = prepare(&mut model, PostTrainConfig::default()).unwrap();
    let adds: Vec<&String> = prepared.kept_float.iter().map(|(n, _)| n).collect();
    assert_eq!(adds.len(), 9, "{adds:?}");
    assert!(prepared.kept_float.iter().all(|(_, why)| why.contains("calibration statistics")));
    assert_eq!(type_of(&model, adds[0]), "EltwiseAdd");
    // With calibration statistics they are quantized.
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let data = distill::data::Dataset::synthetic(8, [3, 32, 32], 10, 1).unwrap();
    let stats = collect_activation_stats(&mut model, &data, 1, 8).unwrap();
    let prepared = prepare(&mut model, PostTrainConfig { stats: Some(stats), ..PostTrainConfig::default() }).unwrap();
    assert!(prepared.kept_float.is_empty());
    let wrapped = model.named_modules().into_iter().filter(|m| m.type_name == "RangeLinearQuantEltwiseAddWrapper").count();
    assert_eq!(wrapped, 9);
}

#[test]
fn qat_tracks_ranges_in_checkpointed_buffers_and_quantizes_the_input() {
    let mut model = lenet();
    let yaml = "quantizers:\n  q:\n    class: QuantAwareTrainRangeLinearQuantizer\n    bits_activations: 8\n    bits_weights: 8\n    ema_decay: 0.5\n";
    let schedule = Schedule::from_yaml_str(yaml, "q.yaml").unwrap();
    schedule.quantizers[0].1.qat().unwrap().prepare_model(&mut model).unwrap();
    let names: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    for n in ["relu1.fake_q.tracked_min", "relu1.fake_q.iter_count", "inputs_quant.tracked_max", "inputs_quant.scale"] {
        assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
    }
    assert_eq!(names.last().map(String::as_str), Some("inputs_quant.zero_point"), "inputs_quant is registered last, as in Distiller");
    // Two training batches whose inputs range over [0, 1] and [0, 3]: the bias-corrected EMA with decay ½ is
    // (½·1 + ¼·... ) computed by hand: biased = 0.5·(0.5·0 + 0.5·1) + 0.5·3 = 1.75, unbiased = 1.75 / (1 − ¼).
    model.train();
    for top in [1.0, 3.0] {
        let x = Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu));
        let _ = x.get(0).get(0).get(0).get(0).fill_(top);
        let _ = model.forward(&x).unwrap();
    }
    let stage = model.state_dict().into_iter().find(|(n, _)| n == "inputs_quant.tracked_max").unwrap().1;
    assert!((stage.double_value(&[0]) - 1.75 / 0.75).abs() < 1e-6, "{}", stage.double_value(&[0]));
    let relu = model.module("relu1").unwrap();
    let relu = (relu as &dyn Any).downcast_ref::<FakeQuantizationWrapper>().unwrap();
    assert!(relu.tracked_range().unwrap().1 > 0.0);
    // quantize_inputs: false leaves the root alone.
    let mut plain = lenet();
    let yaml = yaml.replace("ema_decay: 0.5", "quantize_inputs: false");
    Schedule::from_yaml_str(&yaml, "q.yaml").unwrap().quantizers[0].1.qat().unwrap().prepare_model(&mut plain).unwrap();
    assert!(plain.state_dict().iter().all(|(n, _)| !n.starts_with("inputs_quant")));
}


#[test]
fn qat_ranges_continue_from_a_loaded_state_not_from_the_steps_run_before_the_load() {
    // The step count behind the EMA's bias correction is mirrored on the host; a load must replace it.
    let yaml = "quantizers:\n  q:\n    class: QuantAwareTrainRangeLinearQuantizer\n    bits_activations: 8\n    bits_weights: 8\n    ema_decay: 0.9\n";
    let prepared = || {
        let mut m = lenet();
        Schedule::from_yaml_str(yaml, "q.yaml").unwrap().quantizers[0].1.qat().unwrap().prepare_model(&mut m).unwrap();
        m.train();
        m
    };
    let batch = |i: usize| Tensor::from_slice(&(0..2 * 784).map(|j| ((j * 7 + i * 13) % 17) as f32 / (1.0 + i as f32)).collect::<Vec<_>>()).reshape([2, 1, 28, 28]);
    let ranges = |m: &distill::nn::Model| -> Vec<(String, f64)> {
        m.state_dict().into_iter().filter(|(n, _)| n.contains("tracked") || n.ends_with("iter_count")).map(|(n, t)| (n, t.double_value(&[0]))).collect()
    };
    let a = prepared();
    let mut b = prepared();
    b.load_state_dict(&a.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect::<Vec<_>>(), true).unwrap();
    for i in 0..3 {
        let _ = a.forward(&batch(i)).unwrap();
    }
    let saved: Vec<(String, Tensor)> = a.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let _ = a.forward(&batch(3)).unwrap();
    // b has run five steps of its own before it loads a's state after three.
    for i in 10..15 {
        let _ = b.forward(&batch(i)).unwrap();
    }
    b.load_state_dict(&saved, true).unwrap();
    let _ = b.forward(&batch(3)).unwrap();
    let (ra, rb) = (ranges(&a), ranges(&b));
    assert!(ra.iter().any(|(n, v)| n == "inputs_quant.iter_count" && *v == 4.0), "{ra:?}");
    assert_eq!(ra, rb);
}

#[test]
fn statistics_files_with_nan_inverted_ranges_or_nothing_are_refused() {
    let dir = distill::io::TempDir::new().unwrap();
    let good = "conv1:\n  inputs:\n    0: {min: -1.0, max: 1.0, avg_min: -0.5, avg_max: 0.5, mean: 0.0, std: 0.3, b: 0.2}\n  output: {min: -2.0, max: 2.0, avg_min: -1.0, avg_max: 1.0, mean: 0.0, std: 0.5, b: 0.4}\n";
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    assert!(distill::quantization::stats::ActivationStats::from_yaml_file(write("good.yaml", good)).is_ok());
    for (name, text, expected) in [
        ("nan.yaml", good.replace("max: 2.0", "max: .nan"), "finite"),
        ("inf.yaml", good.replace("std: 0.5", "std: .inf"), "finite"),
        ("inverted.yaml", good.replace("min: -2.0", "min: 3.0"), "inconsistent"),
        ("empty.yaml", String::new(), "empty"),
        ("comments.yaml", "# nothing\n".into(), "empty"),
    ] {
        let err = distill::quantization::stats::ActivationStats::from_yaml_file(write(name, &text)).unwrap_err().to_string();
        assert!(err.contains(expected), "{name}: {err}");
    }
}

#[test]
fn a_checkpoint_tensor_of_another_kind_of_number_is_refused() {
    let mut model = lenet();
    let mut state: Vec<(String, Tensor)> = model.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect();
    state[0].1 = state[0].1.to_kind(Kind::Int);
    let err = model.load_state_dict(&state, true).unwrap_err().to_string();
    assert!(err.contains("conv1.weight") && err.contains("Float values, given Int"), "{err}");
    // Another float width converts.
    state[0].1 = state[0].1.to_kind(Kind::Double);
    assert!(model.load_state_dict(&state, true).is_ok());
}

#[test]
fn range_linear_qat_resumes_bit_for_bit_with_its_tracked_ranges() {
    use distill::data::{DataSplits, Dataset};
    use distill::train::{Progress, TrainConfig, Trainer};
    let data = DataSplits {
        train: Dataset::synthetic(96, [1, 28, 28], 10, 1).unwrap(),
        valid: Dataset::synthetic(16, [1, 28, 28], 10, 2).unwrap(),
        test: Dataset::synthetic(16, [1, 28, 28], 10, 3).unwrap(),
    };
    let yaml = "quantizers:\n  q:\n    class: QuantAwareTrainRangeLinearQuantizer\n    bits_activations: 8\n    bits_weights: 8\n    mode: ASYMMETRIC_UNSIGNED\n    ema_decay: 0.9\npolicies:\n  - quantizer: {instance_name: q}\n    starting_epoch: 0\n    ending_epoch: 3\n    frequency: 1\n";
    let dir = distill::io::TempDir::new().unwrap();
    let config = |out: &str, epochs| TrainConfig { epochs, batch_size: 32, lr: 0.01, progress: Progress::Quiet, out_dir: Some(dir.path().join(out)), ..TrainConfig::default() };
    // One set of starting weights for both runs (tests share libtorch's generator).
    let weights: Vec<(String, Tensor)> = lenet().state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let fresh = || {
        let mut m = create_model("lenet", "mnist", Device::Cpu).unwrap();
        m.load_state_dict(&weights, true).unwrap();
        m
    };
    let mut full = fresh();
    let mut s = Schedule::from_yaml_str(yaml, "q.yaml").unwrap().build(&full).unwrap();
    Trainer::new(&mut full, config("full", 3)).unwrap().with_scheduler(&mut s).run(&data).unwrap();
    let mut part = fresh();
    let mut s = Schedule::from_yaml_str(yaml, "q.yaml").unwrap().build(&part).unwrap();
    Trainer::new(&mut part, config("part", 2)).unwrap().with_scheduler(&mut s).run(&data).unwrap();
    let mut resumed = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut s = Schedule::from_yaml_str(yaml, "q.yaml").unwrap().build(&resumed).unwrap();
    let mut trainer = Trainer::new(&mut resumed, config("part", 3)).unwrap().with_scheduler(&mut s);
    trainer.resume(dir.path().join("part/checkpoint.safetensors")).unwrap();
    trainer.run(&data).unwrap();
    let (a, b) = (full.state_dict(), resumed.state_dict());
    assert!(a.iter().any(|(n, _)| n == "relu1.fake_q.tracked_max"));
    assert_eq!(a.len(), b.len());
    for ((n, x), (m, y)) in a.iter().zip(&b) {
        assert!(n == m && x.equal(y), "{n} differs after resume");
    }
}

/// distill's pipeline keys (`bias_correction`, `adaround`) are read, checked at their position, refused by
/// `prepare_model` (which takes no data), and run by `quantize` on calibration data, all or nothing.
#[test]
fn pipeline_keys_run_on_calibration_data_or_are_refused() {
    use distill::quantization::post_train::Calibration;
    let data = distill::data::mnist_bundled().unwrap();
    let config = ptq("    per_channel_wts: true\n    adaround: {iterations: 20, samples: 64, batch_size: 16, beta: [10, 2]}\n").unwrap();
    let adaround = config.adaround.clone().unwrap();
    assert_eq!((adaround.iterations, adaround.samples, adaround.batch_size, adaround.beta, adaround.reg_weight), (20, 64, 16, (10.0, 2.0), 0.01));
    assert!(ptq("    adaround: false\n").unwrap().adaround.is_none());
    assert_eq!(ptq("    clip_acts: MSE\n").unwrap().clip_acts, distill::quantization::q_utils::ClipMode::Mse);
    for (body, line, key) in [
        ("    bias_correction: true\n    adaround: true\n", "ptq.yaml:5:", "not combined"),
        ("    adaround: {iteration: 5}\n", "ptq.yaml:4:", "unknown field `iteration`, expected one of `samples`, `iterations`"),
        ("    adaround: {warm_start: 1.5}\n", "ptq.yaml:4:", "warm_start"),
        ("    adaround: 3\n", "ptq.yaml:4:", "expected true, false or a mapping"),
        ("    bias_correction: maybe\n", "ptq.yaml:4:", "empirical"),
    ] {
        let err = ptq(body).unwrap_err().to_string();
        assert!(err.starts_with(line) && err.contains(key), "{body}: {err}");
    }
    // prepare_model takes no data, and quantize without calibration data says what is missing.
    let mut model = lenet();
    let before = snapshot(&model);
    let err = prepare(&mut model, config.clone()).unwrap_err().to_string();
    assert!(err.contains("adaround") && err.contains("PostTrainLinearQuantizer::quantize"), "{err}");
    let quantizer = PostTrainLinearQuantizer::new(config);
    let err = quantizer.quantize(&mut model, None).unwrap_err().to_string();
    assert!(err.contains("give calibration batches"), "{err}");
    // More AdaRound samples than the calibration set holds: the error comes after quantizing, and is undone.
    let few = data.valid.subset("few", &(0..32).collect::<Vec<_>>()).unwrap();
    let err = quantizer.quantize(&mut model, Some(&Calibration::new(&few, 2, 16))).unwrap_err().to_string();
    assert!(err.contains("64 calibration samples wanted but the data set holds 32"), "{err}");
    assert!(same(&before, &snapshot(&model)), "a failed pipeline changed the model");
    // On enough data: calibrated, quantized, each layer rounded, and the float weights dropped again.
    let report = quantizer.quantize(&mut model, Some(&Calibration::new(&data.valid, 2, 32))).unwrap();
    assert_eq!((report.calibration_samples, report.adaround.len(), report.prepared.replaced.contains(&"fc1".to_string())), (64, 5, true));
    assert!(report.stats.as_ref().unwrap().get("fc1").unwrap().output.histogram.is_some());
    assert!(!model.state_dict().iter().any(|(n, _)| n.ends_with("float_weight")));
    // Bias correction from YAML, with cross-layer equalization before calibrating.
    let mut model = lenet();
    let config = ptq("    bias_correction: true\n    cross_layer_equalization: true\n    save_fp_weights: true\n").unwrap();
    let report = PostTrainLinearQuantizer::new(config).quantize(&mut model, Some(&Calibration::new(&data.valid, 2, 32))).unwrap();
    assert_eq!(report.bias_corrections.len(), 5);
    assert!(report.bias_corrections.iter().all(|(_, shift)| *shift > 0.0), "{:?}", report.bias_corrections);
    assert!(!report.equalized.is_empty());
    // save_fp_weights asked for: kept.
    assert!(model.state_dict().iter().any(|(n, _)| n.ends_with("float_weight")));
}
