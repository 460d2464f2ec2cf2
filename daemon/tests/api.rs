//! The OpenAI API of the real daemon on a fixture model: completions and chat, streamed and not,
//! models, health, metrics, every kind of bad input, the queue limit, curl and the Python client.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::{collect_stream, connect, metric, model_id, Daemon};
use moe_runtime::gguf::GgufFile;
use moe_runtime::model::{KvType, Model, Session};
use moe_runtime::sampling::{Sampler, SamplerConfig};
use moe_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};

/// What the runtime itself generates for `prompt` (moe-run's loop and sampler).
fn reference(prompt_ids: &[u32], max: usize, cfg: SamplerConfig) -> (String, usize) {
    let file = GgufFile::open(common::model_path()).unwrap();
    let model = Model::load(&file).unwrap();
    let tok = Tokenizer::from_gguf(file.header()).unwrap();
    let mut session = Session::with_kv_type(&model, 256, KvType::F16);
    let mut sampler = Sampler::new(cfg);
    let mut ids = Vec::new();
    let request = moe_runtime::engine::Request {
        prompt: prompt_ids,
        cached: 0,
        max_tokens: max,
        stop: &[],
        ignore_eos: false,
        skip_special: true,
        top_logprobs: None,
    };
    moe_runtime::engine::generate(&mut session, &mut sampler, Some(&tok), &request, |piece| {
        ids.extend(piece.id);
        true
    })
    .unwrap();
    (tok.decode(&ids, true).unwrap(), ids.len())
}

fn encode(text: &str, special: bool) -> Vec<u32> {
    let file = GgufFile::open(common::model_path()).unwrap();
    Tokenizer::from_gguf(file.header())
        .unwrap()
        .encode(text, special)
        .unwrap()
}

#[test]
fn completions_streamed_and_not_agree_with_the_runtime() {
    let d = Daemon::start(&[]);
    let body = json!({
        "model": model_id(), "prompt": "Once upon a time", "max_tokens": 24,
        "temperature": 0.9, "top_k": 20, "top_p": 0.9, "min_p": 0.01, "seed": 42,
        "ignore_eos": false,
    });
    let (status, v) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], model_id());
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let usage = &v["usage"];
    let n = usage["completion_tokens"].as_u64().unwrap() as usize;
    assert!((1..=24).contains(&n), "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + n as u64
    );
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish, if n == 24 { "length" } else { "stop" });

    // The same request through the runtime directly: same tokens, same text.
    let ids = encode("Once upon a time", true);
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
    let cfg = SamplerConfig {
        temperature: 0.9,
        top_k: 20,
        top_p: 0.9,
        min_p: 0.01,
        seed: 42,
        ..Default::default()
    };
    let (want, want_n) = reference(&ids, 24, cfg);
    assert_eq!((text.as_str(), n), (want.as_str(), want_n));

    // Streamed with the same seed: the same text, in several chunks, ending in [DONE].
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (head, mut sse) = d.stream("/v1/completions", &sbody);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let events = sse.all();
    let (stext, sfinish, n_events) = collect_stream(&events, false);
    assert_eq!(stext, text);
    assert_eq!(sfinish, finish);
    assert!(n_events >= 3, "{events:?}");
    // include_usage: the chunk before [DONE] has no choices and the usage.
    let u: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(u["choices"], json!([]));
    for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(u["usage"][count], v["usage"][count], "{count}");
    }
    // The same prompt again: all but its last token come from the prompt cache.
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        u["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(ids.len() as u64 - 1)
    );
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["choices"][0]["finish_reason"], Value::Null);

    // Greedy, token-id prompt, stop sequence: the text is cut before the stop.
    let g = json!({"prompt": ids, "max_tokens": 16, "temperature": 0});
    let (_, v) = d.post("/v1/completions", &g);
    let greedy = v["choices"][0]["text"].as_str().unwrap().to_string();
    let (want, _) = reference(
        &ids,
        16,
        SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        },
    );
    assert_eq!(greedy, want);
    if let Some(stop) = greedy.get(3..5).filter(|s| !s.trim().is_empty()) {
        let (_, v) = d.post(
            "/v1/completions",
            &json!({"prompt": ids, "max_tokens": 16, "temperature": 0, "stop": [stop]}),
        );
        let cut = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(cut, &greedy[..greedy.find(stop).unwrap()]);
    }
}

