//! Structure pruners: whole filters, channels, rows, columns, kernels or blocks at once.
//!
//! Ranking follows Distiller's `norms.py`: a structure's score is its L1 or L2 norm divided by its size,
//! `num_structs_to_prune` rounds the count down to whole groups and never removes every structure unless asked
//! for a fraction of exactly 1, and the structures whose score is at or below the k-th smallest are pruned.
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use super::activations::ActivationRecorder;
use super::criteria::{agp_target, check_sparsity};
use super::element::check_agp;
use super::{normalized, PruneContext, Pruner};
use crate::nn::Observer;
use crate::scheduler::{Masks, PolicySchedule};
use crate::{Error, Result};

/// How parameters are grouped into structures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupType {
    /// Output filters of a 4-D weight (rows of a 2-D one); `3D` in Distiller's YAML too.
    Filters,
    /// Input channels of a 4-D weight (columns of a 2-D one).
    Channels,
    /// Rows of a 2-D weight (for ranking pruners: its input columns, as Distiller).
    Rows,
    /// Columns of a 2-D weight.
    Cols,
    /// Single kernels `kh×kw` of a 4-D weight (`2D`).
    Kernels,
    /// Blocks of a 4-D weight given by `block_shape`.
    Blocks,
    /// The whole tensor (`4D`).
    Layer,
    /// Rows and columns together (`Rows+Cols`).
    RowsCols,
}

impl GroupType {
    /// Distiller's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            GroupType::Filters => "Filters",
            GroupType::Channels => "Channels",
            GroupType::Rows => "Rows",
            GroupType::Cols => "Cols",
            GroupType::Kernels => "2D",
            GroupType::Blocks => "Blocks",
            GroupType::Layer => "4D",
            GroupType::RowsCols => "Rows+Cols",
        }
    }

    /// Errors unless `self` is one of `allowed` (for a class named `who`).
    pub fn expect(self, who: &str, allowed: &[GroupType]) -> Result<Self> {
        if allowed.contains(&self) {
            return Ok(self);
        }
        Err(Error::invalid(
            "group_type",
            format!("{who} does not accept '{}' (valid: {})", self.as_str(), allowed.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", ")),
        ))
    }
}

impl FromStr for GroupType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "Filters" | "3D" => GroupType::Filters,
            "Channels" => GroupType::Channels,
            "Rows" => GroupType::Rows,
            "Cols" => GroupType::Cols,
            "2D" => GroupType::Kernels,
            "Blocks" => GroupType::Blocks,
            "4D" => GroupType::Layer,
            "Rows+Cols" | "Cols+Rows" => GroupType::RowsCols,
            other => return Err(Error::unknown("group type", other, ["Filters", "3D", "Channels", "Rows", "Cols", "2D", "Blocks", "4D", "Rows+Cols"])),
        })
    }
}

/// A structure-wise norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Sum of absolute values.
    L1,
    /// Euclidean norm.
    L2,
    /// Largest absolute value.
    Max,
}

/// `w` reshaped to `[structures, elements]` for structures along `dim` (0: filters/rows, 1: channels/columns).
fn structures(w: &Tensor, dim: i64) -> Result<Tensor> {
    let w = if dim == 0 { w.shallow_clone() } else { w.f_transpose(0, 1)?.f_contiguous()? };
    let n = w.size()[0];
    Ok(w.f_reshape([n, -1])?)
}

/// Norm of each row of `rows` (`[n, m]`), divided by `m` when `mean`.
fn row_norms(rows: &Tensor, norm: Norm, mean: bool) -> Result<Tensor> {
    let m = rows.size()[1] as f64;
    let v = match norm {
        Norm::L1 => rows.f_abs()?.f_sum_dim_intlist(1, false, Kind::Float)?,
        Norm::L2 => rows.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?.f_sqrt()?,
        Norm::Max => rows.f_abs()?.f_amax(1, false)?.f_to_kind(Kind::Float)?,
    };
    Ok(if mean { v.f_div_scalar(m)? } else { v })
}

/// Expands a per-structure map (`[n]`) along `dim` to `w`'s shape.
fn expand(map: &Tensor, w: &Tensor, dim: i64) -> Result<Tensor> {
    let mut shape = vec![1i64; w.dim()];
    shape[dim as usize] = map.size()[0];
    Ok(map.f_reshape(shape.as_slice())?.f_expand(w.size(), false)?.f_to_kind(w.kind())?.f_contiguous()?)
}

