//! Thinning on every zoo model: the thinned network computes what the masked one did, its parameter and MAC counts
//! match the ones computed from the surviving channel counts, training continues with the optimizer's state
//! shrunk, residual couplings hold, `round_to` rounds, and what thinning cannot follow is an error that changes
//! nothing.
use std::collections::HashMap;

use distill::graph::{Axis, Channels, Graph};
use distill::models::create_model;
use distill::nn::{BatchNorm2d, Conv2d, Conv2dConfig, Linear, Model, ModelInfo, Sequential, TensorOp};
use distill::optim::{Optimizer, OptimizerConfig};
use distill::scheduler::Masks;
use distill::thinning::{ModuleCut, Structure, Thinner, ThinningRecipe};
use tch::{Device, Kind, Tensor};

const ZOO: &[(&str, &str)] = &[
    ("lenet", "mnist"),
    ("simplenet_mnist", "mnist"),
    ("mlp", "mnist"),
    ("simplenet_cifar", "cifar10"),
    ("resnet20_cifar", "cifar10"),
    ("resnet32_cifar", "cifar10"),
    ("resnet44_cifar", "cifar10"),
    ("resnet56_cifar", "cifar10"),
    ("plain20_cifar", "cifar10"),
    ("preact_resnet20_cifar", "cifar10"),
    ("vgg16_cifar", "cifar10"),
    ("vgg16_bn_cifar", "cifar10"),
];

/// A small deterministic generator, so the tests never depend on libtorch's shared random state.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// `k` distinct indices below `n`, with `k` between 30% and 60% of `n` (at least 1, at most n-1).
    fn subset(&mut self, n: i64) -> Vec<i64> {
        let lo = (n * 3 / 10).max(1);
        let hi = (n * 6 / 10).max(lo).min(n - 1);
        let k = lo + (self.next() % (hi - lo + 1) as u64) as i64;
        let mut all: Vec<i64> = (0..n).collect();
        for i in 0..all.len() {
            let j = i + (self.next() % (all.len() - i) as u64) as usize;
            all.swap(i, j);
        }
        let mut pick = all[..k as usize].to_vec();
        pick.sort();
        pick
    }
}

