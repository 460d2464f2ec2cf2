//! K-quant block formats (256 values per super-block) as ggml defines them. Only decoding is
//! needed: Hub GGUF files ship these types; moe-convert does not write them yet.

use super::quant::f16_at;

pub const QK_K: usize = 256;
pub const Q4_K_BYTES: usize = 144;
pub const Q6_K_BYTES: usize = 210;

/// Unpacks the j-th 6-bit (scale, min) pair of a Q4_K block (ggml's `get_scale_min_k4`).
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All eight (scale, min) pairs of a Q4_K block's 12 packed bytes at once, the way ggml's SIMD
/// kernels unpack them (`utmp` and `kmask1..3`): the same values as [`scale_min_k4`].
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

/// Q8_K (activations for k-quant weights): f32 d, 256 int8, 16 int16 sums of 16 values each.
pub const Q8_K_BYTES: usize = 292;

/// ggml's `quantize_row_q8_K_ref`: scale from the value of largest magnitude (with its sign),
/// round half to even, and per-16 sums for the k-quant minimum terms.
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
            let at = 4 + QK_K + 2 * g;
            ob[at..at + 2].copy_from_slice(&(sum as i16).to_le_bytes());
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// Where a Q8_K block's 16 i16 block sums start.
pub const Q8_K_BSUMS_AT: usize = 4 + QK_K;

/// The f32 scale of the Q8_K block `b`.
#[inline]
pub fn q8k_d(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[inline]
fn q8k_bsum(b: &[u8], g: usize) -> i32 {
    let at = 4 + QK_K + 2 * g;
    i16::from_le_bytes([b[at], b[at + 1]]) as i32
}

/// Q4_K weights against Q8_K activations (ggml's `ggml_vec_dot_q4_K_q8_K_generic`):
/// per 32-value sub-block, `d * scale * sum(q4 * q8) - dmin * min * sum(q8)`.
pub fn dot_q4_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q4_K_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let scales = &wb[4..16];
        let qs = &wb[16..144];
        let q8 = &xb[4..4 + QK_K];
        let (mut sumi, mut sum_mins) = (0i32, 0i32);
        for chunk in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * chunk, scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
            let q = &qs[32 * chunk..32 * chunk + 32];
            let (lo8, hi8) = (
                &q8[64 * chunk..64 * chunk + 32],
                &q8[64 * chunk + 32..64 * chunk + 64],
            );
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                s1 += (q[l] & 0x0f) as i32 * lo8[l] as i8 as i32;
                s2 += (q[l] >> 4) as i32 * hi8[l] as i8 as i32;
            }
            sumi += sc1 as i32 * s1 + sc2 as i32 * s2;
            let g = 4 * chunk;
            sum_mins += m1 as i32 * (q8k_bsum(xb, g) + q8k_bsum(xb, g + 1))
                + m2 as i32 * (q8k_bsum(xb, g + 2) + q8k_bsum(xb, g + 3));
        }
        let dx = q8k_d(xb);
        sum += f16_at(wb, 0) * dx * sumi as f32 - f16_at(wb, 2) * dx * sum_mins as f32;
    }
    sum
}

/// Q6_K weights against Q8_K activations (ggml's `ggml_vec_dot_q6_K_q8_K_generic`).
pub fn dot_q6_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q6_K_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let q8 = &xb[4..4 + QK_K];
        let mut sumi = 0i32;
        for half in 0..2 {
            let ql = &wb[64 * half..64 * half + 64];
            let qh = &wb[128 + 32 * half..128 + 32 * half + 32];
            let sc = &wb[192 + 8 * half..192 + 8 * half + 8];
            let q8 = &q8[128 * half..128 * half + 128];
            for l in 0..32 {
                let is = l / 16;
                let q = [
                    ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32,
                    ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
                    ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
                    ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
                ];
                for (k, qk) in q.iter().enumerate() {
                    sumi += (sc[is + 2 * k] as i8) as i32 * qk * (q8[l + 32 * k] as i8) as i32;
                }
            }
        }
        sum += f16_at(wb, 208) * q8k_d(xb) * sumi as f32;
    }
    sum
}

/// Deterministic random k-quant rows of `n_blocks` blocks of `block_bytes` (Q4_K_BYTES or
/// Q6_K_BYTES): arbitrary quant, scale and min bits, with the f16 super-block scales replaced by
/// small values of magnitude `scale` (negative ones too), so that values stay finite and of the
/// size of trained weights. For tests and benchmarks.
pub fn random_k_blocks(n_blocks: usize, block_bytes: usize, seed: u64, scale: f32) -> Vec<u8> {
    use crate::tensor::kernels::random_vec;
    let noise = random_vec(n_blocks * block_bytes, seed, 1.0);
    let mut out: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.99) as u8).collect();
    let f16_at: &[usize] = if block_bytes == Q4_K_BYTES {
        &[0, 2]
    } else {
        &[208]
    };
    let ds = random_vec(n_blocks * f16_at.len(), seed ^ 0x5eed, scale);
    for (b, block) in out.chunks_exact_mut(block_bytes).enumerate() {
        for (i, &at) in f16_at.iter().enumerate() {
            let d = half::f16::from_f32(ds[b * f16_at.len() + i]);
            block[at..at + 2].copy_from_slice(&d.to_bits().to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::kernels::tests::random_vec;

    /// Random but valid k-quant blocks: arbitrary bits with small f16 super-block scales.
    fn random_blocks(
        n_blocks: usize,
        block_bytes: usize,
        seed: u64,
        scale_at: &[usize],
    ) -> Vec<u8> {
        let noise = random_vec(n_blocks * block_bytes, seed, 1.0);
        let mut out: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.5) as u8).collect();
        for b in 0..n_blocks {
            for (i, &at) in scale_at.iter().enumerate() {
                let d = half::f16::from_f32(0.01 + 0.003 * i as f32 + 0.001 * b as f32);
                out[b * block_bytes + at..b * block_bytes + at + 2]
                    .copy_from_slice(&d.to_bits().to_le_bytes());
            }
        }
        out
    }

    fn dequantized_dot(ty_dequant: fn(&[u8], &mut [f32]), w: &[u8], x: &[u8], n: usize) -> f64 {
        let mut wd = vec![0f32; n];
        ty_dequant(w, &mut wd);
        let xd: Vec<f32> = x
            .chunks_exact(Q8_K_BYTES)
            .flat_map(|b| {
                let d = q8k_d(b);
                b[4..4 + QK_K].iter().map(move |&q| q as i8 as f32 * d)
            })
            .collect();
        wd.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

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

    #[test]
    fn k_quant_dots_match_dequantized_reference() {
        for seed in 0..4 {
            let n = 512;
            let mut x8 = vec![0u8; n / QK_K * Q8_K_BYTES];
            quantize_row_q8_k(&random_vec(n, 40 + seed, 1.5), &mut x8);
            let w4 = random_blocks(n / QK_K, Q4_K_BYTES, 50 + seed, &[0, 2]);
            let want = dequantized_dot(dequantize_row_q4_k, &w4, &x8, n);
            let got = dot_q4_k_q8_k(&w4, &x8) as f64;
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "q4_K {got} vs {want}"
            );
            let w6 = random_blocks(n / QK_K, Q6_K_BYTES, 60 + seed, &[208]);
            let want = dequantized_dot(dequantize_row_q6_k, &w6, &x8, n);
            let got = dot_q6_k_q8_k(&w6, &x8) as f64;
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "q6_K {got} vs {want}"
            );
        }
    }
}
