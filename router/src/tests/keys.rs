//! The key directory and per-device sends: uploads and their signature
//! checks, bundles, one-time prekeys handed out once, exhaustion, the
//! low-prekey notice, key changes, device-list mismatches, per-device
//! fan-out and catch-up, and history archives.

use bytes::Bytes;
use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{
    prekey_signing_message, ClientFrame, DeviceAddress, DeviceBundle, DeviceCiphertext, E2eeFrame,
    IdentityKeys, Prekey, PrekeyKind, ServerFrame, SignedPrekey,
};
use ed25519_dalek::{Signer, SigningKey};

use super::{messages, Client, Harness};

const AB: &str = "d:alice:bob";

/// A device's keys for tests: a signing key from a seed, fake X25519
/// publics (the router never does DH, so any 32 bytes do).
struct Keys {
    signing: SigningKey,
    seed: u8,
}

impl Keys {
    fn new(seed: u8) -> Self {
        Self {
            signing: SigningKey::from_bytes(&[seed; 32]),
            seed,
        }
    }

    fn identity(&self) -> IdentityKeys {
        IdentityKeys {
            signing: self.signing.verifying_key().to_bytes(),
            dh: [self.seed ^ 0x55; 32],
        }
    }

    /// An upload with one-time prekeys numbered `ids`.
    fn upload(&self, request: u32, ids: std::ops::Range<u32>) -> ClientFrame {
        let spk = Prekey {
            id: 1,
            key: [self.seed.wrapping_add(1); 32],
        };
        let lr = Prekey {
            id: 0xffff_0000,
            key: [self.seed.wrapping_add(2); 32],
        };
        let sign = |role, p: &Prekey| {
            self.signing
                .sign(&prekey_signing_message(role, p))
                .to_bytes()
        };
        ClientFrame::KeysUpload {
            request,
            identity: self.identity(),
            signed_prekey: spk,
            signed_prekey_signature: sign(SignedPrekey::Signed, &spk),
            last_resort: lr,
            last_resort_signature: sign(SignedPrekey::LastResort, &lr),
            one_time: ids
                .map(|id| Prekey {
                    id,
                    key: [id as u8; 32],
                })
                .collect(),
        }
    }
}

fn fetch(request: u32, user: &str) -> ClientFrame {
    ClientFrame::BundleFetch {
        request,
        user: user.into(),
    }
}

