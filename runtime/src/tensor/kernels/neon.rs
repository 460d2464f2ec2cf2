//! aarch64 NEON kernels, in two tables because one binary must serve both kinds of board: with
//! the dot-product extension (Pi 5's Cortex-A76) the integer kernels use `sdot`; without it
//! (Pi 4's Cortex-A72, Pi Zero 2 W's Cortex-A53) they widen with `smull` and add pairwise. The
//! integer kernels follow ggml's `ggml_vec_dot_q8_0_q8_0` / `ggml_vec_dot_q4_0_q8_0` for NEON.
//!
//! NEON itself is part of the aarch64 Linux baseline, so the float kernels need no detection.
//! Two instructions are written as `asm!`: `sdot`, because `vdotq_s32` is not stable, and the
//! f16 -> f32 conversions `fcvt`/`fcvtl`, because the f16 vector intrinsics were stabilised only
//! in Rust 1.94 and the workspace supports 1.89. Both conversions are base ARMv8 (not FEAT_FP16),
//! so every aarch64 CPU has them.

use std::arch::aarch64::*;
use std::arch::asm;

use super::{check_k, Kernels};
use crate::tensor::blocks::block32::{f16_at, quantize_row_q8_0, Q4_0_BYTES, Q8_0_BYTES};
use crate::tensor::blocks::kquant::{
    q4_k_scales_mins, Q4_K_BYTES, Q6_K_BYTES, Q8_K_BSUMS_AT, Q8_K_BYTES,
};

static DOTPROD: Kernels = Kernels {
    name: "aarch64 neon+dotprod",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0: dot_q8_0_q8_0_sdot,
    dot_q4_0_q8_0: dot_q4_0_q8_0_sdot,
    dot_q5_0_q8_0: super::scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: super::scalar::dot_iq4_nl_q8_0,
    dot_mxfp4_q8_0: super::scalar::dot_mxfp4_q8_0,
    gemm_q8_0: gemm_q8_0_sdot,
    gemm_q4_0: gemm_q4_0_sdot,
    gemm_iq4_nl: super::by_pairs!(super::scalar::dot_iq4_nl_q8_0),
    gemm_mxfp4: super::by_pairs!(super::scalar::dot_mxfp4_q8_0),
    // Activation quantization is cheap next to the products and stays bit-identical to ggml's
    // reference this way.
    quantize_q8_0: quantize_row_q8_0,
    dot_q2_k_q8_k: super::scalar::kquant::dot_q2_k_q8_k,
    dot_q3_k_q8_k: super::scalar::kquant::dot_q3_k_q8_k,
    dot_q4_k_q8_k: dot_q4_k_q8_k_sdot,
    dot_q5_k_q8_k: super::scalar::kquant::dot_q5_k_q8_k,
    dot_q6_k_q8_k: dot_q6_k_q8_k_sdot,
    dot_iq2_xxs_q8_k: super::scalar::iquant::dot_iq2_xxs_q8_k,
    dot_iq2_xs_q8_k: super::scalar::iquant::dot_iq2_xs_q8_k,
    dot_iq2_s_q8_k: super::scalar::iquant::dot_iq2_s_q8_k,
    dot_iq3_xxs_q8_k: super::scalar::iquant::dot_iq3_xxs_q8_k,
    dot_iq3_s_q8_k: super::scalar::iquant::dot_iq3_s_q8_k,
    dot_iq1_s_q8_k: super::scalar::iquant::dot_iq1_s_q8_k,
    dot_iq1_m_q8_k: super::scalar::iquant::dot_iq1_m_q8_k,
    dot_iq4_xs_q8_k: super::scalar::iquant::dot_iq4_xs_q8_k,
    gemm_q2_k: super::by_pairs!(super::scalar::kquant::dot_q2_k_q8_k),
    gemm_q3_k: super::by_pairs!(super::scalar::kquant::dot_q3_k_q8_k),
    gemm_q4_k: gemm_q4_k_sdot,
    gemm_q5_k: super::by_pairs!(super::scalar::kquant::dot_q5_k_q8_k),
    gemm_iq4_xs: super::by_pairs!(super::scalar::iquant::dot_iq4_xs_q8_k),
};

