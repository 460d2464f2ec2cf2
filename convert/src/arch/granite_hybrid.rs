//! IBM's Granite-4.0-H (`granitemoehybrid`) as llama.cpp's `granitehybrid`, following its
//! `GraniteHybridModel` converter (Mamba2Model's tensors beside GraniteMoeModel's).
//!
//! `layer_types` mixes Mamba-2 layers (`mamba`, transformers 5's `linear_attention`) with
//! attention (`attention` / `full_attention`); llama.cpp tells them apart by a per-layer
//! `attention.head_count_kv` of 0. A Mamba-2 layer writes `in_proj` as `ssm_in`, the depthwise
//! `conv1d` taps `[C, 1, K]` squeezed to `ssm_conv1d` `[C, K]` (kept f32) with its bias,
//! `dt_bias` as `ssm_dt.bias`, `A_log` as `ssm_a = -exp(A_log)` and `D` as `ssm_d` (both
//! `[1, n_heads]` in ggml dims), the gated norm as `ssm_norm` `[d_inner / n_groups, n_groups]`,
//! `out_proj` as `ssm_out`; keys `ssm.{conv_kernel, inner_size, state_size, time_step_rank
//! (heads), group_count}`. An attention layer is Granite's q/k/v/o (q/k permuted for ggml's
//! interleaved rope, as llama.cpp's converter does). Rope is on only with
//! `position_embedding_type` "rope": llama.cpp reads `rope.scaling.finetuned` as the switch,
//! and the released Granite-4.0-H models have none ("nope"). Every layer is MoE (softmax over
//! the top-k logits) with the fused `block_sparse_moe` experts of GraniteMoE plus a shared
//! SwiGLU expert (`shared_mlp.input_linear` gate then up halves, `output_linear`), and Granite's
//! multipliers.

use std::sync::Arc;

use moe_runtime::gguf::{Value, ValueType};
use moe_runtime::model::Arch;

