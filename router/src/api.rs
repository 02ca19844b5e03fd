//! The seam between gateways and the router.
//!
//! A gateway core turns what a session's client sends into [`Command`]s and
//! submits them through a [`crate::RouterHandle`]. The router answers with
//! [`Delivery`]s, grouped per core and handed to the gateway's [`Outlet`] once
//! per core per batch, so a core is woken once for everything a batch
//! produced for it, never once per message.
//!
//! Every outbound frame is already a complete WebSocket binary frame
//! (header and payload): a group message is encoded once and the same
//! [`Bytes`] is queued on every recipient's session.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use courier_protocol::frame::ClientFrame;

/// Names one session: the core that owns it, its slot in that core's slab,
/// and the slot's generation. A slot reused by a later session has a new
/// generation, so a delivery addressed to the old one is dropped by the core
/// instead of reaching a stranger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The gateway process (its node id) that holds the session: 0 on a
    /// single node; in a fleet, where the router sends its deliveries.
    pub node: u16,
    /// The gateway core (thread) that owns the session.
    pub core: u16,
    /// The session's slot in the core's slab.
    pub slot: u32,
    /// The slot's generation when the session was created.
    pub generation: u32,
}

/// Who a session is: the authenticated user and device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    /// The user id (validated at authentication).
    pub user: Arc<str>,
    /// The device number within the user (from 1).
    pub device: u32,
}

/// What a gateway core asks of the router.
#[derive(Debug)]
pub enum Command {
    /// A session of `device` was authenticated and opened. Any older session
    /// of the same device is closed with `REPLACED`. The router sends it
    /// nothing live until its catch-up (`Sync`) completes.
    /// `issued_at_s` is the token's `iat`: a device unlinked after it
    /// was issued is refused (closed with `DEVICE_REMOVED`).
    Attach {
        session: SessionKey,
        device: Device,
        issued_at_s: u64,
    },
    /// The session ended (the router ignores a detach for a session that is
    /// no longer the device's current one). `last_seen_ms` is when the
    /// gateway last heard from it (its last heartbeat or frame).
    Detach {
        session: SessionKey,
        device: Device,
        last_seen_ms: u64,
    },
    /// A client frame the router handles: `Send`, `Delivered`, `Read`,
    /// `Sync` and the group frames. `received_at` is when the gateway read
    /// it, the start of the SENT-ack and delivery latency clocks.
    Frame {
        session: SessionKey,
        device: Device,
        frame: ClientFrame,
        received_at: Instant,
    },
    /// What the push worker made of a notification (sent, token invalid,
    /// given up); submitted by the worker, not by a core.
    Push(crate::push::Outcome),
    /// Fleet mode: a message between partitions' routers, or about a
    /// gateway, that no client frame carries.
    Peer(PeerMsg),
}

/// What travels between partitions (fleet mode). On a single node there is
/// one partition and none of these is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    /// Partition `from` checks a per-device send (its `query`) and asks
    /// the partition of `users` for their current keyed devices. The
    /// user's partition is the only writer of its devices and keys, so it
    /// answers from its own records.
    DeviceQuery {
        from: u16,
        query: u64,
        users: Vec<Arc<str>>,
    },
    /// The answer to `query`: each asked user's linked devices that have
    /// published keys, ascending.
    DeviceSets {
        query: u64,
        sets: Vec<(Arc<str>, Vec<u32>)>,
    },
    /// Gateway `node` is gone: its liveness key expired (a crash), or it
    /// started again and its earlier sessions are dead. Its sessions are
    /// detached as if each had ended at `last_seen_ms`, and their users go
    /// offline at once.
    GatewayGone { node: u16, last_seen_ms: u64 },
    /// The user's partition changed `device`'s push token: `record` is the
    /// token's store record (registered or replaced), or `None` (removed:
    /// unregistered, unlinked, or refused by its provider). The user's
    /// partition writes tokens; every other partition keeps a copy,
    /// because a message's notifications are scheduled by the partition
    /// of its conversation.
    PushToken {
        user: Arc<str>,
        device: u32,
        record: Option<Vec<u8>>,
    },
    /// A provider refused `token` when another partition used its copy:
    /// the user's partition removes the token if it is still the device's
    /// current one, and tells every partition.
    PushTokenDead {
        user: Arc<str>,
        device: u32,
        token: String,
    },
    /// The user's partition unlinked `device` at `removed_ms`. Every
    /// partition keeps a record of each device that attached to it (its
    /// link), counted against the user's device limit there; each marks
    /// its record unlinked too, so the slot is free in every partition.
    DeviceUnlinked {
        user: Arc<str>,
        device: u32,
        removed_ms: u64,
    },
    /// The user's partition changed the user's privacy settings to
    /// `flags` (`courier_protocol::frame::settings`). The user's partition
    /// writes settings; every other partition keeps a copy, because a
    /// read receipt is decided by the partition of its conversation,
    /// which must know whether the reader or the sender turned read
    /// receipts off.
    Settings { user: Arc<str>, flags: u8 },
    /// A message that must arrive (`PushToken`, `PushTokenDead`,
    /// `DeviceUnlinked`, `Settings`), numbered `seq` in the stream from partition
    /// `from` to the receiver. The sender keeps it in its store (so in
    /// its changelog) until the receiver acknowledges it, and sends it
    /// again until then, also from a new owner after a takeover; the
    /// receiver applies each number once, in order, and records the last
    /// one it applied in its own store.
    Reliable {
        from: u16,
        seq: u64,
        message: Box<PeerMsg>,
    },
    /// Partition `from` has applied, durably, every reliable message the
    /// receiver sent it numbered up to `through`.
    Applied { from: u16, through: u64 },
    /// Frames for sessions of users whose partition is the receiver's,
    /// from partition `from` (a conversation's fan-out, receipts, typing,
    /// key changes). Only a user's own partition holds the user's routes,
    /// so every other partition hands it what is for them (see
    /// [`Relay`]).
    Relay(Box<Relay>),
    /// A receipt moved `user`'s `device` cursor in `conversation` (of
    /// another partition) to `seq`: the user's partition, which keeps the
    /// user's waiting notifications, cancels what waits for it, and on a
    /// read tells the user's other offline devices that `unread` messages
    /// are left there.
    PushReceipt {
        user: Arc<str>,
        device: u32,
        conversation: Box<str>,
        seq: u64,
        read: bool,
        unread: u64,
    },
}

