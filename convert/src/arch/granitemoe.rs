//! GraniteMoE: fused expert input projections and four scalar multipliers.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::{ArchConverter, ExpertSource, FfnSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct GraniteMoe;

impl ArchConverter for GraniteMoe {
    fn arch(&self) -> Arch {
        Arch::GraniteMoe
    }

    fn permute_qk(&self) -> bool {
        true
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let head_dim = cfg.usize("hidden_size")? / cfg.usize("num_attention_heads")?;
        let f = |k: &str, default: f64| -> Result<Value, ConvertError> {
            Ok(Value::F32(cfg.opt_f64(k)?.unwrap_or(default) as f32))
        };
        Ok(vec![
            (
                "vocab_size".into(),
                Value::U32(cfg.usize("vocab_size")? as u32),
            ),
            ("rope.dimension_count".into(), Value::U32(head_dim as u32)),
            (
                "attention.scale".into(),
                f("attention_multiplier", 1.0 / (head_dim as f64).sqrt())?,
            ),
            ("embedding_scale".into(), f("embedding_multiplier", 1.0)?),
            ("residual_scale".into(), f("residual_multiplier", 1.0)?),
            ("logit_scale".into(), f("logits_scaling", 1.0)?),
        ])
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, _cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let p = format!("model.layers.{l}.block_sparse_moe");
        if ckpt.has(&format!("model.layers.{l}.shared_mlp.input_linear.weight")) {
            return Err(ConvertError::Unsupported(
                "GraniteMoE with a shared expert (granitemoeshared) is not supported yet".into(),
            ));
        }
        Ok(FfnSource::Moe {
            router: format!("{p}.router.layer.weight"),
            experts: ExpertSource::Fused {
                gate_up: format!("{p}.input_linear.weight"),
                down: format!("{p}.output_linear.weight"),
            },
            shared: None,
            selection_bias: None,
        })
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        // Granite takes the softmax over the top-k logits: renormalised softmax.
        Ok(true)
    }
}
