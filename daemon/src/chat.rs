//! Chat templates: the GGUF's `tokenizer.chat_template`, rendered by minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string
//! methods, and the globals and filters transformers adds: `raise_exception`, `strftime_now`,
//! its `tojson`), with `add_generation_prompt = true`.

use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::api::{message_text, ApiError, ChatMessage};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    harmony: bool,
}

/// transformers' `strftime_now(format)`: the local time in Python's strftime format (gpt-oss's
/// template writes the current date with it).
fn strftime_now(format: String) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    use std::fmt::Write;
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(
        out,
        "{}",
        chrono::Local::now().format_with_items(items.into_iter())
    )
    .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime_now failed"))?;
    Ok(out)
}

/// Python's `json.dumps` separators without `indent`: `", "` between items, `": "` after keys.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=indent)`, so no HTML
/// escaping and Python's separators (minijinja's own `tojson` escapes `<`, `>`, `&`, `'` and
/// writes compact JSON).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let bad = |e: serde_json::Error| Error::new(ErrorKind::InvalidOperation, e.to_string());
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(&value, &mut ser).map_err(bad)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonJson);
            serde::Serialize::serialize(&value, &mut ser).map_err(bad)?;
        }
    }
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
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
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            harmony: crate::harmony::is_harmony_template(source),
        })
    }

    /// Whether replies come in gpt-oss's Harmony format (reasoning and answer on channels).
    pub fn is_harmony(&self) -> bool {
        self.harmony
    }

    /// The prompt text for `messages`, ending with the assistant's turn opening.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::param("messages", "`messages` must not be empty"));
        }
        let mut msgs = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
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
            let content = message_text(i, m)?;
            let mut msg = context! { role => m.role, content => content };
            if let Some(name) = &m.name {
                msg = context! { name => name, ..msg };
            }
            // transformers passes a message's reasoning under both names (gpt-oss's template
            // reads `thinking`).
            if let Some(r) = &m.reasoning_content {
                msg = context! { thinking => r, reasoning_content => r, ..msg };
            }
            msgs.push(msg);
        }
        let tmpl = self.env.get_template("chat").map_err(|e| {
            ApiError::status(hyper::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })?;
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: Some(json!(content)),
            name: None,
            reasoning_content: None,
        }
    }

    /// The fixtures' ChatML template, as moe-convert stores it.
    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn chatml() {
        let t = ChatTemplate::new(CHATML, String::new(), "<|im_end|>".into()).unwrap();
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(t.render(&[]).is_err());
        assert_eq!(
            t.render(&[msg("wizard", "x")])
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].role")
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        // Shaped like Mistral/Llama templates: strip(), bos_token, raise_exception, loop.index0.
        let src = "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>".into(), "</s>".into()).unwrap();
        let out = t
            .render(&[
                msg("user", "  hi  "),
                msg("assistant", "yo"),
                msg("user", "q"),
            ])
            .unwrap();
        assert_eq!(out, "<s>[INST] hi [/INST]yo</s>[INST] q [/INST]");
        let e = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert!(e.message.contains("roles must alternate"), "{}", e.message);
        assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST);
    }

    /// llama.cpp's copy of a model's real chat template (fetched with llama.cpp's tokenizer
    /// vectors by scripts/fixtures/fetch_llama_vocab.sh), or None with a note when it is
    /// missing (a failure with MOE_EDGE_REQUIRE_VOCAB=1, as in CI).
    fn real_template(name: &str) -> Option<String> {
        let dir = match std::env::var_os("MOE_EDGE_VOCAB_DIR") {
            Some(d) => std::path::PathBuf::from(d),
            None => {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vocab")
            }
        };
        let path = dir.join("templates").join(format!("{name}.jinja"));
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s),
            Err(e) => {
                let note = format!(
                    "{}: {e}; run scripts/fixtures/fetch_llama_vocab.sh",
                    path.display()
                );
                assert!(
                    std::env::var("MOE_EDGE_REQUIRE_VOCAB").as_deref() != Ok("1"),
                    "{note}"
                );
                eprintln!("skipped: {note}");
                None
            }
        }
    }

    /// gpt-oss's template (it calls transformers' `strftime_now`, which used to fail as
    /// "undefined is not callable") renders exactly as transformers' apply_chat_template renders
    /// it (the expected text is transformers 5.24's output, today's date aside), and is
    /// recognised as Harmony.
    #[test]
    fn gpt_oss_template_renders_as_transformers() {
        let Some(src) = real_template("openai-gpt-oss-120b") else {
            return;
        };
        let t = ChatTemplate::new(&src, "<|startoftext|>".into(), "<|return|>".into()).unwrap();
        assert!(t.is_harmony());
        let mut answer = msg("assistant", "Hi!");
        answer.reasoning_content = Some("User greets.".into());
        let out = t
            .render(&[
                msg("system", "You are terse."),
                msg("user", "Say hi"),
                answer,
                msg("user", "Again <b>&</b>"),
            ])
            .unwrap();
        let today = chrono::Local::now().format("%Y-%m-%d").to_string();
        let want = "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: DATE\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>developer<|message|># Instructions\n\nYou are terse.\n\n<|end|><|start|>user<|message|>Say hi<|end|><|start|>assistant<|channel|>final<|message|>Hi!<|end|><|start|>user<|message|>Again <b>&</b><|end|><|start|>assistant";
        assert_eq!(out, want.replace("DATE", &today));
        let out = t.render(&[msg("user", "x")]).unwrap();
        assert!(out.ends_with("<|end|><|start|>user<|message|>x<|end|><|start|>assistant"));
        assert!(!out.contains("<|start|>developer"));
    }

    #[test]
    fn transformers_globals_and_filters() {
        let src = "{{ strftime_now('%Y') }}|{{ {'a': [1, 'x<y'], 'b': none} | tojson }}|{{ [1] | tojson(indent=2) }}";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        let year = chrono::Local::now().format("%Y").to_string();
        assert_eq!(
            t.render(&[msg("user", "u")]).unwrap(),
            format!("{year}|{{\"a\": [1, \"x<y\"], \"b\": null}}|[\n  1\n]")
        );
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", String::new(), String::new());
        assert!(bad.unwrap().render(&[msg("user", "u")]).is_err());
    }
}
