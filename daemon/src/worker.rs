//! The generation worker: one thread that loads the model, keeps it (and its KV caches) for the
//! daemon's lifetime, and serves queued jobs in up to `--parallel` slots: each admitted job's
//! prompt is evaluated on its own (one at a time), then every slot's next token is decoded
//! together in one batch per step ([`Session::forward_batch`]: an expert the batch shares is
//! read once). The model's `Session` borrows the mapped file, so it never leaves this thread;
//! HTTP tasks talk to it through bounded channels: jobs in (`--max-queue`), events out (one per
//! token at most, sized to the job).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use moe_runtime::engine::{
    Engine, EngineError, Generation, GenerationStats, Logprobs, Piece, Request, SessionOptions,
    StopReason,
};
use moe_runtime::grammar::{Constraint, GrammarVocab};
use moe_runtime::model::{SavedSequence, Session};
use moe_runtime::moe::cache::CacheError;
use moe_runtime::sampling::{Sampler, SamplerConfig};
use moe_runtime::tokenizer::Tokenizer;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::api::{ApiError, Endpoint, Timings, TokenLogprob, Usage};
use crate::chat::ChatTemplate;
use crate::metrics::{GenerationFigures, Metrics, ModelInfo, ProcessStats};
use crate::model_file::ModelFile;
use crate::prompt_cache::{Conversation, PromptCache};
use crate::reply::ReplySyntax;

/// What the worker needs to know to load the model.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub model: PathBuf,
    pub model_id: String,
    /// Threads, context, KV type, expert streaming, board profile.
    pub session: SessionOptions,
    /// Conversations kept for prompt-prefix reuse (0: none).
    pub prompt_cache: usize,
    /// Requests generated at once (`--parallel`), each in its own slot and sequence.
    pub parallel: usize,
    /// `--chat-template FILE`: its path and text, instead of the model's template.
    pub chat_template: Option<(PathBuf, String)>,
    pub warmup: bool,
    pub token_delay: Duration,
    pub load_delay: Duration,
}

/// Handed to the HTTP side once the model is ready.
pub struct Loaded {
    pub tokenizer: Arc<Tokenizer>,
    /// The compiled chat template, or why there is none.
    pub chat: Result<ChatTemplate, String>,
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub arch: String,
    /// How the chat template's model marks reasoning and tool calls in its replies.
    pub reply: ReplySyntax,
    /// The vocabulary prepared for grammars, built by the first request with one.
    pub grammar_vocab: OnceLock<Result<Arc<GrammarVocab>, String>>,
}

