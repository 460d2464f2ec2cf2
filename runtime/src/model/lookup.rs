//! Finding a file's tensors by their llama.cpp names, with their shapes checked: matrices,
//! small vectors decoded to f32, and stacked per-expert matrices split into slabs.

use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::tensor::blocks::rows4;
use crate::tensor::matrix::RowLayout;
use crate::tensor::{Kernels, QMatrix};

use super::error::ModelError;

/// One expert's matrix inside the file: its type, bytes and where they start.
#[derive(Clone, Copy, Debug)]
pub struct ExpertSlab<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    /// Where `data` starts in the file (for reading experts with pread instead of the map).
    pub file_offset: usize,
}

/// `n_expert` matrices of `rows x cols`, one per expert. Usually one stacked tensor (ggml dims
/// `[cols, rows, n_expert]`, expert `e` one contiguous slab, llama.cpp's layout); in moe-edge's
/// mixed-precision extension one 2-D tensor per expert, each with its own type (see
/// `moe::calib`), so slabs may differ in type and size. MLA's per-head `attn_k_b`/`attn_v_b`
/// use the stacked layout too.
#[derive(Clone, Debug)]
pub struct StackedExperts<'a> {
    pub rows: usize,
    pub cols: usize,
    pub n_expert: usize,
    pub slabs: Vec<ExpertSlab<'a>>,
    /// The whole stacked tensor, when resident experts may be packed four rows at a time
    /// ([`StackedExperts::resident`]); streamed experts always keep the file's layout.
    packable: Option<Packable<'a>>,
}

/// A stacked tensor's file and header entry, for packing it.
#[derive(Clone, Copy)]
struct Packable<'a> {
    file: &'a GgufFile,
    info: &'a TensorInfo,
}

impl std::fmt::Debug for Packable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "packable {}", self.info.name)
    }
}

impl<'a> StackedExperts<'a> {
    /// Slabs of a stacked tensor: `data` split in `n_expert` equal parts.
    pub(crate) fn stacked(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        n_expert: usize,
        data: &'a [u8],
        file_offset: usize,
    ) -> Self {
        let sb = data.len() / n_expert;
        let slabs = (0..n_expert)
            .map(|e| ExpertSlab {
                ty,
                data: &data[e * sb..(e + 1) * sb],
                file_offset: file_offset + e * sb,
            })
            .collect();
        Self {
            rows,
            cols,
            n_expert,
            slabs,
            packable: None,
        }
    }

    pub fn slab_bytes(&self, e: usize) -> usize {
        self.slabs[e].data.len()
    }

    /// Expert `e`'s matrix in the file's layout (what the expert cache reads).
    pub fn expert(&self, e: usize) -> QMatrix<'a> {
        let s = self.slabs[e];
        QMatrix::new(s.ty, self.rows, self.cols, s.data)
    }

    /// Expert `e`'s matrix for a run with every expert resident: packed four rows at a time
    /// when `k` has products over that layout (the whole stacked tensor is packed on the first
    /// call, into memory that replaces the map's pages), else as in the file. Streaming never
    /// calls this, so a streamed model is never read whole.
    pub fn resident(&self, e: usize, k: &Kernels) -> QMatrix<'a> {
        match self.packable {
            Some(Packable { file, info }) if packs(k, info.ty, self.rows) => {
                let all = pack_tensor(file, info, self.rows * self.n_expert);
                let sb = all.len() / self.n_expert;
                QMatrix {
                    layout: RowLayout::Rows4,
                    data: &all[e * sb..(e + 1) * sb],
                    ..self.expert(e)
                }
            }
            _ => self.expert(e),
        }
    }
}

/// Whether `rows` rows of `ty` are packed for table `k`: it has products over packed rows of
/// that type, and the rows make whole groups of four.
fn packs(k: &Kernels, ty: GgmlType, rows: usize) -> bool {
    k.gemm_rows4(ty).is_some() && rows > 0 && rows.is_multiple_of(rows4::ROWS)
}

/// Tensor `info` (`rows` rows of Q8_0 or Q4_0) packed four rows at a time, once per file.
fn pack_tensor<'a>(file: &'a GgufFile, info: &TensorInfo, rows: usize) -> &'a [u8] {
    file.packed_bytes(info, |data| rows4::pack(info.ty, data, rows))
}

pub(crate) struct Lookup<'a> {
    pub(crate) file: &'a GgufFile,
    /// The kernel table the model will run with: resident matrices are packed for it where it
    /// has products over packed rows (`tensor::blocks::rows4`).
    pub(crate) kernels: &'static Kernels,
}

