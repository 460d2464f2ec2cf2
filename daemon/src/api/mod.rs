//! OpenAI's API shapes: request parameters (serde), their validation, the error body, and the
//! JSON of responses and stream chunks for `/v1/completions` and `/v1/chat/completions`.

mod error;
mod request;
mod response;
mod tools;

pub use error::ApiError;
pub use request::{
    message_text, parse_body, resolve_max_tokens, validate, ChatMessage, GenParams, StreamOptions,
    Validated, MAX_STOP,
};
pub use response::{ResponseMeta, Timings, TokenLogprob, Usage};
pub use tools::{allowed_tools, ToolUse};

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
