//! Encoding and decoding by GGML type: the entry points the converter, the model loader and
//! the tests use. The formats themselves are in `blocks`, one file per family.

use half::{bf16, f16};

pub use super::blocks::block32::*;
use super::blocks::kquant_encode::{self, BlockEncoder};
use super::blocks::{iq4_encode, iquant, kquant, QK_K};
use crate::gguf::GgmlType;

/// Encodes f32 values as `ty` (a whole number of blocks). Used by the converter, for the types
/// [`GgmlType::can_encode`] accepts.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let n_bytes = ty
        .row_bytes(x.len())
        .expect("caller checks that rows are whole blocks");
    let mut out = vec![0u8; n_bytes];
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        GgmlType::Q8_0 => quantize_row_q8_0(x, &mut out),
        GgmlType::Q4_0 => quantize_row_q4_0(x, &mut out),
        GgmlType::Q5_0 => quantize_row_q5_0(x, &mut out),
        other => return quantize_weighted(other, x, x.len(), None),
    }
    out
}

/// The block size and encoder of the types ggml quantises with an optional importance vector.
fn weighted_encoder(ty: GgmlType) -> Option<(usize, BlockEncoder)> {
    match ty {
        GgmlType::Q2K => Some(kquant_encode::Q2_K),
        GgmlType::Q3K => Some(kquant_encode::Q3_K),
        GgmlType::Q4K => Some(kquant_encode::Q4_K),
        GgmlType::Q5K => Some(kquant_encode::Q5_K),
        GgmlType::Q6K => Some(kquant_encode::Q6_K),
        GgmlType::IQ4NL => Some(iq4_encode::IQ4_NL),
        GgmlType::IQ4XS => Some(iq4_encode::IQ4_XS),
        _ => None,
    }
}

/// Encodes rows of `n_per_row` values as `ty` the way ggml's `ggml_quantize_chunk` does, bit for
/// bit, weighting each column's error by `imatrix[column]` when given (llama.cpp's importance
/// matrix). F32, F16, BF16 and Q8_0 ignore it, as ggml does.
pub fn quantize_weighted(
    ty: GgmlType,
    x: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
) -> Vec<u8> {
    if let (Some(w), GgmlType::Q4_0 | GgmlType::Q5_0) = (imatrix, ty) {
        // ggml weighs these per row (the row's mean square enters every block's weights).
        assert!(n_per_row > 0 && x.len().is_multiple_of(n_per_row));
        assert_eq!(w.len(), n_per_row, "one importance per column");
        let row_bytes = ty.row_bytes(n_per_row).expect("rows are whole blocks");
        let mut out = vec![0u8; row_bytes * (x.len() / n_per_row)];
        for (xr, or) in x
            .chunks_exact(n_per_row)
            .zip(out.chunks_exact_mut(row_bytes))
        {
            if ty == GgmlType::Q4_0 {
                quantize_row_q4_0_weighted(xr, w, or);
            } else {
                quantize_row_q5_0_weighted(xr, w, or);
            }
        }
        return out;
    }
    let Some((block_bytes, encode)) = weighted_encoder(ty) else {
        if !ty.can_encode() {
            unimplemented!("{ty} encoding is not offered by the converter");
        }
        return quantize(ty, x);
    };
    assert!(n_per_row > 0 && x.len().is_multiple_of(n_per_row));
    if let Some(w) = imatrix {
        assert_eq!(w.len(), n_per_row, "one importance per column");
    }
    let block_len = ty.block_len();
    assert!(block_len == QK_K || block_len == QK);
    let n_bytes = ty
        .row_bytes(n_per_row)
        .expect("caller checks that rows are whole blocks")
        * (x.len() / n_per_row);
    let mut out = vec![0u8; n_bytes];
    for (b, (xb, yb)) in x
        .chunks_exact(block_len)
        .zip(out.chunks_exact_mut(block_bytes))
        .enumerate()
    {
        let col = b * block_len % n_per_row;
        encode(xb, imatrix.map(|w| &w[col..col + block_len]), yb);
    }
    out
}

