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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_bus::lease::Lease;
use courier_bus::{BusError, Kv, Log, PubSub};
use prometheus_client::registry::Registry;
use rustc_hash::{FxHashMap, FxHashSet};

pub use crate::partition_metrics::PartitionMetrics;

use crate::codec::Corrupt;
use crate::store::{Store, StoreError, WriteSet};
use crate::{RouterConfig, RouterHandle};

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
    /// over (what [`restore`] returned).
    pub last: u64,
    /// The snapshot the store was loaded from, if any ([`restore`]).
    pub snapshot: Option<crate::snapshot::Taken>,
    /// A snapshot is written once the changelog has grown by the last
    /// one's size and at least this many bytes since (`u64::MAX`: never).
    pub snapshot_min_bytes: u64,
}

/// The default of [`Changelog::snapshot_min_bytes`]: 64 MiB.
pub const SNAPSHOT_MIN_BYTES: u64 = 64 << 20;

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

    /// The sequence of the last record appended (the fence).
    pub(crate) fn last(&self) -> u64 {
        self.changelog.last
    }

    /// Appends one batch; on success the fence moves past it. A batch
    /// larger than [`RECORD_BYTES`] goes as several records in a row
    /// ([`split`]), appended one after the other; the batch is durable
    /// once the last is. An append whose answer was lost (timeout, a
    /// server or leader change) is sent again with the same id and fence
    /// for up to [`APPEND_RETRY_FOR`]: if the first one landed, the log
    /// answers the retry as a duplicate with its sequence, so nothing is
    /// written twice and nothing is guessed. A replicated stream does not
    /// always: after a leader change the retry can meet the fence first
    /// and be refused as a conflict (the subject's last record is the
    /// first attempt, no longer the one fenced on). A conflict on a retry
    /// is therefore checked: if the subject's last record carries this
    /// append's id, the append landed and the fence moves past it; any
    /// other record there is another owner's, and this owner is fenced out.
    pub(crate) fn append(&mut self, bytes: Vec<u8>) -> Result<(), StoreError> {
        let batch = self.next;
        self.next += 1;
        let records = split(bytes);
        let whole = records.len() == 1;
        for (i, payload) in records.into_iter().enumerate() {
            let id = if whole {
                format!("{}.{batch}", self.changelog.writer)
            } else {
                format!("{}.{batch}.{i}", self.changelog.writer)
            };
            self.append_record(&id, payload)?;
        }
        Ok(())
    }

    fn append_record(&mut self, id: &str, payload: Bytes) -> Result<(), StoreError> {
        let c = &mut self.changelog;
        let started = Instant::now();
        let mut retry = false;
        loop {
            match c.log.append(&c.subject, id, payload.clone(), Some(c.last)) {
                Ok(appended) => {
                    c.last = appended.seq;
                    return Ok(());
                }
                Err(BusError::Conflict(why)) => {
                    let landed = if retry {
                        c.log.last_if_id(&c.subject, id)
                    } else {
                        Ok(None)
                    };
                    match landed {
                        Ok(Some(seq)) => {
                            tracing::info!(subject = %c.subject, seq, "changelog retry refused, but its first attempt had landed");
                            c.last = seq;
                            return Ok(());
                        }
                        Ok(None) => {
                            return Err(StoreError::Changelog(format!(
                                "fenced out of {} (another owner wrote): {why}",
                                c.subject
                            )))
                        }
                        // Not known whether it landed: ask again below.
                        Err(e) if started.elapsed() < APPEND_RETRY_FOR => {
                            tracing::warn!(subject = %c.subject, error = %e, "cannot read the changelog's last record; retrying");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => return Err(StoreError::Changelog(e.to_string())),
                    }
                }
                Err(e) if started.elapsed() < APPEND_RETRY_FOR => {
                    tracing::warn!(subject = %c.subject, error = %e, "changelog append unanswered; retrying");
                    retry = true;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(StoreError::Changelog(e.to_string())),
            }
        }
    }
}

/// The largest changelog record: a batch's encoded writes beyond it are
/// split. Half of NATS's default `max_payload` (1 MiB), leaving room for
/// headers; a batch of group creations with hundreds of members each
/// encodes to megabytes.
pub const RECORD_BYTES: usize = 512 * 1024;

/// The first byte of a piece of a split batch. A whole batch's record
/// starts with the write set's version byte, which is never this.
const PIECE: u8 = 0xB0;

/// One batch's encoded writes as changelog records: itself when it fits
/// one, else pieces of at most [`RECORD_BYTES`] of it, each `PIECE`, its
/// index (u32, big-endian), 1 on the last and 0 before, then its bytes.
pub(crate) fn split(bytes: Vec<u8>) -> Vec<Bytes> {
    if bytes.len() <= RECORD_BYTES {
        return vec![Bytes::from(bytes)];
    }
    let count = bytes.len().div_ceil(RECORD_BYTES);
    bytes
        .chunks(RECORD_BYTES)
        .enumerate()
        .map(|(i, chunk)| {
            let mut piece = Vec::with_capacity(chunk.len() + 6);
            piece.push(PIECE);
            piece.extend_from_slice(&(i as u32).to_be_bytes());
            piece.push(u8::from(i + 1 == count));
            piece.extend_from_slice(chunk);
            Bytes::from(piece)
        })
        .collect()
}

/// Puts split batches back together during a replay. The pieces of a
/// batch are consecutive records; an owner that died between two of them
/// left a batch it never answered, whose pieces are dropped when the next
/// owner's first record (a whole batch, or a first piece) follows them.
#[derive(Debug, Default)]
pub(crate) struct Reassembly {
    pending: Vec<u8>,
    next: u32,
}

impl Reassembly {
    /// Takes one record; returns a batch's encoded writes once complete.
    pub(crate) fn take<'a>(&'a mut self, record: &'a [u8]) -> Result<Option<&'a [u8]>, Corrupt> {
        if record.first() != Some(&PIECE) {
            self.pending.clear();
            self.next = 0;
            return Ok(Some(record));
        }
        let header = record.get(1..6).ok_or(Corrupt("changelog piece header"))?;
        let index = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let last = match header[4] {
            0 => false,
            1 => true,
            _ => return Err(Corrupt("changelog piece flag")),
        };
        if index == 0 {
            self.pending.clear();
        } else if index != self.next {
            return Err(Corrupt("changelog piece out of order"));
        }
        self.pending.extend_from_slice(&record[6..]);
        self.next = index + 1;
        if !last {
            return Ok(None);
        }
        self.next = 0;
        Ok(Some(&self.pending))
    }
}

/// How long an unanswered changelog append is retried before the
/// partition gives up (and its next owner replays the log). Longer than a
/// JetStream leader election; shorter than a client's patience.
pub const APPEND_RETRY_FOR: Duration = Duration::from_secs(15);

/// Rebuilds a partition's store under `data_dir` from its changelog
/// `subject`: every record after `after` is applied in order (a fresh
/// directory needs `after` = 0), with the store holding at most `limits`
/// in memory. Returns the sequence of the last record applied, the fence
/// for the new owner's first append.
pub fn replay(
    data_dir: &Path,
    limits: crate::StoreLimits,
    log: &dyn Log,
    subject: &str,
    after: u64,
) -> Result<u64, crate::RouterError> {
    let mut store = open_store(data_dir, limits)?;
    let (last, _) = apply_changelog(data_dir, &mut store, log, subject, after)?;
    Ok(last)
}

/// What [`restore`] rebuilt a partition's store from.
#[derive(Clone, Copy, Debug)]
pub struct Restored {
    /// The sequence of the changelog's last record: the new owner's fence.
    pub last: u64,
    /// The snapshot loaded first, if the log had one.
    pub snapshot: Option<crate::snapshot::Taken>,
    /// Changelog records applied after it.
    pub replayed: u64,
}

/// Rebuilds a partition's store under `data_dir` (a fresh directory) as a
/// new owner does: the latest complete snapshot of `subject`, then the
/// changelog after it ([`crate::snapshot`]).
pub fn restore(
    data_dir: &Path,
    limits: crate::StoreLimits,
    log: &dyn Log,
    subject: &str,
) -> Result<Restored, crate::RouterError> {
    restore_open(data_dir, limits, log, subject).map(|(_, restored)| restored)
}

/// [`restore`], leaving the store open for the partition's router: a
/// takeover hands it over rather than close it and open it again, which
/// costs about 250 ms (fjall's drop waits for its monitor thread, which
/// sleeps in 250 ms ticks), per partition and one partition after another.
fn restore_open(
    data_dir: &Path,
    limits: crate::StoreLimits,
    log: &dyn Log,
    subject: &str,
) -> Result<(Store, Restored), crate::RouterError> {
    let store_error =
        |source: Box<dyn std::error::Error + Send + Sync>| crate::RouterError::Store {
            path: data_dir.to_owned(),
            source,
        };
    let mut store = open_store(data_dir, limits)?;
    let snapshot = crate::snapshot::latest(log, subject).map_err(|e| store_error(Box::new(e)))?;
    if let Some(taken) = &snapshot {
        crate::snapshot::load(log, subject, taken, &mut store)
            .map_err(|e| store_error(Box::new(e)))?;
    }
    let after = snapshot.map_or(0, |t| t.at);
    let (last, replayed) = apply_changelog(data_dir, &mut store, log, subject, after)?;
    let restored = Restored {
        last,
        snapshot,
        replayed,
    };
    Ok((store, restored))
}

fn open_store(data_dir: &Path, limits: crate::StoreLimits) -> Result<Store, crate::RouterError> {
    let store_error =
        |source: Box<dyn std::error::Error + Send + Sync>| crate::RouterError::Store {
            path: data_dir.to_owned(),
            source,
        };
    std::fs::create_dir_all(data_dir).map_err(|e| store_error(Box::new(e)))?;
    Store::open_with(data_dir, limits).map_err(|e| store_error(Box::new(e)))
}

/// Applies every record of `subject` after `after` to `store`, flushes
/// it, and returns the last sequence applied (or `after`) and how many
/// records there were.
fn apply_changelog(
    data_dir: &Path,
    store: &mut Store,
    log: &dyn Log,
    subject: &str,
    after: u64,
) -> Result<(u64, u64), crate::RouterError> {
    let store_error =
        |source: Box<dyn std::error::Error + Send + Sync>| crate::RouterError::Store {
            path: data_dir.to_owned(),
            source,
        };
    let mut failure: Option<StoreError> = None;
    let mut pieces = Reassembly::default();
    let mut records = 0;
    let last = log
        .replay(subject, after, &mut |record| {
            records += 1;
            let corrupt = |failure: &mut Option<StoreError>, what: &'static str| {
                *failure = Some(StoreError::CorruptRecord {
                    seq: record.seq,
                    what,
                });
                BusError::Invalid(what.into())
            };
            let batch = match pieces.take(&record.payload) {
                Ok(Some(batch)) => batch,
                Ok(None) => return Ok(()),
                Err(c) => return Err(corrupt(&mut failure, c.0)),
            };
            let writes = WriteSet::decode(batch).map_err(|c| corrupt(&mut failure, c.0))?;
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
    Ok((last, records))
}

/// How a router process takes its share of the partitions.
#[derive(Clone, Debug)]
pub struct OwnerConfig {
    /// This router's id, unique in the fleet (it names its leases).
    pub router_id: String,
    /// How many partitions the conversations are spread over. Every
    /// router and gateway of a fleet must agree on it.
    pub partitions: u16,
    /// How often leases are renewed and free partitions looked for.
    /// Several scans fit in the lease bucket's TTL.
    pub scan_interval: Duration,
    /// Where the partitions' local stores live (one directory each,
    /// rebuilt from the changelog on every takeover).
    pub data_dir: PathBuf,
    /// The changelog subject of partition `p` is `{subject_prefix}.{p}`.
    pub subject_prefix: String,
    /// See [`Changelog::snapshot_min_bytes`].
    pub snapshot_min_bytes: u64,
    /// The router settings every partition runs with (`data_dir` and
    /// `changelog` are set per partition).
    pub router: RouterConfig,
    /// Where a served partition takes its commands and announces its new
    /// owner: with a bus, each partition's router reads batches from
    /// `courier.cmd.<p>` and `courier.owner.<p>` is published when it
    /// starts serving. Without (tests), commands go in through
    /// [`Owner::handle`].
    pub intake: Option<Arc<dyn PubSub>>,
    /// The gateways' liveness bucket (keys `gateway.<node>`, each written
    /// by its gateway and expiring a TTL after its last refresh). Every
    /// scan lists it; a gateway seen alive by an earlier scan and absent
    /// now is gone, and every partition this process serves detaches its
    /// sessions (`PeerMsg::GatewayGone`). `None`: gateways are not watched.
    pub gateways: Option<Arc<dyn Kv>>,
    /// Where each served partition's router metrics are registered, for
    /// the process's endpoint to serve with a `partition` label. `None`:
    /// they are not served.
    pub metrics: Option<Arc<PartitionMetrics>>,
    /// How many times the process's NATS link may have lost messages
    /// (`courier_bus::nats::Nats::gaps`). When it grows, every served
    /// partition is announced on `courier.owner.<p>` again, as by a new
    /// owner: what the partition relayed or published, or was relayed,
    /// while the link was down is lost on plain subjects, and the
    /// gateways' catch-ups bring it back. `None`: not watched.
    pub link_gaps: Option<LinkGaps>,
}

/// Reads the NATS link's gap count (see [`OwnerConfig::link_gaps`]).
#[derive(Clone)]
pub struct LinkGaps(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for LinkGaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LinkGaps").field(&(self.0)()).finish()
    }
}

/// Which router serves each partition, and the routers of this process.
///
/// A supervisor thread keeps a lease per partition it serves in the lease
/// bucket (key `partition.{p}`), renewed every scan, and a membership key
/// (`router.{id}`) so the routers know how many they are. Each router
/// aims at its fair share, ⌈partitions / live routers⌉: below it, it takes
/// free partitions (replaying each one's changelog first); above it, it
/// hands one back per scan (a clean stop, then the lease is released), so
/// a second router that joins gets half of the work. When a router dies
/// its leases expire after the bucket's TTL and the others take them, so
/// a partition is served again within TTL + one scan + its replay.
pub struct Owner {
    shared: Arc<OwnerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("owned", &self.owned())
            .finish()
    }
}

