//! Per-channel activation statistics gathered by a module observer, for the activation-ranked filter pruners.
use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::nn::{ModuleCall, Observer};

/// Running sums of one activation's per-channel statistics.
#[derive(Debug)]
struct ChannelSums {
    zeros: Tensor,
    means: Tensor,
    samples: i64,
}

/// Records, for every ReLU output, the per-channel Average Percentage of Zeros (APoZ, Hu et al. 2016) and mean,
/// and the order in which modules ran, so a convolution's following activation is found from the data flow
/// instead of Distiller's `.conv` → `.relu` name rewriting.
#[derive(Debug, Default)]
pub struct ActivationRecorder {
    order: Vec<(String, String, i64)>,
    order_complete: bool,
    sums: HashMap<String, ChannelSums>,
}

impl ActivationRecorder {
    /// Forgets the statistics (the call order is kept).
    pub fn reset(&mut self) {
        self.sums.clear();
    }

    /// The activation module that follows module `conv` in the forward pass and has `channels` channels.
    pub fn following_activation(&self, conv: &str, channels: i64) -> Option<&str> {
        let start = self.order.iter().position(|(n, ..)| n == conv)?;
        self.order[start + 1..].iter().find(|(_, t, c)| t == "ReLU" && *c == channels).map(|(n, ..)| n.as_str())
    }

    /// Per-channel APoZ (fraction of zeros) of activation `module`, if recorded.
    pub fn apoz(&self, module: &str) -> Option<Tensor> {
        self.sums.get(module).map(|s| &s.zeros / s.samples as f64)
    }

    /// Per-channel mean of activation `module`, if recorded.
    pub fn mean(&self, module: &str) -> Option<Tensor> {
        self.sums.get(module).map(|s| &s.means / s.samples as f64)
    }
}

impl Observer for ActivationRecorder {
    fn observe(&mut self, call: &ModuleCall) {
        let size = call.output.size();
        let channels = if size.len() >= 2 { size[1] } else { 0 };
        if !self.order_complete {
            if call.name.is_empty() {
                self.order_complete = true;
            } else {
                self.order.push((call.name.to_string(), call.module.type_name().to_string(), channels));
            }
        }
        if call.module.type_name() != "ReLU" || size.len() < 2 {
            return;
        }
        let _guard = tch::no_grad_guard();
        let out = call.output.detach();
        let n = size[0];
        // Per-sample, per-channel statistics over the spatial positions, summed over the batch.
        let flat = out.reshape([n, channels, -1]);
        let zeros = flat.eq(0.0).to_kind(Kind::Float).mean_dim(2, false, Kind::Float).sum_dim_intlist(0, false, Kind::Float);
        let means = flat.mean_dim(2, false, Kind::Float).sum_dim_intlist(0, false, Kind::Float);
        let entry = self.sums.entry(call.name.to_string()).or_insert_with(|| ChannelSums {
            zeros: zeros.zeros_like(),
            means: means.zeros_like(),
            samples: 0,
        });
        entry.zeros += zeros;
        entry.means += means;
        entry.samples += n;
    }
}
