//! One user's connection: connect, upgrade, catch up, exchange frames,
//! reconnect.
//!
//! A [`Conn`] lives for the whole run; a *session* is one TCP connection of
//! it. Each session has a reader (the connection's own task) and a writer
//! task that drains `ConnState::out`. What must survive a reconnect (the
//! device's book of held sequences, the sends not yet acked) lives in the
//! `Conn`, so a new session resumes where the old one stopped.
//!
//! ```text
//!  connect ─► upgrade ─► Welcome ─► Sync ─► Message* ─► SyncDone{more}
//!                                    ▲                       │ more
//!                                    └───────────────────────┘
//!                        SyncDone{!more} ─► Ready: resend what is pending,
//!                                           then live traffic
//! ```
//!
//! Memory per connection: an 8 KiB read buffer while a session is up (a
//! larger one only while a larger frame is in flight), the output buffer
//! (kept up to 16 KiB for reuse), and the device's book.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use rustc_hash::FxHashMap;

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{
    self, ClientFrame, ConversationSummary, Cursor, EntryKind, ReceiptKind, ServerFrame,
};
use courier_protocol::ws::{Decoder, Event, Limits, Opcode, Role, WsError};

use crate::body::{self, Stamp};
use crate::check::{Ack, Arrival, DeviceBook};
use crate::control::Phase;
use crate::handshake::{self, HandshakeError};
use crate::worker::{Retry, Signal, Worker, REQUEST_BASE};

/// Bytes asked for per read.
const READ_BUF: usize = 8 * 1024;
/// Grow the read buffer when less than this is free.
const MIN_READ: usize = 1024;
/// Largest output buffer kept for reuse after a write.
const MAX_SPARE: usize = 16 * 1024;
/// Connect plus upgrade must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause before a churned connection reconnects.
const CHURN_PAUSE: Duration = Duration::from_millis(200);
/// Application ping interval when the server states no idle timeout.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(20);
/// Largest frame accepted from the server (a catch-up page is many frames).
const LIMITS: Limits = Limits {
    max_frame: 4 << 20,
    max_message: 4 << 20,
};

/// One user's device and its connection. Created by its worker at start,
/// dropped at the end of the run.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The user (device 1).
    pub user: u32,
    /// Index in the worker's connection list.
    pub local: usize,
    token: String,
    /// Everything that changes; never borrowed across an await.
    pub st: RefCell<ConnState>,
}

/// The changing part of a [`Conn`].
#[derive(Debug)]
pub(crate) struct ConnState {
    /// The live session's number; 0 when none is up.
    pub session: u64,
    /// Where the session is.
    pub phase: SessionPhase,
    /// Frames waiting for the writer.
    pub out: Vec<u8>,
    /// Wakes the live session's writer. Replaced per session, so a writer
    /// of a dead session can never take the wake-up of a new one.
    wake: Rc<Signal>,
    /// Sends without a SENT yet, by client id; resent in this order after
    /// a reconnect. Entries leave on SENT or on a non-retryable error.
    pub pending: BTreeMap<u64, Pending>,
    /// What the device holds; lives across sessions.
    pub book: DeviceBook,
    /// Conversations with arrivals not yet acknowledged by `Delivered`.
    dirty: Vec<u32>,
    /// When the last frame was queued (for heartbeats).
    pub last_write: Instant,
    /// Ping when nothing was written for this long.
    pub heartbeat: Duration,
    /// Set at the end of the run: a close is on its way; do not reconnect.
    pub closing: bool,
    /// Set when churn closed the session: reconnect at once, count no error.
    pub churning: bool,
    /// Conversations with arrivals the user also reads (a `Read` receipt).
    read_dirty: Vec<u32>,
    ever_connected: bool,
    ever_ready: bool,
    /// Cursors of the catch-up in progress: the first `Sync`'s (what the
    /// device held) and the highest sequence per conversation seen since.
    catchup_base: Vec<(u32, u64)>,
    page_max: Vec<(u32, u64)>,
    /// When the catch-up in progress was asked for.
    pub catchup_since: Option<Instant>,
    /// When a session of this device ended unasked, until a later one has
    /// caught up (the `reconnect` histogram).
    dropped_at: Option<Instant>,
    /// Receipts this device's own direct messages are waiting for, per
    /// conversation; lives across sessions.
    receipts: FxHashMap<u32, ReceiptBook>,
}

impl ConnState {
    /// Per direct conversation, the highest READ this device learned of.
    pub fn reads_known(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.receipts.iter().map(|(conv, b)| (*conv, b.read_known))
    }
}

/// The sender's side of one direct conversation's receipts.
#[derive(Debug, Default)]
struct ReceiptBook {
    /// The highest delivered and read values told live so far: a live
    /// receipt at or below is a duplicate.
    live_delivered: u64,
    live_read: u64,
    /// The highest READ known, live or from a summary.
    read_known: u64,
    /// Own acked messages (seq, intended send time) not yet known to be
    /// delivered, and not yet known to be read, oldest first.
    undelivered: VecDeque<(u64, u64)>,
    unread: VecDeque<(u64, u64)>,
}

