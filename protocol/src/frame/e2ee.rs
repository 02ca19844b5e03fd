//! The end-to-end encryption frames: the key directory, per-device sends,
//! device-list mismatches and the history archive of a newly linked device.
//!
//! Client frames of this family are [`ClientFrame`] variants (types
//! `0x14`–`0x19`). Server frames are their own enum, [`E2eeFrame`] (types
//! `0x52`–`0x56`), decoded by [`Incoming::decode`] together with
//! [`ServerFrame`]: on the wire they are ordinary frame types; the split
//! only keeps existing exhaustive matches over [`ServerFrame`] compiling.
//!
//! Keys are raw 32-byte values (`key` in `docs/protocol.md`): Ed25519 and
//! X25519 public keys as their standard encodings. Signatures are raw
//! 64-byte Ed25519 signatures (`sig`) over [`prekey_signing_message`].

use bytes::{BufMut, Bytes};

use super::{put_bytes, put_str, DecodeError, Reader, ServerFrame};

/// A 32-byte public key (Ed25519 or X25519).
pub type PublicKey = [u8; 32];

/// A 64-byte Ed25519 signature.
pub type Signature = [u8; 64];

/// A device's long-term identity: an Ed25519 key that signs its prekeys
/// and an X25519 key for the X3DH key agreement. Two keys rather than one
/// converted key (XEdDSA), so each is used only by the algorithm it was
/// made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityKeys {
    pub signing: PublicKey,
    pub dh: PublicKey,
}

/// An X25519 prekey and the number its owner gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prekey {
    pub id: u32,
    pub key: PublicKey,
}

/// Which prekey a bundle hands out beside the signed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PrekeyKind {
    /// A one-time prekey: handed out with this bundle and never again.
    OneTime = 1,
    /// None was left: the device's signed last-resort prekey, which may be
    /// handed out many times.
    LastResort = 2,
}

/// What a bundle says about one linked device of the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBundle {
    pub device: u32,
    pub identity: IdentityKeys,
    pub signed_prekey: Prekey,
    pub signed_prekey_signature: Signature,
    pub prekey_kind: PrekeyKind,
    pub prekey: Prekey,
    /// The last-resort prekey's signature; all zeros for a one-time prekey
    /// (those are not signed).
    pub prekey_signature: Signature,
}

/// One ciphertext of a per-device send, for one device of one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCiphertext {
    pub user: String,
    pub device: u32,
    pub body: Bytes,
}

/// A (user, device) pair in a device-list mismatch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceAddress {
    pub user: String,
    pub device: u32,
}

/// Which of a device's prekeys a signature covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignedPrekey {
    /// The medium-term signed prekey.
    Signed,
    /// The last-resort prekey.
    LastResort,
}

/// The bytes an identity's Ed25519 key signs for a prekey: a label naming
/// the protocol and the prekey's role, the prekey id (`u32` little-endian)
/// and the X25519 public key. The role in the label keeps a signature on
/// one from being replayed as the other.
pub fn prekey_signing_message(role: SignedPrekey, prekey: &Prekey) -> Vec<u8> {
    let label: &[u8] = match role {
        SignedPrekey::Signed => b"courier.v1 signed prekey\0",
        SignedPrekey::LastResort => b"courier.v1 last-resort prekey\0",
    };
    let mut m = Vec::with_capacity(label.len() + 36);
    m.extend_from_slice(label);
    m.extend_from_slice(&prekey.id.to_le_bytes());
    m.extend_from_slice(&prekey.key);
    m
}

/// A server frame of the end-to-end encryption family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eeFrame {
    /// How many one-time prekeys the device has left: the answer to
    /// `KeysUpload`/`KeyCount` (`request` set), or pushed with `request ==
    /// 0` when a fetch took the stock below the low threshold.
    KeyCount { request: u32, remaining: u32 },
    /// The key bundle of each of `user`'s linked devices that has keys.
    Bundle {
        request: u32,
        user: String,
        devices: Vec<DeviceBundle>,
    },
    /// `user`'s `device` now has a different identity: sessions with it
    /// must be rebuilt, and the safety number changed.
    KeyChange {
        user: String,
        device: u32,
        identity: IdentityKeys,
    },
    /// A per-device send named the wrong devices: `missing` lack a
    /// ciphertext, `stale` are not (or no longer) the recipients' devices.
    /// Followed by `Error` 409 with the same reference.
    DeviceMismatch {
        client_id: u64,
        missing: Vec<DeviceAddress>,
        stale: Vec<DeviceAddress>,
    },
    /// The history archive another device of the user left for this one.
    Archive {
        request: u32,
        from_device: u32,
        created_ms: u64,
        archive: Bytes,
    },
}

/// Any frame a client receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Frame(ServerFrame),
    E2ee(E2eeFrame),
}

