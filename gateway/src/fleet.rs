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
//! - attach, detach, catch-up (`Sync`) and the chat list: every partition,
//!   since a user's conversations are spread over all of them. The link
//!   merges the partitions' `SyncDone`s into the one the client expects
//!   (`more` if any partition has more), and their `Chats` pages into one
//!   page (`merge_chat_pages`); a chat list that some partition leaves
//!   unanswered for 5 s is answered 504;
//! - presence: the named users' partitions, which alone keep their
//!   presence, the answers merged into one (`presence.rs`);
//! - what belongs to the user (group creation, settings, devices, keys,
//!   archives): the user's own partition (`BundleFetch`: the fetched
//!   user's).
//!
//! When a router starts serving a partition (after a takeover) it says so
//! on `courier.owner.<p>`; the link attaches every session it holds there
//! again and runs a catch-up for it, so the new owner delivers live at once
//! and anything the old owner acknowledged but did not fan out arrives
//! (clients dedupe by sequence). That catch-up's `SyncDone` is not passed on.
//! Chat lists and presence requests still waiting for `p`'s answer are
//! sent there again, and every session's presence subscriptions there.
//!
//! Liveness: the gateway keeps `gateway.<node>` alive in the
//! `courier_gateways` KV bucket (`Liveness`); routers detach the sessions
//! of a gateway whose key expired, so a crashed gateway's users go offline
//! by themselves. A partition that detaches this gateway's sessions (the
//! key was found gone, or a restart's announcement) says so on
//! `courier.detached.<node>.<p>`; if this gateway is alive all the same
//! (the verdict was wrong: a listing that left the key out, a replica that
//! lagged), it attaches every session to `p` again with a catch-up, as for
//! a new owner, instead of leaving its clients without live deliveries
//! from `p` until they reconnect.

use std::cmp::Ordering as Order;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use courier_bus::metrics::LinkMetrics;
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::{BusError, Kv, PubSub};
use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{self, Chat, ClientFrame, ServerFrame};
use courier_router::api::{Class, Command, Delivery, Device, PeerMsg, SessionKey};
use courier_router::fleet::{self as rfleet, partition_of};
use courier_router::{Overloaded, RouterConfig, RouterHandle};
use crossbeam_channel::{Receiver, Sender};
use rustc_hash::FxHashMap;

use crate::config::ServeArgs;

mod presence;
use crate::core::CoreMsg;
use crate::mailbox::Mailbox;
use presence::PresenceSplits;

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
    /// A catch-up of the client's finished: the user's partition let the
    /// session in, so a new owner of another partition may serve it one
    /// directly.
    synced: bool,
}

/// Where a session's catch-up stands with one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Caught up: live messages from the partition pass.
    Live,
    /// Catching up: its live messages wait for its `SyncDone`.
    Syncing,
    /// Its catch-up ended with more to come: its live messages are
    /// dropped (the next catch-up brings them, in order) until then.
    Behind,
}

/// Live messages of one session held back while some partition's
/// catch-up for it is not done.
///
/// A partition's messages reach a session through the session's user's
/// partition, which relays them, while its catch-up comes straight from
/// it: a message stored after the partition read the catch-up can arrive
/// before the catch-up does, and would be seen out of order. So from the
/// moment a catch-up is asked until that partition's `SyncDone`, its live
/// messages wait here, and go to the client after its catch-up.
#[derive(Debug, Default)]
struct Hold {
    /// By partition; created at the partition count on first use.
    stages: Vec<Stage>,
    held: Vec<(u16, Delivery)>,
}

impl Hold {
    fn stage(&self, p: u16) -> Stage {
        self.stages
            .get(usize::from(p))
            .copied()
            .unwrap_or(Stage::Live)
    }

    fn set(&mut self, p: u16, stage: Stage, partitions: u16) {
        if self.stages.is_empty() {
            self.stages = vec![Stage::Live; usize::from(partitions)];
        }
        if let Some(s) = self.stages.get_mut(usize::from(p)) {
            *s = stage;
        }
    }

    fn all_live(&self) -> bool {
        self.stages.iter().all(|s| *s == Stage::Live)
    }
}

/// Most live messages one session may have held for catch-ups still
/// running; one more closes it as a slow consumer (4003), and its next
/// catch-up brings them.
const MAX_HELD: usize = 4096;

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

/// How long a chat list waits for every partition's page before the
/// client is answered 504 (as long as a parked per-device send waits for
/// device lists): a partition changing owner may never answer.
const CHAT_LIST_WAIT: Duration = Duration::from_secs(5);

/// How often the receiver looks for chat lists past their deadline.
const CHAT_LIST_SWEEP: Duration = Duration::from_millis(100);

/// Most chat lists one session may have waiting for the partitions. Each
/// holds the pages already in until the last comes, so without a bound a
/// client asking in a loop while a partition has no owner would have the
/// gateway hold 5 s worth of its requests' pages; one more is refused
/// (429).
const CHAT_LISTS_PER_SESSION: usize = 8;

/// One chat list gathered from every partition.
#[derive(Debug)]
struct ChatMerge {
    request: u32,
    /// The page size the client asked for (0: the server's default).
    asked: u16,
    /// What was sent, to send again to a partition that changes owner
    /// before it answers.
    device: Device,
    frame: ClientFrame,
    /// Each partition's page (index: partition), `None` until it answers;
    /// an error counts as an empty page.
    pages: Vec<Option<ChatPage>>,
    /// The client has its answer already (the first error); the other
    /// partitions' answers are dropped as they come.
    answered: bool,
    /// Over the session's limit: never sent, answered 429 at the next
    /// sweep (`pages` is empty, so no partition owes it).
    refused: bool,
    deadline: Instant,
}

impl ChatMerge {
    fn owes(&self, p: u16) -> bool {
        self.pages.get(usize::from(p)).is_some_and(Option::is_none)
    }
}

/// One partition's page of a chat list.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ChatPage {
    more: bool,
    chats: Vec<Chat>,
}

/// What became of a partition's answer to a chat list.
#[derive(Debug)]
enum Gathered {
    /// No chat list of the session waits for this partition's answer to
    /// this request.
    Unclaimed,
    /// Kept for the merge, or dropped because the client has its answer.
    Held,
    /// The answer goes to the client as it is (the first error).
    Pass,
    /// The merged page, for the client.
    Merged(Delivery),
}

impl Gathered {
    /// What becomes of a partition's answer to a request gathered from
    /// several, once recorded: the first error goes to the client at once;
    /// other answers wait until every partition has answered, and are
    /// dropped if the client had an error. `None`: the answers are all in
    /// and the merged one is due.
    fn fate(first_error: bool, answered: bool, complete: bool) -> Option<Self> {
        if first_error {
            Some(Self::Pass)
        } else if !complete || answered {
            Some(Self::Held)
        } else {
            None
        }
    }
}

#[derive(Debug, Default)]
struct LinkState {
    sessions: FxHashMap<SessionKey, Attached>,
    syncs: FxHashMap<SessionKey, SyncMerge>,
    /// Sessions with a partition not caught up (see [`Hold`]).
    holds: FxHashMap<SessionKey, Hold>,
    chat_lists: ChatLists,
    presence: PresenceSplits,
}

