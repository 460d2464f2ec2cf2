//! Where every routed expert's three slabs are in the model file, and the room a cache slot
//! needs to hold the largest of them.

use super::flash::{Extent, PAGE};
use crate::gguf::GgmlType;

/// One routed expert of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

/// One of an expert's matrices (gate, up or down) as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlabSpec {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    /// Where the slab's bytes start in the file.
    pub file_offset: u64,
    pub bytes: usize,
}

/// The file location of every routed expert.
pub struct ExpertLayout {
    /// Per layer, per expert: gate, up, down (None for dense layers).
    layers: Vec<Option<Vec<[SlabSpec; 3]>>>,
    n_expert: usize,
}

impl ExpertLayout {
    /// The layout of a model whose layer `l` has the experts `layers[l]`, each as its gate, up
    /// and down slabs (`None` for a dense layer). Experts of one layer may differ in type and
    /// size (mixed-precision files).
    pub fn new(layers: Vec<Option<Vec<[SlabSpec; 3]>>>) -> Self {
        let n_expert = layers.iter().flatten().map(Vec::len).max().unwrap_or(0);
        Self { layers, n_expert }
    }

    /// Where every routed expert's slabs start in the file.
    pub(super) fn slab_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        let slabs = self.layers.iter().flatten().flatten().flatten();
        slabs.filter(|s| s.bytes > 0).map(|s| s.file_offset)
    }

    pub(super) fn extents(&self, key: ExpertKey) -> [Extent; 3] {
        self.specs(key).map(|s| Extent {
            offset: s.file_offset,
            len: s.bytes,
        })
    }

    pub(super) fn specs(&self, key: ExpertKey) -> [SlabSpec; 3] {
        self.layers[key.layer as usize]
            .as_ref()
            .expect("routed experts only in MoE layers")[key.expert as usize]
    }

    /// Bytes of one expert (three slabs) as stored in the file.
    pub fn expert_bytes(&self, layer: usize, expert: usize) -> usize {
        let specs = self.layers[layer].as_ref().and_then(|l| l.get(expert));
        specs.map_or(0, |s| s.iter().map(|x| x.bytes).sum())
    }

    /// Bytes of the largest expert of `layer` (0 for a dense layer).
    pub fn max_expert_bytes(&self, layer: usize) -> usize {
        (0..self.n_expert)
            .map(|e| self.expert_bytes(layer, e))
            .max()
            .unwrap_or(0)
    }

    /// Room one slot needs: the largest expert of any layer, each slab page-aligned; returns the
    /// total and each slab's share (gate, up, down).
    pub(super) fn slot_span(&self) -> (usize, [usize; 3]) {
        let mut spans = [0usize; 3];
        for specs in self.layers.iter().flatten().flatten() {
            for (i, s) in specs.iter().enumerate() {
                // Worst-case misalignment of a slab start within a page.
                let worst = if s.bytes % PAGE == 0 && s.file_offset % PAGE as u64 == 0 {
                    s.bytes
                } else {
                    s.bytes + PAGE
                };
                spans[i] = spans[i].max(worst.div_ceil(PAGE) * PAGE);
            }
        }
        (spans.iter().sum(), spans)
    }

    /// Bytes one cache slot takes for this model.
    pub fn slot_bytes(&self) -> usize {
        self.slot_span().0
    }

    /// Total bytes of routed experts in the file.
    pub fn total_expert_bytes(&self) -> usize {
        (0..self.layers.len())
            .flat_map(|l| (0..self.n_expert).map(move |e| (l, e)))
            .map(|(l, e)| self.expert_bytes(l, e))
            .sum()
    }

    pub fn n_expert(&self) -> usize {
        self.n_expert
    }

    /// Layers of the model, dense ones included.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(Option::is_some)
    }
}