impl ReceiptBook {
    /// Everything up to `seq` is delivered (and read, with `read`): counts
    /// what that newly covers and times it from each message's intended
    /// send.
    fn cover(&mut self, seq: u64, read: bool, now_ns: u64, stats: &mut crate::worker::Stats) {
        while let Some(&(s, intended)) = self.undelivered.front() {
            if s > seq {
                break;
            }
            self.undelivered.pop_front();
            stats.counters.receipts_covered += 1;
            stats.receipt(false, now_ns.saturating_sub(intended));
        }
        if read {
            self.read_known = self.read_known.max(seq);
            while let Some(&(s, intended)) = self.unread.front() {
                if s > seq {
                    break;
                }
                self.unread.pop_front();
                stats.receipt(true, now_ns.saturating_sub(intended));
            }
        }
    }
}

/// A send waiting for its SENT.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pending {
    pub msg: u64,
    pub conv: u32,
    pub intended_ns: u64,
    /// How often it was written to a socket.
    pub transmissions: u32,
    /// Retryable errors so far (for the backoff).
    pub failures: u32,
    /// When it was last written to a socket (`None`: not yet).
    pub transmitted_at: Option<Instant>,
}

/// Where a session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionPhase {
    /// No session.
    Down,
    /// Upgraded; the server's `Welcome` has not come yet.
    AwaitWelcome,
    /// `Sync` sent, pages arriving.
    CatchingUp,
    /// Catch-up complete: live traffic flows.
    Ready,
    /// loadgen closed the session on purpose (churn) and waits for the
    /// server's close; nothing more is written.
    Closing,
}

impl Conn {
    pub fn new(user: u32, local: usize, token: String) -> Self {
        let st = ConnState {
            session: 0,
            phase: SessionPhase::Down,
            out: Vec::new(),
            wake: Rc::new(Signal::default()),
            pending: BTreeMap::new(),
            book: DeviceBook::new(),
            dirty: Vec::new(),
            last_write: Instant::now(),
            heartbeat: DEFAULT_HEARTBEAT,
            closing: false,
            churning: false,
            read_dirty: Vec::new(),
            ever_connected: false,
            ever_ready: false,
            catchup_base: Vec::new(),
            catchup_since: None,
            dropped_at: None,
            page_max: Vec::new(),
            receipts: FxHashMap::default(),
        };
        Self {
            user,
            local,
            token,
            st: RefCell::new(st),
        }
    }

    /// Wakes the live session's writer. Call with `st` not borrowed.
    pub fn notify(&self) {
        let wake = self.st.borrow().wake.clone();
        wake.notify();
    }
}

/// Keeps `c` connected from `delay` after start until the run ends.
pub(crate) async fn run(w: Rc<Worker>, c: Rc<Conn>, delay: Duration) {
    monoio::time::sleep(delay).await;
    let mut failures: u32 = 0;
    while !w.finishing() {
        match connect(&w, &c).await {
            Ok((stream, leftover)) => {
                failures = 0;
                {
                    let mut st = c.st.borrow_mut();
                    let mut stats = w.stats.borrow_mut();
                    stats.counters.connects += 1;
                    if st.ever_connected {
                        stats.counters.reconnects += 1;
                    }
                    st.ever_connected = true;
                }
                let end = session(&w, &c, stream, leftover).await;
                if w.finishing() || c.st.borrow().closing {
                    break;
                }
                if std::mem::take(&mut c.st.borrow_mut().churning) {
                    // Closed on purpose: back after a short jittered pause.
                    monoio::time::sleep(w.jitter(CHURN_PAUSE)).await;
                    continue;
                }
                {
                    let mut stats = w.stats.borrow_mut();
                    stats.counters.disconnects += 1;
                    stats.error(&end.kind());
                    // The first drop of a streak: failed attempts after it
                    // count toward the same outage.
                    c.st.borrow_mut()
                        .dropped_at
                        .get_or_insert_with(Instant::now);
                }
                if !w.config.reconnect {
                    break;
                }
                if let SessionEnd::Closed(_, Some(hint)) = end {
                    // A draining server asked for this pause; honour it.
                    monoio::time::sleep(hint).await;
                }
            }
            Err(e) => {
                w.stats.borrow_mut().error(&e.kind());
                failures = failures.saturating_add(1);
                // Without reconnects a connection still gets the whole setup
                // phase to come up once.
                let settled = c.st.borrow().ever_connected || w.control.phase() > Phase::Connect;
                if !w.config.reconnect && settled {
                    break;
                }
            }
        }
        // Exponential backoff from 100 ms to 3 s, with jitter so a restarted
        // server is not hit by every connection in the same millisecond.
        let base = Duration::from_millis(100)
            .saturating_mul(1 << failures.min(5))
            .min(Duration::from_secs(3));
        monoio::time::sleep(w.jitter(base)).await;
    }
}

