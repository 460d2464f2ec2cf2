//! Which blocks a file has and what each layer is: the trunk's block count, per-layer KV heads,
//! which layers are recurrent, and the Gated DeltaNet or Mamba-2 geometry of recurrent layers.

use super::arch::{ArchTraits, RecurrentMixer};
use super::error::ModelError;
use super::meta::Meta;
use crate::gguf::Value;

/// Gated DeltaNet dimensions (llama.cpp's `ssm.*` keys for Qwen3.5): `n_k_heads` query/key
/// heads of `head_k_dim` (`group_count`, `state_size`), `n_v_heads` value heads of `head_v_dim`
/// (`time_step_rank`, `inner_size / time_step_rank`); value head `h` reads key head
/// `h % n_k_heads` (llama.cpp's tiled order, which its converter writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GdnParams {
    pub conv_kernel: usize,
    pub n_k_heads: usize,
    pub head_k_dim: usize,
    pub n_v_heads: usize,
    pub head_v_dim: usize,
}

impl GdnParams {
    /// Channels of the convolution: q, k and v.
    pub fn conv_dim(&self) -> usize {
        2 * self.n_k_heads * self.head_k_dim + self.n_v_heads * self.head_v_dim
    }

    pub fn value_dim(&self) -> usize {
        self.n_v_heads * self.head_v_dim
    }
}

/// Mamba-2 dimensions (llama.cpp's `ssm.*` keys for Granite-4.0-H): `d_inner` channels
/// (`inner_size`) as `n_heads` heads (`time_step_rank`) of `d_inner / n_heads`, a
/// `[head_dim, d_state]` state per head (`state_size`), B and C shared by the heads of each of
/// `n_groups` groups (`group_count`; head `h` is in group `h / (n_heads / n_groups)`), a causal
/// convolution of `conv_kernel` taps over x, B and C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mamba2Params {
    pub conv_kernel: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub n_heads: usize,
    pub n_groups: usize,
}

impl Mamba2Params {
    pub fn head_dim(&self) -> usize {
        self.d_inner / self.n_heads
    }

    /// Channels of the convolution: x, B and C.
    pub fn conv_dim(&self) -> usize {
        self.d_inner + 2 * self.n_groups * self.d_state
    }

    /// Rows of the input projection: z, x, B, C and one dt per head.
    pub fn in_proj_dim(&self) -> usize {
        self.d_inner + self.conv_dim() + self.n_heads
    }
}

/// The blocks the forward pass runs: `block_count` less the next-token-prediction (MTP) blocks
/// that llama.cpp's converter appends after them (GLM-4.5), which only speculative decoding uses.
pub(crate) fn trunk_layers(m: &Meta) -> Result<usize, ModelError> {
    let blocks = m.usize("block_count")?;
    let nextn = m.opt_usize("nextn_predict_layers")?.unwrap_or(0);
    if nextn >= blocks {
        return Err(ModelError::Metadata {
            key: m.key("nextn_predict_layers"),
            why: format!("{nextn} prediction blocks leave none of the {blocks} blocks to run"),
        });
    }
    Ok(blocks - nextn)
}

/// `attention.head_count_kv`: one value for every layer, or one per layer: Gemma 4's sliding
/// and full layers differ, and 0 marks a recurrent layer (llama.cpp's hybrid models). Returns
/// each layer's KV heads (a recurrent layer gets the first attention layer's, unused) and which
/// layers are recurrent; each attention layer's count must divide the query heads.
pub(crate) fn head_count_kv(
    m: &Meta,
    n_head: usize,
    n_layer: usize,
) -> Result<(Vec<usize>, Vec<bool>), ModelError> {
    let key = "attention.head_count_kv";
    let counts = match m.get(key) {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<Vec<usize>>>()
            .filter(|v| v.len() >= n_layer)
            .map(|mut v| {
                v.truncate(n_layer.max(1));
                v
            })
            .ok_or_else(|| ModelError::Metadata {
                key: m.key(key),
                why: format!("must be a count or one count per layer ({n_layer}), found {items:?}"),
            })?,
        _ => vec![m.opt_usize(key)?.unwrap_or(n_head); n_layer.max(1)],
    };
    let recurrent: Vec<bool> = counts.iter().map(|&c| c == 0).collect();
    let attention = counts.iter().copied().find(|&c| c > 0).unwrap_or(n_head);
    if let Some(&bad) = counts
        .iter()
        .filter(|&&kv| kv > 0)
        .chain(std::iter::once(&attention))
        .find(|&&kv| n_head == 0 || kv == 0 || !n_head.is_multiple_of(kv))
    {
        return Err(ModelError::Metadata {
            key: m.key(key),
            why: format!("{bad} KV heads cannot serve {n_head} query heads"),
        });
    }
    let per_layer = counts
        .iter()
        .map(|&c| if c == 0 { attention } else { c })
        .collect();
    Ok((per_layer, recurrent))
}

