//! Multi-head latent attention (DeepSeek-V2/V3) in its absorbed form, as llama.cpp runs it.
//!
//! transformers decompresses every cached latent into per-head keys `k = [W_kb[h] c ; k_pe]` and
//! values `v = W_vb[h] c`. Since `q_nope . (W_kb[h] c) = (W_kb[h]^T q_nope) . c`, the query can be
//! moved into latent space once per token instead, and the values decompressed once per token
//! after the weighted sum over the latents. The cache then holds only `[c ; k_pe]` per token
//! (`kv_lora_rank + qk_rope` values, shared by all heads), and attention is plain MQA with keys of
//! that width and values equal to the first `kv_lora_rank` entries of the keys.
//!
//! Shapes: `n` tokens, `d = n_embd`, `h` heads, `r = kv_lora_rank`, `nope/rope` the non-rotary
//! and rotary query/key dims, `dv = v_head_dim`.

use crate::tensor::{matmul, Kernels, MatmulScratch, QMatrix};

use super::hparams::HParams;
use super::ops::{attend, norm_in_place, rope, RopeTables};
use super::profile::{Phase, Profiler};
use super::state::KvLayer;
use super::weights::{MlaAttention, QueryProj};

/// transformers (and DeepSeek's reference code) build the q/kv LoRA norms with the default
/// epsilon, not `rms_norm_eps` (llama.cpp uses the model's; all released checkpoints use 1e-6).
const LATENT_NORM_EPS: f32 = 1e-6;

/// Buffers reused across calls.
#[derive(Default)]
pub struct MlaScratch {
    /// Attention scores: one context-long row per attention task.
    scores: Vec<f32>,
    /// `[n, q_lora_rank]`.
    qa: Vec<f32>,
    /// `[n, h * (nope + rope)]`.
    q: Vec<f32>,
    /// `[n, r + rope]`: normalised latent and roped shared key, exactly what is cached.
    kv: Vec<f32>,
    /// `[n, h, r + rope]`: absorbed queries.
    qc: Vec<f32>,
    /// `[n, h, r]`: attention-weighted latents.
    lat: Vec<f32>,
    /// `[n, h * dv]`: decompressed values.
    o: Vec<f32>,
    /// One head's rows gathered contiguously, and the product.
    gather: Vec<f32>,
    product: Vec<f32>,
    mm: MatmulScratch,
}

impl MlaScratch {
    /// The last batch's normalised query latents, `[n, q_lora_rank]` (`attn_q_b`'s input; empty
    /// without a query LoRA).
    pub fn query_latents(&self) -> &[f32] {
        &self.qa
    }

    /// The last batch's decompressed values, `[n, h * dv]` (`attn_output`'s input).
    pub fn values(&self) -> &[f32] {
        &self.o
    }

    /// The last batch's queries, `[n, h, nope + rope]` (each head's first `nope` values are
    /// `attn_k_b`'s input for that head).
    pub fn queries(&self) -> &[f32] {
        &self.q
    }

    /// The last batch's attention-weighted latents, `[n, h, r]` (`attn_v_b`'s input per head).
    pub fn latents(&self) -> &[f32] {
        &self.lat
    }
}