/// Distiller's `num_structs_to_prune`: `k = ⌊fraction·n⌋` rounded down to whole groups of `group_size`, and
/// never all `n` unless `fraction` is exactly 1. `group_size` must be at least 1.
pub fn num_structs_to_prune(n: i64, group_size: i64, fraction: f64) -> Result<i64> {
    if group_size < 1 {
        return Err(Error::invalid("group_size", format!("{group_size} must be at least 1")));
    }
    let k = (fraction * n as f64).floor() as i64;
    let k = (k / group_size) * group_size;
    Ok(if k == n && fraction != 1.0 { n - group_size } else { k })
}

/// The binary map that keeps the structures scoring above the k-th smallest score (ties at it are pruned).
fn keep_above_kth(scores: &Tensor, k: i64) -> Result<Tensor> {
    let (bottom, _) = scores.f_topk(k, 0, false, true)?;
    Ok(scores.f_gt_tensor(&bottom.f_select(0, k - 1)?)?.f_to_kind(Kind::Float)?)
}

/// The binary map that prunes exactly the `k` lowest scores.
fn prune_k_lowest(scores: &Tensor, k: i64) -> Result<Tensor> {
    let order = scores.f_argsort(0, false)?;
    let map = scores.f_ones_like()?.f_to_kind(Kind::Float)?;
    Ok(map.f_index_fill(0, &order.f_narrow(0, 0, k)?, 0.0)?)
}

/// Distiller's `group_threshold_mask`: keeps the structures whose norm (divided by the structure size for the
/// `Mean_*` criteria) exceeds `threshold`.
pub fn group_threshold_mask(w: &Tensor, group: GroupType, threshold: f64, criterion: &str) -> Result<Tensor> {
    let (norm, mean) = parse_criterion(criterion)?;
    let keep = |rows: &Tensor| -> Result<Tensor> { Ok(row_norms(rows, norm, mean)?.f_gt(threshold)?.f_to_kind(Kind::Float)?) };
    let size = w.size();
    match (group, size.len()) {
        // Distiller has no 4D case here (it crashes); the whole tensor is kept or removed, SSL's layer removal.
        (GroupType::Layer, _) => Ok(w.f_ones_like()?.f_mul(&keep(&w.f_reshape([1, -1])?)?.f_reshape([])?)?),
        (GroupType::RowsCols, 2) => {
            Ok(group_threshold_mask(w, GroupType::Rows, threshold, criterion)?.f_mul(&group_threshold_mask(w, GroupType::Cols, threshold, criterion)?)?)
        }
        (GroupType::Kernels, 4) => {
            let map = keep(&w.f_reshape([size[0] * size[1], -1])?)?;
            Ok(map.f_reshape([size[0], size[1], 1, 1])?.f_expand(size.as_slice(), false)?.f_to_kind(w.kind())?.f_contiguous()?)
        }
        (GroupType::Rows, 2) | (GroupType::Filters, 2 | 4) => expand(&keep(&structures(w, 0)?)?, w, 0),
        (GroupType::Cols, 2) | (GroupType::Channels, 2 | 4) => expand(&keep(&structures(w, 1)?)?, w, 1),
        _ => Err(Error::Shape(format!("group type '{}' does not apply to a {}-D tensor {size:?}", group.as_str(), size.len()))),
    }
}

/// A thresholding criterion's norm, and whether it is divided by the structure size (the `Mean_*` ones).
pub fn parse_criterion(criterion: &str) -> Result<(Norm, bool)> {
    Ok(match criterion {
        "Mean_Abs" | "Mean_L1" => (Norm::L1, true),
        "L1" => (Norm::L1, false),
        "Mean_L2" => (Norm::L2, true),
        "L2" => (Norm::L2, false),
        "Max" => (Norm::Max, false),
        other => return Err(Error::unknown("threshold criterion", other, ["Max", "Mean_Abs", "Mean_L1", "L1", "Mean_L2", "L2"])),
    })
}

