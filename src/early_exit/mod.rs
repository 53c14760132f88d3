//! Early exit (Distiller's `early_exit.py`, after BranchyNet): classifiers attached part-way through a network, so
//! that easy samples leave early and skip the rest of it.
//!
//! * [`attach_exits`] puts a [`BranchPoint`] in place of each named module; the zoo's exits are
//!   [`crate::models::zoo_exits`] (Distiller's CIFAR ResNet exit after `layer1.2.relu2`).
//! * [`EarlyExit`] holds the loss weights and thresholds (`--earlyexit-lossweights`, `--earlyexit-thresholds`);
//!   with it in [`TrainConfig::early_exit`](crate::train::TrainConfig), training minimizes
//!   `Σ wᵢ·CE(exitᵢ) + (1 − Σ wᵢ)·CE(final)` ([`early_exit_loss`]) and validation reports [`ExitStats`].
//! * [`evaluate`] really skips: a sample that leaves at an exit is taken out of the batch there, and the rest of
//!   the network runs on the others only (Distiller computes every exit for every sample). [`exit_scores`] runs
//!   everything once and answers for any thresholds ([`ExitScores::stats`], [`ExitScores::sweep`]).
//!
//! Distiller decides with each exit's cross-entropy against the *true label* (`ExitCriterion::CrossEntropy`,
//! the default, for fidelity), which a deployed model cannot do; `ExitCriterion::Entropy` (BranchyNet's) decides
//! from the exit's own output.
//!
//! ```
//! use distill::early_exit::{attach_exits, early_exit_loss, forward_exits, ExitPoint};
//! let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! attach_exits(&mut model, &[ExitPoint::pooled("pool1", 2)])?;
//! let x = tch::Tensor::zeros([4, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
//! let out = forward_exits(&model, &x, true)?;
//! assert_eq!((out.exits.len(), out.final_.size()), (1, vec![4, 10]));
//! let loss = early_exit_loss(&out, &tch::Tensor::from_slice(&[0i64, 1, 2, 3]), &[0.3])?;
//! assert!(loss.double_value(&[]) > 0.0);
//! # Ok::<(), distill::Error>(())
//! ```
mod branch;
mod pass;
mod stats;

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

pub(crate) use branch::attach_spec;
pub use branch::{attach_exits, BranchPoint, ExitPoint, ExitSpec};
pub use stats::{evaluate, exit_costs, exit_scores, ExitCosts, ExitOutcome, ExitScores, ExitStats};

use crate::nn::Model;
use crate::{Error, Result};
use pass::ExitPass;

/// How an exit judges that a sample may leave: the sample leaves at the first exit whose score is below that
/// exit's threshold. Both scores are in nats; lower is more confident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ExitCriterion {
    /// Distiller's: the exit's cross-entropy against the true label. Needs labels, so it measures what an oracle
    /// that knows when an exit is right would save; a sample leaves only if the exit gives its label a
    /// probability above `exp(−threshold)`.
    #[default]
    CrossEntropy,
    /// BranchyNet's: the entropy of the exit's softmax, from the output alone (what a deployed model can use).
    Entropy,
}

impl ExitCriterion {
    /// Parses `ce` / `cross-entropy` or `entropy`.
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "ce" | "cross-entropy" | "crossentropy" => Ok(ExitCriterion::CrossEntropy),
            "entropy" => Ok(ExitCriterion::Entropy),
            other => Err(Error::unknown("exit criterion", other, ["ce", "entropy"])),
        }
    }

    /// Per-sample scores of `logits` `[N, C]` (`targets` `[N]` for cross-entropy).
    ///
    /// ```
    /// use distill::early_exit::ExitCriterion;
    /// let logits = tch::Tensor::from_slice(&[0.0f32, 0.0, 2.0, 0.0]).view([2, 2]);
    /// let ce = ExitCriterion::CrossEntropy.scores(&logits, Some(&tch::Tensor::from_slice(&[0i64, 0])))?;
    /// assert!((ce.double_value(&[0]) - 2f64.ln()).abs() < 1e-6);
    /// assert!((ce.double_value(&[1]) - (1.0 + (-2f64).exp()).ln()).abs() < 1e-6);
    /// let h = ExitCriterion::Entropy.scores(&logits, None)?;
    /// assert!((h.double_value(&[0]) - 2f64.ln()).abs() < 1e-6);
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn scores(&self, logits: &Tensor, targets: Option<&Tensor>) -> Result<Tensor> {
        let log_p = logits.f_to_kind(Kind::Float)?.f_log_softmax(1, Kind::Float)?;
        Ok(match self {
            ExitCriterion::CrossEntropy => {
                let t = targets.ok_or_else(|| Error::invalid("exit criterion", "cross-entropy needs the labels"))?;
                log_p.f_gather(1, &t.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?.f_neg()?
            }
            ExitCriterion::Entropy => log_p.f_exp()?.f_mul(&log_p)?.f_sum_dim_intlist(1, false, Kind::Float)?.f_neg()?,
        })
    }
}