fn input(model: &Model, seed: u64) -> Tensor {
    let s = &model.info().input_shape;
    let mut rng = Lcg(seed);
    let n = 4 * s.iter().product::<i64>();
    let v: Vec<f32> = (0..n).map(|_| (rng.next() % 2000) as f32 / 1000.0 - 1.0).collect();
    Tensor::from_slice(&v).reshape([4, s[0], s[1], s[2]])
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// Gives every batch norm non-trivial affine parameters and running statistics, so a thinned batch norm that
/// kept the wrong channel would show.
fn perturb_batch_norms(model: &Model, rng: &mut Lcg) {
    model.for_each_module(|_, m| {
        if let Some(bn) = (m as &dyn std::any::Any).downcast_ref::<BatchNorm2d>() {
            tch::no_grad(|| {
                for t in [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
                    let v: Vec<f32> = (0..t.numel()).map(|_| 0.5 + (rng.next() % 1000) as f32 / 1000.0).collect();
                    t.shallow_clone().copy_(&Tensor::from_slice(&v));
                }
            });
        }
    });
}

fn shape(model: &Model, name: &str) -> Vec<i64> {
    model.state_dict().into_iter().find(|(n, _)| n == name).map(|(_, t)| t.size()).unwrap_or_else(|| panic!("no {name}"))
}

/// Zeroes a random 30-60% of the filters of every convolution (or the input channels, for `Channels`) whose
/// channels thinning may change, then zeroes each removable channel's batch-norm scale and shift so the masked
/// network carries exactly zero there. Returns the zeroed indices per layer.
fn prune(model: &Model, channels: &Channels, graph: &Graph, structure: Structure, rng: &mut Lcg) -> HashMap<String, Vec<i64>> {
    let mut pruned = HashMap::new();
    for node in graph.nodes() {
        let Ok(module) = model.module(&node.name) else { continue };
        let any = module as &dyn std::any::Any;
        let (weight, bias) = match (any.downcast_ref::<Conv2d>(), any.downcast_ref::<Linear>()) {
            (Some(c), _) => (&c.weight, c.bias.as_ref()),
            (_, Some(l)) => (&l.weight, l.bias.as_ref()),
            _ => continue,
        };
        let axis = if structure == Structure::Filters { Axis::Filters } else { Axis::Channels };
        let group = channels.group_of(&node.name, axis).unwrap();
        // Fixed groups (the input, the classifier's outputs) and the columns a flatten ties in blocks stay.
        let blocked = group.members.iter().any(|m| m.block > 1);
        if !group.fixed.is_empty() || (blocked && structure == Structure::Channels) {
            continue;
        }
        let dim = if structure == Structure::Filters { 0 } else { 1 };
        let picks = rng.subset(weight.size()[dim]);
        tch::no_grad(|| {
            for &c in &picks {
                let _ = weight.narrow(dim as i64, c, 1).fill_(0.0);
                if let (Structure::Filters, Some(b)) = (structure, bias) {
                    let _ = b.narrow(0, c, 1).fill_(0.0);
                }
            }
        });
        pruned.insert(node.name.clone(), picks);
    }
    // A class goes when every writer (filters) or reader (channels) is zero; make its batch norms output zero too.
    for class in channels.classes() {
        if class.is_fixed() || !removable(class, graph, &pruned, structure) {
            continue;
        }
        for &(n, c) in &class.features {
            let name = &graph.nodes()[n].name;
            tch::no_grad(|| {
                for leaf in ["weight", "bias"] {
                    let _ = model.parameter(&format!("{name}.{leaf}")).unwrap().narrow(0, c, 1).fill_(0.0);
                }
            });
        }
    }
    pruned
}

fn removable(class: &distill::graph::ChannelClass, graph: &Graph, pruned: &HashMap<String, Vec<i64>>, structure: Structure) -> bool {
    let zeroed = |n: usize, cols: &[i64]| pruned.get(&graph.nodes()[n].name).is_some_and(|p| cols.iter().all(|c| p.contains(c)));
    match structure {
        Structure::Filters => !class.producers.is_empty() && class.producers.iter().all(|&(n, c)| zeroed(n, &[c])),
        Structure::Channels => !class.consumers.is_empty() && class.consumers.iter().all(|(n, cols)| zeroed(*n, cols)),
    }
}

/// Parameters and MACs of the thinned network, computed from the channels of each layer's input and output
/// that survive.
fn expected_counts(model: &Model, graph: &Graph, channels: &Channels, pruned: &HashMap<String, Vec<i64>>, structure: Structure) -> (i64, i64) {
    let survivors = |t: usize| -> i64 {
        (0..graph.tensors()[t].channels())
            .filter(|&c| {
                let class = &channels.classes()[channels.class_of(t, c)];
                class.is_fixed() || !removable(class, graph, pruned, structure)
            })
            .count() as i64
    };
    let (mut params, mut macs) = (0i64, 0i64);
    for node in graph.nodes() {
        let Ok(module) = model.module(&node.name) else { continue };
        let any = module as &dyn std::any::Any;
        let out_shape = &graph.tensors()[node.output].shape;
        let (out, inp) = (survivors(node.output), node.inputs.first().map_or(0, |&t| survivors(t)));
        if let Some(conv) = any.downcast_ref::<Conv2d>() {
            let c = &conv.config;
            let k = c.kernel_size[0] * c.kernel_size[1];
            params += out * inp * k + if c.bias { out } else { 0 };
            macs += out * inp * k * out_shape[2] * out_shape[3];
        } else if let Some(l) = any.downcast_ref::<Linear>() {
            params += out * inp + if l.bias.is_some() { out } else { 0 };
            macs += out * inp;
        } else if module.type_name() == "BatchNorm2d" {
            params += 2 * out;
        }
    }
    (params, macs)
}

fn total_macs(model: &mut Model) -> i64 {
    let df = distill::summary::tables::model_performance_summary(model, 1).unwrap();
    distill::summary::tables::column(&df, "MACs").unwrap().i64().unwrap().iter().flatten().sum()
}

/// One SGD-momentum or Adam step before thinning (so the optimizer has state), thinning with the optimizer and
/// masks, and one step after: every state tensor has its parameter's new shape.
fn step(model: &mut Model, opt: &mut Optimizer, x: &Tensor) {
    opt.zero_grad();
    let y = model.forward_t(x, true).unwrap();
    y.square().mean(Kind::Float).backward();
    opt.step().unwrap();
}

/// Every zoo model, with SGD momentum and with Adam: prune, take an optimizer step at learning rate 0 (state
/// without moving a weight), thin with the optimizer, compare with the masked network, check the counts and the
/// optimizer state's shapes, then train one real step.
fn check_zoo(structure: Structure) {
    let mut rng = Lcg(if structure == Structure::Filters { 7 } else { 11 });
    for &(arch, dataset) in ZOO {
        for (config, label) in [(OptimizerConfig::sgd(0.9, 1e-4), "SGD"), (OptimizerConfig::adam(1e-4), "Adam")] {
            let mut model = create_model(arch, dataset, Device::Cpu).unwrap();
            perturb_batch_norms(&model, &mut rng);
            let graph = Graph::trace(&mut model).unwrap();
            let channels = graph.channels();
            let pruned = prune(&model, &channels, &graph, structure, &mut rng);
            let (want_params, want_macs) = expected_counts(&model, &graph, &channels, &pruned, structure);
            let x = input(&model, 3);
            let mut opt = Optimizer::for_model(&model, config, 0.0).unwrap();
            step(&mut model, &mut opt, &x);
            let masked = model.forward_t(&x, false).unwrap();
            let before_params = model.num_parameters();
            let thinner = if structure == Structure::Filters { Thinner::filters() } else { Thinner::channels() };
            let report = thinner.apply_with(&mut model, Some(&mut opt), None).unwrap();
            let thinned = model.forward_t(&x, false).unwrap();
            let diff = max_abs(&(&thinned - &masked)) / max_abs(&masked).max(1e-12);
            let what = format!("{arch} {structure:?} {label}");
            assert!(diff <= 1e-5, "{what}: thinned output differs by {diff:e} of its scale");
            assert_eq!(model.num_parameters(), want_params, "{what}: parameters");
            assert_eq!(total_macs(&mut model), want_macs, "{what}: MACs");
            assert!(model.num_parameters() < before_params, "{what}: nothing was removed");
            assert!(!report.changes.is_empty());
            assert_eq!(model.thinning_recipes().len(), 1);
            let params: HashMap<String, Vec<i64>> = model.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect();
            let state = opt.state_tensors();
            assert!(state.len() >= params.len(), "{what}: optimizer state for every parameter");
            for (key, t) in state {
                let (param, field) = key.rsplit_once('/').unwrap();
                if field != "step" {
                    assert_eq!(t.size(), params[param], "{what}: {key}");
                }
            }
            opt.set_lr(0.01);
            step(&mut model, &mut opt, &x);
            assert!(model.forward_t(&x, false).unwrap().isfinite().all().int64_value(&[]) == 1, "{what}: a step after thinning");
            if label == "SGD" {
                eprintln!("{arch} {structure:?}: {before_params} -> {} parameters, {} coupled zero channels kept", model.num_parameters(), report.coupled_keeps.len());
            }
        }
    }
}

#[test]
fn thinned_filters_compute_what_the_masked_zoo_computed() {
    check_zoo(Structure::Filters);
}

#[test]
fn thinned_channels_compute_what_the_masked_zoo_computed() {
    check_zoo(Structure::Channels);
}

#[test]
fn optimizer_state_and_masks_shrink_with_the_parameters() {
    for (config, label) in [(OptimizerConfig::sgd(0.9, 1e-4), "SGD"), (OptimizerConfig::adam(0.0), "Adam")] {
        for arch in ["resnet20_cifar", "vgg16_bn_cifar", "simplenet_cifar"] {
            let mut model = create_model(arch, "cifar10", Device::Cpu).unwrap();
            let mut rng = Lcg(5);
            let graph = Graph::trace(&mut model).unwrap();
            let channels = graph.channels();
            let pruned = prune(&model, &channels, &graph, Structure::Filters, &mut rng);
            let mut masks = Masks::new(model.named_parameters().into_iter().map(|(n, _)| n));
            for name in pruned.keys() {
                let w = model.parameter(&format!("{name}.weight")).unwrap();
                masks.set_mask(&format!("{name}.weight"), w.ne(0.0).to_kind(Kind::Float), &w.size()).unwrap();
            }
            let mut opt = Optimizer::for_model(&model, config, 0.01).unwrap();
            let x = input(&model, 9);
            step(&mut model, &mut opt, &x);
            // As the scheduler does after every optimizer step: the pruned filters stay zero.
            tch::no_grad(|| {
                for (name, mask) in masks.tensors() {
                    let _ = model.parameter(&name).unwrap().f_mul_(&mask).unwrap();
                }
            });
            let before = model.num_parameters();
            Thinner::filters().apply_with(&mut model, Some(&mut opt), Some(&mut masks)).unwrap();
            assert!(model.num_parameters() < before, "{arch} {label}: nothing removed");
            let params: HashMap<String, Vec<i64>> = model.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect();
            for (key, t) in opt.state_tensors() {
                let (param, field) = key.rsplit_once('/').unwrap();
                if field != "step" {
                    assert_eq!(t.size(), params[param], "{arch} {label}: {key}");
                }
            }
            for (name, m) in masks.tensors() {
                assert_eq!(m.size(), params[&name], "{arch} {label}: mask of {name}");
                // The mask still marks the zero filters that stayed (coupled ones), and only those. Compared filter
                // by filter: a kept weight can land exactly on 0.0 in the step (Adam's first step moves every
                // weight by about ±lr, and one of vgg16's 2.4M weights per layer is that close to 0.01 in some
                // draws), so element by element the mask and the zeros need not agree.
                let w = model.parameter(&name).unwrap();
                let zero_filters = |t: &Tensor| t.abs().flatten(1, -1).sum_dim_intlist(1, false, Kind::Float).eq(0.0);
                assert!(zero_filters(&m).equal(&zero_filters(&w)), "{arch} {label}: mask of {name}");
            }
            for (name, p) in model.named_parameters() {
                let g = p.grad();
                assert!(!g.defined() || g.size() == p.size(), "{arch} {label}: gradient of {name}");
            }
            step(&mut model, &mut opt, &x);
            let y = model.forward_t(&x, false).unwrap();
            assert!(y.isfinite().all().int64_value(&[]) == 1, "{arch} {label}: non-finite output after a step");
        }
    }
}

#[test]
fn a_residual_channel_zero_in_one_branch_only_stays() {
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let x = input(&model, 1);
    let before = model.forward_t(&x, false).unwrap();
    let params = model.num_parameters();
    tch::no_grad(|| { let _ = model.parameter("bn1.bias").unwrap().fill_(0.25); });
    // Channel 3 of the first stage's residual stream is written by conv1 and every layer1 block's conv2.
    let w = model.parameter("layer1.1.conv2.weight").unwrap();
    tch::no_grad(|| { let _ = w.narrow(0, 3, 1).fill_(0.0); });
    let zeroed = model.forward_t(&x, false).unwrap();
    let report = Thinner::filters().apply(&mut model).unwrap();
    assert!(report.recipe.is_empty(), "{:?}", report.recipe);
    assert_eq!(model.num_parameters(), params);
    assert_eq!(report.coupled_keeps.len(), 1);
    let keep = &report.coupled_keeps[0];
    assert_eq!((keep.channel, keep.zero_in.as_slice()), (3, ["layer1.1.conv2".to_string()].as_slice()));
    assert_eq!(keep.nonzero_in, ["conv1", "layer1.0.conv2", "layer1.2.conv2"]);
    assert!(max_abs(&(&model.forward_t(&x, false).unwrap() - &zeroed)) == 0.0);
    assert!(max_abs(&(&zeroed - &before)) > 0.0);

    // Zero in every writer: the channel leaves the whole stream (stem, three blocks, the next stage's readers).
    for name in ["conv1", "layer1.0.conv2", "layer1.2.conv2"] {
        let w = model.parameter(&format!("{name}.weight")).unwrap();
        tch::no_grad(|| { let _ = w.narrow(0, 3, 1).fill_(0.0); });
    }
    let report = Thinner::filters().apply(&mut model).unwrap();
    assert_eq!(report.changes.len(), 1);
    assert_eq!((report.changes[0].before, report.changes[0].after, report.changes[0].removed.as_slice()), (16, 15, [3i64].as_slice()));
    for (name, want) in [
        ("conv1.weight", vec![15, 3, 3, 3]),
        ("bn1.running_var", vec![15]),
        ("layer1.0.conv1.weight", vec![16, 15, 3, 3]),
        ("layer1.2.conv2.weight", vec![15, 16, 3, 3]),
        ("layer1.2.bn2.bias", vec![15]),
        ("layer2.0.conv1.weight", vec![32, 15, 3, 3]),
        ("layer2.0.downsample.0.weight", vec![32, 15, 1, 1]),
    ] {
        assert_eq!(shape(&model, name), want, "{name}");
    }
    // The stem's batch norm shift is still there in the masked model, and reported as dropped.
    assert!(report.dropped_shifts.iter().any(|d| d.module == "bn1" && d.channel == 3), "{:?}", report.dropped_shifts);
}

#[test]
fn leader_coupling_lets_the_first_writer_decide() {
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let w = model.parameter("conv1.weight").unwrap();
    tch::no_grad(|| { let _ = w.narrow(0, 5, 2).fill_(0.0); });
    let report = Thinner::filters().leader().apply(&mut model).unwrap();
    assert_eq!(report.changes[0].removed, [5, 6]);
    assert_eq!(model.parameter("layer1.1.conv2.weight").unwrap().size(), [14, 16, 3, 3]);
    let y = model.forward_t(&input(&model, 2), false).unwrap();
    assert_eq!(y.size(), [4, 10]);
}

#[test]
fn round_to_keeps_counts_multiples_of_eight() {
    let mut model = create_model("vgg16_cifar", "cifar10", Device::Cpu).unwrap();
    let graph = Graph::trace(&mut model).unwrap();
    let channels = graph.channels();
    let mut rng = Lcg(21);
    prune(&model, &channels, &graph, Structure::Filters, &mut rng);
    let x = input(&model, 4);
    let report = Thinner::filters().round_to(8).apply(&mut model).unwrap();
    assert!(report.rounded_keeps > 0);
    for change in &report.changes {
        assert!(change.after % 8 == 0 || change.after == change.before, "{change:?}");
    }
    for (name, t) in model.named_parameters() {
        if name.ends_with("weight") && t.dim() == 4 && name != "features.0.weight" {
            assert_eq!(t.size()[0] % 8, 0, "{name} {:?}", t.size());
        }
    }
    // The channels kept back are zero filters: the output is the masked network's.
    assert!(model.forward_t(&x, false).is_ok());
}

fn conv(vs: &tch::nn::VarStore, name: &str, i: i64, o: i64) -> Conv2d {
    Conv2d::new(vs.root() / name, Conv2dConfig::new(i, o, 3).padding(1)).unwrap()
}

#[test]
fn an_opaque_function_on_the_way_is_an_error_and_nothing_changes() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = Sequential::new()
        .add("conv1", conv(&vs, "conv1", 1, 8))
        .add_fn("times_two", |x| Ok(x * 2.0))
        .add("conv2", conv(&vs, "conv2", 8, 4))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(vs.root() / "fc", 4 * 8 * 8, 10, true).unwrap());
    let mut model = Model::new(vs, net, ModelInfo::new("custom", "toy", [1, 8, 8], 10)).unwrap();
    let w = model.parameter("conv1.weight").unwrap();
    tch::no_grad(|| { let _ = w.narrow(0, 2, 1).fill_(0.0); });
    let err = Thinner::filters().apply(&mut model).unwrap_err().to_string();
    assert!(err.contains("'times_two'") && err.contains("conv1") && err.contains("Forward::op"), "{err}");
    assert_eq!(model.parameter("conv1.weight").unwrap().size(), [8, 1, 3, 3]);
    assert!(model.thinning_recipes().is_empty());
    // conv2's filters do not pass through the function: they thin, and the classifier loses 64 columns each.
    let w = model.parameter("conv2.weight").unwrap();
    tch::no_grad(|| {
        let _ = w.narrow(0, 1, 1).fill_(0.0);
        let _ = model.parameter("conv2.bias").unwrap().narrow(0, 1, 1).fill_(0.0);
        let _ = model.parameter("conv1.weight").unwrap().narrow(0, 2, 1).fill_(1.0);
    });
    let x = Tensor::ones([2, 1, 8, 8], (Kind::Float, Device::Cpu));
    let masked = model.forward_t(&x, false).unwrap();
    Thinner::filters().apply(&mut model).unwrap();
    assert_eq!(model.parameter("fc.weight").unwrap().size(), [10, 3 * 64]);
    assert!(max_abs(&(&model.forward_t(&x, false).unwrap() - &masked)) < 1e-5);
}

