//! The quantizer base (Distiller's `Quantizer`): bit widths per module from defaults and ordered overrides, and
//! module replacement through a per-method factory keyed by module type.
use std::collections::HashMap;

use serde_yaml::{Mapping, Value};

use super::q_utils::{check_bits, ClipMode, LinearQuantMode};
use crate::nn::{normalize_name, Model, Module};
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
    /// Whether an override named this module explicitly (its type must then be quantizable).
    pub overridden: bool,
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
}

fn bits_setting(v: &Value, key: &str) -> Result<Option<u32>> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => {
            let b = n.as_u64().ok_or_else(|| Error::invalid(key, format!("{n} is not a bit width")))? as u32;
            check_bits(key, b)?;
            Ok(Some(b))
        }
        other => Err(Error::invalid(key, format!("expected a bit width or null, got {other:?}"))),
    }
}

/// Module types whose weights and biases are quantized; every other type gets activation bits only.
const WEIGHTED: &[&str] = &["Conv2d", "Linear", "Embedding"];

/// Resolves every module's settings (Distiller's `_prepare_model` override matching). Every override must match
/// at least one module.
pub fn resolve_settings(model: &Model, defaults: &QuantDefaults, overrides: &Overrides) -> Result<Vec<(String, String, ModuleQuantSettings)>> {
    let mut used = vec![false; overrides.entries.len()];
    let mut out = Vec::new();
    for m in model.named_modules().into_iter().filter(|m| !m.name.is_empty()) {
        let mut s = ModuleQuantSettings {
            bits: defaults.bits,
            mode: defaults.mode,
            clip_acts: defaults.clip_acts,
            per_channel_wts: defaults.per_channel_wts,
            clip_half_range: false,
            overridden: false,
        };
        let normalized = normalize_name(&m.name);
        for (i, o) in overrides.entries.iter().enumerate() {
            used[i] |= o.pattern == normalized || o.regex.is_match(&normalized);
        }
        if let Some(i) = overrides.find(&normalized) {
            s.overridden = true;
            let mut n_stds = None;
            if let Some(v) = overrides.entries[i].settings.get("clip_n_stds") {
                n_stds = v.as_f64();
            }
            for (k, v) in &overrides.entries[i].settings {
                match k.as_str().unwrap_or("") {
                    "bits_activations" => s.bits.acts = bits_setting(v, "bits_activations")?,
                    "bits_weights" => s.bits.wts = bits_setting(v, "bits_weights")?,
                    "bits_bias" => s.bits.bias = bits_setting(v, "bits_bias")?,
                    "mode" => s.mode = ModeSpec::from_yaml(v)?,
                    "clip_acts" => s.clip_acts = ClipMode::parse(v.as_str().unwrap_or("?"), n_stds)?,
                    "per_channel_wts" => s.per_channel_wts = v.as_bool().unwrap_or(false),
                    "clip_half_range" => s.clip_half_range = v.as_bool().unwrap_or(false),
                    // Accepted as in Distiller's schema; without effect in distill's simulation.
                    "clip_n_stds" | "bits_accum" | "fpq_module" | "input_overrides" | "quantize_inputs" | "fake" | "scale_approx_mult_bits" => {}
                    other => return Err(Error::unknown("override setting", other, ["bits_activations", "bits_weights", "bits_bias", "mode", "clip_acts", "clip_n_stds", "per_channel_wts", "clip_half_range"])),
                }
            }
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

    /// Replaces every quantized leaf of `model` in place, keeping names. A module an override explicitly asks to
    /// quantize but whose type this method cannot replace is an error.
    pub fn prepare(&self, model: &mut Model, settings: &[(String, String, ModuleQuantSettings)], method: &str) -> Result<Vec<String>> {
        let leaves: Vec<String> = model.named_modules().into_iter().filter(|m| m.is_leaf && !m.name.is_empty()).map(|m| m.name).collect();
        let mut replaced = Vec::new();
        for (name, type_name, s) in settings {
            if !leaves.contains(name) || self.keep.contains(&type_name.as_str()) || s.bits.is_float() {
                continue;
            }
            let f = match self.by_type.get(type_name.as_str()).or(self.default.as_ref()) {
                Some(f) => f,
                None if s.overridden => {
                    let mut types: Vec<&str> = self.by_type.keys().copied().collect();
                    types.sort();
                    return Err(Error::invalid(
                        "overrides",
                        format!("{method} cannot quantize '{name}' ({type_name}): it replaces {} modules only", types.join(", ")),
                    ));
                }
                None => continue,
            };
            model.try_map_module(name, |m| f(m, name, s))?;
            replaced.push(name.clone());
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
        QuantDefaults { bits: QBits { acts: Some(4), wts: Some(4), bias: Some(32) }, mode: ModeSpec::both(LinearQuantMode::Symmetric), clip_acts: ClipMode::None, per_channel_wts: false }
    }

    fn bits_of(r: &[(String, String, ModuleQuantSettings)], name: &str) -> QBits {
        r.iter().find(|(n, ..)| n == name).unwrap().2.bits
    }

    #[test]
    fn first_matching_pattern_wins_and_exact_names_win_over_patterns() {
        let model = crate::models::create_model("resnet20_cifar", "cifar10", tch::Device::Cpu).unwrap();
        // Distiller's test_model_prep: specific pattern first.
        let o = overrides("'layer1\\..*1': {bits_activations: 16, bits_weights: 16}\n'layer1\\..*': {bits_activations: 8, bits_weights: 8}\n");
        let r = resolve_settings(&model, &defaults(), &o).unwrap();
        assert_eq!(bits_of(&r, "layer1.0.conv1"), QBits { acts: Some(16), wts: Some(16), bias: Some(32) });
        assert_eq!(bits_of(&r, "layer1.0.conv2"), QBits { acts: Some(8), wts: Some(8), bias: Some(32) });
        assert_eq!(bits_of(&r, "layer1.0.bn1"), QBits { acts: Some(16), wts: None, bias: None });
        assert_eq!(bits_of(&r, "layer2.0.conv1"), QBits { acts: Some(4), wts: Some(4), bias: Some(32) });
        // Reversed: the broad pattern swallows everything in layer1.
        let o = overrides("'layer1\\..*': {bits_activations: 8, bits_weights: 8}\n'layer1\\..*1': {bits_activations: 16, bits_weights: 16}\n");
        let r = resolve_settings(&model, &defaults(), &o).unwrap();
        assert_eq!(bits_of(&r, "layer1.0.conv1").acts, Some(8));
        // An exact name wins even when listed after a matching pattern; null leaves it in float; module. prefix.
        let o = overrides("'.*conv1': {bits_weights: 2}\nmodule.layer1.0.conv1: {bits_weights: null, bits_activations: null}\n");
        let r = resolve_settings(&model, &defaults(), &o).unwrap();
        assert_eq!(bits_of(&r, "layer1.0.conv1"), QBits { acts: None, wts: None, bias: Some(32) });
        assert_eq!(bits_of(&r, "layer2.0.conv1").wts, Some(2));
    }

    #[test]
    fn bad_overrides_are_errors() {
        let model = crate::models::create_model("lenet", "mnist", tch::Device::Cpu).unwrap();
        let err = resolve_settings(&model, &defaults(), &overrides("conv3: {bits_weights: 8}\n")).unwrap_err().to_string();
        assert!(err.contains("unknown module for override 'conv3'; did you mean 'conv1' or 'conv2'"), "{err}");
        let m: Mapping = serde_yaml::from_str("'conv(': {bits_weights: 8}\n").unwrap();
        assert!(Overrides::from_mapping(&m).unwrap_err().to_string().contains("not a valid regex"));
        for bad in ["conv1: {bits_weights: 0}\n", "conv1: {bits_weights: 33}\n", "conv1: {mode: SIDEWAYS}\n", "conv1: {clip_acts: MEDIAN}\n", "conv1: {bits_wieghts: 8}\n"] {
            assert!(resolve_settings(&model, &defaults(), &overrides(bad)).is_err(), "{bad}");
        }
    }
}
