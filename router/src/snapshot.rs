//! Fleet mode: snapshots of a partition's store, so that a takeover
//! replays a bounded log instead of the partition's whole history.
//!
//! A new owner rebuilds the store from the changelog ([`crate::fleet`]).
//! Without more, the changelog grows forever and so does every takeover.
//! So every so often the owner writes its whole store to the log as a
//! snapshot, on the subject `<changelog>.snap`: the records of a
//! consistent view of the store as of changelog sequence `at` (the last
//! record of a batch), in chunks, then a record saying the snapshot is
//! complete. A takeover loads the latest complete snapshot and replays
//! only the changelog after its `at`.
//!
//! The view is taken on the router thread between two batches (fjall's
//! cross-partition snapshot, free to take) and written by a thread of its
//! own while the router goes on. A snapshot is started once the changelog
//! has grown by as much as the last snapshot's size (and at least
//! [`crate::fleet::Changelog::snapshot_min_bytes`]) since the last one, so
//! snapshots never write more than the changelog itself did, and a
//! takeover reads at most about twice the store.
//!
//! After snapshot k is complete, everything older than snapshot k−1 is
//! purged: the changelog below k−1's `at` (the record at `at` itself stays,
//! so the subject's last sequence, which appends are fenced on, never
//! moves) and the snapshot subject below k−1's first chunk. Keeping one
//! generation behind means a new owner that is reading snapshot k−1 or
//! the changelog after it when snapshot k completes finds it all still
//! there.
//!
//! Record formats (integers big-endian):
//! - chunk: `0xC1`, `at` (u64), index (u32, from 0), a write set
//!   (`WriteSet::encode`); a chunk over a record's size goes as pieces
//!   (`fleet::split`);
//! - done: `0xC2`, `at` (u64), the first chunk's sequence (u64), chunks
//!   (u32), records (u64), bytes (u64).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use courier_bus::{BusError, Log};

use crate::store::{Store, StoreError, StoreSnapshot, WriteSet};

const CHUNK: u8 = 0xC1;
const DONE: u8 = 0xC2;

/// Raw keys and values per chunk. A chunk over a changelog record's
/// [`crate::fleet::RECORD_BYTES`] (a value larger than the default body
/// and archive limits) goes as pieces, like a large batch.
const CHUNK_BYTES: usize = 256 * 1024;

/// The subject of `changelog`'s snapshots.
pub fn subject(changelog: &str) -> String {
    format!("{changelog}.snap")
}

/// A complete snapshot in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// The changelog sequence it covers: replay resumes after it.
    pub at: u64,
    /// The sequence of its first chunk on the snapshot subject.
    pub first: u64,
    /// The sequence of its done record.
    pub done: u64,
    pub chunks: u32,
    pub records: u64,
    /// Its encoded size (chunks' payloads).
    pub bytes: u64,
}

impl Taken {
    fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(37);
        out.push(DONE);
        out.extend_from_slice(&self.at.to_be_bytes());
        out.extend_from_slice(&self.first.to_be_bytes());
        out.extend_from_slice(&self.chunks.to_be_bytes());
        out.extend_from_slice(&self.records.to_be_bytes());
        out.extend_from_slice(&self.bytes.to_be_bytes());
        Bytes::from(out)
    }

    /// Reads a done record at sequence `seq`; `None` for anything else.
    fn decode(seq: u64, raw: &[u8]) -> Option<Self> {
        if raw.len() != 37 || raw[0] != DONE {
            return None;
        }
        let u64_at = |i: usize| raw[i..i + 8].try_into().ok().map(u64::from_be_bytes);
        let taken = Self {
            at: u64_at(1)?,
            first: u64_at(9)?,
            chunks: raw[17..21].try_into().ok().map(u32::from_be_bytes)?,
            records: u64_at(21)?,
            bytes: u64_at(29)?,
            done: seq,
        };
        // Its chunks come before it on the subject.
        (1..=seq).contains(&taken.first).then_some(taken)
    }
}

