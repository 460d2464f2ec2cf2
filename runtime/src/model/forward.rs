//! The forward pass: one [`Session`] holds a KV cache and runs batches of tokens through the model.
//!
//! Shapes: `n` tokens in a batch, `d = n_embd`, `hq/hkv` query/KV heads of `dk/dv` dims.

use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::Arc;

use crate::moe::cache::{ExpertCache, ExpertGuard};
use crate::moe::decoupled::RouterState;
use crate::moe::experts::{add_transposed, run_experts, Assignment, ExpertJob, ExpertScratch};
use crate::moe::lossy::{self, LossyStats, RouteOptions};
use crate::moe::predictor::{ExpertPredictor, Predictions};
use crate::moe::router::{route_with, Route, RoutingSource};
use crate::tensor::matrix::{multi_matmul, Activations};
use crate::tensor::{matmul, Kernels, MatmulScratch};

use super::arch::{QkNorm, RopeStyle};
use super::kv_cache::{KvCache, KvType, LayerKv};
use super::mla::{mla_attention, MlaScratch};
use super::profile::{Phase, Profiler};
use super::weights::{Attention, Ffn, LayerAttention, Mlp, Model};
use super::ModelError;

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
struct Scratch {
    /// Attention scores: one context-long row per attention task.
    scores: Vec<f32>,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    ffn_out: Vec<f32>,
    /// The normalised FFN input, prepared once for every expert.
    ffn_in: Activations,
    router_logits: Vec<f32>,
    routes: Vec<Route>,
    /// Per expert (and one more for a shared expert or dense MLP): (token, weight) pairs.
    assigned: Assignment,
    /// Per token, the scale of the shared expert.
    shared_scales: Vec<f32>,
    experts: ExpertScratch,
    /// `[d, n]` expert outputs accumulated in a fixed order.
    ffn_out_t: Vec<f32>,
    /// Streamed experts computed ahead of their turn (loaded before an earlier one): per group
    /// position a `[d, n]` block holding that expert's weighted output alone.
    early_out: Vec<f32>,
    early_done: Vec<bool>,
    active: Vec<u32>,
    /// Lookahead predictions waiting for their layer: (layer, depth, experts).
    pending: Vec<(usize, usize, Vec<u32>)>,
    /// Expert lists of scored predictions, for the next ones.
    spare_unions: Vec<Vec<u32>>,
    /// The token-level predictor's guesses for the batch, and per layer their union.
    predicted: Predictions,
    predicted_union: Vec<Vec<u32>>,
    predict_norm: Vec<f32>,
    predict_logits: Vec<f32>,
    /// Bytes of routed-expert weights the batches used (each selected expert counted once per
    /// batch), since the session started.
    expert_bytes: u64,
    logits: Vec<f32>,
    mla: MlaScratch,
    mm: MatmulScratch,
    lossy: LossyRouting,
}

/// Changes to the model's own routing: lossy options (off by default) and an expert mask
/// (calibration, tests).
#[derive(Default)]
struct LossyRouting {
    opts: RouteOptions,
    /// `[n_layer, n_expert]`: experts whose router logit is forced to -inf.
    mask: Option<Vec<bool>>,
    stats: LossyStats,
}

/// Precision/recall counts of one predictor: the lookahead gate at one depth, or a token-level
/// predictor (depth 0: before the backbone runs). Each batch compares the union of the experts
/// predicted for its tokens with the union of those used (per token when decoding).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PredictionStats {
    /// "lookahead", or the token-level predictor's name.
    pub predictor: &'static str,
    pub depth: usize,
    /// Predicted experts that the layer then used.
    pub correct: u64,
    pub predicted: u64,
    pub actual: u64,
    /// The same counts per model layer: `[correct, predicted, actual]`.
    pub by_layer: Vec<[u64; 3]>,
    /// Time spent making these predictions.
    pub seconds: f64,
}

impl PredictionStats {
    pub fn precision(&self) -> f64 {
        self.correct as f64 / self.predicted.max(1) as f64
    }

    pub fn recall(&self) -> f64 {
        self.correct as f64 / self.actual.max(1) as f64
    }

    fn add(&mut self, layer: usize, predicted: &[u32], actual: &[u32]) {
        let correct = predicted.iter().filter(|e| actual.contains(e)).count() as u64;
        self.correct += correct;
        self.predicted += predicted.len() as u64;
        self.actual += actual.len() as u64;
        if self.by_layer.len() <= layer {
            self.by_layer.resize(layer + 1, [0; 3]);
        }
        let c = &mut self.by_layer[layer];
        c[0] += correct;
        c[1] += predicted.len() as u64;
        c[2] += actual.len() as u64;
    }
}

