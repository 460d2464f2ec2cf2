//! NEON k-quant products against Q8_K activations (ggml's NEON `ggml_vec_dot_q*_K_q8_K`; its
//! `ggml_vdotq_s32` is `sdot` with dotprod and the widening sum otherwise, as here). The quants
//! are small non-negative bytes (Q3_K's signed, -4..=3), dotted with the activations per 16 or
//! 32 values and scaled in exact i32 arithmetic; the float steps are once per block.

use std::arch::aarch64::*;

use super::{f16_scale, f32_at, load_i16x8, load_i8x16, I8Dot, QuantDot};
use crate::tensor::blocks::kquant::{
    q3_k_scales, q4_k_scales_mins, Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES,
    Q8_K_BSUMS_AT, Q8_K_BYTES,
};

/// Bits `2k..2k + 2` of every byte of `bits`.
#[inline(always)]
unsafe fn crumb(bits: uint8x16_t, k: usize) -> int8x16_t {
    let shifted = vshlq_u8(bits, vdupq_n_s8(-2 * k as i8));
    vreinterpretq_s8_u8(vandq_u8(shifted, vdupq_n_u8(3)))
}

/// The sum of `mins[g] * bsums[g]` over the 16 groups of a Q8_K block (16-bit mins).
#[inline(always)]
unsafe fn mins_dot_bsums(mins: [int16x8_t; 2], xb: *const u8) -> i32 {
    let bsums = xb.add(Q8_K_BSUMS_AT);
    let q8sums = [load_i16x8(bsums), load_i16x8(bsums.add(16))];
    let s0 = vaddq_s32(
        vmull_s16(vget_low_s16(mins[0]), vget_low_s16(q8sums[0])),
        vmull_high_s16(mins[0], q8sums[0]),
    );
    let s1 = vaddq_s32(
        vmull_s16(vget_low_s16(mins[1]), vget_low_s16(q8sums[1])),
        vmull_high_s16(mins[1], q8sums[1]),
    );
    vaddvq_s32(vaddq_s32(s0, s1))
}

/// Q2_K: per 16 values the 2-bit quants dotted with the activations times the 4-bit scale;
/// the minimum term is the 4-bit mins times the Q8_K 16-value sums.
pub(super) struct Q2K;
impl QuantDot for Q2K {
    const W_BYTES: usize = Q2_K_BYTES;
    const X_BYTES: usize = Q8_K_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let nb = w.len() / Q2_K_BYTES;
        let m4 = vdupq_n_u8(0x0f);
        let mut sum = 0f32;
        for i in 0..nb {
            let wb = w.as_ptr().add(i * Q2_K_BYTES);
            let xb = x.as_ptr().add(i * Q8_K_BYTES);
            let dy = f32_at(xb);
            let d = dy * f16_scale(wb.add(80));
            let dmin = -dy * f16_scale(wb.add(82));

            let packed = vld1q_u8(wb);
            let mut sc = [0u8; 16];
            vst1q_u8(sc.as_mut_ptr(), vandq_u8(packed, m4));
            let mins = vshrq_n_u8::<4>(packed);
            let mins16 = [
                vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(mins))),
                vreinterpretq_s16_u16(vmovl_high_u8(mins)),
            ];
            sum += dmin * mins_dot_bsums(mins16, xb) as f32;

            // Chunk (j, k): values 128j + 32k..+32, crumb k of quant bytes 32j..32j + 32, its
            // halves in groups 8j + 2k and 8j + 2k + 1.
            let mut isum = vdupq_n_s32(0);
            for j in 0..2 {
                let bits = [vld1q_u8(wb.add(16 + 32 * j)), vld1q_u8(wb.add(32 + 32 * j))];
                for k in 0..4 {
                    for (h, &half) in bits.iter().enumerate() {
                        let q8 = load_i8x16(xb.add(4 + 128 * j + 32 * k + 16 * h));
                        let p = D::dot16(crumb(half, k), q8);
                        isum = vmlaq_n_s32(isum, p, sc[8 * j + 2 * k + h] as i32);
                    }
                }
            }
            sum += d * vaddvq_s32(isum) as f32;
        }
        sum
    }
}

