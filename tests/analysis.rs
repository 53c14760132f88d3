//! Analysis: summaries against Distiller's numbers, TensorBoard files read by TensorBoard itself, charts,
//! sensitivity analysis and post-hoc reading of run logs.
use std::path::{Path, PathBuf};
use std::process::Command;

use distill::data::{DataSplits, Dataset};
use distill::models::create_model;
use distill::summary::tables::{model_performance_summary, to_csv, to_text_table, weights_sparsity_summary};
use distill::train::{fit, Progress, TrainConfig};
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python")
}

fn synthetic() -> DataSplits {
    DataSplits {
        train: Dataset::synthetic(64, [1, 28, 28], 10, 1).unwrap(),
        valid: Dataset::synthetic(16, [1, 28, 28], 10, 2).unwrap(),
        test: Dataset::synthetic(16, [1, 28, 28], 10, 3).unwrap(),
    }
}

fn macs(arch: &str) -> Vec<i64> {
    let mut m = create_model(arch, "cifar10", Device::Cpu).unwrap();
    let df = model_performance_summary(&mut m, 1).unwrap();
    df.column("MACs").unwrap().i64().unwrap().iter().flatten().collect()
}

#[test]
fn compute_summary_matches_distiller() {
    assert_eq!(macs("simplenet_cifar"), [352_800, 240_000, 48_000, 10_080, 840]);
    assert_eq!(macs("resnet20_cifar").iter().sum::<i64>(), 40_813_184);
    assert_eq!(macs("resnet56_cifar").iter().sum::<i64>(), 125_747_840);
    let mut m = create_model("simplenet_cifar", "cifar10", Device::Cpu).unwrap();
    let df = model_performance_summary(&mut m, 1).unwrap();
    let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    assert_eq!(names, ["Name", "Type", "Attrs", "IFM", "IFM volume", "OFM", "OFM volume", "Weights volume", "MACs", "MACs (sparse)"]);
    let text = to_text_table(&df).unwrap();
    assert!(text.contains("| conv1 ") && text.contains("(1, 6, 28, 28)") && text.contains("k=(5, 5)"), "{text}");
}

