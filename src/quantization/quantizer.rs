//! The quantizer base (Distiller's `Quantizer`): bit widths per module from defaults and ordered overrides, and
//! module replacement through a per-method factory keyed by module type.
use std::collections::{BTreeMap, HashMap};

use serde_yaml::{Mapping, Value};

use super::q_utils::{check_bits, ClipMode, LinearQuantMode};
use crate::nn::{normalize_name, Model, Module, Rollback};
use crate::{Error, Result};

/// Bit widths of one module; `None` leaves that part in floating point (Distiller's `QBits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QBits {
    /// Activations (the module's output).
    pub acts: Option<u32>,
    /// Weights.
    pub wts: Option<u32>,
    /// Biases.
    pub bias: Option<u32>,
}

impl QBits {
    /// Whether nothing is quantized.
    pub fn is_float(&self) -> bool {
        self.acts.is_none() && self.wts.is_none() && self.bias.is_none()
    }
}

/// A quantization mode for activations and weights (a single mode, or `{activations: .., weights: ..}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSpec {
    /// Mode of activations.
    pub activations: LinearQuantMode,
    /// Mode of weights.
    pub weights: LinearQuantMode,
}

impl ModeSpec {
    /// The same mode for both.
    pub fn both(m: LinearQuantMode) -> Self {
        ModeSpec { activations: m, weights: m }
    }

    /// From Distiller's YAML: a mode name or `{activations: M, weights: M}`.
    pub fn from_yaml(v: &Value) -> Result<Self> {
        match v {
            Value::String(s) => Ok(ModeSpec::both(s.parse()?)),
            Value::Mapping(m) => {
                let mut spec = ModeSpec::both(LinearQuantMode::Symmetric);
                for (k, val) in m {
                    let mode: LinearQuantMode = val.as_str().ok_or_else(|| Error::invalid("mode", "modes are names such as SYMMETRIC"))?.parse()?;
                    match k.as_str() {
                        Some("activations") => spec.activations = mode,
                        Some("weights") => spec.weights = mode,
                        _ => return Err(Error::unknown("mode key", &format!("{k:?}"), ["activations", "weights"])),
                    }
                }
                Ok(spec)
            }
            other => Err(Error::invalid("mode", format!("expected a mode name or a mapping, got {other:?}"))),
        }
    }
}

/// Settings of one module after defaults and overrides are resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleQuantSettings {
    /// Bit widths.
    pub bits: QBits,
    /// Modes.
    pub mode: ModeSpec,
    /// Activation clipping.
    pub clip_acts: ClipMode,
    /// Per-output-channel weight scales.
    pub per_channel_wts: bool,
    /// The output is non-negative (a fused ReLU): clip the range at 0.
    pub clip_half_range: bool,
    /// Whether an override named this module.
    pub overridden: bool,
    /// Whether that override sets anything besides bit widths (Distiller then calls the replacement function
    /// even for a module left in floating point).
    pub has_kwargs: bool,
    /// Accumulator bits (`None`: the quantizer's).
    pub bits_accum: Option<u32>,
    /// Integer multiplier bits approximating requantization scales (`None`: the quantizer's, else exact).
    pub scale_approx_mult_bits: Option<u32>,
    /// Run the module in this floating-point width (16, 32, 64) (`None`: the quantizer's).
    pub fpq_module: Option<u32>,
    /// Distiller's `fake`: only quantize the output (`Some(false)` with `fpq_module`: not quantized at all).
    pub fake: Option<bool>,
    /// Per input index, how an input without quantization parameters from the previous layer is quantized.
    pub input_overrides: BTreeMap<usize, InputOverride>,
    /// For fake-quantized modules: whether their inputs are quantized too (`None`: yes).
    pub quantize_inputs: Option<bool>,
}

/// One `input_overrides` entry: the output's settings (`from_output: true`), or some of them changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputOverride {
    /// The output's bits, mode and clipping (without the half range).
    FromOutput,
    /// These settings, the output's where `None`.
    Settings {
        /// Bits.
        bits: Option<u32>,
        /// Mode.
        mode: Option<LinearQuantMode>,
        /// Clipping.
        clip: Option<ClipMode>,
    },
}

