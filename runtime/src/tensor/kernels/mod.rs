//! Dot-product kernels behind one function table. `scalar` is the reference; SIMD tables are
//! chosen at run time from the CPU's features and tested against it.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod scalar;

use std::sync::OnceLock;

use crate::tensor::quant::quantize_row_q8_0;

/// The kernels one CPU path provides. Weight rows are raw bytes of their GGML type; activations
/// are f32 for float weights and Q8_0 blocks for Q8_0/Q4_0 weights.
pub struct Kernels {
    /// Shown at start-up and in benchmarks, e.g. "scalar" or "x86_64 avx2+fma".
    pub name: &'static str,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub dot_f16: fn(&[u8], &[f32]) -> f32,
    pub dot_bf16: fn(&[u8], &[f32]) -> f32,
    pub dot_q8_0_q8_0: fn(&[u8], &[u8]) -> f32,
    pub dot_q4_0_q8_0: fn(&[u8], &[u8]) -> f32,
    pub quantize_q8_0: fn(&[f32], &mut [u8]),
}

pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    dot_f32: scalar::dot_f32,
    dot_f16: scalar::dot_f16,
    dot_bf16: scalar::dot_bf16,
    dot_q8_0_q8_0: scalar::dot_q8_0_q8_0,
    dot_q4_0_q8_0: scalar::dot_q4_0_q8_0,
    quantize_q8_0: quantize_row_q8_0,
};

/// The fastest table this CPU supports, detected once. `MOE_EDGE_SCALAR=1` forces the scalar
/// reference (for comparisons).
pub fn best() -> &'static Kernels {
    static BEST: OnceLock<&'static Kernels> = OnceLock::new();
    BEST.get_or_init(|| {
        if std::env::var_os("MOE_EDGE_SCALAR").is_some() {
            return &SCALAR;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = avx2::table() {
            return t;
        }
        &SCALAR
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::GgmlType;
    use crate::tensor::quant::{dequantize, quantize};

    /// Deterministic pseudo-random values in [-scale, scale].
    pub fn random_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
            })
            .collect()
    }

    fn exact_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Every kernel of `k` equals the dot product of the dequantized operands, for lengths with
    /// tails and several magnitudes.
    pub fn check_table(k: &Kernels) {
        for (i, &n) in [32usize, 64, 96, 256, 1024, 4096, 33 * 32]
            .iter()
            .enumerate()
        {
            let w = random_vec(n, 1 + i as u64, 1.0 + i as f32);
            let x = random_vec(n, 100 + i as u64, 3.0);
            let xq = quantize(GgmlType::Q8_0, &x);
            let mut xd = vec![0f32; n];
            dequantize(GgmlType::Q8_0, &xq, &mut xd);
            for ty in [
                GgmlType::Q8_0,
                GgmlType::Q4_0,
                GgmlType::F16,
                GgmlType::BF16,
            ] {
                let wq = quantize(ty, &w);
                let mut wd = vec![0f32; n];
                dequantize(ty, &wq, &mut wd);
                let (got, want) = match ty {
                    GgmlType::Q8_0 => ((k.dot_q8_0_q8_0)(&wq, &xq), exact_dot(&wd, &xd)),
                    GgmlType::Q4_0 => ((k.dot_q4_0_q8_0)(&wq, &xq), exact_dot(&wd, &xd)),
                    GgmlType::F16 => ((k.dot_f16)(&wq, &x), exact_dot(&wd, &x)),
                    _ => ((k.dot_bf16)(&wq, &x), exact_dot(&wd, &x)),
                };
                let scale = exact_dot(
                    &wd.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                    &x.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                );
                assert!(
                    ((got as f64) - want).abs() <= 1e-5 * scale + 1e-6,
                    "{} {ty} n={n}: {got} vs {want}",
                    k.name
                );
            }
            // f32 kernel, including lengths that are not multiples of 8.
            for m in [n, n - 3] {
                let got = (k.dot_f32)(&w[..m], &x[..m]) as f64;
                let want = exact_dot(&w[..m], &x[..m]);
                assert!(
                    (got - want).abs() <= 1e-5 * m as f64,
                    "{} f32 n={m}",
                    k.name
                );
            }
            // Activation quantization is bit-identical to the reference.
            let mut q = vec![0u8; xq.len()];
            (k.quantize_q8_0)(&x, &mut q);
            assert_eq!(q, xq, "{} quantize_q8_0 n={n}", k.name);
        }
    }

    #[test]
    fn scalar_kernels_match_dequantized_reference() {
        check_table(&SCALAR);
    }

    #[test]
    fn best_kernels_match_scalar_reference() {
        println!("kernel path: {}", best().name);
        check_table(best());
    }

    /// Every SIMD table this machine can run agrees with the scalar one on random data.
    #[test]
    fn simd_tables_agree_with_scalar() {
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = avx2::table() {
            println!("testing {}", t.name);
            check_table(t);
            for n in [32usize, 64, 1024] {
                let w = random_vec(n, 5, 1.0);
                let x = random_vec(n, 6, 1.0);
                let a = (t.dot_f32)(&w, &x);
                let b = (SCALAR.dot_f32)(&w, &x);
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
            }
        }
    }
}
