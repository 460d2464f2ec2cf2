//! Zero-copy GGUF parsing over a byte slice (normally a memory map).
//!
//! Everything read from the file is bounds-checked: counts are limited by the bytes that remain,
//! tensor extents by the file size, so a truncated or corrupted file is an error, never a panic.

use std::collections::HashMap;
use std::ops::Range;

use super::types::{GgmlType, Value, ValueType};
use super::{GgufError, GGUF_MAGIC};

/// Default alignment when `general.alignment` is absent (ggml's `GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;
const MAX_ARRAY_NESTING: usize = 4;

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml dimensions: `dims[0]` is the contiguous one (a row).
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range of the tensor's data in the file.
    pub range: Range<usize>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The parsed header of a GGUF file: metadata and tensor directory. Tensor bytes stay in the
/// caller's slice.
#[derive(Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    /// Start of the tensor data section.
    pub data_start: usize,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufHeader {
    /// Parses and validates the header; `bytes` is the whole file.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut cur = Cursor { bytes, pos: 0 };
        let magic = cur.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic.to_le_bytes()));
        }
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = cur.count("tensor count", 24)?;
        let n_kv = cur.count("metadata count", 13)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = cur.string("metadata key")?;
            let ty = cur.value_type(&key)?;
            let value = cur.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Invalid(format!(
                    "metadata key `{key}` appears twice"
                )));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .map(|(_, v)| v)
        {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
            Some(other) => {
                return Err(GgufError::Invalid(format!(
                    "general.alignment must be a u32 power of two, found {other:?}"
                )))
            }
        };

        let mut raw_tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = cur.string("tensor name")?;
            let n_dims = cur.u32("tensor dimension count")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Tensor {
                    name,
                    why: format!("has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = cur.u64("tensor dimension")?;
                let d = usize::try_from(d).map_err(|_| GgufError::Tensor {
                    name: name.clone(),
                    why: format!("dimension {d} is too large"),
                })?;
                dims.push(d);
            }
            let type_id = cur.u32("tensor type")?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedType {
                name: name.clone(),
                id: type_id,
            })?;
            let offset = cur.u64("tensor offset")?;
            raw_tensors.push((name, dims, ty, offset));
        }

        // ggml pads to the alignment only when tensor data follows: a vocab-only file (no
        // tensors) may end right after its metadata, and llama.cpp reads it.
        let data_start = if raw_tensors.is_empty() {
            cur.pos
        } else {
            align_up(cur.pos as u64, alignment)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| GgufError::Invalid("data section offset overflows".into()))?
        };
        if data_start > bytes.len() {
            return Err(GgufError::Truncated {
                what: "padding before tensor data".into(),
                at: cur.pos,
            });
        }

        let mut tensors = Vec::with_capacity(raw_tensors.len());
        let mut tensor_index = HashMap::with_capacity(raw_tensors.len());
        for (name, dims, ty, offset) in raw_tensors {
            let bad = |why: String| GgufError::Tensor {
                name: name.clone(),
                why,
            };
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let n_rows = dims[1..]
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| bad("element count overflows".into()))?;
            let row_bytes = ty.row_bytes(dims[0]).ok_or_else(|| {
                bad(format!(
                    "row length {} is not a multiple of the {ty} block length {}",
                    dims[0],
                    ty.block_len()
                ))
            })?;
            let size = row_bytes
                .checked_mul(n_rows)
                .ok_or_else(|| bad("byte size overflows".into()))?;
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .ok_or_else(|| bad(format!("data offset {offset} is out of range")))?;
            let end = start
                .checked_add(size)
                .ok_or_else(|| bad("data end overflows".into()))?;
            if end > bytes.len() {
                return Err(bad(format!(
                    "data [{start}, {end}) runs past the end of the file ({} bytes): the file is truncated or corrupt",
                    bytes.len()
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("appears twice".into()));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                range: start..end,
            });
        }

        Ok(Self {
            version,
            alignment,
            data_start,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Bytes of all tensor data (what mapping every tensor would make resident).
    pub fn tensor_data_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.range.len()).sum()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The position of tensor `name` in [`GgufHeader::tensors`].
    pub fn tensor_position(&self, name: &str) -> Option<usize> {
        self.tensor_index.get(name).copied()
    }
}

pub fn align_up(v: u64, alignment: u64) -> Option<u64> {
    debug_assert!(alignment.is_power_of_two());
    v.checked_add(alignment - 1).map(|x| x & !(alignment - 1))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what: what.to_string(),
                at: self.pos,
            }),
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each take at least `min_item_len` bytes: bounded by what remains,
    /// so a corrupted count cannot make us allocate without limit.
    fn count(&mut self, what: &str, min_item_len: usize) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_item_len.max(1)) as u64;
        if n > max {
            return Err(GgufError::Invalid(format!(
                "{what} {n} is impossible: only {} bytes remain at offset {}",
                self.remaining(),
                self.pos
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| GgufError::Truncated {
                what: format!("{what} of {len} bytes"),
                at: self.pos,
            })?;
        let s = self.take(len, what)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| GgufError::Invalid(format!("{what} at offset {} is not UTF-8", self.pos)))
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufError> {
        let id = self.u32("metadata value type")?;
        ValueType::from_id(id)
            .ok_or_else(|| GgufError::Invalid(format!("metadata `{key}` has unknown type id {id}")))
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = "metadata value";
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::Invalid(format!(
                        "metadata `{key}` has bool byte {b}"
                    )))
                }
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::Invalid(format!(
                        "metadata `{key}` nests arrays too deeply"
                    )));
                }
                let elem = self.value_type(key)?;
                let n = self.count("array length", elem.min_encoded_len())?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, TensorDecl};

    /// A GGUF v3 header as gguf-py writes a vocab-only file: metadata, no tensors, and nothing
    /// after the last metadata value (no padding to the alignment).
    fn vocab_only_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // tensors
        b.extend_from_slice(&1u64.to_le_bytes()); // metadata pairs
        let key = b"tokenizer.ggml.model";
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&8u32.to_le_bytes()); // string
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(b"llama");
        b
    }

    #[test]
    fn vocab_only_file_without_padding_parses() {
        let bytes = vocab_only_bytes();
        assert_ne!(
            bytes.len() % DEFAULT_ALIGNMENT as usize,
            0,
            "needs no padding"
        );
        let h = GgufHeader::parse(&bytes).unwrap();
        assert!(h.tensors().is_empty());
        assert_eq!(h.data_start, bytes.len());
        assert_eq!(
            h.get("tokenizer.ggml.model").and_then(|v| v.as_str()),
            Some("llama")
        );
        // Cut inside the metadata it is still truncated.
        for cut in 0..bytes.len() {
            assert!(GgufHeader::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn file_with_tensors_cut_in_padding_or_data_is_refused() {
        let meta = vec![(
            "general.architecture".to_string(),
            Value::String("x".into()),
        )];
        let decls = vec![TensorDecl {
            name: "t".into(),
            dims: vec![8],
            ty: GgmlType::F32,
        }];
        let mut w = GgufWriter::begin(Vec::new(), &meta, decls, 64).unwrap();
        w.write_tensor_data(&[0u8; 32]).unwrap();
        let bytes = w.finish().unwrap();
        let h = GgufHeader::parse(&bytes).unwrap();
        let data_end = h.tensor("t").unwrap().range.end;
        for cut in [h.data_start - 1, h.data_start, data_end - 1] {
            let e = GgufHeader::parse(&bytes[..cut]).unwrap_err().to_string();
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
    }
}
