//! The Double Ratchet, and the envelope a message body is.
//!
//! A session starts from the X3DH secret SK. Each side keeps a ratchet
//! key pair (X25519), a root key RK and a sending and a receiving chain:
//!
//! - **Symmetric step, per message.** Message n of a chain uses
//!   MK = HMAC-SHA256(CK, 0x01) and moves the chain to
//!   CK = HMAC-SHA256(CK, 0x02). MK is a ChaCha20-Poly1305 key used for
//!   exactly one message (so a fixed nonce is safe); old keys are zeroed
//!   when dropped, which gives forward secrecy.
//! - **Diffie-Hellman step, per turn.** Every message carries the sender's
//!   current ratchet public key. A new one from the other side starts a
//!   new receiving chain, `RK, CKr = KDF(RK, DH(mine, theirs))`, and this
//!   side then makes a fresh key pair for its next sending chain,
//!   `RK, CKs = KDF(RK, DH(new, theirs))`, with
//!   `KDF(rk, dh) = HKDF-SHA256(salt = rk, ikm = dh, "courier ratchet v1")`.
//!   A device whose keys were stolen thus recovers once both sides have
//!   sent again (break-in recovery).
//!
//! The initiator's first remote ratchet key is the responder's signed
//! prekey; the responder's first key pair is that signed prekey.
//!
//! Envelope (integers little-endian):
//!
//! ```text
//!  0x01 prekey message: IK(sign) 32 ‖ IK(dh) 32 ‖ EK 32 ‖ spk_id u32 ‖
//!                       prekey_kind u8 ‖ prekey_id u32 ‖ header ‖ ciphertext
//!  0x02 message:        header ‖ ciphertext
//!  header:              ratchet key 32 ‖ previous chain length u32 ‖ n u32
//! ```
//!
//! The AEAD's associated data is the session's identity keys and every
//! envelope byte before the ciphertext, so no header can be changed or
//! moved to another session. The initiator sends prekey messages until the
//! first message from the other side arrives, so a lost first message does
//! not break the session.

use std::collections::HashMap;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::CryptoError;

/// Most message keys kept for messages that arrive out of order, and the
/// furthest a message number may jump ahead.
pub const MAX_SKIP: u32 = 1_000;

pub const PREKEY_MESSAGE: u8 = 0x01;
pub const MESSAGE: u8 = 0x02;

/// The length of a prekey message's X3DH part after its type byte.
pub const PREKEY_HEADER: usize = 32 * 3 + 4 + 1 + 4;

/// The length of the ratchet header.
pub const HEADER: usize = 32 + 4 + 4;

type HmacSha256 = Hmac<Sha256>;
type Key = Zeroizing<[u8; 32]>;

fn hmac(key: &[u8; 32], byte: u8) -> Key {
    // HMAC takes keys of any length; a 32-byte key never fails.
    #[allow(clippy::expect_used)]
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(&[byte]);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// The root KDF: a new root key and a chain key.
fn kdf_root(root: &[u8; 32], dh: &[u8; 32]) -> (Key, Key) {
    let hk = Hkdf::<Sha256>::new(Some(root), dh);
    let mut okm = Zeroizing::new([0u8; 64]);
    // 64 bytes is far below HKDF-SHA256's 8,160-byte limit.
    #[allow(clippy::expect_used)]
    hk.expand(b"courier ratchet v1", okm.as_mut())
        .expect("64 bytes is a valid HKDF length");
    let (mut rk, mut ck) = (Zeroizing::new([0u8; 32]), Zeroizing::new([0u8; 32]));
    rk.copy_from_slice(&okm[..32]);
    ck.copy_from_slice(&okm[32..]);
    (rk, ck)
}

fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Result<[u8; 32], CryptoError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(CryptoError::WeakKey);
    }
    Ok(shared.to_bytes())
}

fn random_secret() -> StaticSecret {
    let mut b = Zeroizing::new([0u8; 32]);
    // A machine without a working random source cannot make keys at all.
    #[allow(clippy::expect_used)]
    getrandom::fill(b.as_mut()).expect("the system random source works");
    StaticSecret::from(*b)
}

