//! A `loadgen peer` worker: one monoio runtime that holds its share of the
//! connections, speaks each one's protocol through its [`Session`], and
//! counts what happens in a [`Tally`].
//!
//! Connection `u` of `N` lives in worker process `u % P` and connects at
//! `u / ramp` seconds from `source_addrs[u % len]`, as in a normal run; the
//! publisher is connection `N` and lives in process 0. Roles: connections
//! `0 .. subscribers` join the fan-out, the rest stay idle, all keep alive.
//!
//! ```text
//!  Connect:  open every connection (TCP, upgrade, login), keep alive
//!  Groups:   subscribers subscribe; the publisher connects and joins
//!  Traffic:  the publisher publishes (paced or window-bound)
//!  Finish:   hand over the tally, exit (the sockets close with the process)
//! ```

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use serde::{Deserialize, Serialize};

use courier_protocol::token::{self, Secret};
use courier_protocol::ws::{self, Decoder, Event, Limits, Opcode, Role as WsRole};

use super::courier::Courier;
use super::mqtt::Mqtt;
use super::nats::Nats;
use super::session::{payload, Note, Out, Session};
use super::xmpp::Xmpp;
use super::{Job, Protocol};
use crate::conn::connect_from;
use crate::control::{Control, Phase};
use crate::handshake::{self, Target};
use crate::procs::unix_ns;
use crate::rng::SplitMix64;
use crate::worker::Signal;

/// Connect plus upgrade must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked for per read.
const READ_BUF: usize = 4 * 1024;
/// Largest WebSocket frame or message accepted.
const LIMITS: Limits = Limits {
    max_frame: 1 << 20,
    max_message: 1 << 20,
};
/// Largest fan-out index tracked per subscriber (16M messages).
const MAX_INDEX: u64 = 1 << 24;
/// How often progress goes to the parent.
const PROGRESS: Duration = Duration::from_millis(250);

/// What a worker counts; merges by addition (times by min and max).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Connections up now (logged in), the publisher not counted.
    pub up: u64,
    /// Logins that succeeded, reconnects included.
    pub logins: u64,
    /// Sessions that ended before the run did.
    pub disconnects: u64,
    /// Subscribers whose subscription is in place now.
    pub subscribed: u64,
    /// 1 once the publisher is logged in and joined.
    pub publisher_ready: u64,
    /// Messages the publisher published.
    pub published: u64,
    /// Acknowledgements the publisher expects for them, and got.
    pub acks_expected: u64,
    /// See `acks_expected`.
    pub acked: u64,
    /// 1 once the publisher is done publishing.
    pub publishing_done: u64,
    /// Distinct (subscriber, message) deliveries, and repeats.
    pub delivered: u64,
    /// See `delivered`.
    pub duplicates: u64,
    /// Wall-clock bounds (Unix ns; 0: none yet).
    pub first_publish_ns: u64,
    /// See `first_publish_ns`.
    pub last_publish_ns: u64,
    /// See `first_publish_ns`.
    pub first_delivery_ns: u64,
    /// See `first_publish_ns`.
    pub last_delivery_ns: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
}

impl Tally {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Self) {
        self.up += other.up;
        self.logins += other.logins;
        self.disconnects += other.disconnects;
        self.subscribed += other.subscribed;
        self.publisher_ready += other.publisher_ready;
        self.published += other.published;
        self.acks_expected += other.acks_expected;
        self.acked += other.acked;
        self.publishing_done += other.publishing_done;
        self.delivered += other.delivered;
        self.duplicates += other.duplicates;
        let min = |a: u64, b: u64| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        self.first_publish_ns = min(self.first_publish_ns, other.first_publish_ns);
        self.first_delivery_ns = min(self.first_delivery_ns, other.first_delivery_ns);
        self.last_publish_ns = self.last_publish_ns.max(other.last_publish_ns);
        self.last_delivery_ns = self.last_delivery_ns.max(other.last_delivery_ns);
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
    }
}

/// What a connection does besides keeping alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Idle,
    Subscriber,
    Publisher,
}

/// One connection. Created by its worker at start, dropped at the end.
struct PeerConn {
    index: u32,
    role: Role,
    token: String,
    st: RefCell<ConnState>,
}

