//! Scalar k-quant dot products against Q8_K activations, in the arithmetic of ggml's
//! `ggml_vec_dot_q*_K_q8_K_generic`.

use crate::tensor::blocks::f16_at;
use crate::tensor::blocks::kquant::*;

/// Q2_K (`ggml_vec_dot_q2_K_q8_K_generic`): per 16 values the 4-bit scale times the 2-bit
/// quants' dot, minus the 4-bit min times the Q8_K 16-value sum.
pub fn dot_q2_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(Q2_K_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let sc = &wb[..16];
        let q8 = q8k_quants(xb);
        let summs: i32 = (0..16).map(|j| q8k_bsum(xb, j) * (sc[j] >> 4) as i32).sum();
        let dall = q8k_d(xb) * f16_at(wb, 80);
        let dmin = q8k_d(xb) * f16_at(wb, 82);
        let mut isum = 0i32;
        for (g, q8g) in q8.chunks_exact(16).enumerate() {
            let shift = 2 * (g / 2 % 4);
            let q2 = &wb[16 + 32 * (g / 8) + 16 * (g % 2)..][..16];
            let isuml: i32 = q8g
                .iter()
                .zip(q2)
                .map(|(&a, &q)| a as i8 as i32 * ((q >> shift) & 3) as i32)
                .sum();
            isum += (sc[g] & 0x0f) as i32 * isuml;
        }
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// Q3_K (`ggml_vec_dot_q3_K_q8_K_generic`): eight i32 lanes (value index mod 8) of scaled
/// products per block, each lane scaled by d into its own float sum, the lanes added last.
pub fn dot_q3_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    for (wb, xb) in w.chunks_exact(Q3_K_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let a = q3_k_values(wb);
        let scales = q3_k_scales(&wb[96..108]);
        let q8 = q8k_quants(xb);
        let mut aux32 = [0i32; 8];
        for (v, (&q, &av)) in q8.iter().zip(&a).enumerate() {
            // ggml forms the product in an i16 (at most 128 * 4), then scales it.
            let p = (q as i8 as i16 * av as i16) as i32;
            aux32[v % 8] += scales[v / 16] as i32 * p;
        }
        let d = f16_at(wb, 108) * q8k_d(xb);
        for (s, &l) in sums.iter_mut().zip(&aux32) {
            *s += d * l as f32;
        }
    }
    sums.iter().fold(0f32, |acc, &s| acc + s)
}

/// Q4_K weights against Q8_K activations (ggml's `ggml_vec_dot_q4_K_q8_K`): per 32-value
/// sub-block, `d * scale * sum(q4 * q8) - dmin * min * sum(q8)`.
pub fn dot_q4_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q4_K_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let scales = &wb[4..16];
        let qs = &wb[16..144];
        let q8 = q8k_quants(xb);
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

/// Q5_K (`ggml_vec_dot_q5_K_q8_K_generic`): as Q3_K, eight i32 lanes of scaled products per
/// block into eight float sums, and the minimum term taken off the total block by block.
pub fn dot_q5_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(Q5_K_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let a = q5_k_values(wb);
        let (scales, mins) = q4_k_scales_mins(&wb[4..16]);
        let q8 = q8k_quants(xb);
        let sumi: i32 = (0..16).map(|j| q8k_bsum(xb, j) * mins[j / 2] as i32).sum();
        let mut aux32 = [0i32; 8];
        for (v, (&q, &av)) in q8.iter().zip(&a).enumerate() {
            let p = (q as i8 as i16 * av as i16) as i32;
            aux32[v % 8] += scales[v / 32] as i32 * p;
        }
        let d = f16_at(wb, 0) * q8k_d(xb);
        for (s, &l) in sums.iter_mut().zip(&aux32) {
            *s += d * l as f32;
        }
        let dmin = f16_at(wb, 2) * q8k_d(xb);
        sumf -= dmin * sumi as f32;
    }
    sums.iter().fold(sumf, |acc, &s| acc + s)
}

/// Q6_K weights against Q8_K activations (ggml's `ggml_vec_dot_q6_K_q8_K`).
pub fn dot_q6_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q6_K_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let q8 = q8k_quants(xb);
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