/// Where routed experts come from, and how far ahead to predict them.
#[derive(Clone, Default)]
pub struct ExpertStreaming {
    /// None: read experts straight from the memory map (everything resident).
    pub cache: Option<Arc<ExpertCache>>,
    /// Apply the routers of this many following layers to each layer's post-attention state
    /// and prefetch what they pick (0 = no prediction).
    pub lookahead: usize,
}

/// The routing decisions of one MoE layer for one batch, recorded when tracing is on
/// (calibration statistics and router distillation read these).
#[derive(Clone, Debug)]
pub struct LayerRouting {
    pub layer: usize,
    /// Position of the batch's first token.
    pub first_pos: usize,
    /// Raw router logits, `[n, n_expert]`.
    pub logits: Vec<f32>,
    /// The experts each token used and their weights.
    pub routes: Vec<Route>,
}

/// Decoding state for one sequence.
pub struct Session<'m, 'a> {
    model: &'m Model<'a>,
    kernels: &'static Kernels,
    kv: KvCache,
    streaming: ExpertStreaming,
    predictions: Vec<PredictionStats>,
    /// Guesses every layer's experts of the next tokens before the backbone runs them.
    predictor: Option<Box<dyn ExpertPredictor>>,
    predictor_stats: PredictionStats,
    /// The decoupled router's key/value cache, when the model is routed by one.
    router_state: Option<RouterState>,
    /// The decoupled router's expert logits for the current batch, `[n, n_expert]`.
    decided: Vec<f32>,
    /// Time spent in the decoupled router.
    router_seconds: f64,
    /// cos/sin of every (position, frequency) pair: `[n_ctx, rope_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    pos: usize,
    /// Routing decisions recorded since tracing was switched on.
    trace: Option<Vec<LayerRouting>>,
    prof: Profiler,
    s: Scratch,
}

impl<'m, 'a> Session<'m, 'a> {
    /// A session with an f16 KV cache (llama.cpp's default).
    pub fn new(model: &'m Model<'a>, n_ctx: usize) -> Self {
        Self::with_kv_type(model, n_ctx, KvType::F16)
    }

    pub fn with_kv_type(model: &'m Model<'a>, n_ctx: usize, kv_type: KvType) -> Self {
        let hp = &model.hp;
        let half = hp.rope_dim / 2;
        // Same arithmetic as transformers: f32 inverse frequencies and angles; YaRN's attention
        // factor scales cos and sin.
        let inv_freq = hp.rope_inv_freq();
        let mut rope_cos = Vec::with_capacity(n_ctx * half);
        let mut rope_sin = Vec::with_capacity(n_ctx * half);
        let f = hp.rope_attn_factor;
        for p in 0..n_ctx {
            for &fr in &inv_freq {
                let a = p as f32 * fr;
                if f == 1.0 {
                    rope_cos.push(a.cos());
                    rope_sin.push(a.sin());
                } else {
                    rope_cos.push(a.cos() * f);
                    rope_sin.push(a.sin() * f);
                }
            }
        }
        Self {
            model,
            kernels: crate::tensor::kernels::best(),
            kv: KvCache::new(hp, n_ctx, kv_type),
            streaming: ExpertStreaming::default(),
            predictions: Vec::new(),
            predictor: None,
            predictor_stats: PredictionStats::default(),
            router_state: model.router.as_ref().map(|r| r.new_state(n_ctx)),
            decided: Vec::new(),
            router_seconds: 0.0,
            rope_cos,
            rope_sin,
            pos: 0,
            trace: None,
            prof: Profiler::default(),
            s: Scratch::default(),
        }
    }

    pub fn model(&self) -> &'m Model<'a> {
        self.model
    }

    /// Tokens already in the cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Streams routed experts through `streaming.cache` instead of the memory map.
    pub fn set_streaming(&mut self, streaming: ExpertStreaming) {
        self.predictions = (1..=streaming.lookahead)
            .map(|depth| PredictionStats {
                predictor: "lookahead",
                depth,
                ..Default::default()
            })
            .collect();
        self.streaming = streaming;
    }

    pub fn expert_cache(&self) -> Option<&ExpertCache> {
        self.streaming.cache.as_deref()
    }

    /// Lookahead prediction quality per depth.
    pub fn prediction_stats(&self) -> &[PredictionStats] {
        &self.predictions
    }

    /// Installs a token-level expert predictor (or removes it with None). Before each batch
    /// runs, it guesses every layer's experts; the guesses are prefetched and tell Belady
    /// eviction when those experts are needed. The model's routers still decide: the output is
    /// the same with any predictor or none.
    pub fn set_predictor(&mut self, predictor: Option<Box<dyn ExpertPredictor>>) {
        self.predictor_stats = PredictionStats {
            predictor: predictor.as_ref().map_or("", |p| p.name()),
            ..Default::default()
        };
        self.predictor = predictor;
    }

    /// Quality of the token-level predictor's guesses (depth 0), when one is installed.
    pub fn predictor_stats(&self) -> Option<&PredictionStats> {
        self.predictor.as_ref().map(|_| &self.predictor_stats)
    }

