//! Every seed of `fuzz/corpus/NAME/` and every crash input kept in `fuzz/regressions/NAME/` through
//! its target, with the ordinary toolchain: CI's check that no fuzz finding comes back, without
//! building libFuzzer (the coverage-guided runs are `scripts/check/fuzz.sh`).

use std::path::Path;

use moe_fuzz_targets::{repo_root, TARGETS};

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

fn replay(name: &str) {
    let (_, target) = TARGETS.iter().find(|(n, _)| *n == name).expect("a target");
    let root = repo_root().join("fuzz");
    let seeds = files(&root.join("corpus").join(name));
    assert!(
        !seeds.is_empty(),
        "fuzz/corpus/{name} has no seeds (scripts/check/fuzz.sh --seeds writes them)"
    );
    let regressions = files(&root.join("regressions").join(name));
    let mut failed = Vec::new();
    for f in seeds.iter().chain(&regressions) {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{name}: inputs that fail: {failed:#?}");
    println!(
        "{name}: {} seeds and {} regression inputs pass",
        seeds.len(),
        regressions.len()
    );
}

#[test]
fn gguf() {
    replay("gguf");
}

#[test]
fn tokenizer() {
    replay("tokenizer");
}

#[test]
fn convert() {
    replay("convert");
}

#[test]
fn onnx() {
    replay("onnx");
}

#[test]
fn http() {
    replay("http");
}

#[test]
fn chat() {
    replay("chat");
}

#[test]
fn calib() {
    replay("calib");
}

#[test]
fn every_target_is_replayed() {
    let here = include_str!("replay.rs");
    for (name, _) in TARGETS {
        assert!(
            here.contains(&format!("replay(\"{name}\")")),
            "{name} is not replayed"
        );
    }
}
