//! Helpers shared by the end-to-end tests: fixtures recorded from transformers, conversion into
//! temporary files, and running the runtime on token ids.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_convert::{convert, ConvertOptions, Mix};
use moe_runtime::gguf::{GgmlType, GgufFile};
use moe_runtime::model::{KvType, Model, Session};
use moe_runtime::moe::cache::{CacheConfig, Eviction, ExpertCache};
use serde::Deserialize;

/// Every fixture, one per architecture plus dtype/sharding variants.
pub const FIXTURES: &[&str] = &[
    "mixtral",
    "mixtral_f16_sharded",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_moe_bf16",
    "olmoe",
    "granitemoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "ernie4_5_moe",
    "gpt_oss",
    "gpt_oss_bf16",
    "smallthinker",
    "gemma4",
    "lfm2_moe",
    "qwen35_moe",
    "granite_hybrid",
];

#[derive(Debug, Deserialize)]
pub struct PromptCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub logits_file: String,
    pub greedy_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct Expected {
    pub prompts: Vec<PromptCase>,
}

pub struct Fixture {
    pub name: String,
    pub dir: PathBuf,
    pub expected: Expected,
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let dir = fixtures_dir().join(name);
        let text = std::fs::read_to_string(dir.join("expected.json"))
            .unwrap_or_else(|e| panic!("{name}: expected.json: {e}"));
        Fixture {
            name: name.to_string(),
            expected: serde_json::from_str(&text).expect("expected.json parses"),
            dir,
        }
    }

    /// transformers' logits for prompt `i`: `(values, n_tokens, vocab)`.
    pub fn logits(&self, i: usize) -> (Vec<f32>, usize, usize) {
        let path = self.dir.join(&self.expected.prompts[i].logits_file);
        let f = std::fs::File::open(&path).expect("logits file");
        moe_runtime::npy::read_f32_2d(std::io::BufReader::new(f)).expect("valid .npy")
    }

    /// Converts the fixture to `ty` in a fresh temporary folder.
    /// Converted with one of llama.cpp's mixes (`--type q4_k_m` ...).
    pub fn convert_mix(&self, mix: Mix) -> Converted {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(format!("{}-{mix:?}.gguf", self.name));
        let opts = ConvertOptions {
            mix: Some(mix),
            ..ConvertOptions::new(mix.default_type())
        };
        convert(&self.dir, &path, &opts, &|_, _, _| {})
            .unwrap_or_else(|e| panic!("converting {}: {e}", self.name));
        Converted { _dir: dir, path }
    }

    pub fn convert(&self, ty: GgmlType) -> Converted {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(format!("{}-{}.gguf", self.name, ty.name()));
        convert(&self.dir, &path, &ConvertOptions::new(ty), &|_, _, _| {})
            .unwrap_or_else(|e| panic!("converting {}: {e}", self.name));
        Converted { _dir: dir, path }
    }
}

/// A converted file; its temporary folder lives as long as this value.
pub struct Converted {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Converted {
    pub fn open(&self) -> GgufFile {
        GgufFile::open(&self.path).expect("converted file opens")
    }
}

/// Logits of every position of `ids` (`[n, vocab]`) from one prefill.
pub fn prompt_logits(file: &GgufFile, ids: &[u32]) -> Vec<f32> {
    let model = Model::load(file).expect("model loads");
    let mut s = Session::with_kv_type(&model, 256, KvType::F32);
    s.forward(ids, true).expect("forward").to_vec()
}

/// Logits of every position computed one token at a time through the KV cache.
pub fn stepwise_logits(file: &GgufFile, ids: &[u32]) -> Vec<f32> {
    let model = Model::load(file).expect("model loads");
    let mut s = Session::with_kv_type(&model, 256, KvType::F32);
    let mut out = Vec::new();
    for &id in ids {
        out.extend_from_slice(s.forward(&[id], false).expect("forward"));
    }
    out
}

/// `n` greedy tokens after `ids`, without stopping at end-of-generation tokens.
pub fn greedy(file: &GgufFile, ids: &[u32], n: usize) -> Vec<u32> {
    let model = Model::load(file).expect("model loads");
    let mut s = Session::with_kv_type(&model, 256, KvType::F32);
    let mut logits = s.forward(ids, false).expect("forward").to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = moe_runtime::sampling::argmax_logits(&logits);
        out.push(next);
        logits = s.forward(&[next], false).expect("forward").to_vec();
    }
    out
}

/// Largest |a - b| over the largest |b|, per row of `vocab` values; returns the worst row.
pub fn max_rel_diff(a: &[f32], b: &[f32], vocab: usize) -> f32 {
    assert_eq!(a.len(), b.len());
    a.chunks(vocab)
        .zip(b.chunks(vocab))
        .map(|(ra, rb)| {
            let scale = rb.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            ra.iter()
                .zip(rb)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                / scale
        })
        .fold(0f32, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb)) as f32
}

/// Copies a GGUF file, keeping only the metadata `keep` accepts (tensors unchanged).
pub fn rewrite_gguf(src: &Path, dst: &Path, keep: impl Fn(&str) -> bool) {
    use moe_runtime::gguf::{GgufWriter, TensorDecl};
    let file = GgufFile::open(src).expect("source opens");
    let h = file.header();
    let meta: Vec<_> = h
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.alignment" && keep(k))
        .cloned()
        .collect();
    let decls = h
        .tensors()
        .iter()
        .map(|t| TensorDecl {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let out = std::fs::File::create(dst).expect("create");
    let mut w = GgufWriter::begin(out, &meta, decls, h.alignment as u32).expect("header");
    for t in h.tensors() {
        w.write_tensor_data(file.tensor_bytes(t)).expect("data");
    }
    w.finish().expect("finish");
}

/// Copies a GGUF file with its metadata changed by `edit` (tensors unchanged).
pub fn rewrite_gguf_metadata(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&mut Vec<(String, moe_runtime::gguf::Value)>),
) {
    use moe_runtime::gguf::{GgufWriter, TensorDecl};
    let file = GgufFile::open(src).expect("source opens");
    let h = file.header();
    let mut meta: Vec<_> = h
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .cloned()
        .collect();
    edit(&mut meta);
    let decls = h
        .tensors()
        .iter()
        .map(|t| TensorDecl {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let out = std::fs::File::create(dst).expect("create");
    let mut w = GgufWriter::begin(out, &meta, decls, h.alignment as u32).expect("header");
    for t in h.tensors() {
        w.write_tensor_data(file.tensor_bytes(t)).expect("data");
    }
    w.finish().expect("finish");
}

/// An expert cache of `slots` slots for tests: buffered reads from the real file, two I/O
/// threads, no flash emulation (change fields with `..cache_config(..)`).
pub fn cache_config(slots: usize, eviction: Eviction) -> CacheConfig {
    CacheConfig {
        slots,
        eviction,
        direct_io: false,
        flash: None,
        io_threads: 2,
        max_speculative_bytes: 1 << 20,
    }
}

/// The expert cache of `model`, read from its file at `path`.
pub fn expert_cache(model: &Model, path: &Path, cfg: CacheConfig) -> Arc<ExpertCache> {
    let layout = model.expert_layout();
    Arc::new(ExpertCache::new(layout, model.hp.n_expert_used, path, cfg).unwrap())
}
