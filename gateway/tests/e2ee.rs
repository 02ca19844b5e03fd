//! End-to-end encryption over real sockets: the key directory, one-time
//! prekeys under 100 concurrent fetches, low-prekey and key-change pushes,
//! device-list mismatches, per-device fan-out, archives, and two real
//! clients (courier-e2ee) talking through the gateway binary while a scan
//! of its data directory and its logs finds none of their plaintexts.
//! Runs under both monoio drivers (`COURIER_DRIVER`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Client, TestNode, TIMEOUT};
use courier_e2ee::Device;
use courier_protocol::frame::{
    ClientFrame, DeviceAddress, DeviceBundle, E2eeFrame, Incoming, PrekeyKind, ServerFrame,
};
use courier_protocol::ids::direct_conversation;

/// Reads frames of either family until `pick` accepts one.
fn wait_any<T>(c: &mut Client, mut pick: impl FnMut(&Incoming) -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if let Some(f) = c.try_next_any(Duration::from_millis(200)) {
            if let Some(t) = pick(&f) {
                return t;
            }
        }
    }
    panic!("the expected frame did not arrive")
}

fn upload(c: &mut Client, d: &mut Device, one_time: u32) -> u32 {
    c.send(&d.upload(90, one_time));
    wait_any(c, |f| match f {
        Incoming::E2ee(E2eeFrame::KeyCount {
            request: 90,
            remaining,
        }) => Some(*remaining),
        _ => None,
    })
}

fn fetch(c: &mut Client, user: &str, request: u32) -> Vec<DeviceBundle> {
    c.send(&ClientFrame::BundleFetch {
        request,
        user: user.into(),
    });
    wait_any(c, |f| match f {
        Incoming::E2ee(E2eeFrame::Bundle {
            request: r,
            devices,
            ..
        }) if *r == request => Some(devices.clone()),
        _ => None,
    })
}

fn error_for(c: &mut Client, reference: u64) -> u16 {
    wait_any(c, |f| match f {
        Incoming::Frame(ServerFrame::Error {
            code, reference: r, ..
        }) if *r == reference => Some(*code),
        _ => None,
    })
}

/// The next message from `from`, as (sender device, body).
fn message_from(c: &mut Client, from: &str) -> (u32, Bytes) {
    wait_any(c, |f| match f {
        Incoming::Frame(ServerFrame::Message {
            sender,
            sender_device,
            body,
            ..
        }) if sender == from => Some((*sender_device, body.clone())),
        _ => None,
    })
}

#[test]
fn keys_upload_and_come_back_in_bundles_and_a_forged_signature_is_refused() {
    let node = TestNode::start(&[]);
    let (mut alice, _) = node.online("alice", 1);
    let (mut bob, _) = node.online("bob", 1);
    let mut keys = Device::new("alice", 1);
    assert_eq!(upload(&mut alice, &mut keys, 5), 5);
    let b = fetch(&mut bob, "alice", 1);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].identity, keys.identity());
    assert_eq!(b[0].prekey_kind, PrekeyKind::OneTime);

    let mut forged = Device::new("alice", 1).upload(91, 1);
    if let ClientFrame::KeysUpload {
        signed_prekey_signature,
        ..
    } = &mut forged
    {
        signed_prekey_signature[10] ^= 0x40;
    }
    alice.send(&forged);
    assert_eq!(error_for(&mut alice, 91), 400);
    // The stored keys are unchanged.
    assert_eq!(fetch(&mut bob, "alice", 2)[0].identity, keys.identity());
}

#[test]
fn one_hundred_concurrent_fetches_never_share_a_one_time_prekey() {
    let node = TestNode::start(&[]);
    let (mut alice, _) = node.online("alice", 1);
    let mut keys = Device::new("alice", 1);
    assert_eq!(upload(&mut alice, &mut keys, 60), 60);

    let clients: Vec<Client> = (0..100)
        .map(|i| node.online(&format!("fetcher{i}"), 1).0)
        .collect();
    let barrier = Arc::new(Barrier::new(clients.len()));
    let threads: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let b = fetch(&mut c, "alice", 7);
                assert_eq!(b.len(), 1);
                (b[0].prekey_kind, b[0].prekey.id)
            })
        })
        .collect();
    let got: Vec<(PrekeyKind, u32)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let one_time: Vec<u32> = got
        .iter()
        .filter(|(k, _)| *k == PrekeyKind::OneTime)
        .map(|(_, id)| *id)
        .collect();
    let distinct: BTreeSet<u32> = one_time.iter().copied().collect();
    assert_eq!(one_time.len(), 60, "every one-time prekey handed out");
    assert_eq!(distinct.len(), 60, "and none twice");
    assert_eq!(distinct, (1..=60).collect());
    assert_eq!(
        got.iter()
            .filter(|(k, _)| *k == PrekeyKind::LastResort)
            .count(),
        40
    );
    let metrics = node.metrics();
    assert!(metrics.contains("courier_prekeys_stock 0"), "{metrics}");
}

