//! Forced tool calls in every family's own syntax, round trip: the small trained model
//! (`models/small-moe/`, which has never seen a tool call) behind moed with a real chat template
//! of each family (llama.cpp's models/templates, fetched by
//! scripts/fixtures/fetch_llama_cpp_files.sh), `tool_choice` `required` and a named function.
//! The grammar writes the call in the family's markers; the reply parser must turn it back into
//! OpenAI `tool_calls` whose arguments are valid for the tool's schema, with no markup in the
//! text, streamed or not. Also: a call cut off by `max_tokens` leaves no markup behind.

mod common;

use std::path::{Path, PathBuf};

use common::Daemon;
use serde_json::{json, Value};

fn small_moe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/small-moe/small-moe-q8_0.gguf")
}

const MODEL: &str = "small-moe-q8_0";

/// llama.cpp's template `name`, or None (with a note) when the templates were not fetched.
fn template(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MOE_EDGE_TEMPLATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/templates")
        });
    let path = dir.join(format!("{name}.jinja"));
    if path.exists() {
        return Some(path);
    }
    let note = format!(
        "{} is missing: run scripts/fixtures/fetch_llama_cpp_files.sh",
        path.display()
    );
    assert!(
        std::env::var_os("MOE_EDGE_REQUIRE_VOCAB").is_none(),
        "{note} (MOE_EDGE_REQUIRE_VOCAB=1)"
    );
    eprintln!("note: skipping: {note}");
    None
}

/// One template of each call syntax moed forces.
const FAMILIES: &[&str] = &[
    "Qwen3-Coder",                              // <tool_call><function=..><parameter=..>
    "Qwen3.5-4B",                               // the same, after <think>
    "GLM-4.6",                                  // <tool_call>NAME<arg_key>..<arg_value>..
    "deepseek-ai-DeepSeek-V3.1",                // NAME<｜tool▁sep｜>{json}
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", // function<｜tool▁sep｜>NAME ```json```
    "moonshotai-Kimi-K2",                       // functions.NAME:0<|tool_call_argument_begin|>
    "mistralai-Mistral-Nemo-Instruct-2407",     // [TOOL_CALLS][{json}]
    "Mistral-Small-3.2-24B-Instruct-2506",      // [TOOL_CALLS]NAME[ARGS]{json}
    "ibm-granite-granite-3.3-2B-Instruct",      // <|tool_call|>[{json}]
    "LFM2.5-8B-A1B",                            // <|tool_call_start|>[name(k=v)]
    "openai-gpt-oss-120b",                      // Harmony: to=functions.NAME<|message|>{json}
    "Qwen-Qwen3-0.6B",                          // <tool_call>{json}</tool_call>
];

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Oslo", "Paris", "Lima"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city", "days"],
                "additionalProperties": false,
            },
        }},
        {"type": "function", "function": {
            "name": "note",
            "description": "Writes a note.",
            "parameters": {"type": "object",
                           "properties": {"text": {"type": "string", "maxLength": 20},
                                          "urgent": {"type": "boolean"}},
                           "required": ["text", "urgent"], "additionalProperties": false},
        }},
    ])
}

/// A call's arguments, checked against its tool's schema.
fn check_call(call: &Value) -> String {
    assert_eq!(call["type"], "function", "{call}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    let name = call["function"]["name"].as_str().unwrap().to_string();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {call}"));
    let args = args.as_object().unwrap_or_else(|| panic!("{call}"));
    match name.as_str() {
        "get_weather" => {
            assert!(
                ["Oslo", "Paris", "Lima"].contains(&args["city"].as_str().unwrap()),
                "{call}"
            );
            let days = args["days"].as_i64().unwrap_or_else(|| panic!("{call}"));
            assert!((1..=7).contains(&days), "{call}");
            if let Some(u) = args.get("unit") {
                assert!(["c", "f"].contains(&u.as_str().unwrap()), "{call}");
            }
            assert!(args
                .keys()
                .all(|k| ["city", "days", "unit"].contains(&k.as_str())));
        }
        "note" => {
            assert!(args["text"].is_string(), "{call}");
            assert!(args["urgent"].is_boolean(), "{call}");
            assert_eq!(args.len(), 2, "{call}");
        }
        _ => panic!("no such tool: {call}"),
    }
    name
}

const MARKERS: &[&str] = &[
    "<tool_call>",
    "</tool_call>",
    "<function=",
    "<parameter=",
    "<arg_key>",
    "<arg_value>",
    "tool▁",
    "<|tool_call",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|channel|>",
    "<|message|>",
    "<|constrain|>",
    "<think>",
    "</think>",
];

fn no_markup(text: &str, family: &str) {
    for m in MARKERS {
        assert!(!text.contains(m), "{family}: {m} in {text}");
    }
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL, "max_tokens": 500, "seed": 3, "temperature": 0.8,
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": tools(),
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Text, reasoning, calls and finish reason of a streamed reply.
fn reassemble(events: &[String]) -> (String, Vec<Value>, String) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (mut content, mut finish) = (String::new(), String::new());
    let mut calls: Vec<Value> = Vec::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "{e}");
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        content += c["delta"]["content"].as_str().unwrap_or("");
        for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push(json!({"id": tc["id"], "type": tc["type"],
                    "function": {"name": tc["function"]["name"], "arguments": ""}}));
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
    (content, calls, finish)
}

