//! Observers the forward pass calls at named points, outside the maths: routing tracing, the
//! inputs of weight matrices (an importance matrix) and phase profiling.

use std::collections::BTreeMap;

use super::profile::Profiler;
use crate::gguf::GgufHeader;
use crate::moe::router::Route;

/// The routing decisions of one MoE layer for one batch, recorded when tracing is on
/// (calibration statistics and router distillation read these).
#[derive(Clone, Debug)]
pub struct LayerRouting {
    pub layer: usize,
    /// Position of the batch's first token.
    pub first_pos: usize,
    /// Raw router logits, `[n, n_expert]`.
    pub logits: Vec<f32>,
    /// The experts each token used and their weights.
    pub routes: Vec<Route>,
}

#[derive(Default)]
pub struct Observers {
    pub trace: RouteTrace,
    pub inputs: WeightInputs,
    pub prof: Profiler,
}

/// Routing decisions recorded since tracing was switched on.
#[derive(Default)]
pub struct RouteTrace(pub Option<Vec<LayerRouting>>);

impl RouteTrace {
    /// Whether routing is being recorded.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// After a MoE layer routed the batch starting at `first_pos`.
    pub fn on_routing(&mut self, layer: usize, first_pos: usize, logits: &[f32], routes: &[Route]) {
        if let Some(trace) = &mut self.0 {
            trace.push(LayerRouting {
                layer,
                first_pos,
                logits: logits.to_vec(),
                routes: routes.to_vec(),
            });
        }
    }
}

/// Products over fewer rows than this are not observed for a plain matrix: llama-imatrix skips
/// them (its collector declines `MUL_MAT`s of fewer than 16 rows), so that an importance matrix
/// from here sums what one from llama.cpp sums. Expert matrices are always observed.
pub const MIN_DENSE_ROWS: usize = 16;

/// Per weight matrix, the sum over its input rows of each column's square, and how many rows
/// were summed: llama-imatrix's `in_sum2` and `counts`. A stacked expert tensor has one row of
/// sums and one count per expert (only the tokens routed to it); a plain matrix one of each.
#[derive(Clone, Debug, Default)]
pub struct InputSums {
    /// Keyed by (layer, the tensor's name inside the block without `.weight`).
    entries: BTreeMap<(usize, &'static str), InputSum>,
}

/// One matrix's sums: `sums` is `[counts.len(), cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSum {
    pub cols: usize,
    pub sums: Vec<f32>,
    pub counts: Vec<u64>,
}

impl InputSum {
    fn new(cols: usize, n_mat: usize) -> Self {
        Self {
            cols,
            sums: vec![0.0; cols * n_mat],
            counts: vec![0; n_mat],
        }
    }

    /// Adds `rows` (`[m, cols]`) to matrix `mat`, row after row in the order given, each column
    /// as `acc += x * x` in f32 (llama-imatrix's order for a batch).
    fn add(&mut self, mat: usize, rows: &[f32]) {
        let acc = &mut self.sums[mat * self.cols..(mat + 1) * self.cols];
        for row in rows.chunks_exact(self.cols) {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += x * x;
            }
        }
        self.counts[mat] += (rows.len() / self.cols) as u64;
    }
}

/// A named weight's sums, as written to an imatrix file.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedInputSum {
    /// The tensor's name in the model file (`blk.0.ffn_down_exps.weight`).
    pub name: String,
    pub sum: InputSum,
}

impl InputSums {
    fn entry(
        &mut self,
        layer: usize,
        stem: &'static str,
        cols: usize,
        n_mat: usize,
    ) -> &mut InputSum {
        let e = self
            .entries
            .entry((layer, stem))
            .or_insert_with(|| InputSum::new(cols, n_mat));
        assert!(
            e.cols == cols && e.counts.len() == n_mat,
            "inputs of blk.{layer}.{stem} change shape"
        );
        e
    }

    /// Every matrix observed, named as in the model file `header` describes: a tensor stored
    /// with its gate and up halves fused (`ffn_gate_up_exps`) has the inputs its gate half saw,
    /// as llama.cpp runs it as one product. Sorted by name.
    pub fn named(&self, header: &GgufHeader) -> Vec<NamedInputSum> {
        let mut out: Vec<NamedInputSum> = Vec::new();
        for (&(layer, stem), sum) in &self.entries {
            let name = |stem: &str| format!("blk.{layer}.{stem}.weight");
            let fused = |half: &str| {
                let fused = stem.replace(half, "ffn_gate_up");
                (header.tensor(&name(stem)).is_none() && header.tensor(&name(&fused)).is_some())
                    .then_some(fused)
            };
            let name = match (fused("ffn_gate"), fused("ffn_up")) {
                (Some(f), _) => name(&f),
                (None, Some(_)) => continue,
                (None, None) => name(stem),
            };
            out.push(NamedInputSum {
                name,
                sum: sum.clone(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// The inputs of weight matrices, summed since collection was switched on.
#[derive(Default)]
pub struct WeightInputs(pub Option<InputSums>);

impl WeightInputs {
    /// Whether inputs are being summed.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The batch `x` (`[n, cols]`) went into each of the plain matrices `stems` of `layer`.
    pub fn on_dense(&mut self, layer: usize, stems: &[&'static str], x: &[f32], n: usize) {
        let Some(sums) = &mut self.0 else { return };
        if n < MIN_DENSE_ROWS || n == 0 {
            return;
        }
        let cols = x.len() / n;
        for &stem in stems {
            sums.entry(layer, stem, cols, 1).add(0, &x[..n * cols]);
        }
    }

    /// `rows` (`[m, cols]`), the inputs of the tokens routed to expert `expert` of `n_expert`,
    /// went into each of the stacked expert matrices `stems` of `layer`.
    pub fn on_expert(
        &mut self,
        layer: usize,
        stems: &[&'static str],
        (expert, n_expert): (usize, usize),
        rows: &[f32],
        cols: usize,
    ) {
        let Some(sums) = &mut self.0 else { return };
        if rows.is_empty() {
            return;
        }
        for &stem in stems {
            sums.entry(layer, stem, cols, n_expert).add(expert, rows);
        }
    }
}
