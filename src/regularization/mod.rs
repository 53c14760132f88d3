//! Regularizers and the regularization policy (Distiller's `regularization/` and `RegularizationPolicy`).
//!
//! A regularizer adds a penalty to the loss before `backward()`; with `threshold_criteria` it also zeroes the
//! structures that fall below its strength after each step, through one-shot masks that `keep_mask` makes
//! permanent at the very end of the policy.
use tch::{Kind, Tensor};

use crate::metrics::Metrics;
use crate::nn::normalize_name;
use crate::pruning::structure::{group_threshold_mask, GroupType};
use crate::scheduler::{LossComponent, Masks, Minibatch, Policy, PolicyContext, PolicyLoss};
use crate::{Error, Result};

/// Distiller's `EPSILON` inside the channel norms' square root, which keeps their gradient finite at zero.
const CHANNEL_EPSILON: f64 = 1e-8;

/// A loss penalty on some parameters, optionally with hard thresholding.
pub trait Regularizer: Send {
    /// The Distiller class name.
    fn class_name(&self) -> &'static str;
    /// The instance name from the schedule.
    fn name(&self) -> &str;
    /// The parameters it acts on, normalized.
    fn parameters(&self) -> Vec<&str>;
    /// The penalty for `param` (zero-dimensional), or `None` if it does not act on it.
    fn loss(&self, param: &Tensor, name: &str) -> Result<Option<Tensor>>;
    /// Whether `threshold_criteria` is set.
    fn thresholds(&self) -> bool {
        false
    }
    /// Sets a one-shot mask that zeroes what falls below the strength.
    fn threshold(&self, param: &Tensor, name: &str, masks: &mut Masks) -> Result<()> {
        let _ = (param, name, masks);
        Ok(())
    }
}

fn check_strength(s: f64) -> Result<()> {
    if s.is_finite() && s >= 0.0 { Ok(()) } else { Err(Error::invalid("reg_regims", format!("strength {s} must be a finite value >= 0"))) }
}

/// `L1Regularizer`: `strength · Σ|w|`; with `threshold_criteria`, weights with `|w| ≤ strength` are zeroed.
#[derive(Debug)]
pub struct L1Regularizer {
    name: String,
    regims: Vec<(String, f64)>,
    threshold: bool,
}

impl L1Regularizer {
    /// `regims`: (parameter, strength).
    pub fn new(name: &str, regims: Vec<(String, f64)>, threshold_criteria: Option<&str>) -> Result<Self> {
        regims.iter().try_for_each(|(_, s)| check_strength(*s))?;
        Ok(L1Regularizer { name: name.into(), regims: regims.into_iter().map(|(n, s)| (normalize_name(&n), s)).collect(), threshold: threshold_criteria.is_some() })
    }
}

impl Regularizer for L1Regularizer {
    fn class_name(&self) -> &'static str {
        "L1Regularizer"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn parameters(&self) -> Vec<&str> {
        self.regims.iter().map(|(n, _)| n.as_str()).collect()
    }
    fn loss(&self, param: &Tensor, name: &str) -> Result<Option<Tensor>> {
        let Some((_, s)) = self.regims.iter().find(|(n, _)| n == name) else { return Ok(None) };
        Ok(Some(param.f_abs()?.f_sum(Kind::Float)?.f_mul_scalar(*s)?))
    }
    fn thresholds(&self) -> bool {
        self.threshold
    }
    fn threshold(&self, param: &Tensor, name: &str, masks: &mut Masks) -> Result<()> {
        let Some((_, s)) = self.regims.iter().find(|(n, _)| n == name) else { return Ok(()) };
        let mask = crate::pruning::criteria::threshold_mask(param, *s)?;
        masks.set_mask(name, mask, &param.size())?;
        masks.get_mut(name)?.is_regularization_mask = true;
        Ok(())
    }
}

