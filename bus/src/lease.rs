//! Leases on [`Kv`] keys: who owns a partition.
//!
//! A lease is a key created by its owner and renewed by compare-and-set on
//! its revision well within the bucket's TTL. An owner that stops renewing
//! (it died, or lost NATS) loses the key when it expires, and any other
//! candidate's `create` then succeeds. An owner whose renewal fails with a
//! conflict knows at once that it lost the lease; one whose renewal cannot
//! reach the bucket must stop acting as owner before the TTL runs out
//! ([`Lease::valid_for`]), because by then another may hold it.
//!
//! A lease alone does not stop a paused owner from writing after its TTL:
//! the writes themselves are fenced (the log's expected last sequence), so
//! a stale owner's append is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{BusError, Kv};

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    kv: Arc<dyn Kv>,
    key: String,
    owner: Bytes,
    revision: u64,
    /// When the last successful write (create or renew) was sent.
    written: Instant,
}

impl Lease {
    /// Takes `key` for `owner` if nobody holds it. `Ok(None)`: someone does.
    pub fn try_acquire(
        kv: &Arc<dyn Kv>,
        key: &str,
        owner: &[u8],
    ) -> Result<Option<Self>, BusError> {
        let written = Instant::now();
        match kv.create(key, Bytes::copy_from_slice(owner)) {
            Ok(revision) => Ok(Some(Self {
                kv: kv.clone(),
                key: key.to_owned(),
                owner: Bytes::copy_from_slice(owner),
                revision,
                written,
            })),
            Err(BusError::Exists) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The owner named in `key`'s lease, if it is held.
    pub fn holder(kv: &Arc<dyn Kv>, key: &str) -> Result<Option<Bytes>, BusError> {
        Ok(kv.get(key)?.map(|e| e.value))
    }

    /// Renews the lease. A conflict means it was lost (it expired and was
    /// taken, or was deleted): the caller must stop acting as owner.
    pub fn renew(&mut self) -> Result<(), BusError> {
        let written = Instant::now();
        self.revision = self
            .kv
            .update(&self.key, self.owner.clone(), self.revision)?;
        self.written = written;
        Ok(())
    }

    /// How much longer the lease is certainly ours: the TTL less the time
    /// since the last successful write was sent (`None` without a TTL).
    pub fn valid_for(&self) -> Option<Duration> {
        self.kv
            .ttl()
            .map(|ttl| ttl.saturating_sub(self.written.elapsed()))
    }

    /// The revision of the lease's last write (its create or renewal).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Gives the lease up so another can take it at once.
    pub fn release(self) -> Result<(), BusError> {
        self.kv.delete(&self.key, Some(self.revision))
    }
}
