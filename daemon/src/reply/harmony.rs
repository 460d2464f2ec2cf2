//! gpt-oss's Harmony response format. After the prompt's `<|start|>assistant` the model writes
//! messages as `<|channel|>NAME[ to=RECIPIENT][<|constrain|>TYPE]<|message|>TEXT` ended by
//! `<|end|>` (another message follows, `<|start|>assistant...`), `<|return|>` or `<|call|>`
//! (both end the generation). The `analysis` channel is the model's reasoning (llama.cpp's
//! server returns it as `reasoning_content` too); a message to `functions.NAME` is a call of
//! that tool with the message as its JSON arguments; every other message is the answer. Text
//! arrives in pieces that may split a marker, so a piece's tail that could begin one is held
//! back until the next piece says what it is.

use super::calls::ToolCall;
use super::event::ReplyEvent;

/// Harmony's control tokens, as text.
const MESSAGE: &str = "<|message|>";
const CHANNEL: &str = "<|channel|>";
const ENDS: [&str; 3] = ["<|end|>", "<|return|>", "<|call|>"];
const START: &str = "<|start|>";
/// The recipient prefix of a tool call.
const FUNCTIONS: &str = "functions.";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Reasoning,
    Content,
    /// A call of this tool, its arguments collected whole.
    Call(String),
}

enum State {
    /// Between messages: collecting a header (role, channel, recipient) up to `<|message|>`.
    Header(String),
    /// Inside a message's text.
    Body(Part),
}

/// Splits streamed Harmony text into reasoning, answer and tool calls.
pub struct HarmonyParser {
    state: State,
    /// Text not yet placed: it may be the start of a marker, or a call's arguments.
    pending: String,
    /// Messages to functions are calls (else they are answer text).
    calls: bool,
}

impl HarmonyParser {
    /// A parser for the text after the prompt's `<|start|>assistant`; `calls`: the request
    /// has tools, so messages to `functions.NAME` are calls.
    pub fn new(calls: bool) -> Self {
        Self {
            state: State::Header(String::new()),
            pending: String::new(),
            calls,
        }
    }

