//! `--parallel N`: up to N requests generate together, their tokens decoded in one batch per
//! step. Every answer is the one the request gets alone (greedy and seeded sampling, stop
//! strings, a grammar, log-probabilities, usage), a client that hangs up stops only its own
//! generation, and the prompt cache keeps serving each conversation.

mod common;

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect, metric, Daemon};
use serde_json::{json, Value};

/// The requests of the mix: completions and chat, greedy and sampled, a stop string, a JSON
/// grammar, log-probabilities; different prompt and reply lengths, so that requests join and
/// leave the batch at different steps.
fn mix() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Tell me about whales."}],
                   "max_tokens": 16, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "The quick brown fox jumps over", "max_tokens": 30, "seed": 7,
                   "temperature": 0.8, "stop": ["e"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Give me JSON."}], "max_tokens": 20,
                   "temperature": 0, "response_format": {"type": "json_object"}}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 9, "seed": 3, "temperature": 0.8,
                   "logprobs": 2, "ignore_eos": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "In a small village"}],
                   "max_tokens": 12, "seed": 11, "temperature": 0.8}),
        ),
    ]
}

/// What must match between runs: choices (text, logprobs, finish reason) and token counts.
fn answer(v: &Value) -> Value {
    json!({"choices": v["choices"], "usage": {
        "prompt_tokens": v["usage"]["prompt_tokens"],
        "completion_tokens": v["usage"]["completion_tokens"],
    }})
}

