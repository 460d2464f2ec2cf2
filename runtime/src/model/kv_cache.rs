//! Key/value cache, allocated once for the whole context.

use super::HParams;

pub struct KvCache {
    n_ctx: usize,
    k_width: usize,
    v_width: usize,
    /// Per layer: `[n_ctx, n_head_kv * head_dim_k]`.
    keys: Vec<Vec<f32>>,
    /// Per layer: `[n_ctx, n_head_kv * head_dim_v]`.
    values: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(hp: &HParams, n_ctx: usize) -> Self {
        let k_width = hp.n_head_kv * hp.head_dim_k;
        let v_width = hp.n_head_kv * hp.head_dim_v;
        Self {
            n_ctx,
            k_width,
            v_width,
            keys: (0..hp.n_layer)
                .map(|_| vec![0.0; n_ctx * k_width])
                .collect(),
            values: (0..hp.n_layer)
                .map(|_| vec![0.0; n_ctx * v_width])
                .collect(),
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Bytes held, for reporting.
    pub fn bytes(&self) -> usize {
        self.keys.len() * self.n_ctx * (self.k_width + self.v_width) * 4
    }

    /// Writes `n` positions starting at `pos` (caller checked the bounds).
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32], n: usize) {
        self.keys[layer][pos * self.k_width..(pos + n) * self.k_width]
            .copy_from_slice(&k[..n * self.k_width]);
        self.values[layer][pos * self.v_width..(pos + n) * self.v_width]
            .copy_from_slice(&v[..n * self.v_width]);
    }

    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}
