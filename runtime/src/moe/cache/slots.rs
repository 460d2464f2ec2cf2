//! The cache's slots: which expert each holds and in what state, and the memory their experts
//! are read into.
//!
//! Slot memory is written only while its slot is `loading` (each byte by exactly one read, the
//! pieces of an expert's slabs going to several I/O threads at once) and read only while the
//! slot is ready and held by a guard. The state mutex orders the two: a slot stops loading, and
//! a guard is handed out, only under it.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ops::Range;

use super::error::CacheError;
use super::flash::PAGE;
use super::layout::ExpertKey;

/// The `next_use` of a slot whose expert has no predicted use.
pub(super) const NEVER: u64 = u64::MAX;

#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub key: Option<ExpertKey>,
    /// Being filled by reads; its memory is not to be read yet.
    pub loading: bool,
    /// Uses holding the expert (guards, and arrivals not taken yet): it stays while held.
    pub holds: u32,
    pub last_use: u64,
    /// Step of the next predicted use (NEVER when none is predicted).
    pub next_use: u64,
    /// Filled by a speculative read and not used yet.
    pub speculative: bool,
    /// Never evicted (hot experts from calibration statistics).
    pub kept_resident: bool,
    /// Counts the slot's fillings, so that a read of an earlier filling that failed and was
    /// given up cannot count towards a later one.
    pub fill: u32,
    /// Offset of each slab's bytes within its span.
    pub leads: [usize; 3],
    /// Reads of the expert being loaded that have not finished.
    pub parts_left: u32,
    /// Bytes this slot's speculative read adds to the speculative bytes in flight until it ends.
    pub speculative_in_flight: usize,
    /// Why the slot's last filling failed (it was given up); cleared when it is filled again.
    pub error: Option<std::sync::Arc<std::io::Error>>,
    /// Reads an I/O thread is doing into the slot's memory right now. A filling that failed is
    /// given up while its other reads may still be writing: the slot is not given to another
    /// expert until they are done.
    pub in_flight: u32,
}

impl Slot {
    pub const EMPTY: Slot = Slot {
        key: None,
        loading: false,
        holds: 0,
        last_use: 0,
        next_use: NEVER,
        speculative: false,
        kept_resident: false,
        fill: 0,
        leads: [0; 3],
        parts_left: 0,
        speculative_in_flight: 0,
        error: None,
        in_flight: 0,
    };

    /// Whether the slot may be given to another expert: nothing holds it, no read fills it (or
    /// is still writing to it) and it is not kept resident.
    pub fn evictable(&self) -> bool {
        self.holds == 0 && !self.loading && self.in_flight == 0 && !self.kept_resident
    }
}

/// The slots and where each expert is.
pub(super) struct SlotTable {
    pub slots: Vec<Slot>,
    index: HashMap<ExpertKey, usize>,
}

impl SlotTable {
    pub fn new(slots: usize) -> Self {
        Self {
            slots: vec![Slot::EMPTY; slots],
            index: HashMap::with_capacity(slots),
        }
    }

    /// The slot holding `key` (ready or loading).
    pub fn find(&self, key: ExpertKey) -> Option<usize> {
        self.index.get(&key).copied()
    }

    /// Gives `slot` to `key`, to be filled by reads; returns whether another expert was evicted.
    pub fn assign(&mut self, slot: usize, key: ExpertKey) -> bool {
        let evicted = self.slots[slot].key.take();
        if let Some(old) = evicted {
            self.index.remove(&old);
        }
        let s = &mut self.slots[slot];
        s.key = Some(key);
        s.loading = true;
        s.next_use = NEVER;
        s.speculative = false;
        s.fill = s.fill.wrapping_add(1);
        s.error = None;
        self.index.insert(key, slot);
        evicted.is_some()
    }

