//! AVX2 i-quant products against Q8_K activations: IQ4_XS (IQ4_NL's levels in 256-value
//! super-blocks, tiled as the k-quants) and the grid formats (IQ1-IQ3, one token at a time).

use std::arch::x86_64::*;

use super::kquant::KTile;
use super::{f16_scalar, f32_at, hsum, prefetch_block};
use crate::tensor::blocks::block32::IQ4_NL_LEVELS;
use crate::tensor::blocks::iquant::{iq4_xs_scale, IQ4_XS_BYTES};
use crate::tensor::blocks::kquant::Q8_K_BYTES;
use crate::tensor::kernels::check_k;
use crate::tensor::kernels::grid::GridFormat;

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
            prefetch_block(wb, IQ4_XS_BYTES);
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

/// The grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M), after ggml's AVX2
/// kernels: per 32-value sub-block the four grid entries, unpacked by scalar code, as one
/// register; the sign bits spread to bytes and applied to the activations (or, for IQ1's signed
/// grid, the sign trick); `maddubs` (pairs of at most 2 * 62 * 127) and the per-half scales by
/// `madd`. IQ1's shifts are the activations' pair sums times delta * scale. The integer sums
/// are exact, as the scalar kernel's, and the float steps are its own, so the results equal it
/// bit for bit (for activations within -127..=127, which the Q8_K quantizer guarantees).
pub(super) fn dot_grid<G: GridFormat>(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, G::BYTES, x);
    // SAFETY: features checked in `tables()`; lengths checked above.
    unsafe { dot_grid_impl::<G>(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_grid_impl<G: GridFormat>(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / G::BYTES;
    let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    // Byte 8g + j takes group g's sign byte (each 128-bit half holds all four).
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let ones = _mm256_set1_epi8(1);
    let mut sum = 0f32;
    for i in 0..nb {
        let b = &w[i * G::BYTES..(i + 1) * G::BYTES];
        prefetch_block(b.as_ptr(), G::BYTES);
        let xp = x.as_ptr().add(i * Q8_K_BYTES);
        let mut acc = _mm256_setzero_si256();
        let mut acc_delta = _mm256_setzero_si256();
        for ib in 0..8 {
            let s = G::sub_block(b, ib);
            let q8 = _mm256_loadu_si256(xp.add(4 + 32 * ib) as *const __m256i);
            let g = s.grid.map(|v| v as i64);
            let grid = _mm256_set_epi64x(g[3], g[2], g[1], g[0]);
            let scales = _mm256_set_m128i(
                _mm_set1_epi16(s.scales[1] as i16),
                _mm_set1_epi16(s.scales[0] as i16),
            );
            let p16 = if G::SIGNED_GRID {
                _mm256_maddubs_epi16(_mm256_sign_epi8(grid, grid), _mm256_sign_epi8(q8, grid))
            } else {
                let sign_bytes = _mm256_set1_epi32(i32::from_le_bytes(s.signs));
                let signs = _mm256_shuffle_epi8(sign_bytes, spread);
                let negative = _mm256_cmpeq_epi8(_mm256_and_si256(signs, bits), bits);
                let signed_q8 = _mm256_sign_epi8(q8, _mm256_or_si256(negative, ones));
                _mm256_maddubs_epi16(grid, signed_q8)
            };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, scales));
            if G::SIGNED_GRID {
                // i16 lanes 4g..4g + 4 of the pair sums are group g's.
                let pairs = _mm256_maddubs_epi16(ones, q8);
                let f = |g: usize| (s.deltas[g] * s.scales[g / 2]) as i16;
                let (f0, f1, f2, f3) = (f(0), f(1), f(2), f(3));
                let factors = _mm256_setr_epi16(
                    f0, f0, f0, f0, f1, f1, f1, f1, f2, f2, f2, f2, f3, f3, f3, f3,
                );
                acc_delta = _mm256_add_epi32(acc_delta, _mm256_madd_epi16(pairs, factors));
            }
        }
        sum = G::add_block(sum, b, f32_at(xp), hsum_i32(acc), hsum_i32(acc_delta));
    }
    G::finish(sum)
}

/// The sum of the eight i32 lanes (exact: the kernels keep them far from overflow).
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}
