//! The model's tensors, looked up by their llama.cpp names and checked against the
//! hyper-parameters before anything runs.

use crate::gguf::GgufFile;
use crate::moe::cache::{ExpertLayout, SlabSpec};
pub use crate::moe::experts::Mlp;
use crate::moe::replay::{ReplayError, RouteReplay};
use crate::tensor::QMatrix;

use super::arch::QkNorm;
use super::arch::RecurrentMixer;
use super::error::ModelError;
use super::hparams::{GdnParams, HParams, Mamba2Params, MlaParams};
use super::lookup::Lookup;
pub use super::lookup::{ExpertSlab, StackedExperts};

pub struct Experts<'a> {
    pub gate: StackedExperts<'a>,
    pub up: StackedExperts<'a>,
    pub down: StackedExperts<'a>,
}

impl Experts<'_> {
    /// Bytes of expert `e`'s three matrices as stored.
    pub fn bytes_of(&self, e: usize) -> usize {
        self.gate.slab_bytes(e) + self.up.slab_bytes(e) + self.down.slab_bytes(e)
    }
}

pub struct SharedExpert<'a> {
    pub mlp: Mlp<'a>,
    /// Qwen2-MoE scales the shared expert by sigmoid(gate . x).
    pub gate: Option<Vec<f32>>,
}

/// Per-expert biases of the gate/up projections (`[n_expert, ff]`) and of the output
/// (`[n_expert, n_embd]`), kept resident (gpt-oss).
pub struct ExpertBiases {
    pub ff: usize,
    pub d: usize,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

impl ExpertBiases {
    pub fn of(&self, e: usize) -> crate::moe::experts::MlpBias<'_> {
        crate::moe::experts::MlpBias {
            gate: &self.gate[e * self.ff..(e + 1) * self.ff],
            up: &self.up[e * self.ff..(e + 1) * self.ff],
            down: &self.down[e * self.d..(e + 1) * self.d],
        }
    }
}

/// A dense MLP that runs beside the routed experts on its own norm, each output normalised
/// before they are summed (Gemma 4: `ffn_norm` -> MLP -> `post_ffw_norm_1`, `pre_ffw_norm_2` ->
/// experts -> `post_ffw_norm_2`).
pub struct DenseBeside<'a> {
    /// Reads the layer's `ffn_norm` output.
    pub mlp: Mlp<'a>,
    /// Normalises the MLP's output.
    pub post_norm: Vec<f32>,
    /// The experts' own input norm.
    pub experts_norm: Vec<f32>,
    /// Normalises the experts' weighted sum.
    pub experts_post_norm: Vec<f32>,
}

pub struct MoeBlock<'a> {
    /// `[n_expert, n_embd]` router.
    pub router: QMatrix<'a>,
    /// With [`super::arch::RouterInput::NormedResidual`], the weights of the router's input
    /// norm (`ffn_gate_inp.scale` times `n_embd^-0.5`).
    pub router_in_scale: Option<Vec<f32>>,
    /// Multiplies each expert's routing weight (Gemma 4's `ffn_down_exps.scale`).
    pub expert_scales: Option<Vec<f32>>,
    pub beside: Option<DenseBeside<'a>>,
    /// Added to the router logits (gpt-oss's `ffn_gate_inp.bias`).
    pub router_bias: Option<Vec<f32>>,
    /// DeepSeek-V3's e_score_correction_bias (`exp_probs_b`): added to the scores for selection.
    pub selection_bias: Option<Vec<f32>>,
    pub experts: Experts<'a>,
    pub expert_biases: Option<ExpertBiases>,
    pub shared: Option<SharedExpert<'a>>,
}

