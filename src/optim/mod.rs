//! Optimizers with state you can read, save and restore.
//!
//! tch's optimizers keep their state inside libtorch where Rust cannot reach it (no momentum buffers, no LR
//! getter), so a resumed run could never match an uninterrupted one. These follow PyTorch's `torch.optim.SGD`
//! and `torch.optim.Adam` update rules exactly and expose their state by parameter name for checkpoints.
//!
//! ```
//! use distill::optim::{Optimizer, OptimizerConfig};
//! # fn main() -> distill::Result<()> {
//! let model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
//! let mut opt = Optimizer::for_model(&model, OptimizerConfig::sgd(0.9, 1e-4), 0.1)?;
//! opt.set_lr(0.01);
//! assert_eq!(opt.lr(), 0.01);
//! # Ok(()) }
//! ```
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::nn::Model;
use crate::{Error, Result};

/// The update rule and its hyper-parameters (those shared by all parameter groups).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// Stochastic gradient descent with optional momentum, as `torch.optim.SGD`.
    Sgd {
        /// Momentum factor (0 disables momentum).
        momentum: f64,
        /// Dampening of the momentum.
        dampening: f64,
        /// Nesterov momentum.
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
    /// Adam (Kingma and Ba, 2015), as `torch.optim.Adam` with `amsgrad=False`.
    Adam {
        /// Decay of the first-moment estimate.
        beta1: f64,
        /// Decay of the second-moment estimate.
        beta2: f64,
        /// Added to the denominator for stability.
        eps: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// SGD with `momentum` and `weight_decay`, no dampening, no Nesterov (Distiller's defaults are 0.9, 1e-4).
    pub fn sgd(momentum: f64, weight_decay: f64) -> Self {
        OptimizerConfig::Sgd { momentum, dampening: 0.0, nesterov: false, weight_decay }
    }

    /// Adam with PyTorch's defaults (β = 0.9, 0.999, ε = 1e-8) and `weight_decay`.
    pub fn adam(weight_decay: f64) -> Self {
        OptimizerConfig::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    /// The PyTorch class name (`SGD`, `Adam`).
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "SGD",
            OptimizerConfig::Adam { .. } => "Adam",
        }
    }

    fn weight_decay(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { weight_decay, .. } | OptimizerConfig::Adam { weight_decay, .. } => weight_decay,
        }
    }

    fn validate(&self) -> Result<()> {
        let check = |name: &str, v: f64, ok: bool| if ok && v.is_finite() { Ok(()) } else { Err(Error::invalid(name, format!("{v} is out of range"))) };
        match *self {
            OptimizerConfig::Sgd { momentum, dampening, nesterov, weight_decay } => {
                check("momentum", momentum, momentum >= 0.0)?;
                check("dampening", dampening, (0.0..=1.0).contains(&dampening))?;
                check("weight_decay", weight_decay, weight_decay >= 0.0)?;
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(Error::invalid("nesterov", "Nesterov momentum requires momentum > 0 and zero dampening"));
                }
                Ok(())
            }
            OptimizerConfig::Adam { beta1, beta2, eps, weight_decay } => {
                check("beta1", beta1, (0.0..1.0).contains(&beta1))?;
                check("beta2", beta2, (0.0..1.0).contains(&beta2))?;
                check("eps", eps, eps >= 0.0)?;
                check("weight_decay", weight_decay, weight_decay >= 0.0)
            }
        }
    }
}

/// Parameters sharing a learning rate and weight decay (PyTorch's param group).
#[derive(Debug)]
pub struct ParamGroup {
    /// Current learning rate; LR schedules change it.
    pub lr: f64,
    /// The learning rate the group started with (PyTorch's `initial_lr`), the base of LR schedules.
    pub initial_lr: f64,
    /// L2 penalty for this group.
    pub weight_decay: f64,
    params: Vec<(String, Tensor)>,
}

impl ParamGroup {
    /// The group's parameters by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }
}

#[derive(Debug, Default)]
struct ParamState {
    step: i64,
    /// SGD's momentum buffer or Adam's `exp_avg`.
    first: Option<Tensor>,
    /// Adam's `exp_avg_sq`.
    second: Option<Tensor>,
}

/// An optimizer over named parameters, with PyTorch's update rules and inspectable state.
#[derive(Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    groups: Vec<ParamGroup>,
    state: HashMap<String, ParamState>,
}

fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 { Ok(()) } else { Err(Error::invalid("learning rate", format!("{lr} must be finite and >= 0"))) }
}

impl Optimizer {
    /// An optimizer over `params` (name, tensor) with learning rate `lr`.
    pub fn new(config: OptimizerConfig, params: Vec<(String, Tensor)>, lr: f64) -> Result<Self> {
        config.validate()?;
        check_lr(lr)?;
        let group = ParamGroup { lr, initial_lr: lr, weight_decay: config.weight_decay(), params };
        Ok(Optimizer { config, groups: vec![group], state: HashMap::new() })
    }

