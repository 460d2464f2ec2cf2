//! K-quant encoders (Q2_K..Q6_K) writing the bytes llama-quantize writes: ggml's
//! `ggml_quantize_chunk` runs `quantize_row_qX_K_ref` when no importance matrix is given and
//! `quantize_row_qX_K_impl` when one is, so both are here, each a port of ggml-quants.c with
//! its float operations in ggml's order (the searches are in `kquant_search`).
//!
//! An importance vector is per column of the row (its length is the row length); the encoders
//! take the 256 weights of each super-block's columns.

// Indexed loops on purpose: they mirror ggml's, which keeps a line-by-line check possible.
#![allow(clippy::needless_range_loop)]

use half::f16;

use super::kquant::scale_min_k4;
use super::kquant::{Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES};
use super::kquant_search::{
    make_q3_quants, make_qkx_quants, make_qp_quants, make_qx_quants, nearest_int, MinSearch,
    GROUP_MAX_EPS,
};
use super::QK_K;

/// f32 -> f16 -> f32 as ggml's `GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))`, and the f16 bits.
#[inline]
fn to_f16(x: f32) -> ([u8; 2], f32) {
    let h = f16::from_f32(x);
    (h.to_bits().to_le_bytes(), h.to_f32())
}

/// Packs 2-bit quants as Q2_K and Q3_K store them: value `j + l + 32 * s` of each 128 at bits
/// `2 * s` of byte `j / 4 + l`.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for k in 0..32 {
            qs[j / 4 + k] =
                l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6);
        }
    }
}

/// Q2_K: 16 groups of 16 with 4-bit scales and mins, quants 0..=3.
/// Layout: scales[16], qs[64], d, dmin.
pub fn quantize_block_q2_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut mins = [0f32; 16];
    let mut scales = [0f32; 16];
    let mut weights = [0f32; 16];
    let (head, tail) = y.split_at_mut(80);
    let (sc, qs) = head.split_at_mut(16);
    let (dm, mm);
    match qw {
        None => {
            let search = MinSearch {
                rmin: -0.5,
                rdelta: 0.1,
                nstep: 15,
                use_mad: true,
            };
            let (mut max_scale, mut max_min) = (0f32, 0f32);
            for j in 0..16 {
                let xs = &x[16 * j..][..16];
                for (w, v) in weights.iter_mut().zip(xs) {
                    *w = v.abs();
                }
                (scales[j], mins[j]) = make_qkx_quants(3, xs, &weights, &mut l[16 * j..], search);
                if scales[j] > max_scale {
                    max_scale = scales[j];
                }
                if mins[j] > max_min {
                    max_min = mins[j];
                }
            }
            let q4scale = 15f32;
            let d_bits;
            if max_scale > 0.0 {
                let iscale = q4scale / max_scale;
                for j in 0..16 {
                    sc[j] = nearest_int(iscale * scales[j]) as u8;
                }
                (d_bits, dm) = to_f16(max_scale / q4scale);
            } else {
                sc.fill(0);
                (d_bits, dm) = to_f16(0.0);
            }
            let m_bits;
            if max_min > 0.0 {
                let iscale = q4scale / max_min;
                for j in 0..16 {
                    sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
                }
                (m_bits, mm) = to_f16(max_min / q4scale);
            } else {
                (m_bits, mm) = to_f16(0.0);
            }
            tail[..2].copy_from_slice(&d_bits);
            tail[2..].copy_from_slice(&m_bits);
        }
        Some(qw) => {
            let search = MinSearch {
                rmin: -0.9,
                rdelta: 0.05,
                nstep: 36,
                use_mad: false,
            };
            let mut sw = [0f32; 16];
            let mut sumx2 = 0f32;
            for v in &x[..QK_K] {
                sumx2 += v * v;
            }
            let sigma2 = sumx2 / QK_K as f32;
            for j in 0..16 {
                let xs = &x[16 * j..][..16];
                for (k, w) in weights.iter_mut().enumerate() {
                    *w = qw[16 * j + k] * (sigma2 + xs[k] * xs[k]).sqrt();
                }
                for w in &weights {
                    sw[j] += w;
                }
                (scales[j], mins[j]) = make_qkx_quants(3, xs, &weights, &mut l[16 * j..], search);
            }
            let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
            let d = make_qp_quants(15, &scales, &mut ls, &sw);
            let m = make_qp_quants(15, &mins, &mut lm, &sw);
            let (d_bits, m_bits);
            (d_bits, dm) = to_f16(d);
            (m_bits, mm) = to_f16(m);
            tail[..2].copy_from_slice(&d_bits);
            tail[2..].copy_from_slice(&m_bits);
            for j in 0..16 {
                sc[j] = ls[j] | (lm[j] << 4);
            }
        }
    }
    for j in 0..16 {
        let d = dm * (sc[j] & 0xf) as f32;
        if d == 0.0 {
            continue;
        }
        let m = mm * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + m) / d).clamp(0, 3);
            l[16 * j + ii] = q as u8;
        }
    }
    pack_2bit(&l, qs);
}

