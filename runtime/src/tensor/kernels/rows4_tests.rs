//! The products over packed rows (`Kernels::gemm_rows4`) against the table's own dot kernels.

use super::{gemm_by_pairs, Kernels};
use crate::gguf::GgmlType;
use crate::tensor::blocks::block32::Q8_0_BYTES;
use crate::tensor::blocks::rows4;
use crate::tensor::quant::quantize;
use crate::tensor::random::random_vec;

/// The products over rows packed four at a time (where the table has them) equal the table's
/// dot of the unpacked rows bit for bit, for every token remainder, on quantized rows and on
/// extreme bytes (Q8_0 values of -128, which the quantizer never writes, against activations of
/// -128).
pub(crate) fn check_gemm_rows4(k: &Kernels, cols: usize, seed: u64) {
    if cols > 1024 {
        return;
    }
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
        let Some(gemm) = k.gemm_rows4(ty) else {
            continue;
        };
        let dot = k.quant_dot(ty).expect("quantized").0;
        for (rows, n) in [(4, 1), (4, 2), (8, 3), (4, 4), (12, 5), (8, 7), (4, 9)] {
            let w = quantize(ty, &random_vec(rows * cols, seed + 21, 2.0));
            let x = quantize(GgmlType::Q8_0, &random_vec(n * cols, seed + 22, 3.0));
            let mut extreme_w = w.clone();
            let mut extreme_x = x.clone();
            if ty == GgmlType::Q8_0 {
                for b in extreme_w.chunks_exact_mut(Q8_0_BYTES) {
                    b[2..].fill(0x80);
                }
            }
            for b in extreme_x.chunks_exact_mut(Q8_0_BYTES) {
                b[2..].fill(0x80);
            }
            for (w, x) in [(&w, &x), (&extreme_w, &extreme_x)] {
                let mut got = vec![0f32; rows * n];
                gemm(&rows4::pack(ty, w, rows), rows, x, n, &mut got);
                let mut want = vec![0f32; rows * n];
                gemm_by_pairs(dot, w, rows, x, n, &mut want);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{} {ty} packed gemm {rows}x{n} cols={cols}",
                    k.name
                );
            }
        }
    }
}
