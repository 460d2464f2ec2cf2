//! Tool-call grammars: free text or calls in the model family's own syntax (`<tool_call>` JSON
//! for Hermes/Qwen, DeepSeek's and Kimi's marker tokens, Qwen3-Coder's XML parameters, ...),
//! each call's arguments held to its tool's schema. A call is described as [`CallPart`]s (the
//! family's markers, JSON values, free text up to a marker), so one builder serves every
//! family. Built as Lark for a vocabulary, since a marker the vocabulary has as a special token
//! is matched as that token and otherwise as text.
//!
//! - `Auto`, calls start with a special token: text never contains the token, so the token
//!   starts the calls.
//! - `Auto`, calls start with text: a lazy lexeme matches the shortest text ending in the
//!   opening marker (llama.cpp's lazy grammar with a trigger word, in one grammar): free text
//!   until the marker, the calls' grammar after it.
//! - `Required`: calls only (at least one), after an optional reasoning block, so plain text
//!   and an early end are masked.

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

/// A piece of a call's text.
#[derive(Clone, Debug, PartialEq)]
pub enum CallPart {
    /// This text; when all of it is one special token of the vocabulary, that token.
    Lit(String),
    /// A JSON value valid against this schema, on one line.
    Json(Value),
    /// Free text (of at most `max` characters), then the marker `end`: a parameter's string
    /// value in XML-style forms, or reasoning.
    TextUntil { end: String, max: Option<usize> },
    /// A decimal number (Kimi-K2's call index).
    Digits,
    /// Up to four spaces, tabs or newlines.
    Ws,
    /// This, or nothing.
    Opt(Vec<CallPart>),
    /// One of these.
    Alt(Vec<Vec<CallPart>>),
}

/// A grammar for a model's tool calls.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCallGrammar {
    /// What comes before the calls of an answer, such as DeepSeek's `<｜tool▁calls▁begin｜>`
    /// (empty: the calls start with their own marker).
    pub section_open: Vec<CallPart>,
    /// What comes after them.
    pub section_close: Vec<CallPart>,
    /// Each possible call, from its opening marker to its closing one: one per tool the request
    /// allows. In `Auto`, every call (without a section) starts with the same `Lit`.
    pub calls: Vec<Vec<CallPart>>,
    /// Between two calls.
    pub separator: Vec<CallPart>,
    pub choice: ToolChoice,
    /// Several calls in one answer (OpenAI's `parallel_tool_calls`).
    pub parallel: bool,
    /// A reasoning block the model may write first (such as `<think>`, free text up to
    /// `</think>`); `true`: it must (the prompt opened it, so it has no opening marker here).
    pub reasoning: Option<(Vec<CallPart>, bool)>,
}

impl ToolCallGrammar {
    /// Calls written as JSON `{"name": ..., "arguments": {...}}` between `open` and `close`
    /// (Hermes, Qwen2.5/3): `calls` are the schemas of that object, one per tool.
    pub fn wrapped_json(open: &str, close: &str, calls: Vec<Value>, choice: ToolChoice) -> Self {
        let mut close_parts = vec![CallPart::Ws];
        if !close.is_empty() {
            close_parts.push(CallPart::Lit(close.into()));
        }
        Self {
            section_open: vec![],
            section_close: vec![],
            calls: calls
                .into_iter()
                .map(|schema| {
                    let mut c = vec![
                        CallPart::Lit(open.into()),
                        CallPart::Ws,
                        CallPart::Json(schema),
                    ];
                    c.extend(close_parts.iter().cloned());
                    c
                })
                .collect(),
            separator: vec![CallPart::Ws],
            choice,
            parallel: false,
            reasoning: None,
        }
    }

