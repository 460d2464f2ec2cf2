//! One forward pass over a batch of one or several sequences, top to bottom (the outline is at
//! the top of `forward.rs`): a sequence's rows go through each mixer on its own state, everything
//! else through all rows at once.

use crate::model::arch::RouterInput;
use crate::model::attention::{attention, AttentionScratch, AttnSeq};
use crate::model::error::ModelError;
use crate::model::ffn::{feed_forward, ExpertSource, FfnScratch, RouteControl};
use crate::model::foresight::Foresight;
use crate::model::gated_delta_net::{gated_delta_net, GdnScratch};
use crate::model::hparams::HParams;
use crate::model::mamba2::{mamba2, Mamba2Scratch};
use crate::model::mla::{mla_attention, MlaScratch};
use crate::model::observe::{Observers, WeightInputs};
use crate::model::ops::{add_scaled, norm_in_place, rms_norm_rows, soft_cap, RopeTables};
use crate::model::profile::{Phase, Profiler};
use crate::model::short_conv::{short_conv, ShortConvScratch};
use crate::model::state::{LayerState, SequenceState};
use crate::model::weights::{Ffn, Mixer, Model, QueryProj};
use crate::moe::cache::ExpertCache;
use crate::moe::decoupled::RouterState;
use crate::tensor::{matmul, Kernels, MatmulScratch};

/// Sequences one [`Session::forward_batch`](super::Session::forward_batch) takes at most.
pub const MAX_BATCH_SEQUENCES: usize = 64;

/// Buffers reused across calls, grown to the largest batch seen.
#[derive(Default)]
pub(super) struct Scratch {
    /// The residual stream, `[n, d]`.
    x: Vec<f32>,
    /// A sublayer's normalised input, `[n, d]`.
    xn: Vec<f32>,
    /// A sublayer's output, `[n, d]`.
    out: Vec<f32>,
    /// One sequence's mixer output, `[m, d]`, when the batch holds several.
    part_out: Vec<f32>,
    mixer: MixerScratch,
    ffn: FfnScratch,
    /// `[n, E]` router logits of a router reading the layer input, computed before the mixer.
    early_logits: Vec<f32>,
    early_mm: MatmulScratch,
    logits: Vec<f32>,
    output_mm: MatmulScratch,
}

impl Scratch {
    /// The logits of the last pass.
    pub(super) fn logits(&self) -> &[f32] {
        &self.logits
    }
}

/// Buffers of the mixers.
#[derive(Default)]
pub(super) struct MixerScratch {
    attention: AttentionScratch,
    mla: MlaScratch,
    conv: ShortConvScratch,
    gdn: GdnScratch,
    ssm: Mamba2Scratch,
}

/// One sequence's share of a batch: its state, its tokens (consecutive rows of the batch) and
/// the position of the first.
pub(super) struct Part<'s> {
    pub(super) state: &'s mut SequenceState,
    /// Its decoupled-router state when the sequence is kept outside the session (None: the
    /// session's own sequence, whose router state the foresight holds).
    pub(super) router: Option<&'s mut Option<RouterState>>,
    pub(super) tokens: &'s [u32],
    pub(super) pos: usize,
}

/// Which rows' logits a batch returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wanted {
    All,
    /// Each sequence's last token's.
    LastOfEach,
}

/// What a forward pass reads and updates of its session.
pub(super) struct Pass<'p, 'm, 'a> {
    pub(super) model: &'m Model<'a>,
    pub(super) kernels: &'static Kernels,
    pub(super) rope: &'p RopeTables,
    pub(super) cache: Option<&'p ExpertCache>,
    pub(super) foresight: &'p mut Foresight,
    pub(super) routing: &'p mut RouteControl,
    pub(super) observers: &'p mut Observers,
    /// Routed-expert bytes used, to be added to.
    pub(super) expert_bytes: &'p mut u64,
    pub(super) s: &'p mut Scratch,
}

