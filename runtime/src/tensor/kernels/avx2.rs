//! x86_64 AVX2 + FMA + F16C kernels. Selected only when the CPU reports all three features; the
//! integer dot products follow ggml's `mul_sum_i8_pairs` scheme (sign trick, maddubs, madd).

use std::arch::x86_64::*;

use super::Kernels;
use crate::tensor::quant::{f16_at, quantize_row_q8_0, Q4_0_BYTES, Q8_0_BYTES};

static AVX2: Kernels = Kernels {
    name: "x86_64 avx2+fma+f16c",
    dot_f32,
    dot_f16,
    dot_bf16,
    dot_q8_0_q8_0,
    dot_q4_0_q8_0,
    // Activation quantization is cheap next to the products and stays bit-identical to ggml's
    // reference this way.
    quantize_q8_0: quantize_row_q8_0,
};

/// The AVX2 table, if this CPU can run it.
pub fn table() -> Option<&'static Kernels> {
    let ok = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    ok.then_some(&AVX2)
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

fn dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    assert_eq!(w.len(), x.len());
    assert_eq!(w.len() % Q8_0_BYTES, 0);
    // SAFETY: as above.
    unsafe { dot_q8_0_q8_0_impl(w, x) }
}

fn dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    assert_eq!(w.len() / Q4_0_BYTES, x.len() / Q8_0_BYTES);
    assert_eq!(w.len() % Q4_0_BYTES, 0);
    // SAFETY: as above.
    unsafe { dot_q4_0_q8_0_impl(w, x) }
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

/// The f16 at `p` (unaligned), converted with F16C inside the kernel instead of a call out.
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_scale(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// Sum of products of 32 signed bytes, as 8 i32 lanes converted to f32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mul_sum_i8(a: __m256i, b: __m256i) -> __m256 {
    // maddubs needs an unsigned left operand: |a| and b carrying a's sign.
    let ax = _mm256_sign_epi8(a, a);
    let sy = _mm256_sign_epi8(b, a);
    let dot16 = _mm256_maddubs_epi16(ax, sy);
    let dot32 = _mm256_madd_epi16(dot16, _mm256_set1_epi16(1));
    _mm256_cvtepi32_ps(dot32)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_q8_0_impl(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q8_0_BYTES;
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let o = b * Q8_0_BYTES;
        let d = _mm256_set1_ps(f16_scale(pw.add(o)) * f16_scale(px.add(o)));
        let qw = _mm256_loadu_si256(pw.add(o + 2) as *const __m256i);
        let qx = _mm256_loadu_si256(px.add(o + 2) as *const __m256i);
        acc = _mm256_fmadd_ps(d, mul_sum_i8(qw, qx), acc);
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_q8_0_impl(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q4_0_BYTES;
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = _mm256_setzero_ps();
    let low = _mm256_set1_epi8(0x0f);
    let eight = _mm256_set1_epi8(8);
    for b in 0..nb {
        let (ow, ox) = (b * Q4_0_BYTES, b * Q8_0_BYTES);
        let d = _mm256_set1_ps(f16_scale(pw.add(ow)) * f16_scale(px.add(ox)));
        // Values j (low nibbles) in the first 16 bytes, values j + 16 (high nibbles) after.
        let packed = _mm_loadu_si128(pw.add(ow + 2) as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let qw = _mm256_sub_epi8(_mm256_and_si256(both, low), eight);
        let qx = _mm256_loadu_si256(px.add(ox + 2) as *const __m256i);
        acc = _mm256_fmadd_ps(d, mul_sum_i8(qw, qx), acc);
    }
    hsum(acc)
}
