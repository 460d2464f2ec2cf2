//! Matrix products of Q4_K, Q5_K and Q6_K rows in the file's layout with Q8_K activations, on
//! CPUs with `sdot`: tiles of four rows, each super-block's scales unpacked once for the four
//! rows and shared by every token of the tile.
//!
//! The one-row dots (`kquant`) reduce each 16- or 32-value product to a scalar and multiply it by
//! its scale; here four rows' products of one sub-block are reduced together by pairwise adds
//! into one vector (lane = row) and multiplied by a vector of the four rows' scales. Each row's
//! `sdot` accumulator is never cleared within a super-block: it holds the running sums
//! `c_j = p_0 + ... + p_j` of the sub-block products, and `sum_j sc_j p_j` is taken as
//! `sum_j c_j (sc_j - sc_(j+1))` (with `sc_n = 0`), the scale differences also computed once per
//! super-block. The integer totals are those of the one-row dots exactly (i32 arithmetic wraps,
//! and the totals fit), and the float steps are theirs lane by lane, so every product equals the
//! table's dot of its pair bit for bit.
//! Q2_K and Q3_K take the same scheme in `ktiles_low`.

use std::arch::aarch64::*;

use super::block32::f16_scales4;
use super::{dot, f16x4_to_f32, f32_at, kquant, load_i16x8, load_i8x16, sdot, Sdot};
use crate::tensor::blocks::kquant::{
    Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_K_BSUMS_AT, Q8_K_BYTES,
};

/// Rows per tile.
pub(super) const ROWS: usize = 4;
/// Tokens whose float sums a tile keeps at once.
const TOKENS: usize = 8;

/// A k-quant format's products for four rows at a time.
pub(super) trait KTile {
    /// Bytes of one weight super-block.
    const BYTES: usize;
    /// The one-row dot the tile must equal.
    type Dot: super::QuantDot;
    /// What one super-block of four rows needs for every token.
    type Prep;
    /// Super-block `wb`, `wb + rb`, `wb + 2 rb`, `wb + 3 rb` of the four rows.
    unsafe fn prep(wb: *const u8, rb: usize) -> Self::Prep;
    /// `acc` (lane = row) plus the super-block's products with the Q8_K block `xb`, in the
    /// one-row dot's float steps.
    unsafe fn token(
        p: &Self::Prep,
        wb: *const u8,
        rb: usize,
        xb: *const u8,
        acc: float32x4_t,
    ) -> float32x4_t;
}

/// The table entry: `out[r * n + t] = w_r . x_t`; rows past the last whole tile by the one-row
/// dot.
pub(super) fn gemm<K: KTile>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    if rows == 0 || n == 0 {
        return;
    }
    assert_eq!(w.len() % rows, 0, "rows of equal length");
    let rb = w.len() / rows;
    assert_eq!(rb % K::BYTES, 0, "whole weight blocks");
    let nb = rb / K::BYTES;
    assert_eq!(
        x.len(),
        n * nb * Q8_K_BYTES,
        "one Q8_K block per weight block"
    );
    assert!(out.len() >= rows * n, "gemm shape");
    let tiled = rows / ROWS * ROWS;
    // SAFETY: shapes checked above; this entry is only in the dotprod table, which
    // `neon::tables()` hands out only after detecting the feature.
    unsafe { gemm_sdot::<K>(w.as_ptr(), tiled, rb, x.as_ptr(), n, nb, out.as_mut_ptr()) };
    let xr = nb * Q8_K_BYTES;
    for r in tiled..rows {
        for t in 0..n {
            out[r * n + t] = dot::<Sdot, K::Dot>(&w[r * rb..][..rb], &x[t * xr..][..xr]);
        }
    }
}

