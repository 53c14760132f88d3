//! Distiller's training loop (`compress_classifier.py`), with every scheduler callback in its place,
//! validation, checkpoints every epoch plus the best one, and resume.
//!
//! [`fit`] runs it all; [`Trainer`] adds resume and a custom optimizer; [`train_epoch`] and [`validate`] are the
//! building blocks for your own loop. The loop is a convenience: you can call the scheduler's callbacks yourself
//! (see [`crate::scheduler`]).
//!
//! Determinism: at the start of each epoch libtorch's generator is seeded from (seed, epoch) and the training
//! set is shuffled from the same pair, so a run is a function of its seed, and a run resumed from a checkpoint
//! of epoch k continues exactly as the uninterrupted run would have.
mod allocator;
mod checkpoint;
mod evaluation;
mod pytorch;
mod progress;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Reduction, Tensor};

use crate::data::{epoch_seed, DataSplits, Dataset};
use crate::distributed::{data_parallel, ProcessGroup, ReduceOp};
use crate::early_exit::{early_exit_loss, forward_exits_in, EarlyExit, ExitStats};
use crate::logging::{CsvLogger, DataLogger, TensorBoardLogger};
use crate::metrics::{Metrics, MetricsAccumulator};
use crate::nn::Model;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::scheduler::{CompressionScheduler, Minibatch};
use crate::summary::{parameter_counts, ParameterCounts};
use crate::{Error, Result};

pub use allocator::retain_freed_memory;
pub use checkpoint::{Checkpoint, CheckpointFormat, CheckpointMeta, OptimizerMeta};
pub use evaluation::{evaluate, Evaluation};
pub(crate) use checkpoint::{replay_structure, StructureLog};
pub use progress::Progress;
use progress::Reporter;

/// Checkpoint of the latest epoch, in the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Checkpoint of the best epoch (fewest non-zero weights, then highest top-1).
pub const BEST_FILE: &str = "best.safetensors";
/// One row per epoch.
pub const METRICS_FILE: &str = "metrics.csv";
/// The run's outcome.
pub const SUMMARY_FILE: &str = "summary.json";

/// The largest mini-batch a run accepts (a larger value is a typo, and libtorch fails on it with a C++ trace).
pub const MAX_BATCH: usize = 1 << 20;

/// Hyper-parameters of a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Total epochs (a resumed run continues up to this number).
    pub epochs: usize,
    /// Samples per mini-batch.
    pub batch_size: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// Update rule.
    pub optimizer: OptimizerConfig,
    /// Seed of shuffles and of libtorch's generator.
    pub seed: u64,
    /// Where checkpoints, `metrics.csv` and `summary.json` go; nothing is written when `None`.
    pub out_dir: Option<PathBuf>,
    /// How progress is shown.
    pub progress: Progress,
    /// Train the model's early exits with these loss weights and validate with these thresholds (the model must
    /// have one exit per threshold: [`crate::early_exit::attach_exits`]).
    pub early_exit: Option<EarlyExit>,
    /// Train data-parallel across this group's processes: each trains on its share of every mini-batch of
    /// `batch_size` samples (the global batch, as in one process), gradients are averaged, and only rank 0
    /// writes to `out_dir` and shows progress. See [`crate::distributed`].
    pub distributed: Option<Arc<ProcessGroup>>,
    /// With `distributed`: batch norms normalize over the samples of every rank, as PyTorch's `SyncBatchNorm`
    /// ([`ProcessGroup::sync_batch_norm`]), instead of each rank's own (DDP's default). Data-parallel training of
    /// a batch-norm network then computes what one process computes with the global batch.
    pub sync_batch_norm: bool,
}

impl Default for TrainConfig {
    /// 10 epochs of SGD (lr 0.1, momentum 0.9, weight decay 1e-4: Distiller's defaults but the LR), batches of
    /// 64, seed 1, no output folder.
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 64,
            lr: 0.1,
            optimizer: OptimizerConfig::sgd(0.9, 1e-4),
            seed: 1,
            out_dir: None,
            progress: Progress::Auto,
            early_exit: None,
            distributed: None,
            sync_batch_norm: false,
        }
    }
}

/// What one epoch of training measured on its own mini-batches.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainEpochMetrics {
    /// Objective (cross-entropy) loss and accuracy.
    pub objective: Metrics,
    /// Objective loss plus the policies' terms, averaged per sample.
    pub overall_loss: f64,
    /// Each policy term, averaged per sample, by name.
    pub loss_components: Vec<(String, f64)>,
}

/// One row of the run's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 0.
    pub epoch: usize,
    /// Learning rate during the epoch.
    pub lr: f64,
    /// Training metrics.
    pub train: TrainEpochMetrics,
    /// Validation metrics.
    pub valid: Metrics,
    /// Parameter counts and sparsity at the end of the epoch.
    pub counts: ParameterCounts,
    /// Wall time of the epoch, validation included.
    pub seconds: f64,
    /// Early-exit statistics of the validation (a run with [`TrainConfig::early_exit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exits: Option<ExitStats>,
}

