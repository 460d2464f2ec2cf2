//! The small trained Qwen3-MoE model in `models/small-moe/` (made by
//! `scripts/train/train_small_moe.py`, see its REPORT.md).
//!
//! - Its committed bf16 Hugging Face checkpoint, converted to f32, reproduces transformers'
//!   float32 logits on a held-out paragraph within 1e-4 of the largest logit, and transformers'
//!   32 greedy tokens exactly.
//! - Seeded sampling (temperature 0.8) gives the same text twice.
//! - The committed Q8_0 GGUF loads, carries the same tokenizer, and stays close to f32.

use std::path::{Path, PathBuf};

use moe_convert::{convert, ConvertOptions};
use moe_e2e::{cosine, greedy, max_rel_diff, prompt_logits};
use moe_runtime::engine::{generate, Request};
use moe_runtime::gguf::{GgmlType, GgufFile};
use moe_runtime::model::{KvType, Model, Session};
use moe_runtime::sampling::{argmax_logits, Sampler, SamplerConfig};
use moe_runtime::tokenizer::Tokenizer;
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    text: String,
    ids: Vec<u32>,
    logits_file: String,
    greedy_ids: Vec<u32>,
}

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models")
        .join("small-moe")
}

fn reference() -> Reference {
    let path = model_dir().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference.json parses")
}

/// The HF checkpoint converted to `ty` in a temporary folder (kept alive by the returned guard).
fn convert_checkpoint(ty: GgmlType) -> (tempfile::TempDir, GgufFile) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(format!("small-moe-{}.gguf", ty.name()));
    convert(
        &model_dir().join("hf"),
        &path,
        &ConvertOptions::new(ty),
        &|_, _, _| {},
    )
    .unwrap_or_else(|e| panic!("converting models/small-moe/hf: {e}"));
    let file = GgufFile::open(&path).expect("converted file opens");
    (dir, file)
}

fn committed_q8_0() -> GgufFile {
    GgufFile::open(model_dir().join("small-moe-q8_0.gguf")).expect("committed Q8_0 file opens")
}

/// `n` tokens sampled after `prompt` with temperature 0.8 and a fixed seed.
fn sample(file: &GgufFile, prompt: &[u32], seed: u64, n: usize) -> Vec<u32> {
    let model = Model::load(file).expect("model loads");
    let mut session = Session::with_kv_type(&model, 256, KvType::F32);
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: 0.8,
        seed,
        ..SamplerConfig::default()
    });
    let mut out = Vec::new();
    // No tokenizer: nothing ends generation early.
    let request = Request {
        prompt,
        cached: 0,
        max_tokens: n,
        stop: &[],
        ignore_eos: true,
        skip_special: false,
        top_logprobs: None,
    };
    generate(&mut session, &mut sampler, None, &request, |piece| {
        out.extend(piece.id);
        true
    })
    .expect("generation");
    out
}

#[test]
fn f32_conversion_matches_transformers() {
    let r = reference();
    let (_dir, file) = convert_checkpoint(GgmlType::F32);
    let tok = Tokenizer::from_gguf(file.header()).expect("tokenizer");
    assert_eq!(tok.encode(&r.text, true).unwrap(), r.ids, "tokenization");

    let f = std::fs::File::open(model_dir().join(&r.logits_file)).expect("reference logits");
    let (want, n, vocab) =
        moe_runtime::npy::read_f32_2d(std::io::BufReader::new(f)).expect("valid .npy");
    assert_eq!(n, r.ids.len());
    let got = prompt_logits(&file, &r.ids);
    let diff = max_rel_diff(&got, &want, vocab);
    println!("small-moe f32, {n} held-out tokens: max |diff| / max |logit| = {diff:.2e}");
    assert!(diff < TOLERANCE, "logits differ by {diff:e}");

    let cont = greedy(&file, &r.ids, r.greedy_ids.len());
    assert_eq!(cont, r.greedy_ids, "greedy continuation");
}

#[test]
fn seeded_sampling_is_deterministic() {
    let r = reference();
    let file = committed_q8_0();
    let a = sample(&file, &r.ids, 42, 48);
    let b = sample(&file, &r.ids, 42, 48);
    assert_eq!(a.len(), 48);
    assert_eq!(a, b, "same seed, same tokens");
    let c = sample(&file, &r.ids, 43, 48);
    assert_ne!(a, c, "another seed gives another continuation");
    let tok = Tokenizer::from_gguf(file.header()).expect("tokenizer");
    println!("seed 42: {:?}", tok.decode(&a, true).unwrap());
}

#[test]
fn committed_q8_0_is_close_to_f32() {
    let r = reference();
    let q8 = committed_q8_0();
    let h = q8.header();
    assert!(
        h.tensors().iter().any(|t| t.ty == GgmlType::Q8_0),
        "the committed file is Q8_0"
    );
    let tok = Tokenizer::from_gguf(h).expect("tokenizer");
    assert_eq!(tok.encode(&r.text, true).unwrap(), r.ids);

    // Positions: the held-out paragraph and transformers' greedy continuation of it.
    let mut ids = r.ids.clone();
    ids.extend_from_slice(&r.greedy_ids[..r.greedy_ids.len() - 1]);
    let (_dir, f32_file) = convert_checkpoint(GgmlType::F32);
    let vocab = h.tensor("token_embd.weight").expect("token_embd").dims[1];
    let a = prompt_logits(&f32_file, &ids);
    let b = prompt_logits(&q8, &ids);
    let (mut agree, mut worst) = (0usize, 1f32);
    for (ra, rb) in a.chunks(vocab).zip(b.chunks(vocab)) {
        agree += (argmax_logits(ra) == argmax_logits(rb)) as usize;
        worst = worst.min(cosine(ra, rb));
    }
    let total = ids.len();
    println!("small-moe Q8_0 vs f32: top-1 {agree}/{total}, worst cosine {worst:.5}");
    assert!(agree * 100 >= total * 95, "top-1 agreement {agree}/{total}");
    assert!(worst > 0.99, "worst cosine {worst}");
    // Within 1e-4 would be f32 exactness; Q8_0 is a few percent at most.
    assert!(max_rel_diff(&b, &a, vocab) < 0.1);
}
