//! Client protocol v1: the frames inside WebSocket binary messages.
//!
//! Each binary message holds exactly one frame: a one-byte type, then the
//! type's fields in the order documented in `docs/protocol.md`. Integers are
//! little-endian and fixed width; a `str` is a `u16` byte length and UTF-8;
//! `bytes` is a `u32` length and raw bytes; a list is a `u16` count and its
//! items. Bytes left over after the last field are an error, so a frame
//! either means exactly one thing or is refused.
//!
//! Both directions decode and encode here: the gateway decodes
//! [`ClientFrame`]s and encodes [`ServerFrame`]s; a client (loadgen, tests)
//! does the reverse.

use bytes::{BufMut, Bytes};

mod e2ee;
mod push;

pub use e2ee::{
    prekey_signing_message, DeviceAddress, DeviceBundle, DeviceCiphertext, E2eeFrame, IdentityKeys,
    Incoming, Prekey, PrekeyKind, PublicKey, Signature, SignedPrekey,
};
pub use push::{PushProvider, MAX_TOKEN_BYTES as MAX_PUSH_TOKEN_BYTES};

/// What a frame type byte, a length or a field was wrong about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload was empty.
    #[error("empty frame")]
    Empty,
    /// The first byte names no frame of this direction.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A field ran past the end of the payload.
    #[error("frame truncated in field `{0}`")]
    Truncated(&'static str),
    /// A string field was not UTF-8.
    #[error("field `{0}` is not UTF-8")]
    NotUtf8(&'static str),
    /// A field held a value outside its range.
    #[error("field `{0}` is out of range")]
    OutOfRange(&'static str),
    /// Bytes remained after the last field.
    #[error("{0} unexpected bytes after the last field")]
    Trailing(usize),
}

/// A (conversation, sequence) pair: a cursor in catch-up, or a receipt's
/// "up to" point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The conversation.
    pub conversation: String,
    /// The highest sequence held (0: nothing yet).
    pub seq: u64,
}

/// A frame a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// Send a message. `client_id` makes it idempotent: a retry with the same
    /// id gets the original `Sent` back and is not stored twice.
    Send {
        conversation: String,
        client_id: u64,
        body: Bytes,
    },
    /// This device holds every message of `conversation` up to `seq`.
    Delivered { conversation: String, seq: u64 },
    /// The user has read `conversation` up to `seq`.
    Read { conversation: String, seq: u64 },
    /// Catch-up: the highest sequence this device holds per conversation.
    /// Conversations not listed resume from the device's stored cursor.
    /// `tail` caps what is streamed per conversation to its newest `tail`
    /// entries (0: everything missing); `summary` asks for a
    /// [`ServerFrame::SyncSummary`] first.
    Sync {
        tail: u16,
        summary: bool,
        cursors: Vec<Cursor>,
    },
    /// Create a group with the sender and `members`.
    GroupCreate { request: u32, members: Vec<String> },
    /// Add `members` to a group the sender belongs to.
    GroupAdd {
        request: u32,
        conversation: String,
        members: Vec<String>,
    },
    /// Remove `members` (the sender may name itself to leave).
    GroupRemove {
        request: u32,
        conversation: String,
        members: Vec<String>,
    },
    /// List a group's members.
    GroupMembers { request: u32, conversation: String },
    /// Application-level heartbeat; answered with `Pong`.
    Ping { nonce: u64 },
    /// Replace the session's token before it expires; answered with `Done`.
    Refresh { request: u32, token: String },
    /// Up to `limit` entries of `conversation` before `before_seq` (0: the
    /// newest), answered with [`ServerFrame::History`].
    History {
        request: u32,
        conversation: String,
        before_seq: u64,
        limit: u16,
    },
    /// A page of the user's conversations, most recent first, starting after
    /// (`before_ms`, `before_conversation`) (0 and "" for the first page);
    /// answered with [`ServerFrame::Chats`].
    ChatList {
        request: u32,
        before_ms: u64,
        before_conversation: String,
        limit: u16,
    },
    /// Who of a group has delivered and read entry `seq` (the asker's own
    /// message); answered with [`ServerFrame::ReceiptSummary`].
    ReceiptQuery {
        request: u32,
        conversation: String,
        seq: u64,
    },
    /// The user started (`active`) or stopped typing in `conversation`.
    Typing { conversation: String, active: bool },
    /// The presence of `users`, answered with [`ServerFrame::Presence`].
    PresenceQuery { request: u32, users: Vec<String> },
    /// Replaces the session's presence subscriptions with `users` (empty:
    /// none); answered with their presence now, then pushed on changes.
    PresenceSubscribe { request: u32, users: Vec<String> },
    /// Sets the user's privacy settings named by `mask` to `flags` (see
    /// [`settings`]); a mask of 0 only reads them. Answered with
    /// [`ServerFrame::Settings`].
    Settings { request: u32, mask: u8, flags: u8 },
    /// Lists the user's linked devices.
    DeviceList { request: u32 },
    /// Unlinks one of the user's devices: its sessions are closed and its
    /// tokens issued until now are refused.
    DeviceRemove { request: u32, device: u32 },
    /// Publishes this device's keys: its identity, a signed prekey, a
    /// signed last-resort prekey (both replace earlier ones) and one-time
    /// prekeys (added to its stock). Answered with
    /// [`E2eeFrame::KeyCount`].
    KeysUpload {
        request: u32,
        identity: IdentityKeys,
        signed_prekey: Prekey,
        signed_prekey_signature: Signature,
        last_resort: Prekey,
        last_resort_signature: Signature,
        one_time: Vec<Prekey>,
    },
    /// The key bundles of `user`'s devices; takes one one-time prekey of
    /// each. Answered with [`E2eeFrame::Bundle`].
    BundleFetch { request: u32, user: String },
    /// Send a message encrypted once per recipient device (the sender's
    /// other devices included): each device receives only its own body.
    /// Answered like `Send`, or with [`E2eeFrame::DeviceMismatch`] and
    /// `Error` 409 when the devices named are not the recipients'.
    SendPerDevice {
        conversation: String,
        client_id: u64,
        ciphertexts: Vec<DeviceCiphertext>,
    },
    /// Leaves an encrypted history archive for the user's newly linked
    /// `device`; answered with `Done`.
    ArchiveUpload {
        request: u32,
        device: u32,
        archive: Bytes,
    },
    /// Fetches the archive left for this device; answered with
    /// [`E2eeFrame::Archive`] or `Error` 404.
    ArchiveFetch { request: u32 },
    /// How many one-time prekeys this device has left; answered with
    /// [`E2eeFrame::KeyCount`].
    KeyCount { request: u32 },
    /// Registers (or replaces) this device's push token: while the device
    /// has no live session, messages waiting for it wake it through
    /// `provider`. With `ciphertext` the notification also carries the
    /// message's opaque body, so the app can show it without connecting.
    /// Answered with `Done`.
    PushRegister {
        request: u32,
        provider: PushProvider,
        token: String,
        ciphertext: bool,
    },
    /// Removes this device's push token; answered with `Done`.
    PushUnregister { request: u32 },
}

