//! AVX2 k-quant products against Q8_K activations, after ggml's AVX2 `ggml_vec_dot_q*_K_q8_K`.
//! Q2_K, Q3_K, Q4_K and Q5_K are tiles of one weight row by up to four tokens: a block's quants
//! and scales are unpacked once for every token of the tile (prefill, an expert's share of a
//! batch), and each token takes exactly the steps of the one-token dot, so the tiled products
//! equal the dots bit for bit.
//!
//! The weights are unsigned bytes (quants without their offset or sign) so that `maddubs` can
//! multiply them with the signed activations; pairs of products stay below 2 * 63 * 128, so
//! nothing saturates, and the integer sums are exact for any activation byte, -128 included.

use std::arch::x86_64::*;

use super::{f16_scalar, f32_at, hsum, prefetch_block};
use crate::tensor::blocks::kquant::{
    Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, Q8_K_BSUMS_AT, Q8_K_BYTES,
};
use crate::tensor::kernels::check_k;

/// A k-quant format with a tile kernel: one weight row (`w`, whole blocks) times `T` Q8_K
/// activation rows (`xb` bytes apart from `x`), writing `out[0..T]`.
pub(super) trait KTile {
    const BYTES: usize;
    unsafe fn tile<const T: usize>(w: &[u8], x: *const u8, xb: usize, out: *mut f32);
}

/// The dot product of one weight row with one activation row.
pub(super) fn dot<K: KTile>(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, K::BYTES, x);
    let mut out = [0f32];
    // SAFETY: features checked in `tables()`; lengths checked above.
    unsafe { tile_impl::<K>(w, x, &mut out) };
    out[0]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_impl<K: KTile>(w: &[u8], x: &[u8], out: &mut [f32; 1]) {
    K::tile::<1>(w, x.as_ptr(), x.len(), out.as_mut_ptr());
}

/// `out[r * n + t] = w_r . x_t`: each row against up to four tokens at a time. A single token
/// (decoding) thus goes one row at a time, each row streamed from start to end: four rows at a
/// time, sharing the activations' loads, decoded slower on an AMD EPYC (docs/BENCHMARKS.md).
pub(super) fn gemm<K: KTile>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    assert!(rows > 0 && n > 0 && out.len() >= rows * n, "gemm shape");
    let (wb, xb) = (w.len() / rows, x.len() / n);
    assert_eq!((wb * rows, xb * n), (w.len(), x.len()), "whole rows");
    check_k(&w[..wb], K::BYTES, &x[..xb]);
    // SAFETY: features checked in `tables()`; shapes checked above.
    unsafe { gemm_impl::<K>(w, rows, x, n, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_impl<K: KTile>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    let (wb, xb) = (w.len() / rows, x.len() / n);
    for r in 0..rows {
        let wr = &w[r * wb..(r + 1) * wb];
        let mut t = 0;
        while t < n {
            let (xp, o) = (x.as_ptr().add(t * xb), out.as_mut_ptr().add(r * n + t));
            let width = (n - t).min(4);
            match width {
                1 => K::tile::<1>(wr, xp, xb, o),
                2 => K::tile::<2>(wr, xp, xb, o),
                3 => K::tile::<3>(wr, xp, xb, o),
                _ => K::tile::<4>(wr, xp, xb, o),
            }
            t += width;
        }
    }
}

/// A byte-shuffle pattern that copies i16 lane `lo` of the low 128-bit half to all its eight
/// lanes, and lane `hi` of the high half to all of its (ggml's `get_scale_shuffle_*`).
#[inline(always)]
unsafe fn spread_i16(lo: usize, hi: usize) -> __m256i {
    let pair = |i: usize| ((2 * i as u16) | ((2 * i as u16 + 1) << 8)) as i16;
    _mm256_set_m128i(_mm_set1_epi16(pair(hi)), _mm_set1_epi16(pair(lo)))
}

/// Sixteen i16 scales (groups of 16 values) as two registers: groups 0..8 and 8..16, each in
/// both 128-bit halves, for [`spread_i16`].
#[inline(always)]
unsafe fn scales_by_half(s16: __m256i) -> [__m256i; 2] {
    let lo = _mm256_castsi256_si128(s16);
    let hi = _mm256_extracti128_si256::<1>(s16);
    [_mm256_set_m128i(lo, lo), _mm256_set_m128i(hi, hi)]
}

/// Bits `2k..2k + 2` of every byte of `bits`.
#[inline(always)]
unsafe fn crumb(bits: __m256i, k: usize) -> __m256i {
    let shifted = _mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * k as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(3))
}

