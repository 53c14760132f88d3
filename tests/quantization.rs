//! Quantization end to end: post-training accuracy and sparsity, wrapper arithmetic against a hand computation,
//! quantization-aware training gradients, statistics files, and bad input.
use std::path::Path;

use distill::config::Schedule;
use distill::data::DataSplits;
use distill::models::create_model;
use distill::nn::{Forward, Linear, Module};
use distill::quantization::q_utils::{ClipMode, LinearQuantMode, RangeStats};
use distill::quantization::quantizer::ModeSpec;
use distill::quantization::range_linear::{ActQuant, ActSettings, PostTrainConfig, PostTrainLinearQuantizer, RangeLinearQuantParamLayer, WeightSettings};
use distill::quantization::stats::{collect_activation_stats, ActivationStats, ModuleStats, TensorStats};
use distill::train::{fit, validate, Progress, TrainConfig};
use tch::{Device, Kind, Tensor};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn quiet(epochs: usize) -> TrainConfig {
    TrainConfig { epochs, lr: 0.02, batch_size: 32, seed: 1, progress: Progress::Quiet, ..TrainConfig::default() }
}

/// LeNet pruned with schedules/lenet_agp.yaml (10 epochs).
fn pruned_lenet(data: &DataSplits) -> distill::nn::Model {
    tch::manual_seed(1);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut s = Schedule::from_file(root().join("schedules/lenet_agp.yaml")).unwrap().build(&model).unwrap();
    fit(&mut model, data, Some(&mut s), &quiet(10)).unwrap();
    model
}

fn ptq8(stats: Option<ActivationStats>) -> PostTrainConfig {
    let schedule = Schedule::from_file(root().join("schedules/lenet_ptq8.yaml")).unwrap();
    let distill::config::QuantizerConfig::PostTrainLinearQuantizer(p) = &schedule.quantizers[0].1 else { panic!("PTQ config") };
    PostTrainConfig { stats, ..PostTrainConfig::from_params(p, root()).unwrap() }
}

#[test]
fn ptq8_keeps_accuracy_and_sparsity_and_the_integer_export_agrees() {
    let data = distill::data::mnist_bundled().unwrap();
    let mut model = pruned_lenet(&data);
    let fp32 = validate(&mut model, &data.test, 256).unwrap();
    let zeros_before: Vec<(String, i64)> = ["conv2", "fc1", "fc2"]
        .iter()
        .map(|m| (m.to_string(), model.parameter(&format!("{m}.weight")).unwrap().eq(0.0).sum(Kind::Int64).int64_value(&[])))
        .collect();
    let stats = collect_activation_stats(&mut model, &data.valid, 2, 256).unwrap();
    PostTrainLinearQuantizer::new(ptq8(Some(stats))).prepare_model(&mut model).unwrap();
    let q = validate(&mut model, &data.test, 256).unwrap();
    assert!(fp32.top1 - q.top1 <= 0.5, "fp32 {:.2} vs 8-bit {:.2}", fp32.top1, q.top1);
    // Pruned weights stay exactly zero: their integer value plus the zero point is 0.
    for (m, zeros) in zeros_before {
        let layer = model.module(&m).unwrap();
        let layer = (layer as &dyn std::any::Any).downcast_ref::<RangeLinearQuantParamLayer>().unwrap();
        let w = layer.integer_weight().unwrap();
        let (_, zp) = layer.weight_params().along(0, w.dim(), Kind::Float).unwrap();
        let effective_zeros = w.f_add(&zp).unwrap().eq(0.0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(effective_zeros, zeros, "{m}");
    }
    let dir = distill::io::TempDir::new().unwrap();
    let exported = distill::quantization::export::export_integer_model(&model, dir.path().join("q.safetensors")).unwrap();
    assert!(exported.integer_layers.iter().all(|(_, k)| k == "Uint8"), "{:?}", exported.integer_layers);
    let fp32_bytes = distill::quantization::export::float_size_bytes(&model);
    assert!(exported.file_bytes * 3 < fp32_bytes, "{} vs {fp32_bytes}", exported.file_bytes);
    let integer = distill::quantization::export::evaluate_integer(&exported, &mut model, &data.test, 256).unwrap();
    assert!((integer.top1 - q.top1).abs() <= 0.2, "simulated {:.2} vs integer {:.2}", q.top1, integer.top1);
}

/// Sub-8-bit weights are exported packed: 3- and 4-bit layers take `⌈weights · bits / 8⌉` bytes, read back to
/// exactly the layer's integers, the file shrinks by what packing saves, and the integer evaluation agrees with
/// the simulation.
#[test]
fn sub_byte_weights_are_exported_packed_and_read_back_exactly() {
    use distill::quantization::export::{evaluate_integer, export_integer_model, read_integer_weight};
    let data = distill::data::mnist_bundled().unwrap();
    tch::manual_seed(3);
    let mut float = create_model("lenet", "mnist", Device::Cpu).unwrap();
    fit(&mut float, &data, None, &quiet(1)).unwrap();
    let stats = collect_activation_stats(&mut float, &data.valid, 2, 128).unwrap();
    let quantize = |body: &str| {
        let text = format!("quantizers:\n  q:\n    class: PostTrainLinearQuantizer\n    per_channel_wts: true\n    mode: ASYMMETRIC_UNSIGNED\n{body}");
        let config = PostTrainConfig { stats: Some(stats.clone()), ..PostTrainConfig::from_yaml_str(&text, "q.yaml").unwrap() };
        let mut q = distill::models::copy_model(&float).unwrap();
        PostTrainLinearQuantizer::new(config).prepare_model(&mut q).unwrap();
        q
    };
    let mut mixed = quantize("    bits_parameters: 4\n    overrides:\n      conv1: {bits_weights: 3}\n      fc3: {bits_weights: 8}\n");
    let eight = quantize("    bits_parameters: 8\n");
    let dir = distill::io::TempDir::new().unwrap();
    let exported = export_integer_model(&mixed, dir.path().join("mixed.safetensors")).unwrap();
    let exported8 = export_integer_model(&eight, dir.path().join("eight.safetensors")).unwrap();
    let kinds: Vec<(&str, &str)> = exported.integer_layers.iter().map(|(l, k)| (l.as_str(), k.as_str())).collect();
    assert_eq!(kinds, [("conv1", "packed 3-bit"), ("conv2", "packed 4-bit"), ("fc1", "packed 4-bit"), ("fc2", "packed 4-bit"), ("fc3", "Uint8")]);
    let stored: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&exported.path).unwrap().into_iter().collect();
    let mut saved = 0;
    for (layer, weights, bits) in [("conv1", 150i64, 3i64), ("conv2", 2400, 4), ("fc1", 48000, 4), ("fc2", 10080, 4), ("fc3", 840, 8)] {
        assert_eq!(stored[&format!("{layer}.weight")].numel() as i64, (weights * bits + 7) / 8, "{layer}");
        let l = (mixed.module(layer).unwrap() as &dyn std::any::Any).downcast_ref::<RangeLinearQuantParamLayer>().unwrap();
        let own = l.integer_weight().unwrap();
        let read = read_integer_weight(&stored, layer).unwrap();
        assert_eq!(read.size(), own.size(), "{layer}");
        assert!(read.to_kind(Kind::Double).equal(&own.to_kind(Kind::Double)), "{layer}: the stored integers differ");
        saved += weights - (weights * bits + 7) / 8;
    }
    // The three small int64 tensors per packed layer add a few hundred bytes of header and data.
    let shrunk = exported8.file_bytes as i64 - exported.file_bytes as i64;
    assert!(shrunk <= saved && shrunk >= saved - 2048, "the file shrank by {shrunk} bytes; packing saves {saved}");
    println!("packed: {} bytes against {} at 8 bits (weights alone {saved} bytes fewer)", exported.file_bytes, exported8.file_bytes);
    let simulated = validate(&mut mixed, &data.test, 256).unwrap().top1;
    let integer = evaluate_integer(&exported, &mut mixed, &data.test, 256).unwrap().top1;
    assert!((integer - simulated).abs() <= 0.2, "simulated {simulated:.2} vs integer {integer:.2}");
    // A damaged file: a packed stream that does not fit its shape.
    let mut broken = stored;
    broken.insert("conv2.weight_shape".into(), Tensor::from_slice(&[16i64, 6, 5, 6]));
    assert!(read_integer_weight(&broken, "conv2").unwrap_err().to_string().contains("do not hold 2880 codes"));
}