/// The bits of a user's privacy settings.
pub mod settings {
    /// The user neither sends nor receives READ receipts.
    pub const READ_RECEIPTS_OFF: u8 = 0b01;
    /// Others see the user's online state but not its last-seen time.
    pub const HIDE_LAST_SEEN: u8 = 0b10;
    /// Every defined bit.
    pub const ALL: u8 = READ_RECEIPTS_OFF | HIDE_LAST_SEEN;
}

/// One entry of a history page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub seq: u64,
    pub server_id: u64,
    pub timestamp_ms: u64,
    pub kind: EntryKind,
    pub sender: String,
    pub sender_device: u32,
    pub client_id: u64,
    pub body: Bytes,
}

/// One conversation of the chat list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chat {
    pub conversation: String,
    /// The conversation's newest entry, its time and who made it.
    pub last_seq: u64,
    pub last_ms: u64,
    pub last_sender: String,
    /// The user's read cursor (shared by all its devices).
    pub read_seq: u64,
    /// Entries after `read_seq` (the user's own messages mark what is
    /// before them read).
    pub unread: u64,
}

/// One conversation of a catch-up summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conversation: String,
    pub last_seq: u64,
    /// This device's delivered cursor before this catch-up, and the user's
    /// read cursor.
    pub delivered: u64,
    pub read: u64,
    pub unread: u64,
    /// The first sequence this catch-up streams; entries after `delivered`
    /// and before it were left behind (fetch them with `History`).
    pub from_seq: u64,
    /// In a direct conversation, how far the other participant has
    /// delivered and read (0 in groups; read is 0 when either side has read
    /// receipts off).
    pub peer_delivered: u64,
    pub peer_read: u64,
}

/// One user's presence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEntry {
    pub user: String,
    pub online: bool,
    /// When the user was last seen (0: hidden by the user, or never seen).
    pub last_seen_ms: u64,
}

/// One linked device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: u32,
    pub linked_ms: u64,
    pub last_seen_ms: u64,
    pub online: bool,
}

/// What a sequenced conversation entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryKind {
    /// A user's message; the body is the sender's opaque bytes.
    Message = 0,
    /// Members were added (a group's creation is its first such entry); the
    /// body is a member list encoded as in [`encode_members`].
    MembersAdded = 1,
    /// Members were removed or left; body as for `MembersAdded`.
    MembersRemoved = 2,
}

impl EntryKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Message,
            1 => Self::MembersAdded,
            2 => Self::MembersRemoved,
            _ => return None,
        })
    }
}

/// Which receipt a `Receipt` frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReceiptKind {
    /// The device holds the message.
    Delivered = 1,
    /// The user read it.
    Read = 2,
}

/// A frame the gateway sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    /// First frame of every session: who the token says you are, and limits.
    Welcome {
        user: String,
        device: u32,
        server_time_ms: u64,
        max_body: u32,
        idle_timeout_s: u32,
    },
    /// The message with this client id is durable and has this place in its
    /// conversation.
    Sent {
        client_id: u64,
        conversation: String,
        seq: u64,
        server_id: u64,
        timestamp_ms: u64,
    },
    /// A sequenced conversation entry (a message or a membership change).
    Message {
        conversation: String,
        seq: u64,
        server_id: u64,
        timestamp_ms: u64,
        kind: EntryKind,
        sender: String,
        sender_device: u32,
        client_id: u64,
        body: Bytes,
    },
    /// `user`'s `device` has delivered or read `conversation` up to `seq`.
    Receipt {
        conversation: String,
        seq: u64,
        user: String,
        device: u32,
        kind: ReceiptKind,
    },
    /// The end of one catch-up page. With `more`, send `Sync` again with the
    /// cursors advanced by what arrived; live messages start after the last
    /// page (`more == false`).
    SyncDone { more: bool },
    /// The group was created as `conversation`; its creation is entry `seq`.
    GroupCreated {
        request: u32,
        conversation: String,
        seq: u64,
    },
    /// The members of `conversation`.
    Members {
        request: u32,
        conversation: String,
        members: Vec<String>,
    },
    /// The request succeeded.
    Done { request: u32 },
    /// Answer to `Ping`.
    Pong { nonce: u64 },
    /// The request named by `reference` (a client id or request id) failed.
    Error {
        code: u16,
        reference: u64,
        detail: String,
    },
    /// A page of a conversation's history, oldest first; `more` when older
    /// entries remain.
    History {
        request: u32,
        conversation: String,
        more: bool,
        entries: Vec<HistoryEntry>,
    },
    /// A page of the chat list, most recent first; `more` when older
    /// conversations remain.
    Chats {
        request: u32,
        more: bool,
        chats: Vec<Chat>,
    },
    /// Of the `recipients` members an entry was for, who has delivered it
    /// and who has read it.
    ReceiptSummary {
        request: u32,
        conversation: String,
        seq: u64,
        recipients: u32,
        delivered: Vec<String>,
        read: Vec<String>,
    },
    /// `user` is typing in `conversation` (for at most `ttl_ms` unless told
    /// again), or stopped.
    Typing {
        conversation: String,
        user: String,
        device: u32,
        active: bool,
        ttl_ms: u32,
    },
    /// Presence: the answer to a query or subscription (`request`), or a
    /// change pushed to a subscriber (`request == 0`).
    Presence {
        request: u32,
        entries: Vec<PresenceEntry>,
    },
    /// The user's privacy settings (answer, or pushed to its other devices
    /// with `request == 0` when one changed them).
    Settings { request: u32, flags: u8 },
    /// The user's linked devices.
    Devices {
        request: u32,
        devices: Vec<DeviceInfo>,
    },
    /// The start of a catch-up: per conversation with news, where it
    /// stands.
    SyncSummary {
        conversations: Vec<ConversationSummary>,
    },
}