/// Writes `view` (the store as of changelog sequence `at`) to the log as
/// a snapshot named by `writer`, then purges what `previous` (the last
/// complete snapshot before it) makes unnecessary. Given up between two
/// chunks once `stop` is set.
pub fn write(
    log: &dyn Log,
    changelog: &str,
    writer: &str,
    view: &StoreSnapshot,
    at: u64,
    previous: Option<Taken>,
    stop: &AtomicBool,
) -> Result<Taken, StoreError> {
    let snap = subject(changelog);
    let failed = |e: BusError| StoreError::Changelog(format!("snapshot: {e}"));
    // Each record is fenced on the one before it, so a deposed owner still
    // writing an older snapshot is refused once a newer owner has written
    // anything here, and never gets to its done record or its purge.
    let mut expect = log.last(&snap).map_err(failed)?;
    let mut first = None;
    let mut chunks: u32 = 0;
    let mut bytes: u64 = 0;
    let records = view.chunks(CHUNK_BYTES, &mut |set: WriteSet| {
        if stop.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let encoded = set.encode();
        let mut payload = Vec::with_capacity(13 + encoded.len());
        payload.push(CHUNK);
        payload.extend_from_slice(&at.to_be_bytes());
        payload.extend_from_slice(&chunks.to_be_bytes());
        payload.extend_from_slice(&encoded);
        bytes += payload.len() as u64;
        // A chunk holding a value too large for one record goes as
        // pieces, as a large batch does in the changelog.
        for (i, piece) in crate::fleet::split(payload).into_iter().enumerate() {
            let id = format!("{writer}.snap.{at}.{chunks}.{i}");
            let appended = log
                .append(&snap, &id, piece, Some(expect))
                .map_err(failed)?;
            expect = appended.seq;
            first.get_or_insert(appended.seq);
        }
        chunks += 1;
        Ok(())
    })?;
    let mut taken = Taken {
        at,
        first: first.unwrap_or(0),
        done: 0,
        chunks,
        records,
        bytes,
    };
    let id = format!("{writer}.snap.{at}.done");
    if taken.first == 0 {
        // An empty store: the done record is the whole snapshot (its own
        // sequence is the fence's next one at the earliest).
        taken.first = expect + 1;
    }
    let done = log
        .append(&snap, &id, taken.encode(), Some(expect))
        .map_err(failed)?;
    taken.done = done.seq;
    if let Some(previous) = previous {
        // The snapshot is complete whatever happens here; a purge that
        // fails is made by the next one (purges are "below a sequence").
        let purged = log
            .purge(changelog, previous.at)
            .and_then(|()| log.purge(&snap, previous.first));
        if let Err(e) = purged {
            tracing::warn!(error = %e, changelog, "purging the log behind a snapshot failed; the next snapshot purges it");
        }
    }
    Ok(taken)
}

/// Finds the latest complete snapshot of `changelog`, if any.
pub fn latest(log: &dyn Log, changelog: &str) -> Result<Option<Taken>, BusError> {
    let snap = subject(changelog);
    let Some(last) = log.last_record(&snap)? else {
        return Ok(None);
    };
    if let Some(taken) = Taken::decode(last.seq, &last.payload) {
        return Ok(Some(taken));
    }
    // A snapshot was being written when its writer stopped: the complete
    // one before it is still on the subject (one generation is kept).
    let mut found = None;
    log.replay(&snap, 0, &mut |record| {
        if let Some(taken) = Taken::decode(record.seq, &record.payload) {
            found = Some(taken);
        }
        Ok(())
    })?;
    Ok(found)
}

/// Loads snapshot `taken` of `changelog` into `store` (a fresh one).
pub fn load(
    log: &dyn Log,
    changelog: &str,
    taken: &Taken,
    store: &mut Store,
) -> Result<(), StoreError> {
    let mut next: u32 = 0;
    let mut failure: Option<StoreError> = None;
    let mut pieces = crate::fleet::Reassembly::default();
    let corrupt = |seq: u64, what: &'static str| StoreError::CorruptRecord { seq, what };
    let after = taken.first.saturating_sub(1);
    log.replay(&subject(changelog), after, &mut |record| {
        if record.seq >= taken.done {
            return Ok(());
        }
        let raw = match pieces.take(&record.payload) {
            Ok(Some(whole)) => whole,
            Ok(None) => return Ok(()),
            Err(c) => {
                failure = Some(corrupt(record.seq, c.0));
                return Err(BusError::Invalid(c.0.into()));
            }
        };
        let Some(header) = raw.get(..13).filter(|h| h[0] == CHUNK) else {
            return Ok(());
        };
        let at = header[1..9].try_into().map_or(0, u64::from_be_bytes);
        let index = header[9..13]
            .try_into()
            .map_or(u32::MAX, u32::from_be_bytes);
        // Only this snapshot's chunks, in order (records are fenced one on
        // another, so nothing else lies between its first and its done).
        if at != taken.at || index != next {
            return Ok(());
        }
        let writes = match WriteSet::decode(&raw[13..]) {
            Ok(w) => w,
            Err(c) => {
                failure = Some(corrupt(record.seq, c.0));
                return Err(BusError::Invalid(c.0.into()));
            }
        };
        if let Err(e) = store.commit(writes, false) {
            let shown = e.to_string();
            failure = Some(e);
            return Err(BusError::Unavailable(shown));
        }
        next += 1;
        Ok(())
    })
    .map_err(|e| match failure.take() {
        Some(f) => f,
        None => StoreError::Changelog(format!("snapshot: {e}")),
    })?;
    if next != taken.chunks {
        return Err(corrupt(taken.done, "snapshot chunks missing"));
    }
    Ok(())
}