/// A block that adds its input to its output with a plain tensor `+`, invisible to the graph.
#[derive(Debug)]
struct HiddenAdd {
    conv: distill::nn::BoxModule,
}

impl distill::nn::Module for HiddenAdd {
    fn type_name(&self) -> &str {
        "HiddenAdd"
    }
    fn forward(&self, x: &Tensor, ctx: &mut distill::nn::Forward) -> distill::Result<Tensor> {
        Ok(ctx.call("conv", self.conv.as_ref(), x)? + x)
    }
    fn children(&self) -> Vec<(&str, &dyn distill::nn::Module)> {
        vec![("conv", self.conv.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut distill::nn::BoxModule)> {
        vec![("conv", &mut self.conv)]
    }
}

#[test]
fn a_tensor_operation_outside_the_forward_context_is_named() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let block = HiddenAdd { conv: Box::new(Conv2d::new(vs.root() / "block" / "conv", Conv2dConfig::new(4, 4, 3).padding(1)).unwrap()) };
    let net = Sequential::new()
        .add("conv1", conv(&vs, "conv1", 1, 4))
        .add("block", block)
        .add("conv2", conv(&vs, "conv2", 4, 2))
        .add_op(TensorOp::Flatten);
    let mut model = Model::new(vs, net, ModelInfo::new("custom", "toy", [1, 4, 4], 32)).unwrap();
    let graph = Graph::trace(&mut model).unwrap();
    let conv2 = graph.node("conv2").unwrap();
    assert_eq!(graph.producers(conv2), ["conv2/unrecorded"]);
    let w = model.parameter("block.conv.weight").unwrap();
    tch::no_grad(|| { let _ = w.narrow(0, 0, 1).fill_(0.0); });
    let w = model.parameter("conv1.weight").unwrap();
    tch::no_grad(|| { let _ = w.narrow(0, 0, 1).fill_(0.0); });
    for b in ["conv1.bias", "block.conv.bias"] {
        tch::no_grad(|| { let _ = model.parameter(b).unwrap().narrow(0, 0, 1).fill_(0.0); });
    }
    let before: Vec<Vec<i64>> = model.named_parameters().iter().map(|(_, t)| t.size()).collect();
    let err = Thinner::filters().apply(&mut model).unwrap_err().to_string();
    assert!(err.contains("the output of 'block'"), "{err}");
    let after: Vec<Vec<i64>> = model.named_parameters().iter().map(|(_, t)| t.size()).collect();
    assert_eq!(before, after);
}

#[test]
fn a_bad_recipe_changes_nothing() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let before: Vec<(String, Vec<i64>)> = model.state_dict().into_iter().map(|(n, t)| (n, t.size())).collect();
    let recipe = ThinningRecipe {
        cuts: vec![
            ModuleCut { module: "conv1".into(), inputs: None, outputs: Some(vec![0, 1, 2]) },
            ModuleCut { module: "conv2".into(), inputs: Some(vec![0, 1, 2]), outputs: Some(vec![0, 99]) },
        ],
    };
    let err = recipe.apply(&mut model, None, None).unwrap_err().to_string();
    assert!(err.contains("conv2") && err.contains("below 16"), "{err}");
    let unknown = ThinningRecipe { cuts: vec![ModuleCut { module: "conv3".into(), inputs: None, outputs: Some(vec![0]) }] };
    assert!(unknown.apply(&mut model, None, None).unwrap_err().to_string().contains("conv2"));
    let after: Vec<(String, Vec<i64>)> = model.state_dict().into_iter().map(|(n, t)| (n, t.size())).collect();
    assert_eq!(before, after);
    assert!(model.thinning_recipes().is_empty());
}

