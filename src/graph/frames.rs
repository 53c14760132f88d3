//! Looking at a graph: DataFrames of its nodes, edges and channel groups, a text listing and Graphviz DOT.
use std::fmt;

use polars::prelude::*;

use super::{ChannelRule, Channels, Graph};
use crate::summary::tables::shape_text;
use crate::Result;

fn rule_text(rule: &ChannelRule) -> String {
    match rule {
        ChannelRule::Elementwise => "elementwise".into(),
        ChannelRule::Mix => "mix".into(),
        ChannelRule::Flatten => "flatten".into(),
        ChannelRule::Concat => "concat".into(),
        ChannelRule::PadChannels { front, back } => format!("pad channels {front}+{back}"),
        ChannelRule::Opaque(why) => format!("opaque: {why}"),
    }
}

impl Graph {
    /// One row per node: `Node`, `Kind`, `Inputs` (the producing nodes), `Output shape`, `Channel rule`,
    /// `Output group` (the channel group of its output, empty when it has no channel axis).
    pub fn nodes_frame(&self) -> Result<DataFrame> {
        let channels = self.channels();
        let mut cols: (Vec<String>, Vec<String>, Vec<String>, Vec<String>, Vec<String>, Vec<Option<i64>>) = Default::default();
        for node in &self.nodes {
            cols.0.push(node.name.clone());
            cols.1.push(node.kind.label());
            cols.2.push(self.producers(node).join(", "));
            cols.3.push(shape_text(&self.tensors[node.output].shape));
            cols.4.push(rule_text(&node.rule));
            cols.5.push(self.output_group(&channels, node.output).map(|g| g as i64));
        }
        Ok(df!("Node" => cols.0, "Kind" => cols.1, "Inputs" => cols.2, "Output shape" => cols.3, "Channel rule" => cols.4, "Output group" => cols.5)?)
    }

    /// One row per edge: `From` (`<input>` for the model's input), `To`, `Shape` of the tensor passed.
    pub fn edges_frame(&self) -> Result<DataFrame> {
        let (mut from, mut to, mut shape) = (Vec::new(), Vec::new(), Vec::new());
        for node in &self.nodes {
            for (&t, producer) in node.inputs.iter().zip(self.producers(node)) {
                from.push(producer.to_string());
                to.push(node.name.clone());
                shape.push(shape_text(&self.tensors[t].shape));
            }
        }
        Ok(df!("From" => from, "To" => to, "Shape" => shape)?)
    }

    fn output_group(&self, channels: &Channels, tensor: usize) -> Option<usize> {
        (self.tensors[tensor].channels() > 0).then(|| channels.classes()[channels.class_of(tensor, 0)].group)
    }

    /// The graph in Graphviz DOT: one box per node, edges labelled with shapes (`dot -Tsvg` draws it).
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph model {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n");
        out += "  \"<input>\" [shape=ellipse];\n";
        for node in &self.nodes {
            out += &format!("  \"{}\" [label=\"{}\\n{}\"];\n", node.name, node.name, node.kind.label());
            for (&t, producer) in node.inputs.iter().zip(self.producers(node)) {
                out += &format!("  \"{producer}\" -> \"{}\" [label=\"{}\"];\n", node.name, shape_text(&self.tensors[t].shape));
            }
        }
        out + "}\n"
    }
}

/// One line per node in the order they ran: name, kind, what it reads, its output shape and channel group.
impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let channels = self.channels();
        let width = self.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
        for node in &self.nodes {
            let group = self.output_group(&channels, node.output).map_or(String::new(), |g| format!("  group {g}"));
            writeln!(
                f,
                "{:width$}  {:<12} <- {:<40} {}{group}",
                node.name,
                node.kind.label(),
                self.producers(node).join(", "),
                shape_text(&self.tensors[node.output].shape),
            )?;
        }
        Ok(())
    }
}

impl Channels {
    /// One row per channel group: `Group`, `Channels`, `Members` (`conv1 filters, bn1 features, layer1.0.conv1
    /// channels`...), `Fixed by` (why its channels cannot be removed, empty when they can).
    pub fn groups_frame(&self) -> Result<DataFrame> {
        let (mut id, mut count, mut members, mut fixed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for g in self.groups() {
            id.push(g.id as i64);
            count.push(g.classes.len() as i64);
            members.push(g.members.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", "));
            fixed.push(g.fixed.join("; "));
        }
        Ok(df!("Group" => id, "Channels" => count, "Members" => members, "Fixed by" => fixed)?)
    }
}
