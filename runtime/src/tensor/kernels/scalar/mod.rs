//! Scalar reference kernels, in ggml's order of arithmetic (its `ggml_vec_dot_*_generic`).
//! Every SIMD path is tested against these. This file: floats and the 32-value formats; the
//! k-quants and i-quants are in `kquant` and `iquant`.

pub mod iquant;
pub mod kquant;

use half::{bf16, f16};

use crate::tensor::blocks::block32::{
    e8m0_half, f16_at, q5_0_values, IQ4_NL_BYTES, IQ4_NL_LEVELS, MXFP4_BYTES, MXFP4_LEVELS,
    Q4_0_BYTES, Q5_0_BYTES, Q8_0_BYTES, QK,
};

/// Eight independent accumulators: keeps the sum order fixed (so results do not depend on the
/// machine) while letting the compiler vectorise.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ca, ta) = a.split_at(a.len() / 8 * 8);
    let (cb, tb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ta.iter().zip(tb) {
        sum += x * y;
    }
    sum
}

pub fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (wc, xc) in w.chunks_exact(16).zip(x.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] +=
                f16::from_bits(u16::from_le_bytes([wc[2 * i], wc[2 * i + 1]])).to_f32() * xc[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let done = x.len() / 8 * 8;
    for i in done..x.len() {
        sum += f16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32() * x[i];
    }
    sum
}

pub fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (wc, xc) in w.chunks_exact(16).zip(x.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] +=
                bf16::from_bits(u16::from_le_bytes([wc[2 * i], wc[2 * i + 1]])).to_f32() * xc[i];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let done = x.len() / 8 * 8;
    for i in done..x.len() {
        sum += bf16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32() * x[i];
    }
    sum
}

/// Q8_0 weights against Q8_0 activations: integer sums per block, scaled by both block scales.
pub fn dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q8_0_BYTES).zip(x.chunks_exact(Q8_0_BYTES)) {
        let mut sumi = 0i32;
        for j in 0..QK {
            sumi += (wb[2 + j] as i8) as i32 * (xb[2 + j] as i8) as i32;
        }
        sum += sumi as f32 * (f16_at(wb, 0) * f16_at(xb, 0));
    }
    sum
}

/// Q4_0 weights against Q8_0 activations.
pub fn dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q4_0_BYTES).zip(x.chunks_exact(Q8_0_BYTES)) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = (wb[2 + j] & 0x0f) as i32 - 8;
            let hi = (wb[2 + j] >> 4) as i32 - 8;
            sumi += lo * (xb[2 + j] as i8) as i32 + hi * (xb[2 + j + QK / 2] as i8) as i32;
        }
        // ggml associates this one as (sumi * dw) * dx.
        sum += sumi as f32 * f16_at(wb, 0) * f16_at(xb, 0);
    }
    sum
}

/// Q5_0 weights times Q8_0 activations. Scalar on every CPU: Q5_0 only stands in for the few
/// tensors of a k-quant file whose rows are not whole 256-value blocks.
pub fn dot_q5_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q5_0_BYTES).zip(x.chunks_exact(Q8_0_BYTES)) {
        let sumi: i32 = q5_0_values(wb)
            .iter()
            .zip(&xb[2..])
            .map(|(&a, &b)| a as i32 * (b as i8) as i32)
            .sum();
        sum += sumi as f32 * f16_at(wb, 0) * f16_at(xb, 0);
    }
    sum
}

/// IQ4_NL weights times Q8_0 activations (`ggml_vec_dot_iq4_nl_q8_0_generic`).
pub fn dot_iq4_nl_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(IQ4_NL_BYTES).zip(x.chunks_exact(Q8_0_BYTES)) {
        let d = f16_at(xb, 0) * f16_at(wb, 0);
        sum += d * nonlinear4_sum(&wb[2..18], &xb[2..34], &IQ4_NL_LEVELS) as f32;
    }
    sum
}

/// MXFP4 weights times Q8_0 activations (`ggml_vec_dot_mxfp4_q8_0_generic`).
pub fn dot_mxfp4_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(MXFP4_BYTES).zip(x.chunks_exact(Q8_0_BYTES)) {
        let d = f16_at(xb, 0) * e8m0_half(wb[0]);
        sum += d * nonlinear4_sum(&wb[1..17], &xb[2..34], &MXFP4_LEVELS) as f32;
    }
    sum
}

/// `sum(levels[w_j] * x_j)` over 32 values whose 4-bit level indices are packed as in IQ4_NL
/// (value j in the low nibble of byte j, value j + 16 in the high one).
#[inline]
pub(crate) fn nonlinear4_sum(qs: &[u8], x: &[u8], levels: &[i8; 16]) -> i32 {
    let (mut lo, mut hi) = (0i32, 0i32);
    for j in 0..16 {
        lo += x[j] as i8 as i32 * levels[(qs[j] & 0x0f) as usize] as i32;
        hi += x[j + 16] as i8 as i32 * levels[(qs[j] >> 4) as usize] as i32;
    }
    lo + hi
}

pub fn gemm_q8_0(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q8_0_q8_0, w, rows, x, n, out);
}

pub fn gemm_q4_0(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q4_0_q8_0, w, rows, x, n, out);
}

pub fn axpy_f16(a: f32, v: &[u8], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o += a * f16_at(v, 2 * i);
    }
}
