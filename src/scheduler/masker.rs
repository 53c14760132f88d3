use std::collections::HashMap;

use tch::Tensor;

use crate::{Error, Result};

/// The mask of one parameter and how to apply it: Distiller's `ParameterMasker`.
///
/// A mask is a tensor of the parameter's shape (usually 0/1; Bernoulli masks are scaled); `None` means
/// unmasked. Pruners set masks at epoch begin; the scheduler applies them at mini-batch begin and re-applies
/// every mask after every optimizer step, so pruned weights stay zero under momentum and weight decay.
#[derive(Debug)]
pub struct ParameterMasker {
    /// Name of the masked parameter.
    pub param_name: String,
    /// The mask, if any.
    pub mask: Option<Tensor>,
    /// A regularizer's one-shot mask: cleared after it is applied once.
    pub is_regularization_mask: bool,
    /// Keep an unmasked copy while the mask is applied and restore it before the optimizer step
    /// (Distiller's `use_double_copies`, for dropout-like pruning).
    pub use_double_copies: bool,
    /// Apply the mask only before the forward pass, not after the optimizer step.
    pub mask_on_forward_only: bool,
    /// Multiply the gradient by the mask before the optimizer step.
    pub mask_gradients: bool,
    unmasked_copy: Option<Tensor>,
}

impl ParameterMasker {
    /// An unmasked parameter.
    pub fn new(param_name: impl Into<String>) -> Self {
        ParameterMasker {
            param_name: param_name.into(),
            mask: None,
            is_regularization_mask: false,
            use_double_copies: false,
            mask_on_forward_only: false,
            mask_gradients: false,
            unmasked_copy: None,
        }
    }

    /// Multiplies `param` by the mask in place (no-op without a mask), keeping an unmasked copy first when
    /// `use_double_copies` is set; a regularization mask is then dropped.
    pub fn apply_mask(&mut self, param: &Tensor) -> Result<()> {
        let Some(mask) = &self.mask else { return Ok(()) };
        let _guard = tch::no_grad_guard();
        if self.use_double_copies {
            self.unmasked_copy = Some(param.f_detach_copy()?);
        }
        let _ = param.shallow_clone().f_mul_(mask)?;
        if self.is_regularization_mask {
            self.mask = None;
        }
        Ok(())
    }

    /// Multiplies `tensor` by the mask in place, with none of `apply_mask`'s side effects.
    pub fn mask_tensor(&self, tensor: &Tensor) -> Result<()> {
        if let Some(mask) = &self.mask {
            let _guard = tch::no_grad_guard();
            let _ = tensor.shallow_clone().f_mul_(mask)?;
        }
        Ok(())
    }

    /// Restores the unmasked copy kept by `apply_mask` (with `use_double_copies`).
    pub fn revert_weights(&mut self, param: &Tensor) -> Result<()> {
        if let Some(copy) = self.unmasked_copy.take() {
            let _guard = tch::no_grad_guard();
            param.shallow_clone().f_copy_(&copy)?;
        }
        Ok(())
    }
}

/// All parameters' maskers, in the model's parameter order: Distiller's `zeros_mask_dict`.
#[derive(Debug, Default)]
pub struct Masks {
    maskers: Vec<ParameterMasker>,
    index: HashMap<String, usize>,
}