/// Q2_K: per 16 values a 4-bit scale and a 4-bit min. The quants (0..=3) times the activations,
/// times the scales; the minimum term is the mins times the Q8_K 16-value sums, scaled by
/// -dmin; both go to one float accumulator per block, as in ggml.
pub(super) struct Q2K;
impl KTile for Q2K {
    const BYTES: usize = Q2_K_BYTES;
    #[inline(always)]
    unsafe fn tile<const T: usize>(w: &[u8], x: *const u8, xb: usize, out: *mut f32) {
        q2k_tile::<1, T>(w.as_ptr(), w.len(), x, xb, out, T);
    }
}

/// `R` Q2_K rows (`row_bytes` apart) times `T` Q8_K activation rows (`xb` bytes apart), writing
/// `out[r * n + t]`, every pair by the same steps.
#[inline(always)]
unsafe fn q2k_tile<const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    x: *const u8,
    xb: usize,
    out: *mut f32,
    n: usize,
) {
    let nb = row_bytes / Q2_K_BYTES;
    let m4 = _mm_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for i in 0..nb {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wb = w.add(r * row_bytes + i * Q2_K_BYTES);
            prefetch_block(wb, Q2_K_BYTES);
            // (d, dmin) of the block, converted together.
            let dmin = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                wb.add(80) as *const i32
            )));
            let packed = _mm_loadu_si128(wb as *const __m128i);
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), m4));
            let scales = scales_by_half(_mm256_cvtepu8_epi16(_mm_and_si128(packed, m4)));
            // Chunk (j, k): values 128j + 32k..+32, crumb k of quant bytes 32j..32j + 32, its
            // halves in groups 8j + 2k and 8j + 2k + 1.
            let mut q2 = [[_mm256_setzero_si256(); 4]; 2];
            let mut sc = [[_mm256_setzero_si256(); 4]; 2];
            for j in 0..2 {
                let bits = _mm256_loadu_si256(wb.add(16 + 32 * j) as *const __m256i);
                for k in 0..4 {
                    q2[j][k] = crumb(bits, k);
                    sc[j][k] = _mm256_shuffle_epi8(scales[j], spread_i16(2 * k, 2 * k + 1));
                }
            }
            for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                let xp = x.add(t * xb + i * Q8_K_BYTES);
                let dy = f32_at(xp);
                let ds = _mm_mul_ps(dmin, _mm_setr_ps(dy, -dy, 0.0, 0.0));
                let bsums = _mm256_loadu_si256(xp.add(Q8_K_BSUMS_AT) as *const __m256i);
                let prod = _mm256_madd_epi16(mins, bsums);
                let neg_dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(ds));
                *acc_rt = _mm256_fmadd_ps(neg_dmin, _mm256_cvtepi32_ps(prod), *acc_rt);
                let mut sumi = _mm256_setzero_si256();
                for j in 0..2 {
                    for k in 0..4 {
                        let q8 = _mm256_loadu_si256(xp.add(4 + 128 * j + 32 * k) as *const __m256i);
                        let p = _mm256_madd_epi16(sc[j][k], _mm256_maddubs_epi16(q2[j][k], q8));
                        sumi = _mm256_add_epi32(sumi, p);
                    }
                }
                let d = _mm256_broadcastss_ps(ds);
                *acc_rt = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), *acc_rt);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, a) in acc_r.iter().enumerate() {
            *out.add(r * n + t) = hsum(*a);
        }
    }
}