static NEON: Kernels = Kernels {
    name: "aarch64 neon",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0: dot_q8_0_q8_0_mull,
    dot_q4_0_q8_0: dot_q4_0_q8_0_mull,
    dot_q5_0_q8_0: super::scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: super::scalar::dot_iq4_nl_q8_0,
    dot_mxfp4_q8_0: super::scalar::dot_mxfp4_q8_0,
    gemm_q8_0: gemm_q8_0_mull,
    gemm_q4_0: gemm_q4_0_mull,
    gemm_iq4_nl: super::by_pairs!(super::scalar::dot_iq4_nl_q8_0),
    gemm_mxfp4: super::by_pairs!(super::scalar::dot_mxfp4_q8_0),
    quantize_q8_0: quantize_row_q8_0,
    dot_q2_k_q8_k: super::scalar::kquant::dot_q2_k_q8_k,
    dot_q3_k_q8_k: super::scalar::kquant::dot_q3_k_q8_k,
    dot_q4_k_q8_k: dot_q4_k_q8_k_mull,
    dot_q5_k_q8_k: super::scalar::kquant::dot_q5_k_q8_k,
    dot_q6_k_q8_k: dot_q6_k_q8_k_mull,
    dot_iq2_xxs_q8_k: super::scalar::iquant::dot_iq2_xxs_q8_k,
    dot_iq2_xs_q8_k: super::scalar::iquant::dot_iq2_xs_q8_k,
    dot_iq2_s_q8_k: super::scalar::iquant::dot_iq2_s_q8_k,
    dot_iq3_xxs_q8_k: super::scalar::iquant::dot_iq3_xxs_q8_k,
    dot_iq3_s_q8_k: super::scalar::iquant::dot_iq3_s_q8_k,
    dot_iq1_s_q8_k: super::scalar::iquant::dot_iq1_s_q8_k,
    dot_iq1_m_q8_k: super::scalar::iquant::dot_iq1_m_q8_k,
    dot_iq4_xs_q8_k: super::scalar::iquant::dot_iq4_xs_q8_k,
    gemm_q2_k: super::by_pairs!(super::scalar::kquant::dot_q2_k_q8_k),
    gemm_q3_k: super::by_pairs!(super::scalar::kquant::dot_q3_k_q8_k),
    gemm_q4_k: gemm_q4_k_mull,
    gemm_q5_k: super::by_pairs!(super::scalar::kquant::dot_q5_k_q8_k),
    gemm_iq4_xs: super::by_pairs!(super::scalar::iquant::dot_iq4_xs_q8_k),
};

/// Every NEON table this CPU can run, fastest first (the tests run them all).
pub fn tables() -> impl Iterator<Item = &'static Kernels> {
    let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
    dotprod
        .then_some(&DOTPROD)
        .into_iter()
        .chain(std::iter::once(&NEON))
}

/// The fastest NEON table this CPU can run; always `Some`, since NEON is baseline on aarch64.
pub fn table() -> Option<&'static Kernels> {
    tables().next()
}

// Matrix products pair by pair with each table's own dot kernels (bit-identical to them).
fn gemm_q8_0_sdot(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q8_0_q8_0_sdot, w, rows, x, n, out);
}

fn gemm_q4_0_sdot(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q4_0_q8_0_sdot, w, rows, x, n, out);
}

fn gemm_q8_0_mull(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q8_0_q8_0_mull, w, rows, x, n, out);
}

fn gemm_q4_0_mull(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q4_0_q8_0_mull, w, rows, x, n, out);
}

fn gemm_q4_k_sdot(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q4_k_q8_k_sdot, w, rows, x, n, out);
}

fn gemm_q4_k_mull(w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    super::gemm_by_pairs(dot_q4_k_q8_k_mull, w, rows, x, n, out);
}

// The safe wrappers check the lengths the `unsafe` loops rely on. The `sdot` ones are reachable
// only through `DOTPROD`, which `tables()` hands out only after detecting the feature.

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: NEON is baseline on aarch64; lengths checked above.
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