/// Validation results of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochResult {
    /// Top-1 accuracy, %.
    pub top1: f64,
    /// Top-5 accuracy, %.
    pub top5: f64,
    /// Mean loss.
    pub loss: f64,
    /// Epoch number.
    pub epoch: usize,
}

impl EpochResult {
    fn of(r: &EpochRecord) -> Self {
        EpochResult { top1: r.valid.top1, top5: r.valid.top5, loss: r.valid.loss, epoch: r.epoch }
    }

    /// The loss and accuracies without the epoch.
    pub fn metrics(&self) -> Metrics {
        Metrics { loss: self.loss, top1: self.top1, top5: self.top5 }
    }
}

/// `top-1 97.40%  top-5 100.00%  loss 0.1117  epoch 9`
impl std::fmt::Display for EpochResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}  epoch {}", self.metrics(), self.epoch)
    }
}

/// The outcome of a run; written as `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Architecture.
    pub arch: String,
    /// Dataset.
    pub dataset: String,
    /// Device, e.g. `Cpu`.
    pub device: String,
    /// Seed.
    pub seed: u64,
    /// Epochs trained in all (including those before a resume).
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Update rule.
    pub optimizer: OptimizerConfig,
    /// Validation results of the last epoch.
    #[serde(rename = "final")]
    pub final_: EpochResult,
    /// Validation results of the best epoch (fewest non-zero weights, then top-1, as Distiller).
    pub best: EpochResult,
    /// The final model on the held-out test set (with early exits: the network with its exits, as
    /// [`crate::early_exit::evaluate`] runs it).
    pub test: Metrics,
    /// Early-exit statistics on the test set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_exits: Option<ExitStats>,
    /// Parameter elements.
    pub params: i64,
    /// Non-zero parameter elements.
    pub nnz_params: i64,
    /// Elements of 2-D and 4-D weights.
    pub weights: i64,
    /// Non-zero elements of 2-D and 4-D weights.
    pub nnz_weights: i64,
    /// Fraction of zeros in 2-D and 4-D weights.
    pub sparsity: f64,
    /// Wall time of this call (a resumed run counts only its own part).
    pub wall_seconds: f64,
    /// Every epoch's record.
    pub history: Vec<EpochRecord>,
    /// Problems noticed during the run (a collapsed run: see [`collapse_warning`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Mean cross-entropy of `logits` against `labels`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(logits.f_cross_entropy_loss(labels, None::<Tensor>, Reduction::Mean, -100, 0.0)?)
}

/// Evaluates `model` on `data` in eval mode without gradients (the model's mode is restored afterwards).
pub fn validate(model: &mut Model, data: &Dataset, batch_size: usize) -> Result<Metrics> {
    eval_pass(model, data, batch_size, |_, _| Ok(()))
}

/// [`validate`] shared out over a process group: each rank evaluates its block of `data` and the sums are added
/// up, so every rank gets the metrics of the whole set.
pub fn validate_distributed(model: &mut Model, data: &Dataset, batch_size: usize, group: &ProcessGroup) -> Result<Metrics> {
    let shard = data.shard(group.rank(), group.world_size())?;
    let own = eval_sums(model, &shard, batch_size, |_, _| Ok(()))?;
    Ok(data_parallel::reduce_metrics(group, &own)?.metrics())
}

/// The evaluation loop of [`validate`] and [`evaluate`]: `on_batch` sees each batch's logits and labels.
fn eval_pass(model: &mut Model, data: &Dataset, batch_size: usize, on_batch: impl FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<Metrics> {
    Ok(eval_sums(model, data, batch_size, on_batch)?.metrics())
}

fn eval_sums(model: &mut Model, data: &Dataset, batch_size: usize, mut on_batch: impl FnMut(&Tensor, &Tensor) -> Result<()>) -> Result<MetricsAccumulator> {
    let was_training = model.is_training();
    model.eval();
    let result = tch::no_grad(|| -> Result<MetricsAccumulator> {
        let mut acc = MetricsAccumulator::default();
        for batch in data.batches(batch_size, model.device())? {
            let (x, y) = batch?;
            let logits = model.forward(&x)?;
            let loss = cross_entropy(&logits, &y)?.f_double_value(&[])?;
            acc.add(&logits, &y, loss)?;
            on_batch(&logits, &y)?;
        }
        Ok(acc)
    });
    if was_training {
        model.train();
    }
    result
}

/// How [`train_epoch`] runs one epoch.
pub struct EpochSettings<'a> {
    /// Samples per mini-batch.
    pub batch_size: usize,
    /// Orders the mini-batches and draws their augmentation.
    pub shuffle_seed: u64,
    /// Progress display.
    pub progress: Progress,
    /// Epochs of the whole run (for progress lines).
    pub total_epochs: usize,
    /// Receive the running training statistics four times per epoch.
    pub loggers: &'a mut [Box<dyn DataLogger>],
    /// Train the model's exits with this loss (the objective loss is then Distiller's `earlyexit_loss`, and the
    /// accuracy is the final classifier's).
    pub early_exit: Option<&'a EarlyExit>,
    /// Train data-parallel across this group: `batch_size` is the global mini-batch, of which this rank trains
    /// on its share ([`Dataset::train_shard_batches`]); gradients are averaged after each backward pass and
    /// rank 0's buffers are copied to all before each forward pass, as in PyTorch's DistributedDataParallel.
    /// The returned metrics are all ranks'; the loggers see this rank's running figures.
    pub group: Option<&'a ProcessGroup>,
    /// With `group`: batch norms normalize over every rank's samples ([`TrainConfig::sync_batch_norm`]).
    pub sync_batch_norm: bool,
}