fn stats(min: f64, max: f64) -> TensorStats {
    TensorStats { range: RangeStats { min, max, avg_min: min, avg_max: max, mean: 0.0, std: 0.0, b: 0.0 }, shape: None, total_numel: None, histogram: None }
}

#[test]
fn linear_wrapper_matches_a_hand_computation() {
    // y = W x + b with W = [[0.5, -1.0], [0.25, 2.0]], b = [0.1, -0.2], x = [1.0, -0.5], symmetric 8 bits,
    // static input range ±2, output range ±3, per-tensor weights (max |W| = 2).
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let lin = Linear::new(vs.root() / "fc", 2, 2, true).unwrap();
    tch::no_grad(|| {
        lin.weight.shallow_clone().copy_(&Tensor::from_slice(&[0.5f32, -1.0, 0.25, 2.0]).view([2, 2]));
        lin.bias.as_ref().unwrap().shallow_clone().copy_(&Tensor::from_slice(&[0.1f32, -0.2]));
    });
    let acts = ActQuant::new(
        ActSettings::new(8, LinearQuantMode::Symmetric),
        Some(ModuleStats { inputs: [(0, stats(-2.0, 2.0))].into(), output: stats(-3.0, 3.0) }),
    );
    let weights = WeightSettings::new(8, LinearQuantMode::Symmetric, false);
    let layer = RangeLinearQuantParamLayer::new(Box::new(lin), weights, Some(acts)).map_err(|(_, e)| e).unwrap();
    let y = layer.forward(&Tensor::from_slice(&[1.0f32, -0.5]).view([1, 2]), &mut Forward::new(false, &[])).unwrap();

    // By hand: s_w = 127.5/2 = 63.75, s_x = 127.5/2 = 63.75, s_y = 127.5/3 = 42.5.
    let rne = |v: f64| v.round_ties_even();
    let (s_w, s_x, s_y) = (63.75, 63.75, 42.5);
    let w: [[f64; 2]; 2] = [[0.5, -1.0], [0.25, 2.0]];
    // 2.0 ↦ round(127.5) = 128, clamped to 127 (the symmetric full range stops at 127).
    let wq: Vec<Vec<f64>> = w.iter().map(|r| r.iter().map(|v| rne(s_w * v).clamp(-128.0, 127.0)).collect()).collect();
    let xq: Vec<f64> = [1.0, -0.5].iter().map(|v| rne(s_x * v)).collect();
    let acc_s = s_w * s_x;
    let expected: Vec<f64> = (0..2)
        .map(|o| {
            let bq = rne(acc_s * [0.1, -0.2][o]);
            let acc = wq[o][0] * xq[0] + wq[o][1] * xq[1] + bq;
            let q = rne(acc * s_y / acc_s).clamp(-128.0, 127.0);
            q / s_y
        })
        .collect();
    let got = Vec::<f64>::try_from(&y.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-6, "{got:?} vs {expected:?}");
    }
    assert_eq!(Vec::<f32>::try_from(&layer.integer_weight().unwrap().flatten(0, -1)).unwrap(), [32.0, -64.0, 16.0, 128.0f32.min(127.0)]);
}

#[test]
fn conv_wrapper_matches_a_hand_computation_per_channel_asymmetric() {
    // One 1×1 conv, 2 output channels, 1 input channel: y_c = w_c·x + b_c; asymmetric unsigned, per channel.
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let conv = distill::nn::Conv2d::new(vs.root() / "c", distill::nn::Conv2dConfig::new(1, 2, 1)).unwrap();
    tch::no_grad(|| {
        conv.weight.shallow_clone().copy_(&Tensor::from_slice(&[0.8f32, -0.4]).view([2, 1, 1, 1]));
        conv.bias.as_ref().unwrap().shallow_clone().copy_(&Tensor::from_slice(&[0.0f32, 0.5]));
    });
    let acts = ActQuant::new(
        ActSettings::new(8, LinearQuantMode::AsymmetricUnsigned),
        Some(ModuleStats { inputs: [(0, stats(0.0, 1.0))].into(), output: stats(-1.0, 1.0) }),
    );
    let weights = WeightSettings::new(8, LinearQuantMode::AsymmetricUnsigned, true);
    let layer = RangeLinearQuantParamLayer::new(Box::new(conv), weights, Some(acts)).map_err(|(_, e)| e).unwrap();
    let x = Tensor::from_slice(&[0.3f32, 0.7]).view([1, 1, 1, 2]);
    let y = layer.forward(&x, &mut Forward::new(false, &[])).unwrap();
    // Weights per channel: [0, 0.8] → s = 255/0.8, zp = 0; [−0.4, 0] → s = 255/0.4, zp = round(−255) = −255.
    // Input [0, 1]: s_x = 255, zp_x = 0. Output [−1, 1]: s_y = 127.5, zp_y = round(−127.5) = −128.
    // The tensors hold float32 values (0.3f32 is a little above 0.3), and quantization is exact arithmetic on them:
    // 255·0.3f32 = 76.500003 rounds to 77, where float32 multiplication would land on the tie 76.5 and give 76.
    let rne = |v: f64| v.round_ties_even();
    let f = |v: f64| v as f32 as f64;
    let s_w = [255.0 / f(0.8), 255.0 / f(0.4)];
    let zp_w = [0.0, -255.0];
    let w = [f(0.8), f(-0.4)];
    let b = [0.0, 0.5];
    let (s_x, s_y, zp_y) = (255.0, 127.5, -128.0);
    let mut expected = Vec::new();
    for c in 0..2 {
        let wq = rne(s_w[c] * w[c] - zp_w[c]).clamp(0.0, 255.0) + zp_w[c];
        let acc_s = s_w[c] * s_x;
        for xv in [f(0.3), f(0.7)] {
            let xq = rne(s_x * xv);
            let acc = wq * xq + rne(acc_s * b[c]);
            let q = rne(acc * s_y / acc_s - zp_y).clamp(0.0, 255.0);
            expected.push((q + zp_y) / s_y);
        }
    }
    let got = Vec::<f64>::try_from(&y.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-6, "{got:?} vs {expected:?}");
    }
}

#[test]
fn qat_gradients_reach_float_weights_and_pact_alpha_has_its_own_decay() {
    let yaml = "quantizers:\n  q:\n    class: PACTQuantizer\n    bits_activations: 4\n    bits_weights: 4\n    act_clip_decay: 0.0005\n    overrides:\n      fc3: {bits_weights: null, bits_activations: null}\npolicies:\n  - quantizer: {instance_name: q}\n    starting_epoch: 0\n    ending_epoch: 2\n    frequency: 1\n";
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut scheduler = Schedule::from_yaml_str(yaml, "q.yaml").unwrap().build(&model).unwrap();
    let mut opt = distill::optim::Optimizer::for_model(&model, distill::optim::OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
    scheduler.on_epoch_begin(&mut model, 0, Some(&mut opt)).unwrap();
    let names: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"conv1.float_weight".to_string()) && names.contains(&"fc3.weight".to_string()), "{names:?}");
    assert!(names.contains(&"relu1.clip_val".to_string()));
    assert_eq!(opt.groups().len(), 2);
    assert_eq!(opt.groups()[1].weight_decay, 0.0005);
    assert!(opt.groups()[1].params().iter().all(|(n, _)| n.ends_with("clip_val")));
    let x = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu)) * 3.0;
    let loss = model.forward(&x).unwrap().sum(Kind::Float);
    loss.backward();
    let fw = model.parameter("conv1.float_weight").unwrap();
    assert!(fw.grad().defined() && fw.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "STE passes gradient to float_weight");
    let alpha = model.parameter("relu1.clip_val").unwrap();
    assert!(alpha.grad().defined());
    // Every quantized weight has at most 2^4 distinct values; fc3 stays in float.
    let all = distill::quantization::qat::quantized_params(&model).unwrap();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]);
    for (n, q) in &all {
        let distinct = q.flatten(0, -1).unique_dim(0, true, false, false).0.size()[0];
        assert!(distinct <= 16, "{n}: {distinct} levels");
    }

    // A pruned weight stays zero once quantized (DoReFa would map it to 1/15).
    let mask = Tensor::rand([120, 400], (Kind::Float, Device::Cpu)).ge(0.5).to_kind(Kind::Float);
    scheduler.masks_mut().set_mask("fc1.weight", mask.shallow_clone(), &[120, 400]).unwrap();
    scheduler.mask_all_weights(&model).unwrap();
    let q = distill::quantization::qat::quantized_params(&model).unwrap().into_iter().find(|(n, _)| n == "fc1.weight").unwrap().1;
    assert_eq!(q.f_mul(&(1.0 - &mask)).unwrap().abs().sum(Kind::Float).double_value(&[]), 0.0, "masks reach float_weight and survive quantization");
}