/// L2 norm of each row of `rows` (`[n, m]`). libtorch's norm has a zero (not NaN) gradient at a zero row,
/// which matters once thresholding has removed rows; with `eps`, `√(Σw² + eps)` as Distiller's channel norms.
fn row_l2(rows: &Tensor, eps: f64) -> Result<Tensor> {
    if eps == 0.0 {
        Ok(rows.f_norm_scalaropt_dim(2.0, [1], false)?)
    } else {
        Ok(rows.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?.f_add_scalar(eps)?.f_sqrt()?)
    }
}

/// Sum of the row norms of `rows`.
fn sum_row_l2(rows: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(row_l2(rows, eps)?.f_sum(Kind::Float)?)
}

/// The group-lasso penalty `Σ_g ‖g‖₂` of `w` grouped by `group` (without the strength).
pub fn group_lasso(w: &Tensor, group: GroupType) -> Result<Tensor> {
    let size = w.size();
    let dims = size.len();
    let rows_of = |dim: i64| -> Result<Tensor> {
        let t = if dim == 0 { w.shallow_clone() } else { w.f_transpose(0, 1)?.f_contiguous()? };
        let n = t.size()[0];
        Ok(t.f_reshape([n, -1])?)
    };
    match (group, dims) {
        (GroupType::Kernels, 4) => sum_row_l2(&w.f_reshape([size[0] * size[1], -1])?, 0.0),
        (GroupType::Rows, 2) | (GroupType::Filters, 2 | 4) => sum_row_l2(&rows_of(0)?, 0.0),
        (GroupType::Cols, 2) => sum_row_l2(&rows_of(1)?, 0.0),
        (GroupType::Channels, 2 | 4) => sum_row_l2(&rows_of(1)?, CHANNEL_EPSILON),
        (GroupType::RowsCols, 2) => Ok(sum_row_l2(&rows_of(0)?, 0.0)?.f_add(&sum_row_l2(&rows_of(1)?, 0.0)?)?),
        (GroupType::Layer, _) => sum_row_l2(&w.f_reshape([1, -1])?, 0.0),
        _ => Err(Error::Shape(format!("group lasso '{}' does not apply to a {dims}-D tensor {size:?}", group.as_str()))),
    }
}

/// How [`GroupLassoRegularizer`] groups a parameter: one or two group types (`Channels+4D` is two).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRegime {
    /// Parameter name.
    pub param: String,
    /// Penalty strength (and threshold).
    pub strength: f64,
    /// Group types whose penalties are summed.
    pub groups: Vec<GroupType>,
}

/// `GroupLassoRegularizer` (Wen et al., 2016): `strength · Σ_g ‖g‖₂` per listed parameter; with
/// `threshold_criteria` (`Max`, `Mean_Abs`), structures whose norm is at or below the strength are zeroed.
#[derive(Debug)]
pub struct GroupLassoRegularizer {
    name: String,
    regims: Vec<GroupRegime>,
    criterion: Option<String>,
}

impl GroupLassoRegularizer {
    /// Checks strengths and group types. Distiller's `Channels+4D` raises AttributeError; here it works as the
    /// sum of both penalties.
    pub fn new(name: &str, regims: Vec<GroupRegime>, threshold_criteria: Option<&str>) -> Result<Self> {
        for r in &regims {
            check_strength(r.strength)?;
        }
        if let Some(c) = threshold_criteria {
            crate::pruning::structure::parse_criterion(c)?;
        }
        let regims = regims.into_iter().map(|r| GroupRegime { param: normalize_name(&r.param), ..r }).collect();
        Ok(GroupLassoRegularizer { name: name.into(), regims, criterion: threshold_criteria.map(String::from) })
    }
}

