//! Fleet mode: the gateway's link to the routers over NATS, and the
//! router role.
//!
//! A gateway in fleet mode has no router of its own. Its cores submit
//! commands to an [`Upstream::Fleet`] link exactly as they would to the
//! embedded router: a command is queued on a channel (lock-free, never
//! blocking a core) to the link's sender thread, which drains everything
//! queued, groups it by partition and publishes one batch per partition on
//! `courier.cmd.<p>` (`courier_router::wire`). Deliveries come back on
//! `courier.gw.<node>` to the receiver thread, which groups them by core
//! and pushes each core's share onto its mailbox at once: one wake-up per
//! core per batch, as on a single node.
//!
//! Where a command goes:
//! - frames about one conversation (send, receipts, typing, history,
//!   group changes, receipt queries): that conversation's partition;
//! - attach, detach and catch-up (`Sync`): every partition, since a user's
//!   conversations are spread over all of them. The link merges the
//!   partitions' `SyncDone`s into the one the client expects (`more` if any
//!   partition has more);
//! - what belongs to the user (group creation, chat list, presence,
//!   settings, devices, keys, archives): the user's own partition
//!   (`BundleFetch`: the fetched user's).
//!
//! When a router starts serving a partition (after a takeover) it says so
//! on `courier.owner.<p>`; the link attaches every session it holds there
//! again and runs a catch-up for it, so the new owner delivers live at once
//! and anything the old owner acknowledged but did not fan out arrives
//! (clients dedupe by sequence). That catch-up's `SyncDone` is not passed on.
//!
//! Liveness: the gateway keeps `gateway.<node>` alive in the
//! `courier_gateways` KV bucket (`Liveness`); routers detach the sessions
//! of a gateway whose key expired, so a crashed gateway's users go offline
//! by themselves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use courier_bus::metrics::LinkMetrics;
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::{BusError, Kv, PubSub};
use courier_protocol::frame::{self, ClientFrame, ServerFrame};
use courier_router::api::{Class, Command, Delivery, Device, PeerMsg, SessionKey};
use courier_router::fleet::{self as rfleet, partition_of};
use courier_router::{Overloaded, RouterConfig, RouterHandle};
use crossbeam_channel::{Receiver, Sender};
use rustc_hash::FxHashMap;

use crate::config::ServeArgs;
use crate::core::CoreMsg;
use crate::mailbox::Mailbox;

/// Where a gateway's commands go.
#[derive(Debug)]
pub enum Upstream {
    /// The single node: the router in this process.
    Embedded(RouterHandle),
    /// Fleet mode: the routers, over NATS.
    Fleet(Arc<FleetLink>),
}

impl Upstream {
    /// Queues `cmd`; never blocks. A `Send` is refused with [`Overloaded`]
    /// when too many commands wait.
    pub fn submit(&self, cmd: Command) -> Result<(), Overloaded> {
        match self {
            Self::Embedded(router) => router.submit(cmd),
            Self::Fleet(link) => link.submit(cmd),
        }
    }

    /// Stops the router or the link (after the cores have drained).
    pub fn shutdown(&self) {
        match self {
            Self::Embedded(router) => router.shutdown(),
            Self::Fleet(link) => link.shutdown(),
        }
    }
}

/// A session the link has attached, for re-attaching after a takeover.
#[derive(Debug)]
struct Attached {
    device: Device,
    issued_at_s: u64,
}

/// Catch-up merging for one session.
#[derive(Debug, Default)]
struct SyncMerge {
    /// `SyncDone`s still owed, by partition (index); created at the
    /// partition count on first use.
    owed: Vec<u8>,
    /// The client asked for a catch-up and waits for its `SyncDone`.
    client_waiting: bool,
    more: bool,
}

impl SyncMerge {
    fn owe(&mut self, p: u16, partitions: u16) {
        if self.owed.is_empty() {
            self.owed = vec![0; usize::from(partitions)];
        }
        if let Some(n) = self.owed.get_mut(usize::from(p)) {
            *n = n.saturating_add(1);
        }
    }

    fn owes(&self, p: u16) -> bool {
        self.owed.get(usize::from(p)).is_some_and(|n| *n > 0)
    }

    fn settled(&self) -> bool {
        self.owed.iter().all(|n| *n == 0)
    }
}

#[derive(Debug, Default)]
struct LinkState {
    sessions: FxHashMap<SessionKey, Attached>,
    syncs: FxHashMap<SessionKey, SyncMerge>,
}

