//! What early exit achieves on a data set: samples per exit, accuracy per exit and overall (Distiller's
//! `earlyexit_validate_stats`), and the compute the exits save.
use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use super::{forward_exits, predict_eval, EarlyExit, ExitCriterion};
use crate::data::Dataset;
use crate::metrics::Metrics;
use crate::nn::Model;
use crate::summary::tables::{column, model_performance_summary};
use crate::{Error, Result};

/// Multiply-accumulates per sample of a model with exits (Conv2d and Linear layers, as
/// [`model_performance_summary`] counts them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCosts {
    /// The exits' modules, then `final`.
    pub names: Vec<String>,
    /// What a sample leaving at each exit cost: the network up to the exit and every exit head on the way; the
    /// last entry is the whole network with all its heads.
    pub macs: Vec<i64>,
    /// The network without its exits.
    pub without_exits: i64,
}

/// The cost of leaving at each exit of `model` (one eval pass of a zero sample).
///
/// ```
/// use distill::early_exit::{attach_exits, exit_costs, ExitPoint};
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// attach_exits(&mut model, &[ExitPoint::pooled("pool1", 2)])?;
/// let costs = exit_costs(&mut model)?;
/// // conv1: 6 filters × 28 × 28 outputs × 25 taps; the exit's Linear: 294 × 10.
/// assert_eq!(costs.macs[0], 6 * 28 * 28 * 25 + 294 * 10);
/// assert_eq!(costs.macs[1], costs.without_exits + 294 * 10);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn exit_costs(model: &mut Model) -> Result<ExitCosts> {
    let exits: Vec<String> = model.early_exits().iter().map(|e| e.at.clone()).collect();
    let df = model_performance_summary(model, 1)?;
    let names: Vec<String> = column(&df, "Name")?.str()?.iter().map(|v| v.unwrap_or("").to_string()).collect();
    let macs: Vec<i64> = column(&df, "MACs")?.i64()?.iter().map(|v| v.unwrap_or(0)).collect();
    let in_exit = |row: &str, at: &str| row.starts_with(&format!("{at}.branch_net."));
    let mut out = Vec::new();
    for at in &exits {
        let last = names.iter().rposition(|n| in_exit(n, at)).ok_or_else(|| Error::invalid("exit costs", format!("the exit after '{at}' has no layer")))?;
        out.push(macs[..=last].iter().sum());
    }
    out.push(macs.iter().sum());
    let without_exits = names.iter().zip(&macs).filter(|(n, _)| !exits.iter().any(|at| in_exit(n, at))).map(|(_, m)| m).sum();
    let mut labels = exits;
    labels.push("final".to_string());
    Ok(ExitCosts { names: labels, macs: out, without_exits })
}

/// One exit's share of a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitOutcome {
    /// The exit's module, or `final`.
    pub exit: String,
    /// Samples that left here.
    pub taken: i64,
    /// Their share of all samples, %.
    pub percent: f64,
    /// Top-1 accuracy on the samples that left here, % (`None` when none did).
    pub top1: Option<f64>,
    /// Top-5 accuracy on them, %.
    pub top5: Option<f64>,
    /// What a sample leaving here cost, in MACs.
    pub macs: i64,
}

/// Early-exit results on a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitStats {
    /// Per exit, the final classifier last.
    pub exits: Vec<ExitOutcome>,
    /// The network with its exits: top-1 and top-5 are Distiller's totals (`Σ top1ᵢ · takenᵢ / total`); the loss
    /// is the mean cross-entropy of the outputs the samples left with.
    pub overall: Metrics,
    /// Mean MACs per sample.
    pub macs_per_sample: f64,
    /// MACs of the network without its exits.
    pub macs_without_exits: i64,
}

impl ExitStats {
    /// The compute saved against the network without exits, as a fraction (negative when the heads cost more
    /// than the samples that leave save).
    pub fn macs_saved(&self) -> f64 {
        if self.macs_without_exits == 0 {
            return 0.0;
        }
        1.0 - self.macs_per_sample / self.macs_without_exits as f64
    }

