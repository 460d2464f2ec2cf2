//! x86_64 kernels: AVX2 + FMA + F16C, and the same with AVX-512 VNNI (`vpdpbusd` on 256-bit
//! registers) where the CPU has it. Selected at run time from the CPU's features.
//!
//! The quantized products are tiles of up to 4 weight rows x 4 tokens: each weight block is
//! loaded and prepared once for all tokens of the tile, each activation block once for all rows,
//! and the 16 independent accumulators hide the FMA latency that bounds a one-pair loop. Both
//! tables compute every block product as eight exact i32 lane sums (bytes 4i..4i+3) and then the
//! same float steps, so they agree bit for bit with each other and with their own dot kernels.

use std::arch::x86_64::*;

use super::Kernels;
use crate::tensor::quant::{f16_at, quantize_row_q8_0, Q4_0_BYTES, Q8_0_BYTES};

static AVX2: Kernels = Kernels {
    name: "x86_64 avx2+fma+f16c",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0,
    dot_q4_0_q8_0,
    gemm_q8_0,
    gemm_q4_0,
    // Activation quantization is cheap next to the products and stays bit-identical to ggml's
    // reference this way.
    quantize_q8_0: quantize_row_q8_0,
};

static VNNI: Kernels = Kernels {
    name: "x86_64 avx2+fma+f16c+avx512vnni",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0: dot_q8_0_q8_0_vnni,
    dot_q4_0_q8_0: dot_q4_0_q8_0_vnni,
    gemm_q8_0: gemm_q8_0_vnni,
    gemm_q4_0: gemm_q4_0_vnni,
    quantize_q8_0: quantize_row_q8_0,
};

fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

fn has_vnni() -> bool {
    has_avx2() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// Every x86 table this CPU can run, fastest first (the tests run them all).
pub fn tables() -> impl Iterator<Item = &'static Kernels> {
    let vnni = has_vnni().then_some(&VNNI);
    let avx2 = has_avx2().then_some(&AVX2);
    vnni.into_iter().chain(avx2)
}

/// The fastest x86 table this CPU can run.
pub fn table() -> Option<&'static Kernels> {
    tables().next()
}

// The safe wrappers below are reachable only through `table()`, which checked the features.

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: features checked in `table()`; lengths checked above.
    unsafe { dot_f32_impl(a, b) }
}

fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    assert!(w.len() >= 2 * x.len());
    // SAFETY: as above.
    unsafe { dot_f16_impl(w, x) }
}

fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    assert!(w.len() >= 2 * x.len());
    // SAFETY: as above.
    unsafe { dot_bf16_impl(w, x) }
}

fn axpy_f16(a: f32, v: &[u8], out: &mut [f32]) {
    assert!(v.len() >= 2 * out.len());
    // SAFETY: features checked in `tables()`; lengths checked above.
    unsafe { axpy_f16_impl(a, v, out) }
}

fn dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q8_0(w, 1, x, 1, &mut out);
    out[0]
}

fn dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q4_0(w, 1, x, 1, &mut out);
    out[0]
}

fn dot_q8_0_q8_0_vnni(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q8_0_vnni(w, 1, x, 1, &mut out);
    out[0]
}

fn dot_q4_0_q8_0_vnni(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    gemm_q4_0_vnni(w, 1, x, 1, &mut out);
    out[0]
}

/// Checks the shapes the tile loops rely on: whole rows of whole blocks, the same block count
/// for weights and activations, room for the output.
fn check_gemm(w: &[u8], w_block: usize, rows: usize, x: &[u8], n: usize, out: &[f32]) {
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

fn gemm_q8_0(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q8_0_BYTES, rows, x, n, out);
    // SAFETY: features checked in `tables()`; shapes checked above.
    unsafe { gemm_avx2::<Q8Signed>(w, rows, x, n, out) }
}

fn gemm_q4_0(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q4_0_BYTES, rows, x, n, out);
    // SAFETY: as above.
    unsafe { gemm_avx2::<Q4Signed>(w, rows, x, n, out) }
}