#[test]
fn statistics_roundtrip_and_checks() {
    let data = distill::data::mnist_bundled().unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let st = collect_activation_stats(&mut model, &data.valid, 1, 100).unwrap();
    let conv1 = st.get("conv1").unwrap();
    assert_eq!(conv1.output.shape.as_deref(), Some("(100, 6, 28, 28)"));
    assert!(conv1.output.range.min <= conv1.output.range.avg_min && conv1.output.range.avg_max <= conv1.output.range.max);
    let relu = &st.get("relu1").unwrap().output.range;
    assert!(relu.min >= 0.0);
    let dir = distill::io::TempDir::new().unwrap();
    st.to_yaml_file(dir.path().join("s.yaml")).unwrap();
    let back = ActivationStats::from_yaml_file(dir.path().join("s.yaml")).unwrap();
    assert_eq!(back.modules.len(), st.modules.len());
    assert!((back.get("fc1").unwrap().output.range.max - st.get("fc1").unwrap().output.range.max).abs() < 1e-12);
    // Distiller's own statistics file reads, and does not fit LeNet.
    let distiller = ActivationStats::from_yaml_file(root().join("tests/distiller-schedules/examples/quantization/post_train_quant/stats/resnet18_quant_stats.yaml")).unwrap();
    assert!(distiller.get("layer4.1.conv2").is_some());
    let err = distiller.check_model(&model).unwrap_err().to_string();
    assert!(err.contains("unknown module in calibration statistics 'bn1'"), "{err}");
    let err = PostTrainLinearQuantizer::new(PostTrainConfig { stats: Some(distiller), ..PostTrainConfig::default() }).prepare_model(&mut model).unwrap_err();
    assert!(err.to_string().contains("calibration statistics"));
}

#[test]
fn bad_quantization_input_is_an_error() {
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let check = |yaml: &str| Schedule::from_yaml_str(yaml, "q.yaml").and_then(|s| s.check_model(&model).map(|_| s)).and_then(|s| {
        let mut m = create_model("lenet", "mnist", Device::Cpu).unwrap();
        let mut sched = s.build(&m)?;
        let mut opt = distill::optim::Optimizer::for_model(&m, distill::optim::OptimizerConfig::sgd(0.9, 0.0), 0.1)?;
        sched.on_epoch_begin(&mut m, 0, Some(&mut opt))
    });
    let base = "quantizers:\n  q:\n    class: DorefaQuantizer\n    bits_weights: 4\n    bits_activations: 4\nXX\npolicies:\n  - quantizer: {instance_name: q}\n    starting_epoch: 0\n    ending_epoch: 2\n    frequency: 1\n";
    let cases = [
        ("    overrides: {}", ""),
        ("    overrides:\n      conv9: {bits_weights: 8}", "unknown module pattern 'conv9'"),
        ("    overrides:\n      'conv[': {bits_weights: 8}", "is not a valid regex"),
        // A module the method does not replace is left as it is, as in Distiller.
        ("    overrides:\n      pool1: {bits_activations: 4}", ""),
        ("    overrides:\n      conv1: {bits_weights: 0}", "0 bits: must be 1..=32"),
    ];
    for (insert, expected) in cases {
        let result = check(&base.replace("XX", insert));
        match expected {
            "" => result.unwrap(),
            e => assert!(result.as_ref().err().is_some_and(|r| r.to_string().contains(e)), "{insert}: {result:?}"),
        }
    }
    let bad_bits = base.replace("bits_weights: 4", "bits_weights: 33").replace("XX", "");
    assert!(Schedule::from_yaml_str(&bad_bits, "q.yaml").unwrap_err().to_string().contains("33 bits"));
    let ptq = "quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n    mode: SIDEWAYS\n";
    assert!(Schedule::from_yaml_str(ptq, "q.yaml").unwrap_err().to_string().contains("unknown quantization mode 'SIDEWAYS'"));
    let ptq = "quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n    clip_acts: MEDIAN\n";
    assert!(Schedule::from_yaml_str(ptq, "q.yaml").unwrap_err().to_string().contains("unknown clip mode 'MEDIAN'"));
    let ptq = "quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n    net_aware: maybe\n";
    let err = Schedule::from_yaml_str(ptq, "q.yaml").unwrap_err().to_string();
    assert!(err.contains("q.yaml:4:16") && err.contains("expected a boolean"), "{err}");
    let ptq = "quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n    clip_weights: MEDIAN\n";
    let err = Schedule::from_yaml_str(ptq, "q.yaml").unwrap_err().to_string();
    assert!(err.contains("q.yaml:4") && err.contains("unknown clip_weights mode 'MEDIAN'"), "{err}");
    let ptq = "quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n    clip_weights: MSE\n    also_clip_weights: true\n";
    assert!(Schedule::from_yaml_str(ptq, "q.yaml").unwrap_err().to_string().contains("choose one"));
    let dir = distill::io::TempDir::new().unwrap();
    std::fs::write(dir.path().join("off.yaml"), "quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n    net_aware: false\n").unwrap();
    assert!(!PostTrainConfig::from_schedule_file(dir.path().join("off.yaml")).unwrap().net_aware);
    assert!(PostTrainConfig::default().net_aware);
    let ptq_policy = "quantizers:\n  p:\n    class: PostTrainLinearQuantizer\npolicies:\n  - quantizer: {instance_name: p}\n    epochs: [0]\n";
    let err = Schedule::from_yaml_str(ptq_policy, "q.yaml").unwrap().build(&model).err().unwrap().to_string();
    assert!(err.contains("applied after training with `distill quantize`"), "{err}");
}

#[test]
fn pact_fine_tuning_of_lenet_at_4_bits_stays_within_1_5_points() {
    let data = distill::data::mnist_bundled().unwrap();
    tch::manual_seed(1);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut cosine = Schedule::from_yaml_str("lr_schedulers:\n  c: {class: CosineAnnealingLR, T_max: 10}\npolicies:\n  - lr_scheduler: {instance_name: c}\n    starting_epoch: 0\n    ending_epoch: 10\n    frequency: 1\n", "c.yaml").unwrap().build(&model).unwrap();
    let fp32 = fit(&mut model, &data, Some(&mut cosine), &quiet(10)).unwrap().test.top1;
    let mut qat = Schedule::from_file(root().join("schedules/lenet_pact4.yaml")).unwrap().build(&model).unwrap();
    let config = TrainConfig { lr: 0.005, ..quiet(8) };
    let q = fit(&mut model, &data, Some(&mut qat), &config).unwrap().test.top1;
    assert!(fp32 - q <= 1.5, "fp32 {fp32:.2} vs PACT 4-bit {q:.2}");
    assert_eq!(model.module("conv2").unwrap().type_name(), "Conv2d");
    assert!(model.parameter("conv2.float_weight").is_ok() && model.parameter("conv1.weight").is_ok());
}

#[test]
fn batch_norm_folding_keeps_the_eval_output() {
    tch::manual_seed(4);
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    // Non-trivial running statistics, as after training.
    for (name, t) in model.named_buffers() {
        tch::no_grad(|| {
            let v = if name.ends_with("running_var") { Tensor::rand(t.size(), (Kind::Float, Device::Cpu)) + 0.5 } else { Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1 };
            t.shallow_clone().copy_(&v);
        });
    }
    model.eval();
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let before = model.forward(&x).unwrap();
    let pairs = distill::quantization::bn_fold::fold_batch_norms(&mut model).unwrap();
    assert_eq!(pairs.len(), 21, "stem, 18 block convs, 2 downsample convs");
    assert!(pairs.contains(&("layer2.0.downsample.0".to_string(), "layer2.0.downsample.1".to_string())));
    assert_eq!(model.module("layer1.0.bn1").unwrap().type_name(), "Identity");
    let after = model.forward(&x).unwrap();
    let diff = (&before - &after).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "max difference {diff}");
}

