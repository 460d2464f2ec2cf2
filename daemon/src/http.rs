//! Routing and handlers: the OpenAI endpoints, `/health`, `/metrics`, and the server-sent-event
//! body that streams a generation.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::answer::Answer;
use crate::api::{self, ApiError, Endpoint, ResponseMeta};
use crate::conn::ConnState;
use crate::metrics::Metrics;
use crate::prepare::{self, Prepared};
use crate::respond::{self, SseBody};
use crate::worker::{self, Event, GenRequest, Job, Loaded};

pub type BoxedBody = BoxBody<Bytes, Infallible>;

/// Everything the handlers share.
pub struct App {
    pub model_id: String,
    /// When the daemon started (the model's `created`).
    pub created: u64,
    pub max_body: u64,
    pub body_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Set once the worker has loaded the model.
    pub ready: OnceLock<Loaded>,
    pub queue: mpsc::Sender<Job>,
    /// Shutting down: refuse new work, /health answers 503.
    pub draining: AtomicBool,
    pub shutdown: watch::Receiver<bool>,
    next_id: AtomicU64,
}

impl App {
    pub fn new(
        model_id: String,
        max_body: u64,
        body_timeout: Duration,
        metrics: Arc<Metrics>,
        queue: mpsc::Sender<Job>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            model_id,
            created: unix_now(),
            max_body,
            body_timeout,
            metrics,
            ready: OnceLock::new(),
            queue,
            draining: AtomicBool::new(false),
            shutdown,
            next_id: AtomicU64::new(1),
        }
    }

    fn loaded(&self) -> Result<&Loaded, ApiError> {
        if self.draining.load(Relaxed) {
            return Err(worker::draining());
        }
        self.ready.get().ok_or_else(|| {
            ApiError::unavailable("the model is still loading; retry shortly", "loading", 2)
        })
    }

    fn request_id(&self, e: Endpoint) -> String {
        let n = self.next_id.fetch_add(1, Relaxed);
        format!("{}-{:x}{:06x}", e.id_prefix(), self.created, n)
    }

    /// Queues a job, or refuses it with 503 when the queue is full.
    fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        match self.queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.metrics.queue_rejections.fetch_add(1, Relaxed);
                        let cap = self.metrics.queue_capacity.load(Relaxed);
                        Err(ApiError::unavailable(
                            format!(
                                "the server is busy: {cap} requests are already waiting \
                                 (--max-queue); retry later"
                            ),
                            "queue_full",
                            1,
                        ))
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(worker::draining()),
                }
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(1, Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn full(bytes: impl Into<Bytes>) -> BoxedBody {
    Full::new(bytes.into()).boxed()
}

pub fn json_response(status: StatusCode, v: &Value) -> Response<BoxedBody> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn error_response(e: &ApiError) -> Response<BoxedBody> {
    let mut r = json_response(e.status, &e.body());
    if let Some(secs) = e.retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// The endpoint label used in metrics and logs.
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" | "/completions" => "completions",
        "/v1/chat/completions" | "/chat/completions" => "chat_completions",
        "/health" => "health",
        "/metrics" => "metrics",
        p if p == "/v1/models" || p.starts_with("/v1/models/") => "models",
        _ => "other",
    }
}

/// Answers one request. The response body carries a guard that counts the request (status and
/// duration, streams included) and marks the connection idle again when it is done.
pub async fn serve(
    req: Request<Incoming>,
    app: Arc<App>,
    conn: Arc<ConnState>,
) -> Result<Response<Tracked>, Infallible> {
    conn.begin_request();
    let mut guard = RequestGuard {
        app: app.clone(),
        conn,
        endpoint: endpoint_label(req.uri().path()),
        method: req.method().clone(),
        path: req.uri().path().chars().take(100).collect(),
        start: Instant::now(),
        // 499 (nginx's "client closed request") unless a response is produced.
        status: 499,
        worker_logged: AtomicBool::new(false),
        error: None,
    };
    let resp = match route(req, &app, &guard.worker_logged).await {
        Ok(r) => r,
        Err(e) => {
            guard.error = Some(e.message.clone());
            error_response(&e)
        }
    };
    guard.status = resp.status().as_u16();
    Ok(resp.map(|body| Tracked {
        inner: body,
        _guard: guard,
    }))
}