/// The gateway's side of fleet mode.
pub struct FleetLink {
    tx: Sender<Command>,
    bus: Arc<dyn PubSub>,
    partitions: u16,
    max_inflight: usize,
    state: Arc<Mutex<LinkState>>,
    closed: AtomicBool,
    _nats: Arc<Nats>,
}

impl std::fmt::Debug for FleetLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLink")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where one command goes.
enum Target {
    One(u16),
    All,
}

fn target(cmd: &Command, partitions: u16) -> Target {
    let (device, frame) = match cmd {
        Command::Attach { .. } | Command::Detach { .. } => return Target::All,
        // The push worker's reports stay in their router; no core sends one.
        Command::Push(_) => return Target::One(0),
        // A gateway sends only its own `GatewayGone` (at start), to all.
        Command::Peer(_) => return Target::All,
        Command::Frame { device, frame, .. } => (device, frame),
    };
    let conversation = |c: &str| Target::One(partition_of(c, partitions));
    match frame {
        ClientFrame::Send {
            conversation: c, ..
        }
        | ClientFrame::SendPerDevice {
            conversation: c, ..
        }
        | ClientFrame::Delivered {
            conversation: c, ..
        }
        | ClientFrame::Read {
            conversation: c, ..
        }
        | ClientFrame::GroupAdd {
            conversation: c, ..
        }
        | ClientFrame::GroupRemove {
            conversation: c, ..
        }
        | ClientFrame::GroupMembers {
            conversation: c, ..
        }
        | ClientFrame::History {
            conversation: c, ..
        }
        | ClientFrame::ReceiptQuery {
            conversation: c, ..
        }
        | ClientFrame::Typing {
            conversation: c, ..
        } => conversation(c),
        ClientFrame::Sync { .. } => Target::All,
        ClientFrame::BundleFetch { user, .. } => Target::One(partition_of(user, partitions)),
        _ => Target::One(partition_of(&device.user, partitions)),
    }
}

