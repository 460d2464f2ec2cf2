//! Streaming GGUF v3 writer.
//!
//! The directory (metadata and every tensor's name, shape and type) is declared up front, so all
//! offsets are known before any tensor byte is produced; tensor data is then streamed one tensor at
//! a time. A converter therefore holds a single tensor in memory, never the whole model.

use std::io::{self, Write};

use super::reader::align_up;
use super::types::{GgmlType, Value};
use super::{GgufError, GGUF_MAGIC};

#[derive(Clone, Debug)]
pub struct TensorDecl {
    pub name: String,
    /// ggml dimensions, contiguous one first.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorDecl {
    pub fn byte_size(&self) -> Result<usize, GgufError> {
        let rows: usize = self.dims[1..].iter().product();
        let row = self
            .ty
            .row_bytes(self.dims[0])
            .ok_or_else(|| GgufError::Tensor {
                name: self.name.clone(),
                why: format!(
                    "row length {} is not a multiple of the {} block length {}",
                    self.dims[0],
                    self.ty,
                    self.ty.block_len()
                ),
            })?;
        Ok(row * rows)
    }
}

/// Writes the header, then accepts tensor data in declaration order.
pub struct GgufWriter<W: Write> {
    out: W,
    alignment: u64,
    tensors: Vec<(TensorDecl, u64, usize)>,
    next: usize,
    written: u64,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header. `metadata` must not contain `general.alignment`; it is written from
    /// `alignment`, which must be a power of two (llama.cpp's reader rejects anything else).
    pub fn begin(
        mut out: W,
        metadata: &[(String, Value)],
        tensors: Vec<TensorDecl>,
        alignment: u32,
    ) -> Result<Self, GgufError> {
        if !alignment.is_power_of_two() || alignment < 8 {
            return Err(GgufError::Invalid(format!(
                "alignment {alignment} must be a power of two >= 8"
            )));
        }
        let alignment64 = alignment as u64;
        let mut header = Vec::new();
        put_u32(&mut header, GGUF_MAGIC);
        put_u32(&mut header, 3);
        put_u64(&mut header, tensors.len() as u64);
        put_u64(&mut header, metadata.len() as u64 + 1);
        put_string(&mut header, "general.alignment");
        put_u32(&mut header, Value::U32(0).value_type() as u32);
        put_u32(&mut header, alignment);
        for (key, value) in metadata {
            if key == "general.alignment" {
                return Err(GgufError::Invalid(
                    "general.alignment is set from the writer's alignment argument".into(),
                ));
            }
            put_string(&mut header, key);
            put_u32(&mut header, value.value_type() as u32);
            put_value(&mut header, value)?;
        }
        let mut placed = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            if t.dims.is_empty() || t.dims.len() > 4 {
                return Err(GgufError::Tensor {
                    name: t.name,
                    why: "must have 1 to 4 dimensions".into(),
                });
            }
            let size = t.byte_size()?;
            put_string(&mut header, &t.name);
            put_u32(&mut header, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut header, d as u64);
            }
            put_u32(&mut header, t.ty.id());
            put_u64(&mut header, offset);
            placed.push((t, offset, size));
            offset = align_up(offset + size as u64, alignment64).expect("offset fits in u64");
        }
        let data_start = align_up(header.len() as u64, alignment64).expect("small header");
        header.resize(data_start as usize, 0);
        out.write_all(&header)?;
        Ok(Self {
            out,
            alignment: alignment64,
            tensors: placed,
            next: 0,
            written: 0,
        })
    }

    /// The output so far: after [`Self::begin`], the header (whose length is where the tensor
    /// data starts).
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// The declaration of the tensor whose data is expected next, if any.
    pub fn next_tensor(&self) -> Option<&TensorDecl> {
        self.tensors.get(self.next).map(|(t, _, _)| t)
    }

    /// Writes the data of the next declared tensor; `data` must be exactly its byte size.
    pub fn write_tensor_data(&mut self, data: &[u8]) -> Result<(), GgufError> {
        let (decl, offset, size) = self
            .tensors
            .get(self.next)
            .ok_or_else(|| GgufError::Invalid("more tensor data than declared tensors".into()))?;
        if data.len() != *size {
            return Err(GgufError::Tensor {
                name: decl.name.clone(),
                why: format!(
                    "data has {} bytes, its declaration needs {size}",
                    data.len()
                ),
            });
        }
        debug_assert_eq!(self.written, *offset);
        self.out.write_all(data)?;
        let end = self.written + data.len() as u64;
        let padded = align_up(end, self.alignment).expect("fits");
        write_zeros(&mut self.out, (padded - end) as usize)?;
        self.written = padded;
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written and returns the sink.
    pub fn finish(mut self) -> Result<W, GgufError> {
        if let Some((t, _, _)) = self.tensors.get(self.next) {
            return Err(GgufError::Tensor {
                name: t.name.clone(),
                why: "was declared but its data was never written".into(),
            });
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn write_zeros(out: &mut impl Write, mut n: usize) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(ZEROS.len());
        out.write_all(&ZEROS[..k])?;
        n -= k;
    }
    Ok(())
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    put_u64(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) -> Result<(), GgufError> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_string(buf, s),
        Value::Array(elem, items) => {
            put_u32(buf, *elem as u32);
            put_u64(buf, items.len() as u64);
            for item in items {
                if item.value_type() != *elem {
                    return Err(GgufError::Invalid(format!(
                        "array of {elem:?} holds a {:?}",
                        item.value_type()
                    )));
                }
                put_value(buf, item)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufHeader;

    #[test]
    fn round_trip_header_and_data() {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("qwen3moe".into()),
            ),
            ("qwen3moe.expert_count".to_string(), Value::U32(8)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::string_array(["a", "b"]),
            ),
            (
                "empty".to_string(),
                Value::Array(super::super::ValueType::I32, vec![]),
            ),
        ];
        let decls = vec![
            TensorDecl {
                name: "a".into(),
                dims: vec![32, 3],
                ty: GgmlType::Q8_0,
            },
            TensorDecl {
                name: "b".into(),
                dims: vec![5],
                ty: GgmlType::F32,
            },
        ];
        let mut w = GgufWriter::begin(Vec::new(), &meta, decls, 4096).unwrap();
        w.write_tensor_data(&[7u8; 34 * 3]).unwrap();
        assert!(w.write_tensor_data(&[0u8; 3]).is_err());
        w.write_tensor_data(&[1u8; 20]).unwrap();
        let bytes = w.finish().unwrap();

        let h = GgufHeader::parse(&bytes).unwrap();
        assert_eq!(h.alignment, 4096);
        assert_eq!(h.data_start % 4096, 0);
        assert_eq!(h.get("qwen3moe.expert_count"), Some(&Value::U32(8)));
        assert_eq!(h.get("empty").unwrap().as_array().unwrap().len(), 0);
        let a = h.tensor("a").unwrap();
        assert_eq!(a.range.start % 4096, 0);
        assert_eq!(&bytes[a.range.clone()], &[7u8; 102][..]);
        let b = h.tensor("b").unwrap();
        assert_eq!(b.range.start % 4096, 0);
        assert_eq!(&bytes[b.range.clone()], &[1u8; 20][..]);
    }
}
