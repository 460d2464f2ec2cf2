//! Hyper-parameters read from GGUF metadata.

use crate::gguf::{GgufHeader, Value};

use super::arch::{Arch, ArchTraits, AttentionKind, RecurrentMixer};

use super::error::ModelError;
use super::layer_kinds::{
    gdn_params, head_count_kv, mamba2_params, marked_recurrent_layers, trunk_layers,
};
pub use super::layer_kinds::{GdnParams, Mamba2Params};
use super::meta::Meta;
use crate::moe::experts::Glu;
use crate::moe::router::{
    Gating, GroupLimit, GroupScore, RoutingSpec, MAX_EXPERTS, MAX_EXPERTS_USED,
};

/// Multi-head latent attention dimensions (DeepSeek-V2/V3). In the file, `head_dim_k` /
/// `head_dim_v` describe the cached MQA view (`kv_lora_rank + qk_rope` / `kv_lora_rank`); these
/// are the per-head sizes after decompression.
#[derive(Clone, Copy, Debug)]
pub struct MlaParams {
    /// 0 when queries are projected directly (no q LoRA).
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head_dim: usize,
}

impl MlaParams {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope + self.qk_rope
    }
}

/// YaRN context extension as transformers' `_compute_yarn_parameters` applies it.
#[derive(Clone, Copy, Debug)]
pub struct Yarn {
    pub factor: f32,
    pub original_ctx: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// Whether the correction range is rounded outward to whole dimensions (transformers'
    /// `truncate`; llama.cpp always rounds).
    pub truncate: bool,
}

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
    /// Keys older than this many positions are masked (Mixtral's sliding_window), in the
    /// layers `swa_layers` marks.
    pub sliding_window: Option<usize>,
    /// Per layer, whether it attends within `sliding_window` only (all layers unless the
    /// architecture or the file gives a pattern).
    pub swa_layers: Vec<bool>,
    /// Latent attention dimensions when the architecture uses MLA.
    pub mla: Option<MlaParams>,
    pub yarn: Option<Yarn>,
    /// Multiplies rope's cos and sin (YaRN's attention factor; 1 without scaling).
    pub rope_attn_factor: f32,
    pub routing: RoutingSpec,
    /// The routed experts' gated activation.
    pub expert_glu: Glu,
    /// Per layer, its KV heads (`attention.head_count_kv` as one value or one per layer).
    pub n_head_kv_layers: Vec<usize>,
    /// Sliding-window layers' own key/value head sizes (`attention.key_length_swa`,
    /// `value_length_swa`), rotary dims and base (`rope.dimension_count_swa`,
    /// `rope.freq_base_swa`), when the file gives them (Gemma 4).
    pub swa_dims: Option<SwaDims>,
    /// Logits become `c * tanh(logits / c)` (`final_logit_softcapping`).
    pub final_logit_softcap: Option<f32>,
    /// Per layer, whether it is recurrent instead of attention (llama.cpp's `is_recr`: a
    /// per-layer `attention.head_count_kv` of 0, or `attention.recurrent_layers`); what it runs
    /// is `traits.recurrent_mixer`.
    pub recurrent_layers: Vec<bool>,
    /// Gated DeltaNet dimensions when the recurrent layers are DeltaNets.
    pub gdn: Option<GdnParams>,
    /// Mamba-2 dimensions when the recurrent layers are Mamba-2.
    pub mamba: Option<Mamba2Params>,
    /// Whether attention layers rotate queries and keys at all (false: Granite-4.0-H's NoPE
    /// attention, `rope.scaling.finetuned` false).
    pub rope_enabled: bool,
    /// Taps of the short convolutions (`shortconv.l_cache`); each keeps the last
    /// `shortconv_l_cache - 1` inputs as state. 0 when the model has none.
    pub shortconv_l_cache: usize,
}

/// What differs in the sliding-window layers of a model whose two layer kinds have their own
/// attention geometry.
#[derive(Clone, Copy, Debug)]
pub struct SwaDims {
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
}

