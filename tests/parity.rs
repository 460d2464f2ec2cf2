//! Unquantized conversions reproduce transformers: logits at every prompt position within 1e-4
//! of the largest logit, and the 16-token greedy continuation exactly.

use moe_e2e::{greedy, max_rel_diff, prompt_logits, stepwise_logits, Fixture, FIXTURES};
use moe_runtime::gguf::GgmlType;
use moe_runtime::tokenizer::Tokenizer;

const TOLERANCE: f32 = 1e-4;

fn check_parity(name: &str, ty: GgmlType) {
    let fx = Fixture::load(name);
    let conv = fx.convert(ty);
    let file = conv.open();
    for (i, case) in fx.expected.prompts.iter().enumerate() {
        let (want, n, vocab) = fx.logits(i);
        assert_eq!(n, case.ids.len());
        let got = prompt_logits(&file, &case.ids);
        let diff = max_rel_diff(&got, &want, vocab);
        println!("{name} {ty} prompt {i} ({n} tokens): max |diff| / max |logit| = {diff:.2e}");
        assert!(
            diff < TOLERANCE,
            "{name} {ty} prompt {i}: logits differ by {diff:e}"
        );
        let cont = greedy(&file, &case.ids, case.greedy_ids.len());
        assert_eq!(
            cont, case.greedy_ids,
            "{name} {ty} prompt {i}: greedy continuation"
        );
    }
}

#[test]
fn mixtral_f32() {
    check_parity("mixtral", GgmlType::F32);
}

#[test]
fn mixtral_f16_source_sharded() {
    // f16 weights upcast exactly, so f32 and f16 outputs both reproduce the reference.
    check_parity("mixtral_f16_sharded", GgmlType::F32);
    check_parity("mixtral_f16_sharded", GgmlType::F16);
}

#[test]
fn qwen2_moe_shared_expert_and_dense_layer() {
    check_parity("qwen2_moe", GgmlType::F32);
}

#[test]
fn qwen3_moe_f32() {
    check_parity("qwen3_moe", GgmlType::F32);
}

#[test]
fn qwen3_moe_bf16_source() {
    check_parity("qwen3_moe_bf16", GgmlType::F32);
    check_parity("qwen3_moe_bf16", GgmlType::BF16);
}

#[test]
fn olmoe_f32() {
    check_parity("olmoe", GgmlType::F32);
}

#[test]
fn granitemoe_f32() {
    check_parity("granitemoe", GgmlType::F32);
}

#[test]
fn deepseek_v2_mla_group_limited_softmax() {
    check_parity("deepseek_v2", GgmlType::F32);
}

#[test]
fn deepseek_v3_mla_q_lora_sigmoid_bias_groups_yarn() {
    check_parity("deepseek_v3", GgmlType::F32);
}

#[test]
fn glm4_moe_partial_rotary_biases_qk_norm_sigmoid_bias_shared_expert() {
    check_parity("glm4_moe", GgmlType::F32);
}

#[test]
fn ernie4_5_moe_interleaved_rope_softmax_bias_shared_experts_spm_vocab() {
    check_parity("ernie4_5_moe", GgmlType::F32);
}

#[test]
fn smallthinker_router_on_layer_input_reglu_nope_and_sliding_layers() {
    check_parity("smallthinker", GgmlType::F32);
}

