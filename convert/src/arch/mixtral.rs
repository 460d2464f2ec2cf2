//! Mixtral: written as llama.cpp's `llama` architecture with experts.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::{expert_count, experts_at, ArchConverter, FfnSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct Mixtral;

impl ArchConverter for Mixtral {
    fn arch(&self) -> Arch {
        Arch::Llama
    }

    fn permute_qk(&self) -> bool {
        true
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let head_dim = match cfg.opt_usize("head_dim")? {
            Some(h) => h,
            None => cfg.usize("hidden_size")? / cfg.usize("num_attention_heads")?,
        };
        Ok(vec![
            (
                "vocab_size".into(),
                Value::U32(cfg.usize("vocab_size")? as u32),
            ),
            ("rope.dimension_count".into(), Value::U32(head_dim as u32)),
        ])
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let n_expert = expert_count(cfg)?;
        let prefix = format!("model.layers.{l}.block_sparse_moe");
        Ok(FfnSource::Moe {
            router: format!("{prefix}.gate.weight"),
            // Mixtral names them w1 (gate), w3 (up), w2 (down).
            experts: experts_at(
                ckpt,
                &format!("{prefix}.experts"),
                n_expert,
                ["w1", "w3", "w2"],
            )?,
            shared: None,
            selection_bias: None,
        })
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        Ok(true)
    }
}
