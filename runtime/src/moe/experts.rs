//! Running experts over a batch: every expert (or dense MLP) that some token selected runs once
//! over all of its tokens, so its weights are read once per batch, not once per token.
//!
//! Two parallel passes: gate/up for all jobs (threads split the jobs' rows), then down (threads
//! split the output rows, each output value summing its tokens' experts in job order). Every
//! value is computed by one thread in a fixed order: results do not depend on the thread count.

use rayon::prelude::*;

use crate::tensor::kernels::ActFormat;
use crate::tensor::matrix::{rows_per_task, rows_times_acts, Activations};
use crate::tensor::{Kernels, QMatrix};

/// Gated feed-forward: `down(glu(gate x, up x))`.
#[derive(Clone, Copy)]
pub struct Mlp<'a> {
    pub gate: QMatrix<'a>,
    pub up: QMatrix<'a>,
    pub down: QMatrix<'a>,
}

/// The gated activation between an MLP's gate/up and down projections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Glu {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `max(gate, 0) * up` (ReGLU, SmallThinker's experts).
    Relu,
    /// gpt-oss's clamped SwiGLU, as transformers' `GptOssExperts._apply_gate` and ggml's
    /// `swiglu_oai` compute it: with `g = min(gate, limit)` and `u = clamp(up, -limit, limit)`,
    /// `g * sigmoid(alpha * g) * (u + 1)`.
    SwigluOai { alpha: f32, limit: f32 },
    /// `gelu_tanh(gate) * up` (GeGLU with the tanh approximation, transformers'
    /// `gelu_pytorch_tanh`: Gemma's MLPs and experts).
    GeluTanh,
}

impl Glu {
    #[inline]
    pub fn apply(self, gate: f32, up: f32) -> f32 {
        match self {
            Glu::Silu => gate / (1.0 + (-gate).exp()) * up,
            Glu::Relu => gate.max(0.0) * up,
            Glu::SwigluOai { alpha, limit } => {
                let g = gate.min(limit);
                let u = up.clamp(-limit, limit);
                g / (1.0 + (-(g * alpha)).exp()) * (u + 1.0)
            }
            Glu::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                let inner = SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate);
                0.5 * gate * (1.0 + inner.tanh()) * up
            }
        }
    }
}

/// Biases an MLP adds to its gate and up projections (`[ff]` each) and to its output (`[d]`),
/// the output's before the routing weight scales it (gpt-oss's experts).
#[derive(Clone, Copy)]
pub struct MlpBias<'a> {
    pub gate: &'a [f32],
    pub up: &'a [f32],
    pub down: &'a [f32],
}

/// One expert's share of a batch: its matrices and the (token, weight) pairs that chose it.
pub struct ExpertJob<'w, 'j> {
    pub mlp: Mlp<'w>,
    pub tokens: &'j [(u32, f32)],
    pub glu: Glu,
    pub bias: Option<MlpBias<'j>>,
}

#[derive(Default)]
pub struct ExpertScratch {
    /// Per job, its tokens' input rows gathered contiguously.
    inputs: Vec<Activations>,
    /// Where each job's block starts in `hidden_t` (one entry more than there are jobs).
    offsets: Vec<usize>,
    /// Per job, `[ff, m]`: glu(gate x, up x) for its m tokens, row by row.
    hidden_t: Vec<f32>,
    /// The up projections, laid out like `hidden_t`.
    up_t: Vec<f32>,
    /// Down projections before they are weighted and summed: per task of `len` output rows,
    /// each job's `[len, m]` block in job order.
    down: Vec<f32>,
    /// Per job, the hidden rows token by token, prepared for the down projection.
    hidden: Vec<Activations>,
}

impl ExpertScratch {
    /// Job `ji` of the last [`run_experts`] call: its tokens' input rows (`[m, d]`, the gate
    /// and up projections' input) and hidden rows (`[m, ff]`, the down projection's input).
    pub fn job_inputs(&self, ji: usize) -> (&Activations, &Activations) {
        (&self.inputs[ji], &self.hidden[ji])
    }
}

