//! Real chat templates (llama.cpp's models/templates, fetched by
//! scripts/fixtures/fetch_llama_cpp_files.sh) render in moed's template engine: a conversation
//! with a system prompt, turns, tool definitions, an assistant tool call and its result.

use std::path::PathBuf;

use moe_daemon::api::ChatMessage;
use moe_daemon::chat::{ChatTemplate, RenderOptions};
use serde_json::json;

fn templates_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MOE_EDGE_TEMPLATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/templates")
        });
    if dir.join("Qwen-Qwen3-0.6B.jinja").exists() {
        return Some(dir);
    }
    let note = format!(
        "llama.cpp's chat templates are not in {}: run scripts/fixtures/fetch_llama_cpp_files.sh",
        dir.display()
    );
    assert!(
        std::env::var_os("MOE_EDGE_REQUIRE_VOCAB").is_none(),
        "{note} (MOE_EDGE_REQUIRE_VOCAB=1)"
    );
    eprintln!("note: skipping: {note}");
    None
}

fn msg(v: serde_json::Value) -> ChatMessage {
    serde_json::from_value(v).unwrap()
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        msg(json!({"role": "system", "content": "You are a helpful assistant."})),
        msg(json!({"role": "user", "content": "Hello {{ not a template }}"})),
        msg(json!({"role": "assistant", "content": "Hi! How can I help?"})),
        msg(json!({"role": "user", "content": "What is the weather in Oslo?"})),
        msg(
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "a1b2c3d4e", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}
            }]}),
        ),
        msg(json!({"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "{\"temp_c\": 12}"})),
        msg(json!({"role": "assistant", "content": "It is 12 °C in Oslo."})),
        msg(json!({"role": "user", "content": "Thanks. And tomorrow?"})),
    ]
}

/// Templates that do not render the conversation, none of a model family moe-edge runs, and why.
const NOT_RENDERED: &[(&str, &str)] = &[
    (
        "google-gemma-2-2b-it",
        "Gemma 2 (dense): the template refuses a system message",
    ),
    (
        "fireworks-ai-llama-3-firefunction-v2",
        "Llama 3 (dense): the template needs vLLM's `functions` and `datetime` variables",
    ),
];

/// Every template renders the conversation with tools but those listed in `NOT_RENDERED`; the
/// message text appears verbatim (content is data: `{{ ... }}` in a message is not evaluated).
#[test]
fn llama_cpp_templates_render() {
    let Some(dir) = templates_dir() else { return };
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                       "description": "The city's name"}},
                       "required": ["city"]}}}]);
    let opts = RenderOptions {
        tools: Some(&tools),
        kwargs: Default::default(),
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
        .collect();
    names.sort();
    let mut failures = Vec::new();
    for path in &names {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let src = std::fs::read_to_string(path).unwrap();
        let t = match ChatTemplate::new(&src, "<s>".into(), "</s>".into()) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: does not compile: {e:#}"));
                continue;
            }
        };
        match t.render(&conversation(), &opts) {
            Ok(out) => {
                if !out.contains("Hello {{ not a template }}") {
                    failures.push(format!("{name}: the user's text is not in the prompt"));
                }
            }
            Err(e) => failures.push(format!(
                "{name}: {}",
                e.message.lines().next().unwrap_or_default()
            )),
        }
    }
    println!(
        "{} of {} templates render",
        names.len() - failures.len(),
        names.len()
    );
    for (name, why) in NOT_RENDERED {
        println!("not rendered: {name}: {why}");
    }
    let unexpected: Vec<&String> = failures
        .iter()
        .filter(|f| {
            !NOT_RENDERED
                .iter()
                .any(|(n, _)| f.starts_with(&format!("{n}:")))
        })
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    assert_eq!(
        failures.len(),
        NOT_RENDERED.len(),
        "a template listed as not rendering renders now: update NOT_RENDERED"
    );
}
