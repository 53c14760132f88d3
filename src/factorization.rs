//! Low-rank factorization of fully connected layers by truncated SVD (Distiller's `truncated_svd` notebook).
//!
//! A Linear layer's weight `W` (`out × in`) is replaced by its best rank-`r` approximation in the Frobenius norm,
//! `W ≈ U_r · (Σ_r V_rᵀ)`, computed as two Linear layers: `fc_sv` (`in → r`, no bias) then `fc_u` (`r → out`,
//! with the original bias). The layer keeps its name; its parameters become `fc1.fc_sv.weight`,
//! `fc1.fc_u.weight` and `fc1.fc_u.bias` (Distiller's names), and its cost falls from `out·in` to `r·(out + in)`
//! multiply-accumulates per sample, a saving whenever `r < out·in / (out + in)`.
//!
//! Differs from Distiller's notebook on purpose: Distiller's two new layers keep PyTorch's random initial biases
//! and the original bias is lost, so its factorized AlexNet loses accuracy that the rank does not explain; here
//! `fc_sv` has no bias and `fc_u` carries the original one, so at full rank the layer computes what it did.
//!
//! The model records each factorization ([`Model::factorizations`]); checkpoints keep the record and loading
//! replays it, so a factorized model, fine-tuned or not, saves and loads like any other.
//!
//! ```
//! use distill::factorization::{truncated_svd, Rank};
//! let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let report = truncated_svd(&mut model, &[("fc1", Rank::Count(16))])?;
//! assert_eq!(model.parameter("fc1.fc_sv.weight")?.size(), [16, 400]);
//! assert_eq!(model.parameter("fc1.fc_u.weight")?.size(), [120, 16]);
//! assert_eq!(report.column("rank")?.i64()?.get(0), Some(16));
//! // A name that is no Linear layer is an error that says what is there.
//! assert!(truncated_svd(&mut model, &[("conv1", Rank::Count(2))]).unwrap_err().to_string().contains("Conv2d"));
//! # Ok::<(), distill::Error>(())
//! ```
use std::any::Any;
use std::collections::HashSet;

use polars::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::nn::{BoxModule, Forward, Linear, Model, Module, Rollback};
use crate::{Error, Result};

/// How many singular values a factorization keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rank {
    /// Exactly this many (1 up to the smaller side of the weight).
    Count(i64),
    /// Distiller's `preserve_ratio`: this fraction of the layer's output features, truncated (`int(ratio · out)`),
    /// in (0, 1].
    Ratio(f64),
    /// The fewest singular values whose squares add up to at least this fraction of `‖W‖²_F`, in (0, 1]: the
    /// relative approximation error is then at most `√(1 − energy)`.
    Energy(f64),
}

impl Rank {
    /// The rank for a weight of `out × in` with singular values `s` (descending).
    fn resolve(self, layer: &str, out: i64, inp: i64, s: &[f64]) -> Result<i64> {
        let most = out.min(inp);
        let rank = match self {
            Rank::Count(r) => r,
            Rank::Ratio(p) if p > 0.0 && p <= 1.0 => (p * out as f64) as i64,
            Rank::Energy(e) if e > 0.0 && e <= 1.0 => {
                let total: f64 = s.iter().map(|v| v * v).sum();
                let mut kept = 0.0;
                let mut r = 0;
                // All-zero weights need no singular value; keep one.
                while r < s.len() && (r == 0 || (total > 0.0 && kept / total < e)) {
                    kept += s[r] * s[r];
                    r += 1;
                }
                r as i64
            }
            Rank::Ratio(p) => return Err(Error::invalid("truncated SVD", format!("'{layer}': preserve ratio {p} is outside (0, 1]"))),
            Rank::Energy(e) => return Err(Error::invalid("truncated SVD", format!("'{layer}': energy {e} is outside (0, 1]"))),
        };
        if rank < 1 || rank > most {
            return Err(Error::invalid(
                "truncated SVD",
                format!("'{layer}' ({out}×{inp}): rank {rank} is outside 1..={most}{}", if matches!(self, Rank::Ratio(_)) { "; raise the preserve ratio" } else { "" }),
            ));
        }
        Ok(rank)
    }
}

