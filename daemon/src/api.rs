//! OpenAI's API shapes: request parameters (serde), their validation, the error body, and the
//! JSON of responses and stream chunks for `/v1/completions` and `/v1/chat/completions`.

use hyper::StatusCode;
use moe_runtime::sampling::SamplerConfig;
use serde::Deserialize;
use serde_json::{json, Value};

/// The most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400, `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one parameter.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            503 => "unavailable_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        Self::new(status, kind, message)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, code: &'static str, retry_after: u32) -> Self {
        let mut e = Self::status(StatusCode::SERVICE_UNAVAILABLE, message).with_code(code);
        e.retry_after = Some(retry_after);
        e
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The parameters of both generation endpoints (`prompt` for completions, `messages` for chat).
/// Unknown fields are ignored, as llama.cpp's server does; known but unsupported ones are refused.
#[derive(Debug, Default, Deserialize)]
pub struct GenParams {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub logit_bias: Option<Value>,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
    /// llama.cpp's extension: do not stop at end-of-generation tokens.
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, an array of `{"type": "text", "text": ...}` parts, or null.
    pub content: Option<Value>,
    pub name: Option<String>,
    /// An earlier assistant turn's reasoning (also accepted as `thinking` or `reasoning`).
    #[serde(alias = "thinking", alias = "reasoning")]
    pub reasoning_content: Option<String>,
}

/// Validated sampling and stopping parameters.
#[derive(Debug, Clone)]
pub struct Validated {
    pub stream: bool,
    pub include_usage: bool,
    /// As requested; checked against the context once the prompt is known.
    pub max_tokens: Option<i64>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// Parses a request body, naming the offending field for type errors.
pub fn parse_body(bytes: &[u8]) -> Result<GenParams, ApiError> {
    // serde would also read a struct from an array (by position); only objects are requests.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => ApiError::invalid("the request body must be a JSON object"),
                Err(e) => ApiError::invalid(format!("the request body is not valid JSON: {e}")),
            },
        );
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, GenParams>(de) {
        Ok(p) => Ok(p),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(ApiError::invalid(format!(
                    "the request body is not valid JSON: {inner}"
                )))
            } else if path.is_empty() || path == "." {
                Err(ApiError::invalid(format!(
                    "the request body must be a JSON object: {inner}"
                )))
            } else {
                let field = path.split(['.', '[']).next().unwrap_or(&path).to_string();
                Err(ApiError::param(
                    &field,
                    format!("invalid `{path}`: {inner}"),
                ))
            }
        }
    }
}

fn in_range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::param(
            name,
            format!("`{name}` must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(v),
    }
}

/// Checks everything that does not need the model; defaults are llama.cpp's (as in moe-run).
pub fn validate(p: &GenParams, random_seed: u64) -> Result<Validated, ApiError> {
    let unsupported = |name: &str, why: &str| {
        Err(ApiError::param(
            name,
            format!("`{name}` is not supported by moed: {why}"),
        ))
    };
    if p.n.is_some_and(|n| n != 1) {
        return unsupported("n", "one choice per request (n = 1)");
    }
    if p.best_of.is_some_and(|n| n != 1) {
        return unsupported("best_of", "one candidate per request");
    }
    if p.echo == Some(true) {
        return unsupported("echo", "the prompt is not echoed");
    }
    if p.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return unsupported("suffix", "no insertion (fill-in-the-middle) mode");
    }
    let truthy = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
    };
    if truthy(&p.logprobs) || truthy(&p.top_logprobs) {
        return unsupported("logprobs", "log-probabilities are not returned yet");
    }
    if p.logit_bias
        .as_ref()
        .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty()))
    {
        return unsupported("logit_bias", "no logit bias");
    }
    if p.tools
        .as_ref()
        .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return unsupported("tools", "no tool calling yet");
    }
    if let Some(rf) = &p.response_format {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return unsupported("response_format", "only {\"type\": \"text\"}");
        }
    }
    for (name, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        in_range(name, v, -2.0, 2.0)?;
        if v.is_some_and(|v| v != 0.0) {
            return unsupported(name, "use repeat_penalty (llama.cpp's) instead");
        }
    }

    let d = SamplerConfig::default();
    let temperature = in_range("temperature", p.temperature, 0.0, 2.0)?.unwrap_or(d.temperature);
    let top_p = in_range("top_p", p.top_p, 0.0, 1.0)?.unwrap_or(d.top_p);
    let min_p = in_range("min_p", p.min_p, 0.0, 1.0)?.unwrap_or(d.min_p);
    let repeat_penalty =
        in_range("repeat_penalty", p.repeat_penalty, 0.01, 10.0)?.unwrap_or(d.repeat_penalty);
    let top_k = match p.top_k {
        None => d.top_k,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("`top_k` must be >= 0 (0 = off), got {k}"),
            ))
        }
    };
    let repeat_last_n = match p.repeat_last_n {
        None => d.repeat_last_n,
        Some(-1) => usize::MAX,
        Some(n) if n >= 0 => n as usize,
        Some(n) => {
            return Err(ApiError::param(
                "repeat_last_n",
                format!("`repeat_last_n` must be >= 0, or -1 for the whole context; got {n}"),
            ))
        }
    };
    let seed = match p.seed {
        None => random_seed,
        Some(s) if s < 0 => random_seed,
        Some(s) => s as u64,
    };

    let stop = match &p.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::param("stop", "`stop` must be a string or an array of strings")
            })?,
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!(
                "`stop` may hold at most {MAX_STOP} sequences, got {}",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::param(
            "stop",
            "stop sequences must be non-empty and at most 256 bytes",
        ));
    }

    let stream = p.stream.unwrap_or(false);
    let include_usage = stream
        && p.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    Ok(Validated {
        stream,
        include_usage,
        max_tokens: p.max_completion_tokens.or(p.max_tokens),
        sampler: SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n,
            seed,
        },
        stop,
        ignore_eos: p.ignore_eos.unwrap_or(false),
    })
}

