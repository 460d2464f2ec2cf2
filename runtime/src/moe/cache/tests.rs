//! The cache against a small synthetic file: reads land where the layout says, and a failed
//! read (a missing slab, or a fault the flash emulator injects) fails the request that needed
//! it, names its expert, and leaves the cache consistent and serving.

use std::path::PathBuf;

use super::*;
use crate::gguf::GgmlType;
use flash::FlashProfile;

const N_EXPERT: u32 = 8;
const SLAB: usize = 64;

/// Expert (3, 5)'s down slab lies past the end of the file; its other slabs are not adjacent,
/// so it is read in several parts.
const BROKEN: ExpertKey = ExpertKey {
    layer: 3,
    expert: 5,
};

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn slab(file_offset: u64) -> SlabSpec {
    SlabSpec {
        ty: GgmlType::F32,
        rows: 1,
        cols: SLAB / 4,
        file_offset,
        bytes: SLAB,
    }
}

/// A file of 4 pages and the layout of a 4-layer model (layer 0 dense) whose experts are in it,
/// except for `BROKEN`.
fn fixture(name: &str) -> (TempFile, Vec<u8>, ExpertLayout) {
    let path =
        std::env::temp_dir().join(format!("moe-edge-cache-{name}-{}.bin", std::process::id()));
    let data: Vec<u8> = (0..4 * 4096).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let layer = |l: u32| {
        (0..N_EXPERT)
            .map(|e| {
                if (ExpertKey {
                    layer: l,
                    expert: e,
                }) == BROKEN
                {
                    return [slab(4096), slab(8192), slab(1 << 20)];
                }
                let at = ((l * N_EXPERT + e) as usize * 3 * SLAB) as u64;
                [slab(at), slab(at + SLAB as u64), slab(at + 2 * SLAB as u64)]
            })
            .collect()
    };
    let layout = ExpertLayout::new(vec![None, Some(layer(1)), Some(layer(2)), Some(layer(3))]);
    (TempFile(path), data, layout)
}

fn config(slots: usize) -> CacheConfig {
    CacheConfig {
        slots,
        eviction: Eviction::Belady,
        direct_io: false,
        flash: None,
        io_threads: 2,
        max_speculative_bytes: 1 << 20,
    }
}

/// Takes every expert of `layer` in `experts`, waiting for each.
fn use_all(c: &ExpertCache, layer: usize, experts: &[u32]) -> Result<(), CacheError> {
    let mut arrivals = c.acquire_each(layer, experts)?;
    for i in 0..experts.len() {
        arrivals
            .take(i, true)?
            .expect("a waiting take returns the expert");
    }
    Ok(())
}

#[test]
fn experts_are_read_where_the_layout_says() {
    let (file, data, layout) = fixture("layout");
    let c = ExpertCache::new(layout, 2, &file.0, config(3)).unwrap();
    let mut arrivals = c.acquire_each(2, &[6, 1]).unwrap();
    while let Some((i, guard)) = arrivals.take_any().unwrap() {
        let expert = [6, 1][i];
        let at = (2 * N_EXPERT as usize + expert) * 3 * SLAB;
        let mlp = guard.mlp();
        for (k, m) in [mlp.gate, mlp.up, mlp.down].iter().enumerate() {
            let start = at + k * SLAB;
            assert!(
                m.data == &data[start..start + SLAB],
                "expert {expert} slab {k}"
            );
            assert_eq!((m.ty, m.rows, m.cols), (GgmlType::F32, 1, SLAB / 4));
        }
    }
    assert_eq!(c.stats().demand_misses, 2);
}

