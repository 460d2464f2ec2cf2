//! Products of Q8_0 and Q4_0 rows packed four at a time (`blocks::rows4`, after ggml's repacked
//! layouts) with Q8_0 activations, on AVX2 and with AVX-512 VNNI.
//!
//! A 32-byte load of packed values holds two 4-byte pieces of each of the four rows. Against an
//! activation register holding the matching 4 activation bytes repeated for the four rows (made
//! once per token, [`Block`]), a byte-pair product leaves every (piece, row) sum in its own i32
//! lane: no per-row horizontal sums, one stream of memory for four rows (decoding walks a single
//! sequential stream per group, where four interleaved row streams of the file layout are slow),
//! and the four rows' scales of a block in one 8-byte load.
//!
//! Every (row, lane) takes the steps of the one-row product (`batch` with `block32`'s formats):
//! lane i of block b is the exact i32 sum over values 4i..4i+4 and 16+4i..16+4i+4, then
//! `acc = fma(w_scale * x_scale, sum, acc)`, even blocks into lanes 0..4 and odd ones into
//! lanes 4..8 of the row's accumulator, then the same horizontal sum tree. Only the lanes are
//! laid out by piece and row instead of by row, so a packed product equals the table's dot of the
//! unpacked rows bit for bit.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::tensor::blocks::block32::{Q4_0_BYTES, Q8_0_BYTES};
use crate::tensor::blocks::rows4::{self, ROWS, SCALE_BYTES};

/// One token's Q8_0 activation block arranged for packed rows. `x[i]` holds values 8i..8i+4
/// repeated four times (bytes 0..16), then values 8i+4..8i+8 four times (bytes 16..32).
/// `start[j]` is where the lane sums of pieces 2j and 2j + 1 begin: minus the weight offset
/// times the activation sum of each lane's values (zero for signed products). `d` is the block
/// scale in every lane.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Block {
    x: [__m256i; 4],
    start: [__m256i; 2],
    d: __m256,
}

/// A packed weight format and how one CPU level multiplies it.
pub(super) trait Packed {
    /// Bytes of one block's values for the four rows.
    const VALUE_BYTES: usize;
    /// What the product adds to each weight value to make it an unsigned byte (0: signed).
    const OFFSET: i32;
    /// Whether the product needs AVX-512 VNNI.
    const VNNI: bool;
    /// Tokens per tile: 4 x `TOKENS` accumulators beside the unpacked block fit the registers.
    const TOKENS: usize;
    /// One block of the four rows, unpacked once for every token of a tile.
    type Weights: Copy;
    unsafe fn weights(p: *const u8) -> Self::Weights;
    /// The exact lane sums (lanes by piece, then row) of original lanes 0 and 1, and 2 and 3.
    unsafe fn sums(w: &Self::Weights, a: &Block) -> [__m256i; 2];
}

/// Q4_0's packed nibbles (stored XOR 0x88, `blocks::rows4`) as unsigned values 0..=15: low
/// nibbles of pieces 0,1 (values 0..8), high nibbles of pieces 0,1 (values 16..24), low of
/// pieces 2,3 (values 8..16), high of pieces 2,3 (values 24..32).
#[inline(always)]
unsafe fn q4_nibbles(p: *const u8) -> [__m256i; 4] {
    let flip = _mm256_set1_epi8(0x88u8 as i8);
    let low = _mm256_set1_epi8(0x0f);
    let v01 = _mm256_xor_si256(_mm256_loadu_si256(p as *const __m256i), flip);
    let v23 = _mm256_xor_si256(_mm256_loadu_si256(p.add(32) as *const __m256i), flip);
    [
        _mm256_and_si256(v01, low),
        _mm256_and_si256(_mm256_srli_epi16(v01, 4), low),
        _mm256_and_si256(v23, low),
        _mm256_and_si256(_mm256_srli_epi16(v23, 4), low),
    ]
}

/// Q8_0's packed values: pieces 0,1 (values 0..8), 4,5 (16..24), 2,3 (8..16), 6,7 (24..32),
/// in the order of [`q4_nibbles`].
#[inline(always)]
unsafe fn q8_values(p: *const u8) -> [__m256i; 4] {
    let p = p as *const __m256i;
    [
        _mm256_loadu_si256(p),
        _mm256_loadu_si256(p.add(2)),
        _mm256_loadu_si256(p.add(1)),
        _mm256_loadu_si256(p.add(3)),
    ]
}