/// Distiller's net-aware preparation on resnet20_cifar, every layer's output parameters against its rules applied by
/// hand to the calibration statistics: a batch norm's statistics move to the convolution folded with it; a module
/// whose only consumer is a ReLU (the stem, each block's first convolution, each residual add) has its range
/// clipped at 0 and absorbs the ReLU, which becomes an Identity; the others keep their full range.
#[test]
fn net_aware_ptq_fuses_relus_and_clips_ranges_as_distiller_on_resnet20() {
    use distill::quantization::range_linear::RangeLinearQuantEltwiseAdd;
    let build = || {
        tch::manual_seed(3);
        let model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
        // Batch norms with non-trivial running statistics, so folding changes the convolutions.
        tch::no_grad(|| {
            for (name, t) in model.state_dict() {
                if name.ends_with("running_mean") {
                    t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1));
                } else if name.ends_with("running_var") {
                    t.shallow_clone().copy_(&(Tensor::rand(t.size(), (Kind::Float, Device::Cpu)) + 0.5));
                }
            }
        });
        model
    };
    // One model and two exact copies: the global generator is shared with the tests running alongside.
    let mut model = build();
    let (reference, mut plain) = (distill::models::copy_model(&model).unwrap(), distill::models::copy_model(&model).unwrap());
    let data = distill::data::Dataset::synthetic(16, [3, 32, 32], 10, 5).unwrap();
    let stats = collect_activation_stats(&mut model, &data, 2, 8).unwrap();
    let config = PostTrainConfig { mode: ModeSpec::both(LinearQuantMode::AsymmetricUnsigned), stats: Some(stats.clone()), ..PostTrainConfig::default() };
    let prepared = PostTrainLinearQuantizer::new(config.clone()).prepare_model(&mut model).unwrap();
    let blocks: Vec<String> = (1..=3).flat_map(|l| (0..3).map(move |b| format!("layer{l}.{b}"))).collect();
    let mut fused: Vec<(String, String)> = vec![("conv1".into(), "relu".into())];
    for b in &blocks {
        fused.push((format!("{b}.conv1"), format!("{b}.relu1")));
        fused.push((format!("{b}.residual_eltwiseadd"), format!("{b}.relu2")));
    }
    let mut got = prepared.fused_relus.clone();
    got.sort();
    fused.sort();
    assert_eq!(got, fused);
    for (_, relu) in &fused {
        assert_eq!(model.module(relu).unwrap().type_name(), "Identity", "{relu}");
    }
    // Those are all of ResNet-20's ReLUs; a block's second convolution (read by the add) keeps its full range.
    assert!(model.named_modules().iter().all(|m| !m.type_name.contains("ReLU")));
    // By hand: asymmetric unsigned 8 bits over [min(lo, 0), max(hi, 0)]: scale 255 / (hi − lo), zero point
    // round(scale · lo).
    let expected = |source: &str, relu_after: bool| {
        let r = stats.get(source).unwrap().output.range;
        let lo = if relu_after { r.min.max(0.0) } else { r.min }.min(0.0);
        let hi = r.max.max(0.0);
        let scale = 255.0 / (hi - lo);
        (scale, (scale * lo).round_ties_even())
    };
    let check = |module: &str, p: distill::quantization::q_utils::QParams, (scale, zp): (f64, f64)| {
        let (s, z) = (p.scale.double_value(&[]), p.zero_point.double_value(&[]));
        assert!((s - scale).abs() <= 1e-9 * scale && z == zp, "{module}: scale {s} zero point {z}, by hand {scale} {zp}");
    };
    let layer_params = |name: &str| {
        let m = model.module(name).unwrap();
        let layer = (m as &dyn std::any::Any).downcast_ref::<RangeLinearQuantParamLayer>().expect("a quantized layer");
        layer.activation_quant().unwrap().static_output_params().unwrap().unwrap()
    };
    check("conv1", layer_params("conv1"), expected("bn1", true));
    let mut halves = 0;
    for b in &blocks {
        check(&format!("{b}.conv1"), layer_params(&format!("{b}.conv1")), expected(&format!("{b}.bn1"), true));
        let (_, zp) = expected(&format!("{b}.bn2"), false);
        check(&format!("{b}.conv2"), layer_params(&format!("{b}.conv2")), expected(&format!("{b}.bn2"), false));
        halves += (zp != 0.0) as usize;
        let add = model.module(&format!("{b}.residual_eltwiseadd")).unwrap();
        let add = (add as &dyn std::any::Any).downcast_ref::<RangeLinearQuantEltwiseAdd>().expect("a quantized add");
        check(&format!("{b}.residual_eltwiseadd"), add.activation_quant().static_output_params().unwrap().unwrap(), expected(&format!("{b}.residual_eltwiseadd"), true));
        assert!(add.activation_quant().output.half_range);
    }
    assert_eq!(halves, 9, "every second convolution keeps a negative range (a non-zero zero point)");
    // Switched off (Distiller has no switch; distill's `net_aware: false`), the ReLUs stay and quantize their own
    // outputs, and the layers before them keep their full range.
    let off = PostTrainLinearQuantizer::new(PostTrainConfig { net_aware: false, ..config }).prepare_model(&mut plain).unwrap();
    assert!(off.fused_relus.is_empty() && off.clipped_stats.is_empty());
    assert_eq!(plain.module("layer1.0.relu1").unwrap().type_name(), "RangeLinearFakeQuantWrapper");
    let m = plain.module("layer1.0.conv1").unwrap();
    let layer = (m as &dyn std::any::Any).downcast_ref::<RangeLinearQuantParamLayer>().unwrap();
    assert!(!layer.output_relu());
    // The quantized network still computes: finite logits close to the float ones.
    let x = data.images().unwrap().shallow_clone();
    let float = reference.forward_t(&x, false).unwrap();
    for m in [&model, &plain] {
        let error = (m.forward_t(&x, false).unwrap() - &float).abs().max().double_value(&[]);
        assert!(error < 0.1 * float.abs().max().double_value(&[]), "{error}");
    }
}

/// Cross-layer equalization on LeNet (a chain of five layers through ReLUs, pooling and the flatten) and ResNet-20
/// (each block's two convolutions; the residual stream is left alone): the float function stays within 1e-5 of its
/// scale, and each pair ends with equal ranges channel by channel.
#[test]
fn cross_layer_equalization_keeps_the_function_and_evens_the_filters() {
    use distill::quantization::equalization::equalize_cross_layer;
    for (arch, dataset, pairs) in [("lenet", "mnist", 4), ("resnet20_cifar", "cifar10", 9)] {
        tch::manual_seed(4);
        let mut model = create_model(arch, dataset, Device::Cpu).unwrap();
        let (shape, classes) = distill::models::dataset_shape(dataset).unwrap();
        let x = distill::data::Dataset::synthetic(8, shape, classes, 2).unwrap().images().unwrap().shallow_clone();
        let before = model.forward_t(&x, false).unwrap();
        let report = equalize_cross_layer(&mut model).unwrap();
        assert_eq!(report.pairs.len(), pairs, "{arch}: {:?}", report.pairs);
        if arch == "resnet20_cifar" {
            assert_eq!(report.folded.len(), 21);
            assert!(report.pairs.iter().all(|p| p.first.ends_with(".conv1") && p.second == p.first.replace("conv1", "conv2")), "{:?}", report.pairs);
        }
        // Converged: in every pair, each channel's filter range in the first layer equals its input range in the
        // second (the pairs of a chain share layers, so this holds only once the sweeps settle).
        for p in &report.pairs {
            let (w1, w2) = (model.parameter(&format!("{}.weight", p.first)).unwrap(), model.parameter(&format!("{}.weight", p.second)).unwrap());
            let r1 = w1.reshape([p.channels, -1]).abs().amax(1, false);
            let r2 = w2.reshape([w2.size()[0], p.channels, -1]).abs().amax([0i64, 2].as_slice(), false);
            let worst = ((&r1 - &r2).abs() / &r1).max().double_value(&[]);
            assert!(worst < 1e-4, "{arch} {} → {}: ranges differ by {worst} relative", p.first, p.second);
        }
        let after = model.forward_t(&x, false).unwrap();
        let diff = (&after - &before).abs().max().double_value(&[]);
        assert!(diff <= 1e-5 * before.abs().max().double_value(&[]), "{arch}: outputs moved by {diff}");
        println!("{arch}: {} pairs in {} sweeps, output change {diff:.2e}", report.pairs.len(), report.sweeps);
    }
    // Statistics collected before equalizing no longer describe the model: refused; after it, accepted.
    let data = distill::data::Dataset::synthetic(16, [1, 28, 28], 10, 3).unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let stale = collect_activation_stats(&mut model, &data, 1, 16).unwrap();
    let config = |stats| PostTrainConfig { stats: Some(stats), cross_layer_equalization: true, ..PostTrainConfig::default() };
    let err = PostTrainLinearQuantizer::new(config(stale)).prepare_model(&mut model).unwrap_err().to_string();
    assert!(err.contains("collected before it"), "{err}");
    equalize_cross_layer(&mut model).unwrap();
    let fresh = collect_activation_stats(&mut model, &data, 1, 16).unwrap();
    let prepared = PostTrainLinearQuantizer::new(config(fresh)).prepare_model(&mut model).unwrap();
    assert_eq!(prepared.equalized.len(), 4);
    let err = equalize_cross_layer(&mut model).unwrap_err().to_string();
    assert!(err.contains("already quantized"), "{err}");
}

