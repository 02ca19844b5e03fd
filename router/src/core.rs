//! The router's logic, with no thread and no clock: [`RouterCore`].
//!
//! One call to [`RouterCore::handle_batch`] handles one batch of commands in
//! four steps, always in this order:
//!
//! 1. **Decide.** Each command, in arrival order, is validated against the
//!    router's view of the store plus what earlier commands of the batch
//!    changed; its writes go into one write set and its answer is held back.
//!    Attach, Detach and Sync update the routes here (a Sync makes its
//!    session not live).
//! 2. **Commit.** The write set is committed with one fdatasync.
//! 3. **Answer.** Held answers go out in arrival order: `Sent`, results and
//!    live fan-out when the commit succeeded, `StoreUnavailable` errors when
//!    it failed (and the router's view is then reloaded from the store).
//! 4. **Catch up.** Each Sync of the batch reads the committed store and
//!    streams a page of what its session is missing; a Sync that finishes
//!    with nothing more makes its session live.
//!
//! Because step 4 reads what step 2 committed and a session turns live only
//! after it, an entry reaches a session either in its catch-up or live,
//! never neither, and in sequence order per conversation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{
    encode_members, ClientFrame, Cursor, DeviceCiphertext, E2eeFrame, EntryKind, ReceiptKind,
    ServerFrame,
};
use courier_protocol::ids::{self, ConversationKind as IdKind};
use courier_protocol::ws::{encode_frame, Opcode, MAX_HEADER};
use prometheus_client::registry::Registry;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::api::{
    Class, Command, Delivery, Device, Devices, PeerMsg, Relay, RelayItem, RelayPush, SessionKey,
};
use crate::codec::{
    ConversationKind, ConversationMeta, Cursors, DedupeRecord, DeviceBodies, Member, Membership,
    StoredEntry,
};
use crate::metrics::{CodeLabel, Metrics};
use crate::rate::TokenBucket;
use crate::server_id::ServerIds;
use crate::store::{self, Part, Store, StoreError, WriteSet};
use crate::{RouterConfig, RouterError};

mod keys;
mod peer;
mod push;
mod recent;
mod social;
mod views;

#[cfg(test)]
pub(crate) use peer::PEER_RESEND_MS;
pub(crate) use social::UserState;
use views::Query;

/// How often the sweep drops expired dedupe records and idle rate buckets.
const SWEEP_INTERVAL_MS: u64 = 60_000;

/// Most dedupe records one sweep deletes; a longer backlog continues at the
/// next batch.
const SWEEP_LIMIT: usize = 10_000;

/// Conversations kept in memory before the cache is dropped whole (it is
/// reloaded lazily from the store, between batches, so dropping is safe).
const CONVERSATION_CACHE_LIMIT: usize = 1 << 20;

/// Least time between two reopenings of the store after failures.
const REOPEN_INTERVAL_MS: u64 = 1_000;

/// Least time between two logged commit failures.
const FAILURE_LOG_INTERVAL_MS: u64 = 10_000;

/// How often changed delivery cursors are written to the store. Cursors are
/// written behind: a receipt moves the cached cursor at once and the store
/// learns it within this interval (or at a clean stop). A crash loses at most
/// this much cursor progress, which only means those devices are sent a few
/// messages again on catch-up (they drop them by sequence) and ack again.
/// Written per receipt instead, they were half of the router's CPU at 5,000
/// messages/s. Every move of a key within the interval costs one write, so
/// a longer interval writes less: 5 s instead of 1 s took the cursor
/// records of the single-node scenario from 265,487 to 109,609 per 100,000
/// sends (groups, where each member acks every message, gain most) and
/// the router's CPU per send by about a fifth (docs/benchmarks.md).
const CURSOR_FLUSH_INTERVAL_MS: u64 = 5_000;

/// Cached cursors beyond which the cache is dropped after a flush.
const CURSOR_CACHE_LIMIT: usize = 1 << 20;

/// Most due cursors one batch writes. Writing every due cursor at once
/// (15,000 a second at 5,000 msg/s) stalled the router for tens of
/// milliseconds once a second; spread over batches it costs each about 1 ms
/// at most.
const CURSOR_FLUSH_CHUNK: usize = 512;

/// The router's state and logic, driven one batch at a time.
///
/// Call [`handle_batch`](Self::handle_batch) with each batch and hand the
/// returned deliveries to the gateway; call [`close`](Self::close) once at
/// the end. [`crate::Router`] runs this on its own thread; tests drive it
/// directly with a clock they step.
pub struct RouterCore {
    config: RouterConfig,
    store: Store,
    metrics: Metrics,
    /// Conversations used since the start (or since the cache was last
    /// dropped), loaded from the store on first use. Reflects the batch in
    /// progress; dropped whole after a failed commit.
    conversations: FxHashMap<Box<str>, Conversation>,
    /// Devices attached now, per user. An entry is added by Attach and
    /// removed by the matching Detach.
    routes: FxHashMap<Arc<str>, Vec<Route>>,
    /// Send-rate buckets of users who sent recently; the sweep drops full ones.
    buckets: FxHashMap<Arc<str>, TokenBucket>,
    ids: ServerIds,
    next_sweep_ms: Option<u64>,
    last_failure_log_ms: Option<u64>,
    /// When the store was last reopened after a failure: a full disk fails
    /// every batch, and reopening (a journal recovery) at most once per
    /// [`REOPEN_INTERVAL_MS`] keeps that from costing each batch a
    /// recovery; batches between answer 503 straight away.
    last_reopen_ms: Option<u64>,
    /// Batches written to the store but not yet synced, with the first
    /// entry sequence each wrote per conversation. Catch-up reads stop below
    /// these, so no device is shown an entry before it is durable. Added by
    /// [`RouterCore::prepare`], removed by [`RouterCore::finish`].
    unsynced: Vec<(u64, FxHashMap<Box<str>, u64>)>,
    /// When the oldest cursor records committed without a sync were
    /// committed, until a sync covers them; a batch, even an empty tick,
    /// syncs once they are [`CURSOR_FLUSH_INTERVAL_MS`] old.
    lazy_since_ms: Option<u64>,
    next_batch: u64,
    /// Delivery cursors as the router knows them, by cursor key: read from
    /// the store on first use, moved by receipts. The store may lag behind
    /// by up to [`CURSOR_FLUSH_INTERVAL_MS`] for the keys marked dirty.
    cursor_cache: FxHashMap<Vec<u8>, CachedCursor>,
    /// How many cached cursors are dirty (ahead of the store).
    dirty_cursors: usize,
    /// The same keys, oldest first, with when each became dirty: a key is
    /// written once it has been dirty for the flush interval.
    dirty_order: std::collections::VecDeque<(u64, Vec<u8>)>,
    /// The time of the batch being decided.
    batch_now_ms: u64,
    /// Settings and devices of users seen since the start, loaded on first
    /// use (see `social.rs`).
    users: FxHashMap<Arc<str>, UserState>,
    /// Presence, typing and device bookkeeping (see `social.rs`).
    social: social::Social,
    /// The key directory's cache (see `keys.rs`).
    keys: keys::KeyDirectory,
    /// Push tokens and waiting notifications (see `push.rs`).
    push: push::PushState,
    /// Fleet mode: sends waiting for other partitions, and commands for
    /// them (see `peer.rs`).
    peer: peer::PeerState,
    /// The newest entries written, for catch-up and history (see
    /// `recent.rs`). Cleared when a write or sync fails.
    recent: recent::Recent,
}

/// A batch whose writes are in the store but not yet known to be durable:
/// made by [`RouterCore::prepare`], consumed by [`RouterCore::finish`] once
/// the store has been synced (or the sync failed).
#[derive(Debug)]
pub struct Written {
    id: u64,
    batch: Batch,
    now_ms: u64,
    /// The batch's effects wait for a sync: it wrote more than
    /// written-behind cursors (see [`RouterCore::prepare`]).
    sync: bool,
    /// Writing the batch (before any sync) already failed.
    write_failed: bool,
    /// The batch's writes encoded for the changelog (fleet mode only).
    encoded: Option<Vec<u8>>,
}

impl Written {
    /// True when the batch's effects wait for a sync of the store.
    pub fn needs_sync(&self) -> bool {
        self.sync && !self.write_failed
    }

    /// The batch's writes for the changelog, taken once (fleet mode).
    pub fn take_encoded(&mut self) -> Option<Vec<u8>> {
        self.encoded.take()
    }
}

impl std::fmt::Debug for RouterCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterCore")
            .field("store", &self.store)
            .field("conversations", &self.conversations.len())
            .field("routed_users", &self.routes.len())
            .finish_non_exhaustive()
    }
}

/// A conversation as the router sees it while deciding.
#[derive(Debug)]
struct Conversation {
    kind: ConversationKind,
    creator: Arc<str>,
    /// Current members. Replaced (never edited) on a change, so an answer
    /// held for fan-out keeps the members at the time of its entry.
    members: Arc<[Member]>,
    last_seq: u64,
    /// When the last entry was made, and by whom (for the chat list).
    last_ms: u64,
    last_sender: Arc<str>,
    /// False for a direct conversation whose first message is not written
    /// yet: that send writes its metadata and memberships.
    stored: bool,
}

impl Conversation {
    fn is_member(&self, user: &str) -> bool {
        self.members.iter().any(|m| &*m.user == user)
    }

    fn meta(&self) -> ConversationMeta {
        ConversationMeta {
            kind: self.kind,
            creator: self.creator.clone(),
            members: self.members.to_vec(),
        }
    }
}

/// One attached device.
#[derive(Clone, Copy, Debug)]
struct Route {
    device: u32,
    session: SessionKey,
    /// Set when the session's catch-up finished; cleared by a new Sync.
    live: bool,
}

/// A cursor in [`RouterCore`]'s cache; `dirty` while the store lags it.
#[derive(Clone, Copy, Debug)]
struct CachedCursor {
    cursor: Cursors,
    dirty: bool,
}

/// Why a request is refused: the code and a detail for the error frame.
#[derive(Debug)]
struct Reject {
    code: ErrorCode,
    detail: String,
    /// For a per-device send whose device list is wrong: what to list.
    mismatch: Option<Box<keys::Mismatch>>,
}

