//! The embedded implementations, for one process.
//!
//! [`LocalLog`] is durable: records live in a fjall keyspace and every
//! append is fdatasync'ed before it returns. [`LocalKv`] and
//! [`LocalPubSub`] live in memory, because in one process what they hold
//! (leases, routes, ephemeral events) ends with the process anyway.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use rustc_hash::FxHashMap;

use crate::{
    check_name, subject_matches, Appended, BusError, Entry, Kv, Log, Message, PubSub, Record,
    Subscription,
};

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn io(e: fjall::Error) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// A [`Log`] in a fjall keyspace on local disk.
///
/// Keys of `records` are the subject (length-prefixed) then the sequence,
/// big-endian, so a subject's records are one ordered range. `ids` maps an
/// append id to its sequence and time, for the dedupe window.
pub struct LocalLog {
    keyspace: Keyspace,
    records: PartitionHandle,
    ids: PartitionHandle,
    dedupe_window: Duration,
    /// The last sequence issued; appends are serialised by this lock.
    last: Mutex<u64>,
}

impl std::fmt::Debug for LocalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLog").finish_non_exhaustive()
    }
}

const LAST_KEY: &[u8] = b"\xfflast";

impl LocalLog {
    /// Opens (or creates) the log under `path`; an id is remembered for
    /// `dedupe_window`.
    pub fn open(path: &Path, dedupe_window: Duration) -> Result<Self, BusError> {
        let keyspace = Config::new(path)
            .manual_journal_persist(true)
            .fsync_ms(None)
            .open()
            .map_err(io)?;
        let records = keyspace
            .open_partition("records", PartitionCreateOptions::default())
            .map_err(io)?;
        let ids = keyspace
            .open_partition("ids", PartitionCreateOptions::default())
            .map_err(io)?;
        let last = match ids.get(LAST_KEY).map_err(io)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v[..8].try_into().unwrap_or([0; 8])),
            _ => 0,
        };
        Ok(Self {
            keyspace,
            records,
            ids,
            dedupe_window,
            last: Mutex::new(last),
        })
    }

    fn record_key(subject: &str, seq: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(2 + subject.len() + 8);
        key.extend_from_slice(&(subject.len() as u16).to_be_bytes());
        key.extend_from_slice(subject.as_bytes());
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    fn subject_prefix(subject: &str) -> Vec<u8> {
        let mut key = Self::record_key(subject, 0);
        key.truncate(key.len() - 8);
        key
    }

    fn seq_of(key: &[u8]) -> u64 {
        key.len()
            .checked_sub(8)
            .and_then(|at| key[at..].try_into().ok())
            .map_or(0, u64::from_be_bytes)
    }

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

impl Log for LocalLog {
    fn append(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
        expect_last: Option<u64>,
    ) -> Result<Appended, BusError> {
        check_name(subject)?;
        let mut last = locked(&self.last);
        let id_key = [b"id:".as_slice(), id.as_bytes()].concat();
        if let Some(v) = self.ids.get(&id_key).map_err(io)? {
            if v.len() == 16 {
                let seq = u64::from_be_bytes(v[..8].try_into().unwrap_or([0; 8]));
                let at = u64::from_be_bytes(v[8..].try_into().unwrap_or([0; 8]));
                if Self::now_ms().saturating_sub(at) < self.dedupe_window.as_millis() as u64 {
                    return Ok(Appended {
                        seq,
                        duplicate: true,
                    });
                }
            }
        }
        if let Some(expected) = expect_last {
            let actual = self.last(subject)?;
            if actual != expected {
                return Err(BusError::Conflict(format!(
                    "last record of {subject} is {actual}, not {expected}"
                )));
            }
        }
        let seq = *last + 1;
        let mut batch = self.keyspace.batch();
        batch.insert(&self.records, Self::record_key(subject, seq), &*payload);
        let mut id_value = seq.to_be_bytes().to_vec();
        id_value.extend_from_slice(&Self::now_ms().to_be_bytes());
        batch.insert(&self.ids, id_key, id_value);
        batch.insert(&self.ids, LAST_KEY, seq.to_be_bytes());
        batch.commit().map_err(io)?;
        self.keyspace
            .persist(PersistMode::SyncData)
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        *last = seq;
        Ok(Appended {
            seq,
            duplicate: false,
        })
    }

    fn last_if_id(&self, subject: &str, id: &str) -> Result<Option<u64>, BusError> {
        let _last = locked(&self.last);
        let id_key = [b"id:".as_slice(), id.as_bytes()].concat();
        let Some(v) = self.ids.get(&id_key).map_err(io)? else {
            return Ok(None);
        };
        let seq = match v.get(..8).map(<[u8; 8]>::try_from) {
            Some(Ok(bytes)) => u64::from_be_bytes(bytes),
            _ => return Ok(None),
        };
        let last = self.last(subject)?;
        Ok((last != 0 && last == seq).then_some(seq))
    }

    fn last(&self, subject: &str) -> Result<u64, BusError> {
        let prefix = Self::subject_prefix(subject);
        match self.records.prefix(prefix).next_back() {
            Some(kv) => Ok(Self::seq_of(&kv.map_err(io)?.0)),
            None => Ok(0),
        }
    }

    fn replay(
        &self,
        subject: &str,
        after: u64,
        each: &mut dyn FnMut(Record) -> Result<(), BusError>,
    ) -> Result<u64, BusError> {
        let until = self.last(subject)?;
        let from = Self::record_key(subject, after.saturating_add(1));
        let to = Self::record_key(subject, until);
        let mut seen = after;
        if until <= after {
            return Ok(after);
        }
        for kv in self.records.range(from..=to) {
            let (key, value) = kv.map_err(io)?;
            seen = Self::seq_of(&key);
            each(Record {
                seq: seen,
                payload: Bytes::copy_from_slice(&value),
            })?;
        }
        Ok(seen)
    }

    fn last_record(&self, subject: &str) -> Result<Option<Record>, BusError> {
        check_name(subject)?;
        let prefix = Self::subject_prefix(subject);
        match self.records.prefix(prefix).next_back() {
            Some(kv) => {
                let (key, value) = kv.map_err(io)?;
                Ok(Some(Record {
                    seq: Self::seq_of(&key),
                    payload: Bytes::copy_from_slice(&value),
                }))
            }
            None => Ok(None),
        }
    }

    fn purge(&self, subject: &str, below: u64) -> Result<(), BusError> {
        check_name(subject)?;
        if below <= 1 {
            return Ok(());
        }
        let _appends = locked(&self.last);
        let from = Self::record_key(subject, 0);
        let to = Self::record_key(subject, below);
        // In slices, so a long subject never makes one huge batch.
        loop {
            let mut keys = Vec::with_capacity(1024);
            for kv in self.records.range(from.clone()..to.clone()).take(1024) {
                keys.push(kv.map_err(io)?.0);
            }
            if keys.is_empty() {
                break;
            }
            let mut batch = self.keyspace.batch();
            for key in keys {
                batch.remove(&self.records, key);
            }
            batch.commit().map_err(io)?;
        }
        self.keyspace
            .persist(PersistMode::SyncData)
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }
}

/// A [`Kv`] bucket in memory.
#[derive(Debug)]
pub struct LocalKv {
    ttl: Option<Duration>,
    state: Mutex<KvState>,
}

#[derive(Debug, Default)]
struct KvState {
    revision: u64,
    entries: FxHashMap<String, (Bytes, u64, Instant)>,
}

impl LocalKv {
    /// An empty bucket whose entries live `ttl` after their last write.
    pub fn new(ttl: Option<Duration>) -> Self {
        Self {
            ttl,
            state: Mutex::new(KvState::default()),
        }
    }

    fn live<'a>(&self, state: &'a KvState, key: &str) -> Option<&'a (Bytes, u64, Instant)> {
        state
            .entries
            .get(key)
            .filter(|(_, _, at)| self.ttl.is_none_or(|ttl| at.elapsed() < ttl))
    }

    fn write(state: &mut KvState, key: &str, value: Bytes) -> u64 {
        state.revision += 1;
        let revision = state.revision;
        state
            .entries
            .insert(key.to_owned(), (value, revision, Instant::now()));
        revision
    }
}

