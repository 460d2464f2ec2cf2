//! A minimal ONNX reader: the parts of a `ModelProto` that a native implementation of a known
//! network needs (float initialisers, metadata, the node list to check the graph is the one
//! expected), read straight from the protobuf wire format. Not a general ONNX runtime: the
//! `pregate` feature (tract-onnx) runs arbitrary graphs.
//!
//! Field numbers are those of onnx/onnx.proto:
//!
//! ```text
//! ModelProto:  graph = 7 (GraphProto), metadata_props = 14 (StringStringEntryProto key 1, value 2)
//! GraphProto:  node = 1, initializer = 5 (TensorProto), input = 11, output = 12 (ValueInfoProto name 1)
//! NodeProto:   input = 1, output = 2, op_type = 4, attribute = 5 (AttributeProto name 1, i 3)
//! TensorProto: dims = 1, data_type = 2 (1 = FLOAT), float_data = 4, name = 8, raw_data = 9,
//!              data_location = 14 (1 = EXTERNAL)
//! ```

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("not a valid ONNX file: {0} (the file is truncated or is not an ONNX model)")]
    Malformed(&'static str),
    #[error("initializer `{name}`: {why}")]
    Tensor { name: String, why: String },
}

/// A float initialiser: `dims` and its values, row-major.
#[derive(Debug, Clone)]
pub struct Initializer {
    pub name: String,
    pub dims: Vec<i64>,
    pub data: Vec<f32>,
}

/// One node: its op type, input and output names, and integer attributes.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub int_attrs: Vec<(String, i64)>,
}

#[derive(Debug, Clone, Default)]
pub struct OnnxModel {
    pub metadata: Vec<(String, String)>,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Initializer>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

impl OnnxModel {
    /// Parses a whole ONNX file. Initialisers of other types than float, or stored outside the
    /// file, are refused.
    pub fn parse(buf: &[u8]) -> Result<Self, OnnxError> {
        let mut m = OnnxModel::default();
        let mut saw_graph = false;
        for f in Fields(buf) {
            match f? {
                (7, Value::Bytes(g)) => {
                    saw_graph = true;
                    m.read_graph(g)?;
                }
                (14, Value::Bytes(p)) => {
                    let (mut k, mut v) = (String::new(), String::new());
                    for f in Fields(p) {
                        match f? {
                            (1, Value::Bytes(b)) => k = string(b)?,
                            (2, Value::Bytes(b)) => v = string(b)?,
                            _ => {}
                        }
                    }
                    m.metadata.push((k, v));
                }
                _ => {}
            }
        }
        if !saw_graph {
            return Err(OnnxError::Malformed("no graph"));
        }
        Ok(m)
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn initializer(&self, name: &str) -> Option<&Initializer> {
        self.initializers.iter().find(|t| t.name == name)
    }

    fn read_graph(&mut self, g: &[u8]) -> Result<(), OnnxError> {
        for f in Fields(g) {
            match f? {
                (1, Value::Bytes(n)) => self.nodes.push(node(n)?),
                (5, Value::Bytes(t)) => self.initializers.push(tensor(t)?),
                (11, Value::Bytes(v)) => self.inputs.push(value_info_name(v)?),
                (12, Value::Bytes(v)) => self.outputs.push(value_info_name(v)?),
                _ => {}
            }
        }
        Ok(())
    }
}

fn node(buf: &[u8]) -> Result<Node, OnnxError> {
    let mut n = Node::default();
    for f in Fields(buf) {
        match f? {
            (1, Value::Bytes(b)) => n.inputs.push(string(b)?),
            (2, Value::Bytes(b)) => n.outputs.push(string(b)?),
            (4, Value::Bytes(b)) => n.op_type = string(b)?,
            (5, Value::Bytes(a)) => {
                let (mut name, mut i) = (String::new(), None);
                for f in Fields(a) {
                    match f? {
                        (1, Value::Bytes(b)) => name = string(b)?,
                        (3, Value::Varint(v)) => i = Some(v as i64),
                        _ => {}
                    }
                }
                if let Some(i) = i {
                    n.int_attrs.push((name, i));
                }
            }
            _ => {}
        }
    }
    Ok(n)
}

fn value_info_name(buf: &[u8]) -> Result<String, OnnxError> {
    for f in Fields(buf) {
        if let (1, Value::Bytes(b)) = f? {
            return string(b);
        }
    }
    Ok(String::new())
}

fn tensor(buf: &[u8]) -> Result<Initializer, OnnxError> {
    let (mut name, mut dims, mut data_type, mut external) = (String::new(), vec![], 0, false);
    let (mut raw, mut floats): (Option<&[u8]>, Vec<f32>) = (None, vec![]);
    for f in Fields(buf) {
        match f? {
            (1, Value::Varint(d)) => dims.push(d as i64),
            (1, Value::Bytes(packed)) => {
                let mut r = packed;
                while !r.is_empty() {
                    dims.push(varint(&mut r)? as i64);
                }
            }
            (2, Value::Varint(t)) => data_type = t,
            (4, Value::Fixed32(x)) => floats.push(f32::from_bits(x)),
            (4, Value::Bytes(packed)) => {
                if packed.len() % 4 != 0 {
                    return Err(OnnxError::Malformed("float_data of a partial float"));
                }
                floats.extend(packed.chunks_exact(4).map(le_f32));
            }
            (8, Value::Bytes(b)) => name = string(b)?,
            (9, Value::Bytes(b)) => raw = Some(b),
            (14, Value::Varint(1)) => external = true,
            _ => {}
        }
    }
    let fail = |why: String| OnnxError::Tensor {
        name: name.clone(),
        why,
    };
    if external {
        return Err(fail(
            "its data is in an external file, which is not supported".into(),
        ));
    }
    if data_type != 1 {
        return Err(fail(format!(
            "data type {data_type}, only float (1) is supported"
        )));
    }
    let data = match raw {
        Some(b) if b.len() % 4 == 0 => b.chunks_exact(4).map(le_f32).collect(),
        Some(_) => return Err(fail("raw data of a partial float".into())),
        None => floats,
    };
    let count = dims
        .iter()
        .try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) });
    if count != Some(data.len() as i64) {
        return Err(fail(format!("shape {dims:?} but {} values", data.len())));
    }
    Ok(Initializer { name, dims, data })
}

