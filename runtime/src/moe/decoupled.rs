//! A decoupled router (Read-ME, arXiv 2410.19123): a small causal transformer over token ids,
//! separate from the backbone, that scores every token's experts before the backbone runs. Every
//! MoE layer then routes by these scores instead of its own gate, so a batch's whole expert set
//! is known ahead and the expert cache can load it (and plan Belady eviction) before layer 0.
//!
//! Network (Read-ME's autoregressive `cluster_predictor`, scripts/fixtures/make_readme_fixture.py is the
//! PyTorch reference), width `d`, `h` heads of `d / h`:
//!
//! ```text
//! x = embed[token]                                                    [n, d]
//! per block:  a = norm(x);  q, k, v = a Wq + bq, a Wk + bk, a Wv + bv  (rotate-half RoPE on q, k)
//!             x += softmax(q k^T / normalizer, causal) v Wo + bo      (not / sqrt(head dim))
//!             x += silu(norm(x) W1 + b1) W2 + b2
//! logits = norm(x) Wout + bout                                        [n, n_expert]
//! ```
//!
//! The layers' gating (softmax, top-k, renormalisation) is applied to these logits as to their
//! own; with Read-ME's top-1 the single weight is 1. GGUF keys and tensor names: see
//! `moe-convert`'s `router` module (`moe_edge.router.*`). All weights are f32 and the arithmetic
//! is plain f32, so the scores match PyTorch to float tolerance.

use crate::gguf::{GgufFile, TensorInfo};

/// Why a decoupled router cannot be loaded or run (the model's errors wrap these).
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("the model file has no router tensor `{0}` (re-convert it with moe-convert)")]
    MissingTensor(String),
    #[error("router tensor `{name}` has ggml shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("metadata `{key}` {why}")]
    Metadata { key: String, why: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("context is full: {needed} positions needed, the router holds {n_ctx}")]
    ContextFull { n_ctx: usize, needed: usize },
    #[error("bad input: {0}")]
    Input(String),
}

/// GGUF prefix of the router's keys and tensors.
pub const PREFIX: &str = "moe_edge.router.";

struct Block {
    attn_norm: Vec<f32>,
    /// `[d, d]` row-major `[out, in]` (as HF's `Linear.weight`), with `[d]` biases.
    wq: (Vec<f32>, Vec<f32>),
    wk: (Vec<f32>, Vec<f32>),
    wv: (Vec<f32>, Vec<f32>),
    wo: (Vec<f32>, Vec<f32>),
    ffn_norm: Vec<f32>,
    w1: (Vec<f32>, Vec<f32>),
    w2: (Vec<f32>, Vec<f32>),
}

pub struct DecoupledRouter {
    d: usize,
    n_head: usize,
    n_expert: usize,
    normalizer: f32,
    eps: f32,
    /// `[n_vocab, d]`.
    embd: Vec<f32>,
    blocks: Vec<Block>,
    out_norm: Vec<f32>,
    /// `[n_expert, d]` and `[n_expert]`.
    out: (Vec<f32>, Vec<f32>),
    /// RoPE inverse frequencies of one head, `[d / h / 2]`.
    inv_freq: Vec<f32>,
}

/// The router's key/value cache of one sequence: per block `[n_ctx, d]` each.
pub struct RouterState {
    n_ctx: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Reused buffers.
    x: Vec<f32>,
    a: Vec<f32>,
    q: Vec<f32>,
    kk: Vec<f32>,
    vv: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    scores: Vec<f32>,
}