/// What one partition hands another for the sessions of the receiver's
/// users, from one batch: every frame once, and who gets which.
///
/// The receiver queues each item's frame on every session of `user` it
/// routes that `devices` selects, live or still catching up (the gateway
/// holds a live message from partition `from` until that partition's
/// catch-up for the session is done), and publishes them as `from`'s, so
/// the gateway knows whose catch-up a message waits for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Relay {
    /// The partition whose frames these are.
    pub from: u16,
    /// Complete WebSocket frames, each encoded once.
    pub frames: Vec<Bytes>,
    pub items: Vec<RelayItem>,
    /// Messages to wake the offline devices of some of the users for.
    pub push: Vec<RelayPush>,
}

/// One user's share of a [`Relay`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayItem {
    pub user: Arc<str>,
    pub devices: Devices,
    pub class: Class,
    /// When the gateway received the send this message answers (for the
    /// delivery latency); `None` for frames that are not a live message.
    pub origin: Option<Instant>,
    /// Index into [`Relay::frames`].
    pub frame: u32,
}

/// Which of a user's devices an item is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Devices {
    All,
    Except(u32),
    Only(u32),
}

impl Devices {
    /// True when `device` is selected.
    pub fn includes(self, device: u32) -> bool {
        match self {
            Self::All => true,
            Self::Except(d) => d != device,
            Self::Only(d) => d == device,
        }
    }
}

/// A stored message whose notifications `users`' partition schedules for
/// their devices with no session (it keeps their tokens and knows their
/// sessions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayPush {
    pub conversation: Box<str>,
    pub seq: u64,
    /// The entry as stored (`codec::StoredEntry::encode`): sender and
    /// bodies, for the notification's content.
    pub entry: Bytes,
    pub users: Vec<Arc<str>>,
}

/// How urgent an outbound frame is; a session's queue drains in this order,
/// and under pressure sheds from the bottom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Answers to the session's own requests (SENT, errors, results,
    /// catch-up pages). Never shed.
    Reply,
    /// Messages and receipts for the session. Never shed: a session that
    /// cannot take them is closed as a slow consumer and catches up later.
    Message,
    /// Presence and typing: dropped first under pressure.
    Ephemeral,
}

/// What the router hands a core for one of its sessions.
#[derive(Debug)]
pub enum Delivery {
    /// Queue `frame` (a complete WebSocket frame) on `session`. `origin` is
    /// when the gateway received the send that caused it, for the delivery
    /// latency histogram (`None` for frames that are not a live message).
    Frame {
        session: SessionKey,
        class: Class,
        frame: Bytes,
        origin: Option<Instant>,
    },
    /// Close `session` with `code` and `reason` after what is queued.
    Close {
        session: SessionKey,
        code: u16,
        reason: &'static str,
    },
}

impl Delivery {
    /// The session this delivery is for.
    pub fn session(&self) -> SessionKey {
        match self {
            Self::Frame { session, .. } | Self::Close { session, .. } => *session,
        }
    }
}

/// Where the router hands deliveries: implemented by the gateway (one
/// mailbox per core) and by tests (a recording sink).
pub trait Outlet: Send + Sync + 'static {
    /// Takes one batch of deliveries for `core`. Called from the router
    /// thread; must not block.
    fn deliver(&self, core: u16, batch: Vec<Delivery>);

    /// Takes commands for another partition's router (fleet mode: device
    /// queries and their answers). Called from the router thread; must not
    /// block. A single node has one partition and never calls it.
    fn to_partition(&self, partition: u16, commands: Vec<Command>) {
        let _ = (partition, commands);
    }

    /// Tells gateway `node` that this partition detached its sessions on a
    /// `PeerMsg::GatewayGone` carrying `last_seen_ms` (fleet mode), so that
    /// a gateway taken for dead while alive attaches them again. Called
    /// from the router thread after the batch that detached them; must not
    /// block. A single node never calls it.
    fn gateway_detached(&self, node: u16, last_seen_ms: u64) {
        let _ = (node, last_seen_ms);
    }

    /// Takes deliveries this partition made from another partition
    /// `from`'s [`Relay`] (fleet mode): they go out as `from`'s. Called
    /// from the router thread; must not block. By default they go out as
    /// this partition's own, grouped per core.
    fn relay(&self, from: u16, batch: Vec<Delivery>) {
        let _ = from;
        let mut per_core: Vec<(u16, Vec<Delivery>)> = Vec::new();
        for d in batch {
            let core = d.session().core;
            match per_core.iter_mut().find(|(c, _)| *c == core) {
                Some((_, list)) => list.push(d),
                None => per_core.push((core, vec![d])),
            }
        }
        for (core, list) in per_core {
            self.deliver(core, list);
        }
    }
}
