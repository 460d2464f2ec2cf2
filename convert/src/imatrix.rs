//! llama.cpp's importance-matrix files (`llama-imatrix -o x.gguf`): per weight tensor, the sum of
//! its squared inputs per column (`NAME.in_sum2`, one row per expert) and how many inputs were
//! summed (`NAME.counts`, one per expert). Read as llama-quantize reads them (`load_imatrix` in
//! tools/quantize/quantize.cpp): the mean square per column, or 1 for an expert that saw no
//! input; these are the encoders' per-column weights. [`Collected`] is one made by `--calib`,
//! written in the same format (`save_imatrix` in tools/imatrix/imatrix.cpp).

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::Path;

use moe_runtime::gguf::{GgmlType, GgufFile, GgufWriter, TensorDecl, Value};
use moe_runtime::model::NamedInputSum;

use crate::error::ConvertError;
use crate::pending::PendingFile;

/// GGUF's default alignment, which llama-imatrix's files have.
const IMATRIX_ALIGNMENT: u32 = 32;

/// An importance matrix collected by calibration: the raw sums and counts, as the file stores
/// them.
#[derive(Clone, Debug)]
pub struct Collected {
    /// Sorted by name.
    pub entries: Vec<NamedInputSum>,
    /// Whole windows of calibration text summed (`imatrix.chunk_count`).
    pub chunk_count: usize,
    /// Tokens per window (`imatrix.chunk_size`).
    pub chunk_size: usize,
    /// The calibration text files (`imatrix.datasets`).
    pub datasets: Vec<String>,
}

impl Collected {
    /// Writes llama-imatrix's GGUF format: `general.type = imatrix`, the datasets, chunk count
    /// and size, and per tensor `NAME.in_sum2` (`[cols, n_mat]`) and `NAME.counts`
    /// (`[1, n_mat]`), f32, in name order. The file appears only when complete.
    pub fn write(&self, out: &Path) -> Result<(), ConvertError> {
        let metadata = vec![
            ("general.type".to_string(), Value::String("imatrix".into())),
            (
                "imatrix.datasets".to_string(),
                Value::string_array(self.datasets.iter().cloned()),
            ),
            (
                "imatrix.chunk_count".to_string(),
                Value::U32(self.chunk_count as u32),
            ),
            (
                "imatrix.chunk_size".to_string(),
                Value::U32(self.chunk_size as u32),
            ),
        ];
        let mut decls = Vec::new();
        let mut data: Vec<Vec<f32>> = Vec::new();
        for e in &self.entries {
            let n_mat = e.sum.counts.len();
            if e.sum.sums.iter().any(|v| !v.is_finite()) {
                return Err(ConvertError::Input(format!(
                    "calibration: the inputs of `{}` are not finite",
                    e.name
                )));
            }
            decls.push(TensorDecl {
                name: format!("{}.in_sum2", e.name),
                dims: vec![e.sum.cols, n_mat],
                ty: GgmlType::F32,
            });
            data.push(e.sum.sums.clone());
            decls.push(TensorDecl {
                name: format!("{}.counts", e.name),
                dims: vec![1, n_mat],
                ty: GgmlType::F32,
            });
            data.push(e.sum.counts.iter().map(|&c| c as f32).collect());
        }
        let pending = PendingFile::beside(out)?;
        let io = |e: std::io::Error| ConvertError::io(out, e);
        let mut w = GgufWriter::begin(
            BufWriter::new(pending.file()),
            &metadata,
            decls,
            IMATRIX_ALIGNMENT,
        )?;
        for values in &data {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_tensor_data(&bytes)?;
        }
        let file = w.finish()?.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        pending.commit(out)
    }

    /// The encoders' weights, as llama-quantize reads the file.
    pub fn weights(&self) -> Imatrix {
        let entries = self
            .entries
            .iter()
            .map(|e| {
                let counts: Vec<f32> = e.sum.counts.iter().map(|&c| c as f32).collect();
                (e.name.clone(), mean_squares(&e.sum.sums, &counts))
            })
            .collect();
        Imatrix { entries }
    }
}

