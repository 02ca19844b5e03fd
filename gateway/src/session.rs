//! The per-core record of one session, and its outbound queue.
//!
//! A [`Slot`] lives in its core's slab from the moment the upgrade is
//! accepted until the session task ends; the task creates it and removes it.
//! It holds only what the rest of the core must reach without the socket:
//! who the session is, what is queued for it, and when it was last heard
//! from. The socket, the frame decoder and any partly read or partly
//! written bytes belong to the session task.
//!
//! The layout is budgeted: an idle session's slot holds no buffer. The
//! outbound queue is boxed and exists only while something is queued.

use std::collections::VecDeque;
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use courier_router::api::{Class, Device};

/// Why and how a session is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    /// The close code sent to the client.
    pub code: u16,
    /// The close reason sent to the client (at most 123 bytes).
    pub reason: CloseReason,
    /// Whether frames already queued are sent before the close frame
    /// (a graceful close) or dropped (the connection is failed).
    pub flush_first: bool,
}

/// The text of a close frame's reason. Kept as small as the `&str` it
/// usually is (16 bytes), so a slot's pending close costs no more for the
/// drain's per-session reconnect hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A fixed text.
    Text(&'static str),
    /// A drain's close: `server draining; reconnect after <ms> ms`, with
    /// the session's own jittered delay (documented in docs/protocol.md).
    Draining {
        /// Milliseconds the client is asked to wait before reconnecting.
        reconnect_after_ms: u32,
    },
}

impl CloseReason {
    /// Writes the reason's text into `out` (cleared first) and returns it.
    pub fn render<'a>(&self, out: &'a mut String) -> &'a str {
        use std::fmt::Write as _;
        out.clear();
        match *self {
            Self::Text(text) => out.push_str(text),
            Self::Draining { reconnect_after_ms } => {
                let _ = write!(
                    out,
                    "server draining; reconnect after {reconnect_after_ms} ms"
                );
            }
        }
        out
    }
}

impl From<&'static str> for CloseReason {
    fn from(text: &'static str) -> Self {
        Self::Text(text)
    }
}

/// What [`SendGate::admit`] decided about one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Pass it to the router (which applies the user's own limit).
    Pass,
    /// Refuse it with 429; the next token comes in about a second.
    Refuse,
    /// The session kept sending through [`SendGate::CLOSE_AFTER`] refusals
    /// in a row: close it.
    Close,
}

/// A per-session token bucket in whole tokens and coarse seconds (8 bytes),
/// so that a session flooding sends is refused on its own core instead of
/// costing the router thread a decode, a queue slot and a refusal each.
///
/// It is deliberately looser than the router's per-user limit (the gateway
/// uses twice the user's rate and burst): the sends of one session are a
/// subset of its user's, so a client that respects the user limit never
/// meets this one. Only a client that keeps sending after 429s does, and
/// after [`SendGate::CLOSE_AFTER`] refusals in a row it is closed with
/// 1008.
#[derive(Debug, Clone, Copy)]
pub struct SendGate {
    tokens: u16,
    refused: u16,
    stamp_s: u32,
}

impl SendGate {
    /// Refusals in a row after which the session is closed.
    pub const CLOSE_AFTER: u16 = 256;

    /// A full bucket at `now_s` (core seconds).
    pub fn full(burst: u16, now_s: u32) -> Self {
        Self {
            tokens: burst,
            refused: 0,
            stamp_s: now_s,
        }
    }

    /// Takes a token for one send at `now_s`, refilling `rate` tokens a
    /// whole second up to `burst`.
    pub fn admit(&mut self, now_s: u32, rate: u16, burst: u16) -> Admit {
        let elapsed = now_s.saturating_sub(self.stamp_s);
        if elapsed > 0 {
            let refill = u64::from(elapsed) * u64::from(rate);
            self.tokens = (u64::from(self.tokens) + refill).min(u64::from(burst)) as u16;
            self.stamp_s = now_s;
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            self.refused = 0;
            return Admit::Pass;
        }
        self.refused = self.refused.saturating_add(1);
        if self.refused >= Self::CLOSE_AFTER {
            Admit::Close
        } else {
            Admit::Refuse
        }
    }
}