/// The SmallThinker fixture's window is longer than its prompts (llama.cpp replaces the file's
/// window by 4096, so its parity needs that); `logits_window.npy` is the same model's reference
/// with a short window, reached here by rewriting the key: the sliding layers must apply it and
/// the NoPE layer (layer 0) must not.
#[test]
fn smallthinker_short_window_applies_to_the_sliding_layers() {
    use moe_runtime::gguf::{GgufFile, Value};
    #[derive(serde::Deserialize)]
    struct WindowCheck {
        sliding_window: u32,
        prompt: usize,
        logits_file: String,
        greedy_ids: Vec<u32>,
    }
    let fx = Fixture::load("smallthinker");
    let text = std::fs::read_to_string(fx.dir.join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let check: WindowCheck = serde_json::from_value(json["window_check"].clone()).unwrap();
    let f = std::fs::File::open(fx.dir.join(&check.logits_file)).unwrap();
    let (want, n, vocab) = moe_runtime::npy::read_f32_2d(std::io::BufReader::new(f)).unwrap();
    let case = &fx.expected.prompts[check.prompt];
    assert!(n > check.sliding_window as usize, "the window must bite");
    let conv = fx.convert(GgmlType::F32);
    let path = conv.path.with_extension("window.gguf");
    moe_e2e::rewrite_gguf_metadata(&conv.path, &path, |meta| {
        for (k, v) in meta.iter_mut() {
            if k == "smallthinker.attention.sliding_window" {
                *v = Value::U32(check.sliding_window);
            }
        }
    });
    let file = GgufFile::open(&path).unwrap();
    let got = prompt_logits(&file, &case.ids);
    let diff = max_rel_diff(&got, &want, vocab);
    println!(
        "smallthinker window {}: max |diff| / max |logit| = {diff:.2e}",
        check.sliding_window
    );
    assert!(diff < TOLERANCE, "logits differ by {diff:e}");
    let full = max_rel_diff(&got, &fx.logits(check.prompt).0, vocab);
    assert!(full > 1e-2, "the short window changed nothing ({full:e})");
    assert_eq!(
        greedy(&file, &case.ids, check.greedy_ids.len()),
        check.greedy_ids
    );
    let stepwise = stepwise_logits(&file, &case.ids);
    let diff = max_rel_diff(&stepwise, &want, vocab);
    assert!(diff < TOLERANCE, "stepwise logits differ by {diff:e}");
}

/// llama.cpp's converter appends GLM-4.5's next-token-prediction block after the trunk
/// (`block_count` one more, `nextn_predict_layers` 1, its tensors in `blk.{n_layer}`, or none when
/// the checkpoint has none, as here). Generation runs the trunk only; a count that leaves no trunk
/// is an error.
#[test]
fn glm4_moe_files_with_a_prediction_block_run_the_trunk() {
    use moe_runtime::gguf::{GgufFile, Value};
    use moe_runtime::model::Model;
    let fx = Fixture::load("glm4_moe");
    let conv = fx.convert(GgmlType::F32);
    let with_mtp = |nextn: u32, path: &std::path::Path| {
        moe_e2e::rewrite_gguf_metadata(&conv.path, path, |meta| {
            for (k, v) in meta.iter_mut() {
                if k == "glm4moe.block_count" {
                    *v = Value::U32(3 + nextn);
                }
            }
            meta.push(("glm4moe.nextn_predict_layers".into(), Value::U32(nextn)));
        });
    };
    let path = conv.path.with_extension("mtp.gguf");
    with_mtp(1, &path);
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(Model::load(&file).unwrap().layers.len(), 3);
    let case = &fx.expected.prompts[2];
    let (want, _, vocab) = fx.logits(2);
    let diff = max_rel_diff(&prompt_logits(&file, &case.ids), &want, vocab);
    assert!(diff < TOLERANCE, "logits differ by {diff:e}");

    let bad = conv.path.with_extension("bad.gguf");
    moe_e2e::rewrite_gguf_metadata(&conv.path, &bad, |meta| {
        meta.push(("glm4moe.nextn_predict_layers".into(), Value::U32(3)));
    });
    let file = GgufFile::open(&bad).unwrap();
    let err = Model::load(&file).err().expect("no trunk left").to_string();
    assert!(err.contains("glm4moe.nextn_predict_layers"), "{err}");
}

/// gpt-oss from the Hub's MXFP4 checkpoint layout: the experts stay MXFP4 in every file (their
/// products take Q8_0 activations, as in ggml), everything else is f32; sinks, biases, YaRN
/// without rounded correction range, a sliding window of 8 on layers 0 and 2 (the long prompt
/// wraps its ring).
#[test]
fn gpt_oss_mxfp4_experts_f32() {
    check_parity("gpt_oss", GgmlType::F32);
}

/// The same architecture from a checkpoint whose experts transformers dequantized (bf16, the
/// fused `gate_up_proj` with gate and up columns interleaved): written in the requested type.
#[test]
fn gpt_oss_dequantized_experts_bf16_source() {
    check_parity("gpt_oss_bf16", GgmlType::F32);
    check_parity("gpt_oss_bf16", GgmlType::BF16);
}

/// MXFP4 experts are copied, not requantised: whatever `--type`, the expert tensors are MXFP4
/// and hold exactly the checkpoint's values; dequantized experts take the requested type.
#[test]
fn gpt_oss_mxfp4_experts_are_kept() {
    use moe_runtime::model::{Ffn, Model};
    for (name, ty, want) in [
        ("gpt_oss", GgmlType::F32, GgmlType::MXFP4),
        ("gpt_oss", GgmlType::Q8_0, GgmlType::MXFP4),
        ("gpt_oss_bf16", GgmlType::Q8_0, GgmlType::Q8_0),
    ] {
        let fx = Fixture::load(name);
        let conv = fx.convert(ty);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        for layer in &model.layers {
            let Ffn::Moe(moe) = &layer.ffn else {
                panic!("{name}: every gpt-oss layer is MoE")
            };
            for m in [&moe.experts.gate, &moe.experts.up, &moe.experts.down] {
                assert!(m.slabs.iter().all(|s| s.ty == want), "{name} {ty}");
            }
            assert!(moe.router_bias.is_some() && moe.expert_biases.is_some());
        }
    }
    // No requantisation: every block keeps the checkpoint's E8M0 exponent byte, and its 32
    // values are the checkpoint's (decoded here from the Hub layout as the OCP MX spec defines
    // it: byte i of a block holds values 2i and 2i+1, low nibble first).
    const FP4: [f32; 16] = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];
    let fx = Fixture::load("gpt_oss");
    let ckpt = moe_convert::hf::Checkpoint::open(&fx.dir).unwrap();
    let conv = fx.convert(GgmlType::Q8_0);
    let file = conv.open();
    let (n_expert, ff, d) = (8, 32, 64);
    for (gguf, stem, part, rows, cols) in [
        ("ffn_gate_exps", "gate_up_proj", Some(0), ff, d),
        ("ffn_up_exps", "gate_up_proj", Some(1), ff, d),
        ("ffn_down_exps", "down_proj", None, d, ff),
    ] {
        let info = file
            .header()
            .tensor(&format!("blk.2.{gguf}.weight"))
            .unwrap();
        assert_eq!(info.ty, GgmlType::MXFP4);
        let bytes = file.tensor_bytes(info);
        let mut got = vec![0f32; n_expert * rows * cols];
        moe_runtime::tensor::quant::dequantize(info.ty, bytes, &mut got);
        let hf = |s: &str| format!("model.layers.2.mlp.experts.{stem}_{s}");
        let (blocks, scales) = (
            ckpt.bytes(&hf("blocks")).unwrap(),
            ckpt.bytes(&hf("scales")).unwrap(),
        );
        let hf_rows = if part.is_some() { 2 * rows } else { rows };
        let per_row = cols / 32;
        for e in 0..n_expert {
            for r in 0..rows {
                let src = e * hf_rows + part.map_or(r, |p| 2 * r + p);
                for b in 0..per_row {
                    let scale = scales[src * per_row + b];
                    let block = (e * rows + r) * per_row + b;
                    assert_eq!(
                        bytes[block * 17],
                        scale,
                        "{gguf} expert {e} row {r} block {b}"
                    );
                    let packed = &blocks[(src * per_row + b) * 16..][..16];
                    for (k, &v) in got[block * 32..(block + 1) * 32].iter().enumerate() {
                        let code = (packed[k / 2] >> (4 * (k % 2))) & 0x0f;
                        let want = FP4[code as usize] * 2f32.powi(scale as i32 - 127);
                        assert_eq!(v, want, "{gguf} expert {e} row {r} value {}", b * 32 + k);
                    }
                }
            }
        }
    }
}

