//! The pre-gating router of `scripts/train/train_pregate.py` run natively: a GRU over token ids whose
//! weights are read from its ONNX file, computed in plain f32. The network is ~85k multiply-adds
//! per token; a general ONNX runtime (tract, behind the `pregate` feature) spends several times
//! that on per-op dispatch and allocation, and adds ~10 MiB of RSS.
//!
//! The matrix-vector products keep the graph's `[in, out]` layout and add one input's row to all
//! outputs at a time ([`matvec`]), which the compiler vectorises for the baseline target (SSE2,
//! NEON). The kernel table's `dot_f32` would cost one indirect call and one horizontal sum per
//! output (912 per step) on rows only 32-160 long; profiled, those calls dominated the step.
//!
//! One step, as the exported graph computes it (`export_onnx`; PyTorch's gate order r, z, n):
//!
//! ```text
//! e  = emb[token]                                        [De]
//! gi = Wi e + bi,  gh = Wh h + bh                        [3H] each (r, z, n blocks)
//! r  = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
//! n  = tanh(gi_n + r * gh_n)
//! h' = n + z * (h - n)                                   (the graph's form of (1 - z) n + z h)
//! logits = head [h'; e] + head_b                         [L * E], layer-major
//! ```
//!
//! The ONNX node list is checked to be exactly that graph; anything else is refused as
//! [`PredictorError::Foreign`] (tract can run it).

use std::path::Path;

use crate::moe::predictor::{ExpertPredictor, Predictions, PredictorError, PregateMeta};
use crate::onnx::{Initializer, OnnxError, OnnxModel};

/// The graph `export_onnx` writes: (op, inputs, outputs), in order. Public so that tools
/// writing such a graph (the fuzz seeds) build the one this reader checks.
pub const GRAPH: &[(&str, &[&str], &[&str])] = &[
    ("Gather", &["emb", "token"], &["e"]),
    ("MatMul", &["e", "Wi_r"], &["ei_r"]),
    ("Add", &["ei_r", "bi_r"], &["i_r"]),
    ("MatMul", &["h", "Wh_r"], &["hh_r"]),
    ("Add", &["hh_r", "bh_r"], &["h_r"]),
    ("MatMul", &["e", "Wi_z"], &["ei_z"]),
    ("Add", &["ei_z", "bi_z"], &["i_z"]),
    ("MatMul", &["h", "Wh_z"], &["hh_z"]),
    ("Add", &["hh_z", "bh_z"], &["h_z"]),
    ("MatMul", &["e", "Wi_n"], &["ei_n"]),
    ("Add", &["ei_n", "bi_n"], &["i_n"]),
    ("MatMul", &["h", "Wh_n"], &["hh_n"]),
    ("Add", &["hh_n", "bh_n"], &["h_n"]),
    ("Add", &["i_r", "h_r"], &["r0"]),
    ("Sigmoid", &["r0"], &["r"]),
    ("Add", &["i_z", "h_z"], &["z0"]),
    ("Sigmoid", &["z0"], &["z"]),
    ("Mul", &["r", "h_n"], &["rn"]),
    ("Add", &["i_n", "rn"], &["n0"]),
    ("Tanh", &["n0"], &["n"]),
    ("Sub", &["h", "n"], &["hmn"]),
    ("Mul", &["z", "hmn"], &["zd"]),
    ("Add", &["n", "zd"], &["h_next"]),
    ("Concat", &["h_next", "e"], &["he"]),
    ("MatMul", &["he", "head_T"], &["l0"]),
    ("Add", &["l0", "head_b"], &["logits"]),
];

pub struct GruPredictor {
    meta: PregateMeta,
    n_model_layers: usize,
    /// Experts predicted per layer.
    k: usize,
    /// Widths: state `hidden`, embedding `d_emb`, logits `n_out = L * E`.
    hidden: usize,
    d_emb: usize,
    /// `[n_vocab, d_emb]`.
    emb: Vec<f32>,
    /// `[d_emb, 3H]` and `[H, 3H]` row-major (`[in, out]` as in the graph; each row holds the
    /// r, z, n gates' columns side by side), with `[3H]` biases.
    wi: Vec<f32>,
    bi: Vec<f32>,
    wh: Vec<f32>,
    bh: Vec<f32>,
    /// `[H + d_emb, n_out]` and `[n_out]`.
    head: Vec<f32>,
    head_b: Vec<f32>,
    /// `[h; e]`: the recurrent state, then the current token's embedding (the head's input).
    he: Vec<f32>,
    /// Scratch `[3H]` each, and the last logits `[n_out]`.
    gi: Vec<f32>,
    gh: Vec<f32>,
    logits: Vec<f32>,
    /// Position the state has consumed (tokens before it are in `he[..H]`).
    pos: usize,
}