pub enum Ffn<'a> {
    Dense(Mlp<'a>),
    Moe(Box<MoeBlock<'a>>),
}

/// Grouped-query attention.
pub struct Attention<'a> {
    pub wq: QMatrix<'a>,
    pub wk: QMatrix<'a>,
    /// None: the key projection is also the values' (Gemma 4's `attention_k_eq_v` layers).
    pub wv: Option<QMatrix<'a>>,
    pub wo: QMatrix<'a>,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// Bias of the output projection (gpt-oss).
    pub bo: Option<Vec<f32>>,
    /// RMSNorm of queries and keys before rope.
    pub qk_norm: Option<QkNormWeights>,
    /// Per query head, a learned logit that joins every softmax and takes its share of the
    /// probability without a value (gpt-oss's attention sinks).
    pub sinks: Option<Vec<f32>>,
    /// Keys older than this many positions are masked (this layer's sliding window).
    pub window: Option<usize>,
    /// `wq` gives each head's query and then its output gate (`[n_head * 2 * head_dim, d]`);
    /// the attended values are multiplied by `sigmoid(gate)` (Qwen3.5).
    pub output_gate: bool,
}

/// Query and key norm weights: `head_dim_k` long, applied to each head (Qwen3-MoE), or as long as
/// the whole projection (OLMoE).
pub struct QkNormWeights {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
}

/// How MLA projects queries.
pub enum QueryProj<'a> {
    /// `[n_head * qk_head_dim, n_embd]`.
    Direct(QMatrix<'a>),
    /// q LoRA: `b(norm(a x))` with `a` `[q_lora_rank, n_embd]`, `b` `[n_head * qk_head_dim, q_lora_rank]`.
    LoRa {
        a: QMatrix<'a>,
        norm: Vec<f32>,
        b: QMatrix<'a>,
    },
}

/// Multi-head latent attention weights, split as llama.cpp writes them for the absorbed form.
pub struct MlaAttention<'a> {
    pub q: QueryProj<'a>,
    /// `[kv_lora_rank + qk_rope, n_embd]`: the latent, then the shared rotary key.
    pub wkv_a: QMatrix<'a>,
    pub kv_a_norm: Vec<f32>,
    /// Per head `[kv_lora_rank, qk_nope]` (W_kb transposed): maps a query's non-rotary part
    /// into latent space.
    pub wk_b: StackedExperts<'a>,
    /// Per head `[v_head_dim, kv_lora_rank]`: decompresses the attended latent into values.
    pub wv_b: StackedExperts<'a>,
    /// `[n_embd, n_head * v_head_dim]`.
    pub wo: QMatrix<'a>,
}

/// LFM2's gated short convolution: `B, C, x = in_proj(h)`, `y = C * conv(B * x)` with a causal
/// depthwise convolution over the last `taps` positions, `out = out_proj(y)`.
pub struct ShortConv<'a> {
    /// `[3 * n_embd, n_embd]`: the rows of B, then C, then x.
    pub in_proj: QMatrix<'a>,
    /// `[n_embd, taps]`: channel `c`'s taps, oldest position first.
    pub conv: Vec<f32>,
    pub taps: usize,
    /// `[n_embd, n_embd]`.
    pub out_proj: QMatrix<'a>,
}

/// Qwen3.5's Gated DeltaNet (llama.cpp's names): `qkv = attn_qkv x` through a causal depthwise
/// convolution and SiLU, q/k L2-normalised per head, a delta-rule update of a
/// `[head_k_dim, head_v_dim]` state per value head decayed by
/// `exp(ssm_a * softplus(ssm_alpha x + ssm_dt))` with rate `sigmoid(ssm_beta x)`, the read-out
/// RMS-normalised per head (`ssm_norm`) times `silu(attn_gate x)`, then `ssm_out`.
pub struct GatedDeltaNet<'a> {
    pub dims: GdnParams,
    /// `[conv_dim, n_embd]`: q (`n_k_heads * head_k_dim`), k, then v rows.
    pub qkv: QMatrix<'a>,
    /// `[value_dim, n_embd]`: the output gate `z`.
    pub gate: QMatrix<'a>,
    /// `[n_v_heads, n_embd]` each: the update rate's and the decay's logits.
    pub beta: QMatrix<'a>,
    pub alpha: QMatrix<'a>,
    /// `[conv_dim, conv_kernel]`: channel `c`'s taps, oldest position first.
    pub conv: Vec<f32>,
    /// `[n_v_heads]`: added to the decay logits.
    pub dt_bias: Vec<f32>,
    /// `[n_v_heads]`: `-exp(A_log)`, negative.
    pub a: Vec<f32>,
    /// `[head_v_dim]`: the read-out's RMSNorm weights, shared by the value heads.
    pub norm: Vec<f32>,
    /// `[n_embd, value_dim]`.
    pub out: QMatrix<'a>,
}

