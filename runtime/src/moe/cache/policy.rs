//! Which expert a full cache drops (LRU, LFU or Belady's ranking), whether a speculative read
//! may displace one, and the use statistics and clock behind both.

use super::layout::ExpertKey;
use super::slots::{Slot, NEVER};

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

/// Slow moving averages (one update per visit of the layer): expert use is skewed and drifts
/// slowly (fitted offline, docs/BENCHMARKS.md).
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
    /// The weight the averages' updates have had so far, `1 - (1 - rate)^updates`: dividing by
    /// it removes the averages' bias toward their start of zero (Adam's bias correction), so
    /// the first tokens of a run already rank experts by their use instead of all alike.
    frequency_weight: Vec<f32>,
    stickiness_weight: Vec<f32>,
}

impl UseStats {
    fn new(keys: usize) -> Self {
        Self {
            frequency: vec![0.0; keys],
            stickiness: vec![0.0; keys],
            used_last: vec![false; keys],
            frequency_weight: vec![0.0; keys],
            stickiness_weight: vec![0.0; keys],
        }
    }

    fn record(&mut self, i: usize, used: bool) {
        let u = used as u32 as f32;
        if self.used_last[i] {
            self.stickiness[i] += STICKINESS_RATE * (u - self.stickiness[i]);
            self.stickiness_weight[i] += STICKINESS_RATE * (1.0 - self.stickiness_weight[i]);
        }
        self.frequency[i] += FREQUENCY_RATE * (u - self.frequency[i]);
        self.frequency_weight[i] += FREQUENCY_RATE * (1.0 - self.frequency_weight[i]);
        self.used_last[i] = used;
    }

    /// The use frequency without its start's bias (0 before any visit).
    fn frequency_of(&self, i: usize) -> f32 {
        unbiased(self.frequency[i], self.frequency_weight[i])
    }

    /// The chance that the next visit of its layer uses it: its frequency, or, if the latest
    /// visit used it, how often it is used again right after a use when that is higher (experts
    /// of real text stick to a few consecutive tokens; docs/BENCHMARKS.md).
    fn next_visit_chance(&self, i: usize) -> f32 {
        let frequency = self.frequency_of(i);
        if self.used_last[i] {
            frequency.max(unbiased(self.stickiness[i], self.stickiness_weight[i]))
        } else {
            frequency
        }
    }
}

fn unbiased(average: f32, weight: f32) -> f32 {
    if weight > 0.0 {
        average / weight
    } else {
        0.0
    }
}

/// The step of `layer` of token `token` in a model of `n_layers` layers: the cache's clock.
pub(super) fn step_of(n_layers: usize, token: usize, layer: usize) -> u64 {
    (token * n_layers + layer) as u64
}

/// The eviction policy with its clock and use statistics; the slots it chooses among are passed
/// in.
pub(super) struct Policy {
    eviction: Eviction,
    uses: UseStats,
    n_layers: usize,
    n_expert: usize,
    /// Current position in the computation (token * layers + layer), the clock of LRU/Belady.
    step: u64,
}

