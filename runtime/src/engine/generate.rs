//! The generation loop shared by moe-run, moed and the tests: evaluate a prompt, then sample
//! token after token, turning them into text incrementally and watching for end-of-generation
//! tokens, stop strings and cancellation.
//!
//! With a grammar, each sampled token is checked against it (cheap); only a token it rejects
//! costs the full mask, after which the token is drawn again from the allowed ones (as llama.cpp
//! and mistral.rs do). A grammar that is complete ends generation as an end-of-generation token
//! would.

use std::time::{Duration, Instant};

use crate::grammar::{Constraint, ConstraintState, GrammarError};
use crate::model::{ModelError, Session};
use crate::sampling::Sampler;
use crate::tokenizer::{Detokenizer, Tokenizer};

/// Prompt ids decoded as context before the first generated one.
const DETOKENIZER_CONTEXT: usize = 4;

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct Request<'r> {
    pub prompt: &'r [u32],
    /// How many of the prompt's first ids the session already holds (a prefix kept from an
    /// earlier request, see [`Session::rewind`]); the session must be at that position, and at
    /// least the last prompt id is evaluated again, for its logits.
    pub cached: usize,
    /// At most this many new tokens (0: nothing is evaluated).
    pub max_tokens: usize,
    /// Generation stops at the first of these strings; it and anything after it are dropped.
    pub stop: &'r [String],
    /// Go on past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Leave special tokens out of the text.
    pub skip_special: bool,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (None: no log-probabilities).
    pub top_logprobs: Option<usize>,
    /// Hold the output to this grammar. End-of-generation tokens are then allowed only where
    /// the grammar may end (never with `ignore_eos`, until it is complete).
    pub constraint: Option<&'r Constraint>,
}

/// New output: a generated token and the text that became final with it (often empty: a
/// character still incomplete, or text that may begin a stop string), or, with `id` None, the
/// text held back until the end.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'p> {
    pub id: Option<u32>,
    pub text: &'p str,
    /// With `Request::top_logprobs`, the token's log-probability and the alternatives.
    pub logprobs: Option<&'p Logprobs>,
}

/// A sampled token's log-probability under the model (the softmax of its raw logits, before
/// temperature and the other sampling settings), with the most likely tokens at that step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logprobs {
    pub logprob: f32,
    /// (token, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

impl Logprobs {
    /// Of token `id` in `logits`, with the `top` most likely tokens.
    pub fn of(logits: &[f32], id: u32, top: usize) -> Self {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let log_z = max + sum.ln() as f32;
        // The `top` largest logits, kept sorted while scanning (the vocabulary is large, `top`
        // at most a few dozen).
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (i, &v) in logits.iter().enumerate() {
                if best.len() == top && v <= best[top - 1].1 {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= v);
                best.insert(at, (i as u32, v));
                best.truncate(top);
            }
        }
        Self {
            logprob: logits[id as usize] - log_z,
            top: best.into_iter().map(|(i, v)| (i, v - log_z)).collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    /// `max_tokens` were generated.
    #[default]
    Length,
    /// The model produced an end-of-generation token (not passed on).
    EndOfGeneration,
    /// The text reached a stop string.
    StopString,
    /// The caller's callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt ids the session already held; only the others were evaluated.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
    pub stop: StopReason,
    /// Routed-expert weight bytes the prompt's batch used.
    pub prompt_expert_bytes: u64,
    /// Routed-expert weight bytes the single-token decode steps used, and how many there were.
    pub decode_expert_bytes: u64,
    pub decode_steps: usize,
}

/// Evaluates `req.prompt`, then samples up to `req.max_tokens` tokens, calling `on_piece` for
/// each one; `on_piece` returns false to stop (cancellation). Without a tokenizer there is no
/// text, no stop string and no end-of-generation token.
pub fn generate(
    session: &mut Session,
    sampler: &mut Sampler,
    tokenizer: Option<&Tokenizer>,
    req: &Request,
    mut on_piece: impl FnMut(Piece) -> bool,
) -> Result<GenerationStats, ModelError> {
    let (mut generation, logits) = Generation::start(session, tokenizer, req)?;
    let mut logits = logits.to_vec();
    while let Some(next) = generation.step(sampler, &logits, &mut on_piece)? {
        let bytes0 = session.expert_bytes_used();
        logits.clear();
        logits.extend_from_slice(session.forward(&[next], false)?);
        generation.evaluated(session.expert_bytes_used() - bytes0);
    }
    Ok(generation.finish())
}

/// One generation, step by step, for callers that evaluate its tokens themselves (moed decodes
/// several sequences together with [`Session::forward_batch`]): [`start`](Self::start)
/// evaluates the prompt; then each [`step`](Self::step) samples a token from the logits of the
/// last one evaluated and hands out its text, and returns the token to evaluate next, until the
/// generation ends. [`generate`] is this loop for one sequence.
pub struct Generation<'t> {
    tokenizer: Option<&'t Tokenizer>,
    max_tokens: usize,
    ignore_eos: bool,
    top_logprobs: Option<usize>,
    detok: Option<Detokenizer<'t>>,
    stops: StopMatcher,
    /// The prompt and the tokens generated so far (the repetition penalty's window).
    history: Vec<u32>,
    grammar: Option<Grammar>,
    stats: GenerationStats,
    /// When decoding started.
    decoding: Instant,
    ended: bool,
}