/// The type byte that starts each frame's payload (docs/protocol.md).
pub mod ty {
    pub const SEND: u8 = 0x01;
    pub const DELIVERED: u8 = 0x02;
    pub const READ: u8 = 0x03;
    pub const SYNC: u8 = 0x04;
    pub const GROUP_CREATE: u8 = 0x05;
    pub const GROUP_ADD: u8 = 0x06;
    pub const GROUP_REMOVE: u8 = 0x07;
    pub const GROUP_MEMBERS: u8 = 0x08;
    pub const PING: u8 = 0x09;
    pub const REFRESH: u8 = 0x0a;
    pub const HISTORY: u8 = 0x0b;
    pub const CHAT_LIST: u8 = 0x0c;
    pub const RECEIPT_QUERY: u8 = 0x0d;
    pub const TYPING: u8 = 0x0e;
    pub const PRESENCE_QUERY: u8 = 0x0f;
    pub const PRESENCE_SUBSCRIBE: u8 = 0x10;
    pub const SETTINGS: u8 = 0x11;
    pub const DEVICE_LIST: u8 = 0x12;
    pub const DEVICE_REMOVE: u8 = 0x13;

    pub const WELCOME: u8 = 0x40;
    pub const SENT: u8 = 0x41;
    pub const MESSAGE: u8 = 0x42;
    pub const RECEIPT: u8 = 0x43;
    pub const SYNC_DONE: u8 = 0x44;
    pub const GROUP_CREATED: u8 = 0x45;
    pub const MEMBERS: u8 = 0x46;
    pub const DONE: u8 = 0x47;
    pub const PONG: u8 = 0x48;
    pub const ERROR: u8 = 0x49;
    pub const HISTORY_PAGE: u8 = 0x4a;
    pub const CHATS: u8 = 0x4b;
    pub const RECEIPT_SUMMARY: u8 = 0x4c;
    pub const TYPING_EVENT: u8 = 0x4d;
    pub const PRESENCE: u8 = 0x4e;
    pub const SETTINGS_STATE: u8 = 0x4f;
    pub const DEVICES: u8 = 0x50;
    pub const SYNC_SUMMARY: u8 = 0x51;
}

