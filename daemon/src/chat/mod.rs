//! Chat templates: the GGUF's `tokenizer.chat_template`, rendered by minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`), with `add_generation_prompt = true`.

use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

use crate::api::{message_text, ApiError, ChatMessage, GenParams};

mod pycompat;

/// ChatML, the llama.cpp server's template for a model file without one.
pub const CHATML: &str = "{%- for message in messages -%}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// What a conversation is rendered with besides its messages.
#[derive(Debug, Default)]
pub struct RenderOptions<'a> {
    /// The request's `tools` (OpenAI's `[{"type": "function", "function": {...}}]`).
    pub tools: Option<&'a Json>,
    /// Further template variables: `enable_thinking`, `reasoning_effort`, and whatever a request
    /// passes in `chat_template_kwargs` (as llama.cpp's server does).
    pub kwargs: serde_json::Map<String, Json>,
}

/// What a chat request passes to the template besides its messages.
pub fn render_options(p: &GenParams) -> Result<RenderOptions<'_>, ApiError> {
    let mut kwargs = p.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(effort) = &p.reasoning_effort {
        if !matches!(effort.as_str(), "low" | "medium" | "high") {
            return Err(ApiError::param(
                "reasoning_effort",
                "`reasoning_effort` is low, medium or high",
            ));
        }
        kwargs.insert("reasoning_effort".into(), Json::String(effort.clone()));
    }
    Ok(RenderOptions {
        tools: p
            .tools
            .as_ref()
            .filter(|t| t.as_array().is_some_and(|a| !a.is_empty())),
        kwargs,
    })
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    harmony: bool,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts templates may refer to.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        pycompat::install(&mut env);
        env.add_template_owned("chat", pycompat::preprocess(source))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            harmony: crate::reply::is_harmony_template(source),
        })
    }

    /// Whether replies come in gpt-oss's Harmony format (reasoning and answer on channels).
    pub fn is_harmony(&self) -> bool {
        self.harmony
    }

    /// The prompt text for `messages`, ending with the assistant's turn opening.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<String, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::param("messages", "`messages` must not be empty"));
        }
        // Tool-call arguments as objects, as transformers' templates expect; a template that
        // fails on them may want the JSON text instead (llama.cpp's server tries both too).
        let first = self.render_with(messages, opts, true);
        match first {
            Err(e) if messages.iter().any(|m| m.tool_calls.is_some()) => {
                self.render_with(messages, opts, false).map_err(|_| e)
            }
            r => r,
        }
    }

    fn render_with(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
        object_arguments: bool,
    ) -> Result<String, ApiError> {
        let mut msgs = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            msgs.push(message_context(i, m, object_arguments, self.harmony)?);
        }
        let tmpl = self.env.get_template("chat").map_err(|e| {
            ApiError::status(hyper::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })?;
        let tools = opts.tools.map(Value::from_serialize);
        let ctx = context! {
            messages => msgs,
            tools => tools,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            ..Value::from_serialize(&opts.kwargs)
        };
        tmpl.render(ctx).map_err(|e| {
            // The template refusing the conversation (e.g. roles out of order) is the client's
            // error; anything else is the template's.
            let msg = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid").to_string(),
                _ => format!("{e:#}"),
            };
            ApiError::param(
                "messages",
                format!("the model's chat template rejected the messages: {msg}"),
            )
        })
    }
}

/// One message as templates see it: `role`, `content` (text), and where given `name`,
/// `tool_calls` (with JSON-text arguments parsed into objects, as transformers' templates
/// expect and llama.cpp's server passes them), `tool_call_id` and `reasoning_content` (also as
/// `thinking` for a Harmony template).
fn message_context(
    i: usize,
    m: &ChatMessage,
    object_arguments: bool,
    harmony: bool,
) -> Result<Value, ApiError> {
    if !matches!(
        m.role.as_str(),
        "system" | "user" | "assistant" | "tool" | "developer"
    ) {
        return Err(ApiError::param(
            &format!("messages[{i}].role"),
            format!(
                "unknown role `{}` (system, developer, user, assistant or tool)",
                m.role
            ),
        ));
    }
    let mut obj = serde_json::Map::new();
    obj.insert("role".into(), Json::String(m.role.clone()));
    obj.insert("content".into(), Json::String(message_text(i, m)?));
    if let Some(name) = &m.name {
        obj.insert("name".into(), Json::String(name.clone()));
    }
    if let Some(calls) = &m.tool_calls {
        obj.insert(
            "tool_calls".into(),
            tool_calls_context(i, calls, object_arguments)?,
        );
    }
    if let Some(id) = &m.tool_call_id {
        obj.insert("tool_call_id".into(), Json::String(id.clone()));
    }
    if let Some(r) = &m.reasoning_content {
        obj.insert("reasoning_content".into(), Json::String(r.clone()));
        // gpt-oss's template reads an earlier turn's reasoning as `thinking`; llama.cpp's
        // server copies it there for that template.
        if harmony {
            obj.insert("thinking".into(), Json::String(r.clone()));
        }
    }
    Ok(Value::from_serialize(&obj))
}

