//! Deterministic pseudo-random test and benchmark data: f32 vectors and valid blocks of every
//! GGML type.

use half::f16;

use crate::gguf::GgmlType;

/// Deterministic pseudo-random values in [-scale, scale] (xorshift): test data and benchmark
/// weights.
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

/// Where a block of `ty` keeps its f16 scales (byte offsets). IQ1_M spreads its scale over four
/// nibbles and MXFP4 has a one-byte power of two: neither is listed.
pub fn f16_scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4NL => &[0],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        GgmlType::IQ2XXS
        | GgmlType::IQ2XS
        | GgmlType::IQ2S
        | GgmlType::IQ3XXS
        | GgmlType::IQ3S
        | GgmlType::IQ1S
        | GgmlType::IQ4XS => &[0],
        GgmlType::IQ1M | GgmlType::MXFP4 | GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
    }
}

/// Writes the f16 `d` as the super-block scale of the IQ1_M block `b` (the top nibbles of its
/// four scale words), keeping the 3-bit sub-block scales.
pub fn set_iq1_m_scale(b: &mut [u8], d: f16) {
    let bits = d.to_bits();
    for i in 0..4 {
        let at = 48 + 2 * i;
        let w = u16::from_le_bytes([b[at], b[at + 1]]);
        let w = (w & 0x0fff) | (((bits >> (4 * i)) & 0x0f) << 12);
        b[at..at + 2].copy_from_slice(&w.to_le_bytes());
    }
}

/// `n_blocks` blocks of `ty` from random bits, with every block scale replaced by a random
/// finite value of magnitude at most `scale` (of both signs where the format has a sign), so
/// that the values stay finite and of the size of trained weights. Float types are random values
/// of magnitude at most `scale`. Every quant, grid index, sign and sub-block scale bit pattern
/// is valid in these formats, so random bits cover them.
pub fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64, scale: f32) -> Vec<u8> {
    let bytes = ty.block_bytes();
    if ty.block_len() == 1 {
        let v = random_vec(n_blocks, seed, scale);
        return match ty {
            GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            GgmlType::F16 => v
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
            _ => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect(),
        };
    }
    let noise = random_vec(n_blocks * bytes, seed, 1.0);
    let mut out: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.99) as u8).collect();
    let offsets = f16_scale_offsets(ty);
    let ds = random_vec(n_blocks * offsets.len().max(1), seed ^ 0x5eed, scale);
    for (b, block) in out.chunks_exact_mut(bytes).enumerate() {
        for (i, &at) in offsets.iter().enumerate() {
            let d = f16::from_f32(ds[b * offsets.len() + i]);
            block[at..at + 2].copy_from_slice(&d.to_bits().to_le_bytes());
        }
        match ty {
            GgmlType::IQ1M => set_iq1_m_scale(block, f16::from_f32(ds[b])),
            // Half of 2^(e - 127) is 2^(e - 128): a power of two within a factor 8 below `scale`.
            GgmlType::MXFP4 => {
                let top = 128.0 + scale.log2().floor();
                block[0] = (top - (ds[b].abs() / scale * 3.99).floor()).clamp(0.0, 254.0) as u8;
            }
            _ => {}
        }
    }
    out
}