impl DecoupledRouter {
    /// The router stored in `file`, if it has one. `n_vocab`/`n_expert` are the backbone's.
    pub fn load(
        file: &GgufFile,
        n_vocab: usize,
        n_expert: usize,
    ) -> Result<Option<Self>, RouterError> {
        let h = file.header();
        let Some(kind) = h.get(&format!("{PREFIX}kind")) else {
            return Ok(None);
        };
        if kind.as_str() != Some("readme") {
            return Err(RouterError::Unsupported(format!(
                "decoupled router kind {kind:?} is not supported (only \"readme\"); use a newer moe-run"
            )));
        }
        let meta = |k: &str| -> Result<f64, RouterError> {
            let key = format!("{PREFIX}{k}");
            h.get(&key)
                .and_then(|v| v.as_f64().or_else(|| v.as_u64().map(|u| u as f64)))
                .ok_or(RouterError::Metadata {
                    key,
                    why: "is missing or not a number (re-convert the model with moe-convert)"
                        .into(),
                })
        };
        let d = meta("embedding_length")? as usize;
        let n_layer = meta("block_count")? as usize;
        let n_head = meta("head_count")? as usize;
        let normalizer = meta("attention.normalizer")? as f32;
        let theta = meta("rope.freq_base")? as f32;
        let eps = meta("layer_norm_rms_epsilon")? as f32;
        if meta("expert_count")? as usize != n_expert {
            return Err(RouterError::Metadata {
                key: format!("{PREFIX}expert_count"),
                why: format!("differs from the backbone's {n_expert} experts"),
            });
        }
        if n_head == 0 || !d.is_multiple_of(n_head) || !(d / n_head).is_multiple_of(2) {
            return Err(RouterError::Metadata {
                key: format!("{PREFIX}head_count"),
                why: format!("{n_head} does not split width {d} into even head widths"),
            });
        }
        let t = |name: &str, dims: &[usize]| -> Result<Vec<f32>, RouterError> {
            let full = format!("{PREFIX}{name}");
            let info: &TensorInfo = h
                .tensor(&full)
                .ok_or_else(|| RouterError::MissingTensor(full.clone()))?;
            if info.dims != dims {
                return Err(RouterError::Shape {
                    name: full,
                    expected: dims.to_vec(),
                    found: info.dims.clone(),
                });
            }
            let mut out = vec![0f32; dims.iter().product()];
            crate::tensor::quant::dequantize(info.ty, file.tensor_bytes(info), &mut out);
            Ok(out)
        };
        let lin =
            |name: &str, rows: usize, cols: usize| -> Result<(Vec<f32>, Vec<f32>), RouterError> {
                Ok((
                    t(&format!("{name}.weight"), &[cols, rows])?,
                    t(&format!("{name}.bias"), &[rows])?,
                ))
            };
        let mut blocks = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let b = |s: &str| format!("blk.{i}.{s}");
            blocks.push(Block {
                attn_norm: t(&b("attn_norm.weight"), &[d])?,
                wq: lin(&b("attn_q"), d, d)?,
                wk: lin(&b("attn_k"), d, d)?,
                wv: lin(&b("attn_v"), d, d)?,
                wo: lin(&b("attn_output"), d, d)?,
                ffn_norm: t(&b("ffn_norm.weight"), &[d])?,
                w1: lin(&b("ffn_up"), d, d)?,
                w2: lin(&b("ffn_down"), d, d)?,
            });
        }
        let hd = d / n_head;
        // transformers: 1 / theta^(arange(0, hd, 2) / hd) in f32.
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        Ok(Some(Self {
            d,
            n_head,
            n_expert,
            normalizer,
            eps,
            embd: t("token_embd.weight", &[d, n_vocab])?,
            blocks,
            out_norm: t("output_norm.weight", &[d])?,
            out: lin("output", n_expert, d)?,
            inv_freq,
        }))
    }

    pub fn n_expert(&self) -> usize {
        self.n_expert
    }

    /// Bytes of the router's weights.
    pub fn bytes(&self) -> usize {
        let per_block = 6 * (self.d * self.d + self.d) + 2 * self.d;
        4 * (self.embd.len()
            + self.blocks.len() * per_block
            + self.d
            + self.out.0.len()
            + self.out.1.len())
    }

    pub fn new_state(&self, n_ctx: usize) -> RouterState {
        let n = self.blocks.len();
        RouterState {
            n_ctx,
            k: vec![vec![0.0; n_ctx * self.d]; n],
            v: vec![vec![0.0; n_ctx * self.d]; n],
            x: Vec::new(),
            a: Vec::new(),
            q: Vec::new(),
            kk: Vec::new(),
            vv: Vec::new(),
            att: Vec::new(),
            tmp: Vec::new(),
            // The whole context's worth now: decoding then allocates nothing.
            scores: Vec::with_capacity(n_ctx),
        }
    }

    /// Expert logits `[n, n_expert]` of `tokens` at positions `pos..pos + n`; positions before
    /// `pos` must have been run through the same state.
    pub fn logits(
        &self,
        st: &mut RouterState,
        tokens: &[u32],
        pos: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), RouterError> {
        let (n, d) = (tokens.len(), self.d);
        if pos + n > st.n_ctx {
            return Err(RouterError::ContextFull {
                n_ctx: st.n_ctx,
                needed: pos + n,
            });
        }
        let n_vocab = self.embd.len() / d;
        st.x.clear();
        for &t in tokens {
            let t = t as usize;
            if t >= n_vocab {
                return Err(RouterError::Input(format!(
                    "token id {t} is outside the router's vocabulary of {n_vocab}"
                )));
            }
            st.x.extend_from_slice(&self.embd[t * d..(t + 1) * d]);
        }
        let (h, hd) = (self.n_head, d / self.n_head);
        for (bi, b) in self.blocks.iter().enumerate() {
            // Attention: x += attn(norm(x))
            rms_norm(&st.x, &b.attn_norm, self.eps, &mut st.a);
            linear(&st.a, &b.wq, &mut st.q);
            linear(&st.a, &b.wk, &mut st.kk);
            linear(&st.a, &b.wv, &mut st.vv);
            for t in 0..n {
                let p = (pos + t) as f32;
                for head in 0..h {
                    let r = (t * h + head) * hd..(t * h + head + 1) * hd;
                    rope(&mut st.q[r.clone()], p, &self.inv_freq);
                    rope(&mut st.kk[r], p, &self.inv_freq);
                }
            }
            st.k[bi][pos * d..(pos + n) * d].copy_from_slice(&st.kk);
            st.v[bi][pos * d..(pos + n) * d].copy_from_slice(&st.vv);
            st.att.clear();
            st.att.resize(n * d, 0.0);
            let (keys, vals) = (&st.k[bi], &st.v[bi]);
            for t in 0..n {
                let end = pos + t + 1;
                for head in 0..h {
                    let q = &st.q[(t * h + head) * hd..(t * h + head + 1) * hd];
                    st.scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for j in 0..end {
                        let k = &keys[j * d + head * hd..j * d + (head + 1) * hd];
                        let s = dot(q, k) / self.normalizer;
                        max = max.max(s);
                        st.scores.push(s);
                    }
                    let mut sum = 0f32;
                    for s in st.scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut st.att[(t * h + head) * hd..(t * h + head + 1) * hd];
                    for (j, &s) in st.scores.iter().enumerate() {
                        let v = &vals[j * d + head * hd..j * d + (head + 1) * hd];
                        let w = s / sum;
                        o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
                    }
                }
            }
            linear(&st.att, &b.wo, &mut st.tmp);
            st.x.iter_mut().zip(&st.tmp).for_each(|(x, y)| *x += y);
            // MLP: x += W2 silu(W1 norm(x) + b1) + b2
            rms_norm(&st.x, &b.ffn_norm, self.eps, &mut st.a);
            linear(&st.a, &b.w1, &mut st.tmp);
            st.tmp.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp());
            linear(&st.tmp, &b.w2, &mut st.a);
            st.x.iter_mut().zip(&st.a).for_each(|(x, y)| *x += y);
        }
        rms_norm(&st.x, &self.out_norm, self.eps, &mut st.a);
        linear(&st.a, &self.out, out);
        Ok(())
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out[t] = W x[t] + b` with `W` `[rows, cols]` row-major.
fn linear(x: &[f32], (w, b): &(Vec<f32>, Vec<f32>), out: &mut Vec<f32>) {
    let (rows, cols) = (b.len(), w.len() / b.len());
    out.clear();
    for xt in x.chunks_exact(cols) {
        out.extend(
            w.chunks_exact(cols)
                .zip(b)
                .map(|(row, bias)| dot(row, xt) + bias),
        );
    }
    debug_assert_eq!(out.len(), x.len() / cols * rows);
}

/// `w * (x / sqrt(mean(x^2) + eps))` per row.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let d = w.len();
    out.clear();
    for xr in x.chunks_exact(d) {
        let inv = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
        out.extend(xr.iter().zip(w).map(|(v, w)| w * (v * inv)));
    }
}

/// Rotate-half RoPE of one head at position `p`: pairs `(i, i + hd / 2)`.
fn rope(head: &mut [f32], p: f32, inv_freq: &[f32]) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        let (sin, cos) = (p * f).sin_cos();
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos - b * sin;
        head[i + half] = b * cos + a * sin;
    }
}