/// How a ranked pruner scores structures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranking {
    /// Mean absolute value (L1 norm / size).
    L1,
    /// L2 norm / size.
    L2,
    /// A random order, from libtorch's generator.
    Random,
    /// Random keep/drop with probability `1 − fraction`, masks rescaled by the kept fraction (dropout-like).
    Bernoulli,
    /// `Σ grad ⊙ w` per filter; the lowest are pruned.
    Gradient,
    /// APoZ of the following ReLU; the highest are pruned.
    ActivationApoz,
    /// Mean of the following ReLU; the lowest are pruned (Distiller prunes the highest: see the README).
    ActivationMean,
}

/// Where a ranked pruner's fraction comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fraction {
    /// `desired_sparsity`.
    Fixed(f64),
    /// AGP from `initial_sparsity` to `final_sparsity`.
    Agp {
        /// Starting fraction.
        initial: f64,
        /// Final fraction.
        final_: f64,
    },
    /// Drawn uniformly from `[lo, hi]` at every call (`RandomLevelStructureParameterPruner`).
    Uniform {
        /// Lowest fraction.
        lo: f64,
        /// Highest fraction.
        hi: f64,
    },
}

impl Fraction {
    fn validate(&self) -> Result<()> {
        match *self {
            Fraction::Fixed(f) => check_sparsity("desired_sparsity", f),
            Fraction::Agp { initial, final_ } => check_agp(initial, final_),
            Fraction::Uniform { lo, hi } => {
                check_sparsity("sparsity_range", lo)?;
                check_sparsity("sparsity_range", hi)?;
                if lo > hi {
                    return Err(Error::invalid("sparsity_range", format!("[{lo}, {hi}] is not a range")));
                }
                Ok(())
            }
        }
    }

    fn at(&self, epoch: usize, s: &PolicySchedule) -> Result<f64> {
        Ok(match *self {
            Fraction::Fixed(f) => f,
            Fraction::Agp { initial, final_ } => agp_target(initial, final_, epoch, s.starting_epoch, s.ending_epoch, s.frequency)?,
            Fraction::Uniform { lo, hi } => lo + (hi - lo) * Tensor::f_rand([1], (Kind::Double, tch::Device::Cpu))?.f_double_value(&[0])?,
        })
    }
}

/// The ranked structure pruners: `L1RankedStructureParameterPruner`, `L2…`, their `_AGP` versions,
/// `RandomLevelStructureParameterPruner`, `RandomRankedFilterPruner`, `BernoulliFilterPruner`,
/// `GradientRankedFilterPruner`, `ActivationAPoZRankedFilterPruner`, `ActivationMeanRankedFilterPruner` and the
/// `_AGP` versions of the last five. With `group_dependency: Leader`, the first listed tensor's structure map
/// is computed and applied to every listed tensor, so they all lose the same structures.
#[derive(Debug)]
pub struct RankedStructurePruner {
    class: &'static str,
    name: String,
    group: GroupType,
    ranking: Ranking,
    fraction: Fraction,
    weights: Vec<String>,
    leader: bool,
    block_shape: Option<[i64; 4]>,
    group_size: i64,
    noise: f64,
    leader_map: Option<(f64, Tensor)>,
    activations: Option<Arc<Mutex<ActivationRecorder>>>,
}

/// Options of a [`RankedStructurePruner`] besides its class, name, ranking and fraction.
#[derive(Debug, Clone, Default)]
pub struct RankedOptions {
    /// `group_dependency: Leader`.
    pub leader: bool,
    /// `kwargs: {block_shape: [r, d, 1, 1]}` for `Blocks`.
    pub block_shape: Option<Vec<i64>>,
    /// Structures per group (`group_size`, default 1).
    pub group_size: Option<i64>,
    /// Probability of multiplying the scores by Gaussian noise (ε-greedy ranking).
    pub noise: f64,
}

