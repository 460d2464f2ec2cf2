//! Belady's offline minimum: the misses no eviction policy can avoid on a recorded request
//! sequence, the yardstick of the cache's own policies.

use std::collections::{BTreeSet, HashMap};

use super::layout::ExpertKey;

/// Misses of the optimal offline policy (Belady's MIN, which knows the whole future) on a
/// request sequence with `slots` slots, starting empty: the reads no policy could avoid.
pub fn optimal_misses(trace: &[ExpertKey], slots: usize) -> usize {
    optimal_reads(trace, slots, |_| 0).0
}

/// Misses of Belady's MIN as [`optimal_misses`], with the bytes those misses read
/// (`bytes_of` each missed key): the reads to compare a cache's own bytes read against when
/// experts differ in size (a mix's layers).
pub fn optimal_reads(
    trace: &[ExpertKey],
    slots: usize,
    bytes_of: impl Fn(ExpertKey) -> usize,
) -> (usize, u64) {
    // next[i]: index of the next request of the same key after i.
    let mut next = vec![usize::MAX; trace.len()];
    let mut last_seen: HashMap<ExpertKey, usize> = HashMap::new();
    for (i, k) in trace.iter().enumerate().rev() {
        next[i] = last_seen.get(k).copied().unwrap_or(usize::MAX);
        last_seen.insert(*k, i);
    }
    // Cached keys ordered by their next use; evict the farthest.
    let mut by_next: BTreeSet<(usize, ExpertKey)> = Default::default();
    let mut next_of: HashMap<ExpertKey, usize> = HashMap::new();
    let (mut misses, mut bytes) = (0, 0u64);
    for (i, k) in trace.iter().enumerate() {
        if let Some(n) = next_of.get(k).copied() {
            by_next.remove(&(n, *k));
        } else {
            misses += 1;
            bytes += bytes_of(*k) as u64;
            if next_of.len() == slots {
                let far = *by_next.iter().next_back().expect("full cache");
                by_next.remove(&far);
                next_of.remove(&far.1);
            }
        }
        next_of.insert(*k, next[i]);
        by_next.insert((next[i], *k));
    }
    (misses, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // expert e weighs e + 1 bytes: cold a b c d (1+2+3+4) plus b and d again at 2 slots
        assert_eq!(optimal_reads(&t, 3, |k| k.expert as usize + 1), (4, 10));
    }
}