/// One chain: its key and the number of its next message.
#[derive(Clone)]
struct Chain {
    key: Key,
    next: u32,
}

impl Chain {
    fn step(&mut self) -> Key {
        let mk = hmac(&self.key, 0x01);
        self.key = hmac(&self.key, 0x02);
        self.next += 1;
        mk
    }
}

/// A ratchet header: the sender's ratchet key, the length of its previous
/// sending chain, and the message's number in the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub ratchet_key: [u8; 32],
    pub previous: u32,
    pub n: u32,
}

impl Header {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ratchet_key);
        out.extend_from_slice(&self.previous.to_le_bytes());
        out.extend_from_slice(&self.n.to_le_bytes());
    }

    pub fn decode(raw: &[u8]) -> Result<Self, CryptoError> {
        let raw = raw.get(..HEADER).ok_or(CryptoError::Malformed)?;
        let u32_at = |at: usize| {
            raw[at..at + 4]
                .try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| CryptoError::Malformed)
        };
        Ok(Self {
            ratchet_key: raw[..32].try_into().map_err(|_| CryptoError::Malformed)?,
            previous: u32_at(32)?,
            n: u32_at(36)?,
        })
    }
}

/// A session's Double Ratchet state. Cloned before a receive and put back
/// only when the message authenticated, so a forged message changes
/// nothing.
#[derive(Clone)]
pub struct Ratchet {
    root: Key,
    mine: StaticSecret,
    /// `mine`'s public key, computed once per turn (a scalar multiplication
    /// per message would be most of the sending cost).
    mine_public: [u8; 32],
    theirs: Option<[u8; 32]>,
    send: Option<Chain>,
    recv: Option<Chain>,
    /// Length of the previous sending chain (for the header).
    previous: u32,
    /// Keys of skipped messages, by (their ratchet key, number).
    skipped: HashMap<([u8; 32], u32), Key>,
}

