//! The fleet's wire between gateways and routers: batches of [`Command`]s
//! (gateway to a partition's router, on `courier.cmd.<partition>`) and of
//! [`Delivery`]s (router to a gateway, on `courier.gw.<node>`).
//!
//! One NATS message carries a whole batch, so a busy gateway publishes once
//! per partition per drain, not once per frame. Integers are big-endian,
//! strings and byte strings are `u32`-length-prefixed. A client frame
//! travels in its client-protocol encoding; an outbound frame as the
//! complete WebSocket frame the router built. Times cross processes as
//! wall-clock microseconds and become `Instant`s again on arrival, so the
//! SENT and delivery latency clocks include the bus hops (on one machine;
//! across machines they include the clocks' skew too, clamped at zero).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use courier_protocol::frame::ClientFrame;

use crate::api::{
    Class, Command, Delivery, Device, Devices, PeerMsg, Relay, RelayItem, RelayPush, SessionKey,
};

/// Why a batch could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed fleet batch: {0}")]
pub struct Malformed(pub &'static str);

const COMMANDS_V1: u8 = 0xc1;
const DELIVERIES_V1: u8 = 0xd1;

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The wall-clock time of `at` (an instant of this process).
fn to_wall(at: Instant) -> u64 {
    wall_us().saturating_sub(at.elapsed().as_micros() as u64)
}

/// The instant of this process at wall-clock `us` (never in the future).
fn from_wall(us: u64) -> Instant {
    let ago = Duration::from_micros(wall_us().saturating_sub(us));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.extend_from_slice(b);
}

fn put_session(out: &mut Vec<u8>, s: &SessionKey) {
    out.put_u16(s.node);
    out.put_u16(s.core);
    out.put_u32(s.slot);
    out.put_u32(s.generation);
}

fn put_device(out: &mut Vec<u8>, d: &Device) {
    put_bytes(out, d.user.as_bytes());
    out.put_u32(d.device);
}

/// Reads from a received batch, every read bounds-checked.
struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), Malformed> {
        if self.0.remaining() < n {
            Err(Malformed("truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<Bytes, Malformed> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn session(&mut self) -> Result<SessionKey, Malformed> {
        Ok(SessionKey {
            node: self.u16()?,
            core: self.u16()?,
            slot: self.u32()?,
            generation: self.u32()?,
        })
    }
    fn user(&mut self) -> Result<Arc<str>, Malformed> {
        let user = self.bytes()?;
        let user = std::str::from_utf8(&user).map_err(|_| Malformed("user id"))?;
        Ok(Arc::from(user))
    }
    fn device(&mut self) -> Result<Device, Malformed> {
        Ok(Device {
            user: self.user()?,
            device: self.u32()?,
        })
    }
    /// A message between partitions whose kind is `tag`; `outer` is false
    /// inside a `Reliable`, which carries only token copies, dead tokens,
    /// unlinks and settings.
    fn peer(&mut self, tag: u8, outer: bool) -> Result<PeerMsg, Malformed> {
        // Inside a `Reliable`, only the kinds sent reliably.
        if !outer && !matches!(tag, 7..=9 | 12) {
            return Err(Malformed("kind inside a reliable message"));
        }
        Ok(match tag {
            4 => {
                let from = self.u16()?;
                let query = self.u64()?;
                let n = self.u32()? as usize;
                let mut users = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    users.push(self.user()?);
                }
                PeerMsg::DeviceQuery { from, query, users }
            }
            5 => {
                let query = self.u64()?;
                let n = self.u32()? as usize;
                let mut sets = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let user = self.user()?;
                    let count = self.u32()? as usize;
                    let mut devices = Vec::with_capacity(count.min(64));
                    for _ in 0..count {
                        devices.push(self.u32()?);
                    }
                    sets.push((user, devices));
                }
                PeerMsg::DeviceSets { query, sets }
            }
            6 => PeerMsg::GatewayGone {
                node: self.u16()?,
                last_seen_ms: self.u64()?,
            },
            7 => {
                let user = self.user()?;
                let device = self.u32()?;
                let record = match self.u8()? {
                    0 => None,
                    1 => Some(self.bytes()?.to_vec()),
                    _ => return Err(Malformed("push token presence")),
                };
                PeerMsg::PushToken {
                    user,
                    device,
                    record,
                }
            }
            8 => {
                let user = self.user()?;
                let device = self.u32()?;
                let token = String::from_utf8(self.bytes()?.to_vec())
                    .map_err(|_| Malformed("push token utf-8"))?;
                PeerMsg::PushTokenDead {
                    user,
                    device,
                    token,
                }
            }
            9 => PeerMsg::DeviceUnlinked {
                user: self.user()?,
                device: self.u32()?,
                removed_ms: self.u64()?,
            },
            10 => {
                let from = self.u16()?;
                let seq = self.u64()?;
                let tag = self.u8()?;
                // One level only: a reliable message carries a plain one.
                let message = Box::new(self.peer(tag, false)?);
                PeerMsg::Reliable { from, seq, message }
            }
            11 => PeerMsg::Applied {
                from: self.u16()?,
                through: self.u64()?,
            },
            12 => PeerMsg::Settings {
                user: self.user()?,
                flags: self.u8()?,
            },
            13 => PeerMsg::Relay(Box::new(self.relay()?)),
            14 => PeerMsg::PushReceipt {
                user: self.user()?,
                device: self.u32()?,
                conversation: std::str::from_utf8(&self.bytes()?)
                    .map_err(|_| Malformed("conversation id"))?
                    .into(),
                seq: self.u64()?,
                read: self.u8()? != 0,
                unread: self.u64()?,
            },
            _ => return Err(Malformed("command kind")),
        })
    }

    fn class(&mut self) -> Result<Class, Malformed> {
        match self.u8()? {
            0 => Ok(Class::Reply),
            1 => Ok(Class::Message),
            2 => Ok(Class::Ephemeral),
            _ => Err(Malformed("class")),
        }
    }

    fn relay(&mut self) -> Result<Relay, Malformed> {
        let from = self.u16()?;
        let n = self.u32()? as usize;
        let mut frames = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            frames.push(self.bytes()?);
        }
        let n = self.u32()? as usize;
        let mut items = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let user = self.user()?;
            let devices = match (self.u8()?, self.u32()?) {
                (0, _) => Devices::All,
                (1, d) => Devices::Except(d),
                (2, d) => Devices::Only(d),
                _ => return Err(Malformed("device selection")),
            };
            let class = self.class()?;
            let origin = match self.u64()? {
                0 => None,
                us => Some(from_wall(us)),
            };
            let frame = self.u32()?;
            if frame as usize >= frames.len() {
                return Err(Malformed("relayed frame index"));
            }
            items.push(RelayItem {
                user,
                devices,
                class,
                origin,
                frame,
            });
        }
        let n = self.u32()? as usize;
        let mut push = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let conversation = std::str::from_utf8(&self.bytes()?)
                .map_err(|_| Malformed("conversation id"))?
                .into();
            let seq = self.u64()?;
            let entry = self.bytes()?;
            let count = self.u32()? as usize;
            let mut users = Vec::with_capacity(count.min(1024));
            for _ in 0..count {
                users.push(self.user()?);
            }
            push.push(RelayPush {
                conversation,
                seq,
                entry,
                users,
            });
        }
        Ok(Relay {
            from,
            frames,
            items,
            push,
        })
    }

    fn done(&self) -> Result<(), Malformed> {
        if self.0.has_remaining() {
            Err(Malformed("trailing bytes"))
        } else {
            Ok(())
        }
    }
}

