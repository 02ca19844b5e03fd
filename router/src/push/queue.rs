//! The router's side of push: which notifications wait, until when, and
//! which are with the worker. No I/O and no clock: the caller passes the
//! time and a [`WriteSet`] that commits with its batch.
//!
//! A notification waits under (user, device, conversation). The first
//! message for a key starts it, due `delay` later (or at the end of the
//! coalescing window of the last one sent for that key); later messages
//! only raise its count. Every change rewrites its record in `push_queue`,
//! in the batch that stores the message, so what is due survives a crash.
//! When it is due it goes to the worker (in flight); its record stays until
//! the worker's outcome comes back, so a crash while it is in flight sends
//! it again (at least once). Messages that arrive meanwhile start a new
//! waiting notification for the same key, whose record also counts the
//! in-flight one until that one is done.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::record::{queue_key, QueueRecord};
use crate::store::{Part, WriteSet};

/// (user, device, conversation).
pub(crate) type QueueKey = (Arc<str>, u32, Box<str>);

/// Most notifications handed to the worker by one batch; the rest wait
/// for the next (a restart with a large backlog does not stall a batch).
const DUE_CHUNK: usize = 2048;

#[derive(Debug)]
struct Waiting {
    record: QueueRecord,
    /// Bumped on every reschedule; a heap entry of an older version is stale.
    version: u64,
}

#[derive(Debug)]
struct Flight {
    /// `None` for a badge update (not queued durably).
    key: Option<QueueKey>,
    count: u32,
}

/// A notification now due, for the worker.
#[derive(Debug)]
pub(crate) struct Due {
    pub id: u64,
    pub key: QueueKey,
    pub record: QueueRecord,
}

/// The waiting and in-flight notifications. Created empty by the router
/// core, filled from the store at start ([`Queue::restore`]), dropped with
/// the core.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    waiting: BTreeMap<QueueKey, Waiting>,
    heap: BinaryHeap<Reverse<(u64, u64, QueueKey)>>,
    in_flight: FxHashMap<u64, Flight>,
    flying: FxHashMap<QueueKey, u64>,
    /// When a notification last went out per key, for the coalescing
    /// window; entries older than the window are pruned in time order.
    last_sent: FxHashMap<QueueKey, u64>,
    sent_order: VecDeque<(u64, QueueKey)>,
    next_version: u64,
    next_id: u64,
}

impl Queue {
    /// Notifications waiting or in flight.
    pub fn depth(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    /// Notifications waiting for their time.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Puts back a record read from the store at start.
    pub fn restore(&mut self, key: QueueKey, record: QueueRecord) {
        self.schedule(key, record);
    }

    /// A message `seq` of `key`'s conversation waits for `key`'s device.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        writes: &mut WriteSet,
        key: QueueKey,
        seq: u64,
        sender: &Arc<str>,
        sender_device: u32,
        ciphertext: Option<bytes::Bytes>,
        now_ms: u64,
        delay_ms: u64,
        window_ms: u64,
    ) {
        if let Some(w) = self.waiting.get_mut(&key) {
            w.record.count = w.record.count.saturating_add(1);
            w.record.last_seq = w.record.last_seq.max(seq);
            w.record.sender = sender.to_string();
            w.record.sender_device = sender_device;
            w.record.ciphertext = ciphertext;
        } else {
            let mut due_ms = now_ms + delay_ms;
            if let Some(sent) = self.last_sent.get(&key) {
                due_ms = due_ms.max(sent + window_ms);
            }
            let record = QueueRecord {
                due_ms,
                last_seq: seq,
                count: 1,
                sender: sender.to_string(),
                sender_device,
                ciphertext,
            };
            self.schedule(key.clone(), record);
        }
        self.persist(writes, &key);
    }

    /// The device acknowledged `seq` of the conversation: a notification
    /// waiting for nothing newer is cancelled. True when one was.
    pub fn delivered(&mut self, writes: &mut WriteSet, key: &QueueKey, seq: u64) -> bool {
        match self.waiting.get(key) {
            Some(w) if w.record.last_seq <= seq => {
                self.waiting.remove(key);
                writes.remove(Part::PushQueue, queue_key(&key.0, key.1, &key.2));
                true
            }
            _ => false,
        }
    }

    /// The device is catching up: every notification waiting for it is
    /// cancelled. Returns how many.
    pub fn device_back(&mut self, writes: &mut WriteSet, user: &Arc<str>, device: u32) -> usize {
        let keys = self.keys_of(user, device);
        for key in &keys {
            self.waiting.remove(key);
            writes.remove(Part::PushQueue, queue_key(&key.0, key.1, &key.2));
        }
        keys.len()
    }

    /// Up to a chunk of notifications due at `now_ms`, now in flight.
    pub fn take_due(&mut self, now_ms: u64, window_ms: u64) -> Vec<Due> {
        self.prune_sent(now_ms, window_ms);
        let mut due = Vec::new();
        while due.len() < DUE_CHUNK {
            match self.heap.peek() {
                Some(Reverse((at, _, _))) if *at <= now_ms => {}
                _ => break,
            }
            let Some(Reverse((_, version, key))) = self.heap.pop() else {
                break;
            };
            if self.waiting.get(&key).is_none_or(|w| w.version != version) {
                continue;
            }
            if self.flying.contains_key(&key) {
                // One notification per key in flight at a time: this one
                // goes when that one is done.
                continue;
            }
            let Some(w) = self.waiting.remove(&key) else {
                continue;
            };
            let id = self.new_id();
            self.in_flight.insert(
                id,
                Flight {
                    key: Some(key.clone()),
                    count: w.record.count,
                },
            );
            self.flying.insert(key.clone(), id);
            due.push(Due {
                id,
                key,
                record: w.record,
            });
        }
        due
    }