fn bundles(frames: &[E2eeFrame], request: u32) -> Vec<DeviceBundle> {
    frames
        .iter()
        .find_map(|f| match f {
            E2eeFrame::Bundle {
                request: r,
                devices,
                ..
            } if *r == request => Some(devices.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no bundle for request {request} in {frames:?}"))
}

fn key_counts(frames: &[E2eeFrame]) -> Vec<(u32, u32)> {
    frames
        .iter()
        .filter_map(|f| match f {
            E2eeFrame::KeyCount { request, remaining } => Some((*request, *remaining)),
            _ => None,
        })
        .collect()
}

fn ct(user: &str, device: u32, body: &'static [u8]) -> DeviceCiphertext {
    DeviceCiphertext {
        user: user.into(),
        device,
        body: Bytes::from_static(body),
    }
}

fn per_device(client_id: u64, ciphertexts: Vec<DeviceCiphertext>) -> ClientFrame {
    ClientFrame::SendPerDevice {
        conversation: AB.into(),
        client_id,
        ciphertexts,
    }
}

/// Connects `user`/`device` and uploads keys with `n` one-time prekeys.
fn keyed(h: &mut Harness, user: &str, device: u32, seed: u8, n: u32) -> Client {
    let c = h.client(user, device, 0);
    h.connect(&c);
    let out = h.step(vec![c.frame(Keys::new(seed).upload(1, 1..n + 1))]);
    assert_eq!(key_counts(&out.e2ee(&c)), vec![(1, n)]);
    c
}

#[test]
fn uploaded_keys_come_back_in_a_bundle_with_one_one_time_prekey() {
    let mut h = Harness::new();
    let alice = keyed(&mut h, "alice", 1, 7, 3);
    let bob = h.client("bob", 1, 1);
    h.connect(&bob);

    let out = h.step(vec![bob.frame(fetch(5, "alice"))]);
    let devices = bundles(&out.e2ee(&bob), 5);
    assert_eq!(devices.len(), 1);
    let d = devices[0];
    assert_eq!(d.device, 1);
    assert_eq!(d.identity, Keys::new(7).identity());
    assert_eq!(d.signed_prekey.id, 1);
    assert_eq!(d.prekey_kind, PrekeyKind::OneTime);
    assert_eq!(d.prekey.id, 1, "the lowest-numbered prekey first");
    assert_eq!(d.prekey_signature, [0; 64]);

    let out = h.step(vec![alice.frame(ClientFrame::KeyCount { request: 6 })]);
    assert_eq!(key_counts(&out.e2ee(&alice)), vec![(6, 2)]);
    assert!(h.metrics_text().contains("courier_prekeys_stock 2"));

    // Keys survive a restart, and so does the stock metric.
    h.restart();
    let bob = bob.reconnect();
    h.connect(&bob);
    let out = h.step(vec![bob.frame(fetch(7, "alice"))]);
    assert_eq!(bundles(&out.e2ee(&bob), 7)[0].prekey.id, 2);
    assert!(h.metrics_text().contains("courier_prekeys_stock 1"));

    // A user with no keys has an empty bundle; an invalid id is refused.
    let out = h.step(vec![
        bob.frame(fetch(8, "carol")),
        bob.frame(fetch(9, "not valid!")),
    ]);
    assert!(bundles(&out.e2ee(&bob), 8).is_empty());
    assert_eq!(out.errors(&bob), vec![(400, 9)]);
}

#[test]
fn a_bad_signature_refuses_the_upload() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let good = Keys::new(3).upload(1, 1..4);

    let mut wrong_spk = good.clone();
    if let ClientFrame::KeysUpload {
        signed_prekey_signature,
        ..
    } = &mut wrong_spk
    {
        signed_prekey_signature[0] ^= 1;
    }
    // A signature by another identity.
    let mut other_signer = good.clone();
    if let (
        ClientFrame::KeysUpload {
            last_resort_signature,
            ..
        },
        ClientFrame::KeysUpload {
            last_resort_signature: theirs,
            ..
        },
    ) = (&mut other_signer, Keys::new(4).upload(1, 1..2))
    {
        *last_resort_signature = theirs;
    }
    // The signed prekey's signature offered for the last-resort prekey.
    let mut swapped = good.clone();
    if let ClientFrame::KeysUpload {
        signed_prekey,
        signed_prekey_signature,
        last_resort,
        last_resort_signature,
        ..
    } = &mut swapped
    {
        *last_resort = *signed_prekey;
        *last_resort_signature = *signed_prekey_signature;
    }
    let mut not_a_key = good.clone();
    if let ClientFrame::KeysUpload { identity, .. } = &mut not_a_key {
        // Not a point on the curve.
        identity.signing = [0xff; 32];
        identity.signing[31] = 0x7f;
    }
    let mut twice = good;
    if let ClientFrame::KeysUpload { one_time, .. } = &mut twice {
        one_time[1].id = one_time[0].id;
    }
    let out = h.step(vec![
        alice.frame(wrong_spk),
        alice.frame(other_signer),
        alice.frame(swapped),
        alice.frame(not_a_key),
        alice.frame(twice),
    ]);
    assert_eq!(
        out.errors(&alice),
        vec![(400, 1), (400, 1), (400, 1), (400, 1), (400, 1)]
    );
    let bob = h.client("bob", 1, 0);
    h.connect(&bob);
    let out = h.step(vec![bob.frame(fetch(2, "alice"))]);
    assert!(bundles(&out.e2ee(&bob), 2).is_empty(), "nothing was stored");
}

#[test]
fn one_time_prekeys_are_handed_out_once_then_the_last_resort_one() {
    let mut h = Harness::new();
    keyed(&mut h, "alice", 1, 9, 3);
    // Five fetchers in one batch, two more in the next.
    let fetchers: Vec<Client> = (0..7)
        .map(|i| {
            let c = h.client(&format!("u{i}"), 1, (i % 2) as u16);
            h.connect(&c);
            c
        })
        .collect();
    let out = h.step(
        fetchers[..5]
            .iter()
            .map(|c| c.frame(fetch(1, "alice")))
            .collect(),
    );
    let out2 = h.step(
        fetchers[5..]
            .iter()
            .map(|c| c.frame(fetch(1, "alice")))
            .collect(),
    );
    let mut one_time = Vec::new();
    let mut last_resort = 0;
    for (i, c) in fetchers.iter().enumerate() {
        let frames = if i < 5 { out.e2ee(c) } else { out2.e2ee(c) };
        let b = bundles(&frames, 1)[0];
        match b.prekey_kind {
            PrekeyKind::OneTime => one_time.push(b.prekey.id),
            PrekeyKind::LastResort => {
                assert_eq!(b.prekey.id, 0xffff_0000);
                assert_ne!(b.prekey_signature, [0; 64], "the last resort is signed");
                last_resort += 1;
            }
        }
    }
    one_time.sort_unstable();
    assert_eq!(one_time, vec![1, 2, 3], "each one-time prekey exactly once");
    assert_eq!(last_resort, 4);
    let text = h.metrics_text();
    assert!(text.contains("courier_prekeys_handed_total{kind=\"one_time\"} 3"));
    assert!(text.contains("courier_prekeys_handed_total{kind=\"last_resort\"} 4"));
    assert!(text.contains("courier_prekeys_stock 0"));
}

#[test]
fn a_fetch_whose_commit_fails_hands_out_nothing() {
    let mut h = Harness::new();
    keyed(&mut h, "alice", 1, 9, 2);
    let bob = h.client("bob", 1, 0);
    h.connect(&bob);
    h.core().fail_next_commits(1);
    let out = h.step(vec![bob.frame(fetch(1, "alice"))]);
    assert!(out.e2ee(&bob).is_empty());
    assert_eq!(out.errors(&bob), vec![(503, 1)]);
    let out = h.step(vec![bob.frame(fetch(2, "alice"))]);
    assert_eq!(bundles(&out.e2ee(&bob), 2)[0].prekey.id, 1);
}

#[test]
fn a_device_is_told_when_its_prekeys_run_low_and_out() {
    let mut h = Harness::with(|c| c.prekey_low_threshold = 2);
    let alice = keyed(&mut h, "alice", 1, 1, 3);
    let bob = h.client("bob", 1, 1);
    h.connect(&bob);
    let mut told = Vec::new();
    for request in 1..=4 {
        let out = h.step(vec![bob.frame(fetch(request, "alice"))]);
        told.extend(key_counts(&out.e2ee(&alice)));
    }
    assert_eq!(
        told,
        vec![(0, 1), (0, 0)],
        "below the threshold, then empty"
    );
    assert!(h.metrics_text().contains("courier_prekeys_low_total 2"));

    // Reconnecting with a low stock is a reminder.
    h.step(vec![alice.detach()]);
    let alice = alice.reconnect();
    let out = h.step(vec![alice.attach()]);
    assert_eq!(key_counts(&out.e2ee(&alice)), vec![(0, 0)]);

    // Topping up works, and its answer says the new count.
    let out = h.step(vec![alice.frame(Keys::new(1).upload(9, 10..15))]);
    assert_eq!(key_counts(&out.e2ee(&alice)), vec![(9, 5)]);
    // Re-uploading ids that are already stored does not count them twice.
    let out = h.step(vec![alice.frame(Keys::new(1).upload(10, 10..16))]);
    assert_eq!(key_counts(&out.e2ee(&alice)), vec![(10, 6)]);
}

#[test]
fn the_prekey_stock_per_device_is_capped() {
    let mut h = Harness::with(|c| {
        c.max_prekeys = 4;
        c.prekey_low_threshold = 2;
    });
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let out = h.step(vec![alice.frame(Keys::new(1).upload(1, 1..6))]);
    assert_eq!(out.errors(&alice), vec![(400, 1)]);
    let out = h.step(vec![alice.frame(Keys::new(1).upload(2, 1..5))]);
    assert_eq!(key_counts(&out.e2ee(&alice)), vec![(2, 4)]);

    // One upload carries at most 500, whatever the device's room.
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let out = h.step(vec![alice.frame(Keys::new(1).upload(3, 1..502))]);
    assert_eq!(out.errors(&alice), vec![(400, 3)]);
    let out = h.step(vec![alice.frame(Keys::new(1).upload(4, 1..501))]);
    assert_eq!(key_counts(&out.e2ee(&alice)), vec![(4, 500)]);
}

#[test]
fn a_new_identity_is_announced_to_conversation_peers_and_drops_old_prekeys() {
    let mut h = Harness::new();
    let alice = keyed(&mut h, "alice", 1, 1, 5);
    let alice2 = keyed(&mut h, "alice", 2, 2, 1);
    let bob = keyed(&mut h, "bob", 1, 3, 1);
    let carol = keyed(&mut h, "carol", 1, 4, 1);
    h.step(vec![bob.send(AB, 1, b"hi")]);

    // The same identity again changes nothing.
    let out = h.step(vec![alice.frame(Keys::new(1).upload(2, 20..21))]);
    assert!(out.e2ee(&bob).is_empty());

    // A reinstall: a new identity with new prekeys.
    let out = h.step(vec![alice.frame(Keys::new(11).upload(3, 100..102))]);
    assert_eq!(
        key_counts(&out.e2ee(&alice)),
        vec![(3, 2)],
        "the old identity's prekeys are gone"
    );
    let change = E2eeFrame::KeyChange {
        user: "alice".into(),
        device: 1,
        identity: Keys::new(11).identity(),
    };
    assert_eq!(out.e2ee(&bob), vec![change.clone()]);
    assert_eq!(out.e2ee(&alice2), vec![change]);
    assert!(out.e2ee(&carol).is_empty(), "carol shares no conversation");
    assert!(h
        .metrics_text()
        .contains("courier_identity_key_changes_total 1"));

    let out = h.step(vec![bob.frame(fetch(4, "alice"))]);
    let b = bundles(&out.e2ee(&bob), 4);
    let d1 = b.iter().find(|d| d.device == 1).unwrap();
    assert_eq!(d1.identity, Keys::new(11).identity());
    assert_eq!(d1.prekey.id, 100);
}

#[test]
fn a_wrong_device_list_is_refused_with_what_is_missing_and_stale() {
    let mut h = Harness::new();
    let alice = keyed(&mut h, "alice", 1, 1, 1);
    keyed(&mut h, "alice", 2, 2, 1);
    keyed(&mut h, "bob", 1, 3, 1);
    keyed(&mut h, "bob", 2, 4, 1);
    // A linked device without keys is not a recipient.
    let bob3 = h.client("bob", 3, 0);
    h.connect(&bob3);

    let out = h.step(vec![alice.frame(per_device(
        7,
        vec![
            ct("bob", 1, b"x"),
            ct("carol", 1, b"x"),
            ct("alice", 1, b"x"),
        ],
    ))]);
    let addr = |u: &str, d| DeviceAddress {
        user: u.into(),
        device: d,
    };
    assert_eq!(
        out.e2ee(&alice),
        vec![E2eeFrame::DeviceMismatch {
            client_id: 7,
            missing: vec![addr("alice", 2), addr("bob", 2)],
            stale: vec![addr("alice", 1), addr("carol", 1)],
        }]
    );
    assert_eq!(
        out.errors(&alice),
        vec![(ErrorCode::DeviceMismatch as u16, 7)]
    );
    assert!(h
        .metrics_text()
        .contains("courier_device_mismatches_total 1"));

    // A device addressed twice is a bad request.
    let out =
        h.step(vec![alice.frame(per_device(
            8,
            vec![ct("bob", 1, b"x"), ct("bob", 1, b"y")],
        ))]);
    assert_eq!(out.errors(&alice), vec![(400, 8)]);

    // Fixed and retried with the same client id, it is accepted.
    let out = h.step(vec![alice.frame(per_device(
        7,
        vec![ct("bob", 1, b"x"), ct("bob", 2, b"x"), ct("alice", 2, b"x")],
    ))]);
    assert_eq!(out.sent(&alice).0, 1);

    // An unlinked device becomes stale.
    let bob1 = h.client("bob", 1, 0);
    h.connect(&bob1);
    h.step(vec![bob1.frame(ClientFrame::DeviceRemove {
        request: 1,
        device: 2,
    })]);
    let out = h.step(vec![alice.frame(per_device(
        9,
        vec![ct("bob", 1, b"x"), ct("bob", 2, b"x"), ct("alice", 2, b"x")],
    ))]);
    assert_eq!(
        out.e2ee(&alice),
        vec![E2eeFrame::DeviceMismatch {
            client_id: 9,
            missing: vec![],
            stale: vec![addr("bob", 2)],
        }]
    );
    let out = h.step(vec![bob1.frame(fetch(3, "bob"))]);
    assert!(
        bundles(&out.e2ee(&bob1), 3).is_empty(),
        "the unlinked device's keys are gone, and the asker's own are left out"
    );
}

#[test]
fn each_device_receives_only_its_own_ciphertext() {
    let mut h = Harness::new();
    let alice = keyed(&mut h, "alice", 1, 1, 1);
    let alice2 = keyed(&mut h, "alice", 2, 2, 1);
    let bob = keyed(&mut h, "bob", 1, 3, 1);
    let bob2 = keyed(&mut h, "bob", 2, 4, 1);
    let out = h.step(vec![alice.frame(per_device(
        1,
        vec![
            ct("bob", 1, b"for bob 1"),
            ct("bob", 2, b"for bob 2"),
            ct("alice", 2, b"for alice 2"),
        ],
    ))]);
    assert_eq!(out.sent(&alice).0, 1);
    let body = |c: &Client| {
        let m = out.messages(c);
        assert_eq!(m.len(), 1, "one message for {:?}", c.device);
        m[0].2.clone()
    };
    assert_eq!(&body(&bob)[..], b"for bob 1");
    assert_eq!(&body(&bob2)[..], b"for bob 2");
    assert_eq!(&body(&alice2)[..], b"for alice 2");
    assert!(out.messages(&alice).is_empty());
    // Nobody's frame carries another device's ciphertext.
    for c in [&bob, &bob2, &alice2] {
        for raw in out.raw(c) {
            let mine = body(c);
            for other in [&b"for bob 1"[..], b"for bob 2", b"for alice 2"] {
                if other != &mine[..] {
                    assert!(!raw.windows(other.len()).any(|w| w == other));
                }
            }
        }
    }

    // Catch-up and history give each device its own too; a device linked
    // after the message gets the entry with an empty body.
    h.step(vec![bob2.detach()]);
    let bob2 = bob2.reconnect();
    let caught = h.connect(&bob2);
    assert_eq!(&messages(&caught)[0].2[..], b"for bob 2");
    let bob3 = h.client("bob", 3, 0);
    let caught = h.connect(&bob3);
    assert_eq!(messages(&caught)[0].1, 1);
    assert!(messages(&caught)[0].2.is_empty());
    let out = h.step(vec![bob.frame(ClientFrame::History {
        request: 4,
        conversation: AB.into(),
        before_seq: 0,
        limit: 0,
    })]);
    match &out.frames(&bob)[..] {
        [ServerFrame::History { entries, .. }] => assert_eq!(&entries[0].body[..], b"for bob 1"),
        other => panic!("history expected, got {other:?}"),
    }

    // The common-body send still reaches every device with one body.
    let out = h.step(vec![bob.send(AB, 2, b"sender key message")]);
    for c in [&alice, &alice2, &bob2] {
        assert_eq!(&out.messages(c)[0].2[..], b"sender key message");
    }
}

#[test]
fn per_device_bodies_count_against_the_body_limit() {
    let mut h = Harness::with(|c| c.max_body = 8);
    let alice = keyed(&mut h, "alice", 1, 1, 1);
    keyed(&mut h, "bob", 1, 2, 1);
    keyed(&mut h, "bob", 2, 3, 1);
    let out = h.step(vec![alice.frame(per_device(
        1,
        vec![ct("bob", 1, b"12345"), ct("bob", 2, b"12345")],
    ))]);
    assert_eq!(out.errors(&alice), vec![(413, 1)]);
}

#[test]
fn an_archive_waits_for_its_device_within_a_size_limit_until_it_expires() {
    let mut h = Harness::with(|c| {
        c.archive_max_bytes = 16;
        c.archive_ttl = std::time::Duration::from_secs(3600);
    });
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let alice2 = h.client("alice", 2, 1);
    h.connect(&alice2);
    let upload = |request, device, bytes: &'static [u8]| ClientFrame::ArchiveUpload {
        request,
        device,
        archive: Bytes::from_static(bytes),
    };
    let out = h.step(vec![
        alice.frame(upload(1, 2, b"seventeen bytes!!")),
        alice.frame(upload(2, 1, b"self")),
        alice.frame(upload(3, 5, b"unlinked")),
        alice.frame(upload(4, 2, b"sealed history")),
    ]);
    assert_eq!(out.errors(&alice), vec![(413, 1), (400, 2), (400, 3)]);
    assert!(out
        .frames(&alice)
        .contains(&ServerFrame::Done { request: 4 }));

    let out = h.step(vec![alice2.frame(ClientFrame::ArchiveFetch { request: 5 })]);
    match &out.e2ee(&alice2)[..] {
        [E2eeFrame::Archive {
            request: 5,
            from_device: 1,
            archive,
            ..
        }] => assert_eq!(&archive[..], b"sealed history"),
        other => panic!("archive expected, got {other:?}"),
    }
    // Another user's device cannot read it; nothing waits for alice 1.
    let out = h.step(vec![alice.frame(ClientFrame::ArchiveFetch { request: 6 })]);
    assert_eq!(out.errors(&alice), vec![(404, 6)]);

    // Past its time it is gone, and the sweep deletes it.
    h.advance(3_600_001);
    let out = h.step(vec![alice2.frame(ClientFrame::ArchiveFetch { request: 7 })]);
    assert_eq!(out.errors(&alice2), vec![(404, 7)]);
    h.advance(61_000);
    h.step(vec![]);
    h.step(vec![]);
    h.restart();
    h.advance(1_000_000_000);
    let alice2 = alice2.reconnect();
    h.connect(&alice2);
    let out = h.step(vec![alice2.frame(ClientFrame::ArchiveFetch { request: 8 })]);
    assert_eq!(out.errors(&alice2), vec![(404, 8)]);
}

#[test]
fn a_per_device_send_to_a_group_names_every_member_device() {
    let mut h = Harness::new();
    let alice = keyed(&mut h, "alice", 1, 1, 1);
    let bob = keyed(&mut h, "bob", 1, 2, 1);
    let carol = keyed(&mut h, "carol", 1, 3, 1);
    let out = h.step(vec![alice.frame(ClientFrame::GroupCreate {
        request: 1,
        members: vec!["bob".into(), "carol".into()],
    })]);
    let group = out
        .frames(&alice)
        .into_iter()
        .find_map(|f| match f {
            ServerFrame::GroupCreated { conversation, .. } => Some(conversation),
            _ => None,
        })
        .unwrap();
    let send = |client_id, ciphertexts| ClientFrame::SendPerDevice {
        conversation: group.clone(),
        client_id,
        ciphertexts,
    };
    let out = h.step(vec![alice.frame(send(1, vec![ct("bob", 1, b"b")]))]);
    assert_eq!(
        out.e2ee(&alice),
        vec![E2eeFrame::DeviceMismatch {
            client_id: 1,
            missing: vec![DeviceAddress {
                user: "carol".into(),
                device: 1
            }],
            stale: vec![],
        }]
    );
    let out = h.step(vec![alice.frame(send(
        1,
        vec![ct("bob", 1, b"for bob"), ct("carol", 1, b"for carol")],
    ))]);
    assert_eq!(out.sent(&alice).0, 2);
    assert_eq!(&out.messages(&bob)[0].2[..], b"for bob");
    assert_eq!(&out.messages(&carol)[0].2[..], b"for carol");
}
