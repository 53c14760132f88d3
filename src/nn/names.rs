/// Removes the first `module` component of a dotted name, the prefix `nn.DataParallel` adds and that Distiller's
/// YAML files carry: `module.layer1.0.conv1.weight` becomes `layer1.0.conv1.weight`. Other names are unchanged.
///
/// ```
/// assert_eq!(distill::nn::normalize_name("module.conv1.weight"), "conv1.weight");
/// assert_eq!(distill::nn::normalize_name("features.module.0.weight"), "features.0.weight");
/// assert_eq!(distill::nn::normalize_name("fc.weight"), "fc.weight");
/// ```
pub fn normalize_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.iter().position(|p| *p == "module") {
        Some(i) => parts.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| *p).collect::<Vec<_>>().join("."),
        None => name.to_string(),
    }
}

/// The name a parameter had before quantization wrapped or renamed it: `conv1.float_weight` → `conv1.weight`,
/// `conv1.wrapped_module.weight` → `conv1.weight` (Distiller's fallback for masks of quantized models).
///
/// ```
/// assert_eq!(distill::nn::canonical_param_name("conv1.float_weight"), "conv1.weight");
/// assert_eq!(distill::nn::canonical_param_name("fc.wrapped_module.bias"), "fc.bias");
/// ```
pub fn canonical_param_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').filter(|p| *p != "wrapped_module").collect();
    let mut joined = parts.join(".");
    for (from, to) in [(".float_weight", ".weight"), (".float_bias", ".bias")] {
        if let Some(stem) = joined.strip_suffix(from) {
            joined = format!("{stem}{to}");
        }
    }
    joined
}
