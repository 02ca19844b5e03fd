//! The router's state about people rather than messages: linked devices,
//! privacy settings, presence and typing.
//!
//! - **Devices.** A user has at most `max_devices` linked devices. A device
//!   is linked by its first session; unlinking it (from any device of the
//!   user) closes its session and refuses every token issued until then.
//! - **Presence** is pulled: a session asks for, or subscribes to, a few
//!   users. A user is online while any device has a session, and for
//!   `presence_debounce` after the last one ends, so a reconnect within
//!   that window (a flap) is never announced. Last-seen is the gateway's
//!   last heartbeat from the device; records are written behind, at most
//!   `presence_writes_per_s`, so a mass disconnect is a bounded write rate.
//! - **Typing** is relayed to the conversation's other online members and
//!   never stored; the router ends it after `typing_ttl` unless renewed,
//!   and a message from the typist ends it silently.

use std::collections::VecDeque;
use std::sync::Arc;

use courier_protocol::close;
use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{settings, DeviceInfo, PresenceEntry, ServerFrame};
use courier_protocol::ids;
use rustc_hash::{FxHashMap, FxHashSet};

use super::{error_frame, relay_to, ws_frame, Batch, Forward, Pending, Reject, Route, RouterCore};
use crate::api::{Class, Command, Delivery, Device, Devices, PeerMsg, Relay, SessionKey};
use crate::codec::{DeviceRecord, UserSettings};
use crate::rate::TokenBucket;
use crate::store::{self, Part, StoreError, WriteSet};

/// Most users one presence query may name.
const MAX_PRESENCE_QUERY: usize = 256;

/// Who types where: (conversation, user, device).
type Typist = (Box<str>, Arc<str>, u32);

/// A user's settings and devices, as loaded from the store and changed
/// since.
#[derive(Debug, Default)]
pub(crate) struct UserState {
    pub settings: u8,
    pub devices: Vec<(u32, DeviceRecord)>,
}

impl UserState {
    fn device(&mut self, device: u32) -> Option<&mut DeviceRecord> {
        self.devices
            .iter_mut()
            .find(|(d, _)| *d == device)
            .map(|(_, r)| r)
    }

    fn linked(&self) -> usize {
        self.devices
            .iter()
            .filter(|(_, r)| r.removed_ms == 0)
            .count()
    }

    /// The latest last-seen over the user's devices.
    fn last_seen_ms(&self) -> u64 {
        self.devices
            .iter()
            .map(|(_, r)| r.last_seen_ms)
            .max()
            .unwrap_or(0)
    }
}

/// Presence, typing and device write-behind bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Social {
    /// Users whose last session ended, with when they are announced
    /// offline unless a session comes back first.
    going_offline: FxHashMap<Arc<str>, u64>,
    offline_order: VecDeque<(u64, Arc<str>)>,
    /// Sessions subscribed to each user's presence, and the reverse.
    watchers: FxHashMap<Arc<str>, Vec<SessionKey>>,
    subscriptions: FxHashMap<SessionKey, Vec<Arc<str>>>,
    /// Who types where (conversation, user, device), until when.
    typing: FxHashMap<Typist, u64>,
    typing_order: VecDeque<(u64, Typist)>,
    typing_buckets: FxHashMap<Arc<str>, TokenBucket>,
    /// Device records changed in memory and not yet written, oldest first.
    dirty_devices: VecDeque<(Arc<str>, u32)>,
    dirty_set: FxHashSet<(Arc<str>, u32)>,
    /// The presence write budget: tokens, and when it was last refilled.
    write_tokens: f64,
    write_at_ms: u64,
}

impl RouterCore {
    /// The user's state, loaded from the store on first use.
    pub(super) fn user_state(&mut self, user: &Arc<str>) -> Result<&mut UserState, StoreError> {
        if !self.users.contains_key(user) {
            let state = UserState {
                settings: self.store.settings(user)?.flags,
                devices: self.store.devices(user)?,
            };
            self.users.insert(user.clone(), state);
        }
        Ok(self.users.entry(user.clone()).or_default())
    }

