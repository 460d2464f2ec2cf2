//! Weight matrices borrowed from the model file, and the matrix products the model runs on them.

use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

use super::blocks::block32::{Q8_0_BYTES, QK};
use super::blocks::kquant::{self, Q8_K_BYTES};
use super::blocks::rows4;
use super::blocks::QK_K;
use super::kernels::{ActFormat, Kernels, Quantize};
use super::quant::dequantize;
use crate::gguf::GgmlType;

/// A row-major `rows x cols` weight matrix in some GGML type (ggml dims `[cols, rows]`),
/// borrowed from the mapped file, from an expert cache slot or from a packed copy.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    pub layout: RowLayout,
}

/// How a matrix's rows lie in its bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RowLayout {
    /// One row after another, as in the file.
    #[default]
    File,
    /// Q8_0/Q4_0 rows interleaved four at a time (`blocks::rows4`), for a table with
    /// [`Kernels::gemm_rows4`]; same size as the file's rows.
    Rows4,
}

impl<'a> QMatrix<'a> {
    /// A matrix in the file's row layout.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Self {
        Self {
            ty,
            rows,
            cols,
            data,
            layout: RowLayout::File,
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols).expect("validated at load")
    }

    /// Row `r`'s bytes (only in the file layout; packed matrices only take products).
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert_eq!(self.layout, RowLayout::File, "a packed matrix has no rows");
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantizes row `r` into `out` (used for embeddings and small vectors).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.ty, self.row(r), &mut out[..self.cols]);
    }
}

/// Activation rows prepared for every weight type: the f32 values and, when the row length is a
/// whole number of blocks, their Q8_0 encoding (what the 32-value formats are dotted with) and
/// Q8_K encoding (for the k-quants and i-quants; made on first use, since most files have none).
#[derive(Default)]
pub struct Activations {
    pub n: usize,
    pub cols: usize,
    pub x: Vec<f32>,
    pub q8: Vec<u8>,
    q8k: OnceLock<Vec<u8>>,
    /// The last Q8_K buffer, kept for the next encoding so that decoding allocates nothing.
    q8k_spare: Mutex<Vec<u8>>,
    /// The kernel table's Q8_K quantizer (the reference until a table quantizes these rows).
    quantize_q8k: Option<Quantize>,
}

/// One activation row in every encoding a weight type may need.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub x: &'a [f32],
    pub q8: &'a [u8],
    acts: &'a Activations,
    t: usize,
}

impl<'a> ActRow<'a> {
    /// The row's Q8_K encoding (empty when the row is not whole 256-value blocks).
    pub fn q8k(&self) -> &'a [u8] {
        row_of(self.acts.q8k(), self.acts.cols / QK_K * Q8_K_BYTES, self.t)
    }

    /// The row in the activation format `format`.
    pub fn encoded(&self, format: ActFormat) -> &'a [u8] {
        match format {
            ActFormat::Q8_0 => self.q8,
            ActFormat::Q8K => self.q8k(),
        }
    }
}

/// Rows at least this many go through the pool when quantized.
const PARALLEL_QUANTIZE_ROWS: usize = 8;

impl Activations {
    /// Copies `x` (`[n, cols]`) and quantizes each row.
    pub fn prepare(&mut self, k: &Kernels, x: &[f32], n: usize, cols: usize) {
        assert_eq!(x.len(), n * cols, "activation shape");
        self.n = n;
        self.cols = cols;
        self.x.clear();
        self.x.extend_from_slice(x);
        self.quantize(k);
    }

    /// Re-quantizes after `x` was filled in place (rows in parallel for a batch: serial, this
    /// was a tenth of prompt processing).
    pub fn quantize(&mut self, k: &Kernels) {
        self.reset_q8k();
        self.quantize_q8k = Some(k.quantize_q8_k);
        if !self.cols.is_multiple_of(QK) {
            self.q8.clear();
            return;
        }
        let rb = self.cols / QK * Q8_0_BYTES;
        self.q8.resize(self.n * rb, 0);
        let rows = self
            .x
            .par_chunks_exact(self.cols)
            .zip(self.q8.par_chunks_exact_mut(rb));
        if self.n >= PARALLEL_QUANTIZE_ROWS {
            rows.for_each(|(xr, qr)| (k.quantize_q8_0)(xr, qr));
        } else {
            for (xr, qr) in self
                .x
                .chunks_exact(self.cols)
                .zip(self.q8.chunks_exact_mut(rb))
            {
                (k.quantize_q8_0)(xr, qr);
            }
        }
    }