impl EpochSettings<'_> {
    /// Settings with no loggers and no progress display.
    pub fn quiet(batch_size: usize, shuffle_seed: u64) -> EpochSettings<'static> {
        EpochSettings { batch_size, shuffle_seed, progress: Progress::Quiet, total_epochs: 1, loggers: &mut [], early_exit: None, group: None, sync_batch_norm: false }
    }
}

/// One epoch of training on `data`, in Distiller's order of scheduler callbacks (see [`crate::scheduler`]).
///
/// The optimizer's learning rate is left alone (LR policies change it). Running statistics go to the loggers
/// under `Performance/Training/` (`Overall Loss`, `Objective Loss`, each loss component, `Top1`, `Top5`, `LR`,
/// `Time`) at each quarter of the epoch.
pub fn train_epoch(
    model: &mut Model,
    data: &Dataset,
    optimizer: &mut Optimizer,
    mut scheduler: Option<&mut CompressionScheduler>,
    epoch: usize,
    settings: EpochSettings,
) -> Result<TrainEpochMetrics> {
    let EpochSettings { batch_size, shuffle_seed, progress, total_epochs, loggers, early_exit, group, sync_batch_norm } = settings;
    let batch_norm_group = group.filter(|_| sync_batch_norm);
    retain_freed_memory();
    if let Some(ee) = early_exit {
        ee.check_model(model)?;
    }
    model.train();
    let per_epoch = match group {
        Some(g) => data.shard_steps(batch_size, g.world_size()),
        None => data.steps(batch_size),
    };
    let batches = match group {
        Some(g) => data.train_shard_batches(batch_size, shuffle_seed, g.rank(), g.world_size(), model.device())?,
        None => data.train_batches(batch_size, shuffle_seed, model.device())?,
    };
    let has_buffers = group.is_some() && !model.named_buffers().is_empty();
    let log_every = per_epoch.div_ceil(4).max(1);
    let started = Instant::now();
    let mut reporter = Reporter::new(progress, epoch, total_epochs, per_epoch);
    let mut acc = MetricsAccumulator::default();
    let mut overall_sum = 0.0;
    let mut components: Vec<(String, f64)> = Vec::new();
    for (index, batch) in batches.enumerate() {
        let (x, y) = batch?;
        let mb = Minibatch { index, per_epoch };
        if let (Some(g), true) = (group, has_buffers) {
            data_parallel::broadcast_buffers(g, model)?;
        }
        if let Some(s) = scheduler.as_deref_mut() {
            s.on_minibatch_begin(model, epoch, mb, Some(optimizer))?;
        }
        let mut pass = model.pass(true);
        if let Some(g) = batch_norm_group {
            pass = pass.with_synchronized_batch_norm(g);
        }
        let (logits, exits) = match early_exit {
            Some(_) => {
                let out = forward_exits_in(model, pass, &x)?;
                (out.final_.shallow_clone(), Some(out))
            }
            None => (model.forward_with(&x, &mut pass)?, None),
        };
        if let Some(s) = scheduler.as_deref_mut() {
            s.after_forward(model, epoch, mb, &x, &logits, Some(optimizer))?;
        }
        let loss = match (&exits, early_exit) {
            (Some(out), Some(ee)) => early_exit_loss(out, &y, &ee.loss_weights)?,
            _ => cross_entropy(&logits, &y)?,
        };
        let loss_value = loss.f_double_value(&[])?;
        if !loss_value.is_finite() {
            return Err(Error::invalid(
                "training",
                format!(
                    "the loss is {loss_value} at epoch {epoch}, mini-batch {index}: lower the learning rate (now {}) or check the weights and data for NaN",
                    optimizer.lr()
                ),
            ));
        }
        let n = y.size()[0] as f64;
        let overall = match scheduler.as_deref_mut() {
            Some(s) => {
                let policy_loss = s.before_backward_pass(model, epoch, mb, &loss, Some(optimizer))?;
                for c in &policy_loss.loss_components {
                    let v = c.value.f_double_value(&[])? * n;
                    match components.iter_mut().find(|(name, _)| *name == c.name) {
                        Some((_, sum)) => *sum += v,
                        None => components.push((c.name.clone(), v)),
                    }
                }
                policy_loss.overall_loss
            }
            None => loss.shallow_clone(),
        };
        optimizer.zero_grad();
        overall.f_backward()?;
        if let Some(g) = group {
            let global = batch_size.min(data.len() - index * batch_size);
            data_parallel::average_gradients(g, optimizer, y.size()[0] as usize, global)?;
        }
        if let Some(s) = scheduler.as_deref_mut() {
            s.before_parameter_optimization(model, epoch, mb, Some(optimizer))?;
        }
        optimizer.step()?;
        if let Some(s) = scheduler.as_deref_mut() {
            s.on_minibatch_end(model, epoch, mb, Some(optimizer))?;
        }
        overall_sum += overall.f_double_value(&[])? * n;
        acc.add(&logits.f_detach()?, &y, loss_value)?;
        let running = acc.metrics();
        reporter.step(index, running.loss, running.top1);
        let done = index + 1;
        if !loggers.is_empty() && (done % log_every == 0 || done == per_epoch) {
            let seen = acc.samples().max(1) as f64;
            let mut stats = vec![("Overall Loss".to_string(), overall_sum / seen), ("Objective Loss".to_string(), running.loss)];
            stats.extend(components.iter().map(|(n, v)| (n.clone(), v / seen)));
            stats.extend([
                ("Top1".to_string(), running.top1),
                ("Top5".to_string(), running.top5),
                ("LR".to_string(), optimizer.lr()),
                ("Time".to_string(), started.elapsed().as_secs_f64() / done as f64),
            ]);
            for l in loggers.iter_mut() {
                l.log_training_progress("Performance/Training/", &stats, epoch, done, per_epoch)?;
            }
        }
    }
    if let Some(g) = group {
        acc = data_parallel::reduce_metrics(g, &acc)?;
        let mut sums = Tensor::f_from_slice(&std::iter::once(overall_sum).chain(components.iter().map(|(_, v)| *v)).collect::<Vec<f64>>())?;
        g.all_reduce(&mut sums, ReduceOp::Sum)?;
        let sums = Vec::<f64>::try_from(&sums)?;
        overall_sum = sums[0];
        for ((_, v), total) in components.iter_mut().zip(&sums[1..]) {
            *v = *total;
        }
    }
    let samples = acc.samples().max(1) as f64;
    let objective = acc.metrics();
    reporter.clear();
    Ok(TrainEpochMetrics {
        objective,
        overall_loss: overall_sum / samples,
        loss_components: components.into_iter().map(|(n, s)| (n, s / samples)).collect(),
    })
}

