//! gpt-oss (OpenAI), written as llama.cpp's `gpt-oss`: attention with biases (the output's
//! too), a learned sink logit per head and a sliding window on every other layer; a router with
//! a bias that picks the top-k logits; experts with biases and a clamped SwiGLU, whose gate and
//! up rows are interleaved in one fused tensor. The Hub checkpoints store the experts as MXFP4
//! blocks and scales; those go into the file as llama.cpp's MXFP4 blocks, byte for byte the
//! values of the checkpoint (no requantisation, whatever `--type` says). A checkpoint with
//! dequantized experts (`gate_up_proj` `[E, d, 2 ff]`, `down_proj` `[E, ff, d]`, multiplied
//! from the left as in transformers) is written in the requested type.

use std::sync::Arc;

use moe_runtime::gguf::{GgmlType, Value, ValueType};
use moe_runtime::model::Arch;

use super::{
    expert_count, yarn_params, ArchConverter, AttnTensor, ExpertSource, FfnSource, PreparedExperts,
};
use crate::error::ConvertError;
use crate::hf::{Checkpoint, Config, SourceDtype};
use crate::source::{Pack, Rearrange, Source};

pub struct GptOss;

/// The clamped SwiGLU's constants llama.cpp's graph uses (`LLM_FFN_SWIGLU_OAI_MOE`); a file
/// has no keys for them.
const SWIGLU_ALPHA: f64 = 1.702;
const SWIGLU_LIMIT: f64 = 7.0;

/// Values per MXFP4 block, and the bytes of one block in the checkpoint (16 bytes of nibbles,
/// the scale apart) and in ggml (`block_mxfp4`: the scale byte, then 16 bytes).
const QK_MXFP4: usize = 32;
const HF_BLOCK_BYTES: usize = 16;

/// Which rows of a fused gate/up tensor a projection takes: gate rows are the even ones, up
/// rows the odd ones (transformers' `gate_up[..., ::2]` and `[..., 1::2]`).
#[derive(Clone, Copy, Debug)]
enum Rows {
    All,
    Interleaved { part: usize },
}

impl Rows {
    fn count(self, rows: usize) -> usize {
        match self {
            Rows::All => rows,
            Rows::Interleaved { .. } => rows / 2,
        }
    }

    fn source(self, i: usize) -> usize {
        match self {
            Rows::All => i,
            Rows::Interleaved { part } => 2 * i + part,
        }
    }
}

/// MXFP4 experts from the checkpoint's `*_blocks` (`[E, rows, cols / 32, 16]`: two values per
/// byte, the even one in the low nibble) and `*_scales` (`[E, rows, cols / 32]`, E8M0 exponents)
/// into ggml's `block_mxfp4` (the exponent byte, then 16 bytes holding value `j` in the low
/// nibble and value `j + 16` in the high nibble of byte `j`), as llama.cpp's converter repacks
/// them.
#[derive(Debug)]
struct Mxfp4Experts {
    blocks: String,
    scales: String,
    n_expert: usize,
    rows: usize,
    cols: usize,
    pick: Rows,
}

impl Pack for Mxfp4Experts {
    fn ty(&self) -> GgmlType {
        GgmlType::MXFP4
    }

    fn bytes(&self, ckpt: &Checkpoint) -> Result<Vec<u8>, ConvertError> {
        ckpt.with_bytes(&self.blocks, |blocks| {
            ckpt.with_bytes(&self.scales, |scales| self.repack(blocks, scales))
        })?
    }
}

impl Mxfp4Experts {
    fn repack(&self, blocks: &[u8], scales: &[u8]) -> Vec<u8> {
        let per_row = self.cols / QK_MXFP4;
        let out_rows = self.pick.count(self.rows);
        let block = GgmlType::MXFP4.block_bytes();
        let mut out = Vec::with_capacity(self.n_expert * out_rows * per_row * block);
        for e in 0..self.n_expert {
            for i in 0..out_rows {
                let row = e * self.rows + self.pick.source(i);
                for b in 0..per_row {
                    let at = row * per_row + b;
                    let packed = &blocks[at * HF_BLOCK_BYTES..(at + 1) * HF_BLOCK_BYTES];
                    out.push(scales[at]);
                    out.extend_from_slice(&ggml_nibbles(packed));
                }
            }
        }
        out
    }
}