/// A Mamba-2 layer (llama.cpp's names): `z, xBC, dt = ssm_in x`; `xBC` through a causal
/// depthwise convolution (`ssm_conv1d`, with its bias) and SiLU, split into x (heads of
/// `head_dim`), B and C (`d_state` per group); per head the selective scan of a
/// `[head_dim, d_state]` state decayed by `exp(ssm_a * softplus(dt + ssm_dt))`, read out by C,
/// plus `ssm_d * x`; then `ssm_norm(y * silu(z))` with one RMS per group, and `ssm_out`.
pub struct Mamba2<'a> {
    pub dims: Mamba2Params,
    /// `[d_inner + conv_dim + n_heads, n_embd]`: z, then x, B, C, then dt rows.
    pub in_proj: QMatrix<'a>,
    /// `[conv_dim, conv_kernel]`: channel `c`'s taps, oldest position first.
    pub conv: Vec<f32>,
    /// `[conv_dim]`.
    pub conv_bias: Option<Vec<f32>>,
    /// `[n_heads]`: added to dt before the softplus.
    pub dt_bias: Vec<f32>,
    /// `[n_heads]`: `-exp(A_log)`, negative.
    pub a: Vec<f32>,
    /// `[n_heads]`: the skip connection's weight per head.
    pub d: Vec<f32>,
    /// `[d_inner]`: the gated norm's weights (group `g` normalises channels
    /// `g * d_inner / n_groups..`).
    pub norm: Vec<f32>,
    /// `[n_embd, d_inner]`.
    pub out: QMatrix<'a>,
}

