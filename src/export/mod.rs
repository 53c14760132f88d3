//! Deployable artifacts: ONNX files that runtimes read ([`onnx`]).
pub mod onnx;
