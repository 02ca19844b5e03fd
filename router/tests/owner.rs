//! Partition ownership through leases, against both bus backends: two
//! routers split the partitions, and when one dies without a word the
//! other takes its partitions over within the lease TTL and resumes them
//! from the changelog.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{collect, device, frame, outlet, session, sync_done};
use courier_bus::local::{LocalKv, LocalLog};
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::testing::{HookedLog, NatsServer};
use courier_bus::{Kv, Log};
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_router::api::{Command, Delivery, Outlet, SessionKey};
use courier_router::fleet::{OutletFactory, Owner, OwnerConfig};
use courier_router::{RouterConfig, RouterHandle};

const PARTITIONS: u16 = 4;
const TTL: Duration = Duration::from_secs(2);

type Rx = std::sync::mpsc::Receiver<(u16, Vec<Delivery>)>;

/// Every partition of a process delivers into one channel.
fn outlets() -> (OutletFactory, Rx) {
    let (out, rx) = outlet();
    let out: Arc<dyn Outlet> = out;
    (Arc::new(move |_| out.clone()), rx)
}

/// Router `id` of `partitions`, its data under `dir`, scanning every `scan`.
fn owner_config(id: &str, dir: &std::path::Path, partitions: u16, scan: Duration) -> OwnerConfig {
    OwnerConfig {
        link_gaps: None,
        router_id: id.into(),
        partitions,
        scan_interval: scan,
        data_dir: dir.join(id),
        subject_prefix: "t.log".into(),
        snapshot_min_bytes: courier_router::fleet::SNAPSHOT_MIN_BYTES,
        router: RouterConfig::default(),
        intake: None,
        gateways: None,
        metrics: None,
    }
}

fn owner(id: &str, dir: &std::path::Path, log: &Arc<dyn Log>, kv: &Arc<dyn Kv>) -> (Owner, Rx) {
    let (factory, rx) = outlets();
    let config = owner_config(id, dir, PARTITIONS, Duration::from_millis(200));
    (
        Owner::start(config, log.clone(), kv.clone(), factory).unwrap(),
        rx,
    )
}

/// The embedded bus: a changelog in `dir` and a lease bucket with [`TTL`].
fn embedded(dir: &std::path::Path) -> (Arc<dyn Log>, Arc<dyn Kv>) {
    let log: Arc<dyn Log> = Arc::new(LocalLog::open(dir, Duration::from_secs(120)).unwrap());
    (log, Arc::new(LocalKv::new(Some(TTL))))
}

