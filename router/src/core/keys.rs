//! The key directory and the other server halves of end-to-end
//! encryption: per-device send validation and history archives.
//!
//! - **Keys.** Each device uploads an Ed25519 identity key (it signs the
//!   prekeys), an X25519 identity key (X3DH), a signed prekey, a signed
//!   last-resort prekey and one-time prekeys. Both signatures are checked
//!   on upload; a bad one refuses the whole upload.
//! - **One-time prekeys are handed out once.** A bundle fetch takes the
//!   lowest-numbered prekey of each device and deletes it in the same
//!   batch; the answer leaves only after that batch is durable. The router
//!   is one thread deciding batches in order, and within a batch the keys
//!   already taken are skipped, so no two fetches get the same prekey. A
//!   device with none left is served its last-resort prekey, marked so.
//! - **Key changes.** An upload with a different identity than the stored
//!   one drops the device's old one-time prekeys (their private halves
//!   belonged to the old identity) and tells the live devices of everyone
//!   who shares a conversation with the user, and the user's other
//!   devices.
//! - **Per-device sends** must address exactly the recipients' current
//!   devices: every linked device with keys of every member, the sender's
//!   other devices included and the sending device excluded.
//! - **Archives** are opaque bytes one device leaves for another of the
//!   same user, kept until fetched over and again until they expire.

use std::sync::Arc;

use bytes::Bytes;
use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{
    prekey_signing_message, DeviceAddress, DeviceBundle, DeviceCiphertext, E2eeFrame, IdentityKeys,
    Prekey, PrekeyKind, ServerFrame, Signature, SignedPrekey,
};
use courier_protocol::ids;
use ed25519_dalek::{Signature as EdSignature, VerifyingKey};
use rustc_hash::{FxHashMap, FxHashSet};

use super::{error_frame, ws_frame, Batch, Outbox, Pending, Reject, RouterCore};
use crate::api::{Class, Delivery, Device, Devices, SessionKey};
use crate::codec::{ArchiveRecord, IdentityRecord};
use crate::metrics::KindLabel;
use crate::store::{self, Part, StoreError};

/// Most one-time prekeys one upload may carry.
pub const MAX_PREKEYS_PER_UPLOAD: usize = 500;

/// Most archives one sweep deletes.
const ARCHIVE_SWEEP_LIMIT: usize = 1_000;

/// The key directory's in-memory state.
#[derive(Debug, Default)]
pub(super) struct KeyDirectory {
    /// Identity records of users seen since the start (or since the last
    /// failed commit), by user then device; loaded on first use, changed by
    /// the batch being decided. Dropped whole after a failed commit.
    identities: FxHashMap<Arc<str>, Vec<(u32, IdentityRecord)>>,
    /// One-time prekeys stored over every device (the metric).
    pub stock: u64,
}

/// What the batch holds back for the key directory until its commit.
#[derive(Debug)]
pub(super) enum KeysPending {
    /// An answer to `session`; `StoreUnavailable` for `reference` if the
    /// commit fails.
    Reply {
        session: SessionKey,
        frame: E2eeFrame,
        reference: u64,
    },
    /// A frame for the sessions of `users` (live or not: these are not
    /// conversation entries), but not `except`'s.
    Push {
        users: Vec<Arc<str>>,
        except: Option<(Arc<str>, u32)>,
        frame: E2eeFrame,
    },
    /// A frame for one device's session.
    ToDevice {
        user: Arc<str>,
        device: u32,
        frame: E2eeFrame,
    },
    /// A per-device send refused for its device list.
    Mismatch {
        session: SessionKey,
        client_id: u64,
        missing: Vec<DeviceAddress>,
        stale: Vec<DeviceAddress>,
    },
}

/// The devices a per-device send got wrong.
#[derive(Debug)]
pub(super) struct Mismatch {
    pub missing: Vec<DeviceAddress>,
    pub stale: Vec<DeviceAddress>,
}

/// A `KeysUpload` frame's fields.
#[derive(Debug)]
pub(super) struct Upload {
    pub request: u32,
    pub identity: IdentityKeys,
    pub signed_prekey: Prekey,
    pub signed_prekey_signature: Signature,
    pub last_resort: Prekey,
    pub last_resort_signature: Signature,
    pub one_time: Vec<Prekey>,
}

impl RouterCore {
    /// Reads the prekey stock recorded by the last run, for the metric.
    pub(super) fn load_key_stock(&mut self) {
        self.keys.stock = self.store.prekey_stock().unwrap_or(0);
        self.metrics.prekey_stock.set(self.keys.stock as i64);
    }

