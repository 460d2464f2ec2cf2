//! Liquid AI's LFM2-MoE (`lfm2_moe`: LFM2-8B-A1B) as llama.cpp's `lfm2moe`. `layer_types` mixes
//! gated short convolutions (`conv`) with GQA attention (`full_attention`); llama.cpp tells them
//! apart by a per-layer `attention.head_count_kv` of 0. A conv layer writes
//! `shortconv.{in_proj,conv,out_proj}` (the taps `[d, 1, L]` squeezed to `[d, L]`), an attention
//! layer q/k/v/`out_proj` and per-head `q_layernorm`/`k_layernorm`. The norms are
//! `operator_norm` (before the mixer), `ffn_norm` and the final `embedding_norm`
//! (`token_embd_norm`). The first `num_dense_layers` layers are dense SwiGLU (`w1`, `w3`, `w2`);
//! the others route by sigmoid with `expert_bias` for selection (`exp_probs_b`). Follows
//! llama.cpp's `LFM2MoeModel` converter.

use moe_runtime::gguf::{Value, ValueType};
use moe_runtime::model::Arch;

use super::{experts_at, ArchConverter, AttnTensor, FfnSource, HfNorms};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::source::Source;

pub struct Lfm2Moe;

/// Whether each layer is a short convolution (`layer_types`).
fn conv_layers(cfg: &Config) -> Result<Vec<bool>, ConvertError> {
    let n_layer = cfg.usize("num_hidden_layers")?;
    let types = cfg
        .get("layer_types")
        .and_then(|v| v.as_array())
        .ok_or_else(|| ConvertError::Config {
            field: "layer_types".into(),
            why: "is missing (one of conv / full_attention per layer)".into(),
        })?;
    let kinds: Vec<bool> = types
        .iter()
        .map(|t| match t.as_str() {
            Some("conv") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(ConvertError::Config {
                field: "layer_types".into(),
                why: format!("has {t}; expected conv or full_attention"),
            }),
        })
        .collect::<Result<_, _>>()?;
    if kinds.len() != n_layer {
        return Err(ConvertError::Config {
            field: "layer_types".into(),
            why: format!("has {} entries for {n_layer} layers", kinds.len()),
        });
    }
    Ok(kinds)
}

impl ArchConverter for Lfm2Moe {
    fn arch(&self) -> Arch {
        Arch::Lfm2Moe
    }

    fn hf_norms(&self) -> HfNorms {
        HfNorms {
            mixer: "operator_norm",
            ffn: "ffn_norm",
            output: "model.embedding_norm",
        }
    }

    fn rms_eps(&self, cfg: &Config) -> Result<f64, ConvertError> {
        cfg.f64("norm_eps")
    }

