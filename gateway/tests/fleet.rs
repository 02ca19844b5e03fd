//! Fleet mode end to end with real processes: a nats-server, two router
//! processes (`gateway --role router`) and two gateways (`--role
//! gateway`), real WebSocket clients on different gateways.
//!
//! - Messages and groups flow across gateways; after the router serving
//!   the conversation is SIGKILLed, the other router takes the partition
//!   over, the sender's retry is acknowledged with the next sequence and
//!   the recipient receives everything, in order.
//! - One-time prekeys go out once: 100 concurrent fetches over both
//!   gateways, and fetches running while the owner of the target user's
//!   partition is SIGKILLed and taken over.
//! - Per-device sends whose members live on other partitions are checked
//!   against those partitions' device lists (409 with missing and stale
//!   devices), and each device receives only its own ciphertext.
//! - A SIGKILLed gateway's users go offline once its liveness key expires,
//!   and what was sent to them meanwhile arrives in their catch-up.
//! - A live gateway whose sessions a partition detached (taken for dead)
//!   is told and attaches them again; a restarted gateway ignores the
//!   notices its own start announcement caused.
//! - Push: a token registered with the user's partition wakes the device
//!   for messages decided by other partitions, and unregistering it stops
//!   every partition.
//! - The chat list gathers every partition's conversations: paged with the
//!   cursor, each once and in order; asked while a partition changes owner,
//!   it is still answered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{now_s, Client, TestNode, TIMEOUT};
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::testing::NatsServer;
use courier_bus::{Kv, PubSub};
use courier_e2ee::Device as E2eeDevice;
use courier_protocol::frame::{
    Chat, ClientFrame, DeviceAddress, DeviceBundle, E2eeFrame, Incoming, PrekeyKind, ServerFrame,
};
use courier_protocol::ids::direct_conversation;
use courier_protocol::token;
use courier_router::fleet::partition_of;

const PARTITIONS: u16 = 4;
/// The liveness TTL of gateways in these tests (routers scan every
/// 1500 / 6 = 250 ms).
const GATEWAY_TTL_MS: u64 = 1500;

struct Router(Child, std::path::PathBuf);

impl Router {
    fn start(url: &str, node: u16, dir: &std::path::Path, extra: &[String]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(extra)
            .args(["--role", "router", "--nats", url])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--nats-replicas", "1", "--lease-ttl-ms", "1500"])
            .args(["--gateway-ttl-ms", &GATEWAY_TTL_MS.to_string()])
            .args(["--node-id", &node.to_string()])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
            .spawn()
            .expect("router process");
        Self(child, dir.with_extension("log"))
    }

