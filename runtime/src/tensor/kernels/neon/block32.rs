//! NEON products of the 32-value block formats against Q8_0 activations (after ggml's NEON
//! `ggml_vec_dot_{q8_0,q4_0,iq4_nl,mxfp4}_q8_0`): the block's 32 values as signed bytes, dotted
//! with the activations, scaled by both block scales.
//!
//! Each block's 32 products are summed exactly in i32 first, then
//! `acc = fma(sum, w_scale * x_scale, acc)` in f32, even blocks into one accumulator and odd ones
//! into another, `acc_even + acc_odd` at the end. Written that way, four rows can share one
//! vector of float steps (their block sums gathered into four lanes by pairwise adds, their
//! scales loaded as one vector), as ggml's repacked 4-row kernels do, while every row's result
//! stays bit-identical to the one-row dot: the matrix products are tiles of 4 rows by 2 tokens.

use std::arch::aarch64::*;

use super::{f16_scale, f16x4_to_f32, load_i8x16, I8Dot, QuantDot};
use crate::tensor::blocks::block32::{
    e8m0_half, IQ4_NL_BYTES, IQ4_NL_LEVELS, MXFP4_BYTES, MXFP4_LEVELS, Q4_0_BYTES, Q8_0_BYTES,
};

/// A 32-value format: its values in the order of the Q8_0 block they are dotted with, and its
/// scale.
pub(super) trait Block32 {
    const BYTES: usize;
    unsafe fn values(p: *const u8) -> [int8x16_t; 2];
    unsafe fn scale(p: *const u8) -> f32;
    /// The scales of the blocks at `p`, `p + stride`, `p + 2 stride`, `p + 3 stride`.
    #[inline(always)]
    unsafe fn scales4(p: *const u8, stride: usize) -> float32x4_t {
        let s = [
            Self::scale(p),
            Self::scale(p.add(stride)),
            Self::scale(p.add(2 * stride)),
            Self::scale(p.add(3 * stride)),
        ];
        vld1q_f32(s.as_ptr())
    }
}

