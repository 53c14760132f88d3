//! The named module tree: names, replacement, observers, printing, state loading and errors.
use std::any::Any;
use std::sync::{Arc, Mutex};

use distill::models::create_model;
use distill::nn::{BoxModule, Conv2d, Forward, Module, ModuleCall, Observer};
use tch::{Device, Kind, Tensor};

fn input(model: &distill::nn::Model, n: i64) -> Tensor {
    let s = &model.info().input_shape;
    Tensor::randn([n, s[0], s[1], s[2]], (Kind::Float, Device::Cpu))
}

/// Counts calls per module name.
#[derive(Default)]
struct CallCounter {
    calls: Vec<(String, String)>,
}

impl Observer for CallCounter {
    fn observe(&mut self, call: &ModuleCall) {
        self.calls.push((call.name.to_string(), call.module.type_name().to_string()));
    }
}

#[test]
fn observers_see_every_module_once_per_forward() {
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let counter = Arc::new(Mutex::new(CallCounter::default()));
    let id = model.attach_observer(counter.clone());
    let x = input(&model, 2);
    let _ = model.forward(&x).unwrap();
    let mut seen: Vec<(String, String)> = counter.lock().unwrap().calls.clone();
    let mut expected: Vec<(String, String)> = model.named_modules().into_iter().map(|m| (m.name, m.type_name)).collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
    // Children are reported before their container; the root comes last.
    assert_eq!(counter.lock().unwrap().calls.last().unwrap().0, "");
    let _ = model.forward(&x).unwrap();
    assert_eq!(counter.lock().unwrap().calls.len(), 2 * expected.len());
    assert!(model.detach_observer(id));
    let _ = model.forward(&x).unwrap();
    assert_eq!(counter.lock().unwrap().calls.len(), 2 * expected.len());
}

#[test]
fn observers_see_inputs_and_outputs() {
    struct Shapes(Vec<(String, Vec<Vec<i64>>, Vec<i64>)>);
    impl Observer for Shapes {
        fn observe(&mut self, call: &ModuleCall) {
            self.0.push((call.name.to_string(), call.inputs.iter().map(|t| t.size()).collect(), call.output.size()));
        }
    }
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let shapes = Arc::new(Mutex::new(Shapes(Vec::new())));
    model.attach_observer(shapes.clone());
    let _ = model.forward(&input(&model, 3)).unwrap();
    let s = shapes.lock().unwrap();
    let add = s.0.iter().find(|(n, ..)| n == "layer2.0.residual_eltwiseadd").unwrap();
    assert_eq!(add.1, vec![vec![3, 32, 16, 16], vec![3, 32, 16, 16]]);
    let fc = s.0.iter().find(|(n, ..)| n == "fc").unwrap();
    assert_eq!((fc.1.clone(), fc.2.clone()), (vec![vec![3, 64]], vec![3, 10]));
}

/// Wraps a module the way Distiller's quantizers do, under the child name `wrapped_module`.
#[derive(Debug)]
struct Wrapper {
    inner: BoxModule,
}

