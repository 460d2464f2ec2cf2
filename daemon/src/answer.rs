//! A chat reply in OpenAI's shape: the reply parser's reasoning, answer and tool calls become
//! the response's `message` (`reasoning_content`, `content`, `tool_calls`) or, streamed, the
//! chunks' `delta`s (a call's id and name in its first delta, its arguments in the next).

use serde_json::{json, Map, Value};

use crate::reply::{ReplyEvent, ReplyParser, ReplySyntax};

/// Characters of a tool call's id after `call_` (OpenAI's ids have 24).
const CALL_ID_LEN: usize = 24;

/// One piece of a chat reply, ready for the wire.
#[derive(Clone, Debug, PartialEq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
    ToolCall {
        index: usize,
        id: String,
        name: String,
        arguments: String,
    },
}

impl Delta {
    /// The stream deltas this piece is sent as: one, or for a call its id and name, then its
    /// arguments (as OpenAI and llama.cpp's server stream them).
    pub fn stream_deltas(&self) -> Vec<Value> {
        match self {
            Delta::Reasoning(t) => vec![json!({"reasoning_content": t})],
            Delta::Content(t) => vec![json!({"content": t})],
            Delta::ToolCall {
                index,
                id,
                name,
                arguments,
            } => vec![
                json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}),
            ],
        }
    }
}

/// Splits a chat reply streamed as text into [`Delta`]s (without a reply syntax, all of it is
/// content) and gathers the whole message.
pub struct Answer {
    parser: Option<ReplyParser>,
    ids: CallIds,
    reasoning: String,
    content: String,
    calls: Vec<Value>,
}

impl Answer {
    /// For a reply in `syntax` to a prompt ending with `prompt_tail`; call ids are drawn from
    /// `seed`.
    pub fn new(syntax: &ReplySyntax, prompt_tail: &str, seed: u64) -> Self {
        Self {
            parser: (!syntax.is_plain()).then(|| ReplyParser::new(syntax.clone(), prompt_tail)),
            ids: CallIds(seed),
            reasoning: String::new(),
            content: String::new(),
            calls: Vec::new(),
        }
    }

