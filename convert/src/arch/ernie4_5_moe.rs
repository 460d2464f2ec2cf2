//! ERNIE-4.5 MoE (`ernie4_5_moe`: ERNIE-4.5-21B-A3B, 300B-A47B) as llama.cpp's `ernie4_5-moe`:
//! interleaved-pair rope on the whole head (llama.cpp's normal rope, q/k not permuted), dense
//! layers before `moe_layer_start_index` and off the `moe_layer_interval`, shared experts, and
//! softmax routing whose top-k is chosen on the probabilities plus a correction bias
//! (`moe_statics.e_score_correction_bias`) and renormalised. Follows llama.cpp's
//! `Ernie4_5MoeModel` converter; the multi-token-prediction tensors (`mtp_*`) are not written.

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use super::{experts_at, ArchConverter, ExpertMlp, FfnSource, SharedSource};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};

pub struct Ernie45Moe;

/// transformers: layer `l` is sparse when `(l + 1) % moe_layer_interval == 0` and
/// `moe_layer_start_index <= l <= moe_layer_end_index` (-1 or absent: the last layer).
fn is_sparse(cfg: &Config, l: usize) -> Result<bool, ConvertError> {
    let interval = cfg.opt_usize("moe_layer_interval")?.unwrap_or(1).max(1);
    let start = cfg.opt_usize("moe_layer_start_index")?.unwrap_or(1);
    let last = cfg.usize("num_hidden_layers")?.saturating_sub(1);
    let end = match cfg.get("moe_layer_end_index").and_then(|v| v.as_i64()) {
        Some(e) if e >= 0 => e as usize,
        _ => last,
    };
    Ok((l + 1).is_multiple_of(interval) && l >= start && l <= end)
}

impl ArchConverter for Ernie45Moe {
    fn arch(&self) -> Arch {
        Arch::Ernie45Moe
    }

    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("moe_num_experts")
    }

    fn expert_used_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("moe_k")
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let u = |x: usize| Value::U32(x as u32);
        if cfg.opt_bool("use_bias")? == Some(true) {
            return Err(ConvertError::Unsupported(
                "ERNIE-4.5 checkpoints with use_bias=true are not supported (llama.cpp's graph \
                 has no biases for them either)"
                    .into(),
            ));
        }
        let n_shared = cfg.opt_usize("moe_num_shared_experts")?.unwrap_or(0);
        let expert_ff = cfg.usize("moe_intermediate_size")?;
        let mut m = vec![
            (
                "interleave_moe_layer_step".into(),
                u(cfg.opt_usize("moe_layer_interval")?.unwrap_or(1)),
            ),
            (
                "leading_dense_block_count".into(),
                u(cfg.opt_usize("moe_layer_start_index")?.unwrap_or(1)),
            ),
            ("expert_feed_forward_length".into(), u(expert_ff)),
            ("expert_shared_count".into(), u(n_shared)),
        ];
        if n_shared > 0 {
            // transformers' shared block is `moe_intermediate_size * moe_num_shared_experts`
            // wide. (llama.cpp's converter writes intermediate_size / num_key_value_heads, which
            // is the same number for the released models.)
            m.push((
                "expert_shared_feed_forward_length".into(),
                u(expert_ff * n_shared),
            ));
        }
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        let p = format!("model.layers.{l}.mlp");
        if !is_sparse(cfg, l)? {
            return Ok(FfnSource::Dense {
                gate: format!("{p}.gate_proj.weight"),
                up: format!("{p}.up_proj.weight"),
                down: format!("{p}.down_proj.weight"),
            });
        }
        let shared =
            (cfg.opt_usize("moe_num_shared_experts")?.unwrap_or(0) > 0).then(|| SharedSource {
                mlp: ExpertMlp::Separate {
                    gate: format!("{p}.shared_experts.gate_proj.weight"),
                    up: format!("{p}.shared_experts.up_proj.weight"),
                    down: format!("{p}.shared_experts.down_proj.weight"),
                },
                gate: None,
            });
        let bias = format!("{p}.moe_statics.e_score_correction_bias");
        Ok(FfnSource::Moe {
            router: format!("{p}.gate.weight"),
            experts: experts_at(
                ckpt,
                &format!("{p}.experts"),
                self.expert_count(cfg)?,
                ["gate_proj", "up_proj", "down_proj"],
            )?,
            shared,
            selection_bias: ckpt.has(&bias).then_some(bias),
        })
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        // transformers divides the k weights by their sum (clamped at moe_norm_min).
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
    fn sparse_layers_follow_start_interval_and_end() {
        let sparse =
            |c: &Config| -> Vec<usize> { (0..8).filter(|&l| is_sparse(c, l).unwrap()).collect() };
        let released = cfg(
            serde_json::json!({"num_hidden_layers": 8, "moe_layer_start_index": 1,
            "moe_layer_interval": 1, "moe_layer_end_index": -1}),
        );
        assert_eq!(sparse(&released), [1, 2, 3, 4, 5, 6, 7]);
        let every_other = cfg(
            serde_json::json!({"num_hidden_layers": 8, "moe_layer_start_index": 2,
            "moe_layer_interval": 2, "moe_layer_end_index": 5}),
        );
        assert_eq!(sparse(&every_other), [3, 5]);
    }

    #[test]
    fn biased_checkpoints_are_refused() {
        let c = cfg(serde_json::json!({"use_bias": true, "moe_intermediate_size": 8}));
        let err = Ernie45Moe.metadata(&c).unwrap_err().to_string();
        assert!(err.contains("use_bias"), "{err}");
    }
}