impl Regularizer for GroupLassoRegularizer {
    fn class_name(&self) -> &'static str {
        "GroupLassoRegularizer"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn parameters(&self) -> Vec<&str> {
        self.regims.iter().map(|r| r.param.as_str()).collect()
    }
    fn loss(&self, param: &Tensor, name: &str) -> Result<Option<Tensor>> {
        let Some(r) = self.regims.iter().find(|r| r.param == name) else { return Ok(None) };
        let mut total = Tensor::f_zeros([], (Kind::Float, param.device()))?;
        for g in &r.groups {
            total = total.f_add(&group_lasso(param, *g)?)?;
        }
        Ok(Some(total.f_mul_scalar(r.strength)?))
    }
    fn thresholds(&self) -> bool {
        self.criterion.is_some()
    }
    fn threshold(&self, param: &Tensor, name: &str, masks: &mut Masks) -> Result<()> {
        let (Some(c), Some(r)) = (&self.criterion, self.regims.iter().find(|r| r.param == name)) else { return Ok(()) };
        // With two group types (Channels+4D), a structure survives only if both thresholds keep it.
        let mut mask = param.f_ones_like()?;
        for g in &r.groups {
            mask = mask.f_mul(&group_threshold_mask(param, *g, r.strength, c)?)?;
        }
        masks.set_mask(name, mask, &param.size())?;
        masks.get_mut(name)?.is_regularization_mask = true;
        Ok(())
    }
}

/// `GroupVarianceRegularizer` (Torfi et al.): `strength / var(per-channel L2 norms)`, pushing channel norms
/// apart so that weak channels can be pruned.
#[derive(Debug)]
pub struct GroupVarianceRegularizer {
    name: String,
    regims: Vec<(String, f64)>,
}

impl GroupVarianceRegularizer {
    /// `regims`: (parameter, strength); the group type must be `Channels`.
    pub fn new(name: &str, regims: Vec<(String, f64, GroupType)>) -> Result<Self> {
        for (_, s, g) in &regims {
            check_strength(*s)?;
            g.expect("GroupVarianceRegularizer", &[GroupType::Channels])?;
        }
        Ok(GroupVarianceRegularizer { name: name.into(), regims: regims.into_iter().map(|(n, s, _)| (normalize_name(&n), s)).collect() })
    }
}

impl Regularizer for GroupVarianceRegularizer {
    fn class_name(&self) -> &'static str {
        "GroupVarianceRegularizer"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn parameters(&self) -> Vec<&str> {
        self.regims.iter().map(|(n, _)| n.as_str()).collect()
    }
    fn loss(&self, param: &Tensor, name: &str) -> Result<Option<Tensor>> {
        let Some((_, s)) = self.regims.iter().find(|(n, _)| n == name) else { return Ok(None) };
        let t = param.f_transpose(0, 1)?.f_contiguous()?;
        let c = t.size()[0];
        let norms = row_l2(&t.f_reshape([c, -1])?, 0.0)?;
        Ok(Some(norms.f_var(true)?.f_reciprocal()?.f_mul_scalar(*s)?))
    }
}

/// Distiller's `RegularizationPolicy`.
pub struct RegularizationPolicy {
    regularizer: Box<dyn Regularizer>,
    keep_mask: bool,
}

impl RegularizationPolicy {
    /// Drives `regularizer`; `keep_mask` makes its threshold masks permanent after the last mini-batch.
    pub fn new(regularizer: Box<dyn Regularizer>, keep_mask: bool) -> Self {
        RegularizationPolicy { regularizer, keep_mask }
    }
}

impl Policy for RegularizationPolicy {
    fn name(&self) -> String {
        format!("RegularizationPolicy({} '{}')", self.regularizer.class_name(), self.regularizer.name())
    }

