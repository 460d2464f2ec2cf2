//! The tables' activation quantizers against the reference, byte for byte.

use super::Kernels;
use crate::tensor::blocks::kquant::{quantize_row_q8_k, Q8_K_BYTES};
use crate::tensor::blocks::QK_K;
use crate::tensor::random::random_vec;

/// The table's Q8_K quantizer equals the reference byte for byte: random rows at several
/// magnitudes, ties (a scale of exactly 1 makes k + 1/2 round to even), the largest magnitude
/// twice with both signs (the first one sets the scale's sign), NaN, infinity and zero blocks.
pub(crate) fn check_quantize_q8_k(k: &Kernels) {
    let mut rows: Vec<Vec<f32>> = [(1.0f32, 3u64), (40.0, 4), (1e-3, 5)]
        .iter()
        .map(|&(mag, seed)| random_vec(3 * QK_K, seed, mag))
        .collect();
    let ties: Vec<f32> = (0..QK_K)
        .map(|j| match j {
            0 => -127.0,
            _ => (j % 64) as f32 - 32.0 + 0.5,
        })
        .collect();
    let both_signs: Vec<f32> = (0..QK_K)
        .map(|j| match j {
            40 => 3.0,
            41 | 200 => -3.0,
            _ => (j as f32 * 0.37).sin(),
        })
        .collect();
    let nan: Vec<f32> = (0..QK_K)
        .map(|j| if j == 9 { f32::NAN } else { j as f32 })
        .collect();
    let inf: Vec<f32> = (0..QK_K)
        .map(|j| if j == 77 { f32::NEG_INFINITY } else { j as f32 })
        .collect();
    rows.push([ties, both_signs, nan, inf, vec![0.0; QK_K]].concat());
    for x in &rows {
        let mut want = vec![0u8; x.len() / QK_K * Q8_K_BYTES];
        quantize_row_q8_k(x, &mut want);
        let mut got = vec![0xaau8; want.len()];
        (k.quantize_q8_k)(x, &mut got);
        assert_eq!(got, want, "{} quantize_q8_k", k.name);
    }
}