fn check_q8_0(w: &[u8], x: &[u8]) {
    assert_eq!(w.len(), x.len());
    assert_eq!(w.len() % Q8_0_BYTES, 0);
}

fn check_q4_0(w: &[u8], x: &[u8]) {
    assert_eq!(w.len() / Q4_0_BYTES, x.len() / Q8_0_BYTES);
    assert_eq!(w.len() % Q4_0_BYTES, 0);
}

fn dot_q8_0_q8_0_sdot(w: &[u8], x: &[u8]) -> f32 {
    check_q8_0(w, x);
    // SAFETY: dotprod detected before this table was chosen; lengths checked above.
    unsafe { dot_q8_0_q8_0_impl_sdot(w, x) }
}

fn dot_q4_0_q8_0_sdot(w: &[u8], x: &[u8]) -> f32 {
    check_q4_0(w, x);
    // SAFETY: as above.
    unsafe { dot_q4_0_q8_0_impl_sdot(w, x) }
}

fn dot_q8_0_q8_0_mull(w: &[u8], x: &[u8]) -> f32 {
    check_q8_0(w, x);
    // SAFETY: NEON is baseline on aarch64; lengths checked above.
    unsafe { dot_q8_0_q8_0_impl_mull(w, x) }
}

fn dot_q4_0_q8_0_mull(w: &[u8], x: &[u8]) -> f32 {
    check_q4_0(w, x);
    // SAFETY: as above.
    unsafe { dot_q4_0_q8_0_impl_mull(w, x) }
}

#[target_feature(enable = "neon")]
unsafe fn dot_f32_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Four accumulators keep the FMA pipes busy despite each FMA's latency.
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (k, acc_k) in acc.iter_mut().enumerate() {
            let va = vld1q_f32(pa.add(i + 4 * k));
            let vb = vld1q_f32(pb.add(i + 4 * k));
            *acc_k = vfmaq_f32(*acc_k, va, vb);
        }
        i += 16;
    }
    while i + 4 <= n {
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
        i += 4;
    }
    let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
    let mut sum = vaddvq_f32(v);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// Eight f16 values (as bits) widened to f32, low four and high four.
#[inline(always)]
unsafe fn f16x8_to_f32(v: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let lo: float32x4_t;
    let hi: float32x4_t;
    asm!(
        "fcvtl {lo:v}.4s, {v:v}.4h",
        "fcvtl2 {hi:v}.4s, {v:v}.8h",
        lo = out(vreg) lo,
        hi = lateout(vreg) hi,
        v = in(vreg) v,
        options(pure, nomem, nostack, preserves_flags),
    );
    (lo, hi)
}

/// The little-endian f16 at `p` (unaligned), converted in a register instead of a call out to
/// the `half` crate, which would dominate the per-block work.
#[inline(always)]
unsafe fn f16_scale(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]) as i16;
    let out: f32;
    asm!(
        "fcvt {out:s}, {bits:h}",
        out = lateout(vreg) out,
        bits = in(vreg) bits,
        options(pure, nomem, nostack, preserves_flags),
    );
    out
}

/// Eight 16-bit values from unaligned bytes: loading bytes and reinterpreting avoids assuming the
/// row is 2-byte aligned.
#[inline(always)]
unsafe fn load_u16x8(p: *const u8) -> uint16x8_t {
    vreinterpretq_u16_u8(vld1q_u8(p))
}