    /// Adds generated text; returns what it completed.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        match &mut self.parser {
            None if text.is_empty() => Vec::new(),
            None => self.record(vec![ReplyEvent::Content(text.to_string())]),
            Some(p) => {
                let events = p.push(text);
                self.record(events)
            }
        }
    }

    /// The end of the reply: what the parser held back. `reason` is why the generation ended
    /// (`length`: cut short, so a tool call or marker left open is dropped, not shown as text).
    pub fn finish(&mut self, reason: &str) -> Vec<Delta> {
        match &mut self.parser {
            None => Vec::new(),
            Some(p) => {
                let events = p.finish(reason == "length");
                self.record(events)
            }
        }
    }

    fn record(&mut self, events: Vec<ReplyEvent>) -> Vec<Delta> {
        events
            .into_iter()
            .map(|e| match e {
                ReplyEvent::Reasoning(t) => {
                    self.reasoning.push_str(&t);
                    Delta::Reasoning(t)
                }
                ReplyEvent::Content(t) => {
                    self.content.push_str(&t);
                    Delta::Content(t)
                }
                ReplyEvent::ToolCall(c) => {
                    let index = self.calls.len();
                    let id = self.ids.next();
                    self.calls.push(json!({
                        "id": id, "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }));
                    Delta::ToolCall {
                        index,
                        id,
                        name: c.name,
                        arguments: c.arguments,
                    }
                }
            })
            .collect()
    }

    /// Whether the model called a tool.
    pub fn has_calls(&self) -> bool {
        !self.calls.is_empty()
    }

    /// OpenAI's `finish_reason` for a generation that ended for `reason`: `tool_calls` when it
    /// stopped after calling tools.
    pub fn finish_reason(&self, reason: &'static str) -> &'static str {
        if reason == "stop" && self.has_calls() {
            "tool_calls"
        } else {
            reason
        }
    }

    /// The whole reply as a response's `message`: `content` is null when the model only called
    /// tools; `reasoning_content` and `tool_calls` appear when there are any.
    pub fn message(&self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), "assistant".into());
        let content = if self.content.is_empty() && self.has_calls() {
            Value::Null
        } else {
            Value::String(self.content.clone())
        };
        m.insert("content".into(), content);
        if !self.reasoning.is_empty() {
            m.insert(
                "reasoning_content".into(),
                Value::String(self.reasoning.clone()),
            );
        }
        if self.has_calls() {
            m.insert("tool_calls".into(), Value::Array(self.calls.clone()));
        }
        Value::Object(m)
    }
}

/// Tool-call ids: `call_` and letters and digits from a seeded generator (splitmix64).
struct CallIds(u64);

impl CallIds {
    fn next(&mut self) -> String {
        const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut id = String::from("call_");
        for _ in 0..CALL_ID_LEN {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            id.push(ALNUM[(z % ALNUM.len() as u64) as usize] as char);
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::ToolSyntax;

    fn qwen3() -> ReplySyntax {
        ReplySyntax {
            reasoning: Some(("<think>", "</think>")),
            tools: ToolSyntax::TaggedBlock,
            harmony: false,
            form: crate::reply::CallForm::Json,
        }
    }

    /// Feeds `pieces`, returns the deltas and the answer.
    fn run(syntax: &ReplySyntax, tail: &str, pieces: &[&str]) -> (Vec<Delta>, Answer) {
        let mut a = Answer::new(syntax, tail, 7);
        let mut deltas = Vec::new();
        for p in pieces {
            deltas.extend(a.push(p));
        }
        deltas.extend(a.finish("stop"));
        (deltas, a)
    }

    #[test]
    fn plain_text_is_all_content() {
        let (deltas, a) = run(&ReplySyntax::PLAIN, "", &["Hel", "", "lo <think>"]);
        assert_eq!(
            deltas,
            [
                Delta::Content("Hel".into()),
                Delta::Content("lo <think>".into())
            ]
        );
        assert_eq!(
            a.message(),
            json!({"role": "assistant", "content": "Hello <think>"})
        );
        assert_eq!(a.finish_reason("stop"), "stop");
    }

    #[test]
    fn reasoning_content_and_calls_are_separated() {
        let pieces = [
            "<thi",
            "nk>Weather wanted.</th",
            "ink>\n\nChecking.<tool_",
            "call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
            "<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>",
        ];
        let (deltas, a) = run(&qwen3(), "<|im_start|>assistant\n", &pieces);
        let m = a.message();
        assert_eq!(m["reasoning_content"], "Weather wanted.");
        assert_eq!(m["content"], "Checking.");
        let calls = m["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["type"], "function");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Oslo"}));
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        // Ids: `call_` and 24 letters or digits, different for each call.
        let ids: Vec<&str> = calls.iter().map(|c| c["id"].as_str().unwrap()).collect();
        for id in &ids {
            let rest = id.strip_prefix("call_").unwrap();
            assert_eq!(rest.len(), CALL_ID_LEN);
            assert!(rest.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
        }
        assert_ne!(ids[0], ids[1]);
        assert_eq!(a.finish_reason("stop"), "tool_calls");
        assert_eq!(a.finish_reason("length"), "length");

        // The deltas say the same, with no marker text anywhere.
        let stream: Vec<Value> = deltas.iter().flat_map(Delta::stream_deltas).collect();
        let text = serde_json::to_string(&stream).unwrap();
        for marker in ["<think>", "</think>", "<tool_call>", "</tool_call>"] {
            assert!(!text.contains(marker), "{marker} in {text}");
        }
        let first_call = stream
            .iter()
            .position(|d| d.get("tool_calls").is_some())
            .unwrap();
        assert_eq!(
            stream[first_call]["tool_calls"][0],
            json!({"index": 0, "id": ids[0], "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}})
        );
        assert_eq!(
            stream[first_call + 1]["tool_calls"][0]["function"]["arguments"],
            calls[0]["function"]["arguments"]
        );
        assert_eq!(stream[first_call + 2]["tool_calls"][0]["index"], 1);
    }

    #[test]
    fn a_prompt_that_opens_reasoning_starts_the_reply_in_it() {
        let (_, a) = run(
            &qwen3(),
            "<|im_start|>assistant\n<think>\n",
            &["Hmm.", "</think>", "Yes."],
        );
        let m = a.message();
        assert_eq!(
            (&m["reasoning_content"], &m["content"]),
            (&json!("Hmm."), &json!("Yes."))
        );
        assert!(m.get("tool_calls").is_none());
    }

    /// gpt-oss's Harmony goes through the same path: analysis is reasoning, a message to a
    /// function is a call (its `<|call|>` ends the generation as an end token).
    #[test]
    fn harmony_replies() {
        let harmony = ReplySyntax::of_template("<|start|>{{ x }}<|channel|>final<|message|>");
        assert!(harmony.harmony);
        let reply = "<|channel|>analysis<|message|>Weather.<|end|><|start|>assistant<|channel|>\
                     commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Oslo\"}";
        let (deltas, a) = run(
            &harmony,
            "<|start|>assistant",
            &[&reply[..30], &reply[30..]],
        );
        let m = a.message();
        assert_eq!(m["reasoning_content"], "Weather.");
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(a.finish_reason("stop"), "tool_calls");
        assert!(!format!("{deltas:?}").contains("<|"));
        // Without tools (tool_choice none, or none given), the message is text.
        let no_tools = ReplySyntax {
            tools: ToolSyntax::None,
            ..harmony
        };
        let (_, a) = run(&no_tools, "", &[reply]);
        assert_eq!(a.message()["content"], "{\"city\":\"Oslo\"}");
    }

    #[test]
    fn the_same_seed_gives_the_same_ids() {
        let (mut a, mut b) = (CallIds(1), CallIds(1));
        assert_eq!(a.next(), b.next());
        assert_ne!(a.next(), CallIds(2).next());
    }
}
