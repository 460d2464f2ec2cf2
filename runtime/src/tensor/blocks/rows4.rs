//! Q8_0 and Q4_0 rows interleaved four at a time, after ggml's `block_q8_0x4` /
//! `block_q4_0x4` with blocks of 4 bytes (what its CPU_REPACK buffer makes at load): within a
//! group of four rows, block by block, the rows' values in 4-byte pieces, row after row within
//! each piece. A 16-byte vector then holds one piece of each of the four rows, so one `sdot` by
//! lane (against 4 activation bytes broadcast) adds to all four rows' sums at once, with no
//! pairwise reduction afterwards. Unlike ggml, a group keeps its blocks' scales apart, before
//! its values (four f16 per block): the values of consecutive blocks are then 16-byte aligned
//! from the group's start and load in pairs, and two blocks' scales are one 16-byte load.
//!
//! The packed size equals the file's (a group of `nb` blocks is `nb x (8 + 4 x 32)` bytes for
//! Q8_0, `nb x (8 + 4 x 16)` for Q4_0), so a packed matrix replaces the file's bytes one for
//! one. Q4_0's nibbles are stored XOR 0x88: then `byte << 4` and `byte & 0xf0`, read as i8, are
//! 16 times the signed values `q - 8`, two instructions per 16 bytes with nothing to subtract.

use super::block32::{Q4_0_BYTES, Q8_0_BYTES};
use super::QK;
use crate::gguf::GgmlType;

/// Rows per interleaved group.
pub const ROWS: usize = 4;
/// Bytes of one block's four scales in a group.
pub const SCALE_BYTES: usize = 2 * ROWS;

/// The format's file block size and how many 4-byte pieces of each row a packed block holds
/// (Q4_0's 16 bytes of nibbles serve both halves of the block).
fn format(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q8_0 => (Q8_0_BYTES, QK / 4),
        GgmlType::Q4_0 => (Q4_0_BYTES, QK / 8),
        _ => panic!("no packed layout for {ty}"),
    }
}

/// Rows of Q8_0 or Q4_0 (`rows` a multiple of 4, rows back to back) in the packed layout.
pub fn pack(ty: GgmlType, data: &[u8], rows: usize) -> Vec<u8> {
    let (block_bytes, pieces) = format(ty);
    let flip = if ty == GgmlType::Q4_0 { 0x88 } else { 0 };
    let (row_bytes, nb) = shape(data.len(), rows, block_bytes);
    let mut out = vec![0u8; data.len()];
    for (group, dst) in data
        .chunks_exact(ROWS * row_bytes)
        .zip(out.chunks_exact_mut(ROWS * row_bytes))
    {
        let (scales, values) = dst.split_at_mut(nb * SCALE_BYTES);
        let values_bytes = values.len() / nb;
        for b in 0..nb {
            for r in 0..ROWS {
                let src = &group[r * row_bytes + b * block_bytes..][..block_bytes];
                scales[b * SCALE_BYTES + 2 * r..][..2].copy_from_slice(&src[..2]);
                for piece in 0..pieces {
                    let at = b * values_bytes + 16 * piece + 4 * r;
                    for (d, s) in values[at..at + 4].iter_mut().zip(&src[2 + 4 * piece..]) {
                        *d = s ^ flip;
                    }
                }
            }
        }
    }
    out
}

/// The file layout back from [`pack`] (`unpack(pack(x)) == x`; for tables without packed
/// products, and tests).
pub fn unpack(ty: GgmlType, packed: &[u8], rows: usize) -> Vec<u8> {
    let (block_bytes, pieces) = format(ty);
    let flip = if ty == GgmlType::Q4_0 { 0x88 } else { 0 };
    let (row_bytes, nb) = shape(packed.len(), rows, block_bytes);
    let mut out = vec![0u8; packed.len()];
    for (src, group) in packed
        .chunks_exact(ROWS * row_bytes)
        .zip(out.chunks_exact_mut(ROWS * row_bytes))
    {
        let (scales, values) = src.split_at(nb * SCALE_BYTES);
        let values_bytes = values.len() / nb;
        for b in 0..nb {
            for r in 0..ROWS {
                let dst = &mut group[r * row_bytes + b * block_bytes..][..block_bytes];
                dst[..2].copy_from_slice(&scales[b * SCALE_BYTES + 2 * r..][..2]);
                for piece in 0..pieces {
                    let at = b * values_bytes + 16 * piece + 4 * r;
                    for (d, s) in dst[2 + 4 * piece..6 + 4 * piece]
                        .iter_mut()
                        .zip(&values[at..])
                    {
                        *d = s ^ flip;
                    }
                }
            }
        }
    }
    out
}

/// The shape of a product over packed rows (`kernels::Kernels::gemm_q8_0_rows4` and
/// `gemm_q4_0_rows4`): `rows` rows packed in `w` (a block's four rows' values taking
/// `value_bytes`, after their scales) times `n` Q8_0 activation rows in `x`, into `out`. Checks
/// what the kernels rely on and returns (groups of four rows, blocks per row); `rows` and `n`
/// must be non-zero.
pub fn product_shape(
    w: &[u8],
    value_bytes: usize,
    rows: usize,
    x: &[u8],
    n: usize,
    out: &[f32],
) -> (usize, usize) {
    assert!(rows.is_multiple_of(ROWS), "packed rows come in fours");
    assert!(out.len() >= rows * n, "gemm shape");
    let groups = rows / ROWS;
    let block_bytes = SCALE_BYTES + value_bytes;
    assert_eq!(w.len() % (groups * block_bytes), 0, "whole group blocks");
    let nb = w.len() / groups / block_bytes;
    assert_eq!(
        x.len(),
        n * nb * Q8_0_BYTES,
        "one activation block per weight block"
    );
    (groups, nb)
}

/// Bytes per row and blocks per row of `rows` rows in `len` bytes.
fn shape(len: usize, rows: usize, block_bytes: usize) -> (usize, usize) {
    assert!(
        rows > 0 && rows.is_multiple_of(ROWS),
        "whole groups of four rows"
    );
    assert!(
        len.is_multiple_of(rows * block_bytes),
        "whole blocks per row"
    );
    (len / rows, len / rows / block_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    /// Packing keeps every byte (round trip), and puts row r's scale and values of block b
    /// where the kernels read them.
    #[test]
    fn packing_round_trips_and_places_values() {
        for (rows, nb) in [(4, 1), (8, 3), (12, 2)] {
            for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
                let (block_bytes, pieces) = format(ty);
                let data = bytes(rows * nb * block_bytes, 3 + nb as u64);
                let packed = pack(ty, &data, rows);
                assert_eq!(unpack(ty, &packed, rows), data, "{ty}");
                let (g, r, b) = (rows / 4 - 1, 2, nb - 1);
                let group = g * 4 * nb * block_bytes;
                let src = &data[(4 * g + r) * nb * block_bytes + b * block_bytes..];
                let scale = group + b * 8 + 2 * r;
                assert_eq!(packed[scale..scale + 2], src[..2], "{ty}");
                // The last piece: values 28..32 of Q8_0, 12..16 and 28..32 of Q4_0.
                let piece = pieces - 1;
                let at = group + nb * 8 + b * 16 * pieces + 16 * piece + 4 * r;
                let flip = if ty == GgmlType::Q4_0 { 0x88 } else { 0 };
                let want: Vec<u8> = src[2 + 4 * piece..6 + 4 * piece]
                    .iter()
                    .map(|v| v ^ flip)
                    .collect();
                assert_eq!(packed[at..at + 4], want[..], "{ty}");
            }
        }
    }
}
