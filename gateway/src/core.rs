//! One gateway core: a monoio runtime on its own thread that owns its
//! listener, its sockets and its sessions outright.
//!
//! ```text
//!  SO_REUSEPORT listener ─► accept loop ─► upgrade task ─► session task ◄─┐
//!                                                              │  ▲       │
//!                                            commands to router│  │wake   │ wake
//!                                                              ▼  │       │
//!  router thread ── per-core delivery batch ─► Mailbox ─► inbox task ─► slab of Slots
//!                                                         sweep task ──────┘ (pings, timeouts)
//! ```
//!
//! A session is one small task plus one [`Slot`] in the core's slab. The
//! task reads only after the socket is readable, into a buffer shared by the
//! whole core, so an idle session pins no read buffer; it writes by
//! coalescing everything queued into a shared write buffer and keeps only
//! the bytes the socket did not take. Nothing on a core is locked: the slab
//! and the buffers are `RefCell`s borrowed for the span of one step, never
//! across an await.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_protocol::token::{self, Secret};
use courier_protocol::ws::{self, Decoder, Event, Limits, Opcode, Role};
use courier_protocol::{close, error::ErrorCode};
use courier_router::api::{Class, Command, Delivery, Device, SessionKey};
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::{TcpListener, TcpStream};
use slab::Slab;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use crate::config::ServeArgs;
use crate::handshake::{self, Refusal, Request};
use crate::mailbox::Mailbox;
use crate::metrics::{CoreLabel, GatewayMetrics};
use crate::probe::Probes;
use crate::session::{Admit, CloseReason, CloseRequest, Pushed, SendGate, Slot};
use crate::throttle::Warnings;

/// Size of the per-core read buffer every session reads into.
const READ_BUF: usize = 64 * 1024;
/// A session task writes at most this much per write call.
const WRITE_BATCH: usize = 64 * 1024;
/// Reads a session task does per wake before yielding to other sessions.
const READ_BUDGET: usize = 16;
/// Seconds a closing session waits for its peer's close frame.
const CLOSE_WAIT_S: u32 = 3;
/// Shortest pause between two steps of a drain's close schedule, so a
/// large core closes a few sessions per wake-up instead of one.
const DRAIN_TICK: Duration = Duration::from_millis(5);
/// Largest reconnect hint a drain gives, in milliseconds.
const MAX_RECONNECT_HINT_MS: u64 = 1000;

/// What the rest of the process sends a core.
#[derive(Debug)]
pub enum CoreMsg {
    /// A batch of deliveries from the router.
    Deliveries(Vec<Delivery>),
    /// Stop accepting, close every session with 1001 over the drain window
    /// and exit.
    Shutdown,
    /// An operator asks which sessions of `user` this core holds.
    Devices {
        /// The user asked about.
        user: Arc<str>,
        /// Where the answer goes (the admin endpoint's thread).
        reply: oneshot::Sender<Vec<SessionInfo>>,
    },
    /// An operator closes the sessions of one device with 4007.
    Disconnect {
        /// The device's user.
        user: Arc<str>,
        /// The device number.
        device: u32,
        /// How many sessions were closed here.
        reply: oneshot::Sender<usize>,
    },
}

/// One session as the admin endpoint shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// The device number.
    pub device: u32,
    /// The core that holds the session.
    pub core: u16,
    /// When the upgrade completed, seconds since the Unix epoch.
    pub connected_since_s: u64,
}

/// State shared by every core of the process.
#[derive(Debug)]
pub struct Shared {
    /// The serving configuration.
    pub config: ServeArgs,
    /// The token secret.
    pub secret: Secret,
    /// Where commands go.
    pub router: crate::fleet::Upstream,
    /// Each core's mailbox, indexed by core number.
    pub mailboxes: Vec<Arc<Mailbox<CoreMsg>>>,
    /// Metrics.
    pub metrics: Arc<GatewayMetrics>,
    /// True until shutdown starts; `/readyz` reports it.
    pub ready: Arc<AtomicBool>,
    /// Sessions open in the process, against `max_connections`.
    pub connections: AtomicUsize,
    /// Per-address limits (`None` when both are off).
    pub ip_limits: Option<crate::iplimit::IpLimits>,
    /// Bytes queued for sending on each core, as its last sweep counted.
    pub queued_per_core: Vec<AtomicUsize>,
}

impl Shared {
    /// Starts shutting down: not ready, and every core told to drain.
    pub fn begin_shutdown(&self) {
        if self.ready.swap(false, Ordering::AcqRel) {
            self.metrics.ready.set(0);
            tracing::info!(
                sessions = self.connections.load(Ordering::Relaxed),
                drain.window_ms = self.config.drain_window_ms,
                "drain started: not ready, closing sessions with 1001"
            );
            for mailbox in &self.mailboxes {
                mailbox.push(CoreMsg::Shutdown);
            }
        }
    }
}

/// A core's own state, shared by its tasks through an `Rc`.
struct Core {
    id: u16,
    shared: Arc<Shared>,
    label: CoreLabel,
    /// Sessions of this core. A slot is inserted by the upgrade task and
    /// removed by its session task when the session ends.
    slots: RefCell<Slab<Slot>>,
    /// Next generation to give a slot; bumped on every insert.
    next_generation: Cell<u32>,
    /// Seconds since the core started, updated by the sweep and on reads.
    start: Instant,
    /// Shared read buffer, borrowed for one `poll_read` and its decoding.
    read_buf: RefCell<Box<[u8]>>,
    /// Shared write buffer, borrowed for one coalesce-and-write step.
    write_buf: RefCell<Vec<u8>>,
    /// Origins of the live messages in the write buffer, for the latency histogram.
    origins: RefCell<Vec<Instant>>,
    /// Device-ack probes of this core's sessions: started by a session's
    /// write step, ended by its read step or its end, aged out by the sweep.
    probes: RefCell<Probes>,
    /// Each session's send gate: (tokens a second, burst), twice the
    /// router's per-user rate and burst (see [`SendGate`]).
    send_gate: (u16, u16),
    /// Each session's typing gate, the same from the router's typing limit.
    typing_gate: (u16, u16),
    shutting_down: Cell<bool>,
    /// Set by the sweep while the process's outbound queues are over
    /// `max_outbound_total_bytes`: ephemeral frames are dropped.
    pressure: Cell<bool>,
    /// Set by the inbox task when the shutdown message arrives; the core's
    /// main future waits for it, then runs the drain.
    shutdown_asked: Cell<bool>,
    /// The main future's waker while it waits for `shutdown_asked`.
    shutdown_waker: Cell<Option<std::task::Waker>>,
    /// State of the core's xorshift generator for reconnect hints.
    rng: Cell<u64>,
    /// Rate limits for this core's per-connection warnings.
    warn: Warnings,
}

