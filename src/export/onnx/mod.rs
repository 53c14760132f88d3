//! ONNX export of a model, written from its data-flow graph with ONNX's own protobuf messages (opset 13):
//! floating-point models (dense, masked or thinned) as they are, and post-training quantized models in QDQ form
//! (`qdq`: integer weights behind `DequantizeLinear`, activations through `QuantizeLinear`/`DequantizeLinear`
//! pairs with distill's scales and zero points). Initializers carry the model's parameter names
//! (`layer1.0.conv1.weight`) and every node's output carries its module's name, so a layer is easy to find in a
//! viewer or a runtime's profile.
//!
//! ```
//! let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let dir = distill::io::TempDir::new()?;
//! let export = distill::export::onnx::export_onnx(&mut model, dir.path().join("lenet.onnx"))?;
//! assert_eq!((export.nodes, export.initializers), (12, 10));
//! # Ok::<(), distill::Error>(())
//! ```
use std::any::Any;
use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use tch::{Kind, Tensor};

mod qdq;

use crate::graph::{Graph, Node, NodeKind};
use crate::quantization::q_utils::QParams;
use crate::nn::{AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, ConstantPad3d, Conv2d, Dropout, Linear, MaxPool2d, Model, TensorOp};
use crate::{Error, Result};

/// ONNX's protobuf messages, generated at build time from `proto/onnx.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::attribute_proto::AttributeType;
use proto::tensor_proto::DataType;
use proto::tensor_shape_proto::{dimension::Value as Dim, Dimension};
use proto::type_proto::{Tensor as TensorType, Value as TypeValue};
use proto::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto};

/// The opset the exporter writes.
pub const OPSET: i64 = 13;

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxExport {
    /// Operator nodes in the graph.
    pub nodes: usize,
    /// Initializers (parameters, buffers and constants).
    pub initializers: usize,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// Quantized layers whose weights are written as integers but computed in floating point: per-channel
    /// weights whose zero points differ, which onnxruntime's integer kernels do not take (see `qdq.rs`).
    pub float_weight_layers: Vec<String>,
}

fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Ints as i32), ints: values.to_vec(), ..Default::default() }
}

fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Int as i32), i: Some(value), ..Default::default() }
}

fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Float as i32), f: Some(value), ..Default::default() }
}

/// A tensor as an initializer, its values stored as raw little-endian bytes: 8-, 32- and 64-bit integers keep
/// their type, everything else is written as float32.
fn initializer(name: &str, t: &Tensor) -> Result<TensorProto> {
    let (kind, data_type) = match t.kind() {
        Kind::Int64 => (Kind::Int64, DataType::Int64),
        Kind::Int => (Kind::Int, DataType::Int32),
        Kind::Int8 => (Kind::Int8, DataType::Int8),
        Kind::Uint8 => (Kind::Uint8, DataType::Uint8),
        _ => (Kind::Float, DataType::Float),
    };
    let raw = raw_bytes(t, kind)?;
    Ok(TensorProto { name: Some(name.into()), dims: t.size(), data_type: Some(data_type as i32), raw_data: Some(raw), ..Default::default() })
}

/// `t`'s values as `kind`, in C order, as raw little-endian bytes (ONNX's `raw_data`, numpy's `tofile`).
pub(crate) fn raw_bytes(t: &Tensor, kind: Kind) -> Result<Vec<u8>> {
    let t = t.f_detach()?.f_to_kind(kind)?.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(bytes)
}

fn float_value(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let shape = TensorShapeProto { dim: dims.iter().map(|d| Dimension { value: Some(d.clone()), denotation: None }).collect() };
    let tensor = TensorType { elem_type: Some(DataType::Float as i32), shape: Some(shape) };
    ValueInfoProto { name: Some(name.into()), r#type: Some(TypeProto { value: Some(TypeValue::TensorType(tensor)), denotation: None }), ..Default::default() }
}

/// How a quantized element-wise add rounds (it matters for residual networks: a one-level difference at an add
/// travels through every later block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddRounding {
    /// The standard QDQ add, as onnxruntime's quantization tooling writes it: the dequantized inputs are summed
    /// and the sum is quantized once, which is what onnxruntime's integer `QLinearAdd` computes.
    #[default]
    Once,
    /// Each input is rounded to the output's scale before the sum, as distill's simulation (and Distiller's
    /// `RangeLinearQuantEltwiseAddWrapper`) computes: the file then reproduces the simulation exactly, but
    /// runtimes compute the add in floating point instead of fusing it into an integer kernel.
    PerInput,
}

