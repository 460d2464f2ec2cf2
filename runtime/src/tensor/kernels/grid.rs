//! The grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) one 32-value
//! sub-block at a time, for the SIMD kernels: every format's sub-block is four grid entries of 8
//! values, a sign byte each, a scale per 16 values and (IQ1) a ±1/8 shift per group. The SIMD
//! kernels only differ in how they multiply these with the activations; the unpacking, here, is
//! scalar, as in ggml's SIMD kernels. The integer sums are exact and the float steps are those
//! of the scalar reference (`scalar::iquant`), so the SIMD results equal it bit for bit.

use crate::tensor::blocks::iquant::*;
use crate::tensor::blocks::{f16_at, u16_at, u32_at};

/// One 32-value sub-block, unpacked.
#[derive(Clone, Copy)]
pub struct SubBlock {
    /// Group g's 8 values, value j in byte j: magnitudes (u8), or -1/0/1 (i8) for IQ1.
    pub grid: [u64; 4],
    /// Group g's signs: bit j negates value j (zero for IQ1, whose grid carries its signs).
    pub signs: [u8; 4],
    /// The integer scales of values 0..16 and 16..32.
    pub scales: [i32; 2],
    /// IQ1 only: the sign of group g's shift (the shift is 1/8); zero for the others.
    pub deltas: [i32; 4],
}

/// A grid i-quant format as the SIMD kernels see it.
pub trait GridFormat {
    const BYTES: usize;
    /// Whether the grid holds signed values (IQ1) rather than magnitudes with sign bits.
    const SIGNED_GRID: bool;
    fn sub_block(b: &[u8], ib: usize) -> SubBlock;
    /// The running sum after block `b` with the exact integer sums `sumi` (scaled grid products)
    /// and `sumi_delta` (scaled shift terms), `dy` the activation block's scale: ggml's float
    /// steps for the format.
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, sumi_delta: i32) -> f32;
    /// The result from the running sum over all blocks.
    fn finish(sum: f32) -> f32;
}

/// Magnitude-and-sign grids: `sum += d * dy * sumi` per block, times `FACTOR` at the end.
fn add_signed(sum: f32, b: &[u8], dy: f32, sumi: i32) -> f32 {
    sum + f16_at(b, 0) * dy * sumi as f32
}

/// The IQ1 shifts: `sum += d * dy * (sumi + sumi_delta / 8)` per block.
fn add_iq1(sum: f32, d: f32, dy: f32, sumi: i32, sumi_delta: i32) -> f32 {
    sum + d * dy * (sumi as f32 + IQ1_DELTA * sumi_delta as f32)
}

fn odd(s: u32) -> i32 {
    2 * s as i32 + 1
}

pub struct Iq2Xxs;
impl GridFormat for Iq2Xxs {
    const BYTES: usize = IQ2_XXS_BYTES;
    const SIGNED_GRID: bool = false;
    #[inline(always)]
    fn sub_block(b: &[u8], ib: usize) -> SubBlock {
        let at = 2 + 8 * ib;
        let aux = u32_at(b, at + 4);
        let ls = odd(aux >> 28);
        SubBlock {
            grid: std::array::from_fn(|l| IQ2XXS_GRID[b[at + l] as usize]),
            signs: std::array::from_fn(|l| KSIGNS[(aux >> (7 * l)) as usize & 127]),
            scales: [ls, ls],
            deltas: [0; 4],
        }
    }
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, _: i32) -> f32 {
        add_signed(sum, b, dy, sumi)
    }
    fn finish(sum: f32) -> f32 {
        0.125 * sum
    }
}

pub struct Iq2Xs;
impl GridFormat for Iq2Xs {
    const BYTES: usize = IQ2_XS_BYTES;
    const SIGNED_GRID: bool = false;
    #[inline(always)]
    fn sub_block(b: &[u8], ib: usize) -> SubBlock {
        let v: [u16; 4] = std::array::from_fn(|l| u16_at(b, 2 + 2 * (4 * ib + l)));
        let sc = b[66 + ib] as u32;
        SubBlock {
            grid: v.map(|v| IQ2XS_GRID[(v & 511) as usize]),
            signs: v.map(|v| KSIGNS[(v >> 9) as usize]),
            scales: [odd(sc & 0x0f), odd(sc >> 4)],
            deltas: [0; 4],
        }
    }
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, _: i32) -> f32 {
        add_signed(sum, b, dy, sumi)
    }
    fn finish(sum: f32) -> f32 {
        0.125 * sum
    }
}

