//! Small operations every layer kind shares: norms, rotary embeddings, residual adds and the
//! attention core over a layer's KV cache.

use rayon::prelude::*;

use super::arch::RopeStyle;
use super::hparams::{HParams, LayerDims};
use super::state::KvLayer;
use crate::tensor::Kernels;

/// RMSNorm of each row: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], k: &Kernels) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = (k.dot_f32)(xr, xr) / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &wi) in or.iter_mut().zip(xr).zip(w) {
            *o = wi * (v * inv);
        }
    }
}

/// RMSNorm without weights over consecutive groups of `width` values (Gemma 4's value norm).
pub fn unit_norm_in_place(x: &mut [f32], width: usize, eps: f32, k: &Kernels) {
    for g in x.chunks_exact_mut(width) {
        let ms = (k.dot_f32)(g, g) / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        g.iter_mut().for_each(|v| *v *= inv);
    }
}

/// `c * tanh(x / c)` of every value (soft-capping).
pub fn soft_cap(x: &mut [f32], c: f32) {
    x.iter_mut().for_each(|v| *v = (*v / c).tanh() * c);
}

/// RMSNorm over consecutive groups of `width` values (a head, or a whole projection).
pub fn norm_in_place(x: &mut [f32], w: &[f32], width: usize, eps: f32, k: &Kernels) {
    for g in x.chunks_exact_mut(width) {
        let ms = (k.dot_f32)(g, g) / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &wi) in g.iter_mut().zip(w) {
            *v = wi * (*v * inv);
        }
    }
}

/// cos/sin of every (position, frequency) pair, computed once per session with transformers'
/// f32 arithmetic: `[n_ctx, rope_dim / 2]` each.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// The table of `inv_freq` (one frequency per rotated pair), cos and sin multiplied by
    /// `factor` (YaRN's attention factor).
    pub fn new(inv_freq: &[f32], factor: f32, n_ctx: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(n_ctx * half);
        let mut sin = Vec::with_capacity(n_ctx * half);
        for p in 0..n_ctx {
            for &fr in inv_freq {
                let a = p as f32 * fr;
                if factor == 1.0 {
                    cos.push(a.cos());
                    sin.push(a.sin());
                } else {
                    cos.push(a.cos() * factor);
                    sin.push(a.sin() * factor);
                }
            }
        }
        Self { half, cos, sin }
    }

    /// `(cos, sin)` of position `pos`.
    pub fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.half..(pos + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }
}

/// The rope tables of a model's layers: the full-attention layers' (with the file's frequency
/// factors, `rope_freqs.weight`), and the sliding-window layers' when they have their own base
/// or rotary dims (Gemma 4).
pub struct RopeTables {
    full: RopeTable,
    swa: Option<RopeTable>,
}

impl RopeTables {
    pub fn new(hp: &HParams, rope_freqs: Option<&[f32]>, n_ctx: usize) -> Self {
        let mut inv_freq = hp.rope_inv_freq();
        if let Some(f) = rope_freqs {
            inv_freq.iter_mut().zip(f).for_each(|(v, f)| *v /= f);
        }
        let swa = hp.swa_dims.map(|s| {
            let inv_freq = hp.rope_inv_freq_of(s.rope_dim, s.rope_base);
            RopeTable::new(&inv_freq, hp.rope_attn_factor, n_ctx)
        });
        Self {
            full: RopeTable::new(&inv_freq, hp.rope_attn_factor, n_ctx),
            swa,
        }
    }

    /// The table of a layer whose geometry is `dims`.
    pub fn for_layer(&self, dims: &LayerDims) -> &RopeTable {
        match (&self.swa, dims.swa_rope) {
            (Some(swa), true) => swa,
            _ => &self.full,
        }
    }

    /// The full-attention layers' table.
    pub fn full(&self) -> &RopeTable {
        &self.full
    }
}

/// Rotates the first `rope_dim` dimensions of one head.
pub fn rope(head: &mut [f32], (cos, sin): (&[f32], &[f32]), style: RopeStyle, rope_dim: usize) {
    let half = rope_dim / 2;
    match style {
        RopeStyle::Neox => {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
        RopeStyle::Interleaved => {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        }
    }
}

pub fn add_bias_rows(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    }
}