/// Why a connection attempt failed.
#[derive(Debug)]
enum ConnectError {
    Io(io::ErrorKind),
    Timeout,
    Eof,
    Handshake(HandshakeError),
}

impl ConnectError {
    fn kind(&self) -> String {
        match self {
            Self::Io(k) => format!("connect.{}", io_kind(*k)),
            Self::Timeout => "connect.timeout".into(),
            Self::Eof => "connect.closed_during_upgrade".into(),
            Self::Handshake(h) => h.kind(),
        }
    }
}

/// Opens a TCP connection and upgrades it. Returns the stream and any bytes
/// that followed the response head (the first WebSocket frames).
async fn connect(w: &Worker, c: &Conn) -> Result<(TcpStream, Vec<u8>), ConnectError> {
    let attempt = async {
        let mut stream = match w.source_addr(c.user) {
            None => TcpStream::connect_addr(w.config.target.addr).await,
            Some(src) => connect_from(src, w.config.target.addr).await,
        }
        .map_err(|e| ConnectError::Io(e.kind()))?;
        // Small frames must not wait for Nagle; failure only costs latency.
        let _ = stream.set_nodelay(true);
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&w.random().to_le_bytes());
        nonce[8..].copy_from_slice(&w.random().to_le_bytes());
        let key = handshake::client_key(nonce);
        let request = handshake::request(&w.config.target, &c.token, w.config.token_in, &key);
        let (res, _) = stream.write_all(request).await;
        res.map_err(|e| ConnectError::Io(e.kind()))?;
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        loop {
            if buf.len() == buf.capacity() {
                buf.reserve(1024);
            }
            let len = buf.len();
            let (res, slice) = stream.read(buf.slice_mut(len..)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => return Err(ConnectError::Eof),
                Ok(_) => {}
                Err(e) => return Err(ConnectError::Io(e.kind())),
            }
            if let Some(head) =
                handshake::check_response(&buf, &key).map_err(ConnectError::Handshake)?
            {
                return Ok((stream, buf.split_off(head)));
            }
        }
    };
    monoio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
        .await
        .map_err(|_| ConnectError::Timeout)?
}

/// Connects to `dst` from `src` (port chosen by the kernel at bind time):
/// monoio connects only from the kernel's choice of address, so the socket
/// is made, bound and connected without blocking here, then handed over.
pub(crate) async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(src.into(), 0).into())?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable(false).await?;
    if stream.peer_addr().is_err() {
        // The connect failed; a read returns the socket's pending error
        // (refused, timed out), which is what the caller counts.
        let (res, _) = stream.read(vec![0u8; 1]).await;
        res?;
        return Err(io::ErrorKind::NotConnected.into());
    }
    Ok(stream)
}

/// The delay a close reason asks for before reconnecting: the gateway's
/// drain says `server draining; reconnect after <ms> ms`
/// (docs/protocol.md, close codes).
fn reconnect_hint(reason: &str) -> Option<Duration> {
    let (_, rest) = reason.split_once("reconnect after ")?;
    let ms: u64 = rest.strip_suffix(" ms")?.parse().ok()?;
    Some(Duration::from_millis(ms.min(60_000)))
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    Eof,
    Io(io::ErrorKind),
    Ws(WsError),
    /// The server's close: its code, and the reconnect delay its reason
    /// asked for (a drain's `reconnect after <ms> ms`).
    Closed(Option<u16>, Option<Duration>),
}

impl SessionEnd {
    fn kind(&self) -> String {
        match self {
            Self::Eof => "session.eof".into(),
            Self::Io(k) => format!("session.{}", io_kind(*k)),
            Self::Ws(WsError::Protocol(_)) => "ws.protocol_error".into(),
            Self::Ws(WsError::TooBig) => "ws.too_big".into(),
            Self::Ws(WsError::InvalidUtf8) => "ws.invalid_utf8".into(),
            Self::Closed(Some(code), _) => format!("close.{code}"),
            Self::Closed(None, _) => "close.no_code".into(),
        }
    }
}

