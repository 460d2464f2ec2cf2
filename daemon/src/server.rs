//! The accept loop, per-connection handling (hyper's HTTP/1.1 with our own request-head timeout
//! that answers 408, and a connection limit that answers 503), and the shutdown sequence.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::conn::{ConnState, CountingIo};
use crate::http::{self, App};
use crate::metrics::Metrics;
use crate::socket::{sd_notify, BoundSocket};
use crate::worker::{self, Control, WorkerConfig};

/// Largest request head hyper buffers (431 beyond).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A complete response written by hand, for the two cases where hyper is not (or no longer) in
/// charge of the connection: the head timeout and the connection limit.
async fn write_raw_error(
    stream: &mut UnixStream,
    status: u16,
    reason: &str,
    e: &crate::api::ApiError,
) {
    let body = e.body().to_string();
    let retry = e
        .retry_after
        .map(|s| format!("retry-after: {s}\r\n"))
        .unwrap_or_default();
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(msg.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Reads (and drops) a request head: until its blank line, 16 KiB, or half a second.
async fn read_head_briefly(stream: &mut UnixStream) {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while seen.len() < 16 * 1024 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
}

/// Serves one accepted connection until it closes, times out or the daemon drains. Public so
/// that the fuzz harness (fuzz/targets) can drive it over a socket pair in-process.
pub async fn connection(
    stream: UnixStream,
    app: Arc<App>,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::default());
    let io = TokioIo::new(CountingIo::new(stream, state.clone()));
    let svc = {
        let (app, state) = (app.clone(), state.clone());
        service_fn(move |req| http::serve(req, app.clone(), state.clone()))
    };
    let mut conn = http1::Builder::new()
        // The head timeout is ours (below): hyper's closes without answering.
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(io, svc);
    let timeout = state.head_timeout(header_timeout);
    tokio::pin!(timeout);
    let mut draining = false;
    enum Step {
        Closed(Result<(), hyper::Error>),
        Drain,
        HeadTimeout(bool),
    }
    loop {
        let step = tokio::select! {
            r = &mut conn => Step::Closed(r),
            _ = shutdown.wait_for(|s| *s), if !draining => Step::Drain,
            owed = &mut timeout => Step::HeadTimeout(owed),
        };
        match step {
            Step::Closed(Ok(())) => break,
            Step::Closed(Err(e)) => {
                debug!("connection ended: {e}");
                break;
            }
            Step::Drain => {
                draining = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
            Step::HeadTimeout(owed) => {
                if owed {
                    let secs = header_timeout.as_secs_f64();
                    let e = crate::api::ApiError::status(
                        hyper::StatusCode::REQUEST_TIMEOUT,
                        format!("the request headers did not arrive within {secs} s"),
                    )
                    .with_code("timeout");
                    let mut stream = conn.into_parts().io.into_inner().into_inner();
                    write_raw_error(&mut stream, 408, "Request Timeout", &e).await;
                    app.metrics.request("other", 408, header_timeout);
                    info!(status = 408, timeout_s = secs, "request head timed out");
                }
                break;
            }
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT (Ok) or a fatal error such as a model that fails to
/// load (Err).
pub async fn run(cfg: Config, bound: BoundSocket) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    bound.listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(bound.listener.try_clone()?)?;

    let metrics = Arc::new(Metrics::new(cfg.max_queue));
    let control = Arc::new(Control::default());
    let (job_tx, job_rx) = mpsc::channel(cfg.max_queue as usize);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (loaded_tx, mut loaded_rx) = oneshot::channel();
    let (exited_tx, exited_rx) = oneshot::channel::<()>();
    let app = Arc::new(App::new(
        cfg.model_id(),
        cfg.max_body,
        cfg.header_timeout,
        metrics.clone(),
        job_tx,
        shutdown_rx.clone(),
    ));
    let wcfg = WorkerConfig {
        model: cfg.model.clone(),
        model_id: cfg.model_id(),
        session: cfg.session_options(),
        prompt_cache: cfg.prompt_cache as usize,
        parallel: cfg.parallel as usize,
        chat_template: cfg.chat_template_source()?,
        warmup: !cfg.no_warmup,
        token_delay: Duration::from_millis(cfg.test_token_delay_ms),
        load_delay: Duration::from_millis(cfg.test_load_delay_ms),
    };
    let (m, c) = (metrics.clone(), control.clone());
    worker::spawn(wcfg, job_rx, m, c, loaded_tx, exited_tx)?;

    let mut tasks = JoinSet::new();
    let mut loading = true;
    let max_conns = cfg.max_connections as usize;
    loop {
        tokio::select! {
            biased;
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = control.fatal_raised.notified() => { error!("stopping: the model file changed"); break; }
            res = &mut loaded_rx, if loading => {
                loading = false;
                match res {
                    Ok(Ok(l)) => {
                        let _ = app.ready.set(l);
                        sd_notify("READY=1");
                        info!("ready");
                    }
                    Ok(Err(e)) => return Err(anyhow!(e)),
                    Err(_) => return Err(anyhow!("the worker thread died while loading the model")),
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            acc = listener.accept() => match acc {
                Ok((mut stream, _)) => {
                    if tasks.len() >= max_conns {
                        let e = crate::api::ApiError::unavailable(
                            format!("too many open connections ({max_conns}, --max-connections)"),
                            "too_many_connections",
                            1,
                        );
                        metrics.request("other", 503, Duration::ZERO);
                        tokio::spawn(async move {
                            // Take the request head first, so the client is not cut off
                            // mid-write and gets to read the answer.
                            read_head_briefly(&mut stream).await;
                            write_raw_error(&mut stream, 503, "Service Unavailable", &e).await;
                        });
                        continue;
                    }
                    let (app, shutdown) = (app.clone(), shutdown_rx.clone());
                    let m = metrics.clone();
                    let timeout = cfg.header_timeout;
                    tasks.spawn(async move {
                        m.connections.fetch_add(1, Relaxed);
                        connection(stream, app, timeout, shutdown).await;
                        m.connections.fetch_sub(1, Relaxed);
                    });
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }

    // Shutdown: no new connections, the socket file goes, idle connections close, waiting
    // requests get 503, the running generation has --shutdown-timeout to finish before it is
    // cut (a stream then ends with an error event and [DONE]).
    sd_notify("STOPPING=1");
    drop(listener);
    drop(bound);
    app.draining.store(true, Relaxed);
    let _ = shutdown_tx.send(true);
    let cut_at = Instant::now() + cfg.shutdown_timeout;
    let mut cut = false;
    loop {
        tokio::select! {
            biased;
            _ = sigterm.recv() => { warn!("second signal: stopping now"); break; }
            _ = sigint.recv() => { warn!("second signal: stopping now"); break; }
            r = tasks.join_next() => if r.is_none() { break },
            _ = tokio::time::sleep_until(cut_at), if !cut => {
                cut = true;
                warn!("shutdown timeout: cutting the running generation");
                control.cut.store(true, Relaxed);
            }
            _ = tokio::time::sleep_until(cut_at + Duration::from_secs(2)), if cut => {
                warn!(connections = tasks.len(), "closing connections that did not finish");
                break;
            }
        }
    }
    tasks.abort_all();
    control.cut.store(true, Relaxed);
    drop(app); // the job queue's last sender: the worker's loop ends
    if tokio::time::timeout(Duration::from_secs(3), exited_rx)
        .await
        .is_err()
    {
        error!("the worker did not stop in time");
    }
    info!("stopped");
    let fatal = control
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match fatal {
        Some(why) => Err(anyhow!(why)),
        None => Ok(()),
    }
}