impl<'t> Generation<'t> {
    /// Checks `req` against `session` and evaluates the prompt's ids the session does not hold
    /// yet; returns the generation and the logits of the prompt's last id. With `max_tokens` 0
    /// nothing is evaluated, the logits are empty and the generation is over.
    pub fn start<'s>(
        session: &'s mut Session,
        tokenizer: Option<&'t Tokenizer>,
        req: &Request,
    ) -> Result<(Self, &'s [f32]), ModelError> {
        let mut g = Self {
            tokenizer,
            max_tokens: req.max_tokens,
            ignore_eos: req.ignore_eos,
            top_logprobs: req.top_logprobs,
            detok: None,
            stops: StopMatcher::new(if tokenizer.is_some() { req.stop } else { &[] }),
            history: Vec::new(),
            grammar: None,
            stats: GenerationStats {
                prompt_tokens: req.prompt.len(),
                cached_tokens: req.cached,
                ..Default::default()
            },
            decoding: Instant::now(),
            ended: req.max_tokens == 0,
        };
        if g.ended {
            return Ok((g, &[]));
        }
        if req.cached >= req.prompt.len() || session.position() != req.cached {
            return Err(ModelError::Input(format!(
                "{} of the prompt's {} ids are said to be cached, and the session holds {}: at \
                 most all but the last may be",
                req.cached,
                req.prompt.len(),
                session.position()
            )));
        }
        // The prompt's last ids give the first new word its context (its leading space).
        let context = &req.prompt[req.prompt.len().saturating_sub(DETOKENIZER_CONTEXT)..];
        g.detok = tokenizer.map(|t| Detokenizer::after(t, req.skip_special, context));
        g.history.reserve(req.prompt.len() + req.max_tokens);
        g.history.extend_from_slice(req.prompt);

        let bytes0 = session.expert_bytes_used();
        let t0 = Instant::now();
        // A recurrent state cannot go back: a snapshot before the prompt's last id lets a later
        // request with the same prompt (a regenerated reply) continue from there.
        let rest = &req.prompt[req.cached..];
        if session.has_recurrent_state() && rest.len() > 1 {
            session.forward(&rest[..rest.len() - 1], false)?;
            session.snapshot();
        }
        let last = if session.position() > req.cached {
            &rest[rest.len() - 1..]
        } else {
            rest
        };
        session.forward(last, false)?;
        g.stats.prompt_time = t0.elapsed();
        g.stats.prompt_expert_bytes = session.expert_bytes_used() - bytes0;
        g.grammar = req.constraint.map(|c| Grammar {
            state: c.start(),
            masked: Vec::new(),
        });
        g.decoding = Instant::now();
        // The session's logits, borrowed again now that the prompt's figures are taken.
        let logits = session.last_logits();
        Ok((g, logits))
    }

    /// Samples the next token from `logits` (those of the last token evaluated) and calls
    /// `on_piece` with it and its text (false: stop, cancellation). Returns the token, which
    /// the caller evaluates and then passes its logits to the next call (see
    /// [`evaluated`](Self::evaluated)), or None once the generation has ended (end of
    /// generation, stop string, `max_tokens`, cancelled); the held-back text has then been
    /// handed out.
    pub fn step(
        &mut self,
        sampler: &mut Sampler,
        logits: &[f32],
        mut on_piece: impl FnMut(Piece) -> bool,
    ) -> Result<Option<u32>, ModelError> {
        if self.ended {
            return Ok(None);
        }
        let mut next = sampler.sample(logits, &self.history);
        if let Some(g) = &mut self.grammar {
            match g.check(next, logits, &self.history, sampler, self.ignore_eos) {
                Ok(Some(allowed)) => next = allowed,
                Ok(None) => return Ok(self.end(StopReason::EndOfGeneration, on_piece)),
                Err(e) => return Err(ModelError::Grammar(e.to_string())),
            }
        }
        if !self.ignore_eos && self.tokenizer.is_some_and(|t| t.is_end_of_generation(next)) {
            return Ok(self.end(StopReason::EndOfGeneration, on_piece));
        }
        self.history.push(next);
        self.stats.generated_tokens += 1;
        let text = self
            .detok
            .as_mut()
            .map(|d| d.push(next))
            .unwrap_or_default();
        let (text, stopped) = self.stops.push(&text);
        let logprobs = self.top_logprobs.map(|n| Logprobs::of(logits, next, n));
        if !on_piece(Piece {
            id: Some(next),
            text: &text,
            logprobs: logprobs.as_ref(),
        }) {
            return Ok(self.end(StopReason::Cancelled, on_piece));
        }
        if stopped {
            return Ok(self.end(StopReason::StopString, on_piece));
        }
        if self.stats.generated_tokens == self.max_tokens {
            return Ok(self.end(StopReason::Length, on_piece));
        }
        Ok(Some(next))
    }

    /// The token the last [`step`](Self::step) returned was evaluated; its share of the routed
    /// expert bytes the evaluation used (all of them alone; part of a batch's).
    pub fn evaluated(&mut self, expert_bytes: u64) {
        self.stats.decode_steps += 1;
        self.stats.decode_expert_bytes += expert_bytes;
    }

    /// Whether the generation has ended.
    pub fn is_over(&self) -> bool {
        self.ended
    }

    /// The tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.history[self.history.len() - self.stats.generated_tokens..]
    }

    /// The figures, once over (or so far).
    pub fn finish(self) -> GenerationStats {
        self.stats
    }

    /// Ends the generation: a finished one hands out the text held back (a cancellation while
    /// doing so is still a cancellation).
    fn end(
        &mut self,
        mut reason: StopReason,
        mut on_piece: impl FnMut(Piece) -> bool,
    ) -> Option<u32> {
        if matches!(reason, StopReason::Length | StopReason::EndOfGeneration) {
            let held = self.detok.as_mut().map(|d| d.finish()).unwrap_or_default();
            let rest = self.stops.finish(&held);
            if !rest.is_empty()
                && !on_piece(Piece {
                    id: None,
                    text: &rest,
                    logprobs: None,
                })
            {
                reason = StopReason::Cancelled;
            }
        }
        self.stats.stop = reason;
        self.stats.generation_time = self.decoding.elapsed();
        self.ended = true;
        None
    }
}