impl FleetLink {
    /// Connects to NATS and starts the link's threads. Deliveries for this
    /// gateway (`node`) go to `mailboxes`, indexed by core.
    pub fn start(
        args: &ServeArgs,
        mailboxes: Vec<Arc<Mailbox<CoreMsg>>>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> anyhow::Result<Arc<Self>> {
        let nats = Nats::connect(&NatsConfig {
            servers: args.nats.clone(),
            name: format!("courier-gateway-{}", args.node_id),
            metrics: Some(LinkMetrics::register(registry)),
            ..NatsConfig::default()
        })
        .context("connecting to NATS")?;
        let bus: Arc<dyn PubSub> = Arc::new(nats.pubsub());
        let deliveries = bus
            .subscribe(&rfleet::gateway_subjects(args.node_id))
            .context("subscribing to this gateway's deliveries")?;
        let owners = bus
            .subscribe("courier.owner.*")
            .context("subscribing to partition owner changes")?;
        let liveness = Liveness::start(&nats, args)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let link = Arc::new(Self {
            tx,
            bus: bus.clone(),
            partitions: args.partitions,
            max_inflight: 100_000,
            state: Arc::new(Mutex::new(LinkState::default())),
            closed: AtomicBool::new(false),
            _nats: nats,
        });
        let sender = link.clone();
        std::thread::Builder::new()
            .name("courier-bus-out".into())
            .spawn(move || sender.send_loop(rx))
            .context("spawning the bus sender")?;
        let receiver = link.clone();
        std::thread::Builder::new()
            .name("courier-bus-in".into())
            .spawn(move || receiver.receive_loop(deliveries, owners, mailboxes))
            .context("spawning the bus receiver")?;
        let refresher = link.clone();
        std::thread::Builder::new()
            .name("courier-liveness".into())
            .spawn(move || liveness.run(&refresher))
            .context("spawning the liveness refresher")?;
        tracing::info!(
            nats = ?args.nats,
            partitions = args.partitions,
            node.id = args.node_id,
            "fleet link connected"
        );
        Ok(link)
    }

    fn submit(&self, cmd: Command) -> Result<(), Overloaded> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Overloaded);
        }
        let is_send = matches!(
            cmd,
            Command::Frame {
                frame: ClientFrame::Send { .. },
                ..
            }
        );
        if is_send && self.tx.len() >= self.max_inflight {
            return Err(Overloaded);
        }
        self.tx.send(cmd).map_err(|_| Overloaded)
    }

    fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Drains queued commands, one NATS message per partition per drain.
    fn send_loop(&self, rx: Receiver<Command>) {
        let mut batches: Vec<Vec<Command>> = (0..self.partitions).map(|_| Vec::new()).collect();
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(cmd) => cmd,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if self.closed.load(Ordering::Acquire) && rx.is_empty() {
                        return;
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(cmd) = next.take() {
                self.note(&cmd);
                match target(&cmd, self.partitions) {
                    Target::One(p) => batches[usize::from(p)].push(cmd),
                    Target::All => {
                        for batch in batches.iter_mut().skip(1) {
                            batch.extend(clone_command(&cmd));
                        }
                        batches[0].push(cmd);
                    }
                }
                taken += 1;
                if taken < 4096 {
                    next = rx.try_recv().ok();
                }
            }
            for (p, batch) in batches.iter_mut().enumerate() {
                if batch.is_empty() {
                    continue;
                }
                let subject = rfleet::command_subject(p as u16);
                let encode = |c: &[Command]| courier_router::wire::encode_commands(c);
                let published = rfleet::publish_split(&*self.bus, &subject, batch, &encode);
                batch.clear();
                if let Err(e) = published {
                    tracing::warn!(partition = p, error = %e, "publishing commands failed; clients retry");
                }
            }
        }
    }

    /// Keeps the session list and the catch-up merges up to date.
    fn note(&self, cmd: &Command) {
        let mut state = lock(&self.state);
        match cmd {
            Command::Attach {
                session,
                device,
                issued_at_s,
            } => {
                state.sessions.insert(
                    *session,
                    Attached {
                        device: device.clone(),
                        issued_at_s: *issued_at_s,
                    },
                );
            }
            Command::Detach { session, .. } => {
                state.sessions.remove(session);
                state.syncs.remove(session);
            }
            Command::Frame {
                session,
                frame: ClientFrame::Sync { .. },
                ..
            } => {
                let merge = state.syncs.entry(*session).or_default();
                for p in 0..self.partitions {
                    merge.owe(p, self.partitions);
                }
                merge.client_waiting = true;
            }
            Command::Frame { .. } | Command::Push(_) | Command::Peer(_) => {}
        }
    }

    fn receive_loop(
        &self,
        deliveries: courier_bus::Subscription,
        owners: courier_bus::Subscription,
        mailboxes: Vec<Arc<Mailbox<CoreMsg>>>,
    ) {
        let mut per_core: Vec<Vec<Delivery>> = (0..mailboxes.len()).map(|_| Vec::new()).collect();
        loop {
            crossbeam_channel::select! {
                recv(deliveries.receiver()) -> m => {
                    let Ok(m) = m else { return };
                    self.sort_message(m, &mut per_core);
                    // Whatever else already arrived joins this wake-up.
                    while let Ok(m) = deliveries.receiver().try_recv() {
                        self.sort_message(m, &mut per_core);
                    }
                    for (core, batch) in per_core.iter_mut().enumerate() {
                        if !batch.is_empty() {
                            mailboxes[core].push(CoreMsg::Deliveries(std::mem::take(batch)));
                        }
                    }
                }
                recv(owners.receiver()) -> m => {
                    let Ok(m) = m else { return };
                    let partition = m.subject.rsplit('.').next().and_then(|p| p.parse::<u16>().ok());
                    if let Some(p) = partition.filter(|p| *p < self.partitions) {
                        self.reattach(p);
                    }
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// Decodes one partition's delivery batch (`courier.gw.<node>.<p>`)
    /// and sorts it by core.
    fn sort_message(&self, m: courier_bus::Message, per_core: &mut [Vec<Delivery>]) {
        let partition = m
            .subject
            .rsplit('.')
            .next()
            .and_then(|p| p.parse::<u16>().ok());
        let Some(p) = partition.filter(|p| *p < self.partitions) else {
            tracing::warn!(subject = %m.subject, "dropped deliveries from an unknown partition");
            return;
        };
        match courier_router::wire::decode_deliveries(m.payload) {
            Ok(batch) => self.sort(p, batch, per_core),
            Err(e) => tracing::warn!(error = %e, "dropped a malformed delivery batch"),
        }
    }

    /// Sorts partition `p`'s deliveries by core, merging the partitions'
    /// `SyncDone`s.
    fn sort(&self, p: u16, batch: Vec<Delivery>, per_core: &mut [Vec<Delivery>]) {
        for delivery in batch {
            let delivery = match &delivery {
                Delivery::Frame { session, frame, .. } => match sync_done(frame) {
                    Some(more) => match self.merge_sync_done(*session, p, more) {
                        Some(done) => done,
                        None => continue,
                    },
                    None => delivery,
                },
                Delivery::Close { .. } => delivery,
            };
            if let Some(batch) = per_core.get_mut(usize::from(delivery.session().core)) {
                batch.push(delivery);
            }
        }
    }

    /// Counts partition `p`'s `SyncDone`; the last one the client waits
    /// for becomes the client's.
    fn merge_sync_done(&self, session: SessionKey, p: u16, more: bool) -> Option<Delivery> {
        let mut state = lock(&self.state);
        let merge = state.syncs.get_mut(&session)?;
        if let Some(n) = merge.owed.get_mut(usize::from(p)) {
            *n = n.saturating_sub(1);
        }
        merge.more |= more;
        if !merge.settled() {
            return None;
        }
        if !merge.client_waiting {
            // Only re-attach catch-ups were owed: nothing to tell.
            state.syncs.remove(&session);
            return None;
        }
        let more = merge.more;
        state.syncs.remove(&session);
        let mut payload = Vec::with_capacity(4);
        ServerFrame::SyncDone { more }.encode(&mut payload);
        let mut out = Vec::with_capacity(payload.len() + 2);
        courier_protocol::ws::encode_frame(
            &mut out,
            courier_protocol::ws::Opcode::Binary,
            &payload,
            None,
        );
        Some(Delivery::Frame {
            session,
            class: Class::Reply,
            frame: Bytes::from(out),
            origin: None,
        })
    }

    /// Attaches every session again at partition `p`'s new owner, with a
    /// catch-up. Its `SyncDone` answers a client's catch-up still waiting
    /// for `p` (whose request the old owner may never have answered, or
    /// that reached `p` while it had no owner), and is swallowed
    /// otherwise.
    fn reattach(&self, p: u16) {
        let mut commands = Vec::new();
        {
            let mut state = lock(&self.state);
            let sessions: Vec<(SessionKey, Device, u64)> = state
                .sessions
                .iter()
                .map(|(k, a)| (*k, a.device.clone(), a.issued_at_s))
                .collect();
            for (session, device, issued_at_s) in sessions {
                commands.push(Command::Attach {
                    session,
                    device: device.clone(),
                    issued_at_s,
                });
                commands.push(Command::Frame {
                    session,
                    device,
                    frame: ClientFrame::Sync {
                        tail: 0,
                        summary: false,
                        cursors: Vec::new(),
                    },
                    received_at: std::time::Instant::now(),
                });
                let merge = state.syncs.entry(session).or_default();
                if !(merge.client_waiting && merge.owes(p)) {
                    merge.owe(p, self.partitions);
                }
            }
        }
        tracing::info!(
            partition = p,
            sessions = commands.len() / 2,
            "partition has a new owner; attaching again"
        );
        for chunk in commands.chunks(2048) {
            let payload = Bytes::from(courier_router::wire::encode_commands(chunk));
            if let Err(e) = self.bus.publish(&rfleet::command_subject(p), payload) {
                tracing::warn!(partition = p, error = %e, "re-attaching failed");
            }
        }
    }
}

/// The gateway's liveness key in the `courier_gateways` bucket.
///
/// Written at start (after telling every partition that any earlier
/// process with this node id is gone, so a quick restart leaves no stale
/// sessions behind) and refreshed every third of the bucket's TTL by a
/// thread of its own. Routers detach the sessions of a gateway whose key
/// expired. If the key expired while this gateway lived (NATS was out of
/// reach longer than the TTL), routers may have detached its sessions:
/// the key is written again and every session attached again everywhere,
/// with a catch-up for what it missed. Deleted at a clean stop.
struct Liveness {
    kv: Arc<dyn Kv>,
    key: String,
    value: Bytes,
    revision: u64,
    every: Duration,
}

impl Liveness {
    fn start(nats: &Arc<Nats>, args: &ServeArgs) -> anyhow::Result<Self> {
        let ttl = Duration::from_millis(args.gateway_ttl_ms);
        let replicas = usize::from(args.nats_replicas);
        let kv: Arc<dyn Kv> =
            Arc::new(with_retries("opening the gateway liveness bucket", || {
                nats.kv(GATEWAYS_BUCKET, Some(ttl), replicas)
            })?);
        let bus = nats.pubsub();
        let started_ms = wall_ms();
        // Whatever an earlier process with this node id left attached is
        // dead; this reaches each partition before any attach of ours.
        let gone = [Command::Peer(PeerMsg::GatewayGone {
            node: args.node_id,
            last_seen_ms: started_ms,
        })];
        let payload = Bytes::from(courier_router::wire::encode_commands(&gone));
        for p in 0..args.partitions {
            with_retries("announcing this gateway's start", || {
                bus.publish(&rfleet::command_subject(p), payload.clone())
            })?;
        }
        let key = format!("{}{}", rfleet::GATEWAY_KEY_PREFIX, args.node_id);
        let value = Bytes::from(format!("{}.{started_ms}", std::process::id()));
        let revision = with_retries("writing the gateway liveness key", || {
            kv.put(&key, value.clone())
        })?;
        Ok(Self {
            kv,
            key,
            value,
            revision,
            every: ttl / 3,
        })
    }

    /// Refreshes the key until the link closes, then deletes it.
    fn run(mut self, link: &FleetLink) {
        loop {
            let mut slept = Duration::ZERO;
            while slept < self.every {
                if link.closed.load(Ordering::Acquire) {
                    let _ = self.kv.delete(&self.key, Some(self.revision));
                    return;
                }
                let step = Duration::from_millis(100).min(self.every - slept);
                std::thread::sleep(step);
                slept += step;
            }
            match self.kv.update(&self.key, self.value.clone(), self.revision) {
                Ok(revision) => self.revision = revision,
                Err(BusError::Conflict(_)) => match self.kv.put(&self.key, self.value.clone()) {
                    Ok(revision) => {
                        self.revision = revision;
                        tracing::warn!(
                            gateway.key = %self.key,
                            "liveness key had expired; attaching every session again"
                        );
                        for p in 0..link.partitions {
                            link.reattach(p);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot write the liveness key"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot refresh the liveness key"),
            }
        }
    }
}

/// The KV bucket of the gateways' liveness keys.
pub const GATEWAYS_BUCKET: &str = "courier_gateways";

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `Some(more)` when `ws` (a complete WebSocket frame from a router) is a
/// `SyncDone`.
fn sync_done(ws: &[u8]) -> Option<bool> {
    let len7 = *ws.get(1)? & 0x7f;
    let start = match len7 {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let payload = ws.get(start..)?;
    if payload.first() != Some(&frame::ty::SYNC_DONE) {
        return None;
    }
    match ServerFrame::decode(&Bytes::copy_from_slice(payload)) {
        Ok(ServerFrame::SyncDone { more }) => Some(more),
        _ => None,
    }
}

/// A copy of `cmd` for another partition (`None` for the push worker's
/// reports, which never cross the bus).
fn clone_command(cmd: &Command) -> Option<Command> {
    Some(match cmd {
        Command::Push(_) => return None,
        Command::Peer(msg) => Command::Peer(msg.clone()),
        Command::Attach {
            session,
            device,
            issued_at_s,
        } => Command::Attach {
            session: *session,
            device: device.clone(),
            issued_at_s: *issued_at_s,
        },
        Command::Detach {
            session,
            device,
            last_seen_ms,
        } => Command::Detach {
            session: *session,
            device: device.clone(),
            last_seen_ms: *last_seen_ms,
        },
        Command::Frame {
            session,
            device,
            frame,
            received_at,
        } => Command::Frame {
            session: *session,
            device: device.clone(),
            frame: frame.clone(),
            received_at: *received_at,
        },
    })
}

/// Calls `f` until it succeeds, for up to a minute.
fn with_retries<T>(
    what: &str,
    mut f: impl FnMut() -> Result<T, courier_bus::BusError>,
) -> anyhow::Result<T> {
    let started = std::time::Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                tracing::warn!(error = %e, "{what} failed; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).context(what.to_owned()),
        }
    }
}

/// Runs the router role until SIGTERM or SIGINT: serves this router's
/// share of the partitions, taking commands from and sending deliveries
/// over NATS.
pub fn run_router(args: ServeArgs) -> anyhow::Result<()> {
    // The endpoint first, so a bad address stops the start at once and
    // /healthz answers while NATS is being reached; /readyz turns ready
    // once the partition supervisor runs, and unready at a stop signal.
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(crate::process::ProcessCollector));
    let served = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "courier_router_partitions_served",
        "Partitions this router serves now",
        served.clone(),
    );
    let gateways_live = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "courier_fleet_gateways_live",
        "Gateways whose liveness key this router found at its last scan",
        gateways_live.clone(),
    );
    let gateways_expired = prometheus_client::metrics::counter::Counter::<u64>::default();
    registry.register(
        "courier_fleet_gateways_expired",
        "Gateway liveness keys that expired (the gateway died or lost NATS); their sessions were detached",
        gateways_expired.clone(),
    );
    let link_metrics = LinkMetrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let partition_metrics = Arc::new(rfleet::PartitionMetrics::new());
    let metrics_addr = crate::metrics::serve_plain(
        args.metrics_listen,
        Arc::new(registry),
        ready.clone(),
        partition_metrics.clone(),
    )
    .with_context(|| format!("binding the metrics endpoint {}", args.metrics_listen))?;
    tracing::info!(metrics.addr = %metrics_addr, "metrics endpoint bound");

    let nats = Nats::connect(&NatsConfig {
        servers: args.nats.clone(),
        name: format!("courier-router-{}", args.node_id),
        metrics: Some(link_metrics),
        ..NatsConfig::default()
    })
    .context("connecting to NATS")?;
    let replicas = usize::from(args.nats_replicas);
    // A cluster that just started may still be electing its JetStream
    // leaders: keep trying for a minute before giving up.
    let log = with_retries("opening the changelog stream", || {
        nats.log(
            "COURIER_LOG",
            &["courier.log.>"],
            replicas,
            Duration::from_secs(120),
        )
    })?;
    let ttl = Some(Duration::from_millis(args.lease_ttl_ms));
    let leases = with_retries("opening the lease bucket", || {
        nats.kv("courier_leases", ttl, replicas)
    })?;
    let gateway_ttl = Some(Duration::from_millis(args.gateway_ttl_ms));
    let gateways = with_retries("opening the gateway liveness bucket", || {
        nats.kv(GATEWAYS_BUCKET, gateway_ttl, replicas)
    })?;
    let bus: Arc<dyn PubSub> = Arc::new(nats.pubsub());
    let outlet_bus = bus.clone();
    let router_id = format!("router-{}", args.node_id);
    let config = rfleet::OwnerConfig {
        router_id: router_id.clone(),
        partitions: args.partitions,
        scan_interval: Duration::from_millis((args.lease_ttl_ms / 6).max(100)),
        data_dir: args.data_dir.join("partitions"),
        subject_prefix: "courier.log".into(),
        snapshot_min_bytes: args.snapshot_min_kib * 1024,
        router: RouterConfig {
            push: crate::node::push_config(&args)?,
            ..crate::node::router_config(&args)
        },
        intake: Some(bus),
        gateways: Some(Arc::new(gateways)),
        metrics: Some(partition_metrics),
    };
    let owner = rfleet::Owner::start(
        config,
        Arc::new(log),
        Arc::new(leases),
        Arc::new(move |p| Arc::new(rfleet::BusOutlet(outlet_bus.clone(), p))),
    )
    .context("starting the partition supervisor")?;
    tracing::info!(router.id = %router_id, partitions = args.partitions, "router started");
    let owner = Arc::new(owner);
    ready.store(true, Ordering::Release);
    // The supervisor's figures, sampled twice a second by a thread that
    // ends before the supervisor is stopped.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (owner, sampling) = (owner.clone(), sampling.clone());
        std::thread::Builder::new()
            .name("router-gauges".into())
            .spawn(move || {
                while sampling.load(Ordering::Acquire) {
                    served.set(owner.owned().len() as i64);
                    let (live, expired) = owner.gateways();
                    gateways_live.set(live as i64);
                    gateways_expired.inc_by(expired.saturating_sub(gateways_expired.get()));
                    std::thread::sleep(Duration::from_millis(500));
                }
            })?
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    if let Some(signal) = signals.forever().next() {
        tracing::info!(signal, "signal received; handing the partitions back");
    }
    ready.store(false, Ordering::Release);
    sampling.store(false, Ordering::Release);
    if sampler.join().is_err() {
        tracing::error!("gauge sampler panicked");
    }
    match Arc::try_unwrap(owner) {
        Ok(owner) => owner.stop(),
        Err(_) => tracing::error!("partition supervisor still shared; not stopped cleanly"),
    }
    tracing::info!("router stopped");
    Ok(())
}
