//! Products of Q8_0 and Q4_0 rows packed four at a time (`blocks::rows4`, after ggml's 4x4
//! repacked layout) with Q8_0 activations, by `sdot` by lane: for each block, eight `sdot`s
//! leave the four rows' exact block sums in the four lanes of one register, with no zeroed
//! partial sums per row and no pairwise reduction, and two blocks' scales for the four rows
//! arrive in one load. Only the dot-product table has them: without `sdot` by lane there is
//! no lane-wise product to gain from, and that table keeps the file layout's 4-row tiles.
//!
//! Every lane takes the steps of the one-row dot (`block32`): exact i32 block sum, then
//! `acc = fma(sum, w_scale * x_scale, acc)`, even blocks into one accumulator and odd ones
//! into another, so a packed product equals the table's dot of the unpacked rows bit for bit.

use std::arch::aarch64::*;
use std::arch::asm;

use std::cell::RefCell;

use super::{f16_scale, f16x4_to_f32, f16x8_to_f32};
use crate::tensor::blocks::block32::{Q4_0_BYTES, Q8_0_BYTES};
use crate::tensor::blocks::rows4::{self, ROWS, SCALE_BYTES};

/// A packed format: one block of four rows' values as eight vectors, vector `c` holding
/// 4-byte piece `c` of each row (pieces 0..4 go with activation bytes 0..16, pieces 4..8 with
/// bytes 16..32).
pub(super) trait Packed {
    /// Bytes of one block's values for the four rows.
    const VALUE_BYTES: usize;
    unsafe fn values(p: *const u8) -> [int8x16_t; 8];
    /// The block sums as f32 (Q4_0's are 16 times the true sums, see `blocks::rows4`).
    unsafe fn sums_f32(s: int32x4_t) -> float32x4_t;
}

pub(super) struct Q8_0x4;
impl Packed for Q8_0x4 {
    const VALUE_BYTES: usize = ROWS * (Q8_0_BYTES - 2);
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 8] {
        let p = p as *const i8;
        let (a, b) = (vld1q_s8_x4(p), vld1q_s8_x4(p.add(64)));
        [a.0, a.1, a.2, a.3, b.0, b.1, b.2, b.3]
    }
    #[inline(always)]
    unsafe fn sums_f32(s: int32x4_t) -> float32x4_t {
        vcvtq_f32_s32(s)
    }
}

pub(super) struct Q4_0x4;
impl Packed for Q4_0x4 {
    const VALUE_BYTES: usize = ROWS * (Q4_0_BYTES - 2);
    #[inline(always)]
    unsafe fn values(p: *const u8) -> [int8x16_t; 8] {
        let v = vld1q_s8_x4(p as *const i8);
        let b = [v.0, v.1, v.2, v.3];
        let hi = vdupq_n_s8(0xf0u8 as i8);
        [
            vshlq_n_s8::<4>(b[0]),
            vshlq_n_s8::<4>(b[1]),
            vshlq_n_s8::<4>(b[2]),
            vshlq_n_s8::<4>(b[3]),
            vandq_s8(b[0], hi),
            vandq_s8(b[1], hi),
            vandq_s8(b[2], hi),
            vandq_s8(b[3], hi),
        ]
    }
    /// Converting with 4 fraction bits divides by 16 exactly: the same single rounding as
    /// converting the true sum.
    #[inline(always)]
    unsafe fn sums_f32(s: int32x4_t) -> float32x4_t {
        vcvtq_n_f32_s32::<4>(s)
    }
}

/// `acc` plus, in lane `i`, the dot of bytes `4i..4i+4` of `w` with bytes `4L..4L+4` of `x`.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn sdot_lane<const L: i32>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        x = in(vreg) x,
        l = const L,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// The table entry: `out[r * n + t] = w_r . x_t` for `rows` packed rows (a multiple of 4).
pub(super) fn gemm<P: Packed>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    if rows == 0 || n == 0 {
        return;
    }
    let (groups, nb) = rows4::product_shape(w, P::VALUE_BYTES, rows, x, n, out);
    X_SCALES.with_borrow_mut(|xs| {
        // Each activation scale serves every group: converted once here, not once per group.
        xs.clear();
        // SAFETY: every block starts with its two scale bytes.
        xs.extend(
            x.chunks_exact(Q8_0_BYTES)
                .map(|b| unsafe { f16_scale(b.as_ptr()) }),
        );
        let acts = Acts {
            px: x.as_ptr(),
            pxs: xs.as_ptr(),
            x_row: nb * Q8_0_BYTES,
            nb,
        };
        // SAFETY: shapes checked above; this entry is only in the dotprod table, which
        // `neon::tables()` hands out only after detecting the feature.
        unsafe { gemm_sdot::<P>(w.as_ptr(), groups, acts, n, out.as_mut_ptr()) }
    })
}

