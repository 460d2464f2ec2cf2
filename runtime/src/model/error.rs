//! Why a model could not be loaded or run.

use crate::moe::cache::CacheError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the model file has no tensor `{0}`; it was not written for this architecture or is incomplete (re-convert it with moe-convert)")]
    MissingTensor(String),
    #[error("tensor `{name}` has ggml shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("metadata `{key}` {why}")]
    Metadata { key: String, why: String },
    #[error("architecture `{0}` is not supported (supported: llama with experts, qwen2moe, qwen3moe, olmoe, granitemoe, deepseek2)")]
    UnsupportedArch(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("context is full: {needed} positions needed, the session holds {n_ctx} (raise --ctx)")]
    ContextFull { n_ctx: usize, needed: usize },
    #[error("bad input: {0}")]
    Input(String),
    /// The request's grammar failed during generation (see `grammar::GrammarError`).
    #[error("{0}")]
    Grammar(String),
    /// Streamed experts could not be read.
    #[error(transparent)]
    Experts(#[from] CacheError),
}

/// The model reports a router's errors as its own, with the same messages as the backbone's.
impl From<crate::moe::decoupled::RouterError> for ModelError {
    fn from(e: crate::moe::decoupled::RouterError) -> Self {
        use crate::moe::decoupled::RouterError as R;
        match e {
            R::MissingTensor(name) => Self::MissingTensor(name),
            R::Shape {
                name,
                expected,
                found,
            } => Self::Shape {
                name,
                expected,
                found,
            },
            R::Metadata { key, why } => Self::Metadata { key, why },
            R::Unsupported(why) => Self::Unsupported(why),
            R::ContextFull { n_ctx, needed } => Self::ContextFull { n_ctx, needed },
            R::Input(why) => Self::Input(why),
        }
    }
}