#[target_feature(enable = "neon")]
unsafe fn dot_f16_impl(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        let (w0, w1) = f16x8_to_f32(load_u16x8(pw.add(2 * i)));
        let (w2, w3) = f16x8_to_f32(load_u16x8(pw.add(2 * i + 16)));
        acc[0] = vfmaq_f32(acc[0], w0, vld1q_f32(px.add(i)));
        acc[1] = vfmaq_f32(acc[1], w1, vld1q_f32(px.add(i + 4)));
        acc[2] = vfmaq_f32(acc[2], w2, vld1q_f32(px.add(i + 8)));
        acc[3] = vfmaq_f32(acc[3], w3, vld1q_f32(px.add(i + 12)));
        i += 16;
    }
    if i + 8 <= n {
        let (w0, w1) = f16x8_to_f32(load_u16x8(pw.add(2 * i)));
        acc[0] = vfmaq_f32(acc[0], w0, vld1q_f32(px.add(i)));
        acc[1] = vfmaq_f32(acc[1], w1, vld1q_f32(px.add(i + 4)));
        i += 8;
    }
    let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
    let mut sum = vaddvq_f32(v);
    while i < n {
        sum += f16_at(w, 2 * i) * x[i];
        i += 1;
    }
    sum
}

fn axpy_f16(a: f32, v: &[u8], out: &mut [f32]) {
    assert!(v.len() >= 2 * out.len());
    // SAFETY: NEON is baseline on aarch64; lengths checked above.
    unsafe { axpy_f16_impl(a, v, out) }
}

#[target_feature(enable = "neon")]
unsafe fn axpy_f16_impl(a: f32, v: &[u8], out: &mut [f32]) {
    let n = out.len();
    let (pv, po) = (v.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let (x0, x1) = f16x8_to_f32(load_u16x8(pv.add(2 * i)));
        vst1q_f32(po.add(i), vfmaq_n_f32(vld1q_f32(po.add(i)), x0, a));
        vst1q_f32(po.add(i + 4), vfmaq_n_f32(vld1q_f32(po.add(i + 4)), x1, a));
        i += 8;
    }
    while i < n {
        out[i] += a * f16_at(v, 2 * i);
        i += 1;
    }
}

#[target_feature(enable = "neon")]
unsafe fn dot_bf16_impl(w: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc0 = vdupq_n_f32(0.0);
    let mut acc1 = vdupq_n_f32(0.0);
    let mut i = 0;
    while i + 8 <= n {
        // bf16 is the top half of an f32: widen and shift into place in one instruction.
        let bits = load_u16x8(pw.add(2 * i));
        let w0 = vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(bits)));
        let w1 = vreinterpretq_f32_u32(vshll_high_n_u16::<16>(bits));
        acc0 = vfmaq_f32(acc0, w0, vld1q_f32(px.add(i)));
        acc1 = vfmaq_f32(acc1, w1, vld1q_f32(px.add(i + 4)));
        i += 8;
    }
    let mut sum = vaddvq_f32(vaddq_f32(acc0, acc1));
    while i < n {
        let b = u16::from_le_bytes([w[2 * i], w[2 * i + 1]]);
        sum += half::bf16::from_bits(b).to_f32() * x[i];
        i += 1;
    }
    sum
}

#[inline(always)]
unsafe fn load_i8x16(p: *const u8) -> int8x16_t {
    vld1q_s8(p as *const i8)
}

/// `acc` plus the sums of each group of four adjacent byte products.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// Sums of byte products in four i32 lanes, without `sdot`. Each i16 product is exact (at most
/// (-128)^2 = 16384), but two of them may not fit an i16, so they are widened before any addition.
#[inline(always)]
unsafe fn mull_sum(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vpadalq_s16(vpaddlq_s16(lo), hi)
}