/// MSE weight ranges through the quantizer: every layer's integer weights use a range no wider than its own, and
/// the weights' quantization error is no larger than with the full range, layer by layer.
#[test]
fn mse_weight_ranges_never_quantize_worse_than_the_full_range() {
    tch::manual_seed(5);
    let original = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let quantized_error = |mse: bool| -> Vec<f64> {
        let mut model = distill::models::copy_model(&original).unwrap();
        let float: Vec<(String, Tensor)> = model.named_parameters().into_iter().filter(|(n, _)| n.ends_with("weight")).map(|(n, t)| (n, t.detach().copy())).collect();
        let mode = ModeSpec::both(LinearQuantMode::AsymmetricUnsigned);
        let config = PostTrainConfig { bits_parameters: Some(4), bits_activations: None, per_channel_wts: true, clip_weights_mse: mse, mode, ..PostTrainConfig::default() };
        PostTrainLinearQuantizer::new(config).prepare_model(&mut model).unwrap();
        // Without activation bits, each layer keeps its weights quantized and dequantized.
        float.iter().map(|(n, w)| (model.parameter(&n.replace(".weight", ".wrapped_module.weight")).unwrap() - w).square().mean(Kind::Double).double_value(&[])).collect()
    };
    let (full, mse) = (quantized_error(false), quantized_error(true));
    assert_eq!(full.len(), 5);
    for (f, m) in full.iter().zip(&mse) {
        assert!(m <= f, "{mse:?} vs {full:?}");
    }
    assert!(mse.iter().zip(&full).any(|(m, f)| m < &(0.9 * f)), "{mse:?} vs {full:?}");
}

/// Bias correction on one layer at a time (4-bit weights, float activations, so the output is exactly the
/// quantized weights applied to the input): the mean output shift on the calibration data, per channel, drops to
/// within 1e-6 of what it was or to float32 rounding, for a padded convolution (the border patches included) and
/// a fully connected layer.
#[test]
fn bias_correction_removes_a_layers_mean_output_shift() {
    use distill::nn::{Conv2d, Conv2dConfig, ModelInfo, Sequential};
    use distill::quantization::bias_correction::{correct_biases, InputMeans};
    let cases: [(&str, [i64; 3]); 2] = [("conv", [3, 6, 6]), ("fc", [1, 1, 12])];
    for (kind, shape) in cases {
        let build = || {
            tch::manual_seed(9);
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let net = match kind {
                "conv" => Sequential::new().add("layer", Conv2d::new(vs.root() / "layer", Conv2dConfig::new(3, 4, 3).padding(1)).unwrap()),
                _ => Sequential::new().add("layer", Linear::new(vs.root() / "layer", 12, 5, false).unwrap()),
            };
            distill::nn::Model::new(vs, net, ModelInfo::new(kind, "toy", shape, 4)).unwrap()
        };
        let (mut model, mut float) = (build(), build());
        // The same weights in both (the global generator is shared with the tests running alongside).
        float.load_state_dict(&model.state_dict(), true).unwrap();
        // Inputs with a non-zero mean per channel, which turns the weight error into an output shift.
        let data = distill::data::Dataset::synthetic(32, shape, 4, 6).unwrap();
        let x = data.images().unwrap() + 0.7;
        let calibration = distill::data::Dataset::new("calibration", x.shallow_clone(), data.labels().shallow_clone(), 4).unwrap();
        let means = InputMeans::collect(&mut model, &calibration, 2, 16).unwrap();
        let config = PostTrainConfig { bits_parameters: Some(4), bits_activations: None, save_fp_weights: true, ..PostTrainConfig::default() };
        PostTrainLinearQuantizer::new(config).prepare_model(&mut model).unwrap();
        let shift = |m: &distill::nn::Model| {
            let d = m.forward_t(&x, false).unwrap() - float.forward_t(&x, false).unwrap();
            let dims: Vec<i64> = (0..d.dim() as i64).filter(|&i| i != 1).collect();
            d.to_kind(Kind::Double).mean_dim(dims.as_slice(), false, Kind::Double)
        };
        let before = shift(&model);
        let corrected = correct_biases(&mut model, &means).unwrap();
        assert_eq!(corrected.len(), 1);
        let after = shift(&model);
        let (b, a) = (before.abs().max().double_value(&[]), after.abs().max().double_value(&[]));
        println!("{kind}: mean output shift {b:.3e} before, {a:.3e} after");
        // The forward passes run in float32: what remains is their rounding (measured: 6e-9 and 1.6e-8).
        assert!(b > 1e-3 && a <= (1e-6 * b).max(3e-8), "{kind}: {b} → {a}");
    }
    // Without the floating-point weights, or on a float model, it says what to do.
    let data = distill::data::Dataset::synthetic(8, [1, 28, 28], 10, 1).unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let means = InputMeans::collect(&mut model, &data, 1, 8).unwrap();
    assert!(correct_biases(&mut model, &means).unwrap_err().to_string().contains("quantize it first"));
    PostTrainLinearQuantizer::new(PostTrainConfig::default()).prepare_model(&mut model).unwrap();
    assert!(correct_biases(&mut model, &means).unwrap_err().to_string().contains("save_fp_weights: true"));
}

/// A buffer of `model` (shared storage: changing it changes the model).
fn buffer(model: &distill::nn::Model, name: &str) -> Tensor {
    model.named_buffers().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no buffer {name}")).1
}