#[test]
fn sparsity_summary_on_constructed_weights() {
    let model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    // fc3.weight [10, 84]: zero output rows 0..5 (5 of 10) and input column 0.
    tch::no_grad(|| {
        let w = model.parameter("fc3.weight").unwrap();
        let _ = w.narrow(0, 0, 5).fill_(0.0);
        let _ = w.narrow(1, 0, 1).fill_(0.0);
        // conv1.weight [6, 1, 5, 5]: filter 0 zero.
        let _ = model.parameter("conv1.weight").unwrap().narrow(0, 0, 1).fill_(0.0);
    });
    let df = weights_sparsity_summary(&model).unwrap();
    let names: Vec<String> = df.column("Name").unwrap().str().unwrap().iter().flatten().map(String::from).collect();
    assert_eq!(names, ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight", "Total sparsity:"]);
    let col = |c: &str| -> Vec<f64> { df.column(c).unwrap().f64().unwrap().iter().flatten().collect() };
    assert_eq!(col("Cols (%)")[4], 50.0, "half the output rows of fc3 are zero");
    assert!((col("Rows (%)")[4] - 100.0 / 84.0).abs() < 1e-9, "one input column of fc3 is zero");
    let fine = (5.0 * 84.0 + 5.0) / 840.0 * 100.0;
    assert!((col("Fine (%)")[4] - fine).abs() < 1e-9);
    assert!((col("3D (%)")[0] - 100.0 / 6.0).abs() < 1e-9 && (col("2D (%)")[0] - 100.0 / 6.0).abs() < 1e-9);
    let nnz: Vec<i64> = df.column("NNZ (sparse)").unwrap().i64().unwrap().iter().flatten().collect();
    assert_eq!(nnz[4], 840 - 425);
    assert_eq!(*nnz.last().unwrap(), nnz[..5].iter().sum::<i64>());
    let csv = to_csv(&df).unwrap();
    assert!(csv.starts_with("Name,Shape,NNZ (dense),NNZ (sparse),Cols (%),Rows (%),Ch (%),2D (%),3D (%),Fine (%),Std,Mean,Abs-Mean\n"));
    assert!(csv.contains("fc3.weight,\"(10, 84)\",840,415,50,"), "{csv}");
}

/// Reads an event folder with TensorBoard's EventAccumulator and prints `tag step value` lines.
const READ_TB: &str = r#"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "histograms": 0})
acc.Reload()
for tag in acc.Tags()["scalars"]:
    for e in acc.Scalars(tag):
        print("S", tag, e.step, repr(e.value))
for tag in acc.Tags()["histograms"]:
    for e in acc.Histograms(tag):
        print("H", tag, e.step, e.histogram_value.num)
"#;

#[test]
fn tensorboard_reads_our_event_files_and_we_read_theirs() {
    let dir = distill::io::TempDir::new().unwrap();
    let out = dir.path().join("run");
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let config = TrainConfig { epochs: 2, batch_size: 16, lr: 0.01, progress: Progress::Quiet, out_dir: Some(out.clone()), ..TrainConfig::default() };
    let run = fit(&mut model, &synthetic(), None, &config).unwrap();
    let o = Command::new(python()).args(["-c", READ_TB, out.to_str().unwrap()]).output().expect("the project's virtualenv (scripts/setup.sh)");
    assert!(o.status.success(), "EventAccumulator failed: {}", String::from_utf8_lossy(&o.stderr));
    let lines = String::from_utf8_lossy(&o.stdout).into_owned();
    let scalar = |tag: &str, step: i64| -> f64 {
        lines
            .lines()
            .find_map(|l| {
                let p: Vec<&str> = l.split(' ').collect();
                (p[0] == "S" && p[1..p.len() - 2].join(" ") == tag && p[p.len() - 2] == step.to_string()).then(|| p[p.len() - 1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("{tag} at {step} missing from:\n{lines}"))
    };
    for (epoch, r) in run.history.iter().enumerate() {
        assert!((scalar("Performance/Validation/Top1", epoch as i64) - r.valid.top1).abs() < 1e-4);
        assert!((scalar("Performance/Validation/Loss", epoch as i64) - r.valid.loss).abs() < 1e-4);
        assert!((scalar("sparsity/weights/total", epoch as i64) - 100.0 * r.counts.sparsity).abs() < 1e-3);
    }
    // 4 training mini-batches per epoch: statistics at each quarter, step = 4·epoch + completed.
    assert!((scalar("Performance/Training/Objective Loss", 4 + 4) - run.history[1].train.objective.loss).abs() < 1e-4);
    for tag in ["Performance/Training/Overall Loss", "Performance/Training/Top1", "Performance/Training/LR", "sparsity/weights/conv1.weight", "sparsity-2D/weights/fc1.weight"] {
        scalar(tag, if tag.starts_with("sparsity") { 1 } else { 4 });
    }
    assert!(lines.contains("H conv1/weight 1 150.0"), "{lines}");
    assert!(out.join("weights_sparsity.csv").is_file());

    // The other way: an event file written by TensorBoard's own writer (PyTorch's SummaryWriter uses it), with
    // simple_value scalars and new-style tensor scalars.
    let theirs = dir.path().join("theirs");
    let script = r#"
import sys
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
w = EventFileWriter(sys.argv[1])
for step in range(3):
    s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="loss", simple_value=1.0 / (step + 1))])
    w.add_event(event_pb2.Event(step=step, wall_time=100.0 + step, summary=s))
    t = tensor_pb2.TensorProto(dtype=1, float_val=[10.0 * step])
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="acc", tensor=t, metadata=meta)])
    w.add_event(event_pb2.Event(step=step, wall_time=100.0 + step, summary=s))
