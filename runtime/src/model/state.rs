//! What a session keeps per layer between forward passes, in one store: the KV cache of
//! attention layers (f16 by default, half the memory like llama.cpp; f32 on request for
//! bit-exact comparisons against references). Allocated once for the whole context, so decoding
//! allocates nothing; a sliding-window layer keeps only a ring of its window (plus room for one
//! chunk of a batch), so its memory does not grow with the context. Recurrent layer kinds add
//! their fixed-size state here.

use half::f16;

use super::weights::{Mixer, Model};
use crate::tensor::Kernels;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    #[default]
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

    fn bytes_per_value(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

/// A sliding-window layer's ring holds its window plus `SWA_CHUNK - 1` positions, and attention
/// stores and attends a batch in chunks of at most `SWA_CHUNK` tokens: the oldest key the first
/// token of a chunk needs is still there when the chunk's last one is stored (llama.cpp sizes
/// its SWA cache the same way, window plus a micro-batch).
pub const SWA_CHUNK: usize = 32;

/// `[slots, width]` keys and values.
enum Store {
    F32 {
        keys: Vec<f32>,
        values: Vec<f32>,
    },
    /// As f16 bits.
    F16 {
        keys: Vec<u16>,
        values: Vec<u16>,
    },
}

/// Widths of one position's cached keys and values in an attention layer.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub n_head_kv: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    /// MLA: a position's value is the first `head_dim_v` entries of its key (the latent), so
    /// values are not stored separately.
    pub values_in_keys: bool,
}

/// One attention layer's KV cache: position `p` lives in slot `p % slots` (every position of the
/// context has its own slot unless the layer keeps a sliding-window ring).
pub struct KvLayer {
    slots: usize,
    /// Width of one position's keys (`n_head_kv * head_dim_k`) and values.
    k_width: usize,
    v_width: usize,
    head_dim_k: usize,
    head_dim_v: usize,
    values_in_keys: bool,
    store: Store,
}

impl KvLayer {
    /// A cache of `slots` positions.
    pub fn new(shape: KvShape, slots: usize, ty: KvType) -> Self {
        let k_width = shape.n_head_kv * shape.head_dim_k;
        let v_width = if shape.values_in_keys {
            0
        } else {
            shape.n_head_kv * shape.head_dim_v
        };
        let store = match ty {
            KvType::F32 => Store::F32 {
                keys: vec![0.0; slots * k_width],
                values: vec![0.0; slots * v_width],
            },
            KvType::F16 => Store::F16 {
                keys: vec![0; slots * k_width],
                values: vec![0; slots * v_width],
            },
        };
        Self {
            slots,
            k_width,
            v_width,
            head_dim_k: shape.head_dim_k,
            head_dim_v: shape.head_dim_v,
            values_in_keys: shape.values_in_keys,
            store,
        }
    }

    /// Positions the cache holds at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    #[inline]
    fn slot(&self, pos: usize) -> usize {
        if pos < self.slots {
            pos
        } else {
            pos % self.slots
        }
    }

    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32 { .. } => KvType::F32,
            Store::F16 { .. } => KvType::F16,
        }
    }

    /// Bytes held, for reporting.
    pub fn bytes(&self) -> usize {
        self.slots * (self.k_width + self.v_width) * self.kv_type().bytes_per_value()
    }

    /// Writes `n` positions starting at `pos` (the caller checked the bounds; at most `slots`
    /// positions, which then overwrite the oldest). With values kept in the keys (MLA), `v` is
    /// ignored.
    pub fn store(&mut self, pos: usize, k: &[f32], v: &[f32], n: usize) {
        debug_assert!(n <= self.slots);
        let (kw, vw) = (self.k_width, self.v_width);
        for i in 0..n {
            let at = self.slot(pos + i);
            let (kr, vr) = (at * kw..(at + 1) * kw, at * vw..(at + 1) * vw);
            let (ks, vs) = (&k[i * kw..(i + 1) * kw], &v[i * vw..(i + 1) * vw]);
            match &mut self.store {
                Store::F32 { keys, values } => {
                    keys[kr].copy_from_slice(ks);
                    values[vr].copy_from_slice(vs);
                }
                Store::F16 { keys, values } => {
                    for (d, s) in keys[kr].iter_mut().zip(ks) {
                        *d = f16::from_f32(*s).to_bits();
                    }
                    for (d, s) in values[vr].iter_mut().zip(vs) {
                        *d = f16::from_f32(*s).to_bits();
                    }
                }
            }
        }
    }

    /// `q . key[pos, kv_head]`.
    #[inline]
    pub fn key_dot(&self, k: &Kernels, pos: usize, kv_head: usize, q: &[f32]) -> f32 {
        let at = self.slot(pos) * self.k_width + kv_head * self.head_dim_k;
        let r = at..at + self.head_dim_k;
        match &self.store {
            Store::F32 { keys, .. } => (k.dot_f32)(q, &keys[r]),
            Store::F16 { keys, .. } => (k.dot_f16)(bytemuck::cast_slice(&keys[r]), q),
        }
    }

    /// `out += w * value[pos, kv_head]`.
    #[inline]
    pub fn add_value(&self, k: &Kernels, pos: usize, kv_head: usize, w: f32, out: &mut [f32]) {
        let slot = self.slot(pos);
        let (rows_are_keys, at) = if self.values_in_keys {
            (true, slot * self.k_width + kv_head * self.head_dim_k)
        } else {
            (false, slot * self.v_width + kv_head * self.head_dim_v)
        };
        let r = at..at + self.head_dim_v;
        match &self.store {
            Store::F32 { keys, values } => {
                let v = if rows_are_keys { &keys[r] } else { &values[r] };
                for (o, &v) in out.iter_mut().zip(v) {
                    *o += w * v;
                }
            }
            Store::F16 { keys, values } => {
                let v = if rows_are_keys { &keys[r] } else { &values[r] };
                (k.axpy_f16)(w, bytemuck::cast_slice(v), out)
            }
        }
    }
}

