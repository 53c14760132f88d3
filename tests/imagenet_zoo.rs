//! The ImageNet zoo against PyTorch: every state-dict name and shape in order, the parameter count, the MACs of
//! one 224×224 image and the output shape, compared with `tests/data/imagenet_zoo.json`, which
//! `scripts/zoo_reference.py` computed with torch 2.13.0 and torchvision 0.28.0 (Distiller's own models restated
//! there from its source).
use distill::models::{architectures, create_model};
use distill::summary::tables::{column, model_performance_summary};
use serde_json::Value;
use tch::Device;

fn reference() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/imagenet_zoo.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_imagenet_model_matches_pytorch() {
    let reference = reference();
    let models = reference["models"].as_object().unwrap();
    let ours = architectures(Some("imagenet"));
    let mut theirs: Vec<&str> = models.keys().map(String::as_str).collect();
    let mut sorted = ours.clone();
    sorted.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(sorted, theirs, "the zoo and the reference list different architectures");
    for arch in ours {
        tch::manual_seed(0);
        let mut model = create_model(arch, "imagenet", Device::Cpu).unwrap();
        let expected = &models[arch];
        let state: Vec<(String, Vec<i64>)> = model.state_dict().into_iter().map(|(n, t)| (n, t.size())).collect();
        let want: Vec<(String, Vec<i64>)> = expected["state_dict"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect()))
            .collect();
        assert_eq!(state.len(), want.len(), "{arch}: number of state-dict entries");
        for (i, (got, want)) in state.iter().zip(&want).enumerate() {
            assert_eq!(got, want, "{arch}: state-dict entry {i}");
        }
        assert_eq!(model.num_parameters(), expected["parameters"].as_i64().unwrap(), "{arch}: parameters");
        let perf = model_performance_summary(&mut model, 1).unwrap();
        let macs: i64 = column(&perf, "MACs").unwrap().i64().unwrap().into_no_null_iter().sum();
        assert_eq!(macs, expected["macs"].as_i64().unwrap(), "{arch}: MACs");
        let out = tch::no_grad(|| model.forward(&tch::Tensor::zeros([1, 3, 224, 224], (tch::Kind::Float, Device::Cpu)))).unwrap();
        let want_out: Vec<i64> = expected["output"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        assert_eq!(out.size(), want_out, "{arch}: output shape");
    }
}

#[test]
fn published_parameter_counts() {
    // torchvision's documented figures, independent of the reference file.
    for (arch, params) in [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872), ("alexnet", 61_100_840), ("squeezenet1_1", 1_235_496)] {
        assert_eq!(create_model(arch, "imagenet", Device::Cpu).unwrap().num_parameters(), params, "{arch}");
    }
}