fn gemm_q8_0_vnni(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q8_0_BYTES, rows, x, n, out);
    // SAFETY: as above (VNNI checked in `tables()`).
    unsafe { gemm_vnni::<Q8Vnni>(w, rows, x, n, out) }
}

fn gemm_q4_0_vnni(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    check_gemm(w, Q4_0_BYTES, rows, x, n, out);
    // SAFETY: as above.
    unsafe { gemm_vnni::<Q4Vnni>(w, rows, x, n, out) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc_k) in acc.iter_mut().enumerate() {
            let va = _mm256_loadu_ps(pa.add(i + 8 * k));
            let vb = _mm256_loadu_ps(pb.add(i + 8 * k));
            *acc_k = _mm256_fmadd_ps(va, vb, *acc_k);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum(v);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_impl(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(2 * i) as *const __m128i));
        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(2 * i + 16) as *const __m128i));
        acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(px.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(px.add(i + 8)), acc1);
        i += 16;
    }
    let mut sum = hsum(_mm256_add_ps(acc0, acc1));
    while i < n {
        sum += f16_at(w, 2 * i) * x[i];
        i += 1;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_impl(a: f32, v: &[u8], out: &mut [f32]) {
    let n = out.len();
    let (pv, po) = (v.as_ptr(), out.as_mut_ptr());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_cvtph_ps(_mm_loadu_si128(pv.add(2 * i) as *const __m128i));
        _mm256_storeu_ps(
            po.add(i),
            _mm256_fmadd_ps(va, x, _mm256_loadu_ps(po.add(i))),
        );
        i += 8;
    }
    while i < n {
        out[i] += a * f16_at(v, 2 * i);
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_impl(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(pw.add(2 * i) as *const __m128i));
        let wv = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
        acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i)), acc);
        i += 8;
    }
    let mut sum = hsum(acc);
    while i < n {
        let b = u16::from_le_bytes([w[2 * i], w[2 * i + 1]]);
        sum += half::bf16::from_bits(b).to_f32() * x[i];
        i += 1;
    }
    sum
}

/// The f16 at `p` (unaligned), converted with F16C and broadcast to 8 lanes. Broadcasting
/// before the conversion writes the whole register: converting a single inserted lane let LLVM
/// merge into a live register (the accumulator), a false dependency that serialised every
/// block on the previous one's FMA (measured: 3x slower).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_splat(p: *const u8) -> __m256 {
    let bits = i16::from_le_bytes([*p, *p.add(1)]);
    _mm256_cvtph_ps(_mm_set1_epi16(bits))
}

/// How one CPU level multiplies a weight block by an activation block. A weight block is
/// prepared once per tile row (`row`), an activation block once per tile token (`token`), and
/// `pair` returns the eight exact lane sums of their integer product.
trait BlockProduct {
    /// Bytes of one weight block.
    const W_BYTES: usize;
    /// Prepares the weight block at `p`: two vectors and its scale.
    unsafe fn row(p: *const u8) -> (__m256i, __m256i, __m256);
    /// Prepares the Q8_0 activation block at `p`: two vectors and its scale.
    unsafe fn token(p: *const u8) -> (__m256i, __m256i, __m256);
    unsafe fn pair(row: (__m256i, __m256i), token: (__m256i, __m256i)) -> __m256i;
}