impl Reject {
    fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            mismatch: None,
        }
    }
}

impl From<StoreError> for Reject {
    fn from(e: StoreError) -> Self {
        tracing::debug!(error = %e, "store read failed");
        Self::new(
            ErrorCode::StoreUnavailable,
            "store unavailable; retry later",
        )
    }
}

/// An entry to fan out once its batch is durable.
#[derive(Debug)]
struct Fanout {
    message: ServerFrame,
    /// The members at the time of the entry (for a removal, including the
    /// removed ones).
    recipients: Arc<[Member]>,
    sender: Arc<str>,
    sender_device: u32,
    origin: Instant,
    /// A per-device send's ciphertexts: each device gets `message` with
    /// its own body.
    per_device: Option<DeviceBodies>,
    /// Fleet mode with push on: the stored message, for the partitions of
    /// recipients from elsewhere to schedule their notifications.
    push: Option<RelayPush>,
}

/// An answer held until the batch's commit is known.
#[derive(Debug)]
enum Pending {
    /// Goes out whatever the commit does (closes, pongs).
    Always(Delivery),
    /// An answer decided against the batch's view of the store (an error,
    /// a member list, a `Done` that changed nothing). If the commit fails
    /// that view was wrong, and the answer becomes `StoreUnavailable` for
    /// `reference`.
    Answer {
        session: SessionKey,
        frame: ServerFrame,
        reference: u64,
        /// The request was a send (its errors are counted by code).
        send: bool,
    },
    /// A send's `Sent` (new or a retry); `StoreUnavailable` if not durable.
    Sent {
        session: SessionKey,
        sent: ServerFrame,
        client_id: u64,
        received_at: Instant,
        fanout: Option<Fanout>,
    },
    /// A group change's answer and entry.
    Group {
        session: SessionKey,
        reply: ServerFrame,
        request: u32,
        fanout: Fanout,
    },
    /// A receipt that moved a cursor, and where to forward it.
    Receipt {
        session: SessionKey,
        forward: Vec<Forward>,
    },
    /// Frames for users' live sessions once the batch is durable (a
    /// settings change told to the user's other devices).
    Notify(Vec<Forward>),
    /// The key directory's answers and pushes (see `keys.rs`).
    Keys(keys::KeysPending),
    /// A command for another partition's router, sent once the batch is
    /// durable (dropped if it is not: the asker times out).
    Peer { partition: u16, command: Command },
}

/// A frame for every live session of `user` but `except_device`'s.
#[derive(Debug)]
struct Forward {
    user: Arc<str>,
    except_device: Option<u32>,
    frame: ServerFrame,
}

/// A Sync to serve after the commit.
#[derive(Debug)]
struct SyncRequest {
    session: SessionKey,
    device: Device,
    cursors: Vec<Cursor>,
    tail: u16,
    summary: bool,
}

/// What one batch has decided so far.
#[derive(Debug, Default)]
struct Batch {
    writes: WriteSet,
    pending: Vec<Pending>,
    syncs: Vec<SyncRequest>,
    /// Reads answered from the committed store (history, chat list,
    /// receipt summaries).
    queries: Vec<Query>,
    /// Receipts a send implies (a reply reads), told after its `Sent`.
    after_send: Vec<Forward>,
    /// Dedupe records written by this batch (the store cannot see them yet).
    dedupe: FxHashMap<Vec<u8>, DedupeRecord>,
    /// Users who spent a rate token on a write of this batch, refunded if
    /// the commit fails.
    spent: Vec<Arc<str>>,
    messages: u64,
    issued_ids: bool,
    /// Cursor keys this batch writes behind; dirty again if it fails.
    flushed_cursors: Vec<Vec<u8>>,
    /// One-time prekeys this batch handed out (deleted in its writes, still
    /// in the store until it commits), and the ones it uploaded.
    taken_prekeys: FxHashSet<Vec<u8>>,
    added_prekeys: FxHashSet<Vec<u8>>,
    /// Fleet mode: how this batch moved the numbers of messages between
    /// partitions, undone if it does not commit.
    peer_undo: Vec<peer::PeerUndo>,
}

/// Deliveries of one batch, grouped per core in the order they were made.
#[derive(Debug, Default)]
struct Outbox {
    per_core: FxHashMap<u16, Vec<Delivery>>,
    /// Commands for other partitions (fleet mode).
    peers: Vec<(u16, Command)>,
    /// Frames for other partitions' users, by their partition (fleet mode).
    relays: FxHashMap<u16, Relay>,
}

impl Outbox {
    fn push(&mut self, d: Delivery) {
        self.per_core.entry(d.session().core).or_default().push(d);
    }

    /// Hands `frame` for `user`'s sessions to the user's partition `to`.
    /// A frame relayed to several users of one partition travels once.
    #[allow(clippy::too_many_arguments)]
    fn relay(
        &mut self,
        to: u16,
        from: u16,
        user: &Arc<str>,
        devices: Devices,
        class: Class,
        origin: Option<Instant>,
        frame: &Bytes,
    ) {
        relay_to(
            self.relays.entry(to).or_default(),
            from,
            user,
            devices,
            class,
            origin,
            frame,
        );
    }

    /// Moves the relays into the commands for other partitions.
    fn seal_relays(&mut self) {
        for (to, relay) in self.relays.drain() {
            self.peers
                .push((to, Command::Peer(PeerMsg::Relay(Box::new(relay)))));
        }
    }

    fn reply(&mut self, session: SessionKey, frame: &ServerFrame) {
        self.push(Delivery::Frame {
            session,
            class: Class::Reply,
            frame: ws_frame(frame),
            origin: None,
        });
    }

    fn into_batches(self) -> Vec<(u16, Vec<Delivery>)> {
        let mut out: Vec<_> = self.per_core.into_iter().collect();
        out.sort_unstable_by_key(|(core, _)| *core);
        out
    }
}

/// Adds `frame` for `user` to `relay`, the frame itself only if it is not
/// the one added last (a frame fanned out to many users is added once).
#[allow(clippy::too_many_arguments)]
fn relay_to(
    relay: &mut Relay,
    from: u16,
    user: &Arc<str>,
    devices: Devices,
    class: Class,
    origin: Option<Instant>,
    frame: &Bytes,
) {
    relay.from = from;
    let same = relay
        .frames
        .last()
        .is_some_and(|last| last.as_ptr() == frame.as_ptr() && last.len() == frame.len());
    if !same {
        relay.frames.push(frame.clone());
    }
    relay.items.push(RelayItem {
        user: user.clone(),
        devices,
        class,
        origin,
        frame: (relay.frames.len() - 1) as u32,
    });
}

/// A frame the router sends: either family of server frames.
trait WireFrame {
    fn encode_to(&self, out: &mut Vec<u8>);
}

impl WireFrame for ServerFrame {
    fn encode_to(&self, out: &mut Vec<u8>) {
        self.encode(out);
    }
}

impl WireFrame for E2eeFrame {
    fn encode_to(&self, out: &mut Vec<u8>) {
        self.encode(out);
    }
}

/// Encodes `frame` as one complete WebSocket binary frame.
fn ws_frame(frame: &impl WireFrame) -> Bytes {
    let mut payload = Vec::with_capacity(64);
    frame.encode_to(&mut payload);
    let mut out = Vec::with_capacity(MAX_HEADER + payload.len());
    encode_frame(&mut out, Opcode::Binary, &payload, None);
    Bytes::from(out)
}

/// The higher of two cursors, field by field.
fn max_cursor(a: Cursors, b: Cursors) -> Cursors {
    Cursors {
        delivered: a.delivered.max(b.delivered),
        read: a.read.max(b.read),
        updated_ms: a.updated_ms.max(b.updated_ms),
    }
}

fn error_frame(code: ErrorCode, reference: u64, detail: String) -> ServerFrame {
    ServerFrame::Error {
        code: code as u16,
        reference,
        detail,
    }
}

impl RouterCore {
    /// Opens the store under `config.data_dir` and registers the router's
    /// metrics in `registry`. The config must be valid
    /// ([`RouterConfig::validate`]).
    pub fn open(config: RouterConfig, registry: &mut Registry) -> Result<Self, RouterError> {
        Self::open_on(config, None, registry)
    }

