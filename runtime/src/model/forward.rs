//! The forward pass: a [`Session`] holds one sequence's state and runs batches of tokens
//! through the model, top to bottom; [`Session::forward_batch`] runs several sequences (held
//! outside the session) in one batch, each sequence's tokens consecutive rows:
//!
//! ```text
//! x = embed(tokens) * embedding_scale                    [n, d]
//! for each layer:
//!     (router logits from x, when the router reads the layer input: SmallThinker)
//!     x += post_norm(mixer(norm(x))) * residual_scale     attention / MLA / short conv /
//!                                                        Gated DeltaNet / Mamba-2, per
//!                                                        sequence on its rows and its state
//!     x += post_norm(ffn(norm(x))) * residual_scale       dense, or routed experts (+ shared
//!                                                        or a dense MLP beside them), all rows
//!     x *= out_scale                                     (post norms, out scale: Gemma 4)
//! logits = cap(output(norm(x)) / logit_divisor)          [n, or 1 per sequence, n_vocab]
//! ```
//!
//! Prediction ([`Foresight`]), tracing and profiling ([`Observers`]) are called at named points
//! between those steps; the expert cache is the FFN's [`ExpertSource`].

use std::sync::Arc;

use super::error::ModelError;
use super::ffn::RouteControl;
use super::foresight::{Foresight, PredictionStats};
use super::observe::{InputSums, LayerRouting, Observers};
use super::ops::RopeTables;
use super::profile::Phase;
use super::state::{KvType, SequenceState};
use super::weights::Model;
use crate::moe::cache::ExpertCache;
use crate::moe::decoupled::RouterState;
use crate::moe::lossy::{LossyStats, RouteOptions};
use crate::moe::predictor::ExpertPredictor;
use crate::moe::replay::RouteReplay;
use crate::tensor::Kernels;

mod pass;
pub use pass::MAX_BATCH_SEQUENCES;
use pass::{Part, Pass, Scratch, Wanted};

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

/// Decoding state for one sequence.
pub struct Session<'m, 'a> {
    model: &'m Model<'a>,
    kernels: &'static Kernels,
    /// Every layer's KV cache (or other state).
    state: SequenceState,
    /// The shape of its sequences (kept here too: the state may be lent out).
    n_ctx: usize,
    kv_type: KvType,
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
    /// Rows one forward pass runs at most: longer inputs run in consecutive batches of this
    /// many (llama.cpp's `n_ubatch`), which bounds the scratch buffers.
    max_batch: usize,
    /// The logits of every row of an input run in several batches (`forward(.., true)`).
    joined_logits: Option<Vec<f32>>,
    s: Scratch,
}

