//! Exits attached to a network by module name: Distiller's `BranchPoint` and the exit heads.
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::pass::ExitPass;
use crate::nn::{AvgPool2d, BoxModule, Flatten, Forward, Linear, Model, Module, ModuleCall, Observer, Sequential};
use crate::{Error, Result};

/// Distiller's `BranchPoint`: runs the module it replaced (`branched_module`), feeds that output to the exit
/// (`branch_net`), and returns the trunk's output. In an early-exit pass ([`forward_exits`](super::forward_exits),
/// [`evaluate`](super::evaluate)) the exit's output is handed to the pass, which may also take samples out of the
/// trunk; in a plain forward pass the exit still runs, so summaries count its cost.
#[derive(Debug)]
pub struct BranchPoint {
    branched: BoxModule,
    branch: BoxModule,
}

impl BranchPoint {
    /// `branch` attached after `branched`.
    pub fn new(branched: BoxModule, branch: BoxModule) -> Self {
        BranchPoint { branched, branch }
    }
}

impl Module for BranchPoint {
    fn type_name(&self) -> &str {
        "BranchPoint"
    }
    fn forward(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let out = ctx.call("branched_module", self.branched.as_ref(), xs)?;
        let exit = ctx.call("branch_net", self.branch.as_ref(), &out)?;
        let name = ctx.path().to_string();
        match ctx.state_mut::<ExitPass>() {
            Some(pass) => pass.at_exit(&name, exit, out),
            None => Ok(out),
        }
    }
    fn children(&self) -> Vec<(&str, &dyn Module)> {
        vec![("branched_module", self.branched.as_ref()), ("branch_net", self.branch.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(&str, &mut BoxModule)> {
        vec![("branched_module", &mut self.branched), ("branch_net", &mut self.branch)]
    }
    fn take_replaced(&mut self) -> Option<BoxModule> {
        Some(std::mem::replace(&mut self.branched, Box::new(crate::nn::Identity)))
    }
}

/// Where an exit goes and how it pools: the input to [`attach_exits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitPoint {
    /// The module after which the exit branches off (`layer1.2.relu2`).
    pub at: String,
    /// Kernel (and stride) of the average pooling before the exit's linear classifier; `None` for a module whose
    /// output is already flat (`[N, features]`).
    pub pool: Option<i64>,
}

impl ExitPoint {
    /// An exit after `at` with `pool`×`pool` average pooling, Flatten and Linear (Distiller's CIFAR exit is
    /// `ExitPoint::pooled("layer1.2.relu2", 3)`).
    pub fn pooled(at: &str, pool: i64) -> Self {
        ExitPoint { at: at.to_string(), pool: Some(pool) }
    }

    /// An exit after `at`, whose output is `[N, features]`, made of one Linear layer.
    pub fn linear(at: &str) -> Self {
        ExitPoint { at: at.to_string(), pool: None }
    }

    /// Parses `NAME` or `NAME:POOL` (the CLI's `--earlyexit-at`).
    ///
    /// ```
    /// use distill::early_exit::ExitPoint;
    /// assert_eq!(ExitPoint::parse("layer1.2.relu2:3")?, ExitPoint::pooled("layer1.2.relu2", 3));
    /// assert_eq!(ExitPoint::parse("relu1")?, ExitPoint::linear("relu1"));
    /// assert!(ExitPoint::parse("pool1:x").is_err());
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self> {
        match text.rsplit_once(':') {
            None => Ok(ExitPoint::linear(text)),
            Some((at, pool)) => match pool.parse::<i64>() {
                Ok(k) if k >= 1 => Ok(ExitPoint::pooled(at, k)),
                _ => Err(Error::invalid("exit", format!("'{text}': write NAME or NAME:POOL with POOL a kernel size ≥ 1, e.g. pool1:2"))),
            },
        }
    }
}

/// An attached exit as the model records it (and checkpoints keep it): where, the head's shape, and how many
/// thinning recipes the model had applied when the exit was attached, so a checkpoint replays both in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitSpec {
    /// The module after which the exit branches off.
    pub at: String,
    /// Average-pooling kernel, if the head pools.
    pub pool: Option<i64>,
    /// Inputs of the head's Linear layer.
    pub in_features: i64,
    /// Outputs of the head (the model's classes).
    pub classes: i64,
    /// Thinning recipes applied to the model before this exit was attached.
    pub after_thinning: usize,
}

/// Records the output shape of one module.
struct ShapeProbe {
    name: String,
    shape: Option<Vec<i64>>,
}

impl Observer for ShapeProbe {
    fn observe(&mut self, call: &ModuleCall) {
        if call.name == self.name && self.shape.is_none() {
            self.shape = Some(call.output.size());
        }
    }
}

fn probe_shape(model: &mut Model, at: &str) -> Result<Vec<i64>> {
    let probe = Arc::new(Mutex::new(ShapeProbe { name: at.to_string(), shape: None }));
    let id = model.attach_observer(probe.clone());
    let s = model.info().input_shape.clone();
    let result =
        Tensor::f_zeros([1, s[0], s[1], s[2]], (Kind::Float, model.device())).map_err(Error::from).and_then(|x| tch::no_grad(|| model.forward_t(&x, false)));
    model.detach_observer(id);
    let _ = result?;
    let shape = probe.lock().map_err(|_| Error::invalid("exit", "shape probe poisoned"))?.shape.clone();
    shape.ok_or_else(|| Error::invalid("exit", format!("module '{at}' did not run in a forward pass, so no exit can follow it")))
}

fn head(model: &Model, at: &str, pool: Option<i64>, in_features: i64, classes: i64) -> Result<Sequential> {
    let mut p = model.var_store().root();
    for part in at.split('.') {
        p = &p / part;
    }
    let p = &p / "branch_net";
    Ok(match pool {
        Some(k) => Sequential::new().push(AvgPool2d::new(k, k)).push(Flatten).push(Linear::new(&p / "2", in_features, classes, true)?),
        None => Sequential::new().push(Linear::new(&p / "0", in_features, classes, true)?),
    })
}

/// The spec of an exit at `point`, its input size found by running the model once on a zero sample.
fn resolve(model: &mut Model, point: &ExitPoint) -> Result<ExitSpec> {
    let at = crate::nn::normalize_name(&point.at);
    let module = model.module(&at)?;
    if at.is_empty() {
        return Err(Error::invalid("exit", "an exit cannot follow the whole network; name a module inside it"));
    }
    if module.type_name() == "BranchPoint" || at.split('.').any(|p| p == "branch_net" || p == "branched_module") {
        return Err(Error::invalid("exit", format!("'{at}' is an exit or inside one; name a module of the network itself")));
    }
    let shape = probe_shape(model, &at)?;
    let in_features = match (point.pool, shape.as_slice()) {
        (Some(k), [_, c, h, w]) if k <= *h && k <= *w => c * (h / k) * (w / k),
        (Some(k), [_, _, h, w]) => {
            return Err(Error::Shape(format!("exit after '{at}': pooling kernel {k} is larger than its {h}×{w} output; use a kernel of at most {}", h.min(w))))
        }
        (Some(_), s) => {
            return Err(Error::Shape(format!("exit after '{at}': pooling needs an [N, C, H, W] output, '{at}' gives {s:?}; leave the pooling out")))
        }
        (None, [_, f]) => *f,
        (None, s) => {
            return Err(Error::Shape(format!(
                "exit after '{at}': its output {s:?} is not flat; give a pooling kernel (e.g. {at}:2) so the exit pools and flattens it"
            )))
        }
    };
    Ok(ExitSpec { at, pool: point.pool, in_features, classes: model.info().num_classes, after_thinning: model.thinning_recipes().len() })
}

/// Puts an exit in place of the module `spec.at` (a [`BranchPoint`] with a fresh head); the model then records
/// the spec. Used by [`attach_exits`] and to rebuild a checkpoint's exits.
pub(crate) fn attach_spec(model: &mut Model, spec: &ExitSpec) -> Result<()> {
    let branch = head(model, &spec.at, spec.pool, spec.in_features, spec.classes)?;
    model.try_map_module(&spec.at, |old| Ok(Box::new(BranchPoint::new(old, Box::new(branch)))))?;
    model.push_early_exit(spec.clone());
    Ok(())
}

/// Attaches an exit after each named module, in the order the forward pass reaches them (Distiller's
/// `EarlyExitMgr.attach_exits`): the module is replaced by a [`BranchPoint`] (`conv1` becomes
/// `conv1.branched_module`, the exit's parameters are `conv1.branch_net.*`), and the model records where its
/// exits are. Each exit must be a cut of the network, so that samples leaving there can skip the rest: an exit
/// inside a residual block, whose input the block adds back later, is refused.
///
/// On any error the model is as it was.
///
/// ```
/// use distill::early_exit::{attach_exits, ExitPoint};
/// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
/// attach_exits(&mut model, &[ExitPoint::pooled("pool1", 2)])?;
/// assert_eq!(model.parameter("pool1.branch_net.2.weight")?.size(), [10, 6 * 7 * 7]);
/// assert!(attach_exits(&mut model, &[ExitPoint::pooled("pool9", 2)]).unwrap_err().to_string().contains("pool1"));
/// # Ok::<(), distill::Error>(())
/// ```
pub fn attach_exits(model: &mut Model, points: &[ExitPoint]) -> Result<()> {
    if points.is_empty() {
        return Err(Error::invalid("exits", "no exit given"));
    }
    let mut specs = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let spec = resolve(model, p)?;
        if specs.iter().any(|s: &ExitSpec| s.at == spec.at) || model.early_exits().iter().any(|s| s.at == spec.at) {
            return Err(Error::invalid("exits", format!("two exits after '{}' (exit {i})", spec.at)));
        }
        specs.push(spec);
    }
    let recorded = model.early_exits().len();
    let result = crate::nn::Rollback::transaction(model, |model, rollback| {
        for spec in &specs {
            attach_spec(model, spec)?;
            rollback.wrapped(&spec.at);
        }
        super::pass::order_and_check_cuts(model)
    });
    if result.is_err() {
        model.truncate_early_exits(recorded);
    }
    result
}
