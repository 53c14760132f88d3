//! Module outputs and Grad-CAM: values against computations by hand, the analytic case where Grad-CAM is the
//! class-activation map, and bad requests.
use distill::models::create_model;
use distill::nn::{AdaptiveAvgPool2d, Conv2d, Conv2dConfig, Linear, Model, ModelInfo, Sequential, TensorOp};
use distill::summary::feature_maps::{feature_maps, grad_cam};
use tch::{Device, Kind, Tensor};

fn max_abs(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

#[test]
fn module_outputs_are_what_the_layers_compute() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::manual_seed(4);
    let x = Tensor::rand([3, 1, 28, 28], (Kind::Float, Device::Cpu));
    model.train();
    let maps = feature_maps(&mut model, &x, &["relu1", "conv1"]).unwrap();
    assert!(model.is_training(), "the mode is restored");
    assert_eq!(maps.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["relu1", "conv1"], "in the order named");
    let w = model.parameter("conv1.weight").unwrap();
    let b = model.parameter("conv1.bias").unwrap();
    // LeNet-5's conv1 pads by 2, so its maps stay 28 × 28.
    let conv = x.conv2d(&w, Some(&b), [1, 1], [2, 2], [1, 1], 1);
    assert!(max_abs(&(&maps[1].1 - &conv)) < 1e-5);
    assert!(max_abs(&(&maps[0].1 - conv.relu())) < 1e-5);
    assert!(!maps[0].1.requires_grad());
}

#[test]
fn bad_requests_are_errors() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let x = Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu));
    assert!(feature_maps(&mut model, &x, &["conv3"]).unwrap_err().to_string().contains("conv1"), "did-you-mean");
    assert!(feature_maps(&mut model, &x, &[]).unwrap_err().to_string().contains("no module"));
    assert!(feature_maps(&mut model, &x.flatten(0, -1), &["conv1"]).is_err(), "a wrong input shape");
    assert!(grad_cam(&mut model, &x, "fc2", None).unwrap_err().to_string().contains("convolution"));
    assert!(grad_cam(&mut model, &x, "conv2", Some(10)).unwrap_err().to_string().contains("0..10"));
    assert!(grad_cam(&mut model, &x.flatten(1, -1), "conv2", None).unwrap_err().to_string().contains("[N, C, H, W]"));
}

/// conv (1×1, 1 → 2 channels) → global average pool → Linear(2 → 3): the score of class c is
/// Σ_k W[c,k] · mean(A_k) + b_c, so α_k = W[c,k] / (H·W) and Grad-CAM is ReLU(Σ_k W[c,k] · A_k), scaled to a peak of
/// 1: the class-activation map of Zhou et al. (2016).
#[test]
fn on_a_pooled_linear_head_grad_cam_is_the_class_activation_map() {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let net = Sequential::new()
        .add("conv", Conv2d::new(vs.root() / "conv", Conv2dConfig::new(1, 2, 1)).unwrap())
        .add("pool", AdaptiveAvgPool2d::new(1, 1))
        .add_op(TensorOp::Flatten)
        .add("fc", Linear::new(vs.root() / "fc", 2, 3, true).unwrap());
    let mut model = Model::new(vs, net, ModelInfo::new("custom", "toy", [1, 4, 4], 3)).unwrap();
    tch::manual_seed(7);
    let x = Tensor::randn([2, 1, 4, 4], (Kind::Float, Device::Cpu));
    let activation = feature_maps(&mut model, &x, &["conv"]).unwrap().remove(0).1;
    let fc = model.parameter("fc.weight").unwrap().detach();
    for class in 0..3 {
        let (cam, classes) = grad_cam(&mut model, &x, "conv", Some(class)).unwrap();
        assert_eq!(classes, [class, class]);
        let expected = (activation.get(0).get(0) * fc.get(class).get(0).double_value(&[]) + activation.get(0).get(1) * fc.get(class).get(1).double_value(&[])).relu();
        let peak = expected.max().double_value(&[]);
        if peak > 0.0 {
            assert!(max_abs(&(cam.get(0) - expected / peak)) < 1e-5, "class {class}");
        }
    }
    // Without a class, each sample's own prediction is explained.
    let predicted: Vec<i64> = Vec::try_from(&model.forward_t(&x, false).unwrap().argmax(-1, false)).unwrap();
    assert_eq!(grad_cam(&mut model, &x, "conv", None).unwrap().1, predicted);
}
