//! One device's keys and its sessions with other devices.
//!
//! Call [`Device::upload`] once connected (and again, with more one-time
//! prekeys, when the server says they run low); [`Device::start_session`]
//! with each bundle from `BundleFetch` before the first message to that
//! device; then [`Device::encrypt`] per recipient device and
//! [`Device::decrypt`] for each `Message` body. A device that receives a
//! first (prekey) message from a device it has no session with starts the
//! session from it.

use std::collections::HashMap;

use bytes::Bytes;
use courier_protocol::frame::{
    prekey_signing_message, ClientFrame, DeviceBundle, DeviceCiphertext, IdentityKeys, Prekey,
    PrekeyKind, SignedPrekey,
};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::ratchet::{self, Header, Ratchet, HEADER, MESSAGE, PREKEY_HEADER, PREKEY_MESSAGE};
use crate::{x3dh, CryptoError};

/// The last-resort prekey's id (one-time prekeys count up from 1).
const LAST_RESORT_ID: u32 = u32::MAX;

/// 32 bytes from the system's random source.
fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    // A machine without a working random source cannot make keys at all;
    // stopping is the only safe answer.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut b).expect("the system random source works");
    b
}

/// A pairwise session with one remote device.
struct Session {
    ratchet: Ratchet,
    associated_data: Vec<u8>,
    /// While set (the initiator has heard nothing back yet), messages
    /// carry the prekey header so the other side can start the session.
    prekey_header: Option<Vec<u8>>,
    /// The ephemeral key that started it (to recognise a repeated
    /// prekey message of the same session).
    ephemeral: [u8; 32],
    /// The remote device's identity, for safety numbers.
    remote: IdentityKeys,
}

/// A device: its identity, prekeys and sessions. Keys are kept in memory
/// only, and private keys never leave this struct.
pub struct Device {
    pub user: String,
    pub device: u32,
    signing: SigningKey,
    identity_dh: StaticSecret,
    signed_prekey: (u32, StaticSecret),
    last_resort: StaticSecret,
    one_time: HashMap<u32, StaticSecret>,
    next_prekey_id: u32,
    sessions: HashMap<(String, u32), Session>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("user", &self.user)
            .field("device", &self.device)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device with a fresh identity.
    pub fn new(user: &str, device: u32) -> Self {
        Self {
            user: user.to_owned(),
            device,
            signing: SigningKey::from_bytes(&random32()),
            identity_dh: StaticSecret::from(random32()),
            signed_prekey: (1, StaticSecret::from(random32())),
            last_resort: StaticSecret::from(random32()),
            one_time: HashMap::new(),
            next_prekey_id: 1,
            sessions: HashMap::new(),
        }
    }

    /// The public identity keys.
    pub fn identity(&self) -> IdentityKeys {
        IdentityKeys {
            signing: self.signing.verifying_key().to_bytes(),
            dh: PublicKey::from(&self.identity_dh).to_bytes(),
        }
    }

    /// The remote device's identity as this device's session knows it.
    pub fn remote_identity(&self, user: &str, device: u32) -> Option<IdentityKeys> {
        self.sessions
            .get(&(user.to_owned(), device))
            .map(|s| s.remote)
    }

    /// A `KeysUpload` with `one_time` new one-time prekeys.
    pub fn upload(&mut self, request: u32, one_time: u32) -> ClientFrame {
        let mut fresh = Vec::with_capacity(one_time as usize);
        for _ in 0..one_time {
            let id = self.next_prekey_id;
            self.next_prekey_id += 1;
            let secret = StaticSecret::from(random32());
            fresh.push(Prekey {
                id,
                key: PublicKey::from(&secret).to_bytes(),
            });
            self.one_time.insert(id, secret);
        }
        let spk = Prekey {
            id: self.signed_prekey.0,
            key: PublicKey::from(&self.signed_prekey.1).to_bytes(),
        };
        let lr = Prekey {
            id: LAST_RESORT_ID,
            key: PublicKey::from(&self.last_resort).to_bytes(),
        };
        let sign = |role, p: &Prekey| self.signing.sign(&prekey_signing_message(role, p));
        ClientFrame::KeysUpload {
            request,
            identity: self.identity(),
            signed_prekey: spk,
            signed_prekey_signature: sign(SignedPrekey::Signed, &spk).to_bytes(),
            last_resort: lr,
            last_resort_signature: sign(SignedPrekey::LastResort, &lr).to_bytes(),
            one_time: fresh,
        }
    }

