//! What the router reads back for clients after a batch's commit:
//! catch-up (with its summary and per-conversation tail), history pages,
//! the chat list and group receipt summaries. All of it reads the
//! committed store (below any unsynced batch), so nothing shown here can
//! later turn out not to be durable. A conversation's entries are read from
//! the recent entries when they hold the whole read (`recent.rs`), else
//! from the store.

use std::sync::Arc;

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{Chat, ConversationSummary, HistoryEntry, ServerFrame};
use courier_protocol::ids::{self, ConversationKind as IdKind};
use rustc_hash::FxHashMap;

use super::recent::Order;
use super::{error_frame, message_frame_for, Outbox, Reject, RouterCore, SyncRequest};
use crate::api::{Device, SessionKey};
use crate::codec::{ConversationKind, StoredEntry};
use crate::store::{self, StoreError};

/// Entries in a history or chat-list page when the client asks for 0.
const DEFAULT_PAGE: usize = 50;

/// Conversations per `SyncSummary` frame (a frame's list holds at most
/// 65,535; this keeps one frame under about 200 KiB).
const SUMMARY_CHUNK: usize = 2_000;

/// A read answered after the batch's commit.
#[derive(Debug)]
pub(super) enum Query {
    History {
        session: SessionKey,
        device: Device,
        request: u32,
        conversation: String,
        before_seq: u64,
        limit: u16,
    },
    ChatList {
        session: SessionKey,
        device: Device,
        request: u32,
        before_ms: u64,
        before_conversation: String,
        limit: u16,
    },
    Receipts {
        session: SessionKey,
        device: Device,
        request: u32,
        conversation: String,
        seq: u64,
    },
}

/// One conversation's place in a catch-up.
struct Plan {
    conversation: String,
    /// The highest sequence the device holds (its cursor or the client's).
    held: u64,
    /// The first sequence to stream, and the last one it may see (the
    /// newest entry, below any unsynced batch and the user's leaving).
    from: u64,
    last: u64,
    last_ms: u64,
    join_seq: u64,
    peer: Option<Arc<str>>,
}

impl RouterCore {
    pub(super) fn query(&mut self, out: &mut Outbox, query: Query) {
        let (session, request, result) = match query {
            Query::History {
                session,
                device,
                request,
                conversation,
                before_seq,
                limit,
            } => (
                session,
                request,
                self.history(&device, request, conversation, before_seq, limit),
            ),
            Query::ChatList {
                session,
                device,
                request,
                before_ms,
                before_conversation,
                limit,
            } => (
                session,
                request,
                self.chat_list(&device, request, before_ms, &before_conversation, limit),
            ),
            Query::Receipts {
                session,
                device,
                request,
                conversation,
                seq,
            } => (
                session,
                request,
                self.receipt_summary(&device, request, conversation, seq),
            ),
        };
        let frame = result.unwrap_or_else(|r| error_frame(r.code, u64::from(request), r.detail));
        out.reply(session, &frame);
    }

    fn page_limit(&self, asked: u16) -> usize {
        match usize::from(asked) {
            0 => DEFAULT_PAGE.min(self.config.history_page),
            n => n.min(self.config.history_page),
        }
    }

    /// The range of `conversation` the user may read: from its join to its
    /// removal or the last durable entry, whichever is first.
    fn visible(&mut self, user: &Arc<str>, conversation: &str) -> Result<(u64, u64), Reject> {
        let kind = ids::parse_conversation(conversation)
            .ok_or_else(|| Reject::new(ErrorCode::BadRequest, "malformed conversation id"))?;
        match self.store.membership(user, conversation)? {
            Some(m) => {
                let until = if m.left_seq > 0 { m.left_seq } else { u64::MAX };
                let until = self.durable_until(conversation, until);
                // Bounded by the newest entry too, so that the recent
                // entries can answer the read.
                let newest = match self.load(conversation)? {
                    true => self
                        .conversations
                        .get(conversation)
                        .map_or(0, |c| c.last_seq),
                    false => self.store.last_seq(conversation)?,
                };
                Ok((m.join_seq.max(1), until.min(newest)))
            }
            // A direct conversation with no message yet: empty, not refused.
            None if matches!(kind, IdKind::Direct(a, b) if *a == **user || *b == **user) => {
                Ok((1, 0))
            }
            None => Err(Reject::new(
                ErrorCode::NotMember,
                "not a member of this conversation",
            )),
        }
    }

