//! Compression schedules in Distiller's YAML schema, loaded strictly.
//!
//! A [`Schedule`] is the typed form of a schedule file: named pruners, regularizers, quantizers and LR
//! schedulers, and the policies that tie them to epochs. Load one with [`Schedule::from_file`] (every problem is
//! reported as `file:line:column: message`, with did-you-mean suggestions), or build it in Rust with the
//! typed builder methods; [`Schedule::to_yaml`] writes it back and [`Schedule::build`] turns it into a
//! [`CompressionScheduler`] for a model, after checking every parameter name against the model.
//!
//! ```
//! use distill::config::{PolicyConfig, PrunerConfig, Schedule};
//! use distill::scheduler::lr::LrSchedule;
//!
//! # fn main() -> distill::Result<()> {
//! let schedule = Schedule::new()
//!     .pruner("agp", PrunerConfig::AutomatedGradualPruner {
//!         initial_sparsity: 0.05,
//!         final_sparsity: 0.9,
//!         weights: vec!["conv2.weight".into(), "fc1.weight".into()],
//!     })
//!     .lr_scheduler("cosine", LrSchedule::CosineAnnealingLR { t_max: 10, eta_min: 0.0 })
//!     .policy(PolicyConfig::pruner("agp").epochs_range(0, 8, 1))
//!     .policy(PolicyConfig::lr_scheduler("cosine").epochs_range(0, 10, 1));
//! let yaml = schedule.to_yaml()?;
//! assert_eq!(Schedule::from_yaml_str(&yaml, "roundtrip.yaml")?, schedule);
//! let model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let scheduler = schedule.build(&model)?;
//! assert_eq!(scheduler.policies().count(), 2);
//! # Ok(()) }
//! ```
pub mod components;
mod positions;
mod preview;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

pub use components::{DistillerConfig, ExtensionConfig, KnowledgeDistillationParams, PrunerConfig, QuantizerConfig, RegularizerConfig, RemoverParams, ThinningFunc};
pub use positions::{Location, Positions, YamlPath};
pub use preview::{Preview, PreviewEpoch};

use components::{yaml_text, DISTILLER_CLASSES, EXTENSION_CLASSES, PRUNER_CLASSES, QUANTIZER_CLASSES, REGULARIZER_CLASSES};
use crate::nn::{normalize_name, Model};
use crate::pruning::{PruningArgs, PruningPolicy};
use crate::regularization::RegularizationPolicy;
use crate::scheduler::lr::{LrPolicy, LrSchedule};
use crate::scheduler::{CompressionScheduler, PolicySchedule};
use crate::{Error, Result};

const LR_CLASSES: &[&str] = &[
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "PolynomialLR",
    "MultiStepMultiGammaLR",
    "ReduceLROnPlateau",
];
const TOP_LEVEL: &[&str] = &["version", "pruners", "regularizers", "quantizers", "lr_schedulers", "extensions", "distillers", "policies", "network"];
const POLICY_KINDS: &[&str] = &["pruner", "regularizer", "quantizer", "lr_scheduler", "extension", "distiller"];

/// What a policy entry drives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// A `pruners:` entry.
    Pruner,
    /// A `regularizers:` entry.
    Regularizer,
    /// A `quantizers:` entry.
    Quantizer,
    /// An `lr_schedulers:` entry.
    LrScheduler,
    /// An `extensions:` entry (thinning).
    Extension,
    /// A `distillers:` entry (knowledge distillation).
    Distiller,
}

impl PolicyKind {
    fn key(&self) -> &'static str {
        match self {
            PolicyKind::Pruner => "pruner",
            PolicyKind::Regularizer => "regularizer",
            PolicyKind::Quantizer => "quantizer",
            PolicyKind::LrScheduler => "lr_scheduler",
            PolicyKind::Extension => "extension",
            PolicyKind::Distiller => "distiller",
        }
    }

    fn section(&self) -> &'static str {
        match self {
            PolicyKind::Pruner => "pruners",
            PolicyKind::Regularizer => "regularizers",
            PolicyKind::Quantizer => "quantizers",
            PolicyKind::LrScheduler => "lr_schedulers",
            PolicyKind::Extension => "extensions",
            PolicyKind::Distiller => "distillers",
        }
    }
}

/// When a policy is active, as written: a range or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Epochs {
    /// `starting_epoch`, `ending_epoch` (exclusive), `frequency`.
    Range {
        /// First epoch.
        starting_epoch: usize,
        /// One past the last epoch.
        ending_epoch: usize,
        /// Epochs between activations.
        frequency: usize,
    },
    /// `epochs: [...]`.
    List(Vec<usize>),
}

impl Epochs {
    /// The schedule, checked as Distiller checks it.
    pub fn schedule(&self) -> Result<PolicySchedule> {
        match self {
            Epochs::Range { starting_epoch, ending_epoch, frequency } => PolicySchedule::range(*starting_epoch, *ending_epoch, *frequency),
            Epochs::List(list) => PolicySchedule::epochs_list(list.clone()),
        }
    }
}

/// One entry of `policies:`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// What it drives.
    pub kind: PolicyKind,
    /// The instance name in the matching section.
    pub instance_name: String,
    /// `args` of a pruning policy.
    pub pruning_args: PruningArgs,
    /// `args: {keep_mask: ...}` of a regularization policy.
    pub keep_mask: bool,
    /// When it is active; `None` until set by [`PolicyConfig::epochs_range`] or [`PolicyConfig::epochs_list`].
    pub epochs: Option<Epochs>,
}

