//! A node started in-process on loopback, and a small blocking client that
//! speaks protocol v1 over a real socket. The driver follows
//! `COURIER_DRIVER` (the suite runs once per driver).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use courier_gateway::config::{Cli, ServeArgs};
use courier_gateway::node::Node;
use courier_gateway::secret;
use courier_protocol::frame::{ClientFrame, Cursor, Incoming, ServerFrame};
use courier_protocol::token::{self, Claims, Secret};
use courier_protocol::ws::{self, Decoder, Event, Limits, Opcode, Role};

pub mod webhook;

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A node on 127.0.0.1 with ephemeral ports and its own data directory.
pub struct TestNode {
    node: Option<Node>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestNode {
    pub fn start(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut node = Self::start_in(&dir, extra);
        node._tmp = Some(tmp);
        node
    }

    /// Starts a node on an existing data directory (for restarts).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Self {
        let mut argv = vec![
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--cores",
            "2",
            "--data-dir",
            dir.to_str().unwrap(),
        ];
        // Tests stop nodes with sessions open; they close them at once
        // unless the test is about the drain window.
        if !extra.contains(&"--drain-window-ms") {
            argv.extend_from_slice(&["--drain-window-ms", "0"]);
        }
        argv.extend_from_slice(extra);
        let args: ServeArgs = Cli::try_parse_from(argv).expect("test flags parse").serve;
        let node = Node::start(args).expect("node starts");
        Self {
            addr: node.listen_addr,
            metrics_addr: node.metrics_addr,
            node: Some(node),
            dir: dir.to_path_buf(),
            _tmp: None,
        }
    }

    pub fn secret(&self) -> Secret {
        secret::load_or_create(&self.dir).unwrap()
    }

    pub fn token(&self, user: &str, device: u32) -> String {
        token::mint(
            &self.secret(),
            &token::claims_for(user, device, now_s(), 3600),
        )
    }

    pub fn token_with(&self, claims: &Claims) -> String {
        token::mint(&self.secret(), claims)
    }

    pub fn connect(&self, user: &str, device: u32) -> Client {
        Client::connect(self.addr, &self.token(user, device)).expect("upgrade accepted")
    }

    /// Connects and completes catch-up, returning what catch-up delivered.
    pub fn online(&self, user: &str, device: u32) -> (Client, Vec<ServerFrame>) {
        let mut c = self.connect(user, device);
        let caught_up = c.sync(vec![]);
        (c, caught_up)
    }

    /// Shuts the node down as SIGTERM does and waits for it.
    pub fn stop(mut self) {
        if let Some(node) = self.node.take() {
            node.begin_shutdown();
            node.wait();
        }
    }

    /// Stops the node and starts a new one on the same data directory.
    pub fn restart(mut self, extra: &[&str]) -> Self {
        let tmp = self._tmp.take();
        let dir = self.dir.clone();
        self.stop();
        let mut node = Self::start_in(&dir, extra);
        node._tmp = tmp;
        node
    }

    pub fn begin_shutdown(&self) {
        if let Some(node) = &self.node {
            node.begin_shutdown();
        }
    }

    /// Scrapes the metrics endpoint.
    pub fn metrics(&self) -> String {
        http_get(self.metrics_addr, "/metrics").1
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.begin_shutdown();
            node.wait();
        }
    }
}

/// A blocking HTTP GET; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// An upgrade request with `extra` header lines.
pub fn upgrade_request(token: Option<&str>, extra: &str) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: courier.v1\r\n{auth}{extra}\r\n"
    )
}

