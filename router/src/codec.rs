//! The binary encoding of the router's stored values.
//!
//! Every value starts with a format version byte ([`VERSION`]), then its
//! fields in declaration order: integers little-endian and fixed width, a
//! `str` as a `u16` byte length and UTF-8, `bytes` as a `u32` length and raw
//! bytes, a list as a `u32` count and its items. Bytes left after the last
//! field make the record corrupt, like a short or non-UTF-8 one: a decode
//! either yields exactly the value that was written or a [`Corrupt`] naming
//! the field, never a panic.
//!
//! Keys are built in `store.rs`; they use big-endian integers so that byte
//! order is numeric order for range scans.

use std::sync::Arc;

use bytes::Bytes;
use courier_protocol::frame::EntryKind;

/// The only value format written so far.
pub const VERSION: u8 = 1;

/// A stored value that does not decode; names the field that was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record: field `{0}`")]
pub struct Corrupt(pub &'static str);

/// One sequenced entry of a conversation, as stored (the conversation and
/// the sequence are in the key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    pub kind: EntryKind,
    pub server_id: u64,
    pub timestamp_ms: u64,
    pub sender: Arc<str>,
    pub sender_device: u32,
    pub client_id: u64,
    /// The body every recipient device gets (empty for a per-device send).
    pub body: Bytes,
    /// A per-device send's ciphertexts, one per recipient device; `None`
    /// for a send with one body for all. Stored after `body`; records
    /// written before it existed end at `body`.
    pub per_device: Option<DeviceBodies>,
}

/// The ciphertexts of a per-device send: (user, device, body).
pub type DeviceBodies = Arc<[(Arc<str>, u32, Bytes)]>;

impl StoredEntry {
    /// The body `user`'s `device` receives: its own ciphertext of a
    /// per-device send (empty when the send did not address it, as for a
    /// device linked later), else the common body.
    pub fn body_for(&self, user: &str, device: u32) -> Bytes {
        match &self.per_device {
            None => self.body.clone(),
            Some(list) => list
                .iter()
                .find(|(u, d, _)| **u == *user && *d == device)
                .map(|(_, _, b)| b.clone())
                .unwrap_or_default(),
        }
    }
}

/// A device's published keys (its one-time prekeys are records of their
/// own, counted here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityRecord {
    pub identity_signing: [u8; 32],
    pub identity_dh: [u8; 32],
    pub signed_prekey_id: u32,
    pub signed_prekey: [u8; 32],
    pub signed_prekey_signature: [u8; 64],
    pub last_resort_id: u32,
    pub last_resort: [u8; 32],
    pub last_resort_signature: [u8; 64],
    /// When the keys were last uploaded.
    pub uploaded_ms: u64,
    /// One-time prekeys of this device in the `prekeys` partition.
    pub one_time: u32,
}

/// A history archive left by one device of a user for another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveRecord {
    pub from_device: u32,
    pub created_ms: u64,
    pub archive: Bytes,
}

/// Whether a conversation is between two users or a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConversationKind {
    Direct,
    Group,
}

/// A conversation's metadata: who made it and who its current members are.
/// Its last sequence is not stored here: it is the key of its last entry, so
/// a message never rewrites this record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationMeta {
    pub kind: ConversationKind,
    pub creator: Arc<str>,
    pub members: Vec<Member>,
}

/// A current member and the entry that made them one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user: Arc<str>,
    pub join_seq: u64,
}

/// A user's membership of one conversation: the entry that made them a
/// member, and the one that removed them (0 while they are a member).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Membership {
    pub join_seq: u64,
    pub left_seq: u64,
}

/// A device's receipt cursors in one conversation (device 0: the user's
/// own record, what its sends implied; the user's cursor is derived from it
/// and its devices' records, see `RouterCore::user_cursor`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursors {
    pub delivered: u64,
    pub read: u64,
    /// When either cursor last moved (0 in records written before it was
    /// kept).
    pub updated_ms: u64,
}

/// A linked device of a user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceRecord {
    /// When the device was (last) linked.
    pub linked_ms: u64,
    /// When it was unlinked (0 while linked); tokens issued up to then are
    /// refused.
    pub removed_ms: u64,
    /// When it was last seen (its last frame before its session ended).
    pub last_seen_ms: u64,
    /// When it last finished a catch-up.
    pub last_sync_ms: u64,
}

/// A user's privacy settings (`courier_protocol::frame::settings` bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserSettings {
    pub flags: u8,
}

/// What a send was answered with, kept so a retry gets the same answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupeRecord {
    pub conversation: Arc<str>,
    pub seq: u64,
    pub server_id: u64,
    pub timestamp_ms: u64,
    /// When the record was written; the sweep drops it a window later.
    pub stored_at_ms: u64,
}