    /// Forgets the Q8_K encoding (the rows changed), keeping its buffer.
    fn reset_q8k(&mut self) {
        if let Some(q) = self.q8k.take() {
            *self.q8k_spare.get_mut().unwrap_or_else(|e| e.into_inner()) = q;
        }
    }

    /// The Q8_K encoding of every row, made on first use.
    fn q8k(&self) -> &[u8] {
        self.q8k.get_or_init(|| {
            if !self.cols.is_multiple_of(QK_K) {
                return Vec::new();
            }
            let rb = self.cols / QK_K * Q8_K_BYTES;
            let mut q =
                std::mem::take(&mut *self.q8k_spare.lock().unwrap_or_else(|e| e.into_inner()));
            q.clear();
            q.resize(self.n * rb, 0);
            let quantize = self.quantize_q8k.unwrap_or(kquant::quantize_row_q8_k);
            for (xr, qr) in self.x.chunks_exact(self.cols).zip(q.chunks_exact_mut(rb)) {
                quantize(xr, qr);
            }
            q
        })
    }

    /// Makes the encoding in `format` now (the Q8_K one is otherwise made on first use), so that
    /// [`Activations::gather`] copies it instead of every gathered set encoding its rows again.
    pub fn encode(&self, format: ActFormat) {
        if format == ActFormat::Q8K {
            self.q8k();
        }
    }

    /// Copies rows `tokens` of `src` (every encoding `src` has made), so that one expert's
    /// tokens are contiguous for the tiled products.
    pub fn gather(&mut self, src: &Activations, tokens: impl Iterator<Item = usize>) {
        self.cols = src.cols;
        self.n = 0;
        self.x.clear();
        self.q8.clear();
        self.reset_q8k();
        self.quantize_q8k = src.quantize_q8k;
        let src_q8k = src.q8k.get().filter(|q| !q.is_empty());
        let mut q8k = src_q8k.map(|_| {
            let mut q = std::mem::take(self.q8k_spare.get_mut().unwrap_or_else(|e| e.into_inner()));
            q.clear();
            q
        });
        for t in tokens {
            let r = src.row(t);
            self.x.extend_from_slice(r.x);
            self.q8.extend_from_slice(r.q8);
            if let Some(q) = q8k.as_mut() {
                q.extend_from_slice(r.q8k());
            }
            self.n += 1;
        }
        if let Some(q) = q8k {
            // Empty: `reset_q8k` above took any earlier encoding out.
            let _ = self.q8k.set(q);
        }
    }

    pub fn row(&self, t: usize) -> ActRow<'_> {
        let x = &self.x[t * self.cols..(t + 1) * self.cols];
        ActRow {
            x,
            q8: row_of(&self.q8, self.cols / QK * Q8_0_BYTES, t),
            acts: self,
            t,
        }
    }
}

/// Row `t` of a buffer of `row_bytes`-sized rows, or nothing when the encoding was not made.
fn row_of(buf: &[u8], row_bytes: usize, t: usize) -> &[u8] {
    if buf.is_empty() {
        &[]
    } else {
        &buf[t * row_bytes..(t + 1) * row_bytes]
    }
}

/// Dot product of weight row `r` with one activation row. `buf` is scratch for the rare
/// unaligned f32 tensor.
#[inline]
pub fn dot_row(k: &Kernels, w: &QMatrix, r: usize, a: ActRow, buf: &mut Vec<f32>) -> f32 {
    let wr = w.row(r);
    let x = a.x;
    match w.ty {
        GgmlType::F32 => match bytemuck::try_cast_slice::<u8, f32>(wr) {
            // Tensors start on aligned offsets, so the cast succeeds; decode if it ever doesn't.
            Ok(wf) => (k.dot_f32)(wf, x),
            Err(_) => {
                buf.resize(w.cols, 0.0);
                dequantize(GgmlType::F32, wr, buf);
                (k.dot_f32)(buf, x)
            }
        },
        GgmlType::F16 => (k.dot_f16)(wr, x),
        GgmlType::BF16 => (k.dot_bf16)(wr, x),
        quantized => {
            let (dot, format) = k.quant_dot(quantized).expect("a quantized type");
            dot(wr, a.encoded(format))
        }
    }
}