impl Loaded {
    /// The vocabulary prepared for grammars. Building it walks every token once (up to seconds
    /// for large vocabularies on a small board), so it waits for the first request that needs
    /// it; requests arriving meanwhile wait for the same build.
    pub fn grammar_vocab(&self) -> Result<&Arc<GrammarVocab>, String> {
        self.grammar_vocab
            .get_or_init(|| {
                info!("preparing the vocabulary for grammars (first constrained request)");
                let t0 = Instant::now();
                let vocab = GrammarVocab::new(&self.tokenizer, self.n_vocab);
                match &vocab {
                    Ok(_) => info!(ms = ms(t0.elapsed()), "grammar vocabulary ready"),
                    Err(e) => warn!("grammars are unavailable: {e}"),
                }
                vocab.map(Arc::new).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Flags the HTTP side raises for the worker, and the worker's call to stop the daemon.
#[derive(Default)]
pub struct Control {
    /// Shutdown grace is over: stop the running generation at the next token.
    pub cut: AtomicBool,
    /// Why the daemon must stop (the model file changed under it), once the worker finds out.
    pub fatal: Mutex<Option<String>>,
    /// Raised with `fatal`.
    pub fatal_raised: tokio::sync::Notify,
}

impl Control {
    fn raise_fatal(&self, why: &str) {
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why.to_string());
            self.fatal_raised.notify_one();
        }
    }
}

/// A generation to run.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Keep special tokens in the text (the reply parser reads markers some models write as
    /// special tokens, such as Harmony's channels).
    pub keep_special: bool,
    /// Report log-probabilities with this many alternatives.
    pub top_logprobs: Option<usize>,
    /// The grammar the output must match, compiled for this request.
    pub constraint: Option<Constraint>,
}

pub struct Job {
    pub id: String,
    pub endpoint: Endpoint,
    pub req: GenRequest,
    pub events: mpsc::Sender<Event>,
    pub enqueued: Instant,
    /// Set by the HTTP side when it answered the request itself (shutdown while queued), so
    /// the worker neither runs nor logs it.
    pub abandoned: Arc<AtomicBool>,
}

#[derive(Debug)]
pub enum Event {
    /// The job left the queue and the prompt is being evaluated.
    Started,
    /// Text that became final (stop sequences already removed), and the log-probabilities of
    /// the tokens generated since the last event when they were asked for.
    Text(String, Vec<TokenLogprob>),
    Done(Finish),
    Failed(ApiError),
}

#[derive(Debug, Clone)]
pub struct Finish {
    /// OpenAI's `finish_reason`: `stop` or `length`.
    pub reason: &'static str,
    pub usage: Usage,
    pub timings: Timings,
}

/// Capacity of a job's event channel: one event per token plus the fixed ones, so the worker
/// never waits on a slow reader.
pub fn event_capacity(max_tokens: usize) -> usize {
    max_tokens + 4
}

/// Starts the worker thread. It reports the loaded model (or the load error) on `loaded`, then
/// serves `jobs` until every sender is gone; `exited` closes when the thread ends.
pub fn spawn(
    cfg: WorkerConfig,
    jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    loaded: oneshot::Sender<Result<Loaded, String>>,
    exited: oneshot::Sender<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("moed-worker".into())
        .spawn(move || {
            // Dropped when this thread ends, which tells the server the worker has stopped.
            let _exited = exited;
            let t0 = Instant::now();
            std::thread::sleep(cfg.load_delay);
            let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", cfg.model.display());
            let engine = match Engine::open(&cfg.model, cfg.session.clone()) {
                Ok(e) => e,
                Err(e) => {
                    let _ = loaded.send(Err(format!("{e}")));
                    return;
                }
            };
            let model = match engine.load_model() {
                Ok(m) => m,
                Err(e) => {
                    let _ = loaded.send(Err(format!("{e}")));
                    return;
                }
            };
            let tokenizer = match engine.tokenizer() {
                Ok(t) => Arc::new(t),
                Err(e) => {
                    let _ = loaded.send(Err(format!(
                        "{}; moed serves text and needs the model's tokenizer",
                        fail(&e)
                    )));
                    return;
                }
            };
            let hp = &model.hp;
            let n_ctx = engine.context_length(&model);
            if n_ctx > hp.n_ctx_train {
                warn!(
                    n_ctx,
                    n_ctx_train = hp.n_ctx_train,
                    "--ctx is larger than the model's training context; quality may suffer"
                );
            }
            let mut session = match engine.session_with_ctx(&model, n_ctx) {
                Ok(s) => s,
                Err(e) => {
                    // Every sequence's KV cache is part of the resident memory the budget must
                    // hold: say which flags ask for them.
                    let sequences = cfg.prompt_cache.max(cfg.parallel).max(1);
                    let hint = match &e {
                        EngineError::Cache(CacheError::Budget(_)) if sequences > 1 => format!(
                            " (that counts {sequences} KV caches, one per sequence of \
                             max(--parallel {}, --prompt-cache {}): lower those or --ctx)",
                            cfg.parallel, cfg.prompt_cache
                        ),
                        _ => String::new(),
                    };
                    let _ = loaded.send(Err(fail(&format!("{e:#}{hint}"))));
                    return;
                }
            };
            info!("{}", engine.startup_line(&session));
            if let Some(cache) = session.expert_cache_handle() {
                let _ = metrics.expert_cache.set(cache);
            }
            if cfg.warmup {
                // One forward pass maps the dense weights and some experts, and sizes the
                // session's scratch buffers, before the first client waits on them.
                let tok = tokenizer.bos().unwrap_or(0);
                if let Err(e) = session.forward(&[tok], false) {
                    warn!("warm-up forward pass failed: {e}");
                }
                session.reset();
            }
            let token_text = |id: Option<u32>| {
                id.and_then(|id| tokenizer.token_text(id))
                    .unwrap_or_default()
            };
            let file = engine.file();
            // The template: --chat-template, else the model's, else ChatML as the llama.cpp
            // server does for a file without one.
            let (source, origin) = match (&cfg.chat_template, file.header().get("tokenizer.chat_template").and_then(|v| v.as_str())) {
                (Some((path, src)), _) => (src.as_str(), format!("{}", path.display())),
                (None, Some(src)) => (src, "the model's chat template".to_string()),
                (None, None) => {
                    warn!("the model file has no tokenizer.chat_template: chat uses ChatML (pass --chat-template FILE for another)");
                    (crate::chat::CHATML, "ChatML".to_string())
                }
            };
            let chat = ChatTemplate::new(
                source,
                token_text(tokenizer.bos()),
                token_text(tokenizer.eos()),
            )
            .map_err(|e| format!("{origin} does not compile: {e:#}"));
            if let Err(e) = &chat {
                warn!("chat completions unavailable: {e}");
            }
            let reply = ReplySyntax::of_template(source);
            if !reply.is_plain() {
                info!(reasoning = ?reply.reasoning.map(|(open, _)| open), tools = ?reply.tools,
                      "chat replies are parsed for reasoning and tool calls");
            }
            // Every sequence lives in the prompt cache between requests (the session's own
            // first), at most max(--prompt-cache, --parallel) of them.
            let kv_bytes = session.kv_bytes();
            let recurrent_bytes = session.recurrent_bytes();
            let slots = cfg.parallel.max(1);
            let prompt_cache = PromptCache::new(cfg.prompt_cache, slots, &mut session);
            let info = ModelInfo {
                id: cfg.model_id.clone(),
                n_ctx,
                file_bytes: file.bytes().len() as u64,
                kv_bytes,
                recurrent_bytes,
                load_seconds: t0.elapsed().as_secs_f64(),
            };
            info!(
                model = %cfg.model.display(),
                id = %info.id,
                arch = ?hp.arch,
                n_ctx,
                n_expert = hp.n_expert,
                n_expert_used = hp.n_expert_used,
                kv_mib = info.kv_bytes as f64 / (1 << 20) as f64,
                recurrent_kib = info.recurrent_bytes as f64 / 1024.0,
                parallel = slots,
                sequences = prompt_cache.limit(),
                load_s = info.load_seconds,
                "model loaded"
            );
            let _ = metrics.model.set(info);
            let model_file = match ModelFile::watch(&cfg.model, file.bytes()) {
                Ok(m) => Some(m),
                Err(e) => {
                    warn!("cannot watch the model file for changes: {e}");
                    None
                }
            };
            let ready = Loaded {
                tokenizer: tokenizer.clone(),
                chat,
                n_ctx,
                n_vocab: hp.n_vocab,
                arch: format!("{:?}", hp.arch),
                reply,
                grammar_vocab: OnceLock::new(),
            };
            if loaded.send(Ok(ready)).is_err() {
                return;
            }
            let mut w = Worker {
                session,
                tokenizer: &tokenizer,
                metrics: &metrics,
                control: &control,
                token_delay: cfg.token_delay,
                prompt_cache,
                model_file,
                slots,
                active: Vec::with_capacity(slots),
            };
            let mut jobs = jobs;
            let mut open = true;
            loop {
                // Admit queued jobs while a slot is free (waiting for one when nothing runs),
                // then decode one token of every running generation.
                while open && w.active.len() < w.slots {
                    let job = if w.active.is_empty() {
                        jobs.blocking_recv()
                    } else {
                        match jobs.try_recv() {
                            Ok(job) => Some(job),
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => None,
                        }
                    };
                    let Some(job) = job else {
                        open = false;
                        break;
                    };
                    metrics.queue_depth.fetch_sub(1, Relaxed);
                    w.admit(job);
                }
                if w.active.is_empty() {
                    if open {
                        continue;
                    }
                    break;
                }
                w.step();
            }
        })
}

struct Worker<'s, 'm, 'a> {
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

impl<'s> Worker<'s, '_, '_> {
    /// Takes a job into a free slot: evaluates its prompt (its conversation swapped into the
    /// session for that) and samples its first token; a job that ends there is answered at
    /// once, others decode with the batch from the next step.
    fn admit(&mut self, job: Job) {
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
            let _ = job.events.try_send(Event::Failed(e));
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
    fn step(&mut self) {
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
            let _ = job.events.try_send(Event::Failed(e));
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
    /// at hand, and the daemon is told to stop (see `model_file`).
    fn check_model_file(&self) -> Result<(), ApiError> {
        let Some(Err(why)) = self.model_file.as_ref().map(ModelFile::check) else {
            return Ok(());
        };
        self.control.raise_fatal(&why);
        Err(
            ApiError::status(hyper::StatusCode::INTERNAL_SERVER_ERROR, why)
                .with_code("model_file_changed"),
        )
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

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// A generation cut short by shutdown.
pub fn shutting_down() -> ApiError {
    ApiError::unavailable(
        "the server is shutting down; the generation was interrupted",
        "shutting_down",
        5,
    )
}

/// A request refused (or dropped from the queue) because the server is shutting down.
pub fn draining() -> ApiError {
    ApiError::unavailable("the server is shutting down", "shutting_down", 5)
}

/// A job's events ended without its result (the worker is gone).
pub fn gone() -> ApiError {
    ApiError::status(
        hyper::StatusCode::INTERNAL_SERVER_ERROR,
        "the generation ended without a result",
    )
}

/// Incremental detokenizer (the scheme of Hugging Face's text-generation-inference): decodes a
/// window of recent ids so the cost per token stays flat, and holds back text ending in an
/// incomplete UTF-8 character.
pub struct Detokenizer<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'t> Detokenizer<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, true).unwrap_or_default()
    }

    /// Adds one id; returns the text that became complete.
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        self.emit(false)
    }

    /// Whatever is still held back (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self) -> String {
        self.emit(true)
    }

    fn emit(&mut self, last: bool) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let before = self.decode(&self.ids[self.prefix..self.read]);
        let now = self.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && (last || !now.ends_with('\u{FFFD}')) {
            if let Some(new) = now.get(before.len()..) {
                let new = new.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                return new;
            }
        }
        String::new()
    }
}
