//! Classification metrics as Distiller reports them: loss, top-1 and top-5 accuracy in percent.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Loss and accuracy over a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean cross-entropy per sample.
    pub loss: f64,
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent (top-k with k = classes when there are fewer than 5).
    pub top5: f64,
}

/// ```
/// let m = distill::metrics::Metrics { loss: 0.111748, top1: 97.4, top5: 100.0 };
/// assert_eq!(m.to_string(), "top-1 97.40%  top-5 100.00%  loss 0.1117");
/// ```
impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "top-1 {:.2}%  top-5 {:.2}%  loss {:.4}", self.top1, self.top5, self.loss)
    }
}

/// Accumulates [`Metrics`] over mini-batches, weighting each batch by its size.
///
/// Distiller averages batch losses without weights, which over-weights a short last batch; the per-sample
/// mean here is the quantity the name promises.
#[derive(Debug, Clone, Default)]
pub struct MetricsAccumulator {
    loss_sum: f64,
    correct1: i64,
    correct5: i64,
    samples: i64,
}

impl MetricsAccumulator {
    /// Adds one batch: `logits` `[N, classes]`, `labels` `[N]`, and the batch's mean loss.
    pub fn add(&mut self, logits: &Tensor, labels: &Tensor, mean_loss: f64) -> Result<()> {
        let n = labels.size()[0];
        self.correct1 += topk_correct(logits, labels, 1)?;
        self.correct5 += topk_correct(logits, labels, 5)?;
        self.loss_sum += mean_loss * n as f64;
        self.samples += n;
        Ok(())
    }

    /// The running sums: loss × samples, top-1 hits, top-5 hits and samples (data-parallel training adds them
    /// across ranks).
    pub fn sums(&self) -> [f64; 4] {
        [self.loss_sum, self.correct1 as f64, self.correct5 as f64, self.samples as f64]
    }

    /// An accumulator holding [`MetricsAccumulator::sums`].
    pub fn from_sums(sums: [f64; 4]) -> Self {
        MetricsAccumulator { loss_sum: sums[0], correct1: sums[1] as i64, correct5: sums[2] as i64, samples: sums[3] as i64 }
    }

    /// Samples seen so far.
    pub fn samples(&self) -> i64 {
        self.samples
    }

    /// The metrics so far (zeros before the first batch).
    pub fn metrics(&self) -> Metrics {
        if self.samples == 0 {
            return Metrics::default();
        }
        let n = self.samples as f64;
        Metrics { loss: self.loss_sum / n, top1: 100.0 * self.correct1 as f64 / n, top5: 100.0 * self.correct5 as f64 / n }
    }
}

/// How many rows of `logits` `[N, C]` have their label among the `k` highest scores (`k` capped at `C`).
pub fn topk_correct(logits: &Tensor, labels: &Tensor, k: i64) -> Result<i64> {
    let size = logits.size();
    if size.len() != 2 || labels.size() != [size[0]] {
        return Err(Error::Shape(format!("top-k needs logits [N, C] and labels [N], got {size:?} and {:?}", labels.size())));
    }
    let k = k.min(size[1]);
    let (_, idx) = logits.f_topk(k, 1, true, true)?;
    let hits = idx.f_eq_tensor(&labels.f_unsqueeze(1)?)?.f_any_dim(1, false)?;
    Ok(hits.f_sum(Kind::Int64)?.f_int64_value(&[])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_top5_and_weighted_loss() {
        // 3 samples, 6 classes; label ranks: 1st, 3rd, 6th.
        let logits = Tensor::from_slice(&[
            9.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, //
            1.0, 2.0, 9.0, 8.0, 3.0, 0.0, //
            6.0, 5.0, 4.0, 3.0, 2.0, 1.0,
        ])
        .view([3, 6]);
        let labels = Tensor::from_slice(&[0i64, 4, 5]);
        assert_eq!(topk_correct(&logits, &labels, 1).unwrap(), 1);
        assert_eq!(topk_correct(&logits, &labels, 5).unwrap(), 2);
        let mut acc = MetricsAccumulator::default();
        acc.add(&logits, &labels, 2.0).unwrap();
        acc.add(&logits.narrow(0, 0, 1), &labels.narrow(0, 0, 1), 0.0).unwrap();
        let m = acc.metrics();
        assert_eq!(m.loss, 6.0 / 4.0);
        assert_eq!(m.top1, 50.0);
        assert_eq!(m.top5, 75.0);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let err = topk_correct(&Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)), &Tensor::from_slice(&[0i64]), 1);
        assert!(err.unwrap_err().to_string().contains("top-k needs"));
    }
}
