//! The worker's slots (`--parallel`): admitting a queued job (its prompt evaluated with its
//! conversation swapped into the session, its first token sampled), one decode step of every
//! running generation together, and answering each as it ends, as the one-at-a-time worker did.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use moe_runtime::engine::{Generation, GenerationStats, Logprobs, Piece, Request, StopReason};
use moe_runtime::model::{SavedSequence, Session};
use moe_runtime::sampling::Sampler;
use moe_runtime::tokenizer::Tokenizer;
use tracing::{info, warn};

use crate::api::{ApiError, Timings, TokenLogprob, Usage};
use crate::jobs::{draining, shutting_down, Control, Event, Finish, Job};
use crate::metrics::{GenerationFigures, Metrics, ProcessStats};
use crate::model_file::ModelFile;
use crate::prompt_cache::{Conversation, PromptCache};

pub(crate) struct Worker<'s, 'm, 'a> {
    /// Holds no sequence between requests: every one is in `prompt_cache` or a slot.
    session: Session<'m, 'a>,
    tokenizer: &'s Tokenizer,
    metrics: &'s Metrics,
    control: &'s Control,
    token_delay: Duration,
    prompt_cache: PromptCache,
    model_file: Option<ModelFile>,
    /// `--parallel`.
    slots: usize,
    /// The generations running, in the order they were admitted.
    active: Vec<Slot<'s>>,
}

/// A running generation: its job, its conversation (sequence) and where it is.
struct Slot<'t> {
    job: Job,
    conv: Conversation,
    generation: Generation<'t>,
    sampler: Sampler,
    /// The token to evaluate at the next step.
    next: u32,
    /// Shutdown cut it.
    cut: bool,
    /// Ended by the last step (its generation's stop reason says how), or failed.
    over: Option<Result<(), String>>,
    queue_wait: Duration,
    /// The process's I/O when it started (process-wide: overlapping generations share them).
    io0: ProcessStats,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Length,
    /// End-of-generation token or stop sequence.
    Stop,
    /// The client went away.
    Cancelled,
    /// Cut by shutdown.
    Cut,
}