/// One session's entry in its core's slab.
#[derive(Debug)]
pub struct Slot {
    /// The slab slot's generation; a [`courier_router::api::SessionKey`]
    /// with another generation names an earlier session and is ignored.
    pub generation: u32,
    /// The authenticated user and device.
    pub device: Device,
    /// Token expiry, seconds since the Unix epoch; refreshed by `Refresh`.
    pub token_exp_s: u64,
    /// When a frame was last read, in the core's coarse seconds.
    pub last_rx_s: u32,
    /// When the upgrade completed, in the core's coarse seconds (for the
    /// admin endpoint's "connected since").
    pub connected_s: u32,
    /// Whether a WebSocket ping was sent since the last frame was read.
    pub ping_outstanding: bool,
    /// The session task's waker, set each time the task is polled. The core
    /// wakes it when it queues frames or asks for a close.
    pub waker: Option<Waker>,
    /// Set by [`Slot::wake`], cleared when the task is polled, so a burst of
    /// deliveries wakes the task once.
    pub wake_pending: bool,
    /// Frames waiting to be written; `None` while nothing is queued.
    pub out: Option<Box<Outbound>>,
    /// A close asked for by the router, the sweep or the session itself.
    pub close: Option<CloseRequest>,
    /// When the close frame was queued (core seconds), so the sweep can end
    /// sessions whose peer never answers it.
    pub closing_since_s: Option<u32>,
    /// Set by the sweep when the peer did not answer our close in time; the
    /// task then ends the session without waiting further.
    pub force_end: bool,
    /// The peer's address while per-IP limits count it (boxed: 8 bytes in
    /// the slot, nothing allocated when the limits are off), given back when
    /// the session ends.
    pub counted_ip: Option<Box<std::net::IpAddr>>,
    /// The session's own send limit, checked before a send reaches the
    /// router; created full with the slot.
    pub sends: SendGate,
    /// The same for typing indicators.
    pub typing: SendGate,
}

impl Slot {
    /// Wakes the session task so it writes or closes.
    pub fn wake(&mut self) {
        if !self.wake_pending {
            if let Some(w) = &self.waker {
                w.wake_by_ref();
                self.wake_pending = true;
            }
        }
    }

    /// Queues a close; the first request wins.
    pub fn request_close(&mut self, req: CloseRequest) {
        if self.close.is_none() {
            self.close = Some(req);
            self.wake();
        }
    }

    /// The outbound queue, created on first use.
    pub fn out_mut(&mut self) -> &mut Outbound {
        self.out.get_or_insert_with(Box::default)
    }

    /// Bytes queued and not yet taken by the session task.
    pub fn queued_bytes(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.bytes)
    }
}

/// Frames queued for one session, drained in priority order: control frames
/// (pong, close) first, then replies, then messages and receipts, then
/// presence and typing.
#[derive(Debug, Default)]
pub struct Outbound {
    control: VecDeque<Bytes>,
    reply: VecDeque<Bytes>,
    message: VecDeque<(Bytes, Option<Instant>)>,
    ephemeral: VecDeque<Bytes>,
    /// A graceful close frame, written after everything else.
    last: Option<Bytes>,
    /// Total bytes in the queues above.
    bytes: usize,
}

/// First byte of a server pong: FIN and opcode 0xA.
const PONG_FRAME: u8 = 0x8a;

/// What [`Outbound::push`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Dropped: an ephemeral frame on a queue past its soft limit.
    Shed,
    /// The queue is past its hard limit: the session is a slow consumer.
    Full,
}

impl Outbound {
    /// Queues a WebSocket control frame (pong or close); never refused.
    pub fn push_control(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.control.push_back(frame);
    }

    /// Queues a pong. A pong still queued from an earlier ping is replaced
    /// in place by this one (RFC 6455 section 5.5.3 allows answering only
    /// the latest ping), so a peer that pings without reading holds one
    /// pong here, not one per ping.
    pub fn push_pong(&mut self, frame: Bytes) {
        let queued = self
            .control
            .iter_mut()
            .find(|f| f.first() == Some(&PONG_FRAME));
        match queued {
            Some(old) => {
                self.bytes = self.bytes - old.len() + frame.len();
                *old = frame;
            }
            None => self.push_control(frame),
        }
    }

    /// Queues the frame that ends the session after everything queued.
    pub fn push_last(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.last = Some(frame);
    }

    /// Queues `frame` of `class` unless the queue is over `limit` bytes.
    /// Ephemeral frames are shed once half the limit is used.
    pub fn push(
        &mut self,
        class: Class,
        frame: Bytes,
        origin: Option<Instant>,
        limit: usize,
    ) -> Pushed {
        match class {
            Class::Ephemeral if self.bytes + frame.len() > limit / 2 => return Pushed::Shed,
            _ if self.bytes + frame.len() > limit => return Pushed::Full,
            _ => {}
        }
        self.bytes += frame.len();
        match class {
            Class::Reply => self.reply.push_back(frame),
            Class::Message => self.message.push_back((frame, origin)),
            Class::Ephemeral => self.ephemeral.push_back(frame),
        }
        Pushed::Queued
    }

    /// Drops every queued data frame, keeping control frames.
    pub fn drop_data(&mut self) {
        self.reply.clear();
        self.message.clear();
        self.ephemeral.clear();
        self.bytes = self.control.iter().map(Bytes::len).sum::<usize>()
            + self.last.as_ref().map_or(0, Bytes::len);
    }