    /// Registers a badge update (memory only) and returns its job id.
    pub fn badge(&mut self) -> u64 {
        let id = self.new_id();
        self.in_flight.insert(
            id,
            Flight {
                key: None,
                count: 0,
            },
        );
        id
    }

    /// The worker is done with job `id` (sent, given up, or the token is
    /// gone). Its record goes, unless newer messages wait under its key:
    /// then the record is rewritten with only those.
    pub fn finish(
        &mut self,
        writes: &mut WriteSet,
        id: u64,
        now_ms: u64,
        window_ms: u64,
    ) -> Option<QueueKey> {
        let flight = self.in_flight.remove(&id)?;
        let key = flight.key?;
        self.flying.remove(&key);
        self.last_sent.insert(key.clone(), now_ms);
        self.sent_order.push_back((now_ms, key.clone()));
        if let Some(w) = self.waiting.remove(&key) {
            // Held back while this one flew: due once the window after it
            // has passed.
            let mut record = w.record;
            record.due_ms = record.due_ms.max(now_ms + window_ms);
            self.schedule(key.clone(), record);
            self.persist(writes, &key);
        } else {
            writes.remove(Part::PushQueue, queue_key(&key.0, key.1, &key.2));
        }
        Some(key)
    }

    /// Drops everything of a device (unlinked, or its token removed).
    pub fn drop_device(&mut self, writes: &mut WriteSet, user: &Arc<str>, device: u32) {
        self.device_back(writes, user, device);
    }

    fn keys_of(&self, user: &Arc<str>, device: u32) -> Vec<QueueKey> {
        let from: QueueKey = (user.clone(), device, Box::from(""));
        self.waiting
            .range(from..)
            .take_while(|((u, d, _), _)| u == user && *d == device)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn schedule(&mut self, key: QueueKey, record: QueueRecord) {
        let version = self.next_version;
        self.next_version += 1;
        self.heap
            .push(Reverse((record.due_ms, version, key.clone())));
        self.waiting.insert(key, Waiting { record, version });
    }

    /// Writes `key`'s record: the waiting notification, counting the one
    /// in flight for the same key too, so a crash before that one is
    /// confirmed still announces every message.
    fn persist(&self, writes: &mut WriteSet, key: &QueueKey) {
        let Some(w) = self.waiting.get(key) else {
            return;
        };
        let mut record = w.record.clone();
        if let Some(flight) = self.flying.get(key).and_then(|id| self.in_flight.get(id)) {
            record.count = record.count.saturating_add(flight.count);
        }
        writes.put(
            Part::PushQueue,
            queue_key(&key.0, key.1, &key.2),
            record.encode(),
        );
    }

    fn prune_sent(&mut self, now_ms: u64, window_ms: u64) {
        while let Some((at, _)) = self.sent_order.front() {
            if at + window_ms > now_ms {
                break;
            }
            let Some((at, key)) = self.sent_order.pop_front() else {
                break;
            };
            if self.last_sent.get(&key) == Some(&at) {
                self.last_sent.remove(&key);
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(conv: &str) -> QueueKey {
        (Arc::from("bob"), 1, Box::from(conv))
    }

    #[test]
    fn a_burst_is_one_notification_with_its_count() {
        let mut q = Queue::default();
        let mut w = WriteSet::default();
        let alice: Arc<str> = Arc::from("alice");
        for seq in 1..=20 {
            q.add(
                &mut w,
                key("d:alice:bob"),
                seq,
                &alice,
                1,
                None,
                1_000 + seq,
                2_000,
                10_000,
            );
        }
        assert!(q.take_due(2_999, 10_000).is_empty());
        let due = q.take_due(3_001, 10_000);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].record.count, due[0].record.last_seq), (20, 20));
        // More while it flies: held back until it is done and the window passed.
        q.add(
            &mut w,
            key("d:alice:bob"),
            21,
            &alice,
            1,
            None,
            3_100,
            2_000,
            10_000,
        );
        assert!(q.take_due(6_000, 10_000).is_empty());
        q.finish(&mut w, due[0].id, 6_000, 10_000);
        assert!(q.take_due(6_000, 10_000).is_empty(), "inside the window");
        let next = q.take_due(16_000, 10_000);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].record.count, 1);
    }

    #[test]
    fn an_ack_or_a_sync_cancels() {
        let mut q = Queue::default();
        let mut w = WriteSet::default();
        let alice: Arc<str> = Arc::from("alice");
        q.add(&mut w, key("d:alice:bob"), 1, &alice, 1, None, 0, 2_000, 0);
        q.add(&mut w, key("d:alice:bob"), 2, &alice, 1, None, 0, 2_000, 0);
        assert!(
            !q.delivered(&mut w, &key("d:alice:bob"), 1),
            "not everything acked"
        );
        assert!(q.delivered(&mut w, &key("d:alice:bob"), 2));
        q.add(
            &mut w,
            key("g:00000000000000aa"),
            5,
            &alice,
            1,
            None,
            0,
            2_000,
            0,
        );
        q.add(&mut w, key("d:alice:bob"), 3, &alice, 1, None, 0, 2_000, 0);
        assert_eq!(q.device_back(&mut w, &Arc::from("bob"), 1), 2);
        assert!(q.take_due(10_000, 0).is_empty());
        assert_eq!(q.depth(), 0);
    }
}