/// AVX2 Q4_0: unsigned nibbles by `maddubs`; two products stay below 2^15 and add as i16.
pub(super) struct Q4Avx2;
impl Packed for Q4Avx2 {
    const VALUE_BYTES: usize = ROWS * (Q4_0_BYTES - 2);
    const OFFSET: i32 = 8;
    const VNNI: bool = false;
    const TOKENS: usize = 2;
    type Weights = [__m256i; 4];
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> [__m256i; 4] {
        q4_nibbles(p)
    }
    #[inline(always)]
    unsafe fn sums(w: &[__m256i; 4], a: &Block) -> [__m256i; 2] {
        [
            unsigned_half(w[0], a.x[0], w[1], a.x[2], a.start[0]),
            unsigned_half(w[2], a.x[1], w[3], a.x[3], a.start[1]),
        ]
    }
}

/// `start` plus the lane sums of `lo . xlo + hi . xhi` for unsigned weight bytes small enough
/// that two byte-pair products add as i16. (Helpers, not closures: a closure would not take
/// its caller's target features, and its intrinsics would not inline.)
#[inline(always)]
unsafe fn unsigned_half(
    lo: __m256i,
    xlo: __m256i,
    hi: __m256i,
    xhi: __m256i,
    start: __m256i,
) -> __m256i {
    let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
    _mm256_add_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)), start)
}

/// The lane sums of `w . x` for signed weight bytes, by the sign trick.
#[inline(always)]
unsafe fn signed_quarter(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
        _mm256_set1_epi16(1),
    )
}

/// AVX2 Q8_0: the sign trick (|w| times x carrying w's sign), each half to i32 before adding,
/// as `block32`'s Q8_0 product.
pub(super) struct Q8Avx2;
impl Packed for Q8Avx2 {
    const VALUE_BYTES: usize = ROWS * (Q8_0_BYTES - 2);
    const OFFSET: i32 = 0;
    const VNNI: bool = false;
    const TOKENS: usize = 2;
    type Weights = [__m256i; 4];
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> [__m256i; 4] {
        q8_values(p)
    }
    #[inline(always)]
    unsafe fn sums(w: &[__m256i; 4], a: &Block) -> [__m256i; 2] {
        [
            _mm256_add_epi32(signed_quarter(w[0], a.x[0]), signed_quarter(w[1], a.x[2])),
            _mm256_add_epi32(signed_quarter(w[2], a.x[1]), signed_quarter(w[3], a.x[3])),
        ]
    }
}

/// VNNI Q4_0: unsigned nibbles by `vpdpbusd`, the accumulator starting at the offset's share.
pub(super) struct Q4Vnni;
impl Packed for Q4Vnni {
    const VALUE_BYTES: usize = ROWS * (Q4_0_BYTES - 2);
    const OFFSET: i32 = 8;
    const VNNI: bool = true;
    const TOKENS: usize = 4;
    type Weights = [__m256i; 4];
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> [__m256i; 4] {
        q4_nibbles(p)
    }
    #[inline(always)]
    unsafe fn sums(w: &[__m256i; 4], a: &Block) -> [__m256i; 2] {
        [
            dpbusd(dpbusd(a.start[0], w[0], a.x[0]), w[1], a.x[2]),
            dpbusd(dpbusd(a.start[1], w[2], a.x[1]), w[3], a.x[3]),
        ]
    }
}

/// VNNI Q8_0: the weights offset to w + 128 (a bit flip), as `block32`'s VNNI Q8_0.
pub(super) struct Q8Vnni;
impl Packed for Q8Vnni {
    const VALUE_BYTES: usize = ROWS * (Q8_0_BYTES - 2);
    const OFFSET: i32 = 128;
    const VNNI: bool = true;
    const TOKENS: usize = 4;
    type Weights = [__m256i; 4];
    #[inline(always)]
    unsafe fn weights(p: *const u8) -> [__m256i; 4] {
        let flip = _mm256_set1_epi8(-128);
        let [a, b, c, d] = q8_values(p);
        [
            _mm256_xor_si256(a, flip),
            _mm256_xor_si256(b, flip),
            _mm256_xor_si256(c, flip),
            _mm256_xor_si256(d, flip),
        ]
    }
    #[inline(always)]
    unsafe fn sums(w: &[__m256i; 4], a: &Block) -> [__m256i; 2] {
        [
            dpbusd(dpbusd(a.start[0], w[0], a.x[0]), w[1], a.x[2]),
            dpbusd(dpbusd(a.start[1], w[2], a.x[1]), w[3], a.x[3]),
        ]
    }
}

#[inline(always)]
unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