impl Pass<'_, '_, '_> {
    /// Runs the batch whose rows are each part's tokens in turn (one part: a sequence's prompt
    /// or decode step), leaving the logits `wanted` in `s.logits`.
    pub(super) fn run(&mut self, parts: &mut [Part], wanted: Wanted) -> Result<(), ModelError> {
        let model = self.model;
        let hp = &model.hp;
        let k = self.kernels;
        let d = hp.n_embd;
        let n: usize = parts.iter().map(|p| p.tokens.len()).sum();
        // The cache's clock (and predictions' horizon): the batch's furthest position.
        let last_pos = parts
            .iter()
            .map(|p| p.pos + p.tokens.len() - 1)
            .max()
            .unwrap_or(0);
        let first_pos = parts.first().map_or(0, |p| p.pos);
        let cache = self.cache;
        let source = cache.map_or(ExpertSource::Resident, ExpertSource::Streamed);
        let s = &mut *self.s;
        let prof = &mut self.observers.prof;
        prof.start();

        // x = embedding * embedding_scale                                    [n, d]
        s.x.resize(n * d, 0.0);
        s.xn.resize(n * d, 0.0);
        let tokens = parts.iter().flat_map(|p| p.tokens);
        for (row, &tok) in s.x.chunks_exact_mut(d).zip(tokens) {
            model.tok_embd.dequantize_row(tok as usize, row);
            if hp.embedding_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= hp.embedding_scale);
            }
        }
        match parts {
            [one] if one.router.is_none() => self
                .foresight
                .before_batch(model, one.tokens, one.pos, cache)?,
            // Sequences from `forward_batch`, each with its router state.
            _ => {
                let seqs = parts
                    .iter_mut()
                    .filter_map(|p| Some((p.tokens, p.pos, p.router.as_deref_mut()?)));
                self.foresight
                    .before_sequences(model, seqs, last_pos, cache)?
            }
        }

        // Rows of the residual stream still computed: all n until the last layer's mixer, then
        // only those whose logits are wanted, moved to the front (`keep_wanted_rows`).
        let mut rows = n;
        if self.routing.replay.is_some() {
            let origin = self.routing.replay_origin;
            let positions = parts
                .iter()
                .flat_map(|p| origin + p.pos..origin + p.pos + p.tokens.len());
            self.routing.positions.clear();
            self.routing.positions.extend(positions);
        }
        let last_layer = model.layers.len() - 1;

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
                    let obs = &mut self.observers.inputs;
                    obs.on_dense(li, &["ffn_gate_inp"], &s.x, n);
                    self.foresight
                        .routed_before_mixer(model, li, &s.early_logits, last_pos, cache);
                    true
                }
                _ => false,
            };

            // x += mixer(norm(x)) * residual_scale, each sequence's rows on its own state
            rms_norm_rows(&s.x, &layer.mixer_norm, hp.norm_eps, &mut s.xn, k);
            prof.lap(Phase::Other);
            s.out.resize(n * d, 0.0);
            match &layer.mixer {
                // Projections over every row at once, the attention itself per sequence.
                Mixer::Attention(a) => {
                    let mut seqs = attention_seqs(parts, li);
                    let (xn, rope) = (&s.xn, self.rope);
                    let scratch = &mut s.mixer.attention;
                    attention(
                        k, hp, li, a, xn, n, &mut seqs, rope, scratch, &mut s.out, prof,
                    );
                    observe_mixer(
                        &mut self.observers.inputs,
                        li,
                        &layer.mixer,
                        xn,
                        n,
                        &s.mixer,
                    );
                }
                _ => {
                    let mut row = 0;
                    for part in parts.iter_mut() {
                        let m = part.tokens.len();
                        let rows = row * d..(row + m) * d;
                        // One sequence writes the batch's output directly; several, in turn.
                        let out = if m == n { &mut s.out } else { &mut s.part_out };
                        let input = (&s.xn[rows.clone()], m, part.pos);
                        let state = part.state.layer_mut(li);
                        let scratch = &mut s.mixer;
                        run_mixer(
                            k,
                            hp,
                            &layer.mixer,
                            state,
                            input,
                            self.rope,
                            scratch,
                            out,
                            prof,
                        );
                        let (obs, xn) = (&mut self.observers.inputs, &s.xn[rows.clone()]);
                        observe_mixer(obs, li, &layer.mixer, xn, m, &s.mixer);
                        if m != n {
                            s.out[rows].copy_from_slice(&s.part_out[..m * d]);
                        }
                        row += m;
                    }
                }
            }
            // The mixers have filled every position's state; past the last one only the rows
            // whose logits are wanted matter (llama.cpp's `inp_out_ids`), unless every row's
            // routing or weight inputs are observed, or the routing was decided for the whole
            // batch beforehand.
            if li == last_layer
                && wanted == Wanted::LastOfEach
                && n > parts.len()
                && !routed_early
                && self.foresight.decided().is_none()
                && !self.observers.trace.is_on()
                && !self.observers.inputs.is_on()
            {
                keep_wanted_rows(parts, &mut s.x, &mut s.out, d);
                rows = parts.len();
                if self.routing.replay.is_some() {
                    let origin = self.routing.replay_origin;
                    let last = parts.iter().map(|p| origin + p.pos + p.tokens.len() - 1);
                    self.routing.positions.clear();
                    self.routing.positions.extend(last);
                }
            }
            let (x, out) = (&mut s.x[..rows * d], &mut s.out[..rows * d]);
            if let Some(w) = &layer.mixer_post_norm {
                norm_in_place(out, w, d, hp.norm_eps, k);
            }
            add_scaled(x, out, hp.residual_scale);
            self.foresight
                .after_mixer(k, model, li, x, rows, last_pos, cache);

            // x += ffn(norm(x)) * residual_scale
            let xn = &mut s.xn[..rows * d];
            rms_norm_rows(x, &layer.ffn_norm, hp.norm_eps, xn, k);
            let decided = match routed_early {
                true => Some(&s.early_logits[..]),
                false => self.foresight.decided(),
            };
            *self.expert_bytes += feed_forward(
                k,
                hp,
                li,
                &layer.ffn,
                (x, xn),
                rows,
                decided,
                source,
                self.routing,
                &mut s.ffn,
                &mut s.out,
                (&mut *prof, &mut self.observers.inputs),
            )?;
            if let Ffn::Moe(_) = layer.ffn {
                let (logits, routes) = (s.ffn.router_logits(rows, hp.n_expert), s.ffn.routes());
                self.observers
                    .trace
                    .on_routing(li, first_pos, logits, routes);
                self.foresight.on_routing(li, s.ffn.active(), routes);
            }
            let out = &mut s.out[..rows * d];
            if let Some(w) = &layer.ffn_post_norm {
                norm_in_place(out, w, d, hp.norm_eps, k);
            }
            let x = &mut s.x[..rows * d];
            add_scaled(x, out, hp.residual_scale);
            if let Some(c) = layer.out_scale {
                x.iter_mut().for_each(|v| *v *= c);
            }
        }

        // logits = output(norm(x)) / logit_divisor, for the rows the caller wants: all, or
        // each sequence's last                                             [m, n_vocab]
        let prof = &mut self.observers.prof;
        prof.lap(Phase::Other);
        let m = match wanted {
            Wanted::All => {
                rms_norm_rows(&s.x, &model.output_norm, hp.norm_eps, &mut s.xn, k);
                n
            }
            // Already the first rows (the last layer kept only them).
            Wanted::LastOfEach if rows == parts.len() => {
                let r = rows * d;
                rms_norm_rows(
                    &s.x[..r],
                    &model.output_norm,
                    hp.norm_eps,
                    &mut s.xn[..r],
                    k,
                );
                rows
            }
            Wanted::LastOfEach => {
                let mut end = 0;
                for (i, part) in parts.iter().enumerate() {
                    end += part.tokens.len();
                    rms_norm_rows(
                        &s.x[(end - 1) * d..end * d],
                        &model.output_norm,
                        hp.norm_eps,
                        &mut s.xn[i * d..(i + 1) * d],
                        k,
                    );
                }
                parts.len()
            }
        };
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
        Ok(())
    }
}

