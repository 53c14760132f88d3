//! The chart types distill draws.
use polars::prelude::*;
use tch::Kind;

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
    let panel = Panel {
        title: format!("Sparsity per weight tensor (total {total:.1}%)"),
        x_label: "tensor".into(),
        y_label: "zero weights (%)".into(),
        kind: PanelKind::Bars { labels, values },
    };
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
            None => series.push(Series { name: p, points: vec![(s, t)] }),
        }
    }
    let panel = Panel { title: "Sensitivity to pruning".into(), x_label: "sparsity".into(), y_label: "top-1 (%)".into(), kind: PanelKind::Lines(series) };
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
    let panel = Panel {
        title: format!("{name} ({} values, {zeros} zeros)", t.numel()),
        x_label: "value".into(),
        y_label: "count".into(),
        kind: PanelKind::Histogram { edges, counts },
    };
    Ok(Figure::new("Weight histogram", vec![panel], 1))
}

/// Training curves of one or several runs: loss, top-1, sparsity and learning rate against the epoch, as four
/// panels of one figure.
pub fn training_curves(runs: &[(&str, &[EpochRecord])]) -> Result<Figure> {
    if runs.iter().all(|(_, h)| h.is_empty()) {
        return Err(Error::invalid("training curves", "no epochs to draw"));
    }
    let series = |f: &dyn Fn(&EpochRecord) -> f64, suffix: &str| -> Vec<Series> {
        runs.iter()
            .map(|(name, h)| Series { name: format!("{name}{suffix}"), points: h.iter().map(|r| (r.epoch as f64, f(r))).collect() })
            .collect()
    };
    let mut loss = series(&|r| r.train.objective.loss, " train");
    loss.extend(series(&|r| r.valid.loss, " valid"));
    let mut top1 = series(&|r| r.train.objective.top1, " train");
    top1.extend(series(&|r| r.valid.top1, " valid"));
    let panels = vec![
        Panel { title: "Loss".into(), x_label: "epoch".into(), y_label: "cross-entropy".into(), kind: PanelKind::Lines(loss) },
        Panel { title: "Top-1 accuracy".into(), x_label: "epoch".into(), y_label: "top-1 (%)".into(), kind: PanelKind::Lines(top1) },
        Panel { title: "Sparsity of 2-D/4-D weights".into(), x_label: "epoch".into(), y_label: "zeros (%)".into(), kind: PanelKind::Lines(series(&|r| 100.0 * r.counts.sparsity, "")) },
        Panel { title: "Learning rate".into(), x_label: "epoch".into(), y_label: "lr".into(), kind: PanelKind::Lines(series(&|r| r.lr, "")) },
    ];
    Ok(Figure::new("Training", panels, 2))
}

/// A schedule's preview: each pruned tensor's target sparsity and the learning rate per epoch.
pub fn schedule_preview(preview: &Preview) -> Result<Figure> {
    let mut targets: Vec<Series> = Vec::new();
    for row in &preview.epochs {
        for (tensor, t, _) in &row.targets {
            match targets.iter_mut().find(|s| &s.name == tensor) {
                Some(s) => s.points.push((row.epoch as f64, 100.0 * t)),
                None => targets.push(Series { name: tensor.clone(), points: vec![(row.epoch as f64, 100.0 * t)] }),
            }
        }
    }
    let lr: Vec<(f64, f64)> = preview.epochs.iter().filter_map(|r| r.lr.map(|l| (r.epoch as f64, l))).collect();
    let panels = vec![
        Panel { title: "Target sparsity".into(), x_label: "epoch".into(), y_label: "target (%)".into(), kind: PanelKind::Lines(targets) },
        Panel { title: "Learning rate".into(), x_label: "epoch".into(), y_label: "lr".into(), kind: PanelKind::Lines(vec![Series { name: String::new(), points: lr }]) },
    ];
    Ok(Figure::new("Schedule preview", panels, 2))
}

/// The output range (min to max) of every module in calibration statistics, as quantization sees it.
pub fn quantization_ranges(stats: &ActivationStats) -> Result<Figure> {
    let labels = stats.modules.iter().map(|(n, _)| n.clone()).collect();
    let ranges = stats.modules.iter().map(|(_, s)| (s.output.range.min, s.output.range.max)).collect();
    let panel = Panel { title: "Activation ranges (min to max)".into(), x_label: "module".into(), y_label: "value".into(), kind: PanelKind::Ranges { labels, ranges } };
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
            series.push(Series { name: name.to_string(), points });
        }
        out.push(Panel { title: title.into(), x_label: x_label.into(), y_label: y_label.into(), kind: PanelKind::Lines(series) });
    }
    Ok(Figure::new("Early exit", out, 2))
}