/// Decodes a whole number of blocks of `ty` into f32, exactly as ggml's `dequantize_row_*`.
pub fn dequantize(ty: GgmlType, q: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(q.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(q.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(q.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => dequantize_row_q8_0(q, out),
        GgmlType::Q4_0 => dequantize_row_q4_0(q, out),
        GgmlType::Q5_0 => dequantize_row_q5_0(q, out),
        GgmlType::IQ4NL => dequantize_row_iq4_nl(q, out),
        GgmlType::MXFP4 => dequantize_row_mxfp4(q, out),
        GgmlType::Q2K => kquant::dequantize_row_q2_k(q, out),
        GgmlType::Q3K => kquant::dequantize_row_q3_k(q, out),
        GgmlType::Q4K => kquant::dequantize_row_q4_k(q, out),
        GgmlType::Q5K => kquant::dequantize_row_q5_k(q, out),
        GgmlType::Q6K => kquant::dequantize_row_q6_k(q, out),
        GgmlType::IQ2XXS => iquant::dequantize_row_iq2_xxs(q, out),
        GgmlType::IQ2XS => iquant::dequantize_row_iq2_xs(q, out),
        GgmlType::IQ2S => iquant::dequantize_row_iq2_s(q, out),
        GgmlType::IQ3XXS => iquant::dequantize_row_iq3_xxs(q, out),
        GgmlType::IQ3S => iquant::dequantize_row_iq3_s(q, out),
        GgmlType::IQ1S => iquant::dequantize_row_iq1_s(q, out),
        GgmlType::IQ1M => iquant::dequantize_row_iq1_m(q, out),
        GgmlType::IQ4XS => iquant::dequantize_row_iq4_xs(q, out),
    }
}

/// The gguf-py test vectors (scripts/fixtures/make_block_vectors.py): blocks of every quantized
/// type and the values llama.cpp's Python reference decodes them to.
#[cfg(test)]
pub(crate) mod vectors {
    use crate::gguf::GgmlType;

    macro_rules! fixture {
        ($name:literal, $ext:literal) => {
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/blocks/",
                $name,
                $ext
            ))
        };
    }

    macro_rules! vectors {
        ($($name:literal),* $(,)?) => {
            &[$(($name, fixture!($name, ".bin"), fixture!($name, ".f32"))),*]
        };
    }

    /// (type name, blocks, decoded values as little-endian f32).
    pub const VECTORS: &[(&str, &[u8], &[u8])] = vectors!(
        "q4_0", "q5_0", "q8_0", "iq4_nl", "mxfp4", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
        "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m", "iq4_xs",
    );

    /// gguf-py's id, block length and block size of each type.
    const TYPES: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/blocks/types.tsv"
    ));

    /// Each vector file's type, blocks and expected values.
    pub fn cases() -> impl Iterator<Item = (GgmlType, &'static [u8], Vec<f32>)> {
        VECTORS.iter().map(|&(name, blocks, values)| {
            let ty = GgmlType::from_name(name).expect("a known type");
            let values = values
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (ty, blocks, values)
        })
    }

    #[test]
    fn types_match_gguf_py() {
        let mut seen = Vec::new();
        for line in TYPES.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            let ty = GgmlType::from_name(f[0]).unwrap_or_else(|| panic!("{} unknown", f[0]));
            let want: Vec<usize> = f[1..].iter().map(|v| v.parse().unwrap()).collect();
            assert_eq!(
                [ty.id() as usize, ty.block_len(), ty.block_bytes()],
                want[..],
                "{ty}"
            );
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
            seen.push(ty);
        }
        for ty in GgmlType::all() {
            assert!(seen.contains(ty), "{ty} has no gguf-py row");
        }
    }

    /// Bit for bit, except that any NaN matches any NaN (its sign and payload depend on the CPU
    /// that made it: an infinite scale times a zero quant).
    #[test]
    fn every_type_decodes_as_gguf_py_does() {
        let mut n = 0;
        for (ty, blocks, want) in cases() {
            assert_eq!(blocks.len() % ty.block_bytes(), 0, "{ty} vector size");
            assert_eq!(want.len(), blocks.len() / ty.block_bytes() * ty.block_len());
            let mut got = vec![0f32; want.len()];
            super::dequantize(ty, blocks, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{ty} block {} value {}: {g:e} vs gguf-py {w:e}",
                    i / ty.block_len(),
                    i % ty.block_len()
                );
            }
            n += 1;
        }
        assert_eq!(n, 18);
    }

    /// ggml's own bytes (`ggml_quantize_chunk` from libggml-base, made by
    /// scripts/fixtures/make_kquant_encode_vectors.py) for rows of 512 values, without and with
    /// an importance vector.
    const ENCODE_ROWS: &[u8] = fixture!("encode/rows", ".f32");
    const ENCODE_IMATRIX: &[u8] = fixture!("encode/imatrix", ".f32");
    const ENCODED: &[(&str, &[u8], &[u8])] = &[
        (
            "q4_0",
            fixture!("encode/q4_0.plain", ".bin"),
            fixture!("encode/q4_0.imatrix", ".bin"),
        ),
        (
            "q5_0",
            fixture!("encode/q5_0.plain", ".bin"),
            fixture!("encode/q5_0.imatrix", ".bin"),
        ),
        (
            "q2_k",
            fixture!("encode/q2_k.plain", ".bin"),
            fixture!("encode/q2_k.imatrix", ".bin"),
        ),
        (
            "q3_k",
            fixture!("encode/q3_k.plain", ".bin"),
            fixture!("encode/q3_k.imatrix", ".bin"),
        ),
        (
            "q4_k",
            fixture!("encode/q4_k.plain", ".bin"),
            fixture!("encode/q4_k.imatrix", ".bin"),
        ),
        (
            "q5_k",
            fixture!("encode/q5_k.plain", ".bin"),
            fixture!("encode/q5_k.imatrix", ".bin"),
        ),
        (
            "q6_k",
            fixture!("encode/q6_k.plain", ".bin"),
            fixture!("encode/q6_k.imatrix", ".bin"),
        ),
        (
            "iq4_nl",
            fixture!("encode/iq4_nl.plain", ".bin"),
            fixture!("encode/iq4_nl.imatrix", ".bin"),
        ),
        (
            "iq4_xs",
            fixture!("encode/iq4_xs.plain", ".bin"),
            fixture!("encode/iq4_xs.imatrix", ".bin"),
        ),
    ];

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn encoders_match_ggml() {
        let x = f32s(ENCODE_ROWS);
        let imatrix = f32s(ENCODE_IMATRIX);
        let n_per_row = imatrix.len();
        let cases = ENCODED.iter().flat_map(|&(name, plain, weighted)| {
            [(name, None, plain), (name, Some(&imatrix[..]), weighted)]
        });
        for (name, w, want) in cases {
            let ty = GgmlType::from_name(name).expect("a known type");
            let got = super::quantize_weighted(ty, &x, n_per_row, w);
            assert_eq!(got.len(), want.len(), "{ty} size");
            let row_bytes = ty.row_bytes(n_per_row).unwrap();
            for (r, (g, e)) in got
                .chunks_exact(row_bytes)
                .zip(want.chunks_exact(row_bytes))
                .enumerate()
            {
                let at = g.iter().zip(e).position(|(a, b)| a != b);
                assert!(
                    at.is_none(),
                    "{ty} (importance: {}) row {r}: first differing byte {:?}",
                    w.is_some(),
                    at
                );
            }
        }
    }
}
