//! Fleet mode: what a partition's router asks of other partitions, and
//! what it answers them.
//!
//! - **Device lists for per-device sends.** A user's devices and keys are
//!   written only by the user's partition (attach links a device there as
//!   everywhere, but keys are uploaded and devices unlinked only there). A
//!   per-device send is decided by the conversation's partition, which
//!   holds no keys of members from other partitions. So when such a send
//!   names members of other partitions, the send is parked and a
//!   `DeviceQuery` goes to each of their partitions; each answers from its
//!   own records (after its batch commits) with a `DeviceSets`. Once every
//!   answer is in, the send is decided in the batch that took the last
//!   one, against those lists, exactly as on a single node. Nothing is
//!   copied between partitions, so every device and key record keeps one
//!   writer, and a router that dies while a send is parked leaves nothing
//!   behind: the client's retry (same client id) starts over at the next
//!   owner. An answer that does not come within [`PEER_TIMEOUT_MS`] (its
//!   partition is being taken over) makes the send 504, retried likewise.
//! - **Push tokens.** Copied from the user's partition to every other
//!   one, so a conversation's partition can wake its members' devices
//!   (see `push.rs`).
//! - **Unlinked devices.** The user's partition unlinks a device and tells
//!   every other one (`DeviceUnlinked`), which marks its own record of the
//!   device unlinked, so the device stops counting against the user's
//!   device limit everywhere (see `social.rs`).
//! - **Delivery of the copies.** Token copies, dead tokens, unlinks and
//!   settings must arrive even when their sender or receiver dies or changes owner
//!   on the way, and in the order they were made (a late copy of an
//!   older token must never replace a newer one). Each goes through a
//!   per-receiver outbox: numbered, written in the batch that decided it
//!   (so in the changelog), sent after that batch commits, sent again
//!   every [`PEER_RESEND_MS`] until the receiver answers `Applied`, then
//!   deleted. The receiver applies number n only after n − 1, records the
//!   last one it applied in the batch that applied it, and answers after
//!   that batch commits, so a resend of anything already applied is only
//!   acknowledged again. A new owner on either side resumes from its
//!   replayed store: the sender resends what was not acknowledged, the
//!   receiver knows what it applied.
//! - **Settings.** Copied from the user's partition to every other one
//!   (`Settings`), because a read receipt is decided by the partition of
//!   its conversation, which must know whether either user turned read
//!   receipts off (see `social.rs`).
//! - **Gone gateways.** `GatewayGone` detaches every session a gateway held
//!   and announces its users offline at once (see `social.rs`).
//!
//! On a single node (`RouterConfig::partition` is `None`) nothing here is
//! used: every user is in the one partition.

use std::collections::VecDeque;
use std::sync::Arc;

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::ClientFrame;
use courier_protocol::ids;
use rustc_hash::FxHashMap;

use super::{error_frame, Batch, Pending, RouterCore};
use crate::api::{Command, Delivery, PeerMsg, Relay};
use crate::fleet::partition_of;
use crate::store::{self, Part};

/// How long a parked per-device send waits for the other partitions'
/// device lists before it is answered 504 (retry with the same client id).
pub const PEER_TIMEOUT_MS: u64 = 5_000;

/// How long a reliable message waits for `Applied` before it is sent
/// again (and how soon a new owner resends what it found in its outbox).
pub const PEER_RESEND_MS: u64 = 1_000;

/// The most reliable messages sent again to one partition at a time.
const PEER_RESEND_CHUNK: usize = 256;

/// Keys in the store's `router` partition: the outbox (a message waiting
/// for `Applied`, by receiver and number), the last number given to each
/// receiver, and the last number applied from each sender.
const OUTBOX_PREFIX: &[u8] = b"peer.out.";
const SENT_PREFIX: &[u8] = b"peer.sent.";
const APPLIED_PREFIX: &[u8] = b"peer.applied.";

