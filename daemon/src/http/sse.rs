//! The server-sent events of one streamed generation: a chunk per piece of text (with its
//! tokens' log-probabilities when asked), gpt-oss's Harmony replies split into
//! `reasoning_content` and `content` deltas, the final chunk, usage, `[DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::{ResponseMeta, TokenLogprob};
use crate::harmony::{Delta, HarmonyParser};
use crate::worker::{self, Event};

/// Server-sent events from a job's event channel: a chunk per piece of text, the final chunk,
/// then `data: [DONE]`; a failure (such as a shutdown cutting the generation) becomes an
/// `{"error": ...}` event before `[DONE]`.
pub(super) struct SseBody {
    pub(super) rx: mpsc::Receiver<Event>,
    pub(super) meta: ResponseMeta,
    pub(super) include_usage: bool,
    /// Splits a Harmony reply into `reasoning_content` and `content` deltas.
    pub(super) harmony: Option<HarmonyParser>,
    /// Chunks carry their tokens' log-probabilities.
    pub(super) logprobs: bool,
    /// Characters of completion text sent so far (completions' `text_offset`).
    pub(super) chars: usize,
    /// Harmony: log-probabilities of tokens whose text has not reached a delta yet (channel
    /// markers), sent with the next one.
    pub(super) pending_logprobs: Vec<TokenLogprob>,
    pub(super) out: VecDeque<Bytes>,
    pub(super) done: bool,
}

impl SseBody {
    pub(super) fn push(&mut self, v: &Value) {
        self.out.push_back(Bytes::from(format!("data: {v}\n\n")));
    }

    fn finish(&mut self) {
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }

    fn push_parts(&mut self, d: &Delta) {
        if !d.is_empty() {
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            let l = self.logprobs.then_some(&logprobs[..]);
            let chunk = self.meta.parts_chunk(&d.reasoning, &d.content, l);
            self.push(&chunk);
        }
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Started) => {}
            Some(Event::Text(t, logprobs)) => match &mut self.harmony {
                Some(parser) => {
                    let d = parser.push(&t);
                    self.pending_logprobs.extend(logprobs);
                    self.push_parts(&d);
                }
                None => {
                    let l = (self.logprobs).then_some((&logprobs[..], self.chars));
                    let chunk = self.meta.chunk_with_logprobs(false, Some(&t), l, None);
                    self.chars += t.chars().count();
                    self.push(&chunk);
                }
            },
            Some(Event::Done(f)) => {
                if let Some(d) = self.harmony.as_mut().map(HarmonyParser::finish) {
                    self.push_parts(&d);
                }
                // Harmony: tokens after the last piece of text (a closing marker).
                let pending = std::mem::take(&mut self.pending_logprobs);
                let l =
                    (self.logprobs && !pending.is_empty()).then_some((&pending[..], self.chars));
                let last = self
                    .meta
                    .chunk_with_logprobs(false, None, l, Some(f.reason));
                self.push(&last);
                if self.include_usage {
                    let u = self.meta.usage_chunk(&f.usage, &f.timings);
                    self.push(&u);
                }
                self.finish();
            }
            Some(Event::Failed(e)) => {
                self.push(&e.body());
                self.finish();
            }
            None => {
                self.push(&worker::gone().body());
                self.finish();
            }
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ev) => self.on_event(ev),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.out.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Endpoint, Timings, Usage};
    use crate::worker::Finish;

    /// The server-sent events of a chat reply whose generated text arrives in `pieces`, one
    /// token each (with log-probabilities when `logprobs`).
    fn stream(pieces: &[&str], harmony: bool, logprobs: bool) -> Vec<Value> {
        let (tx, rx) = mpsc::channel(64);
        for (i, p) in pieces.iter().enumerate() {
            let l = TokenLogprob {
                token: p.to_string(),
                bytes: p.as_bytes().to_vec(),
                logprob: -(i as f32),
                top: Vec::new(),
            };
            let l = if logprobs { vec![l] } else { Vec::new() };
            tx.try_send(Event::Text(p.to_string(), l)).unwrap();
        }
        let finish = Finish {
            reason: "stop",
            usage: Usage::default(),
            timings: Timings::default(),
        };
        tx.try_send(Event::Done(finish)).unwrap();
        let mut sse = SseBody {
            rx,
            meta: ResponseMeta {
                endpoint: Endpoint::Chat,
                id: "chatcmpl-1".into(),
                created: 0,
                model: "m".into(),
            },
            include_usage: false,
            harmony: harmony.then(HarmonyParser::new),
            logprobs,
            chars: 0,
            pending_logprobs: Vec::new(),
            out: VecDeque::new(),
            done: false,
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut events = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut sse).poll_frame(&mut cx) {
            let data = frame.into_data().unwrap();
            let text = std::str::from_utf8(&data).unwrap();
            let body = text.strip_prefix("data: ").unwrap().trim_end();
            if body != "[DONE]" {
                events.push(serde_json::from_str(body).unwrap());
            }
        }
        events
    }

    /// A Harmony reply streams its analysis channel as `reasoning_content` deltas and its final
    /// channel as `content` deltas; no channel marker reaches the client.
    #[test]
    fn harmony_stream_separates_reasoning_from_content() {
        let pieces = [
            "<|channel|>",
            "analysis",
            "<|message|>",
            "Greeting",
            "; be brief.",
            "<|end|>",
            "<|start|>",
            "assistant",
            "<|channel|>",
            "final",
            "<|message|>",
            "Hel",
            "lo!",
        ];
        let events = stream(&pieces, true, false);
        let (mut reasoning, mut content) = (String::new(), String::new());
        for e in &events {
            let delta = &e["choices"][0]["delta"];
            if let Some(r) = delta.get("reasoning_content") {
                reasoning.push_str(r.as_str().unwrap());
            }
            if let Some(c) = delta.get("content") {
                content.push_str(c.as_str().unwrap());
            }
        }
        assert_eq!(reasoning, "Greeting; be brief.");
        assert_eq!(content, "Hello!");
        assert_eq!(
            events.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        // Reasoning streams as it is generated, before the answer starts.
        let first = events
            .iter()
            .position(|e| e["choices"][0]["delta"].get("reasoning_content").is_some())
            .unwrap();
        let answer = events
            .iter()
            .position(|e| e["choices"][0]["delta"].get("content").is_some())
            .unwrap();
        assert!(first < answer);
        // Other templates stream the text as it is.
        let plain = stream(&["<|channel|>x"], false, false);
        assert_eq!(plain[0]["choices"][0]["delta"]["content"], "<|channel|>x");
        // Log-probabilities: every token's once, in order, those of channel markers with the
        // next piece of text; a closing marker's with the last chunk.
        let mut with_end = pieces.to_vec();
        with_end.push("<|end|>");
        let events = stream(&with_end, true, true);
        let tokens: Vec<&str> = events
            .iter()
            .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array())
            .flatten()
            .map(|l| l["token"].as_str().unwrap())
            .collect();
        assert_eq!(tokens, with_end);
        let marker = events
            .iter()
            .find(|e| e["choices"][0]["delta"].get("reasoning_content").is_some())
            .unwrap();
        let first: Vec<&str> = marker["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["token"].as_str().unwrap())
            .collect();
        assert_eq!(
            first,
            ["<|channel|>", "analysis", "<|message|>", "Greeting"]
        );
    }
}