/// Four f16 block scales (the first two bytes of each block) as f32 lanes: gathered into one
/// register and converted by one instruction.
#[inline(always)]
pub(super) unsafe fn f16_scales4(p: *const u8, stride: usize) -> float32x4_t {
    let at = |i: usize| std::ptr::read_unaligned(p.add(i * stride) as *const u16);
    let mut h = vdup_n_u16(at(0));
    h = vset_lane_u16::<1>(at(1), h);
    h = vset_lane_u16::<2>(at(2), h);
    h = vset_lane_u16::<3>(at(3), h);
    f16x4_to_f32(h)
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
    #[inline(always)]
    unsafe fn scales4(p: *const u8, stride: usize) -> float32x4_t {
        f16_scales4(p, stride)
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
    #[inline(always)]
    unsafe fn scales4(p: *const u8, stride: usize) -> float32x4_t {
        f16_scales4(p, stride)
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
    #[inline(always)]
    unsafe fn scales4(p: *const u8, stride: usize) -> float32x4_t {
        f16_scales4(p, stride)
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

/// Block `b` of `w` against block `b` of the Q8_0 `x`: the exact sum of the 32 products.
#[inline(always)]
unsafe fn block_sum<D: I8Dot, B: Block32>(wb: *const u8, xb: *const u8) -> i32 {
    vaddvq_s32(D::dot32(B::values(wb), Q8_0::values(xb)))
}

/// Whole blocks of `w` against the Q8_0 blocks of `x`: the order the tiles keep per row.
impl<B: Block32> QuantDot for B {
    const W_BYTES: usize = B::BYTES;
    const X_BYTES: usize = Q8_0_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let nb = w.len() / B::BYTES;
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let step = |acc: f32, b: usize| {
            let (wb, xb) = (pw.add(b * B::BYTES), px.add(b * Q8_0_BYTES));
            let d = B::scale(wb) * f16_scale(xb);
            (block_sum::<D, B>(wb, xb) as f32).mul_add(d, acc)
        };
        let (mut acc0, mut acc1) = (0f32, 0f32);
        let mut b = 0;
        while b + 2 <= nb {
            acc0 = step(acc0, b);
            acc1 = step(acc1, b + 1);
            b += 2;
        }
        if b < nb {
            acc0 = step(acc0, b);
        }
        acc0 + acc1
    }
}

/// [`super::super::Kernels::gemm_q8_0`] for a 32-value format: `out[r * n + t] = w_r . x_t`,
/// each value bit-identical to the table's dot kernel of the pair.
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

/// The tile loop behind [`gemm`], always inlined into a function compiled with `D`'s features:
/// tiles of 4 rows by 2 tokens (each weight block unpacked once for both tokens, each activation
/// block loaded once for four rows, the float steps once per block for four rows), then 4 x 1 for
/// an odd last token (decoding: four row streams at once) and single rows for the last
/// `rows % 4`.
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
    while r + 4 <= rows {
        let (pr, or) = (pw.add(r * w_row), out.add(r * n));
        let mut t = 0;
        while t + 2 <= n {
            tile4::<D, B, 2>(pr, w_row, px.add(t * x_row), x_row, nb, or.add(t), n);
            t += 2;
        }
        if t < n {
            tile4::<D, B, 1>(pr, w_row, px.add(t * x_row), x_row, nb, or.add(t), n);
        }
        r += 4;
    }
    for r in r..rows {
        let wr = std::slice::from_raw_parts(pw.add(r * w_row), w_row);
        for t in 0..n {
            let xt = std::slice::from_raw_parts(px.add(t * x_row), x_row);
            *out.add(r * n + t) = <B as QuantDot>::dot::<D>(wr, xt);
        }
    }
}

/// Rows `0..4` (`w_row` bytes apart) against `T` activation rows (`x_row` apart), written to
/// `out[r * ldo + t]`. Lane `r` of every vector belongs to row `r` and takes exactly the steps of
/// the one-row dot.
#[inline(always)]
unsafe fn tile4<D: I8Dot, B: Block32, const T: usize>(
    pw: *const u8,
    w_row: usize,
    px: *const u8,
    x_row: usize,
    nb: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[vdupq_n_f32(0.0); 2]; T];
    let mut b = 0;
    while b + 2 <= nb {
        tile4_block::<D, B, T, 0>(&mut acc, pw, w_row, px, x_row, b);
        tile4_block::<D, B, T, 1>(&mut acc, pw, w_row, px, x_row, b + 1);
        b += 2;
    }
    if b < nb {
        tile4_block::<D, B, T, 0>(&mut acc, pw, w_row, px, x_row, b);
    }
    for (t, [a0, a1]) in acc.iter().enumerate() {
        let sums = vaddq_f32(*a0, *a1);
        let mut lanes = [0f32; 4];
        vst1q_f32(lanes.as_mut_ptr(), sums);
        for (r, v) in lanes.into_iter().enumerate() {
            *out.add(r * ldo + t) = v;
        }
    }
}

/// Block `b` of the four rows against block `b` of every token, into accumulator `H`.
#[inline(always)]
unsafe fn tile4_block<D: I8Dot, B: Block32, const T: usize, const H: usize>(
    acc: &mut [[float32x4_t; 2]; T],
    pw: *const u8,
    w_row: usize,
    px: *const u8,
    x_row: usize,
    b: usize,
) {
    let p = pw.add(b * B::BYTES);
    let wv = [
        B::values(p),
        B::values(p.add(w_row)),
        B::values(p.add(2 * w_row)),
        B::values(p.add(3 * w_row)),
    ];
    let ws = B::scales4(p, w_row);
    for (t, acc_t) in acc.iter_mut().enumerate() {
        let xb = px.add(t * x_row + b * Q8_0_BYTES);
        let xv = Q8_0::values(xb);
        // Four rows' lane sums, then pairwise adds: lane r = row r's exact block sum.
        let s = [
            D::dot32(wv[0], xv),
            D::dot32(wv[1], xv),
            D::dot32(wv[2], xv),
            D::dot32(wv[3], xv),
        ];
        let sums = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
        let d = vmulq_n_f32(ws, f16_scale(xb));
        acc_t[H] = vfmaq_f32(acc_t[H], vcvtq_f32_s32(sums), d);
    }
}