/// The best epoch as Distiller's `SparsityAccuracyTracker` ranks them: fewest non-zero weights, then highest
/// top-1, then top-5, then the latest epoch.
pub fn best_epoch(history: &[EpochRecord]) -> Option<&EpochRecord> {
    history.iter().max_by(|a, b| {
        b.counts
            .nnz_weights
            .cmp(&a.counts.nnz_weights)
            .then(a.valid.top1.total_cmp(&b.valid.top1))
            .then(a.valid.top5.total_cmp(&b.valid.top5))
            .then(a.epoch.cmp(&b.epoch))
    })
}

/// A training run: model, optimizer, optional scheduler, configuration and history.
pub struct Trainer<'a> {
    model: &'a mut Model,
    optimizer: Optimizer,
    scheduler: Option<&'a mut CompressionScheduler>,
    config: TrainConfig,
    history: Vec<EpochRecord>,
    loggers: Vec<Box<dyn DataLogger>>,
    warnings: Vec<String>,
    /// Where a resumed run starts when it has no history to tell (a Distiller checkpoint's epoch + 1).
    resumed_at: usize,
}

impl<'a> Trainer<'a> {
    /// A run of `config` on `model`, with an optimizer over all its trainable parameters.
    pub fn new(model: &'a mut Model, config: TrainConfig) -> Result<Self> {
        if config.epochs == 0 {
            return Err(Error::invalid("epochs", "must be at least 1"));
        }
        crate::scheduler::check_epochs("epochs", config.epochs)?;
        if config.batch_size == 0 || config.batch_size > MAX_BATCH {
            return Err(Error::invalid("batch size", format!("{} must lie in 1..={MAX_BATCH}", config.batch_size)));
        }
        if let Some(ee) = &config.early_exit {
            ee.check_model(model)?;
        }
        if config.sync_batch_norm {
            if config.distributed.is_none() {
                return Err(Error::invalid("sync_batch_norm", "synchronizes batch norms across the ranks of data-parallel training: set `distributed` (distill train --nproc N, or a torchrun launch)"));
            }
            if !model.named_modules().iter().any(|m| m.type_name.starts_with("BatchNorm")) {
                return Err(Error::invalid("sync_batch_norm", format!("{} has no batch norm to synchronize", model.info().arch)));
            }
        }
        let mut config = config;
        if let Some(g) = &config.distributed {
            if config.batch_size < g.world_size() {
                return Err(Error::invalid(
                    "batch size",
                    format!("{} is the global mini-batch, shared by {} ranks: give at least one sample per rank", config.batch_size, g.world_size()),
                ));
            }
            // Only rank 0 writes and talks.
            if g.rank() != 0 {
                config.out_dir = None;
                config.progress = Progress::Quiet;
            }
        }
        let optimizer = Optimizer::for_model(model, config.optimizer, config.lr)?;
        Ok(Trainer { model, optimizer, scheduler: None, config, history: Vec::new(), loggers: Vec::new(), warnings: Vec::new(), resumed_at: 0 })
    }

