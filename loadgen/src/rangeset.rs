//! A set of sequence numbers kept as sorted, disjoint, inclusive ranges.
//!
//! What a device holds of a conversation is nearly always one range
//! (`1..=n`), with a few holes while its own sends await their SENT; this
//! keeps that in a few words per conversation however long the run.

use serde::{Deserialize, Serialize};

/// Sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `x`; false when it was already there.
    pub fn insert(&mut self, x: u64) -> bool {
        // Fast path: appending at or just past the end.
        if let Some(last) = self.ranges.last_mut() {
            if x == last.1.wrapping_add(1) && x != 0 {
                last.1 = x;
                return true;
            }
            if x > last.1 {
                self.ranges.push((x, x));
                return true;
            }
        }
        // First range whose end is at or past x - 1 (it may absorb x).
        let i = self
            .ranges
            .partition_point(|&(_, end)| end.saturating_add(1) < x);
        match self.ranges.get(i).copied() {
            Some((start, end)) if start <= x && x <= end => false,
            Some((start, end)) if end.saturating_add(1) == x => {
                self.ranges[i].1 = x;
                // x may now touch the next range.
                if let Some(&(next_start, next_end)) = self.ranges.get(i + 1) {
                    if next_start == x + 1 {
                        self.ranges[i] = (start, next_end);
                        self.ranges.remove(i + 1);
                    }
                }
                true
            }
            Some((start, end)) if x.saturating_add(1) == start => {
                self.ranges[i] = (x, end);
                true
            }
            _ => {
                self.ranges.insert(i, (x, x));
                true
            }
        }
    }

    /// True when `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, end)| end < x);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= x)
    }

    /// The largest `n` such that every value in `1..=n` is held (0 if 1 is
    /// missing): the cursor a device resumes from.
    pub fn prefix(&self) -> u64 {
        match self.ranges.first() {
            Some(&(start, end)) if start <= 1 => end,
            _ => 0,
        }
    }

    /// The largest value held, if any.
    pub fn max(&self) -> Option<u64> {
        self.ranges.last().map(|r| r.1)
    }

    /// How many values are held.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(s, e)| e - s + 1).sum()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges, ascending.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Adds every value of `other`.
    pub fn union(&mut self, other: &Self) {
        if other.ranges.is_empty() {
            return;
        }
        let mut all: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        all.extend_from_slice(&self.ranges);
        all.extend_from_slice(&other.ranges);
        all.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (s, e) in all {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(values: &[u64]) -> RangeSet {
        let mut s = RangeSet::new();
        for &v in values {
            s.insert(v);
        }
        s
    }

    #[test]
    fn in_order_inserts_make_one_range() {
        let s = of(&(1..=1000).collect::<Vec<_>>());
        assert_eq!(s.ranges(), &[(1, 1000)]);
        assert_eq!(s.prefix(), 1000);
        assert_eq!(s.len(), 1000);
    }

    #[test]
    fn holes_fill_and_ranges_join() {
        let mut s = of(&[1, 2, 5, 6, 9]);
        assert_eq!(s.ranges(), &[(1, 2), (5, 6), (9, 9)]);
        assert_eq!(s.prefix(), 2);
        assert!(s.insert(4));
        assert_eq!(s.ranges(), &[(1, 2), (4, 6), (9, 9)]);
        assert!(s.insert(3));
        assert_eq!(s.ranges(), &[(1, 6), (9, 9)]);
        assert!(s.insert(8));
        assert!(s.insert(7));
        assert_eq!(s.ranges(), &[(1, 9)]);
        assert!(!s.insert(5), "already held");
        assert!(s.insert(0));
        assert_eq!(s.ranges(), &[(0, 9)]);
    }

    #[test]
    fn random_inserts_match_a_plain_set() {
        let mut r = crate::rng::SplitMix64::new(5);
        let mut s = RangeSet::new();
        let mut plain = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let v = r.below(400);
            assert_eq!(s.insert(v), plain.insert(v), "insert {v}");
        }
        for v in 0..450 {
            assert_eq!(s.contains(v), plain.contains(&v), "contains {v}");
        }
        assert_eq!(s.len(), plain.len() as u64);
        for w in s.ranges().windows(2) {
            assert!(
                w[0].1 + 1 < w[1].0,
                "ranges must be disjoint and apart: {w:?}"
            );
        }
    }

    #[test]
    fn union_merges_overlaps_and_neighbours() {
        let mut a = of(&[1, 2, 3, 10]);
        a.union(&of(&[4, 5, 9, 20]));
        assert_eq!(a.ranges(), &[(1, 5), (9, 10), (20, 20)]);
        a.union(&RangeSet::new());
        assert_eq!(a.len(), 8);
        assert!(!a.contains(6) && a.contains(9) && !a.contains(21));
        assert_eq!(a.max(), Some(20));
        assert!(RangeSet::new().is_empty());
        assert_eq!(RangeSet::new().prefix(), 0);
    }
}
