//! The newest entries of the conversations, kept in memory so that catch-up
//! and history, which mostly ask for recent messages, read them without a
//! range read of the store.
//!
//! Every entry the router writes goes in, in write order, and the oldest
//! written go first once the cache is over its byte limit: it holds the
//! last few minutes of traffic, whichever conversations they were in. A
//! read the store answered that ends at a conversation's newest entry goes
//! in too, when the conversation has no run ([`Recent::fill`]): after a
//! restart the first member of a group to catch up pays for the rest. For
//! each conversation it holds one run of consecutive sequences ending at
//! the newest entry written, so a read it answers is exactly what the store
//! would answer; a read that reaches below a run, or above it (a run left
//! behind by entries this router did not write), goes to the store.
//!
//! Entries are written once and never change, so a run stays true as long
//! as the store keeps what was written to it: a failed write or sync may
//! lose a batch the run already holds, and the router then clears the cache
//! ([`Recent::clear`]).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::codec::StoredEntry;

/// What an entry costs beyond its bodies: the entry itself, its slot in its
/// run and its record in the write order, and the allocation headers of its
/// copied body. An estimate of the heap, counted against the limit.
const ENTRY_OVERHEAD: usize = size_of::<StoredEntry>() + size_of::<(Arc<str>, u64)>() + 32;

/// What a conversation's run costs beyond its entries and its name: the map
/// slot, the run and the name's allocation.
const RUN_OVERHEAD: usize = size_of::<(Arc<str>, Run)>() + 48;

/// Which end of a range of entries a read starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Oldest first (catch-up).
    Oldest,
    /// The newest, newest first (history pages).
    Newest,
}

/// The cache. A limit of 0 turns it off.
#[derive(Debug)]
pub(crate) struct Recent {
    runs: FxHashMap<Arc<str>, Run>,
    /// Every entry in write order, oldest first, by conversation and
    /// sequence. A record whose entry left with its run (a gap reset it)
    /// stays until it comes up, and is skipped then.
    order: VecDeque<(Arc<str>, u64)>,
    bytes: usize,
    limit: usize,
}

/// A conversation's entries `first..first + entries.len()`.
#[derive(Debug)]
struct Run {
    first: u64,
    entries: VecDeque<StoredEntry>,
}

impl Run {
    /// The newest sequence held (the run is never empty).
    fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }

    fn get(&self, seq: u64) -> &StoredEntry {
        &self.entries[(seq - self.first) as usize]
    }
}

/// What `entry` costs against the limit.
fn cost(entry: &StoredEntry) -> usize {
    let bodies = entry.per_device.as_ref().map_or(0, |list| {
        list.iter()
            .map(|(user, _, body)| size_of::<(Arc<str>, u32, Bytes)>() + user.len() + body.len())
            .sum()
    });
    ENTRY_OVERHEAD + entry.body.len() + bodies
}

/// A copy of `entry` that owns its bodies: a received body is a slice of
/// the frame it came in (in fleet mode, of a message that carried a whole
/// batch of commands), which the cache must not keep alive.
fn compact(entry: &StoredEntry) -> StoredEntry {
    let per_device = entry.per_device.as_ref().map(|list| {
        list.iter()
            .map(|(user, device, body)| (user.clone(), *device, Bytes::copy_from_slice(body)))
            .collect()
    });
    StoredEntry {
        body: Bytes::copy_from_slice(&entry.body),
        per_device,
        ..entry.clone()
    }
}

impl Recent {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            runs: FxHashMap::default(),
            order: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Bytes held, as counted against the limit.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets everything (the store may have lost entries the cache holds).
    pub(crate) fn clear(&mut self) {
        self.runs = FxHashMap::default();
        self.order = VecDeque::new();
        self.bytes = 0;
    }