/// How many tokens to generate: `requested` must lie in `1..=n_ctx` and fit after the prompt
/// (OpenAI's `context_length_exceeded`); without one, `default` capped by the room left.
pub fn resolve_max_tokens(
    requested: Option<i64>,
    default: Option<usize>,
    prompt_len: usize,
    n_ctx: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    let room = n_ctx.saturating_sub(prompt_len);
    if room == 0 {
        return Err(ApiError::param(
            prompt_param,
            format!(
                "This model's maximum context length is {n_ctx} tokens. However, your prompt \
                 is {prompt_len} tokens, which leaves no room to generate."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    match requested {
        None => Ok(default.map_or(room, |d| d.min(room))),
        Some(m) if m < 1 || m > n_ctx as i64 => Err(ApiError::param(
            "max_tokens",
            format!("`max_tokens` must be between 1 and the context length {n_ctx}, got {m}"),
        )
        .with_code("invalid_value")),
        Some(m) if m as usize > room => Err(ApiError::param(
            "max_tokens",
            format!(
                "This model's maximum context length is {n_ctx} tokens. However, you requested \
                 {} tokens ({prompt_len} in the prompt, {m} in the completion). Please reduce \
                 the prompt or max_tokens.",
                prompt_len + m as usize
            ),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m as usize),
    }
}

/// The text of a chat message's `content`: a string, text parts, or null.
pub fn message_text(i: usize, m: &ChatMessage) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match &m.content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (ty, _) => {
                        return Err(ApiError::param(
                            &param,
                            format!(
                                "content part of type {} is not supported (only text)",
                                ty.unwrap_or("?")
                            ),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::param(
            &param,
            "`content` must be a string, an array of text parts, or null",
        )),
    }
}

/// Which endpoint a generation serves; decides the JSON shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat_completions",
        }
    }

    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }
}

/// What identifies one response across its chunks.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// llama.cpp server's `timings` object, added to final responses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    pub prompt_ms: f64,
    pub predicted_ms: f64,
}

fn timings_json(usage: &Usage, t: &Timings) -> Value {
    let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    json!({
        "prompt_n": usage.prompt_tokens,
        "prompt_ms": t.prompt_ms,
        "prompt_per_second": per_s(usage.prompt_tokens, t.prompt_ms),
        "predicted_n": usage.completion_tokens,
        "predicted_ms": t.predicted_ms,
        "predicted_per_second": per_s(usage.completion_tokens, t.predicted_ms),
    })
}

