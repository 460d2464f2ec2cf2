//! Matrix products on AVX2 (and AVX-512 VNNI) with the activations prepared once (a batch's, or
//! decoding's token): each token's Q8_0 blocks are rearranged into block pairs (values 0..16 of
//! blocks b and b + 1, values 16..32 of each, their scales converted, and what the weight format
//! needs besides) in a per-thread buffer, and the tiles read them as memory operands. Tiles that
//! prepared their tokens again for every 4 rows and kept them in registers left too few for the
//! accumulators, and paid the preparation once per row when decoding.
//!
//! A tile is 4 weight rows (then single rows) by up to `P::TILE_TOKENS` tokens; within it each
//! weight block pair is loaded and unpacked once for all its tokens. A single token (decode)
//! goes one row at a time, each row streamed from start to end as ggml's dot products do: four
//! interleaved row streams cost more time per decoded token, on AVX2 and more so with VNNI on an
//! AMD EPYC (docs/BENCHMARKS.md). The lane sums and float steps are each format's dot kernel's,
//! so every output equals the table's dot bit for bit.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use super::{hsum, PREFETCH_BYTES};
use crate::tensor::blocks::block32::Q8_0_BYTES;

/// One activation block pair, prepared once per token: values 0..16 of blocks b and b + 1,
/// values 16..32 of each, a format's extra lanes (the offset's share for offset weights) and
/// the scales.
#[derive(Clone, Copy)]
pub(super) struct Prepared {
    pub lo: __m256i,
    pub hi: __m256i,
    pub offset: __m256i,
    pub d: __m256,
}

/// How one weight format multiplies block pairs by prepared activations.
pub(super) trait Product {
    /// Bytes of one weight block.
    const W_BYTES: usize;
    /// Tokens per tile: as many as leave the registers (16 with AVX2, 32 with AVX-512VL) to the
    /// 4 x T accumulators, one row block pair and the temporaries.
    const TILE_TOKENS: usize;
    /// A weight block pair, unpacked once per tile.
    type Row: Copy;
    /// The Q8_0 activation blocks b and b + 1 at `p` (the second only when `both`).
    unsafe fn activations(p: *const u8, both: bool) -> Prepared;
    /// The weight blocks b and b + 1 at `wp` (the second only when `both`).
    unsafe fn row(wp: *const u8, both: bool) -> Self::Row;
    /// `acc` plus the block pair's product, the dot kernel's float step.
    unsafe fn step(row: &Self::Row, a: &Prepared, acc: __m256) -> __m256;
}

thread_local! {
    /// A batch's prepared activations, per thread, kept between products.
    static PREPARED: RefCell<Vec<Prepared>> = const { RefCell::new(Vec::new()) };
}

/// Tokens prepared at a time: bounds the buffer (128 bytes per block pair and token) while
/// each chunk still serves every row.
const CHUNK_TOKENS: usize = 64;

/// Row length up to which a single token's prepared pairs live on the stack (16384 values,
/// 32 KiB): decoding then allocates nothing, whichever pool thread runs a product first.
/// Batches and longer rows use the per-thread buffer.
const STACK_PAIRS: usize = 256;

/// `out[r * n + t] = w_r . x_t` for `rows` weight rows of `P` and `n` Q8_0 activation rows; the
/// shapes must have been checked (`block32::check_gemm`).
pub(super) fn gemm<P: Product>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    PREPARED.with(|buf| {
        // SAFETY: reachable only from tables `tables()` hands out after checking AVX2, FMA and
        // F16C; the caller checked the shapes.
        unsafe { gemm_avx2::<P>(w, rows, x, n, out, &mut buf.borrow_mut()) }
    })
}