/// A sliding-window layer keeps a ring of its window (plus one batch chunk), so the session's
/// KV memory grows with the context only in the full-attention layers.
#[test]
fn lfm2_moe_short_convolutions_qk_norm_dense_leading_layers_sigmoid_bias() {
    check_parity("lfm2_moe", GgmlType::F32);
}

/// LFM2's conv layers keep a fixed state (the last L-1 convolution inputs) instead of a KV
/// cache; only the attention layers grow with the context.
#[test]
fn lfm2_moe_conv_state_is_fixed_and_kv_only_in_attention_layers() {
    use moe_runtime::model::{KvType, Mixer, Model, Session};
    let fx = Fixture::load("lfm2_moe");
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let hp = &model.hp;
    let kinds: Vec<bool> = (0..hp.n_layer).map(|l| hp.is_recurrent(l)).collect();
    assert_eq!(kinds, [true, false, true, false], "layer_types");
    assert!(matches!(model.layers[0].mixer, Mixer::ShortConv(_)));
    assert!(matches!(model.layers[1].mixer, Mixer::Attention(_)));
    let per_pos = 2 * hp.n_head_kv * (hp.head_dim_k + hp.head_dim_v) * 4;
    // Per conv layer, the last L-1 inputs and their snapshot.
    let conv_state = 2 * 2 * (hp.shortconv_l_cache - 1) * hp.n_embd * 4;
    for ctx in [64, 256] {
        let s = Session::with_kv_type(&model, ctx, KvType::F32);
        assert_eq!(s.kv_bytes(), ctx * per_pos, "KV of the 2 attention layers");
        assert_eq!(
            s.recurrent_bytes(),
            conv_state,
            "conv state of the 2 conv layers"
        );
        assert_eq!(s.state_bytes(), s.kv_bytes() + s.recurrent_bytes());
    }
}

/// A recurrent state holds only its latest position: it can stay where it is or start over,
/// nothing in between; starting over (position 0) gives the first run's logits again, and a
/// swapped-out sequence keeps its conv state.
#[test]
fn lfm2_moe_rewind_only_to_the_start_or_the_end_and_sequences_swap() {
    use moe_runtime::model::{KvType, Model, Session};
    let fx = Fixture::load("lfm2_moe");
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let ids = &fx.expected.prompts[2].ids;
    let mut s = Session::with_kv_type(&model, 64, KvType::F32);
    let first = s.forward(ids, false).unwrap().to_vec();
    let n = ids.len();
    assert!(s.can_rewind(n) && s.can_rewind(0));
    assert!(!s.can_rewind(n - 1) && !s.can_rewind(1));
    assert!(s.rewind(n - 1).is_err());
    assert_eq!(s.position(), n, "a refused rewind changes nothing");

    // Another sequence in between, then the first one swapped back continues as if alone.
    let mut saved = s.blank_sequence();
    s.swap_sequence(&mut saved);
    s.forward(&fx.expected.prompts[1].ids, false).unwrap();
    s.swap_sequence(&mut saved);
    assert_eq!(s.position(), n);
    let next = fx.expected.prompts[2].greedy_ids[0];
    let continued = s.forward(&[next], false).unwrap().to_vec();
    let mut alone = Session::with_kv_type(&model, 64, KvType::F32);
    alone.forward(ids, false).unwrap();
    assert_eq!(continued, alone.forward(&[next], false).unwrap());

    s.rewind(0).unwrap();
    assert_eq!(s.forward(ids, false).unwrap(), &first[..], "start over");

    // A snapshot taken after 5 ids: the sequence can go back there, and only there.
    s.reset();
    s.forward(&ids[..5], false).unwrap();
    s.snapshot();
    s.forward(&ids[5..], false).unwrap();
    assert_eq!(s.rewind_point(n - 1), 5);
    assert_eq!(s.rewind_point(4), 0);
    assert!(s.can_rewind(5) && !s.can_rewind(6));
    s.rewind(5).unwrap();
    let again = s.forward(&ids[5..], false).unwrap();
    let vocab = first.len();
    assert!(
        max_rel_diff(again, &first, vocab) < TOLERANCE,
        "from the snapshot"
    );
    s.rewind(5).unwrap();
    s.rewind(0).unwrap();
    assert!(
        !s.can_rewind(5) || s.position() == 5,
        "starting over forgets the snapshot"
    );
    s.forward(&ids[..7], false).unwrap();
    assert!(
        !s.can_rewind(5),
        "the snapshot was of the forgotten sequence"
    );
}

