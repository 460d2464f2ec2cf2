//! IQ4_NL and IQ4_XS encoders writing llama-quantize's bytes: a port of ggml's
//! `quantize_row_iq4_nl_impl` as `quantize_iq4_nl` / `quantize_iq4_xs` call it (seven scale
//! trials either side, x² weights without an importance vector), with ggml's float order.

use half::f16;

use super::block32::{IQ4_NL_BYTES, IQ4_NL_LEVELS};
use super::iquant::IQ4_XS_BYTES;
use super::kquant_search::{nearest_int, GROUP_MAX_EPS};
use super::QK_K;

/// Scale trials either side of the first guess, as `quantize_iq4_nl`/`_xs` pass them.
const NTRY: i32 = 7;

/// The level nearest to `x` (ggml's `best_index_int8`; a tie goes to the upper level).
#[inline]
fn best_index(x: f32) -> usize {
    let val = &IQ4_NL_LEVELS;
    if x <= val[0] as f32 {
        return 0;
    }
    if x >= val[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < val[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (val[mu - 1] as f32) < val[mu] as f32 - x {
        mu - 1
    } else {
        mu
    }
}

/// One super-block of `x.len()` values (32 for IQ4_NL, 256 for IQ4_XS) in blocks of 32: the
/// f16 super-block scale, IQ4_XS's 6-bit block scales (`scales_h`, `scales_l`; unused for
/// IQ4_NL) and the 4-bit indices (`q4`, 16 bytes per block of 32).
fn quantize_super_block(
    x: &[f32],
    qw: Option<&[f32]>,
    scales_h: &mut u16,
    scales_l: &mut [u8],
    q4: &mut [u8],
) -> [u8; 2] {
    const BLOCK: usize = 32;
    let sbs = x.len();
    let nb = sbs / BLOCK;
    let values = &IQ4_NL_LEVELS;
    let v0 = values[0] as f32;
    let mut sigma2 = 0f32;
    for v in x {
        sigma2 += v * v;
    }
    sigma2 *= 2.0 / sbs as f32;
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; QK_K / BLOCK];
    let mut weight = [0f32; BLOCK];
    let (mut max_scale, mut amax_scale) = (0f32, 0f32);
    for ib in 0..nb {
        let xb = &x[ib * BLOCK..][..BLOCK];
        let lb = &mut l[ib * BLOCK..][..BLOCK];
        match qw {
            Some(qw) => {
                for (j, w) in weight.iter_mut().enumerate() {
                    *w = qw[ib * BLOCK + j] * (sigma2 + xb[j] * xb[j]).sqrt();
                }
            }
            None => {
                for (w, v) in weight.iter_mut().zip(xb) {
                    *w = v * v;
                }
            }
        }
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let mut d = -max / v0;
        let mut id = 1.0 / d;
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for j in 0..BLOCK {
            let k = best_index(id * xb[j]);
            lb[j] = k as u8;
            let q = values[k] as f32;
            let w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
        let mut best = d * sumqx;
        for itry in -NTRY..=NTRY {
            id = (itry + values[0] as i32) as f32 / max;
            sumqx = 0.0;
            sumq2 = 0.0;
            for j in 0..BLOCK {
                let q = values[best_index(id * xb[j])] as f32;
                let w = weight[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
            }
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        if d.abs() > amax_scale {
            amax_scale = d.abs();
            max_scale = d;
        }
    }
    let dh;
    if nb > 1 {
        *scales_h = 0;
        let d = -max_scale / 32.0;
        dh = f16::from_f32(d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for ib in 0..nb {
            let s = nearest_int(id * scales[ib]).clamp(-32, 31);
            let dl = d * s as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            let xb = &x[ib * BLOCK..][..BLOCK];
            for (lj, &v) in l[ib * BLOCK..][..BLOCK].iter_mut().zip(xb) {
                *lj = best_index(idl * v) as u8;
            }
            let s = (s + 32) as u8;
            if ib % 2 == 0 {
                scales_l[ib / 2] = s & 0xf;
            } else {
                scales_l[ib / 2] |= (s & 0xf) << 4;
            }
            *scales_h |= ((s >> 4) as u16) << (2 * (ib % 8));
        }
    } else {
        dh = f16::from_f32(scales[0]);
        let id = if scales[0] != 0.0 {
            1.0 / scales[0]
        } else {
            0.0
        };
        for (lj, &v) in l.iter_mut().zip(x) {
            *lj = best_index(id * v) as u8;
        }
    }
    for i in 0..sbs / 32 {
        for j in 0..16 {
            q4[16 * i + j] = l[32 * i + j] | (l[32 * i + 16 + j] << 4);
        }
    }
    dh.to_bits().to_le_bytes()
}

/// IQ4_NL: layout d, qs[16].
pub fn quantize_block_iq4_nl(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut unused = 0u16;
    let (d, qs) = y.split_at_mut(2);
    let bits = quantize_super_block(&x[..32], qw, &mut unused, &mut [], qs);
    d.copy_from_slice(&bits);
}

/// IQ4_XS: layout d, scales_h (u16), scales_l[4], qs[128].
pub fn quantize_block_iq4_xs(x: &[f32], qw: Option<&[f32]>, y: &mut [u8]) {
    let mut scales_h = 0u16;
    let (head, qs) = y.split_at_mut(8);
    let bits = quantize_super_block(&x[..QK_K], qw, &mut scales_h, &mut head[4..8], qs);
    head[..2].copy_from_slice(&bits);
    head[2..4].copy_from_slice(&scales_h.to_le_bytes());
}

pub const IQ4_NL: (usize, super::kquant_encode::BlockEncoder) =
    (IQ4_NL_BYTES, quantize_block_iq4_nl);
pub const IQ4_XS: (usize, super::kquant_encode::BlockEncoder) =
    (IQ4_XS_BYTES, quantize_block_iq4_xs);