impl<'a> Lookup<'a> {
    pub(crate) fn info(&self, name: &str) -> Option<&'a TensorInfo> {
        self.file.header().tensor(name)
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    pub(crate) fn require(&self, name: &str) -> Result<&'a TensorInfo, ModelError> {
        self.info(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    pub(crate) fn check_dims(info: &TensorInfo, want: &[usize]) -> Result<(), ModelError> {
        // Trailing 1s are equivalent (a [n, 1] tensor is a vector).
        let trim = |d: &[usize]| {
            let mut v = d.to_vec();
            while v.len() > 1 && v.last() == Some(&1) {
                v.pop();
            }
            v
        };
        if trim(&info.dims) != trim(want) {
            return Err(ModelError::Shape {
                name: info.name.clone(),
                expected: want.to_vec(),
                found: info.dims.clone(),
            });
        }
        Ok(())
    }

    /// A matrix the model only multiplies by: packed four rows at a time when the kernel table
    /// has products over that layout (made now, replacing the map's pages in memory).
    pub(crate) fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix<'a>, ModelError> {
        let m = self.matrix_by_rows(name, rows, cols)?;
        if !packs(self.kernels, m.ty, rows) {
            return Ok(m);
        }
        let info = self.require(name)?;
        Ok(QMatrix {
            layout: RowLayout::Rows4,
            data: pack_tensor(self.file, info, rows),
            ..m
        })
    }

    /// A matrix in the file's layout, for one whose rows are also read one by one (the token
    /// embedding).
    pub(crate) fn matrix_by_rows(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix<'a>, ModelError> {
        let info = self.require(name)?;
        Self::check_dims(info, &[cols, rows])?;
        Ok(QMatrix::new(
            info.ty,
            rows,
            cols,
            self.file.tensor_bytes(info),
        ))
    }

    /// A stacked expert tensor `name`, or (moe-edge's mixed-precision layout) the per-expert
    /// tensors `<stem>.<e>.weight` that replace it.
    pub(crate) fn stacked(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        n_expert: usize,
    ) -> Result<StackedExperts<'a>, ModelError> {
        if let Some(info) = self.info(name) {
            Self::check_dims(info, &[cols, rows, n_expert])?;
            return Ok(StackedExperts {
                packable: Some(Packable {
                    file: self.file,
                    info,
                }),
                ..StackedExperts::stacked(
                    info.ty,
                    rows,
                    cols,
                    n_expert,
                    self.file.tensor_bytes(info),
                    info.range.start,
                )
            });
        }
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        if !self.has(&crate::moe::calib::per_expert_name(stem, 0)) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        let mut slabs = Vec::with_capacity(n_expert);
        for e in 0..n_expert {
            let info = self.require(&crate::moe::calib::per_expert_name(stem, e))?;
            Self::check_dims(info, &[cols, rows])?;
            slabs.push(ExpertSlab {
                ty: info.ty,
                data: self.file.tensor_bytes(info),
                file_offset: info.range.start,
            });
        }
        Ok(StackedExperts {
            rows,
            cols,
            n_expert,
            slabs,
            packable: None,
        })
    }

    /// A fused `[cols, 2 * rows, n_expert]` gate/up tensor (llama.cpp's `ffn_gate_up_exps`, gate
    /// rows first in each expert) as two stacked tensors: each expert's slab split in halves.
    pub(crate) fn gate_up_halves(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        n_expert: usize,
    ) -> Result<(StackedExperts<'a>, StackedExperts<'a>), ModelError> {
        let info = self.require(name)?;
        Self::check_dims(info, &[cols, 2 * rows, n_expert])?;
        let both = StackedExperts::stacked(
            info.ty,
            2 * rows,
            cols,
            n_expert,
            self.file.tensor_bytes(info),
            info.range.start,
        );
        let half = |part: usize| StackedExperts {
            rows,
            cols,
            n_expert,
            slabs: both
                .slabs
                .iter()
                .map(|s| {
                    let h = s.data.len() / 2;
                    ExpertSlab {
                        ty: s.ty,
                        data: &s.data[part * h..(part + 1) * h],
                        file_offset: s.file_offset + part * h,
                    }
                })
                .collect(),
            packable: None,
        };
        Ok((half(0), half(1)))
    }

    /// Small vectors (norm weights, biases) are decoded to f32 once at load.
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.require(name)?;
        Self::check_dims(info, &[len])?;
        let mut out = vec![0f32; len];
        crate::tensor::quant::dequantize(info.ty, self.file.tensor_bytes(info), &mut out);
        Ok(out)
    }

    /// A small `[rows, cols]` tensor decoded to f32 once at load (per-expert biases).
    pub(crate) fn matrix_f32(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let info = self.require(name)?;
        Self::check_dims(info, &[cols, rows])?;
        let mut out = vec![0f32; rows * cols];
        crate::tensor::quant::dequantize(info.ty, self.file.tensor_bytes(info), &mut out);
        Ok(out)
    }

    pub(crate) fn opt_vector(
        &self,
        name: &str,
        len: usize,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}
