//! Tool calls, reasoning and structured output end to end: the small trained model
//! (`models/small-moe/`) behind moed with a ChatML template that has Hermes-style tool calls and
//! Qwen3-style reasoning (`tests/fixtures/hermes_tools.jinja`). The model has never seen a tool
//! call, so calls are forced through the tool-call grammar (`tool_choice`), and reasoning
//! through a GBNF grammar; what comes back must be OpenAI's shapes with no markup left in the
//! text. Also run: the official `openai` Python client through the same paths
//! (`openai_tools.py`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{model_id, Daemon};
use serde_json::{json, Value};

fn small_moe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/small-moe/small-moe-q8_0.gguf")
}

fn template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hermes_tools.jinja")
}

fn start() -> Daemon {
    let t = template();
    Daemon::start_model(
        &small_moe(),
        &["--chat-template", t.to_str().unwrap(), "--ctx", "2048"],
    )
}

/// The small model's id, as moed derives it from the file name.
const MODEL: &str = "small-moe-q8_0";

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Oslo", "Paris", "Lima"]},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": false,
        },
    }})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                       "required": ["zone"], "additionalProperties": false},
    }})
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL, "max_tokens": 120, "seed": 1, "temperature": 0.7,
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A call's arguments, checked against `get_weather`'s or `get_time`'s schema.
fn check_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    let id = call["id"].as_str().unwrap();
    assert!(
        id.len() > 9
            && id.starts_with("call_")
            && id[5..].chars().all(|c| c.is_ascii_alphanumeric()),
        "{id}"
    );
    let name = call["function"]["name"].as_str().unwrap().to_string();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {call}"));
    match name.as_str() {
        "get_weather" => {
            assert!(["Oslo", "Paris", "Lima"].contains(&args["city"].as_str().unwrap()));
            assert!(["c", "f"].contains(&args["unit"].as_str().unwrap()));
            assert_eq!(args.as_object().unwrap().len(), 2, "{args}");
        }
        "get_time" => assert!(["UTC", "CET"].contains(&args["zone"].as_str().unwrap())),
        _ => panic!("no such tool: {call}"),
    }
    (name, args)
}

fn no_markup(text: &str) {
    for m in [
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
        "<|im_end|>",
    ] {
        assert!(!text.contains(m), "{m} in {text:?}");
    }
}

/// Reassembles a streamed chat reply: reasoning, content, tool calls (by index: the first
/// delta of a call has its id and name, the next ones its arguments) and the finish reason.
fn reassemble(events: &[String]) -> (String, String, Vec<Value>, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (mut reasoning, mut content, mut finish) = (String::new(), String::new(), String::new());
    let mut calls: Vec<Value> = Vec::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "{e}");
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let d = &c["delta"];
        reasoning += d["reasoning_content"].as_str().unwrap_or("");
        content += d["content"].as_str().unwrap_or("");
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert!(
                    tc["id"].is_string() && tc["function"]["name"].is_string(),
                    "{e}"
                );
                calls.push(json!({"id": tc["id"], "type": tc["type"],
                    "function": {"name": tc["function"]["name"], "arguments": ""}}));
            } else {
                assert!(tc.get("id").is_none(), "{e}");
            }
            let args = calls[i]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_string()
                + tc["function"]["arguments"].as_str().unwrap_or("");
            calls[i]["function"]["arguments"] = json!(args);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (reasoning, content, calls, finish)
}

#[test]
fn forced_tool_calls_come_back_as_tool_calls() {
    let d = start();
    let tools = json!([weather_tool(), time_tool()]);
    // `required`, one call: the grammar ends the reply after it.
    let body = chat(json!({"tools": tools, "tool_choice": "required",
                           "parallel_tool_calls": false}));
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    assert_eq!(c["message"]["content"], Value::Null, "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    check_call(&calls[0]);
    no_markup(&v.to_string());

    // Streamed: the same call, id and name first, then the arguments.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (_, mut sse) = d.stream("/v1/chat/completions", &sbody);
    let events = sse.all();
    let (reasoning, content, scalls, finish) = reassemble(&events);
    assert_eq!((reasoning.as_str(), content.as_str()), ("", ""));
    assert_eq!(finish, "tool_calls");
    assert_eq!(scalls.len(), 1);
    assert_eq!(scalls[0]["function"], calls[0]["function"]);
    no_markup(&events.join("\n"));

    // A named function, over several seeds: always that one.
    for seed in 0..3 {
        let body = chat(json!({"tools": tools, "seed": seed,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}}));
        let (status, v) = d.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(check_call(&calls[0]).0, "get_time");
    }

    // The call and its result go back in; with tool_choice none the answer is text.
    let mut messages = body["messages"].as_array().unwrap().clone();
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
    messages.push(json!({"role": "tool", "tool_call_id": calls[0]["id"], "content": "12 C"}));
    let body = chat(json!({"tools": tools, "messages": messages, "max_tokens": 12}));
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls");

    // tool_choice none: the tools are not in the prompt.
    let with = chat(json!({"tools": tools, "max_tokens": 1}));
    let without = chat(json!({"tools": tools, "tool_choice": "none", "max_tokens": 1}));
    let n = |b: &Value| d.post("/v1/chat/completions", b).1["usage"]["prompt_tokens"].as_u64();
    assert!(n(&without).unwrap() + 50 < n(&with).unwrap());
}

