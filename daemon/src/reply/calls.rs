//! Tool-call blocks in the syntax of each family: where a block starts and ends in the reply,
//! and the calls it holds.

use serde_json::{Map, Value};

/// A call the model made: the function's name and its arguments as JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// How a family writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolSyntax {
    None,
    /// `<tool_call>...</tool_call>`, holding JSON `{"name", "arguments"}` (Hermes, Qwen2.5/3,
    /// Granite 4), `<function=NAME><parameter=K>V</parameter></function>` (Qwen3-Coder,
    /// Qwen3.5), or `NAME<arg_key>K</arg_key><arg_value>V</arg_value>` (GLM-4.5/4.6).
    TaggedBlock,
    /// DeepSeek-V3/R1 and V3.1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>...<｜tool▁calls▁end｜>`.
    DeepSeek,
    /// Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:I
    /// <|tool_call_argument_begin|>ARGS<|tool_call_end|>...<|tool_calls_section_end|>`.
    Kimi,
    /// Mistral: `[TOOL_CALLS][{"name", "arguments", "id"}...]` or `[TOOL_CALLS]NAME[ARGS]{...}`.
    Mistral,
    /// Granite 3.x: `<|tool_call|>[{"name", "arguments"}...]`.
    Granite,
    /// LFM2: `<|tool_call_start|>[name(key="value", ...), ...]<|tool_call_end|>`.
    Lfm2,
    /// gpt-oss: a Harmony message to `functions.NAME` (parsed by the Harmony parser).
    Harmony,
}

pub(super) const TOOL_CALL: (&str, &str) = ("<tool_call>", "</tool_call>");
pub(super) const DEEPSEEK: (&str, &str) = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>");
pub(super) const DEEPSEEK_CALL: (&str, &str) = ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>");
pub(super) const DEEPSEEK_SEP: &str = "<｜tool▁sep｜>";
pub(super) const KIMI: (&str, &str) =
    ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>");
pub(super) const KIMI_CALL: (&str, &str) = ("<|tool_call_begin|>", "<|tool_call_end|>");
pub(super) const KIMI_ARGS: &str = "<|tool_call_argument_begin|>";
pub(super) const MISTRAL: &str = "[TOOL_CALLS]";
pub(super) const MISTRAL_ARGS: &str = "[ARGS]";
pub(super) const GRANITE: &str = "<|tool_call|>";
pub(super) const LFM2: (&str, &str) = ("<|tool_call_start|>", "<|tool_call_end|>");
/// LFM2's tool list in the system turn: LFM2-8B-A1B's template lists tools but never writes a
/// call marker (replies carry them).
pub(super) const LFM2_TOOL_LIST: &str = "<|tool_list_start|>";

impl ToolSyntax {
    /// The syntax a chat template's markers reveal.
    pub fn of_template(source: &str) -> Self {
        let has = |m: &str| source.contains(m);
        if has(DEEPSEEK.0) {
            Self::DeepSeek
        } else if has(KIMI.0) {
            Self::Kimi
        } else if has(MISTRAL) {
            Self::Mistral
        } else if has(LFM2.0) || has(LFM2_TOOL_LIST) {
            Self::Lfm2
        } else if has(GRANITE) {
            Self::Granite
        } else if has(TOOL_CALL.0) {
            Self::TaggedBlock
        } else {
            Self::None
        }
    }