impl<'s, 'm, 'a> Worker<'s, 'm, 'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        session: Session<'m, 'a>,
        tokenizer: &'s Tokenizer,
        metrics: &'s Metrics,
        control: &'s Control,
        token_delay: Duration,
        prompt_cache: PromptCache,
        model_file: Option<ModelFile>,
        slots: usize,
    ) -> Self {
        Self {
            session,
            tokenizer,
            metrics,
            control,
            token_delay,
            prompt_cache,
            model_file,
            slots,
            active: Vec::with_capacity(slots),
        }
    }

    /// Whether another job can be admitted.
    pub(crate) fn has_free_slot(&self) -> bool {
        self.active.len() < self.slots
    }

    /// Whether nothing is running.
    pub(crate) fn is_idle(&self) -> bool {
        self.active.is_empty()
    }

    /// Takes a job into a free slot: evaluates its prompt (its conversation swapped into the
    /// session for that) and samples its first token; a job that ends there is answered at
    /// once, others decode with the batch from the next step.
    pub(crate) fn admit(&mut self, job: Job) {
        let queue_wait = job.enqueued.elapsed();
        if job.abandoned.load(Relaxed) {
            return;
        }
        if job.events.is_closed() {
            self.metrics.cancelled.fetch_add(1, Relaxed);
            info!(id = %job.id, endpoint = job.endpoint.name(), status = "cancelled",
                  queue_ms = ms(queue_wait), "client left before its turn");
            return;
        }
        if self.control.cut.load(Relaxed) {
            let _ = job.events.try_send(Event::Failed(draining()));
            return;
        }
        if let Err(e) = self.check_model_file() {
            self.fail_on_changed_file(&job, e);
            return;
        }
        let _ = job.events.try_send(Event::Started);
        let io0 = ProcessStats::read();
        let req = &job.req;
        let (mut conv, cached) = self
            .prompt_cache
            .take(&mut self.session, &req.prompt)
            .expect("a sequence for every slot");
        let request = Request {
            prompt: &req.prompt,
            cached,
            max_tokens: req.max_tokens,
            stop: &req.stop,
            ignore_eos: req.ignore_eos,
            skip_special: !req.keep_special,
            top_logprobs: req.top_logprobs,
            constraint: req.constraint.as_ref(),
        };
        let mut sampler = Sampler::new(req.sampler.clone());
        let mut cut = false;
        let first = Generation::start(&mut self.session, Some(self.tokenizer), &request).and_then(
            |(mut generation, logits)| {
                let on_piece = piece_sender(&job, self.control, self.tokenizer, &mut cut);
                let next = generation.step(&mut sampler, logits, on_piece)?;
                Ok((generation, next))
            },
        );
        // The conversation leaves the session for its slot.
        self.session.swap_sequence(&mut conv.seq);
        let (generation, next) = match first {
            Ok(g) => g,
            Err(e) => {
                self.prompt_cache.give_back_forgotten(conv);
                self.prompt_cache.forget_all();
                failed(&job, &e.to_string());
                return;
            }
        };
        if next.is_some() {
            self.pace();
        }
        self.active.push(Slot {
            job,
            conv,
            generation,
            sampler,
            next: next.unwrap_or(0),
            cut,
            over: next.is_none().then_some(Ok(())),
            queue_wait,
            io0,
        });
        self.metrics
            .generating
            .store(self.active.len() as u64, Relaxed);
        self.retire();
    }

    /// One decode step: every running generation's next token evaluated together, then each
    /// samples the token after it from its row of the logits.
    pub(crate) fn step(&mut self) {
        let bytes0 = self.session.expert_bytes_used();
        let mut batch: Vec<(&mut SavedSequence, &[u32])> = self
            .active
            .iter_mut()
            .map(|s| (&mut s.conv.seq, std::slice::from_ref(&s.next)))
            .collect();
        let evaluated = self.session.forward_batch(&mut batch).map(|_| ());
        drop(batch);
        if let Err(e) = evaluated {
            // The batch's experts and state were shared: every generation in it fails.
            for slot in &mut self.active {
                slot.over = Some(Err(e.to_string()));
            }
            self.retire();
            return;
        }
        // The batch's expert bytes, shared out (the first takes the remainder).
        let bytes = self.session.expert_bytes_used() - bytes0;
        let logits = self.session.last_logits();
        let n_vocab = logits.len() / self.active.len();
        let share = bytes / self.active.len() as u64;
        let mut rest = bytes - share * self.active.len() as u64;
        let (control, tokenizer) = (self.control, self.tokenizer);
        for (slot, row) in self.active.iter_mut().zip(logits.chunks_exact(n_vocab)) {
            slot.generation.evaluated(share + std::mem::take(&mut rest));
            let on_piece = piece_sender(&slot.job, control, tokenizer, &mut slot.cut);
            match slot.generation.step(&mut slot.sampler, row, on_piece) {
                Ok(Some(next)) => slot.next = next,
                Ok(None) => slot.over = Some(Ok(())),
                Err(e) => slot.over = Some(Err(e.to_string())),
            }
        }
        if self.active.iter().any(|s| s.over.is_none()) {
            self.pace();
        }
        self.retire();
    }

    /// The test hook's pace: a pause after every token (one per step, whatever the batch).
    fn pace(&self) {
        if !self.token_delay.is_zero() {
            std::thread::sleep(self.token_delay);
        }
    }

    /// Answers and frees the slots whose generation is over.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].over.is_some() {
                let slot = self.active.remove(i);
                self.finish(slot);
            } else {
                i += 1;
            }
        }
        self.metrics
            .generating
            .store(self.active.len() as u64, Relaxed);
    }

    fn finish(&mut self, slot: Slot<'s>) {
        let Slot {
            job,
            conv,
            generation,
            cut,
            over,
            queue_wait,
            io0,
            ..
        } = slot;
        let io1 = ProcessStats::read();
        let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        let read_kib = delta(io0.storage_read_bytes, io1.storage_read_bytes).map(|b| b / 1024);
        let major_faults = delta(io0.major_faults, io1.major_faults);
        // A generation during which the file changed used weights that were not the model's.
        if let Err(e) = self.check_model_file() {
            warn!(id = %job.id, endpoint = job.endpoint.name(), status = 500, "{}", e.message);
            self.prompt_cache.give_back_forgotten(conv);
            self.prompt_cache.forget_all();
            self.fail_on_changed_file(&job, e);
            return;
        }
        if let Some(Err(e)) = over {
            self.prompt_cache.give_back_forgotten(conv);
            self.prompt_cache.forget_all();
            failed(&job, &e);
            return;
        }
        let generated = generation.generated().to_vec();
        self.prompt_cache
            .give_back(conv, &job.req.prompt, &generated);
        let stats = generation.finish();
        let end = match stats.stop {
            StopReason::Length => End::Length,
            StopReason::EndOfGeneration | StopReason::StopString => End::Stop,
            StopReason::Cancelled if cut => End::Cut,
            StopReason::Cancelled => End::Cancelled,
        };
        let g = figures(&stats, matches!(end, End::Length | End::Stop));
        self.metrics.generation(&g);
        let status = match end {
            End::Cancelled => {
                self.metrics.cancelled.fetch_add(1, Relaxed);
                "cancelled"
            }
            End::Cut => {
                let _ = job.events.try_send(Event::Failed(shutting_down()));
                "cut"
            }
            End::Stop | End::Length => {
                let reason = if end == End::Stop { "stop" } else { "length" };
                let _ = job.events.try_send(Event::Done(Finish {
                    reason,
                    usage: Usage {
                        prompt_tokens: g.prompt_tokens,
                        completion_tokens: g.generated_tokens,
                        cached_tokens: g.cached_tokens,
                    },
                    timings: Timings {
                        prompt_ms: ms(g.prompt_time),
                        predicted_ms: ms(g.generation_time),
                    },
                }));
                reason
            }
        };
        let tps = if g.generation_time.is_zero() {
            0.0
        } else {
            g.generated_tokens as f64 / g.generation_time.as_secs_f64()
        };
        info!(
            id = %job.id,
            endpoint = job.endpoint.name(),
            status,
            prompt_tokens = g.prompt_tokens,
            completion_tokens = g.generated_tokens,
            queue_ms = ms(queue_wait),
            prompt_ms = ms(g.prompt_time),
            gen_ms = ms(g.generation_time),
            tok_per_s = (tps * 10.0).round() / 10.0,
            expert_kib_per_tok = g.expert_bytes_per_token.map(|b| (b / 102.4).round() / 10.0),
            storage_read_kib = read_kib,
            major_faults,
            "generation"
        );
    }

    /// Whether the mapped model file is still the one loaded; if not, the error for the request
    /// at hand (see `model_file`).
    fn check_model_file(&self) -> Result<(), ApiError> {
        let Some(Err(why)) = self.model_file.as_ref().map(ModelFile::check) else {
            return Ok(());
        };
        Err(
            ApiError::status(hyper::StatusCode::INTERNAL_SERVER_ERROR, why)
                .with_code("model_file_changed"),
        )
    }

    /// Answers `job` with the changed-file error, then tells the daemon to stop. In that order:
    /// the stop makes the HTTP side answer jobs still waiting with 503, and this job's 500 must
    /// already be in its channel by then.
    fn fail_on_changed_file(&self, job: &Job, e: ApiError) {
        let why = e.message.clone();
        let _ = job.events.try_send(Event::Failed(e));
        self.control.raise_fatal(&why);
    }
}

