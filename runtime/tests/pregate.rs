//! The pre-gating router of models/small-moe (run with `--features pregate`): tract reproduces
//! PyTorch's outputs on a stored fixture, and the backbone's output does not depend on which
//! predictor (if any) guesses the experts.
#![cfg(feature = "pregate")]

use std::path::PathBuf;
use std::sync::Arc;

use moe_runtime::gguf::GgufFile;
use moe_runtime::model::{ExpertStreaming, KvType, Model, Session};
use moe_runtime::moe::cache::{CacheConfig, Eviction, ExpertCache, ExpertLayout};
use moe_runtime::moe::predictor::{
    find_sidecar, ExpertPredictor, FrequencyPredictor, Predictions, PregatePredictor,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_path() -> PathBuf {
    root().join("models/small-moe/small-moe-q8_0.gguf")
}

fn npy(name: &str) -> (Vec<f32>, usize, usize) {
    let p = root().join("runtime/tests/fixtures/pregate").join(name);
    moe_runtime::npy::read_f32_2d(std::fs::File::open(&p).unwrap()).unwrap()
}

fn load_pregate(model: &Model, k: Option<usize>) -> PregatePredictor {
    let onnx = find_sidecar(&model_path(), model.file.header()).expect("sidecar beside the model");
    PregatePredictor::load(&onnx, model.hp.n_layer, model.hp.n_expert, k).unwrap()
}

#[test]
fn tract_matches_pytorch() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file).unwrap();
    let mut p = load_pregate(&model, None);
    let (tokens, _, n) = npy("tokens.npy");
    let (expected, rows, cols) = npy("expected_logits.npy");
    assert_eq!(rows, n);
    let mut worst = 0f32;
    for (t, &tok) in tokens.iter().enumerate() {
        let got = p.step(tok as u32).unwrap();
        assert_eq!(got.len(), cols);
        for (a, b) in got.iter().zip(&expected[t * cols..(t + 1) * cols]) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst < 1e-4, "tract differs from PyTorch by {worst}");
    let t0 = std::time::Instant::now();
    for _ in 0..200 {
        p.step(tokens[0] as u32).unwrap();
    }
    // Printed for the report (not asserted: the machine's load varies).
    eprintln!(
        "pregate step: {:.1} us",
        t0.elapsed().as_secs_f64() * 1e6 / 200.0
    );
    // After a reset the state starts over: the first token's logits again.
    p.reset();
    let again = p.step(tokens[0] as u32).unwrap();
    assert!(again
        .iter()
        .zip(&expected[..cols])
        .all(|(a, b)| (a - b).abs() < 1e-4));
    // Predictions are the top-k of those logits, per layer.
    p.reset();
    let mut out = Predictions::default();
    p.predict(&[tokens[0] as u32], 0, &mut out).unwrap();
    let e = model.hp.n_expert;
    for l in 0..model.hp.n_layer {
        let row = &expected[l * e..(l + 1) * e];
        let best = moe_runtime::moe::predictor::top_k(row.iter().copied(), 4);
        assert_eq!(out.experts(0, l), &best[..], "layer {l}");
    }
}

#[test]
fn a_model_of_another_shape_is_refused() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file).unwrap();
    let onnx = find_sidecar(&model_path(), model.file.header()).unwrap();
    let err = PregatePredictor::load(&onnx, model.hp.n_layer, 8, None)
        .err()
        .expect("8 experts do not match");
    assert!(err.to_string().contains("another model"), "{err}");
}

/// Logits of a prompt and of 24 greedy decode steps, streaming through a quarter of the experts.
fn run(model: &Model, predictor: Option<Box<dyn ExpertPredictor>>) -> (Vec<f32>, f64) {
    let layout = ExpertLayout::from_model(model);
    let slots = layout.total_expert_bytes() / 4 / layout.slot_bytes();
    let cache = Arc::new(
        ExpertCache::new(
            model,
            &model_path(),
            CacheConfig {
                slots,
                eviction: Eviction::Belady,
                direct_io: false,
                flash: None,
                io_threads: 2,
                max_speculative_bytes: 2 * layout.expert_bytes(0, 0),
            },
        )
        .unwrap(),
    );
    let mut s = Session::with_kv_type(model, 128, KvType::F32);
    s.set_streaming(ExpertStreaming {
        cache: Some(cache),
        lookahead: 0,
    });
    s.set_predictor(predictor);
    let prompt = [0u32, 510, 262, 1150, 286, 264, 2313, 11, 339, 373];
    let mut logits = s.forward(&prompt, true).unwrap().to_vec();
    let vocab = model.hp.n_vocab;
    let mut next = moe_runtime::sampling::argmax_logits(&logits[logits.len() - vocab..]);
    for _ in 0..24 {
        let l = s.forward(&[next], false).unwrap().to_vec();
        next = moe_runtime::sampling::argmax_logits(&l);
        logits.extend_from_slice(&l);
    }
    let recall = s.predictor_stats().map_or(0.0, |p| p.recall());
    (logits, recall)
}

#[test]
fn output_is_identical_whatever_the_predictor() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file).unwrap();
    let resident = {
        let mut s = Session::with_kv_type(&model, 128, KvType::F32);
        let prompt = [0u32, 510, 262, 1150, 286, 264, 2313, 11, 339, 373];
        s.forward(&prompt, true).unwrap().to_vec()
    };
    let (none, _) = run(&model, None);
    assert_eq!(&none[..resident.len()], &resident[..]);
    let moe = vec![true; model.hp.n_layer];
    let (freq, _) = run(
        &model,
        Some(Box::new(FrequencyPredictor::new(moe, model.hp.n_expert, 4))),
    );
    let (pregate, recall) = run(&model, Some(Box::new(load_pregate(&model, Some(6)))));
    assert!(none == freq, "frequency predictor changed the output");
    assert!(none == pregate, "pre-gating predictor changed the output");
    // The guesses were made and scored (a trained router is far better than chance, 4/24).
    assert!(recall > 0.3, "pre-gating recall {recall}");
}