/// Which layers are recurrent when the file says so apart from `head_count_kv`:
/// `attention.recurrent_layers` (one bool per layer), or for Gated DeltaNet models without it
/// llama.cpp's `full_attention_interval` rule (every interval-th layer is attention, 4 when absent).
pub(crate) fn marked_recurrent_layers(
    m: &Meta,
    traits: &ArchTraits,
    n_layer: usize,
) -> Result<Option<Vec<bool>>, ModelError> {
    let key = "attention.recurrent_layers";
    if let Some(v) = m.get(key) {
        let flags: Option<Vec<bool>> = match v {
            Value::Array(_, items) => items.iter().map(Value::as_bool).collect(),
            _ => None,
        };
        return match flags {
            Some(f) if f.len() >= n_layer => Ok(Some(f[..n_layer].to_vec())),
            _ => Err(ModelError::Metadata {
                key: m.key(key),
                why: format!("must be one bool per layer ({n_layer}), found {v:?}"),
            }),
        };
    }
    if traits.recurrent_mixer != RecurrentMixer::GatedDeltaNet {
        return Ok(None);
    }
    let interval = m.opt_usize("full_attention_interval")?.unwrap_or(4);
    if interval == 0 {
        return Err(ModelError::Metadata {
            key: m.key("full_attention_interval"),
            why: "is 0".into(),
        });
    }
    Ok(Some(
        (0..n_layer).map(|i| (i + 1) % interval != 0).collect(),
    ))
}

/// The `ssm.*` keys of a Gated DeltaNet model.
pub(crate) fn gdn_params(m: &Meta) -> Result<GdnParams, ModelError> {
    let n_v_heads = m.usize("ssm.time_step_rank")?;
    let inner = m.usize("ssm.inner_size")?;
    let p = GdnParams {
        conv_kernel: m.usize("ssm.conv_kernel")?,
        n_k_heads: m.usize("ssm.group_count")?,
        head_k_dim: m.usize("ssm.state_size")?,
        n_v_heads,
        head_v_dim: inner.checked_div(n_v_heads).unwrap_or(0),
    };
    if p.n_k_heads == 0
        || p.n_v_heads == 0
        || p.head_k_dim == 0
        || p.head_v_dim == 0
        || p.head_v_dim * n_v_heads != inner
        || !p.n_v_heads.is_multiple_of(p.n_k_heads)
    {
        return Err(ModelError::Metadata {
            key: m.key("ssm.inner_size"),
            why: format!(
                "{inner} wide over {n_v_heads} value heads and {} key heads of {} does not \
                 describe a Gated DeltaNet",
                p.n_k_heads, p.head_k_dim
            ),
        });
    }
    if !(1..=64).contains(&p.conv_kernel) {
        return Err(ModelError::Metadata {
            key: m.key("ssm.conv_kernel"),
            why: format!("{} taps: a DeltaNet convolution has 1 to 64", p.conv_kernel),
        });
    }
    Ok(p)
}

/// The `ssm.*` keys of a Mamba-2 model.
pub(crate) fn mamba2_params(m: &Meta) -> Result<Mamba2Params, ModelError> {
    let p = Mamba2Params {
        conv_kernel: m.usize("ssm.conv_kernel")?,
        d_inner: m.usize("ssm.inner_size")?,
        d_state: m.usize("ssm.state_size")?,
        n_heads: m.usize("ssm.time_step_rank")?,
        n_groups: m.usize("ssm.group_count")?,
    };
    if p.n_heads == 0
        || p.n_groups == 0
        || p.d_state == 0
        || p.d_inner == 0
        || !p.d_inner.is_multiple_of(p.n_heads)
        || !p.n_heads.is_multiple_of(p.n_groups)
    {
        return Err(ModelError::Metadata {
            key: m.key("ssm.inner_size"),
            why: format!(
                "{} wide over {} heads in {} groups with a state of {} does not describe a \
                 Mamba-2 layer",
                p.d_inner, p.n_heads, p.n_groups, p.d_state
            ),
        });
    }
    if !(1..=64).contains(&p.conv_kernel) {
        return Err(ModelError::Metadata {
            key: m.key("ssm.conv_kernel"),
            why: format!("{} taps: a Mamba-2 convolution has 1 to 64", p.conv_kernel),
        });
    }
    Ok(p)
}
