//! Recording the graph: an observer that gives every tensor an id the first time it is seen and notes which
//! leaf module or operation read and wrote which ids.
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use super::{ChannelRule, Graph, Node, NodeKind, TensorMeta};
use crate::nn::{tensor_key, ConstantPad3d, Conv2d, Linear, Model, Module, ModuleCall, Observer, OpCall, TensorKey, TensorOp};
use crate::{Error, Result};

#[derive(Default)]
struct Tracer {
    nodes: Vec<Node>,
    tensors: Vec<TensorMeta>,
    ids: HashMap<TensorKey, usize>,
    /// Every tensor seen is held for the whole pass, so no later tensor can reuse its address.
    keep: Vec<Tensor>,
    /// Outputs of containers, to say in which module an unrecorded tensor was made.
    container_outputs: HashMap<TensorKey, String>,
    /// Inputs of containers, by name.
    container_inputs: HashMap<String, Vec<usize>>,
    /// Each unrecorded node with the module whose forward computed it.
    unrecorded: Vec<(usize, String)>,
    names: HashMap<String, usize>,
    output: Option<usize>,
}

impl Tracer {
    fn new_tensor(&mut self, t: &Tensor, producer: Option<usize>) -> usize {
        let id = self.tensors.len();
        self.tensors.push(TensorMeta { shape: t.size(), producer });
        self.ids.insert(tensor_key(t), id);
        self.keep.push(t.shallow_clone());
        id
    }

    /// The id of a tensor being read; one no node produced gets an [`NodeKind::Unrecorded`] producer.
    fn read(&mut self, t: &Tensor, reader: &str) -> usize {
        if let Some(&id) = self.ids.get(&tensor_key(t)) {
            return id;
        }
        let (made_in, scope) = match self.container_outputs.get(&tensor_key(t)) {
            Some(container) => (format!("the output of '{container}'"), container.clone()),
            None => (format!("an input of '{reader}'"), reader.rsplit_once('.').map_or(String::new(), |(parent, _)| parent.to_string())),
        };
        let node = self.nodes.len();
        self.unrecorded.push((node, scope));
        let reason = format!("{made_in} is computed by tensor code the forward pass runs outside Forward::op");
        let name = self.unique_name(&format!("{reader}/unrecorded"));
        let id = self.new_tensor(t, Some(node));
        self.nodes.push(Node { name, kind: NodeKind::Unrecorded, rule: ChannelRule::Opaque(reason), inputs: vec![], output: id });
        id
    }

    fn unique_name(&mut self, base: &str) -> String {
        let n = self.names.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 { base.to_string() } else { format!("{base}#{n}") }
    }

    fn record(&mut self, name: String, kind: NodeKind, rule: ChannelRule, inputs: &[&Tensor], output: &Tensor) {
        let inputs = inputs.iter().map(|t| self.read(t, &name)).collect();
        let node = self.nodes.len();
        let output = self.new_tensor(output, Some(node));
        self.nodes.push(Node { name, kind, rule, inputs, output });
    }
}

fn same_shapes(inputs: &[&Tensor], output: &Tensor) -> bool {
    inputs.iter().all(|t| t.size() == output.size())
}

