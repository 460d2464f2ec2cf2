//! AVX2 i-quant products against Q8_K activations. IQ4_XS only: it is IQ4_NL's levels in
//! 256-value super-blocks with 6-bit sub-block scales, and its products are byte shuffles and
//! `maddubs` as for the k-quants. The grid formats (IQ1-IQ3) stay on the scalar kernels.

use std::arch::x86_64::*;

use super::kquant::KTile;
use super::{f16_scalar, f32_at, hsum};
use crate::tensor::blocks::block32::IQ4_NL_LEVELS;
use crate::tensor::blocks::iquant::{iq4_xs_scale, IQ4_XS_BYTES};
use crate::tensor::blocks::kquant::Q8_K_BYTES;

/// IQ4_XS (ggml's AVX2 `ggml_vec_dot_iq4_xs_q8_K`): per 32 values, the levels looked up with a
/// byte shuffle, multiplied with the activations by the sign trick (|w| times x with w's sign;
/// pairs of at most 2 * 127 * 127, and exact because Q8_K quants are within -127..=127), times
/// the sub-block scale, in eight i32 lanes scaled by d * dy once per block.
pub(super) struct Iq4Xs;
impl KTile for Iq4Xs {
    const BYTES: usize = IQ4_XS_BYTES;
    #[inline(always)]
    unsafe fn tile<const T: usize>(w: &[u8], x: *const u8, xb: usize, out: *mut f32) {
        let nb = w.len() / IQ4_XS_BYTES;
        let table = _mm_loadu_si128(IQ4_NL_LEVELS.as_ptr() as *const __m128i);
        let m4 = _mm_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); T];
        for i in 0..nb {
            let block = &w[i * IQ4_XS_BYTES..(i + 1) * IQ4_XS_BYTES];
            let wb = block.as_ptr();
            let wd = f16_scalar(wb);
            // Sub-block ib: values 0..16 from the low nibbles of its 16 bytes, 16..32 from the
            // high ones, which is the order of its 32 activations.
            let mut abs = [_mm256_setzero_si256(); 8];
            let mut signs = [_mm256_setzero_si256(); 8];
            let mut scale = [_mm256_setzero_si256(); 8];
            for ib in 0..8 {
                let bits = _mm_loadu_si128(wb.add(8 + 16 * ib) as *const __m128i);
                let lo = _mm_shuffle_epi8(table, _mm_and_si128(bits, m4));
                let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16::<4>(bits), m4));
                let q = _mm256_set_m128i(hi, lo);
                abs[ib] = _mm256_sign_epi8(q, q);
                signs[ib] = q;
                scale[ib] = _mm256_set1_epi16(iq4_xs_scale(block, ib) as i16);
            }
            for (t, acc_t) in acc.iter_mut().enumerate() {
                let xp = x.add(t * xb + i * Q8_K_BYTES);
                let d = wd * f32_at(xp);
                let mut sumi = _mm256_setzero_si256();
                for ib in 0..8 {
                    let q8 = _mm256_loadu_si256(xp.add(4 + 32 * ib) as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(abs[ib], _mm256_sign_epi8(q8, signs[ib]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, scale[ib]));
                }
                *acc_t = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), *acc_t);
            }
        }
        for (t, a) in acc.iter().enumerate() {
            *out.add(t) = hsum(*a);
        }
    }
}