/// How 32 byte products are summed: the one difference between the two tables.
trait I8Dot {
    /// Sum over both halves of `w[h][i] * x[h][i]`, spread over four i32 lanes.
    unsafe fn dot32(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t;
    /// Sum of `w[i] * x[i]` over 16 bytes, spread over four i32 lanes.
    unsafe fn dot16(w: int8x16_t, x: int8x16_t) -> int32x4_t;
}

struct Sdot;

impl I8Dot for Sdot {
    #[inline(always)]
    unsafe fn dot32(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        sdot(sdot(vdupq_n_s32(0), w[0], x[0]), w[1], x[1])
    }
    #[inline(always)]
    unsafe fn dot16(w: int8x16_t, x: int8x16_t) -> int32x4_t {
        sdot(vdupq_n_s32(0), w, x)
    }
}

struct Mull;

impl I8Dot for Mull {
    #[inline(always)]
    unsafe fn dot32(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        vaddq_s32(mull_sum(w[0], x[0]), mull_sum(w[1], x[1]))
    }
    #[inline(always)]
    unsafe fn dot16(w: int8x16_t, x: int8x16_t) -> int32x4_t {
        mull_sum(w, x)
    }
}

/// The 32 signed values of the Q8_0 block at `p`.
#[inline(always)]
unsafe fn q8_0_values(p: *const u8) -> [int8x16_t; 2] {
    [load_i8x16(p.add(2)), load_i8x16(p.add(18))]
}

/// The 32 values of the Q4_0 block at `p`, as signed bytes: values 0..16 from the low nibbles,
/// 16..32 from the high ones, which is the order of the Q8_0 block they are dotted with.
#[inline(always)]
unsafe fn q4_0_values(p: *const u8) -> [int8x16_t; 2] {
    let packed = vld1q_u8(p.add(2));
    let eight = vdupq_n_s8(8);
    let lo = vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0f)));
    let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed));
    [vsubq_s8(lo, eight), vsubq_s8(hi, eight)]
}

/// `acc` plus block `b` of `w` (Q4_0 if `Q4`, else Q8_0) dotted with block `b` of the Q8_0 `x`,
/// scaled by both block scales.
#[inline(always)]
unsafe fn block_step<D: I8Dot, const Q4: bool>(
    acc: float32x4_t,
    pw: *const u8,
    px: *const u8,
    b: usize,
) -> float32x4_t {
    let xb = px.add(b * Q8_0_BYTES);
    let (wb, qw) = if Q4 {
        let wb = pw.add(b * Q4_0_BYTES);
        (wb, q4_0_values(wb))
    } else {
        let wb = pw.add(b * Q8_0_BYTES);
        (wb, q8_0_values(wb))
    };
    let d = f16_scale(wb) * f16_scale(xb);
    vfmaq_n_f32(acc, vcvtq_f32_s32(D::dot32(qw, q8_0_values(xb))), d)
}

/// Whole blocks of `w` against the Q8_0 blocks of `x`. Two blocks per step into two
/// accumulators, as ggml does, so consecutive blocks' multiply-adds do not wait on each other.
/// Always inlined, so the body is compiled under the caller's target features.
#[inline(always)]
unsafe fn dot_blocks<D: I8Dot, const Q4: bool>(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / if Q4 { Q4_0_BYTES } else { Q8_0_BYTES };
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc0 = vdupq_n_f32(0.0);
    let mut acc1 = vdupq_n_f32(0.0);
    let mut b = 0;
    while b + 2 <= nb {
        acc0 = block_step::<D, Q4>(acc0, pw, px, b);
        acc1 = block_step::<D, Q4>(acc1, pw, px, b + 1);
        b += 2;
    }
    if b < nb {
        acc0 = block_step::<D, Q4>(acc0, pw, px, b);
    }
    vaddvq_f32(vaddq_f32(acc0, acc1))
}

#[target_feature(enable = "dotprod")]
unsafe fn dot_q8_0_q8_0_impl_sdot(w: &[u8], x: &[u8]) -> f32 {
    dot_blocks::<Sdot, false>(w, x)
}

#[target_feature(enable = "dotprod")]
unsafe fn dot_q4_0_q8_0_impl_sdot(w: &[u8], x: &[u8]) -> f32 {
    dot_blocks::<Sdot, true>(w, x)
}

#[target_feature(enable = "neon")]
unsafe fn dot_q8_0_q8_0_impl_mull(w: &[u8], x: &[u8]) -> f32 {
    dot_blocks::<Mull, false>(w, x)
}

#[target_feature(enable = "neon")]
unsafe fn dot_q4_0_q8_0_impl_mull(w: &[u8], x: &[u8]) -> f32 {
    dot_blocks::<Mull, true>(w, x)
}

// K-quants: ggml's NEON `ggml_vec_dot_q4_K_q8_K` / `ggml_vec_dot_q6_K_q8_K` (its `ggml_vdotq_s32`
// is `sdot` with dotprod and the widening sum otherwise, as here). The integer sums are exact, and
// both tables take the same float steps, so they agree bit for bit.

