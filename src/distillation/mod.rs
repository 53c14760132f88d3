//! Knowledge distillation (Hinton et al., 2015; Distiller's `KnowledgeDistillationPolicy`): a student trains
//! against a teacher's softened outputs as well as the labels.
//!
//! In each scheduled epoch the policy runs the teacher (eval mode, no gradients) on every training mini-batch,
//! once, right after the student's forward pass ([`Policy::after_forward`]), and replaces the loss by Distiller's
//!
//! ```text
//! overall = w_student · loss + w_distill · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))
//! ```
//!
//! with the KL divergence averaged over the batch (PyTorch's `kl_div(..., reduction='batchmean')`); the unscaled
//! KL is logged as the loss component `Distill Loss`. Distiller's teacher-loss weight must be 0, as there.
//!
//! ```
//! use distill::distillation::{distillation_loss, KnowledgeDistillationPolicy, LossWeights};
//! use distill::scheduler::{CompressionScheduler, PolicySchedule};
//! let student = distill::models::create_model("mlp", "mnist", tch::Device::Cpu)?;
//! let teacher = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let kd = KnowledgeDistillationPolicy::new(teacher, 4.0, LossWeights::default())?;
//! let mut scheduler = CompressionScheduler::new(&student);
//! scheduler.add_policy(Box::new(kd), PolicySchedule::range(0, 10, 1)?);
//!
//! // Equal logits diverge by nothing.
//! let z = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
//! assert_eq!(distillation_loss(&z, &z, 2.0)?.double_value(&[]), 0.0);
//! # Ok::<(), distill::Error>(())
//! ```
use tch::{Kind, Tensor};

use crate::nn::Model;
use crate::scheduler::{LossComponent, Minibatch, Policy, PolicyContext, PolicyLoss};
use crate::{Error, Result};

/// The weights of the three loss terms (Distiller's `DistillationLossWeights`; defaults 0.5, 0.5, 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// Weight of the distillation term (`--kd-distill-wt`).
    pub distill: f64,
    /// Weight of the student's own loss against the labels (`--kd-student-wt`).
    pub student: f64,
    /// Weight of a teacher loss (`--kd-teacher-wt`); must be 0, as in Distiller, which never trains the teacher.
    pub teacher: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights { distill: 0.5, student: 0.5, teacher: 0.0 }
    }
}

impl LossWeights {
    /// Checks the weights as Distiller does, and that something is trained.
    pub fn validate(&self) -> Result<()> {
        for (name, w) in [("distill weight", self.distill), ("student weight", self.student), ("teacher weight", self.teacher)] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::invalid(name, format!("{w}: must be a non-negative number")));
            }
        }
        if self.teacher != 0.0 {
            return Err(Error::invalid("teacher weight", format!("{}: the teacher is not trained, so its loss weight must be 0 (as in Distiller)", self.teacher)));
        }
        if self.distill == 0.0 && self.student == 0.0 {
            return Err(Error::invalid("loss weights", "the distill and student weights are both 0: nothing would be trained"));
        }
        Ok(())
    }
}

/// Checks a distillation temperature: a positive number.
pub fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid("temperature", format!("{temperature}: must be a positive number (Distiller's default is 1)")))
    }
}

/// The batch-mean KL divergence of the student's softened distribution from the teacher's,
/// `Σ_batch Σ_class p_t (log p_t − log p_s) / N` with `p = softmax(z / T)`; not scaled by `T²`.
pub fn distillation_loss(student_logits: &Tensor, teacher_logits: &Tensor, temperature: f64) -> Result<Tensor> {
    if student_logits.size() != teacher_logits.size() || student_logits.dim() != 2 {
        return Err(Error::Shape(format!(
            "distillation needs student and teacher logits of the same [batch, classes] shape, got {:?} and {:?}",
            student_logits.size(),
            teacher_logits.size()
        )));
    }
    let log_s = student_logits.f_div_scalar(temperature)?.f_log_softmax(1, Kind::Float)?;
    let log_t = teacher_logits.f_div_scalar(temperature)?.f_log_softmax(1, Kind::Float)?;
    let kl = log_t.f_exp()?.f_mul(&log_t.f_sub(&log_s)?)?.f_sum(Kind::Float)?;
    Ok(kl.f_div_scalar(student_logits.size()[0] as f64)?)
}

/// Distiller's `KnowledgeDistillationPolicy`: schedule it over the epochs the student should learn from the
/// teacher (Distiller: from `--kd-start-epoch` to the end of training).
pub struct KnowledgeDistillationPolicy {
    teacher: Model,
    temperature: f64,
    weights: LossWeights,
    active: bool,
    teacher_logits: Option<Tensor>,
    student_logits: Option<Tensor>,
}