    /// True when this partition is `user`'s own (always on a single node):
    /// the one that links the user's devices, keeps their records and
    /// answers for the user's presence. Elsewhere a session of the user is
    /// a visitor, known only by its route.
    pub(super) fn is_home(&self, user: &str) -> bool {
        self.config
            .partition
            .is_none_or(|(mine, n)| crate::fleet::partition_of(user, n) == mine)
    }

    /// False when `user` turned read receipts off.
    pub(super) fn read_receipts_on(&mut self, user: &Arc<str>) -> Result<bool, StoreError> {
        Ok(self.user_state(user)?.settings & settings::READ_RECEIPTS_OFF == 0)
    }

    // ----- sessions -----

    pub(super) fn attach(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: Device,
        issued_at_s: u64,
        now_ms: u64,
    ) {
        if !self.is_home(&device.user) {
            // Fleet mode: only the user's partition routes the user's
            // sessions; the others relay what is for them there.
            tracing::debug!(user = %device.user, "attach for another partition's user ignored");
            return;
        }
        if let Err(code) = self.link(b, &device, issued_at_s, now_ms) {
            let reason = match code {
                close::DEVICE_REMOVED => "this device was unlinked; sign in again",
                _ => "too many linked devices; unlink one first",
            };
            b.pending.push(Pending::Always(Delivery::Close {
                session,
                code,
                reason,
            }));
            return;
        }
        let was_offline = !self.routes.contains_key(&device.user);
        let routes = self.routes.entry(device.user.clone()).or_default();
        match routes.iter_mut().find(|r| r.device == device.device) {
            Some(route) if route.session == session => {}
            Some(route) => {
                b.pending.push(Pending::Always(Delivery::Close {
                    session: route.session,
                    code: close::REPLACED,
                    reason: "replaced by a newer session",
                }));
                *route = Route {
                    device: device.device,
                    session,
                    live: false,
                };
            }
            None => {
                routes.push(Route {
                    device: device.device,
                    session,
                    live: false,
                });
                self.metrics.routes_online.inc();
            }
        }
        // Back within the debounce window: subscribers never saw it leave.
        if was_offline && self.social.going_offline.remove(&device.user).is_none() {
            self.push_presence(b, &device.user);
        }
        // A device that was away while its prekeys ran low hears it now.
        self.remind_low_prekeys(b, &device);
    }

    /// Checks that the device may have a session, linking it if it is new.
    /// `Err` is the close code refusing it.
    fn link(
        &mut self,
        b: &mut Batch,
        device: &Device,
        issued_at_s: u64,
        now_ms: u64,
    ) -> Result<(), u16> {
        let max = self.config.max_devices;
        let state = match self.user_state(&device.user) {
            Ok(state) => state,
            Err(e) => {
                // Refusing every session while the store is down would
                // disconnect the node; the device is let in unchecked.
                tracing::warn!(error = %e, "device registry unavailable; session not checked");
                return Ok(());
            }
        };
        let linked = state.linked();
        let record = match state.device(device.device) {
            Some(r) if r.removed_ms == 0 => return Ok(()),
            Some(r) if issued_at_s.saturating_mul(1000) <= r.removed_ms => {
                return Err(close::DEVICE_REMOVED)
            }
            _ if linked >= max => return Err(close::DEVICE_LIMIT),
            Some(r) => {
                r.removed_ms = 0;
                r.linked_ms = now_ms;
                *r
            }
            None => {
                let r = DeviceRecord {
                    linked_ms: now_ms,
                    ..DeviceRecord::default()
                };
                state.devices.push((device.device, r));
                r
            }
        };
        b.writes.put(
            Part::Devices,
            store::device_key(&device.user, device.device),
            record.encode(),
        );
        Ok(())
    }

    pub(super) fn detach(
        &mut self,
        session: SessionKey,
        device: &Device,
        last_seen_ms: u64,
        now_ms: u64,
    ) {
        self.unsubscribe(session);
        let Some(routes) = self.routes.get_mut(&device.user) else {
            return;
        };
        let before = routes.len();
        routes.retain(|r| !(r.device == device.device && r.session == session));
        if routes.len() == before {
            return;
        }
        let gone = routes.is_empty();
        self.metrics.routes_online.dec();
        if gone {
            self.routes.remove(&device.user);
        }
        if !self.is_home(&device.user) {
            return;
        }
        if gone {
            let at = now_ms + self.config.presence_debounce.as_millis() as u64;
            self.social.going_offline.insert(device.user.clone(), at);
            self.social
                .offline_order
                .push_back((at, device.user.clone()));
        }
        if let Ok(state) = self.user_state(&device.user) {
            if let Some(r) = state.device(device.device) {
                r.last_seen_ms = r.last_seen_ms.max(last_seen_ms);
                self.mark_device(&device.user, device.device);
            }
        }
    }

