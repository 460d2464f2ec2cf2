//! NEON i-quant products against Q8_K activations. IQ4_XS only: IQ4_NL's levels in 256-value
//! super-blocks, looked up with a table instruction. The grid formats (IQ1-IQ3) stay on the
//! scalar kernels.

use std::arch::aarch64::*;

use super::block32::lookup4;
use super::{f16_scale, f32_at, load_i8x16, I8Dot, QuantDot};
use crate::tensor::blocks::block32::IQ4_NL_LEVELS;
use crate::tensor::blocks::iquant::{iq4_xs_scale, IQ4_XS_BYTES};
use crate::tensor::blocks::kquant::Q8_K_BYTES;

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