impl PolicyConfig {
    fn of(kind: PolicyKind, name: &str) -> Self {
        PolicyConfig { kind, instance_name: name.into(), pruning_args: PruningArgs::default(), keep_mask: false, epochs: None }
    }
    /// A policy for pruner `name`.
    pub fn pruner(name: &str) -> Self {
        Self::of(PolicyKind::Pruner, name)
    }
    /// A policy for regularizer `name`.
    pub fn regularizer(name: &str) -> Self {
        Self::of(PolicyKind::Regularizer, name)
    }
    /// A policy for LR scheduler `name`.
    pub fn lr_scheduler(name: &str) -> Self {
        Self::of(PolicyKind::LrScheduler, name)
    }
    /// A policy for quantizer `name`.
    pub fn quantizer(name: &str) -> Self {
        Self::of(PolicyKind::Quantizer, name)
    }
    /// A policy for extension `name` (a thinning step).
    pub fn extension(name: &str) -> Self {
        Self::of(PolicyKind::Extension, name)
    }
    /// Active at `start, start + frequency, ...` below `end`; an invalid range is reported by
    /// [`Schedule::build`].
    pub fn epochs_range(mut self, start: usize, end: usize, frequency: usize) -> Self {
        self.epochs = Some(Epochs::Range { starting_epoch: start, ending_epoch: end, frequency });
        self
    }
    /// Active at exactly `epochs`; an invalid list is reported by [`Schedule::build`].
    pub fn epochs_list(mut self, epochs: Vec<usize>) -> Self {
        self.epochs = Some(Epochs::List(epochs));
        self
    }
    /// Sets the pruning policy's `args`.
    pub fn with_pruning_args(mut self, args: PruningArgs) -> Self {
        self.pruning_args = args;
        self
    }
    /// Sets a regularization policy's `keep_mask`.
    pub fn with_keep_mask(mut self, keep_mask: bool) -> Self {
        self.keep_mask = keep_mask;
        self
    }
}

/// A compression schedule: Distiller's YAML document in typed form.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// `version` (Distiller ignores it; so does distill).
    pub version: Option<u64>,
    /// Named pruners, in file order.
    pub pruners: Vec<(String, PrunerConfig)>,
    /// Named regularizers.
    pub regularizers: Vec<(String, RegularizerConfig)>,
    /// Named quantizers (at most one, as Distiller).
    pub quantizers: Vec<(String, QuantizerConfig)>,
    /// Named LR schedules.
    pub lr_schedulers: Vec<(String, LrSchedule)>,
    /// Named extensions (thinning steps).
    pub extensions: Vec<(String, ExtensionConfig)>,
    /// Named distillers (knowledge distillation).
    pub distillers: Vec<(String, DistillerConfig)>,
    /// Policies, in file order.
    pub policies: Vec<PolicyConfig>,
    /// Things that load but deserve attention (a key written twice, ...), as `file:line:column: message`.
    pub warnings: Vec<String>,
    source: Option<Source>,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        (&self.version, &self.pruners, &self.regularizers, &self.quantizers, &self.lr_schedulers, &self.extensions, &self.distillers, &self.policies)
            == (&other.version, &other.pruners, &other.regularizers, &other.quantizers, &other.lr_schedulers, &other.extensions, &other.distillers, &other.policies)
    }
}

/// Where a schedule was read from, to locate errors found later (against a model).
#[derive(Clone)]
struct Source {
    name: String,
    positions: std::sync::Arc<Positions>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)
    }
}

/// Collects located problems while reading a document.
struct Reader {
    name: String,
    positions: Positions,
    problems: Vec<String>,
    /// Every entry name per section, parsed or not, so one bad entry does not also break its policies.
    declared: std::collections::HashMap<String, Vec<String>>,
}

fn path(parts: &[&str]) -> YamlPath {
    parts.iter().map(|s| s.to_string()).collect()
}

impl Reader {
    fn at(&self, loc: Option<Location>) -> String {
        match loc {
            Some(l) => format!("{}:{}:{}", self.name, l.line, l.column),
            None => self.name.clone(),
        }
    }
    fn key_problem(&mut self, p: &[String], message: impl std::fmt::Display) {
        let at = self.at(self.positions.key(p));
        self.problems.push(format!("{at}: {message}"));
    }
    fn value_problem(&mut self, p: &[String], message: impl std::fmt::Display) {
        let at = self.at(self.positions.value(p));
        self.problems.push(format!("{at}: {message}"));
    }

    /// A section's entries as (name, class, params without `class`), reporting malformed ones.
    fn entries(&mut self, section: &str, value: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        let Some(map) = as_mapping(self, &[section], value) else { return out };
        for (k, v) in map {
            let name = yaml_text(k);
            self.declared.entry(section.to_string()).or_default().push(name.clone());
            let here = path(&[section, &name]);
            let Value::Mapping(m) = v else {
                self.value_problem(&here, format!("'{name}' must be a mapping with a 'class' key"));
                continue;
            };
            let mut params = Mapping::new();
            let mut class = None;
            for (pk, pv) in m {
                if pk.as_str() == Some("class") {
                    class = pv.as_str().map(String::from);
                } else {
                    params.insert(pk.clone(), pv.clone());
                }
            }
            match class {
                Some(c) => out.push((name, c, Value::Mapping(params))),
                None => self.key_problem(&here, format!("'{name}' has no 'class'")),
            }
        }
        out
    }

