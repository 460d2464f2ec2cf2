//! What the cache's users, guards and I/O threads share: the slots, the eviction policy and the
//! read queue, under one mutex, with a condition variable for every change.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::error::CacheError;
use super::flash::FlashReader;
use super::layout::{ExpertKey, ExpertLayout};
use super::policy::Policy;
use super::slots::{SlotMemory, SlotTable};
use super::stats::Counters;

pub(super) struct Shared {
    pub layout: ExpertLayout,
    pub reader: FlashReader,
    /// The model file, for error messages.
    pub path: PathBuf,
    pub memory: SlotMemory,
    pub state: Mutex<State>,
    /// Signalled when a read ends, a hold ends, or reads are queued.
    pub changed: Condvar,
    pub counters: Counters,
    /// Every demand request in order, when recording (benchmarks compare with the optimum).
    pub trace: Mutex<Option<Vec<ExpertKey>>>,
}

pub(super) struct State {
    pub table: SlotTable,
    pub policy: Policy,
    /// Bytes of speculative reads queued or in flight.
    pub speculative_bytes: usize,
    pub queue: VecDeque<QueuedRead>,
    /// Buffers of dropped arrivals, reused so that a decode step allocates nothing.
    pub spare: Vec<ArrivalBuffers>,
    pub shutdown: bool,
}

/// One read of the ones filling a slot with an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct QueuedRead {
    pub key: ExpertKey,
    pub slot: usize,
    /// The slot's filling this read belongs to (`Slot::fill`).
    pub fill: u32,
    /// Which of the expert's reads (see `io::read_parts`).
    pub part: u32,
}

/// The experts of one hold, their slots and which were handed out.
#[derive(Default)]
pub(super) struct ArrivalBuffers {
    pub experts: Vec<u32>,
    pub slots: Vec<usize>,
    pub taken: Vec<bool>,
}

/// Spare [`ArrivalBuffers`] kept: one per session computing at the same time is enough.
pub(super) const SPARE_ARRIVALS: usize = 8;

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases the lock until the state changes.
    pub fn wait<'s>(&self, st: MutexGuard<'s, State>) -> MutexGuard<'s, State> {
        self.changed.wait(st).unwrap_or_else(|p| p.into_inner())
    }

    /// The error of a request holding `slot` for `key` when the slot's read failed (the slot
    /// was given up, so it no longer holds `key`).
    pub fn lost(&self, st: &State, slot: usize, key: ExpertKey) -> Result<(), CacheError> {
        let s = &st.table.slots[slot];
        if s.key == Some(key) {
            return Ok(());
        }
        let cause = s.error.clone().unwrap_or_else(|| {
            Arc::new(io::Error::other(
                "the expert's slot was given up while it was held",
            ))
        });
        Err(CacheError::Read {
            layer: key.layer,
            expert: key.expert,
            path: self.path.clone(),
            cause,
        })
    }
}
