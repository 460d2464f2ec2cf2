//! aarch64 NEON kernels, in two tables because one binary must serve both kinds of board: with
//! the dot-product extension (Pi 5's Cortex-A76) the integer kernels use `sdot`; without it
//! (Pi 4's Cortex-A72, Pi Zero 2 W's Cortex-A53) they widen with `smull` and add pairwise. The
//! integer kernels follow ggml's NEON `ggml_vec_dot_*`; each is written once, generic over
//! [`I8Dot`], and instantiated for both tables. Their integer sums are exact; the k-quant and
//! i-quant kernels reduce them to one integer per block before the same float steps in both
//! tables, so those agree bit for bit. Files by format family:
//! `block32` (Q8_0, Q4_0, IQ4_NL, MXFP4), `kquant`, `iquant` (IQ4_XS and the grid i-quants);
//! `rows4` (Q8_0/Q4_0 rows packed four at a time), `ktiles` and `ktiles_low` (k-quant rows four
//! at a time in the file's layout) are the `sdot` table's matrix products.
//!
//! NEON itself is part of the aarch64 Linux baseline, so the float kernels need no detection.
//! Two instructions are written as `asm!`: `sdot`, because `vdotq_s32` is not stable, and the
//! f16 -> f32 conversions `fcvt`/`fcvtl`, because the f16 vector intrinsics were stabilised only
//! in Rust 1.94 and the workspace supports 1.89. Both conversions are base ARMv8 (not FEAT_FP16),
//! so every aarch64 CPU has them.

use std::arch::aarch64::*;
use std::arch::asm;

mod block32;
mod iquant;
mod kquant;
mod ktiles;
mod ktiles_low;
mod rows4;

use super::{by_pairs, grid, scalar, Kernels};
use crate::tensor::blocks::block32::{f16_at, quantize_row_q8_0};
use crate::tensor::blocks::kquant::quantize_row_q8_k;

// The 32-value formats' matrix products are tiled (`block32::gemm`), and with `sdot` those of
// the k-quants too (`ktiles`, `ktiles_low`); the others are each table's dot kernels pair by
// pair. All are bit-identical to the dot pair by pair.
static DOTPROD: Kernels = Kernels {
    name: "aarch64 neon+dotprod",
    isa: "dotprod",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0: dot::<Sdot, block32::Q8_0>,
    dot_q4_0_q8_0: dot::<Sdot, block32::Q4_0>,
    dot_q5_0_q8_0: scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: dot::<Sdot, block32::Iq4Nl>,
    dot_mxfp4_q8_0: dot::<Sdot, block32::Mxfp4>,
    gemm_q8_0: block32::gemm::<Sdot, block32::Q8_0>,
    gemm_q4_0: block32::gemm::<Sdot, block32::Q4_0>,
    gemm_iq4_nl: block32::gemm::<Sdot, block32::Iq4Nl>,
    gemm_mxfp4: block32::gemm::<Sdot, block32::Mxfp4>,
    // Activation quantization is cheap next to the products and stays bit-identical to ggml's
    // reference this way.
    quantize_q8_0: quantize_row_q8_0,
    quantize_q8_k: quantize_row_q8_k,
    dot_q2_k_q8_k: dot::<Sdot, kquant::Q2K>,
    dot_q3_k_q8_k: dot::<Sdot, kquant::Q3K>,
    dot_q4_k_q8_k: dot::<Sdot, kquant::Q4K>,
    dot_q5_k_q8_k: dot::<Sdot, kquant::Q5K>,
    dot_q6_k_q8_k: dot::<Sdot, kquant::Q6K>,
    dot_iq2_xxs_q8_k: dot::<Sdot, iquant::Grid<grid::Iq2Xxs>>,
    dot_iq2_xs_q8_k: dot::<Sdot, iquant::Grid<grid::Iq2Xs>>,
    dot_iq2_s_q8_k: dot::<Sdot, iquant::Grid<grid::Iq2S>>,
    dot_iq3_xxs_q8_k: dot::<Sdot, iquant::Grid<grid::Iq3Xxs>>,
    dot_iq3_s_q8_k: dot::<Sdot, iquant::Grid<grid::Iq3S>>,
    dot_iq1_s_q8_k: dot::<Sdot, iquant::Grid<grid::Iq1S>>,
    dot_iq1_m_q8_k: dot::<Sdot, iquant::Grid<grid::Iq1M>>,
    dot_iq4_xs_q8_k: dot::<Sdot, iquant::Iq4Xs>,
    gemm_q2_k: ktiles::gemm::<ktiles_low::Q2K>,
    gemm_q3_k: ktiles::gemm::<ktiles_low::Q3K>,
    gemm_q4_k: ktiles::gemm::<ktiles::Q4K>,
    gemm_q5_k: ktiles::gemm::<ktiles::Q5K>,
    gemm_q6_k: ktiles::gemm::<ktiles::Q6K>,
    gemm_iq4_xs: by_pairs!(dot::<Sdot, iquant::Iq4Xs>),
    gemm_q8_0_rows4: Some(rows4::gemm::<rows4::Q8_0x4>),
    gemm_q4_0_rows4: Some(rows4::gemm::<rows4::Q4_0x4>),
};