/// `x += y * scale`.
pub fn add_scaled(x: &mut [f32], y: &[f32], scale: f32) {
    if scale == 1.0 {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    } else {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b * scale);
    }
}

/// The causal depthwise convolution with SiLU of the recurrent mixers (Gated DeltaNet, Mamba-2),
/// over a batch of `n` tokens of `c` channels and `taps` taps (`w` is `[c, taps]`):
/// `ext` (`[taps - 1 + n, c]`) holds the `taps - 1` inputs `carried` over from the previous
/// batch (zeros when `fresh`, at position 0) and then the batch's own, which `fill` writes
/// (`[n, c]`); `out[t, ch] = silu(sum_j w[ch, j] * ext[t + j, ch] + bias[ch])`; and `carried`
/// becomes the batch's last `taps - 1` inputs.
#[allow(clippy::too_many_arguments)]
pub fn causal_conv1d_silu(
    w: &[f32],
    bias: Option<&[f32]>,
    taps: usize,
    c: usize,
    n: usize,
    fresh: bool,
    carried: &mut [f32],
    ext: &mut Vec<f32>,
    fill: impl FnOnce(&mut [f32]),
    out: &mut Vec<f32>,
) {
    let past = taps - 1;
    ext.resize((past + n) * c, 0.0);
    let (old, new) = ext.split_at_mut(past * c);
    if fresh {
        old.fill(0.0);
    } else {
        old.copy_from_slice(carried);
    }
    fill(new);
    out.resize(n * c, 0.0);
    for (t, row) in out.chunks_exact_mut(c).enumerate() {
        for (ch, y) in row.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (j, &tap) in w[ch * taps..(ch + 1) * taps].iter().enumerate() {
                acc += tap * ext[(t + j) * c + ch];
            }
            if let Some(b) = bias {
                acc += b[ch];
            }
            *y = acc * sigmoid(acc);
        }
    }
    carried.copy_from_slice(&ext[n * c..(n + past) * c]);
}

/// `log(1 + exp(x))` as PyTorch's `softplus` (linear above 20).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The attention core: `out[t, h, :] = softmax(q[t, h] . K^T * scale) V` over positions
/// `0..=pos0 + t` (within the window): `q` is `[n, hq, dk]`, `out` is `[n, hq, dv]`, query head
/// `h` reads KV head `h / (hq / hkv)`. With `sinks`, head `h`'s softmax also takes the logit
/// `sinks[h]`, which has no value (gpt-oss's attention sinks: the probabilities sum to less
/// than one).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    k: &Kernels,
    kv: &KvLayer,
    q: &[f32],
    (hq, hkv, dk, dv): (usize, usize, usize, usize),
    pos0: usize,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let group = hq / hkv;
    let pairs = out.len() / dv;
    // Each task owns a score row as long as the context, in `scores`, which is sized on first
    // use: decoding then allocates nothing however long the context grows. Several tasks per
    // thread balance a prompt's causal rows, whose lengths differ.
    let tasks = (rayon::current_num_threads() * 8).clamp(1, pairs.max(1));
    let per_task = pairs.div_ceil(tasks);
    let ctx = kv.slots();
    scores.resize(tasks * ctx, 0.0);
    out.par_chunks_mut(per_task * dv)
        .zip(scores.par_chunks_mut(ctx))
        .enumerate()
        .for_each(|(task, (out, scores))| {
            for (i, out) in out.chunks_exact_mut(dv).enumerate() {
                let (t, h) = ((task * per_task + i) / hq, (task * per_task + i) % hq);
                let kvh = h / group;
                let qh = &q[(t * hq + h) * dk..(t * hq + h + 1) * dk];
                let end = pos0 + t + 1;
                let start = window.map_or(0, |w| end.saturating_sub(w));
                let scores = &mut scores[..end - start];
                let sink = sinks.map(|s| s[h]);
                let mut max = sink.unwrap_or(f32::NEG_INFINITY);
                for (sc, j) in scores.iter_mut().zip(start..end) {
                    *sc = kv.key_dot(k, j, kvh, qh) * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                if let Some(sink) = sink {
                    sum += (sink - max).exp();
                }
                let inv = 1.0 / sum;
                out.fill(0.0);
                for (sc, j) in scores.iter().zip(start..end) {
                    kv.add_value(k, j, kvh, sc * inv, out);
                }
            }
        });
}
