//! The router's durable store: fjall partitions, their keys, and the one
//! commit per batch.
//!
//! # Layout
//!
//! Keys use big-endian integers so byte order is numeric order; a string in
//! a key is preceded by its `u16` big-endian length so one id is never a
//! prefix of another's key. Values are encoded as in `codec.rs`.
//!
//! | partition | key | value |
//! |---|---|---|
//! | `entries` | `len conversation seq` | [`StoredEntry`]: kind, server id, time, sender, device, client id, body |
//! | `conversations` | `conversation` | [`ConversationMeta`]: kind, creator, current members |
//! | `memberships` | `len user conversation` | [`Membership`]: join seq, left seq (0 while a member) |
//! | `cursors` | `len user device conversation` | [`Cursors`]: delivered, read |
//! | `dedupe` | `len user device client_id` | [`DedupeRecord`]: the original `Sent` fields and when it was stored |
//! | `dedupe_by_time` | `stored_at_ms len user device client_id` | empty: the sweep's index |
//! | `router` | a name | node state (the highest server id issued, the one-time prekey stock) |
//! | `identities` | `len user device` | [`IdentityRecord`]: identity keys, signed and last-resort prekeys, one-time count |
//! | `prekeys` | `len user device prekey_id` | one one-time prekey's public key |
//! | `archives` | `len user device` | [`ArchiveRecord`]: a history archive waiting for that device |
//! | `push_tokens` | `len user device` | a device's push token (`push/record.rs`) |
//! | `push_queue` | `len user device conversation` | a notification waiting for its device (`push/record.rs`) |
//!
//! A conversation's entries are one prefix range of `entries`, in sequence
//! order. Its last sequence is the key of its last entry, read back when the
//! conversation is first used after a start, so sequence counters resume
//! exactly and a message never rewrites the conversation's metadata.
//!
//! Everything a batch changes goes into one [`WriteSet`], committed as one
//! fjall batch with one fdatasync ([`Store::commit`]).

use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};

use fjall::compaction::{SizeTiered, Strategy as CompactionStrategy};
use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode, Slice};
use rustc_hash::FxHashMap;

use crate::codec::{
    self, ArchiveRecord, ConversationMeta, Corrupt, Cursors, DedupeRecord, DeviceRecord,
    IdentityRecord, Membership, StoredEntry, UserSettings,
};

/// Why the store could not do what was asked. Every variant means "not now":
/// callers answer `StoreUnavailable` and keep going.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An earlier failure closed the store and reopening it failed too.
    #[error("store is closed after an earlier failure")]
    Closed,
    /// fjall reported an I/O error (or is poisoned by an earlier one).
    #[error(transparent)]
    Fjall(#[from] fjall::Error),
    /// The fleet's changelog refused or could not take the batch.
    #[error("changelog: {0}")]
    Changelog(String),
    /// A changelog record could not be read back.
    #[error("changelog record {seq} is corrupt: {what}")]
    CorruptRecord { seq: u64, what: &'static str },
    /// A test asked this commit to fail.
    #[cfg(test)]
    #[error("injected commit failure")]
    Injected,
}

/// The partitions, named for logs and write sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Entries,
    Conversations,
    Memberships,
    Cursors,
    Dedupe,
    DedupeByTime,
    Router,
    Devices,
    Settings,
    Identities,
    Prekeys,
    Archives,
    PushTokens,
    PushQueue,
}

impl Part {
    /// Every partition, in declaration order (the order of `Open::parts`).
    pub const ALL: [Part; 14] = [
        Part::Entries,
        Part::Conversations,
        Part::Memberships,
        Part::Cursors,
        Part::Dedupe,
        Part::DedupeByTime,
        Part::Router,
        Part::Devices,
        Part::Settings,
        Part::Identities,
        Part::Prekeys,
        Part::Archives,
        Part::PushTokens,
        Part::PushQueue,
    ];

    fn from_code(code: u8) -> Option<Part> {
        Self::ALL.get(usize::from(code)).copied()
    }

    fn name(self) -> &'static str {
        match self {
            Part::Entries => "entries",
            Part::Conversations => "conversations",
            Part::Memberships => "memberships",
            Part::Cursors => "cursors",
            Part::Dedupe => "dedupe",
            Part::DedupeByTime => "dedupe_by_time",
            Part::Router => "router",
            Part::Devices => "devices",
            Part::Settings => "settings",
            Part::Identities => "identities",
            Part::Prekeys => "prekeys",
            Part::Archives => "archives",
            Part::PushTokens => "push_tokens",
            Part::PushQueue => "push_queue",
        }
    }
}

/// The key in the `router` partition holding the highest server id issued.
pub const SERVER_ID_HIGH: &[u8] = b"server_id_high";

/// The key in the `router` partition holding the one-time prekey stock
/// (over every device), for the metric.
pub const PREKEY_STOCK: &[u8] = b"prekey_stock";

/// Writes collected while a batch is processed, applied by one commit.
/// Nothing here is visible to reads until then, which is why the router
/// keeps its own view of the batch's effects (see `core.rs`). A key written
/// twice keeps its last value, in place, so the commit never holds two
/// writes of one key.
#[derive(Debug, Default)]
pub struct WriteSet {
    ops: Vec<(Part, Vec<u8>, Option<Vec<u8>>)>,
    index: FxHashMap<(Part, Vec<u8>), usize>,
}

impl WriteSet {
    /// The lowest entry sequence this set writes, per conversation.
    pub fn first_entries(&self) -> FxHashMap<Box<str>, u64> {
        let mut first: FxHashMap<Box<str>, u64> = FxHashMap::default();
        for (part, key, value) in &self.ops {
            if *part != Part::Entries || value.is_none() {
                continue;
            }
            let Some((conversation, seq)) = parse_entry_key(key) else {
                continue;
            };
            let slot = first.entry(conversation.into()).or_insert(seq);
            *slot = (*slot).min(seq);
        }
        first
    }

    pub fn put(&mut self, part: Part, key: Vec<u8>, value: Vec<u8>) {
        self.write(part, key, Some(value));
    }

    pub fn remove(&mut self, part: Part, key: Vec<u8>) {
        self.write(part, key, None);
    }