impl LinkState {
    /// A live message from partition `p`: passed on, or held while `p`'s
    /// catch-up for the session runs, or dropped if that catch-up ended
    /// with more to come. A session holding too many is closed.
    fn hold(&mut self, p: u16, session: SessionKey, delivery: Delivery) -> Option<Delivery> {
        let Some(hold) = self.holds.get_mut(&session) else {
            return Some(delivery);
        };
        match hold.stage(p) {
            Stage::Live => Some(delivery),
            Stage::Behind => None,
            Stage::Syncing if hold.held.len() < MAX_HELD => {
                hold.held.push((p, delivery));
                None
            }
            Stage::Syncing => {
                self.holds.remove(&session);
                tracing::debug!(
                    partition = p,
                    "closing a session holding too many messages for a catch-up"
                );
                Some(Delivery::Close {
                    session,
                    code: courier_protocol::close::SLOW_CONSUMER,
                    reason: "too many messages waiting for a catch-up",
                })
            }
        }
    }

    /// Partition `p`'s catch-up for `session` is done: the live messages
    /// held for it follow it, or, if it ended with more to come, are
    /// dropped (the client's next catch-up brings them in order).
    fn release(
        &mut self,
        session: SessionKey,
        p: u16,
        more: bool,
        partitions: u16,
    ) -> Vec<Delivery> {
        let Some(hold) = self.holds.get_mut(&session) else {
            return Vec::new();
        };
        if hold.stage(p) != Stage::Syncing {
            return Vec::new();
        }
        let stage = if more { Stage::Behind } else { Stage::Live };
        hold.set(p, stage, partitions);
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut hold.held)
            .into_iter()
            .partition(|(from, _)| *from == p);
        hold.held = rest;
        if hold.all_live() {
            self.holds.remove(&session);
        }
        if more {
            return Vec::new();
        }
        // In sequence order per conversation: while `p` changed owner, or
        // its relays' partition did, two processes may have published
        // them, and their arrival order is not the order they were made.
        let mut released: Vec<(Option<(String, u64)>, Delivery)> = mine
            .into_iter()
            .map(|(_, d)| (message_position(&d), d))
            .collect();
        released.sort_by(|a, b| a.0.cmp(&b.0));
        released.into_iter().map(|(_, d)| d).collect()
    }

    /// The session's catch-up was asked of `partitions` (all of `of`):
    /// their live messages wait for their `SyncDone`s.
    fn syncing(&mut self, session: SessionKey, asked: impl Iterator<Item = u16>, of: u16) {
        let hold = self.holds.entry(session).or_default();
        for p in asked {
            hold.set(p, Stage::Syncing, of);
        }
    }

    /// A new session: nothing live before its client asks for a catch-up.
    fn attached(&mut self, session: SessionKey, partitions: u16) {
        let hold = self.holds.entry(session).or_default();
        for p in 0..partitions {
            hold.set(p, Stage::Behind, partitions);
        }
    }
}

/// Chat lists waiting for the partitions' pages, by session, oldest first
/// (a partition answers in the order it was asked).
///
/// A chat list is added by `handle_sent` as its `ChatList` leaves for the
/// partitions, and removed when the last partition answers
/// (`handle_answer`), at its deadline (`poll_expired`, which answers the
/// client 504) or at the session's detach (`forget`).
#[derive(Debug, Default)]
struct ChatLists(FxHashMap<SessionKey, Vec<ChatMerge>>);

impl ChatLists {
    /// `frame` (a `ChatList`) is leaving for every one of `partitions`;
    /// false when the session has too many waiting already, and it is to
    /// stay here (answered 429 by `poll_expired`).
    fn handle_sent(
        &mut self,
        session: SessionKey,
        device: &Device,
        frame: &ClientFrame,
        partitions: u16,
        now: Instant,
    ) -> bool {
        let ClientFrame::ChatList { request, limit, .. } = frame else {
            return true;
        };
        let lists = self.0.entry(session).or_default();
        let refused = lists.iter().filter(|m| !m.refused).count() >= CHAT_LISTS_PER_SESSION;
        let (pages, deadline) = if refused {
            (Vec::new(), now)
        } else {
            (vec![None; usize::from(partitions)], now + CHAT_LIST_WAIT)
        };
        lists.push(ChatMerge {
            request: *request,
            asked: *limit,
            device: device.clone(),
            frame: frame.clone(),
            pages,
            answered: false,
            refused,
            deadline,
        });
        !refused
    }

    /// Takes partition `p`'s answer to chat list `request` of `session`:
    /// its page, or `None` for an error. The first error goes to the client
    /// at once; once every partition has answered, their pages merged.
    ///
    /// Errors share their `reference` with sends' client ids, and 0 with
    /// frames that have no id, so an error is taken for a chat list's only
    /// when that partition still owes that request a page; a client that
    /// reuses an id while the chat list is out cannot tell them apart
    /// either.
    fn handle_answer(
        &mut self,
        session: SessionKey,
        p: u16,
        request: u32,
        page: Option<ChatPage>,
    ) -> Gathered {
        let Some(lists) = self.0.get_mut(&session) else {
            return Gathered::Unclaimed;
        };
        let Some(i) = lists.iter().position(|m| m.request == request && m.owes(p)) else {
            return Gathered::Unclaimed;
        };
        let merge = &mut lists[i];
        let first_error = page.is_none() && !merge.answered;
        merge.answered |= first_error;
        merge.pages[usize::from(p)] = Some(page.unwrap_or_default());
        let complete = merge.pages.iter().all(Option::is_some);
        let fate = Gathered::fate(first_error, merge.answered, complete);
        if !complete {
            return fate.unwrap_or(Gathered::Held);
        }
        let merge = lists.remove(i);
        if lists.is_empty() {
            self.0.remove(&session);
        }
        if let Some(fate) = fate {
            return fate;
        }
        let pages = merge.pages.into_iter().flatten().collect();
        let ChatPage { more, chats } = merge_chat_pages(merge.asked, pages);
        let chats = ServerFrame::Chats {
            request,
            more,
            chats,
        };
        Gathered::Merged(reply(session, &chats))
    }

    /// The session ended: its chat lists are answered nowhere.
    fn forget(&mut self, session: SessionKey) {
        self.0.remove(&session);
    }

    /// Forgets every chat list past its deadline, with a 504 for each
    /// client still waiting (429 for those refused).
    fn poll_expired(&mut self, now: Instant) -> Vec<Delivery> {
        let mut expired = Vec::new();
        self.0.retain(|session, lists| {
            lists.retain(|merge| {
                if merge.deadline > now {
                    return true;
                }
                let reference = u64::from(merge.request);
                if merge.refused {
                    let refusal = ServerFrame::Error {
                        code: ErrorCode::RateLimited as u16,
                        reference,
                        detail: "too many chat lists waiting; retry in 1000 ms".into(),
                    };
                    expired.push(reply(*session, &refusal));
                } else if !merge.answered {
                    let missing: Vec<usize> = (0..merge.pages.len())
                        .filter(|p| merge.pages[*p].is_none())
                        .collect();
                    tracing::debug!(
                        partitions = ?missing,
                        "a chat list's partitions did not all answer; answered 504"
                    );
                    let timeout = ServerFrame::Error {
                        code: ErrorCode::Unavailable as u16,
                        reference,
                        detail: "not every partition answered the chat list in time; retry".into(),
                    };
                    expired.push(reply(*session, &timeout));
                }
                false
            });
            !lists.is_empty()
        });
        expired
    }