    /// The markers that start a block.
    pub fn starts(self) -> Vec<&'static str> {
        match self {
            Self::None | Self::Harmony => vec![],
            Self::TaggedBlock => vec![TOOL_CALL.0],
            // Some DeepSeek and Kimi replies omit the section marker around a single call.
            Self::DeepSeek => vec![DEEPSEEK.0, DEEPSEEK_CALL.0],
            Self::Kimi => vec![KIMI.0, KIMI_CALL.0],
            Self::Mistral => vec![MISTRAL],
            Self::Granite => vec![GRANITE],
            Self::Lfm2 => vec![LFM2.0],
        }
    }

    /// Where the block at the start of `text` ends (exclusive), once it is complete; `last`:
    /// the reply ended, which closes a block that runs to the end.
    pub fn block_end(self, text: &str, last: bool) -> Option<usize> {
        let closed_by = |start: &str, end: &str| -> Option<usize> {
            text.get(start.len()..)?
                .find(end)
                .map(|at| start.len() + at + end.len())
        };
        match self {
            Self::None | Self::Harmony => Some(0),
            Self::TaggedBlock => closed_by(TOOL_CALL.0, TOOL_CALL.1),
            Self::DeepSeek | Self::Kimi => {
                let (section, call) = if self == Self::DeepSeek {
                    (DEEPSEEK, DEEPSEEK_CALL)
                } else {
                    (KIMI, KIMI_CALL)
                };
                if text.starts_with(section.0) {
                    closed_by(section.0, section.1).or_else(|| last.then_some(text.len()))
                } else {
                    closed_by(call.0, call.1)
                }
            }
            Self::Lfm2 => closed_by(LFM2.0, LFM2.1),
            Self::Granite => json_end(text, GRANITE).or_else(|| last.then_some(text.len())),
            Self::Mistral => {
                let rest = &text[MISTRAL.len().min(text.len())..];
                if rest.trim_start().starts_with('[') || rest.trim().is_empty() {
                    json_end(text, MISTRAL)
                } else {
                    let args = rest.find(MISTRAL_ARGS)?;
                    json_end(text, &text[..MISTRAL.len() + args + MISTRAL_ARGS.len()])
                }
                .or_else(|| last.then_some(text.len()))
            }
        }
    }

    /// The calls a complete block holds (None: it is not a well-formed block).
    pub fn parse(self, block: &str) -> Option<Vec<ToolCall>> {
        match self {
            Self::None | Self::Harmony => None,
            Self::TaggedBlock => {
                let inner = block.strip_prefix(TOOL_CALL.0)?.strip_suffix(TOOL_CALL.1)?;
                tagged_call(inner.trim()).map(|c| vec![c])
            }
            Self::DeepSeek => {
                let inner = block
                    .strip_prefix(DEEPSEEK.0)
                    .map(|b| b.strip_suffix(DEEPSEEK.1).unwrap_or(b))
                    .unwrap_or(block);
                each_between(inner, DEEPSEEK_CALL)
                    .into_iter()
                    .map(deepseek_call)
                    .collect()
            }
            Self::Kimi => {
                let inner = block
                    .strip_prefix(KIMI.0)
                    .map(|b| b.strip_suffix(KIMI.1).unwrap_or(b))
                    .unwrap_or(block);
                each_between(inner, KIMI_CALL)
                    .into_iter()
                    .map(|call| {
                        let (id, args) = call.split_once(KIMI_ARGS)?;
                        let name = id.trim().strip_prefix("functions.").unwrap_or(id.trim());
                        let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
                        json_call(name, args)
                    })
                    .collect()
            }
            Self::Mistral => {
                let rest = block.strip_prefix(MISTRAL)?.trim();
                if rest.starts_with('[') {
                    json_list(rest)
                } else {
                    let mut calls = Vec::new();
                    for part in rest.split(MISTRAL).filter(|p| !p.trim().is_empty()) {
                        let (name, args) = part.split_once(MISTRAL_ARGS)?;
                        calls.push(json_call(name.trim(), args)?);
                    }
                    Some(calls)
                }
            }
            Self::Granite => json_list(block.strip_prefix(GRANITE)?.trim()),
            Self::Lfm2 => {
                let inner = block.strip_prefix(LFM2.0)?.strip_suffix(LFM2.1)?;
                pythonic_calls(inner.trim())
            }
        }
    }
}

/// Where the JSON value after `prefix` (which `text` starts with) ends.
fn json_end(text: &str, prefix: &str) -> Option<usize> {
    let rest = text.get(prefix.len()..)?;
    let skipped = rest.len() - rest.trim_start().len();
    let mut stream = serde_json::Deserializer::from_str(&rest[skipped..]).into_iter::<Value>();
    match stream.next() {
        Some(Ok(_)) => Some(prefix.len() + skipped + stream.byte_offset()),
        _ => None,
    }
}