fn dot_q4_k_q8_k_sdot(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, Q4_K_BYTES, x);
    // SAFETY: dotprod detected before this table was chosen; lengths checked above.
    unsafe { dot_q4_k_q8_k_impl_sdot(w, x) }
}

fn dot_q6_k_q8_k_sdot(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, Q6_K_BYTES, x);
    // SAFETY: as above.
    unsafe { dot_q6_k_q8_k_impl_sdot(w, x) }
}

fn dot_q4_k_q8_k_mull(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, Q4_K_BYTES, x);
    // SAFETY: NEON is baseline on aarch64; lengths checked above.
    unsafe { dot_q4_k_q8_k_impl_mull(w, x) }
}

fn dot_q6_k_q8_k_mull(w: &[u8], x: &[u8]) -> f32 {
    check_k(w, Q6_K_BYTES, x);
    // SAFETY: as above.
    unsafe { dot_q6_k_q8_k_impl_mull(w, x) }
}

#[target_feature(enable = "dotprod")]
unsafe fn dot_q4_k_q8_k_impl_sdot(w: &[u8], x: &[u8]) -> f32 {
    dot_q4_k::<Sdot>(w, x)
}

#[target_feature(enable = "dotprod")]
unsafe fn dot_q6_k_q8_k_impl_sdot(w: &[u8], x: &[u8]) -> f32 {
    dot_q6_k::<Sdot>(w, x)
}

#[target_feature(enable = "neon")]
unsafe fn dot_q4_k_q8_k_impl_mull(w: &[u8], x: &[u8]) -> f32 {
    dot_q4_k::<Mull>(w, x)
}

#[target_feature(enable = "neon")]
unsafe fn dot_q6_k_q8_k_impl_mull(w: &[u8], x: &[u8]) -> f32 {
    dot_q6_k::<Mull>(w, x)
}

#[inline(always)]
unsafe fn f32_at(p: *const u8) -> f32 {
    f32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)])
}

/// Eight i16 from unaligned little-endian bytes.
#[inline(always)]
unsafe fn load_i16x8(p: *const u8) -> int16x8_t {
    vreinterpretq_s16_u8(vld1q_u8(p))
}

/// Per 32-value sub-block: the nibbles (0..=15, so signed bytes) dotted with the activations,
/// times the 6-bit scale; the minimum term is the 6-bit mins times the sums of each sub-block's
/// activations (pairs of the Q8_K 16-value sums).
#[inline(always)]
unsafe fn dot_q4_k<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q4_K_BYTES;
    let m4 = vdupq_n_u8(0x0f);
    let mut sumf = 0f32;
    for i in 0..nb {
        let wb = w.as_ptr().add(i * Q4_K_BYTES);
        let xb = x.as_ptr().add(i * Q8_K_BYTES);
        let dy = f32_at(xb);
        let d = dy * f16_scale(wb);
        let dmin = dy * f16_scale(wb.add(2));

        let bsums = xb.add(Q8_K_BSUMS_AT);
        let q8sums = vpaddq_s16(load_i16x8(bsums), load_i16x8(bsums.add(16)));
        let (sc, mn) = q4_k_scales_mins(&w[i * Q4_K_BYTES + 4..i * Q4_K_BYTES + 16]);
        let mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(mn.as_ptr())));
        let prod = vaddq_s32(
            vmull_s16(vget_low_s16(q8sums), vget_low_s16(mins)),
            vmull_high_s16(q8sums, mins),
        );
        sumf -= dmin * vaddvq_s32(prod) as f32;

        let (mut sumi1, mut sumi2) = (0i32, 0i32);
        for j in 0..4 {
            let q4 = wb.add(16 + 32 * j);
            let bits = [vld1q_u8(q4), vld1q_u8(q4.add(16))];
            let q8 = xb.add(4 + 64 * j);
            let lo = [
                vreinterpretq_s8_u8(vandq_u8(bits[0], m4)),
                vreinterpretq_s8_u8(vandq_u8(bits[1], m4)),
            ];
            let p1 = D::dot32(lo, [load_i8x16(q8), load_i8x16(q8.add(16))]);
            sumi1 += vaddvq_s32(p1) * sc[2 * j] as i32;
            let hi = [
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(bits[0])),
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(bits[1])),
            ];
            let p2 = D::dot32(hi, [load_i8x16(q8.add(32)), load_i8x16(q8.add(48))]);
            sumi2 += vaddvq_s32(p2) * sc[2 * j + 1] as i32;
        }
        sumf += d * (sumi1 + sumi2) as f32;
    }
    sumf
}