    /// Seconds spent in the model's decoupled router (Read-ME) since the session started.
    pub fn decoupled_router_seconds(&self) -> f64 {
        self.router_seconds
    }

    /// Bytes of routed-expert weights used since the session started.
    pub fn expert_bytes_used(&self) -> u64 {
        self.s.expert_bytes
    }

    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Starts (or stops) recording every MoE layer's routing decisions.
    pub fn set_route_tracing(&mut self, on: bool) {
        self.trace = on.then(Vec::new);
    }

    /// The routing decisions recorded so far, in execution order; tracing stays on.
    pub fn take_route_trace(&mut self) -> Vec<LayerRouting> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Starts (or stops) timing the phases of every forward pass.
    pub fn set_profiling(&mut self, on: bool) {
        self.prof.enable(on);
    }

    /// Time per phase since profiling started (or the last `reset_profile`).
    pub fn profile(&self) -> Option<Vec<(Phase, f64)>> {
        self.prof.report()
    }

    pub fn reset_profile(&mut self) {
        self.prof.reset();
    }

    /// Lossy routing options (off by default: the model's router decides alone).
    pub fn set_route_options(&mut self, opts: RouteOptions) {
        self.s.lossy.opts = opts;
    }

    /// What the lossy routing options did so far.
    pub fn lossy_stats(&self) -> &LossyStats {
        &self.s.lossy.stats
    }

    /// Masks experts out of their routers (`[n_layer, n_expert]`, true = never selected), as if
    /// their router rows were removed; None restores the model's routing.
    pub fn set_expert_mask(&mut self, mask: Option<Vec<bool>>) -> Result<(), ModelError> {
        let hp = &self.model.hp;
        if let Some(m) = &mask {
            if m.len() != hp.n_layer * hp.n_expert {
                return Err(ModelError::Input(format!(
                    "expert mask has {} entries, expected {} layers x {} experts",
                    m.len(),
                    hp.n_layer,
                    hp.n_expert
                )));
            }
            for l in 0..hp.n_layer {
                let open = m[l * hp.n_expert..(l + 1) * hp.n_expert]
                    .iter()
                    .filter(|&&x| !x)
                    .count();
                if open < hp.n_expert_used {
                    return Err(ModelError::Input(format!(
                        "expert mask leaves layer {l} {open} experts, fewer than the {} a token uses",
                        hp.n_expert_used
                    )));
                }
            }
        }
        self.s.lossy.mask = mask;
        Ok(())
    }

