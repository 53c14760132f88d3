//! Thinning ("network surgery"): physically removing pruned filters and channels, so a structure-pruned model
//! really has fewer parameters, MACs and bytes (Distiller's `thinning.py`).
//!
//! The channels to remove come from the model's data-flow [`Graph`]: a channel is one [`ChannelClass`](crate::graph::ChannelClass), removed
//! from every tensor it flows through and from every layer that writes or reads it. Removing **filters** takes out
//! the channels whose every writer (convolution filter, fully connected row) is zero; removing **channels** takes
//! out those whose every reader (convolution input channel, classifier columns) is zero. In a residual network a
//! channel of the residual stream is written by every block's last convolution and the shortcut, so it goes only
//! when it is zero in all of them ([`Coupling::AllZero`]); Distiller's Leader semantics, where the first writer
//! decides for all, is [`Coupling::Leader`].
//!
//! ```
//! use distill::thinning::Thinner;
//! use tch::{Device, Kind, Tensor};
//! # fn main() -> distill::Result<()> {
//! let mut model = distill::models::create_model("simplenet_cifar", "cifar10", Device::Cpu)?;
//! // Zero two filters of conv2 (what a filter pruner's mask does).
//! let w = model.parameter("conv2.weight")?;
//! tch::no_grad(|| w.narrow(0, 3, 2).fill_(0.0));
//! let report = Thinner::filters().apply(&mut model)?;
//! assert_eq!(model.parameter("conv2.weight")?.size(), [14, 6, 5, 5]);
//! assert_eq!(model.parameter("fc1.weight")?.size(), [120, 14 * 25]); // the classifier lost 2 blocks of 5×5
//! assert_eq!(report.changes[0].after, 14);
//! # Ok(()) }
//! ```
mod policy;
mod recipe;

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use polars::prelude::*;
use tch::{Kind, Tensor};

use crate::graph::{ChannelRule, Channels, Graph, NodeKind};
use crate::nn::{BatchNorm2d, Conv2d, Linear, Model};
use crate::optim::Optimizer;
use crate::scheduler::Masks;
use crate::{Error, Result};

pub use policy::ThinningPolicy;
pub use recipe::{ModuleCut, ThinningRecipe};

/// Which structures a thinning removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    /// Output channels whose filters are all zero (Distiller's `remove_filters`).
    Filters,
    /// Input channels whose weights are all zero (Distiller's `remove_channels`).
    Channels,
}

/// How the members of a coupled channel (a residual stream) decide together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coupling {
    /// A channel goes only where every member is zero: the thinned network computes what the masked one did.
    AllZero,
    /// The first member (in the order the layers ran) decides for all, as Distiller's `group_dependency:
    /// Leader`; other members lose their non-zero weights in that channel.
    Leader,
}

/// Plans and applies a thinning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thinner {
    /// What to remove.
    pub structure: Structure,
    /// How coupled members decide.
    pub coupling: Coupling,
    /// Keep every thinned channel count a multiple of this (1: no rounding).
    pub round_to: i64,
}

/// How one channel group changes.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupChange {
    /// The group's index in the graph's [`Channels::groups`].
    pub group: usize,
    /// Its members (`conv1 filters`, `bn1 features`, `conv2 channels`).
    pub members: Vec<String>,
    /// Channels before.
    pub before: i64,
    /// Channels after.
    pub after: i64,
    /// The removed channels, as indices before thinning.
    pub removed: Vec<i64>,
}

/// A zero channel that stays because a coupled member is not zero there.
#[derive(Debug, Clone, PartialEq)]
pub struct CoupledKeep {
    /// The group's index.
    pub group: usize,
    /// The channel.
    pub channel: i64,
    /// Members that are zero in it.
    pub zero_in: Vec<String>,
    /// Members that are not.
    pub nonzero_in: Vec<String>,
}

/// What a removed filter's channel still carried: a constant its batch norm shift or bias added, which the
/// thinned network no longer adds (Distiller drops it too). Zero for a channel that was fully pruned.
#[derive(Debug, Clone, PartialEq)]
pub struct DroppedShift {
    /// The batch norm or layer with the bias.
    pub module: String,
    /// The channel.
    pub channel: i64,
    /// The constant (eval mode: `β − γ·μ/√(σ²+ε)` for a batch norm, the bias otherwise).
    pub value: f64,
}

