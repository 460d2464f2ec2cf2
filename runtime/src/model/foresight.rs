//! Knowing experts before they are computed (Read-ME's core idea): a decoupled router deciding
//! every layer's experts before layer 0, a router reading the layer's input (SmallThinker,
//! known one attention block early), a token-level predictor guessing them, or the lookahead
//! gate applying later layers' routers to the current hidden state. What is known or guessed is
//! prefetched into the expert cache and tells Belady eviction when it is needed; the model's own
//! routing still decides, so predictions only move reads earlier.
//!
//! The forward pass calls in at named points: [`Foresight::before_batch`], then per layer
//! [`Foresight::layer_start`], [`Foresight::routed_before_mixer`], [`Foresight::after_mixer`]
//! and [`Foresight::on_routing`].

use super::arch::RouterInput;
use super::error::ModelError;
use super::hparams::HParams;
use super::ops::rms_norm_rows;
use super::weights::{Ffn, Model};
use crate::moe::cache::ExpertCache;
use crate::moe::decoupled::RouterState;
use crate::moe::predictor::{ExpertPredictor, Predictions};
use crate::moe::router::{route_with, Route};
use crate::tensor::{matmul, Kernels, MatmulScratch};

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

/// A session's predictors, their statistics and buffers.
#[derive(Default)]
pub struct Foresight {
    /// Apply the routers of this many following layers to each layer's post-mixer state.
    lookahead: usize,
    /// Per lookahead depth.
    lookahead_stats: Vec<PredictionStats>,
    /// Lookahead predictions waiting for their layer: (layer, depth, experts).
    pending: Vec<(usize, usize, Vec<u32>)>,
    /// Expert lists of scored predictions, for the next ones.
    spare_unions: Vec<Vec<u32>>,
    predict_norm: Vec<f32>,
    predict_logits: Vec<f32>,
    mm: MatmulScratch,
    /// Guesses every layer's experts of the next tokens before the backbone runs them.
    predictor: Option<Box<dyn ExpertPredictor>>,
    predictor_stats: PredictionStats,
    /// The token-level predictor's guesses for the batch, and per layer their union (also the
    /// decoupled router's choices).
    predicted: Predictions,
    predicted_union: Vec<Vec<u32>>,
    /// Whether every layer's experts of the current batch were known before layer 0.
    known_ahead: bool,
    /// Whether the token-level predictor guessed the current batch (it does not for a batch
    /// of several sequences), so that its guesses are scored.
    predicted_batch: bool,
    /// The decoupled router's key/value cache, when the model is routed by one.
    router_state: Option<RouterState>,
    /// The decoupled router's expert logits for the current batch, `[n, n_expert]`.
    decided: Vec<f32>,
    /// A buffer for one sequence's logits while a batch of several is routed.
    batch_decided: Vec<f32>,
    /// Time spent in the decoupled router.
    router_seconds: f64,
    /// Read a layer's experts as soon as its router has run on the layer's input (models whose
    /// router reads it); on unless turned off.
    router_prefetch: bool,
    /// The experts read ahead that way for `early_layer`, scored when the layer routes.
    early: Vec<u32>,
    early_layer: Option<usize>,
    router_prefetch_stats: PredictionStats,
}