/// llama-quantize's `load_imatrix`: each expert's sums divided by its count (rounded to an
/// integer, divided as a float), or 1 for an expert that saw no input.
fn mean_squares(sums: &[f32], counts: &[f32]) -> Vec<f32> {
    let ne0 = sums.len() / counts.len();
    let mut e = vec![0f32; sums.len()];
    for (j, &c) in counts.iter().enumerate() {
        let count = c.round() as i64 as f32;
        for i in 0..ne0 {
            e[j * ne0 + i] = if count > 0.0 {
                sums[j * ne0 + i] / count
            } else {
                1.0
            };
        }
    }
    e
}

/// Per tensor name, the importance of each column, expert after expert
/// (`n_per_row * n_expert` values).
#[derive(Debug, Default)]
pub struct Imatrix {
    pub entries: HashMap<String, Vec<f32>>,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl Imatrix {
    pub fn load(path: &Path) -> Result<Self, ConvertError> {
        let bad = |why: String| ConvertError::Input(format!("{}: {why}", path.display()));
        let file = GgufFile::open(path)?;
        let header = file.header();
        let tensor = |name: &str| {
            let info = header
                .tensor(name)
                .ok_or_else(|| bad(format!("`{name}` is missing")))?;
            if info.ty != GgmlType::F32 {
                return Err(bad(format!("`{name}` is {}, not f32", info.ty)));
            }
            Ok(f32s(file.tensor_bytes(info)))
        };
        let mut entries = HashMap::new();
        for info in header.tensors() {
            let Some(name) = info.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let sums = tensor(&info.name)?;
            let counts = tensor(&format!("{name}.counts"))?;
            if counts.is_empty() || !sums.len().is_multiple_of(counts.len()) {
                return Err(bad(format!(
                    "`{name}`: {} sums for {} counts",
                    sums.len(),
                    counts.len()
                )));
            }
            // llama.cpp stores the counts as f32, rounds them to integers on loading and divides
            // by that integer as a float.
            let e = mean_squares(&sums, &counts);
            if e.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!("`{name}` has a value that is not finite")));
            }
            entries.insert(name.to_string(), e);
        }
        if entries.is_empty() {
            return Err(bad("no `*.in_sum2` tensors: not an imatrix file".into()));
        }
        Ok(Self { entries })
    }

    /// The weights of a file whose layers keep only the experts `kept[l]` (in that order): a
    /// stacked expert tensor's rows of the others are left out (its name ends in `_exps.weight`
    /// and it has `n_expert` rows of weights).
    pub fn keep_experts(&self, kept: &[Vec<usize>], n_expert: usize) -> Imatrix {
        let layer = |name: &str| -> Option<usize> {
            let rest = name.strip_prefix("blk.")?;
            rest.split('.').next()?.parse().ok()
        };
        let entries = self
            .entries
            .iter()
            .map(|(name, w)| {
                let stacked = name.ends_with("_exps.weight") && w.len().is_multiple_of(n_expert);
                let w = match layer(name).and_then(|l| kept.get(l)) {
                    Some(ks) if stacked => {
                        let per = w.len() / n_expert;
                        ks.iter()
                            .flat_map(|&e| w[e * per..(e + 1) * per].iter().copied())
                            .collect()
                    }
                    _ => w.clone(),
                };
                (name.clone(), w)
            })
            .collect();
        Imatrix { entries }
    }

    /// The weights for a tensor of rows of `n_per_row` values and `n_slices` experts (1 for a
    /// plain matrix), when the file has them at that size. llama-quantize refuses a size
    /// mismatch except for the token embedding, which it quantizes without.
    pub fn for_tensor(
        &self,
        name: &str,
        n_per_row: usize,
        n_slices: usize,
    ) -> Result<Option<&[f32]>, ConvertError> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        if e.len() == n_per_row * n_slices {
            Ok(Some(e))
        } else if name == "token_embd.weight" {
            Ok(None)
        } else {
            Err(ConvertError::Input(format!(
                "imatrix has {} values for `{name}`, which needs {}",
                e.len(),
                n_per_row * n_slices
            )))
        }
    }
}
