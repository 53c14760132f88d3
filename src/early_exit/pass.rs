//! The state an early-exit forward pass carries through the tree (`Forward::with_state`): what each
//! [`BranchPoint`](super::BranchPoint) does with its exit's output.
use tch::{Kind, Tensor};

use super::ExitCriterion;
use crate::nn::Model;
use crate::{Error, Result};

enum Mode {
    /// Keep every exit's output for the whole batch (training, and Distiller's validation).
    Collect,
    /// Per sample, leave at the first exit whose score is below its threshold; the trunk goes on with the rest.
    Skip { criterion: ExitCriterion, thresholds: Vec<f64> },
    /// Take the first remaining sample out at the exit called this (the cut check of `attach_exits`).
    Force(String),
}

pub(crate) struct ExitPass {
    mode: Mode,
    /// Exits in the order the pass reached them.
    pub(crate) reached: Vec<String>,
    /// Collect mode: each exit's output.
    pub(crate) outputs: Vec<Tensor>,
    /// Skip and force modes: the batch rows still in the trunk.
    pub(crate) remaining: Tensor,
    targets: Option<Tensor>,
    /// Skip and force modes: per exit, the rows that left there and their outputs.
    pub(crate) taken: Vec<(Tensor, Tensor)>,
    /// Skip mode: every sample has left, and the pass was stopped there.
    pub(crate) stopped: bool,
}

impl ExitPass {
    fn new(mode: Mode, batch: i64, device: tch::Device, targets: Option<Tensor>) -> Result<Self> {
        let remaining = Tensor::f_arange(batch, (Kind::Int64, device))?;
        Ok(ExitPass { mode, reached: Vec::new(), outputs: Vec::new(), remaining, targets, taken: Vec::new(), stopped: false })
    }

    pub(crate) fn collect(batch: i64, device: tch::Device) -> Result<Self> {
        Self::new(Mode::Collect, batch, device, None)
    }

    pub(crate) fn skip(criterion: ExitCriterion, thresholds: Vec<f64>, batch: i64, device: tch::Device, targets: Option<Tensor>) -> Result<Self> {
        if criterion == ExitCriterion::CrossEntropy && targets.is_none() {
            return Err(Error::invalid(
                "exit criterion",
                "Distiller's cross-entropy criterion compares each exit with the true label, which a deployed model does not have; use ExitCriterion::Entropy to decide without labels",
            ));
        }
        Self::new(Mode::Skip { criterion, thresholds }, batch, device, targets)
    }

    fn force(at: &str, batch: i64, device: tch::Device) -> Result<Self> {
        Self::new(Mode::Force(at.to_string()), batch, device, None)
    }

    /// Called by the exit `name` with its output and the trunk's; returns what the trunk goes on with.
    pub(crate) fn at_exit(&mut self, name: &str, exit: Tensor, trunk: Tensor) -> Result<Tensor> {
        self.reached.push(name.to_string());
        let leave = match &self.mode {
            Mode::Collect => {
                self.outputs.push(exit);
                return Ok(trunk);
            }
            Mode::Skip { criterion, thresholds } => {
                let i = self.reached.len() - 1;
                let threshold = *thresholds.get(i).ok_or_else(|| {
                    Error::invalid("thresholds", format!("the pass reached exit {i} ('{name}') but only {} threshold(s) were given", thresholds.len()))
                })?;
                criterion.scores(&exit, self.targets.as_ref())?.f_lt(threshold)?
            }
            Mode::Force(at) => Tensor::f_arange(exit.size()[0], (Kind::Int64, exit.device()))?.f_lt(i64::from(at == name))?,
        };
        let out = leave.f_nonzero()?.f_squeeze_dim(1)?;
        let stay = leave.f_logical_not()?.f_nonzero()?.f_squeeze_dim(1)?;
        self.taken.push((self.remaining.f_index_select(0, &out)?, exit.f_index_select(0, &out)?));
        if out.size()[0] == 0 {
            return Ok(trunk);
        }
        if stay.size()[0] == 0 && matches!(self.mode, Mode::Skip { .. }) {
            // Nothing is left for the rest of the network: stop the pass here (the caller sees `stopped`), so a
            // batch that leaves whole costs nothing more, not even the dispatch of the remaining layers.
            self.stopped = true;
            self.remaining = self.remaining.f_index_select(0, &stay)?;
            return Err(Error::invalid("early exit", "every sample has left; the pass stops here"));
        }
        self.remaining = self.remaining.f_index_select(0, &stay)?;
        if let Some(t) = &self.targets {
            self.targets = Some(t.f_index_select(0, &stay)?);
        }
        Ok(trunk.f_index_select(0, &stay)?)
    }
}

/// Runs the model on `batch` zero samples in eval mode with `pass` as its state; gives back the output and the pass.
fn run_probe(model: &Model, pass: ExitPass, batch: i64) -> (Result<Tensor>, Option<ExitPass>) {
    let s = model.info().input_shape.clone();
    let x = match Tensor::f_zeros([batch, s[0], s[1], s[2]], (Kind::Float, model.device())) {
        Ok(x) => x,
        Err(e) => return (Err(e.into()), None),
    };
    let mut ctx = model.pass(false).with_state(pass);
    let out = tch::no_grad(|| model.forward_with(&x, &mut ctx));
    (out, ctx.take_state::<ExitPass>())
}

/// Puts the model's exit records in the order a forward pass reaches them, and checks that each exit is a cut of
/// the network: when one sample leaves there, the rest of the network runs on the others alone.
pub(crate) fn order_and_check_cuts(model: &mut Model) -> Result<()> {
    let (out, pass) = run_probe(model, ExitPass::collect(1, model.device())?, 1);
    let _ = out?;
    let reached = pass.map(|p| p.reached).unwrap_or_default();
    let mut specs = model.early_exits().to_vec();
    if let Some(missing) = specs.iter().find(|s| !reached.contains(&s.at)) {
        return Err(Error::invalid("exits", format!("the exit after '{}' is never reached by a forward pass", missing.at)));
    }
    specs.sort_by_key(|s| reached.iter().position(|r| *r == s.at));
    for spec in &specs {
        let (out, _) = run_probe(model, ExitPass::force(&spec.at, 3, model.device())?, 3);
        let rows = out.as_ref().map(|o| o.size().first().copied().unwrap_or(0));
        if !matches!(rows, Ok(2)) {
            let why = match out {
                Err(e) => format!(" ({e})"),
                Ok(_) => String::new(),
            };
            return Err(Error::invalid(
                "exits",
                format!(
                    "no exit can follow '{}': tensors computed before it are used after it (a residual connection), so samples leaving there could not skip the rest{why}; attach the exit where every path passes, e.g. after the last module of a block",
                    spec.at
                ),
            ));
        }
    }
    model.set_early_exits(specs);
    Ok(())
}