impl ResponseMeta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": format!("moed-{}", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }

    /// The whole (non-streamed) response; a chat reply may carry the model's reasoning apart
    /// from its answer (`reasoning_content`, as llama.cpp's server returns it).
    pub fn response(
        &self,
        text: &str,
        reasoning: Option<&str>,
        finish: &str,
        usage: &Usage,
        t: &Timings,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut message = json!({"role": "assistant", "content": text});
                if let Some(r) = reasoning.filter(|r| !r.is_empty()) {
                    message["reasoning_content"] = r.into();
                }
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": finish,
                })
            }
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage.json();
        v["timings"] = timings_json(usage, t);
        v
    }

    /// A stream chunk: the role announcement (chat only, `role`), a piece of text, or the last
    /// chunk with its `finish` reason.
    pub fn chunk(&self, role: bool, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        self.envelope(true, json!([choice]))
    }

    /// A chat stream chunk carrying pieces of the reasoning and of the answer (either may be
    /// empty and is then left out of the delta).
    pub fn parts_chunk(&self, reasoning: &str, content: &str) -> Value {
        let mut delta = serde_json::Map::new();
        if !reasoning.is_empty() {
            delta.insert("reasoning_content".into(), reasoning.into());
        }
        if !content.is_empty() {
            delta.insert("content".into(), content.into());
        }
        let choice = json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null});
        self.envelope(true, json!([choice]))
    }

    /// The chunk `stream_options.include_usage` asks for: no choices, the usage.
    pub fn usage_chunk(&self, usage: &Usage, t: &Timings) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = usage.json();
        v["timings"] = timings_json(usage, t);
        v
    }
}

impl PartialEq for ApiError {
    fn eq(&self, other: &Self) -> bool {
        self.status == other.status && self.message == other.message && self.code == other.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<GenParams, ApiError> {
        parse_body(s.as_bytes())
    }

    #[test]
    fn malformed_and_mistyped_bodies() {
        let e = parse("{\"prompt\": ").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse("[1, 2]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{}", e.message);
        let e = parse(r#"{"prompt": "x", "max_tokens": "ten"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse(r#"{"messages": [{"role": 3}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{}", e.message);
        // Nulls are absent values, unknown fields are ignored.
        let p = parse(r#"{"prompt": "x", "temperature": null, "whatever": 1}"#).unwrap();
        assert!(p.temperature.is_none());
    }

    #[test]
    fn parameter_ranges_and_unsupported_features() {
        let ok = |s: &str| validate(&parse(s).unwrap(), 7);
        let v = ok(r#"{"temperature": 0, "seed": 5, "stop": "\n", "top_k": 3}"#).unwrap();
        assert_eq!(v.sampler.temperature, 0.0);
        assert_eq!(v.sampler.seed, 5);
        assert_eq!(v.sampler.top_k, 3);
        assert_eq!(v.stop, vec!["\n".to_string()]);
        assert_eq!(ok("{}").unwrap().sampler.seed, 7);
        assert_eq!(ok(r#"{"seed": -1}"#).unwrap().sampler.seed, 7);
        for (body, param) in [
            (r#"{"temperature": 3}"#, "temperature"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"top_k": -2}"#, "top_k"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, "stop"),
            (r#"{"stop": [1]}"#, "stop"),
            (r#"{"stop": [""]}"#, "stop"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"logprobs": 2}"#, "logprobs"),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty"),
            (r#"{"tools": [{"type": "function"}]}"#, "tools"),
        ] {
            let e = ok(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        assert!(ok(r#"{"logprobs": null, "n": 1, "presence_penalty": 0}"#).is_ok());
    }

    #[test]
    fn max_tokens_against_the_context() {
        assert_eq!(
            resolve_max_tokens(None, Some(16), 10, 256, "prompt"),
            Ok(16)
        );
        assert_eq!(resolve_max_tokens(None, None, 10, 256, "prompt"), Ok(246));
        assert_eq!(
            resolve_max_tokens(None, Some(16), 250, 256, "prompt"),
            Ok(6)
        );
        assert_eq!(resolve_max_tokens(Some(5), None, 10, 256, "prompt"), Ok(5));
        let code = |r: Result<usize, ApiError>| r.unwrap_err().code;
        assert_eq!(
            code(resolve_max_tokens(Some(0), None, 10, 256, "prompt")),
            Some("invalid_value")
        );
        assert_eq!(
            code(resolve_max_tokens(Some(257), None, 10, 256, "prompt")),
            Some("invalid_value")
        );
        assert_eq!(
            code(resolve_max_tokens(Some(250), None, 10, 256, "prompt")),
            Some("context_length_exceeded")
        );
        assert_eq!(
            code(resolve_max_tokens(None, None, 300, 256, "prompt")),
            Some("context_length_exceeded")
        );
    }

    #[test]
    fn message_contents() {
        let m = |c: Value| ChatMessage {
            role: "user".into(),
            content: Some(c),
            name: None,
            reasoning_content: None,
        };
        assert_eq!(message_text(0, &m(json!("hi"))).unwrap(), "hi");
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(message_text(0, &m(parts)).unwrap(), "ab");
        let e = message_text(2, &m(json!([{"type": "image_url"}]))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[2].content"));
        assert!(message_text(0, &m(json!(5))).is_err());
    }
}
