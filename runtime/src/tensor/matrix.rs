//! Weight matrices borrowed from the model file, and the matrix product the model runs on them.

use rayon::prelude::*;

use super::kernels::Kernels;
use super::quant::{dequantize, Q8_0_BYTES, QK};
use crate::gguf::GgmlType;

/// A row-major `rows x cols` weight matrix in some GGML type (ggml dims `[cols, rows]`),
/// borrowed from the mapped file or from an expert cache slot.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols).expect("validated at load")
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantizes row `r` into `out` (used for embeddings and small vectors).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.ty, self.row(r), &mut out[..self.cols]);
    }
}

/// Reusable buffers for [`matmul`], so steady-state decoding allocates nothing.
#[derive(Default)]
pub struct MatmulScratch {
    /// Activations quantized to Q8_0, `n` rows.
    q8: Vec<u8>,
    /// Results in `[rows, n]` order while threads fill disjoint row ranges.
    transposed: Vec<f32>,
}

/// How activations are presented to a weight type's dot product.
fn wants_q8_activations(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0)
}

/// `out[t, r] = sum_c w[r, c] * x[t, c]` for `n` tokens: `x` is `[n, cols]`, `out` is `[n, rows]`.
///
/// Threads split the weight rows, and each weight row is dotted with all `n` activations while it
/// is hot in cache, so a batch reads the weights once. Each output value is computed by one thread
/// in a fixed order, so results do not depend on the thread count.
pub fn matmul(
    k: &Kernels,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(x.len(), n * cols, "activation shape");
    assert_eq!(out.len(), n * rows, "output shape");
    if n == 0 {
        return;
    }
    let q8_row = cols / QK * Q8_0_BYTES;
    if wants_q8_activations(w.ty) {
        scratch.q8.resize(n * q8_row, 0);
        for (xr, qr) in x
            .chunks_exact(cols)
            .zip(scratch.q8.chunks_exact_mut(q8_row))
        {
            (k.quantize_q8_0)(xr, qr);
        }
    }
    let q8 = &scratch.q8[..];

    let dot_row = |r: usize, dst: &mut [f32], row_buf: &mut Vec<f32>| {
        let wr = w.row(r);
        match w.ty {
            GgmlType::F32 => {
                // Tensors start on aligned offsets, so the cast succeeds; decode if it ever doesn't.
                let wf: &[f32] = match bytemuck::try_cast_slice(wr) {
                    Ok(wf) => wf,
                    Err(_) => {
                        row_buf.resize(cols, 0.0);
                        dequantize(GgmlType::F32, wr, row_buf);
                        row_buf
                    }
                };
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = (k.dot_f32)(wf, &x[t * cols..(t + 1) * cols]);
                }
            }
            GgmlType::F16 => {
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = (k.dot_f16)(wr, &x[t * cols..(t + 1) * cols]);
                }
            }
            GgmlType::BF16 => {
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = (k.dot_bf16)(wr, &x[t * cols..(t + 1) * cols]);
                }
            }
            GgmlType::Q8_0 => {
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = (k.dot_q8_0_q8_0)(wr, &q8[t * q8_row..(t + 1) * q8_row]);
                }
            }
            GgmlType::Q4_0 => {
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = (k.dot_q4_0_q8_0)(wr, &q8[t * q8_row..(t + 1) * q8_row]);
                }
            }
            GgmlType::Q4K | GgmlType::Q6K => {
                row_buf.resize(cols, 0.0);
                dequantize(w.ty, wr, row_buf);
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = (k.dot_f32)(row_buf, &x[t * cols..(t + 1) * cols]);
                }
            }
        }
    };

    if n == 1 {
        // Decode: results are already in output order.
        let chunk = rows_per_task(rows);
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each_init(Vec::new, |buf, (ci, dst)| {
                for (i, d) in dst.chunks_exact_mut(1).enumerate() {
                    dot_row(ci * chunk + i, d, buf);
                }
            });
        return;
    }

    scratch.transposed.resize(rows * n, 0.0);
    let chunk = rows_per_task(rows);
    scratch
        .transposed
        .par_chunks_mut(chunk * n)
        .enumerate()
        .for_each_init(Vec::new, |buf, (ci, dst)| {
            for (i, d) in dst.chunks_exact_mut(n).enumerate() {
                dot_row(ci * chunk + i, d, buf);
            }
        });
    for (r, vals) in scratch.transposed.chunks_exact(n).enumerate() {
        for (t, &v) in vals.iter().enumerate() {
            out[t * rows + r] = v;
        }
    }
}

/// Rows per rayon task: enough tasks to balance threads, few enough to keep overhead low.
fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (rows / (threads * 8)).clamp(4, 256)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::kernels::tests::random_vec;
    use crate::tensor::quant::quantize;

    /// A batch gives exactly the rows of one-token products, whatever the batch size: results
    /// must not depend on how work is split.
    #[test]
    fn batched_equals_single_token_bit_for_bit() {
        let k = crate::tensor::kernels::best();
        let (rows, cols, n) = (37, 96, 5);
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
        ] {
            let w = random_vec(rows * cols, 7, 1.0);
            let data = quantize(ty, &w);
            let m = QMatrix {
                ty,
                rows,
                cols,
                data: &data,
            };
            let x = random_vec(n * cols, 9, 2.0);
            let mut batch = vec![0f32; n * rows];
            let mut scratch = MatmulScratch::default();
            matmul(k, &m, &x, n, &mut batch, &mut scratch);
            for t in 0..n {
                let mut one = vec![0f32; rows];
                matmul(
                    k,
                    &m,
                    &x[t * cols..(t + 1) * cols],
                    1,
                    &mut one,
                    &mut scratch,
                );
                assert_eq!(&batch[t * rows..(t + 1) * rows], &one[..], "{ty} token {t}");
            }
        }
    }
}