/// What mixes information across positions in a layer; its per-session state lives in
/// [`super::state::SequenceState`].
pub enum Mixer<'a> {
    Attention(Attention<'a>),
    Mla(MlaAttention<'a>),
    ShortConv(ShortConv<'a>),
    GatedDeltaNet(Box<GatedDeltaNet<'a>>),
    Mamba2(Box<Mamba2<'a>>),
}

/// One block: `x += mixer(norm(x))`, then `x += ffn(norm(x))` (each scaled by the residual
/// scale, each output normalised first with sandwich norms), then `x *= out_scale`.
pub struct Layer<'a> {
    pub mixer_norm: Vec<f32>,
    pub mixer: Mixer<'a>,
    /// Normalises the mixer's output (`post_attention_norm`).
    pub mixer_post_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn<'a>,
    /// Normalises the feed-forward output (`post_ffw_norm`).
    pub ffn_post_norm: Option<Vec<f32>>,
    /// Multiplies the layer's output (`layer_output_scale.weight`, Gemma 4).
    pub out_scale: Option<f32>,
}

pub struct Model<'a> {
    pub hp: HParams,
    pub file: &'a GgufFile,
    /// `[n_vocab, n_embd]`.
    pub tok_embd: QMatrix<'a>,
    pub layers: Vec<Layer<'a>>,
    pub output_norm: Vec<f32>,
    /// `[n_vocab, n_embd]`; the embedding itself when the model ties them.
    pub output: QMatrix<'a>,
    /// A decoupled router deciding every layer's experts (Read-ME); the layers' own gates are
    /// then unused.
    pub router: Option<crate::moe::decoupled::DecoupledRouter>,
    /// Rope frequency factors of the full-attention layers (`rope_freqs.weight`,
    /// `[rope_dim / 2]`): each pair's frequency is divided by its factor (Gemma 4's
    /// proportional rope stops pairs with 1e30).
    pub rope_freqs: Option<Vec<f32>>,
}

impl Model<'_> {
    /// The indices of the layers whose feed-forward is routed experts.
    pub fn moe_layers(&self) -> Vec<usize> {
        let moe = |(i, l): (usize, &Layer)| matches!(l.ffn, Ffn::Moe(_)).then_some(i);
        self.layers.iter().enumerate().filter_map(moe).collect()
    }

    /// An upper bound of the scratch buffers a forward pass of `rows` rows grows to, from the
    /// buffers it holds per row: the residual stream and its copies (x, normalised input,
    /// sublayer output, the FFN's prepared input and transposed output: about 8 x n_embd),
    /// attention's queries, keys, values and attended values, the router logits, and per routed
    /// copy of a row (top-k per row) its gathered input and gate/up hidden rows.
    pub fn batch_scratch_bytes(&self, rows: usize) -> usize {
        let hp = &self.hp;
        let ff = self
            .layers
            .iter()
            .filter_map(|l| match &l.ffn {
                Ffn::Moe(m) => Some(m.experts.gate.rows),
                Ffn::Dense(_) => None,
            })
            .max()
            .unwrap_or(0);
        let attention = 2 * (hp.n_head + hp.n_head_kv) * hp.head_dim_k.max(hp.head_dim_v);
        let per_row =
            8 * hp.n_embd + attention + hp.n_expert + hp.n_expert_used * (hp.n_embd + 2 * ff);
        rows * per_row * std::mem::size_of::<f32>()
    }

    /// A routing trace to replay on this model (see [`RouteReplay`]).
    pub fn route_replay(&self, prefix: &std::path::Path) -> Result<RouteReplay, ReplayError> {
        let hp = &self.hp;
        let layers = self.moe_layers();
        RouteReplay::open(prefix, hp.n_layer, &layers, hp.n_expert, hp.n_expert_used)
    }

    /// Where every routed expert's slabs are in the file: what the expert cache reads.
    pub fn expert_layout(&self) -> ExpertLayout {
        let spec = |s: &StackedExperts, e: usize| SlabSpec {
            ty: s.slabs[e].ty,
            rows: s.rows,
            cols: s.cols,
            file_offset: s.slabs[e].file_offset as u64,
            bytes: s.slab_bytes(e),
        };
        let layers = self.layers.iter().map(|l| match &l.ffn {
            Ffn::Moe(moe) => {
                let x = &moe.experts;
                let experts = (0..x.gate.n_expert)
                    .map(|e| [spec(&x.gate, e), spec(&x.up, e), spec(&x.down, e)]);
                Some(experts.collect())
            }
            Ffn::Dense(_) => None,
        });
        ExpertLayout::new(layers.collect())
    }
}

impl<'a> Model<'a> {
    pub fn load(file: &'a GgufFile) -> Result<Self, ModelError> {
        let lk = Lookup {
            file,
            kernels: crate::tensor::kernels::best(),
        };
        let embd_info = lk.require("token_embd.weight")?;
        let n_vocab = *embd_info.dims.get(1).ok_or_else(|| ModelError::Shape {
            name: "token_embd.weight".into(),
            expected: vec![0, 0],
            found: embd_info.dims.clone(),
        })?;
        let hp = HParams::from_header(file.header(), n_vocab)?;
        let d = hp.n_embd;
        let tok_embd = lk.matrix_by_rows("token_embd.weight", n_vocab, d)?;
        let output = if lk.has("output.weight") {
            lk.matrix("output.weight", n_vocab, d)?
        } else {
            tok_embd
        };

        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let mixer = match hp.mla {
                _ if hp.is_recurrent(i) => match hp.traits.recurrent_mixer {
                    RecurrentMixer::ShortConv => Mixer::ShortConv(short_conv(&lk, &hp, i)?),
                    RecurrentMixer::GatedDeltaNet => {
                        Mixer::GatedDeltaNet(Box::new(gated_delta_net(&lk, &hp, i)?))
                    }
                    RecurrentMixer::Mamba2 => Mixer::Mamba2(Box::new(mamba2(&lk, &hp, i)?)),
                },
                None => Mixer::Attention(gqa_attention(&lk, &hp, i)?),
                Some(p) => Mixer::Mla(mla_attention(&lk, &hp, &p, i)?),
            };
            let ffn = if lk.has(&n("ffn_gate_inp.weight")) {
                let e = hp.n_expert;
                let fused = lk.info(&n("ffn_gate_up_exps.weight"));
                let ff = match (fused, lk.info(&n("ffn_gate_exps.weight"))) {
                    (_, Some(info)) => *info.dims.get(1).unwrap_or(&0),
                    (Some(info), None) => *info.dims.get(1).unwrap_or(&0) / 2,
                    (None, None) => {
                        let name = crate::moe::calib::per_expert_name(&n("ffn_gate_exps"), 0);
                        *lk.require(&name)?.dims.get(1).unwrap_or(&0)
                    }
                };
                let (gate, up) = match fused.filter(|_| !lk.has(&n("ffn_gate_exps.weight"))) {
                    Some(_) => lk.gate_up_halves(&n("ffn_gate_up_exps.weight"), ff, d, e)?,
                    None => (
                        lk.stacked(&n("ffn_gate_exps.weight"), ff, d, e)?,
                        lk.stacked(&n("ffn_up_exps.weight"), ff, d, e)?,
                    ),
                };
                let shared = if lk.has(&n("ffn_gate_shexp.weight")) {
                    let sff = lk
                        .require(&n("ffn_gate_shexp.weight"))?
                        .dims
                        .get(1)
                        .copied();
                    let sff = sff.unwrap_or(0);
                    Some(SharedExpert {
                        mlp: Mlp {
                            gate: lk.matrix(&n("ffn_gate_shexp.weight"), sff, d)?,
                            up: lk.matrix(&n("ffn_up_shexp.weight"), sff, d)?,
                            down: lk.matrix(&n("ffn_down_shexp.weight"), d, sff)?,
                        },
                        gate: lk.opt_vector(&n("ffn_gate_inp_shexp.weight"), d)?,
                    })
                } else {
                    None
                };
                let expert_biases = if lk.has(&n("ffn_gate_exps.bias")) {
                    Some(ExpertBiases {
                        ff,
                        d,
                        gate: lk.matrix_f32(&n("ffn_gate_exps.bias"), e, ff)?,
                        up: lk.matrix_f32(&n("ffn_up_exps.bias"), e, ff)?,
                        down: lk.matrix_f32(&n("ffn_down_exps.bias"), e, d)?,
                    })
                } else {
                    None
                };
                Ffn::Moe(Box::new(MoeBlock {
                    router: lk.matrix(&n("ffn_gate_inp.weight"), e, d)?,
                    router_in_scale: router_in_scale(&lk, &hp, i)?,
                    expert_scales: lk.opt_vector(&n("ffn_down_exps.scale"), e)?,
                    beside: dense_beside(&lk, &hp, i)?,
                    router_bias: lk.opt_vector(&n("ffn_gate_inp.bias"), e)?,
                    selection_bias: lk.opt_vector(&n("exp_probs_b.bias"), e)?,
                    experts: Experts {
                        gate,
                        up,
                        down: lk.stacked(&n("ffn_down_exps.weight"), d, ff, e)?,
                    },
                    expert_biases,
                    shared,
                }))
            } else {
                let ff = lk.require(&n("ffn_gate.weight"))?.dims.get(1).copied();
                let ff = ff.unwrap_or(0);
                Ffn::Dense(Mlp {
                    gate: lk.matrix(&n("ffn_gate.weight"), ff, d)?,
                    up: lk.matrix(&n("ffn_up.weight"), ff, d)?,
                    down: lk.matrix(&n("ffn_down.weight"), d, ff)?,
                })
            };
            let post_norm = |name: &str| match hp.traits.sandwich_norms {
                true => lk.vector(&n(name), d).map(Some),
                false => Ok(None),
            };
            layers.push(Layer {
                mixer_norm: lk.vector(&n("attn_norm.weight"), d)?,
                mixer,
                mixer_post_norm: post_norm("post_attention_norm.weight")?,
                ffn_norm: lk.vector(&n(&format!("{}.weight", hp.traits.ffn_norm_tensor)), d)?,
                ffn,
                ffn_post_norm: post_norm("post_ffw_norm.weight")?,
                out_scale: lk
                    .opt_vector(&n("layer_output_scale.weight"), 1)?
                    .map(|v| v[0]),
            });
        }
        let router = crate::moe::decoupled::DecoupledRouter::load(file, n_vocab, hp.n_expert)?;
        let rope_freqs = lk.opt_vector("rope_freqs.weight", hp.rope_dim / 2)?;
        let output_norm = lk.vector(&format!("{}.weight", hp.traits.output_norm_tensor), d)?;
        Ok(Self {
            hp,
            file,
            tok_embd,
            layers,
            output_norm,
            output,
            router,
            rope_freqs,
        })
    }
}