    /// True when this device has a session with `user`'s `device`.
    pub fn has_session(&self, user: &str, device: u32) -> bool {
        self.sessions.contains_key(&(user.to_owned(), device))
    }

    /// Forgets the session with a device (after a key change).
    pub fn forget(&mut self, user: &str, device: u32) {
        self.sessions.remove(&(user.to_owned(), device));
    }

    /// Starts a session with `user`'s device from its bundle (X3DH as the
    /// initiator). Refuses a bundle whose signatures do not verify.
    pub fn start_session(&mut self, user: &str, bundle: &DeviceBundle) -> Result<(), CryptoError> {
        let ephemeral = StaticSecret::from(random32());
        let ek = PublicKey::from(&ephemeral).to_bytes();
        let identity = self.identity();
        let agreed = x3dh::initiate(&self.identity_dh, &identity, &ephemeral, bundle)?;
        let mut header = Vec::with_capacity(PREKEY_HEADER);
        header.extend_from_slice(&identity.signing);
        header.extend_from_slice(&identity.dh);
        header.extend_from_slice(&ek);
        header.extend_from_slice(&bundle.signed_prekey.id.to_le_bytes());
        header.push(bundle.prekey_kind as u8);
        header.extend_from_slice(&bundle.prekey.id.to_le_bytes());
        let ratchet = Ratchet::initiator(&agreed.secret, &bundle.signed_prekey.key)?;
        self.sessions.insert(
            (user.to_owned(), bundle.device),
            Session {
                ratchet,
                associated_data: agreed.associated_data,
                prekey_header: Some(header),
                ephemeral: ek,
                remote: bundle.identity,
            },
        );
        Ok(())
    }

    /// Encrypts `plaintext` for one device this device has a session with.
    pub fn encrypt(
        &mut self,
        user: &str,
        device: u32,
        plaintext: &[u8],
    ) -> Result<Bytes, CryptoError> {
        let s = self
            .sessions
            .get_mut(&(user.to_owned(), device))
            .ok_or(CryptoError::NoSession)?;
        let (header, key) = s.ratchet.next_send()?;
        let mut out = Vec::with_capacity(1 + PREKEY_HEADER + HEADER + plaintext.len() + 16);
        match &s.prekey_header {
            Some(h) => {
                out.push(PREKEY_MESSAGE);
                out.extend_from_slice(h);
            }
            None => out.push(MESSAGE),
        }
        header.encode(&mut out);
        let mut aad = s.associated_data.clone();
        aad.extend_from_slice(&out);
        out.extend_from_slice(&ratchet::seal(&key, &aad, plaintext));
        Ok(Bytes::from(out))
    }

    /// Encrypts `plaintext` once per device in `to`, for a per-device send.
    pub fn encrypt_for(
        &mut self,
        to: &[(String, u32)],
        plaintext: &[u8],
    ) -> Result<Vec<DeviceCiphertext>, CryptoError> {
        to.iter()
            .map(|(user, device)| {
                Ok(DeviceCiphertext {
                    user: user.clone(),
                    device: *device,
                    body: self.encrypt(user, *device, plaintext)?,
                })
            })
            .collect()
    }

    /// Decrypts a body `user`'s `device` sent to this device. Nothing
    /// changes unless the message authenticates: not the session, not the
    /// one-time prekey a first message names.
    pub fn decrypt(
        &mut self,
        user: &str,
        device: u32,
        body: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let (&kind, rest) = body.split_first().ok_or(CryptoError::Malformed)?;
        let x3dh_len = match kind {
            PREKEY_MESSAGE => PREKEY_HEADER,
            MESSAGE => 0,
            _ => return Err(CryptoError::Malformed),
        };
        if rest.len() < x3dh_len + HEADER + 16 {
            return Err(CryptoError::Malformed);
        }
        let key = (user.to_owned(), device);
        // A first message of a session this device does not have yet.
        let mut fresh: Option<(Session, Option<u32>)> = None;
        if kind == PREKEY_MESSAGE {
            let ek: [u8; 32] = rest[64..96]
                .try_into()
                .map_err(|_| CryptoError::Malformed)?;
            let known = self.sessions.get(&key).is_some_and(|s| s.ephemeral == ek);
            if !known {
                fresh = Some(self.accept(&rest[..PREKEY_HEADER])?);
            }
        }
        let header_end = 1 + x3dh_len + HEADER;
        let header = Header::decode(&body[1 + x3dh_len..header_end])?;
        let session = match &fresh {
            Some((s, _)) => s,
            None => self.sessions.get(&key).ok_or(CryptoError::NoSession)?,
        };
        let mut ratchet = session.ratchet.clone();
        let mk = ratchet.key_for(&header)?;
        let mut aad = session.associated_data.clone();
        aad.extend_from_slice(&body[..header_end]);
        let plain = ratchet::open(&mk, &aad, &body[header_end..])?;
        if let Some((s, used)) = fresh {
            if let Some(id) = used {
                // Used once: its private half is deleted now.
                self.one_time.remove(&id);
            }
            self.sessions.insert(key.clone(), s);
        }
        if let Some(s) = self.sessions.get_mut(&key) {
            s.ratchet = ratchet;
            // The other side has the session: plain messages from now.
            s.prekey_header = None;
        }
        Ok(plain)
    }

