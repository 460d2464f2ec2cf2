//! Granite-4.0-H's Mamba-2 layers: the selective state space mixer as transformers' PyTorch path
//! computes it (`torch_forward`: `mamba2_chunk_scan` for a batch, `mamba2_selective_state_update`
//! for one token) and llama.cpp's `ggml_ssm_scan` runs it.
//!
//! Shapes: `n` tokens, `d = n_embd`, `d_inner` channels as `nh` heads of `hd`, `ng` groups of
//! `ds` state entries (head `h` reads B and C of group `h / (nh / ng)`), `C = d_inner + 2 ng ds`
//! convolution channels, `K` taps. The layer's state is the convolution's last `K - 1` inputs
//! and one `[hd, ds]` matrix `S` per head; at position 0 both are taken as zeros, so a sequence
//! that starts over needs no reset.
//!
//! Per token and head, with `dt = softplus(dt + dt_bias)` and `a = -exp(A_log) < 0`:
//!
//! ```text
//! S = exp(dt a) S + dt x B^T;  y = S C + D x
//! ```
//!
//! Every batch runs this recurrence token by token, as llama.cpp does. transformers' chunked
//! scan for a prompt is the same sum regrouped (decays as exponentials of cumulative sums within
//! each chunk); in f32 the two agree to rounding (the parity tests compare prompts spanning
//! several of its chunks), and the sequential form needs no `[chunk, chunk]` work per head and
//! gives decoding and prefill the same arithmetic.

use rayon::prelude::*;

use super::ops::{causal_conv1d_silu, sigmoid, softplus};
use super::profile::{Phase, Profiler};
use super::state::SsmState;
use super::weights::Mamba2;
use crate::tensor::{matmul, Kernels, MatmulScratch};

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
pub struct Mamba2Scratch {
    /// `[n, d_inner + C + nh]`: z, then x, B, C, then dt of each token.
    zxbcdt: Vec<f32>,
    /// `[K - 1 + n, C]`: the state's past inputs, then the batch's.
    ext: Vec<f32>,
    /// `[n, C]`: the convolution's output after SiLU: x, B, C.
    conv: Vec<f32>,
    /// `[n, nh]`: dt after the softplus.
    dt: Vec<f32>,
    /// Per head, its output `[n, hd]`.
    heads: Vec<f32>,
    /// `[n, d_inner]`: the read-out, then gated and normalised.
    y: Vec<f32>,
    mm: MatmulScratch,
}

impl Mamba2Scratch {
    /// The last batch's gated and normalised read-out, `[n, d_inner]`: `ssm_out`'s input.
    pub fn read_out(&self) -> &[f32] {
        &self.y
    }
}

/// The Mamba-2 mixer of the batch `xn` (`[n, d]`) at positions `pos0..pos0 + n`: updates
/// `state` and writes the projected output to `out` (`[n, d]`).
#[allow(clippy::too_many_arguments)]
pub fn mamba2(
    k: &Kernels,
    m: &Mamba2,
    norm_eps: f32,
    xn: &[f32],
    n: usize,
    pos0: usize,
    state: &mut SsmState,
    s: &mut Mamba2Scratch,
    out: &mut Vec<f32>,
    prof: &mut Profiler,
) {
    let p = m.dims;
    let (di, ds, nh, ng, hd) = (p.d_inner, p.d_state, p.n_heads, p.n_groups, p.head_dim());
    let (c, taps, w) = (p.conv_dim(), p.conv_kernel, p.in_proj_dim());
    let d = m.out.rows;

    // z, xBC, dt = W_in xn                                       [n, d_inner + C + nh]
    s.zxbcdt.resize(n * w, 0.0);
    matmul(k, &m.in_proj, xn, n, &mut s.zxbcdt, &mut s.mm);
    prof.lap(Phase::AttnProjections);

    // conv[t] = silu(causal conv1d of xBC over the past inputs + bias)   [n, C]
    let zxbcdt = &s.zxbcdt;
    causal_conv1d_silu(
        &m.conv,
        m.conv_bias.as_deref(),
        taps,
        c,
        n,
        pos0 == 0,
        state.conv.values_mut(),
        &mut s.ext,
        |new| {
            for (e, row) in new.chunks_exact_mut(c).zip(zxbcdt.chunks_exact(w)) {
                e.copy_from_slice(&row[di..di + c]);
            }
        },
        &mut s.conv,
    );

    // dt = softplus(dt + dt_bias)                                       [n, nh]
    s.dt.resize(n * nh, 0.0);
    for (dt, row) in s.dt.chunks_exact_mut(nh).zip(s.zxbcdt.chunks_exact(w)) {
        for (h, dt) in dt.iter_mut().enumerate() {
            *dt = softplus(row[di + c + h] + m.dt_bias[h]);
        }
    }

    // The scan per head, heads in parallel                              [nh][n, hd]
    s.heads.resize(nh * n * hd, 0.0);
    let fresh = pos0 == 0;
    let per_group = nh / ng;
    let (conv, dts, a, skip, dot) = (&s.conv, &s.dt, &m.a, &m.d, k.dot_f32);
    state
        .states_mut()
        .par_chunks_mut(hd * ds)
        .zip(s.heads.par_chunks_mut(n * hd))
        .enumerate()
        .for_each(|(h, (st, o))| {
            if fresh {
                st.fill(0.0);
            }
            let g = h / per_group;
            let (b0, c0) = (di + g * ds, di + (ng + g) * ds);
            for (t, o) in o.chunks_exact_mut(hd).enumerate() {
                let row = &conv[t * c..(t + 1) * c];
                let (x, b, cr) = (
                    &row[h * hd..(h + 1) * hd],
                    &row[b0..b0 + ds],
                    &row[c0..c0 + ds],
                );
                let dt = dts[t * nh + h];
                let decay = (dt * a[h]).exp();
                // The update alone vectorises; the read-out is the kernels' dot.
                for ((srow, y), &x) in st.chunks_exact_mut(ds).zip(o.iter_mut()).zip(x) {
                    let xdt = x * dt;
                    for (sv, &bv) in srow.iter_mut().zip(b) {
                        *sv = *sv * decay + bv * xdt;
                    }
                    *y = dot(srow, cr) + skip[h] * x;
                }
            }
        });

    // y[t] = norm_per_group(y[t] * silu(z[t])) * weight                  [n, d_inner]
    s.y.resize(n * di, 0.0);
    let gs = di / ng;
    for (t, (y, row)) in
        s.y.chunks_exact_mut(di)
            .zip(s.zxbcdt.chunks_exact(w))
            .enumerate()
    {
        for (h, yh) in y.chunks_exact_mut(hd).enumerate() {
            let at = h * n * hd + t * hd;
            yh.copy_from_slice(&s.heads[at..at + hd]);
        }
        for (v, &z) in y.iter_mut().zip(&row[..di]) {
            *v *= z * sigmoid(z);
        }
        for (grp, wg) in y.chunks_exact_mut(gs).zip(m.norm.chunks_exact(gs)) {
            let inv = 1.0 / ((k.dot_f32)(grp, grp) / gs as f32 + norm_eps).sqrt();
            for (v, &wv) in grp.iter_mut().zip(wg) {
                *v = wv * (*v * inv);
            }
        }
    }
    prof.lap(Phase::SsmCore);

    // out = W_out y                                                     [n, d]
    out.resize(n * d, 0.0);
    matmul(k, &m.out, &s.y, n, out, &mut s.mm);
    prof.lap(Phase::AttnProjections);
}