    /// Distiller's log lines (`earlyexit_validate_stats`): `Exit 0: 312`, `Percent Early Exit 0: 62.400`,
    /// `Accuracy Stats for exit 0: top1 = 98.718, top5 = 100.000`, ..., `Totals for entire network with early
    /// exits: top1 = 97.600, top5 = 99.800`; then the compute line Distiller does not have.
    pub fn log_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (i, e) in self.exits.iter().enumerate().filter(|(_, e)| e.taken > 0) {
            lines.push(format!("Exit {i}: {}", e.taken));
        }
        for (i, e) in self.exits.iter().enumerate().filter(|(_, e)| e.taken > 0) {
            lines.push(format!("Percent Early Exit {i}: {:.3}", e.percent));
        }
        for (i, e) in self.exits.iter().enumerate() {
            lines.push(format!("Accuracy Stats for exit {i}: top1 = {:.3}, top5 = {:.3}", e.top1.unwrap_or(0.0), e.top5.unwrap_or(0.0)));
        }
        lines.push(format!("Totals for entire network with early exits: top1 = {:.3}, top5 = {:.3}", self.overall.top1, self.overall.top5));
        lines.push(format!(
            "MACs per sample: {:.0} of {} without exits ({:.1}% saved)",
            self.macs_per_sample,
            self.macs_without_exits,
            100.0 * self.macs_saved()
        ));
        lines
    }

    /// One row per exit: `Exit`, `Taken`, `Percent`, `Top1`, `Top5`, `MACs`.
    pub fn frame(&self) -> Result<DataFrame> {
        let e = &self.exits;
        let columns = vec![
            Column::new("Exit".into(), e.iter().map(|x| x.exit.clone()).collect::<Vec<_>>()),
            Column::new("Taken".into(), e.iter().map(|x| x.taken).collect::<Vec<_>>()),
            Column::new("Percent".into(), e.iter().map(|x| x.percent).collect::<Vec<_>>()),
            Column::new("Top1".into(), e.iter().map(|x| x.top1).collect::<Vec<_>>()),
            Column::new("Top5".into(), e.iter().map(|x| x.top5).collect::<Vec<_>>()),
            Column::new("MACs".into(), e.iter().map(|x| x.macs).collect::<Vec<_>>()),
        ];
        Ok(DataFrame::new(e.len(), columns)?)
    }

    /// The figures logged per epoch (`metrics.csv`, TensorBoard): `Exit i Percent`, `Exit i Top1` per exit, then
    /// `MACs Saved` (%).
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for (i, e) in self.exits.iter().enumerate() {
            out.push((format!("Exit {i} Percent"), e.percent));
            out.push((format!("Exit {i} Top1"), e.top1.unwrap_or(f64::NAN)));
        }
        out.push(("MACs Saved".to_string(), 100.0 * self.macs_saved()));
        out
    }
}

/// Counts per exit, accumulated sample by sample.
struct Tally {
    taken: Vec<i64>,
    correct1: Vec<i64>,
    correct5: Vec<i64>,
    loss_sum: f64,
}

impl Tally {
    fn new(exits: usize) -> Self {
        Tally { taken: vec![0; exits], correct1: vec![0; exits], correct5: vec![0; exits], loss_sum: 0.0 }
    }

    fn add(&mut self, exit: usize, hit1: bool, hit5: bool, loss: f64) {
        self.taken[exit] += 1;
        self.correct1[exit] += i64::from(hit1);
        self.correct5[exit] += i64::from(hit5);
        self.loss_sum += loss;
    }

    fn finish(self, costs: &ExitCosts) -> ExitStats {
        let total: i64 = self.taken.iter().sum();
        let n = total.max(1) as f64;
        let pct = |c: i64, of: i64| (of > 0).then(|| 100.0 * c as f64 / of as f64);
        let exits: Vec<ExitOutcome> = (0..self.taken.len())
            .map(|i| ExitOutcome {
                exit: costs.names[i].clone(),
                taken: self.taken[i],
                percent: 100.0 * self.taken[i] as f64 / n,
                top1: pct(self.correct1[i], self.taken[i]),
                top5: pct(self.correct5[i], self.taken[i]),
                macs: costs.macs[i],
            })
            .collect();
        // Distiller's total: Σ top1ᵢ · takenᵢ / total, which is the share of all samples answered right.
        let total_of = |per: &dyn Fn(&ExitOutcome) -> Option<f64>| exits.iter().map(|e| per(e).unwrap_or(0.0) * e.taken as f64 / n).sum();
        let overall = Metrics { loss: self.loss_sum / n, top1: total_of(&|e| e.top1), top5: total_of(&|e| e.top5) };
        let macs_per_sample = exits.iter().map(|e| e.macs as f64 * e.taken as f64).sum::<f64>() / n;
        ExitStats { exits, overall, macs_per_sample, macs_without_exits: costs.without_exits }
    }
}