/// Makes the outlet a partition's router delivers to.
pub type OutletFactory = Arc<dyn Fn(u16) -> Arc<dyn crate::api::Outlet> + Send + Sync>;

struct OwnerShared {
    serving: Mutex<FxHashMap<u16, RouterHandle>>,
    /// 0: run; 1: stop cleanly; 2: stop as if killed (tests).
    stop: AtomicU8,
    /// Gateways whose liveness key the last scan found (written by the
    /// supervisor, read for metrics).
    gateways_live: AtomicUsize,
    /// Gateways whose liveness key expired since the start.
    gateways_expired: AtomicU64,
    /// Partition leases that expired unrenewed and were taken back.
    leases_retaken: AtomicU64,
    /// Partition leases lost to a conflict (taken by another router).
    leases_lost: AtomicU64,
}

/// One partition this process serves.
struct Served {
    lease: Lease,
    router: RouterHandle,
}

impl Owner {
    /// Starts the supervisor thread. `leases` must have a TTL.
    pub fn start(
        config: OwnerConfig,
        log: Arc<dyn Log>,
        leases: Arc<dyn Kv>,
        outlets: OutletFactory,
    ) -> Result<Self, crate::RouterError> {
        if leases.ttl().is_none() || config.partitions == 0 {
            return Err(crate::RouterError::Config {
                key: "partitions",
                reason: "fleet mode needs at least one partition and a lease TTL".into(),
            });
        }
        let shared = Arc::new(OwnerShared {
            serving: Mutex::new(FxHashMap::default()),
            stop: AtomicU8::new(0),
            gateways_live: AtomicUsize::new(0),
            gateways_expired: AtomicU64::new(0),
            leases_retaken: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
        });
        let settle_until = Instant::now() + config.scan_interval * 3;
        let supervisor = Supervisor {
            settle_until,
            config,
            log,
            leases,
            outlets,
            shared: shared.clone(),
            served: FxHashMap::default(),
            member: None,
            renewed_at: Instant::now(),
            stalled: false,
            gateways_seen: FxHashSet::default(),
            gateways_absent: FxHashSet::default(),
            gaps_seen: 0,
        };
        let thread = std::thread::Builder::new()
            .name("courier-leases".into())
            .spawn(move || supervisor.run())
            .map_err(crate::RouterError::Spawn)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The router serving `partition` in this process, if any.
    pub fn handle(&self, partition: u16) -> Option<RouterHandle> {
        lock(&self.shared.serving).get(&partition).cloned()
    }

    /// Gateways alive at the last scan of the liveness bucket, and how many
    /// liveness keys expired since the start (a gateway died or lost NATS;
    /// its sessions were detached).
    pub fn gateways(&self) -> (usize, u64) {
        (
            self.shared.gateways_live.load(Ordering::Relaxed),
            self.shared.gateways_expired.load(Ordering::Relaxed),
        )
    }

    /// Partition leases that expired unrenewed and were taken back, and
    /// leases lost to another router, since the start.
    pub fn leases(&self) -> (u64, u64) {
        (
            self.shared.leases_retaken.load(Ordering::Relaxed),
            self.shared.leases_lost.load(Ordering::Relaxed),
        )
    }

    /// The partitions this process serves, sorted.
    pub fn owned(&self) -> Vec<u16> {
        let mut owned: Vec<u16> = lock(&self.shared.serving).keys().copied().collect();
        owned.sort_unstable();
        owned
    }

    /// Stops every partition cleanly and releases the leases, so other
    /// routers take over at once.
    pub fn stop(mut self) {
        self.shared.stop.store(1, Ordering::Release);
        self.join();
    }

    /// Stops renewing and abandons the partitions without a word, as a
    /// killed process would (for tests): the leases expire by themselves.
    pub fn abandon(mut self) {
        self.shared.stop.store(2, Ordering::Release);
        self.join();
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("lease supervisor panicked");
            }
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.stop.store(1, Ordering::Release);
            self.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Supervisor {
    config: OwnerConfig,
    log: Arc<dyn Log>,
    leases: Arc<dyn Kv>,
    outlets: OutletFactory,
    shared: Arc<OwnerShared>,
    served: FxHashMap<u16, Served>,
    member: Option<Lease>,
    /// When the leases were last renewed: taking partitions (a replay
    /// each) renews in between once a scan interval has passed, so a long
    /// run of takes never lets the leases already held run out.
    renewed_at: Instant,
    /// The last round of renewals took over a third of the TTL, or found
    /// a lease lapsed: JetStream is stalling for this router. A router in
    /// a stall takes no partition and hands none back: the other routers
    /// are most likely in the same stall, their keys lapsing too, and a
    /// partition taken from one of them is a takeover nobody needed (a
    /// replay, every session attached again) that its owner would have
    /// ridden out by taking its key back. A router that really died is
    /// taken over by one whose renewals go through, as soon as they do.
    stalled: bool,
    /// Gateways whose liveness key the last scan found.
    gateways_seen: FxHashSet<u16>,
    /// Gateways whose key the last scan found absent (listed and read);
    /// gone if the next scan finds it absent again.
    gateways_absent: FxHashSet<u16>,
    /// Free partitions are not taken before this: routers started together
    /// first see each other's membership, so each takes only its share
    /// instead of the first taking everything and handing half back.
    settle_until: Instant,
    /// The link's gap count when the served partitions were last
    /// announced (see [`OwnerConfig::link_gaps`]).
    gaps_seen: u64,
}

impl Supervisor {
    fn run(mut self) {
        loop {
            match self.shared.stop.load(Ordering::Acquire) {
                0 => {}
                1 => return self.stop_all(),
                _ => return self.abandon_all(),
            }
            self.renew();
            self.announce_after_gap();
            self.watch_gateways();
            if self.stalled {
                tracing::info!(
                    served = self.served.len(),
                    "lease renewals are stalling; no partition taken or handed back this scan"
                );
            } else if Instant::now() >= self.settle_until {
                self.balance();
            }
            std::thread::sleep(self.config.scan_interval);
        }
    }

    fn partition_key(p: u16) -> String {
        format!("partition.{p}")
    }

    /// Announces every served partition again once the NATS link has had
    /// a gap since the last scan (see [`OwnerConfig::link_gaps`]).
    fn announce_after_gap(&mut self) {
        let (Some(gaps), Some(bus)) = (&self.config.link_gaps, &self.config.intake) else {
            return;
        };
        let now = (gaps.0)();
        if now == self.gaps_seen {
            return;
        }
        self.gaps_seen = now;
        let mut served: Vec<u16> = self.served.keys().copied().collect();
        served.sort_unstable();
        tracing::warn!(
            partitions = ?served,
            "the NATS link reconnected or dropped messages; announcing the served partitions again so gateways catch their sessions up"
        );
        for p in served {
            let id = Bytes::copy_from_slice(self.config.router_id.as_bytes());
            if let Err(e) = bus.publish(&owner_subject(p), id) {
                tracing::warn!(partition = p, error = %e, "announcing the partition again failed");
            }
        }
    }

    /// Renews every lease; drops partitions whose lease is lost or whose
    /// router stopped (fenced, or its changelog failed).
    fn renew(&mut self) {
        self.renewed_at = Instant::now();
        let lapsed_before = self.shared.leases_retaken.load(Ordering::Relaxed)
            + self.shared.leases_lost.load(Ordering::Relaxed);
        let member_key = format!("router.{}", self.config.router_id);
        match self.member.as_mut().map(Lease::renew) {
            Some(Ok(())) => {}
            _ => {
                self.member = Lease::try_acquire(&self.leases, &member_key, b"")
                    .ok()
                    .flatten();
            }
        }
        let mut dropped = Vec::new();
        for (p, served) in &mut self.served {
            if served.router.is_stopped() {
                tracing::warn!(
                    partition = p,
                    "partition router stopped; giving the partition up"
                );
                dropped.push((*p, true));
                continue;
            }
            match served.lease.renew() {
                Ok(()) => {}
                Err(BusError::Conflict(why)) => {
                    let subject = format!("{}.{p}", self.config.subject_prefix);
                    let owner = self.config.router_id.as_bytes();
                    let fence = || served.router.changelog_last();
                    let key = Self::partition_key(*p);
                    match take_back(&self.leases, &key, owner, &*self.log, &subject, fence) {
                        Ok(lease) => {
                            tracing::warn!(partition = p, %why, "partition lease had expired and nobody took it; taken back");
                            served.lease = lease;
                            self.shared.leases_retaken.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(reason) => {
                            tracing::warn!(partition = p, %why, reason, "partition lease lost");
                            self.shared.leases_lost.fetch_add(1, Ordering::Relaxed);
                            dropped.push((*p, false));
                        }
                    }
                }
                Err(e) => {
                    // Unreachable bucket: keep serving only while the lease
                    // is certainly ours; the log's fence guards the rest.
                    let left = served.lease.valid_for().unwrap_or_default();
                    if left < self.config.scan_interval * 2 {
                        tracing::warn!(partition = p, error = %e, "cannot renew the partition lease; stopping before it runs out");
                        dropped.push((*p, false));
                    }
                }
            }
        }
        for (p, release) in dropped {
            self.give_up(p, release);
        }
        let lapsed = self.shared.leases_retaken.load(Ordering::Relaxed)
            + self.shared.leases_lost.load(Ordering::Relaxed)
            > lapsed_before;
        let slow = self
            .leases
            .ttl()
            .is_some_and(|ttl| self.renewed_at.elapsed() > ttl / 3);
        self.stalled = lapsed || slow;
    }

    /// Lists the gateways' liveness keys; tells every served partition
    /// about a gateway whose key was there at the last scan and is gone
    /// now. A gateway first seen by this scan is only remembered, so one
    /// that started between the listing and its first attach is never
    /// taken for dead. An unreachable bucket decides nothing.
    ///
    /// A key missing from the listing is read back before its gateway is
    /// taken for dead: JetStream lists keys through a consumer, and a key
    /// rewritten while that consumer runs can be left out (seen at 200,000
    /// connections, during a stall, with the gateway alive and refreshing;
    /// its sessions were detached and live deliveries to them stopped).
    /// Only a key absent from two scans in a row, listed and read, means
    /// the gateway is gone (a read may be answered by a replica that lags);
    /// a read that fails keeps the gateway for the next scan. A dead
    /// gateway is so noticed one scan later.
    fn watch_gateways(&mut self) {
        let Some(kv) = &self.config.gateways else {
            return;
        };
        let keys = match kv.keys(GATEWAY_KEY_PREFIX) {
            Ok(keys) => keys,
            Err(e) => {
                tracing::debug!(error = %e, "gateway liveness bucket unavailable");
                return;
            }
        };
        let mut live: Vec<u16> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(GATEWAY_KEY_PREFIX)?.parse().ok())
            .collect();
        let missing: Vec<u16> = self
            .gateways_seen
            .iter()
            .filter(|node| !live.contains(node))
            .copied()
            .collect();
        let mut gone = Vec::new();
        let mut absent = FxHashSet::default();
        for node in missing {
            match kv.get(&format!("{GATEWAY_KEY_PREFIX}{node}")) {
                Ok(None) if self.gateways_absent.contains(&node) => gone.push(node),
                Ok(None) => {
                    absent.insert(node);
                    live.push(node);
                }
                Ok(Some(_)) => {
                    tracing::debug!(
                        gateway = node,
                        "liveness key missing from the listing but present"
                    );
                    live.push(node);
                }
                Err(e) => {
                    tracing::debug!(gateway = node, error = %e, "liveness key unreadable; decided at the next scan");
                    live.push(node);
                }
            }
        }
        self.gateways_seen = live.into_iter().collect();
        self.gateways_absent = absent;
        self.shared
            .gateways_live
            .store(self.gateways_seen.len(), Ordering::Relaxed);
        self.shared
            .gateways_expired
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        // The key expired since the scan before last, so it was last
        // written one TTL before some moment since then: now less the TTL
        // is at most two scans after the gateway's last refresh, and the
        // gateway died after that refresh. Its sessions' last seen is that
        // moment.
        let last_seen_ms =
            wall_ms().saturating_sub(kv.ttl().unwrap_or_default().as_millis() as u64);
        for node in gone {
            tracing::info!(
                gateway = node,
                partitions = self.served.len(),
                "gateway liveness key expired; detaching its sessions"
            );
            for served in self.served.values() {
                let gone = crate::api::PeerMsg::GatewayGone { node, last_seen_ms };
                let _ = served.router.submit(crate::api::Command::Peer(gone));
            }
        }
    }

    /// Takes free partitions up to the fair share, or hands one back above it.
    fn balance(&mut self) {
        let routers = self.leases.keys("router.").map_or(1, |k| k.len().max(1));
        let partitions = usize::from(self.config.partitions);
        let share = partitions.div_ceil(routers);
        if self.served.len() > share {
            if let Some(p) = self.served.keys().copied().max() {
                tracing::info!(
                    partition = p,
                    share,
                    routers,
                    "handing a partition back for balance"
                );
                self.give_up(p, true);
            }
            return;
        }
        // Start from an offset of our own so routers starting together do
        // not all race for partition 0.
        let offset = self.config.router_id.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        for i in 0..partitions {
            if self.served.len() >= share || self.shared.stop.load(Ordering::Acquire) != 0 {
                break;
            }
            let p = ((offset + i) % partitions) as u16;
            if self.served.contains_key(&p) {
                continue;
            }
            // Each take replays a changelog (hundreds of milliseconds, more
            // for a long one); the leases already held, this router's
            // membership among them, are renewed between takes as often
            // as between scans.
            if self.renewed_at.elapsed() >= self.config.scan_interval {
                self.renew();
                if self.served.len() >= share || self.stalled {
                    break;
                }
            }
            match Lease::try_acquire(
                &self.leases,
                &Self::partition_key(p),
                self.config.router_id.as_bytes(),
            ) {
                Ok(Some(lease)) => self.take(p, lease),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "lease bucket unavailable");
                    break;
                }
            }
        }
    }

