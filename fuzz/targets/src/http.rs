//! `http`: arbitrary bytes sent to moed's real connection handler (`server::connection`: hyper's
//! HTTP/1.1 parser with moed's head timeout, body limits, routing, `parse_body`, `validate`,
//! prompt tokenizing and chat templating with the bundled model's tokenizer and template,
//! queueing, JSON and server-sent-event responses) over a UNIX socket pair, in-process.
//!
//! What stands in: the generation worker, which here answers every job at once with a short
//! text (the forward pass is not what this target is about), and the clock, which is tokio's
//! paused test clock so that timeouts (a head that never ends, a body that never arrives) fire
//! as soon as everything else is idle instead of after seconds.
//!
//! Properties: no panic anywhere (tasks included), every answer is a well-formed HTTP/1.1
//! status line, and none is a 500 (an internal error is a bug; bad input is a 4xx).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Once, OnceLock};
use std::time::Duration;

use moe_daemon::api::{Timings, Usage};
use moe_daemon::chat::ChatTemplate;
use moe_daemon::http::App;
use moe_daemon::metrics::Metrics;
use moe_daemon::worker::{Event, Finish, Job, Loaded};
use moe_runtime::gguf::GgufFile;
use moe_runtime::tokenizer::Tokenizer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// As moed's defaults (`--header-timeout`), but on the paused clock.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: u64 = 64 * 1024;
const QUEUE: usize = 2;

struct Harness {
    rt: tokio::runtime::Runtime,
    app: Arc<App>,
    shutdown: watch::Receiver<bool>,
    _shutdown_tx: watch::Sender<bool>,
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// The bundled model's tokenizer and chat template, as moed's worker builds them.
pub fn loaded() -> Loaded {
    let path = crate::repo_root().join("models/small-moe/small-moe-q8_0.gguf");
    let file = GgufFile::open(&path).expect("the bundled model opens");
    let h = file.header();
    let tokenizer = Tokenizer::from_gguf(h).expect("the bundled model's tokenizer");
    let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
    let source = h
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .unwrap_or(moe_daemon::chat::CHATML);
    let chat = ChatTemplate::new(source, text(tokenizer.bos()), text(tokenizer.eos()))
        .map_err(|e| e.to_string());
    let n_vocab = tokenizer.vocab_size();
    Loaded {
        tokenizer: Arc::new(tokenizer),
        chat,
        n_ctx: 256,
        n_vocab,
        arch: "qwen3moe".into(),
        reply: moe_daemon::reply::ReplySyntax::of_template(source),
        grammar_vocab: Default::default(),
    }
}

/// Answers each job at once: started, one piece of text, done.
async fn fake_worker(mut jobs: mpsc::Receiver<Job>, metrics: Arc<Metrics>) {
    while let Some(job) = jobs.recv().await {
        metrics.queue_depth.fetch_sub(1, SeqCst);
        let n = job.req.prompt.len();
        let _ = job.events.send(Event::Started).await;
        let _ = job
            .events
            .send(Event::Text(format!("{n} prompt tokens"), Vec::new()))
            .await;
        let usage = Usage {
            prompt_tokens: n,
            completion_tokens: 1,
            ..Default::default()
        };
        let finish = Finish {
            reason: "length",
            usage,
            timings: Timings::default(),
        };
        let _ = job.events.send(Event::Done(finish)).await;
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // Writing to a connection the server closed must be an error, not SIGPIPE: a Rust
        // program ignores SIGPIPE from its start-up code, which libFuzzer's main does not run.
        // SAFETY: setting a signal's disposition to ignore has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // A panic in a task is caught by tokio; count it so that the input fails.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, SeqCst);
            prev(info)
        }));
    });
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .max_blocking_threads(2)
            .build()
            .expect("runtime");
        let metrics = Arc::new(Metrics::new(QUEUE as u32));
        let (tx, rx) = mpsc::channel(QUEUE);
        let (shutdown_tx, shutdown) = watch::channel(false);
        let app = Arc::new(App::new(
            "small-moe".into(),
            MAX_BODY,
            HEADER_TIMEOUT,
            metrics.clone(),
            tx,
            shutdown.clone(),
        ));
        if app.ready.set(loaded()).is_err() {
            unreachable!("set once");
        }
        rt.spawn(fake_worker(rx, metrics));
        Harness {
            rt,
            app,
            shutdown,
            _shutdown_tx: shutdown_tx,
        }
    })
}

/// The status codes of the responses in `raw` (each `HTTP/1.1 NNN` at a line start, or
/// `HTTP/1.0 NNN`: hyper answers an HTTP/1.0 request in HTTP/1.0; fuzz/regressions/http).
pub fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    let mut out = Vec::new();
    for (i, _) in text.match_indices("HTTP/1.") {
        if i != 0 && !text[..i].ends_with('\n') {
            continue;
        }
        if !matches!(text[i + 7..].get(..2), Some("0 " | "1 ")) {
            continue;
        }
        let code = text[i + 9..].get(..3).and_then(|c| c.parse().ok());
        out.push(code.unwrap_or(0));
    }
    out
}

pub fn run(data: &[u8]) {
    let h = harness();
    let panics = PANICS.load(SeqCst);
    let response = h.rt.block_on(async {
        let (client, server) = UnixStream::pair().expect("socket pair");
        let conn = tokio::spawn(moe_daemon::server::connection(
            server,
            h.app.clone(),
            HEADER_TIMEOUT,
            h.shutdown.clone(),
        ));
        let (mut rd, mut wr) = client.into_split();
        let write = async {
            // The server may close before reading everything (a 413, a bad head).
            let _ = wr.write_all(data).await;
        };
        let read = async {
            let mut buf = Vec::new();
            let _ = rd.read_to_end(&mut buf).await;
            buf
        };
        let ((), buf) = tokio::join!(write, read);
        conn.await
            .expect("the connection task ends without panicking");
        drop(wr);
        buf
    });
    assert_eq!(PANICS.load(SeqCst), panics, "a task panicked");
    let codes = statuses(&response);
    if !data.is_empty() {
        assert!(
            !codes.is_empty() || response.is_empty(),
            "an answer without a status line: {:?}",
            String::from_utf8_lossy(&response[..response.len().min(200)])
        );
    }
    for c in &codes {
        assert!(
            (200..600).contains(c) && *c != 500,
            "status {c} in {:?}",
            String::from_utf8_lossy(&response[..response.len().min(2000)])
        );
    }
}
