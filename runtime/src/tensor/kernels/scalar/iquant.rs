//! Scalar i-quant dot products against Q8_K activations, in the arithmetic of ggml's
//! `ggml_vec_dot_iq*_q8_K_generic`: exact integer sums per super-block, scaled once.

use crate::tensor::blocks::block32::IQ4_NL_LEVELS;
use crate::tensor::blocks::iquant::*;
use crate::tensor::blocks::kquant::{q8k_bsum, q8k_d, q8k_quants, Q8_K_BYTES};
use crate::tensor::blocks::{f16_at, u16_at, u32_at};

/// `sum(grid_j * sign_j * x_j)` over one group of 8: sign bit j of `signs` negates value j.
#[inline]
fn signed_grid_dot(grid: u64, signs: u8, x: &[u8]) -> i32 {
    let mut s = 0;
    for (j, (g, &q)) in grid.to_le_bytes().into_iter().zip(x).enumerate() {
        let p = g as i32 * q as i8 as i32;
        s += if signs >> j & 1 != 0 { -p } else { p };
    }
    s
}

/// IQ2_XXS (`ggml_vec_dot_iq2_xxs_q8_K_generic`).
pub fn dot_iq2_xxs_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w
        .chunks_exact(IQ2_XXS_BYTES)
        .zip(x.chunks_exact(Q8_K_BYTES))
    {
        let d = f16_at(wb, 0) * q8k_d(xb);
        let q8 = q8k_quants(xb);
        let mut bsum = 0i32;
        for ib in 0..8 {
            let at = 2 + 8 * ib;
            let aux = u32_at(wb, at + 4);
            let ls = 2 * (aux >> 28) as i32 + 1;
            let sumi: i32 = (0..4)
                .map(|l| {
                    let signs = KSIGNS[(aux >> (7 * l)) as usize & 127];
                    let grid = IQ2XXS_GRID[wb[at + l] as usize];
                    signed_grid_dot(grid, signs, &q8[32 * ib + 8 * l..])
                })
                .sum();
            bsum += sumi * ls;
        }
        sumf += d * bsum as f32;
    }
    0.125 * sumf
}

/// IQ2_XS (`ggml_vec_dot_iq2_xs_q8_K_generic`).
pub fn dot_iq2_xs_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(IQ2_XS_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let d = f16_at(wb, 0) * q8k_d(xb);
        let q8 = q8k_quants(xb);
        let mut bsum = 0i32;
        for ib in 0..8 {
            let sc = wb[66 + ib];
            let ls = [2 * (sc & 0x0f) as i32 + 1, 2 * (sc >> 4) as i32 + 1];
            for (half, &ls) in ls.iter().enumerate() {
                let sumi: i32 = (2 * half..2 * half + 2)
                    .map(|l| {
                        let v = u16_at(wb, 2 + 2 * (4 * ib + l));
                        let grid = IQ2XS_GRID[(v & 511) as usize];
                        signed_grid_dot(grid, KSIGNS[(v >> 9) as usize], &q8[32 * ib + 8 * l..])
                    })
                    .sum();
                bsum += sumi * ls;
            }
        }
        sumf += d * bsum as f32;
    }
    0.125 * sumf
}

/// IQ2_S (`ggml_vec_dot_iq2_s_q8_K_generic`).
pub fn dot_iq2_s_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(IQ2_S_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let d = f16_at(wb, 0) * q8k_d(xb);
        let q8 = q8k_quants(xb);
        let mut bsum = 0i32;
        for ib in 0..8 {
            let sc = wb[74 + ib];
            let (ls1, ls2) = (1 + 2 * (sc & 0x0f) as i32, 1 + 2 * (sc >> 4) as i32);
            let group = |l: usize| {
                let grid = IQ2S_GRID[iq2_s_index(wb, ib, l)];
                signed_grid_dot(grid, wb[34 + 4 * ib + l], &q8[32 * ib + 8 * l..])
            };
            let (sumi1, sumi2) = (group(0) + group(1), group(2) + group(3));
            bsum += ls1 * sumi1 + ls2 * sumi2;
        }
        sumf += d * bsum as f32;
    }
    0.125 * sumf
}

/// IQ3_XXS (`ggml_vec_dot_iq3_xxs_q8_K_generic`).
pub fn dot_iq3_xxs_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w
        .chunks_exact(IQ3_XXS_BYTES)
        .zip(x.chunks_exact(Q8_K_BYTES))
    {
        let d = f16_at(wb, 0) * q8k_d(xb);
        let q8 = q8k_quants(xb);
        let mut bsum = 0i32;
        for ib in 0..8 {
            let aux = u32_at(wb, 66 + 4 * ib);
            let ls = 2 * (aux >> 28) as i32 + 1;
            let sumi: i32 = (0..4)
                .map(|l| {
                    let signs = KSIGNS[(aux >> (7 * l)) as usize & 127];
                    let qs = &wb[2 + 8 * ib + 2 * l..];
                    let grid = IQ3XXS_GRID[qs[0] as usize] as u64
                        | (IQ3XXS_GRID[qs[1] as usize] as u64) << 32;
                    signed_grid_dot(grid, signs, &q8[32 * ib + 8 * l..])
                })
                .sum();
            bsum += sumi * ls;
        }
        sumf += d * bsum as f32;
    }
    0.25 * sumf
}

