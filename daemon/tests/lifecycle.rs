//! The daemon's life: loading (503, then ready; systemd notification), clients that hang up,
//! SIGTERM/SIGINT, the socket file (mode, stale files, live daemons), refused flags.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::{Duration, Instant};

use common::{collect_stream, connect, metric, Daemon};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

#[test]
fn health_is_503_while_loading_then_ready_and_systemd_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let socket = dir.path().join("moed.sock");
    let mut d = Daemon::spawn_env(
        dir,
        socket.clone(),
        &["--test-load-delay-ms", "1500"],
        &[("NOTIFY_SOCKET", &notify_path)],
    );
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = d.request("GET", "/health", None);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "loading");
    let r = d.request("POST", "/v1/completions", Some(r#"{"prompt": "x"}"#));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "loading");
    assert!(r.header("retry-after").is_some());
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(d.request("GET", "/health", None).status, 200);
    d.signal(Signal::SIGINT);
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!socket.exists());
}

/// Generated tokens so far, from /metrics.
fn generated(d: &Daemon) -> f64 {
    metric(&d.metrics(), "moed_generated_tokens_total")
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "condition not reached in {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_client_that_hangs_up_cancels_its_generation_within_a_token() {
    // 40 ms per token: a generation of 300 tokens would take 12 s.
    let d = Daemon::start(&["--test-token-delay-ms", "40"]);
    let body = json!({"prompt": "a", "max_tokens": 240, "ignore_eos": true, "stream": true});
    let (head, mut sse) = d.stream("/v1/completions", &body);
    assert_eq!(head.status, 200);
    for _ in 0..3 {
        let e = sse.next_data().unwrap();
        eprintln!("event: {e}");
    }
    let at_hangup = generated(&d);
    assert_eq!(at_hangup, 0.0, "counted when the generation ends");
    let t0 = Instant::now();
    drop(sse);
    wait_until(Duration::from_secs(5), || {
        metric(&d.metrics(), "moed_requests_cancelled_total") == 1.0
    });
    let took = t0.elapsed();
    eprintln!(
        "stream hang-up: {} tokens generated in all, cancelled {took:?} after",
        generated(&d)
    );
    // Three tokens were read; at most the one being generated at the hang-up and the next
    // (whose delivery fails) follow.
    let n = generated(&d);
    assert!((3.0..=6.0).contains(&n), "{n} tokens generated");
    assert!(
        took < Duration::from_millis(400),
        "cancellation took {took:?}"
    );
    assert!(
        d.log().contains("status=\"cancelled\"") || d.log().contains("status=cancelled"),
        "{}",
        d.log()
    );

    // Non-streamed: hanging up while it generates cancels it too.
    let mut c = connect(&d.socket).unwrap();
    let body = json!({"prompt": "a", "max_tokens": 240, "ignore_eos": true}).to_string();
    common::write_request(&mut c, "POST", "/v1/completions", Some(body.as_bytes())).unwrap();
    wait_until(Duration::from_secs(5), || {
        d.request("GET", "/health", None).json()["generating"] == true
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(c);
    wait_until(Duration::from_secs(5), || {
        metric(&d.metrics(), "moed_requests_cancelled_total") == 2.0
    });
    let n2 = generated(&d) - n;
    eprintln!("non-streamed hang-up after ~200 ms (5 tokens' time): {n2} tokens generated");
    assert!(
        n2 <= 10.0,
        "{n2} tokens generated for a client that left after ~5"
    );
    // The model is free again.
    let (s, v) = d.post("/v1/completions", &json!({"prompt": "b", "max_tokens": 2}));
    assert_eq!(s, 200, "{v}");
}

#[test]
fn sigterm_cuts_a_long_stream_cleanly_refuses_the_queue_and_removes_the_socket() {
    let mut d = Daemon::start(&["--test-token-delay-ms", "20", "--shutdown-timeout", "1"]);
    let long = json!({"prompt": "a", "max_tokens": 240, "ignore_eos": true, "stream": true});
    let (_, mut running) = d.stream("/v1/completions", &long);
    running.next_data().unwrap();
    // A second stream waits in the queue.
    let (queued_tx, queued_rx) = std::sync::mpsc::channel();
    let sock = d.socket.clone();
    std::thread::spawn(move || {
        let s = connect(&sock).unwrap();
        let (head, mut sse) = common::open_stream(
            s,
            "/v1/completions",
            &json!({"prompt": "b", "max_tokens": 5, "stream": true}),
        );
        let body = if head.status == 200 {
            sse.all().join("\n")
        } else {
            String::new()
        };
        queued_tx
            .send((
                head.status,
                head.header("retry-after").map(str::to_string),
                body,
            ))
            .unwrap();
    });
    wait_until(Duration::from_secs(5), || {
        metric(&d.metrics(), "moed_queue_depth") == 1.0
    });

    let t0 = Instant::now();
    d.signal(Signal::SIGTERM);
    // The queued request is refused at once...
    let (status, retry, _) = queued_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(status, 503);
    assert!(retry.is_some());
    // ...no new connections are taken...
    wait_until(Duration::from_secs(2), || connect(&d.socket).is_err());
    // ...and the running stream is cut after --shutdown-timeout with an error event and [DONE].
    let events = running.all();
    let took = t0.elapsed();
    eprintln!(
        "SIGTERM: stream cut after {took:?} with {} events",
        events.len()
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["error"]["code"], "shutting_down", "{events:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!d.socket.exists(), "the socket file must be removed");
}

#[test]
fn sigterm_lets_a_short_stream_finish() {
    let mut d = Daemon::start(&["--test-token-delay-ms", "20", "--shutdown-timeout", "5"]);
    let body = json!({"prompt": "a", "max_tokens": 30, "ignore_eos": true, "stream": true});
    let (_, mut sse) = d.stream("/v1/completions", &body);
    sse.next_data().unwrap();
    d.signal(Signal::SIGTERM);
    let mut events = vec![];
    events.extend(sse.all());
    let (_, finish, _) = collect_stream(&events, false);
    assert_eq!(finish, "length");
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!d.socket.exists());
}

#[test]
fn socket_mode_stale_files_and_live_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/moed.sock");
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::fs::set_permissions(
        dir.path().join("run"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    // A stale socket, as a crashed daemon leaves it: bound, then abandoned.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let d = Daemon::spawn_at(
        dir,
        socket.clone(),
        &["--socket-group", "0", "--socket-mode", "660"],
    );
    d.wait_ready(Duration::from_secs(30));
    assert!(d.log().contains("replacing a stale socket"), "{}", d.log());
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);

    // A second daemon on the same path fails clearly and leaves the first one alone.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moed"))
        .arg("-m")
        .arg(common::model_path())
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another process is serving"), "{err}");
    assert_eq!(d.request("GET", "/health", None).status, 200);

    // A directory someone else may write is refused.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moed"))
        .arg("-m")
        .arg(common::model_path())
        .arg("--socket")
        .arg(open.path().join("s.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by every user"));
}

#[test]
fn bad_budgets_and_unloadable_models_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_moed"))
            .args(args)
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .output()
            .unwrap()
    };
    let model = common::model_path().to_str().unwrap();
    let out = run(&["-m", model, "--mem-budget", "lots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
    // A budget too small for one token's experts is refused with the figures.
    let out = run(&["-m", model, "--mem-budget", "1M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too small"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A file that is not a model: the daemon exits non-zero and removes its socket.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let out = run(&["-m", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a GGUF file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("s.sock").exists());
}

#[test]
fn connections_beyond_the_limit_get_503_and_idle_ones_are_closed() {
    let d = Daemon::start(&["--max-connections", "2", "--header-timeout", "0.5"]);
    // Two keep-alive connections that have each finished a request sit idle.
    let idle: Vec<_> = (0..2)
        .map(|_| {
            let mut c = connect(&d.socket).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut r = std::io::BufReader::new(c);
            assert_eq!(common::read_response(&mut r).unwrap().status, 200);
            r
        })
        .collect();
    let r = common::try_request(&d.socket, "GET", "/health", None).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    // Idle keep-alive connections are closed after --header-timeout, without a 408.
    for mut r in idle {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    wait_until(Duration::from_secs(2), || {
        common::try_request(&d.socket, "GET", "/health", None).is_ok_and(|r| r.status == 200)
    });
}
