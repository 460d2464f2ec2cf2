//! NEON i-quant products against Q8_K activations: IQ4_XS (IQ4_NL's levels in 256-value
//! super-blocks, looked up with a table instruction) and the grid formats (IQ1-IQ3).

use std::arch::aarch64::*;
use std::marker::PhantomData;

use super::block32::lookup4;
use super::{f16_scale, f32_at, load_i8x16, I8Dot, QuantDot};
use crate::tensor::blocks::block32::IQ4_NL_LEVELS;
use crate::tensor::blocks::iquant::{iq4_xs_scale, IQ4_XS_BYTES};
use crate::tensor::blocks::kquant::Q8_K_BYTES;
use crate::tensor::kernels::grid::GridFormat;

/// IQ4_XS (ggml's NEON `ggml_vec_dot_iq4_xs_q8_K`): per 32 values the levels dotted with the
/// activations, times the sub-block scale, in exact i32 lanes scaled by d * dy once per block.
pub(super) struct Iq4Xs;
impl QuantDot for Iq4Xs {
    const W_BYTES: usize = IQ4_XS_BYTES;
    const X_BYTES: usize = Q8_K_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let nb = w.len() / IQ4_XS_BYTES;
        let mut sum = 0f32;
        for i in 0..nb {
            let block = &w[i * IQ4_XS_BYTES..(i + 1) * IQ4_XS_BYTES];
            let wb = block.as_ptr();
            let xb = x.as_ptr().add(i * Q8_K_BYTES);
            let d = f16_scale(wb) * f32_at(xb);
            let mut isum = vdupq_n_s32(0);
            for ib in 0..8 {
                let q = lookup4(wb.add(8 + 16 * ib), &IQ4_NL_LEVELS);
                let q8 = xb.add(4 + 32 * ib);
                let p = D::dot32(q, [load_i8x16(q8), load_i8x16(q8.add(16))]);
                isum = vmlaq_n_s32(isum, p, iq4_xs_scale(block, ib));
            }
            sum += d * vaddvq_s32(isum) as f32;
        }
        sum
    }
}

/// The grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M), after ggml's NEON
/// kernels: per 16 values two grid entries, unpacked by scalar code, as one register with the
/// signs applied (magnitudes at most 62, so negation is exact; IQ1's grid is already signed),
/// dotted with the activations and scaled in i32; IQ1's shifts are the activations' sums per 4
/// values times delta * scale. The integer sums and float steps are the scalar reference's, so
/// the results equal it bit for bit.
pub(super) struct Grid<G>(PhantomData<G>);
impl<G: GridFormat> QuantDot for Grid<G> {
    const W_BYTES: usize = G::BYTES;
    const X_BYTES: usize = Q8_K_BYTES;
    #[inline(always)]
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
        let nb = w.len() / G::BYTES;
        let bits = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
        let mut sum = 0f32;
        for i in 0..nb {
            let b = &w[i * G::BYTES..(i + 1) * G::BYTES];
            let xb = x.as_ptr().add(i * Q8_K_BYTES);
            let mut acc = vdupq_n_s32(0);
            let mut acc_delta = vdupq_n_s32(0);
            for ib in 0..8 {
                let s = G::sub_block(b, ib);
                for h in 0..2 {
                    let q8 = load_i8x16(xb.add(4 + 32 * ib + 16 * h));
                    let grid = vreinterpretq_s8_u64(vcombine_u64(
                        vcreate_u64(s.grid[2 * h]),
                        vcreate_u64(s.grid[2 * h + 1]),
                    ));
                    let weights = if G::SIGNED_GRID {
                        grid
                    } else {
                        let sign_bytes =
                            vcombine_u8(vdup_n_u8(s.signs[2 * h]), vdup_n_u8(s.signs[2 * h + 1]));
                        vbslq_s8(vtstq_u8(sign_bytes, bits), vnegq_s8(grid), grid)
                    };
                    acc = vmlaq_n_s32(acc, D::dot16(weights, q8), s.scales[h]);
                    if G::SIGNED_GRID {
                        // Lanes 0, 1 are group 2h's values, lanes 2, 3 group 2h + 1's.
                        let sums = vpaddlq_s16(vpaddlq_s8(q8));
                        let (f0, f1) = (
                            s.deltas[2 * h] * s.scales[h],
                            s.deltas[2 * h + 1] * s.scales[h],
                        );
                        let factors = [f0, f0, f1, f1];
                        acc_delta = vmlaq_s32(acc_delta, sums, vld1q_s32(factors.as_ptr()));
                    }
                }
            }
            sum = G::add_block(sum, b, f32_at(xb), vaddvq_s32(acc), vaddvq_s32(acc_delta));
        }
        G::finish(sum)
    }
}
