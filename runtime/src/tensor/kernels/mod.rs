//! Dot-product kernels behind one function table. `scalar` is the reference; SIMD tables are
//! chosen at run time from the CPU's features and tested against it.

pub mod scalar;

use std::sync::OnceLock;

use crate::tensor::quant::quantize_row_q8_0;

/// The kernels one CPU path provides. Weight rows are raw bytes of their GGML type; activations
/// are f32 for float weights and Q8_0 blocks for Q8_0/Q4_0 weights.
pub struct Kernels {
    /// Shown at start-up and in benchmarks, e.g. "scalar" or "x86_64 avx2+fma".
    pub name: &'static str,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub dot_f16: fn(&[u8], &[f32]) -> f32,
    pub dot_bf16: fn(&[u8], &[f32]) -> f32,
    pub dot_q8_0_q8_0: fn(&[u8], &[u8]) -> f32,
    pub dot_q4_0_q8_0: fn(&[u8], &[u8]) -> f32,
    pub quantize_q8_0: fn(&[f32], &mut [u8]),
}

pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    dot_f32: scalar::dot_f32,
    dot_f16: scalar::dot_f16,
    dot_bf16: scalar::dot_bf16,
    dot_q8_0_q8_0: scalar::dot_q8_0_q8_0,
    dot_q4_0_q8_0: scalar::dot_q4_0_q8_0,
    quantize_q8_0: quantize_row_q8_0,
};

/// The fastest table this CPU supports, detected once.
pub fn best() -> &'static Kernels {
    static BEST: OnceLock<&'static Kernels> = OnceLock::new();
    BEST.get_or_init(|| &SCALAR)
}