    /// Like [`RouterCore::open`], on `store` when given: the store already
    /// open under `config.data_dir` (a fleet takeover restores it and hands
    /// it over, since closing a store and opening it again costs a quarter
    /// of a second: fjall's drop waits out its monitor thread's tick).
    pub(crate) fn open_on(
        config: RouterConfig,
        store: Option<Store>,
        registry: &mut Registry,
    ) -> Result<Self, RouterError> {
        config.validate()?;
        let metrics = Metrics::register(registry);
        let path = config.data_dir.clone();
        let store_error = |source: Box<dyn std::error::Error + Send + Sync>| RouterError::Store {
            path: path.clone(),
            source,
        };
        let store = match store {
            Some(store) => store,
            None => {
                std::fs::create_dir_all(&config.data_dir).map_err(|e| store_error(Box::new(e)))?;
                Store::open_with(&config.data_dir, config.store)
                    .map_err(|e| store_error(Box::new(e)))?
            }
        };
        let high = store
            .server_id_high()
            .map_err(|e| store_error(Box::new(e)))?;
        let mut core = Self {
            ids: ServerIds::resume(config.node_id, high),
            recent: recent::Recent::new(config.recent_entries_bytes),
            push: push::PushState::new(config.push.clone()),
            config,
            store,
            metrics,
            conversations: FxHashMap::default(),
            routes: FxHashMap::default(),
            buckets: FxHashMap::default(),
            next_sweep_ms: None,
            last_failure_log_ms: None,
            last_reopen_ms: None,
            unsynced: Vec::new(),
            lazy_since_ms: None,
            next_batch: 0,
            cursor_cache: FxHashMap::default(),
            dirty_cursors: 0,
            dirty_order: std::collections::VecDeque::new(),
            batch_now_ms: 0,
            users: FxHashMap::default(),
            social: social::Social::default(),
            keys: keys::KeyDirectory::default(),
            peer: peer::PeerState::default(),
        };
        core.load_key_stock();
        core.load_push_queue();
        core.load_peer_state();
        Ok(core)
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Durable commits made since the store was opened (one fdatasync each).
    pub fn store_fsyncs(&self) -> u64 {
        self.store.fsyncs()
    }

    /// Test hook: commits of writes since the store was opened, synced or not.
    #[cfg(test)]
    pub(crate) fn store_writes(&self) -> u64 {
        self.store.commits
    }

    /// Test hook: the next `n` commits fail before anything reaches the
    /// journal, as a full disk would fail them.
    #[cfg(test)]
    pub(crate) fn fail_next_commits(&mut self, n: usize) {
        self.store.fail_commits = n;
    }

    /// Test hook: the device record the store holds (not the cache).
    #[cfg(test)]
    pub(crate) fn stored_device(
        &self,
        user: &str,
        device: u32,
    ) -> Option<crate::codec::DeviceRecord> {
        self.store.device(user, device).unwrap()
    }

    /// Test hook: the cursor record the store holds (not the cache).
    #[cfg(test)]
    pub(crate) fn stored_cursor(&self, user: &str, device: u32, conversation: &str) -> Cursors {
        self.store.cursors(user, device, conversation).unwrap()
    }

    /// Syncs the store to disk and closes it. In fleet mode, returns the
    /// written-behind records it flushed, encoded for the changelog.
    pub fn close(mut self) -> Option<Vec<u8>> {
        let mut writes = WriteSet::default();
        self.flush_cursors(&mut writes, u64::MAX, usize::MAX);
        self.flush_devices(&mut writes, usize::MAX);
        let encoded =
            (self.config.changelog.is_some() && !writes.is_empty()).then(|| writes.encode());
        if let Err(e) = self.store.commit(writes, false) {
            tracing::error!(error = %e, "writing delivery cursors at stop failed");
        }
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "store flush at stop failed");
        }
        encoded
    }

    /// Handles one batch at wall-clock time `now_ms` and returns what it
    /// produced, one list per gateway core, in order: [`Self::prepare`], one
    /// sync of the store, then [`Self::finish`].
    pub fn handle_batch(
        &mut self,
        commands: Vec<Command>,
        now_ms: u64,
    ) -> Vec<(u16, Vec<Delivery>)> {
        let written = self.prepare(commands, now_ms);
        let synced = if written.needs_sync() {
            let started = Instant::now();
            self.store.sync().map(|()| started.elapsed())
        } else {
            Ok(Duration::ZERO)
        };
        self.finish(written, synced)
    }

    /// Decides a batch and writes it to the store without syncing. Its
    /// writes are visible to the next batch's decisions at once; nothing it
    /// decided reaches a client until [`Self::finish`]. The router thread
    /// decides the next batch while this one is being synced.
    pub fn prepare(&mut self, commands: Vec<Command>, now_ms: u64) -> Written {
        self.batch_now_ms = now_ms;
        if !commands.is_empty() {
            self.metrics.batch_commands.observe(commands.len() as f64);
        }
        self.before_batch(now_ms);

        let mut batch = Batch::default();
        self.timers(&mut batch, now_ms);
        self.push_timers(&mut batch, now_ms);
        self.peer_timers(&mut batch, now_ms);
        for command in commands {
            self.decide(&mut batch, command, now_ms);
        }
        self.write_presence(&mut batch, now_ms);
        self.answer_peers(&mut batch);
        if batch.issued_ids {
            batch.writes.put(
                Part::Router,
                store::SERVER_ID_HIGH.to_vec(),
                self.ids.high().to_le_bytes().to_vec(),
            );
        }
        // Written-behind cursors need no sync of their own, as the sweep's
        // deletions: they were never promised durable (a crash loses the
        // last seconds of them either way, and the messages after the
        // stored cursor come again), and the next batch that syncs covers
        // them. A batch of receipts alone is then answered without an
        // fdatasync. So that a quiet node does not leave read cursors
        // unsynced for long (unread counts would come back after a crash),
        // any batch syncs once they have waited the flush interval. In
        // fleet mode every write goes to the changelog.
        let must_sync = !batch.writes.is_empty() || self.config.changelog.is_some();
        let due = now_ms.saturating_sub(CURSOR_FLUSH_INTERVAL_MS);
        batch.flushed_cursors = self.flush_cursors(&mut batch.writes, due, CURSOR_FLUSH_CHUNK);

        let writes = std::mem::take(&mut batch.writes);
        let id = self.next_batch;
        self.next_batch += 1;
        let wrote = !writes.is_empty();
        let lazy_due = self.lazy_since_ms.is_some_and(|since| since <= due);
        let sync = (wrote && must_sync) || lazy_due;
        if sync {
            self.lazy_since_ms = None;
        } else if wrote {
            self.lazy_since_ms.get_or_insert(now_ms);
        }
        let first_entries = writes.first_entries();
        let encoded = (wrote && self.config.changelog.is_some()).then(|| writes.encode());
        let writing = Instant::now();
        let committed = self.store.commit(writes, false);
        if wrote {
            self.metrics
                .write_duration
                .observe(writing.elapsed().as_secs_f64());
        }
        let write_failed = match committed {
            Ok(()) => false,
            Err(e) => {
                self.commit_failed(&e, now_ms);
                true
            }
        };
        if sync && !write_failed {
            self.unsynced.push((id, first_entries));
        }
        Written {
            id,
            batch,
            now_ms,
            sync,
            write_failed,
            encoded,
        }
    }

    /// Answers a prepared batch once the store sync that covers it is done:
    /// `synced` is how long the sync took, or why it failed. On success the
    /// batch's answers, fan-out and catch-up pages go out; on failure every
    /// answer becomes `StoreUnavailable` and the router's view is reloaded.
    pub fn finish(
        &mut self,
        written: Written,
        synced: Result<Duration, StoreError>,
    ) -> Vec<(u16, Vec<Delivery>)> {
        let Written {
            id,
            mut batch,
            now_ms,
            sync,
            write_failed,
            encoded: _,
        } = written;
        self.unsynced.retain(|(batch_id, _)| *batch_id != id);
        let committed = match synced {
            _ if write_failed => false,
            Ok(took) => {
                if sync {
                    self.metrics.commit_duration.observe(took.as_secs_f64());
                }
                true
            }
            Err(e) => {
                self.commit_failed(&e, now_ms);
                false
            }
        };
        if committed {
            self.metrics.messages_stored.inc_by(batch.messages);
            let buffered = self.store.write_buffer_bytes();
            self.metrics
                .store_write_buffer
                .set(i64::try_from(buffered).unwrap_or(i64::MAX));
        } else {
            self.after_failed_commit(&mut batch);
        }
        self.metrics
            .recent_entries_bytes
            .set(i64::try_from(self.recent.bytes()).unwrap_or(i64::MAX));

        let mut out = Outbox::default();
        for pending in batch.pending {
            self.answer(&mut out, pending, committed);
        }
        for sync in batch.syncs {
            self.catch_up(&mut out, sync, now_ms);
        }
        for query in batch.queries {
            self.query(&mut out, query);
        }
        out.seal_relays();
        self.peer.out.append(&mut out.peers);
        out.into_batches()
    }

    /// Fleet mode: a view of everything the store holds now, for a
    /// changelog snapshot written on another thread.
    pub(crate) fn store_snapshot(&self) -> Result<store::StoreSnapshot, StoreError> {
        self.store.snapshot()
    }

    /// A handle to sync the store from another thread; `None` while the
    /// store is closed after a failure.
    pub fn sync_handle(&self) -> Option<store::SyncHandle> {
        self.store.sync_handle()
    }

    /// Records a group's new member list as of entry `seq`, in the cache and
    /// in the batch's writes.
    fn set_members(&mut self, b: &mut Batch, conversation: &str, members: Arc<[Member]>, seq: u64) {
        if let Some(conv) = self.conversations.get_mut(conversation) {
            conv.members = members;
            conv.last_seq = seq;
            b.writes.put(
                Part::Conversations,
                conversation.as_bytes().to_vec(),
                conv.meta().encode(),
            );
        }
    }

    /// A device's cursors in a conversation: the cache's, else the store's.
    fn cursor(
        &self,
        key: &[u8],
        user: &str,
        device: u32,
        conversation: &str,
    ) -> Result<Cursors, StoreError> {
        match self.cursor_cache.get(key) {
            Some(c) => Ok(c.cursor),
            None => self.store.cursors(user, device, conversation),
        }
    }

    /// The user's cursors in a conversation: the highest, field by field,
    /// over its own record (device 0: what its sends implied) and the
    /// cursors of every device it has a record of, linked or not, so it
    /// never goes back. Receipts move only the device's cursor, so a
    /// receipt costs one cursor write, not two. Cursors read from the store
    /// stay in the cache (clean), so the next derivation reads none.
    fn user_cursor(&mut self, user: &Arc<str>, conversation: &str) -> Result<Cursors, StoreError> {
        Ok(self.user_and_device_cursor(user, 0, conversation)?.0)
    }

    /// [`Self::user_cursor`], and the cursor of `device` with its key.
    fn user_and_device_cursor(
        &mut self,
        user: &Arc<str>,
        device: u32,
        conversation: &str,
    ) -> Result<(Cursors, Cursors, Vec<u8>), StoreError> {
        // Device numbers copied out, so the cache can be filled below.
        let mut numbers = [0u32; 8];
        let mut n = 1;
        let mut more = Vec::new();
        for (d, _) in &self.user_state(user)?.devices {
            match numbers.get_mut(n) {
                Some(slot) => *slot = *d,
                None => more.push(*d),
            }
            n += 1;
        }
        // One key buffer, its device number rewritten for each device.
        let mut key = store::cursor_key(user, 0, conversation);
        let at = store::cursor_key_device_at(user);
        let mut user_cursor = Cursors::default();
        let mut mine = None;
        let listed = numbers.iter().take(n).chain(more.iter());
        for &d in listed.chain(std::iter::once(&device).filter(|d| **d != 0)) {
            if mine.is_some() && d == device {
                continue;
            }
            key[at..at + 4].copy_from_slice(&d.to_be_bytes());
            let c = match self.cursor_cache.get(&key) {
                Some(c) => c.cursor,
                None => {
                    let c = self.store.cursors(user, d, conversation)?;
                    let clean = CachedCursor {
                        cursor: c,
                        dirty: false,
                    };
                    self.cursor_cache.insert(key.clone(), clean);
                    c
                }
            };
            if d == device {
                mine = Some(c);
            }
            user_cursor = max_cursor(user_cursor, c);
        }
        key[at..at + 4].copy_from_slice(&device.to_be_bytes());
        Ok((user_cursor, mine.unwrap_or_default(), key))
    }

    /// Adds to `writes` up to `limit` cursors that became dirty at or
    /// before `due_ms`, oldest first; returns their keys. Drops the cache
    /// once it is large and nothing in it is dirty.
    fn flush_cursors(&mut self, writes: &mut WriteSet, due_ms: u64, limit: usize) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        while keys.len() < limit {
            match self.dirty_order.front() {
                Some((since, _)) if *since <= due_ms => {}
                _ => break,
            }
            let Some((_, key)) = self.dirty_order.pop_front() else {
                break;
            };
            let Some(c) = self.cursor_cache.get_mut(&key).filter(|c| c.dirty) else {
                continue;
            };
            c.dirty = false;
            self.dirty_cursors -= 1;
            writes.put(Part::Cursors, key.clone(), c.cursor.encode());
            keys.push(key);
        }
        if self.dirty_cursors == 0 && self.cursor_cache.len() > CURSOR_CACHE_LIMIT {
            self.cursor_cache.clear();
        }
        keys
    }

    /// The highest sequence of `conversation` that catch-up may show: below
    /// the first entry any unsynced batch wrote.
    fn durable_until(&self, conversation: &str, until: u64) -> u64 {
        self.unsynced
            .iter()
            .filter_map(|(_, first)| first.get(conversation))
            .fold(until, |until, first| until.min(first.saturating_sub(1)))
    }

    // ----- batch bookkeeping -----

    fn before_batch(&mut self, now_ms: u64) {
        if self.conversations.len() > CONVERSATION_CACHE_LIMIT {
            self.conversations.clear();
        }
        // A store closed after failures is reopened once its interval is
        // up, even by a batch that only reads (catch-up after a full disk
        // was freed must not wait for somebody's send to fail first).
        if self.store.is_closed() {
            self.reopen_if_due(now_ms);
        }
        match self.next_sweep_ms {
            None => self.next_sweep_ms = Some(now_ms + SWEEP_INTERVAL_MS),
            Some(at) if now_ms >= at => self.sweep(now_ms),
            Some(_) => {}
        }
    }

    /// Counts and logs (rate-limited) a failed write or sync.
    fn commit_failed(&mut self, e: &StoreError, now_ms: u64) {
        self.metrics.commit_failures.inc();
        // The store may have lost entries the recent ones hold, and the
        // sequences after them will be given again.
        self.recent.clear();
        let quiet = self
            .last_failure_log_ms
            .is_some_and(|at| now_ms < at + FAILURE_LOG_INTERVAL_MS);
        if !quiet {
            tracing::error!(error = %e, "store write or sync failed; the batch's sends are refused");
            self.last_failure_log_ms = Some(now_ms);
        }
    }

    /// Puts the router's view back in line with the store after a commit
    /// that did not happen: the conversation cache (sequence counters,
    /// members) is dropped and reloads from disk, the store is reopened
    /// (fjall refuses all writes after a failed sync), and spent rate
    /// tokens are given back. Server ids are not reused: a gap in them is
    /// harmless.
    fn after_failed_commit(&mut self, batch: &mut Batch) {
        self.conversations.clear();
        self.keys_after_failed_commit();
        self.undo_peer(std::mem::take(&mut batch.peer_undo));
        for key in &batch.flushed_cursors {
            if let Some(c) = self.cursor_cache.get_mut(key).filter(|c| !c.dirty) {
                c.dirty = true;
                self.dirty_cursors += 1;
                self.dirty_order.push_front((0, key.clone()));
            }
        }
        if !self.reopen_if_due(self.batch_now_ms) {
            // Until the next reopening every commit fails at once.
            self.store.close_after_failure();
        }
        let burst = self.config.send_burst;
        for user in &batch.spent {
            if let Some(bucket) = self.buckets.get_mut(user) {
                bucket.refund(burst);
            }
        }
    }

    /// Reopens the store unless it was reopened less than
    /// [`REOPEN_INTERVAL_MS`] ago; true when it tried.
    fn reopen_if_due(&mut self, now_ms: u64) -> bool {
        let due = self
            .last_reopen_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= REOPEN_INTERVAL_MS);
        if due {
            self.last_reopen_ms = Some(now_ms);
            if let Err(e) = self.store.reopen() {
                tracing::error!(error = %e, "store reopen after a failure failed; retrying");
            }
        }
        due
    }

    /// Drops expired dedupe records and refilled rate buckets.
    fn sweep(&mut self, now_ms: u64) {
        self.next_sweep_ms = Some(now_ms + SWEEP_INTERVAL_MS);
        let (rate, burst) = (self.config.send_rate_per_s, self.config.send_burst);
        self.buckets.retain(|_, b| !b.is_full(now_ms, rate, burst));
        self.sweep_typing(now_ms);
        self.sweep_archives(now_ms);

        let cutoff = now_ms.saturating_sub(self.config.dedupe_window.as_millis() as u64);
        let expired = match self.store.expired_dedupe(cutoff, SWEEP_LIMIT) {
            Ok(expired) => expired,
            Err(e) => {
                tracing::warn!(error = %e, "dedupe sweep could not read the store");
                return;
            }
        };
        if expired.len() == SWEEP_LIMIT {
            // More than one sweep's worth: continue at the next batch.
            self.next_sweep_ms = Some(now_ms);
        }
        let mut writes = WriteSet::default();
        for e in expired {
            // A record rewritten after it expired has a newer time and its
            // own index entry; only the stale index entry goes.
            if let Ok(Some(record)) = self.store.dedupe(&e.key) {
                if record.stored_at_ms == e.stored_at_ms {
                    writes.remove(Part::Dedupe, e.key);
                }
            }
            writes.remove(Part::DedupeByTime, e.index_key);
        }
        // Deletions need no sync of their own: the next batch's sync covers
        // them, and losing them in a crash only delays the sweep.
        if let Err(e) = self.store.commit(writes, false) {
            tracing::warn!(error = %e, "dedupe sweep commit failed");
        }
    }

    // ----- step 1: decide -----

    fn decide(&mut self, b: &mut Batch, command: Command, now_ms: u64) {
        let Some(command) = self.park_if_remote(b, command, now_ms) else {
            return;
        };
        match command {
            Command::Peer(msg) => self.peer_message(b, msg, now_ms),
            Command::Attach {
                session,
                device,
                issued_at_s,
            } => self.attach(b, session, device, issued_at_s, now_ms),
            Command::Detach {
                session,
                device,
                last_seen_ms,
            } => self.detach(session, &device, last_seen_ms, now_ms),
            Command::Push(outcome) => self.push_outcome(b, outcome),
            Command::Frame {
                session,
                device,
                frame,
                received_at,
            } => match frame {
                ClientFrame::Send {
                    conversation,
                    client_id,
                    body,
                } => self.hold_send(
                    b,
                    session,
                    &device,
                    &conversation,
                    client_id,
                    Body::Common(body),
                    received_at,
                    now_ms,
                ),
                ClientFrame::SendPerDevice {
                    conversation,
                    client_id,
                    ciphertexts,
                } => self.hold_send(
                    b,
                    session,
                    &device,
                    &conversation,
                    client_id,
                    Body::PerDevice(ciphertexts),
                    received_at,
                    now_ms,
                ),
                ClientFrame::KeysUpload {
                    request,
                    identity,
                    signed_prekey,
                    signed_prekey_signature,
                    last_resort,
                    last_resort_signature,
                    one_time,
                } => self.keys_upload(
                    b,
                    session,
                    &device,
                    keys::Upload {
                        request,
                        identity,
                        signed_prekey,
                        signed_prekey_signature,
                        last_resort,
                        last_resort_signature,
                        one_time,
                    },
                ),
                ClientFrame::BundleFetch { request, user } => {
                    self.bundle_fetch(b, session, &device, request, user)
                }
                ClientFrame::KeyCount { request } => self.key_count(b, session, &device, request),
                ClientFrame::ArchiveUpload {
                    request,
                    device: target,
                    archive,
                } => self.archive_upload(b, session, &device, request, target, archive),
                ClientFrame::ArchiveFetch { request } => {
                    self.archive_fetch(b, session, &device, request)
                }
                ClientFrame::PushRegister {
                    request,
                    provider,
                    token,
                    ciphertext,
                } => {
                    let record = crate::push::TokenRecord {
                        provider,
                        token,
                        ciphertext,
                        registered_ms: now_ms,
                    };
                    self.push_register(b, session, &device, request, record)
                }
                ClientFrame::PushUnregister { request } => {
                    self.push_unregister(b, session, &device, request)
                }
                ClientFrame::Delivered { conversation, seq } => {
                    self.receipt(
                        b,
                        session,
                        &device,
                        &conversation,
                        seq,
                        ReceiptKind::Delivered,
                    );
                }
                ClientFrame::Read { conversation, seq } => {
                    self.receipt(b, session, &device, &conversation, seq, ReceiptKind::Read);
                }
                ClientFrame::Sync {
                    tail,
                    summary,
                    cursors,
                } => {
                    if self.is_home(&device.user) {
                        if !self.is_routed(&device, session) {
                            // Refused at its attach (unlinked, over the
                            // limit) or replaced since: it is being closed,
                            // and gets nothing to catch up on.
                            return;
                        }
                        self.set_live(&device, session, false);
                        self.relay_sync(&device, session, &cursors, tail, summary, received_at);
                    }
                    self.push_synced(b, &device);
                    b.syncs.push(SyncRequest {
                        session,
                        device,
                        cursors,
                        tail,
                        summary,
                    });
                }
                ClientFrame::History {
                    request,
                    conversation,
                    before_seq,
                    limit,
                } => b.queries.push(Query::History {
                    session,
                    device,
                    request,
                    conversation,
                    before_seq,
                    limit,
                }),
                ClientFrame::ChatList {
                    request,
                    before_ms,
                    before_conversation,
                    limit,
                } => b.queries.push(Query::ChatList {
                    session,
                    device,
                    request,
                    before_ms,
                    before_conversation,
                    limit,
                }),
                ClientFrame::ReceiptQuery {
                    request,
                    conversation,
                    seq,
                } => b.queries.push(Query::Receipts {
                    session,
                    device,
                    request,
                    conversation,
                    seq,
                }),
                ClientFrame::Typing {
                    conversation,
                    active,
                } => self.typing(b, session, &device, &conversation, active, now_ms),
                ClientFrame::PresenceQuery { request, users } => {
                    self.presence_query(b, session, request, users, false)
                }
                ClientFrame::PresenceSubscribe { request, users } => {
                    self.presence_query(b, session, request, users, true)
                }
                ClientFrame::Settings {
                    request,
                    mask,
                    flags,
                } => self.settings(b, session, &device, request, mask, flags),
                ClientFrame::DeviceList { request } => {
                    self.device_list(b, session, &device, request)
                }
                ClientFrame::DeviceRemove {
                    request,
                    device: target,
                } => self.device_remove(b, session, &device, request, target, now_ms),
                ClientFrame::GroupCreate { request, members } => {
                    let result =
                        self.group_create(b, &device, request, members, received_at, now_ms);
                    self.hold_group(b, session, request, result);
                }
                ClientFrame::GroupAdd {
                    request,
                    conversation,
                    members,
                } => {
                    let result = self.group_add(
                        b,
                        &device,
                        request,
                        &conversation,
                        members,
                        received_at,
                        now_ms,
                    );
                    self.hold_group(b, session, request, result);
                }
                ClientFrame::GroupRemove {
                    request,
                    conversation,
                    members,
                } => {
                    let result = self.group_remove(
                        b,
                        &device,
                        request,
                        &conversation,
                        members,
                        received_at,
                        now_ms,
                    );
                    self.hold_group(b, session, request, result);
                }
                ClientFrame::GroupMembers {
                    request,
                    conversation,
                } => {
                    let frame = match self.group_members(&device, &conversation) {
                        Ok(members) => ServerFrame::Members {
                            request,
                            conversation,
                            members,
                        },
                        Err(r) => error_frame(r.code, u64::from(request), r.detail),
                    };
                    b.pending.push(Pending::Answer {
                        session,
                        frame,
                        reference: u64::from(request),
                        send: false,
                    });
                }
                ClientFrame::Ping { nonce } => {
                    b.pending.push(Pending::Always(reply(
                        session,
                        &ServerFrame::Pong { nonce },
                    )));
                }
                ClientFrame::Refresh { .. } => {
                    // Tokens are the gateway's business; a refresh that
                    // reaches the router has nothing to change here.
                    tracing::debug!("router ignores a refresh frame");
                }
            },
        }
    }

    /// Decides a send of either kind and holds its answer.
    #[allow(clippy::too_many_arguments)]
    fn hold_send(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        conversation: &str,
        client_id: u64,
        body: Body,
        received_at: Instant,
        now_ms: u64,
    ) {
        self.metrics
            .queue_wait_duration
            .observe(received_at.elapsed().as_secs_f64());
        match self.send(
            b,
            device,
            conversation,
            client_id,
            body,
            received_at,
            now_ms,
        ) {
            Ok((fanout, sent)) => {
                b.pending.push(Pending::Sent {
                    session,
                    sent,
                    client_id,
                    received_at,
                    fanout,
                });
                if !b.after_send.is_empty() {
                    let implied = std::mem::take(&mut b.after_send);
                    b.pending.push(Pending::Notify(implied));
                }
            }
            Err(Reject {
                mismatch: Some(m), ..
            }) => b.pending.push(Pending::Keys(keys::KeysPending::Mismatch {
                session,
                client_id,
                missing: m.missing,
                stale: m.stale,
            })),
            Err(reject) => b.pending.push(Pending::Answer {
                session,
                frame: error_frame(reject.code, client_id, reject.detail),
                reference: client_id,
                send: true,
            }),
        }
    }

    /// Fleet mode: hands a catch-up request of a session of this
    /// partition's user to every other partition, which serves its own
    /// conversations' share to the session directly. Sent once this batch
    /// is decided, so after the session's route here exists: whatever
    /// another partition stores after it read its share is relayed here
    /// and finds the route.
    fn relay_sync(
        &mut self,
        device: &Device,
        session: SessionKey,
        cursors: &[Cursor],
        tail: u16,
        summary: bool,
        received_at: Instant,
    ) {
        let Some((mine, n)) = self.config.partition else {
            return;
        };
        for p in (0..n).filter(|p| *p != mine) {
            let frame = ClientFrame::Sync {
                tail,
                summary,
                cursors: cursors.to_vec(),
            };
            let command = Command::Frame {
                session,
                device: device.clone(),
                frame,
                received_at,
            };
            self.peer.out.push((p, command));
        }
    }

    /// True when `session` is `device`'s attached session here.
    fn is_routed(&self, device: &Device, session: SessionKey) -> bool {
        self.routes.get(&device.user).is_some_and(|routes| {
            routes
                .iter()
                .any(|r| r.device == device.device && r.session == session)
        })
    }

    fn set_live(&mut self, device: &Device, session: SessionKey, live: bool) {
        if let Some(routes) = self.routes.get_mut(&device.user) {
            for r in routes
                .iter_mut()
                .filter(|r| r.device == device.device && r.session == session)
            {
                r.live = live;
            }
        }
    }

    fn count_send_error(&self, code: ErrorCode) {
        self.metrics
            .send_errors
            .get_or_create(&CodeLabel { code: code.name() })
            .inc();
    }

    /// Loads `id` into the cache if the store has it; true when it exists
    /// (in the cache after this call).
    fn load(&mut self, id: &str) -> Result<bool, StoreError> {
        if self.conversations.contains_key(id) {
            return Ok(true);
        }
        let Some(meta) = self.store.conversation(id)? else {
            return Ok(false);
        };
        let (last_seq, last_ms, last_sender) = match self.store.last_entry(id)? {
            Some((seq, e)) => (seq, e.timestamp_ms, e.sender),
            // No entry, or a corrupt last one (logged): the sequence still
            // continues after it.
            None => (self.store.last_seq(id)?, 0, meta.creator.clone()),
        };
        let conv = Conversation {
            kind: meta.kind,
            creator: meta.creator,
            members: meta.members.into(),
            last_seq,
            last_ms,
            last_sender,
            stored: true,
        };
        self.conversations.insert(id.into(), conv);
        Ok(true)
    }

    /// Takes a rate token from `user`, refusing with the time to wait.
    fn take_token(&mut self, b: &mut Batch, user: &Arc<str>, now_ms: u64) -> Result<(), Reject> {
        let (rate, burst) = (self.config.send_rate_per_s, self.config.send_burst);
        let bucket = self
            .buckets
            .entry(user.clone())
            .or_insert_with(|| TokenBucket::full(burst, now_ms));
        match bucket.take(now_ms, rate, burst) {
            Ok(()) => {
                b.spent.push(user.clone());
                Ok(())
            }
            Err(wait_ms) => Err(Reject::new(
                ErrorCode::RateLimited,
                format!("send rate exceeded; retry in {wait_ms} ms"),
            )),
        }
    }

    /// Writes entry `seq` of `conversation`, and keeps it in the recent
    /// entries: if the batch's write or sync fails, they are cleared.
    fn write_entry(&mut self, b: &mut Batch, conversation: &str, seq: u64, entry: &StoredEntry) {
        b.writes.put(
            Part::Entries,
            store::entry_key(conversation, seq),
            entry.encode(),
        );
        self.recent.insert(conversation, seq, entry);
    }

    /// Validates, dedupes and sequences a send. `Ok` holds the fan-out (none
    /// for a retry) and the `Sent` frame.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        b: &mut Batch,
        device: &Device,
        conversation: &str,
        client_id: u64,
        body: Body,
        received_at: Instant,
        now_ms: u64,
    ) -> Result<(Option<Fanout>, ServerFrame), Reject> {
        let user = &device.user;
        let size = match &body {
            Body::Common(b) => b.len(),
            Body::PerDevice(list) => list.iter().map(|c| c.body.len()).sum(),
        };
        if size > self.config.max_body {
            let detail = format!(
                "body is {size} bytes; the limit is {}",
                self.config.max_body
            );
            return Err(Reject::new(ErrorCode::BodyTooLarge, detail));
        }
        let kind = ids::parse_conversation(conversation)
            .ok_or_else(|| Reject::new(ErrorCode::BadRequest, "malformed conversation id"))?;

        // A retry gets the original answer, whatever changed since.
        let dedupe_key = store::dedupe_key(user, device.device, client_id);
        let window_ms = self.config.dedupe_window.as_millis() as u64;
        let original = match b.dedupe.get(&dedupe_key) {
            Some(record) => Some(record.clone()),
            None => self
                .store
                .dedupe(&dedupe_key)?
                .filter(|r| r.stored_at_ms.saturating_add(window_ms) > now_ms),
        };
        if let Some(r) = original {
            let sent = ServerFrame::Sent {
                client_id,
                conversation: r.conversation.to_string(),
                seq: r.seq,
                server_id: r.server_id,
                timestamp_ms: r.timestamp_ms,
            };
            return Ok((None, sent));
        }

        if let IdKind::Direct(a, b_user) = kind {
            if **user != *a && **user != *b_user {
                return Err(Reject::new(
                    ErrorCode::NotMember,
                    "not a participant of this direct conversation",
                ));
            }
            if !self.load(conversation)? {
                let members: Arc<[Member]> = [a, b_user]
                    .iter()
                    .map(|u| Member {
                        user: Arc::from(*u),
                        join_seq: 1,
                    })
                    .collect();
                // Normally 0; read anyway so that a conversation whose
                // metadata record was lost or corrupt continues its
                // sequence instead of overwriting its entries.
                let last_seq = self.store.last_seq(conversation)?;
                let conv = Conversation {
                    kind: ConversationKind::Direct,
                    creator: user.clone(),
                    members,
                    last_seq,
                    last_ms: 0,
                    last_sender: user.clone(),
                    stored: false,
                };
                self.conversations.insert(conversation.into(), conv);
            }
        } else if !self.load(conversation)? {
            return Err(Reject::new(
                ErrorCode::UnknownConversation,
                "no such conversation",
            ));
        }
        let is_member = self
            .conversations
            .get(conversation)
            .is_some_and(|c| c.is_member(user));
        if !is_member {
            return Err(Reject::new(
                ErrorCode::NotMember,
                "not a member of this conversation",
            ));
        }
        let (body, per_device) = match body {
            Body::Common(body) => (body, None),
            Body::PerDevice(ciphertexts) => {
                let members: Vec<Arc<str>> = self
                    .conversations
                    .get(conversation)
                    .map(|c| c.members.iter().map(|m| m.user.clone()).collect())
                    .unwrap_or_default();
                self.check_devices(device, &members, &ciphertexts)?;
                let list: DeviceBodies = ciphertexts
                    .into_iter()
                    .map(|c| (Arc::from(c.user), c.device, c.body))
                    .collect();
                (Bytes::new(), Some(list))
            }
        };
        self.take_token(b, user, now_ms)?;

        let server_id = self.ids.next(now_ms);
        b.issued_ids = true;
        let Some(conv) = self.conversations.get_mut(conversation) else {
            return Err(Reject::new(
                ErrorCode::UnknownConversation,
                "no such conversation",
            ));
        };
        // What came just before this message: a reply to the other
        // participant's message reads it.
        let replied_to = (conv.kind == ConversationKind::Direct && conv.last_sender != *user)
            .then(|| (conv.last_sender.clone(), conv.last_seq));
        conv.last_seq += 1;
        conv.last_ms = now_ms;
        conv.last_sender = user.clone();
        let seq = conv.last_seq;
        if !conv.stored {
            conv.stored = true;
            b.writes.put(
                Part::Conversations,
                conversation.as_bytes().to_vec(),
                conv.meta().encode(),
            );
            for m in conv.members.iter() {
                let membership = Membership {
                    join_seq: 1,
                    left_seq: 0,
                };
                b.writes.put(
                    Part::Memberships,
                    store::membership_key(&m.user, conversation),
                    membership.encode(),
                );
            }
        }
        let recipients = conv.members.clone();

        let entry = StoredEntry {
            kind: EntryKind::Message,
            server_id,
            timestamp_ms: now_ms,
            sender: user.clone(),
            sender_device: device.device,
            client_id,
            body,
            per_device: per_device.clone(),
        };
        self.write_entry(b, conversation, seq, &entry);
        self.push_message(b, conversation, seq, &recipients, &entry);
        let record = DedupeRecord {
            conversation: Arc::from(conversation),
            seq,
            server_id,
            timestamp_ms: now_ms,
            stored_at_ms: now_ms,
        };
        b.writes
            .put(Part::Dedupe, dedupe_key.clone(), record.encode());
        b.writes.put(
            Part::DedupeByTime,
            store::dedupe_time_key(now_ms, &dedupe_key),
            Vec::new(),
        );
        b.dedupe.insert(dedupe_key, record);
        b.messages += 1;
        // The message ends its sender's typing, and replying marks what came
        // before it read.
        self.typing_ends(conversation, user, device.device);
        self.auto_read(b, device, conversation, seq, replied_to);

        let sent = ServerFrame::Sent {
            client_id,
            conversation: conversation.to_owned(),
            seq,
            server_id,
            timestamp_ms: now_ms,
        };
        let push = self.relay_push(conversation, seq, &entry, &recipients);
        let fanout = Fanout {
            message: message_frame(conversation, seq, &entry),
            recipients,
            sender: user.clone(),
            sender_device: device.device,
            origin: received_at,
            per_device,
            push,
        };
        Ok((Some(fanout), sent))
    }

    fn receipt(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        conversation: &str,
        seq: u64,
        kind: ReceiptKind,
    ) {
        match self.receipt_inner(device, conversation, seq, kind) {
            Ok(CursorMove::Unchanged) => {}
            Ok(CursorMove::Moved { forward }) => {
                self.push_receipt(b, device, conversation, seq, kind);
                b.pending.push(Pending::Receipt { session, forward })
            }
            Err(r) => b.pending.push(Pending::Answer {
                session,
                frame: error_frame(r.code, 0, r.detail),
                reference: 0,
                send: false,
            }),
        }
    }

    /// Moves a device's cursor; says whether it moved and where to forward
    /// the receipt.
    fn receipt_inner(
        &mut self,
        device: &Device,
        conversation: &str,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<CursorMove, Reject> {
        let user = &device.user;
        let bad = |detail: &str| Reject::new(ErrorCode::BadRequest, detail);
        if ids::parse_conversation(conversation).is_none() {
            return Err(bad("malformed conversation id"));
        }
        if seq == 0 {
            return Err(bad("sequence must be at least 1"));
        }
        if !self.load(conversation)? {
            return Err(bad("not a member of this conversation"));
        }
        let Some(conv) = self.conversations.get(conversation) else {
            return Err(bad("not a member of this conversation"));
        };
        let (limit, direct, other) = if conv.is_member(user) {
            let other = conv
                .members
                .iter()
                .find(|m| m.user != *user)
                .map(|m| m.user.clone());
            (conv.last_seq, conv.kind == ConversationKind::Direct, other)
        } else {
            // A former member may acknowledge up to its removal.
            match self.store.membership(user, conversation)? {
                Some(m) if m.left_seq > 0 => (m.left_seq, false, None),
                _ => return Err(bad("not a member of this conversation")),
            }
        };
        if seq > limit {
            return Err(bad("sequence is beyond the conversation's last entry"));
        }

        let now_ms = self.batch_now_ms;
        // The user's cursor is the highest over its devices (and what its
        // sends implied): a message delivered to one device is delivered to
        // the user, and a read on one device is a read on all of them. It
        // is derived, not written (see `user_cursor`).
        let (old_user, old, key) =
            self.user_and_device_cursor(user, device.device, conversation)?;
        let mut new = old;
        match kind {
            ReceiptKind::Delivered => new.delivered = new.delivered.max(seq),
            ReceiptKind::Read => {
                // What was read was delivered.
                new.read = new.read.max(seq);
                new.delivered = new.delivered.max(new.read);
            }
        }
        if (new.delivered, new.read) == (old.delivered, old.read) {
            return Ok(CursorMove::Unchanged);
        }
        new.updated_ms = now_ms;
        self.set_cursor(key, new);
        let listed = self
            .users
            .get(user)
            .is_some_and(|s| s.devices.iter().any(|(d, _)| *d == device.device));
        let user_cursor = max_cursor(old_user, new);
        let mut forward = Vec::new();
        if (user_cursor.delivered, user_cursor.read) == (old_user.delivered, old_user.read) {
            return Ok(CursorMove::Moved { forward });
        }
        if !listed {
            // A device the store has no record of (let in while the store
            // was unreadable) is not part of the derivation: its progress
            // goes into the user's own record.
            let user_key = store::cursor_key(user, 0, conversation);
            let own = self.cursor(&user_key, user, 0, conversation)?;
            self.set_cursor(user_key, max_cursor(own, new));
        }

        let receipt = |kind: ReceiptKind, seq: u64| ServerFrame::Receipt {
            conversation: conversation.to_owned(),
            seq,
            user: user.to_string(),
            device: device.device,
            kind,
        };
        let read_moved = user_cursor.read > old_user.read;
        if read_moved {
            forward.push(Forward {
                user: user.clone(),
                except_device: Some(device.device),
                frame: receipt(ReceiptKind::Read, user_cursor.read),
            });
        }
        // Groups get no per-member pushes: their senders ask for the
        // aggregate (`ReceiptQuery`).
        if let (true, Some(other)) = (direct, other) {
            let read_told =
                read_moved && self.read_receipts_on(user)? && self.read_receipts_on(&other)?;
            if read_told {
                forward.push(Forward {
                    user: other.clone(),
                    except_device: None,
                    frame: receipt(ReceiptKind::Read, user_cursor.read),
                });
            }
            let delivered_moved = user_cursor.delivered > old_user.delivered;
            if delivered_moved && !(read_told && user_cursor.read >= user_cursor.delivered) {
                forward.push(Forward {
                    user: other,
                    except_device: None,
                    frame: receipt(ReceiptKind::Delivered, user_cursor.delivered),
                });
            }
        }
        Ok(CursorMove::Moved { forward })
    }

    /// Puts a cursor in the cache and marks it for the write-behind.
    fn set_cursor(&mut self, key: Vec<u8>, cursor: Cursors) {
        // One lookup; a key already waiting for the write-behind (the
        // common case for a busy conversation) costs no copies.
        let cached = match self.cursor_cache.entry(key) {
            std::collections::hash_map::Entry::Occupied(at) => {
                if !at.get().dirty {
                    self.dirty_order
                        .push_back((self.batch_now_ms, at.key().clone()));
                }
                at.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(at) => {
                self.dirty_order
                    .push_back((self.batch_now_ms, at.key().clone()));
                at.insert(CachedCursor {
                    cursor,
                    dirty: false,
                })
            }
        };
        if !cached.dirty {
            cached.dirty = true;
            self.dirty_cursors += 1;
        }
        cached.cursor = cursor;
    }

    /// A send marks its conversation read up to the message for its user
    /// (replying means having read): the user's read cursor moves, for
    /// unread counts. When the message replies to an unread message of the
    /// other participant of a direct conversation, that participant is told
    /// of the read (after the message, once the batch is durable); the
    /// user's other devices infer it from the message itself.
    fn auto_read(
        &mut self,
        b: &mut Batch,
        device: &Device,
        conversation: &str,
        seq: u64,
        replied_to: Option<(Arc<str>, u64)>,
    ) {
        let Ok(user_cursor) = self.user_cursor(&device.user, conversation) else {
            return;
        };
        if user_cursor.read >= seq {
            return;
        }
        let old_read = user_cursor.read;
        // No device read it: the user's own record (device 0) holds it.
        let key = store::cursor_key(&device.user, 0, conversation);
        let Ok(mut cursor) = self.cursor(&key, &device.user, 0, conversation) else {
            return;
        };
        cursor.read = seq;
        cursor.updated_ms = self.batch_now_ms;
        self.set_cursor(key, cursor);
        let Some((peer, before)) = replied_to else {
            return;
        };
        let told = old_read < before
            && self.read_receipts_on(&device.user).unwrap_or(false)
            && self.read_receipts_on(&peer).unwrap_or(false);
        if told {
            b.after_send.push(Forward {
                user: peer,
                except_device: None,
                frame: ServerFrame::Receipt {
                    conversation: conversation.to_owned(),
                    seq,
                    user: device.user.to_string(),
                    device: device.device,
                    kind: ReceiptKind::Read,
                },
            });
        }
    }

    fn hold_group(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        request: u32,
        result: Result<GroupChange, Reject>,
    ) {
        match result {
            Ok(GroupChange::Entry { reply, fanout }) => b.pending.push(Pending::Group {
                session,
                reply,
                request,
                fanout,
            }),
            Ok(GroupChange::Nothing) => b.pending.push(Pending::Answer {
                session,
                frame: ServerFrame::Done { request },
                reference: u64::from(request),
                send: false,
            }),
            Err(r) => b.pending.push(Pending::Answer {
                session,
                frame: error_frame(r.code, u64::from(request), r.detail),
                reference: u64::from(request),
                send: false,
            }),
        }
    }

    /// Validates a member list from a client: non-empty, valid ids, without
    /// repeats (first occurrence kept).
    fn member_list(members: Vec<String>) -> Result<Vec<Arc<str>>, Reject> {
        if members.is_empty() {
            return Err(Reject::new(ErrorCode::BadRequest, "member list is empty"));
        }
        let mut seen = FxHashSet::default();
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            if !ids::is_valid_user_id(&m) {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "invalid user id in member list",
                ));
            }
            if seen.insert(m.clone()) {
                out.push(Arc::from(m));
            }
        }
        Ok(out)
    }

    fn group_create(
        &mut self,
        b: &mut Batch,
        device: &Device,
        request: u32,
        members: Vec<String>,
        received_at: Instant,
        now_ms: u64,
    ) -> Result<GroupChange, Reject> {
        let creator = &device.user;
        let named = Self::member_list(members)?;
        let mut all = Vec::with_capacity(named.len() + 1);
        all.push(creator.clone());
        all.extend(named.into_iter().filter(|m| m != creator));
        if all.len() > self.config.max_group_members {
            let detail = format!(
                "a group has at most {} members",
                self.config.max_group_members
            );
            return Err(Reject::new(ErrorCode::GroupFull, detail));
        }
        let id = self.new_group_id()?;
        self.take_token(b, creator, now_ms)?;
        let members: Arc<[Member]> = all
            .iter()
            .map(|u| Member {
                user: u.clone(),
                join_seq: 1,
            })
            .collect();
        let conv = Conversation {
            kind: ConversationKind::Group,
            creator: creator.clone(),
            members: members.clone(),
            last_seq: 1,
            last_ms: now_ms,
            last_sender: creator.clone(),
            stored: true,
        };
        b.writes.put(
            Part::Conversations,
            id.as_bytes().to_vec(),
            conv.meta().encode(),
        );
        for m in members.iter() {
            let membership = Membership {
                join_seq: 1,
                left_seq: 0,
            };
            b.writes.put(
                Part::Memberships,
                store::membership_key(&m.user, &id),
                membership.encode(),
            );
        }
        self.conversations.insert(id.as_str().into(), conv);

        let fanout = self.membership_entry(
            b,
            device,
            &id,
            1,
            EntryKind::MembersAdded,
            &all,
            members,
            received_at,
            now_ms,
        );
        Ok(GroupChange::Entry {
            reply: ServerFrame::GroupCreated {
                request,
                conversation: id,
                seq: 1,
            },
            fanout,
        })
    }

    /// Picks a group number no conversation has; in fleet mode one whose
    /// id falls in this router's partition, so the group is ordered here.
    fn new_group_id(&mut self) -> Result<String, Reject> {
        let (mine, partitions) = self.config.partition.unwrap_or((0, 1));
        // Each try lands in this partition with probability 1/partitions.
        let tries = 8 * usize::from(partitions.max(1));
        for _ in 0..tries {
            let n = getrandom::u64().map_err(|e| {
                tracing::error!(error = %e, "the system random source failed");
                Reject::new(
                    ErrorCode::Unavailable,
                    "could not pick a group id; retry later",
                )
            })?;
            let id = ids::group_conversation(n);
            if crate::fleet::partition_of(&id, partitions) != mine {
                continue;
            }
            if !self.conversations.contains_key(id.as_str())
                && self.store.conversation(&id)?.is_none()
            {
                return Ok(id);
            }
        }
        Err(Reject::new(
            ErrorCode::Unavailable,
            "could not pick a group id; retry later",
        ))
    }

    /// Loads a group for a change by `user`, who must be a current member.
    fn group_for_change(&mut self, conversation: &str, user: &str) -> Result<(), Reject> {
        match ids::parse_conversation(conversation) {
            None => {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "malformed conversation id",
                ))
            }
            Some(IdKind::Direct(..)) => {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "a direct conversation's members are fixed",
                ));
            }
            Some(IdKind::Group(_)) => {}
        }
        if !self.load(conversation)? {
            return Err(Reject::new(
                ErrorCode::UnknownConversation,
                "no such conversation",
            ));
        }
        match self.conversations.get(conversation) {
            Some(conv) if conv.is_member(user) => Ok(()),
            _ => Err(Reject::new(
                ErrorCode::NotMember,
                "not a member of this conversation",
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn group_add(
        &mut self,
        b: &mut Batch,
        device: &Device,
        request: u32,
        conversation: &str,
        members: Vec<String>,
        received_at: Instant,
        now_ms: u64,
    ) -> Result<GroupChange, Reject> {
        let named = Self::member_list(members)?;
        self.group_for_change(conversation, &device.user)?;
        let (current, last_seq) = match self.conversations.get(conversation) {
            Some(conv) => (conv.members.clone(), conv.last_seq),
            None => {
                return Err(Reject::new(
                    ErrorCode::UnknownConversation,
                    "no such conversation",
                ))
            }
        };
        let added: Vec<Arc<str>> = named
            .into_iter()
            .filter(|u| !current.iter().any(|m| m.user == *u))
            .collect();
        if added.is_empty() {
            return Ok(GroupChange::Nothing);
        }
        if current.len() + added.len() > self.config.max_group_members {
            let detail = format!(
                "a group has at most {} members",
                self.config.max_group_members
            );
            return Err(Reject::new(ErrorCode::GroupFull, detail));
        }
        self.take_token(b, &device.user, now_ms)?;

        let seq = last_seq + 1;
        let mut next: Vec<Member> = current.to_vec();
        next.extend(added.iter().map(|u| Member {
            user: u.clone(),
            join_seq: seq,
        }));
        let next: Arc<[Member]> = next.into();
        for u in &added {
            let membership = Membership {
                join_seq: seq,
                left_seq: 0,
            };
            b.writes.put(
                Part::Memberships,
                store::membership_key(u, conversation),
                membership.encode(),
            );
        }
        self.set_members(b, conversation, next.clone(), seq);
        let fanout = self.membership_entry(
            b,
            device,
            conversation,
            seq,
            EntryKind::MembersAdded,
            &added,
            next,
            received_at,
            now_ms,
        );
        Ok(GroupChange::Entry {
            reply: ServerFrame::Done { request },
            fanout,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn group_remove(
        &mut self,
        b: &mut Batch,
        device: &Device,
        request: u32,
        conversation: &str,
        members: Vec<String>,
        received_at: Instant,
        now_ms: u64,
    ) -> Result<GroupChange, Reject> {
        let named = Self::member_list(members)?;
        self.group_for_change(conversation, &device.user)?;
        let (current, last_seq, creator) = match self.conversations.get(conversation) {
            Some(conv) => (conv.members.clone(), conv.last_seq, conv.creator.clone()),
            None => {
                return Err(Reject::new(
                    ErrorCode::UnknownConversation,
                    "no such conversation",
                ))
            }
        };
        let removed: Vec<Arc<str>> = named
            .into_iter()
            .filter(|u| current.iter().any(|m| m.user == *u))
            .collect();
        if removed.iter().any(|u| *u != device.user) && device.user != creator {
            return Err(Reject::new(
                ErrorCode::NotMember,
                "only the group's creator can remove other members",
            ));
        }
        if removed.is_empty() {
            return Ok(GroupChange::Nothing);
        }
        self.take_token(b, &device.user, now_ms)?;

        let seq = last_seq + 1;
        let next: Arc<[Member]> = current
            .iter()
            .filter(|m| !removed.contains(&m.user))
            .cloned()
            .collect();
        for m in current.iter().filter(|m| removed.contains(&m.user)) {
            let membership = Membership {
                join_seq: m.join_seq,
                left_seq: seq,
            };
            b.writes.put(
                Part::Memberships,
                store::membership_key(&m.user, conversation),
                membership.encode(),
            );
        }
        self.set_members(b, conversation, next, seq);
        // The removed members receive the entry that removes them.
        let fanout = self.membership_entry(
            b,
            device,
            conversation,
            seq,
            EntryKind::MembersRemoved,
            &removed,
            current,
            received_at,
            now_ms,
        );
        Ok(GroupChange::Entry {
            reply: ServerFrame::Done { request },
            fanout,
        })
    }

    /// Writes a membership entry and returns its fan-out.
    #[allow(clippy::too_many_arguments)]
    fn membership_entry(
        &mut self,
        b: &mut Batch,
        device: &Device,
        conversation: &str,
        seq: u64,
        kind: EntryKind,
        changed: &[Arc<str>],
        recipients: Arc<[Member]>,
        received_at: Instant,
        now_ms: u64,
    ) -> Fanout {
        let server_id = self.ids.next(now_ms);
        b.issued_ids = true;
        if let Some(conv) = self.conversations.get_mut(conversation) {
            conv.last_ms = now_ms;
            conv.last_sender = device.user.clone();
        }
        let entry = StoredEntry {
            kind,
            server_id,
            timestamp_ms: now_ms,
            sender: device.user.clone(),
            sender_device: device.device,
            client_id: 0,
            body: Bytes::from(encode_members(changed)),
            per_device: None,
        };
        self.write_entry(b, conversation, seq, &entry);
        Fanout {
            message: message_frame(conversation, seq, &entry),
            recipients,
            sender: device.user.clone(),
            sender_device: device.device,
            origin: received_at,
            per_device: None,
            push: None,
        }
    }

    fn group_members(
        &mut self,
        device: &Device,
        conversation: &str,
    ) -> Result<Vec<String>, Reject> {
        match ids::parse_conversation(conversation) {
            None => Err(Reject::new(
                ErrorCode::BadRequest,
                "malformed conversation id",
            )),
            Some(IdKind::Direct(a, b)) => {
                if *device.user == *a || *device.user == *b {
                    Ok(vec![a.to_owned(), b.to_owned()])
                } else {
                    Err(Reject::new(
                        ErrorCode::NotMember,
                        "not a participant of this direct conversation",
                    ))
                }
            }
            Some(IdKind::Group(_)) => {
                if !self.load(conversation)? {
                    return Err(Reject::new(
                        ErrorCode::UnknownConversation,
                        "no such conversation",
                    ));
                }
                match self.conversations.get(conversation) {
                    Some(conv) if conv.is_member(&device.user) => {
                        Ok(conv.members.iter().map(|m| m.user.to_string()).collect())
                    }
                    _ => Err(Reject::new(
                        ErrorCode::NotMember,
                        "not a member of this conversation",
                    )),
                }
            }
        }
    }

    // ----- step 3: answer -----

    fn answer(&self, out: &mut Outbox, pending: Pending, committed: bool) {
        match pending {
            Pending::Always(delivery) => out.push(delivery),
            Pending::Peer { partition, command } => {
                if committed {
                    out.peers.push((partition, command));
                }
            }
            Pending::Answer {
                session,
                frame,
                reference,
                send,
            } => {
                if committed {
                    if let (true, ServerFrame::Error { code, .. }) = (send, &frame) {
                        if let Some(code) = ErrorCode::from_u16(*code) {
                            self.count_send_error(code);
                        }
                    }
                    out.reply(session, &frame);
                } else {
                    if send {
                        self.count_send_error(ErrorCode::StoreUnavailable);
                    }
                    let detail = "not handled: the store is unavailable; retry".to_owned();
                    out.reply(
                        session,
                        &error_frame(ErrorCode::StoreUnavailable, reference, detail),
                    );
                }
            }
            Pending::Sent {
                session,
                sent,
                client_id,
                received_at,
                fanout,
            } => {
                if committed {
                    out.reply(session, &sent);
                    self.metrics
                        .sent_ack_duration
                        .observe(received_at.elapsed().as_secs_f64());
                    if let Some(f) = fanout {
                        self.fan_out(out, &f);
                    }
                } else {
                    self.count_send_error(ErrorCode::StoreUnavailable);
                    let detail = "message not stored; retry with the same client id".to_owned();
                    out.reply(
                        session,
                        &error_frame(ErrorCode::StoreUnavailable, client_id, detail),
                    );
                }
            }
            Pending::Group {
                session,
                reply,
                request,
                fanout,
            } => {
                if committed {
                    out.reply(session, &reply);
                    self.fan_out(out, &fanout);
                } else {
                    let detail = "change not stored; retry".to_owned();
                    out.reply(
                        session,
                        &error_frame(ErrorCode::StoreUnavailable, u64::from(request), detail),
                    );
                }
            }
            Pending::Receipt { session, forward } => {
                if !committed {
                    let detail = "receipt not stored; send it again".to_owned();
                    out.reply(
                        session,
                        &error_frame(ErrorCode::StoreUnavailable, 0, detail),
                    );
                } else {
                    self.forward(out, &forward);
                }
            }
            Pending::Notify(forward) => {
                if committed {
                    self.forward(out, &forward);
                }
            }
            Pending::Keys(p) => self.answer_keys(out, p, committed),
        }
    }

    /// Queues each forwarded frame on every attached session it names,
    /// live or still catching up: receipts and settings are states, not
    /// sequenced entries, so one that arrives mid catch-up is simply
    /// applied, and a session attached after its catch-up summary was
    /// read must not miss it.
    fn forward(&self, out: &mut Outbox, forward: &[Forward]) {
        for f in forward {
            let mut bytes: Option<Bytes> = None;
            if let Some((home, mine)) = self.elsewhere(&f.user) {
                let devices = f.except_device.map_or(Devices::All, Devices::Except);
                let frame = bytes.get_or_insert_with(|| ws_frame(&f.frame));
                out.relay(home, mine, &f.user, devices, Class::Message, None, frame);
                continue;
            }
            for r in self.routes.get(&f.user).into_iter().flatten() {
                if Some(r.device) == f.except_device {
                    continue;
                }
                let frame = bytes.get_or_insert_with(|| ws_frame(&f.frame)).clone();
                out.push(Delivery::Frame {
                    session: r.session,
                    class: Class::Message,
                    frame,
                    origin: None,
                });
            }
        }
    }

    /// Sends one entry to every live session of its recipients but the
    /// device that made it. The frame is encoded once and shared.
    fn fan_out(&self, out: &mut Outbox, f: &Fanout) {
        let mut bytes: Option<Bytes> = None;
        let mut push_to: Vec<(u16, Arc<str>)> = Vec::new();
        for member in f.recipients.iter() {
            if let Some((home, mine)) = self.elsewhere(&member.user) {
                let sender = member.user == f.sender;
                if f.push.is_some() && !sender {
                    push_to.push((home, member.user.clone()));
                }
                let origin = Some(f.origin);
                match &f.per_device {
                    Some(list) => {
                        for (_, device, body) in list.iter().filter(|(u, d, _)| {
                            *u == member.user && !(sender && *d == f.sender_device)
                        }) {
                            let frame = ws_frame(&with_body(&f.message, body.clone()));
                            let devices = Devices::Only(*device);
                            let user = &member.user;
                            out.relay(home, mine, user, devices, Class::Message, origin, &frame);
                        }
                    }
                    None => {
                        let devices = if sender {
                            Devices::Except(f.sender_device)
                        } else {
                            Devices::All
                        };
                        let frame = bytes.get_or_insert_with(|| ws_frame(&f.message));
                        let user = &member.user;
                        out.relay(home, mine, user, devices, Class::Message, origin, frame);
                    }
                }
                continue;
            }
            for r in self.routes.get(&member.user).into_iter().flatten() {
                if !r.live || (member.user == f.sender && r.device == f.sender_device) {
                    continue;
                }
                let frame = match &f.per_device {
                    Some(list) => ws_frame(&with_body(
                        &f.message,
                        body_in(list, &member.user, r.device),
                    )),
                    None => bytes.get_or_insert_with(|| ws_frame(&f.message)).clone(),
                };
                out.push(Delivery::Frame {
                    session: r.session,
                    class: Class::Message,
                    frame,
                    origin: Some(f.origin),
                });
            }
        }
        if let Some(push) = &f.push {
            push_to.sort_unstable();
            push_to.dedup();
            for (home, users) in push_to.chunk_by(|a, b| a.0 == b.0).map(|c| {
                let users: Vec<Arc<str>> = c.iter().map(|(_, u)| u.clone()).collect();
                (c[0].0, users)
            }) {
                let relay = out.relays.entry(home).or_default();
                relay.push.push(RelayPush {
                    users,
                    ..push.clone()
                });
            }
        }
    }

    /// Fleet mode: `(the user's partition, this one)` when `user`'s
    /// partition is another one, which holds the user's routes and gets
    /// the user's frames relayed; `None` on a single node and for this
    /// partition's own users.
    fn elsewhere(&self, user: &str) -> Option<(u16, u16)> {
        let (mine, n) = self.config.partition?;
        let home = crate::fleet::partition_of(user, n);
        (home != mine).then_some((home, mine))
    }
}

/// What a receipt did to its device's cursor.
#[derive(Debug)]
enum CursorMove {
    /// The cursor was already there or beyond.
    Unchanged,
    /// The cursor moved; `forward` says whom to tell what.
    Moved { forward: Vec<Forward> },
}

/// What a group request changed.
#[derive(Debug)]
enum GroupChange {
    /// Nothing to change (every named member already in, or already out).
    Nothing,
    /// A membership entry was written; `reply` goes to the requester.
    Entry { reply: ServerFrame, fanout: Fanout },
}

fn reply(session: SessionKey, frame: &ServerFrame) -> Delivery {
    Delivery::Frame {
        session,
        class: Class::Reply,
        frame: ws_frame(frame),
        origin: None,
    }
}

/// A message's body for one send: one for all, or one per device.
#[derive(Debug)]
enum Body {
    Common(Bytes),
    PerDevice(Vec<DeviceCiphertext>),
}

/// `user`'s `device`'s ciphertext in a per-device send (empty if none).
fn body_in(list: &DeviceBodies, user: &str, device: u32) -> Bytes {
    list.iter()
        .find(|(u, d, _)| **u == *user && *d == device)
        .map(|(_, _, b)| b.clone())
        .unwrap_or_default()
}

/// `message` (a `Message` frame) with its body replaced.
fn with_body(message: &ServerFrame, body: Bytes) -> ServerFrame {
    let mut m = message.clone();
    if let ServerFrame::Message { body: b, .. } = &mut m {
        *b = body;
    }
    m
}

/// The `Message` frame of entry `seq` as `device` receives it.
fn message_frame_for(
    conversation: &str,
    seq: u64,
    e: &StoredEntry,
    device: &Device,
) -> ServerFrame {
    let mut m = message_frame(conversation, seq, e);
    if e.per_device.is_some() {
        if let ServerFrame::Message { body, .. } = &mut m {
            *body = e.body_for(&device.user, device.device);
        }
    }
    m
}

fn message_frame(conversation: &str, seq: u64, e: &StoredEntry) -> ServerFrame {
    ServerFrame::Message {
        conversation: conversation.to_owned(),
        seq,
        server_id: e.server_id,
        timestamp_ms: e.timestamp_ms,
        kind: e.kind,
        sender: e.sender.to_string(),
        sender_device: e.sender_device,
        client_id: e.client_id,
        body: e.body.clone(),
    }
}

/// The dedupe window's shortest allowed length.
pub const MIN_DEDUPE_WINDOW: Duration = Duration::from_secs(24 * 3600);