/// One `overrides` entry: a regex (or exact module name) and the settings it changes.
#[derive(Debug, Clone)]
struct Override {
    pattern: String,
    regex: regex::Regex,
    settings: Mapping,
}

/// `overrides`: ordered; an exact module name wins over patterns, otherwise the first matching pattern wins.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    entries: Vec<Override>,
}

impl Overrides {
    /// From Distiller's ordered YAML mapping. Invalid regexes are errors.
    pub fn from_mapping(m: &Mapping) -> Result<Self> {
        let mut entries = Vec::new();
        for (k, v) in m {
            let pattern = k.as_str().ok_or_else(|| Error::invalid("overrides", format!("keys are module names or regexes, got {k:?}")))?;
            let normalized = normalize_name(pattern);
            let regex = regex::Regex::new(&format!("^(?:{normalized})$"))
                .map_err(|e| Error::invalid("overrides", format!("'{pattern}' is not a valid regex: {e}")))?;
            let settings = match v {
                Value::Mapping(s) => s.clone(),
                Value::Null => Mapping::new(),
                other => return Err(Error::invalid("overrides", format!("settings of '{pattern}' must be a mapping, got {other:?}"))),
            };
            entries.push(Override { pattern: normalized, regex, settings });
        }
        Ok(Overrides { entries })
    }

    /// Whether an override applies to module `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// These overrides plus one for exactly module `name`, which wins over every pattern.
    pub fn with_exact(&self, name: &str, settings: Mapping) -> Result<Self> {
        let normalized = normalize_name(name);
        let regex = regex::Regex::new(&format!("^{}$", regex::escape(&normalized))).map_err(|e| Error::invalid("overrides", e.to_string()))?;
        let mut entries = self.entries.clone();
        entries.retain(|o| o.pattern != normalized);
        entries.push(Override { pattern: normalized, regex, settings });
        Ok(Overrides { entries })
    }

    /// The override for module `name`: an exact name first, else the first pattern that matches.
    fn find(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|o| o.pattern == name).or_else(|| self.entries.iter().position(|o| o.regex.is_match(name)))
    }
}

/// The defaults every module starts from.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantDefaults {
    /// Bit widths.
    pub bits: QBits,
    /// Modes.
    pub mode: ModeSpec,
    /// Activation clipping.
    pub clip_acts: ClipMode,
    /// Per-channel weights.
    pub per_channel_wts: bool,
    /// Outputs known non-negative (Distiller's `clip_half_range`).
    pub clip_half_range: bool,
}

impl QuantDefaults {
    /// Nothing quantized, symmetric, no clipping, per tensor.
    pub fn float() -> Self {
        QuantDefaults { bits: QBits::default(), mode: ModeSpec::both(LinearQuantMode::Symmetric), clip_acts: ClipMode::None, per_channel_wts: false, clip_half_range: false }
    }
}

fn bits_setting(v: &Value, key: &str) -> Result<Option<u32>> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => {
            let b = n.as_u64().filter(|b| *b <= u32::MAX as u64).ok_or_else(|| Error::invalid(key, format!("{n} is not a bit width")))? as u32;
            check_bits(key, b)?;
            Ok(Some(b))
        }
        other => Err(Error::invalid(key, format!("expected a bit width or null, got {other:?}"))),
    }
}

fn bool_setting(v: &Value, key: &str) -> Result<bool> {
    v.as_bool().ok_or_else(|| Error::invalid(key, format!("expected true or false, got {v:?}")))
}

/// `fpq_module`: 16, 32 or 64 (or null).
pub fn fpq_setting(v: &Value, key: &str) -> Result<Option<u32>> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(b @ (16 | 32 | 64)) => Ok(Some(b as u32)),
            _ => Err(Error::invalid(key, format!("{n}: the floating-point width must be 16, 32 or 64"))),
        },
        Value::String(s) => match s.as_str() {
            "16" | "32" | "64" => Ok(Some(s.parse().unwrap_or(32))),
            _ => Err(Error::invalid(key, format!("'{s}': the floating-point width must be 16, 32 or 64"))),
        },
        other => Err(Error::invalid(key, format!("expected 16, 32 or 64, got {other:?}"))),
    }
}

