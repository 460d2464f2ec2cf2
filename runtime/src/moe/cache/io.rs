//! Reading experts into slots: how an expert's slabs are split into reads, the queue of reads
//! (demand reads ahead of speculative ones), and the I/O threads that do them.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::flash::{Extent, FlashReader, PAGE, PIECE};
use super::layout::ExpertKey;
use super::state::{QueuedRead, Shared, State};
use super::stats::Counters;

/// Starts `n` I/O threads; they run until the state's `shutdown` is set.
pub(super) fn spawn_workers(shared: &Arc<Shared>, n: usize) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let shared = Arc::clone(shared);
            std::thread::Builder::new()
                .name(format!("moe-io-{i}"))
                .spawn(move || worker(&shared))
                .expect("spawning an I/O thread")
        })
        .collect()
}

/// Room for every slot being read in its largest number of parts: the queue never grows while
/// decoding.
pub(super) fn queue_capacity(slots: usize, slot_span: usize) -> usize {
    slots * (3 + slot_span.div_ceil(PIECE))
}

/// Queues the reads that fill `slot` with `key` (just assigned to it): demand reads at the
/// front, first part first; speculative ones at the back.
pub(super) fn enqueue(shared: &Shared, st: &mut State, key: ExpertKey, slot: usize, front: bool) {
    let parts = read_parts(shared, key);
    let s = &mut st.table.slots[slot];
    s.parts_left = parts;
    s.leads = shared
        .layout
        .extents(key)
        .map(|e| (e.offset % PAGE as u64) as usize);
    let fill = s.fill;
    let read = |part| QueuedRead {
        key,
        slot,
        fill,
        part,
    };
    if front {
        for part in (0..parts).rev() {
            st.queue.push_front(read(part));
        }
    } else {
        st.queue.extend((0..parts).map(read));
    }
}

/// Moves `key`'s reads to the front of `queue`, keeping the order within both parts, in place.
pub(super) fn move_to_front(queue: &mut VecDeque<QueuedRead>, key: ExpertKey) {
    let q = queue.make_contiguous();
    let mut front = 0;
    for i in 0..q.len() {
        if q[i].key == key {
            q[front..=i].rotate_right(1);
            front += 1;
        }
    }
}

/// Whether `key`'s slabs lie next to each other in the file (alignment padding only between
/// them) and are read with buffered I/O: then one request reads them all.
fn read_whole(shared: &Shared, key: ExpertKey) -> bool {
    !shared.reader.is_direct()
        && shared.layout.extents(key).windows(2).all(|w| {
            let end = w[0].offset + w[0].len as u64;
            w[1].offset >= end && w[1].offset - end < PAGE as u64
        })
}

/// How many reads fill a slot with `key`: one for adjacent slabs read whole, else every slab's
/// pieces, which the I/O threads read at the same time.
fn read_parts(shared: &Shared, key: ExpertKey) -> u32 {
    if read_whole(shared, key) {
        1
    } else {
        let extents = shared.layout.extents(key);
        extents.iter().map(|&e| FlashReader::pieces(e) as u32).sum()
    }
}

/// Whether `read` still belongs to its slot's filling (a failed read gives the slot up, and
/// the expert's other reads are then dropped).
fn is_current(st: &State, read: QueuedRead) -> bool {
    let s = &st.table.slots[read.slot];
    s.loading && s.fill == read.fill
}