    fn history(
        &mut self,
        device: &Device,
        request: u32,
        conversation: String,
        before_seq: u64,
        limit: u16,
    ) -> Result<ServerFrame, Reject> {
        let (first, last) = self.visible(&device.user, &conversation)?;
        let to = match before_seq {
            0 => last,
            before => last.min(before - 1),
        };
        let limit = self.page_limit(limit);
        let mut newest = self.entries(&conversation, first..=to, limit + 1, Order::Newest)?;
        let mut more = newest.len() > limit;
        newest.truncate(limit);
        let mut bytes_left = self.config.sync_page_bytes;
        let mut entries = Vec::with_capacity(newest.len());
        for (seq, entry) in newest {
            let Some(e) = entry else { continue };
            // The byte budget cuts the page short (the newest entry always
            // goes, so paging advances).
            if e.body.len() > bytes_left && !entries.is_empty() {
                more = true;
                break;
            }
            bytes_left = bytes_left.saturating_sub(e.body.len());
            let body = e.body_for(&device.user, device.device);
            entries.push(HistoryEntry {
                seq,
                server_id: e.server_id,
                timestamp_ms: e.timestamp_ms,
                kind: e.kind,
                sender: e.sender.to_string(),
                sender_device: e.sender_device,
                client_id: e.client_id,
                body,
            });
        }
        entries.reverse();
        Ok(ServerFrame::History {
            request,
            conversation,
            more,
            entries,
        })
    }

    fn chat_list(
        &mut self,
        device: &Device,
        request: u32,
        before_ms: u64,
        before_conversation: &str,
        limit: u16,
    ) -> Result<ServerFrame, Reject> {
        let user = device.user.clone();
        let mut chats = Vec::new();
        for (conversation, m) in self.store.memberships(&user)? {
            if m.left_seq > 0 || !self.load(&conversation)? {
                continue;
            }
            let Some(conv) = self.conversations.get(conversation.as_str()) else {
                continue;
            };
            let (last_ms, last_sender) = (conv.last_ms, conv.last_sender.to_string());
            let last_seq = self.durable_until(&conversation, conv.last_seq);
            let read_seq = self.user_cursor(&user, &conversation)?.read;
            let unread = last_seq.saturating_sub(read_seq.max(m.join_seq.saturating_sub(1)));
            chats.push(Chat {
                conversation,
                last_seq,
                last_ms,
                last_sender,
                read_seq,
                unread,
            });
        }
        chats.sort_unstable_by(|a, b| {
            b.last_ms
                .cmp(&a.last_ms)
                .then_with(|| a.conversation.cmp(&b.conversation))
        });
        if before_ms != 0 || !before_conversation.is_empty() {
            chats.retain(|c| {
                c.last_ms < before_ms
                    || (c.last_ms == before_ms && c.conversation.as_str() > before_conversation)
            });
        }
        let limit = self.page_limit(limit);
        let more = chats.len() > limit;
        chats.truncate(limit);
        Ok(ServerFrame::Chats {
            request,
            more,
            chats,
        })
    }

    fn receipt_summary(
        &mut self,
        device: &Device,
        request: u32,
        conversation: String,
        seq: u64,
    ) -> Result<ServerFrame, Reject> {
        let (first, last) = self.visible(&device.user, &conversation)?;
        if seq < first || seq > last {
            return Err(Reject::new(
                ErrorCode::UnknownConversation,
                "no such entry in this conversation",
            ));
        }
        let entry = self
            .entries(&conversation, seq..=seq, 1, Order::Oldest)?
            .into_iter()
            .next()
            .and_then(|(_, e)| e);
        match entry {
            Some(e) if e.sender == device.user => {}
            Some(_) => {
                return Err(Reject::new(
                    ErrorCode::NotMember,
                    "only the sender of a message sees who received it",
                ))
            }
            None => {
                return Err(Reject::new(
                    ErrorCode::UnknownConversation,
                    "no such entry in this conversation",
                ))
            }
        }
        if !self.load(&conversation)? {
            return Err(Reject::new(
                ErrorCode::UnknownConversation,
                "no such conversation",
            ));
        }
        let members = match self.conversations.get(conversation.as_str()) {
            Some(c) => c.members.clone(),
            None => {
                return Err(Reject::new(
                    ErrorCode::UnknownConversation,
                    "no such conversation",
                ))
            }
        };
        let asker_reads = self.read_receipts_on(&device.user)?;
        let (mut recipients, mut delivered, mut read) = (0u32, Vec::new(), Vec::new());
        for m in members
            .iter()
            .filter(|m| m.join_seq <= seq && m.user != device.user)
        {
            recipients += 1;
            let c = self.user_cursor(&m.user, &conversation)?;
            if c.delivered >= seq {
                delivered.push(m.user.to_string());
            }
            if asker_reads && c.read >= seq && self.read_receipts_on(&m.user)? {
                read.push(m.user.to_string());
            }
        }
        Ok(ServerFrame::ReceiptSummary {
            request,
            conversation,
            seq,
            recipients,
            delivered,
            read,
        })
    }

