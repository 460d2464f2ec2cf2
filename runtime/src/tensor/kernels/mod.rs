//! Dot-product kernels behind one function table. `scalar` is the reference; SIMD tables are
//! chosen at run time from the CPU's features and tested against it (`tests`).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod grid;
#[cfg(test)]
mod ktiles_tests;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod quantize_tests;
#[cfg(test)]
mod rows4_tests;
pub mod scalar;
#[cfg(test)]
pub(crate) mod tests;

use std::sync::OnceLock;

use crate::gguf::GgmlType;
use crate::tensor::blocks::block32::quantize_row_q8_0;
use crate::tensor::blocks::kquant::quantize_row_q8_k;
#[cfg(target_arch = "x86_64")]
use crate::tensor::blocks::kquant::Q8_K_BYTES;

/// Kept where benchmarks and tests have always found it.
pub use crate::tensor::random::random_vec;

/// A weight row (raw bytes of its GGML type) dotted with an activation row (raw bytes of the
/// type's activation format).
pub type Dot = fn(&[u8], &[u8]) -> f32;

/// The kernels one CPU path provides. Weight rows are raw bytes of their GGML type; activations
/// are f32 for float weights, Q8_0 blocks for the 32-value formats and Q8_K blocks for the
/// k-quants and i-quants (ggml's `vec_dot_type` of each).
pub struct Kernels {
    /// Shown at start-up and in benchmarks, e.g. "scalar" or "x86_64 avx2+fma".
    pub name: &'static str,
    /// The table's level in [`ISA_LEVELS`], the name `MOE_EDGE_ISA` caps it by.
    pub isa: &'static str,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub dot_f16: fn(&[u8], &[f32]) -> f32,
    pub dot_bf16: fn(&[u8], &[f32]) -> f32,
    /// `out += a * v` for a row `v` of f16 values (attention's weighted sum over an f16 KV cache).
    pub axpy_f16: fn(f32, &[u8], &mut [f32]),
    pub dot_q8_0_q8_0: Dot,
    pub dot_q4_0_q8_0: Dot,
    /// Q5_0 weights (only in files other tools wrote, for a few tensors): the scalar product on
    /// every CPU.
    pub dot_q5_0_q8_0: Dot,
    /// IQ4_NL weights (`ggml_vec_dot_iq4_nl_q8_0`): 4-bit indices into 16 non-linear levels.
    pub dot_iq4_nl_q8_0: Dot,
    /// MXFP4 weights (`ggml_vec_dot_mxfp4_q8_0`): E2M1 values with a power-of-two block scale.
    pub dot_mxfp4_q8_0: Dot,
    /// `out[r * n + t] = w_r . x_t` for `rows` Q8_0 weight rows (`w`, rows back to back) and `n`
    /// Q8_0 activation rows (`x`): a matrix product tiled so that each loaded weight block serves
    /// several tokens and each activation block several rows. Every output value equals the
    /// table's `dot_q8_0_q8_0` of its pair bit for bit, whatever the tile shape.
    pub gemm_q8_0: Gemm,
    /// The same for Q4_0, IQ4_NL and MXFP4 weight rows.
    pub gemm_q4_0: Gemm,
    pub gemm_iq4_nl: Gemm,
    pub gemm_mxfp4: Gemm,
    pub quantize_q8_0: Quantize,
    /// f32 -> Q8_K (rows of whole 256-value blocks), bit-identical to ggml's reference
    /// `quantize_row_q8_K_ref` (`kquant::quantize_row_q8_k`), which ggml's CPU backend uses on
    /// every CPU.
    pub quantize_q8_k: Quantize,
    /// K-quant weight rows against Q8_K activation rows (super-blocks of 256 values), as ggml's
    /// `ggml_vec_dot_q*_K_q8_K`.
    pub dot_q2_k_q8_k: Dot,
    pub dot_q3_k_q8_k: Dot,
    pub dot_q4_k_q8_k: Dot,
    pub dot_q5_k_q8_k: Dot,
    pub dot_q6_k_q8_k: Dot,
    /// I-quant weight rows against Q8_K activation rows (`ggml_vec_dot_iq*_q8_K`).
    pub dot_iq2_xxs_q8_k: Dot,
    pub dot_iq2_xs_q8_k: Dot,
    pub dot_iq2_s_q8_k: Dot,
    pub dot_iq3_xxs_q8_k: Dot,
    pub dot_iq3_s_q8_k: Dot,
    pub dot_iq1_s_q8_k: Dot,
    pub dot_iq1_m_q8_k: Dot,
    pub dot_iq4_xs_q8_k: Dot,
    /// [`Kernels::gemm_q8_0`] for k-quant and IQ4_XS weight rows and Q8_K activation rows: equal
    /// to the table's dot of the type pair by pair, bit for bit.
    pub gemm_q2_k: Gemm,
    pub gemm_q3_k: Gemm,
    pub gemm_q4_k: Gemm,
    pub gemm_q5_k: Gemm,
    pub gemm_q6_k: Gemm,
    pub gemm_iq4_xs: Gemm,
    /// [`Kernels::gemm_q8_0`] / `gemm_q4_0` for rows packed four at a time
    /// (`blocks::rows4`, a multiple of 4 rows): the tables where that layout is leaner than the
    /// file's (NEON with `sdot`, AVX2 and VNNI) have them, and only then are resident weights
    /// packed at load.
    /// Every value equals the table's dot of the unpacked row, bit for bit.
    pub gemm_q8_0_rows4: Option<Gemm>,
    pub gemm_q4_0_rows4: Option<Gemm>,
}