fn io_kind(k: io::ErrorKind) -> String {
    match k {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::ConnectionAborted => "aborted".into(),
        io::ErrorKind::BrokenPipe => "broken_pipe".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        io::ErrorKind::AddrNotAvailable => "addr_not_available".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Runs one session until the connection ends.
async fn session(w: &Rc<Worker>, c: &Rc<Conn>, stream: TcpStream, leftover: Vec<u8>) -> SessionEnd {
    let id = w.new_session();
    let wake = Rc::new(Signal::default());
    {
        let mut st = c.st.borrow_mut();
        st.session = id;
        st.phase = SessionPhase::AwaitWelcome;
        st.wake = wake.clone();
        st.out.clear();
        st.dirty.clear();
        st.last_write = Instant::now();
        st.heartbeat = DEFAULT_HEARTBEAT;
    }
    let (mut rd, wr) = stream.into_split();
    monoio::spawn(writer(c.clone(), wr, id, wake));
    let mut decoder = Decoder::new(Role::Client, LIMITS);
    let mut buf = Vec::with_capacity(READ_BUF.max(leftover.len() + MIN_READ));
    buf.extend_from_slice(&leftover);
    let end = loop {
        if let Some(end) = handle_input(w, c, &mut decoder, &mut buf) {
            break end;
        }
        flush_receipts(w, c);
        if !c.st.borrow().out.is_empty() {
            c.notify();
        }
        // Keep the buffer small between frames; grow it only for a frame
        // in flight that needs more room.
        if buf.is_empty() && buf.capacity() > READ_BUF {
            buf = Vec::with_capacity(READ_BUF);
        } else if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(READ_BUF);
        }
        let len = buf.len();
        let (res, slice) = rd.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => break SessionEnd::Eof,
            Ok(_) => {}
            Err(e) => break SessionEnd::Io(e.kind()),
        }
    };
    {
        let mut st = c.st.borrow_mut();
        if st.phase == SessionPhase::Ready {
            let mut stats = w.stats.borrow_mut();
            stats.counters.connections_up = stats.counters.connections_up.saturating_sub(1);
        }
        st.phase = SessionPhase::Down;
        st.session = 0;
    }
    // The writer flushes what is left (a close reply) and exits.
    c.notify();
    end
}

/// Writes `out` to the socket whenever it fills, for session `id`.
async fn writer(c: Rc<Conn>, mut wr: OwnedWriteHalf<TcpStream>, id: u64, wake: Rc<Signal>) {
    let mut spare: Vec<u8> = Vec::new();
    loop {
        let next = {
            let mut st = c.st.borrow_mut();
            if st.session != id && st.session != 0 {
                // A newer session owns the output now.
                return;
            }
            if st.out.is_empty() {
                if st.session != id {
                    return;
                }
                None
            } else {
                Some(std::mem::replace(&mut st.out, std::mem::take(&mut spare)))
            }
        };
        match next {
            None => wake.wait().await,
            Some(buf) => {
                let (res, mut buf) = wr.write_all(buf).await;
                if res.is_err() {
                    // The reader sees the broken connection and ends the session.
                    return;
                }
                buf.clear();
                if buf.capacity() <= MAX_SPARE {
                    spare = buf;
                }
            }
        }
    }
}

/// Decodes and handles every complete frame in `buf`, keeping the
/// incomplete tail.
fn handle_input(
    w: &Worker,
    c: &Conn,
    decoder: &mut Decoder,
    buf: &mut Vec<u8>,
) -> Option<SessionEnd> {
    let mut at = 0;
    let mut end = None;
    while end.is_none() {
        match decoder.decode(&buf[at..]) {
            Ok(None) => break,
            Ok(Some((event, used))) => {
                at += used;
                if let Some(event) = event {
                    end = handle_event(w, c, event);
                }
            }
            Err(e) => end = Some(SessionEnd::Ws(e)),
        }
    }
    buf.drain(..at);
    end
}

fn handle_event(w: &Worker, c: &Conn, event: Event) -> Option<SessionEnd> {
    match event {
        Event::Binary(payload) => match ServerFrame::decode(&payload) {
            Ok(frame) => handle_frame(w, c, frame),
            Err(_) => w.stats.borrow_mut().error("frame.undecodable"),
        },
        Event::Text(_) => w.stats.borrow_mut().error("frame.text"),
        Event::Ping(data) => {
            let mut st = c.st.borrow_mut();
            w.push_control(&mut st.out, Opcode::Pong, &data);
        }
        Event::Pong(_) => {}
        Event::Close(code) => {
            let mut st = c.st.borrow_mut();
            if !st.closing && !st.churning {
                // Answer the server's close with its code.
                let payload = code
                    .as_ref()
                    .map(|(code, _)| code.to_be_bytes().to_vec())
                    .unwrap_or_default();
                w.push_control(&mut st.out, Opcode::Close, &payload);
            }
            let hint = code.as_ref().and_then(|(_, reason)| reconnect_hint(reason));
            return Some(SessionEnd::Closed(code.map(|(code, _)| code), hint));
        }
    }
    None
}