impl RankedStructurePruner {
    /// Builds and checks a ranked pruner.
    pub fn new(class: &'static str, name: &str, group: GroupType, ranking: Ranking, fraction: Fraction, weights: &[String], options: RankedOptions) -> Result<Self> {
        fraction.validate()?;
        if weights.is_empty() {
            return Err(Error::invalid("weights", format!("{class} needs at least one parameter name")));
        }
        let filters_only = !matches!(ranking, Ranking::L1 | Ranking::L2);
        let allowed: &[GroupType] =
            if filters_only { &[GroupType::Filters] } else { &[GroupType::Filters, GroupType::Channels, GroupType::Rows, GroupType::Blocks] };
        group.expect(class, allowed)?;
        let block_shape = match (&options.block_shape, group) {
            (Some(b), GroupType::Blocks) => match b.as_slice() {
                [r, d, 1, 1] if *r > 0 && *d > 0 => Some([*r, *d, 1, 1]),
                _ => return Err(Error::invalid("block_shape", format!("{b:?} must be [repetitions, depth, 1, 1] with positive entries"))),
            },
            (None, GroupType::Blocks) => return Err(Error::invalid("kwargs", "group_type Blocks needs kwargs: {block_shape: [r, d, 1, 1]}")),
            (Some(_), _) => return Err(Error::invalid("kwargs", "block_shape only applies to group_type Blocks")),
            (None, _) => None,
        };
        let group_size = options.group_size.unwrap_or(1);
        if group_size < 1 {
            return Err(Error::invalid("group_size", format!("{group_size} must be at least 1")));
        }
        if !(0.0..=1.0).contains(&options.noise) {
            return Err(Error::invalid("noise", format!("{} must lie in [0, 1]", options.noise)));
        }
        let activations = matches!(ranking, Ranking::ActivationApoz | Ranking::ActivationMean).then(|| Arc::new(Mutex::new(ActivationRecorder::default())));
        Ok(RankedStructurePruner {
            class,
            name: name.into(),
            group,
            ranking,
            fraction,
            weights: normalized(weights),
            leader: options.leader,
            block_shape,
            group_size,
            noise: options.noise,
            leader_map: None,
            activations,
        })
    }

    /// The activation recorder this pruner reads, to be attached to the model as an observer.
    pub fn activation_recorder(&self) -> Option<Arc<Mutex<dyn Observer>>> {
        self.activations.as_ref().map(|a| a.clone() as Arc<Mutex<dyn Observer>>)
    }

    fn dim(&self) -> i64 {
        match self.group {
            GroupType::Filters => 0,
            _ => 1,
        }
    }

    /// The per-structure keep map of `w` for `fraction`, or `None` when nothing is to be pruned (yet).
    fn structure_map(&self, w: &Tensor, name: &str, fraction: f64) -> Result<Option<Tensor>> {
        let rows = structures(w, self.dim())?;
        let n = rows.size()[0];
        if self.ranking == Ranking::Bernoulli {
            let probs = Tensor::f_full([n], 1.0 - fraction, (Kind::Float, w.device()))?;
            return Ok(Some(probs.f_bernoulli()?));
        }
        let k = num_structs_to_prune(n, self.group_size, fraction)?;
        if k <= 0 {
            return Ok(None);
        }
        let scores = match self.ranking {
            Ranking::L1 | Ranking::L2 => {
                let norm = if self.ranking == Ranking::L1 { Norm::L1 } else { Norm::L2 };
                let mut mags = row_norms(&rows, norm, true)?;
                if self.noise > 0.0 && Tensor::f_rand([1], (Kind::Float, tch::Device::Cpu))?.f_double_value(&[0])? < self.noise {
                    mags = mags.f_mul(&mags.f_randn_like()?)?;
                }
                return Ok(Some(keep_above_kth(&mags, k)?));
            }
            Ranking::Random => Tensor::f_rand([n], (Kind::Float, w.device()))?,
            Ranking::Gradient => {
                let grad = w.grad();
                if !grad.defined() {
                    return Ok(None);
                }
                structures(&w.f_mul(&grad)?, 0)?.f_sum_dim_intlist(1, false, Kind::Float)?
            }
            Ranking::ActivationApoz | Ranking::ActivationMean => {
                let Some(rec) = &self.activations else { return Ok(None) };
                let rec = rec.lock().map_err(|_| Error::invalid("activation statistics", "the recorder panicked earlier"))?;
                let module = name.strip_suffix(".weight").unwrap_or(name);
                let Some(act) = rec.following_activation(module, n) else { return Ok(None) };
                match self.ranking {
                    // High APoZ = mostly-zero output = prune: rank by the negated APoZ.
                    Ranking::ActivationApoz => match rec.apoz(act) { Some(a) => a.f_neg()?, None => return Ok(None) },
                    _ => match rec.mean(act) { Some(m) => m, None => return Ok(None) },
                }
            }
            Ranking::Bernoulli => unreachable!("handled above"),
        };
        Ok(Some(prune_k_lowest(&scores.f_to_device(tch::Device::Cpu)?, k)?.f_to_device(w.device())?))
    }

