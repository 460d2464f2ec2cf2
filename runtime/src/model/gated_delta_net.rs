//! Qwen3.5's Gated DeltaNet: the mixer of its linear-attention layers, as transformers' PyTorch
//! path computes it (`torch_chunk_gated_delta_rule` for a batch, `torch_recurrent_gated_delta_rule`
//! for one token).
//!
//! Shapes: `n` tokens, `d = n_embd`, `nk` key heads of `dk`, `nv` value heads of `dv` (value head
//! `h` reads key head `h % nk`: llama.cpp's tiled order, which the converter writes),
//! `C = 2 * nk * dk + nv * dv` convolution channels, `K` taps. The layer's state is the
//! convolution's last `K - 1` inputs and one `[dk, dv]` matrix `S` per value head; at position 0
//! both are taken as zeros, so a sequence that starts over needs no reset.
//!
//! Per token and value head, with `q`, `k` L2-normalised (`q` also scaled by `1/sqrt(dk)`),
//! `beta = sigmoid(b)` and the decay `g = a * softplus(alpha + dt_bias)` (`a = -exp(A_log) < 0`):
//!
//! ```text
//! S = exp(g) S;  S += k (beta (v - S^T k))^T;  o = S^T q
//! ```
//!
//! A batch of more than one token runs the same recurrence in chunks of 64 positions as
//! transformers does (the UT transform: one triangular solve per chunk instead of a sequential
//! update per token); decoding runs the per-token update.

use rayon::prelude::*;

use super::ops::{causal_conv1d_silu, sigmoid, softplus};
use super::profile::{Phase, Profiler};
use super::state::DeltaState;
use super::weights::GatedDeltaNet;
use crate::tensor::matrix::multi_matmul;
use crate::tensor::{matmul, Kernels, MatmulScratch};

/// transformers' `chunk_size`.
const CHUNK: usize = 64;
/// transformers' `l2norm` epsilon (fixed, not the model's norm epsilon).
const L2_EPS: f32 = 1e-6;

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
pub struct GdnScratch {
    /// `[n, C]`: the projected q, k, v channels.
    qkv: Vec<f32>,
    /// `[n, nv * dv]`: the output gate.
    z: Vec<f32>,
    /// `[n, nv]`: beta's logits, then beta.
    beta: Vec<f32>,
    /// `[n, nv]`: the decay's logits, then the decay `g` (log space).
    decay: Vec<f32>,
    /// `[K - 1 + n, C]`: the state's past inputs, then the batch's.
    ext: Vec<f32>,
    /// `[n, C]`: the convolution's output after SiLU, q and k then normalised in place.
    conv: Vec<f32>,
    /// Per value head, its output `[n, dv]` and its chunk's work space.
    heads: Vec<f32>,
    /// `[n, nv * dv]`: the read-out, then normalised and gated.
    core: Vec<f32>,
    mm: MatmulScratch,
}

impl GdnScratch {
    /// The last batch's normalised and gated read-out, `[n, nv * dv]`: `ssm_out`'s input.
    pub fn read_out(&self) -> &[f32] {
        &self.core
    }
}