/// Export settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnnxOptions {
    /// How quantized adds round.
    pub add_rounding: AddRounding,
}

/// Builds the ONNX graph node by node.
struct Writer<'m> {
    model: &'m Model,
    options: OnnxOptions,
    graph: &'m Graph,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: HashMap<String, usize>,
    /// Values that hold quantized-dequantized activations, with their parameters: the next quantized module
    /// reads them as they are, as distill's wrappers pass the parameters along with the tensor.
    quantized: HashMap<String, QParams>,
    float_weight_layers: Vec<String>,
}

impl<'m> Writer<'m> {
    fn node(&mut self, op: &str, name: &str, inputs: Vec<String>, output: &str, attributes: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs,
            output: vec![output.into()],
            attribute: attributes,
            ..Default::default()
        });
    }

    fn param(&mut self, module: &str, leaf: &str, t: &Tensor) -> Result<String> {
        let name = if module.is_empty() { leaf.to_string() } else { format!("{module}.{leaf}") };
        if !self.initializers.iter().any(|i| i.name.as_deref() == Some(name.as_str())) {
            self.initializers.push(initializer(&name, t)?);
        }
        Ok(name)
    }

    fn conv(&mut self, name: &str, input: String, weight: String, bias: Option<String>, c: &Conv2d) {
        let k = &c.config;
        let attrs = vec![
            attr_ints("kernel_shape", &k.kernel_size),
            attr_ints("strides", &k.stride),
            attr_ints("pads", &[k.padding[0], k.padding[1], k.padding[0], k.padding[1]]),
            attr_ints("dilations", &k.dilation),
            attr_int("group", k.groups),
        ];
        self.node("Conv", name, [input, weight].into_iter().chain(bias).collect(), name, attrs);
    }

    fn gemm(&mut self, name: &str, input: String, weight: String, bias: Option<String>) {
        self.node("Gemm", name, [input, weight].into_iter().chain(bias).collect(), name, vec![attr_int("transB", 1)]);
    }

    /// A unique name for a node and its output.
    fn unique(&mut self, base: &str) -> String {
        let n = self.names.entry(base.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 { base.to_string() } else { format!("{base}#{n}") }
    }

    fn unsupported(node: &Node, what: &str) -> Error {
        Error::invalid("ONNX export", format!("'{}' ({}) {what}; the exporter cannot write it", node.name, node.kind.label()))
    }

    /// Writes `node`, reading `inputs` (value names) and producing `output`.
    fn write(&mut self, node: &Node, inputs: Vec<String>, output: &str) -> Result<()> {
        let name = output.to_string();
        // A view of a quantized tensor with its shape unchanged carries its parameters on (a flatten of a 2-D
        // tensor, an identity, dropout in eval mode), as the same tensor does in distill's forward pass.
        let passes_on = match &node.kind {
            NodeKind::Op(TensorOp::Flatten) => true,
            NodeKind::Module(t) => matches!(t.as_str(), "Identity" | "Dropout" | "Flatten"),
            _ => false,
        };
        let tensors = self.graph.tensors();
        if let ([input], true) = (node.inputs.as_slice(), passes_on) {
            if tensors[*input].shape == tensors[node.output].shape {
                if let Some(p) = self.quantized.get(&inputs[0]).cloned() {
                    self.quantized.insert(name.clone(), p);
                }
            }
        }
        let op = match &node.kind {
            NodeKind::Op(op) => op.clone(),
            NodeKind::Unrecorded => return Err(Self::unsupported(node, "is tensor code a forward pass runs outside Forward::op")),
            NodeKind::Module(_) => {
                let module = self.model.module(node.module_name())?;
                return if crate::graph::is_wrapper(module) {
                    self.write_quantized(node, module, inputs, &name)
                } else if qdq::is_qat(module) {
                    self.write_qat(node, module, inputs, &name)
                } else {
                    self.write_module(node, node.module_name(), inputs, &name)
                };
            }
        };
        match op {
            TensorOp::Flatten => self.node("Flatten", &name, inputs, &name, vec![attr_int("axis", 1)]),
            TensorOp::Add => self.add(&name, inputs),
            TensorOp::Cat(dim) => self.node("Concat", &name, inputs, &name, vec![attr_int("axis", dim)]),
            TensorOp::Opaque(label) => return Err(Self::unsupported(node, &format!("is the opaque function '{label}'"))),
        }
        Ok(())
    }

    fn add(&mut self, name: &str, inputs: Vec<String>) {
        let mut acc = inputs[0].clone();
        for (i, x) in inputs.iter().enumerate().skip(1) {
            let out = if i + 1 == inputs.len() { name.to_string() } else { format!("{name}/partial{i}") };
            self.node("Add", &out.clone(), vec![acc, x.clone()], &out, vec![]);
            acc = out;
        }
        if inputs.len() == 1 {
            self.node("Identity", name, inputs, name, vec![]);
        }
    }

    /// Global pooling for a 1×1 output; otherwise a plain average pool, which equals the adaptive one exactly
    /// when the output size divides the input's (VGG's 7×7 from 224×224 input).
    fn adaptive_avg_pool(&mut self, node: &Node, p: &AdaptiveAvgPool2d, inputs: Vec<String>, name: &str) -> Result<()> {
        if p.output_size == [1, 1] {
            self.node("GlobalAveragePool", name, inputs, name, vec![]);
            return Ok(());
        }
        let input = node.inputs.first().map(|&t| self.graph.tensors()[t].shape.as_slice()).unwrap_or_default();
        let &[.., h, w] = input else { return Err(Self::unsupported(node, &format!("pools a {}-D input", input.len()))) };
        let [oh, ow] = p.output_size;
        if h % oh != 0 || w % ow != 0 {
            return Err(Self::unsupported(node, &format!("pools {h}×{w} to {oh}×{ow}, which no fixed ONNX AveragePool computes")));
        }
        let (kh, kw) = (h / oh, w / ow);
        self.node("AveragePool", name, inputs, name, vec![attr_ints("kernel_shape", &[kh, kw]), attr_ints("strides", &[kh, kw])]);
        Ok(())
    }

    /// Writes the floating-point module `module_name` (the node's own, or the one a quantization wrapper wraps).
    fn write_module(&mut self, node: &Node, module_name: &str, inputs: Vec<String>, name: &str) -> Result<()> {
        let module = self.model.module(module_name)?;
        let any = module as &dyn Any;
        let single = |inputs: Vec<String>| inputs.into_iter().next().ok_or_else(|| Self::unsupported(node, "has no input"));
        if let Some(c) = any.downcast_ref::<Conv2d>() {
            let weight = self.param(module_name, "weight", &c.weight)?;
            let bias = c.bias.as_ref().map(|b| self.param(module_name, "bias", b)).transpose()?;
            self.conv(name, single(inputs)?, weight, bias, c);
        } else if let Some(l) = any.downcast_ref::<Linear>() {
            let weight = self.param(module_name, "weight", &l.weight)?;
            let bias = l.bias.as_ref().map(|b| self.param(module_name, "bias", b)).transpose()?;
            self.gemm(name, single(inputs)?, weight, bias);
        } else if let Some(bn) = any.downcast_ref::<BatchNorm2d>().or_else(|| any.downcast_ref::<BatchNorm1d>().map(|b| &b.0)) {
            let mut ins = inputs;
            for (leaf, t) in [("weight", &bn.weight), ("bias", &bn.bias), ("running_mean", &bn.running_mean), ("running_var", &bn.running_var)] {
                ins.push(self.param(module_name, leaf, t)?);
            }
            self.node("BatchNormalization", name, ins, name, vec![attr_float("epsilon", bn.eps as f32)]);
        } else if let Some(p) = any.downcast_ref::<MaxPool2d>() {
            let (k, s, pad) = (p.kernel_size, p.stride, p.padding);
            let mut attrs = vec![attr_ints("kernel_shape", &[k, k]), attr_ints("strides", &[s, s]), attr_ints("pads", &[pad, pad, pad, pad])];
            attrs.push(attr_int("ceil_mode", i64::from(p.ceil_mode)));
            self.node("MaxPool", name, inputs, name, attrs);
        } else if let Some(p) = any.downcast_ref::<AdaptiveAvgPool2d>() {
            self.adaptive_avg_pool(node, p, inputs, name)?;
        } else if let Some(p) = any.downcast_ref::<AvgPool2d>() {
            let (k, s) = (p.kernel_size, p.stride);
            self.node("AveragePool", name, inputs, name, vec![attr_ints("kernel_shape", &[k, k]), attr_ints("strides", &[s, s])]);
        } else if let Some(p) = any.downcast_ref::<ConstantPad3d>() {
            let [left, right, top, bottom, front, back] = p.padding;
            let pads = Tensor::from_slice(&[0, front, top, left, 0, back, bottom, right]);
            let value = Tensor::from_slice(&[p.value as f32]);
            let pads = self.param(module_name, "pads", &pads)?;
            let value = self.param(module_name, "value", &value)?;
            let mut ins = inputs;
            ins.extend([pads, value]);
            self.node("Pad", name, ins, name, vec![]);
        } else if any.is::<Dropout>() || module.type_name() == "Identity" {
            self.node("Identity", name, inputs, name, vec![]);
        } else {
            match module.type_name() {
                "ReLU" => self.node("Relu", name, inputs, name, vec![]),
                "ReLU6" => {
                    let (lo, hi) = (self.param(module_name, "min", &Tensor::from(0f32))?, self.param(module_name, "max", &Tensor::from(6f32))?);
                    let mut ins = inputs;
                    ins.extend([lo, hi]);
                    self.node("Clip", name, ins, name, vec![]);
                }
                "Flatten" => self.node("Flatten", name, inputs, name, vec![attr_int("axis", 1)]),
                "EltwiseAdd" => self.add(name, inputs),
                other => return Err(Self::unsupported(node, &format!("is a {other}"))),
            }
        }
        Ok(())
    }
}

