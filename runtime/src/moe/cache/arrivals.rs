//! Handing held experts to the compute thread as their reads finish.

use std::time::Instant;

use super::error::CacheError;
use super::layout::ExpertKey;
use super::state::{ArrivalBuffers, Shared, SPARE_ARRIVALS};
use super::stats::Counters;
use crate::moe::experts::Mlp;
use crate::tensor::QMatrix;

/// The experts of one [`ExpertCache::acquire_each`](super::ExpertCache::acquire_each) call, all
/// held; each is handed out as an [`ExpertGuard`] once loaded. Dropping it lets go of the
/// experts not taken.
pub struct Arrivals<'c> {
    shared: &'c Shared,
    layer: u32,
    bufs: ArrivalBuffers,
}

impl<'c> Arrivals<'c> {
    /// `bufs` holds `experts` of `layer` and their slots, each holding them once.
    pub(super) fn new(shared: &'c Shared, layer: usize, bufs: ArrivalBuffers) -> Self {
        Self {
            shared,
            layer: layer as u32,
            bufs,
        }
    }

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
        let shared = self.shared;
        let ArrivalBuffers {
            experts,
            slots,
            taken,
        } = &mut self.bufs;
        let mut waited: Option<Instant> = None;
        let mut st = shared.lock();
        let result = loop {
            let open = |j: &usize| !taken[*j] && wanted(*j);
            if let Some(j) = (0..slots.len())
                .filter(open)
                .find(|&j| !st.table.slots[slots[j]].loading)
            {
                let key = ExpertKey {
                    layer: self.layer,
                    expert: experts[j],
                };
                if let Err(e) = shared.lost(&st, slots[j], key) {
                    break Err(e);
                }
                if taken[..j].contains(&false) {
                    Counters::add(&shared.counters.overtakes, 1);
                }
                taken[j] = true;
                let slot = slots[j];
                let guard = ExpertGuard {
                    shared,
                    slot,
                    key,
                    leads: st.table.slots[slot].leads,
                };
                break Ok(Some((j, guard)));
            }
            if !wait || !(0..slots.len()).any(|j| open(&j)) {
                break Ok(None);
            }
            waited.get_or_insert_with(Instant::now);
            st = shared.wait(st);
        };
        drop(st);
        if let Some(t0) = waited {
            shared.counters.add_stall(t0);
        }
        result
    }
}

impl Drop for Arrivals<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        for (&slot, &taken) in self.bufs.slots.iter().zip(&self.bufs.taken) {
            if !taken {
                st.table.slots[slot].holds -= 1;
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
        self.shared.changed.notify_all();
    }
}

/// A held, ready expert; its slot cannot be evicted while the guard lives.
pub struct ExpertGuard<'c> {
    shared: &'c Shared,
    slot: usize,
    key: ExpertKey,
    leads: [usize; 3],
}

impl ExpertGuard<'_> {
    /// The expert's three matrices, borrowed from its slot.
    pub fn mlp(&self) -> Mlp<'_> {
        let specs = self.shared.layout.specs(self.key);
        let m = |i: usize| {
            let s = specs[i];
            let bytes = self.leads[i]..self.leads[i] + s.bytes;
            // SAFETY: the slot is ready and held by this guard, so nothing writes it.
            let data = unsafe { self.shared.memory.slab(self.slot, i, bytes) };
            QMatrix::new(s.ty, s.rows, s.cols, data)
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
        let mut st = self.shared.lock();
        st.table.slots[self.slot].holds -= 1;
        drop(st);
        self.shared.changed.notify_all();
    }
}