/// The outcome of planning or applying a thinning.
#[derive(Debug, Clone)]
pub struct ThinningReport {
    /// What was removed.
    pub structure: Structure,
    /// The groups that shrink.
    pub changes: Vec<GroupChange>,
    /// Zero channels kept because a coupled member is not zero.
    pub coupled_keeps: Vec<CoupledKeep>,
    /// Channels that were kept only to round a count up to `round_to`.
    pub rounded_keeps: usize,
    /// Constants dropped with removed filters.
    pub dropped_shifts: Vec<DroppedShift>,
    /// The recipe (empty when nothing is removed).
    pub recipe: ThinningRecipe,
}

impl ThinningReport {
    /// One row per changed group: `Group`, `Members`, `Before`, `After`, `Removed`.
    pub fn frame(&self) -> Result<DataFrame> {
        let g: Vec<i64> = self.changes.iter().map(|c| c.group as i64).collect();
        let members: Vec<String> = self.changes.iter().map(|c| c.members.join(", ")).collect();
        let before: Vec<i64> = self.changes.iter().map(|c| c.before).collect();
        let after: Vec<i64> = self.changes.iter().map(|c| c.after).collect();
        let removed: Vec<i64> = self.changes.iter().map(|c| c.before - c.after).collect();
        Ok(df!("Group" => g, "Members" => members, "Before" => before, "After" => after, "Removed" => removed)?)
    }
}

/// Per layer that mixes channels: which filters (rows) and which input channels (columns) are all zero, and
/// their L1 norms.
struct WeightProfile {
    row_l1: Vec<f64>,
    col_l1: Vec<f64>,
}

fn profile(w: &Tensor) -> Result<WeightProfile> {
    let w = w.f_detach()?.f_abs()?.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?;
    let size = w.size();
    let rows = w.f_reshape([size[0], -1])?.f_sum_dim_intlist(1, false, Kind::Double)?;
    let cols = w.f_transpose(0, 1)?.f_reshape([size[1], -1])?.f_sum_dim_intlist(1, false, Kind::Double)?;
    Ok(WeightProfile { row_l1: Vec::<f64>::try_from(&rows)?, col_l1: Vec::<f64>::try_from(&cols)? })
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(&t.f_detach()?.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?)
}

impl Thinner {
    /// Removes zero filters (Distiller's `remove_filters`), all members of a coupled channel zero.
    pub fn filters() -> Self {
        Thinner { structure: Structure::Filters, coupling: Coupling::AllZero, round_to: 1 }
    }

    /// Removes zero input channels (Distiller's `remove_channels`).
    pub fn channels() -> Self {
        Thinner { structure: Structure::Channels, ..Thinner::filters() }
    }

    /// Lets the first member of a coupled channel decide for all (Distiller's Leader semantics).
    pub fn leader(mut self) -> Self {
        self.coupling = Coupling::Leader;
        self
    }

    /// Keeps every thinned channel count a multiple of `n` (or the original count), keeping back the removable
    /// channels whose other weights are largest: odd channel counts run slowly on most hardware.
    pub fn round_to(mut self, n: i64) -> Self {
        self.round_to = n;
        self
    }

    /// Works out what thinning would remove, without changing the model.
    pub fn plan(&self, model: &mut Model) -> Result<ThinningReport> {
        if self.round_to < 1 {
            return Err(Error::invalid("round_to", format!("must be at least 1, got {}", self.round_to)));
        }
        let graph = Graph::trace(model)?;
        self.check_unseen_layers(model, &graph)?;
        let channels = graph.channels();
        Planner::new(self, model, &graph, &channels)?.plan()
    }