/// Runs every request of `mix` at once from its own client and returns the answers in order;
/// also the most generations the daemon reported running at once meanwhile.
fn concurrently(d: &Daemon, mix: &[(&'static str, Value)]) -> (Vec<Value>, f64) {
    let running = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (socket, running) = (d.socket.clone(), running.clone());
        std::thread::spawn(move || {
            let mut most = 0f64;
            while running.load(Relaxed) {
                if let Ok(text) = common::try_request(&socket, "GET", "/metrics", None) {
                    most = most.max(metric(
                        &String::from_utf8_lossy(&text.body),
                        "moed_generating",
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let clients: Vec<_> = mix
        .iter()
        .cloned()
        .map(|(path, body)| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                let mut c = connect(&socket).unwrap();
                // As common's client: a grammar-constrained reply took over a minute under qemu.
                c.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
                let payload = body.to_string();
                common::write_request(&mut c, "POST", path, Some(payload.as_bytes())).unwrap();
                let resp = common::read_response(&mut BufReader::new(c)).unwrap();
                assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
                resp.json()
            })
        })
        .collect();
    let answers = clients.into_iter().map(|c| c.join().unwrap()).collect();
    running.store(false, Relaxed);
    (answers, watcher.join().unwrap())
}

#[test]
fn concurrent_requests_get_the_answers_they_get_alone() {
    let mix = mix();
    for parallel in ["2", "4"] {
        // A pause per step so that the requests overlap on a fast machine too.
        let d = Daemon::start(&["--parallel", parallel, "--test-token-delay-ms", "15"]);
        let alone: Vec<Value> = mix
            .iter()
            .map(|(path, body)| {
                let (s, v) = d.post(path, body);
                assert_eq!(s, 200, "{v}");
                v
            })
            .collect();
        let (together, most) = concurrently(&d, &mix);
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(answer(a), answer(t), "--parallel {parallel}: request {i}");
        }
        let n: f64 = parallel.parse().unwrap();
        assert!(
            most >= 2.0 && most <= n,
            "--parallel {parallel}: at most {most} generations ran at once"
        );
        // The JSON grammar held while batched.
        let json_text = together[3]["choices"][0]["message"]["content"]
            .as_str()
            .unwrap();
        assert!(json_text.trim_start().starts_with('{'), "{json_text}");
        // The daemon's log says how many decode together.
        assert!(
            d.log().contains(&format!("parallel={parallel}")),
            "{}",
            d.log()
        );
    }
}

#[test]
fn a_client_that_hangs_up_does_not_disturb_the_others() {
    let d = Daemon::start(&["--parallel", "4", "--test-token-delay-ms", "20"]);
    let long = |prompt: &str| {
        json!({"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": true,
               "stream": true})
    };
    let prompts = ["a", "Once upon a time", "The quick brown fox"];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            let mut body = long(p);
            body["stream"] = json!(false);
            let (s, v) = d.post("/v1/completions", &body);
            assert_eq!(s, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let mut streams: Vec<_> = prompts
        .iter()
        .map(|p| d.stream("/v1/completions", &long(p)).1)
        .collect();
    // All three running, then the first client leaves after two events.
    let t0 = Instant::now();
    while metric(&d.metrics(), "moed_generating") < 3.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the three never ran together"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut gone = streams.remove(0);
    gone.next_data().unwrap();
    gone.next_data().unwrap();
    drop(gone);
    for (i, mut s) in streams.into_iter().enumerate() {
        let (text, finish, _) = common::collect_stream(&s.all(), false);
        assert_eq!(text, alone[i + 1], "stream {} after the hang-up", i + 1);
        assert_eq!(finish, "length");
    }
    let t0 = Instant::now();
    while metric(&d.metrics(), "moed_requests_cancelled_total") != 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the hang-up was not noticed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The three replies alone (120 tokens), the two others' again (80) and the cut one's few:
    // it stopped within a few tokens of its client leaving.
    let generated = metric(&d.metrics(), "moed_generated_tokens_total");
    assert!(
        generated <= 120.0 + 80.0 + 8.0,
        "{generated} tokens generated"
    );
}

/// Two conversations going on at once, each continued in a second turn: each turn reuses its
/// conversation's earlier prompt (cached tokens) and answers as a daemon without a prompt cache
/// does.
#[test]
fn the_prompt_cache_serves_each_slot() {
    let d = Daemon::start(&[
        "--parallel",
        "2",
        "--prompt-cache",
        "2",
        "--test-token-delay-ms",
        "10",
    ]);
    let fresh = Daemon::start(&["--prompt-cache", "0"]);
    let chat = |messages: &Value| {
        (
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 10, "temperature": 0}),
        )
    };
    let mut convs = [
        json!([{"role": "user", "content": "Tell me about whales."}]),
        json!([{"role": "user", "content": "Something else entirely, please."}]),
    ];
    let (first, _) = concurrently(&d, &[chat(&convs[0]), chat(&convs[1])]);
    for (c, a) in convs.iter_mut().zip(&first) {
        let m = c.as_array_mut().unwrap();
        m.push(json!({"role": "assistant", "content": a["choices"][0]["message"]["content"]}));
        m.push(json!({"role": "user", "content": "And then?"}));
    }
    let (second, _) = concurrently(&d, &[chat(&convs[0]), chat(&convs[1])]);
    for i in 0..2 {
        let cached = second[i]["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let before = first[i]["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            cached >= before,
            "conversation {i}: {cached} cached, turn 1 had {before}"
        );
        let (path, body) = chat(&convs[i]);
        let (s, want) = fresh.post(path, &body);
        assert_eq!(s, 200);
        assert_eq!(answer(&second[i]), answer(&want), "conversation {i}");
    }
}

/// Every slot's KV cache counts against the memory budget: a budget that holds one sequence
/// but not 64 starts with `--parallel 1` and refuses `--parallel 64` at start-up, saying why.
#[test]
fn the_memory_budget_counts_every_slot() {
    let budget = [
        "--target-profile",
        "none",
        "--mem-budget",
        "22M",
        "--no-warmup",
    ];
    let one = Daemon::start(&[&budget[..], &["--parallel", "1"]].concat());
    let (s, v) = one.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!(s, 200, "{v}");
    let mut many = Daemon::spawn(&[&budget[..], &["--parallel", "64"]].concat());
    assert_eq!(many.wait_exit(Duration::from_secs(60)), Some(1));
    let log = many.log();
    assert!(
        log.contains("too small") && log.contains("64 KV caches") && log.contains("--parallel 64"),
        "{log}"
    );
}
