//! Faults under a running daemon: the model file truncated, rewritten in place or replaced while
//! moed has it mapped, and expert reads failing or slow (the flash emulator's injected faults).

mod common;

use std::time::{Duration, Instant};

use common::{metric, model_id, model_path, Daemon};
use serde_json::json;

/// moed on a copy of the fixture model (so that the test may damage it), with a slow token pace
/// so that a generation is still running when the file changes.
fn on_copy(args: &[&str]) -> (Daemon, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(model_path(), &model).unwrap();
    let socket = dir.path().join("run/moed.sock");
    let mut all = vec!["--alias", "m", "--prompt-cache", "0"];
    all.extend_from_slice(args);
    let d = Daemon::spawn_model(dir, socket, &model.clone(), &all, &[]);
    d.wait_ready(Duration::from_secs(60));
    (d, model)
}

fn body(max_tokens: usize, stream: bool) -> serde_json::Value {
    json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.0,
           "stream": stream, "ignore_eos": true})
}

/// Truncated mid-generation: the mapped pages vanish (SIGBUS without moed's handler). The
/// stream in progress ends with a `model_file_changed` error and `[DONE]`, and moed stops with
/// status 1 and the reason, for its service manager to restart it on the file as it now is.
#[test]
fn truncated_model_file_fails_the_request_and_stops_the_daemon() {
    let (mut d, model) = on_copy(&["--test-token-delay-ms", "40"]);
    let (head, mut events) = d.stream("/v1/completions", &body(200, true));
    assert_eq!(head.status, 200);
    events.next_data().expect("a first token");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    f.set_len(4096).unwrap();
    drop(f);
    let rest = events.all();
    let last_two: Vec<&str> = rest.iter().rev().take(2).map(String::as_str).collect();
    assert_eq!(last_two.first().copied(), Some("[DONE]"), "{rest:?}");
    let err = last_two.get(1).copied().unwrap_or_default();
    assert!(err.contains("model_file_changed"), "{err}\n{}", d.log());
    assert!(err.contains("truncated"), "{err}");
    assert!(rest.len() < 200, "the generation stopped early");
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(1), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("was truncated while moed had it mapped"),
        "{log}"
    );
}

/// Rewritten in place (same inode, new contents) between requests: the next request is refused
/// with 500 `model_file_changed` and moed stops with status 1.
#[test]
fn model_file_rewritten_in_place_is_refused_and_stops_the_daemon() {
    let (mut d, model) = on_copy(&[]);
    let (s, v) = d.post("/v1/completions", &body(4, false));
    assert_eq!(s, 200, "{v}");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    bytes.push(0);
    std::fs::write(&model, &bytes).unwrap();
    let (s, v) = d.post("/v1/completions", &body(4, false));
    assert_eq!(s, 500, "{v}");
    assert_eq!(v["error"]["code"], "model_file_changed", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("modified in place"),
        "{v}"
    );
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(1), "{}", d.log());
}

/// Replaced by a rename (how moe-convert and package managers write files): the old inode stays
/// mapped, so moed keeps serving it, with the same answers, and says a restart loads the new one.
#[test]
fn model_file_replaced_by_rename_keeps_serving() {
    let (d, model) = on_copy(&[]);
    let (s, before) = d.post("/v1/completions", &body(8, false));
    assert_eq!(s, 200, "{before}");
    let new = model.with_extension("new");
    std::fs::write(&new, b"not a model").unwrap();
    std::fs::rename(&new, &model).unwrap();
    let (s, after) = d.post("/v1/completions", &body(8, false));
    assert_eq!(s, 200, "{after}");
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
    let t0 = Instant::now();
    while !d.log().contains("was replaced or removed") {
        assert!(t0.elapsed() < Duration::from_secs(5), "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.request("GET", "/health", None).status, 200);
}

/// Expert reads that fail (every 13th) or are slow (every 5th, by 20 ms), with experts
/// streamed through a small cache: a request whose read failed gets 500 naming the expert, the
/// others the same text as a daemon without faults, and the daemon keeps serving.
#[test]
fn injected_expert_read_errors_fail_only_their_requests() {
    let body = json!({"model": model_id(), "prompt": "Once upon a time", "max_tokens": 6,
                      "temperature": 0.0});
    let clean = Daemon::start(&["--mem-budget", "52M"]);
    let (s, want) = clean.post("/v1/completions", &body);
    assert_eq!(s, 200, "{want}");
    drop(clean);
    let faulty = Daemon::start(&[
        "--mem-budget",
        "52M",
        "--flash-profile",
        "nvme,fail-every=13,slow-every=5,slow-ms=20",
    ]);
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..12 {
        let (s, v) = faulty.post("/v1/completions", &body);
        match s {
            200 => {
                assert_eq!(v["choices"][0]["text"], want["choices"][0]["text"]);
                ok += 1;
            }
            500 => {
                let msg = v["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.contains("injected by the flash emulator"), "{v}");
                assert!(msg.contains("reading expert"), "{v}");
                failed += 1;
            }
            _ => panic!("{s}: {v}"),
        }
    }
    assert!(ok > 0 && failed > 0, "{ok} served, {failed} failed");
    let m = faulty.metrics();
    assert!(
        metric(&m, "moed_expert_read_errors_total") as usize >= failed,
        "{m}"
    );
    assert_eq!(faulty.request("GET", "/health", None).status, 200);
}
