//! What differs between the supported architectures, in one place. The forward pass reads these
//! traits; it never tests the architecture name.

use crate::gguf::GgufHeader;
use crate::moe::experts::Glu;
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
    /// OpenAI's gpt-oss (llama.cpp's `gpt-oss`, `LLM_ARCH_OPENAI_MOE`).
    GptOss,
    /// llama.cpp's `smallthinker`: PowerInfer's SmallThinker (4B-A0.6B, 21B-A3B).
    SmallThinker,
    /// llama.cpp's `gemma4` with experts: Gemma-4-26B-A4B's language model.
    Gemma4,
    /// llama.cpp's `lfm2moe`: Liquid AI's LFM2-MoE (8B-A1B), gated short convolutions beside
    /// attention layers.
    Lfm2Moe,
    /// llama.cpp's `qwen35moe`: Qwen3.5/3.6-MoE's language model (35B-A3B), three Gated
    /// DeltaNet layers to one gated full-attention layer.
    Qwen35Moe,
    /// llama.cpp's `granitehybrid`: IBM's Granite-4.0-H (transformers' `granitemoehybrid`),
    /// Mamba-2 layers beside attention layers, MoE with a shared expert, Granite's multipliers.
    GraniteHybrid,
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

/// What a MoE layer's router reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterInput {
    /// The feed-forward input: the post-attention state after the FFN norm.
    FfnInput,
    /// The layer's input, un-normalised, before attention (SmallThinker): a layer's experts are
    /// known one attention block before its feed-forward runs.
    LayerInput,
    /// The post-attention residual, RMS-normalised without weights and multiplied by the
    /// layer's `ffn_gate_inp.scale` and `n_embd^-0.5` (Gemma 4; the experts read their own norm).
    NormedResidual,
}

/// What a layer the file marks recurrent runs instead of attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecurrentMixer {
    /// LFM2's gated short convolution (`shortconv.*`).
    ShortConv,
    /// Qwen3.5's Gated DeltaNet (`ssm_*`, `attn_qkv`, `attn_gate`).
    GatedDeltaNet,
    /// A Mamba-2 selective state space layer (`ssm_in`, `ssm_conv1d`, `ssm_a`, `ssm_d`,
    /// grouped `ssm_norm`, `ssm_out`: Granite-4.0-H).
    Mamba2,
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
    /// The tensor holding the norm before the output projection (`<name>.weight`).
    pub output_norm_tensor: &'static str,
    /// With a sliding window, when the file does not say
    /// (`{arch}.attention.sliding_window_pattern`): in each group of this many layers the last
    /// attends to the whole context and the others to the window (llama.cpp's
    /// `set_swa_pattern`); 0 = every layer uses the window.
    pub default_swa_pattern: usize,
    /// The full-attention layer comes first in each group instead of last (llama.cpp's
    /// `dense_first`).
    pub swa_dense_first: bool,
    /// The experts' gated activation.
    pub expert_glu: Glu,
    /// Whether YaRN's correction range is rounded to whole dimensions when the file does not say
    /// (moe-edge's `{arch}.rope.scaling.yarn_truncate`; transformers' `truncate`).
    pub default_yarn_truncate: bool,
    pub router_input: RouterInput,
    /// When the file has `attention.sliding_window`: layers `l % step == 0` skip rope
    /// (llama.cpp's `n_no_rope_layer_step`, SmallThinker's full-attention layers). None: every
    /// layer uses rope.
    pub nope_full_attention_step: Option<usize>,
    /// The gated activation of dense MLPs and shared experts.
    pub dense_glu: Glu,
    /// Token embeddings are multiplied by sqrt(n_embd) (Gemma).
    pub scale_embeddings_by_sqrt_d: bool,
    /// The attention softmax takes `q . k` unscaled (Gemma 4 normalises q instead).
    pub unit_attention_scale: bool,
    /// Values are RMS-normalised per head without weights before they are cached (Gemma 4).
    pub v_norm: bool,
    /// A layer without `attn_v` uses its key projection (before the key norm and rope) as values
    /// (Gemma 4's `attention_k_eq_v` full-attention layers).
    pub values_may_be_keys: bool,
    /// The attention output and the feed-forward output are RMS-normalised before their
    /// residual adds (`post_attention_norm`, `post_ffw_norm`: Gemma's sandwich norms).
    pub sandwich_norms: bool,
    /// The query projection gives each head's query and an output gate (`[q, gate]` per head);
    /// the attended values are multiplied by `sigmoid(gate)` before the output projection
    /// (Qwen3.5's gated attention).
    pub attention_output_gate: bool,
    /// What the layers the file marks recurrent run.
    pub recurrent_mixer: RecurrentMixer,
    /// `{arch}.rope.scaling.finetuned` switches rope on and off for every layer (true when
    /// absent): llama.cpp's granitehybrid reads it so, and its converter writes false for
    /// Granite-4.0-H, whose attention has no positional embedding.
    pub rope_switched_by_finetuned: bool,
}

