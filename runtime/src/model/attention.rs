//! Grouped-query attention: the mixer of every architecture but DeepSeek's.
//!
//! Shapes: `n` tokens, `d = n_embd`, `hq`/`hkv` query/KV heads of `dk`/`dv` dims.

use super::arch::QkNorm;
use super::hparams::HParams;
use super::ops::{add_bias_rows, attend, norm_in_place, rope, RopeTable};
use super::profile::{Phase, Profiler};
use super::state::KvLayer;
use super::weights::Attention;
use crate::tensor::matrix::multi_matmul;
use crate::tensor::{matmul, Kernels, MatmulScratch};

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
pub struct AttentionScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[n, hq, dv]`: the attended values before the output projection.
    attended: Vec<f32>,
    /// One context-long score row per attention task.
    scores: Vec<f32>,
    mm: MatmulScratch,
}

/// Self-attention of the batch `xn` (`[n, d]`) at positions `pos0..pos0 + n`: stores the
/// batch's keys and values in `kv` and writes the projected output to `out` (`[n, d]`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    k: &Kernels,
    hp: &HParams,
    a: &Attention,
    xn: &[f32],
    n: usize,
    pos0: usize,
    rope_table: &RopeTable,
    kv: &mut KvLayer,
    s: &mut AttentionScratch,
    out: &mut Vec<f32>,
    prof: &mut Profiler,
) {
    let (hq, hkv, dk, dv) = (hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v);

    // q, k, v = W x (+ b)                                    [n, hq * dk], [n, hkv * dk], [n, hkv * dv]
    s.q.resize(n * hq * dk, 0.0);
    s.k.resize(n * hkv * dk, 0.0);
    s.v.resize(n * hkv * dv, 0.0);
    multi_matmul(
        k,
        &[a.wq, a.wk, a.wv],
        xn,
        n,
        &mut [&mut s.q, &mut s.k, &mut s.v],
        &mut s.mm,
    );
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
    if let Some(c) = hp.clamp_qkv {
        for buf in [&mut s.q, &mut s.k, &mut s.v] {
            buf.iter_mut().for_each(|v| *v = v.clamp(-c, c));
        }
    }

    for t in 0..n {
        let cos_sin = rope_table.at(pos0 + t);
        for head in s.q[t * hq * dk..(t + 1) * hq * dk].chunks_exact_mut(dk) {
            rope(head, cos_sin, hp.traits.rope, hp.rope_dim);
        }
        for head in s.k[t * hkv * dk..(t + 1) * hkv * dk].chunks_exact_mut(dk) {
            rope(head, cos_sin, hp.traits.rope, hp.rope_dim);
        }
    }
    kv.store(pos0, &s.k, &s.v, n);

    // softmax(q K^T * scale) V over the cached positions      [n, hq * dv]
    s.attended.resize(n * hq * dv, 0.0);
    attend(
        k,
        kv,
        &s.q,
        (hq, hkv, dk, dv),
        pos0,
        hp.sliding_window,
        hp.attention_scale,
        &mut s.attended,
        &mut s.scores,
    );
    prof.lap(Phase::AttnCore);

    // out = W_o attended                                      [n, d]
    out.resize(n * hp.n_embd, 0.0);
    matmul(k, &a.wo, &s.attended, n, out, &mut s.mm);
    prof.lap(Phase::AttnProjections);
}
