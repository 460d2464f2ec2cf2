//! GGML tensor types and GGUF metadata values, as ggml defines them.

use std::fmt;

/// Tensor element types. Ids are ggml's (`enum ggml_type`), so files interoperate with llama.cpp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    /// llama.cpp's k-quant mixes use it for tensors whose rows are not whole 256-value blocks
    /// (e.g. a `Q4_K_M` expert down projection of width 1408); moe-convert's mixes too.
    Q5_0,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    /// Non-linear 4-bit levels in 32-value blocks (the i-quant files' fallback for rows that are
    /// not whole 256-value blocks).
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    IQ1M,
    BF16,
    /// OCP microscaling FP4: E2M1 values with a power-of-two scale per 32 (gpt-oss experts).
    MXFP4,
}

/// Every type, in id order.
const ALL: [GgmlType; 21] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::IQ2XXS,
    GgmlType::IQ2XS,
    GgmlType::IQ3XXS,
    GgmlType::IQ1S,
    GgmlType::IQ4NL,
    GgmlType::IQ3S,
    GgmlType::IQ2S,
    GgmlType::IQ4XS,
    GgmlType::IQ1M,
    GgmlType::BF16,
    GgmlType::MXFP4,
];

impl GgmlType {
    /// Every type this runtime reads.
    pub fn all() -> &'static [GgmlType] {
        &ALL
    }

    pub fn from_id(id: u32) -> Option<Self> {
        ALL.iter().copied().find(|t| t.id() == id)
    }

    /// ggml's `enum ggml_type` value.
    pub fn id(self) -> u32 {
        self.traits().0
    }

    /// Number of values in one block (1 for plain float types).
    pub fn block_len(self) -> usize {
        self.traits().1
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        self.traits().2
    }

    pub fn name(self) -> &'static str {
        self.traits().3
    }

    /// (ggml id, values per block, bytes per block, name): ggml's `type_traits` (ggml.c) and
    /// the block structs of ggml-common.h.
    fn traits(self) -> (u32, usize, usize, &'static str) {
        match self {
            Self::F32 => (0, 1, 4, "f32"),
            Self::F16 => (1, 1, 2, "f16"),
            Self::Q4_0 => (2, 32, 18, "q4_0"),
            Self::Q5_0 => (6, 32, 22, "q5_0"),
            Self::Q8_0 => (8, 32, 34, "q8_0"),
            Self::Q2K => (10, 256, 84, "q2_K"),
            Self::Q3K => (11, 256, 110, "q3_K"),
            Self::Q4K => (12, 256, 144, "q4_K"),
            Self::Q5K => (13, 256, 176, "q5_K"),
            Self::Q6K => (14, 256, 210, "q6_K"),
            Self::IQ2XXS => (16, 256, 66, "iq2_xxs"),
            Self::IQ2XS => (17, 256, 74, "iq2_xs"),
            Self::IQ3XXS => (18, 256, 98, "iq3_xxs"),
            Self::IQ1S => (19, 256, 50, "iq1_s"),
            Self::IQ4NL => (20, 32, 18, "iq4_nl"),
            Self::IQ3S => (21, 256, 110, "iq3_s"),
            Self::IQ2S => (22, 256, 82, "iq2_s"),
            Self::IQ4XS => (23, 256, 136, "iq4_xs"),
            Self::IQ1M => (29, 256, 56, "iq1_m"),
            Self::BF16 => (30, 1, 2, "bf16"),
            Self::MXFP4 => (39, 32, 17, "mxfp4"),
        }
    }

    /// Bytes taken by a row of `n` values, or None when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Whether `tensor::quant::quantize` can encode this type (the converter's output types);
    /// the others are only decoded, from files other tools wrote.
    pub fn can_encode(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::Q8_0
                | Self::Q4_0
                | Self::Q5_0
                | Self::Q2K
                | Self::Q3K
                | Self::Q4K
                | Self::Q5K
                | Self::Q6K
                | Self::IQ4NL
                | Self::IQ4XS
        )
    }

    /// The type named `name` as ggml spells it (case-insensitive: `q4_K`, `Q4_K`, `iq2_xxs`).
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }
}

