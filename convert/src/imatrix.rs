//! llama.cpp's importance-matrix files (`llama-imatrix -o x.gguf`): per weight tensor, the sum of
//! its squared inputs per column (`NAME.in_sum2`, one row per expert) and how many inputs were
//! summed (`NAME.counts`, one per expert). Read as llama-quantize reads them (`load_imatrix` in
//! tools/quantize/quantize.cpp): the mean square per column, or 1 for an expert that saw no
//! input; these are the encoders' per-column weights.

use std::collections::HashMap;
use std::path::Path;

use moe_runtime::gguf::{GgmlType, GgufFile};

use crate::error::ConvertError;

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
            let ne0 = sums.len() / counts.len();
            let mut e = vec![0f32; sums.len()];
            for (j, &c) in counts.iter().enumerate() {
                // llama.cpp stores the counts as f32, rounds them to integers on loading and
                // divides by that integer as a float.
                let count = c.round() as i64 as f32;
                for i in 0..ne0 {
                    e[j * ne0 + i] = if count > 0.0 {
                        sums[j * ne0 + i] / count
                    } else {
                        1.0
                    };
                }
            }
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
