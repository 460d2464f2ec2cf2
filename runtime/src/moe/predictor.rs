//! Token-level expert predictors: guesses of every MoE layer's experts for the tokens about to
//! run, made before the backbone runs them. The session hands the guesses to the expert cache
//! (prefetch, and Belady's next-use knowledge); the model's own routers still decide the output,
//! so a wrong guess costs only time and bytes read.
//!
//! - [`FrequencyPredictor`]: each layer's most used experts so far (learned online from what
//!   the routers chose); the baseline.
//! - [`GruPredictor`]: a Read-ME-style pre-gating router, a small causal network (a GRU) over
//!   token ids distilled from the model's routing (`scripts/train/train_pregate.py`), exported as ONNX
//!   and run natively (`moe::gru`). Its recurrent state makes a decode step O(1).
//! - `PregatePredictor` (feature `pregate`): any such network run with tract-onnx; the fallback
//!   for ONNX graphs other than that GRU, and the cross-check of the native one.
//!
//! The lookahead gate (routers of later layers applied to the current hidden state) needs the
//! backbone's hidden states, so it stays inside the forward pass (`ExpertStreaming::lookahead`);
//! it can run together with any predictor here.

use std::path::{Path, PathBuf};

use crate::gguf::GgufHeader;
use crate::moe::router::Route;

/// Metadata key of a GGUF naming its pre-gating router: a path relative to the GGUF file.
pub const PREGATE_KEY: &str = "moe_edge.pregate.onnx";

#[derive(Debug, thiserror::Error)]
pub enum PredictorError {
    #[error("pre-gating router {path}: {why}")]
    Load { path: String, why: String },
    #[error("pre-gating router failed on token {token}: {why}")]
    Run { token: u32, why: String },
    /// A valid router, but not the GRU that [`GruPredictor`] runs natively.
    #[error("pre-gating router {path} is not the GRU network of scripts/train/train_pregate.py ({why}); other networks run with tract-onnx: rebuild with `cargo build --release -p moe-runtime --features pregate`, or use --predictor frequency")]
    Foreign { path: String, why: String },
}

/// What a pre-gating router's ONNX metadata says (written by `scripts/train/train_pregate.py`), checked
/// against the model it is loaded for.
#[derive(Clone, Debug)]
pub struct PregateMeta {
    /// Model layer of each predicted layer (`moe_edge.layers`); the logits are layer-major.
    pub layers: Vec<usize>,
    pub n_expert: usize,
    /// The model's top-k (`moe_edge.top_k`).
    pub top_k: usize,
    /// The recurrent state's width (`moe_edge.hidden`).
    pub hidden: usize,
}

impl PregateMeta {
    /// Reads the metadata through `get` and checks it against a model of `n_model_layers` layers
    /// and `n_expert` experts. Errors are `PredictorError::Load` for `path`.
    pub fn read<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
        path: &Path,
        n_model_layers: usize,
        n_expert: usize,
    ) -> Result<Self, PredictorError> {
        let err = |why: String| PredictorError::Load {
            path: path.display().to_string(),
            why,
        };
        let meta = |key: &str| get(key).ok_or_else(|| err(format!("metadata `{key}` is missing")));
        let num = |key: &str| -> Result<usize, PredictorError> {
            meta(key)?
                .trim()
                .parse()
                .map_err(|_| err(format!("metadata `{key}` is not a number")))
        };
        let layers: Vec<usize> = meta("moe_edge.layers")?
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|_| err("metadata `moe_edge.layers` is not a list of layers".into()))?;
        let m = Self {
            layers,
            n_expert: num("moe_edge.n_expert")?,
            top_k: num("moe_edge.top_k")?,
            hidden: num("moe_edge.hidden")?,
        };
        if m.n_expert != n_expert || m.layers.iter().any(|&l| l >= n_model_layers) {
            return Err(err(format!(
                "it predicts {} experts for layers {:?}, the model has {n_expert} experts and \
                 {n_model_layers} layers: it belongs to another model",
                m.n_expert, m.layers
            )));
        }
        Ok(m)
    }

    /// Appends to `out` each predicted layer's `k` best experts of one token's `logits`
    /// (`[layers * n_expert]`), for token `t` of the batch.
    pub fn push_predictions(&self, logits: &[f32], k: usize, t: usize, out: &mut Predictions) {
        let e = self.n_expert;
        for (i, &l) in self.layers.iter().enumerate() {
            top_k_into(&logits[i * e..(i + 1) * e], k, out.set(t, l));
        }
    }
}

