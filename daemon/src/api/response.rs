//! Responses: the JSON of completions and chat responses, stream chunks, usage, timings and
//! log-probabilities.

use serde_json::{json, Value};

use super::Endpoint;

/// One generated token's log-probability and its most likely alternatives, as OpenAI reports
/// them: the token as text (lossy where it is part of a character), its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// Chat's `logprobs` object for `entries`.
fn chat_logprobs(entries: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let top: Vec<Value> = e
                .top
                .iter()
                .map(|(t, b, lp)| json!({"token": t, "logprob": lp, "bytes": b}))
                .collect();
            json!({"token": e.token, "logprob": e.logprob, "bytes": e.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' legacy `logprobs` object for `entries`, whose text starts at character
/// `offset` of the completion.
fn completion_logprobs(entries: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::with_capacity(entries.len());
    let mut token_logprobs = Vec::with_capacity(entries.len());
    let mut top_logprobs = Vec::with_capacity(entries.len());
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        tokens.push(json!(e.token));
        token_logprobs.push(json!(e.logprob));
        let top: serde_json::Map<String, Value> = e
            .top
            .iter()
            .map(|(t, _, lp)| (t.clone(), json!(lp)))
            .collect();
        top_logprobs.push(Value::Object(top));
        text_offset.push(json!(offset));
        offset += e.token.chars().count();
    }
    json!({
        "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
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
    /// Prompt tokens whose KV cache was reused from an earlier request.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
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
    // As llama.cpp's server: `prompt_n` counts the prompt tokens evaluated, `cache_n` the ones
    // taken from the prompt cache.
    let evaluated = usage.prompt_tokens - usage.cached_tokens;
    json!({
        "cache_n": usage.cached_tokens,
        "prompt_n": evaluated,
        "prompt_ms": t.prompt_ms,
        "prompt_per_second": per_s(evaluated, t.prompt_ms),
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

    /// The whole (non-streamed) response; `logprobs` when they were asked for.
    pub fn response(
        &self,
        text: &str,
        logprobs: Option<&[TokenLogprob]>,
        finish: &str,
        usage: &Usage,
        t: &Timings,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "finish_reason": finish,
                "logprobs": logprobs.map(|l| completion_logprobs(l, 0)),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs.map(chat_logprobs),
                "finish_reason": finish,
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage.json();
        v["timings"] = timings_json(usage, t);
        v
    }

    /// A stream chunk: the role announcement (chat only, `role`), a piece of text, or the last
    /// chunk with its `finish` reason.
    pub fn chunk(&self, role: bool, text: Option<&str>, finish: Option<&str>) -> Value {
        self.chunk_with_logprobs(role, text, None, finish)
    }

    /// A chunk with the log-probabilities of its tokens (completions: their text starts at
    /// character `offset` of the completion).
    pub fn chunk_with_logprobs(
        &self,
        role: bool,
        text: Option<&str>,
        logprobs: Option<(&[TokenLogprob], usize)>,
        finish: Option<&str>,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text.unwrap_or(""), "finish_reason": finish,
                "logprobs": logprobs.map(|(l, offset)| completion_logprobs(l, offset)),
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                let logprobs = logprobs.map(|(l, _)| chat_logprobs(l));
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
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
