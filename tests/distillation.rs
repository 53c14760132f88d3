//! Knowledge distillation: the loss against hand-computed values, the policy's arithmetic and schedule, a teacher
//! that never changes, bit-identical resumption, and bad input.
use distill::data::{DataSplits, Dataset};
use distill::distillation::{distillation_loss, KnowledgeDistillationPolicy, LossWeights};
use distill::models::{copy_model, create_model};
use distill::nn::Model;
use distill::scheduler::{CompressionScheduler, Minibatch, PolicySchedule};
use distill::train::{Progress, TrainConfig, Trainer};
use tch::{Device, Tensor};

fn logits(v: &[f32]) -> Tensor {
    Tensor::from_slice(v).view([2, 3])
}

#[test]
fn the_distillation_loss_is_the_batch_mean_kl_of_softened_distributions() {
    // Σ_batch Σ_class p_t (log p_t − log p_s) / 2 with p = softmax(z / T), computed in float64 by hand (Python's
    // math module) for these logits.
    let student = logits(&[1.0, 2.0, 3.0, 0.5, 0.0, -0.5]);
    let teacher = logits(&[3.0, 2.0, 1.0, 1.0, 0.0, 0.0]);
    for (t, expected) in [(1.0, 0.5866374715550117), (4.0, 0.04207887558908437)] {
        let kd = distillation_loss(&student, &teacher, t).unwrap().double_value(&[]);
        assert!((kd - expected).abs() < 1e-6, "T = {t}: {kd} vs {expected}");
    }
    assert_eq!(distillation_loss(&teacher, &teacher, 3.0).unwrap().double_value(&[]), 0.0);
    let err = distillation_loss(&student, &teacher.view([3, 2]), 1.0).unwrap_err().to_string();
    assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
}

/// A scheduler with one distillation policy from `teacher`, active in `epochs`.
fn scheduler_with(student: &Model, teacher: Model, t: f64, epochs: PolicySchedule) -> CompressionScheduler {
    let weights = LossWeights { distill: 0.7, student: 0.3, teacher: 0.0 };
    let policy = KnowledgeDistillationPolicy::new(teacher, t, weights).unwrap();
    let mut s = CompressionScheduler::new(student);
    s.add_policy(Box::new(policy), epochs);
    s
}

#[test]
fn the_policy_weighs_and_scales_as_distiller_and_only_in_its_epochs() {
    let mut student = create_model("mlp", "mnist", Device::Cpu).unwrap();
    let teacher = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let mut s = scheduler_with(&student, copy_model(&teacher).unwrap(), 4.0, PolicySchedule::range(1, 2, 1).unwrap());
    let x = Dataset::synthetic(4, [1, 28, 28], 10, 1).unwrap().images().unwrap().shallow_clone();
    let mb = Minibatch { index: 0, per_epoch: 1 };
    let loss = Tensor::from(1.5f32);
    // Epoch 0 is not scheduled: the loss passes unchanged.
    s.on_epoch_begin(&mut student, 0, None).unwrap();
    let z = student.forward(&x).unwrap();
    s.after_forward(&mut student, 0, mb, &x, &z, None).unwrap();
    let out = s.before_backward_pass(&mut student, 0, mb, &loss, None).unwrap();
    assert_eq!(out.overall_loss.double_value(&[]), 1.5);
    assert!(out.loss_components.is_empty());
    // Epoch 1: 0.3·loss + 0.7·T²·KL, the unscaled KL logged as "Distill Loss".
    s.on_epoch_begin(&mut student, 1, None).unwrap();
    s.after_forward(&mut student, 1, mb, &x, &z, None).unwrap();
    let out = s.before_backward_pass(&mut student, 1, mb, &loss, None).unwrap();
    let kd = distillation_loss(&z, &teacher.forward_t(&x, false).unwrap(), 4.0).unwrap().double_value(&[]);
    assert!(kd > 0.0);
    assert!((out.overall_loss.double_value(&[]) - (0.3 * 1.5 + 0.7 * 16.0 * kd)).abs() < 1e-5);
    assert_eq!(out.loss_components.len(), 1);
    assert_eq!(out.loss_components[0].name, "Distill Loss");
    assert!((out.loss_components[0].value.double_value(&[]) - kd).abs() < 1e-7);
    // A loop that skips the forward-pass callback is told so.
    let err = s.before_backward_pass(&mut student, 1, mb, &loss, None).unwrap_err().to_string();
    assert!(err.contains("after_forward"), "{err}");
}

fn splits() -> DataSplits {
    DataSplits {
        train: Dataset::synthetic(96, [1, 28, 28], 10, 1).unwrap(),
        valid: Dataset::synthetic(16, [1, 28, 28], 10, 2).unwrap(),
        test: Dataset::synthetic(16, [1, 28, 28], 10, 3).unwrap(),
    }
}

