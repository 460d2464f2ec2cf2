//! The expert cache's handle and its requests: demand reads for the experts a layer routed to,
//! speculative reads for predicted ones, and experts kept resident.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::arrivals::Arrivals;
use super::error::CacheError;
use super::flash::{FlashProfile, FlashReader};
use super::io;
use super::layout::{ExpertKey, ExpertLayout};
use super::policy::{self, Eviction, Policy};
use super::slots::{SlotMemory, SlotTable, NEVER};
use super::state::{ArrivalBuffers, Shared, State, SPARE_ARRIVALS};
use super::stats::{CacheStats, Counters};

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

pub struct ExpertCache {
    pub(super) shared: Arc<Shared>,
    cfg: CacheConfig,
    workers: Vec<JoinHandle<()>>,
}

impl ExpertCache {
    /// A cache of `cfg.slots` slots for the experts of `layout`, read from the model file at
    /// `path`; it needs at least `experts_per_token` slots (the experts one token uses).
    pub fn new(
        layout: ExpertLayout,
        experts_per_token: usize,
        path: &Path,
        cfg: CacheConfig,
    ) -> Result<Self, CacheError> {
        let (slot_span, slab_spans) = layout.slot_span();
        if cfg.slots < experts_per_token {
            return Err(CacheError::Budget(format!(
                "the expert cache needs at least {experts_per_token} slots (the experts one \
                 token uses), got {}",
                cfg.slots
            )));
        }
        let reader = FlashReader::open(path, cfg.direct_io, cfg.flash).map_err(|cause| {
            CacheError::Open {
                path: path.display().to_string(),
                cause,
            }
        })?;
        let memory = SlotMemory::new(cfg.slots, slab_spans)?;
        let state = State {
            table: SlotTable::new(cfg.slots),
            policy: Policy::new(cfg.eviction, layout.n_layers(), layout.n_expert()),
            speculative_bytes: 0,
            queue: VecDeque::with_capacity(io::queue_capacity(cfg.slots, slot_span)),
            spare: Vec::with_capacity(SPARE_ARRIVALS),
            shutdown: false,
        };
        let shared = Arc::new(Shared {
            layout,
            reader,
            path: path.to_owned(),
            memory,
            state: Mutex::new(state),
            changed: Condvar::new(),
            counters: Counters::default(),
            trace: Mutex::new(None),
        });
        let workers = io::spawn_workers(&shared, cfg.io_threads.max(1));
        Ok(Self {
            shared,
            cfg,
            workers,
        })
    }

    /// Bytes one slot takes.
    pub fn slot_bytes(&self) -> usize {
        self.shared.memory.span()
    }

    pub fn slots(&self) -> usize {
        self.cfg.slots
    }

