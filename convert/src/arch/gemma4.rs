//! Gemma 4 with experts (`gemma4_text`: Gemma-4-26B-A4B's language model), written as llama.cpp's
//! `gemma4`:
//!
//! - attention with q/k RMSNorm (weights `head_dim` long), an unweighted v RMSNorm (no tensor)
//!   and an RMSNorm of its output (`post_attention_norm`); sliding layers and full layers differ
//!   in head size, KV heads and rope (`key_length_swa`, a `head_count_kv` array, `freq_base_swa`);
//!   full layers with `attention_k_eq_v` have no `v_proj` (the keys' projection is the values');
//! - the full layers' "proportional" rope rotates a `partial_rotary_factor` share of the head
//!   with frequencies of the whole head: llama.cpp rotates the whole head with frequency factors
//!   (`rope_freqs.weight`) of 1 for the rotated pairs and 1e30 (no rotation) for the rest;
//! - every layer runs a dense MLP (`ffn_gate`/`ffn_up`/`ffn_down` after `ffn_norm`, then
//!   `post_ffw_norm_1`) beside the routed experts (after `pre_ffw_norm_2`, then
//!   `post_ffw_norm_2`), and normalises their sum (`post_ffw_norm`);
//! - the router's input scale (`ffn_gate_inp.scale`), its per-expert output scale
//!   (`ffn_down_exps.scale`) and the per-layer output scale (`layer_output_scale.weight`).
//!
//! Norm weights are used as stored (Gemma 4's RMSNorm multiplies by the weight, not by one plus
//! it). What only the dense Gemma 4 models use is refused with the feature's name: per-layer
//! input embeddings, KV sharing between layers, double-wide MLPs, a model without experts.

use std::sync::Arc;

use moe_runtime::gguf::{GgmlType, Value, ValueType};
use moe_runtime::model::Arch;

use super::{ArchConverter, AttnTensor, ExpertSource, FfnSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::source::{Pack, Source};

pub struct Gemma4;

/// llama.cpp's frequency factor for a pair the proportional rope leaves unrotated.
const NO_ROTATION: f32 = 1e30;

fn unsupported(what: &str) -> ConvertError {
    ConvertError::Unsupported(format!(
        "Gemma 4 {what} is not supported (moe-convert converts the Gemma 4 MoE text model, as \
         Gemma-4-26B-A4B's)"
    ))
}

/// Layer types from `layer_types` (true = sliding window).
fn sliding_layers(cfg: &Config) -> Result<Vec<bool>, ConvertError> {
    let n = cfg.usize("num_hidden_layers")?;
    let bad = |why: String| ConvertError::Config {
        field: "layer_types".into(),
        why,
    };
    let items = cfg
        .get("layer_types")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("is missing or not a list".into()))?;
    if items.len() != n {
        return Err(bad(format!("has {} entries for {n} layers", items.len())));
    }
    items
        .iter()
        .map(|v| match v.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(bad(format!(
                "lists {v}; expected sliding_attention or full_attention"
            ))),
        })
        .collect()
}

/// (theta, rotated share of the head) of one layer type's `rope_parameters`, refusing rope
/// types other than the default and the proportional one.
fn rope_of(cfg: &Config, layer_type: &str) -> Result<(f64, f64), ConvertError> {
    let field = format!("rope_parameters.{layer_type}");
    let p = cfg
        .get("rope_parameters")
        .and_then(|r| r.get(layer_type))
        .ok_or_else(|| ConvertError::Config {
            field: field.clone(),
            why: "is missing".into(),
        })?;
    let kind = p
        .get("rope_type")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let theta = p
        .get("rope_theta")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| ConvertError::Config {
            field: format!("{field}.rope_theta"),
            why: "is missing".into(),
        })?;
    let share = p
        .get("partial_rotary_factor")
        .and_then(|v| v.as_f64())
        .unwrap_or(1.0);
    let factor = p.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0);
    match kind {
        "default" if share == 1.0 => Ok((theta, 1.0)),
        "proportional" if factor == 1.0 && share > 0.0 && share <= 1.0 => Ok((theta, share)),
        _ => Err(ConvertError::Config {
            field,
            why: format!(
                "rope `{kind}` (partial_rotary_factor {share}, factor {factor}) is not \
                 supported: sliding layers need the default rope, full layers the default or \
                 proportional rope without scaling"
            ),
        }),
    }
}