    /// The `ChatList`s still waiting for partition `p`, to send there again.
    fn owed_by(&self, p: u16) -> Vec<Command> {
        let mut commands = Vec::new();
        for (session, lists) in &self.0 {
            for merge in lists.iter().filter(|m| !m.answered && m.owes(p)) {
                commands.push(Command::Frame {
                    session: *session,
                    device: merge.device.clone(),
                    frame: merge.frame.clone(),
                    received_at: Instant::now(),
                });
            }
        }
        commands
    }
}

/// The gateway's side of fleet mode.
pub struct FleetLink {
    tx: Sender<Command>,
    bus: Arc<dyn PubSub>,
    partitions: u16,
    max_inflight: usize,
    state: Arc<Mutex<LinkState>>,
    closed: AtomicBool,
    /// The last seen this gateway's start announced (`GatewayGone` for
    /// its node id): a detach notice echoing it is about an earlier
    /// process's sessions, not ours.
    started_ms: u64,
    /// Detach notices acted on (`courier_fleet_detach_notices_total`).
    detach_notices: prometheus_client::metrics::counter::Counter,
    /// Gaps of the NATS link repaired (`courier_fleet_link_gaps_total`),
    /// and the link's gap count when last repaired.
    link_gaps: prometheus_client::metrics::counter::Counter,
    gaps_seen: std::sync::atomic::AtomicU64,
    nats: Arc<Nats>,
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
        // Only the user's partition routes the user's sessions.
        Command::Attach { device, .. } => {
            return Target::One(partition_of(&device.user, partitions))
        }
        // Every partition may hold presence subscriptions of the session.
        Command::Detach { .. } => return Target::All,
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
        // The user's partition hands a catch-up to every other partition,
        // once the session's route is there.
        ClientFrame::ChatList { .. } => Target::All,
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
        // Before the start announcement, whose detaches it may tell of.
        let detached = bus
            .subscribe(&rfleet::detached_subjects(args.node_id))
            .context("subscribing to detach notices")?;
        let detach_notices = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "courier_fleet_detach_notices",
            "Partitions that detached this gateway's sessions while it lived (its liveness key was taken for gone) and had them attached again",
            detach_notices.clone(),
        );
        let link_gaps = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "courier_fleet_link_gaps",
            "Times this gateway's NATS link reconnected or dropped messages, after which every session was caught up again",
            link_gaps.clone(),
        );
        let liveness = Liveness::start(&nats, args)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let link = Arc::new(Self {
            tx,
            bus: bus.clone(),
            partitions: args.partitions,
            max_inflight: 100_000,
            state: Arc::new(Mutex::new(LinkState::default())),
            closed: AtomicBool::new(false),
            started_ms: liveness.started_ms,
            detach_notices,
            link_gaps,
            gaps_seen: std::sync::atomic::AtomicU64::new(nats.gaps()),
            nats,
        });
        let sender = link.clone();
        std::thread::Builder::new()
            .name("courier-bus-out".into())
            .spawn(move || sender.send_loop(rx))
            .context("spawning the bus sender")?;
        let receiver = link.clone();
        std::thread::Builder::new()
            .name("courier-bus-in".into())
            .spawn(move || receiver.receive_loop(deliveries, owners, detached, mailboxes))
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
                let publish = self.note(&cmd);
                if let Some(shares) = self.split_presence(&cmd) {
                    for (p, command) in shares {
                        batches[usize::from(p)].push(command);
                    }
                    taken += 1;
                    if taken < 4096 {
                        next = rx.try_recv().ok();
                    }
                    continue;
                }
                match target(&cmd, self.partitions) {
                    _ if !publish => {}
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

    /// A presence request's shares, one command per partition (see
    /// `presence.rs`); `None` for any other command.
    fn split_presence(&self, cmd: &Command) -> Option<Vec<(u16, Command)>> {
        let Command::Frame {
            session,
            device,
            frame:
                frame @ (ClientFrame::PresenceQuery { .. } | ClientFrame::PresenceSubscribe { .. }),
            received_at,
        } = cmd
        else {
            return None;
        };
        let shares = lock(&self.state).presence.split(
            *session,
            device,
            frame,
            self.partitions,
            Instant::now(),
        );
        Some(
            shares
                .into_iter()
                .map(|(p, frame)| {
                    let command = Command::Frame {
                        session: *session,
                        device: device.clone(),
                        frame,
                        received_at: *received_at,
                    };
                    (p, command)
                })
                .collect(),
        )
    }

    /// Keeps the session list and the catch-up and chat list merges up to
    /// date; false when `cmd` is not to be sent (a chat list over the
    /// session's limit, answered by the receiver).
    fn note(&self, cmd: &Command) -> bool {
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
                        synced: false,
                    },
                );
                // Nothing live before the client's catch-up, as on a
                // single node: relayed messages are dropped until it asks.
                state.attached(*session, self.partitions);
            }
            Command::Detach { session, .. } => {
                state.sessions.remove(session);
                state.syncs.remove(session);
                state.holds.remove(session);
                state.chat_lists.forget(*session);
                state.presence.forget(*session);
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
                state.syncing(*session, 0..self.partitions, self.partitions);
            }
            Command::Frame {
                session,
                device,
                frame: frame @ ClientFrame::ChatList { .. },
                ..
            } => {
                let now = Instant::now();
                return state
                    .chat_lists
                    .handle_sent(*session, device, frame, self.partitions, now);
            }
            Command::Frame { .. } | Command::Push(_) | Command::Peer(_) => {}
        }
        true
    }

    fn receive_loop(
        &self,
        deliveries: courier_bus::Subscription,
        owners: courier_bus::Subscription,
        detached: courier_bus::Subscription,
        mailboxes: Vec<Arc<Mailbox<CoreMsg>>>,
    ) {
        let mut per_core: Vec<Vec<Delivery>> = (0..mailboxes.len()).map(|_| Vec::new()).collect();
        let mut swept = Instant::now();
        loop {
            crossbeam_channel::select! {
                recv(deliveries.receiver()) -> m => {
                    let Ok(m) = m else { return };
                    self.sort_message(m, &mut per_core);
                    // Whatever else already arrived joins this wake-up.
                    while let Ok(m) = deliveries.receiver().try_recv() {
                        self.sort_message(m, &mut per_core);
                    }
                }
                recv(owners.receiver()) -> m => {
                    let Ok(m) = m else { return };
                    if let Some(p) = self.partition_of_subject(&m.subject) {
                        self.reattach(p, Reattach::NewOwner);
                    }
                }
                recv(detached.receiver()) -> m => {
                    let Ok(m) = m else { return };
                    self.detach_notice(&m);
                }
                default(CHAT_LIST_SWEEP) => {}
            }
            let now = Instant::now();
            if now.duration_since(swept) >= CHAT_LIST_SWEEP {
                swept = now;
                self.repair_link_gap();
                let expired = {
                    let mut state = lock(&self.state);
                    let mut expired = state.chat_lists.poll_expired(now);
                    expired.extend(state.presence.poll_expired(now));
                    expired
                };
                for delivery in expired {
                    if let Some(batch) = per_core.get_mut(usize::from(delivery.session().core)) {
                        batch.push(delivery);
                    }
                }
            }
            for (core, batch) in per_core.iter_mut().enumerate() {
                if !batch.is_empty() {
                    mailboxes[core].push(CoreMsg::Deliveries(std::mem::take(batch)));
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// The partition a subject ends with (`courier.owner.<p>`,
    /// `courier.gw.<node>.<p>`, `courier.detached.<node>.<p>`), if it is
    /// one of this fleet's.
    fn partition_of_subject(&self, subject: &str) -> Option<u16> {
        subject
            .rsplit('.')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p < self.partitions)
    }

    /// After the NATS link reconnected or dropped messages, whatever was
    /// published to this gateway meanwhile is gone (plain subjects do
    /// not resend): every session is attached again at its user's
    /// partition with a catch-up, which that partition hands every other.
    fn repair_link_gap(&self) {
        let gaps = self.nats.gaps();
        if self.gaps_seen.swap(gaps, Ordering::AcqRel) == gaps {
            return;
        }
        self.link_gaps.inc();
        tracing::warn!("the NATS link reconnected or dropped messages; catching every session up");
        for p in 0..self.partitions {
            self.reattach(p, Reattach::Reconnected);
        }
    }

    /// Partition `p` detached this gateway's sessions (`courier.detached.<node>.<p>`):
    /// unless it did so on this process's own start announcement, attach
    /// them all there again, with a catch-up for what they missed.
    fn detach_notice(&self, m: &courier_bus::Message) {
        let partition = self.partition_of_subject(&m.subject);
        let (Some(p), Some(last_seen_ms)) = (partition, rfleet::decode_detached(&m.payload)) else {
            tracing::warn!(subject = %m.subject, "dropped a malformed detach notice");
            return;
        };
        if last_seen_ms == self.started_ms {
            return;
        }
        self.detach_notices.inc();
        tracing::warn!(
            partition = p,
            last_seen_ms,
            "a partition detached this live gateway's sessions; attaching them again"
        );
        self.reattach(p, Reattach::Detached);
    }

    /// Decodes one partition's delivery batch (`courier.gw.<node>.<p>`)
    /// and sorts it by core.
    fn sort_message(&self, m: courier_bus::Message, per_core: &mut [Vec<Delivery>]) {
        let Some(p) = self.partition_of_subject(&m.subject) else {
            tracing::warn!(subject = %m.subject, "dropped deliveries from an unknown partition");
            return;
        };
        match courier_router::wire::decode_deliveries(m.payload) {
            Ok(batch) => self.sort(p, batch, per_core),
            Err(e) => tracing::warn!(error = %e, "dropped a malformed delivery batch"),
        }
    }

    /// Sorts partition `p`'s deliveries by core, merging the partitions'
    /// `SyncDone`s and chat list pages and holding live messages that
    /// came ahead of `p`'s catch-up.
    fn sort(&self, p: u16, batch: Vec<Delivery>, per_core: &mut [Vec<Delivery>]) {
        let mut out = Vec::with_capacity(batch.len());
        for delivery in batch {
            self.gather(p, delivery, &mut out);
        }
        for delivery in out {
            if let Some(batch) = per_core.get_mut(usize::from(delivery.session().core)) {
                batch.push(delivery);
            }
        }
    }

    /// Adds to `out` what the client gets of partition `p`'s `delivery`:
    /// the delivery itself, an answer merged from every partition's, live
    /// messages it held for `p`'s catch-up, or nothing (yet).
    fn gather(&self, p: u16, delivery: Delivery, out: &mut Vec<Delivery>) {
        let (session, live_message, answer) = match &delivery {
            Delivery::Frame {
                session,
                class,
                frame,
                origin,
            } => {
                let live = *class == Class::Message && origin.is_some();
                let answer = if live { None } else { answer_of(frame) };
                (*session, live, answer)
            }
            Delivery::Close { .. } => {
                out.push(delivery);
                return;
            }
        };
        if live_message {
            out.extend(self.hold(p, session, delivery));
            return;
        }
        let Some(answer) = answer else {
            out.push(delivery);
            return;
        };
        if let Answer::SyncDone { more } = answer {
            out.extend(self.merge_sync_done(session, p, more));
            out.extend(self.release(session, p, more));
            return;
        }
        out.extend(self.gather_answer(p, session, delivery, answer));
    }

    fn hold(&self, p: u16, session: SessionKey, delivery: Delivery) -> Option<Delivery> {
        lock(&self.state).hold(p, session, delivery)
    }

    fn release(&self, session: SessionKey, p: u16, more: bool) -> Vec<Delivery> {
        lock(&self.state).release(session, p, more, self.partitions)
    }

    /// An answer of partition `p` other than a `SyncDone`.
    fn gather_answer(
        &self,
        p: u16,
        session: SessionKey,
        delivery: Delivery,
        answer: Answer,
    ) -> Option<Delivery> {
        match answer {
            Answer::SyncDone { .. } => Some(delivery),
            Answer::Chats { request, page } => {
                let mut state = lock(&self.state);
                match state
                    .chat_lists
                    .handle_answer(session, p, request, Some(page))
                {
                    Gathered::Merged(merged) => Some(merged),
                    Gathered::Held | Gathered::Pass => None,
                    Gathered::Unclaimed => {
                        // Late: the client was answered 504 already, or
                        // two owners of `p` answered.
                        tracing::debug!(partition = p, "dropped an unclaimed chat list page");
                        None
                    }
                }
            }
            Answer::Error { reference } => {
                let Ok(request) = u32::try_from(reference) else {
                    return Some(delivery);
                };
                let mut state = lock(&self.state);
                let gathered = match state.chat_lists.handle_answer(session, p, request, None) {
                    Gathered::Unclaimed => state.presence.answer(session, p, request, None),
                    other => other,
                };
                match gathered {
                    Gathered::Unclaimed | Gathered::Pass => Some(delivery),
                    Gathered::Held => None,
                    Gathered::Merged(merged) => Some(merged),
                }
            }
            Answer::Presence { request, entries } => {
                let mut state = lock(&self.state);
                match state.presence.answer(session, p, request, Some(entries)) {
                    // Pushes, and answers to requests not split.
                    Gathered::Unclaimed | Gathered::Pass => Some(delivery),
                    Gathered::Held => None,
                    Gathered::Merged(merged) => Some(merged),
                }
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
        if let Some(attached) = state.sessions.get_mut(&session) {
            attached.synced = true;
        }
        Some(reply(session, &ServerFrame::SyncDone { more }))
    }

    /// Repairs what partition `p` lost of this gateway's sessions: `why`
    /// is [`Reattach::NewOwner`] when `p` has a new owner, which has no
    /// routes and may have stored messages its predecessor never relayed;
    /// otherwise `p` dropped its routes of this gateway (a wrong "gateway
    /// gone", or the liveness key lapsed).
    ///
    /// The sessions of `p`'s users are attached there again with a
    /// catch-up, which `p` hands every other partition: while `p` had no
    /// routes they dropped what they relayed for them. With a new owner,
    /// every other session that finished a catch-up is also served one by
    /// `p` directly, for what `p` stored but did not relay. Each
    /// `SyncDone` answers a client's catch-up still waiting for that
    /// partition, and is swallowed otherwise.
    fn reattach(&self, p: u16, why: Reattach) {
        let mut commands = Vec::new();
        let chat_lists;
        let presence;
        let (mut attached, mut resynced) = (0usize, 0usize);
        {
            let mut state = lock(&self.state);
            let sessions: Vec<(SessionKey, Device, u64, bool)> = state
                .sessions
                .iter()
                .map(|(k, a)| (*k, a.device.clone(), a.issued_at_s, a.synced))
                .collect();
            for (session, device, issued_at_s, synced) in sessions {
                let home = partition_of(&device.user, self.partitions) == p;
                let resync = why == Reattach::NewOwner && synced;
                if !(home || resync) {
                    continue;
                }
                if home {
                    attached += 1;
                    commands.push(Command::Attach {
                        session,
                        device: device.clone(),
                        issued_at_s,
                    });
                } else {
                    resynced += 1;
                }
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
                let asked: Vec<u16> = if home {
                    (0..self.partitions).collect()
                } else {
                    vec![p]
                };
                let merge = state.syncs.entry(session).or_default();
                for &q in &asked {
                    if !(merge.client_waiting && merge.owes(q)) {
                        merge.owe(q, self.partitions);
                    }
                }
                state.syncing(session, asked.into_iter(), self.partitions);
            }
            // After the attaches: chat lists still waiting for `p`, which
            // the old owner may never have answered. An answer from both
            // is taken once; the second is unclaimed and dropped.
            let owed = state.chat_lists.owed_by(p);
            chat_lists = owed.len();
            commands.extend(owed);
            // And presence: requests it owes, and the subscriptions its
            // new owner does not have.
            let owed = state.presence.owed_by(p, self.partitions);
            presence = owed.len();
            commands.extend(owed);
        }
        tracing::info!(
            partition = p,
            attached,
            resynced,
            chat_lists,
            presence,
            why = why.as_str(),
            "attaching the partition's sessions again"
        );
        for chunk in commands.chunks(2048) {
            let payload = Bytes::from(courier_router::wire::encode_commands(chunk));
            if let Err(e) = self.bus.publish(&rfleet::command_subject(p), payload) {
                tracing::warn!(partition = p, error = %e, "re-attaching failed");
            }
        }
    }
}

/// Why a gateway repairs what a partition holds of its sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reattach {
    /// The partition has a new owner.
    NewOwner,
    /// The partition detached this gateway's sessions, taking it for gone.
    Detached,
    /// This gateway's liveness key expired while it lived.
    LivenessExpired,
    /// This gateway's NATS link reconnected or dropped messages.
    Reconnected,
}

impl Reattach {
    fn as_str(self) -> &'static str {
        match self {
            Self::NewOwner => "new owner",
            Self::Detached => "detached",
            Self::LivenessExpired => "liveness key expired",
            Self::Reconnected => "link gap",
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
    /// When this process started: the last seen its start announcement
    /// gave its node id's earlier sessions.
    started_ms: u64,
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
            started_ms,
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
                            link.reattach(p, Reattach::LivenessExpired);
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

/// An answer from a partition that the link gathers before the client
/// sees it.
#[derive(Debug)]
enum Answer {
    SyncDone {
        more: bool,
    },
    Chats {
        request: u32,
        page: ChatPage,
    },
    /// Any error: it may answer a chat list or a presence request
    /// (`reference`: its request).
    Error {
        reference: u64,
    },
    /// Presence: an answer, or a push (`request` 0).
    Presence {
        request: u32,
        entries: Vec<frame::PresenceEntry>,
    },
}

/// What `ws` (a complete WebSocket frame from a router) is, when it is an
/// answer the link gathers; `None` for everything else, undecoded.
fn answer_of(ws: &Bytes) -> Option<Answer> {
    let start = payload_start(ws)?;
    let ty = *ws.get(start)?;
    if ![
        frame::ty::SYNC_DONE,
        frame::ty::CHATS,
        frame::ty::ERROR,
        frame::ty::PRESENCE,
    ]
    .contains(&ty)
    {
        return None;
    }
    match ServerFrame::decode(&ws.slice(start..)) {
        Ok(ServerFrame::SyncDone { more }) => Some(Answer::SyncDone { more }),
        Ok(ServerFrame::Chats {
            request,
            more,
            chats,
        }) => Some(Answer::Chats {
            request,
            page: ChatPage { more, chats },
        }),
        Ok(ServerFrame::Error { reference, .. }) => Some(Answer::Error { reference }),
        Ok(ServerFrame::Presence { request, entries }) => {
            Some(Answer::Presence { request, entries })
        }
        _ => None,
    }
}

/// Where the payload of `ws`, a WebSocket frame as a router built it
/// (unmasked), starts.
fn payload_start(ws: &[u8]) -> Option<usize> {
    Some(match *ws.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    })
}

/// The conversation and sequence of a delivered `Message` frame.
fn message_position(d: &Delivery) -> Option<(String, u64)> {
    let Delivery::Frame { frame, .. } = d else {
        return None;
    };
    let start = payload_start(frame)?;
    match ServerFrame::decode(&frame.slice(start..)) {
        Ok(ServerFrame::Message {
            conversation, seq, ..
        }) => Some((conversation, seq)),
        _ => None,
    }
}

/// `frame` for `session` as one WebSocket binary frame.
fn reply(session: SessionKey, frame: &ServerFrame) -> Delivery {
    let mut payload = Vec::with_capacity(64);
    frame.encode(&mut payload);
    let mut out = Vec::with_capacity(payload.len() + 10);
    courier_protocol::ws::encode_frame(
        &mut out,
        courier_protocol::ws::Opcode::Binary,
        &payload,
        None,
    );
    Delivery::Frame {
        session,
        class: Class::Reply,
        frame: Bytes::from(out),
        origin: None,
    }
}

/// The chat list's page size when the client asks 0, as docs/protocol.md
/// gives it.
const CHAT_PAGE_DEFAULT: usize = 50;

/// The largest chat list page, as docs/protocol.md gives it (the routers'
/// default `history_page`).
const CHAT_PAGE_MAX: usize = 200;

/// The chat list's order: newest last entry first, ties by conversation id.
fn chat_order(a: &Chat, b: &Chat) -> Order {
    b.last_ms
        .cmp(&a.last_ms)
        .then_with(|| a.conversation.cmp(&b.conversation))
}

/// One page of the chat list from every partition's page, each asked with
/// the same cursor and page size `asked`.
///
/// Each partition answered the first rows of its own conversations after
/// the cursor, in [`chat_order`], at most its page limit, with `more` when
/// it had to leave some out. The merged page has to be the first rows of
/// the whole list after the cursor, or the client's next cursor (its last
/// row) would skip what was left out:
/// - A partition that left rows out may hold some just after its last row,
///   so nothing after the earliest such last row is known to be next:
///   rows past it are cut.
/// - At most one page limit of rows. The routers apply theirs to `asked`
///   (0: a default; capped by their configuration, which the gateway does
///   not know); a partition that left rows out shows it, since it cut at
///   its limit, so the limit is its row count (the largest, if routers
///   disagree). When none did, the limit as documented (`asked`, 0 meaning
///   50, at most 200), or the longest page if a router allowed more.
/// - `more` if any partition had more or the merge cut rows. So a row is
///   never left out without `more`; and a page is never empty while rows
///   remain, since the partition with the earliest last row has all its
///   rows on it.
fn merge_chat_pages(asked: u16, pages: Vec<ChatPage>) -> ChatPage {
    let longest = pages.iter().map(|p| p.chats.len()).max().unwrap_or(0);
    let limit = pages
        .iter()
        .filter(|p| p.more)
        .map(|p| p.chats.len())
        .max()
        .unwrap_or_else(|| {
            let documented = match usize::from(asked) {
                0 => CHAT_PAGE_DEFAULT,
                n => n.min(CHAT_PAGE_MAX),
            };
            documented.max(longest)
        });
    // Nothing after the earliest last row of a partition that left rows
    // out is certain (nothing at all if such a partition sent none).
    let cut: Vec<Option<&Chat>> = pages
        .iter()
        .filter(|p| p.more)
        .map(|p| p.chats.last())
        .collect();
    let mut more = !cut.is_empty();
    let certain = match cut.into_iter().collect::<Option<Vec<&Chat>>>() {
        None => 0,
        Some(lasts) => match lasts.into_iter().min_by(|a, b| chat_order(a, b)) {
            None => usize::MAX,
            Some(horizon) => pages
                .iter()
                .flat_map(|p| &p.chats)
                .filter(|c| chat_order(c, horizon) != Order::Greater)
                .count(),
        },
    };
    let mut chats: Vec<Chat> = pages.into_iter().flat_map(|p| p.chats).collect();
    chats.sort_unstable_by(chat_order);
    let keep = certain.min(limit).min(chats.len());
    more |= keep < chats.len();
    chats.truncate(keep);
    ChatPage { more, chats }
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
    let leases_retaken = prometheus_client::metrics::counter::Counter::<u64>::default();
    registry.register(
        "courier_router_leases_retaken",
        "Partition leases that expired before a renewal got through, nobody took, and this router took back without a takeover",
        leases_retaken.clone(),
    );
    let leases_lost = prometheus_client::metrics::counter::Counter::<u64>::default();
    registry.register(
        "courier_router_leases_lost",
        "Partition leases this router lost to a conflict: the partition was given up",
        leases_lost.clone(),
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
        link_gaps: Some({
            let nats = nats.clone();
            rfleet::LinkGaps(Arc::new(move || nats.gaps()))
        }),
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
                    let (retaken, lost) = owner.leases();
                    leases_retaken.inc_by(retaken.saturating_sub(leases_retaken.get()));
                    leases_lost.inc_by(lost.saturating_sub(leases_lost.get()));
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SessionKey = SessionKey {
        node: 1,
        core: 0,
        slot: 1,
        generation: 1,
    };

    /// A live message (its frame names it) as a relay brings it.
    fn live(name: &'static [u8]) -> Delivery {
        Delivery::Frame {
            session: KEY,
            class: Class::Message,
            frame: Bytes::from_static(name),
            origin: Some(Instant::now()),
        }
    }

    fn frames(ds: &[Delivery]) -> Vec<&[u8]> {
        ds.iter()
            .filter_map(|d| match d {
                Delivery::Frame { frame, .. } => Some(&frame[..]),
                Delivery::Close { .. } => None,
            })
            .collect()
    }

    #[test]
    fn nothing_live_reaches_a_session_before_its_catch_up_is_asked() {
        let mut state = LinkState::default();
        state.attached(KEY, 4);
        assert!(state.hold(2, KEY, live(b"early")).is_none());
        state.syncing(KEY, 0..4, 4);
        assert!(
            state.release(KEY, 2, false, 4).is_empty(),
            "dropped, not held"
        );
    }

    #[test]
    fn a_partitions_live_messages_wait_for_its_catch_up_and_follow_it() {
        let mut state = LinkState::default();
        state.attached(KEY, 4);
        state.syncing(KEY, 0..4, 4);
        assert!(state.hold(2, KEY, live(b"a")).is_none());
        assert!(state.hold(3, KEY, live(b"x")).is_none());
        assert!(state.hold(2, KEY, live(b"b")).is_none());
        // Partition 2's catch-up is done: its messages, in arrival order.
        assert_eq!(frames(&state.release(KEY, 2, false, 4)), [b"a", b"b"]);
        assert!(state.hold(2, KEY, live(b"c")).is_some(), "now live");
        assert!(
            state.hold(3, KEY, live(b"y")).is_none(),
            "3 still catching up"
        );
        // A catch-up ended with more to come: what was held is dropped
        // (the next catch-up brings it), and so is what comes meanwhile.
        assert!(state.release(KEY, 3, true, 4).is_empty());
        assert!(state.hold(3, KEY, live(b"z")).is_none());
        state.syncing(KEY, 3..4, 4);
        assert!(state.hold(3, KEY, live(b"w")).is_none());
        for p in [0, 1] {
            assert!(state.release(KEY, p, false, 4).is_empty());
        }
        assert_eq!(frames(&state.release(KEY, 3, false, 4)), [b"w"]);
        assert!(state.holds.is_empty(), "every partition live: forgotten");
        assert!(state.hold(3, KEY, live(b"v")).is_some());
    }

    /// A live `Message` of `conversation` numbered `seq`.
    fn message(conversation: &str, seq: u64) -> Delivery {
        let frame = ServerFrame::Message {
            conversation: conversation.into(),
            seq,
            server_id: seq,
            timestamp_ms: 1,
            kind: courier_protocol::frame::EntryKind::Message,
            sender: "alice".into(),
            sender_device: 1,
            client_id: seq,
            body: Bytes::new(),
        };
        let Delivery::Frame { frame, .. } = reply(KEY, &frame) else {
            unreachable!()
        };
        Delivery::Frame {
            session: KEY,
            class: Class::Message,
            frame,
            origin: Some(Instant::now()),
        }
    }

    #[test]
    fn held_messages_are_released_in_sequence_order_per_conversation() {
        let mut state = LinkState::default();
        state.syncing(KEY, 0..2, 2);
        // Two publishers of partition 1's relays (its users' partition
        // changed owner): their messages arrived crossed.
        for (c, seq) in [
            ("d:a:b", 7),
            ("g:x", 3),
            ("d:a:b", 5),
            ("d:a:b", 6),
            ("g:x", 2),
        ] {
            assert!(state.hold(1, KEY, message(c, seq)).is_none());
        }
        let released: Vec<_> = state
            .release(KEY, 1, false, 2)
            .iter()
            .filter_map(message_position)
            .collect();
        let order: Vec<(&str, u64)> = released.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        assert_eq!(
            order,
            [
                ("d:a:b", 5),
                ("d:a:b", 6),
                ("d:a:b", 7),
                ("g:x", 2),
                ("g:x", 3)
            ]
        );
    }

    #[test]
    fn replies_and_a_late_sync_done_pass_untouched() {
        let mut state = LinkState::default();
        state.syncing(KEY, 0..2, 2);
        assert_eq!(state.release(KEY, 0, false, 2).len(), 0);
        // A second SyncDone from 0 (two owners answered) changes nothing.
        assert_eq!(state.release(KEY, 0, false, 2).len(), 0);
        assert!(state.hold(1, KEY, live(b"held")).is_none());
        assert_eq!(frames(&state.release(KEY, 1, false, 2)), [b"held"]);
    }

    #[test]
    fn a_session_holding_too_many_for_a_catch_up_is_closed_as_slow() {
        let mut state = LinkState::default();
        state.syncing(KEY, 0..2, 2);
        for _ in 0..MAX_HELD {
            assert!(state.hold(1, KEY, live(b"m")).is_none());
        }
        assert!(matches!(
            state.hold(1, KEY, live(b"m")),
            Some(Delivery::Close {
                code: courier_protocol::close::SLOW_CONSUMER,
                ..
            })
        ));
        assert!(state.holds.is_empty());
    }

    fn chat(conversation: &str, last_ms: u64) -> Chat {
        Chat {
            conversation: conversation.into(),
            last_seq: 1,
            last_ms,
            last_sender: "alice".into(),
            read_seq: 0,
            unread: 1,
        }
    }

    fn page(more: bool, rows: &[(&str, u64)]) -> ChatPage {
        ChatPage {
            more,
            chats: rows.iter().map(|(c, ms)| chat(c, *ms)).collect(),
        }
    }

    fn names(page: &ChatPage) -> Vec<&str> {
        page.chats.iter().map(|c| c.conversation.as_str()).collect()
    }

    /// What a router answers (`chat_list` in router/src/core/views.rs):
    /// its rows after the cursor, in order, cut at `limit`.
    fn router_page(rows: &[Chat], cursor: Option<&Chat>, limit: usize) -> ChatPage {
        let mut chats: Vec<Chat> = rows
            .iter()
            .filter(|c| cursor.is_none_or(|k| chat_order(c, k) == Order::Greater))
            .cloned()
            .collect();
        chats.sort_unstable_by(chat_order);
        let more = chats.len() > limit;
        chats.truncate(limit);
        ChatPage { more, chats }
    }

    #[test]
    fn a_merged_page_is_the_first_rows_of_all_partitions() {
        let pages = vec![
            page(true, &[("d:a:b", 90), ("d:a:c", 50)]),
            page(true, &[("d:a:d", 95), ("d:a:e", 60)]),
            page(false, &[("d:a:f", 70)]),
        ];
        let merged = merge_chat_pages(2, pages);
        assert_eq!(names(&merged), ["d:a:d", "d:a:b"]);
        assert!(merged.more);
    }

    #[test]
    fn ties_are_ordered_by_conversation_id() {
        let pages = vec![
            page(false, &[("d:a:c", 10)]),
            page(false, &[("d:a:b", 10), ("d:a:d", 5)]),
        ];
        let merged = merge_chat_pages(0, pages);
        assert_eq!(names(&merged), ["d:a:b", "d:a:c", "d:a:d"]);
        assert!(!merged.more);
    }

    #[test]
    fn without_more_anywhere_the_page_is_cut_at_the_limit_asked_with_more() {
        let pages = vec![
            page(false, &[("d:a:b", 90), ("d:a:c", 50)]),
            page(false, &[("d:a:d", 95), ("d:a:e", 60)]),
        ];
        let merged = merge_chat_pages(3, pages.clone());
        assert_eq!(names(&merged), ["d:a:d", "d:a:b", "d:a:e"]);
        assert!(merged.more);
        let merged = merge_chat_pages(4, pages.clone());
        assert_eq!(merged.chats.len(), 4);
        assert!(!merged.more);
        // 0 asks for the default page, 50 rows.
        assert!(!merge_chat_pages(0, pages).more);
    }

    #[test]
    fn without_more_anywhere_the_page_is_at_most_the_documented_maximum() {
        // 225 rows, none left out: 45 a partition, under the default page.
        let pages: Vec<ChatPage> = (0..5)
            .map(|p| ChatPage {
                more: false,
                chats: (0..45).map(|i| chat(&format!("d:{p}:{i}"), i)).collect(),
            })
            .collect();
        let merged = merge_chat_pages(1000, pages.clone());
        assert_eq!(merged.chats.len(), CHAT_PAGE_MAX);
        assert!(merged.more);
        let merged = merge_chat_pages(0, pages);
        assert_eq!(merged.chats.len(), CHAT_PAGE_DEFAULT);
        assert!(merged.more);
    }

    /// Routers with different page limits: nothing after the earliest last
    /// row of a partition that left rows out is certain, even when the page
    /// has room for it.
    #[test]
    fn rows_past_a_cut_partitions_last_row_wait_for_the_next_page() {
        let pages = vec![
            // Limit 2: may hold a row between 90 and 85.
            page(true, &[("d:a:b", 100), ("d:a:c", 90)]),
            // Limit 4.
            page(
                true,
                &[("d:a:d", 95), ("d:a:e", 85), ("d:a:f", 80), ("d:a:g", 70)],
            ),
        ];
        let merged = merge_chat_pages(4, pages);
        assert_eq!(names(&merged), ["d:a:b", "d:a:d", "d:a:c"]);
        assert!(merged.more);
    }

    #[test]
    fn a_partition_with_more_and_no_rows_makes_nothing_certain() {
        let pages = vec![page(true, &[]), page(false, &[("d:a:b", 10)])];
        let merged = merge_chat_pages(5, pages);
        assert!(merged.chats.is_empty());
        assert!(merged.more);
    }

    /// Paging through the merged pages with the client's cursor gives the
    /// whole chat list, each conversation once, in order, with `more` on
    /// every page but the last; for page limits equal on every router and
    /// for routers that disagree.
    #[test]
    fn paging_through_merged_pages_lists_every_conversation_once_in_order() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let partitions = 1 + next(6) as usize;
            // Few distinct times, so ties across partitions are common.
            let rows: Vec<Chat> = (0..next(40))
                .map(|i| chat(&format!("d:u:{i:03}"), next(12)))
                .collect();
            let mut held: Vec<Vec<Chat>> = vec![Vec::new(); partitions];
            for row in &rows {
                held[next(partitions as u64) as usize].push(row.clone());
            }
            let asked = 1 + next(6) as u16;
            let limits: Vec<usize> = (0..partitions)
                .map(|_| match round % 2 {
                    0 => usize::from(asked),
                    _ => 1 + next(usize::from(asked) as u64) as usize,
                })
                .collect();

            let mut listed: Vec<Chat> = Vec::new();
            let mut cursor: Option<Chat> = None;
            for _ in 0..=rows.len() {
                let pages = held
                    .iter()
                    .zip(&limits)
                    .map(|(rows, limit)| router_page(rows, cursor.as_ref(), *limit))
                    .collect();
                let merged = merge_chat_pages(asked, pages);
                assert!(merged.chats.len() <= usize::from(asked));
                listed.extend(merged.chats.iter().cloned());
                if !merged.more {
                    break;
                }
                assert!(
                    !merged.chats.is_empty(),
                    "round {round}: an empty page with more"
                );
                cursor = merged.chats.last().cloned();
            }
            let mut expected = rows.clone();
            expected.sort_unstable_by(chat_order);
            assert_eq!(listed, expected, "round {round}");
        }
    }

    fn session(slot: u32) -> SessionKey {
        SessionKey {
            node: 1,
            core: 0,
            slot,
            generation: 1,
        }
    }

    fn asked(lists: &mut ChatLists, session: SessionKey, request: u32, now: Instant) {
        let device = Device {
            user: "alice".into(),
            device: 1,
        };
        let frame = ClientFrame::ChatList {
            request,
            before_ms: 0,
            before_conversation: String::new(),
            limit: 2,
        };
        assert!(lists.handle_sent(session, &device, &frame, 3, now));
    }

    fn merged(gathered: Option<Gathered>) -> Delivery {
        match gathered {
            Some(Gathered::Merged(delivery)) => delivery,
            other => panic!("not merged: {other:?}"),
        }
    }

    /// The server frame a delivery carries.
    fn frame_of(delivery: &Delivery) -> ServerFrame {
        let Delivery::Frame { frame, .. } = delivery else {
            panic!("not a frame: {delivery:?}");
        };
        let start = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        ServerFrame::decode(&frame.slice(start..)).unwrap()
    }

    #[test]
    fn the_last_partitions_page_answers_with_the_merged_page() {
        let mut lists = ChatLists::default();
        let now = Instant::now();
        asked(&mut lists, session(1), 7, now);
        let a = lists.handle_answer(session(1), 0, 7, Some(page(false, &[("d:a:b", 5)])));
        assert!(matches!(a, Gathered::Held));
        let b = lists.handle_answer(session(1), 2, 7, Some(page(false, &[])));
        assert!(matches!(b, Gathered::Held));
        // A second page from the same partition is not this chat list's.
        let again = lists.handle_answer(session(1), 2, 7, Some(page(false, &[])));
        assert!(matches!(again, Gathered::Unclaimed));
        let c = lists.handle_answer(
            session(1),
            1,
            7,
            Some(page(true, &[("d:a:c", 9), ("d:a:d", 1)])),
        );
        assert_eq!(
            frame_of(&merged(Some(c))),
            ServerFrame::Chats {
                request: 7,
                more: true,
                chats: vec![chat("d:a:c", 9), chat("d:a:b", 5)],
            }
        );
        assert!(lists.0.is_empty());
        assert!(lists.poll_expired(now + CHAT_LIST_WAIT).is_empty());
    }

    #[test]
    fn the_first_error_goes_to_the_client_and_the_other_answers_are_dropped() {
        let mut lists = ChatLists::default();
        let now = Instant::now();
        asked(&mut lists, session(1), 7, now);
        // An error for another request is not the chat list's.
        assert!(matches!(
            lists.handle_answer(session(1), 0, 8, None),
            Gathered::Unclaimed
        ));
        assert!(matches!(
            lists.handle_answer(session(1), 0, 7, None),
            Gathered::Pass
        ));
        assert!(matches!(
            lists.handle_answer(session(1), 1, 7, None),
            Gathered::Held
        ));
        assert!(lists.owed_by(2).is_empty(), "answered: not sent again");
        assert!(matches!(
            lists.handle_answer(session(1), 2, 7, Some(page(false, &[]))),
            Gathered::Held
        ));
        assert!(lists.0.is_empty());
    }

    #[test]
    fn a_chat_list_unanswered_by_its_deadline_is_answered_504_once() {
        let mut lists = ChatLists::default();
        let now = Instant::now();
        asked(&mut lists, session(1), 7, now);
        lists.handle_answer(session(1), 0, 7, Some(page(false, &[])));
        assert_eq!(lists.owed_by(1).len(), 1);
        assert_eq!(lists.owed_by(0).len(), 0);
        assert!(lists.poll_expired(now + CHAT_LIST_WAIT / 2).is_empty());
        let expired = lists.poll_expired(now + CHAT_LIST_WAIT);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].session(), session(1));
        let ServerFrame::Error {
            code, reference, ..
        } = frame_of(&expired[0])
        else {
            panic!("{expired:?}");
        };
        assert_eq!((code, reference), (ErrorCode::Unavailable as u16, 7));
        assert!(lists.0.is_empty());
        // A late page has nobody waiting for it.
        assert!(matches!(
            lists.handle_answer(session(1), 1, 7, Some(page(false, &[]))),
            Gathered::Unclaimed
        ));
    }

    #[test]
    fn a_detached_sessions_chat_lists_are_forgotten() {
        let mut lists = ChatLists::default();
        let now = Instant::now();
        asked(&mut lists, session(1), 7, now);
        asked(&mut lists, session(2), 7, now);
        lists.forget(session(1));
        let expired = lists.poll_expired(now + CHAT_LIST_WAIT);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].session(), session(2));
        assert!(lists.0.is_empty());
    }

    #[test]
    fn a_session_with_too_many_chat_lists_waiting_is_refused_429() {
        let mut lists = ChatLists::default();
        let now = Instant::now();
        for request in 1..=CHAT_LISTS_PER_SESSION as u32 {
            asked(&mut lists, session(1), request, now);
        }
        let device = Device {
            user: "alice".into(),
            device: 1,
        };
        let frame = ClientFrame::ChatList {
            request: 100,
            before_ms: 0,
            before_conversation: String::new(),
            limit: 0,
        };
        assert!(!lists.handle_sent(session(1), &device, &frame, 3, now));
        assert!(lists.handle_sent(session(2), &device, &frame, 3, now));
        assert!(lists.owed_by(0).iter().all(|c| match c {
            Command::Frame {
                session: s, frame, ..
            } => {
                *s != session(1) || !matches!(frame, ClientFrame::ChatList { request: 100, .. })
            }
            _ => false,
        }));
        let refused = lists.poll_expired(now);
        assert_eq!(refused.len(), 1);
        let ServerFrame::Error {
            code, reference, ..
        } = frame_of(&refused[0])
        else {
            panic!("{refused:?}");
        };
        assert_eq!((code, reference), (ErrorCode::RateLimited as u16, 100));
        // The others still wait for their pages.
        assert!(matches!(
            lists.handle_answer(session(1), 0, 1, Some(page(false, &[]))),
            Gathered::Held
        ));
    }

    /// Two chat lists out under one request id are answered in the order
    /// they were asked, each from its own pages.
    #[test]
    fn chat_lists_sharing_a_request_id_are_answered_in_order() {
        let mut lists = ChatLists::default();
        let now = Instant::now();
        asked(&mut lists, session(1), 7, now);
        asked(&mut lists, session(1), 7, now);
        let mut last = None;
        for p in 0..3 {
            let first = match p {
                0 => page(false, &[("d:a:first", 2)]),
                _ => page(false, &[]),
            };
            last = Some(lists.handle_answer(session(1), p, 7, Some(first)));
        }
        assert_eq!(
            frame_of(&merged(last.take())),
            ServerFrame::Chats {
                request: 7,
                more: false,
                chats: vec![chat("d:a:first", 2)],
            }
        );
        for p in 0..3 {
            last = Some(lists.handle_answer(session(1), p, 7, Some(page(false, &[]))));
        }
        assert_eq!(
            frame_of(&merged(last)),
            ServerFrame::Chats {
                request: 7,
                more: false,
                chats: Vec::new(),
            }
        );
    }
}
