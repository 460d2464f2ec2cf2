//! AVX2 (and AVX-512 VNNI) products of the 32-value block formats against Q8_0 activations:
//! Q8_0, Q4_0, IQ4_NL, MXFP4.
//!
//! Each format says how it prepares a weight block pair and an activation block pair and how it
//! multiplies them ([`BlockProduct`]); `batch` runs the tiles (activations prepared once per
//! token, then weight rows x tokens). Both tables compute every block product as eight exact i32
//! lane sums (bytes 4i..4i+3) and then the same float steps, so they agree bit for bit with each
//! other and with their own dot kernels.

use std::arch::x86_64::*;

use super::batch::{self, Prepared};
use crate::tensor::blocks::block32::{IQ4_NL_BYTES, IQ4_NL_LEVELS, Q4_0_BYTES, Q8_0_BYTES};

pub(super) fn dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q8_0(w, 1, x, 1, &mut out);
    out[0]
}

pub(super) fn dot_q8_0_q8_0_vnni(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q8_0_vnni(w, 1, x, 1, &mut out);
    out[0]
}

pub(super) fn dot_q4_0_q8_0_vnni(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q4_0_vnni(w, 1, x, 1, &mut out);
    out[0]
}

/// Checks the shapes the tile loops rely on: whole rows of whole blocks, the same block count
/// for weights and activations, room for the output.
pub(super) fn check_gemm(w: &[u8], w_block: usize, rows: usize, x: &[u8], n: usize, out: &[f32]) {
    assert!(rows > 0 && n > 0 && out.len() >= rows * n, "gemm shape");
    assert_eq!(w.len() % (rows * w_block), 0, "whole weight blocks per row");
    assert_eq!(
        x.len() % (n * Q8_0_BYTES),
        0,
        "whole activation blocks per row"
    );
    assert_eq!(
        w.len() / rows / w_block,
        x.len() / n / Q8_0_BYTES,
        "block counts differ"
    );
}

pub(super) fn gemm_q8_0(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q8_0_BYTES, rows, x, n, out);
    batch::gemm::<Batched<Q8Signed, 2>>(w, rows, x, n, out)
}

pub(super) fn dot_iq4_nl_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_iq4_nl(w, 1, x, 1, &mut out);
    out[0]
}

pub(super) fn gemm_iq4_nl(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, IQ4_NL_BYTES, rows, x, n, out);
    batch::gemm::<Batched<Iq4Nl, 2>>(w, rows, x, n, out)
}

pub(super) fn gemm_q8_0_vnni(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q8_0_BYTES, rows, x, n, out);
    batch::gemm_vnni::<Batched<Q8Vnni, 4>>(w, rows, x, n, out)
}

pub(super) fn gemm_q4_0_vnni(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q4_0_BYTES, rows, x, n, out);
    batch::gemm_vnni::<Batched<Q4Vnni, 4>>(w, rows, x, n, out)
}

/// Two consecutive blocks (b, b + 1) rearranged for 256-bit products: `lo` holds values 0..16
/// of block b then of block b + 1, `hi` values 16..32 of each, so the eight i32 lanes of a
/// product are four lanes of block b and four of block b + 1, and one float multiply-add per
/// pair serves two blocks. `d` holds the matching scales; `aux` what the product needs besides
/// (absolute values, or an accumulator start). A lone last block leaves the b + 1 half zero.
#[derive(Clone, Copy)]
struct BlockPair {
    lo: __m256i,
    hi: __m256i,
    aux_lo: __m256i,
    aux_hi: __m256i,
    d: __m256,
}

/// How one CPU level multiplies weight blocks by Q8_0 activation blocks: weight blocks are
/// prepared once per tile row, activation blocks once per token, and `pair` returns the exact
/// i32 lane sums of their products.
trait BlockProduct {
    /// Bytes of one weight block.
    const W_BYTES: usize;
    unsafe fn weights(p: *const u8, both: bool) -> BlockPair;
    unsafe fn activations(p: *const u8, both: bool) -> BlockPair;
    unsafe fn pair(w: &BlockPair, x: &BlockPair) -> __m256i;
}

/// 16 bytes at `p` and, when `both`, 16 bytes at `p + stride` into the upper half.
#[inline(always)]
unsafe fn load_halves(p: *const u8, stride: usize, both: bool) -> __m256i {
    let lo = _mm_loadu_si128(p as *const __m128i);
    let hi = if both {
        _mm_loadu_si128(p.add(stride) as *const __m128i)
    } else {
        _mm_setzero_si128()
    };
    _mm256_set_m128i(hi, lo)
}