    fn attention(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<Option<Vec<AttnTensor>>, ConvertError> {
        let d = cfg.usize("hidden_size")?;
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let t = |s: String| Source::Tensor(s);
        if conv_layers(cfg)?[l] {
            let taps = cfg.usize("conv_L_cache")?;
            if cfg.opt_bool("conv_bias")?.unwrap_or(false) {
                return Err(ConvertError::Config {
                    field: "conv_bias".into(),
                    why: "is true; llama.cpp's lfm2moe has no short-convolution biases".into(),
                });
            }
            let (inp, conv, out) = (
                hf("conv.in_proj.weight"),
                hf("conv.conv.weight"),
                hf("conv.out_proj.weight"),
            );
            ckpt.expect_shape(&inp, &[3 * d, d])?;
            ckpt.expect_shape(&conv, &[d, 1, taps])?;
            ckpt.expect_shape(&out, &[d, d])?;
            return Ok(Some(vec![
                AttnTensor::new("shortconv.in_proj.weight", vec![d, 3 * d], t(inp)),
                AttnTensor::new("shortconv.conv.weight", vec![taps, d], t(conv)),
                AttnTensor::new("shortconv.out_proj.weight", vec![d, d], t(out)),
            ]));
        }
        let n_head = cfg.usize("num_attention_heads")?;
        let n_kv = cfg.usize("num_key_value_heads")?;
        let hd = d / n_head;
        let a = |s: &str| hf(&format!("self_attn.{s}"));
        let mut v = Vec::new();
        for (name, gg, rows, cols) in [
            ("q_proj.weight", "attn_q.weight", n_head * hd, d),
            ("k_proj.weight", "attn_k.weight", n_kv * hd, d),
            ("v_proj.weight", "attn_v.weight", n_kv * hd, d),
            ("out_proj.weight", "attn_output.weight", d, n_head * hd),
        ] {
            ckpt.expect_shape(&a(name), &[rows, cols])?;
            v.push(AttnTensor::new(gg, vec![cols, rows], t(a(name))));
        }
        for (name, gg) in [
            ("q_layernorm.weight", "attn_q_norm.weight"),
            ("k_layernorm.weight", "attn_k_norm.weight"),
        ] {
            ckpt.expect_shape(&a(name), &[hd])?;
            v.push(AttnTensor::new(gg, vec![hd], t(a(name))));
        }
        Ok(Some(v))
    }

    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("num_experts")
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let u = |x: usize| Value::U32(x as u32);
        let n_kv = cfg.usize("num_key_value_heads")?;
        let per_layer = conv_layers(cfg)?
            .into_iter()
            .map(|conv| u(if conv { 0 } else { n_kv }))
            .collect();
        let mut m = vec![
            (
                "attention.head_count_kv".into(),
                Value::Array(ValueType::U32, per_layer),
            ),
            ("shortconv.l_cache".into(), u(cfg.usize("conv_L_cache")?)),
            (
                "leading_dense_block_count".into(),
                u(cfg.usize("num_dense_layers")?),
            ),
            (
                "expert_feed_forward_length".into(),
                u(cfg.usize("moe_intermediate_size")?),
            ),
            // llama.cpp's enum llama_expert_gating_func_type: 2 = sigmoid.
            ("expert_gating_func".into(), u(2)),
            ("vocab_size".into(), u(cfg.usize("vocab_size")?)),
        ];
        let scale = cfg.opt_f64("routed_scaling_factor")?.unwrap_or(1.0);
        if scale != 1.0 {
            m.push(("expert_weights_scale".into(), Value::F32(scale as f32)));
        }
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let p = format!("model.layers.{l}.feed_forward");
        if l < cfg.usize("num_dense_layers")? {
            return Ok(FfnSource::Dense {
                gate: format!("{p}.w1.weight"),
                up: format!("{p}.w3.weight"),
                down: format!("{p}.w2.weight"),
            });
        }
        if !cfg.opt_bool("use_expert_bias")?.unwrap_or(true) {
            return Err(ConvertError::Config {
                field: "use_expert_bias".into(),
                why: "is false; llama.cpp's lfm2moe requires the expert bias".into(),
            });
        }
        Ok(FfnSource::Moe {
            router: format!("{p}.gate.weight"),
            experts: experts_at(
                ckpt,
                &format!("{p}.experts"),
                self.expert_count(cfg)?,
                ["w1", "w3", "w2"],
            )?,
            shared: None,
            selection_bias: Some(format!("{p}.expert_bias")),
        })
    }

    fn norm_topk(&self, cfg: &Config) -> Result<bool, ConvertError> {
        Ok(cfg.opt_bool("norm_topk_prob")?.unwrap_or(true))
    }

    fn tokenizer_pre(&self, detected: &'static str) -> &'static str {
        // LFM2's regex is Llama 3's; llama.cpp names the vocabulary `lfm2` (the same rules,
        // whole words looked up before merging, a BOS added).
        match detected {
            "llama-bpe" => "lfm2",
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> Config {
        Config { json }
    }

    #[test]
    fn layer_types_give_per_layer_kv_heads() {
        let c = cfg(
            serde_json::json!({"num_hidden_layers": 3, "num_key_value_heads": 2,
            "layer_types": ["conv", "full_attention", "conv"], "conv_L_cache": 3,
            "num_dense_layers": 1, "moe_intermediate_size": 8, "vocab_size": 10}),
        );
        let m = Lfm2Moe.metadata(&c).unwrap();
        let kv = &m
            .iter()
            .find(|(k, _)| k == "attention.head_count_kv")
            .unwrap()
            .1;
        let Value::Array(_, items) = kv else {
            panic!("not an array: {kv:?}")
        };
        let counts: Vec<u64> = items.iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(counts, [0, 2, 0]);
        let short = cfg(serde_json::json!({"num_hidden_layers": 2, "layer_types": ["conv"]}));
        assert!(conv_layers(&short).is_err());
        let odd = cfg(serde_json::json!({"num_hidden_layers": 1, "layer_types": ["mamba"]}));
        assert!(conv_layers(&odd).is_err());
    }
}