    fn write(&mut self, part: Part, key: Vec<u8>, value: Option<Vec<u8>>) {
        match self.index.entry((part, key)) {
            Entry::Occupied(at) => self.ops[*at.get()].2 = value,
            Entry::Vacant(slot) => {
                self.ops.push((part, slot.key().1.clone(), value));
                slot.insert(self.ops.len() - 1);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The set as bytes, for the fleet's changelog: a version byte, the
    /// op count, then per op the partition's code, the key, and the value
    /// (absent for a removal), lengths as `u32` big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self
            .ops
            .iter()
            .map(|(_, k, v)| 10 + k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        let mut out = Vec::with_capacity(5 + size);
        out.push(WRITE_SET_VERSION);
        out.extend_from_slice(&(self.ops.len() as u32).to_be_bytes());
        for (part, key, value) in &self.ops {
            out.push(*part as u8);
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(key);
            match value {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.push(0),
            }
        }
        out
    }

    /// Reads what [`Self::encode`] wrote.
    pub fn decode(mut raw: &[u8]) -> Result<Self, Corrupt> {
        fn take<'a>(raw: &mut &'a [u8], n: usize) -> Result<&'a [u8], Corrupt> {
            if raw.len() < n {
                return Err(Corrupt("write set truncated"));
            }
            let (head, rest) = raw.split_at(n);
            *raw = rest;
            Ok(head)
        }
        fn len(raw: &mut &[u8]) -> Result<usize, Corrupt> {
            let b = take(raw, 4)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        }
        if take(&mut raw, 1)? != [WRITE_SET_VERSION] {
            return Err(Corrupt("write set version"));
        }
        let count = len(&mut raw)?;
        let mut set = WriteSet::default();
        for _ in 0..count {
            let part = Part::from_code(take(&mut raw, 1)?[0]).ok_or(Corrupt("partition"))?;
            let n = len(&mut raw)?;
            let key = take(&mut raw, n)?.to_vec();
            let value = match take(&mut raw, 1)?[0] {
                0 => None,
                1 => {
                    let n = len(&mut raw)?;
                    Some(take(&mut raw, n)?.to_vec())
                }
                _ => return Err(Corrupt("write set op")),
            };
            set.write(part, key, value);
        }
        if !raw.is_empty() {
            return Err(Corrupt("write set trailing bytes"));
        }
        Ok(set)
    }
}

/// The format of an encoded [`WriteSet`].
const WRITE_SET_VERSION: u8 = 1;

/// The open keyspace and its partitions. Dropped whole when a failure
/// poisons it, then opened again from disk (see [`Store::reopen`]).
struct Open {
    keyspace: Keyspace,
    parts: [PartitionHandle; 14],
}

/// How much memory the store may hold, in bytes. fjall's own defaults (a
/// 32 MiB block cache, 64 MiB of write buffers, 16 MiB memtables) let a
/// node's memory climb for half an hour under a steady load before the
/// slowest-written partitions fill their memtables; these bounds are
/// reached within minutes and then hold (docs/benchmarks.md, the soak).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// The block cache shared by every partition.
    pub cache_bytes: u64,
    /// All memtables together; past it fjall flushes the largest ones.
    pub write_buffer_bytes: u64,
    /// One partition's memtable; past it the memtable is flushed. Fixed
    /// when a partition is created.
    pub memtable_bytes: u32,
    /// Niceness of the store's own threads (memtable flushes, compactions,
    /// the journal monitor), 1 to 19; 0 leaves them at the niceness of the
    /// thread that opens the store. A flush or a compaction is a burst of
    /// CPU that nothing waits for, and on a node with few cores it delays
    /// the router and the gateway cores that a message is waiting on; at a
    /// lower priority it runs in the time they leave.
    pub background_nice: i32,
    /// How the dedupe partitions, written on every send, are compacted (see
    /// [`part_options`]). Fixed when a partition is created.
    pub dedupe_compaction: Compaction,
    /// How the entries (the messages) are compacted (see [`part_options`]).
    /// Fixed when a partition is created.
    pub entries_compaction: Compaction,
}

/// An LSM compaction strategy of fjall's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compaction {
    /// Size-tiered: a level's tables are merged into the next level once
    /// it holds `ratio` times the level before; each record is rewritten
    /// about once a level, and reads look at more tables.
    #[default]
    Tiered,
    /// Levelled, fjall's default: few tables to read, but each flush of
    /// keys spread over the key space rewrites level 1 whole.
    Leveled,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            cache_bytes: 16 << 20,
            write_buffer_bytes: 16 << 20,
            memtable_bytes: 4 << 20,
            background_nice: 19,
            dedupe_compaction: Compaction::Tiered,
            entries_compaction: Compaction::Tiered,
        }
    }
}

/// What a partition is created with beyond `base`.
///
/// The two partitions that take a record per message, the entries and the
/// dedupe records' time index, are only ever read by range (catch-up,
/// history, the sweep), which a bloom filter does not serve; so they have
/// none, and 16 KiB blocks instead of 4 KiB. Both matter for memory, not
/// only for disk: fjall keeps every table's bloom filter in memory, at
/// 24 bits a key in level 0 and 16 in level 1, and the whole block index of
/// those two levels (an entry a block), so with the defaults both grew
/// with every stored message: 16.5 of the 29 bytes a message the node's heap
/// grew by in a heap profile at 800 messages/s (docs/benchmarks.md, the
/// soak). The partitions read by key keep their filters: a send's dedupe
/// lookup misses on almost every call, and the filter answers it without
/// reading a block.
///
/// The three partitions that take a record per send, the entries and the
/// two of the dedupe records, are compacted size-tiered by default, not
/// levelled (fjall's default). Their keys spread over the whole key space
/// (an entry's starts with its conversation, a dedupe record's with its
/// sender), so every flushed table overlaps all of level 1, and levelled
/// compaction rewrites level 1 whole each time level 0 fills: at issue 2's
/// 5,000 sends/s the compactor wrote about 250 MB a minute for 50 MB of
/// data. Size-tiered merges a level into the next only once it holds
/// `TIERED_RATIO` times the level before, so a record is rewritten about
/// once a level: 34 to 44 MB a minute. Those writes share the disk with the
/// journal, whose fdatasync waits behind them, and slow syncs are part of
/// the end-to-end tail (docs/benchmarks.md, "Size-tiered compaction").
///
/// What it costs is reads. A dedupe lookup checks the bloom filter of each
/// of a few more tables, and the sweep's range read by time opens only the
/// tables its range touches (they barely overlap). A conversation's range
/// read (catch-up, history) overlaps every table, and opening about ten
/// made a catch-up from the store five times slower; the router answers the
/// common ones, a device back after minutes, from its recent entries in
/// memory instead (`core/recent.rs`), and an operator whose devices mostly
/// come back after the recent entries have moved on may keep the entries
/// levelled (`store.entries_compaction`).
///
/// fjall records these with a partition when it creates it: a store created
/// before keeps the ones it was created with.
fn part_options(
    part: Part,
    base: &PartitionCreateOptions,
    limits: &StoreLimits,
) -> PartitionCreateOptions {
    let compacted = |how: Compaction| match how {
        Compaction::Tiered => base
            .clone()
            .compaction_strategy(CompactionStrategy::SizeTiered(SizeTiered::new(
                TIERED_BASE_BYTES,
                TIERED_RATIO,
            ))),
        Compaction::Leveled => base.clone(),
    };
    let dedupe = || compacted(limits.dedupe_compaction);
    match part {
        Part::Entries => compacted(limits.entries_compaction)
            .bloom_filter_bits(None)
            .block_size(RANGE_BLOCK_BYTES),
        Part::DedupeByTime => dedupe()
            .bloom_filter_bits(None)
            .block_size(RANGE_BLOCK_BYTES),
        Part::Dedupe => dedupe(),
        _ => base.clone(),
    }
}

