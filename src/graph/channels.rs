//! Channel classes and groups. Every channel of every tensor of the pass is a slot; the graph's nodes tie slots
//! together (a batch norm ties its input channel `i` to its output channel `i`, an add ties all its inputs'
//! channel `i`, a flatten ties a channel to its block of features). A *class* is a set of tied slots: one channel
//! that can only be removed everywhere at once. A *group* is the set of classes that live in the same tensors:
//! the channel count that thinning shrinks, with its members (the filters that write it, the layers that read it).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{ChannelRule, Graph, NodeKind};

const MODEL_INPUT: &str = "the model's input";
const MODEL_OUTPUT: &str = "the model's output";

/// Element-wise layers with a parameter per channel: batch norm, depthwise convolution.
fn has_channel_parameters(kind: &NodeKind) -> bool {
    matches!(kind, NodeKind::Module(t) if t == "BatchNorm2d" || t == "Conv2d")
}

/// The axis of a member's weight that a group's channels index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Axis {
    /// Output channels: a convolution's filters or a fully connected layer's rows.
    Filters,
    /// Input channels: a convolution's channels or a fully connected layer's columns (in blocks after a flatten).
    Channels,
    /// Per-channel parameters of an element-wise layer (batch norm features, depthwise filters).
    Features,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Filters => "filters",
            Axis::Channels => "channels",
            Axis::Features => "features",
        })
    }
}

/// A layer whose weight a group indexes, and along which axis.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    /// Index of the node in [`Graph::nodes`].
    pub node: usize,
    /// The node's name.
    pub name: String,
    /// The axis.
    pub axis: Axis,
    /// Consecutive weight entries per channel along the axis (`H·W` for a classifier after a flatten, else 1).
    pub block: i64,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.axis)?;
        if self.block > 1 {
            write!(f, " (blocks of {})", self.block)?;
        }
        Ok(())
    }
}

/// One channel, as it appears in every tensor it flows through.
#[derive(Debug, Clone, Default)]
pub struct ChannelClass {
    /// `(tensor id, channel index)` of each slot.
    pub slots: Vec<(usize, i64)>,
    /// `(node, output channel)` of each convolution or fully connected layer that writes it.
    pub producers: Vec<(usize, i64)>,
    /// `(node, input channels)` of each convolution or fully connected layer that reads it (several columns
    /// after a flatten).
    pub consumers: Vec<(usize, Vec<i64>)>,
    /// `(node, channel)` of each element-wise layer with per-channel parameters on the way (batch norm).
    pub features: Vec<(usize, i64)>,
    /// Why this channel cannot be removed: it reaches the model's input or output, or an opaque node.
    pub fixed: Vec<String>,
    /// Index of its group.
    pub group: usize,
}

impl ChannelClass {
    /// Whether the class cannot be removed.
    pub fn is_fixed(&self) -> bool {
        !self.fixed.is_empty()
    }

    /// The reasons it is fixed other than reaching the model's input or output: nodes the graph could not
    /// follow. A zero channel held by one of these is worth an error; one at the model's boundary is not.
    pub fn opaque_reasons(&self) -> impl Iterator<Item = &str> {
        self.fixed.iter().map(String::as_str).filter(|w| *w != MODEL_INPUT && *w != MODEL_OUTPUT)
    }
}

/// The classes that live in the same tensors: one channel count.
#[derive(Debug, Clone)]
pub struct ChannelGroup {
    /// Index among [`Channels::groups`].
    pub id: usize,
    /// Its classes, in channel order of the first tensor.
    pub classes: Vec<usize>,
    /// The tensors it spans.
    pub tensors: Vec<usize>,
    /// The layers whose weights it indexes.
    pub members: Vec<Member>,
    /// Why its channels cannot be removed, if they cannot (one reason per distinct cause).
    pub fixed: Vec<String>,
}

/// Channel classes and groups of a [`Graph`].
#[derive(Debug, Clone)]
pub struct Channels {
    offsets: Vec<usize>,
    class_of_slot: Vec<usize>,
    classes: Vec<ChannelClass>,
    groups: Vec<ChannelGroup>,
}

struct UnionFind(Vec<usize>);

impl UnionFind {
    fn find(&mut self, mut a: usize) -> usize {
        while self.0[a] != a {
            self.0[a] = self.0[self.0[a]];
            a = self.0[a];
        }
        a
    }
    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0[ra.max(rb)] = ra.min(rb);
        }
    }
}