/// JetStream on a nats-server of its own (kept alive by the caller).
fn jetstream(dir: &std::path::Path) -> (NatsServer, Arc<dyn Log>, Arc<dyn Kv>) {
    let server = NatsServer::start(dir).unwrap();
    let nats = Nats::connect(&NatsConfig {
        servers: vec![server.url()],
        ..Default::default()
    })
    .unwrap();
    let log: Arc<dyn Log> = Arc::new(
        nats.log("COURIER_TEST", &["t.log.>"], 1, Duration::from_secs(120))
            .unwrap(),
    );
    let kv: Arc<dyn Kv> = Arc::new(nats.kv("test_leases", Some(TTL), 1).unwrap());
    (server, log, kv)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

fn send_and_answer(router: &RouterHandle, rx: &Rx, s: SessionKey, id: u64) -> ServerFrame {
    let send = ClientFrame::Send {
        conversation: "d:alice:bob".into(),
        client_id: id,
        body: Bytes::from(format!("m{id}")),
    };
    router.submit(frame(s, "alice", send)).unwrap();
    let answered = |f: &(SessionKey, ServerFrame)| {
        f.0 == s && matches!(&f.1, ServerFrame::Sent { client_id, .. } if *client_id == id)
    };
    collect(rx, |got| got.iter().any(answered))
        .into_iter()
        .find(answered)
        .unwrap()
        .1
}

fn attach(router: &RouterHandle, rx: &Rx, s: SessionKey) {
    router
        .submit(Command::Attach {
            session: s,
            device: device("alice"),
            issued_at_s: 0,
        })
        .unwrap();
    let sync = ClientFrame::Sync {
        tail: 0,
        summary: false,
        cursors: vec![],
    };
    router.submit(frame(s, "alice", sync)).unwrap();
    collect(rx, |f| sync_done(f, s));
}

fn a_dead_routers_partitions_move_to_the_survivor(log: Arc<dyn Log>, kv: Arc<dyn Kv>) {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_rx) = owner("router-a", dir.path(), &log, &kv);
    wait_until("a takes every partition", Duration::from_secs(30), || {
        a.owned().len() == usize::from(PARTITIONS)
    });
    let p0 = a.handle(0).unwrap();
    let alice = session(0, 1);
    attach(&p0, &a_rx, alice);
    let mut sent = Vec::new();
    for id in 1..=3 {
        sent.push(send_and_answer(&p0, &a_rx, alice, id));
    }

    // A second router joins: the partitions are split two and two.
    let (b, b_rx) = owner("router-b", dir.path(), &log, &kv);
    wait_until("the partitions are split", Duration::from_secs(30), || {
        a.owned().len() == 2 && b.owned().len() == 2
    });

    // The first dies without releasing anything.
    a.abandon();
    let took = wait_until("b takes every partition", Duration::from_secs(30), || {
        b.owned().len() == usize::from(PARTITIONS)
    });
    assert!(took < TTL * 4, "takeover took {took:?}");
    eprintln!("takeover after a silent death: {took:?} (lease TTL {TTL:?})");

    // Partition 0 resumes on the survivor exactly where it stopped.
    let p0 = b.handle(0).unwrap();
    let alice = session(0, 2);
    attach(&p0, &b_rx, alice);
    assert_eq!(send_and_answer(&p0, &b_rx, alice, 3), sent[2]);
    let fourth = send_and_answer(&p0, &b_rx, alice, 4);
    assert!(
        matches!(fourth, ServerFrame::Sent { seq: 4, .. }),
        "{fourth:?}"
    );
    b.stop();
    assert!(
        kv.keys("partition.").unwrap().is_empty(),
        "leases released at stop"
    );
}

#[test]
fn embedded_bus_a_dead_routers_partitions_move_to_the_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let (log, kv) = embedded(dir.path());
    a_dead_routers_partitions_move_to_the_survivor(log, kv);
}

#[test]
fn jetstream_a_dead_routers_partitions_move_to_the_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, log, kv) = jetstream(dir.path());
    a_dead_routers_partitions_move_to_the_survivor(log, kv);
}

/// Taking many partitions one replay after another used to renew nothing
/// until the last was taken: with replays longer than the TTL in total,
/// the first leases ran out while their partitions were still served, and
/// a second router (in the netfault run, one starting a little later) took
/// them, so two routers served one partition until the next renewal.
#[test]
fn leases_held_stay_renewed_while_more_partitions_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn Log> =
        Arc::new(LocalLog::open(dir.path(), Duration::from_secs(120)).unwrap());
    // Slow replays, as a long log's are.
    let log: Arc<dyn Log> = Arc::new(HookedLog::slow_replays(inner, Duration::from_millis(300)));
    let ttl = Duration::from_millis(1000);
    let kv: Arc<dyn Kv> = Arc::new(LocalKv::new(Some(ttl)));
    let (factory, _rx) = outlets();
    let partitions = 8;
    let config = owner_config(
        "router-a",
        dir.path(),
        partitions,
        Duration::from_millis(200),
    );
    let a = Owner::start(config, log, kv.clone(), factory).unwrap();
    // 8 replays of 300 ms: about 2.4 s of taking, more than twice the TTL.
    let started = Instant::now();
    let mut unleased = Vec::new();
    while a.owned().len() < usize::from(partitions) || started.elapsed() < Duration::from_secs(4) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a never took every partition"
        );
        for p in a.owned() {
            let holder = kv.get(&format!("partition.{p}")).unwrap().map(|e| e.value);
            if holder.as_deref() != Some(b"router-a".as_slice()) {
                unleased.push((started.elapsed(), p));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        unleased.is_empty(),
        "partitions served without a lease: {:?}",
        &unleased[..unleased.len().min(5)]
    );
    a.stop();
}