/// Size-tiered compaction of the per-send partitions (see [`part_options`]):
/// level n is merged into level n + 1 once it holds
/// `TIERED_BASE_BYTES * TIERED_RATIO^(n + 1)`, so level 0 at 32 MiB, level
/// 1 at 128 MiB, and so on.
const TIERED_BASE_BYTES: u32 = 8 << 20;
const TIERED_RATIO: u8 = 4;

/// Most sealed memtables fjall's flush worker takes each time it wakes
/// (`Config::flush_workers`, which fjall also calls its parallelism: it
/// flushes them on one thread per partition). fjall wakes the worker once
/// per memtable sealed, but after a crash it wakes it once per partition
/// with recovered memtables, though a partition may have several; and by
/// default (one less than the CPUs, at most 4) it takes one task a wake-up
/// here. The tasks left over then stay queued for good, one of them in a
/// partition rarely written (the devices) whose sealed memtable is never
/// flushed, so no journal after it can be deleted; at 16 journals (fjall
/// counts each at its preallocated 32 MiB against its 512 MiB limit)
/// every write halts, and the monitor will not flush a partition with a
/// task queued. The node stopped committing 12 s after a restart at 2,000
/// msg/s (`benches/scripts/kill9.sh`). Taking every queued task at each
/// wake-up clears any such backlog at the next one. (fjall's tracker has
/// the same stall after recovery in its 3.x line: fjall-rs/fjall issues
/// 257 and 288.)
const FLUSH_TASKS_PER_WAKE: usize = 64;

/// Block size of the partitions read only by range (see [`part_options`]).
const RANGE_BLOCK_BYTES: u32 = 16 << 10;

impl Open {
    fn new(path: &Path, limits: StoreLimits) -> Result<Self, fjall::Error> {
        // Batches choose their own durability; fjall never flushes the
        // journal on its own schedule.
        let config = Config::new(path)
            .manual_journal_persist(true)
            .fsync_ms(None)
            .flush_workers(FLUSH_TASKS_PER_WAKE)
            .cache_size(limits.cache_bytes)
            .max_write_buffer_size(limits.write_buffer_bytes.max(1 << 20));
        let keyspace = open_keyspace(config, limits.background_nice)?;
        // fjall records the memtable size with a partition when it creates
        // it: a store created before keeps its own, and only the total write
        // buffer bound above applies to it.
        let options = PartitionCreateOptions::default().max_memtable_size(limits.memtable_bytes);
        let open = |part: Part| {
            keyspace.open_partition(part.name(), part_options(part, &options, &limits))
        };
        // In `Part` order: `part()` indexes this array by discriminant.
        let parts = [
            open(Part::Entries)?,
            open(Part::Conversations)?,
            open(Part::Memberships)?,
            open(Part::Cursors)?,
            open(Part::Dedupe)?,
            open(Part::DedupeByTime)?,
            open(Part::Router)?,
            open(Part::Devices)?,
            open(Part::Settings)?,
            open(Part::Identities)?,
            open(Part::Prekeys)?,
            open(Part::Archives)?,
            open(Part::PushTokens)?,
            open(Part::PushQueue)?,
        ];
        Ok(Self { keyspace, parts })
    }

    fn part(&self, part: Part) -> &PartitionHandle {
        &self.parts[part as usize]
    }
}

/// Opens the keyspace with its background threads at niceness `nice`.
///
/// fjall starts those threads inside `open`, and a Linux thread starts with
/// the niceness of the thread that created it; so the keyspace is opened
/// from a short-lived thread that first lowers its own priority. Raising
/// niceness needs no privilege, and no other thread of the process changes.
fn open_keyspace(config: Config, nice: i32) -> Result<Keyspace, fjall::Error> {
    if nice <= 0 {
        return config.open();
    }
    std::thread::scope(|scope| {
        let opener = std::thread::Builder::new()
            .name("store-open".into())
            .spawn_scoped(scope, || {
                lower_thread_priority(nice);
                config.open()
            });
        match opener {
            Ok(opener) => opener
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => Err(fjall::Error::Io(e)),
        }
    })
}

/// Sets the calling thread's niceness (Linux keeps it per thread, so the
/// thread's own id names this thread alone).
fn lower_thread_priority(nice: i32) {
    let this_thread = rustix::thread::gettid();
    let rc = rustix::process::setpriority_process(Some(this_thread), nice.min(19));
    if let Err(e) = rc {
        tracing::warn!(
            error = %e,
            nice,
            "could not lower the store threads' priority; they run at normal priority"
        );
    }
}

/// A point-in-time view of the whole store, read on another thread while
/// the router goes on (fleet mode: a changelog snapshot). fjall keeps the
/// versions it sees until it is dropped.
pub struct StoreSnapshot(Vec<(Part, fjall::Snapshot)>);