#[test]
fn chat_streamed_and_not() {
    let d = Daemon::start(&[]);
    let body = json!({
        "model": model_id(),
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
        ],
        "max_tokens": 20, "seed": 7, "temperature": 0.7,
    });
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    // The prompt is the ChatML rendering, tokenized without added special tokens.
    let rendered = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n";
    let ids = encode(rendered, false);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        ids.len()
    );
    let (want, _) = reference(
        &ids,
        20,
        SamplerConfig {
            temperature: 0.7,
            seed: 7,
            ..Default::default()
        },
    );
    assert_eq!(text, want);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (head, mut sse) = d.stream("/v1/chat/completions", &sbody);
    assert_eq!(head.status, 200);
    let events = sse.all();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (stext, finish, _) = collect_stream(&events, true);
    assert_eq!(stext, text);
    assert_eq!(finish, v["choices"][0]["finish_reason"].as_str().unwrap());
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
}

#[test]
fn models_health_and_metrics() {
    let d = Daemon::start(&[]);
    let r = d.request("GET", "/health", None);
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("ok")));
    let m = d.request("GET", "/v1/models", None).json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], model_id());
    assert_eq!(m["data"][0]["meta"]["n_ctx"], 256);
    let one = d.request("GET", &format!("/v1/models/{}", model_id()), None);
    assert_eq!(one.status, 200);
    let none = d.request("GET", "/v1/models/gpt-4", None);
    assert_eq!(none.status, 404);
    assert_eq!(none.json()["error"]["code"], "model_not_found");

    let before = d.metrics();
    assert_eq!(metric(&before, "moed_generated_tokens_total"), 0.0);
    let mut generated = 0;
    for (i, stream) in [false, true, false].into_iter().enumerate() {
        let body = json!({"prompt": "abc", "max_tokens": 5 + i, "seed": i, "stream": stream, "ignore_eos": true});
        if stream {
            let (_, mut sse) = d.stream("/v1/completions", &body);
            sse.all();
        } else {
            let (s, v) = d.post("/v1/completions", &body);
            assert_eq!(s, 200);
            assert_eq!(v["usage"]["completion_tokens"], 5 + i);
        }
        generated += 5 + i;
    }
    let (s, _) = d.post(
        "/v1/completions",
        &json!({"prompt": "abc", "max_tokens": 0}),
    );
    assert_eq!(s, 400);
    // The guard counts a request when its response is fully written; give it a moment.
    std::thread::sleep(Duration::from_millis(100));
    let text = d.metrics();
    assert_eq!(
        metric(&text, "moed_generated_tokens_total"),
        generated as f64
    );
    assert_eq!(
        metric(
            &text,
            "moed_requests_total{endpoint=\"completions\",code=\"200\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            "moed_requests_total{endpoint=\"completions\",code=\"400\"}"
        ),
        1.0
    );
    assert!(metric(&text, "moed_prompt_tokens_total") >= 3.0);
    assert!(metric(&text, "moed_generation_tokens_per_second") > 0.0);
    assert!(metric(&text, "moed_expert_bytes_used_total") > 0.0);
    assert!(metric(&text, "moed_expert_bytes_per_token") > 0.0);
    assert_eq!(metric(&text, "moed_queue_depth"), 0.0);
    assert_eq!(metric(&text, "moed_context_size"), 256.0);
    assert!(metric(&text, "moed_request_duration_seconds_count") >= 4.0);
    assert!(metric(&text, "process_resident_memory_bytes") > 0.0);
    // One log line per generation, with its figures.
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" generation ")).collect();
    assert_eq!(lines.len(), 3, "{log}");
    for key in [
        "prompt_tokens=",
        "completion_tokens=",
        "prompt_ms=",
        "gen_ms=",
        "tok_per_s=",
        "expert_kib_per_tok=",
    ] {
        assert!(lines[0].contains(key), "{key} missing in {}", lines[0]);
    }
}