/// One block's 32 four-bit codes from the checkpoint's order (byte `i` = values `2i`, `2i + 1`)
/// into ggml's (byte `j` = values `j`, `j + 16`).
fn ggml_nibbles(packed: &[u8]) -> [u8; 16] {
    let value = |k: usize| {
        let b = packed[k / 2];
        if k.is_multiple_of(2) {
            b & 0x0f
        } else {
            b >> 4
        }
    };
    std::array::from_fn(|j| value(j) | (value(j + 16) << 4))
}

/// Dequantized experts `[E, a, b]` (multiplied from the left) into ggml's `[E, b', a]` weight
/// rows: each expert transposed, keeping the rows `pick` names.
#[derive(Debug)]
struct TransposedExperts {
    n_expert: usize,
    a: usize,
    b: usize,
    pick: Rows,
}

impl Rearrange for TransposedExperts {
    fn apply(&self, values: &[f32]) -> Vec<f32> {
        let (a, b) = (self.a, self.b);
        let rows = self.pick.count(b);
        let mut out = Vec::with_capacity(self.n_expert * rows * a);
        for expert in values.chunks_exact(a * b) {
            for i in 0..rows {
                let col = self.pick.source(i);
                out.extend((0..a).map(|r| expert[r * b + col]));
            }
        }
        out
    }
}

/// Every other column of a `[E, 2 ff]` bias (gate: even, up: odd) as `[E, ff]`.
#[derive(Debug)]
struct InterleavedBias {
    part: usize,
}

impl Rearrange for InterleavedBias {
    fn apply(&self, values: &[f32]) -> Vec<f32> {
        values.iter().skip(self.part).step_by(2).copied().collect()
    }
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (Hub configs).
impl GptOss {
    /// YaRN as llama.cpp's converter writes it, plus moe-edge's `yarn_truncate` when the
    /// config sets `truncate` (the Hub checkpoints say false: transformers then does not round
    /// the correction range; llama.cpp always rounds it).
    fn rope_metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        let Some(p) = yarn_params(cfg)? else {
            return Ok(vec![]);
        };
        let f = |k: &str| p.get(k).and_then(|v| v.as_f64());
        let orig = f("original_max_position_embeddings").ok_or_else(|| ConvertError::Config {
            field: "rope_parameters".into(),
            why: "yarn needs original_max_position_embeddings".into(),
        })?;
        let factor = match f("factor") {
            Some(x) => x,
            None => cfg.usize("max_position_embeddings")? as f64 / orig,
        };
        let mut m = vec![
            ("rope.scaling.type".into(), Value::String("yarn".into())),
            ("rope.scaling.factor".into(), Value::F32(factor as f32)),
            (
                "rope.scaling.original_context_length".into(),
                Value::U32(orig as u32),
            ),
        ];
        if let Some(b) = f("beta_fast") {
            m.push(("rope.scaling.yarn_beta_fast".into(), Value::F32(b as f32)));
        }
        if let Some(b) = f("beta_slow") {
            m.push(("rope.scaling.yarn_beta_slow".into(), Value::F32(b as f32)));
        }
        if let Some(a) = f("attention_factor") {
            m.push(("rope.scaling.yarn_attn_factor".into(), Value::F32(a as f32)));
        }
        if p.get("mscale").is_some() || p.get("mscale_all_dim").is_some() {
            return Err(ConvertError::Config {
                field: "rope_parameters".into(),
                why: "YaRN with mscale/mscale_all_dim is not supported for gpt_oss".into(),
            });
        }
        if let Some(t) = p.get("truncate").and_then(|v| v.as_bool()) {
            m.push(("rope.scaling.yarn_truncate".into(), Value::Bool(t)));
        }
        Ok(m)
    }