fn short_conv<'a>(lk: &Lookup<'a>, hp: &HParams, i: usize) -> Result<ShortConv<'a>, ModelError> {
    let n = |s: &str| format!("blk.{i}.{s}");
    let (d, taps) = (hp.n_embd, hp.shortconv_l_cache);
    Ok(ShortConv {
        in_proj: lk.matrix(&n("shortconv.in_proj.weight"), 3 * d, d)?,
        conv: lk.matrix_f32(&n("shortconv.conv.weight"), d, taps)?,
        taps,
        out_proj: lk.matrix(&n("shortconv.out_proj.weight"), d, d)?,
    })
}

fn gated_delta_net<'a>(
    lk: &Lookup<'a>,
    hp: &HParams,
    i: usize,
) -> Result<GatedDeltaNet<'a>, ModelError> {
    let n = |s: &str| format!("blk.{i}.{s}");
    let d = hp.n_embd;
    let p = hp.gdn.ok_or_else(|| {
        ModelError::Unsupported(format!(
            "layer {i} is marked recurrent but the file has no Gated DeltaNet dimensions"
        ))
    })?;
    let (cd, vd, nv) = (p.conv_dim(), p.value_dim(), p.n_v_heads);
    Ok(GatedDeltaNet {
        dims: p,
        qkv: lk.matrix(&n("attn_qkv.weight"), cd, d)?,
        gate: lk.matrix(&n("attn_gate.weight"), vd, d)?,
        beta: lk.matrix(&n("ssm_beta.weight"), nv, d)?,
        alpha: lk.matrix(&n("ssm_alpha.weight"), nv, d)?,
        conv: lk.matrix_f32(&n("ssm_conv1d.weight"), cd, p.conv_kernel)?,
        dt_bias: lk.vector(&n("ssm_dt.bias"), nv)?,
        a: lk.vector(&n("ssm_a"), nv)?,
        norm: lk.vector(&n("ssm_norm.weight"), p.head_v_dim)?,
        out: lk.matrix(&n("ssm_out.weight"), d, vd)?,
    })
}