    /// Forgets the sequence (the cache is kept allocated).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Runs `tokens` at the next positions. Returns the logits of every token (`[n, n_vocab]`)
    /// when `all_logits`, else of the last token only.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<&[f32], ModelError> {
        // The pass runs on a pool thread, so each of its parallel sections starts and ends
        // among workers instead of waking the caller's thread (measured: prefill 5-15% faster,
        // decode within noise). A resident pass also keeps the other workers looking for work
        // until it ends (see `keep_workers_hot`); a streamed one leaves the cores to its I/O
        // threads while it waits for reads.
        let stop = AtomicBool::new(false);
        let others = if self.streaming.cache.is_none() {
            rayon::current_num_threads() - 1
        } else {
            0
        };
        rayon::scope(|_| {
            let pass_thread = rayon::current_thread_index();
            let (result, ()) = rayon::join(
                || {
                    let _stop = SetOnDrop(&stop);
                    self.forward_on_worker(tokens, all_logits)
                },
                || keep_workers_hot(&stop, pass_thread, others),
            );
            result
        })
    }

    fn forward_on_worker(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<&[f32], ModelError> {
        let model = self.model;
        let hp = &model.hp;
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::Input("no tokens to evaluate".into()));
        }
        if self.pos + n > self.kv.n_ctx() {
            return Err(ModelError::ContextFull {
                n_ctx: self.kv.n_ctx(),
                needed: self.pos + n,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= hp.n_vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                hp.n_vocab
            )));
        }
        let d = hp.n_embd;
        let k = self.kernels;
        self.prof.start();
        {
            let s = &mut self.s;
            s.x.resize(n * d, 0.0);
            s.xn.resize(n * d, 0.0);
            // x = embedding * embedding_scale                                  [n, d]
            for (t, &tok) in tokens.iter().enumerate() {
                let row = &mut s.x[t * d..(t + 1) * d];
                model.tok_embd.dequantize_row(tok as usize, row);
                if hp.embedding_scale != 1.0 {
                    row.iter_mut().for_each(|v| *v *= hp.embedding_scale);
                }
            }
        }

        let last_pos = self.pos + n - 1;
        // Every layer's experts of the batch, known before layer 0: decided by the model's
        // decoupled router, or else guessed by a token-level predictor.
        let known_ahead = if model.router.is_some() {
            self.route_ahead(tokens)?;
            true
        } else if self.predictor.is_some() {
            self.predict_tokens(tokens)?;
            true
        } else {
            false
        };
        for (li, layer) in model.layers.iter().enumerate() {
            if let Some(cache) = &self.streaming.cache {
                cache.set_position(last_pos, li);
                if known_ahead && li > 0 {
                    // Guesses the in-flight cap turned away at the start get another chance
                    // as reads complete (present experts just renew their next use).
                    self.prefetch_predicted(cache, li, last_pos);
                }
            }
            // Attention block: x += attn(norm(x)) * residual_scale
            rms_norm_rows(&self.s.x, &layer.attn_norm, hp.norm_eps, &mut self.s.xn, k);
            self.prof.lap(Phase::Other);
            match &layer.attn {
                LayerAttention::Gqa(a) => self.attention(li, a, n),
                LayerAttention::Mla(a) => {
                    let s = &mut self.s;
                    mla_attention(
                        k,
                        hp,
                        a,
                        &s.xn,
                        n,
                        self.pos,
                        (&self.rope_cos, &self.rope_sin),
                        &mut self.kv,
                        li,
                        &mut s.mla,
                        &mut s.proj,
                        &mut s.mm,
                    );
                    // MLA's projections and core are not split: all counted as core.
                    self.prof.lap(Phase::AttnCore);
                }
            }
            let s = &mut self.s;
            add_scaled(&mut s.x, &s.proj, hp.residual_scale);
            // With a decoupled router every layer's experts are already known (and queued);
            // the layers' own gates, which the lookahead applies, are unused.
            if self.streaming.lookahead > 0 && model.router.is_none() {
                self.predict_ahead(li, n, last_pos);
            }
            let s = &mut self.s;

            // Feed-forward block: x += ffn(norm(x)) * residual_scale
            rms_norm_rows(&s.x, &layer.ffn_norm, hp.norm_eps, &mut s.xn, k);
            s.ffn_out.clear();
            s.ffn_out.resize(n * d, 0.0);
            s.ffn_in.prepare(k, &s.xn, n, d);
            self.prof.lap(Phase::Other);
            let source = match &model.router {
                Some(_) => RoutingSource::Decided(&self.decided),
                None => RoutingSource::Layer,
            };
            feed_forward(
                k,
                hp,
                li,
                &layer.ffn,
                source,
                n,
                s,
                &self.streaming,
                &mut self.predictions,
                &mut self.prof,
            )?;
            if let (Some(trace), Ffn::Moe(_)) = (&mut self.trace, &layer.ffn) {
                trace.push(LayerRouting {
                    layer: li,
                    first_pos: self.pos,
                    logits: s.router_logits[..n * hp.n_expert].to_vec(),
                    routes: s.routes.clone(),
                });
            }
            if let (Some(p), Ffn::Moe(_)) = (&mut self.predictor, &layer.ffn) {
                self.predictor_stats
                    .add(li, &s.predicted_union[li], &s.active);
                p.observe(li, &s.routes);
            }
            add_scaled(&mut s.x, &s.ffn_out, hp.residual_scale);
        }

        // Final norm and output projection, only for the rows the caller wants.
        self.prof.lap(Phase::Other);
        let s = &mut self.s;
        let first = if all_logits { 0 } else { n - 1 };
        let m = n - first;
        rms_norm_rows(
            &s.x[first * d..],
            &model.output_norm,
            hp.norm_eps,
            &mut s.xn[..m * d],
            self.kernels,
        );
        s.logits.resize(m * hp.n_vocab, 0.0);
        matmul(
            self.kernels,
            &model.output,
            &s.xn[..m * d],
            m,
            &mut s.logits,
            &mut s.mm,
        );
        if hp.logit_divisor != 1.0 {
            let inv = hp.logit_divisor;
            s.logits.iter_mut().for_each(|v| *v /= inv);
        }
        self.prof.lap(Phase::Output);
        self.pos += n;
        Ok(&self.s.logits)
    }

    /// Runs the model's decoupled router over the batch. Its logits decide every MoE layer's
    /// experts (`RoutingSource::Decided`), so all of them are handed to the expert cache now,
    /// nearest layer first: reads start before layer 0 and Belady eviction knows their next use.
    fn route_ahead(&mut self, tokens: &[u32]) -> Result<(), ModelError> {
        let model = self.model;
        let (Some(router), Some(state)) = (&model.router, &mut self.router_state) else {
            return Ok(());
        };
        let t0 = std::time::Instant::now();
        router.logits(state, tokens, self.pos, &mut self.decided)?;
        self.router_seconds += t0.elapsed().as_secs_f64();
        let hp = &model.hp;
        let s = &mut self.s;
        s.predicted_union.resize_with(model.layers.len(), Vec::new);
        s.predicted_union.iter_mut().for_each(Vec::clear);
        // The batch's experts, gathered in the first MoE layer's list and copied to the others.
        let Some(first) = model
            .layers
            .iter()
            .position(|l| matches!(l.ffn, Ffn::Moe(_)))
        else {
            return Ok(());
        };
        let union = &mut s.predicted_union[first];
        for row in self.decided.chunks_exact(router.n_expert()) {
            for e in route_with(&hp.routing, row, None).experts {
                if !union.contains(&e) {
                    union.push(e);
                }
            }
        }
        union.sort_unstable();
        let (head, rest) = s.predicted_union.split_at_mut(first + 1);
        let union = &head[first];
        for (later, layer) in rest.iter_mut().zip(&model.layers[first + 1..]) {
            if let Ffn::Moe(_) = layer.ffn {
                later.extend_from_slice(union);
            }
        }
        if let Some(cache) = self.streaming.cache.clone() {
            self.prefetch_predicted(&cache, 0, self.pos + tokens.len() - 1);
        }
        Ok(())
    }

    /// Asks the token-level predictor for every layer's experts of `tokens` (before the
    /// backbone runs them), and prefetches them all, nearest layer first.
    fn predict_tokens(&mut self, tokens: &[u32]) -> Result<(), ModelError> {
        let Some(p) = self.predictor.as_mut() else {
            return Ok(());
        };
        let s = &mut self.s;
        let t0 = std::time::Instant::now();
        p.predict(tokens, self.pos, &mut s.predicted)
            .map_err(|e| ModelError::Unsupported(e.to_string()))?;
        self.predictor_stats.seconds += t0.elapsed().as_secs_f64();
        let n_layers = self.model.layers.len();
        s.predicted_union.resize_with(n_layers, Vec::new);
        for l in 0..n_layers {
            if s.predicted.n_tokens() == tokens.len() {
                s.predicted.union(l, &mut s.predicted_union[l]);
            } else {
                s.predicted_union[l].clear();
            }
        }
        if let Some(cache) = self.streaming.cache.clone() {
            self.prefetch_predicted(&cache, 0, self.pos + tokens.len() - 1);
        }
        Ok(())
    }

    /// Prefetches the predicted experts of layers `from..` for the batch ending at `last_pos`.
    fn prefetch_predicted(&self, cache: &ExpertCache, from: usize, last_pos: usize) {
        for (l, experts) in self.s.predicted_union.iter().enumerate().skip(from) {
            if !experts.is_empty() {
                cache.prefetch(l, experts, cache.step_of(last_pos, l));
            }
        }
    }

    /// Lookahead gate: applies the routers of the next `lookahead` layers to the current
    /// post-attention state (normalised as each of those layers would) and prefetches the
    /// experts they pick. The model's own routers still decide; this only moves reads earlier.
    fn predict_ahead(&mut self, li: usize, n: usize, last_pos: usize) {
        let Some(cache) = self.streaming.cache.clone() else {
            return;
        };
        let model = self.model;
        let hp = &model.hp;
        let d = hp.n_embd;
        let k = self.kernels;
        let s = &mut self.s;
        let t0 = std::time::Instant::now();
        for depth in 1..=self.streaming.lookahead {
            let l2 = li + depth;
            let Some(layer) = model.layers.get(l2) else {
                break;
            };
            let Ffn::Moe(moe) = &layer.ffn else {
                continue;
            };
            let mut union = s.spare_unions.pop().unwrap_or_default();
            union.clear();
            for t in 0..n {
                s.predict_norm.resize(d, 0.0);
                rms_norm_rows(
                    &s.x[t * d..(t + 1) * d],
                    &layer.ffn_norm,
                    hp.norm_eps,
                    &mut s.predict_norm,
                    k,
                );
                s.predict_logits.resize(hp.n_expert, 0.0);
                matmul(
                    k,
                    &moe.router,
                    &s.predict_norm,
                    1,
                    &mut s.predict_logits,
                    &mut s.mm,
                );
                let r = route_with(
                    &hp.routing,
                    &s.predict_logits,
                    moe.selection_bias.as_deref(),
                );
                for &e in &r.experts {
                    if !union.contains(&e) {
                        union.push(e);
                    }
                }
            }
            union.sort_unstable();
            cache.prefetch(l2, &union, cache.step_of(last_pos, l2));
            s.pending.push((l2, depth, union));
        }
        // Charged to depth 1 (the gate's cost is per layer visit, whatever the depth).
        if let Some(st) = self.predictions.first_mut() {
            st.seconds += t0.elapsed().as_secs_f64();
        }
    }

    /// Self-attention of the batch in `s.xn`; leaves the projected output in `s.proj`.
    fn attention(&mut self, li: usize, a: &Attention, n: usize) {
        let hp = &self.model.hp;
        let k = self.kernels;
        let s = &mut self.s;
        let (hq, hkv, dk, dv) = (hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v);
        s.q.resize(n * hq * dk, 0.0);
        s.k.resize(n * hkv * dk, 0.0);
        s.v.resize(n * hkv * dv, 0.0);
        multi_matmul(
            k,
            &[a.wq, a.wk, a.wv],
            &s.xn,
            n,
            &mut [&mut s.q, &mut s.k, &mut s.v],
            &mut s.mm,
        );
        self.prof.lap(Phase::AttnProjections);
        add_bias_rows(&mut s.q, a.bq.as_deref());
        add_bias_rows(&mut s.k, a.bk.as_deref());
        add_bias_rows(&mut s.v, a.bv.as_deref());

        match hp.traits.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => {
                norm_in_place(&mut s.q, a.q_norm.as_deref(), dk, hp.norm_eps, k);
                norm_in_place(&mut s.k, a.k_norm.as_deref(), dk, hp.norm_eps, k);
            }
            QkNorm::WholeProjection => {
                norm_in_place(&mut s.q, a.q_norm.as_deref(), hq * dk, hp.norm_eps, k);
                norm_in_place(&mut s.k, a.k_norm.as_deref(), hkv * dk, hp.norm_eps, k);
            }
        }
        if let Some(c) = hp.clamp_qkv {
            for buf in [&mut s.q, &mut s.k, &mut s.v] {
                buf.iter_mut().for_each(|v| *v = v.clamp(-c, c));
            }
        }

        let half = hp.rope_dim / 2;
        for t in 0..n {
            let p = self.pos + t;
            let cos = &self.rope_cos[p * half..(p + 1) * half];
            let sin = &self.rope_sin[p * half..(p + 1) * half];
            for head in s.q[t * hq * dk..(t + 1) * hq * dk].chunks_exact_mut(dk) {
                rope(head, cos, sin, hp.traits.rope, hp.rope_dim);
            }
            for head in s.k[t * hkv * dk..(t + 1) * hkv * dk].chunks_exact_mut(dk) {
                rope(head, cos, sin, hp.traits.rope, hp.rope_dim);
            }
        }
        self.kv.store(li, self.pos, &s.k, &s.v, n);

        s.attn.resize(n * hq * dv, 0.0);
        attend(
            k,
            self.kv.layer(li),
            &s.q,
            (hq, hkv, dk, dv),
            self.pos,
            hp.sliding_window,
            hp.attention_scale,
            &mut s.attn,
            &mut s.scores,
        );

        self.prof.lap(Phase::AttnCore);
        s.proj.resize(n * hp.n_embd, 0.0);
        matmul(k, &a.wo, &s.attn, n, &mut s.proj, &mut s.mm);
        self.prof.lap(Phase::AttnProjections);
    }
}