/// A short convolution's state: the last `taps - 1` inputs of its convolution (`[taps - 1, d]`,
/// oldest first), and a copy of it taken at one earlier position (the sequence's snapshot).
/// Its size does not depend on the context.
pub struct ConvState {
    values: Vec<f32>,
    snapshot: Vec<f32>,
}

impl ConvState {
    pub fn new(taps: usize, d: usize) -> Self {
        let len = taps.saturating_sub(1) * d;
        Self {
            values: vec![0.0; len],
            snapshot: vec![0.0; len],
        }
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Bytes held: the state and its snapshot.
    pub fn bytes(&self) -> usize {
        (self.values.len() + self.snapshot.len()) * std::mem::size_of::<f32>()
    }

    fn save(&mut self) {
        self.snapshot.copy_from_slice(&self.values);
    }

    fn restore(&mut self) {
        self.values.copy_from_slice(&self.snapshot);
    }
}

/// A Gated DeltaNet's state: its convolution's last `K - 1` inputs (`[K - 1, conv_dim]`) and the
/// delta rule's matrix per value head (`[n_v_heads, head_k_dim, head_v_dim]`), each with a copy
/// taken at one earlier position (the sequence's snapshot). Its size does not depend on the
/// context.
pub struct DeltaState {
    pub conv: ConvState,
    matrices: Vec<f32>,
    snapshot: Vec<f32>,
}

impl DeltaState {
    pub fn new(p: &super::hparams::GdnParams) -> Self {
        let len = p.n_v_heads * p.head_k_dim * p.head_v_dim;
        Self {
            conv: ConvState::new(p.conv_kernel, p.conv_dim()),
            matrices: vec![0.0; len],
            snapshot: vec![0.0; len],
        }
    }

    /// Whether this state has the shape of a layer with `p`'s dimensions.
    pub fn fits(&self, p: &super::hparams::GdnParams) -> bool {
        self.matrices.len() == p.n_v_heads * p.head_k_dim * p.head_v_dim
            && self.conv.values.len() == p.conv_kernel.saturating_sub(1) * p.conv_dim()
    }

    /// `[n_v_heads, head_k_dim, head_v_dim]`.
    pub fn matrices_mut(&mut self) -> &mut [f32] {
        &mut self.matrices
    }

    /// Bytes held: both states and their snapshots.
    pub fn bytes(&self) -> usize {
        self.conv.bytes() + (self.matrices.len() + self.snapshot.len()) * std::mem::size_of::<f32>()
    }

    fn save(&mut self) {
        self.conv.save();
        self.snapshot.copy_from_slice(&self.matrices);
    }

    fn restore(&mut self) {
        self.conv.restore();
        self.matrices.copy_from_slice(&self.snapshot);
    }
}

/// A Mamba-2 layer's state: its convolution's last `K - 1` inputs (`[K - 1, conv_dim]`) and the
/// scan's state per head (`[n_heads, head_dim, d_state]`, llama.cpp's layout), each with a copy
/// taken at one earlier position (the sequence's snapshot). Its size does not depend on the
/// context.
pub struct SsmState {
    pub conv: ConvState,
    states: Vec<f32>,
    snapshot: Vec<f32>,
}

impl SsmState {
    pub fn new(p: &super::hparams::Mamba2Params) -> Self {
        let len = p.d_inner * p.d_state;
        Self {
            conv: ConvState::new(p.conv_kernel, p.conv_dim()),
            states: vec![0.0; len],
            snapshot: vec![0.0; len],
        }
    }