/// `out[i * n + t] = w_(row0 + i) . x_t` for `len` consecutive rows of `w` and all `n` rows of
/// `acts`. Types with a tiled product in the table ([`Kernels::gemm`]: the 32-value formats but
/// Q5_0, the k-quants, IQ4_XS) go through it (on x86 each weight block is loaded once
/// for several tokens, and there is no per-row dispatch); other types pair by pair. Either way
/// each value equals [`dot_row`] of its pair.
pub fn rows_times_acts(
    k: &Kernels,
    w: &QMatrix,
    row0: usize,
    len: usize,
    acts: &Activations,
    out: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let n = acts.n;
    if w.layout == RowLayout::Rows4 {
        packed_rows_times_acts(k, w, row0, len, acts, out);
        return;
    }
    let gemm = k.gemm(w.ty).and_then(|(gemm, format)| {
        let x = match format {
            ActFormat::Q8_0 => &acts.q8[..],
            ActFormat::Q8K => acts.q8k(),
        };
        (!x.is_empty()).then_some((gemm, x))
    });
    match gemm {
        Some((gemm, x)) if len > 0 && n > 0 => {
            let rb = w.row_bytes();
            gemm(
                &w.data[row0 * rb..(row0 + len) * rb],
                len,
                x,
                n,
                &mut out[..len * n],
            );
        }
        _ => {
            for (i, o) in out[..len * n].chunks_exact_mut(n.max(1)).enumerate() {
                for (t, v) in o.iter_mut().enumerate() {
                    *v = dot_row(k, w, row0 + i, acts.row(t), buf);
                }
            }
        }
    }
}

/// [`rows_times_acts`] for a matrix packed four rows at a time. Row ranges that do not start and
/// end on a group (a task split between matrices of other row counts) compute the whole groups
/// they touch into a scratch block and keep their rows.
fn packed_rows_times_acts(
    k: &Kernels,
    w: &QMatrix,
    row0: usize,
    len: usize,
    acts: &Activations,
    out: &mut [f32],
) {
    let n = acts.n;
    if len == 0 || n == 0 {
        return;
    }
    let (group_rows, group_bytes) = (rows4::ROWS, rows4::ROWS * w.row_bytes());
    let (g0, g1) = (row0 / group_rows, (row0 + len).div_ceil(group_rows));
    let data = &w.data[g0 * group_bytes..g1 * group_bytes];
    let rows = (g1 - g0) * group_rows;
    let Some(gemm) = k.gemm_rows4(w.ty) else {
        // Packed for another table (a test's): unpack the groups and take the file layout's
        // product, which gives the same values.
        let unpacked = rows4::unpack(w.ty, data, rows);
        let m = QMatrix::new(w.ty, rows, w.cols, &unpacked);
        let skip = row0 - g0 * group_rows;
        return rows_times_acts(k, &m, skip, len, acts, out, &mut Vec::new());
    };
    if row0.is_multiple_of(group_rows) && len == rows {
        gemm(data, rows, &acts.q8, n, &mut out[..len * n]);
    } else {
        let mut block = vec![0f32; rows * n];
        gemm(data, rows, &acts.q8, n, &mut block);
        let skip = row0 - g0 * group_rows;
        out[..len * n].copy_from_slice(&block[skip * n..(skip + len) * n]);
    }
}

/// Reusable buffers for [`matmul`], so steady-state decoding allocates nothing.
#[derive(Default)]
pub struct MatmulScratch {
    acts: Activations,
    /// Results in `[rows, n]` order while threads fill disjoint row ranges.
    transposed: Vec<f32>,
}

/// `out[t, r] = sum_c w[r, c] * x[t, c]` for `n` tokens: `x` is `[n, cols]`, `out` is `[n, rows]`.
pub fn matmul(
    k: &Kernels,
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    multi_matmul(k, &[*w], x, n, &mut [out], scratch);
}