impl std::fmt::Debug for StoreSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSnapshot").finish_non_exhaustive()
    }
}

impl StoreSnapshot {
    /// Every record of the view, as write sets holding about `chunk_bytes`
    /// of keys and values each, in partition then key order; returns how
    /// many records there were. An error from `each` stops the walk.
    pub fn chunks(
        &self,
        chunk_bytes: usize,
        each: &mut dyn FnMut(WriteSet) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let mut set = WriteSet::default();
        let (mut size, mut records) = (0, 0);
        for (part, snapshot) in &self.0 {
            for item in snapshot.iter() {
                let (key, value) = item.map_err(fjall::Error::from)?;
                size += key.len() + value.len();
                records += 1;
                set.put(*part, key.to_vec(), value.to_vec());
                if size >= chunk_bytes {
                    each(std::mem::take(&mut set))?;
                    size = 0;
                }
            }
        }
        if !set.is_empty() {
            each(set)?;
        }
        Ok(records)
    }
}

/// The store. Owned by the router thread; reads see only committed data.
pub struct Store {
    path: PathBuf,
    limits: StoreLimits,
    open: Option<Open>,
    fsyncs: u64,
    /// Commits of a non-empty write set, synced or not.
    #[cfg(test)]
    pub commits: u64,
    /// Test hook: how many of the next commits fail before anything reaches
    /// the journal, as a full disk would fail them.
    #[cfg(test)]
    pub fail_commits: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("open", &self.open.is_some())
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store under `path` with the default limits.
    #[cfg(test)]
    pub fn open(path: &Path) -> Result<Self, fjall::Error> {
        Self::open_with(path, StoreLimits::default())
    }

    /// Opens (or creates) the store under `path`, holding at most `limits`
    /// in memory.
    pub fn open_with(path: &Path, limits: StoreLimits) -> Result<Self, fjall::Error> {
        Ok(Self {
            path: path.to_owned(),
            limits,
            open: Some(Open::new(path, limits)?),
            fsyncs: 0,
            #[cfg(test)]
            commits: 0,
            #[cfg(test)]
            fail_commits: 0,
        })
    }

