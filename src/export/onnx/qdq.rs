//! Post-training quantized models in ONNX's QDQ form, the form onnxruntime's own quantization tooling writes:
//! each quantized Conv2d/Linear reads integer weights through `DequantizeLinear` (per output channel on axis 0
//! where distill quantized per channel) and an int32 bias at the accumulator's scale; every activation distill
//! quantizes passes through a `QuantizeLinear`/`DequantizeLinear` pair with distill's scale and zero point. A
//! runtime that fuses the pairs into integer kernels (onnxruntime at its default optimization level) computes in
//! integers; one that does not computes what distill's simulation computes, up to float rounding.
//!
//! Conventions: distill (as Distiller) writes `q = round(x·scale − zp)`, `x = (q + zp) / scale`; ONNX writes
//! `q = round(x / s) + z`, `x = (q − z)·s`. So `s = 1 / scale` and `z = −zp`.
use std::any::Any;

use tch::{Kind, Tensor};

use super::{attr_int, Writer};
use crate::graph::Node;
use crate::nn::{Conv2d, Linear, Module};
use crate::quantization::q_utils::{along, quantized_range, QParams};
use crate::quantization::qat::{ClippedLinearQuantization, FakeLinearQuantization, FpCopyLayer, LearnedClippedLinearQuantization};
use crate::quantization::range_linear::{ActQuant, RangeLinearFakeQuant, RangeLinearQuantEltwiseAdd, RangeLinearQuantParamLayer};
use crate::{Error, Result};

/// The 8-bit integer type that holds `range` (opset 13's `QuantizeLinear` writes int8 and uint8 only).
fn container(range: (f64, f64), module: &str) -> Result<Kind> {
    match range {
        (lo, hi) if lo >= 0.0 && hi <= 255.0 => Ok(Kind::Uint8),
        (lo, hi) if lo >= -128.0 && hi <= 127.0 => Ok(Kind::Int8),
        (lo, hi) => Err(Error::invalid(
            "ONNX export",
            format!("'{module}' is quantized to the integer range [{lo}, {hi}], wider than 8 bits; ONNX opset 13's QuantizeLinear writes int8 and uint8 only, so quantize to at most 8 bits"),
        )),
    }
}

fn container_full_range(kind: Kind) -> (f64, f64) {
    if kind == Kind::Uint8 { (0.0, 255.0) } else { (-128.0, 127.0) }
}

/// ONNX's scale (float32) and zero point (in `kind`) for distill's parameters, per tensor or per channel.
fn onnx_params(p: &QParams, kind: Kind, module: &str) -> Result<(Tensor, Tensor)> {
    let scale = p.step()?.f_to_kind(Kind::Float)?;
    let zp = p.zero_point.f_to_kind(Kind::Double)?.f_neg()?;
    let (lo, hi) = container_full_range(kind);
    let outside = zp.f_lt(lo)?.f_logical_or(&zp.f_gt(hi)?)?.f_logical_or(&zp.f_ne_tensor(&zp.f_round()?)?)?;
    if outside.f_any()?.f_int64_value(&[])? != 0 {
        return Err(Error::invalid("ONNX export", format!("'{module}': a zero point is not an integer in [{lo}, {hi}], which ONNX's {kind:?} zero points need")));
    }
    Ok((scale, zp.f_to_kind(kind)?))
}

/// What makes a quantizer's settings impossible to write as QDQ, if anything.
fn check_exportable(acts: &ActQuant, module: &str) -> Result<()> {
    if acts.scale_approx_mult_bits.is_some() {
        return Err(Error::invalid(
            "ONNX export",
            format!("'{module}' approximates its scales by integer multipliers and shifts (scale_approx_mult_bits), which QDQ cannot express; quantize without it to export"),
        ));
    }
    if acts.accum_bits != 32 {
        return Err(Error::invalid("ONNX export", format!("'{module}' clamps its accumulator to {} bits; QDQ accumulates in 32 bits, so quantize with bits_accum: 32 to export", acts.accum_bits)));
    }
    Ok(())
}

/// `DequantizeLinear`'s `axis` attribute for parameters per output channel (a `[C]` scale), none per tensor.
fn channel_axis(p: &QParams) -> Vec<super::AttributeProto> {
    if p.scale.dim() == 1 { vec![attr_int("axis", 0)] } else { vec![] }
}