impl Arch {
    pub const ALL: [Arch; 14] = [
        Arch::Llama,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Olmoe,
        Arch::GraniteMoe,
        Arch::Deepseek2,
        Arch::Glm4Moe,
        Arch::Ernie45Moe,
        Arch::GptOss,
        Arch::SmallThinker,
        Arch::Gemma4,
        Arch::Lfm2Moe,
        Arch::Qwen35Moe,
        Arch::GraniteHybrid,
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
            Arch::GptOss => "gpt-oss",
            Arch::SmallThinker => "smallthinker",
            Arch::Gemma4 => "gemma4",
            Arch::Lfm2Moe => "lfm2moe",
            Arch::Qwen35Moe => "qwen35moe",
            Arch::GraniteHybrid => "granitehybrid",
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
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            Arch::Qwen2Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::None,
                default_norm_topk: false,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            Arch::Qwen3Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::PerHead,
                default_norm_topk: true,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            Arch::Olmoe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::WholeProjection,
                default_norm_topk: false,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
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
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
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
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
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
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
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
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            // llama.cpp's llama_model_openai_moe: load_swa_pattern(ml, 2), the softmax over the
            // selected logits (LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT), and
            // LLM_FFN_SWIGLU_OAI_MOE with alpha 1.702 and limit 7 (transformers' GptOssConfig
            // defaults). Both released checkpoints set YaRN's `truncate: false`, which
            // transformers honours (llama.cpp rounds the correction range outward in any case).
            Arch::GptOss => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::None,
                // The softmax over the selected logits already sums to one.
                default_norm_topk: false,
                has_granite_scales: false,
                default_gating: Gating::SoftmaxWeight,
                ffn_norm_tensor: "post_attention_norm",
                output_norm_tensor: "output_norm",
                default_swa_pattern: 2,
                swa_dense_first: false,
                expert_glu: Glu::SwigluOai {
                    alpha: 1.702,
                    limit: 7.0,
                },
                default_yarn_truncate: false,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            Arch::SmallThinker => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::None,
                // llama.cpp's graph always renormalises SmallThinker's top-k weights.
                default_norm_topk: true,
                has_granite_scales: false,
                // The released models route by sigmoid (moe_primary_router_apply_softmax false).
                default_gating: Gating::Sigmoid,
                ffn_norm_tensor: "ffn_norm",
                output_norm_tensor: "output_norm",
                router_input: RouterInput::LayerInput,
                // llama.cpp's load_swa_pattern(ml, 4, true): with a window, layers l % 4 == 0
                // attend to everything (and without rope), the others within the window.
                default_swa_pattern: 4,
                swa_dense_first: true,
                expert_glu: Glu::Relu,
                default_yarn_truncate: true,
                nope_full_attention_step: Some(4),
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            // llama.cpp's llama_model_gemma4: f_attention_scale 1, q/k norms with weights and an
            // unweighted v norm, NeoX rope (proportional rope through rope_freqs on the full
            // layers), softmax routing renormalised (build_moe_ffn's norm_w), GELU-tanh MLP and
            // experts, embeddings scaled by sqrt(n_embd). The file gives the layer pattern.
            Arch::Gemma4 => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::PerHead,
                default_norm_topk: true,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "ffn_norm",
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::GeluTanh,
                default_yarn_truncate: true,
                router_input: RouterInput::NormedResidual,
                nope_full_attention_step: None,
                dense_glu: Glu::GeluTanh,
                scale_embeddings_by_sqrt_d: true,
                unit_attention_scale: true,
                v_norm: true,
                values_may_be_keys: true,
                sandwich_norms: true,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            // llama.cpp's llama_model_lfm2moe: per-head q/k norms, NeoX rope, sigmoid routing
            // with a selection bias and the top-k weights always renormalised (build_moe_ffn's
            // norm_w), the final norm stored as `token_embd_norm` (LLM_TENSOR_OUTPUT_NORM_LFM2).
            // Which layers are short convolutions is in the file (head_count_kv 0).
            Arch::Lfm2Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::PerHead,
                default_norm_topk: true,
                has_granite_scales: false,
                default_gating: Gating::Sigmoid,
                ffn_norm_tensor: "ffn_norm",
                output_norm_tensor: "token_embd_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: false,
                recurrent_mixer: RecurrentMixer::ShortConv,
                rope_switched_by_finetuned: false,
            },
            // llama.cpp's llama_model_qwen35moe: gated attention with per-head q/k norms and
            // (for text positions) NeoX rope over `rope.dimension_count` dims, softmax routing
            // always renormalised (build_moe_ffn's norm_w), a sigmoid-gated shared expert, the
            // FFN norm stored as `post_attention_norm`. Which layers are Gated DeltaNets is in
            // the file (`attention.recurrent_layers`, else every 4th layer is attention).
            Arch::Qwen35Moe => ArchTraits {
                attention: AttentionKind::Gqa,
                rope: RopeStyle::Neox,
                qk_norm: QkNorm::PerHead,
                default_norm_topk: true,
                has_granite_scales: false,
                default_gating: Gating::Softmax,
                ffn_norm_tensor: "post_attention_norm",
                output_norm_tensor: "output_norm",
                default_swa_pattern: 0,
                swa_dense_first: false,
                expert_glu: Glu::Silu,
                default_yarn_truncate: true,
                router_input: RouterInput::FfnInput,
                nope_full_attention_step: None,
                dense_glu: Glu::Silu,
                scale_embeddings_by_sqrt_d: false,
                unit_attention_scale: false,
                v_norm: false,
                values_may_be_keys: false,
                sandwich_norms: false,
                attention_output_gate: true,
                recurrent_mixer: RecurrentMixer::GatedDeltaNet,
                rope_switched_by_finetuned: false,
            },
            // llama.cpp's llama_model_granite_hybrid: Granite's multipliers, softmax routing
            // renormalised (build_moe_ffn's norm_w), an unscaled shared SwiGLU expert, rope
            // (interleaved: its converter permutes q/k) only when `rope.scaling.finetuned` is
            // true. Which layers are Mamba-2 is in the file (head_count_kv 0).
            Arch::GraniteHybrid => ArchTraits {
                recurrent_mixer: RecurrentMixer::Mamba2,
                rope_switched_by_finetuned: true,
                ..Arch::GraniteMoe.traits()
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
