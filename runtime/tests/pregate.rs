//! The pre-gating router of models/small-moe: the native GRU (and, with `--features pregate`,
//! tract) reproduces PyTorch's outputs on a stored fixture, bad or foreign ONNX files are
//! refused with a clear error, and the backbone's output does not depend on which predictor (if
//! any) guesses the experts.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_runtime::gguf::GgufFile;
use moe_runtime::model::{ExpertStreaming, KvType, Model, Session};
use moe_runtime::moe::cache::{CacheConfig, Eviction, ExpertCache};
#[cfg(feature = "pregate")]
use moe_runtime::moe::predictor::PregatePredictor;
use moe_runtime::moe::predictor::{
    find_sidecar, ExpertPredictor, FrequencyPredictor, GruPredictor, Predictions, PredictorError,
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

fn onnx_path(model: &Model) -> PathBuf {
    find_sidecar(&model_path(), model.file.header()).expect("sidecar beside the model")
}

fn load_native(model: &Model, k: Option<usize>) -> GruPredictor {
    GruPredictor::load(&onnx_path(model), model.hp.n_layer, model.hp.n_expert, k).unwrap()
}

#[test]
fn native_matches_pytorch() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file).unwrap();
    let mut p = load_native(&model, None);
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
    assert!(
        worst < 1e-5,
        "the native GRU differs from PyTorch by {worst}"
    );
    let t0 = std::time::Instant::now();
    for _ in 0..2000 {
        p.step(tokens[0] as u32).unwrap();
    }
    // Printed for the report (not asserted: the machine's load varies).
    eprintln!(
        "native pregate step: {:.2} us (max |native - PyTorch| = {worst:e})",
        t0.elapsed().as_secs_f64() * 1e6 / 2000.0
    );
    // After a reset the state starts over: the first token's logits again.
    p.reset();
    let again = p.step(tokens[0] as u32).unwrap().to_vec();
    assert!(again
        .iter()
        .zip(&expected[..cols])
        .all(|(a, b)| (a - b).abs() < 1e-5));
    // Predictions are the top-k of those logits, per layer; `predict` at position 0 restarts
    // the state.
    let mut out = Predictions::default();
    p.predict(&[tokens[0] as u32], 0, &mut out).unwrap();
    let e = model.hp.n_expert;
    for l in 0..model.hp.n_layer {
        let row = &expected[l * e..(l + 1) * e];
        let best = moe_runtime::moe::predictor::top_k(row.iter().copied(), 4);
        assert_eq!(out.experts(0, l), &best[..], "layer {l}");
    }
    // A token beyond the router's vocabulary is an error, not a panic.
    let err = p.step(1 << 30).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
}

fn native_load_error(bytes: &[u8], n_expert: usize) -> PredictorError {
    GruPredictor::from_bytes(bytes, Path::new("router.onnx"), 6, n_expert, None)
        .err()
        .expect("refused")
}

#[test]
fn bad_files_are_refused_clearly() {
    let good = std::fs::read(model_path().with_extension("pregate.onnx")).unwrap();
    // Truncated anywhere (a few cuts, through every level of nesting): a load error, no panic.
    for cut in [0, 1, 7, 100, 1000, good.len() / 2, good.len() - 1] {
        let err = native_load_error(&good[..cut], 24);
        let msg = err.to_string();
        assert!(
            matches!(err, PredictorError::Load { .. }) && msg.contains("router.onnx"),
            "cut at {cut}: {msg}"
        );
    }
    assert!(native_load_error(&good[..good.len() - 1], 24)
        .to_string()
        .contains("truncated"));
    // Not ONNX at all.
    let err = native_load_error(b"GGUF\x03\x00\x00\x00 not a network", 24);
    assert!(matches!(err, PredictorError::Load { .. }), "{err}");
    // The right network for another model.
    let err = native_load_error(&good, 8);
    assert!(err.to_string().contains("another model"), "{err}");
    // A valid ONNX router of another architecture: refused, pointing at the tract build.
    let foreign = std::fs::read(fixture("foreign.onnx")).unwrap();
    let err = native_load_error(&foreign, 24);
    let msg = err.to_string();
    assert!(matches!(err, PredictorError::Foreign { .. }), "{msg}");
    assert!(
        msg.contains("not the GRU") && msg.contains("--features pregate"),
        "{msg}"
    );
    // A missing file.
    let err = GruPredictor::load(Path::new("/nonexistent/x.onnx"), 6, 24, None).err();
    assert!(err.unwrap().to_string().contains("train_pregate.py"));
}

