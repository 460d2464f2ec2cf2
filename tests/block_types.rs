//! Every block format a Hub file may hold, in a model end to end: the Q4_K_M fixture
//! (tests/fixtures/qwen3_moe_q4_k_m, every matrix width a multiple of 256) with each quantized
//! matrix replaced by random blocks of one type, against the same model with those blocks
//! decoded to F32. The file loads, and the quantized products (on Q8_0 or Q8_K activations) give
//! the F32 model's logits up to the activations' 8-bit rounding: cosine similarity above 0.998
//! at every position.

use std::path::Path;

use moe_e2e::{cosine, fixtures_dir, prompt_logits};
use moe_runtime::gguf::{GgmlType, GgufFile, GgufWriter, TensorDecl};
use moe_runtime::sampling::argmax_logits;
use moe_runtime::tensor::quant::dequantize;
use moe_runtime::tensor::random::random_blocks;

const PROMPT: [u32; 8] = [1, 17, 200, 5, 42, 99, 300, 7];

/// Copies `src` to `dst` with every quantized tensor's data replaced: `(type, data)` from
/// `replace(element count, seed)`.
fn rewrite(src: &Path, dst: &Path, replace: impl Fn(usize, u64) -> (GgmlType, Vec<u8>)) {
    let file = GgufFile::open(src).expect("fixture opens");
    let h = file.header();
    // Every token takes every expert: a router choice that flips between two close experts on
    // the activations' rounding would be a jump, not the drift this test bounds.
    let experts = h
        .metadata()
        .iter()
        .find(|(k, _)| k.ends_with(".expert_count"))
        .map(|(_, v)| v.clone())
        .expect("expert count");
    let meta: Vec<_> = h
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .map(|(k, v)| match k.ends_with(".expert_used_count") {
            true => (k.clone(), experts.clone()),
            false => (k.clone(), v.clone()),
        })
        .collect();
    let mut data = Vec::new();
    let mut decls = Vec::new();
    for (i, t) in h.tensors().iter().enumerate() {
        let (ty, bytes) = if t.ty == GgmlType::F32 {
            (t.ty, file.tensor_bytes(t).to_vec())
        } else {
            replace(t.n_elements(), i as u64)
        };
        decls.push(TensorDecl {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty,
        });
        data.push(bytes);
    }
    let out = std::fs::File::create(dst).expect("create");
    let mut w = GgufWriter::begin(out, &meta, decls, h.alignment as u32).expect("header");
    for d in &data {
        w.write_tensor_data(d).expect("data");
    }
    w.finish().expect("finish");
}

#[test]
fn every_decode_only_type_runs_a_model_like_its_f32_decoding() {
    let src = fixtures_dir().join("qwen3_moe_q4_k_m/model.gguf");
    let dir = tempfile::tempdir().expect("temp dir");
    for &ty in GgmlType::all().iter().filter(|t| !t.can_encode()) {
        let blocks = |n: usize, seed: u64| {
            // Block scales that give weights of a trained model's size (RMS about 0.03): the
            // formats' sub-block scales and levels differ in range by a factor of a hundred.
            let probe = random_blocks(ty, n / ty.block_len(), seed, 1.0);
            let mut values = vec![0f32; n];
            dequantize(ty, &probe, &mut values);
            let rms = (values.iter().map(|v| v * v).sum::<f32>() / n as f32).sqrt();
            random_blocks(ty, n / ty.block_len(), seed, 0.03 / rms)
        };
        let (quant, float) = (dir.path().join("q.gguf"), dir.path().join("f.gguf"));
        rewrite(&src, &quant, |n, seed| (ty, blocks(n, seed)));
        rewrite(&src, &float, |n, seed| {
            let mut values = vec![0f32; n];
            dequantize(ty, &blocks(n, seed), &mut values);
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (GgmlType::F32, bytes)
        });
        let got = prompt_logits(&GgufFile::open(&quant).expect("opens"), &PROMPT);
        let want = prompt_logits(&GgufFile::open(&float).expect("opens"), &PROMPT);
        let vocab = got.len() / PROMPT.len();
        let (mut worst, mut agree) = (1f32, 0);
        for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
            assert!(g.iter().all(|v| v.is_finite()), "{ty}: non-finite logits");
            worst = worst.min(cosine(g, w));
            agree += (argmax_logits(g) == argmax_logits(w)) as usize;
        }
        println!(
            "{ty}: worst cosine {worst:.6}, top-1 {agree}/{}",
            PROMPT.len()
        );
        assert!(
            worst > 0.998,
            "{ty}: worst cosine {worst} against its f32 decoding"
        );
    }
}
