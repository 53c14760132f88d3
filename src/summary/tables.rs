//! Summaries as polars DataFrames with Distiller's column names, and their text (psql-style) and CSV forms.
use std::any::Any;
use std::sync::{Arc, Mutex};

use polars::prelude::*;
use tch::{Kind, Tensor};

use super::sparsity::{density, sparsity_2d, sparsity_3d, sparsity_ch, sparsity_cols, sparsity_rows};
use crate::nn::{Conv2d, Linear, Model, ModuleCall, Observer};
use crate::scheduler::CompressionScheduler;
use crate::{Error, Result};

/// The column `name` of `df`, found by comparing names rather than through polars' schema hash map.
///
/// In evcxr every cell links its own copy of polars, each with its own hash seed, so a DataFrame whose schema was
/// hashed in one cell is not found by name in a later one (`df.column("tag")` fails with `"tag" not found`).
/// distill looks columns up this way, and a notebook can too. An unknown name lists the real ones.
///
/// ```
/// use distill::polars::prelude::*;
/// let df = df!("parameter" => ["fc1.weight"], "top1" => [97.5])?;
/// assert_eq!(distill::summary::tables::column(&df, "top1")?.f64()?.get(0), Some(97.5));
/// assert!(distill::summary::tables::column(&df, "top_1").is_err());
/// # Ok::<(), distill::Error>(())
/// ```
pub fn column<'a>(df: &'a DataFrame, name: &str) -> Result<&'a Column> {
    df.columns()
        .iter()
        .find(|c| c.name().as_str() == name)
        .ok_or_else(|| Error::unknown("column", name, df.columns().iter().map(|c| c.name().to_string())))
}

/// A shape as `(1, 16, 32, 32)`, as Distiller's summaries print it.
pub(crate) fn shape_text(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("({})", dims.join(", "))
}

/// Distiller's `weights_sparsity_summary`: one row per 2-D and 4-D weight or bias with `Name`, `Shape`,
/// `NNZ (dense)`, `NNZ (sparse)`, `Cols (%)`, `Rows (%)`, `Ch (%)`, `2D (%)`, `3D (%)`, `Fine (%)`, `Std`, `Mean`,
/// `Abs-Mean`, and a `Total sparsity:` row.
pub fn weights_sparsity_summary(model: &Model) -> Result<DataFrame> {
    let mut name = Vec::new();
    let mut shape = Vec::new();
    let (mut dense, mut sparse) = (Vec::<i64>::new(), Vec::<i64>::new());
    let (mut cols, mut rows, mut ch, mut d2, mut d3, mut fine) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut std, mut mean, mut abs_mean) = (vec![], vec![], vec![]);
    for (n, t) in model.state_dict() {
        if !matches!(t.dim(), 2 | 4) || !(n.contains("weight") || n.contains("bias")) {
            continue;
        }
        let numel = t.numel() as i64;
        let dens = density(&t)?;
        name.push(n);
        shape.push(shape_text(&t.size()));
        dense.push(numel);
        sparse.push((dens * numel as f64) as i64);
        cols.push(100.0 * sparsity_cols(&t)?);
        rows.push(100.0 * sparsity_rows(&t)?);
        ch.push(100.0 * sparsity_ch(&t)?);
        d2.push(100.0 * sparsity_2d(&t)?);
        d3.push(100.0 * sparsity_3d(&t)?);
        fine.push(100.0 * (1.0 - dens));
        let td = t.f_to_kind(Kind::Double)?;
        std.push(if numel > 1 { td.f_std(true)?.f_double_value(&[])? } else { 0.0 });
        mean.push(td.f_mean(Kind::Double)?.f_double_value(&[])?);
        abs_mean.push(td.f_abs()?.f_mean(Kind::Double)?.f_double_value(&[])?);
    }
    let (total, total_nnz): (i64, i64) = (dense.iter().sum(), sparse.iter().sum());
    name.push("Total sparsity:".into());
    shape.push("-".into());
    dense.push(total);
    sparse.push(total_nnz);
    for v in [&mut cols, &mut rows, &mut ch, &mut d2, &mut d3, &mut std, &mut mean, &mut abs_mean] {
        v.push(0.0);
    }
    fine.push(if total > 0 { 100.0 * (1.0 - total_nnz as f64 / total as f64) } else { 0.0 });
    Ok(df!(
        "Name" => name, "Shape" => shape, "NNZ (dense)" => dense, "NNZ (sparse)" => sparse,
        "Cols (%)" => cols, "Rows (%)" => rows, "Ch (%)" => ch, "2D (%)" => d2, "3D (%)" => d3, "Fine (%)" => fine,
        "Std" => std, "Mean" => mean, "Abs-Mean" => abs_mean
    )?)
}