/// Analytical bias correction on a network where its assumption holds: Gaussian images through a convolution
/// give Gaussian channels, and the batch norm's running statistics are set to their exact mean and variance, so
/// each batch norm's output is `N(β, γ²)`. The analytical means then match the ones measured on 512 images, with
/// cross-layer equalization's rescaling too, and the data-free pipeline removes most of the output shift.
#[test]
fn analytical_bias_correction_matches_measured_means_where_batch_norms_say_them() {
    use distill::nn::{BatchNorm2d, Conv2d, Conv2dConfig, ModelInfo, ReLU, Sequential};
    use distill::quantization::bias_correction::{expected_relu_mean, InputMeans};
    // The rectified Gaussian's mean against values computed by hand (Python's math.erf).
    for (mu, sigma, expected) in [(0.0, 1.0, 0.3989422804014327), (0.3, 2.0, 0.9568439695268507), (-1.0, 0.5, 0.004245351308414823), (0.7, 0.0, 0.7)] {
        assert!((expected_relu_mean(mu, sigma).unwrap() - expected).abs() < 1e-12, "{mu} {sigma}");
    }
    let build = || {
        tch::manual_seed(4);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let net = Sequential::new()
            .add("a", Conv2d::new(vs.root() / "a", Conv2dConfig::new(2, 4, 3)).unwrap())
            .add("bn1", BatchNorm2d::new(vs.root() / "bn1", 4).unwrap())
            .add("relu", ReLU)
            .add("b", Conv2d::new(vs.root() / "b", Conv2dConfig::new(4, 3, 3)).unwrap())
            .add("bn2", BatchNorm2d::new(vs.root() / "bn2", 3).unwrap())
            .add("c", Conv2d::new(vs.root() / "c", Conv2dConfig::new(3, 2, 1)).unwrap());
        let mut model = distill::nn::Model::new(vs, net, ModelInfo::new("toy", "gauss", [2, 12, 12], 2)).unwrap();
        tch::no_grad(|| {
            // bn1 standardizes a's Gaussian channels exactly: mean = a's bias, variance = each filter's squared norm.
            let (w, b) = (model.parameter("a.weight").unwrap(), model.parameter("a.bias").unwrap());
            let var = w.square().sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float) - 1e-5;
            buffer(&model, "bn1.running_mean").copy_(&b);
            buffer(&model, "bn1.running_var").copy_(&var);
            let _ = model.parameter("bn1.weight").unwrap().copy_(&Tensor::from_slice(&[1.5f32, -0.7, 0.4, 2.0]));
            let _ = model.parameter("bn1.bias").unwrap().copy_(&Tensor::from_slice(&[0.3f32, -0.5, 1.0, 0.0]));
            let _ = model.parameter("bn2.bias").unwrap().copy_(&Tensor::from_slice(&[0.8f32, -0.4, 0.2]));
        });
        model.eval();
        model
    };
    let mut model = build();
    let analytical = InputMeans::analytical(&mut model).unwrap();
    assert_eq!(analytical.skipped().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(analytical.skipped()[0].1.contains("model's input"));
    // bn2's running mean set to b's true output mean (bias plus weights times the analytical input means), so that
    // c's input has mean β exactly.
    tch::no_grad(|| {
        let (w, b) = (model.parameter("b.weight").unwrap(), model.parameter("b.bias").unwrap());
        let m = analytical.get("b").unwrap().to_kind(Kind::Float);
        let mean = w.reshape([3, -1]).matmul(&m) + b;
        buffer(&model, "bn2.running_mean").copy_(&mean);
    });
    let images = Tensor::randn([512, 2, 12, 12], (Kind::Float, Device::Cpu));
    let data = distill::data::Dataset::new("gauss", images.shallow_clone(), Tensor::zeros([512], (Kind::Int64, Device::Cpu)), 2).unwrap();
    let close = |a: &Tensor, m: &Tensor, what: &str| {
        let worst = (a - m).abs().max().double_value(&[]);
        assert!(worst < 0.03, "{what}: analytical {a} against measured {m}");
    };
    let measured = InputMeans::collect(&mut model, &data, 4, 128).unwrap();
    for layer in ["b", "c"] {
        close(analytical.get(layer).unwrap(), measured.get(layer).unwrap(), layer);
    }
    assert!((analytical.get("b").unwrap().double_value(&[0]) - expected_relu_mean(0.3f32 as f64, 1.5).unwrap()).abs() < 1e-12);
    assert!((analytical.get("c").unwrap().double_value(&[1]) - -0.4f32 as f64).abs() < 1e-12);
    // Equalization divides b's input channels (and c's) by its scales; the rescaled means match the ones measured
    // on the equalized model.
    let mut equalized = build();
    tch::no_grad(|| buffer(&equalized, "bn2.running_mean").copy_(&buffer(&model, "bn2.running_mean")));
    let mut means = InputMeans::analytical(&mut equalized).unwrap();
    let eq = distill::quantization::equalization::equalize_cross_layer(&mut equalized).unwrap();
    assert_eq!(eq.pairs.len(), 2);
    assert!(eq.pairs.iter().any(|p| p.scales.iter().any(|s| (s - 1.0).abs() > 0.1)), "{:?}", eq.pairs);
    for p in &eq.pairs {
        means.rescale_input_channels(&p.second, &p.scales).unwrap();
    }
    let measured = InputMeans::collect(&mut equalized, &data, 4, 128).unwrap();
    for layer in ["b", "c"] {
        close(means.get(layer).unwrap(), measured.get(layer).unwrap(), &format!("{layer} equalized"));
    }
    // The data-free pipeline (no calibration: dynamic ranges; 3-bit weights, float activations).
    let float = build();
    tch::no_grad(|| buffer(&float, "bn2.running_mean").copy_(&buffer(&model, "bn2.running_mean")));
    let shift = |bias: Option<&str>| {
        let mut m = build();
        tch::no_grad(|| buffer(&m, "bn2.running_mean").copy_(&buffer(&model, "bn2.running_mean")));
        let mut yaml = "    bits_activations: null\n    bits_parameters: 3\n    per_channel_wts: true\n".to_string();
        if let Some(b) = bias {
            yaml += &format!("    bias_correction: {b}\n");
        }
        let schedule = Schedule::from_yaml_str(&format!("quantizers:\n  p:\n    class: PostTrainLinearQuantizer\n{yaml}"), "q.yaml").unwrap();
        let distill::config::QuantizerConfig::PostTrainLinearQuantizer(p) = &schedule.quantizers[0].1 else { unreachable!() };
        let report = PostTrainLinearQuantizer::new(PostTrainConfig::from_params(p, root()).unwrap()).quantize(&mut m, None).unwrap();
        let d = (m.forward_t(&images, false).unwrap() - float.forward_t(&images, false).unwrap()).to_kind(Kind::Double);
        (d.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Double).abs().max().double_value(&[]), report.bias_corrections.len())
    };
    let ((before, none), (after, corrected)) = (shift(None), shift(Some("analytical")));
    println!("mean output shift {before:.3e} without, {after:.3e} with analytical bias correction");
    assert_eq!((none, corrected), (0, 2));
    assert!(after < 0.25 * before, "{before} → {after}");
}

#[test]
fn adaround_rounds_each_weight_down_or_up_and_fits_each_layer_better_than_nearest() {
    use distill::quantization::adaround::AdaRound;
    let data = distill::data::mnist_bundled().unwrap();
    tch::manual_seed(3);
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    fit(&mut model, &data, None, &quiet(2)).unwrap();
    let float = distill::models::copy_model(&model).unwrap();
    let stats = collect_activation_stats(&mut model, &data.valid, 2, 128).unwrap();
    let config = PostTrainConfig { bits_parameters: Some(4), per_channel_wts: true, save_fp_weights: true, stats: Some(stats), ..PostTrainConfig::default() };
    PostTrainLinearQuantizer::new(config).prepare_model(&mut model).unwrap();
    let nearest = validate(&mut model, &data.test, 500).unwrap().top1;
    let adaround = AdaRound { samples: 128, iterations: 300, ..AdaRound::default() };
    let layers = adaround.apply(&mut model, &float, &data.valid).unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l.layer.as_str()).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1", "fc2", "fc3"], "every quantized layer, in forward order");
    for l in &layers {
        let layer = (model.module(&l.layer).unwrap() as &dyn std::any::Any).downcast_ref::<RangeLinearQuantParamLayer>().unwrap();
        let p = layer.weight_params();
        let scaled = p.scaled(layer.float_weight().unwrap(), 0).unwrap();
        let q = layer.integer_weight().unwrap().to_kind(Kind::Double);
        // Down or up from the scaled float weight, never further (the range's clamp aside).
        let floor = scaled.floor().clamp(p.range.0, p.range.1);
        let ceil = (scaled.floor() + 1.0).clamp(p.range.0, p.range.1);
        let either = q.eq_tensor(&floor).logical_or(&q.eq_tensor(&ceil));
        assert!(bool::try_from(either.all()).unwrap(), "{}: a weight rounded neither down nor up", l.layer);
        let flips = q.ne_tensor(&p.quantize(layer.float_weight().unwrap(), 0).unwrap()).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(flips, l.flipped, "{}", l.layer);
        println!("{}: {} of {} weights flipped; output MSE {:.4e} nearest, {:.4e} AdaRound", l.layer, l.flipped, l.weights, l.mse_nearest, l.mse_adaround);
        assert!(l.mse_adaround < l.mse_nearest, "{}: AdaRound's reconstruction {} is not below nearest rounding's {}", l.layer, l.mse_adaround, l.mse_nearest);
    }
    let ada = validate(&mut model, &data.test, 500).unwrap().top1;
    println!("W4A8 per channel, 2-epoch LeNet: top-1 {nearest:.1}% nearest, {ada:.1}% AdaRound");

    // Bad input: too few samples, more samples than the data holds, bad settings, a float model that is not the
    // one quantized, a model without float weights, a float model.
    let few = AdaRound { samples: 8, ..AdaRound::default() }.apply(&mut model, &float, &data.valid).unwrap_err().to_string();
    assert!(few.contains("fewer than one step's batch"), "{few}");
    let many = AdaRound { samples: 100_000, ..AdaRound::default() }.apply(&mut model, &float, &data.valid).unwrap_err().to_string();
    assert!(many.contains("the data set holds"), "{many}");
    let beta = AdaRound { beta: (2.0, 20.0), ..AdaRound::default() }.apply(&mut model, &float, &data.valid).unwrap_err().to_string();
    assert!(beta.contains("β anneals"), "{beta}");
    let before: Vec<(String, Tensor)> = model.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let other = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mismatch = adaround.apply(&mut model, &other, &data.valid).unwrap_err().to_string();
    assert!(mismatch.contains("differ from those the layer was quantized from"), "{mismatch}");
    for (name, t) in model.state_dict() {
        assert!(t.equal(&before.iter().find(|(n, _)| *n == name).unwrap().1), "{name} changed by a failed AdaRound");
    }
    let mut no_fp = distill::models::copy_model(&float).unwrap();
    PostTrainLinearQuantizer::new(PostTrainConfig::default()).prepare_model(&mut no_fp).unwrap();
    assert!(adaround.apply(&mut no_fp, &float, &data.valid).unwrap_err().to_string().contains("save_fp_weights: true"));
    let mut plain = distill::models::copy_model(&float).unwrap();
    assert!(adaround.apply(&mut plain, &float, &data.valid).unwrap_err().to_string().contains("quantize it first"));
}