/// A prompt evaluated in uneven chunks (the conv state carried between them) gives the logits
/// of one prefill.
#[test]
fn lfm2_moe_chunked_prefill_matches_one_prefill() {
    use moe_runtime::model::{KvType, Model, Session};
    let fx = Fixture::load("lfm2_moe");
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let ids = &fx.expected.prompts[2].ids;
    let (want, _, vocab) = fx.logits(2);
    let mut s = Session::with_kv_type(&model, 64, KvType::F32);
    let mut got = Vec::new();
    let mut at = 0;
    for len in [1, 2, 5, 3] {
        got.extend_from_slice(s.forward(&ids[at..at + len], true).unwrap());
        at += len;
    }
    got.extend_from_slice(s.forward(&ids[at..], true).unwrap());
    let diff = max_rel_diff(&got, &want, vocab);
    assert!(diff < TOLERANCE, "chunked prefill differs by {diff:e}");
}

/// Qwen3.5-MoE (transformers' Qwen3_5MoeForCausalLM): three Gated DeltaNet layers (conv1d
/// state, chunked delta rule for the prompt, 4 value heads over 2 key heads in llama.cpp's tiled
/// order) then gated attention (output gate in q_proj, per-head q/k norm, partial NeoX rope),
/// `1 + weight` norms, softmax top-2 renormalised plus a sigmoid-gated shared expert.
#[test]
fn qwen35_moe_gated_delta_net_gated_attention_shared_expert() {
    check_parity("qwen35_moe", GgmlType::F32);
}

/// Qwen3.5-MoE decoded one token at a time (the per-token delta rule) equals one prefill (the
/// chunked rule) at every position of every prompt.
#[test]
fn qwen35_moe_step_by_step_decoding_matches_prefill() {
    check_step_by_step("qwen35_moe");
}

/// Granite-4.0-H (transformers' GraniteMoeHybridForCausalLM): Mamba-2 layers around a NoPE
/// attention layer (mamba, attention, mamba, mamba; 8 heads in 2 groups, a conv bias, prompts
/// over several of transformers' scan chunks), softmax top-2 plus a shared expert, Granite's
/// multipliers.
#[test]
fn granite_hybrid_mamba2_nope_attention_shared_expert_multipliers() {
    check_parity("granite_hybrid", GgmlType::F32);
}

/// Granite-4.0-H decoded one token at a time equals one prefill at every position of every
/// prompt.
#[test]
fn granite_hybrid_step_by_step_decoding_matches_prefill() {
    check_step_by_step("granite_hybrid");
}

/// Granite-4.0-H's Mamba-2 layers keep a fixed state (conv inputs and one `[head_dim, d_state]`
/// matrix per head, with snapshots), only its attention layer grows with the context; the state
/// rewinds only to where it is, to 0 or to the snapshot, and uneven chunks give one prefill's
/// logits.
#[test]
fn granite_hybrid_ssm_state_is_fixed_rewinds_to_snapshots_and_chunks() {
    use moe_runtime::model::{Mixer, Model};
    let fx = Fixture::load("granite_hybrid");
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let hp = &model.hp;
    let kinds: Vec<bool> = (0..hp.n_layer).map(|l| hp.is_recurrent(l)).collect();
    assert_eq!(kinds, [true, false, true, true], "layer_types");
    assert!(matches!(model.layers[0].mixer, Mixer::Mamba2(_)));
    assert!(matches!(model.layers[1].mixer, Mixer::Attention(_)));
    assert!(!hp.uses_rope(1), "NoPE attention");
    let m = hp.mamba.unwrap();
    assert_eq!((m.n_heads, m.n_groups, m.d_state), (8, 2, 16));
    // Per Mamba-2 layer: the last K-1 conv inputs and the scan states, each with its snapshot.
    let per_layer = 2 * 4 * ((m.conv_kernel - 1) * m.conv_dim() + m.d_inner * m.d_state);
    check_state_bytes(&model, 3 * per_layer);

    check_rewinds_to_snapshots_and_chunks(&fx, &model);
}

