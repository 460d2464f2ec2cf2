//! SmallThinker (`smallthinker`: PowerInfer's SmallThinker-4BA0.6B, 21BA3B) as llama.cpp's
//! `smallthinker`: every layer is MoE (router `block_sparse_moe.primary_router`, ReGLU experts
//! `block_sparse_moe.experts.{e}.{gate,up,down}`), no shared expert, rotate-half rope (q/k not
//! permuted), routing by sigmoid of the top-k logits renormalised or by softmax over them
//! (`moe_primary_router_apply_softmax`). The router reads the layer's input before attention;
//! that is the runtime's business, the file is llama.cpp's.
//!
//! Per-layer attention: `rope_layout` (0 = NoPE) and `sliding_window_layout` (1 = sliding
//! window). llama.cpp stores neither list: a file with `attention.sliding_window` means layers
//! `il % 4 == 0` attend fully without rope and the others use the window with rope; without it
//! every layer is full attention with rope. Checkpoints whose lists say anything else are
//! refused rather than converted into a file that computes something different.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::{experts_at, ArchConverter, FfnSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct SmallThinker;

/// llama.cpp's fixed pattern when the file has a sliding window.
const PATTERN: usize = 4;

/// Whether the checkpoint uses sliding windows, after checking that its per-layer lists are
/// one of the two layouts llama.cpp can represent.
fn uses_sliding_window(cfg: &Config) -> Result<bool, ConvertError> {
    let n = cfg.usize("num_hidden_layers")?;
    let list = |key: &str, default: usize| -> Result<Vec<usize>, ConvertError> {
        let v = cfg.usize_list(key)?;
        if v.is_empty() {
            return Ok(vec![default; n]);
        }
        if v.len() != n {
            return Err(ConvertError::Config {
                field: key.into(),
                why: format!("has {} entries for {n} layers", v.len()),
            });
        }
        Ok(v)
    };
    let rope = list("rope_layout", 1)?;
    let swa = list("sliding_window_layout", 0)?;
    if swa.iter().all(|&s| s == 0) {
        if rope.iter().all(|&r| r != 0) {
            return Ok(false);
        }
    } else {
        let patterned = |i: usize| usize::from(!i.is_multiple_of(PATTERN));
        let ok = (0..n).all(|i| {
            usize::from(swa[i] != 0) == patterned(i) && usize::from(rope[i] != 0) == patterned(i)
        });
        if ok {
            return Ok(true);
        }
    }
    Err(ConvertError::Unsupported(format!(
        "SmallThinker layout rope_layout={rope:?} sliding_window_layout={swa:?}: llama.cpp's \
         smallthinker represents only all layers full attention with rope, or (with a sliding \
         window) layers l % {PATTERN} == 0 full attention without rope and the others a sliding \
         window with rope"
    )))
}

impl ArchConverter for SmallThinker {
    fn arch(&self) -> Arch {
        Arch::SmallThinker
    }

    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("moe_num_primary_experts")
    }

    fn expert_used_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("moe_num_active_primary_experts")
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let softmax = cfg
            .opt_bool("moe_primary_router_apply_softmax")?
            .unwrap_or(false);
        // llama.cpp's llama_expert_gating_func_type: 1 softmax, 2 sigmoid.
        let mut m = vec![
            (
                "expert_feed_forward_length".into(),
                Value::U32(cfg.usize("moe_ffn_hidden_size")? as u32),
            ),
            (
                "expert_gating_func".into(),
                Value::U32(if softmax { 1 } else { 2 }),
            ),
        ];
        if uses_sliding_window(cfg)? {
            m.push((
                "attention.sliding_window".into(),
                Value::U32(cfg.usize("sliding_window_size")? as u32),
            ));
        }
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        // llama.cpp's converter writes the expert width here too.
        cfg.usize("moe_ffn_hidden_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let p = format!("model.layers.{l}.block_sparse_moe");
        Ok(FfnSource::Moe {
            router: format!("{p}.primary_router.weight"),
            experts: experts_at(
                ckpt,
                &format!("{p}.experts"),
                self.expert_count(cfg)?,
                ["gate", "up", "down"],
            )?,
            shared: None,
            selection_bias: None,
        })
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        // Sigmoid weights are divided by their sum; softmax over the k logits equals the
        // renormalised softmax over all of them.
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
    fn layouts_llama_cpp_represents_are_accepted_and_others_refused() {
        let all_rope = cfg(
            serde_json::json!({"num_hidden_layers": 4, "rope_layout": [1, 1, 1, 1],
            "sliding_window_layout": [0, 0, 0, 0]}),
        );
        assert!(!uses_sliding_window(&all_rope).unwrap());
        let defaults = cfg(serde_json::json!({"num_hidden_layers": 4}));
        assert!(!uses_sliding_window(&defaults).unwrap());
        let patterned = cfg(serde_json::json!({"num_hidden_layers": 6,
            "rope_layout": [0, 1, 1, 1, 0, 1], "sliding_window_layout": [0, 1, 1, 1, 0, 1]}));
        assert!(uses_sliding_window(&patterned).unwrap());
        for (rope, swa) in [
            (
                serde_json::json!([1, 0, 1, 1]),
                serde_json::json!([0, 0, 0, 0]),
            ),
            (
                serde_json::json!([1, 1, 1, 1]),
                serde_json::json!([0, 1, 1, 1]),
            ),
            (
                serde_json::json!([0, 1, 1, 1]),
                serde_json::json!([0, 1, 0, 1]),
            ),
        ] {
            let c = cfg(
                serde_json::json!({"num_hidden_layers": 4, "rope_layout": rope,
                "sliding_window_layout": swa}),
            );
            let err = uses_sliding_window(&c).unwrap_err().to_string();
            assert!(err.contains("llama.cpp"), "{err}");
        }
    }
}