    /// Replays partition `p` into a fresh directory and starts its router.
    fn take(&mut self, p: u16, mut lease: Lease) {
        let started = Instant::now();
        let dir = self.config.data_dir.join(format!("partition-{p}"));
        let _ = std::fs::remove_dir_all(&dir);
        let subject = format!("{}.{p}", self.config.subject_prefix);
        let (store, restored) = match restore_open(
            &dir,
            self.config.router.store,
            &*self.log,
            &subject,
        ) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::error!(partition = p, error = %e, "replaying the changelog failed; releasing the partition");
                let _ = lease.release();
                return;
            }
        };
        // A replay can outlast the TTL (a long log, a slow server): the key
        // may have expired meanwhile, and is taken back if nobody took it
        // or wrote since the replay ended.
        match lease.renew() {
            Ok(()) => {}
            Err(BusError::Conflict(_)) => {
                let owner = self.config.router_id.as_bytes();
                let key = Self::partition_key(p);
                let fence = || restored.last;
                match take_back(&self.leases, &key, owner, &*self.log, &subject, fence) {
                    Ok(taken) => {
                        tracing::info!(
                            partition = p,
                            "lease expired during the replay; taken back"
                        );
                        self.shared.leases_retaken.fetch_add(1, Ordering::Relaxed);
                        lease = taken;
                    }
                    Err(reason) => {
                        tracing::warn!(partition = p, reason, "lease lost during the replay");
                        self.shared.leases_lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot renew the lease after the replay");
                return;
            }
        }
        let router = RouterConfig {
            data_dir: dir,
            changelog: Some(Changelog {
                log: self.log.clone(),
                subject,
                writer: format!("{}.{}", self.config.router_id, lease_epoch(&lease)),
                last: restored.last,
                snapshot: restored.snapshot,
                snapshot_min_bytes: self.config.snapshot_min_bytes,
            }),
            partition: Some((p, self.config.partitions)),
            ..self.config.router.clone()
        };
        let outlet = (self.outlets)(p);
        let mut registry = Registry::default();
        match crate::Router::start_on(router, Some(store), outlet, &mut registry) {
            Ok(handle) => {
                if let Some(metrics) = &self.config.metrics {
                    metrics.insert(p, registry);
                }
                tracing::info!(
                    partition = p,
                    replayed_to = restored.last,
                    snapshot_at = restored.snapshot.map_or(0, |t| t.at),
                    snapshot_records = restored.snapshot.map_or(0, |t| t.records),
                    changelog_records = restored.replayed,
                    took_ms = started.elapsed().as_millis() as u64,
                    "serving partition"
                );
                lock(&self.shared.serving).insert(p, handle.clone());
                if let Some(bus) = &self.config.intake {
                    if let Err(e) = start_intake(bus, p, &handle, &self.config.router_id) {
                        tracing::error!(partition = p, error = %e, "cannot subscribe to the partition's commands");
                    }
                }
                self.served.insert(
                    p,
                    Served {
                        lease,
                        router: handle,
                    },
                );
            }
            Err(e) => {
                tracing::error!(partition = p, error = %e, "starting the partition router failed");
                let _ = lease.release();
            }
        }
    }

    /// Stops serving `p`; with `release`, lets another take it at once.
    fn give_up(&mut self, p: u16, release: bool) {
        lock(&self.shared.serving).remove(&p);
        if let Some(metrics) = &self.config.metrics {
            metrics.remove(p);
        }
        if let Some(served) = self.served.remove(&p) {
            served.router.shutdown();
            if release {
                let _ = served.lease.release();
            }
        }
    }

    fn stop_all(mut self) {
        let owned: Vec<u16> = self.served.keys().copied().collect();
        for p in owned {
            self.give_up(p, true);
        }
        if let Some(member) = self.member.take() {
            let _ = member.release();
        }
    }

    fn abandon_all(mut self) {
        lock(&self.shared.serving).clear();
        if let Some(metrics) = &self.config.metrics {
            self.served.keys().for_each(|&p| metrics.remove(p));
        }
        // The routers are left to the log's fence: their next append, if
        // any, is refused once a new owner wrote.
        for (_, served) in self.served.drain() {
            drop(served.lease);
            std::mem::forget(served.router);
        }
    }
}

