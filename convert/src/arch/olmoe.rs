//! OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::{mlp_experts, ArchConverter, FfnSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct Olmoe;

impl ArchConverter for Olmoe {
    fn arch(&self) -> Arch {
        Arch::Olmoe
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let mut m = Vec::new();
        if let Some(c) = cfg.opt_f64("clip_qkv")? {
            m.push(("attention.clamp_kqv".into(), Value::F32(c as f32)));
        }
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        mlp_experts(cfg, ckpt, l, None)
    }

    fn requires_output_tensor(&self) -> bool {
        true
    }

    fn norm_topk(&self, cfg: &Config) -> Result<bool, ConvertError> {
        Ok(cfg.opt_bool("norm_topk_prob")?.unwrap_or(false))
    }
}
