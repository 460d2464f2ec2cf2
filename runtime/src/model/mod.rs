//! Model definition: architecture traits, hyper-parameters, weights and the forward pass.

pub mod arch;
mod forward;
mod hparams;
mod kv_cache;
mod mla;
pub mod profile;
mod weights;

pub use arch::{Arch, ArchTraits, AttentionKind, QkNorm, RopeStyle};
pub use forward::{ExpertStreaming, LayerRouting, PredictionStats, Session};
pub use hparams::HParams;
pub use hparams::{MlaParams, Yarn};
pub use kv_cache::{KvCache, KvType};
pub use weights::{
    Attention, ExpertSlab, Experts, Ffn, Layer, LayerAttention, MlaAttention, Mlp, Model, MoeBlock,
    QueryProj, SharedExpert, StackedExperts,
};

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
    #[error("{0}")]
    Io(String),
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