/// IQ3_S (`ggml_vec_dot_iq3_s_q8_K_generic`).
pub fn dot_iq3_s_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(IQ3_S_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let d = f16_at(wb, 0) * q8k_d(xb);
        let q8 = q8k_quants(xb);
        let mut bsum = 0i32;
        for ib in 0..8 {
            let ls = 2 * ((wb[106 + ib / 2] >> (4 * (ib % 2))) & 0x0f) as i32 + 1;
            let sumi: i32 = (0..4)
                .map(|l| {
                    let grid = IQ3S_GRID[iq3_s_index(wb, ib, 2 * l)] as u64
                        | (IQ3S_GRID[iq3_s_index(wb, ib, 2 * l + 1)] as u64) << 32;
                    signed_grid_dot(grid, wb[74 + 4 * ib + l], &q8[32 * ib + 8 * l..])
                })
                .sum();
            bsum += sumi * ls;
        }
        sumf += d * bsum as f32;
    }
    sumf
}

/// `sum(grid_j * x_j)` over one IQ1 group of 8 (grid values -1, 0, 1).
#[inline]
fn iq1_grid_dot(grid: u64, x: &[u8]) -> i32 {
    grid.to_le_bytes()
        .into_iter()
        .zip(x)
        .map(|(g, &q)| g as i8 as i32 * q as i8 as i32)
        .sum()
}

/// IQ1_S (`ggml_vec_dot_iq1_s_q8_K_generic`): the grid dot plus the delta (±1/8) times the
/// Q8_K sums, both per 32 values times the odd 3-bit scale.
pub fn dot_iq1_s_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(IQ1_S_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let q8 = q8k_quants(xb);
        let (mut sumi, mut sumi1) = (0i32, 0i32);
        for ib in 0..8 {
            let qh = u16_at(wb, 34 + 2 * ib) as i32;
            let ls = 2 * ((qh >> 12) & 7) + 1;
            let delta = if qh & 0x8000 != 0 { -1 } else { 1 };
            let lsum: i32 = (0..4)
                .map(|l| iq1_grid_dot(IQ1S_GRID[iq1_s_index(wb, ib, l)], &q8[32 * ib + 8 * l..]))
                .sum();
            sumi += ls * lsum;
            sumi1 += ls * delta * (q8k_bsum(xb, 2 * ib) + q8k_bsum(xb, 2 * ib + 1));
        }
        sumf += f16_at(wb, 0) * q8k_d(xb) * (sumi as f32 + IQ1_DELTA * sumi1 as f32);
    }
    sumf
}

/// IQ1_M (`ggml_vec_dot_iq1_m_q8_K_generic`): as IQ1_S with a scale and a delta sign per 16
/// and per 8 values.
pub fn dot_iq1_m_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(IQ1_M_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let q8 = q8k_quants(xb);
        let (mut sumi1, mut sumi2) = (0i32, 0i32);
        for ib in 0..8 {
            let (mut sum1, mut sum2) = ([0i32; 2], [0i32; 2]);
            for l in 0..4 {
                let (idx, negative) = iq1_m_index(wb, ib, l);
                let x = &q8[32 * ib + 8 * l..][..8];
                let lsum2: i32 = x.iter().map(|&q| q as i8 as i32).sum();
                sum1[l / 2] += iq1_grid_dot(IQ1S_GRID[idx], x);
                sum2[l / 2] += if negative { -lsum2 } else { lsum2 };
            }
            let [ls1, ls2] = iq1_m_scales(wb, ib);
            sumi1 += sum1[0] * ls1 + sum1[1] * ls2;
            sumi2 += sum2[0] * ls1 + sum2[1] * ls2;
        }
        sumf += iq1_m_scale(wb) * q8k_d(xb) * (sumi1 as f32 + IQ1_DELTA * sumi2 as f32);
    }
    sumf
}

/// IQ4_XS (`ggml_vec_dot_iq4_xs_q8_K_generic`): per 32 values, IQ4_NL's level dot times
/// `d * dy * (scale - 32)`, added to the float sum one sub-block at a time.
pub fn dot_iq4_xs_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (wb, xb) in w.chunks_exact(IQ4_XS_BYTES).zip(x.chunks_exact(Q8_K_BYTES)) {
        let d4d8 = f16_at(wb, 0) * q8k_d(xb);
        let q8 = q8k_quants(xb);
        for ib in 0..8 {
            let dl = d4d8 * iq4_xs_scale(wb, ib) as f32;
            let qs = &wb[8 + 16 * ib..8 + 16 * ib + 16];
            let sumi = super::nonlinear4_sum(qs, &q8[32 * ib..32 * ib + 32], &IQ4_NL_LEVELS);
            sumf += dl * sumi as f32;
        }
    }
    sumf
}