    fn before_backward_pass(&mut self, ctx: &mut PolicyContext, _: Minibatch, loss: &Tensor) -> Result<Option<PolicyLoss>> {
        let mut reg = Tensor::f_zeros([], (Kind::Float, loss.device()))?;
        for (name, param) in ctx.model.named_parameters() {
            if let Some(term) = self.regularizer.loss(&param, &crate::nn::canonical_param_name(&name))? {
                reg = reg.f_add(&term)?;
            }
        }
        Ok(Some(PolicyLoss {
            overall_loss: loss.f_add(&reg)?,
            loss_components: vec![LossComponent { name: format!("{}_loss", self.regularizer.class_name()), value: reg }],
        }))
    }

    fn on_minibatch_end(&mut self, ctx: &mut PolicyContext, mb: Minibatch) -> Result<()> {
        if !self.regularizer.thresholds() {
            return Ok(());
        }
        let last = ctx.schedule.is_last_active_epoch(ctx.epoch) && mb.index + 1 == mb.per_epoch;
        for (name, param) in ctx.model.named_parameters() {
            let name = crate::nn::canonical_param_name(&name);
            if !self.regularizer.parameters().contains(&name.as_str()) {
                continue;
            }
            self.regularizer.threshold(&param, &name, ctx.masks)?;
            let masker = ctx.masks.get_mut(&name)?;
            if last && self.keep_mask {
                masker.is_regularization_mask = false;
            }
            masker.apply_mask(&param)?;
        }
        Ok(())
    }

    fn on_epoch_end(&mut self, _: &mut PolicyContext, _: &Metrics) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(t: &Tensor, v: f64) -> bool {
        (t.double_value(&[]) - v).abs() < 1e-5
    }

    #[test]
    fn group_lasso_matches_hand_computed_norms() {
        // 2×2 matrix [[3, 4], [0, 5]]: row norms 5, 5; column norms 3, √41.
        let w = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 5.0]).reshape([2, 2]);
        assert!(close(&group_lasso(&w, GroupType::Rows).unwrap(), 10.0));
        assert!(close(&group_lasso(&w, GroupType::Cols).unwrap(), 3.0 + 41f64.sqrt()));
        assert!(close(&group_lasso(&w, GroupType::RowsCols).unwrap(), 13.0 + 41f64.sqrt()));
        assert!(close(&group_lasso(&w, GroupType::Layer).unwrap(), 50f64.sqrt()));
        // 4-D [2 filters, 2 channels, 1, 1] = [[3, 4], [0, 5]]: filters as rows, channels as columns (+ε).
        let w4 = w.reshape([2, 2, 1, 1]);
        assert!(close(&group_lasso(&w4, GroupType::Filters).unwrap(), 10.0));
        assert!(close(&group_lasso(&w4, GroupType::Channels).unwrap(), (9.0f64 + 1e-8).sqrt() + (41.0f64 + 1e-8).sqrt()));
        assert!(close(&group_lasso(&w4, GroupType::Kernels).unwrap(), 12.0));
        assert!(group_lasso(&w, GroupType::Kernels).is_err());
    }

    #[test]
    fn l1_and_group_variance_losses() {
        let w = Tensor::from_slice(&[3.0f32, -4.0, 0.0, 5.0]).reshape([2, 2]);
        let l1 = L1Regularizer::new("l1", vec![("w".into(), 0.5)], None).unwrap();
        assert!(close(&l1.loss(&w, "w").unwrap().unwrap(), 6.0));
        assert!(l1.loss(&w, "other").unwrap().is_none());
        // Channel (column) L2 norms 3 and √41; unbiased variance of two values = (a − b)² / 2.
        let gv = GroupVarianceRegularizer::new("gv", vec![("w".into(), 2.0, GroupType::Channels)]).unwrap();
        let var = (41f64.sqrt() - 3.0).powi(2) / 2.0;
        assert!(close(&gv.loss(&w, "w").unwrap().unwrap(), 2.0 / var));
        assert!(GroupVarianceRegularizer::new("gv", vec![("w".into(), 2.0, GroupType::Rows)]).is_err());
        assert!(L1Regularizer::new("l1", vec![("w".into(), -1.0)], None).is_err());
    }
}