    fn block_mask(&self, w: &Tensor, fraction: f64) -> Result<Option<Tensor>> {
        let [r, d, _, _] = self.block_shape.unwrap_or([1, 1, 1, 1]);
        let size = w.size();
        if size.len() != 4 {
            return Err(Error::Shape(format!("Blocks pruning needs a 4-D weight, got {size:?}")));
        }
        let (f, c, k) = (size[0], size[1], size[2] * size[3]);
        let view = if d > 1 {
            if (f * c) % (r * d) != 0 {
                return Err(Error::Shape(format!("block_shape [{r}, {d}, 1, 1] does not tile {size:?}")));
            }
            [f * c / (r * d), r * d, k]
        } else {
            if f % r != 0 {
                return Err(Error::Shape(format!("block_shape [{r}, {d}, 1, 1] does not tile {size:?}")));
            }
            [f / r, r, c * k]
        };
        let mags = w.f_reshape(view)?.f_abs()?.f_sum_dim_intlist(1, true, Kind::Float)?;
        let flat = mags.f_flatten(0, -1)?;
        let n = flat.size()[0];
        let k_prune = (fraction * n as f64).floor() as i64;
        if k_prune == 0 {
            return Ok(None);
        }
        let keep = keep_above_kth(&flat, k_prune)?.f_reshape(mags.size().as_slice())?;
        Ok(Some(keep.f_expand(view, false)?.f_reshape(size.as_slice())?.f_to_kind(w.kind())?.f_contiguous()?))
    }
}

impl Pruner for RankedStructurePruner {
    fn class_name(&self) -> &'static str {
        self.class
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.weights.iter().any(|w| w == param_name)
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, ctx: &PruneContext) -> Result<()> {
        let fraction = self.fraction.at(ctx.epoch, ctx.schedule)?;
        if fraction == 0.0 {
            return Ok(());
        }
        if self.group == GroupType::Blocks {
            if let Some(mask) = self.block_mask(param, fraction)? {
                masks.set_mask(name, mask, &param.size())?;
            }
            return Ok(());
        }
        let map = if self.leader {
            let fresh = self.leader_map.as_ref().is_some_and(|(f, _)| *f == fraction);
            if !fresh {
                let leader = &self.weights[0];
                let w = ctx.model.parameter(leader)?;
                match self.structure_map(&w, leader, fraction)? {
                    Some(map) => self.leader_map = Some((fraction, map)),
                    None => return Ok(()),
                }
            }
            let (_, map) = self.leader_map.as_ref().expect("set above");
            let n = structures(param, self.dim())?.size()[0];
            if map.size()[0] != n {
                return Err(Error::Shape(format!(
                    "group_dependency Leader: '{name}' has {n} structures, its leader '{}' has {}",
                    self.weights[0],
                    map.size()[0]
                )));
            }
            map.shallow_clone()
        } else {
            match self.structure_map(param, name, fraction)? {
                Some(map) => map,
                None => return Ok(()),
            }
        };
        let mut mask = expand(&map, param, self.dim())?;
        if self.ranking == Ranking::Bernoulli {
            let kept = map.f_mean(Kind::Float)?.f_double_value(&[])?;
            mask = if kept > 0.0 { mask.f_div_scalar(kept)? } else { mask };
        }
        masks.set_mask(name, mask, &param.size())
    }
    fn target_sparsity(&self, param_name: &str, epoch: usize, s: &PolicySchedule) -> Option<f64> {
        if !self.prunes(param_name) {
            return None;
        }
        match self.fraction {
            Fraction::Uniform { .. } => None,
            f => f.at(epoch, s).ok(),
        }
    }
    fn observer(&self) -> Option<Arc<Mutex<dyn Observer>>> {
        self.activation_recorder()
    }
    fn masks_computed(&mut self) {
        if let Some(rec) = &self.activations {
            if let Ok(mut r) = rec.lock() {
                r.reset();
            }
        }
    }
}