impl ClientFrame {
    /// Decodes one frame from a binary message's payload. The body of a
    /// `Send` shares `payload`'s memory.
    pub fn decode(payload: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let frame = match r.u8("type").map_err(|_| DecodeError::Empty)? {
            ty::SEND => Self::Send {
                conversation: r.str("conversation")?,
                client_id: r.u64("client_id")?,
                body: r.bytes("body")?,
            },
            ty::DELIVERED => Self::Delivered {
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
            },
            ty::READ => Self::Read {
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
            },
            ty::SYNC => {
                let tail = r.u16("tail")?;
                let summary = r.bool("summary")?;
                let n = r.u16("cursors")?;
                let mut cursors = Vec::with_capacity(usize::from(n).min(1024));
                for _ in 0..n {
                    cursors.push(Cursor {
                        conversation: r.str("conversation")?,
                        seq: r.u64("seq")?,
                    });
                }
                Self::Sync {
                    tail,
                    summary,
                    cursors,
                }
            }
            ty::GROUP_CREATE => Self::GroupCreate {
                request: r.u32("request")?,
                members: r.str_list("members")?,
            },
            ty::GROUP_ADD => Self::GroupAdd {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                members: r.str_list("members")?,
            },
            ty::GROUP_REMOVE => Self::GroupRemove {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                members: r.str_list("members")?,
            },
            ty::GROUP_MEMBERS => Self::GroupMembers {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
            },
            ty::PING => Self::Ping {
                nonce: r.u64("nonce")?,
            },
            ty::REFRESH => Self::Refresh {
                request: r.u32("request")?,
                token: r.str("token")?,
            },
            ty::HISTORY => Self::History {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                before_seq: r.u64("before_seq")?,
                limit: r.u16("limit")?,
            },
            ty::CHAT_LIST => Self::ChatList {
                request: r.u32("request")?,
                before_ms: r.u64("before_ms")?,
                before_conversation: r.str("before_conversation")?,
                limit: r.u16("limit")?,
            },
            ty::RECEIPT_QUERY => Self::ReceiptQuery {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
            },
            ty::TYPING => Self::Typing {
                conversation: r.str("conversation")?,
                active: r.bool("active")?,
            },
            ty::PRESENCE_QUERY => Self::PresenceQuery {
                request: r.u32("request")?,
                users: r.str_list("users")?,
            },
            ty::PRESENCE_SUBSCRIBE => Self::PresenceSubscribe {
                request: r.u32("request")?,
                users: r.str_list("users")?,
            },
            ty::SETTINGS => Self::Settings {
                request: r.u32("request")?,
                mask: r.u8("mask")?,
                flags: r.u8("flags")?,
            },
            ty::DEVICE_LIST => Self::DeviceList {
                request: r.u32("request")?,
            },
            ty::DEVICE_REMOVE => Self::DeviceRemove {
                request: r.u32("request")?,
                device: r.u32("device")?,
            },
            e2ee::ty::KEYS_UPLOAD => Self::KeysUpload {
                request: r.u32("request")?,
                identity: e2ee::read_identity(&mut r)?,
                signed_prekey: e2ee::read_prekey(&mut r, "signed_prekey")?,
                signed_prekey_signature: r.array("signed_prekey_signature")?,
                last_resort: e2ee::read_prekey(&mut r, "last_resort")?,
                last_resort_signature: r.array("last_resort_signature")?,
                one_time: r.list("one_time", |r| e2ee::read_prekey(r, "one_time"))?,
            },
            e2ee::ty::BUNDLE_FETCH => Self::BundleFetch {
                request: r.u32("request")?,
                user: r.str("user")?,
            },
            e2ee::ty::SEND_PER_DEVICE => Self::SendPerDevice {
                conversation: r.str("conversation")?,
                client_id: r.u64("client_id")?,
                ciphertexts: r.list("ciphertexts", e2ee::read_ciphertext)?,
            },
            e2ee::ty::ARCHIVE_UPLOAD => Self::ArchiveUpload {
                request: r.u32("request")?,
                device: r.u32("device")?,
                archive: r.bytes("archive")?,
            },
            e2ee::ty::ARCHIVE_FETCH => Self::ArchiveFetch {
                request: r.u32("request")?,
            },
            e2ee::ty::KEY_COUNT_QUERY => Self::KeyCount {
                request: r.u32("request")?,
            },
            push::ty::PUSH_REGISTER => Self::PushRegister {
                request: r.u32("request")?,
                provider: PushProvider::from_u8(r.u8("provider")?)
                    .ok_or(DecodeError::OutOfRange("provider"))?,
                token: r.str("token")?,
                ciphertext: r.bool("ciphertext")?,
            },
            push::ty::PUSH_UNREGISTER => Self::PushUnregister {
                request: r.u32("request")?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }

    /// Appends the frame's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let w = out;
        match self {
            Self::Send {
                conversation,
                client_id,
                body,
            } => {
                w.put_u8(ty::SEND);
                put_str(w, conversation);
                w.put_u64_le(*client_id);
                put_bytes(w, body);
            }
            Self::Delivered { conversation, seq } => {
                w.put_u8(ty::DELIVERED);
                put_str(w, conversation);
                w.put_u64_le(*seq);
            }
            Self::Read { conversation, seq } => {
                w.put_u8(ty::READ);
                put_str(w, conversation);
                w.put_u64_le(*seq);
            }
            Self::Sync {
                tail,
                summary,
                cursors,
            } => {
                w.put_u8(ty::SYNC);
                w.put_u16_le(*tail);
                w.put_u8(u8::from(*summary));
                w.put_u16_le(cursors.len() as u16);
                for c in cursors {
                    put_str(w, &c.conversation);
                    w.put_u64_le(c.seq);
                }
            }
            Self::GroupCreate { request, members } => {
                w.put_u8(ty::GROUP_CREATE);
                w.put_u32_le(*request);
                put_str_list(w, members);
            }
            Self::GroupAdd {
                request,
                conversation,
                members,
            } => {
                w.put_u8(ty::GROUP_ADD);
                w.put_u32_le(*request);
                put_str(w, conversation);
                put_str_list(w, members);
            }
            Self::GroupRemove {
                request,
                conversation,
                members,
            } => {
                w.put_u8(ty::GROUP_REMOVE);
                w.put_u32_le(*request);
                put_str(w, conversation);
                put_str_list(w, members);
            }
            Self::GroupMembers {
                request,
                conversation,
            } => {
                w.put_u8(ty::GROUP_MEMBERS);
                w.put_u32_le(*request);
                put_str(w, conversation);
            }
            Self::Ping { nonce } => {
                w.put_u8(ty::PING);
                w.put_u64_le(*nonce);
            }
            Self::Refresh { request, token } => {
                w.put_u8(ty::REFRESH);
                w.put_u32_le(*request);
                put_str(w, token);
            }
            Self::History {
                request,
                conversation,
                before_seq,
                limit,
            } => {
                w.put_u8(ty::HISTORY);
                w.put_u32_le(*request);
                put_str(w, conversation);
                w.put_u64_le(*before_seq);
                w.put_u16_le(*limit);
            }
            Self::ChatList {
                request,
                before_ms,
                before_conversation,
                limit,
            } => {
                w.put_u8(ty::CHAT_LIST);
                w.put_u32_le(*request);
                w.put_u64_le(*before_ms);
                put_str(w, before_conversation);
                w.put_u16_le(*limit);
            }
            Self::ReceiptQuery {
                request,
                conversation,
                seq,
            } => {
                w.put_u8(ty::RECEIPT_QUERY);
                w.put_u32_le(*request);
                put_str(w, conversation);
                w.put_u64_le(*seq);
            }
            Self::Typing {
                conversation,
                active,
            } => {
                w.put_u8(ty::TYPING);
                put_str(w, conversation);
                w.put_u8(u8::from(*active));
            }
            Self::PresenceQuery { request, users } => {
                w.put_u8(ty::PRESENCE_QUERY);
                w.put_u32_le(*request);
                put_str_list(w, users);
            }
            Self::PresenceSubscribe { request, users } => {
                w.put_u8(ty::PRESENCE_SUBSCRIBE);
                w.put_u32_le(*request);
                put_str_list(w, users);
            }
            Self::Settings {
                request,
                mask,
                flags,
            } => {
                w.put_u8(ty::SETTINGS);
                w.put_u32_le(*request);
                w.put_u8(*mask);
                w.put_u8(*flags);
            }
            Self::DeviceList { request } => {
                w.put_u8(ty::DEVICE_LIST);
                w.put_u32_le(*request);
            }
            Self::DeviceRemove { request, device } => {
                w.put_u8(ty::DEVICE_REMOVE);
                w.put_u32_le(*request);
                w.put_u32_le(*device);
            }
            Self::KeysUpload {
                request,
                identity,
                signed_prekey,
                signed_prekey_signature,
                last_resort,
                last_resort_signature,
                one_time,
            } => {
                w.put_u8(e2ee::ty::KEYS_UPLOAD);
                w.put_u32_le(*request);
                e2ee::put_identity(w, identity);
                e2ee::put_prekey(w, signed_prekey);
                w.extend_from_slice(signed_prekey_signature);
                e2ee::put_prekey(w, last_resort);
                w.extend_from_slice(last_resort_signature);
                w.put_u16_le(one_time.len() as u16);
                for p in one_time {
                    e2ee::put_prekey(w, p);
                }
            }
            Self::BundleFetch { request, user } => {
                w.put_u8(e2ee::ty::BUNDLE_FETCH);
                w.put_u32_le(*request);
                put_str(w, user);
            }
            Self::SendPerDevice {
                conversation,
                client_id,
                ciphertexts,
            } => {
                w.put_u8(e2ee::ty::SEND_PER_DEVICE);
                put_str(w, conversation);
                w.put_u64_le(*client_id);
                w.put_u16_le(ciphertexts.len() as u16);
                for c in ciphertexts {
                    put_str(w, &c.user);
                    w.put_u32_le(c.device);
                    put_bytes(w, &c.body);
                }
            }
            Self::ArchiveUpload {
                request,
                device,
                archive,
            } => {
                w.put_u8(e2ee::ty::ARCHIVE_UPLOAD);
                w.put_u32_le(*request);
                w.put_u32_le(*device);
                put_bytes(w, archive);
            }
            Self::ArchiveFetch { request } => {
                w.put_u8(e2ee::ty::ARCHIVE_FETCH);
                w.put_u32_le(*request);
            }
            Self::KeyCount { request } => {
                w.put_u8(e2ee::ty::KEY_COUNT_QUERY);
                w.put_u32_le(*request);
            }
            Self::PushRegister {
                request,
                provider,
                token,
                ciphertext,
            } => {
                w.put_u8(push::ty::PUSH_REGISTER);
                w.put_u32_le(*request);
                w.put_u8(*provider as u8);
                put_str(w, token);
                w.put_u8(u8::from(*ciphertext));
            }
            Self::PushUnregister { request } => {
                w.put_u8(push::ty::PUSH_UNREGISTER);
                w.put_u32_le(*request);
            }
        }
    }

    /// The frame type's name, for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Send { .. } => "send",
            Self::Delivered { .. } => "delivered",
            Self::Read { .. } => "read",
            Self::Sync { .. } => "sync",
            Self::GroupCreate { .. } => "group_create",
            Self::GroupAdd { .. } => "group_add",
            Self::GroupRemove { .. } => "group_remove",
            Self::GroupMembers { .. } => "group_members",
            Self::Ping { .. } => "ping",
            Self::Refresh { .. } => "refresh",
            Self::History { .. } => "history",
            Self::ChatList { .. } => "chat_list",
            Self::ReceiptQuery { .. } => "receipt_query",
            Self::Typing { .. } => "typing",
            Self::PresenceQuery { .. } => "presence_query",
            Self::PresenceSubscribe { .. } => "presence_subscribe",
            Self::Settings { .. } => "settings",
            Self::DeviceList { .. } => "device_list",
            Self::DeviceRemove { .. } => "device_remove",
            Self::KeysUpload { .. } => "keys_upload",
            Self::BundleFetch { .. } => "bundle_fetch",
            Self::SendPerDevice { .. } => "send_per_device",
            Self::ArchiveUpload { .. } => "archive_upload",
            Self::ArchiveFetch { .. } => "archive_fetch",
            Self::KeyCount { .. } => "key_count",
            Self::PushRegister { .. } => "push_register",
            Self::PushUnregister { .. } => "push_unregister",
        }
    }
}

