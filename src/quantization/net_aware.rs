//! Distiller's "net-aware" preparation for post-training quantization (`_apply_activation_stats_fusions` and
//! `_apply_fuse_relu`), read from the data-flow graph of the model after batch-norm folding:
//!
//! * With calibration statistics, a quantized module whose only consumer is a ReLU, ReLU6, Tanh or Sigmoid has
//!   its output statistics clipped to what that activation keeps (`[0, ∞)`, `[0, 6]`, `[−4, 4]`, `[−6, 6]`;
//!   beyond ±4 and ±6 Tanh and Sigmoid are flat to 8-bit precision), and those clipped statistics become the
//!   activation's input statistics.
//! * A quantized module whose only consumer is a ReLU or ReLU6 gets `clip_half_range`: its wrapper applies the
//!   ReLU to its accumulator before requantizing, and the ReLU itself becomes an `Identity` once that module is
//!   wrapped (the quantized values are already non-negative).
//!
//! Distiller re-traces the model after folding, and a traced `nn.Identity` leaves no node; here the Identity
//! modules that folded batch norms became are looked through. A module called more than once in a forward pass
//! is left alone, since its calls may be followed by different layers.
use std::collections::HashMap;

use super::q_utils::RangeStats;
use crate::graph::{Graph, Node, NodeKind};
use crate::nn::Model;
use crate::Result;

/// An activation that is the only consumer of a module's output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FollowedBy {
    /// The module.
    pub module: String,
    /// The activation module after it.
    pub activation: String,
    /// The activation's type name.
    pub kind: String,
}

impl FollowedBy {
    /// Whether the activation is a ReLU that fuses into the module (Distiller fuses ReLU and ReLU6).
    pub fn fuses(&self) -> bool {
        matches!(self.kind.as_str(), "ReLU" | "ReLU6")
    }

    /// The range the activation keeps of its input, for clipping statistics.
    pub fn kept_range(&self) -> (f64, f64) {
        match self.kind.as_str() {
            "ReLU" => (0.0, f64::INFINITY),
            "ReLU6" => (0.0, 6.0),
            "Tanh" => (-4.0, 4.0),
            _ => (-6.0, 6.0),
        }
    }
}

const ACTIVATIONS: &[&str] = &["ReLU", "ReLU6", "Tanh", "Sigmoid"];

/// Every leaf module whose output goes to exactly one node, an activation, looking through Identity modules.
pub(crate) fn activations_after_modules(model: &mut Model) -> Result<Vec<FollowedBy>> {
    let graph = Graph::trace(model)?;
    let mut calls: HashMap<&str, usize> = HashMap::new();
    for node in graph.nodes() {
        if let NodeKind::Module(_) = node.kind {
            *calls.entry(base_name(&node.name)).or_default() += 1;
        }
    }
    let mut found = Vec::new();
    for node in graph.nodes() {
        let NodeKind::Module(kind) = &node.kind else { continue };
        if kind == "Identity" || calls.get(node.name.as_str()) != Some(&1) {
            continue;
        }
        if let [next] = consumers(&graph, node).as_slice() {
            if let NodeKind::Module(next_kind) = &next.kind {
                if ACTIVATIONS.contains(&next_kind.as_str()) && calls.get(next.name.as_str()) == Some(&1) {
                    found.push(FollowedBy { module: node.module_name().to_string(), activation: next.module_name().to_string(), kind: next_kind.clone() });
                }
            }
        }
    }
    Ok(found)
}

/// A node's name without the `#2` the graph adds to a repeated call.
fn base_name(name: &str) -> &str {
    name.split_once('#').map_or(name, |(base, _)| base)
}

/// The nodes that read `node`'s output, with Identity modules replaced by their own consumers; the model's output
/// counts as a consumer.
fn consumers<'g>(graph: &'g Graph, node: &Node) -> Vec<&'g Node> {
    let mut out = Vec::new();
    let mut pending = vec![node.output];
    while let Some(tensor) = pending.pop() {
        if tensor == graph.output() {
            // The model's output reads it: no single activation follows.
            return Vec::new();
        }
        for n in graph.nodes().iter().filter(|n| n.inputs.contains(&tensor)) {
            match &n.kind {
                NodeKind::Module(k) if k == "Identity" => pending.push(n.output),
                _ => out.push(n),
            }
        }
    }
    out
}

/// Distiller's `_clip_stats`: a range entirely below `lo` or above `hi` collapses onto that bound; otherwise
/// `min` and `avg_min` are raised to `lo` and `max` and `avg_max` lowered to `hi`. Mean, std and b are kept.
pub(crate) fn clip_stats(stats: &mut RangeStats, lo: f64, hi: f64) {
    if stats.max < lo {
        (stats.min, stats.avg_min, stats.max, stats.avg_max) = (lo, lo, lo, lo);
    } else if stats.min > hi {
        (stats.min, stats.avg_min, stats.max, stats.avg_max) = (hi, hi, hi, hi);
    } else {
        stats.min = stats.min.max(lo);
        stats.avg_min = stats.avg_min.max(lo);
        stats.max = stats.max.min(hi);
        stats.avg_max = stats.avg_max.min(hi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_follows_distillers_three_cases() {
        let s = RangeStats { min: -2.0, max: 3.0, avg_min: -1.0, avg_max: 2.5, mean: 0.5, std: 1.0, b: 0.8 };
        let mut inside = s;
        clip_stats(&mut inside, 0.0, f64::INFINITY);
        assert_eq!((inside.min, inside.avg_min, inside.max, inside.avg_max, inside.mean, inside.std), (0.0, 0.0, 3.0, 2.5, 0.5, 1.0));
        let mut six = s;
        clip_stats(&mut six, 0.0, 2.0);
        assert_eq!((six.min, six.avg_min, six.max, six.avg_max), (0.0, 0.0, 2.0, 2.0));
        let mut below = s;
        clip_stats(&mut below, 4.0, 6.0);
        assert_eq!((below.min, below.avg_min, below.max, below.avg_max), (4.0, 4.0, 4.0, 4.0));
        let mut above = s;
        clip_stats(&mut above, -6.0, -3.0);
        assert_eq!((above.min, above.avg_min, above.max, above.avg_max), (-3.0, -3.0, -3.0, -3.0));
    }

    #[test]
    fn resnet_activations_are_found_through_folded_batch_norms() {
        let mut model = crate::models::create_model("resnet20_cifar", "cifar10", tch::Device::Cpu).unwrap();
        crate::quantization::bn_fold::fold_batch_norms(&mut model).unwrap();
        let found = activations_after_modules(&mut model).unwrap();
        let pairs: Vec<(&str, &str)> = found.iter().map(|f| (f.module.as_str(), f.activation.as_str())).collect();
        // The stem, every block's first convolution and every residual add; not a block's second convolution
        // (its consumer is the add) nor a block's last ReLU (read by the next block's convolution and add).
        assert!(pairs.contains(&("conv1", "relu")) && pairs.contains(&("layer1.0.conv1", "layer1.0.relu1")), "{pairs:?}");
        assert!(pairs.contains(&("layer3.2.residual_eltwiseadd", "layer3.2.relu2")), "{pairs:?}");
        assert_eq!(pairs.len(), 1 + 9 + 9, "{pairs:?}");
        assert!(found.iter().all(FollowedBy::fuses));
    }
}