/// A generation's grammar and the logits buffer its rejections mask.
struct Grammar {
    state: ConstraintState,
    masked: Vec<f32>,
}

impl Grammar {
    /// The token to take instead of `sampled` (itself when the grammar allows it), or None when
    /// the grammar ends here. Logits (and so log-probabilities) stay the model's.
    fn check(
        &mut self,
        sampled: u32,
        logits: &[f32],
        history: &[u32],
        sampler: &mut Sampler,
        ignore_eos: bool,
    ) -> Result<Option<u32>, GrammarError> {
        let s = &mut self.state;
        if s.is_finished()? {
            return Ok(None);
        }
        let end = s.is_end_of_generation(sampled);
        let mut next = sampled;
        if (end && ignore_eos) || !s.allows(sampled)? {
            self.masked.clear();
            self.masked.extend_from_slice(logits);
            if s.mask(&mut self.masked, !ignore_eos)? == 0 {
                // Only an end was allowed, and `ignore_eos` took it away: the grammar is done.
                if ignore_eos && s.is_accepting()? {
                    return Ok(None);
                }
                return Err(GrammarError::Decoding(
                    "the grammar allows no token of the vocabulary here".into(),
                ));
            }
            next = sampler.sample(&self.masked, history);
            // Rounding in the sampler's draw may land on a masked token: take the best allowed.
            if self.masked.get(next as usize) == Some(&f32::NEG_INFINITY) {
                next = crate::sampling::argmax_logits(&self.masked);
            }
        }
        if s.is_end_of_generation(next) {
            return Ok(None);
        }
        s.accept(next)?;
        Ok(Some(next))
    }
}

