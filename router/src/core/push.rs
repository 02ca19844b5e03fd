//! The router's push hooks: token registration, scheduling a notification
//! for each message left for a device without a live session, cancelling
//! it on ack or catch-up, badge updates on reads elsewhere, and the
//! worker's outcomes. The dispatcher's logic is `crate::push`; this file
//! only connects it to the router's state.

use std::sync::Arc;

use bytes::Bytes;

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{PushProvider, ReceiptKind, ServerFrame, MAX_PUSH_TOKEN_BYTES};
use rustc_hash::FxHashMap;

use super::{error_frame, Batch, Pending, Reject, RouterCore};
use crate::api::{Command, Device, PeerMsg, RelayPush, SessionKey};
use crate::codec::{Member, StoredEntry};
use crate::push::{
    Job, JobSender, Outcome, Payload, PushConfig, PushMetrics, Queue, QueueKey, QueueRecord,
    TokenRecord,
};
use crate::store::{self, Part, StoreError};

/// Push state of the router core: created with the core, the queue
/// restored from the store at open, the sender set when a worker starts.
#[derive(Debug)]
pub(crate) struct PushState {
    config: PushConfig,
    queue: Queue,
    /// Tokens of users seen since the start, loaded on first use; kept in
    /// step with the store by registration, removal and unlinking.
    tokens: FxHashMap<Arc<str>, Vec<(u32, TokenRecord)>>,
    /// `None` until [`RouterCore::set_push`]: notifications then wait.
    jobs: Option<JobSender>,
    metrics: PushMetrics,
}

impl PushState {
    pub fn new(config: PushConfig) -> Self {
        Self {
            config,
            queue: Queue::default(),
            tokens: FxHashMap::default(),
            jobs: None,
            metrics: PushMetrics::unregistered(),
        }
    }
}

/// Users whose tokens are cached before the cache is dropped whole (it
/// reloads from the store on use).
const TOKEN_CACHE_LIMIT: usize = 1 << 20;

impl RouterCore {
    /// Connects the push worker: due notifications go to `jobs`; `metrics`
    /// are the registered push metrics.
    pub fn set_push(&mut self, jobs: JobSender, metrics: PushMetrics) {
        self.push.jobs = Some(jobs);
        self.push.metrics = metrics;
    }