/// Granite-4.0-H's attention has no positional embedding because the file says
/// `rope.scaling.finetuned` false (llama.cpp's switch); without the key rope is on, as in
/// llama.cpp, and the logits move once there is a second position to rotate.
#[test]
fn granite_hybrid_rope_follows_rope_scaling_finetuned() {
    use moe_runtime::gguf::GgufFile;
    use moe_runtime::model::Model;
    let fx = Fixture::load("granite_hybrid");
    let conv = fx.convert(GgmlType::F32);
    let roped = conv.path.with_extension("rope.gguf");
    moe_e2e::rewrite_gguf_metadata(&conv.path, &roped, |meta| {
        let before = meta.len();
        meta.retain(|(k, _)| k != "granitehybrid.rope.scaling.finetuned");
        assert_eq!(meta.len() + 1, before, "the converter writes the switch");
    });
    let file = GgufFile::open(&roped).unwrap();
    let model = Model::load(&file).unwrap();
    assert!(model.hp.uses_rope(1));
    for (i, case) in fx.expected.prompts.iter().enumerate() {
        let (want, n, vocab) = fx.logits(i);
        let diff = max_rel_diff(&prompt_logits(&file, &case.ids), &want, vocab);
        match n {
            1 => assert!(diff < TOLERANCE, "one position: rope is the identity"),
            _ => assert!(diff > 1e-3, "prompt {i}: rope changed nothing ({diff:e})"),
        }
    }
}

/// An f32 session over `model` at two context lengths: the KV cache grows with the context by
/// the attention layers' keys and values only, and the recurrent state is `state` bytes whatever
/// the context.
fn check_state_bytes(model: &moe_runtime::model::Model, state: usize) {
    use moe_runtime::model::{KvType, Session};
    let hp = &model.hp;
    let per_pos = hp.n_head_kv * (hp.head_dim_k + hp.head_dim_v) * 4;
    for ctx in [64, 256] {
        let s = Session::with_kv_type(model, ctx, KvType::F32);
        assert_eq!(s.kv_bytes(), ctx * per_pos, "KV of the attention layers");
        assert_eq!(s.recurrent_bytes(), state, "state of the recurrent layers");
    }
}

/// On prompt 2 of a recurrent fixture: a session rewinds to 0 and to its snapshot (not to any
/// other position: the fixed state holds only the latest one), either way reproducing the
/// first prefill's logits, and the prompt fed in uneven chunks gives transformers' logits.
fn check_rewinds_to_snapshots_and_chunks(fx: &Fixture, model: &moe_runtime::model::Model) {
    use moe_runtime::model::{KvType, Session};
    let ids = &fx.expected.prompts[2].ids;
    let (want, n, vocab) = fx.logits(2);
    let mut s = Session::with_kv_type(model, 64, KvType::F32);
    let first = s.forward(ids, false).unwrap().to_vec();
    assert!(s.can_rewind(n) && s.can_rewind(0) && !s.can_rewind(n - 1));
    s.rewind(0).unwrap();
    assert_eq!(s.forward(ids, false).unwrap(), &first[..], "start over");
    s.reset();
    s.forward(&ids[..5], false).unwrap();
    s.snapshot();
    s.forward(&ids[5..], false).unwrap();
    assert_eq!(s.rewind_point(n - 1), 5);
    s.rewind(5).unwrap();
    let again = s.forward(&ids[5..], false).unwrap();
    assert!(
        max_rel_diff(again, &first, vocab) < TOLERANCE,
        "from the snapshot"
    );

    let mut s = Session::with_kv_type(model, 64, KvType::F32);
    let mut got = Vec::new();
    let mut at = 0;
    for len in [1, 2, 5, 3] {
        got.extend_from_slice(s.forward(&ids[at..at + len], true).unwrap());
        at += len;
    }
    got.extend_from_slice(s.forward(&ids[at..], true).unwrap());
    let diff = max_rel_diff(&got, &want, vocab);
    assert!(diff < TOLERANCE, "chunked prefill differs by {diff:e}");
}

/// Decodes every prompt of fixture `name` one token at a time and checks the logits at every
/// position against transformers' and against moe-edge's own prefill of the whole prompt.
fn check_step_by_step(name: &str) {
    let fx = Fixture::load(name);
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    for (i, case) in fx.expected.prompts.iter().enumerate() {
        let (want, _, vocab) = fx.logits(i);
        let got = stepwise_logits(&file, &case.ids);
        let diff = max_rel_diff(&got, &want, vocab);
        println!("{name} prompt {i} step by step: max |diff| / max |logit| = {diff:.2e}");
        assert!(
            diff < TOLERANCE,
            "{name} prompt {i}: step-by-step logits differ by {diff:e}"
        );
        let prefill = moe_e2e::prompt_logits(&file, &case.ids);
        let diff = max_rel_diff(&got, &prefill, vocab);
        println!("{name} prompt {i} step by step vs prefill: {diff:.2e}");
        assert!(
            diff < TOLERANCE,
            "{name} prompt {i}: step-by-step vs prefill {diff:e}"
        );
    }
}