/// `acc + ` lane sums of u8 x i8 products with `vpdpbusd` (AVX-512 VNNI on 256-bit registers).
/// Written as `asm!` because the intrinsic and the `avx512vnni` target feature need Rust 1.89
/// and the workspace supports 1.85; reached only after run-time detection of AVX-512 VNNI+VL.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    let mut acc = acc;
    std::arch::asm!(
        "vpdpbusd {acc}, {u}, {s}",
        acc = inout(ymm_reg) acc,
        u = in(ymm_reg) u,
        s = in(ymm_reg) s,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Lane sums of u8 x i8 products without VNNI: maddubs to i16 pairs, madd to i32.
#[inline(always)]
unsafe fn maddubs_sum(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// The 32 nibbles of a Q4_0 block as bytes 0..=15: value j in byte j (low nibbles first).
#[inline(always)]
unsafe fn q4_nibbles(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// AVX2 Q8_0: maddubs needs an unsigned left operand, so |w| times x carrying w's sign.
struct Q8Signed;
impl BlockProduct for Q8Signed {
    const W_BYTES: usize = Q8_0_BYTES;
    #[inline(always)]
    unsafe fn row(p: *const u8) -> (__m256i, __m256i, __m256) {
        let w = _mm256_loadu_si256(p.add(2) as *const __m256i);
        (_mm256_sign_epi8(w, w), w, f16_splat(p))
    }
    #[inline(always)]
    unsafe fn token(p: *const u8) -> (__m256i, __m256i, __m256) {
        let x = _mm256_loadu_si256(p.add(2) as *const __m256i);
        (x, x, f16_splat(p))
    }
    #[inline(always)]
    unsafe fn pair((abs_w, w): (__m256i, __m256i), (x, _): (__m256i, __m256i)) -> __m256i {
        maddubs_sum(abs_w, _mm256_sign_epi8(x, w))
    }
}

/// AVX2 Q4_0: the nibbles minus 8, then as Q8_0.
struct Q4Signed;
impl BlockProduct for Q4Signed {
    const W_BYTES: usize = Q4_0_BYTES;
    #[inline(always)]
    unsafe fn row(p: *const u8) -> (__m256i, __m256i, __m256) {
        let w = _mm256_sub_epi8(q4_nibbles(p.add(2)), _mm256_set1_epi8(8));
        (_mm256_sign_epi8(w, w), w, f16_splat(p))
    }
    #[inline(always)]
    unsafe fn token(p: *const u8) -> (__m256i, __m256i, __m256) {
        Q8Signed::token(p)
    }
    #[inline(always)]
    unsafe fn pair(row: (__m256i, __m256i), token: (__m256i, __m256i)) -> __m256i {
        Q8Signed::pair(row, token)
    }
}

/// VNNI Q8_0: `vpdpbusd` multiplies unsigned by signed bytes, so the activations are offset to
/// x + 128 (a bit flip) and the accumulator starts at -128 * (lane sums of w), prepared once
/// per weight block: the lane sums come out exact, with no per-pair sign fix-up.
struct Q8Vnni;
impl BlockProduct for Q8Vnni {
    const W_BYTES: usize = Q8_0_BYTES;
    #[inline(always)]
    unsafe fn row(p: *const u8) -> (__m256i, __m256i, __m256) {
        let w = _mm256_loadu_si256(p.add(2) as *const __m256i);
        let sum128 = dpbusd(_mm256_setzero_si256(), _mm256_set1_epi8(-128), w);
        (
            w,
            _mm256_sub_epi32(_mm256_setzero_si256(), sum128),
            f16_splat(p),
        )
    }
    #[inline(always)]
    unsafe fn token(p: *const u8) -> (__m256i, __m256i, __m256) {
        let x = _mm256_loadu_si256(p.add(2) as *const __m256i);
        let offset = _mm256_xor_si256(x, _mm256_set1_epi8(-128));
        (offset, offset, f16_splat(p))
    }
    #[inline(always)]
    unsafe fn pair((w, start): (__m256i, __m256i), (x128, _): (__m256i, __m256i)) -> __m256i {
        dpbusd(start, x128, w)
    }
}

/// VNNI Q4_0: the nibbles are already unsigned; the accumulator starts at -8 * (lane sums of
/// x), prepared once per activation block.
struct Q4Vnni;
impl BlockProduct for Q4Vnni {
    const W_BYTES: usize = Q4_0_BYTES;
    #[inline(always)]
    unsafe fn row(p: *const u8) -> (__m256i, __m256i, __m256) {
        let q = q4_nibbles(p.add(2));
        (q, q, f16_splat(p))
    }
    #[inline(always)]
    unsafe fn token(p: *const u8) -> (__m256i, __m256i, __m256) {
        let x = _mm256_loadu_si256(p.add(2) as *const __m256i);
        let sum8 = dpbusd(_mm256_setzero_si256(), _mm256_set1_epi8(8), x);
        (
            x,
            _mm256_sub_epi32(_mm256_setzero_si256(), sum8),
            f16_splat(p),
        )
    }
    #[inline(always)]
    unsafe fn pair((q, _): (__m256i, __m256i), (x, start): (__m256i, __m256i)) -> __m256i {
        dpbusd(start, q, x)
    }
}

/// One tile: `R` weight rows (`wb` bytes apart) times `T` activation rows (`xb` bytes apart),
/// `nb` blocks each; writes `out[r * n + t]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<P: BlockProduct, const R: usize, const T: usize>(
    w: *const u8,
    wb: usize,
    x: *const u8,
    xb: usize,
    nb: usize,
    out: *mut f32,
    n: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let zero = _mm256_setzero_si256();
    let mut rows = [(zero, zero); R];
    let mut row_d = [_mm256_setzero_ps(); R];
    let mut toks = [(zero, zero); T];
    let mut tok_d = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        for t in 0..T {
            let (u, v, d) = P::token(x.add(t * xb + b * Q8_0_BYTES));
            toks[t] = (u, v);
            tok_d[t] = d;
        }
        for r in 0..R {
            let (u, v, d) = P::row(w.add(r * wb + b * P::W_BYTES));
            rows[r] = (u, v);
            row_d[r] = d;
        }
        for r in 0..R {
            for t in 0..T {
                let d = _mm256_mul_ps(row_d[r], tok_d[t]);
                let sums = _mm256_cvtepi32_ps(P::pair(rows[r], toks[t]));
                acc[r][t] = _mm256_fmadd_ps(d, sums, acc[r][t]);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, &a) in acc_r.iter().enumerate() {
            *out.add(r * n + t) = hsum(a);
        }
    }
}

/// Covers `rows x n` with tiles of 4 rows (then single rows) by up to 4 tokens.
#[inline(always)]
unsafe fn gemm_tiles<P: BlockProduct>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    let (wb, xb) = (w.len() / rows, x.len() / n);
    let nb = xb / Q8_0_BYTES;
    let (pw, px, po) = (w.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    let mut r = 0;
    while r < rows {
        let tall = rows - r >= 4;
        let mut t = 0;
        while t < n {
            let wide = (n - t).min(4);
            let (wr, xt, o) = (pw.add(r * wb), px.add(t * xb), po.add(r * n + t));
            match (tall, wide) {
                (true, 4) => tile::<P, 4, 4>(wr, wb, xt, xb, nb, o, n),
                (true, 3) => tile::<P, 4, 3>(wr, wb, xt, xb, nb, o, n),
                (true, 2) => tile::<P, 4, 2>(wr, wb, xt, xb, nb, o, n),
                (true, _) => tile::<P, 4, 1>(wr, wb, xt, xb, nb, o, n),
                (false, 4) => tile::<P, 1, 4>(wr, wb, xt, xb, nb, o, n),
                (false, 3) => tile::<P, 1, 3>(wr, wb, xt, xb, nb, o, n),
                (false, 2) => tile::<P, 1, 2>(wr, wb, xt, xb, nb, o, n),
                (false, _) => tile::<P, 1, 1>(wr, wb, xt, xb, nb, o, n),
            }
            t += wide;
        }
        r += if tall { 4 } else { 1 };
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_avx2<P: BlockProduct>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    gemm_tiles::<P>(w, rows, x, n, out)
}

/// Compiled for AVX2; `dpbusd` emits the VNNI instruction itself.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_vnni<P: BlockProduct>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    gemm_tiles::<P>(w, rows, x, n, out)
}