    /// Deserializes `params` as class `class` of the enum `T` (externally tagged by class name).
    fn typed<T: for<'de> Deserialize<'de>>(&mut self, here: &[String], class: &str, params: Value) -> Option<T> {
        let tagged = Value::Tagged(Box::new(serde_yaml::value::TaggedValue { tag: serde_yaml::value::Tag::new(class), value: params }));
        match serde_path_to_error::deserialize::<_, T>(tagged) {
            Ok(v) => Some(v),
            Err(e) => {
                let mut at: YamlPath = here.to_vec();
                for seg in e.path().iter() {
                    match seg {
                        serde_path_to_error::Segment::Map { key } => at.push(key.clone()),
                        serde_path_to_error::Segment::Seq { index } => at.push(format!("[{index}]")),
                        _ => {}
                    }
                }
                let msg = e.inner().to_string();
                // serde names the offending field only in its message.
                if let Some(field) = msg.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
                    at.push(field.to_string());
                    self.key_problem(&at, format!("{class}: {}", strip_serde_position(&msg)));
                } else {
                    self.value_problem(&at, format!("{class}: {}", strip_serde_position(&msg)));
                }
                None
            }
        }
    }
}

/// serde_yaml appends its own (meaningless here) position to messages of values built in memory.
fn strip_serde_position(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn as_mapping<'v>(r: &mut Reader, at: &[&str], v: &'v Value) -> Option<&'v Mapping> {
    match v {
        Value::Mapping(m) => Some(m),
        Value::Null => None,
        other => {
            r.value_problem(&path(at), format!("'{}' must be a mapping, got {}", at.join("."), yaml_text(other)));
            None
        }
    }
}

fn check_class(r: &mut Reader, here: &[String], class: &str, valid: &[&str], what: &'static str) -> bool {
    if valid.contains(&class) {
        return true;
    }
    let mut p = here.to_vec();
    p.push("class".into());
    let known_elsewhere = [PRUNER_CLASSES, REGULARIZER_CLASSES, QUANTIZER_CLASSES, LR_CLASSES, EXTENSION_CLASSES, DISTILLER_CLASSES].iter().any(|l| l.contains(&class));
    if known_elsewhere {
        r.value_problem(&p, format!("{class} is not a {what}; it belongs in another section"));
    } else {
        r.value_problem(&p, Error::unknown(what, class, valid.iter().copied()));
    }
    false
}

impl Schedule {
    /// An empty schedule, for the builder methods.
    pub fn new() -> Self {
        Schedule::default()
    }

    /// Adds a pruner.
    pub fn pruner(mut self, name: &str, config: PrunerConfig) -> Self {
        self.pruners.push((name.into(), config));
        self
    }
    /// Adds a regularizer.
    pub fn regularizer(mut self, name: &str, config: RegularizerConfig) -> Self {
        self.regularizers.push((name.into(), config));
        self
    }
    /// Adds an LR schedule.
    pub fn lr_scheduler(mut self, name: &str, schedule: LrSchedule) -> Self {
        self.lr_schedulers.push((name.into(), schedule));
        self
    }
    /// Adds a quantizer.
    pub fn quantizer(mut self, name: &str, config: QuantizerConfig) -> Self {
        self.quantizers.push((name.into(), config));
        self
    }

    /// Adds an extension (a thinning step).
    pub fn extension(mut self, name: &str, config: ExtensionConfig) -> Self {
        self.extensions.push((name.into(), config));
        self
    }
    /// Adds a distiller (knowledge distillation).
    pub fn distiller(mut self, name: &str, config: DistillerConfig) -> Self {
        self.distillers.push((name.into(), config));
        self
    }
    /// Adds a policy.
    pub fn policy(mut self, policy: PolicyConfig) -> Self {
        self.policies.push(policy);
        self
    }

