//! The deployment report: the same model as several variants (dense, masked, thinned, quantized), each exported
//! to ONNX and measured on this machine in onnxruntime and in libtorch: file size, latency per batch size (warm,
//! median of many runs) and test accuracy, as a DataFrame, a chart and plain verdicts on whether pruning or
//! quantization brought speed.
//!
//! onnxruntime is reached through the Python of the project's `.venv` (installed by `scripts/setup.sh`): the
//! report writes a small runner script next to its files and calls it once for all variants. Nothing else in
//! distill needs Python.
//!
//! ```no_run
//! use distill::export::deploy::{deploy_report, DeployOptions};
//! let data = distill::data::mnist_bundled()?;
//! let dense = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let mut variants = vec![("dense".to_string(), dense)];
//! let dir = distill::io::TempDir::new()?;
//! let report = deploy_report(&mut variants, &data.test, dir.path(), &DeployOptions::default())?;
//! println!("{}", report.frame()?);
//! # Ok::<(), distill::Error>(())
//! ```
use std::path::{Path, PathBuf};
use std::time::Instant;

use polars::prelude::*;
use tch::{Kind, Tensor};

use super::onnx::export_onnx;
use crate::data::Dataset;
use crate::nn::Model;
use crate::plot::{Figure, Panel, PanelKind};
use crate::{Error, Result};

/// How the report measures.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployOptions {
    /// Batch sizes to time (the first test images).
    pub batch_sizes: Vec<i64>,
    /// Untimed runs before timing.
    pub warmup: usize,
    /// Timed runs; the report gives their median.
    pub runs: usize,
    /// Threads for both runtimes (libtorch's intra-op threads and onnxruntime's); `None`: libtorch's current
    /// setting.
    pub threads: Option<usize>,
    /// onnxruntime's graph optimizations at their default level (`true`) or off.
    pub onnxruntime_optimizations: bool,
    /// The Python with onnxruntime; `None`: `$DISTILL_PYTHON`, else `.venv/bin/python` in the current folder or
    /// above, else the one of the distill checkout this library was built from.
    pub python: Option<PathBuf>,
}

impl Default for DeployOptions {
    /// Batch 1 and 32, 5 warm-up and 50 timed runs, libtorch's threads, optimizations on.
    fn default() -> Self {
        DeployOptions { batch_sizes: vec![1, 32], warmup: 5, runs: 50, threads: None, onnxruntime_optimizations: true, python: None }
    }
}

/// Where a variant ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// distill's own forward pass in libtorch (for a quantized model: its float simulation of the integers).
    Libtorch,
    /// onnxruntime on the exported ONNX file, CPU execution provider.
    OnnxRuntime,
}

impl Runtime {
    /// `libtorch`, `onnxruntime`.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Libtorch => "libtorch",
            Runtime::OnnxRuntime => "onnxruntime",
        }
    }
}

/// One variant in one runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployRow {
    /// The variant's label.
    pub variant: String,
    /// The runtime.
    pub runtime: Runtime,
    /// Size of the variant's ONNX file.
    pub onnx_bytes: u64,
    /// Parameters (of a quantized model: its integer weights and the rest).
    pub parameters: i64,
    /// Non-zero parameters; `None` for a quantized model, whose integers hold a zero point.
    pub nonzero_parameters: Option<i64>,
    /// Multiply-accumulates of one sample; `None` for a quantized model.
    pub macs: Option<i64>,
    /// Whether the variant is quantized.
    pub quantized: bool,
    /// Quantized layers the ONNX file computes in floating point (see
    /// [`OnnxExport::float_weight_layers`](super::onnx::OnnxExport::float_weight_layers)).
    pub float_weight_layers: Vec<String>,
    /// Median latency in milliseconds, per batch size of [`DeployReport::batch_sizes`].
    pub latency_ms: Vec<f64>,
    /// Test top-1 accuracy in percent.
    pub top1: f64,
}

/// What [`deploy_report`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployReport {
    /// Batch sizes, in the order of each row's latencies.
    pub batch_sizes: Vec<i64>,
    /// Rows: every variant in libtorch, then in onnxruntime. The first variant is the baseline of the ratios.
    pub rows: Vec<DeployRow>,
    /// Threads both runtimes used.
    pub threads: usize,
    /// onnxruntime's version.
    pub onnxruntime_version: String,
}

