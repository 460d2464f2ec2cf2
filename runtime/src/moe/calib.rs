//! Calibration statistics stored in a GGUF file, and moe-edge's extensions of the format.
//!
//! `moe-convert --calib` runs the model over calibration text and records, per layer and expert,
//! how often the expert is selected, its router weight, which experts of the previous layer ran
//! with it, and how much the output changes when it is dropped. They are stored as metadata
//! under the `moe_edge.` prefix, which llama.cpp ignores (it only reads keys it knows), so the
//! file stays llama.cpp-compatible. Arrays are flattened layer-major: entry `l * n_expert + e`.
//!
//! Format extensions (all under `moe_edge.`):
//! - `calib.tokens` (u32): calibration tokens the statistics come from.
//! - `calib.frequency` (f32 array, `[n_layer, n_expert]`): fraction of tokens that selected the
//!   expert (sums to `expert_used_count` over a layer's experts).
//! - `calib.router_mass` (f32 array, `[n_layer, n_expert]`): mean routing weight the expert
//!   received per token (0 when not selected).
//! - `calib.drop_kl` (f32 array, `[n_layer, n_expert]`): mean KL divergence (nats) of the final
//!   next-token distribution when this expert alone is masked out of its layer's router,
//!   measured on a subset of the calibration tokens.
//! - `calib.coactivation` (f32 array, `[n_layer, n_expert, n_expert]`): entry `[l, e, p]` is the
//!   fraction of tokens that selected expert `e` at layer `l` and expert `p` at layer `l - 1`
//!   (zero for the first layer).
//! - `expert_ids` (u32 array, `[n_layer, n_expert]`): after pruning, the original index of each
//!   kept expert (absent when nothing was pruned).
//! - `expert_layout` (string): `"per_expert"` when the routed experts of every MoE layer are
//!   stored as one 2-D tensor per expert, `blk.N.ffn_{gate,up,down}_exps.E.weight`, instead of
//!   the stacked `blk.N.ffn_{gate,up,down}_exps.weight`, so that each expert can have its own
//!   type (mixed precision: hot experts at a higher-bit type). llama.cpp does not load such
//!   files; moe-convert writes them only when asked (`--expert-types`).
//! - `hot_experts` (u32 array, `[n_layer, n_expert]`): 1 for experts stored at the hot type.

use crate::gguf::{GgufHeader, Value};

pub const PREFIX: &str = "moe_edge.";
pub const KEY_TOKENS: &str = "moe_edge.calib.tokens";
pub const KEY_FREQUENCY: &str = "moe_edge.calib.frequency";
pub const KEY_MASS: &str = "moe_edge.calib.router_mass";
pub const KEY_DROP_KL: &str = "moe_edge.calib.drop_kl";
pub const KEY_COACTIVATION: &str = "moe_edge.calib.coactivation";
pub const KEY_EXPERT_IDS: &str = "moe_edge.expert_ids";
pub const KEY_LAYOUT: &str = "moe_edge.expert_layout";
pub const KEY_HOT: &str = "moe_edge.hot_experts";
pub const LAYOUT_PER_EXPERT: &str = "per_expert";

/// The name of expert `e`'s matrix in the per-expert layout: `blk.3.ffn_gate_exps` ->
/// `blk.3.ffn_gate_exps.7.weight`.
pub fn per_expert_name(stem: &str, e: usize) -> String {
    format!("{stem}.{e}.weight")
}

/// Per layer and expert statistics gathered over calibration text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CalibStats {
    pub n_layer: usize,
    pub n_expert: usize,
    pub tokens: u64,
    pub frequency: Vec<f32>,
    pub router_mass: Vec<f32>,
    pub drop_kl: Vec<f32>,
    pub coactivation: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
#[error("calibration metadata `{key}` {why}; re-run moe-convert --calib")]
pub struct CalibError {
    pub key: String,
    pub why: String,
}

impl CalibStats {
    pub fn new(n_layer: usize, n_expert: usize) -> Self {
        let le = n_layer * n_expert;
        Self {
            n_layer,
            n_expert,
            tokens: 0,
            frequency: vec![0.0; le],
            router_mass: vec![0.0; le],
            drop_kl: vec![0.0; le],
            coactivation: vec![0.0; le * n_expert],
        }
    }

