//! gpt-oss's Harmony response format. After the prompt's `<|start|>assistant` the model writes
//! messages as `<|channel|>NAME[ to=RECIPIENT][<|constrain|>TYPE]<|message|>TEXT` ended by
//! `<|end|>` (another message follows, `<|start|>assistant...`), `<|return|>` or `<|call|>`
//! (both end the generation). The `analysis` channel is the model's reasoning, returned as
//! `reasoning_content` (llama.cpp's server does the same); every other channel's text is the
//! answer (`content`). Text arrives in pieces that may split a marker, so a piece's tail that
//! could begin one is held back until the next piece says what it is.

/// Harmony's control tokens, as text.
const MESSAGE: &str = "<|message|>";
const CHANNEL: &str = "<|channel|>";
const ENDS: [&str; 3] = ["<|end|>", "<|return|>", "<|call|>"];
const START: &str = "<|start|>";

/// What a piece of generated text added to each part of the answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Reasoning,
    Content,
}

enum State {
    /// Between messages: collecting a header (role, channel, recipient) up to `<|message|>`.
    Header(String),
    /// Inside a message's text.
    Body(Part),
}

/// Splits streamed Harmony text into reasoning and answer.
pub struct HarmonyParser {
    state: State,
    /// Text not yet placed: it may be the start of a marker.
    pending: String,
}

impl Default for HarmonyParser {
    fn default() -> Self {
        Self::new()
    }
}

impl HarmonyParser {
    /// A parser for the text after the prompt's `<|start|>assistant`.
    pub fn new() -> Self {
        Self {
            state: State::Header(String::new()),
            pending: String::new(),
        }
    }

    /// Takes the next piece of generated text and returns what became certain.
    pub fn push(&mut self, text: &str) -> Delta {
        self.pending.push_str(text);
        let mut out = Delta::default();
        loop {
            match &mut self.state {
                State::Header(header) => match self.pending.find(MESSAGE) {
                    Some(at) => {
                        header.push_str(&self.pending[..at]);
                        let part = if channel_of(header) == Some("analysis") {
                            Part::Reasoning
                        } else {
                            Part::Content
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
                    let part = *part;
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

    /// The end of the generation: text still held back is placed where it was going (a header
    /// never closed by `<|message|>` is text the model wrote without the format: the answer).
    pub fn finish(&mut self) -> Delta {
        let mut out = Delta::default();
        let rest = std::mem::take(&mut self.pending);
        match std::mem::replace(&mut self.state, State::Header(String::new())) {
            State::Body(part) => emit(&mut out, part, &rest),
            State::Header(mut header) => {
                header.push_str(&rest);
                let text = strip_markers(&header);
                emit(&mut out, Part::Content, text.trim_start());
            }
        }
        out
    }

    /// Parses a whole generation at once.
    pub fn parse(text: &str) -> Delta {
        let mut p = Self::new();
        let mut d = p.push(text);
        let rest = p.finish();
        d.reasoning.push_str(&rest.reasoning);
        d.content.push_str(&rest.content);
        d
    }
}

fn emit(out: &mut Delta, part: Part, text: &str) {
    match part {
        Part::Reasoning => out.reasoning.push_str(text),
        Part::Content => out.content.push_str(text),
    }
}

/// The channel a header names (`assistant<|channel|>final to=x` -> `final`).
fn channel_of(header: &str) -> Option<&str> {
    let after = &header[header.rfind(CHANNEL)? + CHANNEL.len()..];
    let name = after.split(['<', ' ']).next().unwrap_or("");
    Some(name.trim())
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

    #[test]
    fn analysis_is_reasoning_final_is_content() {
        let d = HarmonyParser::parse(REPLY);
        assert_eq!(d.reasoning, "User greets. Reply briefly.");
        assert_eq!(d.content, "Hello! How can I help?");
        // A final message without analysis, ended by <|return|> (when EOG is ignored).
        let d = HarmonyParser::parse("<|channel|>final<|message|>Hi<|return|>");
        assert_eq!(
            d,
            Delta {
                reasoning: String::new(),
                content: "Hi".into()
            }
        );
    }

    /// Split anywhere, even inside markers or UTF-8 text, the pieces give the same parts, and
    /// no marker text leaks out.
    #[test]
    fn any_split_gives_the_same_parts() {
        let text = format!("{REPLY} – ok<|return|>");
        let whole = HarmonyParser::parse(&text);
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        for step in 1..9 {
            let mut p = HarmonyParser::new();
            let mut got = Delta::default();
            for chunk in chars.chunks(step) {
                let (a, b) = (
                    chunk[0].0,
                    chunk.last().map(|c| c.0 + c.1.len_utf8()).unwrap(),
                );
                let d = p.push(&text[a..b]);
                assert!(
                    !d.content.contains("<|") && !d.reasoning.contains("<|"),
                    "{d:?}"
                );
                got.reasoning.push_str(&d.reasoning);
                got.content.push_str(&d.content);
            }
            let d = p.finish();
            got.reasoning.push_str(&d.reasoning);
            got.content.push_str(&d.content);
            assert_eq!(got, whole, "pieces of {step} chars");
        }
        assert_eq!(whole.content, "Hello! How can I help? – ok");
    }

    #[test]
    fn commentary_and_unformatted_text_are_content() {
        let d = HarmonyParser::parse(
            "<|channel|>commentary to=functions.f<|constrain|>json<|message|>{\"a\":1}<|call|>",
        );
        assert_eq!(d.content, "{\"a\":1}");
        assert!(d.reasoning.is_empty());
        // A model (or a random-weight fixture) that ignores the format: all of it is content.
        let d = HarmonyParser::parse("just text");
        assert_eq!(d.content, "just text");
    }

    #[test]
    fn harmony_templates_are_recognised() {
        assert!(is_harmony_template(
            "{{- '<|start|>system<|message|>' }}{{ '<|channel|>final' }}"
        ));
        assert!(!is_harmony_template("{{ '<|im_start|>assistant\\n' }}"));
    }
}