    /// How many durable commits (each one fdatasync) this store has made.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs
    }

    /// Applies `writes` atomically. With `durable`, the journal is
    /// fdatasync'ed before the writes become visible to reads, so a failed
    /// sync never shows unacknowledged data to a reader in this process.
    /// An empty write set commits nothing and costs no sync.
    pub fn commit(&mut self, writes: WriteSet, durable: bool) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let open = self.open.as_ref().ok_or(StoreError::Closed)?;
        #[cfg(test)]
        if self.fail_commits > 0 {
            self.fail_commits -= 1;
            return Err(StoreError::Injected);
        }
        let mode = if durable {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        let mut batch = open.keyspace.batch().durability(Some(mode));
        for (part, key, value) in writes.ops {
            match value {
                Some(value) => batch.insert(open.part(part), key, value),
                None => batch.remove(open.part(part), key),
            }
        }
        batch.commit()?;
        #[cfg(test)]
        {
            self.commits += 1;
        }
        if durable {
            self.fsyncs += 1;
        }
        Ok(())
    }

    /// Makes everything committed so far durable (one fdatasync of the
    /// journal).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.sync_handle().ok_or(StoreError::Closed)?.sync()?;
        self.fsyncs += 1;
        Ok(())
    }

    /// A handle that syncs this store's journal from another thread, so the
    /// router can decide the next batch while the last one is synced.
    pub fn sync_handle(&self) -> Option<SyncHandle> {
        self.open
            .as_ref()
            .map(|open| SyncHandle(open.keyspace.clone()))
    }

    /// True while the store is closed after a failure.
    pub fn is_closed(&self) -> bool {
        self.open.is_none()
    }

    /// Drops the open keyspace after a failure without opening it again:
    /// every use fails with [`StoreError::Closed`] until [`Store::reopen`].
    pub fn close_after_failure(&mut self) {
        self.open = None;
    }

    /// Drops the open keyspace and opens it again from disk. fjall refuses
    /// every write after a failed sync (it is "poisoned"); reopening replays
    /// the journal, so what reached the disk is what the store holds.
    pub fn reopen(&mut self) -> Result<(), StoreError> {
        self.open = None;
        self.open = Some(Open::new(&self.path, self.limits)?);
        Ok(())
    }

    /// Bytes in the memtables now (0 while the store is closed).
    pub fn write_buffer_bytes(&self) -> u64 {
        self.open
            .as_ref()
            .map_or(0, |open| open.keyspace.write_buffer_size())
    }

    /// Syncs everything to disk, for a clean stop.
    pub fn flush(&self) -> Result<(), StoreError> {
        let open = self.open.as_ref().ok_or(StoreError::Closed)?;
        open.keyspace.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    fn part(&self, part: Part) -> Result<&PartitionHandle, StoreError> {
        Ok(self.open.as_ref().ok_or(StoreError::Closed)?.part(part))
    }

    /// Everything committed so far, as one consistent view over every
    /// partition (later commits are not in it).
    pub fn snapshot(&self) -> Result<StoreSnapshot, StoreError> {
        let open = self.open.as_ref().ok_or(StoreError::Closed)?;
        let instant = open.keyspace.instant();
        Ok(StoreSnapshot(
            Part::ALL
                .iter()
                .map(|p| (*p, open.part(*p).snapshot_at(instant)))
                .collect(),
        ))
    }

    fn get(&self, part: Part, key: &[u8]) -> Result<Option<Slice>, StoreError> {
        Ok(self.part(part)?.get(key)?)
    }

    /// The conversation's metadata, `None` when it does not exist (or its
    /// record is corrupt, which is logged).
    pub fn conversation(&self, conversation: &str) -> Result<Option<ConversationMeta>, StoreError> {
        let raw = self.get(Part::Conversations, conversation.as_bytes())?;
        Ok(raw.and_then(|raw| skip_corrupt(Part::Conversations, ConversationMeta::decode(&raw))))
    }

    /// The sequence of the conversation's last entry (0 when it has none).
    pub fn last_seq(&self, conversation: &str) -> Result<u64, StoreError> {
        let prefix = entries_prefix(conversation);
        match self.part(Part::Entries)?.prefix(&prefix).next_back() {
            None => Ok(0),
            Some(item) => {
                let (key, _) = item?;
                Ok(seq_of_entry_key(&key, prefix.len()).unwrap_or_else(|| {
                    tracing::error!(store.partition = "entries", "entry key of the wrong length");
                    0
                }))
            }
        }
    }

    /// The entries of `conversation` with sequences in `from..=to`, in
    /// order, at most `limit` of them. A corrupt entry is logged and comes
    /// back as `None`, so the caller still sees its place.
    pub fn entries(
        &self,
        conversation: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Option<StoredEntry>)>, StoreError> {
        self.scan_entries(conversation, from, to, limit, false)
    }

    /// The newest entries of `conversation` with sequences in `from..=to`,
    /// newest first, at most `limit` of them (corrupt ones as `None`).
    pub fn entries_newest_first(
        &self,
        conversation: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Option<StoredEntry>)>, StoreError> {
        self.scan_entries(conversation, from, to, limit, true)
    }

    fn scan_entries(
        &self,
        conversation: &str,
        from: u64,
        to: u64,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<(u64, Option<StoredEntry>)>, StoreError> {
        let mut out = Vec::new();
        if from > to || limit == 0 {
            return Ok(out);
        }
        let prefix_len = entries_prefix(conversation).len();
        let range = entry_key(conversation, from)..=entry_key(conversation, to);
        let part = self.part(Part::Entries)?;
        let items: Box<dyn Iterator<Item = _>> = if newest_first {
            Box::new(part.range(range).rev())
        } else {
            Box::new(part.range(range))
        };
        for item in items.take(limit) {
            let (key, value) = item?;
            let Some(seq) = seq_of_entry_key(&key, prefix_len) else {
                tracing::error!(store.partition = "entries", "entry key of the wrong length");
                continue;
            };
            out.push((
                seq,
                skip_corrupt(Part::Entries, StoredEntry::decode(&value)),
            ));
        }
        Ok(out)
    }

    /// The conversation's last entry and its sequence, if it has one.
    pub fn last_entry(&self, conversation: &str) -> Result<Option<(u64, StoredEntry)>, StoreError> {
        let last = self.entries_newest_first(conversation, 1, u64::MAX, 1)?;
        Ok(last
            .into_iter()
            .next()
            .and_then(|(seq, e)| e.map(|e| (seq, e))))
    }

    /// A user's device records, by device number.
    pub fn devices(&self, user: &str) -> Result<Vec<(u32, DeviceRecord)>, StoreError> {
        self.per_device(Part::Devices, user, DeviceRecord::decode)
    }

    /// The record of one of `user`'s devices, if there is one (a corrupt
    /// record is logged and taken as none).
    pub fn device(&self, user: &str, device: u32) -> Result<Option<DeviceRecord>, StoreError> {
        let raw = self.get(Part::Devices, &device_key(user, device))?;
        Ok(raw.and_then(|raw| skip_corrupt(Part::Devices, DeviceRecord::decode(&raw))))
    }

    /// The records of `part` keyed by (user, device), by device number; a
    /// malformed key or a corrupt record is logged and skipped.
    fn per_device<T>(
        &self,
        part: Part,
        user: &str,
        decode: impl Fn(&[u8]) -> Result<T, Corrupt>,
    ) -> Result<Vec<(u32, T)>, StoreError> {
        let prefix = user_prefix(user);
        let mut out = Vec::new();
        for item in self.part(part)?.prefix(&prefix) {
            let (key, value) = item?;
            let Some(device) = key
                .get(prefix.len()..)
                .and_then(|k| <[u8; 4]>::try_from(k).ok())
            else {
                tracing::error!(
                    store.partition = part.name(),
                    "per-device key of the wrong length"
                );
                continue;
            };
            if let Some(r) = skip_corrupt(part, decode(&value)) {
                out.push((u32::from_be_bytes(device), r));
            }
        }
        Ok(out)
    }

    /// A user's privacy settings (the defaults when none were stored).
    pub fn settings(&self, user: &str) -> Result<UserSettings, StoreError> {
        let raw = self.get(Part::Settings, &user_prefix(user))?;
        Ok(raw
            .and_then(|raw| skip_corrupt(Part::Settings, UserSettings::decode(&raw)))
            .unwrap_or_default())
    }

    /// True when `conversation` has an entry after `after` and up to `to`.
    pub fn has_entries(&self, conversation: &str, after: u64, to: u64) -> Result<bool, StoreError> {
        if after >= to {
            return Ok(false);
        }
        let range = entry_key(conversation, after + 1)..=entry_key(conversation, to);
        match self.part(Part::Entries)?.range(range).next() {
            None => Ok(false),
            Some(item) => item.map(|_| true).map_err(Into::into),
        }
    }

    /// Every conversation `user` is or was a member of, in key order.
    pub fn memberships(&self, user: &str) -> Result<Vec<(String, Membership)>, StoreError> {
        let prefix = user_prefix(user);
        let mut out = Vec::new();
        for item in self.part(Part::Memberships)?.prefix(&prefix) {
            let (key, value) = item?;
            let Ok(conversation) = std::str::from_utf8(&key[prefix.len()..]) else {
                tracing::error!(
                    store.partition = "memberships",
                    "conversation in key is not UTF-8"
                );
                continue;
            };
            if let Some(m) = skip_corrupt(Part::Memberships, Membership::decode(&value)) {
                out.push((conversation.to_owned(), m));
            }
        }
        Ok(out)
    }

    /// `user`'s membership of `conversation`, if they ever had one.
    pub fn membership(
        &self,
        user: &str,
        conversation: &str,
    ) -> Result<Option<Membership>, StoreError> {
        let raw = self.get(Part::Memberships, &membership_key(user, conversation))?;
        Ok(raw.and_then(|raw| skip_corrupt(Part::Memberships, Membership::decode(&raw))))
    }

    /// The device's receipt cursors in `conversation` (zero when none).
    pub fn cursors(
        &self,
        user: &str,
        device: u32,
        conversation: &str,
    ) -> Result<Cursors, StoreError> {
        let raw = self.get(Part::Cursors, &cursor_key(user, device, conversation))?;
        Ok(raw
            .and_then(|raw| skip_corrupt(Part::Cursors, Cursors::decode(&raw)))
            .unwrap_or_default())
    }

    /// The dedupe record under `key` (from [`dedupe_key`]).
    pub fn dedupe(&self, key: &[u8]) -> Result<Option<DedupeRecord>, StoreError> {
        let raw = self.get(Part::Dedupe, key)?;
        Ok(raw.and_then(|raw| skip_corrupt(Part::Dedupe, DedupeRecord::decode(&raw))))
    }

    /// Up to `limit` dedupe time-index entries stored before `before_ms`,
    /// oldest first.
    pub fn expired_dedupe(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<ExpiredDedupe>, StoreError> {
        let end = before_ms.to_be_bytes();
        let mut out = Vec::new();
        for item in self
            .part(Part::DedupeByTime)?
            .range(..end.as_slice())
            .take(limit)
        {
            let (key, _) = item?;
            if key.len() < 8 {
                tracing::error!(store.partition = "dedupe_by_time", "index key too short");
                continue;
            }
            let mut at = [0u8; 8];
            at.copy_from_slice(&key[..8]);
            out.push(ExpiredDedupe {
                index_key: key.to_vec(),
                key: key[8..].to_vec(),
                stored_at_ms: u64::from_be_bytes(at),
            });
        }
        Ok(out)
    }

    /// A user's device identity records, by device number.
    pub fn identities(&self, user: &str) -> Result<Vec<(u32, IdentityRecord)>, StoreError> {
        self.per_device(Part::Identities, user, IdentityRecord::decode)
    }

    /// The device's first one-time prekey (lowest id) whose key `skip`
    /// does not refuse: its store key, id and public key.
    pub fn first_prekey(
        &self,
        user: &str,
        device: u32,
        skip: impl Fn(&[u8]) -> bool,
    ) -> Result<Option<FoundPrekey>, StoreError> {
        let prefix = device_key(user, device);
        for item in self.part(Part::Prekeys)?.prefix(&prefix) {
            let (key, value) = item?;
            if skip(&key) {
                continue;
            }
            let Some(id) = key
                .get(prefix.len()..)
                .and_then(|k| <[u8; 4]>::try_from(k).ok())
            else {
                tracing::error!(
                    store.partition = "prekeys",
                    "prekey key of the wrong length"
                );
                continue;
            };
            if let Some(pk) = skip_corrupt(Part::Prekeys, codec::decode_prekey(&value)) {
                return Ok(Some((key.to_vec(), u32::from_be_bytes(id), pk)));
            }
        }
        Ok(None)
    }

    /// The store keys of every one-time prekey of the device.
    pub fn prekey_keys(&self, user: &str, device: u32) -> Result<Vec<Vec<u8>>, StoreError> {
        let prefix = device_key(user, device);
        let mut out = Vec::new();
        for item in self.part(Part::Prekeys)?.prefix(&prefix) {
            let (key, _) = item?;
            out.push(key.to_vec());
        }
        Ok(out)
    }

    /// Every (key, value) of `part` under `prefix`, in key order (the push
    /// module's records, which it decodes itself).
    pub fn scan_prefix(
        &self,
        part: Part,
        prefix: &[u8],
    ) -> Result<Vec<(Slice, Slice)>, StoreError> {
        let mut out = Vec::new();
        for item in self.part(part)?.prefix(prefix) {
            out.push(item?);
        }
        Ok(out)
    }

    /// True when the store holds a record under `key` in `part`.
    pub fn contains(&self, part: Part, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(part, key)?.is_some())
    }

    /// The archive waiting for a device, if any.
    pub fn archive(&self, user: &str, device: u32) -> Result<Option<ArchiveRecord>, StoreError> {
        let raw = self.get(Part::Archives, &device_key(user, device))?;
        Ok(raw.and_then(|raw| skip_corrupt(Part::Archives, ArchiveRecord::decode(&raw))))
    }

    /// Up to `limit` archive keys created before `before_ms` (corrupt
    /// records too, so the sweep removes them).
    pub fn expired_archives(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self.part(Part::Archives)?.iter() {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            match ArchiveRecord::decode(&value) {
                Ok(a) if a.created_ms >= before_ms => {}
                _ => out.push(key.to_vec()),
            }
        }
        Ok(out)
    }

    /// The one-time prekey stock recorded by the last batch (0 when none).
    pub fn prekey_stock(&self) -> Result<u64, StoreError> {
        let raw = self.get(Part::Router, PREKEY_STOCK)?;
        Ok(raw
            .and_then(|raw| <[u8; 8]>::try_from(&raw[..]).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0))
    }

    /// The highest server id recorded by an earlier run (0 when none).
    pub fn server_id_high(&self) -> Result<u64, StoreError> {
        let raw = self.get(Part::Router, SERVER_ID_HIGH)?;
        Ok(match raw {
            Some(raw) if raw.len() == 8 => {
                let mut v = [0u8; 8];
                v.copy_from_slice(&raw);
                u64::from_le_bytes(v)
            }
            Some(_) => {
                tracing::error!(
                    store.partition = "router",
                    "server id high-water record is corrupt"
                );
                0
            }
            None => 0,
        })
    }
}

/// A one-time prekey found in the store: its store key, id and public key.
pub type FoundPrekey = (Vec<u8>, u32, [u8; 32]);

/// A dedupe time-index entry past the window.
#[derive(Debug)]
pub struct ExpiredDedupe {
    /// The index entry's own key.
    pub index_key: Vec<u8>,
    /// The dedupe record it points at.
    pub key: Vec<u8>,
    /// When that record was stored, as the index says.
    pub stored_at_ms: u64,
}

/// Logs a corrupt record and turns it into "absent".
fn skip_corrupt<T>(part: Part, decoded: Result<T, Corrupt>) -> Option<T> {
    match decoded {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(store.partition = part.name(), error = %e, "skipping corrupt record");
            None
        }
    }
}

