//! Every table against the scalar reference and against the exact dot products of the
//! dequantized operands.

use super::*;
use crate::gguf::GgmlType;
use crate::tensor::blocks::block32::Q8_0_BYTES;
use crate::tensor::blocks::kquant::{q8k_d, quantize_row_q8_k, Q8_K_BSUMS_AT, Q8_K_BYTES};
use crate::tensor::blocks::QK_K;
use crate::tensor::quant::{dequantize, quantize};
pub use crate::tensor::random::random_vec;
use crate::tensor::random::{f16_scale_offsets, random_blocks};

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
        check_gemm(k, n, i as u64);
        super::rows4_tests::check_gemm_rows4(k, n, i as u64);
        // axpy over f16 rows, including lengths with tails.
        for m in [n, n - 3] {
            let v = quantize(GgmlType::F16, &w[..m]);
            let mut vd = vec![0f32; m];
            dequantize(GgmlType::F16, &v, &mut vd);
            let mut got = x[..m].to_vec();
            (k.axpy_f16)(0.75, &v, &mut got);
            for ((g, &x0), &vv) in got.iter().zip(&x[..m]).zip(&vd) {
                let want = x0 + 0.75 * vv;
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{} axpy_f16",
                    k.name
                );
            }
        }
        // Activation quantization is bit-identical to the reference.
        let mut q = vec![0u8; xq.len()];
        (k.quantize_q8_0)(&x, &mut q);
        assert_eq!(q, xq, "{} quantize_q8_0 n={n}", k.name);
    }
    // Ties: amax 127 makes the scale exactly 1, so k + 1/2 must round away from zero. Then
    // blocks with a NaN (skipped by the max), an infinity (scale inf: every value 0), zeros.
    let mut odd: Vec<f32> = (0..64)
        .map(|i| match i % 32 {
            0 => 127.0,
            j => (j as f32 - 16.0) + 0.5 * (i as f32 / 32.0 - 0.5).signum(),
        })
        .collect();
    odd.extend((0..32).map(|j| if j == 5 { f32::NAN } else { j as f32 - 9.0 }));
    odd.extend((0..32).map(|j| if j == 7 { f32::INFINITY } else { j as f32 }));
    odd.extend([0.0; 32]);
    let mut q = vec![0u8; odd.len() / 32 * 34];
    (k.quantize_q8_0)(&odd, &mut q);
    assert_eq!(
        q,
        quantize(GgmlType::Q8_0, &odd),
        "{} ties, NaN, inf",
        k.name
    );
    super::quantize_tests::check_quantize_q8_k(k);
    check_decode_only_types(k);
    check_decode_only_gemms(k);
    check_grids_bit_for_bit(k);
    check_vector_blocks(k);
}

/// A Q8_K row from its int8 values (bsums made from them, as the quantizer does) and scales.
fn q8_k_row(qs: &[i8], d: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; qs.len() / QK_K * Q8_K_BYTES];
    for ((b, q), &d) in out
        .chunks_exact_mut(Q8_K_BYTES)
        .zip(qs.chunks_exact(QK_K))
        .zip(d)
    {
        b[..4].copy_from_slice(&d.to_le_bytes());
        for (o, &v) in b[4..4 + QK_K].iter_mut().zip(q) {
            *o = v as u8;
        }
        for (g, vals) in q.chunks_exact(16).enumerate() {
            let sum: i32 = vals.iter().map(|&v| v as i32).sum();
            let at = Q8_K_BSUMS_AT + 2 * g;
            b[at..at + 2].copy_from_slice(&(sum as i16).to_le_bytes());
        }
    }
    out
}

/// The activations of a quantized weight type's format, dequantized (f64).
fn dequantized_acts(format: ActFormat, x: &[u8]) -> Vec<f64> {
    match format {
        ActFormat::Q8K => x
            .chunks_exact(Q8_K_BYTES)
            .flat_map(|b| {
                let d = q8k_d(b) as f64;
                b[4..4 + QK_K].iter().map(move |&q| q as i8 as f64 * d)
            })
            .collect(),
        ActFormat::Q8_0 => {
            let mut out = vec![0f32; x.len() / Q8_0_BYTES * 32];
            dequantize(GgmlType::Q8_0, x, &mut out);
            out.into_iter().map(|v| v as f64).collect()
        }
    }
}