/// How a leaf module maps channels, from its type, its configuration and the shapes it saw.
fn module_rule(module: &dyn Module, inputs: &[&Tensor], output: &Tensor) -> ChannelRule {
    let any = module as &dyn Any;
    let [input] = inputs else {
        return match module.type_name() {
            "EltwiseAdd" if same_shapes(inputs, output) => ChannelRule::Elementwise,
            t => ChannelRule::Opaque(format!("{t} with {} inputs", inputs.len())),
        };
    };
    let (dims, out_dims) = (input.dim(), output.dim());
    let keeps_channels = dims == out_dims && dims >= 2 && input.size()[1] == output.size()[1];
    if let Some(conv) = any.downcast_ref::<Conv2d>() {
        let c = &conv.config;
        return match c.groups {
            1 => ChannelRule::Mix,
            g if g == c.in_channels && g == c.out_channels => ChannelRule::Elementwise,
            g => ChannelRule::Opaque(format!("grouped convolution (groups={g}) other than depthwise")),
        };
    }
    if let Some(pad) = any.downcast_ref::<ConstantPad3d>() {
        let [.., front, back] = pad.padding;
        return match (dims, front, back) {
            (4, 0, 0) => ChannelRule::Elementwise,
            (4, f, b) if f >= 0 && b >= 0 && pad.value == 0.0 => ChannelRule::PadChannels { front: f, back: b },
            _ => ChannelRule::Opaque(format!("channel padding {front}/{back} with value {} on a {dims}-D input", pad.value)),
        };
    }
    if any.is::<Linear>() {
        return if dims == 2 { ChannelRule::Mix } else { ChannelRule::Opaque(format!("Linear on a {dims}-D input")) };
    }
    match module.type_name() {
        "Flatten" => flatten_rule(input, output),
        "BatchNorm2d" | "BatchNorm1d" | "ReLU" | "ReLU6" | "MaxPool2d" | "AvgPool2d" | "AdaptiveAvgPool2d" | "Dropout" | "Identity"
            if keeps_channels =>
        {
            ChannelRule::Elementwise
        }
        t => ChannelRule::Opaque(format!("{t} has no channel rule")),
    }
}

fn flatten_rule(input: &Tensor, output: &Tensor) -> ChannelRule {
    match (input.dim(), output.dim()) {
        (2, 2) => ChannelRule::Elementwise,
        (d, 2) if d > 2 => ChannelRule::Flatten,
        (d, o) => ChannelRule::Opaque(format!("flatten from {d}-D to {o}-D")),
    }
}

fn op_rule(op: &TensorOp, inputs: &[&Tensor], output: &Tensor) -> ChannelRule {
    match op {
        TensorOp::Flatten => match inputs {
            [x] => flatten_rule(x, output),
            _ => ChannelRule::Opaque("flatten of several inputs".into()),
        },
        TensorOp::Add if same_shapes(inputs, output) => ChannelRule::Elementwise,
        TensorOp::Add => ChannelRule::Opaque("broadcasting add".into()),
        TensorOp::Cat(1) if output.dim() >= 2 => ChannelRule::Concat,
        TensorOp::Cat(_) if output.dim() >= 2 && inputs.iter().all(|t| t.dim() >= 2 && t.size()[1] == output.size()[1]) => {
            ChannelRule::Elementwise
        }
        TensorOp::Cat(d) => ChannelRule::Opaque(format!("concatenation along dimension {d}")),
        TensorOp::Opaque(label) => ChannelRule::Opaque(format!("opaque function '{label}'")),
    }
}

impl Tracer {
    /// An unrecorded tensor may have been computed from anything its module's forward could reach: the module's
    /// inputs and every tensor its children produced before. The node reads all of them, so that every channel
    /// that might flow into the hidden computation is held fixed.
    fn link_unrecorded(&mut self, model_input: usize) {
        for (node, scope) in std::mem::take(&mut self.unrecorded) {
            let mut inputs: Vec<usize> = match self.container_inputs.get(&scope) {
                Some(ins) => ins.clone(),
                None if scope.is_empty() => vec![model_input],
                None => Vec::new(),
            };
            let prefix = format!("{scope}.");
            for earlier in &self.nodes[..node] {
                if (scope.is_empty() || earlier.name.starts_with(&prefix)) && !inputs.contains(&earlier.output) {
                    inputs.push(earlier.output);
                }
            }
            self.nodes[node].inputs = inputs;
        }
    }
}

/// A quantization wrapper (Distiller's convention: one child named `wrapped_module`) is one node of the graph: what
/// runs inside it is its own arithmetic around the module it wraps, and an exporter writes it as one unit.
pub(crate) fn is_wrapper(module: &dyn Module) -> bool {
    matches!(module.children().as_slice(), [("wrapped_module", _)])
}