    pub fn layout(&self) -> &ExpertLayout {
        &self.shared.layout
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Bytes the cache holds (its own accounting; the budget check uses this).
    pub fn memory_bytes(&self) -> usize {
        self.shared.memory.size()
    }

    /// Moves the cache's clock: the computation is at `layer` of token `token`.
    pub fn set_position(&self, token: usize, layer: usize) {
        self.shared.lock().policy.set_position(token, layer);
    }

    /// The step number of `layer` of `token` (for predictions).
    pub fn step_of(&self, token: usize, layer: usize) -> u64 {
        policy::step_of(self.shared.layout.n_layers(), token, layer)
    }

    /// Records which experts a visit of `layer` used (all of them, once per visit, even when
    /// they are then acquired in several groups): the moving averages behind LFU, Belady's
    /// next-use estimate and speculative admission.
    pub fn record_use(&self, layer: usize, experts: &[u32]) {
        self.shared.lock().policy.record_visit(layer, experts);
    }

    /// Whether expert `expert` of `layer` is in the cache (ready or being read).
    pub fn contains(&self, layer: usize, expert: u32) -> bool {
        let key = ExpertKey {
            layer: layer as u32,
            expert,
        };
        self.shared.lock().table.find(key).is_some()
    }

    /// Starts the use-frequency estimates (LFU, Belady's next-use estimate, speculative
    /// admission) from calibration statistics, `[n_layer, n_expert]` fractions of tokens that
    /// selected each expert, instead of from zero.
    pub fn seed_frequency(&self, frequency: &[f32]) {
        self.shared.lock().policy.seed_frequency(frequency);
    }

    /// Reads `experts` into slots that are never evicted, in order, leaving at least `spare`
    /// slots evictable; returns how many are kept resident. The reads are queued like prefetches
    /// (warm-up I/O, counted in `bytes_read`).
    pub fn keep_resident(&self, experts: &[ExpertKey], spare: usize) -> usize {
        let shared = &*self.shared;
        let mut st = shared.lock();
        let room = self.cfg.slots.saturating_sub(spare);
        let mut kept = st.table.kept_resident();
        for &key in experts {
            if kept >= room || !shared.layout.is_moe_layer(key.layer as usize) {
                break;
            }
            if let Some(i) = st.table.find(key) {
                let s = &mut st.table.slots[i];
                if !s.kept_resident {
                    s.kept_resident = true;
                    kept += 1;
                }
                continue;
            }
            let Some(i) = st.policy.victim(&st.table.slots) else {
                break;
            };
            assign(shared, &mut st, i, key);
            st.table.slots[i].kept_resident = true;
            io::enqueue(shared, &mut st, key, i, false);
            kept += 1;
        }
        drop(st);
        shared.changed.notify_all();
        kept
    }

    /// Slots holding experts kept resident.
    pub fn kept_resident(&self) -> usize {
        self.shared.lock().table.kept_resident()
    }

    /// Holds the experts a layer routed to, queueing the missing ones for reading (all at once,
    /// ahead of any speculative read), without waiting for them: each is handed out by the
    /// returned [`Arrivals`] once it is loaded, so the caller can compute with the experts at
    /// hand while the others are read.
    pub fn acquire_each(&self, layer: usize, experts: &[u32]) -> Result<Arrivals<'_>, CacheError> {
        let bufs = self.hold(layer, experts)?;
        Ok(Arrivals::new(&self.shared, layer, bufs))
    }

    /// Holds the experts (present ones as they are, missing ones in slots queued for demand
    /// reads), waiting only for a slot to become free; returns them with their slots, in order,
    /// in (reused) buffers for [`Arrivals`].
    fn hold(&self, layer: usize, experts: &[u32]) -> Result<ArrivalBuffers, CacheError> {
        let shared = &*self.shared;
        if let Some(trace) = shared
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
        let counters = &shared.counters;
        let mut st = shared.lock();
        let now = st.policy.step();
        let mut waited: Option<Instant> = None;
        let mut bufs = st.spare.pop().unwrap_or_default();
        bufs.experts.extend_from_slice(experts);
        bufs.taken.resize(experts.len(), false);
        for &e in experts {
            let key = ExpertKey {
                layer: layer as u32,
                expert: e,
            };
            loop {
                if let Some(i) = st.table.find(key) {
                    let s = &mut st.table.slots[i];
                    s.holds += 1;
                    s.last_use = now;
                    s.next_use = NEVER;
                    let counter = if s.loading {
                        &counters.late_prefetches
                    } else {
                        &counters.demand_hits
                    };
                    Counters::add(counter, 1);
                    if s.speculative {
                        s.speculative = false;
                        Counters::add(&counters.prefetches_used, 1);
                    }
                    if s.loading {
                        // Needed now: its reads not started yet go before speculative ones.
                        io::move_to_front(&mut st.queue, key);
                    }
                    bufs.slots.push(i);
                    break;
                }
                match st.policy.victim(&st.table.slots) {
                    Some(i) => {
                        assign(shared, &mut st, i, key);
                        st.table.slots[i].holds = 1;
                        st.table.slots[i].last_use = now;
                        io::enqueue(shared, &mut st, key, i, true);
                        Counters::add(&counters.demand_misses, 1);
                        let bytes = shared.layout.expert_bytes(layer, e as usize);
                        Counters::add(&counters.demand_bytes_read, bytes as u64);
                        shared.changed.notify_all();
                        bufs.slots.push(i);
                        break;
                    }
                    // Every slot is held, loading or kept resident: wait for one to free up.
                    None => {
                        waited.get_or_insert_with(Instant::now);
                        st = shared.wait(st);
                    }
                }
            }
        }
        drop(st);
        if let Some(t0) = waited {
            counters.add_stall(t0);
        }
        Ok(bufs)
    }

