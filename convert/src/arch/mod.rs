//! Per-architecture knowledge: how a Hugging Face checkpoint's tensors and config fields map onto
//! llama.cpp's GGUF names and keys. Everything that differs between architectures is in the
//! files of this module; `plan.rs` handles what they share.

mod deepseek2;
mod ernie4_5_moe;
mod gemma4;
mod glm4_moe;
mod gpt_oss;
mod granite_hybrid;
mod granitemoe;
mod lfm2_moe;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen35_moe;
mod qwen3_moe;
mod smallthinker;

use moe_runtime::gguf::Value;
use moe_runtime::model::Arch;

use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config};
use crate::source::Source;

/// One tensor of a layer that an architecture describes itself (its own attention layout, or
/// tensors beyond the shared ones): GGUF name within the block (`blk.{l}.` is prepended), ggml
/// dims, and where the values come from.
pub struct AttnTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub source: Source,
}

impl AttnTensor {
    pub fn new(name: &str, dims: Vec<usize>, source: Source) -> Self {
        Self {
            name: name.into(),
            dims,
            source,
        }
    }
}

/// Where a layer's feed-forward weights come from.
pub enum FfnSource {
    /// A plain SwiGLU MLP (HF `[out, in]` matrices).
    Dense {
        gate: String,
        up: String,
        down: String,
    },
    Moe {
        router: String,
        experts: ExpertSource,
        shared: Option<SharedSource>,
        /// A per-expert bias added to the scores for selection only (DeepSeek-V3's
        /// e_score_correction_bias), written as `exp_probs_b.bias`.
        selection_bias: Option<String>,
    },
}

pub enum ExpertSource {
    /// One tensor per expert and projection (the Hub layout of Mixtral, Qwen and OLMoE).
    PerExpert {
        gate: Vec<String>,
        up: Vec<String>,
        down: Vec<String>,
    },
    /// 3-D tensors for all experts: `gate_up` is `[n_expert, 2 * ff, d]` with the gate rows
    /// first, `down` is `[n_expert, d, ff]` (GraniteMoE, and transformers v5's fused layout).
    Fused { gate_up: String, down: String },
    /// Stacked tensors the architecture builds itself (shapes checked by it): gate and up of
    /// ggml dims `[d, ff, n_expert]`, down `[ff, d, n_expert]` (gpt-oss's interleaved and MXFP4
    /// layouts).
    Prepared(Box<PreparedExperts>),
}

/// [`ExpertSource::Prepared`]'s tensors.
pub struct PreparedExperts {
    pub gate: Source,
    pub up: Source,
    pub down: Source,
    pub ff: usize,
}

pub struct SharedSource {
    pub mlp: ExpertMlp,
    /// HF `[1, d]` sigmoid gate (Qwen2-MoE).
    pub gate: Option<String>,
}

/// A single MLP given either as three matrices or as a fused gate/up matrix.
pub enum ExpertMlp {
    Separate {
        gate: String,
        up: String,
        down: String,
    },
    Fused {
        gate_up: String,
        down: String,
    },
}

/// Hugging Face names of a layer's two norms (`model.layers.{l}.<name>.weight`) and of the final
/// norm (`<output>.weight`).
pub struct HfNorms {
    pub mixer: &'static str,
    pub ffn: &'static str,
    pub output: &'static str,
}

/// What a converter needs to know about one architecture.
pub trait ArchConverter {
    fn arch(&self) -> Arch;

    /// Where the norms are in the checkpoint.
    fn hf_norms(&self) -> HfNorms {
        HfNorms {
            mixer: "input_layernorm",
            ffn: "post_attention_layernorm",
            output: "model.norm",
        }
    }

    /// Where a norm's values come from (`model.layers.{l}.<norm>.weight` or the final norm):
    /// Qwen3.5 stores `weight` for a `1 + weight` norm, which llama.cpp's converter writes as is
    /// plus one.
    fn norm_source(&self, name: String) -> Source {
        Source::Tensor(name)
    }