    /// Forgets cached key records after a failed commit.
    pub(super) fn keys_after_failed_commit(&mut self) {
        self.keys.identities.clear();
        self.load_key_stock();
    }

    /// The user's identity records (cached).
    fn identity_records(
        &mut self,
        user: &Arc<str>,
    ) -> Result<&mut Vec<(u32, IdentityRecord)>, StoreError> {
        if !self.keys.identities.contains_key(user) {
            let records = self.store.identities(user)?;
            self.keys.identities.insert(user.clone(), records);
        }
        Ok(self.keys.identities.entry(user.clone()).or_default())
    }

    /// The user's linked device numbers.
    fn linked_devices(&mut self, user: &Arc<str>) -> Result<Vec<u32>, StoreError> {
        Ok(self
            .user_state(user)?
            .devices
            .iter()
            .filter(|(_, r)| r.removed_ms == 0)
            .map(|(d, _)| *d)
            .collect())
    }

    /// The user's linked devices that have published keys, ascending.
    pub(super) fn keyed_devices(&mut self, user: &Arc<str>) -> Result<Vec<u32>, StoreError> {
        let linked = self.linked_devices(user)?;
        let mut out: Vec<u32> = self
            .identity_records(user)?
            .iter()
            .map(|(d, _)| *d)
            .filter(|d| linked.contains(d))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    fn set_stock(&mut self, b: &mut Batch, stock: u64) {
        self.keys.stock = stock;
        self.metrics.prekey_stock.set(stock as i64);
        b.writes.put(
            Part::Router,
            store::PREKEY_STOCK.to_vec(),
            stock.to_le_bytes().to_vec(),
        );
    }

    fn hold_keys_reply(
        b: &mut Batch,
        session: SessionKey,
        request: u32,
        result: Result<E2eeFrame, Reject>,
    ) {
        let reference = u64::from(request);
        match result {
            Ok(frame) => b.pending.push(Pending::Keys(KeysPending::Reply {
                session,
                frame,
                reference,
            })),
            Err(r) => b.pending.push(Pending::Answer {
                session,
                frame: error_frame(r.code, reference, r.detail),
                reference,
                send: false,
            }),
        }
    }

    // ----- uploads -----

    pub(super) fn keys_upload(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        upload: Upload,
    ) {
        let request = upload.request;
        let result = self.keys_upload_inner(b, device, upload);
        Self::hold_keys_reply(b, session, request, result);
    }

    fn keys_upload_inner(
        &mut self,
        b: &mut Batch,
        device: &Device,
        u: Upload,
    ) -> Result<E2eeFrame, Reject> {
        let bad = |detail: &str| Reject::new(ErrorCode::BadRequest, detail);
        if u.one_time.len() > MAX_PREKEYS_PER_UPLOAD {
            return Err(Reject::new(
                ErrorCode::BadRequest,
                format!("at most {MAX_PREKEYS_PER_UPLOAD} one-time prekeys per upload"),
            ));
        }
        // Verifying costs the router CPU: uploads spend send tokens.
        self.take_token(b, &device.user, self.batch_now_ms)?;
        let signer = VerifyingKey::from_bytes(&u.identity.signing)
            .map_err(|_| bad("identity signing key is not a valid Ed25519 key"))?;
        let verifies = |role: SignedPrekey, prekey: &Prekey, sig: &Signature| {
            let message = prekey_signing_message(role, prekey);
            signer
                .verify_strict(&message, &EdSignature::from_bytes(sig))
                .is_ok()
        };
        if !verifies(
            SignedPrekey::Signed,
            &u.signed_prekey,
            &u.signed_prekey_signature,
        ) {
            return Err(bad("signed prekey signature does not verify"));
        }
        if !verifies(
            SignedPrekey::LastResort,
            &u.last_resort,
            &u.last_resort_signature,
        ) {
            return Err(bad("last-resort prekey signature does not verify"));
        }
        let mut seen = FxHashSet::default();
        if !u.one_time.iter().all(|p| seen.insert(p.id)) {
            return Err(bad("a one-time prekey id appears twice"));
        }

        let user = device.user.clone();
        let old = self
            .identity_records(&user)?
            .iter()
            .find(|(d, _)| *d == device.device)
            .map(|(_, r)| *r);
        let changed = old.is_some_and(|o| {
            (o.identity_signing, o.identity_dh) != (u.identity.signing, u.identity.dh)
        });
        let mut stock = self.keys.stock;
        let mut count = old.map_or(0, |o| o.one_time);
        if changed {
            // The old prekeys' private halves went with the old identity.
            for key in self.store.prekey_keys(&user, device.device)? {
                b.writes.remove(Part::Prekeys, key);
            }
            stock = stock.saturating_sub(u64::from(count));
            count = 0;
        }
        let mut fresh = Vec::with_capacity(u.one_time.len());
        for p in &u.one_time {
            let key = store::prekey_key(&user, device.device, p.id);
            let known = !changed
                && (b.added_prekeys.contains(&key) || self.store.contains(Part::Prekeys, &key)?)
                && !b.taken_prekeys.contains(&key);
            fresh.push((key, p.key, known));
        }
        let added = fresh.iter().filter(|(_, _, known)| !known).count() as u32;
        if count + added > self.config.max_prekeys {
            return Err(Reject::new(
                ErrorCode::BadRequest,
                format!(
                    "a device keeps at most {} one-time prekeys; it has {count}",
                    self.config.max_prekeys
                ),
            ));
        }
        for (key, pk, _) in fresh {
            b.added_prekeys.insert(key.clone());
            b.taken_prekeys.remove(&key);
            b.writes
                .put(Part::Prekeys, key, crate::codec::encode_prekey(&pk));
        }
        count += added;
        stock += u64::from(added);

        let record = IdentityRecord {
            identity_signing: u.identity.signing,
            identity_dh: u.identity.dh,
            signed_prekey_id: u.signed_prekey.id,
            signed_prekey: u.signed_prekey.key,
            signed_prekey_signature: u.signed_prekey_signature,
            last_resort_id: u.last_resort.id,
            last_resort: u.last_resort.key,
            last_resort_signature: u.last_resort_signature,
            uploaded_ms: self.batch_now_ms,
            one_time: count,
        };
        self.put_identity(b, &user, device.device, record)?;
        self.set_stock(b, stock);
        if changed {
            self.announce_key_change(b, device, u.identity)?;
        }
        Ok(E2eeFrame::KeyCount {
            request: u.request,
            remaining: count,
        })
    }

    fn put_identity(
        &mut self,
        b: &mut Batch,
        user: &Arc<str>,
        device: u32,
        record: IdentityRecord,
    ) -> Result<(), StoreError> {
        let records = self.identity_records(user)?;
        match records.iter_mut().find(|(d, _)| *d == device) {
            Some((_, r)) => *r = record,
            None => records.push((device, record)),
        }
        b.writes.put(
            Part::Identities,
            store::device_key(user, device),
            record.encode(),
        );
        Ok(())
    }

    /// Tells everyone who shares a conversation with the user, and the
    /// user's other devices, that `device` has a new identity.
    fn announce_key_change(
        &mut self,
        b: &mut Batch,
        device: &Device,
        identity: IdentityKeys,
    ) -> Result<(), StoreError> {
        let mut users: Vec<Arc<str>> = vec![device.user.clone()];
        for (conversation, m) in self.store.memberships(&device.user)? {
            if m.left_seq > 0 || !self.load(&conversation)? {
                continue;
            }
            if let Some(conv) = self.conversations.get(conversation.as_str()) {
                for member in conv.members.iter() {
                    if !users.contains(&member.user) {
                        users.push(member.user.clone());
                    }
                }
            }
        }
        self.metrics.key_changes.inc();
        b.pending.push(Pending::Keys(KeysPending::Push {
            users,
            except: Some((device.user.clone(), device.device)),
            frame: E2eeFrame::KeyChange {
                user: device.user.to_string(),
                device: device.device,
                identity,
            },
        }));
        Ok(())
    }

    /// Tells a device that attaches with fewer one-time prekeys than the
    /// threshold (it may have been offline when they ran low).
    pub(super) fn remind_low_prekeys(&mut self, b: &mut Batch, device: &Device) {
        let threshold = self.config.prekey_low_threshold;
        let remaining = match self.identity_records(&device.user) {
            Ok(records) => records
                .iter()
                .find(|(d, _)| *d == device.device)
                .map(|(_, r)| r.one_time),
            Err(e) => {
                tracing::debug!(error = %e, "key records unavailable at attach");
                None
            }
        };
        if let Some(remaining) = remaining.filter(|r| *r < threshold) {
            self.metrics.prekey_low.inc();
            b.pending.push(Pending::Keys(KeysPending::ToDevice {
                user: device.user.clone(),
                device: device.device,
                frame: E2eeFrame::KeyCount {
                    request: 0,
                    remaining,
                },
            }));
        }
    }

    /// Deletes an unlinked device's keys and archive.
    pub(super) fn drop_keys(
        &mut self,
        b: &mut Batch,
        user: &Arc<str>,
        device: u32,
    ) -> Result<(), StoreError> {
        let records = self.identity_records(user)?;
        let Some(at) = records.iter().position(|(d, _)| *d == device) else {
            return Ok(());
        };
        let (_, old) = records.remove(at);
        for key in self.store.prekey_keys(user, device)? {
            b.writes.remove(Part::Prekeys, key);
        }
        b.writes
            .remove(Part::Identities, store::device_key(user, device));
        b.writes
            .remove(Part::Archives, store::device_key(user, device));
        let stock = self.keys.stock.saturating_sub(u64::from(old.one_time));
        self.set_stock(b, stock);
        Ok(())
    }

    pub(super) fn key_count(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
    ) {
        let result = self
            .identity_records(&device.user)
            .map(|records| {
                records
                    .iter()
                    .find(|(d, _)| *d == device.device)
                    .map_or(0, |(_, r)| r.one_time)
            })
            .map(|remaining| E2eeFrame::KeyCount { request, remaining })
            .map_err(Reject::from);
        Self::hold_keys_reply(b, session, request, result);
    }

    // ----- bundles -----

    pub(super) fn bundle_fetch(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
        user: String,
    ) {
        let result = self.bundle_inner(b, device, request, user);
        Self::hold_keys_reply(b, session, request, result);
    }

    fn bundle_inner(
        &mut self,
        b: &mut Batch,
        asker: &Device,
        request: u32,
        user: String,
    ) -> Result<E2eeFrame, Reject> {
        if !ids::is_valid_user_id(&user) {
            return Err(Reject::new(ErrorCode::BadRequest, "invalid user id"));
        }
        // A fetch can drain someone's prekeys: it spends a send token.
        self.take_token(b, &asker.user, self.batch_now_ms)?;
        let target: Arc<str> = Arc::from(user.as_str());
        let mut devices = Vec::new();
        for d in self.keyed_devices(&target)? {
            if *target == *asker.user && d == asker.device {
                continue;
            }
            devices.push(self.take_bundle(b, &target, d)?);
        }
        Ok(E2eeFrame::Bundle {
            request,
            user,
            devices,
        })
    }

    /// One device's bundle, taking one of its one-time prekeys.
    fn take_bundle(
        &mut self,
        b: &mut Batch,
        user: &Arc<str>,
        device: u32,
    ) -> Result<DeviceBundle, Reject> {
        let record = self
            .identity_records(user)?
            .iter()
            .find(|(d, _)| *d == device)
            .map(|(_, r)| *r)
            .ok_or_else(|| Reject::new(ErrorCode::StoreUnavailable, "key record vanished"))?;
        let taken = &b.taken_prekeys;
        let added = &b.added_prekeys;
        // Prekeys this batch uploaded are not in the store yet; they wait
        // for the next batch.
        let one_time = self
            .store
            .first_prekey(user, device, |k| taken.contains(k) || added.contains(k))?;
        let mut bundle = DeviceBundle {
            device,
            identity: IdentityKeys {
                signing: record.identity_signing,
                dh: record.identity_dh,
            },
            signed_prekey: Prekey {
                id: record.signed_prekey_id,
                key: record.signed_prekey,
            },
            signed_prekey_signature: record.signed_prekey_signature,
            prekey_kind: PrekeyKind::LastResort,
            prekey: Prekey {
                id: record.last_resort_id,
                key: record.last_resort,
            },
            prekey_signature: record.last_resort_signature,
        };
        let Some((key, id, pk)) = one_time else {
            self.metrics
                .prekeys_handed
                .get_or_create(&KindLabel {
                    kind: "last_resort",
                })
                .inc();
            return Ok(bundle);
        };
        bundle.prekey_kind = PrekeyKind::OneTime;
        bundle.prekey = Prekey { id, key: pk };
        bundle.prekey_signature = [0; 64];
        b.taken_prekeys.insert(key.clone());
        b.writes.remove(Part::Prekeys, key);
        let mut updated = record;
        updated.one_time = record.one_time.saturating_sub(1);
        self.put_identity(b, user, device, updated)?;
        let stock = self.keys.stock.saturating_sub(1);
        self.set_stock(b, stock);
        self.metrics
            .prekeys_handed
            .get_or_create(&KindLabel { kind: "one_time" })
            .inc();
        // Told when the stock falls below the threshold, and again when it
        // runs out.
        let threshold = self.config.prekey_low_threshold;
        let remaining = updated.one_time;
        if (remaining + 1 == threshold) || (remaining == 0 && threshold > 0) {
            self.metrics.prekey_low.inc();
            b.pending.push(Pending::Keys(KeysPending::ToDevice {
                user: user.clone(),
                device,
                frame: E2eeFrame::KeyCount {
                    request: 0,
                    remaining,
                },
            }));
        }
        Ok(bundle)
    }

    // ----- per-device sends -----

    /// Checks a per-device send's addresses against the conversation
    /// members' current keyed devices. `Err` is 400 for a repeated address,
    /// or a mismatch listing what is missing and what is stale.
    pub(super) fn check_devices(
        &mut self,
        sender: &Device,
        members: &[Arc<str>],
        ciphertexts: &[DeviceCiphertext],
    ) -> Result<(), Reject> {
        let mut provided: FxHashSet<(&str, u32)> = FxHashSet::default();
        for c in ciphertexts {
            if !provided.insert((c.user.as_str(), c.device)) {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "a device is addressed twice",
                ));
            }
        }
        let mut expected: FxHashMap<Arc<str>, Vec<u32>> = FxHashMap::default();
        for user in members {
            // Fleet mode: another partition's user's devices as its
            // partition answered them (see `peer.rs`).
            let remote = self
                .peer
                .resolved
                .as_ref()
                .and_then(|r| r.get(user))
                .cloned();
            let mut devices = match remote {
                Some(devices) => devices,
                None => self.keyed_devices(user)?,
            };
            if *user == sender.user {
                devices.retain(|d| *d != sender.device);
            }
            expected.insert(user.clone(), devices);
        }
        let mut missing = Vec::new();
        for (user, devices) in &expected {
            for d in devices {
                if !provided.contains(&(&**user, *d)) {
                    missing.push(DeviceAddress {
                        user: user.to_string(),
                        device: *d,
                    });
                }
            }
        }
        let mut stale: Vec<DeviceAddress> = provided
            .iter()
            .filter(|(u, d)| !expected.get(*u).is_some_and(|ds| ds.contains(d)))
            .map(|(u, d)| DeviceAddress {
                user: (*u).to_owned(),
                device: *d,
            })
            .collect();
        if missing.is_empty() && stale.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        stale.sort_unstable();
        self.metrics.device_mismatches.inc();
        let detail = format!(
            "device list mismatch: {} missing, {} stale",
            missing.len(),
            stale.len()
        );
        Err(Reject {
            code: ErrorCode::DeviceMismatch,
            detail,
            mismatch: Some(Box::new(Mismatch { missing, stale })),
        })
    }

    // ----- archives -----

    pub(super) fn archive_upload(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
        target: u32,
        archive: Bytes,
    ) {
        let reference = u64::from(request);
        let result = self.archive_upload_inner(b, device, target, archive);
        let frame = match result {
            Ok(()) => ServerFrame::Done { request },
            Err(r) => error_frame(r.code, reference, r.detail),
        };
        b.pending.push(Pending::Answer {
            session,
            frame,
            reference,
            send: false,
        });
    }

    fn archive_upload_inner(
        &mut self,
        b: &mut Batch,
        device: &Device,
        target: u32,
        archive: Bytes,
    ) -> Result<(), Reject> {
        if archive.len() > self.config.archive_max_bytes {
            return Err(Reject::new(
                ErrorCode::BodyTooLarge,
                format!(
                    "archive is {} bytes; the limit is {}",
                    archive.len(),
                    self.config.archive_max_bytes
                ),
            ));
        }
        if target == device.device {
            return Err(Reject::new(
                ErrorCode::BadRequest,
                "an archive is for another device of the user",
            ));
        }
        if !self.linked_devices(&device.user)?.contains(&target) {
            return Err(Reject::new(ErrorCode::BadRequest, "no such linked device"));
        }
        self.take_token(b, &device.user, self.batch_now_ms)?;
        let record = ArchiveRecord {
            from_device: device.device,
            created_ms: self.batch_now_ms,
            archive,
        };
        b.writes.put(
            Part::Archives,
            store::device_key(&device.user, target),
            record.encode(),
        );
        Ok(())
    }

    pub(super) fn archive_fetch(
        &mut self,
        b: &mut Batch,
        session: SessionKey,
        device: &Device,
        request: u32,
    ) {
        let ttl = self.config.archive_ttl.as_millis() as u64;
        let now = self.batch_now_ms;
        let result = match self.store.archive(&device.user, device.device) {
            Ok(Some(a)) if a.created_ms.saturating_add(ttl) > now => Ok(E2eeFrame::Archive {
                request,
                from_device: a.from_device,
                created_ms: a.created_ms,
                archive: a.archive,
            }),
            Ok(_) => Err(Reject::new(
                ErrorCode::UnknownConversation,
                "no archive waits for this device",
            )),
            Err(e) => Err(Reject::from(e)),
        };
        Self::hold_keys_reply(b, session, request, result);
    }

    /// Deletes archives past their time (called by the sweep).
    pub(super) fn sweep_archives(&mut self, now_ms: u64) {
        let ttl = self.config.archive_ttl.as_millis() as u64;
        let cutoff = now_ms.saturating_sub(ttl);
        let expired = match self.store.expired_archives(cutoff, ARCHIVE_SWEEP_LIMIT) {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "archive sweep could not read the store");
                return;
            }
        };
        if expired.is_empty() {
            return;
        }
        let mut writes = store::WriteSet::default();
        for key in expired {
            writes.remove(Part::Archives, key);
        }
        if let Err(e) = self.store.commit(writes, false) {
            tracing::warn!(error = %e, "archive sweep commit failed");
        }
    }

    // ----- answers -----

    pub(super) fn answer_keys(&self, out: &mut Outbox, pending: KeysPending, committed: bool) {
        match pending {
            KeysPending::Reply {
                session,
                frame,
                reference,
            } => {
                if committed {
                    out.push(Delivery::Frame {
                        session,
                        class: Class::Reply,
                        frame: ws_frame(&frame),
                        origin: None,
                    });
                } else {
                    let detail = "not handled: the store is unavailable; retry".to_owned();
                    out.reply(
                        session,
                        &error_frame(ErrorCode::StoreUnavailable, reference, detail),
                    );
                }
            }
            KeysPending::Push {
                users,
                except,
                frame,
            } => {
                if !committed {
                    return;
                }
                let bytes = ws_frame(&frame);
                for user in &users {
                    if let Some((home, mine)) = self.elsewhere(user) {
                        let devices = match &except {
                            Some((u, d)) if u == user => Devices::Except(*d),
                            _ => Devices::All,
                        };
                        out.relay(home, mine, user, devices, Class::Message, None, &bytes);
                        continue;
                    }
                    for r in self.routes.get(user).into_iter().flatten() {
                        if except
                            .as_ref()
                            .is_some_and(|(u, d)| u == user && *d == r.device)
                        {
                            continue;
                        }
                        out.push(Delivery::Frame {
                            session: r.session,
                            class: Class::Message,
                            frame: bytes.clone(),
                            origin: None,
                        });
                    }
                }
            }
            KeysPending::ToDevice {
                user,
                device,
                frame,
            } => {
                if !committed {
                    return;
                }
                let route = self
                    .routes
                    .get(&user)
                    .into_iter()
                    .flatten()
                    .find(|r| r.device == device);
                if let Some(r) = route {
                    out.push(Delivery::Frame {
                        session: r.session,
                        class: Class::Message,
                        frame: ws_frame(&frame),
                        origin: None,
                    });
                }
            }
            KeysPending::Mismatch {
                session,
                client_id,
                missing,
                stale,
            } => {
                if committed {
                    let frame = E2eeFrame::DeviceMismatch {
                        client_id,
                        missing,
                        stale,
                    };
                    out.push(Delivery::Frame {
                        session,
                        class: Class::Reply,
                        frame: ws_frame(&frame),
                        origin: None,
                    });
                    self.count_send_error(ErrorCode::DeviceMismatch);
                    let detail = "device list mismatch; fix sessions and retry".to_owned();
                    out.reply(
                        session,
                        &error_frame(ErrorCode::DeviceMismatch, client_id, detail),
                    );
                } else {
                    self.count_send_error(ErrorCode::StoreUnavailable);
                    let detail = "not handled: the store is unavailable; retry".to_owned();
                    out.reply(
                        session,
                        &error_frame(ErrorCode::StoreUnavailable, client_id, detail),
                    );
                }
            }
        }
    }
}
