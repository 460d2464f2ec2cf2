//! Live heap bytes, counted by a thin wrapper around the system allocator that moed's binary
//! installs (`#[global_allocator]` in main.rs): two relaxed atomics per allocation.
//!
//! Why not the resident set size: RSS mixes the heap with mapped model pages (which come and go
//! with the page cache), thread stacks, and, under an emulator such as qemu-user, the emulator's
//! own translated-code cache, which grows as new code paths run. The heap the daemon itself
//! holds means the same thing on a board, on x86_64 and under emulation, so leak checks (the
//! load test, the soak) use it; RSS stays in /metrics for what the system sees.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static USED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting the bytes in use.
pub struct CountingAlloc;

impl CountingAlloc {
    fn grew(by: usize) {
        let now = LIVE.fetch_add(by, Relaxed) + by;
        if now > PEAK.load(Relaxed) {
            PEAK.fetch_max(now, Relaxed);
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                Self::grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Marks the counting allocator as installed (moed's main does this first thing), so that
/// [`heap_bytes`] reports figures rather than zeros in a process that does not use it.
pub fn mark_installed() {
    USED.store(true, Relaxed);
}

/// Bytes currently allocated on the heap, and the most ever, when the counting allocator is
/// installed.
pub fn heap_bytes() -> Option<(u64, u64)> {
    USED.load(Relaxed)
        .then(|| (LIVE.load(Relaxed) as u64, PEAK.load(Relaxed) as u64))
}
