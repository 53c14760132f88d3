//! Rich output in Jupyter cells through the evcxr kernel. A cell whose last expression is a DataFrame, tensor,
//! model, schedule, schedule preview, run summary, error or figure shows an HTML (or SVG) view with a text
//! fallback once `use distill::prelude::*;` brought [`Rich`] into scope. evcxr keeps one output per MIME type per
//! cell, so every value renders as one bundle.
use std::io::Write;

use polars::prelude::DataFrame;
use tch::{Kind, Tensor};

use crate::config::Preview;
use crate::metrics::Metrics;
use crate::nn::Model;
use crate::summary::tables::{cell, to_text_table};
use crate::train::TrainSummary;
use crate::Result;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Writes a MIME bundle in evcxr's protocol, in one locked write so nothing interleaves.
fn emit(bundle: &[(&str, String)]) {
    let mut out = String::new();
    for (mime, content) in bundle {
        out += &format!("EVCXR_BEGIN_CONTENT {mime}\n{content}\nEVCXR_END_CONTENT\n");
    }
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    let _ = lock.write_all(out.as_bytes());
    let _ = lock.flush();
}

/// A value that renders richly in a notebook cell.
pub trait Rich {
    /// The MIME types and contents to show (`text/html`, `image/svg+xml`, `text/plain`).
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>>;

    /// Shows the value in an evcxr cell (called by evcxr for a cell's last expression). A rendering error is
    /// shown as text instead of the value.
    fn evcxr_display(&self) {
        match self.mime_bundle() {
            Ok(b) => emit(&b),
            Err(e) => emit(&[("text/plain", format!("(could not render: {e})"))]),
        }
    }
}

/// An HTML table of a DataFrame: every row up to 60, else the first and last 10 with an ellipsis row between
/// and the frame's size below (as pandas shows a long frame). Floats are printed as pandas prints them
/// ([`float_cells`]); the text fallback keeps Distiller's five decimals.
pub fn html_table(df: &DataFrame) -> Result<String> {
    let n = df.height();
    let shown: Vec<usize> = if n > MAX_HTML_ROWS { (0..HEAD_TAIL_ROWS).chain(n - HEAD_TAIL_ROWS..n).collect() } else { (0..n).collect() };
    let cols = df.columns();
    let mut cells = Vec::with_capacity(cols.len());
    for c in cols {
        cells.push(if c.dtype().is_float() { float_cells(&shown.iter().map(|&i| float_at(c, i)).collect::<Result<Vec<_>>>()?) } else { shown.iter().map(|&i| cell(c, i)).collect::<Result<Vec<_>>>()? });
    }
    let mut html = String::from("<table><thead><tr>");
    for c in cols {
        html += &format!("<th>{}</th>", escape(c.name()));
    }
    html += "</tr></thead><tbody>";
    for (k, &i) in shown.iter().enumerate() {
        if n > MAX_HTML_ROWS && i == n - HEAD_TAIL_ROWS {
            html += &format!("<tr>{}</tr>", "<td>…</td>".repeat(cols.len()));
        }
        html += "<tr>";
        for column in &cells {
            html += &format!("<td>{}</td>", escape(&column[k]));
        }
        html += "</tr>";
    }
    html += "</tbody></table>";
    if n > MAX_HTML_ROWS {
        html += &format!("<p>{n} rows × {} columns</p>", cols.len());
    }
    Ok(html)
}

fn float_at(c: &polars::prelude::Column, i: usize) -> Result<Option<f64>> {
    use polars::prelude::AnyValue;
    Ok(match c.get(i)? {
        AnyValue::Float64(v) => Some(v),
        // The shortest decimal that reads back as this f32 (96.2, not the f64 nearest it, 96.19999694824219).
        AnyValue::Float32(v) => v.to_string().parse().ok(),
        _ => None,
    })
}

/// Decimals pandas shows at most (`display.precision`).
const FLOAT_DECIMALS: usize = 6;