/// The full layers' head size and KV heads (`global_head_dim`, `num_global_key_value_heads`;
/// transformers uses the sliding layers' KV heads for full layers unless `attention_k_eq_v`).
fn full_attention_dims(cfg: &Config) -> Result<(usize, usize), ConvertError> {
    let head_dim = cfg.usize("head_dim")?;
    let hd = cfg.opt_usize("global_head_dim")?.unwrap_or(head_dim);
    let kv = cfg.usize("num_key_value_heads")?;
    let kv_full = match k_eq_v(cfg)? {
        true => cfg.opt_usize("num_global_key_value_heads")?.unwrap_or(kv),
        false => kv,
    };
    Ok((hd, kv_full))
}

fn k_eq_v(cfg: &Config) -> Result<bool, ConvertError> {
    Ok(cfg.opt_bool("attention_k_eq_v")?.unwrap_or(false))
}

/// The refusals: features of the dense Gemma 4 models this runtime does not implement.
fn check_supported(cfg: &Config) -> Result<(), ConvertError> {
    if cfg.opt_usize("hidden_size_per_layer_input")?.unwrap_or(0) > 0 {
        return Err(unsupported(
            "with per-layer input embeddings (hidden_size_per_layer_input > 0, the E2B/E4B models)",
        ));
    }
    if cfg.opt_usize("num_kv_shared_layers")?.unwrap_or(0) > 0 {
        return Err(unsupported(
            "with KV sharing between layers (num_kv_shared_layers > 0)",
        ));
    }
    if cfg.opt_bool("use_double_wide_mlp")?.unwrap_or(false) {
        return Err(unsupported("with double-wide MLPs (use_double_wide_mlp)"));
    }
    if !cfg.opt_bool("enable_moe_block")?.unwrap_or(false) {
        return Err(unsupported(
            "without experts (enable_moe_block false: a dense model)",
        ));
    }
    if cfg.opt_bool("attention_bias")?.unwrap_or(false) {
        return Err(unsupported("with attention biases (attention_bias)"));
    }
    if cfg
        .get("use_bidirectional_attention")
        .and_then(|v| v.as_str())
        == Some("all")
    {
        return Err(unsupported(
            "with bidirectional attention (use_bidirectional_attention = all)",
        ));
    }
    let act = cfg
        .get("hidden_activation")
        .and_then(|v| v.as_str())
        .unwrap_or("gelu_pytorch_tanh");
    if act != "gelu_pytorch_tanh" {
        return Err(ConvertError::Config {
            field: "hidden_activation".into(),
            why: format!("is `{act}`; llama.cpp's gemma4 runs gelu_pytorch_tanh"),
        });
    }
    Ok(())
}

/// `rope_freqs.weight`: the full layers' frequency factors (f32, `global_head_dim / 2`).
#[derive(Debug)]
struct RopeFreqs(Vec<f32>);

impl Pack for RopeFreqs {
    fn ty(&self) -> GgmlType {
        GgmlType::F32
    }

