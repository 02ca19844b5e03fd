//! The bytes loadgen puts in a message body.
//!
//! ```text
//!  0      4        8        12            20              28
//!  "CLG1" | run u32 | sender u32 | msg u64 | intended_ns u64 | padding...
//! ```
//!
//! Little-endian. The padding is a pattern derived from the run and the
//! message index, so a recipient can tell a body that was sent from one
//! that was corrupted, truncated or made up, and the intended send time
//! lets it compute end-to-end latency without asking the sender.

use crate::rng::mix;

/// Bytes of the fixed part; bodies are at least this long.
pub const HEADER_LEN: usize = 28;

const MAGIC: [u8; 4] = *b"CLG1";

/// What the fixed part of a body says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The run that sent it.
    pub run_id: u32,
    /// The sending user.
    pub sender: u32,
    /// The message index in the schedule.
    pub msg: u64,
    /// The intended send time, ns after the traffic start.
    pub intended_ns: u64,
}

/// Why a body is not one loadgen sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Shorter than the fixed part.
    #[error("body shorter than its header")]
    Short,
    /// The magic bytes are wrong.
    #[error("body has no loadgen magic")]
    Magic,
    /// The padding does not match the stamp.
    #[error("body padding does not match its stamp")]
    Padding,
}

/// The body for `stamp`, `len` bytes long (at least [`HEADER_LEN`]).
pub fn encode(stamp: &Stamp, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len.max(HEADER_LEN));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&stamp.run_id.to_le_bytes());
    out.extend_from_slice(&stamp.sender.to_le_bytes());
    out.extend_from_slice(&stamp.msg.to_le_bytes());
    out.extend_from_slice(&stamp.intended_ns.to_le_bytes());
    let key = pad_key(stamp);
    out.extend((HEADER_LEN..len).map(|k| pad_byte(key, k)));
    out
}

/// Reads and checks a body.
pub fn decode(body: &[u8]) -> Result<Stamp, BodyError> {
    if body.len() < HEADER_LEN {
        return Err(BodyError::Short);
    }
    if body[..4] != MAGIC {
        return Err(BodyError::Magic);
    }
    let u32_at = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let stamp = Stamp {
        run_id: u32_at(4),
        sender: u32_at(8),
        msg: u64_at(12),
        intended_ns: u64_at(20),
    };
    let key = pad_key(&stamp);
    if body[HEADER_LEN..]
        .iter()
        .enumerate()
        .any(|(i, &b)| b != pad_byte(key, HEADER_LEN + i))
    {
        return Err(BodyError::Padding);
    }
    Ok(stamp)
}

fn pad_key(stamp: &Stamp) -> u64 {
    mix(
        u64::from(stamp.run_id) << 32 | u64::from(stamp.sender),
        stamp.msg,
    )
}

fn pad_byte(key: u64, k: usize) -> u8 {
    (key >> ((k % 8) * 8)) as u8 ^ (k as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        run_id: 0xdead_beef,
        sender: 17,
        msg: 123_456,
        intended_ns: 9_876_543_210,
    };

    #[test]
    fn round_trip_at_every_size() {
        for len in [HEADER_LEN, HEADER_LEN + 1, 200, 4096] {
            let body = encode(&STAMP, len);
            assert_eq!(body.len(), len);
            assert_eq!(decode(&body), Ok(STAMP));
        }
        // A length under the header still carries the whole header.
        assert_eq!(encode(&STAMP, 3).len(), HEADER_LEN);
    }

    #[test]
    fn tampering_is_caught() {
        let body = encode(&STAMP, 200);
        assert_eq!(decode(&body[..HEADER_LEN - 1]), Err(BodyError::Short));
        let mut bad = body.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(BodyError::Magic));
        let mut bad = body.clone();
        bad[150] ^= 1;
        assert_eq!(decode(&bad), Err(BodyError::Padding));
        // Another message's stamp over this padding does not pass either.
        let mut bad = body.clone();
        bad[12] ^= 1;
        assert_eq!(decode(&bad), Err(BodyError::Padding));
        assert_eq!(
            decode(b"hello, this is not a loadgen body at all"),
            Err(BodyError::Magic)
        );
    }
}
