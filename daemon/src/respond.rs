//! A job's events as the HTTP answer: the whole JSON response, or server-sent events. Chat
//! replies go through an [`Answer`] (reasoning, content and tool calls split as the model's
//! family marks them); completions are the text as generated.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::answer::Answer;
use crate::api::{ApiError, ResponseMeta, TokenLogprob};
use crate::worker::{self, Event};

/// Waits for the whole generation; the response JSON. `answer` is the chat reply's parser
/// (None: completions); `logprobs`: they were asked for.
pub async fn collect(
    rx: &mut mpsc::Receiver<Event>,
    meta: &ResponseMeta,
    mut answer: Option<Answer>,
    logprobs: bool,
) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t, l)) => {
                match &mut answer {
                    Some(a) => drop(a.push(&t)),
                    None => text.push_str(&t),
                }
                lps.extend(l);
            }
            Some(Event::Started) => {}
            Some(Event::Done(f)) => {
                let lps = logprobs.then_some(&lps[..]);
                return Ok(match &mut answer {
                    Some(a) => {
                        a.finish(f.reason);
                        let reason = a.finish_reason(f.reason);
                        meta.chat_response(a.message(), lps, reason, &f.usage, &f.timings)
                    }
                    None => meta.response(&text, lps, f.reason, &f.usage, &f.timings),
                });
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(worker::gone()),
        }
    }
}

/// Server-sent events from a job's event channel: a chunk per piece of the reply, the final
/// chunk, then `data: [DONE]`; a failure (such as a shutdown cutting the generation) becomes an
/// `{"error": ...}` event before `[DONE]`.
pub struct SseBody {
    rx: mpsc::Receiver<Event>,
    meta: ResponseMeta,
    include_usage: bool,
    /// Chunks carry their tokens' log-probabilities.
    logprobs: bool,
    /// Chat: the reply's parser (None: completions).
    answer: Option<Answer>,
    /// Chat: log-probabilities of tokens whose text has not come out yet; they go with the
    /// next chunk.
    pending: Vec<TokenLogprob>,
    /// Characters of completion text sent so far (completions' `text_offset`).
    chars: usize,
    out: VecDeque<Bytes>,
    done: bool,
}

impl SseBody {
    pub fn new(
        rx: mpsc::Receiver<Event>,
        meta: ResponseMeta,
        answer: Option<Answer>,
        include_usage: bool,
        logprobs: bool,
    ) -> Self {
        let mut sse = Self {
            rx,
            meta,
            include_usage,
            logprobs,
            chars: 0,
            answer,
            pending: Vec::new(),
            out: VecDeque::new(),
            done: false,
        };
        if sse.answer.is_some() {
            let first = sse.meta.chunk(true, Some(""), None);
            sse.push(&first);
        }
        sse
    }

    fn push(&mut self, v: &Value) {
        self.out.push_back(Bytes::from(format!("data: {v}\n\n")));
    }

    fn finish(&mut self) {
        self.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }

    /// Chat: a chunk for each delta of `deltas`, the waiting log-probabilities on the first.
    fn chat_chunks(&mut self, deltas: Vec<crate::answer::Delta>) {
        for delta in deltas.iter().flat_map(|d| d.stream_deltas()) {
            let lps = std::mem::take(&mut self.pending);
            let lps = self.logprobs.then_some(&lps[..]);
            let chunk = self.meta.chat_chunk(delta, lps, None);
            self.push(&chunk);
        }
    }

    fn on_event(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Started) => {}
            Some(Event::Text(t, logprobs)) => match &mut self.answer {
                Some(a) => {
                    let deltas = a.push(&t);
                    self.pending.extend(logprobs);
                    self.chat_chunks(deltas);
                }
                None => {
                    let l = (self.logprobs).then_some((&logprobs[..], self.chars));
                    let chunk = self.meta.chunk_with_logprobs(false, Some(&t), l, None);
                    self.chars += t.chars().count();
                    self.push(&chunk);
                }
            },
            Some(Event::Done(f)) => {
                let last = match &mut self.answer {
                    Some(a) => {
                        let deltas = a.finish(f.reason);
                        let reason = a.finish_reason(f.reason);
                        self.chat_chunks(deltas);
                        let lps = std::mem::take(&mut self.pending);
                        let lps = (self.logprobs && !lps.is_empty()).then_some(&lps[..]);
                        self.meta.chat_chunk(json!({}), lps, Some(reason))
                    }
                    None => self.meta.chunk(false, None, Some(f.reason)),
                };
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