/// A renewal of partition `p`'s lease found it gone: the key expired
/// before a renewal got through (a JetStream stall longer than the TTL, or
/// this process paused). If nobody has taken it since and the changelog
/// still ends where this owner's last append left it, the owner takes the
/// key again and goes on serving, as if the lease had never lapsed: no
/// other router wrote, so this router's state is the log's. Without this a
/// stall that outlasts the TTL makes every router drop every partition at
/// once, and each takeover (a replay, then every session attached again)
/// loads the fleet further (measured at 16 partitions and 200,000
/// connections in docs/benchmarks.md). Another router that took the key
/// and did not write yet loses it at its next renewal; one that wrote
/// moved the log, so the key is released again here and the partition
/// goes to whoever takes it next, replaying what was written.
/// `fence` reads the router's [`RouterHandle::changelog_last`].
fn take_back(
    leases: &Arc<dyn Kv>,
    key: &str,
    owner: &[u8],
    log: &dyn Log,
    subject: &str,
    fence: impl Fn() -> u64,
) -> Result<Lease, &'static str> {
    let lease = match Lease::try_acquire(leases, key, owner) {
        Ok(Some(lease)) => lease,
        Ok(None) => return Err("another router holds it"),
        Err(_) => return Err("the lease bucket did not answer"),
    };
    // An append of this router's can be answered between the two reads
    // of its fence; the log's last record is this router's if it matches
    // either.
    let before = fence();
    let last = log.last_record(subject);
    let after = fence();
    match last {
        Ok(last) if [before, after].contains(&last.as_ref().map_or(0, |r| r.seq)) => Ok(lease),
        Ok(_) => {
            let _ = lease.release();
            Err("another owner wrote to the changelog since")
        }
        Err(_) => {
            let _ = lease.release();
            Err("the changelog did not answer")
        }
    }
}

