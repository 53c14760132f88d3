//! Histograms of what each layer outputs, Distiller's `ActivationHistogramsCollector` (its
//! `activation_histograms` notebook): a first pass over the data finds each layer's output range, a second counts
//! the outputs in equal-width buckets over it. Quantization reads them to see how much of a range the values use:
//! a ReLU's output is mostly zeros and a long, thin tail, so a min/max range spends most of its levels on a few
//! outliers.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use polars::prelude::*;
use tch::{Kind, Tensor};

use crate::data::Dataset;
use crate::nn::{normalize_name, run_observed, Model, ModuleCall, Observer};
use crate::{Error, Result};

/// What one pass of [`activation_histograms`] records for every layer it watches.
enum Pass {
    /// Minimum, maximum, count and zeros of the outputs.
    Range(HashMap<String, (f64, f64, i64, i64)>),
    /// Bucket counts over the ranges of the first pass.
    Counts { ranges: HashMap<String, (f64, f64)>, counts: HashMap<String, Vec<f64>> },
}

struct Collector {
    /// The layers to watch; empty: every leaf module.
    wanted: Vec<String>,
    /// The watched layers in the order they first ran.
    order: Vec<String>,
    bins: usize,
    pass: Pass,
    error: Option<Error>,
}

impl Collector {
    fn watches(&self, call: &ModuleCall) -> bool {
        if call.name.is_empty() {
            return false;
        }
        if self.wanted.is_empty() { call.module.children().is_empty() } else { self.wanted.iter().any(|w| w == call.name) }
    }

    fn record(&mut self, name: &str, y: &Tensor) -> Result<()> {
        match &mut self.pass {
            Pass::Range(ranges) => {
                let (lo, hi) = (y.f_min()?.f_double_value(&[])?, y.f_max()?.f_double_value(&[])?);
                if !(lo.is_finite() && hi.is_finite()) {
                    return Err(Error::invalid("activation histograms", format!("'{name}' produced non-finite outputs ({lo} to {hi}): look for NaN or infinite weights")));
                }
                let zeros = y.f_eq(0.0)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
                let entry = ranges.entry(name.to_string()).or_insert((f64::INFINITY, f64::NEG_INFINITY, 0, 0));
                *entry = (entry.0.min(lo), entry.1.max(hi), entry.2 + y.numel() as i64, entry.3 + zeros);
                if !self.order.iter().any(|n| n == name) {
                    self.order.push(name.to_string());
                }
            }
            Pass::Counts { ranges, counts } => {
                let Some(&(lo, hi)) = ranges.get(name) else { return Ok(()) };
                let batch = super::bucket_counts(y, lo, hi, self.bins)?;
                let total = counts.entry(name.to_string()).or_insert_with(|| vec![0.0; batch.len()]);
                total.iter_mut().zip(batch).for_each(|(t, c)| *t += c);
            }
        }
        Ok(())
    }
}

impl Observer for Collector {
    fn observe(&mut self, call: &ModuleCall) {
        if self.error.is_some() || !self.watches(call) || !call.output.is_floating_point() || call.output.numel() == 0 {
            return;
        }
        let _no_grad = tch::no_grad_guard();
        let y = call.output.detach().to_kind(Kind::Double);
        if let Err(e) = self.record(call.name, &y) {
            self.error = Some(e);
        }
    }
}

/// Histograms of the outputs of `modules` (empty: every leaf module) over the first `batches` mini-batches of
/// `batch_size` samples of `data`, in eval mode, `bins` equal-width buckets from each layer's smallest to its
/// largest output (a constant output gets the range `[v, v + 1]`).
///
/// One row per (layer, bucket), layers in the order they run: `Layer`, `Type`, `Low`, `High`, `Count`, and
/// `Zeros (%)`, the share of the layer's outputs that are exactly zero (repeated on its rows). Draw it with
/// [`crate::plot::activation_histograms`].
///
/// ```
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// let data = distill::data::Dataset::synthetic(16, [1, 28, 28], 10, 1)?;
/// let h = distill::summary::activations::activation_histograms(&mut model, &data, &["relu1", "fc3"], 2, 8, 32)?;
/// assert_eq!(h.height(), 2 * 32);
/// assert!(distill::summary::activations::activation_histograms(&mut model, &data, &["relu9"], 2, 8, 32).is_err());
/// # Ok::<(), distill::Error>(())
/// ```
pub fn activation_histograms(model: &mut Model, data: &Dataset, modules: &[&str], batches: usize, batch_size: usize, bins: usize) -> Result<DataFrame> {
    if bins == 0 || batches == 0 || batch_size == 0 {
        return Err(Error::invalid("activation histograms", format!("bins ({bins}), batches ({batches}) and batch size ({batch_size}) must be at least 1")));
    }
    if data.is_empty() {
        return Err(Error::invalid("activation histograms", "the dataset has no samples"));
    }
    let mut wanted = Vec::new();
    for m in modules {
        model.module(m)?;
        wanted.push(normalize_name(m));
    }
    let collector = Arc::new(Mutex::new(Collector { wanted, order: Vec::new(), bins, pass: Pass::Range(HashMap::new()), error: None }));
    let poisoned = || Error::invalid("activation histograms", "the collector was poisoned by a panic");
    run_observed(model, collector.clone(), data, batches, batch_size)?;
    let zeros = {
        let mut c = collector.lock().map_err(|_| poisoned())?;
        if let Some(e) = c.error.take() {
            return Err(e);
        }
        let Pass::Range(found) = std::mem::replace(&mut c.pass, Pass::Range(HashMap::new())) else { return Err(poisoned()) };
        let ranges = found.iter().map(|(n, &(lo, hi, ..))| (n.clone(), (lo, if hi > lo { hi } else { lo + 1.0 }))).collect();
        let zeros: HashMap<String, f64> = found.iter().map(|(n, &(.., numel, zeros))| (n.clone(), 100.0 * zeros as f64 / numel.max(1) as f64)).collect();
        c.pass = Pass::Counts { ranges, counts: HashMap::new() };
        zeros
    };
    run_observed(model, collector.clone(), data, batches, batch_size)?;
    let mut c = collector.lock().map_err(|_| poisoned())?;
    if let Some(e) = c.error.take() {
        return Err(e);
    }
    if let Some(missing) = c.wanted.iter().find(|w| !c.order.contains(w)) {
        return Err(Error::invalid("activation histograms", format!("'{missing}' did not run in the forward pass (an unused module, or one inside an exit that the pass skipped)")));
    }
    let Pass::Counts { ranges, counts } = &c.pass else { return Err(poisoned()) };
    let types: HashMap<String, String> = model.named_modules().into_iter().map(|m| (m.name, m.type_name)).collect();
    let (mut layer, mut kind, mut low, mut high, mut count, mut zero_share) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for name in &c.order {
        let (lo, hi) = ranges[name];
        let edges = super::bucket_edges(lo, hi, bins);
        for (i, &n) in counts[name].iter().enumerate() {
            layer.push(name.clone());
            kind.push(types.get(name).cloned().unwrap_or_default());
            low.push(edges[i]);
            high.push(edges[i + 1]);
            count.push(n as i64);
            zero_share.push(zeros[name]);
        }
    }
    Ok(df!("Layer" => layer, "Type" => kind, "Low" => low, "High" => high, "Count" => count, "Zeros (%)" => zero_share)?)
}
