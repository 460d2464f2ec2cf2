//! K-quant block formats (256 values per super-block) as ggml defines them, and Q8_K, the
//! activation format they are dotted with. The weights' encoders, which moe-convert uses, are
//! in `kquant_encode`.

use super::{f16_at, QK_K};

pub const Q2_K_BYTES: usize = 84;
pub const Q3_K_BYTES: usize = 110;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;

/// Unpacks the j-th 6-bit (scale, min) pair of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All eight (scale, min) pairs of a Q4_K/Q5_K block's 12 packed bytes at once, the way ggml's
/// SIMD kernels unpack them (`utmp` and `kmask1..3`): the same values as [`scale_min_k4`].
#[inline(always)]
pub fn q4_k_scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mins_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc[..4].copy_from_slice(&(u0 & KMASK1).to_le_bytes());
    sc[4..].copy_from_slice(&scales_hi.to_le_bytes());
    mn[..4].copy_from_slice(&(u1 & KMASK1).to_le_bytes());
    mn[4..].copy_from_slice(&mins_hi.to_le_bytes());
    (sc, mn)
}

/// Q2_K block: 16 bytes of 4-bit (scale, min) pairs, 64 bytes of 2-bit quants, f16 d, f16 dmin.
pub fn dequantize_row_q2_k(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(Q2_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 80);
        let min = f16_at(b, 82);
        // Groups of 16 values in order: group g takes bits 2 * (g / 2 % 4) of bytes
        // 32 * (g / 8) + 16 * (g % 2)..+16.
        for (g, yg) in y.chunks_exact_mut(16).enumerate() {
            let sc = b[g];
            let dl = d * (sc & 0x0f) as f32;
            let ml = min * (sc >> 4) as f32;
            let shift = 2 * (g / 2 % 4);
            let qs = &b[16 + 32 * (g / 8) + 16 * (g % 2)..][..16];
            for (v, &qb) in yg.iter_mut().zip(qs) {
                *v = dl * ((qb >> shift) & 3) as f32 - ml;
            }
        }
    }
}

/// The sixteen 6-bit scales of a Q3_K block, minus their offset of 32 (ggml's `aux` unpacking):
/// scale k has its low four bits in byte k % 8 (high nibble for k >= 8) and its top two in byte
/// 8 + k % 4, bits 2 * (k / 4).
#[inline]
pub fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let mut s = [0i8; 16];
    for (k, v) in s.iter_mut().enumerate() {
        let low = (packed[k % 8] >> (4 * (k / 8))) & 0x0f;
        let high = (packed[8 + k % 4] >> (2 * (k / 4))) & 3;
        *v = (low | (high << 4)) as i8 - 32;
    }
    s
}

/// The 256 signed 3-bit values of a Q3_K block (-4..=3): two low bits from the quants, and 4
/// taken off where the high-bit mask is clear. Value v takes bits 2 * (v / 32 % 4) of quant byte
/// 32 * (v / 128) + v % 32 and bit v / 32 of mask byte v % 32.
#[inline]
pub fn q3_k_values(b: &[u8]) -> [i8; QK_K] {
    let (hmask, qs) = (&b[..32], &b[32..96]);
    let mut out = [0i8; QK_K];
    for (v, o) in out.iter_mut().enumerate() {
        let low = (qs[32 * (v / 128) + v % 32] >> (2 * (v / 32 % 4))) & 3;
        let high = hmask[v % 32] >> (v / 32) & 1;
        *o = low as i8 - if high == 0 { 4 } else { 0 };
    }
    out
}

/// Q3_K block: 32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes of packed 6-bit
/// scales, f16 d.
pub fn dequantize_row_q3_k(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(Q3_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 108);
        let scales = q3_k_scales(&b[96..108]);
        let values = q3_k_values(b);
        for (g, (yg, vg)) in y
            .chunks_exact_mut(16)
            .zip(values.chunks_exact(16))
            .enumerate()
        {
            let dl = d * scales[g] as f32;
            for (o, &v) in yg.iter_mut().zip(vg) {
                *o = dl * v as f32;
            }
        }
    }
}

