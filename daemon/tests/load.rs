//! Load test: 16 concurrent clients send 200 requests in total (completions and chat, streamed
//! and not, one in ten hanging up early) to the real daemon, generating one at a time and four
//! together (`--parallel 4`). Every request must either complete
//! with exactly the text the same request gave when run alone, or be refused with 503 and
//! Retry-After; none may hang; the daemon's live heap (`moed_heap_bytes`, counted by its
//! allocator) must come back to where it was; the daemon must answer afterwards. Prints
//! requests/s, latency percentiles, rejections and memory.
//!
//! Why the heap and not the resident set size: RSS also counts mapped model pages and, under
//! qemu-user (the aarch64 suite), the emulator's translated-code cache, which grows as new code
//! runs: there the same daemon's RSS grows by megabytes over the run without any leak. The live
//! heap is the same figure natively and under emulation. RSS is still printed.
//!
//! Knobs (environment): MOED_LOAD_CLIENTS (16), MOED_LOAD_REQUESTS (200),
//! MOED_LOAD_MAX_QUEUE (8), MOED_LOAD_TOKEN_DELAY_MS (2; a per-token sleep that makes the random-weight fixture about as
//! slow as a small model on a board, so the queue fills), MOED_TEST_MODEL (another GGUF file).
//! `scripts/check/moed-loadtest.sh` runs it with the figures shown.

mod common;

use std::io::{BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{connect, metric, Daemon};
use serde_json::{json, Value};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone)]
struct Case {
    path: &'static str,
    body: Value,
    chat: bool,
    want: String,
}

enum Outcome {
    Completed(Duration),
    Rejected(Duration),
    HungUp,
    Failed(String),
}

