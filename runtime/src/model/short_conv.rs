//! LFM2's gated short convolution: the mixer of LFM2-MoE's non-attention layers.
//!
//! Shapes: `n` tokens, `d = n_embd`, `L` taps. The layer's state is the last `L - 1` values of
//! `B * x` (the convolution's input); at position 0 the past is zeros, so a sequence that starts
//! over needs no reset.

use super::profile::{Phase, Profiler};
use super::state::ConvState;
use super::weights::ShortConv;
use crate::tensor::{matmul, Kernels, MatmulScratch};

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
pub struct ShortConvScratch {
    /// `[n, 3d]`: B, C and x of each token.
    bcx: Vec<f32>,
    /// `[L - 1 + n, d]`: the state's past inputs, then the batch's `B * x`.
    ext: Vec<f32>,
    /// `[n, d]`: `C * conv(B * x)`.
    y: Vec<f32>,
    mm: MatmulScratch,
}

impl ShortConvScratch {
    /// The last batch's `C * conv(B * x)`, `[n, d]`: the output projection's input.
    pub fn gated(&self) -> &[f32] {
        &self.y
    }
}

/// The short convolution of the batch `xn` (`[n, d]`) at positions `pos0..pos0 + n`: updates
/// `state` and writes the projected output to `out` (`[n, d]`).
#[allow(clippy::too_many_arguments)]
pub fn short_conv(
    k: &Kernels,
    c: &ShortConv,
    xn: &[f32],
    n: usize,
    pos0: usize,
    state: &mut ConvState,
    s: &mut ShortConvScratch,
    out: &mut Vec<f32>,
    prof: &mut Profiler,
) {
    let d = c.out_proj.rows;
    let (taps, past) = (c.taps, c.taps - 1);

    // B, C, x = in_proj(xn)                                   [n, 3d]
    s.bcx.resize(n * 3 * d, 0.0);
    matmul(k, &c.in_proj, xn, n, &mut s.bcx, &mut s.mm);
    prof.lap(Phase::AttnProjections);

    // ext = [past inputs (zeros at position 0); B * x]          [L - 1 + n, d]
    s.ext.resize((past + n) * d, 0.0);
    let (old, new) = s.ext.split_at_mut(past * d);
    if pos0 == 0 {
        old.fill(0.0);
    } else {
        old.copy_from_slice(state.values());
    }
    for (e, row) in new.chunks_exact_mut(d).zip(s.bcx.chunks_exact(3 * d)) {
        let (b, x) = (&row[..d], &row[2 * d..]);
        for ((e, &b), &x) in e.iter_mut().zip(b).zip(x) {
            *e = b * x;
        }
    }

    // y[t, ch] = C[t, ch] * sum_j conv[ch, j] * ext[t + j, ch]   [n, d]
    s.y.resize(n * d, 0.0);
    for (t, (y, row)) in
        s.y.chunks_exact_mut(d)
            .zip(s.bcx.chunks_exact(3 * d))
            .enumerate()
    {
        let gate = &row[d..2 * d];
        for (ch, (y, &g)) in y.iter_mut().zip(gate).enumerate() {
            let w = &c.conv[ch * taps..(ch + 1) * taps];
            let mut acc = 0f32;
            for (j, &w) in w.iter().enumerate() {
                acc += w * s.ext[(t + j) * d + ch];
            }
            *y = g * acc;
        }
    }
    // The state keeps the last L - 1 inputs.
    state
        .values_mut()
        .copy_from_slice(&s.ext[n * d..(n + past) * d]);
    prof.lap(Phase::ConvCore);

    // out = out_proj(y)                                        [n, d]
    out.resize(n * d, 0.0);
    matmul(k, &c.out_proj, &s.y, n, out, &mut s.mm);
    prof.lap(Phase::AttnProjections);
}