w.close()
"#;
    let o = Command::new(python()).args(["-c", script, theirs.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (df, warnings) = distill::logging::read_runs(&[&theirs, &out]).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let cmp = distill::logging::compare_runs(&df, "loss").unwrap();
    let loss: Vec<f64> = cmp.column("theirs").unwrap().f64().unwrap().iter().flatten().collect();
    assert_eq!(loss, [1.0, 0.5, (1.0f32 / 3.0) as f64]);
    let acc: Vec<f64> = distill::logging::compare_runs(&df, "acc").unwrap().column("theirs").unwrap().f64().unwrap().iter().flatten().collect();
    assert_eq!(acc, [0.0, 10.0, 20.0]);
    let top1 = distill::logging::compare_runs(&df, "metrics/valid_top1").unwrap();
    assert_eq!(top1.height(), 2, "metrics.csv read as tags too");
    assert!(distill::logging::compare_runs(&df, "nope").unwrap_err().to_string().contains("unknown tag 'nope'"));
}

#[test]
fn a_run_killed_mid_write_reads_with_a_warning() {
    let dir = distill::io::TempDir::new().unwrap();
    let path = {
        let mut w = distill::logging::EventWriter::create(dir.path()).unwrap();
        for s in 0..10 {
            w.add_scalar("x", s as f64, s).unwrap();
        }
        w.path().to_path_buf()
    };
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let (df, warnings) = distill::logging::read_runs(&[dir.path()]).unwrap();
    assert_eq!(df.height(), 9);
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("cut short"));
}

#[test]
fn log_reading_survives_link_loops_and_dangling_links() {
    let dir = distill::io::TempDir::new().unwrap();
    {
        let mut w = distill::logging::EventWriter::create(dir.path()).unwrap();
        for s in 0..5 {
            w.add_scalar("x", s as f64, s).unwrap();
        }
    }
    std::os::unix::fs::symlink(dir.path(), dir.path().join("loop")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("dangling")).unwrap();
    let (df, warnings) = distill::logging::read_runs(&[dir.path()]).unwrap();
    assert_eq!(df.height(), 5, "each event file read once");
    assert!(warnings.iter().any(|w| w.contains("dangling") && w.contains("link to nothing")), "{warnings:?}");
}

fn is_svg(s: &str) -> bool {
    s.trim_start().starts_with("<svg") && s.trim_end().ends_with("</svg>")
}

