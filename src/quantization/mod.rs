//! Quantization: Distiller's primitives, post-training range-linear quantization and quantization-aware training.
pub mod q_utils;
pub mod quantizer;
pub mod range_linear;
pub mod stats;
pub mod adaround;
pub mod bias_correction;
pub mod bit_packing;
pub mod bn_fold;
pub mod equalization;
pub mod export;
pub mod mixed_precision;
pub mod post_train;
pub mod qat;
mod fused;
mod net_aware;
mod policy;

pub use policy::QuantizationPolicy;
