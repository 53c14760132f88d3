//! Evaluating a model on a dataset split, keeping what a closer look needs: per-class accuracy and per-sample
//! predictions (Distiller's `--evaluate`, with the tables it lacked).
use polars::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::data::Dataset;
use crate::metrics::Metrics;
use crate::nn::Model;
use crate::Result;

/// The result of [`evaluate`]: the metrics, and every sample's logits and label (on the CPU).
#[derive(Debug)]
pub struct Evaluation {
    /// Loss, top-1 and top-5 over the whole split.
    pub metrics: Metrics,
    /// `[samples, classes]`.
    pub logits: Tensor,
    /// `[samples]`.
    pub labels: Tensor,
}

/// Evaluates `model` on `data` in eval mode without gradients, as [`validate`](super::validate) does, and keeps
/// the logits.
///
/// ```
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// let data = distill::data::Dataset::synthetic(50, [1, 28, 28], 10, 1)?;
/// let eval = distill::train::evaluate(&mut model, &data, 16)?;
/// assert_eq!(eval.samples(), 50);
/// let per_class = eval.per_class()?;
/// assert_eq!(per_class.height(), 10);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn evaluate(model: &mut Model, data: &Dataset, batch_size: usize) -> Result<Evaluation> {
    let (mut logits, mut labels) = (Vec::new(), Vec::new());
    let metrics = super::eval_pass(model, data, batch_size, |l, y| {
        logits.push(l.f_to_device(Device::Cpu)?);
        labels.push(y.f_to_device(Device::Cpu)?);
        Ok(())
    })?;
    let classes = model.info().num_classes;
    let logits = if logits.is_empty() { Tensor::f_zeros([0, classes], (Kind::Float, Device::Cpu))? } else { Tensor::f_cat(&logits, 0)? };
    let labels = if labels.is_empty() { Tensor::f_zeros([0], (Kind::Int64, Device::Cpu))? } else { Tensor::f_cat(&labels, 0)? };
    Ok(Evaluation { metrics, logits, labels })
}

impl Evaluation {
    /// Number of samples evaluated.
    pub fn samples(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// One row per class: `Class`, `Samples`, `Correct`, `Top1 (%)` (null for a class with no sample).
    pub fn per_class(&self) -> Result<DataFrame> {
        let classes = self.logits.size()[1];
        let predicted = self.logits.f_argmax(1, false)?;
        let correct = predicted.f_eq_tensor(&self.labels)?.f_to_kind(Kind::Int64)?;
        let count = |weights: Option<&Tensor>| -> Result<Vec<i64>> {
            Ok(Vec::<i64>::try_from(self.labels.f_bincount(weights, classes)?.f_to_kind(Kind::Int64)?)?)
        };
        let (samples, hits) = (count(None)?, count(Some(&correct.f_to_kind(Kind::Double)?))?);
        let top1: Vec<Option<f64>> = samples.iter().zip(&hits).map(|(&n, &c)| (n > 0).then(|| 100.0 * c as f64 / n as f64)).collect();
        Ok(df!("Class" => (0..classes).collect::<Vec<i64>>(), "Samples" => samples, "Correct" => hits, "Top1 (%)" => top1)?)
    }

    /// One row per sample: `Sample`, `Label`, `Predicted`, then `Top2` … `Top{k}` (the next most likely classes)
    /// and `Confidence` (the softmax probability of the predicted class).
    pub fn predictions(&self, k: i64) -> Result<DataFrame> {
        let k = k.clamp(1, self.logits.size()[1]);
        let (_, top) = self.logits.f_topk(k, 1, true, true)?;
        let confidence = self.logits.f_softmax(1, Kind::Double)?.f_amax([1], false)?;
        let mut columns = vec![
            Column::new("Sample".into(), (0..self.samples() as i64).collect::<Vec<i64>>()),
            Column::new("Label".into(), Vec::<i64>::try_from(&self.labels)?),
        ];
        for j in 0..k {
            let name = if j == 0 { "Predicted".to_string() } else { format!("Top{}", j + 1) };
            columns.push(Column::new(name.into(), Vec::<i64>::try_from(top.f_select(1, j)?)?));
        }
        columns.push(Column::new("Confidence".into(), Vec::<f64>::try_from(confidence)?));
        Ok(DataFrame::new(self.samples(), columns)?)
    }
}