    /// Detaches every session of gateway `node` (fleet mode: its liveness
    /// key expired, or it started again), as if each had ended at
    /// `last_seen_ms`. Users left with no session are announced offline
    /// at once rather than after the debounce: the gateway has been silent
    /// for its whole TTL already, longer than any flap the debounce hides.
    /// Nothing is lost: deliveries to those devices were never
    /// acknowledged and come back in their next catch-up.
    pub(super) fn gateway_gone(
        &mut self,
        b: &mut Batch,
        node: u16,
        last_seen_ms: u64,
        now_ms: u64,
    ) {
        let gone: Vec<(Device, SessionKey)> = self
            .routes
            .iter()
            .flat_map(|(user, routes)| {
                routes.iter().filter(|r| r.session.node == node).map(|r| {
                    let device = Device {
                        user: user.clone(),
                        device: r.device,
                    };
                    (device, r.session)
                })
            })
            .collect();
        for (device, session) in &gone {
            self.detach(*session, device, last_seen_ms, now_ms);
            if !self.routes.contains_key(&device.user)
                && self.social.going_offline.remove(&device.user).is_some()
            {
                self.push_presence(b, &device.user);
            }
        }
        // Subscriptions of its sessions that had no route (refused ones).
        let subscribed: Vec<SessionKey> = self
            .social
            .subscriptions
            .keys()
            .filter(|s| s.node == node)
            .copied()
            .collect();
        for session in subscribed {
            self.unsubscribe(session);
        }
        self.metrics
            .gateway_sessions_dropped
            .inc_by(gone.len() as u64);
        if !gone.is_empty() {
            tracing::info!(
                gateway = node,
                sessions = gone.len(),
                "gateway gone; its sessions are detached"
            );
            // If the gateway lives after all (a wrong verdict, or a restart
            // whose first attaches came before the verdict), it learns
            // that its sessions get nothing live here any more.
            self.peer.detached.push((node, last_seen_ms));
        }
    }

    /// Queues a device record for the rate-bounded write-behind.
    fn mark_device(&mut self, user: &Arc<str>, device: u32) {
        if self.social.dirty_set.insert((user.clone(), device)) {
            self.social.dirty_devices.push_back((user.clone(), device));
        }
    }

    /// Records that the device finished a catch-up (its next summary
    /// reports receipts made after this).
    pub(super) fn synced(&mut self, device: &Device, now_ms: u64) {
        if !self.is_home(&device.user) {
            // A visitor's catch-up time is kept only where it had
            // something to catch up on (its state was loaded to plan it):
            // the next summary here reports what changed since.
            let Some(state) = self.users.get_mut(&device.user) else {
                return;
            };
            if state.device(device.device).is_none() {
                state.devices.push((device.device, DeviceRecord::default()));
            }
        }
        if let Ok(state) = self.user_state(&device.user) {
            if let Some(r) = state.device(device.device) {
                r.last_sync_ms = now_ms;
                self.mark_device(&device.user, device.device);
            }
        }
    }

    /// When the device last finished a catch-up (0: never).
    pub(super) fn last_sync_ms(&mut self, device: &Device) -> u64 {
        self.user_state(&device.user)
            .ok()
            .and_then(|s| s.device(device.device).map(|r| r.last_sync_ms))
            .unwrap_or(0)
    }

    // ----- timers and write-behind -----

    /// Announces users whose debounce ran out and ends expired typing.
    pub(super) fn timers(&mut self, b: &mut Batch, now_ms: u64) {
        while let Some((at, _)) = self.social.offline_order.front() {
            if *at > now_ms {
                break;
            }
            let Some((at, user)) = self.social.offline_order.pop_front() else {
                break;
            };
            if self.social.going_offline.get(&user) == Some(&at) {
                self.social.going_offline.remove(&user);
                if !self.routes.contains_key(&user) {
                    self.push_presence(b, &user);
                }
            }
        }
        while let Some((at, _)) = self.social.typing_order.front() {
            if *at > now_ms {
                break;
            }
            let Some((at, key)) = self.social.typing_order.pop_front() else {
                break;
            };
            if self.social.typing.get(&key) == Some(&at) {
                self.social.typing.remove(&key);
                let (conversation, user, device) = key;
                self.relay_typing(b, &conversation, &user, device, false);
            }
        }
    }

