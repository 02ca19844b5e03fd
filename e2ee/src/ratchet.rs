//! The symmetric-key ratchet and the envelope a message body is.
//!
//! Each direction of a session has a chain key CK. Message n of that
//! direction uses MK = HMAC-SHA256(CK, 0x01) and moves the chain on to
//! CK = HMAC-SHA256(CK, 0x02); the old CK and MK are dropped (zeroed), so
//! a key taken from a device later cannot open messages it already
//! handled. MK is a ChaCha20-Poly1305 key used for exactly one message,
//! which is why a fixed nonce is safe. The AEAD's associated data is the
//! session's identity keys and the envelope header, so a header cannot be
//! changed or moved to another session.
//!
//! Envelope (all integers little-endian):
//!
//! ```text
//!  0x01 prekey message: IK(sign) 32 ‖ IK(dh) 32 ‖ EK 32 ‖ spk_id u32 ‖
//!                       prekey_kind u8 ‖ prekey_id u32 ‖ n u32 ‖ ciphertext
//!  0x02 message:        n u32 ‖ ciphertext
//! ```
//!
//! The initiator sends prekey messages until the first message from the
//! other side arrives, so a lost first message does not break the session.

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::CryptoError;

/// Most message keys kept for messages that arrive out of order, and the
/// furthest a message number may jump ahead.
pub const MAX_SKIP: u32 = 1_000;

pub const PREKEY_MESSAGE: u8 = 0x01;
pub const MESSAGE: u8 = 0x02;

/// The length of a prekey message's header after its type byte.
pub const PREKEY_HEADER: usize = 32 * 3 + 4 + 1 + 4;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8; 32], byte: u8) -> Zeroizing<[u8; 32]> {
    // HMAC takes keys of any length; a 32-byte key never fails.
    #[allow(clippy::expect_used)]
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(&[byte]);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// One direction's chain.
pub struct Chain {
    key: Zeroizing<[u8; 32]>,
    /// The next message number.
    next: u32,
    /// Keys of skipped message numbers, for late arrivals (receiving only).
    skipped: HashMap<u32, Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain").field("next", &self.next).finish()
    }
}

impl Chain {
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self {
            key,
            next: 0,
            skipped: HashMap::new(),
        }
    }

    fn step(&mut self) -> Zeroizing<[u8; 32]> {
        let mk = hmac(&self.key, 0x01);
        self.key = hmac(&self.key, 0x02);
        self.next += 1;
        mk
    }

    /// The next sending key and its number.
    pub fn next_send(&mut self) -> (u32, Zeroizing<[u8; 32]>) {
        let n = self.next;
        (n, self.step())
    }

    /// The key of received message `n`.
    pub fn key_for(&mut self, n: u32) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
        if n < self.next {
            return self.skipped.remove(&n).ok_or(CryptoError::BadCounter);
        }
        if n - self.next > MAX_SKIP
            || self.skipped.len() + (n - self.next) as usize > MAX_SKIP as usize
        {
            return Err(CryptoError::BadCounter);
        }
        while self.next < n {
            let at = self.next;
            let mk = self.step();
            self.skipped.insert(at, mk);
        }
        Ok(self.step())
    }

    /// Puts back a key taken for a message that did not authenticate, so
    /// a forged message cannot burn a real one's number.
    pub fn restore(&mut self, n: u32, key: Zeroizing<[u8; 32]>) {
        self.skipped.insert(n, key);
    }
}

/// Encrypts `plaintext` with a one-message key.
pub fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let nonce = [0u8; 12];
    // Encryption only fails for inputs over ChaCha20's 256 GiB limit.
    #[allow(clippy::expect_used)]
    cipher
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("message within ChaCha20-Poly1305 limits")
}

/// Decrypts and authenticates a one-message ciphertext.
pub fn open(key: &[u8; 32], aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let nonce = [0u8; 12];
    cipher
        .decrypt(
            (&nonce).into(),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| CryptoError::BadCiphertext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_agree_and_tolerate_reordering_but_not_replay() {
        let mut a = Chain::new(Zeroizing::new([7; 32]));
        let mut b = Chain::new(Zeroizing::new([7; 32]));
        let sent: Vec<_> = (0..4).map(|_| a.next_send()).collect();
        // 2 arrives first, then 0, 3, 1.
        for n in [2u32, 0, 3, 1] {
            assert_eq!(*b.key_for(n).unwrap(), *sent[n as usize].1);
        }
        assert_eq!(b.key_for(2), Err(CryptoError::BadCounter), "a replay");
        assert_eq!(b.key_for(4 + MAX_SKIP + 1), Err(CryptoError::BadCounter));
    }

    #[test]
    fn a_changed_byte_or_header_does_not_open() {
        let key = [9; 32];
        let ct = seal(&key, b"header", b"secret");
        assert_eq!(open(&key, b"header", &ct).unwrap(), b"secret");
        assert!(open(&key, b"headex", &ct).is_err());
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(open(&key, b"header", &bad).is_err());
        assert!(open(&[8; 32], b"header", &ct).is_err());
    }
}
