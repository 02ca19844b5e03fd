//! Push notifications end to end: a real node, real clients over sockets,
//! and a fake webhook receiver (`common::webhook`, a plain HTTP/1.1 server
//! on loopback) that records every notification.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::webhook::{push_flags, Receiver};
use common::TestNode;
use courier_protocol::frame::{ClientFrame, PushProvider, ServerFrame};

fn register(c: &mut common::Client, token: &str) {
    c.send(&ClientFrame::PushRegister {
        request: 1,
        provider: PushProvider::Webhook,
        token: token.into(),
        ciphertext: false,
    });
    assert_eq!(c.next(), ServerFrame::Done { request: 1 });
}

#[test]
fn an_offline_device_gets_one_coalesced_notification_and_online_or_acking_devices_none() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = push_flags(dir.path(), &receiver, "1500");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = TestNode::start(&flags);

    // bob's phone registers and goes away; carol stays online; dave is
    // connected but has not caught up, and acks in time.
    let mut bob = node.connect("bob", 1);
    register(&mut bob, "bob-phone");
    drop(bob);
    let (mut carol, _) = node.online("carol", 1);
    register(&mut carol, "carol-phone");
    let mut dave = node.connect("dave", 1);
    register(&mut dave, "dave-phone");

    let (mut alice, _) = node.online("alice", 1);
    for i in 1..=20 {
        alice.send_acked("d:alice:bob", i, b"secret text");
    }
    alice.send_acked("d:alice:carol", 100, b"secret text");
    alice.send_acked("d:alice:dave", 101, b"secret text");
    dave.send(&ClientFrame::Delivered {
        conversation: "d:alice:dave".into(),
        seq: 1,
    });

    receiver.wait_for("bob's notification", |h| !h.is_empty());
    // Longer than the delay again: nothing else comes.
    std::thread::sleep(Duration::from_millis(2500));
    let hits = receiver.accepted();
    assert_eq!(hits.len(), 1, "exactly one notification: {hits:?}");
    let n = &hits[0];
    assert_eq!(n["token"], "bob-phone");
    assert_eq!(n["type"], "message");
    assert_eq!(n["conversation"], "d:alice:bob");
    assert_eq!(n["sender"], "alice");
    assert_eq!(n["count"], 20);
    assert_eq!(n["seq"], 20);
    assert!(
        !n.to_string().contains("secret text"),
        "the body never travels in a notification"
    );
    assert!(n.get("ciphertext").is_none(), "bob did not opt in");

    let metrics = node.metrics();
    assert!(
        metrics.contains("courier_push_sent_total{provider=\"webhook\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("courier_push_cancelled_total 1"),
        "{metrics}"
    );
}

#[test]
fn tokens_are_checked_replaced_and_removed() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let flags = push_flags(dir.path(), &receiver, "100");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = TestNode::start(&flags);
    let mut bob = node.connect("bob", 1);
    let bad = |c: &mut common::Client, provider, token: &str| {
        c.send(&ClientFrame::PushRegister {
            request: 9,
            provider,
            token: token.into(),
            ciphertext: false,
        });
        match c.next() {
            ServerFrame::Error {
                code: 400,
                reference: 9,
                ..
            } => {}
            other => panic!("expected 400 for {token:?}, got {other:?}"),
        }
    };
    bad(&mut bob, PushProvider::Apns, "abcd");
    bad(&mut bob, PushProvider::Fcm, "abcd");
    bad(&mut bob, PushProvider::Webhook, "");
    bad(&mut bob, PushProvider::Webhook, "has space");
    bad(&mut bob, PushProvider::Webhook, &"x".repeat(4097));
    register(&mut bob, "old");
    register(&mut bob, "new");
    // A second device registers and is then unlinked: its token goes.
    let mut bob2 = node.connect("bob", 2);
    register(&mut bob2, "tablet");
    bob.send(&ClientFrame::DeviceRemove {
        request: 5,
        device: 2,
    });
    assert_eq!(bob.next(), ServerFrame::Done { request: 5 });
    drop(bob2);
    bob.send(&ClientFrame::PushUnregister { request: 6 });
    assert_eq!(bob.next(), ServerFrame::Done { request: 6 });
    register(&mut bob, "newest");
    drop(bob);

    let (mut alice, _) = node.online("alice", 1);
    alice.send_acked("d:alice:bob", 1, b"hi");
    receiver.wait_for("a notification", |h| !h.is_empty());
    std::thread::sleep(Duration::from_millis(1000));
    let tokens: Vec<String> = receiver
        .accepted()
        .iter()
        .map(|n| n["token"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        tokens,
        ["newest"],
        "only the current token of a linked device"
    );
}