    /// A convolution or fully connected layer that never ran as a module (a quantizer's wrapper computes with its
    /// weights directly) cannot be followed; if it has zero structures the user expects gone, say so.
    fn check_unseen_layers(&self, model: &Model, graph: &Graph) -> Result<()> {
        let seen: BTreeSet<&str> = graph.nodes().iter().map(|n| n.module_name()).collect();
        let mut problem = None;
        model.for_each_module(|name, m| {
            if problem.is_some() || seen.contains(name) {
                return;
            }
            let any = m as &dyn Any;
            let weight = any.downcast_ref::<Conv2d>().map(|c| &c.weight).or_else(|| any.downcast_ref::<Linear>().map(|l| &l.weight));
            let Some(w) = weight else { return };
            let zero = profile(w).map(|p| match self.structure {
                Structure::Filters => p.row_l1.contains(&0.0),
                Structure::Channels => p.col_l1.contains(&0.0),
            });
            if zero.unwrap_or(false) {
                let parent = name.rsplit_once('.').map_or("", |(p, _)| p);
                let parent_type = model.module(parent).map(|m| m.type_name().to_string()).unwrap_or_default();
                let parent = if parent.is_empty() { "<root>" } else { parent };
                problem = Some(Error::invalid(
                    "thinning",
                    format!(
                        "'{name}' has zero {} but never runs as a module: '{parent}' ({parent_type}) computes with its weights \
                         directly, so the data-flow graph cannot follow it; thin the model before quantizing it",
                        if self.structure == Structure::Filters { "filters" } else { "channels" }
                    ),
                ));
            }
        });
        problem.map_or(Ok(()), Err)
    }

    /// Thins `model` alone (no optimizer state or masks to keep in step).
    pub fn apply(&self, model: &mut Model) -> Result<ThinningReport> {
        self.apply_with(model, None, None)
    }

    /// Thins `model` and shrinks the optimizer's state and the masks with it. On error nothing changes.
    pub fn apply_with(&self, model: &mut Model, optimizer: Option<&mut Optimizer>, masks: Option<&mut Masks>) -> Result<ThinningReport> {
        let report = self.plan(model)?;
        if !report.recipe.is_empty() {
            report.recipe.apply(model, optimizer, masks)?;
        }
        Ok(report)
    }
}

/// Removes every zero filter of `model` (see [`Thinner::filters`]).
pub fn thin_filters(model: &mut Model) -> Result<ThinningReport> {
    Thinner::filters().apply(model)
}

/// Removes every zero input channel of `model` (see [`Thinner::channels`]).
pub fn thin_channels(model: &mut Model) -> Result<ThinningReport> {
    Thinner::channels().apply(model)
}

struct Planner<'a> {
    thinner: &'a Thinner,
    graph: &'a Graph,
    channels: &'a Channels,
    profiles: HashMap<usize, WeightProfile>,
    biases: HashMap<usize, Vec<f64>>,
    bn_shifts: HashMap<usize, Vec<f64>>,
}

impl<'a> Planner<'a> {
    fn new(thinner: &'a Thinner, model: &Model, graph: &'a Graph, channels: &'a Channels) -> Result<Self> {
        let mut planner = Planner { thinner, graph, channels, profiles: HashMap::new(), biases: HashMap::new(), bn_shifts: HashMap::new() };
        for (n, node) in graph.nodes().iter().enumerate() {
            let NodeKind::Module(_) = node.kind else { continue };
            let module = model.module(node.module_name())?;
            let any = module as &dyn Any;
            if let (ChannelRule::Mix, Some(conv)) = (&node.rule, any.downcast_ref::<Conv2d>()) {
                planner.profiles.insert(n, profile(&conv.weight)?);
                if let Some(b) = &conv.bias {
                    planner.biases.insert(n, values(b)?);
                }
            } else if let (ChannelRule::Mix, Some(l)) = (&node.rule, any.downcast_ref::<Linear>()) {
                planner.profiles.insert(n, profile(&l.weight)?);
                if let Some(b) = &l.bias {
                    planner.biases.insert(n, values(b)?);
                }
            } else if let Some(bn) = any.downcast_ref::<BatchNorm2d>() {
                let scale = bn.weight.f_div(&bn.running_var.f_add_scalar(bn.eps)?.f_sqrt()?)?;
                let shift = bn.bias.f_sub(&scale.f_mul(&bn.running_mean)?)?;
                planner.bn_shifts.insert(n, values(&shift)?);
            }
        }
        Ok(planner)
    }