fn outbox_key(to: u16, seq: u64) -> Vec<u8> {
    let mut key = OUTBOX_PREFIX.to_vec();
    key.extend_from_slice(&to.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn partition_key(prefix: &[u8], partition: u16) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// The messages for one other partition not acknowledged yet.
#[derive(Debug, Default)]
struct Outbound {
    /// The last number given.
    last: u64,
    /// Unacknowledged messages, oldest first.
    waiting: VecDeque<(u64, PeerMsg)>,
    /// When the oldest of them is sent again.
    resend_at: u64,
}

/// What a batch changed in the numbering, so that a batch that does not
/// commit can be undone in memory (its store writes never happened, and
/// the store may be closed, so it cannot be read back).
#[derive(Debug)]
pub(super) enum PeerUndo {
    /// A message to `to` was numbered and queued.
    Numbered { to: u16 },
    /// `Applied` from `from` removed these, oldest first.
    Acknowledged {
        from: u16,
        removed: Vec<(u64, PeerMsg)>,
    },
    /// A message from `from` was applied; `previous` was the last before.
    Applied { from: u16, previous: u64 },
}

/// Parked sends and outgoing peer commands.
#[derive(Debug, Default)]
pub(super) struct PeerState {
    /// Per-device sends waiting for device lists, by query id. Added when
    /// a send is parked, removed by its last answer or its timeout.
    parked: FxHashMap<u64, Parked>,
    /// The same query ids with their deadlines, oldest first.
    deadlines: VecDeque<(u64, u64)>,
    next_query: u64,
    /// The device lists of other partitions' users for the send being
    /// decided right now (set only while a parked send is resumed).
    pub resolved: Option<FxHashMap<Arc<str>, Vec<u32>>>,
    /// Commands for other partitions, taken by the router thread after
    /// each batch ([`RouterCore::take_peer_commands`]).
    pub out: Vec<(u16, Command)>,
    /// Gateways whose sessions a `GatewayGone` detached, with its last
    /// seen, to be told ([`RouterCore::take_detached_gateways`]).
    pub detached: Vec<(u16, u64)>,
    /// Deliveries made from other partitions' relays, each with the
    /// partition it came from ([`RouterCore::take_relayed`]).
    pub relayed: Vec<(u16, Delivery)>,
    /// Reliable messages not acknowledged yet, by receiving partition.
    outbox: FxHashMap<u16, Outbound>,
    /// The last reliable message applied from each sending partition.
    applied: FxHashMap<u16, u64>,
    /// `Applied` answers this batch owes, by sending partition (the
    /// highest number; one answer per partition per batch).
    owed: FxHashMap<u16, u64>,
}

/// A per-device send waiting for device lists.
#[derive(Debug)]
struct Parked {
    command: Command,
    /// Partitions that have not answered yet.
    waiting: usize,
    sets: FxHashMap<Arc<str>, Vec<u32>>,
}

impl RouterCore {
    /// Fleet mode: reads the outbox and the applied numbers back from the
    /// store at open (after a takeover, the replayed changelog's), and
    /// resends what waits at the first batch.
    pub(super) fn load_peer_state(&mut self) {
        if self.config.partition.is_none() {
            return;
        }
        let number = |raw: &[u8]| <[u8; 8]>::try_from(raw).ok().map(u64::from_be_bytes);
        let partition = |raw: &[u8]| <[u8; 2]>::try_from(raw).ok().map(u16::from_be_bytes);
        let scan = |prefix: &[u8]| match self.store.scan_prefix(Part::Router, prefix) {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the partition outbox at open");
                Vec::new()
            }
        };
        let (sent, applied, outbox) =
            (scan(SENT_PREFIX), scan(APPLIED_PREFIX), scan(OUTBOX_PREFIX));
        for (key, value) in sent {
            if let (Some(p), Some(last)) = (partition(&key[SENT_PREFIX.len()..]), number(&value)) {
                self.peer.outbox.entry(p).or_default().last = last;
            }
        }
        for (key, value) in applied {
            if let (Some(p), Some(seq)) = (partition(&key[APPLIED_PREFIX.len()..]), number(&value))
            {
                self.peer.applied.insert(p, seq);
            }
        }
        let mut waiting: i64 = 0;
        for (key, value) in outbox {
            let rest = &key[OUTBOX_PREFIX.len()..];
            let parsed = partition(rest.get(..2).unwrap_or_default())
                .zip(number(rest.get(2..).unwrap_or_default()))
                .zip(crate::wire::decode_peer(&value).ok());
            match parsed {
                Some(((p, seq), message)) => {
                    // Keys sort by partition, then number: oldest first.
                    let q = self.peer.outbox.entry(p).or_default();
                    q.last = q.last.max(seq);
                    q.waiting.push_back((seq, message));
                    waiting += 1;
                }
                None => {
                    tracing::error!(store.partition = "router", "corrupt outbox record skipped")
                }
            }
        }
        self.metrics.peer_outbox.set(waiting);
        if waiting > 0 {
            tracing::info!(
                peer.waiting = waiting,
                "partition outbox restored; resending"
            );
        }
    }

    /// Commands the last batches made for other partitions' routers.
    pub fn take_peer_commands(&mut self) -> Vec<(u16, Command)> {
        std::mem::take(&mut self.peer.out)
    }

    /// Gateways whose sessions the last batches detached, each with the
    /// last seen of the `GatewayGone` that did it.
    pub fn take_detached_gateways(&mut self) -> Vec<(u16, u64)> {
        std::mem::take(&mut self.peer.detached)
    }

    /// Deliveries the last batches made from other partitions' relays,
    /// grouped by the partition each came from, in the order made.
    pub fn take_relayed(&mut self) -> Vec<(u16, Vec<Delivery>)> {
        let mut out: Vec<(u16, Vec<Delivery>)> = Vec::new();
        for (from, d) in self.peer.relayed.drain(..) {
            match out.iter_mut().find(|(p, _)| *p == from) {
                Some((_, list)) => list.push(d),
                None => out.push((from, vec![d])),
            }
        }
        out
    }

    /// Queues a relay's frames on the sessions of this partition's users
    /// it names, live or still catching up: the gateway holds a message
    /// until the catch-up of the partition it came from is done. They
    /// leave right after this batch is decided, not after its commit: what
    /// they carry is durable in the sending partition already.
    fn relayed(&mut self, b: &mut Batch, relay: Relay) {
        for item in &relay.items {
            let Some(frame) = relay.frames.get(item.frame as usize) else {
                continue;
            };
            for r in self.routes.get(&item.user).into_iter().flatten() {
                if !item.devices.includes(r.device) {
                    continue;
                }
                self.peer.relayed.push((
                    relay.from,
                    Delivery::Frame {
                        session: r.session,
                        class: item.class,
                        frame: frame.clone(),
                        origin: item.origin,
                    },
                ));
            }
        }
        for push in relay.push {
            self.push_relayed(b, push);
        }
    }

    /// Parks `command` if it is a per-device send naming members of other
    /// partitions whose device lists are not in hand; `Some` gives it back
    /// to be decided now.
    pub(super) fn park_if_remote(
        &mut self,
        b: &Batch,
        command: Command,
        now_ms: u64,
    ) -> Option<Command> {
        let Some((mine, partitions)) = self.config.partition else {
            return Some(command);
        };
        if self.peer.resolved.is_some() {
            return Some(command);
        }
        let Command::Frame {
            device,
            frame:
                ClientFrame::SendPerDevice {
                    conversation,
                    client_id,
                    ..
                },
            ..
        } = &command
        else {
            return Some(command);
        };
        // A retry is answered with its original `Sent`, and a send that
        // fails validation with its error: neither needs device lists.
        let dedupe_key = store::dedupe_key(&device.user, device.device, *client_id);
        let window_ms = self.config.dedupe_window.as_millis() as u64;
        let retry = b.dedupe.contains_key(&dedupe_key)
            || self
                .store
                .dedupe(&dedupe_key)
                .ok()
                .flatten()
                .is_some_and(|r| r.stored_at_ms.saturating_add(window_ms) > now_ms);
        if retry {
            return Some(command);
        }
        let members: Vec<Arc<str>> = match ids::parse_conversation(conversation) {
            Some(ids::ConversationKind::Direct(a, b_user)) => {
                if *device.user != *a && *device.user != *b_user {
                    return Some(command);
                }
                vec![Arc::from(a), Arc::from(b_user)]
            }
            Some(ids::ConversationKind::Group(_)) => {
                if !matches!(self.load(conversation), Ok(true)) {
                    return Some(command);
                }
                match self.conversations.get(conversation.as_str()) {
                    Some(c) if c.is_member(&device.user) => {
                        c.members.iter().map(|m| m.user.clone()).collect()
                    }
                    _ => return Some(command),
                }
            }
            None => return Some(command),
        };
        let mut asks: FxHashMap<u16, Vec<Arc<str>>> = FxHashMap::default();
        for user in members {
            let p = partition_of(&user, partitions);
            if p != mine {
                asks.entry(p).or_default().push(user);
            }
        }
        if asks.is_empty() {
            return Some(command);
        }
        // Ids start from the clock so that a late answer to an earlier
        // owner's query never matches one of ours.
        if self.peer.next_query == 0 {
            self.peer.next_query = now_ms << 16;
        }
        let query = self.peer.next_query;
        self.peer.next_query += 1;
        self.metrics.peer_queries.inc_by(asks.len() as u64);
        let waiting = asks.len();
        for (p, users) in asks {
            self.peer.out.push((
                p,
                Command::Peer(PeerMsg::DeviceQuery {
                    from: mine,
                    query,
                    users,
                }),
            ));
        }
        self.peer.parked.insert(
            query,
            Parked {
                command,
                waiting,
                sets: FxHashMap::default(),
            },
        );
        self.peer
            .deadlines
            .push_back((now_ms + PEER_TIMEOUT_MS, query));
        None
    }

    /// Handles a message from another partition or about a gateway.
    pub(super) fn peer_message(&mut self, b: &mut Batch, msg: PeerMsg, now_ms: u64) {
        match msg {
            PeerMsg::DeviceQuery { from, query, users } => {
                let mut sets = Vec::with_capacity(users.len());
                for user in users {
                    match self.keyed_devices(&user) {
                        Ok(devices) => sets.push((user, devices)),
                        Err(e) => {
                            // No answer: the asker times out and its client
                            // retries, rather than being told a wrong list.
                            tracing::warn!(error = %e, partition.asking = from, "device query unanswered: store unreadable");
                            return;
                        }
                    }
                }
                b.pending.push(Pending::Peer {
                    partition: from,
                    command: Command::Peer(PeerMsg::DeviceSets { query, sets }),
                });
            }
            PeerMsg::DeviceSets { query, sets } => {
                let Some(parked) = self.peer.parked.get_mut(&query) else {
                    return;
                };
                parked.sets.extend(sets);
                parked.waiting = parked.waiting.saturating_sub(1);
                if parked.waiting > 0 {
                    return;
                }
                let Some(parked) = self.peer.parked.remove(&query) else {
                    return;
                };
                self.peer.resolved = Some(parked.sets);
                self.decide(b, parked.command, now_ms);
                self.peer.resolved = None;
            }
            PeerMsg::GatewayGone { node, last_seen_ms } => {
                self.gateway_gone(b, node, last_seen_ms, now_ms);
            }
            PeerMsg::PushToken {
                user,
                device,
                record,
            } => self.push_peer_token(b, user, device, record),
            PeerMsg::PushTokenDead {
                user,
                device,
                token,
            } => self.push_peer_token_dead(b, user, device, &token),
            PeerMsg::DeviceUnlinked {
                user,
                device,
                removed_ms,
            } => self.peer_device_unlinked(b, &user, device, removed_ms),
            PeerMsg::Settings { user, flags } => self.peer_settings(b, &user, flags),
            PeerMsg::Relay(relay) => self.relayed(b, *relay),
            PeerMsg::PushReceipt {
                user,
                device,
                conversation,
                seq,
                read,
                unread,
            } => {
                let device = crate::api::Device { user, device };
                self.push_receipt_here(b, &device, &conversation, seq, read.then_some(unread));
            }
            PeerMsg::Reliable { from, seq, message } => {
                let applied = self.peer.applied.get(&from).copied().unwrap_or(0);
                if seq == applied + 1 {
                    self.peer.applied.insert(from, seq);
                    b.peer_undo.push(PeerUndo::Applied {
                        from,
                        previous: applied,
                    });
                    b.writes.put(
                        Part::Router,
                        partition_key(APPLIED_PREFIX, from),
                        seq.to_be_bytes().to_vec(),
                    );
                    match *message {
                        m @ (PeerMsg::PushToken { .. }
                        | PeerMsg::PushTokenDead { .. }
                        | PeerMsg::DeviceUnlinked { .. }
                        | PeerMsg::Settings { .. }) => self.peer_message(b, m, now_ms),
                        // The decoder refuses other kinds inside; one that
                        // got here is skipped, not left to block the stream.
                        other => {
                            tracing::warn!(message = ?other, "unexpected message kind sent reliably; skipped")
                        }
                    }
                }
                // A resend of something applied is acknowledged again; a
                // message past a gap (an earlier one lost) is not applied,
                // and the answer tells the sender where the gap starts.
                let through = self.peer.applied.get(&from).copied().unwrap_or(0);
                if through > 0 {
                    let owed = self.peer.owed.entry(from).or_default();
                    *owed = (*owed).max(through);
                }
            }
            PeerMsg::Applied { from, through } => {
                let Some(q) = self.peer.outbox.get_mut(&from) else {
                    return;
                };
                let mut removed = Vec::new();
                while let Some(&(seq, _)) = q.waiting.front() {
                    if seq > through {
                        break;
                    }
                    if let Some(entry) = q.waiting.pop_front() {
                        removed.push(entry);
                    }
                    b.writes.remove(Part::Router, outbox_key(from, seq));
                }
                if removed.is_empty() {
                    return;
                }
                // The receiver is taking them: what still waits goes out
                // at the next batch instead of a resend period later, so
                // a backlog drains at the pace of the answers.
                if !q.waiting.is_empty() {
                    q.resend_at = 0;
                }
                self.metrics.peer_outbox.dec_by(removed.len() as i64);
                b.peer_undo.push(PeerUndo::Acknowledged { from, removed });
            }
        }
    }

    /// Fleet mode: sends `message` to partition `to` so that it arrives
    /// once this batch commits, whatever dies meanwhile (see the module
    /// notes). Nothing on a single node.
    pub(super) fn tell_reliably(&mut self, b: &mut Batch, to: u16, message: PeerMsg) {
        let Some((mine, _)) = self.config.partition else {
            return;
        };
        let now_ms = self.batch_now_ms;
        let q = self.peer.outbox.entry(to).or_default();
        q.last += 1;
        let seq = q.last;
        if q.waiting.is_empty() {
            q.resend_at = now_ms + PEER_RESEND_MS;
        }
        b.writes.put(
            Part::Router,
            outbox_key(to, seq),
            crate::wire::encode_peer(&message),
        );
        b.writes.put(
            Part::Router,
            partition_key(SENT_PREFIX, to),
            seq.to_be_bytes().to_vec(),
        );
        q.waiting.push_back((seq, message.clone()));
        b.peer_undo.push(PeerUndo::Numbered { to });
        self.metrics.peer_outbox.inc();
        b.pending.push(Pending::Peer {
            partition: to,
            command: Command::Peer(PeerMsg::Reliable {
                from: mine,
                seq,
                message: Box::new(message),
            }),
        });
    }

    /// Puts the numbering back as it was before a batch that did not
    /// commit (latest change first). Its messages were never published
    /// and its answers never sent; what it applied is applied again when
    /// the sender resends (every handler is idempotent).
    pub(super) fn undo_peer(&mut self, undo: Vec<PeerUndo>) {
        for change in undo.into_iter().rev() {
            match change {
                PeerUndo::Numbered { to } => {
                    if let Some(q) = self.peer.outbox.get_mut(&to) {
                        q.last = q.last.saturating_sub(1);
                        if q.waiting.pop_back().is_some() {
                            self.metrics.peer_outbox.dec();
                        }
                    }
                }
                PeerUndo::Acknowledged { from, removed } => {
                    let q = self.peer.outbox.entry(from).or_default();
                    self.metrics.peer_outbox.inc_by(removed.len() as i64);
                    for entry in removed.into_iter().rev() {
                        q.waiting.push_front(entry);
                    }
                }
                PeerUndo::Applied { from, previous } => {
                    self.peer.applied.insert(from, previous);
                }
            }
        }
        self.peer.owed.clear();
    }

    /// The `Applied` answers this batch owes, sent once it commits.
    pub(super) fn answer_peers(&mut self, b: &mut Batch) {
        let Some((mine, _)) = self.config.partition else {
            return;
        };
        for (to, through) in self.peer.owed.drain() {
            b.pending.push(Pending::Peer {
                partition: to,
                command: Command::Peer(PeerMsg::Applied {
                    from: mine,
                    through,
                }),
            });
        }
    }

    /// Fleet mode: sends `message()` reliably to every partition but this
    /// one. Nothing on a single node.
    pub(super) fn tell_other_partitions(&mut self, b: &mut Batch, message: impl Fn() -> PeerMsg) {
        let Some((mine, partitions)) = self.config.partition else {
            return;
        };
        for p in (0..partitions).filter(|p| *p != mine) {
            self.tell_reliably(b, p, message());
        }
    }

    /// Sends again what waited too long for `Applied`, and answers parked
    /// sends whose device lists did not come in time.
    pub(super) fn peer_timers(&mut self, b: &mut Batch, now_ms: u64) {
        if let Some((mine, _)) = self.config.partition {
            let mut resent = 0;
            for (&to, q) in &mut self.peer.outbox {
                if q.waiting.is_empty() || now_ms < q.resend_at {
                    continue;
                }
                q.resend_at = now_ms + PEER_RESEND_MS;
                for (seq, message) in q.waiting.iter().take(PEER_RESEND_CHUNK) {
                    b.pending.push(Pending::Peer {
                        partition: to,
                        command: Command::Peer(PeerMsg::Reliable {
                            from: mine,
                            seq: *seq,
                            message: Box::new(message.clone()),
                        }),
                    });
                    resent += 1;
                }
            }
            self.metrics.peer_resent.inc_by(resent);
        }
        while let Some(&(at, query)) = self.peer.deadlines.front() {
            if at > now_ms {
                break;
            }
            self.peer.deadlines.pop_front();
            let Some(parked) = self.peer.parked.remove(&query) else {
                continue;
            };
            if let Command::Frame {
                session,
                frame: ClientFrame::SendPerDevice { client_id, .. },
                ..
            } = parked.command
            {
                self.metrics.peer_timeouts.inc();
                let detail =
                    "recipients' device lists unavailable (a partition is changing owner); retry"
                        .to_owned();
                b.pending.push(Pending::Answer {
                    session,
                    frame: error_frame(ErrorCode::Unavailable, client_id, detail),
                    reference: client_id,
                    send: true,
                });
            }
        }
    }
}