/// Moves each sequence's last row (of `d` values) of `x` and `out` to row `i` for the `i`th
/// sequence: the rows whose logits are wanted, in order.
fn keep_wanted_rows(parts: &[Part], x: &mut [f32], out: &mut [f32], d: usize) {
    let mut end = 0;
    for (i, part) in parts.iter().enumerate() {
        end += part.tokens.len();
        x.copy_within((end - 1) * d..end * d, i * d);
        out.copy_within((end - 1) * d..end * d, i * d);
    }
}

/// Every sequence's rows and KV cache for attention layer `li`.
fn attention_seqs<'p>(
    parts: &'p mut [Part],
    li: usize,
) -> heapless::Vec<AttnSeq<'p>, MAX_BATCH_SEQUENCES> {
    let mut seqs = heapless::Vec::new();
    let mut row = 0;
    for part in parts.iter_mut() {
        let len = part.tokens.len();
        let LayerState::Kv(kv) = part.state.layer_mut(li) else {
            unreachable!("SequenceState::new gives each mixer its kind of state")
        };
        let seq = AttnSeq {
            row,
            len,
            pos: part.pos,
            kv,
        };
        if seqs.push(seq).is_err() {
            unreachable!("forward_batch takes at most MAX_BATCH_SEQUENCES sequences");
        }
        row += len;
    }
    seqs
}