thread_local! {
    /// The activations' block scales as f32, per thread, kept so that decoding allocates nothing.
    static X_SCALES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Activation rows from token `t` on: Q8_0 blocks (`x_row` bytes per row) and their scales as
/// f32 (`nb` per row).
#[derive(Clone, Copy)]
struct Acts {
    px: *const u8,
    pxs: *const f32,
    x_row: usize,
    nb: usize,
}

impl Acts {
    unsafe fn at(self, t: usize) -> Self {
        Self {
            px: self.px.add(t * self.x_row),
            pxs: self.pxs.add(t * self.nb),
            ..self
        }
    }
}

/// Tiles of one group by 4 tokens (each group block unpacked once for four tokens), then 2,
/// then 1 for the last tokens.
#[target_feature(enable = "dotprod")]
unsafe fn gemm_sdot<P: Packed>(pw: *const u8, groups: usize, x: Acts, n: usize, out: *mut f32) {
    for g in 0..groups {
        let pg = pw.add(g * x.nb * (SCALE_BYTES + P::VALUE_BYTES));
        let og = out.add(g * ROWS * n);
        let mut t = 0;
        while t + 4 <= n {
            tile::<P, 4>(pg, x.at(t), og.add(t), n);
            t += 4;
        }
        if t + 2 <= n {
            tile::<P, 2>(pg, x.at(t), og.add(t), n);
            t += 2;
        }
        if t < n {
            tile::<P, 1>(pg, x.at(t), og.add(t), n);
        }
    }
}

/// One group (its `nb` blocks' scales from `pg`, then their values) against `T` activation
/// rows, written to `out[r * ldo + t]`. Blocks go four at a time (two scale loads, one loop
/// step), alternating between the even and odd accumulators as the one-row dot does.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn tile<P: Packed, const T: usize>(pg: *const u8, x: Acts, out: *mut f32, ldo: usize) {
    let pv = pg.add(x.nb * SCALE_BYTES);
    let mut acc = [[vdupq_n_f32(0.0); 2]; T];
    let mut b = 0;
    while b + 4 <= x.nb {
        pair::<P, T>(&mut acc, pg, pv, x, b);
        pair::<P, T>(&mut acc, pg, pv, x, b + 2);
        b += 4;
    }
    if b + 2 <= x.nb {
        pair::<P, T>(&mut acc, pg, pv, x, b);
        b += 2;
    }
    if b < x.nb {
        let ws = f16x4_to_f32(vreinterpret_u16_u8(vld1_u8(pg.add(b * SCALE_BYTES))));
        block::<P, T, 0>(&mut acc, pv, ws, x, b);
    }
    for (t, [a0, a1]) in acc.iter().enumerate() {
        let mut lanes = [0f32; ROWS];
        vst1q_f32(lanes.as_mut_ptr(), vaddq_f32(*a0, *a1));
        for (r, v) in lanes.into_iter().enumerate() {
            *out.add(r * ldo + t) = v;
        }
    }
}

/// Blocks `b` (even) and `b + 1`, their scales loaded and converted together.
#[inline(always)]
unsafe fn pair<P: Packed, const T: usize>(
    acc: &mut [[float32x4_t; 2]; T],
    pg: *const u8,
    pv: *const u8,
    x: Acts,
    b: usize,
) {
    let (ws0, ws1) = f16x8_to_f32(vreinterpretq_u16_u8(vld1q_u8(pg.add(b * SCALE_BYTES))));
    block::<P, T, 0>(acc, pv, ws0, x, b);
    block::<P, T, 1>(acc, pv, ws1, x, b + 1);
}

/// Block `b` (values from `pv`, scales `ws`) against block `b` of every token, into
/// accumulator `H`.
#[inline(always)]
unsafe fn block<P: Packed, const T: usize, const H: usize>(
    acc: &mut [[float32x4_t; 2]; T],
    pv: *const u8,
    ws: float32x4_t,
    x: Acts,
    b: usize,
) {
    let w = P::values(pv.add(b * P::VALUE_BYTES));
    for (t, acc_t) in acc.iter_mut().enumerate() {
        let xb = x.px.add(t * x.x_row + b * Q8_0_BYTES);
        let xv = vld1q_s8_x2(xb.add(2) as *const i8);
        let (x0, x1) = (xv.0, xv.1);
        let mut s = vdupq_n_s32(0);
        s = sdot_lane::<0>(s, w[0], x0);
        s = sdot_lane::<1>(s, w[1], x0);
        s = sdot_lane::<2>(s, w[2], x0);
        s = sdot_lane::<3>(s, w[3], x0);
        s = sdot_lane::<0>(s, w[4], x1);
        s = sdot_lane::<1>(s, w[5], x1);
        s = sdot_lane::<2>(s, w[6], x1);
        s = sdot_lane::<3>(s, w[7], x1);
        let d = vmulq_n_f32(ws, *x.pxs.add(t * x.nb + b));
        acc_t[H] = vfmaq_f32(acc_t[H], P::sums_f32(s), d);
    }
}