/// Encodes a batch of commands. `Command::Push` (the push worker's report
/// to its own router) never crosses the bus and is left out.
pub fn encode_commands(commands: &[Command]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + commands.len() * 96);
    out.put_u8(COMMANDS_V1);
    let carried = commands
        .iter()
        .filter(|c| !matches!(c, Command::Push(_)))
        .count();
    out.put_u32(carried as u32);
    for command in commands {
        put_command(&mut out, command);
    }
    out
}

/// Appends one command (a `Command::Push` appends nothing).
fn put_command(out: &mut Vec<u8>, command: &Command) {
    match command {
        Command::Push(_) => {}
        Command::Attach {
            session,
            device,
            issued_at_s,
        } => {
            out.put_u8(1);
            put_session(out, session);
            put_device(out, device);
            out.put_u64(*issued_at_s);
        }
        Command::Detach {
            session,
            device,
            last_seen_ms,
        } => {
            out.put_u8(2);
            put_session(out, session);
            put_device(out, device);
            out.put_u64(*last_seen_ms);
        }
        Command::Frame {
            session,
            device,
            frame,
            received_at,
        } => {
            out.put_u8(3);
            put_session(out, session);
            put_device(out, device);
            out.put_u64(to_wall(*received_at));
            let mut encoded = Vec::with_capacity(64);
            frame.encode(&mut encoded);
            put_bytes(out, &encoded);
        }
        Command::Peer(message) => put_peer(out, message),
    }
}