/// Per token and MoE layer, the experts expected: `experts(t, layer)`.
#[derive(Clone, Debug, Default)]
pub struct Predictions {
    n_layers: usize,
    sets: Vec<Vec<u32>>,
}

impl Predictions {
    /// Empties the table and sizes it for `n_tokens` tokens of `n_layers` layers (model layers;
    /// dense layers stay empty).
    pub fn reset(&mut self, n_tokens: usize, n_layers: usize) {
        self.n_layers = n_layers;
        self.sets.resize_with(n_tokens * n_layers, Vec::new);
        self.sets.truncate(n_tokens * n_layers);
        self.sets.iter_mut().for_each(Vec::clear);
    }

    pub fn n_tokens(&self) -> usize {
        self.sets.len().checked_div(self.n_layers).unwrap_or(0)
    }

    pub fn experts(&self, token: usize, layer: usize) -> &[u32] {
        &self.sets[token * self.n_layers + layer]
    }

    pub fn set(&mut self, token: usize, layer: usize) -> &mut Vec<u32> {
        &mut self.sets[token * self.n_layers + layer]
    }

    /// The experts predicted for `layer` by any token of the batch, sorted.
    pub fn union(&self, layer: usize, out: &mut Vec<u32>) {
        out.clear();
        for t in 0..self.n_tokens() {
            for &e in self.experts(t, layer) {
                if !out.contains(&e) {
                    out.push(e);
                }
            }
        }
        out.sort_unstable();
    }
}

/// Predicts the experts of tokens before the backbone runs them.
pub trait ExpertPredictor: Send {
    fn name(&self) -> &'static str;

    /// Fills `out` with each layer's expected experts for `tokens`, which run next at positions
    /// `pos..pos + tokens.len()` (`pos == 0` starts a new sequence).
    fn predict(
        &mut self,
        tokens: &[u32],
        pos: usize,
        out: &mut Predictions,
    ) -> Result<(), PredictorError>;

    /// What `layer`'s router chose for the batch just run (for predictors that learn online).
    fn observe(&mut self, _layer: usize, _routes: &[Route]) {}
}

/// Each layer's `k` most used experts so far (counts of the routers' choices in this process,
/// shared by all tokens). Knows nothing about the token; the baseline a predictor must beat.
pub struct FrequencyPredictor {
    n_expert: usize,
    k: usize,
    moe_layers: Vec<bool>,
    counts: Vec<u64>,
}

impl FrequencyPredictor {
    pub fn new(moe_layers: Vec<bool>, n_expert: usize, k: usize) -> Self {
        Self {
            counts: vec![0; moe_layers.len() * n_expert],
            n_expert,
            k,
            moe_layers,
        }
    }
}

impl ExpertPredictor for FrequencyPredictor {
    fn name(&self) -> &'static str {
        "frequency"
    }

    fn predict(
        &mut self,
        tokens: &[u32],
        _pos: usize,
        out: &mut Predictions,
    ) -> Result<(), PredictorError> {
        let n_layers = self.moe_layers.len();
        out.reset(tokens.len(), n_layers);
        for (l, _) in self.moe_layers.iter().enumerate().filter(|(_, &m)| m) {
            let counts = &self.counts[l * self.n_expert..(l + 1) * self.n_expert];
            let best = top_k(counts.iter().map(|&c| c as f32), self.k);
            for t in 0..tokens.len() {
                out.set(t, l).extend_from_slice(&best);
            }
        }
        Ok(())
    }

    fn observe(&mut self, layer: usize, routes: &[Route]) {
        for r in routes {
            for &e in &r.experts {
                self.counts[layer * self.n_expert + e as usize] += 1;
            }
        }
    }
}