/// Early-exit training and evaluation settings, one loss weight and one threshold per exit (the final classifier
/// has neither): Distiller's `--earlyexit-lossweights` and `--earlyexit-thresholds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyExit {
    /// Weight of each exit's cross-entropy in the training loss; they sum to less than 1, and the final
    /// classifier gets the rest.
    pub loss_weights: Vec<f64>,
    /// A sample leaves at the first exit whose score is below its threshold.
    pub thresholds: Vec<f64>,
    /// How exits score samples.
    pub criterion: ExitCriterion,
}

impl EarlyExit {
    /// Weights and thresholds, one per exit, with Distiller's cross-entropy criterion; checked as
    /// [`EarlyExit::check`] does.
    ///
    /// ```
    /// use distill::early_exit::EarlyExit;
    /// assert!(EarlyExit::new(vec![0.3], vec![0.8]).is_ok());
    /// assert!(EarlyExit::new(vec![0.6, 0.4], vec![0.8, 1.0]).unwrap_err().to_string().contains("sum"));
    /// assert!(EarlyExit::new(vec![0.3], vec![0.8, 1.0]).is_err());
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn new(loss_weights: Vec<f64>, thresholds: Vec<f64>) -> Result<Self> {
        let ee = EarlyExit { loss_weights, thresholds, criterion: ExitCriterion::CrossEntropy };
        ee.check()?;
        Ok(ee)
    }

    /// The same with another criterion.
    pub fn with_criterion(mut self, criterion: ExitCriterion) -> Self {
        self.criterion = criterion;
        self
    }