/// The pieces of `text` between each `open` and the following `close`.
fn each_between<'t>(text: &'t str, (open, close): (&str, &str)) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(open) {
        rest = &rest[at + open.len()..];
        let end = rest.find(close).unwrap_or(rest.len());
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

/// A call from a name and arguments given as JSON text (an object).
fn json_call(name: &str, args: &str) -> Option<ToolCall> {
    let args: Value = serde_json::from_str(args.trim()).ok()?;
    args.is_object().then(|| ToolCall {
        name: name.to_string(),
        arguments: args.to_string(),
    })
}

/// `{"name": ..., "arguments": {...} or "..."}`.
fn object_call(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?;
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(v) => v.clone(),
    };
    args.is_object().then(|| ToolCall {
        name: name.to_string(),
        arguments: args.to_string(),
    })
}

/// A JSON list of call objects.
fn json_list(text: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Array(items) => items.iter().map(object_call).collect(),
        v @ Value::Object(_) => object_call(&v).map(|c| vec![c]),
        _ => None,
    }
}

/// One call inside `<tool_call>`: JSON, Qwen's `<function=...>` XML, or GLM's argument tags.
fn tagged_call(inner: &str) -> Option<ToolCall> {
    if inner.starts_with('{') {
        return object_call(&serde_json::from_str(inner).ok()?);
    }
    if let Some(rest) = inner.strip_prefix("<function=") {
        let (name, body) = rest.split_once('>')?;
        let body = body.trim().strip_suffix("</function>")?;
        let mut args = Map::new();
        for param in each_between(body, ("<parameter=", "</parameter>")) {
            let (key, value) = param.split_once('>')?;
            args.insert(key.trim().to_string(), xml_value(value));
        }
        return Some(ToolCall {
            name: name.trim().to_string(),
            arguments: Value::Object(args).to_string(),
        });
    }
    // GLM: NAME, then <arg_key>K</arg_key><arg_value>V</arg_value> pairs.
    let name_end = inner.find("<arg_key>").unwrap_or(inner.len());
    let name = inner[..name_end].trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let mut args = Map::new();
    let keys = each_between(&inner[name_end..], ("<arg_key>", "</arg_key>"));
    let values = each_between(&inner[name_end..], ("<arg_value>", "</arg_value>"));
    if keys.len() != values.len() {
        return None;
    }
    for (k, v) in keys.into_iter().zip(values) {
        args.insert(k.trim().to_string(), xml_value(v));
    }
    Some(ToolCall {
        name: name.to_string(),
        arguments: Value::Object(args).to_string(),
    })
}

/// A parameter's value written between tags: the templates write strings as they are and other
/// values as JSON, so JSON that is not a plain string is taken as such.
fn xml_value(text: &str) -> Value {
    let t = text.strip_prefix('\n').unwrap_or(text);
    let t = t.strip_suffix('\n').unwrap_or(t);
    match serde_json::from_str::<Value>(t) {
        Ok(v @ (Value::Object(_) | Value::Array(_) | Value::Number(_) | Value::Bool(_))) => v,
        Ok(Value::Null) => Value::Null,
        _ => Value::String(t.to_string()),
    }
}

/// DeepSeek: `NAME<｜tool▁sep｜>{args}` (V3.1) or `function<｜tool▁sep｜>NAME\n```json\n{args}\n```` (V3, R1).
fn deepseek_call(call: &str) -> Option<ToolCall> {
    let (kind, rest) = call.split_once(DEEPSEEK_SEP)?;
    if kind.trim() == "function" {
        let (name, args) = rest.split_once('\n')?;
        let args = args.trim();
        let args = args
            .strip_prefix("```json")
            .or_else(|| args.strip_prefix("```"))
            .unwrap_or(args);
        let args = args.trim().strip_suffix("```").unwrap_or(args);
        json_call(name.trim(), args)
    } else {
        json_call(kind.trim(), rest)
    }
}

