//! One worker: a monoio runtime thread that owns a share of the users.
//!
//! User `u` belongs to worker `u % workers`. A worker opens its users'
//! connections on the ramp, creates the groups its users are creators of,
//! sends the messages of the schedule whose sender is one of its users, and
//! checks what its users' devices receive. It owns all of that state
//! outright (single-threaded, `Rc`/`RefCell`), and talks to the coordinator
//! only through [`Control`] and [`WorkerEvent`].
//!
//! ```text
//!  schedule ──► Worker::send ──► Conn.pending ──► Conn.out ──► writer task ──► socket
//!  socket ──► reader (conn.rs) ──► DeviceBook / acks / latencies ──► Outcome
//! ```

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rustc_hash::FxHashMap;

use courier_protocol::frame::ClientFrame;
use courier_protocol::token::{self, Secret};
use courier_protocol::ws::{self, Opcode};

use crate::body::{self, Stamp};
use crate::check::Tally;
use crate::config::Config;
use crate::conn::{self, Conn, Pending, SessionPhase};
use crate::control::{Control, Outcome, Phase, WorkerEvent};
use crate::latency::{record_ns, Latencies};
use crate::pacer::Pacer;
use crate::plan::{Plan, Scheduled};
use crate::rng::SplitMix64;
use crate::stats::{Counters, Errors};

/// Group creation requests carry `REQUEST_BASE + group`, so an error's
/// `reference` can never be mistaken for a client id (`msg + 1`).
pub(crate) const REQUEST_BASE: u32 = 1 << 31;

/// How often the worker's ticker runs retries.
const TICK: Duration = Duration::from_millis(50);
/// Ticks between progress events (250 ms).
const PROGRESS_TICKS: u64 = 5;
/// Ticks between two heartbeat checks of one connection (1 s). Each tick
/// checks one slice of that many, so the pings and resends of a worker's
/// connections are spread over the second instead of falling in one tick:
/// at 17,000 idle connections a worker would otherwise write some 850
/// pings at once every second, and every worker at the same moment.
const HEARTBEAT_TICKS: u64 = 20;
/// A send unanswered this long is written again.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// A catch-up unanswered this long is started over on a new session.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing connections get at the end.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Token lifetime: far longer than any run.
pub(crate) const TOKEN_TTL_S: u64 = 7 * 24 * 3600;

/// Where a worker's tokens come from.
#[derive(Debug)]
pub(crate) enum Tokens {
    /// Mint them with the node's secret (workers in this process).
    Secret(Secret),
    /// Minted by the parent process, by user.
    Minted(Arc<FxHashMap<u32, String>>),
}

/// What a worker thread starts from.
#[derive(Debug)]
pub(crate) struct WorkerSetup {
    pub index: u32,
    pub count: u32,
    pub plan: Arc<Plan>,
    pub config: Arc<Config>,
    pub tokens: Tokens,
    pub control: Arc<Control>,
    pub events: Sender<WorkerEvent>,
}

/// Runs a worker to completion on the calling thread and reports its
/// outcome (or its failure) on `setup.events`.
pub(crate) fn run_worker(setup: WorkerSetup) {
    let events = setup.events.clone();
    let index = setup.index as usize;
    let legacy = setup.config.legacy;
    let result = block_on(legacy, move |driver| async move {
        let worker = Rc::new(Worker::new(setup, driver));
        worker.clone().main().await
    });
    let event = match result {
        Ok(outcome) => WorkerEvent::Done {
            worker: index,
            outcome: Box::new(outcome),
        },
        Err(e) => WorkerEvent::Failed {
            worker: index,
            error: format!("could not start the runtime: {e}"),
        },
    };
    // The coordinator outlives its workers; a send can only fail if it
    // gave up already, and then nobody is waiting for this outcome.
    let _ = events.send(event);
}

