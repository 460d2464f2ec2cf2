//! The feed-forward half of a layer: a dense MLP, or routed experts plus an optional shared
//! expert, or routed experts beside a dense MLP, each on its own norm and normalised before
//! they are summed (Gemma 4). Routed experts come from one [`ExpertSource`]: the memory map (all resident) or the
//! expert cache (streamed from flash). Either way every output sums its experts in the same
//! order (routed experts by index, then the shared expert), so streamed and resident runs are
//! bit-identical.
//!
//! Shapes: `n` tokens, `d = n_embd`, `E = n_expert`.

use super::error::ModelError;
use super::hparams::HParams;
use super::observe::WeightInputs;
use super::ops::{add_bias_rows, add_scaled, norm_in_place, rms_norm_rows, sigmoid};
use super::profile::{Phase, Profiler};
use super::weights::{Ffn, MoeBlock};
use crate::moe::cache::{ExpertCache, ExpertGuard};
use crate::moe::experts::{add_transposed, run_experts, Assignment, ExpertJob, ExpertScratch, Glu};
use crate::moe::lossy::{self, LossyStats, RouteOptions};
use crate::moe::replay::RouteReplay;
use crate::moe::router::{route_with, Route};
use crate::tensor::matrix::Activations;
use crate::tensor::{matmul, Kernels, MatmulScratch};

use super::weights::Mlp;

/// Where a layer's routed experts are read from.
#[derive(Clone, Copy)]
pub enum ExpertSource<'c> {
    /// Straight from the memory-mapped file.
    Resident,
    /// Through the bounded expert cache, which reads missing experts from flash.
    Streamed(&'c ExpertCache),
}

/// Changes to the model's own routing: lossy options (off by default), an expert mask
/// (calibration, tests) and a replayed routing trace (benchmarks), with what they did.
#[derive(Default)]
pub struct RouteControl {
    pub opts: RouteOptions,
    /// `[n_layer, n_expert]`: experts whose router logit is forced to -inf.
    pub mask: Option<Vec<bool>>,
    pub stats: LossyStats,
    /// Experts chosen by a trace instead of the router.
    pub replay: Option<RouteReplay>,
    /// With a replay: the trace row of each row of the batch the FFN runs on (the sequence
    /// position plus `replay_origin`), set by the forward pass.
    pub positions: Vec<usize>,
    /// The trace row of a sequence's position 0: it advances by each sequence's length when the
    /// session is reset, so that a benchmark's warm-up and measured runs replay consecutive
    /// stretches of the trace instead of the same tokens twice (which a cache would serve from
    /// what the warm-up left behind).
    pub replay_origin: usize,
}

/// Buffers reused across calls, grown to the largest batch seen, and the routing of the last
/// MoE layer run (read by the forward pass's observers).
#[derive(Default)]
pub struct FfnScratch {
    /// The normalised input, prepared once for every expert.
    input: Activations,
    /// `[n, E]` router logits.
    router_logits: Vec<f32>,
    routes: Vec<Route>,
    /// Per expert (and one more for a shared expert or dense MLP): (token, weight) pairs.
    assigned: Assignment,
    /// Per token, the scale of the shared expert.
    shared_scales: Vec<f32>,
    /// The experts some token of the batch selected, ascending.
    active: Vec<u32>,
    experts: ExpertScratch,
    /// `[d, n]` outputs accumulated in a fixed order.
    out_t: Vec<f32>,
    /// Streamed experts computed ahead of their turn: per group position a `[d, n]` block
    /// holding that expert's weighted output alone.
    early_out: Vec<f32>,
    early_done: Vec<bool>,
    mm: MatmulScratch,
    /// `[n, d]`: a dense MLP's normalised output beside the experts (Gemma 4).
    beside: Vec<f32>,
    /// `[n, d]`: the experts' own norm of the residual (Gemma 4).
    experts_in: Vec<f32>,
    /// `[n, d]`: the router's own norm of the residual (Gemma 4).
    router_in: Vec<f32>,
}

