//! Courier's embedded message service: the router.
//!
//! The router runs inside the gateway process on one thread of its own and
//! owns everything about messages: it validates sends (membership, body
//! size, per-user rate), dedupes retries by (user, device, client id),
//! assigns each message its per-conversation sequence, server id and
//! timestamp, makes it durable in an embedded fjall store, and only then
//! acks `Sent` and fans the message out to the recipients' live sessions.
//! It also keeps receipt cursors, runs groups, and serves catch-up.
//!
//! ```text
//!  gateway cores ──submit(Command)──► channel ──► router thread
//!                                                   │  recv, then drain up to max_batch
//!                                                   │  decide every command (one write set)
//!                                                   │  commit + one fdatasync  (group commit)
//!                                                   │  answers and fan-out, then catch-up pages
//!  gateway cores ◄──Outlet::deliver(core, Vec)──────┘  once per core per batch
//! ```
//!
//! Commands that arrive while a batch is being synced form the next batch,
//! so under load many sends share one fdatasync.
//!
//! It also keeps the key directory for end-to-end encryption (identity
//! keys, signed prekeys, one-time prekeys handed out once) and relays
//! per-device ciphertexts and history archives it cannot read.
//!
//! It schedules push notifications for devices without a live session and
//! hands them to a push worker thread that speaks to the providers
//! ([`push`]).
//!
//! What it does not do: sockets or tokens (the gateway's). In fleet mode
//! ([`fleet`]) the same core runs once per partition, its batches made
//! durable in a JetStream changelog instead of the local journal; see
//! `docs/router.md` and `docs/architecture.md` for the design and its
//! known limits.
//!
//! [`RouterCore`] is the logic without the thread, for tests and benches;
//! [`Router::start`] wraps it in the thread and hands out [`RouterHandle`]s.

#![forbid(unsafe_code)]

pub mod api;
mod codec;
mod core;
pub mod fleet;
mod metrics;
mod partition_metrics;
pub mod push;
mod rate;
mod server_id;
pub mod snapshot;
mod store;
pub mod wire;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_protocol::frame::ClientFrame;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use prometheus_client::registry::Registry;

pub use crate::core::RouterCore;
pub use crate::store::{Compaction, StoreLimits};

