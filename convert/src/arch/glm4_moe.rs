//! GLM-4.5 / GLM-4.5-Air / GLM-4.6 (`glm4_moe`) as llama.cpp's `glm4moe`: partial rotary (the
//! first `head_dim * partial_rotary_factor` dims of each head, NeoX pairs, so q/k are not
//! permuted), q/k/v biases, optional per-head q/k norm, leading dense layers, one shared expert
//! block, and DeepSeek-V3-style routing (sigmoid scores, a selection bias, groups, routed
//! scaling). Follows llama.cpp's `Glm4MoeModel` converter run with `--no-mtp`: the
//! next-token-prediction layer (`model.layers.{num_hidden_layers}.*`) is not written, since
//! generation never runs it.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::{experts_at, ArchConverter, ExpertMlp, FfnSource, SharedSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct Glm4Moe;

/// `partial_rotary_factor` at the top level (Hub configs) or in `rope_parameters`
/// (transformers 5); transformers' GLM-4.5 default is 0.5.
fn partial_rotary_factor(cfg: &Config) -> Result<f64, ConvertError> {
    if let Some(f) = cfg.opt_f64("partial_rotary_factor")? {
        return Ok(f);
    }
    Ok(cfg
        .get("rope_parameters")
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(|v| v.as_f64())
        .unwrap_or(0.5))
}

/// Rotary dims per head: `int(head_dim * partial_rotary_factor)`, as transformers and llama.cpp
/// compute them.
fn rope_dims(cfg: &Config) -> Result<usize, ConvertError> {
    let head_dim = match cfg.opt_usize("head_dim")? {
        Some(h) => h,
        None => cfg.usize("hidden_size")? / cfg.usize("num_attention_heads")?,
    };
    let factor = partial_rotary_factor(cfg)?;
    let dims = (head_dim as f64 * factor) as usize;
    if !(0.0..=1.0).contains(&factor) || dims == 0 || !dims.is_multiple_of(2) {
        return Err(ConvertError::Config {
            field: "partial_rotary_factor".into(),
            why: format!("{factor} of head_dim {head_dim} is not an even number of rotary dims"),
        });
    }
    Ok(dims)
}

impl ArchConverter for Glm4Moe {
    fn arch(&self) -> Arch {
        Arch::Glm4Moe
    }

    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("n_routed_experts")
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let u = |x: usize| Value::U32(x as u32);
        if let Some(f) = cfg.get("scoring_func").and_then(|v| v.as_str()) {
            if f != "sigmoid" {
                return Err(ConvertError::Config {
                    field: "scoring_func".into(),
                    why: format!("is `{f}`; glm4_moe routes with sigmoid"),
                });
            }
        }
        let mut m = vec![
            ("rope.dimension_count".into(), u(rope_dims(cfg)?)),
            (
                "leading_dense_block_count".into(),
                u(cfg.opt_usize("first_k_dense_replace")?.unwrap_or(1)),
            ),
            (
                "expert_feed_forward_length".into(),
                u(cfg.usize("moe_intermediate_size")?),
            ),
            (
                "expert_shared_count".into(),
                u(cfg.opt_usize("n_shared_experts")?.unwrap_or(1)),
            ),
            // llama.cpp's enum llama_expert_gating_func_type: 2 = sigmoid.
            ("expert_gating_func".into(), u(2)),
            (
                "expert_weights_scale".into(),
                Value::F32(cfg.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32),
            ),
        ];
        let n_group = cfg.opt_usize("n_group")?.unwrap_or(1);
        m.push(("expert_group_count".into(), u(n_group)));
        m.push((
            "expert_group_used_count".into(),
            u(cfg.opt_usize("topk_group")?.unwrap_or(n_group)),
        ));
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let p = format!("model.layers.{l}.mlp");
        // transformers: layers below first_k_dense_replace are dense.
        if l < cfg.opt_usize("first_k_dense_replace")?.unwrap_or(1) {
            return Ok(FfnSource::Dense {
                gate: format!("{p}.gate_proj.weight"),
                up: format!("{p}.up_proj.weight"),
                down: format!("{p}.down_proj.weight"),
            });
        }
        let shared = (cfg.opt_usize("n_shared_experts")?.unwrap_or(1) > 0).then(|| SharedSource {
            mlp: ExpertMlp::Separate {
                gate: format!("{p}.shared_experts.gate_proj.weight"),
                up: format!("{p}.shared_experts.up_proj.weight"),
                down: format!("{p}.shared_experts.down_proj.weight"),
            },
            gate: None,
        });
        Ok(FfnSource::Moe {
            router: format!("{p}.gate.weight"),
            experts: experts_at(
                ckpt,
                &format!("{p}.experts"),
                self.expert_count(cfg)?,
                ["gate_proj", "up_proj", "down_proj"],
            )?,
            shared,
            // llama.cpp requires it in every MoE layer; transformers always has the buffer.
            selection_bias: Some(format!("{p}.gate.e_score_correction_bias")),
        })
    }

    fn norm_topk(&self, cfg: &Config) -> Result<bool, ConvertError> {
        Ok(cfg.opt_bool("norm_topk_prob")?.unwrap_or(true))
    }

    fn tokenizer_pre(&self, detected: &'static str) -> &'static str {
        // GLM-4.5's regex is Llama 3's; llama.cpp recognises the tokenizer as `glm4` (which also
        // looks whole words up before merging, as the Hugging Face tokenizer's ignore_merges).
        match detected {
            "llama-bpe" => "glm4",
            other => other,
        }
    }

    fn special_tokens(&self) -> &'static [(&'static str, &'static str)] {
        // llama.cpp's `_set_vocab_glm`: [gMASK] opens every prompt, <|user|> ends an assistant
        // turn, <|observation|> waits for a tool's answer.
        &[
            ("bos", "[gMASK]"),
            ("eot", "<|user|>"),
            ("unknown", "<|endoftext|>"),
            ("eom", "<|observation|>"),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> Config {
        Config { json }
    }

    #[test]
    fn rotary_dims_from_either_config_layout() {
        let hub = cfg(serde_json::json!({"head_dim": 128, "hidden_size": 4096,
            "num_attention_heads": 96, "partial_rotary_factor": 0.5}));
        assert_eq!(rope_dims(&hub).unwrap(), 64);
        let tf5 = cfg(
            serde_json::json!({"hidden_size": 64, "num_attention_heads": 2,
            "rope_parameters": {"rope_theta": 1e6, "partial_rotary_factor": 0.25}}),
        );
        assert_eq!(rope_dims(&tf5).unwrap(), 8);
        let odd = cfg(serde_json::json!({"head_dim": 10, "hidden_size": 64,
            "num_attention_heads": 2, "partial_rotary_factor": 0.5}));
        assert!(rope_dims(&odd).is_err());
    }

    #[test]
    fn llama_cpp_names_the_glm_tokenizer() {
        assert_eq!(Glm4Moe.tokenizer_pre("llama-bpe"), "glm4");
        assert_eq!(Glm4Moe.tokenizer_pre("gpt-2"), "gpt-2");
        assert!(Glm4Moe
            .special_tokens()
            .contains(&("eom", "<|observation|>")));
    }
}