fn config(dir: &std::path::Path, out: &str, epochs: usize) -> TrainConfig {
    TrainConfig { epochs, batch_size: 32, lr: 0.01, progress: Progress::Quiet, out_dir: Some(dir.join(out)), ..TrainConfig::default() }
}

#[test]
fn the_teacher_never_changes_and_a_distilled_run_resumes_bit_identically() {
    let data = splits();
    let dir = distill::io::TempDir::new().unwrap();
    // Fixed starting weights for every run (tests share libtorch's generator).
    let teacher = create_model("lenet", "mnist", Device::Cpu).unwrap();
    let start = create_model("mlp", "mnist", Device::Cpu).unwrap();
    let teacher_before: Vec<(String, Tensor)> = teacher.state_dict().into_iter().map(|(n, t)| (n, t.copy())).collect();
    // The tensors the policy's teacher holds, watched while it is inside the scheduler.
    let teacher_live = teacher.state_dict();

    let mut full = copy_model(&start).unwrap();
    let mut s = scheduler_with(&full, teacher, 2.0, PolicySchedule::range(0, 3, 1).unwrap());
    let summary = Trainer::new(&mut full, config(dir.path(), "full", 3)).unwrap().with_scheduler(&mut s).run(&data).unwrap();
    assert_eq!(summary.epochs, 3);
    for ((n, before), (_, after)) in teacher_before.iter().zip(&teacher_live) {
        assert!(before.equal(after), "the teacher's {n} changed");
    }
    let teacher = || {
        let mut t = create_model("lenet", "mnist", Device::Cpu).unwrap();
        t.load_state_dict(&teacher_before, true).unwrap();
        t
    };
    assert!(!full.parameter("fc1.weight").unwrap().equal(&start.parameter("fc1.weight").unwrap()), "the student trained");

    let mut part = copy_model(&start).unwrap();
    let mut s = scheduler_with(&part, teacher(), 2.0, PolicySchedule::range(0, 3, 1).unwrap());
    Trainer::new(&mut part, config(dir.path(), "part", 2)).unwrap().with_scheduler(&mut s).run(&data).unwrap();
    let mut resumed = create_model("mlp", "mnist", Device::Cpu).unwrap();
    let mut s = scheduler_with(&resumed, teacher(), 2.0, PolicySchedule::range(0, 3, 1).unwrap());
    let mut trainer = Trainer::new(&mut resumed, config(dir.path(), "part", 3)).unwrap().with_scheduler(&mut s);
    trainer.resume(dir.path().join("part/checkpoint.safetensors")).unwrap();
    trainer.run(&data).unwrap();
    for ((n, a), (_, b)) in full.state_dict().iter().zip(resumed.state_dict().iter()) {
        assert!(a.equal(b), "{n} differs after resume");
    }
    // The teacher is not in the student's checkpoint.
    let saved = distill::train::Checkpoint::load(dir.path().join("part/checkpoint.safetensors")).unwrap();
    assert!(saved.model.iter().all(|(n, _)| !n.starts_with("conv")), "{:?}", saved.model.iter().map(|(n, _)| n).collect::<Vec<_>>());
}

#[test]
fn bad_settings_are_refused_before_training() {
    let lenet = || create_model("lenet", "mnist", Device::Cpu).unwrap();
    let err = |t: f64, w: LossWeights| KnowledgeDistillationPolicy::new(lenet(), t, w).unwrap_err().to_string();
    let d = LossWeights::default();
    assert!(err(0.0, d).contains("temperature"));
    assert!(err(f64::NAN, d).contains("temperature"));
    assert!(err(1.0, LossWeights { teacher: 0.5, ..d }).contains("must be 0"));
    assert!(err(1.0, LossWeights { distill: -1.0, ..d }).contains("distill weight"));
    assert!(err(1.0, LossWeights { distill: 0.0, student: 0.0, teacher: 0.0 }).contains("nothing would be trained"));
    // A teacher of other classes or inputs than the student.
    let policy = KnowledgeDistillationPolicy::new(create_model("simplenet_cifar", "cifar10", Device::Cpu).unwrap(), 1.0, d).unwrap();
    let e = policy.check_student(&lenet()).unwrap_err().to_string();
    assert!(e.contains("[3, 32, 32]") && e.contains("[1, 28, 28]"), "{e}");
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let five = distill::nn::Sequential::new().add_op(distill::nn::TensorOp::Flatten).add("fc", distill::nn::Linear::new(vs.root() / "fc", 784, 5, true).unwrap());
    let five = Model::new(vs, five, distill::nn::ModelInfo::new("five", "mnist", [1, 28, 28], 5)).unwrap();
    let policy = KnowledgeDistillationPolicy::new(lenet(), 1.0, d).unwrap();
    let e = policy.check_student(&five).unwrap_err().to_string();
    assert!(e.contains("10 classes") && e.contains("'five' 5"), "{e}");
    // The same check when training starts.
    let mut s = CompressionScheduler::new(&five);
    s.add_policy(Box::new(policy), PolicySchedule::range(0, 1, 1).unwrap());
    let mut student = five;
    let e = s.on_epoch_begin(&mut student, 0, None).unwrap_err().to_string();
    assert!(e.contains("10 classes"), "{e}");
}

