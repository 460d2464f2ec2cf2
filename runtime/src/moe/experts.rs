//! Running experts over a batch: every expert (or dense MLP) that some token selected runs once
//! over all of its tokens, so its weights are read once per batch, not once per token.
//!
//! Two parallel passes: gate/up for all jobs (threads split the jobs' rows), then down (threads
//! split the output rows, each output value summing its tokens' experts in job order). Every
//! value is computed by one thread in a fixed order: results do not depend on the thread count.

use rayon::prelude::*;

use crate::model::Mlp;
use crate::tensor::matrix::{rows_per_task, rows_times_acts, Activations};
use crate::tensor::Kernels;

/// One expert's share of a batch: its matrices and the (token, weight) pairs that chose it.
pub struct ExpertJob<'w, 'j> {
    pub mlp: Mlp<'w>,
    pub tokens: &'j [(u32, f32)],
}

#[derive(Default)]
pub struct ExpertScratch {
    /// Per job, its tokens' input rows gathered contiguously.
    inputs: Vec<Activations>,
    /// Per job, `[ff, m]`: silu(gate x) * up x for its m tokens, row by row.
    hidden_t: Vec<f32>,
    /// Per job, the hidden rows token by token, prepared for the down projection.
    hidden: Vec<Activations>,
}

/// Accumulates `out_t[r, t] += w_tj * down_j(silu(gate_j x_t) * up_j x_t)[r]` over the jobs, in
/// job order. `x` holds the batch's `n` input rows; `out_t` is `[d, n]` (transposed), so that
/// calling this once with all jobs or several times with consecutive groups of them gives
/// bit-identical sums (the expert cache runs a layer's experts in groups that fit its slots).
pub fn run_experts(
    k: &Kernels,
    jobs: &[ExpertJob],
    x: &Activations,
    out_t: &mut [f32],
    s: &mut ExpertScratch,
) {
    let n = x.n;
    if jobs.is_empty() || n == 0 {
        return;
    }
    let d = out_t.len() / n;

    // Each job's tokens, contiguous for the tiled products.
    if s.inputs.len() < jobs.len() {
        s.inputs.resize_with(jobs.len(), Activations::default);
    }
    for (input, job) in s.inputs.iter_mut().zip(jobs) {
        input.gather(x, job.tokens.iter().map(|&(t, _)| t as usize));
    }

    // Pass 1: gate/up. Split the hidden buffer into per-job blocks, then into row chunks.
    let sizes: Vec<usize> = jobs
        .iter()
        .map(|j| j.mlp.gate.rows * j.tokens.len())
        .collect();
    s.hidden_t.resize(sizes.iter().sum(), 0.0);
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    let mut rest: &mut [f32] = &mut s.hidden_t;
    for (ji, job) in jobs.iter().enumerate() {
        let (block, tail) = rest.split_at_mut(sizes[ji]);
        rest = tail;
        let m = job.tokens.len();
        if m == 0 {
            continue;
        }
        let chunk = rows_per_task(job.mlp.gate.rows * jobs.len()).min(job.mlp.gate.rows);
        for (ci, c) in block.chunks_mut(chunk * m).enumerate() {
            tasks.push((ji, ci * chunk, c));
        }
    }
    let inputs = &s.inputs;
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(gate, up, buf), (ji, row0, dst)| {
            let job = &jobs[ji];
            let len = dst.len() / job.tokens.len();
            gate.resize(dst.len(), 0.0);
            up.resize(dst.len(), 0.0);
            rows_times_acts(k, &job.mlp.gate, row0, len, &inputs[ji], gate, buf);
            rows_times_acts(k, &job.mlp.up, row0, len, &inputs[ji], up, buf);
            for ((v, &g), &u) in dst.iter_mut().zip(gate.iter()).zip(up.iter()) {
                *v = g / (1.0 + (-g).exp()) * u;
            }
        },
    );

    // Hidden rows token-major, quantized for the down projections.
    if s.hidden.len() < jobs.len() {
        s.hidden.resize_with(jobs.len(), Activations::default);
    }
    let mut blocks = Vec::with_capacity(jobs.len());
    let mut rest: &[f32] = &s.hidden_t;
    for &size in &sizes {
        let (block, tail) = rest.split_at(size);
        blocks.push(block);
        rest = tail;
    }
    let prepare = |(h, (job, block)): (&mut Activations, (&ExpertJob, &&[f32]))| {
        let (ff, m) = (job.mlp.gate.rows, job.tokens.len());
        h.n = m;
        h.cols = ff;
        h.x.resize(m * ff, 0.0);
        for (r, vals) in block.chunks_exact(m.max(1)).enumerate() {
            for (slot, &v) in vals.iter().enumerate() {
                h.x[slot * ff + r] = v;
            }
        }
        h.quantize(k);
    };
    let hidden = &mut s.hidden[..jobs.len()];
    // A decode step's few hundred values are not worth waking the pool for.
    if s.hidden_t.len() >= 1 << 14 {
        hidden
            .par_iter_mut()
            .zip(jobs.par_iter().zip(blocks.par_iter()))
            .for_each(prepare);
    } else {
        hidden
            .iter_mut()
            .zip(jobs.iter().zip(blocks.iter()))
            .for_each(prepare);
    }

    // Pass 2: down projections, threads splitting the output rows.
    let hidden = &s.hidden;
    let chunk = rows_per_task(d);
    out_t.par_chunks_mut(chunk * n).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(dots, buf), (ci, dst)| {
            let len = dst.len() / n;
            for (ji, job) in jobs.iter().enumerate() {
                let m = job.tokens.len();
                dots.resize(len * m, 0.0);
                rows_times_acts(k, &job.mlp.down, ci * chunk, len, &hidden[ji], dots, buf);
                for (row, d) in dst.chunks_exact_mut(n).zip(dots.chunks_exact(m.max(1))) {
                    for (&(t, w), &v) in job.tokens.iter().zip(d) {
                        row[t as usize] += w * v;
                    }
                }
            }
        },
    );
}

/// `out[t, r] += out_t[r, t]` for `[d, n]` accumulations.
pub fn add_transposed(out_t: &[f32], n: usize, out: &mut [f32]) {
    let d = out_t.len() / n.max(1);
    for (r, vals) in out_t.chunks_exact(n).enumerate() {
        for (t, &v) in vals.iter().enumerate() {
            out[t * d + r] += v;
        }
    }
}