/// Sends `request` and returns the HTTP status line's code and the stream.
pub fn raw_upgrade(addr: SocketAddr, request: &str) -> (u16, TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let rest = buf[end + 4..].to_vec();
            return (status, s, rest);
        }
        match s.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => return (0, s, buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

pub struct Client {
    pub stream: TcpStream,
    decoder: Decoder,
    buf: Vec<u8>,
    pub user: String,
    pub device: u32,
    /// WebSocket pings the server sent.
    pub pings_seen: usize,
}

impl Client {
    pub fn connect(addr: SocketAddr, token: &str) -> Result<Self, u16> {
        let (status, stream, rest) = raw_upgrade(addr, &upgrade_request(Some(token), ""));
        if status != 101 {
            return Err(status);
        }
        let mut c = Self::over(stream, rest);
        match c.next() {
            ServerFrame::Welcome { user, device, .. } => {
                c.user = user;
                c.device = device;
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
        Ok(c)
    }

    pub fn over(stream: TcpStream, rest: Vec<u8>) -> Self {
        let limits = Limits {
            max_frame: 1 << 24,
            max_message: 1 << 24,
        };
        Self {
            stream,
            decoder: Decoder::new(Role::Client, limits),
            buf: rest,
            user: String::new(),
            device: 0,
            pings_seen: 0,
        }
    }

    pub fn send(&mut self, frame: &ClientFrame) {
        let mut payload = Vec::new();
        frame.encode(&mut payload);
        self.send_ws(Opcode::Binary, &payload);
    }

    pub fn send_ws(&mut self, opcode: Opcode, payload: &[u8]) {
        let mut out = Vec::new();
        ws::encode_frame(&mut out, opcode, payload, Some([7, 13, 42, 99]));
        self.stream.write_all(&out).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next WebSocket event, or `None` on EOF or timeout.
    pub fn event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some((event, used))) = self.decoder.decode(&self.buf) {
                self.buf.drain(..used);
                if let Some(e) = event {
                    return Some(e);
                }
                continue;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    eprintln!("client {}/{}: end of stream", self.user, self.device);
                    return None;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("client {}/{}: read error {e}", self.user, self.device);
                    return None;
                }
            }
        }
    }

    /// The next protocol frame within `timeout`, answering pings (an
    /// end-to-end encryption frame is a panic: use `try_next_any`).
    pub fn try_next(&mut self, timeout: Duration) -> Option<ServerFrame> {
        match self.try_next_any(timeout)? {
            Incoming::Frame(f) => Some(f),
            Incoming::E2ee(f) => panic!("unexpected {f:?}"),
        }
    }

    /// The next frame of either family within `timeout`, answering pings.
    pub fn try_next_any(&mut self, timeout: Duration) -> Option<Incoming> {
        loop {
            match self.event(timeout)? {
                Event::Binary(payload) => {
                    return Some(Incoming::decode(&payload).expect("server frame decodes"))
                }
                Event::Ping(data) => {
                    self.pings_seen += 1;
                    self.send_ws(Opcode::Pong, &data);
                }
                Event::Close(c) => panic!("unexpected close {c:?}"),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }

    pub fn next(&mut self) -> ServerFrame {
        self.try_next(TIMEOUT).expect("a frame before the timeout")
    }

    /// Waits for the server's close frame; returns its code and reason.
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.event(TIMEOUT) {
                Some(Event::Close(Some((code, reason)))) => return (code, reason),
                Some(Event::Close(None)) => return (1005, String::new()),
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Runs catch-up to the end; returns every frame it delivered.
    pub fn sync(&mut self, cursors: Vec<Cursor>) -> Vec<ServerFrame> {
        let mut cursors = cursors;
        let mut got = Vec::new();
        loop {
            self.send(&ClientFrame::Sync {
                tail: 0,
                summary: false,
                cursors: cursors.clone(),
            });
            loop {
                match self.next() {
                    ServerFrame::SyncDone { more: false } => return got,
                    ServerFrame::SyncDone { more: true } => break,
                    f @ ServerFrame::Message { .. } => {
                        if let ServerFrame::Message {
                            conversation, seq, ..
                        } = &f
                        {
                            match cursors.iter_mut().find(|c| &c.conversation == conversation) {
                                Some(c) => c.seq = c.seq.max(*seq),
                                None => cursors.push(Cursor {
                                    conversation: conversation.clone(),
                                    seq: *seq,
                                }),
                            }
                        }
                        got.push(f);
                    }
                    other => got.push(other),
                }
            }
        }
    }

    pub fn send_text(&mut self, conversation: &str, client_id: u64, body: &[u8]) {
        self.send(&ClientFrame::Send {
            conversation: conversation.into(),
            client_id,
            body: Bytes::copy_from_slice(body),
        });
    }

    /// Sends and waits for the SENT ack; returns its seq.
    pub fn send_acked(&mut self, conversation: &str, client_id: u64, body: &[u8]) -> u64 {
        self.send_text(conversation, client_id, body);
        match self.next() {
            ServerFrame::Sent {
                client_id: id, seq, ..
            } if id == client_id => seq,
            other => panic!("expected Sent for {client_id}, got {other:?}"),
        }
    }
}