/// `moe-run --predictor pregate --pregate FILE --stats` on the bundled model: its output.
fn moe_run_pregate(onnx: &Path) -> Result<String, String> {
    let argv: Vec<OsString> = [
        "moe-run",
        "-m",
        model_path().to_str().unwrap(),
        "--tokens",
        "1,2,3,4,5",
        "-n",
        "4",
        "--expert-cache",
        "50%",
        "--predictor",
        "pregate",
        "--pregate",
        onnx.to_str().unwrap(),
        "--stats",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let (mut o, mut e) = (Vec::new(), Vec::new());
    moe_runtime::cli::run(argv, &mut o, &mut e).map_err(|err| format!("{err:#}"))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&o),
        String::from_utf8_lossy(&e)
    ))
}

/// The GRU runs natively whatever the build; another network runs with tract when built in,
/// else the error says how to get it.
#[test]
fn moe_run_runs_the_gru_natively_and_others_with_tract_only() {
    let out = moe_run_pregate(&model_path().with_extension("pregate.onnx")).unwrap();
    assert!(out.contains("\"predictor\":\"pregate\""), "{out}");
    let foreign = moe_run_pregate(&fixture("foreign.onnx"));
    if cfg!(feature = "pregate") {
        let out = foreign.unwrap();
        assert!(out.contains("\"predictor\":\"pregate\""), "{out}");
    } else {
        let err = foreign.unwrap_err();
        assert!(err.contains("--features pregate"), "{err}");
    }
}

fn fixture(name: &str) -> PathBuf {
    root().join("runtime/tests/fixtures/pregate").join(name)
}

/// Native and tract agree on the fixture's tokens and on a longer run of other tokens (the
/// state carries over 200 steps).
#[cfg(feature = "pregate")]
#[test]
fn native_matches_tract() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file).unwrap();
    let mut native = load_native(&model, None);
    let mut tract = load_pregate(&model, None);
    let (tokens, _, _) = npy("tokens.npy");
    let mut ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    ids.extend((0..200u32).map(|i| i.wrapping_mul(2_654_435_761) % 4096));
    let mut worst = 0f32;
    for &tok in &ids {
        let a = native.step(tok).unwrap().to_vec();
        let b = tract.step(tok).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("max |native - tract| over {} steps = {worst:e}", ids.len());
    assert!(worst < 1e-5, "native differs from tract by {worst}");
}

#[cfg(feature = "pregate")]
fn load_pregate(model: &Model, k: Option<usize>) -> PregatePredictor {
    let onnx = find_sidecar(&model_path(), model.file.header()).expect("sidecar beside the model");
    PregatePredictor::load(&onnx, model.hp.n_layer, model.hp.n_expert, k).unwrap()
}

#[cfg(feature = "pregate")]
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

#[cfg(feature = "pregate")]
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
    let layout = model.expert_layout();
    let slots = layout.total_expert_bytes() / 4 / layout.slot_bytes();
    let cache = Arc::new(
        ExpertCache::new(
            model.expert_layout(),
            model.hp.n_expert_used,
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
    let (native, recall) = run(&model, Some(Box::new(load_native(&model, Some(6)))));
    assert!(none == freq, "frequency predictor changed the output");
    assert!(
        none == native,
        "native pre-gating predictor changed the output"
    );
    // The guesses were made and scored (a trained router is far better than chance, 4/24).
    assert!(recall > 0.3, "pre-gating recall {recall}");
    #[cfg(feature = "pregate")]
    {
        let (tract, tract_recall) = run(&model, Some(Box::new(load_pregate(&model, Some(6)))));
        assert!(
            none == tract,
            "tract pre-gating predictor changed the output"
        );
        // Same network, logits within 1e-5: the same guesses (up to a rare near-tie).
        assert!(
            (recall - tract_recall).abs() < 0.02,
            "native recall {recall}, tract {tract_recall}"
        );
    }
}