    /// Hugging Face's q/k projections use rotate-half rope; llama.cpp's llama-family graphs use
    /// interleaved rope, so those converters permute q/k rows.
    fn permute_qk(&self) -> bool {
        false
    }

    /// Attention tensors of layer `l` when the architecture does not use the q/k/v/o layout
    /// (or the layer's mixer is not attention: a short convolution).
    fn attention(
        &self,
        _cfg: &Config,
        _ckpt: &Checkpoint,
        _l: usize,
    ) -> Result<Option<Vec<AttnTensor>>, ConvertError> {
        Ok(None)
    }

    /// Tensors of layer `l` beyond the shared ones (biases, attention sinks), written after
    /// its attention.
    fn extra_layer_tensors(
        &self,
        _cfg: &Config,
        _ckpt: &Checkpoint,
        _l: usize,
    ) -> Result<Vec<AttnTensor>, ConvertError> {
        Ok(Vec::new())
    }

    /// Tensors outside the blocks beyond the shared ones (GGUF name, ggml dims, source):
    /// Gemma 4's rope frequency factors.
    fn extra_tensors(&self, _cfg: &Config) -> Result<Vec<AttnTensor>, ConvertError> {
        Ok(Vec::new())
    }

    /// Whether `metadata` writes the rope scaling keys itself (otherwise only unscaled rope is
    /// accepted).
    fn handles_rope_scaling(&self) -> bool {
        false
    }

    /// `{arch}.attention.head_count_kv`.
    fn head_count_kv(&self, cfg: &Config) -> Result<usize, ConvertError> {
        Ok(cfg
            .opt_usize("num_key_value_heads")?
            .unwrap_or(cfg.usize("num_attention_heads")?))
    }