impl Masks {
    /// One unmasked masker per name.
    pub fn new<I: IntoIterator<Item = String>>(names: I) -> Self {
        let maskers: Vec<ParameterMasker> = names.into_iter().map(ParameterMasker::new).collect();
        let index = maskers.iter().enumerate().map(|(i, m)| (m.param_name.clone(), i)).collect();
        Masks { maskers, index }
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).or_else(|| self.index.get(&crate::nn::canonical_param_name(name))).copied()
    }

    /// The masker of parameter `name` (a quantized copy's name, `conv1.float_weight`, finds `conv1.weight`'s).
    pub fn get(&self, name: &str) -> Result<&ParameterMasker> {
        match self.position(name) {
            Some(i) => Ok(&self.maskers[i]),
            None => Err(self.unknown(name)),
        }
    }

    /// The mask of parameter `name`: `None` while no pruner has set one. An unknown name is an error with
    /// suggestions.
    ///
    /// ```
    /// let model = distill::models::create_model("lenet", "mnist", tch::Device::Cpu)?;
    /// let masks = distill::scheduler::Masks::new(model.named_parameters().into_iter().map(|(n, _)| n));
    /// assert!(masks.mask("conv1.weight")?.is_none());
    /// assert!(masks.mask("conv1.weigth").unwrap_err().to_string().contains("did you mean 'conv1.weight'"));
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn mask(&self, name: &str) -> Result<Option<&Tensor>> {
        Ok(self.get(name)?.mask.as_ref())
    }

    /// The masker of parameter `name` if it has one (parameters added after the scheduler was built, such as
    /// PACT's clipping values, have none).
    pub fn find_mut(&mut self, name: &str) -> Option<&mut ParameterMasker> {
        self.position(name).map(|i| &mut self.maskers[i])
    }

    /// The masker of parameter `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Result<&mut ParameterMasker> {
        match self.position(name) {
            Some(i) => Ok(&mut self.maskers[i]),
            None => Err(self.unknown(name)),
        }
    }

    fn unknown(&self, name: &str) -> Error {
        Error::unknown("parameter", name, self.maskers.iter().map(|m| m.param_name.clone()))
    }

    /// Every masker, in parameter order.
    pub fn iter(&self) -> impl Iterator<Item = &ParameterMasker> {
        self.maskers.iter()
    }

    /// Every masker, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut ParameterMasker> {
        self.maskers.iter_mut()
    }

    /// Sets the mask of `name`, which must have the parameter's shape `param_shape`.
    pub fn set_mask(&mut self, name: &str, mask: Tensor, param_shape: &[i64]) -> Result<()> {
        let name = &crate::nn::canonical_param_name(name);
        if mask.size() != param_shape {
            return Err(Error::Shape(format!("mask for '{name}' is {:?}, the parameter is {param_shape:?}", mask.size())));
        }
        self.get_mut(name)?.mask = Some(mask);
        Ok(())
    }

    /// Forgets the unmasked copies kept for double-copy masks (thinning changes the shapes they were taken in;
    /// the next mini-batch takes them again).
    pub fn drop_unmasked_copies(&mut self) {
        for m in &mut self.maskers {
            m.unmasked_copy = None;
        }
    }

    /// Every set mask by parameter name, sharing storage with the maskers.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.maskers.iter().filter_map(|m| m.mask.as_ref().map(|t| (m.param_name.clone(), t.shallow_clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v)
    }

    #[test]
    fn apply_mask_double_copies_and_regularization() {
        let p = t(&[1.0, 2.0, 3.0]);
        let mut m = ParameterMasker::new("w");
        m.apply_mask(&p).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, 2.0, 3.0]);
        m.mask = Some(t(&[1.0, 0.0, 1.0]));
        m.use_double_copies = true;
        m.apply_mask(&p).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, 0.0, 3.0]);
        m.revert_weights(&p).unwrap();
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, 2.0, 3.0]);
        m.is_regularization_mask = true;
        m.use_double_copies = false;
        m.apply_mask(&p).unwrap();
        assert!(m.mask.is_none(), "a regularization mask is one-shot");
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, 0.0, 3.0]);
    }

    #[test]
    fn set_mask_checks_shape_and_name() {
        let mut masks = Masks::new(["conv1.weight".to_string()]);
        let err = masks.set_mask("conv1.weight", Tensor::ones([2], (Kind::Float, tch::Device::Cpu)), &[3]).unwrap_err();
        assert!(err.to_string().contains("mask for 'conv1.weight' is [2], the parameter is [3]"));
        let err = masks.get("conv1.weigth").unwrap_err().to_string();
        assert!(err.contains("did you mean 'conv1.weight'"), "{err}");
    }
}