impl Module for Wrapper {
    fn type_name(&self) -> &str {
        "Wrapper"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> distill::Result<Tensor> {
        ctx.call("wrapped_module", self.inner.as_ref(), xs)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("wrapped_module", self.inner.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("wrapped_module", &mut self.inner)]
    }
}

#[test]
fn replacing_a_module_keeps_its_name_and_the_forward() {
    let mut model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    model.eval();
    let x = input(&model, 2);
    let before = model.forward(&x).unwrap();
    let names_before: Vec<String> = model.named_modules().into_iter().map(|m| m.name).collect();

    model.map_module("layer1.0.conv1", |old| Box::new(Wrapper { inner: old })).unwrap();
    assert_eq!(model.module("layer1.0.conv1").unwrap().type_name(), "Wrapper");
    let inner = model.module("layer1.0.conv1.wrapped_module").unwrap();
    assert!((inner as &dyn Any).downcast_ref::<Conv2d>().is_some());
    assert!(model.parameter("layer1.0.conv1.wrapped_module.weight").is_ok());
    assert!(model.forward(&x).unwrap().equal(&before));

    let old = model.replace_module("layer1.0.relu1", distill::nn::Identity).unwrap();
    assert_eq!(old.type_name(), "ReLU");
    let names_after: Vec<String> = model.named_modules().into_iter().map(|m| m.name).filter(|n| !n.contains("wrapped_module")).collect();
    assert_eq!(names_after, names_before);
    assert!(!model.forward(&x).unwrap().equal(&before), "Identity instead of ReLU changes the output");
    model.replace_module("layer1.0.relu1", distill::nn::ReLU).unwrap();
    assert!(model.forward(&x).unwrap().equal(&before));
}

#[test]
fn names_accept_distiller_prefix_and_suggest_alternatives() {
    let model = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let w = model.parameter("module.layer1.0.conv1.weight").unwrap();
    assert_eq!(w.size(), [16, 16, 3, 3]);
    let err = model.parameter("layer1.0.conv1.weigth").unwrap_err().to_string();
    assert!(err.contains("did you mean 'layer1.0.conv1.weight'"), "{err}");
    let err = model.module("layer4.0.conv1").unwrap_err().to_string();
    assert!(err.starts_with("unknown module 'layer4.0.conv1'"), "{err}");
    let mut model = model;
    assert!(model.replace_module("", distill::nn::Identity).is_err());
    assert!(model.replace_module("layer1.9", distill::nn::Identity).unwrap_err().to_string().contains("unknown module"));
}

#[test]
fn tree_names_are_the_var_store_names() {
    let model = create_model("preact_resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let mut tree: Vec<String> = model.state_dict().into_iter().map(|(n, _)| n).collect();
    let mut store: Vec<String> = model.var_store().variables().into_keys().collect();
    tree.sort();
    store.sort();
    assert_eq!(tree, store);
    let buffers: Vec<String> = model.named_buffers().into_iter().map(|(n, _)| n).take(2).collect();
    assert_eq!(buffers, ["layer1.0.pre_bn.running_mean", "layer1.0.pre_bn.running_var"]);
}

#[test]
fn prints_like_pytorch() {
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let expected = "LeNet5(
  (conv1): Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
  (relu1): ReLU()
  (pool1): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  (conv2): Conv2d(6, 16, kernel_size=(5, 5), stride=(1, 1))
  (relu2): ReLU()
  (pool2): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
  (flatten): Flatten(start_dim=1, end_dim=-1)
  (fc1): Linear(in_features=400, out_features=120, bias=True)
  (relu3): ReLU()
  (fc2): Linear(in_features=120, out_features=84, bias=True)
  (relu4): ReLU()
  (fc3): Linear(in_features=84, out_features=10, bias=True)
)";
    assert_eq!(model.to_string(), expected);
}

#[test]
fn bad_inputs_are_errors_naming_the_module() {
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let err = model.forward(&Tensor::zeros([2, 3, 28, 28], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert_eq!(err, "in module 'conv1': shape mismatch: Conv2d expects input [N, 1, H, W], got [2, 3, 28, 28]");
    let err = model.forward(&Tensor::zeros([2, 1, 20, 20], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(err.starts_with("in module 'fc1': shape mismatch: Linear expects input [.., 400], got [2, 144]"), "{err}");
}

#[test]
fn loading_a_foreign_state_lists_every_difference() {
    let mut lenet = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let other = create_model("simplenet_mnist", "mnist", Device::Cpu).unwrap();
    let err = lenet.load_state_dict(&other.state_dict(), true).unwrap_err().to_string();
    assert!(err.contains("'conv1.weight': model has [6, 1, 5, 5], given [20, 1, 5, 5]"), "{err}");
    assert!(err.contains("missing 'fc3.weight' [10, 84]"), "{err}");
    let same = create_model("lenet", "mnist", Device::Cpu).unwrap();
    lenet.load_state_dict(&same.state_dict(), true).unwrap();
    assert!(lenet.parameter("fc1.weight").unwrap().equal(&same.parameter("fc1.weight").unwrap()));
}

#[test]
fn user_trees_with_bad_names_are_rejected() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = distill::nn::Sequential::new()
        .add("fc", distill::nn::Linear::new(&root / "fc", 4, 2, true).unwrap())
        .add("fc", distill::nn::ReLU);
    let info = distill::nn::ModelInfo::new("toy", "none", [4, 1, 1], 2);
    let err = distill::nn::Model::new(vs, net, info.clone()).err().unwrap().to_string();
    assert!(err.contains("child 'fc'"), "{err}");
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let stray = distill::nn::Linear::new(&vs.root() / "elsewhere", 4, 2, true).unwrap();
    let err = distill::nn::Model::new(vs, distill::nn::Sequential::new().add("fc", stray), info).err().unwrap().to_string();
    assert!(err.contains("'fc.weight' is not in the VarStore"), "{err}");
}

/// A model laid out channels-last computes what the row-major one does, and stays channels-last, through what
/// rewrites its weights: thinning, copying, SGD steps, a checkpoint, cross-layer equalization, batch-norm folding
/// and the post-training quantizer.
#[test]
fn a_channels_last_model_computes_what_the_contiguous_one_does() {
    use distill::models::copy_model;
    use distill::nn::{MemoryFormat, Model};
    use distill::optim::{Optimizer, OptimizerConfig};
    use distill::quantization::range_linear::{PostTrainConfig, PostTrainLinearQuantizer};
    use distill::quantization::{bn_fold::fold_batch_norms, equalization::equalize_cross_layer};

    /// The layout of the first convolution's input, seen from inside the forward pass.
    struct InputLayout(Option<MemoryFormat>);
    impl Observer for InputLayout {
        fn observe(&mut self, call: &ModuleCall) {
            if call.name == "conv1" {
                self.0 = Some(MemoryFormat::of(call.inputs[0]));
            }
        }
    }
    fn close(a: &Tensor, b: &Tensor, tolerance: f64, what: &str) {
        let (diff, scale) = ((a - b).abs().max().double_value(&[]), b.abs().max().double_value(&[]));
        assert!(diff <= tolerance * scale, "{what}: differ by {diff} at scale {scale}");
    }
    // Every weight whose layout tells the two formats apart (more than one input channel and pixel) is channels-last.
    fn channels_last(model: &Model, what: &str) {
        for (name, p) in model.named_parameters() {
            if p.dim() == 4 && p.size()[1] > 1 && p.size()[2] * p.size()[3] > 1 {
                assert_eq!(MemoryFormat::of(&p), MemoryFormat::ChannelsLast, "{what}: {name} {:?}", p.stride());
            }
        }
    }
    let eval = |m: &Model, x: &Tensor| tch::no_grad(|| m.forward_t(x, false).unwrap());

    tch::manual_seed(7);
    let mut rows = create_model("resnet20_cifar", "cifar10", Device::Cpu).unwrap();
    let mut last = copy_model(&rows).unwrap();
    last.to_memory_format(MemoryFormat::ChannelsLast).unwrap();
    assert_eq!((rows.memory_format(), last.memory_format()), (MemoryFormat::Contiguous, MemoryFormat::ChannelsLast));
    channels_last(&last, "converted");
    let x = input(&rows, 8);
    assert_eq!(MemoryFormat::of(&x), MemoryFormat::Contiguous);
    let seen = Arc::new(Mutex::new(InputLayout(None)));
    let id = last.attach_observer(seen.clone());
    close(&eval(&last, &x), &eval(&rows, &x), 1e-5, "converted");
    last.detach_observer(id);
    assert_eq!(seen.lock().unwrap().0, Some(MemoryFormat::ChannelsLast), "a row-major input is converted on the way in");

    // Thinning: the weakest half of two blocks' first filters, zeroed alike in both, then removed.
    for m in [&rows, &last] {
        tch::no_grad(|| {
            for block in ["layer1.0", "layer2.1"] {
                let idx = Tensor::arange_start(0, 8, (Kind::Int64, Device::Cpu));
                for p in [format!("{block}.conv1.weight"), format!("{block}.bn1.weight"), format!("{block}.bn1.bias")] {
                    let _ = m.parameter(&p).unwrap().index_fill_(0, &idx, 0.0);
                }
            }
        });
    }
    for m in [&mut rows, &mut last] {
        distill::thinning::thin_filters(m).unwrap();
    }
    assert_eq!(last.parameter("layer2.1.conv2.weight").unwrap().size(), [32, 24, 3, 3]);
    channels_last(&last, "thinned");
    close(&eval(&last, &x), &eval(&rows, &x), 1e-5, "thinned");
    let copy = copy_model(&last).unwrap();
    assert_eq!(copy.memory_format(), MemoryFormat::ChannelsLast);
    channels_last(&copy, "copied");

    // Training (on copies): three SGD steps with momentum give the same losses, and the weights stay channels-last.
    // Gradients themselves may differ by a few percent where one ReLU input of the two models lies on the other
    // side of zero by rounding (float32 against float64 does the same), so only the losses are compared.
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6, 7]);
    let mut losses = Vec::new();
    let mut trained = [copy_model(&rows).unwrap(), copy_model(&last).unwrap()];
    for m in &mut trained {
        m.train();
        let mut opt = Optimizer::for_model(m, OptimizerConfig::sgd(0.9, 1e-4), 0.01).unwrap();
        for _ in 0..3 {
            opt.zero_grad();
            let loss = m.forward(&x).unwrap().cross_entropy_for_logits(&y);
            loss.backward();
            opt.step().unwrap();
            losses.push(loss.double_value(&[]));
        }
    }
    assert!(losses[2] < losses[0] - 0.01, "the model learns: {losses:?}");
    for i in 0..3 {
        assert!((losses[i] - losses[i + 3]).abs() < 1e-3 * losses[i], "step {i}: {losses:?}");
    }
    channels_last(&trained[1], "trained");

    // A checkpoint stores values: loaded, the model is row-major and computes the same function.
    let dir = distill::io::TempDir::new().unwrap();
    let path = dir.path().join("last.safetensors");
    distill::train::Checkpoint::capture(&last, None, None, 0, 1, Vec::new()).save(&path).unwrap();
    let loaded = distill::models::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(loaded.memory_format(), MemoryFormat::Contiguous);
    close(&eval(&loaded, &x), &eval(&last, &x), 1e-5, "loaded");

    // Equalization and folding rewrite weights in place; the quantizer wraps them.
    for m in [&mut rows, &mut last] {
        equalize_cross_layer(m).unwrap();
    }
    channels_last(&last, "equalized");
    close(&eval(&last, &x), &eval(&rows, &x), 1e-4, "equalized");
    for m in [&mut rows, &mut last] {
        fold_batch_norms(m).unwrap();
    }
    close(&eval(&last, &x), &eval(&rows, &x), 1e-4, "folded");
    for m in [&mut rows, &mut last] {
        PostTrainLinearQuantizer::new(PostTrainConfig::default()).prepare_model(m).unwrap();
    }
    close(&eval(&last, &x), &eval(&rows, &x), 1e-3, "quantized");
}