/// The Gated DeltaNet of the batch `xn` (`[n, d]`) at positions `pos0..pos0 + n`: updates
/// `state` and writes the projected output to `out` (`[n, d]`).
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_net(
    k: &Kernels,
    g: &GatedDeltaNet,
    norm_eps: f32,
    xn: &[f32],
    n: usize,
    pos0: usize,
    state: &mut DeltaState,
    s: &mut GdnScratch,
    out: &mut Vec<f32>,
    prof: &mut Profiler,
) {
    let p = g.dims;
    let (nk, dk, nv, dv) = (p.n_k_heads, p.head_k_dim, p.n_v_heads, p.head_v_dim);
    let (c, taps) = (p.conv_dim(), p.conv_kernel);
    let d = g.out.rows;

    // qkv, z, beta, alpha = W xn                      [n, C], [n, nv * dv], [n, nv], [n, nv]
    s.qkv.resize(n * c, 0.0);
    s.z.resize(n * nv * dv, 0.0);
    s.beta.resize(n * nv, 0.0);
    s.decay.resize(n * nv, 0.0);
    multi_matmul(
        k,
        &[g.qkv, g.gate, g.beta, g.alpha],
        xn,
        n,
        &mut [&mut s.qkv, &mut s.z, &mut s.beta, &mut s.decay],
        &mut s.mm,
    );
    prof.lap(Phase::AttnProjections);

    // conv[t] = silu(causal conv1d of qkv over the past inputs)     [n, C]
    causal_conv1d_silu(
        &g.conv,
        None,
        taps,
        c,
        n,
        pos0 == 0,
        state.conv.values_mut(),
        &mut s.ext,
        |new| new.copy_from_slice(&s.qkv),
        &mut s.conv,
    );

    // q, k: L2-normalised per head (q also scaled by 1/sqrt(dk)); beta; decay g
    let scale = 1.0 / (dk as f32).sqrt();
    for row in s.conv.chunks_exact_mut(c) {
        for (i, head) in row[..2 * nk * dk].chunks_exact_mut(dk).enumerate() {
            let inv = 1.0 / ((k.dot_f32)(head, head) + L2_EPS).sqrt();
            head.iter_mut().for_each(|v| *v *= inv);
            if i < nk {
                head.iter_mut().for_each(|v| *v *= scale);
            }
        }
    }
    for (bt, gt) in s
        .beta
        .chunks_exact_mut(nv)
        .zip(s.decay.chunks_exact_mut(nv))
    {
        for h in 0..nv {
            bt[h] = sigmoid(bt[h]);
            gt[h] = g.a[h] * softplus(gt[h] + g.dt_bias[h]);
        }
    }

    // The delta rule per value head, heads in parallel                 [nv][n, dv]
    let per_head = n * dv + work_len(n, dk, dv);
    s.heads.resize(nv * per_head, 0.0);
    let fresh = pos0 == 0;
    let inputs = Inputs {
        conv: &s.conv,
        beta: &s.beta,
        decay: &s.decay,
        c,
        nk,
        dk,
        nv,
        dv,
        n,
    };
    state
        .matrices_mut()
        .par_chunks_mut(dk * dv)
        .zip(s.heads.par_chunks_mut(per_head))
        .enumerate()
        .for_each(|(h, (m, buf))| {
            if fresh {
                m.fill(0.0);
            }
            let (o, work) = buf.split_at_mut(n * dv);
            match n {
                1 => step(&inputs, h, m, o, work),
                _ => chunked(&inputs, h, m, o, work),
            }
        });

    // core[t, h] = rms_norm(o[h][t]) * norm * silu(z[t, h])            [n, nv * dv]
    s.core.resize(n * nv * dv, 0.0);
    for (t, (row, zr)) in s
        .core
        .chunks_exact_mut(nv * dv)
        .zip(s.z.chunks_exact(nv * dv))
        .enumerate()
    {
        for (h, (dst, zh)) in row
            .chunks_exact_mut(dv)
            .zip(zr.chunks_exact(dv))
            .enumerate()
        {
            let o = &s.heads[h * per_head + t * dv..h * per_head + (t + 1) * dv];
            let inv = 1.0 / ((k.dot_f32)(o, o) / dv as f32 + norm_eps).sqrt();
            for (((y, &o), &w), &z) in dst.iter_mut().zip(o).zip(&g.norm).zip(zh) {
                *y = w * (o * inv) * (z * sigmoid(z));
            }
        }
    }
    prof.lap(Phase::DeltaNetCore);

    // out = W_out core                                                [n, d]
    out.resize(n * d, 0.0);
    matmul(k, &g.out, &s.core, n, out, &mut s.mm);
    prof.lap(Phase::AttnProjections);
}

/// What every head reads: the normalised convolution output and the per-head rates.
struct Inputs<'s> {
    /// `[n, C]`: q (`nk * dk`), k (`nk * dk`), v (`nv * dv`).
    conv: &'s [f32],
    beta: &'s [f32],
    decay: &'s [f32],
    c: usize,
    nk: usize,
    dk: usize,
    nv: usize,
    dv: usize,
    n: usize,
}

impl Inputs<'_> {
    /// Value head `h`'s query, key and value at token `t` (key head `h % nk`).
    fn qkv(&self, t: usize, h: usize) -> (&[f32], &[f32], &[f32]) {
        let row = &self.conv[t * self.c..(t + 1) * self.c];
        let kh = h % self.nk;
        let (q0, k0) = (kh * self.dk, (self.nk + kh) * self.dk);
        let v0 = 2 * self.nk * self.dk + h * self.dv;
        (
            &row[q0..q0 + self.dk],
            &row[k0..k0 + self.dk],
            &row[v0..v0 + self.dv],
        )
    }

    fn beta(&self, t: usize, h: usize) -> f32 {
        self.beta[t * self.nv + h]
    }

    fn decay(&self, t: usize, h: usize) -> f32 {
        self.decay[t * self.nv + h]
    }
}