/// Q3_K's 6-bit scale `l` (already offset by 32) of group j into its 12 packed bytes.
#[inline]
fn put_q3_scale(scales: &mut [u8], j: usize, l: u8) {
    if j < 8 {
        scales[j] = l & 0xf;
    } else {
        scales[j - 8] |= (l & 0xf) << 4;
    }
    scales[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
}

/// Q3_K: 16 groups of 16 with signed 6-bit scales, quants -4..=3.
/// Layout: hmask[32], qs[64], scales[12], d.
pub fn quantize_block_q3_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (hmask, rest) = y.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, d_out) = rest.split_at_mut(12);
    sc.fill(0);
    let d_all;
    match qw {
        None => {
            let (mut max_scale, mut amax) = (0f32, 0f32);
            for j in 0..16 {
                scales[j] = make_q3_quants(4, &x[16 * j..][..16], &mut l[16 * j..], true);
                let scale = scales[j].abs();
                if scale > amax {
                    amax = scale;
                    max_scale = scales[j];
                }
            }
            let d_bits;
            if max_scale != 0.0 {
                let iscale = -32.0 / max_scale;
                for j in 0..16 {
                    let q = nearest_int(iscale * scales[j]) as i8;
                    put_q3_scale(sc, j, (q.clamp(-32, 31) + 32) as u8);
                }
                (d_bits, d_all) = to_f16(1.0 / iscale);
            } else {
                (d_bits, d_all) = to_f16(0.0);
            }
            d_out.copy_from_slice(&d_bits);
        }
        Some(qw) => {
            let mut weight = [0f32; 16];
            let mut sw = [0f32; 16];
            let mut sumx2 = 0f32;
            for v in &x[..QK_K] {
                sumx2 += v * v;
            }
            let sigma2 = 2.0 * sumx2 / QK_K as f32;
            for j in 0..16 {
                let xs = &x[16 * j..][..16];
                for (k, w) in weight.iter_mut().enumerate() {
                    *w = qw[16 * j + k] * (sigma2 + xs[k] * xs[k]).sqrt();
                }
                let mut sumw = 0f32;
                for w in &weight {
                    sumw += w;
                }
                sw[j] = sumw;
                scales[j] = make_qx_quants(4, xs, &mut l[16 * j..], 1, Some(&weight));
            }
            let mut ls = [0i8; 16];
            let d_block = make_qx_quants(32, &scales, &mut ls, 1, Some(&sw));
            for (j, &q) in ls.iter().enumerate() {
                put_q3_scale(sc, j, q as u8);
            }
            let d_bits;
            (d_bits, d_all) = to_f16(d_block);
            d_out.copy_from_slice(&d_bits);
        }
    }
    for j in 0..16 {
        let low = if j < 8 { sc[j] & 0xf } else { sc[j - 8] >> 4 };
        let s = (low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
        let d = d_all * s as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    // The high bit of value j goes to bit j / 32 of byte j % 32.
    hmask.fill(0);
    let mut lu = [0u8; QK_K];
    for (j, (u, &v)) in lu.iter_mut().zip(&l).enumerate() {
        let mut v = v as u8;
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        *u = v;
    }
    pack_2bit(&lu, qs);
}

/// Writes eight 6-bit (scale, min) pairs into Q4_K/Q5_K's 12 bytes (the inverse of
/// `scale_min_k4`).
fn put_scales_mins(ls: &[u8; 8], lm: &[u8; 8], out: &mut [u8]) {
    for j in 0..8 {
        if j < 4 {
            out[j] = ls[j];
            out[j + 4] = lm[j];
        } else {
            out[j + 4] = (ls[j] & 0xf) | ((lm[j] & 0xf) << 4);
            out[j - 4] |= (ls[j] >> 4) << 6;
            out[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// The shared part of Q4_K and Q5_K: eight groups of 32 with 6-bit scales and mins, quants
/// `0..=nmax`; writes d, dmin and the 12 scale bytes to `head` (16 bytes) and returns the quants.
fn scale_min_32(x: &[f32], qw: Option<&[f32]>, nmax: i32, head: &mut [u8]) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut weights = [0f32; 32];
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let (d_val, m_val);
    match qw {
        None => {
            // Q4_K's and Q5_K's reference searches differ only in their steps.
            let search = if nmax == 15 {
                MinSearch {
                    rmin: -1.0,
                    rdelta: 0.1,
                    nstep: 20,
                    use_mad: false,
                }
            } else {
                MinSearch {
                    rmin: -0.5,
                    rdelta: 0.1,
                    nstep: 15,
                    use_mad: false,
                }
            };
            let (mut max_scale, mut max_min) = (0f32, 0f32);
            for j in 0..8 {
                let xs = &x[32 * j..][..32];
                let mut sum_x2 = 0f32;
                for v in xs {
                    sum_x2 += v * v;
                }
                let av_x = (sum_x2 / 32.0).sqrt();
                for (w, v) in weights.iter_mut().zip(xs) {
                    *w = av_x + v.abs();
                }
                (scales[j], mins[j]) =
                    make_qkx_quants(nmax, xs, &weights, &mut l[32 * j..], search);
                if scales[j] > max_scale {
                    max_scale = scales[j];
                }
                if mins[j] > max_min {
                    max_min = mins[j];
                }
            }
            let inv_scale = if max_scale > 0.0 {
                63.0 / max_scale
            } else {
                0.0
            };
            let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
            for j in 0..8 {
                ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
                lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
            }
            (d_val, m_val) = (max_scale / 63.0, max_min / 63.0);
        }
        Some(qw) => {
            let search = MinSearch {
                rmin: -0.9,
                rdelta: 0.05,
                nstep: 36,
                use_mad: false,
            };
            let mut sw = [0f32; 8];
            let mut sum_x2 = 0f32;
            for v in &x[..QK_K] {
                sum_x2 += v * v;
            }
            let sigma2 = 2.0 * sum_x2 / QK_K as f32;
            for j in 0..8 {
                let xs = &x[32 * j..][..32];
                for (k, w) in weights.iter_mut().enumerate() {
                    *w = qw[32 * j + k] * (sigma2 + xs[k] * xs[k]).sqrt();
                }
                let mut sumw = 0f32;
                for w in &weights {
                    sumw += w;
                }
                sw[j] = sumw;
                (scales[j], mins[j]) =
                    make_qkx_quants(nmax, xs, &weights, &mut l[32 * j..], search);
            }
            d_val = make_qp_quants(63, &scales, &mut ls, &sw);
            m_val = make_qp_quants(63, &mins, &mut lm, &sw);
            // Q5_K clamps to 63 here and Q4_K does not: make_qp_quants never exceeds 63.
        }
    }
    head[4..16].fill(0);
    put_scales_mins(&ls, &lm, &mut head[4..16]);
    let (d_bits, d) = to_f16(d_val);
    let (m_bits, dmin) = to_f16(m_val);
    head[..2].copy_from_slice(&d_bits);
    head[2..4].copy_from_slice(&m_bits);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &head[4..16]);
        let d = d * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

/// Q4_K: layout d, dmin, scales[12], qs[128] (values j and j + 32 of each 64 share a byte).
pub fn quantize_block_q4_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let (head, qs) = y.split_at_mut(16);
    let l = scale_min_32(x, qw, 15, head);
    for (j, q) in (0..QK_K).step_by(64).zip(qs.chunks_exact_mut(32)) {
        for k in 0..32 {
            q[k] = l[j + k] | (l[j + k + 32] << 4);
        }
    }
}

/// Q5_K: layout d, dmin, scales[12], qh[32], qs[128]; the fifth bits of the 64 values of
/// chunk c go to bits 2c and 2c + 1 of qh.
pub fn quantize_block_q5_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let (head, rest) = y.split_at_mut(16);
    let l = scale_min_32(x, qw, 31, head);
    let (qh, ql) = rest.split_at_mut(32);
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (n, q) in (0..QK_K).step_by(64).zip(ql.chunks_exact_mut(32)) {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// Q6_K: 16 groups of 16 with int8 scales, quants -32..=31.
/// Layout: ql[128], qh[64], scales[16], d. The reference and imatrix paths are the same
/// search, with x² or the importance as weights.
pub fn quantize_block_q6_k(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let w = qw.map(|w| &w[16 * ib..][..16]);
        let scale = make_qx_quants(32, &x[16 * ib..][..16], &mut l[16 * ib..], 1, w);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    y.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let (ql, rest) = y.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (sc, d_out) = rest.split_at_mut(16);
    let iscale = -128.0 / max_scale;
    let (d_bits, d_all) = to_f16(1.0 / iscale);
    d_out.copy_from_slice(&d_bits);
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..16 {
        let d = d_all * (sc[j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    for (j, (ql, qh)) in (0..QK_K)
        .step_by(128)
        .zip(ql.chunks_exact_mut(64).zip(qh.chunks_exact_mut(32)))
    {
        for k in 0..32 {
            let q1 = l[j + k] & 0xf;
            let q2 = l[j + k + 32] & 0xf;
            let q3 = l[j + k + 64] & 0xf;
            let q4 = l[j + k + 96] & 0xf;
            ql[k] = q1 | (q3 << 4);
            ql[k + 32] = q2 | (q4 << 4);
            qh[k] = (l[j + k] >> 4)
                | ((l[j + k + 32] >> 4) << 2)
                | ((l[j + k + 64] >> 4) << 4)
                | ((l[j + k + 96] >> 4) << 6);
        }
    }
}

/// Bytes of one super-block of each k-quant, with its encoder.
pub type BlockEncoder = fn(&[f32], Option<&[f32]>, &mut [u8]);

pub const Q2_K: (usize, BlockEncoder) = (Q2_K_BYTES, quantize_block_q2_k);
pub const Q3_K: (usize, BlockEncoder) = (Q3_K_BYTES, quantize_block_q3_k);
pub const Q4_K: (usize, BlockEncoder) = (Q4_K_BYTES, quantize_block_q4_k);
pub const Q5_K: (usize, BlockEncoder) = (Q5_K_BYTES, quantize_block_q5_k);
pub const Q6_K: (usize, BlockEncoder) = (Q6_K_BYTES, quantize_block_q6_k);
