//! Courier's seam between its services and what carries their state.
//!
//! The router and the gateways are written against three small traits:
//!
//! - [`Log`]: an append-only, durable, totally ordered log per subject, with
//!   deduplication of retried appends by id and optimistic fencing (an
//!   append may require that the subject's last record is the one the
//!   writer last saw, so a writer that lost its lease cannot append);
//! - [`Kv`]: a key-value bucket whose entries expire a fixed time after
//!   their last write, with compare-and-set on a revision (leases and the
//!   routes registry live here);
//! - [`PubSub`]: fire-and-forget subjects for what can be derived again
//!   (typing, presence pings, deliveries to gateways).
//!
//! Each has two implementations: [`local`], embedded in one process (the
//! single node), and [`nats`], on NATS JetStream (the fleet). One test
//! suite (`tests/conformance.rs`) runs against both, so code written
//! against the traits behaves the same on either.
//!
//! Every call blocks the calling thread until it is done; the NATS
//! implementation runs its client on a runtime thread of its own
//! ([`nats::Nats`]), so callers are plain threads (the router's) and never
//! an async task.

#![forbid(unsafe_code)]

pub mod lease;
pub mod local;
pub mod metrics;
pub mod nats;
pub mod testing;

use std::fmt::Debug;
use std::time::Duration;

use bytes::Bytes;

/// Why a bus call did not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// A fenced append found another last record, or a compare-and-set
    /// found another revision: someone else wrote first.
    #[error("conflict: {0}")]
    Conflict(String),
    /// `create` found the key already held.
    #[error("key exists")]
    Exists,
    /// The backend could not be reached or did not answer in time. The
    /// outcome of a write that failed this way is unknown: it may have
    /// been applied.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// A name (subject, key, bucket) the backend refuses.
    #[error("invalid name: {0}")]
    Invalid(String),
}

/// One record of a [`Log`] subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The record's position. Sequences increase along a subject but are
    /// not contiguous (they count every subject of the log).
    pub seq: u64,
    pub payload: Bytes,
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Where the record is.
    pub seq: u64,
    /// The id was seen before within the dedupe window: nothing was
    /// written and `seq` is the first append's.
    pub duplicate: bool,
}

/// A durable, ordered log of records per subject.
pub trait Log: Send + Sync + Debug {
    /// Appends `payload` to `subject` and returns once it is durable.
    ///
    /// A second append with the same `id` within the dedupe window writes
    /// nothing and returns the first one's sequence, so a retried append
    /// whose first answer was lost is harmless. With `expect_last`, the
    /// append is refused with [`BusError::Conflict`] unless the last record
    /// of `subject` has that sequence (0: the subject is empty).
    fn append(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
        expect_last: Option<u64>,
    ) -> Result<Appended, BusError>;

    /// The sequence of the last record of `subject`, 0 if it has none.
    fn last(&self, subject: &str) -> Result<u64, BusError>;

    /// The sequence of the last record of `subject` if that record was
    /// appended with `id`; `None` if the subject is empty or its last
    /// record has another id. An appender whose retry was refused with
    /// [`BusError::Conflict`] asks this to learn whether the refusal is its
    /// own earlier attempt, which landed, or another writer's record.
    fn last_if_id(&self, subject: &str, id: &str) -> Result<Option<u64>, BusError>;

    /// Calls `each` with every record of `subject` after sequence `after`,
    /// in order, up to the last one when the call started; returns the
    /// sequence of the last record passed (or `after`). An error from
    /// `each` stops the replay and is returned.
    fn replay(
        &self,
        subject: &str,
        after: u64,
        each: &mut dyn FnMut(Record) -> Result<(), BusError>,
    ) -> Result<u64, BusError>;

    /// The last record of `subject`, if it has any.
    fn last_record(&self, subject: &str) -> Result<Option<Record>, BusError>;

    /// Deletes every record of `subject` below sequence `below`; the
    /// record at `below` and later ones stay, so the subject's last
    /// sequence (what appends are fenced on) does not move.
    fn purge(&self, subject: &str, below: u64) -> Result<(), BusError>;
}

/// One value of a [`Kv`] bucket and the revision that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Bytes,
    pub revision: u64,
}

/// A key-value bucket whose entries expire [`Kv::ttl`] after their last
/// write.
pub trait Kv: Send + Sync + Debug {
    /// How long an entry lives after its last write (`None`: forever).
    fn ttl(&self) -> Option<Duration>;
    /// The current value of `key`, unless it was deleted or expired.
    fn get(&self, key: &str) -> Result<Option<Entry>, BusError>;
    /// Writes `key` only if it holds nothing; [`BusError::Exists`] else.
    fn create(&self, key: &str, value: Bytes) -> Result<u64, BusError>;
    /// Writes `key` only if its current revision is `revision`;
    /// [`BusError::Conflict`] else (also when it expired meanwhile).
    fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, BusError>;
    /// Writes `key` whatever it holds.
    fn put(&self, key: &str, value: Bytes) -> Result<u64, BusError>;
    /// Deletes `key`; with `revision`, only if that is its current one.
    fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), BusError>;
    /// The keys starting with `prefix` that hold a live value, sorted.
    fn keys(&self, prefix: &str) -> Result<Vec<String>, BusError>;
}

/// A message on a [`PubSub`] subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub payload: Bytes,
}

/// Messages arriving on a subscription. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: crossbeam_channel::Receiver<Message>,
    _guard: Box<dyn Debug + Send>,
}

impl Subscription {
    pub(crate) fn new(
        rx: crossbeam_channel::Receiver<Message>,
        guard: Box<dyn Debug + Send>,
    ) -> Self {
        Self { rx, _guard: guard }
    }

    /// The channel the messages arrive on (for `select!` with others).
    pub fn receiver(&self) -> &crossbeam_channel::Receiver<Message> {
        &self.rx
    }

    /// Waits up to `timeout` for the next message.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Message> {
        self.rx.recv_timeout(timeout).ok()
    }
}

/// Fire-and-forget subjects: a message reaches the subscriptions that
/// exist when it is published, at most once, and nothing is stored.
pub trait PubSub: Send + Sync + Debug {
    /// Publishes `payload` on `subject`.
    fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError>;
    /// Subscribes to `pattern`: tokens separated by `.`, where `*` matches
    /// one token and a final `>` matches one or more.
    fn subscribe(&self, pattern: &str) -> Result<Subscription, BusError>;
}

/// Whether `subject` matches `pattern` (NATS wildcard rules).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// Checks a subject or key: non-empty dot-separated tokens of printable
/// ASCII without spaces or wildcards.
pub(crate) fn check_name(name: &str) -> Result<(), BusError> {
    let ok = !name.is_empty()
        && name.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        });
    if ok {
        Ok(())
    } else {
        Err(BusError::Invalid(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("*.b.>", "x.b.y"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("log.7").is_ok());
        for bad in ["", "a..b", "a.*", "a b", ".a", "a.>"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