fn mamba2<'a>(lk: &Lookup<'a>, hp: &HParams, i: usize) -> Result<Mamba2<'a>, ModelError> {
    let n = |s: &str| format!("blk.{i}.{s}");
    let d = hp.n_embd;
    let p = hp.mamba.ok_or_else(|| {
        ModelError::Unsupported(format!(
            "layer {i} is marked recurrent but the file has no Mamba-2 dimensions"
        ))
    })?;
    let (cd, nh, ng) = (p.conv_dim(), p.n_heads, p.n_groups);
    // ssm_a and ssm_d are `[1, n_heads]` and the norm `[d_inner / n_groups, n_groups]`, as
    // llama.cpp's converter shapes them.
    Ok(Mamba2 {
        dims: p,
        in_proj: lk.matrix(&n("ssm_in.weight"), p.in_proj_dim(), d)?,
        conv: lk.matrix_f32(&n("ssm_conv1d.weight"), cd, p.conv_kernel)?,
        conv_bias: lk.opt_vector(&n("ssm_conv1d.bias"), cd)?,
        dt_bias: lk.vector(&n("ssm_dt.bias"), nh)?,
        a: lk.matrix_f32(&n("ssm_a"), nh, 1)?,
        d: lk.matrix_f32(&n("ssm_d"), nh, 1)?,
        norm: lk.matrix_f32(&n("ssm_norm.weight"), ng, p.d_inner / ng)?,
        out: lk.matrix(&n("ssm_out.weight"), d, p.d_inner)?,
    })
}