/// Several products of the same activations (`x` is `[n, cols]`), e.g. the q, k and v
/// projections, in one parallel pass: `outs[i]` is `[n, mats[i].rows]`.
///
/// Threads split the weight rows, and each weight row is dotted with all `n` activations while it
/// is hot in cache, so a batch reads the weights once. Each output value is computed by one thread
/// in a fixed order, so results do not depend on the thread count.
pub fn multi_matmul(
    k: &Kernels,
    mats: &[QMatrix],
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
    scratch: &mut MatmulScratch,
) {
    assert_eq!(mats.len(), outs.len());
    if n == 0 || mats.is_empty() {
        return;
    }
    let cols = mats[0].cols;
    for (m, o) in mats.iter().zip(outs.iter()) {
        assert_eq!(m.cols, cols, "all matrices share the activation width");
        assert_eq!(o.len(), n * m.rows, "output shape");
    }
    scratch.acts.prepare(k, x, n, cols);
    let acts = &scratch.acts;
    let total_rows: usize = mats.iter().map(|m| m.rows).sum();
    scratch.transposed.resize(total_rows * n, 0.0);
    // A product this small (a router, one token) costs less than handing it to the pool.
    let small = total_rows * cols * n <= SERIAL_MACS;
    let chunk = if small {
        total_rows
    } else {
        rows_per_task(total_rows)
    };
    let task = |buf: &mut Vec<f32>, (ci, dst): (usize, &mut [f32])| {
        // The chunk's global rows, split at matrix boundaries.
        let (mut g, end) = (ci * chunk, ci * chunk + dst.len() / n);
        let mut dst = dst;
        let mut mat_start = 0;
        for m in mats {
            let mat_end = mat_start + m.rows;
            if g < mat_end && g < end {
                let len = end.min(mat_end) - g;
                let (here, rest) = dst.split_at_mut(len * n);
                rows_times_acts(k, m, g - mat_start, len, acts, here, buf);
                dst = rest;
                g += len;
            }
            mat_start = mat_end;
        }
    };
    if small {
        DEQUANT.with_borrow_mut(|buf| task(buf, (0, &mut scratch.transposed[..])));
    } else {
        scratch
            .transposed
            .par_chunks_mut(chunk * n)
            .enumerate()
            .for_each(|job| DEQUANT.with_borrow_mut(|buf| task(buf, job)));
    }
    let mut start = 0;
    for (m, o) in mats.iter().zip(outs.iter_mut()) {
        let block = &scratch.transposed[start * n..(start + m.rows) * n];
        if n == 1 {
            o.copy_from_slice(block);
        } else {
            for (r, vals) in block.chunks_exact(n).enumerate() {
                for (t, &v) in vals.iter().enumerate() {
                    o[t * m.rows + r] = v;
                }
            }
        }
        start += m.rows;
    }
}