/// One float column's cells as pandas prints them: at most six decimals, trailing zeros trimmed alike across the
/// column (at least one kept, so `96.2` and `97.0` line up and read as floats), scientific notation when a value
/// would otherwise show as zero or is too large to read; `-0` shows as `0.0`, a missing value as an empty cell.
pub fn float_cells(values: &[Option<f64>]) -> Vec<String> {
    let finite: Vec<f64> = values.iter().flatten().copied().filter(|v| v.is_finite() && *v != 0.0).map(f64::abs).collect();
    let scientific = finite.iter().any(|&v| v < 10f64.powi(-(FLOAT_DECIMALS as i32)) || v >= 1e15);
    let full = |v: f64| if scientific { format!("{v:.FLOAT_DECIMALS$e}") } else { format!("{v:.FLOAT_DECIMALS$}") };
    // Decimals needed by the value that needs most, after trimming its trailing zeros.
    let needed = values
        .iter()
        .flatten()
        .filter(|v| v.is_finite())
        .map(|&v| {
            let text = full(v);
            let mantissa = text.split('e').next().unwrap_or(&text);
            let decimals = mantissa.split('.').nth(1).unwrap_or("");
            decimals.trim_end_matches('0').len()
        })
        .max()
        .unwrap_or(0)
        .max(1);
    values
        .iter()
        .map(|v| match *v {
            None => String::new(),
            Some(v) if v.is_nan() => "NaN".to_string(),
            Some(v) if v.is_infinite() => (if v > 0.0 { "inf" } else { "-inf" }).to_string(),
            Some(v) => {
                let v = if v == 0.0 { 0.0 } else { v };
                if scientific { format!("{v:.needed$e}") } else { format!("{v:.needed$}") }
            }
        })
        .collect()
}

/// Frames longer than this show their head and tail only in HTML (pandas' `display.max_rows` is 60).
const MAX_HTML_ROWS: usize = 60;
/// Rows shown at each end of a long frame.
const HEAD_TAIL_ROWS: usize = 10;

impl Rich for DataFrame {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![("text/html", html_table(self)?), ("text/plain", to_text_table(self)?)])
    }
}

/// PyTorch's name of a dtype (`torch.float32`).
fn torch_dtype(kind: Kind) -> String {
    let name = match kind {
        Kind::Uint8 => "uint8",
        Kind::Int8 => "int8",
        Kind::Int16 => "int16",
        Kind::Int => "int32",
        Kind::Int64 => "int64",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Bool => "bool",
        other => return format!("{other:?}"),
    };
    format!("torch.{name}")
}

/// A tensor as PyTorch prints it, with its shape and dtype always stated:
/// `tensor([1.0000, 2.5000], shape=[2], dtype=torch.float32)`. Large tensors are summarized with `...`.
///
/// ```
/// let t = tch::Tensor::from_slice(&[1i64, 2, 3, 4]).view([2, 2]);
/// assert_eq!(distill::display::tensor_text(&t), "tensor([[1, 2],\n        [3, 4]], shape=[2, 2], dtype=torch.int64)");
/// ```
pub fn tensor_text(t: &Tensor) -> String {
    if !t.defined() {
        return "tensor(undefined)".to_string();
    }
    // tch prints the values PyTorch's way, nested rows indented by one space, then a `Tensor[...]` line.
    let printed = format!("{t}");
    let values = printed.rsplit_once('\n').map_or("", |(values, _)| values).trim_end();
    let values = values.replace("\n ", "\n        ");
    let mut extra = format!("shape={:?}, dtype={}", t.size(), torch_dtype(t.kind()));
    if t.device() != tch::Device::Cpu {
        extra += &format!(", device={:?}", t.device());
    }
    if t.requires_grad() {
        extra += ", requires_grad=True";
    }
    format!("tensor({values}, {extra})")
}

impl Rich for Tensor {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![("text/plain", tensor_text(self))])
    }
}

impl Rich for Model {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let info = self.info();
        let text = format!("{self}\n{} on {}: {} parameters, {:?}", info.arch, info.dataset, self.num_parameters(), self.device());
        Ok(vec![("text/plain", text)])
    }
}

impl Rich for Preview {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let svg = crate::plot::schedule_preview(self)?.to_svg()?;
        let mut html = format!("<div>{svg}</div><pre>{}</pre>", escape(&self.to_string()));
        if !self.warnings.is_empty() {
            html += &format!("<p><b>{} warning(s)</b></p>", self.warnings.len());
        }
        Ok(vec![("text/html", html), ("text/plain", self.to_string())])
    }
}