fn handle_frame(w: &Worker, c: &Conn, frame: ServerFrame) {
    match frame {
        ServerFrame::Welcome {
            max_body,
            idle_timeout_s,
            ..
        } => on_welcome(w, c, max_body, idle_timeout_s),
        ServerFrame::SyncDone { more } => on_sync_done(w, c, more),
        ServerFrame::Sent {
            client_id,
            conversation,
            seq,
            ..
        } => on_sent(w, c, client_id, &conversation, seq),
        ServerFrame::Message {
            conversation,
            seq,
            kind,
            sender,
            sender_device,
            client_id,
            body,
            ..
        } => {
            let entry = Entry {
                conversation,
                seq,
                sender,
                sender_device,
                client_id,
                body,
            };
            match kind {
                EntryKind::Message => on_message(w, c, entry),
                EntryKind::MembersAdded | EntryKind::MembersRemoved => on_membership(w, c, entry),
            }
        }
        ServerFrame::GroupCreated {
            request,
            conversation,
            seq,
        } => on_group_created(w, c, request, &conversation, seq),
        ServerFrame::Error {
            code, reference, ..
        } => on_error(w, c, code, reference),
        ServerFrame::Receipt {
            conversation,
            seq,
            kind,
            ..
        } => on_receipt(w, c, &conversation, seq, kind),
        ServerFrame::SyncSummary { conversations } => on_summary(w, c, &conversations),
        ServerFrame::Typing { .. } => w.stats.borrow_mut().counters.typing_received += 1,
        ServerFrame::Pong { .. }
        | ServerFrame::Members { .. }
        | ServerFrame::Done { .. }
        | ServerFrame::History { .. }
        | ServerFrame::Chats { .. }
        | ServerFrame::ReceiptSummary { .. }
        | ServerFrame::Presence { .. }
        | ServerFrame::Settings { .. }
        | ServerFrame::Devices { .. } => {}
    }
}

/// Closes the session with 1000 and `reason` so that it reconnects at once
/// and catches up, counting no error (churn, a refused catch-up).
pub(crate) fn close_to_reconnect(w: &Worker, st: &mut ConnState, reason: &[u8]) {
    st.phase = SessionPhase::Closing;
    st.churning = true;
    let mut payload = courier_protocol::close::NORMAL.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    w.push_control(&mut st.out, Opcode::Close, &payload);
}

/// A direct conversation's other participant moved its cursor: checks it
/// moved (each state change is told once) and times what it covers.
fn on_receipt(w: &Worker, c: &Conn, conversation: &str, seq: u64, kind: ReceiptKind) {
    let Some(conv) = w.convs.borrow().number(conversation) else {
        w.stats.borrow_mut().error("receipt.unknown_conversation");
        return;
    };
    let now_ns = w.now_ns();
    let mut st = c.st.borrow_mut();
    let mut stats = w.stats.borrow_mut();
    stats.counters.receipts_received += 1;
    let book = st.receipts.entry(conv).or_default();
    let read = kind == ReceiptKind::Read;
    let live = if read {
        &mut book.live_read
    } else {
        &mut book.live_delivered
    };
    if seq <= *live {
        stats.counters.receipt_duplicates += 1;
        return;
    }
    *live = seq;
    book.cover(seq, read, now_ns, &mut stats);
}

/// A catch-up summary: receipts made while this device was away.
fn on_summary(w: &Worker, c: &Conn, rows: &[ConversationSummary]) {
    let now_ns = w.now_ns();
    let convs = w.convs.borrow();
    let mut st = c.st.borrow_mut();
    let mut stats = w.stats.borrow_mut();
    for row in rows {
        let Some(conv) = convs.number(&row.conversation) else {
            continue;
        };
        if let Some(book) = st.receipts.get_mut(&conv) {
            book.cover(row.peer_delivered, false, now_ns, &mut stats);
            book.cover(row.peer_read, true, now_ns, &mut stats);
        }
    }
}

/// Catches up: from nothing on the first session, from what the device
/// holds on a reconnect.
fn on_welcome(w: &Worker, c: &Conn, max_body: u32, idle_timeout_s: u32) {
    let mut guard = c.st.borrow_mut();
    let st = &mut *guard;
    if st.phase != SessionPhase::AwaitWelcome {
        w.stats.borrow_mut().error("protocol.unexpected_welcome");
        return;
    }
    if idle_timeout_s > 0 {
        st.heartbeat = DEFAULT_HEARTBEAT.min(Duration::from_secs(u64::from(idle_timeout_s)) / 2);
    }
    if max_body < w.plan.body_sizes().max {
        w.stats.borrow_mut().error("welcome.body_over_node_limit");
    }
    let mut cursors = Vec::new();
    st.catchup_base.clear();
    st.page_max.clear();
    if st.ever_ready {
        let convs = w.convs.borrow();
        for &conv in w.plan.user_conversations(c.user) {
            let Some(id) = convs.id(conv) else { continue };
            let seq = st.book.cursor(conv);
            st.catchup_base.push((conv, seq));
            cursors.push(Cursor {
                conversation: id.to_string(),
                seq,
            });
        }
    }
    st.phase = SessionPhase::CatchingUp;
    st.catchup_since = Some(Instant::now());
    w.push_frame(
        &mut st.out,
        &ClientFrame::Sync {
            tail: 0,
            // After a reconnect, learn the receipts made while away.
            summary: st.ever_ready,
            cursors,
        },
    );
    st.last_write = Instant::now();
}