fn gqa_attention<'a>(lk: &Lookup<'a>, hp: &HParams, i: usize) -> Result<Attention<'a>, ModelError> {
    let n = |s: &str| format!("blk.{i}.{s}");
    let d = hp.n_embd;
    let dims = hp.layer_dims(i);
    let q_dim = hp.n_head * dims.head_dim_k;
    let k_dim = dims.n_head_kv * dims.head_dim_k;
    let v_dim = dims.n_head_kv * dims.head_dim_v;
    let o_dim = hp.n_head * dims.head_dim_v;
    let qk_norm = match hp.traits.qk_norm {
        QkNorm::None => None,
        QkNorm::PerHead => Some(QkNormWeights {
            q: lk.vector(&n("attn_q_norm.weight"), dims.head_dim_k)?,
            k: lk.vector(&n("attn_k_norm.weight"), dims.head_dim_k)?,
        }),
        QkNorm::PerHeadIfPresent if !lk.has(&n("attn_q_norm.weight")) => None,
        QkNorm::PerHeadIfPresent => Some(QkNormWeights {
            q: lk.vector(&n("attn_q_norm.weight"), dims.head_dim_k)?,
            k: lk.vector(&n("attn_k_norm.weight"), dims.head_dim_k)?,
        }),
        QkNorm::WholeProjection => Some(QkNormWeights {
            q: lk.vector(&n("attn_q_norm.weight"), q_dim)?,
            k: lk.vector(&n("attn_k_norm.weight"), k_dim)?,
        }),
    };
    let output_gate = hp.traits.attention_output_gate;
    if output_gate && dims.head_dim_k != dims.head_dim_v {
        return Err(ModelError::Metadata {
            key: format!("{}.attention.value_length", hp.arch.gguf_name()),
            why: format!(
                "gated attention needs equal key and value head sizes, found {} and {}",
                dims.head_dim_k, dims.head_dim_v
            ),
        });
    }
    let values_are_keys = hp.traits.values_may_be_keys
        && !lk.has(&n("attn_v.weight"))
        && dims.head_dim_k == dims.head_dim_v;
    Ok(Attention {
        wq: lk.matrix(
            &n("attn_q.weight"),
            if output_gate { 2 * q_dim } else { q_dim },
            d,
        )?,
        wk: lk.matrix(&n("attn_k.weight"), k_dim, d)?,
        wv: match values_are_keys {
            true => None,
            false => Some(lk.matrix(&n("attn_v.weight"), v_dim, d)?),
        },
        wo: lk.matrix(&n("attn_output.weight"), d, o_dim)?,
        bq: lk.opt_vector(&n("attn_q.bias"), q_dim)?,
        bk: lk.opt_vector(&n("attn_k.bias"), k_dim)?,
        bv: lk.opt_vector(&n("attn_v.bias"), v_dim)?,
        bo: lk.opt_vector(&n("attn_output.bias"), d)?,
        qk_norm,
        sinks: lk.opt_vector(&n("attn_sinks.weight"), hp.n_head)?,
        window: hp.layer_window(i),
        output_gate,
    })
}