/// Q3_K: per 16 values a signed 6-bit scale; the values are two low bits minus 4 where the
/// high-bit mask is clear. The quants are taken as two low bits plus 4 where the mask is set
/// (0..=7, unsigned for maddubs) and the 4 is taken off once per block as
/// 4 * sum(scale * Q8_K 16-value sum), as Q6_K's offset is: the same exact integer sums as
/// ggml's two products per chunk, with one.
pub(super) struct Q3K;
impl KTile for Q3K {
    const BYTES: usize = Q3_K_BYTES;
    #[inline(always)]
    unsafe fn tile<const T: usize>(w: &[u8], x: *const u8, xb: usize, out: *mut f32) {
        q3k_tile::<1, T>(w.as_ptr(), w.len(), x, xb, out, T);
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block from its 12 packed bytes at `p`
/// (`q3_k_scales`, with shuffles): low nibbles of bytes 0..8 then their high nibbles, with two
/// bits of bytes 8..12 above them (bits 2g..2g + 2 for scales 4g..4g + 4, g of each byte
/// k % 4), minus 32.
#[inline(always)]
unsafe fn q3k_scales(p: *const u8) -> __m128i {
    let s = _mm_insert_epi32::<2>(
        _mm_loadl_epi64(p as *const __m128i),
        std::ptr::read_unaligned(p.add(8) as *const i32),
    );
    let nibbles = _mm_shuffle_epi8(
        s,
        _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7),
    );
    let low = _mm_or_si128(
        _mm_and_si128(
            nibbles,
            _mm_setr_epi8(15, 15, 15, 15, 15, 15, 15, 15, 0, 0, 0, 0, 0, 0, 0, 0),
        ),
        _mm_and_si128(
            _mm_srli_epi16::<4>(nibbles),
            _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15, 15, 15, 15, 15),
        ),
    );
    let h = _mm_shuffle_epi8(
        s,
        _mm_setr_epi8(8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11),
    );
    // Bits 2g..2g + 2 of group g's bytes moved to bits 4..6.
    let group = |g: i8| {
        let v = |i: i8| if i / 4 == g { 0x30 } else { 0 };
        _mm_setr_epi8(
            v(0),
            v(1),
            v(2),
            v(3),
            v(4),
            v(5),
            v(6),
            v(7),
            v(8),
            v(9),
            v(10),
            v(11),
            v(12),
            v(13),
            v(14),
            v(15),
        )
    };
    let high = _mm_or_si128(
        _mm_or_si128(
            _mm_and_si128(_mm_slli_epi16::<4>(h), group(0)),
            _mm_and_si128(_mm_slli_epi16::<2>(h), group(1)),
        ),
        _mm_or_si128(
            _mm_and_si128(h, group(2)),
            _mm_and_si128(_mm_srli_epi16::<2>(h), group(3)),
        ),
    );
    _mm_sub_epi8(_mm_or_si128(low, high), _mm_set1_epi8(32))
}