#[test]
fn a_restart_in_the_middle_of_a_backlog_loses_no_notification() {
    let receiver = Receiver::start();
    receiver.refuse.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let flags = push_flags(dir.path(), &receiver, "200");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = TestNode::start(&flags);
    let users: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    for u in &users {
        let mut c = node.connect(u, 1);
        register(&mut c, &format!("{u}-phone"));
    }
    let (mut alice, _) = node.online("alice", 1);
    for (i, u) in users.iter().enumerate() {
        alice.send_acked(&format!("d:alice:{u}"), i as u64 + 1, b"m");
    }
    // Every notification was tried once and is waiting a minute to retry.
    receiver.wait_for("first attempts", |h| h.len() >= users.len());
    drop(alice);
    let node = node.restart(&flags);
    receiver.refuse.store(false, Ordering::SeqCst);
    receiver.wait_for("every notification after the restart", |h| {
        h.iter().filter(|h| h.accepted).count() >= users.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut got: Vec<String> = receiver
        .accepted()
        .iter()
        .map(|n| n["token"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let wanted: Vec<String> = users.iter().map(|u| format!("{u}-phone")).collect();
    assert_eq!(got, wanted, "each exactly once");
    drop(node);
}

#[test]
fn incomplete_or_bad_push_settings_stop_the_start_with_their_name() {
    use clap::Parser;
    use courier_gateway::config::Cli;
    use courier_gateway::node::Node;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("AuthKey.p8");
    std::fs::write(&key, "not a key").unwrap();
    let fcm = dir.path().join("fcm.json");
    std::fs::write(&fcm, r#"{"client_email": "x"}"#).unwrap();
    let data = dir.path().join("data");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--push-webhook-url", "http://127.0.0.1:9/hook"],
            "push_webhook needs both",
        ),
        (
            &[
                "--push-apns-key-file",
                key.to_str().unwrap(),
                "--push-apns-key-id",
                "K",
            ],
            "push_apns needs",
        ),
        (
            &[
                "--push-apns-key-file",
                key.to_str().unwrap(),
                "--push-apns-key-id",
                "K",
                "--push-apns-team-id",
                "T",
                "--push-apns-topic",
                "com.example",
            ],
            "push.apns",
        ),
        (
            &["--push-fcm-credentials", fcm.to_str().unwrap()],
            "push_fcm.credentials",
        ),
    ];
    for (flags, wanted) in cases {
        let mut argv = vec![
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        argv.extend_from_slice(flags);
        let args = Cli::try_parse_from(argv).unwrap().serve;
        match Node::start(args) {
            Ok(_) => panic!("{flags:?} started"),
            Err(e) => assert!(format!("{e:#}").contains(wanted), "{flags:?}: {e:#}"),
        }
    }
}

/// A port free on 127.0.0.1 now (the kernel hands out a new one each time).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real gateway binary on `dir`, answering on the returned address.
fn spawn_binary(
    dir: &std::path::Path,
    flags: &[String],
) -> (std::process::Child, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--cores", "1", "--data-dir"])
        .arg(dir)
        .args(flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, addr)
}

#[test]
fn a_kill_9_in_the_middle_of_a_backlog_loses_no_notification() {
    use courier_protocol::token;
    let receiver = Receiver::start();
    receiver.refuse.store(true, Ordering::SeqCst);
    let tmp = tempfile::tempdir().unwrap();
    let flags = push_flags(tmp.path(), &receiver, "200");
    let data = tmp.path().join("data");
    let (mut child, addr) = spawn_binary(&data, &flags);
    let secret = courier_gateway::secret::load(&data).unwrap();
    let connect = |addr, user: &str| {
        let t = token::mint(&secret, &token::claims_for(user, 1, common::now_s(), 3600));
        common::Client::connect(addr, &t).unwrap()
    };
    let users: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
    for u in &users {
        let mut c = connect(addr, u);
        register(&mut c, &format!("{u}-phone"));
    }
    let mut alice = connect(addr, "alice");
    alice.sync(vec![]);
    for (i, u) in users.iter().enumerate() {
        alice.send_acked(&format!("d:alice:{u}"), i as u64 + 1, b"m");
    }
    receiver.wait_for("first attempts", |h| h.len() >= users.len());
    // SIGKILL: no drain, no clean close of the store.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(alice);
    receiver.refuse.store(false, Ordering::SeqCst);
    let (mut child, _) = spawn_binary(&data, &flags);
    receiver.wait_for("every notification after the crash", |h| {
        h.iter().filter(|h| h.accepted).count() >= users.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let mut got: Vec<String> = receiver
        .accepted()
        .iter()
        .map(|n| n["token"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let wanted: Vec<String> = users.iter().map(|u| format!("{u}-phone")).collect();
    assert_eq!(got, wanted, "each exactly once");
}