impl Incoming {
    /// Decodes a server frame of either family.
    pub fn decode(payload: &Bytes) -> Result<Self, DecodeError> {
        match payload.first() {
            Some(t) if (ty::KEY_COUNT..=ty::LAST).contains(t) => {
                E2eeFrame::decode(payload).map(Self::E2ee)
            }
            _ => ServerFrame::decode(payload).map(Self::Frame),
        }
    }
}

pub(super) mod ty {
    pub const KEYS_UPLOAD: u8 = 0x14;
    pub const BUNDLE_FETCH: u8 = 0x15;
    pub const SEND_PER_DEVICE: u8 = 0x16;
    pub const ARCHIVE_UPLOAD: u8 = 0x17;
    pub const ARCHIVE_FETCH: u8 = 0x18;
    pub const KEY_COUNT_QUERY: u8 = 0x19;

    pub const KEY_COUNT: u8 = 0x52;
    pub const BUNDLE: u8 = 0x53;
    pub const KEY_CHANGE: u8 = 0x54;
    pub const DEVICE_MISMATCH: u8 = 0x55;
    pub const ARCHIVE: u8 = 0x56;
    /// The last type of the server family reserved for these frames.
    pub const LAST: u8 = 0x5f;
}

impl E2eeFrame {
    /// Decodes one frame of this family.
    pub fn decode(payload: &Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let frame = match r.u8("type").map_err(|_| DecodeError::Empty)? {
            ty::KEY_COUNT => Self::KeyCount {
                request: r.u32("request")?,
                remaining: r.u32("remaining")?,
            },
            ty::BUNDLE => Self::Bundle {
                request: r.u32("request")?,
                user: r.str("user")?,
                devices: r.list("devices", |r| {
                    Ok(DeviceBundle {
                        device: r.u32("device")?,
                        identity: read_identity(r)?,
                        signed_prekey: read_prekey(r, "signed_prekey")?,
                        signed_prekey_signature: r.array("signed_prekey_signature")?,
                        prekey_kind: match r.u8("prekey_kind")? {
                            1 => PrekeyKind::OneTime,
                            2 => PrekeyKind::LastResort,
                            _ => return Err(DecodeError::OutOfRange("prekey_kind")),
                        },
                        prekey: read_prekey(r, "prekey")?,
                        prekey_signature: r.array("prekey_signature")?,
                    })
                })?,
            },
            ty::KEY_CHANGE => Self::KeyChange {
                user: r.str("user")?,
                device: r.u32("device")?,
                identity: read_identity(&mut r)?,
            },
            ty::DEVICE_MISMATCH => Self::DeviceMismatch {
                client_id: r.u64("client_id")?,
                missing: r.list("missing", read_address)?,
                stale: r.list("stale", read_address)?,
            },
            ty::ARCHIVE => Self::Archive {
                request: r.u32("request")?,
                from_device: r.u32("from_device")?,
                created_ms: r.u64("created_ms")?,
                archive: r.bytes("archive")?,
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
            Self::KeyCount { request, remaining } => {
                w.put_u8(ty::KEY_COUNT);
                w.put_u32_le(*request);
                w.put_u32_le(*remaining);
            }
            Self::Bundle {
                request,
                user,
                devices,
            } => {
                w.put_u8(ty::BUNDLE);
                w.put_u32_le(*request);
                put_str(w, user);
                w.put_u16_le(devices.len() as u16);
                for d in devices {
                    w.put_u32_le(d.device);
                    put_identity(w, &d.identity);
                    put_prekey(w, &d.signed_prekey);
                    w.extend_from_slice(&d.signed_prekey_signature);
                    w.put_u8(d.prekey_kind as u8);
                    put_prekey(w, &d.prekey);
                    w.extend_from_slice(&d.prekey_signature);
                }
            }
            Self::KeyChange {
                user,
                device,
                identity,
            } => {
                w.put_u8(ty::KEY_CHANGE);
                put_str(w, user);
                w.put_u32_le(*device);
                put_identity(w, identity);
            }
            Self::DeviceMismatch {
                client_id,
                missing,
                stale,
            } => {
                w.put_u8(ty::DEVICE_MISMATCH);
                w.put_u64_le(*client_id);
                for list in [missing, stale] {
                    w.put_u16_le(list.len() as u16);
                    for a in list {
                        put_str(w, &a.user);
                        w.put_u32_le(a.device);
                    }
                }
            }
            Self::Archive {
                request,
                from_device,
                created_ms,
                archive,
            } => {
                w.put_u8(ty::ARCHIVE);
                w.put_u32_le(*request);
                w.put_u32_le(*from_device);
                w.put_u64_le(*created_ms);
                put_bytes(w, archive);
            }
        }
    }
}

pub(super) fn read_identity(r: &mut Reader<'_>) -> Result<IdentityKeys, DecodeError> {
    Ok(IdentityKeys {
        signing: r.array("identity_signing")?,
        dh: r.array("identity_dh")?,
    })
}

pub(super) fn read_prekey(r: &mut Reader<'_>, field: &'static str) -> Result<Prekey, DecodeError> {
    Ok(Prekey {
        id: r.u32(field)?,
        key: r.array(field)?,
    })
}

fn read_address(r: &mut Reader<'_>) -> Result<DeviceAddress, DecodeError> {
    Ok(DeviceAddress {
        user: r.str("user")?,
        device: r.u32("device")?,
    })
}

pub(super) fn read_ciphertext(r: &mut Reader<'_>) -> Result<DeviceCiphertext, DecodeError> {
    Ok(DeviceCiphertext {
        user: r.str("user")?,
        device: r.u32("device")?,
        body: r.bytes("body")?,
    })
}

pub(super) fn put_identity(w: &mut Vec<u8>, id: &IdentityKeys) {
    w.extend_from_slice(&id.signing);
    w.extend_from_slice(&id.dh);
}

pub(super) fn put_prekey(w: &mut Vec<u8>, p: &Prekey) {
    w.put_u32_le(p.id);
    w.extend_from_slice(&p.key);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: E2eeFrame) {
        let mut buf = Vec::new();
        f.encode(&mut buf);
        let payload = Bytes::from(buf);
        assert_eq!(E2eeFrame::decode(&payload).as_ref(), Ok(&f));
        assert_eq!(Incoming::decode(&payload), Ok(Incoming::E2ee(f)));
    }