/// Indices of the `k` largest values, best first (ties to the lower index).
pub fn top_k(values: impl Iterator<Item = f32>, k: usize) -> Vec<u32> {
    let mut v: Vec<(u32, f32)> = values.enumerate().map(|(i, x)| (i as u32, x)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v.into_iter().map(|(i, _)| i).collect()
}

/// [`top_k`] without allocating: appends the indices of the `k` largest `values` to `out`, best
/// first (ties to the lower index; `k` is small, so `k` scans).
pub fn top_k_into(values: &[f32], k: usize, out: &mut Vec<u32>) {
    let start = out.len();
    for _ in 0..k.min(values.len()) {
        let mut best: Option<usize> = None;
        for (i, v) in values.iter().enumerate() {
            if out[start..].contains(&(i as u32)) {
                continue;
            }
            if best.is_none_or(|b| v.total_cmp(&values[b]).is_gt()) {
                best = Some(i);
            }
        }
        out.push(best.expect("k <= values.len()") as u32);
    }
}

/// Where a model's pre-gating router is: the GGUF's `moe_edge.pregate.onnx` key (relative to
/// the GGUF), else a sidecar `<model stem>.pregate.onnx` beside the model, if it exists.
pub fn find_sidecar(model_path: &Path, header: &GgufHeader) -> Option<PathBuf> {
    let dir = model_path.parent().unwrap_or(Path::new("."));
    if let Some(rel) = header.get(PREGATE_KEY).and_then(|v| v.as_str()) {
        return Some(dir.join(rel));
    }
    let stem = model_path.file_stem()?.to_string_lossy();
    let p = dir.join(format!("{stem}.pregate.onnx"));
    p.exists().then_some(p)
}

pub use crate::moe::gru::GruPredictor;

#[cfg(feature = "pregate")]
pub use onnx::PregatePredictor;

#[cfg(feature = "pregate")]
mod onnx {
    use super::*;
    use tract_onnx::prelude::*;

    type Plan = SimplePlan<TypedFact, Box<dyn TypedOp>, Graph<TypedFact, Box<dyn TypedOp>>>;

    /// A pre-gating router exported by `scripts/train/train_pregate.py`: one decode step per call,
    /// `(token int64 [1], h f32 [1, H]) -> (logits f32 [1, L * E], h_next f32 [1, H])`, the
    /// logits layer-major over the MoE layers named in its metadata (`moe_edge.layers`).
    pub struct PregatePredictor {
        plan: Plan,
        meta: PregateMeta,
        n_model_layers: usize,
        /// Experts predicted per layer.
        k: usize,
        state: Tensor,
        /// Position the state has consumed (tokens before it are in `state`).
        pos: usize,
        bytes: usize,
    }

    impl PregatePredictor {
        /// Loads `path` for a model of `n_model_layers` layers and `n_expert` experts,
        /// predicting `k` experts per layer (None: the model's top-k from the file).
        pub fn load(
            path: &Path,
            n_model_layers: usize,
            n_expert: usize,
            k: Option<usize>,
        ) -> Result<Self, PredictorError> {
            let err = |why: String| PredictorError::Load {
                path: path.display().to_string(),
                why,
            };
            let bytes = std::fs::read(path).map_err(|e| {
                err(format!(
                    "{e} (train one with scripts/train/train_pregate.py, or pass --pregate PATH)"
                ))
            })?;
            let proto = tract_onnx::onnx()
                .proto_model_for_read(&mut &bytes[..])
                .map_err(|e| err(format!("not an ONNX model: {e}")))?;
            let props = |key: &str| {
                proto
                    .metadata_props
                    .iter()
                    .find(|p| p.key == key)
                    .map(|p| p.value.as_str())
            };
            let meta = PregateMeta::read(props, path, n_model_layers, n_expert)?;
            let plan = tract_onnx::onnx()
                .model_for_proto_model(&proto)
                // tests/pregate.rs checks the optimised plan against PyTorch: tract 0.21.10
                // fused `(1 - z) * n` wrongly, so the exporter writes the GRU update without a
                // broadcast constant. The unoptimised plan is exact but far slower.
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .map_err(|e| err(format!("tract cannot run it: {e}")))?;
            let state = Tensor::zero::<f32>(&[1, meta.hidden]).map_err(|e| err(e.to_string()))?;
            Ok(Self {
                plan,
                n_model_layers,
                k: k.unwrap_or(meta.top_k).clamp(1, n_expert),
                meta,
                state,
                pos: 0,
                bytes: bytes.len(),
            })
        }

        /// Size of the ONNX file.
        pub fn file_bytes(&self) -> usize {
            self.bytes
        }

        /// Runs one step: the logits `[L * E]` of `token`, advancing the state.
        pub fn step(&mut self, token: u32) -> Result<Vec<f32>, PredictorError> {
            let run_err = |e: TractError| PredictorError::Run {
                token,
                why: e.to_string(),
            };
            let tok = tensor1(&[token as i64]);
            let h = std::mem::take(&mut self.state);
            let mut out = self
                .plan
                .run(tvec!(tok.into(), h.into()))
                .map_err(run_err)?;
            let logits = out[0].as_slice::<f32>().map_err(run_err)?.to_vec();
            self.state = out.remove(1).into_tensor();
            if self.state.shape() != [1, self.meta.hidden] {
                return Err(PredictorError::Run {
                    token,
                    why: format!("state of shape {:?}", self.state.shape()),
                });
            }
            self.pos += 1;
            Ok(logits)
        }

        /// Back to the start of a sequence.
        pub fn reset(&mut self) {
            self.state = Tensor::zero::<f32>(&[1, self.meta.hidden]).expect("a small zero tensor");
            self.pos = 0;
        }
    }

    impl ExpertPredictor for PregatePredictor {
        fn name(&self) -> &'static str {
            "pregate"
        }

        fn predict(
            &mut self,
            tokens: &[u32],
            pos: usize,
            out: &mut Predictions,
        ) -> Result<(), PredictorError> {
            // The state summarises the tokens before `self.pos`; a session that restarted (or
            // rewound) restarts the state too. After a rewind the guesses are worse until the
            // state has seen enough new tokens, which costs time only.
            if pos != self.pos {
                self.reset();
            }
            out.reset(tokens.len(), self.n_model_layers);
            for (t, &tok) in tokens.iter().enumerate() {
                let logits = self.step(tok)?;
                self.meta.push_predictions(&logits, self.k, t, out);
            }
            self.pos = pos + tokens.len();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_predicts_the_most_used() {
        let mut p = FrequencyPredictor::new(vec![true, false, true], 6, 2);
        let route = |es: &[u32]| Route {
            experts: es.iter().copied().collect(),
            weights: es.iter().map(|_| 0.5).collect(),
        };
        p.observe(0, &[route(&[4, 1]), route(&[4, 2])]);
        p.observe(2, &[route(&[5, 3]), route(&[3, 0])]);
        let mut out = Predictions::default();
        p.predict(&[7, 8], 0, &mut out).unwrap();
        assert_eq!(out.n_tokens(), 2);
        assert_eq!(out.experts(1, 0), &[4, 1]);
        assert_eq!(out.experts(0, 1), &[] as &[u32]);
        assert_eq!(out.experts(0, 2), &[3, 0]);
        let mut u = Vec::new();
        out.union(2, &mut u);
        assert_eq!(u, vec![0, 3]);
    }
}