async fn route(
    req: Request<Incoming>,
    app: &Arc<App>,
    worker_logged: &AtomicBool,
) -> Result<Response<BoxedBody>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/health") => Ok(health(app)),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(full(app.metrics.render()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(r)
        }
        (&Method::GET, "/v1/models") => {
            let l = app.loaded()?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": [model_object(app, l)]}),
            ))
        }
        (&Method::GET, p) if p.starts_with("/v1/models/") => {
            let l = app.loaded()?;
            let id = &p["/v1/models/".len()..];
            if id != app.model_id {
                return Err(unknown_model(id));
            }
            Ok(json_response(StatusCode::OK, &model_object(app, l)))
        }
        (&Method::POST, "/v1/completions" | "/completions") => {
            generate(req, app, Endpoint::Completions, worker_logged).await
        }
        (&Method::POST, "/v1/chat/completions" | "/chat/completions") => {
            generate(req, app, Endpoint::Chat, worker_logged).await
        }
        (_, p) => {
            let allow = match p {
                "/health" | "/metrics" | "/v1/models" => "GET",
                p if p.starts_with("/v1/models/") => "GET",
                "/v1/completions"
                | "/completions"
                | "/v1/chat/completions"
                | "/chat/completions" => "POST",
                _ => {
                    return Err(ApiError::status(
                        StatusCode::NOT_FOUND,
                        format!("no such endpoint: {method} {p}"),
                    ))
                }
            };
            let mut r = error_response(&ApiError::status(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{p} accepts {allow}, not {method}"),
            ));
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
            Ok(r)
        }
    }
}

fn health(app: &App) -> Response<BoxedBody> {
    let (status, state) = if app.draining.load(Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if app.ready.get().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    } else {
        (StatusCode::OK, "ok")
    };
    let m = &app.metrics;
    let mut r = json_response(
        status,
        &json!({
            "status": state,
            "model": app.model_id,
            "queue_depth": m.queue_depth.load(Relaxed).max(0),
            "generating": m.generating.load(Relaxed) > 0,
        }),
    );
    if status != StatusCode::OK {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("2"));
    }
    r
}

fn model_object(app: &App, l: &Loaded) -> Value {
    json!({
        "id": app.model_id,
        "object": "model",
        "created": app.created,
        "owned_by": "moe-edge",
        "meta": {"arch": l.arch, "n_ctx": l.n_ctx, "n_vocab": l.n_vocab},
    })
}

fn unknown_model(id: &str) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        format!("The model `{id}` does not exist (this server has one model; see /v1/models)"),
    )
    .with_param("model")
    .with_code("model_not_found")
}