/// The router's settings. Every field has a default ([`Default`]); a value
/// out of range stops the start with [`RouterError::Config`] naming it.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Where the store lives (created if missing).
    pub data_dir: PathBuf,
    /// How much memory the store may hold (each partition's store, in a
    /// fleet router).
    pub store: StoreLimits,
    /// This node's number in server ids, 0 to 1023.
    pub node_id: u16,
    /// Largest message body accepted, in bytes.
    pub max_body: usize,
    /// Most members a group may have, its creator included.
    pub max_group_members: usize,
    /// Sends per second a user may keep up (all devices together).
    pub send_rate_per_s: f64,
    /// Sends a user may make at once before the rate applies.
    pub send_burst: f64,
    /// How long a client id is remembered for dedupe; at least 24 hours.
    pub dedupe_window: Duration,
    /// Most entries one catch-up page carries.
    pub sync_page: usize,
    /// Most body bytes one catch-up page carries (a page always carries at
    /// least one entry), so a page fits in a session's outbound queue.
    pub sync_page_bytes: usize,
    /// Bytes of the newest entries kept in memory, so that catch-up and
    /// history read them without a range read of the store (a returning
    /// device usually asks for the last few minutes); 0 keeps none. In a
    /// fleet router, per partition it serves.
    pub recent_entries_bytes: usize,
    /// Most commands handled by one batch (one commit).
    pub max_batch: usize,
    /// Commands waiting for the router beyond which sends are refused.
    pub max_inflight: usize,
    /// How long an idle router waits after a first command for more to
    /// join its batch. Fewer, larger batches mean fewer fsyncs and fewer
    /// thread wake-ups per message, for at most this much added latency.
    pub batch_linger: Duration,
    /// Single node: fsync each batch on a thread of its own while the
    /// router thread decides the next (a pipeline one batch deep) instead
    /// of in the router thread between batches. The pipeline overlaps
    /// deciding with a slow fsync; it costs two thread hand-offs per
    /// batch, which on a machine of few busy CPUs cost more than a fast
    /// fsync (docs/benchmarks.md). Fleet mode always appends to its
    /// changelog on a thread of its own: an append is a network round.
    pub sync_thread: bool,
    /// Most linked devices a user may have.
    pub max_devices: usize,
    /// How long a typing indicator lasts unless renewed.
    pub typing_ttl: Duration,
    /// Typing events per second a user may keep up, and at once.
    pub typing_rate_per_s: f64,
    pub typing_burst: f64,
    /// How long a user with no session left stays online to its
    /// subscribers, so a quick reconnect (a flap) is never announced.
    pub presence_debounce: Duration,
    /// Most device presence records (last seen) written per second; a mass
    /// disconnect is written at this rate, not all at once.
    pub presence_writes_per_s: f64,
    /// Most users one session may subscribe to for presence.
    pub max_presence_subscriptions: usize,
    /// Most entries one history or chat-list page carries.
    pub history_page: usize,
    /// A device whose one-time prekeys fall below this many is told so
    /// (a pushed `KeyCount`), so it uploads more.
    pub prekey_low_threshold: u32,
    /// Most one-time prekeys a device may have stored.
    pub max_prekeys: u32,
    /// Largest history archive accepted, in bytes (it must also fit one
    /// WebSocket message: `max_body` + 1024 with the frame's fields).
    pub archive_max_bytes: usize,
    /// How long a history archive waits for its device before the sweep
    /// deletes it.
    pub archive_ttl: Duration,
    /// Fleet mode: every batch's writes are appended to this changelog,
    /// and its answers wait for the log's acknowledgement instead of a
    /// local fdatasync (the local store becomes a cache the log can
    /// rebuild). `None`, the single node: the store's own journal is the
    /// durable log.
    pub changelog: Option<fleet::Changelog>,
    /// Fleet mode: this router's partition and the partition count; new
    /// groups get ids in this partition.
    pub partition: Option<(u16, u16)>,
    /// Push notifications (off unless a provider is configured).
    pub push: push::PushConfig,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            store: StoreLimits::default(),
            node_id: 0,
            max_body: 65_536,
            max_group_members: 512,
            send_rate_per_s: 50.0,
            send_burst: 100.0,
            dedupe_window: Duration::from_secs(7 * 24 * 3600),
            sync_page: 500,
            sync_page_bytes: 256 * 1024,
            recent_entries_bytes: 32 << 20,
            max_batch: 4096,
            max_inflight: 100_000,
            batch_linger: Duration::ZERO,
            sync_thread: false,
            max_devices: 4,
            typing_ttl: Duration::from_secs(6),
            typing_rate_per_s: 2.0,
            typing_burst: 10.0,
            presence_debounce: Duration::from_secs(5),
            presence_writes_per_s: 2_000.0,
            max_presence_subscriptions: 16,
            history_page: 200,
            prekey_low_threshold: 10,
            max_prekeys: 1000,
            archive_max_bytes: 65_536,
            archive_ttl: Duration::from_secs(24 * 3600),
            changelog: None,
            partition: None,
            push: push::PushConfig::default(),
        }
    }
}

