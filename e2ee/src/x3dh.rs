//! X3DH, the extended triple Diffie-Hellman key agreement, as Signal
//! specifies it, with a separate X25519 identity key instead of XEdDSA.
//!
//! The initiator A takes B's bundle (identity keys IK_B, signed prekey
//! SPK_B, prekey OPK_B), checks SPK_B's signature with B's Ed25519
//! identity key, makes an ephemeral key EK_A and computes
//!
//! ```text
//!  DH1 = DH(IK_A, SPK_B)  DH2 = DH(EK_A, IK_B)  DH3 = DH(EK_A, SPK_B)
//!  DH4 = DH(EK_A, OPK_B)
//!  SK  = HKDF-SHA256(salt = 0³², ikm = 0xFF³² ‖ DH1 ‖ DH2 ‖ DH3 ‖ DH4,
//!                    info = "courier x3dh v1" ‖ AD), 32 bytes
//! ```
//!
//! with AD = IK_A(sign) ‖ IK_A(dh) ‖ IK_B(sign) ‖ IK_B(dh). B computes
//! the same from its private keys and A's header. OPK_B is a one-time
//! prekey when the server had one, else B's last-resort prekey (then the
//! agreement still binds a fresh EK_A, but a replayed first message is
//! caught only by the ratchet's counters).

use courier_protocol::frame::{
    prekey_signing_message, DeviceBundle, IdentityKeys, PrekeyKind, SignedPrekey,
};
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::CryptoError;

/// The info label of the HKDF step.
const INFO: &[u8] = b"courier x3dh v1";

/// What both sides derive: the shared secret SK that seeds the Double
/// Ratchet, and the associated data every message authenticates.
pub struct Agreement {
    pub secret: Zeroizing<[u8; 32]>,
    /// IK_A ‖ IK_B, initiator first.
    pub associated_data: Vec<u8>,
}

impl std::fmt::Debug for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agreement(secret)")
    }
}

/// Checks the bundle's signatures with its identity key.
pub fn verify_bundle(bundle: &DeviceBundle) -> Result<(), CryptoError> {
    let key =
        VerifyingKey::from_bytes(&bundle.identity.signing).map_err(|_| CryptoError::BadBundle)?;
    let check = |role, prekey, sig: &[u8; 64]| {
        key.verify_strict(
            &prekey_signing_message(role, prekey),
            &Signature::from_bytes(sig),
        )
        .map_err(|_| CryptoError::BadBundle)
    };
    check(
        SignedPrekey::Signed,
        &bundle.signed_prekey,
        &bundle.signed_prekey_signature,
    )?;
    if bundle.prekey_kind == PrekeyKind::LastResort {
        check(
            SignedPrekey::LastResort,
            &bundle.prekey,
            &bundle.prekey_signature,
        )?;
    }
    Ok(())
}

fn dh(secret: &StaticSecret, public: &[u8; 32]) -> Result<[u8; 32], CryptoError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(CryptoError::WeakKey);
    }
    Ok(shared.to_bytes())
}

fn associated_data(a: &IdentityKeys, b: &IdentityKeys) -> Vec<u8> {
    let mut ad = Vec::with_capacity(128);
    for k in [&a.signing, &a.dh, &b.signing, &b.dh] {
        ad.extend_from_slice(k);
    }
    ad
}

fn derive(dhs: [[u8; 32]; 4], ad: Vec<u8>) -> Agreement {
    let mut ikm = Zeroizing::new(Vec::with_capacity(160));
    ikm.extend_from_slice(&[0xff; 32]);
    for d in &dhs {
        ikm.extend_from_slice(d);
    }
    let hk = Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm);
    let mut info = INFO.to_vec();
    info.extend_from_slice(&ad);
    let mut secret = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8,160-byte limit.
    #[allow(clippy::expect_used)]
    hk.expand(&info, secret.as_mut())
        .expect("32 bytes is a valid HKDF length");
    Agreement {
        secret,
        associated_data: ad,
    }
}

/// The initiator's side: A's identity secret and public keys, a fresh
/// ephemeral secret, and B's verified bundle.
pub fn initiate(
    identity_dh: &StaticSecret,
    identity: &IdentityKeys,
    ephemeral: &StaticSecret,
    bundle: &DeviceBundle,
) -> Result<Agreement, CryptoError> {
    verify_bundle(bundle)?;
    let dhs = [
        dh(identity_dh, &bundle.signed_prekey.key)?,
        dh(ephemeral, &bundle.identity.dh)?,
        dh(ephemeral, &bundle.signed_prekey.key)?,
        dh(ephemeral, &bundle.prekey.key)?,
    ];
    Ok(derive(dhs, associated_data(identity, &bundle.identity)))
}

/// The responder's side: B's identity secret, signed prekey secret and
/// the prekey secret A used, with A's identity and ephemeral key.
pub fn respond(
    identity_dh: &StaticSecret,
    identity: &IdentityKeys,
    signed_prekey: &StaticSecret,
    prekey: &StaticSecret,
    initiator: &IdentityKeys,
    ephemeral: &[u8; 32],
) -> Result<Agreement, CryptoError> {
    let dhs = [
        dh(signed_prekey, &initiator.dh)?,
        dh(identity_dh, ephemeral)?,
        dh(signed_prekey, ephemeral)?,
        dh(prekey, ephemeral)?,
    ];
    Ok(derive(dhs, associated_data(initiator, identity)))
}
