//! A multimodal checkpoint converts to its language model: the Gemma 4 fixture rewritten the way
//! transformers saves `Gemma4ForConditionalGeneration` (config under `text_config`, in the
//! `per_layer_config` form transformers 5 writes; tensors under `model.language_model.`; a vision
//! tower and a multi-token-prediction layer beside them), and the Qwen3.5-MoE fixture as
//! `Qwen3_5MoeForConditionalGeneration` (Qwen3.5-35B-A3B's layout: `model.visual.*` and `mtp.*`
//! beside the language model) give the text-only fixtures' files: the same tensors, bytes and
//! metadata (but the name taken from the folder), and the skipped parts are reported.

use std::collections::HashMap;
use std::path::Path;

use moe_convert::{convert, ConvertOptions};
use moe_runtime::gguf::{GgmlType, GgufFile};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

fn fixture() -> std::path::PathBuf {
    fixture_named("gemma4")
}

fn fixture_named(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// The fixture as a multimodal checkpoint in `dir`.
fn wrap(dir: &Path) {
    let src = fixture();
    let mut text: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    // transformers 5 writes the full layers' geometry as per-layer overrides.
    let obj = text.as_object_mut().unwrap();
    let head_dim = obj.remove("global_head_dim").unwrap();
    let kv = obj.remove("num_global_key_value_heads").unwrap();
    obj.remove("architectures");
    let per_layer: serde_json::Map<String, Value> = obj["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, t)| t.as_str() == Some("full_attention"))
        .map(|(i, _)| {
            (
                i.to_string(),
                json!({"head_dim": head_dim, "num_key_value_heads": kv}),
            )
        })
        .collect();
    obj.insert("per_layer_config".into(), Value::Object(per_layer));
    let config = json!({
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 8},
        "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    write_wrapped(
        &src,
        dir,
        &[
            "model.vision_tower.encoder.layers.0.mlp.weight",
            "model.vision_tower.patch_embedder.weight",
            "model.embed_vision.embedding_projection.weight",
            "mtp.layers.0.weight",
        ],
    );
}

/// The tokenizer files of `src` and its tensors under `model.language_model.` (`lm_head.*` as
/// is), plus small stand-ins for the other parts `extra` names.
fn write_wrapped(src: &Path, dir: &Path, extra: &[&str]) {
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: HashMap<String, TensorView> = HashMap::new();
    for (name, view) in st.tensors() {
        let renamed = match name.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => name.clone(),
        };
        names.insert(renamed, view);
    }
    let stand_in = [0u8; 16];
    for name in extra {
        names.insert(
            name.to_string(),
            TensorView::new(Dtype::F32, vec![2, 2], &stand_in).unwrap(),
        );
    }
    safetensors::serialize_to_file(names, None, &dir.join("model.safetensors")).unwrap();
}

/// `wrapped` converts to `text`'s file in f32 and Q8_0, reporting `dropped`.
fn converts_as_text_model(wrapped: &Path, text: &Path, dropped: &[(&str, usize)]) {
    let tmp = tempfile::tempdir().unwrap();
    let progress = |_: u64, _: u64, _: &str| {};
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        let a = tmp.path().join(format!("wrapped-{ty}.gguf"));
        let b = tmp.path().join(format!("text-{ty}.gguf"));
        let sa = convert(wrapped, &a, &ConvertOptions::new(ty), &progress).unwrap();
        let sb = convert(text, &b, &ConvertOptions::new(ty), &progress).unwrap();
        let want: Vec<(String, usize)> = dropped.iter().map(|(p, n)| (p.to_string(), *n)).collect();
        assert_eq!(sa.dropped, want);
        assert!(sb.dropped.is_empty());
        let (fa, fb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
        let (ha, hb) = (fa.header(), fb.header());
        let meta = |h: &moe_runtime::gguf::GgufHeader| -> Vec<String> {
            h.metadata()
                .iter()
                .filter(|(k, _)| k != "general.name")
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect()
        };
        assert_eq!(meta(ha), meta(hb), "{ty} metadata");
        assert_eq!(ha.tensors().len(), hb.tensors().len());
        for t in hb.tensors() {
            let u = ha.tensor(&t.name).expect("same tensor names");
            assert_eq!((&u.dims, u.ty), (&t.dims, t.ty), "{}", t.name);
            assert!(
                fa.tensor_bytes(u) == fb.tensor_bytes(t),
                "{ty} {}: bytes differ",
                t.name
            );
        }
    }
}

#[test]
fn multimodal_gemma4_converts_its_language_model() {
    let tmp = tempfile::tempdir().unwrap();
    let wrapped = tmp.path().join("gemma4-it");
    std::fs::create_dir(&wrapped).unwrap();
    wrap(&wrapped);
    converts_as_text_model(
        &wrapped,
        &fixture(),
        &[
            ("model.embed_vision", 1),
            ("model.vision_tower", 2),
            ("mtp", 1),
        ],
    );
}

/// Qwen3.5-35B-A3B's layout: `Qwen3_5MoeForConditionalGeneration` with the text config
/// (`qwen3_5_moe_text`) under `text_config`, a vision tower under `model.visual` and the
/// multi-token-prediction layer under `mtp`.
#[test]
fn multimodal_qwen35_moe_converts_its_language_model() {
    let src = fixture_named("qwen35_moe");
    let tmp = tempfile::tempdir().unwrap();
    let wrapped = tmp.path().join("qwen35-a3b");
    std::fs::create_dir(&wrapped).unwrap();
    let mut text: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    text.as_object_mut().unwrap().remove("architectures");
    let config = json!({
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe_vision", "hidden_size": 8},
        "tie_word_embeddings": false,
    });
    std::fs::write(wrapped.join("config.json"), config.to_string()).unwrap();
    write_wrapped(
        &src,
        &wrapped,
        &[
            "model.visual.blocks.0.attn.qkv.weight",
            "model.visual.merger.linear_fc1.weight",
            "mtp.fc.weight",
            "mtp.layers.0.mlp.gate.weight",
            "mtp.norm.weight",
        ],
    );
    converts_as_text_model(&wrapped, &src, &[("model.visual", 2), ("mtp", 3)]);
}