impl GruPredictor {
    /// Loads `path` for a model of `n_model_layers` layers and `n_expert` experts, predicting
    /// `k` experts per layer (None: the model's top-k from the file).
    pub fn load(
        path: &Path,
        n_model_layers: usize,
        n_expert: usize,
        k: Option<usize>,
    ) -> Result<Self, PredictorError> {
        let bytes = std::fs::read(path).map_err(|e| PredictorError::Load {
            path: path.display().to_string(),
            why: format!(
                "{e} (train one with scripts/train/train_pregate.py, or pass --pregate PATH)"
            ),
        })?;
        Self::from_bytes(&bytes, path, n_model_layers, n_expert, k)
    }

    /// [`Self::load`] from the file's bytes (`path` names it in errors).
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        n_model_layers: usize,
        n_expert: usize,
        k: Option<usize>,
    ) -> Result<Self, PredictorError> {
        let load_err = |why: String| PredictorError::Load {
            path: path.display().to_string(),
            why,
        };
        let foreign = |why: String| PredictorError::Foreign {
            path: path.display().to_string(),
            why,
        };
        let m = OnnxModel::parse(bytes).map_err(|e| match e {
            // A tensor this reader does not support (another type, external data): tract may.
            OnnxError::Tensor { .. } => foreign(e.to_string()),
            OnnxError::Malformed(_) => load_err(e.to_string()),
        })?;
        check_graph(&m).map_err(foreign)?;
        let meta = PregateMeta::read(|k| m.metadata(k), path, n_model_layers, n_expert)?;

        // Shapes, from the initialisers; each must agree with the others and the metadata.
        let init = |name: &str| {
            m.initializer(name)
                .ok_or_else(|| foreign(format!("no `{name}`")))
        };
        let emb = init("emb")?;
        let [n_vocab, d_emb] = dims2(emb).map_err(foreign)?;
        let h = meta.hidden;
        let n_out = meta.layers.len() * meta.n_expert;
        let want = |t: &Initializer, shape: &[usize]| {
            let ok = t.dims.len() == shape.len()
                && t.dims.iter().zip(shape).all(|(&a, &b)| a == b as i64);
            if ok {
                Ok(())
            } else {
                Err(foreign(format!(
                    "`{}` has shape {:?}, expected {shape:?} (hidden {h}, embedding {d_emb}, \
                     {n_out} logits)",
                    t.name, t.dims
                )))
            }
        };
        let (mut wi, mut bi, mut wh, mut bh) = (
            vec![0.0; d_emb * 3 * h],
            vec![],
            vec![0.0; h * 3 * h],
            vec![],
        );
        for (gate, g) in ["r", "z", "n"].into_iter().enumerate() {
            let t = init(&format!("Wi_{g}"))?;
            want(t, &[d_emb, h])?;
            place_columns(&t.data, h, gate, &mut wi);
            let t = init(&format!("Wh_{g}"))?;
            want(t, &[h, h])?;
            place_columns(&t.data, h, gate, &mut wh);
            let t = init(&format!("bi_{g}"))?;
            want(t, &[h])?;
            bi.extend_from_slice(&t.data);
            let t = init(&format!("bh_{g}"))?;
            want(t, &[h])?;
            bh.extend_from_slice(&t.data);
        }
        let t = init("head_T")?;
        want(t, &[h + d_emb, n_out])?;
        let head = t.data.clone();
        let t = init("head_b")?;
        want(t, &[n_out])?;
        let head_b = t.data.clone();
        if n_vocab == 0 || d_emb == 0 || h == 0 || n_out == 0 {
            return Err(foreign("a dimension is zero".into()));
        }
        Ok(Self {
            n_model_layers,
            k: k.unwrap_or(meta.top_k).clamp(1, n_expert),
            meta,
            hidden: h,
            d_emb,
            emb: emb.data.clone(),
            wi,
            bi,
            wh,
            bh,
            head,
            head_b,
            he: vec![0.0; h + d_emb],
            gi: vec![0.0; 3 * h],
            gh: vec![0.0; 3 * h],
            logits: vec![0.0; n_out],
            pos: 0,
        })
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        4 * (self.emb.len()
            + self.wi.len()
            + self.wh.len()
            + self.bi.len()
            + self.bh.len()
            + self.head.len()
            + self.head_b.len())
    }

    /// Runs one step: the logits `[L * E]` of `token`, advancing the state. Allocates nothing.
    pub fn step(&mut self, token: u32) -> Result<&[f32], PredictorError> {
        let (h, de) = (self.hidden, self.d_emb);
        let row = token as usize;
        let Some(e) = self.emb.get(row * de..(row + 1) * de) else {
            return Err(PredictorError::Run {
                token,
                why: format!(
                    "token id beyond the router's vocabulary of {}",
                    self.emb.len() / de
                ),
            });
        };
        let (state, x) = self.he.split_at_mut(h);
        x.copy_from_slice(e);
        matvec(&self.wi, x, &self.bi, &mut self.gi);
        matvec(&self.wh, state, &self.bh, &mut self.gh);
        // Each h'[j] needs only h[j] and the gates of j: update the state in place.
        for (j, hj) in state.iter_mut().enumerate() {
            let r = sigmoid(self.gi[j] + self.gh[j]);
            let z = sigmoid(self.gi[h + j] + self.gh[h + j]);
            let n = (self.gi[2 * h + j] + r * self.gh[2 * h + j]).tanh();
            *hj = n + z * (*hj - n);
        }
        matvec(&self.head, &self.he, &self.head_b, &mut self.logits);
        self.pos += 1;
        Ok(&self.logits)
    }

    /// Back to the start of a sequence.
    pub fn reset(&mut self) {
        self.he.fill(0.0);
        self.pos = 0;
    }
}

