use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::{normalize_name, BoxModule, Forward, MemoryFormat, Module, Observer, ObserverId, SharedObserver};
use crate::early_exit::ExitSpec;
use crate::factorization::FactorizationSpec;
use crate::thinning::ThinningRecipe;
use crate::{Error, Result};

/// What a model is for: its architecture name, dataset, input shape and classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Architecture name, as in the model zoo (`resnet20_cifar`).
    pub arch: String,
    /// Dataset name (`mnist`, `cifar10`).
    pub dataset: String,
    /// Shape of one input sample, `[C, H, W]`.
    pub input_shape: Vec<i64>,
    /// Number of output classes.
    pub num_classes: i64,
}

impl ModelInfo {
    /// Describes a model.
    pub fn new(arch: &str, dataset: &str, input_shape: impl Into<Vec<i64>>, num_classes: i64) -> Self {
        ModelInfo { arch: arch.into(), dataset: dataset.into(), input_shape: input_shape.into(), num_classes }
    }
}

/// One entry of [`Model::named_modules`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Dotted name; the root is `""`, as in PyTorch.
    pub name: String,
    /// PyTorch class name.
    pub type_name: String,
    /// Whether the module has no children.
    pub is_leaf: bool,
}

/// A network: the module tree, the `VarStore` holding its parameters, its mode and its observers.
pub struct Model {
    vs: VarStore,
    root: BoxModule,
    info: ModelInfo,
    training: bool,
    observers: Vec<SharedObserver>,
    next_observer_id: u64,
    thinning: Vec<ThinningRecipe>,
    exits: Vec<ExitSpec>,
    factorizations: Vec<FactorizationSpec>,
    /// Set by [`Model::to_kind`]: the kind floating-point inputs are converted to on the way in.
    input_kind: Option<Kind>,
    /// Set by [`Model::to_memory_format`]: the layout of 4-D tensors, inputs included.
    memory_format: MemoryFormat,
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

fn visit<'m>(module: &'m dyn Module, prefix: &str, f: &mut dyn FnMut(&str, &'m dyn Module)) {
    f(prefix, module);
    for (name, child) in module.children() {
        visit(child, &join(prefix, name), f);
    }
}

/// Replaces the module in `slot` by `f(old)`; when `f` fails it hands the old module back, which goes back.
fn try_map_slot(slot: &mut BoxModule, f: impl FnOnce(BoxModule) -> std::result::Result<BoxModule, (BoxModule, Error)>) -> Result<()> {
    let old = std::mem::replace(slot, Box::new(super::Identity));
    match f(old) {
        Ok(new) => {
            *slot = new;
            Ok(())
        }
        Err((old, e)) => {
            *slot = old;
            Err(e)
        }
    }
}

fn find_slot<'m>(children: Vec<(&str, &'m mut BoxModule)>, parts: &[&str]) -> Option<&'m mut BoxModule> {
    let (first, rest) = parts.split_first()?;
    let slot = children.into_iter().find(|(n, _)| n == first).map(|(_, m)| m)?;
    if rest.is_empty() {
        Some(slot)
    } else {
        find_slot(slot.children_mut(), rest)
    }
}

impl Model {
    /// Wraps a module tree whose parameters live in `vs`.
    ///
    /// Checks that child names are non-empty, dot-free and unique among siblings, and that the tree's parameter
    /// and buffer names are exactly the `VarStore`'s, so checkpoints, optimizers and schedules all agree.
    pub fn new(vs: VarStore, root: impl Module, info: ModelInfo) -> Result<Model> {
        let model = Model { vs, root: Box::new(root), info, training: true, observers: Vec::new(), next_observer_id: 0, thinning: Vec::new(), exits: Vec::new(), factorizations: Vec::new(), input_kind: None, memory_format: MemoryFormat::Contiguous };
        model.check_tree()?;
        Ok(model)
    }