static NEON: Kernels = Kernels {
    name: "aarch64 neon",
    isa: "neon",
    dot_f32,
    dot_f16,
    dot_bf16,
    axpy_f16,
    dot_q8_0_q8_0: dot::<Mull, block32::Q8_0>,
    dot_q4_0_q8_0: dot::<Mull, block32::Q4_0>,
    dot_q5_0_q8_0: scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: dot::<Mull, block32::Iq4Nl>,
    dot_mxfp4_q8_0: dot::<Mull, block32::Mxfp4>,
    gemm_q8_0: block32::gemm::<Mull, block32::Q8_0>,
    gemm_q4_0: block32::gemm::<Mull, block32::Q4_0>,
    gemm_iq4_nl: block32::gemm::<Mull, block32::Iq4Nl>,
    gemm_mxfp4: block32::gemm::<Mull, block32::Mxfp4>,
    // Activation quantization is cheap next to the products and stays bit-identical to ggml's
    // reference this way.
    quantize_q8_0: quantize_row_q8_0,
    quantize_q8_k: quantize_row_q8_k,
    dot_q2_k_q8_k: dot::<Mull, kquant::Q2K>,
    dot_q3_k_q8_k: dot::<Mull, kquant::Q3K>,
    dot_q4_k_q8_k: dot::<Mull, kquant::Q4K>,
    dot_q5_k_q8_k: dot::<Mull, kquant::Q5K>,
    dot_q6_k_q8_k: dot::<Mull, kquant::Q6K>,
    dot_iq2_xxs_q8_k: dot::<Mull, iquant::Grid<grid::Iq2Xxs>>,
    dot_iq2_xs_q8_k: dot::<Mull, iquant::Grid<grid::Iq2Xs>>,
    dot_iq2_s_q8_k: dot::<Mull, iquant::Grid<grid::Iq2S>>,
    dot_iq3_xxs_q8_k: dot::<Mull, iquant::Grid<grid::Iq3Xxs>>,
    dot_iq3_s_q8_k: dot::<Mull, iquant::Grid<grid::Iq3S>>,
    dot_iq1_s_q8_k: dot::<Mull, iquant::Grid<grid::Iq1S>>,
    dot_iq1_m_q8_k: dot::<Mull, iquant::Grid<grid::Iq1M>>,
    dot_iq4_xs_q8_k: dot::<Mull, iquant::Iq4Xs>,
    gemm_q2_k: by_pairs!(dot::<Mull, kquant::Q2K>),
    gemm_q3_k: by_pairs!(dot::<Mull, kquant::Q3K>),
    gemm_q4_k: by_pairs!(dot::<Mull, kquant::Q4K>),
    gemm_q5_k: by_pairs!(dot::<Mull, kquant::Q5K>),
    gemm_q6_k: by_pairs!(dot::<Mull, kquant::Q6K>),
    gemm_iq4_xs: by_pairs!(dot::<Mull, iquant::Iq4Xs>),
    // Without `sdot` by lane, packing saves nothing over the file layout's 4-row tiles.
    gemm_q8_0_rows4: None,
    gemm_q4_0_rows4: None,
};

/// Every NEON table this CPU can run, fastest first (the tests run them all).
pub fn tables() -> impl Iterator<Item = &'static Kernels> {
    let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
    dotprod
        .then_some(&DOTPROD)
        .into_iter()
        .chain(std::iter::once(&NEON))
}

/// A quantized weight format's dot product with its activation format, generic over how byte
/// products are summed.
trait QuantDot {
    /// Bytes of one weight block.
    const W_BYTES: usize;
    /// Bytes of the activation block each weight block is dotted with.
    const X_BYTES: usize;
    /// Whole blocks of `w` against as many blocks of `x` (checked by [`dot`]). Always inlined,
    /// so the body is compiled under the caller's target features.
    unsafe fn dot<D: I8Dot>(w: &[u8], x: &[u8]) -> f32;
}