impl RouterConfig {
    /// Checks every value, naming the first one out of range.
    pub fn validate(&self) -> Result<(), RouterError> {
        let bad = |key: &'static str, reason: &str| {
            Err(RouterError::Config {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.node_id > server_id::MAX_NODE_ID {
            return bad("node_id", "must be at most 1023 (10 bits of the server id)");
        }
        if self.max_body == 0 || self.max_body > u32::MAX as usize {
            return bad("max_body", "must be between 1 and 4294967295 bytes");
        }
        if self.max_group_members < 2 || self.max_group_members > usize::from(u16::MAX) {
            return bad("max_group_members", "must be between 2 and 65535");
        }
        if !(self.send_rate_per_s.is_finite() && self.send_rate_per_s > 0.0) {
            return bad("send_rate_per_s", "must be a positive number");
        }
        if !(self.send_burst.is_finite() && self.send_burst >= 1.0) {
            return bad("send_burst", "must be at least 1");
        }
        if self.max_devices == 0 || self.max_devices > 64 {
            return bad("max_devices", "must be between 1 and 64");
        }
        if self.typing_ttl < Duration::from_secs(1) || self.typing_ttl > Duration::from_secs(60) {
            return bad("typing_ttl", "must be between 1 and 60 seconds");
        }
        if !(self.typing_rate_per_s.is_finite() && self.typing_rate_per_s > 0.0) {
            return bad("typing_rate_per_s", "must be a positive number");
        }
        if !(self.typing_burst.is_finite() && self.typing_burst >= 1.0) {
            return bad("typing_burst", "must be at least 1");
        }
        if self.presence_debounce > Duration::from_secs(300) {
            return bad("presence_debounce", "must be at most 300 seconds");
        }
        if !(self.presence_writes_per_s.is_finite() && self.presence_writes_per_s >= 1.0) {
            return bad("presence_writes_per_s", "must be at least 1");
        }
        if self.max_presence_subscriptions == 0 || self.max_presence_subscriptions > 1024 {
            return bad("max_presence_subscriptions", "must be between 1 and 1024");
        }
        if self.history_page == 0 || self.history_page > usize::from(u16::MAX) {
            return bad("history_page", "must be between 1 and 65535");
        }
        if self.max_prekeys == 0 || self.max_prekeys > 100_000 {
            return bad("max_prekeys", "must be between 1 and 100000");
        }
        if self.prekey_low_threshold > self.max_prekeys {
            return bad("prekey_low_threshold", "must be at most max_prekeys");
        }
        if self.archive_max_bytes == 0 || self.archive_max_bytes > u32::MAX as usize {
            return bad(
                "archive_max_bytes",
                "must be between 1 and 4294967295 bytes",
            );
        }
        if self.archive_ttl < Duration::from_secs(60) {
            return bad("archive_ttl", "must be at least a minute");
        }
        if self.dedupe_window < core::MIN_DEDUPE_WINDOW {
            return bad(
                "dedupe_window",
                "must be at least 24 hours, to cover clients that retry after a day offline",
            );
        }
        if self.sync_page == 0 {
            return bad("sync_page", "must be at least 1");
        }
        if self.sync_page_bytes == 0 {
            return bad("sync_page_bytes", "must be at least 1");
        }
        if self.max_batch == 0 {
            return bad("max_batch", "must be at least 1");
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be at least 1");
        }
        if let Err((key, reason)) = self.push.validate() {
            return bad(key, reason);
        }
        Ok(())
    }
}

/// Why the router did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// A config value is out of range.
    #[error("router config `{key}` {reason}")]
    Config { key: &'static str, reason: String },
    /// The store could not be opened.
    #[error("cannot open the store at {}: {source}", path.display())]
    Store {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The router thread could not be started.
    #[error("cannot start the router thread: {0}")]
    Spawn(std::io::Error),
}

/// The router refused a command: too many are queued, or it is stopping.
/// The gateway answers a refused send with an `Unavailable` (504) error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("router overloaded or stopping")]
pub struct Overloaded;

/// Starts routers.
#[derive(Debug)]
pub struct Router;

impl Router {
    /// Opens the store, registers the metrics in `registry` and starts the
    /// router thread, which hands its deliveries to `outlet`.
    pub fn start(
        config: RouterConfig,
        outlet: Arc<dyn api::Outlet>,
        registry: &mut Registry,
    ) -> Result<RouterHandle, RouterError> {
        Self::start_on(config, None, outlet, registry)
    }

    /// Like [`Router::start`], on `store` when given (already open under
    /// `config.data_dir`: a fleet takeover's restored store).
    pub(crate) fn start_on(
        config: RouterConfig,
        store: Option<store::Store>,
        outlet: Arc<dyn api::Outlet>,
        registry: &mut Registry,
    ) -> Result<RouterHandle, RouterError> {
        let mut core = RouterCore::open_on(config.clone(), store, registry)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let depth = Arc::new(AtomicUsize::new(0));
        let push_metrics = push::PushMetrics::register(registry);
        if config.push.any_enabled() {
            // Outcomes come back as commands, counted like any other.
            let (push_tx, push_depth) = (tx.clone(), depth.clone());
            let sink: push::OutcomeSink = Arc::new(move |outcome| {
                push_depth.fetch_add(1, Ordering::Relaxed);
                if push_tx
                    .send(Msg::Command(api::Command::Push(outcome)))
                    .is_err()
                {
                    push_depth.fetch_sub(1, Ordering::Relaxed);
                }
            });
            let jobs = push::Worker::start(config.push.clone(), push_metrics.clone(), sink)
                .map_err(|reason| RouterError::Config {
                    key: "push",
                    reason,
                })?;
            core.set_push(jobs, push_metrics);
        }
        // The changelog sequence of the last batch appended, kept by the
        // syncer thread.
        let appended = Arc::new(AtomicU64::new(
            config.changelog.as_ref().map_or(0, |c| c.last),
        ));
        let worker = Worker {
            core,
            changelog: config.changelog.clone(),
            appended: appended.clone(),
            rx,
            outlet,
            depth: depth.clone(),
            max_batch: config.max_batch,
            linger: config.batch_linger,
            sync_thread: config.sync_thread,
        };
        let thread = std::thread::Builder::new()
            .name("courier-router".into())
            .spawn(move || worker.run())
            .map_err(RouterError::Spawn)?;
        tracing::info!(
            router.data_dir = %config.data_dir.display(),
            router.node_id = config.node_id,
            router.max_batch = config.max_batch,
            "router started"
        );
        let thread_id = thread.thread().id();
        Ok(RouterHandle {
            shared: Arc::new(Shared {
                tx,
                depth,
                max_inflight: config.max_inflight,
                closed: AtomicBool::new(false),
                thread: Mutex::new(Some(thread)),
                thread_id,
                appended,
            }),
        })
    }
}

/// Submits commands to a running router. Cheap to clone (one shared
/// pointer); every gateway core keeps one.
#[derive(Clone, Debug)]
pub struct RouterHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    tx: Sender<Msg>,
    /// Commands submitted and not yet taken by the router thread.
    depth: Arc<AtomicUsize>,
    max_inflight: usize,
    closed: AtomicBool,
    /// Taken and joined by the first `shutdown`.
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: std::thread::ThreadId,
    /// Fleet mode: the sequence of the changelog's last record as this
    /// router wrote it (the fence of its next append).
    appended: Arc<AtomicU64>,
}

impl RouterHandle {
    /// Queues `cmd` for the router; never blocks. A `Send` frame is refused
    /// with [`Overloaded`] when `max_inflight` commands are already queued;
    /// other commands (attach, detach, receipts, catch-up, groups) are
    /// always taken. Everything is refused once the router is stopping.
    pub fn submit(&self, cmd: api::Command) -> Result<(), Overloaded> {
        let shared = &*self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(Overloaded);
        }
        let is_send = matches!(
            cmd,
            api::Command::Frame {
                frame: ClientFrame::Send { .. },
                ..
            }
        );
        if is_send && shared.depth.load(Ordering::Relaxed) >= shared.max_inflight {
            return Err(Overloaded);
        }
        shared.depth.fetch_add(1, Ordering::Relaxed);
        shared.tx.send(Msg::Command(cmd)).map_err(|_| {
            shared.depth.fetch_sub(1, Ordering::Relaxed);
            Overloaded
        })
    }

    /// Fleet mode: the sequence of the last changelog record this router
    /// appended, or the log's last when it took the partition over and
    /// has not appended since. An append in flight is not counted until
    /// it is answered.
    pub fn changelog_last(&self) -> u64 {
        self.shared.appended.load(Ordering::Acquire)
    }

    /// True once the router thread has ended: after [`Self::shutdown`], or
    /// in fleet mode after a changelog append failed.
    pub fn is_stopped(&self) -> bool {
        match self.shared.thread.lock() {
            Ok(guard) => guard.as_ref().is_none_or(JoinHandle::is_finished),
            Err(_) => true,
        }
    }

    /// Stops the router: refuses new commands, handles those already
    /// queued, commits, syncs the store and joins the thread. Idempotent;
    /// a second call waits for the first to finish.
    pub fn shutdown(&self) {
        let shared = &*self.shared;
        shared.closed.store(true, Ordering::Release);
        let mut thread = match shared.thread.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(handle) = thread.take() else { return };
        // The thread is still running (we hold its handle), so the
        // receiver is alive; a failed send means it already exited.
        let _ = shared.tx.send(Msg::Shutdown);
        if std::thread::current().id() == shared.thread_id {
            // Called from the router thread itself (an outlet calling
            // back): it stops after this batch; joining would deadlock.
            return;
        }
        if handle.join().is_err() {
            tracing::error!("router thread panicked");
        }
    }
}

/// How long an idle router waits before running its timers anyway.
const TICK_INTERVAL: Duration = Duration::from_millis(250);

/// What travels to the router thread.
#[derive(Debug)]
enum Msg {
    Command(api::Command),
    Shutdown,
}

/// The router thread's state: the core and its channel ends.
struct Worker {
    core: RouterCore,
    changelog: Option<fleet::Changelog>,
    appended: Arc<AtomicU64>,
    rx: Receiver<Msg>,
    outlet: Arc<dyn api::Outlet>,
    depth: Arc<AtomicUsize>,
    max_batch: usize,
    linger: Duration,
    sync_thread: bool,
}

impl Worker {
    /// The router loop, pipelined one batch deep: while the syncer thread
    /// fsyncs batch n, this thread drains and decides batch n+1 (writing it
    /// to the store unsynced); then it answers batch n, and hands n+1 to the
    /// syncer. A batch's answers, fan-out and catch-up go out only after the
    /// sync that covers it, so SENT still means durable, and the fsync no
    /// longer stops the deciding.
    fn run(mut self) {
        let queue_depth = self.core.metrics().queue_depth.clone();
        let changelog = self.changelog.clone();
        let fleet = changelog.is_some();
        let appended = self.appended.clone();
        if !fleet && !self.sync_thread {
            return self.run_inline();
        }
        let mut snapshots = changelog
            .as_ref()
            .filter(|c| c.snapshot_min_bytes != u64::MAX)
            .map(|c| {
                let metrics = self.core.metrics().snapshots.clone();
                snapshot::Snapshots::new(c, c.snapshot_min_bytes, metrics)
            });
        let syncer = match Syncer::spawn(changelog, appended.clone()) {
            Ok(s) => s,
            Err(e) if !fleet => {
                tracing::error!(error = %e, "router syncer thread failed to start; syncing inline");
                return self.run_inline();
            }
            Err(e) => {
                tracing::error!(error = %e, "router syncer thread failed to start; partition not served");
                return;
            }
        };
        let mut in_flight: Option<core::Written> = None;
        let mut stopping = false;
        // Fleet mode: a batch the changelog refused (another owner fenced
        // us out) or may not have taken leaves the local store ahead of the
        // log; this router stops serving and the next owner replays.
        let mut poisoned = false;
        loop {
            // Block for work only when no batch waits on a sync.
            let batch = self.take_batch(in_flight.is_none() && !stopping, &mut stopping);
            queue_depth.set(self.depth.load(Ordering::Relaxed) as i64);
            // An empty batch with nothing in flight is the idle tick: the
            // router's timers (typing expiry, presence debounce, written-
            // behind records) run even when no command arrives.
            let tick = batch.is_empty() && in_flight.is_none() && !stopping;
            // Fleet mode: the store holds the batches prepared so far (and
            // the sweeps' deletions of expired records, which the log
            // never carries), so a view of it taken before the next batch
            // is written is the state as of the batch in flight (or, with
            // none, the last one appended): once that append is answered,
            // its sequence names the view.
            let due = !poisoned && !stopping && snapshots.as_mut().is_some_and(|s| s.due());
            let view = due.then(|| self.core.store_snapshot().ok()).flatten();
            let next = (!batch.is_empty() || tick).then(|| self.core.prepare(batch, now_ms()));
            if let Some(written) = in_flight.take() {
                let synced = syncer.wait();
                poisoned |= fleet && synced.is_err();
                self.deliver(written, synced);
            }
            if let (Some(view), Some(s)) = (view, snapshots.as_mut()) {
                if !poisoned {
                    s.start(view, appended.load(Ordering::Acquire));
                }
            }
            match next {
                Some(written) if poisoned => {
                    let refused = store::StoreError::Changelog("an earlier batch failed".into());
                    self.deliver(written, Err(refused));
                }
                Some(mut written) if written.needs_sync() && fleet => {
                    match written.take_encoded() {
                        Some(bytes) => {
                            if let Some(s) = snapshots.as_mut() {
                                s.appended(bytes.len());
                            }
                            syncer.start(Job::Append(bytes));
                            in_flight = Some(written);
                        }
                        None => self.deliver(written, Ok(Duration::ZERO)),
                    }
                }
                Some(written) if written.needs_sync() => match self.core.sync_handle() {
                    Some(handle) => {
                        syncer.start(Job::Fsync(handle));
                        in_flight = Some(written);
                    }
                    None => self.deliver(written, Err(store::StoreError::Closed)),
                },
                Some(written) => self.deliver(written, Ok(Duration::ZERO)),
                None if stopping => break,
                None => {}
            }
            // Queries a batch parked sends on go out at once, not after
            // its sync.
            self.send_peer_commands();
            if poisoned {
                tracing::error!(
                    "changelog append failed; this router stops serving the partition and its next owner replays the log"
                );
                drop(snapshots);
                return;
            }
        }
        if let Some(s) = snapshots.as_mut() {
            s.abandon();
        }
        if let Some(bytes) = self.core.close() {
            syncer.start(Job::Append(bytes));
            if let Err(e) = syncer.wait() {
                tracing::error!(error = %e, "appending the written-behind records at stop failed");
            }
        }
        tracing::info!("router stopped");
    }

