//! Training logs: TensorBoard event files with Distiller's tags, Distiller's CSV files, and (in the training
//! loop) the console. `distill train --out DIR` writes all of them into DIR.
pub mod posthoc;
pub mod tensorboard;

use std::path::{Path, PathBuf};

use crate::nn::Model;
use crate::summary::sparsity::{sparsity, sparsity_2d};
use crate::Result;

pub use posthoc::{compare_runs, read_runs};
pub use tensorboard::{read_scalars, EventWriter, ScalarEvent};

/// Receives what the training loop reports (Distiller's `DataLogger`).
pub trait DataLogger: Send {
    /// Statistics under `prefix` (`Performance/Training/`, `Performance/Validation/`) at mini-batch `completed`
    /// of `total` in `epoch`.
    fn log_training_progress(&mut self, prefix: &str, stats: &[(String, f64)], epoch: usize, completed: usize, total: usize) -> Result<()>;
    /// Per-tensor sparsity of the 2-D and 4-D weights after `epoch`.
    fn log_weights_sparsity(&mut self, model: &Model, epoch: usize) -> Result<()>;
    /// Histograms of the weights at `step`.
    fn log_weights_distribution(&mut self, model: &Model, step: i64) -> Result<()> {
        let _ = (model, step);
        Ok(())
    }
    /// Writes buffered data.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Distiller's `TensorBoardLogger`: scalars at step `total·epoch + completed`, `sparsity/weights/<param>`,
/// `sparsity-2D/weights/<param>` and `sparsity/weights/total` at step `epoch`, weight histograms tagged with the
/// parameter name's dots replaced by slashes.
pub struct TensorBoardLogger {
    writer: EventWriter,
}

impl TensorBoardLogger {
    /// Writes into `logdir`.
    pub fn new(logdir: impl AsRef<Path>) -> Result<Self> {
        Ok(TensorBoardLogger { writer: EventWriter::create(logdir)? })
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        self.writer.path()
    }
}

impl DataLogger for TensorBoardLogger {
    fn log_training_progress(&mut self, prefix: &str, stats: &[(String, f64)], epoch: usize, completed: usize, total: usize) -> Result<()> {
        let step = (total * epoch + completed) as i64;
        for (name, value) in stats {
            self.writer.add_scalar(&format!("{prefix}{name}"), *value, step)?;
        }
        Ok(())
    }

    fn log_weights_sparsity(&mut self, model: &Model, epoch: usize) -> Result<()> {
        let (mut zeros, mut total) = (0.0, 0.0);
        for (name, t) in model.state_dict().into_iter().filter(|(_, t)| matches!(t.dim(), 2 | 4)) {
            let s = sparsity(&t)?;
            self.writer.add_scalar(&format!("sparsity/weights/{name}"), 100.0 * s, epoch as i64)?;
            self.writer.add_scalar(&format!("sparsity-2D/weights/{name}"), 100.0 * sparsity_2d(&t)?, epoch as i64)?;
            zeros += s * t.numel() as f64;
            total += t.numel() as f64;
        }
        let overall = if total > 0.0 { 100.0 * zeros / total } else { 0.0 };
        self.writer.add_scalar("sparsity/weights/total", overall, epoch as i64)
    }

    fn log_weights_distribution(&mut self, model: &Model, step: i64) -> Result<()> {
        for (name, t) in model.named_parameters().into_iter().filter(|(n, _)| n.contains("weight")) {
            self.writer.add_histogram(&name.replace('.', "/"), &t, 200, step)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.writer.flush()
    }
}

/// Distiller's `CsvLogger`: `weights_sparsity.csv` (`parameter, shape, volume, sparse volume, sparsity level`,
/// the level in %), rewritten after every epoch.
pub struct CsvLogger {
    dir: PathBuf,
}

impl CsvLogger {
    /// Writes into `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CsvLogger { dir: dir.into() }
    }
}

impl DataLogger for CsvLogger {
    fn log_training_progress(&mut self, _: &str, _: &[(String, f64)], _: usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }

    fn log_weights_sparsity(&mut self, model: &Model, _: usize) -> Result<()> {
        let mut out = String::from("parameter,shape,volume,sparse volume,sparsity level\n");
        for (name, t) in model.state_dict().into_iter().filter(|(_, t)| matches!(t.dim(), 2 | 4)) {
            let shape: Vec<String> = t.size().iter().map(|d| d.to_string()).collect();
            let volume = t.numel();
            let s = sparsity(&t)?;
            let nnz = ((1.0 - s) * volume as f64).round() as i64;
            out += &format!("{name},\"({})\",{volume},{nnz},{}\n", shape.join(", "), 100.0 * s);
        }
        let path = self.dir.join("weights_sparsity.csv");
        crate::io::write_atomic(&path, out.as_bytes())
    }
}