/// Appends one message between partitions.
fn put_peer(out: &mut Vec<u8>, message: &PeerMsg) {
    match message {
        PeerMsg::DeviceQuery { from, query, users } => {
            out.put_u8(4);
            out.put_u16(*from);
            out.put_u64(*query);
            out.put_u32(users.len() as u32);
            for user in users {
                put_bytes(out, user.as_bytes());
            }
        }
        PeerMsg::DeviceSets { query, sets } => {
            out.put_u8(5);
            out.put_u64(*query);
            out.put_u32(sets.len() as u32);
            for (user, devices) in sets {
                put_bytes(out, user.as_bytes());
                out.put_u32(devices.len() as u32);
                for d in devices {
                    out.put_u32(*d);
                }
            }
        }
        PeerMsg::GatewayGone { node, last_seen_ms } => {
            out.put_u8(6);
            out.put_u16(*node);
            out.put_u64(*last_seen_ms);
        }
        PeerMsg::PushToken {
            user,
            device,
            record,
        } => {
            out.put_u8(7);
            put_bytes(out, user.as_bytes());
            out.put_u32(*device);
            match record {
                Some(record) => {
                    out.put_u8(1);
                    put_bytes(out, record);
                }
                None => out.put_u8(0),
            }
        }
        PeerMsg::PushTokenDead {
            user,
            device,
            token,
        } => {
            out.put_u8(8);
            put_bytes(out, user.as_bytes());
            out.put_u32(*device);
            put_bytes(out, token.as_bytes());
        }
        PeerMsg::DeviceUnlinked {
            user,
            device,
            removed_ms,
        } => {
            out.put_u8(9);
            put_bytes(out, user.as_bytes());
            out.put_u32(*device);
            out.put_u64(*removed_ms);
        }
        PeerMsg::Reliable { from, seq, message } => {
            out.put_u8(10);
            out.put_u16(*from);
            out.put_u64(*seq);
            put_peer(out, message);
        }
        PeerMsg::Applied { from, through } => {
            out.put_u8(11);
            out.put_u16(*from);
            out.put_u64(*through);
        }
        PeerMsg::Settings { user, flags } => {
            out.put_u8(12);
            put_bytes(out, user.as_bytes());
            out.put_u8(*flags);
        }
        PeerMsg::Relay(relay) => {
            out.put_u8(13);
            put_relay(out, relay);
        }
        PeerMsg::PushReceipt {
            user,
            device,
            conversation,
            seq,
            read,
            unread,
        } => {
            out.put_u8(14);
            put_bytes(out, user.as_bytes());
            out.put_u32(*device);
            put_bytes(out, conversation.as_bytes());
            out.put_u64(*seq);
            out.put_u8(u8::from(*read));
            out.put_u64(*unread);
        }
    }
}

fn class_byte(class: Class) -> u8 {
    match class {
        Class::Reply => 0,
        Class::Message => 1,
        Class::Ephemeral => 2,
    }
}

fn put_relay(out: &mut Vec<u8>, relay: &Relay) {
    out.put_u16(relay.from);
    out.put_u32(relay.frames.len() as u32);
    for frame in &relay.frames {
        put_bytes(out, frame);
    }
    out.put_u32(relay.items.len() as u32);
    for item in &relay.items {
        put_bytes(out, item.user.as_bytes());
        let (kind, device) = match item.devices {
            Devices::All => (0, 0),
            Devices::Except(d) => (1, d),
            Devices::Only(d) => (2, d),
        };
        out.put_u8(kind);
        out.put_u32(device);
        out.put_u8(class_byte(item.class));
        out.put_u64(item.origin.map_or(0, to_wall));
        out.put_u32(item.frame);
    }
    out.put_u32(relay.push.len() as u32);
    for p in &relay.push {
        put_bytes(out, p.conversation.as_bytes());
        out.put_u64(p.seq);
        put_bytes(out, &p.entry);
        out.put_u32(p.users.len() as u32);
        for user in &p.users {
            put_bytes(out, user.as_bytes());
        }
    }
}