#[test]
fn a_failed_read_names_its_expert_and_frees_its_slot() {
    let (file, _, layout) = fixture("failure");
    let c = ExpertCache::new(layout, 2, &file.0, config(3)).unwrap();
    use_all(&c, 1, &[0, 1]).unwrap();
    let err = use_all(&c, 3, &[2, BROKEN.expert]).expect_err("expert 5's down slab is missing");
    let check = |err: &CacheError| {
        let CacheError::Read {
            layer,
            expert,
            path,
            cause,
        } = err
        else {
            panic!("not a read error: {err}");
        };
        assert_eq!((*layer, *expert), (BROKEN.layer, BROKEN.expert), "{err}");
        assert_eq!(path, &file.0);
        assert_eq!(cause.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
        let shown = err.to_string();
        let want = format!(
            "reading expert 5 of layer 3 from {} failed: ",
            file.0.display()
        );
        assert!(shown.starts_with(&want), "{shown}");
        assert!(shown.contains("past the end of the model file"), "{shown}");
        assert!(
            shown.ends_with(&cause.to_string()),
            "the I/O error is shown: {shown}"
        );
    };
    check(&err);
    // The error was the request's: later requests are served, and asking for the broken
    // expert again reads it again (and fails again, naming it).
    use_all(&c, 1, &[0, 1]).expect("the cache serves after a failed read");
    check(&use_all(&c, 3, &[BROKEN.expert]).expect_err("read again, still missing"));
    assert_eq!(c.stats().read_errors, 2);
    // The failed expert's slot was given up and nothing is held; the other expert's read, which
    // may still have been going when the error came, ends.
    assert!(!c.contains(BROKEN.layer as usize, BROKEN.expert));
    let t0 = std::time::Instant::now();
    let mut st = c.shared.lock();
    while st.table.slots.iter().any(|s| s.loading || s.in_flight > 0) {
        assert!(t0.elapsed().as_secs() < 10, "{:?}", st.table.slots);
        let wait = std::time::Duration::from_millis(50);
        st = c.shared.changed.wait_timeout(st, wait).unwrap().0;
    }
    assert!(st.table.find(BROKEN).is_none());
    assert!(
        st.table.slots.iter().all(|s| s.holds == 0),
        "{:?}",
        st.table.slots
    );
    assert_eq!(st.speculative_bytes, 0);
}

#[test]
fn too_few_slots_for_one_token_is_an_error() {
    let (file, _, layout) = fixture("few");
    let err = ExpertCache::new(layout, 4, &file.0, config(3))
        .err()
        .expect("3 slots cannot hold 4 experts");
    assert!(err.to_string().contains("at least 4 slots"), "{err}");
}

/// Slots neither held nor loading once every request is over: nothing leaked by failures.
fn assert_idle(c: &ExpertCache) {
    let t0 = std::time::Instant::now();
    let mut st = c.shared.lock();
    while st.table.slots.iter().any(|s| s.loading || s.in_flight > 0) {
        assert!(t0.elapsed().as_secs() < 10, "{:?}", st.table.slots);
        let wait = std::time::Duration::from_millis(50);
        st = c.shared.changed.wait_timeout(st, wait).unwrap().0;
    }
    assert!(
        st.table
            .slots
            .iter()
            .all(|s| s.holds == 0 && s.in_flight == 0),
        "{:?}",
        st.table.slots
    );
    for (i, s) in st.table.slots.iter().enumerate() {
        if let Some(key) = s.key {
            assert_eq!(st.table.find(key), Some(i), "index and slot {i} disagree");
        }
    }
    assert_eq!(st.speculative_bytes, 0);
}

#[test]
fn injected_read_errors_and_slow_reads_fail_only_their_requests() {
    let (file, data, layout) = fixture("faults");
    let mut cfg = config(4);
    let mut flash = FlashProfile::parse("nvme,fail-every=7,slow-every=4,slow-ms=2").unwrap();
    flash.bytes_per_second = 1e12;
    cfg.flash = Some(flash);
    let c = ExpertCache::new(layout, 2, &file.0, cfg).unwrap();
    let (mut served, mut failed) = (0, 0);
    for round in 0..60u32 {
        let layer = 1 + (round % 2) as usize;
        let experts = [round % N_EXPERT, (round * 3 + 1) % N_EXPERT];
        let experts = if experts[0] == experts[1] {
            &experts[..1]
        } else {
            &experts[..]
        };
        let mut arrivals = c.acquire_each(layer, experts).unwrap();
        let mut ok = true;
        for (i, &expert) in experts.iter().enumerate() {
            match arrivals.take(i, true) {
                Ok(Some(guard)) => {
                    // What is handed out is always the expert's real bytes.
                    let at = (layer * N_EXPERT as usize + expert as usize) * 3 * SLAB;
                    assert!(
                        guard.mlp().gate.data == &data[at..at + SLAB],
                        "round {round}"
                    );
                }
                Ok(None) => panic!("a waiting take returns the expert"),
                Err(e) => {
                    let shown = e.to_string();
                    assert!(shown.contains("injected by the flash emulator"), "{shown}");
                    assert!(
                        shown.contains(&format!("expert {expert} of layer {layer}")),
                        "{shown}"
                    );
                    ok = false;
                }
            }
        }
        drop(arrivals);
        if ok {
            served += 1
        } else {
            failed += 1
        }
    }
    assert!(failed > 0 && served > 0, "{served} served, {failed} failed");
    // Each failed request had a read of its own fail (one request at a time, no prefetching).
    assert!(c.stats().read_errors >= failed as u64, "{:?}", c.stats());
    assert_idle(&c);
}

/// Experts known to be needed (a router that ran before the layer's attention) are read past
/// the speculative cap, without holding their slots, and never by evicting one another; the
/// layer then finds them loaded (or loading) instead of missing.
#[test]
fn reads_ahead_of_a_known_use_ignore_the_speculative_cap() {
    let (file, data, layout) = fixture("ahead");
    let cfg = CacheConfig {
        max_speculative_bytes: 0,
        ..config(3)
    };
    let c = ExpertCache::new(layout, 2, &file.0, cfg).unwrap();
    c.prefetch(1, &[4], c.step_of(0, 1));
    assert_eq!(
        c.stats().prefetches_skipped,
        1,
        "the cap turns guesses away"
    );
    // Four experts, three slots: the fourth is left to the demand path.
    c.fetch_ahead(1, &[0, 2, 6, 7], c.step_of(0, 1));
    let st = c.stats();
    assert_eq!(
        (st.prefetches_issued, st.prefetches_skipped),
        (3, 2),
        "{st:?}"
    );
    assert!(c.shared.lock().table.slots.iter().all(|s| s.holds == 0));
    let mut arrivals = c.acquire_each(1, &[0, 2, 6]).unwrap();
    while let Some((i, guard)) = arrivals.take_any().unwrap() {
        let at = (N_EXPERT as usize + [0, 2, 6][i]) * 3 * SLAB;
        assert!(guard.mlp().gate.data == &data[at..at + SLAB]);
    }
    drop(arrivals);
    let st = c.stats();
    assert_eq!(st.demand_misses, 0, "{st:?}");
    assert_eq!(st.prefetches_used, 3, "{st:?}");
}

/// A filling given up after one of its reads failed may still have another read writing into
/// the slot (a slow one started before the failure): the slot goes to another expert only once
/// that read is done (`Slot::in_flight`), else the late read would overwrite the new expert's
/// bytes. One slot, two I/O threads; expert A's slabs are not adjacent, so its gate and up
/// slabs are read at the same time by both threads, and the emulator makes one of those two
/// reads slow and fails the other; B, whose slabs sit at the same places within their pages,
/// is then asked for at once and must come out with its own bytes after the slow read ended.
#[test]
fn a_slow_read_of_a_failed_filling_never_writes_into_the_next_expert() {
    const PAGE: u64 = 4096;
    let path =
        std::env::temp_dir().join(format!("moe-edge-cache-reuse-{}.bin", std::process::id()));
    let file = TempFile(path);
    let data: Vec<u8> = (0..8 * PAGE as usize)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(&file.0, &data).unwrap();
    // A (expert 0) on even pages, B (expert 1) on odd ones, both page-aligned and a page apart:
    // three reads each. Experts 2-5 are adjacent slabs (one read each) on page 6.
    let spread = |first: u64| [slab(first), slab(first + 2 * PAGE), slab(first + 4 * PAGE)];
    let mut experts = vec![spread(0), spread(PAGE)];
    for k in 0..4 {
        let at = 6 * PAGE + k * 3 * SLAB as u64;
        experts.push([slab(at), slab(at + SLAB as u64), slab(at + 2 * SLAB as u64)]);
    }
    let layout = ExpertLayout::new(vec![None, Some(experts)]);
    // The emulator counts reads over the file: four for experts 2-5, then A's gate and up
    // (reads 5 and 6, in either order between the two threads): read 5 sleeps, read 6 fails.
    // B's reads are 7-9, neither slow nor failing.
    let mut flash = FlashProfile::parse("nvme,fail-every=6,slow-every=5,slow-ms=400").unwrap();
    flash.bytes_per_second = 1e12;
    flash.latency = std::time::Duration::ZERO;
    let cfg = CacheConfig {
        flash: Some(flash),
        ..config(1)
    };
    let c = ExpertCache::new(layout, 1, &file.0, cfg).unwrap();
    for e in 2..6 {
        use_all(&c, 1, &[e]).unwrap();
    }
    let err = use_all(&c, 1, &[0]).expect_err("read 6 fails");
    assert!(err.to_string().contains("(read 6, fail-every=6)"), "{err}");
    let mut arrivals = c.acquire_each(1, &[1]).unwrap();
    let guard = arrivals.take(0, true).unwrap().expect("B is read");
    // Let the slow read end (it is counted in flight with or without the rule under test),
    // then look at B's bytes.
    let t0 = std::time::Instant::now();
    let mut st = c.shared.lock();
    while st.table.slots.iter().any(|s| s.in_flight > 0) {
        assert!(t0.elapsed().as_secs() < 10, "{:?}", st.table.slots);
        let wait = std::time::Duration::from_millis(20);
        st = c.shared.changed.wait_timeout(st, wait).unwrap().0;
    }
    drop(st);
    let mlp = guard.mlp();
    for (k, m) in [mlp.gate, mlp.up, mlp.down].iter().enumerate() {
        let at = (PAGE + 2 * PAGE * k as u64) as usize;
        assert!(
            m.data == &data[at..at + SLAB],
            "B's slab {k} holds other bytes: a read of A's failed filling wrote into it"
        );
    }
    drop(guard);
    drop(arrivals);
    assert_eq!(c.stats().read_errors, 1, "{:?}", c.stats());
    assert_idle(&c);
}
