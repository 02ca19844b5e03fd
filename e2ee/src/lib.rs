//! A Courier client that encrypts end to end.
//!
//! The server only routes: it stores public keys and hands out one-time
//! prekeys (see `docs/security.md`), and it relays bodies it cannot read.
//! This crate is the other half, the part that runs on a device:
//!
//! ```text
//!  Device::upload ──KeysUpload──► server key directory
//!  Device::start_session(bundle)  ◄──Bundle── BundleFetch
//!     X3DH: 4 X25519 agreements → HKDF-SHA256 → the session secret
//!  Device::encrypt ──► envelope (X3DH header until the peer answers)
//!     Double Ratchet: a DH step per turn, an HMAC-SHA256 chain step per
//!     message → one ChaCha20-Poly1305 key per message, deleted after use
//!  Device::decrypt ◄── Message body (its own ciphertext)
//! ```
//!
//! - [`device`]: a device's keys and its sessions with other devices.
//! - [`x3dh`]: the key agreement that starts a session.
//! - [`ratchet`]: the Double Ratchet and the envelope format.
//! - [`net`]: a small blocking WebSocket client for the driver and tests.
//! - [`bench`]: the encrypted (and plain) pairs scenario of `e2ee-chat bench`.
//!
//! What it does not do: store anything on disk (keys live in memory),
//! rotate its signed prekey, or encrypt with sender keys for large groups.

#![forbid(unsafe_code)]

pub mod bench;
pub mod device;
pub mod net;
pub mod ratchet;
pub mod x3dh;

pub use device::{safety_number, Device};

/// Why a message or a bundle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// A bundle's prekey signature does not verify with its identity key:
    /// the server (or someone in between) handed out a forged prekey.
    #[error("bundle signature does not verify")]
    BadBundle,
    /// A key agreement gave an all-zero secret (a low-order public key).
    #[error("key agreement with a low-order key")]
    WeakKey,
    /// The envelope is too short, of an unknown type, or names a prekey
    /// this device no longer has (a replayed first message).
    #[error("malformed envelope or unknown prekey")]
    Malformed,
    /// No session with the sender, and the envelope does not start one.
    #[error("no session with this device")]
    NoSession,
    /// The ciphertext did not authenticate.
    #[error("ciphertext does not authenticate")]
    BadCiphertext,
    /// A message number already used (a replay) or too far ahead.
    #[error("message number replayed or too far ahead")]
    BadCounter,
}