/// Qwen3.5's DeltaNet layers keep a fixed state (conv inputs and one matrix per value head),
/// only its attention layer grows with the context; the state rewinds only to where it is, to
/// 0 or to the snapshot, and a prompt fed in uneven chunks gives one prefill's logits.
#[test]
fn qwen35_moe_recurrent_state_is_fixed_rewinds_to_snapshots_and_chunks() {
    use moe_runtime::model::{Mixer, Model};
    let fx = Fixture::load("qwen35_moe");
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let hp = &model.hp;
    let kinds: Vec<bool> = (0..hp.n_layer).map(|l| hp.is_recurrent(l)).collect();
    assert_eq!(kinds, [true, true, true, false], "layer_types");
    assert!(matches!(model.layers[0].mixer, Mixer::GatedDeltaNet(_)));
    assert!(matches!(model.layers[3].mixer, Mixer::Attention(_)));
    let g = hp.gdn.unwrap();
    // Per DeltaNet layer: the last K-1 conv inputs and the matrices, each with its snapshot.
    let per_layer =
        2 * 4 * ((g.conv_kernel - 1) * g.conv_dim() + g.n_v_heads * g.head_k_dim * g.head_v_dim);
    check_state_bytes(&model, 3 * per_layer);

    check_rewinds_to_snapshots_and_chunks(&fx, &model);
}

/// A Qwen3.5 file without `attention.recurrent_layers` (only `full_attention_interval`, as
/// llama.cpp's loader also accepts) gives the same layer kinds and logits; a list of the wrong
/// length is an error naming the key; a file announcing llama.cpp's MTP block after the trunk
/// runs the trunk.
#[test]
fn qwen35_moe_recurrent_layers_from_the_interval() {
    use moe_runtime::gguf::{GgufFile, Value};
    use moe_runtime::model::Model;
    let fx = Fixture::load("qwen35_moe");
    let conv = fx.convert(GgmlType::F32);
    let path = conv.path.with_extension("interval.gguf");
    moe_e2e::rewrite_gguf_metadata(&conv.path, &path, |meta| {
        meta.retain(|(k, _)| k != "qwen35moe.attention.recurrent_layers");
    });
    let file = GgufFile::open(&path).unwrap();
    let model = Model::load(&file).unwrap();
    assert_eq!(model.hp.recurrent_layers, [true, true, true, false]);
    let case = &fx.expected.prompts[2];
    let (want, _, vocab) = fx.logits(2);
    let diff = max_rel_diff(&prompt_logits(&file, &case.ids), &want, vocab);
    assert!(diff < TOLERANCE, "logits differ by {diff:e}");

    let bad = conv.path.with_extension("bad.gguf");
    moe_e2e::rewrite_gguf_metadata(&conv.path, &bad, |meta| {
        for (k, v) in meta.iter_mut() {
            if k == "qwen35moe.attention.recurrent_layers" {
                *v = Value::Array(moe_runtime::gguf::ValueType::Bool, vec![Value::Bool(true)]);
            }
        }
    });
    let file = GgufFile::open(&bad).unwrap();
    let err = Model::load(&file).err().expect("too short").to_string();
    assert!(
        err.contains("qwen35moe.attention.recurrent_layers"),
        "{err}"
    );

    // llama.cpp's converter appends the MTP block by default: one more block, one more
    // (non-recurrent) entry, nextn_predict_layers 1. The trunk runs as before.
    let mtp = conv.path.with_extension("mtp.gguf");
    moe_e2e::rewrite_gguf_metadata(&conv.path, &mtp, |meta| {
        for (k, v) in meta.iter_mut() {
            match k.as_str() {
                "qwen35moe.block_count" => *v = Value::U32(5),
                "qwen35moe.attention.recurrent_layers" => {
                    let flags = [true, true, true, false, false].map(Value::Bool).to_vec();
                    *v = Value::Array(moe_runtime::gguf::ValueType::Bool, flags);
                }
                _ => {}
            }
        }
        meta.push(("qwen35moe.nextn_predict_layers".into(), Value::U32(1)));
    });
    let file = GgufFile::open(&mtp).unwrap();
    let model = Model::load(&file).unwrap();
    assert_eq!(model.layers.len(), 4);
    let diff = max_rel_diff(&prompt_logits(&file, &case.ids), &want, vocab);
    assert!(
        diff < TOLERANCE,
        "with an MTP block: logits differ by {diff:e}"
    );
}

#[test]
fn gpt_oss_sliding_layers_do_not_grow_with_the_context() {
    use moe_runtime::model::{KvType, Model, Session};
    let fx = Fixture::load("gpt_oss");
    let conv = fx.convert(GgmlType::F32);
    let file = conv.open();
    let model = Model::load(&file).unwrap();
    let hp = &model.hp;
    let windowed: Vec<bool> = (0..hp.n_layer)
        .map(|l| hp.layer_window(l).is_some())
        .collect();
    assert_eq!(windowed, [true, false, true], "layer_types' alternation");
    let per_pos = hp.n_head_kv * (hp.head_dim_k + hp.head_dim_v) * 4;
    let bytes = |ctx| Session::with_kv_type(&model, ctx, KvType::F32).kv_bytes();
    let ring = hp.sliding_window.unwrap() + moe_runtime::model::SWA_CHUNK - 1;
    assert_eq!(bytes(512), (512 + 2 * ring) * per_pos);
    assert_eq!(bytes(4096) - bytes(512), (4096 - 512) * per_pos);
}