    /// Writes as many queued device records as the presence write rate
    /// allows since the last batch.
    pub(super) fn write_presence(&mut self, b: &mut Batch, now_ms: u64) {
        let rate = self.config.presence_writes_per_s;
        let s = &mut self.social;
        if now_ms > s.write_at_ms {
            let elapsed_s = (now_ms - s.write_at_ms) as f64 / 1000.0;
            // At most a quarter second of budget accumulates (the idle
            // tick's period, so an idle router still writes at the full
            // rate): the rate over any second stays within 1.25 times it.
            s.write_tokens = (s.write_tokens + elapsed_s * rate).min((rate / 4.0).max(1.0));
        }
        // Also when the clock stepped back: the budget then accrues from the
        // new time, instead of nothing being written until the clock is
        // back where it was (as TokenBucket does, in rate.rs).
        s.write_at_ms = now_ms;
        let allowed = s.write_tokens.floor() as usize;
        if allowed > 0 && !s.dirty_devices.is_empty() {
            let written = self.flush_devices(&mut b.writes, allowed);
            self.social.write_tokens -= written as f64;
        }
        self.metrics
            .presence_pending
            .set(self.social.dirty_set.len() as i64);
    }

    /// Adds up to `limit` queued device records to `writes`; returns how
    /// many it wrote.
    pub(super) fn flush_devices(&mut self, writes: &mut WriteSet, limit: usize) -> usize {
        let mut written = 0;
        while written < limit {
            let Some((user, device)) = self.social.dirty_devices.pop_front() else {
                break;
            };
            if !self.social.dirty_set.remove(&(user.clone(), device)) {
                continue;
            }
            let record = self
                .users
                .get_mut(&user)
                .and_then(|s| s.device(device).copied());
            if let Some(r) = record {
                writes.put(Part::Devices, store::device_key(&user, device), r.encode());
                written += 1;
            }
        }
        self.metrics.presence_writes.inc_by(written as u64);
        written
    }

    // ----- presence -----

    fn presence_entry(&mut self, user: &Arc<str>) -> PresenceEntry {
        let online = self.routes.contains_key(user) || self.social.going_offline.contains_key(user);
        let last_seen_ms = match self.user_state(user) {
            Ok(s) if s.settings & settings::HIDE_LAST_SEEN == 0 => s.last_seen_ms(),
            _ => 0,
        };
        PresenceEntry {
            user: user.to_string(),
            online,
            last_seen_ms,
        }
    }

    /// Tells `user`'s subscribers where it stands now.
    fn push_presence(&mut self, b: &mut Batch, user: &Arc<str>) {
        let Some(watchers) = self.social.watchers.get(user) else {
            return;
        };
        let watchers = watchers.clone();
        let entry = self.presence_entry(user);
        let frame = ws_frame(&ServerFrame::Presence {
            request: 0,
            entries: vec![entry],
        });
        self.metrics.presence_pushes.inc_by(watchers.len() as u64);
        for session in watchers {
            b.pending.push(Pending::Always(Delivery::Frame {
                session,
                class: Class::Ephemeral,
                frame: frame.clone(),
                origin: None,
            }));
        }
    }

    fn unsubscribe(&mut self, session: SessionKey) {
        let Some(users) = self.social.subscriptions.remove(&session) else {
            return;
        };
        for user in users {
            if let Some(w) = self.social.watchers.get_mut(&user) {
                w.retain(|s| *s != session);
                if w.is_empty() {
                    self.social.watchers.remove(&user);
                }
            }
        }
    }

