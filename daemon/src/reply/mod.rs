//! A model's reply split into reasoning, answer and tool calls, as each model family marks them
//! (the formats llama.cpp's `common/chat.cpp` parses). The family is recognised from the chat
//! template's own markers; the parser runs on text as it streams, holding back only what could
//! be the start of a marker. gpt-oss's Harmony channels are one of these syntaxes
//! ([`harmony`]).

mod calls;
mod event;
mod forced;
mod harmony;

pub use calls::{ToolCall, ToolSyntax};
pub use event::ReplyEvent;
pub use forced::{tool_call_grammar, CallForm, Reasoning};
pub use harmony::is_harmony_template;

use harmony::HarmonyParser;

/// How a family marks reasoning and tool calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplySyntax {
    /// Markers around reasoning, e.g. `<think>` and `</think>`.
    pub reasoning: Option<(&'static str, &'static str)>,
    pub tools: ToolSyntax,
    /// gpt-oss's Harmony: reasoning, answer and calls are messages on channels (tool calls are
    /// parsed when `tools` is [`ToolSyntax::Harmony`]).
    pub harmony: bool,
    /// How exactly the template writes one call (what a forced call's grammar follows).
    pub form: CallForm,
}

impl ReplySyntax {
    /// Plain text: no reasoning markers, no tool calls.
    pub const PLAIN: Self = Self {
        reasoning: None,
        tools: ToolSyntax::None,
        harmony: false,
        form: CallForm::None,
    };

    /// The syntax a chat template's markers reveal.
    pub fn of_template(source: &str) -> Self {
        if is_harmony_template(source) {
            return Self {
                reasoning: None,
                tools: ToolSyntax::Harmony,
                harmony: true,
                form: CallForm::Harmony,
            };
        }
        let has = |m: &str| source.contains(m);
        let tools = ToolSyntax::of_template(source);
        let reasoning = if has("[THINK]") {
            Some(("[THINK]", "[/THINK]"))
        } else if has("<think>") {
            Some(("<think>", "</think>"))
        } else {
            None
        };
        let mut syntax = Self {
            reasoning,
            tools,
            harmony: false,
            form: CallForm::None,
        };
        syntax.form = CallForm::of_template(source, &syntax);
        syntax
    }

    /// Whether the prompt ending with `prompt_tail` closed the reasoning block itself (as
    /// templates do when thinking is off), so the reply has none.
    pub fn reasoning_closed(&self, prompt_tail: &str) -> bool {
        self.reasoning
            .is_some_and(|(_, close)| prompt_tail.trim_end().ends_with(close))
    }

    /// Whether a reply to a prompt ending with `prompt_tail` starts inside a reasoning block
    /// (templates that start the model thinking end the prompt with its opening marker).
    pub fn reasoning_open(&self, prompt_tail: &str) -> bool {
        self.reasoning.is_some_and(|(open, close)| {
            let tail = prompt_tail.trim_end();
            tail.ends_with(open) && !tail.ends_with(close)
        })
    }

    /// Whether the reply is parsed at all (otherwise it is plain text).
    pub fn is_plain(&self) -> bool {
        *self == Self::PLAIN
    }
}

/// Whether more text may follow what the parser holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    More,
    /// The generation ended by itself (a stop token or string).
    Whole,
    /// The generation was cut short (`max_tokens`).
    Cut,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Content,
    Reasoning,
    /// Inside a tool-call block, collecting it whole.
    Tool,
}

/// Splits a reply, streamed in pieces of text, into [`ReplyEvent`]s.
pub struct ReplyParser {
    syntax: ReplySyntax,
    state: State,
    /// Text not yet classified: a possible marker's beginning, or a tool block being collected.
    pending: String,
    /// Reasoning just ended: the answer's leading whitespace is dropped.
    after_reasoning: bool,
    calls: usize,
    /// Harmony replies are parsed by their own parser.
    harmony: Option<HarmonyParser>,
}

impl ReplyParser {
    /// A parser for a reply whose prompt ended with `prompt_tail` (when it ends inside an open
    /// reasoning block, as templates that start the model thinking do, the reply starts there).
    pub fn new(syntax: ReplySyntax, prompt_tail: &str) -> Self {
        let syntax_harmony = syntax
            .harmony
            .then(|| HarmonyParser::new(syntax.tools == ToolSyntax::Harmony));
        let in_reasoning = syntax.reasoning_open(prompt_tail);
        Self {
            state: if in_reasoning {
                State::Reasoning
            } else {
                State::Content
            },
            syntax,
            pending: String::new(),
            after_reasoning: false,
            calls: 0,
            harmony: syntax_harmony,
        }
    }

    /// Tool calls seen so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Adds `text`; returns what it completed.
    pub fn push(&mut self, text: &str) -> Vec<ReplyEvent> {
        if let Some(h) = &mut self.harmony {
            let out = h.push(text);
            self.count_calls(&out);
            return out;
        }
        self.pending.push_str(text);
        let mut out = Vec::new();
        self.drain(End::More, &mut out);
        out
    }

    fn count_calls(&mut self, events: &[ReplyEvent]) {
        self.calls += events
            .iter()
            .filter(|e| matches!(e, ReplyEvent::ToolCall(_)))
            .count();
    }