    /// The metrics endpoint's address, from the router's start log.
    fn metrics_addr(&self) -> std::net::SocketAddr {
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            let addr = log
                .lines()
                .filter(|l| l.contains("metrics endpoint bound"))
                .find_map(|l| l.split("metrics.addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            if let Some(addr) = addr {
                return addr;
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "no metrics address in the router's log"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// A nats-server and two router processes serving every partition.
struct Fleet {
    dir: tempfile::TempDir,
    _server: NatsServer,
    url: String,
    routers: [Router; 2],
    kv: Arc<dyn Kv>,
}

impl Fleet {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// The fleet with `router_flags` added to both routers' command lines.
    fn start_with(router_flags: &[String]) -> Self {
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
        // Each partition's router announces itself once it serves (after
        // its replay); wait for all of them before clients connect.
        let announcements = nats.pubsub().subscribe("courier.owner.*").unwrap();
        let routers = [
            Router::start(&url, 101, &dir.path().join("r1"), router_flags),
            Router::start(&url, 102, &dir.path().join("r2"), router_flags),
        ];
        let mut served = std::collections::BTreeSet::new();
        while served.len() < usize::from(PARTITIONS) {
            let m = announcements
                .recv_timeout(Duration::from_secs(30))
                .expect("every partition served");
            served.insert(m.subject);
        }
        // The bucket is created by whichever starts first; routers create
        // it with this TTL too.
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
        Self {
            dir,
            _server: server,
            url,
            routers,
            kv,
        }
    }

    /// A data directory for gateway `name` holding the fleet's shared
    /// token secret.
    fn gateway_dir(&self, name: &str) -> std::path::PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("jwt.secret"), "fleet-test-secret-0123456789abcdef").unwrap();
        d
    }

    /// An in-process gateway with node id `node`.
    fn gateway(&self, name: &str, node: u16) -> TestNode {
        gateway(&self.gateway_dir(name), &self.url, node)
    }

    /// SIGKILLs the router holding `partition`'s lease; returns its id.
    fn kill_owner_of(&mut self, partition: u16) -> String {
        let victim = owners(&*self.kv).unwrap()[usize::from(partition)].clone();
        let index = if victim == "router-101" { 0 } else { 1 };
        self.routers[index].kill();
        victim
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
            "--nats-replicas",
            "1",
            "--gateway-ttl-ms",
            &GATEWAY_TTL_MS.to_string(),
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
    // A snapshot every KiB of log, so the takeover below loads one.
    let mut fleet = Fleet::start_with(&["--snapshot-min-kib".into(), "1".into()]);
    let g1 = fleet.gateway("g1", 1);
    let g2 = fleet.gateway("g2", 2);
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

    // Each router serves its health, readiness and metrics (probes of the
    // Kubernetes StatefulSet), with the partitions it serves.
    // Each served partition's router metrics are on its process's
    // endpoint, labelled with the partition.
    let addrs: Vec<_> = fleet.routers.iter().map(Router::metrics_addr).collect();
    let started = Instant::now();
    loop {
        let mut served = 0;
        let mut labelled = std::collections::BTreeSet::new();
        let mut stored = 0;
        for &addr in &addrs {
            assert_eq!(common::http_get(addr, "/healthz").0, 200);
            assert_eq!(common::http_get(addr, "/readyz").0, 200);
            let (status, text) = common::http_get(addr, "/metrics");
            assert_eq!(status, 200);
            assert!(text.contains("process_resident_memory_bytes"), "{text}");
            served += text
                .lines()
                .find_map(|l| l.strip_prefix("courier_router_partitions_served "))
                .and_then(|v| v.trim().parse::<u16>().ok())
                .expect("the served-partitions gauge");
            assert!(text.contains("courier_fleet_gateways_live "), "{text}");
            assert!(text.contains("courier_router_leases_lost_total "), "{text}");
            assert!(
                text.contains("courier_router_leases_retaken_total "),
                "{text}"
            );
            for line in text.lines() {
                let partition = |name: &str| {
                    let rest = line.strip_prefix(name)?.strip_prefix("{partition=\"")?;
                    let (p, value) = rest.split_once("\"} ")?;
                    Some((p.parse::<u16>().ok()?, value.trim().parse::<f64>().ok()?))
                };
                if let Some((p, _)) = partition("courier_router_queue_depth") {
                    labelled.insert(p);
                }
                if let Some((_, n)) = partition("courier_messages_stored_total") {
                    stored += n as u64;
                }
            }
        }
        // Sampled twice a second: equal once any handover has settled.
        if served == PARTITIONS && labelled.len() == usize::from(PARTITIONS) {
            assert!(stored >= 2, "{stored} messages stored over the partitions");
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "routers report {served} partitions served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Both kinds of process export their NATS link: call times by kind,
    // the probed round trip, the connection's state and counters.
    let link = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let started = Instant::now();
    loop {
        let routers: Vec<String> = addrs
            .iter()
            .map(|&a| common::http_get(a, "/metrics").1)
            .collect();
        let gateway = g1.metrics();
        let appends: f64 = routers
            .iter()
            .map(|t| link(t, "courier_nats_call_seconds_count{op=\"append\"}"))
            .sum();
        let probed = routers
            .iter()
            .chain(std::iter::once(&gateway))
            .all(|t| link(t, "courier_nats_rtt_seconds_count") >= 1.0);
        let connected = routers.iter().chain(std::iter::once(&gateway)).all(|t| {
            link(t, "courier_nats_connected") == 1.0
                && link(t, "courier_nats_connects_total") >= 1.0
        });
        let published = link(&gateway, "courier_nats_call_seconds_count{op=\"publish\"}");
        let sent = link(&gateway, "courier_nats_sent_messages_total");
        if appends >= 2.0 && probed && connected && published >= 1.0 && sent >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "link metrics: {appends} appends, probed {probed}, connected {connected}, \
             {published} publishes, {sent} sent\n{gateway}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The partition about to lose its router has a snapshot in its log
    // (messages of another conversation of it fill the log until then).
    let p = partition_of(direct, PARTITIONS);
    let filler = (0..)
        .map(|i| direct_conversation("alice", &format!("filler{i}")))
        .find(|c| partition_of(c, PARTITIONS) == p)
        .unwrap();
    let started = Instant::now();
    for id in 1000.. {
        let snapshots: u64 = fleet
            .routers
            .iter()
            .flat_map(|r| partition_metric(r, "courier_changelog_snapshots_total"))
            .filter(|(q, _)| *q == p)
            .map(|(_, n)| n)
            .sum();
        if snapshots >= 1 {
            break;
        }
        assert!(started.elapsed() < TIMEOUT, "no snapshot of partition {p}");
        alice.send_acked(&filler, id, &[b'x'; 512]);
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGKILL the router serving the direct conversation.
    let victim = fleet.kill_owner_of(p);
    let survivor = usize::from(victim == "router-101");
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
    // The survivor took the partition over from its snapshot.
    let log = std::fs::read_to_string(&fleet.routers[survivor].1).unwrap();
    let took_over = log
        .lines()
        .rfind(|l| l.contains("serving partition") && l.contains(&format!("partition={p} ")))
        .unwrap_or_else(|| panic!("no takeover of {p} logged:\n{log}"))
        .to_owned();
    assert!(
        !took_over.contains("snapshot_at=0 "),
        "taken over without its snapshot: {took_over}"
    );

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

// ----- end-to-end encryption in a fleet -----

/// Reads frames of either family until `pick` accepts one (or `limit`).
fn wait_any_for<T>(
    c: &mut Client,
    limit: Duration,
    mut pick: impl FnMut(&Incoming) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(f) = c.try_next_any(Duration::from_millis(100)) {
            if let Some(t) = pick(&f) {
                return Some(t);
            }
        }
    }
    None
}

fn wait_any<T>(c: &mut Client, pick: impl FnMut(&Incoming) -> Option<T>) -> T {
    wait_any_for(c, Duration::from_secs(20), pick).expect("the expected frame arrived")
}

fn upload(c: &mut Client, d: &mut E2eeDevice, one_time: u32) -> u32 {
    c.send(&d.upload(90, one_time));
    wait_any(c, |f| match f {
        Incoming::E2ee(E2eeFrame::KeyCount {
            request: 90,
            remaining,
        }) => Some(*remaining),
        _ => None,
    })
}

/// Fetches `user`'s bundle; `None` if no answer came within `limit` (a
/// command lost while its partition changed owner).
fn fetch_within(
    c: &mut Client,
    user: &str,
    request: u32,
    limit: Duration,
) -> Option<Vec<DeviceBundle>> {
    c.send(&ClientFrame::BundleFetch {
        request,
        user: user.into(),
    });
    wait_any_for(c, limit, |f| match f {
        Incoming::E2ee(E2eeFrame::Bundle {
            request: r,
            devices,
            ..
        }) if *r == request => Some(devices.clone()),
        _ => None,
    })
}

#[test]
fn one_time_prekeys_go_out_once_across_gateways() {
    let fleet = Fleet::start();
    let g1 = fleet.gateway("g1", 1);
    let g2 = fleet.gateway("g2", 2);
    let (mut alice, _) = g1.online("alice", 1);
    let mut keys = E2eeDevice::new("alice", 1);
    assert_eq!(upload(&mut alice, &mut keys, 60), 60);

    // 100 fetchers, half on each gateway, all at once.
    let clients: Vec<Client> = (0..100)
        .map(|i| {
            let g = if i % 2 == 0 { &g1 } else { &g2 };
            g.online(&format!("fetcher{i}"), 1).0
        })
        .collect();
    let barrier = Arc::new(Barrier::new(clients.len()));
    let threads: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let b = fetch_within(&mut c, "alice", 7, Duration::from_secs(30))
                    .expect("bundle answered");
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
    assert_eq!(distinct, (1..=60).collect(), "and none twice");
    let last_resort = got
        .iter()
        .filter(|(k, _)| *k == PrekeyKind::LastResort)
        .count();
    assert_eq!(last_resort, 40);
}

#[test]
fn one_time_prekeys_are_never_handed_out_again_after_a_takeover() {
    let mut fleet = Fleet::start();
    let g1 = fleet.gateway("g1", 1);
    let g2 = fleet.gateway("g2", 2);
    let (mut alice, _) = g1.online("alice", 1);
    let mut keys = E2eeDevice::new("alice", 1);
    assert_eq!(upload(&mut alice, &mut keys, 400), 400);

    // 20 fetchers over both gateways fetch in a loop; a fetch without an
    // answer in 2 s (lost in the takeover) is retried under a new request.
    let handed: Arc<Mutex<Vec<(Instant, u32)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let g = if i % 2 == 0 { &g1 } else { &g2 };
            let mut c = g.online(&format!("fetcher{i}"), 1).0;
            let (handed, stop) = (handed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut request = 0;
                while !stop.load(Ordering::Acquire) {
                    request += 1;
                    if let Some(b) = fetch_within(&mut c, "alice", request, Duration::from_secs(2))
                    {
                        if b[0].prekey_kind == PrekeyKind::OneTime {
                            handed
                                .lock()
                                .unwrap()
                                .push((Instant::now(), b[0].prekey.id));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    let count = |handed: &Mutex<Vec<(Instant, u32)>>| handed.lock().unwrap().len();
    let started = Instant::now();
    while count(&handed) < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "fetches stalled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = count(&handed);
    let victim = fleet.kill_owner_of(partition_of("alice", PARTITIONS));
    let killed = Instant::now();
    while count(&handed) < before + 100 {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "fetches never resumed after the takeover"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Release);
    for t in threads {
        t.join().unwrap();
    }
    let handed = handed.lock().unwrap();
    let after_kill: Vec<u32> = handed
        .iter()
        .filter(|(at, _)| *at > killed)
        .map(|(_, id)| *id)
        .collect();
    let first_after = handed
        .iter()
        .filter(|(at, _)| *at > killed)
        .map(|(at, _)| *at - killed)
        .min();
    let mut ids: Vec<u32> = handed.iter().map(|(_, id)| *id).collect();
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    eprintln!(
        "owner {victim} of alice's partition SIGKILLed after {before} one-time prekeys; \
         first handed out by the new owner after {first_after:?}; {} after the kill, {total} in all",
        after_kill.len()
    );
    assert_eq!(ids.len(), total, "a one-time prekey was handed out twice");
    assert!(!after_kill.is_empty());
}

#[test]
fn per_device_sends_in_a_fleet_check_devices_with_their_users_partitions() {
    let fleet = Fleet::start();
    let g1 = fleet.gateway("g1", 1);
    let g2 = fleet.gateway("g2", 2);
    // Two users on partitions of their own, neither the conversation's,
    // so both device lists come from other partitions.
    let (a, b, conv) = (0..)
        .map(|i| {
            let (a, b) = (format!("alice{i}"), format!("bob{i}"));
            let conv = direct_conversation(&a, &b);
            (a, b, conv)
        })
        .find(|(a, b, conv)| {
            let (pa, pb, pc) = (
                partition_of(a, PARTITIONS),
                partition_of(b, PARTITIONS),
                partition_of(conv, PARTITIONS),
            );
            pa != pc && pb != pc && pa != pb
        })
        .unwrap();
    let mut sockets = Vec::new();
    let mut devices = Vec::new();
    for (user, d, g) in [(&a, 1, &g1), (&a, 2, &g2), (&b, 1, &g2), (&b, 2, &g1)] {
        let (mut c, _) = g.online(user, d);
        let mut dev = E2eeDevice::new(user, d);
        upload(&mut c, &mut dev, 5);
        sockets.push(c);
        devices.push(dev);
    }
    for (user, request) in [(&b, 1), (&a, 2)] {
        for bundle in fetch_within(&mut sockets[0], user, request, Duration::from_secs(10)).unwrap()
        {
            devices[0].start_session(user, &bundle).unwrap();
        }
    }
    let addr = |u: &str, d| DeviceAddress {
        user: u.into(),
        device: d,
    };

    // One of bob's devices only, and a device bob never had.
    let mut partial = devices[0]
        .encrypt_for(&[(b.clone(), 1)], b"too few")
        .unwrap();
    let mut stray = partial[0].clone();
    stray.device = 3;
    partial.push(stray);
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
    assert_eq!(
        mismatch,
        (vec![addr(&a, 2), addr(&b, 2)], vec![addr(&b, 3)])
    );
    let code = wait_any(&mut sockets[0], |f| match f {
        Incoming::Frame(ServerFrame::Error {
            code, reference: 5, ..
        }) => Some(*code),
        _ => None,
    });
    assert_eq!(code, 409);

    // Fixed and retried with the same client id: each device gets only
    // its own ciphertext, and it decrypts.
    let to = [(a.clone(), 2), (b.clone(), 1), (b.clone(), 2)];
    let cts = devices[0].encrypt_for(&to, b"meet at noon").unwrap();
    let bodies: Vec<Bytes> = cts.iter().map(|c| c.body.clone()).collect();
    sockets[0].send(&ClientFrame::SendPerDevice {
        conversation: conv.clone(),
        client_id: 5,
        ciphertexts: cts,
    });
    wait_any(&mut sockets[0], |f| {
        matches!(f, Incoming::Frame(ServerFrame::Sent { client_id: 5, .. })).then_some(())
    });
    for (i, body) in bodies.iter().enumerate() {
        let at = i + 1;
        let (from_device, got) = wait_any(&mut sockets[at], |f| match f {
            Incoming::Frame(ServerFrame::Message {
                sender,
                sender_device,
                body,
                ..
            }) if *sender == a => Some((*sender_device, body.clone())),
            _ => None,
        });
        assert_eq!(&got, body, "device {at} got exactly its own ciphertext");
        let plain = devices[at].decrypt(&a, from_device, &got).unwrap();
        assert_eq!(plain, b"meet at noon");
    }

    // Bob unlinks his second device on his own partition: the next send
    // that still names it is told it is stale.
    sockets[2].send(&ClientFrame::DeviceRemove {
        request: 9,
        device: 2,
    });
    wait_any(&mut sockets[2], |f| {
        matches!(f, Incoming::Frame(ServerFrame::Done { request: 9 })).then_some(())
    });
    let cts = devices[0].encrypt_for(&to, b"still there?").unwrap();
    sockets[0].send(&ClientFrame::SendPerDevice {
        conversation: conv,
        client_id: 6,
        ciphertexts: cts,
    });
    let mismatch = wait_any(&mut sockets[0], |f| match f {
        Incoming::E2ee(E2eeFrame::DeviceMismatch {
            client_id: 6,
            missing,
            stale,
        }) => Some((missing.clone(), stale.clone())),
        _ => None,
    });
    assert_eq!(mismatch, (vec![], vec![addr(&b, 2)]));
}

// ----- gateway liveness -----

/// A gateway in a process of its own, so that it can be SIGKILLed.
struct GatewayProcess {
    child: Child,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl GatewayProcess {
    fn start(fleet: &Fleet, name: &str, node: u16) -> Self {
        let dir = fleet.gateway_dir(name);
        let log_path = dir.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--role", "gateway", "--nats", &fleet.url])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(["--nats-replicas", "1"])
            .args(["--gateway-ttl-ms", &GATEWAY_TTL_MS.to_string()])
            .args(["--node-id", &node.to_string()])
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--cores", "2", "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("gateway process");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(at) = text.find("listen.addr=") {
                let rest = &text[at + "listen.addr=".len()..];
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            assert!(Instant::now() < deadline, "gateway did not start: {text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        Self { child, addr, dir }
    }

    fn online(&self, user: &str, device: u32) -> (Client, Vec<ServerFrame>) {
        let secret = courier_gateway::secret::load_or_create(&self.dir).unwrap();
        let token = token::mint(&secret, &token::claims_for(user, device, now_s(), 3600));
        let mut c = Client::connect(self.addr, &token).expect("upgrade accepted");
        let caught_up = c.sync(vec![]);
        (c, caught_up)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for a presence push about `user`; returns whether it says online.
fn presence_of(c: &mut Client, user: &str, limit: Duration) -> Option<(bool, u64)> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(ServerFrame::Presence { entries, .. }) = c.try_next(Duration::from_millis(50)) {
            if let Some(e) = entries.iter().find(|e| e.user == user) {
                return Some((e.online, e.last_seen_ms));
            }
        }
    }
    None
}

#[test]
fn a_killed_gateways_users_go_offline_and_catch_up_on_reconnect() {
    let fleet = Fleet::start();
    let mut g1 = GatewayProcess::start(&fleet, "g1", 1);
    let g2 = fleet.gateway("g2", 2);
    let (_alice, _) = g1.online("alice", 1);
    let (mut bob, _) = g2.online("bob", 1);
    bob.send(&ClientFrame::PresenceSubscribe {
        request: 1,
        users: vec!["alice".into()],
    });
    let (online, _) = presence_of(&mut bob, "alice", Duration::from_secs(10)).unwrap();
    assert!(online, "alice is online on g1");
    // Let the routers' scans see g1's liveness key at least once.
    std::thread::sleep(Duration::from_millis(600));

    g1.kill();
    let killed = Instant::now();
    let killed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Sent while g1 is dead: acknowledged, and kept for alice.
    let direct = "d:alice:bob";
    for id in 1..=3 {
        assert_eq!(bob.send_acked(direct, id, format!("m{id}").as_bytes()), id);
    }
    let limit = Duration::from_millis(GATEWAY_TTL_MS * 4);
    let (online, last_seen_ms) = presence_of(&mut bob, "alice", limit)
        .expect("alice's presence changed after her gateway died");
    let offline_after = killed.elapsed();
    eprintln!(
        "gateway SIGKILLed: alice offline to bob after {offline_after:?} \
         (gateway TTL {GATEWAY_TTL_MS} ms, router scan 250 ms); last seen \
         {last_seen_ms} ms, killed at about {killed_ms} ms"
    );
    assert!(!online, "the change is to offline");
    // Last seen is estimated as the key's expiry less the TTL: never
    // before the gateway's last refresh (a third of the TTL before the
    // kill at most), and later than the kill by at most a scan and the
    // server's expiry lag.
    let earliest = killed_ms - GATEWAY_TTL_MS / 3 - 100;
    assert!(
        (earliest..=killed_ms + 1000).contains(&last_seen_ms),
        "last seen {last_seen_ms}, killed at {killed_ms}"
    );
    assert!(offline_after < limit);

    // Sent after the routes were dropped: also kept.
    assert_eq!(bob.send_acked(direct, 4, b"m4"), 4);
    let (_alice, caught_up) = g2.online("alice", 1);
    let seqs: Vec<u64> = caught_up
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message {
                conversation, seq, ..
            } if conversation == direct => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "everything arrives in the catch-up");
    let (online, _) = presence_of(&mut bob, "alice", Duration::from_secs(10)).unwrap();
    assert!(online, "and alice is online again, on g2");

    // Every router counted the expiry, which operators alert on.
    for router in &fleet.routers {
        let started = Instant::now();
        while metric(router, "courier_fleet_gateways_expired_total") < 1 {
            assert!(started.elapsed() < TIMEOUT, "the expiry is not counted");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(metric(router, "courier_fleet_gateways_live") >= 1);
    }
}

/// One unlabelled series of `router`'s metrics, 0 when absent.
fn metric(router: &Router, name: &str) -> u64 {
    let (_, text) = common::http_get(router.metrics_addr(), "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `user`'s device 1 registers a webhook `token` with its partition and
/// goes away.
fn register_webhook_token(node: &TestNode, user: &str, token: &str) {
    let mut phone = node.connect(user, 1);
    phone.send(&ClientFrame::PushRegister {
        request: 1,
        provider: courier_protocol::frame::PushProvider::Webhook,
        token: token.into(),
        ciphertext: false,
    });
    assert_eq!(phone.next(), ServerFrame::Done { request: 1 });
}

/// Push in a fleet: bob registers his token with his own partition, and
/// the messages for him are decided by the partitions of their
/// conversations, which wake his phone from their copies of the token.
/// After he unregisters, no partition wakes it.
#[test]
fn offline_devices_are_woken_by_their_conversations_partitions() {
    let receiver = common::webhook::Receiver::start();
    let flags_dir = tempfile::tempdir().unwrap();
    let flags = common::webhook::push_flags(flags_dir.path(), &receiver, "300");
    let fleet = Fleet::start_with(&flags);
    let node = fleet.gateway("g1", 1);

    // Senders whose conversation with bob is on another partition than bob.
    let bob = "push-bob";
    let away = |sender: &str| {
        partition_of(&direct_conversation(sender, bob), PARTITIONS) != partition_of(bob, PARTITIONS)
    };
    let mut senders = (0..).map(|i| format!("push-sender{i}")).filter(|s| away(s));
    let (alice, carol) = (senders.next().unwrap(), senders.next().unwrap());

    register_webhook_token(&node, bob, "bob-phone");
    // The detach and the token's copies reach every partition.
    std::thread::sleep(Duration::from_millis(500));

    let (mut a, _) = node.online(&alice, 1);
    a.send_acked(&direct_conversation(&alice, bob), 1, b"hello");
    receiver.wait_for("bob's notification", |h| !h.is_empty());
    let hits = receiver.accepted();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["token"], "bob-phone");
    assert_eq!(hits[0]["conversation"], direct_conversation(&alice, bob));

    let mut phone = node.connect(bob, 1);
    phone.send(&ClientFrame::PushUnregister { request: 2 });
    assert_eq!(phone.next(), ServerFrame::Done { request: 2 });
    drop(phone);
    std::thread::sleep(Duration::from_millis(500));
    let (mut c, _) = node.online(&carol, 1);
    c.send_acked(&direct_conversation(&carol, bob), 1, b"hello");
    // Several push delays: nothing more comes.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(receiver.hits().len(), 1, "{:?}", receiver.hits());
}

/// A device unlinked by its user's partition frees its place under the
/// device limit in every partition: each keeps its own record of the
/// devices that attached to it, and used to go on counting the unlinked
/// one, closing the user's next new device with 4006.
#[test]
fn an_unlinked_device_frees_its_place_in_every_partition() {
    let flags = ["--max-devices".to_string(), "2".to_string()];
    let fleet = Fleet::start_with(&flags);
    let node = fleet.gateway("g1", 1);
    let user = "unlink-carol";
    let (mut first, _) = node.online(user, 1);
    let (mut second, _) = node.online(user, 2);

    first.send(&ClientFrame::DeviceRemove {
        request: 4,
        device: 2,
    });
    loop {
        if let ServerFrame::Done { request: 4 } = first.next() {
            break;
        }
    }
    assert_eq!(
        second.expect_close().0,
        courier_protocol::close::DEVICE_REMOVED
    );

    // The user's partition told the others when it answered; the new
    // device connects after that answer, so every partition has freed
    // the place by the time its attach arrives.
    let (mut third, _) = node.online(user, 3);
    let mut covered = BTreeSet::new();
    for i in 0.. {
        if covered.len() == usize::from(PARTITIONS) {
            break;
        }
        let conversation = direct_conversation(user, &format!("unlink-peer{i}"));
        if covered.insert(partition_of(&conversation, PARTITIONS)) {
            // Refused by any partition, the session would be closed here.
            assert_eq!(third.send_acked(&conversation, 10 + i, b"new phone"), 1);
        }
    }
}

/// The samples of `name` on `router`'s endpoint, by partition label.
fn partition_metric(router: &Router, name: &str) -> Vec<(u16, u64)> {
    let (_, text) = common::http_get(router.metrics_addr(), "/metrics");
    text.lines()
        .filter_map(|l| {
            let labels = l.strip_prefix(name)?.strip_prefix("{partition=\"")?;
            let (p, rest) = labels.split_once('"')?;
            let value = rest.rsplit(' ').next()?.trim().parse().ok()?;
            Some((p.parse().ok()?, value))
        })
        .collect()
}

/// A token copy published while its partition has no owner (its router
/// was just SIGKILLed, so nothing subscribes to the partition's subject)
/// is not lost: the user's partition keeps it in its outbox and sends it
/// again until the partition's new owner has applied it, and that owner
/// then wakes the device for a message it decides.
#[test]
fn a_token_copy_sent_while_its_partition_changes_owner_still_arrives() {
    let receiver = common::webhook::Receiver::start();
    let flags_dir = tempfile::tempdir().unwrap();
    let flags = common::webhook::push_flags(flags_dir.path(), &receiver, "300");
    let mut fleet = Fleet::start_with(&flags);
    let node = fleet.gateway("g1", 1);
    let bob = "handover-bob";
    let home = partition_of(bob, PARTITIONS);

    // A partition served by the other router than bob's: wait for the
    // routers to share the partitions out.
    let started = Instant::now();
    let (target, survivor) = loop {
        let now = owners(&*fleet.kv).unwrap();
        let other = (0..PARTITIONS).find(|p| now[usize::from(*p)] != now[usize::from(home)]);
        if let Some(p) = other {
            let survivor = usize::from(now[usize::from(home)] != "router-101");
            break (p, survivor);
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never shared");
        std::thread::sleep(Duration::from_millis(100));
    };
    let alice = (0..)
        .map(|i| format!("handover-alice{i}"))
        .find(|a| partition_of(&direct_conversation(a, bob), PARTITIONS) == target)
        .unwrap();

    fleet.kill_owner_of(target);
    register_webhook_token(&node, bob, "bob-phone");

    // Every copy acknowledged: the lost one too, by the new owner.
    let router = &fleet.routers[survivor];
    let started = Instant::now();
    loop {
        let waiting = partition_metric(router, "courier_peer_outbox_messages");
        // Some partition has no owner while its lease runs out.
        let served = owners(&*fleet.kv).unwrap_or_default();
        let all_served = served.len() == usize::from(PARTITIONS)
            && served.iter().all(|o| *o == served[usize::from(home)]);
        if all_served && waiting.iter().all(|(_, n)| *n == 0) && !waiting.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "copies never acknowledged: {waiting:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let resent: u64 = partition_metric(router, "courier_peer_resent_total")
        .iter()
        .filter(|(p, _)| *p == home)
        .map(|(_, n)| n)
        .sum();
    assert!(
        resent >= 1,
        "the copy published into the gap was sent again"
    );

    let (mut a, _) = node.online(&alice, 1);
    send_until_sent(
        &mut a,
        &direct_conversation(&alice, bob),
        1,
        Duration::from_secs(2),
    );
    receiver.wait_for("bob's notification", |h| !h.is_empty());
    let hits = receiver.accepted();
    assert_eq!(hits[0]["token"], "bob-phone");
    assert_eq!(hits[0]["conversation"], direct_conversation(&alice, bob));
}

/// Asks for one page of the chat list; returns the answer (`Chats` or
/// `Error`) and how long it took.
fn chat_page(
    c: &mut Client,
    request: u32,
    cursor: (u64, &str),
    limit: u16,
) -> (ServerFrame, Duration) {
    let started = Instant::now();
    c.send(&ClientFrame::ChatList {
        request,
        before_ms: cursor.0,
        before_conversation: cursor.1.into(),
        limit,
    });
    let deadline = started + Duration::from_secs(20);
    while Instant::now() < deadline {
        match c.try_next(deadline.saturating_duration_since(Instant::now())) {
            Some(f @ ServerFrame::Chats { request: r, .. }) if r == request => {
                return (f, started.elapsed())
            }
            Some(f @ ServerFrame::Error { reference, .. }) if reference == u64::from(request) => {
                return (f, started.elapsed())
            }
            _ => {}
        }
    }
    panic!("chat list {request} never answered");
}

/// Pages through the whole chat list `limit` rows at a time; returns the
/// pages' rows and their `more` flags.
fn chat_pages(c: &mut Client, first_request: u32, limit: u16) -> Vec<(Vec<Chat>, bool)> {
    let mut pages = Vec::new();
    let mut cursor = (0, String::new());
    for request in first_request.. {
        let (page, _) = chat_page(c, request, (cursor.0, &cursor.1), limit);
        let ServerFrame::Chats { more, chats, .. } = page else {
            panic!("chat list page {request}: {page:?}");
        };
        if let Some(last) = chats.last() {
            cursor = (last.last_ms, last.conversation.clone());
        }
        pages.push((chats, more));
        if !more {
            return pages;
        }
        assert!(pages.len() < 100, "the chat list never ends");
    }
    unreachable!()
}

/// A user's conversations are held by the partitions of their ids, so the
/// gateway asks every partition for its page and merges them: paging with
/// the cursor lists every conversation once, newest first, with `more` on
/// every page but the last. Asked while a partition has no owner (its
/// router just SIGKILLed), the chat list is still answered: complete once
/// the new owner has it again, or 504 when that takes over 5 s.
#[test]
fn the_chat_list_pages_through_every_partitions_conversations() {
    let mut fleet = Fleet::start();
    let node = fleet.gateway("g1", 1);
    let user = "list-alice";
    // Two direct conversations on each partition.
    let mut held = [0; PARTITIONS as usize];
    let peers: Vec<String> = (0..)
        .map(|i| format!("list-peer{i}"))
        .filter(|peer| {
            let p = usize::from(partition_of(&direct_conversation(user, peer), PARTITIONS));
            held[p] += 1;
            held[p] <= 2
        })
        .take(2 * usize::from(PARTITIONS))
        .collect();
    let conversations: Vec<String> = peers
        .iter()
        .map(|peer| direct_conversation(user, peer))
        .collect();

    // One message in each, then another in two of them, so the newest
    // first order is not the partitions' order nor the first sends'.
    let (mut alice, _) = node.online(user, 1);
    let mut last_ms = std::collections::BTreeMap::new();
    let again = [&conversations[5], &conversations[2]];
    for (id, conversation) in (1..).zip(conversations.iter().chain(again)) {
        let (sent, _) = send_until_sent(&mut alice, conversation, id, Duration::from_secs(2));
        let ServerFrame::Sent { timestamp_ms, .. } = sent else {
            unreachable!()
        };
        last_ms.insert(conversation.clone(), timestamp_ms);
    }
    let mut expected: Vec<(u64, String)> = last_ms.iter().map(|(c, ms)| (*ms, c.clone())).collect();
    expected.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let expected: Vec<String> = expected.into_iter().map(|(_, c)| c).collect();

    // Three a page: 3, 3 and 2 rows.
    let pages = chat_pages(&mut alice, 10, 3);
    let shape: Vec<(usize, bool)> = pages.iter().map(|(c, more)| (c.len(), *more)).collect();
    assert_eq!(shape, [(3, true), (3, true), (2, false)]);
    let listed: Vec<&Chat> = pages.iter().flat_map(|(c, _)| c).collect();
    let names: Vec<&str> = listed.iter().map(|c| c.conversation.as_str()).collect();
    assert_eq!(names, expected);
    for chat in &listed {
        assert_eq!(chat.last_ms, last_ms[&chat.conversation], "{chat:?}");
        assert_eq!(chat.last_sender, user);
        let seqs = if again.contains(&&chat.conversation) {
            2
        } else {
            1
        };
        assert_eq!((chat.last_seq, chat.read_seq, chat.unread), (seqs, seqs, 0));
    }
    // The default page holds them all; one row a page, each in turn.
    let pages = chat_pages(&mut alice, 20, 0);
    assert_eq!(pages.len(), 1);
    let names: Vec<&str> = pages[0].0.iter().map(|c| c.conversation.as_str()).collect();
    assert_eq!(names, expected);
    let pages = chat_pages(&mut alice, 30, 1);
    assert_eq!(pages.len(), expected.len());
    let names: Vec<&str> = pages
        .iter()
        .map(|(c, _)| c[0].conversation.as_str())
        .collect();
    assert_eq!(names, expected);
    // A peer sees only its own conversation, unread.
    let (mut bob, _) = node.online(&peers[0], 1);
    let pages = chat_pages(&mut bob, 1, 0);
    let rows: Vec<(&str, u64)> = pages[0]
        .0
        .iter()
        .map(|c| (c.conversation.as_str(), c.unread))
        .collect();
    assert_eq!(rows, [(conversations[0].as_str(), 1)]);

    // One router dies: its partitions have no owner until the other takes
    // them over. The chat list asked now is answered all the same.
    let victim = fleet.kill_owner_of(partition_of(&conversations[0], PARTITIONS));
    let (answer, took) = chat_page(&mut alice, 40, (0, ""), 0);
    eprintln!("router {victim} killed; chat list answered after {took:?}: {answer:?}");
    match answer {
        ServerFrame::Chats { more, chats, .. } => {
            let names: Vec<&str> = chats.iter().map(|c| c.conversation.as_str()).collect();
            assert_eq!(names, expected);
            assert!(!more);
        }
        ServerFrame::Error { code, .. } => {
            assert_eq!(code, courier_protocol::error::ErrorCode::Unavailable as u16);
            assert!(took >= Duration::from_secs(5), "{took:?}");
        }
        other => unreachable!("{other:?}"),
    }
    assert!(took < Duration::from_secs(7), "{took:?}");
    // Once the partitions are served again, everything is there.
    let started = Instant::now();
    for request in 50.. {
        match chat_page(&mut alice, request, (0, ""), 0).0 {
            ServerFrame::Chats { chats, .. } => {
                let names: Vec<&str> = chats.iter().map(|c| c.conversation.as_str()).collect();
                assert_eq!(names, expected);
                break;
            }
            other => assert!(started.elapsed() < Duration::from_secs(30), "{other:?}"),
        }
    }
}

/// Names `(watched, watcher, other)`: three users of three different
/// partitions, the direct conversation of the first two in a fourth.
fn apart() -> (String, String, String) {
    let p = |name: &str| partition_of(name, PARTITIONS);
    let names: Vec<String> = (0..2000).map(|i| format!("apart{i}")).collect();
    for a in &names {
        for w in names.iter().filter(|w| p(w) != p(a)) {
            let conversation = direct_conversation(a, w);
            let c = p(&conversation);
            if c == p(a) || c == p(w) {
                continue;
            }
            if let Some(o) = names.iter().find(|o| ![p(a), p(w), c].contains(&p(o))) {
                return (a.clone(), w.clone(), o.clone());
            }
        }
    }
    panic!("no names hash apart")
}

/// Waits for the next `Presence` answer or push; returns its request and
/// entries.
fn next_presence(c: &mut Client) -> (u32, Vec<(String, bool)>) {
    wait_any(c, |f| match f {
        Incoming::Frame(ServerFrame::Presence { request, entries }) => Some((
            *request,
            entries.iter().map(|e| (e.user.clone(), e.online)).collect(),
        )),
        _ => None,
    })
}

#[test]
fn presence_and_settings_belong_to_the_users_partition_across_the_fleet() {
    let mut fleet = Fleet::start_with(&["--presence-debounce-ms".into(), "300".into()]);
    let g1 = fleet.gateway("g1", 1);
    let g2 = fleet.gateway("g2", 2);
    let (alice, bob, carol) = apart();
    let (mut watcher, _) = g2.online(&bob, 1);

    // One subscription over two other partitions, answered once, in the
    // order named.
    watcher.send(&ClientFrame::PresenceSubscribe {
        request: 1,
        users: vec![carol.clone(), alice.clone()],
    });
    assert_eq!(
        next_presence(&mut watcher),
        (1, vec![(carol.clone(), false), (alice.clone(), false)])
    );
    let (mut reader, _) = g1.online(&alice, 1);
    assert_eq!(
        next_presence(&mut watcher),
        (0, vec![(alice.clone(), true)])
    );

    // Read receipts off, set at alice's partition, hold in a conversation
    // of another one: bob sees DELIVERED, never READ.
    reader.send(&ClientFrame::Settings {
        request: 2,
        mask: courier_protocol::frame::settings::READ_RECEIPTS_OFF,
        flags: courier_protocol::frame::settings::READ_RECEIPTS_OFF,
    });
    wait_any(&mut reader, |f| {
        matches!(f, Incoming::Frame(ServerFrame::Settings { request: 2, .. })).then_some(())
    });
    let direct = direct_conversation(&alice, &bob);
    let mut receipts = Vec::new();
    for id in 1..=3u64 {
        let seq = watcher.send_acked(&direct, id, b"read me");
        messages_until(&mut reader, &direct, seq);
        reader.send(&ClientFrame::Read {
            conversation: direct.clone(),
            seq,
        });
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Some(ServerFrame::Receipt { seq, kind, .. }) =
                watcher.try_next(Duration::from_millis(50))
            {
                receipts.push((seq, kind));
            }
        }
    }
    assert!(
        receipts
            .iter()
            .all(|(_, kind)| *kind == courier_protocol::frame::ReceiptKind::Delivered),
        "{receipts:?}"
    );
    assert!(!receipts.is_empty(), "DELIVERED still flows");

    // The subscription outlives a takeover of alice's partition: the new
    // owner is told it (its answer reaches bob as a push) and announces
    // her going.
    let killed = fleet.kill_owner_of(partition_of(&alice, PARTITIONS));
    eprintln!("killed {killed}, the owner of {alice}'s partition");
    let started = Instant::now();
    loop {
        let (request, entries) = next_presence(&mut watcher);
        if request == 0 && entries == vec![(alice.clone(), true)] {
            break;
        }
        assert!(started.elapsed() < TIMEOUT, "{entries:?}");
    }
    drop(reader);
    let started = Instant::now();
    loop {
        let (_, entries) = next_presence(&mut watcher);
        if entries == vec![(alice.clone(), false)] {
            break;
        }
        assert!(started.elapsed() < TIMEOUT, "{entries:?}");
    }
    eprintln!(
        "alice's going announced {:?} after her partition's takeover began",
        started.elapsed()
    );
}

/// A router that takes a live gateway for dead detaches its sessions in
/// the partitions it serves (seen at 200,000 connections, when a liveness
/// listing left a refreshed key out). Each such partition tells the
/// gateway, which attaches its sessions there again with a catch-up: its
/// clients go on receiving without reconnecting. The test hands every
/// partition the verdict a router's scan would.
#[test]
fn a_live_gateway_taken_for_dead_attaches_its_sessions_again() {
    use courier_router::api::{Command as RouterCommand, PeerMsg};
    use courier_router::fleet::{command_subject, decode_detached, detached_subjects};

    let fleet = Fleet::start();
    let node = fleet.gateway("g1", 1);
    let (mut alice, _) = node.online("wrongly-gone-alice", 1);
    let (mut bob, _) = node.online("wrongly-gone-bob", 1);
    let direct = direct_conversation("wrongly-gone-alice", "wrongly-gone-bob");
    send_until_sent(&mut alice, &direct, 1, Duration::from_secs(2));
    messages_until(&mut bob, &direct, 1);

    let nats = Nats::connect(&NatsConfig {
        servers: vec![fleet.url.clone()],
        ..Default::default()
    })
    .unwrap();
    let bus = nats.pubsub();
    let notices = bus.subscribe(&detached_subjects(1)).unwrap();
    let last_seen_ms = now_s() * 1000;
    let gone = [RouterCommand::Peer(PeerMsg::GatewayGone {
        node: 1,
        last_seen_ms,
    })];
    let payload = Bytes::from(courier_router::wire::encode_commands(&gone));
    for p in 0..PARTITIONS {
        bus.publish(&command_subject(p), payload.clone()).unwrap();
    }
    // The users' partitions held their sessions (only a user's partition
    // routes the user's sessions), so each of them tells it.
    let homes: BTreeSet<u16> = ["wrongly-gone-alice", "wrongly-gone-bob"]
        .iter()
        .map(|u| partition_of(u, PARTITIONS))
        .collect();
    let mut told = BTreeSet::new();
    while told.len() < homes.len() {
        let m = notices
            .recv_timeout(TIMEOUT)
            .expect("every partition tells the gateway");
        assert_eq!(decode_detached(&m.payload), Some(last_seen_ms));
        told.insert(m.subject);
    }

    // Sent after the detach: bob has it live (or from the catch-up the
    // gateway ran when it attached again), on the same connection.
    send_until_sent(&mut alice, &direct, 2, Duration::from_secs(2));
    messages_until(&mut bob, &direct, 2);
    let started = Instant::now();
    loop {
        let acted = detach_notices(&node);
        if acted == homes.len() as u64 {
            break;
        }
        assert!(started.elapsed() < TIMEOUT, "{acted} notices counted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number a gateway's metrics give `courier_fleet_detach_notices_total`.
fn detach_notices(node: &TestNode) -> u64 {
    node.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("courier_fleet_detach_notices_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A gateway restarted under the same node id detaches, by its start
/// announcement, what its killed predecessor left attached. The
/// partitions say so, and the new process, whose own sessions were not
/// touched, does not attach everything again for it.
#[test]
fn a_restarted_gateway_does_not_act_on_the_detach_its_own_start_caused() {
    use courier_router::fleet::{decode_detached, detached_subjects};

    let fleet = Fleet::start();
    let mut old = GatewayProcess::start(&fleet, "g1", 1);
    let (_alice, _) = old.online("restarted-alice", 1);
    let nats = Nats::connect(&NatsConfig {
        servers: vec![fleet.url.clone()],
        ..Default::default()
    })
    .unwrap();
    let notices = nats.pubsub().subscribe(&detached_subjects(1)).unwrap();
    old.kill();
    let new = fleet.gateway("g1-again", 1);
    let mut told = BTreeSet::new();
    let mut last_seen = BTreeSet::new();
    // Alice's partition, the only one that routed her session.
    while told.is_empty() {
        let m = notices
            .recv_timeout(TIMEOUT)
            .expect("alice's partition detaches the old session and says so");
        last_seen.extend(decode_detached(&m.payload));
        told.insert(m.subject);
    }
    assert_eq!(last_seen.len(), 1, "one announcement: {last_seen:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        detach_notices(&new),
        0,
        "its own start's notices are not acted on"
    );
}

/// Only a user's partition routes the user's sessions, so the fleet
/// keeps one route per session, not one per session per partition; the
/// others relay what they have for the user there.
#[test]
fn a_session_is_routed_by_its_users_partition_only() {
    let fleet = Fleet::start();
    let node = fleet.gateway("g1", 1);
    let users: Vec<String> = (0..12).map(|i| format!("routed-{i}")).collect();
    let _online: Vec<_> = users.iter().map(|u| node.online(u, 1)).collect();
    let mut expected = vec![0u64; usize::from(PARTITIONS)];
    for u in &users {
        expected[usize::from(partition_of(u, PARTITIONS))] += 1;
    }
    let started = Instant::now();
    loop {
        let mut routes = vec![0u64; usize::from(PARTITIONS)];
        for router in &fleet.routers {
            for (p, n) in partition_metric(router, "courier_routes_online") {
                routes[usize::from(p)] += n;
            }
        }
        if routes == expected {
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "routes by partition {routes:?}, users by partition {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