#[target_feature(enable = "dotprod")]
unsafe fn gemm_sdot<K: KTile>(
    w: *const u8,
    rows: usize,
    rb: usize,
    x: *const u8,
    n: usize,
    nb: usize,
    out: *mut f32,
) {
    let xr = nb * Q8_K_BYTES;
    for g in (0..rows).step_by(ROWS) {
        let wg = w.add(g * rb);
        for t0 in (0..n).step_by(TOKENS) {
            let tn = TOKENS.min(n - t0);
            let mut acc = [vdupq_n_f32(0.0); TOKENS];
            if tn == 1 {
                // One token (decoding): a loop of its own, where the compiler has no token loop
                // to hoist the weights' unpacking out of into copies on the stack.
                let xt = x.add(t0 * xr);
                for b in 0..nb {
                    let wb = wg.add(b * K::BYTES);
                    let p = K::prep(wb, rb);
                    acc[0] = K::token(&p, wb, rb, xt.add(b * Q8_K_BYTES), acc[0]);
                }
            } else {
                for b in 0..nb {
                    let wb = wg.add(b * K::BYTES);
                    let p = K::prep(wb, rb);
                    for (t, a) in acc[..tn].iter_mut().enumerate() {
                        *a = K::token(&p, wb, rb, x.add((t0 + t) * xr + b * Q8_K_BYTES), *a);
                    }
                }
            }
            for (t, a) in acc[..tn].iter().enumerate() {
                let mut lanes = [0f32; ROWS];
                vst1q_f32(lanes.as_mut_ptr(), *a);
                for (r, v) in lanes.into_iter().enumerate() {
                    *out.add((g + r) * n + t0 + t) = v;
                }
            }
        }
    }
}

/// The four rows' sums of their accumulators, lane = row.
#[inline(always)]
pub(super) unsafe fn row_sums(c: &[int32x4_t; ROWS]) -> int32x4_t {
    vpaddq_s32(vpaddq_s32(c[0], c[1]), vpaddq_s32(c[2], c[3]))
}

/// Four rows' four bytes (u32 lane = row) as two vectors of i16 in (byte, row) order: bytes
/// 0 and 1 of the four rows, then bytes 2 and 3.
#[inline(always)]
unsafe fn by_byte(v: uint32x4_t) -> [int16x8_t; 2] {
    const TRANSPOSE: [u8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];
    let b = vqtbl1q_u8(vreinterpretq_u8_u32(v), vld1q_u8(TRANSPOSE.as_ptr()));
    [
        vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(b))),
        vreinterpretq_s16_u16(vmovl_high_u8(b)),
    ]
}

/// Item `2k` (low half of `v[k]`) or `2k + 1` (high half) of four i16 lanes per item, as i32.
#[inline(always)]
pub(super) unsafe fn widen<const N: usize>(v: &[int16x8_t; N], i: usize) -> int32x4_t {
    if i.is_multiple_of(2) {
        vmovl_s16(vget_low_s16(v[i / 2]))
    } else {
        vmovl_high_s16(v[i / 2])
    }
}

/// Q4_K (`FIVE` false) and Q5_K (`FIVE` true), as `kquant::K4`: per 32-value sub-block the
/// quants times the 6-bit scale, minus the 6-bit mins times the sub-block's activation sums.
pub(super) struct K4<const FIVE: bool>;
pub(super) type Q4K = K4<false>;
pub(super) type Q5K = K4<true>;

pub(super) struct K4Prep {
    d: float32x4_t,
    dmin: float32x4_t,
    /// `sc_j - sc_(j+1)` of the four rows, two sub-blocks a vector (see [`widen`]).
    diff: [int16x8_t; 4],
    /// The four rows' mins, two sub-blocks a vector.
    mins: [int16x8_t; 4],
}

impl<const FIVE: bool> KTile for K4<FIVE> {
    const BYTES: usize = if FIVE { Q5_K_BYTES } else { Q4_K_BYTES };
    type Dot = kquant::K4<FIVE>;
    type Prep = K4Prep;