/// The exact dot product of a quantized row with an activation row from their dequantized
/// values, and the sum of the magnitudes of every term any summation order adds: for the types
/// with minimums (Q2_K, Q4_K, Q5_K) the scaled quants and the minimum terms separately, which
/// may cancel in the dequantized value.
fn quant_reference(ty: GgmlType, w: &[u8], xd: &[f64]) -> (f64, f64) {
    let deq = |w: &[u8]| {
        let mut out = vec![0f32; xd.len()];
        dequantize(ty, w, &mut out);
        out
    };
    let dot = |a: &[f32]| -> f64 { a.iter().zip(xd).map(|(a, b)| *a as f64 * b).sum() };
    let mag = |a: &[f32]| -> f64 { a.iter().zip(xd).map(|(a, b)| (*a as f64 * b).abs()).sum() };
    let want = dot(&deq(w));
    let scale = match ty {
        GgmlType::Q2K | GgmlType::Q4K | GgmlType::Q5K => {
            // d alone (dmin zeroed) and dmin alone (d zeroed).
            let zeroed = |at: usize| {
                let mut c = w.to_vec();
                for b in c.chunks_exact_mut(ty.block_bytes()) {
                    b[at..at + 2].fill(0);
                }
                deq(&c)
            };
            let [d_at, dmin_at] = f16_scale_offsets(ty) else {
                unreachable!("two scales")
            };
            mag(&zeroed(*dmin_at)) + mag(&zeroed(*d_at))
        }
        _ => mag(&deq(w)),
    };
    (want, scale)
}

/// The quantized types dotted with Q8_K activations, and with Q8_0 ones but not encoded by
/// the converter.
const Q8K_TYPES: [GgmlType; 13] = [
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::IQ2XXS,
    GgmlType::IQ2XS,
    GgmlType::IQ2S,
    GgmlType::IQ3XXS,
    GgmlType::IQ3S,
    GgmlType::IQ1S,
    GgmlType::IQ1M,
    GgmlType::IQ4XS,
];
const DECODE_ONLY_32: [GgmlType; 3] = [GgmlType::Q5_0, GgmlType::IQ4NL, GgmlType::MXFP4];

/// Blocks of `ty` with the largest quants and sub-block scales everywhere (every byte 0xff but
/// the super-block scale; Q6_K scale bytes 0xff are -1), and with every byte zero but the
/// scale.
pub(super) fn saturated_blocks(ty: GgmlType, nb: usize, seed: u64) -> [Vec<u8>; 2] {
    let base = random_blocks(ty, nb, seed, 0.5);
    let keep: Vec<usize> = match ty {
        GgmlType::MXFP4 => vec![0],
        GgmlType::IQ1M => vec![49, 51, 53, 55],
        _ => f16_scale_offsets(ty)
            .iter()
            .flat_map(|&at| [at, at + 1])
            .collect(),
    };
    let fill = |byte: u8| {
        let mut v = base.clone();
        for (b, src) in v
            .chunks_exact_mut(ty.block_bytes())
            .zip(base.chunks_exact(ty.block_bytes()))
        {
            b.fill(byte);
            for &at in &keep {
                b[at] = src[at];
            }
            if ty == GgmlType::IQ1M {
                // The scale is the top nibbles of those bytes: the rest takes `byte` too.
                for &at in &keep {
                    b[at] = (src[at] & 0xf0) | (byte & 0x0f);
                }
            }
        }
        v
    };
    [fill(0xff), fill(0)]
}

/// Activation rows of `nb` blocks in `format`: from the quantizer at three magnitudes, and
/// extreme rows (every quant at `low`, at 127, and alternating) with random scales.
pub(super) fn activation_rows(format: ActFormat, nb: usize, seed: u64, low: i8) -> Vec<Vec<u8>> {
    let per_block = if format == ActFormat::Q8K { QK_K } else { 32 };
    let n = nb * per_block;
    let mut xs = Vec::new();
    for (s, mag) in [(0, 1.0f32), (1, 40.0), (2, 1e-3)] {
        let v = random_vec(n, seed + s, mag);
        xs.push(match format {
            ActFormat::Q8K => {
                let mut q = vec![0u8; nb * Q8_K_BYTES];
                quantize_row_q8_k(&v, &mut q);
                q
            }
            ActFormat::Q8_0 => quantize(GgmlType::Q8_0, &v),
        });
    }
    let ds = random_vec(nb, seed + 7, 0.05);
    let alternating: Vec<i8> = (0..n).map(|j| if j % 3 == 0 { 127 } else { low }).collect();
    for q in [vec![low; n], vec![127i8; n], alternating] {
        xs.push(match format {
            ActFormat::Q8K => q8_k_row(&q, &ds),
            ActFormat::Q8_0 => q
                .chunks_exact(32)
                .zip(&ds)
                .flat_map(|(b, &d)| {
                    let d = half::f16::from_f32(d).to_bits().to_le_bytes();
                    d.into_iter().chain(b.iter().map(|&v| v as u8))
                })
                .collect(),
        });
    }
    xs
}

