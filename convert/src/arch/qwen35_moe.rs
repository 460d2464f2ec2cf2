//! Qwen3.5-MoE (`qwen3_5_moe`: Qwen3.5/3.6-35B-A3B's language model, `qwen3_5_moe_text` in
//! transformers) as llama.cpp's `qwen35moe`, following its `Qwen3_5MoeTextModel` converter
//! (`_LinearAttentionVReorderBase` over `Qwen3NextModel`).
//!
//! `layer_types` mixes Gated DeltaNet layers (`linear_attention`, written as
//! `attention.recurrent_layers`) with gated full attention:
//! - a DeltaNet layer writes `in_proj_qkv` as `attn_qkv`, `in_proj_z` as `attn_gate`, the
//!   depthwise `conv1d` taps `[C, 1, K]` squeezed to `ssm_conv1d` `[C, K]` (kept f32),
//!   `in_proj_b`/`in_proj_a` as `ssm_beta`/`ssm_alpha`, `dt_bias` as `ssm_dt.bias`, `A_log` as
//!   `ssm_a = -exp(A_log)`, the gated norm as `ssm_norm`, `out_proj` as `ssm_out`. With fewer key
//!   heads than value heads, transformers gives each key head `r = nv / nk` consecutive value
//!   heads (grouped order); llama.cpp repeats key heads by tiling (value head `j` reads key head
//!   `j % nk`), so every value-head axis is reordered from grouped to tiled: the value rows of
//!   `attn_qkv` and the conv, `attn_gate`, `ssm_beta`, `ssm_alpha`, `ssm_dt`, `ssm_a`, and the
//!   columns of `ssm_out`;
//! - a full-attention layer's `q_proj` holds each head's query and output gate
//!   (`[n_head * 2 * head_dim, d]`, written as is to `attn_q`), then k/v/o and per-head q/k norms.
//!
//! Every RMSNorm except the DeltaNet's gated one multiplies by `1 + weight` in transformers;
//! llama.cpp's converter stores `weight + 1`. Every layer is MoE (softmax top-k renormalised,
//! hard-coded in llama.cpp) with a sigmoid-gated shared expert.

use std::sync::Arc;

use moe_runtime::gguf::{Value, ValueType};
use moe_runtime::model::Arch;

use super::{mlp_experts, ArchConverter, AttnTensor, ExpertMlp, FfnSource, SharedSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::source::{Rearrange, Source};

pub struct Qwen35Moe;

/// Qwen3.5's M-RoPE sections when the config has none (transformers' and llama.cpp's default).
const DEFAULT_MROPE_SECTION: [i32; 4] = [11, 11, 10, 0];

/// The DeltaNet geometry from the config.
#[derive(Clone, Copy, Debug)]
struct Gdn {
    nk: usize,
    nv: usize,
    dk: usize,
    dv: usize,
    kernel: usize,
}

impl Gdn {
    fn of(cfg: &Config) -> Result<Self, ConvertError> {
        let g = Self {
            nk: cfg.usize("linear_num_key_heads")?,
            nv: cfg.usize("linear_num_value_heads")?,
            dk: cfg.usize("linear_key_head_dim")?,
            dv: cfg.usize("linear_value_head_dim")?,
            kernel: cfg.usize("linear_conv_kernel_dim")?,
        };
        if g.nk == 0 || g.nv == 0 || !g.nv.is_multiple_of(g.nk) {
            return Err(ConvertError::Config {
                field: "linear_num_value_heads".into(),
                why: format!(
                    "{} value heads cannot share {} key heads evenly",
                    g.nv, g.nk
                ),
            });
        }
        Ok(g)
    }

    fn key_dim(&self) -> usize {
        self.nk * self.dk
    }

    fn value_dim(&self) -> usize {
        self.nv * self.dv
    }

    fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }

    /// Reorders the value heads of one axis of `rows x cols` row-major values, `head` entries
    /// per head, starting `skip` entries in (the q and k channels before them stay).
    fn tiled(&self, axis: Axis, skip: usize, head: usize, rows: usize, cols: usize) -> VHeads {
        VHeads {
            nk: self.nk,
            per_k: self.nv / self.nk,
            head,
            skip,
            axis,
            rows,
            cols,
            neg_exp: false,
        }
    }
}

/// Which axis of a matrix carries the value heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Axis {
    Rows,
    Cols,
}

