//! The GGUF file format: a zero-copy reader over a memory map and a streaming writer.
//!
//! Why not gguf-rs-lib (the crate the project card names): its reader copies tensor data into
//! `Vec`s instead of borrowing it from the map, it rejects metadata keys containing hyphens (so
//! `gpt-oss` files fail), and its writer takes tensors in memory. The runtime must borrow tensors
//! from the map and the converter must stream a model larger than RAM, so this module implements
//! the small, fully validated subset of GGUF v3 both need.

mod reader;
mod types;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use reader::{align_up, GgufHeader, TensorInfo, DEFAULT_ALIGNMENT};
pub use types::{ggml_type_name, GgmlType, Value, ValueType};
pub use writer::{GgufWriter, TensorDecl};

/// "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;

/// The alignment moe-convert writes: one page, so each tensor (and each expert slab whose size is
/// a multiple of 4096) can be read from flash with page-aligned I/O.
pub const PAGE_ALIGNMENT: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: magic bytes are {0:?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("GGUF file is truncated: {what} at byte {at} runs past the end")]
    Truncated { what: String, at: usize },
    #[error("tensor `{name}` {why}")]
    Tensor { name: String, why: String },
    /// A tensor in a block format this runtime has no kernels for.
    #[error("{}", unsupported_type_message(name, *id))]
    UnsupportedType { name: String, id: u32 },
    #[error("invalid GGUF: {0}")]
    Invalid(String),
    #[error("cannot read {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What moe-run says about a tensor type it cannot read, and what to do instead.
fn unsupported_type_message(name: &str, id: u32) -> String {
    let readable: Vec<String> = GgmlType::all()
        .iter()
        .map(|t| t.name().to_uppercase())
        .collect();
    let what = match ggml_type_name(id) {
        Some(ty) => format!(
            "is stored as {} (ggml type {id}), a format moe-run does not read",
            ty.to_uppercase()
        ),
        None => format!(
            "has ggml type id {id}, which no ggml version known to moe-run defines (a corrupt \
             file, or one from a newer llama.cpp)"
        ),
    };
    format!(
        "tensor `{name}` {what}. moe-run reads {}. Use a file of this model in one of those \
         (Hub repositories usually carry Q4_K_M and Q8_0), make one from its f16/bf16 GGUF with \
         llama-quantize, or convert its Hugging Face checkpoint with moe-convert",
        readable.join(", ")
    )
}

/// A memory-mapped GGUF file with its validated header.
pub struct GgufFile {
    map: memmap2::Mmap,
    header: GgufHeader,
    path: PathBuf,
    /// Rearranged copies of tensors ([`GgufFile::packed_bytes`]), by position in the header.
    packed: Vec<OnceLock<Box<[u8]>>>,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |cause| GgufError::Open {
            path: path.clone(),
            cause,
        };
        let file = File::open(&path).map_err(open_err)?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not being
        // truncated underneath us while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(open_err)?;
        let header = GgufHeader::parse(&map)?;
        let packed = header.tensors().iter().map(|_| OnceLock::new()).collect();
        Ok(Self {
            map,
            header,
            path,
            packed,
        })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Tells the kernel how the map will be read (`memmap2::Advice`), for `range` or, with
    /// `None`, the whole map. Advisory: failures are ignored (the reads work either way).
    pub fn advise(&self, advice: memmap2::Advice, range: Option<std::ops::Range<usize>>) {
        let _ = match range {
            None => self.map.advise(advice),
            Some(r) => {
                // madvise wants a page-aligned start; widening to the page is harmless.
                let start = r.start & !(page_size() - 1);
                self.map
                    .advise_range(advice, start, r.end.min(self.map.len()) - start)
            }
        };
    }

    /// The raw bytes of a tensor, borrowed from the map (bounds were checked when parsing).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.range.clone()]
    }

    /// Tensor `info`'s bytes as `pack` rearranges them (the same number of bytes), made on the
    /// first call and kept as long as the file. The map's pages wholly inside the tensor are
    /// then dropped from the process (they come back from the file if read again), so that the
    /// copy replaces them in memory instead of doubling it.
    pub fn packed_bytes(&self, info: &TensorInfo, pack: impl FnOnce(&[u8]) -> Vec<u8>) -> &[u8] {
        let at = self
            .header
            .tensor_position(&info.name)
            .expect("a tensor of this file");
        self.packed[at].get_or_init(|| {
            let packed = pack(self.tensor_bytes(info)).into_boxed_slice();
            assert_eq!(packed.len(), info.range.len(), "packing keeps the size");
            let page = page_size();
            let (start, end) = (
                info.range.start.next_multiple_of(page),
                info.range.end & !(page - 1),
            );
            if start < end {
                // SAFETY: MADV_DONTNEED on a private, read-only file mapping only drops this
                // process's references to the pages: later reads fault the file's bytes in again,
                // so every slice borrowed from the map stays valid and unchanged.
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
            packed
        })
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