/// Per sample: cross-entropy, top-1 hit, top-5 hit of `logits` against `targets`.
fn per_sample(logits: &Tensor, targets: &Tensor) -> Result<(Vec<f64>, Vec<bool>, Vec<bool>)> {
    let ce = logits.f_cross_entropy_loss(targets, None::<Tensor>, Reduction::None, -100, 0.0)?;
    let k = 5.min(logits.size().get(1).copied().unwrap_or(1));
    let (_, idx) = logits.f_topk(k, 1, true, true)?;
    let hits = idx.f_eq_tensor(&targets.f_unsqueeze(1)?)?;
    let hit1 = hits.f_narrow(1, 0, 1)?.f_any_dim(1, false)?;
    let hit5 = hits.f_any_dim(1, false)?;
    let to_bools = |t: Tensor| -> Result<Vec<bool>> {
        Ok(Vec::<i64>::try_from(&t.f_to_kind(Kind::Int64)?.f_to_device(tch::Device::Cpu)?)?.into_iter().map(|v| v != 0).collect())
    };
    let ce = Vec::<f64>::try_from(&ce.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?;
    Ok((ce, to_bools(hit1)?, to_bools(hit5)?))
}

/// Runs `model` over `data` as deployed: in eval mode, each sample leaving at its first confident exit and the
/// rest of the network running only on the samples still in it ([`super::predict`]); returns Distiller's
/// per-exit statistics and the compute used.
pub fn evaluate(model: &mut Model, data: &Dataset, batch_size: usize, config: &EarlyExit) -> Result<ExitStats> {
    config.check_model(model)?;
    let costs = exit_costs(model)?;
    let was_training = model.is_training();
    model.eval();
    let result = tch::no_grad(|| -> Result<ExitStats> {
        let mut tally = Tally::new(costs.names.len());
        for batch in data.batches(batch_size, model.device())? {
            let (x, y) = batch?;
            let p = predict_eval(model, &x, config, Some(&y))?;
            let (ce, hit1, hit5) = per_sample(&p.logits, &y)?;
            let exit = Vec::<i64>::try_from(&p.exit.f_to_device(tch::Device::Cpu)?)?;
            for i in 0..exit.len() {
                tally.add(exit[i] as usize, hit1[i], hit5[i], ce[i]);
            }
        }
        Ok(tally.finish(&costs))
    });
    if was_training {
        model.train();
    }
    result
}

/// Every exit's verdict on every sample of a data set, from one pass that runs all exits on all samples: the
/// statistics for any thresholds follow without running the model again.
#[derive(Debug, Clone)]
pub struct ExitScores {
    /// Per exit, then the final classifier: each sample's cross-entropy against its label.
    pub cross_entropy: Vec<Vec<f64>>,
    /// Per exit, then the final classifier: each sample's softmax entropy.
    pub entropy: Vec<Vec<f64>>,
    /// Per exit, then the final classifier: whether each sample's label is the top-1 answer.
    pub hit1: Vec<Vec<bool>>,
    /// The same for top-5.
    pub hit5: Vec<Vec<bool>>,
    /// What leaving at each exit costs.
    pub costs: ExitCosts,
}

/// Runs every exit of `model` on every sample of `data` (eval mode, no gradients), as Distiller's validation does.
pub fn exit_scores(model: &mut Model, data: &Dataset, batch_size: usize) -> Result<ExitScores> {
    let costs = exit_costs(model)?;
    let was_training = model.is_training();
    model.eval();
    let result = tch::no_grad(|| -> Result<ExitScores> {
        let outputs = costs.names.len();
        let mut s = ExitScores {
            cross_entropy: vec![Vec::new(); outputs],
            entropy: vec![Vec::new(); outputs],
            hit1: vec![Vec::new(); outputs],
            hit5: vec![Vec::new(); outputs],
            costs: costs.clone(),
        };
        for batch in data.batches(batch_size, model.device())? {
            let (x, y) = batch?;
            let out = forward_exits(model, &x, false)?;
            for (i, logits) in out.exits.iter().chain(std::iter::once(&out.final_)).enumerate() {
                let (ce, h1, h5) = per_sample(logits, &y)?;
                let h = ExitCriterion::Entropy.scores(logits, None)?;
                s.cross_entropy[i].extend(ce);
                s.entropy[i].extend(Vec::<f64>::try_from(&h.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?);
                s.hit1[i].extend(h1);
                s.hit5[i].extend(h5);
            }
        }
        Ok(s)
    });
    if was_training {
        model.train();
    }
    result
}

impl ExitScores {
    /// Samples scored.
    pub fn len(&self) -> usize {
        self.hit1.first().map_or(0, Vec::len)
    }

    /// Whether no sample was scored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn scores(&self, criterion: ExitCriterion) -> &[Vec<f64>] {
        match criterion {
            ExitCriterion::CrossEntropy => &self.cross_entropy,
            ExitCriterion::Entropy => &self.entropy,
        }
    }

    /// The statistics [`evaluate`] gives for `thresholds` (one per exit) under `criterion`, Distiller's decision
    /// rule: each sample leaves at the first exit whose score is below its threshold.
    pub fn stats(&self, criterion: ExitCriterion, thresholds: &[f64]) -> Result<ExitStats> {
        let exits = self.costs.names.len() - 1;
        if thresholds.len() != exits {
            return Err(Error::invalid("thresholds", format!("{} threshold(s) for {exits} exit(s)", thresholds.len())));
        }
        let scores = self.scores(criterion);
        let mut tally = Tally::new(exits + 1);
        for sample in 0..self.len() {
            let exit = (0..exits).find(|&i| scores[i][sample] < thresholds[i]).unwrap_or(exits);
            tally.add(exit, self.hit1[exit][sample], self.hit5[exit][sample], self.cross_entropy[exit][sample]);
        }
        Ok(tally.finish(&self.costs))
    }

    /// The threshold where `fraction` of the samples score below it at `exit` (a quantile of that exit's scores):
    /// about that share of samples would leave there if it were the first exit.
    pub fn quantile(&self, criterion: ExitCriterion, exit: usize, fraction: f64) -> Result<f64> {
        let scores = self.scores(criterion).get(exit).ok_or_else(|| Error::invalid("exit", format!("{exit} is not an exit index")))?;
        if scores.is_empty() || !(0.0..=1.0).contains(&fraction) {
            return Err(Error::invalid("quantile", format!("fraction {fraction} of {} scores: give a fraction in [0, 1] of a non-empty set", scores.len())));
        }
        let mut sorted = scores.clone();
        sorted.sort_by(f64::total_cmp);
        let k = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        // Just above the k-th smallest score, so exactly the k lowest are below it (ties aside); scores are ≥ 0 up
        // to rounding, and so are thresholds.
        let x = sorted[k - 1].max(0.0);
        Ok(if x.is_finite() { f64::from_bits(x.to_bits() + 1) } else { x })
    }

    /// The trade-off over `thresholds`, the same threshold at every exit: one row per threshold with `threshold`,
    /// `exit{i}_percent` for each exit and the final classifier, `top1`, `top5`, `macs_per_sample` and
    /// `macs_saved` (%).
    pub fn sweep(&self, criterion: ExitCriterion, thresholds: &[f64]) -> Result<DataFrame> {
        let exits = self.costs.names.len() - 1;
        let rows: Vec<ExitStats> = thresholds.iter().map(|&t| self.stats(criterion, &vec![t; exits])).collect::<Result<_>>()?;
        let mut columns = vec![Column::new("threshold".into(), thresholds.to_vec())];
        for i in 0..=exits {
            columns.push(Column::new(format!("exit{i}_percent").into(), rows.iter().map(|r| r.exits[i].percent).collect::<Vec<_>>()));
        }
        columns.push(Column::new("top1".into(), rows.iter().map(|r| r.overall.top1).collect::<Vec<_>>()));
        columns.push(Column::new("top5".into(), rows.iter().map(|r| r.overall.top5).collect::<Vec<_>>()));
        columns.push(Column::new("macs_per_sample".into(), rows.iter().map(|r| r.macs_per_sample).collect::<Vec<_>>()));
        columns.push(Column::new("macs_saved".into(), rows.iter().map(|r| 100.0 * r.macs_saved()).collect::<Vec<_>>()));
        Ok(DataFrame::new(thresholds.len(), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> ExitCosts {
        ExitCosts { names: vec!["pool1".into(), "final".into()], macs: vec![100, 1010], without_exits: 1000 }
    }

    #[test]
    fn distiller_totals_weight_each_exit_by_its_share() {
        // Exit 0 takes 3 samples (2 right), the final classifier 1 (right): top1 = 66.67 × 3/4 + 100 × 1/4 = 75.
        let mut t = Tally::new(2);
        t.add(0, true, true, 0.1);
        t.add(0, false, true, 0.5);
        t.add(0, true, true, 0.2);
        t.add(1, true, true, 0.4);
        let s = t.finish(&costs());
        assert_eq!(s.exits[0].taken, 3);
        assert_eq!(s.exits[0].percent, 75.0);
        assert!((s.exits[0].top1.unwrap() - 200.0 / 3.0).abs() < 1e-12);
        assert!((s.overall.top1 - 75.0).abs() < 1e-12);
        assert_eq!(s.overall.top5, 100.0);
        assert!((s.overall.loss - 0.3).abs() < 1e-12);
        assert_eq!(s.macs_per_sample, (3.0 * 100.0 + 1010.0) / 4.0);
        assert!((s.macs_saved() - (1.0 - 327.5 / 1000.0)).abs() < 1e-12);
        assert_eq!(s.log_lines()[..4], ["Exit 0: 3", "Exit 1: 1", "Percent Early Exit 0: 75.000", "Percent Early Exit 1: 25.000"]);
        assert_eq!(s.log_lines()[6], "Totals for entire network with early exits: top1 = 75.000, top5 = 100.000");
    }

    #[test]
    fn each_sample_leaves_at_its_first_exit_below_threshold() {
        // Two exits and the final classifier, four samples.
        let scores = ExitScores {
            cross_entropy: vec![vec![0.1, 0.9, 0.9, 0.5], vec![0.9, 0.2, 0.9, 0.1], vec![0.3, 0.3, 0.3, 0.3]],
            entropy: vec![vec![0.0; 4]; 3],
            hit1: vec![vec![true, false, false, false], vec![false, true, false, true], vec![false, false, true, false]],
            hit5: vec![vec![true; 4]; 3],
            costs: ExitCosts { names: vec!["a".into(), "b".into(), "final".into()], macs: vec![1, 2, 3], without_exits: 3 },
        };
        // Thresholds 0.5 and 0.3: sample 0 leaves at exit 0 (0.1 < 0.5); sample 3 scores 0.5 at exit 0, not below
        // 0.5, and leaves at exit 1 (0.1 < 0.3); sample 1 at exit 1; sample 2 reaches the end.
        let s = scores.stats(ExitCriterion::CrossEntropy, &[0.5, 0.3]).unwrap();
        assert_eq!(s.exits.iter().map(|e| e.taken).collect::<Vec<_>>(), [1, 2, 1]);
        assert_eq!(s.overall.top1, 100.0);
        // Every score of the entropy criterion is 0 here, so everything leaves at the first exit.
        let s = scores.stats(ExitCriterion::Entropy, &[0.5, 0.3]).unwrap();
        assert_eq!(s.exits[0].taken, 4);
        assert_eq!(s.overall.top1, 25.0);
        assert!(scores.stats(ExitCriterion::Entropy, &[0.5]).is_err());
        assert_eq!(scores.quantile(ExitCriterion::CrossEntropy, 0, 0.5).unwrap(), f64::from_bits(0.5f64.to_bits() + 1));
    }
}
