//! Requests: the parameters of both generation endpoints, their parsing and validation.

use moe_runtime::sampling::SamplerConfig;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::Endpoint;

/// The most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

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
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    /// gpt-oss's `reasoning_effort` (`low`, `medium`, `high`), passed to the chat template.
    pub reasoning_effort: Option<String>,
    /// Variables for the chat template, such as `{"enable_thinking": false}` (llama.cpp's and
    /// vLLM's extension).
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// llama.cpp's extension: do not stop at end-of-generation tokens.
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, an array of `{"type": "text", "text": ...}` parts, or null.
    pub content: Option<Value>,
    pub name: Option<String>,
    /// An assistant message's calls: `[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`.
    pub tool_calls: Option<Value>,
    /// A tool message's answer to this call.
    pub tool_call_id: Option<String>,
    /// An assistant message's reasoning, for templates that show earlier reasoning.
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
    /// Report generated tokens' log-probabilities with this many alternatives.
    pub top_logprobs: Option<usize>,
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
pub fn validate(
    p: &GenParams,
    endpoint: Endpoint,
    random_seed: u64,
) -> Result<Validated, ApiError> {
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
    let top_logprobs = logprobs_request(p, endpoint)?;
    if p.logit_bias
        .as_ref()
        .is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty()))
    {
        return unsupported("logit_bias", "no logit bias");
    }
    check_tools(p.tools.as_ref())?;
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
        top_logprobs,
    })
}

/// How many alternatives to report with each token's log-probability: completions take
/// `logprobs: N` (0-5, OpenAI's legacy form), chat takes `logprobs: true` with `top_logprobs: N`
/// (0-20).
fn logprobs_request(p: &GenParams, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    fn given(v: &Option<Value>) -> Option<&Value> {
        v.as_ref().filter(|v| !v.is_null())
    }
    let count = |name: &str, v: &Value, max: u64| match v.as_u64() {
        Some(n) if n <= max => Ok(n as usize),
        _ => Err(ApiError::param(
            name,
            format!("`{name}` must be an integer from 0 to {max}, got {v}"),
        )),
    };
    match endpoint {
        Endpoint::Completions => {
            if given(&p.top_logprobs).is_some() {
                return Err(ApiError::param(
                    "top_logprobs",
                    "completions take `logprobs: N`; `top_logprobs` is chat's",
                ));
            }
            given(&p.logprobs)
                .map(|v| count("logprobs", v, 5))
                .transpose()
        }
        Endpoint::Chat => {
            let on = match given(&p.logprobs) {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ApiError::param(
                        "logprobs",
                        format!("chat's `logprobs` is true or false, got {v}"),
                    ))
                }
            };
            let top = given(&p.top_logprobs)
                .map(|v| count("top_logprobs", v, 20))
                .transpose()?;
            if top.is_some() && !on {
                return Err(ApiError::param(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            Ok(on.then(|| top.unwrap_or(0)))
        }
    }
}

/// `tools` must be OpenAI's list of functions, each with a name.
fn check_tools(tools: Option<&Value>) -> Result<(), ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_null()) else {
        return Ok(());
    };
    let Some(list) = tools.as_array() else {
        return Err(ApiError::param("tools", "`tools` must be an array"));
    };
    for (i, t) in list.iter().enumerate() {
        let name = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str);
        if t.get("type").and_then(Value::as_str) != Some("function") || name.is_none() {
            return Err(ApiError::param(
                &format!("tools[{i}]"),
                "a tool must be `{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}`",
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;
    use serde_json::json;

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
        let ok = |s: &str| validate(&parse(s).unwrap(), Endpoint::Completions, 7);
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
            (r#"{"logprobs": 9}"#, "logprobs"),
            (r#"{"logprobs": true}"#, "logprobs"),
            (r#"{"top_logprobs": 2}"#, "top_logprobs"),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty"),
            (r#"{"tools": [{"type": "function"}]}"#, "tools[0]"),
            (r#"{"tools": {"type": "function"}}"#, "tools"),
        ] {
            let e = ok(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        assert!(ok(r#"{"logprobs": null, "n": 1, "presence_penalty": 0}"#).is_ok());
        assert_eq!(ok(r#"{"logprobs": 3}"#).unwrap().top_logprobs, Some(3));
        let chat = |s: &str| validate(&parse(s).unwrap(), Endpoint::Chat, 7);
        assert_eq!(chat(r#"{"logprobs": true}"#).unwrap().top_logprobs, Some(0));
        assert_eq!(
            chat(r#"{"logprobs": true, "top_logprobs": 20}"#)
                .unwrap()
                .top_logprobs,
            Some(20)
        );
        assert_eq!(chat(r#"{"logprobs": false}"#).unwrap().top_logprobs, None);
        for (body, param) in [
            (r#"{"logprobs": 2}"#, "logprobs"),
            (r#"{"top_logprobs": 2}"#, "top_logprobs"),
            (r#"{"logprobs": true, "top_logprobs": 21}"#, "top_logprobs"),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
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
            ..Default::default()
        };
        assert_eq!(message_text(0, &m(json!("hi"))).unwrap(), "hi");
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(message_text(0, &m(parts)).unwrap(), "ab");
        let e = message_text(2, &m(json!([{"type": "image_url"}]))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[2].content"));
        assert!(message_text(0, &m(json!(5))).is_err());
    }
}