#[test]
fn removing_every_filter_of_a_layer_is_refused() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::no_grad(|| { let _ = model.parameter("conv2.weight").unwrap().fill_(0.0); });
    let err = Thinner::filters().apply(&mut model).unwrap_err().to_string();
    assert!(err.contains("every one of the 16 channels") && err.contains("conv2 filters"), "{err}");
    assert_eq!(model.parameter("conv2.weight").unwrap().size(), [16, 6, 5, 5]);
}

const THIN_AT_2: &str = "pruners:
  filters:
    class: L1RankedStructureParameterPruner
    group_type: Filters
    desired_sparsity: 0.5
    weights: [conv1.weight, conv2.weight]
extensions:
  thinner:
    class: FilterRemover
    thinning_func_str: remove_filters
    arch: lenet
    dataset: mnist
policies:
  - pruner:
      instance_name: filters
    starting_epoch: 0
    ending_epoch: 2
    frequency: 1
  - extension:
      instance_name: thinner
    epochs: [2]
";

fn thinning_run(schedule: &distill::config::Schedule, dir: &std::path::Path, out: &str, epochs: usize, resume: bool, initial: &[(String, Tensor)]) -> Model {
    use distill::data::{DataSplits, Dataset};
    use distill::train::{Progress, TrainConfig, Trainer};
    let data = DataSplits {
        train: Dataset::synthetic(96, [1, 28, 28], 10, 1).unwrap(),
        valid: Dataset::synthetic(16, [1, 28, 28], 10, 2).unwrap(),
        test: Dataset::synthetic(16, [1, 28, 28], 10, 3).unwrap(),
    };
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    model.load_state_dict(initial, true).unwrap();
    let mut s = schedule.build(&model).unwrap();
    let config = TrainConfig { epochs, batch_size: 16, lr: 0.05, progress: Progress::Quiet, out_dir: Some(dir.join(out)), ..TrainConfig::default() };
    let mut t = Trainer::new(&mut model, config).unwrap().with_scheduler(&mut s);
    if resume {
        t.resume(dir.join(out).join("checkpoint.safetensors")).unwrap();
    }
    t.run(&data).unwrap();
    model
}