impl Core {
    fn now_s(&self) -> u32 {
        self.start.elapsed().as_secs() as u32
    }

    fn limits(&self) -> Limits {
        let max = self.shared.config.max_message();
        Limits {
            max_frame: max,
            max_message: max,
        }
    }

    /// Queues an encoded server frame on a session as a reply.
    fn reply(&self, key: SessionKey, frame: &ServerFrame) {
        let bytes = encode_server(frame);
        let mut slots = self.slots.borrow_mut();
        if let Some(slot) = live_slot(&mut slots, key).filter(|s| s.close.is_none()) {
            // Replies answer the client's own requests (a catch-up page is
            // one); they get 4x the headroom of live traffic, so the limit
            // only stops a client that asks and never reads.
            match slot
                .out_mut()
                .push(Class::Reply, bytes, None, self.reply_limit())
            {
                Pushed::Full => self.slow_consumer(slot),
                _ => slot.wake(),
            }
        }
    }

    /// A number from this core's generator (xorshift64*; reconnect hints
    /// need spread, not secrecy).
    fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// This core's sessions of `user`, for the admin endpoint. A scan of
    /// the slab: rare operator queries pay for it instead of every attach.
    fn sessions_of(&self, slots: &Slab<Slot>, user: &str) -> Vec<SessionInfo> {
        let (now, unix) = (self.now_s(), unix_now_s());
        slots
            .iter()
            .filter(|(_, s)| *s.device.user == *user)
            .map(|(_, s)| SessionInfo {
                device: s.device.device,
                core: self.id,
                connected_since_s: unix
                    .saturating_sub(u64::from(now.saturating_sub(s.connected_s))),
            })
            .collect()
    }

    /// Closes `user`'s sessions of `device` with 4007, after what is queued.
    fn disconnect(&self, slots: &mut Slab<Slot>, user: &str, device: u32) -> usize {
        let mut closed = 0;
        for (_, slot) in slots.iter_mut() {
            if *slot.device.user == *user && slot.device.device == device && slot.close.is_none() {
                slot.request_close(CloseRequest {
                    code: close::OPERATOR_DISCONNECT,
                    reason: "disconnected by an operator".into(),
                    flush_first: true,
                });
                closed += 1;
            }
        }
        closed
    }

    fn reply_limit(&self) -> usize {
        self.shared.config.max_outbound_bytes.saturating_mul(4)
    }

    fn slow_consumer(&self, slot: &mut Slot) {
        self.close_slow(slot, false);
    }

    /// Closes `slot` as a slow consumer (4003): its own queue is full, or
    /// (`for_cap`) it is among the largest while the process's queues
    /// together are over their cap.
    fn close_slow(&self, slot: &mut Slot, for_cap: bool) {
        if slot.close.is_none() {
            let metrics = &self.shared.metrics;
            metrics.slow_consumer_closes.inc();
            if for_cap {
                metrics.outbound_cap_closes.inc();
            }
            if let Some(held) = self.warn.slow_consumer.admit(Instant::now()) {
                let why = if for_cap {
                    "the process's outbound queues are over their cap and its queue is among the largest"
                } else {
                    "its outbound queue stayed full"
                };
                tracing::warn!(
                    conn.core = self.id,
                    warnings.held = held,
                    "closing a slow consumer (4003): {why}"
                );
            }
        }
        slot.request_close(CloseRequest {
            code: close::SLOW_CONSUMER,
            reason: "outbound queue full; reconnect and catch up".into(),
            flush_first: false,
        });
    }

    /// Applies one router delivery to its session, if the session is still there.
    fn deliver(&self, slots: &mut Slab<Slot>, delivery: Delivery) {
        let Some(slot) = live_slot(slots, delivery.session()) else {
            return;
        };
        if slot.close.is_some() {
            // Nothing may follow the close frame. What is dropped here is
            // still pending in the router and comes back on reconnect.
            return;
        }
        match delivery {
            Delivery::Frame {
                class,
                frame,
                origin,
                ..
            } => {
                if class == Class::Ephemeral && self.pressure.get() {
                    self.shared.metrics.ephemeral_shed.inc();
                    return;
                }
                let limit = match class {
                    Class::Reply => self.reply_limit(),
                    _ => self.shared.config.max_outbound_bytes,
                };
                match slot.out_mut().push(class, frame, origin, limit) {
                    Pushed::Queued => slot.wake(),
                    Pushed::Shed => {}
                    Pushed::Full => self.slow_consumer(slot),
                }
            }
            Delivery::Close { code, reason, .. } => {
                slot.request_close(CloseRequest {
                    code,
                    reason: reason.into(),
                    flush_first: true,
                });
            }
        }
    }
}

/// Which of a session's gates a frame passes.
#[derive(Clone, Copy)]
enum Gate {
    Send,
    Typing,
}

/// A session's send gate from the user's limit: twice its rate (at least 1
/// token a second) and twice its burst, in whole tokens.
fn send_gate(config: &ServeArgs) -> (u16, u16) {
    (doubled(config.send_rate), doubled(config.send_burst))
}

/// A session's typing gate, from the router's per-user typing limit as
/// [`send_gate`] does from its send limit.
fn typing_gate() -> (u16, u16) {
    let limit = courier_router::RouterConfig::default();
    (
        doubled(limit.typing_rate_per_s),
        doubled(limit.typing_burst),
    )
}

