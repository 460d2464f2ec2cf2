//! `calib`: calibration text as `moe-convert --calib FILE` reads it (`calib::calibrate_model`:
//! the file read as UTF-8, tokenized by the model's tokenizer, cut into windows, run through
//! the bundled model with routing traced, statistics gathered), with bounds small enough for a
//! fuzzer: 24 tokens in windows of 8, and the dropped-expert KL on the first 2 tokens when
//! the input's first byte is 1 modulo 16: it runs the model once per expert (145 passes, about
//! ten times the rest of an input's cost), so it is kept to one input in 16 (it was every odd
//! first byte, which held the target to well under one input a second).
//!
//! The model and its tokenizer are loaded once per process: loading the same file for every
//! input is what `calibrate` adds to `calibrate_model`, costs more than the rest and explores
//! nothing (the `gguf` target fuzzes loading).

use moe_convert::calib::{calibrate_model, CalibOptions};
use moe_runtime::gguf::GgufFile;
use moe_runtime::model::Model;
use moe_runtime::tokenizer::Tokenizer;

use crate::util::scratch_dir;

thread_local! {
    static MODEL: (Model<'static>, Tokenizer) = {
        let path = crate::repo_root().join("models/small-moe/small-moe-q8_0.gguf");
        // One file per thread (one in all under libFuzzer), kept for the process's life.
        let file: &'static GgufFile =
            Box::leak(Box::new(GgufFile::open(&path).expect("the bundled model opens")));
        let model = Model::load(file).expect("the bundled model loads");
        let tok = Tokenizer::from_gguf(file.header()).expect("its tokenizer loads");
        (model, tok)
    };
}

pub fn run(data: &[u8]) {
    crate::util::one_thread();
    let dir = scratch_dir("calib");
    let text = dir.join("calib.txt");
    std::fs::write(&text, data).unwrap();
    let opts = CalibOptions {
        text,
        max_tokens: 24,
        kl_tokens: if data.first().is_some_and(|b| b & 15 == 1) {
            2
        } else {
            0
        },
        window: 8,
    };
    let result = MODEL.with(|(model, tok)| calibrate_model(model, tok, &opts));
    if let Ok(cal) = result {
        let stats = &cal.stats;
        assert!(
            stats.tokens >= 2 && stats.tokens <= 24,
            "{} tokens",
            stats.tokens
        );
        for f in &stats.frequency {
            assert!(
                f.is_finite() && (0.0..=1.0 + 1e-5).contains(f),
                "frequency {f}"
            );
        }
        let _ = moe_convert::calib::report(stats);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