    /// Reads a schedule file. A file whose whole content is the relative path of another YAML file (how git
    /// stores a symbolic link on systems without them, as in Distiller's `baseline_networks/`) is followed.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Schedule> {
        let path = path.as_ref();
        let text = read_text_file(path)?;
        let trimmed = text.trim();
        if !trimmed.contains(['\n', ':']) && trimmed.ends_with(".yaml") {
            let target: PathBuf = path.parent().unwrap_or(Path::new(".")).join(trimmed);
            if target.is_file() && target != path {
                let text = read_text_file(&target)?;
                return Schedule::from_yaml_str(&text, &target.display().to_string());
            }
        }
        Schedule::from_yaml_str(&text, &path.display().to_string())
    }

    /// Parses schedule text; `name` labels error locations (usually the file name).
    pub fn from_yaml_str(text: &str, name: &str) -> Result<Schedule> {
        check_text(text, name, "a schedule, a mapping with 'policies' and the sections they name")?;
        let positions = Positions::of(text);
        let value: Value = match serde_yaml::from_str(text) {
            Ok(v) => v,
            // PyYAML, which Distiller uses, keeps the last of duplicate keys; serde_yaml refuses them.
            Err(e) if !positions.duplicates().is_empty() && e.to_string().contains("duplicate entry") => last_wins(text).ok_or_else(|| malformed(name, &e))?,
            Err(e) => return Err(malformed(name, &e)),
        };
        let mut r = Reader { name: name.into(), positions, problems: Vec::new(), declared: Default::default() };
        let mut schedule = Self::read(&mut r, &value);
        if !r.problems.is_empty() {
            return Err(Error::Schedule(r.problems));
        }
        schedule.warnings = r
            .positions
            .duplicates()
            .iter()
            .map(|(p, l)| format!("{name}:{}:{}: '{}' is written twice here; the last value is used (as PyYAML does)", l.line, l.column, p.join(".")))
            .collect();
        schedule.source = Some(Source { name: name.into(), positions: std::sync::Arc::new(r.positions) });
        Ok(schedule)
    }

    fn read(r: &mut Reader, value: &Value) -> Schedule {
        let mut s = Schedule::default();
        let Value::Mapping(top) = value else {
            r.value_problem(&[], "a schedule must be a mapping with 'policies' and the sections they name");
            return s;
        };
        if looks_like_activation_stats(top) {
            r.value_problem(&[], "this is an activation-statistics file (per-module min/max/mean, as written by a calibration run), not a schedule: pass it to a PostTrainLinearQuantizer as model_activation_stats");
            return s;
        }
        for (k, v) in top {
            let key = yaml_text(k);
            match key.as_str() {
                "version" => match v.as_u64() {
                    Some(n) => s.version = Some(n),
                    None => r.value_problem(&path(&["version"]), format!("version must be an integer, got {}", yaml_text(v))),
                },
                "pruners" => s.pruners = read_section(r, "pruners", v, PRUNER_CLASSES, "pruner class", |n, c: &PrunerConfig| at_key(c.build(n))),
                "regularizers" => {
                    s.regularizers = read_section(r, "regularizers", v, REGULARIZER_CLASSES, "regularizer class", |n, c: &RegularizerConfig| at_key(c.build(n)))
                }
                "quantizers" => {
                    s.quantizers = read_section(r, "quantizers", v, QUANTIZER_CLASSES, "quantizer class", |_, c: &QuantizerConfig| c.validate());
                    if s.quantizers.len() > 1 {
                        r.key_problem(&path(&["quantizers"]), "only one quantizer per schedule is supported (as Distiller)");
                    }
                }
                "lr_schedulers" => {
                    s.lr_schedulers = read_section(r, "lr_schedulers", v, LR_CLASSES, "LR scheduler class", |_, c: &LrSchedule| at_key(c.validate()))
                }
                "extensions" => {
                    s.extensions = read_section(r, "extensions", v, EXTENSION_CLASSES, "extension class", |n, c: &ExtensionConfig| at_key(c.build(n)))
                }
                "distillers" => {
                    s.distillers = read_section(r, "distillers", v, DISTILLER_CLASSES, "distiller class", |_, c: &DistillerConfig| at_key(c.validate()));
                    let base = base_dir(&r.name);
                    for (name, cfg) in &s.distillers {
                        let file = cfg.teacher_checkpoint(&base);
                        if !file.is_file() {
                            r.value_problem(&path(&["distillers", name, "teacher_checkpoint"]), format!("the teacher's checkpoint {} does not exist", file.display()));
                        }
                    }
                }
                "policies" => s.policies = Self::read_policies(r, v),
                // AMC's model description: not read by the scheduler, as in Distiller.
                "network" => {}
                other => r.key_problem(&path(&[other]), Error::unknown("top-level key", other, TOP_LEVEL.iter().copied())),
            }
        }
        s.check_references(r);
        s
    }

    fn read_policies(r: &mut Reader, v: &Value) -> Vec<PolicyConfig> {
        let mut out = Vec::new();
        let Value::Sequence(items) = v else {
            if !v.is_null() {
                r.value_problem(&path(&["policies"]), "'policies' must be a list");
            }
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            let here = path(&["policies", &format!("[{i}]")]);
            let Value::Mapping(m) = item else {
                r.value_problem(&here, "a policy must be a mapping");
                continue;
            };
            let (mut kind, mut inner, mut start, mut end, mut freq, mut epochs) = (None, None, None, None, None, None);
            for (k, val) in m {
                let key = yaml_text(k);
                let mut kp = here.clone();
                kp.push(key.clone());
                let int = |r: &mut Reader, val: &Value| -> Option<usize> {
                    let n = val.as_u64().map(|n| n as usize);
                    if n.is_none() {
                        r.value_problem(&kp, format!("{key} must be a non-negative integer, got {}", yaml_text(val)));
                    }
                    n
                };
                match key.as_str() {
                    "pruner" | "regularizer" | "quantizer" | "lr_scheduler" | "extension" | "distiller" => {
                        if kind.is_some() {
                            r.key_problem(&kp, "a policy names exactly one of pruner, regularizer, quantizer, lr_scheduler, extension, distiller");
                        }
                        kind = Some(key.clone());
                        inner = Some(val.clone());
                    }
                    "starting_epoch" => start = int(r, val),
                    "ending_epoch" => end = int(r, val),
                    "frequency" => freq = int(r, val),
                    "epochs" => match val.as_sequence().map(|s| s.iter().map(|e| e.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>()) {
                        Some(Some(list)) => epochs = Some(list),
                        _ => r.value_problem(&kp, "epochs must be a list of non-negative integers"),
                    },
                    other => {
                        let valid = POLICY_KINDS.iter().chain(&["starting_epoch", "ending_epoch", "frequency", "epochs"]).copied();
                        r.key_problem(&kp, Error::unknown("policy key", other, valid));
                    }
                }
            }
            let Some(kind) = kind else {
                r.value_problem(&here, "a policy must name one of pruner, regularizer, quantizer, lr_scheduler, extension, distiller");
                continue;
            };
            let mut kp = here.clone();
            kp.push(kind.clone());
            let Some(Value::Mapping(body)) = inner else {
                r.value_problem(&kp, format!("'{kind}' must be a mapping with instance_name"));
                continue;
            };
            let mut policy = match kind.as_str() {
                "pruner" => PolicyConfig::pruner(""),
                "regularizer" => PolicyConfig::regularizer(""),
                "quantizer" => PolicyConfig::quantizer(""),
                "lr_scheduler" => PolicyConfig::lr_scheduler(""),
                "distiller" => PolicyConfig::of(PolicyKind::Distiller, ""),
                _ => PolicyConfig::extension(""),
            };
            for (k, val) in &body {
                let key = yaml_text(k);
                let mut ap = kp.clone();
                ap.push(key.clone());
                match key.as_str() {
                    "instance_name" => policy.instance_name = yaml_text(val),
                    "args" if kind == "pruner" => {
                        if let Ok(args) = serde_path_to_error::deserialize::<_, PruningArgs>(val.clone()).map_err(|e| {
                            let msg = strip_serde_position(&e.inner().to_string());
                            match msg.strip_prefix("unknown field `").and_then(|x| x.split('`').next()) {
                                Some(f) => {
                                    let mut p = ap.clone();
                                    p.push(f.to_string());
                                    r.key_problem(&p, format!("pruning policy args: {msg}"));
                                }
                                None => r.value_problem(&ap, format!("pruning policy args: {msg}")),
                            }
                        }) {
                            if let Err(e) = args.validate() {
                                let mut p = ap.clone();
                                if let Error::InvalidArgument { name, .. } = &e {
                                    p.push(name.clone());
                                }
                                r.key_problem(&p, e);
                            }
                            policy.pruning_args = args;
                        }
                    }
                    "args" if kind == "regularizer" => match val.as_mapping() {
                        Some(a) => {
                            for (ak, av) in a {
                                let mut p = ap.clone();
                                p.push(yaml_text(ak));
                                match (ak.as_str(), av.as_bool()) {
                                    (Some("keep_mask"), Some(b)) => policy.keep_mask = b,
                                    (Some("keep_mask"), None) => r.value_problem(&p, "keep_mask must be true or false"),
                                    _ => r.key_problem(&p, Error::unknown("regularization policy argument", &yaml_text(ak), ["keep_mask"])),
                                }
                            }
                        }
                        None => r.value_problem(&ap, "args must be a mapping"),
                    },
                    "args" => r.key_problem(&ap, format!("a {kind} policy takes no args")),
                    other => r.key_problem(&ap, Error::unknown("policy entry key", other, ["instance_name", "args"])),
                }
            }
            if policy.instance_name.is_empty() {
                r.value_problem(&kp, format!("'{kind}' needs an instance_name"));
            }
            let spec = match (epochs, start, end, freq) {
                (Some(list), None, None, None) => Ok(Epochs::List(list)),
                (None, Some(s), Some(e), Some(f)) => Ok(Epochs::Range { starting_epoch: s, ending_epoch: e, frequency: f }),
                (None, ..) => Err(Error::invalid("policy schedule", "give either epochs: [...] or all of starting_epoch, ending_epoch and frequency")),
                (Some(_), ..) => Err(Error::invalid("policy schedule", "give either epochs: [...] or starting_epoch/ending_epoch/frequency, not both")),
            };
            match spec.and_then(|spec| spec.schedule().map(|_| spec)) {
                Ok(spec) => policy.epochs = Some(spec),
                Err(e) => {
                    // Point at the key the message is about.
                    let msg = e.to_string();
                    let key = ["frequency", "epochs", "starting_epoch"].into_iter().find(|k| msg.contains(k)).unwrap_or("");
                    let mut at = here.clone();
                    if m.keys().any(|k| k.as_str() == Some(key)) {
                        at.push(key.to_string());
                    }
                    r.key_problem(&at, e);
                }
            }
            out.push(policy);
        }
        out
    }

    fn check_references(&self, r: &mut Reader) {
        for (i, p) in self.policies.iter().enumerate() {
            let names = r.declared.get(p.kind.section()).cloned().unwrap_or_default();
            if !p.instance_name.is_empty() && !names.contains(&p.instance_name) {
                let at = path(&["policies", &format!("[{i}]"), p.kind.key(), "instance_name"]);
                r.value_problem(&at, Error::unknown(p.kind.key(), &p.instance_name, names));
            }
        }
    }

    fn located(&self, at: &[String], key: bool, message: impl std::fmt::Display) -> String {
        match &self.source {
            Some(src) => {
                let loc = if key { src.positions.key(at) } else { src.positions.value(at) };
                match loc {
                    Some(l) => format!("{}:{}:{}: {message}", src.name, l.line, l.column),
                    None => format!("{}: {message}", src.name),
                }
            }
            None => format!("{}: {message}", at.join(".")),
        }
    }

    /// Checks every parameter name (after `module.` normalization) and every quantizer override pattern
    /// against `model`; each miss is reported at its place in the file with suggestions.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        let params: Vec<String> = model.named_parameters().into_iter().map(|(n, _)| n).collect();
        let modules: Vec<String> = model.named_modules().into_iter().map(|m| m.name).filter(|n| !n.is_empty()).collect();
        let mut problems = Vec::new();
        let mut check_names = |section: &str, entry: &str, names: Vec<String>, list_key: Option<&str>| {
            for (i, n) in names.iter().enumerate() {
                if params.contains(&normalize_name(n)) {
                    continue;
                }
                let (at, key) = match list_key {
                    Some(k) => (path(&[section, entry, k, &format!("[{i}]")]), false),
                    None => (self.map_key_path(section, entry, n), true),
                };
                problems.push(self.located(&at, key, Error::unknown("parameter", n, params.clone())));
            }
        };
        for (name, cfg) in &self.pruners {
            let list_key = match cfg {
                PrunerConfig::MagnitudeParameterPruner { .. }
                | PrunerConfig::SparsityLevelParameterPruner { .. }
                | PrunerConfig::SensitivityPruner { .. }
                | PrunerConfig::SplicingPruner { .. }
                | PrunerConfig::StructureParameterPruner { .. } => None,
                _ => Some("weights"),
            };
            check_names("pruners", name, cfg.parameter_names(), list_key);
        }
        for (name, cfg) in &self.regularizers {
            check_names("regularizers", name, cfg.parameter_names(), None);
        }
        for (name, cfg) in &self.quantizers {
            for pattern in cfg.override_patterns() {
                let normalized = normalize_name(&pattern);
                let matches = regex::Regex::new(&format!("^(?:{normalized})")).map(|re| modules.iter().any(|m| re.is_match(m))).unwrap_or(false);
                if !matches {
                    let at = path(&["quantizers", name, "overrides", &pattern]);
                    problems.push(self.located(&at, true, Error::unknown("module pattern", &pattern, modules.clone())));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::Schedule(problems)) }
    }

    /// Path of a name used as a map key (thresholds, levels, sensitivities, reg_regims).
    fn map_key_path(&self, section: &str, entry: &str, name: &str) -> YamlPath {
        let key = ["thresholds", "levels", "sensitivities", "reg_regims"]
            .into_iter()
            .find(|k| self.source.as_ref().is_some_and(|s| s.positions.key(&path(&[section, entry, k, name])) != s.positions.key(&path(&[section, entry, k]))))
            .unwrap_or("reg_regims");
        path(&[section, entry, key, name])
    }

    /// A scheduler for `model`: checks names against the model, builds every pruner, regularizer and LR
    /// schedule, and adds the policies in Distiller's order (every LR policy after all the others).
    pub fn build(&self, model: &Model) -> Result<CompressionScheduler> {
        self.check_model(model)?;
        let mut scheduler = CompressionScheduler::new(model);
        let mut deferred_lr = Vec::new();
        for (i, p) in self.policies.iter().enumerate() {
            let at = path(&["policies", &format!("[{i}]")]);
            let schedule = p
                .epochs
                .as_ref()
                .ok_or_else(|| Error::invalid("policy schedule", "no epochs given"))
                .and_then(Epochs::schedule)
                .map_err(|e| Error::Schedule(vec![self.located(&at, false, e)]))?;
            let missing = || Error::Schedule(vec![self.located(&at, false, format!("no {} named '{}'", p.kind.key(), p.instance_name))]);
            match p.kind {
                PolicyKind::Pruner => {
                    let (_, cfg) = self.pruners.iter().find(|(n, _)| *n == p.instance_name).ok_or_else(missing)?;
                    let pruner = cfg.build(&p.instance_name)?;
                    scheduler.add_policy(Box::new(PruningPolicy::new(pruner, p.pruning_args.clone())?), schedule);
                }
                PolicyKind::Regularizer => {
                    let (_, cfg) = self.regularizers.iter().find(|(n, _)| *n == p.instance_name).ok_or_else(missing)?;
                    scheduler.add_policy(Box::new(RegularizationPolicy::new(cfg.build(&p.instance_name)?, p.keep_mask)), schedule);
                }
                PolicyKind::LrScheduler => {
                    let (_, cfg) = self.lr_schedulers.iter().find(|(n, _)| *n == p.instance_name).ok_or_else(missing)?;
                    deferred_lr.push((LrPolicy::new(cfg.clone())?, schedule));
                }
                PolicyKind::Quantizer => {
                    let (_, cfg) = self.quantizers.iter().find(|(n, _)| *n == p.instance_name).ok_or_else(missing)?;
                    let quantizer = cfg.qat().map_err(|e| Error::Schedule(vec![self.located(&at, false, e)]))?;
                    scheduler.add_policy(Box::new(crate::quantization::QuantizationPolicy::new(&p.instance_name, quantizer)), schedule);
                }
                PolicyKind::Extension => {
                    let (_, cfg) = self.extensions.iter().find(|(n, _)| *n == p.instance_name).ok_or_else(missing)?;
                    scheduler.add_policy(Box::new(cfg.build(&p.instance_name)?), schedule);
                }
                PolicyKind::Distiller => {
                    let (_, cfg) = self.distillers.iter().find(|(n, _)| *n == p.instance_name).ok_or_else(missing)?;
                    let base = base_dir(self.source.as_ref().map_or("", |s| s.name.as_str()));
                    let at = path(&["distillers", &p.instance_name]);
                    let policy = cfg.build(model, &base).map_err(|e| Error::Schedule(vec![self.located(&at, true, e)]))?;
                    scheduler.add_policy(Box::new(policy), schedule);
                }
            }
        }
        for (policy, schedule) in deferred_lr {
            scheduler.add_policy(Box::new(policy), schedule);
        }
        Ok(scheduler)
    }

    /// The schedule as Distiller YAML.
    pub fn to_yaml(&self) -> Result<String> {
        fn section<T: Serialize>(entries: &[(String, T)]) -> Result<Value> {
            let mut m = Mapping::new();
            for (name, cfg) in entries {
                let v = serde_yaml::to_value(cfg).map_err(|e| Error::invalid("schedule", e.to_string()))?;
                let mut entry = Mapping::new();
                match v {
                    Value::Tagged(t) => {
                        entry.insert("class".into(), Value::String(t.tag.to_string().trim_start_matches('!').to_string()));
                        if let Value::Mapping(params) = t.value {
                            entry.extend(params);
                        }
                    }
                    other => return Err(Error::invalid("schedule", format!("unexpected component encoding {other:?}"))),
                }
                m.insert(name.clone().into(), Value::Mapping(entry));
            }
            Ok(Value::Mapping(m))
        }
        let mut top = Mapping::new();
        if let Some(v) = self.version {
            top.insert("version".into(), Value::from(v));
        }
        if !self.pruners.is_empty() {
            top.insert("pruners".into(), section(&self.pruners)?);
        }
        if !self.regularizers.is_empty() {
            top.insert("regularizers".into(), section(&self.regularizers)?);
        }
        if !self.quantizers.is_empty() {
            top.insert("quantizers".into(), section(&self.quantizers)?);
        }
        if !self.lr_schedulers.is_empty() {
            top.insert("lr_schedulers".into(), section(&self.lr_schedulers)?);
        }
        if !self.extensions.is_empty() {
            top.insert("extensions".into(), section(&self.extensions)?);
        }
        if !self.distillers.is_empty() {
            top.insert("distillers".into(), section(&self.distillers)?);
        }
        let mut policies = Vec::new();
        for p in &self.policies {
            let mut body = Mapping::new();
            body.insert("instance_name".into(), p.instance_name.clone().into());
            if p.kind == PolicyKind::Pruner && p.pruning_args != PruningArgs::default() {
                body.insert("args".into(), serde_yaml::to_value(&p.pruning_args).map_err(|e| Error::invalid("schedule", e.to_string()))?);
            }
            if p.kind == PolicyKind::Regularizer && p.keep_mask {
                let mut a = Mapping::new();
                a.insert("keep_mask".into(), true.into());
                body.insert("args".into(), Value::Mapping(a));
            }
            let mut entry = Mapping::new();
            entry.insert(p.kind.key().into(), Value::Mapping(body));
            match &p.epochs {
                Some(Epochs::Range { starting_epoch, ending_epoch, frequency }) => {
                    entry.insert("starting_epoch".into(), Value::from(*starting_epoch as u64));
                    entry.insert("ending_epoch".into(), Value::from(*ending_epoch as u64));
                    entry.insert("frequency".into(), Value::from(*frequency as u64));
                }
                Some(Epochs::List(list)) => {
                    entry.insert("epochs".into(), Value::Sequence(list.iter().map(|&e| Value::from(e as u64)).collect()));
                }
                None => {}
            }
            policies.push(Value::Mapping(entry));
        }
        top.insert("policies".into(), Value::Sequence(policies));
        serde_yaml::to_string(&Value::Mapping(top)).map_err(|e| Error::invalid("schedule", e.to_string()))
    }
}