    /// Moves frames, in priority order, into `buf` until it holds at least
    /// `target` bytes or the queue is empty. Origins of the messages moved
    /// are appended to `origins`, and the first live message moved is kept
    /// in `first_live` if it is empty (the device-ack probe decodes it).
    /// Returns how many frames were moved.
    pub fn drain_into(
        &mut self,
        buf: &mut Vec<u8>,
        target: usize,
        origins: &mut Vec<Instant>,
        first_live: &mut Option<Bytes>,
    ) -> usize {
        let mut frames = 0;
        while buf.len() < target {
            let frame = if let Some(f) = self.control.pop_front() {
                f
            } else if let Some(f) = self.reply.pop_front() {
                f
            } else if let Some((f, origin)) = self.message.pop_front() {
                if origin.is_some() && first_live.is_none() {
                    *first_live = Some(f.clone());
                }
                origins.extend(origin);
                f
            } else if let Some(f) = self.ephemeral.pop_front() {
                f
            } else if let Some(f) = self.last.take() {
                f
            } else {
                break;
            };
            self.bytes -= frame.len();
            buf.extend_from_slice(&frame);
            frames += 1;
        }
        frames
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && self.control.is_empty() && self.last.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_gate_refills_per_second_and_closes_a_flooder() {
        let mut gate = SendGate::full(4, 10);
        for _ in 0..4 {
            assert_eq!(gate.admit(10, 2, 4), Admit::Pass);
        }
        assert_eq!(gate.admit(10, 2, 4), Admit::Refuse);
        // One second later two tokens are back, and a pass clears the run.
        assert_eq!(gate.admit(11, 2, 4), Admit::Pass);
        assert_eq!(gate.admit(11, 2, 4), Admit::Pass);
        for _ in 1..SendGate::CLOSE_AFTER {
            assert_eq!(gate.admit(11, 2, 4), Admit::Refuse);
        }
        assert_eq!(gate.admit(11, 2, 4), Admit::Close);
        // A long quiet refills to the burst, never past it.
        let mut gate = SendGate::full(4, 0);
        assert_eq!(gate.admit(u32::MAX, u16::MAX, 4), Admit::Pass);
        assert_eq!(gate.tokens, 3);
    }

    #[test]
    fn drains_in_priority_order() {
        let mut out = Outbound::default();
        let b = |s: &'static [u8]| Bytes::from_static(s);
        assert_eq!(
            out.push(Class::Ephemeral, b(b"t"), None, 100),
            Pushed::Queued
        );
        assert_eq!(
            out.push(Class::Message, b(b"m"), Some(Instant::now()), 100),
            Pushed::Queued
        );
        assert_eq!(out.push(Class::Reply, b(b"r"), None, 100), Pushed::Queued);
        out.push_last(b(b"x"));
        out.push_control(b(b"c"));
        let (mut buf, mut origins, mut first) = (Vec::new(), Vec::new(), None);
        assert_eq!(
            out.drain_into(&mut buf, usize::MAX, &mut origins, &mut first),
            5
        );
        assert_eq!(buf, b"crmtx");
        assert_eq!(origins.len(), 1);
        assert_eq!(first.as_deref(), Some(&b"m"[..]));
        assert!(out.is_empty());
    }

    #[test]
    fn a_queued_pong_is_replaced_by_the_next() {
        let mut out = Outbound::default();
        out.push_pong(Bytes::from_static(b"\x8a\x01a"));
        out.push_control(Bytes::from_static(b"\x88\x00"));
        out.push_pong(Bytes::from_static(b"\x8a\x02bb"));
        assert_eq!(out.bytes, 6);
        let (mut buf, mut origins, mut first) = (Vec::new(), Vec::new(), None);
        assert_eq!(
            out.drain_into(&mut buf, usize::MAX, &mut origins, &mut first),
            2
        );
        assert_eq!(buf, b"\x8a\x02bb\x88\x00");
        // Once written, the next ping gets its own pong.
        out.push_pong(Bytes::from_static(b"\x8a\x01c"));
        assert_eq!(
            out.drain_into(&mut buf, usize::MAX, &mut origins, &mut first),
            1
        );
    }

    #[test]
    fn sheds_ephemeral_first_and_reports_full() {
        let mut out = Outbound::default();
        let frame = Bytes::from(vec![0u8; 40]);
        assert_eq!(
            out.push(Class::Message, frame.clone(), None, 100),
            Pushed::Queued
        );
        assert_eq!(
            out.push(Class::Ephemeral, frame.clone(), None, 100),
            Pushed::Shed
        );
        assert_eq!(
            out.push(Class::Message, frame.clone(), None, 100),
            Pushed::Queued
        );
        assert_eq!(
            out.push(Class::Message, frame.clone(), None, 100),
            Pushed::Full
        );
        out.push_control(Bytes::from_static(b"close"));
        out.drop_data();
        assert_eq!(out.bytes, 5);
    }
}
