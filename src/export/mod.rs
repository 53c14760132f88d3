//! Deployable artifacts: ONNX files that runtimes read ([`onnx`]), and what they cost and gain on this machine
//! ([`deploy`]).
pub mod deploy;
pub mod onnx;