fn malformed(name: &str, e: &serde_yaml::Error) -> Error {
    let at = e.location().map(|l| format!("{name}:{}:{}", l.line(), l.column())).unwrap_or_else(|| format!("{name}:1:1"));
    Error::Schedule(vec![format!("{at}: malformed YAML: {}", strip_serde_position(&e.to_string()))])
}

/// The largest schedule or statistics file read (Distiller's largest schedule is 15 KB, a ResNet-50 statistics
/// file about 200 KB).
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// The deepest nesting of `[` and `{` accepted: the YAML parser's time grows faster than the text with it.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Reads a YAML file: a regular file (a FIFO or a device would block or never end) of at most
/// [`MAX_FILE_BYTES`], in UTF-8 (an error gives the line and column of the first invalid byte).
pub fn read_text_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::data(path, "is not a regular file (a folder, FIFO or device); give a YAML file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(Error::data(path, format!("is {} bytes, more than the {MAX_FILE_BYTES} a schedule or statistics file may have", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        let column = valid.iter().rev().take_while(|b| **b != b'\n').count() + 1;
        Error::Schedule(vec![format!("{}:{line}:{column}: not UTF-8 text (byte {}); YAML files are UTF-8", path.display(), valid.len())])
    })
}

/// Refuses, with their position, what the YAML parser handles badly: flow nesting deeper than
/// [`MAX_FLOW_DEPTH`] and several documents in one file; and says so for an empty file.
pub(crate) fn check_text(text: &str, name: &str, what: &str) -> Result<()> {
    let at = |line: usize, column: usize, msg: &str| Err(Error::Schedule(vec![format!("{name}:{line}:{column}: {msg}")]));
    if text.len() as u64 > MAX_FILE_BYTES {
        return at(1, 1, &format!("{} bytes is more than the {MAX_FILE_BYTES} a schedule may have", text.len()));
    }
    if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        return at(1, 1, &format!("the file is empty: expected {what}"));
    }
    let (mut depth, mut quote, mut documents) = (0usize, None::<char>, 0usize);
    for (i, line) in text.lines().enumerate() {
        if quote.is_none() && (line.starts_with("---") || line == "...") {
            documents += 1;
            let content_before = text.lines().take(i).any(|l| !(l.trim().is_empty() || l.trim_start().starts_with('#') || l.starts_with("%")));
            if documents > 1 || content_before && line.starts_with("---") {
                return at(i + 1, 1, "a second YAML document: the file must hold one (remove the '---' or split the file)");
            }
        }
        for (j, c) in line.chars().enumerate() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return at(i + 1, j + 1, &format!("brackets nested more than {MAX_FLOW_DEPTH} deep"));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        // A quoted scalar may span lines only in flow context; a stray quote in block context ends with the line.
        if depth == 0 {
            quote = None;
        }
    }
    Ok(())
}