    /// Whether this state has the shape of a layer with `p`'s dimensions.
    pub fn fits(&self, p: &super::hparams::Mamba2Params) -> bool {
        self.states.len() == p.d_inner * p.d_state
            && self.conv.values.len() == p.conv_kernel.saturating_sub(1) * p.conv_dim()
    }

    /// `[n_heads, head_dim, d_state]`.
    pub fn states_mut(&mut self) -> &mut [f32] {
        &mut self.states
    }

    /// Bytes held: both states and their snapshots.
    pub fn bytes(&self) -> usize {
        self.conv.bytes() + (self.states.len() + self.snapshot.len()) * std::mem::size_of::<f32>()
    }

    fn save(&mut self) {
        self.conv.save();
        self.snapshot.copy_from_slice(&self.states);
    }

    fn restore(&mut self) {
        self.conv.restore();
        self.states.copy_from_slice(&self.snapshot);
    }
}

/// The state one layer keeps between forward passes.
pub enum LayerState {
    /// Attention of any kind: its KV cache.
    Kv(KvLayer),
    /// A recurrent layer (LFM2's short convolution): fixed-size state that holds the whole past
    /// in a summary, so it cannot go back to an earlier position.
    Conv(ConvState),
    /// A Gated DeltaNet (Qwen3.5): recurrent as `Conv`.
    Delta(Box<DeltaState>),
    /// A Mamba-2 layer (Granite-4.0-H): recurrent as `Conv`.
    Ssm(Box<SsmState>),
}

impl LayerState {
    fn is_recurrent(&self) -> bool {
        !matches!(self, LayerState::Kv(_))
    }

    /// Copies a recurrent state into its snapshot.
    fn save(&mut self) {
        match self {
            LayerState::Kv(_) => {}
            LayerState::Conv(c) => c.save(),
            LayerState::Delta(d) => d.save(),
            LayerState::Ssm(m) => m.save(),
        }
    }

    /// Takes a recurrent state's snapshot back.
    fn restore(&mut self) {
        match self {
            LayerState::Kv(_) => {}
            LayerState::Conv(c) => c.restore(),
            LayerState::Delta(d) => d.restore(),
            LayerState::Ssm(m) => m.restore(),
        }
    }

    fn kv_bytes(&self) -> usize {
        match self {
            LayerState::Kv(kv) => kv.bytes(),
            LayerState::Conv(_) | LayerState::Delta(_) | LayerState::Ssm(_) => 0,
        }
    }

    fn recurrent_bytes(&self) -> usize {
        match self {
            LayerState::Kv(_) => 0,
            LayerState::Conv(c) => c.bytes(),
            LayerState::Delta(d) => d.bytes(),
            LayerState::Ssm(m) => m.bytes(),
        }
    }
}

/// The KV cache an attention layer `li` of `model` keeps for `n_ctx` positions: its shape and
/// slots (None: the layer's mixer keeps no KV cache).
fn kv_plan(model: &Model, li: usize, n_ctx: usize) -> Option<(KvShape, usize)> {
    let hp = &model.hp;
    match &model.layers[li].mixer {
        Mixer::Attention(a) => Some((
            KvShape {
                n_head_kv: hp.layer_dims(li).n_head_kv,
                head_dim_k: hp.layer_dims(li).head_dim_k,
                head_dim_v: hp.layer_dims(li).head_dim_v,
                values_in_keys: false,
            },
            a.window.map_or(n_ctx, |w| (w + SWA_CHUNK - 1).min(n_ctx)),
        )),
        // The cache holds one latent and shared rotary key per token (the MQA view of
        // `head_dim_k` wide); the value is the latent.
        Mixer::Mla(_) => Some((
            KvShape {
                n_head_kv: 1,
                head_dim_k: hp.head_dim_k,
                head_dim_v: hp.head_dim_v,
                values_in_keys: true,
            },
            n_ctx,
        )),
        Mixer::ShortConv(_) | Mixer::GatedDeltaNet(_) | Mixer::Mamba2(_) => None,
    }
}

/// Every layer's state for one sequence (the default holds no layer: a placeholder while a
/// session's own state is lent to a batch).
#[derive(Default)]
pub struct SequenceState {
    layers: Vec<LayerState>,
    n_ctx: usize,
    kv_type: KvType,
    /// The position whose recurrent state the layers' snapshots hold, if any: the sequence can
    /// be rewound there (KV caches keep every earlier position anyway).
    snapshot: Option<usize>,
}

impl SequenceState {
    /// State for every layer of `model`, holding `n_ctx` positions.
    pub fn new(model: &Model, n_ctx: usize, kv_type: KvType) -> Self {
        let layers = (0..model.layers.len())
            .map(
                |li| match (kv_plan(model, li, n_ctx), &model.layers[li].mixer) {
                    (Some((shape, slots)), _) => {
                        LayerState::Kv(KvLayer::new(shape, slots, kv_type))
                    }
                    (None, Mixer::ShortConv(c)) => {
                        LayerState::Conv(ConvState::new(c.taps, model.hp.n_embd))
                    }
                    (None, Mixer::GatedDeltaNet(g)) => {
                        LayerState::Delta(Box::new(DeltaState::new(&g.dims)))
                    }
                    (None, Mixer::Mamba2(m)) => LayerState::Ssm(Box::new(SsmState::new(&m.dims))),
                    (None, _) => unreachable!("every attention mixer keeps a KV cache"),
                },
            )
            .collect();
        Self {
            layers,
            n_ctx,
            kv_type,
            snapshot: None,
        }
    }