    pub fn idx(&self, layer: usize, expert: usize) -> usize {
        layer * self.n_expert + expert
    }

    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        vec![
            (KEY_TOKENS.into(), Value::U32(self.tokens as u32)),
            (
                KEY_FREQUENCY.into(),
                Value::f32_array(self.frequency.iter().copied()),
            ),
            (
                KEY_MASS.into(),
                Value::f32_array(self.router_mass.iter().copied()),
            ),
            (
                KEY_DROP_KL.into(),
                Value::f32_array(self.drop_kl.iter().copied()),
            ),
            (
                KEY_COACTIVATION.into(),
                Value::f32_array(self.coactivation.iter().copied()),
            ),
        ]
    }

    /// The statistics stored in a file: None when it has none.
    pub fn from_header(
        h: &GgufHeader,
        n_layer: usize,
        n_expert: usize,
    ) -> Result<Option<Self>, CalibError> {
        if h.get(KEY_FREQUENCY).is_none() {
            return Ok(None);
        }
        let le = n_layer * n_expert;
        let arr = |key: &str, len: usize| -> Result<Vec<f32>, CalibError> {
            let bad = |why: String| CalibError {
                key: key.into(),
                why,
            };
            let v = h
                .get(key)
                .and_then(|v| v.as_array())
                .ok_or_else(|| bad("is missing or not an array".into()))?;
            if v.len() != len {
                return Err(bad(format!(
                    "has {} values, expected {len} ({n_layer} layers x {n_expert} experts)",
                    v.len()
                )));
            }
            v.iter()
                .map(|x| x.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| bad("holds non-numbers".into()))
        };
        Ok(Some(Self {
            n_layer,
            n_expert,
            tokens: h.get(KEY_TOKENS).and_then(|v| v.as_u64()).unwrap_or(0),
            frequency: arr(KEY_FREQUENCY, le)?,
            router_mass: arr(KEY_MASS, le)?,
            drop_kl: arr(KEY_DROP_KL, le)?,
            coactivation: arr(KEY_COACTIVATION, le * n_expert)?,
        }))
    }

    /// The statistics of a subset of experts, `kept[l]` listing layer `l`'s kept experts in
    /// their new order (every layer keeps the same number).
    pub fn select(&self, kept: &[Vec<usize>]) -> Self {
        let n = kept.iter().map(Vec::len).max().unwrap_or(0);
        let mut out = Self::new(self.n_layer, n);
        out.tokens = self.tokens;
        for (l, ks) in kept.iter().enumerate() {
            for (i, &e) in ks.iter().enumerate() {
                let (dst, src) = (out.idx(l, i), self.idx(l, e));
                out.frequency[dst] = self.frequency[src];
                out.router_mass[dst] = self.router_mass[src];
                out.drop_kl[dst] = self.drop_kl[src];
                if l > 0 {
                    for (j, &p) in kept[l - 1].iter().enumerate() {
                        out.coactivation[dst * n + j] = self.coactivation[src * self.n_expert + p];
                    }
                }
            }
        }
        out
    }

    /// Layer `l`'s experts, most frequently selected first (ties: higher router mass, then
    /// lower index).
    pub fn by_frequency(&self, l: usize) -> Vec<usize> {
        let mut ids: Vec<usize> = (0..self.n_expert).collect();
        ids.sort_by(|&a, &b| {
            let (ia, ib) = (self.idx(l, a), self.idx(l, b));
            self.frequency[ib]
                .total_cmp(&self.frequency[ia])
                .then(self.router_mass[ib].total_cmp(&self.router_mass[ia]))
                .then(a.cmp(&b))
        });
        ids
    }

    /// Layer `l`'s experts, most router mass first (ties to the lower index).
    pub fn by_mass(&self, l: usize) -> Vec<usize> {
        let mut ids: Vec<usize> = (0..self.n_expert).collect();
        ids.sort_by(|&a, &b| {
            self.router_mass[self.idx(l, b)]
                .total_cmp(&self.router_mass[self.idx(l, a)])
                .then(a.cmp(&b))
        });
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, TensorDecl};

    #[test]
    fn metadata_round_trip_and_selection() {
        let mut s = CalibStats::new(2, 3);
        s.tokens = 10;
        for i in 0..6 {
            s.frequency[i] = i as f32;
            s.router_mass[i] = 0.5 * i as f32;
            s.drop_kl[i] = 0.1 * i as f32;
        }
        for i in 0..18 {
            s.coactivation[i] = i as f32;
        }
        let decl = TensorDecl {
            name: "x".into(),
            dims: vec![4],
            ty: crate::gguf::GgmlType::F32,
        };
        let mut w = GgufWriter::begin(Vec::new(), &s.to_metadata(), vec![decl], 32).unwrap();
        w.write_tensor_data(&[0u8; 16]).unwrap();
        let bytes = w.finish().unwrap();
        let h = GgufHeader::parse(&bytes).unwrap();
        let back = CalibStats::from_header(&h, 2, 3).unwrap().unwrap();
        assert_eq!(back, s);
        assert!(CalibStats::from_header(&h, 3, 3).is_err());
        // Keep experts 2 and 0 of layer 0, 1 and 2 of layer 1.
        let sel = s.select(&[vec![2, 0], vec![1, 2]]);
        assert_eq!(sel.frequency, vec![2.0, 0.0, 4.0, 5.0]);
        // [l=1, e=1 (was 4), p=0 (was 2)] = old coactivation[(1*3+1)*3 + 2]
        assert_eq!(sel.coactivation[2 * 2], 14.0);
        assert_eq!(sel.coactivation[(2 + 1) * 2 + 1], 15.0);
        assert_eq!(s.by_frequency(1), vec![2, 1, 0]);
    }
}