impl std::fmt::Debug for KnowledgeDistillationPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeDistillationPolicy").field("teacher", &self.teacher.info().arch).field("temperature", &self.temperature).field("weights", &self.weights).finish()
    }
}

impl KnowledgeDistillationPolicy {
    /// Distills from `teacher` (put in eval mode; it is never trained) at `temperature` with `weights`.
    pub fn new(mut teacher: Model, temperature: f64, weights: LossWeights) -> Result<Self> {
        check_temperature(temperature)?;
        weights.validate()?;
        teacher.eval();
        Ok(KnowledgeDistillationPolicy { teacher, temperature, weights, active: false, teacher_logits: None, student_logits: None })
    }

    /// Distills into `student` from `teacher` (a fresh model of the teacher's architecture, built for the
    /// student's dataset and device) with the weights (and thinning) of its trained `checkpoint`; the teacher is
    /// checked against the student here, before any training.
    pub fn from_checkpoint(mut teacher: Model, checkpoint: &std::path::Path, temperature: f64, weights: LossWeights, student: &Model) -> Result<Self> {
        crate::train::Checkpoint::load(checkpoint)?.restore_model(&mut teacher, checkpoint)?;
        let policy = Self::new(teacher, temperature, weights)?;
        policy.check_student(student)?;
        Ok(policy)
    }

    /// The teacher.
    pub fn teacher(&self) -> &Model {
        &self.teacher
    }

    /// The temperature.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    /// The loss weights.
    pub fn weights(&self) -> LossWeights {
        self.weights
    }

    /// Whether `student` can learn from this teacher: the same number of classes, the same input shape and
    /// device.
    pub fn check_student(&self, student: &Model) -> Result<()> {
        let (s, t) = (student.info(), self.teacher.info());
        if s.num_classes != t.num_classes {
            return Err(Error::invalid("teacher", format!("the teacher '{}' has {} classes, the student '{}' {}: they must predict the same classes", t.arch, t.num_classes, s.arch, s.num_classes)));
        }
        if s.input_shape != t.input_shape {
            return Err(Error::invalid("teacher", format!("the teacher '{}' reads inputs of shape {:?}, the student '{}' {:?}", t.arch, t.input_shape, s.arch, s.input_shape)));
        }
        if student.device() != self.teacher.device() {
            return Err(Error::invalid("teacher", format!("the teacher is on {:?}, the student on {:?}: load both on one device", self.teacher.device(), student.device())));
        }
        Ok(())
    }
}

impl Policy for KnowledgeDistillationPolicy {
    fn name(&self) -> String {
        let w = self.weights;
        format!("KnowledgeDistillationPolicy(teacher '{}', T={}, distill {}, student {})", self.teacher.info().arch, self.temperature, w.distill, w.student)
    }

    fn on_epoch_begin(&mut self, ctx: &mut PolicyContext) -> Result<()> {
        self.check_student(ctx.model)?;
        self.active = true;
        Ok(())
    }

    fn after_forward(&mut self, _: &mut PolicyContext, _: Minibatch, input: &Tensor, output: &Tensor) -> Result<()> {
        if !self.active {
            return Ok(());
        }
        let teacher = tch::no_grad(|| self.teacher.forward_t(input, false))?;
        self.teacher_logits = Some(teacher);
        self.student_logits = Some(output.shallow_clone());
        Ok(())
    }

    fn before_backward_pass(&mut self, _: &mut PolicyContext, mb: Minibatch, loss: &Tensor) -> Result<Option<PolicyLoss>> {
        if !self.active {
            return Ok(None);
        }
        let (Some(teacher), Some(student)) = (self.teacher_logits.take(), self.student_logits.take()) else {
            return Err(Error::invalid(
                "knowledge distillation",
                format!("mini-batch {} reached the loss without the forward-pass callback (CompressionScheduler::after_forward): a training loop with distillation must call it after the model's forward pass", mb.index),
            ));
        };
        let kd = distillation_loss(&student, &teacher, self.temperature)?;
        let t2 = self.temperature * self.temperature;
        let overall = loss.f_mul_scalar(self.weights.student)?.f_add(&kd.f_mul_scalar(self.weights.distill * t2)?)?;
        Ok(Some(PolicyLoss { overall_loss: overall, loss_components: vec![LossComponent { name: "Distill Loss".into(), value: kd }] }))
    }

    fn on_epoch_end(&mut self, _: &mut PolicyContext, _: &crate::metrics::Metrics) -> Result<()> {
        self.active = false;
        Ok(())
    }
}