    fn name(&self, node: usize) -> &str {
        &self.graph.nodes()[node].name
    }

    /// The L1 norm of each member's slice of `class`, writers then readers, in the order the layers ran.
    fn slices(&self, class: usize) -> (Vec<(usize, f64)>, Vec<(usize, f64)>) {
        let c = &self.channels.classes()[class];
        // A layer without a profile (not one of distill's Conv2d or Linear) never counts as zero.
        let l1 = |n: usize, pick: &dyn Fn(&WeightProfile) -> f64| self.profiles.get(&n).map_or(f64::INFINITY, pick);
        let writers = c.producers.iter().map(|&(n, ch)| (n, l1(n, &|p| p.row_l1[ch as usize]))).collect();
        let readers = c.consumers.iter().map(|(n, cols)| (*n, l1(*n, &|p| cols.iter().map(|&k| p.col_l1[k as usize]).sum()))).collect();
        (writers, readers)
    }

    fn plan(&self) -> Result<ThinningReport> {
        let mut removed: BTreeSet<usize> = BTreeSet::new();
        let mut coupled_keeps = Vec::new();
        let mut score: HashMap<usize, f64> = HashMap::new();
        for (id, class) in self.channels.classes().iter().enumerate() {
            let (writers, readers) = self.slices(id);
            let deciders = match self.thinner.structure {
                Structure::Filters => &writers,
                Structure::Channels => &readers,
            };
            if deciders.is_empty() {
                continue;
            }
            let zero: Vec<bool> = deciders.iter().map(|&(_, l1)| l1 == 0.0).collect();
            let remove = match self.thinner.coupling {
                Coupling::AllZero => zero.iter().all(|&z| z),
                Coupling::Leader => zero[0],
            };
            if !remove {
                if zero.iter().any(|&z| z) {
                    let split = |want: bool| deciders.iter().zip(&zero).filter(|(_, &z)| z == want).map(|((n, _), _)| self.name(*n).to_string()).collect();
                    let group = class.group;
                    let channel = self.channel_in_group(id);
                    coupled_keeps.push(CoupledKeep { group, channel, zero_in: split(true), nonzero_in: split(false) });
                }
                continue;
            }
            if let Some(why) = class.opaque_reasons().next() {
                let (member, ..) = deciders[0];
                return Err(Error::invalid(
                    "thinning",
                    format!(
                        "channel {} of '{}' is zero but flows through {why}, which the data-flow graph cannot follow; \
                         compute it with a module or Forward::op, or leave this channel unpruned",
                        self.channel_in_group(id),
                        self.name(member)
                    ),
                ));
            }
            if class.is_fixed() {
                continue;
            }
            score.insert(id, writers.iter().chain(&readers).map(|&(_, l1)| l1).sum());
            removed.insert(id);
        }
        let rounded_keeps = self.round(&mut removed, &score);
        let mut changes = Vec::new();
        for group in self.channels.groups() {
            let gone: Vec<i64> = group.classes.iter().enumerate().filter(|(_, c)| removed.contains(c)).map(|(i, _)| i as i64).collect();
            if gone.is_empty() {
                continue;
            }
            let members: Vec<String> = group.members.iter().map(|m| m.to_string()).collect();
            if gone.len() == group.classes.len() {
                return Err(Error::invalid(
                    "thinning",
                    format!(
                        "every one of the {} channels of group {} ({}) is zero: removing them all would cut the network; \
                         prune less of these layers",
                        gone.len(),
                        group.id,
                        members.join(", ")
                    ),
                ));
            }
            let before = group.classes.len() as i64;
            changes.push(GroupChange { group: group.id, members, before, after: before - gone.len() as i64, removed: gone });
        }
        let dropped_shifts = if self.thinner.structure == Structure::Filters { self.dropped_shifts(&removed) } else { Vec::new() };
        let recipe = self.recipe(&removed)?;
        Ok(ThinningReport { structure: self.thinner.structure, changes, coupled_keeps, rounded_keeps, dropped_shifts, recipe })
    }