/// The f16 scales at `p` and `p + stride` as four lanes each (zero for a lone block). The
/// splat before converting writes whole registers (a single inserted lane let LLVM merge into
/// a live register: a false dependency that once serialised the block loop).
#[inline(always)]
pub(super) unsafe fn scales(p: *const u8, stride: usize, both: bool) -> __m256 {
    // Both f16 scales in one register, spread to four lanes each, converted at once.
    let lo = u16::from_le_bytes([*p, *p.add(1)]) as i32;
    let hi = if both {
        u16::from_le_bytes([*p.add(stride), *p.add(stride + 1)]) as i32
    } else {
        0
    };
    let packed = _mm_cvtsi32_si128(lo | (hi << 16));
    let spread = _mm_shuffle_epi8(
        packed,
        _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3),
    );
    _mm256_cvtph_ps(spread)
}

/// Q8_0 quants of blocks b and b + 1 (block at `p`, `stride` bytes apart).
#[inline(always)]
pub(super) unsafe fn q8_pair(
    p: *const u8,
    stride: usize,
    both: bool,
) -> (__m256i, __m256i, __m256) {
    (
        load_halves(p.add(2), stride, both),
        load_halves(p.add(18), stride, both),
        scales(p, stride, both),
    )
}

/// Q4_0 nibbles of blocks b and b + 1 as bytes 0..=15: low nibbles are values 0..16.
#[inline(always)]
unsafe fn q4_pair(p: *const u8, both: bool) -> (__m256i, __m256i, __m256) {
    let packed = load_halves(p.add(2), Q4_0_BYTES, both);
    let low = _mm256_set1_epi8(0x0f);
    (
        _mm256_and_si256(packed, low),
        _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
        scales(p, Q4_0_BYTES, both),
    )
}

/// Lane sums of u8 x i8 products without VNNI: maddubs to i16 pairs, madd to i32.
#[inline(always)]
unsafe fn maddubs_sum(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Signed weights for AVX2: maddubs needs an unsigned left operand, so |w| times x carrying
/// w's sign.
#[inline(always)]
unsafe fn signed_weights(lo: __m256i, hi: __m256i, d: __m256) -> BlockPair {
    BlockPair {
        lo,
        hi,
        aux_lo: _mm256_sign_epi8(lo, lo),
        aux_hi: _mm256_sign_epi8(hi, hi),
        d,
    }
}

#[inline(always)]
unsafe fn plain(lo: __m256i, hi: __m256i, d: __m256) -> BlockPair {
    BlockPair {
        lo,
        hi,
        aux_lo: lo,
        aux_hi: hi,
        d,
    }
}

#[inline(always)]
unsafe fn signed_pair(w: &BlockPair, x: &BlockPair) -> __m256i {
    _mm256_add_epi32(
        maddubs_sum(w.aux_lo, _mm256_sign_epi8(x.lo, w.lo)),
        maddubs_sum(w.aux_hi, _mm256_sign_epi8(x.hi, w.hi)),
    )
}

/// AVX2 Q8_0.
struct Q8Signed;
impl BlockProduct for Q8Signed {
    const W_BYTES: usize = Q8_0_BYTES;
    #[inline(always)]
    unsafe fn weights(p: *const u8, both: bool) -> BlockPair {
        let (lo, hi, d) = q8_pair(p, Q8_0_BYTES, both);
        signed_weights(lo, hi, d)
    }
    #[inline(always)]
    unsafe fn activations(p: *const u8, both: bool) -> BlockPair {
        let (lo, hi, d) = q8_pair(p, Q8_0_BYTES, both);
        plain(lo, hi, d)
    }
    #[inline(always)]
    unsafe fn pair(w: &BlockPair, x: &BlockPair) -> __m256i {
        signed_pair(w, x)
    }
}

/// Nibbles of blocks b and b + 1 (`stride` bytes apart) whose 16 quant bytes start at `p`:
/// low nibbles (values 0..16), high nibbles (values 16..32).
#[inline(always)]
pub(super) unsafe fn nibble_pair(p: *const u8, stride: usize, both: bool) -> (__m256i, __m256i) {
    let packed = load_halves(p, stride, both);
    let low = _mm256_set1_epi8(0x0f);
    (
        _mm256_and_si256(packed, low),
        _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
    )
}

/// IQ4_NL: 4-bit indices into 16 signed levels, looked up with a byte shuffle (ggml's AVX2
/// `ggml_vec_dot_iq4_nl_q8_0`), then as Q8_0. Like Q8_0's, the sign trick takes activations
/// within -127..=127, which the Q8_0 quantizer guarantees. (MXFP4, the other 4-bit level
/// format, takes the offset form: `offset4`.)
struct Iq4Nl;
impl BlockProduct for Iq4Nl {
    const W_BYTES: usize = IQ4_NL_BYTES;
    #[inline(always)]
    unsafe fn weights(p: *const u8, both: bool) -> BlockPair {
        let table =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_NL_LEVELS.as_ptr() as *const __m128i));
        let (lo, hi) = nibble_pair(p.add(2), IQ4_NL_BYTES, both);
        signed_weights(
            _mm256_shuffle_epi8(table, lo),
            _mm256_shuffle_epi8(table, hi),
            scales(p, IQ4_NL_BYTES, both),
        )
    }
    #[inline(always)]
    unsafe fn activations(p: *const u8, both: bool) -> BlockPair {
        Q8Signed::activations(p, both)
    }
    #[inline(always)]
    unsafe fn pair(w: &BlockPair, x: &BlockPair) -> __m256i {
        signed_pair(w, x)
    }
}

