//! Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias
//! Correction", §4.1): for two layers joined through positively homogeneous steps (`ReLU(x/s) = ReLU(x)/s` for
//! s > 0, and likewise max and average pooling, flatten, dropout), dividing the first layer's filter `c` and bias
//! by `s_c` and multiplying the second layer's input channel `c` by `s_c` leaves the network's function unchanged.
//! With `s_c = √(r1_c / r2_c)`, where `r1_c` is the largest magnitude of the first layer's filter `c` and `r2_c`
//! that of the second layer's input channel `c`, both ranges become `√(r1_c · r2_c)`: the channels of each layer
//! are as even as the pair allows, which is what per-tensor weight quantization needs. A chain of three or more
//! layers is swept pair by pair until the scales settle.
//!
//! Data-free; batch norms are folded into their convolutions first (a batch norm between the layers is an
//! affine map, not homogeneous). Pairs are found in the data-flow graph: the first layer's output must reach only
//! the second layer, through homogeneous steps each read by one node; a residual add, a ReLU6 or a concatenation
//! ends the search (ReLU6 caps at 6 whatever the scale).
//!
//! ```
//! let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let x = tch::Tensor::randn([2, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
//! let before = model.forward_t(&x, false)?;
//! let report = distill::quantization::equalization::equalize_cross_layer(&mut model)?;
//! assert_eq!(report.pairs.len(), 4); // conv1→conv2, conv2→fc1 (through the flatten), fc1→fc2, fc2→fc3
//! assert!(model.forward_t(&x, false)?.allclose(&before, 1e-4, 1e-5, false));
//! # Ok::<(), distill::Error>(())
//! ```
use tch::{Kind, Tensor};

use crate::graph::{ChannelRule, Graph, Node, NodeKind};
use crate::nn::{Model, TensorOp};
use crate::{Error, Result};

/// Two layers equalized together.
#[derive(Debug, Clone, PartialEq)]
pub struct EqualizedPair {
    /// The layer whose filters were divided.
    pub first: String,
    /// The layer whose input channels were multiplied.
    pub second: String,
    /// Channels between them.
    pub channels: i64,
    /// Largest over smallest filter range of the first layer before equalization (1 is perfectly even).
    pub spread_before: f64,
    /// The same after.
    pub spread_after: f64,
    /// What each channel of `first`'s output was divided by, over all sweeps (the factor its activations shrink
    /// by, which the input of `second` makes up for).
    pub scales: Vec<f64>,
}

/// What [`equalize_cross_layer`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Equalization {
    /// Batch norms folded first, as (convolution, batch norm).
    pub folded: Vec<(String, String)>,
    /// The equalized pairs, in forward order.
    pub pairs: Vec<EqualizedPair>,
    /// Sweeps over the pairs until the largest scale was within 1e-6 of 1.
    pub sweeps: usize,
}

impl Equalization {
    /// An error when activation statistics collected before this equalization would be used after it: a sweep
    /// beyond the first means some channel was rescaled, so those ranges are stale. `fix` says how to calibrate
    /// after equalizing in the caller's setting.
    pub(crate) fn check_statistics_still_valid(&self, has_statistics: bool, fix: &str) -> Result<()> {
        if has_statistics && self.sweeps > 1 {
            return Err(Error::invalid(
                "cross_layer_equalization",
                format!("equalization changes the activation ranges, and these statistics were collected before it: {fix}"),
            ));
        }
        Ok(())
    }
}

