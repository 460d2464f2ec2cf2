//! The i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, IQ4_XS): super-blocks of
//! 256 values where groups of 8 (or 4) values are one entry of a fixed grid (codebook), with
//! signs stored apart, as ggml defines them (`dequantize_row_iq*` in ggml-quants.c). Only IQ4_XS
//! is also written by the converter (`iq4_encode`).

use super::block32::IQ4_NL_LEVELS;
use super::grids::*;
use super::{f16_at, u16_at, u32_at, QK_K};
use half::f16;

pub const IQ2_XXS_BYTES: usize = 66;
pub const IQ2_XS_BYTES: usize = 74;
pub const IQ2_S_BYTES: usize = 82;
pub const IQ3_XXS_BYTES: usize = 98;
pub const IQ3_S_BYTES: usize = 110;
pub const IQ1_S_BYTES: usize = 50;
pub const IQ1_M_BYTES: usize = 56;
pub const IQ4_XS_BYTES: usize = 136;

/// Grid entries of 8 values as the 8 bytes of a u64 (value j in byte j), as ggml stores them.
const fn expand8<const N: usize>(packed: &[u16; N], field: u32, levels: &[i8]) -> [u64; N] {
    let mut out = [0u64; N];
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < 8 {
            let idx = (packed[i] >> (field * j)) & ((1 << field) - 1);
            out[i] |= (levels[idx as usize] as u8 as u64) << (8 * j);
            j += 1;
        }
        i += 1;
    }
    out
}

/// Grid entries of 4 values as the 4 bytes of a u32.
const fn expand4<const N: usize>(packed: &[u16; N], field: u32, levels: &[i8]) -> [u32; N] {
    let mut out = [0u32; N];
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < 4 {
            let idx = (packed[i] >> (field * j)) & ((1 << field) - 1);
            out[i] |= (levels[idx as usize] as u8 as u32) << (8 * j);
            j += 1;
        }
        i += 1;
    }
    out
}

/// ggml's `iq2xxs_grid`: 256 entries of 8 magnitudes from {8, 25, 43}.
pub static IQ2XXS_GRID: [u64; 256] = expand8(&IQ2XXS_PACKED, IQ2XXS_FIELD, &IQ2XXS_LEVELS);
/// ggml's `iq2xs_grid`: 512 entries of 8 magnitudes from {8, 25, 43}.
pub static IQ2XS_GRID: [u64; 512] = expand8(&IQ2XS_PACKED, IQ2XS_FIELD, &IQ2XS_LEVELS);
/// ggml's `iq2s_grid`: 1024 entries of 8 magnitudes from {8, 25, 43}.
pub static IQ2S_GRID: [u64; 1024] = expand8(&IQ2S_PACKED, IQ2S_FIELD, &IQ2S_LEVELS);
/// ggml's `iq3xxs_grid`: 256 entries of 4 magnitudes from {4, 12, .., 52, 62}.
pub static IQ3XXS_GRID: [u32; 256] = expand4(&IQ3XXS_PACKED, IQ3XXS_FIELD, &IQ3XXS_LEVELS);
/// ggml's `iq3s_grid`: 512 entries of 4 odd magnitudes 1..=15.
pub static IQ3S_GRID: [u32; 512] = expand4(&IQ3S_PACKED, IQ3S_FIELD, &IQ3S_LEVELS);
/// ggml's `iq1s_grid`: 2048 entries of 8 values from {-1, 0, 1} (bytes as i8).
pub static IQ1S_GRID: [u64; 2048] = expand8(&IQ1S_PACKED, IQ1S_FIELD, &IQ1S_LEVELS);

/// ggml's `ksigns_iq2xs`: a 7-bit index to 8 sign bits, the eighth making the count of negative
/// signs even.
pub static KSIGNS: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = i as u8 | (((i as u32).count_ones() as u8 & 1) << 7);
        i += 1;
    }
    t
};

/// The shift IQ1_S/IQ1_M add to every grid value of a group of 8, with the sign its bit selects.
pub const IQ1_DELTA: f32 = 0.125;

/// Writes `db * grid * sign` for one group of 8, in ggml's order of operations: sign bit j of
/// `signs` negates value j.
#[inline]
fn put8(y: &mut [f32], db: f32, grid: u64, signs: u8) {
    for (j, (o, g)) in y.iter_mut().zip(grid.to_le_bytes()).enumerate() {
        let sign = if signs >> j & 1 != 0 { -1.0 } else { 1.0 };
        *o = db * g as f32 * sign;
    }
}