/// One message between partitions on its own, as the sender's outbox
/// keeps it in its store.
pub fn encode_peer(message: &PeerMsg) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_peer(&mut out, message);
    out
}

/// Reads back what [`encode_peer`] wrote (a `Reliable` is refused).
pub fn decode_peer(raw: &[u8]) -> Result<PeerMsg, Malformed> {
    let mut r = Reader(Bytes::copy_from_slice(raw));
    let tag = r.u8()?;
    let message = r.peer(tag, false)?;
    r.done()?;
    Ok(message)
}

/// Decodes a batch of commands.
pub fn decode_commands(raw: Bytes) -> Result<Vec<Command>, Malformed> {
    let mut r = Reader(raw);
    if r.u8()? != COMMANDS_V1 {
        return Err(Malformed("not a command batch"));
    }
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let command = match r.u8()? {
            1 => Command::Attach {
                session: r.session()?,
                device: r.device()?,
                issued_at_s: r.u64()?,
            },
            2 => Command::Detach {
                session: r.session()?,
                device: r.device()?,
                last_seen_ms: r.u64()?,
            },
            3 => {
                let session = r.session()?;
                let device = r.device()?;
                let received_at = from_wall(r.u64()?);
                let frame =
                    ClientFrame::decode(&r.bytes()?).map_err(|_| Malformed("client frame"))?;
                Command::Frame {
                    session,
                    device,
                    frame,
                    received_at,
                }
            }
            tag => Command::Peer(r.peer(tag, true)?),
        };
        out.push(command);
    }
    r.done()?;
    Ok(out)
}

/// The close reasons the router gives, so a decoded close carries the same
/// static text (anything else reads as a generic reason).
const CLOSE_REASONS: [&str; 2] = ["replaced by a newer session", "this device was unlinked"];

/// Encodes a batch of deliveries.
pub fn encode_deliveries(deliveries: &[Delivery]) -> Vec<u8> {
    let size: usize = deliveries
        .iter()
        .map(|d| match d {
            Delivery::Frame { frame, .. } => 32 + frame.len(),
            Delivery::Close { reason, .. } => 32 + reason.len(),
        })
        .sum();
    let mut out = Vec::with_capacity(8 + size);
    out.put_u8(DELIVERIES_V1);
    out.put_u32(deliveries.len() as u32);
    for delivery in deliveries {
        match delivery {
            Delivery::Frame {
                session,
                class,
                frame,
                origin,
            } => {
                out.put_u8(1);
                put_session(&mut out, session);
                out.put_u8(class_byte(*class));
                out.put_u64(origin.map_or(0, to_wall));
                put_bytes(&mut out, frame);
            }
            Delivery::Close {
                session,
                code,
                reason,
            } => {
                out.put_u8(2);
                put_session(&mut out, session);
                out.put_u16(*code);
                put_bytes(&mut out, reason.as_bytes());
            }
        }
    }
    out
}

