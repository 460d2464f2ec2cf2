//! Tool-call grammars: free text or calls in the model's own wrapper (`<tool_call>` ...
//! `</tool_call>` for Hermes/Qwen, `<|python_tag|>` for Llama 3, ...), each call's JSON held to
//! one of the tools' schemas. Built as Lark for a vocabulary, since a wrapper the vocabulary has
//! as a special token is matched as that token and otherwise as text.
//!
//! - `Auto`, special-token wrapper: text never contains the token, so the token starts a call.
//! - `Auto`, text wrapper: a lazy lexeme matches the shortest text ending in the opening
//!   marker (llama.cpp's lazy grammar with a trigger word, in one grammar): free text until the
//!   marker, the schema after it.
//! - `Required`: calls only (at least one), so plain text and an early end are masked.

use serde_json::{json, Value};

use super::{GrammarError, GrammarVocab};

/// JSON whitespace inside a call: at most one space.
const CALL_WHITESPACE: &str = r"\x20?";

/// Whether the model may answer in text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text, calls, or both (OpenAI's `auto`).
    Auto,
    /// At least one call and nothing else (OpenAI's `required`, or a named function with one
    /// schema).
    Required,
}

/// A grammar for a model's tool calls.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCallGrammar {
    /// What opens a call, such as `<tool_call>`.
    pub open: String,
    /// What closes it, such as `</tool_call>` (may be empty).
    pub close: String,
    /// The JSON schema of each possible call's text between the markers, such as
    /// `{"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments":
    /// {...}}, "required": ["name", "arguments"]}`.
    pub calls: Vec<Value>,
    pub choice: ToolChoice,
    /// Several calls in one answer (OpenAI's `parallel_tool_calls`).
    pub parallel: bool,
    /// The markers of a reasoning block the model may write first, such as `<think>` and
    /// `</think>`.
    pub reasoning: Option<(String, String)>,
}

impl ToolCallGrammar {
    /// The grammar in llguidance's Lark syntax, for `vocab`.
    pub fn to_lark(&self, vocab: &GrammarVocab) -> Result<String, GrammarError> {
        if self.calls.is_empty() {
            return Err(GrammarError::Compile(
                "a tool-call grammar needs tools".into(),
            ));
        }
        if self.open.is_empty() {
            return Err(GrammarError::Compile(
                "a tool-call grammar needs the marker that opens a call".into(),
            ));
        }
        let mut schema = if self.calls.len() == 1 {
            self.calls[0].clone()
        } else {
            json!({"anyOf": self.calls})
        };
        // Tool schemas from clients are often loose: keywords llguidance cannot enforce are
        // ignored rather than refused. Calls are one line of JSON, as the families' templates
        // write them, so a model cannot spend its tokens on whitespace.
        if let Some(obj) = schema.as_object_mut() {
            obj.insert(
                "x-guidance".into(),
                json!({"whitespace_pattern": CALL_WHITESPACE, "lenient": true}),
            );
        }
        let marker = |m: &str| match vocab.special_token(m) {
            Some(id) => format!("<[{id}]>"),
            None => lark_string(m),
        };
        let open_special = vocab.special_token(&self.open).is_some();
        let close = if self.close.is_empty() {
            "\"\"".to_string()
        } else {
            marker(&self.close)
        };
        let calls = if self.parallel { "*" } else { "?" };
        let mut g = String::new();
        let start = match (self.choice, open_special) {
            (ToolChoice::Required, _) => {
                let more = if self.parallel { " (WS block)*" } else { "" };
                format!("block{more}")
            }
            (ToolChoice::Auto, true) => format!("TEXT (block TEXT){calls}"),
            (ToolChoice::Auto, false) => {
                g.push_str(&format!(
                    "head[lazy]: TEXT {}\ntext_call: head WS call WS {close}\n",
                    lark_string(&self.open)
                ));
                format!("text_call{calls} TEXT")
            }
        };
        match &self.reasoning {
            Some((think_open, think_close)) => {
                let think = match (
                    vocab.special_token(think_open),
                    vocab.special_token(think_close),
                ) {
                    (Some(a), Some(b)) => format!("<[{a}]> TEXT <[{b}]>"),
                    _ => {
                        g.push_str(&format!(
                            "think_end[lazy]: TEXT {}\n",
                            lark_string(think_close)
                        ));
                        format!("{} think_end", marker(think_open))
                    }
                };
                g.insert_str(0, &format!("start: ({think} WS)? {start}\n"));
            }
            None => g.insert_str(0, &format!("start: {start}\n")),
        }
        g.push_str(&format!(
            "block: {} WS call WS {close}\ncall: %json {schema}\nTEXT: /(.|\\n)*/\nWS: /[ \\t\\r\\n]{{0,4}}/\n",
            marker(&self.open)
        ));
        Ok(g)
    }
}

/// A Lark string literal.
fn lark_string(s: &str) -> String {
    // JSON's string syntax is Lark's (llguidance reads it with serde_json), except that DEL
    // must be escaped.
    Value::String(s.to_string())
        .to_string()
        .replace('\u{7f}', "\\u007f")
}