impl Foresight {
    pub fn new(model: &Model, n_ctx: usize) -> Self {
        Self {
            router_state: model.router.as_ref().map(|r| r.new_state(n_ctx)),
            router_prefetch: true,
            early: Vec::with_capacity(model.hp.n_expert),
            router_prefetch_stats: PredictionStats {
                predictor: "router",
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Reads each layer's experts as soon as its router has run on the layer's input (on by
    /// default; only models whose router reads the layer input have that moment).
    pub fn set_router_prefetch(&mut self, on: bool) {
        self.router_prefetch = on;
    }

    pub fn router_prefetch(&self) -> bool {
        self.router_prefetch
    }

    /// How the experts read at router time compared with those the layers then used (exact
    /// unless lossy routing options or an expert mask change the routes afterwards).
    pub fn router_prefetch_stats(&self) -> &PredictionStats {
        &self.router_prefetch_stats
    }

    pub fn lookahead(&self) -> usize {
        self.lookahead
    }

    /// Predicts `depth` layers ahead with the lookahead gate (0 = off); resets its statistics.
    pub fn set_lookahead(&mut self, depth: usize) {
        self.lookahead = depth;
        self.lookahead_stats = (1..=depth)
            .map(|depth| PredictionStats {
                predictor: "lookahead",
                depth,
                ..Default::default()
            })
            .collect();
    }

    pub fn lookahead_stats(&self) -> &[PredictionStats] {
        &self.lookahead_stats
    }

    pub fn set_predictor(&mut self, predictor: Option<Box<dyn ExpertPredictor>>) {
        self.predictor_stats = PredictionStats {
            predictor: predictor.as_ref().map_or("", |p| p.name()),
            ..Default::default()
        };
        self.predictor = predictor;
    }

    pub fn predictor_stats(&self) -> Option<&PredictionStats> {
        self.predictor.as_ref().map(|_| &self.predictor_stats)
    }

    pub fn decoupled_router_seconds(&self) -> f64 {
        self.router_seconds
    }

    /// A decoupled router state for another sequence (None when the model has no such router).
    pub fn blank_router_state(&self, model: &Model, n_ctx: usize) -> Option<RouterState> {
        model.router.as_ref().map(|r| r.new_state(n_ctx))
    }

    /// Exchanges the decoupled router's state with another sequence's.
    pub fn swap_router_state(&mut self, other: &mut Option<RouterState>) {
        std::mem::swap(&mut self.router_state, other);
    }

    /// Router logits decided before the backbone ran, when a decoupled router routes the model.
    pub fn decided(&self) -> Option<&[f32]> {
        self.router_state.as_ref().map(|_| &self.decided[..])
    }

    /// Before layer 0: every layer's experts of the batch, decided by the model's decoupled
    /// router or else guessed by a token-level predictor, handed to the cache nearest layer
    /// first.
    pub fn before_batch(
        &mut self,
        model: &Model,
        tokens: &[u32],
        pos: usize,
        cache: Option<&ExpertCache>,
    ) -> Result<(), ModelError> {
        self.predicted_batch = false;
        self.known_ahead = if model.router.is_some() {
            self.route_ahead(model, tokens, pos)?;
            self.gather_decided(model);
            true
        } else if self.predictor.is_some() {
            self.predict_tokens(model, tokens, pos)?;
            self.predicted_batch = true;
            true
        } else {
            false
        };
        if let (true, Some(cache)) = (self.known_ahead, cache) {
            self.prefetch_predicted(cache, 0, pos + tokens.len() - 1);
        }
        Ok(())
    }

    /// [`before_batch`](Self::before_batch) for a batch of several sequences, each given as
    /// its tokens, the position of the first one and its own decoupled-router state (kept
    /// outside the session), in the batch's row order; `last_pos` is the batch's clock for the
    /// cache. A decoupled router decides each sequence's rows on that sequence's state. The
    /// token-level predictor follows one sequence, so it guesses nothing here (prefetching
    /// only: the routes are the model's either way).
    pub fn before_sequences<'r>(
        &mut self,
        model: &Model,
        seqs: impl Iterator<Item = (&'r [u32], usize, &'r mut Option<RouterState>)>,
        last_pos: usize,
        cache: Option<&ExpertCache>,
    ) -> Result<(), ModelError> {
        self.predicted_batch = false;
        self.known_ahead = model.router.is_some();
        if !self.known_ahead {
            return Ok(());
        }
        let mut decided = std::mem::take(&mut self.batch_decided);
        decided.clear();
        for (tokens, pos, router) in seqs {
            std::mem::swap(&mut self.router_state, router);
            let routed = self.route_ahead(model, tokens, pos);
            std::mem::swap(&mut self.router_state, router);
            routed?;
            decided.extend_from_slice(&self.decided);
        }
        self.batch_decided = std::mem::replace(&mut self.decided, decided);
        self.gather_decided(model);
        if let Some(cache) = cache {
            self.prefetch_predicted(cache, 0, last_pos);
        }
        Ok(())
    }

    /// At the start of a layer: guesses the in-flight cap turned away at the start of the batch
    /// get another chance as reads complete (present experts just renew their next use).
    pub fn layer_start(&self, layer: usize, last_pos: usize, cache: Option<&ExpertCache>) {
        if let (true, Some(cache)) = (self.known_ahead && layer > 0, cache) {
            self.prefetch_predicted(cache, layer, last_pos);
        }
    }

    /// A layer whose router reads its input has routed before its mixer (`logits`, `[n, E]`):
    /// its experts are known one attention block before the feed-forward needs them. Their reads
    /// start now, ahead of speculative ones (not a guess, so not capped like one).
    pub fn routed_before_mixer(
        &mut self,
        model: &Model,
        layer: usize,
        logits: &[f32],
        last_pos: usize,
        cache: Option<&ExpertCache>,
    ) {
        let (Some(cache), true) = (cache, self.router_prefetch) else {
            return;
        };
        let Ffn::Moe(moe) = &model.layers[layer].ffn else {
            return;
        };
        let hp = &model.hp;
        self.early.clear();
        for row in logits.chunks_exact(hp.n_expert) {
            let r = route_with(&hp.routing, row, moe.selection_bias.as_deref());
            for &e in &r.experts {
                if !self.early.contains(&e) {
                    self.early.push(e);
                }
            }
        }
        self.early.sort_unstable();
        cache.fetch_ahead(layer, &self.early, cache.step_of(last_pos, layer));
        self.early_layer = Some(layer);
    }

    /// After a layer's mixer, the lookahead gate: applies the routers of the next `lookahead`
    /// layers to the post-mixer state `x` (`[n, d]`, normalised as each of those layers would)
    /// and prefetches the experts they pick. With a decoupled router every layer's experts are
    /// already known, and the layers' own gates are unused.
    #[allow(clippy::too_many_arguments)]
    pub fn after_mixer(
        &mut self,
        k: &Kernels,
        model: &Model,
        layer: usize,
        x: &[f32],
        n: usize,
        last_pos: usize,
        cache: Option<&ExpertCache>,
    ) {
        let Some(cache) = cache else {
            return;
        };
        if self.lookahead == 0 || model.router.is_some() {
            return;
        }
        let hp = &model.hp;
        let d = hp.n_embd;
        let t0 = std::time::Instant::now();
        for depth in 1..=self.lookahead {
            let l2 = layer + depth;
            let Some(ahead) = model.layers.get(l2) else {
                break;
            };
            let Ffn::Moe(moe) = &ahead.ffn else {
                continue;
            };
            let mut union = self.spare_unions.pop().unwrap_or_default();
            union.clear();
            for t in 0..n {
                self.predict_norm.resize(d, 0.0);
                let row = &x[t * d..(t + 1) * d];
                match hp.traits.router_input {
                    RouterInput::FfnInput => {
                        rms_norm_rows(row, &ahead.ffn_norm, hp.norm_eps, &mut self.predict_norm, k)
                    }
                    RouterInput::LayerInput => self.predict_norm.copy_from_slice(row),
                    RouterInput::NormedResidual => {
                        let w = moe.router_in_scale.as_deref().unwrap_or(&ahead.ffn_norm);
                        rms_norm_rows(row, w, hp.norm_eps, &mut self.predict_norm, k)
                    }
                }
                self.predict_logits.resize(hp.n_expert, 0.0);
                matmul(
                    k,
                    &moe.router,
                    &self.predict_norm,
                    1,
                    &mut self.predict_logits,
                    &mut self.mm,
                );
                if let Some(b) = &moe.router_bias {
                    self.predict_logits
                        .iter_mut()
                        .zip(b)
                        .for_each(|(v, b)| *v += b);
                }
                let r = route_with(
                    &hp.routing,
                    &self.predict_logits,
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
            self.pending.push((l2, depth, union));
        }
        // Charged to depth 1 (the gate's cost is per layer visit, whatever the depth).
        if let Some(st) = self.lookahead_stats.first_mut() {
            st.seconds += t0.elapsed().as_secs_f64();
        }
    }

    /// After a MoE layer routed: scores the predictions made for it against the experts it
    /// used (`active`) and lets the token-level predictor see the routes.
    pub fn on_routing(&mut self, layer: usize, active: &[u32], routes: &[Route]) {
        if self.early_layer == Some(layer) {
            self.router_prefetch_stats.add(layer, &self.early, active);
            self.early_layer = None;
        }
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].0 != layer {
                i += 1;
                continue;
            }
            let (_, depth, predicted) = self.pending.swap_remove(i);
            if let Some(st) = self.lookahead_stats.get_mut(depth - 1) {
                st.add(layer, &predicted, active);
            }
            self.spare_unions.push(predicted);
        }
        if let Some(p) = &mut self.predictor {
            if self.predicted_batch {
                self.predictor_stats
                    .add(layer, &self.predicted_union[layer], active);
            }
            p.observe(layer, routes);
        }
    }

    /// Runs the model's decoupled router over `tokens` at `pos` on its state, into `decided`.
    fn route_ahead(&mut self, model: &Model, tokens: &[u32], pos: usize) -> Result<(), ModelError> {
        let Some(router) = &model.router else {
            return Ok(());
        };
        let Some(state) = &mut self.router_state else {
            return Err(ModelError::Input(
                "a sequence without the decoupled router's state (make sequences with \
                 Session::blank_sequence)"
                    .into(),
            ));
        };
        let t0 = std::time::Instant::now();
        router.logits(state, tokens, pos, &mut self.decided)?;
        self.router_seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The decoupled router's logits (`decided`) decide every MoE layer's experts, gathered in
    /// the first MoE layer's list and copied to the others.
    fn gather_decided(&mut self, model: &Model) {
        let Some(router) = &model.router else {
            return;
        };
        let hp: &HParams = &model.hp;
        self.predicted_union
            .resize_with(model.layers.len(), Vec::new);
        self.predicted_union.iter_mut().for_each(Vec::clear);
        let Some(first) = model
            .layers
            .iter()
            .position(|l| matches!(l.ffn, Ffn::Moe(_)))
        else {
            return;
        };
        let union = &mut self.predicted_union[first];
        for row in self.decided.chunks_exact(router.n_expert()) {
            for e in route_with(&hp.routing, row, None).experts {
                if !union.contains(&e) {
                    union.push(e);
                }
            }
        }
        union.sort_unstable();
        let (head, rest) = self.predicted_union.split_at_mut(first + 1);
        let union = &head[first];
        for (later, layer) in rest.iter_mut().zip(&model.layers[first + 1..]) {
            if let Ffn::Moe(_) = layer.ffn {
                later.extend_from_slice(union);
            }
        }
    }

    /// Asks the token-level predictor for every layer's experts of `tokens`.
    fn predict_tokens(
        &mut self,
        model: &Model,
        tokens: &[u32],
        pos: usize,
    ) -> Result<(), ModelError> {
        let Some(p) = self.predictor.as_mut() else {
            return Ok(());
        };
        let t0 = std::time::Instant::now();
        p.predict(tokens, pos, &mut self.predicted)
            .map_err(|e| ModelError::Unsupported(e.to_string()))?;
        self.predictor_stats.seconds += t0.elapsed().as_secs_f64();
        let n_layers = model.layers.len();
        self.predicted_union.resize_with(n_layers, Vec::new);
        for l in 0..n_layers {
            if self.predicted.n_tokens() == tokens.len() {
                self.predicted.union(l, &mut self.predicted_union[l]);
            } else {
                self.predicted_union[l].clear();
            }
        }
        Ok(())
    }

    /// Prefetches the predicted experts of layers `from..` for the batch ending at `last_pos`.
    fn prefetch_predicted(&self, cache: &ExpertCache, from: usize, last_pos: usize) {
        for (l, experts) in self.predicted_union.iter().enumerate().skip(from) {
            if !experts.is_empty() {
                cache.prefetch(l, experts, cache.step_of(last_pos, l));
            }
        }
    }
}