impl StoredEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(40 + self.sender.len() + self.body.len());
        w.u8(self.kind as u8);
        w.u64(self.server_id);
        w.u64(self.timestamp_ms);
        w.str(&self.sender);
        w.u32(self.sender_device);
        w.u64(self.client_id);
        w.bytes(&self.body);
        if let Some(list) = &self.per_device {
            w.u32(list.len() as u32);
            for (user, device, body) in list.iter() {
                w.str(user);
                w.u32(*device);
                w.bytes(body);
            }
        }
        w.finish()
    }

    /// Decodes a stored entry, copying its body out of `raw` (the store's
    /// buffers are not `Bytes`; one copy per catch-up entry).
    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let kind = match r.u8("kind")? {
            0 => EntryKind::Message,
            1 => EntryKind::MembersAdded,
            2 => EntryKind::MembersRemoved,
            _ => return Err(Corrupt("kind")),
        };
        let mut entry = Self {
            kind,
            server_id: r.u64("server_id")?,
            timestamp_ms: r.u64("timestamp_ms")?,
            sender: r.str("sender")?,
            sender_device: r.u32("sender_device")?,
            client_id: r.u64("client_id")?,
            body: r.bytes("body")?,
            per_device: None,
        };
        if r.remaining() > 0 {
            let n = r.u32("per_device")? as usize;
            // Each item takes at least ten bytes: the allocation is bounded
            // by the record, not by the count it claims.
            let mut list = Vec::with_capacity(n.min(r.remaining() / 10));
            for _ in 0..n {
                list.push((
                    r.str("per_device")?,
                    r.u32("per_device")?,
                    r.bytes("per_device")?,
                ));
            }
            entry.per_device = Some(list.into());
        }
        r.finish()?;
        Ok(entry)
    }
}

impl ConversationMeta {
    pub fn encode(&self) -> Vec<u8> {
        let names: usize = self.members.iter().map(|m| 10 + m.user.len()).sum();
        let mut w = Writer::with_capacity(12 + self.creator.len() + names);
        w.u8(match self.kind {
            ConversationKind::Direct => 0,
            ConversationKind::Group => 1,
        });
        w.str(&self.creator);
        w.u32(self.members.len() as u32);
        for m in &self.members {
            w.str(&m.user);
            w.u64(m.join_seq);
        }
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let kind = match r.u8("kind")? {
            0 => ConversationKind::Direct,
            1 => ConversationKind::Group,
            _ => return Err(Corrupt("kind")),
        };
        let creator = r.str("creator")?;
        let n = r.u32("members")? as usize;
        // Each member takes at least ten bytes, which bounds the allocation
        // by the record rather than by the count it claims.
        let mut members = Vec::with_capacity(n.min(r.remaining() / 10));
        for _ in 0..n {
            members.push(Member {
                user: r.str("members")?,
                join_seq: r.u64("members")?,
            });
        }
        r.finish()?;
        Ok(Self {
            kind,
            creator,
            members,
        })
    }
}

impl Membership {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(17);
        w.u64(self.join_seq);
        w.u64(self.left_seq);
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let m = Self {
            join_seq: r.u64("join_seq")?,
            left_seq: r.u64("left_seq")?,
        };
        r.finish()?;
        Ok(m)
    }
}

impl Cursors {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(25);
        w.u64(self.delivered);
        w.u64(self.read);
        w.u64(self.updated_ms);
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let mut c = Self {
            delivered: r.u64("delivered")?,
            read: r.u64("read")?,
            updated_ms: 0,
        };
        // Records from before `updated_ms` end here.
        if r.remaining() > 0 {
            c.updated_ms = r.u64("updated_ms")?;
        }
        r.finish()?;
        Ok(c)
    }
}

impl DeviceRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(33);
        w.u64(self.linked_ms);
        w.u64(self.removed_ms);
        w.u64(self.last_seen_ms);
        w.u64(self.last_sync_ms);
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let d = Self {
            linked_ms: r.u64("linked_ms")?,
            removed_ms: r.u64("removed_ms")?,
            last_seen_ms: r.u64("last_seen_ms")?,
            last_sync_ms: r.u64("last_sync_ms")?,
        };
        r.finish()?;
        Ok(d)
    }
}

impl UserSettings {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(2);
        w.u8(self.flags);
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let s = Self {
            flags: r.u8("flags")?,
        };
        r.finish()?;
        Ok(s)
    }
}