    /// A session from a prekey message's header (X3DH as the responder),
    /// and the one-time prekey it would use up.
    fn accept(&self, header: &[u8]) -> Result<(Session, Option<u32>), CryptoError> {
        let arr = |at: usize| -> Result<[u8; 32], CryptoError> {
            header[at..at + 32]
                .try_into()
                .map_err(|_| CryptoError::Malformed)
        };
        let u32_at = |at: usize| -> Result<u32, CryptoError> {
            Ok(u32::from_le_bytes(
                header[at..at + 4]
                    .try_into()
                    .map_err(|_| CryptoError::Malformed)?,
            ))
        };
        let remote = IdentityKeys {
            signing: arr(0)?,
            dh: arr(32)?,
        };
        let ek = arr(64)?;
        let spk_id = u32_at(96)?;
        let kind = header[100];
        let prekey_id = u32_at(101)?;
        if spk_id != self.signed_prekey.0 {
            return Err(CryptoError::Malformed);
        }
        let one_time = match kind {
            k if k == PrekeyKind::OneTime as u8 => Some(
                self.one_time
                    .get(&prekey_id)
                    .ok_or(CryptoError::Malformed)?
                    .clone(),
            ),
            k if k == PrekeyKind::LastResort as u8 && prekey_id == LAST_RESORT_ID => None,
            _ => return Err(CryptoError::Malformed),
        };
        let prekey = one_time.as_ref().unwrap_or(&self.last_resort);
        let agreed = x3dh::respond(
            &self.identity_dh,
            &self.identity(),
            &self.signed_prekey.1,
            prekey,
            &remote,
            &ek,
        )?;
        let session = Session {
            ratchet: Ratchet::responder(&agreed.secret, self.signed_prekey.1.clone()),
            associated_data: agreed.associated_data,
            prekey_header: None,
            ephemeral: ek,
            remote,
        };
        Ok((session, one_time.is_some().then_some(prekey_id)))
    }
}