/// The inputs of the projections of `mixer` (layer `li`), which just ran on the `m` rows `xn`,
/// to the weight-input observer: `xn` for the input projections, the mixer's scratch for those
/// inside.
fn observe_mixer(
    obs: &mut WeightInputs,
    li: usize,
    mixer: &Mixer,
    xn: &[f32],
    m: usize,
    s: &MixerScratch,
) {
    if !obs.is_on() {
        return;
    }
    match mixer {
        Mixer::Attention(a) => {
            let qkv: &[&str] = match a.wv {
                Some(_) => &["attn_q", "attn_k", "attn_v"],
                None => &["attn_q", "attn_k"],
            };
            obs.on_dense(li, qkv, xn, m);
            obs.on_dense(li, &["attn_output"], s.attention.attended(), m);
        }
        Mixer::Mla(a) => {
            match a.q {
                QueryProj::Direct(_) => obs.on_dense(li, &["attn_q"], xn, m),
                QueryProj::LoRa { .. } => {
                    obs.on_dense(li, &["attn_q_a"], xn, m);
                    obs.on_dense(li, &["attn_q_b"], s.mla.query_latents(), m);
                }
            }
            obs.on_dense(li, &["attn_kv_a_mqa"], xn, m);
            // The per-head products, as llama-imatrix sums a 3-D product: one row of every
            // head's columns side by side, one count per token.
            let (nope, qs) = (a.wk_b.cols, s.mla.queries());
            let per_head = qs.len() / m.max(1) / a.wk_b.n_expert.max(1);
            let q_nope: Vec<f32> = qs
                .chunks_exact(per_head)
                .flat_map(|head| &head[..nope])
                .copied()
                .collect();
            obs.on_dense(li, &["attn_k_b"], &q_nope, m);
            obs.on_dense(li, &["attn_v_b"], s.mla.latents(), m);
            obs.on_dense(li, &["attn_output"], s.mla.values(), m);
        }
        Mixer::ShortConv(_) => {
            obs.on_dense(li, &["shortconv.in_proj"], xn, m);
            obs.on_dense(li, &["shortconv.out_proj"], s.conv.gated(), m);
        }
        Mixer::GatedDeltaNet(_) => {
            let stems = ["attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha"];
            obs.on_dense(li, &stems, xn, m);
            obs.on_dense(li, &["ssm_out"], s.gdn.read_out(), m);
        }
        Mixer::Mamba2(_) => {
            obs.on_dense(li, &["ssm_in"], xn, m);
            obs.on_dense(li, &["ssm_out"], s.ssm.read_out(), m);
        }
    }
}

/// One sequence's rows `xn` (`[m, d]`, at positions `pos..`) through a mixer other than
/// attention (MLA, short convolution, Gated DeltaNet, Mamba-2) on that sequence's state for the
/// layer; writes `out` (`[m, d]`).
#[allow(clippy::too_many_arguments)]
fn run_mixer(
    k: &Kernels,
    hp: &HParams,
    mixer: &Mixer,
    state: &mut LayerState,
    (xn, m, pos): (&[f32], usize, usize),
    rope: &RopeTables,
    s: &mut MixerScratch,
    out: &mut Vec<f32>,
    prof: &mut Profiler,
) {
    match (mixer, state) {
        (Mixer::Mla(a), LayerState::Kv(kv)) => {
            mla_attention(k, hp, a, xn, m, pos, rope, kv, &mut s.mla, out, prof)
        }
        (Mixer::ShortConv(c), LayerState::Conv(st)) => {
            short_conv(k, c, xn, m, pos, st, &mut s.conv, out, prof)
        }
        (Mixer::GatedDeltaNet(g), LayerState::Delta(st)) => {
            gated_delta_net(k, g, hp.norm_eps, xn, m, pos, st, &mut s.gdn, out, prof)
        }
        (Mixer::Mamba2(mb), LayerState::Ssm(st)) => {
            mamba2(k, mb, hp.norm_eps, xn, m, pos, st, &mut s.ssm, out, prof)
        }
        _ => unreachable!("SequenceState::new gives each mixer its kind of state"),
    }
}
