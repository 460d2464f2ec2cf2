//! Qwen3-MoE: per-head q/k RMSNorm, explicit head_dim, no shared expert.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::qwen2_moe::{dense_mlp, is_sparse};
use super::{mlp_experts, ArchConverter, FfnSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct Qwen3Moe;

impl ArchConverter for Qwen3Moe {
    fn arch(&self) -> Arch {
        Arch::Qwen3Moe
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        Ok(vec![(
            "expert_feed_forward_length".into(),
            Value::U32(cfg.usize("moe_intermediate_size")? as u32),
        )])
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        if !is_sparse(cfg, l)? {
            return Ok(dense_mlp(l));
        }
        mlp_experts(cfg, ckpt, l, None)
    }

    fn norm_topk(&self, cfg: &Config) -> Result<bool, ConvertError> {
        Ok(cfg.opt_bool("norm_topk_prob")?.unwrap_or(false))
    }
}
