//! x86_64 kernels: AVX2 + FMA + F16C, and the same with AVX-512 VNNI (`vpdpbusd` on 256-bit
//! registers) where the CPU has it. Selected at run time from the CPU's features.
//!
//! The quantized products are tiles of up to 4 weight rows x 4 tokens: each weight block is
//! loaded and prepared once for all tokens of the tile, each activation block once for all rows,
//! and the 16 independent accumulators hide the FMA latency that bounds a one-pair loop. Both
//! tables compute every block product as eight exact i32 lane sums (bytes 4i..4i+3) and then the
//! same float steps, so they agree bit for bit with each other and with their own dot kernels.

use std::arch::x86_64::*;

use super::{check_k, Kernels};
use crate::tensor::blocks::block32::{f16_at, Q4_0_BYTES, Q8_0_BYTES, QK};
use crate::tensor::blocks::kquant::{
    q4_k_scales_mins, Q4_K_BYTES, Q6_K_BYTES, Q8_K_BSUMS_AT, Q8_K_BYTES,
};

static AVX2: Kernels = Kernels {
    name: "x86_64 avx2+fma+f16c",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0,
    dot_q4_0_q8_0,
    dot_q5_0_q8_0: super::scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: super::scalar::dot_iq4_nl_q8_0,
    dot_mxfp4_q8_0: super::scalar::dot_mxfp4_q8_0,
    gemm_q8_0,
    gemm_q4_0,
    quantize_q8_0,
    dot_q2_k_q8_k: super::scalar::kquant::dot_q2_k_q8_k,
    dot_q3_k_q8_k: super::scalar::kquant::dot_q3_k_q8_k,
    dot_q4_k_q8_k,
    dot_q5_k_q8_k: super::scalar::kquant::dot_q5_k_q8_k,
    dot_q6_k_q8_k,
    dot_iq2_xxs_q8_k: super::scalar::iquant::dot_iq2_xxs_q8_k,
    dot_iq2_xs_q8_k: super::scalar::iquant::dot_iq2_xs_q8_k,
    dot_iq2_s_q8_k: super::scalar::iquant::dot_iq2_s_q8_k,
    dot_iq3_xxs_q8_k: super::scalar::iquant::dot_iq3_xxs_q8_k,
    dot_iq3_s_q8_k: super::scalar::iquant::dot_iq3_s_q8_k,
    dot_iq1_s_q8_k: super::scalar::iquant::dot_iq1_s_q8_k,
    dot_iq1_m_q8_k: super::scalar::iquant::dot_iq1_m_q8_k,
    dot_iq4_xs_q8_k: super::scalar::iquant::dot_iq4_xs_q8_k,
    gemm_q4_k,
};