/// Builds the runtime (io_uring with the legacy fallback, or legacy when
/// forced) and runs the future `make(driver name)` on it.
pub(crate) fn block_on<F, Fut>(legacy: bool, make: F) -> std::io::Result<Fut::Output>
where
    F: FnOnce(&'static str) -> Fut,
    Fut: Future,
{
    // Enough ring entries for a few thousand operations per submit; reads
    // in flight beyond that wait in the kernel, not in the ring.
    const ENTRIES: u32 = 4096;
    if legacy {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?;
        return Ok(rt.block_on(make("legacy")));
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .uring_builder(ring_builder())
        .with_entries(ENTRIES)
        .enable_timer()
        .build()?;
    let driver = match &rt {
        monoio::FusionRuntime::Uring(_) => "io_uring",
        monoio::FusionRuntime::Legacy(_) => "legacy",
    };
    Ok(rt.block_on(make(driver)))
}

/// The ring's setup: completions run cooperatively where the kernel can
/// (`IORING_SETUP_COOP_TASKRUN`, Linux 5.19), at the thread's next entry
/// into the kernel instead of by interrupt; the same choice as the
/// gateway's cores (`courier_gateway::node::ring_builder`). Without it,
/// a tenth of a worker's CPU at 5,000 messages/s went to those
/// interrupts (docs/benchmarks.md).
fn ring_builder() -> io_uring::Builder {
    let mut urb = io_uring::IoUring::builder();
    let mut probe = io_uring::IoUring::<io_uring::squeue::Entry>::builder();
    if probe.setup_coop_taskrun().build(1).is_ok() {
        urb.setup_coop_taskrun();
    }
    urb
}

/// A worker's state. Created on its thread, dropped when the run ends.
pub(crate) struct Worker {
    pub plan: Arc<Plan>,
    pub config: Arc<Config>,
    pub control: Arc<Control>,
    events: Sender<WorkerEvent>,
    index: u32,
    count: u32,
    driver: &'static str,
    /// This worker's connections, by local index (user = local * count + index).
    pub conns: Vec<Rc<Conn>>,
    /// Conversation ids known here.
    pub convs: RefCell<ConvIds>,
    /// Counters, errors, histograms and the acks for the audit.
    pub stats: RefCell<Stats>,
    rng: RefCell<SplitMix64>,
    /// Sends and group creations waiting to be retried, soonest first.
    retries: RefCell<BinaryHeap<Reverse<(Instant, Retry)>>>,
    /// Per group: whether its creator (if it is ours) has asked for it.
    group_requested: RefCell<Vec<bool>>,
    /// Frame payloads are encoded here before framing.
    scratch: RefCell<Vec<u8>>,
    /// The traffic start, once known.
    pub t0: Cell<Option<Instant>>,
    next_session: Cell<u64>,
    /// Churn owed but not yet done, in connections (fractions carry over
    /// from tick to tick).
    churn_due: Cell<f64>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("index", &self.index)
            .field("conns", &self.conns.len())
            .finish()
    }
}

/// Something to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Retry {
    /// Resend client id `.1` on local connection `.0`.
    Send(usize, u64),
    /// Ask again for group `.0`.
    Group(u32),
}

/// Everything a worker counts and measures.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub counters: Counters,
    pub errors: Errors,
    pub latencies: Latencies,
    /// Samples since the last progress event.
    pub interval: Latencies,
    pub tally: Tally,
}

impl Stats {
    pub fn error(&mut self, kind: &str) {
        self.errors.add(kind);
        self.counters.errors += 1;
    }

    pub fn sent_ack(&mut self, ns: u64) {
        record_ns(&mut self.latencies.sent_ack, ns);
        record_ns(&mut self.interval.sent_ack, ns);
    }

    pub fn end_to_end(&mut self, ns: u64) {
        record_ns(&mut self.latencies.end_to_end, ns);
        record_ns(&mut self.interval.end_to_end, ns);
    }

    pub fn receipt(&mut self, read: bool, ns: u64) {
        let h = if read {
            &mut self.latencies.receipt_read
        } else {
            &mut self.latencies.receipt_delivered
        };
        record_ns(h, ns);
    }

    pub fn reconnect(&mut self, ns: u64) {
        record_ns(&mut self.latencies.reconnect, ns);
    }

