//! A bounded RAM cache of routed experts, filled from the model file by I/O threads.
//!
//! Each slot holds one expert of one layer (its gate, up and down slabs, each read with one
//! page-aligned read). The compute thread asks for the experts a layer actually routed to; a
//! missing one is read at once, ahead of any speculative read, and each expert is handed out as
//! soon as it is loaded, so the present ones are computed while the missing ones are read (the
//! compute thread waits only when nothing it asked for is ready: a "stall", counted and timed).
//! Predictors ask for experts they expect soon; such a speculative read only takes a slot whose
//! expert is predicted later (or not at all) and is not more frequently used, and the bytes of
//! speculative reads in flight are capped, so prefetching never displaces what is about to be
//! used nor delays a demand read for long.
//!
//! Slot memory is written only while its slot is `loading` (each byte by exactly one read, the
//! pieces of an expert's slabs going to several I/O threads at once) and read only while it is
//! ready and pinned by a guard; the state mutex orders the two.

use std::alloc::Layout;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;

use super::flash::{Extent, FlashProfile, FlashReader, PAGE, PIECE};
use crate::gguf::GgmlType;
use crate::model::{Ffn, Mlp, Model};
use crate::tensor::QMatrix;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

/// How a full cache chooses what to drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Least recently used.
    Lru,
    /// Least frequently used (exponential moving average of uses).
    Lfu,
    /// Belady: the expert whose next predicted use is farthest (unpredicted ones first),
    /// least recently used among equals.
    Belady,
}

impl Eviction {
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "lru" => Some(Self::Lru),
            "lfu" => Some(Self::Lfu),
            "belady" => Some(Self::Belady),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub slots: usize,
    pub eviction: Eviction,
    /// Bypass the page cache (O_DIRECT).
    pub direct_io: bool,
    /// Emulated storage speed (measurement only).
    pub flash: Option<FlashProfile>,
    pub io_threads: usize,
    /// Cap on bytes of speculative reads queued or in flight.
    pub max_speculative_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("expert cache: cannot open {path}: {cause}")]
    Open { path: String, cause: std::io::Error },
    #[error("reading expert {expert} of layer {layer} from the model file failed: {cause}")]
    Read {
        layer: u32,
        expert: u32,
        cause: String,
    },
    #[error("{0}")]
    Budget(String),
}

/// Where one layer's stacked expert tensors are in the file.
#[derive(Clone, Copy, Debug)]
struct SlabSpec {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    file_offset: u64,
    slab_bytes: usize,
}

/// The file location of every routed expert, taken from the model.
pub struct ExpertLayout {
    /// Per layer, per expert: gate, up, down (None for dense layers). Experts of one layer
    /// differ in type and size in mixed-precision files.
    layers: Vec<Option<Vec<[SlabSpec; 3]>>>,
    n_expert: usize,
}