/// MSE activation ranges (`clip_acts: MSE`) against min/max at 4-bit activations on a trained LeNet, from
/// statistics written to YAML and read back (the histograms travel with them).
#[test]
fn mse_activation_ranges_hold_4_bit_activations_better_than_min_max() {
    let data = distill::data::mnist_bundled().unwrap();
    let mut trained = pruned_lenet(&data);
    let fp32 = validate(&mut trained, &data.test, 256).unwrap().top1;
    let stats = collect_activation_stats(&mut trained, &data.valid, 4, 128).unwrap();
    let dir = distill::io::TempDir::new().unwrap();
    stats.to_yaml_file(dir.path().join("stats.yaml")).unwrap();
    let stats = ActivationStats::from_yaml_file(dir.path().join("stats.yaml")).unwrap();
    let fc1 = &stats.get("fc1").unwrap().output;
    let h = fc1.histogram.as_ref().expect("a histogram per tensor");
    assert_eq!(h.zeros + h.counts.iter().sum::<u64>(), fc1.total_numel.unwrap());
    assert_eq!((h.lo, h.hi), (fc1.range.min, fc1.range.max));
    let top1 = |clip: ClipMode| {
        let mut model = distill::models::copy_model(&trained).unwrap();
        let config = PostTrainConfig { bits_activations: Some(4), bits_parameters: Some(8), clip_acts: clip, stats: Some(stats.clone()), ..PostTrainConfig::default() };
        PostTrainLinearQuantizer::new(config).prepare_model(&mut model).unwrap();
        validate(&mut model, &data.test, 256).unwrap().top1
    };
    let (none, avg, mse) = (top1(ClipMode::None), top1(ClipMode::Avg), top1(ClipMode::Mse));
    eprintln!("fp32 {fp32:.2}  A4 min/max {none:.2}  AVG {avg:.2}  MSE {mse:.2}");
    assert!(mse > none, "{mse} vs {none}");
    // Statistics without histograms (Distiller's files) cannot give MSE ranges, and say so.
    let mut bare = stats.clone();
    for (_, m) in &mut bare.modules {
        m.output.histogram = None;
        m.inputs.values_mut().for_each(|t| t.histogram = None);
    }
    let mut model = distill::models::copy_model(&trained).unwrap();
    let config = PostTrainConfig { bits_activations: Some(4), clip_acts: ClipMode::Mse, stats: Some(bare), ..PostTrainConfig::default() };
    let err = PostTrainLinearQuantizer::new(config).prepare_model(&mut model).and_then(|_| validate(&mut model, &data.test, 256).map(|_| ())).unwrap_err().to_string();
    assert!(err.contains("MSE clipping needs the activations' histograms"), "{err}");
}

/// Mixed precision on the AGP-pruned LeNet at the size of uniform 4-bit weights, from {2, 3, 4, 5, 6, 8} bits: the
/// chosen widths fit, their measured output error is at most uniform 4-bit's, the YAML written with them loads and gives the same model,
/// and impossible requests are errors.
#[test]
fn mixed_precision_at_the_size_of_4_bits_is_no_worse_than_uniform_4_bits() {
    use distill::quantization::mixed_precision::{Budget, Measure, MixedPrecision, Resource};
    use distill::quantization::post_train::Calibration;
    let data = distill::data::mnist_bundled().unwrap();
    let trained = pruned_lenet(&data);
    let dir = distill::io::TempDir::new().unwrap();
    let base = dir.path().join("base.yaml");
    std::fs::write(&base, "quantizers:\n  q:\n    class: PostTrainLinearQuantizer\n    per_channel_wts: true\n    mode: ASYMMETRIC_UNSIGNED\n").unwrap();
    let config = PostTrainConfig::from_schedule_file(&base).unwrap();
    let calibration = Calibration::new(&data.valid, 2, 128);
    let choice = MixedPrecision { candidates: vec![2, 3, 4, 5, 6, 8], budget: Budget::AverageBits(4.0), measure: Measure::OutputMse }.search(&trained, &config, &calibration).unwrap();
    assert_eq!((choice.resource, choice.limit), (Resource::WeightBytes, 61_470.0 * 4.0 / 8.0));
    assert!(choice.weight_bytes <= choice.limit, "{} > {}", choice.weight_bytes, choice.limit);
    assert_eq!(choice.bits.len(), 5);
    assert_eq!(choice.sensitivities.len(), 5 * choice.sensitivities.iter().filter(|s| s.layer == "conv1").count());
    let frame = choice.frame().unwrap();
    assert_eq!((frame.height(), frame.column("chosen").unwrap().bool().unwrap().sum()), (choice.sensitivities.len(), Some(5)));
    // Uniform 4-bit weights, measured the same way: output MSE against the float model on the calibration batches.
    let mut float = distill::models::copy_model(&trained).unwrap();
    let stats = collect_activation_stats(&mut float, &data.valid, 2, 128).unwrap();
    let uniform = |bits: u32| {
        let mut q = distill::models::copy_model(&trained).unwrap();
        PostTrainLinearQuantizer::new(PostTrainConfig { bits_parameters: Some(bits), stats: Some(stats.clone()), ..config.clone() }).prepare_model(&mut q).unwrap();
        let batches: Vec<Tensor> = data.valid.batches(128, Device::Cpu).unwrap().take(2).map(|b| b.unwrap().0).collect();
        let mse: f64 = batches.iter().map(|x| (q.forward_t(x, false).unwrap() - float.forward_t(x, false).unwrap()).square().mean(Kind::Double).double_value(&[])).sum();
        (mse / 2.0, validate(&mut q, &data.test, 256).unwrap().top1)
    };
    let (mse4, top1_4) = uniform(4);
    let mut mixed = distill::models::copy_model(&trained).unwrap();
    PostTrainLinearQuantizer::new(PostTrainConfig { stats: Some(stats.clone()), ..choice.apply(&config).unwrap() }).prepare_model(&mut mixed).unwrap();
    let top1_mixed = validate(&mut mixed, &data.test, 256).unwrap().top1;
    println!(
        "mixed {:?}: {:.0} of {:.0} bytes, output MSE measured {:.3e} (predicted {:.3e}), top-1 {top1_mixed:.2}%; uniform 4 bits: MSE {mse4:.3e}, top-1 {top1_4:.2}%",
        choice.bits, choice.weight_bytes, choice.limit, choice.measured.output_mse, choice.predicted
    );
    // Measured: 6.0e-2 against 1.25e-1 (conv1 8, conv2 6, fc1 4, fc2 3, fc3 8 bits).
    assert!(choice.measured.output_mse <= mse4, "{} vs {mse4}", choice.measured.output_mse);
    assert!(choice.bits.iter().any(|(_, b)| *b != 4), "{:?}", choice.bits);
    // The schedule written with the choice loads and quantizes to the same widths.
    let written = dir.path().join("mixed.yaml");
    choice.write_schedule(&base, &written).unwrap();
    let reloaded = PostTrainConfig::from_schedule_file(&written).unwrap();
    let mut m = distill::models::copy_model(&trained).unwrap();
    PostTrainLinearQuantizer::new(PostTrainConfig { stats: Some(stats.clone()), ..reloaded }).prepare_model(&mut m).unwrap();
    let x = data.test.batches(64, Device::Cpu).unwrap().next().unwrap().unwrap().0;
    assert!(m.forward_t(&x, false).unwrap().equal(&mixed.forward_t(&x, false).unwrap()), "the written schedule quantizes differently");
    for (layer, bits) in &choice.bits {
        let l = (m.module(layer).unwrap() as &dyn std::any::Any).downcast_ref::<RangeLinearQuantParamLayer>().unwrap();
        let w = l.integer_weight().unwrap();
        let span = (w.max() - w.min()).double_value(&[]);
        assert!(span <= (1u64 << bits) as f64 - 1.0, "{layer}: integer span {span} at {bits} bits");
    }
    // Impossible requests.
    let search = |candidates: Vec<u32>, budget| MixedPrecision { candidates, budget, measure: Measure::OutputMse }.search(&trained, &config, &calibration).map(|_| ()).unwrap_err().to_string();
    assert!(search(vec![2, 4, 8], Budget::AverageBits(1.5)).contains("no assignment fits"));
    assert!(search(vec![2, 4, 8], Budget::BopsOfUniform(1.5)).contains("no assignment fits"));
    assert!(search(vec![2, 4, 8], Budget::Bops(f64::NAN)).contains("no assignment fits"));
    assert!(search(vec![1, 4], Budget::AverageBits(4.0)).contains("outside 2–16"));
    assert!(search(vec![4, 32], Budget::AverageBits(4.0)).contains("outside 2–16"));
    assert!(search(vec![], Budget::AverageBits(4.0)).contains("at least one"));
    let float_weights = PostTrainConfig { bits_parameters: None, ..config.clone() };
    assert!(MixedPrecision::default().search(&trained, &float_weights, &calibration).unwrap_err().to_string().contains("bits_parameters"));
}