/// `R` Q3_K rows (`row_bytes` apart) times `T` Q8_K activation rows (`xb` bytes apart), writing
/// `out[r * n + t]`, every pair by the same steps.
#[inline(always)]
unsafe fn q3k_tile<const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    x: *const u8,
    xb: usize,
    out: *mut f32,
    n: usize,
) {
    let nb = row_bytes / Q3_K_BYTES;
    let four = _mm256_set1_epi8(4);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for i in 0..nb {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wb = w.add(r * row_bytes + i * Q3_K_BYTES);
            prefetch_block(wb, Q3_K_BYTES);
            let wd = f16_scalar(wb.add(108));
            let scales16 = _mm256_cvtepi8_epi16(q3k_scales(wb.add(96)));
            let scales = scales_by_half(scales16);
            let hbits = _mm256_loadu_si256(wb as *const __m256i);
            // Chunk (j, k) as Q2_K's; its high bit is bit 4j + k of the mask bytes, moved to
            // bit 2 (4) of each byte by a shift within 16-bit lanes that brings no other bit
            // there.
            let mut q = [[_mm256_setzero_si256(); 4]; 2];
            let mut sc = [[_mm256_setzero_si256(); 4]; 2];
            for j in 0..2 {
                let bits = _mm256_loadu_si256(wb.add(32 + 32 * j) as *const __m256i);
                for k in 0..4 {
                    let b = 4 * j + k;
                    let moved = if b < 2 {
                        _mm256_sll_epi16(hbits, _mm_cvtsi32_si128(2 - b as i32))
                    } else {
                        _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(b as i32 - 2))
                    };
                    q[j][k] = _mm256_or_si256(crumb(bits, k), _mm256_and_si256(moved, four));
                    sc[j][k] = _mm256_shuffle_epi8(scales[j], spread_i16(2 * k, 2 * k + 1));
                }
            }
            for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                let xp = x.add(t * xb + i * Q8_K_BYTES);
                let d = f32_at(xp) * wd;
                let q8sums = _mm256_loadu_si256(xp.add(Q8_K_BSUMS_AT) as *const __m256i);
                let offset = _mm256_slli_epi32::<2>(_mm256_madd_epi16(q8sums, scales16));
                let mut sumi = _mm256_setzero_si256();
                for j in 0..2 {
                    for k in 0..4 {
                        let q8 = _mm256_loadu_si256(xp.add(4 + 128 * j + 32 * k) as *const __m256i);
                        let p = _mm256_madd_epi16(sc[j][k], _mm256_maddubs_epi16(q[j][k], q8));
                        sumi = _mm256_add_epi32(sumi, p);
                    }
                }
                sumi = _mm256_sub_epi32(sumi, offset);
                *acc_rt = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), *acc_rt);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, a) in acc_r.iter().enumerate() {
            *out.add(r * n + t) = hsum(*a);
        }
    }
}

/// Q4_K (`FIVE` false) and Q5_K (`FIVE` true): eight 32-value sub-blocks with 6-bit scales and
/// mins packed alike. Per sub-block the quants (nibbles, plus the fifth bit as 16 for Q5_K)
/// times the activations, times the scale, in eight i32 lanes; the minimum term is the mins
/// times the Q8_K sums of each sub-block (pairs of the 16-value sums), in four lanes; both are
/// scaled (by d and -dmin) into one float accumulator per block (after ggml's AVX2
/// `ggml_vec_dot_q4_K_q8_K` and `_q5_K_`). The scales and mins are unpacked with byte shuffles
/// and the two f16 scales converted together, which is most of a block's work besides the
/// products.
pub(super) struct K4<const FIVE: bool>;
pub(super) type Q4K = K4<false>;
pub(super) type Q5K = K4<true>;
impl<const FIVE: bool> KTile for K4<FIVE> {
    const BYTES: usize = if FIVE { Q5_K_BYTES } else { Q4_K_BYTES };
    #[inline(always)]
    unsafe fn tile<const T: usize>(w: &[u8], x: *const u8, xb: usize, out: *mut f32) {
        k4_tile::<FIVE, 1, T>(w.as_ptr(), w.len(), x, xb, out, T);
    }
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K block from its 12 packed bytes
/// (the first 12 of the 16 at `p`), as bytes 0..8 and 8..16 (`q4_k_scales_mins`, with shuffles).
#[inline(always)]
unsafe fn k4_scales_mins(p: *const u8) -> __m128i {
    let s = _mm_loadu_si128(p as *const __m128i);
    // Scales 0..4 and mins 0..4 are the low 6 bits of bytes 0..4 and 4..8; scales 4..8 and mins
    // 4..8 are the low and high nibbles of bytes 8..12, with the top two bits of bytes 0..4 and
    // 4..8 above them.
    let low = _mm_shuffle_epi8(
        s,
        _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11),
    );
    let top = _mm_shuffle_epi8(
        s,
        _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7),
    );
    let keep = _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0);
    let high_nibbles = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15);
    let top_bits = _mm_setr_epi8(0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0, 48, 48, 48, 48);
    _mm_or_si128(
        _mm_or_si128(
            _mm_and_si128(low, keep),
            _mm_and_si128(_mm_srli_epi16::<4>(low), high_nibbles),
        ),
        _mm_and_si128(_mm_srli_epi16::<2>(top), top_bits),
    )
}

