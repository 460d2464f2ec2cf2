//! The AVX2 products of the 4-bit formats whose signed levels become small unsigned bytes after
//! adding an offset: Q4_0 (the nibble itself is the value plus 8) and MXFP4 (the doubled E2M1
//! level plus 12 is at most 24), as `batch` products, for one token (decode) and for a batch.
//!
//! `maddubs` wants an unsigned left operand. `block32`'s formats get it with the sign trick
//! (|w| times x carrying w's sign): four extra instructions per block pair, for every row and
//! token. Here the weights carry the offset instead, and the offset's share,
//! `offset * (sum of x)`, is computed once per token for all rows, together with the
//! activations' rearranged halves and scales ([`Prepared`]). Pairs of products stay below
//! 2 * 24 * 127 and two of them below 2^15, so the two halves add as i16 before one `madd`. The
//! lane sums are the same exact integers as the VNNI table's, and the float steps the same, so
//! the two x86 tables agree bit for bit.

use std::arch::x86_64::*;

use super::batch::{self, Prepared};
use super::block32::{check_gemm, nibble_pair, q8_pair, scales};
use crate::tensor::blocks::block32::{
    e8m0_half, MXFP4_BYTES, MXFP4_LEVELS, Q4_0_BYTES, Q8_0_BYTES,
};

pub(super) fn dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q4_0(w, 1, x, 1, &mut out);
    out[0]
}

pub(super) fn dot_mxfp4_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_mxfp4(w, 1, x, 1, &mut out);
    out[0]
}

pub(super) fn gemm_q4_0(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q4_0_BYTES, rows, x, n, out);
    batch::gemm::<Batch<Q4_0>>(w, rows, x, n, out)
}

pub(super) fn gemm_mxfp4(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, MXFP4_BYTES, rows, x, n, out);
    batch::gemm::<Batch<Mxfp4>>(w, rows, x, n, out)
}

/// A 4-bit format as unsigned bytes plus an offset.
trait Offset4 {
    const W_BYTES: usize;
    /// Where a block's 16 nibble bytes start.
    const QS_AT: usize;
    /// Added to every weight value to make it unsigned.
    const OFFSET: i8;
    /// The unsigned weight bytes from a block pair's low and high nibbles.
    unsafe fn levels(lo: __m256i, hi: __m256i) -> (__m256i, __m256i);
    /// The scales of blocks b and b + 1 (at `p` and `p + W_BYTES`), four lanes each; zero for a
    /// lone last block.
    unsafe fn scales(p: *const u8, both: bool) -> __m256;
}

struct Q4_0;
impl Offset4 for Q4_0 {
    const W_BYTES: usize = Q4_0_BYTES;
    const QS_AT: usize = 2;
    const OFFSET: i8 = 8;
    #[inline(always)]
    unsafe fn levels(lo: __m256i, hi: __m256i) -> (__m256i, __m256i) {
        (lo, hi)
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8, both: bool) -> __m256 {
        scales(p, Q4_0_BYTES, both)
    }
}

struct Mxfp4;

/// `e8m0_half` of every exponent byte, so that a block's scale is one broadcast load.
static E8M0_HALF: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut e = 0;
    while e < 256 {
        t[e] = e8m0_half(e as u8);
        e += 1;
    }
    t
};

/// MXFP4's levels plus 12, as unsigned bytes.
const MXFP4_UNSIGNED: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (MXFP4_LEVELS[i] + 12) as u8;
        i += 1;
    }
    t
};

impl Offset4 for Mxfp4 {
    const W_BYTES: usize = MXFP4_BYTES;
    const QS_AT: usize = 1;
    const OFFSET: i8 = 12;
    #[inline(always)]
    unsafe fn levels(lo: __m256i, hi: __m256i) -> (__m256i, __m256i) {
        let table =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(MXFP4_UNSIGNED.as_ptr() as *const __m128i));
        (
            _mm256_shuffle_epi8(table, lo),
            _mm256_shuffle_epi8(table, hi),
        )
    }
    #[inline(always)]
    unsafe fn scales(p: *const u8, both: bool) -> __m256 {
        let d0 = _mm_broadcast_ss(&E8M0_HALF[*p as usize]);
        let d1 = if both {
            _mm_broadcast_ss(&E8M0_HALF[*p.add(MXFP4_BYTES) as usize])
        } else {
            _mm_setzero_ps()
        };
        _mm256_set_m128(d1, d0)
    }
}

/// Prepares the Q8_0 activation blocks b and b + 1 at `p` (the second only when `both`) for
/// weights offset by `offset`.
#[inline(always)]
unsafe fn prepare(p: *const u8, both: bool, offset: __m256i) -> Prepared {
    let (lo, hi, d) = q8_pair(p, Q8_0_BYTES, both);
    let sums = _mm256_add_epi16(
        _mm256_maddubs_epi16(offset, lo),
        _mm256_maddubs_epi16(offset, hi),
    );
    Prepared {
        lo,
        hi,
        offset: _mm256_madd_epi16(sums, _mm256_set1_epi16(1)),
        d,
    }
}

/// The exact lane sums of a weight block pair's unsigned bytes (`lo`, `hi`) times a prepared
/// activation pair, minus the offset's share, then one float step into `acc`: the tiles' steps.
#[inline(always)]
unsafe fn step(lo: __m256i, hi: __m256i, dw: __m256, a: &Prepared, acc: __m256) -> __m256 {
    let pairs16 = _mm256_add_epi16(
        _mm256_maddubs_epi16(lo, a.lo),
        _mm256_maddubs_epi16(hi, a.hi),
    );
    let sums = _mm256_sub_epi32(_mm256_madd_epi16(pairs16, _mm256_set1_epi16(1)), a.offset);
    let d = _mm256_mul_ps(dw, a.d);
    _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc)
}

/// Offset weights as a [`batch::Product`]: a row block pair is its unsigned bytes and scales.
struct Batch<F>(std::marker::PhantomData<F>);
impl<F: Offset4> batch::Product for Batch<F> {
    const W_BYTES: usize = F::W_BYTES;
    const TILE_TOKENS: usize = 3;
    type Row = (__m256i, __m256i, __m256);
    #[inline(always)]
    unsafe fn activations(p: *const u8, both: bool) -> Prepared {
        prepare(p, both, _mm256_set1_epi8(F::OFFSET))
    }
    #[inline(always)]
    unsafe fn row(wp: *const u8, both: bool) -> Self::Row {
        let (lo, hi) = nibble_pair(wp.add(F::QS_AT), F::W_BYTES, both);
        let (lo, hi) = F::levels(lo, hi);
        (lo, hi, F::scales(wp, both))
    }
    #[inline(always)]
    unsafe fn step(row: &Self::Row, a: &Prepared, acc: __m256) -> __m256 {
        step(row.0, row.1, row.2, a, acc)
    }
}