/// Q4_K block: f16 d, f16 dmin, 12 bytes of packed scales/mins, 128 bytes of nibbles.
pub fn dequantize_row_q4_k(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(Q4_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for (chunk, (qc, yc)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = scale_min_k4(2 * chunk, scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                yc[l] = d1 * (qc[l] & 0x0f) as f32 - m1;
                yc[l + 32] = d2 * (qc[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// The 256 unsigned 5-bit values of a Q5_K block: value 64c + l (l < 32) is the low nibble of
/// quant byte 32c + l plus bit 2c of high byte l as 16; value 64c + 32 + l the high nibble plus
/// bit 2c + 1.
#[inline]
pub fn q5_k_values(b: &[u8]) -> [u8; QK_K] {
    let (qh, qs) = (&b[16..48], &b[48..176]);
    let mut out = [0u8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            let q = qs[32 * c + l];
            out[64 * c + l] = (q & 0x0f) | ((qh[l] >> (2 * c)) & 1) << 4;
            out[64 * c + 32 + l] = (q >> 4) | ((qh[l] >> (2 * c + 1)) & 1) << 4;
        }
    }
    out
}

/// Q5_K block: f16 d, f16 dmin, 12 bytes of packed scales/mins (as Q4_K), 32 bytes of high
/// bits, 128 bytes of low nibbles.
pub fn dequantize_row_q5_k(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(Q5_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let min = f16_at(b, 2);
        let values = q5_k_values(b);
        for (j, (yj, vj)) in y
            .chunks_exact_mut(32)
            .zip(values.chunks_exact(32))
            .enumerate()
        {
            let (sc, m) = scale_min_k4(j, &b[4..16]);
            let (dl, ml) = (d * sc as f32, min * m as f32);
            for (o, &v) in yj.iter_mut().zip(vj) {
                *o = dl * v as f32 - ml;
            }
        }
    }
}

/// Q6_K block: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d.
pub fn dequantize_row_q6_k(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(Q6_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 208);
        for half in 0..2 {
            let ql = &b[64 * half..64 * half + 64];
            let qh = &b[128 + 32 * half..128 + 32 * half + 32];
            let sc = &b[192 + 8 * half..192 + 8 * half + 8];
            let y = &mut y[128 * half..128 * half + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// Q8_K (activations for k-quant and i-quant weights): f32 d, 256 int8, 16 int16 sums of 16
/// values each.
pub const Q8_K_BYTES: usize = 292;

/// Where a Q8_K block's 16 i16 block sums start.
pub const Q8_K_BSUMS_AT: usize = 4 + QK_K;

/// ggml's `quantize_row_q8_K_ref`: scale from the value of largest magnitude (with its sign),
/// round half to even, and per-16 sums for the k-quant minimum terms. The quants are within
/// -127..=127: some SIMD kernels negate them.
pub fn quantize_row_q8_k(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(out.len(), x.len() / QK_K * Q8_K_BYTES);
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q8_K_BYTES)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        ob.fill(0);
        if amax == 0.0 {
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in ob[4..4 + QK_K].iter_mut().zip(xb) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8 as u8;
        }
        for g in 0..QK_K / 16 {
            let sum: i32 = ob[4 + 16 * g..4 + 16 * g + 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            let at = Q8_K_BSUMS_AT + 2 * g;
            ob[at..at + 2].copy_from_slice(&(sum as i16).to_le_bytes());
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// The f32 scale of the Q8_K block `b`.
#[inline]
pub fn q8k_d(b: &[u8]) -> f32 {
    super::f32_at(b, 0)
}

/// The sum of values 16g..16g + 16 of the Q8_K block `b`.
#[inline]
pub fn q8k_bsum(b: &[u8], g: usize) -> i32 {
    let at = Q8_K_BSUMS_AT + 2 * g;
    i16::from_le_bytes([b[at], b[at + 1]]) as i32
}

/// The 256 int8 quants of the Q8_K block `b`.
#[inline]
pub fn q8k_quants(b: &[u8]) -> &[u8] {
    &b[4..4 + QK_K]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::random::random_vec;

    #[test]
    fn packed_scales_unpack_like_get_scale_min_k4() {
        for seed in 0..64 {
            let q: Vec<u8> = random_vec(12, seed, 1.0)
                .iter()
                .map(|v| ((v + 1.0) * 127.99) as u8)
                .collect();
            let (sc, mn) = q4_k_scales_mins(&q);
            for j in 0..8 {
                assert_eq!((sc[j], mn[j]), scale_min_k4(j, &q), "j={j} {q:?}");
            }
        }
        let ones = [0xffu8; 12];
        assert_eq!(q4_k_scales_mins(&ones), ([63; 8], [63; 8]));
    }

    /// The Q3_K scale layout by hand: scale k's low nibble and high pair set one at a time.
    #[test]
    fn q3_k_scales_unpack_ggml_layout() {
        for k in 0..16 {
            let mut packed = [0u8; 12];
            packed[k % 8] = 0x0f << (4 * (k / 8));
            assert_eq!(q3_k_scales(&packed)[k], 15 - 32, "low nibble of scale {k}");
            let mut packed = [0u8; 12];
            packed[8 + k % 4] = 3 << (2 * (k / 4));
            let s = q3_k_scales(&packed);
            assert_eq!(s[k], 48 - 32, "high bits of scale {k}");
            assert_eq!(s.iter().filter(|&&v| v != -32).count(), 1);
        }
    }

    #[test]
    fn q8_k_blocks_and_sums() {
        let x = random_vec(512, 3, 2.0);
        let mut q = vec![0u8; 2 * Q8_K_BYTES];
        quantize_row_q8_k(&x, &mut q);
        for (b, xb) in q.chunks_exact(Q8_K_BYTES).zip(x.chunks_exact(QK_K)) {
            let d = q8k_d(b);
            for (j, &v) in xb.iter().enumerate() {
                assert!((b[4 + j] as i8 as f32 * d - v).abs() <= d.abs() * 0.5 + 1e-6);
            }
            for g in 0..16 {
                let s: i32 = b[4 + 16 * g..4 + 16 * g + 16]
                    .iter()
                    .map(|&v| v as i8 as i32)
                    .sum();
                assert_eq!(s, q8k_bsum(b, g));
            }
        }
    }
}