/// What a generation hands its client: each piece of text as it becomes final (with its
/// log-probabilities), checking after every token whether the client is still there, the model
/// file intact and the shutdown grace not over (false stops the generation; `cut` says it was
/// the shutdown).
fn piece_sender<'a>(
    job: &'a Job,
    control: &'a Control,
    tokenizer: &'a Tokenizer,
    cut: &'a mut bool,
) -> impl FnMut(Piece) -> bool + 'a {
    move |piece: Piece| {
        let logprobs: Vec<TokenLogprob> = match (piece.id, piece.logprobs) {
            (Some(id), Some(l)) => vec![token_logprob(tokenizer, id, l)],
            _ => Vec::new(),
        };
        let sent = (piece.text.is_empty() && logprobs.is_empty())
            || job
                .events
                .try_send(Event::Text(piece.text.to_string(), logprobs))
                .is_ok();
        if !sent || job.events.is_closed() || ModelFile::faulted() {
            return false;
        }
        *cut = control.cut.load(Relaxed);
        !*cut
    }
}

/// A request whose generation failed: 500 with the runtime's error.
fn failed(job: &Job, e: &str) {
    warn!(id = %job.id, endpoint = job.endpoint.name(), status = 500, "generation failed: {e}");
    let _ = job.events.try_send(Event::Failed(ApiError::status(
        hyper::StatusCode::INTERNAL_SERVER_ERROR,
        format!("generation failed: {e}"),
    )));
}

/// A generation's figures for the metrics and the log; per decoded token only when it finished.
fn figures(stats: &GenerationStats, finished: bool) -> GenerationFigures {
    GenerationFigures {
        prompt_tokens: stats.prompt_tokens,
        cached_tokens: stats.cached_tokens,
        generated_tokens: stats.generated_tokens,
        prompt_time: stats.prompt_time,
        generation_time: stats.generation_time,
        expert_bytes: stats.prompt_expert_bytes + stats.decode_expert_bytes,
        expert_bytes_per_token: (finished && stats.decode_steps > 0)
            .then(|| stats.decode_expert_bytes as f64 / stats.decode_steps as f64),
    }
}

/// A generated token's log-probability with the token spelled out as OpenAI reports it.
fn token_logprob(tok: &Tokenizer, id: u32, l: &Logprobs) -> TokenLogprob {
    let spell = |id: u32| {
        let bytes = tok.token_bytes(id).unwrap_or_default();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (token, bytes) = spell(id);
    TokenLogprob {
        token,
        bytes,
        logprob: l.logprob,
        top: l
            .top
            .iter()
            .map(|&(t, lp)| {
                let (s, b) = spell(t);
                (s, b, lp)
            })
            .collect(),
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}