use super::granitemoe::GraniteMoe;
use super::{ArchConverter, AttnTensor, ExpertMlp, ExpertSource, FfnSource, SharedSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::source::{Rearrange, Source};

pub struct GraniteHybrid;

/// The Mamba-2 geometry from the config (`mamba_*`).
#[derive(Clone, Copy, Debug)]
struct Mamba {
    d_inner: usize,
    d_state: usize,
    n_heads: usize,
    n_groups: usize,
    kernel: usize,
}

impl Mamba {
    fn of(cfg: &Config) -> Result<Self, ConvertError> {
        let d = cfg.usize("hidden_size")?;
        let m = Self {
            d_inner: cfg.opt_usize("mamba_expand")?.unwrap_or(2) * d,
            d_state: cfg.usize("mamba_d_state")?,
            n_heads: cfg.usize("mamba_n_heads")?,
            n_groups: cfg.opt_usize("mamba_n_groups")?.unwrap_or(1),
            kernel: cfg.usize("mamba_d_conv")?,
        };
        let bad = |field: &str, why: String| {
            Err(ConvertError::Config {
                field: field.into(),
                why,
            })
        };
        if m.n_heads == 0 || m.n_groups == 0 || !m.d_inner.is_multiple_of(m.n_heads) {
            return bad(
                "mamba_n_heads",
                format!("{} heads cannot split {} channels", m.n_heads, m.d_inner),
            );
        }
        if !m.n_heads.is_multiple_of(m.n_groups) {
            return bad(
                "mamba_n_groups",
                format!("{} groups cannot share {} heads", m.n_groups, m.n_heads),
            );
        }
        // "auto" (a string) is d_inner / n_heads.
        if let Some(h) = cfg.get("mamba_d_head").and_then(|v| v.as_u64()) {
            if h as usize * m.n_heads != m.d_inner {
                return bad(
                    "mamba_d_head",
                    format!("{h} x {} heads is not {} channels", m.n_heads, m.d_inner),
                );
            }
        }
        if m.d_inner != 2 * d {
            return bad(
                "mamba_expand",
                "must be 2: llama.cpp's granitehybrid supports no other expansion".into(),
            );
        }
        if cfg.opt_bool("mamba_proj_bias")?.unwrap_or(false) {
            return bad(
                "mamba_proj_bias",
                "is true; llama.cpp's granitehybrid has no in/out projection biases".into(),
            );
        }
        // transformers clamps softplus(dt) to time_step_limit in its chunked scan (not in its
        // one-token step); llama.cpp never clamps, so only the default (0, inf), a no-op after
        // the softplus, converts. Infinity is saved as {"__float__": "Infinity"}, not a number.
        if let Some(limit) = cfg.get("time_step_limit").and_then(|v| v.as_array()) {
            let low = limit.first().and_then(|v| v.as_f64()).unwrap_or(0.0);
            let high = limit.get(1).and_then(|v| v.as_f64());
            if low > 0.0 || high.is_some() {
                return bad(
                    "time_step_limit",
                    format!("is {limit:?}; llama.cpp's granitehybrid does not clamp dt"),
                );
            }
        }
        Ok(m)
    }

    fn conv_dim(&self) -> usize {
        self.d_inner + 2 * self.n_groups * self.d_state
    }
}

/// Whether each layer is Mamba-2 (`layer_types`, in the Hub's or transformers 5's names).
fn mamba_layers(cfg: &Config) -> Result<Vec<bool>, ConvertError> {
    let n_layer = cfg.usize("num_hidden_layers")?;
    let bad = |why: String| ConvertError::Config {
        field: "layer_types".into(),
        why,
    };
    let kinds: Vec<bool> = cfg
        .get("layer_types")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("is missing (one of mamba / attention per layer)".into()))?
        .iter()
        .map(|t| match t.as_str() {
            Some("mamba" | "linear_attention") => Ok(true),
            Some("attention" | "full_attention") => Ok(false),
            _ => Err(bad(format!("has {t}; expected mamba or attention"))),
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

/// `A_log` as llama.cpp stores it: `-exp(A_log)`.
#[derive(Debug)]
struct NegExp;

impl Rearrange for NegExp {
    fn apply(&self, values: &[f32]) -> Vec<f32> {
        values.iter().map(|v| -v.exp()).collect()
    }
}

impl ArchConverter for GraniteHybrid {
    fn arch(&self) -> Arch {
        Arch::GraniteHybrid
    }

    fn permute_qk(&self) -> bool {
        true
    }

    fn attention(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<Option<Vec<AttnTensor>>, ConvertError> {
        if !mamba_layers(cfg)?[l] {
            return Ok(None);
        }
        let d = cfg.usize("hidden_size")?;
        let m = Mamba::of(cfg)?;
        let (di, cd, nh, ng) = (m.d_inner, m.conv_dim(), m.n_heads, m.n_groups);
        let hf = |s: &str| format!("model.layers.{l}.mamba.{s}");
        let mut v = Vec::new();
        let mut put = |gguf: &str, name: String, hf_shape: &[usize], dims: Vec<usize>| {
            ckpt.expect_shape(&name, hf_shape)?;
            let source = match name.ends_with("A_log") {
                true => Source::Rearranged {
                    name,
                    how: Arc::new(NegExp),
                },
                false => Source::Tensor(name),
            };
            v.push(AttnTensor::new(gguf, dims, source));
            Ok::<_, ConvertError>(())
        };
        let proj = di + cd + nh;
        put(
            "ssm_in.weight",
            hf("in_proj.weight"),
            &[proj, d],
            vec![d, proj],
        )?;
        put(
            "ssm_conv1d.weight",
            hf("conv1d.weight"),
            &[cd, 1, m.kernel],
            vec![m.kernel, cd],
        )?;
        if ckpt.has(&hf("conv1d.bias")) {
            put("ssm_conv1d.bias", hf("conv1d.bias"), &[cd], vec![cd])?;
        }
        put("ssm_dt.bias", hf("dt_bias"), &[nh], vec![nh])?;
        put("ssm_a", hf("A_log"), &[nh], vec![1, nh])?;
        put("ssm_d", hf("D"), &[nh], vec![1, nh])?;
        put(
            "ssm_norm.weight",
            hf("norm.weight"),
            &[di],
            vec![di / ng, ng],
        )?;
        put(
            "ssm_out.weight",
            hf("out_proj.weight"),
            &[d, di],
            vec![di, d],
        )?;
        Ok(Some(v))
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let u = |x: usize| Value::U32(x as u32);
        let m = Mamba::of(cfg)?;
        let n_kv = cfg
            .opt_usize("num_key_value_heads")?
            .unwrap_or(cfg.usize("num_attention_heads")?);
        let per_layer = mamba_layers(cfg)?
            .into_iter()
            .map(|mamba| u(if mamba { 0 } else { n_kv }))
            .collect();
        let rope = match cfg.get("position_embedding_type").and_then(|v| v.as_str()) {
            Some("rope") => true,
            None | Some("nope") => false,
            Some(other) => {
                return Err(ConvertError::Config {
                    field: "position_embedding_type".into(),
                    why: format!("is `{other}`; expected rope or nope"),
                })
            }
        };
        // Granite's multipliers and head size as for GraniteMoE.
        let mut meta = GraniteMoe.metadata(cfg)?;
        meta.extend([
            (
                "attention.head_count_kv".into(),
                Value::Array(ValueType::U32, per_layer),
            ),
            (
                "expert_shared_feed_forward_length".into(),
                u(cfg.usize("shared_intermediate_size")?),
            ),
            ("ssm.conv_kernel".into(), u(m.kernel)),
            ("ssm.state_size".into(), u(m.d_state)),
            ("ssm.group_count".into(), u(m.n_groups)),
            ("ssm.inner_size".into(), u(m.d_inner)),
            ("ssm.time_step_rank".into(), u(m.n_heads)),
            ("rope.scaling.finetuned".into(), Value::Bool(rope)),
        ]);
        Ok(meta)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        if cfg.opt_usize("num_local_experts")?.unwrap_or(0) == 0 {
            return Err(ConvertError::Unsupported(
                "Granite-4.0-H without experts (a dense shared MLP only, granite-4.0-h-micro) \
                 is not supported: moe-edge runs MoE models"
                    .into(),
            ));
        }
        let p = format!("model.layers.{l}.block_sparse_moe");
        // The Hub's fused layout; transformers 5 names it experts.gate_up_proj in memory.
        let experts = match ckpt.has(&format!("{p}.experts.gate_up_proj")) {
            true => ExpertSource::Fused {
                gate_up: format!("{p}.experts.gate_up_proj"),
                down: format!("{p}.experts.down_proj"),
            },
            false => ExpertSource::Fused {
                gate_up: format!("{p}.input_linear.weight"),
                down: format!("{p}.output_linear.weight"),
            },
        };
        let router = match ckpt.has(&format!("{p}.router.weight")) {
            true => format!("{p}.router.weight"),
            false => format!("{p}.router.layer.weight"),
        };
        let s = format!("model.layers.{l}.shared_mlp");
        Ok(FfnSource::Moe {
            router,
            experts,
            shared: Some(SharedSource {
                mlp: ExpertMlp::Fused {
                    gate_up: format!("{s}.input_linear.weight"),
                    down: format!("{s}.output_linear.weight"),
                },
                gate: None,
            }),
            selection_bias: None,
        })
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        // The softmax over the top-k logits: renormalised softmax.
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
    fn layer_types_in_either_spelling_the_rope_switch_and_dt_limits() {
        let base = serde_json::json!({"num_hidden_layers": 3, "hidden_size": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10,
            "mamba_d_state": 4, "mamba_n_heads": 4, "mamba_n_groups": 2, "mamba_d_conv": 4,
            "mamba_d_head": "auto", "shared_intermediate_size": 8,
            "layer_types": ["mamba", "attention", "mamba"]});
        let mut v5 = base.clone();
        v5["layer_types"] =
            serde_json::json!(["linear_attention", "full_attention", "linear_attention"]);
        for c in [cfg(base.clone()), cfg(v5)] {
            let m = GraniteHybrid.metadata(&c).unwrap();
            let get = |k: &str| m.iter().find(|(n, _)| n == k).unwrap().1.clone();
            let Value::Array(_, items) = get("attention.head_count_kv") else {
                panic!("not an array")
            };
            let counts: Vec<u64> = items.iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(counts, [0, 1, 0]);
            assert_eq!(get("ssm.inner_size").as_u64(), Some(16));
            assert_eq!(get("ssm.time_step_rank").as_u64(), Some(4));
            assert_eq!(get("ssm.group_count").as_u64(), Some(2));
            assert_eq!(get("rope.scaling.finetuned").as_bool(), Some(false));
        }
        let mut roped = base.clone();
        roped["position_embedding_type"] = serde_json::json!("rope");
        let m = GraniteHybrid.metadata(&cfg(roped)).unwrap();
        let switch = m
            .iter()
            .find(|(n, _)| n == "rope.scaling.finetuned")
            .unwrap();
        assert_eq!(switch.1.as_bool(), Some(true));
        let mut odd = base.clone();
        odd["position_embedding_type"] = serde_json::json!("alibi");
        assert!(GraniteHybrid.metadata(&cfg(odd)).is_err());

        let mut clamped = base.clone();
        clamped["time_step_limit"] = serde_json::json!([0.0, 0.1]);
        assert!(GraniteHybrid.metadata(&cfg(clamped)).is_err());
        let mut saved = base.clone();
        saved["time_step_limit"] = serde_json::json!([0.0, {"__float__": "Infinity"}]);
        assert!(GraniteHybrid.metadata(&cfg(saved)).is_ok());

        let odd = cfg(serde_json::json!({"num_hidden_layers": 1, "layer_types": ["conv"]}));
        assert!(mamba_layers(&odd).is_err());
        let short = cfg(serde_json::json!({"num_hidden_layers": 2, "layer_types": ["mamba"]}));
        assert!(mamba_layers(&short).is_err());
    }
}