#[test]
fn a_schedule_configures_distillation_and_reports_mistakes_where_they_are() {
    use distill::config::Schedule;
    let dir = distill::io::TempDir::new().unwrap();
    let data = splits();
    let mut teacher = create_model("lenet", "mnist", Device::Cpu).unwrap();
    distill::train::fit(&mut teacher, &data, None, &config(dir.path(), "teacher", 1)).unwrap();
    let yaml = |body: &str| {
        let file = dir.path().join("kd.yaml");
        std::fs::write(&file, format!("distillers:\n  kd:\n    class: KnowledgeDistillation\n{body}policies:\n  - distiller: {{instance_name: kd}}\n    starting_epoch: 0\n    ending_epoch: 2\n    frequency: 1\n")).unwrap();
        file
    };
    let good = "    teacher: lenet\n    teacher_checkpoint: teacher/checkpoint.safetensors\n    temperature: 4\n    distill_weight: 0.7\n    student_weight: 0.3\n";
    let schedule = Schedule::from_file(yaml(good)).unwrap();
    let again = dir.path().join("again.yaml");
    assert_eq!(Schedule::from_yaml_str(&schedule.to_yaml().unwrap(), again.to_str().unwrap()).unwrap().distillers, schedule.distillers);
    let preview = schedule.preview(2, 0.01, None).unwrap();
    assert_eq!(preview.epochs[1].policies, ["distiller:kd"]);
    let mut student = create_model("mlp", "mnist", Device::Cpu).unwrap();
    let mut scheduler = schedule.build(&student).unwrap();
    let names: Vec<String> = scheduler.policies().map(|(p, _)| p.name()).collect();
    assert_eq!(names, ["KnowledgeDistillationPolicy(teacher 'lenet', T=4, distill 0.7, student 0.3)"]);
    let run = distill::train::fit(&mut student, &data, Some(&mut scheduler), &config(dir.path(), "student", 2)).unwrap();
    assert_eq!(run.epochs, 2);
    // The distillation term, per epoch, in the history's DataFrame (and metrics.csv).
    let frame = distill::train::history_frame(&run.history).unwrap();
    let kd: Vec<Option<f64>> = distill::summary::tables::column(&frame, "train_distill_loss").unwrap().f64().unwrap().iter().collect();
    assert_eq!(kd.len(), 2);
    let epochs = distill::summary::tables::column(&frame, "epoch").unwrap();
    assert_eq!(epochs.i64().unwrap().iter().collect::<Vec<_>>(), [Some(0), Some(1)], "epochs are integers");
    assert!(kd.iter().all(|v| v.is_some_and(|v| v > 0.0 && v.is_finite())), "{kd:?}");

    // Each mistake at its line and column.
    for (body, expected) in [
        ("    teacher: lenet\n    teacher_checkpoint: nowhere.safetensors\n", "kd.yaml:5:25: the teacher's checkpoint"),
        ("    teacher: lenett\n    teacher_checkpoint: teacher/checkpoint.safetensors\n", "kd.yaml:4:5: invalid teacher: unknown architecture 'lenett'; did you mean 'lenet'"),
        ("    teacher: lenet\n    teacher_checkpoint: teacher/checkpoint.safetensors\n    teacher_weight: 0.5\n", "kd.yaml:6:5: invalid teacher_weight: 0.5: the teacher is not trained"),
        ("    teacher: lenet\n    teacher_checkpoint: teacher/checkpoint.safetensors\n    temprature: 2\n", "kd.yaml:6:5: KnowledgeDistillation: unknown field `temprature`"),
        ("    teacher: lenet\n    teacher_checkpoint: teacher/checkpoint.safetensors\n    temperature: 0\n", "kd.yaml:6:5: invalid temperature"),
    ] {
        let err = Schedule::from_file(yaml(body)).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected}:\n{err}");
    }
    // A teacher that does not fit the student is an error when the scheduler is built, before training.
    let schedule = Schedule::from_file(yaml(good)).unwrap();
    let err = schedule.build(&create_model("simplenet_cifar", "cifar10", Device::Cpu).unwrap()).err().unwrap().to_string();
    assert!(err.contains("kd.yaml:2:3") && err.contains("'lenet' is a mnist model"), "{err}");
}
