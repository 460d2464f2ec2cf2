//! The runtime's API: open a model file with [`SessionOptions`] (threads, context, KV type,
//! expert streaming, predictor, board profile), load the model, make sessions and generate.
//! `moe-run`, its subcommands and `moed` all set up through here.
//!
//! ```no_run
//! use moe_runtime::engine::{Engine, SessionOptions};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::open("model.gguf", SessionOptions::default())?;
//! let model = engine.load_model()?;
//! let mut session = engine.session(&model)?;
//! let logits = session.forward(&[1, 2, 3], false)?;
//! # Ok(()) }
//! ```

mod generate;
mod streaming;

use std::path::{Path, PathBuf};

pub use generate::{
    generate, Generation, GenerationStats, Logprobs, Piece, Request, StopMatcher, StopReason,
};
pub use streaming::{describe, CacheSize, PredictorChoice, StreamingOptions};

use crate::board::{BoardError, Defaults};
use crate::gguf::{GgufError, GgufFile, GgufHeader};
use crate::model::{Arch, KvType, Model, ModelError, Session};
use crate::moe::cache::CacheError;
use crate::moe::calib::CalibError;
use crate::moe::predictor::PredictorError;
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    // The causes are part of the messages and not `#[source]`s, so that a report of the error
    // chain (anyhow's `{:#}`, as moe-run prints errors) does not repeat them.
    #[error("loading model {path}: {cause}")]
    Open { path: String, cause: GgufError },
    #[error("{path}: {cause}")]
    Model { path: String, cause: ModelError },
    #[error(transparent)]
    Board(#[from] BoardError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Calibration(#[from] CalibError),
    #[error(transparent)]
    Predictor(#[from] PredictorError),
    #[error(transparent)]
    Replay(#[from] crate::moe::replay::ReplayError),
    /// A file of a kind moe-run does not run at all (not a malformed one): what it is and what
    /// to do instead.
    #[error("{path}: {why}")]
    CannotRun { path: String, why: String },
    /// Options that do not go together.
    #[error("{0}")]
    Options(String),
}

/// How to run a model; unset fields take the board profile's defaults, then the runtime's.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Board profile: `auto` (detect the CPU and RAM), `none`, a built-in name (pi5, pi4, ...),
    /// or a .toml file; `NAME:STORAGE` names the model's device (e.g. `pi4:usb-ssd`).
    pub target_profile: String,
    /// Worker threads (set once per process; default: the board's, else all cores).
    pub threads: Option<usize>,
    /// Context length (default: the smaller of the model's training context and 4096).
    pub n_ctx: Option<usize>,
    /// KV cache type (default: the board's, else f16).
    pub kv_type: Option<KvType>,
    pub streaming: StreamingOptions,
    /// Sequences kept besides the session's own (prompt caching), whose KV caches the memory
    /// budget must leave room for.
    pub extra_sequences: usize,
    /// Time the phases of every forward pass.
    pub profiling: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            target_profile: "auto".into(),
            threads: None,
            n_ctx: None,
            kv_type: None,
            streaming: StreamingOptions::default(),
            extra_sequences: 0,
            profiling: false,
        }
    }
}

/// A mapped model file with the options and board defaults to run it.
pub struct Engine {
    path: PathBuf,
    file: GgufFile,
    options: SessionOptions,
    board: Option<Defaults>,
    /// The start-up line's CPU, RAM and profile part.
    host_line: String,
}