    /// Adds entry `seq` of `conversation`, just written to the store.
    pub(crate) fn insert(&mut self, conversation: &str, seq: u64, entry: &StoredEntry) {
        if self.limit == 0 {
            return;
        }
        let cost = cost(entry);
        let key = match self.runs.get_key_value(conversation) {
            Some((key, run)) if run.last() + 1 == seq => key.clone(),
            // Not the next sequence: entries between were written by
            // another router (a fleet partition changed hands), or by a
            // batch whose failure cleared the cache. The run starts again.
            Some((key, _)) => {
                let key = key.clone();
                self.remove_run(&key);
                key
            }
            None => Arc::from(conversation),
        };
        if cost + RUN_OVERHEAD + key.len() > self.limit {
            // Larger than the whole cache: the run ends before it.
            self.remove_run(&key);
            return;
        }
        let run = self.runs.entry(key.clone()).or_insert_with(|| {
            self.bytes += RUN_OVERHEAD + key.len();
            Run {
                first: seq,
                entries: VecDeque::new(),
            }
        });
        run.entries.push_back(compact(entry));
        self.order.push_back((key, seq));
        self.bytes += cost;
        self.evict();
    }

    /// Starts `conversation`'s run with entries read from the store, when
    /// they are a run: consecutive sequences, none corrupt, in either
    /// order, up to `newest`, the newest entry the conversation has (so a
    /// node that restarted, or whose entries moved on, answers the next
    /// reader of the same messages from memory: the other members of a
    /// group catching up after the first). They count as just written for
    /// eviction. Nothing happens when a run is already held: it ends at
    /// the newest entry too, and the read came to the store because it
    /// reached below it.
    pub(crate) fn fill(
        &mut self,
        conversation: &str,
        read: &[(u64, Option<StoredEntry>)],
        newest: u64,
    ) {
        if self.limit == 0 || read.is_empty() || self.runs.contains_key(conversation) {
            return;
        }
        let (first, last) = match (read.first(), read.last()) {
            (Some(a), Some(b)) => (a.0.min(b.0), a.0.max(b.0)),
            _ => return,
        };
        let ascending = read.first().is_some_and(|e| e.0 == first);
        let consecutive = read.iter().enumerate().all(|(i, (seq, entry))| {
            let at = if ascending {
                first + i as u64
            } else {
                last - i as u64
            };
            *seq == at && entry.is_some()
        });
        if !consecutive || last != newest {
            return;
        }
        let key: Arc<str> = Arc::from(conversation);
        let entries: VecDeque<StoredEntry> = if ascending {
            read.iter()
                .filter_map(|(_, e)| e.as_ref())
                .map(compact)
                .collect()
        } else {
            read.iter()
                .rev()
                .filter_map(|(_, e)| e.as_ref())
                .map(compact)
                .collect()
        };
        let cost = RUN_OVERHEAD + key.len() + entries.iter().map(cost).sum::<usize>();
        if cost > self.limit {
            return;
        }
        self.order
            .extend((first..=last).map(|seq| (key.clone(), seq)));
        self.runs.insert(key, Run { first, entries });
        self.bytes += cost;
        self.evict();
    }

    /// Drops the oldest written entries until the cache is within its limit.
    fn evict(&mut self) {
        // Every live entry costs at least ENTRY_OVERHEAD, so this bounds the
        // stale records the order may hold too.
        let max_records = 2 * (self.limit / ENTRY_OVERHEAD) + 64;
        while self.bytes > self.limit || self.order.len() > max_records {
            let Some((conversation, seq)) = self.order.pop_front() else {
                break;
            };
            let Some(run) = self.runs.get_mut(&conversation) else {
                continue;
            };
            if run.first != seq {
                continue;
            }
            if let Some(entry) = run.entries.pop_front() {
                self.bytes -= cost(&entry);
                run.first += 1;
            }
            if run.entries.is_empty() {
                self.remove_run(&conversation);
            }
        }
    }