impl ServerFrame {
    /// Decodes one frame from a binary message's payload (the client side).
    pub fn decode(payload: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let frame = match r.u8("type").map_err(|_| DecodeError::Empty)? {
            ty::WELCOME => Self::Welcome {
                user: r.str("user")?,
                device: r.u32("device")?,
                server_time_ms: r.u64("server_time_ms")?,
                max_body: r.u32("max_body")?,
                idle_timeout_s: r.u32("idle_timeout_s")?,
            },
            ty::SENT => Self::Sent {
                client_id: r.u64("client_id")?,
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
                server_id: r.u64("server_id")?,
                timestamp_ms: r.u64("timestamp_ms")?,
            },
            ty::MESSAGE => Self::Message {
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
                server_id: r.u64("server_id")?,
                timestamp_ms: r.u64("timestamp_ms")?,
                kind: EntryKind::from_u8(r.u8("kind")?).ok_or(DecodeError::OutOfRange("kind"))?,
                sender: r.str("sender")?,
                sender_device: r.u32("sender_device")?,
                client_id: r.u64("client_id")?,
                body: r.bytes("body")?,
            },
            ty::RECEIPT => Self::Receipt {
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
                user: r.str("user")?,
                device: r.u32("device")?,
                kind: match r.u8("kind")? {
                    1 => ReceiptKind::Delivered,
                    2 => ReceiptKind::Read,
                    _ => return Err(DecodeError::OutOfRange("kind")),
                },
            },
            ty::SYNC_DONE => Self::SyncDone {
                more: r.bool("more")?,
            },
            ty::GROUP_CREATED => Self::GroupCreated {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
            },
            ty::MEMBERS => Self::Members {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                members: r.str_list("members")?,
            },
            ty::DONE => Self::Done {
                request: r.u32("request")?,
            },
            ty::PONG => Self::Pong {
                nonce: r.u64("nonce")?,
            },
            ty::ERROR => Self::Error {
                code: r.u16("code")?,
                reference: r.u64("reference")?,
                detail: r.str("detail")?,
            },
            ty::HISTORY_PAGE => Self::History {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                more: r.bool("more")?,
                entries: r.list("entries", |r| {
                    Ok(HistoryEntry {
                        seq: r.u64("seq")?,
                        server_id: r.u64("server_id")?,
                        timestamp_ms: r.u64("timestamp_ms")?,
                        kind: EntryKind::from_u8(r.u8("kind")?)
                            .ok_or(DecodeError::OutOfRange("kind"))?,
                        sender: r.str("sender")?,
                        sender_device: r.u32("sender_device")?,
                        client_id: r.u64("client_id")?,
                        body: r.bytes("body")?,
                    })
                })?,
            },
            ty::CHATS => Self::Chats {
                request: r.u32("request")?,
                more: r.bool("more")?,
                chats: r.list("chats", |r| {
                    Ok(Chat {
                        conversation: r.str("conversation")?,
                        last_seq: r.u64("last_seq")?,
                        last_ms: r.u64("last_ms")?,
                        last_sender: r.str("last_sender")?,
                        read_seq: r.u64("read_seq")?,
                        unread: r.u64("unread")?,
                    })
                })?,
            },
            ty::RECEIPT_SUMMARY => Self::ReceiptSummary {
                request: r.u32("request")?,
                conversation: r.str("conversation")?,
                seq: r.u64("seq")?,
                recipients: r.u32("recipients")?,
                delivered: r.str_list("delivered")?,
                read: r.str_list("read")?,
            },
            ty::TYPING_EVENT => Self::Typing {
                conversation: r.str("conversation")?,
                user: r.str("user")?,
                device: r.u32("device")?,
                active: r.bool("active")?,
                ttl_ms: r.u32("ttl_ms")?,
            },
            ty::PRESENCE => Self::Presence {
                request: r.u32("request")?,
                entries: r.list("entries", |r| {
                    Ok(PresenceEntry {
                        user: r.str("user")?,
                        online: r.bool("online")?,
                        last_seen_ms: r.u64("last_seen_ms")?,
                    })
                })?,
            },
            ty::SETTINGS_STATE => Self::Settings {
                request: r.u32("request")?,
                flags: r.u8("flags")?,
            },
            ty::DEVICES => Self::Devices {
                request: r.u32("request")?,
                devices: r.list("devices", |r| {
                    Ok(DeviceInfo {
                        device: r.u32("device")?,
                        linked_ms: r.u64("linked_ms")?,
                        last_seen_ms: r.u64("last_seen_ms")?,
                        online: r.bool("online")?,
                    })
                })?,
            },
            ty::SYNC_SUMMARY => Self::SyncSummary {
                conversations: r.list("conversations", |r| {
                    Ok(ConversationSummary {
                        conversation: r.str("conversation")?,
                        last_seq: r.u64("last_seq")?,
                        delivered: r.u64("delivered")?,
                        read: r.u64("read")?,
                        unread: r.u64("unread")?,
                        from_seq: r.u64("from_seq")?,
                        peer_delivered: r.u64("peer_delivered")?,
                        peer_read: r.u64("peer_read")?,
                    })
                })?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }

    /// Appends the frame's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let w = out;
        match self {
            Self::Welcome {
                user,
                device,
                server_time_ms,
                max_body,
                idle_timeout_s,
            } => {
                w.put_u8(ty::WELCOME);
                put_str(w, user);
                w.put_u32_le(*device);
                w.put_u64_le(*server_time_ms);
                w.put_u32_le(*max_body);
                w.put_u32_le(*idle_timeout_s);
            }
            Self::Sent {
                client_id,
                conversation,
                seq,
                server_id,
                timestamp_ms,
            } => {
                w.put_u8(ty::SENT);
                w.put_u64_le(*client_id);
                put_str(w, conversation);
                w.put_u64_le(*seq);
                w.put_u64_le(*server_id);
                w.put_u64_le(*timestamp_ms);
            }
            Self::Message {
                conversation,
                seq,
                server_id,
                timestamp_ms,
                kind,
                sender,
                sender_device,
                client_id,
                body,
            } => {
                w.put_u8(ty::MESSAGE);
                put_str(w, conversation);
                w.put_u64_le(*seq);
                w.put_u64_le(*server_id);
                w.put_u64_le(*timestamp_ms);
                w.put_u8(*kind as u8);
                put_str(w, sender);
                w.put_u32_le(*sender_device);
                w.put_u64_le(*client_id);
                put_bytes(w, body);
            }
            Self::Receipt {
                conversation,
                seq,
                user,
                device,
                kind,
            } => {
                w.put_u8(ty::RECEIPT);
                put_str(w, conversation);
                w.put_u64_le(*seq);
                put_str(w, user);
                w.put_u32_le(*device);
                w.put_u8(*kind as u8);
            }
            Self::SyncDone { more } => {
                w.put_u8(ty::SYNC_DONE);
                w.put_u8(u8::from(*more));
            }
            Self::GroupCreated {
                request,
                conversation,
                seq,
            } => {
                w.put_u8(ty::GROUP_CREATED);
                w.put_u32_le(*request);
                put_str(w, conversation);
                w.put_u64_le(*seq);
            }
            Self::Members {
                request,
                conversation,
                members,
            } => {
                w.put_u8(ty::MEMBERS);
                w.put_u32_le(*request);
                put_str(w, conversation);
                put_str_list(w, members);
            }
            Self::Done { request } => {
                w.put_u8(ty::DONE);
                w.put_u32_le(*request);
            }
            Self::Pong { nonce } => {
                w.put_u8(ty::PONG);
                w.put_u64_le(*nonce);
            }
            Self::Error {
                code,
                reference,
                detail,
            } => {
                w.put_u8(ty::ERROR);
                w.put_u16_le(*code);
                w.put_u64_le(*reference);
                put_str(w, detail);
            }
            Self::History {
                request,
                conversation,
                more,
                entries,
            } => {
                w.put_u8(ty::HISTORY_PAGE);
                w.put_u32_le(*request);
                put_str(w, conversation);
                w.put_u8(u8::from(*more));
                w.put_u16_le(entries.len() as u16);
                for e in entries {
                    w.put_u64_le(e.seq);
                    w.put_u64_le(e.server_id);
                    w.put_u64_le(e.timestamp_ms);
                    w.put_u8(e.kind as u8);
                    put_str(w, &e.sender);
                    w.put_u32_le(e.sender_device);
                    w.put_u64_le(e.client_id);
                    put_bytes(w, &e.body);
                }
            }
            Self::Chats {
                request,
                more,
                chats,
            } => {
                w.put_u8(ty::CHATS);
                w.put_u32_le(*request);
                w.put_u8(u8::from(*more));
                w.put_u16_le(chats.len() as u16);
                for c in chats {
                    put_str(w, &c.conversation);
                    w.put_u64_le(c.last_seq);
                    w.put_u64_le(c.last_ms);
                    put_str(w, &c.last_sender);
                    w.put_u64_le(c.read_seq);
                    w.put_u64_le(c.unread);
                }
            }
            Self::ReceiptSummary {
                request,
                conversation,
                seq,
                recipients,
                delivered,
                read,
            } => {
                w.put_u8(ty::RECEIPT_SUMMARY);
                w.put_u32_le(*request);
                put_str(w, conversation);
                w.put_u64_le(*seq);
                w.put_u32_le(*recipients);
                put_str_list(w, delivered);
                put_str_list(w, read);
            }
            Self::Typing {
                conversation,
                user,
                device,
                active,
                ttl_ms,
            } => {
                w.put_u8(ty::TYPING_EVENT);
                put_str(w, conversation);
                put_str(w, user);
                w.put_u32_le(*device);
                w.put_u8(u8::from(*active));
                w.put_u32_le(*ttl_ms);
            }
            Self::Presence { request, entries } => {
                w.put_u8(ty::PRESENCE);
                w.put_u32_le(*request);
                w.put_u16_le(entries.len() as u16);
                for e in entries {
                    put_str(w, &e.user);
                    w.put_u8(u8::from(e.online));
                    w.put_u64_le(e.last_seen_ms);
                }
            }
            Self::Settings { request, flags } => {
                w.put_u8(ty::SETTINGS_STATE);
                w.put_u32_le(*request);
                w.put_u8(*flags);
            }
            Self::Devices { request, devices } => {
                w.put_u8(ty::DEVICES);
                w.put_u32_le(*request);
                w.put_u16_le(devices.len() as u16);
                for d in devices {
                    w.put_u32_le(d.device);
                    w.put_u64_le(d.linked_ms);
                    w.put_u64_le(d.last_seen_ms);
                    w.put_u8(u8::from(d.online));
                }
            }
            Self::SyncSummary { conversations } => {
                w.put_u8(ty::SYNC_SUMMARY);
                w.put_u16_le(conversations.len() as u16);
                for c in conversations {
                    put_str(w, &c.conversation);
                    w.put_u64_le(c.last_seq);
                    w.put_u64_le(c.delivered);
                    w.put_u64_le(c.read);
                    w.put_u64_le(c.unread);
                    w.put_u64_le(c.from_seq);
                    w.put_u64_le(c.peer_delivered);
                    w.put_u64_le(c.peer_read);
                }
            }
        }
    }
}

/// Encodes a member list as the body of a membership entry.
pub fn encode_members(members: &[impl AsRef<str>]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(2 + members.iter().map(|m| 2 + m.as_ref().len()).sum::<usize>());
    put_str_list(&mut out, members);
    out
}

/// Decodes the body of a membership entry.
pub fn decode_members(body: &Bytes) -> Result<Vec<String>, DecodeError> {
    let mut r = Reader::new(body);
    let members = r.str_list("members")?;
    r.finish()?;
    Ok(members)
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    // Strings over u16::MAX are never produced by the server; a client that
    // tries is cut at the limit and refused by the decoder's checks.
    let n = s.len().min(usize::from(u16::MAX));
    w.put_u16_le(n as u16);
    w.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    w.put_u32_le(b.len() as u32);
    w.extend_from_slice(b);
}

fn put_str_list(w: &mut Vec<u8>, items: &[impl AsRef<str>]) {
    w.put_u16_le(items.len() as u16);
    for item in items {
        put_str(w, item.as_ref());
    }
}

/// Reads fields front to back, naming the field that ran short.
struct Reader<'a> {
    src: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(src: &'a Bytes) -> Self {
        Self { src, pos: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.src.len());
        let end = end.ok_or(DecodeError::Truncated(field))?;
        let out = &self.src[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = usize::from(self.u16(field)?);
        let raw = self.take(n, field)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8(field))
    }

