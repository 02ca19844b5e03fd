//! Fleet mode end to end with real processes: a nats-server, two router
//! processes (`gateway --role router`) and two gateways (`--role
//! gateway`), real WebSocket clients on different gateways. Messages and
//! groups flow across gateways; after the router serving the conversation
//! is SIGKILLed, the other router takes the partition over, the sender's
//! retry is acknowledged with the next sequence and the recipient receives
//! everything, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, TestNode};
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::testing::NatsServer;
use courier_bus::{Kv, PubSub};
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_router::fleet::partition_of;

const PARTITIONS: u16 = 4;

struct Router(Child);

impl Router {
    fn start(url: &str, node: u16, dir: &std::path::Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--role", "router", "--nats", url])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--nats-replicas", "1", "--lease-ttl-ms", "1500"])
            .args(["--node-id", &node.to_string()])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
            .spawn()
            .expect("router process");
        Self(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.kill();
    }
}

fn gateway(dir: &std::path::Path, url: &str, node: u16) -> TestNode {
    TestNode::start_in(
        dir,
        &[
            "--role",
            "gateway",
            "--nats",
            url,
            "--partitions",
            &PARTITIONS.to_string(),
            "--node-id",
            &node.to_string(),
        ],
    )
}

/// Who holds each partition's lease, once all are held.
fn owners(kv: &dyn Kv) -> Option<Vec<String>> {
    (0..PARTITIONS)
        .map(|p| {
            kv.get(&format!("partition.{p}"))
                .ok()
                .flatten()
                .map(|e| String::from_utf8_lossy(&e.value).into_owned())
        })
        .collect()
}

/// Sends until acknowledged, resending the same client id every `retry`
/// (a command lost while a partition has no owner is the client's to
/// retry); returns the `Sent` frame and how long it took.
fn send_until_sent(
    c: &mut Client,
    conversation: &str,
    id: u64,
    retry: Duration,
) -> (ServerFrame, Duration) {
    let started = Instant::now();
    loop {
        c.send_text(conversation, id, format!("m{id}").as_bytes());
        let deadline = Instant::now() + retry;
        while Instant::now() < deadline {
            match c.try_next(deadline.saturating_duration_since(Instant::now())) {
                Some(f @ ServerFrame::Sent { client_id, .. }) if client_id == id => {
                    return (f, started.elapsed())
                }
                _ => {}
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "send {id} never acknowledged"
        );
    }
}

/// Reads messages of `conversation` until `seq` arrived; returns the
/// sequences seen (duplicates included).
fn messages_until(c: &mut Client, conversation: &str, seq: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.contains(&seq) {
        assert!(
            Instant::now() < deadline,
            "message {seq} never arrived; saw {seen:?}"
        );
        if let Some(ServerFrame::Message {
            conversation: c2,
            seq: s,
            ..
        }) = c.try_next(Duration::from_millis(100))
        {
            if c2 == conversation {
                seen.push(s);
            }
        }
    }
    seen
}

#[test]
fn messages_cross_gateways_and_survive_a_router_kill() {
    let dir = tempfile::Builder::new()
        .disable_cleanup(std::env::var_os("COURIER_KEEP").is_some())
        .tempdir()
        .unwrap();
    eprintln!("fleet test state under {}", dir.path().display());
    let server = NatsServer::start(&dir.path().join("nats")).unwrap();
    let url = server.url();
    let nats = Nats::connect(&NatsConfig {
        servers: vec![url.clone()],
        ..Default::default()
    })
    .unwrap();
    // Each partition's router announces itself once it serves (after its
    // replay); wait for all four before clients connect.
    let announcements = nats.pubsub().subscribe("courier.owner.*").unwrap();
    let mut routers = [
        Router::start(&url, 101, &dir.path().join("r1")),
        Router::start(&url, 102, &dir.path().join("r2")),
    ];
    let mut served = std::collections::BTreeSet::new();
    while served.len() < usize::from(PARTITIONS) {
        let m = announcements
            .recv_timeout(Duration::from_secs(30))
            .expect("every partition served");
        served.insert(m.subject);
    }
    // The bucket is created by whichever starts first; routers create it
    // with this TTL too.
    let kv: Arc<dyn Kv> = Arc::new(
        nats.kv("courier_leases", Some(Duration::from_millis(1500)), 1)
            .unwrap(),
    );
    let started = Instant::now();
    while owners(&*kv).is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "partitions never owned"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Both gateways share the fleet's token secret.
    let (g1_dir, g2_dir) = (dir.path().join("g1"), dir.path().join("g2"));
    for d in [&g1_dir, &g2_dir] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("jwt.secret"), "fleet-test-secret-0123456789abcdef").unwrap();
    }
    let g1 = gateway(&g1_dir, &url, 1);
    let g2 = gateway(&g2_dir, &url, 2);
    let (mut alice, _) = g1.online("alice", 1);
    let (mut bob, _) = g2.online("bob", 1);

    let direct = "d:alice:bob";
    for id in 1..=5 {
        let seq = alice.send_acked(direct, id, format!("m{id}").as_bytes());
        assert_eq!(seq, id);
    }
    assert_eq!(messages_until(&mut bob, direct, 5), vec![1, 2, 3, 4, 5]);

    // A group, created on the creator's partition, across gateways.
    alice.send(&ClientFrame::GroupCreate {
        request: 7,
        members: vec!["bob".into()],
    });
    let group = loop {
        if let ServerFrame::GroupCreated { conversation, .. } = alice.next() {
            break conversation;
        }
    };
    assert_eq!(
        partition_of(&group, PARTITIONS),
        partition_of("alice", PARTITIONS)
    );
    let seq = alice.send_acked(&group, 100, b"hello group");
    assert!(messages_until(&mut bob, &group, seq).contains(&seq));

    // SIGKILL the router serving the direct conversation.
    let p = partition_of(direct, PARTITIONS);
    let victim = owners(&*kv).unwrap()[usize::from(p)].clone();
    let index = if victim == "router-101" { 0 } else { 1 };
    routers[index].kill();
    let killed = Instant::now();

    let (sent, took) = send_until_sent(&mut alice, direct, 6, Duration::from_millis(500));
    assert!(matches!(sent, ServerFrame::Sent { seq: 6, .. }), "{sent:?}");
    let seen = messages_until(&mut bob, direct, 6);
    let resumed = killed.elapsed();
    eprintln!(
        "router {victim} killed: sender acknowledged after {took:?}, recipient had seq 6 after {resumed:?}; \
         recipient saw {seen:?} after the kill"
    );
    // Nothing lost or out of order: whatever arrives after the kill
    // (a catch-up may repeat what was delivered) ends with 6 and never
    // goes backwards except to repeat.
    assert_eq!(seen.last(), Some(&6));
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert!(sorted.iter().all(|s| (1..=6).contains(s)));
    assert!(resumed < Duration::from_secs(20));

    // Everything is still there for a new device, in order, once each.
    let (_, caught_up) = g2.online("bob", 2);
    let seqs: Vec<u64> = caught_up
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message {
                conversation, seq, ..
            } if conversation == direct => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    g1.stop();
    g2.stop();
}