/// Sets its flag when dropped, also when unwinding (a spinning worker must always be released).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Occupies `count` workers of the pool with a task that runs pending work as soon as it
/// appears and spins in between, until `stop` is set. A decode step has about five parallel
/// sections per layer with a little serial work between them; a worker that fell asleep in
/// between has to be woken for the next one, which on a VM's idle vCPU costs tens of
/// microseconds each time. Measured on the 2-thread benchmark checkpoint (Q8_0 decode, three
/// alternating pairs): 34.9-35.6 -> 34.8-39.0 t/s, CPU use 191% -> 197%. Built from `join`s,
/// whose jobs live on the stack: decoding still allocates nothing.
fn keep_workers_hot(stop: &AtomicBool, pass_thread: Option<usize>, count: usize) {
    let spin = || {
        // The pass's own thread picks this up when nobody stole it (or while it waits in a
        // join): it must not spin there, or the pass would never finish.
        if rayon::current_thread_index() == pass_thread {
            return;
        }
        while !stop.load(Ordering::Acquire) {
            if let Some(rayon::Yield::Idle) = rayon::yield_now() {
                std::hint::spin_loop();
            }
        }
    };
    match count {
        0 => {}
        1 => spin(),
        _ => {
            rayon::join(spin, || keep_workers_hot(stop, pass_thread, count - 1));
        }
    }
}