    /// Also reports to `logger` (with an output folder, TensorBoard and CSV loggers are added by [`Trainer::run`]).
    pub fn with_logger(mut self, logger: Box<dyn DataLogger>) -> Self {
        self.loggers.push(logger);
        self
    }

    /// Uses `optimizer` instead of the one built from the configuration.
    pub fn with_optimizer(mut self, optimizer: Optimizer) -> Self {
        self.optimizer = optimizer;
        self
    }

    /// Drives `scheduler`'s callbacks during training.
    pub fn with_scheduler(mut self, scheduler: &'a mut CompressionScheduler) -> Self {
        self.scheduler = Some(scheduler);
        self
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Completed epochs.
    pub fn history(&self) -> &[EpochRecord] {
        &self.history
    }

    /// The epoch [`Trainer::run`] starts with: 0, or the one after a resumed checkpoint's.
    pub fn next_epoch(&self) -> usize {
        self.history.last().map_or(self.resumed_at, |r| r.epoch + 1)
    }

    /// Continues from a checkpoint: weights, optimizer state and learning rates, masks, policy progress and
    /// history. Training resumes at the epoch after the saved one. The checkpoint must come from the same
    /// architecture (the error lists every tensor that differs).
    pub fn resume(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let ckpt = Checkpoint::load(path)?;
        let distiller = matches!(ckpt.format, CheckpointFormat::Distiller { .. });
        if !distiller && ckpt.format != CheckpointFormat::Distill {
            return Err(Error::checkpoint(
                path,
                format!("a {} holds weights but no epoch or training state to resume: start a new run from its weights (--load-weights)", ckpt.format),
            ));
        }
        // The optimizer was built over the model's parameters, so exits cannot be added now.
        let saved: Vec<&str> = ckpt.meta.early_exits.iter().map(|e| e.at.as_str()).collect();
        let own: Vec<&str> = self.model.early_exits().iter().map(|e| e.at.as_str()).collect();
        if saved != own {
            return Err(Error::checkpoint(
                path,
                format!("the checkpoint's model has early exits after {saved:?}, this model after {own:?}: attach the same exits (early_exit::attach_exits, or the same --earlyexit-* flags) before building the Trainer"),
            ));
        }
        if ckpt.meta.factorizations != self.model.factorizations() {
            let layers = |f: &[crate::factorization::FactorizationSpec]| f.iter().map(|f| format!("{} (rank {})", f.layer, f.rank)).collect::<Vec<_>>();
            return Err(Error::checkpoint(
                path,
                format!(
                    "the checkpoint's model has {:?} factorized by truncated SVD, this model {:?}: factorize the same layers (factorization::truncated_svd) before building the Trainer",
                    layers(&ckpt.meta.factorizations),
                    layers(self.model.factorizations())
                ),
            ));
        }
        // Thinning first: a quantizer's preparation below must see the thinned layers.
        if ckpt.meta.arch == self.model.info().arch {
            ckpt.thin_like_saved(self.model, Some(&mut self.optimizer), path)?;
        }
        if let Some(s) = self.scheduler.as_deref_mut() {
            s.before_restore(self.model, ckpt.meta.epoch, Some(&mut self.optimizer))?;
        }
        ckpt.restore_model(self.model, path)?;
        ckpt.restore_optimizer(&mut self.optimizer, path)?;
        match self.scheduler.as_deref_mut() {
            Some(s) => s.load_state(&ckpt.masks, &ckpt.meta.policy_states, self.model)?,
            None if !ckpt.masks.is_empty() => {
                return Err(Error::checkpoint(path, "the checkpoint has pruning masks: resume it with the same compression schedule"));
            }
            None => {}
        }
        // A checkpoint of the last epoch is accepted: the run then only evaluates and writes its summary, which
        // finishes a run that was stopped between its last checkpoint and its summary.
        if ckpt.meta.epoch + 1 > self.config.epochs {
            return Err(Error::invalid(
                "epochs",
                format!("the checkpoint already completed {} epochs, more than the {} asked for; ask for more epochs to continue", ckpt.meta.epoch + 1, self.config.epochs),
            ));
        }
        // A Distiller checkpoint resumes with its weights, masks and epoch; its optimizer state (momentum) is in
        // PyTorch's form and is not carried over, and the run keeps its own seed.
        if !distiller {
            self.config.seed = ckpt.meta.seed;
        }
        self.history = ckpt.meta.history;
        self.resumed_at = ckpt.meta.epoch + 1;
        Ok(())
    }

    /// Trains up to `config.epochs`, validating every epoch, then evaluates the final model on the test set.
    pub fn run(&mut self, data: &DataSplits) -> Result<TrainSummary> {
        let started = Instant::now();
        for (split, set) in [("training", &data.train), ("validation", &data.valid), ("test", &data.test)] {
            if set.is_empty() {
                return Err(Error::invalid("data", format!("the {split} split has no samples; a run needs all three splits")));
            }
        }
        if let Some(dir) = &self.config.out_dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            self.loggers.push(Box::new(TensorBoardLogger::new(dir)?));
            self.loggers.push(Box::new(CsvLogger::new(dir.clone())));
        }
        if let Some(g) = &self.config.distributed {
            data_parallel::broadcast_state(g, self.model)?;
        }
        let start_epoch = self.next_epoch();
        for epoch in start_epoch..self.config.epochs {
            self.run_epoch(data, epoch)?;
        }
        let (test, test_exits) = self.validate(&data.test)?;
        let summary = self.summary(test, test_exits, started.elapsed().as_secs_f64())?;
        if self.config.progress != Progress::Quiet {
            println!("test: top1 {:.2}%  top5 {:.2}%  loss {:.4}", test.top1, test.top5, test.loss);
        }
        if let Some(dir) = &self.config.out_dir {
            let path = dir.join(SUMMARY_FILE);
            let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::invalid("summary", e.to_string()))?;
            crate::io::write_atomic(&path, (json + "\n").as_bytes())?;
        }
        Ok(summary)
    }

    fn run_epoch(&mut self, data: &DataSplits, epoch: usize) -> Result<()> {
        let started = Instant::now();
        let seed = epoch_seed(self.config.seed, epoch);
        // Ranks other than 0 draw their own dropout masks; the shuffle (below) is the same on every rank.
        let rank = self.config.distributed.as_ref().map_or(0, |g| g.rank() as u64);
        tch::manual_seed((seed ^ rank.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64);
        let lr = self.optimizer.lr();
        if let Some(s) = self.scheduler.as_deref_mut() {
            s.on_epoch_begin(self.model, epoch, Some(&mut self.optimizer))?;
        }
        let settings = EpochSettings {
            batch_size: self.config.batch_size,
            shuffle_seed: seed,
            progress: self.config.progress,
            total_epochs: self.config.epochs,
            loggers: &mut self.loggers,
            early_exit: self.config.early_exit.as_ref(),
            group: self.config.distributed.as_deref(),
            sync_batch_norm: self.config.sync_batch_norm,
        };
        let train = train_epoch(self.model, &data.train, &mut self.optimizer, self.scheduler.as_deref_mut(), epoch, settings)?;
        let (valid, exits) = self.validate(&data.valid)?;
        let mut stats = vec![("Loss".to_string(), valid.loss), ("Top1".to_string(), valid.top1), ("Top5".to_string(), valid.top5)];
        if let Some(e) = &exits {
            stats.extend(e.scalars());
            if self.config.progress != Progress::Quiet {
                println!("{}", e.log_lines().join("\n"));
            }
        }
        for l in self.loggers.iter_mut() {
            l.log_training_progress("Performance/Validation/", &stats, epoch, 0, 1)?;
            l.log_weights_sparsity(self.model, epoch)?;
            l.log_weights_distribution(self.model, epoch as i64)?;
            l.flush()?;
        }
        if let Some(s) = self.scheduler.as_deref_mut() {
            s.on_epoch_end(self.model, epoch, &valid, Some(&mut self.optimizer))?;
        }
        if let Some(g) = &self.config.distributed {
            let mut state = self.model.state_dict();
            state.extend(self.scheduler.as_deref().map(|s| s.masks().tensors()).unwrap_or_default());
            data_parallel::check_in_sync(g, &state, &format!("weights, buffers and masks after epoch {epoch}"))?;
        }
        let counts = parameter_counts(self.model)?;
        self.history.push(EpochRecord { epoch, lr, train, valid, counts, seconds: started.elapsed().as_secs_f64(), exits });
        let record = self.history.last().expect("just pushed");
        let best = best_epoch(&self.history).expect("non-empty history");
        let line = format!(
            "epoch {}/{}  train loss {:.4} top1 {:.2}  |  valid loss {:.4} top1 {:.2} top5 {:.2}  |  lr {lr:.4}  sparsity {:.2}%  ({:.1} s)\n\
             ==> Best [Top1: {:.3}   Top5: {:.3}   Sparsity:{:.2}   NNZ-Params: {} on epoch: {}]",
            epoch + 1,
            self.config.epochs,
            record.train.objective.loss,
            record.train.objective.top1,
            valid.loss,
            valid.top1,
            valid.top5,
            100.0 * counts.sparsity,
            record.seconds,
            best.valid.top1,
            best.valid.top5,
            100.0 * best.counts.sparsity,
            best.counts.nnz_weights,
            best.epoch,
        );
        Reporter::new(self.config.progress, epoch, self.config.epochs, 1).finish(&line);
        if self.warnings.is_empty() {
            if let Some(w) = collapse_warning(&self.history, self.model.info().num_classes, self.config.lr) {
                if self.config.progress != Progress::Quiet {
                    eprintln!("warning: {w}");
                }
                self.warnings.push(w);
            }
        }
        if let Some(dir) = self.config.out_dir.clone() {
            let is_best = best.epoch == epoch;
            let ckpt = Checkpoint::capture(self.model, Some(&self.optimizer), self.scheduler.as_deref(), epoch, self.config.seed, self.history.clone());
            ckpt.save(dir.join(CHECKPOINT_FILE))?;
            if is_best {
                // Copied to a partial file and renamed, so a kill never leaves a truncated best checkpoint.
                let partial = crate::io::partial_path(dir.join(BEST_FILE));
                std::fs::copy(dir.join(CHECKPOINT_FILE), &partial).map_err(|e| Error::io(&partial, e))?;
                crate::io::commit_atomic(&partial, dir.join(BEST_FILE))?;
            }
            write_metrics_csv(&dir.join(METRICS_FILE), &self.history)?;
        }
        Ok(())
    }

    /// Plain validation, or with early exits the network as deployed with its exits. Data-parallel, each rank
    /// evaluates its block of the plain validation (with early exits, every rank evaluates all of it) with rank 0's
    /// buffers.
    fn validate(&mut self, data: &Dataset) -> Result<(Metrics, Option<ExitStats>)> {
        if let Some(g) = &self.config.distributed {
            data_parallel::broadcast_buffers(g, self.model)?;
        }
        match (&self.config.early_exit, &self.config.distributed) {
            (Some(ee), _) => {
                let stats = crate::early_exit::evaluate(self.model, data, self.config.batch_size, ee)?;
                Ok((stats.overall, Some(stats)))
            }
            (None, Some(g)) => Ok((validate_distributed(self.model, data, self.config.batch_size, g)?, None)),
            (None, None) => Ok((validate(self.model, data, self.config.batch_size)?, None)),
        }
    }

    fn summary(&self, test: Metrics, test_exits: Option<ExitStats>, wall_seconds: f64) -> Result<TrainSummary> {
        let last = self.history.last().ok_or_else(|| Error::invalid("epochs", "no epoch was trained"))?;
        let best = best_epoch(&self.history).unwrap_or(last);
        let counts = parameter_counts(self.model)?;
        let info = self.model.info();
        Ok(TrainSummary {
            arch: info.arch.clone(),
            dataset: info.dataset.clone(),
            device: format!("{:?}", self.model.device()),
            seed: self.config.seed,
            epochs: self.history.len(),
            batch_size: self.config.batch_size,
            optimizer: *self.optimizer.config(),
            final_: EpochResult::of(last),
            best: EpochResult::of(best),
            test,
            test_exits,
            params: counts.params,
            nnz_params: counts.nnz_params,
            weights: counts.weights,
            nnz_weights: counts.nnz_weights,
            sparsity: counts.sparsity,
            wall_seconds,
            history: self.history.clone(),
            warnings: self.warnings.clone(),
        })
    }
}