/// The router thread's side: when to snapshot, and the one snapshot
/// being written.
pub(crate) struct Snapshots {
    log: Arc<dyn Log>,
    changelog: String,
    writer: String,
    min_bytes: u64,
    /// Changelog bytes appended since the last snapshot was started.
    since: u64,
    /// The last complete snapshot (loaded at takeover, or written since).
    last: Option<Taken>,
    running: Option<std::thread::JoinHandle<Result<Taken, StoreError>>>,
    /// Set to give the running snapshot up (the router is stopping).
    stop: Arc<AtomicBool>,
    metrics: crate::metrics::SnapshotMetrics,
}

impl Snapshots {
    pub(crate) fn new(
        changelog: &crate::fleet::Changelog,
        min_bytes: u64,
        metrics: crate::metrics::SnapshotMetrics,
    ) -> Self {
        if let Some(t) = &changelog.snapshot {
            metrics
                .bytes
                .set(i64::try_from(t.bytes).unwrap_or(i64::MAX));
        }
        Self {
            log: changelog.log.clone(),
            changelog: changelog.subject.clone(),
            writer: changelog.writer.clone(),
            min_bytes,
            since: 0,
            last: changelog.snapshot,
            running: None,
            stop: Arc::new(AtomicBool::new(false)),
            metrics,
        }
    }

    /// Counts a batch appended to the changelog.
    pub(crate) fn appended(&mut self, bytes: usize) {
        self.since += bytes as u64;
    }

    /// True when a snapshot should be started now: the log has grown by
    /// the last snapshot's size, and none is being written.
    pub(crate) fn due(&mut self) -> bool {
        self.reap();
        let threshold = self.last.map_or(0, |t| t.bytes).max(self.min_bytes);
        self.running.is_none() && self.since >= threshold
    }

