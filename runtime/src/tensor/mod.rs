//! Tensors: block formats (`blocks`, decoded and encoded as ggml does), the dot-product kernels
//! built on them (`kernels`), and the matrix products the model runs (`matrix`).

pub mod blocks;
pub mod kernels;
pub mod matrix;
pub mod quant;
pub mod random;

pub use blocks::kquant;
pub use kernels::Kernels;
pub use matrix::{matmul, MatmulScratch, QMatrix};