/// Finds stop sequences in generated text, holding back any tail that could begin one.
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds `text`; returns what can be emitted and whether a stop sequence was reached (the
    /// sequence and anything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.pending.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.pending), true);
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let len = self.pending.len();
        let keep = (1..longest.min(len + 1))
            .rev()
            .find(|&k| {
                self.pending.is_char_boundary(len - k)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.starts_with(&self.pending[len - k..]))
            })
            .unwrap_or(0);
        let rest = self.pending.split_off(len - keep);
        (std::mem::replace(&mut self.pending, rest), false)
    }

    /// Adds the final `text` and releases everything held back.
    pub fn finish(&mut self, text: &str) -> String {
        let (mut out, stopped) = self.push(text);
        if !stopped {
            out.push_str(&std::mem::take(&mut self.pending));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn logprobs_are_log_softmax_with_the_best_alternatives() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&v| (v as f64).exp()).sum();
        let lp = |i: usize| (logits[i] as f64 - z.ln()) as f32;
        let l = super::Logprobs::of(&logits, 4, 3);
        assert!((l.logprob - lp(4)).abs() < 1e-6);
        // Ties keep the lower id first; the chosen token need not be among the best.
        let ids: Vec<u32> = l.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, [1, 3, 0]);
        for &(i, v) in &l.top {
            assert!((v - lp(i as usize)).abs() < 1e-6);
        }
        assert!(super::Logprobs::of(&logits, 0, 0).top.is_empty());
    }

    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (t, stop) = m.push(p);
            out += &t;
            if stop {
                return (out, true);
            }
        }
        out += &m.finish("");
        (out, false)
    }

    #[test]
    fn stop_sequences_across_pieces() {
        assert_eq!(run(&[], &["ab", "c"]), ("abc".into(), false));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&["END"], &["xE", "N", "D", "y"]), ("x".into(), true));
        // A held-back partial match that does not complete is released.
        assert_eq!(run(&["END"], &["xE", "Nq"]), ("xENq".into(), false));
        assert_eq!(run(&["END"], &["xEN"]), ("xEN".into(), false));
        // The earliest of several sequences wins.
        assert_eq!(run(&["b", "a"], &["xab"]), ("x".into(), true));
        // Multi-byte text is cut on character boundaries.
        assert_eq!(run(&["é!"], &["aé", "é", "!"]), ("aé".into(), true));
        let stops = vec!["zz".to_string()];
        let mut m = StopMatcher::new(&stops);
        let (t, _) = m.push("héz");
        assert_eq!(t, "hé");
        assert_eq!(m.finish("é"), "zé");
    }
}