    /// Takes the next piece of generated text and returns what became certain.
    pub fn push(&mut self, text: &str) -> Vec<ReplyEvent> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        loop {
            match &mut self.state {
                State::Header(header) => match self.pending.find(MESSAGE) {
                    Some(at) => {
                        header.push_str(&self.pending[..at]);
                        let part = match (channel_of(header), recipient_of(header)) {
                            (_, Some(tool)) if self.calls => Part::Call(tool.to_string()),
                            (Some("analysis"), _) => Part::Reasoning,
                            _ => Part::Content,
                        };
                        self.pending.drain(..at + MESSAGE.len());
                        self.state = State::Body(part);
                    }
                    None => {
                        // A header is short; keep all of it (and any partial marker) pending.
                        return out;
                    }
                },
                State::Body(part) => {
                    let end = ENDS
                        .iter()
                        .filter_map(|m| self.pending.find(m).map(|at| (at, m.len())))
                        .min();
                    match end {
                        Some((at, len)) => {
                            emit(&mut out, part, &self.pending[..at]);
                            self.pending.drain(..at + len);
                            self.state = State::Header(String::new());
                        }
                        None if matches!(part, Part::Call(_)) => return out,
                        None => {
                            let keep = marker_prefix_len(&self.pending);
                            let cut = self.pending.len() - keep;
                            emit(&mut out, part, &self.pending[..cut]);
                            self.pending.drain(..cut);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// The end of the generation (`<|call|>` and `<|return|>` end it as end tokens, so they
    /// are not in the text): text still held back is placed where it was going (a header
    /// never closed by `<|message|>` is text the model wrote without the format: the answer).
    /// `cut`: the generation was cut short (`max_tokens`), so a call or a header left open is
    /// dropped rather than shown as text.
    pub fn finish(&mut self, cut: bool) -> Vec<ReplyEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        match std::mem::replace(&mut self.state, State::Header(String::new())) {
            // Cut: a call's arguments are incomplete; other text held back is a marker's start.
            State::Body(_) if cut => {}
            State::Body(part) => emit(&mut out, &part, &rest),
            State::Header(header) if cut && (header.contains("<|") || rest.contains("<|")) => {}
            State::Header(mut header) => {
                header.push_str(&rest);
                let text = strip_markers(&header);
                emit(&mut out, &Part::Content, text.trim_start());
            }
        }
        out
    }
}

/// Adds a message's text to `out`: a call whose arguments are not JSON is answer text.
fn emit(out: &mut Vec<ReplyEvent>, part: &Part, text: &str) {
    if text.is_empty() {
        return;
    }
    out.push(match part {
        Part::Reasoning => ReplyEvent::Reasoning(text.to_string()),
        Part::Content => ReplyEvent::Content(text.to_string()),
        Part::Call(name) => match serde_json::from_str::<serde_json::Value>(text.trim()) {
            Ok(args) => ReplyEvent::ToolCall(ToolCall {
                name: name.clone(),
                arguments: args.to_string(),
            }),
            Err(_) => ReplyEvent::Content(text.to_string()),
        },
    });
}

/// The channel a header names (`assistant<|channel|>final to=x` -> `final`).
fn channel_of(header: &str) -> Option<&str> {
    let after = &header[header.rfind(CHANNEL)? + CHANNEL.len()..];
    let name = after.split(['<', ' ']).next().unwrap_or("");
    Some(name.trim())
}

/// The tool a header addresses (` to=functions.get_weather` -> `get_weather`).
fn recipient_of(header: &str) -> Option<&str> {
    let after = &header[header.rfind(" to=")? + 4..];
    let to = after.split(['<', ' ']).next().unwrap_or("");
    to.strip_prefix(FUNCTIONS).filter(|n| !n.is_empty())
}

/// How many bytes at the end of `s` could begin one of the end markers.
fn marker_prefix_len(s: &str) -> usize {
    let longest = ENDS.iter().map(|m| m.len()).max().unwrap_or(0);
    (1..longest.min(s.len()) + 1)
        .rev()
        .find(|&n| {
            s.is_char_boundary(s.len() - n) && ENDS.iter().any(|m| m.starts_with(&s[s.len() - n..]))
        })
        .unwrap_or(0)
}

/// A header's text without Harmony's markers (what is left when the model ignored the format).
fn strip_markers(s: &str) -> String {
    let mut out = s.to_string();
    for m in [START, CHANNEL, MESSAGE, "<|constrain|>"]
        .iter()
        .chain(ENDS.iter())
    {
        out = out.replace(m, "");
    }
    out
}

/// Whether a chat template writes Harmony (gpt-oss's), so that replies must be parsed.
pub fn is_harmony_template(source: &str) -> bool {
    source.contains(CHANNEL) && source.contains(MESSAGE) && source.contains(START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLY: &str = "<|channel|>analysis<|message|>User greets. Reply briefly.<|end|>\
                         <|start|>assistant<|channel|>final<|message|>Hello! How can I help?";

    /// The whole reply parsed at once: reasoning, content (each joined), calls.
    fn parse(text: &str, calls: bool) -> (String, String, Vec<ToolCall>) {
        let mut p = HarmonyParser::new(calls);
        let mut events = p.push(text);
        events.extend(p.finish(false));
        split(events)
    }

    fn split(events: Vec<ReplyEvent>) -> (String, String, Vec<ToolCall>) {
        let (mut r, mut c, mut calls) = (String::new(), String::new(), Vec::new());
        for e in events {
            match e {
                ReplyEvent::Reasoning(t) => r.push_str(&t),
                ReplyEvent::Content(t) => c.push_str(&t),
                ReplyEvent::ToolCall(call) => calls.push(call),
            }
        }
        (r, c, calls)
    }

    #[test]
    fn analysis_is_reasoning_final_is_content() {
        let (r, c, calls) = parse(REPLY, true);
        assert_eq!(r, "User greets. Reply briefly.");
        assert_eq!(c, "Hello! How can I help?");
        assert!(calls.is_empty());
        // A final message without analysis, ended by <|return|> (when EOG is ignored).
        let (r, c, _) = parse("<|channel|>final<|message|>Hi<|return|>", false);
        assert_eq!((r.as_str(), c.as_str()), ("", "Hi"));
    }

    /// Split anywhere, even inside markers or UTF-8 text, the pieces give the same parts, and
    /// no marker text leaks out.
    #[test]
    fn any_split_gives_the_same_parts() {
        let text = format!("{REPLY} – ok<|return|>");
        let whole = parse(&text, false);
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        for step in 1..9 {
            let mut p = HarmonyParser::new(false);
            let mut events = Vec::new();
            for chunk in chars.chunks(step) {
                let (a, b) = (
                    chunk[0].0,
                    chunk.last().map(|c| c.0 + c.1.len_utf8()).unwrap(),
                );
                let got = p.push(&text[a..b]);
                assert!(!format!("{got:?}").contains("<|"), "{got:?}");
                events.extend(got);
            }
            events.extend(p.finish(false));
            assert_eq!(split(events), whole, "pieces of {step} chars");
        }
        assert_eq!(whole.1, "Hello! How can I help? – ok");
    }

    #[test]
    fn messages_to_functions_are_calls_with_tools() {
        let reply = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant\
                     <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>\
                     {\"city\": \"Oslo\"}";
        let (r, c, calls) = parse(reply, true);
        assert_eq!((r.as_str(), c.as_str()), ("Need weather.", ""));
        assert_eq!(
            calls,
            [ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Oslo"}"#.into()
            }]
        );
        // In pieces: the call comes out whole at the end.
        let mut p = HarmonyParser::new(true);
        let mut events = Vec::new();
        for piece in reply.as_bytes().chunks(5) {
            events.extend(p.push(std::str::from_utf8(piece).unwrap()));
        }
        events.extend(p.finish(false));
        assert_eq!(split(events).2, calls);
        // Without tools, or with arguments that are not JSON, the message is answer text.
        let (_, c, calls) = parse(reply, false);
        assert_eq!((c.as_str(), calls.len()), ("{\"city\": \"Oslo\"}", 0));
        let (_, c, calls) = parse(
            "<|channel|>commentary to=functions.f<|message|>not json<|call|>",
            true,
        );
        assert_eq!((c.as_str(), calls.len()), ("not json", 0));
    }

    #[test]
    fn unformatted_text_is_content() {
        // A model (or a random-weight fixture) that ignores the format: all of it is content.
        assert_eq!(parse("just text", true).1, "just text");
    }

    #[test]
    fn harmony_templates_are_recognised() {
        assert!(is_harmony_template(
            "{{- '<|start|>system<|message|>' }}{{ '<|channel|>final' }}"
        ));
        assert!(!is_harmony_template("{{ '<|im_start|>assistant\\n' }}"));
    }
}