/// A factorization as the model records it (and checkpoints keep it): the layer, the rank, and how many thinning
/// recipes and early exits the model had when it was applied, so that loading replays them all in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactorizationSpec {
    /// The Linear layer that was factorized.
    pub layer: String,
    /// Singular values kept.
    pub rank: i64,
    /// Thinning recipes applied to the model before this factorization.
    pub after_thinning: usize,
    /// Early exits attached to the model before this factorization.
    pub after_exits: usize,
}

/// A Linear layer factorized in two: `fc_sv` (`in → rank`, no bias) then `fc_u` (`rank → out`, the original
/// bias). Distiller's `TruncatedSVD` module.
#[derive(Debug)]
pub struct TruncatedSvd {
    fc_sv: BoxModule,
    fc_u: BoxModule,
}

impl Module for TruncatedSvd {
    fn type_name(&self) -> &str {
        "TruncatedSVD"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let low = ctx.call("fc_sv", self.fc_sv.as_ref(), xs)?;
        ctx.call("fc_u", self.fc_u.as_ref(), &low)
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("fc_sv", self.fc_sv.as_ref()), ("fc_u", self.fc_u.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("fc_sv", &mut self.fc_sv), ("fc_u", &mut self.fc_u)]
    }
}

/// The Linear layer called `name`, or an error that says what is there instead.
fn linear<'m>(model: &'m Model, name: &str) -> Result<&'m Linear> {
    let module = model.module(name)?;
    (module as &dyn Any).downcast_ref::<Linear>().ok_or_else(|| {
        Error::invalid("truncated SVD", format!("'{name}' is a {}, not a Linear layer; truncated SVD factorizes fully connected layers", module.type_name()))
    })
}

/// What one factorization did.
struct Outcome {
    layer: String,
    out: i64,
    inp: i64,
    rank: i64,
    before: i64,
    after: i64,
    energy: f64,
}

/// Factorizes `layer` at `rank` (already resolved); returns the outcome. The new parameters are created in the
/// model's `VarStore` under the layer's path; the old ones are returned so the caller can drop them from it.
fn factorize(model: &mut Model, layer: &str, rank: Rank, rollback: &mut Rollback) -> Result<Outcome> {
    let (w, bias, out, inp) = {
        let l = linear(model, layer)?;
        (l.weight.f_detach()?, l.bias.as_ref().map(|b| b.f_detach()).transpose()?, l.out_features, l.in_features)
    };
    let kind = w.kind();
    if w.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
        return Err(Error::invalid("truncated SVD", format!("'{layer}' has NaN or infinite weights")));
    }
    // torch.svd's reduced form: W = U·diag(S)·Vᵀ with U `out × k`, V `in × k`, k = min(out, in).
    let (u, s, v) = tch::no_grad(|| w.f_to_kind(Kind::Double)?.f_svd(true, true))?;
    let singular = Vec::<f64>::try_from(&s)?;
    let r = rank.resolve(layer, out, inp, &singular)?;
    let total: f64 = singular.iter().map(|v| v * v).sum();
    let kept: f64 = singular[..r as usize].iter().map(|v| v * v).sum();
    let (sv, u_r) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let sv = v.f_narrow(1, 0, r)?.f_transpose(0, 1)?.f_mul(&s.f_narrow(0, 0, r)?.f_unsqueeze(1)?)?.f_contiguous()?.f_to_kind(kind)?;
        Ok((sv, u.f_narrow(1, 0, r)?.f_contiguous()?.f_to_kind(kind)?))
    })?;
    let mut path = model.var_store().root();
    for part in layer.split('.') {
        path = &path / part;
    }
    let sv_layer = Linear { weight: (&path / "fc_sv").f_var_copy("weight", &sv)?, bias: None, in_features: inp, out_features: r };
    let u_path = &path / "fc_u";
    let u_bias = match &bias {
        Some(b) => Some(u_path.f_var_copy("bias", b)?),
        None => None,
    };
    let u_layer = Linear { weight: u_path.f_var_copy("weight", &u_r)?, bias: u_bias, in_features: r, out_features: out };
    let old = model.replace_module(layer, TruncatedSvd { fc_sv: Box::new(sv_layer), fc_u: Box::new(u_layer) })?;
    rollback.swapped(layer, old);
    let before = out * inp + bias.as_ref().map_or(0, |_| out);
    let after = r * (out + inp) + bias.as_ref().map_or(0, |_| out);
    Ok(Outcome { layer: layer.to_string(), out, inp, rank: r, before, after, energy: if total > 0.0 { kept / total } else { 1.0 } })
}