/// `(w, rows, x, n, out)`: see [`Kernels::gemm_q8_0`].
pub type Gemm = fn(&[u8], usize, &[u8], usize, &mut [f32]);

/// Activation rows (f32) to a block encoding (Q8_0 or Q8_K).
pub type Quantize = fn(&[f32], &mut [u8]);

/// The activation encoding a quantized weight type is dotted with (ggml's `vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Blocks of 32 int8 with an f16 scale.
    Q8_0,
    /// Super-blocks of 256 int8 with an f32 scale and 16-value sums.
    Q8K,
}

impl Kernels {
    /// The dot kernel for weights of the quantized type `ty` and the activation format it
    /// takes; None for the float types, which take f32 activations.
    pub fn quant_dot(&self, ty: GgmlType) -> Option<(Dot, ActFormat)> {
        use ActFormat::{Q8K, Q8_0};
        Some(match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
            GgmlType::Q8_0 => (self.dot_q8_0_q8_0, Q8_0),
            GgmlType::Q4_0 => (self.dot_q4_0_q8_0, Q8_0),
            GgmlType::Q5_0 => (self.dot_q5_0_q8_0, Q8_0),
            GgmlType::IQ4NL => (self.dot_iq4_nl_q8_0, Q8_0),
            GgmlType::MXFP4 => (self.dot_mxfp4_q8_0, Q8_0),
            GgmlType::Q2K => (self.dot_q2_k_q8_k, Q8K),
            GgmlType::Q3K => (self.dot_q3_k_q8_k, Q8K),
            GgmlType::Q4K => (self.dot_q4_k_q8_k, Q8K),
            GgmlType::Q5K => (self.dot_q5_k_q8_k, Q8K),
            GgmlType::Q6K => (self.dot_q6_k_q8_k, Q8K),
            GgmlType::IQ2XXS => (self.dot_iq2_xxs_q8_k, Q8K),
            GgmlType::IQ2XS => (self.dot_iq2_xs_q8_k, Q8K),
            GgmlType::IQ2S => (self.dot_iq2_s_q8_k, Q8K),
            GgmlType::IQ3XXS => (self.dot_iq3_xxs_q8_k, Q8K),
            GgmlType::IQ3S => (self.dot_iq3_s_q8_k, Q8K),
            GgmlType::IQ1S => (self.dot_iq1_s_q8_k, Q8K),
            GgmlType::IQ1M => (self.dot_iq1_m_q8_k, Q8K),
            GgmlType::IQ4XS => (self.dot_iq4_xs_q8_k, Q8K),
        })
    }

    /// The tiled product for weights of type `ty`, where the table has one (on some CPUs it is
    /// the dot kernel pair by pair).
    pub fn gemm(&self, ty: GgmlType) -> Option<(Gemm, ActFormat)> {
        Some(match ty {
            GgmlType::Q8_0 => (self.gemm_q8_0, ActFormat::Q8_0),
            GgmlType::Q4_0 => (self.gemm_q4_0, ActFormat::Q8_0),
            GgmlType::IQ4NL => (self.gemm_iq4_nl, ActFormat::Q8_0),
            GgmlType::MXFP4 => (self.gemm_mxfp4, ActFormat::Q8_0),
            GgmlType::Q2K => (self.gemm_q2_k, ActFormat::Q8K),
            GgmlType::Q3K => (self.gemm_q3_k, ActFormat::Q8K),
            GgmlType::Q4K => (self.gemm_q4_k, ActFormat::Q8K),
            GgmlType::Q5K => (self.gemm_q5_k, ActFormat::Q8K),
            GgmlType::Q6K => (self.gemm_q6_k, ActFormat::Q8K),
            GgmlType::IQ4XS => (self.gemm_iq4_xs, ActFormat::Q8K),
            _ => return None,
        })
    }

    /// The product over rows of type `ty` packed four at a time, where this table has one.
    pub fn gemm_rows4(&self, ty: GgmlType) -> Option<Gemm> {
        match ty {
            GgmlType::Q8_0 => self.gemm_q8_0_rows4,
            GgmlType::Q4_0 => self.gemm_q4_0_rows4,
            _ => None,
        }
    }
}

