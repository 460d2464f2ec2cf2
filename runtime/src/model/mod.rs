//! Model definition: architecture traits, hyper-parameters, weights and the forward pass.
//!
//! A layer is a mixer ([`attention`], [`mla`], [`short_conv`], [`gated_delta_net`], [`mamba2`])
//! and a feed-forward ([`ffn`]); [`forward`] runs them top to bottom, with per-layer state in
//! [`state`], shared operations in [`ops`], and prediction ([`foresight`]) and observers
//! ([`observe`], [`profile`]) at named points.

pub mod arch;
mod attention;
mod error;
mod ffn;
mod foresight;
mod forward;
mod gated_delta_net;
mod hparams;
mod layer_kinds;
mod lookup;
mod mamba2;
mod meta;
mod mla;
mod observe;
mod ops;
pub mod profile;
mod short_conv;
mod state;
mod weights;

pub use arch::{Arch, ArchTraits, AttentionKind, QkNorm, RecurrentMixer, RopeStyle, RouterInput};
pub use error::ModelError;
pub use foresight::PredictionStats;
pub use forward::{
    ExpertStreaming, SavedSequence, Session, DEFAULT_MAX_BATCH, MAX_BATCH_SEQUENCES,
};
pub use hparams::{GdnParams, HParams, Mamba2Params, MlaParams, Yarn};
pub use observe::{InputSum, InputSums, LayerRouting, NamedInputSum, MIN_DENSE_ROWS};
pub use state::{
    ConvState, DeltaState, KvLayer, KvShape, KvType, LayerState, SequenceState, SsmState, SWA_CHUNK,
};
pub use weights::{
    Attention, ExpertBiases, ExpertSlab, Experts, Ffn, GatedDeltaNet, Layer, Mamba2, Mixer,
    MlaAttention, Mlp, Model, MoeBlock, QkNormWeights, QueryProj, SharedExpert, ShortConv,
    StackedExperts,
};