impl DedupeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(35 + self.conversation.len());
        w.str(&self.conversation);
        w.u64(self.seq);
        w.u64(self.server_id);
        w.u64(self.timestamp_ms);
        w.u64(self.stored_at_ms);
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let rec = Self {
            conversation: r.str("conversation")?,
            seq: r.u64("seq")?,
            server_id: r.u64("server_id")?,
            timestamp_ms: r.u64("timestamp_ms")?,
            stored_at_ms: r.u64("stored_at_ms")?,
        };
        r.finish()?;
        Ok(rec)
    }
}

impl IdentityRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(300);
        w.raw(&self.identity_signing);
        w.raw(&self.identity_dh);
        w.u32(self.signed_prekey_id);
        w.raw(&self.signed_prekey);
        w.raw(&self.signed_prekey_signature);
        w.u32(self.last_resort_id);
        w.raw(&self.last_resort);
        w.raw(&self.last_resort_signature);
        w.u64(self.uploaded_ms);
        w.u32(self.one_time);
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let rec = Self {
            identity_signing: r.array("identity_signing")?,
            identity_dh: r.array("identity_dh")?,
            signed_prekey_id: r.u32("signed_prekey_id")?,
            signed_prekey: r.array("signed_prekey")?,
            signed_prekey_signature: r.array("signed_prekey_signature")?,
            last_resort_id: r.u32("last_resort_id")?,
            last_resort: r.array("last_resort")?,
            last_resort_signature: r.array("last_resort_signature")?,
            uploaded_ms: r.u64("uploaded_ms")?,
            one_time: r.u32("one_time")?,
        };
        r.finish()?;
        Ok(rec)
    }
}

/// A one-time prekey's public key, as stored (its owner and id are the key).
pub fn encode_prekey(key: &[u8; 32]) -> Vec<u8> {
    let mut w = Writer::with_capacity(32);
    w.raw(key);
    w.finish()
}

pub fn decode_prekey(raw: &[u8]) -> Result<[u8; 32], Corrupt> {
    let mut r = Reader::new(raw)?;
    let key = r.array("prekey")?;
    r.finish()?;
    Ok(key)
}

impl ArchiveRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(16 + self.archive.len());
        w.u32(self.from_device);
        w.u64(self.created_ms);
        w.bytes(&self.archive);
        w.finish()
    }

    pub fn decode(raw: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(raw)?;
        let rec = Self {
            from_device: r.u32("from_device")?,
            created_ms: r.u64("created_ms")?,
            archive: r.bytes("archive")?,
        };
        r.finish()?;
        Ok(rec)
    }
}

/// Appends fields to a value that starts with the version byte.
struct Writer(Vec<u8>);

impl Writer {
    fn with_capacity(n: usize) -> Self {
        let mut buf = Vec::with_capacity(n + 1);
        buf.push(VERSION);
        Self(buf)
    }

    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Fixed-width raw bytes (keys, signatures): no length prefix.
    fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Writes a string of at most `u16::MAX` bytes. Every string the router
    /// stores is a validated user or conversation id (at most a few hundred
    /// bytes), so the cut never happens in practice; it keeps the length
    /// prefix honest if it ever did.
    fn str(&mut self, s: &str) {
        let mut n = s.len().min(usize::from(u16::MAX));
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.0.extend_from_slice(&(n as u16).to_le_bytes());
        self.0.extend_from_slice(&s.as_bytes()[..n]);
    }

    /// Writes a byte string; bodies are capped far below `u32::MAX` by the
    /// router's body limit, checked before anything is stored.
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }

    fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads fields front to back from a value, checking the version first.
