//! The forward pass: a [`Session`] holds one sequence's state and runs batches of tokens
//! through the model, top to bottom:
//!
//! ```text
//! x = embed(tokens) * embedding_scale                    [n, d]
//! for each layer:
//!     (router logits from x, when the router reads the layer input: SmallThinker)
//!     x += post_norm(mixer(norm(x))) * residual_scale     attention / MLA / short conv /
//!                                                        Gated DeltaNet, state in `state`
//!     x += post_norm(ffn(norm(x))) * residual_scale       dense, or routed experts (+ shared
//!                                                        or a dense MLP beside them)
//!     x *= out_scale                                     (post norms, out scale: Gemma 4)
//! logits = cap(output(norm(x)) / logit_divisor)          [n or 1, n_vocab]
//! ```
//!
//! Prediction ([`Foresight`]), tracing and profiling ([`Observers`]) are called at named points
//! between those steps; the expert cache is the FFN's [`ExpertSource`].

use std::sync::Arc;

use super::arch::RouterInput;
use super::attention::{attention, AttentionScratch};
use super::error::ModelError;
use super::ffn::{feed_forward, ExpertSource, FfnScratch, RouteControl};
use super::foresight::{Foresight, PredictionStats};
use super::gated_delta_net::{gated_delta_net, GdnScratch};
use super::mla::{mla_attention, MlaScratch};
use super::observe::{LayerRouting, Observers};
use super::ops::{add_scaled, norm_in_place, rms_norm_rows, soft_cap, RopeTables};
use super::profile::Phase;
use super::short_conv::{short_conv, ShortConvScratch};
use super::state::{KvType, LayerState, SequenceState};
use super::weights::{Ffn, Mixer, Model};
use crate::moe::cache::ExpertCache;
use crate::moe::decoupled::RouterState;
use crate::moe::lossy::{LossyStats, RouteOptions};
use crate::moe::predictor::ExpertPredictor;
use crate::tensor::{matmul, Kernels, MatmulScratch};

/// Where routed experts come from, and how far ahead to predict them.
#[derive(Clone, Default)]
pub struct ExpertStreaming {
    /// None: read experts straight from the memory map (everything resident).
    pub cache: Option<Arc<ExpertCache>>,
    /// Apply the routers of this many following layers to each layer's post-attention state
    /// and prefetch what they pick (0 = no prediction).
    pub lookahead: usize,
}

/// A sequence's state held outside a session (its layers' state and how many positions it
/// holds), to be swapped in later: prompt caching keeps several conversations this way.
pub struct SavedSequence {
    state: SequenceState,
    router: Option<RouterState>,
    pos: usize,
}

impl SavedSequence {
    /// Positions it holds.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes its KV caches hold.
    pub fn kv_bytes(&self) -> usize {
        self.state.kv_bytes()
    }

    /// Bytes its recurrent layers' state holds.
    pub fn recurrent_bytes(&self) -> usize {
        self.state.recurrent_bytes()
    }

    /// The furthest position at most `at_most` it can be cut back to.
    pub fn rewind_point(&self, at_most: usize) -> usize {
        self.state.rewind_point(self.pos, at_most)
    }
}

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
struct Scratch {
    /// The residual stream, `[n, d]`.
    x: Vec<f32>,
    /// A sublayer's normalised input, `[n, d]`.
    xn: Vec<f32>,
    /// A sublayer's output, `[n, d]`.
    out: Vec<f32>,
    attention: AttentionScratch,
    mla: MlaScratch,
    conv: ShortConvScratch,
    gdn: GdnScratch,
    ffn: FfnScratch,
    /// `[n, E]` router logits of a router reading the layer input, computed before the mixer.
    early_logits: Vec<f32>,
    early_mm: MatmulScratch,
    logits: Vec<f32>,
    output_mm: MatmulScratch,
}

/// Decoding state for one sequence.
pub struct Session<'m, 'a> {
    model: &'m Model<'a>,
    kernels: &'static Kernels,
    /// Every layer's KV cache (or other state).
    state: SequenceState,
    rope: RopeTables,
    /// Tokens already in the state.
    pos: usize,
    cache: Option<Arc<ExpertCache>>,
    foresight: Foresight,
    routing: RouteControl,
    observers: Observers,
    /// Bytes of routed-expert weights the batches used (each selected expert counted once per
    /// batch), since the session started.
    expert_bytes: u64,
    s: Scratch,
}

impl<'m, 'a> Session<'m, 'a> {
    /// A session with an f16 KV cache (llama.cpp's default).
    pub fn new(model: &'m Model<'a>, n_ctx: usize) -> Self {
        Self::with_kv_type(model, n_ctx, KvType::F16)
    }