    fn check_tree(&self) -> Result<()> {
        let mut problem = None;
        visit(self.root.as_ref(), "", &mut |prefix, m| {
            let mut seen = HashSet::new();
            for (name, _) in m.children() {
                if name.is_empty() || name.contains('.') || !seen.insert(name) {
                    problem.get_or_insert_with(|| {
                        format!("child '{name}' of '{prefix}' must be non-empty, contain no '.', and be unique")
                    });
                }
            }
        });
        if let Some(p) = problem {
            return Err(Error::invalid("module tree", p));
        }
        let store = self.vs.variables();
        let tree = self.state_dict();
        for (name, t) in &tree {
            match store.get(name) {
                Some(v) if v.data_ptr() == t.data_ptr() => {}
                Some(_) => {
                    return Err(Error::invalid(
                        "module tree",
                        format!("'{name}' in the tree is not the VarStore variable of that name"),
                    ))
                }
                None => {
                    return Err(Error::invalid(
                        "module tree",
                        format!("'{name}' is not in the VarStore: create it through the path of its module"),
                    ))
                }
            }
        }
        let tree_names: HashSet<&str> = tree.iter().map(|(n, _)| n.as_str()).collect();
        let mut orphans: Vec<&String> = store.keys().filter(|k| !tree_names.contains(k.as_str())).collect();
        orphans.sort();
        if let Some(orphan) = orphans.first() {
            return Err(Error::invalid(
                "module tree",
                format!("VarStore variable '{orphan}' belongs to no module of the tree ({} such)", orphans.len()),
            ));
        }
        Ok(())
    }

    /// Architecture, dataset, input shape and classes.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The `VarStore` holding every parameter and buffer (for tch optimizers and tch's own I/O).
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// Mutable access to the `VarStore`, e.g. to create parameters for a replacement module.
    pub fn var_store_mut(&mut self) -> &mut VarStore {
        &mut self.vs
    }

    /// The device the parameters are on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Moves every parameter and buffer to `device` (in place, so existing tensor handles follow).
    pub fn to_device(&mut self, device: Device) {
        self.vs.set_device(device);
    }