/// Q3_K: per 16 values the signed 3-bit quants (two low bits, minus 4 where the high-bit mask
/// is clear) dotted with the activations, times the signed 6-bit scale.
pub(super) struct Q3K;
impl QuantDot for Q3K {
    const W_BYTES: usize = Q3_K_BYTES;
    const X_BYTES: usize = Q8_K_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let nb = w.len() / Q3_K_BYTES;
        let four = vdupq_n_u8(4);
        let mut sum = 0f32;
        for i in 0..nb {
            let wb = w.as_ptr().add(i * Q3_K_BYTES);
            let xb = x.as_ptr().add(i * Q8_K_BYTES);
            let d = f16_scale(wb.add(108)) * f32_at(xb);
            let scales = q3_k_scales(&w[i * Q3_K_BYTES + 96..i * Q3_K_BYTES + 108]);
            let hbits = [vld1q_u8(wb), vld1q_u8(wb.add(16))];
            // Chunk (j, k) as Q2_K's; its high bit is bit 4j + k of the mask bytes.
            let mut isum = vdupq_n_s32(0);
            for j in 0..2 {
                let bits = [vld1q_u8(wb.add(32 + 32 * j)), vld1q_u8(wb.add(48 + 32 * j))];
                let mask = vdupq_n_u8(1 << (4 * j));
                for k in 0..4 {
                    let mask = vshlq_u8(mask, vdupq_n_s8(k as i8));
                    for h in 0..2 {
                        let clear = vbicq_u8(four, vtstq_u8(hbits[h], mask));
                        let q = vsubq_s8(crumb(bits[h], k), vreinterpretq_s8_u8(clear));
                        let q8 = load_i8x16(xb.add(4 + 128 * j + 32 * k + 16 * h));
                        let scale = scales[8 * j + 2 * k + h] as i32;
                        isum = vmlaq_n_s32(isum, D::dot16(q, q8), scale);
                    }
                }
            }
            sum += d * vaddvq_s32(isum) as f32;
        }
        sum
    }
}

/// Q4_K (`FIVE` false) and Q5_K (`FIVE` true). Per 32-value sub-block: the quants (nibbles,
/// plus the fifth bit as 16 for Q5_K; non-negative, so signed bytes) dotted with the
/// activations, times the 6-bit scale; the minimum term is the 6-bit mins times the sums of
/// each sub-block's activations (pairs of the Q8_K 16-value sums).
pub(super) struct K4<const FIVE: bool>;
pub(super) type Q4K = K4<false>;
pub(super) type Q5K = K4<true>;
impl<const FIVE: bool> QuantDot for K4<FIVE> {
    const W_BYTES: usize = if FIVE { Q5_K_BYTES } else { Q4_K_BYTES };
    const X_BYTES: usize = Q8_K_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let bytes = Self::W_BYTES;
        let qs_at = if FIVE { 48 } else { 16 };
        let nb = w.len() / bytes;
        let m4 = vdupq_n_u8(0x0f);
        let one = vdupq_n_u8(1);
        let mut sumf = 0f32;
        for i in 0..nb {
            let wb = w.as_ptr().add(i * bytes);
            let xb = x.as_ptr().add(i * Q8_K_BYTES);
            let dy = f32_at(xb);
            let d = dy * f16_scale(wb);
            let dmin = dy * f16_scale(wb.add(2));

            let bsums = xb.add(Q8_K_BSUMS_AT);
            let q8sums = vpaddq_s16(load_i16x8(bsums), load_i16x8(bsums.add(16)));
            let (sc, mn) = q4_k_scales_mins(&w[i * bytes + 4..i * bytes + 16]);
            let mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mn.as_ptr())));
            let prod = vaddq_s32(
                vmull_s16(vget_low_s16(q8sums), vget_low_s16(mins)),
                vmull_high_s16(q8sums, mins),
            );
            sumf -= dmin * vaddvq_s32(prod) as f32;

            let qh = [vld1q_u8(wb.add(16)), vld1q_u8(wb.add(32))];
            let (mut sumi1, mut sumi2) = (0i32, 0i32);
            for j in 0..4 {
                let q = wb.add(qs_at + 32 * j);
                let bits = [vld1q_u8(q), vld1q_u8(q.add(16))];
                let q8 = xb.add(4 + 64 * j);
                // The fifth bits of sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles).
                let fifth = |h: usize, bit: usize| {
                    if FIVE {
                        let b = vandq_u8(vshlq_u8(qh[h], vdupq_n_s8(-(bit as i8))), one);
                        vshlq_n_u8::<4>(b)
                    } else {
                        vdupq_n_u8(0)
                    }
                };
                let lo = [
                    vreinterpretq_s8_u8(vorrq_u8(vandq_u8(bits[0], m4), fifth(0, 2 * j))),
                    vreinterpretq_s8_u8(vorrq_u8(vandq_u8(bits[1], m4), fifth(1, 2 * j))),
                ];
                let p1 = D::dot32(lo, [load_i8x16(q8), load_i8x16(q8.add(16))]);
                sumi1 += vaddvq_s32(p1) * sc[2 * j] as i32;
                let hi = [
                    vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(bits[0]), fifth(0, 2 * j + 1))),
                    vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(bits[1]), fifth(1, 2 * j + 1))),
                ];
                let p2 = D::dot32(hi, [load_i8x16(q8.add(32)), load_i8x16(q8.add(48))]);
                sumi2 += vaddvq_s32(p2) * sc[2 * j + 1] as i32;
            }
            sumf += d * (sumi1 + sumi2) as f32;
        }
        sumf
    }
}