    pub fn with_kv_type(model: &'m Model<'a>, n_ctx: usize, kv_type: KvType) -> Self {
        Self {
            model,
            kernels: crate::tensor::kernels::best(),
            state: SequenceState::new(model, n_ctx, kv_type),
            rope: RopeTables::new(&model.hp, model.rope_freqs.as_deref(), n_ctx),
            pos: 0,
            cache: None,
            foresight: Foresight::new(model, n_ctx),
            routing: RouteControl::default(),
            observers: Observers::default(),
            expert_bytes: 0,
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
        self.state.n_ctx()
    }

    /// Streams routed experts through `streaming.cache` instead of the memory map.
    pub fn set_streaming(&mut self, streaming: ExpertStreaming) {
        self.foresight.set_lookahead(streaming.lookahead);
        self.cache = streaming.cache;
    }

    /// How many layers ahead the lookahead gate predicts (0 = off).
    pub fn lookahead(&self) -> usize {
        self.foresight.lookahead()
    }

    pub fn expert_cache(&self) -> Option<&ExpertCache> {
        self.cache.as_deref()
    }

    /// The expert cache, shared (for reporting from other threads).
    pub fn expert_cache_handle(&self) -> Option<Arc<ExpertCache>> {
        self.cache.clone()
    }

    /// Reads each layer's experts as soon as its router has run, for models whose router reads
    /// the layer's input (on by default; only moves reads earlier).
    pub fn set_router_prefetch(&mut self, on: bool) {
        self.foresight.set_router_prefetch(on);
    }

    /// Whether experts are read at router time (for models whose router reads the layer input).
    pub fn router_prefetch(&self) -> bool {
        self.foresight.router_prefetch()
    }

    /// The experts read at router time against those then used.
    pub fn router_prefetch_stats(&self) -> &PredictionStats {
        self.foresight.router_prefetch_stats()
    }

    /// Lookahead prediction quality per depth.
    pub fn prediction_stats(&self) -> &[PredictionStats] {
        self.foresight.lookahead_stats()
    }

    /// Installs a token-level expert predictor (or removes it with None). Before each batch
    /// runs, it guesses every layer's experts; the guesses are prefetched and tell Belady
    /// eviction when those experts are needed. The model's routers still decide: the output is
    /// the same with any predictor or none.
    pub fn set_predictor(&mut self, predictor: Option<Box<dyn ExpertPredictor>>) {
        self.foresight.set_predictor(predictor);
    }

    /// Quality of the token-level predictor's guesses (depth 0), when one is installed.
    pub fn predictor_stats(&self) -> Option<&PredictionStats> {
        self.foresight.predictor_stats()
    }

    /// Seconds spent in the model's decoupled router (Read-ME) since the session started.
    pub fn decoupled_router_seconds(&self) -> f64 {
        self.foresight.decoupled_router_seconds()
    }

    /// Bytes of routed-expert weights used since the session started.
    pub fn expert_bytes_used(&self) -> u64 {
        self.expert_bytes
    }

    /// Bytes held by the KV caches (they grow with the context).
    pub fn kv_bytes(&self) -> usize {
        self.state.kv_bytes()
    }

    /// Bytes held by recurrent layers' state (fixed per sequence).
    pub fn recurrent_bytes(&self) -> usize {
        self.state.recurrent_bytes()
    }

    /// Everything the sequence's state holds: KV caches and recurrent state.
    pub fn state_bytes(&self) -> usize {
        self.state.kv_bytes() + self.state.recurrent_bytes()
    }

    /// Starts (or stops) recording every MoE layer's routing decisions.
    pub fn set_route_tracing(&mut self, on: bool) {
        self.observers.trace.0 = on.then(Vec::new);
    }

    /// The routing decisions recorded so far, in execution order; tracing stays on.
    pub fn take_route_trace(&mut self) -> Vec<LayerRouting> {
        self.observers
            .trace
            .0
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Starts (or stops) timing the phases of every forward pass.
    pub fn set_profiling(&mut self, on: bool) {
        self.observers.prof.enable(on);
    }

    /// Time per phase since profiling started (or the last `reset_profile`).
    pub fn profile(&self) -> Option<Vec<(Phase, f64)>> {
        self.observers.prof.report()
    }

    pub fn reset_profile(&mut self) {
        self.observers.prof.reset();
    }

    /// Lossy routing options (off by default: the model's router decides alone).
    pub fn set_route_options(&mut self, opts: RouteOptions) {
        self.routing.opts = opts;
    }

    /// What the lossy routing options did so far.
    pub fn lossy_stats(&self) -> &LossyStats {
        &self.routing.stats
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
        self.routing.mask = mask;
        Ok(())
    }

    /// Forgets the sequence (the cache is kept allocated).
    pub fn reset(&mut self) {
        self.state.rewind(self.pos, 0);
        self.pos = 0;
    }

    /// Keeps the first `pos` positions of the sequence and forgets the rest, so that the next
    /// tokens continue from there (a new request sharing a prompt prefix with the last one).
    pub fn rewind(&mut self, pos: usize) -> Result<(), ModelError> {
        if pos > self.pos {
            return Err(ModelError::Input(format!(
                "cannot rewind to position {pos}: the sequence holds {}",
                self.pos
            )));
        }
        if !self.state.can_rewind(self.pos, pos) {
            return Err(ModelError::Unsupported(format!(
                "this model's layer state cannot go back from position {} to {pos}",
                self.pos
            )));
        }
        self.state.rewind(self.pos, pos);
        self.pos = pos;
        Ok(())
    }

    /// Whether [`rewind`](Self::rewind) to `pos` would succeed.
    pub fn can_rewind(&self, pos: usize) -> bool {
        self.state.can_rewind(self.pos, pos)
    }

    /// The furthest position at most `at_most` that [`rewind`](Self::rewind) accepts: `at_most`
    /// itself when every layer keeps its past (KV caches); with recurrent layers, the current
    /// position, the snapshot's, or 0.
    pub fn rewind_point(&self, at_most: usize) -> usize {
        self.state.rewind_point(self.pos, at_most)
    }

    /// Whether some layer keeps a recurrent state (which can be rewound only to a snapshot).
    pub fn has_recurrent_state(&self) -> bool {
        self.state.is_recurrent()
    }

    /// Remembers the recurrent layers' state at the current position so that the sequence can
    /// be rewound here later (one snapshot per sequence: it replaces the previous one). Copies
    /// a few KiB per layer and allocates nothing; without recurrent layers it only records the
    /// position.
    pub fn snapshot(&mut self) {
        self.state.take_snapshot(self.pos);
    }

    /// Empty state for another sequence of this session's shape (allocates its KV caches).
    pub fn blank_sequence(&self) -> SavedSequence {
        let n_ctx = self.n_ctx();
        SavedSequence {
            state: SequenceState::new(self.model, n_ctx, self.state.kv_type()),
            router: self.foresight.blank_router_state(self.model, n_ctx),
            pos: 0,
        }
    }

    /// Exchanges the session's sequence with `saved`: the session continues that sequence, and
    /// `saved` keeps the one it had.
    pub fn swap_sequence(&mut self, saved: &mut SavedSequence) {
        std::mem::swap(&mut self.state, &mut saved.state);
        self.foresight.swap_router_state(&mut saved.router);
        std::mem::swap(&mut self.pos, &mut saved.pos);
    }

    /// Runs `tokens` at the next positions. Returns the logits of every token (`[n, n_vocab]`)
    /// when `all_logits`, else of the last token only.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<&[f32], ModelError> {
        self.check_input(tokens)?;
        // A resident pass keeps the other workers spinning until it ends; a streamed one leaves
        // the cores to the cache's I/O threads while it waits for reads.
        let resident = self.cache.is_none();
        crate::threads::run_on_pool(resident, || self.forward_on_pool(tokens, all_logits))?;
        Ok(&self.s.logits)
    }

    fn check_input(&self, tokens: &[u32]) -> Result<(), ModelError> {
        let n_vocab = self.model.hp.n_vocab;
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to evaluate".into()));
        }
        if self.pos + tokens.len() > self.n_ctx() {
            return Err(ModelError::ContextFull {
                n_ctx: self.n_ctx(),
                needed: self.pos + tokens.len(),
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {n_vocab}"
            )));
        }
        Ok(())
    }

    fn forward_on_pool(&mut self, tokens: &[u32], all_logits: bool) -> Result<(), ModelError> {
        let model = self.model;
        let hp = &model.hp;
        let k = self.kernels;
        let (n, d) = (tokens.len(), hp.n_embd);
        let (pos, last_pos) = (self.pos, self.pos + n - 1);
        let cache = self.cache.as_deref();
        let source = cache.map_or(ExpertSource::Resident, ExpertSource::Streamed);
        let s = &mut self.s;
        let prof = &mut self.observers.prof;
        prof.start();

        // x = embedding * embedding_scale                                    [n, d]
        s.x.resize(n * d, 0.0);
        s.xn.resize(n * d, 0.0);
        for (row, &tok) in s.x.chunks_exact_mut(d).zip(tokens) {
            model.tok_embd.dequantize_row(tok as usize, row);
            if hp.embedding_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= hp.embedding_scale);
            }
        }
        self.foresight.before_batch(model, tokens, pos, cache)?;

        for (li, layer) in model.layers.iter().enumerate() {
            if let Some(cache) = cache {
                cache.set_position(last_pos, li);
            }
            self.foresight.layer_start(li, last_pos, cache);

            // Router logits from the layer's input, before attention        [n, E]
            let routed_early = match &layer.ffn {
                Ffn::Moe(moe)
                    if hp.traits.router_input == RouterInput::LayerInput
                        && model.router.is_none() =>
                {
                    prof.lap(Phase::Other);
                    s.early_logits.resize(n * hp.n_expert, 0.0);
                    matmul(
                        k,
                        &moe.router,
                        &s.x,
                        n,
                        &mut s.early_logits,
                        &mut s.early_mm,
                    );
                    prof.lap(Phase::Routing);
                    self.foresight
                        .routed_before_mixer(model, li, &s.early_logits, last_pos, cache);
                    true
                }
                _ => false,
            };

            // x += mixer(norm(x)) * residual_scale
            rms_norm_rows(&s.x, &layer.mixer_norm, hp.norm_eps, &mut s.xn, k);
            prof.lap(Phase::Other);
            match (&layer.mixer, self.state.layer_mut(li)) {
                (Mixer::Attention(a), LayerState::Kv(kv)) => attention(
                    k,
                    hp,
                    li,
                    a,
                    &s.xn,
                    n,
                    pos,
                    &self.rope,
                    kv,
                    &mut s.attention,
                    &mut s.out,
                    prof,
                ),
                (Mixer::Mla(a), LayerState::Kv(kv)) => mla_attention(
                    k, hp, a, &s.xn, n, pos, &self.rope, kv, &mut s.mla, &mut s.out, prof,
                ),
                (Mixer::ShortConv(c), LayerState::Conv(st)) => {
                    short_conv(k, c, &s.xn, n, pos, st, &mut s.conv, &mut s.out, prof)
                }
                (Mixer::GatedDeltaNet(g), LayerState::Delta(st)) => gated_delta_net(
                    k,
                    g,
                    hp.norm_eps,
                    &s.xn,
                    n,
                    pos,
                    st,
                    &mut s.gdn,
                    &mut s.out,
                    prof,
                ),
                _ => unreachable!("SequenceState::new gives each mixer its kind of state"),
            }
            if let Some(w) = &layer.mixer_post_norm {
                norm_in_place(&mut s.out, w, d, hp.norm_eps, k);
            }
            add_scaled(&mut s.x, &s.out, hp.residual_scale);
            self.foresight
                .after_mixer(k, model, li, &s.x, n, last_pos, cache);

            // x += ffn(norm(x)) * residual_scale
            rms_norm_rows(&s.x, &layer.ffn_norm, hp.norm_eps, &mut s.xn, k);
            let decided = match routed_early {
                true => Some(&s.early_logits[..]),
                false => self.foresight.decided(),
            };
            self.expert_bytes += feed_forward(
                k,
                hp,
                li,
                &layer.ffn,
                (&s.x, &s.xn),
                n,
                decided,
                source,
                &mut self.routing,
                &mut s.ffn,
                &mut s.out,
                prof,
            )?;
            if let Ffn::Moe(_) = layer.ffn {
                let (logits, routes) = (s.ffn.router_logits(n, hp.n_expert), s.ffn.routes());
                self.observers.trace.on_routing(li, pos, logits, routes);
                self.foresight.on_routing(li, s.ffn.active(), routes);
            }
            if let Some(w) = &layer.ffn_post_norm {
                norm_in_place(&mut s.out, w, d, hp.norm_eps, k);
            }
            add_scaled(&mut s.x, &s.out, hp.residual_scale);
            if let Some(c) = layer.out_scale {
                s.x.iter_mut().for_each(|v| *v *= c);
            }
        }

        // logits = output(norm(x)) / logit_divisor, only for the rows the caller wants
        let prof = &mut self.observers.prof;
        prof.lap(Phase::Other);
        let first = if all_logits { 0 } else { n - 1 };
        let m = n - first;
        rms_norm_rows(
            &s.x[first * d..],
            &model.output_norm,
            hp.norm_eps,
            &mut s.xn[..m * d],
            k,
        );
        s.logits.resize(m * hp.n_vocab, 0.0);
        matmul(
            k,
            &model.output,
            &s.xn[..m * d],
            m,
            &mut s.logits,
            &mut s.output_mm,
        );
        if hp.logit_divisor != 1.0 {
            let div = hp.logit_divisor;
            s.logits.iter_mut().for_each(|v| *v /= div);
        }
        if let Some(c) = hp.final_logit_softcap {
            soft_cap(&mut s.logits, c);
        }
        prof.lap(Phase::Output);
        self.pos += n;
        Ok(())
    }
}
