//! The k-quant matrix products at the extremes of their integer sums, against the table's own
//! dot kernels pair by pair (the tiled NEON ones keep running sums across a super-block's
//! sub-blocks, and multiply them by scale differences).

use super::tests::{activation_rows, saturated_blocks};
use super::{best, gemm_by_pairs, ActFormat, Kernels, SCALAR};
use crate::gguf::GgmlType;

/// Saturated, empty and alternating-scale blocks (9 rows: two 4-row tiles and one left over) against every kind
/// of activation row at once (the quantizer's and extreme ones, -128 included), bit for bit.
fn check_gemm_k_extremes(k: &Kernels) {
    for ty in [
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        let (gemm, format) = k.gemm(ty).expect("a tiled product");
        assert_eq!(format, ActFormat::Q8K);
        let dot = k.quant_dot(ty).expect("a quantized type").0;
        for nb in [1usize, 4] {
            let xs = activation_rows(format, nb, 62, -128);
            let n = xs.len();
            let x = xs.concat();
            let [full, empty] = saturated_blocks(ty, 9 * nb, 63);
            // The largest quants with sub-block scales alternating between their extremes:
            // the largest differences between neighbouring scales.
            let mut alternating = full.clone();
            let scales = match ty {
                GgmlType::Q2K => 0..16,
                GgmlType::Q3K => 96..108,
                GgmlType::Q6K => 192..208,
                _ => 4..16,
            };
            for b in alternating.chunks_exact_mut(ty.block_bytes()) {
                for (i, s) in b[scales.clone()].iter_mut().enumerate() {
                    *s = match (ty, i % 2) {
                        (GgmlType::Q6K, 0) => 0x80,
                        (GgmlType::Q6K, _) => 0x7f,
                        (_, 0) => 0xff,
                        _ => 0x00,
                    };
                }
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for w in [full, empty, alternating] {
                // All tokens in one product, and each alone (a decoding step's own path).
                let one_by_one = xs.iter().map(|x| (x.as_slice(), 1));
                for (x, n) in std::iter::once((x.as_slice(), n)).chain(one_by_one) {
                    let mut got = vec![0f32; 9 * n];
                    gemm(&w, 9, x, n, &mut got);
                    let mut want = vec![0f32; 9 * n];
                    gemm_by_pairs(dot, &w, 9, x, n, &mut want);
                    let what = format!("{} {ty} extreme gemm 9x{n} nb={nb}", k.name);
                    assert_eq!(bits(&got), bits(&want), "{what}");
                }
            }
        }
    }
}

/// Every table this machine can run (under QEMU, `-cpu cortex-a76` runs both NEON tables).
#[test]
fn k_quant_gemms_at_the_extremes() {
    check_gemm_k_extremes(&SCALAR);
    check_gemm_k_extremes(best());
    #[cfg(target_arch = "aarch64")]
    for t in super::neon::tables() {
        check_gemm_k_extremes(t);
    }
}