/// The Q8_0 activation block at `p` for weights offset by `offset`.
#[inline(always)]
unsafe fn prepare(p: *const u8, offset: i32) -> Block {
    let v = _mm256_loadu_si256(p.add(2) as *const __m256i);
    // The sum of each 4-byte piece, then of pieces q and q + 4 (one original lane) in lane q.
    let piece_sums = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_set1_epi8(1), v),
        _mm256_set1_epi16(1),
    );
    let lane_sums = _mm256_add_epi32(
        piece_sums,
        _mm256_permute2x128_si256::<0x01>(piece_sums, piece_sums),
    );
    // Signed products (offset 0) start at zero: no multiply (`offset` is a constant here).
    let starts = if offset == 0 {
        _mm256_setzero_si256()
    } else {
        _mm256_mullo_epi32(lane_sums, _mm256_set1_epi32(-offset))
    };
    let scale = u16::from_le_bytes([*p, *p.add(1)]);
    Block {
        x: [
            _mm256_permutevar8x32_epi32(v, dwords(0)),
            _mm256_permutevar8x32_epi32(v, dwords(2)),
            _mm256_permutevar8x32_epi32(v, dwords(4)),
            _mm256_permutevar8x32_epi32(v, dwords(6)),
        ],
        start: [
            _mm256_permutevar8x32_epi32(starts, dwords(0)),
            _mm256_permutevar8x32_epi32(starts, dwords(2)),
        ],
        d: _mm256_cvtph_ps(_mm_set1_epi16(scale as i16)),
    }
}

/// Dword `a` in lanes 0..4 and `a + 1` in lanes 4..8 (a permutation's indices).
#[inline(always)]
unsafe fn dwords(a: i32) -> __m256i {
    _mm256_setr_epi32(a, a, a, a, a + 1, a + 1, a + 1, a + 1)
}

