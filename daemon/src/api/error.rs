//! Errors answered in OpenAI's shape.

use hyper::StatusCode;
use serde_json::{json, Value};

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400, `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one parameter.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = match status.as_u16() {
            503 => "unavailable_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        Self::new(status, kind, message)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, code: &'static str, retry_after: u32) -> Self {
        let mut e = Self::status(StatusCode::SERVICE_UNAVAILABLE, message).with_code(code);
        e.retry_after = Some(retry_after);
        e
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl PartialEq for ApiError {
    fn eq(&self, other: &Self) -> bool {
        self.status == other.status && self.message == other.message && self.code == other.code
    }
}