/// IQ2_XXS block: f16 d, then per 32 values 8 bytes: four grid indices and a u32 of four 7-bit
/// sign indices and a 4-bit scale (top bits).
pub fn dequantize_row_iq2_xxs(q: &[u8], out: &mut [f32]) {
    for (b, y) in q
        .chunks_exact(IQ2_XXS_BYTES)
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = f16_at(b, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let at = 2 + 8 * ib;
            let aux = u32_at(b, at + 4);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let signs = KSIGNS[(aux >> (7 * l)) as usize & 127];
                put8(y, db, IQ2XXS_GRID[b[at + l] as usize], signs);
            }
        }
    }
}

/// IQ2_XS block: f16 d, 32 u16 (9-bit grid index, 7-bit sign index), 8 bytes of two 4-bit
/// scales (one per 16 values).
pub fn dequantize_row_iq2_xs(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(IQ2_XS_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let sc = b[66 + ib];
            let db = [
                d * (0.5 + (sc & 0x0f) as f32) * 0.25,
                d * (0.5 + (sc >> 4) as f32) * 0.25,
            ];
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let v = u16_at(b, 2 + 2 * (4 * ib + l));
                put8(
                    y,
                    db[l / 2],
                    IQ2XS_GRID[(v & 511) as usize],
                    KSIGNS[(v >> 9) as usize],
                );
            }
        }
    }
}

/// The 10-bit grid index of group `l` (0..4) of sub-block `ib` of an IQ2_S block.
#[inline]
pub fn iq2_s_index(b: &[u8], ib: usize, l: usize) -> usize {
    b[2 + 4 * ib + l] as usize | ((b[66 + ib] as usize) << (8 - 2 * l) & 0x300)
}

/// IQ2_S block: f16 d, 32 low bytes of grid indices, 32 sign bytes, 8 bytes of the indices'
/// top two bits, 8 bytes of two 4-bit scales.
pub fn dequantize_row_iq2_s(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(IQ2_S_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let sc = b[74 + ib];
            let db = [
                d * (0.5 + (sc & 0x0f) as f32) * 0.25,
                d * (0.5 + (sc >> 4) as f32) * 0.25,
            ];
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let signs = b[34 + 4 * ib + l];
                put8(y, db[l / 2], IQ2S_GRID[iq2_s_index(b, ib, l)], signs);
            }
        }
    }
}

/// Two grid entries of 4 values as one of 8 (the first in the low bytes).
#[inline]
fn pair4(a: u32, b: u32) -> u64 {
    a as u64 | (b as u64) << 32
}

/// IQ3_XXS block: f16 d, 64 grid indices, then per 32 values a u32 of four 7-bit sign indices
/// and a 4-bit scale.
pub fn dequantize_row_iq3_xxs(q: &[u8], out: &mut [f32]) {
    for (b, y) in q
        .chunks_exact(IQ3_XXS_BYTES)
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = f16_at(b, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let aux = u32_at(b, 66 + 4 * ib);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let signs = KSIGNS[(aux >> (7 * l)) as usize & 127];
                let qs = &b[2 + 8 * ib + 2 * l..];
                let grid = pair4(IQ3XXS_GRID[qs[0] as usize], IQ3XXS_GRID[qs[1] as usize]);
                put8(y, db, grid, signs);
            }
        }
    }
}

/// The 9-bit grid index `k` (0..8) of sub-block `ib` of an IQ3_S block.
#[inline]
pub fn iq3_s_index(b: &[u8], ib: usize, k: usize) -> usize {
    b[2 + 8 * ib + k] as usize | ((b[66 + ib] as usize >> k) & 1) << 8
}

/// IQ3_S block: f16 d, 64 low bytes of grid indices, 8 bytes of their top bits, 32 sign bytes,
/// 4 bytes of two 4-bit scales (one per 32 values).
pub fn dequantize_row_iq3_s(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(IQ3_S_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let db = d * (1 + 2 * ((b[106 + ib / 2] >> (4 * (ib % 2))) & 0x0f) as i32) as f32;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let grid = pair4(
                    IQ3S_GRID[iq3_s_index(b, ib, 2 * l)],
                    IQ3S_GRID[iq3_s_index(b, ib, 2 * l + 1)],
                );
                put8(y, db, grid, b[74 + 4 * ib + l]);
            }
        }
    }
}

/// `dl * (grid + delta)` for one group of 8 (IQ1_S and IQ1_M).
#[inline]
fn put8_iq1(y: &mut [f32], dl: f32, grid: u64, delta: f32) {
    for (o, g) in y.iter_mut().zip(grid.to_le_bytes()) {
        *o = dl * (g as i8 as f32 + delta);
    }
}

/// The 11-bit grid index of group `l` of sub-block `ib` of an IQ1_S block.
#[inline]
pub fn iq1_s_index(b: &[u8], ib: usize, l: usize) -> usize {
    let qh = u16_at(b, 34 + 2 * ib) as usize;
    b[2 + 4 * ib + l] as usize | ((qh >> (3 * l)) & 7) << 8
}