/// A number two users compare (read aloud or as a QR code) to check that
/// the server handed each the other's real identity: 60 digits from a
/// SHA-256 of both identities in a fixed order. The server can forge
/// bundles, but not a matching safety number.
pub fn safety_number(a: &IdentityKeys, b: &IdentityKeys) -> String {
    let (first, second) = if (a.signing, a.dh) <= (b.signing, b.dh) {
        (a, b)
    } else {
        (b, a)
    };
    let mut digits = String::with_capacity(60);
    let mut counter = 0u32;
    while digits.len() < 60 {
        let mut h = Sha256::new();
        h.update(b"courier safety number v1");
        h.update(counter.to_le_bytes());
        for k in [&first.signing, &first.dh, &second.signing, &second.dh] {
            h.update(k);
        }
        for chunk in h.finalize().chunks(5) {
            if chunk.len() == 5 && digits.len() < 60 {
                let v = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                digits.push_str(&format!("{:05}", v % 100_000));
            }
        }
        counter += 1;
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_protocol::frame::{DeviceBundle, PrekeyKind};

    /// The bundle the server would hand out for `d`, from its upload.
    fn bundle_of(d: &mut Device, one_time: bool) -> DeviceBundle {
        let ClientFrame::KeysUpload {
            identity,
            signed_prekey,
            signed_prekey_signature,
            last_resort,
            last_resort_signature,
            one_time: otks,
            ..
        } = d.upload(1, 2)
        else {
            unreachable!()
        };
        let (kind, prekey, sig) = if one_time {
            (PrekeyKind::OneTime, otks[0], [0; 64])
        } else {
            (PrekeyKind::LastResort, last_resort, last_resort_signature)
        };
        DeviceBundle {
            device: d.device,
            identity,
            signed_prekey,
            signed_prekey_signature,
            prekey_kind: kind,
            prekey,
            prekey_signature: sig,
        }
    }

    #[test]
    fn two_devices_talk_both_ways_with_one_time_and_last_resort_prekeys() {
        for one_time in [true, false] {
            let mut alice = Device::new("alice", 1);
            let mut bob = Device::new("bob", 1);
            let b = bundle_of(&mut bob, one_time);
            alice.start_session("bob", &b).unwrap();
            let m1 = alice.encrypt("bob", 1, b"hello bob").unwrap();
            let m2 = alice.encrypt("bob", 1, b"second").unwrap();
            assert_eq!(m1[0], PREKEY_MESSAGE);
            // Out of order, and the repeated prekey header reuses the session.
            assert_eq!(bob.decrypt("alice", 1, &m2).unwrap(), b"second");
            assert_eq!(bob.decrypt("alice", 1, &m1).unwrap(), b"hello bob");
            assert_eq!(bob.decrypt("alice", 1, &m1), Err(CryptoError::BadCounter));
            let r = bob.encrypt("alice", 1, b"hi alice").unwrap();
            assert_eq!(r[0], MESSAGE);
            assert_eq!(alice.decrypt("bob", 1, &r).unwrap(), b"hi alice");
            let m3 = alice.encrypt("bob", 1, b"plain header now").unwrap();
            assert_eq!(m3[0], MESSAGE);
            assert_eq!(bob.decrypt("alice", 1, &m3).unwrap(), b"plain header now");
            assert_eq!(
                safety_number(&alice.identity(), &bob.identity()),
                safety_number(
                    &bob.remote_identity("alice", 1).unwrap(),
                    &alice.remote_identity("bob", 1).unwrap()
                )
            );
        }
    }

    #[test]
    fn a_one_time_prekey_starts_one_session_only() {
        let mut alice = Device::new("alice", 1);
        let mut eve = Device::new("eve", 1);
        let mut bob = Device::new("bob", 1);
        let b = bundle_of(&mut bob, true);
        alice.start_session("bob", &b).unwrap();
        eve.start_session("bob", &b).unwrap();
        let m = alice.encrypt("bob", 1, b"first").unwrap();
        assert_eq!(bob.decrypt("alice", 1, &m).unwrap(), b"first");
        // A second first message on the same (used) prekey is refused.
        let e = eve.encrypt("bob", 1, b"also first").unwrap();
        assert_eq!(bob.decrypt("eve", 1, &e), Err(CryptoError::Malformed));
    }

    #[test]
    fn forged_bundles_and_tampered_messages_are_refused() {
        let mut alice = Device::new("alice", 1);
        let mut bob = Device::new("bob", 1);
        let mut forged = bundle_of(&mut bob, true);
        forged.signed_prekey.key[0] ^= 1;
        assert_eq!(
            alice.start_session("bob", &forged),
            Err(CryptoError::BadBundle)
        );
        let mut forged = bundle_of(&mut bob, false);
        forged.prekey.key = PublicKey::from(&StaticSecret::from([5; 32])).to_bytes();
        assert_eq!(
            alice.start_session("bob", &forged),
            Err(CryptoError::BadBundle)
        );

        let b = bundle_of(&mut bob, true);
        alice.start_session("bob", &b).unwrap();
        let m = alice.encrypt("bob", 1, b"attack at dawn").unwrap();
        let mut bad = m.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(bob.decrypt("alice", 1, &bad).is_err());
        // The real one still opens: the forgery did not burn its number.
        assert_eq!(bob.decrypt("alice", 1, &m).unwrap(), b"attack at dawn");
        assert!(!m.windows(6).any(|w| w == b"attack"));
        assert_eq!(
            bob.decrypt("alice", 1, &[9, 9]),
            Err(CryptoError::Malformed)
        );
        assert_eq!(
            bob.decrypt("carol", 1, &[MESSAGE; 60]),
            Err(CryptoError::NoSession)
        );
    }
}
