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

/// [`super::super::Kernels::gemm_q8_0`] for a 32-value format: `out[r * n + t] = w_r . x_t`,
/// each value computed exactly as the table's dot kernel computes it (same products, same
/// two-accumulator order), so the tiles are bit-identical to the dot pair by pair.
pub(super) fn gemm<D: I8Dot, B: Block32>(
    w: &[u8],
    rows: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(out.len() >= rows * n, "gemm shape");
    assert_eq!(
        w.len() % (rows * B::BYTES),
        0,
        "whole weight blocks per row"
    );
    assert_eq!(
        x.len() % (n * Q8_0_BYTES),
        0,
        "whole activation blocks per row"
    );
    let nb = w.len() / rows / B::BYTES;
    assert_eq!(nb, x.len() / n / Q8_0_BYTES, "block counts differ");
    // SAFETY: shapes checked above; `D::gemm32` is compiled with the features `D` needs, and the
    // `Sdot` instances are only in the dotprod table.
    unsafe { D::gemm32::<B>(w.as_ptr(), rows, x.as_ptr(), n, nb, out.as_mut_ptr()) }
}

/// The tile loop behind [`gemm`], always inlined into a function compiled with `D`'s features.
/// Tiles of two rows by two tokens: each weight block is unpacked (and its scale converted) once
/// for two tokens, each activation block loaded once for two rows, and the eight accumulators,
/// four loaded blocks and their products fit the 32 vector registers. Remainders take 2x1, 1x2
/// and 1x1 tiles. A single token (decoding) takes 2x1 tiles too: two row streams at once (on
/// AVX2, four streams cost decoding time and single rows are used there; on aarch64 the pairs
/// execute fewer instructions and are not timed on a board yet: docs/KERNELS.md).
#[inline(always)]
pub(super) unsafe fn gemm_tiles<D: I8Dot, B: Block32>(
    pw: *const u8,
    rows: usize,
    px: *const u8,
    n: usize,
    nb: usize,
    out: *mut f32,
) {
    let (w_row, x_row) = (nb * B::BYTES, nb * Q8_0_BYTES);
    let mut r = 0;
    while r < rows {
        let pr = pw.add(r * w_row);
        let or = out.add(r * n);
        let two_rows = r + 2 <= rows;
        let mut t = 0;
        while t < n {
            let (pt, ot) = (px.add(t * x_row), or.add(t));
            match (two_rows, t + 2 <= n) {
                (true, true) => tile::<D, B, 2, 2>(pr, w_row, pt, x_row, nb, ot, n),
                (true, false) => tile::<D, B, 2, 1>(pr, w_row, pt, x_row, nb, ot, n),
                (false, true) => tile::<D, B, 1, 2>(pr, w_row, pt, x_row, nb, ot, n),
                (false, false) => tile::<D, B, 1, 1>(pr, w_row, pt, x_row, nb, ot, n),
            }
            t += if t + 2 <= n { 2 } else { 1 };
        }
        r += if two_rows { 2 } else { 1 };
    }
}

/// `R` weight rows (`w_row` bytes apart) against `T` activation rows (`x_row` apart), written to
/// `out[r * ldo + t]`. Even blocks go to accumulator 0 and odd ones to accumulator 1 of each
/// pair, as in the dot kernel.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<D: I8Dot, B: Block32, const R: usize, const T: usize>(
    pw: *const u8,
    w_row: usize,
    px: *const u8,
    x_row: usize,
    nb: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[[vdupq_n_f32(0.0); 2]; T]; R];
    let mut b = 0;
    while b + 2 <= nb {
        tile_block::<D, B, R, T, 0>(&mut acc, pw, w_row, px, x_row, b);
        tile_block::<D, B, R, T, 1>(&mut acc, pw, w_row, px, x_row, b + 1);
        b += 2;
    }
    if b < nb {
        tile_block::<D, B, R, T, 0>(&mut acc, pw, w_row, px, x_row, b);
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, [a0, a1]) in acc_r.iter().enumerate() {
            *out.add(r * ldo + t) = vaddvq_f32(vaddq_f32(*a0, *a1));
        }
    }
}

/// Block `b` of every row of the tile against block `b` of every token, into accumulator `H`.
#[inline(always)]
unsafe fn tile_block<D: I8Dot, B: Block32, const R: usize, const T: usize, const H: usize>(
    acc: &mut [[[float32x4_t; 2]; T]; R],
    pw: *const u8,
    w_row: usize,
    px: *const u8,
    x_row: usize,
    b: usize,
) {
    let mut wv = [[vdupq_n_s8(0); 2]; R];
    let mut ws = [0f32; R];
    for r in 0..R {
        let p = pw.add(r * w_row + b * B::BYTES);
        wv[r] = B::values(p);
        ws[r] = B::scale(p);
    }
    for t in 0..T {
        let p = px.add(t * x_row + b * Q8_0_BYTES);
        let (xv, xs) = (Q8_0::values(p), f16_scale(p));
        for r in 0..R {
            let sum = vcvtq_f32_s32(D::dot32(wv[r], xv));
            acc[r][t][H] = vfmaq_n_f32(acc[r][t][H], sum, ws[r] * xs);
        }
    }
}
