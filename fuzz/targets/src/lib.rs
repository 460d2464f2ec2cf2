//! The code moe-edge's fuzz targets run, one function per target, each taking arbitrary bytes.
//!
//! `fuzz/fuzz_targets/*.rs` hand these to libFuzzer (`cargo +nightly fuzz run NAME`, or
//! `scripts/check/fuzz.sh` for all of them); `tests/replay.rs` runs every file of
//! `fuzz/corpus/NAME/` and `fuzz/regressions/NAME/` through them with the ordinary toolchain, so
//! CI checks the seeds and every crash ever found without building libFuzzer.
//!
//! A target fails by panicking (a panic is what libFuzzer reports as a crash): malformed input
//! must come back as an error, and where a target states a property beyond "no panic" (a
//! converted file loads, message content is never evaluated as a template), it asserts it.

pub mod calib;
pub mod chat;
pub mod convert;
pub mod gguf;
pub mod http;
pub mod onnx;
pub mod tokenizer;
mod util;

/// A target: arbitrary bytes in, a panic on a finding.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf::run),
    ("tokenizer", tokenizer::run),
    ("convert", convert::run),
    ("onnx", onnx::run),
    ("http", http::run),
    ("chat", chat::run),
    ("calib", calib::run),
];

/// The repository's root (models, fixtures and the corpus are found from it).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}