impl Rich for crate::config::Schedule {
    /// The schedule as Distiller's YAML.
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let yaml = self.to_yaml()?;
        Ok(vec![("text/html", format!("<pre>{}</pre>", escape(&yaml))), ("text/plain", yaml)])
    }
}

impl Rich for crate::Error {
    /// An error as a styled block (a cell that shows what goes wrong, e.g. `from_yaml_str(..).unwrap_err()`).
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let style = "border-left:4px solid #c0392b;background:#fdecea;padding:6px 10px;font-family:monospace;white-space:pre-wrap";
        Ok(vec![("text/html", format!("<div style=\"{style}\">error: {}</div>", escape(&self.to_string()))), ("text/plain", format!("error: {self}"))])
    }
}

/// A two-column table (`name | value`) with a caption, as HTML and as aligned text.
fn key_value_bundle(caption: &str, rows: &[(&str, String)]) -> Vec<(&'static str, String)> {
    let text = rows.iter().map(|(k, v)| format!("{k:<30} {v}")).collect::<Vec<_>>().join("\n");
    let body: String = rows.iter().map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v))).collect();
    vec![("text/html", format!("<table><caption>{}</caption>{body}</table>", escape(caption))), ("text/plain", text)]
}

impl Rich for Metrics {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let rows = [
            ("top-1", format!("{:.2}%", self.top1)),
            ("top-5", format!("{:.2}%", self.top5)),
            ("loss", format!("{:.4}", self.loss)),
        ];
        Ok(key_value_bundle("metrics", &rows))
    }
}

impl Rich for TrainSummary {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let mut rows = vec![
            ("final (validation)", self.final_.to_string()),
            ("best (validation)", self.best.to_string()),
            ("test", self.test.to_string()),
            ("parameters", format!("{} ({} non-zero)", self.params, self.nnz_params)),
            ("sparsity of 2-D/4-D weights", format!("{:.2}%", 100.0 * self.sparsity)),
            ("wall time", format!("{:.1} s for {} epochs", self.wall_seconds, self.history.len())),
        ];
        if let Some(e) = &self.test_exits {
            let shares: Vec<String> = e.exits.iter().map(|x| format!("{:.1}% at {}", x.percent, x.exit)).collect();
            rows.insert(3, ("test, early exits", format!("{}; {:.1}% of the MACs saved", shares.join(", "), 100.0 * e.macs_saved())));
        }
        Ok(key_value_bundle(&format!("{} on {}", self.arch, self.dataset), &rows))
    }
}

impl Rich for crate::early_exit::ExitStats {
    /// The per-exit table and Distiller's log lines.
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let frame = self.frame()?;
        let lines = self.log_lines().join("\n");
        Ok(vec![("text/html", format!("{}<pre>{}</pre>", html_table(&frame)?, escape(&lines))), ("text/plain", format!("{}{lines}", to_text_table(&frame)?))])
    }
}

