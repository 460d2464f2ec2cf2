//! What the reply parsers produce.

use super::calls::ToolCall;

/// What a piece of the reply turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplyEvent {
    Reasoning(String),
    Content(String),
    ToolCall(ToolCall),
}