impl Policy {
    pub fn new(eviction: Eviction, n_layers: usize, n_expert: usize) -> Self {
        Self {
            eviction,
            uses: UseStats::new(n_layers * n_expert),
            n_layers,
            n_expert,
            step: 0,
        }
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Moves the clock: the computation is at `layer` of token `token`.
    pub fn set_position(&mut self, token: usize, layer: usize) {
        self.step = step_of(self.n_layers, token, layer);
    }

    /// Records which experts a visit of `layer` used.
    pub fn record_visit(&mut self, layer: usize, experts: &[u32]) {
        for e in 0..self.n_expert {
            let used = experts.contains(&(e as u32));
            self.uses.record(layer * self.n_expert + e, used);
        }
    }

    /// Starts the use frequencies from `[n_layer, n_expert]` fractions (ignored if the shape
    /// differs).
    pub fn seed_frequency(&mut self, frequency: &[f32]) {
        if frequency.len() == self.uses.frequency.len() {
            self.uses.frequency.copy_from_slice(frequency);
            // A prior from calibration is a whole average already, not a start to correct.
            self.uses.frequency_weight.fill(1.0);
        }
    }

    fn index(&self, key: ExpertKey) -> usize {
        key.layer as usize * self.n_expert + key.expert as usize
    }

    fn frequency(&self, key: ExpertKey) -> f32 {
        self.uses.frequency_of(self.index(key))
    }

    /// When an expert is next expected: its predicted step if a predictor named one; otherwise
    /// the next visit of its layer plus the visits it typically skips (from its frequency of
    /// use). Layers are visited in a cycle, one token after another, so without this estimate
    /// LRU evicts exactly what the next token needs once the working set exceeds the cache.
    fn expected_use(&self, s: &Slot, key: ExpertKey) -> u64 {
        // A predicted use that has passed without the expert being used was a wrong guess:
        // fall back to the estimate (else the guess would keep it cached as "needed now").
        if s.next_use != NEVER && s.next_use >= self.step {
            return s.next_use;
        }
        let n_layers = self.n_layers as u64;
        let (token, layer) = (self.step / n_layers, self.step % n_layers);
        let l = key.layer as u64;
        let next_visit = if l > layer {
            token * n_layers + l
        } else {
            (token + 1) * n_layers + l
        };
        let p = self.uses.next_visit_chance(self.index(key));
        next_visit + (n_layers as f32 * (1.0 / p.max(1.0 / 64.0) - 1.0)) as u64
    }

    /// The slot a demand read overwrites: an empty one, else the policy's choice among the
    /// evictable ones; `None` when every slot is held, loading or kept resident.
    pub fn victim(&self, slots: &[Slot]) -> Option<usize> {
        self.choose(slots, None)
    }

    /// The slot a speculative read of `key`, predicted for `step`, may overwrite: an empty one,
    /// else only an expert expected later than `step` and not more frequently used than `key`.
    pub fn speculative_victim(&self, slots: &[Slot], key: ExpertKey, step: u64) -> Option<usize> {
        self.choose(slots, Some((step, self.frequency(key))))
    }

    fn choose(&self, slots: &[Slot], speculative: Option<(u64, f32)>) -> Option<usize> {
        let mut best: Option<(usize, (u64, u64))> = None;
        for (i, s) in slots.iter().enumerate() {
            if !s.evictable() {
                continue;
            }
            let Some(key) = s.key else {
                return Some(i); // an empty slot is always the best choice
            };
            let freq = self.frequency(key);
            let expected = self.expected_use(s, key);
            if let Some((step, new_freq)) = speculative {
                if expected <= step || freq > new_freq {
                    continue;
                }
            }
            let rank = victim_rank(self.eviction, freq, s.last_use, expected);
            if best.is_none_or(|(_, r)| rank > r) {
                best = Some((i, rank));
            }
        }
        best.map(|(i, _)| i)
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

#[cfg(test)]
mod tests {
    use super::*;

    const N_LAYERS: usize = 4;
    const N_EXPERT: usize = 8;

    fn key(layer: u32, expert: u32) -> ExpertKey {
        ExpertKey { layer, expert }
    }

    /// A ready, unheld slot holding `key`, last used at `last_use`, predicted for `next_use`.
    fn ready(key: ExpertKey, last_use: u64, next_use: u64) -> Slot {
        Slot {
            key: Some(key),
            last_use,
            next_use,
            ..Slot::EMPTY
        }
    }

    /// Frequencies of `[(key, frequency)]`, zero for the other experts.
    fn seeded(policy: &mut Policy, frequencies: &[(ExpertKey, f32)]) {
        let mut f = vec![0.0; N_LAYERS * N_EXPERT];
        for &(k, v) in frequencies {
            f[k.layer as usize * N_EXPERT + k.expert as usize] = v;
        }
        policy.seed_frequency(&f);
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
        assert!((u.next_visit_chance(1) - u.frequency_of(1)).abs() < 1e-6);
        u.record(0, false);
        assert_eq!(u.next_visit_chance(0), u.frequency_of(0));
    }

    /// The first visits already give an expert's frequency, not a fraction of it: the moving
    /// average's start at zero is divided out.
    #[test]
    fn early_frequencies_are_not_biased_toward_zero() {
        let mut u = UseStats::new(2);
        for visit in 0..8 {
            u.record(0, visit % 2 == 0);
            u.record(1, false);
        }
        assert!((u.frequency_of(0) - 0.5).abs() < 0.05, "{:?}", u);
        assert!(
            u.frequency[0] < 0.05,
            "the raw average is still near its start"
        );
        assert_eq!(u.frequency_of(1), 0.0);
        assert_eq!(UseStats::new(1).frequency_of(0), 0.0);
    }

    #[test]
    fn belady_evicts_the_farthest_expected_use() {
        let mut p = Policy::new(Eviction::Belady, N_LAYERS, N_EXPERT);
        p.set_position(2, 1);
        let now = p.step();
        // Predicted uses: the one predicted last goes, whatever the recency.
        let slots = [
            ready(key(1, 0), now, now + 5),
            ready(key(2, 0), 0, now + 3),
            ready(key(3, 0), now, now + 20),
            ready(key(0, 0), now, now + 9),
        ];
        assert_eq!(p.victim(&slots), Some(2));
        // Unpredicted experts are judged by their use frequency: a rare one is expected much
        // later than a frequent one, later than any of the predictions above.
        seeded(&mut p, &[(key(1, 1), 0.9), (key(1, 2), 0.02)]);
        let slots = [
            ready(key(1, 1), now, NEVER),
            ready(key(3, 0), now, now + 20),
            ready(key(1, 2), now, NEVER),
        ];
        assert_eq!(p.victim(&slots), Some(2));
        // A prediction whose step has passed without a use no longer protects its expert.
        let slots = [ready(key(1, 1), now, NEVER), ready(key(2, 3), now, now - 1)];
        assert_eq!(p.victim(&slots), Some(1));
        // Equal expectations: the least recently used goes.
        let slots = [
            ready(key(1, 0), now - 2, now + 4),
            ready(key(2, 0), now - 7, now + 4),
            ready(key(3, 0), now - 1, now + 4),
        ];
        assert_eq!(p.victim(&slots), Some(1));
    }

    #[test]
    fn held_loading_and_kept_slots_are_never_chosen() {
        for eviction in [Eviction::Lru, Eviction::Lfu, Eviction::Belady] {
            let mut p = Policy::new(eviction, N_LAYERS, N_EXPERT);
            p.set_position(5, 0);
            let now = p.step();
            // Slot 0 is the best victim under every policy (oldest, rarest, farthest).
            let best = ready(key(1, 0), 0, NEVER);
            let other = ready(key(2, 0), now, now + 1);
            seeded(&mut p, &[(key(2, 0), 0.5)]);
            assert_eq!(p.victim(&[best.clone(), other.clone()]), Some(0));
            let held = Slot {
                holds: 1,
                ..best.clone()
            };
            let loading = Slot {
                loading: true,
                ..best.clone()
            };
            let kept = Slot {
                kept_resident: true,
                ..best.clone()
            };
            // An empty slot that a failed read left held is not free either.
            let held_empty = Slot {
                holds: 1,
                ..Slot::EMPTY
            };
            for blocked in [held, loading, kept, held_empty] {
                let slots = [blocked.clone(), other.clone()];
                assert_eq!(p.victim(&slots), Some(1), "{eviction:?} {blocked:?}");
                assert_eq!(p.victim(&slots[..1]), None, "{eviction:?} {blocked:?}");
                let newcomer = key(3, 3);
                assert_eq!(
                    p.speculative_victim(&slots[..1], newcomer, now + 1),
                    None,
                    "{eviction:?} {blocked:?}"
                );
            }
        }
    }

    #[test]
    fn empty_slots_are_taken_first() {
        for eviction in [Eviction::Lru, Eviction::Lfu, Eviction::Belady] {
            let mut p = Policy::new(eviction, N_LAYERS, N_EXPERT);
            p.set_position(5, 0);
            let slots = [
                ready(key(1, 0), 0, NEVER),
                Slot::EMPTY,
                ready(key(2, 0), 0, NEVER),
                Slot::EMPTY,
            ];
            assert_eq!(p.victim(&slots), Some(1), "{eviction:?}");
            // Even a speculative read of a never-used expert takes an empty slot.
            assert_eq!(
                p.speculative_victim(&slots, key(3, 7), p.step() + 1_000_000),
                Some(1),
                "{eviction:?}"
            );
        }
    }

    /// A guess only displaces an expert expected after the guessed use and not used more often
    /// than the guessed expert: prefetching never evicts what is about to be used.
    #[test]
    fn speculative_reads_displace_only_later_and_rarer_experts() {
        let mut p = Policy::new(Eviction::Belady, N_LAYERS, N_EXPERT);
        p.set_position(3, 0);
        let now = p.step();
        let newcomer = key(2, 5);
        seeded(
            &mut p,
            &[(newcomer, 0.3), (key(1, 1), 0.6), (key(3, 1), 0.1)],
        );
        let wanted_at = now + 6;
        // Expected before the guessed use (predicted), or at it: kept.
        let sooner = ready(key(3, 1), now, now + 2);
        let same_time = ready(key(3, 1), now, wanted_at);
        assert_eq!(p.speculative_victim(&[sooner], newcomer, wanted_at), None);
        assert_eq!(
            p.speculative_victim(std::slice::from_ref(&same_time), newcomer, wanted_at),
            None
        );
        // A demand read takes it all the same.
        assert_eq!(p.victim(&[same_time]), Some(0));
        // Expected later but used more often than the newcomer: kept.
        let frequent_later = ready(key(1, 1), now, now + 40);
        assert_eq!(
            p.speculative_victim(std::slice::from_ref(&frequent_later), newcomer, wanted_at),
            None
        );
        // Expected later and rarer: displaced, the farthest of them first.
        let rare_later = ready(key(3, 1), now, now + 30);
        let rare_farther = ready(key(3, 1), now, now + 50);
        let slots = [frequent_later, rare_later, rare_farther];
        assert_eq!(p.speculative_victim(&slots, newcomer, wanted_at), Some(2));
        // As frequent as the newcomer still qualifies ("not more frequent").
        seeded(&mut p, &[(newcomer, 0.1), (key(3, 1), 0.1)]);
        assert_eq!(
            p.speculative_victim(&slots[1..2], newcomer, wanted_at),
            Some(0)
        );
    }

    #[test]
    fn the_clock_counts_layers_then_tokens() {
        let mut p = Policy::new(Eviction::Lru, N_LAYERS, N_EXPERT);
        p.set_position(3, 2);
        assert_eq!(p.step(), 14);
        assert_eq!(step_of(N_LAYERS, 3, 2), 14);
    }
}