    /// Reads every waiting notification back at start.
    pub(super) fn load_push_queue(&mut self) {
        let records = match self.store.scan_prefix(Part::PushQueue, &[]) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the push queue; waiting notifications are lost");
                return;
            }
        };
        for (key, value) in records {
            let parsed =
                crate::push::record::parse_queue_key(&key).zip(QueueRecord::decode(&value));
            match parsed {
                Some(((user, device, conversation), record)) => self.push.queue.restore(
                    (Arc::from(user), device, conversation.into_boxed_str()),
                    record,
                ),
                None => tracing::error!(store.partition = "push_queue", "corrupt record skipped"),
            }
        }
        if self.push.queue.depth() > 0 {
            tracing::info!(
                push.waiting = self.push.queue.depth(),
                "push queue restored"
            );
        }
    }

    fn push_tokens(&mut self, user: &Arc<str>) -> Result<&[(u32, TokenRecord)], StoreError> {
        if !self.push.tokens.contains_key(user) {
            if self.push.tokens.len() > TOKEN_CACHE_LIMIT {
                self.push.tokens.clear();
            }
            let mut list = Vec::new();
            let prefix = store::user_prefix(user);
            for (key, value) in self.store.scan_prefix(Part::PushTokens, &prefix)? {
                let device = key
                    .get(prefix.len()..)
                    .and_then(|k| <[u8; 4]>::try_from(k).ok())
                    .map(u32::from_be_bytes);
                if let Some((device, record)) = device.zip(TokenRecord::decode(&value)) {
                    list.push((device, record));
                }
            }
            self.push.tokens.insert(user.clone(), list);
        }
        Ok(self.push.tokens.get(user).map_or(&[], |l| l.as_slice()))
    }

    /// Test hook: the token this partition holds for `user`'s `device`
    /// (its own, or its copy in fleet mode).
    #[cfg(test)]
    pub(crate) fn push_token_of(&mut self, user: &str, device: u32) -> Option<String> {
        let user: Arc<str> = Arc::from(user);
        let list = self.push_tokens(&user).ok()?;
        list.iter()
            .find(|(d, _)| *d == device)
            .map(|(_, t)| t.token.clone())
    }

    fn window_ms(&self) -> u64 {
        self.push.config.coalesce_window.as_millis() as u64
    }

    fn device_live(&self, user: &str, device: u32) -> bool {
        self.routes
            .get(user)
            .is_some_and(|rs| rs.iter().any(|r| r.device == device && r.live))
    }

    fn device_routed(&self, user: &str, device: u32) -> bool {
        self.routes
            .get(user)
            .is_some_and(|rs| rs.iter().any(|r| r.device == device))
    }

    /// `PushRegister`: stores (or replaces) the device's token.
    pub(super) fn push_register(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
        token_record: TokenRecord,
    ) {
        let reference = u64::from(request);
        let frame = match self.check_token(&token_record) {
            Err(r) => error_frame(r.code, reference, r.detail),
            Ok(()) => match self.push_tokens(&device.user) {
                Err(e) => {
                    let r = Reject::from(e);
                    error_frame(r.code, reference, r.detail)
                }
                Ok(_) => {
                    let encoded = token_record.encode();
                    self.push_tell_partitions(b, &device.user, device.device, Some(&encoded));
                    self.push_keep_token(b, &device.user, device.device, token_record, encoded);
                    ServerFrame::Done { request }
                }
            },
        };
        b.pending.push(Pending::Answer {
            session,
            frame,
            reference,
            send: false,
        });
    }

    fn check_token(&self, t: &TokenRecord) -> Result<(), Reject> {
        let bad = |detail: &str| Err(Reject::new(ErrorCode::BadRequest, detail));
        if !self.push.config.enabled(t.provider) {
            return bad("push provider not enabled on this node");
        }
        if t.token.is_empty() || t.token.len() > MAX_PUSH_TOKEN_BYTES {
            return bad("push token must be 1 to 4096 bytes");
        }
        if !t.token.bytes().all(|c| c.is_ascii_graphic()) {
            return bad("push token must be printable ASCII without spaces");
        }
        let url_safe = |c: u8| c.is_ascii_alphanumeric() || b"-_:.~".contains(&c);
        match t.provider {
            PushProvider::Apns if !t.token.bytes().all(|c| c.is_ascii_hexdigit()) => {
                bad("an APNs device token is hex digits")
            }
            PushProvider::Fcm if !t.token.bytes().all(url_safe) => {
                bad("an FCM registration token is letters, digits and -_:.~")
            }
            _ => Ok(()),
        }
    }

    /// `PushUnregister`: removes the device's token and what waits for it.
    pub(super) fn push_unregister(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
    ) {
        self.push_token_removed(b, &device.user, device.device);
        b.pending.push(Pending::Answer {
            session,
            frame: ServerFrame::Done { request },
            reference: u64::from(request),
            send: false,
        });
    }

    /// Stores `record` (its encoding `encoded`) as `device`'s token.
    fn push_keep_token(
        &mut self,
        b: &mut Batch,
        user: &Arc<str>,
        device: u32,
        record: TokenRecord,
        encoded: Vec<u8>,
    ) {
        b.writes
            .put(Part::PushTokens, store::device_key(user, device), encoded);
        if let Some(list) = self.push.tokens.get_mut(user) {
            list.retain(|(d, _)| *d != device);
            list.push((device, record));
        }
    }

    /// The partition that writes `user`'s tokens, when it is not this one
    /// (`None` on a single node and in the user's own partition).
    fn push_token_writer(&self, user: &str) -> Option<u16> {
        let (mine, partitions) = self.config.partition?;
        let owner = crate::fleet::partition_of(user, partitions);
        (owner != mine).then_some(owner)
    }

    /// Fleet mode, in the user's partition: sends the device's new token
    /// record (`None`: removed) to every other partition once this batch
    /// commits.
    fn push_tell_partitions(
        &mut self,
        b: &mut Batch,
        user: &Arc<str>,
        device: u32,
        record: Option<&[u8]>,
    ) {
        let Some((mine, partitions)) = self.config.partition else {
            return;
        };
        if crate::fleet::partition_of(user, partitions) != mine {
            return;
        }
        self.tell_other_partitions(b, || PeerMsg::PushToken {
            user: user.clone(),
            device,
            record: record.map(<[u8]>::to_vec),
        });
    }

    /// The device unregistered or was unlinked (in its user's partition):
    /// its token and waiting notifications go, here and in every copy.
    pub(super) fn push_token_removed(&mut self, b: &mut Batch, user: &Arc<str>, device: u32) {
        self.push_forget_device(b, user, device);
        self.push_tell_partitions(b, user, device, None);
    }

    /// Fleet mode: another partition's word on one of its users' tokens.
    pub(super) fn push_peer_token(
        &mut self,
        b: &mut Batch,
        user: Arc<str>,
        device: u32,
        record: Option<Vec<u8>>,
    ) {
        if self.push_token_writer(&user).is_none() {
            // Only the user's partition writes its tokens; a copy sent
            // back here (an earlier owner's late message) changes nothing.
            return;
        }
        match record {
            None => self.push_forget_device(b, &user, device),
            Some(encoded) => match TokenRecord::decode(&encoded) {
                Some(record) => {
                    // Loaded first, so the cache holds the whole list.
                    if self.push_tokens(&user).is_ok() {
                        self.push_keep_token(b, &user, device, record, encoded);
                    }
                }
                None => tracing::warn!("corrupt push token copy from another partition; ignored"),
            },
        }
    }

    /// Fleet mode, in the user's partition: a provider refused `token` in
    /// another partition. Removed everywhere if it is still current.
    pub(super) fn push_peer_token_dead(
        &mut self,
        b: &mut Batch,
        user: Arc<str>,
        device: u32,
        token: &str,
    ) {
        if self.push_token_writer(&user).is_some() {
            return;
        }
        let current = self
            .push_tokens(&user)
            .ok()
            .and_then(|list| list.iter().find(|(d, _)| *d == device))
            .is_some_and(|(_, t)| t.token == token);
        if current {
            self.push_token_removed(b, &user, device);
        }
    }

    /// The device was unlinked or its token dropped: token and queue go.
    pub(super) fn push_forget_device(&mut self, b: &mut Batch, user: &Arc<str>, device: u32) {
        b.writes
            .remove(Part::PushTokens, store::device_key(user, device));
        if let Some(list) = self.push.tokens.get_mut(user) {
            list.retain(|(d, _)| *d != device);
        }
        self.push.queue.drop_device(&mut b.writes, user, device);
    }

    /// A message was stored: each device of the other members with a token
    /// and no live session gets a notification scheduled (the sender's own
    /// devices get the message on catch-up but are never woken for it). In
    /// a fleet only this partition's own users: the others' partitions
    /// know their sessions and keep their tokens, and schedule theirs when
    /// the fan-out relays the message to them ([`Self::relay_push`]).
    pub(super) fn push_message(
        &mut self,
        b: &mut Batch,
        conversation: &str,
        seq: u64,
        recipients: &[Member],
        entry: &StoredEntry,
    ) {
        if !self.push.config.any_enabled() {
            return;
        }
        for m in recipients {
            if m.user == entry.sender || self.elsewhere(&m.user).is_some() {
                continue;
            }
            self.push_user(b, conversation, seq, &m.user, entry, true);
        }
    }

    /// Fleet mode with push on: what the fan-out hands the partitions of
    /// recipients from elsewhere, so they schedule their notifications
    /// (`None` when every recipient is this partition's).
    pub(super) fn relay_push(
        &self,
        conversation: &str,
        seq: u64,
        entry: &StoredEntry,
        recipients: &[Member],
    ) -> Option<RelayPush> {
        let away = recipients
            .iter()
            .any(|m| m.user != entry.sender && self.elsewhere(&m.user).is_some());
        if !away || !self.push.config.any_enabled() {
            return None;
        }
        Some(RelayPush {
            conversation: conversation.into(),
            seq,
            entry: Bytes::from(entry.encode()),
            users: Vec::new(),
        })
    }

    /// Another partition's message for this partition's users: each of
    /// their devices with a token and no session here is scheduled a
    /// notification.
    pub(super) fn push_relayed(&mut self, b: &mut Batch, push: RelayPush) {
        if !self.push.config.any_enabled() {
            return;
        }
        let entry = match StoredEntry::decode(&push.entry) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::warn!(error = %e, "relayed message unreadable; no notification");
                return;
            }
        };
        for user in &push.users {
            if *user == entry.sender || self.elsewhere(user).is_some() {
                continue;
            }
            self.push_user(b, &push.conversation, push.seq, user, &entry, false);
        }
    }

    /// Schedules `entry`'s notification for each of `user`'s devices with
    /// a token and no session: none live (`live_only`), or none at all (a
    /// relayed message, which reaches a session still catching up too).
    fn push_user(
        &mut self,
        b: &mut Batch,
        conversation: &str,
        seq: u64,
        user: &Arc<str>,
        entry: &StoredEntry,
        live_only: bool,
    ) {
        let now_ms = self.batch_now_ms;
        let delay = self.push.config.delay.as_millis() as u64;
        let window = self.push.config.coalesce_window.as_millis() as u64;
        let max_ciphertext = self.push.config.max_ciphertext;
        let targets: Vec<(u32, bool)> = match self.push_tokens(user) {
            Ok(list) => list.iter().map(|(d, t)| (*d, t.ciphertext)).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "push tokens unreadable; no notification");
                return;
            }
        };
        for (device, wants_body) in targets {
            let online = if live_only {
                self.device_live(user, device)
            } else {
                self.device_routed(user, device)
            };
            if online {
                continue;
            }
            let ciphertext = wants_body
                .then(|| entry.body_for(user, device))
                .filter(|c| !c.is_empty() && c.len() <= max_ciphertext);
            self.push.queue.add(
                &mut b.writes,
                (user.clone(), device, Box::from(conversation)),
                seq,
                &entry.sender,
                entry.sender_device,
                ciphertext,
                now_ms,
                delay,
                window,
            );
        }
    }

    /// A receipt moved `device`'s cursor: an ack cancels what waits for
    /// it; a read also tells the user's other offline devices the new
    /// unread count (a silent badge update). In a fleet, the user's own
    /// partition does both, which keeps the user's notifications.
    pub(super) fn push_receipt(
        &mut self,
        b: &mut Batch,
        device: &Device,
        conversation: &str,
        seq: u64,
        kind: ReceiptKind,
    ) {
        let unread = match kind {
            ReceiptKind::Read => self
                .conversations
                .get(conversation)
                .map(|c| c.last_seq.saturating_sub(seq)),
            _ => None,
        };
        if let Some((home, _)) = self.elsewhere(&device.user) {
            if self.push.config.any_enabled() {
                let message = PeerMsg::PushReceipt {
                    user: device.user.clone(),
                    device: device.device,
                    conversation: conversation.into(),
                    seq,
                    read: unread.is_some(),
                    unread: unread.unwrap_or(0),
                };
                b.pending.push(Pending::Peer {
                    partition: home,
                    command: Command::Peer(message),
                });
            }
            return;
        }
        self.push_receipt_here(b, device, conversation, seq, unread);
    }

    /// [`Self::push_receipt`] for this partition's user: cancels what
    /// waits for `device` in `conversation` up to `seq`, and with `badge`
    /// (a read, leaving that many unread) updates the other devices.
    pub(super) fn push_receipt_here(
        &mut self,
        b: &mut Batch,
        device: &Device,
        conversation: &str,
        seq: u64,
        badge: Option<u64>,
    ) {
        let key: QueueKey = (device.user.clone(), device.device, Box::from(conversation));
        if self.push.queue.delivered(&mut b.writes, &key, seq) {
            self.push.metrics.cancelled.inc();
        }
        let Some(unread) = badge else {
            return;
        };
        if !self.push.config.any_enabled() {
            return;
        }
        let others: Vec<(u32, TokenRecord)> = match self.push_tokens(&device.user) {
            Ok(list) => list
                .iter()
                .filter(|(d, _)| *d != device.device)
                .cloned()
                .collect(),
            Err(_) => return,
        };
        for (other, token) in others {
            if self.device_live(&device.user, other) {
                continue;
            }
            // Read elsewhere: that device need not be woken for it.
            let key: QueueKey = (device.user.clone(), other, Box::from(conversation));
            if self.push.queue.delivered(&mut b.writes, &key, seq) {
                self.push.metrics.cancelled.inc();
            }
            let Some(jobs) = self.push.jobs.clone() else {
                continue;
            };
            if !self.push.config.enabled(token.provider) {
                continue;
            }
            let id = self.push.queue.badge();
            jobs.send(Job {
                id,
                provider: token.provider,
                token: token.token,
                user: device.user.to_string(),
                device: other,
                payload: Payload::Badge {
                    conversation: conversation.to_owned(),
                    unread,
                },
            });
        }
    }

    /// A `Sync` from the device: what it will catch up on needs no push.
    pub(super) fn push_synced(&mut self, b: &mut Batch, device: &Device) {
        let n = self
            .push
            .queue
            .device_back(&mut b.writes, &device.user, device.device);
        self.push.metrics.cancelled.inc_by(n as u64);
    }

    /// Hands what is due to the worker; runs at the start of every batch.
    pub(super) fn push_timers(&mut self, b: &mut Batch, now_ms: u64) {
        if self.push.jobs.is_some() {
            let window = self.push.config.coalesce_window.as_millis() as u64;
            for due in self.push.queue.take_due(now_ms, window) {
                self.dispatch(b, due, now_ms);
            }
        }
        self.push
            .metrics
            .scheduled
            .set(self.push.queue.waiting() as i64);
    }

    fn dispatch(&mut self, b: &mut Batch, due: crate::push::queue::Due, now_ms: u64) {
        let (user, device, conversation) = &due.key;
        let token = match self.push_tokens(user) {
            Ok(list) => list
                .iter()
                .find(|(d, _)| d == device)
                .map(|(_, t)| t.clone()),
            Err(_) => None,
        };
        let (Some(token), Some(jobs)) = (token, self.push.jobs.clone()) else {
            // The token went (or the store is unreadable): nothing to wake.
            self.push
                .queue
                .finish(&mut b.writes, due.id, now_ms, self.window_ms());
            return;
        };
        if !self.push.config.enabled(token.provider) {
            self.push
                .queue
                .finish(&mut b.writes, due.id, now_ms, self.window_ms());
            return;
        }
        jobs.send(Job {
            id: due.id,
            provider: token.provider,
            token: token.token,
            user: user.to_string(),
            device: *device,
            payload: Payload::Message {
                conversation: conversation.to_string(),
                sender: due.record.sender,
                sender_device: due.record.sender_device,
                count: due.record.count,
                seq: due.record.last_seq,
                ciphertext: due.record.ciphertext,
            },
        });
    }

    /// The worker's word on a job.
    pub(super) fn push_outcome(&mut self, b: &mut Batch, outcome: Outcome) {
        let now_ms = self.batch_now_ms;
        let window = self.window_ms();
        self.push
            .queue
            .finish(&mut b.writes, outcome.id(), now_ms, window);
        if let Outcome::InvalidToken {
            user,
            device,
            token,
            ..
        } = outcome
        {
            let user: Arc<str> = Arc::from(user);
            let current = match self.push_tokens(&user) {
                Ok(list) => list
                    .iter()
                    .find(|(d, _)| *d == device)
                    .map(|(_, t)| (t.token == token, t.provider)),
                Err(_) => None,
            };
            // A token replaced meanwhile stays.
            if let Some((true, provider)) = current {
                self.push
                    .metrics
                    .tokens_removed
                    .get_or_create(&PushMetrics::provider(provider))
                    .inc();
                tracing::debug!(
                    push.provider = provider.name(),
                    "push token invalid; removed"
                );
                match self.push_token_writer(&user) {
                    // A copy: dropped here, and the user's partition told.
                    Some(writer) => {
                        self.push_forget_device(b, &user, device);
                        let dead = PeerMsg::PushTokenDead {
                            user,
                            device,
                            token,
                        };
                        self.tell_reliably(b, writer, dead);
                    }
                    None => self.push_token_removed(b, &user, device),
                }
            }
        }
    }
}
