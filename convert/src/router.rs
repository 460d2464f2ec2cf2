//! A decoupled router (Read-ME, arXiv 2410.19123): one small causal transformer over token ids
//! that picks every token's experts before the backbone runs; every MoE layer uses its choice.
//! Architecture-independent: it sits beside any backbone the `arch` module converts.
//!
//! Source (Read-ME's `LlamaForCausalLM.cluster_predictor`, see scripts/fixtures/make_readme_fixture.py):
//! config.json keys `add_cluster_predictor`, `embedding_dim`, `inter_dim`, `N_cluster`,
//! `n_layer`, `n_head`, `normalizer`, `hidden_act_predictor`,
//! `max_position_embeddings_predictor`, `nonautoregressive`; tensors `cluster_predictor.*`.
//!
//! GGUF (moe-edge's extension; all f32):
//! - keys `moe_edge.router.{kind = "readme", embedding_length, block_count, head_count,
//!   attention.normalizer, rope.freq_base, layer_norm_rms_epsilon, expert_count, context_length}`;
//! - tensors `moe_edge.router.token_embd.weight` `[d, n_vocab]`,
//!   `moe_edge.router.blk.{i}.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_up,
//!   ffn_down}.{weight,bias}` (Read-ME's `input_layernorm_i`, `{q,k,v,o}_proj_i`,
//!   `post_attention_layernorm_i`, `proj_1_i`, `proj_2_i`), `moe_edge.router.output_norm.weight`,
//!   `moe_edge.router.output.{weight,bias}` (`out_layernorm`, `proj_out`).
//!
//! llama.cpp refuses such a file ("wrong number of tensors"): it creates only the tensors it
//! knows and checks the count. That is the right outcome, since it would route by the backbone's
//! unused per-layer gates and compute something else.

use moe_runtime::gguf::Value;

use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::source::Source;

/// GGUF prefix of the router's keys and tensors.
pub const PREFIX: &str = "moe_edge.router.";

/// Read-ME hard-codes the RMSNorm epsilon of its router.
const RMS_EPS: f32 = 1e-6;

/// Whether the checkpoint carries a Read-ME router that decides the routing.
pub fn present(cfg: &Config) -> Result<bool, ConvertError> {
    Ok(cfg.opt_bool("add_cluster_predictor")?.unwrap_or(false))
}

/// The router's metadata and tensors (GGUF name, ggml dims, source).
#[allow(clippy::type_complexity)]
pub fn plan(
    ckpt: &Checkpoint,
    rope_theta: f64,
    n_vocab: usize,
    n_expert: usize,
) -> Result<(Vec<(String, Value)>, Vec<(String, Vec<usize>, Source)>), ConvertError> {
    let cfg = &ckpt.config;
    let bad = |field: &str, why: String| ConvertError::Config {
        field: field.into(),
        why,
    };
    if cfg.opt_bool("nonautoregressive")?.unwrap_or(false) {
        return Err(bad(
            "nonautoregressive",
            "is true: only Read-ME's autoregressive (causal attention) router is supported".into(),
        ));
    }
    let d = cfg.usize("embedding_dim")?;
    let inter = cfg.usize("inter_dim")?;
    if inter != d {
        return Err(bad(
            "inter_dim",
            format!("is {inter} but embedding_dim is {d}; Read-ME's residuals need them equal"),
        ));
    }
    let n_layer = cfg.usize("n_layer")?;
    let n_head = cfg.usize("n_head")?;
    if n_head == 0 || !d.is_multiple_of(n_head) || !(d / n_head).is_multiple_of(2) {
        return Err(bad(
            "n_head",
            format!("{n_head} does not split inter_dim {d} into even head widths"),
        ));
    }
    let n_cluster = cfg.usize("N_cluster")?;
    if n_cluster != n_expert {
        return Err(bad(
            "N_cluster",
            format!("is {n_cluster}, but the backbone has {n_expert} experts per layer"),
        ));
    }
    let act = cfg
        .get("hidden_act_predictor")
        .and_then(|v| v.as_str())
        .unwrap_or("silu");
    if act != "silu" {
        return Err(bad(
            "hidden_act_predictor",
            format!("is `{act}`; only silu is supported"),
        ));
    }
    let normalizer = cfg.f64("normalizer")?;
    let ctx = cfg
        .opt_usize("max_position_embeddings_predictor")?
        .or(cfg.opt_usize("max_position_embeddings")?)
        .unwrap_or(4096);

    let key = |k: &str| format!("{PREFIX}{k}");
    let meta = vec![
        (key("kind"), Value::String("readme".into())),
        (key("embedding_length"), Value::U32(d as u32)),
        (key("block_count"), Value::U32(n_layer as u32)),
        (key("head_count"), Value::U32(n_head as u32)),
        (key("attention.normalizer"), Value::F32(normalizer as f32)),
        (key("rope.freq_base"), Value::F32(rope_theta as f32)),
        (key("layer_norm_rms_epsilon"), Value::F32(RMS_EPS)),
        (key("expert_count"), Value::U32(n_expert as u32)),
        (key("context_length"), Value::U32(ctx as u32)),
    ];

    let mut tensors = Vec::new();
    let mut add = |gguf: String, hf: String, shape: &[usize]| -> Result<(), ConvertError> {
        ckpt.expect_shape(&hf, shape)?;
        // ggml dims are the HF shape reversed.
        let dims = shape.iter().rev().copied().collect();
        tensors.push((gguf, dims, Source::Tensor(hf)));
        Ok(())
    };
    let hf = |s: &str| format!("cluster_predictor.{s}");
    add(key("token_embd.weight"), hf("embed.weight"), &[n_vocab, d])?;
    for i in 0..n_layer {
        let g = |s: &str| key(&format!("blk.{i}.{s}"));
        add(
            g("attn_norm.weight"),
            hf(&format!("input_layernorm_{i}.weight")),
            &[d],
        )?;
        add(
            g("ffn_norm.weight"),
            hf(&format!("post_attention_layernorm_{i}.weight")),
            &[d],
        )?;
        // Every linear layer of a block is [d, d] with a bias.
        for (ours, theirs) in [
            ("attn_q", "q_proj"),
            ("attn_k", "k_proj"),
            ("attn_v", "v_proj"),
            ("attn_output", "o_proj"),
            ("ffn_up", "proj_1"),
            ("ffn_down", "proj_2"),
        ] {
            add(
                g(&format!("{ours}.weight")),
                hf(&format!("{theirs}_{i}.weight")),
                &[d, d],
            )?;
            add(
                g(&format!("{ours}.bias")),
                hf(&format!("{theirs}_{i}.bias")),
                &[d],
            )?;
        }
    }
    add(key("output_norm.weight"), hf("out_layernorm.weight"), &[d])?;
    add(key("output.weight"), hf("proj_out.weight"), &[n_expert, d])?;
    add(key("output.bias"), hf("proj_out.bias"), &[n_expert])?;
    Ok((meta, tensors))
}
