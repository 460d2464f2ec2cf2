//! Writing the GGUF file. The file appears only when complete: data goes to a file with no name
//! in the same folder, named at the end, and nothing is left on failure or when the process is
//! killed ([`crate::pending`]).

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;
use std::time::Duration;

use moe_runtime::gguf::{GgmlType, GgufError, GgufWriter, TensorDecl, Value, PAGE_ALIGNMENT};
use moe_runtime::moe::calib::CalibStats;
use rayon::prelude::*;

use crate::error::ConvertError;
use crate::imatrix::Imatrix;
use crate::pending::PendingFile;
use crate::source::TensorData;

/// What a conversion wrote.
#[derive(Debug, Default)]
pub struct Summary {
    pub arch: String,
    pub n_tensors: usize,
    /// Bytes of tensor data per type.
    pub bytes_by_type: BTreeMap<String, u64>,
    pub file_bytes: u64,
    pub elapsed: Duration,
    /// What calibration and pruning found, when the conversion was tuned.
    pub tuned: Option<Tuned>,
    /// Parts of a multimodal checkpoint left out (part name, tensor count).
    pub dropped: Vec<(String, usize)>,
}

/// The outcome of a tuned conversion beyond the file.
#[derive(Debug)]
pub struct Tuned {
    /// Statistics of the unpruned model, when calibrated.
    pub stats: Option<CalibStats>,
    /// Per layer, the original indices of the kept experts.
    pub kept: Vec<Vec<usize>>,
    /// The expert types `--target-size` chose.
    pub allocation: Option<crate::budget::Allocation>,
    /// The importance matrix calibration collected (of the unpruned model).
    pub imatrix: Option<crate::imatrix::Collected>,
}

/// Called after each tensor with (bytes done, bytes total, tensor name).
pub type Progress<'a> = &'a (dyn Fn(u64, u64, &str) + Sync);

/// Writes `metadata` and the tensors `decls` (in order) to `out`, encoding the f32 values that
/// `data` returns for the tensor at each index (or copying bytes already encoded), weighting
/// the encoders' errors by `imatrix` where it has the tensor. `elapsed` is left to the caller.
pub(crate) fn write_gguf(
    out: &Path,
    arch: &str,
    metadata: &[(String, Value)],
    decls: Vec<TensorDecl>,
    mut data: impl FnMut(usize) -> Result<TensorData, ConvertError>,
    imatrix: Option<&Imatrix>,
    progress: Progress,
) -> Result<Summary, ConvertError> {
    let total: u64 = decls
        .iter()
        .map(|d| d.byte_size().map(|s| s as u64))
        .sum::<Result<u64, _>>()?;
    let pending = PendingFile::beside(out)?;
    let result = (|| -> Result<Summary, ConvertError> {
        let file = pending.file();
        let mut writer = GgufWriter::begin(
            BufWriter::with_capacity(1 << 20, file),
            metadata,
            decls.clone(),
            PAGE_ALIGNMENT,
        )?;
        let mut summary = Summary {
            arch: arch.to_string(),
            n_tensors: decls.len(),
            ..Default::default()
        };
        let mut done = 0u64;
        for (i, decl) in decls.iter().enumerate() {
            let expected: usize = decl.dims.iter().product();
            let bytes = match data(i)? {
                TensorData::Values(values) => {
                    if values.len() != expected {
                        return Err(ConvertError::Shape {
                            name: decl.name.clone(),
                            expected: decl.dims.clone(),
                            found: vec![values.len()],
                        });
                    }
                    let n_slices = decl.dims.get(2).copied().unwrap_or(1);
                    let weights = match imatrix {
                        Some(m) => m.for_tensor(&decl.name, decl.dims[0], n_slices)?,
                        None => None,
                    };
                    quantize_rows(decl.ty, &values, decl.dims[0], weights)
                }
                TensorData::Encoded(bytes) => {
                    if Some(bytes.len()) != decl.byte_size().ok() {
                        return Err(ConvertError::Input(format!(
                            "internal: `{}` was packed into {} bytes, its {} shape {:?} takes {:?}",
                            decl.name,
                            bytes.len(),
                            decl.ty,
                            decl.dims,
                            decl.byte_size().ok()
                        )));
                    }
                    bytes
                }
            };
            writer.write_tensor_data(&bytes)?;
            done += bytes.len() as u64;
            *summary
                .bytes_by_type
                .entry(decl.ty.name().to_string())
                .or_default() += bytes.len() as u64;
            progress(done, total, &decl.name);
        }
        let buf = writer.finish()?;
        let file = buf
            .into_inner()
            .map_err(|e| ConvertError::io(out, e.into_error()))?;
        file.sync_all().map_err(|e| ConvertError::io(out, e))?;
        summary.file_bytes = file.metadata().map_err(|e| ConvertError::io(out, e))?.len();
        Ok(summary)
    })();
    // On failure the pending file is dropped: an unnamed one vanishes, a named one is removed.
    // A write that failed (a full disk) is the output's error: name it.
    let summary = result.map_err(|e| match e {
        ConvertError::Gguf(GgufError::Io(cause)) => ConvertError::io(out, cause),
        e => e,
    })?;
    pending.commit(out)?;
    Ok(summary)
}

/// Encodes rows of `row_len` values in parallel; `imatrix` holds `row_len` weights per expert
/// (slab of rows), as llama-quantize applies them.
fn quantize_rows(ty: GgmlType, values: &[f32], row_len: usize, imatrix: Option<&[f32]>) -> Vec<u8> {
    let row_bytes = ty
        .row_bytes(row_len)
        .expect("plan chose a type that fits the rows");
    let n_rows = values.len() / row_len;
    let mut out = vec![0u8; n_rows * row_bytes];
    let rows_per_slice = match imatrix {
        Some(w) => n_rows / (w.len() / row_len).max(1),
        None => n_rows,
    }
    .max(1);
    out.par_chunks_mut(row_bytes)
        .zip(values.par_chunks(row_len))
        .enumerate()
        .for_each(|(r, (dst, src))| {
            let slice = r / rows_per_slice;
            let w = imatrix.map(|w| &w[slice * row_len..(slice + 1) * row_len]);
            dst.copy_from_slice(&moe_runtime::tensor::quant::quantize_weighted(
                ty, src, row_len, w,
            ))
        });
    out
}