    /// The loop without a syncer thread: decide, sync, answer, in turn.
    fn run_inline(mut self) {
        let queue_depth = self.core.metrics().queue_depth.clone();
        let mut stopping = false;
        while !stopping {
            let batch = self.take_batch(true, &mut stopping);
            queue_depth.set(self.depth.load(Ordering::Relaxed) as i64);
            if !stopping {
                for (core, deliveries) in self.core.handle_batch(batch, now_ms()) {
                    self.outlet.deliver(core, deliveries);
                }
            }
        }
        let _ = self.core.close();
        tracing::info!("router stopped");
    }

    /// Takes up to `max_batch` queued commands, waiting for the first one
    /// when `block`. Sets `stopping` on shutdown.
    fn take_batch(&mut self, block: bool, stopping: &mut bool) -> Vec<api::Command> {
        let mut batch = Vec::new();
        if block {
            match self.rx.recv_timeout(TICK_INTERVAL) {
                Ok(Msg::Command(cmd)) => batch.push(cmd),
                // Nothing for a tick: an empty batch runs the timers.
                Err(RecvTimeoutError::Timeout) => return batch,
                // Shutdown, or every handle is gone: nobody can submit any more.
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => *stopping = true,
            }
            let deadline = std::time::Instant::now() + self.linger;
            while !*stopping && !self.linger.is_zero() && batch.len() < self.max_batch {
                match self.rx.recv_deadline(deadline) {
                    Ok(Msg::Command(cmd)) => batch.push(cmd),
                    Ok(Msg::Shutdown) => *stopping = true,
                    Err(_) => break,
                }
            }
        }
        while !*stopping && batch.len() < self.max_batch {
            match self.rx.try_recv() {
                Ok(Msg::Command(cmd)) => batch.push(cmd),
                Ok(Msg::Shutdown) | Err(TryRecvError::Disconnected) => *stopping = true,
                Err(TryRecvError::Empty) => break,
            }
        }
        self.depth.fetch_sub(batch.len(), Ordering::Relaxed);
        batch
    }