    fn bytes(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.u32(field)? as usize;
        let start = self.pos;
        self.take(n, field)?;
        Ok(self.src.slice(start..start + n))
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::OutOfRange(field)),
        }
    }

    /// A `u16` count and that many items read by `item`. The allocation is
    /// bounded by the bytes left, not by the count a peer claims.
    fn list<T>(
        &mut self,
        field: &'static str,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = self.u16(field)?;
        let mut out = Vec::with_capacity(usize::from(n).min(self.src.len() - self.pos));
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }

    fn str_list(&mut self, field: &'static str) -> Result<Vec<String>, DecodeError> {
        let n = self.u16(field)?;
        // Each item takes at least two bytes, which bounds the allocation by
        // the payload rather than by the count a peer claims.
        let mut out = Vec::with_capacity(usize::from(n).min((self.src.len() - self.pos) / 2));
        for _ in 0..n {
            out.push(self.str(field)?);
        }
        Ok(out)
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.src.len() - self.pos {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_round_trip(f: ClientFrame) {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        assert_eq!(ClientFrame::decode(&Bytes::from(buf)).as_ref(), Ok(&f));
    }

    fn server_round_trip(f: ServerFrame) {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        assert_eq!(ServerFrame::decode(&Bytes::from(buf)).as_ref(), Ok(&f));
    }

    #[test]
    fn client_frames_round_trip() {
        let conv = "d:alice:bob".to_string();
        client_round_trip(ClientFrame::Send {
            conversation: conv.clone(),
            client_id: 7,
            body: Bytes::from_static(b"hi"),
        });
        client_round_trip(ClientFrame::Delivered {
            conversation: conv.clone(),
            seq: 9,
        });
        client_round_trip(ClientFrame::Read {
            conversation: conv.clone(),
            seq: 9,
        });
        client_round_trip(ClientFrame::Sync {
            tail: 50,
            summary: true,
            cursors: vec![Cursor {
                conversation: conv.clone(),
                seq: 3,
            }],
        });
        client_round_trip(ClientFrame::GroupCreate {
            request: 1,
            members: vec!["bob".into(), "carol".into()],
        });
        client_round_trip(ClientFrame::GroupAdd {
            request: 2,
            conversation: conv.clone(),
            members: vec!["dave".into()],
        });
        client_round_trip(ClientFrame::GroupRemove {
            request: 3,
            conversation: conv.clone(),
            members: vec![],
        });
        client_round_trip(ClientFrame::GroupMembers {
            request: 4,
            conversation: conv,
        });
        client_round_trip(ClientFrame::Ping { nonce: u64::MAX });
        client_round_trip(ClientFrame::Refresh {
            request: 1,
            token: "t".repeat(900),
        });
        client_round_trip(ClientFrame::History {
            request: 2,
            conversation: "d:a:b".into(),
            before_seq: 90,
            limit: 50,
        });
        client_round_trip(ClientFrame::ChatList {
            request: 3,
            before_ms: 17,
            before_conversation: "d:a:b".into(),
            limit: 20,
        });
        client_round_trip(ClientFrame::ReceiptQuery {
            request: 4,
            conversation: "g:00000000000000ff".into(),
            seq: 3,
        });
        client_round_trip(ClientFrame::Typing {
            conversation: "d:a:b".into(),
            active: true,
        });
        client_round_trip(ClientFrame::PresenceQuery {
            request: 5,
            users: vec!["bob".into()],
        });
        client_round_trip(ClientFrame::PresenceSubscribe {
            request: 6,
            users: vec![],
        });
        client_round_trip(ClientFrame::Settings {
            request: 7,
            mask: settings::ALL,
            flags: settings::HIDE_LAST_SEEN,
        });
        client_round_trip(ClientFrame::DeviceList { request: 8 });
        client_round_trip(ClientFrame::DeviceRemove {
            request: 9,
            device: 3,
        });
        client_round_trip(ClientFrame::KeysUpload {
            request: 10,
            identity: IdentityKeys {
                signing: [1; 32],
                dh: [2; 32],
            },
            signed_prekey: Prekey {
                id: 1,
                key: [3; 32],
            },
            signed_prekey_signature: [4; 64],
            last_resort: Prekey {
                id: u32::MAX,
                key: [5; 32],
            },
            last_resort_signature: [6; 64],
            one_time: vec![
                Prekey {
                    id: 2,
                    key: [7; 32],
                },
                Prekey {
                    id: 3,
                    key: [8; 32],
                },
            ],
        });
        client_round_trip(ClientFrame::BundleFetch {
            request: 11,
            user: "bob".into(),
        });
        client_round_trip(ClientFrame::SendPerDevice {
            conversation: "d:a:b".into(),
            client_id: 12,
            ciphertexts: vec![
                DeviceCiphertext {
                    user: "b".into(),
                    device: 1,
                    body: Bytes::from_static(b"c1"),
                },
                DeviceCiphertext {
                    user: "a".into(),
                    device: 2,
                    body: Bytes::new(),
                },
            ],
        });
        client_round_trip(ClientFrame::ArchiveUpload {
            request: 13,
            device: 2,
            archive: Bytes::from_static(b"sealed"),
        });
        client_round_trip(ClientFrame::ArchiveFetch { request: 14 });
        client_round_trip(ClientFrame::KeyCount { request: 15 });
        for provider in PushProvider::ALL {
            client_round_trip(ClientFrame::PushRegister {
                request: 16,
                provider,
                token: "tok-1".into(),
                ciphertext: provider == PushProvider::Fcm,
            });
        }
        client_round_trip(ClientFrame::PushUnregister { request: 17 });
    }

    #[test]
    fn push_register_refuses_an_unknown_provider_and_a_bad_flag() {
        let good = |provider: u8, flag: u8| {
            let mut w = vec![0x1a, 1, 0, 0, 0, provider, 1, 0, b't'];
            w.push(flag);
            Bytes::from(w)
        };
        assert!(ClientFrame::decode(&good(3, 1)).is_ok());
        assert_eq!(
            ClientFrame::decode(&good(0, 0)),
            Err(DecodeError::OutOfRange("provider"))
        );
        assert_eq!(
            ClientFrame::decode(&good(4, 0)),
            Err(DecodeError::OutOfRange("provider"))
        );
        assert_eq!(
            ClientFrame::decode(&good(1, 2)),
            Err(DecodeError::OutOfRange("ciphertext"))
        );
        let mut long = good(1, 0).to_vec();
        long.push(0);
        assert!(ClientFrame::decode(&Bytes::from(long)).is_err());
    }

    #[test]
    fn server_frames_round_trip() {
        let conv = "g:00000000000000ff".to_string();
        server_round_trip(ServerFrame::Welcome {
            user: "alice".into(),
            device: 1,
            server_time_ms: 5,
            max_body: 65536,
            idle_timeout_s: 60,
        });
        server_round_trip(ServerFrame::Sent {
            client_id: 1,
            conversation: conv.clone(),
            seq: 2,
            server_id: 3,
            timestamp_ms: 4,
        });
        server_round_trip(ServerFrame::Message {
            conversation: conv.clone(),
            seq: 2,
            server_id: 3,
            timestamp_ms: 4,
            kind: EntryKind::MembersAdded,
            sender: "bob".into(),
            sender_device: 2,
            client_id: 0,
            body: Bytes::from(encode_members(&["a", "b"])),
        });
        server_round_trip(ServerFrame::Receipt {
            conversation: conv.clone(),
            seq: 2,
            user: "bob".into(),
            device: 1,
            kind: ReceiptKind::Read,
        });
        server_round_trip(ServerFrame::SyncDone { more: true });
        server_round_trip(ServerFrame::GroupCreated {
            request: 9,
            conversation: conv.clone(),
            seq: 1,
        });
        server_round_trip(ServerFrame::Members {
            request: 9,
            conversation: conv,
            members: vec!["a".into()],
        });
        server_round_trip(ServerFrame::Done { request: 1 });
        server_round_trip(ServerFrame::Pong { nonce: 1 });
        server_round_trip(ServerFrame::Error {
            code: 403,
            reference: 5,
            detail: "not a member".into(),
        });
        server_round_trip(ServerFrame::History {
            request: 1,
            conversation: "d:a:b".into(),
            more: true,
            entries: vec![HistoryEntry {
                seq: 4,
                server_id: 5,
                timestamp_ms: 6,
                kind: EntryKind::Message,
                sender: "a".into(),
                sender_device: 1,
                client_id: 7,
                body: Bytes::from_static(b"x"),
            }],
        });
        server_round_trip(ServerFrame::Chats {
            request: 2,
            more: false,
            chats: vec![Chat {
                conversation: "d:a:b".into(),
                last_seq: 9,
                last_ms: 10,
                last_sender: "b".into(),
                read_seq: 7,
                unread: 2,
            }],
        });
        server_round_trip(ServerFrame::ReceiptSummary {
            request: 3,
            conversation: "g:00000000000000ff".into(),
            seq: 2,
            recipients: 10,
            delivered: vec!["b".into(), "c".into()],
            read: vec!["b".into()],
        });
        server_round_trip(ServerFrame::Typing {
            conversation: "d:a:b".into(),
            user: "a".into(),
            device: 2,
            active: true,
            ttl_ms: 6000,
        });
        server_round_trip(ServerFrame::Presence {
            request: 0,
            entries: vec![PresenceEntry {
                user: "b".into(),
                online: false,
                last_seen_ms: 99,
            }],
        });
        server_round_trip(ServerFrame::Settings {
            request: 4,
            flags: settings::READ_RECEIPTS_OFF,
        });
        server_round_trip(ServerFrame::Devices {
            request: 5,
            devices: vec![DeviceInfo {
                device: 1,
                linked_ms: 2,
                last_seen_ms: 3,
                online: true,
            }],
        });
        server_round_trip(ServerFrame::SyncSummary {
            conversations: vec![ConversationSummary {
                conversation: "d:a:b".into(),
                last_seq: 9,
                delivered: 3,
                read: 2,
                unread: 7,
                from_seq: 5,
                peer_delivered: 9,
                peer_read: 8,
            }],
        });
    }

    #[test]
    fn body_shares_the_payload() {
        let mut buf = Vec::new();
        ClientFrame::Send {
            conversation: "d:a:b".into(),
            client_id: 1,
            body: Bytes::from_static(b"xyz"),
        }
        .encode(&mut buf);
        let payload = Bytes::from(buf);
        let Ok(ClientFrame::Send { body, .. }) = ClientFrame::decode(&payload) else {
            panic!("decode")
        };
        assert_eq!(body.as_ptr(), payload[payload.len() - 3..].as_ptr());
    }

    #[test]
    fn malformed_frames_name_the_problem() {
        let d = |b: &[u8]| ClientFrame::decode(&Bytes::copy_from_slice(b));
        assert_eq!(d(b""), Err(DecodeError::Empty));
        assert_eq!(d(&[0x7f]), Err(DecodeError::UnknownType(0x7f)));
        assert_eq!(
            d(&[0x41]),
            Err(DecodeError::UnknownType(0x41)),
            "server frames are not client frames"
        );
        assert_eq!(d(&[ty::PING, 1, 2]), Err(DecodeError::Truncated("nonce")));
        assert_eq!(
            d(&[ty::PING, 0, 0, 0, 0, 0, 0, 0, 0, 9]),
            Err(DecodeError::Trailing(1))
        );
        assert_eq!(
            d(&[ty::REFRESH, 1, 0, 0, 0, 2, 0, 0xff, 0xfe]),
            Err(DecodeError::NotUtf8("token"))
        );
        assert_eq!(
            d(&[ty::SEND, 5, 0, b'a']),
            Err(DecodeError::Truncated("conversation"))
        );
        // A list count far beyond the payload fails without a large allocation.
        assert_eq!(
            d(&[ty::GROUP_CREATE, 0, 0, 0, 0, 0xff, 0xff]),
            Err(DecodeError::Truncated("members"))
        );
        assert_eq!(
            d(&[
                ty::SEND,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0xff,
                0xff,
                0xff,
                0xff
            ]),
            Err(DecodeError::Truncated("body"))
        );
    }
}