impl std::fmt::Debug for Ratchet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ratchet")
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl Ratchet {
    /// The initiator's ratchet: X3DH's secret and the responder's signed
    /// prekey as its first remote ratchet key.
    pub fn initiator(
        secret: &[u8; 32],
        their_signed_prekey: &[u8; 32],
    ) -> Result<Self, CryptoError> {
        let mine = random_secret();
        let (root, ck) = kdf_root(secret, &dh(&mine, their_signed_prekey)?);
        Ok(Self {
            root,
            mine_public: PublicKey::from(&mine).to_bytes(),
            mine,
            theirs: Some(*their_signed_prekey),
            send: Some(Chain { key: ck, next: 0 }),
            recv: None,
            previous: 0,
            skipped: HashMap::new(),
        })
    }

    /// The responder's ratchet: its signed prekey is its first key pair.
    pub fn responder(secret: &[u8; 32], signed_prekey: StaticSecret) -> Self {
        Self {
            root: Zeroizing::new(*secret),
            mine_public: PublicKey::from(&signed_prekey).to_bytes(),
            mine: signed_prekey,
            theirs: None,
            send: None,
            recv: None,
            previous: 0,
            skipped: HashMap::new(),
        }
    }

    /// The header and key of the next message to send. The responder can
    /// send only after its first received message.
    pub fn next_send(&mut self) -> Result<(Header, Key), CryptoError> {
        let ratchet_key = self.mine_public;
        let previous = self.previous;
        let chain = self.send.as_mut().ok_or(CryptoError::NoSession)?;
        let n = chain.next;
        Ok((
            Header {
                ratchet_key,
                previous,
                n,
            },
            chain.step(),
        ))
    }

    /// The key of a received message: a skipped one, or after stepping
    /// the chains (and the Diffie-Hellman ratchet on a new remote key).
    pub fn key_for(&mut self, h: &Header) -> Result<Key, CryptoError> {
        if let Some(k) = self.skipped.remove(&(h.ratchet_key, h.n)) {
            return Ok(k);
        }
        if self.theirs != Some(h.ratchet_key) {
            if let Some(theirs) = self.theirs {
                // The rest of the previous receiving chain, for late ones.
                self.skip(theirs, h.previous)?;
            }
            self.turn(h.ratchet_key)?;
        }
        self.skip(h.ratchet_key, h.n)?;
        let chain = self.recv.as_mut().ok_or(CryptoError::BadCounter)?;
        if h.n < chain.next {
            return Err(CryptoError::BadCounter);
        }
        Ok(chain.step())
    }

    /// Keeps the keys of the receiving chain's messages before `until`.
    fn skip(&mut self, theirs: [u8; 32], until: u32) -> Result<(), CryptoError> {
        let Some(chain) = self.recv.as_mut() else {
            return Ok(());
        };
        if until <= chain.next {
            return Ok(());
        }
        if until - chain.next > MAX_SKIP
            || self.skipped.len() + (until - chain.next) as usize > MAX_SKIP as usize
        {
            return Err(CryptoError::BadCounter);
        }
        while chain.next < until {
            let n = chain.next;
            let mk = chain.step();
            self.skipped.insert((theirs, n), mk);
        }
        Ok(())
    }

    /// The Diffie-Hellman step on a new remote ratchet key.
    fn turn(&mut self, theirs: [u8; 32]) -> Result<(), CryptoError> {
        self.previous = self.send.as_ref().map_or(0, |c| c.next);
        let (root, ckr) = kdf_root(&self.root, &dh(&self.mine, &theirs)?);
        self.mine = random_secret();
        self.mine_public = PublicKey::from(&self.mine).to_bytes();
        let (root, cks) = kdf_root(&root, &dh(&self.mine, &theirs)?);
        self.root = root;
        self.theirs = Some(theirs);
        self.recv = Some(Chain { key: ckr, next: 0 });
        self.send = Some(Chain { key: cks, next: 0 });
        Ok(())
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

    fn pair() -> (Ratchet, Ratchet) {
        let sk = [7u8; 32];
        let spk = StaticSecret::from([3u8; 32]);
        let spk_pub = PublicKey::from(&spk).to_bytes();
        (
            Ratchet::initiator(&sk, &spk_pub).unwrap(),
            Ratchet::responder(&sk, spk),
        )
    }

    #[test]
    fn both_sides_agree_across_turns_reordering_and_refuse_replays() {
        let (mut a, mut b) = pair();
        assert_eq!(b.next_send().err(), Some(CryptoError::NoSession));
        let sent: Vec<_> = (0..3).map(|_| a.next_send().unwrap()).collect();
        // 2 arrives first, then 0; 1 stays late.
        for i in [2usize, 0] {
            assert_eq!(*b.key_for(&sent[i].0).unwrap(), *sent[i].1);
        }
        assert_eq!(b.key_for(&sent[2].0).err(), Some(CryptoError::BadCounter));
        // Bob answers with a new ratchet key; alice turns too.
        let (hb, kb) = b.next_send().unwrap();
        assert_ne!(hb.ratchet_key, sent[0].0.ratchet_key);
        assert_eq!(*a.key_for(&hb).unwrap(), *kb);
        let (ha, ka) = a.next_send().unwrap();
        assert_ne!(ha.ratchet_key, sent[0].0.ratchet_key, "alice turned");
        assert_eq!(ha.previous, 3);
        assert_eq!(*b.key_for(&ha).unwrap(), *ka);
        // The late message of the first chain still opens, once.
        assert_eq!(*b.key_for(&sent[1].0).unwrap(), *sent[1].1);
        // Replayed, its old ratchet key would start a turn that yields a
        // key that does not open it (the caller then drops that state).
        assert_ne!(b.clone().key_for(&sent[1].0).map(|k| *k), Ok(*sent[1].1));
        let far = Header {
            n: ha.n + MAX_SKIP + 2,
            ..ha
        };
        assert_eq!(b.key_for(&far).err(), Some(CryptoError::BadCounter));
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

    #[test]
    fn headers_round_trip() {
        let h = Header {
            ratchet_key: [5; 32],
            previous: 7,
            n: 9,
        };
        let mut raw = Vec::new();
        h.encode(&mut raw);
        assert_eq!(raw.len(), HEADER);
        assert_eq!(Header::decode(&raw), Ok(h));
        assert_eq!(Header::decode(&raw[..10]), Err(CryptoError::Malformed));
    }
}