/// The table entry of format `K` with products summed by `D`. The `Sdot` instances are
/// reachable only through `DOTPROD`, which `tables()` hands out only after detecting the
/// feature.
fn dot<D: I8Dot, K: QuantDot>(w: &[u8], x: &[u8]) -> f32 {
    assert_eq!(w.len() % K::W_BYTES, 0, "whole weight blocks");
    assert_eq!(
        w.len() / K::W_BYTES * K::X_BYTES,
        x.len(),
        "one activation block per weight block"
    );
    // SAFETY: lengths checked above; the `Sdot` instances are only in `DOTPROD` (see above).
    unsafe { D::run::<K>(w, x) }
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

/// Four f16 values (as bits) widened to f32.
#[inline(always)]
unsafe fn f16x4_to_f32(v: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    asm!(
        "fcvtl {out:v}.4s, {v:v}.4h",
        out = lateout(vreg) out,
        v = in(vreg) v,
        options(pure, nomem, nostack, preserves_flags),
    );
    out
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
trait I8Dot: Sized {
    /// `K::dot::<Self>` compiled with the CPU features `Self` needs.
    unsafe fn run<K: QuantDot>(w: &[u8], x: &[u8]) -> f32;
    /// Sum over both halves of `w[h][i] * x[h][i]`, spread over four i32 lanes.
    unsafe fn dot32(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t;
    /// Sum of `w[i] * x[i]` over 16 bytes, spread over four i32 lanes.
    unsafe fn dot16(w: int8x16_t, x: int8x16_t) -> int32x4_t;
    /// [`block32::gemm_tiles`] compiled with the CPU features `Self` needs.
    unsafe fn gemm32<B: block32::Block32>(
        w: *const u8,
        rows: usize,
        x: *const u8,
        n: usize,
        nb: usize,
        out: *mut f32,
    );
}

struct Sdot;

impl I8Dot for Sdot {
    #[inline(always)]
    unsafe fn run<K: QuantDot>(w: &[u8], x: &[u8]) -> f32 {
        run_sdot::<K>(w, x)
    }
    #[inline(always)]
    unsafe fn dot32(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        sdot(sdot(vdupq_n_s32(0), w[0], x[0]), w[1], x[1])
    }
    #[inline(always)]
    unsafe fn dot16(w: int8x16_t, x: int8x16_t) -> int32x4_t {
        sdot(vdupq_n_s32(0), w, x)
    }
    #[inline(always)]
    unsafe fn gemm32<B: block32::Block32>(
        w: *const u8,
        rows: usize,
        x: *const u8,
        n: usize,
        nb: usize,
        out: *mut f32,
    ) {
        gemm32_sdot::<B>(w, rows, x, n, nb, out)
    }
}

struct Mull;

impl I8Dot for Mull {
    #[inline(always)]
    unsafe fn run<K: QuantDot>(w: &[u8], x: &[u8]) -> f32 {
        run_mull::<K>(w, x)
    }
    #[inline(always)]
    unsafe fn dot32(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
        vaddq_s32(mull_sum(w[0], x[0]), mull_sum(w[1], x[1]))
    }
    #[inline(always)]
    unsafe fn dot16(w: int8x16_t, x: int8x16_t) -> int32x4_t {
        mull_sum(w, x)
    }
    #[inline(always)]
    unsafe fn gemm32<B: block32::Block32>(
        w: *const u8,
        rows: usize,
        x: *const u8,
        n: usize,
        nb: usize,
        out: *mut f32,
    ) {
        gemm32_mull::<B>(w, rows, x, n, nb, out)
    }
}

#[target_feature(enable = "dotprod")]
unsafe fn run_sdot<K: QuantDot>(w: &[u8], x: &[u8]) -> f32 {
    K::dot::<Sdot>(w, x)
}

#[target_feature(enable = "neon")]
unsafe fn run_mull<K: QuantDot>(w: &[u8], x: &[u8]) -> f32 {
    K::dot::<Mull>(w, x)
}

#[target_feature(enable = "dotprod")]
unsafe fn gemm32_sdot<B: block32::Block32>(
    w: *const u8,
    rows: usize,
    x: *const u8,
    n: usize,
    nb: usize,
    out: *mut f32,
) {
    block32::gemm_tiles::<Sdot, B>(w, rows, x, n, nb, out)
}

#[target_feature(enable = "neon")]
unsafe fn gemm32_mull<B: block32::Block32>(
    w: *const u8,
    rows: usize,
    x: *const u8,
    n: usize,
    nb: usize,
    out: *mut f32,
) {
    block32::gemm_tiles::<Mull, B>(w, rows, x, n, nb, out)
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