impl Tracer {
    /// Forgets the nodes a wrapper's forward recorded inside it (the last ones, all named under it) and the
    /// tensors they produced, so the wrapper is recorded as one leaf.
    fn forget_inside(&mut self, wrapper: &str) {
        let (child, op) = (format!("{wrapper}."), format!("{wrapper}/"));
        let inside = |n: &Node| n.name.starts_with(&child) || n.name.starts_with(&op);
        let first = self.nodes.iter().rposition(|n| !inside(n)).map_or(0, |i| i + 1);
        self.nodes.truncate(first);
        self.unrecorded.retain(|(n, _)| *n < first);
        let cut = self.tensors.iter().position(|t| t.producer.is_some_and(|p| p >= first)).unwrap_or(self.tensors.len());
        self.tensors.truncate(cut);
        self.keep.truncate(cut);
        // A forgotten tensor may have shared its identity with an older one (a wrapped identity returns its
        // input), so the older one's id is restored: the last holder of each identity wins, as when recording.
        self.ids = self.keep.iter().enumerate().map(|(id, t)| (tensor_key(t), id)).collect();
    }
}

impl Observer for Tracer {
    fn observe(&mut self, call: &ModuleCall) {
        let wrapper = !call.name.is_empty() && is_wrapper(call.module);
        if wrapper {
            self.forget_inside(call.name);
        }
        let leaf = wrapper || call.module.children().is_empty();
        if leaf {
            let name = if call.name.is_empty() { super::ROOT_LEAF.to_string() } else { call.name.to_string() };
            let rule = module_rule(call.module, call.inputs, call.output);
            self.record(name, NodeKind::Module(call.module.type_name().to_string()), rule, call.inputs, call.output);
        } else {
            self.container_outputs.insert(tensor_key(call.output), call.name.to_string());
            let inputs = call.inputs.iter().filter_map(|t| self.ids.get(&tensor_key(t)).copied()).collect();
            self.container_inputs.insert(call.name.to_string(), inputs);
        }
        if call.name.is_empty() {
            let reader = "<output>".to_string();
            self.output = Some(self.read(call.output, &reader));
        }
    }

    fn observe_op(&mut self, call: &OpCall) {
        let base = if call.scope.is_empty() { call.op.label() } else { format!("{}/{}", call.scope, call.op.label()) };
        let name = self.unique_name(&base);
        let rule = op_rule(call.op, call.inputs, call.output);
        self.record(name, NodeKind::Op(call.op.clone()), rule, call.inputs, call.output);
    }
}

impl Graph {
    /// Records the graph of `model` from one eval-mode forward pass of a single all-zero sample (no random
    /// numbers are drawn, so tracing never shifts a training run's random stream). The model's mode is unchanged.
    pub fn trace(model: &mut Model) -> Result<Graph> {
        let shape: Vec<i64> = std::iter::once(1).chain(model.info().input_shape.iter().copied()).collect();
        let x = Tensor::f_zeros(shape.as_slice(), (Kind::Float, model.device()))?;
        let tracer = Arc::new(Mutex::new(Tracer::default()));
        let input = tracer.lock().map_err(|_| Error::invalid("graph", "tracer poisoned"))?.new_tensor(&x, None);
        let id = model.attach_observer(tracer.clone());
        let result = tch::no_grad(|| model.forward_t(&x, false));
        model.detach_observer(id);
        let _ = result?;
        let mut tracer = tracer.lock().map_err(|_| Error::invalid("graph", "tracer poisoned"))?;
        let output = tracer.output.ok_or_else(|| Error::invalid("graph", "the forward pass reported no root output"))?;
        tracer.link_unrecorded(input);
        Ok(Graph { nodes: std::mem::take(&mut tracer.nodes), tensors: std::mem::take(&mut tracer.tensors), input, output })
    }
}