/// IQ1_S block: f16 d, 32 low bytes of grid indices, then per 32 values a u16 of four 3-bit
/// index tops, a 3-bit scale and the delta's sign (top bit).
pub fn dequantize_row_iq1_s(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(IQ1_S_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let qh = u16_at(b, 34 + 2 * ib);
            let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
            let delta = if qh & 0x8000 != 0 {
                -IQ1_DELTA
            } else {
                IQ1_DELTA
            };
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                put8_iq1(y, dl, IQ1S_GRID[iq1_s_index(b, ib, l)], delta);
            }
        }
    }
}

/// The f16 super-block scale of an IQ1_M block, spread over the top nibbles of its four u16
/// scale words.
#[inline]
pub fn iq1_m_scale(b: &[u8]) -> f32 {
    let sc = |i: usize| u16_at(b, 48 + 2 * i);
    let bits = (sc(0) >> 12) | ((sc(1) >> 8) & 0x00f0) | ((sc(2) >> 4) & 0x0f00) | (sc(3) & 0xf000);
    f16::from_bits(bits).to_f32()
}

/// The 3-bit scales of the two 16-value halves of sub-block `ib` of an IQ1_M block, as the odd
/// multipliers `2s + 1`.
#[inline]
pub fn iq1_m_scales(b: &[u8], ib: usize) -> [i32; 2] {
    let sc = u16_at(b, 48 + 2 * (ib / 2)) as i32;
    let shift = 6 * (ib % 2);
    [
        2 * ((sc >> shift) & 7) + 1,
        2 * ((sc >> (shift + 3)) & 7) + 1,
    ]
}

/// The 11-bit grid index of group `l` of sub-block `ib` of an IQ1_M block, and whether its
/// delta is negative.
#[inline]
pub fn iq1_m_index(b: &[u8], ib: usize, l: usize) -> (usize, bool) {
    let qh = b[32 + 2 * ib + l / 2] >> (4 * (l % 2));
    (
        b[4 * ib + l] as usize | ((qh & 7) as usize) << 8,
        qh & 8 != 0,
    )
}

/// IQ1_M block: 32 low bytes of grid indices, 16 bytes of (3-bit index top, delta sign) nibbles,
/// 8 bytes of 3-bit scales (four per u16, whose top nibbles hold the f16 super-block scale).
pub fn dequantize_row_iq1_m(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(IQ1_M_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = iq1_m_scale(b);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let ls = iq1_m_scales(b, ib);
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let dl = d * ls[l / 2] as f32;
                let (idx, negative) = iq1_m_index(b, ib, l);
                let delta = if negative { -IQ1_DELTA } else { IQ1_DELTA };
                put8_iq1(y, dl, IQ1S_GRID[idx], delta);
            }
        }
    }
}

/// The 6-bit scale of sub-block `ib` of an IQ4_XS block, minus its offset of 32.
#[inline]
pub fn iq4_xs_scale(b: &[u8], ib: usize) -> i32 {
    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0f;
    let high = (u16_at(b, 2) >> (2 * ib)) & 3;
    (low as u16 | high << 4) as i32 - 32
}

/// IQ4_XS block: f16 d, u16 of the scales' top bits, 4 bytes of their low nibbles, 128 bytes of
/// indices into the IQ4_NL levels (per 32 values, as an IQ4_NL block).
pub fn dequantize_row_iq4_xs(q: &[u8], out: &mut [f32]) {
    for (b, y) in q.chunks_exact(IQ4_XS_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let dl = d * iq4_xs_scale(b, ib) as f32;
            let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
            for j in 0..16 {
                y[j] = dl * IQ4_NL_LEVELS[(qs[j] & 0x0f) as usize] as f32;
                y[j + 16] = dl * IQ4_NL_LEVELS[(qs[j] >> 4) as usize] as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spot checks against ggml's tables as printed in ggml-common.h (first, second and last
    /// entries), and the sign table's rule.
    #[test]
    fn grids_expand_to_ggml_tables() {
        assert_eq!(IQ2XXS_GRID[0], 0x0808_0808_0808_0808);
        assert_eq!(IQ2XXS_GRID[1], 0x0808_0808_0808_082b);
        assert_eq!(IQ3XXS_GRID[0], 0x0404_0404);
        assert_eq!(IQ3XXS_GRID[1], 0x0404_0414);
        assert_eq!(IQ1S_GRID[0], 0xffff_ffff_ffff_ffff);
        assert_eq!(IQ1S_GRID[1], 0xffff_ffff_ffff_ff01);
        assert_eq!(KSIGNS[..8], [0, 129, 130, 3, 132, 5, 6, 135]);
        assert_eq!(KSIGNS[127], 255);
    }
}
