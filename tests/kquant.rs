//! A Q4_K_M file quantized by llama.cpp itself (tests/fixtures/qwen3_moe_q4_k_m, made by
//! scripts/fixtures/make_kquant_fixture.py): Q4_K and Q6_K matrices, F32 norms and routers, as Hub
//! downloads are. The runtime must (a) give llama.cpp's logits on the same file, up to float
//! summation order, and (b) stay as close to the unquantized model (transformers' logits) as
//! llama.cpp does.

use std::path::PathBuf;

use moe_e2e::{fixtures_dir, prompt_logits, stepwise_logits};
use moe_runtime::gguf::{GgmlType, GgufFile};
use moe_runtime::sampling::argmax_logits;

const FIXTURE: &str = "qwen3_moe_q4_k_m";

struct Case {
    ids: Vec<u32>,
    /// transformers on the unquantized model
    reference: Vec<f32>,
    /// llama.cpp on model.gguf
    llama: Vec<f32>,
}

fn dir() -> PathBuf {
    fixtures_dir().join(FIXTURE)
}

fn npy(name: &str) -> (Vec<f32>, usize) {
    let f = std::fs::File::open(dir().join(name)).expect("logits file");
    let (v, _, vocab) =
        moe_runtime::npy::read_f32_2d(std::io::BufReader::new(f)).expect("valid .npy");
    (v, vocab)
}

fn cases() -> (Vec<Case>, usize) {
    let text = std::fs::read_to_string(dir().join("expected.json")).expect("expected.json");
    let exp: serde_json::Value = serde_json::from_str(&text).expect("expected.json parses");
    let mut vocab = 0;
    let cases = exp["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            let ids = p["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let (reference, v) = npy(p["logits_file"].as_str().unwrap());
            let (llama, _) = npy(p["llama_logits_file"].as_str().unwrap());
            vocab = v;
            Case {
                ids,
                reference,
                llama,
            }
        })
        .collect();
    (cases, vocab)
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(p || q) of the softmaxes of two logit rows.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// (top-1 agreements, mean KL from `reference`) over all rows.
fn agreement(got: &[f32], reference: &[f32], vocab: usize) -> (usize, f64) {
    let mut agree = 0;
    let mut kls = 0.0;
    for (g, r) in got.chunks(vocab).zip(reference.chunks(vocab)) {
        agree += (argmax_logits(g) == argmax_logits(r)) as usize;
        kls += kl(r, g);
    }
    (agree, kls / (got.len() / vocab) as f64)
}

#[test]
fn q4_k_m_file_has_k_quants() {
    let file = GgufFile::open(dir().join("model.gguf")).expect("fixture opens");
    let types: Vec<GgmlType> = file.header().tensors().iter().map(|t| t.ty).collect();
    for ty in [GgmlType::Q4K, GgmlType::Q6K] {
        assert!(types.contains(&ty), "no {ty} tensor in the fixture");
    }
}

#[test]
fn q4_k_m_logits_match_llama_cpp_on_the_same_file() {
    let file = GgufFile::open(dir().join("model.gguf")).expect("fixture opens");
    let (cases, vocab) = cases();
    let (mut worst, mut agree, mut total) = (0f32, 0, 0);
    for c in &cases {
        for got in [prompt_logits(&file, &c.ids), stepwise_logits(&file, &c.ids)] {
            assert_eq!(got.len(), c.llama.len());
            let scale = c.llama.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(&c.llama)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(diff / scale);
            let (a, _) = agreement(&got, &c.llama, vocab);
            agree += a;
            total += got.len() / vocab;
        }
    }
    println!(
        "vs llama.cpp on the same Q4_K_M file: max |diff| / max |logit| = {worst:.2e}, top-1 {agree}/{total}"
    );
    // Same encodings, same integer sums; only float summation order differs (measured: 3.5e-7),
    // which could move an activation across a Q8_K rounding boundary now and then.
    assert!(worst <= 1e-4, "logits differ from llama.cpp's by {worst}");
    assert_eq!(agree, total, "top-1 differs from llama.cpp's");
}

#[test]
fn q4_k_m_stays_as_close_to_unquantized_as_llama_cpp() {
    let file = GgufFile::open(dir().join("model.gguf")).expect("fixture opens");
    let (cases, vocab) = cases();
    let (mut ours_agree, mut llama_agree, mut total) = (0, 0, 0);
    let (mut ours_kl, mut llama_kl) = (0.0, 0.0);
    for c in &cases {
        let got = prompt_logits(&file, &c.ids);
        let (a, k) = agreement(&got, &c.reference, vocab);
        let (la, lk) = agreement(&c.llama, &c.reference, vocab);
        let rows = got.len() / vocab;
        ours_agree += a;
        llama_agree += la;
        ours_kl += k * rows as f64;
        llama_kl += lk * rows as f64;
        total += rows;
    }
    let (ours_kl, llama_kl) = (ours_kl / total as f64, llama_kl / total as f64);
    println!(
        "vs unquantized (transformers): ours top-1 {ours_agree}/{total}, mean KL {ours_kl:.2e}; \
         llama.cpp top-1 {llama_agree}/{total}, mean KL {llama_kl:.2e}"
    );
    assert!(
        ours_agree + 1 >= llama_agree,
        "top-1 worse than llama.cpp's"
    );
    assert!(
        ours_kl <= 1.05 * llama_kl + 1e-6,
        "KL {ours_kl} vs llama.cpp's {llama_kl}"
    );
    // And a quantization that works at all (random Gaussian weights lose more to 4 bits than
    // trained ones: llama.cpp keeps 27 of 35 top-1 tokens of this fixture).
    assert!(ours_agree * 10 >= total * 7, "top-1 {ours_agree}/{total}");
}