#[test]
fn a_device_hears_of_low_prekeys_and_peers_hear_of_a_new_identity() {
    let node = TestNode::start(&[]);
    let (mut alice, _) = node.online("alice", 1);
    let (mut bob, _) = node.online("bob", 1);
    let mut keys = Device::new("alice", 1);
    // The node's threshold is 10: the stock going from 10 to 9 is told.
    assert_eq!(upload(&mut alice, &mut keys, 11), 11);
    fetch(&mut bob, "alice", 1);
    fetch(&mut bob, "alice", 2);
    let remaining = wait_any(&mut alice, |f| match f {
        Incoming::E2ee(E2eeFrame::KeyCount {
            request: 0,
            remaining,
        }) => Some(*remaining),
        _ => None,
    });
    assert_eq!(remaining, 9);

    // Bob and alice share a conversation; alice reinstalls.
    bob.send_acked(&direct_conversation("alice", "bob"), 1, b"opaque");
    let mut reinstalled = Device::new("alice", 1);
    upload(&mut alice, &mut reinstalled, 3);
    let changed = wait_any(&mut bob, |f| match f {
        Incoming::E2ee(E2eeFrame::KeyChange {
            user,
            device,
            identity,
        }) => Some((user.clone(), *device, *identity)),
        _ => None,
    });
    assert_eq!(changed, ("alice".into(), 1, reinstalled.identity()));
}

#[test]
fn per_device_sends_reach_each_device_with_only_its_own_ciphertext() {
    let node = TestNode::start(&[]);
    let conv = direct_conversation("alice", "bob");
    let mut sockets = Vec::new();
    let mut devices = Vec::new();
    for (user, d) in [("alice", 1), ("alice", 2), ("bob", 1), ("bob", 2)] {
        let (mut c, _) = node.online(user, d);
        let mut dev = Device::new(user, d);
        upload(&mut c, &mut dev, 5);
        sockets.push(c);
        devices.push(dev);
    }
    // Alice's first device learns bob's two and her own other device.
    for (user, request) in [("bob", 1), ("alice", 2)] {
        for b in fetch(&mut sockets[0], user, request) {
            devices[0].start_session(user, &b).unwrap();
        }
    }

    // Only bob's first device: the mismatch names the other two.
    let partial = devices[0]
        .encrypt_for(&[("bob".into(), 1)], b"too few")
        .unwrap();
    sockets[0].send(&ClientFrame::SendPerDevice {
        conversation: conv.clone(),
        client_id: 5,
        ciphertexts: partial,
    });
    let mismatch = wait_any(&mut sockets[0], |f| match f {
        Incoming::E2ee(E2eeFrame::DeviceMismatch {
            client_id: 5,
            missing,
            stale,
        }) => Some((missing.clone(), stale.clone())),
        _ => None,
    });
    let addr = |u: &str, d| DeviceAddress {
        user: u.into(),
        device: d,
    };
    assert_eq!(mismatch, (vec![addr("alice", 2), addr("bob", 2)], vec![]));
    assert_eq!(error_for(&mut sockets[0], 5), 409);

    // Fixed and retried with the same client id.
    let to = [("alice".into(), 2), ("bob".into(), 1), ("bob".into(), 2)];
    let cts = devices[0].encrypt_for(&to, b"meet at noon").unwrap();
    let bodies: Vec<Bytes> = cts.iter().map(|c| c.body.clone()).collect();
    sockets[0].send(&ClientFrame::SendPerDevice {
        conversation: conv,
        client_id: 5,
        ciphertexts: cts,
    });
    wait_any(&mut sockets[0], |f| {
        matches!(f, Incoming::Frame(ServerFrame::Sent { client_id: 5, .. })).then_some(())
    });
    for (i, ((_user, _), body)) in to.iter().zip(&bodies).enumerate() {
        let at = i + 1;
        let (from_device, got) = message_from(&mut sockets[at], "alice");
        assert_eq!(&got, body, "device {at} got exactly its own ciphertext");
        let plain = devices[at].decrypt("alice", from_device, &got).unwrap();
        assert_eq!(plain, b"meet at noon");
    }
}

#[test]
fn an_archive_over_the_size_limit_is_refused_and_one_within_it_is_relayed() {
    let node = TestNode::start(&[]);
    let (mut old, _) = node.online("alice", 1);
    let (mut new, _) = node.online("alice", 2);
    old.send(&ClientFrame::ArchiveUpload {
        request: 1,
        device: 2,
        archive: Bytes::from(vec![7u8; 65_537]),
    });
    assert_eq!(error_for(&mut old, 1), 413);
    old.send(&ClientFrame::ArchiveUpload {
        request: 2,
        device: 2,
        archive: Bytes::from_static(b"sealed history"),
    });
    wait_any(&mut old, |f| {
        matches!(f, Incoming::Frame(ServerFrame::Done { request: 2 })).then_some(())
    });
    new.send(&ClientFrame::ArchiveFetch { request: 3 });
    let got = wait_any(&mut new, |f| match f {
        Incoming::E2ee(E2eeFrame::Archive {
            request: 3,
            from_device,
            archive,
            ..
        }) => Some((*from_device, archive.clone())),
        _ => None,
    });
    assert_eq!(got, (1, Bytes::from_static(b"sealed history")));
}