/// LFM2's Python-style list of calls: `[name(key="value", n=1), other()]`.
fn pythonic_calls(text: &str) -> Option<Vec<ToolCall>> {
    let mut p = PyParser { s: text, at: 0 };
    p.expect('[')?;
    let mut calls = Vec::new();
    loop {
        p.ws();
        if p.eat(']') {
            break;
        }
        let name = p.ident()?;
        p.expect('(')?;
        let mut args = Map::new();
        loop {
            p.ws();
            if p.eat(')') {
                break;
            }
            let key = p.ident()?;
            p.ws();
            p.expect('=')?;
            let value = p.value()?;
            args.insert(key, value);
            p.ws();
            if !p.eat(',') {
                p.ws();
                p.expect(')')?;
                break;
            }
        }
        calls.push(ToolCall {
            name,
            arguments: Value::Object(args).to_string(),
        });
        p.ws();
        if !p.eat(',') {
            p.ws();
            p.expect(']')?;
            break;
        }
    }
    Some(calls)
}

/// Four hex digits of a `\\u` escape.
fn hex4(chars: &mut impl Iterator<Item = (usize, char)>) -> Option<u32> {
    let h: String = (0..4)
        .map(|_| chars.next().map(|c| c.1))
        .collect::<Option<_>>()?;
    u32::from_str_radix(&h, 16).ok()
}

/// Python literals, as far as tool arguments use them.
struct PyParser<'s> {
    s: &'s str,
    at: usize,
}

impl<'s> PyParser<'s> {
    fn rest(&self) -> &'s str {
        &self.s[self.at..]
    }

    fn ws(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        if self.rest().starts_with(c) {
            self.at += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Option<()> {
        self.ws();
        self.eat(c).then_some(())
    }

    fn ident(&mut self) -> Option<String> {
        self.ws();
        let rest = self.rest();
        let n = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        (n > 0).then(|| {
            self.at += n;
            rest[..n].to_string()
        })
    }

    fn value(&mut self) -> Option<Value> {
        self.ws();
        let rest = self.rest();
        let quote = rest.chars().next()?;
        if quote == '"' || quote == '\'' {
            let mut out = String::new();
            let mut chars = rest[1..].char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        let (_, e) = chars.next()?;
                        out.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            'b' => '\u{8}',
                            'f' => '\u{c}',
                            // JSON's \uXXXX (a grammar writes JSON strings), surrogate pairs
                            // included.
                            'u' => {
                                let hi = hex4(&mut chars)?;
                                if (0xD800..0xDC00).contains(&hi) {
                                    let (_, b) = chars.next()?;
                                    let (_, u) = chars.next()?;
                                    let lo = if (b, u) == ('\\', 'u') {
                                        hex4(&mut chars)?
                                    } else {
                                        return None;
                                    };
                                    char::from_u32(
                                        0x10000
                                            + ((hi - 0xD800) << 10)
                                            + (lo.checked_sub(0xDC00)?),
                                    )?
                                } else {
                                    char::from_u32(hi)?
                                }
                            }
                            other => other,
                        });
                    }
                    c if c == quote => {
                        self.at += 1 + i + 1;
                        return Some(Value::String(out));
                    }
                    c => out.push(c),
                }
            }
            return None;
        }
        if self.eat('[') {
            let mut items = Vec::new();
            loop {
                self.ws();
                if self.eat(']') {
                    return Some(Value::Array(items));
                }
                items.push(self.value()?);
                self.ws();
                if !self.eat(',') {
                    self.expect(']')?;
                    return Some(Value::Array(items));
                }
            }
        }
        if self.eat('{') {
            let mut map = Map::new();
            loop {
                self.ws();
                if self.eat('}') {
                    return Some(Value::Object(map));
                }
                let key = match self.value()? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                self.expect(':')?;
                map.insert(key, self.value()?);
                self.ws();
                if !self.eat(',') {
                    self.expect('}')?;
                    return Some(Value::Object(map));
                }
            }
        }
        let n = rest
            .find(|c: char| matches!(c, ',' | ')' | ']' | '}') || c.is_whitespace())
            .unwrap_or(rest.len());
        let word = &rest[..n];
        self.at += n;
        match word {
            "True" | "true" => Some(Value::Bool(true)),
            "False" | "false" => Some(Value::Bool(false)),
            "None" | "null" => Some(Value::Null),
            w => serde_json::from_str::<serde_json::Number>(w)
                .ok()
                .map(Value::Number),
        }
    }
}