/// llama.cpp's `_reorder_v_heads`: value heads from grouped order (key head `g`'s value heads
/// `g * r .. g * r + r`) to tiled order (value head `j * nk + g` is grouped head `g * r + j`),
/// optionally followed by `-exp(x)` (`A_log` to `ssm_a`).
#[derive(Clone, Copy, Debug)]
struct VHeads {
    nk: usize,
    per_k: usize,
    head: usize,
    skip: usize,
    axis: Axis,
    rows: usize,
    cols: usize,
    neg_exp: bool,
}

impl VHeads {
    /// The grouped index that tiled index `i` (along the reordered axis) takes its values from.
    fn source(&self, i: usize) -> usize {
        if i < self.skip {
            return i;
        }
        let (h, within) = ((i - self.skip) / self.head, (i - self.skip) % self.head);
        let (j, g) = (h / self.nk, h % self.nk);
        self.skip + (g * self.per_k + j) * self.head + within
    }
}

impl Rearrange for VHeads {
    fn apply(&self, values: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; values.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let (sr, sc) = match self.axis {
                    Axis::Rows => (self.source(r), c),
                    Axis::Cols => (r, self.source(c)),
                };
                out[r * self.cols + c] = values[sr * self.cols + sc];
            }
        }
        if self.neg_exp {
            out.iter_mut().for_each(|v| *v = -v.exp());
        }
        out
    }
}

/// Qwen3.5's `1 + weight` norms as llama.cpp stores them.
#[derive(Debug)]
struct PlusOne;

impl Rearrange for PlusOne {
    fn apply(&self, values: &[f32]) -> Vec<f32> {
        values.iter().map(|v| v + 1.0).collect()
    }
}

fn plus_one(name: String) -> Source {
    Source::Rearranged {
        name,
        how: Arc::new(PlusOne),
    }
}

/// Whether each layer is a Gated DeltaNet (`layer_types`, or transformers' default of every
/// `full_attention_interval`-th layer full attention).
fn recurrent_layers(cfg: &Config) -> Result<Vec<bool>, ConvertError> {
    let n_layer = cfg.usize("num_hidden_layers")?;
    let Some(types) = cfg.get("layer_types") else {
        let interval = full_attention_interval(cfg)?;
        return Ok((0..n_layer).map(|i| (i + 1) % interval != 0).collect());
    };
    let bad = |why: String| ConvertError::Config {
        field: "layer_types".into(),
        why,
    };
    let kinds: Vec<bool> = types
        .as_array()
        .ok_or_else(|| bad("is not a list".into()))?
        .iter()
        .map(|t| match t.as_str() {
            Some("linear_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(bad(format!(
                "has {t}; expected linear_attention or full_attention"
            ))),
        })
        .collect::<Result<_, _>>()?;
    if kinds.len() != n_layer {
        return Err(bad(format!(
            "has {} entries for {n_layer} layers",
            kinds.len()
        )));
    }
    Ok(kinds)
}

fn full_attention_interval(cfg: &Config) -> Result<usize, ConvertError> {
    match cfg.opt_usize("full_attention_interval")?.unwrap_or(4) {
        0 => Err(ConvertError::Config {
            field: "full_attention_interval".into(),
            why: "is 0".into(),
        }),
        i => Ok(i),
    }
}

/// `rope_parameters` (transformers 5) or the top level (older configs).
fn rope_param<'c>(cfg: &'c Config, key: &str) -> Option<&'c serde_json::Value> {
    cfg.get("rope_parameters")
        .and_then(|p| p.get(key))
        .or_else(|| cfg.get(key))
        .filter(|v| !v.is_null())
}

fn head_dim(cfg: &Config) -> Result<usize, ConvertError> {
    Ok(match cfg.opt_usize("head_dim")? {
        Some(h) => h,
        None => cfg.usize("hidden_size")? / cfg.usize("num_attention_heads")?.max(1),
    })
}

impl ArchConverter for Qwen35Moe {
    fn arch(&self) -> Arch {
        Arch::Qwen35Moe
    }

    fn norm_source(&self, name: String) -> Source {
        plus_one(name)
    }