/// `StructureParameterPruner`: keeps the structures whose norm exceeds a per-parameter threshold
/// (`reg_regims: {param: [threshold, group_type]}`, `threshold_criteria: Max | Mean_Abs`).
#[derive(Debug)]
pub struct StructureParameterPruner {
    name: String,
    regims: Vec<(String, f64, GroupType)>,
    criterion: String,
}

impl StructureParameterPruner {
    /// Thresholds ≥ 0; the criterion is checked when masks are computed.
    pub fn new(name: &str, regims: Vec<(String, f64, GroupType)>, criterion: &str) -> Result<Self> {
        parse_criterion(criterion)?;
        for (_, t, g) in &regims {
            if !(t.is_finite() && *t >= 0.0) {
                return Err(Error::invalid("reg_regims", format!("threshold {t} must be >= 0")));
            }
            g.expect("StructureParameterPruner", &[GroupType::Kernels, GroupType::Rows, GroupType::Cols, GroupType::Filters, GroupType::Channels])?;
        }
        let regims = regims.into_iter().map(|(n, t, g)| (crate::nn::normalize_name(&n), t, g)).collect();
        Ok(StructureParameterPruner { name: name.into(), regims, criterion: criterion.into() })
    }
}

impl Pruner for StructureParameterPruner {
    fn class_name(&self) -> &'static str {
        "StructureParameterPruner"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prunes(&self, param_name: &str) -> bool {
        self.regims.iter().any(|(n, ..)| n == param_name)
    }
    fn set_param_mask(&mut self, param: &Tensor, name: &str, masks: &mut Masks, _: &PruneContext) -> Result<()> {
        let Some((_, t, g)) = self.regims.iter().find(|(n, ..)| n == name) else { return Ok(()) };
        let mask = group_threshold_mask(param, *g, *t, &self.criterion)?;
        masks.set_mask(name, mask, &param.size())
    }
}