    /// Whether this is state for `model`'s layers holding `n_ctx` positions (each layer's kind
    /// and shape of state for its mixer), as [`new`](Self::new) makes it.
    pub fn fits(&self, model: &Model, n_ctx: usize) -> bool {
        self.n_ctx == n_ctx
            && self.layers.len() == model.layers.len()
            && self.layers.iter().enumerate().all(|(li, st)| {
                match (st, kv_plan(model, li, n_ctx), &model.layers[li].mixer) {
                    (LayerState::Kv(kv), Some((shape, slots)), _) => {
                        let fresh = KvLayer::new(shape, 0, kv.kv_type());
                        (kv.slots, kv.k_width, kv.v_width) == (slots, fresh.k_width, fresh.v_width)
                    }
                    (LayerState::Conv(c), None, Mixer::ShortConv(sc)) => {
                        c.values.len() == sc.taps.saturating_sub(1) * model.hp.n_embd
                    }
                    (LayerState::Delta(st), None, Mixer::GatedDeltaNet(g)) => st.fits(&g.dims),
                    (LayerState::Ssm(st), None, Mixer::Mamba2(m)) => st.fits(&m.dims),
                    _ => false,
                }
            })
    }

    /// Whether some layer's state is recurrent (it cannot go back to any position).
    pub fn is_recurrent(&self) -> bool {
        self.layers.iter().any(LayerState::is_recurrent)
    }

    /// Copies every recurrent layer's state, as it is after `pos` positions, into its snapshot
    /// (replacing the previous one), so that the sequence can be rewound to `pos` later.
    pub fn take_snapshot(&mut self, pos: usize) {
        self.layers.iter_mut().for_each(LayerState::save);
        self.snapshot = Some(pos);
    }

    /// Cuts a sequence of `from` positions back to `to` (the caller checked
    /// [`can_rewind`](Self::can_rewind)): recurrent layers take their snapshot back unless the
    /// sequence stays where it is or starts over, and a snapshot beyond `to` is forgotten.
    pub fn rewind(&mut self, from: usize, to: usize) {
        debug_assert!(self.can_rewind(from, to));
        if to != from && to != 0 && self.snapshot == Some(to) {
            self.layers.iter_mut().for_each(LayerState::restore);
        }
        if self.snapshot.is_some_and(|s| s > to) {
            self.snapshot = None;
        }
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Whether a sequence of `from` positions can be cut back to its first `to` (every layer
    /// still holds what it needs for them). A KV cache keeps every position, so it always can;
    /// a recurrent state holds only the latest one and its snapshot, so it can stay where it
    /// is, go back to the snapshot, or start over.
    pub fn can_rewind(&self, from: usize, to: usize) -> bool {
        let recurrent_ok = to == from || to == 0 || self.snapshot == Some(to);
        to <= from && (recurrent_ok || !self.is_recurrent())
    }

    /// The furthest position at most `at_most` that a sequence of `from` positions can be cut
    /// back to.
    pub fn rewind_point(&self, from: usize, at_most: usize) -> usize {
        let at_most = at_most.min(from);
        if self.can_rewind(from, at_most) {
            return at_most;
        }
        self.snapshot.filter(|&s| s <= at_most).unwrap_or(0)
    }

    /// Positions every layer holds.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerState {
        &mut self.layers[layer]
    }

    /// Bytes held by KV caches (they grow with the context).
    pub fn kv_bytes(&self) -> usize {
        self.layers.iter().map(LayerState::kv_bytes).sum()
    }

    /// Bytes held by recurrent layers' state and its snapshot (fixed, whatever the context).
    pub fn recurrent_bytes(&self) -> usize {
        self.layers.iter().map(LayerState::recurrent_bytes).sum()
    }
}
