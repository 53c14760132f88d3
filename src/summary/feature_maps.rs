//! What a network computes inside: the outputs of named modules (Distiller's `save_intermediate_feature_maps`
//! notebook, which registers forward hooks), and Grad-CAM class-activation maps (Distiller's
//! `what_are_you_looking_at`), which show where in the input a convolution's evidence for a class lies.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use crate::nn::{normalize_name, Model, ModuleCall, Observer};
use crate::{Error, Result};

/// Keeps the first output of each wanted module in a forward pass.
struct Capture {
    wanted: Vec<String>,
    detach: bool,
    outputs: BTreeMap<String, Tensor>,
}

impl Observer for Capture {
    fn observe(&mut self, call: &ModuleCall) {
        if self.wanted.iter().any(|w| w == call.name) && !self.outputs.contains_key(call.name) {
            let t = if self.detach { call.output.detach() } else { call.output.shallow_clone() };
            self.outputs.insert(call.name.to_string(), t);
        }
    }
}

/// Runs `f` with the model in eval mode and a capture of `modules` attached; restores the mode and detaches
/// whatever happens. Returns `f`'s value and the captured outputs in the order of `modules`.
fn captured<T>(model: &mut Model, modules: &[String], detach: bool, f: impl FnOnce(&Model) -> Result<T>) -> Result<(T, Vec<(String, Tensor)>)> {
    let capture = Arc::new(Mutex::new(Capture { wanted: modules.to_vec(), detach, outputs: BTreeMap::new() }));
    let id = model.attach_observer(capture.clone());
    let was_training = model.is_training();
    model.eval();
    let result = f(model);
    model.detach_observer(id);
    if was_training {
        model.train();
    }
    let value = result?;
    let mut outputs = std::mem::take(&mut capture.lock().map_err(|_| Error::invalid("feature maps", "the capture was poisoned by a panic"))?.outputs);
    let mut ordered = Vec::with_capacity(modules.len());
    for name in modules {
        match outputs.remove(name) {
            Some(t) => ordered.push((name.clone(), t)),
            None => return Err(Error::invalid("feature maps", format!("'{name}' did not run in the forward pass (an unused module, or one inside an exit that the pass skipped)"))),
        }
    }
    Ok((value, ordered))
}

fn resolve(model: &Model, modules: &[&str]) -> Result<Vec<String>> {
    if modules.is_empty() {
        return Err(Error::invalid("feature maps", "no module named; pass the modules whose outputs you want, e.g. [\"conv1\", \"relu1\"]"));
    }
    modules
        .iter()
        .map(|m| {
            model.module(m)?;
            Ok(normalize_name(m))
        })
        .collect()
}

/// The outputs of the named modules when `input` runs through `model` (eval mode, no gradients), in the order
/// named: for a convolution `[N, C, H, W]`, one feature map per channel. Each module's first call in the pass
/// counts. A name that is not a module of the model is an error with suggestions.
///
/// ```
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// let x = tch::Tensor::zeros([2, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
/// let maps = distill::summary::feature_maps::feature_maps(&mut model, &x, &["conv1", "relu2"])?;
/// assert_eq!(maps[0].1.size(), [2, 6, 28, 28]);
/// assert_eq!(maps[1].1.size(), [2, 16, 10, 10]);
/// # Ok::<(), distill::Error>(())
/// ```
pub fn feature_maps(model: &mut Model, input: &Tensor, modules: &[&str]) -> Result<Vec<(String, Tensor)>> {
    let names = resolve(model, modules)?;
    let (_, maps) = tch::no_grad(|| captured(model, &names, true, |m| m.forward(input)))?;
    Ok(maps)
}

/// Grad-CAM (Selvaraju et al. 2017) at the convolutional module `layer`: for each sample, the map
/// `ReLU(Σ_c α_c · A_c)` where `A_c` is the layer's output channel `c` and `α_c` the mean over its positions of
/// the gradient of the class score (the logit before softmax) with respect to `A_c`; scaled to [0, 1] per sample
/// and resized (bilinear) to the input's height and width. `class`: the class to explain for every sample, or
/// `None` for each sample's predicted class. Returns `[N, H, W]` and the classes explained.
///
/// ```
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// let x = tch::Tensor::rand([3, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
/// let (maps, classes) = distill::summary::feature_maps::grad_cam(&mut model, &x, "conv2", None)?;
/// assert_eq!((maps.size(), classes.len()), (vec![3, 28, 28], 3));
/// assert!(distill::summary::feature_maps::grad_cam(&mut model, &x, "fc1", None).is_err());
/// # Ok::<(), distill::Error>(())
/// ```
pub fn grad_cam(model: &mut Model, input: &Tensor, layer: &str, class: Option<i64>) -> Result<(Tensor, Vec<i64>)> {
    let names = resolve(model, &[layer])?;
    let size = input.size();
    let [n, _, h, w] = size[..] else {
        return Err(Error::Shape(format!("Grad-CAM needs images [N, C, H, W]; the input is {size:?}")));
    };
    let (logits, maps) = tch::with_grad(|| captured(model, &names, false, |m| m.forward(input)))?;
    let activation = &maps[0].1;
    if activation.dim() != 4 {
        return Err(Error::Shape(format!("Grad-CAM needs a convolutional output [N, C, H, W]; '{}' gives {:?}: name a convolution or the activation after one", names[0], activation.size())));
    }
    let classes_in = logits.size().last().copied().unwrap_or(0);
    let classes: Vec<i64> = match class {
        Some(c) if c < 0 || c >= classes_in => return Err(Error::invalid("class", format!("{c} is outside 0..{classes_in}"))),
        Some(c) => vec![c; n as usize],
        None => Vec::try_from(&logits.f_argmax(-1, false)?)?,
    };
    if !activation.requires_grad() {
        return Err(Error::invalid("Grad-CAM", format!("'{}' has no gradient path from the output (its parameters and input do not require gradients)", names[0])));
    }
    let index = Tensor::from_slice(&classes).f_to_device(logits.device())?.f_unsqueeze(1)?;
    // Samples do not interact in eval mode, so one backward pass of the summed scores gives every sample's gradient.
    let score = logits.f_gather(1, &index, false)?.f_sum(Kind::Float)?;
    let grads = Tensor::f_run_backward(&[score], &[activation], false, false)?;
    let cam = tch::no_grad(|| -> Result<Tensor> {
        let alpha = grads[0].f_mean_dim(&[2i64, 3][..], true, Kind::Float)?;
        let cam = activation.f_detach()?.f_mul(&alpha)?.f_sum_dim_intlist(&[1i64][..], true, Kind::Float)?.f_relu()?;
        let cam = cam.f_upsample_bilinear2d([h, w], false, None, None)?.f_squeeze_dim(1)?;
        let peak = cam.f_amax(&[1i64, 2][..], true)?.f_clamp_min(1e-12)?;
        Ok(cam.f_div(&peak)?)
    })?;
    Ok((cam, classes))
}