/// The changing part of a [`PeerConn`]; never borrowed across an await.
struct ConnState {
    /// The live session's protocol state (None while down).
    session: Option<Box<dyn Session>>,
    /// Wire bytes waiting for the writer.
    out: Vec<u8>,
    /// Wakes the live session's writer; replaced per session.
    wake: Rc<Signal>,
    /// Session number (0: none), so an old writer stops.
    id: u64,
    up: bool,
    subscribed: bool,
    last_write: Instant,
    /// Fan-out indices received (one bit each), across sessions.
    seen: Vec<u64>,
}

/// A worker's state, on its runtime thread.
struct Worker {
    job: Arc<Job>,
    target: Target,
    control: Arc<Control>,
    conns: Vec<Rc<PeerConn>>,
    publisher: Option<Rc<PeerConn>>,
    tally: RefCell<Tally>,
    rng: RefCell<SplitMix64>,
    next_id: Cell<u64>,
    /// Publisher: acknowledgements outstanding, and its wake-up.
    inflight: Cell<u64>,
    acked: Signal,
}

/// Runs worker process `process` of `processes` for `job` until `control`
/// says finish; returns its tally.
pub(crate) fn run(
    job: Arc<Job>,
    process: u32,
    processes: u32,
    control: Arc<Control>,
) -> Result<Tally, String> {
    let target = job.target()?;
    let secret = match job.protocol {
        Protocol::Courier => Some(
            std::fs::read(job.data_dir.join("jwt.secret"))
                .map(Secret::new)
                .map_err(|e| format!("{}: {e}", job.data_dir.join("jwt.secret").display()))?,
        ),
        _ => None,
    };
    let now_s = unix_ns() / 1_000_000_000;
    let names = job.clone();
    let mint = move |u: u32| {
        secret.as_ref().map_or_else(String::new, |s| {
            let claims = token::claims_for(&names.user_name(u), 1, now_s, 7 * 24 * 3600);
            token::mint(s, &claims)
        })
    };
    let conn = |index: u32, role: Role| {
        Rc::new(PeerConn {
            index,
            role,
            token: mint(index),
            st: RefCell::new(ConnState {
                session: None,
                out: Vec::new(),
                wake: Rc::new(Signal::default()),
                id: 0,
                up: false,
                subscribed: false,
                last_write: Instant::now(),
                seen: Vec::new(),
            }),
        })
    };
    let legacy = job.legacy;
    let result = crate::worker::block_on(legacy, move |_driver| async move {
        let conns = (process..job.connections)
            .step_by(processes as usize)
            .map(|u| {
                conn(
                    u,
                    if u < job.subscribers {
                        Role::Subscriber
                    } else {
                        Role::Idle
                    },
                )
            })
            .collect();
        let publisher =
            (process == 0 && job.subscribers > 0).then(|| conn(job.connections, Role::Publisher));
        let w = Rc::new(Worker {
            rng: RefCell::new(SplitMix64::new(unix_ns() ^ u64::from(process) << 40)),
            job,
            target,
            control,
            conns,
            publisher,
            tally: RefCell::new(Tally::default()),
            next_id: Cell::new(1),
            inflight: Cell::new(0),
            acked: Signal::default(),
        });
        w.clone().main().await
    });
    result.map_err(|e| format!("could not start the runtime: {e}"))
}

impl Worker {
    async fn main(self: Rc<Self>) -> Tally {
        monoio::spawn(self.clone().ticker());
        for c in &self.conns {
            let delay = Duration::from_secs_f64(f64::from(c.index) / self.job.ramp);
            monoio::spawn(keep_connected(self.clone(), c.clone(), delay));
        }
        self.wait_phase(Phase::Groups).await;
        for c in &self.conns {
            self.join(c);
        }
        if let Some(p) = &self.publisher {
            monoio::spawn(keep_connected(self.clone(), p.clone(), Duration::ZERO));
        }
        self.wait_phase(Phase::Traffic).await;
        if let Some(p) = self.publisher.clone() {
            self.publish(&p).await;
        }
        self.wait_phase(Phase::Finish).await;
        // Say goodbye where the protocol has a word for it; the sockets
        // close when the process exits.
        for c in self.conns.iter().chain(self.publisher.iter()) {
            let mut out = Vec::new();
            if let Some(s) = c.st.borrow_mut().session.as_mut() {
                s.goodbye(&mut out);
            }
            self.send(c, out);
        }
        monoio::time::sleep(Duration::from_millis(200)).await;
        self.tally.borrow().clone()
    }