/// Whether a run has collapsed, judged after its latest epoch: the training loss still near `ln(classes)` (what a
/// network that has learnt nothing scores) and validation top-1 at chance level. A collapse in the first epochs
/// almost always means a learning rate too high for the model; the message says so and how to change it.
pub fn collapse_warning(history: &[EpochRecord], num_classes: i64, lr: f64) -> Option<String> {
    let last = history.last()?;
    let classes = num_classes.max(2) as f64;
    let chance = 100.0 / classes;
    let untrained = classes.ln();
    let loss = last.train.objective.loss;
    let stuck = !loss.is_finite() || loss >= 0.9 * untrained;
    (stuck && last.valid.top1 <= 1.5 * chance).then(|| {
        format!(
            "training has collapsed after epoch {}: training loss {loss:.3} stays near ln({num_classes}) = {untrained:.3} and validation top-1 {:.2}% is chance level ({chance:.0}%). \
             The learning rate {lr} is the likely cause: lower it (`--lr`, or `TrainConfig::lr`), e.g. to {}",
            last.epoch + 1,
            last.valid.top1,
            lr / 5.0
        )
    })
}

/// Trains `model` on `data` as configured, with an optional compression scheduler; see [`Trainer`] to resume.
pub fn fit(model: &mut Model, data: &DataSplits, scheduler: Option<&mut CompressionScheduler>, config: &TrainConfig) -> Result<TrainSummary> {
    let mut trainer = Trainer::new(model, config.clone())?;
    if let Some(s) = scheduler {
        trainer = trainer.with_scheduler(s);
    }
    trainer.run(data)
}