    /// The first 16 bytes of each row's block (d, dmin, the 12 packed scale bytes) transposed
    /// so that each u32 lane is a row, then ggml's `kmask` unpacking on all four rows at once.
    #[inline(always)]
    unsafe fn prep(wb: *const u8, rb: usize) -> K4Prep {
        let r = |i: usize| vld1q_u32(wb.add(i * rb) as *const u32);
        let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
        let (a01, b01) = (vtrn1q_u32(r0, r1), vtrn2q_u32(r0, r1));
        let (a23, b23) = (vtrn1q_u32(r2, r3), vtrn2q_u32(r2, r3));
        let u64s = |v: uint32x4_t| vreinterpretq_u64_u32(v);
        let u32s = |v: uint64x2_t| vreinterpretq_u32_u64(v);
        let dd = u32s(vtrn1q_u64(u64s(a01), u64s(a23)));
        let w0 = u32s(vtrn1q_u64(u64s(b01), u64s(b23)));
        let w1 = u32s(vtrn2q_u64(u64s(a01), u64s(a23)));
        let w2 = u32s(vtrn2q_u64(u64s(b01), u64s(b23)));
        let (k1, k2, k3) = (
            vdupq_n_u32(0x3f3f_3f3f),
            vdupq_n_u32(0x0f0f_0f0f),
            vdupq_n_u32(0x0303_0303),
        );
        let sc_lo = vandq_u32(w0, k1);
        let mn_lo = vandq_u32(w1, k1);
        let sc_hi = vorrq_u32(
            vandq_u32(w2, k2),
            vshlq_n_u32::<4>(vandq_u32(vshrq_n_u32::<6>(w0), k3)),
        );
        let mn_hi = vorrq_u32(
            vandq_u32(vshrq_n_u32::<4>(w2), k2),
            vshlq_n_u32::<4>(vandq_u32(vshrq_n_u32::<6>(w1), k3)),
        );
        let [s0, s1] = by_byte(sc_lo);
        let [s2, s3] = by_byte(sc_hi);
        let [m0, m1] = by_byte(mn_lo);
        let [m2, m3] = by_byte(mn_hi);
        let sc = [s0, s1, s2, s3];
        let next = |k: usize| vextq_s16::<4>(sc[k], if k < 3 { sc[k + 1] } else { vdupq_n_s16(0) });
        let diff = [0, 1, 2, 3].map(|k| vsubq_s16(sc[k], next(k)));
        K4Prep {
            d: f16x4_to_f32(vmovn_u32(dd)),
            dmin: f16x4_to_f32(vshrn_n_u32::<16>(dd)),
            diff,
            mins: [m0, m1, m2, m3],
        }
    }

    #[inline(always)]
    unsafe fn token(
        p: &K4Prep,
        wb: *const u8,
        rb: usize,
        xb: *const u8,
        acc: float32x4_t,
    ) -> float32x4_t {
        let dy = f32_at(xb);
        let bsums = xb.add(Q8_K_BSUMS_AT);
        let q8sums = vpaddq_s16(load_i16x8(bsums), load_i16x8(bsums.add(16)));
        let mn = &p.mins;
        let mut m = vmull_laneq_s16::<0>(vget_low_s16(mn[0]), q8sums);
        m = vmlal_high_laneq_s16::<1>(m, mn[0], q8sums);
        m = vmlal_laneq_s16::<2>(m, vget_low_s16(mn[1]), q8sums);
        m = vmlal_high_laneq_s16::<3>(m, mn[1], q8sums);
        m = vmlal_laneq_s16::<4>(m, vget_low_s16(mn[2]), q8sums);
        m = vmlal_high_laneq_s16::<5>(m, mn[2], q8sums);
        m = vmlal_laneq_s16::<6>(m, vget_low_s16(mn[3]), q8sums);
        m = vmlal_high_laneq_s16::<7>(m, mn[3], q8sums);

        let qs_at = if FIVE { 48 } else { 16 };
        let m4 = vdupq_n_u8(0x0f);
        let mut c = [vdupq_n_s32(0); ROWS];
        let mut isum = vdupq_n_s32(0);
        for j in 0..4 {
            let q8 = xb.add(4 + 64 * j);
            let x = [
                load_i8x16(q8),
                load_i8x16(q8.add(16)),
                load_i8x16(q8.add(32)),
                load_i8x16(q8.add(48)),
            ];
            let mut hi = [[vdupq_n_s8(0); 2]; ROWS];
            for (r, c_r) in c.iter_mut().enumerate() {
                let row = wb.add(r * rb);
                let q = row.add(qs_at + 32 * j);
                let bits = [vld1q_u8(q), vld1q_u8(q.add(16))];
                let mut lo = [vandq_u8(bits[0], m4), vandq_u8(bits[1], m4)];
                let mut h = [vshrq_n_u8::<4>(bits[0]), vshrq_n_u8::<4>(bits[1])];
                if FIVE {
                    // The fifth bits of sub-blocks 2j (into the low nibbles) and 2j + 1.
                    for k in 0..2 {
                        let qh = vld1q_u8(row.add(16 + 16 * k));
                        let lo_bit = vshlq_u8(qh, vdupq_n_s8(-2 * j as i8));
                        let hi_bit = vshlq_u8(qh, vdupq_n_s8(-(2 * j as i8) - 1));
                        lo[k] = vsliq_n_u8::<4>(lo[k], vandq_u8(lo_bit, vdupq_n_u8(1)));
                        h[k] = vsliq_n_u8::<4>(h[k], vandq_u8(hi_bit, vdupq_n_u8(1)));
                    }
                }
                *c_r = sdot(*c_r, vreinterpretq_s8_u8(lo[0]), x[0]);
                *c_r = sdot(*c_r, vreinterpretq_s8_u8(lo[1]), x[1]);
                hi[r] = [vreinterpretq_s8_u8(h[0]), vreinterpretq_s8_u8(h[1])];
            }
            isum = vmlaq_s32(isum, row_sums(&c), widen(&p.diff, 2 * j));
            for (c_r, h) in c.iter_mut().zip(&hi) {
                *c_r = sdot(sdot(*c_r, h[0], x[2]), h[1], x[3]);
            }
            isum = vmlaq_s32(isum, row_sums(&c), widen(&p.diff, 2 * j + 1));
        }
        let acc = vsubq_f32(acc, vmulq_f32(vmulq_n_f32(p.dmin, dy), vcvtq_f32_s32(m)));
        vaddq_f32(acc, vmulq_f32(vmulq_n_f32(p.d, dy), vcvtq_f32_s32(isum)))
    }
}