fn on_sync_done(w: &Worker, c: &Conn, more: bool) {
    let mut guard = c.st.borrow_mut();
    let st = &mut *guard;
    if st.phase != SessionPhase::CatchingUp {
        w.stats.borrow_mut().error("protocol.unexpected_sync_done");
        return;
    }
    if more {
        // The next page starts after what this catch-up delivered so far,
        // even past a hole (the device's own send whose SENT is not back).
        let convs = w.convs.borrow();
        let mut cursors = Vec::new();
        for &conv in w.plan.user_conversations(c.user) {
            let Some(id) = convs.id(conv) else { continue };
            let seen = st
                .page_max
                .iter()
                .find(|(c, _)| *c == conv)
                .map_or(0, |p| p.1);
            cursors.push(Cursor {
                conversation: id.to_string(),
                seq: st.book.cursor(conv).max(seen),
            });
        }
        w.push_frame(
            &mut st.out,
            &ClientFrame::Sync {
                tail: 0,
                summary: false,
                cursors,
            },
        );
        st.last_write = Instant::now();
        return;
    }
    st.phase = SessionPhase::Ready;
    st.ever_ready = true;
    st.catchup_base.clear();
    st.page_max.clear();
    let mut stats = w.stats.borrow_mut();
    stats.counters.connections_up += 1;
    if let Some(dropped) = st.dropped_at.take() {
        stats.reconnect(dropped.elapsed().as_nanos() as u64);
    }
    drop(stats);
    // Resend everything not acked, oldest first, with its original client id.
    let ids: Vec<u64> = st.pending.keys().copied().collect();
    for id in ids {
        w.transmit(st, c.user, id);
    }
    drop(guard);
    w.create_groups(c);
}

fn on_sent(w: &Worker, c: &Conn, client_id: u64, conversation: &str, seq: u64) {
    let now_ns = w.now_ns();
    let mut st = c.st.borrow_mut();
    let mut stats = w.stats.borrow_mut();
    let scheduled = client_id
        .checked_sub(1)
        .filter(|&msg| msg < w.plan.total_messages())
        .map(|msg| w.plan.message(msg))
        .filter(|m| m.sender == c.user);
    let Some(m) = scheduled else {
        stats.counters.invalid += 1;
        stats.error("sent.unknown_client_id");
        return;
    };
    if w.convs.borrow().number(conversation) != Some(m.conv) {
        stats.counters.invalid += 1;
        stats.error("sent.wrong_conversation");
        return;
    }
    match st.pending.remove(&client_id) {
        Some(p) => {
            stats.counters.acked += 1;
            stats.counters.pending = stats.counters.pending.saturating_sub(1);
            stats.counters.expected += u64::from(w.plan.recipients(m.conv));
            stats.sent_ack(now_ns.saturating_sub(p.intended_ns));
            if conversation.starts_with("d:") {
                // A direct message: its sender is told when it is delivered.
                stats.counters.receipts_expected += 1;
                let book = st.receipts.entry(m.conv).or_default();
                book.undelivered.push_back((seq, p.intended_ns));
                book.unread.push_back((seq, p.intended_ns));
            }
        }
        None => stats.counters.repeated_acks += 1,
    }
    stats.tally.acks.push(Ack {
        conv: m.conv,
        seq,
        msg: m.msg,
        sender: c.user,
    });
    st.book.handle_own(m.conv, seq);
}

/// A sequenced entry as received.
struct Entry {
    conversation: String,
    seq: u64,
    sender: String,
    sender_device: u32,
    client_id: u64,
    body: Bytes,
}

fn on_message(w: &Worker, c: &Conn, e: Entry) {
    let now_ns = w.now_ns();
    let conv = w.convs.borrow().number(&e.conversation);
    let verdict = validate(w, c.user, conv, &e);
    let mut guard = c.st.borrow_mut();
    let st = &mut *guard;
    let mut stats = w.stats.borrow_mut();
    let (conv, stamp) = match verdict {
        Ok(v) => v,
        Err(kind) => {
            stats.counters.invalid += 1;
            stats.error(kind);
            return;
        }
    };
    if stamp.sender == c.user {
        st.book.handle_own(conv, e.seq);
        stats.counters.own_echoes += 1;
        return;
    }
    let from = catchup_from(st, conv, e.seq);
    let arrival = st.book.handle_entry(conv, e.seq, Some(stamp.msg), from);
    if matches!(arrival, Arrival::Delivered | Arrival::Reordered)
        && w.plan.reads(c.user, stamp.msg)
        && !st.read_dirty.contains(&conv)
    {
        st.read_dirty.push(conv);
    }
    match arrival {
        Arrival::Delivered => {
            stats.counters.delivered += 1;
            stats.end_to_end(now_ns.saturating_sub(stamp.intended_ns));
        }
        Arrival::Reordered => {
            stats.counters.delivered += 1;
            stats.counters.reordered += 1;
            stats.end_to_end(now_ns.saturating_sub(stamp.intended_ns));
        }
        Arrival::Duplicate => stats.counters.duplicates += 1,
        Arrival::Redelivered => stats.counters.redelivered += 1,
    }
    if !st.dirty.contains(&conv) {
        st.dirty.push(conv);
    }
}

