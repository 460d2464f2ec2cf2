//! NEON products of the 32-value block formats against Q8_0 activations (ggml's NEON
//! `ggml_vec_dot_{q8_0,q4_0,iq4_nl,mxfp4}_q8_0`): the block's 32 values as signed bytes, dotted
//! with the activations, scaled by both block scales.

use std::arch::aarch64::*;

use super::{f16_scale, load_i8x16, I8Dot, QuantDot};
use crate::tensor::blocks::block32::{
    e8m0_half, IQ4_NL_BYTES, IQ4_NL_LEVELS, MXFP4_BYTES, MXFP4_LEVELS, Q4_0_BYTES, Q8_0_BYTES,
};

/// A 32-value format: its values in the order of the Q8_0 block they are dotted with, and its
/// scale.
pub(super) trait Block32 {
    const BYTES: usize;
    unsafe fn values(p: *const u8) -> [int8x16_t; 2];
    unsafe fn scale(p: *const u8) -> f32;
}

pub(super) struct Q8_0;
impl Block32 for Q8_0 {
    const BYTES: usize = Q8_0_BYTES;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        [load_i8x16(p.add(2)), load_i8x16(p.add(18))]
    }
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> f32 {
        f16_scale(p)
    }
}

/// Values 0..16 from the low nibbles, 16..32 from the high ones, minus 8.
pub(super) struct Q4_0;
impl Block32 for Q4_0 {
    const BYTES: usize = Q4_0_BYTES;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        let packed = vld1q_u8(p.add(2));
        let eight = vdupq_n_s8(8);
        let lo = vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0f)));
        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed));
        [vsubq_s8(lo, eight), vsubq_s8(hi, eight)]
    }
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> f32 {
        f16_scale(p)
    }
}

/// 16 packed bytes of 4-bit indices as the levels they select: the low nibbles (values 0..16),
/// then the high ones (values 16..32).
#[inline(always)]
pub(super) unsafe fn lookup4(qs: *const u8, levels: &[i8; 16]) -> [int8x16_t; 2] {
    let table = vld1q_s8(levels.as_ptr());
    let packed = vld1q_u8(qs);
    [
        vqtbl1q_s8(table, vandq_u8(packed, vdupq_n_u8(0x0f))),
        vqtbl1q_s8(table, vshrq_n_u8::<4>(packed)),
    ]
}

pub(super) struct Iq4Nl;
impl Block32 for Iq4Nl {
    const BYTES: usize = IQ4_NL_BYTES;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        lookup4(p.add(2), &IQ4_NL_LEVELS)
    }
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> f32 {
        f16_scale(p)
    }
}

pub(super) struct Mxfp4;
impl Block32 for Mxfp4 {
    const BYTES: usize = MXFP4_BYTES;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 2] {
        lookup4(p.add(1), &MXFP4_LEVELS)
    }
    #[inline(always)]
    unsafe fn scale(p: *const u8) -> f32 {
        e8m0_half(*p)
    }
}

/// `acc` plus block `b` of `w` dotted with block `b` of the Q8_0 `x`, scaled by both block
/// scales.
#[inline(always)]
unsafe fn block_step<D: I8Dot, B: Block32>(
    acc: float32x4_t,
    pw: *const u8,
    px: *const u8,
    b: usize,
) -> float32x4_t {
    let xb = px.add(b * Q8_0_BYTES);
    let wb = pw.add(b * B::BYTES);
    let d = B::scale(wb) * f16_scale(xb);
    vfmaq_n_f32(
        acc,
        vcvtq_f32_s32(D::dot32(B::values(wb), Q8_0::values(xb))),
        d,
    )
}

/// Whole blocks of `w` against the Q8_0 blocks of `x`. Two blocks per step into two
/// accumulators, as ggml does, so consecutive blocks' multiply-adds do not wait on each other.
impl<B: Block32> QuantDot for B {
    const W_BYTES: usize = B::BYTES;
    const X_BYTES: usize = Q8_0_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let nb = w.len() / B::BYTES;
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc0 = vdupq_n_f32(0.0);
        let mut acc1 = vdupq_n_f32(0.0);
        let mut b = 0;
        while b + 2 <= nb {
            acc0 = block_step::<D, B>(acc0, pw, px, b);
            acc1 = block_step::<D, B>(acc1, pw, px, b + 1);
            b += 2;
        }
        if b < nb {
            acc0 = block_step::<D, B>(acc0, pw, px, b);
        }
        vaddvq_f32(vaddq_f32(acc0, acc1))
    }
}