/// Reads the whole body, bounded in size (413) and time (408).
async fn read_body(req: Request<Incoming>, app: &App) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body exceeds the {} byte limit (--max-body)",
                app.max_body
            ),
        )
        .with_code("body_too_large")
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), app.max_body as usize);
    match tokio::time::timeout(app.body_timeout, body.collect()).await {
        Err(_) => Err(ApiError::status(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                app.body_timeout.as_secs_f64()
            ),
        )
        .with_code("timeout")),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::invalid(format!(
            "could not read the request body: {e}"
        ))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn generate(
    req: Request<Incoming>,
    app: &Arc<App>,
    endpoint: Endpoint,
    worker_logged: &AtomicBool,
) -> Result<Response<BoxedBody>, ApiError> {
    // The body is read even when the answer is a refusal, so that the client, still writing,
    // gets to read the answer.
    let body = read_body(req, app).await?;
    app.loaded()?;
    let p = api::parse_body(&body)?;
    if let Some(m) = p.model.as_deref() {
        if m != app.model_id {
            return Err(unknown_model(m));
        }
    }
    let v = api::validate(&p, endpoint, random_seed())?;
    // Tokenizing, templating and compiling a grammar are CPU work: keep them off the thread
    // that moves the bytes. A grammar that does not compile is refused before queuing.
    let worker_app = app.clone();
    let valid = v.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        prepare::prepare(&p, &valid, endpoint, worker_app.loaded()?)
    })
    .await
    .map_err(|e| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let keep_special = prepared.keep_special();
    let Prepared {
        prompt,
        constraint,
        reply,
    } = prepared;
    let l = app.loaded()?;
    let (default_max, prompt_param) = match endpoint {
        // OpenAI's default for completions; chat runs to the end of the context.
        Endpoint::Completions => (Some(16), "prompt"),
        Endpoint::Chat => (None, "messages"),
    };
    let max_tokens = api::resolve_max_tokens(
        v.max_tokens,
        default_max,
        prompt.len(),
        l.n_ctx,
        prompt_param,
    )?;

    let (tx, mut rx) = mpsc::channel(worker::event_capacity(max_tokens));
    let meta = ResponseMeta {
        endpoint,
        id: app.request_id(endpoint),
        created: unix_now(),
        model: app.model_id.clone(),
    };
    let abandoned = Arc::new(AtomicBool::new(false));
    app.submit(Job {
        id: meta.id.clone(),
        endpoint,
        req: GenRequest {
            prompt,
            max_tokens,
            sampler: v.sampler.clone(),
            stop: v.stop.clone(),
            ignore_eos: v.ignore_eos,
            top_logprobs: v.top_logprobs,
            constraint,
            keep_special,
        },
        events: tx,
        enqueued: Instant::now(),
        abandoned: abandoned.clone(),
    })?;

    // Wait for the worker to take the job; a shutdown meanwhile answers 503 here.
    let mut shutdown = app.shutdown.clone();
    let first = tokio::select! {
        biased;
        ev = rx.recv() => ev,
        _ = shutdown.wait_for(|s| *s) => {
            abandoned.store(true, Relaxed);
            return Err(worker::draining());
        }
    };
    match first {
        Some(Event::Started) => worker_logged.store(true, Relaxed),
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(worker::gone()),
    }

    let answer = reply.map(|(syntax, tail)| Answer::new(&syntax, &tail, random_seed()));
    let logprobs = v.top_logprobs.is_some();
    if v.stream {
        let sse = SseBody::new(rx, meta, answer, v.include_usage, logprobs);
        let mut r = Response::new(BodyExt::boxed(sse));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(r);
    }
    let body = respond::collect(&mut rx, &meta, answer, logprobs).await?;
    Ok(json_response(StatusCode::OK, &body))
}

/// Counts a request when its response is done (or dropped because the client left).
pub struct RequestGuard {
    app: Arc<App>,
    conn: Arc<ConnState>,
    endpoint: &'static str,
    method: Method,
    path: String,
    start: Instant,
    status: u16,
    /// The worker logs generations it ran (with their figures); this logs the rest.
    worker_logged: AtomicBool,
    error: Option<String>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.app
            .metrics
            .request(self.endpoint, self.status, elapsed);
        self.conn.end_request();
        if self.worker_logged.load(Relaxed) {
            return;
        }
        let ms = (elapsed.as_secs_f64() * 1e4).round() / 10.0;
        match &self.error {
            Some(e) => {
                info!(method = %self.method, path = %self.path, status = self.status, ms, error = %e, "request")
            }
            None if self.status == 499 => {
                debug!(method = %self.method, path = %self.path, status = 499, ms, "client left")
            }
            None => {
                debug!(method = %self.method, path = %self.path, status = self.status, ms, "request")
            }
        }
    }
}

/// A response body with its request's guard attached.
pub struct Tracked {
    inner: BoxedBody,
    _guard: RequestGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