/// `R` Q4_K/Q5_K rows (`row_bytes` apart) times `T` Q8_K activation rows (`xb` bytes apart),
/// writing `out[r * n + t]`. Every (row, token) pair takes the same steps whatever `R` and `T`.
#[inline(always)]
unsafe fn k4_tile<const FIVE: bool, const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    x: *const u8,
    xb: usize,
    out: *mut f32,
    n: usize,
) {
    let bytes = K4::<FIVE>::BYTES;
    let qs_at = if FIVE { 48 } else { 16 };
    let nb = row_bytes / bytes;
    let m4 = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(1);
    // One byte shuffle per sub-block's scale: hidden from the optimizer, which would otherwise
    // turn most of them into a shift and a broadcast each.
    let spread: [__m256i; 8] = std::hint::black_box(std::array::from_fn(|j| spread_i16(j, j)));
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for i in 0..nb {
        // Per token: (dy, -dy) to scale both of a block's f16 scales at once, and the sums of
        // each 32-value sub-block's activations.
        let mut dy = [_mm_setzero_ps(); T];
        let mut q8s = [_mm_setzero_si128(); T];
        for t in 0..T {
            let xp = x.add(t * xb + i * Q8_K_BYTES);
            let d = f32_at(xp);
            dy[t] = _mm_setr_ps(d, -d, 0.0, 0.0);
            let bsums = _mm256_loadu_si256(xp.add(Q8_K_BSUMS_AT) as *const __m256i);
            q8s[t] = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256::<1>(bsums),
            );
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wb = w.add(r * row_bytes + i * bytes);
            prefetch_block(wb, bytes);
            // (d, dmin) of the block.
            let dmin = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                wb as *const i32,
            )));
            let sm = k4_scales_mins(wb.add(4));
            let mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
            // The eight scales as i16 in both halves; each sub-block's is spread by one byte
            // shuffle with a constant pattern (as ggml's get_scale_shuffle_k4).
            let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            let qh = _mm256_loadu_si256(wb.add(16) as *const __m256i);
            let mut q = [[_mm256_setzero_si256(); 2]; 4];
            let mut scale = [[_mm256_setzero_si256(); 2]; 4];
            for j in 0..4 {
                let bits = _mm256_loadu_si256(wb.add(qs_at + 32 * j) as *const __m256i);
                q[j] = [
                    _mm256_and_si256(bits, m4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4),
                ];
                if FIVE {
                    // Bit 2j of each high byte for the low nibbles, bit 2j + 1 for the high.
                    for (h, qjh) in q[j].iter_mut().enumerate() {
                        let count = _mm_cvtsi32_si128((2 * j + h) as i32);
                        let bit = _mm256_and_si256(_mm256_srl_epi16(qh, count), one);
                        *qjh = _mm256_or_si256(*qjh, _mm256_slli_epi16::<4>(bit));
                    }
                }
                scale[j] = [
                    _mm256_shuffle_epi8(sc16, spread[2 * j]),
                    _mm256_shuffle_epi8(sc16, spread[2 * j + 1]),
                ];
            }
            for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                let xp = x.add(t * xb + i * Q8_K_BYTES);
                let ds = _mm_mul_ps(dmin, dy[t]);
                let prod = _mm_madd_epi16(mins, q8s[t]);
                let mut sumi = _mm256_setzero_si256();
                for j in 0..4 {
                    let q8l = _mm256_loadu_si256(xp.add(4 + 64 * j) as *const __m256i);
                    let q8h = _mm256_loadu_si256(xp.add(4 + 64 * j + 32) as *const __m256i);
                    let p16l = _mm256_madd_epi16(scale[j][0], _mm256_maddubs_epi16(q[j][0], q8l));
                    let p16h = _mm256_madd_epi16(scale[j][1], _mm256_maddubs_epi16(q[j][1], q8h));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
                }
                let d = _mm256_broadcastss_ps(ds);
                let neg_dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(ds));
                let mins_sum = _mm256_set_m128(_mm_setzero_ps(), _mm_cvtepi32_ps(prod));
                *acc_rt = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), *acc_rt);
                *acc_rt = _mm256_fmadd_ps(neg_dmin, mins_sum, *acc_rt);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, a) in acc_r.iter().enumerate() {
            *out.add(r * n + t) = hsum(*a);
        }
    }
}