/// One attention layer's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerDims {
    pub n_head_kv: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub rope_dim: usize,
    /// Whether the layer uses the sliding-window rope (`SwaDims`) rather than the full one.
    pub swa_rope: bool,
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
        let n_layer = trunk_layers(&m)?;
        let (n_head_kv_layers, mut recurrent_layers) = head_count_kv(&m, n_head, n_layer)?;
        if let Some(marked) = marked_recurrent_layers(&m, &traits, n_layer)? {
            recurrent_layers = marked;
        }
        let n_head_kv = n_head_kv_layers.first().copied().unwrap_or(n_head);
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
        let (yarn, rope_attn_factor, yarn_mscale) = rope_scaling(&m, &traits)?;
        let n_expert = m.usize("expert_count")?;
        let n_expert_used = m.usize("expert_used_count")?;
        if n_expert > MAX_EXPERTS {
            return Err(ModelError::Metadata {
                key: m.key("expert_count"),
                why: format!("{n_expert} experts per layer: at most {MAX_EXPERTS} are supported"),
            });
        }
        if n_expert == 0
            || n_expert_used == 0
            || n_expert_used > n_expert
            || n_expert_used > MAX_EXPERTS_USED
        {
            return Err(ModelError::Metadata {
                key: m.key("expert_used_count"),
                why: format!(
                    "{n_expert_used} experts per token out of {n_expert} is impossible (at most \
                     {MAX_EXPERTS_USED} are supported)"
                ),
            });
        }
        let norm_topk = m
            .opt_bool("expert_weights_norm")?
            .unwrap_or(traits.default_norm_topk);
        let routing = routing_spec(&m, n_expert, n_expert_used, norm_topk, traits)?;
        let has_recurrent = recurrent_layers.contains(&true);
        let gdn = match traits.recurrent_mixer {
            RecurrentMixer::GatedDeltaNet if has_recurrent => Some(gdn_params(&m)?),
            _ => None,
        };
        let mamba = match traits.recurrent_mixer {
            RecurrentMixer::Mamba2 if has_recurrent => Some(mamba2_params(&m)?),
            _ => None,
        };
        let rope_enabled = match traits.rope_switched_by_finetuned {
            true => m.opt_bool("rope.scaling.finetuned")?.unwrap_or(true),
            false => true,
        };
        let shortconv_l_cache = match has_recurrent && gdn.is_none() && mamba.is_none() {
            false => 0,
            true => match m.usize("shortconv.l_cache")? {
                l @ 2..=64 => l,
                l => {
                    return Err(ModelError::Metadata {
                        key: m.key("shortconv.l_cache"),
                        why: format!("{l} taps: a short convolution has 2 to 64"),
                    })
                }
            },
        };
        let mla = match traits.attention {
            AttentionKind::Gqa => None,
            AttentionKind::Mla => Some(mla_params(&m, head_dim_k, head_dim_v, rope_dim)?),
        };
        let (embedding_scale, residual_scale, attention_scale, logit_divisor) =
            if traits.has_granite_scales {
                (
                    m.opt_f32("embedding_scale")?.unwrap_or(1.0),
                    m.opt_f32("residual_scale")?.unwrap_or(1.0),
                    m.opt_f32("attention.scale")?,
                    m.opt_f32("logit_scale")?.unwrap_or(1.0),
                )
            } else {
                let embd = match traits.scale_embeddings_by_sqrt_d {
                    true => (n_embd as f32).sqrt(),
                    false => 1.0,
                };
                let attn = traits.unit_attention_scale.then_some(1.0);
                (embd, 1.0, attn, 1.0)
            };
        let swa_dims = match (
            m.opt_usize("attention.key_length_swa")?,
            m.opt_f32("rope.freq_base_swa")?,
        ) {
            (None, None) => None,
            (k, base) => {
                let head_dim_k = k.unwrap_or(head_dim_k);
                let rope_dim = m
                    .opt_usize("rope.dimension_count_swa")?
                    .unwrap_or(head_dim_k);
                if rope_dim > head_dim_k || rope_dim % 2 != 0 {
                    return Err(ModelError::Metadata {
                        key: m.key("rope.dimension_count_swa"),
                        why: format!(
                            "{rope_dim} must be even and at most the head size {head_dim_k}"
                        ),
                    });
                }
                Some(SwaDims {
                    head_dim_k,
                    head_dim_v: m
                        .opt_usize("attention.value_length_swa")?
                        .unwrap_or(head_dim_k),
                    rope_dim,
                    rope_base: base.unwrap_or(m.opt_f32("rope.freq_base")?.unwrap_or(10000.0)),
                })
            }
        };
        Ok(Self {
            arch,
            traits,
            n_vocab,
            n_embd,
            n_layer,
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
            norm_topk,
            embedding_scale,
            residual_scale,
            // MLA scores use the decompressed head size; YaRN's mscale enters squared
            // (transformers' yarn_apply_mscale).
            attention_scale: attention_scale.unwrap_or_else(|| {
                let dk = mla.map_or(head_dim_k, |p| p.qk_head_dim());
                yarn_mscale * yarn_mscale / (dk as f32).sqrt()
            }),
            logit_divisor,
            clamp_qkv: m.opt_f32("attention.clamp_kqv")?.filter(|c| *c > 0.0),
            sliding_window: m.opt_usize("attention.sliding_window")?.filter(|w| *w > 0),
            swa_layers: swa_layers(&m, &traits, n_layer)?,
            mla,
            yarn,
            rope_attn_factor,
            routing,
            expert_glu: traits.expert_glu,
            n_head_kv_layers,
            swa_dims,
            final_logit_softcap: m.opt_f32("final_logit_softcapping")?.filter(|c| *c > 0.0),
            recurrent_layers,
            gdn,
            mamba,
            rope_enabled,
            shortconv_l_cache,
        })
    }

    /// Layer `layer`'s attention geometry: the sliding-window layers' own sizes when the file
    /// gives them.
    pub fn layer_dims(&self, layer: usize) -> LayerDims {
        let n_head_kv = self.n_head_kv_layers[layer];
        match self.swa_dims {
            Some(s) if self.layer_window(layer).is_some() => LayerDims {
                n_head_kv,
                head_dim_k: s.head_dim_k,
                head_dim_v: s.head_dim_v,
                rope_dim: s.rope_dim,
                swa_rope: true,
            },
            _ => LayerDims {
                n_head_kv,
                head_dim_k: self.head_dim_k,
                head_dim_v: self.head_dim_v,
                rope_dim: self.rope_dim,
                swa_rope: false,
            },
        }
    }

    /// Whether `layer` is a short convolution (its state is recurrent, not a KV cache).
    pub fn is_recurrent(&self, layer: usize) -> bool {
        self.recurrent_layers.get(layer).copied().unwrap_or(false)
    }

    /// The window layer `layer` attends within, if any.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.swa_layers.get(layer).copied().unwrap_or(true))
    }

    /// Whether `layer` rotates queries and keys (false: a NoPE layer).
    pub fn uses_rope(&self, layer: usize) -> bool {
        if !self.rope_enabled {
            return false;
        }
        match (self.traits.nope_full_attention_step, self.sliding_window) {
            (Some(step), Some(_)) => !layer.is_multiple_of(step),
            _ => true,
        }
    }

    /// Rope inverse frequencies of the full-attention layers, `[rope_dim / 2]`, with
    /// transformers' f32 arithmetic.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        self.rope_inv_freq_of(self.rope_dim, self.rope_base)
    }

    /// Rope inverse frequencies over `dim` rotary dims of base `base` (YaRN applied if any).
    pub fn rope_inv_freq_of(&self, dim: usize, base: f32) -> Vec<f32> {
        let plain: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let Some(y) = self.yarn else {
            return plain;
        };
        // transformers: find_correction_range in f64, floor/ceil when truncating, clamped to
        // [0, dim-1].
        let corr = |rot: f64| {
            (dim as f64 * (y.original_ctx as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * (base as f64).ln())
        };
        let (mut low, mut high) = (corr(y.beta_fast as f64), corr(y.beta_slow as f64));
        if y.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let low = low.max(0.0) as f32;
        let mut high = high.min(dim as f64 - 1.0) as f32;
        if low == high {
            high += 0.001;
        }
        (0..dim / 2)
            .map(|i| {
                let pos_freq = base.powf((2 * i) as f32 / dim as f32);
                let extrapolation = 1.0 / pos_freq;
                let interpolation = 1.0 / (y.factor * pos_freq);
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extra_factor = 1.0 - ramp;
                interpolation * (1.0 - extra_factor) + extrapolation * extra_factor
            })
            .collect()
    }
}

