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
use crate::api::{Command, PeerMsg};
use crate::fleet::partition_of;
use crate::store;

/// How long a parked per-device send waits for the other partitions'
/// device lists before it is answered 504 (retry with the same client id).
pub const PEER_TIMEOUT_MS: u64 = 5_000;

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
    /// Commands the last batches made for other partitions' routers.
    pub fn take_peer_commands(&mut self) -> Vec<(u16, Command)> {
        std::mem::take(&mut self.peer.out)
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
        }
    }

    /// Fleet mode: sends `message()` to every partition but this one once
    /// this batch commits. Nothing on a single node.
    pub(super) fn tell_other_partitions(&self, b: &mut Batch, message: impl Fn() -> PeerMsg) {
        let Some((mine, partitions)) = self.config.partition else {
            return;
        };
        for p in (0..partitions).filter(|p| *p != mine) {
            b.pending.push(Pending::Peer {
                partition: p,
                command: Command::Peer(message()),
            });
        }
    }

    /// Answers parked sends whose device lists did not come in time.
    pub(super) fn peer_timers(&mut self, b: &mut Batch, now_ms: u64) {
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