/// The revision that created or last renewed the lease: unique per owner
/// epoch, so it tells this owner's appends from any other's.
fn lease_epoch(lease: &Lease) -> u64 {
    lease.revision()
}

/// The partition of `key` (a conversation id, or a user id for what is
/// per user) among `partitions`: FNV-1a over its bytes, so every process
/// and every version computes the same partition.
pub fn partition_of(key: &str, partitions: u16) -> u16 {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % u64::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use courier_bus::{BusError, Log, PubSub};

    use super::{
        partition_of, publish_split, split, take_back, Appender, Changelog, Reassembly,
        RECORD_BYTES,
    };

    /// A replicated log across a leader change: the append numbered
    /// `lose` (from 0) lands but its answer is lost, and its retry is
    /// refused at the fence instead of being answered as a duplicate.
    fn leader_change(inner: courier_bus::local::LocalLog, lose: usize) -> Arc<dyn Log> {
        let calls = AtomicUsize::new(0);
        Arc::new(courier_bus::testing::HookedLog::appends(
            Arc::new(inner),
            Box::new(move |log, subject, id, payload, expect_last| {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                if call == lose {
                    log.append(subject, id, payload, expect_last)?;
                    return Err(BusError::Unavailable("timed out".into()));
                }
                if call == lose + 1 {
                    return Err(BusError::Conflict("wrong last sequence".into()));
                }
                log.append(subject, id, payload, expect_last)
            }),
        ))
    }

    fn appender(log: Arc<dyn Log>, writer: &str) -> Appender {
        let last = log.last("t.log.0").unwrap();
        Appender::new(Changelog {
            log,
            subject: "t.log.0".into(),
            writer: writer.into(),
            last,
            snapshot: None,
            snapshot_min_bytes: u64::MAX,
        })
    }

    /// A lease that expired before its renewal got through, with the
    /// changelog where its owner left it, is taken back; taken by another
    /// router, or expired after another owner wrote, it is not, and a key
    /// created for the check is released again.
    #[test]
    fn an_expired_lease_is_taken_back_only_if_nobody_else_took_it_or_wrote() {
        use courier_bus::lease::Lease;
        use courier_bus::Kv;
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn Log> = Arc::new(
            courier_bus::local::LocalLog::open(dir.path(), Duration::from_secs(120)).unwrap(),
        );
        let kv: Arc<dyn Kv> = Arc::new(courier_bus::local::LocalKv::new(Some(
            Duration::from_secs(60),
        )));
        let mut a = appender(log.clone(), "router-a.1");
        a.append(b"mine".to_vec()).unwrap();
        let fence = a.last();
        let (key, subject) = ("partition.0", "t.log.0");

        // Expired (the key is gone) and untouched: taken back.
        let lease = take_back(&kv, key, b"router-a", &*log, subject, || fence).unwrap();
        assert_eq!(
            Lease::holder(&kv, key).unwrap().as_deref(),
            Some(&b"router-a"[..])
        );
        lease.release().unwrap();

        // An append answered between the two reads of the fence counts as
        // this owner's.
        let reads = AtomicUsize::new(0);
        let racing = || {
            if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                0
            } else {
                fence
            }
        };
        take_back(&kv, key, b"router-a", &*log, subject, racing)
            .unwrap()
            .release()
            .unwrap();

        // Another router holds the key: not taken, and left to it.
        let b = Lease::try_acquire(&kv, key, b"router-b").unwrap().unwrap();
        assert!(take_back(&kv, key, b"router-a", &*log, subject, || fence).is_err());
        assert_eq!(
            Lease::holder(&kv, key).unwrap().as_deref(),
            Some(&b"router-b"[..])
        );

        // Another router held it and wrote, then lost it too: not taken
        // back, and the key is free for whoever replays next.
        let mut other = appender(log.clone(), "router-b.2");
        other.append(b"theirs".to_vec()).unwrap();
        b.release().unwrap();
        assert!(take_back(&kv, key, b"router-a", &*log, subject, || fence).is_err());
        assert!(Lease::holder(&kv, key).unwrap().is_none());
    }

    #[test]
    fn a_retry_refused_at_the_fence_after_its_first_attempt_landed_is_taken_as_appended() {
        let dir = tempfile::tempdir().unwrap();
        let log = leader_change(
            courier_bus::local::LocalLog::open(dir.path(), Duration::from_secs(120)).unwrap(),
            1,
        );
        let mut a = appender(log.clone(), "router-a.1");
        a.append(b"first".to_vec()).unwrap();
        a.append(b"second".to_vec())
            .expect("the landed attempt is recognised");
        a.append(b"third".to_vec())
            .expect("the fence moved past it");
        let mut seen = Vec::new();
        log.replay("t.log.0", 0, &mut |r| {
            seen.push(r.payload);
            Ok(())
        })
        .unwrap();
        let expected: Vec<Bytes> = ["first", "second", "third"].map(Bytes::from).to_vec();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_retry_refused_behind_another_owners_record_is_fenced_out() {
        let dir = tempfile::tempdir().unwrap();
        let inner =
            courier_bus::local::LocalLog::open(dir.path(), Duration::from_secs(120)).unwrap();
        let log = leader_change(inner, usize::MAX - 1);
        let mut a = appender(log.clone(), "router-a.1");
        a.append(b"mine".to_vec()).unwrap();
        // Another owner takes over and writes.
        let mut b = appender(log.clone(), "router-b.2");
        b.append(b"theirs".to_vec()).unwrap();
        let err = a.append(b"late".to_vec()).unwrap_err();
        assert!(err.to_string().contains("fenced out"), "{err}");
        assert_eq!(log.last_if_id("t.log.0", "router-a.1.0").unwrap(), None);
        assert!(log.last_if_id("t.log.0", "router-b.2.0").unwrap().is_some());
    }

    #[test]
    fn a_list_too_large_for_one_message_is_published_as_several_in_order() {
        let bus = courier_bus::local::LocalPubSub::new();
        let sub = bus.subscribe("t.split").unwrap();
        // 40 items of 60 KB: 2.4 MB, so at least five messages.
        let items: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 60_000]).collect();
        let encode = |items: &[Vec<u8>]| items.concat();
        publish_split(&bus, "t.split", &items, &encode).unwrap();
        let mut got = Vec::new();
        let mut messages = 0;
        while let Some(m) = sub.recv_timeout(std::time::Duration::from_millis(200)) {
            assert!(m.payload.len() <= RECORD_BYTES);
            got.extend_from_slice(&m.payload);
            messages += 1;
        }
        assert!(messages >= 5, "{messages} messages");
        assert_eq!(got, items.concat(), "every item, in order");
    }

    #[test]
    fn a_split_batch_comes_back_whole_and_a_torn_one_is_dropped() {
        let small = vec![1u8, 2, 3];
        assert_eq!(
            split(small.clone()),
            vec![bytes::Bytes::from(small.clone())]
        );
        let big: Vec<u8> = (0..RECORD_BYTES * 2 + 10).map(|i| i as u8).collect();
        let pieces = split(big.clone());
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| p.len() <= RECORD_BYTES + 6));

        let mut r = Reassembly::default();
        // A torn batch (its owner died after two pieces), then the next
        // owner's whole batch: the torn one is dropped.
        assert_eq!(r.take(&pieces[0]).unwrap(), None);
        assert_eq!(r.take(&pieces[1]).unwrap(), None);
        assert_eq!(r.take(&small).unwrap(), Some(&small[..]));
        // A torn batch followed by a new first piece starts over.
        assert_eq!(r.take(&pieces[0]).unwrap(), None);
        for p in &pieces[..2] {
            assert_eq!(r.take(p).unwrap(), None);
        }
        assert_eq!(r.take(&pieces[2]).unwrap(), Some(&big[..]));
        // A piece out of order is corrupt, not glued on.
        let mut r = Reassembly::default();
        assert_eq!(r.take(&pieces[0]).unwrap(), None);
        assert!(r.take(&pieces[2]).is_err());
        assert!(Reassembly::default().take(&[0xB0, 0, 0]).is_err());
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: changing the hash would move every conversation.
        assert_eq!(
            partition_of("d:alice:bob", 64),
            partition_of("d:alice:bob", 64)
        );
        assert_eq!(
            partition_of("", 16),
            (0xcbf2_9ce4_8422_2325_u64 % 16) as u16
        );
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[usize::from(partition_of(&format!("g:{i:016x}"), 16))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(partition_of("x", 0), 0);
    }
}

