//! Parameter names and shapes of the model zoo against Distiller's definitions.
use distill::models::{architectures, create_model};
use tch::Device;

fn names_and_shapes(arch: &str, dataset: &str) -> Vec<(String, Vec<i64>)> {
    let model = create_model(arch, dataset, Device::Cpu).unwrap();
    model.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect()
}

fn p(name: &str, shape: &[i64]) -> (String, Vec<i64>) {
    (name.to_string(), shape.to_vec())
}

/// Distiller's `ResNetCifar(BasicBlock, [n, n, n])`, restated from its Python source.
fn expected_resnet_cifar(n: usize) -> Vec<(String, Vec<i64>)> {
    let mut v = vec![p("conv1.weight", &[16, 3, 3, 3]), p("bn1.weight", &[16]), p("bn1.bias", &[16])];
    let mut inplanes = 16;
    for (stage, planes) in [16i64, 32, 64].into_iter().enumerate() {
        for b in 0..n {
            let pre = format!("layer{}.{b}", stage + 1);
            v.push(p(&format!("{pre}.conv1.weight"), &[planes, inplanes, 3, 3]));
            v.push(p(&format!("{pre}.bn1.weight"), &[planes]));
            v.push(p(&format!("{pre}.bn1.bias"), &[planes]));
            v.push(p(&format!("{pre}.conv2.weight"), &[planes, planes, 3, 3]));
            v.push(p(&format!("{pre}.bn2.weight"), &[planes]));
            v.push(p(&format!("{pre}.bn2.bias"), &[planes]));
            if b == 0 && inplanes != planes {
                v.push(p(&format!("{pre}.downsample.0.weight"), &[planes, inplanes, 1, 1]));
                v.push(p(&format!("{pre}.downsample.1.weight"), &[planes]));
                v.push(p(&format!("{pre}.downsample.1.bias"), &[planes]));
            }
            inplanes = planes;
        }
    }
    v.push(p("fc.weight", &[10, 64]));
    v.push(p("fc.bias", &[10]));
    v
}

fn total(v: &[(String, Vec<i64>)], dims: Option<&[usize]>) -> i64 {
    v.iter().filter(|(_, s)| dims.is_none_or(|d| d.contains(&s.len()))).map(|(_, s)| s.iter().product::<i64>()).sum()
}

#[test]
fn resnet20_cifar_matches_distiller_counts() {
    let got = names_and_shapes("resnet20_cifar", "cifar10");
    assert_eq!(got.len(), 65);
    assert_eq!(total(&got, None), 272_474);
    assert_eq!(total(&got, Some(&[2, 4])), 270_896);
    assert_eq!(got, expected_resnet_cifar(3));
}

#[test]
fn deeper_cifar_resnets_follow_the_same_layout() {
    for (arch, n) in [("resnet32_cifar", 5), ("resnet44_cifar", 7), ("resnet56_cifar", 9)] {
        assert_eq!(names_and_shapes(arch, "cifar10"), expected_resnet_cifar(n), "{arch}");
    }
}

#[test]
fn plain20_is_resnet20_without_shortcuts() {
    let expected: Vec<_> = expected_resnet_cifar(3).into_iter().filter(|(n, _)| !n.contains("downsample")).collect();
    let got = names_and_shapes("plain20_cifar", "cifar10");
    assert_eq!(got, expected);
    assert_eq!(total(&got, None), 272_474 - (16 * 32 + 32 * 64) - 2 * (32 + 64));
}

#[test]
fn preact_resnet20_layout() {
    let got = names_and_shapes("preact_resnet20_cifar", "cifar10");
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..7], ["conv1.weight", "layer1.0.pre_bn.weight", "layer1.0.pre_bn.bias", "layer1.0.conv1.weight", "layer1.0.bn.weight", "layer1.0.bn.bias", "layer1.0.conv2.weight"]);
    assert!(names.iter().all(|n| !n.contains("downsample")), "identity shortcuts have no parameters");
    assert_eq!(&names[names.len() - 4..], ["final_bn.weight", "final_bn.bias", "fc.weight", "fc.bias"]);
    assert_eq!(got.iter().find(|(n, _)| n == "layer2.0.pre_bn.weight").unwrap().1, [16]);
    assert_eq!(got.iter().find(|(n, _)| n == "layer2.0.conv1.weight").unwrap().1, [32, 16, 3, 3]);
    // conv1 + 9 blocks (pre_bn, conv1, bn, conv2) + final_bn + fc.
    assert_eq!(got.len(), 1 + 9 * 6 + 2 + 2);
}

