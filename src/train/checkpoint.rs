//! Checkpoints: one safetensors file holding the model's parameters and buffers under their PyTorch names, the
//! masks (`mask:<param>`), the optimizer state (`optimizer:<param>/<field>`), and everything else as JSON in the
//! file's metadata (`distill.checkpoint`). Python's `safetensors.torch.load_file` reads it as it is.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::EpochRecord;
use crate::nn::Model;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::scheduler::CompressionScheduler;
use crate::early_exit::ExitSpec;
use crate::factorization::FactorizationSpec;
use crate::thinning::ThinningRecipe;
use crate::{Error, Result};

const META_KEY: &str = "distill.checkpoint";
const MASK_PREFIX: &str = "mask:";
const OPTIMIZER_PREFIX: &str = "optimizer:";
const FORMAT_VERSION: u32 = 1;

/// The optimizer's update rule and per-group learning rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerMeta {
    /// Update rule and hyper-parameters.
    pub config: OptimizerConfig,
    /// Current learning rate of each group.
    pub lrs: Vec<f64>,
    /// Initial learning rate of each group.
    pub initial_lrs: Vec<f64>,
}

/// Everything in a checkpoint besides tensors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Format version of this file.
    pub version: u32,
    /// Architecture of the saved model.
    pub arch: String,
    /// Dataset it was trained on.
    pub dataset: String,
    /// The last completed epoch; a resumed run starts at `epoch + 1`.
    pub epoch: usize,
    /// Seed of the run (shuffles and libtorch's generator are derived from it per epoch).
    pub seed: u64,
    /// The optimizer, if one was saved.
    pub optimizer: Option<OptimizerMeta>,
    /// Each scheduler policy's progress, in policy order.
    pub policy_states: Vec<serde_json::Value>,
    /// Every completed epoch's record, so best-model tracking and logs continue after a resume.
    pub history: Vec<EpochRecord>,
    /// The thinning recipes applied to the model, oldest first: loading replays them on the dense architecture
    /// before reading the weights (Distiller's `thinning_recipes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thinning: Vec<ThinningRecipe>,
    /// The early exits attached to the model, in forward order: loading attaches them (each after as many
    /// thinning recipes as it was attached after) before reading the weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub early_exits: Vec<ExitSpec>,
    /// The layers factorized by truncated SVD, in order: loading factorizes them (each after the recipes and exits
    /// that preceded it) before reading the weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub factorizations: Vec<FactorizationSpec>,
}

/// Which kind of file a checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum CheckpointFormat {
    /// distill's own safetensors checkpoint, with the whole training state.
    #[default]
    Distill,
    /// A safetensors file holding a bare state dict (no architecture, no training state).
    StateDict,
    /// A `torch.save` file of a state dict or a whole model.
    PyTorch,
    /// A Distiller checkpoint dict (`.pth.tar`): weights, architecture, masks, the epoch and best top-1.
    Distiller {
        /// The last completed epoch, if saved.
        epoch: Option<usize>,
        /// The best validation top-1 of the run, if saved.
        best_top1: Option<f64>,
    },
}

impl std::fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointFormat::Distill => "distill checkpoint",
            CheckpointFormat::StateDict => "safetensors state dict",
            CheckpointFormat::PyTorch => "PyTorch state dict",
            CheckpointFormat::Distiller { .. } => "Distiller checkpoint",
        })
    }
}

/// A checkpoint in memory: distill's own, or a foreign file's weights (and, from Distiller, masks) with the
/// metadata it has; a foreign checkpoint that does not name its architecture has an empty `meta.arch`.
#[derive(Debug)]
pub struct Checkpoint {
    /// Metadata.
    pub meta: CheckpointMeta,
    /// Parameters and buffers by name.
    pub model: Vec<(String, Tensor)>,
    /// Masks by parameter name.
    pub masks: Vec<(String, Tensor)>,
    /// Optimizer state as [`Optimizer::state_tensors`] names it.
    pub optimizer: Vec<(String, Tensor)>,
    /// The kind of file it came from.
    pub format: CheckpointFormat,
}

/// A tensor copied to host memory, in the shape safetensors wants.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostTensor {
    fn new(t: &Tensor) -> Result<Self> {
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let dtype = Dtype::try_from(t.kind())?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)?;
        Ok(HostTensor { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), bytes })
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