impl Engine {
    /// Resolves the board profile, sets the worker threads (the first setting in a process
    /// wins) and maps the file.
    pub fn open(path: impl AsRef<Path>, options: SessionOptions) -> Result<Self, EngineError> {
        let path = path.as_ref().to_path_buf();
        let host = crate::board::Host::detect();
        let resolved = crate::board::resolve(&options.target_profile, &host, Some(&path))?;
        let host_line = crate::board::summary(&host, resolved.as_ref());
        let board = resolved.map(|r| r.defaults);
        crate::threads::set_global_threads(options.threads.or(board.as_ref().map(|b| b.threads)));
        let file = GgufFile::open(&path).map_err(|cause| EngineError::Open {
            path: path.display().to_string(),
            cause,
        })?;
        Ok(Self {
            path,
            file,
            options,
            board,
            host_line,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn options(&self) -> &SessionOptions {
        &self.options
    }

    /// The board profile's defaults, unless the profile is `none`.
    pub fn board(&self) -> Option<&Defaults> {
        self.board.as_ref()
    }

    /// The start-up line's CPU, kernels, RAM and profile part.
    pub fn host_line(&self) -> &str {
        &self.host_line
    }

    pub fn load_model(&self) -> Result<Model<'_>, EngineError> {
        let path = self.path.display().to_string();
        Model::load(&self.file).map_err(|cause| match cannot_run(self.file.header(), &cause) {
            Some(why) => EngineError::CannotRun { path, why },
            None => EngineError::Model { path, cause },
        })
    }

    /// The tokenizer the file carries.
    pub fn tokenizer(&self) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_gguf(self.file.header())
    }

    /// The context length a session gets by default.
    pub fn context_length(&self, model: &Model) -> usize {
        self.options
            .n_ctx
            .unwrap_or_else(|| model.hp.n_ctx_train.min(4096))
    }

    pub fn kv_type(&self) -> KvType {
        self.options
            .kv_type
            .or(self.board.as_ref().map(|b| b.kv_type))
            .unwrap_or(KvType::F16)
    }

    /// A session with the default context length.
    pub fn session<'m, 'e>(&'e self, model: &'m Model<'e>) -> Result<Session<'m, 'e>, EngineError> {
        self.session_with_ctx(model, self.context_length(model))
    }

    /// A session holding `n_ctx` positions, with the options' KV type, expert streaming,
    /// predictor, lossy routing and profiling.
    pub fn session_with_ctx<'m, 'e>(
        &'e self,
        model: &'m Model<'e>,
        n_ctx: usize,
    ) -> Result<Session<'m, 'e>, EngineError> {
        let streaming_options = &self.options.streaming;
        let mut session = Session::with_kv_type(model, n_ctx, self.kv_type());
        // Every kept sequence holds its own KV caches and recurrent state.
        let kv_bytes = session.state_bytes() * (1 + self.options.extra_sequences);
        let streaming = streaming_options.build(model, &self.path, kv_bytes, self.board())?;
        session.set_streaming(streaming);
        session.set_router_prefetch(!streaming_options.no_router_prefetch);
        session.set_route_options(streaming_options.route);
        session.set_predictor(streaming_options.predictor(model, &self.path)?);
        if let Some(prefix) = &streaming_options.route_replay {
            session.set_route_replay(Some(model.route_replay(prefix)?));
        }
        session.set_profiling(self.options.profiling);
        Ok(session)
    }

    /// The start-up line: CPU, kernels, RAM, board profile and the session's expert cache.
    pub fn startup_line(&self, session: &Session) -> String {
        let replay = match session.route_replay() {
            Some(r) => format!(
                ", routing: REPLAYED from {} ({} tokens; the output is not the model's)",
                r.path().display(),
                r.rows()
            ),
            None => String::new(),
        };
        format!(
            "{}, {}{replay}",
            self.host_line,
            describe(session.expert_cache(), session.lookahead())
        )
    }
}

/// Why a file that failed to load is one moe-run does not run at all, said plainly, when it is:
/// an architecture it does not know, or a dense model (no experts) of one it does.
fn cannot_run(h: &GgufHeader, error: &ModelError) -> Option<String> {
    let arch = h.get("general.architecture").and_then(|v| v.as_str())?;
    let known: Vec<&str> = Arch::ALL.iter().map(|a| a.gguf_name()).collect();
    if matches!(error, ModelError::UnsupportedArch(_)) {
        return Some(format!(
            "its architecture is `{arch}`, which moe-run does not run. moe-run runs \
             Mixture-of-Experts models of the llama.cpp architectures {}; run this file with \
             llama.cpp, or take a model of one of those",
            known.join(", ")
        ));
    }
    let experts = h
        .get(&format!("{arch}.expert_count"))
        .and_then(|v| v.as_u64());
    if matches!(experts, None | Some(0)) {
        return Some(format!(
            "this `{arch}` model has no experts ({arch}.expert_count is {}): it is a dense model, \
             and moe-run runs only Mixture-of-Experts models; run it with llama.cpp",
            experts.map_or("missing".to_string(), |n| n.to_string())
        ));
    }
    None
}
