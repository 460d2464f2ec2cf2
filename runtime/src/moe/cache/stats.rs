//! The cache's counters, updated without the state lock and readable while a run goes on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

#[derive(Default, Debug)]
pub(super) struct Counters {
    pub demand_hits: AtomicU64,
    pub demand_misses: AtomicU64,
    /// Demand requests that found their expert being prefetched and waited for it.
    pub late_prefetches: AtomicU64,
    pub prefetches_issued: AtomicU64,
    /// Prefetched experts that were used before being evicted.
    pub prefetches_used: AtomicU64,
    pub prefetches_skipped: AtomicU64,
    pub evictions: AtomicU64,
    pub bytes_read: AtomicU64,
    /// Read requests sent to the file (one per slab, or one per expert when its slabs are
    /// adjacent).
    pub read_requests: AtomicU64,
    pub demand_bytes_read: AtomicU64,
    pub stall_nanos: AtomicU64,
    /// Experts handed out while an earlier one of their group was still loading.
    pub overtakes: AtomicU64,
    /// Reads that failed (each failed the request waiting for its expert).
    pub read_errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts the time since `since` as a stall.
    pub fn add_stall(&self, since: Instant) {
        Self::add(&self.stall_nanos, since.elapsed().as_nanos() as u64);
    }

    pub fn snapshot(&self, slots: usize, slot_bytes: usize) -> CacheStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            slots,
            slot_bytes,
            demand_hits: get(&self.demand_hits),
            demand_misses: get(&self.demand_misses),
            late_prefetches: get(&self.late_prefetches),
            prefetches_issued: get(&self.prefetches_issued),
            prefetches_used: get(&self.prefetches_used),
            prefetches_skipped: get(&self.prefetches_skipped),
            evictions: get(&self.evictions),
            bytes_read: get(&self.bytes_read),
            read_requests: get(&self.read_requests),
            demand_bytes_read: get(&self.demand_bytes_read),
            stall_seconds: get(&self.stall_nanos) as f64 * 1e-9,
            overtakes: get(&self.overtakes),
            read_errors: get(&self.read_errors),
        }
    }
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
    /// Reads that failed.
    pub read_errors: u64,
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