#[test]
fn a_run_that_thins_resumes_bit_identically() {
    use distill::train::Checkpoint;
    let schedule = distill::config::Schedule::from_yaml_str(THIN_AT_2, "thin.yaml").unwrap();
    let dir = distill::io::TempDir::new().unwrap();
    let initial = create_model("lenet", "mnist", Device::Cpu).unwrap().state_dict();
    let full = thinning_run(&schedule, dir.path(), "full", 5, false, &initial);
    assert_eq!(full.parameter("conv1.weight").unwrap().size(), [3, 1, 5, 5]);
    assert_eq!(full.parameter("conv2.weight").unwrap().size(), [8, 3, 5, 5]);
    assert_eq!(full.parameter("fc1.weight").unwrap().size(), [120, 8 * 25]);
    thinning_run(&schedule, dir.path(), "part", 4, false, &initial);
    let resumed = thinning_run(&schedule, dir.path(), "part", 5, true, &initial);
    for ((n, a), (_, b)) in full.state_dict().iter().zip(resumed.state_dict().iter()) {
        assert!(a.equal(b), "{n} differs after resume");
    }
    // The checkpoint records the recipe; any fresh LeNet loads it.
    let path = dir.path().join("full/checkpoint.safetensors");
    let ckpt = Checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.meta.thinning.len(), 1);
    // One call rebuilds the thinned architecture from the checkpoint alone.
    let loaded = distill::models::load_checkpoint(&path, Device::Cpu).unwrap();
    for ((n, a), (_, b)) in full.state_dict().iter().zip(loaded.state_dict().iter()) {
        assert!(a.equal(b), "{n} differs in the loaded model");
    }
    let mut fresh = create_model("lenet", "mnist", Device::Cpu).unwrap();
    ckpt.restore_model(&mut fresh, &path).unwrap();
    let x = input(&fresh, 5);
    assert!(fresh.forward_t(&x, false).unwrap().equal(&full.forward_t(&x, false).unwrap()));
    // A model thinned another way is refused, naming the checkpoint.
    let mut other = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::no_grad(|| { let _ = other.parameter("conv2.weight").unwrap().narrow(0, 0, 1).fill_(0.0); });
    Thinner::filters().apply(&mut other).unwrap();
    let err = ckpt.restore_model(&mut other, &path).unwrap_err().to_string();
    assert!(err.contains("thinned") && err.contains("checkpoint.safetensors"), "{err}");
}