    /// An optimizer over every trainable parameter of `model`.
    pub fn for_model(model: &Model, config: OptimizerConfig, lr: f64) -> Result<Self> {
        let params = model.named_parameters().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        Optimizer::new(config, params, lr)
    }

    /// Adds a group with its own learning rate and weight decay (e.g. PACT's clipping values).
    pub fn add_param_group(&mut self, params: Vec<(String, Tensor)>, lr: f64, weight_decay: f64) -> Result<()> {
        check_lr(lr)?;
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::invalid("weight_decay", format!("{weight_decay} must be finite and >= 0")));
        }
        let taken: Vec<&String> = self.groups.iter().flat_map(|g| g.params.iter().map(|(n, _)| n)).collect();
        if let Some((dup, _)) = params.iter().find(|(n, _)| taken.contains(&n)) {
            return Err(Error::invalid("param group", format!("'{dup}' is already in another group")));
        }
        self.groups.push(ParamGroup { lr, initial_lr: lr, weight_decay, params });
        Ok(())
    }

    /// The update rule.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The parameter groups, mutably (to change a group's learning rate).
    pub fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    /// Learning rate of the first group.
    pub fn lr(&self) -> f64 {
        self.groups.first().map_or(0.0, |g| g.lr)
    }

    /// Sets every group's learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        for g in &mut self.groups {
            g.lr = lr;
        }
    }

    /// Zeroes every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for (_, p) in &mut g.params {
                p.zero_grad();
            }
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for group in &self.groups {
            for (name, p) in &group.params {
                let grad = p.grad();
                if !grad.defined() {
                    continue;
                }
                let mut d_p = if group.weight_decay != 0.0 { grad.f_add(&p.f_mul_scalar(group.weight_decay)?)? } else { grad };
                let state = self.state.entry(name.clone()).or_default();
                state.step += 1;
                let mut p = p.shallow_clone();
                match self.config {
                    OptimizerConfig::Sgd { momentum, dampening, nesterov, .. } => {
                        if momentum != 0.0 {
                            let buf = match state.first.take() {
                                None => d_p.f_detach_copy()?,
                                Some(mut buf) => {
                                    let _ = buf.f_mul_scalar_(momentum)?;
                                    let _ = buf.f_add_(&d_p.f_mul_scalar(1.0 - dampening)?)?;
                                    buf
                                }
                            };
                            d_p = if nesterov { d_p.f_add(&buf.f_mul_scalar(momentum)?)? } else { buf.shallow_clone() };
                            state.first = Some(buf);
                        }
                        let _ = p.f_sub_(&d_p.f_mul_scalar(group.lr)?)?;
                    }
                    OptimizerConfig::Adam { beta1, beta2, eps, .. } => {
                        let mut m = match state.first.take() { Some(m) => m, None => d_p.f_zeros_like()? };
                        let mut v = match state.second.take() { Some(v) => v, None => d_p.f_zeros_like()? };
                        let _ = m.f_mul_scalar_(beta1)?;
                        let _ = m.f_add_(&d_p.f_mul_scalar(1.0 - beta1)?)?;
                        let _ = v.f_mul_scalar_(beta2)?;
                        let _ = v.f_add_(&d_p.f_mul(&d_p)?.f_mul_scalar(1.0 - beta2)?)?;
                        let bias1 = 1.0 - beta1.powi(state.step as i32);
                        let bias2 = 1.0 - beta2.powi(state.step as i32);
                        let denom = v.f_sqrt()?.f_div_scalar(bias2.sqrt())?.f_add_scalar(eps)?;
                        let _ = p.f_sub_(&m.f_div(&denom)?.f_mul_scalar(group.lr / bias1)?)?;
                        state.first = Some(m);
                        state.second = Some(v);
                    }
                }
            }
        }
        Ok(())
    }

    /// The optimizer's state as named tensors (`<param>/step`, `<param>/momentum_buffer` for SGD,
    /// `<param>/exp_avg` and `<param>/exp_avg_sq` for Adam), for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let (first, second) = self.state_names();
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let s = &self.state[name];
            out.push((format!("{name}/step"), Tensor::from(s.step)));
            out.extend(s.first.as_ref().map(|t| (format!("{name}/{first}"), t.shallow_clone())));
            if let (Some(second), Some(t)) = (second, &s.second) {
                out.push((format!("{name}/{second}"), t.shallow_clone()));
            }
        }
        out
    }

    /// Restores state saved by [`Optimizer::state_tensors`]; names must belong to this optimizer's parameters.
    pub fn load_state_tensors(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let (first, second) = self.state_names();
        let known: HashMap<&str, &Tensor> =
            self.groups.iter().flat_map(|g| g.params.iter().map(|(n, t)| (n.as_str(), t))).collect();
        let mut state: HashMap<String, ParamState> = HashMap::new();
        for (key, t) in tensors {
            let Some((param, field)) = key.rsplit_once('/') else {
                return Err(Error::invalid("optimizer state", format!("'{key}' is not '<param>/<field>'")));
            };
            let Some(p) = known.get(param) else {
                return Err(Error::unknown("optimizer parameter", param, known.keys().map(|k| k.to_string())));
            };
            let entry = state.entry(param.to_string()).or_default();
            if field == "step" {
                entry.step = t.f_int64_value(&[])?;
                continue;
            }
            if t.size() != p.size() {
                return Err(Error::Shape(format!("optimizer state '{key}' is {:?}, parameter is {:?}", t.size(), p.size())));
            }
            let t = t.f_to_device(p.device())?.f_detach_copy()?;
            match field {
                f if f == first => entry.first = Some(t),
                f if Some(f) == second => entry.second = Some(t),
                other => return Err(Error::invalid("optimizer state", format!("unknown field '{other}' for {}", self.config.name()))),
            }
        }
        self.state = state;
        Ok(())
    }

    /// Names of the per-parameter state tensors, as in PyTorch's optimizer `state_dict`.
    fn state_names(&self) -> (&'static str, Option<&'static str>) {
        match self.config {
            OptimizerConfig::Sgd { .. } => ("momentum_buffer", None),
            OptimizerConfig::Adam { .. } => ("exp_avg", Some("exp_avg_sq")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn param(values: &[f64]) -> Tensor {
        Tensor::from_slice(values).to_kind(Kind::Double).set_requires_grad(true)
    }

    /// Gradient of sum(c * p) is c.
    fn backward(p: &Tensor, c: &[f64]) {
        (p * Tensor::from_slice(c).to_kind(Kind::Double)).sum(Kind::Double).backward();
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t).unwrap()
    }

    #[test]
    fn sgd_momentum_weight_decay_matches_pytorch_rule() {
        let p = param(&[1.0, -2.0]);
        let mut opt = Optimizer::new(OptimizerConfig::sgd(0.9, 0.1), vec![("w".into(), p.shallow_clone())], 0.5).unwrap();
        backward(&p, &[1.0, 3.0]);
        opt.step().unwrap();
        // d = g + 0.1 p = [1.1, 2.8]; buf = d; p -= 0.5 d → [0.45, -3.4]
        let v = values(&p);
        assert!((v[0] - 0.45).abs() < 1e-12 && (v[1] + 3.4).abs() < 1e-12, "{v:?}");
        opt.zero_grad();
        backward(&p, &[1.0, 3.0]);
        opt.step().unwrap();
        // d = [1.045, 2.66]; buf = 0.9 [1.1, 2.8] + d = [2.035, 5.18]; p -= 0.5 buf → [-0.5675, -5.99]
        let v = values(&p);
        assert!((v[0] + 0.5675).abs() < 1e-12 && (v[1] + 5.99).abs() < 1e-12, "{v:?}");
    }

    #[test]
    fn adam_first_steps_match_pytorch_rule() {
        let p = param(&[1.0]);
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.0), vec![("w".into(), p.shallow_clone())], 0.1).unwrap();
        backward(&p, &[2.0]);
        opt.step().unwrap();
        // Step 1: m̂ = g, v̂ = g², update = lr·g/(|g| + eps) ≈ 0.1
        assert!((values(&p)[0] - (1.0 - 0.1 * 2.0 / (2.0 + 1e-8))).abs() < 1e-12);
        opt.zero_grad();
        backward(&p, &[-1.0]);
        opt.step().unwrap();
        let (m, v) = (0.9 * 0.1 * 2.0 + -0.1, 0.999 * 0.001 * 4.0 + 0.001 * 1.0);
        let (m_hat, v_hat) = (m / (1.0 - 0.81), v / (1.0 - 0.999f64.powi(2)));
        let expected = 1.0 - 0.1 * 2.0 / (2.0 + 1e-8) - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((values(&p)[0] - expected).abs() < 1e-9, "{} vs {expected}", values(&p)[0]);
    }

    #[test]
    fn state_roundtrip_continues_identically() {
        let run = |split: bool| {
            let p = param(&[1.0, 2.0]);
            let mut opt = Optimizer::new(OptimizerConfig::sgd(0.9, 0.0), vec![("w".into(), p.shallow_clone())], 0.1).unwrap();
            for i in 0..4 {
                if split && i == 2 {
                    let saved = opt.state_tensors();
                    opt = Optimizer::new(OptimizerConfig::sgd(0.9, 0.0), vec![("w".into(), p.shallow_clone())], 0.1).unwrap();
                    opt.load_state_tensors(&saved).unwrap();
                }
                opt.zero_grad();
                backward(&p, &[1.0, -1.0]);
                opt.step().unwrap();
            }
            values(&p)
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn bad_hyper_parameters_are_errors() {
        assert!(Optimizer::new(OptimizerConfig::sgd(0.9, 0.0), vec![], f64::NAN).is_err());
        assert!(Optimizer::new(OptimizerConfig::sgd(-1.0, 0.0), vec![], 0.1).is_err());
        let e = Optimizer::new(OptimizerConfig::Sgd { momentum: 0.0, dampening: 0.0, nesterov: true, weight_decay: 0.0 }, vec![], 0.1);
        assert!(e.unwrap_err().to_string().contains("Nesterov"));
    }
}