/// Decodes a batch of deliveries.
pub fn decode_deliveries(raw: Bytes) -> Result<Vec<Delivery>, Malformed> {
    let mut r = Reader(raw);
    if r.u8()? != DELIVERIES_V1 {
        return Err(Malformed("not a delivery batch"));
    }
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let delivery = match r.u8()? {
            1 => {
                let session = r.session()?;
                let class = r.class()?;
                let origin = match r.u64()? {
                    0 => None,
                    us => Some(from_wall(us)),
                };
                Delivery::Frame {
                    session,
                    class,
                    frame: r.bytes()?,
                    origin,
                }
            }
            2 => {
                let session = r.session()?;
                let code = r.u16()?;
                let reason = r.bytes()?;
                let reason = CLOSE_REASONS
                    .into_iter()
                    .find(|known| known.as_bytes() == &reason[..])
                    .unwrap_or("closed by the router");
                Delivery::Close {
                    session,
                    code,
                    reason,
                }
            }
            _ => return Err(Malformed("delivery kind")),
        };
        out.push(delivery);
    }
    r.done()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: u16) -> SessionKey {
        SessionKey {
            node,
            core: 3,
            slot: 77,
            generation: 9,
        }
    }

    fn device() -> Device {
        Device {
            user: Arc::from("alice"),
            device: 2,
        }
    }

    #[test]
    fn command_batches_round_trip() {
        let received = Instant::now() - Duration::from_millis(30);
        let commands = vec![
            Command::Attach {
                session: key(5),
                device: device(),
                issued_at_s: 1_700_000_000,
            },
            Command::Frame {
                session: key(5),
                device: device(),
                frame: ClientFrame::Send {
                    conversation: "d:alice:bob".into(),
                    client_id: 42,
                    body: Bytes::from_static(b"opaque"),
                },
                received_at: received,
            },
            Command::Detach {
                session: key(5),
                device: device(),
                last_seen_ms: 123,
            },
        ];
        let back = decode_commands(Bytes::from(encode_commands(&commands))).expect("decode");
        assert_eq!(back.len(), 3);
        assert!(
            matches!(&back[0], Command::Attach { session, device: d, issued_at_s: 1_700_000_000 }
            if *session == key(5) && *d == device())
        );
        match &back[1] {
            Command::Frame {
                frame: ClientFrame::Send { client_id: 42, .. },
                received_at,
                ..
            } => {
                let age = received_at.elapsed();
                assert!(
                    age >= Duration::from_millis(29) && age < Duration::from_secs(5),
                    "{age:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &back[2],
            Command::Detach {
                last_seen_ms: 123,
                ..
            }
        ));
    }

    #[test]
    fn peer_messages_round_trip() {
        let peers = vec![
            PeerMsg::DeviceQuery {
                from: 3,
                query: 1 << 40,
                users: vec![Arc::from("alice"), Arc::from("bob")],
            },
            PeerMsg::DeviceSets {
                query: 7,
                sets: vec![(Arc::from("alice"), vec![1, 4]), (Arc::from("bob"), vec![])],
            },
            PeerMsg::GatewayGone {
                node: 2,
                last_seen_ms: 99,
            },
            PeerMsg::PushToken {
                user: Arc::from("carol"),
                device: 3,
                record: Some(vec![1, 2, 3]),
            },
            PeerMsg::PushToken {
                user: Arc::from("carol"),
                device: 4,
                record: None,
            },
            PeerMsg::PushTokenDead {
                user: Arc::from("dave"),
                device: 1,
                token: "abc:def".into(),
            },
            PeerMsg::DeviceUnlinked {
                user: Arc::from("erin"),
                device: 2,
                removed_ms: 1_700_000_000_000,
            },
            PeerMsg::Reliable {
                from: 5,
                seq: 1 << 33,
                message: Box::new(PeerMsg::PushToken {
                    user: Arc::from("carol"),
                    device: 3,
                    record: Some(vec![9]),
                }),
            },
            PeerMsg::Applied {
                from: 2,
                through: 17,
            },
            PeerMsg::Settings {
                user: Arc::from("frank"),
                flags: 0b11,
            },
            PeerMsg::Relay(Box::new(Relay {
                from: 6,
                frames: vec![
                    Bytes::from_static(b"\x82\x01a"),
                    Bytes::from_static(b"\x82\x01b"),
                ],
                items: vec![
                    RelayItem {
                        user: Arc::from("gina"),
                        devices: Devices::All,
                        class: Class::Message,
                        origin: None,
                        frame: 0,
                    },
                    RelayItem {
                        user: Arc::from("hal"),
                        devices: Devices::Except(2),
                        class: Class::Ephemeral,
                        origin: None,
                        frame: 1,
                    },
                    RelayItem {
                        user: Arc::from("hal"),
                        devices: Devices::Only(3),
                        class: Class::Reply,
                        origin: None,
                        frame: 1,
                    },
                ],
                push: vec![RelayPush {
                    conversation: "d:gina:hal".into(),
                    seq: 12,
                    entry: Bytes::from_static(b"entry"),
                    users: vec![Arc::from("gina")],
                }],
            })),
            PeerMsg::PushReceipt {
                user: Arc::from("ivy"),
                device: 2,
                conversation: "g:abc".into(),
                seq: 40,
                read: true,
                unread: 3,
            },
        ];
        for message in &peers {
            let stored = decode_peer(&encode_peer(message));
            match message {
                // What an outbox keeps: the kinds sent reliably.
                PeerMsg::PushToken { .. }
                | PeerMsg::PushTokenDead { .. }
                | PeerMsg::DeviceUnlinked { .. }
                | PeerMsg::Settings { .. } => assert_eq!(stored.as_ref(), Ok(message)),
                _ => assert!(stored.is_err(), "{message:?}"),
            }
        }
        let commands: Vec<Command> = peers.iter().cloned().map(Command::Peer).collect();
        let back = decode_commands(Bytes::from(encode_commands(&commands))).expect("decode");
        let back: Vec<PeerMsg> = back
            .into_iter()
            .map(|c| match c {
                Command::Peer(p) => p,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(back, peers);
    }

    #[test]
    fn a_relayed_message_keeps_its_origin_and_a_bad_frame_index_is_refused() {
        let relay = |frame| Relay {
            from: 1,
            frames: vec![Bytes::from_static(b"x")],
            items: vec![RelayItem {
                user: Arc::from("a"),
                devices: Devices::All,
                class: Class::Message,
                origin: Some(Instant::now()),
                frame,
            }],
            push: Vec::new(),
        };
        let encoded = encode_commands(&[Command::Peer(PeerMsg::Relay(Box::new(relay(0))))]);
        let back = decode_commands(Bytes::from(encoded)).expect("decode");
        assert!(
            matches!(&back[..], [Command::Peer(PeerMsg::Relay(r))] if r.items[0].origin.is_some())
        );
        let encoded = encode_commands(&[Command::Peer(PeerMsg::Relay(Box::new(relay(1))))]);
        assert_eq!(
            decode_commands(Bytes::from(encoded)).map(|_| ()),
            Err(Malformed("relayed frame index"))
        );
    }

    #[test]
    fn a_reliable_message_carries_only_the_kinds_sent_reliably() {
        let inner = PeerMsg::Reliable {
            from: 1,
            seq: 1,
            message: Box::new(PeerMsg::Applied {
                from: 1,
                through: 1,
            }),
        };
        let nested = Command::Peer(PeerMsg::Reliable {
            from: 1,
            seq: 2,
            message: Box::new(inner),
        });
        assert!(decode_commands(Bytes::from(encode_commands(&[nested]))).is_err());
        // Nor an answer or a query, which would act on the receiver's
        // own outbox or parked sends.
        let answer = Command::Peer(PeerMsg::Reliable {
            from: 1,
            seq: 2,
            message: Box::new(PeerMsg::Applied {
                from: 3,
                through: 99,
            }),
        });
        assert!(decode_commands(Bytes::from(encode_commands(&[answer]))).is_err());
    }

    #[test]
    fn delivery_batches_round_trip() {
        let deliveries = vec![
            Delivery::Frame {
                session: key(1),
                class: Class::Message,
                frame: Bytes::from_static(b"\x82\x01\x42"),
                origin: Some(Instant::now()),
            },
            Delivery::Frame {
                session: key(2),
                class: Class::Ephemeral,
                frame: Bytes::from_static(b"x"),
                origin: None,
            },
            Delivery::Close {
                session: key(1),
                code: 4002,
                reason: "replaced by a newer session",
            },
        ];
        let back = decode_deliveries(Bytes::from(encode_deliveries(&deliveries))).expect("decode");
        assert_eq!(back.len(), 3);
        assert!(
            matches!(&back[0], Delivery::Frame { class: Class::Message, origin: Some(_), frame, .. }
            if &frame[..] == b"\x82\x01\x42")
        );
        assert!(matches!(
            &back[1],
            Delivery::Frame {
                class: Class::Ephemeral,
                origin: None,
                ..
            }
        ));
        assert!(matches!(
            &back[2],
            Delivery::Close {
                code: 4002,
                reason: "replaced by a newer session",
                ..
            }
        ));
    }

    #[test]
    fn malformed_batches_are_refused_not_panicked_on() {
        let good = encode_commands(&[Command::Attach {
            session: key(1),
            device: device(),
            issued_at_s: 0,
        }]);
        for cut in 0..good.len() {
            assert!(decode_commands(Bytes::copy_from_slice(&good[..cut])).is_err());
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_commands(Bytes::from(trailing)).is_err());
        assert!(
            decode_deliveries(Bytes::from(good)).is_err(),
            "a command batch is not deliveries"
        );
        // A huge count with no body fails on the first missing byte.
        let mut huge = vec![COMMANDS_V1];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_commands(Bytes::from(huge)).is_err());
    }
}