/// Distiller's `masks_sparsity_summary`: `Name`, `Fine (%)` of each 2-D/4-D parameter's mask (no mask: 0%),
/// and a `Total sparsity:` row.
pub fn masks_sparsity_summary(model: &Model, scheduler: &CompressionScheduler) -> Result<DataFrame> {
    let (mut name, mut fine) = (Vec::new(), Vec::new());
    let (mut zeros, mut total) = (0.0, 0.0);
    for (n, t) in model.named_parameters().into_iter().filter(|(_, t)| matches!(t.dim(), 2 | 4)) {
        let d = match &scheduler.masks().get(&n)?.mask {
            Some(m) => density(m)?,
            None => 1.0,
        };
        zeros += (1.0 - d) * t.numel() as f64;
        total += t.numel() as f64;
        name.push(crate::nn::canonical_param_name(&n));
        fine.push(100.0 * (1.0 - d));
    }
    name.push("Total sparsity:".into());
    fine.push(if total > 0.0 { 100.0 * zeros / total } else { 0.0 });
    Ok(df!("Name" => name, "Fine (%)" => fine)?)
}

#[derive(Default)]
struct Compute {
    rows: Vec<(String, String, String, Vec<i64>, Vec<i64>, i64, i64, i64)>,
}

impl Observer for Compute {
    fn observe(&mut self, call: &ModuleCall) {
        let any = call.module as &dyn Any;
        let (ifm, ofm) = (call.inputs.first().map(|t| t.size()).unwrap_or_default(), call.output.size());
        let ofm_vol: i64 = ofm.iter().product();
        let nnz = |w: &Tensor| w.f_ne(0.0).and_then(|m| m.f_sum(Kind::Int64)).and_then(|s| s.f_int64_value(&[])).unwrap_or(0);
        if let Some(c) = any.downcast_ref::<Conv2d>() {
            let k = &c.config;
            let per_output = k.in_channels / k.groups * k.kernel_size[0] * k.kernel_size[1];
            let spatial = ofm_vol / k.out_channels.max(1);
            let attrs = format!("k=({}, {})", k.kernel_size[0], k.kernel_size[1]);
            let w_vol = c.weight.numel() as i64;
            self.rows.push((call.name.into(), "Conv2d".into(), attrs, ifm, ofm, w_vol, ofm_vol * per_output, spatial * nnz(&c.weight)));
        } else if let Some(l) = any.downcast_ref::<Linear>() {
            let w_vol = l.weight.numel() as i64;
            self.rows.push((call.name.into(), "Linear".into(), String::new(), ifm, ofm, w_vol, w_vol, nnz(&l.weight)));
        }
    }
}