/// A [`BlockProduct`] in a batch (`batch`): its activations prepared once per token and read
/// back as a block pair, its lane sums and its float step, so every output equals the tiles' and
/// the dot kernel's bit for bit. `TOKENS` per tile: as many as the register file leaves to
/// 4 x `TOKENS` accumulators beside a row block pair (five registers for the sign trick's).
struct Batched<P, const TOKENS: usize>(std::marker::PhantomData<P>);
impl<P: BlockProduct, const TOKENS: usize> batch::Product for Batched<P, TOKENS> {
    const W_BYTES: usize = P::W_BYTES;
    const TILE_TOKENS: usize = TOKENS;
    type Row = BlockPair;
    /// `aux_lo` is the only extra an activation pair carries into a product (the offset
    /// products' accumulator start; the sign trick reads none).
    #[inline(always)]
    unsafe fn activations(p: *const u8, both: bool) -> Prepared {
        let a = P::activations(p, both);
        Prepared {
            lo: a.lo,
            hi: a.hi,
            offset: a.aux_lo,
            d: a.d,
        }
    }
    #[inline(always)]
    unsafe fn row(wp: *const u8, both: bool) -> BlockPair {
        P::weights(wp, both)
    }
    #[inline(always)]
    unsafe fn step(row: &BlockPair, a: &Prepared, acc: __m256) -> __m256 {
        let x = BlockPair {
            lo: a.lo,
            hi: a.hi,
            aux_lo: a.offset,
            aux_hi: a.offset,
            d: a.d,
        };
        let d = _mm256_mul_ps(row.d, a.d);
        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(P::pair(row, &x)), acc)
    }
}

/// `acc + ` lane sums of u8 x i8 products with `vpdpbusd` (AVX-512 VNNI on 256-bit registers).
#[inline(always)]
unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

/// Q8_0 activations for unsigned weights that carry an offset `o` (as u8): the accumulator
/// starts at -o * (lane sums of x), which cancels the offset exactly.
#[inline(always)]
unsafe fn offset_activations(p: *const u8, both: bool, o: i8) -> BlockPair {
    let (lo, hi, d) = q8_pair(p, Q8_0_BYTES, both);
    let k = _mm256_set1_epi8(o);
    let sum = dpbusd(dpbusd(_mm256_setzero_si256(), k, lo), k, hi);
    let start = _mm256_sub_epi32(_mm256_setzero_si256(), sum);
    BlockPair {
        lo,
        hi,
        aux_lo: start,
        aux_hi: start,
        d,
    }
}

/// Offset weights times activations from [`offset_activations`]: exact lane sums of w . x.
#[inline(always)]
unsafe fn offset_pair(w: &BlockPair, x: &BlockPair) -> __m256i {
    dpbusd(dpbusd(x.aux_lo, w.lo, x.lo), w.hi, x.hi)
}

/// VNNI Q8_0: `vpdpbusd` multiplies unsigned by signed bytes, so the weights are offset to
/// w + 128 (a bit flip) and the accumulator starts at -128 * (lane sums of x), prepared once
/// per activation block pair and shared by every row: exact lane sums, and a weight block
/// costs only its flip (decode dots each weight block with a single token).
struct Q8Vnni;
impl BlockProduct for Q8Vnni {
    const W_BYTES: usize = Q8_0_BYTES;
    #[inline(always)]
    unsafe fn weights(p: *const u8, both: bool) -> BlockPair {
        let (lo, hi, d) = q8_pair(p, Q8_0_BYTES, both);
        let flip = _mm256_set1_epi8(-128);
        plain(_mm256_xor_si256(lo, flip), _mm256_xor_si256(hi, flip), d)
    }
    #[inline(always)]
    unsafe fn activations(p: *const u8, both: bool) -> BlockPair {
        offset_activations(p, both, -128)
    }
    #[inline(always)]
    unsafe fn pair(w: &BlockPair, x: &BlockPair) -> __m256i {
        offset_pair(w, x)
    }
}

/// VNNI Q4_0: the nibbles are already unsigned; the accumulator starts at -8 * (lane sums of
/// x), prepared once per activation block pair.
struct Q4Vnni;
impl BlockProduct for Q4Vnni {
    const W_BYTES: usize = Q4_0_BYTES;
    #[inline(always)]
    unsafe fn weights(p: *const u8, both: bool) -> BlockPair {
        let (lo, hi, d) = q4_pair(p, both);
        plain(lo, hi, d)
    }
    #[inline(always)]
    unsafe fn activations(p: *const u8, both: bool) -> BlockPair {
        offset_activations(p, both, 8)
    }
    #[inline(always)]
    unsafe fn pair(w: &BlockPair, x: &BlockPair) -> __m256i {
        offset_pair(w, x)
    }
}