impl Channels {
    pub(super) fn new(graph: &Graph) -> Channels {
        let tensors = graph.tensors();
        let mut offsets = Vec::with_capacity(tensors.len() + 1);
        let mut total = 0usize;
        for t in tensors {
            offsets.push(total);
            total += t.channels() as usize;
        }
        offsets.push(total);
        let slot = |t: usize, c: i64| offsets[t] + c as usize;
        let count = |t: usize| tensors[t].channels();
        let mut uf = UnionFind((0..total).collect());
        let mut fixed: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        let fix_tensor = |t: usize, why: &str, fixed: &mut BTreeMap<usize, BTreeSet<String>>| {
            for c in 0..count(t) {
                fixed.entry(slot(t, c)).or_default().insert(why.to_string());
            }
        };
        for (t, why) in [(graph.input(), MODEL_INPUT), (graph.output(), MODEL_OUTPUT)] {
            fix_tensor(t, why, &mut fixed);
        }
        for node in graph.nodes() {
            let out = node.output;
            match &node.rule {
                ChannelRule::Mix => {}
                ChannelRule::Elementwise => {
                    for &i in &node.inputs {
                        for c in 0..count(i).min(count(out)) {
                            uf.union(slot(i, c), slot(out, c));
                        }
                    }
                }
                ChannelRule::Flatten => {
                    let i = node.inputs[0];
                    let block = count(out) / count(i).max(1);
                    for c in 0..count(i) {
                        for k in 0..block {
                            uf.union(slot(i, c), slot(out, c * block + k));
                        }
                    }
                }
                ChannelRule::Concat => {
                    let mut at = 0;
                    for &i in &node.inputs {
                        for c in 0..count(i) {
                            uf.union(slot(i, c), slot(out, at + c));
                        }
                        at += count(i);
                    }
                }
                ChannelRule::PadChannels { front, .. } => {
                    let i = node.inputs[0];
                    // The padded channels (constant zeros) stay classes of their own.
                    for c in 0..count(i) {
                        uf.union(slot(i, c), slot(out, c + front));
                    }
                }
                ChannelRule::Opaque(reason) => {
                    let why = format!("'{}' ({reason})", node.name);
                    for &t in node.inputs.iter().chain([&out]) {
                        fix_tensor(t, &why, &mut fixed);
                    }
                }
            }
        }
        // Classes numbered in order of their first slot.
        let mut class_of_root: BTreeMap<usize, usize> = BTreeMap::new();
        let mut class_of_slot = vec![0; total];
        let mut classes: Vec<ChannelClass> = Vec::new();
        for (t, meta) in tensors.iter().enumerate() {
            for c in 0..meta.channels() {
                let s = slot(t, c);
                let root = uf.find(s);
                let id = *class_of_root.entry(root).or_insert_with(|| {
                    classes.push(ChannelClass::default());
                    classes.len() - 1
                });
                class_of_slot[s] = id;
                let class = &mut classes[id];
                class.slots.push((t, c));
                for why in fixed.get(&s).into_iter().flatten() {
                    if !class.fixed.contains(why) {
                        class.fixed.push(why.clone());
                    }
                }
            }
        }
        for (n, node) in graph.nodes().iter().enumerate() {
            let out = node.output;
            match node.rule {
                ChannelRule::Mix => {
                    for c in 0..count(out) {
                        classes[class_of_slot[slot(out, c)]].producers.push((n, c));
                    }
                    let i = node.inputs[0];
                    let mut read: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
                    for c in 0..count(i) {
                        read.entry(class_of_slot[slot(i, c)]).or_default().push(c);
                    }
                    for (class, cols) in read {
                        classes[class].consumers.push((n, cols));
                    }
                }
                ChannelRule::Elementwise if has_channel_parameters(&node.kind) => {
                    for c in 0..count(out) {
                        classes[class_of_slot[slot(out, c)]].features.push((n, c));
                    }
                }
                _ => {}
            }
        }
        let groups = make_groups(graph, &mut classes);
        Channels { offsets, class_of_slot, classes, groups }
    }

    /// Every channel class.
    pub fn classes(&self) -> &[ChannelClass] {
        &self.classes
    }

    /// Every channel group, in the order their first tensor was produced.
    pub fn groups(&self) -> &[ChannelGroup] {
        &self.groups
    }

    /// The class of channel `c` of tensor `t`.
    pub fn class_of(&self, t: usize, c: i64) -> usize {
        self.class_of_slot[self.offsets[t] + c as usize]
    }

    /// The group in which `name`'s weight has `axis` (`Filters` of `conv1`: the group its output feeds).
    pub fn group_of(&self, name: &str, axis: Axis) -> Option<&ChannelGroup> {
        self.groups.iter().find(|g| g.members.iter().any(|m| m.name == name && m.axis == axis))
    }
}

fn make_groups(graph: &Graph, classes: &mut [ChannelClass]) -> Vec<ChannelGroup> {
    let mut by_tensors: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
    for (id, class) in classes.iter().enumerate() {
        let tensors: BTreeSet<usize> = class.slots.iter().map(|&(t, _)| t).collect();
        by_tensors.entry(tensors.into_iter().collect()).or_default().push(id);
    }
    let mut groups: Vec<ChannelGroup> = by_tensors
        .into_iter()
        .map(|(tensors, ids)| {
            let mut members = BTreeSet::new();
            let mut fixed = Vec::new();
            for &id in &ids {
                let class = &classes[id];
                for &(n, _) in &class.producers {
                    members.insert(member(graph, n, Axis::Filters, 1));
                }
                for (n, cols) in &class.consumers {
                    members.insert(member(graph, *n, Axis::Channels, cols.len() as i64));
                }
                for &(n, _) in &class.features {
                    members.insert(member(graph, n, Axis::Features, 1));
                }
                for why in &class.fixed {
                    if !fixed.contains(why) {
                        fixed.push(why.clone());
                    }
                }
            }
            let mut members: Vec<Member> = members.into_iter().collect();
            members.sort_by_key(|m| (m.node, m.axis));
            ChannelGroup { id: 0, classes: ids, tensors, members, fixed }
        })
        .collect();
    groups.sort_by_key(|g| g.tensors.first().copied());
    for (id, g) in groups.iter_mut().enumerate() {
        g.id = id;
        for &c in &g.classes {
            classes[c].group = id;
        }
    }
    groups
}

fn member(graph: &Graph, node: usize, axis: Axis, block: i64) -> Member {
    Member { node, name: graph.nodes()[node].name.clone(), axis, block }
}