fn push_str(key: &mut Vec<u8>, s: &str) {
    // Ids in keys are validated user and conversation ids, far below the
    // u16 length limit; the cut keeps the prefix honest regardless.
    let n = s.len().min(usize::from(u16::MAX));
    key.extend_from_slice(&(n as u16).to_be_bytes());
    key.extend_from_slice(&s.as_bytes()[..n]);
}

fn entries_prefix(conversation: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + conversation.len() + 8);
    push_str(&mut key, conversation);
    key
}

/// The key of entry `seq` of `conversation`.
pub fn entry_key(conversation: &str, seq: u64) -> Vec<u8> {
    let mut key = entries_prefix(conversation);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The conversation and sequence an entry key names.
fn parse_entry_key(key: &[u8]) -> Option<(&str, u64)> {
    let len = usize::from(u16::from_be_bytes(key.get(..2)?.try_into().ok()?));
    let conversation = std::str::from_utf8(key.get(2..2 + len)?).ok()?;
    Some((conversation, seq_of_entry_key(key, 2 + len)?))
}

/// Syncs a store's journal; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct SyncHandle(fjall::Keyspace);

impl SyncHandle {
    /// One fdatasync of everything written to the journal so far.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.0.persist(PersistMode::SyncData)?;
        Ok(())
    }
}