/// transformers' `yarn_get_mscale`.
fn yarn_get_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Which layers use the sliding window: llama.cpp's `{arch}.attention.sliding_window_pattern`
/// (a period, or one bool per layer) when the file has it, else the architecture's period.
fn swa_layers(m: &Meta, traits: &ArchTraits, n_layer: usize) -> Result<Vec<bool>, ModelError> {
    let key = "attention.sliding_window_pattern";
    let bad = |why: String| ModelError::Metadata {
        key: m.key(key),
        why,
    };
    let period = match m.get(key) {
        Some(Value::Array(_, items)) => {
            let flags: Option<Vec<bool>> = items.iter().map(Value::as_bool).collect();
            return match flags {
                Some(f) if f.len() >= n_layer => Ok(f[..n_layer].to_vec()),
                _ => Err(bad(format!(
                    "must be a period or one bool per layer ({n_layer}), found {items:?}"
                ))),
            };
        }
        Some(v) => v
            .as_u64()
            .and_then(|p| usize::try_from(p).ok())
            .ok_or_else(|| bad(format!("must be a period or a bool array, found {v:?}")))?,
        None => traits.default_swa_pattern,
    };
    // llama.cpp's llama_hparams::set_swa_pattern: the full-attention layer comes last in each
    // group of `period` layers, or first (`dense_first`).
    Ok((0..n_layer)
        .map(|il| match traits.swa_dense_first {
            _ if period == 0 => true,
            true => il % period != 0,
            false => il % period < period - 1,
        })
        .collect())
}

