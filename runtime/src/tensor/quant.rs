//! Block formats: quantizers and dequantizers, bit-compatible with ggml's reference code
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`, `dequantize_row_*`).

use half::{bf16, f16};

use crate::gguf::GgmlType;

pub const QK: usize = 32;
pub const Q8_0_BYTES: usize = 34;
pub const Q4_0_BYTES: usize = 18;

#[inline]
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Q8_0: per 32 values an f16 scale `d = max|x| / 127` and 32 int8 `round(x / d)`.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK, 0);
    assert_eq!(out.len(), x.len() / QK * Q8_0_BYTES);
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, &v) in ob[2..].iter_mut().zip(xb) {
            *q = ((v * id).round() as i8) as u8;
        }
    }
}

/// Q4_0: per 32 values an f16 scale `d = max / -8` (max = the value of largest magnitude, with its
/// sign) and 4-bit `q = min(15, trunc(x / d + 8.5))`; value j is in the low nibble of byte j,
/// value j+16 in the high nibble.
pub fn quantize_row_q4_0(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK, 0);
    assert_eq!(out.len(), x.len() / QK * Q4_0_BYTES);
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q4_0_BYTES)) {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            ob[2 + j] = q0 | (q1 << 4);
        }
    }
}

pub fn dequantize_row_q8_0(q: &[u8], out: &mut [f32]) {
    for (qb, ob) in q.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(qb, 0);
        for (o, &v) in ob.iter_mut().zip(&qb[2..]) {
            *o = (v as i8) as f32 * d;
        }
    }
}

pub fn dequantize_row_q4_0(q: &[u8], out: &mut [f32]) {
    for (qb, ob) in q.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(qb, 0);
        for j in 0..QK / 2 {
            let b = qb[2 + j];
            ob[j] = ((b & 0x0f) as i32 - 8) as f32 * d;
            ob[j + QK / 2] = ((b >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Bytes of one Q5_0 block: f16 scale, 32 high bits, 16 bytes of low nibbles.
pub const Q5_0_BYTES: usize = 22;

/// The 32 signed 5-bit values of a Q5_0 block, in order (ggml's `dequantize_row_q5_0`: value j
/// takes low nibble j and high bit j, value j + 16 the high nibble and high bit j + 16).
#[inline]
pub fn q5_0_values(block: &[u8]) -> [i8; QK] {
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..6 + QK / 2];
    let mut v = [0i8; QK];
    for j in 0..QK / 2 {
        let hi0 = ((qh >> j) << 4) & 0x10;
        let hi1 = (qh >> (j + 12)) & 0x10;
        v[j] = ((qs[j] as u32 & 0x0f) | hi0) as i8 - 16;
        v[j + QK / 2] = ((qs[j] as u32 >> 4) | hi1) as i8 - 16;
    }
    v
}

pub fn dequantize_row_q5_0(q: &[u8], out: &mut [f32]) {
    for (qb, ob) in q.chunks_exact(Q5_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(qb, 0);
        for (o, v) in ob.iter_mut().zip(q5_0_values(qb)) {
            *o = v as f32 * d;
        }
    }
}

/// Encodes f32 values as `ty` (a whole number of blocks). Used by the converter.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let n_bytes = ty
        .row_bytes(x.len())
        .expect("caller checks that rows are whole blocks");
    let mut out = vec![0u8; n_bytes];
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        GgmlType::Q8_0 => quantize_row_q8_0(x, &mut out),
        GgmlType::Q4_0 => quantize_row_q4_0(x, &mut out),
        GgmlType::Q5_0 | GgmlType::Q4K | GgmlType::Q6K => {
            unimplemented!("q5_0 and k-quant encoding are not offered by the converter yet")
        }
    }
    out
}

/// Decodes a whole number of blocks of `ty` into f32.
pub fn dequantize(ty: GgmlType, q: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(q.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(q.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(q.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => dequantize_row_q8_0(q, out),
        GgmlType::Q4_0 => dequantize_row_q4_0(q, out),
        GgmlType::Q5_0 => dequantize_row_q5_0(q, out),
        GgmlType::Q4K => super::kquant::dequantize_row_q4_k(q, out),
        GgmlType::Q6K => super::kquant::dequantize_row_q6_k(q, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks and their values as gguf-py (llama.cpp's reference) encodes and decodes them
    /// (scripts/fixtures/make_q5_0_vectors.py).
    const Q5_0_BLOCKS: &[u8] = include_bytes!("../../tests/fixtures/q5_0/blocks.bin");
    const Q5_0_VALUES: &[u8] = include_bytes!("../../tests/fixtures/q5_0/values.f32");

    #[test]
    fn q5_0_decodes_as_gguf_py_does() {
        let want: Vec<f32> = Q5_0_VALUES
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut got = vec![0f32; want.len()];
        dequantize(GgmlType::Q5_0, Q5_0_BLOCKS, &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn q5_0_dot_equals_the_dequantized_dot() {
        let dot_q5_0_q8_0 = crate::tensor::kernels::best().dot_q5_0_q8_0;
        let cols = 64;
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 29 % 23) as f32 - 11.0) * 0.17)
            .collect();
        let mut xq = vec![0u8; cols / QK * Q8_0_BYTES];
        quantize_row_q8_0(&x, &mut xq);
        let mut xd = vec![0f32; cols];
        dequantize_row_q8_0(&xq, &mut xd);
        for row in Q5_0_BLOCKS.chunks_exact(cols / QK * Q5_0_BYTES) {
            let mut w = vec![0f32; cols];
            dequantize_row_q5_0(row, &mut w);
            let exact: f64 = w.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
            let norm: f64 = w
                .iter()
                .zip(&xd)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let got = dot_q5_0_q8_0(row, &xq) as f64;
            assert!(
                (got - exact).abs() <= 1e-6 * norm.max(1e-30),
                "{got} vs {exact}"
            );
        }
    }

    #[test]
    fn q8_0_round_trip_error_is_bounded() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.31)
            .collect();
        let mut q = vec![0u8; 2 * Q8_0_BYTES];
        quantize_row_q8_0(&x, &mut q);
        let mut y = vec![0f32; 64];
        dequantize_row_q8_0(&q, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 2.79 / 127.0 * 0.51 + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_0_matches_ggml_reference_layout() {
        // max magnitude -4.0 -> d = 0.5; value 1.0 -> trunc(1/0.5*-1... ) computed by hand:
        // id = 1/d = 2, q = trunc(1.0*2 + 8.5) = 10 -> dequant (10-8)*0.5 = 1.0
        let mut x = [0f32; 32];
        x[0] = -4.0;
        x[1] = 1.0;
        x[16] = 2.0;
        let mut q = [0u8; Q4_0_BYTES];
        quantize_row_q4_0(&x, &mut q);
        assert_eq!(f16_at(&q, 0), 0.5);
        // x[0] = -4 -> -4*2+8.5 = 0.5 -> 0 ; x[16] = 2 -> 12.5 -> 12
        assert_eq!(q[2], 12 << 4);
        assert_eq!(q[3] & 0x0f, 10);
        let mut y = [0f32; 32];
        dequantize_row_q4_0(&q, &mut y);
        assert_eq!(y[0], -4.0);
        assert_eq!(y[1], 1.0);
        assert_eq!(y[16], 2.0);
        assert_eq!(y[5], 0.0);
    }
}