    /// The grammar in llguidance's Lark syntax, for `vocab`.
    pub fn to_lark(&self, vocab: &GrammarVocab) -> Result<String, GrammarError> {
        if self.calls.is_empty() || self.calls.iter().any(Vec::is_empty) {
            return Err(GrammarError::Compile(
                "a tool-call grammar needs tools".into(),
            ));
        }
        let mut b = Builder {
            vocab,
            rules: String::new(),
            n: 0,
        };
        let many = if self.parallel { "*" } else { "?" };
        let calls: Vec<String> = self
            .calls
            .iter()
            .map(|c| b.seq(c))
            .collect::<Result<_, _>>()?;
        let call = b.rule(&calls.join(" | "));
        let sep = b.seq(&self.separator)?;
        let more = if self.parallel {
            format!(" ({sep} {call})*")
        } else {
            String::new()
        };
        let open = b.seq(&self.section_open)?;
        let close = b.seq(&self.section_close)?;
        let body = match self.choice {
            ToolChoice::Required => format!("{open} {call}{more} {close}"),
            ToolChoice::Auto => {
                // The first marker of the calls triggers them.
                let (trigger, rest_open, rest_call) = match self.section_open.split_first() {
                    Some((CallPart::Lit(t), rest)) => (t.clone(), b.seq(rest)?, call.clone()),
                    Some(_) => return Err(no_trigger()),
                    None => {
                        let Some(CallPart::Lit(t)) = self.calls[0].first() else {
                            return Err(no_trigger());
                        };
                        let rests: Vec<String> = self
                            .calls
                            .iter()
                            .map(|c| match c.split_first() {
                                Some((CallPart::Lit(first), rest)) if first == t => b.seq(rest),
                                _ => Err(no_trigger()),
                            })
                            .collect::<Result<_, _>>()?;
                        (t.clone(), String::new(), b.rule(&rests.join(" | ")))
                    }
                };
                let calls = format!("{rest_open} {rest_call}{more} {close}");
                match vocab.special_token(&trigger) {
                    Some(id) => {
                        let block = b.rule(&format!("<[{id}]> {calls}"));
                        format!("TEXT ({block} TEXT){many}")
                    }
                    None => {
                        let head =
                            b.rule_with("[lazy]", &format!("TEXT {}", lark_string(&trigger)));
                        let block = b.rule(&format!("{head} {calls}"));
                        format!("({block}){many} TEXT")
                    }
                }
            }
        };
        let start = match &self.reasoning {
            Some((think, required)) => {
                let think = b.seq(think)?;
                if *required {
                    format!("{think} {body}")
                } else {
                    format!("({think})? {body}")
                }
            }
            None => body,
        };
        Ok(format!(
            "start: {start}\n{}TEXT: /(.|\\n)*/\nWS: /[ \\t\\r\\n]{{0,4}}/\nDIGITS: /[0-9]{{1,4}}/\n",
            b.rules
        ))
    }
}

fn no_trigger() -> GrammarError {
    GrammarError::Compile(
        "tool calls not chosen by the model must start with the same marker".into(),
    )
}

/// Lark rules for call parts.
struct Builder<'v> {
    vocab: &'v GrammarVocab,
    rules: String,
    n: usize,
}

impl Builder<'_> {
    /// A new rule with this body; its name.
    fn rule(&mut self, body: &str) -> String {
        self.rule_with("", body)
    }

    fn rule_with(&mut self, attrs: &str, body: &str) -> String {
        self.n += 1;
        let name = format!("r{}", self.n);
        self.rules.push_str(&format!("{name}{attrs}: {body}\n"));
        name
    }

    fn lit(&self, text: &str) -> String {
        match self.vocab.special_token(text) {
            Some(id) => format!("<[{id}]>"),
            None => lark_string(text),
        }
    }

    /// The parts in sequence, as a Lark expression.
    fn seq(&mut self, parts: &[CallPart]) -> Result<String, GrammarError> {
        let mut out = Vec::new();
        for p in parts {
            out.push(match p {
                CallPart::Lit(t) if t.is_empty() => continue,
                CallPart::Lit(t) => self.lit(t),
                CallPart::Json(schema) => {
                    let mut schema = schema.clone();
                    // Tool schemas from clients are often loose: keywords llguidance cannot
                    // enforce are ignored rather than refused. Values are one line of JSON, as
                    // the families' templates write them, so a model cannot spend its tokens
                    // on whitespace.
                    match schema.as_object_mut() {
                        Some(obj) => {
                            obj.insert(
                                "x-guidance".into(),
                                json!({"whitespace_pattern": CALL_WHITESPACE, "lenient": true}),
                            );
                        }
                        None => {
                            return Err(GrammarError::Schema(format!(
                                "a schema must be a JSON object, got {schema}"
                            )))
                        }
                    }
                    self.rule(&format!("%json {schema}"))
                }
                CallPart::TextUntil { end, max } => {
                    let text = match max {
                        Some(n) => format!("/(.|\\n){{0,{n}}}/"),
                        None => "TEXT".into(),
                    };
                    match self.vocab.special_token(end) {
                        // Text never holds the special token, so the token ends it.
                        Some(id) => format!("{text} <[{id}]>"),
                        // The shortest text that ends with the marker.
                        None => self.rule_with("[lazy]", &format!("{text} {}", lark_string(end))),
                    }
                }
                CallPart::Digits => "DIGITS".into(),
                CallPart::Ws => "WS".into(),
                CallPart::Opt(inner) => match self.seq(inner)? {
                    e if e.is_empty() => continue,
                    e => format!("({e})?"),
                },
                CallPart::Alt(alts) => {
                    let alts: Vec<String> =
                        alts.iter().map(|a| self.seq(a)).collect::<Result<_, _>>()?;
                    format!("({})", alts.join(" | "))
                }
            });
        }
        // Nothing at all, not `""`: an empty lexeme before free text keeps llguidance from
        // taking a special token after it.
        Ok(out.join(" "))
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