impl ExpertPredictor for GruPredictor {
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
            self.step(tok)?;
            self.meta.push_predictions(&self.logits, self.k, t, out);
        }
        self.pos = pos + tokens.len();
        Ok(())
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = x W + b` for `W` `[x.len(), out.len()]` row-major (the graph's MatMul, then its Add):
/// `out += x[i] * W[i]` row by row, a loop over contiguous values that the compiler vectorises
/// (each output still sums its inputs in order).
fn matvec(w: &[f32], x: &[f32], b: &[f32], out: &mut [f32]) {
    let n = out.len();
    debug_assert_eq!(w.len(), x.len() * n);
    out.fill(0.0);
    for (&xi, row) in x.iter().zip(w.chunks_exact(n)) {
        for (o, &wv) in out.iter_mut().zip(row) {
            *o += xi * wv;
        }
    }
    for (o, &bv) in out.iter_mut().zip(b) {
        *o += bv;
    }
}

/// Copies a gate's `[rows, h]` matrix into columns `gate * h..(gate + 1) * h` of the
/// `[rows, 3h]` matrix `dst`.
fn place_columns(src: &[f32], h: usize, gate: usize, dst: &mut [f32]) {
    for (src_row, dst_row) in src.chunks_exact(h).zip(dst.chunks_exact_mut(3 * h)) {
        dst_row[gate * h..(gate + 1) * h].copy_from_slice(src_row);
    }
}

fn dims2(t: &Initializer) -> Result<[usize; 2], String> {
    match t.dims[..] {
        [a, b] if a >= 0 && b >= 0 => Ok([a as usize, b as usize]),
        _ => Err(format!("`{}` has shape {:?}, expected 2-D", t.name, t.dims)),
    }
}

/// The node list, graph inputs and outputs must be exactly those `export_onnx` writes.
fn check_graph(m: &OnnxModel) -> Result<(), String> {
    if m.inputs != ["token", "h"] || m.outputs != ["logits", "h_next"] {
        return Err(format!(
            "graph inputs {:?} and outputs {:?}, expected [token, h] and [logits, h_next]",
            m.inputs, m.outputs
        ));
    }
    if m.nodes.len() != GRAPH.len() {
        return Err(format!(
            "{} nodes, the GRU step has {}",
            m.nodes.len(),
            GRAPH.len()
        ));
    }
    for (i, (n, &(op, ins, outs))) in m.nodes.iter().zip(GRAPH).enumerate() {
        if n.op_type != op || n.inputs != ins || n.outputs != outs {
            return Err(format!(
                "node {i} is {} {:?} -> {:?}, expected {op} {ins:?} -> {outs:?}",
                n.op_type, n.inputs, n.outputs
            ));
        }
        let axis = n.int_attrs.iter().find(|(k, _)| k == "axis").map(|a| a.1);
        let axis_ok = match op {
            "Gather" => matches!(axis, None | Some(0)),
            "Concat" => matches!(axis, Some(1) | Some(-1)),
            _ => true,
        };
        if !axis_ok {
            return Err(format!("node {i} ({op}) has axis {axis:?}"));
        }
    }
    Ok(())
}
