//! Grouped-query attention: the mixer of every architecture but DeepSeek's.
//!
//! Shapes: `n` tokens, `d = n_embd`, `hq`/`hkv` query/KV heads of `dk`/`dv` dims.

use super::arch::QkNorm;
use super::hparams::HParams;
use super::ops::{
    add_bias_rows, attend, norm_in_place, rope, sigmoid, unit_norm_in_place, RopeTables,
};
use super::profile::{Phase, Profiler};
use super::state::KvLayer;
use super::weights::Attention;
use crate::tensor::matrix::multi_matmul;
use crate::tensor::{matmul, Kernels, MatmulScratch};

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
pub struct AttentionScratch {
    q: Vec<f32>,
    /// With an output gate: `[n, hq, 2 * dk]` as projected, and the gates `[n, hq * dk]`.
    qg: Vec<f32>,
    gate: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[n, hq, dv]`: the attended values before the output projection.
    attended: Vec<f32>,
    /// One context-long score row per attention task.
    scores: Vec<f32>,
    mm: MatmulScratch,
}

impl AttentionScratch {
    /// The last batch's attended values, `[n, hq * dv]`: the output projection's input.
    pub fn attended(&self) -> &[f32] {
        &self.attended
    }
}

/// One sequence's rows of a batch: `len` tokens from row `row`, at positions `pos..`, and its
/// KV cache for the layer.
pub struct AttnSeq<'c> {
    pub row: usize,
    pub len: usize,
    pub pos: usize,
    pub kv: &'c mut KvLayer,
}

/// Self-attention of layer `layer` over the batch `xn` (`[n, d]`) of one or several sequences
/// (`seqs`, consecutive rows each): the projections run over every row at once (the weights
/// read once per batch), each sequence stores its keys and values in its own cache and attends
/// to its own positions; writes the projected output to `out` (`[n, d]`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    k: &Kernels,
    hp: &HParams,
    layer: usize,
    a: &Attention,
    xn: &[f32],
    n: usize,
    seqs: &mut [AttnSeq],
    rope_tables: &RopeTables,
    s: &mut AttentionScratch,
    out: &mut Vec<f32>,
    prof: &mut Profiler,
) {
    let dims = hp.layer_dims(layer);
    let (hq, hkv, dk, dv) = (hp.n_head, dims.n_head_kv, dims.head_dim_k, dims.head_dim_v);
    let rope_table = rope_tables.for_layer(&dims);

    // q, k, v = W x (+ b)                                    [n, hq * dk], [n, hkv * dk], [n, hkv * dv]
    s.q.resize(n * hq * dk, 0.0);
    s.k.resize(n * hkv * dk, 0.0);
    s.v.resize(n * hkv * dv, 0.0);
    match a.wv {
        // Qwen3.5: each head's query and output gate     [n, hq, 2 * dk] -> q, gate [n, hq * dk]
        Some(wv) if a.output_gate => {
            s.qg.resize(n * hq * 2 * dk, 0.0);
            s.gate.resize(n * hq * dk, 0.0);
            multi_matmul(
                k,
                &[a.wq, a.wk, wv],
                xn,
                n,
                &mut [&mut s.qg, &mut s.k, &mut s.v],
                &mut s.mm,
            );
            let halves = s.qg.chunks_exact(2 * dk);
            for ((both, q), g) in halves
                .zip(s.q.chunks_exact_mut(dk))
                .zip(s.gate.chunks_exact_mut(dk))
            {
                q.copy_from_slice(&both[..dk]);
                g.copy_from_slice(&both[dk..]);
            }
        }
        Some(wv) => multi_matmul(
            k,
            &[a.wq, a.wk, wv],
            xn,
            n,
            &mut [&mut s.q, &mut s.k, &mut s.v],
            &mut s.mm,
        ),
        // Gemma 4's k_eq_v layers: the values are the keys' projection (dv == dk).
        None => {
            multi_matmul(
                k,
                &[a.wq, a.wk],
                xn,
                n,
                &mut [&mut s.q, &mut s.k],
                &mut s.mm,
            );
            s.v.copy_from_slice(&s.k);
        }
    }
    prof.lap(Phase::AttnProjections);
    add_bias_rows(&mut s.q, a.bq.as_deref());
    add_bias_rows(&mut s.k, a.bk.as_deref());
    add_bias_rows(&mut s.v, a.bv.as_deref());

    if let Some(w) = &a.qk_norm {
        let (q_width, k_width) = match hp.traits.qk_norm {
            QkNorm::WholeProjection => (hq * dk, hkv * dk),
            QkNorm::PerHead | QkNorm::PerHeadIfPresent | QkNorm::None => (dk, dk),
        };
        norm_in_place(&mut s.q, &w.q, q_width, hp.norm_eps, k);
        norm_in_place(&mut s.k, &w.k, k_width, hp.norm_eps, k);
    }
    if hp.traits.v_norm {
        unit_norm_in_place(&mut s.v, dv, hp.norm_eps, k);
    }
    if let Some(c) = hp.clamp_qkv {
        for buf in [&mut s.q, &mut s.k, &mut s.v] {
            buf.iter_mut().for_each(|v| *v = v.clamp(-c, c));
        }
    }

    // Each row rotated at its own sequence's position. NoPE layers (SmallThinker's
    // full-attention layers) leave q and k unrotated.
    let rows = seqs
        .iter()
        .flat_map(|seq| (0..seq.len).map(move |i| (seq.row + i, seq.pos + i)));
    for (t, pos) in rows.filter(|_| hp.uses_rope(layer)) {
        let cos_sin = rope_table.at(pos);
        for head in s.q[t * hq * dk..(t + 1) * hq * dk].chunks_exact_mut(dk) {
            rope(head, cos_sin, hp.traits.rope, dims.rope_dim);
        }
        for head in s.k[t * hkv * dk..(t + 1) * hkv * dk].chunks_exact_mut(dk) {
            rope(head, cos_sin, hp.traits.rope, dims.rope_dim);
        }
    }

    // softmax(q K^T * scale) V over each sequence's cached positions      [n, hq * dv]
    // A sliding-window layer's ring has room for one chunk of the batch beyond its window, so
    // a sequence's rows are stored and attended chunk by chunk (decoding is one chunk of one
    // token).
    s.attended.resize(n * hq * dv, 0.0);
    for seq in seqs.iter_mut() {
        let (kv, pos0, m) = (&mut *seq.kv, seq.pos, seq.len);
        let chunk = match a.window {
            Some(w) if kv.slots() < pos0 + m => kv.slots() + 1 - w,
            _ => m,
        };
        for c0 in (0..m).step_by(chunk.max(1)) {
            let (c, r) = (chunk.min(m - c0), seq.row + c0);
            kv.store(pos0 + c0, &s.k[r * hkv * dk..], &s.v[r * hkv * dv..], c);
            attend(
                k,
                kv,
                &s.q[r * hq * dk..(r + c) * hq * dk],
                (hq, hkv, dk, dv),
                pos0 + c0,
                a.window,
                a.sinks.as_deref(),
                hp.attention_scale,
                &mut s.attended[r * hq * dv..(r + c) * hq * dv],
                &mut s.scores,
            );
        }
    }
    if a.output_gate {
        // attended *= sigmoid(gate)                           [n, hq * dv] (dv == dk)
        for (o, &g) in s.attended.iter_mut().zip(&s.gate) {
            *o *= sigmoid(g);
        }
    }
    prof.lap(Phase::AttnCore);

    // out = W_o attended (+ b)                                [n, d]
    out.resize(n * hp.n_embd, 0.0);
    matmul(k, &a.wo, &s.attended, n, out, &mut s.mm);
    add_bias_rows(out, a.bo.as_deref());
    prof.lap(Phase::AttnProjections);
}