#[test]
fn forced_calls_round_trip_in_every_family() {
    // Dozens of grammar-constrained replies: under qemu-aarch64 (scripts/check/qemu-test.sh sets
    // QEMU_LD_PREFIX) each takes over a minute, and nothing here depends on the CPU: the native
    // run of the same suite covers it.
    if std::env::var_os("QEMU_LD_PREFIX").is_some() {
        eprintln!("skipped under emulation: the native run covers it");
        return;
    }
    let mut ran = 0;
    for family in FAMILIES {
        let Some(t) = template(family) else { continue };
        let d = Daemon::start_model(
            &small_moe(),
            &["--chat-template", t.to_str().unwrap(), "--ctx", "4096"],
        );
        // `required`: calls only, each valid for its tool, over a few seeds.
        let mut names = Vec::new();
        for seed in 0..3 {
            // Qwen3.5's and DeepSeek-R1's templates open a reasoning block: the grammar closes it.
            let mut body = chat(json!({"tool_choice": "required", "seed": seed}));
            // Several calls on the last seed; one (the grammar then ends the reply) on others.
            body["parallel_tool_calls"] = json!(seed == 2);
            let (status, v) = d.post("/v1/chat/completions", &body);
            assert_eq!(status, 200, "{family}: {v}\n{}", d.log());
            let c = &v["choices"][0];
            // With several calls allowed, the small model may go on calling until max_tokens:
            // the call (or, for list forms, the list) it was writing is then dropped.
            let finish = c["finish_reason"].as_str().unwrap();
            let calls = c["message"]["tool_calls"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if seed < 2 || finish == "tool_calls" {
                assert_eq!(finish, "tool_calls", "{family}: {v}");
                assert!(!calls.is_empty(), "{family}: no calls: {v}");
            } else {
                assert_eq!(finish, "length", "{family}: {v}");
            }
            for call in &calls {
                names.push(check_call(call));
            }
            no_markup(&c["message"].to_string(), family);
            let content = c["message"]["content"].as_str().unwrap_or("");
            assert!(
                content.trim().is_empty(),
                "{family}: text beside forced calls: {v}"
            );
        }
        // A named function: that one, once; streamed, the same as not.
        for name in ["note", "get_weather"] {
            let body = chat(
                json!({"tool_choice": {"type": "function", "function": {"name": name}},
                                   "chat_template_kwargs": {"enable_thinking": false}}),
            );
            let (status, v) = d.post("/v1/chat/completions", &body);
            assert_eq!(status, 200, "{family}: {v}");
            let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{family}: {v}");
            assert_eq!(check_call(&calls[0]), name, "{family}");
            let mut sbody = body.clone();
            sbody["stream"] = json!(true);
            let (_, mut sse) = d.stream("/v1/chat/completions", &sbody);
            let events = sse.all();
            let (content, scalls, finish) = reassemble(&events);
            assert_eq!(finish, "tool_calls", "{family}");
            assert!(content.trim().is_empty(), "{family}: {content:?}");
            assert_eq!(scalls.len(), 1, "{family}");
            assert_eq!(scalls[0]["function"], calls[0]["function"], "{family}");
            no_markup(&events.join("\n"), family);
        }
        println!("{family}: forced calls round-trip ({names:?})");
        ran += 1;
    }
    println!("{ran} of {} families checked", FAMILIES.len());
}

/// `max_tokens` cuts a forced call mid-way: finish_reason `length`, and none of the call's
/// markup in `content`, streamed or not.
#[test]
fn a_call_cut_by_max_tokens_leaves_no_markup() {
    for family in [
        "Qwen3-Coder",
        "deepseek-ai-DeepSeek-V3.1",
        "openai-gpt-oss-120b",
    ] {
        let Some(t) = template(family) else { continue };
        let d = Daemon::start_model(
            &small_moe(),
            &["--chat-template", t.to_str().unwrap(), "--ctx", "4096"],
        );
        for max_tokens in [2, 5, 9] {
            let body = chat(json!({"tool_choice": {"type": "function",
                "function": {"name": "get_weather"}}, "max_tokens": max_tokens}));
            let (status, v) = d.post("/v1/chat/completions", &body);
            assert_eq!(status, 200, "{family}: {v}");
            let c = &v["choices"][0];
            assert_eq!(c["finish_reason"], "length", "{family}: {v}");
            assert!(c["message"].get("tool_calls").is_none(), "{family}: {v}");
            assert_eq!(c["message"]["content"], "", "{family}: {v}");
            let mut sbody = body.clone();
            sbody["stream"] = json!(true);
            let (_, mut sse) = d.stream("/v1/chat/completions", &sbody);
            let events = sse.all();
            let (content, calls, finish) = reassemble(&events);
            assert_eq!((content.as_str(), calls.len()), ("", 0), "{family}");
            assert_eq!(finish, "length", "{family}");
            no_markup(&events.join("\n"), family);
        }
    }
}
