//! What differs between the supported architectures, in one place. The forward pass reads these
//! traits; it never tests the architecture name.

use crate::gguf::GgufHeader;
use crate::moe::router::Gating;

use super::error::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// llama.cpp's `llama` with experts: Mixtral.
    Llama,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    GraniteMoe,
    /// llama.cpp's `deepseek2`: DeepSeek-V2/V2-Lite and the V3 architecture (Moonlight, Kimi-K2).
    Deepseek2,
    /// llama.cpp's `glm4moe`: GLM-4.5, GLM-4.5-Air, GLM-4.6.
    Glm4Moe,
    /// llama.cpp's `ernie4_5-moe`: ERNIE-4.5 MoE (21B-A3B, 300B-A47B).
    Ernie45Moe,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// ggml's "normal" rope: pairs (2i, 2i+1). llama-family converters permute the q/k rows of
    /// Hugging Face checkpoints so that this equals HF's rotate_half rope.
    Interleaved,
    /// ggml's NeoX rope (HF rotate_half): pairs (i, i + d/2).
    Neox,
}

/// RMSNorm applied to queries and keys before rope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One weight vector of `head_dim`, applied to each head (Qwen3-MoE).
    PerHead,
    /// As `PerHead` in the layers whose file has the weights (GLM-4.5's `use_qk_norm`).
    PerHeadIfPresent,
    /// One weight vector over the whole projection (OLMoE).
    WholeProjection,
}

/// Which attention the layers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// Grouped-query attention over full per-head keys and values.
    Gqa,
    /// DeepSeek's multi-head latent attention: the cache holds a normalised latent and one shared
    /// rotary key per token; per-head keys and values are never materialised.
    Mla,
}

#[derive(Clone, Copy, Debug)]
pub struct ArchTraits {
    pub attention: AttentionKind,
    pub rope: RopeStyle,
    pub qk_norm: QkNorm,
    /// Whether the top-k router weights are renormalised to sum to one when the file does not
    /// say (`{arch}.expert_weights_norm`); matches what llama.cpp does for the architecture.
    pub default_norm_topk: bool,
    /// Granite's multipliers are stored under their own keys.
    pub has_granite_scales: bool,
    /// How router scores are computed when the file does not say (`{arch}.expert_gating_func`);
    /// what llama.cpp assumes for the architecture.
    pub default_gating: Gating,
    /// The block's tensor holding the norm before the feed-forward half (`blk.N.<name>.weight`).
    pub ffn_norm_tensor: &'static str,
}

impl Arch {
    pub const ALL: [Arch; 8] = [
        Arch::Llama,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Olmoe,
        Arch::GraniteMoe,
        Arch::Deepseek2,
        Arch::Glm4Moe,
        Arch::Ernie45Moe,
    ];

    /// The `general.architecture` string llama.cpp uses.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Olmoe => "olmoe",
            Arch::GraniteMoe => "granitemoe",
            Arch::Deepseek2 => "deepseek2",
            Arch::Glm4Moe => "glm4moe",
            Arch::Ernie45Moe => "ernie4_5-moe",
        }
    }

    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.gguf_name() == name)
    }

    pub fn traits(self) -> ArchTraits {
        match self {
            Arch::Llama => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Interleaved,
                qk_norm: QkNorm::None,
                default_norm_topk: true,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
            },
            Arch::Qwen2Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::None,
                default_norm_topk: false,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
            },
            Arch::Qwen3Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::PerHead,
                default_norm_topk: true,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
            },
            Arch::Olmoe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::WholeProjection,
                default_norm_topk: false,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
            },
            Arch::GraniteMoe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Interleaved,
                qk_norm: QkNorm::None,
                // Granite takes the softmax over the top-k logits, which is the same thing.
                default_norm_topk: true,
                has_granite_scales: true,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
            },
            Arch::Deepseek2 => ArchTraits {
                attention: AttentionKind::Mla,
                // DeepSeek's rotary dims are interleaved pairs (transformers' rope_interleave,
                // V2's complex rotation); llama.cpp's converter does not permute them.
                rope: RopeStyle::Interleaved,
                qk_norm: QkNorm::None,
                // llama.cpp writes expert_weights_norm only when true.
                default_norm_topk: false,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
            },
            Arch::Glm4Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                // Partial rotary: the first `rope.dimension_count` dims of a head, NeoX pairs.
                rope: RopeStyle::Neox,
                // GLM-4.5 (355B) normalises q/k per head, GLM-4.5-Air does not.
                qk_norm: QkNorm::PerHeadIfPresent,
                default_norm_topk: false,
                has_granite_scales: false,
                default_gating: Gating::Sigmoid,
                ffn_norm_tensor: "post_attention_norm",
            },
            Arch::Ernie45Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                // transformers' ERNIE rotates interleaved pairs; llama.cpp's converter does not
                // permute q/k for it.
                rope: RopeStyle::Interleaved,
                qk_norm: QkNorm::None,
                // llama.cpp's graph always renormalises ERNIE's top-k weights.
                default_norm_topk: true,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
            },
        }
    }

    pub fn from_header(h: &GgufHeader) -> Result<Self, ModelError> {
        let name = h
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::Metadata {
                key: "general.architecture".into(),
                why: "is missing or not a string".into(),
            })?;
        Self::from_gguf_name(name).ok_or_else(|| ModelError::UnsupportedArch(name.to_string()))
    }
}