/// Thinning at epoch 1, then quantization-aware training from epoch 2: on resume the recipe is replayed before
/// the quantizer wraps the (thinned) layers, so the run ends as the uninterrupted one.
#[test]
fn thinning_then_quantization_aware_training_resumes_bit_identically() {
    let yaml = THIN_AT_2.replace("ending_epoch: 2", "ending_epoch: 1").replace("epochs: [2]", "epochs: [1]")
        + "  - quantizer:\n      instance_name: qat\n    starting_epoch: 2\n    ending_epoch: 4\n    frequency: 1\n"
        + "quantizers:\n  qat:\n    class: QuantAwareTrainRangeLinearQuantizer\n    bits_activations: 8\n    bits_weights: 8\n";
    let schedule = distill::config::Schedule::from_yaml_str(&yaml, "thin_qat.yaml").unwrap();
    let dir = distill::io::TempDir::new().unwrap();
    let initial = create_model("lenet", "mnist", Device::Cpu).unwrap().state_dict();
    let full = thinning_run(&schedule, dir.path(), "full", 4, false, &initial);
    thinning_run(&schedule, dir.path(), "part", 3, false, &initial);
    let resumed = thinning_run(&schedule, dir.path(), "part", 4, true, &initial);
    let (a, b) = (full.state_dict(), resumed.state_dict());
    assert_eq!(a.len(), b.len());
    let shape = |name: &str| a.iter().find(|(n, _)| n == name).map(|(_, t)| t.size());
    assert_eq!((shape("conv2.float_weight"), shape("fc1.float_weight")), (Some(vec![8, 3, 5, 5]), Some(vec![120, 200])));
    for ((n, x), (_, y)) in a.iter().zip(b.iter()) {
        assert!(x.equal(y), "{n} differs after resume");
    }
}