/// Gateway `node`'s liveness key is `{GATEWAY_KEY_PREFIX}{node}`.
pub const GATEWAY_KEY_PREFIX: &str = "gateway.";

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The subject gateways publish partition `p`'s commands on.
pub fn command_subject(p: u16) -> String {
    format!("courier.cmd.{p}")
}

/// The subject a router publishes on when it starts serving partition `p`.
pub fn owner_subject(p: u16) -> String {
    format!("courier.owner.{p}")
}

/// The subject partition `p`'s router publishes deliveries for gateway
/// `node` on. The partition in the subject tells the gateway which
/// partition a catch-up's `SyncDone` came from.
pub fn gateway_subject(node: u16, p: u16) -> String {
    format!("courier.gw.{node}.{p}")
}

/// What gateway `node` subscribes to: its deliveries from every partition.
pub fn gateway_subjects(node: u16) -> String {
    format!("courier.gw.{node}.*")
}

/// The subject partition `p`'s router tells gateway `node` on that it
/// detached the gateway's sessions. The payload is the last seen of the
/// `GatewayGone` that did it (8 bytes, big-endian milliseconds): a gateway
/// that is alive attaches its sessions to `p` again, unless that last
/// seen is its own start announcement's.
pub fn detached_subject(node: u16, p: u16) -> String {
    format!("courier.detached.{node}.{p}")
}

