//! `calib`: calibration text as `moe-convert --calib FILE` reads it (`calib::calibrate`: the
//! file read as UTF-8, tokenized by the model's tokenizer, cut into windows, run through the
//! bundled model with routing traced, statistics gathered), with bounds small enough for a
//! fuzzer: 24 tokens in windows of 8, and the dropped-expert KL on the first 2 tokens when
//! the input's first byte is odd (it runs the model once per expert).

use moe_convert::calib::{calibrate, CalibOptions};

use crate::util::scratch_dir;

pub fn run(data: &[u8]) {
    let dir = scratch_dir("calib");
    let text = dir.join("calib.txt");
    std::fs::write(&text, data).unwrap();
    let opts = CalibOptions {
        text,
        max_tokens: 24,
        kl_tokens: if data.first().is_some_and(|b| b & 1 == 1) {
            2
        } else {
            0
        },
        window: 8,
    };
    let model = crate::repo_root().join("models/small-moe/small-moe-q8_0.gguf");
    if let Ok(stats) = calibrate(&model, &opts) {
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
        let _ = moe_convert::calib::report(&stats);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