    fn attention(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<Option<Vec<AttnTensor>>, ConvertError> {
        let d = cfg.usize("hidden_size")?;
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        if recurrent_layers(cfg)?[l] {
            let g = Gdn::of(cfg)?;
            let a = |s: &str| hf(&format!("linear_attn.{s}"));
            let (cd, vd, qk) = (g.conv_dim(), g.value_dim(), 2 * g.key_dim());
            let mut v = Vec::new();
            let mut put = |gguf: &str, hf_name: String, hf_shape: &[usize], dims, how: VHeads| {
                ckpt.expect_shape(&hf_name, hf_shape)?;
                let source = match g.nk == g.nv && !how.neg_exp {
                    true => Source::Tensor(hf_name),
                    false => Source::Rearranged {
                        name: hf_name,
                        how: Arc::new(how),
                    },
                };
                v.push(AttnTensor::new(gguf, dims, source));
                Ok::<_, ConvertError>(())
            };
            put(
                "attn_qkv.weight",
                a("in_proj_qkv.weight"),
                &[cd, d],
                vec![d, cd],
                g.tiled(Axis::Rows, qk, g.dv, cd, d),
            )?;
            put(
                "attn_gate.weight",
                a("in_proj_z.weight"),
                &[vd, d],
                vec![d, vd],
                g.tiled(Axis::Rows, 0, g.dv, vd, d),
            )?;
            put(
                "ssm_conv1d.weight",
                a("conv1d.weight"),
                &[cd, 1, g.kernel],
                vec![g.kernel, cd],
                g.tiled(Axis::Rows, qk, g.dv, cd, g.kernel),
            )?;
            put(
                "ssm_dt.bias",
                a("dt_bias"),
                &[g.nv],
                vec![g.nv],
                g.tiled(Axis::Rows, 0, 1, g.nv, 1),
            )?;
            put(
                "ssm_a",
                a("A_log"),
                &[g.nv],
                vec![g.nv],
                VHeads {
                    neg_exp: true,
                    ..g.tiled(Axis::Rows, 0, 1, g.nv, 1)
                },
            )?;
            put(
                "ssm_beta.weight",
                a("in_proj_b.weight"),
                &[g.nv, d],
                vec![d, g.nv],
                g.tiled(Axis::Rows, 0, 1, g.nv, d),
            )?;
            put(
                "ssm_alpha.weight",
                a("in_proj_a.weight"),
                &[g.nv, d],
                vec![d, g.nv],
                g.tiled(Axis::Rows, 0, 1, g.nv, d),
            )?;
            put(
                "ssm_out.weight",
                a("out_proj.weight"),
                &[d, vd],
                vec![vd, d],
                g.tiled(Axis::Cols, 0, g.dv, d, vd),
            )?;
            // One weight vector shared by every value head: no reordering.
            ckpt.expect_shape(&a("norm.weight"), &[g.dv])?;
            v.push(AttnTensor::new(
                "ssm_norm.weight",
                vec![g.dv],
                Source::Tensor(a("norm.weight")),
            ));
            return Ok(Some(v));
        }
        let n_head = cfg.usize("num_attention_heads")?;
        let n_kv = cfg.usize("num_key_value_heads")?;
        let hd = head_dim(cfg)?;
        let a = |s: &str| hf(&format!("self_attn.{s}"));
        let mut v = Vec::new();
        // q_proj: each head's query then its output gate, as llama.cpp reads attn_q.
        for (name, gg, rows, cols) in [
            ("q_proj.weight", "attn_q.weight", 2 * n_head * hd, d),
            ("k_proj.weight", "attn_k.weight", n_kv * hd, d),
            ("v_proj.weight", "attn_v.weight", n_kv * hd, d),
            ("o_proj.weight", "attn_output.weight", d, n_head * hd),
        ] {
            ckpt.expect_shape(&a(name), &[rows, cols])?;
            v.push(AttnTensor::new(
                gg,
                vec![cols, rows],
                Source::Tensor(a(name)),
            ));
        }
        if cfg.opt_bool("attention_bias")?.unwrap_or(false) {
            return Err(ConvertError::Config {
                field: "attention_bias".into(),
                why: "is true; llama.cpp's qwen35moe has no attention biases".into(),
            });
        }
        for (name, gg) in [
            ("q_norm.weight", "attn_q_norm.weight"),
            ("k_norm.weight", "attn_k_norm.weight"),
        ] {
            ckpt.expect_shape(&a(name), &[hd])?;
            v.push(AttnTensor::new(gg, vec![hd], plus_one(a(name))));
        }
        Ok(Some(v))
    }

    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("num_experts")
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let u = |x: usize| Value::U32(x as u32);
        let g = Gdn::of(cfg)?;
        let hd = head_dim(cfg)?;
        let factor = rope_param(cfg, "partial_rotary_factor")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.25);
        let rope_dim = (hd as f64 * factor) as usize;
        let sections: Vec<Value> =
            match rope_param(cfg, "mrope_section").and_then(|v| v.as_array()) {
                Some(s) => {
                    let mut s: Vec<i32> = s
                        .iter()
                        .map(|v| v.as_i64().map(|x| x as i32))
                        .collect::<Option<_>>()
                        .ok_or_else(|| ConvertError::Config {
                            field: "rope_parameters.mrope_section".into(),
                            why: "must be a list of integers".into(),
                        })?;
                    s.resize(4, 0);
                    s
                }
                None => DEFAULT_MROPE_SECTION.to_vec(),
            }
            .into_iter()
            .map(Value::I32)
            .collect();
        let recurrent = recurrent_layers(cfg)?
            .into_iter()
            .map(Value::Bool)
            .collect();
        Ok(vec![
            (
                "expert_feed_forward_length".into(),
                u(cfg.usize("moe_intermediate_size")?),
            ),
            (
                "expert_shared_feed_forward_length".into(),
                u(cfg.usize("shared_expert_intermediate_size")?),
            ),
            ("ssm.conv_kernel".into(), u(g.kernel)),
            ("ssm.state_size".into(), u(g.dk)),
            ("ssm.group_count".into(), u(g.nk)),
            ("ssm.time_step_rank".into(), u(g.nv)),
            ("ssm.inner_size".into(), u(g.value_dim())),
            (
                "attention.recurrent_layers".into(),
                Value::Array(ValueType::Bool, recurrent),
            ),
            (
                "full_attention_interval".into(),
                u(full_attention_interval(cfg)?),
            ),
            ("rope.dimension_count".into(), u(rope_dim)),
            (
                "rope.dimension_sections".into(),
                Value::Array(ValueType::I32, sections),
            ),
            ("attention.key_length".into(), u(hd)),
            ("attention.value_length".into(), u(hd)),
        ])
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        // Qwen3.5 has no dense MLP; llama.cpp reads the experts' width from its own key.
        cfg.usize("moe_intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let p = format!("model.layers.{l}.mlp");
        let shared = SharedSource {
            mlp: ExpertMlp::Separate {
                gate: format!("{p}.shared_expert.gate_proj.weight"),
                up: format!("{p}.shared_expert.up_proj.weight"),
                down: format!("{p}.shared_expert.down_proj.weight"),
            },
            gate: Some(format!("{p}.shared_expert_gate.weight")),
        };
        mlp_experts(cfg, ckpt, l, Some(shared))
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        // transformers' Qwen3_5MoeTopKRouter always renormalises (no norm_topk_prob).
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_heads_go_from_grouped_to_tiled() {
        // 2 key heads, 4 value heads of 1: grouped [g0v0 g0v1 g1v0 g1v1] -> tiled
        // [g0v0 g1v0 g0v1 g1v1] (llama.cpp's _reorder_v_heads).
        let g = Gdn {
            nk: 2,
            nv: 4,
            dk: 1,
            dv: 1,
            kernel: 1,
        };
        let rows = g.tiled(Axis::Rows, 0, 1, 4, 1);
        assert_eq!(rows.apply(&[0.0, 1.0, 2.0, 3.0]), [0.0, 2.0, 1.0, 3.0]);
        // Heads of 2 entries after 1 kept entry, as columns of a 1-row matrix.
        let cols = g.tiled(Axis::Cols, 1, 2, 1, 9);
        let v: Vec<f32> = (0..9).map(|x| x as f32).collect();
        assert_eq!(
            cols.apply(&v),
            [0.0, 1.0, 2.0, 5.0, 6.0, 3.0, 4.0, 7.0, 8.0]
        );
        let a = VHeads {
            neg_exp: true,
            ..g.tiled(Axis::Rows, 0, 1, 4, 1)
        };
        assert_eq!(a.apply(&[0.0; 4]), [-1.0; 4]);
    }

    #[test]
    fn layer_types_or_the_interval_give_recurrent_layers() {
        let c = Config {
            json: serde_json::json!({"num_hidden_layers": 8}),
        };
        assert_eq!(
            recurrent_layers(&c).unwrap(),
            [true, true, true, false, true, true, true, false]
        );
        let c = Config {
            json: serde_json::json!({"num_hidden_layers": 2,
                "layer_types": ["linear_attention", "mamba"]}),
        };
        assert!(recurrent_layers(&c).is_err());
    }
}
