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
    Sync { cursors: Vec<Cursor> },
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
}

mod ty {
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
                let n = r.u16("cursors")?;
                let mut cursors = Vec::with_capacity(usize::from(n).min(1024));
                for _ in 0..n {
                    cursors.push(Cursor {
                        conversation: r.str("conversation")?,
                        seq: r.u64("seq")?,
                    });
                }
                Self::Sync { cursors }
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
            Self::Sync { cursors } => {
                w.put_u8(ty::SYNC);
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
                more: match r.u8("more")? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::OutOfRange("more")),
                },
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