/// `out[t, h, :] = softmax(q[t, h] . K^T * scale) V` over positions `0..=pos0 + t` (within the
/// window): `q` is `[n, hq, dk]`, `out` is `[n, hq, dv]`, query head `h` reads KV head
/// `h / (hq / hkv)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    k: &Kernels,
    kv: LayerKv<'_>,
    q: &[f32],
    (hq, hkv, dk, dv): (usize, usize, usize, usize),
    pos0: usize,
    window: Option<usize>,
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
    let ctx = kv.n_ctx();
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
                let mut max = f32::NEG_INFINITY;
                for (sc, j) in scores.iter_mut().zip(start..end) {
                    *sc = kv.key_dot(k, j, kvh, qh) * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let inv = 1.0 / sum;
                out.fill(0.0);
                for (sc, j) in scores.iter().zip(start..end) {
                    kv.add_value(k, j, kvh, sc * inv, out);
                }
            }
        });
}

/// Experts run by one call of [`run_experts`] from the memory map (a prompt may use them all;
/// more run in further calls).
const JOBS_PER_PASS: usize = 64;

/// The feed-forward block of the batch in `s.ffn_in`, accumulated into `s.ffn_out`: a dense
/// MLP, or routed experts plus an optional shared expert. Routed experts come from the memory
/// map, or from the expert cache in groups that fit its slots; either way every output sums its
/// experts in the same order, so streamed and resident runs are bit-identical.
#[allow(clippy::too_many_arguments)]
fn feed_forward(
    k: &Kernels,
    hp: &super::HParams,
    layer: usize,
    ffn: &Ffn,
    source: RoutingSource<'_>,
    n: usize,
    s: &mut Scratch,
    streaming: &ExpertStreaming,
    predictions: &mut [PredictionStats],
    prof: &mut Profiler,
) -> Result<(), ModelError> {
    let n_expert = hp.n_expert;
    let d = hp.n_embd;
    s.ffn_out_t.clear();
    s.ffn_out_t.resize(d * n, 0.0);
    match ffn {
        Ffn::Dense(mlp) => {
            s.assigned
                .build(n_expert + 1, || (0..n as u32).map(|t| (n_expert, t, 1.0)));
            let jobs = [ExpertJob {
                mlp: *mlp,
                tokens: s.assigned.tokens(n_expert),
            }];
            run_experts(k, &jobs, &s.ffn_in, &mut s.ffn_out_t, &mut s.experts);
        }
        Ffn::Moe(moe) => {
            s.router_logits.resize(n * n_expert, 0.0);
            match source {
                RoutingSource::Layer => matmul(
                    k,
                    &moe.router,
                    &s.ffn_in.x,
                    n,
                    &mut s.router_logits,
                    &mut s.mm,
                ),
                RoutingSource::Decided(logits) => {
                    s.router_logits.copy_from_slice(&logits[..n * n_expert])
                }
            }
            if let Some(mask) = &s.lossy.mask {
                let m = &mask[layer * n_expert..(layer + 1) * n_expert];
                for row in s.router_logits.chunks_exact_mut(n_expert) {
                    lossy::mask_logits(row, m);
                }
            }
            s.routes.clear();
            for t in 0..n {
                let mut r = route_with(
                    &hp.routing,
                    &s.router_logits[t * n_expert..(t + 1) * n_expert],
                    moe.selection_bias.as_deref(),
                );
                if !s.lossy.opts.is_off() {
                    let cache = streaming.cache.as_deref();
                    lossy::apply(
                        &s.lossy.opts,
                        &mut r,
                        hp.norm_topk,
                        |e| cache.is_none_or(|c| c.contains(layer, e)),
                        &mut s.lossy.stats,
                    );
                }
                s.routes.push(r);
            }
            s.shared_scales.clear();
            if let Some(shared) = &moe.shared {
                for t in 0..n {
                    s.shared_scales.push(match &shared.gate {
                        // Qwen2-MoE: sigmoid(gate . x) scales the shared expert.
                        Some(g) => sigmoid((k.dot_f32)(g, s.ffn_in.row(t).x)),
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
            s.active.extend(
                (0..n_expert as u32).filter(|&e| !s.assigned.tokens(e as usize).is_empty()),
            );
            s.expert_bytes += s
                .active
                .iter()
                .map(|&e| moe.experts.bytes_of(e as usize) as u64)
                .sum::<u64>();
            score_predictions(
                layer,
                &s.active,
                &mut s.pending,
                &mut s.spare_unions,
                predictions,
            );
            prof.lap(Phase::Routing);

            // Routed experts in index order, then the shared expert: a fixed summation order.
            match &streaming.cache {
                None => {
                    // In groups of a fixed-capacity list: no allocation per step, and
                    // consecutive groups sum exactly as one call would.
                    for group in s.active.chunks(JOBS_PER_PASS) {
                        let jobs: heapless::Vec<ExpertJob, JOBS_PER_PASS> = group
                            .iter()
                            .map(|&e| ExpertJob {
                                mlp: Mlp {
                                    gate: moe.experts.gate.expert(e as usize),
                                    up: moe.experts.up.expert(e as usize),
                                    down: moe.experts.down.expert(e as usize),
                                },
                                tokens: s.assigned.tokens(e as usize),
                            })
                            .collect();
                        run_experts(k, &jobs, &s.ffn_in, &mut s.ffn_out_t, &mut s.experts);
                    }
                }
                Some(cache) => {
                    cache.record_use(layer, &s.active);
                    let active = std::mem::take(&mut s.active);
                    let ran = active
                        .chunks(cache.slots())
                        .try_for_each(|group| run_arriving(k, cache, layer, group, s, prof));
                    s.active = active;
                    ran?;
                }
            }
            if let Some(shared) = &moe.shared {
                let jobs = [ExpertJob {
                    mlp: shared.mlp,
                    tokens: s.assigned.tokens(n_expert),
                }];
                run_experts(k, &jobs, &s.ffn_in, &mut s.ffn_out_t, &mut s.experts);
            }
        }
    }
    add_transposed(&s.ffn_out_t, n, &mut s.ffn_out);
    prof.lap(Phase::Experts);
    Ok(())
}

/// Largest `[d, n]` blocks (in floats, all early experts of a group together) kept for experts
/// computed ahead of their turn; a prompt batch beyond it computes its experts in order.
const EARLY_OUT_FLOATS: usize = 1 << 22;

/// Runs a group of streamed experts as they arrive from the cache, so that computing the
/// present ones overlaps reading the missing ones, and still sums them exactly as one
/// in-order call would: the consecutive experts from the next one due go straight into
/// `s.ffn_out_t`; an expert loaded before an earlier one is computed alone into a zeroed block
/// (which then holds exactly its weighted output, `0 + w v = w v`) and added in its turn, the
/// same additions in the same order.
fn run_arriving(
    k: &Kernels,
    cache: &ExpertCache,
    layer: usize,
    group: &[u32],
    s: &mut Scratch,
    prof: &mut Profiler,
) -> Result<(), ModelError> {
    let io = |e: crate::moe::cache::CacheError| ModelError::Io(e.to_string());
    prof.lap(Phase::Experts);
    let mut arrivals = cache.acquire_each(layer, group).map_err(io)?;
    let block = s.ffn_out_t.len();
    let early_allowed = block * group.len() <= EARLY_OUT_FLOATS;
    if early_allowed {
        s.early_out.resize(block * group.len(), 0.0);
    }
    s.early_done.clear();
    s.early_done.resize(group.len(), false);
    let mut next = 0;
    while next < group.len() {
        let (i, first) = if early_allowed {
            arrivals.take_any().map_err(io)?
        } else {
            arrivals.take(next, true).map_err(io)?.map(|g| (next, g))
        }
        .expect("an expert not taken yet is handed out once loaded");
        prof.lap(Phase::ExpertIo);
        if i != next {
            let out = &mut s.early_out[i * block..(i + 1) * block];
            out.fill(0.0);
            let job = [ExpertJob {
                mlp: first.mlp(),
                tokens: s.assigned.tokens(group[i] as usize),
            }];
            run_experts(k, &job, &s.ffn_in, out, &mut s.experts);
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
            match arrivals.take(next + guards.len(), false).map_err(io)? {
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
            })
            .collect();
        run_experts(k, &jobs, &s.ffn_in, &mut s.ffn_out_t, &mut s.experts);
        next += guards.len();
        while next < group.len() && s.early_done[next] {
            let early = &s.early_out[next * block..(next + 1) * block];
            for (o, &e) in s.ffn_out_t.iter_mut().zip(early) {
                *o += e;
            }
            next += 1;
        }
        prof.lap(Phase::Experts);
    }
    Ok(())
}

/// Compares the predictions made for `layer` with the experts it used.
fn score_predictions(
    layer: usize,
    actual: &[u32],
    pending: &mut Vec<(usize, usize, Vec<u32>)>,
    spare: &mut Vec<Vec<u32>>,
    stats: &mut [PredictionStats],
) {
    let mut i = 0;
    while i < pending.len() {
        if pending[i].0 != layer {
            i += 1;
            continue;
        }
        let (_, depth, predicted) = pending.swap_remove(i);
        if let Some(st) = stats.get_mut(depth - 1) {
            st.add(layer, &predicted, actual);
        }
        spare.push(predicted);
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// RMSNorm of each row: `x / sqrt(mean(x^2) + eps) * w`.
pub(super) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], k: &Kernels) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = (k.dot_f32)(xr, xr) / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &wi) in or.iter_mut().zip(xr).zip(w) {
            *o = wi * (v * inv);
        }
    }
}

/// RMSNorm over consecutive groups of `width` values (a head, or a whole projection).
pub(super) fn norm_in_place(x: &mut [f32], w: Option<&[f32]>, width: usize, eps: f32, k: &Kernels) {
    let w = w.expect("norm weights are loaded for this architecture");
    for g in x.chunks_exact_mut(width) {
        let ms = (k.dot_f32)(g, g) / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &wi) in g.iter_mut().zip(w) {
            *v = wi * (*v * inv);
        }
    }
}

pub(super) fn rope(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle, rope_dim: usize) {
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

fn add_bias_rows(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    }
}

fn add_scaled(x: &mut [f32], y: &[f32], scale: f32) {
    if scale == 1.0 {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    } else {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b * scale);
    }
}
