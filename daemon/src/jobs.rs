//! What passes between the HTTP side and the generation worker: jobs, the events of their
//! generation, the control flags, and the errors either side answers with.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use moe_runtime::grammar::Constraint;
use moe_runtime::sampling::SamplerConfig;
use tokio::sync::mpsc;

use crate::api::{ApiError, Endpoint, Timings, TokenLogprob, Usage};

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
    pub(crate) fn raise_fatal(&self, why: &str) {
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