/// Asserts an OpenAI-shaped error.
fn assert_error(status: u16, v: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[test]
fn bad_inputs_get_4xx_json_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::start(&["--max-body", "16K", "--header-timeout", "0.5"]);
    let post_raw = |path: &str, body: &str| {
        let r = d.request("POST", path, Some(body));
        (r.status, r.json())
    };
    // Malformed JSON, wrong types, a body that is not an object.
    let (s, v) = post_raw("/v1/completions", "{\"prompt\": \"hi\",");
    assert_error(s, &v, 400, None);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let (s, v) = post_raw(
        "/v1/completions",
        r#"{"prompt": "hi", "max_tokens": "ten"}"#,
    );
    assert_error(s, &v, 400, Some("max_tokens"));
    let (s, v) = post_raw("/v1/completions", r#"{"prompt": 5}"#);
    assert_error(s, &v, 400, Some("prompt"));
    let (s, v) = post_raw("/v1/chat/completions", r#"{"messages": "hi"}"#);
    assert_error(s, &v, 400, Some("messages"));
    let (s, v) = post_raw(
        "/v1/completions",
        r#"{"prompt": "hi", "temperature": true}"#,
    );
    assert_error(s, &v, 400, Some("temperature"));
    let (s, v) = post_raw("/v1/completions", "[]");
    assert_error(s, &v, 400, None);
    // Missing or empty prompt/messages, bad roles.
    let (s, v) = d.post("/v1/completions", &json!({"max_tokens": 3}));
    assert_error(s, &v, 400, Some("prompt"));
    let (s, v) = d.post("/v1/chat/completions", &json!({"messages": []}));
    assert_error(s, &v, 400, Some("messages"));
    let (s, v) = d.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "wizard", "content": "x"}]}),
    );
    assert_error(s, &v, 400, Some("messages[0].role"));
    // Unknown model.
    let (s, v) = d.post(
        "/v1/completions",
        &json!({"model": "gpt-4", "prompt": "hi"}),
    );
    assert_error(s, &v, 404, Some("model"));
    assert_eq!(v["error"]["code"], "model_not_found");
    // A prompt longer than the context (256 positions).
    let long = "lorem ipsum dolor sit amet ".repeat(100);
    let (s, v) = d.post("/v1/completions", &json!({"prompt": long}));
    assert_error(s, &v, 400, Some("prompt"));
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = d.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": long}]}),
    );
    assert_error(s, &v, 400, Some("messages"));
    // max_tokens out of range, and past the context once the prompt is counted.
    for m in [0, -5, 100_000] {
        let (s, v) = d.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": m}));
        assert_error(s, &v, 400, Some("max_tokens"));
    }
    let (s, v) = d.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 256}),
    );
    assert_error(s, &v, 400, Some("max_tokens"));
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Out-of-range sampling parameters, unsupported features, token ids outside the vocabulary.
    for (body, param) in [
        (json!({"prompt": "hi", "temperature": 5}), "temperature"),
        (json!({"prompt": "hi", "top_p": -1}), "top_p"),
        (json!({"prompt": "hi", "n": 3}), "n"),
        (
            json!({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
        (json!({"prompt": [1, 2, 99999]}), "prompt"),
        (json!({"prompt": ["one", "two"]}), "prompt"),
    ] {
        let (s, v) = d.post("/v1/completions", &body);
        assert_error(s, &v, 400, Some(param));
    }
    // An oversized body: announced (Content-Length), and chunked without a length.
    let big = json!({"prompt": "x".repeat(20_000)}).to_string();
    let (s, v) = post_raw("/v1/completions", &big);
    assert_error(s, &v, 413, None);
    {
        let mut c = connect(&d.socket).unwrap();
        c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
        for _ in 0..20 {
            let chunk = "y".repeat(1024);
            if c.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
                .is_err()
            {
                break;
            }
        }
        let _ = c.write_all(b"0\r\n\r\n");
        let r = common::read_response(&mut std::io::BufReader::new(c)).unwrap();
        assert_error(r.status, &r.json(), 413, None);
    }
    // Unknown path, wrong method.
    let r = d.request("GET", "/v2/nothing", None);
    assert_error(r.status, &r.json(), 404, None);
    let r = d.request("GET", "/v1/completions", None);
    assert_error(r.status, &r.json(), 405, None);
    assert_eq!(r.header("allow"), Some("POST"));
    // Slow-loris: half a request head, then silence past --header-timeout: 408 with JSON.
    for partial in [&b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"[..], b""] {
        let mut c = connect(&d.socket).unwrap();
        c.write_all(partial).unwrap();
        let t0 = std::time::Instant::now();
        let r = common::read_response(&mut std::io::BufReader::new(c)).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_error(r.status, &r.json(), 408, None);
    }
    // A body that stops arriving: 408 too.
    {
        let mut c = connect(&d.socket).unwrap();
        c.write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"",
        )
        .unwrap();
        let r = common::read_response(&mut std::io::BufReader::new(c)).unwrap();
        assert_error(r.status, &r.json(), 408, None);
    }
    // Garbage instead of HTTP: hyper answers 400 and closes.
    {
        let mut c = connect(&d.socket).unwrap();
        c.write_all(b"\x00\x01 not http\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 400"), "{out:?}");
    }
    // Still serving.
    let (s, v) = d.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 4}));
    assert_eq!(s, 200, "{v}");
    let text = d.metrics();
    assert!(
        metric(
            &text,
            "moed_requests_total{endpoint=\"completions\",code=\"400\"}"
        ) >= 15.0
    );
    assert_eq!(
        metric(
            &text,
            "moed_requests_total{endpoint=\"other\",code=\"408\"}"
        ),
        2.0
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let d = Daemon::start(&["--max-queue", "1", "--test-token-delay-ms", "20"]);
    // A long stream occupies the model...
    let long = json!({"prompt": "a", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let (head, mut sse) = d.stream("/v1/completions", &long);
    assert_eq!(head.status, 200);
    sse.next_data().unwrap();
    // ...one request waits (in a thread)...
    let socket = d.socket.clone();
    let waiting = std::thread::spawn(move || {
        let body = json!({"prompt": "b", "max_tokens": 3}).to_string();
        common::try_request(&socket, "POST", "/v1/completions", Some(body.as_bytes())).unwrap()
    });
    let t0 = std::time::Instant::now();
    while metric(&d.metrics(), "moed_queue_depth") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...and the next is refused.
    let r = d.request(
        "POST",
        "/v1/completions",
        Some(r#"{"prompt": "c", "max_tokens": 3}"#),
    );
    assert_error(r.status, &r.json(), 503, None);
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(metric(&d.metrics(), "moed_queue_rejections_total"), 1.0);
    // Hanging up on the stream frees the model for the waiting request.
    drop(sse);
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.json()["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

#[test]
fn curl_over_the_unix_socket() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not installed");
        return;
    }
    let d = Daemon::start(&[]);
    let sock = d.socket.to_str().unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            sock,
            "http://localhost/v1/completions",
            "-d",
        ])
        .arg(r#"{"prompt": "Hello", "max_tokens": 8, "seed": 1}"#)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["object"], "text_completion");
    let out = Command::new("curl")
        .args([
            "-sSN",
            "--unix-socket",
            sock,
            "http://localhost/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(
            r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": true}"#,
        )
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            sock,
            "http://localhost/health",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

#[test]
fn official_openai_python_client() {
    let probe = Command::new("python3")
        .args(["-c", "import openai; print(openai.__version__)"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {
            eprintln!("openai {}", String::from_utf8_lossy(&o.stdout).trim())
        }
        _ => {
            eprintln!("SKIPPED: python3 with the `openai` package is needed (pip install openai)");
            return;
        }
    }
    let d = Daemon::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&d.socket)
        .arg(model_id())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\nmoed log:\n{}",
        d.log()
    );
    assert!(
        stdout.contains("openai client: all checks passed"),
        "{stdout}"
    );
}

/// With a memory budget the daemon streams experts through a cache: the same request gives the
/// same text as the resident daemon, and /metrics shows the cache at work.
#[test]
fn mem_budget_streams_experts_with_identical_output() {
    let body = json!({
        "model": model_id(), "prompt": "Once upon a time", "max_tokens": 16,
        "temperature": 0.0, "seed": 1,
    });
    let resident = Daemon::start(&[]);
    let (status, want) = resident.post("/v1/completions", &body);
    assert_eq!(status, 200, "{want}");
    drop(resident);

    let streamed = Daemon::start(&["--mem-budget", "52M", "--lookahead", "1"]);
    let (status, got) = streamed.post("/v1/completions", &body);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);
    let m = streamed.metrics();
    assert!(metric(&m, "moed_expert_cache_slots") >= 2.0, "{m}");
    assert!(metric(&m, "moed_flash_bytes_read_total") > 0.0, "{m}");
    let hit = metric(&m, "moed_expert_cache_hit_rate");
    assert!((0.0..=1.0).contains(&hit));
    drop(streamed);

    // A token-level predictor only moves reads earlier: same text, request after request.
    let predicted = Daemon::start(&["--mem-budget", "52M", "--predictor", "frequency"]);
    for _ in 0..2 {
        let (status, got) = predicted.post("/v1/completions", &body);
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);
    }
}

/// Prompt caching: each turn of a growing chat evaluates only what follows the longest prefix
/// a kept conversation holds (reported as cached tokens and llama.cpp's `timings`), another
/// conversation in between does not evict it with `--prompt-cache 2`, and every answer is the
/// one a daemon without a prompt cache gives.
#[test]
fn prompt_prefix_reuse_across_turns_and_conversations() {
    let cached = Daemon::start(&["--prompt-cache", "2"]);
    let uncached = Daemon::start(&["--prompt-cache", "0"]);
    let ask = |d: &Daemon, messages: &Value| -> Value {
        let body = json!({
            "model": model_id(), "messages": messages, "max_tokens": 12, "seed": 3,
            "temperature": 0.8,
        });
        let (status, v) = d.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        v
    };
    let turn = |messages: &mut Value, user: &str, answer: Option<&Value>| {
        let m = messages.as_array_mut().unwrap();
        if let Some(a) = answer {
            let text = a["choices"][0]["message"]["content"].clone();
            m.push(json!({"role": "assistant", "content": text}));
        }
        m.push(json!({"role": "user", "content": user}));
    };
    let cached_of = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let prompt_of = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();

    let mut x = json!([{"role": "system", "content": "You are terse."}]);
    turn(&mut x, "Tell me about whales.", None);
    let x1 = ask(&cached, &x);
    assert_eq!(cached_of(&x1), 0, "a first request finds nothing cached");
    assert_eq!(x1["timings"]["prompt_n"].as_u64(), Some(prompt_of(&x1)));

    // Another conversation in between.
    let mut y = json!([{"role": "user", "content": "Something else entirely."}]);
    let y1 = ask(&cached, &y);
    assert_eq!(cached_of(&y1), 0);

    turn(&mut x, "And dolphins?", Some(&x1));
    let x2 = ask(&cached, &x);
    let x2_uncached = ask(&uncached, &x);
    assert!(
        cached_of(&x2) >= prompt_of(&x1),
        "turn 2 reuses at least turn 1's prompt: {} cached of {}",
        cached_of(&x2),
        prompt_of(&x2)
    );
    assert_eq!(
        x2["timings"]["prompt_n"].as_u64().unwrap(),
        prompt_of(&x2) - cached_of(&x2),
        "only the new tokens are evaluated"
    );
    assert_eq!(x2["timings"]["cache_n"].as_u64(), Some(cached_of(&x2)));
    assert_eq!(cached_of(&x2_uncached), 0);
    assert_eq!(
        x2["choices"][0]["message"]["content"], x2_uncached["choices"][0]["message"]["content"],
        "the cached prefix gives the same answer"
    );

    turn(&mut y, "Go on.", Some(&y1));
    let y2 = ask(&cached, &y);
    assert!(cached_of(&y2) >= prompt_of(&y1), "{y2}");
    assert_eq!(
        y2["choices"][0]["message"]["content"],
        ask(&uncached, &y)["choices"][0]["message"]["content"]
    );
    let m = cached.metrics();
    assert!(metric(&m, "moed_prompt_tokens_cached_total") > 0.0, "{m}");
}

/// Log-probabilities: chat's `logprobs`/`top_logprobs` and completions' `logprobs: N`, streamed
/// and not, agree with the model's logits; greedy picks the most likely token; the tokens'
/// bytes spell the text.
#[test]
fn logprobs_for_chat_and_completions() {
    let d = Daemon::start(&["--prompt-cache", "0"]);
    let body = json!({
        "model": model_id(), "messages": [{"role": "user", "content": "Count: one two"}],
        "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 3,
        "ignore_eos": true,
    });
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 8);
    let mut spelled = Vec::new();
    for e in content {
        let lp = e["logprob"].as_f64().unwrap();
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"], "{e}");
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0,
            "{lps:?}"
        );
        assert!(
            lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-4,
            "{lps:?}"
        );
        spelled.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(String::from_utf8_lossy(&spelled), text);

    // The first token's log-probability is the runtime's log-softmax of its logits.
    let rendered = "<|im_start|>user\nCount: one two<|im_end|>\n<|im_start|>assistant\n";
    let ids = encode(rendered, false);
    let file = GgufFile::open(common::model_path()).unwrap();
    let model = Model::load(&file).unwrap();
    let mut s = Session::with_kv_type(&model, 256, KvType::F16);
    let logits = s.forward(&ids, false).unwrap().to_vec();
    let first = moe_runtime::sampling::argmax_logits(&logits);
    let want = moe_runtime::engine::Logprobs::of(&logits, first, 3);
    assert!((content[0]["logprob"].as_f64().unwrap() - want.logprob as f64).abs() < 1e-5);

    // Streamed: the same entries, chunk by chunk.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (_, mut sse) = d.stream("/v1/chat/completions", &sbody);
    let streamed: Vec<Value> = sse
        .all()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, content);

    // Completions: the legacy form.
    let (status, v) = d.post(
        "/v1/completions",
        &json!({"prompt": "Once upon", "max_tokens": 5, "temperature": 0, "logprobs": 2,
                "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{v}");
    let l = &v["choices"][0]["logprobs"];
    assert_eq!(l["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(l["token_logprobs"].as_array().unwrap().len(), 5);
    assert!(l["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.as_object().unwrap().len() <= 2));
    let joined: String = l["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());
    assert_eq!(l["text_offset"][0], 0);

    // Bad values are refused with the parameter named.
    let (status, v) = d.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
    );
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("top_logprobs"))
    );
}