    fn schedule_lag(&mut self, ns: u64) {
        record_ns(&mut self.latencies.schedule_lag, ns);
        record_ns(&mut self.interval.schedule_lag, ns);
    }
}

/// Conversation ids as this worker knows them.
#[derive(Debug, Default)]
pub(crate) struct ConvIds {
    by_id: FxHashMap<Rc<str>, u32>,
    ids: Vec<Option<Rc<str>>>,
    /// Sorted member set to group, for groups with a member here.
    by_members: FxHashMap<Vec<u32>, u32>,
    /// Groups with a member here whose id is still unknown.
    missing: u64,
}

impl ConvIds {
    fn new(plan: &Plan, users: impl Iterator<Item = u32>) -> Self {
        let mut ids = Self {
            ids: vec![None; plan.conversations() as usize],
            ..Self::default()
        };
        for u in users {
            for &conv in plan.user_conversations(u) {
                match plan.conv_group(conv) {
                    Some(g) => {
                        let fresh = ids
                            .by_members
                            .insert(plan.group_members_sorted(g).to_vec(), g)
                            .is_none();
                        ids.missing += u64::from(fresh);
                    }
                    None if ids.ids[conv as usize].is_none() => {
                        let id: Rc<str> = plan.direct_id(conv).into();
                        ids.by_id.insert(id.clone(), conv);
                        ids.ids[conv as usize] = Some(id);
                    }
                    None => {}
                }
            }
        }
        ids
    }

    /// The conversation number of an id.
    pub fn number(&self, id: &str) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// The id of a conversation number, once known.
    pub fn id(&self, conv: u32) -> Option<Rc<str>> {
        self.ids.get(conv as usize).cloned().flatten()
    }

    /// The group whose sorted member set is `members`, if a member is here.
    pub fn group_of_members(&self, members: &[u32]) -> Option<u32> {
        self.by_members.get(members).copied()
    }

    /// Records that `conv` is called `id`. False when `conv` already had
    /// another id or `id` names another conversation.
    pub fn learn(&mut self, plan: &Plan, conv: u32, id: &str) -> bool {
        match (self.ids.get(conv as usize), self.by_id.get(id)) {
            (Some(Some(known)), _) => &**known == id,
            (Some(None), Some(_)) | (None, _) => false,
            (Some(None), None) => {
                let id: Rc<str> = id.into();
                self.by_id.insert(id.clone(), conv);
                self.ids[conv as usize] = Some(id);
                if plan
                    .conv_group(conv)
                    .is_some_and(|g| self.by_members.values().any(|&v| v == g))
                {
                    self.missing = self.missing.saturating_sub(1);
                }
                true
            }
        }
    }
}

/// A one-slot wake-up: `notify` before `wait` is not lost.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }
}