/// The router's input norm weights when it reads the normalised residual (Gemma 4): llama.cpp
/// multiplies the unweighted norm by `n_embd^-0.5` and `ffn_gate_inp.scale`.
fn router_in_scale(lk: &Lookup, hp: &HParams, i: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if hp.traits.router_input != super::arch::RouterInput::NormedResidual {
        return Ok(None);
    }
    let root = 1.0 / (hp.n_embd as f32).sqrt();
    let mut w = lk.vector(&format!("blk.{i}.ffn_gate_inp.scale"), hp.n_embd)?;
    w.iter_mut().for_each(|v| *v *= root);
    Ok(Some(w))
}

/// A MoE layer's dense MLP beside its experts, when the layer has `ffn_gate` too (Gemma 4).
fn dense_beside<'a>(
    lk: &Lookup<'a>,
    hp: &HParams,
    i: usize,
) -> Result<Option<DenseBeside<'a>>, ModelError> {
    let n = |s: &str| format!("blk.{i}.{s}");
    let Some(gate) = lk.info(&n("ffn_gate.weight")) else {
        return Ok(None);
    };
    let (d, ff) = (hp.n_embd, gate.dims.get(1).copied().unwrap_or(0));
    Ok(Some(DenseBeside {
        mlp: Mlp {
            gate: lk.matrix(&n("ffn_gate.weight"), ff, d)?,
            up: lk.matrix(&n("ffn_up.weight"), ff, d)?,
            down: lk.matrix(&n("ffn_down.weight"), d, ff)?,
        },
        post_norm: lk.vector(&n("post_ffw_norm_1.weight"), d)?,
        experts_norm: lk.vector(&n("pre_ffw_norm_2.weight"), d)?,
        experts_post_norm: lk.vector(&n("post_ffw_norm_2.weight"), d)?,
    }))
}

fn mla_attention<'a>(
    lk: &Lookup<'a>,
    hp: &HParams,
    p: &MlaParams,
    i: usize,
) -> Result<MlaAttention<'a>, ModelError> {
    let n = |s: &str| format!("blk.{i}.{s}");
    let d = hp.n_embd;
    let q_dim = hp.n_head * p.qk_head_dim();
    let rank = p.kv_lora_rank;
    if lk.has(&n("attn_kv_b.weight")) && !lk.has(&n("attn_k_b.weight")) {
        return Err(ModelError::Unsupported(
            "this deepseek2 file stores attn_kv_b unsplit (old llama.cpp converter); re-convert \
             it with moe-convert to get attn_k_b/attn_v_b"
                .into(),
        ));
    }
    let q = if p.q_lora_rank > 0 {
        QueryProj::LoRa {
            a: lk.matrix(&n("attn_q_a.weight"), p.q_lora_rank, d)?,
            norm: lk.vector(&n("attn_q_a_norm.weight"), p.q_lora_rank)?,
            b: lk.matrix(&n("attn_q_b.weight"), q_dim, p.q_lora_rank)?,
        }
    } else {
        QueryProj::Direct(lk.matrix(&n("attn_q.weight"), q_dim, d)?)
    };
    Ok(MlaAttention {
        q,
        wkv_a: lk.matrix(&n("attn_kv_a_mqa.weight"), rank + p.qk_rope, d)?,
        kv_a_norm: lk.vector(&n("attn_kv_a_norm.weight"), rank)?,
        wk_b: lk.stacked(&n("attn_k_b.weight"), rank, p.qk_nope, hp.n_head)?,
        wv_b: lk.stacked(&n("attn_v_b.weight"), p.v_head_dim, rank, hp.n_head)?,
        wo: lk.matrix(&n("attn_output.weight"), d, hp.n_head * p.v_head_dim)?,
    })
}