/// Every quantized type the converter does not encode (k-quants, i-quants, Q5_0, IQ4_NL,
/// MXFP4): random blocks with scales of both signs and small and large magnitudes, saturated and
/// empty blocks, block counts around every SIMD loop's step, activations from the quantizer and
/// extreme ones (all at the lowest quant the type's kernels take, all 127, alternating),
/// against the exact dot of the dequantized operands and against the scalar table.
pub fn check_decode_only_types(k: &Kernels) {
    for ty in Q8K_TYPES.into_iter().chain(DECODE_ONLY_32) {
        let (dot, format) = k.quant_dot(ty).expect("a quantized type");
        let (scalar_dot, _) = SCALAR.quant_dot(ty).expect("a quantized type");
        // The quantizers' quants are within -127..=127. The k-quant kernels multiply unsigned
        // weights and take -128 too; the others use the sign trick, as ggml's do, and need the
        // quantizers' range.
        let k_quant = matches!(
            ty,
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K
        );
        let low = if k_quant || ty == GgmlType::Q5_0 {
            -128
        } else {
            -127
        };
        let counts: &[usize] = if format == ActFormat::Q8K {
            &[1, 2, 3, 5, 8, 16]
        } else {
            &[1, 2, 3, 4, 5, 7, 8, 9, 33]
        };
        for (i, &nb) in counts.iter().enumerate() {
            let seed = 1000 + 10 * i as u64 + 100 * ty.id() as u64;
            let xs = activation_rows(format, nb, seed, low);
            let mut ws = vec![
                random_blocks(ty, nb, seed + 3, 0.02),
                random_blocks(ty, nb, seed + 4, 3.0),
            ];
            ws.extend(saturated_blocks(ty, nb, seed + 5));
            for (wi, w) in ws.iter().enumerate() {
                for (xi, x) in xs.iter().enumerate() {
                    let xd = dequantized_acts(format, x);
                    let got = dot(w, x) as f64;
                    let (want, scale) = quant_reference(ty, w, &xd);
                    assert!(
                        (got - want).abs() <= 1e-5 * scale + 1e-30,
                        "{} {ty} nb={nb} w{wi} x{xi}: {got} vs exact {want} (scale {scale})",
                        k.name
                    );
                    let reference = scalar_dot(w, x) as f64;
                    assert!(
                        (got - reference).abs() <= 2e-6 * scale + 1e-30,
                        "{} {ty} nb={nb} w{wi} x{xi}: {got} vs scalar {reference}",
                        k.name
                    );
                }
            }
        }
    }
}

/// The gguf-py vector blocks (tensor/quant.rs) whose values are finite, as one row per type,
/// against activations from the quantizer: exact dot and scalar table, as above.
fn check_vector_blocks(k: &Kernels) {
    for (ty, blocks, values) in crate::tensor::quant::vectors::cases() {
        let (dot, format) = k.quant_dot(ty).expect("a quantized type");
        let (scalar_dot, _) = SCALAR.quant_dot(ty).expect("a quantized type");
        let finite: Vec<u8> = blocks
            .chunks_exact(ty.block_bytes())
            .zip(values.chunks_exact(ty.block_len()))
            .filter(|(_, v)| v.iter().all(|v| v.is_finite()))
            .flat_map(|(b, _)| b.iter().copied())
            .collect();
        let nb = finite.len() / ty.block_bytes();
        assert!(nb >= 4, "{ty}: {nb} finite vector blocks");
        let n = nb * ty.block_len();
        let per_block = if format == ActFormat::Q8K { QK_K } else { 32 };
        for (seed, mag) in [(1u64, 1.0f32), (2, 1e-3)] {
            let v = random_vec(n, seed, mag);
            let x = match format {
                ActFormat::Q8K => {
                    let mut q = vec![0u8; n / per_block * Q8_K_BYTES];
                    quantize_row_q8_k(&v, &mut q);
                    q
                }
                ActFormat::Q8_0 => quantize(GgmlType::Q8_0, &v),
            };
            let xd = dequantized_acts(format, &x);
            let (want, scale) = quant_reference(ty, &finite, &xd);
            let got = dot(&finite, &x) as f64;
            let reference = scalar_dot(&finite, &x) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * scale + 1e-30,
                "{} {ty} vectors: {got} vs exact {want} (scale {scale})",
                k.name
            );
            assert!(
                (got - reference).abs() <= 2e-6 * scale + 1e-30,
                "{} {ty} vectors: {got} vs scalar {reference}",
                k.name
            );
        }
    }
}

