//! x86_64 kernels: AVX2 + FMA + F16C, and the same with AVX-512 VNNI (`vpdpbusd` on 256-bit
//! registers) where the CPU has it. Selected at run time from the CPU's features.
//!
//! The quantized products are tiles of up to 4 weight rows x 4 tokens: each weight block is
//! loaded and prepared once for all tokens of the tile, each activation block once for all rows,
//! and the 16 independent accumulators hide the FMA latency that bounds a one-pair loop. Both
//! tables compute every block product as eight exact i32 lane sums (bytes 4i..4i+3) and then the
//! same float steps, so they agree bit for bit with each other and with their own dot kernels.

use std::arch::x86_64::*;

mod batch;
mod block32;
mod iquant;
mod kquant;
mod offset4;
mod rows4;

use super::{grid, scalar, Kernels};
use crate::tensor::blocks::block32::{f16_at, Q8_0_BYTES, QK};
use crate::tensor::blocks::kquant::{Q8_K_BSUMS_AT, Q8_K_BYTES};
use crate::tensor::blocks::QK_K;

static AVX2: Kernels = AVX2_KERNELS;

const AVX2_KERNELS: Kernels = Kernels {
    name: "x86_64 avx2+fma+f16c",
    isa: "avx2",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0: block32::dot_q8_0_q8_0,
    dot_q4_0_q8_0: offset4::dot_q4_0_q8_0,
    dot_q5_0_q8_0: scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: block32::dot_iq4_nl_q8_0,
    dot_mxfp4_q8_0: offset4::dot_mxfp4_q8_0,
    gemm_q8_0: block32::gemm_q8_0,
    gemm_q4_0: offset4::gemm_q4_0,
    gemm_iq4_nl: block32::gemm_iq4_nl,
    gemm_mxfp4: offset4::gemm_mxfp4,
    quantize_q8_0,
    quantize_q8_k,
    dot_q2_k_q8_k: kquant::dot::<kquant::Q2K>,
    dot_q3_k_q8_k: kquant::dot::<kquant::Q3K>,
    dot_q4_k_q8_k: kquant::dot::<kquant::Q4K>,
    dot_q5_k_q8_k: kquant::dot::<kquant::Q5K>,
    dot_q6_k_q8_k: kquant::dot::<kquant::Q6K>,
    dot_iq2_xxs_q8_k: iquant::dot_grid::<grid::Iq2Xxs>,
    dot_iq2_xs_q8_k: iquant::dot_grid::<grid::Iq2Xs>,
    dot_iq2_s_q8_k: iquant::dot_grid::<grid::Iq2S>,
    dot_iq3_xxs_q8_k: iquant::dot_grid::<grid::Iq3Xxs>,
    dot_iq3_s_q8_k: iquant::dot_grid::<grid::Iq3S>,
    dot_iq1_s_q8_k: iquant::dot_grid::<grid::Iq1S>,
    dot_iq1_m_q8_k: iquant::dot_grid::<grid::Iq1M>,
    dot_iq4_xs_q8_k: kquant::dot::<iquant::Iq4Xs>,
    gemm_q2_k: kquant::gemm::<kquant::Q2K>,
    gemm_q3_k: kquant::gemm::<kquant::Q3K>,
    gemm_q4_k: kquant::gemm::<kquant::Q4K>,
    gemm_q5_k: kquant::gemm::<kquant::Q5K>,
    gemm_q6_k: kquant::gemm::<kquant::Q6K>,
    gemm_iq4_xs: kquant::gemm::<iquant::Iq4Xs>,
    gemm_q8_0_rows4: Some(rows4::gemm::<rows4::Q8Avx2>),
    gemm_q4_0_rows4: Some(rows4::gemm::<rows4::Q4Avx2>),
};

/// The AVX2 table with `vpdpbusd` for Q8_0 and Q4_0. `vpdpbusd` would replace maddubs + madd in
/// the k-quants too, but their per-sub-block scales then need an i32 multiply (`vpmulld`, two
/// uops): no gain, so they share the AVX2 kernels, as the other formats do.
static VNNI: Kernels = Kernels {
    name: "x86_64 avx2+fma+f16c+avx512vnni",
    isa: "avx512vnni",
    dot_q8_0_q8_0: block32::dot_q8_0_q8_0_vnni,
    dot_q4_0_q8_0: block32::dot_q4_0_q8_0_vnni,
    gemm_q8_0: block32::gemm_q8_0_vnni,
    gemm_q4_0: block32::gemm_q4_0_vnni,
    gemm_q8_0_rows4: Some(rows4::gemm::<rows4::Q8Vnni>),
    gemm_q4_0_rows4: Some(rows4::gemm::<rows4::Q4Vnni>),
    ..AVX2_KERNELS
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

// The safe wrappers below are reachable only through `tables()`, which checked the features.

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: features checked in `tables()`; lengths checked above.
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

/// Activation rows to Q8_0, bit-identical to `quant::quantize_row_q8_0` (ggml's reference): the
/// scalar version's `roundf` calls were a visible share of one-thread decoding.
fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK, 0);
    assert_eq!(out.len(), x.len() / QK * Q8_0_BYTES);
    // SAFETY: features checked in `tables()`; lengths checked above.
    unsafe { quantize_q8_0_impl(x, out) }
}