/// Self-attention of the batch `xn` (`[n, d]`) at positions `pos0..pos0 + n`; writes the
/// projected output to `proj` (`[n, d]`) and the batch's latents to `kv`.
#[allow(clippy::too_many_arguments)]
pub fn mla_attention(
    k: &Kernels,
    hp: &HParams,
    a: &MlaAttention,
    xn: &[f32],
    n: usize,
    pos0: usize,
    rope_tables: &RopeTables,
    kv: &mut KvLayer,
    s: &mut MlaScratch,
    proj: &mut Vec<f32>,
    prof: &mut Profiler,
) {
    let p = hp.mla.expect("MLA weights come with MLA hyper-parameters");
    let (h, r, nope, rope_dim, dv) = (
        hp.n_head,
        p.kv_lora_rank,
        p.qk_nope,
        p.qk_rope,
        p.v_head_dim,
    );
    let dqk = nope + rope_dim;
    let dc = r + rope_dim;
    let mm = &mut s.mm;

    // q = W_q x, or W_qb norm(W_qa x)                                        [n, h * dqk]
    s.q.resize(n * h * dqk, 0.0);
    match &a.q {
        QueryProj::Direct(w) => matmul(k, w, xn, n, &mut s.q, mm),
        QueryProj::LoRa { a: wa, norm, b } => {
            s.qa.resize(n * wa.rows, 0.0);
            matmul(k, wa, xn, n, &mut s.qa, mm);
            norm_in_place(&mut s.qa, norm, wa.rows, LATENT_NORM_EPS, k);
            matmul(k, b, &s.qa, n, &mut s.q, mm);
        }
    }

    // [c ; k_pe] = W_kva x; c = norm(c); k_pe = rope(k_pe)                   [n, r + rope]
    s.kv.resize(n * dc, 0.0);
    matmul(k, &a.wkv_a, xn, n, &mut s.kv, mm);
    for t in 0..n {
        let cos_sin = rope_tables.full().at(pos0 + t);
        let row = &mut s.kv[t * dc..(t + 1) * dc];
        let (c, k_pe) = row.split_at_mut(r);
        norm_in_place(c, &a.kv_a_norm, r, LATENT_NORM_EPS, k);
        rope(k_pe, cos_sin, hp.traits.rope, rope_dim);
        for head in s.q[t * h * dqk..(t + 1) * h * dqk].chunks_exact_mut(dqk) {
            rope(&mut head[nope..], cos_sin, hp.traits.rope, rope_dim);
        }
    }
    kv.store(pos0, &s.kv, &[], n);

    // Absorbed queries: qc[t, h] = [W_kb[h]^T q_nope[t, h] ; q_pe[t, h]]     [n, h, r + rope]
    s.qc.resize(n * h * dc, 0.0);
    for head in 0..h {
        let w = a.wk_b.expert(head);
        head_product(
            k,
            &w,
            &s.q,
            (n, h, head, dqk),
            &mut s.gather,
            &mut s.product,
            mm,
        );
        for t in 0..n {
            let dst = &mut s.qc[(t * h + head) * dc..(t * h + head + 1) * dc];
            dst[..r].copy_from_slice(&s.product[t * r..(t + 1) * r]);
            let at = (t * h + head) * dqk + nope;
            dst[r..].copy_from_slice(&s.q[at..at + rope_dim]);
        }
    }

    // MQA over the cached latents: lat[t, h] = sum_j softmax_j(qc . [c_j ; k_pe_j]) c_j
    s.lat.resize(n * h * r, 0.0);
    attend(
        k,
        kv,
        &s.qc,
        (h, 1, dc, r),
        pos0,
        hp.sliding_window,
        None,
        hp.attention_scale,
        &mut s.lat,
        &mut s.scores,
    );

    // Values: o[t, h] = W_vb[h] lat[t, h]                                    [n, h * dv]
    s.o.resize(n * h * dv, 0.0);
    for head in 0..h {
        let w = a.wv_b.expert(head);
        head_product(
            k,
            &w,
            &s.lat,
            (n, h, head, r),
            &mut s.gather,
            &mut s.product,
            mm,
        );
        for t in 0..n {
            s.o[(t * h + head) * dv..(t * h + head + 1) * dv]
                .copy_from_slice(&s.product[t * dv..(t + 1) * dv]);
        }
    }

    proj.resize(n * hp.n_embd, 0.0);
    matmul(k, &a.wo, &s.o, n, proj, mm);
    // The projections and the core are not split: all counted as core.
    prof.lap(Phase::AttnCore);
}

/// `product[t] = w . src[t, head][..w.cols]` for the `n` tokens of `src` (`[n, h, stride]`): one
/// head's slice of every token gathered contiguously, then one product over all of them.
fn head_product(
    k: &Kernels,
    w: &QMatrix,
    src: &[f32],
    (n, h, head, stride): (usize, usize, usize, usize),
    gather: &mut Vec<f32>,
    product: &mut Vec<f32>,
    mm: &mut MatmulScratch,
) {
    gather.clear();
    for t in 0..n {
        let at = (t * h + head) * stride;
        gather.extend_from_slice(&src[at..at + w.cols]);
    }
    product.resize(n * w.rows, 0.0);
    matmul(k, w, gather, n, product, mm);
}