    /// Starts writing `view`, the store as of changelog sequence `at`.
    pub(crate) fn start(&mut self, view: StoreSnapshot, at: u64) {
        self.since = 0;
        let (log, changelog, writer, previous, stop) = (
            self.log.clone(),
            self.changelog.clone(),
            self.writer.clone(),
            self.last,
            self.stop.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("courier-snapshot".into())
            .spawn(move || {
                let started = Instant::now();
                let taken = write(&*log, &changelog, &writer, &view, at, previous, &stop);
                if let Ok(t) = &taken {
                    tracing::info!(
                        changelog = %changelog,
                        at = t.at,
                        records = t.records,
                        bytes = t.bytes,
                        took_ms = started.elapsed().as_millis() as u64,
                        "changelog snapshot written"
                    );
                }
                taken
            });
        match spawned {
            Ok(handle) => self.running = Some(handle),
            Err(e) => tracing::warn!(error = %e, "snapshot thread failed to start"),
        }
    }

    /// Collects a finished snapshot's outcome.
    fn reap(&mut self) {
        if !self.running.as_ref().is_some_and(|h| h.is_finished()) {
            return;
        }
        let Some(handle) = self.running.take() else {
            return;
        };
        match handle.join() {
            Ok(Ok(taken)) => {
                self.metrics.taken.inc();
                self.metrics
                    .bytes
                    .set(i64::try_from(taken.bytes).unwrap_or(i64::MAX));
                self.last = Some(taken);
            }
            Ok(Err(e)) => {
                self.metrics.failures.inc();
                tracing::warn!(error = %e, "changelog snapshot failed; the next one is tried after as much log again");
            }
            Err(_) => {
                self.metrics.failures.inc();
                tracing::error!("changelog snapshot thread panicked");
            }
        }
    }
}

impl Snapshots {
    /// Gives up a snapshot being written and waits for its thread (at
    /// most one chunk's append), so it never reads a store being closed.
    /// The next owner loads the last complete snapshot instead.
    pub(crate) fn abandon(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.running.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        self.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Part;
    use courier_bus::local::LocalLog;
    use courier_bus::testing::HookedLog;

    /// A log where another writer appends to the snapshot subject right
    /// after this writer's first record, as a new owner would while a
    /// deposed one is still writing.
    fn interloper(inner: LocalLog) -> HookedLog {
        let done = AtomicBool::new(false);
        HookedLog::appends(
            Arc::new(inner),
            Box::new(move |log, subject, id, payload, expect_last| {
                let appended = log.append(subject, id, payload, expect_last)?;
                if subject.ends_with(".snap") && !done.swap(true, Ordering::SeqCst) {
                    log.append(subject, "newer.snap.0", Bytes::from_static(b"x"), None)?;
                }
                Ok(appended)
            }),
        )
    }

    /// A value too large for one record (a raised body limit) goes into
    /// the snapshot as pieces and comes back whole.
    #[test]
    fn a_value_larger_than_a_record_is_snapshotted_in_pieces() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut store = Store::open(&dir.path().join("a")).unwrap_or_else(|e| panic!("{e}"));
        let big = vec![b'b'; 1_300_000];
        let mut writes = WriteSet::default();
        writes.put(Part::Entries, b"big".to_vec(), big.clone());
        writes.put(Part::Entries, b"small".to_vec(), b"s".to_vec());
        store
            .commit(writes, false)
            .unwrap_or_else(|e| panic!("{e}"));
        let log = LocalLog::open(&dir.path().join("log"), std::time::Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        let view = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
        let stop = AtomicBool::new(false);
        let taken =
            write(&log, "t.log.0", "w", &view, 9, None, &stop).unwrap_or_else(|e| panic!("{e}"));
        // The big value fills a chunk of its own; the small one follows.
        assert_eq!((taken.records, taken.chunks), (2, 2));
        let mut records = 0;
        log.replay(&subject("t.log.0"), 0, &mut |r| {
            assert!(r.payload.len() <= crate::fleet::RECORD_BYTES + 16);
            records += 1;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            records >= 4,
            "{records} records: 3 pieces and the done record"
        );

        let found = latest(&log, "t.log.0").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found, Some(taken));
        let mut copy = Store::open(&dir.path().join("b")).unwrap_or_else(|e| panic!("{e}"));
        load(&log, "t.log.0", &taken, &mut copy).unwrap_or_else(|e| panic!("{e}"));
        let back = copy
            .scan_prefix(Part::Entries, b"big")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.len(), 1);
        assert_eq!(&back[0].1[..], &big[..]);
    }

    /// A snapshot whose writer is overtaken on the snapshot subject stops
    /// at its next record: no done record, no purge.
    #[test]
    fn a_writer_overtaken_on_the_subject_is_refused_before_its_done_record() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut store = Store::open(&dir.path().join("store")).unwrap_or_else(|e| panic!("{e}"));
        let mut writes = WriteSet::default();
        for i in 0u32..40 {
            writes.put(
                Part::Entries,
                i.to_be_bytes().to_vec(),
                vec![b'v'; 16 << 10],
            );
        }
        store
            .commit(writes, false)
            .unwrap_or_else(|e| panic!("{e}"));
        let log = interloper(
            LocalLog::open(&dir.path().join("log"), std::time::Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let view = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
        let stop = AtomicBool::new(false);
        let written = write(&log, "t.log.0", "old", &view, 5, None, &stop);
        assert!(
            matches!(written, Err(StoreError::Changelog(_))),
            "{written:?}"
        );
        assert_eq!(
            latest(&log, "t.log.0").unwrap_or_else(|e| panic!("{e}")),
            None
        );
    }

    #[test]
    fn a_done_record_reads_back_and_nothing_else_passes_for_one() {
        let taken = Taken {
            at: 1 << 40,
            first: 7,
            done: 99,
            chunks: 3,
            records: 1234,
            bytes: 5 << 20,
        };
        assert_eq!(Taken::decode(99, &taken.encode()), Some(taken));
        let mut chunk = taken.encode().to_vec();
        chunk[0] = CHUNK;
        assert_eq!(Taken::decode(99, &chunk), None);
        assert_eq!(Taken::decode(99, &taken.encode()[..36]), None);
        assert_eq!(Taken::decode(99, b""), None);
    }
}