/// The grid i-quants' SIMD kernels take the scalar reference's exact integer sums and its float
/// steps: equal to it bit for bit, for activations within the quantizer's -127..=127.
fn check_grids_bit_for_bit(k: &Kernels) {
    let grids = [
        GgmlType::IQ2XXS,
        GgmlType::IQ2XS,
        GgmlType::IQ2S,
        GgmlType::IQ3XXS,
        GgmlType::IQ3S,
        GgmlType::IQ1S,
        GgmlType::IQ1M,
    ];
    for ty in grids {
        let (dot, _) = k.quant_dot(ty).expect("a quantized type");
        let (scalar_dot, _) = SCALAR.quant_dot(ty).expect("a quantized type");
        for nb in [1usize, 2, 5] {
            let mut ws = vec![random_blocks(ty, nb, 300 + nb as u64, 0.1)];
            ws.extend(saturated_blocks(ty, nb, 301));
            for w in &ws {
                for x in activation_rows(ActFormat::Q8K, nb, 302 + ty.id() as u64, -127) {
                    let (got, want) = (dot(w, &x), scalar_dot(w, &x));
                    assert_eq!(got.to_bits(), want.to_bits(), "{} {ty} nb={nb}", k.name);
                }
            }
        }
    }
}

/// The tiled products of the types the converter does not encode equal the table's dot pair
/// by pair, bit for bit, for every tile remainder (single tokens by several rows included) and
/// block counts with tails.
fn check_decode_only_gemms(k: &Kernels) {
    for ty in Q8K_TYPES.into_iter().chain(DECODE_ONLY_32) {
        let Some((gemm, format)) = k.gemm(ty) else {
            continue;
        };
        let (dot, _) = k.quant_dot(ty).expect("a quantized type");
        for nb in [1usize, 3, 5] {
            for (rows, n) in [
                (1, 1),
                (4, 1),
                (6, 1),
                (9, 1),
                (3, 4),
                (2, 5),
                (1, 7),
                (4, 9),
                (9, 2),
                (5, 3),
                // More tokens than a batch prepares at once (x86 `offset4::CHUNK_TOKENS`).
                (5, 67),
            ] {
                let w = random_blocks(ty, rows * nb, 60 + nb as u64, 0.05);
                let x = &activation_rows(format, n * nb, 61 + ty.id() as u64, -127)[0];
                let mut got = vec![0f32; rows * n];
                gemm(&w, rows, x, n, &mut got);
                let mut want = vec![0f32; rows * n];
                gemm_by_pairs(dot, &w, rows, x, n, &mut want);
                assert_eq!(got, want, "{} {ty} gemm {rows}x{n} nb={nb}", k.name);
            }
        }
    }
}