    /// Switches to training mode (dropout on, batch-norm statistics updated).
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Switches to evaluation mode.
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether the model is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Forward pass in the current mode.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, self.training)
    }

    /// Forward pass in train (`true`) or eval mode, whatever the current mode.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.converted_input(xs)?;
        Forward::new(train, &self.observers).run(self.root.as_ref(), &[&xs])
    }

    /// Converts every floating-point parameter and buffer to `kind` (`Kind::Double` for numerical checks,
    /// `Kind::Float` back), and from then on converts floating-point inputs to it on the way in, so the datasets'
    /// float32 images go in as they are. Any other kind is an error.
    ///
    /// ```
    /// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
    /// model.to_kind(tch::Kind::Double)?;
    /// let x = tch::Tensor::zeros([2, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
    /// assert_eq!(model.forward(&x)?.kind(), tch::Kind::Double);
    /// assert!(model.to_kind(tch::Kind::Int64).is_err());
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn to_kind(&mut self, kind: Kind) -> Result<()> {
        match kind {
            Kind::Double => self.vs.double(),
            Kind::Float => self.vs.float(),
            Kind::Half => self.vs.half(),
            Kind::BFloat16 => self.vs.bfloat16(),
            other => return Err(Error::invalid("kind", format!("{other:?} is not a floating-point kind a model can compute in (Float, Double, Half or BFloat16)"))),
        }
        // Modules that keep a host-side copy of a buffer drop it: the buffer's kind changed.
        self.for_each_module(|_, m| m.buffers_loaded());
        self.input_kind = Some(kind);
        Ok(())
    }

    /// Lays out every 4-D parameter and buffer (convolution weights) in `format`, and from then on 4-D inputs too
    /// on the way in, so that the forward and backward passes stay in it. `MemoryFormat::ChannelsLast` spares
    /// libtorch's CPU convolutions a reorder of their input and output at every call (see [`super::layout`] for
    /// figures); values do not change, convolutions may round differently. Thinning and the optimizer's in-place
    /// updates keep the layout; [`copy_model`](crate::models::copy_model) copies it; a checkpoint stores values,
    /// not layout (call this again after loading).
    ///
    /// ```
    /// use distill::nn::MemoryFormat;
    /// let mut model = distill::models::create_model("resnet20_cifar", "cifar10", tch::Device::Cpu)?;
    /// let x = tch::Tensor::randn([2, 3, 32, 32], (tch::Kind::Float, tch::Device::Cpu));
    /// let before = model.forward_t(&x, false)?;
    /// model.to_memory_format(MemoryFormat::ChannelsLast)?;
    /// assert_eq!(MemoryFormat::of(&model.parameter("layer1.0.conv1.weight")?), MemoryFormat::ChannelsLast);
    /// let after = model.forward_t(&x, false)?;
    /// assert!(after.allclose(&before, 1e-4, 1e-5, false));
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn to_memory_format(&mut self, format: MemoryFormat) -> Result<()> {
        let mut relaid = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (_, t) in self.state_dict() {
                let new = format.apply(&t)?;
                if new.data_ptr() != t.data_ptr() {
                    relaid.push((t, new));
                }
            }
            Ok(())
        })?;
        for (mut old, new) in relaid {
            old.set_data(&new);
        }
        self.memory_format = format;
        Ok(())
    }

    /// The layout set by [`Model::to_memory_format`] (`Contiguous` unless set).
    pub fn memory_format(&self) -> MemoryFormat {
        self.memory_format
    }

    /// `xs` converted to the kind set by [`Model::to_kind`], when it is floating point and of another kind, and
    /// laid out as [`Model::to_memory_format`] says.
    fn converted_input(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match self.input_kind {
            Some(kind) if xs.is_floating_point() && xs.kind() != kind => xs.f_to_kind(kind)?,
            _ => xs.shallow_clone(),
        };
        match self.memory_format {
            MemoryFormat::ChannelsLast => self.memory_format.apply(&xs),
            MemoryFormat::Contiguous => Ok(xs),
        }
    }

    /// A forward-pass context that notifies this model's observers, for a pass that carries a state of its own
    /// ([`Forward::with_state`]); run it with [`Model::forward_with`].
    pub fn pass(&self, train: bool) -> Forward<'_> {
        Forward::new(train, &self.observers)
    }

    /// Runs the tree on `xs` in the context `ctx` (from [`Model::pass`]), converting a floating-point input as
    /// [`Model::forward_t`] does.
    pub fn forward_with(&self, xs: &Tensor, ctx: &mut Forward) -> Result<Tensor> {
        let xs = self.converted_input(xs)?;
        ctx.run(self.root.as_ref(), &[&xs])
    }

    /// The root module.
    pub fn root(&self) -> &dyn Module {
        self.root.as_ref()
    }

    /// Every module with its dotted name, root first, in PyTorch's `named_modules()` order.
    pub fn named_modules(&self) -> Vec<ModuleInfo> {
        let mut out = Vec::new();
        visit(self.root.as_ref(), "", &mut |name, m| {
            out.push(ModuleInfo { name: name.to_string(), type_name: m.type_name().to_string(), is_leaf: m.children().is_empty() })
        });
        out
    }

    /// Calls `f` on every module with its dotted name and mutable access, root first.
    pub fn for_each_module_mut(&mut self, mut f: impl FnMut(&str, &mut dyn Module)) {
        fn walk(prefix: &str, m: &mut dyn Module, f: &mut dyn FnMut(&str, &mut dyn Module)) {
            f(prefix, m);
            for (name, child) in m.children_mut() {
                walk(&join(prefix, name), child.as_mut(), f);
            }
        }
        walk("", self.root.as_mut(), &mut f);
    }

    /// Calls `f` on every module with its dotted name, root first.
    pub fn for_each_module(&self, mut f: impl FnMut(&str, &dyn Module)) {
        visit(self.root.as_ref(), "", &mut |n, m| f(n, m));
    }

    fn collect(&self, which: fn(&dyn Module) -> Vec<(&str, &Tensor)>) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        visit(self.root.as_ref(), "", &mut |prefix, m| {
            out.extend(which(m).into_iter().map(|(n, t)| (join(prefix, n), t.shallow_clone())));
        });
        out
    }

    /// Parameters in registration order (`conv1.weight`, `conv1.bias`, `layer1.0.conv1.weight`, ...), as
    /// PyTorch's `named_parameters()`. The tensors share storage with the model.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.collect(|m| m.parameters())
    }

    /// Buffers in registration order (`bn1.running_mean`, ...).
    pub fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.collect(|m| m.buffers())
    }

    /// Parameters and buffers, module by module, as PyTorch's `state_dict()` (without `num_batches_tracked`).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.collect(|m| {
            let mut all = m.parameters();
            all.extend(m.buffers());
            all
        })
    }

    /// Total number of parameter elements.
    pub fn num_parameters(&self) -> i64 {
        self.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// The parameter called `name`; Distiller's `module.` prefix is accepted. Unknown names get suggestions.
    pub fn parameter(&self, name: &str) -> Result<Tensor> {
        let wanted = normalize_name(name);
        let params = self.named_parameters();
        let found = params.iter().position(|(n, _)| *n == wanted).or_else(|| params.iter().position(|(n, _)| super::canonical_param_name(n) == wanted));
        match found {
            Some(i) => Ok(params[i].1.shallow_clone()),
            None => Err(Error::unknown("parameter", name, params.into_iter().map(|(n, _)| n))),
        }
    }

    fn module_names(&self) -> Vec<String> {
        self.named_modules().into_iter().map(|m| m.name).filter(|n| !n.is_empty()).collect()
    }

    /// The module called `name` (`layer1.0.conv1`; `""` is the root).
    pub fn module(&self, name: &str) -> Result<&dyn Module> {
        let wanted = normalize_name(name);
        let mut found = None;
        visit(self.root.as_ref(), "", &mut |n, m| {
            if n == wanted && found.is_none() {
                found = Some(m);
            }
        });
        found.ok_or_else(|| Error::unknown("module", name, self.module_names()))
    }

    /// The module called `name`, mutably (`""` is the root).
    pub fn module_mut(&mut self, name: &str) -> Result<&mut dyn Module> {
        if normalize_name(name).is_empty() {
            return Ok(self.root.as_mut());
        }
        Ok(self.slot_mut(name)?.as_mut())
    }

    /// The thinning recipes applied to this model since it was built, oldest first (Distiller's
    /// `model.thinning_recipes`); replaying them on a fresh model of the same architecture gives these shapes.
    pub fn thinning_recipes(&self) -> &[ThinningRecipe] {
        &self.thinning
    }

    pub(crate) fn push_thinning_recipe(&mut self, recipe: ThinningRecipe) {
        self.thinning.push(recipe);
    }

    /// The early exits attached to this model, in the order a forward pass reaches them
    /// ([`attach_exits`](crate::early_exit::attach_exits)).
    pub fn early_exits(&self) -> &[ExitSpec] {
        &self.exits
    }

    pub(crate) fn push_early_exit(&mut self, spec: ExitSpec) {
        self.exits.push(spec);
    }

    pub(crate) fn set_early_exits(&mut self, specs: Vec<ExitSpec>) {
        self.exits = specs;
    }

    pub(crate) fn truncate_early_exits(&mut self, len: usize) {
        self.exits.truncate(len);
    }

    /// The layers factorized by truncated SVD, in the order they were
    /// ([`truncated_svd`](crate::factorization::truncated_svd)).
    pub fn factorizations(&self) -> &[FactorizationSpec] {
        &self.factorizations
    }

    pub(crate) fn push_factorization(&mut self, spec: FactorizationSpec) {
        self.factorizations.push(spec);
    }

    pub(crate) fn truncate_factorizations(&mut self, len: usize) {
        self.factorizations.truncate(len);
    }

    /// Drops variables that left the module tree (a replaced layer's) from the `VarStore`, so that moving the
    /// model to another device does not move them too.
    pub(crate) fn forget_variables(&mut self, names: &[String]) {
        let in_tree: HashSet<String> = self.state_dict().into_iter().map(|(n, _)| n).collect();
        self.retain_variables(|n| in_tree.contains(n) || !names.iter().any(|g| g == n));
    }

    /// Keeps only the `VarStore` variables whose name passes `keep`, in its named and its trainable lists.
    pub(crate) fn retain_variables(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut vars) = self.vs.variables_.lock() {
            vars.named_variables.retain(|n, _| keep(n));
            let alive: HashSet<usize> = vars.named_variables.values().map(|t| t.data_ptr() as usize).collect();
            vars.trainable_variables.retain(|v| alive.contains(&(v.tensor.data_ptr() as usize)));
        }
    }

    fn slot_mut(&mut self, name: &str) -> Result<&mut BoxModule> {
        let wanted = normalize_name(name);
        if wanted.is_empty() {
            return Err(Error::invalid("module name", "the root module cannot be replaced; build a new Model instead"));
        }
        let valid = self.module_names();
        let parts: Vec<&str> = wanted.split('.').collect();
        find_slot(self.root.children_mut(), &parts).ok_or_else(|| Error::unknown("module", name, valid))
    }

    /// Replaces the module called `name` by `module`, keeping the name, and returns the old one. Quantizers use
    /// this to swap a layer for its wrapper.
    pub fn replace_module(&mut self, name: &str, module: impl Module) -> Result<BoxModule> {
        let slot = self.slot_mut(name)?;
        Ok(std::mem::replace(slot, Box::new(module)))
    }

    /// Replaces the module called `name` by `f(old)`, e.g. a wrapper that takes the old module inside it.
    pub fn map_module(&mut self, name: &str, f: impl FnOnce(BoxModule) -> BoxModule) -> Result<()> {
        let slot = self.slot_mut(name)?;
        let old = std::mem::replace(slot, Box::new(super::Identity));
        *slot = f(old);
        Ok(())
    }

    /// Replaces the root module by `f(old)` where `f` may fail and then hands the old root back, which is put
    /// back in place. A new root that wraps the old one and lists its children keeps every name (Distiller's
    /// QAT adds `inputs_quant` to the root this way).
    pub fn try_map_root(&mut self, f: impl FnOnce(BoxModule) -> std::result::Result<BoxModule, (BoxModule, Error)>) -> Result<()> {
        try_map_slot(&mut self.root, f)
    }

    /// Puts back the module a transformation replaced at `name` (`""`: the root), as far as the module there
    /// can hand it back ([`Module::take_replaced`]); returns whether it could.
    pub fn restore_replaced(&mut self, name: &str) -> Result<bool> {
        let slot = if normalize_name(name).is_empty() { &mut self.root } else { self.slot_mut(name)? };
        match slot.take_replaced() {
            Some(original) => {
                *slot = original;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Replaces the module called `name` by `f(old)` where `f` may fail; on failure `f` hands the old module
    /// back and it is put back in place, so the model is unchanged.
    pub fn try_map_module(&mut self, name: &str, f: impl FnOnce(BoxModule) -> std::result::Result<BoxModule, (BoxModule, Error)>) -> Result<()> {
        try_map_slot(self.slot_mut(name)?, f)
    }

    /// Starts notifying `observer` of every module call; returns a handle for [`Model::detach_observer`].
    ///
    /// Keep a clone of the `Arc` to read the observer's results.
    pub fn attach_observer(&mut self, observer: Arc<Mutex<dyn Observer>>) -> ObserverId {
        let id = ObserverId(self.next_observer_id);
        self.next_observer_id += 1;
        self.observers.push((id, observer));
        id
    }

    /// Stops notifying an observer; returns whether it was attached.
    pub fn detach_observer(&mut self, id: ObserverId) -> bool {
        let before = self.observers.len();
        self.observers.retain(|(i, _)| *i != id);
        self.observers.len() != before
    }

    /// A copy of every parameter and buffer, to [`Model::restore`] later (before an experiment that changes the
    /// weights in place, such as pruning at several levels).
    ///
    /// ```
    /// let mut model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
    /// let before = model.snapshot();
    /// let _ = tch::no_grad(|| model.parameter("conv1.weight").map(|mut w| w.fill_(0.0)))?;
    /// model.restore(&before)?;
    /// assert!(model.parameter("conv1.weight")?.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0);
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.state_dict().into_iter().map(|(n, t)| (n, t.detach().copy())).collect())
    }

    /// Puts back the parameters and buffers of a [`Model::snapshot`] of this model (same names and shapes).
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<()> {
        self.load_state_dict(&snapshot.0, true)
    }

    /// Copies `tensors` (name, value) into the model's parameters and buffers.
    ///
    /// Names may carry Distiller's `module.` prefix. Every parameter and buffer of the model must be present
    /// with its shape; the error lists every missing or mismatched name with both shapes. Extra tensors are
    /// ignored when `strict` is false and rejected otherwise.
    pub fn load_state_dict(&mut self, tensors: &[(String, Tensor)], strict: bool) -> Result<()> {
        let problems = self.state_dict_problems(tensors, strict);
        if !problems.is_empty() {
            return Err(Error::Shape(format!(
                "state does not fit {} ({} problem(s)): {}",
                self.info.arch,
                problems.len(),
                problems.join("; ")
            )));
        }
        let given: HashMap<String, &Tensor> = tensors.iter().map(|(n, t)| (normalize_name(n), t)).collect();
        let copied = tch::no_grad(|| -> Result<()> {
            for (name, t) in &self.state_dict() {
                t.shallow_clone().f_copy_(given[name])?;
            }
            Ok(())
        });
        // Even after a failed copy, some buffers may hold new values.
        self.for_each_module(|_, m| m.buffers_loaded());
        copied
    }

    /// What keeps `tensors` from loading into this model, tensor by tensor (missing, shape or type mismatch, and
    /// with `strict` unexpected names); empty when they fit.
    pub(crate) fn state_dict_problems(&self, tensors: &[(String, Tensor)], strict: bool) -> Vec<String> {
        let given: HashMap<String, &Tensor> = tensors.iter().map(|(n, t)| (normalize_name(n), t)).collect();
        let own = self.state_dict();
        let mut problems = Vec::new();
        for (name, t) in &own {
            match given.get(name) {
                None => problems.push(format!("missing '{name}' {:?}", t.size())),
                Some(g) if g.size() != t.size() => {
                    problems.push(format!("'{name}': model has {:?}, given {:?}", t.size(), g.size()))
                }
                // Float widths convert (a float16 checkpoint loads into float32); a float read as integers
                // or the reverse is a corrupt or foreign file.
                Some(g) if g.is_floating_point() != t.is_floating_point() => {
                    problems.push(format!("'{name}': model has {:?} values, given {:?}", t.kind(), g.kind()))
                }
                Some(_) => {}
            }
        }
        if strict {
            let own_names: HashSet<&str> = own.iter().map(|(n, _)| n.as_str()).collect();
            let mut extra: Vec<&String> = given.keys().filter(|n| !own_names.contains(n.as_str())).collect();
            extra.sort();
            problems.extend(extra.into_iter().map(|n| format!("unexpected '{n}'")));
        }
        problems
    }

    fn fmt_module(f: &mut fmt::Formatter<'_>, m: &dyn Module, indent: usize) -> fmt::Result {
        let children = m.children();
        if children.is_empty() {
            return write!(f, "{}({})", m.type_name(), m.extra_repr());
        }
        writeln!(f, "{}(", m.type_name())?;
        for (name, child) in children {
            write!(f, "{:indent$}({name}): ", "", indent = indent + 2)?;
            Self::fmt_module(f, child, indent + 2)?;
            writeln!(f)?;
        }
        write!(f, "{:indent$})", "", indent = indent)
    }
}

/// Prints the tree as PyTorch prints a module.
impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Self::fmt_module(f, self.root.as_ref(), 0)
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("info", &self.info)
            .field("device", &self.device())
            .field("training", &self.training)
            .field("parameters", &self.num_parameters())
            .finish()
    }
}

/// Copies of a model's parameters and buffers, taken by [`Model::snapshot`].
#[derive(Debug)]
pub struct Snapshot(Vec<(String, Tensor)>);

impl Snapshot {
    /// The copied tensors by name.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.0
    }
}