/// A lease whose key vanished before a renewal got through (it expired
/// during a stall longer than the TTL) and that nobody took meanwhile is
/// taken back by its owner, which goes on serving the partition with the
/// same router: no replay, no new owner announced, sequences continuing.
fn a_lapsed_lease_nobody_took_is_kept_without_a_takeover(log: Arc<dyn Log>, kv: Arc<dyn Kv>) {
    let dir = tempfile::tempdir().unwrap();
    let (a, a_rx) = owner("router-a", dir.path(), &log, &kv);
    wait_until("a takes every partition", Duration::from_secs(30), || {
        a.owned().len() == usize::from(PARTITIONS)
    });
    let p0 = a.handle(0).unwrap();
    let alice = session(0, 1);
    attach(&p0, &a_rx, alice);
    send_and_answer(&p0, &a_rx, alice, 1);

    kv.delete("partition.0", None).unwrap();
    wait_until("the lease is taken back", Duration::from_secs(10), || {
        a.leases().0 >= 1
    });
    assert_eq!(a.leases().1, 0, "no lease counted lost");
    assert_eq!(
        kv.get("partition.0").unwrap().map(|e| e.value),
        Some(Bytes::from_static(b"router-a"))
    );
    assert!(!p0.is_stopped(), "the partition's router was not replaced");
    let second = send_and_answer(&p0, &a_rx, alice, 2);
    assert!(
        matches!(second, ServerFrame::Sent { seq: 2, .. }),
        "{second:?}"
    );
    a.stop();
}

#[test]
fn embedded_bus_a_lapsed_lease_nobody_took_is_kept_without_a_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let (log, kv) = embedded(dir.path());
    a_lapsed_lease_nobody_took_is_kept_without_a_takeover(log, kv);
}

#[test]
fn jetstream_a_lapsed_lease_nobody_took_is_kept_without_a_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, log, kv) = jetstream(dir.path());
    a_lapsed_lease_nobody_took_is_kept_without_a_takeover(log, kv);
}

/// A replay longer than the lease TTL (a long changelog, a slow server)
/// used to end with the key expired, the partition given up and taken
/// again, and replayed again, for ever. Nobody else wanted it, so the key
/// is now taken back after the replay and the partition served.
#[test]
fn a_replay_longer_than_the_lease_ttl_still_ends_in_serving() {
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn Log> =
        Arc::new(LocalLog::open(dir.path(), Duration::from_secs(120)).unwrap());
    let ttl = Duration::from_millis(600);
    let log: Arc<dyn Log> = Arc::new(HookedLog::slow_replays(inner, ttl * 2));
    let kv: Arc<dyn Kv> = Arc::new(LocalKv::new(Some(ttl)));
    let (factory, _rx) = outlets();
    let config = owner_config("router-a", dir.path(), 1, Duration::from_millis(100));
    let a = Owner::start(config, log, kv.clone(), factory).unwrap();
    wait_until("the partition is served", Duration::from_secs(15), || {
        a.owned() == [0]
    });
    assert_eq!(
        kv.get("partition.0").unwrap().map(|e| e.value),
        Some(Bytes::from_static(b"router-a"))
    );
    a.stop();
}

/// A bucket whose every call first waits `delay_ms`: one router's view of
/// a stalling JetStream.
#[derive(Debug)]
struct SlowKv {
    inner: Arc<dyn Kv>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl SlowKv {
    fn wait(&self) {
        let ms = self.delay_ms.load(std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(ms));
    }
}

impl Kv for SlowKv {
    fn ttl(&self) -> Option<Duration> {
        self.inner.ttl()
    }
    fn get(&self, key: &str) -> Result<Option<courier_bus::Entry>, courier_bus::BusError> {
        self.wait();
        self.inner.get(key)
    }
    fn create(&self, key: &str, value: Bytes) -> Result<u64, courier_bus::BusError> {
        self.wait();
        self.inner.create(key, value)
    }
    fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, courier_bus::BusError> {
        self.wait();
        self.inner.update(key, value, revision)
    }
    fn put(&self, key: &str, value: Bytes) -> Result<u64, courier_bus::BusError> {
        self.wait();
        self.inner.put(key, value)
    }
    fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), courier_bus::BusError> {
        self.wait();
        self.inner.delete(key, revision)
    }
    fn keys(&self, prefix: &str) -> Result<Vec<String>, courier_bus::BusError> {
        self.wait();
        self.inner.keys(prefix)
    }
}

