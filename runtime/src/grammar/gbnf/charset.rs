//! Sets of Unicode scalar values as sorted, disjoint ranges: GBNF's character classes and the
//! first/continuation character sets the lexeme analysis compares.

const MAX_CHAR: u32 = 0x10FFFF;
const SURROGATES: (u32, u32) = (0xD800, 0xDFFF);

/// Inclusive ranges, sorted, neither overlapping nor touching, without surrogates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct CharSet(Vec<(u32, u32)>);

impl CharSet {
    pub(super) fn empty() -> Self {
        Self(Vec::new())
    }

    #[cfg(test)]
    pub(super) fn single(c: char) -> Self {
        Self(vec![(c as u32, c as u32)])
    }

    /// Every character (GBNF's `.`, which matches a newline too).
    pub(super) fn any() -> Self {
        Self::from_ranges([(0, MAX_CHAR)])
    }

    /// The set of the given inclusive ranges (in any order; reversed ones are empty).
    pub(super) fn from_ranges(ranges: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut v: Vec<(u32, u32)> = Vec::new();
        for (lo, hi) in ranges {
            let hi = hi.min(MAX_CHAR);
            if lo > hi {
                continue;
            }
            // Surrogates are not characters; a range across them keeps the two sides.
            if lo < SURROGATES.0 {
                v.push((lo, hi.min(SURROGATES.0 - 1)));
            }
            if hi > SURROGATES.1 {
                v.push((lo.max(SURROGATES.1 + 1), hi));
            }
        }
        v.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        Self(out)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn ranges(&self) -> &[(u32, u32)] {
        &self.0
    }

    /// Every character not in the set.
    pub(super) fn complement(&self) -> Self {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut next = 0u32;
        for &(lo, hi) in &self.0 {
            if lo > next {
                out.push((next, lo - 1));
            }
            next = hi + 1;
        }
        if next <= MAX_CHAR {
            out.push((next, MAX_CHAR));
        }
        Self::from_ranges(out)
    }

    pub(super) fn union(&self, other: &Self) -> Self {
        if other.0.is_empty() {
            return self.clone();
        }
        Self::from_ranges(self.0.iter().chain(&other.0).copied())
    }

    pub(super) fn add(&mut self, other: &Self) {
        if !other.0.is_empty() {
            *self = self.union(other);
        }
    }

    pub(super) fn intersects(&self, other: &Self) -> bool {
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (self.0[i], other.0[j]);
            if a.1 < b.0 {
                i += 1;
            } else if b.1 < a.0 {
                j += 1;
            } else {
                return true;
            }
        }
        false
    }

    #[cfg(test)]
    pub(super) fn contains(&self, c: u32) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= c && c <= hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_complement_and_skip_surrogates() {
        let s = CharSet::from_ranges([(b'c' as u32, b'e' as u32), (b'a' as u32, b'b' as u32)]);
        assert_eq!(s.ranges(), &[(97, 101)]);
        let c = s.complement();
        assert!(!c.contains(97) && c.contains(96) && c.contains(102) && c.contains(MAX_CHAR));
        assert!(!c.intersects(&s));
        assert!(c.union(&s) == CharSet::any());
        assert!(!CharSet::any().contains(0xD900));
        assert_eq!(CharSet::from_ranges([(0xD800, 0xDFFF)]), CharSet::empty());
        assert_eq!(
            CharSet::from_ranges([(b'z' as u32, b'a' as u32)]),
            CharSet::empty()
        );
        assert!(CharSet::single('x').intersects(&CharSet::from_ranges([(0, 200)])));
    }
}