#[test]
fn small_models_match_their_definitions() {
    assert_eq!(
        names_and_shapes("simplenet_mnist", "mnist"),
        vec![p("conv1.weight", &[20, 1, 5, 5]), p("conv1.bias", &[20]), p("conv2.weight", &[50, 20, 5, 5]), p("conv2.bias", &[50]), p("fc1.weight", &[500, 800]), p("fc1.bias", &[500]), p("fc2.weight", &[10, 500]), p("fc2.bias", &[10])]
    );
    assert_eq!(total(&names_and_shapes("simplenet_mnist", "mnist"), None), 431_080);
    assert_eq!(total(&names_and_shapes("simplenet_v2_mnist", "mnist"), None), 26_080);
    assert_eq!(
        names_and_shapes("simplenet_cifar", "cifar10"),
        vec![p("conv1.weight", &[6, 3, 5, 5]), p("conv1.bias", &[6]), p("conv2.weight", &[16, 6, 5, 5]), p("conv2.bias", &[16]), p("fc1.weight", &[120, 400]), p("fc1.bias", &[120]), p("fc2.weight", &[84, 120]), p("fc2.bias", &[84]), p("fc3.weight", &[10, 84]), p("fc3.bias", &[10])]
    );
    assert_eq!(total(&names_and_shapes("lenet", "mnist"), None), 61_706);
    assert_eq!(total(&names_and_shapes("mlp", "mnist"), None), 266_610);
}

#[test]
fn vgg16_cifar_uses_torchvision_feature_indices() {
    let got = names_and_shapes("vgg16_cifar", "cifar10");
    let conv_idx: Vec<usize> = got
        .iter()
        .filter(|(n, _)| n.ends_with(".weight") && n.starts_with("features."))
        .map(|(n, _)| n.split('.').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(conv_idx, [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]);
    assert_eq!(got.last().unwrap(), &p("classifier.bias", &[10]));
    // 13 convs with biases (14,714,688) and the 512→10 classifier (5,130).
    assert_eq!(total(&got, None), 14_719_818);
    let bn = names_and_shapes("vgg16_bn_cifar", "cifar10");
    assert_eq!(total(&bn, None), 14_719_818 + 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512));
    assert!(bn.iter().any(|(n, s)| n == "features.1.weight" && s == &[64]), "BatchNorm follows the first conv");
}

#[test]
fn every_zoo_model_runs_forward_on_its_input_shape() {
    // The ImageNet models' outputs are checked against PyTorch's in tests/imagenet_zoo.rs.
    for (dataset, shape, classes) in distill::models::DATASETS.iter().filter(|(d, ..)| *d != "imagenet") {
        for arch in architectures(Some(dataset)) {
            let mut model = create_model(arch, dataset, Device::Cpu).unwrap();
            model.eval();
            let x = tch::Tensor::randn([2, shape[0], shape[1], shape[2]], (tch::Kind::Float, Device::Cpu));
            let y = model.forward(&x).unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert_eq!(y.size(), [2, *classes], "{arch}");
        }
    }
}

#[test]
fn unknown_names_list_valid_ones() {
    let err = create_model("resnet20_cifr", "cifar10", Device::Cpu).unwrap_err().to_string();
    assert!(err.starts_with("unknown architecture 'resnet20_cifr'; did you mean 'resnet20_cifar'"), "{err}");
    assert!(err.contains("vgg16_cifar"), "lists the valid names: {err}");
    let err = create_model("lenet", "cifar100", Device::Cpu).unwrap_err().to_string();
    assert_eq!(err, "unknown dataset 'cifar100'; did you mean 'cifar10'? (valid: mnist, cifar10, imagenet)");
    let err = create_model("lenet", "imagenet", Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("'lenet' is a mnist model, not a imagenet one"), "{err}");
    let err = create_model("resnet20_cifar", "mnist", Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("'resnet20_cifar' is a cifar10 model, not a mnist one"), "{err}");
}