/// MLA caches the normalised latent plus the shared rotary key, one "head" per token and layer,
/// instead of per-head keys and values.
#[test]
fn mla_kv_cache_is_compressed() {
    use moe_runtime::model::{KvType, Model, Session};
    for name in ["deepseek_v2", "deepseek_v3"] {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::F32);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        let hp = &model.hp;
        let p = hp.mla.expect("deepseek2 is MLA");
        let s = Session::with_kv_type(&model, 64, KvType::F16);
        let per_token = s.kv_bytes() / 64;
        let compressed = hp.n_layer * (p.kv_lora_rank + p.qk_rope) * 2;
        let full = hp.n_layer * hp.n_head * (p.qk_head_dim() + p.v_head_dim) * 2;
        println!(
            "{name}: KV cache {per_token} bytes/token (f16), a full K/V cache would be {full}"
        );
        assert_eq!(per_token, compressed);
        assert!(per_token < full);
    }
}

/// Gemma 4 MoE (transformers' Gemma4ForCausalLM): a dense GELU MLP beside the experts, each
/// normalised, the router on its own scaled norm with per-expert scales, sandwich norms, q/k/v
/// norms, sliding layers (window 8) and full layers with their own head size, KV heads and
/// proportional rope, keys reused as values, layer scalars, logit soft-capping.
#[test]
fn gemma4_dense_mlp_beside_experts_sliding_and_full_layers() {
    check_parity("gemma4", GgmlType::F32);
}

/// Gemma 4 decoded one token at a time equals one prefill at every position of every prompt,
/// the 46-token one passing the window (8) and the sliding layers' ring (39 slots).
#[test]
fn gemma4_step_by_step_decoding_matches_prefill() {
    check_step_by_step("gemma4");
}

/// Decoding one token at a time through the KV cache gives the same logits as one prefill.
#[test]
fn kv_cache_decode_matches_prefill() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::F32);
        let file = conv.open();
        let case = fx.expected.prompts.last().unwrap();
        let (want, _, vocab) = fx.logits(fx.expected.prompts.len() - 1);
        let got = stepwise_logits(&file, &case.ids);
        let diff = max_rel_diff(&got, &want, vocab);
        assert!(
            diff < TOLERANCE,
            "{name}: step-by-step logits differ by {diff:e}"
        );
    }
}

/// The tokenizer embedded in the GGUF encodes the prompts exactly as transformers did
/// (including Mixtral's BOS).
#[test]
fn embedded_tokenizer_matches_transformers() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::F32);
        let file = conv.open();
        let tok = Tokenizer::from_gguf(file.header()).expect("tokenizer");
        for case in &fx.expected.prompts {
            assert_eq!(
                tok.encode(&case.text, true).unwrap(),
                case.ids,
                "{name}: {:?}",
                case.text
            );
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fx.dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            file.header()
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str()),
            cfg["chat_template"].as_str(),
            "{name}: chat template is embedded verbatim"
        );
    }
}

/// Files without the embedded tokenizer.json (as llama.cpp's converter writes them) get a
/// tokenizer rebuilt from `tokenizer.ggml.*` that encodes the same ids.
#[test]
fn tokenizer_rebuilt_from_ggml_vocab_matches() {
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::Q8_0);
        let stripped = conv.path.with_extension("stripped.gguf");
        moe_e2e::rewrite_gguf(&conv.path, &stripped, |k| k != "tokenizer.huggingface.json");
        let file = moe_runtime::gguf::GgufFile::open(&stripped).unwrap();
        assert!(file.header().get("tokenizer.huggingface.json").is_none());
        let tok = Tokenizer::from_gguf(file.header()).expect("rebuilt tokenizer");
        for case in &fx.expected.prompts {
            let ids = tok.encode(&case.text, true).unwrap();
            assert_eq!(ids, case.ids, "{name}: {:?}", case.text);
            assert_eq!(
                tok.decode(&ids, true).unwrap().trim_start(),
                case.text.trim_start()
            );
        }
    }
}

/// The default f16 KV cache stays close to the f32 reference (its error is the rounding of
/// keys and values to f16).
#[test]
fn f16_kv_cache_stays_close() {
    use moe_runtime::model::{KvType, Model, Session};
    for name in FIXTURES {
        let fx = Fixture::load(name);
        let conv = fx.convert(GgmlType::F32);
        let file = conv.open();
        let model = Model::load(&file).unwrap();
        for (i, case) in fx.expected.prompts.iter().enumerate() {
            let (want, _, vocab) = fx.logits(i);
            let mut s = Session::with_kv_type(&model, 256, KvType::F16);
            let got = s.forward(&case.ids, true).unwrap().to_vec();
            let diff = max_rel_diff(&got, &want, vocab);
            assert!(
                diff < 1e-2,
                "{name} prompt {i}: f16 KV cache differs by {diff:e}"
            );
        }
    }
}