#[test]
fn reasoning_is_separated_from_the_answer() {
    let d = start();
    // The model is made to think first by a grammar.
    let grammar = r#"root ::= "<think>" [a-z ]{3,20} "</think>" [a-z]{1,10} [.]"#;
    let body = chat(json!({"grammar": grammar, "max_tokens": 60}));
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let m = &v["choices"][0]["message"];
    let reasoning = m["reasoning_content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    let content = m["content"].as_str().unwrap();
    assert!((3..=20).contains(&reasoning.len()), "{v}");
    assert!(content.ends_with('.') && content.len() >= 2, "{v}");
    assert!(m.get("tool_calls").is_none(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    no_markup(&v.to_string());

    // Streamed, with log-probabilities: the same split, and every token's log-probability
    // once.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["logprobs"] = json!(true);
    let (_, mut sse) = d.stream("/v1/chat/completions", &sbody);
    let events = sse.all();
    let (sreasoning, scontent, calls, finish) = reassemble(&events);
    assert_eq!(
        (sreasoning.as_str(), scontent.as_str()),
        (reasoning, content)
    );
    assert!(calls.is_empty());
    assert_eq!(finish, "stop");
    let n_logprobs: usize = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            Some(
                v["choices"].get(0)?["logprobs"]["content"]
                    .as_array()?
                    .len(),
            )
        })
        .sum();
    assert_eq!(
        n_logprobs as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

/// gpt-oss's Harmony channels go through the same reply path: the analysis channel is
/// reasoning, a message to `functions.NAME` a call (a grammar writes the channels here).
#[test]
fn harmony_channels_become_reasoning_content_and_calls() {
    let t = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/harmony_min.jinja");
    let d = Daemon::start_model(&small_moe(), &["--chat-template", t.to_str().unwrap()]);
    let grammar = r#"root ::= "<|channel|>analysis<|message|>" [a-z ]{3,12} "<|end|><|start|>assistant<|channel|>final<|message|>" [a-z]{1,8} [.]"#;
    let body = chat(json!({"grammar": grammar, "max_tokens": 90}));
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let m = &v["choices"][0]["message"];
    let reasoning = m["reasoning_content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!((3..=12).contains(&reasoning.len()), "{v}");
    assert!(m["content"].as_str().unwrap().ends_with('.'), "{v}");
    assert!(!v.to_string().contains("<|"), "{v}");

    let call = r#"root ::= "<|channel|>commentary to=functions.get_weather<|message|>{\"city\": \"" ("Oslo" | "Lima") "\", \"unit\": \"c\"}""#;
    let body = chat(json!({"grammar": call, "tools": [weather_tool()], "max_tokens": 90}));
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(check_call(&calls[0]).0, "get_weather");
    // Without tools the same message is text.
    let body = chat(json!({"grammar": call, "max_tokens": 90}));
    let (_, v) = d.post("/v1/chat/completions", &body);
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("{\"city\""),
        "{v}"
    );
}

#[test]
fn tool_requests_that_cannot_be_served_get_400() {
    let d = start();
    let tools = json!([weather_tool()]);
    for (extra, param, says) in [
        (
            json!({"tools": tools, "tool_choice": "required",
                   "response_format": {"type": "json_object"}}),
            "response_format",
            "forced tool call",
        ),
        (
            json!({"tools": tools, "tool_choice": {"type": "function",
                   "function": {"name": "nope"}}}),
            "tool_choice",
            "`nope`",
        ),
        (json!({"tool_choice": "required"}), "tool_choice", "empty"),
    ] {
        let (status, v) = d.post("/v1/chat/completions", &chat(extra.clone()));
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    drop(d);
    // The fixture's ChatML template has no tool-call format to force.
    let d = Daemon::start(&[]);
    let mut body = chat(json!({"tools": tools, "tool_choice": "required"}));
    body["model"] = json!(model_id());
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "tool_choice");
    // With auto, the request is served (the reply is parsed for calls only with a format).
    body["tool_choice"] = json!("auto");
    body["max_tokens"] = json!(4);
    let (status, v) = d.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
}

#[test]
fn official_openai_python_client_with_tools() {
    let probe = Command::new("python3")
        .args(["-c", "import openai, jsonschema"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: python3 with the `openai` and `jsonschema` packages is needed \
             (pip install openai jsonschema)"
        );
        return;
    }
    let d = start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_tools.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&d.socket)
        .arg(MODEL)
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
        stdout.contains("openai tools: all checks passed"),
        "{stdout}"
    );
}