/// Writes `model` (in eval-mode semantics: batch norms use their running statistics, dropout is the identity) to
/// an ONNX file at `path`, with a dynamic batch dimension. A module or tensor operation the exporter does not know
/// is an error naming it, and no file is written; the file is written through a temporary one, so a failed write
/// leaves nothing half-written. Quantized models are written with the default [`OnnxOptions`].
pub fn export_onnx(model: &mut Model, path: impl AsRef<Path>) -> Result<OnnxExport> {
    export_onnx_with(model, path, OnnxOptions::default())
}

/// [`export_onnx`] with `options`.
pub fn export_onnx_with(model: &mut Model, path: impl AsRef<Path>, options: OnnxOptions) -> Result<OnnxExport> {
    let path = path.as_ref();
    let graph = Graph::trace(model)?;
    let mut writer = Writer { model, options, graph: &graph, nodes: Vec::new(), initializers: Vec::new(), names: HashMap::new(), quantized: HashMap::new(), float_weight_layers: Vec::new() };
    let mut value_of: HashMap<usize, String> = HashMap::from([(graph.input(), "input".to_string())]);
    for node in graph.nodes() {
        let inputs = node
            .inputs
            .iter()
            .map(|t| value_of.get(t).cloned().ok_or_else(|| Writer::unsupported(node, "reads a tensor no exported node produced")))
            .collect::<Result<Vec<_>>>()?;
        let output = if node.output == graph.output() { "output".to_string() } else { writer.unique(&node.name) };
        writer.write(node, inputs, &output)?;
        value_of.insert(node.output, output);
    }
    if !value_of.contains_key(&graph.output()) {
        return Err(Error::invalid("ONNX export", "the model's output is not computed by any exported node"));
    }
    let info = writer.model.info();
    let batch = Dim::DimParam("batch".into());
    let input_dims: Vec<Dim> = std::iter::once(batch.clone()).chain(info.input_shape.iter().map(|&d| Dim::DimValue(d))).collect();
    let output_dims: Vec<Dim> =
        std::iter::once(batch).chain(graph.tensors()[graph.output()].shape.iter().skip(1).map(|&d| Dim::DimValue(d))).collect();
    let (nodes, initializers) = (writer.nodes.len(), writer.initializers.len());
    let onnx = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
        producer_name: Some("distill".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(GraphProto {
            name: Some(info.arch.clone()),
            node: writer.nodes,
            initializer: writer.initializers,
            input: vec![float_value("input", &input_dims)],
            output: vec![float_value("output", &output_dims)],
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = onnx.encode_to_vec();
    crate::io::write_atomic(path, &bytes)?;
    Ok(OnnxExport { nodes, initializers, file_bytes: bytes.len() as u64, float_weight_layers: writer.float_weight_layers })
}
