//! The chart types distill draws.
use polars::prelude::*;
use tch::{Kind, Tensor};

use super::{Figure, Panel, PanelKind, Series};
use crate::config::Preview;
use crate::nn::Model;
use crate::quantization::stats::ActivationStats;
use crate::summary::tables::column;
use crate::train::EpochRecord;
use crate::{Error, Result};

fn str_col(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    let c = column(df, name)?;
    Ok((0..df.height()).map(|i| c.get(i).map(|v| v.get_str().map(String::from).unwrap_or_else(|| v.to_string()))).collect::<std::result::Result<_, _>>()?)
}

fn f64_col(df: &DataFrame, name: &str) -> Result<Vec<f64>> {
    let c = column(df, name)?.cast(&DataType::Float64)?;
    Ok(c.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

/// Per-layer fine-grained sparsity as bars, from [`crate::summary::tables::weights_sparsity_summary`].
pub fn sparsity_bars(summary: &DataFrame) -> Result<Figure> {
    let names = str_col(summary, "Name")?;
    let fine = f64_col(summary, "Fine (%)")?;
    let (labels, values): (Vec<String>, Vec<f64>) = names.into_iter().zip(fine).filter(|(n, _)| n != "Total sparsity:").unzip();
    let total = f64_col(summary, "Fine (%)")?.last().copied().unwrap_or(0.0);
    let panel = Panel::new(format!("Sparsity per weight tensor (total {total:.1}%)"), "tensor", "zero weights (%)", PanelKind::Bars { labels, values });
    Ok(Figure::new("Weight sparsity", vec![panel], 1))
}

/// Top-1 against sparsity, one line per tensor, from a sensitivity DataFrame (`parameter, sparsity, top1, ...`).
/// (Distiller's own chart plots top-5.)
pub fn sensitivity_curves(sensitivity: &DataFrame) -> Result<Figure> {
    let params = str_col(sensitivity, "parameter")?;
    let sparsity = f64_col(sensitivity, "sparsity")?;
    let top1 = f64_col(sensitivity, "top1")?;
    let mut series: Vec<Series> = Vec::new();
    for ((p, s), t) in params.into_iter().zip(sparsity).zip(top1) {
        match series.iter_mut().find(|x| x.name == p) {
            Some(x) => x.points.push((s, t)),
            None => series.push(Series::new(p, vec![(s, t)])),
        }
    }
    let panel = Panel::new("Sensitivity to pruning", "sparsity", "top-1 (%)", PanelKind::Lines(series));
    Ok(Figure::new("Sensitivity analysis", vec![panel], 1))
}

/// A histogram of parameter `name`'s values in `bins` buckets.
pub fn weight_histogram(model: &Model, name: &str, bins: usize) -> Result<Figure> {
    let t = model.parameter(name)?.f_detach()?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
    if t.numel() == 0 {
        return Err(Error::invalid("histogram", format!("'{name}' is empty")));
    }
    let (edges, counts) = crate::summary::histogram(&t, bins)?;
    let zeros = t.f_eq(0.0)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    let panel = Panel::new(format!("{name} ({} values, {zeros} zeros)", t.numel()), "value", "count", PanelKind::Histogram { edges, counts });
    Ok(Figure::new("Weight histogram", vec![panel], 1))
}

/// Histograms of parameters `names` (empty: every convolution and fully connected weight), `bins` buckets each,
/// `columns` panels per row, with the Gaussian (the values' mean and standard deviation) and the Laplace
/// distribution (their median and mean absolute deviation from it) fitted to each drawn over it, scaled to counts
/// (Distiller's `parameter_histograms` notebook). Each fit's legend gives its average log-likelihood per value,
/// `−½·ln(2πσ²) − ½` and `−ln(2b) − 1`: the higher one fits better.
///
/// ```
/// let model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// let figure = distill::plot::parameter_histograms(&model, &["conv2.weight", "fc1.weight"], 60, 2)?;
/// assert_eq!(figure.panels[0].overlays.len(), 2);
/// assert!(distill::plot::parameter_histograms(&model, &["fc1.weigth"], 60, 2).is_err());
/// # Ok::<(), distill::Error>(())
/// ```
pub fn parameter_histograms(model: &Model, names: &[&str], bins: usize, columns: usize) -> Result<Figure> {
    let names: Vec<String> = if names.is_empty() {
        model.named_parameters().into_iter().filter(|(_, t)| matches!(t.dim(), 2 | 4)).map(|(n, _)| n).collect()
    } else {
        names.iter().map(|n| n.to_string()).collect()
    };
    let mut panels = Vec::new();
    for name in &names {
        let t = model.parameter(name)?.f_detach()?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
        let n = t.numel();
        if n < 2 {
            return Err(Error::invalid("histogram", format!("'{name}' has {n} value(s); a fit needs at least two")));
        }
        let (edges, counts) = crate::summary::histogram(&t, bins)?;
        let mean = t.f_mean(Kind::Double)?.f_double_value(&[])?;
        let sigma = t.f_std(false)?.f_double_value(&[])?;
        let median = t.f_median()?.f_double_value(&[])?;
        let b = t.f_sub_scalar(median)?.f_abs()?.f_mean(Kind::Double)?.f_double_value(&[])?;
        if !(sigma > 0.0 && b > 0.0 && sigma.is_finite()) {
            return Err(Error::invalid("histogram", format!("'{name}': its values are constant or not finite (σ = {sigma}), so no distribution fits")));
        }
        let (lo, hi) = (edges[0], edges[edges.len() - 1]);
        // A density times the values' count times the bucket width: the expected count of a bucket.
        let to_counts = n as f64 * (hi - lo) / counts.len() as f64;
        let curve = |density: &dyn Fn(f64) -> f64| -> Vec<(f64, f64)> {
            (0..=200).map(|i| lo + (hi - lo) * i as f64 / 200.0).map(|x| (x, to_counts * density(x))).collect()
        };
        let gauss = curve(&|x| (-0.5 * ((x - mean) / sigma).powi(2)).exp() / (sigma * (2.0 * std::f64::consts::PI).sqrt()));
        let laplace = curve(&|x| (-(x - median).abs() / b).exp() / (2.0 * b));
        let gauss_ll = -0.5 * (2.0 * std::f64::consts::PI * sigma * sigma).ln() - 0.5;
        let laplace_ll = -(2.0 * b).ln() - 1.0;
        let panel = Panel::new(format!("{name} ({n} values)"), "value", "count", PanelKind::Histogram { edges, counts })
            .overlay(Series::new(format!("Gaussian, log-lik. {gauss_ll:.2}"), gauss).color(1).without_markers())
            .overlay(Series::new(format!("Laplace, log-lik. {laplace_ll:.2}"), laplace).color(3).dashed().without_markers());
        panels.push(panel);
    }
    if panels.is_empty() {
        return Err(Error::invalid("histogram", "the model has no convolution or fully connected weights to draw"));
    }
    Ok(Figure::new("Parameter histograms with fitted distributions", panels, columns.max(1)))
}

/// The histograms of [`crate::summary::activations::activation_histograms`], one panel per layer, `columns` per
/// row, counts on a logarithmic axis (a ReLU's zeros outnumber its tail by orders of magnitude).
///
/// ```
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// let data = distill::data::Dataset::synthetic(16, [1, 28, 28], 10, 1)?;
/// let h = distill::summary::activations::activation_histograms(&mut model, &data, &["relu1", "fc3"], 2, 8, 32)?;
/// assert_eq!(distill::plot::activation_histograms(&h, 2)?.panels.len(), 2);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn activation_histograms(histograms: &DataFrame, columns: usize) -> Result<Figure> {
    let (layers, lows, highs, counts, zeros) =
        (str_col(histograms, "Layer")?, f64_col(histograms, "Low")?, f64_col(histograms, "High")?, f64_col(histograms, "Count")?, f64_col(histograms, "Zeros (%)")?);
    let mut panels: Vec<Panel> = Vec::new();
    let mut current: Option<(String, Vec<f64>, Vec<f64>, f64)> = None;
    let mut finish = |c: Option<(String, Vec<f64>, Vec<f64>, f64)>| {
        if let Some((layer, edges, counts, zeros)) = c {
            let title = format!("{layer} ({zeros:.0}% zeros)");
            panels.push(Panel::new(title, "output", "count", PanelKind::Histogram { edges, counts }).log_y());
        }
    };
    for i in 0..layers.len() {
        if current.as_ref().is_none_or(|c| c.0 != layers[i]) {
            finish(current.take());
            current = Some((layers[i].clone(), vec![lows[i]], Vec::new(), zeros[i]));
        }
        if let Some(c) = current.as_mut() {
            c.1.push(highs[i]);
            c.2.push(counts[i]);
        }
    }
    finish(current);
    if panels.is_empty() {
        return Err(Error::invalid("activation histograms", "the table has no rows"));
    }
    Ok(Figure::new("Activation histograms", panels, columns.max(1)))
}

/// Bars from any DataFrame: one slot per row, labelled by column `label`, one bar per column of `values` in it
/// (e.g. each layer's weights and output footprint from
/// [`crate::summary::tables::model_performance_summary`]), legend beside the plot.
///
/// ```
/// use distill::polars::prelude::*;
/// let df = df!("layer" => ["conv1", "fc1"], "weights" => [150i64, 48000], "outputs" => [4704i64, 120])?;
/// let figure = distill::plot::bars_from_frame(&df, "layer", &["weights", "outputs"])?;
/// assert!(figure.to_svg()?.contains("outputs"));
/// assert!(distill::plot::bars_from_frame(&df, "layer", &[]).is_err());
/// # Ok::<(), distill::Error>(())
/// ```
pub fn bars_from_frame(df: &DataFrame, label: &str, values: &[&str]) -> Result<Figure> {
    if values.is_empty() {
        return Err(Error::invalid("bars", "name at least one column of values"));
    }
    let labels = str_col(df, label)?;
    let groups = values.iter().map(|v| Ok((v.to_string(), f64_col(df, v)?))).collect::<Result<Vec<_>>>()?;
    let y_label = if values.len() == 1 { values[0] } else { "value" };
    let title = format!("{} by {label}", values.join(", "));
    Ok(Figure::new(title, vec![Panel::new("", label, y_label, PanelKind::GroupedBars { labels, groups })], 1))
}

/// Training curves of one or several runs: loss, top-1, sparsity and learning rate against the epoch, as four
/// panels of one figure sharing their epoch axis. Each run has one colour; validation lines are dashed.
pub fn training_curves(runs: &[(&str, &[EpochRecord])]) -> Result<Figure> {
    if runs.iter().all(|(_, h)| h.is_empty()) {
        return Err(Error::invalid("training curves", "no epochs to draw"));
    }
    let series = |f: &dyn Fn(&EpochRecord) -> f64, suffix: &str, dashed: bool| -> Vec<Series> {
        runs.iter()
            .enumerate()
            .map(|(i, (name, h))| {
                let s = Series::new(format!("{name}{suffix}"), h.iter().map(|r| (r.epoch as f64, f(r))).collect()).color(i);
                if dashed { s.dashed() } else { s }
            })
            .collect()
    };
    let both = |f: &dyn Fn(&EpochRecord) -> f64, g: &dyn Fn(&EpochRecord) -> f64| -> Vec<Series> {
        // Train and valid of one run next to each other, so the legend reads run by run.
        series(f, " train", false).into_iter().zip(series(g, " valid", true)).flat_map(|(a, b)| [a, b]).collect()
    };
    // Sparsity is a share: its axis starts at 0 (a dense run is a line along the bottom, not in the middle).
    let most_sparse = runs.iter().flat_map(|(_, h)| h.iter().map(|r| 100.0 * r.counts.sparsity)).fold(0.0, f64::max);
    let panels = vec![
        Panel::new("Loss", "epoch", "cross-entropy", PanelKind::Lines(both(&|r| r.train.objective.loss, &|r| r.valid.loss))),
        Panel::new("Top-1 accuracy", "epoch", "top-1 (%)", PanelKind::Lines(both(&|r| r.train.objective.top1, &|r| r.valid.top1))),
        Panel::new("Sparsity of 2-D/4-D weights", "epoch", "zeros (%)", PanelKind::Lines(series(&|r| 100.0 * r.counts.sparsity, "", false)))
            .y_range(0.0, 1.05 * most_sparse.max(1.0)),
        Panel::new("Learning rate", "epoch", "lr", PanelKind::Lines(series(&|r| r.lr, "", false))),
    ];
    Ok(Figure::new("Training", shared_x(panels), 2))
}

/// Gives every line panel the x range of all of them together, padded, so panels of one figure line up.
fn shared_x(panels: Vec<Panel>) -> Vec<Panel> {
    let xs: Vec<f64> = panels
        .iter()
        .filter_map(|p| match &p.kind {
            PanelKind::Lines(series) => Some(series.iter().flat_map(|s| s.points.iter().map(|pt| pt.0)).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .filter(|x| x.is_finite())
        .collect();
    let (lo, hi) = (xs.iter().copied().fold(f64::INFINITY, f64::min), xs.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    if !(lo.is_finite() && hi.is_finite()) {
        return panels;
    }
    let (lo, hi) = super::padded(lo, hi);
    panels.into_iter().map(|p| if matches!(p.kind, PanelKind::Lines(_)) && p.x_range.is_none() { p.x_range(lo, hi) } else { p }).collect()
}

/// A schedule's preview: each pruned tensor's target sparsity and the learning rate per epoch, on one epoch axis.
pub fn schedule_preview(preview: &Preview) -> Result<Figure> {
    let mut targets: Vec<Series> = Vec::new();
    for row in &preview.epochs {
        for (tensor, t, _) in &row.targets {
            match targets.iter_mut().find(|s| &s.name == tensor) {
                Some(s) => s.points.push((row.epoch as f64, 100.0 * t)),
                None => targets.push(Series::new(tensor.clone(), vec![(row.epoch as f64, 100.0 * t)])),
            }
        }
    }
    let lr: Vec<(f64, f64)> = preview.epochs.iter().filter_map(|r| r.lr.map(|l| (r.epoch as f64, l))).collect();
    let panels = vec![
        Panel::new("Target sparsity", "epoch", "target (%)", PanelKind::Lines(targets)),
        Panel::new("Learning rate", "epoch", "lr", PanelKind::Lines(vec![Series::new("", lr)])),
    ];
    Ok(Figure::new("Schedule preview", shared_x(panels), 2))
}

/// Lines from any DataFrame: `y` against `x`, one line per value of `group` (e.g. the `run` of
/// [`crate::logging::posthoc::read_runs`] after filtering one tag), in order of first appearance.
///
/// ```
/// use distill::polars::prelude::*;
/// let df = df!("run" => ["a", "a", "b", "b"], "step" => [0i64, 1, 0, 1], "value" => [0.5, 0.25, 0.6, 0.3])?;
/// let figure = distill::plot::lines_from_frame(&df, "step", "value", Some("run"))?;
/// assert_eq!(figure.panels.len(), 1);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn lines_from_frame(df: &DataFrame, x: &str, y: &str, group: Option<&str>) -> Result<Figure> {
    let xs = f64_col(df, x)?;
    let ys = f64_col(df, y)?;
    let groups = match group {
        Some(g) => str_col(df, g)?,
        None => vec![String::new(); df.height()],
    };
    let mut series: Vec<Series> = Vec::new();
    for ((g, x), y) in groups.into_iter().zip(xs).zip(ys) {
        match series.iter_mut().find(|s| s.name == g) {
            Some(s) => s.points.push((x, y)),
            None => series.push(Series::new(g, vec![(x, y)])),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(Figure::new(format!("{y} against {x}"), vec![Panel::new("", x, y, PanelKind::Lines(series))], 1))
}

/// A grid of heat maps, one per `maps[k]` of `maps` (`[K, H, W]`, e.g. one image's feature maps `[C, H, W]`, or
/// Grad-CAM maps), each coloured over its own range; `titles` names the panels (empty: their index).
///
/// ```
/// let maps = tch::Tensor::rand([6, 24, 24], (tch::Kind::Float, tch::Device::Cpu));
/// let figure = distill::plot::heatmaps("conv1", &maps, &[], 6)?;
/// assert_eq!(figure.panels.len(), 6);
/// assert!(distill::plot::heatmaps("x", &maps.flatten(0, -1), &[], 6).is_err());
/// # Ok::<(), distill::Error>(())
/// ```
pub fn heatmaps(title: &str, maps: &Tensor, titles: &[String], columns: usize) -> Result<Figure> {
    let size = maps.size();
    let [k, h, w] = size[..] else {
        return Err(Error::Shape(format!("heat maps need [K, H, W]; got {size:?} (take one sample's maps with .get(i))")));
    };
    if !titles.is_empty() && titles.len() as i64 != k {
        return Err(Error::invalid("heat maps", format!("{} titles for {k} maps", titles.len())));
    }
    let values: Vec<f64> = Vec::try_from(&maps.f_detach()?.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?.f_flatten(0, -1)?)?;
    let per = (h * w) as usize;
    let panels: Vec<Panel> = (0..k as usize)
        .map(|i| {
            let name = titles.get(i).cloned().unwrap_or_else(|| i.to_string());
            Panel::new(name, "", "", PanelKind::Heatmap { width: w as usize, height: h as usize, values: values[i * per..(i + 1) * per].to_vec() })
        })
        .collect();
    let mut figure = Figure::new(title, panels, columns.max(1));
    let rows = (k as usize).div_ceil(figure.columns) as u32;
    figure.size = (150 * figure.columns as u32, 40 + 165 * rows);
    Ok(figure)
}

/// The output range (min to max) of every module in calibration statistics, as quantization sees it.
pub fn quantization_ranges(stats: &ActivationStats) -> Result<Figure> {
    let labels = stats.modules.iter().map(|(n, _)| n.clone()).collect();
    let ranges = stats.modules.iter().map(|(_, s)| (s.output.range.min, s.output.range.max)).collect();
    let panel = Panel::new("Activation ranges (min to max)", "module", "value", PanelKind::Ranges { labels, ranges });
    Ok(Figure::new("Quantization ranges", vec![panel], 1))
}

/// Early exit's trade-off over thresholds, from one or several sweeps ([`crate::early_exit::ExitScores::sweep`],
/// e.g. one per criterion): the share of samples leaving at the first exit, the overall top-1 and the compute
/// saved against the threshold, and top-1 against compute saved.
pub fn early_exit_tradeoff(sweeps: &[(&str, &DataFrame)]) -> Result<Figure> {
    if sweeps.is_empty() || sweeps.iter().all(|(_, df)| df.height() == 0) {
        return Err(Error::invalid("early-exit chart", "no sweep rows to draw"));
    }
    let mut panels: Vec<(&str, &str, &str, &str, &str)> = vec![
        ("Samples leaving at the first exit", "threshold", "exit0_percent", "threshold (nats)", "samples (%)"),
        ("Top-1 of the network with its exits", "threshold", "top1", "threshold (nats)", "top-1 (%)"),
        ("Compute saved", "threshold", "macs_saved", "threshold (nats)", "MACs saved (%)"),
        ("Accuracy against compute", "macs_saved", "top1", "MACs saved (%)", "top-1 (%)"),
    ];
    let mut out = Vec::new();
    for (title, x, y, x_label, y_label) in panels.drain(..) {
        let mut series = Vec::new();
        for (name, df) in sweeps {
            let points = f64_col(df, x)?.into_iter().zip(f64_col(df, y)?).collect();
            series.push(Series::new(*name, points));
        }
        out.push(Panel::new(title, x_label, y_label, PanelKind::Lines(series)));
    }
    Ok(Figure::new("Early exit", out, 2))
}