/// What gateway `node` subscribes to: every partition's detach notices.
pub fn detached_subjects(node: u16) -> String {
    format!("courier.detached.{node}.*")
}

/// Reads a detach notice's payload ([`detached_subject`]).
pub fn decode_detached(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.try_into().ok()?))
}

/// Subscribes partition `p`'s router to its command subject (a thread that
/// submits each batch's commands in order, until the router stops) and
/// announces the new owner, so gateways attach their sessions again.
fn start_intake(
    bus: &Arc<dyn PubSub>,
    p: u16,
    router: &RouterHandle,
    router_id: &str,
) -> Result<(), BusError> {
    let subscription = bus.subscribe(&command_subject(p))?;
    let router = router.clone();
    std::thread::Builder::new()
        .name(format!("courier-intake-{p}"))
        .spawn(move || {
            while !router.is_stopped() {
                let Some(message) = subscription.recv_timeout(Duration::from_millis(250)) else {
                    continue;
                };
                match crate::wire::decode_commands(message.payload) {
                    Ok(commands) => {
                        for command in commands {
                            // A refused command (overload, stopping) is a
                            // client's to retry, like a lost one.
                            let _ = router.submit(command);
                        }
                    }
                    Err(e) => tracing::warn!(partition = p, error = %e, "dropped a malformed command batch"),
                }
            }
        })
        .map_err(|e| BusError::Unavailable(e.to_string()))?;
    bus.publish(
        &owner_subject(p),
        Bytes::copy_from_slice(router_id.as_bytes()),
    )
}