/// The Python that runs onnxruntime for the report.
pub fn onnxruntime_python(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.exists() { Ok(p.to_path_buf()) } else { Err(Error::io(p, std::io::Error::from(std::io::ErrorKind::NotFound))) };
    }
    if let Some(p) = std::env::var_os("DISTILL_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let here = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .chain(std::iter::once(built_from))
        .map(|d| d.join(".venv/bin/python"))
        .find(|p| p.exists())
        .ok_or_else(|| Error::invalid("onnxruntime", "no Python with onnxruntime found: run scripts/setup.sh in the distill checkout (it installs onnxruntime into .venv), or set DISTILL_PYTHON"))
}

fn is_quantized(model: &Model) -> bool {
    let mut found = false;
    model.for_each_module(|_, m| found |= crate::graph::is_wrapper(m));
    found
}

fn total_macs(model: &mut Model) -> Result<i64> {
    let df = crate::summary::tables::model_performance_summary(model, 1)?;
    Ok(crate::summary::tables::column(&df, "MACs")?.i64()?.iter().flatten().sum())
}

/// Median latency of `model` in ms on the first `batch` test images, after `warmup` runs.
fn libtorch_latency(model: &mut Model, images: &Tensor, batch: i64, options: &DeployOptions) -> Result<f64> {
    let x = images.f_narrow(0, 0, batch)?.f_contiguous()?;
    let mut times = Vec::with_capacity(options.runs);
    tch::no_grad(|| -> Result<()> {
        for i in 0..options.warmup + options.runs {
            let start = Instant::now();
            let _ = model.forward_t(&x, false)?;
            if i >= options.warmup {
                times.push(start.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok(())
    })?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Exports each variant to `dir/<label>.onnx` and measures it in libtorch and in onnxruntime on `test`. The first
/// variant is the baseline the ratios and verdicts compare against (the dense model).
pub fn deploy_report(variants: &mut [(String, Model)], test: &Dataset, dir: impl AsRef<Path>, options: &DeployOptions) -> Result<DeployReport> {
    let dir = dir.as_ref();
    if variants.is_empty() {
        return Err(Error::invalid("variants", "give at least one model to measure"));
    }
    if options.runs == 0 || options.batch_sizes.is_empty() {
        return Err(Error::invalid("DeployOptions", "runs and batch_sizes must not be empty"));
    }
    if let Some(&b) = options.batch_sizes.iter().find(|&&b| b < 1 || b as usize > test.len()) {
        return Err(Error::invalid("batch_sizes", format!("{b}: must be between 1 and the {} test images", test.len())));
    }
    for (i, (label, _)) in variants.iter().enumerate() {
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || variants[..i].iter().any(|(l, _)| l == label) {
            return Err(Error::invalid("variants", format!("'{label}': labels name files, so they must be unique and use only letters, digits, '-', '_' and '.'")));
        }
    }
    let python = onnxruntime_python(options.python.as_deref())?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let previous_threads = tch::get_num_threads();
    let threads = options.threads.unwrap_or(previous_threads.max(1) as usize);
    tch::set_num_threads(threads as i32);
    let measured = measure_libtorch(variants, test, dir, options);
    tch::set_num_threads(previous_threads);
    let mut rows = measured?;

    let (images, labels) = (dir.join("test_images.f32"), dir.join("test_labels.i64"));
    crate::io::write_atomic(&images, &super::onnx::raw_bytes(test.images()?, Kind::Float)?)?;
    crate::io::write_atomic(&labels, &super::onnx::raw_bytes(test.labels(), Kind::Int64)?)?;
    let request = serde_json::json!({
        "images": images, "images_shape": test.images()?.size(), "labels": labels,
        "batch_sizes": options.batch_sizes, "warmup": options.warmup, "runs": options.runs, "threads": threads,
        "optimize": options.onnxruntime_optimizations,
        "models": variants.iter().map(|(l, _)| serde_json::json!({"label": l, "path": dir.join(format!("{l}.onnx"))})).collect::<Vec<_>>(),
    });
    let (request_path, result_path, script) = (dir.join("onnxruntime_request.json"), dir.join("onnxruntime_result.json"), dir.join("onnxruntime_bench.py"));
    crate::io::write_atomic(&request_path, request.to_string().as_bytes())?;
    crate::io::write_atomic(&script, include_str!("onnxruntime_bench.py").as_bytes())?;
    let run = std::process::Command::new(&python).arg(&script).arg(&request_path).arg(&result_path).output().map_err(|e| Error::io(&python, e))?;
    if !run.status.success() {
        let stderr = String::from_utf8_lossy(&run.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(Error::invalid("onnxruntime", format!("{} failed: {last}", python.display())));
    }
    let text = std::fs::read_to_string(&result_path).map_err(|e| Error::io(&result_path, e))?;
    let result: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::data(&result_path, e.to_string()))?;
    let bad = || Error::data(&result_path, "not what the onnxruntime runner writes");
    let models = result["models"].as_array().ok_or_else(bad)?;
    let libtorch_rows = rows.clone();
    for (row, m) in libtorch_rows.into_iter().zip(models) {
        let latency_ms = options.batch_sizes.iter().map(|b| m["latency_ms"][b.to_string()].as_f64().ok_or_else(bad)).collect::<Result<Vec<_>>>()?;
        rows.push(DeployRow { runtime: Runtime::OnnxRuntime, latency_ms, top1: m["top1"].as_f64().ok_or_else(bad)?, ..row });
    }
    let onnxruntime_version = result["onnxruntime"].as_str().unwrap_or("unknown").to_string();
    Ok(DeployReport { batch_sizes: options.batch_sizes.clone(), rows, threads, onnxruntime_version })
}

fn measure_libtorch(variants: &mut [(String, Model)], test: &Dataset, dir: &Path, options: &DeployOptions) -> Result<Vec<DeployRow>> {
    let mut rows = Vec::with_capacity(variants.len());
    for (label, model) in variants.iter_mut() {
        let export = export_onnx(model, dir.join(format!("{label}.onnx")))?;
        let quantized = is_quantized(model);
        let images = test.images()?.f_to_device(model.device())?;
        let latency_ms = options.batch_sizes.iter().map(|&b| libtorch_latency(model, &images, b, options)).collect::<Result<Vec<_>>>()?;
        let counts = crate::summary::parameter_counts(model)?;
        rows.push(DeployRow {
            variant: label.clone(),
            runtime: Runtime::Libtorch,
            onnx_bytes: export.file_bytes,
            parameters: counts.params,
            nonzero_parameters: if quantized { None } else { Some(counts.nnz_params) },
            macs: if quantized { None } else { Some(total_macs(model)?) },
            quantized,
            float_weight_layers: export.float_weight_layers,
            latency_ms,
            top1: crate::train::validate(model, test, 256)?.top1,
        });
    }
    Ok(rows)
}

/// Value `i` of a row's per-batch-size figures; NaN where a hand-built report has fewer.
fn at(values: &[f64], i: usize) -> f64 {
    values.get(i).copied().unwrap_or(f64::NAN)
}

impl DeployReport {
    fn baseline(&self, runtime: Runtime) -> Option<&DeployRow> {
        self.rows.iter().find(|r| r.runtime == runtime)
    }

    /// The baseline's latency over this row's, per batch size (above 1: faster).
    pub fn speedup(&self, row: &DeployRow) -> Vec<f64> {
        match self.baseline(row.runtime) {
            Some(base) => base.latency_ms.iter().zip(&row.latency_ms).map(|(b, r)| b / r).collect(),
            None => vec![f64::NAN; row.latency_ms.len()],
        }
    }

    /// One row per variant and runtime: `variant`, `runtime`, `ONNX bytes`, `parameters`, `nonzero parameters`,
    /// `MACs`, `latency b{B} (ms)` and `speedup b{B}` (against the first variant in the same runtime) per batch
    /// size, `top1 (%)`.
    pub fn frame(&self) -> Result<DataFrame> {
        let r = &self.rows;
        let mut columns: Vec<Column> = vec![
            Column::new("variant".into(), r.iter().map(|x| x.variant.clone()).collect::<Vec<_>>()),
            Column::new("runtime".into(), r.iter().map(|x| x.runtime.name()).collect::<Vec<_>>()),
            Column::new("ONNX bytes".into(), r.iter().map(|x| x.onnx_bytes).collect::<Vec<_>>()),
            Column::new("parameters".into(), r.iter().map(|x| x.parameters).collect::<Vec<_>>()),
            Column::new("nonzero parameters".into(), r.iter().map(|x| x.nonzero_parameters).collect::<Vec<_>>()),
            Column::new("MACs".into(), r.iter().map(|x| x.macs).collect::<Vec<_>>()),
        ];
        for (i, b) in self.batch_sizes.iter().enumerate() {
            columns.push(Column::new(format!("latency b{b} (ms)").into(), r.iter().map(|x| at(&x.latency_ms, i)).collect::<Vec<_>>()));
            columns.push(Column::new(format!("speedup b{b}").into(), r.iter().map(|x| at(&self.speedup(x), i)).collect::<Vec<_>>()));
        }
        columns.push(Column::new("top1 (%)".into(), r.iter().map(|x| x.top1).collect::<Vec<_>>()));
        Ok(DataFrame::new(r.len(), columns)?)
    }

    /// Latency per variant in each runtime at each batch size, and file sizes, as bar charts.
    pub fn chart(&self) -> Result<Figure> {
        let mut panels = Vec::new();
        for runtime in [Runtime::OnnxRuntime, Runtime::Libtorch] {
            let rows: Vec<&DeployRow> = self.rows.iter().filter(|r| r.runtime == runtime).collect();
            for (i, b) in self.batch_sizes.iter().enumerate() {
                let bars = PanelKind::Bars { labels: rows.iter().map(|r| r.variant.clone()).collect(), values: rows.iter().map(|r| at(&r.latency_ms, i)).collect() };
                panels.push(Panel::new(format!("{}, batch {b}: median latency ({} threads)", runtime.name(), self.threads), "variant", "ms", bars));
            }
        }
        let files: Vec<&DeployRow> = self.rows.iter().filter(|r| r.runtime == Runtime::OnnxRuntime).collect();
        let bars = PanelKind::Bars { labels: files.iter().map(|r| r.variant.clone()).collect(), values: files.iter().map(|r| r.onnx_bytes as f64 / 1024.0).collect() };
        panels.push(Panel::new("ONNX file size", "variant", "KiB", bars));
        Ok(Figure::new("Deployment: latency and size per variant", panels, self.batch_sizes.len().max(2)))
    }

    /// Plain sentences: for each variant after the first, what it saved and whether each runtime ran it faster at
    /// the largest batch size (a change within ±5% is called no change: timing noise is about that large).
    pub fn verdicts(&self) -> Vec<String> {
        let Some(base) = self.baseline(Runtime::Libtorch) else { return Vec::new() };
        let Some(last) = self.batch_sizes.len().checked_sub(1) else { return Vec::new() };
        let batch = self.batch_sizes[last];
        let mut out = Vec::new();
        for row in self.rows.iter().filter(|r| r.runtime == Runtime::Libtorch).skip(1) {
            let speed = |runtime: Runtime| {
                let r = self.rows.iter().find(|x| x.runtime == runtime && x.variant == row.variant)?;
                let s = at(&self.speedup(r), last);
                let words = if s >= 1.05 { format!("{s:.2}x faster") } else if s <= 0.95 { format!("{:.2}x slower", 1.0 / s) } else { format!("no faster ({s:.2}x)") };
                Some(format!("{} {words}", runtime.name()))
            };
            let (ort, torch) = (speed(Runtime::OnnxRuntime).unwrap_or_default(), speed(Runtime::Libtorch).unwrap_or_default());
            let size = base.onnx_bytes as f64 / row.onnx_bytes.max(1) as f64;
            let text = if row.quantized {
                let kernels = match row.float_weight_layers.len() {
                    0 => "every quantized layer can run in onnxruntime's integer kernels".to_string(),
                    n => format!(
                        "{n} layer(s) ({}) have per-channel weights with differing zero points, which onnxruntime's integer kernels do not take, so they run as float convolutions (SYMMETRIC weights would let them run in int8)",
                        row.float_weight_layers.join(", ")
                    ),
                };
                format!(
                    "{}: quantized, ONNX file {size:.2}x smaller; at batch {batch} {ort}; {kernels}; {torch}, but libtorch runs distill's float simulation of the integers, not integer kernels",
                    row.variant
                )
            } else if row.parameters < base.parameters {
                let macs = match (base.macs, row.macs) {
                    (Some(b), Some(r)) if b > 0 => format!(", {:.0}% of the MACs", 100.0 * r as f64 / b as f64),
                    _ => String::new(),
                };
                format!("{}: physically smaller ({:.0}% of the parameters{macs}, ONNX file {size:.2}x smaller); at batch {batch} {ort}, {torch}", row.variant, 100.0 * row.parameters as f64 / base.parameters.max(1) as f64)
            } else {
                let zeros = row.nonzero_parameters.map_or(0.0, |nz| 100.0 * (1.0 - nz as f64 / row.parameters.max(1) as f64));
                let within_noise = self.rows.iter().filter(|r| r.variant == row.variant).all(|r| (at(&self.speedup(r), last) - 1.0).abs() < 0.1);
                let conclusion = if within_noise {
                    "within timing noise of the dense model: a dense runtime runs every multiply, zero or not; thinning removes them"
                } else {
                    "a difference that cannot come from skipped multiplies (its shapes and MACs are the dense model's): timing noise or caches; measure with more runs"
                };
                format!(
                    "{}: {zeros:.0}% of its parameters are zero, but its shapes, MACs and file size are the dense model's (file ratio {size:.2}); at batch {batch} {ort}, {torch}: {conclusion}",
                    row.variant
                )
            };
            out.push(text);
        }
        out
    }
}
