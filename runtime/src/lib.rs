//! moe-edge runtime: runs Mixture-of-Experts GGUF models on CPU.
//!
//! Layout by concern: [`gguf`] (file format), [`tensor`] (quant formats and kernels), [`model`]
//! (architectures and the forward pass), [`moe`] (routing), [`sampling`], [`tokenizer`].

pub mod board;
pub mod cli;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod moe;
pub mod npy;
pub mod onnx;
pub mod sampling;
pub mod tensor;
pub mod tokenizer;
pub mod units;