    fn remove_run(&mut self, conversation: &str) {
        if let Some((key, run)) = self.runs.remove_entry(conversation) {
            self.bytes -= RUN_OVERHEAD + key.len();
            self.bytes -= run.entries.iter().map(cost).sum::<usize>();
        }
    }

    /// At most `limit` entries of `conversation` in `from..=to`, from the
    /// end `order` names, as the store's `entries` and
    /// `entries_newest_first` read them; `None` when the cache does not
    /// hold all of them.
    pub(crate) fn entries(
        &self,
        conversation: &str,
        from: u64,
        to: u64,
        limit: usize,
        order: Order,
    ) -> Option<Vec<(u64, Option<StoredEntry>)>> {
        if from > to || limit == 0 {
            return Some(Vec::new());
        }
        let run = self.runs.get(conversation)?;
        let entry = |s| (s, Some(run.get(s).clone()));
        match order {
            Order::Oldest => {
                let to = to.min(from.saturating_add(limit as u64 - 1));
                let held = from >= run.first && to <= run.last();
                held.then(|| (from..=to).map(entry).collect())
            }
            Order::Newest => {
                if to < run.first || to > run.last() {
                    return None;
                }
                let held = to - run.first.max(from) + 1;
                if run.first > from && held < limit as u64 {
                    // The page reaches below the run.
                    return None;
                }
                let oldest = to - held.min(limit as u64) + 1;
                Some((oldest..=to).rev().map(entry).collect())
            }
        }
    }