impl Checkpoint {
    /// Captures the model, and the optimizer and scheduler when given.
    pub fn capture(
        model: &Model,
        optimizer: Option<&Optimizer>,
        scheduler: Option<&CompressionScheduler>,
        epoch: usize,
        seed: u64,
        history: Vec<EpochRecord>,
    ) -> Checkpoint {
        let info = model.info();
        let meta = CheckpointMeta {
            version: FORMAT_VERSION,
            arch: info.arch.clone(),
            dataset: info.dataset.clone(),
            epoch,
            seed,
            optimizer: optimizer.map(|o| OptimizerMeta {
                config: *o.config(),
                lrs: o.groups().iter().map(|g| g.lr).collect(),
                initial_lrs: o.groups().iter().map(|g| g.initial_lr).collect(),
            }),
            policy_states: scheduler.map(|s| s.policy_states()).unwrap_or_default(),
            history,
            thinning: model.thinning_recipes().to_vec(),
            early_exits: model.early_exits().to_vec(),
            factorizations: model.factorizations().to_vec(),
        };
        Checkpoint {
            meta,
            model: model.state_dict(),
            masks: scheduler.map(|s| s.masks().tensors()).unwrap_or_default(),
            optimizer: optimizer.map(|o| o.state_tensors()).unwrap_or_default(),
            format: CheckpointFormat::Distill,
        }
    }