    /// The routed experts per MoE layer (`{arch}.expert_count`).
    fn expert_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        expert_count(cfg)
    }

    /// The experts each token uses (`{arch}.expert_used_count`).
    fn expert_used_count(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("num_experts_per_tok")
    }

    /// `tokenizer.ggml.pre` for a byte-level BPE tokenizer whose pre-tokenizer was recognised
    /// as `detected`, when llama.cpp names it differently for this architecture.
    fn tokenizer_pre(&self, detected: &'static str) -> &'static str {
        detected
    }

    /// Special tokens llama.cpp's converter sets by their text for this architecture:
    /// (`tokenizer.ggml.<name>_token_id` name, token text). Each replaces what the tokenizer
    /// files say when the text is in the vocabulary.
    fn special_tokens(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// Metadata keys beyond the ones every architecture shares, without the `{arch}.` prefix;
    /// a key given here replaces the shared one.
    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError>;

    /// The width llama.cpp reads from `{arch}.feed_forward_length`.
    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError>;

    /// Feed-forward source of layer `l`.
    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError>;

    /// Whether llama.cpp requires `output.weight` even when the embeddings are tied.
    fn requires_output_tensor(&self) -> bool {
        false
    }

    /// Whether top-k router weights are renormalised (written as `{arch}.expert_weights_norm`).
    fn norm_topk(&self, cfg: &Config) -> Result<bool, ConvertError>;

    fn rms_eps(&self, cfg: &Config) -> Result<f64, ConvertError> {
        cfg.f64("rms_norm_eps")
    }
}

pub fn for_config(cfg: &Config) -> Result<Box<dyn ArchConverter>, ConvertError> {
    let model_type = cfg.model_type()?;
    Ok(match model_type {
        "mixtral" => Box::new(mixtral::Mixtral),
        "qwen2_moe" => Box::new(qwen2_moe::Qwen2Moe),
        "qwen3_moe" => Box::new(qwen3_moe::Qwen3Moe),
        "olmoe" => Box::new(olmoe::Olmoe),
        "granitemoe" => Box::new(granitemoe::GraniteMoe),
        "deepseek_v2" => Box::new(deepseek2::Deepseek2(deepseek2::Version::V2)),
        "deepseek_v3" => Box::new(deepseek2::Deepseek2(deepseek2::Version::V3)),
        "glm4_moe" => Box::new(glm4_moe::Glm4Moe),
        "ernie4_5_moe" => Box::new(ernie4_5_moe::Ernie45Moe),
        "gpt_oss" => Box::new(gpt_oss::GptOss),
        "smallthinker" => Box::new(smallthinker::SmallThinker),
        "gemma4_text" => Box::new(gemma4::Gemma4),
        "lfm2_moe" => Box::new(lfm2_moe::Lfm2Moe),
        // The multimodal config's text_config says qwen3_5_moe_text.
        "qwen3_5_moe_text" | "qwen3_5_moe" => Box::new(qwen35_moe::Qwen35Moe),
        "granitemoehybrid" => Box::new(granite_hybrid::GraniteHybrid),
        other => {
            return Err(ConvertError::Config {
                field: "model_type".into(),
                why: format!(
                    "is `{other}`, which moe-convert does not support (supported: mixtral, \
                     qwen2_moe, qwen3_moe, olmoe, granitemoe, deepseek_v2, deepseek_v3, \
                     glm4_moe, ernie4_5_moe, gpt_oss, smallthinker, gemma4_text, lfm2_moe, \
                     qwen3_5_moe, granitemoehybrid)"
                ),
            })
        }
    })
}

/// The routed expert count: `num_experts` (transformers 4 Qwen/OLMoE configs) or
/// `num_local_experts` (Mixtral, Granite, and transformers 5 configs).
pub fn expert_count(cfg: &Config) -> Result<usize, ConvertError> {
    cfg.opt_usize("num_local_experts")?
        .or(cfg.opt_usize("num_experts")?)
        .ok_or_else(|| ConvertError::Config {
            field: "num_experts".into(),
            why: "is missing (neither num_experts nor num_local_experts is set)".into(),
        })
}

/// The Qwen/OLMoE layout: router `model.layers.{l}.mlp.gate`, experts
/// `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj` (or their fused form).
pub(crate) fn mlp_experts(
    cfg: &Config,
    ckpt: &Checkpoint,
    l: usize,
    shared: Option<SharedSource>,
) -> Result<FfnSource, ConvertError> {
    let p = format!("model.layers.{l}.mlp");
    Ok(FfnSource::Moe {
        router: format!("{p}.gate.weight"),
        experts: experts_at(
            ckpt,
            &format!("{p}.experts"),
            expert_count(cfg)?,
            ["gate_proj", "up_proj", "down_proj"],
        )?,
        shared,
        selection_bias: None,
    })
}

/// Experts of layer `l` under `prefix` (e.g. `model.layers.3.mlp.experts`), in whichever of the
/// per-expert or fused layouts the checkpoint uses.
pub(crate) fn experts_at(
    ckpt: &Checkpoint,
    prefix: &str,
    n_expert: usize,
    names: [&str; 3],
) -> Result<ExpertSource, ConvertError> {
    let fused_gate_up = format!("{prefix}.gate_up_proj");
    if ckpt.has(&fused_gate_up) {
        return Ok(ExpertSource::Fused {
            gate_up: fused_gate_up,
            down: format!("{prefix}.down_proj"),
        });
    }
    let list = |p: &str| {
        (0..n_expert)
            .map(|e| format!("{prefix}.{e}.{p}.weight"))
            .collect()
    };
    Ok(ExpertSource::PerExpert {
        gate: list(names[0]),
        up: list(names[1]),
        down: list(names[2]),
    })
}

/// The YaRN parameters of a config (`rope_parameters`, or the older `rope_scaling`), None when
/// it has no rope scaling or the default; any other kind is refused.
fn yarn_params(cfg: &Config) -> Result<Option<&serde_json::Value>, ConvertError> {
    let Some(p) = cfg
        .get("rope_parameters")
        .or_else(|| cfg.get("rope_scaling"))
        .filter(|v| v.is_object())
    else {
        return Ok(None);
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "yarn" => Ok(Some(p)),
        other => Err(ConvertError::Config {
            field: "rope_parameters".into(),
            why: format!("rope scaling `{other}` is not supported (default or yarn)"),
        }),
    }
}