fn tool_calls_context(i: usize, calls: &Json, object_arguments: bool) -> Result<Json, ApiError> {
    let param = format!("messages[{i}].tool_calls");
    let bad = |why: &str| ApiError::param(&param, format!("`{param}` {why}"));
    let Json::Array(calls) = calls else {
        return Err(bad("must be an array"));
    };
    let mut out = Vec::with_capacity(calls.len());
    for call in calls {
        let mut call = call.clone();
        let function = call
            .get_mut("function")
            .and_then(Json::as_object_mut)
            .ok_or_else(|| bad("entries need a `function` object"))?;
        if !function.get("name").is_some_and(Json::is_string) {
            return Err(bad("entries need `function.name`"));
        }
        match function.get("arguments") {
            Some(Json::String(args)) if object_arguments => {
                if let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(args) {
                    function.insert("arguments".into(), parsed);
                }
            }
            Some(args @ Json::Object(_)) if !object_arguments => {
                let text = args.to_string();
                function.insert("arguments".into(), Json::String(text));
            }
            _ => {}
        }
        out.push(call);
    }
    Ok(Json::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: Some(json!(content)),
            ..Default::default()
        }
    }

    fn render(t: &ChatTemplate, messages: &[ChatMessage]) -> Result<String, ApiError> {
        t.render(messages, &RenderOptions::default())
    }

    /// The tool the template tests offer, as a client sends it.
    fn weather_tool() -> serde_json::Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    /// An assistant turn calling `weather_tool` for Oslo, as a client sends it back.
    fn weather_call() -> ChatMessage {
        serde_json::from_value(
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1",
            "type": "function", "function": {"name": "get_weather",
            "arguments": "{\"city\": \"Oslo\"}"}}]}),
        )
        .unwrap()
    }

    /// The fixtures' ChatML template, as moe-convert stores it.
    const FIXTURE_CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml() {
        let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
        // The fixtures' template and the built-in fallback render alike.
        for src in [FIXTURE_CHATML, CHATML] {
            let t = ChatTemplate::new(src, String::new(), "<|im_end|>".into()).unwrap();
            let out = render(&t, &[msg("system", "Be brief."), msg("user", "Hi")]).unwrap();
            assert_eq!(out, want);
            assert!(render(&t, &[]).is_err());
            assert_eq!(
                render(&t, &[msg("wizard", "x")])
                    .unwrap_err()
                    .param
                    .as_deref(),
                Some("messages[0].role")
            );
        }
    }

    /// A folder of the repository's `tests/`, from this crate.
    fn repo_tests() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests")
    }

    /// A template of llama.cpp's `models/templates` (fetched by
    /// scripts/fixtures/fetch_llama_cpp_files.sh), or None with a note when it is missing, which
    /// fails instead under MOE_EDGE_REQUIRE_VOCAB=1.
    fn fetched_template(name: &str) -> Option<String> {
        let dir = match std::env::var_os("MOE_EDGE_TEMPLATE_DIR") {
            Some(d) => std::path::PathBuf::from(d),
            None => repo_tests().join("fixtures/templates"),
        };
        let path = dir.join(name);
        let source = std::fs::read_to_string(&path).ok();
        if source.is_none() {
            let note = format!(
                "{} is missing: run scripts/fixtures/fetch_llama_cpp_files.sh",
                path.display()
            );
            assert!(
                std::env::var("MOE_EDGE_REQUIRE_VOCAB").as_deref() != Ok("1"),
                "{note} (MOE_EDGE_REQUIRE_VOCAB=1)"
            );
            eprintln!("note: skipping: {note}");
        }
        source
    }

    /// GLM-4.5/4.6's template as llama.cpp ships it (`models/templates/GLM-4.6.jinja`, fetched
    /// beside llama.cpp's tokenizer vectors by scripts/fixtures/fetch_llama_cpp_files.sh). The
    /// expected texts are transformers' renderings of the same messages: an earlier turn's
    /// reasoning dropped, `<|observation|>` before tool output, no newline after a turn.
    #[test]
    fn glm_4_6_template_renders_as_transformers() {
        let Some(source) = fetched_template("GLM-4.6.jinja") else {
            return;
        };
        let t = ChatTemplate::new(&source, String::new(), "<|endoftext|>".into()).unwrap();
        let out = render(
            &t,
            &[
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("assistant", "<think>greet back</think>Hello!"),
                msg("user", "What is 2+2?"),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello!\
             <|user|>\nWhat is 2+2?<|assistant|>"
        );
        let out = render(
            &t,
            &[
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("tool", "42"),
                msg("user", "ok"),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello!<|observation|>\n\
             <tool_response>\n42\n</tool_response><|user|>\nok<|assistant|>"
        );
    }

    /// ERNIE-4.5's template, as the `ernie4_5_moe` fixture's tokenizer_config.json carries it;
    /// its expected.json holds transformers' rendering of the fixture's chat example.
    #[test]
    fn ernie_4_5_template_renders_as_transformers() {
        let dir = repo_tests().join("fixtures/ernie4_5_moe");
        let read = |f: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
        };
        let (cfg, expected) = (read("tokenizer_config.json"), read("expected.json"));
        let source = cfg["chat_template"].as_str().unwrap();
        let t = ChatTemplate::new(source, "<s>".into(), "</s>".into()).unwrap();
        let example = &expected["chat_example"];
        let messages: Vec<ChatMessage> = example["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| msg(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            render(&t, &messages).unwrap(),
            example["rendered"].as_str().unwrap()
        );
        let out = render(
            &t,
            &[
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("user", "Bye"),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello!<|end_of_sentence|>\
             User: Bye\nAssistant: "
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        // Shaped like Mistral/Llama templates: strip(), bos_token, raise_exception, loop.index0.
        let src = "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>".into(), "</s>".into()).unwrap();
        let out = render(
            &t,
            &[
                msg("user", "  hi  "),
                msg("assistant", "yo"),
                msg("user", "q"),
            ],
        )
        .unwrap();
        assert_eq!(out, "<s>[INST] hi [/INST]yo</s>[INST] q [/INST]");
        let e = render(&t, &[msg("assistant", "x")]).unwrap_err();
        assert!(e.message.contains("roles must alternate"), "{}", e.message);
        assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST);
    }

    /// Tools, tool calls (JSON-text arguments become objects) and tool results reach the
    /// template, and request variables such as `enable_thinking` too.
    #[test]
    fn tools_tool_calls_and_variables() {
        let src = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}{% else %}{{ m.content }}{% endif %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}\n{% endfor %}{% if enable_thinking is false %}no-think{% endif %}";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        let tools =
            json!([{"type": "function", "function": {"name": "weather", "parameters": {}}}]);
        let call = ChatMessage {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(json!([{"id": "c1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}])),
            ..Default::default()
        };
        let result = ChatMessage {
            role: "tool".into(),
            content: Some(json!("12 C")),
            tool_call_id: Some("c1".into()),
            ..Default::default()
        };
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("enable_thinking".into(), json!(false));
        let opts = RenderOptions {
            tools: Some(&tools),
            kwargs,
        };
        let out = t
            .render(&[msg("user", "Weather?"), call, result], &opts)
            .unwrap();
        assert_eq!(
            out,
            // (trim_blocks drops the newline after each block tag, as transformers does)
            "TOOLS:weather;user:Weather?assistant:weather(Oslo)tool:12 C#c1no-think"
        );
        let bad = ChatMessage {
            role: "assistant".into(),
            tool_calls: Some(json!([{"function": {}}])),
            ..Default::default()
        };
        let e = t.render(&[bad], &opts).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].tool_calls"));
    }

    /// LFM2-8B-A1B's template as llama.cpp ships it (`models/templates/LFM2-8B-A1B.jinja`):
    /// tools listed in the system turn, a tool result between its markers, rendered exactly
    /// as transformers 5.24's apply_chat_template renders the same conversation; replies are
    /// parsed for LFM2's Python-style calls.
    #[test]
    fn lfm2_template_renders_as_transformers() {
        let Some(source) = fetched_template("LFM2-8B-A1B.jinja") else {
            return;
        };
        let t = ChatTemplate::new(&source, "<|startoftext|>".into(), "<|im_end|>".into()).unwrap();
        let tools = weather_tool();
        let opts = RenderOptions {
            tools: Some(&tools),
            kwargs: serde_json::Map::new(),
        };
        let call = "<|tool_call_start|>[get_weather(city=\"Oslo\")]<|tool_call_end|>";
        let out = t
            .render(
                &[
                    msg("system", "Be brief."),
                    msg("user", "Weather in Oslo?"),
                    msg("assistant", call),
                    msg("tool", "12 C"),
                ],
                &opts,
            )
            .unwrap();
        let want = "<|startoftext|><|im_start|>system\nBe brief.\nList of tools: <|tool_list_start|>[{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}]<|tool_list_end|><|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n<|tool_call_start|>[get_weather(city=\"Oslo\")]<|tool_call_end|><|im_end|>\n<|im_start|>tool\n<|tool_response_start|>12 C<|tool_response_end|><|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(out, want);
        let out = render(&t, &[msg("user", "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let reply = crate::reply::ReplySyntax::of_template(&source);
        assert_eq!(reply.tools, crate::reply::ToolSyntax::Lfm2);
    }

    /// Qwen3.5's template as llama.cpp ships it (`models/templates/Qwen3.5-4B.jinja`, the
    /// family's template, Qwen3.5-35B-A3B's included) renders exactly as transformers 5.24's
    /// apply_chat_template: an earlier turn's reasoning dropped, the prompt opening a `<think>`
    /// block, tools and an XML call with its result, and `enable_thinking: false` closing the
    /// block at once. A reply continues the open block, so its thinking comes back as
    /// reasoning (`reasoning_content`) and the rest as the answer or a call.
    #[test]
    fn qwen35_template_renders_as_transformers_and_returns_thinking() {
        use crate::reply::{ReplyEvent, ReplyParser, ReplySyntax, ToolSyntax};
        let Some(source) = fetched_template("Qwen3.5-4B.jinja") else {
            return;
        };
        let t = ChatTemplate::new(&source, String::new(), "<|im_end|>".into()).unwrap();
        let mut earlier = msg("assistant", "Hello!");
        earlier.reasoning_content = Some("greet back".into());
        let out = render(
            &t,
            &[
                msg("system", "Be brief."),
                msg("user", "Hi"),
                earlier,
                msg("user", "What is 2+2?"),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n<think>\n"
        );

        let tools = weather_tool();
        let call = weather_call();
        let opts = RenderOptions {
            tools: Some(&tools),
            kwargs: serde_json::Map::new(),
        };
        let out = t
            .render(
                &[msg("user", "Weather in Oslo?"), call, msg("tool", "12 C")],
                &opts,
            )
            .unwrap();
        let want = "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT><|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n12 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n";
        assert_eq!(out, want);

        let mut kwargs = serde_json::Map::new();
        kwargs.insert("enable_thinking".into(), json!(false));
        let no_think = RenderOptions {
            tools: None,
            kwargs,
        };
        let closed = t.render(&[msg("user", "Hi")], &no_think).unwrap();
        assert_eq!(
            closed,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );

        // The reply after the open block: thinking, then the answer or an XML call.
        let syntax = ReplySyntax::of_template(&source);
        assert_eq!(syntax.tools, ToolSyntax::TaggedBlock);
        let parse = |prompt: &str, reply: &str| {
            let mut p = ReplyParser::new(syntax.clone(), prompt);
            let mut events = p.push(reply);
            events.extend(p.finish(false));
            events
        };
        let events = parse(&out, "Oslo: check the tool.\n</think>\n\nIt is 12 C.");
        let text = |want: fn(&ReplyEvent) -> Option<&String>| -> String {
            events.iter().filter_map(want).map(String::as_str).collect()
        };
        let reasoning = text(|e| match e {
            ReplyEvent::Reasoning(r) => Some(r),
            _ => None,
        });
        let answer = text(|e| match e {
            ReplyEvent::Content(c) => Some(c),
            _ => None,
        });
        assert_eq!(reasoning.trim(), "Oslo: check the tool.");
        assert_eq!(answer, "It is 12 C.");
        let events = parse(
            &out,
            "Need the tool.</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nBergen\n</parameter>\n</function>\n</tool_call>",
        );
        assert!(matches!(&events[0], ReplyEvent::Reasoning(r) if r == "Need the tool."));
        assert!(events.iter().any(|e| matches!(e,
            ReplyEvent::ToolCall(c) if c.name == "get_weather" && c.arguments == r#"{"city":"Bergen"}"#)));
        // With thinking off the block is closed: the reply is the answer.
        let events = parse(&closed, "Hello!");
        assert!(matches!(&events[..], [ReplyEvent::Content(c)] if c == "Hello!"));
    }

    /// Granite 4.0's template as llama.cpp ships it (`models/templates/ibm-granite-granite-4.0.jinja`,
    /// Granite-4.0-H's) renders exactly as transformers 5.24's apply_chat_template: its default
    /// system message without one, tools listed as JSON in the system turn, a call as
    /// `<tool_call>` JSON and its result as a user turn's `<tool_response>`. A reply's
    /// `<tool_call>` block comes back as a call.
    #[test]
    fn granite4_template_renders_as_transformers() {
        use crate::reply::{ReplyEvent, ReplyParser, ReplySyntax, ToolSyntax};
        let Some(source) = fetched_template("ibm-granite-granite-4.0.jinja") else {
            return;
        };
        let t = ChatTemplate::new(&source, String::new(), "<|end_of_text|>".into()).unwrap();
        let out = render(
            &t,
            &[
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("user", "What is 2+2?"),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n\
             <|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n\
             <|start_of_role|>assistant<|end_of_role|>Hello!<|end_of_text|>\n\
             <|start_of_role|>user<|end_of_role|>What is 2+2?<|end_of_text|>\n\
             <|start_of_role|>assistant<|end_of_role|>"
        );
        let out = render(&t, &[msg("user", "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|start_of_role|>system<|end_of_role|>You are a helpful assistant. Please ensure \
             responses are professional, accurate, and safe.<|end_of_text|>\n\
             <|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n\
             <|start_of_role|>assistant<|end_of_role|>"
        );

        let tools = weather_tool();
        let call = weather_call();
        let opts = RenderOptions {
            tools: Some(&tools),
            kwargs: serde_json::Map::new(),
        };
        let out = t
            .render(
                &[msg("user", "Weather in Oslo?"), call, msg("tool", "12 C")],
                &opts,
            )
            .unwrap();
        let want = "<|start_of_role|>system<|end_of_role|>You are a helpful assistant with access to the following tools. You may call one or more tools to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a city\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\nFor each tool call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>. If a tool does not exist in the provided list of tools, notify the user that you do not have the ability to fulfill the request.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>Weather in Oslo?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|><tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|end_of_text|>\n<|start_of_role|>user<|end_of_role|>\n<tool_response>\n12 C\n</tool_response><|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>";
        assert_eq!(out, want);

        let syntax = ReplySyntax::of_template(&source);
        assert_eq!(syntax.tools, ToolSyntax::TaggedBlock);
        let mut p = ReplyParser::new(syntax, &out);
        let mut events = p.push(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Bergen\"}}\n</tool_call>",
        );
        events.extend(p.finish(false));
        assert!(events.iter().any(|e| matches!(e,
            ReplyEvent::ToolCall(c) if c.name == "get_weather" && c.arguments == r#"{"city":"Bergen"}"#)));
    }

    /// gpt-oss's template as llama.cpp ships it (`models/templates/openai-gpt-oss-120b.jinja`,
    /// fetched by scripts/fixtures/fetch_llama_cpp_files.sh; it calls transformers'
    /// `strftime_now`) renders exactly as transformers' apply_chat_template renders it (the
    /// expected text is transformers 5.24's output, today's date aside), an earlier turn's
    /// `reasoning_content` reaching it as `thinking`; it is recognised as Harmony.
    #[test]
    fn gpt_oss_template_renders_as_transformers() {
        let Some(source) = fetched_template("openai-gpt-oss-120b.jinja") else {
            return;
        };
        let t = ChatTemplate::new(&source, "<|startoftext|>".into(), "<|return|>".into()).unwrap();
        assert!(t.is_harmony());
        let mut answer = msg("assistant", "Hi!");
        answer.reasoning_content = Some("User greets.".into());
        let out = render(
            &t,
            &[
                msg("system", "You are terse."),
                msg("user", "Say hi"),
                answer,
                msg("user", "Again <b>&</b>"),
            ],
        )
        .unwrap();
        let date = ChatTemplate::new(
            "{{ strftime_now('%Y-%m-%d') }}",
            String::new(),
            String::new(),
        );
        let today = render(&date.unwrap(), &[msg("user", "u")]).unwrap();
        let want = "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: DATE\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>developer<|message|># Instructions\n\nYou are terse.\n\n<|end|><|start|>user<|message|>Say hi<|end|><|start|>assistant<|channel|>final<|message|>Hi!<|end|><|start|>user<|message|>Again <b>&</b><|end|><|start|>assistant";
        assert_eq!(out, want.replace("DATE", &today));
        let out = render(&t, &[msg("user", "x")]).unwrap();
        assert!(out.ends_with("<|end|><|start|>user<|message|>x<|end|><|start|>assistant"));
        assert!(!out.contains("<|start|>developer"));
        // Not Harmony: the fixtures' ChatML.
        assert!(
            !ChatTemplate::new(FIXTURE_CHATML, String::new(), String::new())
                .unwrap()
                .is_harmony()
        );
    }
}