fn dynamic_ranges(module: &str) -> Error {
    Error::invalid(
        "ONNX export",
        format!("'{module}' quantizes with dynamic ranges (taken from each batch), but a QDQ graph holds fixed scales; calibrate the quantizer first (distill quantize --calibrate N, or model_activation_stats in its schedule)"),
    )
}

impl Writer<'_> {
    fn constant(&mut self, name: &str, t: &Tensor) -> Result<String> {
        self.param("", name, t)
    }

    /// `value` through `QuantizeLinear` and `DequantizeLinear` with `p` (per tensor) into `out`; initializers are
    /// named `{base}_scale` and `{base}_zero_point`. A range narrower than the 8-bit type (fewer bits, or a
    /// restricted symmetric range) is enforced by a `Clip` on the integers.
    fn quant_dequant(&mut self, value: &str, p: &QParams, base: &str, module: &str, out: &str) -> Result<()> {
        let kind = container(p.range, module)?;
        let (scale, zp) = onnx_params(p, kind, module)?;
        let s = self.constant(&format!("{base}_scale"), &scale)?;
        let z = self.constant(&format!("{base}_zero_point"), &zp)?;
        let mut q = format!("{base}/quantized");
        self.node("QuantizeLinear", &q.clone(), vec![value.to_string(), s.clone(), z.clone()], &q, vec![]);
        if p.range != container_full_range(kind) {
            let lo = self.constant(&format!("{base}_min"), &Tensor::from(p.range.0).f_to_kind(kind)?)?;
            let hi = self.constant(&format!("{base}_max"), &Tensor::from(p.range.1).f_to_kind(kind)?)?;
            let clipped = format!("{base}/clipped");
            self.node("Clip", &clipped, vec![q, lo, hi], &clipped, vec![]);
            q = clipped;
        }
        self.node("DequantizeLinear", out, vec![q, s, z], out, vec![]);
        self.quantized.insert(out.to_string(), p.clone());
        Ok(())
    }

    /// Input `idx` of a quantized module as the module reads it: as it arrived if it arrived quantized, else
    /// quantized and dequantized with the parameters distill picks for it. Returns the value and its parameters.
    fn quantized_input(&mut self, value: String, idx: usize, acts: &ActQuant, module: &str) -> Result<(String, QParams)> {
        let arrived = self.quantized.get(&value).cloned();
        let p = acts.input_params_from(idx, arrived.as_ref(), || Err(dynamic_ranges(module)))?;
        if arrived.is_some() {
            return Ok((value, p));
        }
        let out = format!("{module}/input{idx}");
        self.quant_dequant(&value, &p, &format!("{module}.input{idx}"), module, &out)?;
        Ok((out, p))
    }

    fn output_params(acts: &ActQuant, module: &str) -> Result<QParams> {
        acts.output_params(|| Err(dynamic_ranges(module)))
    }

    /// `value`, through a ReLU when `relu`, quantized with the module's output parameters into `out`.
    fn quantized_output(&mut self, value: String, relu: bool, p: Option<&QParams>, module: &str, out: &str) -> Result<()> {
        let value = if relu {
            let r = if p.is_none() { out.to_string() } else { format!("{module}/relu") };
            self.node("Relu", &r, vec![value], &r, vec![]);
            r
        } else {
            value
        };
        match p {
            Some(p) => self.quant_dequant(&value, p, &format!("{module}.output"), module, out),
            None if value == out => Ok(()),
            None => {
                self.node("Identity", out, vec![value], out, vec![]);
                Ok(())
            }
        }
    }

    /// Writes a quantization wrapper: a range-linear Conv2d/Linear, a fake-quantized module or a quantized add.
    pub(super) fn write_quantized(&mut self, node: &Node, module: &dyn Module, inputs: Vec<String>, out: &str) -> Result<()> {
        let name = node.module_name().to_string();
        let any = module as &dyn Any;
        if let Some(layer) = any.downcast_ref::<RangeLinearQuantParamLayer>() {
            return self.write_layer(node, layer, inputs, &name, out);
        }
        if let Some(fake) = any.downcast_ref::<RangeLinearFakeQuant>() {
            let acts = fake.activation_quant();
            check_exportable(acts, &name)?;
            if let Some(kind) = fake.dtype() {
                return Err(Error::invalid("ONNX export", format!("'{name}' runs in {kind:?} (fpq_module), which the QDQ export does not write; quantize without fpq_module to export")));
            }
            let mut prepared = Vec::with_capacity(inputs.len());
            for (i, value) in inputs.into_iter().enumerate() {
                prepared.push(if fake.quantizes_inputs() { self.quantized_input(value, i, acts, &name)?.0 } else { value });
            }
            let float = format!("{name}/float");
            self.write_module(node, &format!("{name}.wrapped_module"), prepared, &float)?;
            let p = Self::output_params(acts, &name)?;
            return self.quantized_output(float, acts.output.half_range, Some(&p), &name, out);
        }
        if let Some(add) = any.downcast_ref::<RangeLinearQuantEltwiseAdd>() {
            let acts = add.activation_quant();
            check_exportable(acts, &name)?;
            let mut prepared = Vec::with_capacity(inputs.len());
            for (i, value) in inputs.into_iter().enumerate() {
                prepared.push(self.quantized_input(value, i, acts, &name)?.0);
            }
            let p = Self::output_params(acts, &name)?;
            let sum = format!("{name}/float");
            if self.options.add_rounding == super::AddRounding::PerInput {
                prepared = self.rounded_to_output_scale(prepared, &p, &name)?;
                self.add(&format!("{name}/levels"), prepared);
                // Back to the value the levels stand for; quantizing it again yields exactly those levels.
                let step = self.constant(&format!("{name}.output_step"), &p.step()?.f_to_kind(Kind::Float)?)?;
                self.node("Mul", &sum, vec![format!("{name}/levels"), step], &sum, vec![]);
            } else {
                self.add(&sum, prepared);
            }
            return self.quantized_output(sum, acts.output.half_range, Some(&p), &name, out);
        }
        Err(Self::unsupported(node, &format!("is a {}, which the QDQ export does not write", module.type_name())))
    }

    /// Each input as a whole number of the output's levels, `round(x·scale)` (distill's per-input rounding).
    fn rounded_to_output_scale(&mut self, inputs: Vec<String>, p: &QParams, module: &str) -> Result<Vec<String>> {
        let scale = self.constant(&format!("{module}.output_levels_per_unit"), &p.scale.f_to_kind(Kind::Float)?)?;
        let mut out = Vec::with_capacity(inputs.len());
        for (i, value) in inputs.into_iter().enumerate() {
            let (scaled, rounded) = (format!("{module}/input{i}_scaled"), format!("{module}/input{i}_levels"));
            self.node("Mul", &scaled, vec![value, scale.clone()], &scaled, vec![]);
            self.node("Round", &rounded, vec![scaled], &rounded, vec![]);
            out.push(rounded);
        }
        Ok(out)
    }

    /// Integer weights `q` (as floats) behind `DequantizeLinear` with `p` (per output channel on axis 0 when its
    /// scale is `[C]`); returns the dequantized value.
    fn dequantized_weight(&mut self, name: &str, q: &Tensor, p: &QParams) -> Result<String> {
        let kind = container(p.range, name)?;
        let (w_scale, w_zp) = onnx_params(p, kind, name)?;
        let axis = channel_axis(p);
        let w_int = self.param(name, "weight", &q.f_round()?.f_to_kind(kind)?)?;
        let s = self.param(name, "weight_scale", &w_scale)?;
        let weight = format!("{name}/weight");
        // onnxruntime's integer convolution takes one weight zero point per tensor: given per-channel zero points
        // that differ, its optimizer fuses the graph and then fails at run time ("zero point of per-channel filter
        // must be same"). Such weights are dequantized with zero point 0 and their offsets `z·s` subtracted in
        // floating point, which every runtime computes (as a float convolution) and which stores the same bytes.
        let uniform_zp = w_zp.numel() <= 1 || w_zp.f_ne(w_zp.f_min()?.f_int64_value(&[])?)?.f_any()?.f_int64_value(&[])? == 0;
        if uniform_zp {
            let z = self.param(name, "weight_zero_point", &w_zp)?;
            self.node("DequantizeLinear", &weight, vec![w_int, s, z], &weight, axis.clone());
        } else {
            let z = self.param(name, "weight_zero_point", &w_zp.f_zeros_like()?)?;
            let shifted = format!("{name}/weight_shifted");
            self.node("DequantizeLinear", &shifted, vec![w_int, s, z], &shifted, axis.clone());
            let mut shape = vec![-1i64];
            shape.resize(q.dim(), 1);
            let offset = w_zp.f_to_kind(Kind::Double)?.f_mul(&p.step()?)?.f_reshape(shape.as_slice())?;
            let offset = self.param(name, "weight_offset", &offset)?;
            self.node("Sub", &weight, vec![shifted, offset], &weight, vec![]);
            self.float_weight_layers.push(name.to_string());
        }
        Ok(weight)
    }

    /// The Conv2d or Linear `wrapped` computing `out` from `input` with the values `weight` and `bias` (the
    /// dequantized integers a quantized layer holds).
    fn layer_with(&mut self, node: &Node, wrapped: &dyn Module, out: &str, input: String, weight: String, bias: Option<String>) -> Result<()> {
        let any = wrapped as &dyn Any;
        if let Some(c) = any.downcast_ref::<Conv2d>() {
            self.conv(out, input, weight, bias, c);
        } else if any.is::<Linear>() {
            self.gemm(out, input, weight, bias);
        } else {
            return Err(Self::unsupported(node, "wraps neither a Conv2d nor a Linear"));
        }
        Ok(())
    }

    /// A range-linear Conv2d or Linear: integer weights and bias behind `DequantizeLinear`, the float layer, and
    /// the output quantized (weights-only quantization leaves the output in floating point).
    fn write_layer(&mut self, node: &Node, layer: &RangeLinearQuantParamLayer, inputs: Vec<String>, name: &str, out: &str) -> Result<()> {
        let [input] = <[String; 1]>::try_from(inputs).map_err(|_| Self::unsupported(node, "has other than one input"))?;
        let wp = layer.weight_params();
        let stored = layer.integer_weight().ok_or_else(|| Self::unsupported(node, "has no weight"))?;
        let acts = layer.activation_quant();
        // Weights-only quantization stores the dequantized weights; their integers are recovered exactly.
        let q = if acts.is_some() { stored } else { wp.quantize(&stored, 0)? };
        let weight = self.dequantized_weight(name, &q, wp)?;
        let (input, bias, out_p) = match acts {
            Some(acts) => {
                check_exportable(acts, name)?;
                let (input, in_p) = self.quantized_input(input, 0, acts, name)?;
                // The bias as distill computes it: rounded at the accumulator's scale, in 32-bit integers.
                let accum_scale = wp.scale.f_to_kind(Kind::Double)?.f_mul(&in_p.scale.f_to_kind(Kind::Double)?)?;
                let bias = match layer.float_bias() {
                    Some(b) => {
                        let (lo, hi) = quantized_range(32, true, false);
                        let b_q = b.f_to_kind(Kind::Double)?.f_mul(&accum_scale)?.f_round()?.f_clamp(lo, hi)?.f_to_kind(Kind::Int)?;
                        let b_int = self.param(name, "bias", &b_q)?;
                        let bs = self.param(name, "bias_scale", &accum_scale.f_reciprocal()?.f_to_kind(Kind::Float)?)?;
                        let bz = self.param(name, "bias_zero_point", &accum_scale.f_zeros_like()?.f_to_kind(Kind::Int)?)?;
                        let bias = format!("{name}/bias");
                        self.node("DequantizeLinear", &bias, vec![b_int, bs, bz], &bias, channel_axis(wp));
                        Some(bias)
                    }
                    None => None,
                };
                (input, bias, Some(Self::output_params(acts, name)?))
            }
            None => (input, layer.float_bias().map(|b| self.param(name, "bias", b)).transpose()?, None),
        };
        let float = format!("{name}/float");
        self.layer_with(node, layer.wrapped(), &float, input, weight, bias)?;
        self.quantized_output(float, layer.output_relu(), out_p.as_ref(), name, out)
    }
}