#[test]
fn bad_remover_entries_fail_with_located_messages() {
    let cases = [
        ("thinning_func_str: remove_filters", "thinning_func_str: remove_filter", "thin.yaml:10:24: FilterRemover: unknown variant `remove_filter`"),
        ("    dataset: mnist\n", "    dataset: mnist\n    round_to: 0\n", "thin.yaml:13:5: invalid round_to: must be at least 1, got 0"),
        ("    dataset: mnist\n", "    dataset: mnist\n    group_dependency: Follower\n", "thin.yaml:13:5: invalid group_dependency: 'Follower' is not a coupling; the one value is Leader"),
        ("    dataset: mnist\n", "    dataset: mnist\n    rounding: 8\n", "thin.yaml:13:5: FilterRemover: unknown field `rounding`"),
        ("instance_name: thinner", "instance_name: thiner", "thin.yaml:20:22: unknown extension 'thiner'; did you mean 'thinner'?"),
        ("class: FilterRemover", "class: FilterRemoval", "thin.yaml:9:12: unknown extension class 'FilterRemoval'; did you mean 'FilterRemover'?"),
    ];
    for (from, to, want) in cases {
        let text = THIN_AT_2.replace(from, to);
        let err = distill::config::Schedule::from_yaml_str(&text, "thin.yaml").unwrap_err().to_string();
        assert!(err.contains(want), "{to}: {err}");
    }
    let s = distill::config::Schedule::from_yaml_str(&THIN_AT_2.replace("    dataset: mnist\n", "    dataset: mnist\n    round_to: 8\n"), "thin.yaml").unwrap();
    assert_eq!(distill::config::Schedule::from_yaml_str(&s.to_yaml().unwrap(), "again.yaml").unwrap(), s);
}

#[test]
fn a_thinned_model_quantizes_and_a_quantized_one_is_not_thinned() {
    use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
    let mut model = create_model("simplenet_cifar", "cifar10", Device::Cpu).unwrap();
    tch::no_grad(|| {
        let _ = model.parameter("conv1.weight").unwrap().narrow(0, 1, 2).fill_(0.0);
        let _ = model.parameter("conv1.bias").unwrap().narrow(0, 1, 2).fill_(0.0);
    });
    let x = input(&model, 8);
    let masked = model.forward_t(&x, false).unwrap();
    Thinner::filters().apply(&mut model).unwrap();
    PostTrainLinearQuantizer::new(PostTrainConfig::default()).prepare_model(&mut model).unwrap();
    let quantized = model.forward_t(&x, false).unwrap();
    assert_eq!(quantized.size(), [4, 10]);
    assert!(max_abs(&(&quantized - &masked)) < 0.05 * max_abs(&masked), "8-bit dynamic PTQ of the thinned network stays close");
    // Thinning goes through the quantizer's wrappers no further than the graph can follow: an error, nothing cut.
    tch::no_grad(|| { let _ = model.parameter("conv2.wrapped_module.weight").unwrap().narrow(0, 0, 1).fill_(0.0); });
    let shapes: Vec<Vec<i64>> = model.state_dict().iter().map(|(_, t)| t.size()).collect();
    let err = Thinner::filters().apply(&mut model).unwrap_err().to_string();
    assert!(err.contains("'conv2.wrapped_module' has zero filters") && err.contains("thin the model before quantizing"), "{err}");
    assert_eq!(shapes, model.state_dict().iter().map(|(_, t)| t.size()).collect::<Vec<_>>());
}

/// An output computed before thinning and still held keeps its autograd graph (and the parameters' gradient
/// accumulators) alive; training after thinning must not trip over the old shapes.
#[test]
fn training_after_thinning_ignores_graphs_built_before() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let x = input(&model, 12);
    let mut opt = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 0.0), 0.01).unwrap();
    step(&mut model, &mut opt, &x);
    let held = model.forward_t(&x, true).unwrap();
    tch::no_grad(|| { let _ = model.parameter("fc2.weight").unwrap().narrow(0, 0, 40).fill_(0.0); });
    Thinner::filters().apply_with(&mut model, Some(&mut opt), None).unwrap();
    assert_eq!(model.parameter("fc3.weight").unwrap().size(), [10, 44]);
    step(&mut model, &mut opt, &x);
    assert!(held.requires_grad());
}

/// Two convolutions on the same input, concatenated along channels (an Inception-style block, Distiller #424).
#[derive(Debug)]
struct TwoBranches {
    a: distill::nn::BoxModule,
    b: distill::nn::BoxModule,
}