    // ----- catch-up -----

    pub(super) fn catch_up(&mut self, out: &mut Outbox, sync: SyncRequest, now_ms: u64) {
        match self.catch_up_page(out, &sync) {
            Ok(more) => {
                out.reply(sync.session, &ServerFrame::SyncDone { more });
                if !more {
                    self.set_live(&sync.device, sync.session, true);
                    self.synced(&sync.device, now_ms);
                }
            }
            Err(e) => {
                let r = Reject::from(e);
                out.reply(sync.session, &error_frame(r.code, 0, r.detail));
            }
        }
    }

    /// Plans every conversation of the user, newest first.
    fn plan_catch_up(&mut self, sync: &SyncRequest) -> Result<Vec<Plan>, StoreError> {
        let user = sync.device.user.clone();
        let listed: FxHashMap<&str, u64> = sync
            .cursors
            .iter()
            .map(|c| (c.conversation.as_str(), c.seq))
            .collect();
        let tail = u64::from(sync.tail);
        let mut plans = Vec::new();
        for (conversation, m) in self.store.memberships(&user)? {
            let held = match listed.get(conversation.as_str()) {
                Some(&seq) => seq,
                None => {
                    let key = store::cursor_key(&user, sync.device.device, &conversation);
                    self.cursor(&key, &user, sync.device.device, &conversation)?
                        .delivered
                }
            };
            let until = if m.left_seq > 0 { m.left_seq } else { u64::MAX };
            let until = self.durable_until(&conversation, until);
            let (last_seq, last_ms, peer) = match self.load(&conversation)? {
                true => match self.conversations.get(conversation.as_str()) {
                    Some(c) => {
                        let peer = (c.kind == ConversationKind::Direct)
                            .then(|| c.members.iter().find(|p| p.user != user))
                            .flatten()
                            .map(|p| p.user.clone());
                        (c.last_seq, c.last_ms, peer)
                    }
                    None => (0, 0, None),
                },
                false => (self.store.last_seq(&conversation)?, 0, None),
            };
            let last = last_seq.min(until);
            let mut from = held.max(m.join_seq.saturating_sub(1)) + 1;
            if tail > 0 && last >= tail {
                from = from.max(last + 1 - tail);
            }
            plans.push(Plan {
                conversation,
                held,
                from,
                last,
                last_ms,
                join_seq: m.join_seq,
                peer,
            });
        }
        plans.sort_by(|a, b| {
            b.last_ms
                .cmp(&a.last_ms)
                .then_with(|| a.conversation.cmp(&b.conversation))
        });
        Ok(plans)
    }

    /// The summary rows of a catch-up: with `summary`, every conversation
    /// with entries the device lacks or receipts it has not seen; always,
    /// every conversation whose tail leaves entries behind.
    fn summarise(
        &mut self,
        sync: &SyncRequest,
        plans: &[Plan],
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        if plans.is_empty() {
            // Nothing to sum up (in a fleet, a partition holding none of
            // the user's conversations): no reason to load the user.
            return Ok(Vec::new());
        }
        let user = sync.device.user.clone();
        let last_sync = self.last_sync_ms(&sync.device);
        let my_reads = self.read_receipts_on(&user)?;
        let mut rows = Vec::new();
        for p in plans {
            let behind = p.from > p.held.max(p.join_seq.saturating_sub(1)) + 1 && p.from <= p.last;
            let news = p.last > p.held;
            let peer_cursor = match &p.peer {
                Some(peer) => Some((peer.clone(), self.user_cursor(peer, &p.conversation)?)),
                None => None,
            };
            let receipts_news = peer_cursor
                .as_ref()
                .is_some_and(|(_, c)| c.updated_ms > last_sync);
            if !(behind || (sync.summary && (news || receipts_news))) {
                continue;
            }
            let read = self.user_cursor(&user, &p.conversation)?.read;
            let (peer_delivered, peer_read) = match peer_cursor {
                Some((peer, c)) => {
                    let reads = my_reads && self.read_receipts_on(&peer)?;
                    // A read the row shows counts as delivered: a peer's
                    // send moves only its read cursor (replying means
                    // having read), and delivered must not show less.
                    match reads {
                        true => (c.delivered.max(c.read), c.read),
                        false => (c.delivered, 0),
                    }
                }
                None => (0, 0),
            };
            rows.push(ConversationSummary {
                conversation: p.conversation.clone(),
                last_seq: p.last,
                delivered: p.held,
                read,
                unread: p
                    .last
                    .saturating_sub(read.max(p.join_seq.saturating_sub(1))),
                from_seq: p.from.min(p.last + 1),
                peer_delivered,
                peer_read,
            });
        }
        Ok(rows)
    }