    /// Answers a presence query; with `subscribe`, the named users replace
    /// the session's subscriptions.
    pub(super) fn presence_query(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        request: u32,
        users: Vec<String>,
        subscribe: bool,
    ) {
        let limit = if subscribe {
            self.config.max_presence_subscriptions
        } else {
            MAX_PRESENCE_QUERY
        };
        let reject = if users.len() > limit {
            Some(format!("at most {limit} users per request"))
        } else if !users.iter().all(|u| ids::is_valid_user_id(u)) {
            Some("invalid user id".to_owned())
        } else {
            None
        };
        if let Some(detail) = reject {
            b.pending.push(Pending::Answer {
                session,
                frame: error_frame(ErrorCode::BadRequest, u64::from(request), detail),
                reference: u64::from(request),
                send: false,
            });
            return;
        }
        let mut named: Vec<Arc<str>> = Vec::with_capacity(users.len());
        for u in users {
            if !named.iter().any(|n| **n == *u) {
                named.push(Arc::from(u));
            }
        }
        if subscribe {
            self.unsubscribe(session);
            for u in &named {
                self.social
                    .watchers
                    .entry(u.clone())
                    .or_default()
                    .push(session);
            }
            if !named.is_empty() {
                self.social.subscriptions.insert(session, named.clone());
            }
        }
        let entries = named.iter().map(|u| self.presence_entry(u)).collect();
        b.pending.push(Pending::Answer {
            session,
            frame: ServerFrame::Presence { request, entries },
            reference: u64::from(request),
            send: false,
        });
    }

    // ----- typing -----

    pub(super) fn typing(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        conversation: &str,
        active: bool,
        now_ms: u64,
    ) {
        if let Err(r) = self.typing_allowed(device, conversation, now_ms) {
            b.pending.push(Pending::Answer {
                session,
                frame: error_frame(r.code, 0, r.detail),
                reference: 0,
                send: false,
            });
            return;
        }
        let key: Typist = (conversation.into(), device.user.clone(), device.device);
        if active {
            let at = now_ms + self.config.typing_ttl.as_millis() as u64;
            self.social.typing.insert(key.clone(), at);
            self.social.typing_order.push_back((at, key));
            self.relay_typing(b, conversation, &device.user, device.device, true);
        } else if self.social.typing.remove(&key).is_some() {
            self.relay_typing(b, conversation, &device.user, device.device, false);
        }
    }

