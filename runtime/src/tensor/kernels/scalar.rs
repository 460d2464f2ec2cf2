//! Scalar reference kernels. Every SIMD path is tested against these.

use half::{bf16, f16};

use crate::tensor::quant::{f16_at, q5_0_values, Q4_0_BYTES, Q5_0_BYTES, Q8_0_BYTES, QK};

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