/// The document built from yaml-rust2's events, where a repeated key's last value wins (PyYAML's behaviour;
/// serde_yaml and yaml-rust2's own loader refuse duplicates).
fn last_wins(text: &str) -> Option<Value> {
    use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::{Marker, TScalarStyle};
    use yaml_rust2::Yaml;

    fn scalar(y: Yaml) -> Value {
        match y {
            Yaml::Real(s) => s.parse::<f64>().map(Value::from).unwrap_or(Value::String(s)),
            Yaml::Integer(i) => Value::from(i),
            Yaml::Boolean(b) => Value::Bool(b),
            Yaml::Null => Value::Null,
            Yaml::String(s) => Value::String(s),
            _ => Value::Null,
        }
    }
    #[derive(Default)]
    struct Builder {
        stack: Vec<(Value, Option<Value>)>,
        root: Option<Value>,
        failed: bool,
    }
    impl Builder {
        fn push(&mut self, node: Value) {
            match self.stack.last_mut() {
                None => self.root = Some(node),
                Some((Value::Sequence(s), _)) => s.push(node),
                Some((Value::Mapping(m), key)) => match key.take() {
                    None => *key = Some(node),
                    Some(k) => {
                        m.insert(k, node);
                    }
                },
                Some(_) => self.failed = true,
            }
        }
    }
    impl MarkedEventReceiver for Builder {
        fn on_event(&mut self, ev: Event, _: Marker) {
            match ev {
                Event::Scalar(v, TScalarStyle::Plain, ..) => self.push(scalar(Yaml::from_str(&v))),
                Event::Scalar(v, ..) => self.push(Value::String(v)),
                Event::SequenceStart(..) => self.stack.push((Value::Sequence(Vec::new()), None)),
                Event::MappingStart(..) => self.stack.push((Value::Mapping(Mapping::new()), None)),
                Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                    Some((v, _)) => self.push(v),
                    None => self.failed = true,
                },
                Event::Alias(_) => self.failed = true,
                _ => {}
            }
        }
    }
    let mut b = Builder::default();
    Parser::new_from_str(text).load(&mut b, false).ok()?;
    if b.failed { None } else { b.root }
}