/// Per 16 values: the 6-bit values unsigned (0..=63, so signed bytes) dotted with the activations,
/// times the signed scale; the offset of 32 is taken off once per block as
/// 32 * sum(scale * Q8_K 16-value sum).
pub(super) struct Q6K;
impl QuantDot for Q6K {
    const W_BYTES: usize = Q6_K_BYTES;
    const X_BYTES: usize = Q8_K_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let nb = w.len() / Q6_K_BYTES;
        let m4 = vdupq_n_u8(0x0f);
        let m3 = vdupq_n_u8(3);
        let mut sum = 0f32;
        for i in 0..nb {
            let wb = w.as_ptr().add(i * Q6_K_BYTES);
            let xb = x.as_ptr().add(i * Q8_K_BYTES);
            let d_all = f16_scale(wb.add(208));

            let bsums = xb.add(Q8_K_BSUMS_AT);
            let q8sums = [load_i16x8(bsums), load_i16x8(bsums.add(16))];
            let scales = load_i8x16(wb.add(192));
            let q6scales = [vmovl_s8(vget_low_s8(scales)), vmovl_high_s8(scales)];
            let prod = vaddq_s32(
                vaddq_s32(
                    vmull_s16(vget_low_s16(q8sums[0]), vget_low_s16(q6scales[0])),
                    vmull_high_s16(q8sums[0], q6scales[0]),
                ),
                vaddq_s32(
                    vmull_s16(vget_low_s16(q8sums[1]), vget_low_s16(q6scales[1])),
                    vmull_high_s16(q8sums[1], q6scales[1]),
                ),
            );
            let isum_mins = vaddvq_s32(prod);

            let mut isum = 0i32;
            for half in 0..2 {
                let ql = wb.add(64 * half);
                let qh = wb.add(128 + 32 * half);
                let qhbits = [vld1q_u8(qh), vld1q_u8(qh.add(16))];
                let q6bits = [
                    vld1q_u8(ql),
                    vld1q_u8(ql.add(16)),
                    vld1q_u8(ql.add(32)),
                    vld1q_u8(ql.add(48)),
                ];
                let scale = wb.add(192 + 8 * half) as *const i8;
                let q8 = xb.add(4 + 128 * half);
                // Four 32-value chunks, each as two halves of 16 with their own scale: chunk k takes
                // the low (k < 2) or high (k >= 2) nibbles of ql bytes 32 * (k % 2)..+32 and bits
                // 2k..2k+2 of qh.
                for k in 0..4 {
                    for h in 0..2 {
                        let bits = q6bits[2 * (k % 2) + h];
                        let low = if k < 2 {
                            vandq_u8(bits, m4)
                        } else {
                            vshrq_n_u8::<4>(bits)
                        };
                        let high = match k {
                            0 => vandq_u8(qhbits[h], m3),
                            1 => vandq_u8(vshrq_n_u8::<2>(qhbits[h]), m3),
                            2 => vandq_u8(vshrq_n_u8::<4>(qhbits[h]), m3),
                            _ => vshrq_n_u8::<6>(qhbits[h]),
                        };
                        let q6 = vreinterpretq_s8_u8(vorrq_u8(low, vshlq_n_u8::<4>(high)));
                        let p = D::dot16(q6, load_i8x16(q8.add(32 * k + 16 * h)));
                        isum += vaddvq_s32(p) * *scale.add(2 * k + h) as i32;
                    }
                }
            }
            sum += d_all * f32_at(xb) * (isum - 32 * isum_mins) as f32;
        }
        sum
    }
}