const HOMOGENEOUS: &[&str] = &["ReLU", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Identity", "Dropout", "Flatten"];
const MAX_SWEEPS: usize = 200;

/// Folds the model's batch norms and equalizes every pair of layers the data-flow graph joins through
/// homogeneous steps (see the module's text). The model's function is unchanged up to float rounding. An error for
/// a model that is already quantized (equalize first), or NaN or infinite weights.
pub fn equalize_cross_layer(model: &mut Model) -> Result<Equalization> {
    if model.named_modules().iter().any(|m| m.type_name.starts_with("RangeLinear") || m.type_name == "FPWrapper") {
        return Err(Error::invalid("cross-layer equalization", "the model is already quantized: equalize the floating-point model, then quantize it"));
    }
    let folded = super::bn_fold::fold_batch_norms(model)?;
    let graph = Graph::trace(model)?;
    let pairs: Vec<Pair> = graph.nodes().iter().filter_map(|n| pair_from(&graph, n)).collect();
    let mut spread_before = Vec::with_capacity(pairs.len());
    for p in &pairs {
        spread_before.push(spread(&filter_ranges(&model.parameter(&format!("{}.weight", p.first))?)?)?);
    }
    let mut scales: Vec<Tensor> = pairs.iter().map(|p| Tensor::f_ones([p.channels], (Kind::Double, tch::Device::Cpu))).collect::<std::result::Result<_, _>>()?;
    let mut sweeps = 0;
    while sweeps < MAX_SWEEPS {
        sweeps += 1;
        let mut largest = 0.0f64;
        for (p, total) in pairs.iter().zip(&mut scales) {
            let (deviation, s) = equalize_pair(model, p)?;
            largest = largest.max(deviation);
            *total = total.f_mul(&s.f_to_device(tch::Device::Cpu)?)?;
        }
        if largest < 1e-6 {
            break;
        }
    }
    let mut report = Vec::with_capacity(pairs.len());
    for ((p, before), scales) in pairs.iter().zip(spread_before).zip(scales) {
        let after = spread(&filter_ranges(&model.parameter(&format!("{}.weight", p.first))?)?)?;
        let scales = Vec::<f64>::try_from(&scales)?;
        report.push(EqualizedPair { first: p.first.clone(), second: p.second.clone(), channels: p.channels, spread_before: before, spread_after: after, scales });
    }
    Ok(Equalization { folded, pairs: report, sweeps })
}

/// A pair found in the graph: channel `c` of `first`'s output is input channel `c` of `second` (after a flatten,
/// its block of H·W columns).
struct Pair {
    first: String,
    second: String,
    channels: i64,
}

fn is_layer(node: &Node) -> bool {
    matches!(&node.kind, NodeKind::Module(t) if t == "Conv2d" || t == "Linear") && node.rule == ChannelRule::Mix && !node.name.contains('#')
}

/// The layer `node`'s output reaches alone, through homogeneous steps each read only by the next.
fn pair_from(graph: &Graph, node: &Node) -> Option<Pair> {
    if !is_layer(node) {
        return None;
    }
    let channels = graph.tensors()[node.output].channels();
    let mut tensor = node.output;
    loop {
        if tensor == graph.output() {
            return None;
        }
        let readers: Vec<&Node> = graph.nodes().iter().filter(|n| n.inputs.contains(&tensor)).collect();
        let [next] = readers.as_slice() else { return None };
        if next.inputs.len() != 1 {
            return None;
        }
        if is_layer(next) {
            return Some(Pair { first: node.module_name().to_string(), second: next.module_name().to_string(), channels });
        }
        let homogeneous = match &next.kind {
            NodeKind::Module(t) => HOMOGENEOUS.contains(&t.as_str()),
            NodeKind::Op(op) => *op == TensorOp::Flatten,
            NodeKind::Unrecorded => false,
        };
        if !homogeneous || !matches!(next.rule, ChannelRule::Elementwise | ChannelRule::Flatten) {
            return None;
        }
        tensor = next.output;
    }
}

/// Each filter's largest magnitude (dimension 0 of the weight).
fn filter_ranges(w: &Tensor) -> Result<Tensor> {
    let w = w.f_detach()?.f_to_kind(Kind::Double)?;
    Ok(w.f_reshape([w.size()[0], -1])?.f_abs()?.f_amax(1, false)?)
}

/// Each input channel's largest magnitude: channel `c` is dimension 1 of a convolution's weight, or after a
/// flatten the block of columns at `c · H·W` of a fully connected layer's.
fn input_ranges(w: &Tensor, channels: i64) -> Result<Tensor> {
    let w = w.f_detach()?.f_to_kind(Kind::Double)?;
    Ok(w.f_reshape([w.size()[0], channels, -1])?.f_abs()?.f_amax([0, 2].as_slice(), false)?)
}

/// Largest over smallest non-zero range.
fn spread(ranges: &Tensor) -> Result<f64> {
    let v = Vec::<f64>::try_from(ranges)?;
    if v.iter().any(|r| !r.is_finite()) {
        return Err(Error::invalid("cross-layer equalization", "a weight holds NaN or infinite values; fix or reload the model first"));
    }
    let live: Vec<f64> = v.into_iter().filter(|&r| r > 0.0).collect();
    let (lo, hi) = live.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    Ok(if live.is_empty() { 1.0 } else { hi / lo })
}

/// One equalization step of a pair; returns the largest |ln s| applied and the scales `s` (float64).
fn equalize_pair(model: &Model, p: &Pair) -> Result<(f64, Tensor)> {
    let (w1, w2) = (model.parameter(&format!("{}.weight", p.first))?, model.parameter(&format!("{}.weight", p.second))?);
    let (r1, r2) = (filter_ranges(&w1)?, input_ranges(&w2, p.channels)?);
    spread(&r1)?;
    spread(&r2)?;
    // A dead channel (all-zero filter or input column) keeps scale 1.
    let live = r1.f_gt(0.0)?.f_logical_and(&r2.f_gt(0.0)?)?;
    let s = r1.f_div(&r2)?.f_sqrt()?.f_where_self(&live, &Tensor::from(1.0f64))?;
    let largest = s.f_log()?.f_abs()?.f_max()?.f_double_value(&[])?;
    let applied = s.shallow_clone();
    let s = s.f_to_kind(w1.kind())?;
    let out = w2.size()[0];
    tch::no_grad(|| -> Result<()> {
        let along_filters: Vec<i64> = std::iter::once(p.channels).chain(std::iter::repeat_n(1, w1.dim() - 1)).collect();
        let _ = w1.shallow_clone().f_div_(&s.f_view(along_filters.as_slice())?)?;
        if let Ok(b1) = model.parameter(&format!("{}.bias", p.first)) {
            let _ = b1.shallow_clone().f_div_(&s)?;
        }
        if w2.dim() == 2 {
            // A Linear after a flatten reads each channel as a block of columns.
            let blocks = w2.f_view([out, p.channels, -1])?;
            let _ = blocks.shallow_clone().f_mul_(&s.f_view([1, p.channels, 1])?)?;
        } else {
            // Broadcast rather than view, which a channels-last weight does not allow.
            let along_inputs: Vec<i64> = [1, p.channels].into_iter().chain(std::iter::repeat_n(1, w2.dim() - 2)).collect();
            let _ = w2.shallow_clone().f_mul_(&s.f_view(along_inputs.as_slice())?)?;
        }
        Ok(())
    })?;
    Ok((largest, applied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Conv2d, Conv2dConfig, ModelInfo, Sequential, ReLU};

    #[test]
    fn a_conv_relu_conv_pair_keeps_its_function_and_equal_ranges() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        tch::manual_seed(11);
        let net = Sequential::new()
            .add("a", Conv2d::new(vs.root() / "a", Conv2dConfig::new(2, 4, 3)).unwrap())
            .add("relu", ReLU)
            .add("b", Conv2d::new(vs.root() / "b", Conv2dConfig::new(4, 3, 3)).unwrap());
        let mut model = Model::new(vs, net, ModelInfo::new("pair", "toy", [2, 8, 8], 3)).unwrap();
        // Uneven filters: filter c of `a` scaled by 10^c.
        tch::no_grad(|| {
            let w = model.parameter("a.weight").unwrap();
            let _ = w.shallow_clone().f_mul_(&Tensor::from_slice(&[1.0f32, 10.0, 100.0, 0.1]).view([4, 1, 1, 1])).unwrap();
        });
        let x = Tensor::randn([5, 2, 8, 8], (Kind::Float, tch::Device::Cpu));
        let before = model.forward_t(&x, false).unwrap();
        let report = equalize_cross_layer(&mut model).unwrap();
        assert_eq!(report.pairs.len(), 1);
        let p = &report.pairs[0];
        assert!((p.first.as_str(), p.second.as_str(), p.channels) == ("a", "b", 4) && p.spread_before > 100.0, "{p:?}");
        let after = model.forward_t(&x, false).unwrap();
        let scale = before.abs().max().double_value(&[]);
        assert!((&after - &before).abs().max().double_value(&[]) <= 1e-5 * scale, "function changed");
        // By hand: per channel, the filter range of `a` equals the input range of `b`.
        let r1 = Vec::<f64>::try_from(&filter_ranges(&model.parameter("a.weight").unwrap()).unwrap()).unwrap();
        let r2 = Vec::<f64>::try_from(&input_ranges(&model.parameter("b.weight").unwrap(), 4).unwrap()).unwrap();
        for (a, b) in r1.iter().zip(&r2) {
            assert!((a - b).abs() <= 1e-6 * a, "{r1:?} vs {r2:?}");
        }
        // Once equalized, a second run changes nothing.
        let again = equalize_cross_layer(&mut model).unwrap();
        assert_eq!(again.sweeps, 1);
    }
}
