//! Q2_K and Q3_K matrix products in `ktiles`' scheme (see there): tiles of four rows in the
//! file's layout, each 16-value group's sums of the four rows reduced together by pairwise adds,
//! running `sdot` sums times differences of consecutive group scales. Their groups come out of
//! the loads in block order. Every product equals the table's dot of its pair bit for bit.

use std::arch::aarch64::*;

use super::block32::f16_scales4;
use super::ktiles::{gather, gather_indices, row_sums, widen, KTile, ROWS};
use super::{f32_at, kquant, load_i16x8, load_i8x16, sdot};
use crate::tensor::blocks::kquant::{q3_k_scales, Q2_K_BYTES, Q3_K_BYTES, Q8_K_BSUMS_AT};

const NATURAL: [[u8; 16]; 8] =
    gather_indices(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);

/// Bits `2k..2k + 2` of every byte of `bits`.
#[inline(always)]
unsafe fn crumb<const K: i32>(bits: uint8x16_t) -> uint8x16_t {
    vandq_u8(vshlq_u8(bits, vdupq_n_s8(-2 * K as i8)), vdupq_n_u8(3))
}

/// The four rows' sums over 16 groups (block order) of a per-group i16 value (`v`, two groups a
/// vector, lane = row) times the Q8_K 16-value sums.
#[inline(always)]
unsafe fn times_bsums(v: &[int16x8_t; 8], xb: *const u8) -> int32x4_t {
    let bsums = xb.add(Q8_K_BSUMS_AT);
    let q8sums = [load_i16x8(bsums), load_i16x8(bsums.add(16))];
    let mut m = vdupq_n_s32(0);
    for (h, &b) in q8sums.iter().enumerate() {
        let s = &v[4 * h..4 * h + 4];
        m = vmlal_laneq_s16::<0>(m, vget_low_s16(s[0]), b);
        m = vmlal_high_laneq_s16::<1>(m, s[0], b);
        m = vmlal_laneq_s16::<2>(m, vget_low_s16(s[1]), b);
        m = vmlal_high_laneq_s16::<3>(m, s[1], b);
        m = vmlal_laneq_s16::<4>(m, vget_low_s16(s[2]), b);
        m = vmlal_high_laneq_s16::<5>(m, s[2], b);
        m = vmlal_laneq_s16::<6>(m, vget_low_s16(s[3]), b);
        m = vmlal_high_laneq_s16::<7>(m, s[3], b);
    }
    m
}

/// Q2_K, as `kquant::Q2K`: per 16 values the 2-bit quants times the 4-bit scale, the 4-bit
/// mins times the Q8_K 16-value sums.
pub(super) struct Q2K;

pub(super) struct Q2Prep {
    d: float32x4_t,
    dmin: float32x4_t,
    /// `sc_g - sc_(g+1)` of the four rows, two groups a vector (see [`widen`]).
    diff: [int16x8_t; 8],
    mins: [int16x8_t; 8],
}

impl KTile for Q2K {
    const BYTES: usize = Q2_K_BYTES;
    type Dot = kquant::Q2K;
    type Prep = Q2Prep;

    #[inline(always)]
    unsafe fn prep(wb: *const u8, rb: usize) -> Q2Prep {
        let s = |r: usize| vld1q_u8(wb.add(r * rb));
        let table = uint8x16x4_t(s(0), s(1), s(2), s(3));
        let m4 = vdupq_n_u8(0x0f);
        let mut diff = [vdupq_n_s16(0); 8];
        let mut mins = [vdupq_n_s16(0); 8];
        for q in 0..4 {
            let (cur, next) = gather(table, &NATURAL, q);
            let (sc, nsc) = (vandq_u8(cur, m4), vandq_u8(next, m4));
            diff[2 * q] = vreinterpretq_s16_u16(vsubl_u8(vget_low_u8(sc), vget_low_u8(nsc)));
            diff[2 * q + 1] = vreinterpretq_s16_u16(vsubl_high_u8(sc, nsc));
            let mn = vshrq_n_u8::<4>(cur);
            mins[2 * q] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(mn)));
            mins[2 * q + 1] = vreinterpretq_s16_u16(vmovl_high_u8(mn));
        }
        Q2Prep {
            d: f16_scales4(wb.add(80), rb),
            dmin: f16_scales4(wb.add(82), rb),
            diff,
            mins,
        }
    }

    #[inline(always)]
    unsafe fn token(
        p: &Q2Prep,
        wb: *const u8,
        rb: usize,
        xb: *const u8,
        acc: float32x4_t,
    ) -> float32x4_t {
        let dy = f32_at(xb);
        let mins = times_bsums(&p.mins, xb);
        let acc = vaddq_f32(
            acc,
            vmulq_f32(vmulq_n_f32(p.dmin, -dy), vcvtq_f32_s32(mins)),
        );
        let rows = [0, 1, 2, 3].map(|r| wb.add(r * rb));
        let mut c = [vdupq_n_s32(0); ROWS];
        let mut isum = vdupq_n_s32(0);
        q2_part::<0>(&p.diff, &rows, xb, &mut c, &mut isum);
        q2_part::<1>(&p.diff, &rows, xb, &mut c, &mut isum);
        vaddq_f32(acc, vmulq_f32(vmulq_n_f32(p.d, dy), vcvtq_f32_s32(isum)))
    }
}