    /// The end of the reply: whatever is held back, and a tool block the end closes. `cut`:
    /// the generation was cut short (`max_tokens`), so the start of a marker, or a tool call
    /// left unfinished, is dropped instead of becoming answer text.
    pub fn finish(&mut self, cut: bool) -> Vec<ReplyEvent> {
        if let Some(h) = &mut self.harmony {
            let out = h.finish(cut);
            self.count_calls(&out);
            return out;
        }
        let mut out = Vec::new();
        self.drain(if cut { End::Cut } else { End::Whole }, &mut out);
        out
    }

    fn drain(&mut self, end: End, out: &mut Vec<ReplyEvent>) {
        let last = end != End::More;
        loop {
            match self.state {
                State::Content => {
                    let mut markers: Vec<&str> = Vec::new();
                    if let Some((open, _)) = self.syntax.reasoning {
                        markers.push(open);
                    }
                    markers.extend(self.syntax.tools.starts());
                    match find_first(&self.pending, &markers) {
                        Some((at, marker)) => {
                            let before: String = self.pending.drain(..at).collect();
                            self.content(before, out);
                            if Some(marker) == self.syntax.reasoning.map(|(o, _)| o) {
                                self.pending.drain(..marker.len());
                                self.state = State::Reasoning;
                            } else {
                                // The tool block keeps its start marker: the block parser reads
                                // it (some formats put the first name in it).
                                self.state = State::Tool;
                            }
                        }
                        None => {
                            let keep = match end {
                                End::Whole => 0,
                                End::More | End::Cut => held_marker(&self.pending, &markers),
                            };
                            let n = self.pending.len() - keep;
                            let text: String = self.pending.drain(..n).collect();
                            self.content(text, out);
                            if end == End::Cut {
                                self.pending.clear();
                            }
                            return;
                        }
                    }
                }
                State::Reasoning => {
                    let close = self.syntax.reasoning.map_or("", |(_, c)| c);
                    match self.pending.find(close).filter(|_| !close.is_empty()) {
                        Some(at) => {
                            let text: String = self.pending.drain(..at).collect();
                            self.pending.drain(..close.len());
                            if !text.is_empty() {
                                out.push(ReplyEvent::Reasoning(text));
                            }
                            self.state = State::Content;
                            self.after_reasoning = true;
                        }
                        None => {
                            let keep = if end == End::Whole {
                                0
                            } else {
                                partial_marker(&self.pending, &[close])
                            };
                            let n = self.pending.len() - keep;
                            let text: String = self.pending.drain(..n).collect();
                            if !text.is_empty() {
                                out.push(ReplyEvent::Reasoning(text));
                            }
                            if end == End::Cut {
                                self.pending.clear();
                            }
                            return;
                        }
                    }
                }
                State::Tool => match self.syntax.tools.block_end(&self.pending, last) {
                    Some(at) => {
                        let block: String = self.pending.drain(..at).collect();
                        let ran_to_end = self.pending.is_empty();
                        match self.syntax.tools.parse(&block) {
                            Some(calls) if !calls.is_empty() => {
                                self.calls += calls.len();
                                out.extend(calls.into_iter().map(ReplyEvent::ToolCall));
                            }
                            // A block the cut left open (closed only by the end of the text).
                            _ if end == End::Cut && ran_to_end => {}
                            // What does not parse as a call is the answer's text, as llama.cpp
                            // leaves it.
                            _ => self.content(block, out),
                        }
                        self.state = State::Content;
                    }
                    // A call cut off by max_tokens is dropped: neither a call nor answer text.
                    None if end == End::Cut => {
                        self.pending.clear();
                        return;
                    }
                    None if last => {
                        let block = std::mem::take(&mut self.pending);
                        self.content(block, out);
                        return;
                    }
                    None => return,
                },
            }
        }
    }

    fn content(&mut self, mut text: String, out: &mut Vec<ReplyEvent>) {
        if self.after_reasoning {
            let trimmed = text.trim_start();
            if trimmed.is_empty() {
                return;
            }
            text = trimmed.to_string();
            self.after_reasoning = false;
        }
        if !text.is_empty() {
            out.push(ReplyEvent::Content(text));
        }
    }
}

/// The earliest of `markers` in `text`, and which.
fn find_first<'m>(text: &str, markers: &[&'m str]) -> Option<(usize, &'m str)> {
    markers
        .iter()
        .filter(|m| !m.is_empty())
        .filter_map(|m| text.find(m).map(|at| (at, *m)))
        .min_by_key(|&(at, m)| (at, usize::MAX - m.len()))
}

/// What to hold back at the end of the answer's text (or drop, when the reply was cut): the
/// start of a marker, with the replacement characters of a character whose bytes the end of
/// the generation split (markers such as DeepSeek's `<｜`).
fn held_marker(text: &str, markers: &[&str]) -> usize {
    let whole = text.trim_end_matches('\u{FFFD}');
    match partial_marker(whole, markers) {
        0 => 0,
        n => n + text.len() - whole.len(),
    }
}

/// The length of the longest end of `text` that begins one of `markers`.
fn partial_marker(text: &str, markers: &[&str]) -> usize {
    let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    (1..longest.min(text.len() + 1))
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k)
                && markers
                    .iter()
                    .any(|m| m.len() > k && m.starts_with(&text[text.len() - k..]))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
