//! A small blocking WebSocket client for protocol v1 over a plain TCP
//! socket: the upgrade, masked binary frames out, frames in (pings
//! answered). One thread per connection; enough for the driver and tests,
//! not for thousands of connections (loadgen is for that).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, Incoming, ServerFrame};
use courier_protocol::ws::{self, Decoder, Event, Limits, Opcode, Role};

/// One session with a gateway.
pub struct Conn {
    stream: TcpStream,
    decoder: Decoder,
    buf: Vec<u8>,
    mask: u32,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    /// Connects, upgrades with `token` and reads the `Welcome`.
    pub fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: courier.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let rest = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                if head.get(9..12) != Some("101") {
                    bail!("upgrade refused: {}", head.lines().next().unwrap_or(""));
                }
                break buf[end + 4..].to_vec();
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed during the upgrade");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let limits = Limits {
            max_frame: 1 << 24,
            max_message: 1 << 24,
        };
        let mut conn = Self {
            stream,
            decoder: Decoder::new(Role::Client, limits),
            buf: rest,
            mask: 0x9e37_79b9,
        };
        match conn.next(Duration::from_secs(10))? {
            Some(Incoming::Frame(ServerFrame::Welcome { .. })) => Ok(conn),
            other => bail!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &ClientFrame) -> anyhow::Result<()> {
        let mut payload = Vec::new();
        frame.encode(&mut payload);
        self.send_ws(Opcode::Binary, &payload)
    }

    fn send_ws(&mut self, opcode: Opcode, payload: &[u8]) -> anyhow::Result<()> {
        // Masks need not be secret from the server, only vary (RFC 6455).
        self.mask = self.mask.rotate_left(5) ^ 0x5bd1_e995;
        let mut out = Vec::with_capacity(payload.len() + 14);
        ws::encode_frame(&mut out, opcode, payload, Some(self.mask.to_le_bytes()));
        self.stream.write_all(&out)?;
        Ok(())
    }

    /// The next frame within `timeout` (`None` when none came), answering
    /// pings. A close from the server is an error.
    pub fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Incoming>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((event, used)) = self.decoder.decode(&self.buf)? {
                self.buf.drain(..used);
                match event {
                    Some(Event::Binary(payload)) => return Ok(Some(Incoming::decode(&payload)?)),
                    Some(Event::Ping(data)) => self.send_ws(Opcode::Pong, &data)?,
                    Some(Event::Close(c)) => bail!("server closed the session: {c:?}"),
                    _ => {}
                }
                continue;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("connection closed"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads until `pick` accepts a frame (others are handed to `other`),
    /// or fails after `timeout`.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Incoming) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(f) = self.next(left)? {
                if let Some(t) = pick(&f) {
                    return Ok(t);
                }
            }
        }
        bail!("the expected frame did not arrive within {timeout:?}")
    }

    /// Runs catch-up to the end and returns the `Message` frames it gave.
    pub fn sync(&mut self) -> anyhow::Result<Vec<ServerFrame>> {
        let mut got = Vec::new();
        let mut cursors: Vec<courier_protocol::frame::Cursor> = Vec::new();
        loop {
            self.send(&ClientFrame::Sync {
                tail: 0,
                summary: false,
                cursors: cursors.clone(),
            })?;
            loop {
                let f = self.wait_for(Duration::from_secs(10), |f| Some(f.clone()))?;
                match f {
                    Incoming::Frame(ServerFrame::SyncDone { more: false }) => return Ok(got),
                    Incoming::Frame(ServerFrame::SyncDone { more: true }) => break,
                    Incoming::Frame(m @ ServerFrame::Message { .. }) => {
                        if let ServerFrame::Message {
                            conversation, seq, ..
                        } = &m
                        {
                            match cursors.iter_mut().find(|c| &c.conversation == conversation) {
                                Some(c) => c.seq = c.seq.max(*seq),
                                None => cursors.push(courier_protocol::frame::Cursor {
                                    conversation: conversation.clone(),
                                    seq: *seq,
                                }),
                            }
                        }
                        got.push(m);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A body as `Bytes`.
pub fn body(b: &[u8]) -> Bytes {
    Bytes::copy_from_slice(b)
}