/// Values `128 J..128 J + 128` (groups `8 J..8 J + 8`) of every row: quant bytes
/// `32 J..32 J + 32`, crumb k of their halves h in group `8 J + 2k + h`.
#[inline(always)]
unsafe fn q2_part<const J: usize>(
    diff: &[int16x8_t; 8],
    rows: &[*const u8; ROWS],
    xb: *const u8,
    c: &mut [int32x4_t; ROWS],
    isum: &mut int32x4_t,
) {
    let bits = rows.map(|row| {
        let q = row.add(16 + 32 * J);
        [vld1q_u8(q), vld1q_u8(q.add(16))]
    });
    macro_rules! chunk {
        ($k:literal) => {
            for h in 0..2 {
                let x = load_i8x16(xb.add(4 + 128 * J + 32 * $k + 16 * h));
                let q = bits.map(|b| vreinterpretq_s8_u8(crumb::<$k>(b[h])));
                group(q, x, c, isum, widen(diff, 8 * J + 2 * $k + h));
            }
        };
    }
    chunk!(0);
    chunk!(1);
    chunk!(2);
    chunk!(3);
}

/// One 16-value group of the four rows (`q`, activations `x`) into the running sums `c`, and
/// their sums times the scale differences `diff` into `isum`.
#[inline(always)]
unsafe fn group(
    q: [int8x16_t; ROWS],
    x: int8x16_t,
    c: &mut [int32x4_t; ROWS],
    isum: &mut int32x4_t,
    diff: int32x4_t,
) {
    for (c_r, q_r) in c.iter_mut().zip(q) {
        *c_r = sdot(*c_r, q_r, x);
    }
    *isum = vmlaq_s32(*isum, row_sums(c), diff);
}

/// Q3_K, as `kquant::Q3K`: per 16 values the signed 3-bit quants (two low bits, minus 4 where
/// the high-bit mask is clear) times the signed 6-bit scale.
pub(super) struct Q3K;

pub(super) struct Q3Prep {
    d: float32x4_t,
    /// `sc_g - sc_(g+1)` of the four rows, two groups a vector (see [`widen`]).
    diff: [int16x8_t; 8],
}

impl KTile for Q3K {
    const BYTES: usize = Q3_K_BYTES;
    type Dot = kquant::Q3K;
    type Prep = Q3Prep;

    /// Each row's scales unpacked as the one-row dot does, then gathered as Q2_K's.
    #[inline(always)]
    unsafe fn prep(wb: *const u8, rb: usize) -> Q3Prep {
        let mut unpacked = [0i8; 16 * ROWS];
        for (r, s) in unpacked.chunks_exact_mut(16).enumerate() {
            let packed = std::slice::from_raw_parts(wb.add(r * rb + 96), 12);
            s.copy_from_slice(&q3_k_scales(packed));
        }
        let s = |r: usize| vld1q_u8(unpacked.as_ptr().add(16 * r) as *const u8);
        let table = uint8x16x4_t(s(0), s(1), s(2), s(3));
        let mut diff = [vdupq_n_s16(0); 8];
        for q in 0..4 {
            let (cur, next) = gather(table, &NATURAL, q);
            let (cur, next) = (vreinterpretq_s8_u8(cur), vreinterpretq_s8_u8(next));
            diff[2 * q] = vsubl_s8(vget_low_s8(cur), vget_low_s8(next));
            diff[2 * q + 1] = vsubl_high_s8(cur, next);
        }
        Q3Prep {
            d: f16_scales4(wb.add(108), rb),
            diff,
        }
    }

    #[inline(always)]
    unsafe fn token(
        p: &Q3Prep,
        wb: *const u8,
        rb: usize,
        xb: *const u8,
        acc: float32x4_t,
    ) -> float32x4_t {
        let rows = [0, 1, 2, 3].map(|r| wb.add(r * rb));
        let hbits = rows.map(|row| [vld1q_u8(row), vld1q_u8(row.add(16))]);
        let mut c = [vdupq_n_s32(0); ROWS];
        let mut isum = vdupq_n_s32(0);
        q3_part::<0>(&p.diff, &rows, &hbits, xb, &mut c, &mut isum);
        q3_part::<1>(&p.diff, &rows, &hbits, xb, &mut c, &mut isum);
        vaddq_f32(
            acc,
            vmulq_f32(vmulq_n_f32(p.d, f32_at(xb)), vcvtq_f32_s32(isum)),
        )
    }
}

/// Q2_K's [`q2_part`] for Q3_K: the high bit of chunk (J, k) is bit `4 J + k` of the mask bytes.
#[inline(always)]
unsafe fn q3_part<const J: usize>(
    diff: &[int16x8_t; 8],
    rows: &[*const u8; ROWS],
    hbits: &[[uint8x16_t; 2]; ROWS],
    xb: *const u8,
    c: &mut [int32x4_t; ROWS],
    isum: &mut int32x4_t,
) {
    let bits = rows.map(|row| {
        let q = row.add(32 + 32 * J);
        [vld1q_u8(q), vld1q_u8(q.add(16))]
    });
    let four = vdupq_n_u8(4);
    let values = |low: uint8x16_t, hbits: uint8x16_t, k: usize| {
        let clear = vbicq_u8(four, vtstq_u8(hbits, vdupq_n_u8(1 << (4 * J + k))));
        vsubq_s8(vreinterpretq_s8_u8(low), vreinterpretq_s8_u8(clear))
    };
    macro_rules! chunk {
        ($k:literal) => {
            for h in 0..2 {
                let x = load_i8x16(xb.add(4 + 128 * J + 32 * $k + 16 * h));
                let q = [0, 1, 2, 3].map(|r| values(crumb::<$k>(bits[r][h]), hbits[r][h], $k));
                group(q, x, c, isum, widen(diff, 8 * J + 2 * $k + h));
            }
        };
    }
    chunk!(0);
    chunk!(1);
    chunk!(2);
    chunk!(3);
}
