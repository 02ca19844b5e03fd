//! Fleet mode's durability: the router's batches in a changelog.
//!
//! In the single node the store's journal is the durable log: a batch is
//! answered after its fdatasync. In a fleet the machine under a router can
//! die with its disk, so the durable copy must live elsewhere: every
//! batch's write set (the exact keys and values it commits, see
//! `store::WriteSet::encode`) is appended to a [`courier_bus::Log`] subject,
//! one subject per partition, and the batch is answered after the log
//! acknowledged it (on JetStream at R3: after a majority of replicas stored
//! it). The local fjall store is then a cache of the log: its journal is
//! never fsynced, and a router that takes over a partition rebuilds it by
//! replaying the subject ([`replay`]), so every sequence, dedupe record and
//! cursor resumes exactly where the last acknowledged batch left it. This
//! is the changelog pattern of stream processors (a local state store
//! restored from a replicated log on failover).
//!
//! Appends are fenced: each one names the sequence of the subject's last
//! record as its writer knows it. A router that lost its lease while paused
//! and wakes up still believing it owns the partition is refused by the
//! log; it then stops serving the partition (see the router loop), and its
//! clients' unanswered sends are retried against the new owner and
//! deduplicated there.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use courier_bus::{BusError, Log};

use crate::store::{Store, StoreError, WriteSet};

/// Where a partition's batches go.
#[derive(Clone, Debug)]
pub struct Changelog {
    /// The log.
    pub log: Arc<dyn Log>,
    /// The partition's subject.
    pub subject: String,
    /// Unique to this owner and epoch (for example the router id and the
    /// lease revision): prefixes the append ids, so two owners' appends
    /// are never taken for retries of each other.
    pub writer: String,
    /// The sequence of the subject's last record when this owner took it
    /// over (what [`replay`] returned).
    pub last: u64,
}

/// Appends batches for the syncer thread, tracking the fence.
#[derive(Debug)]
pub(crate) struct Appender {
    changelog: Changelog,
    next: u64,
}

impl Appender {
    pub(crate) fn new(changelog: Changelog) -> Self {
        Self { changelog, next: 0 }
    }

    /// Appends one batch; on success the fence moves to it.
    pub(crate) fn append(&mut self, bytes: Vec<u8>) -> Result<(), StoreError> {
        let c = &mut self.changelog;
        let id = format!("{}.{}", c.writer, self.next);
        self.next += 1;
        match c
            .log
            .append(&c.subject, &id, Bytes::from(bytes), Some(c.last))
        {
            Ok(appended) => {
                c.last = appended.seq;
                Ok(())
            }
            Err(BusError::Conflict(why)) => Err(StoreError::Changelog(format!(
                "fenced out of {} (another owner wrote): {why}",
                c.subject
            ))),
            Err(e) => Err(StoreError::Changelog(e.to_string())),
        }
    }
}

/// Rebuilds a partition's store under `data_dir` from its changelog
/// `subject`: every record after `after` is applied in order (a fresh
/// directory needs `after` = 0). Returns the sequence of the last record
/// applied, the fence for the new owner's first append.
pub fn replay(
    data_dir: &Path,
    log: &dyn Log,
    subject: &str,
    after: u64,
) -> Result<u64, crate::RouterError> {
    let store_error =
        |source: Box<dyn std::error::Error + Send + Sync>| crate::RouterError::Store {
            path: data_dir.to_owned(),
            source,
        };
    std::fs::create_dir_all(data_dir).map_err(|e| store_error(Box::new(e)))?;
    let mut store = Store::open(data_dir).map_err(|e| store_error(Box::new(e)))?;
    let mut failure: Option<StoreError> = None;
    let last = log
        .replay(subject, after, &mut |record| {
            let writes = WriteSet::decode(&record.payload).map_err(|corrupt| {
                failure = Some(StoreError::CorruptRecord {
                    seq: record.seq,
                    what: corrupt.0,
                });
                BusError::Invalid(corrupt.0.into())
            })?;
            store.commit(writes, false).map_err(|e| {
                let shown = e.to_string();
                failure = Some(e);
                BusError::Unavailable(shown)
            })
        })
        .map_err(|e| match failure.take() {
            Some(f) => store_error(Box::new(f)),
            None => store_error(Box::new(e)),
        })?;
    store.flush().map_err(|e| store_error(Box::new(e)))?;
    Ok(last)
}