/// Work space one head needs beyond its output.
fn work_len(n: usize, dk: usize, dv: usize) -> usize {
    match n {
        1 => dv,
        _ => {
            let c = n.min(CHUNK);
            c * c + c * dv + c * dk + c
        }
    }
}

/// One token (`n == 1`): transformers' `torch_recurrent_gated_delta_rule`. `m` is the head's
/// `[dk, dv]` state, `o` its `[dv]` output, `work` `[dv]`.
fn step(x: &Inputs, h: usize, m: &mut [f32], o: &mut [f32], work: &mut [f32]) {
    let (dk, dv) = (x.dk, x.dv);
    let (q, key, v) = x.qkv(0, h);
    let (beta, decay) = (x.beta(0, h), x.decay(0, h).exp());
    // S = exp(g) S; kv_mem = S^T k
    let kv_mem = &mut work[..dv];
    kv_mem.fill(0.0);
    for (r, row) in m.chunks_exact_mut(dv).enumerate() {
        for (s, acc) in row.iter_mut().zip(kv_mem.iter_mut()) {
            *s *= decay;
            *acc += *s * key[r];
        }
    }
    // delta = beta (v - kv_mem); S += k delta^T; o = S^T q
    for (acc, &v) in kv_mem.iter_mut().zip(v) {
        *acc = (v - *acc) * beta;
    }
    o.fill(0.0);
    for (r, row) in m.chunks_exact_mut(dv).enumerate() {
        for ((s, &delta), o) in row.iter_mut().zip(kv_mem.iter()).zip(o.iter_mut()) {
            *s += key[r] * delta;
            *o += *s * q[r];
        }
    }
    debug_assert_eq!(m.len(), dk * dv);
}

