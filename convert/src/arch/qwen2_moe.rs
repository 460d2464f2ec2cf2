//! Qwen2-MoE (Qwen1.5-MoE): a sigmoid-gated shared expert, qkv biases, optional dense layers.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::{expert_count, mlp_experts, ArchConverter, ExpertMlp, FfnSource, SharedSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct Qwen2Moe;

/// transformers: a layer is sparse when it is not in `mlp_only_layers` and
/// `(layer + 1) % decoder_sparse_step == 0`.
pub(super) fn is_sparse(cfg: &Config, l: usize) -> Result<bool, ConvertError> {
    let n_expert = expert_count(cfg).unwrap_or(0);
    let step = cfg.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
    let dense_only = cfg.usize_list("mlp_only_layers")?;
    Ok(!dense_only.contains(&l) && n_expert > 0 && (l + 1).is_multiple_of(step))
}

pub(super) fn dense_mlp(l: usize) -> FfnSource {
    let p = format!("model.layers.{l}.mlp");
    FfnSource::Dense {
        gate: format!("{p}.gate_proj.weight"),
        up: format!("{p}.up_proj.weight"),
        down: format!("{p}.down_proj.weight"),
    }
}

impl ArchConverter for Qwen2Moe {
    fn arch(&self) -> Arch {
        Arch::Qwen2Moe
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let mut m = vec![(
            "expert_feed_forward_length".into(),
            Value::U32(cfg.usize("moe_intermediate_size")? as u32),
        )];
        if let Some(s) = cfg.opt_usize("shared_expert_intermediate_size")? {
            m.push((
                "expert_shared_feed_forward_length".into(),
                Value::U32(s as u32),
            ));
        }
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        if !is_sparse(cfg, l)? {
            return Ok(dense_mlp(l));
        }
        let p = format!("model.layers.{l}.mlp");
        let shared_size = cfg
            .opt_usize("shared_expert_intermediate_size")?
            .unwrap_or(0);
        let shared = (shared_size > 0).then(|| SharedSource {
            mlp: ExpertMlp::Separate {
                gate: format!("{p}.shared_expert.gate_proj.weight"),
                up: format!("{p}.shared_expert.up_proj.weight"),
                down: format!("{p}.shared_expert.down_proj.weight"),
            },
            gate: Some(format!("{p}.shared_expert_gate.weight")),
        });
        mlp_experts(cfg, ckpt, l, shared)
    }

    fn requires_output_tensor(&self) -> bool {
        true
    }

    fn norm_topk(&self, cfg: &Config) -> Result<bool, ConvertError> {
        Ok(cfg.opt_bool("norm_topk_prob")?.unwrap_or(false))
    }
}