    /// Writes the checkpoint to `path` (through a temporary file, so a crash never leaves half a checkpoint).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut named: Vec<(String, HostTensor)> = Vec::new();
        for (n, t) in &self.model {
            named.push((n.clone(), HostTensor::new(t)?));
        }
        for (n, t) in &self.masks {
            named.push((format!("{MASK_PREFIX}{n}"), HostTensor::new(t)?));
        }
        for (n, t) in &self.optimizer {
            named.push((format!("{OPTIMIZER_PREFIX}{n}"), HostTensor::new(t)?));
        }
        let meta = serde_json::to_string(&self.meta).map_err(|e| Error::checkpoint(path, format!("cannot encode metadata: {e}")))?;
        let info = Some(HashMap::from([(META_KEY.to_string(), meta)]));
        let bytes = safetensors::tensor::serialize(named.iter().map(|(n, t)| (n.as_str(), t)), &info)
            .map_err(|e| Error::checkpoint(path, e.to_string()))?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Reads a checkpoint: one written by [`Checkpoint::save`], a safetensors file holding a bare state dict, or a
    /// PyTorch `torch.save` file (a state dict, a whole model, or a Distiller `.pth.tar` with its masks), told apart
    /// by their contents. Foreign files give weights (and masks) only: see [`CheckpointFormat`].
    ///
    /// ```
    /// # let dir = distill::io::TempDir::new()?;
    /// let model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
    /// let path = dir.path().join("weights.safetensors");
    /// tch::Tensor::write_safetensors(&model.state_dict(), &path)?;
    /// let checkpoint = distill::train::Checkpoint::load(&path)?;
    /// assert_eq!(checkpoint.format, distill::train::CheckpointFormat::StateDict);
    /// let mut fresh = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
    /// checkpoint.restore_model(&mut fresh, &path)?;
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if !super::pytorch::looks_like_safetensors(&bytes) {
            return super::pytorch::load(path);
        }
        let bad = |m: String| Error::checkpoint(path, m);
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let Some(meta_json) = header.metadata().as_ref().and_then(|m| m.get(META_KEY)) else {
            let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("corrupt tensors ({e})")))?;
            let tensors = file.tensors().into_iter().map(|(n, v)| Ok((n, Tensor::try_from(v)?))).collect::<Result<Vec<_>>>()?;
            return Ok(super::pytorch::bare_state_dict(tensors));
        };
        let meta: CheckpointMeta = serde_json::from_str(meta_json).map_err(|e| bad(format!("bad metadata: {e}")))?;
        if meta.version != FORMAT_VERSION {
            return Err(bad(format!("format version {} is not supported (this build reads {FORMAT_VERSION})", meta.version)));
        }
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("corrupt tensors ({e})")))?;
        let (mut model, mut masks, mut optimizer) = (Vec::new(), Vec::new(), Vec::new());
        for (name, view) in file.tensors() {
            let t = Tensor::try_from(view)?;
            if let Some(n) = name.strip_prefix(MASK_PREFIX) {
                masks.push((n.to_string(), t));
            } else if let Some(n) = name.strip_prefix(OPTIMIZER_PREFIX) {
                optimizer.push((n.to_string(), t));
            } else {
                model.push((name, t));
            }
        }
        Ok(Checkpoint { meta, model, masks, optimizer, format: CheckpointFormat::Distill })
    }

    /// Brings `model` to the structure the checkpoint was saved with: replays the thinning recipes it has not
    /// applied yet (a fresh model of the architecture has applied none), shrinking `optimizer`'s parameters with
    /// it, and attaches the early exits it lacks, each after the recipes that preceded it. A model thinned
    /// differently from the checkpoint, or with exits the checkpoint does not have, is an error.
    pub fn thin_like_saved(&self, model: &mut Model, optimizer: Option<&mut Optimizer>, path: &Path) -> Result<()> {
        let done = model.thinning_recipes();
        if done.len() > self.meta.thinning.len() || self.meta.thinning[..done.len()] != *done {
            return Err(Error::checkpoint(
                path,
                format!(
                    "the model was thinned {} time(s) in another way than this checkpoint ({} recipe(s)); load it into a fresh '{}'",
                    done.len(),
                    self.meta.thinning.len(),
                    self.meta.arch
                ),
            ));
        }
        let saved = StructureLog { recipes: &self.meta.thinning, exits: &self.meta.early_exits, factorizations: &self.meta.factorizations };
        replay_structure(model, saved, optimizer).map_err(|e| Error::checkpoint(path, e.to_string()))
    }

    /// Restores the saved learning rates and per-parameter state into `optimizer`, which must use the saved update
    /// rule; does nothing for a checkpoint saved without an optimizer.
    pub fn restore_optimizer(&self, optimizer: &mut Optimizer, path: &Path) -> Result<()> {
        let Some(meta) = &self.meta.optimizer else { return Ok(()) };
        if meta.config != *optimizer.config() {
            return Err(Error::checkpoint(
                path,
                format!("saved with {:?}, this run uses {:?}; use the same optimizer settings", meta.config, optimizer.config()),
            ));
        }
        for (g, (&lr, &initial)) in optimizer.groups_mut().iter_mut().zip(meta.lrs.iter().zip(&meta.initial_lrs)) {
            g.lr = lr;
            g.initial_lr = initial;
        }
        optimizer.load_state_tensors(&self.optimizer)
    }

    /// Copies the saved weights into `model`, first thinning it as the checkpoint's model was thinned; every
    /// saved tensor must then have the model's shape. For a checkpoint of another architecture the error names
    /// both and lists each differing tensor with shapes.
    pub fn restore_model(&self, model: &mut Model, path: &Path) -> Result<()> {
        let info = model.info();
        if !self.meta.arch.is_empty() && self.meta.arch != info.arch {
            return Err(Error::checkpoint(
                path,
                format!(
                    "{} saved from '{}'{}, the model is '{}' ({}): build a '{}' (--arch {}) to load it{}",
                    self.format,
                    self.meta.arch,
                    if self.meta.dataset.is_empty() { String::new() } else { format!(" ({})", self.meta.dataset) },
                    info.arch,
                    info.dataset,
                    self.meta.arch,
                    self.meta.arch,
                    match model.state_dict_problems(&self.model, true) {
                        p if p.is_empty() => String::new(),
                        p => format!(" ({} difference(s): {})", p.len(), p.join("; ")),
                    }
                ),
            ));
        }
        // Past the check above, a named architecture is the model's own.
        if !self.meta.arch.is_empty() {
            self.thin_like_saved(model, None, path)?;
        }
        let format = self.format;
        model.load_state_dict(&self.model, true).map_err(|e| match format {
            CheckpointFormat::Distill => Error::checkpoint(path, e.to_string()),
            // A foreign file that does not name its architecture: say what it is.
            _ => Error::checkpoint(path, format!("a {format}: {e}")),
        })
    }

    /// [`Checkpoint::restore_model`] for a checkpoint of a run compressed by `scheduler`'s schedule: its
    /// quantizers first replace the layers they quantize, as they had in the run when it saved (a
    /// quantization-aware checkpoint holds `float_weight`s and learned clipping values), then the weights load.
    /// For export and evaluation: nothing of the optimizer is restored.
    pub fn restore_model_compressed(&self, model: &mut Model, scheduler: &mut CompressionScheduler, path: &Path) -> Result<()> {
        if self.meta.arch == model.info().arch {
            self.thin_like_saved(model, None, path)?;
        }
        // Quantizers that add parameters (PACT's clipping values) register them with an optimizer; this one is
        // thrown away.
        let mut scratch = Optimizer::new(OptimizerConfig::sgd(0.0, 0.0), model.named_parameters(), 0.1)?;
        scheduler.before_restore(model, self.meta.epoch, Some(&mut scratch))?;
        self.restore_model(model, path)
    }
}

