//! Activation statistics for post-training quantization: collected by a module observer over calibration
//! batches, and read and written in Distiller's statistics YAML (`module: {inputs: {0: {...}}, output: {...}}`).
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::q_utils::{host_values, Histogram, HostValues, RangeStats, HISTOGRAM_BINS};
use crate::data::Dataset;
use crate::nn::{normalize_name, Model, ModuleCall, Observer};
use crate::{Error, Result};

/// One tensor's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// min, max, avg_min, avg_max, mean, std, b.
    #[serde(flatten)]
    pub range: RangeStats,
    /// Shape of the last batch seen, as Distiller writes it (`(256, 3, 224, 224)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
    /// Elements seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_numel: Option<u64>,
    /// The values' histogram, for MSE clipping (distill's addition: Distiller's files have none, and Distiller
    /// ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<Histogram>,
}

/// A module's records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleStats {
    /// Per input index.
    #[serde(default)]
    pub inputs: BTreeMap<usize, TensorStats>,
    /// The output.
    pub output: TensorStats,
}

/// Statistics of every module, in forward order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActivationStats {
    /// (module name, records).
    pub modules: Vec<(String, ModuleStats)>,
}

impl ActivationStats {
    /// The records of module `name` (`module.` prefix accepted).
    pub fn get(&self, name: &str) -> Option<&ModuleStats> {
        let n = normalize_name(name);
        self.modules.iter().find(|(m, _)| normalize_name(m) == n).map(|(_, s)| s)
    }

    /// The records of module `name`, to change them (`module.` prefix accepted).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut ModuleStats> {
        let n = normalize_name(name);
        self.modules.iter_mut().find(|(m, _)| normalize_name(m) == n).map(|(_, s)| s)
    }

    /// Reads Distiller's statistics YAML.
    pub fn from_yaml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::config::read_text_file(path)?;
        crate::config::check_text(&text, &path.display().to_string(), "activation statistics, a mapping from module names to their ranges")?;
        let top: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| Error::data(path, format!("malformed statistics YAML: {e}")))?;
        Self::read(top, &path.display().to_string())
    }

    /// From statistics written inline in a schedule (`model_activation_stats:` as a mapping).
    pub fn from_value(v: &serde_yaml::Value) -> Result<Self> {
        Self::read(v.clone(), "model_activation_stats")
    }

    /// Reads and validates: at least one module, every number finite, every minimum at most its maximum. A
    /// NaN range would quantize everything to garbage and an empty file would silently mean dynamic ranges.
    fn read(top: serde_yaml::Value, source: &str) -> Result<Self> {
        let bad = |msg: String| Error::data(Path::new(source), msg);
        let serde_yaml::Value::Mapping(top) = top else {
            return Err(bad("expected a mapping from module names to their statistics; the file is empty or holds something else".into()));
        };
        let mut modules = Vec::new();
        for (k, v) in top {
            let name = k.as_str().map(String::from).unwrap_or_else(|| format!("{k:?}"));
            let stats: ModuleStats = serde_path_to_error::deserialize(v).map_err(|e| bad(format!("statistics of '{name}' at '{}': {}", e.path(), e.inner())))?;
            for (slot, t) in stats.inputs.iter().map(|(i, t)| (format!("inputs[{i}]"), t)).chain(std::iter::once(("output".to_string(), &stats.output))) {
                let r = &t.range;
                if let Some((field, v)) = r.non_finite() {
                    return Err(bad(format!("statistics of '{name}' {slot}.{field} is {v}: every value must be a finite number (recalibrate)")));
                }
                if r.min > r.max || r.avg_min > r.avg_max || r.std < 0.0 || r.b < 0.0 {
                    return Err(bad(format!("statistics of '{name}' {slot}: min {} > max {}, avg_min {} > avg_max {}, or a negative std/b; the file is inconsistent", r.min, r.max, r.avg_min, r.avg_max)));
                }
            }
            modules.push((name, stats));
        }
        if modules.is_empty() {
            return Err(bad("holds no module statistics; calibrate again or leave model_activation_stats out for dynamic ranges".into()));
        }
        Ok(ActivationStats { modules })
    }

    /// Writes Distiller's statistics YAML.
    pub fn to_yaml_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut top = serde_yaml::Mapping::new();
        for (name, s) in &self.modules {
            top.insert(name.clone().into(), serde_yaml::to_value(s).map_err(|e| Error::invalid("statistics", e.to_string()))?);
        }
        let text = serde_yaml::to_string(&top).map_err(|e| Error::invalid("statistics", e.to_string()))?;
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// Checks every recorded module exists in `model`, with suggestions for those that do not.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        let names: Vec<String> = model.named_modules().into_iter().map(|m| m.name).filter(|n| !n.is_empty()).collect();
        for (m, _) in &self.modules {
            if !names.contains(&normalize_name(m)) {
                return Err(Error::unknown("module in calibration statistics", m, names));
            }
        }
        Ok(())
    }
}

/// Running sums of one tensor slot.
#[derive(Debug, Default)]
struct Acc {
    min: f64,
    max: f64,
    sum_min: f64,
    sum_max: f64,
    samples: i64,
    sum: f64,
    sum_sq: f64,
    numel: i64,
    abs_dev: f64,
    shape: Vec<i64>,
    histogram: Option<Histogram>,
}