    fn deliver(&mut self, written: core::Written, synced: Result<Duration, store::StoreError>) {
        for (core, deliveries) in self.core.finish(written, synced) {
            self.outlet.deliver(core, deliveries);
        }
        self.send_peer_commands();
    }

    /// Fleet mode: hands what the batches made for other partitions to the
    /// outlet, one batch per partition, after telling the gateways whose
    /// sessions they detached.
    fn send_peer_commands(&mut self) {
        for (node, last_seen_ms) in self.core.take_detached_gateways() {
            self.outlet.gateway_detached(node, last_seen_ms);
        }
        for (from, deliveries) in self.core.take_relayed() {
            self.outlet.relay(from, deliveries);
        }
        let commands = self.core.take_peer_commands();
        if commands.is_empty() {
            return;
        }
        let mut by_partition: rustc_hash::FxHashMap<u16, Vec<api::Command>> =
            rustc_hash::FxHashMap::default();
        for (p, command) in commands {
            by_partition.entry(p).or_default().push(command);
        }
        for (p, commands) in by_partition {
            self.outlet.to_partition(p, commands);
        }
    }
}

/// What the syncer thread makes durable for one batch.
enum Job {
    /// The single node: fdatasync the store's journal.
    Fsync(store::SyncHandle),
    /// Fleet mode: append the batch's encoded writes to the changelog.
    Append(Vec<u8>),
}

/// The thread that makes each batch durable for the router thread (an
/// fdatasync of the store's journal, or a changelog append), one request
/// at a time.
struct Syncer {
    requests: Sender<Job>,
    results: Receiver<Result<Duration, store::StoreError>>,
}

impl Syncer {
    /// `appended` is set to the changelog's last sequence after each
    /// append.
    fn spawn(
        changelog: Option<fleet::Changelog>,
        appended: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let (requests, jobs) = crossbeam_channel::bounded::<Job>(1);
        let (done, results) = crossbeam_channel::bounded(1);
        let mut appender = changelog.map(fleet::Appender::new);
        std::thread::Builder::new()
            .name("courier-sync".into())
            .spawn(move || {
                for job in jobs {
                    let started = std::time::Instant::now();
                    let result = match job {
                        Job::Fsync(handle) => handle.sync(),
                        Job::Append(bytes) => match appender.as_mut() {
                            Some(appender) => {
                                let result = appender.append(bytes);
                                appended.store(appender.last(), Ordering::Release);
                                result
                            }
                            None => Err(store::StoreError::Changelog("no changelog".into())),
                        },
                    };
                    if done.send(result.map(|()| started.elapsed())).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self { requests, results })
    }

    fn start(&self, job: Job) {
        // The channel holds one request and the router waits for each
        // result before the next, so this never blocks.
        let _ = self.requests.send(job);
    }

    fn wait(&self) -> Result<Duration, store::StoreError> {
        self.results
            .recv()
            .unwrap_or(Err(store::StoreError::Closed))
    }
}

/// Wall-clock milliseconds since 1970 (0 if the clock is before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
