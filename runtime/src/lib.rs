//! moe-edge runtime: runs Mixture-of-Experts GGUF models on the CPU, streaming experts from
//! flash when the model is larger than RAM.
//!
//! Layout by concern, lowest layer first (a module uses only its own layer and lower ones;
//! `scripts/check/check_layout.py` checks it):
//! - [`units`], [`threads`], [`npy`], [`onnx`]: sizes, the worker pool, array and ONNX files;
//! - [`gguf`]: the file format;
//! - [`tensor`]: block formats, the kernel table and matrix products;
//! - [`tokenizer`], [`sampling`];
//! - [`grammar`]: constrained decoding (JSON schemas, Lark and GBNF grammars) over the
//!   tokenizer's vocabulary;
//! - [`moe`]: routing, running experts, the expert cache and its flash reads, predictors;
//! - [`model`]: architectures, weights, layers (mixers and feed-forwards), per-session state
//!   and the forward pass;
//! - [`board`]: board profiles and host detection;
//! - [`engine`]: the API: open a model with session options, make sessions, generate;
//! - [`cli`]: `moe-run`'s command line on top of the engine.

pub mod board;
pub mod cli;
pub mod engine;
pub mod gguf;
pub mod grammar;
pub mod model;
pub mod moe;
pub mod npy;
pub mod onnx;
pub mod sampling;
pub mod tensor;
pub mod threads;
pub mod tokenizer;
pub mod units;