    async fn wait_phase(&self, phase: Phase) {
        while self.control.phase() < phase {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn finishing(&self) -> bool {
        self.control.phase() == Phase::Finish
    }

    fn source_addr(&self, u: u32) -> Option<Ipv4Addr> {
        let a = &self.job.source_addrs;
        (!a.is_empty()).then(|| a[u as usize % a.len()])
    }

    /// Frames `msgs` for the transport and wakes the writer.
    fn send(&self, c: &PeerConn, msgs: Out) {
        if msgs.is_empty() {
            return;
        }
        let mut st = c.st.borrow_mut();
        let opcode = match self.job.protocol {
            Protocol::Mqtt | Protocol::Nats => None,
            Protocol::XmppWs => Some(Opcode::Text),
            Protocol::NatsWs | Protocol::Courier => Some(Opcode::Binary),
        };
        for m in msgs {
            match opcode {
                None => st.out.extend_from_slice(&m),
                Some(op) => {
                    let mask = (self.rng.borrow_mut().next_u64() as u32).to_ne_bytes();
                    ws::encode_frame(&mut st.out, op, &m, Some(mask));
                }
            }
        }
        st.last_write = Instant::now();
        let wake = st.wake.clone();
        drop(st);
        wake.notify();
    }

    /// Subscribes `c` if its role and the phase say so.
    fn join(&self, c: &PeerConn) {
        if self.control.phase() < Phase::Groups || c.role == Role::Idle {
            return;
        }
        let mut st = c.st.borrow_mut();
        if !st.up || st.subscribed {
            return;
        }
        let needs = match (c.role, self.job.protocol) {
            // NATS and MQTT publishers publish without joining anything.
            (Role::Publisher, Protocol::NatsWs | Protocol::Nats | Protocol::Mqtt) => false,
            _ => true,
        };
        if !needs {
            st.subscribed = true;
            drop(st);
            self.tally.borrow_mut().publisher_ready = 1;
            return;
        }
        let mut out = Vec::new();
        if let Some(s) = st.session.as_mut() {
            s.subscribe(&mut out);
        }
        drop(st);
        self.send(c, out);
    }

    fn note(&self, c: &PeerConn, note: Note) {
        let mut t = self.tally.borrow_mut();
        match note {
            Note::Ready => {
                let mut st = c.st.borrow_mut();
                st.up = true;
                t.logins += 1;
                if c.role != Role::Publisher {
                    t.up += 1;
                }
                drop(st);
                drop(t);
                self.join(c);
            }
            Note::Subscribed => {
                let mut st = c.st.borrow_mut();
                if !st.subscribed {
                    st.subscribed = true;
                    match c.role {
                        Role::Publisher => t.publisher_ready = 1,
                        Role::Subscriber => t.subscribed += 1,
                        Role::Idle => {}
                    }
                }
            }
            Note::Delivery(i) if c.role == Role::Subscriber && i < MAX_INDEX => {
                let now = unix_ns();
                let mut st = c.st.borrow_mut();
                let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
                if st.seen.len() <= word {
                    st.seen.resize(word + 1, 0);
                }
                if st.seen[word] & bit != 0 {
                    t.duplicates += 1;
                } else {
                    st.seen[word] |= bit;
                    t.delivered += 1;
                    if t.first_delivery_ns == 0 {
                        t.first_delivery_ns = now;
                    }
                    t.last_delivery_ns = now;
                }
            }
            Note::Delivery(_) => {}
            Note::Acked(n) if c.role == Role::Publisher => {
                t.acked += n;
                self.inflight.set(self.inflight.get().saturating_sub(n));
                self.acked.notify();
            }
            Note::Acked(_) => t.error("ack.not_publisher"),
            Note::Error(kind) => {
                t.error(&kind);
                if c.role == Role::Publisher {
                    // A refused publish is never acknowledged: free its
                    // place in the window (its deliveries count as lost).
                    self.inflight.set(self.inflight.get().saturating_sub(1));
                    self.acked.notify();
                }
            }
        }
    }

    /// Publishes the fan-out: paced at `rate`, or as fast as the server
    /// acknowledges with at most `window` acknowledgements outstanding.
    async fn publish(&self, p: &PeerConn) {
        let job = &self.job;
        let start = Instant::now();
        let end = start + job.fanout_duration;
        let mut index = 0u64;
        while !self.finishing()
            && Instant::now() < end
            && (job.messages == 0 || index < job.messages)
        {
            if job.rate > 0.0 {
                let due = start + Duration::from_secs_f64(index as f64 / job.rate);
                monoio::time::sleep_until(due.into()).await;
            }
            while self.inflight.get() >= u64::from(job.window) && !self.finishing() {
                let _ = monoio::time::timeout(Duration::from_millis(50), self.acked.wait()).await;
                if Instant::now() >= end {
                    break;
                }
            }
            if Instant::now() >= end {
                break;
            }
            let mut out = Vec::new();
            let expect = {
                let mut st = p.st.borrow_mut();
                let up = st.up;
                st.session
                    .as_mut()
                    .filter(|_| up)
                    .map(|s| s.publish(index, &payload(index, job.body_bytes), &mut out))
            };
            let Some(expect) = expect else {
                // The publisher is down; it reconnects and rejoins.
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            self.inflight.set(self.inflight.get() + expect);
            self.send(p, out);
            self.count_publish(expect);
            index += 1;
            if expect == 0 && index % u64::from(job.window.max(1)) == 0 {
                // Nothing comes back to wait on: let the writer run.
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        self.tally.borrow_mut().publishing_done = 1;
    }

    fn count_publish(&self, expect: u64) {
        let now = unix_ns();
        let mut t = self.tally.borrow_mut();
        t.published += 1;
        t.acks_expected += expect;
        if t.first_publish_ns == 0 {
            t.first_publish_ns = now;
        }
        t.last_publish_ns = now;
    }

    /// Progress to the parent, and keepalives.
    async fn ticker(self: Rc<Self>) {
        let mut last_keepalive = Instant::now();
        loop {
            monoio::time::sleep(PROGRESS).await;
            let line = serde_json::to_string(&super::FromPeerWorker::Progress(
                self.tally.borrow().clone(),
            ));
            let written = line.map_err(std::io::Error::other).and_then(|l| {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{l}").and_then(|()| out.flush())
            });
            if written.is_err() {
                self.control.advance(Phase::Finish);
            }
            if last_keepalive.elapsed() < Duration::from_secs(1) {
                continue;
            }
            last_keepalive = Instant::now();
            let now = Instant::now();
            for c in self.conns.iter().chain(self.publisher.iter()) {
                let mut out = Vec::new();
                {
                    let mut st = c.st.borrow_mut();
                    if !st.up || now.duration_since(st.last_write) < self.job.keepalive {
                        continue;
                    }
                    if let Some(s) = st.session.as_mut() {
                        s.keepalive(&mut out);
                    }
                }
                self.send(c, out);
            }
        }
    }

    fn new_session(&self, c: &PeerConn) -> Box<dyn Session> {
        let job = &self.job;
        let user = job.user_name(c.index);
        match job.protocol {
            Protocol::NatsWs | Protocol::Nats => {
                Box::new(Nats::new(&user, &job.password, &job.topic))
            }
            Protocol::Mqtt => Box::new(Mqtt::new(
                &format!("lg{}-{}", job.run_id, c.index),
                &user,
                &job.password,
                &job.topic,
                job.qos,
                (job.keepalive.as_secs() * 3).clamp(10, 65_535) as u16,
            )),
            Protocol::XmppWs => Box::new(Xmpp::new(
                &job.domain,
                &user,
                &job.password,
                &format!("r{}", c.index),
                &job.topic,
                &format!("n{}", c.index),
            )),
            Protocol::Courier if c.role == Role::Publisher => {
                let per = (job.group_max.max(2) - 1) as usize;
                let members: Vec<String> = (0..job.subscribers).map(|u| job.user_name(u)).collect();
                Box::new(Courier::publisher(
                    members.chunks(per).map(<[String]>::to_vec).collect(),
                ))
            }
            Protocol::Courier => Box::new(Courier::member()),
        }
    }
}

/// Keeps `c` connected from `delay` on until the run ends.
async fn keep_connected(w: Rc<Worker>, c: Rc<PeerConn>, delay: Duration) {
    monoio::time::sleep(delay).await;
    let mut failures: u32 = 0;
    while !w.finishing() {
        match open(&w, &c).await {
            Ok((stream, leftover)) => {
                failures = 0;
                let end = session(&w, &c, stream, leftover).await;
                if w.finishing() {
                    break;
                }
                let mut t = w.tally.borrow_mut();
                t.disconnects += 1;
                t.error(&end);
                if end == "session.refused" {
                    // Wrong credentials stay wrong: do not hammer the server.
                    break;
                }
            }
            Err(kind) => {
                w.tally.borrow_mut().error(&kind);
                failures = failures.saturating_add(1);
            }
        }
        let base = Duration::from_millis(100)
            .saturating_mul(1 << failures.min(5))
            .min(Duration::from_secs(3));
        let jitter = 0.5 + w.rng.borrow_mut().unit() / 2.0;
        monoio::time::sleep(base.mul_f64(jitter)).await;
    }
}

/// Opens the TCP connection and, for WebSocket protocols, upgrades it.
/// Returns the stream and the bytes that followed the response head.
async fn open(w: &Worker, c: &PeerConn) -> Result<(TcpStream, Vec<u8>), String> {
    let attempt = async {
        let addr = w.target.addr;
        let mut stream = match w.source_addr(c.index) {
            None => TcpStream::connect_addr(addr).await,
            Some(src) => connect_from(src, addr).await,
        }
        .map_err(|e| format!("connect.{:?}", e.kind()).to_lowercase())?;
        let _ = stream.set_nodelay(true);
        let subprotocol = match w.job.protocol {
            Protocol::Mqtt | Protocol::Nats => return Ok((stream, Vec::new())),
            Protocol::NatsWs => None,
            Protocol::XmppWs => Some("xmpp"),
            Protocol::Courier => Some(courier_protocol::SUBPROTOCOL_V1),
        };
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&w.rng.borrow_mut().next_u64().to_le_bytes());
        nonce[8..].copy_from_slice(&w.rng.borrow_mut().next_u64().to_le_bytes());
        let key = handshake::client_key(nonce);
        let bearer = (!c.token.is_empty()).then_some(c.token.as_str());
        let request = handshake::request_for(&w.target, &w.target.path, &key, subprotocol, bearer);
        let (res, _) = stream.write_all(request).await;
        res.map_err(|e| format!("connect.{:?}", e.kind()).to_lowercase())?;
        let mut buf: Vec<u8> = Vec::with_capacity(1024);
        loop {
            if buf.len() == buf.capacity() {
                buf.reserve(1024);
            }
            let len = buf.len();
            let (res, slice) = stream.read(buf.slice_mut(len..)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => return Err("connect.closed_during_upgrade".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("connect.{:?}", e.kind()).to_lowercase()),
            }
            if let Some(head) =
                handshake::check_response_for(&buf, &key, subprotocol).map_err(|e| e.kind())?
            {
                return Ok((stream, buf.split_off(head)));
            }
        }
    };
    monoio::time::timeout(HANDSHAKE_TIMEOUT, attempt)
        .await
        .map_err(|_| "connect.timeout".to_owned())?
}

/// Runs one session until the connection ends; returns why it ended.
async fn session(w: &Rc<Worker>, c: &Rc<PeerConn>, stream: TcpStream, leftover: Vec<u8>) -> String {
    let id = w.next_id.get();
    w.next_id.set(id + 1);
    let wake = Rc::new(Signal::default());
    let mut start = Vec::new();
    {
        let mut st = c.st.borrow_mut();
        let mut session = w.new_session(c);
        session.start(&mut start);
        st.session = Some(session);
        st.id = id;
        st.out.clear();
        st.wake = wake.clone();
        st.up = false;
        st.subscribed = false;
    }
    let (mut rd, wr) = stream.into_split();
    monoio::spawn(writer(c.clone(), wr, id, wake));
    w.send(c, start);
    let ws = !matches!(w.job.protocol, Protocol::Mqtt | Protocol::Nats);
    let mut decoder = Decoder::new(WsRole::Client, LIMITS);
    let mut buf = leftover;
    buf.reserve(READ_BUF);
    let end = loop {
        if let Err(end) = handle_input(w, c, ws, &mut decoder, &mut buf) {
            break end;
        }
        if buf.is_empty() && buf.capacity() > 4 * READ_BUF {
            buf = Vec::with_capacity(READ_BUF);
        } else if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_BUF);
        }
        let len = buf.len();
        let (res, slice) = rd.read(buf.slice_mut(len..)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) => break "session.eof".to_owned(),
            Ok(_) => {}
            Err(e) => break format!("session.{:?}", e.kind()).to_lowercase(),
        }
    };
    let mut st = c.st.borrow_mut();
    let was_up = std::mem::take(&mut st.up);
    let was_subscribed = std::mem::take(&mut st.subscribed);
    st.session = None;
    st.id = 0;
    let wake = st.wake.clone();
    drop(st);
    wake.notify();
    let mut t = w.tally.borrow_mut();
    if was_up && c.role != Role::Publisher {
        t.up = t.up.saturating_sub(1);
    }
    if was_subscribed && c.role == Role::Subscriber {
        t.subscribed = t.subscribed.saturating_sub(1);
    }
    end
}

/// Hands every complete input in `buf` to the session, writes what it
/// answers, and keeps the incomplete tail.
fn handle_input(
    w: &Worker,
    c: &PeerConn,
    ws: bool,
    decoder: &mut Decoder,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let mut result = Ok(());
    if ws {
        let mut at = 0;
        while result.is_ok() {
            match decoder.decode(&buf[at..]) {
                Ok(None) => break,
                Ok(Some((event, used))) => {
                    at += used;
                    result = match event {
                        Some(Event::Binary(p) | Event::Text(p)) => {
                            with_session(c, &p, &mut out, &mut notes)
                        }
                        Some(Event::Ping(data)) => {
                            let mask = (w.rng.borrow_mut().next_u64() as u32).to_ne_bytes();
                            let mut st = c.st.borrow_mut();
                            ws::encode_frame(&mut st.out, Opcode::Pong, &data, Some(mask));
                            Ok(())
                        }
                        Some(Event::Close(code)) => {
                            Err(format!("close.{}", code.map_or(0, |(c, _)| c)))
                        }
                        Some(Event::Pong(_)) | None => Ok(()),
                    };
                }
                Err(_) => result = Err("ws.protocol_error".to_owned()),
            }
        }
        buf.drain(..at);
    } else {
        result = with_session(c, buf, &mut out, &mut notes);
        buf.clear();
    }
    if let Some(s) = c.st.borrow_mut().session.as_mut() {
        s.flush(&mut out);
    }
    w.send(c, out);
    for n in notes {
        w.note(c, n);
    }
    let pending = !c.st.borrow().out.is_empty();
    if pending {
        let wake = c.st.borrow().wake.clone();
        wake.notify();
    }
    result
}

fn with_session(
    c: &PeerConn,
    input: &[u8],
    out: &mut Out,
    notes: &mut Vec<Note>,
) -> Result<(), String> {
    let mut st = c.st.borrow_mut();
    match st.session.as_mut() {
        Some(s) => s.handle(input, out, notes).map_err(|e| e.kind()),
        None => Ok(()),
    }
}

/// Drains the connection's output to the socket while session `id` lives.
async fn writer(c: Rc<PeerConn>, mut wr: OwnedWriteHalf<TcpStream>, id: u64, wake: Rc<Signal>) {
    let mut spare: Vec<u8> = Vec::new();
    loop {
        let next = {
            let mut st = c.st.borrow_mut();
            if st.id != id {
                return;
            }
            if st.out.is_empty() {
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
                    return;
                }
                buf.clear();
                if buf.capacity() <= 16 * 1024 {
                    spare = buf;
                }
            }
        }
    }
}