/// The history's columns, as `metrics.csv` and [`history_frame`] give them: epoch, learning rate, training and
/// validation metrics, parameter counts, seconds, then one column per loss term a policy added (`Distill Loss`,
/// `GroupLassoRegularizer_loss`, ...), named `train_` and the term in snake case, empty where the term was not
/// active.
fn history_columns(history: &[EpochRecord]) -> Vec<(String, Vec<Option<f64>>)> {
    let mut terms: Vec<&str> = Vec::new();
    for (name, _) in history.iter().flat_map(|r| &r.train.loss_components) {
        if !terms.contains(&name.as_str()) {
            terms.push(name);
        }
    }
    type Column = (&'static str, fn(&EpochRecord) -> f64);
    let fixed: [Column; 15] = [
        ("epoch", |r| r.epoch as f64),
        ("lr", |r| r.lr),
        ("train_loss", |r| r.train.objective.loss),
        ("train_overall_loss", |r| r.train.overall_loss),
        ("train_top1", |r| r.train.objective.top1),
        ("train_top5", |r| r.train.objective.top5),
        ("valid_loss", |r| r.valid.loss),
        ("valid_top1", |r| r.valid.top1),
        ("valid_top5", |r| r.valid.top5),
        ("params", |r| r.counts.params as f64),
        ("nnz_params", |r| r.counts.nnz_params as f64),
        ("weights", |r| r.counts.weights as f64),
        ("nnz_weights", |r| r.counts.nnz_weights as f64),
        ("sparsity", |r| r.counts.sparsity),
        ("seconds", |r| r.seconds),
    ];
    let mut columns: Vec<(String, Vec<Option<f64>>)> = fixed.iter().map(|(name, f)| (name.to_string(), history.iter().map(|r| Some(f(r))).collect())).collect();
    let snake = |text: &str| text.to_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    for term in terms {
        columns.push((format!("train_{}", snake(term)), history.iter().map(|r| r.train.loss_components.iter().find(|(n, _)| n == term).map(|(_, v)| *v)).collect()));
    }
    // Early exit: `valid_exit_0_percent`, `valid_exit_0_top1`, ..., `valid_macs_saved`.
    if let Some(first) = history.iter().find_map(|r| r.exits.as_ref()) {
        for (name, _) in first.scalars() {
            let values = history.iter().map(|r| r.exits.as_ref().and_then(|e| e.scalars().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v))).collect();
            columns.push((format!("valid_{}", snake(&name)), values));
        }
    }
    columns
}