/// The `clip_n_stds` of a settings mapping, if given.
fn n_stds_setting(settings: &Mapping) -> Result<Option<f64>> {
    settings.get("clip_n_stds").map(|v| v.as_f64().ok_or_else(|| Error::invalid("clip_n_stds", format!("expected a number, got {v:?}")))).transpose()
}

/// `clip_acts` with the `clip_n_stds` that `N_STD` needs.
fn clip_setting(v: &Value, n_stds: Option<f64>) -> Result<ClipMode> {
    let name = v.as_str().ok_or_else(|| Error::invalid("clip_acts", format!("expected a clip mode name, got {v:?}")))?;
    ClipMode::parse(name, n_stds)
}

/// Distiller's `input_overrides`: `{index: {from_output: true}}` or `{index: {bits_activations, mode, clip_acts,
/// clip_n_stds}}`.
pub fn parse_input_overrides(v: &Value) -> Result<BTreeMap<usize, InputOverride>> {
    let Value::Mapping(m) = v else {
        return Err(Error::invalid("input_overrides", format!("expected a mapping from input index to settings, got {v:?}")));
    };
    let mut out = BTreeMap::new();
    for (k, settings) in m {
        let idx = match k {
            Value::Number(n) => n.as_u64().map(|i| i as usize),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .filter(|i| *i < 64)
        .ok_or_else(|| Error::invalid("input_overrides", format!("keys are input indices (0, 1, ...), got {k:?}")))?;
        let Value::Mapping(s) = settings else {
            return Err(Error::invalid("input_overrides", format!("settings of input {idx} must be a mapping, got {settings:?}")));
        };
        if let Some(v) = s.get("from_output") {
            if bool_setting(v, "from_output")? {
                out.insert(idx, InputOverride::FromOutput);
                continue;
            }
        }
        let n_stds = n_stds_setting(s)?;
        let (mut bits, mut mode, mut clip) = (None, None, None);
        for (key, val) in s {
            match key.as_str().unwrap_or("") {
                "bits_activations" => bits = bits_setting(val, "bits_activations")?,
                "mode" => mode = Some(val.as_str().ok_or_else(|| Error::invalid("mode", format!("expected a mode name, got {val:?}")))?.parse()?),
                "clip_acts" => clip = Some(clip_setting(val, n_stds)?),
                "clip_n_stds" | "from_output" => {}
                other => return Err(Error::unknown("input override setting", other, ["from_output", "bits_activations", "mode", "clip_acts", "clip_n_stds"])),
            }
        }
        if n_stds.is_some() && !matches!(clip, Some(ClipMode::NStd(_))) {
            return Err(Error::invalid("input_overrides", format!("input {idx}: clip_n_stds applies to N_STD clipping; add clip_acts: N_STD")));
        }
        out.insert(idx, InputOverride::Settings { bits, mode, clip });
    }
    Ok(out)
}

/// Module types whose weights and biases are quantized; every other type gets activation bits only.
const WEIGHTED: &[&str] = &["Conv2d", "Linear", "Embedding"];

/// Override keys of `PostTrainLinearQuantizer` (Distiller's replacement functions' arguments, plus `bits_accum`).
pub const POST_TRAIN_OVERRIDE_KEYS: &[&str] = &[
    "bits_activations", "bits_weights", "bits_bias", "bits_accum", "mode", "clip_acts", "clip_n_stds", "clip_half_range", "per_channel_wts",
    "scale_approx_mult_bits", "fpq_module", "fake", "input_overrides", "quantize_inputs",
];
/// Override keys of `QuantAwareTrainRangeLinearQuantizer`: bit widths, plus a module's own mode and per-channel
/// weights (distill's additions; Distiller sets those for the whole model only).
pub const QAT_OVERRIDE_KEYS: &[&str] = &["bits_activations", "bits_weights", "bits_bias", "mode", "per_channel_wts"];
/// Override keys of DoReFa, PACT and WRPN: bit widths only, as in Distiller.
pub const CLIPPED_OVERRIDE_KEYS: &[&str] = &["bits_activations", "bits_weights", "bits_bias"];

/// Applies one override's settings to `s`, checking every key is in `allowed` and every value is valid.
pub fn apply_override(s: &mut ModuleQuantSettings, settings: &Mapping, allowed: &[&str]) -> Result<()> {
    let n_stds = n_stds_setting(settings)?;
    for (k, v) in settings {
        let key = k.as_str().unwrap_or("");
        if !allowed.contains(&key) {
            return Err(Error::unknown("override setting", key, allowed.iter().copied()));
        }
        if !BITS_KEYS.contains(&key) {
            s.has_kwargs = true;
        }
        match key {
            "bits_activations" => s.bits.acts = bits_setting(v, "bits_activations")?,
            "bits_weights" => s.bits.wts = bits_setting(v, "bits_weights")?,
            "bits_bias" => s.bits.bias = bits_setting(v, "bits_bias")?,
            "bits_accum" => s.bits_accum = bits_setting(v, "bits_accum")?,
            "mode" => s.mode = ModeSpec::from_yaml(v)?,
            "clip_acts" => s.clip_acts = clip_setting(v, n_stds)?,
            "clip_n_stds" => {
                if !settings.contains_key("clip_acts") {
                    if !matches!(s.clip_acts, ClipMode::NStd(_)) {
                        return Err(Error::invalid("clip_n_stds", format!("the clipping is {:?}; clip_n_stds applies to N_STD only (add clip_acts: N_STD)", s.clip_acts)));
                    }
                    s.clip_acts = ClipMode::parse("N_STD", n_stds)?;
                }
            }
            "per_channel_wts" => s.per_channel_wts = bool_setting(v, "per_channel_wts")?,
            "clip_half_range" => s.clip_half_range = bool_setting(v, "clip_half_range")?,
            "scale_approx_mult_bits" => s.scale_approx_mult_bits = bits_setting(v, "scale_approx_mult_bits")?,
            "fpq_module" => s.fpq_module = fpq_setting(v, "fpq_module")?,
            "fake" => s.fake = Some(bool_setting(v, "fake")?),
            "input_overrides" => s.input_overrides = parse_input_overrides(v)?,
            "quantize_inputs" => s.quantize_inputs = Some(bool_setting(v, "quantize_inputs")?),
            other => return Err(Error::unknown("override setting", other, allowed.iter().copied())),
        }
    }
    Ok(())
}

const BITS_KEYS: &[&str] = &["bits_activations", "bits_weights", "bits_bias"];

impl ModuleQuantSettings {
    /// The settings every module starts from.
    pub fn from_defaults(defaults: &QuantDefaults) -> Self {
        ModuleQuantSettings {
            bits: defaults.bits,
            mode: defaults.mode,
            clip_acts: defaults.clip_acts,
            per_channel_wts: defaults.per_channel_wts,
            clip_half_range: defaults.clip_half_range,
            overridden: false,
            has_kwargs: false,
            bits_accum: None,
            scale_approx_mult_bits: None,
            fpq_module: None,
            fake: None,
            input_overrides: BTreeMap::new(),
            quantize_inputs: None,
        }
    }
}

/// Resolves every module's settings (Distiller's `_prepare_model` override matching). Every override must match
/// at least one module, and use only the keys in `allowed` (what this quantizer honours).
pub fn resolve_settings(model: &Model, defaults: &QuantDefaults, overrides: &Overrides, allowed: &[&str]) -> Result<Vec<(String, String, ModuleQuantSettings)>> {
    // Every override's keys, also those of an override that a broader one listed before it shadows.
    for o in &overrides.entries {
        for k in o.settings.keys() {
            let key = k.as_str().unwrap_or("");
            if !allowed.contains(&key) {
                return Err(Error::unknown("override setting", key, allowed.iter().copied()));
            }
        }
    }
    let mut used = vec![false; overrides.entries.len()];
    let mut out = Vec::new();
    for m in model.named_modules().into_iter().filter(|m| !m.name.is_empty()) {
        let mut s = ModuleQuantSettings::from_defaults(defaults);
        let normalized = normalize_name(&m.name);
        for (i, o) in overrides.entries.iter().enumerate() {
            used[i] |= o.pattern == normalized || o.regex.is_match(&normalized);
        }
        if let Some(i) = overrides.find(&normalized) {
            s.overridden = true;
            apply_override(&mut s, &overrides.entries[i].settings, allowed).map_err(|e| Error::invalid("overrides", format!("'{}' (for {}): {e}", overrides.entries[i].pattern, m.name)))?;
        }
        if !WEIGHTED.contains(&m.type_name.as_str()) {
            s.bits.wts = None;
            s.bits.bias = None;
        }
        out.push((m.name, m.type_name, s));
    }
    if let Some(i) = used.iter().position(|u| !u) {
        let names: Vec<String> = out.iter().map(|(n, ..)| n.clone()).collect();
        return Err(Error::unknown("module for override", &overrides.entries[i].pattern, names));
    }
    Ok(out)
}

/// What a replacement function returns: the new module, or the old one back with the error.
pub type Replaced = std::result::Result<Box<dyn Module>, (Box<dyn Module>, Error)>;

/// Builds a module's replacement from the module itself, its name and its settings.
pub type ReplaceFn<'a> = Box<dyn Fn(Box<dyn Module>, &str, &ModuleQuantSettings) -> Replaced + 'a>;

/// A quantization method's replacement factory (Distiller's `replacement_factory`): module type → replacement.
#[derive(Default)]
pub struct ReplaceFactory<'a> {
    by_type: HashMap<&'static str, ReplaceFn<'a>>,
    default: Option<ReplaceFn<'a>>,
    keep: Vec<&'static str>,
}