/// Distiller's `model_performance_summary` for one `batch_size`-sample input: per Conv2d and Linear, `Name`,
/// `Type`, `Attrs`, `IFM`, `IFM volume`, `OFM`, `OFM volume`, `Weights volume`, `MACs` (Conv: OFM volume ×
/// in-channels/groups × kh × kw; Linear: in × out, batch not included, as Distiller), plus `MACs (sparse)`: the
/// multiply-accumulates left once zero weights are skipped.
pub fn model_performance_summary(model: &mut Model, batch_size: i64) -> Result<DataFrame> {
    let compute = Arc::new(Mutex::new(Compute::default()));
    let id = model.attach_observer(compute.clone());
    let was_training = model.is_training();
    model.eval();
    let s = model.info().input_shape.clone();
    let x = Tensor::f_zeros([batch_size, s[0], s[1], s[2]], (Kind::Float, model.device()))?;
    let result = tch::no_grad(|| model.forward(&x));
    model.detach_observer(id);
    if was_training {
        model.train();
    }
    let _ = result?;
    let c = compute.lock().map_err(|_| Error::Table("compute observer poisoned".into()))?;
    let col = |f: &dyn Fn(&(String, String, String, Vec<i64>, Vec<i64>, i64, i64, i64)) -> i64| c.rows.iter().map(f).collect::<Vec<i64>>();
    Ok(df!(
        "Name" => c.rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        "Type" => c.rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
        "Attrs" => c.rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
        "IFM" => c.rows.iter().map(|r| shape_text(&r.3)).collect::<Vec<_>>(),
        "IFM volume" => col(&|r| r.3.iter().product()),
        "OFM" => c.rows.iter().map(|r| shape_text(&r.4)).collect::<Vec<_>>(),
        "OFM volume" => col(&|r| r.4.iter().product()),
        "Weights volume" => col(&|r| r.5),
        "MACs" => col(&|r| r.6),
        "MACs (sparse)" => col(&|r| r.7)
    )?)
}

/// What thinning saved, per Conv2d and Linear and in total: `Name`, `Weights (dense)`, `Weights`, `MACs
/// (dense)`, `MACs`, `MACs (%)` (what is left, in percent of the dense layer), for a `thinned` model and the
/// `dense` model it came from (a fresh model of the same architecture will do: only shapes matter). The last row,
/// `Total`, also counts the batch norms' and biases' parameters in its weight columns.
///
/// ```
/// use distill::summary::tables::{column, thinning_summary};
/// let mut dense = distill::models::create_model("simplenet_cifar", "cifar10", tch::Device::Cpu)?;
/// let mut thinned = distill::models::create_model("simplenet_cifar", "cifar10", tch::Device::Cpu)?;
/// tch::no_grad(|| thinned.parameter("conv1.weight").map(|w| w.narrow(0, 0, 3).fill_(0.0)))?;
/// distill::thinning::thin_filters(&mut thinned)?;
/// let df = thinning_summary(&mut dense, &mut thinned)?;
/// let left = column(&df, "MACs (%)")?.f64()?.get(0).unwrap();
/// assert_eq!(left, 50.0); // conv1 kept 3 of its 6 filters
/// # Ok::<(), distill::Error>(())
/// ```
pub fn thinning_summary(dense: &mut Model, thinned: &mut Model) -> Result<DataFrame> {
    let before = model_performance_summary(dense, 1)?;
    let after = model_performance_summary(thinned, 1)?;
    let ints = |df: &DataFrame, name: &str| -> Result<Vec<i64>> { Ok(column(df, name)?.i64()?.iter().map(|v| v.unwrap_or(0)).collect()) };
    let names = |df: &DataFrame| -> Result<Vec<String>> { Ok(column(df, "Name")?.str()?.iter().map(|v| v.unwrap_or("").to_string()).collect()) };
    let (dense_names, thin_names) = (names(&before)?, names(&after)?);
    if dense_names != thin_names {
        return Err(Error::invalid("thinning summary", "the two models do not have the same layers; pass the dense model the thinned one came from"));
    }
    let (mut w0, mut w1, mut m0, mut m1) = (ints(&before, "Weights volume")?, ints(&after, "Weights volume")?, ints(&before, "MACs")?, ints(&after, "MACs")?);
    let mut names = dense_names;
    names.push("Total".into());
    w0.push(dense.num_parameters());
    w1.push(thinned.num_parameters());
    m0.push(m0.iter().sum());
    m1.push(m1.iter().sum());
    let left: Vec<f64> = m0.iter().zip(&m1).map(|(&d, &t)| if d > 0 { 100.0 * t as f64 / d as f64 } else { 100.0 }).collect();
    Ok(df!("Name" => names, "Weights (dense)" => w0, "Weights" => w1, "MACs (dense)" => m0, "MACs" => m1, "MACs (%)" => left)?)
}

