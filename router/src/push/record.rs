//! The two store records of push: a device's token and a notification
//! waiting for its device.
//!
//! | partition | key | value |
//! |---|---|---|
//! | `push_tokens` | `len user device` | [`TokenRecord`] |
//! | `push_queue` | `len user device conversation` | [`QueueRecord`] |
//!
//! Values start with a version byte; integers little-endian, strings and
//! bytes with a `u32` length.

use bytes::Bytes;

use super::PushProvider;
use crate::store;

const VERSION: u8 = 1;

/// A device's push token.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TokenRecord {
    pub provider: PushProvider,
    pub token: String,
    /// The device opted in to carrying the message's ciphertext.
    pub ciphertext: bool,
    pub registered_ms: u64,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("provider", &self.provider)
            .field("token", &"<push token>")
            .field("ciphertext", &self.ciphertext)
            .finish()
    }
}

/// A notification waiting for its device: what it will say and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueueRecord {
    pub due_ms: u64,
    pub last_seq: u64,
    pub count: u32,
    pub sender: String,
    pub sender_device: u32,
    pub ciphertext: Option<Bytes>,
}

impl TokenRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION, self.provider as u8, u8::from(self.ciphertext)];
        out.extend_from_slice(&self.registered_ms.to_le_bytes());
        put(&mut out, self.token.as_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Option<Self> {
        let mut r = Cursor(raw);
        if r.u8()? != VERSION {
            return None;
        }
        let provider = PushProvider::from_u8(r.u8()?)?;
        let ciphertext = r.u8()? == 1;
        let registered_ms = r.u64()?;
        let token = String::from_utf8(r.bytes()?.to_vec()).ok()?;
        r.0.is_empty().then_some(Self {
            provider,
            token,
            ciphertext,
            registered_ms,
        })
    }
}

impl QueueRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        out.extend_from_slice(&self.due_ms.to_le_bytes());
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        put(&mut out, self.sender.as_bytes());
        out.extend_from_slice(&self.sender_device.to_le_bytes());
        match &self.ciphertext {
            Some(c) => {
                out.push(1);
                put(&mut out, c);
            }
            None => out.push(0),
        }
        out
    }

    pub fn decode(raw: &[u8]) -> Option<Self> {
        let mut r = Cursor(raw);
        if r.u8()? != VERSION {
            return None;
        }
        let due_ms = r.u64()?;
        let last_seq = r.u64()?;
        let count = r.u32()?;
        let sender = String::from_utf8(r.bytes()?.to_vec()).ok()?;
        let sender_device = r.u32()?;
        let ciphertext = match r.u8()? {
            0 => None,
            1 => Some(Bytes::copy_from_slice(r.bytes()?)),
            _ => return None,
        };
        r.0.is_empty().then_some(Self {
            due_ms,
            last_seq,
            count,
            sender,
            sender_device,
            ciphertext,
        })
    }
}

/// The `push_queue` key of (user, device, conversation): the cursor key's
/// layout, so one device's notifications are one prefix range.
pub(crate) fn queue_key(user: &str, device: u32, conversation: &str) -> Vec<u8> {
    store::cursor_key(user, device, conversation)
}

/// Splits a `push_queue` key back into (user, device, conversation).
pub(crate) fn parse_queue_key(key: &[u8]) -> Option<(String, u32, String)> {
    let len = usize::from(u16::from_be_bytes(key.get(..2)?.try_into().ok()?));
    let user = std::str::from_utf8(key.get(2..2 + len)?).ok()?;
    let device = u32::from_be_bytes(key.get(2 + len..6 + len)?.try_into().ok()?);
    let conversation = std::str::from_utf8(key.get(6 + len..)?).ok()?;
    Some((user.to_owned(), device, conversation.to_owned()))
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_trailing_bytes() {
        let t = TokenRecord {
            provider: PushProvider::Apns,
            token: "ab01".into(),
            ciphertext: true,
            registered_ms: 7,
        };
        assert_eq!(TokenRecord::decode(&t.encode()), Some(t.clone()));
        let mut long = t.encode();
        long.push(0);
        assert_eq!(TokenRecord::decode(&long), None);
        for ciphertext in [None, Some(Bytes::from_static(b"\x00sealed"))] {
            let q = QueueRecord {
                due_ms: 1,
                last_seq: 9,
                count: 3,
                sender: "alice".into(),
                sender_device: 2,
                ciphertext,
            };
            assert_eq!(QueueRecord::decode(&q.encode()), Some(q.clone()));
            assert_eq!(QueueRecord::decode(&q.encode()[..5]), None);
        }
        let key = queue_key("bob", 3, "d:alice:bob");
        assert_eq!(
            parse_queue_key(&key),
            Some(("bob".into(), 3, "d:alice:bob".into()))
        );
    }
}