struct Reader<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(src: &'a [u8]) -> Result<Self, Corrupt> {
        match src.first() {
            Some(&VERSION) => Ok(Self { src, pos: 1 }),
            _ => Err(Corrupt("version")),
        }
    }

    fn remaining(&self) -> usize {
        self.src.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Corrupt> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.src.len())
            .ok_or(Corrupt(field))?;
        let out = &self.src[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Corrupt> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, Corrupt> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, Corrupt> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, Corrupt> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn str(&mut self, field: &'static str) -> Result<Arc<str>, Corrupt> {
        let n = usize::from(u16::from_le_bytes(self.array(field)?));
        let raw = self.take(n, field)?;
        std::str::from_utf8(raw)
            .map(Arc::from)
            .map_err(|_| Corrupt(field))
    }

    fn bytes(&mut self, field: &'static str) -> Result<Bytes, Corrupt> {
        let n = u32::from_le_bytes(self.array(field)?) as usize;
        Ok(Bytes::copy_from_slice(self.take(n, field)?))
    }

    fn finish(self) -> Result<(), Corrupt> {
        if self.pos == self.src.len() {
            Ok(())
        } else {
            Err(Corrupt("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let entry = StoredEntry {
            kind: EntryKind::MembersRemoved,
            server_id: u64::MAX,
            timestamp_ms: 7,
            sender: "alice".into(),
            sender_device: 3,
            client_id: 9,
            body: Bytes::from_static(b"\x00\x01opaque"),
            per_device: None,
        };
        assert_eq!(StoredEntry::decode(&entry.encode()), Ok(entry.clone()));
        let per_device = StoredEntry {
            body: Bytes::new(),
            per_device: Some(
                vec![
                    (Arc::from("bob"), 1, Bytes::from_static(b"for bob 1")),
                    (Arc::from("alice"), 2, Bytes::from_static(b"for alice 2")),
                ]
                .into(),
            ),
            ..entry
        };
        assert_eq!(
            StoredEntry::decode(&per_device.encode()),
            Ok(per_device.clone())
        );
        assert_eq!(&per_device.body_for("alice", 2)[..], b"for alice 2");
        assert!(per_device.body_for("bob", 2).is_empty());

        let id = IdentityRecord {
            identity_signing: [1; 32],
            identity_dh: [2; 32],
            signed_prekey_id: 3,
            signed_prekey: [4; 32],
            signed_prekey_signature: [5; 64],
            last_resort_id: 6,
            last_resort: [7; 32],
            last_resort_signature: [8; 64],
            uploaded_ms: 9,
            one_time: 10,
        };
        assert_eq!(IdentityRecord::decode(&id.encode()), Ok(id));
        assert_eq!(decode_prekey(&encode_prekey(&[3; 32])), Ok([3; 32]));
        let a = ArchiveRecord {
            from_device: 1,
            created_ms: 2,
            archive: Bytes::from_static(b"sealed"),
        };
        assert_eq!(ArchiveRecord::decode(&a.encode()), Ok(a));

        let meta = ConversationMeta {
            kind: ConversationKind::Group,
            creator: "bob".into(),
            members: vec![
                Member {
                    user: "bob".into(),
                    join_seq: 1,
                },
                Member {
                    user: "carol".into(),
                    join_seq: 4,
                },
            ],
        };
        assert_eq!(ConversationMeta::decode(&meta.encode()), Ok(meta));

        let m = Membership {
            join_seq: 4,
            left_seq: 0,
        };
        assert_eq!(Membership::decode(&m.encode()), Ok(m));

        let c = Cursors {
            delivered: 10,
            read: 8,
            ..Cursors::default()
        };
        assert_eq!(Cursors::decode(&c.encode()), Ok(c));

        let d = DedupeRecord {
            conversation: "d:a:b".into(),
            seq: 1,
            server_id: 2,
            timestamp_ms: 3,
            stored_at_ms: 4,
        };
        assert_eq!(DedupeRecord::decode(&d.encode()), Ok(d));
    }

    #[test]
    fn corrupt_records_are_errors() {
        let c = Cursors {
            delivered: 1,
            read: 1,
            ..Cursors::default()
        }
        .encode();
        assert_eq!(Cursors::decode(&[]), Err(Corrupt("version")));
        assert_eq!(Cursors::decode(&[9]), Err(Corrupt("version")));
        assert_eq!(
            Cursors::decode(&c[..c.len() - 1]),
            Err(Corrupt("updated_ms"))
        );
        assert_eq!(Cursors::decode(&c[..16]), Err(Corrupt("read")));
        // A record from before `updated_ms` was kept still reads.
        assert_eq!(
            Cursors::decode(&c[..17]),
            Ok(Cursors {
                delivered: 1,
                read: 1,
                updated_ms: 0
            })
        );
        let mut long = c.clone();
        long.push(0);
        assert_eq!(Cursors::decode(&long), Err(Corrupt("trailing bytes")));

        // A member count far beyond the record fails without a large allocation.
        let mut meta = vec![VERSION, 1, 1, 0, b'x'];
        meta.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(ConversationMeta::decode(&meta), Err(Corrupt("members")));

        let entry = StoredEntry {
            kind: EntryKind::Message,
            server_id: 1,
            timestamp_ms: 1,
            sender: "a".into(),
            sender_device: 1,
            client_id: 1,
            body: Bytes::from_static(b"hi"),
            per_device: None,
        };
        // A per-device count far beyond the record is refused cheaply.
        let mut raw = entry.encode();
        raw.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(StoredEntry::decode(&raw), Err(Corrupt("per_device")));
        let mut raw = entry.encode();
        raw[1] = 7;
        assert_eq!(StoredEntry::decode(&raw), Err(Corrupt("kind")));
        let mut raw = entry.encode();
        let sender_at = 1 + 1 + 8 + 8 + 2;
        raw[sender_at] = 0xff;
        assert_eq!(StoredEntry::decode(&raw), Err(Corrupt("sender")));
    }
}