/// A product of every pair by a dot kernel: the reference the tiled kernels are tested against,
/// and what a table without tiled kernels uses.
pub fn gemm_by_pairs(dot: Dot, w: &[u8], rows: usize, x: &[u8], n: usize, out: &mut [f32]) {
    if rows == 0 || n == 0 {
        return;
    }
    let (wb, xb) = (w.len() / rows, x.len() / n);
    for (r, out_r) in out[..rows * n].chunks_exact_mut(n).enumerate() {
        let wr = &w[r * wb..(r + 1) * wb];
        for (t, o) in out_r.iter_mut().enumerate() {
            *o = dot(wr, &x[t * xb..(t + 1) * xb]);
        }
    }
}

/// The shapes the x86 k-quant dots rely on: whole blocks of `w_block` bytes, one Q8_K
/// activation block per weight block.
#[cfg(target_arch = "x86_64")]
fn check_k(w: &[u8], w_block: usize, x: &[u8]) {
    assert_eq!(w.len() % w_block, 0, "whole weight blocks");
    assert_eq!(
        w.len() / w_block * Q8_K_BYTES,
        x.len(),
        "one Q8_K block per weight block"
    );
}

/// A [`Gemm`] that runs the dot kernel `$dot` pair by pair ([`gemm_by_pairs`]).
macro_rules! by_pairs {
    ($dot:expr) => {
        |w, rows, x, n, out| $crate::tensor::kernels::gemm_by_pairs($dot, w, rows, x, n, out)
    };
}
#[cfg(target_arch = "aarch64")]
use by_pairs;

pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    isa: "scalar",
    dot_f32: scalar::dot_f32,
    dot_f16: scalar::dot_f16,
    dot_bf16: scalar::dot_bf16,
    axpy_f16: scalar::axpy_f16,
    dot_q8_0_q8_0: scalar::dot_q8_0_q8_0,
    dot_q4_0_q8_0: scalar::dot_q4_0_q8_0,
    dot_q5_0_q8_0: scalar::dot_q5_0_q8_0,
    dot_iq4_nl_q8_0: scalar::dot_iq4_nl_q8_0,
    dot_mxfp4_q8_0: scalar::dot_mxfp4_q8_0,
    gemm_q8_0: scalar::gemm_q8_0,
    gemm_q4_0: scalar::gemm_q4_0,
    gemm_iq4_nl: by_pairs!(scalar::dot_iq4_nl_q8_0),
    gemm_mxfp4: by_pairs!(scalar::dot_mxfp4_q8_0),
    quantize_q8_0: quantize_row_q8_0,
    quantize_q8_k: quantize_row_q8_k,
    dot_q2_k_q8_k: scalar::kquant::dot_q2_k_q8_k,
    dot_q3_k_q8_k: scalar::kquant::dot_q3_k_q8_k,
    dot_q4_k_q8_k: scalar::kquant::dot_q4_k_q8_k,
    dot_q5_k_q8_k: scalar::kquant::dot_q5_k_q8_k,
    dot_q6_k_q8_k: scalar::kquant::dot_q6_k_q8_k,
    dot_iq2_xxs_q8_k: scalar::iquant::dot_iq2_xxs_q8_k,
    dot_iq2_xs_q8_k: scalar::iquant::dot_iq2_xs_q8_k,
    dot_iq2_s_q8_k: scalar::iquant::dot_iq2_s_q8_k,
    dot_iq3_xxs_q8_k: scalar::iquant::dot_iq3_xxs_q8_k,
    dot_iq3_s_q8_k: scalar::iquant::dot_iq3_s_q8_k,
    dot_iq1_s_q8_k: scalar::iquant::dot_iq1_s_q8_k,
    dot_iq1_m_q8_k: scalar::iquant::dot_iq1_m_q8_k,
    dot_iq4_xs_q8_k: scalar::iquant::dot_iq4_xs_q8_k,
    gemm_q2_k: by_pairs!(scalar::kquant::dot_q2_k_q8_k),
    gemm_q3_k: by_pairs!(scalar::kquant::dot_q3_k_q8_k),
    gemm_q4_k: by_pairs!(scalar::kquant::dot_q4_k_q8_k),
    gemm_q5_k: by_pairs!(scalar::kquant::dot_q5_k_q8_k),
    gemm_q6_k: by_pairs!(scalar::kquant::dot_q6_k_q8_k),
    gemm_iq4_xs: by_pairs!(scalar::iquant::dot_iq4_xs_q8_k),
    gemm_q8_0_rows4: None,
    gemm_q4_0_rows4: None,
};

/// The instruction-set levels of this architecture's tables, most capable first: the values
/// `MOE_EDGE_ISA` takes.
#[cfg(target_arch = "x86_64")]
pub const ISA_LEVELS: &[&str] = &["avx512vnni", "avx2", "scalar"];
#[cfg(target_arch = "aarch64")]
pub const ISA_LEVELS: &[&str] = &["dotprod", "neon", "scalar"];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const ISA_LEVELS: &[&str] = &["scalar"];

/// Every table this CPU can run, fastest first, the scalar reference last.
pub fn tables() -> Vec<&'static Kernels> {
    let mut all: Vec<&'static Kernels> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    all.extend(avx2::tables());
    #[cfg(target_arch = "aarch64")]
    all.extend(neon::tables());
    all.push(&SCALAR);
    all
}

/// The fastest table this CPU can run at or below the level `isa` (one of [`ISA_LEVELS`]): what
/// a CPU without the levels above it would pick. None for a name not in the list.
pub fn capped(isa: &str) -> Option<&'static Kernels> {
    let rank = |name: &str| ISA_LEVELS.iter().position(|l| *l == name);
    let cap = rank(isa)?;
    tables()
        .into_iter()
        .find(|t| rank(t.isa).is_some_and(|r| r >= cap))
}

/// The fastest table this CPU supports, detected once. `MOE_EDGE_SCALAR=1` forces the scalar
/// reference (for comparisons); `MOE_EDGE_ISA=<level>` caps the choice at a level of
/// [`ISA_LEVELS`], so that one machine can time and test what a lesser CPU runs (`avx2`: what an
/// AVX2+FMA+F16C CPU without AVX-512 picks). An unknown level is an error, not a silent
/// fallback: a benchmark would otherwise measure the wrong kernels.
pub fn best() -> &'static Kernels {
    static BEST: OnceLock<&'static Kernels> = OnceLock::new();
    BEST.get_or_init(|| {
        if std::env::var_os("MOE_EDGE_SCALAR").is_some() {
            return &SCALAR;
        }
        if let Some(isa) = std::env::var_os("MOE_EDGE_ISA") {
            let isa = isa.to_string_lossy();
            return capped(&isa).unwrap_or_else(|| {
                panic!(
                    "MOE_EDGE_ISA={isa}: not one of this CPU architecture's levels {ISA_LEVELS:?}"
                )
            });
        }
        tables()[0]
    })
}