    /// Which layers use the sliding window, when `layer_types` differs from llama.cpp's
    /// default for the architecture (every other layer, starting with the first).
    fn swa_pattern(&self, cfg: &Config) -> Result<Option<Value>, ConvertError> {
        let n_layer = cfg.usize("num_hidden_layers")?;
        let Some(types) = cfg.get("layer_types").and_then(|v| v.as_array()) else {
            return Ok(None);
        };
        let mut sliding = Vec::with_capacity(n_layer);
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                Some("sliding_attention") => sliding.push(true),
                Some("full_attention") => sliding.push(false),
                _ => {
                    return Err(ConvertError::Config {
                        field: "layer_types".into(),
                        why: format!(
                            "entry {i} is {t}; expected sliding_attention or full_attention"
                        ),
                    })
                }
            }
        }
        if sliding.len() != n_layer {
            return Err(ConvertError::Config {
                field: "layer_types".into(),
                why: format!("lists {} layers, the model has {n_layer}", sliding.len()),
            });
        }
        let p = Arch::GptOss.traits().default_swa_pattern;
        let default = (0..n_layer).all(|i| sliding[i] == (i % p < p - 1));
        Ok((!default).then(|| {
            Value::Array(
                ValueType::Bool,
                sliding.into_iter().map(Value::Bool).collect(),
            )
        }))
    }

    /// The routed experts of layer `l`, MXFP4 or dequantized.
    fn experts(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<ExpertSource, ConvertError> {
        let n_expert = expert_count(cfg)?;
        let d = cfg.usize("hidden_size")?;
        let ff = cfg.usize("intermediate_size")?;
        let p = format!("model.layers.{l}.mlp.experts");
        let blocks = format!("{p}.gate_up_proj_blocks");
        if ckpt.has(&blocks) {
            if d % QK_MXFP4 != 0 || ff % QK_MXFP4 != 0 {
                return Err(ConvertError::Config {
                    field: "hidden_size".into(),
                    why: format!("MXFP4 experts need hidden_size ({d}) and intermediate_size ({ff}) to be multiples of 32"),
                });
            }
            let packed = |stem: &str,
                          rows: usize,
                          cols: usize,
                          pick: Rows|
             -> Result<Source, ConvertError> {
                let (b, s) = (format!("{p}.{stem}_blocks"), format!("{p}.{stem}_scales"));
                for (name, shape) in [
                    (&b, vec![n_expert, rows, cols / QK_MXFP4, HF_BLOCK_BYTES]),
                    (&s, vec![n_expert, rows, cols / QK_MXFP4]),
                ] {
                    ckpt.expect_shape(name, &shape)?;
                    if ckpt.info(name)?.dtype != SourceDtype::U8 {
                        return Err(ConvertError::Input(format!(
                            "tensor `{name}` should hold MXFP4 bytes (U8), found {:?}",
                            ckpt.info(name)?.dtype
                        )));
                    }
                }
                Ok(Source::Packed(Arc::new(Mxfp4Experts {
                    blocks: b,
                    scales: s,
                    n_expert,
                    rows,
                    cols,
                    pick,
                })))
            };
            return Ok(ExpertSource::Prepared(Box::new(PreparedExperts {
                gate: packed("gate_up_proj", 2 * ff, d, Rows::Interleaved { part: 0 })?,
                up: packed("gate_up_proj", 2 * ff, d, Rows::Interleaved { part: 1 })?,
                down: packed("down_proj", d, ff, Rows::All)?,
                ff,
            })));
        }
        let (gate_up, down) = (format!("{p}.gate_up_proj"), format!("{p}.down_proj"));
        ckpt.expect_shape(&gate_up, &[n_expert, d, 2 * ff])?;
        ckpt.expect_shape(&down, &[n_expert, ff, d])?;
        let transposed = |name: &String, a: usize, b: usize, pick: Rows| Source::Rearranged {
            name: name.clone(),
            how: Arc::new(TransposedExperts {
                n_expert,
                a,
                b,
                pick,
            }),
        };
        Ok(ExpertSource::Prepared(Box::new(PreparedExperts {
            gate: transposed(&gate_up, d, 2 * ff, Rows::Interleaved { part: 0 }),
            up: transposed(&gate_up, d, 2 * ff, Rows::Interleaved { part: 1 }),
            down: transposed(&down, ff, d, Rows::All),
            ff,
        })))
    }
}

impl ArchConverter for GptOss {
    fn arch(&self) -> Arch {
        Arch::GptOss
    }

    fn handles_rope_scaling(&self) -> bool {
        true
    }

    fn metadata(&self, cfg: &Config) -> Result<Vec<(String, Value)>, ConvertError> {
        for (key, want) in [
            ("swiglu_alpha", SWIGLU_ALPHA),
            ("swiglu_limit", SWIGLU_LIMIT),
        ] {
            if let Some(v) = cfg.opt_f64(key)? {
                if (v - want).abs() > 1e-6 {
                    return Err(ConvertError::Unsupported(format!(
                        "config.json's {key} is {v}; llama.cpp's gpt-oss graph (and its file \
                         format) fixes it at {want}"
                    )));
                }
            }
        }
        let mut m = vec![(
            "expert_feed_forward_length".into(),
            Value::U32(cfg.usize("intermediate_size")? as u32),
        )];
        m.extend(self.rope_metadata(cfg)?);
        if let Some(pattern) = self.swa_pattern(cfg)? {
            m.push(("attention.sliding_window_pattern".into(), pattern));
        }
        Ok(m)
    }