    /// Checks the values alone: as many weights as thresholds (at least one), weights finite and ≥ 0 summing to
    /// less than 1, thresholds finite and ≥ 0.
    pub fn check(&self) -> Result<()> {
        let (w, t) = (&self.loss_weights, &self.thresholds);
        if t.is_empty() || w.len() != t.len() {
            return Err(Error::invalid(
                "early exit",
                format!("{} loss weight(s) and {} threshold(s): give one of each per exit (the final classifier has neither)", w.len(), t.len()),
            ));
        }
        if let Some(bad) = w.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(Error::invalid("earlyexit_lossweights", format!("{bad} is not a weight; each must be finite and ≥ 0")));
        }
        let sum: f64 = w.iter().sum();
        if sum >= 1.0 {
            return Err(Error::invalid(
                "earlyexit_lossweights",
                format!("the weights {w:?} sum to {sum}; they must sum to less than 1, the final classifier's weight being 1 − sum"),
            ));
        }
        if let Some(bad) = t.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(Error::invalid("earlyexit_thresholds", format!("{bad}: thresholds are scores in nats, finite and ≥ 0 (0 means no sample leaves)")));
        }
        Ok(())
    }

    /// Checks the values against `model`'s exits: one weight and one threshold per exit.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        self.check()?;
        let exits = model.early_exits();
        if exits.len() != self.thresholds.len() {
            let names: Vec<&str> = exits.iter().map(|e| e.at.as_str()).collect();
            return Err(Error::invalid(
                "early exit",
                format!(
                    "{} threshold(s) and loss weight(s) for a model with {} exit(s) {names:?}; attach one exit per threshold (early_exit::attach_exits, `--earlyexit-at`)",
                    self.thresholds.len(),
                    exits.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Every exit's output and the final classifier's, for the whole batch.
#[derive(Debug)]
pub struct ExitOutputs {
    /// The exits' outputs, in the order the network reaches them.
    pub exits: Vec<Tensor>,
    /// The final classifier's output.
    pub final_: Tensor,
}

/// Runs `model` (train or eval mode) keeping every exit's output: what training and Distiller's validation see.
/// The model must have exits.
pub fn forward_exits(model: &Model, xs: &Tensor, train: bool) -> Result<ExitOutputs> {
    forward_exits_in(model, model.pass(train), xs)
}

/// [`forward_exits`] in a pass the caller set up ([`Model::pass`], with synchronized batch norms for instance).
pub fn forward_exits_in<'a>(model: &'a Model, pass: crate::nn::Forward<'a>, xs: &Tensor) -> Result<ExitOutputs> {
    let expected = model.early_exits().len();
    if expected == 0 {
        return Err(Error::invalid("early exit", format!("{} has no exits; attach them first (early_exit::attach_exits)", model.info().arch)));
    }
    let batch = xs.size().first().copied().unwrap_or(0);
    let mut ctx = pass.with_state(ExitPass::collect(batch, model.device())?);
    let final_ = model.forward_with(xs, &mut ctx)?;
    let pass = ctx.take_state::<ExitPass>().ok_or_else(|| Error::invalid("early exit", "the pass lost its state"))?;
    if pass.outputs.len() != expected {
        return Err(Error::invalid("early exit", format!("the forward pass reached {} of the model's {expected} exits", pass.outputs.len())));
    }
    Ok(ExitOutputs { exits: pass.outputs, final_ })
}

/// Distiller's `earlyexit_loss`: `Σ wᵢ·CE(exitᵢ) + (1 − Σ wᵢ)·CE(final)`, each cross-entropy a batch mean.
///
/// ```
/// use distill::early_exit::{early_exit_loss, ExitOutputs};
/// use tch::Tensor;
/// let exits = vec![Tensor::from_slice(&[0.0f32, 0.0]).view([1, 2])]; // CE = ln 2
/// let final_ = Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]); // CE = ln(1 + e⁻¹)
/// let loss = early_exit_loss(&ExitOutputs { exits, final_ }, &Tensor::from_slice(&[1i64]), &[0.25])?;
/// let expected = 0.25 * 2f64.ln() + 0.75 * (1.0 + (-1f64).exp()).ln();
/// assert!((loss.double_value(&[]) - expected).abs() < 1e-6);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn early_exit_loss(outputs: &ExitOutputs, targets: &Tensor, loss_weights: &[f64]) -> Result<Tensor> {
    if outputs.exits.len() != loss_weights.len() {
        return Err(Error::invalid("earlyexit_lossweights", format!("{} weight(s) for {} exit(s)", loss_weights.len(), outputs.exits.len())));
    }
    let ce = |logits: &Tensor| logits.f_cross_entropy_loss(targets, None::<Tensor>, Reduction::Mean, -100, 0.0);
    let mut loss = ce(&outputs.final_)?.f_mul_scalar(1.0 - loss_weights.iter().sum::<f64>())?;
    for (logits, w) in outputs.exits.iter().zip(loss_weights) {
        loss = loss.f_add(&ce(logits)?.f_mul_scalar(*w)?)?;
    }
    Ok(loss)
}

/// What an early-exit model answered for each sample, and where the sample left.
#[derive(Debug)]
pub struct ExitPrediction {
    /// The output each sample left with, `[N, classes]`.
    pub logits: Tensor,
    /// The exit each sample left at (`0..exits`; the number of exits for the final classifier), `[N]`.
    pub exit: Tensor,
}

/// Runs `model` in eval mode without gradients, each sample leaving at the first exit whose score is below its
/// threshold; the rest of the network runs only on the samples still in it. `targets` are needed by the
/// cross-entropy criterion only.
///
/// ```
/// use distill::early_exit::{attach_exits, predict, EarlyExit, ExitCriterion, ExitPoint};
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// attach_exits(&mut model, &[ExitPoint::pooled("pool1", 2)])?;
/// let x = tch::Tensor::zeros([3, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
/// // The entropy of 10 classes is at most ln 10 ≈ 2.303, so a threshold of 3 lets every sample leave.
/// let ee = EarlyExit::new(vec![0.3], vec![3.0])?.with_criterion(ExitCriterion::Entropy);
/// let p = predict(&mut model, &x, &ee, None)?;
/// assert_eq!(Vec::<i64>::try_from(&p.exit)?, [0, 0, 0]);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn predict(model: &mut Model, xs: &Tensor, config: &EarlyExit, targets: Option<&Tensor>) -> Result<ExitPrediction> {
    config.check_model(model)?;
    let was_training = model.is_training();
    model.eval();
    let result = tch::no_grad(|| predict_eval(model, xs, config, targets));
    if was_training {
        model.train();
    }
    result
}

fn predict_eval(model: &Model, xs: &Tensor, config: &EarlyExit, targets: Option<&Tensor>) -> Result<ExitPrediction> {
    let batch = xs.size().first().copied().unwrap_or(0);
    let device = model.device();
    let pass = ExitPass::skip(config.criterion, config.thresholds.clone(), batch, device, targets.map(|t| t.shallow_clone()))?;
    let mut ctx = model.pass(false).with_state(pass);
    let result = model.forward_with(xs, &mut ctx);
    let pass = ctx.take_state::<ExitPass>().ok_or_else(|| Error::invalid("early exit", "the pass lost its state"))?;
    let final_ = match result {
        Ok(out) => Some(out),
        Err(_) if pass.stopped => None,
        Err(e) => return Err(e),
    };
    let kind = final_.as_ref().or(pass.taken.first().map(|(_, out)| out)).map_or(Kind::Float, |t| t.kind());
    let mut logits = Tensor::f_zeros([batch, model.info().num_classes], (kind, device))?;
    let mut exit = Tensor::f_full([batch], model.early_exits().len() as i64, (Kind::Int64, device))?;
    for (i, (rows, out)) in pass.taken.iter().enumerate() {
        let _ = logits.f_index_copy_(0, rows, out)?;
        let _ = exit.f_index_fill_(0, rows, i as i64)?;
    }
    if let Some(out) = final_ {
        let _ = logits.f_index_copy_(0, &pass.remaining, &out)?;
    }
    Ok(ExitPrediction { logits, exit })
}