/// Leaf modules with their types (`distill summary --what modules`).
pub fn modules_summary(model: &Model) -> Result<DataFrame> {
    let leaves: Vec<_> = model.named_modules().into_iter().filter(|m| m.is_leaf && !m.name.is_empty()).collect();
    Ok(df!(
        "Name" => leaves.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        "Type" => leaves.iter().map(|m| m.type_name.clone()).collect::<Vec<_>>()
    )?)
}

/// One cell as the text and HTML tables show it (floats with 5 decimals).
pub(crate) fn cell(c: &Column, i: usize) -> Result<String> {
    Ok(match c.get(i)? {
        AnyValue::Float64(v) => format!("{v:.5}"),
        AnyValue::Float32(v) => format!("{v:.5}"),
        AnyValue::String(s) => s.to_string(),
        AnyValue::StringOwned(s) => s.to_string(),
        AnyValue::Null => String::new(),
        v => v.to_string(),
    })
}

/// The frame as a text table in the style Distiller prints (`tabulate`'s psql format, floats with 5 decimals),
/// every row and column shown.
pub fn to_text_table(df: &DataFrame) -> Result<String> {
    let cols = df.columns();
    let mut cells: Vec<Vec<String>> = vec![cols.iter().map(|c| c.name().to_string()).collect()];
    for i in 0..df.height() {
        cells.push(cols.iter().map(|c| cell(c, i)).collect::<Result<_>>()?);
    }
    let widths: Vec<usize> = (0..cols.len()).map(|j| cells.iter().map(|r| r[j].chars().count()).max().unwrap_or(0)).collect();
    let rule = format!("+{}+", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let numeric: Vec<bool> = cols.iter().map(|c| c.dtype().is_primitive_numeric()).collect();
    let line = |r: &Vec<String>, header: bool| {
        let parts: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(j, s)| if numeric[j] && !header { format!(" {s:>w$} ", w = widths[j]) } else { format!(" {s:<w$} ", w = widths[j]) })
            .collect();
        format!("|{}|", parts.join("|"))
    };
    let header_rule = format!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let mut out = vec![rule.clone(), line(&cells[0], true), header_rule];
    out.extend(cells[1..].iter().map(|r| line(r, false)));
    out.push(rule);
    Ok(out.join("\n") + "\n")
}