    fn channel_in_group(&self, class: usize) -> i64 {
        let group = &self.channels.groups()[self.channels.classes()[class].group];
        group.classes.iter().position(|&c| c == class).unwrap_or(0) as i64
    }

    /// Un-removes the best-scored candidates of each group until its remaining count is a multiple of
    /// `round_to`, or all of them when that would need more channels than the group has.
    fn round(&self, removed: &mut BTreeSet<usize>, score: &HashMap<usize, f64>) -> usize {
        let n = self.thinner.round_to;
        if n <= 1 {
            return 0;
        }
        let mut restored = 0;
        for group in self.channels.groups() {
            let mut candidates: Vec<usize> = group.classes.iter().copied().filter(|c| removed.contains(c)).collect();
            if candidates.is_empty() {
                continue;
            }
            let total = group.classes.len() as i64;
            let kept = total - candidates.len() as i64;
            let target = (kept + n - 1) / n * n;
            let back = if target > total { candidates.len() } else { (target - kept) as usize };
            candidates.sort_by(|a, b| score[b].total_cmp(&score[a]).then(a.cmp(b)));
            for c in candidates.into_iter().take(back) {
                removed.remove(&c);
                restored += 1;
            }
        }
        restored
    }

    fn dropped_shifts(&self, removed: &BTreeSet<usize>) -> Vec<DroppedShift> {
        let mut out = Vec::new();
        for &id in removed {
            let class = &self.channels.classes()[id];
            let biases = class.producers.iter().filter_map(|&(n, c)| self.biases.get(&n).map(|b| (n, c, b[c as usize])));
            let shifts = class.features.iter().filter_map(|&(n, c)| self.bn_shifts.get(&n).map(|s| (n, c, s[c as usize])));
            for (n, c, value) in biases.chain(shifts) {
                if value != 0.0 {
                    out.push(DroppedShift { module: self.name(n).to_string(), channel: c, value });
                }
            }
        }
        out
    }

    /// Each module's kept inputs and outputs, merged over the times it ran.
    fn recipe(&self, removed: &BTreeSet<usize>) -> Result<ThinningRecipe> {
        if removed.is_empty() {
            return Ok(ThinningRecipe::default());
        }
        let tensors = self.graph.tensors();
        let all_kept = |t: usize| -> Vec<i64> { (0..tensors[t].channels()).filter(|&c| !removed.contains(&self.channels.class_of(t, c))).collect() };
        // `None` when the tensor keeps every channel.
        let kept = |t: usize| Some(all_kept(t)).filter(|k| k.len() as i64 != tensors[t].channels());
        let mut cuts: Vec<ModuleCut> = Vec::new();
        let mut runs: BTreeMap<String, ModuleCut> = BTreeMap::new();
        for node in self.graph.nodes() {
            let NodeKind::Module(type_name) = &node.kind else { continue };
            // Parameter-free element-wise modules (activations, pooling) follow their input's shape by themselves.
            let input = node.inputs.first().copied();
            let (inputs, outputs) = match (&node.rule, type_name.as_str()) {
                (ChannelRule::Mix, _) => (input.and_then(kept), kept(node.output)),
                (ChannelRule::Elementwise, "BatchNorm2d" | "Conv2d") => (None, kept(node.output)),
                // A padding's cut needs both sides in full to work out its new padding.
                (ChannelRule::PadChannels { .. }, _) if input.and_then(kept).is_some() || kept(node.output).is_some() => {
                    (input.map(all_kept), Some(all_kept(node.output)))
                }
                _ => (None, None),
            };
            let cut = ModuleCut { module: node.name.clone(), inputs, outputs };
            match runs.get(&node.name) {
                Some(earlier) if *earlier != cut => {
                    return Err(Error::invalid(
                        "thinning",
                        format!("'{}' runs more than once on channels that would be thinned differently", node.name),
                    ))
                }
                Some(_) => {}
                None => {
                    runs.insert(node.name.clone(), cut.clone());
                    if cut.inputs.is_some() || cut.outputs.is_some() {
                        cuts.push(cut);
                    }
                }
            }
        }
        Ok(ThinningRecipe { cuts })
    }
}