/// A batch in chunks of [`CHUNK`] positions: transformers' `torch_chunk_gated_delta_rule`.
/// `m` is the head's `[dk, dv]` state, `o` its `[n, dv]` output.
fn chunked(x: &Inputs, h: usize, m: &mut [f32], o: &mut [f32], work: &mut [f32]) {
    let (dk, dv) = (x.dk, x.dv);
    let cmax = x.n.min(CHUNK);
    let (a, rest) = work.split_at_mut(cmax * cmax);
    let (u, rest) = rest.split_at_mut(cmax * dv);
    let (w, cum) = rest.split_at_mut(cmax * dk);
    for t0 in (0..x.n).step_by(CHUNK) {
        let len = CHUNK.min(x.n - t0);
        // cum[i] = g[0] + ... + g[i] within the chunk (log of the decay since its start)
        let mut acc = 0f32;
        for (i, cum) in cum[..len].iter_mut().enumerate() {
            acc += x.decay(t0 + i, h);
            *cum = acc;
        }
        // A[i, j] = (beta_i k_i . k_j) exp(cum_i - cum_j), j < i: the UT system's lower part
        for i in 0..len {
            let (_, ki, _) = x.qkv(t0 + i, h);
            let bi = x.beta(t0 + i, h);
            for j in 0..i {
                let (_, kj, _) = x.qkv(t0 + j, h);
                let dot: f32 = ki.iter().zip(kj).map(|(p, q)| bi * p * q).sum();
                a[i * cmax + j] = dot * (cum[i] - cum[j]).exp();
            }
        }
        // Forward substitution with the unit lower-triangular (I + A):
        // U[i] = beta_i v_i - sum_j A[i, j] U[j],  W[i] = beta_i exp(cum_i) k_i - sum_j A[i, j] W[j]
        for i in 0..len {
            let (_, ki, vi) = x.qkv(t0 + i, h);
            let bi = x.beta(t0 + i, h);
            let ei = cum[i].exp();
            let (done_u, cur_u) = u.split_at_mut(i * dv);
            let ui = &mut cur_u[..dv];
            ui.iter_mut().zip(vi).for_each(|(y, &v)| *y = v * bi);
            let (done_w, cur_w) = w.split_at_mut(i * dk);
            let wi = &mut cur_w[..dk];
            wi.iter_mut().zip(ki).for_each(|(y, &k)| *y = k * bi * ei);
            for j in 0..i {
                let aij = a[i * cmax + j];
                let uj = &done_u[j * dv..(j + 1) * dv];
                ui.iter_mut().zip(uj).for_each(|(y, &v)| *y -= aij * v);
                let wj = &done_w[j * dk..(j + 1) * dk];
                wi.iter_mut().zip(wj).for_each(|(y, &v)| *y -= aij * v);
            }
        }
        // v_new[i] = U[i] - W[i] S (in place in U), with the state before the chunk
        for i in 0..len {
            let ui = &mut u[i * dv..(i + 1) * dv];
            for (r, row) in m.chunks_exact(dv).enumerate() {
                let wir = w[i * dk + r];
                ui.iter_mut().zip(row).for_each(|(y, &s)| *y -= wir * s);
            }
        }
        // o[i] = exp(cum_i) q_i S + sum_{j <= i} (q_i . k_j) exp(cum_i - cum_j) v_new[j]
        for i in 0..len {
            let (qi, _, _) = x.qkv(t0 + i, h);
            let oi = &mut o[(t0 + i) * dv..(t0 + i + 1) * dv];
            oi.fill(0.0);
            let ei = cum[i].exp();
            for (r, row) in m.chunks_exact(dv).enumerate() {
                let qr = qi[r] * ei;
                oi.iter_mut().zip(row).for_each(|(y, &s)| *y += qr * s);
            }
            for j in 0..=i {
                let (_, kj, _) = x.qkv(t0 + j, h);
                let dot: f32 = qi.iter().zip(kj).map(|(p, q)| p * q).sum();
                let f = dot * (cum[i] - cum[j]).exp();
                let vj = &u[j * dv..(j + 1) * dv];
                oi.iter_mut().zip(vj).for_each(|(y, &v)| *y += f * v);
            }
        }
        // S = exp(cum_last) S + sum_j exp(cum_last - cum_j) k_j v_new[j]^T
        let last = cum[len - 1];
        let el = last.exp();
        m.iter_mut().for_each(|s| *s *= el);
        for j in 0..len {
            let (_, kj, _) = x.qkv(t0 + j, h);
            let f = (last - cum[j]).exp();
            let vj = &u[j * dv..(j + 1) * dv];
            for (r, row) in m.chunks_exact_mut(dv).enumerate() {
                let kr = kj[r] * f;
                row.iter_mut().zip(vj).for_each(|(s, &v)| *s += kr * v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked rule and the per-token update compute the same recurrence: a batch of 70
    /// tokens (two chunks) gives what 70 single steps give, outputs and final state.
    #[test]
    fn chunks_equal_steps() {
        let (nk, dk, nv, dv, n) = (1, 4, 2, 3, 70);
        let c = 2 * nk * dk + nv * dv;
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut conv: Vec<f32> = (0..n * c).map(|_| rnd()).collect();
        for row in conv.chunks_exact_mut(c) {
            for head in row[..2 * nk * dk].chunks_exact_mut(dk) {
                let inv = 1.0 / head.iter().map(|v| v * v).sum::<f32>().sqrt();
                head.iter_mut().for_each(|v| *v *= inv);
            }
        }
        let beta: Vec<f32> = (0..n * nv).map(|_| sigmoid(4.0 * rnd())).collect();
        let decay: Vec<f32> = (0..n * nv).map(|_| -(rnd() + 0.5) * 0.3).collect();
        let whole = Inputs {
            conv: &conv,
            beta: &beta,
            decay: &decay,
            c,
            nk,
            dk,
            nv,
            dv,
            n,
        };
        for h in 0..nv {
            let mut m = vec![0.1f32; dk * dv];
            let mut o = vec![0f32; n * dv];
            let mut work = vec![0f32; work_len(n, dk, dv)];
            chunked(&whole, h, &mut m, &mut o, &mut work);

            let mut m1 = vec![0.1f32; dk * dv];
            let mut o1 = vec![0f32; n * dv];
            for t in 0..n {
                let one = Inputs {
                    conv: &conv[t * c..(t + 1) * c],
                    beta: &beta[t * nv..(t + 1) * nv],
                    decay: &decay[t * nv..(t + 1) * nv],
                    n: 1,
                    ..whole
                };
                let mut w1 = vec![0f32; dv];
                step(&one, h, &mut m1, &mut o1[t * dv..(t + 1) * dv], &mut w1);
            }
            let diff = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            };
            assert!(diff(&o, &o1) < 1e-5, "head {h} outputs {}", diff(&o, &o1));
            assert!(diff(&m, &m1) < 1e-5, "head {h} state {}", diff(&m, &m1));
            assert!(o.iter().any(|v| v.abs() > 1e-2), "outputs are not all zero");
        }
    }
}