/// True when any file under `dir` contains `needle`.
fn found_in_files(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let path = e.unwrap().path();
        if path.is_dir() {
            found_in_files(&path, needle)
        } else {
            let bytes = std::fs::read(&path).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle)
        }
    })
}

#[test]
fn two_clients_talk_end_to_end_and_the_server_keeps_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--cores", "2", "--data-dir"])
        .arg(&data)
        .env(
            "RUST_LOG",
            "debug,courier_router=trace,courier_gateway=trace",
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // The start line names the port it bound.
    let deadline = Instant::now() + TIMEOUT;
    let addr = loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        if let Some(at) = text.find("listen.addr=") {
            let rest = &text[at + "listen.addr=".len()..];
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not start: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let secret = courier_gateway::secret::load_or_create(&data).unwrap();
    let token = |user: &str| {
        courier_protocol::token::mint(
            &secret,
            &courier_protocol::token::claims_for(user, 1, common::now_s(), 3600),
        )
    };
    let mut a = Client::connect(addr, &token("alice")).unwrap();
    let mut b = Client::connect(addr, &token("bob")).unwrap();
    a.sync(vec![]);
    b.sync(vec![]);
    let (mut alice, mut bob) = (Device::new("alice", 1), Device::new("bob", 1));
    upload(&mut a, &mut alice, 10);
    upload(&mut b, &mut bob, 10);
    let bundle = fetch(&mut a, "bob", 1);
    alice.start_session("bob", &bundle[0]).unwrap();

    let conv = direct_conversation("alice", "bob");
    let secrets: Vec<String> = (0..5)
        .map(|i| format!("the vault code is {i}{i}-zebra-{}", 1000 + i))
        .collect();
    for (i, text) in secrets.iter().enumerate() {
        // Alice and bob take turns; bob's first answer rides on the
        // session alice's first (prekey) message started.
        let ((sender, sender_conn), (receiver, receiver_conn)) = if i % 2 == 0 {
            ((&mut alice, &mut a), (&mut bob, &mut b))
        } else {
            ((&mut bob, &mut b), (&mut alice, &mut a))
        };
        let to = [(receiver.user.clone(), 1)];
        let cts = sender.encrypt_for(&to, text.as_bytes()).unwrap();
        sender_conn.send(&ClientFrame::SendPerDevice {
            conversation: conv.clone(),
            client_id: i as u64 + 1,
            ciphertexts: cts,
        });
        let (from, body) = message_from(receiver_conn, &sender.user);
        assert_eq!(from, 1);
        assert!(!body.windows(5).any(|w| w == b"zebra"));
        let plain = receiver.decrypt(&sender.user, from, &body).unwrap();
        assert_eq!(plain, text.as_bytes());
    }
    // A control: a plaintext sent without encryption is found by the same
    // scan, so the scan can see bodies where they are stored.
    let control = b"control-plaintext-visible-to-the-server";
    a.send_text(&conv, 99, control);
    wait_any(&mut a, |f| {
        matches!(f, Incoming::Frame(ServerFrame::Sent { client_id: 99, .. })).then_some(())
    });
    drop((a, b));

    // A clean stop flushes the store and the logs.
    let pid = gateway.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let waited = Instant::now();
    while gateway.try_wait().unwrap().is_none() {
        assert!(waited.elapsed() < TIMEOUT, "the gateway did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }

    assert!(
        found_in_files(&data, control),
        "the scan sees stored bodies"
    );
    for text in &secrets {
        assert!(
            !found_in_files(&data, text.as_bytes()),
            "a plaintext is in the data directory"
        );
        assert!(
            !found_in_files(dir.path(), b"zebra"),
            "a fragment of a plaintext is stored or logged"
        );
    }
    let lines = BufReader::new(std::fs::File::open(&log_path).unwrap())
        .lines()
        .count();
    assert!(lines > 5, "the node logged at debug level ({lines} lines)");
}

#[test]
fn the_encrypted_pairs_scenario_delivers_every_message_once() {
    let node = TestNode::start(&[]);
    for encrypted in [true, false] {
        let cfg = courier_e2ee::bench::BenchConfig {
            addr: node.addr,
            secret: Arc::new(node.secret()),
            pairs: 2,
            rate: 20.0,
            duration: Duration::from_secs(1),
            body_bytes: 200,
            encrypted,
            prefix: format!("p{encrypted}"),
        };
        let r = courier_e2ee::bench::run(&cfg).unwrap();
        assert!(r.sent >= 30, "{r:?}");
        assert_eq!((r.acked, r.received), (r.sent, r.sent), "{r:?}");
        assert_eq!((r.bad, r.duplicates), (0, 0), "{r:?}");
    }
}