/// Checks that a message is one the schedule has its sender send to this
/// conversation, with the body it sent; names what is wrong otherwise.
fn validate(
    w: &Worker,
    me: u32,
    conv: Option<u32>,
    e: &Entry,
) -> Result<(u32, Stamp), &'static str> {
    let conv = conv.ok_or("invalid.unknown_conversation")?;
    let stamp = body::decode(&e.body).map_err(|_| "invalid.body")?;
    if stamp.run_id != w.plan.run_id {
        return Err("invalid.other_run");
    }
    if w.plan.parse_user(&e.sender) != Some(stamp.sender) || e.sender_device != 1 {
        return Err("invalid.sender");
    }
    if e.client_id != stamp.msg.wrapping_add(1) {
        return Err("invalid.client_id");
    }
    if stamp.msg >= w.plan.total_messages() {
        return Err("invalid.not_scheduled");
    }
    if e.body.len() != w.plan.body_len(stamp.msg) {
        return Err("invalid.body_length");
    }
    let m = w.plan.message(stamp.msg);
    if m.sender != stamp.sender || m.conv != conv || m.intended_ns != stamp.intended_ns {
        return Err("invalid.not_scheduled");
    }
    if !w.plan.is_member(conv, me) {
        return Err("invalid.not_a_member");
    }
    Ok((conv, stamp))
}

/// A membership entry: for a group this device has not heard of, its
/// member set says which of the plan's groups it is.
fn on_membership(w: &Worker, c: &Conn, e: Entry) {
    let mut stats = w.stats.borrow_mut();
    let conv = match learn_group(w, &e) {
        Ok(conv) => conv,
        Err(kind) => {
            stats.counters.invalid += 1;
            stats.error(kind);
            return;
        }
    };
    if !w.plan.is_member(conv, c.user) {
        stats.counters.invalid += 1;
        stats.error("invalid.not_a_member");
        return;
    }
    if let Some(id) = w.convs.borrow().id(conv) {
        stats
            .tally
            .group_ids
            .entry(conv)
            .or_insert_with(|| id.to_string());
    }
    stats.counters.membership_entries += 1;
    stats.tally.membership.push((conv, e.seq));
    let mut guard = c.st.borrow_mut();
    let st = &mut *guard;
    let from = catchup_from(st, conv, e.seq);
    match st.book.handle_entry(conv, e.seq, None, from) {
        Arrival::Delivered => {}
        Arrival::Reordered => stats.counters.reordered += 1,
        Arrival::Duplicate => stats.counters.duplicates += 1,
        Arrival::Redelivered => stats.counters.redelivered += 1,
    }
    if !st.dirty.contains(&conv) {
        st.dirty.push(conv);
    }
}

fn learn_group(w: &Worker, e: &Entry) -> Result<u32, &'static str> {
    if let Some(conv) = w.convs.borrow().number(&e.conversation) {
        return Ok(conv);
    }
    let names = frame::decode_members(&e.body).map_err(|_| "invalid.membership_body")?;
    let mut members = Vec::with_capacity(names.len() + 1);
    for name in names.iter().chain(std::iter::once(&e.sender)) {
        members.push(w.plan.parse_user(name).ok_or("invalid.membership_member")?);
    }
    members.sort_unstable();
    members.dedup();
    let mut convs = w.convs.borrow_mut();
    let g = convs
        .group_of_members(&members)
        .ok_or("invalid.unknown_group")?;
    let conv = w.plan.group_conv(g);
    if !convs.learn(&w.plan, conv, &e.conversation) {
        return Err("invalid.group_id_conflict");
    }
    Ok(conv)
}

fn on_group_created(w: &Worker, c: &Conn, request: u32, conversation: &str, seq: u64) {
    let mut stats = w.stats.borrow_mut();
    let group = request
        .checked_sub(REQUEST_BASE)
        .filter(|&g| g < w.plan.groups());
    let Some(g) = group.filter(|&g| w.plan.group_members(g).first() == Some(&c.user)) else {
        stats.error("group_create.unknown_request");
        return;
    };
    let conv = w.plan.group_conv(g);
    if !w.convs.borrow_mut().learn(&w.plan, conv, conversation) {
        stats.error("group_create.id_conflict");
        return;
    }
    stats.counters.groups_created += 1;
    stats.tally.group_ids.insert(conv, conversation.to_owned());
    stats.tally.membership.push((conv, seq));
    c.st.borrow_mut().book.handle_own(conv, seq);
}