static VNNI: Kernels = Kernels {
    name: "x86_64 avx2+fma+f16c+avx512vnni",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0: dot_q8_0_q8_0_vnni,
    dot_q4_0_q8_0: dot_q4_0_q8_0_vnni,
    dot_q5_0_q8_0: super::scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: super::scalar::dot_iq4_nl_q8_0,
    dot_mxfp4_q8_0: super::scalar::dot_mxfp4_q8_0,
    gemm_q8_0: gemm_q8_0_vnni,
    gemm_q4_0: gemm_q4_0_vnni,
    quantize_q8_0,
    // `vpdpbusd` would replace maddubs + madd, but the per-sub-block scales then need an i32
    // multiply (`vpmulld`, two uops): no gain, so the k-quants share the AVX2 kernels.
    dot_q2_k_q8_k: super::scalar::kquant::dot_q2_k_q8_k,
    dot_q3_k_q8_k: super::scalar::kquant::dot_q3_k_q8_k,
    dot_q4_k_q8_k,
    dot_q5_k_q8_k: super::scalar::kquant::dot_q5_k_q8_k,
    dot_q6_k_q8_k,
    dot_iq2_xxs_q8_k: super::scalar::iquant::dot_iq2_xxs_q8_k,
    dot_iq2_xs_q8_k: super::scalar::iquant::dot_iq2_xs_q8_k,
    dot_iq2_s_q8_k: super::scalar::iquant::dot_iq2_s_q8_k,
    dot_iq3_xxs_q8_k: super::scalar::iquant::dot_iq3_xxs_q8_k,
    dot_iq3_s_q8_k: super::scalar::iquant::dot_iq3_s_q8_k,
    dot_iq1_s_q8_k: super::scalar::iquant::dot_iq1_s_q8_k,
    dot_iq1_m_q8_k: super::scalar::iquant::dot_iq1_m_q8_k,
    dot_iq4_xs_q8_k: super::scalar::iquant::dot_iq4_xs_q8_k,
    gemm_q4_k,
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

/// Activation rows to Q8_0, bit-identical to `quant::quantize_row_q8_0` (ggml's reference). In
/// one-token decoding on one thread the scalar version, with its `roundf` calls, was 5% of the
/// time.
fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK, 0);
    assert_eq!(out.len(), x.len() / QK * Q8_0_BYTES);
    // SAFETY: features checked in `table()`; lengths checked above.
    unsafe { quantize_q8_0_impl(x, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_0_impl(x: &[f32], out: &mut [u8]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let sign_mask = _mm256_set1_ps(-0.0);
    // The float just below 1/2: truncating `s + copysign(it, s)` rounds half away from zero, as
    // `f32::round` (ggml's `roundf`) does, for |s| < 2^23: a tie k + 1/2 sums to within half an
    // ulp of k + 1 and rounds up to it, while anything below a tie sums to below k + 1.
    let below_half = _mm256_set1_ps(0.499_999_97);
    // packs interleave the 128-bit lanes; this puts the 4-byte groups back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let p = xb.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        // max |x|: `max_ps` returns its second operand when the first is NaN, so a NaN is
        // skipped as `f32::max` skips it.
        let mut m = _mm256_setzero_ps();
        for &vi in &v {
            m = _mm256_max_ps(_mm256_and_ps(vi, abs_mask), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
        let idv = _mm256_set1_ps(id);
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, &vi) in q.iter_mut().zip(&v) {
            let s = _mm256_mul_ps(vi, idv);
            let nudge = _mm256_or_ps(below_half, _mm256_and_ps(s, sign_mask));
            let rounded = _mm256_cvttps_epi32(_mm256_add_ps(s, nudge));
            // A NaN (x NaN, or inf x 0) converts to i32::MIN here but to 0 in `as i8`.
            let not_nan = _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_ORD_Q));
            *qi = _mm256_and_si256(rounded, not_nan);
        }
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        _mm256_storeu_si256(ob.as_mut_ptr().add(2) as *mut __m256i, bytes);
    }
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
/// prepared once per tile row, activation blocks once per tile token, and `pair` returns the
/// exact i32 lane sums of their products.
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
unsafe fn scales(p: *const u8, stride: usize, both: bool) -> __m256 {
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
unsafe fn q8_pair(p: *const u8, stride: usize, both: bool) -> (__m256i, __m256i, __m256) {
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

/// AVX2 Q4_0: the nibbles minus 8, then as Q8_0.
struct Q4Signed;
impl BlockProduct for Q4Signed {
    const W_BYTES: usize = Q4_0_BYTES;
    #[inline(always)]
    unsafe fn weights(p: *const u8, both: bool) -> BlockPair {
        let (lo, hi, d) = q4_pair(p, both);
        let eight = _mm256_set1_epi8(8);
        signed_weights(_mm256_sub_epi8(lo, eight), _mm256_sub_epi8(hi, eight), d)
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

/// How far ahead of the block being multiplied its row is prefetched, in bytes (a hint: reading
/// past the row's end is harmless, and with a tile's rows adjacent in memory it fetches the
/// rows after them). Decoding streams every weight once, and the distance has to cover the
/// memory latency of both threads' streams: on the 2-thread benchmark checkpoint, single-token
/// Q4_0 decode ran 44-48 t/s at 16 blocks ahead (the earlier setting: 288 bytes for Q4_0, 544
/// for Q8_0), 52-73 at 4096 bytes and 52-68 at 8192; Q8_0 31-33, 38-44 and 38-45 (two rounds,
/// a noisy machine).
const PREFETCH_BYTES: usize = 4096;

/// One tile: `R` weight rows (`wb` bytes apart) times `T` activation rows (`xb` bytes apart),
/// `nb` blocks each, two blocks per step; writes `out[r * n + t]`.
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
    let mut b = 0;
    while b < nb {
        let both = b + 1 < nb;
        let mut toks = [P::activations(x.add(b * Q8_0_BYTES), both); T];
        for (t, tok) in toks.iter_mut().enumerate().skip(1) {
            *tok = P::activations(x.add(t * xb + b * Q8_0_BYTES), both);
        }
        // One weight row at a time, used by every token at once, keeps the live registers to
        // the accumulators, the tokens and one row.
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // Weights stream from memory once (decode): ask for them a few blocks ahead.
            _mm_prefetch::<_MM_HINT_T0>(
                w.add(r * wb + b * P::W_BYTES + PREFETCH_BYTES) as *const i8
            );
            let row = P::weights(w.add(r * wb + b * P::W_BYTES), both);
            for (tok, a) in toks.iter().zip(acc_r.iter_mut()) {
                let d = _mm256_mul_ps(row.d, tok.d);
                let sums = _mm256_cvtepi32_ps(P::pair(&row, tok));
                *a = _mm256_fmadd_ps(d, sums, *a);
            }
        }
        b += 2;
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (t, &a) in acc_r.iter().enumerate() {
            *out.add(r * n + t) = hsum(a);
        }
    }
}

/// Covers `rows x n` with tiles of 4 rows (then single rows) by up to `MAX_T` tokens (as many
/// as the register file holds).
#[inline(always)]
unsafe fn gemm_tiles<P: BlockProduct, const MAX_T: usize>(
    w: &[u8],
    rows: usize,
    x: &[u8],
    n: usize,
    out: &mut [f32],
) {
    let (wb, xb) = (w.len() / rows, x.len() / n);
    let nb = xb / Q8_0_BYTES;
    let (pw, px, po) = (w.as_ptr(), x.as_ptr(), out.as_mut_ptr());
    let mut r = 0;
    while r < rows {
        let tall = rows - r >= 4;
        let mut t = 0;
        while t < n {
            let wide = (n - t).min(MAX_T);
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
    gemm_tiles::<P, 2>(w, rows, x, n, out)
}

/// AVX-512VL also gives 32 vector registers: room for 4 x 4 tiles.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn gemm_vnni<P: BlockProduct>(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    gemm_tiles::<P, 4>(w, rows, x, n, out)
}

fn dot_q4_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, Q4_K_BYTES, x);
    // SAFETY: features checked in `tables()`; lengths checked above.
    unsafe { dot_q4_k_q8_k_impl(w, x) }
}

fn dot_q6_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, Q6_K_BYTES, x);
    // SAFETY: as above.
    unsafe { dot_q6_k_q8_k_impl(w, x) }
}

