//! DeepSeek-V2 (`deepseek_v2`) and the V3 architecture (`deepseek_v3`: DeepSeek-V3, Moonlight,
//! Kimi-K2) as llama.cpp's `deepseek2`: multi-head latent attention with `kv_b_proj` split into
//! `attn_k_b` (transposed, for absorbing into the query) and `attn_v_b`, dense leading layers,
//! shared experts, and the routing keys. Follows llama.cpp's `DeepseekV2Model` converter, with
//! the differences noted where transformers (the reference) disagrees with it.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use std::sync::Arc;

use super::{
    experts_at, yarn_params, ArchConverter, AttnTensor, ExpertMlp, FfnSource, SharedSource,
};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::source::{Rearrange, Source};

/// Which transformers model: V2 routes with softmax (greedy or group-limited by the best expert
/// of each group), V3 with sigmoid scores, a selection bias and groups scored by their best two.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V2,
    V3,
}

pub struct Deepseek2(pub Version);

struct Dims {
    n_head: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    nope: usize,
    rope: usize,
    v: usize,
}

fn dims(cfg: &Config) -> Result<Dims, ConvertError> {
    Ok(Dims {
        n_head: cfg.usize("num_attention_heads")?,
        q_lora_rank: cfg.opt_usize("q_lora_rank")?.filter(|r| *r > 0),
        kv_lora_rank: cfg.usize("kv_lora_rank")?,
        nope: cfg.usize("qk_nope_head_dim")?,
        rope: cfg.usize("qk_rope_head_dim")?,
        v: cfg.usize("v_head_dim")?,
    })
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (Hub configs).
fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl Deepseek2 {
    fn rope_metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let Some(p) = yarn_params(cfg)? else {
            return Ok(vec![]);
        };
        let f = |k: &str| p.get(k).and_then(|v| v.as_f64());
        let bad = |why: String| ConvertError::Config {
            field: "rope_parameters".into(),
            why,
        };
        if p.get("truncate").and_then(|v| v.as_bool()) == Some(false) {
            return Err(bad("YaRN with truncate=false is not supported".into()));
        }
        let orig = f("original_max_position_embeddings")
            .ok_or_else(|| bad("yarn needs original_max_position_embeddings".into()))?;
        // transformers: a missing factor is max_position_embeddings / original.
        let factor = match f("factor") {
            Some(x) => x,
            None => cfg.usize("max_position_embeddings")? as f64 / orig,
        };
        let mut m = vec![
            ("rope.scaling.type".into(), Value::String("yarn".into())),
            ("rope.scaling.factor".into(), Value::F32(factor as f32)),
            (
                "rope.scaling.original_context_length".into(),
                Value::U32(orig as u32),
            ),
        ];
        if let Some(b) = f("beta_fast") {
            m.push(("rope.scaling.yarn_beta_fast".into(), Value::F32(b as f32)));
        }
        if let Some(b) = f("beta_slow") {
            m.push(("rope.scaling.yarn_beta_slow".into(), Value::F32(b as f32)));
        }
        // transformers' cos/sin factor, and the one a reader infers from the file (llama.cpp
        // assumes mscale == mscale_all_dim when the log multiplier is present).
        let mscale = f("mscale").filter(|x| *x != 0.0);
        let mscale_all_dim = f("mscale_all_dim").filter(|x| *x != 0.0);
        let hf_factor = match (f("attention_factor"), mscale, mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(ms), Some(ma)) => yarn_get_mscale(factor, ms) / yarn_get_mscale(factor, ma),
            _ => yarn_get_mscale(factor, 1.0),
        };
        let implied = if let Some(ma) = mscale_all_dim {
            // llama.cpp's [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: the key holds 0.1 * mscale_all_dim.
            m.push((
                "rope.scaling.yarn_log_multiplier".into(),
                Value::F32((0.1 * ma) as f32),
            ));
            1.0
        } else {
            yarn_get_mscale(factor, 1.0)
        };
        if (hf_factor - implied).abs() > 1e-7 {
            m.push((
                "rope.scaling.yarn_attn_factor".into(),
                Value::F32(hf_factor as f32),
            ));
        }
        Ok(m)
    }
}

impl ArchConverter for Deepseek2 {
    fn arch(&self) -> Arch {
        Arch::Deepseek2
    }