/// Reads rope scaling as llama.cpp's converter writes it. Returns (YaRN parameters, cos/sin
/// factor, the mscale that enters the softmax scale squared).
fn rope_scaling(m: &Meta, traits: &ArchTraits) -> Result<(Option<Yarn>, f32, f32), ModelError> {
    let kind = m.get("rope.scaling.type").and_then(|v| v.as_str());
    match kind {
        None | Some("none") => return Ok((None, 1.0, 1.0)),
        Some("yarn") => {}
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "rope scaling `{other}` is not implemented yet"
            )))
        }
    }
    if let Some(e) = m.opt_f32("rope.scaling.yarn_ext_factor")? {
        if e != 1.0 {
            return Err(ModelError::Unsupported(format!(
                "YaRN with extrapolation factor {e} is not implemented (only 1)"
            )));
        }
    }
    let factor = m
        .opt_f32("rope.scaling.factor")?
        .ok_or_else(|| m.missing("rope.scaling.factor"))?;
    let yarn = Yarn {
        factor,
        original_ctx: m.usize("rope.scaling.original_context_length")?,
        beta_fast: m.opt_f32("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
        beta_slow: m.opt_f32("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
        // moe-edge's key, written from the config's `truncate`.
        truncate: m
            .opt_bool("rope.scaling.yarn_truncate")?
            .unwrap_or(traits.default_yarn_truncate),
    };
    // llama.cpp's DeepSeek converter stores 0.1 * mscale_all_dim here and, like llama.cpp's
    // runtime, the file implies mscale == mscale_all_dim, so cos/sin are unscaled; a different
    // cos/sin factor is written explicitly as yarn_attn_factor.
    let mscale_all_dim = m
        .opt_f32("rope.scaling.yarn_log_multiplier")?
        .map(|v| v / 0.1)
        .unwrap_or(0.0);
    let (default_factor, softmax_mscale) = if mscale_all_dim != 0.0 {
        (1.0, yarn_get_mscale(factor, mscale_all_dim))
    } else {
        (yarn_get_mscale(factor, 1.0), 1.0)
    };
    let attn_factor = m
        .opt_f32("rope.scaling.yarn_attn_factor")?
        .unwrap_or(default_factor);
    Ok((Some(yarn), attn_factor, softmax_mscale))
}

/// Expert selection from the `expert_*` keys; absent keys give the classic softmax top-k.
fn routing_spec(
    m: &Meta,
    n_expert: usize,
    k: usize,
    norm_topk: bool,
    traits: ArchTraits,
) -> Result<RoutingSpec, ModelError> {
    // llama.cpp's enum llama_expert_gating_func_type: 0 none (the architecture's default),
    // 1 softmax, 2 sigmoid, 3 softmax over the selected logits.
    let gating = match m.opt_usize("expert_gating_func")? {
        None | Some(0) => traits.default_gating,
        Some(1) => Gating::Softmax,
        Some(2) => Gating::Sigmoid,
        Some(3) => Gating::SoftmaxWeight,
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "expert gating function {other} is not implemented (1 softmax, 2 sigmoid, 3 \
                 softmax over the selected)"
            )))
        }
    };
    let scale = m
        .opt_f32("expert_weights_scale")?
        .filter(|s| *s != 0.0)
        .unwrap_or(1.0);
    let n_group = m.opt_usize("expert_group_count")?.unwrap_or(1);
    let groups = if n_group > 1 {
        let topk_group = m.usize("expert_group_used_count")?;
        // moe-edge's key: DeepSeek-V2's group_limited_greedy scores a group by its best expert;
        // without it groups are scored as llama.cpp does (sum of the best two, DeepSeek-V3).
        let score = match m.get("expert_group_score").and_then(|v| v.as_str()) {
            None | Some("top2_sum") => GroupScore::TopTwoSum,
            Some("max") => GroupScore::Max,
            Some(other) => {
                return Err(ModelError::Metadata {
                    key: m.key("expert_group_score"),
                    why: format!("is `{other}`; expected `max` or `top2_sum`"),
                })
            }
        };
        if n_group > crate::moe::router::MAX_EXPERT_GROUPS {
            return Err(ModelError::Metadata {
                key: m.key("expert_group_count"),
                why: format!(
                    "is {n_group}; this runtime routes at most {} expert groups",
                    crate::moe::router::MAX_EXPERT_GROUPS
                ),
            });
        }
        let per = n_expert / n_group;
        if !n_expert.is_multiple_of(n_group)
            || topk_group == 0
            || topk_group > n_group
            || topk_group * per < k
            || (score == GroupScore::TopTwoSum && per < 2)
        {
            return Err(ModelError::Metadata {
                key: m.key("expert_group_used_count"),
                why: format!(
                    "{topk_group} of {n_group} groups cannot select {k} of {n_expert} experts"
                ),
            });
        }
        Some(GroupLimit {
            n_group,
            topk_group,
            score,
        })
    } else {
        None
    };
    Ok(RoutingSpec {
        k,
        gating,
        norm_topk,
        scale,
        groups,
    })
}