/// Mixed precision under a BOPs budget, by top-1: each layer's MACs and activation bits are LeNet's (computed here
/// by hand), the choice is the cheapest assignment within the budget among all 3^5 (brute force over the reported
/// sensitivities), the sensitivities are whole samples of the calibration batches, and the measured top-1 is the
/// chosen model's on those batches.
#[test]
fn mixed_precision_under_a_bops_budget_by_top1_is_the_cheapest_assignment_that_fits() {
    use distill::quantization::mixed_precision::{Budget, Measure, MixedPrecision, Resource};
    use distill::quantization::post_train::Calibration;
    let data = distill::data::mnist_bundled().unwrap();
    let trained = pruned_lenet(&data);
    let config = PostTrainConfig { per_channel_wts: true, ..PostTrainConfig::default() };
    let calibration = Calibration::new(&data.valid, 2, 128);
    let candidates = vec![2u32, 4, 8];
    let choice = MixedPrecision { candidates: candidates.clone(), budget: Budget::BopsOfUniform(4.0), measure: Measure::Top1 }.search(&trained, &config, &calibration).unwrap();
    // conv1 5x5 (padding 2) on 28x28 to 6 maps; conv2 5x5 on 14x14 (6 channels) to 16 maps of 10x10; fc1..fc3.
    let macs = [6 * 28 * 28 * 25, 16 * 10 * 10 * 6 * 25, 400 * 120, 120 * 84, 84 * 10];
    let names = ["conv1", "conv2", "fc1", "fc2", "fc3"];
    assert_eq!(choice.resource, Resource::Bops);
    assert_eq!(choice.limit, 4.0 * 8.0 * macs.iter().sum::<i64>() as f64);
    for s in &choice.sensitivities {
        let l = names.iter().position(|n| *n == s.layer).unwrap();
        assert_eq!((s.macs, s.activation_bits), (macs[l], 8), "{}", s.layer);
        let samples = s.sensitivity * 256.0 / 100.0;
        assert!((samples - samples.round()).abs() < 1e-9, "{}: {} points is not a whole number of the 256 samples", s.layer, s.sensitivity);
    }
    // Cost: the top-1 drop, then (between equal drops) the output error's growth; negative ones count as 0.
    let cost = |l: usize, b: u32| {
        let s = choice.sensitivities.iter().find(|s| s.layer == names[l] && s.bits == b).unwrap();
        (s.sensitivity.max(0.0), s.output_mse_growth.max(0.0))
    };
    let total = |pick: &[u32]| pick.iter().enumerate().fold((0.0, 0.0), |(a, m), (l, &b)| (a + cost(l, b).0, m + cost(l, b).1));
    let (mut best, mut best_cost) = (f64::INFINITY, (f64::INFINITY, f64::INFINITY));
    for code in 0..3usize.pow(5) {
        let pick: Vec<u32> = (0..5).map(|l| candidates[code / 3usize.pow(l as u32) % 3]).collect();
        let bops: f64 = pick.iter().zip(&macs).map(|(&b, &m)| (m * 8 * b as i64) as f64).sum();
        let c = total(&pick);
        if bops <= choice.limit && (c.0 < best_cost.0 - 1e-9 || (c.0 < best_cost.0 + 1e-9 && c.1 < best_cost.1)) {
            (best, best_cost) = (bops, c);
        }
    }
    let chosen: Vec<u32> = choice.bits.iter().map(|(_, b)| *b).collect();
    let chosen_cost = total(&chosen);
    let chosen_bops: f64 = chosen.iter().zip(&macs).map(|(&b, &m)| (m * 8 * b as i64) as f64).sum();
    assert!(best.is_finite(), "nothing fits");
    assert!((chosen_cost.0 - best_cost.0).abs() < 1e-9 && (chosen_cost.1 - best_cost.1).abs() <= 1e-9 * best_cost.1.max(1e-12), "{chosen:?} costs {chosen_cost:?}, the best {best_cost:?}");
    assert_eq!(choice.bops, chosen_bops);
    assert!(choice.bops <= choice.limit);
    // The prediction adds the raw drops (a negative one too; the search itself counts those as 0).
    let raw_drops: f64 = choice.bits.iter().map(|(l, b)| choice.sensitivities.iter().find(|s| s.layer == *l && s.bits == *b).unwrap().sensitivity).sum();
    assert!((choice.predicted - (choice.baseline.top1 - raw_drops)).abs() < 1e-9);
    // The measured top-1: the chosen model on the calibration batches.
    let mut float = distill::models::copy_model(&trained).unwrap();
    let stats = collect_activation_stats(&mut float, &data.valid, 2, 128).unwrap();
    let mut mixed = distill::models::copy_model(&trained).unwrap();
    PostTrainLinearQuantizer::new(PostTrainConfig { stats: Some(stats), ..choice.apply(&config).unwrap() }).prepare_model(&mut mixed).unwrap();
    let correct: i64 = data.valid.batches(128, Device::Cpu).unwrap().take(2).map(|b| {
        let (x, y) = b.unwrap();
        mixed.forward_t(&x, false).unwrap().argmax(1, false).eq_tensor(&y).sum(Kind::Int64).int64_value(&[])
    }).sum();
    assert_eq!(choice.measured.top1, 100.0 * correct as f64 / 256.0);
    println!("BOPs choice {:?}: {:.4e} of {:.4e} BOPs, top-1 on calibration {:.2}% (predicted {:.2}%, 8 bits {:.2}%)", choice.bits, choice.bops, choice.limit, choice.measured.top1, choice.predicted, choice.baseline.top1);
}
