//! The data-flow graph of a model, recorded from one forward pass: which tensor each leaf module and each tensor
//! operation consumed and produced. From it, [`Channels`] derives the channel groups that thinning must keep
//! equal: a convolution's filters, the batch norm behind it, the next layer's input channels, a classifier's
//! input columns after a flatten, and every branch meeting at a residual add.
//!
//! Nothing is written per architecture: the graph comes from running the model, so a model of your own is
//! followed as far as its forward pass goes through modules and [`Forward::op`](crate::nn::Forward::op).
//! Operations run directly on tensors inside a `forward` are invisible; the graph marks where a module reads a
//! tensor that no recorded node produced, and thinning leaves the channels there alone.
//!
//! ```
//! let mut model = distill::models::create_model("resnet20_cifar", "cifar10", tch::Device::Cpu)?;
//! let graph = distill::graph::Graph::trace(&mut model)?;
//! let add = graph.node("layer1.0.residual_eltwiseadd").unwrap();
//! assert_eq!(graph.producers(add), ["relu", "layer1.0.bn2"]);
//! let channels = graph.channels();
//! // The residual stream of the first stage couples the stem and all three blocks' second convolutions.
//! let group = channels.group_of("conv1", distill::graph::Axis::Filters).unwrap();
//! assert!(group.members.iter().any(|m| m.to_string() == "layer1.2.conv2 filters"));
//! # Ok::<(), distill::Error>(())
//! ```
mod channels;
mod frames;
mod trace;

use crate::nn::TensorOp;

pub use channels::{Axis, ChannelClass, ChannelGroup, Channels, Member};
pub(crate) use trace::is_wrapper;

/// The data-flow graph of one forward pass.
#[derive(Debug, Clone)]
pub struct Graph {
    nodes: Vec<Node>,
    tensors: Vec<TensorMeta>,
    input: usize,
    output: usize,
}

/// A leaf module call or a tensor operation.
#[derive(Debug, Clone)]
pub struct Node {
    /// The module's dotted name, or for an operation `<module that ran it>/<op>` (`layer1.0/add`; `flatten` at
    /// the root), with `#2`, `#3`... when the same name recurs.
    pub name: String,
    /// What the node is.
    pub kind: NodeKind,
    /// How channels flow from its inputs to its output.
    pub rule: ChannelRule,
    /// Ids of the tensors it read.
    pub inputs: Vec<usize>,
    /// Id of the tensor it produced.
    pub output: usize,
}

/// What a node of the graph is.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A leaf module, with its type name (`Conv2d`).
    Module(String),
    /// A tensor operation run through [`Forward::op`](crate::nn::Forward::op) or
    /// [`Forward::opaque`](crate::nn::Forward::opaque).
    Op(TensorOp),
    /// A tensor some module read that no module or recorded operation produced: an operation run directly on
    /// tensors inside a `forward`.
    Unrecorded,
}

impl Node {
    /// The dotted name of the module this node ran (`""` for a root that is itself a leaf, which the graph
    /// shows as `<root>`); for an operation, its label as in [`Node::name`].
    pub fn module_name(&self) -> &str {
        if self.name == ROOT_LEAF { "" } else { &self.name }
    }
}

/// How the graph names a root module that has no children.
pub(crate) const ROOT_LEAF: &str = "<root>";

impl NodeKind {
    /// `Conv2d`, `op:flatten`, `unrecorded`.
    pub fn label(&self) -> String {
        match self {
            NodeKind::Module(t) => t.clone(),
            NodeKind::Op(op) => format!("op:{}", op.label()),
            NodeKind::Unrecorded => "unrecorded".into(),
        }
    }
}

/// How a node maps the channels (dimension 1) of its inputs to those of its output.
#[derive(Debug, Clone, PartialEq)]
pub enum ChannelRule {
    /// Channel `i` of every input is channel `i` of the output: batch norm, activations, pooling, dropout, a
    /// depthwise convolution, an element-wise add.
    Elementwise,
    /// Mixes all input channels into new output channels: a convolution or a fully connected layer. Its weight's
    /// dimension 0 holds the output channels (filters), dimension 1 the input channels.
    Mix,
    /// `[N, C, H, W]` to `[N, C·H·W]`: channel `c` becomes the block of `H·W` features starting at `c·H·W`.
    Flatten,
    /// Concatenation along channels: the inputs' channels follow each other.
    Concat,
    /// Zero channels padded `front` before and `back` after the input's (a `ConstantPad3d` shortcut).
    PadChannels {
        /// Channels added before.
        front: i64,
        /// Channels added after.
        back: i64,
    },
    /// A node whose channels cannot be followed, with the reason; thinning leaves its channels alone.
    Opaque(String),
}

/// A tensor of the pass.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// Its shape (batch of 1).
    pub shape: Vec<i64>,
    /// The node that produced it; `None` for the model's input.
    pub producer: Option<usize>,
}

impl TensorMeta {
    /// Its number of channels: dimension 1, or 0 for a tensor of fewer than two dimensions.
    pub fn channels(&self) -> i64 {
        self.shape.get(1).copied().filter(|_| self.shape.len() >= 2).unwrap_or(0)
    }
}

impl Graph {
    /// The nodes in the order they ran.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The tensors by id.
    pub fn tensors(&self) -> &[TensorMeta] {
        &self.tensors
    }

    /// Id of the model's input tensor.
    pub fn input(&self) -> usize {
        self.input
    }

    /// Id of the model's output tensor.
    pub fn output(&self) -> usize {
        self.output
    }

    /// The first node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Names of the nodes that produced `node`'s inputs, in input order (`<input>` for the model's input).
    pub fn producers(&self, node: &Node) -> Vec<&str> {
        node.inputs.iter().map(|&t| self.tensors[t].producer.map_or("<input>", |p| self.nodes[p].name.as_str())).collect()
    }

    /// Names of the nodes that read `node`'s output, in the order they ran.
    pub fn consumers(&self, node: &Node) -> Vec<&str> {
        self.nodes.iter().filter(|n| n.inputs.contains(&node.output)).map(|n| n.name.as_str()).collect()
    }

    /// The channel classes and groups of this graph.
    pub fn channels(&self) -> Channels {
        Channels::new(self)
    }
}