fn mla_params(
    m: &Meta,
    head_dim_k: usize,
    head_dim_v: usize,
    rope_dim: usize,
) -> Result<MlaParams, ModelError> {
    let kv_lora_rank = m.usize("attention.kv_lora_rank")?;
    let k_mla = m.usize("attention.key_length_mla").map_err(|_| {
        ModelError::Unsupported(
            "this deepseek2 file has no attention.key_length_mla: it was written by an old \
             llama.cpp converter with an unsplit attn_kv_b; re-convert it with moe-convert"
                .into(),
        )
    })?;
    let v_head_dim = m.usize("attention.value_length_mla")?;
    if head_dim_k != kv_lora_rank + rope_dim || head_dim_v != kv_lora_rank || k_mla <= rope_dim {
        return Err(ModelError::Metadata {
            key: m.key("attention.key_length"),
            why: format!(
                "key/value lengths {head_dim_k}/{head_dim_v} do not describe a latent of \
                 {kv_lora_rank} plus a rotary key of {rope_dim} (with head size {k_mla})"
            ),
        });
    }
    Ok(MlaParams {
        q_lora_rank: m.opt_usize("attention.q_lora_rank")?.unwrap_or(0),
        kv_lora_rank,
        qk_nope: k_mla - rope_dim,
        qk_rope: rope_dim,
        v_head_dim,
    })
}