impl<'a> ReplaceFactory<'a> {
    /// Replaces modules of `type_name` with `f`.
    pub fn with(mut self, type_name: &'static str, f: impl Fn(Box<dyn Module>, &str, &ModuleQuantSettings) -> Replaced + 'a) -> Self {
        self.by_type.insert(type_name, Box::new(f));
        self
    }
    /// Replaces every other leaf with `f`.
    pub fn with_default(mut self, f: impl Fn(Box<dyn Module>, &str, &ModuleQuantSettings) -> Replaced + 'a) -> Self {
        self.default = Some(Box::new(f));
        self
    }
    /// Never replaces modules of `type_name` (Distiller's blacklist).
    pub fn keeping(mut self, type_name: &'static str) -> Self {
        self.keep.push(type_name);
        self
    }

    /// Replaces every quantized leaf of `model` in place, keeping names, and records each replacement in
    /// `rollback`. A module whose type this method does not replace is left as it is, as Distiller does (a batch
    /// norm matched by `layer1\..*` in a QAT schedule); the returned list says which modules were replaced.
    pub fn prepare(&self, model: &mut Model, settings: &[(String, String, ModuleQuantSettings)], rollback: &mut Rollback) -> Result<Vec<String>> {
        let leaves: Vec<String> = model.named_modules().into_iter().filter(|m| m.is_leaf && !m.name.is_empty()).map(|m| m.name).collect();
        let mut replaced = Vec::new();
        for (name, type_name, s) in settings {
            if !leaves.contains(name) || self.keep.contains(&type_name.as_str()) || s.bits.acts.is_none() && s.bits.wts.is_none() && !s.has_kwargs {
                continue;
            }
            let Some(f) = self.by_type.get(type_name.as_str()).or(self.default.as_ref()) else { continue };
            let mut changed = false;
            model
                .try_map_module(name, |m| {
                    let (before, before_type): (*const dyn Module, String) = (m.as_ref(), m.type_name().to_string());
                    f(m, name, s).inspect(|new| {
                        // The factory hands a module it keeps back unchanged.
                        changed = !std::ptr::addr_eq(before, new.as_ref() as *const dyn Module) || new.type_name() != before_type;
                    })
                })
                .map_err(|e| Error::invalid("quantization", format!("{name} ({type_name}): {e}")))?;
            if changed {
                rollback.wrapped(name);
                replaced.push(name.clone());
            }
        }
        Ok(replaced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(yaml: &str) -> Overrides {
        let m: Mapping = serde_yaml::from_str(yaml).unwrap();
        Overrides::from_mapping(&m).unwrap()
    }

    fn defaults() -> QuantDefaults {
        QuantDefaults { bits: QBits { acts: Some(4), wts: Some(4), bias: Some(32) }, mode: ModeSpec::both(LinearQuantMode::Symmetric), clip_acts: ClipMode::None, per_channel_wts: false, clip_half_range: false }
    }

    const ALL: &[&str] = POST_TRAIN_OVERRIDE_KEYS;

    fn bits_of(r: &[(String, String, ModuleQuantSettings)], name: &str) -> QBits {
        r.iter().find(|(n, ..)| n == name).unwrap().2.bits
    }

    #[test]
    fn first_matching_pattern_wins_and_exact_names_win_over_patterns() {
        let model = crate::models::create_model("resnet20_cifar", "cifar10", tch::Device::Cpu).unwrap();
        // Distiller's test_model_prep: specific pattern first.
        let o = overrides("'layer1\\..*1': {bits_activations: 16, bits_weights: 16}\n'layer1\\..*': {bits_activations: 8, bits_weights: 8}\n");
        let r = resolve_settings(&model, &defaults(), &o, ALL).unwrap();
        assert_eq!(bits_of(&r, "layer1.0.conv1"), QBits { acts: Some(16), wts: Some(16), bias: Some(32) });
        assert_eq!(bits_of(&r, "layer1.0.conv2"), QBits { acts: Some(8), wts: Some(8), bias: Some(32) });
        assert_eq!(bits_of(&r, "layer1.0.bn1"), QBits { acts: Some(16), wts: None, bias: None });
        assert_eq!(bits_of(&r, "layer2.0.conv1"), QBits { acts: Some(4), wts: Some(4), bias: Some(32) });
        // Reversed: the broad pattern swallows everything in layer1.
        let o = overrides("'layer1\\..*': {bits_activations: 8, bits_weights: 8}\n'layer1\\..*1': {bits_activations: 16, bits_weights: 16}\n");
        let r = resolve_settings(&model, &defaults(), &o, ALL).unwrap();
        assert_eq!(bits_of(&r, "layer1.0.conv1").acts, Some(8));
        // An exact name wins even when listed after a matching pattern; null leaves it in float; module. prefix.
        let o = overrides("'.*conv1': {bits_weights: 2}\nmodule.layer1.0.conv1: {bits_weights: null, bits_activations: null}\n");
        let r = resolve_settings(&model, &defaults(), &o, ALL).unwrap();
        assert_eq!(bits_of(&r, "layer1.0.conv1"), QBits { acts: None, wts: None, bias: Some(32) });
        assert_eq!(bits_of(&r, "layer2.0.conv1").wts, Some(2));
    }

    #[test]
    fn bad_overrides_are_errors() {
        let model = crate::models::create_model("lenet", "mnist", tch::Device::Cpu).unwrap();
        let err = resolve_settings(&model, &defaults(), &overrides("conv3: {bits_weights: 8}\n"), ALL).unwrap_err().to_string();
        assert!(err.contains("unknown module for override 'conv3'; did you mean 'conv1' or 'conv2'"), "{err}");
        let m: Mapping = serde_yaml::from_str("'conv(': {bits_weights: 8}\n").unwrap();
        assert!(Overrides::from_mapping(&m).unwrap_err().to_string().contains("not a valid regex"));
        let qat = resolve_settings(&model, &defaults(), &overrides("conv1: {fpq_module: 16}\n"), QAT_OVERRIDE_KEYS).unwrap_err().to_string();
        assert!(qat.contains("unknown override setting 'fpq_module'"), "{qat}");
        for bad in ["conv1: {bits_weights: 0}\n", "conv1: {bits_weights: 33}\n", "conv1: {mode: SIDEWAYS}\n", "conv1: {clip_acts: MEDIAN}\n", "conv1: {bits_wieghts: 8}\n",
            "conv1: {fpq_module: 8}\n", "conv1: {fake: maybe}\n", "conv1: {per_channel_wts: 1}\n", "conv1: {input_overrides: {x: {}}}\n",
            "conv1: {input_overrides: {0: {bits_weights: 4}}}\n", "conv1: {clip_n_stds: -1}\n"] {
            assert!(resolve_settings(&model, &defaults(), &overrides(bad), ALL).is_err(), "{bad}");
        }
    }
}
