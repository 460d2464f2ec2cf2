//! The 32-value block formats: Q8_0, Q4_0, Q5_0, IQ4_NL and MXFP4. Encoders and decoders are
//! bit-compatible with ggml's reference code (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`,
//! `dequantize_row_*`).

use half::f16;

use super::kquant_search::make_qx_quants;

pub use super::{f16_at, QK};

pub const Q8_0_BYTES: usize = 34;
pub const Q4_0_BYTES: usize = 18;

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

/// Q5_0 as ggml's `quantize_row_q5_0_ref` (llama-quantize's fallback for Q4_K rows that are not
/// whole super-blocks): `d = max / -16`, `q = min(31, trunc(x / d + 16.5))`, the fifth bits in
/// `qh`.
pub fn quantize_row_q5_0(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK, 0);
    assert_eq!(out.len(), x.len() / QK * Q5_0_BYTES);
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q5_0_BYTES)) {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in xb {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((xb[j + QK / 2] * id + 16.5) as i8).min(31) as u8;
            ob[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
        }
        ob[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Q4_0 (`nmax` 8) or Q5_0 (`nmax` 16) of one row weighted by an importance vector, as ggml's
/// `quantize_row_q4_0_impl` / `quantize_row_q5_0_impl` (llama-quantize with `--imatrix`): per
/// block the weighted scale search of the k-quants, with weights `qw * sqrt(sigma2 + x²)` where
/// sigma2 is the row's mean square. Returns each block's (f16 scale bits, quants 0..2 nmax).
fn weighted_32_blocks(x: &[f32], qw: &[f32], nmax: i32) -> Vec<([u8; 2], [i8; QK])> {
    let mut sum_x2 = 0f32;
    for v in x {
        sum_x2 += v * v;
    }
    let sigma2 = sum_x2 / x.len() as f32;
    let mut weight = [0f32; QK];
    x.chunks_exact(QK)
        .zip(qw.chunks_exact(QK))
        .map(|(xb, wb)| {
            for j in 0..QK {
                weight[j] = wb[j] * (sigma2 + xb[j] * xb[j]).sqrt();
            }
            let mut l = [0i8; QK];
            let d = make_qx_quants(nmax, xb, &mut l, 1, Some(&weight));
            (f16::from_f32(d).to_bits().to_le_bytes(), l)
        })
        .collect()
}

/// One row of Q4_0 weighted by `qw` (one importance per value of the row).
pub fn quantize_row_q4_0_weighted(x: &[f32], qw: &[f32], out: &mut [u8]) {
    for ((d, l), ob) in weighted_32_blocks(x, qw, 8)
        .into_iter()
        .zip(out.chunks_exact_mut(Q4_0_BYTES))
    {
        ob[..2].copy_from_slice(&d);
        for j in 0..QK / 2 {
            ob[2 + j] = l[j] as u8 | ((l[j + QK / 2] as u8) << 4);
        }
    }
}

/// One row of Q5_0 weighted by `qw` (one importance per value of the row).
pub fn quantize_row_q5_0_weighted(x: &[f32], qw: &[f32], out: &mut [u8]) {
    for ((d, l), ob) in weighted_32_blocks(x, qw, 16)
        .into_iter()
        .zip(out.chunks_exact_mut(Q5_0_BYTES))
    {
        ob[..2].copy_from_slice(&d);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let (q0, q1) = (l[j] as u8, l[j + QK / 2] as u8);
            ob[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
        }
        ob[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

pub fn dequantize_row_q5_0(q: &[u8], out: &mut [f32]) {
    for (qb, ob) in q.chunks_exact(Q5_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(qb, 0);
        for (o, v) in ob.iter_mut().zip(q5_0_values(qb)) {
            *o = v as f32 * d;
        }
    }
}

/// Bytes of one IQ4_NL block: f16 scale, 16 bytes of 4-bit indices into [`IQ4_NL_LEVELS`].
pub const IQ4_NL_BYTES: usize = 18;

/// The 16 non-uniform levels of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`), denser near zero
/// where trained weights are.
pub const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// IQ4_NL: value j is level `qs[j] & 15` and value j + 16 level `qs[j] >> 4`, times the scale.
pub fn dequantize_row_iq4_nl(q: &[u8], out: &mut [f32]) {
    for (qb, ob) in q.chunks_exact(IQ4_NL_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(qb, 0);
        for j in 0..QK / 2 {
            ob[j] = d * IQ4_NL_LEVELS[(qb[2 + j] & 0x0f) as usize] as f32;
            ob[j + QK / 2] = d * IQ4_NL_LEVELS[(qb[2 + j] >> 4) as usize] as f32;
        }
    }
}

/// Bytes of one MXFP4 block (OCP microscaling FP4): an E8M0 exponent, 16 bytes of E2M1 nibbles.
pub const MXFP4_BYTES: usize = 17;

/// The E2M1 values doubled, so that they are integers (ggml's `kvalues_mxfp4`); the block scale
/// is halved to match ([`e8m0_half`]).
pub const MXFP4_LEVELS: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half the E8M0 scale `2^(e - 127)`, exactly (ggml's `ggml_e8m0_to_fp32_half`): subnormal for
/// e < 2, and at most 2^127, so never infinite (e = 255, NaN in the OCP spec, is read as the
/// number it would be).
#[inline]
pub const fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        (e as u32 - 1) << 23
    };
    f32::from_bits(bits)
}

/// MXFP4: value j is level `qs[j] & 15` and value j + 16 level `qs[j] >> 4`, times half the
/// block's power-of-two scale.
pub fn dequantize_row_mxfp4(q: &[u8], out: &mut [f32]) {
    for (qb, ob) in q.chunks_exact(MXFP4_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = e8m0_half(qb[0]);
        for j in 0..QK / 2 {
            ob[j] = MXFP4_LEVELS[(qb[1 + j] & 0x0f) as usize] as f32 * d;
            ob[j + QK / 2] = MXFP4_LEVELS[(qb[1 + j] >> 4) as usize] as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn e8m0_half_is_half_of_two_to_the_exponent() {
        assert_eq!(e8m0_half(127), 0.5);
        assert_eq!(e8m0_half(128), 1.0);
        assert_eq!(e8m0_half(0), 2f32.powi(-128));
        assert_eq!(e8m0_half(1), 2f32.powi(-127));
        assert_eq!(e8m0_half(2), 2f32.powi(-126));
        assert_eq!(e8m0_half(254), 2f32.powi(126));
        assert_eq!(e8m0_half(255), 2f32.powi(127));
    }
}