/// Whether `module` is one of quantization-aware training's modules, which [`Writer::write_qat`] writes.
pub(super) fn is_qat(module: &dyn Module) -> bool {
    let any = module as &dyn Any;
    any.is::<FpCopyLayer>() || any.is::<ClippedLinearQuantization>() || any.is::<LearnedClippedLinearQuantization>() || any.is::<FakeLinearQuantization>()
}

/// The parameters of an activation quantizer that clips to `[0, clip]` with `bits` bits (DoReFa, WRPN, PACT).
fn clipped(bits: u32, clip: f64, module: &str) -> Result<QParams> {
    if !(clip.is_finite() && clip > 0.0) {
        return Err(Error::invalid("ONNX export", format!("'{module}' clips activations at {clip}, which is not a positive number")));
    }
    let levels = 2f64.powi(bits as i32) - 1.0;
    Ok(QParams::from_scale(Tensor::from(levels / clip), Tensor::from(0.0), (0.0, levels)))
}

impl Writer<'_> {
    /// Writes a module of quantization-aware training: a layer computing with quantized weights (integer weights
    /// behind `DequantizeLinear`), or an activation quantizer (a `QuantizeLinear`/`DequantizeLinear` pair).
    pub(super) fn write_qat(&mut self, node: &Node, module: &dyn Module, inputs: Vec<String>, out: &str) -> Result<()> {
        let name = node.module_name().to_string();
        let any = module as &dyn Any;
        let [input] = <[String; 1]>::try_from(inputs).map_err(|_| Self::unsupported(node, "has other than one input"))?;
        let p = if let Some(layer) = any.downcast_ref::<FpCopyLayer>() {
            return self.write_qat_layer(node, layer, input, &name, out);
        } else if let Some(q) = any.downcast_ref::<ClippedLinearQuantization>() {
            clipped(q.bits, q.clip_val, &name)?
        } else if let Some(q) = any.downcast_ref::<LearnedClippedLinearQuantization>() {
            clipped(q.bits, q.clip_val.f_double_value(&[0])?, &name)?
        } else if let Some(q) = any.downcast_ref::<FakeLinearQuantization>() {
            match q.quant_params()? {
                Some(mut p) if p.range == (-128.0, 128.0) => {
                    // Symmetric 8-bit fake quantization saturates at +128 (as Distiller's); int8 holds 127, so
                    // inputs at the very top of the range come out one level lower.
                    p.range = (-128.0, 127.0);
                    p
                }
                Some(p) => p,
                None => {
                    self.node("Identity", out, vec![input], out, vec![]);
                    return Ok(());
                }
            }
        } else {
            return Err(Self::unsupported(node, "is not a quantization-aware training module"));
        };
        self.quant_dequant(&input, &p, &format!("{name}.output"), &name, out)
    }

    fn write_qat_layer(&mut self, node: &Node, layer: &FpCopyLayer, input: String, name: &str, out: &str) -> Result<()> {
        let wq = tch::no_grad(|| layer.quantized_weight())?.f_to_kind(Kind::Double)?;
        let (scale, zp) = layer.weight_quant().grid(layer.float_weight()?)?;
        let rank = wq.dim();
        let (s, z) = if scale.dim() == 1 { (along(&scale, 0, rank)?, along(&zp, 0, rank)?) } else { (scale.shallow_clone(), zp.shallow_clone()) };
        let (s, z) = (s.f_to_kind(Kind::Double)?, z.f_to_kind(Kind::Double)?);
        let q = wq.f_mul(&s)?.f_sub(&z)?.f_round()?;
        // The integers must give back exactly the weights the layer computes with.
        let off = q.f_add(&z)?.f_div(&s)?.f_sub(&wq)?.f_abs()?.f_max()?.f_double_value(&[])?;
        let size = wq.f_abs()?.f_max()?.f_double_value(&[])?.max(f64::MIN_POSITIVE);
        // Also refuses NaN (binary DoReFa of all-zero weights has no scale).
        if off.is_nan() || off > 1e-5 * size {
            return Err(Error::invalid("ONNX export", format!("'{name}': its quantized weights ({:?}) are not on an integer grid (off by {off:e})", layer.weight_quant())));
        }
        let range = (q.f_min()?.f_double_value(&[])?, q.f_max()?.f_double_value(&[])?);
        let p = QParams::from_scale(scale.f_to_kind(Kind::Double)?, zp.f_to_kind(Kind::Double)?, range);
        let weight = self.dequantized_weight(name, &q, &p)?;
        let bias = tch::no_grad(|| layer.quantized_bias())?.map(|b| self.param(name, "bias", &b)).transpose()?;
        self.layer_with(node, layer.layer(), out, input, weight, bias)
    }
}