/// The little-endian f16 at `p` converted with F16C (the `half` crate's software conversion
/// would cost more than a sub-block's products).
#[inline(always)]
unsafe fn f16_scalar(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

#[inline(always)]
unsafe fn f32_at(p: *const u8) -> f32 {
    f32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)])
}

/// ggml's AVX2 `ggml_vec_dot_q4_K_q8_K`. Per 32-value sub-block j: the nibbles (unsigned) times
/// the activations with maddubs (pairs of at most 2 * 15 * 128, no saturation), times the 6-bit
/// scale with madd, summed in eight i32 lanes and scaled by d once per block; the minimum term
/// is the 6-bit mins times the Q8_K sums of each sub-block (pairs of the 16-value sums), in four
/// lanes scaled by -dmin.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k_q8_k_impl(w: &[u8], x: &[u8]) -> f32 {
    let mut out = [0f32];
    q4_k_tile::<1>(w, x.as_ptr(), x.len(), out.as_mut_ptr());
    out[0]
}

fn gemm_q4_k(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    assert!(rows > 0 && n > 0 && out.len() >= rows * n, "gemm shape");
    let (wb, xb) = (w.len() / rows, x.len() / n);
    assert_eq!((wb * rows, xb * n), (w.len(), x.len()), "whole rows");
    check_k(&w[..wb], Q4_K_BYTES, &x[..xb]);
    // SAFETY: features checked in `tables()`; shapes checked above.
    unsafe { gemm_q4_k_impl(w, rows, x, n, out) }
}

/// Each weight row against up to four tokens at a time: the row's nibbles, scales and mins are
/// unpacked once per block for all of them (prefill and an expert's share of a batch). Every
/// token takes exactly the steps of [`dot_q4_k_q8_k_impl`], so results equal it bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_q4_k_impl(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    let (wb, xb) = (w.len() / rows, x.len() / n);
    for r in 0..rows {
        let wr = &w[r * wb..(r + 1) * wb];
        let mut t = 0;
        while t < n {
            let (xp, o) = (x.as_ptr().add(t * xb), out.as_mut_ptr().add(r * n + t));
            t += match n - t {
                1 => q4_k_tile::<1>(wr, xp, xb, o),
                2 => q4_k_tile::<2>(wr, xp, xb, o),
                3 => q4_k_tile::<3>(wr, xp, xb, o),
                _ => q4_k_tile::<4>(wr, xp, xb, o),
            };
        }
    }
}

/// A byte-shuffle pattern that copies i16 lane `i` of each 128-bit half to all eight lanes.
#[inline(always)]
unsafe fn spread_i16(i: usize) -> __m256i {
    let pair = (2 * i as u16) | ((2 * i as u16 + 1) << 8);
    _mm256_set1_epi16(pair as i16)
}

