//! A Hugging Face checkpoint folder: `config.json` and safetensors shards, memory-mapped so that
//! converting never holds more than one tensor in RAM.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::error::ConvertError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceDtype {
    F32,
    F16,
    BF16,
    /// Raw bytes: packed quantized blocks and their scales (gpt-oss's MXFP4 `*_blocks` and
    /// `*_scales`), read with [`Checkpoint::bytes`] by the architecture that knows their layout.
    U8,
}

#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub file: usize,
    pub dtype: SourceDtype,
    /// PyTorch order: outermost first.
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    shards: Vec<(PathBuf, memmap2::Mmap)>,
    tensors: HashMap<String, SourceTensor>,
    /// Parts of a multimodal checkpoint that are not converted (see [`unwrap_language_model`]):
    /// each part's name (`model.vision_tower`, `mtp`, ...) and tensor count.
    pub dropped: Vec<(String, usize)>,
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ConvertError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(ConvertError::Input(format!(
                "{} is not a directory: give the Hugging Face checkpoint folder",
                dir.display()
            )));
        }
        let config = Config::load(&dir.join("config.json"))?;
        let files = shard_files(&dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (fi, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| ConvertError::io(&path, e))?;
            // SAFETY: read-only map of a file we do not modify.
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ConvertError::io(&path, e))?;
            let st = SafeTensors::deserialize(&map).map_err(|e| {
                ConvertError::Input(format!("{}: invalid safetensors file: {e}", path.display()))
            })?;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    Dtype::F32 => SourceDtype::F32,
                    Dtype::F16 => SourceDtype::F16,
                    Dtype::BF16 => SourceDtype::BF16,
                    Dtype::U8 => SourceDtype::U8,
                    other => {
                        return Err(ConvertError::Input(format!(
                            "{}: tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 \
                             checkpoints (and MXFP4 experts as U8 blocks and scales) can be \
                             converted",
                            path.display()
                        )))
                    }
                };
                let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
                let range = start..start + view.data().len();
                if tensors
                    .insert(
                        name.clone(),
                        SourceTensor {
                            file: fi,
                            dtype,
                            shape: view.shape().to_vec(),
                            range,
                        },
                    )
                    .is_some()
                {
                    return Err(ConvertError::Input(format!(
                        "tensor `{name}` appears in more than one shard"
                    )));
                }
            }
            shards.push((path, map));
        }
        let (config, tensors, dropped) = unwrap_language_model(config, tensors);
        Ok(Self {
            dir,
            config,
            shards,
            tensors,
            dropped,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Result<&SourceTensor, ConvertError> {
        self.tensors
            .get(name)
            .ok_or_else(|| ConvertError::MissingTensor(name.to_string()))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Checks a tensor's PyTorch shape.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<(), ConvertError> {
        let info = self.info(name)?;
        if info.shape != shape {
            return Err(ConvertError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(())
    }

    /// Appends the tensor's values as f32 to `out`.
    pub fn read_f32_into(&self, name: &str, out: &mut Vec<f32>) -> Result<(), ConvertError> {
        let info = self.info(name)?;
        let map = &self.shards[info.file].1;
        let bytes = &map[info.range.clone()];
        // Exactly once: growing by doubling would hold two copies of a large tensor (an
        // embedding) at once.
        let elem = match info.dtype {
            SourceDtype::F32 => 4,
            SourceDtype::F16 | SourceDtype::BF16 => 2,
            SourceDtype::U8 => 1,
        };
        out.reserve_exact(bytes.len() / elem);
        match info.dtype {
            SourceDtype::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            SourceDtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            SourceDtype::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            SourceDtype::U8 => {
                return Err(ConvertError::Input(format!(
                    "tensor `{name}` holds packed bytes (U8), not weights this architecture \
                     reads as numbers; is config.json's model_type right?"
                )))
            }
        }
        release_pages(map, info.range.clone());
        Ok(())
    }

    /// A tensor's raw little-endian bytes (U8 tensors: packed blocks and scales).
    pub fn bytes(&self, name: &str) -> Result<&[u8], ConvertError> {
        let info = self.info(name)?;
        Ok(&self.shards[info.file].1[info.range.clone()])
    }

    /// Runs `f` on a tensor's raw bytes, then drops its pages from this process's resident set
    /// (as reading values does), so packing every layer's experts does not keep them all.
    pub fn with_bytes<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> R) -> Result<R, ConvertError> {
        let info = self.info(name)?;
        let map = &self.shards[info.file].1;
        let r = f(&map[info.range.clone()]);
        release_pages(map, info.range.clone());
        Ok(r)
    }

    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        let mut v = Vec::new();
        self.read_f32_into(name, &mut v)?;
        Ok(v)
    }

    /// The most common dtype among the tensors (reported in the summary).
    pub fn dominant_dtype(&self) -> Option<SourceDtype> {
        let mut counts: HashMap<SourceDtype, usize> = HashMap::new();
        for t in self.tensors.values() {
            *counts.entry(t.dtype).or_default() += t.range.len();
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    pub fn read_text(&self, file: &str) -> Result<Option<String>, ConvertError> {
        let path = self.dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConvertError::io(&path, e)),
        }
    }

    pub fn read_json(&self, file: &str) -> Result<Option<Json>, ConvertError> {
        match self.read_text(file)? {
            None => Ok(None),
            Some(s) => serde_json::from_str(&s)
                .map(Some)
                .map_err(|e| ConvertError::Input(format!("{file}: invalid JSON: {e}"))),
        }
    }
}

/// Drops the whole pages of `range` from this process's resident set once a tensor has been
/// read, so converting a checkpoint larger than RAM keeps a small footprint (the pages stay in
/// the kernel's page cache and are re-read if touched again).
fn release_pages(map: &memmap2::Mmap, range: Range<usize>) {
    const PAGE: usize = 4096;
    let start = range.start.div_ceil(PAGE) * PAGE;
    let end = range.end / PAGE * PAGE;
    if end > start {
        // SAFETY: the map is a read-only, shared file mapping; MADV_DONTNEED only discards this
        // process's page table entries, and later reads fault the same file data back in.
        // No reference into the range is held across this call.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}

/// The shard list: from `model.safetensors.index.json` when present, else every `*.safetensors`.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ConvertError::io(&index, e))?;
        let json: Json = serde_json::from_str(&text)
            .map_err(|e| ConvertError::Input(format!("{}: invalid JSON: {e}", index.display())))?;
        let map = json
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| {
                ConvertError::Input(format!("{}: no `weight_map` object", index.display()))
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.exists()) {
            return Err(ConvertError::Input(format!(
                "{} lists {}, which does not exist",
                index.display(),
                missing.display()
            )));
        }
        return Ok(paths);
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ConvertError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(ConvertError::Input(format!(
            "{} has no *.safetensors files (PyTorch .bin checkpoints are not supported)",
            dir.display()
        )));
    }
    Ok(paths)
}

/// A multimodal checkpoint (Gemma 4's `Gemma4ForConditionalGeneration`, Qwen3.5's) wraps its
/// language model: `config.json`'s `text_config` describes it and its tensors are named
/// `model.language_model.*` (`lm_head.*` beside them). Those are converted exactly as the
/// text-only model's (`model.*`); the other parts (vision and audio towers, their projections,
/// multi-token-prediction layers) are left out and counted, so that the user is told. A
/// checkpoint without that layout is returned unchanged.
fn unwrap_language_model(
    config: Config,
    tensors: HashMap<String, SourceTensor>,
) -> (Config, HashMap<String, SourceTensor>, Vec<(String, usize)>) {
    const WRAPPED: &str = "model.language_model.";
    let text = match config.get("text_config") {
        Some(t) if t.is_object() && tensors.keys().any(|n| n.starts_with(WRAPPED)) => t.clone(),
        _ => return (config, tensors, Vec::new()),
    };
    let mut text = text;
    // The outer config may carry what the text model's leaves to it.
    for key in ["tie_word_embeddings", "torch_dtype", "dtype"] {
        if let (Some(v), Some(obj)) = (config.get(key), text.as_object_mut()) {
            obj.entry(key).or_insert_with(|| v.clone());
        }
    }
    let mut kept = HashMap::with_capacity(tensors.len());
    let mut dropped = std::collections::BTreeMap::<String, usize>::new();
    for (name, t) in tensors {
        if let Some(rest) = name.strip_prefix(WRAPPED) {
            kept.insert(format!("model.{rest}"), t);
        } else if name.starts_with("lm_head.") {
            kept.insert(name, t);
        } else {
            let part = match name.split('.').collect::<Vec<_>>().as_slice() {
                ["model", part, ..] => format!("model.{part}"),
                [part, ..] => part.to_string(),
                [] => name.clone(),
            };
            *dropped.entry(part).or_default() += 1;
        }
    }
    (Config { json: text }, kept, dropped.into_iter().collect())
}

/// `config.json`, with accessors whose errors name the missing field.
pub struct Config {
    pub json: Json,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConvertError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConvertError::io(path, e))?;
        let json: Json = serde_json::from_str(&text)
            .map_err(|e| ConvertError::Input(format!("{}: invalid JSON: {e}", path.display())))?;
        if !json.is_object() {
            return Err(ConvertError::Input(format!(
                "{}: expected a JSON object",
                path.display()
            )));
        }
        Ok(Self { json })
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub fn model_type(&self) -> Result<&str, ConvertError> {
        self.get("model_type")
            .and_then(Json::as_str)
            .ok_or_else(|| ConvertError::Config {
                field: "model_type".into(),
                why: "is missing".into(),
            })
    }

    pub fn usize(&self, key: &str) -> Result<usize, ConvertError> {
        self.opt_usize(key)?.ok_or_else(|| ConvertError::Config {
            field: key.into(),
            why: "is missing".into(),
        })
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConvertError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| ConvertError::Config {
                    field: key.into(),
                    why: format!("must be a non-negative integer, found {v}"),
                }),
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64, ConvertError> {
        self.opt_f64(key)?.ok_or_else(|| ConvertError::Config {
            field: key.into(),
            why: "is missing".into(),
        })
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConvertError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ConvertError::Config {
                field: key.into(),
                why: format!("must be a number, found {v}"),
            }),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConvertError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ConvertError::Config {
                field: key.into(),
                why: format!("must be true or false, found {v}"),
            }),
        }
    }

    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>, ConvertError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Json::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| ConvertError::Config {
                            field: key.into(),
                            why: format!("must list integers, found {v}"),
                        })
                })
                .collect(),
            Some(v) => Err(ConvertError::Config {
                field: key.into(),
                why: format!("must be a list, found {v}"),
            }),
        }
    }
}