    /// Empties `slot` whose reads failed (holds on it stay until their owners let go).
    pub fn free(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if let Some(key) = s.key.take() {
            self.index.remove(&key);
        }
        s.loading = false;
        s.speculative = false;
        s.kept_resident = false;
    }

    /// Gives up `slot` after its read failed with `error` (see [`Slot::error`]).
    pub fn fail(&mut self, slot: usize, error: std::sync::Arc<std::io::Error>) {
        self.free(slot);
        self.slots[slot].error = Some(error);
    }

    /// Slots holding experts kept resident.
    pub fn kept_resident(&self) -> usize {
        self.slots.iter().filter(|s| s.kept_resident).count()
    }
}

/// The bytes of every slot: one span per slot, split into page-aligned parts for the gate, up
/// and down slabs.
pub(super) struct SlotMemory {
    ptr: *mut u8,
    layout: Layout,
    slots: usize,
    span: usize,
    slab_spans: [usize; 3],
    slab_starts: [usize; 3],
}

// SAFETY: the memory is only written through `slab_mut` by the readers of a loading slot, each
// its own bytes, and only read through `slab` while the slot is ready and held; the state mutex
// orders the two (see the module docs).
unsafe impl Send for SlotMemory {}
unsafe impl Sync for SlotMemory {}

impl SlotMemory {
    /// Memory for `slots` slots whose slabs need `slab_spans` bytes each (page multiples).
    pub fn new(slots: usize, slab_spans: [usize; 3]) -> Result<Self, CacheError> {
        let span = slab_spans.iter().sum::<usize>();
        let size = (slots * span).max(PAGE);
        let layout = Layout::from_size_align(size, PAGE)
            .map_err(|e| CacheError::Budget(format!("cache of {size} bytes: {e}")))?;
        // SAFETY: non-zero size. Zeroed pages are mapped lazily, so RSS grows as slots fill.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(CacheError::Budget(format!(
                "cannot allocate {size} bytes for the expert cache"
            )));
        }
        Ok(Self {
            ptr,
            layout,
            slots,
            span,
            slab_spans,
            slab_starts: [0, slab_spans[0], slab_spans[0] + slab_spans[1]],
        })
    }

    /// Bytes allocated for all slots.
    pub fn size(&self) -> usize {
        self.layout.size()
    }

    /// Bytes of one slot.
    pub fn span(&self) -> usize {
        self.span
    }

    /// Where `range` of slab `slab`'s span in slot `slot` starts; panics outside the span.
    fn offset(&self, slot: usize, slab: usize, range: &Range<usize>) -> usize {
        assert!(
            range.start <= range.end && range.end <= self.slab_spans[slab],
            "{range:?} outside slab {slab}'s span of {} bytes",
            self.slab_spans[slab]
        );
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        slot * self.span + self.slab_starts[slab] + range.start
    }

    /// Bytes `range` of slab `slab`'s span in slot `slot`, to be written.
    ///
    /// # Safety
    /// The slot is loading, and no other thread reads or writes these bytes while the returned
    /// slice lives.
    #[allow(
        clippy::mut_from_ref,
        reason = "I/O threads write disjoint parts of a slot at once; the caller keeps them apart"
    )]
    pub unsafe fn slab_mut(&self, slot: usize, slab: usize, range: Range<usize>) -> &mut [u8] {
        let start = self.offset(slot, slab, &range);
        // SAFETY: inside the allocation (checked by `offset`); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), range.len()) }
    }

    /// Bytes `range` of slab `slab`'s span in slot `slot`, to be read.
    ///
    /// # Safety
    /// The slot is ready and held, so nothing writes it while the returned slice lives.
    pub unsafe fn slab(&self, slot: usize, slab: usize, range: Range<usize>) -> &[u8] {
        let start = self.offset(slot, slab, &range);
        // SAFETY: inside the allocation (checked by `offset`); not written, by the caller's
        // promise. The bytes were zeroed at allocation, so they are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), range.len()) }
    }
}

impl Drop for SlotMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}