#[test]
fn every_chart_renders_to_svg_and_png() {
    let dir = distill::io::TempDir::new().unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let config = TrainConfig { epochs: 2, batch_size: 16, lr: 0.01, progress: Progress::Quiet, ..TrainConfig::default() };
    let run = fit(&mut model, &synthetic(), None, &config).unwrap();
    let data = distill::data::mnist_bundled().unwrap();
    let sens = distill::sensitivity::SensitivityAnalysis::new()
        .run(&mut model, &data.valid.subset("v", &(0..64).collect::<Vec<_>>()).unwrap(), &["fc1.weight".into(), "conv2.weight".into()], &[0.0, 0.5], distill::sensitivity::SensitivityGroup::Element, 64, true)
        .unwrap();
    let schedule = distill::config::Schedule::from_file(Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules/lenet_agp.yaml")).unwrap();
    let stats = distill::quantization::stats::collect_activation_stats(&mut model, &data.valid, 1, 64).unwrap();
    let figures = [
        ("sparsity", distill::plot::sparsity_bars(&weights_sparsity_summary(&model).unwrap()).unwrap()),
        ("sensitivity", distill::plot::sensitivity_curves(&sens).unwrap()),
        ("histogram", distill::plot::weight_histogram(&model, "fc1.weight", 40).unwrap()),
        ("training", distill::plot::training_curves(&[("a", &run.history), ("b", &run.history[..1])]).unwrap()),
        ("preview", distill::plot::schedule_preview(&schedule.preview(10, 0.02, Some(&model)).unwrap()).unwrap()),
        ("ranges", distill::plot::quantization_ranges(&stats).unwrap()),
    ];
    for (name, fig) in figures {
        let svg = fig.to_svg().unwrap();
        assert!(is_svg(&svg), "{name}");
        assert!(svg.contains(&fig.title), "{name}: the title is drawn as text");
        for p in &fig.panels {
            assert!(svg.contains(&p.x_label) && svg.contains(&p.y_label), "{name}: axis labels");
        }
        let png = dir.path().join(format!("{name}.png"));
        fig.save_png(&png).unwrap();
        assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n", "{name}");
    }
    let training = distill::plot::training_curves(&[("a", &run.history)]).unwrap().to_svg().unwrap();
    assert!(training.contains("a valid") && training.contains("a train"), "legends name the series");
    assert!(distill::plot::weight_histogram(&model, "nope.weight", 10).is_err());
    assert!(distill::plot::training_curves(&[]).is_err());
}

#[test]
fn sensitivity_analysis_prunes_one_tensor_at_a_time_and_caches() {
    let data = distill::data::mnist_bundled().unwrap();
    let valid = data.valid.subset("v", &(0..128).collect::<Vec<_>>()).unwrap();
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let before = model.state_dict().into_iter().map(|(_, t)| t.copy()).collect::<Vec<_>>();
    let mut analysis = distill::sensitivity::SensitivityAnalysis::new();
    let params = ["conv2.weight".to_string(), "fc1.weight".to_string()];
    for group in ["element", "filter", "channel"] {
        let g: distill::sensitivity::SensitivityGroup = group.parse().unwrap();
        let df = analysis.run(&mut model, &valid, &params, &[0.0, 0.5, 0.9], g, 64, true).unwrap();
        assert_eq!(df.height(), 6);
        let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
        assert_eq!(names, ["parameter", "sparsity", "top1", "top5", "loss"]);
        let top1: Vec<f64> = df.column("top1").unwrap().f64().unwrap().iter().flatten().collect();
        assert_eq!(top1[0], top1[3], "the unpruned result is shared");
    }
    assert_eq!(analysis.evaluations(), 1 + 3 * 2 * 2, "one baseline, then 2 levels × 2 tensors × 3 groups");
    let _ = analysis.run(&mut model, &valid, &params, &[0.0, 0.5, 0.9], distill::sensitivity::SensitivityGroup::Element, 64, true).unwrap();
    assert_eq!(analysis.evaluations(), 13, "a repeated sweep is served from the cache");
    for ((_, t), b) in model.state_dict().iter().zip(&before) {
        assert!(t.equal(b), "weights restored");
    }
    assert!(analysis.run(&mut model, &valid, &["conv9.weight".into()], &[0.5], distill::sensitivity::SensitivityGroup::Element, 64, true).is_err());
    assert!(analysis.run(&mut model, &valid, &params, &[1.0], distill::sensitivity::SensitivityGroup::Element, 64, true).is_err());
    let _ = Kind::Float;
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
}

#[test]
fn activation_channel_statistics() {
    let mut model = create_model("lenet", "mnist", Device::Cpu).unwrap();
    tch::no_grad(|| {
        // conv1's filter 2 always outputs −5: its ReLU channel is all zeros, its mean is exactly −5 and its L1 norm
        // (Distiller's: summed over the 28×28 positions, averaged over samples) 5·784.
        let _ = model.parameter("conv1.weight").unwrap().narrow(0, 2, 1).fill_(0.0);
        let _ = model.parameter("conv1.bias").unwrap().narrow(0, 2, 1).fill_(-5.0);
    });
    let data = distill::data::mnist_bundled().unwrap();
    let df = distill::summary::tables::activation_channel_summary(&mut model, &data.valid, 2, 50).unwrap();
    let layers: Vec<String> = df.column("Layer").unwrap().str().unwrap().iter().flatten().map(String::from).collect();
    let row = |layer: &str, ch: i64| -> usize {
        let chans: Vec<i64> = df.column("Channel").unwrap().i64().unwrap().iter().flatten().collect();
        (0..df.height()).find(|&i| layers[i] == layer && chans[i] == ch).unwrap()
    };
    let col = |c: &str| -> Vec<f64> { df.column(c).unwrap().f64().unwrap().iter().flatten().collect() };
    assert_eq!(col("mean_channels")[row("conv1", 2)], -5.0);
    assert_eq!(col("l1_channels")[row("conv1", 2)], 5.0 * 784.0);
    assert_eq!(col("apoz_channels")[row("relu1", 2)], 100.0);
    assert!(col("apoz_channels")[row("relu1", 0)] < 100.0);
    assert!(col("sparsity_ofm")[row("relu1", 0)] >= 100.0 / 6.0, "one of six channels is all zeros");
}