/// The tiled products equal the table's own dot kernel pair by pair, bit for bit, for every
/// tile remainder (rows and tokens 1..=9, and more tokens than the x86 Q4_0 batch prepares at
/// once), and the scalar reference within rounding.
fn check_gemm(k: &Kernels, cols: usize, seed: u64) {
    if cols > 1024 {
        return;
    }
    for (ty, gemm, dot, scalar_dot) in [
        (
            GgmlType::Q8_0,
            k.gemm_q8_0,
            k.dot_q8_0_q8_0,
            SCALAR.dot_q8_0_q8_0,
        ),
        (
            GgmlType::Q4_0,
            k.gemm_q4_0,
            k.dot_q4_0_q8_0,
            SCALAR.dot_q4_0_q8_0,
        ),
    ] {
        for (rows, n) in [
            (1, 1),
            (4, 4),
            (9, 7),
            (5, 1),
            (8, 9),
            (3, 2),
            (1, 6),
            (5, 67),
        ] {
            let w = quantize(ty, &random_vec(rows * cols, seed + 11, 2.0));
            let x = quantize(GgmlType::Q8_0, &random_vec(n * cols, seed + 12, 3.0));
            let mut got = vec![0f32; rows * n];
            gemm(&w, rows, &x, n, &mut got);
            let mut want = vec![0f32; rows * n];
            gemm_by_pairs(dot, &w, rows, &x, n, &mut want);
            assert_eq!(got, want, "{} {ty} gemm {rows}x{n} cols={cols}", k.name);
            let mut reference = vec![0f32; rows * n];
            gemm_by_pairs(scalar_dot, &w, rows, &x, n, &mut reference);
            for (g, r) in got.iter().zip(&reference) {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{} {ty} gemm vs scalar: {g} vs {r}",
                    k.name
                );
            }
        }
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
    for t in avx2::tables() {
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
    // The x86 tables compute the same lane sums and float steps: equal bit for bit.
    #[cfg(target_arch = "x86_64")]
    for t in avx2::tables().skip(1) {
        let first = avx2::tables().next().expect("a table");
        for (rows, n, cols) in [(9, 7, 256), (4, 1, 1024), (1, 3, 64)] {
            for q4 in [false, true] {
                let ty = if q4 { GgmlType::Q4_0 } else { GgmlType::Q8_0 };
                let w = quantize(ty, &random_vec(rows * cols, 31, 1.5));
                let x = quantize(GgmlType::Q8_0, &random_vec(n * cols, 32, 2.5));
                let (mut a, mut b) = (vec![0f32; rows * n], vec![0f32; rows * n]);
                let (ga, gb) = if q4 {
                    (first.gemm_q4_0, t.gemm_q4_0)
                } else {
                    (first.gemm_q8_0, t.gemm_q8_0)
                };
                ga(&w, rows, &x, n, &mut a);
                gb(&w, rows, &x, n, &mut b);
                assert_eq!(a, b, "{} vs {} {ty}", first.name, t.name);
            }
        }
    }
    // Both NEON tables when the CPU has dotprod (run under QEMU with `-cpu cortex-a76` and
    // `-cpu cortex-a72` to cover each alone).
    #[cfg(target_arch = "aarch64")]
    for t in neon::tables() {
        println!("testing {}", t.name);
        check_table(t);
        neon_agrees_with_scalar(t);
    }
}

/// The NEON k-quant and IQ4_XS kernels reduce each block to exact integers before any float
/// step, and take the same float steps in both tables, so they agree bit for bit; Q6_K's steps
/// are also the scalar reference's. (The 32-value formats convert four lane sums to float, and
/// the tables group the bytes into lanes differently: those agree within rounding, checked by
/// `check_table`, and exactly where every partial sum is exact, in `neon_agrees_with_scalar`.)
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_quantized_kernels_agree_bit_for_bit() {
    let tables: Vec<&Kernels> = neon::tables().collect();
    for t in &tables {
        println!("testing quantized kernels bit for bit: {}", t.name);
    }
    let types = [
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::IQ4XS,
    ];
    for ty in types {
        for nb in [1usize, 2, 7] {
            let w = random_blocks(ty, nb, 91 + ty.id() as u64, 0.1);
            for x in activation_rows(ActFormat::Q8K, nb, 90 + nb as u64, -128) {
                let first = (tables[0].quant_dot(ty).unwrap().0)(&w, &x);
                for t in &tables {
                    let got = (t.quant_dot(ty).unwrap().0)(&w, &x);
                    assert_eq!(got.to_bits(), first.to_bits(), "{} {ty} nb={nb}", t.name);
                }
                if ty == GgmlType::Q6K {
                    assert_eq!(first, (SCALAR.dot_q6_k_q8_k)(&w, &x), "q6_K nb={nb}");
                }
            }
        }
    }
}

/// Compares `t` with the scalar table where the answers must be equal: the 32-value kernels on
/// arbitrary block bytes (including -128, which the quantizer never writes) with power-of-two
/// scales, where every partial sum is exact in f32; the f16/bf16 kernels against one-hot
/// activations, which return each converted weight itself (subnormals included); and the
/// float kernels on lengths around every loop's step.
#[cfg(target_arch = "aarch64")]
fn neon_agrees_with_scalar(t: &Kernels) {
    use crate::tensor::blocks::block32::{IQ4_NL_BYTES, MXFP4_BYTES, Q4_0_BYTES};

    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    // Scales of ±1 and ±0.5 make every term a multiple of 1/4 of at most 32 * 128^2 = 2^19:
    // six blocks stay below 2^24 quarters, so any summation order is exact.
    let scales = [0x3c00u16, 0xbc00, 0x3800, 0xb800];
    for nb in 1..=6 {
        let mut blocks = |bytes: usize| -> Vec<u8> {
            let mut v: Vec<u8> = (0..nb * bytes).map(|_| next() as u8).collect();
            for b in v.chunks_exact_mut(bytes) {
                let d = scales[next() as usize % scales.len()];
                b[..2].copy_from_slice(&d.to_le_bytes());
            }
            v
        };
        let (w8, w4, x) = (blocks(Q8_0_BYTES), blocks(Q4_0_BYTES), blocks(Q8_0_BYTES));
        let wnl = blocks(IQ4_NL_BYTES);
        // MXFP4's scale byte: 2^(e - 128) of 1 or 1/2 (bit 2 of the f16 written there).
        let mut wmx = blocks(MXFP4_BYTES);
        for b in wmx.chunks_exact_mut(MXFP4_BYTES) {
            b[0] = 127 + (b[1] >> 2 & 1);
        }
        let extreme: Vec<u8> = x
            .chunks_exact(Q8_0_BYTES)
            .flat_map(|b| b[..2].iter().copied().chain([0x80u8; 32]))
            .collect();
        for xs in [&x, &extreme] {
            assert_eq!(
                (t.dot_q8_0_q8_0)(&w8, xs),
                (SCALAR.dot_q8_0_q8_0)(&w8, xs),
                "{} q8_0 nb={nb}",
                t.name
            );
            assert_eq!(
                (t.dot_q4_0_q8_0)(&w4, xs),
                (SCALAR.dot_q4_0_q8_0)(&w4, xs),
                "{} q4_0 nb={nb}",
                t.name
            );
            assert_eq!(
                (t.dot_iq4_nl_q8_0)(&wnl, xs),
                (SCALAR.dot_iq4_nl_q8_0)(&wnl, xs),
                "{} iq4_nl nb={nb}",
                t.name
            );
            assert_eq!(
                (t.dot_mxfp4_q8_0)(&wmx, xs),
                (SCALAR.dot_mxfp4_q8_0)(&wmx, xs),
                "{} mxfp4 nb={nb}",
                t.name
            );
        }
        assert_eq!(
            (t.dot_q8_0_q8_0)(&extreme, &extreme),
            (SCALAR.dot_q8_0_q8_0)(&extreme, &extreme),
            "{} q8_0 all -128 nb={nb}",
            t.name
        );
    }

    for n in [1usize, 7, 8, 9, 15, 16, 17, 24, 31, 33, 40] {
        // Finite bit patterns only: an all-ones exponent (inf/NaN) would make 0 * w NaN. (Values
        // are compared with `==`, so a zero weight may come back as either signed zero.)
        let mut weights = |exponent: u16| -> Vec<u8> {
            (0..n)
                .flat_map(|_| {
                    let b = next() as u16;
                    let b = if b & exponent == exponent {
                        b ^ 0x4000
                    } else {
                        b
                    };
                    b.to_le_bytes()
                })
                .collect()
        };
        let (w16, wb16) = (weights(0x7c00), weights(0x7f80));
        for i in 0..n {
            let mut e = vec![0f32; n];
            e[i] = 1.0;
            assert_eq!(
                (t.dot_f16)(&w16, &e),
                (SCALAR.dot_f16)(&w16, &e),
                "{} f16 n={n} i={i}",
                t.name
            );
            assert_eq!(
                (t.dot_bf16)(&wb16, &e),
                (SCALAR.dot_bf16)(&wb16, &e),
                "{} bf16 n={n} i={i}",
                t.name
            );
        }
        let a = random_vec(n, 7 + n as u64, 2.0);
        let b = random_vec(n, 8 + n as u64, 2.0);
        let want = exact_dot(&a, &b);
        let got = (t.dot_f32)(&a, &b) as f64;
        assert!(
            (got - want).abs() <= 1e-5 * n as f64,
            "{} f32 n={n}",
            t.name
        );
    }
}