/// Twice `x` in whole tokens, at least 1.
fn doubled(x: f64) -> u16 {
    (2.0 * x).ceil().clamp(1.0, f64::from(u16::MAX)) as u16
}

fn live_slot(slots: &mut Slab<Slot>, key: SessionKey) -> Option<&mut Slot> {
    slots
        .get_mut(key.slot as usize)
        .filter(|s| s.generation == key.generation)
}

/// Encodes `frame` as a complete WebSocket binary frame.
pub fn encode_server(frame: &ServerFrame) -> Bytes {
    let mut payload = Vec::with_capacity(64);
    frame.encode(&mut payload);
    let mut out = Vec::with_capacity(payload.len() + ws::MAX_HEADER);
    ws::encode_frame(&mut out, Opcode::Binary, &payload, None);
    Bytes::from(out)
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs core `id` on the current thread's monoio runtime until shutdown.
pub async fn run(id: u16, shared: Arc<Shared>, listener: std::net::TcpListener) -> io::Result<()> {
    let listener = Rc::new(TcpListener::from_std(listener)?);
    let gate = send_gate(&shared.config);
    let core = Rc::new(Core {
        id,
        label: CoreLabel {
            core: id.to_string(),
        },
        shared,
        slots: RefCell::new(Slab::new()),
        next_generation: Cell::new(1),
        start: Instant::now(),
        read_buf: RefCell::new(vec![0u8; READ_BUF].into_boxed_slice()),
        write_buf: RefCell::new(Vec::with_capacity(WRITE_BATCH)),
        origins: RefCell::new(Vec::new()),
        probes: RefCell::new(Probes::default()),
        send_gate: gate,
        typing_gate: typing_gate(),
        shutting_down: Cell::new(false),
        pressure: Cell::new(false),
        shutdown_asked: Cell::new(false),
        shutdown_waker: Cell::new(None),
        rng: Cell::new(seed()),
        warn: Warnings::default(),
    });
    monoio::spawn(accept_loop(core.clone(), listener.clone()));
    monoio::spawn(sweep_loop(core.clone()));
    // The inbox keeps running through the drain: sessions still open get
    // their messages and acks until their turn to close comes.
    monoio::spawn(inbox_loop(core.clone()));
    poll_fn(|cx| {
        if core.shutdown_asked.get() {
            Poll::Ready(())
        } else {
            core.shutdown_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    })
    .await;
    drain(&core, &listener).await;
    Ok(())
}

/// A seed for the reconnect-hint generator; never zero.
fn seed() -> u64 {
    let mut raw = [0u8; 8];
    if getrandom::fill(&mut raw).is_err() {
        raw = unix_now_ms().to_le_bytes();
    }
    u64::from_le_bytes(raw) | 1
}

/// Accepts connections until shutdown. An accept in flight is never
/// cancelled (under io_uring cancellation is best-effort and could lose a
/// connection); shutdown ends it by shutting the listening socket down,
/// which makes the pending accept fail.
async fn accept_loop(core: Rc<Core>, listener: Rc<TcpListener>) {
    loop {
        let accepted = listener.accept().await;
        if core.shutting_down.get() {
            return;
        }
        match accepted {
            Ok((stream, addr)) => {
                monoio::spawn(upgrade(core.clone(), stream, addr));
            }
            Err(e) => {
                core.shared.metrics.accept_errors.inc();
                let out_of_resources = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if let Some(held) = core.warn.accept.admit(Instant::now()) {
                    tracing::warn!(conn.core = core.id, error = %e, warnings.held = held, "accept failed");
                }
                if out_of_resources {
                    // Spinning on accept would burn the core; wait for
                    // sessions to end and free descriptors.
                    monoio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Receives router batches and control messages for this core, until the
/// core's runtime ends.
async fn inbox_loop(core: Rc<Core>) {
    let mailbox = core.shared.mailboxes[usize::from(core.id)].clone();
    let mut batch = Vec::new();
    loop {
        mailbox.recv_batch(&mut batch).await;
        let mut slots = core.slots.borrow_mut();
        for msg in batch.drain(..) {
            match msg {
                CoreMsg::Deliveries(deliveries) => {
                    for d in deliveries {
                        core.deliver(&mut slots, d);
                    }
                }
                CoreMsg::Shutdown => {
                    core.shutdown_asked.set(true);
                    if let Some(waker) = core.shutdown_waker.take() {
                        waker.wake();
                    }
                }
                CoreMsg::Devices { user, reply } => {
                    let _ = reply.send(core.sessions_of(&slots, &user));
                }
                CoreMsg::Disconnect {
                    user,
                    device,
                    reply,
                } => {
                    let _ = reply.send(core.disconnect(&mut slots, &user, device));
                }
            }
        }
    }
}

/// Stops accepting, then closes the core's sessions with 1001 spread evenly
/// over the drain window (the i-th of n at `i * window / n`), each after
/// what is already queued for it and with its own jittered reconnect hint;
/// then waits a bounded time for them to end.
async fn drain(core: &Rc<Core>, listener: &TcpListener) {
    core.shutting_down.set(true);
    // SAFETY: the descriptor is the listener's own and stays open while
    // `listener` is borrowed; shutdown(2) on it only changes socket state.
    unsafe {
        libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD);
    }
    let window = core.shared.config.drain_window();
    let hint_max_ms = (core.shared.config.drain_window_ms / 10).min(MAX_RECONNECT_HINT_MS);
    // The sessions open now, in slab order. One that upgrades after this
    // (its upgrade passed the shutdown check just before) is closed at the
    // end of the window.
    let keys: Vec<(usize, u32)> = core
        .slots
        .borrow()
        .iter()
        .map(|(i, s)| (i, s.generation))
        .collect();
    let n = keys.len();
    let start = Instant::now();
    let mut next = 0;
    while next < n {
        let due = if window.is_zero() {
            n
        } else {
            let elapsed = start.elapsed().as_micros();
            let due = elapsed * n as u128 / window.as_micros().max(1) + 1;
            (due.min(n as u128)) as usize
        };
        {
            let mut slots = core.slots.borrow_mut();
            for &(slot, generation) in &keys[next..due] {
                if let Some(s) = slots.get_mut(slot).filter(|s| s.generation == generation) {
                    close_draining(core, s, hint_max_ms);
                }
            }
        }
        next = due;
        if next < n {
            let at = start + window.mul_f64(next as f64 / n as f64);
            let pause = at.saturating_duration_since(Instant::now()).max(DRAIN_TICK);
            monoio::time::sleep(pause).await;
        }
    }
    for (_, s) in core.slots.borrow_mut().iter_mut() {
        close_draining(core, s, hint_max_ms);
    }
    let deadline = Instant::now() + Duration::from_secs(u64::from(CLOSE_WAIT_S) + 2);
    while !core.slots.borrow().is_empty() && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(
        conn.core = core.id,
        sessions.closed = n,
        sessions.left = core.slots.borrow().len(),
        drain.ms = start.elapsed().as_millis() as u64,
        "core drained"
    );
}

/// Asks `slot` to close with 1001 after what is queued, with a reconnect
/// hint drawn uniformly from `0..=hint_max_ms`.
fn close_draining(core: &Core, slot: &mut Slot, hint_max_ms: u64) {
    let reconnect_after_ms = (core.random() % (hint_max_ms + 1)) as u32;
    slot.request_close(CloseRequest {
        code: close::GOING_AWAY,
        reason: CloseReason::Draining { reconnect_after_ms },
        flush_first: true,
    });
}

/// Once a second: pings quiet sessions, closes idle and expired ones, ends
/// sessions whose peer never answered our close, and samples gauges.
async fn sweep_loop(core: Rc<Core>) {
    let cfg = &core.shared.config;
    let (ping_after, idle_after) = (cfg.ping_interval_s, cfg.idle_timeout_s);
    let mut ping = Vec::new();
    ws::encode_frame(&mut ping, Opcode::Ping, b"", None);
    let ping = Bytes::from(ping);
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        let now = core.now_s();
        let unix = unix_now_s();
        let mut queued = 0usize;
        let mut slots = core.slots.borrow_mut();
        for (_, slot) in slots.iter_mut() {
            queued += slot.queued_bytes();
            if let Some(since) = slot.closing_since_s {
                if now.saturating_sub(since) >= CLOSE_WAIT_S {
                    slot.force_end = true;
                    slot.wake();
                }
                continue;
            }
            let quiet = now.saturating_sub(slot.last_rx_s);
            if quiet >= idle_after {
                slot.request_close(CloseRequest {
                    code: close::IDLE_TIMEOUT,
                    reason: "nothing received within the idle timeout".into(),
                    flush_first: false,
                });
            } else if quiet >= ping_after && !slot.ping_outstanding {
                slot.ping_outstanding = true;
                slot.out_mut().push_control(ping.clone());
                slot.wake();
            }
            if slot.token_exp_s + token::LEEWAY_S <= unix {
                slot.request_close(CloseRequest {
                    code: close::TOKEN_EXPIRED,
                    reason: "token expired; reconnect with a new token".into(),
                    flush_first: true,
                });
            }
        }
        relieve_pressure(&core, &mut slots, queued);
        core.probes.borrow_mut().expire(Instant::now());
        let m = &core.shared.metrics;
        m.connections
            .get_or_create(&core.label)
            .set(slots.len() as i64);
        m.outbound_queue_bytes
            .get_or_create(&core.label)
            .set(queued as i64);
    }
}

/// Queues under this size are never closed for the process-wide cap.
const PRESSURE_MIN_SESSION_BYTES: usize = 64 * 1024;

/// The process-wide outbound cap: publishes this core's queued bytes, and
/// when all cores together are over the cap, sheds ephemeral frames and
/// closes this core's largest queues (over 64 KiB) as slow consumers until
/// its share of the excess is gone. The per-session cap still applies.
fn relieve_pressure(core: &Core, slots: &mut Slab<Slot>, queued: usize) {
    let shared = &core.shared;
    shared.queued_per_core[usize::from(core.id)].store(queued, Ordering::Relaxed);
    let cap = shared.config.max_outbound_total_bytes;
    if cap == 0 {
        return;
    }
    let total: usize = shared
        .queued_per_core
        .iter()
        .map(|q| q.load(Ordering::Relaxed))
        .sum();
    let over = total > cap;
    core.pressure.set(over);
    shared.metrics.outbound_pressure.set(i64::from(over));
    if !over {
        return;
    }
    // This core gives up its part of the excess, in proportion to what it
    // holds.
    let mut to_free = ((total - cap) as u128 * queued as u128 / total.max(1) as u128) as usize;
    let mut big: Vec<(usize, usize)> = slots
        .iter()
        .filter(|(_, s)| s.close.is_none() && s.queued_bytes() > PRESSURE_MIN_SESSION_BYTES)
        .map(|(i, s)| (s.queued_bytes(), i))
        .collect();
    big.sort_unstable_by(|a, b| b.cmp(a));
    for (bytes, i) in big {
        if to_free == 0 {
            break;
        }
        if let Some(slot) = slots.get_mut(i) {
            core.close_slow(slot, true);
            slot.wake();
            to_free = to_free.saturating_sub(bytes);
        }
    }
}

/// Reads `buf.len()` bytes at most; `Ok(0)` is end of stream.
async fn read_some(stream: &mut TcpStreamPoll, buf: &mut [u8]) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

async fn write_all(stream: &mut TcpStreamPoll, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Gives an admitted address's count back if the upgrade ends without a
/// session; a session gives it back itself when it ends.
struct IpGuard {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
    armed: bool,
}

impl IpGuard {
    /// The session takes the count over; returns the address it counts.
    fn hand_over(mut self) -> std::net::IpAddr {
        self.armed = false;
        self.ip
    }
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(limits) = &self.shared.ip_limits {
            limits.release(self.ip);
        }
    }
}

/// Reads the upgrade request (or, with `pages`, a GET of the browser
/// client); returns it with the bytes read past an upgrade.
async fn read_upgrade(
    stream: &mut TcpStreamPoll,
    max: usize,
    pages: bool,
) -> io::Result<Result<(Request, Vec<u8>), Refusal>> {
    let mut buf = Vec::new();
    loop {
        // Read into the buffer's own spare room, up to the header limit
        // (plus a little, so an over-long request is seen as such).
        let len = buf.len();
        buf.resize((len + 1024).min(max + 1).max(len + 1), 0);
        let n = read_some(stream, &mut buf[len..]).await?;
        buf.truncate(len + n);
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match handshake::parse(&buf, max, pages) {
            Ok(None) => continue,
            Ok(Some(Request::Upgrade(up))) => {
                let rest = buf.split_off(up.consumed);
                return Ok(Ok((Request::Upgrade(up), rest)));
            }
            Ok(Some(page)) => return Ok(Ok((page, Vec::new()))),
            Err(refusal) => return Ok(Err(refusal)),
        }
    }
}

/// Runs the upgrade of one accepted connection and, if it succeeds, starts
/// its session task. This task and its buffers end with the upgrade.
async fn upgrade(core: Rc<Core>, stream: TcpStream, addr: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Ok(mut stream) = stream.try_into_poll_io() else {
        return;
    };
    let shared = core.shared.clone();
    // Counted from here; given back when the upgrade fails (the guard) or,
    // once a session runs, when the session ends.
    let mut ip_guard = None;
    if let Some(limits) = &shared.ip_limits {
        if let Err(why) = limits.admit(addr.ip(), Instant::now()) {
            let reason = match why {
                crate::iplimit::Refused::TooMany => "too many connections from this address",
                crate::iplimit::Refused::TooFast => "connecting too fast from this address",
            };
            shared.metrics.handshake_refused(reason);
            warn_refused(&core, addr, 429, reason);
            let resp = handshake::refusal_response(Refusal {
                status: 429,
                reason,
            });
            let _ =
                monoio::time::timeout(Duration::from_millis(100), write_all(&mut stream, &resp))
                    .await;
            return;
        }
        ip_guard = Some(IpGuard {
            shared: shared.clone(),
            ip: addr.ip(),
            armed: true,
        });
    }
    let cfg = &shared.config;
    let metrics = &shared.metrics;
    let read = monoio::time::timeout(
        cfg.handshake_timeout(),
        read_upgrade(&mut stream, cfg.max_header_bytes, cfg.web_client),
    )
    .await;
    let refuse = |refusal: Refusal| {
        metrics.handshake_refused(refusal.reason);
        warn_refused(&core, addr, refusal.status, refusal.reason);
        handshake::refusal_response(refusal)
    };
    let (upgrade, rest) = match read {
        Err(_elapsed) => {
            let resp = refuse(Refusal {
                status: 408,
                reason: "upgrade not completed in time",
            });
            let _ =
                monoio::time::timeout(Duration::from_millis(100), write_all(&mut stream, &resp))
                    .await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(client.addr = %addr, error = %e, "upgrade read failed");
            return;
        }
        Ok(Ok(Err(refusal))) => {
            let _ = write_all(&mut stream, &refuse(refusal)).await;
            return;
        }
        Ok(Ok(Ok((Request::Upgrade(up), rest)))) => (up, rest),
        Ok(Ok(Ok((Request::Page(page), _)))) => {
            // A file of the browser client: answered, then the connection
            // ends (no keep-alive), within the upgrade's own deadline.
            metrics.web_files.inc();
            tracing::debug!(client.addr = %addr, "web client file served");
            let resp = crate::web::response(page);
            let _ =
                monoio::time::timeout(cfg.handshake_timeout(), write_all(&mut stream, &resp)).await;
            return;
        }
    };
    if !handshake::origin_allowed(upgrade.origin.as_deref(), &cfg.allowed_origins) {
        let resp = refuse(Refusal {
            status: 403,
            reason: "origin not allowed",
        });
        let _ = write_all(&mut stream, &resp).await;
        return;
    }
    let claims = match upgrade
        .token
        .as_deref()
        .map(|t| token::verify(&shared.secret, t, unix_now_s()))
    {
        Some(Ok(claims)) => claims,
        failure => {
            let reason = match failure {
                Some(Err(token::TokenError::Expired)) => "token expired",
                Some(Err(token::TokenError::NotYetValid)) => "token not yet valid",
                Some(Err(token::TokenError::BadSubject)) => "token names an invalid user or device",
                Some(Err(token::TokenError::Invalid)) => "token invalid",
                _ => "token missing",
            };
            metrics.auth_failed(reason);
            warn_refused(&core, addr, 401, reason);
            let _ = write_all(
                &mut stream,
                &handshake::refusal_response(Refusal {
                    status: 401,
                    reason,
                }),
            )
            .await;
            return;
        }
    };
    if core.shutting_down.get() || shared.connections.load(Ordering::Relaxed) >= cfg.max_connections
    {
        let resp = refuse(Refusal {
            status: 503,
            reason: "node at capacity or shutting down",
        });
        let _ = write_all(&mut stream, &resp).await;
        return;
    }
    if write_all(&mut stream, &handshake::accept_response(&upgrade))
        .await
        .is_err()
    {
        return;
    }

    let device = Device {
        user: Arc::from(claims.sub.as_str()),
        device: claims.dev,
    };
    let generation = core.next_generation.get();
    core.next_generation.set(generation.wrapping_add(1).max(1));
    let slot = core.slots.borrow_mut().insert(Slot {
        generation,
        device: device.clone(),
        token_exp_s: claims.exp,
        last_rx_s: core.now_s(),
        connected_s: core.now_s(),
        ping_outstanding: false,
        waker: None,
        wake_pending: false,
        out: None,
        close: None,
        closing_since_s: None,
        force_end: false,
        counted_ip: ip_guard.map(|g| Box::new(g.hand_over())),
        sends: SendGate::full(core.send_gate.1, core.now_s()),
        typing: SendGate::full(core.typing_gate.1, core.now_s()),
    });
    let key = SessionKey {
        node: shared.config.node_id,
        core: core.id,
        slot: slot as u32,
        generation,
    };
    shared.connections.fetch_add(1, Ordering::Relaxed);
    metrics.connections.get_or_create(&core.label).inc();
    core.reply(
        key,
        &ServerFrame::Welcome {
            user: claims.sub,
            device: claims.dev,
            server_time_ms: unix_now_ms(),
            max_body: cfg.max_body as u32,
            idle_timeout_s: cfg.idle_timeout_s,
        },
    );
    let _ = shared.router.submit(Command::Attach {
        session: key,
        device: device.clone(),
        issued_at_s: claims.iat,
    });
    let limits = core.limits();
    let mut task = SessionTask {
        core,
        key,
        stream,
        decoder: Decoder::new(Role::Server, limits),
        partial: None,
        unsent: None,
        state: State::Open,
    };
    if !rest.is_empty() {
        task.consume(&rest);
    }
    monoio::spawn(task);
}

/// Logs a refused upgrade, rate-limited per core. Names the peer and the
/// reason, never the token. A plain HTTP request (426: no upgrade asked, as
/// a health check or a browser sends) is at debug: not a client in trouble.
fn warn_refused(core: &Core, addr: SocketAddr, status: u16, reason: &str) {
    if status == 426 {
        tracing::debug!(
            conn.core = core.id,
            client.addr = %addr,
            http.status = status,
            reason,
            "upgrade refused"
        );
        return;
    }
    if let Some(held) = core.warn.upgrade.admit(Instant::now()) {
        tracing::warn!(
            conn.core = core.id,
            client.addr = %addr,
            http.status = status,
            reason,
            warnings.held = held,
            "upgrade refused"
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Frames flow both ways.
    Open,
    /// Our close frame is queued; data frames from the peer are ignored.
    Closing,
    /// Our close frame is written; waiting for the peer's close or EOF.
    CloseSent,
    /// The peer closed first and our answer is queued; end once written.
    Answering,
}

/// One session's I/O: a future polled whenever its socket is ready or its
/// slot is woken. Created after the upgrade, ends when the session ends.
struct SessionTask {
    core: Rc<Core>,
    key: SessionKey,
    stream: TcpStreamPoll,
    decoder: Decoder,
    /// The unread tail of a frame that has not fully arrived; `None` between
    /// frames, which is nearly always for an idle session.
    partial: Option<Vec<u8>>,
    /// Bytes the socket did not take yet, and how many of them went out.
    unsent: Option<(Vec<u8>, usize)>,
    state: State,
}

impl Future for SessionTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        {
            let mut slots = this.core.slots.borrow_mut();
            let Some(slot) = live_slot(&mut slots, this.key) else {
                return Poll::Ready(());
            };
            slot.wake_pending = false;
            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                slot.waker = Some(cx.waker().clone());
            }
            if slot.force_end {
                drop(slots);
                this.finish();
                return Poll::Ready(());
            }
        }
        if this.read(cx).is_break() {
            this.finish();
            return Poll::Ready(());
        }
        this.start_close_if_asked();
        match this.write(cx) {
            Err(_) => {
                this.finish();
                return Poll::Ready(());
            }
            Ok(true) if this.state == State::Closing => this.state = State::CloseSent,
            Ok(true) if this.state == State::Answering => {
                this.finish();
                return Poll::Ready(());
            }
            Ok(_) => {}
        }
        Poll::Pending
    }
}

impl SessionTask {
    /// Reads and handles whatever the socket has. `Break` ends the session.
    fn read(&mut self, cx: &mut Context<'_>) -> ControlFlow<()> {
        let core = self.core.clone();
        for _ in 0..READ_BUDGET {
            let mut buf = core.read_buf.borrow_mut();
            let mut rb = ReadBuf::new(&mut buf[..]);
            let n = match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                Poll::Pending => return ControlFlow::Continue(()),
                Poll::Ready(Err(_)) => return ControlFlow::Break(()),
                Poll::Ready(Ok(())) => rb.filled().len(),
            };
            if n == 0 {
                return ControlFlow::Break(());
            }
            if let Some(slot) = live_slot(&mut core.slots.borrow_mut(), self.key) {
                slot.last_rx_s = core.now_s();
                slot.ping_outstanding = false;
            }
            self.consume(&buf[..n]);
        }
        // Budget used up with data still coming: let other sessions run.
        cx.waker().wake_by_ref();
        ControlFlow::Continue(())
    }

    /// Decodes and handles every complete frame in `input` (after any
    /// partial frame kept from the last read), keeping the incomplete tail.
    fn consume(&mut self, input: &[u8]) {
        let joined;
        let data: &[u8] = match self.partial.take() {
            Some(mut head) => {
                head.extend_from_slice(input);
                joined = head;
                &joined
            }
            None => input,
        };
        let mut pos = 0;
        while pos < data.len() {
            match self.decoder.decode(&data[pos..]) {
                Ok(None) => break,
                Ok(Some((event, used))) => {
                    pos += used;
                    if let Some(event) = event {
                        self.handle_event(event);
                    }
                }
                Err(e) => {
                    tracing::debug!(conn.core = self.key.core, error = %e, "websocket violation");
                    self.fail(e.close_code(), close_reason(&e));
                    return;
                }
            }
            if self.failed() {
                return;
            }
        }
        if pos < data.len() {
            self.partial = Some(data[pos..].to_vec());
        }
    }

    fn failed(&self) -> bool {
        let mut slots = self.core.slots.borrow_mut();
        live_slot(&mut slots, self.key).is_none_or(|s| s.close.is_some_and(|c| !c.flush_first))
    }

    fn handle_event(&mut self, event: Event) {
        if self.state != State::Open {
            // After a close frame, only the peer's close matters.
            if let Event::Close(_) = event {
                if self.state == State::CloseSent || self.state == State::Closing {
                    self.state = State::Answering;
                }
            }
            return;
        }
        match event {
            Event::Binary(payload) => {
                self.core.shared.metrics.frames_in.inc();
                match ClientFrame::decode(&payload) {
                    Ok(frame) => self.handle_frame(frame),
                    Err(e) => {
                        let detail = e.to_string();
                        self.core.reply(
                            self.key,
                            &ServerFrame::Error {
                                code: ErrorCode::BadRequest as u16,
                                reference: 0,
                                detail,
                            },
                        );
                        self.close_gracefully(close::MALFORMED_FRAME, "malformed client frame");
                    }
                }
            }
            Event::Text(_) => self.fail(
                close::UNSUPPORTED_DATA,
                "protocol courier.v1 uses binary frames",
            ),
            Event::Ping(data) => {
                let mut pong = Vec::with_capacity(data.len() + 2);
                ws::encode_frame(&mut pong, Opcode::Pong, &data, None);
                let mut slots = self.core.slots.borrow_mut();
                if let Some(slot) = live_slot(&mut slots, self.key) {
                    slot.out_mut().push_pong(Bytes::from(pong));
                }
            }
            Event::Pong(_) => {}
            Event::Close(received) => {
                // Answer with the peer's code (RFC 6455 section 5.5.1).
                let code = received.map_or(close::NORMAL, |(code, _)| code);
                let mut frame = Vec::new();
                ws::encode_close(&mut frame, code, "", None);
                self.push_control(Bytes::from(frame));
                self.state = State::Answering;
                self.core.shared.metrics.closed(code);
                let mut slots = self.core.slots.borrow_mut();
                if let Some(slot) = live_slot(&mut slots, self.key) {
                    slot.close = Some(CloseRequest {
                        code,
                        reason: "".into(),
                        flush_first: false,
                    });
                    if let Some(out) = slot.out.as_mut() {
                        out.drop_data();
                    }
                }
            }
        }
    }

    fn handle_frame(&mut self, frame: ClientFrame) {
        let core = &self.core;
        match frame {
            ClientFrame::Ping { nonce } => core.reply(self.key, &ServerFrame::Pong { nonce }),
            ClientFrame::Refresh { request, token } => {
                let answer = match token::verify(&core.shared.secret, &token, unix_now_s()) {
                    Ok(c)
                        if self
                            .device()
                            .is_some_and(|d| *c.sub == *d.user && c.dev == d.device) =>
                    {
                        if let Some(slot) = live_slot(&mut core.slots.borrow_mut(), self.key) {
                            slot.token_exp_s = c.exp;
                        }
                        ServerFrame::Done { request }
                    }
                    Ok(_) => ServerFrame::Error {
                        code: ErrorCode::BadRequest as u16,
                        reference: u64::from(request),
                        detail: "token is for another user or device".into(),
                    },
                    Err(e) => ServerFrame::Error {
                        code: ErrorCode::BadRequest as u16,
                        reference: u64::from(request),
                        detail: e.to_string(),
                    },
                };
                core.reply(self.key, &answer);
            }
            frame => {
                let client_id = match &frame {
                    ClientFrame::Send { client_id, .. }
                    | ClientFrame::SendPerDevice { client_id, .. } => {
                        core.shared.metrics.messages_in.inc();
                        if !self.admit(Gate::Send, *client_id) {
                            return;
                        }
                        Some(*client_id)
                    }
                    ClientFrame::Typing { .. } => {
                        if !self.admit(Gate::Typing, 0) {
                            return;
                        }
                        None
                    }
                    ClientFrame::Delivered { conversation, seq }
                    | ClientFrame::Read { conversation, seq } => {
                        let acked = core.probes.borrow_mut().handle_ack(
                            self.key,
                            conversation,
                            *seq,
                            Instant::now(),
                        );
                        if let Some(d) = acked {
                            core.shared
                                .metrics
                                .device_ack_latency
                                .observe(d.as_secs_f64());
                        }
                        None
                    }
                    _ => None,
                };
                let Some(device) = self.device() else { return };
                let cmd = Command::Frame {
                    session: self.key,
                    device,
                    frame,
                    received_at: Instant::now(),
                };
                if core.shared.router.submit(cmd).is_err() {
                    core.shared.metrics.router_refusals.inc();
                    core.reply(
                        self.key,
                        &ServerFrame::Error {
                            code: ErrorCode::Unavailable as u16,
                            reference: client_id.unwrap_or(0),
                            detail: "node overloaded; retry with the same client id".into(),
                        },
                    );
                }
            }
        }
    }

    /// Applies one of the session's gates to a send (`reference`: its
    /// client id) or a typing indicator (0); false when it was refused here
    /// (answered 429) or the session is being closed for flooding.
    fn admit(&self, gate: Gate, reference: u64) -> bool {
        let core = &self.core;
        let admit = {
            let mut slots = core.slots.borrow_mut();
            let Some(slot) = live_slot(&mut slots, self.key) else {
                return false;
            };
            let now = core.now_s();
            match gate {
                Gate::Send => slot.sends.admit(now, core.send_gate.0, core.send_gate.1),
                Gate::Typing => slot
                    .typing
                    .admit(now, core.typing_gate.0, core.typing_gate.1),
            }
        };
        if admit == Admit::Pass {
            return true;
        }
        let metrics = &core.shared.metrics;
        match gate {
            Gate::Send => metrics.gateway_send_refusals.inc(),
            Gate::Typing => metrics.gateway_typing_refusals.inc(),
        };
        if admit == Admit::Close {
            let reason = match gate {
                Gate::Send => "kept sending after 429; reconnect later and respect the send rate",
                Gate::Typing => {
                    "kept typing after 429; reconnect later and respect the typing rate"
                }
            };
            self.close_gracefully(close::POLICY_VIOLATION, reason);
            return false;
        }
        let detail = match gate {
            Gate::Send => "send rate far over the limit; retry in 1000 ms",
            Gate::Typing => "typing rate far over the limit; retry in 1000 ms",
        };
        core.reply(
            self.key,
            &ServerFrame::Error {
                code: ErrorCode::RateLimited as u16,
                reference,
                detail: detail.into(),
            },
        );
        false
    }

    /// Who this session is, from its slot (the task keeps no copy).
    fn device(&self) -> Option<Device> {
        let mut slots = self.core.slots.borrow_mut();
        live_slot(&mut slots, self.key).map(|s| s.device.clone())
    }

    fn push_control(&self, frame: Bytes) {
        let mut slots = self.core.slots.borrow_mut();
        if let Some(slot) = live_slot(&mut slots, self.key) {
            slot.out_mut().push_control(frame);
        }
    }

    /// Fails the connection: queued data is dropped, the close goes out first.
    fn fail(&self, code: u16, reason: &'static str) {
        let mut slots = self.core.slots.borrow_mut();
        if let Some(slot) = live_slot(&mut slots, self.key) {
            slot.request_close(CloseRequest {
                code,
                reason: reason.into(),
                flush_first: false,
            });
        }
    }

    fn close_gracefully(&self, code: u16, reason: &'static str) {
        let mut slots = self.core.slots.borrow_mut();
        if let Some(slot) = live_slot(&mut slots, self.key) {
            slot.request_close(CloseRequest {
                code,
                reason: reason.into(),
                flush_first: true,
            });
        }
    }

    /// Queues our close frame once a close has been asked for.
    fn start_close_if_asked(&mut self) {
        if self.state != State::Open {
            return;
        }
        let mut slots = self.core.slots.borrow_mut();
        let Some(slot) = live_slot(&mut slots, self.key) else {
            return;
        };
        let Some(req) = slot.close else { return };
        if !req.flush_first {
            // Queued frames go; bytes already partly written stay, or the
            // close frame would land inside a frame the client is reading.
            if let Some(out) = slot.out.as_mut() {
                out.drop_data();
            }
        }
        let mut frame = Vec::new();
        let mut reason = String::new();
        ws::encode_close(&mut frame, req.code, req.reason.render(&mut reason), None);
        // Behind what is queued when flushing first, else ahead of nothing.
        let out = slot.out_mut();
        if req.flush_first {
            out.push_last(Bytes::from(frame));
        } else {
            out.push_control(Bytes::from(frame));
        }
        slot.closing_since_s = Some(self.core.now_s());
        self.state = State::Closing;
        self.core.shared.metrics.closed(req.code);
    }

    /// Writes what is queued. `Ok(true)`: everything is written.
    fn write(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let core = self.core.clone();
        loop {
            if let Some((buf, sent)) = self.unsent.as_mut() {
                match Pin::new(&mut self.stream).poll_write(cx, &buf[*sent..]) {
                    Poll::Pending => return Ok(false),
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => *sent += n,
                }
                if *sent == buf.len() {
                    self.unsent = None;
                }
                continue;
            }
            let mut wbuf = core.write_buf.borrow_mut();
            let mut origins = core.origins.borrow_mut();
            let mut first_live = None;
            wbuf.clear();
            origins.clear();
            let frames;
            {
                let mut slots = core.slots.borrow_mut();
                let Some(slot) = live_slot(&mut slots, self.key) else {
                    return Ok(true);
                };
                let Some(out) = slot.out.as_mut() else {
                    return Ok(true);
                };
                frames = out.drain_into(&mut wbuf, WRITE_BATCH, &mut origins, &mut first_live);
                if out.is_empty() {
                    slot.out = None;
                }
            }
            if wbuf.is_empty() {
                return Ok(true);
            }
            let m = &core.shared.metrics;
            match Pin::new(&mut self.stream).poll_write(cx, &wbuf) {
                Poll::Ready(Ok(n)) => {
                    if n < wbuf.len() {
                        self.unsent = Some((wbuf[n..].to_vec(), 0));
                    }
                }
                Poll::Pending => self.unsent = Some((wbuf.to_vec(), 0)),
                Poll::Ready(Err(e)) => return Err(e),
            }
            m.frames_out.inc_by(frames as u64);
            m.messages_out.inc_by(origins.len() as u64);
            let now = Instant::now();
            for origin in origins.iter() {
                m.delivery_latency
                    .observe(now.saturating_duration_since(*origin).as_secs_f64());
            }
            if let Some(frame) = first_live {
                core.probes
                    .borrow_mut()
                    .handle_written(self.key, &frame, now);
            }
        }
    }

    /// Ends the session: frees its slot and tells the router.
    fn finish(&mut self) {
        let core = &self.core;
        let removed = {
            let mut slots = core.slots.borrow_mut();
            match slots.get(self.key.slot as usize) {
                Some(s) if s.generation == self.key.generation => {
                    Some(slots.remove(self.key.slot as usize))
                }
                _ => None,
            }
        };
        if let Some(slot) = removed {
            core.probes.borrow_mut().forget(self.key);
            if let (Some(limits), Some(ip)) = (&core.shared.ip_limits, &slot.counted_ip) {
                limits.release(**ip);
            }
            if slot.close.is_none() {
                // The peer vanished without a close handshake.
                core.shared.metrics.closed(1006);
            }
            core.shared.connections.fetch_sub(1, Ordering::Relaxed);
            core.shared
                .metrics
                .connections
                .get_or_create(&core.label)
                .dec();
            // Last seen: when the peer was last heard from (an idle timeout
            // ends a session long after that).
            let quiet_s = core.now_s().saturating_sub(slot.last_rx_s);
            let last_seen_ms = unix_now_ms().saturating_sub(u64::from(quiet_s) * 1000);
            let _ = core.shared.router.submit(Command::Detach {
                session: self.key,
                device: slot.device,
                last_seen_ms,
            });
        }
    }
}

/// The close reason for a framing violation.
fn close_reason(e: &ws::WsError) -> &'static str {
    match e {
        ws::WsError::Protocol(what) => what,
        ws::WsError::TooBig => "frame or message over the size limit",
        ws::WsError::InvalidUtf8 => "invalid UTF-8",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The idle-session memory budget starts here: these are the bytes
    /// every open session holds in its task and its slot, before the
    /// allocator's rounding and the kernel's socket.
    #[test]
    fn session_state_stays_small() {
        let task = std::mem::size_of::<SessionTask>();
        let slot = std::mem::size_of::<Slot>();
        eprintln!(
            "SessionTask {task} B, Slot {slot} B, stream {} B, decoder {} B",
            std::mem::size_of::<TcpStreamPoll>(),
            std::mem::size_of::<Decoder>()
        );
        assert!(task <= 256, "SessionTask is {task} bytes");
        assert!(slot <= 160, "Slot is {slot} bytes");
    }
}
