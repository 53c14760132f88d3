//! Post-hoc analysis: the TensorBoard event files and `metrics.csv` of one or many runs read back into one tidy
//! DataFrame (`run`, `tag`, `step`, `value`, `wall_time`), and runs compared side by side (Distiller's
//! `compare_executions` notebook). Event files from other writers (PyTorch's `SummaryWriter`, TensorFlow) are
//! read too.
use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::tensorboard::read_scalars;
use crate::summary::tables::column;
use crate::{Error, Result};

/// The event files under `dir`. Each folder is visited once (by its canonical path), so a symbolic link back up
/// the tree does not loop; a link that points nowhere is skipped with a warning.
fn event_files(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut std::collections::HashSet<PathBuf>, warnings: &mut Vec<String>) -> Result<()> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if std::fs::metadata(&p).is_err() {
            warnings.push(format!("{}: a link to nothing; skipped", p.display()));
        } else if p.is_dir() {
            event_files(&p, out, seen, warnings)?;
        } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents")) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads every scalar of the runs in `dirs` (each folder is a run, named after it; event files in sub-folders
/// count too) and each run's `metrics.csv` (as tags `metrics/<column>` at step = epoch). Returns the frame and
/// the warnings of truncated files, whose complete records are kept.
pub fn read_runs<P: AsRef<Path>>(dirs: &[P]) -> Result<(DataFrame, Vec<String>)> {
    let (mut run, mut tag, mut step, mut value, mut wall) = (Vec::new(), Vec::new(), Vec::<i64>::new(), Vec::new(), Vec::new());
    let mut warnings = Vec::new();
    for dir in dirs {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::data(dir, "not a folder of run logs"));
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
        let mut files = Vec::new();
        event_files(dir, &mut files, &mut Default::default(), &mut warnings)?;
        files.sort();
        for f in &files {
            let (events, warning) = read_scalars(f)?;
            warnings.extend(warning);
            for e in events {
                run.push(name.clone());
                tag.push(e.tag);
                step.push(e.step);
                value.push(e.value);
                wall.push(e.wall_time);
            }
        }
        let csv = dir.join("metrics.csv");
        if csv.is_file() {
            let text = std::fs::read_to_string(&csv).map_err(|e| Error::io(&csv, e))?;
            let mut lines = text.lines();
            let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
            for (i, line) in lines.enumerate() {
                let cells: Vec<&str> = line.split(',').collect();
                if cells.len() != header.len() {
                    warnings.push(format!("{}: line {} has {} fields, expected {}; skipped", csv.display(), i + 2, cells.len(), header.len()));
                    continue;
                }
                let Ok(epoch) = cells[0].parse::<i64>() else { continue };
                for (h, c) in header.iter().zip(&cells).skip(1) {
                    if let Ok(v) = c.parse::<f64>() {
                        run.push(name.clone());
                        tag.push(format!("metrics/{h}"));
                        step.push(epoch);
                        value.push(v);
                        wall.push(f64::NAN);
                    }
                }
            }
        }
        if files.is_empty() && !csv.is_file() {
            warnings.push(format!("{}: no event files and no metrics.csv", dir.display()));
        }
    }
    let df = df!("run" => run, "tag" => tag, "step" => step, "value" => value, "wall_time" => wall)?;
    Ok((df, warnings))
}

/// One tag of several runs side by side: a `step` column and one column per run (missing values are null).
pub fn compare_runs(runs: &DataFrame, tag: &str) -> Result<DataFrame> {
    let tags = column(runs, "tag")?.str()?.clone();
    let names = column(runs, "run")?.str()?.clone();
    let steps = column(runs, "step")?.i64()?.clone();
    let values = column(runs, "value")?.f64()?.clone();
    let mut run_order: Vec<String> = Vec::new();
    let mut rows: std::collections::BTreeMap<i64, Vec<(String, f64)>> = Default::default();
    for i in 0..runs.height() {
        if tags.get(i) != Some(tag) {
            continue;
        }
        let (Some(r), Some(s), Some(v)) = (names.get(i), steps.get(i), values.get(i)) else { continue };
        if !run_order.iter().any(|x| x == r) {
            run_order.push(r.to_string());
        }
        rows.entry(s).or_default().push((r.to_string(), v));
    }
    if run_order.is_empty() {
        let all: Vec<String> = {
            let mut t: Vec<String> = tags.iter().flatten().map(String::from).collect();
            t.sort();
            t.dedup();
            t
        };
        return Err(Error::unknown("tag", tag, all));
    }
    let mut columns = vec![Column::new("step".into(), rows.keys().copied().collect::<Vec<i64>>())];
    for r in &run_order {
        let col: Vec<Option<f64>> = rows.values().map(|vs| vs.iter().rev().find(|(n, _)| n == r).map(|(_, v)| *v)).collect();
        columns.push(Column::new(r.as_str().into(), col));
    }
    Ok(DataFrame::new_infer_height(columns)?)
}