impl ExpertLayout {
    pub fn from_model(model: &Model) -> Self {
        let layers = model
            .layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Moe(moe) => {
                    let spec = |s: &crate::model::StackedExperts, e: usize| SlabSpec {
                        ty: s.slabs[e].ty,
                        rows: s.rows,
                        cols: s.cols,
                        file_offset: s.slabs[e].file_offset as u64,
                        slab_bytes: s.slab_bytes(e),
                    };
                    let x = &moe.experts;
                    Some(
                        (0..x.gate.n_expert)
                            .map(|e| [spec(&x.gate, e), spec(&x.up, e), spec(&x.down, e)])
                            .collect(),
                    )
                }
                Ffn::Dense(_) => None,
            })
            .collect();
        Self {
            layers,
            n_expert: model.hp.n_expert,
        }
    }

    /// Where every routed expert's slabs start in the file.
    fn slab_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        let slabs = self.layers.iter().flatten().flatten().flatten();
        slabs.filter(|s| s.slab_bytes > 0).map(|s| s.file_offset)
    }

    fn extents(&self, key: ExpertKey) -> [Extent; 3] {
        self.specs(key).map(|s| Extent {
            offset: s.file_offset,
            len: s.slab_bytes,
        })
    }

    fn specs(&self, key: ExpertKey) -> [SlabSpec; 3] {
        self.layers[key.layer as usize]
            .as_ref()
            .expect("routed experts only in MoE layers")[key.expert as usize]
    }

    /// Bytes of one expert (three slabs) as stored in the file.
    pub fn expert_bytes(&self, layer: usize, expert: usize) -> usize {
        self.layers[layer]
            .as_ref()
            .map_or(0, |s| s[expert].iter().map(|x| x.slab_bytes).sum())
    }

    /// Bytes of the largest expert of `layer` (0 for a dense layer).
    pub fn max_expert_bytes(&self, layer: usize) -> usize {
        (0..self.n_expert)
            .map(|e| self.expert_bytes(layer, e))
            .max()
            .unwrap_or(0)
    }

    /// Room one slot needs: the largest expert of any layer, each slab page-aligned.
    fn slot_span(&self) -> (usize, [usize; 3]) {
        let mut spans = [0usize; 3];
        for specs in self.layers.iter().flatten().flatten() {
            for (i, s) in specs.iter().enumerate() {
                // Worst-case misalignment of a slab start within a page.
                let worst = if s.slab_bytes % PAGE == 0 && s.file_offset % PAGE as u64 == 0 {
                    s.slab_bytes
                } else {
                    s.slab_bytes + PAGE
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

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(Option::is_some)
    }
}

/// Counters for one run, readable while it goes on.
#[derive(Default, Debug)]
struct Counters {
    demand_hits: AtomicU64,
    demand_misses: AtomicU64,
    /// Demand requests that found their expert being prefetched and waited for it.
    late_prefetches: AtomicU64,
    prefetches_issued: AtomicU64,
    /// Prefetched experts that were used before being evicted.
    prefetches_used: AtomicU64,
    prefetches_skipped: AtomicU64,
    evictions: AtomicU64,
    bytes_read: AtomicU64,
    /// Read requests sent to the file (one per slab, or one per expert when its slabs are
    /// adjacent).
    read_requests: AtomicU64,
    demand_bytes_read: AtomicU64,
    stall_nanos: AtomicU64,
    /// Experts handed out while an earlier one of their group was still loading.
    overtakes: AtomicU64,
}

/// A snapshot of the cache's counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CacheStats {
    pub slots: usize,
    pub slot_bytes: usize,
    pub demand_hits: u64,
    pub demand_misses: u64,
    pub late_prefetches: u64,
    pub prefetches_issued: u64,
    pub prefetches_used: u64,
    pub prefetches_skipped: u64,
    pub evictions: u64,
    pub bytes_read: u64,
    pub read_requests: u64,
    pub demand_bytes_read: u64,
    pub stall_seconds: f64,
    /// Experts computed while an earlier one of their layer was still being read.
    pub overtakes: u64,
}

impl CacheStats {
    pub fn hit_rate(&self) -> f64 {
        let total = self.demand_hits + self.demand_misses;
        if total == 0 {
            0.0
        } else {
            self.demand_hits as f64 / total as f64
        }
    }

    /// Fraction of speculative reads that were used.
    pub fn prefetch_precision(&self) -> f64 {
        if self.prefetches_issued == 0 {
            0.0
        } else {
            self.prefetches_used as f64 / self.prefetches_issued as f64
        }
    }
}

const NEVER: u64 = u64::MAX;

/// Rates of the per-expert moving averages, updated once per visit of the expert's layer. Chosen
/// by an offline study on the trained model's routing of held-out text (14,386 tokens, Belady's
/// offline minimum as the yardstick, rates fitted on the first half and checked on the second):
/// with the earlier 0.05 and no stickiness the cache read 1.77x the minimum at a 50% budget and
/// 1.47x at 25%; with these, 1.62x and 1.42x. Expert use is skewed and drifts slowly, so a slow
/// average wins; results barely move for frequency rates 0.003-0.01 and stickiness 0.01-0.05.
const FREQUENCY_RATE: f32 = 1.0 / 128.0;
const STICKINESS_RATE: f32 = 1.0 / 64.0;

/// How often each (layer, expert) is used, updated once per visit of its layer.
#[derive(Clone, Debug)]
struct UseStats {
    /// Moving average of "used at a visit".
    frequency: Vec<f32>,
    /// Moving average of "used again at the next visit", over the visits right after a use.
    stickiness: Vec<f32>,
    /// Whether the latest visit used it.
    used_last: Vec<bool>,
}

impl UseStats {
    fn new(keys: usize) -> Self {
        Self {
            frequency: vec![0.0; keys],
            stickiness: vec![0.0; keys],
            used_last: vec![false; keys],
        }
    }

    fn record(&mut self, i: usize, used: bool) {
        let u = used as u32 as f32;
        if self.used_last[i] {
            self.stickiness[i] += STICKINESS_RATE * (u - self.stickiness[i]);
        }
        self.frequency[i] += FREQUENCY_RATE * (u - self.frequency[i]);
        self.used_last[i] = used;
    }

    /// The chance that the next visit of its layer uses it: its frequency, or, if the latest
    /// visit used it, how often it is used again right after a use when that is higher (experts
    /// stick to a few consecutive tokens of real text: 31-45% against a mean of 17% on the
    /// trained model).
    fn next_visit_chance(&self, i: usize) -> f32 {
        if self.used_last[i] {
            self.frequency[i].max(self.stickiness[i])
        } else {
            self.frequency[i]
        }
    }
}

#[derive(Clone, Debug)]
struct Slot {
    key: Option<ExpertKey>,
    loading: bool,
    pins: u32,
    last_use: u64,
    /// Step of the next predicted use (NEVER when none is predicted).
    next_use: u64,
    /// Filled by a speculative read and not used yet.
    speculative: bool,
    /// Never evicted (hot experts pinned from calibration statistics).
    pinned: bool,
    /// Offset of each slab's bytes within its span.
    leads: [usize; 3],
    /// Reads of the expert being loaded that have not finished.
    parts_left: u32,
    /// Bytes this slot's speculative read adds to `State::speculative_bytes` until it ends.
    speculative_in_flight: usize,
}

struct State {
    slots: Vec<Slot>,
    index: HashMap<ExpertKey, usize>,
    /// Moving average of use per (layer, expert), for LFU and admission.
    uses: UseStats,
    /// Current position in the computation (token * layers + layer), the clock of LRU/Belady.
    step: u64,
    speculative_bytes: usize,
    /// Reads to do: (expert, slot, part of the expert's reads).
    queue: VecDeque<(ExpertKey, usize, u32)>,
    /// Buffers of dropped [`Arrivals`], reused so that a decode step allocates nothing.
    spare: Vec<ArrivalBuffers>,
    failure: Option<String>,
    shutdown: bool,
}

struct Memory {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: slot memory is only written by the loaders of a `loading` slot (disjoint pieces) and only read
// through pinned, ready slots; the state mutex orders the transitions (see the module docs).
unsafe impl Send for Memory {}
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: allocated in `ExpertCache::new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

struct Inner {
    layout: ExpertLayout,
    reader: FlashReader,
    cfg: CacheConfig,
    slot_span: usize,
    span_offsets: [usize; 3],
    memory: Memory,
    state: Mutex<State>,
    changed: Condvar,
    counters: Counters,
    n_layers: usize,
    /// Every demand request in order, when recording (benchmarks compare with the optimum).
    trace: Mutex<Option<Vec<ExpertKey>>>,
}

pub struct ExpertCache {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

/// The experts of one [`ExpertCache::acquire_each`] call, all pinned; each is handed out as an
/// [`ExpertGuard`] once loaded. Dropping it unpins the experts not taken.
pub struct Arrivals<'c> {
    inner: &'c Inner,
    layer: u32,
    bufs: ArrivalBuffers,
}

#[derive(Default)]
struct ArrivalBuffers {
    experts: Vec<u32>,
    slots: Vec<usize>,
    taken: Vec<bool>,
}

/// Spare [`ArrivalBuffers`] kept: one per session computing at the same time is enough.
const SPARE_ARRIVALS: usize = 8;

impl<'c> Arrivals<'c> {
    /// The `i`th expert once it is loaded: waits for it when `wait`, else `None` while it loads
    /// (or if it was taken already).
    pub fn take(&mut self, i: usize, wait: bool) -> Result<Option<ExpertGuard<'c>>, CacheError> {
        Ok(self.take_where(wait, |j| j == i)?.map(|(_, g)| g))
    }

    /// The first loaded expert not taken yet (its index and guard), waiting for one if none is
    /// loaded; `None` once all were taken.
    pub fn take_any(&mut self) -> Result<Option<(usize, ExpertGuard<'c>)>, CacheError> {
        self.take_where(true, |_| true)
    }

    fn take_where(
        &mut self,
        wait: bool,
        wanted: impl Fn(usize) -> bool,
    ) -> Result<Option<(usize, ExpertGuard<'c>)>, CacheError> {
        let inner = self.inner;
        let ArrivalBuffers {
            experts,
            slots,
            taken,
        } = &mut self.bufs;
        let mut waited: Option<Instant> = None;
        let mut st = inner.lock();
        let result = loop {
            if let Some(f) = &st.failure {
                break Err(CacheError::Read {
                    layer: self.layer,
                    expert: u32::MAX,
                    cause: f.clone(),
                });
            }
            let open = |j: &usize| !taken[*j] && wanted(*j);
            if let Some(j) = (0..slots.len())
                .filter(open)
                .find(|&j| !st.slots[slots[j]].loading)
            {
                if taken[..j].contains(&false) {
                    inner.counters.overtakes.fetch_add(1, Ordering::Relaxed);
                }
                taken[j] = true;
                let slot = slots[j];
                let guard = ExpertGuard {
                    inner,
                    slot,
                    key: ExpertKey {
                        layer: self.layer,
                        expert: experts[j],
                    },
                    leads: st.slots[slot].leads,
                };
                break Ok(Some((j, guard)));
            }
            if !wait || !(0..slots.len()).any(|j| open(&j)) {
                break Ok(None);
            }
            waited.get_or_insert_with(Instant::now);
            st = inner.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        };
        drop(st);
        if let Some(t0) = waited {
            inner.add_stall(t0);
        }
        result
    }
}

impl Drop for Arrivals<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        for (&slot, &taken) in self.bufs.slots.iter().zip(&self.bufs.taken) {
            if !taken {
                st.slots[slot].pins -= 1;
            }
        }
        if st.spare.len() < SPARE_ARRIVALS {
            let mut bufs = std::mem::take(&mut self.bufs);
            bufs.experts.clear();
            bufs.slots.clear();
            bufs.taken.clear();
            st.spare.push(bufs);
        }
        drop(st);
        self.inner.changed.notify_all();
    }
}

/// A pinned, ready expert; its slot cannot be evicted while the guard lives.
pub struct ExpertGuard<'c> {
    inner: &'c Inner,
    slot: usize,
    key: ExpertKey,
    leads: [usize; 3],
}

impl ExpertCache {
    pub fn new(
        model: &Model,
        path: &std::path::Path,
        cfg: CacheConfig,
    ) -> Result<Self, CacheError> {
        let layout = ExpertLayout::from_model(model);
        let (slot_span, spans) = layout.slot_span();
        if cfg.slots < model.hp.n_expert_used {
            return Err(CacheError::Budget(format!(
                "the expert cache needs at least {} slots (the experts one token uses), got {}",
                model.hp.n_expert_used, cfg.slots
            )));
        }
        let reader = FlashReader::open(path, cfg.direct_io, cfg.flash).map_err(|cause| {
            CacheError::Open {
                path: path.display().to_string(),
                cause,
            }
        })?;
        let size = (cfg.slots * slot_span).max(PAGE);
        let mem_layout = Layout::from_size_align(size, PAGE)
            .map_err(|e| CacheError::Budget(format!("cache of {size} bytes: {e}")))?;
        // SAFETY: non-zero size. Zeroed pages are mapped lazily, so RSS grows as slots fill.
        let ptr = unsafe { std::alloc::alloc_zeroed(mem_layout) };
        if ptr.is_null() {
            return Err(CacheError::Budget(format!(
                "cannot allocate {size} bytes for the expert cache"
            )));
        }
        let empty = Slot {
            key: None,
            loading: false,
            pins: 0,
            last_use: 0,
            next_use: NEVER,
            speculative: false,
            pinned: false,
            leads: [0; 3],
            parts_left: 0,
            speculative_in_flight: 0,
        };
        let n_layers = layout.layers.len();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                slots: vec![empty; cfg.slots],
                index: HashMap::with_capacity(cfg.slots),
                uses: UseStats::new(n_layers * layout.n_expert),
                step: 0,
                speculative_bytes: 0,
                // Every slot being read, each in its largest number of parts: the queue never
                // grows while decoding.
                queue: VecDeque::with_capacity(cfg.slots * (3 + slot_span.div_ceil(PIECE))),
                spare: Vec::with_capacity(SPARE_ARRIVALS),
                failure: None,
                shutdown: false,
            }),
            span_offsets: [0, spans[0], spans[0] + spans[1]],
            layout,
            reader,
            slot_span,
            memory: Memory {
                ptr,
                layout: mem_layout,
            },
            changed: Condvar::new(),
            counters: Counters::default(),
            n_layers,
            trace: Mutex::new(None),
            cfg,
        });
        let workers = (0..inner.cfg.io_threads.max(1))
            .map(|i| {
                let inner = Arc::clone(&inner);
                std::thread::Builder::new()
                    .name(format!("moe-io-{i}"))
                    .spawn(move || inner.io_worker())
                    .expect("spawning an I/O thread")
            })
            .collect();
        Ok(Self { inner, workers })
    }

    /// Bytes one slot takes.
    pub fn slot_bytes(&self) -> usize {
        self.inner.slot_span
    }

    pub fn slots(&self) -> usize {
        self.inner.cfg.slots
    }

    pub fn layout(&self) -> &ExpertLayout {
        &self.inner.layout
    }

    pub fn config(&self) -> &CacheConfig {
        &self.inner.cfg
    }

    /// Bytes the cache holds (its own accounting; the budget check uses this).
    pub fn memory_bytes(&self) -> usize {
        self.inner.memory.layout.size()
    }

    /// Moves the cache's clock: the computation is at `layer` of token `token`.
    pub fn set_position(&self, token: usize, layer: usize) {
        let mut st = self.inner.lock();
        st.step = (token * self.inner.n_layers + layer) as u64;
    }

    /// The step number of `layer` of `token` (for predictions).
    pub fn step_of(&self, token: usize, layer: usize) -> u64 {
        (token * self.inner.n_layers + layer) as u64
    }

    /// Records which experts a visit of `layer` used (all of them, once per visit, even when
    /// they are then acquired in several groups): the moving averages behind LFU, Belady's
    /// next-use estimate and speculative admission.
    pub fn record_use(&self, layer: usize, experts: &[u32]) {
        let n = self.inner.layout.n_expert;
        let mut st = self.inner.lock();
        for e in 0..n {
            st.uses.record(layer * n + e, experts.contains(&(e as u32)));
        }
    }

    /// Whether expert `expert` of `layer` is in the cache (ready or being read).
    pub fn contains(&self, layer: usize, expert: u32) -> bool {
        let key = ExpertKey {
            layer: layer as u32,
            expert,
        };
        self.inner.lock().index.contains_key(&key)
    }

    /// Starts the use-frequency estimates (LFU, Belady's next-use estimate, speculative
    /// admission) from calibration statistics, `[n_layer, n_expert]` fractions of tokens that
    /// selected each expert, instead of from zero.
    pub fn seed_frequency(&self, frequency: &[f32]) {
        let mut st = self.inner.lock();
        if frequency.len() == st.uses.frequency.len() {
            st.uses.frequency.copy_from_slice(frequency);
        }
    }

    /// Reads `experts` into slots that are never evicted, in order, leaving at least `spare`
    /// slots evictable; returns how many were pinned. The reads are queued like prefetches
    /// (warm-up I/O, counted in `bytes_read`).
    pub fn pin(&self, experts: &[ExpertKey], spare: usize) -> usize {
        let inner = &self.inner;
        let mut st = inner.lock();
        let room = inner.cfg.slots.saturating_sub(spare);
        let mut pinned = st.slots.iter().filter(|s| s.pinned).count();
        for &key in experts {
            if pinned >= room || !inner.layout.is_moe_layer(key.layer as usize) {
                break;
            }
            if let Some(&i) = st.index.get(&key) {
                if !st.slots[i].pinned {
                    st.slots[i].pinned = true;
                    pinned += 1;
                }
                continue;
            }
            let Some(i) = inner.victim(&st, None) else {
                break;
            };
            inner.evict_into(&mut st, i, key);
            st.slots[i].pinned = true;
            inner.enqueue(&mut st, key, i, false);
            pinned += 1;
        }
        drop(st);
        inner.changed.notify_all();
        pinned
    }

    /// Slots holding pinned experts.
    pub fn pinned(&self) -> usize {
        self.inner.lock().slots.iter().filter(|s| s.pinned).count()
    }

    /// Pins the experts a layer routed to, reading the missing ones (all at once, ahead of any
    /// speculative read) and waiting for them.
    pub fn acquire(
        &self,
        layer: usize,
        experts: &[u32],
    ) -> Result<Vec<ExpertGuard<'_>>, CacheError> {
        let mut arrivals = self.acquire_each(layer, experts)?;
        (0..experts.len())
            .map(|i| {
                Ok(arrivals
                    .take(i, true)?
                    .expect("a waiting take returns the expert"))
            })
            .collect()
    }

    /// Like [`acquire`](Self::acquire) without waiting: the missing experts are queued for
    /// reading and each is handed out by the returned [`Arrivals`] once it is loaded, so the
    /// caller can compute with the experts at hand while the others are read.
    pub fn acquire_each(&self, layer: usize, experts: &[u32]) -> Result<Arrivals<'_>, CacheError> {
        Ok(Arrivals {
            inner: &self.inner,
            layer: layer as u32,
            bufs: self.inner.pin(layer, experts)?,
        })
    }

    /// Asks for experts predicted to be used at `step` (speculative, may be skipped).
    pub fn prefetch(&self, layer: usize, experts: &[u32], step: u64) {
        self.inner.prefetch(layer, experts, step)
    }

    /// Starts (or restarts) recording demand requests.
    pub fn record_trace(&self) {
        *self.inner.trace.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    }

    /// The demand requests recorded so far.
    pub fn trace(&self) -> Vec<ExpertKey> {
        self.inner
            .trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            slots: self.inner.cfg.slots,
            slot_bytes: self.inner.slot_span,
            demand_hits: get(&c.demand_hits),
            demand_misses: get(&c.demand_misses),
            late_prefetches: get(&c.late_prefetches),
            prefetches_issued: get(&c.prefetches_issued),
            prefetches_used: get(&c.prefetches_used),
            prefetches_skipped: get(&c.prefetches_skipped),
            evictions: get(&c.evictions),
            bytes_read: get(&c.bytes_read),
            read_requests: get(&c.read_requests),
            demand_bytes_read: get(&c.demand_bytes_read),
            stall_seconds: get(&c.stall_nanos) as f64 * 1e-9,
            overtakes: get(&c.overtakes),
        }
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.inner.lock().shutdown = true;
        self.inner.changed.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl ExpertGuard<'_> {
    pub fn key(&self) -> ExpertKey {
        self.key
    }

    /// The expert's three matrices, borrowed from its slot.
    pub fn mlp(&self) -> Mlp<'_> {
        let specs = self.inner.layout.specs(self.key);
        let base = self.slot * self.inner.slot_span;
        let m = |i: usize| {
            let s = specs[i];
            let start = base + self.inner.span_offsets[i] + self.leads[i];
            // SAFETY: the slot is ready and pinned by this guard, so nothing writes it; the range
            // lies inside the slot's span (checked by `slot_span`).
            let data = unsafe {
                std::slice::from_raw_parts(self.inner.memory.ptr.add(start), s.slab_bytes)
            };
            QMatrix {
                ty: s.ty,
                rows: s.rows,
                cols: s.cols,
                data,
            }
        };
        Mlp {
            gate: m(0),
            up: m(1),
            down: m(2),
        }
    }
}

impl Drop for ExpertGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.slots[self.slot].pins -= 1;
        drop(st);
        self.inner.changed.notify_all();
    }
}

/// Moves `key`'s reads to the front of `queue`, keeping the order within both parts, in place.
fn move_to_front(queue: &mut VecDeque<(ExpertKey, usize, u32)>, key: ExpertKey) {
    let q = queue.make_contiguous();
    let mut front = 0;
    for i in 0..q.len() {
        if q[i].0 == key {
            q[front..=i].rotate_right(1);
            front += 1;
        }
    }
}

/// How good a victim a cached expert is under `eviction` (larger = evict first): LRU by last
/// use; LFU by the use-frequency moving average, then last use; Belady by the expected next use,
/// then last use.
fn victim_rank(eviction: Eviction, freq: f32, last_use: u64, expected: u64) -> (u64, u64) {
    match eviction {
        Eviction::Lru => (u64::MAX - last_use, 0),
        // Frequencies are moving averages in [0, 1]: for non-negative floats the bit pattern
        // orders like the value. (`f32::MAX - freq` rounds back to f32::MAX for every such
        // freq, which silently made LFU plain LRU.)
        Eviction::Lfu => (
            u64::MAX - u64::from(freq.max(0.0).to_bits()),
            u64::MAX - last_use,
        ),
        Eviction::Belady => (expected, u64::MAX - last_use),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn freq_index(&self, key: ExpertKey) -> usize {
        key.layer as usize * self.layout.n_expert + key.expert as usize
    }

    /// When an expert is next expected: its predicted step if a predictor named one; otherwise
    /// the next visit of its layer plus the visits it typically skips (from its frequency of
    /// use). Layers are visited in a cycle, one token after another, so without this estimate
    /// LRU evicts exactly what the next token needs once the working set exceeds the cache.
    fn expected_use(&self, st: &State, s: &Slot, key: ExpertKey) -> u64 {
        // A predicted use that has passed without the expert being used was a wrong guess:
        // fall back to the estimate (else the guess would keep it cached as "needed now").
        if s.next_use != NEVER && s.next_use >= st.step {
            return s.next_use;
        }
        let n_layers = self.n_layers as u64;
        let (token, layer) = (st.step / n_layers, st.step % n_layers);
        let l = key.layer as u64;
        let next_visit = if l > layer {
            token * n_layers + l
        } else {
            (token + 1) * n_layers + l
        };
        let p = st.uses.next_visit_chance(self.freq_index(key));
        next_visit + (n_layers as f32 * (1.0 / p.max(1.0 / 64.0) - 1.0)) as u64
    }

    /// A slot to overwrite: unpinned, not loading, chosen by the eviction policy. For a
    /// speculative read (`for_step` = Some), only experts expected later than `for_step` and not
    /// more frequent than the newcomer qualify.
    fn victim(&self, st: &State, for_step: Option<(u64, f32)>) -> Option<usize> {
        let mut best: Option<(usize, (u64, u64))> = None;
        for (i, s) in st.slots.iter().enumerate() {
            if s.pins > 0 || s.loading || s.pinned {
                continue;
            }
            let Some(key) = s.key else {
                return Some(i); // an empty slot is always the best choice
            };
            let freq = st.uses.frequency[self.freq_index(key)];
            let expected = self.expected_use(st, s, key);
            if let Some((step, new_freq)) = for_step {
                if expected <= step || freq > new_freq {
                    continue;
                }
            }
            let rank = victim_rank(self.cfg.eviction, freq, s.last_use, expected);
            if best.is_none_or(|(_, r)| rank > r) {
                best = Some((i, rank));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Queues the reads that fill `slot` with `key` (just given to it by `evict_into`): demand
    /// reads at the front, first part first; speculative ones at the back.
    fn enqueue(&self, st: &mut State, key: ExpertKey, slot: usize, front: bool) {
        let parts = self.read_parts(key);
        let s = &mut st.slots[slot];
        s.parts_left = parts;
        s.leads = self
            .layout
            .extents(key)
            .map(|e| (e.offset % PAGE as u64) as usize);
        if front {
            for part in (0..parts).rev() {
                st.queue.push_front((key, slot, part));
            }
        } else {
            st.queue.extend((0..parts).map(|part| (key, slot, part)));
        }
    }

    /// Whether `key`'s slabs lie next to each other in the file (alignment padding only
    /// between them) and are read with buffered I/O: then one request reads them all.
    fn read_whole(&self, key: ExpertKey) -> bool {
        !self.cfg.direct_io
            && self.layout.extents(key).windows(2).all(|w| {
                let end = w[0].offset + w[0].len as u64;
                w[1].offset >= end && w[1].offset - end < PAGE as u64
            })
    }

    /// How many reads fill a slot with `key`: one for adjacent slabs read whole, else every
    /// slab's pieces, which the I/O threads read at the same time.
    fn read_parts(&self, key: ExpertKey) -> u32 {
        if self.read_whole(key) {
            1
        } else {
            let extents = self.layout.extents(key);
            extents.iter().map(|&e| FlashReader::pieces(e) as u32).sum()
        }
    }

    fn evict_into(&self, st: &mut State, slot: usize, key: ExpertKey) {
        if let Some(old) = st.slots[slot].key.take() {
            st.index.remove(&old);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let s = &mut st.slots[slot];
        s.key = Some(key);
        s.loading = true;
        s.next_use = NEVER;
        s.speculative = false;
        st.index.insert(key, slot);
    }

    /// Pins the experts (present ones as they are, missing ones in slots queued for demand
    /// reads), without waiting for the reads; returns them with their slots, in order, in
    /// (reused) buffers for [`Arrivals`].
    fn pin(&self, layer: usize, experts: &[u32]) -> Result<ArrivalBuffers, CacheError> {
        if let Some(trace) = self
            .trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            trace.extend(experts.iter().map(|&e| ExpertKey {
                layer: layer as u32,
                expert: e,
            }));
        }
        let mut st = self.lock();
        if let Some(f) = &st.failure {
            return Err(CacheError::Read {
                layer: layer as u32,
                expert: u32::MAX,
                cause: f.clone(),
            });
        }
        let now = st.step;
        let mut waited: Option<Instant> = None;
        let mut bufs = st.spare.pop().unwrap_or_default();
        bufs.experts.extend_from_slice(experts);
        bufs.taken.resize(experts.len(), false);
        let slots = &mut bufs.slots;
        for &e in experts {
            let key = ExpertKey {
                layer: layer as u32,
                expert: e,
            };
            loop {
                if let Some(&i) = st.index.get(&key) {
                    let s = &mut st.slots[i];
                    s.pins += 1;
                    s.last_use = now;
                    s.next_use = NEVER;
                    let counter = if s.loading {
                        &self.counters.late_prefetches
                    } else {
                        &self.counters.demand_hits
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if s.speculative {
                        s.speculative = false;
                        self.counters
                            .prefetches_used
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    if s.loading {
                        // Needed now: its reads not started yet go before speculative ones.
                        move_to_front(&mut st.queue, key);
                    }
                    slots.push(i);
                    break;
                }
                match self.victim(&st, None) {
                    Some(i) => {
                        self.evict_into(&mut st, i, key);
                        st.slots[i].pins = 1;
                        st.slots[i].last_use = now;
                        self.enqueue(&mut st, key, i, true);
                        self.counters.demand_misses.fetch_add(1, Ordering::Relaxed);
                        let bytes = self.layout.expert_bytes(layer, e as usize) as u64;
                        self.counters
                            .demand_bytes_read
                            .fetch_add(bytes, Ordering::Relaxed);
                        self.changed.notify_all();
                        slots.push(i);
                        break;
                    }
                    // Every slot is pinned or loading: wait for one to free up.
                    None => {
                        waited.get_or_insert_with(Instant::now);
                        st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
        drop(st);
        if let Some(t0) = waited {
            self.add_stall(t0);
        }
        Ok(bufs)
    }

    fn add_stall(&self, since: Instant) {
        self.counters
            .stall_nanos
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn prefetch(&self, layer: usize, experts: &[u32], step: u64) {
        if !self.layout.is_moe_layer(layer) {
            return;
        }
        let mut st = self.lock();
        let mut queued = false;
        for &e in experts {
            let bytes = self.layout.expert_bytes(layer, e as usize);
            let key = ExpertKey {
                layer: layer as u32,
                expert: e,
            };
            if let Some(&i) = st.index.get(&key) {
                let s = &mut st.slots[i];
                s.next_use = s.next_use.min(step);
                continue;
            }
            if st.speculative_bytes + bytes > self.cfg.max_speculative_bytes {
                self.counters
                    .prefetches_skipped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let freq = st.uses.frequency[self.freq_index(key)];
            let Some(i) = self.victim(&st, Some((step, freq))) else {
                self.counters
                    .prefetches_skipped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            self.evict_into(&mut st, i, key);
            let s = &mut st.slots[i];
            s.next_use = step;
            s.speculative = true;
            s.last_use = step.saturating_sub(1);
            st.speculative_bytes += bytes;
            st.slots[i].speculative_in_flight = bytes;
            self.enqueue(&mut st, key, i, false);
            self.counters
                .prefetches_issued
                .fetch_add(1, Ordering::Relaxed);
            queued = true;
        }
        drop(st);
        if queued {
            self.changed.notify_all();
        }
    }

    fn io_worker(&self) {
        // Reads of a whole expert land here first; kept at the largest size seen.
        let mut whole_buf = Vec::new();
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return;
            }
            let Some((key, slot, part)) = st.queue.pop_front() else {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            // A failed read gave up its slot; the expert's other parts are dropped.
            if st.slots[slot].key != Some(key) || !st.slots[slot].loading {
                continue;
            }
            drop(st);
            let result = self.load_part(key, slot, part, &mut whole_buf);
            st = self.lock();
            let s = &mut st.slots[slot];
            if s.key != Some(key) {
                continue;
            }
            let done = result.is_err() || s.parts_left == 1;
            s.parts_left -= 1;
            if done {
                let in_flight = std::mem::take(&mut s.speculative_in_flight);
                st.speculative_bytes -= in_flight;
            }
            match result {
                Ok(()) if done => {
                    st.slots[slot].loading = false;
                    self.counters.bytes_read.fetch_add(
                        self.layout
                            .expert_bytes(key.layer as usize, key.expert as usize)
                            as u64,
                        Ordering::Relaxed,
                    );
                }
                Ok(()) => continue,
                Err(e) => {
                    st.index.remove(&key);
                    let s = &mut st.slots[slot];
                    s.key = None;
                    s.loading = false;
                    s.speculative = false;
                    s.pinned = false;
                    st.failure = Some(e);
                }
            }
            self.changed.notify_all();
        }
    }

    /// Does read `part` of the ones filling `slot` with `key` (see `read_parts`).
    fn load_part(
        &self,
        key: ExpertKey,
        slot: usize,
        part: u32,
        whole_buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        let extents = self.layout.extents(key);
        let fail = |err| format!("expert {} of layer {}: {err}", key.expert, key.layer);
        self.counters.read_requests.fetch_add(1, Ordering::Relaxed);
        if self.read_whole(key) {
            let first = extents[0].offset;
            let whole = Extent {
                offset: first,
                len: (extents[2].offset + extents[2].len as u64 - first) as usize,
            };
            whole_buf.resize(FlashReader::aligned_span(whole), 0);
            let tmp = &mut whole_buf[..];
            let lead0 = self.reader.read(whole, tmp).map_err(fail)?;
            for (i, e) in extents.iter().enumerate() {
                // Same placement as a read of the slab alone: the bytes start at the extent's
                // offset within its page.
                let lead = (e.offset % PAGE as u64) as usize;
                let start = slot * self.slot_span + self.span_offsets[i];
                let from = lead0 + (e.offset - first) as usize;
                // SAFETY: as below; `lead + len` fits the span (`slot_span` reserved it).
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(self.memory.ptr.add(start + lead), e.len)
                };
                buf.copy_from_slice(&tmp[from..from + e.len]);
            }
            return Ok(());
        }
        let mut part = part as usize;
        for (i, &e) in extents.iter().enumerate() {
            let pieces = FlashReader::pieces(e);
            if part >= pieces {
                part -= pieces;
                continue;
            }
            let range = self.reader.piece_range(e, part);
            let start = slot * self.slot_span + self.span_offsets[i] + range.start;
            // SAFETY: the slot is `loading`, so no guard reads it, and this thread is the only
            // reader of this piece, whose range no other piece overlaps; it lies inside the
            // slot's span (`slot_span` reserved the aligned span of every slab).
            let buf =
                unsafe { std::slice::from_raw_parts_mut(self.memory.ptr.add(start), range.len()) };
            return self.reader.read_piece(e, part, buf).map_err(fail);
        }
        Err(format!(
            "expert {} of layer {}: no read part {part}",
            key.expert, key.layer
        ))
    }
}

/// Misses of the optimal offline policy (Belady's MIN, which knows the whole future) on a
/// request sequence with `slots` slots, starting empty: the reads no policy could avoid.
pub fn optimal_misses(trace: &[ExpertKey], slots: usize) -> usize {
    // next[i]: index of the next request of the same key after i.
    let mut next = vec![usize::MAX; trace.len()];
    let mut last_seen: HashMap<ExpertKey, usize> = HashMap::new();
    for (i, k) in trace.iter().enumerate().rev() {
        next[i] = last_seen.get(k).copied().unwrap_or(usize::MAX);
        last_seen.insert(*k, i);
    }
    // Cached keys ordered by their next use; evict the farthest.
    let mut by_next: std::collections::BTreeSet<(usize, ExpertKey)> = Default::default();
    let mut next_of: HashMap<ExpertKey, usize> = HashMap::new();
    let mut misses = 0;
    for (i, k) in trace.iter().enumerate() {
        if let Some(n) = next_of.get(k).copied() {
            by_next.remove(&(n, *k));
        } else {
            misses += 1;
            if next_of.len() == slots {
                let far = *by_next.iter().next_back().expect("full cache");
                by_next.remove(&far);
                next_of.remove(&far.1);
            }
        }
        next_of.insert(*k, next[i]);
        by_next.insert((next[i], *k));
    }
    misses
}

/// Cache slots that fit a memory budget after the resident part of the model.
pub struct BudgetPlan {
    pub slots: usize,
    pub resident_bytes: usize,
    pub overhead_bytes: usize,
}

/// Fixed overhead reserved from a budget for code, thread stacks and scratch buffers.
pub const RUNTIME_OVERHEAD: usize = 48 << 20;

/// Splits `budget` bytes: the model's non-expert tensors and the KV cache stay resident, the
/// rest becomes expert slots of `slot_bytes` each.
/// Once experts stream through the cache, the file's map serves only the resident tensors. So
/// the map gets no readahead (with a device readahead of megabytes, each page fault would pull
/// neighbouring expert bytes into the page cache, which counts against a cgroup's limit; measured
/// 6.7 vs 1.4 t/s at 128 KiB vs 8 MiB), and the resident tensors are read ahead at once instead.
pub fn advise_resident_only(model: &Model, layout: &ExpertLayout) {
    let file = model.file;
    // Stacked tensors start with expert 0's slab; per-expert tensors are one slab each.
    let expert_starts: std::collections::HashSet<u64> = layout.slab_offsets().collect();
    file.advise(memmap2::Advice::Random, None);
    for t in file.header().tensors() {
        if !expert_starts.contains(&(t.range.start as u64)) {
            file.advise(memmap2::Advice::WillNeed, Some(t.range.clone()));
        }
    }
}

pub fn plan_budget(
    model: &Model,
    slot_bytes: usize,
    kv_bytes: usize,
    budget: usize,
) -> Result<BudgetPlan, CacheError> {
    let layout = ExpertLayout::from_model(model);
    let file_tensors = model.file.header().tensor_data_bytes();
    let resident = file_tensors - layout.total_expert_bytes() + kv_bytes;
    let need_min = resident + RUNTIME_OVERHEAD + model.hp.n_expert_used * slot_bytes;
    if budget < need_min {
        return Err(CacheError::Budget(format!(
            "a memory budget of {} MiB is too small: the resident part (non-expert weights and \
             KV cache) takes {} MiB, the runtime {} MiB, and one token's experts {} MiB; give at \
             least {} MiB",
            budget >> 20,
            resident >> 20,
            RUNTIME_OVERHEAD >> 20,
            (model.hp.n_expert_used * slot_bytes) >> 20,
            need_min.div_ceil(1 << 20)
        )));
    }
    Ok(BudgetPlan {
        slots: (budget - resident - RUNTIME_OVERHEAD) / slot_bytes,
        resident_bytes: resident,
        overhead_bytes: RUNTIME_OVERHEAD,
    })
}

/// Parses sizes like `3G`, `512M`, `1.5GiB`, or a plain byte count.
pub fn parse_size(s: &str) -> Option<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((v * mult) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demanded_expert_s_reads_move_to_the_front_in_order() {
        let k = |e| ExpertKey {
            layer: 1,
            expert: e,
        };
        // Wrapped around, as a queue that was pushed at both ends is.
        let mut q = VecDeque::with_capacity(8);
        for part in [0, 1] {
            q.push_back((k(5), 3, part));
        }
        q.push_back((k(7), 4, 0));
        q.push_back((k(7), 4, 1));
        q.push_front((k(2), 1, 1));
        q.push_front((k(2), 1, 0));
        move_to_front(&mut q, k(7));
        let order: Vec<_> = q.iter().map(|&(key, _, part)| (key.expert, part)).collect();
        assert_eq!(order, [(7, 0), (7, 1), (2, 0), (2, 1), (5, 0), (5, 1)]);
        move_to_front(&mut q, k(9));
        assert_eq!(q.len(), 6, "an expert with no queued reads changes nothing");
    }

    #[test]
    fn optimal_misses_is_beladys_min() {
        let k = |e| ExpertKey {
            layer: 0,
            expert: e,
        };
        // a b c a b d a b with 3 slots: misses a b c (cold), d (evict c, never used again).
        let t: Vec<_> = [0, 1, 2, 0, 1, 3, 0, 1].into_iter().map(k).collect();
        assert_eq!(optimal_misses(&t, 3), 4);
        // with 2 slots: a b | c(evict b? next a=3, b=4 -> evict b) a | b(miss, evict c) d(miss) a b
        assert_eq!(optimal_misses(&t, 2), 6);
        assert_eq!(optimal_misses(&t, 8), 4);
    }

    #[test]
    fn lfu_evicts_the_rarer_expert_even_if_more_recent() {
        // Expert A: used often, last at step 10; expert B: rarely, last at step 20.
        let a = victim_rank(Eviction::Lfu, 0.6, 10, 0);
        let b = victim_rank(Eviction::Lfu, 0.05, 20, 0);
        assert!(
            b > a,
            "LFU must evict the rarely used expert: {a:?} vs {b:?}"
        );
        // LRU evicts the older one; equal frequencies fall back to recency under LFU too.
        assert!(victim_rank(Eviction::Lru, 0.6, 10, 0) > victim_rank(Eviction::Lru, 0.05, 20, 0));
        assert!(victim_rank(Eviction::Lfu, 0.3, 10, 0) > victim_rank(Eviction::Lfu, 0.3, 20, 0));
        // Tiny differences count (the moving average moves in steps of 1/128).
        assert!(victim_rank(Eviction::Lfu, 0.0, 1, 0) > victim_rank(Eviction::Lfu, 1e-6, 1, 0));
    }

    /// An expert used in runs of consecutive tokens is expected back sooner right after a use
    /// than its frequency says, and no sooner than that once a visit went without it.
    #[test]
    fn stickiness_raises_the_chance_right_after_a_use() {
        let mut u = UseStats::new(2);
        // Key 0: used in runs of 3 visits out of every 12; key 1: every 4th visit.
        for visit in 0..2400 {
            u.record(0, visit % 12 < 3);
            u.record(1, visit % 4 == 0);
        }
        let (f0, f1) = (u.frequency[0], u.frequency[1]);
        assert!(
            (f0 - 0.25).abs() < 0.05 && (f1 - 0.25).abs() < 0.05,
            "{f0} {f1}"
        );
        // Right after a use: key 0 comes back 2 times in 3, key 1 never.
        u.record(0, true);
        u.record(1, true);
        assert!(u.next_visit_chance(0) > 0.5, "{:?}", u);
        assert!((u.next_visit_chance(1) - u.frequency[1]).abs() < 1e-6);
        u.record(0, false);
        assert_eq!(u.next_visit_chance(0), u.frequency[0]);
    }

    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("3G"), Some(3 << 30));
        assert_eq!(super::parse_size("512M"), Some(512 << 20));
        assert_eq!(super::parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(super::parse_size("4096"), Some(4096));
        assert_eq!(super::parse_size("3X"), None);
    }
}