impl FfnScratch {
    /// The last MoE layer's raw router logits (`[n, E]`).
    pub fn router_logits(&self, n: usize, n_expert: usize) -> &[f32] {
        &self.router_logits[..n * n_expert]
    }

    /// The last MoE layer's routes, one per token.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The experts the last MoE layer used, ascending.
    pub fn active(&self) -> &[u32] {
        &self.active
    }
}

/// Experts run by one call of [`run_experts`] from the memory map (a prompt may use them all;
/// more run in further calls).
const JOBS_PER_PASS: usize = 64;

/// `out = ffn(xn)` for the batch `xn` (`[n, d]`), the layer's residual `x` normalised by its FFN
/// norm (`x` itself feeds routers and experts with their own norms: Gemma 4). `decided` holds router logits computed before
/// the feed-forward (a decoupled router before the backbone, or a router reading the layer's
/// input before its attention), used instead of applying the layer's router to `xn`. Returns the
/// bytes of routed-expert weights the batch used (each selected expert once).
#[allow(clippy::too_many_arguments)]
pub fn feed_forward(
    k: &Kernels,
    hp: &HParams,
    layer: usize,
    ffn: &Ffn,
    (x, xn): (&[f32], &[f32]),
    n: usize,
    decided: Option<&[f32]>,
    source: ExpertSource,
    control: &mut RouteControl,
    s: &mut FfnScratch,
    out: &mut Vec<f32>,
    (prof, obs): (&mut Profiler, &mut WeightInputs),
) -> Result<u64, ModelError> {
    let d = hp.n_embd;
    s.input.prepare(k, xn, n, d);
    s.out_t.clear();
    s.out_t.resize(d * n, 0.0);
    prof.lap(Phase::Other);
    let mut expert_bytes = 0;
    match ffn {
        Ffn::Dense(mlp) => {
            let slot = hp.n_expert;
            s.assigned
                .build(slot + 1, || (0..n as u32).map(|t| (slot, t, 1.0)));
            run_always_on(k, hp.traits.dense_glu, slot, mlp, s);
            observe_jobs(obs, layer, Jobs::Plain(DENSE), s);
        }
        Ffn::Moe(moe) => {
            if let Some(b) = &moe.beside {
                // beside = post_norm(mlp(xn)), then the experts read their own norm of x
                let slot = hp.n_expert;
                s.assigned
                    .build(slot + 1, || (0..n as u32).map(|t| (slot, t, 1.0)));
                run_always_on(k, hp.traits.dense_glu, slot, &b.mlp, s);
                observe_jobs(obs, layer, Jobs::Plain(DENSE), s);
                s.beside.clear();
                s.beside.resize(n * d, 0.0);
                add_transposed(&s.out_t, n, &mut s.beside);
                norm_in_place(&mut s.beside, &b.post_norm, d, hp.norm_eps, k);
                s.experts_in.resize(n * d, 0.0);
                rms_norm_rows(x, &b.experts_norm, hp.norm_eps, &mut s.experts_in, k);
                s.input.prepare(k, &s.experts_in, n, d);
                s.out_t.fill(0.0);
            }
            route_batch(k, hp, layer, moe, (x, n), decided, source, control, s);
            if decided.is_none() {
                let router_x = match moe.router_in_scale {
                    Some(_) => &s.router_in,
                    None => &s.input.x,
                };
                obs.on_dense(layer, &["ffn_gate_inp"], router_x, n);
            }
            expert_bytes = s
                .active
                .iter()
                .map(|&e| moe.experts.bytes_of(e as usize) as u64)
                .sum();
            prof.lap(Phase::Routing);
            // Routed experts in index order, then the shared expert: a fixed summation order.
            match source {
                ExpertSource::Resident => {
                    run_resident(k, (layer, hp.expert_glu, hp.n_expert), moe, s, obs)
                }
                ExpertSource::Streamed(cache) => {
                    cache.record_use(layer, &s.active);
                    let active = std::mem::take(&mut s.active);
                    let ran = active.chunks(cache.slots()).try_for_each(|group| {
                        let at = (layer, hp.expert_glu, hp.n_expert);
                        run_arriving(k, cache, at, moe, group, s, (&mut *prof, &mut *obs))
                    });
                    s.active = active;
                    ran?;
                }
            }
            if let Some(shared) = &moe.shared {
                if shared.gate.is_some() {
                    obs.on_dense(layer, &["ffn_gate_inp_shexp"], &s.input.x, n);
                }
                run_always_on(k, hp.traits.dense_glu, hp.n_expert, &shared.mlp, s);
                observe_jobs(obs, layer, Jobs::Plain(SHARED), s);
            }
        }
    }
    out.clear();
    out.resize(n * d, 0.0);
    add_transposed(&s.out_t, n, out);
    if let Ffn::Moe(moe) = ffn {
        if let Some(b) = &moe.beside {
            // out = post_norm_2(experts) + beside
            norm_in_place(out, &b.experts_post_norm, d, hp.norm_eps, k);
            add_scaled(out, &s.beside, 1.0);
        }
    }
    prof.lap(Phase::Experts);
    Ok(expert_bytes)
}

