//! Tensors and quantization kernels.

pub mod kernels;
pub mod kquant;
pub mod matrix;
pub mod quant;

pub use kernels::Kernels;
pub use matrix::{matmul, MatmulScratch, QMatrix};