/// Q6_K (ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`): the 6-bit values unsigned (0..=63) times the
/// activations with maddubs (pairs of at most 2 * 63 * 128, no saturation), times the signed
/// 16-value scales with madd; the offset of 32 is taken off once per block as
/// 32 * sum(scale * Q8_K block sum).
pub(super) struct Q6K;
impl KTile for Q6K {
    const BYTES: usize = Q6_K_BYTES;
    #[inline(always)]
    unsafe fn tile<const T: usize>(w: &[u8], x: *const u8, xb: usize, out: *mut f32) {
        q6k_tile::<1, T>(w.as_ptr(), w.len(), x, xb, out, T);
    }
}

/// `R` Q6_K rows (`row_bytes` apart) times `T` Q8_K activation rows (`xb` bytes apart), writing
/// `out[r * n + t]`, every pair by the same steps.
#[inline(always)]
unsafe fn q6k_tile<const R: usize, const T: usize>(
    w: *const u8,
    row_bytes: usize,
    x: *const u8,
    xb: usize,
    out: *mut f32,
    n: usize,
) {
    let nb = row_bytes / Q6_K_BYTES;
    let m3 = _mm256_set1_epi8(3);
    let m15 = _mm256_set1_epi8(15);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for i in 0..nb {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wb = w.add(r * row_bytes + i * Q6_K_BYTES);
            prefetch_block(wb, Q6_K_BYTES);
            let wd = f16_scalar(wb.add(208));
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(192) as *const __m128i));
            let by_half = scales_by_half(scales16);
            // Chunk (half, k): values 128 half + 32k..+32, the low or high nibbles of ql bytes
            // 64 half + 32 (k % 2)..+32 with bits 2k..2k + 2 of qh bytes 32 half..+32 above them;
            // its 16-value halves take scales 8 half + 2k and 8 half + 2k + 1.
            let mut q = [[_mm256_setzero_si256(); 4]; 2];
            let mut sc = [[_mm256_setzero_si256(); 4]; 2];
            for half in 0..2 {
                let ql = wb.add(64 * half);
                let qh = _mm256_loadu_si256(wb.add(128 + 32 * half) as *const __m256i);
                let q4bits1 = _mm256_loadu_si256(ql as *const __m256i);
                let q4bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3));
                let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(12)));
                let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(48));
                let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(-64)));
                q[half] = [
                    _mm256_or_si256(_mm256_and_si256(q4bits1, m15), h0),
                    _mm256_or_si256(_mm256_and_si256(q4bits2, m15), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits1), m15), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits2), m15), h3),
                ];
                for (k, sck) in sc[half].iter_mut().enumerate() {
                    *sck = _mm256_shuffle_epi8(by_half[half], spread_i16(2 * k, 2 * k + 1));
                }
            }
            for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                let xp = x.add(t * xb + i * Q8_K_BYTES);
                let d = f32_at(xp) * wd;
                let q8sums = _mm256_loadu_si256(xp.add(Q8_K_BSUMS_AT) as *const __m256i);
                let q8sclsub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, scales16));
                let mut sumi = _mm256_setzero_si256();
                for half in 0..2 {
                    for k in 0..4 {
                        let q8 =
                            _mm256_loadu_si256(xp.add(4 + 128 * half + 32 * k) as *const __m256i);
                        let p =
                            _mm256_madd_epi16(sc[half][k], _mm256_maddubs_epi16(q[half][k], q8));
                        sumi = _mm256_add_epi32(sumi, p);
                    }
                }
                sumi = _mm256_sub_epi32(sumi, q8sclsub);
                *acc_rt = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), *acc_rt);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, a) in acc_r.iter().enumerate() {
            *out.add(r * n + t) = hsum(*a);
        }
    }
}
