//! Quantization: Distiller's primitives, post-training range-linear quantization and quantization-aware training.
pub mod q_utils;
pub mod quantizer;
pub mod range_linear;
pub mod stats;
pub mod bn_fold;
pub mod export;
pub mod qat;
mod fused;
mod policy;

pub use policy::QuantizationPolicy;