fn worker(shared: &Shared) {
    // Reads of a whole expert land here first; kept at the largest size seen.
    let mut whole_buf = Vec::new();
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let Some(read) = st.queue.pop_front() else {
            st = shared.wait(st);
            continue;
        };
        if !is_current(&st, read) {
            continue;
        }
        st.table.slots[read.slot].in_flight += 1;
        drop(st);
        let result = load_part(shared, read, &mut whole_buf);
        st = shared.lock();
        st.table.slots[read.slot].in_flight -= 1;
        if !is_current(&st, read) {
            // The filling was given up (another of its reads failed): once its last read in
            // flight is done, the slot may go to another expert.
            if st.table.slots[read.slot].in_flight == 0 {
                shared.changed.notify_all();
            }
            continue;
        }
        let s = &mut st.table.slots[read.slot];
        let done = result.is_err() || s.parts_left == 1;
        s.parts_left -= 1;
        if done {
            let in_flight = std::mem::take(&mut s.speculative_in_flight);
            st.speculative_bytes -= in_flight;
        }
        match result {
            Ok(()) if done => {
                st.table.slots[read.slot].loading = false;
                let (layer, expert) = (read.key.layer as usize, read.key.expert as usize);
                let bytes = shared.layout.expert_bytes(layer, expert);
                Counters::add(&shared.counters.bytes_read, bytes as u64);
            }
            Ok(()) => continue,
            Err(error) => {
                // The request waiting for this expert gets the error (Arrivals::take); the
                // slot is given up, so a later request reads the expert again.
                Counters::add(&shared.counters.read_errors, 1);
                st.table.fail(read.slot, Arc::new(error));
            }
        }
        shared.changed.notify_all();
    }
}

/// Does `read` (one of the reads filling its slot, see `read_parts`).
fn load_part(shared: &Shared, read: QueuedRead, whole_buf: &mut Vec<u8>) -> io::Result<()> {
    let QueuedRead {
        key, slot, part, ..
    } = read;
    let extents = shared.layout.extents(key);
    let (reader, memory) = (&shared.reader, &shared.memory);
    Counters::add(&shared.counters.read_requests, 1);
    if read_whole(shared, key) {
        let first = extents[0].offset;
        let whole = Extent {
            offset: first,
            len: (extents[2].offset + extents[2].len as u64 - first) as usize,
        };
        whole_buf.resize(FlashReader::aligned_span(whole), 0);
        let lead0 = reader.read(whole, whole_buf)?;
        for (i, e) in extents.iter().enumerate() {
            // Same placement as a read of the slab alone: the bytes start at the extent's
            // offset within its page.
            let lead = (e.offset % PAGE as u64) as usize;
            let from = lead0 + (e.offset - first) as usize;
            // SAFETY: the slot is loading, so no guard reads it, and this is its only read.
            let dst = unsafe { memory.slab_mut(slot, i, lead..lead + e.len) };
            dst.copy_from_slice(&whole_buf[from..from + e.len]);
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
        let range = reader.piece_range(e, part);
        // SAFETY: the slot is loading, so no guard reads it, and this thread is the only one
        // reading this piece, whose range no other piece overlaps.
        let dst = unsafe { memory.slab_mut(slot, i, range) };
        return reader.read_piece(e, part, dst);
    }
    Err(io::Error::other(format!(
        "expert {} of layer {} has no read part {}",
        key.expert, key.layer, read.part
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demanded_expert_s_reads_move_to_the_front_in_order() {
        let read = |expert, slot, part| QueuedRead {
            key: ExpertKey { layer: 1, expert },
            slot,
            fill: 1,
            part,
        };
        // Wrapped around, as a queue that was pushed at both ends is.
        let mut q = VecDeque::with_capacity(8);
        for part in [0, 1] {
            q.push_back(read(5, 3, part));
        }
        q.push_back(read(7, 4, 0));
        q.push_back(read(7, 4, 1));
        q.push_front(read(2, 1, 1));
        q.push_front(read(2, 1, 0));
        move_to_front(
            &mut q,
            ExpertKey {
                layer: 1,
                expert: 7,
            },
        );
        let order: Vec<_> = q.iter().map(|r| (r.key.expert, r.part)).collect();
        assert_eq!(order, [(7, 0), (7, 1), (2, 0), (2, 1), (5, 0), (5, 1)]);
        move_to_front(
            &mut q,
            ExpertKey {
                layer: 1,
                expert: 9,
            },
        );
        assert_eq!(q.len(), 6, "an expert with no queued reads changes nothing");
    }
}