/// Accumulates `out_t[r, t] += w_tj * down_j(glu(gate_j x_t, up_j x_t))[r]` over the jobs, in
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

    // Each job's tokens, contiguous for the tiled products, in the encodings their weights take
    // (made once for the batch, not once per expert).
    let takes_q8k = |m: &QMatrix| k.quant_dot(m.ty).is_some_and(|(_, f)| f == ActFormat::Q8K);
    if jobs
        .iter()
        .any(|j| takes_q8k(&j.mlp.gate) || takes_q8k(&j.mlp.up))
    {
        x.encode(ActFormat::Q8K);
    }
    if s.inputs.len() < jobs.len() {
        s.inputs.resize_with(jobs.len(), Activations::default);
    }
    for (input, job) in s.inputs.iter_mut().zip(jobs) {
        input.gather(x, job.tokens.iter().map(|&(t, _)| t as usize));
    }

    // Pass 1: gate/up, into one block per job of the hidden buffer.
    s.offsets.clear();
    s.offsets.push(0);
    let mut end = 0;
    for job in jobs {
        end += job.mlp.gate.rows * job.tokens.len();
        s.offsets.push(end);
    }
    s.hidden_t.resize(end, 0.0);
    s.up_t.resize(end, 0.0);
    gate_up(
        k,
        jobs,
        &s.inputs[..jobs.len()],
        (&mut s.hidden_t, &mut s.up_t),
        jobs.len(),
    );

    // Hidden rows token-major, quantized for the down projections.
    if s.hidden.len() < jobs.len() {
        s.hidden.resize_with(jobs.len(), Activations::default);
    }
    let (hidden_t, offsets) = (&s.hidden_t, &s.offsets);
    let prepare = |(ji, (h, job)): (usize, (&mut Activations, &ExpertJob))| {
        let (ff, m) = (job.mlp.gate.rows, job.tokens.len());
        let block = &hidden_t[offsets[ji]..offsets[ji + 1]];
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
    if hidden_t.len() >= 1 << 14 {
        hidden
            .par_iter_mut()
            .zip(jobs.par_iter())
            .enumerate()
            .for_each(prepare);
    } else {
        hidden.iter_mut().zip(jobs).enumerate().for_each(prepare);
    }

    // Pass 2: down projections, threads splitting the output rows.
    let hidden = &s.hidden;
    let chunk = rows_per_task(d);
    let tokens: usize = jobs.iter().map(|j| j.tokens.len()).sum();
    s.down.resize(d * tokens, 0.0);
    out_t
        .par_chunks_mut(chunk * n)
        .zip(s.down.par_chunks_mut(chunk * tokens.max(1)))
        .enumerate()
        .for_each(|(ci, (dst, down))| {
            let len = dst.len() / n;
            let mut down = &mut down[..];
            for (ji, job) in jobs.iter().enumerate() {
                let m = job.tokens.len();
                let (dots, rest) = down.split_at_mut(len * m);
                down = rest;
                let no_scratch = &mut Vec::new();
                rows_times_acts(
                    k,
                    &job.mlp.down,
                    ci * chunk,
                    len,
                    &hidden[ji],
                    dots,
                    no_scratch,
                );
                let bias = job.bias.map(|b| &b.down[ci * chunk..ci * chunk + len]);
                for (i, (row, d)) in dst
                    .chunks_exact_mut(n)
                    .zip(dots.chunks_exact(m.max(1)))
                    .enumerate()
                {
                    let b = bias.map_or(0.0, |b| b[i]);
                    for (&(t, w), &v) in job.tokens.iter().zip(d) {
                        row[t as usize] += w * (v + b);
                    }
                }
            }
        });
}