/// A router whose own renewals are stalling takes no partition: in a
/// JetStream stall the other routers' keys lapse too, and their owners
/// take them back once their renewals get through. Once its renewals are
/// quick again it takes a dead router's partitions as before.
#[test]
fn a_router_whose_renewals_stall_takes_no_partition_until_they_recover() {
    let dir = tempfile::tempdir().unwrap();
    let (log, kv) = embedded(dir.path());
    let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let slow: Arc<dyn Kv> = Arc::new(SlowKv {
        inner: kv.clone(),
        delay_ms: delay_ms.clone(),
    });
    let (a, _a_rx) = owner("router-a", dir.path(), &log, &kv);
    wait_until("a takes every partition", Duration::from_secs(30), || {
        a.owned().len() == usize::from(PARTITIONS)
    });
    let (b, _b_rx) = owner("router-b", dir.path(), &log, &slow);
    wait_until("the partitions are split", Duration::from_secs(30), || {
        a.owned().len() == 2 && b.owned().len() == 2
    });

    // b's calls now take 400 ms: a round of three renewals (its
    // membership, two partitions) takes over a third of the 2 s TTL, and
    // still renews each lease well within it.
    delay_ms.store(400, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    a.abandon();
    let stalled = Instant::now();
    while stalled.elapsed() < TTL * 3 {
        assert_eq!(b.owned().len(), 2, "a stalled router took a partition");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.leases(), (0, 0), "b's own leases held through the stall");

    delay_ms.store(0, std::sync::atomic::Ordering::Relaxed);
    let took = wait_until("b takes every partition", Duration::from_secs(30), || {
        b.owned().len() == usize::from(PARTITIONS)
    });
    eprintln!("taken over {took:?} after b's renewals recovered");
    b.stop();
}

/// A liveness bucket whose listing leaves out the keys named in `hidden`,
/// as a JetStream listing can leave out a key rewritten while it runs;
/// reading the key still finds it.
#[derive(Debug)]
struct ListingMisses {
    inner: LocalKv,
    hidden: std::sync::Mutex<Vec<String>>,
}

impl Kv for ListingMisses {
    fn ttl(&self) -> Option<Duration> {
        self.inner.ttl()
    }
    fn get(&self, key: &str) -> Result<Option<courier_bus::Entry>, courier_bus::BusError> {
        self.inner.get(key)
    }
    fn create(&self, key: &str, value: Bytes) -> Result<u64, courier_bus::BusError> {
        self.inner.create(key, value)
    }
    fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, courier_bus::BusError> {
        self.inner.update(key, value, revision)
    }
    fn put(&self, key: &str, value: Bytes) -> Result<u64, courier_bus::BusError> {
        self.inner.put(key, value)
    }
    fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), courier_bus::BusError> {
        self.inner.delete(key, revision)
    }
    fn keys(&self, prefix: &str) -> Result<Vec<String>, courier_bus::BusError> {
        let hidden = self.hidden.lock().unwrap().clone();
        let keys = self.inner.keys(prefix)?;
        Ok(keys.into_iter().filter(|k| !hidden.contains(k)).collect())
    }
}

#[test]
fn a_gateway_left_out_of_one_listing_is_not_taken_for_dead() {
    let dir = tempfile::tempdir().unwrap();
    let (log, leases) = embedded(dir.path());
    let gateways = Arc::new(ListingMisses {
        inner: LocalKv::new(Some(Duration::from_secs(60))),
        hidden: std::sync::Mutex::new(Vec::new()),
    });
    gateways
        .put("gateway.7", Bytes::from_static(b"alive"))
        .unwrap();
    gateways
        .put("gateway.8", Bytes::from_static(b"alive"))
        .unwrap();
    let (factory, _rx) = outlets();
    let mut config = owner_config("r1", dir.path(), PARTITIONS, Duration::from_millis(100));
    config.gateways = Some(gateways.clone());
    let owner = Owner::start(config, log, leases, factory).unwrap();
    wait_until("both gateways seen", Duration::from_secs(10), || {
        owner.gateways().0 == 2
    });

    // The listing leaves gateway 7 out for many scans; its key is there.
    *gateways.hidden.lock().unwrap() = vec!["gateway.7".into()];
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(owner.gateways(), (2, 0), "a key left out of the listing");

    // Gateway 8's key really goes: that one is gone.
    gateways.delete("gateway.8", None).unwrap();
    wait_until("gateway 8 taken for gone", Duration::from_secs(10), || {
        owner.gateways() == (1, 1)
    });
    owner.stop();
}