/// Q6_K, as `kquant::Q6K`: the unsigned 6-bit values times the signed 16-value scales, the
/// offset of 32 taken off as 32 times the scales times the Q8_K 16-value sums. The groups are
/// taken in the order their bits come out of the loads ([`Q6_ORDER`]), and the scale
/// differences follow that order.
pub(super) struct Q6K;

/// Group order: for each 128-value half and each 16 bytes of its `qh` (l = 0..16, 16..32),
/// the four 32-value chunks k (groups `8 half + 2k + l / 16`).
const Q6_ORDER: [u8; 16] = [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15];

/// Table indices for gathering four rows' 16 per-group scale bytes (a `uint8x16x4_t`, row r's
/// at 16 r) in (group, row) order, groups taken in `order`: byte `i` of lookup `q` is row
/// `i % 4`'s scale of group `order[4q + i / 4]`; lookups `4 + q` take the next group in that
/// order (none, an index past the table that reads 0, after the last). See [`gather`].
pub(super) const fn gather_indices(order: &[u8; 16]) -> [[u8; 16]; 8] {
    let mut t = [[0u8; 16]; 8];
    let mut q = 0;
    while q < 8 {
        let mut i = 0;
        while i < 16 {
            let pos = 4 * (q % 4) + i / 4 + q / 4;
            t[q][i] = if pos < 16 {
                16 * (i % 4) as u8 + order[pos]
            } else {
                0xff
            };
            i += 1;
        }
        q += 1;
    }
    t
}

/// Groups `4q..4q + 4` (in the order of `idx`, from [`gather_indices`]) of the four rows'
/// scale bytes in `table`, and their successors.
#[inline(always)]
pub(super) unsafe fn gather(
    table: uint8x16x4_t,
    idx: &[[u8; 16]; 8],
    q: usize,
) -> (uint8x16_t, uint8x16_t) {
    let at = |i: &[u8; 16]| vqtbl4q_u8(table, vld1q_u8(i.as_ptr()));
    (at(&idx[q]), at(&idx[4 + q]))
}

const Q6_GATHER: [[u8; 16]; 8] = gather_indices(&Q6_ORDER);

pub(super) struct Q6Prep {
    d: float32x4_t,
    /// `sc_o(i) - sc_o(i+1)` of the four rows, `o` = [`Q6_ORDER`], two groups a vector (see
    /// [`widen`]).
    diff: [int16x8_t; 8],
    /// The four rows' scales in [`Q6_ORDER`], two groups a vector.
    sc: [int16x8_t; 8],
}

impl KTile for Q6K {
    const BYTES: usize = Q6_K_BYTES;
    type Dot = kquant::Q6K;
    type Prep = Q6Prep;

    /// The four rows' 16 scale bytes gathered by table lookups into (group in [`Q6_ORDER`], row)
    /// order, four groups a lookup, and again each group's successor, so that one widening
    /// subtraction gives two groups' differences.
    #[inline(always)]
    unsafe fn prep(wb: *const u8, rb: usize) -> Q6Prep {
        let s = |r: usize| vld1q_u8(wb.add(r * rb + 192));
        let table = uint8x16x4_t(s(0), s(1), s(2), s(3));
        let mut diff = [vdupq_n_s16(0); 8];
        let mut sc = [vdupq_n_s16(0); 8];
        for q in 0..4 {
            let (cur, next) = gather(table, &Q6_GATHER, q);
            let (cur, next) = (vreinterpretq_s8_u8(cur), vreinterpretq_s8_u8(next));
            diff[2 * q] = vsubl_s8(vget_low_s8(cur), vget_low_s8(next));
            diff[2 * q + 1] = vsubl_high_s8(cur, next);
            sc[2 * q] = vmovl_s8(vget_low_s8(cur));
            sc[2 * q + 1] = vmovl_high_s8(cur);
        }
        Q6Prep {
            d: f16_scales4(wb.add(208), rb),
            diff,
            sc,
        }
    }

