//! `chat`: a conversation with arbitrary message content rendered by moed's chat templates
//! (`ChatTemplate::render`: minijinja with moed's Python string methods, tool calls,
//! reasoning, `chat_template_kwargs`): the bundled model's template, ChatML, and llama.cpp's
//! real templates (`tests/fixtures/templates`, fetched by
//! `scripts/fixtures/fetch_llama_cpp_files.sh`; without them only the first two).
//!
//! Content is data: whatever a message holds (`{{ 7 * 7 }}`, `{% raw %}`, template syntax of
//! any kind) must never be evaluated. The bundled template and ChatML print each message's
//! content as it is, so for them every message's content must appear verbatim in the output.
//!
//! Input: byte 0 picks the template, byte 1 holds flags (bit 0: tools are offered; bit 1:
//! `enable_thinking: false`; bit 2: the assistant messages carry a tool call and reasoning),
//! then NUL-separated messages, each a role byte (system, user, assistant, tool) and the
//! content.

use std::sync::OnceLock;

use moe_daemon::api::ChatMessage;
use moe_daemon::chat::{ChatTemplate, RenderOptions, CHATML};
use serde_json::{json, Value as Json};

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Templates whose output holds every message's content verbatim.
const VERBATIM: usize = 2;

fn templates() -> &'static [ChatTemplate] {
    static T: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        let loaded = crate::http::loaded();
        let mut sources = vec![Ok(loaded
            .chat
            .expect("the bundled model's template compiles"))];
        sources.push(
            ChatTemplate::new(CHATML, "<s>".into(), "</s>".into()).map_err(|e| e.to_string()),
        );
        let dir = crate::repo_root().join("tests/fixtures/templates");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|x| x == "jinja"));
        files.sort();
        for f in files {
            if let Ok(src) = std::fs::read_to_string(&f) {
                sources.push(
                    ChatTemplate::new(&src, "<s>".into(), "</s>".into()).map_err(|e| e.to_string()),
                );
            }
        }
        sources.into_iter().filter_map(Result::ok).collect()
    })
}

fn tools() -> Json {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather {{ at }} a place",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    }}])
}

pub fn run(data: &[u8]) {
    let [pick, flags, rest @ ..] = data else {
        return;
    };
    let all = templates();
    let index = *pick as usize % all.len();
    let mut messages = Vec::new();
    for part in rest.split(|&b| b == 0) {
        let Some((&role, content)) = part.split_first() else {
            continue;
        };
        let role = ROLES[role as usize % ROLES.len()];
        let content = String::from_utf8_lossy(content).into_owned();
        let mut m = ChatMessage {
            role: role.into(),
            content: Some(Json::String(content.clone())),
            ..Default::default()
        };
        if flags & 4 != 0 && role == "assistant" {
            m.tool_calls = Some(json!([{"id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": json!({"city": content}).to_string()}}]));
            m.reasoning_content = Some(content.clone());
        }
        if role == "tool" {
            m.tool_call_id = Some("call_0".into());
        }
        messages.push(m);
    }
    let tools = tools();
    let mut opts = RenderOptions {
        tools: (flags & 1 != 0).then_some(&tools),
        ..Default::default()
    };
    if flags & 2 != 0 {
        opts.kwargs
            .insert("enable_thinking".into(), Json::Bool(false));
    }
    let Ok(text) = all[index].render(&messages, &opts) else {
        return;
    };
    if index < VERBATIM.min(all.len()) {
        for m in &messages {
            let content = m.content.as_ref().and_then(Json::as_str).unwrap_or("");
            assert!(
                text.contains(content),
                "template {index} did not print the content {content:?} as it is: {text:?}"
            );
        }
    }
}