fn le_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn string(b: &[u8]) -> Result<String, OnnxError> {
    String::from_utf8(b.to_vec()).map_err(|_| OnnxError::Malformed("a string is not UTF-8"))
}

/// One protobuf field's payload by wire type.
enum Value<'a> {
    Varint(u64),
    Fixed64(#[allow(dead_code)] u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn varint(r: &mut &[u8]) -> Result<u64, OnnxError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = r
            .split_first()
            .ok_or(OnnxError::Malformed("truncated varint"))?;
        *r = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(OnnxError::Malformed("varint longer than 10 bytes"))
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], OnnxError> {
    if r.len() < n {
        return Err(OnnxError::Malformed(
            "a field runs past the end of its message",
        ));
    }
    let (a, b) = r.split_at(n);
    *r = b;
    Ok(a)
}

/// The fields of one protobuf message, in file order: `(field number, value)`.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), OnnxError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let r = &mut self.0;
        let field = (|| {
            let key = varint(r)?;
            let value = match key & 7 {
                0 => Value::Varint(varint(r)?),
                1 => Value::Fixed64(u64::from_le_bytes(take(r, 8)?.try_into().unwrap())),
                2 => {
                    let n = usize::try_from(varint(r)?)
                        .map_err(|_| OnnxError::Malformed("field length"))?;
                    Value::Bytes(take(r, n)?)
                }
                5 => Value::Fixed32(u32::from_le_bytes(take(r, 4)?.try_into().unwrap())),
                _ => return Err(OnnxError::Malformed("unknown protobuf wire type")),
            };
            if key >> 3 == 0 {
                return Err(OnnxError::Malformed("field number 0"));
            }
            Ok((key >> 3, value))
        })();
        if field.is_err() {
            // Stop after the first error.
            self.0 = &[];
        }
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding helpers for hand-built messages.
    fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
        put_varint((field << 3) | wire, out);
    }
    fn put_varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
        key(field, 2, out);
        put_varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn model() -> Vec<u8> {
        let mut t = vec![];
        key(1, 0, &mut t);
        put_varint(2, &mut t);
        key(1, 0, &mut t);
        put_varint(3, &mut t);
        key(2, 0, &mut t);
        put_varint(1, &mut t);
        bytes(8, b"w", &mut t);
        let raw: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        bytes(9, &raw, &mut t);
        let mut n = vec![];
        bytes(1, b"a", &mut n);
        bytes(1, b"w", &mut n);
        bytes(2, b"y", &mut n);
        bytes(4, b"MatMul", &mut n);
        let mut g = vec![];
        bytes(1, &n, &mut g);
        bytes(5, &t, &mut g);
        let mut kv = vec![];
        bytes(1, b"k", &mut kv);
        bytes(2, b"v", &mut kv);
        let mut m = vec![];
        key(1, 0, &mut m);
        put_varint(8, &mut m);
        bytes(7, &g, &mut m);
        bytes(14, &kv, &mut m);
        m
    }

    #[test]
    fn reads_initializers_nodes_and_metadata() {
        let m = OnnxModel::parse(&model()).unwrap();
        assert_eq!(m.metadata("k"), Some("v"));
        let w = m.initializer("w").unwrap();
        assert_eq!(w.dims, [2, 3]);
        assert_eq!(w.data, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(m.nodes[0].op_type, "MatMul");
        assert_eq!(m.nodes[0].inputs, ["a", "w"]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = model();
        for n in 0..full.len() {
            // Some prefixes end exactly between fields and parse as a smaller model; none panics.
            let _ = OnnxModel::parse(&full[..n]);
        }
        assert!(OnnxModel::parse(&full[..full.len() - 3]).is_err());
        assert!(OnnxModel::parse(b"").is_err());
        assert!(OnnxModel::parse(b"\xff\xff\xff").is_err());
    }
}