    fn bundle(kind: PrekeyKind) -> DeviceBundle {
        DeviceBundle {
            device: 2,
            identity: IdentityKeys {
                signing: [1; 32],
                dh: [2; 32],
            },
            signed_prekey: Prekey {
                id: 7,
                key: [3; 32],
            },
            signed_prekey_signature: [4; 64],
            prekey_kind: kind,
            prekey: Prekey {
                id: 9,
                key: [5; 32],
            },
            prekey_signature: [6; 64],
        }
    }

    #[test]
    fn e2ee_frames_round_trip() {
        round_trip(E2eeFrame::KeyCount {
            request: 3,
            remaining: 99,
        });
        round_trip(E2eeFrame::Bundle {
            request: 4,
            user: "bob".into(),
            devices: vec![bundle(PrekeyKind::OneTime), bundle(PrekeyKind::LastResort)],
        });
        round_trip(E2eeFrame::Bundle {
            request: 5,
            user: "nobody".into(),
            devices: vec![],
        });
        round_trip(E2eeFrame::KeyChange {
            user: "bob".into(),
            device: 1,
            identity: IdentityKeys {
                signing: [8; 32],
                dh: [9; 32],
            },
        });
        round_trip(E2eeFrame::DeviceMismatch {
            client_id: 11,
            missing: vec![DeviceAddress {
                user: "bob".into(),
                device: 2,
            }],
            stale: vec![
                DeviceAddress {
                    user: "bob".into(),
                    device: 3,
                },
                DeviceAddress {
                    user: "alice".into(),
                    device: 4,
                },
            ],
        });
        round_trip(E2eeFrame::Archive {
            request: 6,
            from_device: 1,
            created_ms: 12,
            archive: Bytes::from_static(b"\x00opaque\xff"),
        });
    }

    #[test]
    fn incoming_decodes_both_families() {
        let mut buf = Vec::new();
        ServerFrame::Pong { nonce: 5 }.encode(&mut buf);
        assert_eq!(
            Incoming::decode(&Bytes::from(buf)),
            Ok(Incoming::Frame(ServerFrame::Pong { nonce: 5 }))
        );
        assert_eq!(
            Incoming::decode(&Bytes::from_static(&[0x5f])),
            Err(DecodeError::UnknownType(0x5f))
        );
    }

    #[test]
    fn malformed_e2ee_frames_are_refused() {
        let mut buf = Vec::new();
        E2eeFrame::Bundle {
            request: 1,
            user: "b".into(),
            devices: vec![bundle(PrekeyKind::OneTime)],
        }
        .encode(&mut buf);
        // The prekey kind byte sits after request, user, count, device,
        // identity, signed prekey and its signature.
        let kind_at = 1 + 4 + 3 + 2 + 4 + 64 + 36 + 64;
        let mut bad = buf.clone();
        bad[kind_at] = 3;
        assert_eq!(
            E2eeFrame::decode(&Bytes::from(bad)),
            Err(DecodeError::OutOfRange("prekey_kind"))
        );
        // A key cut short.
        let short = Bytes::copy_from_slice(&buf[..kind_at - 10]);
        assert_eq!(
            E2eeFrame::decode(&short),
            Err(DecodeError::Truncated("signed_prekey_signature"))
        );
    }

    #[test]
    fn signing_messages_name_the_role() {
        let p = Prekey {
            id: 1,
            key: [7; 32],
        };
        assert_ne!(
            prekey_signing_message(SignedPrekey::Signed, &p),
            prekey_signing_message(SignedPrekey::LastResort, &p)
        );
    }
}