/// The L1-ranked mask that prunes `fraction` of `w`'s filters (`GroupType::Filters`) or input channels
/// (`GroupType::Channels`), as `L1RankedStructureParameterPruner` computes it; `None` when the fraction rounds
/// to no structure.
pub fn l1_structure_mask(w: &Tensor, group: GroupType, fraction: f64) -> Result<Option<Tensor>> {
    let dim = match group {
        GroupType::Filters => 0,
        GroupType::Channels => 1,
        other => return Err(Error::invalid("group", format!("L1 structure masks are for Filters or Channels, not {}", other.as_str()))),
    };
    if w.dim() < 2 {
        return Err(Error::Shape(format!("structure pruning needs a 2-D or 4-D weight, got {:?}", w.size())));
    }
    if !(0.0..=1.0).contains(&fraction) {
        return Err(Error::invalid("fraction", format!("{fraction} must lie in [0, 1]")));
    }
    let rows = structures(w, dim)?;
    let k = num_structs_to_prune(rows.size()[0], 1, fraction)?;
    if k <= 0 {
        return Ok(None);
    }
    let map = keep_above_kth(&row_norms(&rows, Norm::L1, true)?, k)?;
    Ok(Some(expand(&map, w, dim)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    #[test]
    fn num_structs_matches_distiller() {
        assert_eq!(num_structs_to_prune(16, 1, 0.5).unwrap(), 8);
        assert_eq!(num_structs_to_prune(16, 1, 0.99).unwrap(), 15);
        assert_eq!(num_structs_to_prune(16, 4, 0.3).unwrap(), 4);
        assert_eq!(num_structs_to_prune(16, 1, 0.03).unwrap(), 0);
        assert_eq!(num_structs_to_prune(4, 1, 1.0).unwrap(), 4);
        assert!(num_structs_to_prune(4, 0, 0.5).is_err());
        let w = Tensor::ones([4, 2, 1, 1], (Kind::Float, tch::Device::Cpu));
        for bad in [f64::NAN, -0.1, 1.5] {
            assert!(l1_structure_mask(&w, GroupType::Filters, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn l1_filter_ranking_prunes_smallest_mean_abs() {
        // 4 filters of 2 elements: mean |w| = 1.5, 0.5, 3.0, 0.75
        let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 0.5, 3.0, 3.0, -0.5, 1.0]).reshape([4, 2, 1, 1]);
        let rows = structures(&w, 0).unwrap();
        assert_eq!(vals(&row_norms(&rows, Norm::L1, true).unwrap()), [1.5, 0.5, 3.0, 0.75]);
        assert_eq!(vals(&keep_above_kth(&row_norms(&rows, Norm::L1, true).unwrap(), 2).unwrap()), [1.0, 0.0, 1.0, 0.0]);
        // Channels: 2 channels; column means |w| over 4 filters: (1+0.5+3+0.5)/4 = 1.25, (2+0.5+3+1)/4 = 1.625
        assert_eq!(vals(&row_norms(&structures(&w, 1).unwrap(), Norm::L1, true).unwrap()), [1.25, 1.625]);
    }

    #[test]
    fn group_threshold_mask_by_criterion() {
        let w = Tensor::from_slice(&[1.0f32, 1.0, 0.1, 0.1, 2.0, 0.0]).reshape([3, 2]);
        // Rows: mean |w| = 1.0, 0.1, 1.0; threshold 0.5 keeps rows 0 and 2.
        assert_eq!(vals(&group_threshold_mask(&w, GroupType::Rows, 0.5, "Mean_Abs").unwrap()), [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
        // Cols with Max: max |w| per column = 2.0, 1.0; threshold 1.0 keeps column 0 only.
        assert_eq!(vals(&group_threshold_mask(&w, GroupType::Cols, 1.0, "Max").unwrap()), [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert!(group_threshold_mask(&w, GroupType::Rows, 0.5, "Median").is_err());
        // Mean_* divides a structure's norm by the structure's own length (README, "differs on purpose"): a row of
        // this 3×2 weight by 2 columns, a column by 3 rows. Distiller divides a row by the number of rows (3) and a
        // column by the number of columns (2), which here would prune row 0 (1.2/3 = 0.4) and keep column 1
        // (1.8/2 = 0.9).
        let w = Tensor::from_slice(&[0.6f32, 0.6, 0.0, 0.6, 0.0, 0.6]).reshape([3, 2]);
        assert_eq!(vals(&group_threshold_mask(&w, GroupType::Rows, 0.5, "Mean_Abs").unwrap()), [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(vals(&group_threshold_mask(&w, GroupType::Cols, 0.65, "Mean_L1").unwrap()), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(vals(&group_threshold_mask(&w, GroupType::Cols, 0.55, "Mean_L1").unwrap()), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert!(group_threshold_mask(&w, GroupType::Kernels, 0.5, "Max").is_err());
    }

    #[test]
    fn blocks_of_depth_prune_whole_blocks() {
        let pruner = RankedStructurePruner::new(
            "L1RankedStructureParameterPruner", "b", GroupType::Blocks, Ranking::L1, Fraction::Fixed(0.5), &["w".into()],
            RankedOptions { block_shape: Some(vec![1, 2, 1, 1]), ..Default::default() },
        )
        .unwrap();
        // 2 filters × 2 channels × 1×1; blocks pair consecutive (filter, channel) entries: |0.1|+|0.2| < |1|+|2|.
        let w = Tensor::from_slice(&[0.1f32, 0.2, 1.0, 2.0]).reshape([2, 2, 1, 1]);
        assert_eq!(vals(&pruner.block_mask(&w, 0.5).unwrap().unwrap()), [0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn ranked_pruner_checks_its_options() {
        let w = ["w".to_string()];
        let new = |g, r, o| RankedStructurePruner::new("X", "x", g, r, Fraction::Fixed(0.5), &w, o);
        assert!(new(GroupType::Channels, Ranking::Random, RankedOptions::default()).is_err());
        assert!(new(GroupType::Blocks, Ranking::L1, RankedOptions::default()).unwrap_err().to_string().contains("block_shape"));
        assert!(new(GroupType::Filters, Ranking::L1, RankedOptions { group_size: Some(0), ..Default::default() }).is_err());
        assert!(RankedStructurePruner::new("X", "x", GroupType::Filters, Ranking::L1, Fraction::Fixed(1.2), &w, RankedOptions::default()).is_err());
    }
}