/// GLM's special tokens are set by their text, as llama.cpp's converter sets them: `[gMASK]` as
/// BOS, `<|user|>` as end of turn, `<|observation|>` as end of message (a tool call), and
/// generation stops at both. The fixture's tokenizer gets GLM's token texts in place of three of
/// its own.
#[test]
fn glm4_moe_special_tokens_are_llama_cpp_s() {
    let fx = Fixture::load("glm4_moe");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&fx.dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let tok = dir.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    let text = text
        .replace("<|im_start|>", "[gMASK]")
        .replace("<|im_end|>", "<|user|>")
        .replace("\"<s>\"", "\"<|observation|>\"");
    std::fs::write(&tok, text).unwrap();
    let out = dir.path().join("glm.gguf");
    moe_convert::convert(
        dir.path(),
        &out,
        &moe_convert::ConvertOptions::new(GgmlType::Q8_0),
        &|_, _, _| {},
    )
    .unwrap();
    let file = moe_runtime::gguf::GgufFile::open(&out).unwrap();
    let id = |k: &str| file.header().get(k).and_then(|v| v.as_u64());
    assert_eq!(id("tokenizer.ggml.bos_token_id"), Some(1));
    assert_eq!(id("tokenizer.ggml.eot_token_id"), Some(2));
    assert_eq!(id("tokenizer.ggml.eom_token_id"), Some(3));
    assert_eq!(id("tokenizer.ggml.unknown_token_id"), Some(0));
    assert_eq!(id("tokenizer.ggml.eos_token_id"), Some(0));
    let tok = Tokenizer::from_gguf(file.header()).unwrap();
    for stop in [0, 2, 3] {
        assert!(tok.is_end_of_generation(stop), "{stop}");
    }
    assert!(!tok.is_end_of_generation(1));
}

/// llama.cpp's converter writes Gemma 4's experts' gate and up fused (`ffn_gate_up_exps`, each
/// expert's gate rows then its up rows); such a file gives the same logits as moe-convert's
/// separate tensors, resident and through the expert cache.
#[test]
fn gemma4_fused_gate_up_experts_load() {
    use moe_runtime::gguf::{GgufFile, GgufWriter, TensorDecl};
    use moe_runtime::model::{ExpertStreaming, KvType, Model, Session};
    use moe_runtime::moe::cache::Eviction;
    let fx = Fixture::load("gemma4");
    let conv = fx.convert(GgmlType::Q8_0);
    let src = conv.open();
    let h = src.header();
    let meta: Vec<_> = h
        .metadata()
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .cloned()
        .collect();
    // (declaration, bytes) of every tensor, gate and up of each layer fused in the gate's place.
    let mut out: Vec<(TensorDecl, Vec<u8>)> = Vec::new();
    for t in h.tensors() {
        if t.name.ends_with("ffn_up_exps.weight") {
            continue;
        }
        let bytes = src.tensor_bytes(t).to_vec();
        let Some(stem) = t.name.strip_suffix("ffn_gate_exps.weight") else {
            out.push((
                TensorDecl {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ty: t.ty,
                },
                bytes,
            ));
            continue;
        };
        let up = h.tensor(&format!("{stem}ffn_up_exps.weight")).unwrap();
        let up_bytes = src.tensor_bytes(up);
        let (cols, ff, e) = (t.dims[0], t.dims[1], t.dims[2]);
        let slab = bytes.len() / e;
        let mut fused = Vec::with_capacity(2 * bytes.len());
        for x in 0..e {
            fused.extend_from_slice(&bytes[x * slab..(x + 1) * slab]);
            fused.extend_from_slice(&up_bytes[x * slab..(x + 1) * slab]);
        }
        let decl = TensorDecl {
            name: format!("{stem}ffn_gate_up_exps.weight"),
            dims: vec![cols, 2 * ff, e],
            ty: t.ty,
        };
        out.push((decl, fused));
    }
    let path = conv.path.with_extension("fused.gguf");
    let decls = out.iter().map(|(d, _)| d.clone()).collect();
    let f = std::fs::File::create(&path).unwrap();
    let mut w = GgufWriter::begin(f, &meta, decls, h.alignment as u32).unwrap();
    for (_, bytes) in &out {
        w.write_tensor_data(bytes).unwrap();
    }
    w.finish().unwrap();
    let fused = GgufFile::open(&path).unwrap();
    assert!(fused
        .header()
        .tensor("blk.0.ffn_gate_up_exps.weight")
        .is_some());
    assert!(fused
        .header()
        .tensor("blk.0.ffn_gate_exps.weight")
        .is_none());
    let ids = &fx.expected.prompts[3].ids;
    let want = prompt_logits(&src, ids);
    assert_eq!(prompt_logits(&fused, ids), want, "fused file, resident");
    let model = Model::load(&fused).unwrap();
    let cache = moe_e2e::expert_cache(
        &model,
        &path,
        moe_e2e::cache_config(model.hp.n_expert_used + 1, Eviction::Lru),
    );
    let mut s = Session::with_kv_type(&model, 256, KvType::F32);
    s.set_streaming(ExpertStreaming {
        cache: Some(cache),
        lookahead: 0,
    });
    assert_eq!(
        s.forward(ids, true).unwrap(),
        &want[..],
        "fused file, streamed"
    );
}
