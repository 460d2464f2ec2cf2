//! Block formats as ggml lays them out: decoders bit-identical to ggml's `dequantize_row_*`, the
//! encoders the converter and the activations use, and each format's constants. This is the
//! bottom of `tensor`: nothing here uses the kernels, which build on it.

pub mod block32;
mod grids;
pub mod iq4_encode;
pub mod iquant;
pub mod kquant;
pub mod kquant_encode;
mod kquant_search;
pub mod rows4;

use half::f16;

/// Values in a block of the 32-value formats (Q8_0, Q4_0, Q5_0, IQ4_NL, MXFP4).
pub const QK: usize = 32;
/// Values in a super-block of the k-quants and i-quants.
pub const QK_K: usize = 256;

/// The little-endian f16 at byte `at`, as f32.
#[inline]
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// The little-endian f32 at byte `at`.
#[inline]
pub fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The little-endian u16 at byte `at`.
#[inline]
pub fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// The little-endian u32 at byte `at`.
#[inline]
pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}