impl Kv for LocalKv {
    fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    fn get(&self, key: &str) -> Result<Option<Entry>, BusError> {
        check_name(key)?;
        let state = locked(&self.state);
        Ok(self.live(&state, key).map(|(value, revision, _)| Entry {
            value: value.clone(),
            revision: *revision,
        }))
    }

    fn create(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        check_name(key)?;
        let mut state = locked(&self.state);
        if self.live(&state, key).is_some() {
            return Err(BusError::Exists);
        }
        Ok(Self::write(&mut state, key, value))
    }

    fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, BusError> {
        check_name(key)?;
        let mut state = locked(&self.state);
        match self.live(&state, key) {
            Some((_, current, _)) if *current == revision => {
                Ok(Self::write(&mut state, key, value))
            }
            Some((_, current, _)) => Err(BusError::Conflict(format!(
                "{key} is at revision {current}, not {revision}"
            ))),
            None => Err(BusError::Conflict(format!("{key} holds nothing"))),
        }
    }

    fn put(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        check_name(key)?;
        Ok(Self::write(&mut locked(&self.state), key, value))
    }

    fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), BusError> {
        check_name(key)?;
        let mut state = locked(&self.state);
        if let Some(expected) = revision {
            match self.live(&state, key) {
                Some((_, current, _)) if *current == expected => {}
                _ => return Err(BusError::Conflict(format!("{key} moved on"))),
            }
        }
        state.entries.remove(key);
        Ok(())
    }

    fn keys(&self, prefix: &str) -> Result<Vec<String>, BusError> {
        let state = locked(&self.state);
        let mut keys: Vec<String> = state
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix) && self.live(&state, k).is_some())
            .cloned()
            .collect();
        keys.sort_unstable();
        Ok(keys)
    }
}