thread_local! {
    /// Prepared activation blocks, per thread, kept so that decoding allocates nothing.
    static PREPARED: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Tokens prepared at a time: 224 bytes per block and token stay in L2 while every group of
/// rows passes over them.
const CHUNK_TOKENS: usize = 32;

/// The table entry: `out[r * n + t] = w_r . x_t` for `rows` packed rows (a multiple of 4).
pub(super) fn gemm<P: Packed>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    if rows == 0 || n == 0 {
        return;
    }
    let (groups, nb) = rows4::product_shape(w, P::VALUE_BYTES, rows, x, n, out);
    PREPARED.with_borrow_mut(|buf| {
        // SAFETY: shapes checked above; the entries are only in tables that `tables()` hands
        // out after checking AVX2, FMA and F16C, and AVX-512 VNNI and VL for `P::VNNI`.
        unsafe {
            if P::VNNI {
                gemm_avx512vnni::<P>(w, groups, nb, x, n, out, buf)
            } else {
                gemm_avx2::<P>(w, groups, nb, x, n, out, buf)
            }
        }
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_avx2<P: Packed>(
    w: &[u8],
    groups: usize,
    nb: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
    buf: &mut Vec<Block>,
) {
    gemm_impl::<P>(w, groups, nb, x, n, out, buf)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn gemm_avx512vnni<P: Packed>(
    w: &[u8],
    groups: usize,
    nb: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
    buf: &mut Vec<Block>,
) {
    gemm_impl::<P>(w, groups, nb, x, n, out, buf)
}

/// Row length up to which a single token's prepared blocks live on the stack (8192 values,
/// 56 KiB): decoding then allocates nothing, whichever pool thread runs a product first.
/// Batches and longer rows use the per-thread buffer.
const STACK_BLOCKS: usize = 256;

/// Chunks of tokens prepared once; for each chunk, tiles of up to `P::TOKENS` tokens, each
/// against every group of four rows.
#[inline(always)]
unsafe fn gemm_impl<P: Packed>(
    w: &[u8],
    groups: usize,
    nb: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
    buf: &mut Vec<Block>,
) {
    let px = x.as_ptr();
    if n == 1 && nb <= STACK_BLOCKS {
        let mut acts = [MaybeUninit::<Block>::uninit(); STACK_BLOCKS];
        for (i, a) in acts[..nb].iter_mut().enumerate() {
            a.write(prepare(px.add(i * Q8_0_BYTES), P::OFFSET));
        }
        // The first `nb` entries were written above.
        return tiles::<P>(w, groups, nb, acts.as_ptr() as *const Block, 0..1, out, n);
    }
    let mut t0 = 0;
    while t0 < n {
        let chunk = (n - t0).min(CHUNK_TOKENS);
        buf.clear();
        for i in t0 * nb..(t0 + chunk) * nb {
            buf.push(prepare(px.add(i * Q8_0_BYTES), P::OFFSET));
        }
        tiles::<P>(w, groups, nb, buf.as_ptr(), t0..t0 + chunk, out, n);
        t0 += chunk;
    }
}

/// Tokens `toks` (prepared from `acts`, `nb` blocks each) against every group of four rows, in
/// tiles of up to `P::TOKENS` tokens; `n` tokens in all (`out`'s row length).
#[inline(always)]
unsafe fn tiles<P: Packed>(
    w: &[u8],
    groups: usize,
    nb: usize,
    acts: *const Block,
    toks: std::ops::Range<usize>,
    out: &mut [f32],
    n: usize,
) {
    let group_bytes = nb * (SCALE_BYTES + P::VALUE_BYTES);
    let (pw, po) = (w.as_ptr(), out.as_mut_ptr());
    // Tokens outside, groups inside: a tile's prepared activations stay in L1 while the
    // weights (a few hundred KiB for an expert) come from L2.
    let mut t = toks.start;
    while t < toks.end {
        let wide = (toks.end - t).min(P::TOKENS);
        let a = acts.add((t - toks.start) * nb);
        for g in 0..groups {
            let (pg, o) = (pw.add(g * group_bytes), po.add(g * ROWS * n + t));
            match wide {
                4 => tile::<P, 4>(pg, nb, a, o, n),
                3 => tile::<P, 3>(pg, nb, a, o, n),
                2 => tile::<P, 2>(pg, nb, a, o, n),
                _ => tile::<P, 1>(pg, nb, a, o, n),
            }
        }
        t += wide;
    }
}

/// One group (its `nb` blocks' scales from `pg`, then their values) against `T` prepared tokens
/// (`nb` blocks each, from `acts`), written to `out[r * ldo + t]`.
#[inline(always)]
unsafe fn tile<P: Packed, const T: usize>(
    pg: *const u8,
    nb: usize,
    acts: *const Block,
    out: *mut f32,
    ldo: usize,
) {
    let pv = pg.add(nb * SCALE_BYTES);
    // Per token: [even blocks, odd blocks] x [original lanes 0 and 1, lanes 2 and 3], each
    // register by piece then row.
    let mut acc = [[[_mm256_setzero_ps(); 2]; 2]; T];
    let mut b = 0;
    while b + 2 <= nb {
        block::<P, T, 0>(&mut acc, pg, pv, acts, nb, b);
        block::<P, T, 1>(&mut acc, pg, pv, acts, nb, b + 1);
        b += 2;
    }
    if b < nb {
        // A lone last block adds nothing to the odd lanes, as the one-row product's zeroed
        // upper half does.
        block::<P, T, 0>(&mut acc, pg, pv, acts, nb, b);
    }
    for (t, [[even01, even23], [odd01, odd23]]) in acc.into_iter().enumerate() {
        // The one-row horizontal sum's tree: lanes i + (i + 4), then (0 + 2) + (1 + 3).
        let s = _mm256_add_ps(_mm256_add_ps(even01, odd01), _mm256_add_ps(even23, odd23));
        let rows = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        if ldo == 1 {
            _mm_storeu_ps(out, rows);
        } else {
            let mut lanes = [0f32; ROWS];
            _mm_storeu_ps(lanes.as_mut_ptr(), rows);
            for (r, v) in lanes.into_iter().enumerate() {
                *out.add(r * ldo + t) = v;
            }
        }
    }
}

/// Block `b` of the group against block `b` of every token of the tile, into the even (`H` 0)
/// or odd accumulators.
#[inline(always)]
unsafe fn block<P: Packed, const T: usize, const H: usize>(
    acc: &mut [[[__m256; 2]; 2]; T],
    pg: *const u8,
    pv: *const u8,
    acts: *const Block,
    nb: usize,
    b: usize,
) {
    // No software prefetch: a group's values are one sequential stream, which the hardware
    // prefetchers follow, and prefetch instructions on it cost decode time (docs/BENCHMARKS.md).
    let wp = pv.add(b * P::VALUE_BYTES);
    let w = P::weights(wp);
    // The four rows' scales, twice: lanes by piece, then row.
    let scales = (pg.add(b * SCALE_BYTES) as *const i64).read_unaligned();
    let dw = _mm256_cvtph_ps(_mm_set1_epi64x(scales));
    for (t, acc_t) in acc.iter_mut().enumerate() {
        let a = &*acts.add(t * nb + b);
        let [s01, s23] = P::sums(&w, a);
        let d = _mm256_mul_ps(dw, a.d);
        acc_t[H][0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s01), acc_t[H][0]);
        acc_t[H][1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s23), acc_t[H][1]);
    }
}
