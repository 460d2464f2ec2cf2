//! Replayed routing, for benchmarks of expert streaming on random-weight checkpoints: the
//! experts each token uses come from a routing trace instead of the model's router, so a
//! full-size file with random weights can be streamed with the access pattern of a trained
//! model (its skew, stickiness and co-activation). The output is then not the model's: moe-run
//! says so on its start-up line and in its statistics.
//!
//! A trace is `moe-run trace`'s `PREFIX.experts.npy` (int32 `[n, L, k]`: per token, each MoE
//! layer's experts, best first), recorded from a model or written by
//! `scripts/bench/synth_routing_trace.py`. Position `p` of a session's first sequence uses row
//! `p mod n`; each later sequence (after `Session::reset`) continues where the one before ended,
//! so repeated runs replay new tokens rather than the ones the cache has just seen. The
//! weights are the model's gating scores of the replayed experts (normalised as the model
//! normalises its own), so a trace recorded from the same model replays its own routing exactly.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::router::{route_forced, Route, RoutingSpec};

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot read the routing trace {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("routing trace {path}: {reason}")]
    Mismatch { path: String, reason: String },
}

/// A routing trace and which of the model's layers each of its columns drives.
#[derive(Debug)]
pub struct RouteReplay {
    path: PathBuf,
    /// `[rows, moe_layers, k]`
    experts: Vec<u32>,
    rows: usize,
    /// MoE layers (columns) per token.
    layers: usize,
    k: usize,
    /// Per model layer, its column of the trace (None: not a MoE layer).
    column: Vec<Option<usize>>,
}

impl RouteReplay {
    /// Reads `PREFIX.experts.npy` (or the `.npy` file itself) for a model whose MoE layers are
    /// `moe_layers` of `n_layer`, with `n_expert` experts of which `k` are used per token.
    pub fn open(
        prefix: &Path,
        n_layer: usize,
        moe_layers: &[usize],
        n_expert: usize,
        k: usize,
    ) -> Result<Self, ReplayError> {
        let path = if prefix.extension().is_some_and(|e| e == "npy") {
            prefix.to_path_buf()
        } else {
            PathBuf::from(format!("{}.experts.npy", prefix.display()))
        };
        let shown = path.display().to_string();
        let read = std::fs::File::open(&path)
            .map(std::io::BufReader::new)
            .and_then(crate::npy::read_i32);
        let (ids, dims) = read.map_err(|cause| ReplayError::Read {
            path: shown.clone(),
            cause,
        })?;
        let mismatch = |reason: String| ReplayError::Mismatch {
            path: shown.clone(),
            reason,
        };
        let [rows, layers, width] = dims[..] else {
            return Err(mismatch(format!(
                "expected an int32 array [tokens, MoE layers, experts per token], got shape {dims:?}"
            )));
        };
        if rows == 0 {
            return Err(mismatch("it has no tokens".into()));
        }
        if layers != moe_layers.len() || width != k {
            return Err(mismatch(format!(
                "it routes {layers} MoE layers to {width} experts per token; this model has \
                 {} MoE layers using {k}: record a trace of this model (moe-run trace) or \
                 synthesise one for its shape (scripts/bench/synth_routing_trace.py)",
                moe_layers.len()
            )));
        }
        let mut experts = Vec::with_capacity(ids.len());
        for (i, row) in ids.chunks_exact(k).enumerate() {
            for (j, &e) in row.iter().enumerate() {
                if e < 0 || e as usize >= n_expert || row[..j].contains(&e) {
                    let (t, l) = (i / layers, i % layers);
                    return Err(mismatch(format!(
                        "token {t}, MoE layer {l}: expert {e} is not one of {n_expert} or \
                         appears twice"
                    )));
                }
                experts.push(e as u32);
            }
        }
        let mut column = vec![None; n_layer];
        for (c, &l) in moe_layers.iter().enumerate() {
            column[l] = Some(c);
        }
        Ok(Self {
            path,
            experts,
            rows,
            layers,
            k,
            column,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens in the trace (positions wrap around after this many).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The route of the token at `pos` in `layer`: the trace's experts, weighted by the
    /// model's gating of its router `logits`.
    pub fn route(&self, spec: &RoutingSpec, layer: usize, pos: usize, logits: &[f32]) -> Route {
        let c = self.column[layer].expect("replay is asked only for MoE layers");
        let at = ((pos % self.rows) * self.layers + c) * self.k;
        route_forced(spec, logits, &self.experts[at..at + self.k])
    }
}