fn text_of(v: &Value, chat: bool) -> String {
    let c = &v["choices"][0];
    if chat {
        &c["message"]["content"]
    } else {
        &c["text"]
    }
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// One request of the mix: every other one streamed; one in ten hangs up early (half of them
/// while streaming, half while waiting for a whole response).
fn nth(socket: &std::path::Path, case: &Case, i: usize) -> Outcome {
    one(
        socket,
        case,
        i.is_multiple_of(2),
        i % 20 == 3 || i % 20 == 6,
    )
}

fn one(socket: &std::path::Path, case: &Case, stream: bool, hang_up: bool) -> Outcome {
    let mut body = case.body.clone();
    body["stream"] = json!(stream);
    let t0 = Instant::now();
    let mut c = match connect(socket) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    // No request may hang: 30 s is far beyond any legitimate wait here.
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let payload = body.to_string();
    if let Err(e) = common::write_request(&mut c, "POST", case.path, Some(payload.as_bytes())) {
        return Outcome::Failed(format!("write: {e}"));
    }
    if hang_up && !stream {
        std::thread::sleep(Duration::from_millis(15));
        return Outcome::HungUp;
    }
    let mut r = BufReader::new(c);
    let head = match common::read_head(&mut r) {
        Ok(h) => h,
        Err(e) => return Outcome::Failed(format!("reading the response head: {e}")),
    };
    if head.status == 503 {
        let rest = common::read_response_body(&mut r, &head);
        let ok = head.header("retry-after").is_some()
            && serde_json::from_slice::<Value>(&rest)
                .is_ok_and(|v| v["error"]["code"] == "queue_full");
        return if ok {
            Outcome::Rejected(t0.elapsed())
        } else {
            Outcome::Failed(format!("bad 503: {}", String::from_utf8_lossy(&rest)))
        };
    }
    if head.status != 200 {
        let rest = common::read_response_body(&mut r, &head);
        return Outcome::Failed(format!(
            "status {}: {}",
            head.status,
            String::from_utf8_lossy(&rest)
        ));
    }
    if stream {
        let mut sse = common::SseReader::new(r);
        if hang_up {
            let _ = sse.next_data();
            return Outcome::HungUp;
        }
        let events = sse.all();
        if events.last().map(String::as_str) != Some("[DONE]") {
            return Outcome::Failed(format!("stream without [DONE]: {events:?}"));
        }
        let (text, _, _) = common::collect_stream(&events, case.chat);
        if text != case.want {
            return Outcome::Failed(format!("stream text {text:?} != {:?}", case.want));
        }
    } else {
        let rest = common::read_response_body(&mut r, &head);
        let v: Value = match serde_json::from_slice(&rest) {
            Ok(v) => v,
            Err(e) => return Outcome::Failed(format!("bad JSON ({e})")),
        };
        let text = text_of(&v, case.chat);
        if text != case.want {
            return Outcome::Failed(format!("text {text:?} != {:?}", case.want));
        }
    }
    Outcome::Completed(t0.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

/// The daemon's live heap bytes, from /metrics.
fn heap(socket: &std::path::Path) -> u64 {
    let mut s = connect(socket).unwrap();
    common::write_request(&mut s, "GET", "/metrics", None).unwrap();
    s.flush().unwrap();
    let mut r = BufReader::new(s);
    let head = common::read_response(&mut r).unwrap();
    let text = String::from_utf8_lossy(&head.body).into_owned();
    let v = metric(&text, "moed_heap_bytes");
    assert!(v > 0.0, "moed_heap_bytes is missing from /metrics");
    v as u64
}

#[test]
fn sixteen_clients_two_hundred_requests() {
    load_test(1);
}

/// The same with four generations decoding together: every answer is still the one the request
/// gave alone, and the heap comes back to where it was.
#[test]
fn sixteen_clients_two_hundred_requests_parallel_4() {
    load_test(4);
}

fn load_test(parallel: usize) {
    let clients = knob("MOED_LOAD_CLIENTS", 16);
    let total = knob("MOED_LOAD_REQUESTS", 200);
    let delay = knob("MOED_LOAD_TOKEN_DELAY_MS", 2).to_string();
    let max_queue = knob("MOED_LOAD_MAX_QUEUE", 8).to_string();
    let d = Daemon::start(&[
        "--max-queue",
        &max_queue,
        "--test-token-delay-ms",
        &delay,
        "--parallel",
        &parallel.to_string(),
    ]);
    let socket = d.socket.clone();

    // The mix, with each case's text when run alone (fixed seeds make it reproducible).
    let prompts = [
        "Once upon a time",
        "The quick brown fox",
        "Hello",
        "In a small village",
    ];
    let mut cases = Vec::new();
    for (k, p) in prompts.iter().enumerate() {
        for chat in [false, true] {
            let mut body = json!({"max_tokens": 8 + 6 * k, "seed": 100 + k, "temperature": 0.8});
            if chat {
                body["messages"] = json!([{"role": "user", "content": p}]);
            } else {
                body["prompt"] = json!(p);
            }
            let path = if chat {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            let (s, v) = d.post(path, &body);
            assert_eq!(s, 200, "{v}");
            cases.push(Case {
                path,
                body,
                chat,
                want: text_of(&v, chat),
            });
        }
    }
    // Warm up the allocator with a few rounds of the mix before taking the baseline, as many
    // at once as decode together.
    let warm: Vec<_> = (0..parallel)
        .map(|w| {
            let (cases, socket) = (cases.clone(), socket.clone());
            std::thread::spawn(move || {
                for (i, c) in cases.iter().cycle().skip(w).take(24).enumerate() {
                    match one(&socket, c, i % 2 == 0, false) {
                        Outcome::Completed(_) => {}
                        Outcome::Failed(e) => panic!("warm-up request {i}: {e}"),
                        _ => panic!("warm-up request {i} was refused"),
                    }
                }
            })
        })
        .collect();
    for w in warm {
        w.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let rss_before = d.rss();
    let heap_before = heap(&socket);

    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let peak = Arc::new(AtomicU64::new(rss_before));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, running, pid) = (peak.clone(), running.clone(), d.pid());
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut heaps = Vec::new();
            while running.load(Relaxed) {
                heaps.push(heap(&socket));
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kb) = s
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    {
                        peak.fetch_max(kb * 1024, Relaxed);
                        samples.push(kb * 1024);
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            (samples, heaps)
        })
    };
    let t0 = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (next, results, cases, socket) =
                (next.clone(), results.clone(), cases.clone(), socket.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= total {
                    break;
                }
                let out = nth(&socket, &cases[i % cases.len()], i);
                if matches!(out, Outcome::Rejected(_)) {
                    // Retry-After says 1 s; a shorter pause keeps the test short.
                    std::thread::sleep(Duration::from_millis(100));
                }
                results.lock().unwrap().push((i, out));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = t0.elapsed();
    running.store(false, Relaxed);
    let (samples, heaps) = sampler.join().unwrap();

    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results.len(), total);
    let mut done = Vec::new();
    let mut rejected = Vec::new();
    let mut hung_up = 0;
    let mut failures = Vec::new();
    for (i, r) in results {
        match r {
            Outcome::Completed(t) => done.push(t),
            Outcome::Rejected(t) => rejected.push(t),
            Outcome::HungUp => hung_up += 1,
            Outcome::Failed(e) => failures.push(format!("request {i}: {e}")),
        }
    }
    done.sort();
    // Let the daemon notice the last hang-ups, then take the final figures.
    let t_idle = Instant::now();
    while metric(&d.metrics(), "moed_generating") != 0.0
        || metric(&d.metrics(), "moed_queue_depth") != 0.0
    {
        assert!(
            t_idle.elapsed() < Duration::from_secs(10),
            "the daemon did not go idle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let rss_after = d.rss();
    let heap_after = heap(&socket);
    let text = d.metrics();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mid = samples
        .get(samples.len() / 2)
        .copied()
        .unwrap_or(rss_before);
    println!("load test: {clients} clients, {total} requests, --parallel {parallel}, --max-queue {max_queue}, token delay {delay} ms");
    println!(
        "  completed {} | rejected 503 {} | hung up early {} | failed {}",
        done.len(),
        rejected.len(),
        hung_up,
        failures.len()
    );
    println!(
        "  wall {:.2} s | completed {:.1} req/s | latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | 503 p50 {:.1} ms",
        elapsed.as_secs_f64(),
        done.len() as f64 / elapsed.as_secs_f64(),
        percentile(&done, 0.5).as_secs_f64() * 1e3,
        percentile(&done, 0.99).as_secs_f64() * 1e3,
        done.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        percentile(&{ let mut r = rejected.clone(); r.sort(); r }, 0.5).as_secs_f64() * 1e3,
    );
    println!(
        "  daemon: generated {} tokens, cancelled {}, queue rejections {}",
        metric(&text, "moed_generated_tokens_total"),
        metric(&text, "moed_requests_cancelled_total"),
        metric(&text, "moed_queue_rejections_total"),
    );
    let heap_mid = heaps.get(heaps.len() / 2).copied().unwrap_or(heap_before);
    println!(
        "  heap (moed_heap_bytes): before {:.2} MiB | mid-run {:.2} MiB | peak {:.2} MiB | after {:.2} MiB",
        mib(heap_before),
        mib(heap_mid),
        mib(heaps.iter().copied().max().unwrap_or(heap_before)),
        mib(heap_after)
    );
    println!(
        "  RSS (not asserted): before {:.1} MiB | mid-run {:.1} MiB | peak {:.1} MiB | after {:.1} MiB",
        mib(rss_before),
        mib(mid),
        mib(peak.load(Relaxed)),
        mib(rss_after)
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(done.len() + rejected.len() + hung_up, total);
    assert!(!done.is_empty());
    assert!(hung_up >= total / 20);
    // The daemon refused what the clients saw refused, plus any of the clients that hung up
    // before reading their answer.
    let refused = metric(&text, "moed_queue_rejections_total") as usize;
    assert!((rejected.len()..=rejected.len() + hung_up).contains(&refused));
    // Memory does not grow: once idle again, the heap holds what it held before the run (the
    // model, KV cache and prompt cache were all allocated by then), within a small slack for
    // the runtime's own bookkeeping (tokio's slabs, metric label maps).
    assert!(
        heap_after <= heap_before + (512 << 10),
        "the heap grew: {:.2} MiB before, {:.2} mid-run, {:.2} after",
        mib(heap_before),
        mib(heap_mid),
        mib(heap_after)
    );
    // Still answering, with the same text as before the run.
    let c = &cases[0];
    let (s, v) = d.post(c.path, &c.body);
    assert_eq!(s, 200);
    assert_eq!(text_of(&v, c.chat), c.want);
    let mut h = connect(&socket).unwrap();
    common::write_request(&mut h, "GET", "/health", None).unwrap();
    h.flush().unwrap();
    assert_eq!(
        common::read_response(&mut BufReader::new(h))
            .unwrap()
            .status,
        200
    );
}