/// Factorizes each named Linear layer by truncated SVD at its rank; returns one row per layer: `layer`, `out`,
/// `in`, `rank`, `params before`, `params after`, `energy kept (%)` (the share of `‖W‖²_F` the kept singular
/// values carry) and `relative error` (`‖W − W_r‖_F / ‖W‖_F = √(1 − energy)`).
///
/// All or nothing: on any error (an unknown name, a layer that is not Linear, a rank out of range, a layer named
/// twice, NaN weights) the model is exactly as before. Factorize before building the optimizer, as after
/// thinning: the optimizer holds the parameters it was given.
pub fn truncated_svd(model: &mut Model, layers: &[(&str, Rank)]) -> Result<DataFrame> {
    if layers.is_empty() {
        return Err(Error::invalid("truncated SVD", "no layer given; name the Linear layers to factorize, e.g. (\"fc1\", Rank::Ratio(0.25))"));
    }
    let names: Vec<String> = layers.iter().map(|(n, _)| crate::nn::normalize_name(n)).collect();
    let mut seen = HashSet::new();
    if let Some(twice) = names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(Error::invalid("truncated SVD", format!("'{twice}' is named twice")));
    }
    for name in &names {
        linear(model, name)?;
    }
    let recorded = model.factorizations().len();
    let specs_base = (model.thinning_recipes().len(), model.early_exits().len());
    let result = Rollback::transaction(model, |model, rollback| {
        let mut outcomes = Vec::new();
        for (name, (_, rank)) in names.iter().zip(layers) {
            let outcome = factorize(model, name, *rank, rollback)?;
            model.push_factorization(FactorizationSpec { layer: name.clone(), rank: outcome.rank, after_thinning: specs_base.0, after_exits: specs_base.1 });
            outcomes.push(outcome);
        }
        Ok(outcomes)
    });
    let outcomes = match result {
        Ok(o) => o,
        Err(e) => {
            model.truncate_factorizations(recorded);
            return Err(e);
        }
    };
    forget_replaced(model, &names);
    let df = df!(
        "layer" => outcomes.iter().map(|o| o.layer.clone()).collect::<Vec<_>>(),
        "out" => outcomes.iter().map(|o| o.out).collect::<Vec<_>>(),
        "in" => outcomes.iter().map(|o| o.inp).collect::<Vec<_>>(),
        "rank" => outcomes.iter().map(|o| o.rank).collect::<Vec<_>>(),
        "params before" => outcomes.iter().map(|o| o.before).collect::<Vec<_>>(),
        "params after" => outcomes.iter().map(|o| o.after).collect::<Vec<_>>(),
        "energy kept (%)" => outcomes.iter().map(|o| 100.0 * o.energy).collect::<Vec<_>>(),
        "relative error" => outcomes.iter().map(|o| (1.0 - o.energy).max(0.0).sqrt()).collect::<Vec<_>>(),
    )?;
    Ok(df)
}

/// Applies a recorded factorization again (loading a checkpoint): the layer's current weights are factorized at
/// the recorded rank; the checkpoint's values replace them afterwards.
pub(crate) fn replay(model: &mut Model, spec: &FactorizationSpec) -> Result<()> {
    let rank = Rank::Count(spec.rank);
    Rollback::transaction(model, |model, rollback| factorize(model, &spec.layer, rank, rollback).map(|_| ()))?;
    forget_replaced(model, std::slice::from_ref(&spec.layer));
    model.push_factorization(spec.clone());
    Ok(())
}

/// The replaced Linear layers' variables leave the store, so moving the model to a device does not carry them.
fn forget_replaced(model: &mut Model, layers: &[String]) {
    let gone: Vec<String> = layers.iter().flat_map(|n| [format!("{n}.weight"), format!("{n}.bias")]).collect();
    model.forget_variables(&gone);
}