    /// Streams up to one page of what the device is missing, newest
    /// conversations first; true when more remains.
    fn catch_up_page(&mut self, out: &mut Outbox, sync: &SyncRequest) -> Result<bool, StoreError> {
        let plans = self.plan_catch_up(sync)?;
        let rows = self.summarise(sync, &plans)?;
        for chunk in rows.chunks(SUMMARY_CHUNK) {
            out.reply(
                sync.session,
                &ServerFrame::SyncSummary {
                    conversations: chunk.to_vec(),
                },
            );
        }
        let mut budget = self.config.sync_page;
        let mut bytes_left = self.config.sync_page_bytes;
        for p in &plans {
            let after = p.from - 1;
            // `last` is `until` bounded by the conversation's newest entry:
            // the same entries, and a range the recent entries can answer.
            if budget == 0 {
                if self.has_entries(&p.conversation, after, p.last)? {
                    return Ok(true);
                }
                continue;
            }
            if after >= p.last {
                continue;
            }
            let range = after + 1..=p.last;
            let entries = self.entries(&p.conversation, range, budget, Order::Oldest)?;
            let mut last = after;
            let mut taken = 0;
            for (seq, entry) in &entries {
                // The byte budget ends the page early; the first entry of a
                // page always goes, so paging advances whatever its size.
                let size = entry.as_ref().map_or(0, |e| e.body.len());
                if size > bytes_left && (taken > 0 || budget < self.config.sync_page) {
                    budget = 0;
                    break;
                }
                // A corrupt entry (logged by the store) is skipped but
                // counts against the page, so paging always advances.
                if let Some(entry) = entry {
                    out.reply(
                        sync.session,
                        &message_frame_for(&p.conversation, *seq, entry, &sync.device),
                    );
                }
                bytes_left = bytes_left.saturating_sub(size);
                last = *seq;
                taken += 1;
            }
            budget = budget.saturating_sub(taken);
            if budget == 0 && self.has_entries(&p.conversation, last, p.last)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A conversation's entries: from the recent entries when they hold the
/// whole read, else from the store (the same answer either way).
impl RouterCore {
    /// At most `limit` entries in `range`, from the end `order` names. A
    /// read from the store that ends at the conversation's newest entry
    /// starts its run in the recent entries.
    fn entries(
        &mut self,
        conversation: &str,
        range: std::ops::RangeInclusive<u64>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<(u64, Option<StoredEntry>)>, StoreError> {
        let (from, to) = range.into_inner();
        if let Some(held) = self.recent.entries(conversation, from, to, limit, order) {
            self.metrics.entry_reads_memory.inc();
            return Ok(held);
        }
        self.metrics.entry_reads_store.inc();
        let read = match order {
            Order::Oldest => self.store.entries(conversation, from, to, limit)?,
            Order::Newest => self
                .store
                .entries_newest_first(conversation, from, to, limit)?,
        };
        // Only the newest entry the store has synced: an unsynced batch's
        // entries are in the recent ones already, and may yet be lost.
        if let Some(newest) = self.conversations.get(conversation).map(|c| c.last_seq) {
            if self.durable_until(conversation, newest) == newest {
                self.recent.fill(conversation, &read, newest);
            }
        }
        Ok(read)
    }

    /// Whether there is an entry in `after + 1..=to`.
    fn has_entries(&self, conversation: &str, after: u64, to: u64) -> Result<bool, StoreError> {
        match self.recent.has_entries(conversation, after, to) {
            Some(answer) => Ok(answer),
            None => self.store.has_entries(conversation, after, to),
        }
    }
}