    fn typing_allowed(
        &mut self,
        device: &Device,
        conversation: &str,
        now_ms: u64,
    ) -> Result<(), Reject> {
        let member = match ids::parse_conversation(conversation) {
            None => {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "malformed conversation id",
                ))
            }
            // A direct conversation's participants are in its id, whether or
            // not it has a message yet.
            Some(ids::ConversationKind::Direct(a, b)) => *device.user == *a || *device.user == *b,
            Some(ids::ConversationKind::Group(_)) => {
                self.load(conversation)?
                    && self
                        .conversations
                        .get(conversation)
                        .is_some_and(|c| c.is_member(&device.user))
            }
        };
        if !member {
            return Err(Reject::new(
                ErrorCode::NotMember,
                "not a member of this conversation",
            ));
        }
        let (rate, burst) = (self.config.typing_rate_per_s, self.config.typing_burst);
        let bucket = self
            .social
            .typing_buckets
            .entry(device.user.clone())
            .or_insert_with(|| TokenBucket::full(burst, now_ms));
        if let Err(wait_ms) = bucket.take(now_ms, rate, burst) {
            self.metrics.typing_limited.inc();
            return Err(Reject::new(
                ErrorCode::RateLimited,
                format!("typing rate exceeded; retry in {wait_ms} ms"),
            ));
        }
        Ok(())
    }

    /// Relays a typing change to the live sessions of the conversation's
    /// other members.
    fn relay_typing(
        &mut self,
        b: &mut Batch,
        conversation: &str,
        user: &Arc<str>,
        device: u32,
        active: bool,
    ) {
        let others: Vec<Arc<str>> = match (
            self.conversations.get(conversation),
            ids::parse_conversation(conversation),
        ) {
            (Some(conv), _) => conv
                .members
                .iter()
                .filter(|m| m.user != *user)
                .map(|m| m.user.clone())
                .collect(),
            (None, Some(ids::ConversationKind::Direct(a, b))) => [a, b]
                .into_iter()
                .filter(|u| **u != **user)
                .map(Arc::from)
                .collect(),
            (None, _) => return,
        };
        let frame = ws_frame(&ServerFrame::Typing {
            conversation: conversation.to_owned(),
            user: user.to_string(),
            device,
            active,
            ttl_ms: self.config.typing_ttl.as_millis() as u32,
        });
        let mut relayed = 0;
        let mut away: FxHashMap<u16, Relay> = FxHashMap::default();
        for other in &others {
            if let Some((home, mine)) = self.elsewhere(other) {
                let relay = away.entry(home).or_default();
                relay_to(
                    relay,
                    mine,
                    other,
                    Devices::All,
                    Class::Ephemeral,
                    None,
                    &frame,
                );
                relayed += 1;
                continue;
            }
            for r in self.routes.get(other).into_iter().flatten() {
                if r.live {
                    b.pending.push(Pending::Always(Delivery::Frame {
                        session: r.session,
                        class: Class::Ephemeral,
                        frame: frame.clone(),
                        origin: None,
                    }));
                    relayed += 1;
                }
            }
        }
        for (home, relay) in away {
            let command = Command::Peer(PeerMsg::Relay(Box::new(relay)));
            self.peer.out.push((home, command));
        }
        self.metrics.typing_relayed.inc_by(relayed);
    }

    /// A message from the typist ends its typing without a relay: the
    /// message itself tells the others.
    pub(super) fn typing_ends(&mut self, conversation: &str, user: &Arc<str>, device: u32) {
        if !self.social.typing.is_empty() {
            let key: Typist = (conversation.into(), user.clone(), device);
            self.social.typing.remove(&key);
        }
    }

    /// Drops typing buckets that refilled (called by the sweep).
    pub(super) fn sweep_typing(&mut self, now_ms: u64) {
        let (rate, burst) = (self.config.typing_rate_per_s, self.config.typing_burst);
        self.social
            .typing_buckets
            .retain(|_, b| !b.is_full(now_ms, rate, burst));
    }

    // ----- settings and devices -----

    pub(super) fn settings(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
        mask: u8,
        flags: u8,
    ) {
        let reference = u64::from(request);
        let result = if mask & !settings::ALL != 0 {
            Err(Reject::new(ErrorCode::BadRequest, "unknown settings bit"))
        } else {
            self.user_state(&device.user)
                .map_err(Reject::from)
                .map(|state| {
                    let old = state.settings;
                    state.settings = (old & !mask) | (flags & mask);
                    (old, state.settings)
                })
        };
        let frame = match result {
            Ok((old, new)) => {
                if new != old {
                    b.writes.put(
                        Part::Settings,
                        store::settings_key(&device.user),
                        UserSettings { flags: new }.encode(),
                    );
                    // Fleet mode: the other partitions decide the read
                    // receipts of their conversations with their copy.
                    self.tell_other_partitions(b, || PeerMsg::Settings {
                        user: device.user.clone(),
                        flags: new,
                    });
                    b.pending.push(Pending::Notify(vec![Forward {
                        user: device.user.clone(),
                        except_device: Some(device.device),
                        frame: ServerFrame::Settings {
                            request: 0,
                            flags: new,
                        },
                    }]));
                }
                ServerFrame::Settings {
                    request,
                    flags: new,
                }
            }
            Err(r) => error_frame(r.code, reference, r.detail),
        };
        b.pending.push(Pending::Answer {
            session,
            frame,
            reference,
            send: false,
        });
    }

    pub(super) fn device_list(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
    ) {
        let online: Vec<u32> = self
            .routes
            .get(&device.user)
            .into_iter()
            .flatten()
            .map(|r| r.device)
            .collect();
        let frame = match self.user_state(&device.user) {
            Ok(state) => {
                let mut devices: Vec<DeviceInfo> = state
                    .devices
                    .iter()
                    .filter(|(_, r)| r.removed_ms == 0)
                    .map(|(d, r)| DeviceInfo {
                        device: *d,
                        linked_ms: r.linked_ms,
                        last_seen_ms: r.last_seen_ms,
                        online: online.contains(d),
                    })
                    .collect();
                devices.sort_unstable_by_key(|d| d.device);
                ServerFrame::Devices { request, devices }
            }
            Err(e) => {
                let r = Reject::from(e);
                error_frame(r.code, u64::from(request), r.detail)
            }
        };
        b.pending.push(Pending::Answer {
            session,
            frame,
            reference: u64::from(request),
            send: false,
        });
    }

    pub(super) fn device_remove(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
        target: u32,
        now_ms: u64,
    ) {
        let reference = u64::from(request);
        let removed = match self.user_state(&device.user) {
            Ok(state) => match state.device(target) {
                Some(r) if r.removed_ms == 0 => {
                    r.removed_ms = now_ms;
                    Ok(*r)
                }
                _ => Err(Reject::new(ErrorCode::BadRequest, "no such linked device")),
            },
            Err(e) => Err(Reject::from(e)),
        };
        match removed {
            Ok(record) => {
                b.writes.put(
                    Part::Devices,
                    store::device_key(&device.user, target),
                    record.encode(),
                );
                self.push_token_removed(b, &device.user, target);
                // Fleet mode: every other partition marks its own record.
                self.tell_other_partitions(b, || PeerMsg::DeviceUnlinked {
                    user: device.user.clone(),
                    device: target,
                    removed_ms: record.removed_ms,
                });
                // An unlinked device's keys must not be handed out again.
                if let Err(e) = self.drop_keys(b, &device.user, target) {
                    tracing::warn!(error = %e, "could not read an unlinked device's keys");
                }
                let victim = self
                    .routes
                    .get(&device.user)
                    .into_iter()
                    .flatten()
                    .find(|r| r.device == target)
                    .map(|r| r.session);
                b.pending.push(Pending::Answer {
                    session,
                    frame: ServerFrame::Done { request },
                    reference,
                    send: false,
                });
                if let Some(victim) = victim {
                    b.pending.push(Pending::Always(Delivery::Close {
                        session: victim,
                        code: close::DEVICE_REMOVED,
                        reason: "this device was unlinked",
                    }));
                }
            }
            Err(r) => b.pending.push(Pending::Answer {
                session,
                frame: error_frame(r.code, reference, r.detail),
                reference,
                send: false,
            }),
        }
    }

    /// Fleet mode: the user's partition changed the user's settings to
    /// `flags`. This partition's copy is replaced (written, so a replay
    /// keeps it). Copies arrive in the order the user's partition made
    /// them, so the last one applied is the newest.
    pub(super) fn peer_settings(&mut self, b: &mut Batch, user: &Arc<str>, flags: u8) {
        if self
            .config
            .partition
            .is_none_or(|(mine, n)| crate::fleet::partition_of(user, n) == mine)
        {
            // The user's partition holds the original; an echo changes nothing.
            return;
        }
        let flags = flags & settings::ALL;
        if let Some(state) = self.users.get_mut(user) {
            state.settings = flags;
        }
        b.writes.put(
            Part::Settings,
            store::settings_key(user),
            UserSettings { flags }.encode(),
        );
    }

    /// Fleet mode: the user's partition unlinked `device`. This
    /// partition's record of it is marked unlinked as well (written, so a
    /// replay keeps it), which frees its slot under the device limit; a
    /// session of the device still attached here is detached by its own
    /// close, which the user's partition ordered.
    pub(super) fn peer_device_unlinked(
        &mut self,
        b: &mut Batch,
        user: &Arc<str>,
        device: u32,
        removed_ms: u64,
    ) {
        if self
            .config
            .partition
            .is_none_or(|(mine, n)| crate::fleet::partition_of(user, n) == mine)
        {
            // Only the user's partition unlinks; an echo changes nothing.
            return;
        }
        // Visitors' sessions are not recorded here, so the record is made
        // if there is none: it is what refuses the device's old tokens
        // here (`visit`). A later unlinking (after a relink) moves it on.
        let removed_ms = removed_ms.max(1);
        let record = match self.user_state(user) {
            Ok(state) => {
                if state.device(device).is_none() {
                    state.devices.push((device, DeviceRecord::default()));
                }
                match state.device(device) {
                    Some(r) if r.removed_ms < removed_ms => {
                        r.removed_ms = removed_ms;
                        Some(*r)
                    }
                    _ => None,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a user's devices to unlink one");
                None
            }
        };
        if let Some(record) = record {
            b.writes.put(
                Part::Devices,
                store::device_key(user, device),
                record.encode(),
            );
        }
    }
}