    fn bytes(&self, _ckpt: &Checkpoint) -> Result<Vec<u8>, ConvertError> {
        Ok(self.0.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// transformers' proportional rope rotates `int(share * head_dim / 2)` pairs.
fn rope_freqs(head_dim: usize, share: f64) -> Vec<f32> {
    let rotated = (share * head_dim as f64 / 2.0) as usize;
    (0..head_dim / 2)
        .map(|i| if i < rotated { 1.0 } else { NO_ROTATION })
        .collect()
}

impl ArchConverter for Gemma4 {
    fn arch(&self) -> Arch {
        Arch::Gemma4
    }

    fn handles_rope_scaling(&self) -> bool {
        true
    }

    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        check_supported(cfg)?;
        cfg.usize("num_experts")
    }

    fn expert_used_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("top_k_experts")
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        check_supported(cfg)?;
        let swa = sliding_layers(cfg)?;
        let head_dim = cfg.usize("head_dim")?;
        let (hd_full, kv_full) = full_attention_dims(cfg)?;
        let kv = cfg.usize("num_key_value_heads")?;
        let (theta_swa, _) = rope_of(cfg, "sliding_attention")?;
        let (theta_full, _) = rope_of(cfg, "full_attention")?;
        let u32s =
            |v: Vec<u32>| Value::Array(ValueType::U32, v.into_iter().map(Value::U32).collect());
        let mut m = vec![
            ("attention.key_length".into(), Value::U32(hd_full as u32)),
            ("attention.value_length".into(), Value::U32(hd_full as u32)),
            (
                "attention.key_length_swa".into(),
                Value::U32(head_dim as u32),
            ),
            (
                "attention.value_length_swa".into(),
                Value::U32(head_dim as u32),
            ),
            (
                "attention.head_count_kv".into(),
                u32s(
                    swa.iter()
                        .map(|&s| if s { kv } else { kv_full } as u32)
                        .collect(),
                ),
            ),
            (
                "attention.sliding_window_pattern".into(),
                Value::Array(
                    ValueType::Bool,
                    swa.iter().map(|&s| Value::Bool(s)).collect(),
                ),
            ),
            (
                "attention.sliding_window".into(),
                Value::U32(cfg.usize("sliding_window")? as u32),
            ),
            ("attention.shared_kv_layers".into(), Value::U32(0)),
            ("embedding_length_per_layer_input".into(), Value::U32(0)),
            ("rope.freq_base".into(), Value::F32(theta_full as f32)),
            ("rope.freq_base_swa".into(), Value::F32(theta_swa as f32)),
            // The full layers rotate the whole head (the frequency factors stop the rest); the
            // sliding layers rotate all of theirs.
            ("rope.dimension_count".into(), Value::U32(hd_full as u32)),
            (
                "rope.dimension_count_swa".into(),
                Value::U32(head_dim as u32),
            ),
            (
                "expert_feed_forward_length".into(),
                Value::U32(cfg.usize("moe_intermediate_size")? as u32),
            ),
        ];
        if let Some(cap) = cfg.opt_f64("final_logit_softcapping")? {
            m.push(("final_logit_softcapping".into(), Value::F32(cap as f32)));
        }
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn_norm_source(&self, l: usize) -> String {
        format!("model.layers.{l}.pre_feedforward_layernorm.weight")
    }

    fn attention(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<Option<Vec<AttnTensor>>, ConvertError> {
        let d = cfg.usize("hidden_size")?;
        let n_head = cfg.usize("num_attention_heads")?;
        let sliding = sliding_layers(cfg)?[l];
        let (hd, kv) = match sliding {
            true => (cfg.usize("head_dim")?, cfg.usize("num_key_value_heads")?),
            false => full_attention_dims(cfg)?,
        };
        let p = |s: &str| format!("model.layers.{l}.self_attn.{s}");
        let t = |s: &str| Source::Tensor(p(s));
        let mut out = Vec::new();
        let mut proj = |name: &str, hf: &str, rows: usize| -> Result<(), ConvertError> {
            ckpt.expect_shape(&p(hf), &[rows, d])?;
            out.push(AttnTensor::new(name, vec![d, rows], t(hf)));
            Ok(())
        };
        proj("attn_q.weight", "q_proj.weight", n_head * hd)?;
        proj("attn_k.weight", "k_proj.weight", kv * hd)?;
        let values_are_keys = !sliding && k_eq_v(cfg)?;
        if !values_are_keys {
            proj("attn_v.weight", "v_proj.weight", kv * hd)?;
        } else if ckpt.has(&p("v_proj.weight")) {
            return Err(ConvertError::Input(format!(
                "{} exists although attention_k_eq_v makes the keys' projection the values'",
                p("v_proj.weight")
            )));
        }
        ckpt.expect_shape(&p("o_proj.weight"), &[d, n_head * hd])?;
        out.push(AttnTensor::new(
            "attn_output.weight",
            vec![n_head * hd, d],
            t("o_proj.weight"),
        ));
        for (name, hf) in [
            ("attn_q_norm.weight", "q_norm.weight"),
            ("attn_k_norm.weight", "k_norm.weight"),
        ] {
            ckpt.expect_shape(&p(hf), &[hd])?;
            out.push(AttnTensor::new(name, vec![hd], t(hf)));
        }
        Ok(Some(out))
    }

    fn extra_layer_tensors(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<Vec<AttnTensor>, ConvertError> {
        let d = cfg.usize("hidden_size")?;
        let ff = cfg.usize("intermediate_size")?;
        let n_expert = self.expert_count(cfg)?;
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let mut out = Vec::new();
        for (name, hf) in [
            (
                "post_attention_norm.weight",
                "post_attention_layernorm.weight",
            ),
            ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
            (
                "pre_ffw_norm_2.weight",
                "pre_feedforward_layernorm_2.weight",
            ),
            (
                "post_ffw_norm_1.weight",
                "post_feedforward_layernorm_1.weight",
            ),
            (
                "post_ffw_norm_2.weight",
                "post_feedforward_layernorm_2.weight",
            ),
            ("ffn_gate_inp.scale", "router.scale"),
        ] {
            ckpt.expect_shape(&p(hf), &[d])?;
            out.push(AttnTensor::new(name, vec![d], Source::Tensor(p(hf))));
        }
        ckpt.expect_shape(&p("router.per_expert_scale"), &[n_expert])?;
        out.push(AttnTensor::new(
            "ffn_down_exps.scale",
            vec![n_expert],
            Source::Tensor(p("router.per_expert_scale")),
        ));
        ckpt.expect_shape(&p("layer_scalar"), &[1])?;
        out.push(AttnTensor::new(
            "layer_output_scale.weight",
            vec![1],
            Source::Tensor(p("layer_scalar")),
        ));
        for (name, hf, dims) in [
            ("ffn_gate.weight", "mlp.gate_proj.weight", [ff, d]),
            ("ffn_up.weight", "mlp.up_proj.weight", [ff, d]),
            ("ffn_down.weight", "mlp.down_proj.weight", [d, ff]),
        ] {
            ckpt.expect_shape(&p(hf), &dims)?;
            out.push(AttnTensor::new(
                name,
                vec![dims[1], dims[0]],
                Source::Tensor(p(hf)),
            ));
        }
        Ok(out)
    }

    fn extra_tensors(&self, cfg: &Config) -> Result<Vec<AttnTensor>, ConvertError> {
        let (hd, _) = full_attention_dims(cfg)?;
        let (_, share) = rope_of(cfg, "full_attention")?;
        Ok(vec![AttnTensor::new(
            "rope_freqs.weight",
            vec![hd / 2],
            Source::Packed(Arc::new(RopeFreqs(rope_freqs(hd, share)))),
        )])
    }

    fn ffn(&self, cfg: &Config, _ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let _ = self.expert_count(cfg)?;
        let p = format!("model.layers.{l}");
        Ok(FfnSource::Moe {
            router: format!("{p}.router.proj.weight"),
            experts: ExpertSource::Fused {
                gate_up: format!("{p}.experts.gate_up_proj"),
                down: format!("{p}.experts.down_proj"),
            },
            shared: None,
            selection_bias: None,
        })
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        // transformers' Gemma4TextRouter divides the top-k probabilities by their sum.
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> Config {
        Config { json }
    }

    #[test]
    fn proportional_rope_stops_all_but_its_share_of_pairs() {
        let f = rope_freqs(32, 0.25);
        assert_eq!(f.len(), 16);
        assert!(f[..4].iter().all(|&v| v == 1.0));
        assert!(f[4..].iter().all(|&v| v == NO_ROTATION));
    }

    #[test]
    fn dense_model_features_are_refused_by_name() {
        let base = serde_json::json!({"enable_moe_block": true});
        assert!(check_supported(&cfg(base)).is_ok());
        for (key, value, named) in [
            (
                "hidden_size_per_layer_input",
                serde_json::json!(256),
                "per-layer input",
            ),
            ("num_kv_shared_layers", serde_json::json!(20), "KV sharing"),
            (
                "use_double_wide_mlp",
                serde_json::json!(true),
                "double-wide",
            ),
            (
                "enable_moe_block",
                serde_json::json!(false),
                "without experts",
            ),
        ] {
            let mut j = serde_json::json!({"enable_moe_block": true});
            j[key] = value;
            let err = check_supported(&cfg(j)).unwrap_err().to_string();
            assert!(err.contains(named), "{key}: {err}");
        }
    }

    #[test]
    fn rope_types_other_than_default_and_proportional_are_refused() {
        let c = cfg(serde_json::json!({"rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0}}}));
        assert_eq!(rope_of(&c, "sliding_attention").unwrap(), (10000.0, 1.0));
        let err = rope_of(&c, "full_attention").unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }
}