    /// Whether `conversation` has an entry in `after + 1..=to`, as
    /// [`crate::store::Store::has_entries`] answers; `None` when the cache
    /// cannot tell.
    pub(crate) fn has_entries(&self, conversation: &str, after: u64, to: u64) -> Option<bool> {
        if after >= to {
            return Some(false);
        }
        let run = self.runs.get(conversation)?;
        // Any held sequence in the range is an entry the store has.
        (after < run.last() && to >= run.first).then_some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_protocol::frame::EntryKind;

    fn entry(n: u64, body_len: usize) -> StoredEntry {
        StoredEntry {
            kind: EntryKind::Message,
            server_id: n,
            timestamp_ms: n,
            sender: Arc::from("alice"),
            sender_device: 1,
            client_id: n,
            body: Bytes::from(vec![n as u8; body_len]),
            per_device: None,
        }
    }

    fn seqs(read: Option<Vec<(u64, Option<StoredEntry>)>>) -> Option<Vec<u64>> {
        read.map(|v| {
            v.into_iter()
                .map(|(s, e)| {
                    assert_eq!(e.expect("entry").server_id, s);
                    s
                })
                .collect()
        })
    }

    #[test]
    fn a_run_answers_only_the_reads_it_holds_whole() {
        let mut r = Recent::new(1 << 20);
        for s in 5..=9 {
            r.insert("d:a:b", s, &entry(s, 10));
        }
        assert_eq!(
            seqs(r.entries("d:a:b", 5, 9, 100, Order::Oldest)),
            Some(vec![5, 6, 7, 8, 9])
        );
        assert_eq!(
            seqs(r.entries("d:a:b", 6, 9, 2, Order::Oldest)),
            Some(vec![6, 7])
        );
        // A page that ends inside the run is answered, whatever `to` says.
        assert_eq!(
            seqs(r.entries("d:a:b", 6, 12, 2, Order::Oldest)),
            Some(vec![6, 7])
        );
        // Below the run, above it, or another conversation: the store's.
        assert_eq!(seqs(r.entries("d:a:b", 4, 9, 100, Order::Oldest)), None);
        assert_eq!(seqs(r.entries("d:a:b", 6, 10, 100, Order::Oldest)), None);
        assert_eq!(seqs(r.entries("d:a:c", 1, 2, 100, Order::Oldest)), None);
        // Nothing asked: nothing to read.
        assert_eq!(
            seqs(r.entries("d:a:c", 3, 2, 100, Order::Oldest)),
            Some(vec![])
        );

        assert_eq!(
            seqs(r.entries("d:a:b", 1, 9, 3, Order::Newest)),
            Some(vec![9, 8, 7])
        );
        assert_eq!(
            seqs(r.entries("d:a:b", 6, 8, 10, Order::Newest)),
            Some(vec![8, 7, 6])
        );
        // The page would reach below the run.
        assert_eq!(seqs(r.entries("d:a:b", 1, 9, 6, Order::Newest)), None);
        assert_eq!(seqs(r.entries("d:a:b", 1, 10, 1, Order::Newest)), None);

        assert_eq!(r.has_entries("d:a:b", 8, 9), Some(true));
        assert_eq!(r.has_entries("d:a:b", 9, 9), Some(false));
        assert_eq!(r.has_entries("d:a:b", 1, 5), Some(true));
        assert_eq!(r.has_entries("d:a:b", 9, 12), None);
        assert_eq!(r.has_entries("d:a:b", 1, 4), None);
    }

    #[test]
    fn the_oldest_written_leave_first_and_the_bytes_stay_within_the_limit() {
        let per_entry = cost(&entry(0, 100));
        let limit = RUN_OVERHEAD * 2 + 10 + per_entry * 10;
        let mut r = Recent::new(limit);
        for s in 1..=8 {
            r.insert("d:a:b", s, &entry(s, 100));
            r.insert("d:a:c", s, &entry(s, 100));
        }
        assert!(r.bytes() <= limit, "{} > {limit}", r.bytes());
        // Ten entries fit: the five newest of each conversation.
        assert_eq!(
            seqs(r.entries("d:a:b", 4, 8, 100, Order::Oldest)),
            Some(vec![4, 5, 6, 7, 8])
        );
        assert_eq!(seqs(r.entries("d:a:c", 3, 8, 100, Order::Oldest)), None);
        assert_eq!(
            seqs(r.entries("d:a:c", 4, 8, 100, Order::Oldest)),
            Some(vec![4, 5, 6, 7, 8])
        );

        // One conversation's writes push the other's out entirely.
        for s in 9..=30 {
            r.insert("d:a:b", s, &entry(s, 100));
        }
        assert_eq!(r.has_entries("d:a:c", 0, 8), None);
        assert!(!r.runs.contains_key("d:a:c"));
        assert!(r.bytes() <= limit);
        assert!(r.order.len() <= 2 * (limit / ENTRY_OVERHEAD) + 64);
    }

    #[test]
    fn a_gap_starts_the_run_again_and_clear_forgets_everything() {
        let mut r = Recent::new(1 << 20);
        for s in 1..=3 {
            r.insert("d:a:b", s, &entry(s, 10));
        }
        let one_run = r.bytes();
        // Sequences 4 to 6 were written elsewhere.
        r.insert("d:a:b", 7, &entry(7, 10));
        assert_eq!(seqs(r.entries("d:a:b", 3, 7, 100, Order::Oldest)), None);
        assert_eq!(
            seqs(r.entries("d:a:b", 7, 7, 100, Order::Oldest)),
            Some(vec![7])
        );
        assert!(r.bytes() < one_run);
        // The stale records of 1 to 3 are skipped, not mistaken for 7's.
        r.limit = 0;
        r.evict();
        assert_eq!(r.bytes(), 0);
        assert!(r.runs.is_empty() && r.order.is_empty());

        let mut r = Recent::new(1 << 20);
        r.insert("d:a:b", 1, &entry(1, 10));
        r.clear();
        assert_eq!(r.bytes(), 0);
        assert_eq!(seqs(r.entries("d:a:b", 1, 1, 1, Order::Oldest)), None);
    }

    #[test]
    fn a_read_that_reaches_the_newest_entry_starts_a_run() {
        let read = |seqs: &[u64]| -> Vec<(u64, Option<StoredEntry>)> {
            seqs.iter().map(|&s| (s, Some(entry(s, 10)))).collect()
        };
        let mut r = Recent::new(1 << 20);
        // Not a run: short of the newest entry, a gap, a corrupt entry.
        r.fill("d:a:b", &read(&[3, 4, 5]), 6);
        r.fill("d:a:b", &read(&[3, 5, 6]), 6);
        let mut corrupt = read(&[4, 5, 6]);
        corrupt[1].1 = None;
        r.fill("d:a:b", &corrupt, 6);
        r.fill("d:a:b", &[], 6);
        assert_eq!(r.bytes(), 0);
        assert!(r.runs.is_empty() && r.order.is_empty());

        // A history page reads newest first: the same run.
        r.fill("d:a:b", &read(&[6, 5, 4]), 6);
        assert_eq!(
            seqs(r.entries("d:a:b", 4, 6, 100, Order::Oldest)),
            Some(vec![4, 5, 6])
        );
        assert_eq!(seqs(r.entries("d:a:b", 3, 6, 100, Order::Oldest)), None);
        // The next write extends it; a later fill leaves a held run alone.
        r.insert("d:a:b", 7, &entry(7, 10));
        let held = r.bytes();
        r.fill("d:a:b", &read(&[1, 2, 3, 4, 5, 6, 7]), 7);
        assert_eq!(r.bytes(), held);
        assert_eq!(
            seqs(r.entries("d:a:b", 4, 7, 100, Order::Oldest)),
            Some(vec![4, 5, 6, 7])
        );

        // Filled entries leave in the order they came in, like written ones.
        r.fill("d:a:c", &read(&[1, 2]), 2);
        r.limit = r.bytes() - 1;
        r.evict();
        assert_eq!(seqs(r.entries("d:a:b", 4, 7, 100, Order::Oldest)), None);
        assert_eq!(
            seqs(r.entries("d:a:b", 5, 7, 100, Order::Oldest)),
            Some(vec![5, 6, 7])
        );
        r.limit = 0;
        r.evict();
        assert_eq!(r.bytes(), 0);
        assert!(r.runs.is_empty() && r.order.is_empty());
        // Off: nothing is filled.
        r.fill("d:a:b", &read(&[1]), 1);
        assert!(r.runs.is_empty());
    }

    #[test]
    fn an_entry_larger_than_the_cache_ends_its_run() {
        let mut r = Recent::new(RUN_OVERHEAD + 16 + cost(&entry(0, 100)) * 3);
        r.insert("d:a:b", 1, &entry(1, 100));
        r.insert("d:a:b", 2, &entry(2, 100_000));
        assert_eq!(r.bytes(), 0);
        assert_eq!(seqs(r.entries("d:a:b", 1, 1, 1, Order::Oldest)), None);
        r.insert("d:a:b", 3, &entry(3, 100));
        assert_eq!(
            seqs(r.entries("d:a:b", 3, 3, 1, Order::Oldest)),
            Some(vec![3])
        );
        assert_eq!(seqs(r.entries("d:a:b", 2, 3, 2, Order::Oldest)), None);
    }

    #[test]
    fn a_cached_body_does_not_keep_its_frame_alive() {
        let frame = Bytes::from(vec![7u8; 4096]);
        let mut e = entry(1, 0);
        e.body = frame.slice(100..200);
        let mut r = Recent::new(1 << 20);
        r.insert("d:a:b", 1, &e);
        let held = r
            .entries("d:a:b", 1, 1, 1, Order::Oldest)
            .unwrap()
            .remove(0)
            .1
            .unwrap();
        assert_eq!(held.body, e.body);
        drop(e);
        // The frame's only owner is `frame` again.
        assert!(frame.is_unique());
    }

    #[test]
    fn off_holds_nothing() {
        let mut r = Recent::new(0);
        r.insert("d:a:b", 1, &entry(1, 10));
        assert_eq!(r.bytes(), 0);
        assert_eq!(seqs(r.entries("d:a:b", 1, 1, 1, Order::Oldest)), None);
    }
}
