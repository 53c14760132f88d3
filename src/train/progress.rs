use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How training reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A bar on a terminal, compact lines elsewhere (notebooks, logs, CI).
    #[default]
    Auto,
    /// A single updating line (`\r`) on stderr.
    Bar,
    /// A line at each quarter of an epoch and one per epoch, on stdout: what a notebook cell shows well.
    Lines,
    /// Nothing but errors.
    Quiet,
}

impl std::str::FromStr for Progress {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "auto" => Ok(Progress::Auto),
            "bar" => Ok(Progress::Bar),
            "lines" => Ok(Progress::Lines),
            "quiet" => Ok(Progress::Quiet),
            other => Err(crate::Error::unknown("progress mode", other, ["auto", "bar", "lines", "quiet"])),
        }
    }
}

/// Prints progress within an epoch.
pub(crate) struct Reporter {
    mode: Progress,
    epoch: usize,
    epochs: usize,
    steps: usize,
    last_draw: Option<Instant>,
}

impl Reporter {
    pub(crate) fn new(mode: Progress, epoch: usize, epochs: usize, steps: usize) -> Self {
        let mode = match mode {
            Progress::Auto if std::io::stderr().is_terminal() => Progress::Bar,
            Progress::Auto => Progress::Lines,
            m => m,
        };
        Reporter { mode, epoch, epochs, steps, last_draw: None }
    }

    /// After mini-batch `step` (0-based) with the running training loss and top-1.
    pub(crate) fn step(&mut self, step: usize, loss: f64, top1: f64) {
        let done = step + 1;
        match self.mode {
            Progress::Bar => {
                let now = Instant::now();
                if done < self.steps && self.last_draw.is_some_and(|t| now - t < Duration::from_millis(100)) {
                    return;
                }
                self.last_draw = Some(now);
                let width = 30;
                let filled = width * done / self.steps.max(1);
                eprint!(
                    "\repoch {}/{} [{}{}] {done}/{} loss {loss:.4} top1 {top1:.2}%",
                    self.epoch + 1,
                    self.epochs,
                    "=".repeat(filled),
                    " ".repeat(width - filled),
                    self.steps
                );
                let _ = std::io::stderr().flush();
            }
            Progress::Lines => {
                let quarter = self.steps.div_ceil(4).max(1);
                if done % quarter == 0 && done < self.steps {
                    println!("epoch {}/{} [{done:>4}/{}] loss {loss:.4} top1 {top1:.2}%", self.epoch + 1, self.epochs, self.steps);
                }
            }
            Progress::Auto | Progress::Quiet => {}
        }
    }

    /// Erases the bar, if one is drawn.
    pub(crate) fn clear(&self) {
        if self.mode == Progress::Bar {
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }

    /// Prints `summary` (nothing when quiet).
    pub(crate) fn finish(&self, summary: &str) {
        match self.mode {
            Progress::Bar | Progress::Lines => println!("{summary}"),
            Progress::Auto | Progress::Quiet => {}
        }
    }
}
