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
