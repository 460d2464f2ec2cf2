//! `--type q4_k_m` and the other llama.cpp mixes give every tensor the type llama-quantize gives
//! it: the plans for the small-moe checkpoint (24 experts, rows of 256) and the Qwen3-MoE fixture
//! (8 experts, which llama.cpp treats apart, and rows of 64 that need its fallbacks) against
//! tables of llama-quantize's choices (tests/fixtures/llama_quantize_types, made by
//! scripts/check/compare_quantized.py --types-out from llama.cpp 0c1e57098's output on each
//! model's f32 file). Where llama.cpp falls back to Q5_1, which moe-edge does not read, the
//! plan has Q5_0.
//!
//! And the bytes: small-moe converted with `q4_k_m`, `q2_k` and `iq4_xs`, without and with an
//! importance matrix (`small-moe.imatrix.gguf`, scripts/fixtures/make_synthetic_imatrix.py),
//! hashes tensor for tensor as llama-quantize's output on the same checkpoint does
//! (`small-moe.<mix>[.imatrix].tsv`, from compare_quantized.py --hashes-out).

use std::path::{Path, PathBuf};

use moe_convert::{arch, convert, hf, plan, ConvertOptions, Mix};
use moe_runtime::gguf::GgufFile;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Converts small-moe with `mix` (and the fixture importance matrix when `imatrix`) and
/// compares every tensor's type and bytes with llama-quantize's.
fn check_bytes(mix_name: &str, imatrix: bool) {
    let fx = root().join("tests/fixtures/llama_quantize_types");
    let suffix = if imatrix { ".imatrix" } else { "" };
    let table =
        std::fs::read_to_string(fx.join(format!("small-moe.{mix_name}{suffix}.tsv"))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let mix = Mix::from_name(mix_name).unwrap();
    let opts = ConvertOptions {
        mix: Some(mix),
        imatrix: imatrix.then(|| fx.join("small-moe.imatrix.gguf")),
        ..ConvertOptions::new(mix.default_type())
    };
    convert(
        &root().join("models/small-moe/hf"),
        &out,
        &opts,
        &|_, _, _| {},
    )
    .unwrap();
    let file = GgufFile::open(&out).unwrap();
    let mut n = 0;
    for line in table.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let t = file
            .header()
            .tensor(f[0])
            .unwrap_or_else(|| panic!("{} missing", f[0]));
        assert_eq!(
            t.ty.name().to_ascii_lowercase(),
            f[1],
            "{mix_name}: {}",
            f[0]
        );
        let hash = format!("{:016x}", fnv1a64(file.tensor_bytes(t)));
        assert_eq!(hash, f[2], "{mix_name}{suffix}: {} bytes differ", f[0]);
        n += 1;
    }
    assert_eq!(n, file.header().tensors().len());
}

#[test]
fn small_moe_bytes_match_llama_quantize() {
    for mix in ["q4_k_m", "q2_k", "iq4_xs"] {
        check_bytes(mix, false);
    }
}

#[test]
fn small_moe_bytes_match_llama_quantize_with_imatrix() {
    for mix in ["q4_k_m", "q2_k", "iq4_xs"] {
        check_bytes(mix, true);
    }
}

fn check(model_dir: &str, table: &str) {
    let root = root();
    let ckpt = hf::Checkpoint::open(root.join(model_dir)).unwrap();
    let conv = arch::for_config(&ckpt.config).unwrap();
    let text =
        std::fs::read_to_string(root.join("tests/fixtures/llama_quantize_types").join(table))
            .unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').skip(1).collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
    let mut checked = 0;
    for (col, mix_name) in header.iter().enumerate() {
        let mix = Mix::from_name(mix_name).unwrap_or_else(|| panic!("{mix_name} unknown"));
        let plan = plan::build(&ckpt, conv.as_ref(), mix.default_type(), Some(mix), false).unwrap();
        assert_eq!(plan.tensors.len(), rows.len(), "{mix_name}: tensor count");
        for row in &rows {
            let t = plan
                .tensors
                .iter()
                .find(|t| t.decl.name == row[0])
                .unwrap_or_else(|| panic!("{mix_name}: {} not planned", row[0]));
            let want = match row[col + 1] {
                "q5_1" => "q5_0",
                other => other,
            };
            assert_eq!(
                t.decl.ty.name().to_ascii_lowercase(),
                want,
                "{mix_name}: {}",
                row[0]
            );
            checked += 1;
        }
    }
    assert!(checked >= 11 * 39, "{checked} tensor types checked");
}

#[test]
fn small_moe_types_match_llama_quantize() {
    check("models/small-moe/hf", "small-moe.tsv");
}

#[test]
fn eight_expert_fixture_types_match_llama_quantize() {
    check("tests/fixtures/qwen3_moe", "qwen3_moe.tsv");
}