impl Worker {
    fn new(setup: WorkerSetup, driver: &'static str) -> Self {
        let WorkerSetup {
            index,
            count,
            plan,
            config,
            tokens,
            control,
            events,
        } = setup;
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let users: Vec<u32> = (index..plan.users()).step_by(count as usize).collect();
        let conns = users
            .iter()
            .enumerate()
            .map(|(local, &user)| {
                let token = match &tokens {
                    Tokens::Secret(secret) => {
                        let claims =
                            token::claims_for(&plan.user_name(user), 1, now_s, TOKEN_TTL_S);
                        token::mint(secret, &claims)
                    }
                    // The parent minted one for every user of this process.
                    Tokens::Minted(map) => map.get(&user).cloned().unwrap_or_default(),
                };
                Rc::new(Conn::new(user, local, token))
            })
            .collect();
        let convs = ConvIds::new(&plan, users.iter().copied());
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            group_requested: RefCell::new(vec![false; plan.groups() as usize]),
            stats: RefCell::new(Stats {
                counters: Counters {
                    groups_missing: convs.missing,
                    ..Counters::default()
                },
                ..Stats::default()
            }),
            convs: RefCell::new(convs),
            rng: RefCell::new(SplitMix64::new(seed ^ (u64::from(index) << 48))),
            retries: RefCell::new(BinaryHeap::new()),
            scratch: RefCell::new(Vec::with_capacity(1024)),
            t0: Cell::new(None),
            next_session: Cell::new(1),
            churn_due: Cell::new(0.0),
            plan,
            config,
            control,
            events,
            index,
            count,
            driver,
            conns,
        }
    }

    async fn main(self: Rc<Self>) -> Outcome {
        monoio::spawn(self.clone().ticker());
        // The ramp is global: user u connects at u / ramp seconds, whichever
        // worker owns it.
        for c in &self.conns {
            let delay = Duration::from_secs_f64(f64::from(c.user) / self.config.ramp);
            monoio::spawn(conn::run(self.clone(), c.clone(), delay));
        }
        self.wait_phase(Phase::Groups).await;
        for c in &self.conns {
            self.create_groups(c);
        }
        self.wait_phase(Phase::Traffic).await;
        if let Some(t0) = self.control.t0() {
            self.t0.set(Some(t0));
            self.run_schedule(t0).await;
        }
        self.stats.borrow_mut().counters.shards_done_sending = 1;
        self.wait_phase(Phase::Finish).await;
        self.close_all().await;
        self.outcome()
    }

    async fn wait_phase(&self, phase: Phase) {
        while self.control.phase() < phase {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// True once the run is over: no more reconnects or sends.
    pub fn finishing(&self) -> bool {
        self.control.phase() == Phase::Finish
    }

    /// Local index of user `u`, if it is ours.
    fn local(&self, u: u32) -> Option<usize> {
        (u % self.count == self.index).then_some((u / self.count) as usize)
    }

    /// The source address user `u` connects from (None: the kernel's
    /// choice). Users are spread over the addresses round robin.
    pub fn source_addr(&self, u: u32) -> Option<std::net::Ipv4Addr> {
        let addrs = &self.config.source_addrs;
        (!addrs.is_empty()).then(|| addrs[u as usize % addrs.len()])
    }

    /// A fresh session number (never 0).
    pub fn new_session(&self) -> u64 {
        let n = self.next_session.get();
        self.next_session.set(n + 1);
        n
    }

    /// A random value for masks, keys and jitter.
    pub fn random(&self) -> u64 {
        self.rng.borrow_mut().next_u64()
    }

    /// `d` scaled by a random factor in [0.5, 1).
    pub fn jitter(&self, d: Duration) -> Duration {
        d.mul_f64(0.5 + self.rng.borrow_mut().unit() / 2.0)
    }

    /// Nanoseconds since the traffic start (0 before it).
    pub fn now_ns(&self) -> u64 {
        self.t0.get().map_or(0, |t0| t0.elapsed().as_nanos() as u64)
    }

    /// Appends `frame` to `out` as a masked binary WebSocket frame.
    pub fn push_frame(&self, out: &mut Vec<u8>, frame: &ClientFrame) {
        let mut scratch = self.scratch.borrow_mut();
        scratch.clear();
        frame.encode(&mut scratch);
        let mask = (self.random() as u32).to_ne_bytes();
        ws::encode_frame(out, Opcode::Binary, &scratch, Some(mask));
    }

    /// Appends a masked control frame.
    pub fn push_control(&self, out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
        let mask = (self.random() as u32).to_ne_bytes();
        ws::encode_frame(out, opcode, payload, Some(mask));
    }

    /// The `Send` frame of a pending message.
    pub fn send_frame(&self, user: u32, client_id: u64, p: &Pending) -> Option<ClientFrame> {
        let conversation = self.convs.borrow().id(p.conv)?;
        let stamp = Stamp {
            run_id: self.plan.run_id,
            sender: user,
            msg: p.msg,
            intended_ns: p.intended_ns,
        };
        let body = Bytes::from(body::encode(&stamp, self.plan.body_len(p.msg)));
        Some(ClientFrame::Send {
            conversation: conversation.to_string(),
            client_id,
            body,
        })
    }

    // ---- the schedule ----

    async fn run_schedule(&self, t0: Instant) {
        let total = self.plan.total_messages();
        let pacer = match total {
            0 => None,
            _ => match Pacer::start(format!("loadgen-p{}", self.index)) {
                Ok(p) => Some(p),
                Err(_) => {
                    // Without the helper the runtime's timer paces, up to
                    // 2 ms late; the schedule lag histogram shows it.
                    self.stats.borrow_mut().error("pacer.unavailable");
                    None
                }
            },
        };
        let mut i = 0;
        while i < total && !self.finishing() {
            let m = self.plan.message(i);
            i += 1;
            let Some(local) = self.local(m.sender) else {
                continue;
            };
            let due = t0 + Duration::from_nanos(m.intended_ns);
            match &pacer {
                Some(p) => p.sleep_until(due).await,
                None => monoio::time::sleep_until(due.into()).await,
            }
            self.send(local, m);
        }
        // Hold the connections until the end of the last phase (all of it
        // when the rate is 0).
        let end = t0 + self.plan.duration();
        while !self.finishing() {
            let now = Instant::now();
            if now >= end {
                break;
            }
            monoio::time::sleep((end - now).min(Duration::from_millis(100))).await;
        }
    }

    /// Hands scheduled message `m` to its sender's connection. It is sent
    /// now if the connection is up, else when it is next up.
    fn send(&self, local: usize, m: Scheduled) {
        let conn = &self.conns[local];
        if self.convs.borrow().id(m.conv).is_none() {
            // The group was never created or its id never reached us.
            let mut stats = self.stats.borrow_mut();
            stats.counters.skipped += 1;
            stats.error("send.unknown_group");
            return;
        }
        let client_id = m.msg + 1;
        let pending = Pending {
            msg: m.msg,
            conv: m.conv,
            intended_ns: m.intended_ns,
            transmissions: 0,
            failures: 0,
            transmitted_at: None,
        };
        let mut st = conn.st.borrow_mut();
        let mut stats = self.stats.borrow_mut();
        stats.counters.sent += 1;
        stats.counters.pending += 1;
        if st.phase == SessionPhase::Ready {
            stats.schedule_lag(self.now_ns().saturating_sub(m.intended_ns));
            if self.plan.types(m.msg) {
                // "typing…" just before the message, which ends it.
                if let Some(id) = self.convs.borrow().id(m.conv) {
                    let typing = ClientFrame::Typing {
                        conversation: id.to_string(),
                        active: true,
                    };
                    self.push_frame(&mut st.out, &typing);
                    stats.counters.typing_sent += 1;
                }
            }
            drop(stats);
            st.pending.insert(client_id, pending);
            self.transmit(&mut st, conn.user, client_id);
            drop(st);
            conn.notify();
        } else {
            st.pending.insert(client_id, pending);
        }
    }

    /// Writes the `Send` of pending `client_id` into the connection's output.
    pub fn transmit(&self, st: &mut conn::ConnState, user: u32, client_id: u64) {
        let Some(p) = st.pending.get_mut(&client_id) else {
            return;
        };
        p.transmissions += 1;
        p.transmitted_at = Some(Instant::now());
        if p.transmissions > 1 {
            self.stats.borrow_mut().counters.resent += 1;
        }
        let p = *p;
        if let Some(frame) = self.send_frame(user, client_id, &p) {
            self.push_frame(&mut st.out, &frame);
            st.last_write = Instant::now();
        }
    }

    /// Schedules a retry of `what` after `after`.
    pub fn retry_later(&self, what: Retry, after: Duration) {
        self.retries
            .borrow_mut()
            .push(Reverse((Instant::now() + after, what)));
    }

    // ---- groups ----

    /// Sends the `GroupCreate` of every group `c`'s user creates, once the
    /// run is in its group phase and `c` is up.
    pub fn create_groups(&self, c: &Conn) {
        if self.control.phase() < Phase::Groups {
            return;
        }
        let mut st = c.st.borrow_mut();
        if st.phase != SessionPhase::Ready {
            return;
        }
        let mut requested = self.group_requested.borrow_mut();
        for &conv in self.plan.user_conversations(c.user) {
            let Some(g) = self.plan.conv_group(conv) else {
                continue;
            };
            let members = self.plan.group_members(g);
            if members.first() != Some(&c.user) || requested[g as usize] {
                continue;
            }
            requested[g as usize] = true;
            self.push_group_create(&mut st.out, g);
        }
        drop(st);
        c.notify();
    }

    fn push_group_create(&self, out: &mut Vec<u8>, g: u32) {
        let names = self.plan.group_members(g)[1..]
            .iter()
            .map(|&m| self.plan.user_name(m))
            .collect();
        self.push_frame(
            out,
            &ClientFrame::GroupCreate {
                request: REQUEST_BASE + g,
                members: names,
            },
        );
    }

    /// True when `g` was asked for and its id is not known yet.
    pub fn group_outstanding(&self, g: u32) -> bool {
        self.group_requested
            .borrow()
            .get(g as usize)
            .copied()
            .unwrap_or(false)
            && self.convs.borrow().id(self.plan.group_conv(g)).is_none()
    }

    // ---- the ticker: retries, heartbeats, progress ----

    async fn ticker(self: Rc<Self>) {
        let mut n: u64 = 0;
        loop {
            monoio::time::sleep(TICK).await;
            n += 1;
            self.run_retries();
            self.churn();
            self.heartbeat((n % HEARTBEAT_TICKS) as usize);
            if n % PROGRESS_TICKS == 0 {
                self.progress();
            }
        }
    }

    fn run_retries(&self) {
        let now = Instant::now();
        loop {
            let what = {
                let mut q = self.retries.borrow_mut();
                match q.peek() {
                    Some(Reverse((due, _))) if *due <= now => q.pop().map(|Reverse((_, w))| w),
                    _ => None,
                }
            };
            match what {
                None => break,
                Some(Retry::Send(local, client_id)) => {
                    let Some(c) = self.conns.get(local) else {
                        continue;
                    };
                    let mut st = c.st.borrow_mut();
                    // A connection that went down resends everything pending
                    // when it is back; nothing to do here then.
                    if st.phase == SessionPhase::Ready && !self.finishing() {
                        self.transmit(&mut st, c.user, client_id);
                        drop(st);
                        c.notify();
                    }
                }
                Some(Retry::Group(g)) => {
                    let creator = self.plan.group_members(g).first().copied();
                    let Some(c) = creator
                        .and_then(|u| self.local(u))
                        .and_then(|l| self.conns.get(l))
                    else {
                        continue;
                    };
                    let mut st = c.st.borrow_mut();
                    if st.phase == SessionPhase::Ready && self.group_outstanding(g) {
                        self.push_group_create(&mut st.out, g);
                        drop(st);
                        c.notify();
                    }
                }
            }
        }
    }

    /// Closes the share of connections the current phase churns per tick;
    /// each reconnects at once, catches up and resends what is pending.
    fn churn(&self) {
        let Some(t0) = self.t0.get() else { return };
        let now = Instant::now();
        if now < t0 || now >= t0 + self.plan.duration() || self.finishing() {
            self.churn_due.set(0.0);
            return;
        }
        let share = self.plan.phase_at(self.now_ns()).plan.churn_per_s;
        let mut due = self.churn_due.get() + share * self.conns.len() as f64 * TICK.as_secs_f64();
        // A few draws per connection owed; one that hits a connection that
        // is down or still catching up is simply not churned this tick.
        let mut draws = 4 * due.ceil() as u64;
        while due >= 1.0 && draws > 0 {
            draws -= 1;
            let c = &self.conns[(self.random() % self.conns.len() as u64) as usize];
            let mut st = c.st.borrow_mut();
            if st.phase != SessionPhase::Ready || st.closing {
                continue;
            }
            conn::close_to_reconnect(self, &mut st, b"churn");
            drop(st);
            let mut stats = self.stats.borrow_mut();
            stats.counters.connections_up = stats.counters.connections_up.saturating_sub(1);
            stats.counters.churned += 1;
            drop(stats);
            c.notify();
            due -= 1.0;
        }
        self.churn_due.set(due.min(self.conns.len() as f64));
    }

    /// For the connections of one slice (every `HEARTBEAT_TICKS`-th, from
    /// `slice`): pings each that wrote nothing for its heartbeat interval;
    /// resends what waited `ACK_TIMEOUT` for its `Sent` (a command lost on
    /// the way, as in a fleet while a partition changes owner, is the
    /// client's to retry: the same client id is deduplicated); and starts
    /// over a catch-up that got no `SyncDone` within `SYNC_TIMEOUT`.
    fn heartbeat(&self, slice: usize) {
        let now = Instant::now();
        let slices = HEARTBEAT_TICKS as usize;
        for c in self.conns.iter().skip(slice).step_by(slices) {
            let mut st = c.st.borrow_mut();
            if st.phase == SessionPhase::CatchingUp
                && !st.closing
                && st
                    .catchup_since
                    .is_some_and(|at| now.duration_since(at) > SYNC_TIMEOUT)
            {
                self.stats.borrow_mut().error("sync.timeout");
                conn::close_to_reconnect(self, &mut st, b"catch-up timed out");
                drop(st);
                c.notify();
                continue;
            }
            if st.phase == SessionPhase::Ready {
                let late: Vec<u64> = st
                    .pending
                    .iter()
                    .filter(|(_, p)| {
                        p.transmitted_at
                            .is_some_and(|at| now.duration_since(at) > ACK_TIMEOUT)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                if !late.is_empty() {
                    for id in late {
                        self.transmit(&mut st, c.user, id);
                    }
                    drop(st);
                    c.notify();
                    st = c.st.borrow_mut();
                }
            }
            if st.phase != SessionPhase::Ready || now.duration_since(st.last_write) < st.heartbeat {
                continue;
            }
            let nonce = self.random();
            self.push_frame(&mut st.out, &ClientFrame::Ping { nonce });
            st.last_write = now;
            drop(st);
            c.notify();
        }
    }

    fn progress(&self) {
        let mut stats = self.stats.borrow_mut();
        stats.counters.groups_missing = self.convs.borrow().missing;
        let interval = Box::new(stats.interval.clone());
        stats.interval.reset();
        let event = WorkerEvent::Progress {
            worker: self.index as usize,
            counters: stats.counters.clone(),
            errors: stats.errors.clone(),
            interval,
        };
        // A closed channel means the coordinator is gone; the run ends anyway.
        let _ = self.events.send(event);
    }

    // ---- the end ----

    async fn close_all(&self) {
        for c in &self.conns {
            let mut st = c.st.borrow_mut();
            if st.phase == SessionPhase::Down {
                continue;
            }
            let close_sent = st.phase == SessionPhase::Closing;
            st.closing = true;
            if close_sent {
                continue;
            }
            let mut payload = courier_protocol::close::NORMAL.to_be_bytes().to_vec();
            payload.extend_from_slice(b"run over");
            self.push_control(&mut st.out, Opcode::Close, &payload);
            drop(st);
            c.notify();
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        while Instant::now() < deadline
            && self
                .conns
                .iter()
                .any(|c| c.st.borrow().phase != SessionPhase::Down)
        {
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn outcome(&self) -> Outcome {
        let mut stats = self.stats.borrow_mut();
        stats.counters.groups_missing = self.convs.borrow().missing;
        let mut tally = std::mem::take(&mut stats.tally);
        for c in &self.conns {
            let st = c.st.borrow();
            tally.add_book(c.user, &st.book);
            tally
                .reads_known
                .extend(st.reads_known().map(|(conv, upto)| (c.user, conv, upto)));
        }
        Outcome {
            counters: stats.counters.clone(),
            errors: std::mem::take(&mut stats.errors),
            latencies: std::mem::take(&mut stats.latencies),
            tally,
            driver: self.driver,
        }
    }
}
