//! `--type q4_k_m` and the other llama.cpp mixes give every tensor the type llama-quantize gives
//! it: the plans for the small-moe checkpoint (24 experts, rows of 256) and the Qwen3-MoE fixture
//! (8 experts, which llama.cpp treats apart, and rows of 64 that need its fallbacks) against
//! tables of llama-quantize's choices (tests/fixtures/llama_quantize_types, made by
//! scripts/check/compare_quantized.py --types-out from llama.cpp 0c1e57098's output on each
//! model's f32 file). Where llama.cpp falls back to Q5_1, which moe-edge does not read, the
//! plan has Q5_0.

use std::path::Path;

use moe_convert::{arch, hf, plan, Mix};

fn check(model_dir: &str, table: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
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