    /// Asks for experts predicted to be used at `step` (speculative, may be skipped).
    pub fn prefetch(&self, layer: usize, experts: &[u32], step: u64) {
        let shared = &*self.shared;
        if !shared.layout.is_moe_layer(layer) {
            return;
        }
        let counters = &shared.counters;
        let mut st = shared.lock();
        let mut queued = false;
        for &e in experts {
            let bytes = shared.layout.expert_bytes(layer, e as usize);
            let key = ExpertKey {
                layer: layer as u32,
                expert: e,
            };
            if let Some(i) = st.table.find(key) {
                let s = &mut st.table.slots[i];
                s.next_use = s.next_use.min(step);
                continue;
            }
            if st.speculative_bytes + bytes > self.cfg.max_speculative_bytes {
                Counters::add(&counters.prefetches_skipped, 1);
                continue;
            }
            let Some(i) = st.policy.speculative_victim(&st.table.slots, key, step) else {
                Counters::add(&counters.prefetches_skipped, 1);
                continue;
            };
            assign(shared, &mut st, i, key);
            let s = &mut st.table.slots[i];
            s.next_use = step;
            s.speculative = true;
            s.last_use = step.saturating_sub(1);
            s.speculative_in_flight = bytes;
            st.speculative_bytes += bytes;
            io::enqueue(shared, &mut st, key, i, false);
            Counters::add(&counters.prefetches_issued, 1);
            queued = true;
        }
        drop(st);
        if queued {
            shared.changed.notify_all();
        }
    }

    /// Reads ahead the experts `layer` is known to use at `step` (its router has run, its
    /// feed-forward has not): unlike [`prefetch`](Self::prefetch) these are certainties, so
    /// their reads go ahead of speculative ones and are not limited by the speculative cap. The
    /// slots are not held: the feed-forward acquires them as usual, finding them loaded or
    /// loading. Only evictable slots holding none of these experts are taken; what does not
    /// fit is left to the demand path.
    pub fn fetch_ahead(&self, layer: usize, experts: &[u32], step: u64) {
        let shared = &*self.shared;
        if !shared.layout.is_moe_layer(layer) {
            return;
        }
        let counters = &shared.counters;
        let mut st = shared.lock();
        let now = st.policy.step();
        let wanted = |k: ExpertKey| k.layer as usize == layer && experts.contains(&k.expert);
        for &e in experts {
            let key = ExpertKey {
                layer: layer as u32,
                expert: e,
            };
            if let Some(i) = st.table.find(key) {
                let s = &mut st.table.slots[i];
                s.next_use = s.next_use.min(step);
                s.last_use = s.last_use.max(now);
                continue;
            }
            let victim = st.policy.victim(&st.table.slots);
            let Some(i) = victim.filter(|&i| !st.table.slots[i].key.is_some_and(wanted)) else {
                Counters::add(&counters.prefetches_skipped, 1);
                continue;
            };
            assign(shared, &mut st, i, key);
            let s = &mut st.table.slots[i];
            s.next_use = step;
            s.last_use = now;
            s.speculative = true;
            io::enqueue(shared, &mut st, key, i, true);
            Counters::add(&counters.prefetches_issued, 1);
        }
        drop(st);
        shared.changed.notify_all();
    }

    /// Starts (or restarts) recording demand requests.
    pub fn record_trace(&self) {
        *self.shared.trace.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    }

    /// The demand requests recorded so far.
    pub fn trace(&self) -> Vec<ExpertKey> {
        self.shared
            .trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    pub fn stats(&self) -> CacheStats {
        let slot_bytes = self.shared.memory.span();
        self.shared.counters.snapshot(self.cfg.slots, slot_bytes)
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Gives `slot` to `key`, counting the eviction of the expert it held.
fn assign(shared: &Shared, st: &mut State, slot: usize, key: ExpertKey) {
    if st.table.assign(slot, key) {
        Counters::add(&shared.counters.evictions, 1);
    }
}