/// [`gemm`] for products that use AVX-512 VNNI (`vpdpbusd` on 256-bit registers): the same
/// loops compiled with those features, so that the product's steps inline.
pub(super) fn gemm_vnni<P: Product>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    PREPARED.with(|buf| {
        // SAFETY: reachable only from the VNNI table, which `tables()` hands out after checking
        // AVX-512 VNNI and VL besides AVX2; the caller checked the shapes.
        unsafe { gemm_avx512vnni::<P>(w, rows, x, n, out, &mut buf.borrow_mut()) }
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_avx2<P: Product>(
    w: &[u8],
    rows: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
    buf: &mut Vec<Prepared>,
) {
    gemm_impl::<P>(w, rows, x, n, out, buf)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn gemm_avx512vnni<P: Product>(
    w: &[u8],
    rows: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
    buf: &mut Vec<Prepared>,
) {
    gemm_impl::<P>(w, rows, x, n, out, buf)
}

#[inline(always)]
unsafe fn gemm_impl<P: Product>(
    w: &[u8],
    rows: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
    buf: &mut Vec<Prepared>,
) {
    let xb = x.len() / n;
    let nb = xb / Q8_0_BYTES;
    let pairs = nb.div_ceil(2);
    if n == 1 && pairs <= STACK_PAIRS {
        let mut acts = [MaybeUninit::<Prepared>::uninit(); STACK_PAIRS];
        for (p, a) in acts[..pairs].iter_mut().enumerate() {
            a.write(prepare::<P>(x.as_ptr(), nb, p));
        }
        // The first `pairs` entries were written above.
        let a = Acts {
            p: acts.as_ptr() as *const Prepared,
            pairs,
            nb,
        };
        return tiles::<P>(w, rows, a, 0..1, out, 1);
    }
    let mut t0 = 0;
    while t0 < n {
        let chunk = (n - t0).min(CHUNK_TOKENS);
        buf.clear();
        for t in t0..t0 + chunk {
            for p in 0..pairs {
                buf.push(prepare::<P>(x.as_ptr().add(t * xb), nb, p));
            }
        }
        let a = Acts {
            p: buf.as_ptr(),
            pairs,
            nb,
        };
        tiles::<P>(w, rows, a, t0..t0 + chunk, out, n);
        t0 += chunk;
    }
}

/// Block pair `p` of the Q8_0 activation row at `xt` (`nb` blocks), prepared.
#[inline(always)]
unsafe fn prepare<P: Product>(xt: *const u8, nb: usize, p: usize) -> Prepared {
    let b = 2 * p;
    P::activations(xt.add(b * Q8_0_BYTES), b + 1 < nb)
}

/// Tokens `toks` (prepared in `a`, its first token first) against every row, in tiles of up to
/// `P::TILE_TOKENS` tokens; `n` tokens in all (`out`'s row length).
#[inline(always)]
unsafe fn tiles<P: Product>(
    w: &[u8],
    rows: usize,
    a: Acts,
    toks: std::ops::Range<usize>,
    out: &mut [f32],
    n: usize,
) {
    let wb = w.len() / rows;
    let (pw, po) = (w.as_ptr(), out.as_mut_ptr());
    // Tokens outside, rows inside: a tile's activations stay in L1 while the weights
    // (a few hundred KiB for an expert) come from L2.
    let mut t = toks.start;
    while t < toks.end {
        let wide = (toks.end - t).min(P::TILE_TOKENS);
        let at = Acts {
            p: a.p.add((t - toks.start) * a.pairs),
            ..a
        };
        let mut r = 0;
        while r < rows {
            // A single token (decoding) goes one row at a time, each row streamed from
            // start to end (see the module's note).
            let tall = rows - r >= 4 && n > 1;
            let (wr, o) = (pw.add(r * wb), po.add(r * n + t));
            match (tall, wide) {
                (true, 4) => tile::<P, 4, 4>(wr, wb, at, o, n),
                (true, 3) => tile::<P, 4, 3>(wr, wb, at, o, n),
                (true, 2) => tile::<P, 4, 2>(wr, wb, at, o, n),
                (true, _) => tile::<P, 4, 1>(wr, wb, at, o, n),
                (false, 4) => tile::<P, 1, 4>(wr, wb, at, o, n),
                (false, 3) => tile::<P, 1, 3>(wr, wb, at, o, n),
                (false, 2) => tile::<P, 1, 2>(wr, wb, at, o, n),
                (false, _) => tile::<P, 1, 1>(wr, wb, at, o, n),
            }
            r += if tall { 4 } else { 1 };
        }
        t += wide;
    }
}

/// Prepared activations of a tile's first token (`pairs` per token, tokens back to back) and the
/// row's block count.
#[derive(Clone, Copy)]
struct Acts {
    p: *const Prepared,
    pairs: usize,
    nb: usize,
}

/// `R` weight rows (`wb` bytes apart) times `T` prepared tokens; writes `out[r * n + t]`.
#[inline(always)]
unsafe fn tile<P: Product, const R: usize, const T: usize>(
    w: *const u8,
    wb: usize,
    a: Acts,
    out: *mut f32,
    n: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    // Whole pairs first, the lone last block (odd `nb`) after: with `both` a constant, the loop
    // carries no per-pair test for it.
    let whole = a.nb / 2;
    for p in 0..whole {
        tile_pair::<P, R, T>(w, wb, a, p, true, &mut acc);
    }
    if whole < a.pairs {
        tile_pair::<P, R, T>(w, wb, a, whole, false, &mut acc);
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, &v) in acc_r.iter().enumerate() {
            *out.add(r * n + t) = hsum(v);
        }
    }
}

/// Block pair `p` of a tile: each row's pair unpacked once, then used by every token.
#[inline(always)]
unsafe fn tile_pair<P: Product, const R: usize, const T: usize>(
    w: *const u8,
    wb: usize,
    a: Acts,
    p: usize,
    both: bool,
    acc: &mut [[__m256; T]; R],
) {
    for (r, acc_r) in acc.iter_mut().enumerate() {
        let wp = w.add(r * wb + 2 * p * P::W_BYTES);
        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH_BYTES) as *const i8);
        let row = P::row(wp, both);
        for (t, acc_rt) in acc_r.iter_mut().enumerate() {
            *acc_rt = P::step(&row, &*a.p.add(t * a.pairs + p), *acc_rt);
        }
    }
}