impl std::fmt::Debug for SyncHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncHandle")
    }
}

fn seq_of_entry_key(key: &[u8], prefix_len: usize) -> Option<u64> {
    let tail: [u8; 8] = key.get(prefix_len..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub(crate) fn user_prefix(user: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + user.len() + 24);
    push_str(&mut key, user);
    key
}

/// The key of `user`'s membership of `conversation`.
pub fn membership_key(user: &str, conversation: &str) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(conversation.as_bytes());
    key
}

/// The key of a device's cursors in a conversation.
pub fn cursor_key(user: &str, device: u32, conversation: &str) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&device.to_be_bytes());
    key.extend_from_slice(conversation.as_bytes());
    key
}

/// Where the device number starts in `user`'s cursor keys.
pub fn cursor_key_device_at(user: &str) -> usize {
    user_prefix(user).len()
}

/// The key of a user's device record.
pub fn device_key(user: &str, device: u32) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&device.to_be_bytes());
    key
}

/// The key of one one-time prekey of a device.
pub fn prekey_key(user: &str, device: u32, id: u32) -> Vec<u8> {
    let mut key = device_key(user, device);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The key of a user's settings record.
pub fn settings_key(user: &str) -> Vec<u8> {
    user_prefix(user)
}

/// The key of the dedupe record for a device's client id.
pub fn dedupe_key(user: &str, device: u32, client_id: u64) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&device.to_be_bytes());
    key.extend_from_slice(&client_id.to_be_bytes());
    key
}