impl distill::nn::Module for TwoBranches {
    fn type_name(&self) -> &str {
        "TwoBranches"
    }
    fn forward(&self, x: &Tensor, ctx: &mut distill::nn::Forward) -> distill::Result<Tensor> {
        let a = ctx.call("a", self.a.as_ref(), x)?;
        let b = ctx.call("b", self.b.as_ref(), x)?;
        ctx.op(TensorOp::Cat(1), &[&a, &b])
    }
    fn children(&self) -> Vec<(&str, &dyn distill::nn::Module)> {
        vec![("a", self.a.as_ref()), ("b", self.b.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut distill::nn::BoxModule)> {
        vec![("a", &mut self.a), ("b", &mut self.b)]
    }
}

#[test]
fn depthwise_convolutions_and_concatenations_thin_through() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let branches = TwoBranches {
        a: Box::new(Conv2d::new(&root / "mix" / "a", Conv2dConfig::new(1, 6, 3).padding(1)).unwrap()),
        b: Box::new(Conv2d::new(&root / "mix" / "b", Conv2dConfig::new(1, 4, 3).padding(1)).unwrap()),
    };
    let net = Sequential::new()
        .add("mix", branches)
        .add("dw", Conv2d::new(&root / "dw", Conv2dConfig::new(10, 10, 3).padding(1).groups(10)).unwrap())
        .add("bn", BatchNorm2d::new(&root / "bn", 10).unwrap())
        .add("relu", distill::nn::ReLU)
        .add("pw", conv(&vs, "pw", 10, 5))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(&root / "fc", 5 * 6 * 6, 3, true).unwrap());
    let mut model = Model::new(vs, net, ModelInfo::new("custom", "toy", [1, 6, 6], 3)).unwrap();
    perturb_batch_norms(&model, &mut Lcg(3));
    // Filters 1 and 4 of branch a, 2 of branch b: channels 1, 4 and 6 + 2 = 8 of the concatenation.
    tch::no_grad(|| {
        for (name, c) in [("mix.a", 1), ("mix.a", 4), ("mix.b", 2)] {
            for leaf in ["weight", "bias"] {
                let _ = model.parameter(&format!("{name}.{leaf}")).unwrap().narrow(0, c, 1).fill_(0.0);
            }
        }
        // The depthwise filters and batch norm after them pass a zero channel through only if they add nothing.
        for c in [1i64, 4, 8] {
            for p in ["dw.bias", "bn.weight", "bn.bias"] {
                let _ = model.parameter(p).unwrap().narrow(0, c, 1).fill_(0.0);
            }
        }
    });
    let x = input(&model, 2);
    let masked = model.forward_t(&x, false).unwrap();
    let report = Thinner::filters().apply(&mut model).unwrap();
    // Each branch's channels are a group of their own, spanning the concatenation, the depthwise filters, the
    // batch norm and the last convolution's input channels.
    let removed: Vec<(Vec<String>, Vec<i64>)> = report.changes.iter().map(|c| (c.members.clone(), c.removed.clone())).collect();
    let members = |b: &str| vec![format!("mix.{b} filters"), "dw features".into(), "bn features".into(), "pw channels".into()];
    assert_eq!(removed, [(members("a"), vec![1, 4]), (members("b"), vec![2])]);
    assert_eq!(model.parameter("mix.a.weight").unwrap().size(), [4, 1, 3, 3]);
    assert_eq!(model.parameter("mix.b.weight").unwrap().size(), [3, 1, 3, 3]);
    assert_eq!(model.parameter("dw.weight").unwrap().size(), [7, 1, 3, 3]);
    assert_eq!(model.parameter("pw.weight").unwrap().size(), [5, 7, 3, 3]);
    assert!(model.to_string().contains("7, 7, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=7"), "{model}");
    assert!(max_abs(&(&model.forward_t(&x, false).unwrap() - &masked)) < 1e-5 * max_abs(&masked));
}

#[test]
fn a_model_that_is_one_layer_has_nothing_to_thin() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let fc = Linear::new(vs.root(), 16, 4, true).unwrap();
    let mut model = Model::new(vs, fc, ModelInfo::new("one_layer", "toy", [16], 4)).unwrap();
    tch::no_grad(|| { let _ = model.parameter("weight").unwrap().narrow(0, 1, 1).fill_(0.0); });
    let graph = Graph::trace(&mut model).unwrap();
    assert_eq!(graph.nodes()[0].module_name(), "");
    // Its rows are the model's output: they stay.
    let report = Thinner::filters().apply(&mut model).unwrap();
    assert!(report.recipe.is_empty());
}

#[test]
fn nan_weights_are_never_taken_for_zeros() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::no_grad(|| {
        let w = model.parameter("conv2.weight").unwrap();
        let _ = w.narrow(0, 0, 2).fill_(0.0);
        let _ = w.narrow(0, 0, 1).narrow(1, 0, 1).fill_(f64::NAN);
    });
    let report = Thinner::filters().apply(&mut model).unwrap();
    assert_eq!(report.changes[0].removed, [1], "filter 0 holds a NaN: not zero, kept");
    assert_eq!(model.parameter("conv2.weight").unwrap().size(), [15, 6, 5, 5]);
}

#[test]
fn schedule_preview_shows_the_thinning_epoch_and_the_structures_left() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schedules/lenet_filters_thin.yaml");
    let schedule = distill::config::Schedule::from_file(path).unwrap();
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let preview = schedule.preview(10, 0.02, Some(&model)).unwrap();
    let thinning: Vec<(usize, &Vec<(String, i64, i64)>)> = preview.epochs.iter().filter(|e| !e.thinning.is_empty()).map(|e| (e.epoch, &e.thinning)).collect();
    assert_eq!(thinning, [(4, &vec![("conv1.weight".to_string(), 6, 3), ("conv2.weight".to_string(), 16, 8)])]);
    assert!(preview.epochs[4].policies.contains(&"extension:net_thinner".to_string()));
    assert!(preview.to_string().contains("thinning (expected structures left): conv1.weight 6->3 conv2.weight 16->8"));
}