/// One Q4_K weight row times `T` Q8_K activation rows (`xb` bytes apart from `x`); writes
/// `out[0..T]` and returns `T`.
#[inline(always)]
unsafe fn q4_k_tile<const T: usize>(w: &[u8], x: *const u8, xb: usize, out: *mut f32) -> usize {
    let nb = w.len() / Q4_K_BYTES;
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut acc_m = [_mm_setzero_ps(); T];
    for i in 0..nb {
        let wb = w.as_ptr().add(i * Q4_K_BYTES);
        let (wd, wdmin) = (f16_scalar(wb), f16_scalar(wb.add(2)));
        let (sc, mn) = q4_k_scales_mins(&w[i * Q4_K_BYTES + 4..i * Q4_K_BYTES + 16]);
        let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr() as *const __m128i));
        // The eight scales as i16 in both halves; each sub-block's is spread by one byte
        // shuffle with a constant pattern (as ggml's get_scale_shuffle_k4).
        let sc16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(sc.as_ptr() as *const __m128i));
        let sc16 = _mm256_set_m128i(sc16, sc16);
        let mut q4 = [[_mm256_setzero_si256(); 2]; 4];
        let mut scale = [[_mm256_setzero_si256(); 2]; 4];
        for j in 0..4 {
            let bits = _mm256_loadu_si256(wb.add(16 + 32 * j) as *const __m256i);
            q4[j] = [
                _mm256_and_si256(bits, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(bits), m4),
            ];
            scale[j] = [
                _mm256_shuffle_epi8(sc16, spread_i16(2 * j)),
                _mm256_shuffle_epi8(sc16, spread_i16(2 * j + 1)),
            ];
        }
        for t in 0..T {
            let xp = x.add(t * xb + i * Q8_K_BYTES);
            let dy = f32_at(xp);
            let d = dy * wd;
            let dmin = -dy * wdmin;

            let q8sums = _mm256_loadu_si256(xp.add(Q8_K_BSUMS_AT) as *const __m256i);
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256::<1>(q8sums),
            );
            let prod = _mm_madd_epi16(mins, q8s);
            acc_m[t] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[t]);

            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let q8l = _mm256_loadu_si256(xp.add(4 + 64 * j) as *const __m256i);
                let q8h = _mm256_loadu_si256(xp.add(4 + 64 * j + 32) as *const __m256i);
                let p16l = _mm256_madd_epi16(scale[j][0], _mm256_maddubs_epi16(q4[j][0], q8l));
                let p16h = _mm256_madd_epi16(scale[j][1], _mm256_maddubs_epi16(q4[j][1], q8h));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16l, p16h));
            }
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[t]);
        }
    }
    for t in 0..T {
        let m = _mm_add_ps(acc_m[t], _mm_movehl_ps(acc_m[t], acc_m[t]));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        *out.add(t) = hsum(acc[t]) + _mm_cvtss_f32(m);
    }
    T
}

/// ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`: the 6-bit values unsigned (0..=63) times the activations
/// with maddubs (pairs of at most 2 * 63 * 128, no saturation), times the signed 16-value scales
/// with madd; the offset of 32 is taken off once per block as 32 * sum(scale * Q8_K block sum).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k_q8_k_impl(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q6_K_BYTES;
    let m3 = _mm256_set1_epi8(3);
    let m15 = _mm256_set1_epi8(15);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let wb = w.as_ptr().add(i * Q6_K_BYTES);
        let xb = x.as_ptr().add(i * Q8_K_BYTES);
        let d = f32_at(xb) * f16_scalar(wb.add(208));

        let q8sums = _mm256_loadu_si256(xb.add(Q8_K_BSUMS_AT) as *const __m256i);
        let scales = _mm_loadu_si128(wb.add(192) as *const __m128i);
        let scales16 = _mm256_cvtepi8_epi16(scales);
        let q8sclsub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, scales16));

        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let ql = wb.add(64 * half);
            let qh = _mm256_loadu_si256(wb.add(128 + 32 * half) as *const __m256i);
            let q4bits1 = _mm256_loadu_si256(ql as *const __m256i);
            let q4bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);

            let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3));
            let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(12)));
            let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(48));
            let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(-64)));

            let q = [
                _mm256_or_si256(_mm256_and_si256(q4bits1, m15), h0),
                _mm256_or_si256(_mm256_and_si256(q4bits2, m15), h1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits1), m15), h2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q4bits2), m15), h3),
            ];
            for (k, qk) in q.iter().enumerate() {
                let q8 = _mm256_loadu_si256(xb.add(4 + 128 * half + 32 * k) as *const __m256i);
                // Scales 8 * half + 2k (values 0..16 of the chunk) and + 1 (values 16..32),
                // spread by a byte shuffle and widened (ggml's get_scale_shuffle).
                let s = 8 * half + 2 * k;
                let pick = _mm_set_epi64x(
                    (0x0101_0101_0101_0101u64 * (s as u64 + 1)) as i64,
                    (0x0101_0101_0101_0101u64 * s as u64) as i64,
                );
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick));
                let p = _mm256_madd_epi16(sc, _mm256_maddubs_epi16(*qk, q8));
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        sumi = _mm256_sub_epi32(sumi, q8sclsub);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}