/// The sweep index key for a dedupe record stored at `stored_at_ms`.
pub fn dedupe_time_key(stored_at_ms: u64, dedupe_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + dedupe_key.len());
    key.extend_from_slice(&stored_at_ms.to_be_bytes());
    key.extend_from_slice(dedupe_key);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use courier_protocol::frame::EntryKind;
    use std::sync::Arc;

    /// The niceness in a `/proc/.../stat` line: its 19th field, the 17th
    /// after the command's closing parenthesis.
    fn niceness_in_stat(stat: &str) -> Option<i64> {
        let rest = stat.rsplit_once(')')?.1;
        rest.split_whitespace().nth(16)?.parse().ok()
    }

    /// Niceness of each of this process's threads named `name`.
    fn nice_of_threads(name: &str) -> Vec<i64> {
        let tasks = std::fs::read_dir("/proc/self/task").expect("tasks");
        tasks
            .flatten()
            .filter(|task| {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                comm.trim_end() == name
            })
            .filter_map(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                niceness_in_stat(&stat)
            })
            .collect()
    }

    #[test]
    fn the_store_threads_run_at_the_configured_niceness_and_nothing_else_does() {
        let this_thread =
            || niceness_in_stat(&std::fs::read_to_string("/proc/thread-self/stat").expect("stat"));
        let dir = tempfile::tempdir().expect("tempdir");
        let (before, mine) = (nice_of_threads("flusher").len(), this_thread());
        let store = Store::open_with(dir.path(), StoreLimits::default()).expect("open");
        let flushers = nice_of_threads("flusher");
        let compactors = nice_of_threads("compactor");
        assert!(flushers.len() > before && !compactors.is_empty());
        assert!(flushers.iter().chain(&compactors).all(|n| *n == 19));
        // The opening thread keeps its own.
        assert_eq!(this_thread(), mine);
        drop(store);
    }

    #[test]
    fn one_id_is_never_a_prefix_of_another() {
        assert!(!entry_key("d:a:bc", 1).starts_with(&entries_prefix("d:a:b")));
        assert!(!membership_key("alicex", "d:a:b").starts_with(&user_prefix("alice")));
        assert!(entry_key("g:1", 1) < entry_key("g:1", 2));
        assert!(entry_key("g:1", 255) < entry_key("g:1", 256));
    }

    #[test]
    fn a_write_set_reads_back_as_written() {
        let mut set = WriteSet::default();
        for (i, part) in Part::ALL.into_iter().enumerate() {
            assert_eq!(part as usize, i, "Part::ALL is in declaration order");
            set.put(part, vec![i as u8; i + 1], vec![7; 300 * i]);
        }
        set.remove(Part::Cursors, b"gone".to_vec());
        set.put(Part::Entries, Vec::new(), Vec::new());
        let encoded = set.encode();
        let back = WriteSet::decode(&encoded).expect("decode");
        assert_eq!(back.ops, set.ops);
        for cut in [0, 1, 4, 5, encoded.len() / 2, encoded.len() - 1] {
            assert!(WriteSet::decode(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = encoded.clone();
        bad[0] = 9;
        assert!(WriteSet::decode(&bad).is_err());
        let mut trailing = encoded;
        trailing.push(0);
        assert!(WriteSet::decode(&trailing).is_err());
    }

    #[test]
    fn each_part_indexes_its_own_partition() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = Open::new(dir.path(), StoreLimits::default()).expect("open");
        for part in Part::ALL {
            assert_eq!(&*open.part(part).name, part.name());
        }
    }

    #[test]
    fn memtables_are_flushed_to_stay_within_the_write_buffer_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = small_limits(256 << 10);
        let mut store = Store::open_with(dir.path(), limits).expect("open");
        // 8 MiB of entries, eight times the limit.
        for batch in 0..128u64 {
            let mut w = WriteSet::default();
            for i in 0..64 {
                w.put(
                    Part::Entries,
                    entry_key("g:load", batch * 64 + i),
                    vec![7; 1024],
                );
            }
            store.commit(w, false).expect("commit");
        }
        // Flushes run on fjall's own threads.
        wait_for_flushes(&store, &limits);
    }

    /// A store with a 1 MiB cache and write buffer and `memtable_bytes`
    /// memtables, so a test fills them quickly.
    fn small_limits(memtable_bytes: u32) -> StoreLimits {
        StoreLimits {
            cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            memtable_bytes,
            ..StoreLimits::default()
        }
    }

    /// Waits, bounded, until fjall's own threads have flushed the
    /// memtables back within the write buffer.
    fn wait_for_flushes(store: &Store, limits: &StoreLimits) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.write_buffer_bytes() > limits.write_buffer_bytes {
            assert!(
                std::time::Instant::now() < deadline,
                "write buffers still hold {} bytes",
                store.write_buffer_bytes()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The per-send partitions are compacted size-tiered, which leaves more
    /// tables next to each other, and reads merge them. About forty flushed
    /// 64 KiB memtables of interleaved conversations and senders (26 tables
    /// once fjall has merged its oldest) read back whole and in order,
    /// before and after a reopen.
    #[test]
    fn the_per_send_partitions_read_back_across_many_tables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = small_limits(64 << 10);
        const CONVERSATIONS: u64 = 16;
        const PER_CONVERSATION: u64 = 160;
        let conversation = |c: u64| format!("g:tiered-{c}");
        let mut store = Store::open_with(dir.path(), limits).expect("open");
        for seq in 1..=PER_CONVERSATION {
            let mut w = WriteSet::default();
            for c in 0..CONVERSATIONS {
                let sender = format!("user-{c}");
                let entry = StoredEntry {
                    kind: EntryKind::Message,
                    server_id: c << 32 | seq,
                    timestamp_ms: seq,
                    sender: Arc::from(sender.as_str()),
                    sender_device: 1,
                    client_id: seq,
                    body: Bytes::from(vec![c as u8; 1024]),
                    per_device: None,
                };
                w.put(
                    Part::Entries,
                    entry_key(&conversation(c), seq),
                    entry.encode(),
                );
                let dedupe = dedupe_key(&sender, 1, seq);
                let record = DedupeRecord {
                    conversation: Arc::from(conversation(c).as_str()),
                    seq,
                    server_id: c << 32 | seq,
                    timestamp_ms: seq,
                    stored_at_ms: seq,
                };
                w.put(
                    Part::DedupeByTime,
                    dedupe_time_key(seq, &dedupe),
                    Vec::new(),
                );
                w.put(Part::Dedupe, dedupe, record.encode());
            }
            store.commit(w, false).expect("commit");
        }
        let check = |store: &Store| {
            for c in 0..CONVERSATIONS {
                let read = store
                    .entries(&conversation(c), 1, u64::MAX, usize::MAX)
                    .expect("entries");
                let seqs: Vec<u64> = read.iter().map(|(seq, _)| *seq).collect();
                assert_eq!(seqs, (1..=PER_CONVERSATION).collect::<Vec<_>>());
                for (seq, entry) in read {
                    let entry = entry.expect("entry decodes");
                    assert_eq!(entry.server_id, c << 32 | seq);
                    assert_eq!(entry.body[0], c as u8);
                }
                let retry = store
                    .dedupe(&dedupe_key(&format!("user-{c}"), 1, PER_CONVERSATION / 2))
                    .expect("dedupe")
                    .expect("record");
                assert_eq!(retry.seq, PER_CONVERSATION / 2);
                assert_eq!(&*retry.conversation, conversation(c));
            }
            let expired = store.expired_dedupe(11, usize::MAX).expect("expired");
            assert_eq!(expired.len() as u64, 10 * CONVERSATIONS);
            assert!(expired.windows(2).all(|w| w[0].index_key < w[1].index_key));
        };
        wait_for_flushes(&store, &limits);
        check(&store);
        store.flush().expect("flush");
        drop(store);
        let store = Store::open_with(dir.path(), limits).expect("reopen");
        check(&store);
    }

    #[test]
    fn a_key_written_twice_keeps_its_last_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let key = cursor_key("alice", 1, "d:alice:bob");
        let mut w = WriteSet::default();
        w.put(
            Part::Cursors,
            key.clone(),
            Cursors {
                delivered: 1,
                read: 0,
                ..Cursors::default()
            }
            .encode(),
        );
        w.put(
            Part::Cursors,
            key.clone(),
            Cursors {
                delivered: 3,
                read: 2,
                ..Cursors::default()
            }
            .encode(),
        );
        w.put(Part::Dedupe, key.clone(), vec![1]);
        w.remove(Part::Dedupe, key.clone());
        assert_eq!(w.ops.len(), 2);
        store.commit(w, true).expect("commit");
        let got = store.cursors("alice", 1, "d:alice:bob").expect("read");
        assert_eq!(
            got,
            Cursors {
                delivered: 3,
                read: 2,
                ..Cursors::default()
            }
        );
        assert!(store.get(Part::Dedupe, &key).expect("read").is_none());
    }

    #[test]
    fn ranges_and_last_seq_come_back_after_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(dir.path()).expect("open");
        let mut w = WriteSet::default();
        for (conv, n) in [("d:a:b", 3u64), ("d:a:bc", 5)] {
            for seq in 1..=n {
                let e = StoredEntry {
                    kind: courier_protocol::frame::EntryKind::Message,
                    server_id: seq,
                    timestamp_ms: 0,
                    sender: "a".into(),
                    sender_device: 1,
                    client_id: seq,
                    body: bytes::Bytes::new(),
                    per_device: None,
                };
                w.put(Part::Entries, entry_key(conv, seq), e.encode());
            }
        }
        store.commit(w, true).expect("commit");
        assert_eq!(store.fsyncs(), 1);
        drop(store);

        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.last_seq("d:a:b").expect("last"), 3);
        assert_eq!(store.last_seq("d:a:bc").expect("last"), 5);
        assert_eq!(store.last_seq("d:a:c").expect("last"), 0);
        let seqs: Vec<u64> = store
            .entries("d:a:bc", 2, u64::MAX, 2)
            .expect("range")
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(seqs, vec![2, 3]);
        assert!(store.has_entries("d:a:b", 2, u64::MAX).expect("has"));
        assert!(!store.has_entries("d:a:b", 3, u64::MAX).expect("has"));
    }
}
