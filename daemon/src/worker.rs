//! The generation worker: one thread that loads the model, keeps it (and its KV caches) for the
//! daemon's lifetime, and serves queued jobs in up to `--parallel` slots: each admitted job's
//! prompt is evaluated on its own (one at a time), then every slot's next token is decoded
//! together in one batch per step ([`Session::forward_batch`]: an expert the batch shares is
//! read once). The model's `Session` borrows the mapped file, so it never leaves this thread;
//! HTTP tasks talk to it through bounded channels: jobs in (`--max-queue`), events out (one per
//! token at most, sized to the job).

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use moe_runtime::engine::{Engine, EngineError, SessionOptions};
use moe_runtime::grammar::GrammarVocab;
use moe_runtime::moe::cache::CacheError;
use moe_runtime::tokenizer::Tokenizer;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::chat::ChatTemplate;
use crate::metrics::{Metrics, ModelInfo};
use crate::model_file::ModelFile;
use crate::prompt_cache::PromptCache;
use crate::reply::ReplySyntax;
use crate::slots::{ms, Worker};

pub use crate::jobs::{
    draining, event_capacity, gone, shutting_down, Control, Event, Finish, GenRequest, Job,
};

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
            let mut w = Worker::new(
                session,
                &tokenizer,
                &metrics,
                &control,
                cfg.token_delay,
                prompt_cache,
                model_file,
                slots,
            );
            let mut jobs = jobs;
            let mut open = true;
            loop {
                // Admit queued jobs while a slot is free (waiting for one when nothing runs),
                // then decode one token of every running generation.
                while open && w.has_free_slot() {
                    let job = if w.is_idle() {
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
                if w.is_idle() {
                    if open {
                        continue;
                    }
                    break;
                }
                w.step();
            }
        })
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
