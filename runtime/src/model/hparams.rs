//! Hyper-parameters read from GGUF metadata.

use crate::gguf::{GgufHeader, Value};

use super::arch::{Arch, ArchTraits};
use super::ModelError;

#[derive(Clone, Debug)]
pub struct HParams {
    pub arch: Arch,
    pub traits: ArchTraits,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub n_ctx_train: usize,
    pub rope_base: f32,
    pub rope_dim: usize,
    pub norm_eps: f32,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub norm_topk: bool,
    /// Multiplies token embeddings (Granite's embedding_multiplier; 1 elsewhere).
    pub embedding_scale: f32,
    /// Multiplies each sublayer's output before it is added to the residual stream.
    pub residual_scale: f32,
    /// Attention softmax scale; 1/sqrt(head_dim_k) unless the file says otherwise.
    pub attention_scale: f32,
    /// Logits are divided by this (Granite's logits_scaling; 1 elsewhere).
    pub logit_divisor: f32,
    /// Clamp q, k, v to [-c, c] (OLMoE's clip_qkv).
    pub clamp_qkv: Option<f32>,
    /// Keys older than this many positions are masked (Mixtral's sliding_window).
    pub sliding_window: Option<usize>,
}

pub(crate) struct Meta<'h> {
    h: &'h GgufHeader,
    prefix: &'static str,
}

impl<'h> Meta<'h> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.prefix)
    }

    fn get(&self, k: &str) -> Option<&'h Value> {
        self.h.get(&self.key(k))
    }

    fn missing(&self, k: &str) -> ModelError {
        ModelError::Metadata {
            key: self.key(k),
            why: "is missing".into(),
        }
    }

    fn usize(&self, k: &str) -> Result<usize, ModelError> {
        self.opt_usize(k)?.ok_or_else(|| self.missing(k))
    }

    fn opt_usize(&self, k: &str) -> Result<Option<usize>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| ModelError::Metadata {
                    key: self.key(k),
                    why: format!("must be a non-negative integer, found {v:?}"),
                }),
        }
    }

    fn opt_f32(&self, k: &str) -> Result<Option<f32>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| ModelError::Metadata {
                    key: self.key(k),
                    why: format!("must be a number, found {v:?}"),
                }),
        }
    }

    fn opt_bool(&self, k: &str) -> Result<Option<bool>, ModelError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ModelError::Metadata {
                key: self.key(k),
                why: format!("must be a bool, found {v:?}"),
            }),
        }
    }
}

impl HParams {
    /// Reads hyper-parameters; `n_vocab` comes from the embedding tensor's shape.
    pub fn from_header(h: &GgufHeader, n_vocab: usize) -> Result<Self, ModelError> {
        let arch = Arch::from_header(h)?;
        let traits = arch.traits();
        let m = Meta {
            h,
            prefix: arch.gguf_name(),
        };
        let n_embd = m.usize("embedding_length")?;
        let n_head = m.usize("attention.head_count")?;
        let n_head_kv = m.opt_usize("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::Metadata {
                key: m.key("attention.head_count_kv"),
                why: format!("{n_head_kv} KV heads cannot serve {n_head} query heads"),
            });
        }
        let head_dim_k = m
            .opt_usize("attention.key_length")?
            .unwrap_or(n_embd / n_head);
        let head_dim_v = m.opt_usize("attention.value_length")?.unwrap_or(head_dim_k);
        let rope_dim = m.opt_usize("rope.dimension_count")?.unwrap_or(head_dim_k);
        if rope_dim > head_dim_k || rope_dim % 2 != 0 {
            return Err(ModelError::Metadata {
                key: m.key("rope.dimension_count"),
                why: format!("{rope_dim} must be even and at most the head size {head_dim_k}"),
            });
        }
        if let Some(kind) = m.get("rope.scaling.type").and_then(|v| v.as_str()) {
            if kind != "none" {
                return Err(ModelError::Unsupported(format!(
                    "rope scaling `{kind}` is not implemented yet"
                )));
            }
        }
        let n_expert = m.usize("expert_count")?;
        let n_expert_used = m.usize("expert_used_count")?;
        if n_expert == 0 || n_expert_used == 0 || n_expert_used > n_expert {
            return Err(ModelError::Metadata {
                key: m.key("expert_used_count"),
                why: format!("{n_expert_used} experts per token out of {n_expert} is impossible"),
            });
        }
        let (embedding_scale, residual_scale, attention_scale, logit_divisor) =
            if traits.has_granite_scales {
                (
                    m.opt_f32("embedding_scale")?.unwrap_or(1.0),
                    m.opt_f32("residual_scale")?.unwrap_or(1.0),
                    m.opt_f32("attention.scale")?,
                    m.opt_f32("logit_scale")?.unwrap_or(1.0),
                )
            } else {
                (1.0, 1.0, None, 1.0)
            };
        Ok(Self {
            arch,
            traits,
            n_vocab,
            n_embd,
            n_layer: m.usize("block_count")?,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_ctx_train: m.opt_usize("context_length")?.unwrap_or(4096),
            rope_base: m.opt_f32("rope.freq_base")?.unwrap_or(10000.0),
            rope_dim,
            norm_eps: m
                .opt_f32("attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| m.missing("attention.layer_norm_rms_epsilon"))?,
            n_expert,
            n_expert_used,
            norm_topk: m
                .opt_bool("expert_weights_norm")?
                .unwrap_or(traits.default_norm_topk),
            embedding_scale,
            residual_scale,
            attention_scale: attention_scale.unwrap_or(1.0 / (head_dim_k as f32).sqrt()),
            logit_divisor,
            clamp_qkv: m.opt_f32("attention.clamp_kqv")?.filter(|c| *c > 0.0),
            sliding_window: m.opt_usize("attention.sliding_window")?.filter(|w| *w > 0),
        })
    }
}