/// Per 16 values: the 6-bit values unsigned (0..=63, so signed bytes) dotted with the activations,
/// times the signed scale; the offset of 32 is taken off once per block as
/// 32 * sum(scale * Q8_K 16-value sum).
#[inline(always)]
unsafe fn dot_q6_k<D: I8Dot>(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q6_K_BYTES;
    let m4 = vdupq_n_u8(0x0f);
    let m3 = vdupq_n_u8(3);
    let mut sum = 0f32;
    for i in 0..nb {
        let wb = w.as_ptr().add(i * Q6_K_BYTES);
        let xb = x.as_ptr().add(i * Q8_K_BYTES);
        let d_all = f16_scale(wb.add(208));

        let bsums = xb.add(Q8_K_BSUMS_AT);
        let q8sums = [load_i16x8(bsums), load_i16x8(bsums.add(16))];
        let scales = load_i8x16(wb.add(192));
        let q6scales = [vmovl_s8(vget_low_s8(scales)), vmovl_high_s8(scales)];
        let prod = vaddq_s32(
            vaddq_s32(
                vmull_s16(vget_low_s16(q8sums[0]), vget_low_s16(q6scales[0])),
                vmull_high_s16(q8sums[0], q6scales[0]),
            ),
            vaddq_s32(
                vmull_s16(vget_low_s16(q8sums[1]), vget_low_s16(q6scales[1])),
                vmull_high_s16(q8sums[1], q6scales[1]),
            ),
        );
        let isum_mins = vaddvq_s32(prod);

        let mut isum = 0i32;
        for half in 0..2 {
            let ql = wb.add(64 * half);
            let qh = wb.add(128 + 32 * half);
            let qhbits = [vld1q_u8(qh), vld1q_u8(qh.add(16))];
            let q6bits = [
                vld1q_u8(ql),
                vld1q_u8(ql.add(16)),
                vld1q_u8(ql.add(32)),
                vld1q_u8(ql.add(48)),
            ];
            let scale = wb.add(192 + 8 * half) as *const i8;
            let q8 = xb.add(4 + 128 * half);
            // Four 32-value chunks, each as two halves of 16 with their own scale: chunk k takes
            // the low (k < 2) or high (k >= 2) nibbles of ql bytes 32 * (k % 2)..+32 and bits
            // 2k..2k+2 of qh.
            for k in 0..4 {
                for h in 0..2 {
                    let bits = q6bits[2 * (k % 2) + h];
                    let low = if k < 2 {
                        vandq_u8(bits, m4)
                    } else {
                        vshrq_n_u8::<4>(bits)
                    };
                    let high = match k {
                        0 => vandq_u8(qhbits[h], m3),
                        1 => vandq_u8(vshrq_n_u8::<2>(qhbits[h]), m3),
                        2 => vandq_u8(vshrq_n_u8::<4>(qhbits[h]), m3),
                        _ => vshrq_n_u8::<6>(qhbits[h]),
                    };
                    let q6 = vreinterpretq_s8_u8(vorrq_u8(low, vshlq_n_u8::<4>(high)));
                    let p = D::dot16(q6, load_i8x16(q8.add(32 * k + 16 * h)));
                    isum += vaddvq_s32(p) * *scale.add(2 * k + h) as i32;
                }
            }
        }
        sum += d_all * f32_at(xb) * (isum - 32 * isum_mins) as f32;
    }
    sum
}