    fn handles_rope_scaling(&self) -> bool {
        true
    }

    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("n_routed_experts")
    }

    /// MLA is cached as a single latent "head" (llama.cpp writes head_count_kv = 1).
    fn head_count_kv(&self, _cfg: &Config) -> Result<usize, ConvertError> {
        Ok(1)
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let d = dims(cfg)?;
        let u = |x: usize| Value::U32(x as u32);
        if self.0 == Version::V3 && cfg.opt_bool("rope_interleave")? == Some(false) {
            return Err(ConvertError::Unsupported(
                "deepseek_v3 with rope_interleave=false is not supported (llama.cpp's deepseek2 \
                 ropes interleaved pairs)"
                    .into(),
            ));
        }
        let mut m = vec![
            (
                "leading_dense_block_count".into(),
                u(cfg.opt_usize("first_k_dense_replace")?.unwrap_or(0)),
            ),
            ("vocab_size".into(), u(cfg.usize("vocab_size")?)),
            // llama.cpp's converter omits this without q LoRA, but its loader then requires it
            // unless the model has 26 or 27 layers (V2-Lite); 0 means "no q LoRA" to both.
            (
                "attention.q_lora_rank".into(),
                u(d.q_lora_rank.unwrap_or(0)),
            ),
            ("attention.kv_lora_rank".into(), u(d.kv_lora_rank)),
            ("attention.key_length".into(), u(d.kv_lora_rank + d.rope)),
            ("attention.value_length".into(), u(d.kv_lora_rank)),
            ("attention.key_length_mla".into(), u(d.nope + d.rope)),
            ("attention.value_length_mla".into(), u(d.v)),
            (
                "expert_feed_forward_length".into(),
                u(cfg.usize("moe_intermediate_size")?),
            ),
            (
                "expert_shared_count".into(),
                u(cfg.opt_usize("n_shared_experts")?.unwrap_or(0)),
            ),
            ("rope.dimension_count".into(), u(d.rope)),
        ];
        if let Some(s) = cfg.opt_f64("routed_scaling_factor")? {
            m.push(("expert_weights_scale".into(), Value::F32(s as f32)));
        }
        let n_group = cfg.opt_usize("n_group")?.unwrap_or(1);
        let topk_group = cfg.opt_usize("topk_group")?.unwrap_or(n_group);
        match self.0 {
            Version::V2 => {
                // transformers' V2 ignores scoring_func: always softmax.
                m.push(("expert_gating_func".into(), u(1)));
                let method = cfg
                    .get("topk_method")
                    .and_then(|v| v.as_str())
                    .unwrap_or("greedy");
                match method {
                    "greedy" => {}
                    "group_limited_greedy" => {
                        m.push(("expert_group_count".into(), u(n_group)));
                        m.push(("expert_group_used_count".into(), u(topk_group)));
                        // moe-edge's own key: V2 scores a group by its best expert, where
                        // llama.cpp (which ignores this key) sums the best two.
                        m.push(("expert_group_score".into(), Value::String("max".into())));
                    }
                    other => {
                        return Err(ConvertError::Config {
                            field: "topk_method".into(),
                            why: format!("is `{other}`; supported: greedy, group_limited_greedy"),
                        })
                    }
                }
            }
            Version::V3 => {
                // transformers' V3 always uses sigmoid scores; its config has no scoring_func,
                // so llama.cpp's converter would leave the key out and run softmax.
                if let Some(f) = cfg.get("scoring_func").and_then(|v| v.as_str()) {
                    if f != "sigmoid" {
                        return Err(ConvertError::Config {
                            field: "scoring_func".into(),
                            why: format!("is `{f}`; deepseek_v3 routes with sigmoid"),
                        });
                    }
                }
                m.push(("expert_gating_func".into(), u(2)));
                m.push(("expert_group_count".into(), u(n_group)));
                m.push(("expert_group_used_count".into(), u(topk_group)));
            }
        }
        m.extend(self.rope_metadata(cfg)?);
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn attention(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<Option<Vec<AttnTensor>>, ConvertError> {
        let d = dims(cfg)?;
        let hidden = cfg.usize("hidden_size")?;
        let p = |s: &str| format!("model.layers.{l}.self_attn.{s}");
        let t = |s: &str| Source::Tensor(p(s));
        let dqk = d.nope + d.rope;
        let (r, h) = (d.kv_lora_rank, d.n_head);
        let mut out = Vec::new();
        if ckpt.has(&p("q_a_proj.bias")) || ckpt.has(&p("kv_a_proj_with_mqa.bias")) {
            return Err(ConvertError::Unsupported(
                "DeepSeek checkpoints with attention_bias are not supported".into(),
            ));
        }
        match d.q_lora_rank {
            Some(qr) => {
                ckpt.expect_shape(&p("q_a_proj.weight"), &[qr, hidden])?;
                ckpt.expect_shape(&p("q_a_layernorm.weight"), &[qr])?;
                ckpt.expect_shape(&p("q_b_proj.weight"), &[h * dqk, qr])?;
                out.push(AttnTensor::new(
                    "attn_q_a.weight",
                    vec![hidden, qr],
                    t("q_a_proj.weight"),
                ));
                out.push(AttnTensor::new(
                    "attn_q_a_norm.weight",
                    vec![qr],
                    t("q_a_layernorm.weight"),
                ));
                out.push(AttnTensor::new(
                    "attn_q_b.weight",
                    vec![qr, h * dqk],
                    t("q_b_proj.weight"),
                ));
            }
            None => {
                ckpt.expect_shape(&p("q_proj.weight"), &[h * dqk, hidden])?;
                out.push(AttnTensor::new(
                    "attn_q.weight",
                    vec![hidden, h * dqk],
                    t("q_proj.weight"),
                ));
            }
        }
        ckpt.expect_shape(&p("kv_a_proj_with_mqa.weight"), &[r + d.rope, hidden])?;
        ckpt.expect_shape(&p("kv_a_layernorm.weight"), &[r])?;
        ckpt.expect_shape(&p("kv_b_proj.weight"), &[h * (d.nope + d.v), r])?;
        ckpt.expect_shape(&p("o_proj.weight"), &[hidden, h * d.v])?;
        out.push(AttnTensor::new(
            "attn_kv_a_mqa.weight",
            vec![hidden, r + d.rope],
            t("kv_a_proj_with_mqa.weight"),
        ));
        out.push(AttnTensor::new(
            "attn_kv_a_norm.weight",
            vec![r],
            t("kv_a_layernorm.weight"),
        ));
        let kv_b = |part_k: bool| Source::Rearranged {
            name: p("kv_b_proj.weight"),
            how: Arc::new(SplitKvB {
                n_head: h,
                nope: d.nope,
                v: d.v,
                rank: r,
                key: part_k,
            }),
        };
        out.push(AttnTensor::new(
            "attn_k_b.weight",
            vec![d.nope, r, h],
            kv_b(true),
        ));
        out.push(AttnTensor::new(
            "attn_v_b.weight",
            vec![r, d.v, h],
            kv_b(false),
        ));
        out.push(AttnTensor::new(
            "attn_output.weight",
            vec![h * d.v, hidden],
            t("o_proj.weight"),
        ));
        Ok(Some(out))
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let p = format!("model.layers.{l}.mlp");
        // transformers: layers below first_k_dense_replace are dense (moe_layer_freq is unused
        // by both transformers and llama.cpp).
        if l < cfg.opt_usize("first_k_dense_replace")?.unwrap_or(0) {
            return Ok(FfnSource::Dense {
                gate: format!("{p}.gate_proj.weight"),
                up: format!("{p}.up_proj.weight"),
                down: format!("{p}.down_proj.weight"),
            });
        }
        let n_shared = cfg.opt_usize("n_shared_experts")?.unwrap_or(0);
        let shared = (n_shared > 0).then(|| SharedSource {
            mlp: ExpertMlp::Separate {
                gate: format!("{p}.shared_experts.gate_proj.weight"),
                up: format!("{p}.shared_experts.up_proj.weight"),
                down: format!("{p}.shared_experts.down_proj.weight"),
            },
            gate: None,
        });
        let bias = format!("{p}.gate.e_score_correction_bias");
        let selection_bias = match self.0 {
            Version::V3 if ckpt.has(&bias) => Some(bias),
            _ => None,
        };
        Ok(FfnSource::Moe {
            router: format!("{p}.gate.weight"),
            experts: experts_at(
                ckpt,
                &format!("{p}.experts"),
                self.expert_count(cfg)?,
                ["gate_proj", "up_proj", "down_proj"],
            )?,
            shared,
            selection_bias,
        })
    }

    fn requires_output_tensor(&self) -> bool {
        false
    }

    fn norm_topk(&self, cfg: &Config) -> Result<bool, ConvertError> {
        Ok(match self.0 {
            // transformers' V2 router never renormalises (norm_topk_prob is unused there).
            Version::V2 => false,
            Version::V3 => cfg.opt_bool("norm_topk_prob")?.unwrap_or(true),
        })
    }
}

/// MLA's `kv_b_proj` (`[n_head * (nope + v), rank]`, per head the key rows then the value rows)
/// split as llama.cpp does: `key` gives W_kb transposed per head (`[n_head, rank, nope]`),
/// otherwise W_vb (`[n_head, v, rank]`).
#[derive(Debug)]
struct SplitKvB {
    n_head: usize,
    nope: usize,
    v: usize,
    rank: usize,
    key: bool,
}

impl Rearrange for SplitKvB {
    fn apply(&self, values: &[f32]) -> Vec<f32> {
        split_kv_b(values, self.n_head, self.nope, self.v, self.rank, self.key)
    }
}

/// llama.cpp's `kv_b.view(n_head, nope + v, rank)` split into `k_b.transpose(1, 2)` or `v_b`.
fn split_kv_b(w: &[f32], n_head: usize, nope: usize, v: usize, rank: usize, key: bool) -> Vec<f32> {
    let per_head = (nope + v) * rank;
    let mut out = Vec::with_capacity(n_head * if key { nope } else { v } * rank);
    for h in 0..n_head {
        let head = &w[h * per_head..(h + 1) * per_head];
        if key {
            // [rank, nope]: out[i][j] = k_b[j][i]
            for i in 0..rank {
                out.extend((0..nope).map(|j| head[j * rank + i]));
            }
        } else {
            out.extend_from_slice(&head[nope * rank..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn kv_b_split_transposes_keys_per_head() {
        // 2 heads, nope 2, v 1, rank 3: per head rows k0 k1 v0 of 3 values.
        let w: Vec<f32> = (0..18).map(|x| x as f32).collect();
        let k = super::split_kv_b(&w, 2, 2, 1, 3, true);
        assert_eq!(k, vec![0., 3., 1., 4., 2., 5., 9., 12., 10., 13., 11., 14.]);
        let v = super::split_kv_b(&w, 2, 2, 1, 3, false);
        assert_eq!(v, vec![6., 7., 8., 15., 16., 17.]);
    }
}