fn on_error(w: &Worker, c: &Conn, code: u16, reference: u64) {
    let kind = ErrorCode::from_u16(code).map_or_else(
        || format!("error.{code}"),
        |e| format!("error.{}", e.name()),
    );
    w.stats.borrow_mut().error(&kind);
    // 429: over the send rate; 503/504: not stored, node busy. All three
    // are retried with the same client id; anything else is final.
    let retryable = matches!(code, 429 | 503 | 504);
    let mut st = c.st.borrow_mut();
    if reference == 0 && retryable && st.phase == SessionPhase::CatchingUp && !st.closing {
        // The catch-up itself was refused (the store is unavailable): start
        // the session again, as a client would, after the usual pause.
        close_to_reconnect(w, &mut st, b"retry catch-up");
        drop(st);
        c.notify();
        return;
    }
    if let Some(p) = st.pending.get_mut(&reference) {
        if retryable {
            p.failures += 1;
            let after = w.jitter(retry_backoff(p.failures));
            w.retry_later(Retry::Send(c.local, reference), after);
        } else {
            st.pending.remove(&reference);
            let mut stats = w.stats.borrow_mut();
            stats.counters.send_failed += 1;
            stats.counters.pending = stats.counters.pending.saturating_sub(1);
        }
        return;
    }
    drop(st);
    let group = reference
        .checked_sub(u64::from(REQUEST_BASE))
        .and_then(|g| u32::try_from(g).ok());
    if let Some(g) = group.filter(|&g| w.group_outstanding(g)) {
        if retryable {
            w.retry_later(Retry::Group(g), w.jitter(retry_backoff(1)));
        }
    }
}

fn retry_backoff(failures: u32) -> Duration {
    Duration::from_millis(50)
        .saturating_mul(1 << failures.min(6))
        .min(Duration::from_secs(2))
}

/// While catching up: the cursor the catch-up started from for `conv`
/// (0 when it was not named), after noting `seq` as seen.
fn catchup_from(st: &mut ConnState, conv: u32, seq: u64) -> Option<u64> {
    if st.phase != SessionPhase::CatchingUp {
        return None;
    }
    match st.page_max.iter_mut().find(|(c, _)| *c == conv) {
        Some(p) => p.1 = p.1.max(seq),
        None => st.page_max.push((conv, seq)),
    }
    Some(
        st.catchup_base
            .iter()
            .find(|(c, _)| *c == conv)
            .map_or(0, |b| b.1),
    )
}

/// Acknowledges, per conversation with new arrivals, everything held so
/// far: `Read` where the user reads one of the new arrivals (it counts as
/// delivered too), `Delivered` otherwise.
fn flush_receipts(w: &Worker, c: &Conn) {
    let mut guard = c.st.borrow_mut();
    let st = &mut *guard;
    if st.dirty.is_empty() || matches!(st.phase, SessionPhase::Down | SessionPhase::Closing) {
        return;
    }
    let convs = w.convs.borrow();
    let mut reads = 0;
    for conv in std::mem::take(&mut st.dirty) {
        let read = match st.read_dirty.iter().position(|&r| r == conv) {
            Some(i) => {
                st.read_dirty.swap_remove(i);
                true
            }
            None => false,
        };
        let cursor = st.book.cursor(conv);
        let ledger = st.book.ledger(conv);
        let read = read && cursor > ledger.read_upto;
        if !read && cursor <= ledger.acked_upto {
            continue;
        }
        ledger.acked_upto = ledger.acked_upto.max(cursor);
        if read {
            ledger.read_upto = cursor;
            reads += 1;
        }
        let Some(id) = convs.id(conv) else { continue };
        let conversation = id.to_string();
        let frame = if read {
            ClientFrame::Read {
                conversation,
                seq: cursor,
            }
        } else {
            ClientFrame::Delivered {
                conversation,
                seq: cursor,
            }
        };
        w.push_frame(&mut st.out, &frame);
        st.last_write = Instant::now();
    }
    if reads > 0 {
        w.stats.borrow_mut().counters.reads_sent += reads;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_close_reason_gives_its_reconnect_delay() {
        assert_eq!(
            reconnect_hint("server draining; reconnect after 734 ms"),
            Some(Duration::from_millis(734))
        );
        assert_eq!(
            reconnect_hint("server draining; reconnect after 0 ms"),
            Some(Duration::ZERO)
        );
        for other in [
            "",
            "replaced by a newer session",
            "outbound queue full; reconnect and catch up",
            "server draining; reconnect after soon ms",
            "server draining; reconnect after 5",
        ] {
            assert_eq!(reconnect_hint(other), None, "{other:?}");
        }
        assert_eq!(
            reconnect_hint("reconnect after 99999999 ms"),
            Some(Duration::from_secs(60)),
            "capped"
        );
    }
}