/// A dense MLP or shared expert over the tokens and weights of `s.assigned`'s `slot`.
fn run_always_on(k: &Kernels, glu: Glu, slot: usize, mlp: &Mlp, s: &mut FfnScratch) {
    let jobs = [ExpertJob {
        mlp: *mlp,
        tokens: s.assigned.tokens(slot),
        glu,
        bias: None,
    }];
    run_experts(k, &jobs, &s.input, &mut s.out_t, &mut s.experts);
}

/// The names of a dense MLP's (or of the dense MLP beside the experts) and of a shared expert's
/// matrices: gate, up, down.
const DENSE: [&str; 3] = ["ffn_gate", "ffn_up", "ffn_down"];
const SHARED: [&str; 3] = ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"];
const ROUTED: [&str; 3] = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"];

/// What the jobs of the last `run_experts` call were.
enum Jobs<'e> {
    /// One always-on MLP over every token, with its matrices' names.
    Plain([&'static str; 3]),
    /// These routed experts of the layer's `n_expert`, in job order.
    Routed(&'e [u32], usize),
}

/// The inputs of the matrices the last `run_experts` call multiplied, to the weight-input
/// observer: each job's gathered token rows for gate and up, its hidden rows for down.
fn observe_jobs(obs: &mut WeightInputs, layer: usize, jobs: Jobs, s: &FfnScratch) {
    if !obs.is_on() {
        return;
    }
    match jobs {
        Jobs::Plain([gate, up, down]) => {
            let (x, h) = s.experts.job_inputs(0);
            obs.on_dense(layer, &[gate, up], &x.x, x.n);
            obs.on_dense(layer, &[down], &h.x, h.n);
        }
        Jobs::Routed(experts, n_expert) => {
            let [gate, up, down] = ROUTED;
            for (ji, &e) in experts.iter().enumerate() {
                let (x, h) = s.experts.job_inputs(ji);
                let e = (e as usize, n_expert);
                obs.on_expert(layer, &[gate, up], e, &x.x, x.cols);
                obs.on_expert(layer, &[down], e, &h.x, h.cols);
            }
        }
    }
}

/// Router logits (the layer's own, or `decided`), the expert mask and lossy options, each
/// token's route, and the per-expert token lists in `s.assigned` (the extra slot holding the
/// shared expert's scales).
#[allow(clippy::too_many_arguments)]
fn route_batch(
    k: &Kernels,
    hp: &HParams,
    layer: usize,
    moe: &MoeBlock,
    (x, n): (&[f32], usize),
    decided: Option<&[f32]>,
    source: ExpertSource,
    control: &mut RouteControl,
    s: &mut FfnScratch,
) {
    let n_expert = hp.n_expert;
    s.router_logits.resize(n * n_expert, 0.0);
    match decided {
        None => {
            // Gemma 4's router reads its own norm of the residual, not the experts' input.
            let router_x = match &moe.router_in_scale {
                Some(w) => {
                    s.router_in.resize(n * hp.n_embd, 0.0);
                    rms_norm_rows(x, w, hp.norm_eps, &mut s.router_in, k);
                    &s.router_in
                }
                None => &s.input.x,
            };
            matmul(k, &moe.router, router_x, n, &mut s.router_logits, &mut s.mm);
            // gpt-oss's router is a linear layer with a bias.
            add_bias_rows(&mut s.router_logits, moe.router_bias.as_deref());
        }
        Some(logits) => s.router_logits.copy_from_slice(&logits[..n * n_expert]),
    }
    if let Some(mask) = &control.mask {
        let m = &mask[layer * n_expert..(layer + 1) * n_expert];
        for row in s.router_logits.chunks_exact_mut(n_expert) {
            lossy::mask_logits(row, m);
        }
    }
    s.routes.clear();
    for t in 0..n {
        let logits = &s.router_logits[t * n_expert..(t + 1) * n_expert];
        let mut r = match &control.replay {
            Some(replay) => replay.route(&hp.routing, layer, control.positions[t], logits),
            None => route_with(&hp.routing, logits, moe.selection_bias.as_deref()),
        };
        if !control.opts.is_off() {
            let cached = |e| match source {
                ExpertSource::Resident => true,
                ExpertSource::Streamed(c) => c.contains(layer, e),
            };
            lossy::apply(
                &control.opts,
                &mut r,
                hp.norm_topk,
                cached,
                &mut control.stats,
            );
        }
        if let Some(scales) = &moe.expert_scales {
            for (&e, w) in r.experts.iter().zip(r.weights.iter_mut()) {
                *w *= scales[e as usize];
            }
        }
        s.routes.push(r);
    }
    s.shared_scales.clear();
    if let Some(shared) = &moe.shared {
        for t in 0..n {
            s.shared_scales.push(match &shared.gate {
                // Qwen2-MoE: sigmoid(gate . x) scales the shared expert.
                Some(g) => sigmoid((k.dot_f32)(g, s.input.row(t).x)),
                None => 1.0,
            });
        }
    }
    let (routes, shared_scales) = (&s.routes, &s.shared_scales);
    s.assigned.build(n_expert + 1, || {
        let routed = routes.iter().enumerate().flat_map(|(t, r)| {
            let pairs = r.experts.iter().zip(&r.weights);
            pairs.map(move |(&e, &w)| (e as usize, t as u32, w))
        });
        let shared = shared_scales
            .iter()
            .enumerate()
            .map(|(t, &w)| (n_expert, t as u32, w));
        routed.chain(shared)
    });
    s.active.clear();
    s.active
        .extend((0..n_expert as u32).filter(|&e| !s.assigned.tokens(e as usize).is_empty()));
}

/// The active experts from the memory map, in groups of a fixed-capacity list: no allocation
/// per step, and consecutive groups sum exactly as one call would.
fn run_resident(
    k: &Kernels,
    (layer, glu, n_expert): (usize, Glu, usize),
    moe: &MoeBlock,
    s: &mut FfnScratch,
    obs: &mut WeightInputs,
) {
    let active = std::mem::take(&mut s.active);
    for group in active.chunks(JOBS_PER_PASS) {
        let jobs: heapless::Vec<ExpertJob, JOBS_PER_PASS> = group
            .iter()
            .map(|&e| ExpertJob {
                mlp: Mlp {
                    gate: moe.experts.gate.resident(e as usize, k),
                    up: moe.experts.up.resident(e as usize, k),
                    down: moe.experts.down.resident(e as usize, k),
                },
                tokens: s.assigned.tokens(e as usize),
                glu,
                bias: moe.expert_biases.as_ref().map(|b| b.of(e as usize)),
            })
            .collect();
        run_experts(k, &jobs, &s.input, &mut s.out_t, &mut s.experts);
        observe_jobs(obs, layer, Jobs::Routed(group, n_expert), s);
    }
    s.active = active;
}

/// Largest `[d, n]` blocks (in floats, all early experts of a group together) kept for experts
/// computed ahead of their turn; a prompt batch beyond it computes its experts in order.
const EARLY_OUT_FLOATS: usize = 1 << 22;

/// Runs a group of streamed experts as they arrive from the cache, so that computing the
/// present ones overlaps reading the missing ones, and still sums them exactly as one
/// in-order call would: the consecutive experts from the next one due go straight into
/// `s.out_t`; an expert loaded before an earlier one is computed alone into a zeroed block
/// (which then holds exactly its weighted output, `0 + w v = w v`) and added in its turn, the
/// same additions in the same order.
fn run_arriving(
    k: &Kernels,
    cache: &ExpertCache,
    (layer, glu, n_expert): (usize, Glu, usize),
    moe: &MoeBlock,
    group: &[u32],
    s: &mut FfnScratch,
    (prof, obs): (&mut Profiler, &mut WeightInputs),
) -> Result<(), ModelError> {
    prof.lap(Phase::Experts);
    let mut arrivals = cache.acquire_each(layer, group)?;
    let block = s.out_t.len();
    let early_allowed = block * group.len() <= EARLY_OUT_FLOATS;
    if early_allowed {
        s.early_out.resize(block * group.len(), 0.0);
    }
    s.early_done.clear();
    s.early_done.resize(group.len(), false);
    let mut next = 0;
    while next < group.len() {
        let (i, first) = if early_allowed {
            arrivals.take_any()?
        } else {
            arrivals.take(next, true)?.map(|g| (next, g))
        }
        .expect("an expert not taken yet is handed out once loaded");
        prof.lap(Phase::ExpertIo);
        if i != next {
            let out = &mut s.early_out[i * block..(i + 1) * block];
            out.fill(0.0);
            let job = [ExpertJob {
                mlp: first.mlp(),
                tokens: s.assigned.tokens(group[i] as usize),
                glu,
                bias: moe.expert_biases.as_ref().map(|b| b.of(group[i] as usize)),
            }];
            run_experts(k, &job, &s.input, out, &mut s.experts);
            observe_jobs(obs, layer, Jobs::Routed(&group[i..=i], n_expert), s);
            s.early_done[i] = true;
            prof.lap(Phase::Experts);
            continue;
        }
        // The next one due and the loaded ones after it, in one call (or a few: consecutive
        // calls sum exactly as one).
        let mut guards: heapless::Vec<ExpertGuard, JOBS_PER_PASS> = heapless::Vec::new();
        let room = |_| unreachable!("pushed only while not full");
        guards.push(first).unwrap_or_else(room);
        while next + guards.len() < group.len()
            && !guards.is_full()
            && !s.early_done[next + guards.len()]
        {
            match arrivals.take(next + guards.len(), false)? {
                Some(g) => guards.push(g).unwrap_or_else(room),
                None => break,
            }
        }
        let jobs: heapless::Vec<ExpertJob, JOBS_PER_PASS> = guards
            .iter()
            .zip(&group[next..])
            .map(|(g, &e)| ExpertJob {
                mlp: g.mlp(),
                tokens: s.assigned.tokens(e as usize),
                glu,
                bias: moe.expert_biases.as_ref().map(|b| b.of(e as usize)),
            })
            .collect();
        run_experts(k, &jobs, &s.input, &mut s.out_t, &mut s.experts);
        let ran = &group[next..next + guards.len()];
        observe_jobs(obs, layer, Jobs::Routed(ran, n_expert), s);
        next += guards.len();
        while next < group.len() && s.early_done[next] {
            let early = &s.early_out[next * block..(next + 1) * block];
            for (o, &e) in s.out_t.iter_mut().zip(early) {
                *o += e;
            }
            next += 1;
        }
        prof.lap(Phase::Experts);
    }
    Ok(())
}