impl Acc {
    fn first_pass(&mut self, x: &Tensor) -> Result<()> {
        let x = x.f_detach()?.f_to_kind(Kind::Double)?;
        let n = x.size().first().copied().unwrap_or(1).max(1);
        let rows = x.f_reshape([n, -1])?;
        let (mn, mx) = (x.f_min()?.f_double_value(&[])?, x.f_max()?.f_double_value(&[])?);
        if self.samples == 0 {
            (self.min, self.max) = (mn, mx);
        } else {
            (self.min, self.max) = (self.min.min(mn), self.max.max(mx));
        }
        self.sum_min += rows.f_amin(1, false)?.f_sum(Kind::Double)?.f_double_value(&[])?;
        self.sum_max += rows.f_amax(1, false)?.f_sum(Kind::Double)?.f_double_value(&[])?;
        self.samples += n;
        self.sum += x.f_sum(Kind::Double)?.f_double_value(&[])?;
        self.sum_sq += x.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        self.numel += x.numel() as i64;
        self.shape = x.size();
        Ok(())
    }

    fn mean(&self) -> f64 {
        self.sum / self.numel.max(1) as f64
    }

    /// The mean absolute deviation and the histogram, from one copy of `x` on the host.
    fn second_pass(&mut self, x: &Tensor) -> Result<()> {
        let mean = self.mean();
        let histogram = match &mut self.histogram {
            Some(h) => h,
            None => self.histogram.insert(Histogram::empty(self.min, self.max, HISTOGRAM_BINS)?),
        };
        // Both passes over one host copy, for either float width.
        fn add<T: Copy + Into<f64>>(values: &[T], mean: f64, abs_dev: &mut f64, histogram: &mut Histogram) -> Result<()> {
            *abs_dev += values.iter().map(|&v| (v.into() - mean).abs()).sum::<f64>();
            histogram.add_values(values)
        }
        match host_values(x)? {
            HostValues::F32(v) => add(&v, mean, &mut self.abs_dev, histogram),
            HostValues::F64(v) => add(&v, mean, &mut self.abs_dev, histogram),
        }
    }

    fn finish(&self) -> TensorStats {
        let n = self.numel.max(1) as f64;
        let mean = self.mean();
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        TensorStats {
            range: RangeStats {
                min: self.min,
                max: self.max,
                // Distiller weights its running averages by element counts (favouring the first batch); a plain
                // mean over samples is what "average of per-sample min/max" means.
                avg_min: self.sum_min / self.samples.max(1) as f64,
                avg_max: self.sum_max / self.samples.max(1) as f64,
                mean,
                // Population std, as Distiller's collector.
                std: (self.sum_sq / n - mean * mean).max(0.0).sqrt(),
                b: self.abs_dev / n,
            },
            shape: Some(format!("({})", shape.join(", "))),
            total_numel: Some(self.numel as u64),
            histogram: self.histogram.clone(),
        }
    }
}

/// The observer behind [`collect_activation_stats`]: two passes, the second for the mean absolute deviation.
#[derive(Debug, Default)]
struct Collector {
    second_pass: bool,
    order: Vec<String>,
    slots: HashMap<(String, Option<usize>), Acc>,
    error: Option<String>,
}

impl Observer for Collector {
    fn observe(&mut self, call: &ModuleCall) {
        if call.name.is_empty() || !call.module.children().is_empty() {
            return;
        }
        let name = call.name.to_string();
        if !self.order.contains(&name) {
            self.order.push(name.clone());
        }
        let slots = call.inputs.iter().enumerate().map(|(i, t)| (Some(i), *t)).chain(std::iter::once((None, call.output)));
        for (slot, t) in slots {
            let acc = self.slots.entry((name.clone(), slot)).or_default();
            let r = if self.second_pass { acc.second_pass(t) } else { acc.first_pass(t) };
            if let Err(e) = r {
                self.error.get_or_insert(format!("{name}: {e}"));
            }
        }
    }
}

/// Runs `batches` mini-batches of `data` (in order, eval mode, no gradients) through `model` twice and returns
/// every leaf module's input and output statistics: Distiller's seven numbers from the first pass and the mean
/// absolute deviation and a histogram (for MSE clipping) from the second.
pub fn collect_activation_stats(model: &mut Model, data: &Dataset, batches: usize, batch_size: usize) -> Result<ActivationStats> {
    if batches == 0 {
        return Err(Error::invalid("calibration batches", "must be at least 1"));
    }
    let collector = Arc::new(Mutex::new(Collector::default()));
    crate::nn::run_observed(model, collector.clone(), data, batches, batch_size)?;
    collector.lock().map_err(|_| Error::invalid("calibration", "collector poisoned"))?.second_pass = true;
    crate::nn::run_observed(model, collector.clone(), data, batches, batch_size)?;
    let c = collector.lock().map_err(|_| Error::invalid("calibration", "collector poisoned"))?;
    if let Some(e) = &c.error {
        return Err(Error::invalid("calibration", e.clone()));
    }
    let mut modules = Vec::new();
    for name in &c.order {
        let mut inputs = BTreeMap::new();
        let mut i = 0;
        while let Some(acc) = c.slots.get(&(name.clone(), Some(i))) {
            inputs.insert(i, acc.finish());
            i += 1;
        }
        let output = c.slots.get(&(name.clone(), None)).map(Acc::finish).ok_or_else(|| Error::invalid("calibration", format!("no output recorded for {name}")))?;
        modules.push((name.clone(), ModuleStats { inputs, output }));
    }
    Ok(ActivationStats { modules })
}