/// An [`crate::api::Outlet`] of one partition (the `u16`) that publishes
/// each batch to the gateways holding its sessions, one message per
/// gateway.
#[derive(Debug)]
pub struct BusOutlet(pub Arc<dyn PubSub>, pub u16);

/// Publishes `items` on `subject`, encoded by `encode`: as one message, or,
/// when that would exceed [`RECORD_BYTES`] (NATS refuses payloads over
/// 1 MiB by default), as several in order, the list halved until each
/// fits. One item never needs it (a frame is at most about 64 KiB).
pub fn publish_split<T>(
    bus: &dyn PubSub,
    subject: &str,
    items: &[T],
    encode: &dyn Fn(&[T]) -> Vec<u8>,
) -> Result<(), BusError> {
    let payload = encode(items);
    if payload.len() <= RECORD_BYTES || items.len() <= 1 {
        return bus.publish(subject, Bytes::from(payload));
    }
    let (first, second) = items.split_at(items.len() / 2);
    publish_split(bus, subject, first, encode)?;
    publish_split(bus, subject, second, encode)
}

impl crate::api::Outlet for BusOutlet {
    fn to_partition(&self, partition: u16, commands: Vec<crate::api::Command>) {
        let subject = command_subject(partition);
        let encode = |c: &[crate::api::Command]| crate::wire::encode_commands(c);
        if let Err(e) = publish_split(&*self.0, &subject, &commands, &encode) {
            tracing::warn!(partition, error = %e, "publishing to another partition failed; the waiting send times out and is retried");
        }
    }

    fn gateway_detached(&self, node: u16, last_seen_ms: u64) {
        let subject = detached_subject(node, self.1);
        let payload = Bytes::copy_from_slice(&last_seen_ms.to_be_bytes());
        if let Err(e) = self.0.publish(&subject, payload) {
            tracing::warn!(gateway = node, error = %e, "telling a gateway its sessions were detached failed");
        }
    }

    fn deliver(&self, _core: u16, batch: Vec<crate::api::Delivery>) {
        self.publish_deliveries(self.1, batch);
    }

    fn relay(&self, from: u16, batch: Vec<crate::api::Delivery>) {
        self.publish_deliveries(from, batch);
    }
}

impl BusOutlet {
    /// Publishes `batch` to the gateways it is for, as partition `p`'s.
    fn publish_deliveries(&self, p: u16, batch: Vec<crate::api::Delivery>) {
        let mut by_node: FxHashMap<u16, Vec<crate::api::Delivery>> = FxHashMap::default();
        for delivery in batch {
            by_node
                .entry(delivery.session().node)
                .or_default()
                .push(delivery);
        }
        let encode = |d: &[crate::api::Delivery]| crate::wire::encode_deliveries(d);
        for (node, deliveries) in by_node {
            let subject = gateway_subject(node, p);
            if let Err(e) = publish_split(&*self.0, &subject, &deliveries, &encode) {
                tracing::warn!(gateway = node, error = %e, "publishing deliveries failed; the sessions catch up on reconnect");
            }
        }
    }
}