/// Reads a section whose entries are `name: {class: ..., params...}` into typed configs, checking each with
/// `check`, which names the offending key (relative to the entry) with its error.
fn read_section<T: for<'de> Deserialize<'de>>(
    r: &mut Reader,
    section: &str,
    value: &Value,
    classes: &[&str],
    what: &'static str,
    check: impl Fn(&str, &T) -> std::result::Result<(), (Vec<String>, Error)>,
) -> Vec<(String, T)> {
    let mut out = Vec::new();
    for (name, class, params) in r.entries(section, value) {
        let here = path(&[section, &name]);
        if !check_class(r, &here, &class, classes, what) {
            continue;
        }
        if let Some(cfg) = r.typed::<T>(&here, &class, params) {
            if let Err((key, e)) = check(&name, &cfg) {
                let mut p = here.clone();
                p.extend(key);
                r.key_problem(&p, e);
            }
            out.push((name, cfg));
        }
    }
    out
}

/// The folder a schedule named `name` (its file path) was read from, against which its relative paths resolve.
fn base_dir(name: &str) -> PathBuf {
    Path::new(name).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The YAML key a construction error is about: the parameter an `InvalidArgument` names, if it names one.
fn at_key<T>(result: Result<T>) -> std::result::Result<(), (Vec<String>, Error)> {
    result.map(|_| ()).map_err(|e| {
        let key = match &e {
            Error::InvalidArgument { name, .. } => vec![name.split_whitespace().next().unwrap_or(name).to_string()],
            _ => Vec::new(),
        };
        (key, e)
    })
}

/// Distiller's activation-statistics files map module names to `{inputs, output}` records.
fn looks_like_activation_stats(top: &Mapping) -> bool {
    let schedule_keys = top.keys().any(|k| k.as_str().is_some_and(|k| TOP_LEVEL.contains(&k)));
    !schedule_keys
        && top.values().any(|v| v.as_mapping().is_some_and(|m| m.contains_key("output") || m.contains_key("inputs")))
}