/// What changed a model's structure since it was built, each in the order it happened: thinning recipes, early
/// exits (each after `after_thinning` recipes) and truncated-SVD factorizations (each after `after_thinning`
/// recipes and `after_exits` exits).
#[derive(Clone, Copy)]
pub(crate) struct StructureLog<'a> {
    pub recipes: &'a [ThinningRecipe],
    pub exits: &'a [ExitSpec],
    pub factorizations: &'a [FactorizationSpec],
}

impl<'a> StructureLog<'a> {
    /// The structure `model` has now.
    pub fn of(model: &'a Model) -> Self {
        StructureLog { recipes: model.thinning_recipes(), exits: model.early_exits(), factorizations: model.factorizations() }
    }
}

/// Brings `model` to `target`: replays the recipes it has not applied, attaches the exits it lacks and factorizes
/// the layers it has not, in order. The model's own recipes must be a prefix of the target's (checked by the
/// caller), its exits and factorizations among the target's. Factorizing replaces parameters, so it is refused
/// when an `optimizer` built over the old ones is given.
pub(crate) fn replay_structure(model: &mut Model, target: StructureLog, optimizer: Option<&mut Optimizer>) -> Result<()> {
    if let Some(extra) = model.early_exits().iter().find(|e| !target.exits.iter().any(|s| s.at == e.at)) {
        return Err(Error::invalid("early exits", format!("the model has an exit after '{}' that the saved model does not have; start from a model without it", extra.at)));
    }
    if let Some(extra) = model.factorizations().iter().find(|f| !target.factorizations.contains(f)) {
        return Err(Error::invalid("truncated SVD", format!("the model has '{}' factorized at rank {}, the saved model does not; start from a model without it", extra.layer, extra.rank)));
    }
    let missing: Vec<&str> = target.factorizations.iter().filter(|f| !model.factorizations().contains(f)).map(|f| f.layer.as_str()).collect();
    if optimizer.is_some() && !missing.is_empty() {
        return Err(Error::invalid(
            "truncated SVD",
            format!("the saved model has {missing:?} factorized by truncated SVD: factorize them the same way (factorization::truncated_svd) before building the optimizer"),
        ));
    }
    let mut optimizer = optimizer;
    for step in model.thinning_recipes().len()..=target.recipes.len() {
        for spec in target.exits.iter().filter(|s| s.after_thinning <= step) {
            if !model.early_exits().iter().any(|e| e.at == spec.at) {
                replay_factorizations(model, target.factorizations, step)?;
                crate::early_exit::attach_spec(model, spec).map_err(|e| Error::invalid("early exits", format!("attaching the exit after '{}': {e}", spec.at)))?;
            }
        }
        replay_factorizations(model, target.factorizations, step)?;
        if let Some(recipe) = target.recipes.get(step) {
            recipe.apply(model, optimizer.as_deref_mut(), None).map_err(|e| Error::invalid("thinning", format!("replaying a thinning recipe: {e}")))?;
        }
    }
    if !target.exits.is_empty() {
        model.set_early_exits(target.exits.to_vec());
    }
    Ok(())
}

/// Factorizes the layers of `specs` that were factorized after `step` thinning recipes and no more exits than the
/// model has now, and that the model has not factorized yet.
fn replay_factorizations(model: &mut Model, specs: &[FactorizationSpec], step: usize) -> Result<()> {
    for spec in specs.iter().filter(|f| f.after_thinning <= step) {
        if not_yet_factorized(model, spec) {
            crate::factorization::replay(model, spec).map_err(|e| Error::invalid("truncated SVD", format!("factorizing '{}' again: {e}", spec.layer)))?;
        }
    }
    Ok(())
}

fn not_yet_factorized(model: &Model, spec: &FactorizationSpec) -> bool {
    spec.after_exits <= model.early_exits().len() && !model.factorizations().contains(spec)
}
