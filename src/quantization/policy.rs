use super::qat::QatQuantizer;
use crate::scheduler::{Policy, PolicyContext};
use crate::{Error, Result};

/// Distiller's `QuantizationPolicy` for quantization-aware training: prepares the model (replaces its layers and
/// ReLUs) when its first epoch begins, and gives new parameters (PACT's α) their own optimizer group. Weights are
/// re-quantized at every forward pass from their full-precision copies, so nothing is needed per mini-batch.
///
/// Distiller prepares the model when the schedule is loaded; here it happens at the policy's starting epoch, so
/// a float warm-up before quantization can be scheduled.
pub struct QuantizationPolicy {
    name: String,
    quantizer: QatQuantizer,
    prepared: bool,
}

impl QuantizationPolicy {
    /// A policy named `name` for `quantizer`.
    pub fn new(name: &str, quantizer: QatQuantizer) -> Self {
        QuantizationPolicy { name: name.into(), quantizer, prepared: false }
    }

    fn prepare(&mut self, ctx: &mut PolicyContext) -> Result<()> {
        if self.prepared {
            return Ok(());
        }
        let prepared = self.quantizer.prepare_model(ctx.model)?;
        self.prepared = true;
        if prepared.new_params.is_empty() {
            return Ok(());
        }
        let Some(opt) = ctx.optimizer.as_deref_mut() else {
            return Err(Error::invalid(
                "QuantizationPolicy",
                format!("{} adds trainable parameters; call the scheduler with the optimizer", self.quantizer.method.class_name()),
            ));
        };
        let wd = prepared.new_params_weight_decay.unwrap_or_else(|| opt.groups().first().map_or(0.0, |g| g.weight_decay));
        let lr = opt.lr();
        opt.add_param_group(prepared.new_params, lr, wd)
    }
}

impl Policy for QuantizationPolicy {
    fn name(&self) -> String {
        format!("QuantizationPolicy({} '{}')", self.quantizer.method.class_name(), self.name)
    }

    fn on_epoch_begin(&mut self, ctx: &mut PolicyContext) -> Result<()> {
        self.prepare(ctx)
    }

    fn before_restore(&mut self, ctx: &mut PolicyContext, resumed_epoch: usize) -> Result<()> {
        if ctx.schedule.starting_epoch <= resumed_epoch {
            self.prepare(ctx)?;
        }
        Ok(())
    }
}