/// The name of every type id ggml's `enum ggml_type` defines (ggml.h), including those this
/// runtime does not read, so that an error can name the format a file uses.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    if let Some(t) = GgmlType::from_id(id) {
        return Some(t.name());
    }
    Some(match id {
        3 => "q4_1",
        7 => "q5_1",
        9 => "q8_1",
        15 => "q8_K",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        31 => "q4_0_4_4",
        32 => "q4_0_4_8",
        33 => "q4_0_8_8",
        34 => "tq1_0",
        35 => "tq2_0",
        36 => "iq4_nl_4_4",
        37 => "iq4_nl_4_8",
        38 => "iq4_nl_8_8",
        40 => "nvfp4",
        41 => "q1_0",
        42 => "q2_0",
        _ => return None,
    })
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Metadata value type ids (`enum gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// Smallest encoded size of one value of this type, used to bound counts read from a file.
    pub fn min_encoded_len(self) -> usize {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            Self::Array => 12,
        }
    }
}

/// One metadata value. Arrays carry their element type so that empty arrays round-trip.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(..) => ValueType::Array,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value that fits in u64 (files differ in which integer width they use).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v as u64),
            Self::U16(v) => Some(v as u64),
            Self::U32(v) => Some(v as u64),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v as f64),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(_, items) => Some(items),
            _ => None,
        }
    }

    pub fn string_array<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        Self::Array(
            ValueType::String,
            items.into_iter().map(|s| Self::String(s.into())).collect(),
        )
    }

    pub fn i32_array(items: impl IntoIterator<Item = i32>) -> Self {
        Self::Array(ValueType::I32, items.into_iter().map(Self::I32).collect())
    }

    pub fn f32_array(items: impl IntoIterator<Item = f32>) -> Self {
        Self::Array(ValueType::F32, items.into_iter().map(Self::F32).collect())
    }

    pub fn u32_array(items: impl IntoIterator<Item = u32>) -> Self {
        Self::Array(ValueType::U32, items.into_iter().map(Self::U32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufHeader, GgufWriter, TensorDecl};

    /// A file with one tensor `t` of `ty`, two rows of two blocks, every data byte 0x11; and the
    /// offset of the tensor's type id in it.
    fn one_tensor_file(ty: GgmlType) -> (Vec<u8>, usize) {
        let decl = TensorDecl {
            name: "t".into(),
            dims: vec![2 * ty.block_len(), 2],
            ty,
        };
        let size = decl.byte_size().expect("whole blocks");
        let mut w = GgufWriter::begin(Vec::new(), &[], vec![decl], 32).unwrap();
        w.write_tensor_data(&vec![0x11; size]).unwrap();
        let bytes = w.finish().unwrap();
        // Tensor info: name (u64 length, bytes), u32 dimension count, u64 dimensions, u32 type.
        let name = [1u8, 0, 0, 0, 0, 0, 0, 0, b't'];
        let at = bytes
            .windows(9)
            .position(|w| w == name)
            .expect("tensor info");
        (bytes, at + 9 + 4 + 2 * 8)
    }

    #[test]
    fn every_type_round_trips_through_a_file() {
        for &ty in GgmlType::all() {
            let (bytes, type_at) = one_tensor_file(ty);
            assert_eq!(bytes[type_at..type_at + 4], ty.id().to_le_bytes());
            let h = GgufHeader::parse(&bytes).unwrap();
            let t = h.tensor("t").unwrap();
            assert_eq!((t.ty, &t.dims[..]), (ty, &[2 * ty.block_len(), 2][..]));
            assert_eq!(t.range.len(), 4 * ty.block_bytes(), "{ty}");
            assert_eq!(GgmlType::from_name(&ty.name().to_uppercase()), Some(ty));
        }
    }

    /// A file whose tensor sizes do not fit its types is an error that says why, not a panic.
    #[test]
    fn malformed_sizes_are_errors() {
        let parse_as = |written: GgmlType, read: u32| {
            let (mut bytes, type_at) = one_tensor_file(written);
            bytes[type_at..type_at + 4].copy_from_slice(&read.to_le_bytes());
            GgufHeader::parse(&bytes)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        // Rows of 64 values are not whole 256-value super-blocks.
        for ty in [
            GgmlType::Q2K,
            GgmlType::IQ2XXS,
            GgmlType::IQ1M,
            GgmlType::IQ4XS,
        ] {
            let err = parse_as(GgmlType::Q8_0, ty.id());
            assert!(
                err.contains(&format!("not a multiple of the {ty} block length 256")),
                "{err}"
            );
        }
        // Two rows of 512 IQ1_S values take 200 bytes; read as F32 they need 4096, past the end
        // of the file.
        let err = parse_as(GgmlType::IQ1S, GgmlType::F32.id());
        assert!(err.contains("runs past the end of the file"), "{err}");
        // Types this runtime does not read: Q4_1, a removed id, Q8_1, Q8_K, I8, ids since
        // removed from files, NVFP4, and an id past ggml's list.
        for id in [3, 4, 9, 15, 24, 31, 36, 40, 1000] {
            let err = parse_as(GgmlType::Q8_0, id);
            let named = err.contains(&format!("(ggml type {id}), a format moe-run does not read"));
            let unknown = err.contains(&format!("ggml type id {id}, which no ggml version"));
            assert!(named != unknown, "{err}");
            if id == 3 {
                assert!(err.contains("stored as Q4_1"), "{err}");
            }
            assert!(unknown || id != 1000, "{err}");
        }
    }

    #[test]
    fn row_bytes_needs_whole_blocks() {
        assert_eq!(GgmlType::MXFP4.row_bytes(64), Some(34));
        assert_eq!(GgmlType::MXFP4.row_bytes(48), None);
        assert_eq!(GgmlType::IQ2XS.row_bytes(512), Some(148));
        assert_eq!(GgmlType::IQ2XS.row_bytes(32), None);
        assert_eq!(GgmlType::F32.row_bytes(usize::MAX / 2), None, "overflow");
    }
}