    #[inline(always)]
    unsafe fn token(
        p: &Q6Prep,
        wb: *const u8,
        rb: usize,
        xb: *const u8,
        acc: float32x4_t,
    ) -> float32x4_t {
        let bsums = xb.add(Q8_K_BSUMS_AT);
        let q8sums = [load_i16x8(bsums), load_i16x8(bsums.add(16))];
        // Scale times 16-value sum, group by group in Q6_ORDER (lane = group % 8).
        let sc = &p.sc;
        let mut mins = vdupq_n_s32(0);
        for (h, &b) in q8sums.iter().enumerate() {
            let s = &sc[4 * h..4 * h + 4];
            mins = vmlal_laneq_s16::<0>(mins, vget_low_s16(s[0]), b);
            mins = vmlal_high_laneq_s16::<2>(mins, s[0], b);
            mins = vmlal_laneq_s16::<4>(mins, vget_low_s16(s[1]), b);
            mins = vmlal_high_laneq_s16::<6>(mins, s[1], b);
            mins = vmlal_laneq_s16::<1>(mins, vget_low_s16(s[2]), b);
            mins = vmlal_high_laneq_s16::<3>(mins, s[2], b);
            mins = vmlal_laneq_s16::<5>(mins, vget_low_s16(s[3]), b);
            mins = vmlal_high_laneq_s16::<7>(mins, s[3], b);
        }

        let rows = [0, 1, 2, 3].map(|r| wb.add(r * rb));
        let mut c = [vdupq_n_s32(0); ROWS];
        let mut isum = vdupq_n_s32(0);
        // Written out so that every load's offset is a constant.
        q6_part::<0, 0>(p, &rows, xb, &mut c, &mut isum);
        q6_part::<0, 1>(p, &rows, xb, &mut c, &mut isum);
        q6_part::<1, 0>(p, &rows, xb, &mut c, &mut isum);
        q6_part::<1, 1>(p, &rows, xb, &mut c, &mut isum);
        let total = vsubq_s32(isum, vshlq_n_s32::<5>(mins));
        let d = vmulq_n_f32(p.d, f32_at(xb));
        vaddq_f32(acc, vmulq_f32(d, vcvtq_f32_s32(total)))
    }
}

/// The 64 values of every row that take bytes `16 L..16 L + 16` of half `HALF`'s `ql` and `qh`
/// (four groups, in [`Q6_ORDER`]), added to the running sums `c` and, times the scale
/// differences, to `isum`.
#[inline(always)]
unsafe fn q6_part<const HALF: usize, const L: usize>(
    p: &Q6Prep,
    rows: &[*const u8; ROWS],
    xb: *const u8,
    c: &mut [int32x4_t; ROWS],
    isum: &mut int32x4_t,
) {
    let (m3, m30) = (vdupq_n_u8(3), vdupq_n_u8(0x30));
    let q8 = xb.add(4 + 128 * HALF + 16 * L);
    let x = [0, 1, 2, 3].map(|k| load_i8x16(q8.add(32 * k)));
    let q = rows.map(|row| {
        let ql = row.add(64 * HALF + 16 * L);
        let (ql_a, ql_b) = (vld1q_u8(ql), vld1q_u8(ql.add(32)));
        let qh = vld1q_u8(row.add(128 + 32 * HALF + 16 * L));
        let qh2 = vshrq_n_u8::<2>(qh);
        // Chunk k: the low (k < 2) or high nibbles of ql_a (k even) or ql_b, with bits
        // 2k..2k+2 of qh on top.
        [
            vsliq_n_u8::<4>(ql_a, vandq_u8(qh, m3)),
            vsliq_n_u8::<4>(ql_b, vandq_u8(qh2, m3)),
            vsriq_n_u8::<4>(vandq_u8(qh, m30), ql_a),
            vsriq_n_u8::<4>(vandq_u8(qh2, m30), ql_b),
        ]
        .map(|v| vreinterpretq_s8_u8(v))
    });
    for (k, &xk) in x.iter().enumerate() {
        for (c_r, q_r) in c.iter_mut().zip(&q) {
            *c_r = sdot(*c_r, q_r[k], xk);
        }
        *isum = vmlaq_s32(*isum, row_sums(c), widen(&p.diff, 8 * HALF + 4 * L + k));
    }
}