thread_local! {
    /// Per-thread scratch for rows [`dot_row`] dequantizes, kept across calls so that
    /// decoding allocates nothing.
    static DEQUANT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Products of at most this many multiply-adds run on the calling thread.
const SERIAL_MACS: usize = 1 << 17;

/// Rows per rayon task: enough tasks to balance threads, few enough to keep overhead low; a
/// multiple of 4, so that tasks keep packed groups of four rows whole.
pub fn rows_per_task(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (rows / (threads * 8)).clamp(4, 256) / rows4::ROWS * rows4::ROWS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::quant::quantize;
    use crate::tensor::random::{random_blocks, random_vec};

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
            let m = QMatrix::new(ty, rows, cols, &data);
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

    /// Rows of every block type but Q8_0 and Q4_0 (the k-quants and i-quants as Hub files
    /// carry them, random blocks) go through `matmul` to the product of the dequantized
    /// weights, up to the activations' 8-bit rounding (half a step of the largest activation
    /// per weight), one token or a batch.
    #[test]
    fn decode_only_types_through_matmul() {
        let k = crate::tensor::kernels::best();
        let (rows, cols, n) = (6, 512, 3);
        let covered_above = [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
        ];
        for &ty in GgmlType::all()
            .iter()
            .filter(|t| !covered_above.contains(t))
        {
            let data = random_blocks(ty, rows * cols / ty.block_len(), 77, 0.02);
            let m = QMatrix::new(ty, rows, cols, &data);
            let x = random_vec(n * cols, 8, 1.0);
            let mut got = vec![0f32; n * rows];
            matmul(k, &m, &x, n, &mut got, &mut MatmulScratch::default());
            for (t, xt) in x.chunks_exact(cols).enumerate() {
                let mut one = vec![0f32; rows];
                matmul(k, &m, xt, 1, &mut one, &mut MatmulScratch::default());
                assert_eq!(one, got[t * rows..(t + 1) * rows], "{ty} token {t}");
                let step = xt.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                for (r, g) in one.iter().enumerate() {
                    let mut wd = vec![0f32; cols];
                    m.dequantize_row(r, &mut wd);
                    let want: f64 = wd.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let l1: f64 = wd.iter().map(|a| a.abs() as f64).sum();
                    let tol = l1 * step as f64 * 0.5 * 1.01 + 1e-5 * l1;
                    assert!(
                        (*g as f64 - want).abs() <= tol,
                        "{ty} row {r}: {g} vs {want} (tolerance {tol})"
                    );
                }
            }
        }
    }

    /// Gathered rows carry the source's Q8_K encoding when it was made, and it is the one the
    /// gathered rows would have made themselves.
    #[test]
    fn gathered_rows_keep_their_encodings() {
        let k = crate::tensor::kernels::best();
        let (n, cols) = (5, 512);
        let x = random_vec(n * cols, 4, 1.0);
        let mut src = Activations::default();
        src.prepare(k, &x, n, cols);
        let picks = [3, 0, 3, 4];
        let mut fresh = Activations::default();
        fresh.gather(&src, picks.iter().copied());
        src.encode(ActFormat::Q8K);
        let mut copied = Activations::default();
        // Twice, so that the second gather reuses the first one's buffers.
        copied.gather(&src, [1, 2].into_iter());
        copied.gather(&src, picks.iter().copied());
        assert_eq!(copied.n, picks.len());
        for (t, &p) in picks.iter().enumerate() {
            let mut want = vec![0u8; cols / QK_K * Q8_K_BYTES];
            kquant::quantize_row_q8_k(&x[p * cols..(p + 1) * cols], &mut want);
            assert_eq!(copied.row(t).q8k(), &want[..], "row {t}");
            assert_eq!(fresh.row(t).q8k(), &want[..], "row {t}");
            assert_eq!(copied.row(t).q8, src.row(p).q8, "row {t}");
        }
    }

    /// A matrix packed four rows at a time gives the file layout's products bit for bit, for
    /// row ranges that start or end inside a group, one token or a batch, in every table this
    /// CPU runs: with packed products (NEON with dotprod, AVX2, VNNI) and without (the scalar
    /// one, which unpacks the groups).
    #[test]
    fn packed_matrices_give_the_file_layouts_products() {
        let tables = crate::tensor::kernels::tables();
        let (rows, cols) = (12, 96);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
            let data = quantize(ty, &random_vec(rows * cols, 41, 1.0));
            let packed = rows4::pack(ty, &data, rows);
            let file = QMatrix::new(ty, rows, cols, &data);
            let m = QMatrix {
                layout: RowLayout::Rows4,
                data: &packed,
                ..file
            };
            for n in [1, 5] {
                let mut acts = Activations::default();
                for &k in &tables {
                    acts.prepare(k, &random_vec(n * cols, 42, 2.0), n, cols);
                    for (row0, len) in [(0, 12), (4, 8), (1, 6), (5, 3), (11, 1), (0, 0)] {
                        let mut got = vec![0f32; len * n];
                        let mut want = vec![0f32; len * n];
                        rows_times_acts(k, &m, row0, len, &acts, &mut got, &mut Vec::new());
                        rows_times_acts(k, &file, row0, len, &acts, &mut want, &mut Vec::new());
                        assert_eq!(got, want, "{} {ty} rows {row0}+{len} n={n}", k.name);
                    }
                }
            }
        }
    }

    #[test]
    fn multi_matmul_equals_separate_products() {
        let k = crate::tensor::kernels::best();
        let (cols, n) = (64, 3);
        let shapes = [
            (16, GgmlType::Q8_0),
            (8, GgmlType::F32),
            (8, GgmlType::Q4_0),
        ];
        let datas: Vec<Vec<u8>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(rows, ty))| quantize(ty, &random_vec(rows * cols, 20 + i as u64, 1.0)))
            .collect();
        let mats: Vec<QMatrix> = shapes
            .iter()
            .zip(&datas)
            .map(|(&(rows, ty), d)| QMatrix::new(ty, rows, cols, d))
            .collect();
        let x = random_vec(n * cols, 3, 1.0);
        let mut scratch = MatmulScratch::default();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0.0; n * m.rows]).collect();
        {
            let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            multi_matmul(k, &mats, &x, n, &mut refs, &mut scratch);
        }
        for (m, o) in mats.iter().zip(&outs) {
            let mut single = vec![0.0; n * m.rows];
            matmul(k, m, &x, n, &mut single, &mut scratch);
            assert_eq!(&single, o);
        }
    }
}