/// Fills `hidden_t` (the jobs' blocks back to back) with glu(gate x, up x), using `up_t`
/// (the same layout) for the up projections. The jobs are halved recursively with
/// `rayon::join` and each job's rows are split into tasks, so threads share the work without a
/// task list being built (and allocated) on every call.
fn gate_up(
    k: &Kernels,
    jobs: &[ExpertJob],
    inputs: &[Activations],
    (hidden_t, up_t): (&mut [f32], &mut [f32]),
    all_jobs: usize,
) {
    match jobs {
        [] => {}
        [job] => {
            let (rows, m) = (job.mlp.gate.rows, job.tokens.len());
            if m == 0 {
                return;
            }
            let chunk = rows_per_task(rows * all_jobs).min(rows);
            let input = &inputs[0];
            hidden_t
                .par_chunks_mut(chunk * m)
                .zip(up_t.par_chunks_mut(chunk * m))
                .enumerate()
                .for_each(|(ci, (gate, up))| {
                    let (row0, len) = (ci * chunk, gate.len() / m);
                    let no_scratch = &mut Vec::new();
                    rows_times_acts(k, &job.mlp.gate, row0, len, input, gate, no_scratch);
                    rows_times_acts(k, &job.mlp.up, row0, len, input, up, no_scratch);
                    if let Some(b) = job.bias {
                        let rows = gate.chunks_exact_mut(m).zip(up.chunks_exact_mut(m));
                        for (i, (g, u)) in rows.enumerate() {
                            g.iter_mut().for_each(|v| *v += b.gate[row0 + i]);
                            u.iter_mut().for_each(|v| *v += b.up[row0 + i]);
                        }
                    }
                    let glu = job.glu;
                    for (g, &u) in gate.iter_mut().zip(up.iter()) {
                        *g = glu.apply(*g, u);
                    }
                });
        }
        _ => {
            let mid = jobs.len() / 2;
            let split: usize = jobs[..mid]
                .iter()
                .map(|j| j.mlp.gate.rows * j.tokens.len())
                .sum();
            let (hidden_left, hidden_right) = hidden_t.split_at_mut(split);
            let (up_left, up_right) = up_t.split_at_mut(split);
            rayon::join(
                || {
                    gate_up(
                        k,
                        &jobs[..mid],
                        &inputs[..mid],
                        (hidden_left, up_left),
                        all_jobs,
                    )
                },
                || {
                    gate_up(
                        k,
                        &jobs[mid..],
                        &inputs[mid..],
                        (hidden_right, up_right),
                        all_jobs,
                    )
                },
            );
        }
    }
}

/// The (token, weight) pairs each slot (an expert, or the shared expert / dense MLP) serves,
/// grouped by slot in one flat list, tokens ascending within a slot: a counting sort of the
/// routes, so no per-expert list has to grow when an expert is picked for the first time.
#[derive(Default)]
pub struct Assignment {
    pairs: Vec<(u32, f32)>,
    /// Slot `e`'s pairs are `pairs[starts[e]..starts[e + 1]]`.
    starts: Vec<usize>,
    cursor: Vec<usize>,
}

impl Assignment {
    /// Groups `pairs()` (slot, token, weight), given in token order, by slot.
    pub fn build<I>(&mut self, slots: usize, pairs: impl Fn() -> I)
    where
        I: Iterator<Item = (usize, u32, f32)>,
    {
        self.starts.clear();
        self.starts.resize(slots + 1, 0);
        for (slot, _, _) in pairs() {
            self.starts[slot + 1] += 1;
        }
        for e in 0..slots {
            self.starts[e + 1] += self.starts[e];
        }
        self.cursor.clear();
        self.cursor.extend_from_slice(&self.starts[..slots]);
        self.pairs.resize(self.starts[slots], (0, 0.0));
        for (slot, t, w) in pairs() {
            self.pairs[self.cursor[slot]] = (t, w);
            self.cursor[slot] += 1;
        }
    }

    /// The pairs of `slot`, tokens ascending.
    pub fn tokens(&self, slot: usize) -> &[(u32, f32)] {
        &self.pairs[self.starts[slot]..self.starts[slot + 1]]
    }
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