impl Rich for crate::export::deploy::DeployReport {
    /// The table, the verdicts and the chart.
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let frame = self.frame()?;
        let verdicts = self.verdicts();
        let items: String = verdicts.iter().map(|v| format!("<li>{}</li>", escape(v))).collect();
        let caption = format!("{} threads, onnxruntime {}", self.threads, self.onnxruntime_version);
        let html = format!("{}<p>{}</p><ul>{items}</ul><div>{}</div>", html_table(&frame)?, escape(&caption), self.chart()?.to_svg()?);
        let text = format!("{}{caption}\n{}", to_text_table(&frame)?, verdicts.iter().map(|v| format!("- {v}\n")).collect::<String>());
        Ok(vec![("text/html", html), ("text/plain", text)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn long_frames_show_head_and_tail_in_html() {
        let df = df!("i" => (0..100i64).collect::<Vec<_>>()).unwrap();
        let html = html_table(&df).unwrap();
        assert!(html.contains("<td>9</td></tr><tr><td>…</td></tr><tr><td>90</td>") && !html.contains("<td>50</td>"), "{html}");
        assert!(html.ends_with("<p>100 rows × 1 columns</p>"));
        assert!(!html_table(&df.head(Some(60))).unwrap().contains('…'));
    }

    #[test]
    fn dataframes_render_as_html_and_text() {
        let df = df!("Name" => ["a<b", "c"], "Fine (%)" => [50.0, 0.0]).unwrap();
        let b = df.mime_bundle().unwrap();
        assert_eq!(b[0].0, "text/html");
        assert!(b[0].1.contains("<th>Fine (%)</th>") && b[0].1.contains("<td>a&lt;b</td>") && b[0].1.contains("<td>50.0</td>"), "{}", b[0].1);
        assert!(b[1].1.contains("| a<b  |"), "{}", b[1].1);
        let piped = df!("rule" => ["x | y"]).unwrap();
        assert!(html_table(&piped).unwrap().contains("<td>x | y</td></tr>"));
    }

    #[test]
    fn floats_show_as_pandas_shows_them() {
        let cells = |v: &[f64]| float_cells(&v.iter().map(|&x| Some(x)).collect::<Vec<_>>());
        assert_eq!(cells(&[96.2, 97.0, 95.6]), ["96.2", "97.0", "95.6"]);
        assert_eq!(cells(&[96.19999694824219]), ["96.199997"]);
        assert_eq!(cells(&[0.5, 0.25, -0.0]), ["0.50", "0.25", "0.00"]);
        assert_eq!(cells(&[0.0261234567, 1.0]), ["0.026123", "1.000000"]);
        assert_eq!(cells(&[3.0, 12.0]), ["3.0", "12.0"]);
        assert_eq!(cells(&[2.5e-9, 0.5]), ["2.5e-9", "5.0e-1"]);
        assert_eq!(cells(&[2e16]), ["2.0e16"]);
        assert_eq!(float_cells(&[Some(f64::NAN), None, Some(f64::NEG_INFINITY), Some(1.5)]), ["NaN", "", "-inf", "1.5"]);
        let df = df!("top1" => [96.19999694824219f32, 97.0f32]).unwrap();
        assert!(html_table(&df).unwrap().contains("<td>96.2</td></tr><tr><td>97.0</td>"), "{}", html_table(&df).unwrap());
    }

    #[test]
    fn tensors_show_values_dtype_and_shape() {
        let t = Tensor::from_slice(&[1.0f32, 2.5]);
        let text = &t.mime_bundle().unwrap()[0].1;
        assert_eq!(text, "tensor([1.0000, 2.5000], shape=[2], dtype=torch.float32)");
        let m = Tensor::from_slice(&[1i64, 2, 3, 4]).view([2, 2]);
        assert_eq!(m.mime_bundle().unwrap()[0].1, "tensor([[1, 2],\n        [3, 4]], shape=[2, 2], dtype=torch.int64)");
        assert_eq!(tensor_text(&Tensor::new()), "tensor(undefined)");
    }

    #[test]
    fn metrics_render_as_a_table() {
        let b = Metrics { loss: 0.25, top1: 97.4, top5: 100.0 }.mime_bundle().unwrap();
        assert!(b[0].1.contains("<tr><th>top-1</th><td>97.40%</td></tr>"), "{}", b[0].1);
        assert!(b[1].1.contains("top-5                          100.00%"), "{}", b[1].1);
    }

    #[test]
    fn schedules_show_their_yaml_and_errors_a_styled_block() {
        let s = crate::config::Schedule::from_yaml_str("pruners:\n  p:\n    class: AutomatedGradualPruner\n    initial_sparsity: 0.05\n    final_sparsity: 0.5\n    weights: [fc1.weight]\n", "s.yaml").unwrap();
        let b = s.mime_bundle().unwrap();
        assert!(b[0].1.starts_with("<pre>") && b[0].1.contains("class: AutomatedGradualPruner"), "{}", b[0].1);
        let e = crate::config::Schedule::from_yaml_str("pruners:\n  p:\n    class: Nope\n", "bad.yaml").unwrap_err();
        let b = e.mime_bundle().unwrap();
        assert!(b[0].1.starts_with("<div style=") && b[0].1.contains("error: bad.yaml:3:"), "{}", b[0].1);
        assert!(b[1].1.starts_with("error: bad.yaml:3:"), "{}", b[1].1);
    }
}
