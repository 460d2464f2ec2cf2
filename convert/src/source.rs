//! Where the values of one output tensor come from: a checkpoint tensor as is, or rearranged.
//! Below both `arch` (which names the sources) and `plan` (which collects them); a rearrangement
//! only one architecture needs is a [`Rearrange`] in that architecture's file.

use std::fmt::Debug;
use std::sync::Arc;

use crate::error::ConvertError;
use crate::hf::Checkpoint;

/// How the f32 values of one output tensor are produced from the checkpoint.
#[derive(Clone, Debug)]
pub enum Source {
    /// One HF tensor as is.
    Tensor(String),
    /// One HF q or k projection with its rows permuted for interleaved rope.
    PermutedQk { name: String, n_head: usize },
    /// HF tensors concatenated in order (per-expert matrices into one stacked tensor).
    Stack(Vec<String>),
    /// From a `[n_expert, 2 * ff, d]` fused tensor: the first (`part` 0) or second half of each
    /// expert's rows.
    FusedHalf {
        name: String,
        n_expert: usize,
        part: usize,
    },
    /// From a 2-D fused `[2 * ff, d]` matrix: the first (`part` 0) or second half of the rows.
    MatrixHalf { name: String, part: usize },
    /// One HF tensor passed through an architecture's own rearrangement.
    Rearranged {
        name: String,
        how: Arc<dyn Rearrange>,
    },
    /// Bytes already in a GGML block type, copied into the file as they are (no
    /// requantisation): an architecture's pre-quantized weights, such as gpt-oss's MXFP4
    /// experts. The planned tensor takes the packer's type whatever `--type` asks for.
    Packed(Arc<dyn Pack>),
}

/// What one output tensor holds: f32 values the writer encodes in the planned type, or bytes
/// already in it.
pub enum TensorData {
    Values(Vec<f32>),
    Encoded(Vec<u8>),
}

/// Builds a tensor's bytes directly in a GGML block type from checkpoint tensors.
pub trait Pack: Debug + Send + Sync {
    /// The type of the bytes.
    fn ty(&self) -> moe_runtime::gguf::GgmlType;

    /// The tensor's bytes, rows in ggml order.
    fn bytes(&self, ckpt: &Checkpoint) -> Result<Vec<u8>, ConvertError>;
}

/// A reordering of one checkpoint tensor's values that a single architecture needs.
pub trait Rearrange: Debug + Send + Sync {
    /// The output tensor's values (ggml order) from the whole HF tensor's (row-major). The plan
    /// has checked the HF tensor's shape.
    fn apply(&self, values: &[f32]) -> Vec<f32>;
}

/// Produces a planned tensor's data: packed bytes as they are, everything else as f32 values.
pub fn load(ckpt: &Checkpoint, source: &Source) -> Result<TensorData, ConvertError> {
    match source {
        Source::Packed(p) => p.bytes(ckpt).map(TensorData::Encoded),
        other => load_values(ckpt, other).map(TensorData::Values),
    }
}

/// Produces the f32 values of a planned tensor (row-major in ggml order).
pub fn load_values(ckpt: &Checkpoint, source: &Source) -> Result<Vec<f32>, ConvertError> {
    Ok(match source {
        Source::Tensor(name) => ckpt.read_f32(name)?,
        Source::PermutedQk { name, n_head } => {
            let info = ckpt.info(name)?;
            let rows = info.shape[0];
            let cols: usize = info.shape[1..].iter().product();
            permute_qk(&ckpt.read_f32(name)?, rows, cols, *n_head)
        }
        Source::Stack(names) => {
            let mut out = Vec::new();
            for n in names {
                ckpt.read_f32_into(n, &mut out)?;
            }
            out
        }
        Source::FusedHalf {
            name,
            n_expert,
            part,
        } => {
            let all = ckpt.read_f32(name)?;
            let per_expert = all.len() / n_expert;
            let half = per_expert / 2;
            all.chunks_exact(per_expert)
                .flat_map(|e| e[part * half..(part + 1) * half].iter().copied())
                .collect()
        }
        Source::MatrixHalf { name, part } => {
            let all = ckpt.read_f32(name)?;
            let half = all.len() / 2;
            all[part * half..(part + 1) * half].to_vec()
        }
        Source::Rearranged { name, how } => how.apply(&ckpt.read_f32(name)?),
        Source::Packed(p) => {
            let bytes = p.bytes(ckpt)?;
            let mut out = vec![0f32; bytes.len() / p.ty().block_bytes() * p.ty().block_len()];
            moe_runtime::tensor::quant::dequantize(p.ty(), &bytes, &mut out);
            out
        }
    })
}

/// llama.cpp's `LlamaModel.permute`: within each head, rows of the rotate-half layout
/// `[h, 2, d/2]` are reordered to interleaved pairs `[h, d/2, 2]`.
pub fn permute_qk(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * hd + 2 * i + j;
                let src = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn permute_matches_llama_cpp_formula() {
        // One head of 4 rows (d=4, half=2), 1 column: rows [a0 a1 b0 b1] -> [a0 b0 a1 b1].
        let w = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(super::permute_qk(&w, 4, 1, 1), vec![0.0, 2.0, 1.0, 3.0]);
    }
}