fn csv_escape(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// The frame as CSV (header, then one line per row; full float precision).
pub fn to_csv(df: &DataFrame) -> Result<String> {
    let cols = df.columns();
    let mut out = cols.iter().map(|c| csv_escape(c.name())).collect::<Vec<_>>().join(",") + "\n";
    for i in 0..df.height() {
        let row: Vec<String> = cols
            .iter()
            .map(|c| {
                Ok(match c.get(i)? {
                    AnyValue::String(s) => csv_escape(s),
                    AnyValue::StringOwned(s) => csv_escape(&s),
                    AnyValue::Null => String::new(),
                    // Rust's shortest round-trip form; polars' Display rounds to 6 decimals.
                    AnyValue::Float64(v) => v.to_string(),
                    AnyValue::Float32(v) => v.to_string(),
                    v => v.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        out += &(row.join(",") + "\n");
    }
    Ok(out)
}

/// Writes [`to_csv`] to `path`.
pub fn write_csv(df: &DataFrame, path: impl AsRef<std::path::Path>) -> Result<()> {
    let path = path.as_ref();
    crate::io::write_atomic(path, to_csv(df)?.as_bytes())
}

/// The frame as JSON: an array of objects keyed by column name.
pub fn to_json(df: &DataFrame) -> Result<serde_json::Value> {
    let cols = df.columns();
    let mut rows = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let mut obj = serde_json::Map::new();
        for c in cols {
            let v = match c.get(i)? {
                AnyValue::Null => serde_json::Value::Null,
                AnyValue::Boolean(b) => b.into(),
                AnyValue::String(s) => s.into(),
                AnyValue::StringOwned(s) => s.to_string().into(),
                AnyValue::Float64(f) => f.into(),
                AnyValue::Float32(f) => (f as f64).into(),
                AnyValue::Int64(n) => n.into(),
                AnyValue::Int32(n) => n.into(),
                AnyValue::UInt64(n) => n.into(),
                AnyValue::UInt32(n) => n.into(),
                other => other.to_string().into(),
            };
            obj.insert(c.name().to_string(), v);
        }
        rows.push(serde_json::Value::Object(obj));
    }
    Ok(serde_json::Value::Array(rows))
}

/// Per-layer activation statistics over `batches` mini-batches of `data` (eval mode), as Distiller's
/// `SummaryActivationStatsCollector`: for every leaf module whose output has channels, `sparsity_ofm` (% of zero
/// outputs) and, per channel, `l1_channels` (mean over samples of the channel's L1 norm: the sum of |a| over its
/// H×W positions, as Distiller's `activation_channels_l1`), `apoz_channels` (% of zeros) and `mean_channels` (mean
/// activation). A 2-D output's channels are its features (Distiller reports one value per layer there). One row per (layer, channel); `sparsity_ofm` repeats per row.
pub fn activation_channel_summary(model: &mut Model, data: &crate::data::Dataset, batches: usize, batch_size: usize) -> Result<DataFrame> {
    #[derive(Default)]
    struct Acts {
        order: Vec<String>,
        sums: std::collections::HashMap<String, (Tensor, Tensor, Tensor, f64, f64, i64)>,
    }
    impl Observer for Acts {
        fn observe(&mut self, call: &ModuleCall) {
            let size = call.output.size();
            if call.name.is_empty() || !call.module.children().is_empty() || size.len() < 2 {
                return;
            }
            let _g = tch::no_grad_guard();
            let n = size[0];
            let y = call.output.detach().to_kind(Kind::Double).reshape([n, size[1], -1]);
            let l1 = y.abs().sum_dim_intlist(2, false, Kind::Double).sum_dim_intlist(0, false, Kind::Double);
            let apoz = y.eq(0.0).to_kind(Kind::Double).mean_dim(2, false, Kind::Double).sum_dim_intlist(0, false, Kind::Double);
            let mean = y.mean_dim(2, false, Kind::Double).sum_dim_intlist(0, false, Kind::Double);
            let zeros = y.eq(0.0).sum(Kind::Double).double_value(&[]);
            let name = call.name.to_string();
            if !self.order.contains(&name) {
                self.order.push(name.clone());
            }
            let e = self.sums.entry(name).or_insert_with(|| (l1.zeros_like(), apoz.zeros_like(), mean.zeros_like(), 0.0, 0.0, 0));
            e.0 += l1;
            e.1 += apoz;
            e.2 += mean;
            e.3 += zeros;
            e.4 += y.numel() as f64;
            e.5 += n;
        }
    }
    let acts = Arc::new(Mutex::new(Acts::default()));
    crate::nn::run_observed(model, acts.clone(), data, batches.max(1), batch_size)?;
    let a = acts.lock().map_err(|_| Error::Table("activation observer poisoned".into()))?;
    let (mut layer, mut channel, mut sofm, mut l1, mut apoz, mut mean) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for name in &a.order {
        let (sl1, sapoz, smean, zeros, numel, n) = &a.sums[name];
        let n = *n as f64;
        let (vl1, vapoz, vmean) = (Vec::<f64>::try_from(sl1)?, Vec::<f64>::try_from(sapoz)?, Vec::<f64>::try_from(smean)?);
        for c in 0..vl1.len() {
            layer.push(name.clone());
            channel.push(c as i64);
            sofm.push(100.0 * zeros / numel.max(1.0));
            l1.push(vl1[c] / n);
            apoz.push(100.0 * vapoz[c] / n);
            mean.push(vmean[c] / n);
        }
    }
    Ok(df!("Layer" => layer, "Channel" => channel, "sparsity_ofm" => sofm, "l1_channels" => l1, "apoz_channels" => apoz, "mean_channels" => mean)?)
}
