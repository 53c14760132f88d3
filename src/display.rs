//! Rich output in Jupyter cells through the evcxr kernel. A cell whose last expression is a DataFrame, tensor,
//! model, schedule preview, run summary or figure shows an HTML (or SVG) view with a text fallback once
//! `use distill::prelude::*;` brought [`Rich`] into scope. evcxr keeps one output per MIME type per cell, so
//! every value renders as one bundle.
use std::io::Write;

use polars::prelude::DataFrame;
use tch::Tensor;

use crate::config::Preview;
use crate::nn::Model;
use crate::summary::tables::to_text_table;
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

/// An HTML table of a DataFrame (every row).
pub fn html_table(df: &DataFrame) -> Result<String> {
    let text = to_text_table(df)?;
    let cols = df.columns();
    let mut html = String::from("<table><thead><tr>");
    for c in cols {
        html += &format!("<th>{}</th>", escape(c.name()));
    }
    html += "</tr></thead><tbody>";
    // Reuse the text table's cell formatting: its data lines are `| a | b |`.
    for line in text.lines().filter(|l| l.starts_with('|') && !l.starts_with("|-")).skip(1) {
        html += "<tr>";
        for cell in line.trim_matches('|').split('|') {
            html += &format!("<td>{}</td>", escape(cell.trim()));
        }
        html += "</tr>";
    }
    html += "</tbody></table>";
    Ok(html)
}

impl Rich for DataFrame {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![("text/html", html_table(self)?), ("text/plain", to_text_table(self)?)])
    }
}

impl Rich for Tensor {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let text = format!("tensor({self}, dtype={:?}, shape={:?})", self.kind(), self.size());
        Ok(vec![("text/plain", text)])
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

impl Rich for TrainSummary {
    fn mime_bundle(&self) -> Result<Vec<(&'static str, String)>> {
        let rows = [
            ("final (validation)", format!("top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  epoch {}", self.final_.top1, self.final_.top5, self.final_.loss, self.final_.epoch)),
            ("best (validation)", format!("top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  epoch {}", self.best.top1, self.best.top5, self.best.loss, self.best.epoch)),
            ("test", format!("top-1 {:.2}%  top-5 {:.2}%  loss {:.4}", self.test.top1, self.test.top5, self.test.loss)),
            ("parameters", format!("{} ({} non-zero)", self.params, self.nnz_params)),
            ("sparsity of 2-D/4-D weights", format!("{:.2}%", 100.0 * self.sparsity)),
            ("wall time", format!("{:.1} s for {} epochs", self.wall_seconds, self.history.len())),
        ];
        let text = rows.iter().map(|(k, v)| format!("{k:<30} {v}")).collect::<Vec<_>>().join("\n");
        let html = format!(
            "<table><caption>{} on {}</caption>{}</table>",
            escape(&self.arch),
            escape(&self.dataset),
            rows.iter().map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v))).collect::<String>()
        );
        Ok(vec![("text/html", html), ("text/plain", text)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::*;

    #[test]
    fn dataframes_render_as_html_and_text() {
        let df = df!("Name" => ["a<b", "c"], "Fine (%)" => [50.0, 0.0]).unwrap();
        let b = df.mime_bundle().unwrap();
        assert_eq!(b[0].0, "text/html");
        assert!(b[0].1.contains("<th>Fine (%)</th>") && b[0].1.contains("<td>a&lt;b</td>") && b[0].1.contains("<td>50.00000</td>"), "{}", b[0].1);
        assert!(b[1].1.contains("| a<b  |"), "{}", b[1].1);
    }

    #[test]
    fn tensors_show_values_dtype_and_shape() {
        let t = Tensor::from_slice(&[1.0f32, 2.5]);
        let text = &t.mime_bundle().unwrap()[0].1;
        assert!(text.contains("2.5") && text.contains("dtype=Float") && text.contains("shape=[2]"), "{text}");
    }
}
