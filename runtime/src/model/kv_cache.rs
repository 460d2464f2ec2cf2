//! Key/value cache, allocated once for the whole context: f16 by default (half the memory, like
//! llama.cpp), f32 on request (bit-exact comparisons against references).

use half::f16;

use super::HParams;
use crate::tensor::Kernels;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

impl KvType {
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "f16" => Some(Self::F16),
            "f32" => Some(Self::F32),
            _ => None,
        }
    }
}

enum Store {
    /// Per layer: `[n_ctx, width]`.
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    /// Per layer: `[n_ctx, width]` as f16 bits.
    F16 {
        keys: Vec<Vec<u16>>,
        values: Vec<Vec<u16>>,
    },
}

pub struct KvCache {
    n_ctx: usize,
    /// Width of one position's keys (`n_head_kv * head_dim_k`) and values.
    k_width: usize,
    v_width: usize,
    head_dim_k: usize,
    head_dim_v: usize,
    /// MLA: a position's value is the first `head_dim_v` entries of its key (the latent), so
    /// values are not stored separately.
    values_in_keys: bool,
    store: Store,
}

impl KvCache {
    pub fn new(hp: &HParams, n_ctx: usize, ty: KvType) -> Self {
        let k_width = hp.n_head_kv * hp.head_dim_k;
        let values_in_keys = hp.mla.is_some();
        let v_width = hp.n_head_kv * hp.head_dim_v;
        let v_len = if values_in_keys { 0 } else { n_ctx * v_width };
        let layers = hp.n_layer;
        let store = match ty {
            KvType::F32 => Store::F32 {
                keys: (0..layers).map(|_| vec![0.0; n_ctx * k_width]).collect(),
                values: (0..layers).map(|_| vec![0.0; v_len]).collect(),
            },
            KvType::F16 => Store::F16 {
                keys: (0..layers).map(|_| vec![0; n_ctx * k_width]).collect(),
                values: (0..layers).map(|_| vec![0; v_len]).collect(),
            },
        };
        Self {
            n_ctx,
            k_width,
            v_width,
            head_dim_k: hp.head_dim_k,
            head_dim_v: hp.head_dim_v,
            values_in_keys,
            store,
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32 { .. } => KvType::F32,
            Store::F16 { .. } => KvType::F16,
        }
    }

    /// Bytes held, for reporting.
    pub fn bytes(&self) -> usize {
        let per_value = match self.store {
            Store::F32 { .. } => 4,
            Store::F16 { .. } => 2,
        };
        let layers = match &self.store {
            Store::F32 { keys, .. } => keys.len(),
            Store::F16 { keys, .. } => keys.len(),
        };
        layers * self.n_ctx * self.bytes_per_position_per_layer(per_value)
    }

    fn bytes_per_position_per_layer(&self, per_value: usize) -> usize {
        let v = if self.values_in_keys { 0 } else { self.v_width };
        (self.k_width + v) * per_value
    }

    /// Writes `n` positions starting at `pos` (caller checked the bounds). With values kept in
    /// the keys (MLA), `v` is ignored.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32], n: usize) {
        let v = if self.values_in_keys { &[][..] } else { v };
        let v_width = if self.values_in_keys { 0 } else { self.v_width };
        let (kr, vr) = (
            pos * self.k_width..(pos + n) * self.k_width,
            pos * v_width..(pos + n) * v_width,
        );
        match &mut self.store {
            Store::F32 { keys, values } => {
                keys[layer][kr].copy_from_slice(&k[..n * self.k_width]);
                values[layer][vr].copy_from_slice(&v[..n * v_width]);
            }
            Store::F16 { keys, values } => {
                for (d, s) in keys[layer][kr].iter_mut().zip(k) {
                    *d = f16::from_f32(*s).to_bits();
                }
                for (d, s) in values[layer][vr].iter_mut().zip(v) {
                    *d = f16::from_f32(*s).to_bits();
                }
            }
        }
    }

    /// A read-only view of one layer for attention.
    pub fn layer(&self, layer: usize) -> LayerKv<'_> {
        LayerKv { cache: self, layer }
    }
}

#[derive(Clone, Copy)]
pub struct LayerKv<'c> {
    cache: &'c KvCache,
    layer: usize,
}

impl LayerKv<'_> {
    /// Positions the cache holds.
    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx
    }

    /// `q . key[pos, kv_head]`.
    #[inline]
    pub fn key_dot(&self, k: &Kernels, pos: usize, kv_head: usize, q: &[f32]) -> f32 {
        let c = self.cache;
        let at = pos * c.k_width + kv_head * c.head_dim_k;
        match &c.store {
            Store::F32 { keys, .. } => (k.dot_f32)(q, &keys[self.layer][at..at + c.head_dim_k]),
            Store::F16 { keys, .. } => (k.dot_f16)(
                bytemuck::cast_slice(&keys[self.layer][at..at + c.head_dim_k]),
                q,
            ),
        }
    }

    /// `out += w * value[pos, kv_head]`.
    #[inline]
    pub fn add_value(&self, k: &Kernels, pos: usize, kv_head: usize, w: f32, out: &mut [f32]) {
        let c = self.cache;
        if c.values_in_keys {
            return self.add_key_prefix(k, pos, kv_head, w, out);
        }
        let at = pos * c.v_width + kv_head * c.head_dim_v;
        match &c.store {
            Store::F32 { values, .. } => {
                for (o, &v) in out
                    .iter_mut()
                    .zip(&values[self.layer][at..at + c.head_dim_v])
                {
                    *o += w * v;
                }
            }
            Store::F16 { values, .. } => (k.axpy_f16)(
                w,
                bytemuck::cast_slice(&values[self.layer][at..at + c.head_dim_v]),
                out,
            ),
        }
    }

    /// `out += w * key[pos, kv_head][..head_dim_v]` (MLA: the value is the latent).
    #[inline]
    fn add_key_prefix(&self, k: &Kernels, pos: usize, kv_head: usize, w: f32, out: &mut [f32]) {
        let c = self.cache;
        let at = pos * c.k_width + kv_head * c.head_dim_k;
        match &c.store {
            Store::F32 { keys, .. } => {
                for (o, &v) in out.iter_mut().zip(&keys[self.layer][at..at + c.head_dim_v]) {
                    *o += w * v;
                }
            }
            Store::F16 { keys, .. } => (k.axpy_f16)(
                w,
                bytemuck::cast_slice(&keys[self.layer][at..at + c.head_dim_v]),
                out,
            ),
        }
    }
}