pub struct Iq2S;
impl GridFormat for Iq2S {
    const BYTES: usize = IQ2_S_BYTES;
    const SIGNED_GRID: bool = false;
    #[inline(always)]
    fn sub_block(b: &[u8], ib: usize) -> SubBlock {
        let sc = b[74 + ib] as u32;
        SubBlock {
            grid: std::array::from_fn(|l| IQ2S_GRID[iq2_s_index(b, ib, l)]),
            signs: std::array::from_fn(|l| b[34 + 4 * ib + l]),
            scales: [odd(sc & 0x0f), odd(sc >> 4)],
            deltas: [0; 4],
        }
    }
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, _: i32) -> f32 {
        add_signed(sum, b, dy, sumi)
    }
    fn finish(sum: f32) -> f32 {
        0.125 * sum
    }
}

/// Two grid entries of 4 values as one of 8 (the first in the low bytes).
#[inline(always)]
fn pair4(a: u32, b: u32) -> u64 {
    a as u64 | (b as u64) << 32
}

pub struct Iq3Xxs;
impl GridFormat for Iq3Xxs {
    const BYTES: usize = IQ3_XXS_BYTES;
    const SIGNED_GRID: bool = false;
    #[inline(always)]
    fn sub_block(b: &[u8], ib: usize) -> SubBlock {
        let aux = u32_at(b, 66 + 4 * ib);
        let qs = &b[2 + 8 * ib..2 + 8 * ib + 8];
        let ls = odd(aux >> 28);
        SubBlock {
            grid: std::array::from_fn(|l| {
                pair4(
                    IQ3XXS_GRID[qs[2 * l] as usize],
                    IQ3XXS_GRID[qs[2 * l + 1] as usize],
                )
            }),
            signs: std::array::from_fn(|l| KSIGNS[(aux >> (7 * l)) as usize & 127]),
            scales: [ls, ls],
            deltas: [0; 4],
        }
    }
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, _: i32) -> f32 {
        add_signed(sum, b, dy, sumi)
    }
    fn finish(sum: f32) -> f32 {
        0.25 * sum
    }
}

pub struct Iq3S;
impl GridFormat for Iq3S {
    const BYTES: usize = IQ3_S_BYTES;
    const SIGNED_GRID: bool = false;
    #[inline(always)]
    fn sub_block(b: &[u8], ib: usize) -> SubBlock {
        let ls = odd(((b[106 + ib / 2] >> (4 * (ib % 2))) & 0x0f) as u32);
        SubBlock {
            grid: std::array::from_fn(|l| {
                pair4(
                    IQ3S_GRID[iq3_s_index(b, ib, 2 * l)],
                    IQ3S_GRID[iq3_s_index(b, ib, 2 * l + 1)],
                )
            }),
            signs: std::array::from_fn(|l| b[74 + 4 * ib + l]),
            scales: [ls, ls],
            deltas: [0; 4],
        }
    }
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, _: i32) -> f32 {
        add_signed(sum, b, dy, sumi)
    }
    fn finish(sum: f32) -> f32 {
        sum
    }
}

pub struct Iq1S;
impl GridFormat for Iq1S {
    const BYTES: usize = IQ1_S_BYTES;
    const SIGNED_GRID: bool = true;
    #[inline(always)]
    fn sub_block(b: &[u8], ib: usize) -> SubBlock {
        let qh = u16_at(b, 34 + 2 * ib) as u32;
        let ls = odd((qh >> 12) & 7);
        let delta = if qh & 0x8000 != 0 { -1 } else { 1 };
        SubBlock {
            grid: std::array::from_fn(|l| IQ1S_GRID[iq1_s_index(b, ib, l)]),
            signs: [0; 4],
            scales: [ls, ls],
            deltas: [delta; 4],
        }
    }
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, sumi_delta: i32) -> f32 {
        add_iq1(sum, f16_at(b, 0), dy, sumi, sumi_delta)
    }
    fn finish(sum: f32) -> f32 {
        sum
    }
}

pub struct Iq1M;
impl GridFormat for Iq1M {
    const BYTES: usize = IQ1_M_BYTES;
    const SIGNED_GRID: bool = true;
    #[inline(always)]
    fn sub_block(b: &[u8], ib: usize) -> SubBlock {
        let groups: [(usize, bool); 4] = std::array::from_fn(|l| iq1_m_index(b, ib, l));
        SubBlock {
            grid: groups.map(|(idx, _)| IQ1S_GRID[idx]),
            signs: [0; 4],
            scales: iq1_m_scales(b, ib),
            deltas: groups.map(|(_, negative)| if negative { -1 } else { 1 }),
        }
    }
    fn add_block(sum: f32, b: &[u8], dy: f32, sumi: i32, sumi_delta: i32) -> f32 {
        add_iq1(sum, iq1_m_scale(b), dy, sumi, sumi_delta)
    }
    fn finish(sum: f32) -> f32 {
        sum
    }
}