/// Activation rows to Q8_K, bit-identical to `kquant::quantize_row_q8_k` (ggml's reference):
/// scalar, its per-value `rintf` calls were most of a k-quant decode step's time outside the
/// matrix products.
fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(out.len(), x.len() / QK_K * Q8_K_BYTES);
    // SAFETY: features checked in `tables()`; lengths checked above.
    unsafe { quantize_q8_k_impl(x, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_k_impl(x: &[f32], out: &mut [u8]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let ones = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(Q8_K_BYTES)) {
        let p = xb.as_ptr();
        // The largest magnitude (a NaN is skipped, as `max_ps` returns its second operand when
        // the first is NaN), then the first value that has it: the reference keeps the first.
        let mut m = _mm256_setzero_ps();
        for j in 0..QK_K / 8 {
            m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p.add(8 * j)), abs_mask), m);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        ob.fill(0);
        if amax == 0.0 {
            continue;
        }
        let amax_v = _mm256_set1_ps(amax);
        let mut max = 0f32;
        for j in 0..QK_K / 8 {
            let v = _mm256_loadu_ps(p.add(8 * j));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps(
                _mm256_and_ps(v, abs_mask),
                amax_v,
                _CMP_EQ_OQ,
            ));
            if hit != 0 {
                max = xb[8 * j + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let iv = _mm256_set1_ps(iscale);
        let top = _mm256_set1_epi32(127);
        let mut sums = [_mm256_setzero_si256(); 8];
        for (c, sum) in sums.iter_mut().enumerate() {
            // 32 values: rounded half to even (the default rounding mode, as `round_ties_even`),
            // at most 127, and 0 where the product is NaN (as `as i32` makes it).
            let mut q = [_mm256_setzero_si256(); 4];
            for (k, qk) in q.iter_mut().enumerate() {
                let s = _mm256_mul_ps(iv, _mm256_loadu_ps(p.add(32 * c + 8 * k)));
                let not_nan = _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_ORD_Q));
                *qk = _mm256_and_si256(_mm256_min_epi32(_mm256_cvtps_epi32(s), top), not_nan);
            }
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(ob.as_mut_ptr().add(4 + 32 * c) as *mut __m256i, bytes);
            // Four i32 sums per 16-value group: groups 2c (low half) and 2c + 1 (high half).
            *sum = _mm256_madd_epi16(_mm256_maddubs_epi16(ones, bytes), ones16);
        }
        // Per 128-bit half: the group sums of chunks 0..4 and 4..8, even groups in the low half
        // and odd ones in the high half; interleaved back to group order.
        let h0 = _mm256_hadd_epi32(
            _mm256_hadd_epi32(sums[0], sums[1]),
            _mm256_hadd_epi32(sums[2], sums[3]),
        );
        let h1 = _mm256_hadd_epi32(
            _mm256_hadd_epi32(sums[4], sums[5]),
            _mm256_hadd_epi32(sums[6], sums[7]),
        );
        let g = _mm256_packs_epi32(h0, h1);
        let (even, odd) = (_mm256_castsi256_si128(g), _mm256_extracti128_si256::<1>(g));
        let bsums = ob.as_mut_ptr().add(Q8_K_BSUMS_AT) as *mut __m128i;
        _mm_storeu_si128(bsums, _mm_unpacklo_epi16(even, odd));
        _mm_storeu_si128(bsums.add(1), _mm_unpackhi_epi16(even, odd));
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
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

/// How far ahead of the block being multiplied a weight row is prefetched, in bytes (a hint:
/// reading past the row's end is harmless, and with a tile's rows adjacent in memory it fetches
/// the rows after them). Decoding streams every weight once, and the distance has to cover the
/// memory latency of both threads' streams (docs/BENCHMARKS.md, "Prefetch distance").
const PREFETCH_BYTES: usize = 4096;

/// Prefetches the cache lines [`PREFETCH_BYTES`] ahead of a weight block of `bytes` bytes at
/// `p`: one per 64 bytes, so that consecutive blocks fetch every line of the row.
#[inline(always)]
unsafe fn prefetch_block(p: *const u8, bytes: usize) {
    let mut off = 0;
    while off < bytes {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + off) as *const i8);
        off += 64;
    }
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
