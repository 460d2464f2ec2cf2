//! moed: the on-device daemon. The model is loaded once and kept warm (weights mapped, KV cache
//! allocated) by one worker thread; local programs talk to it over a UNIX socket in HTTP/1.1 with
//! OpenAI's API (the dialect the llama.cpp server and Ollama speak).
//!
//! Modules by concern: [`config`] (flags), [`socket`] (the socket file and systemd readiness),
//! [`server`] (accept loop, connections, timeouts, shutdown), [`conn`] (one connection's
//! request phase and bytes read), [`http`] (routing, handlers), [`prepare`] (prompt, grammar and
//! reply syntax of a request), [`respond`] (the JSON response or server-sent events),
//! [`answer`] (a chat reply's reasoning, content and tool calls in OpenAI's shape), [`reply`]
//! (each model family's reply markup, gpt-oss's Harmony included), [`api`] (OpenAI
//! request/response shapes and validation), [`chat`] (chat templates), [`worker`] (the
//! generation thread and its queue), [`model_file`] (the mapped model file changing under the
//! daemon), [`metrics`] (Prometheus), [`alloc`] (live heap bytes).

pub mod alloc;
pub mod answer;
pub mod api;
pub mod chat;
pub mod config;
pub mod conn;
pub mod http;
mod jobs;
pub mod metrics;
pub mod model_file;
pub mod prepare;
pub mod prompt_cache;
pub mod reply;
pub mod respond;
pub mod server;
mod slots;
pub mod socket;
pub mod worker;

use anyhow::{Context, Result};

pub use config::Config;

/// Runs the daemon with parsed flags until SIGTERM/SIGINT.
pub fn run(cfg: Config) -> Result<()> {
    cfg.validate()?;
    let group = cfg
        .socket_group
        .as_deref()
        .map(socket::resolve_group)
        .transpose()?;
    // Bound before the model loads, so clients see 503 "loading" rather than no socket.
    let bound = socket::bind(&cfg.socket, cfg.socket_mode, group)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("moed-io")
        // Tokenizing and chat templating run here; two at a time is plenty on a small board
        // and keeps the thread (and allocator arena) count flat under load.
        .max_blocking_threads(2)
        .build()
        .context("starting the I/O runtime")?;
    let result = rt.block_on(server::run(cfg, bound));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