    fn feed_forward_length(&self, cfg: &Config) -> Result<usize, ConvertError> {
        cfg.usize("intermediate_size")
    }

    fn extra_layer_tensors(
        &self,
        cfg: &Config,
        ckpt: &Checkpoint,
        l: usize,
    ) -> Result<Vec<AttnTensor>, ConvertError> {
        let n_head = cfg.usize("num_attention_heads")?;
        let n_expert = expert_count(cfg)?;
        let d = cfg.usize("hidden_size")?;
        let ff = cfg.usize("intermediate_size")?;
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let (sinks, router_bias) = (p("self_attn.sinks"), p("mlp.router.bias"));
        let (gate_up_bias, down_bias) = (
            p("mlp.experts.gate_up_proj_bias"),
            p("mlp.experts.down_proj_bias"),
        );
        ckpt.expect_shape(&sinks, &[n_head])?;
        ckpt.expect_shape(&router_bias, &[n_expert])?;
        ckpt.expect_shape(&gate_up_bias, &[n_expert, 2 * ff])?;
        ckpt.expect_shape(&down_bias, &[n_expert, d])?;
        let half = |part: usize| Source::Rearranged {
            name: gate_up_bias.clone(),
            how: Arc::new(InterleavedBias { part }),
        };
        Ok(vec![
            AttnTensor::new("attn_sinks.weight", vec![n_head], Source::Tensor(sinks)),
            AttnTensor::new(
                "ffn_gate_inp.bias",
                vec![n_expert],
                Source::Tensor(router_bias),
            ),
            AttnTensor::new("ffn_gate_exps.bias", vec![ff, n_expert], half(0)),
            AttnTensor::new("ffn_up_exps.bias", vec![ff, n_expert], half(1)),
            AttnTensor::new(
                "ffn_down_exps.bias",
                vec![d, n_expert],
                Source::Tensor(down_bias),
            ),
        ])
    }

    fn ffn(&self, cfg: &Config, ckpt: &Checkpoint, l: usize) -> Result<FfnSource, ConvertError> {
        Ok(FfnSource::Moe {
            router: format!("model.layers.{l}.mlp.router.weight"),
            experts: self.experts(cfg, ckpt, l)?,
            shared: None,
            selection_bias: None,
        })
    }

    fn requires_output_tensor(&self) -> bool {
        true
    }

    fn norm_topk(&self, _cfg: &Config) -> Result<bool, ConvertError> {
        // The softmax over the selected logits sums to one already.
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nibbles move from the checkpoint's pairwise order to ggml's split halves (the rule of
    /// llama.cpp's `transform_nibble_layout`).
    #[test]
    fn nibbles_follow_ggml_block_order() {
        // Value k of the block is k % 16; the checkpoint packs (2i, 2i+1) into byte i.
        let packed: Vec<u8> = (0..16)
            .map(|i| ((2 * i) % 16) as u8 | ((((2 * i + 1) % 16) as u8) << 4))
            .collect();
        let ggml = ggml_nibbles(&packed);
        for (j, &b) in ggml.iter().enumerate() {
            assert_eq!(b & 0x0f, (j % 16) as u8, "value {j}");
            assert_eq!(b >> 4, ((j + 16) % 16) as u8, "value {}", j + 16);
        }
    }

    #[test]
    fn interleaved_rows_and_bias() {
        // One expert, a = 2 inputs, b = 4 fused outputs: columns g0 u0 g1 u1.
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let gate = TransposedExperts {
            n_expert: 1,
            a: 2,
            b: 4,
            pick: Rows::Interleaved { part: 0 },
        };
        assert_eq!(gate.apply(&w), vec![1.0, 5.0, 3.0, 7.0]);
        let up = TransposedExperts {
            pick: Rows::Interleaved { part: 1 },
            ..gate
        };
        assert_eq!(up.apply(&w), vec![2.0, 6.0, 4.0, 8.0]);
        assert_eq!(
            InterleavedBias { part: 1 }.apply(&[0.0, 1.0, 2.0, 3.0]),
            vec![1.0, 3.0]
        );
    }
}