/// The run's history as a DataFrame, one row per epoch, with the columns of `metrics.csv`; the epoch and the
/// parameter counts are integers.
pub fn history_frame(history: &[EpochRecord]) -> Result<polars::prelude::DataFrame> {
    use polars::prelude::Column;
    const COUNTS: [&str; 5] = ["epoch", "params", "nnz_params", "weights", "nnz_weights"];
    let columns = history_columns(history)
        .into_iter()
        .map(|(name, values)| {
            if COUNTS.contains(&name.as_str()) {
                Column::new(name.into(), values.into_iter().map(|v| v.map(|v| v as i64)).collect::<Vec<_>>())
            } else {
                Column::new(name.into(), values)
            }
        })
        .collect();
    Ok(polars::prelude::DataFrame::new(history.len(), columns)?)
}

/// Writes the history as CSV, one row per epoch ([`history_columns`]).
fn write_metrics_csv(path: &Path, history: &[EpochRecord]) -> Result<()> {
    let columns = history_columns(history);
    let mut out = columns.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(",");
    out.push('\n');
    for row in 0..history.len() {
        let cells: Vec<String> = columns
            .iter()
            .map(|(name, values)| match values[row] {
                Some(v) if name == "seconds" => format!("{v:.3}"),
                Some(v) => v.to_string(),
                None => String::new(),
            })
            .collect();
        out += &cells.join(",");
        out.push('\n');
    }
    crate::io::write_atomic(path, out.as_bytes())
}

/// Parses `cpu`, `cuda` or `cuda:N`; CUDA must be available.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Err(Error::unknown("device", other, ["cpu", "cuda", "cuda:0"])),
        },
    };
    let count = tch::Cuda::device_count() as usize;
    match device {
        Device::Cuda(n) if n < count => Ok(device),
        _ if count == 0 => Err(Error::invalid(
            "device",
            format!("'{s}' asked for, but libtorch sees no CUDA device (set up with `scripts/setup.sh --cuda` on a GPU machine)"),
        )),
        _ => Err(Error::invalid("device", format!("'{s}' asked for, but there are {count} CUDA device(s)"))),
    }
}