/// Default of [`Session::set_max_batch`]: llama.cpp's default `n_ubatch`.
pub const DEFAULT_MAX_BATCH: usize = 512;

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
            n_ctx,
            kv_type,
            rope: RopeTables::new(&model.hp, model.rope_freqs.as_deref(), n_ctx),
            pos: 0,
            cache: None,
            foresight: Foresight::new(model, n_ctx),
            routing: RouteControl::default(),
            observers: Observers::default(),
            expert_bytes: 0,
            max_batch: DEFAULT_MAX_BATCH,
            joined_logits: None,
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
        self.n_ctx
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

    /// Starts (or stops) summing the squared inputs of every weight matrix, per column (and
    /// per expert): an importance matrix as llama-imatrix collects it (see [`InputSums`]).
    /// Past the last layer's mixer every row is then computed, as with route tracing.
    pub fn set_input_sums(&mut self, on: bool) {
        self.observers.inputs.0 = on.then(InputSums::default);
    }

    /// The sums since collection started or was last taken (None when off); collection stays
    /// on, from zero.
    pub fn take_input_sums(&mut self) -> Option<InputSums> {
        self.observers.inputs.0.as_mut().map(std::mem::take)
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

    /// Routes every token to the experts a routing trace gives instead of the router's
    /// (benchmarks of streaming on random-weight files: the output is not the model's); None
    /// restores the model's routing.
    pub fn set_route_replay(&mut self, replay: Option<RouteReplay>) {
        self.routing.replay = replay;
        self.routing.replay_origin = 0;
    }

    /// The routing trace replayed, if any.
    pub fn route_replay(&self) -> Option<&RouteReplay> {
        self.routing.replay.as_ref()
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
        self.routing.replay_origin += self.pos;
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
            state: SequenceState::new(self.model, n_ctx, self.kv_type),
            router: self.foresight.blank_router_state(self.model, n_ctx),
            pos: 0,
        }
    }

    /// Moves the session's sequence out, leaving it none: for callers that keep every sequence
    /// outside the session (moed's slots) and swap one in only to evaluate its prompt. Until
    /// one is swapped in, [`forward`](Self::forward) refuses to run.
    pub fn take_sequence(&mut self) -> SavedSequence {
        let mut out = SavedSequence {
            state: SequenceState::default(),
            router: None,
            pos: 0,
        };
        self.swap_sequence(&mut out);
        out
    }

    /// Exchanges the session's sequence with `saved`: the session continues that sequence, and
    /// `saved` keeps the one it had.
    pub fn swap_sequence(&mut self, saved: &mut SavedSequence) {
        std::mem::swap(&mut self.state, &mut saved.state);
        self.foresight.swap_router_state(&mut saved.router);
        std::mem::swap(&mut self.pos, &mut saved.pos);
    }

    /// Rows one forward pass runs at most (at least 1): a longer input runs as consecutive
    /// batches, each row computed as in one batch (the products are row by row), so only the
    /// scratch memory and the weight reuse change.
    pub fn set_max_batch(&mut self, rows: usize) {
        self.max_batch = rows.max(1);
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Runs `tokens` at the next positions, in batches of at most [`max_batch`](Self::max_batch)
    /// rows. Returns the logits of every token (`[n, n_vocab]`) when `all_logits`, else of the
    /// last token only. If a later batch fails, the earlier ones stay in the sequence.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<&[f32], ModelError> {
        self.check_input(&self.state, self.pos, tokens)?;
        self.joined_logits = None;
        if tokens.len() <= self.max_batch {
            return self.forward_one(tokens, all_logits);
        }
        let mut joined = Vec::new();
        for batch in tokens.chunks(self.max_batch) {
            let logits = self.forward_one(batch, all_logits)?;
            if all_logits {
                joined.extend_from_slice(logits);
            }
        }
        if all_logits {
            self.joined_logits = Some(joined);
        }
        Ok(self.last_logits())
    }

    /// One batch of `forward`.
    fn forward_one(&mut self, tokens: &[u32], all_logits: bool) -> Result<&[f32], ModelError> {
        // The session's own sequence is lent to the batch (an empty placeholder meanwhile).
        let mut state = std::mem::take(&mut self.state);
        let mut parts = [Part {
            state: &mut state,
            router: None,
            tokens,
            pos: self.pos,
        }];
        let wanted = if all_logits {
            Wanted::All
        } else {
            Wanted::LastOfEach
        };
        let ran = self.run_batch(&mut parts, wanted);
        self.state = state;
        ran?;
        self.pos += tokens.len();
        Ok(self.s.logits())
    }

    /// The logits the last forward pass returned.
    pub fn last_logits(&self) -> &[f32] {
        match &self.joined_logits {
            Some(all) => all,
            None => self.s.logits(),
        }
    }

    /// Runs several sequences together: each `(sequence, tokens)` evaluates its tokens at its
    /// next positions (a decode step is one token each). The sequences are held outside the
    /// session ([`blank_sequence`](Self::blank_sequence); the session's own is not involved).
    /// Each mixer (attention, recurrent) runs per sequence on that sequence's state (attention's
    /// projections over all rows at once); everything else runs over the batch's rows together,
    /// so that an expert several sequences chose is fetched and its weights read once for all
    /// of them. Every row is computed as it would be
    /// alone (the products are row by row, and each row sums its experts in index order), so
    /// each sequence gets bit-identical logits to a run of its own. Returns the logits of each
    /// sequence's last token, `[seqs.len(), n_vocab]` in the order given.
    ///
    /// Not per sequence: the token-level predictor follows one sequence and guesses nothing
    /// for such a batch (prefetching only), and lossy routing options that look at the expert
    /// cache see the whole batch's use of it.
    pub fn forward_batch(
        &mut self,
        seqs: &mut [(&mut SavedSequence, &[u32])],
    ) -> Result<&[f32], ModelError> {
        if seqs.is_empty() || seqs.len() > MAX_BATCH_SEQUENCES {
            return Err(ModelError::Input(format!(
                "{} sequences to evaluate together: 1 to {MAX_BATCH_SEQUENCES} run in one batch",
                seqs.len()
            )));
        }
        for (seq, tokens) in seqs.iter() {
            if !seq.state.fits(self.model, self.n_ctx()) {
                return Err(ModelError::Input(
                    "a sequence of another model or context length (make sequences with \
                     Session::blank_sequence)"
                        .into(),
                ));
            }
            self.check_input(&seq.state, seq.pos, tokens)?;
        }
        let mut parts: Vec<Part> = seqs
            .iter_mut()
            .map(|(seq, tokens)| Part {
                state: &mut seq.state,
                router: Some(&mut seq.router),
                tokens,
                pos: seq.pos,
            })
            .collect();
        self.joined_logits = None;
        let ran = self.run_batch(&mut parts, Wanted::LastOfEach);
        drop(parts);
        ran?;
        for (seq, tokens) in seqs.iter_mut() {
            seq.pos += tokens.len();
        }
        Ok(self.s.logits())
    }

    fn run_batch(&mut self, parts: &mut [Part], wanted: Wanted) -> Result<(), ModelError> {
        // A resident pass keeps the other workers spinning until it ends; a streamed one leaves
        // the cores to the cache's I/O threads while it waits for reads.
        let resident = self.cache.is_none();
        let mut pass = Pass {
            model: self.model,
            kernels: self.kernels,
            rope: &self.rope,
            cache: self.cache.as_deref(),
            foresight: &mut self.foresight,
            routing: &mut self.routing,
            observers: &mut self.observers,
            expert_bytes: &mut self.expert_bytes,
            s: &mut self.s,
        };
        crate::threads::run_on_pool(resident, || pass.run(parts, wanted))
    }

    fn check_input(
        &self,
        state: &SequenceState,
        pos: usize,
        tokens: &[u32],
    ) -> Result<(), ModelError> {
        let n_vocab = self.model.hp.n_vocab;
        if state.n_ctx() == 0 {
            return Err(ModelError::Input(
                "the session holds no sequence (swap one in first)".into(),
            ));
        }
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to evaluate".into()));
        }
        if pos + tokens.len() > state.n_ctx() {
            return Err(ModelError::ContextFull {
                n_ctx: state.n_ctx(),
                needed: pos + tokens.len(),
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {n_vocab}"
            )));
        }
        Ok(())
    }
}