/// The live subscriptions: id, pattern, where their messages go.
type Subscribers = Arc<Mutex<Vec<(u64, String, crossbeam_channel::Sender<Message>)>>>;

/// [`PubSub`] between the threads of one process.
#[derive(Debug, Default)]
pub struct LocalPubSub {
    subscribers: Subscribers,
    next_id: Mutex<u64>,
}

impl LocalPubSub {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Removes a local subscription when dropped.
struct Unsubscribe {
    id: u64,
    subscribers: Subscribers,
}

impl std::fmt::Debug for Unsubscribe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsubscribe").field("id", &self.id).finish()
    }
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        locked(&self.subscribers).retain(|(id, _, _)| *id != self.id);
    }
}

impl PubSub for LocalPubSub {
    fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        check_name(subject)?;
        for (_, pattern, tx) in locked(&self.subscribers).iter() {
            if subject_matches(pattern, subject) {
                let _ = tx.send(Message {
                    subject: subject.to_owned(),
                    payload: payload.clone(),
                });
            }
        }
        Ok(())
    }

    fn subscribe(&self, pattern: &str) -> Result<Subscription, BusError> {
        if pattern.is_empty() || pattern.split('.').any(str::is_empty) {
            return Err(BusError::Invalid(pattern.to_owned()));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let id = {
            let mut next = locked(&self.next_id);
            *next += 1;
            *next
        };
        locked(&self.subscribers).push((id, pattern.to_owned(), tx));
        Ok(Subscription::new(
            rx,
            Box::new(Unsubscribe {
                id,
                subscribers: self.subscribers.clone(),
            }),
        ))
    }
}
