//! Chat templates: the GGUF's `tokenizer.chat_template`, rendered by minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`), with `add_generation_prompt = true`.

use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::api::{message_text, ApiError, ChatMessage};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
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
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
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
            msgs.push(match &m.name {
                Some(name) => context! { role => m.role, content => content, name => name },
                None => context! { role => m.role, content => content },
            });
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

    /// A folder of the repository's `tests/`, from this crate.
    fn repo_tests() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests")
    }

    /// GLM-4.5/4.6's template as llama.cpp ships it (`models/templates/GLM-4.6.jinja`, fetched
    /// beside llama.cpp's tokenizer vectors by scripts/fixtures/fetch_llama_vocab.sh). The
    /// expected texts are transformers' renderings of the same messages: an earlier turn's
    /// reasoning dropped, `<|observation|>` before tool output, no newline after a turn.
    #[test]
    fn glm_4_6_template_renders_as_transformers() {
        let dir = match std::env::var_os("MOE_EDGE_VOCAB_DIR") {
            Some(d) => std::path::PathBuf::from(d),
            None => repo_tests().join("fixtures/vocab"),
        };
        let path = dir.join("templates/GLM-4.6.jinja");
        let Ok(source) = std::fs::read_to_string(&path) else {
            let note = format!(
                "{} is missing: run scripts/fixtures/fetch_llama_vocab.sh",
                path.display()
            );
            assert!(
                std::env::var("MOE_EDGE_REQUIRE_VOCAB").as_deref() != Ok("1"),
                "{note} (MOE_EDGE_REQUIRE_VOCAB=1)"
            );
            eprintln!("note: skipping: {note}");
            return;
        };
        let t = ChatTemplate::new(&source, String::new(), "<|endoftext|>".into()).unwrap();
        let out = t
            .render(&[
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("assistant", "<think>greet back</think>Hello!"),
                msg("user", "What is 2+2?"),
            ])
            .unwrap();
        assert_eq!(
            out,
            "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello!\
             <|user|>\nWhat is 2+2?<|assistant|>"
        );
        let out = t
            .render(&[
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("tool", "42"),
                msg("user", "ok"),
            ])
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
            t.render(&messages).unwrap(),
            example["rendered"].as_str().unwrap()
        );
        let out = t
            .render(&[
                msg("system", "Be brief."),
                msg("user", "Hi"),
                msg("assistant", "Hello!"),
                msg("user", "Bye"),
            ])
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
}
