//! One suite for both implementations of the bus traits: embedded
//! (`local`) and NATS JetStream against a real `nats-server`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_bus::lease::Lease;
use courier_bus::local::{LocalKv, LocalLog, LocalPubSub};
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::testing::NatsServer;
use courier_bus::{BusError, Kv, Log, PubSub};

const TTL: Duration = Duration::from_secs(2);

/// Everything one backend provides, with what keeps it alive.
struct Backend {
    log: Arc<dyn Log>,
    kv: Arc<dyn Kv>,
    pubsub: Arc<dyn PubSub>,
    _keep: Box<dyn std::any::Any>,
}

fn local() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LocalLog::open(dir.path(), Duration::from_secs(120)).expect("open log");
    Backend {
        log: Arc::new(log),
        kv: Arc::new(LocalKv::new(Some(TTL))),
        pubsub: Arc::new(LocalPubSub::new()),
        _keep: Box::new(dir),
    }
}

fn nats() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(dir.path()).expect("nats-server");
    let nats = Nats::connect(&NatsConfig {
        servers: vec![server.url()],
        ..Default::default()
    })
    .expect("connect");
    let log = nats
        .log("TEST", &["t.log.>"], 1, Duration::from_secs(120))
        .expect("stream");
    let kv = nats.kv("test_kv", Some(TTL), 1).expect("bucket");
    Backend {
        log: Arc::new(log),
        kv: Arc::new(kv),
        pubsub: Arc::new(nats.pubsub()),
        _keep: Box::new((server, dir, nats)),
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn replay_all(log: &dyn Log, subject: &str, after: u64) -> Vec<(u64, Bytes)> {
    let mut out = Vec::new();
    log.replay(subject, after, &mut |r| {
        out.push((r.seq, r.payload));
        Ok(())
    })
    .expect("replay");
    out
}

fn log_appends_in_order_and_replays(be: Backend) {
    let log = &*be.log;
    assert_eq!(log.last("t.log.a").expect("last"), 0);
    let a1 = log.append("t.log.a", "a1", b("one"), Some(0)).expect("a1");
    let b1 = log.append("t.log.b", "b1", b("other"), None).expect("b1");
    let a2 = log
        .append("t.log.a", "a2", b("two"), Some(a1.seq))
        .expect("a2");
    assert!(!a1.duplicate && a1.seq < b1.seq && b1.seq < a2.seq);
    assert_eq!(log.last("t.log.a").expect("last"), a2.seq);
    assert_eq!(
        replay_all(log, "t.log.a", 0),
        vec![(a1.seq, b("one")), (a2.seq, b("two"))]
    );
    assert_eq!(replay_all(log, "t.log.a", a1.seq), vec![(a2.seq, b("two"))]);
    assert!(replay_all(log, "t.log.a", a2.seq).is_empty());
    assert!(replay_all(log, "t.log.none", 0).is_empty());
}

fn log_dedupes_a_retried_append(be: Backend) {
    let log = &*be.log;
    let first = log.append("t.log.d", "same", b("x"), None).expect("first");
    let again = log.append("t.log.d", "same", b("x"), None).expect("again");
    assert!(again.duplicate);
    assert_eq!(again.seq, first.seq);
    assert_eq!(replay_all(log, "t.log.d", 0).len(), 1);
}

fn log_fences_a_stale_writer(be: Backend) {
    let log = &*be.log;
    let first = log.append("t.log.f", "f1", b("1"), Some(0)).expect("f1");
    log.append("t.log.f", "f2", b("2"), Some(first.seq))
        .expect("f2");
    // A writer that still believes `first` is the last record is refused.
    match log.append("t.log.f", "f3", b("3"), Some(first.seq)) {
        Err(BusError::Conflict(_)) => {}
        other => panic!("stale append: {other:?}"),
    }
    match log.append("t.log.f", "f4", b("4"), Some(0)) {
        Err(BusError::Conflict(_)) => {}
        other => panic!("append expecting empty: {other:?}"),
    }
    assert_eq!(replay_all(log, "t.log.f", 0).len(), 2);
}

/// A purge below a sequence drops only that subject's older records;
/// the last record stays, so a writer fenced on it can go on appending,
/// and a replay from before the purge point starts at what is left.
fn log_purges_a_subject_below_a_sequence(be: Backend) {
    let log = &*be.log;
    assert_eq!(log.last_record("t.log.p").expect("empty"), None);
    let mut last = 0;
    let mut seqs = Vec::new();
    for i in 0..5 {
        let a = log
            .append("t.log.p", &format!("p{i}"), b(&format!("r{i}")), Some(last))
            .expect("append");
        last = a.seq;
        seqs.push(a.seq);
    }
    let other = log.append("t.log.q", "q0", b("other"), None).expect("q");
    log.purge("t.log.p", seqs[3]).expect("purge");
    assert_eq!(
        replay_all(log, "t.log.p", 0),
        vec![(seqs[3], b("r3")), (seqs[4], b("r4"))]
    );
    assert_eq!(replay_all(log, "t.log.q", 0), vec![(other.seq, b("other"))]);
    // Everything but the last: the fence still holds.
    log.purge("t.log.p", last).expect("purge to the last");
    let kept = log.last_record("t.log.p").expect("last record");
    assert_eq!(kept.map(|r| (r.seq, r.payload)), Some((last, b("r4"))));
    assert_eq!(log.last("t.log.p").expect("last"), last);
    log.append("t.log.p", "p5", b("r5"), Some(last))
        .expect("append after the purge");
}

fn log_tells_whether_its_last_record_has_an_id(be: Backend) {
    let log = &*be.log;
    assert_eq!(log.last_if_id("t.log.i", "i1").expect("empty"), None);
    let first = log.append("t.log.i", "i1", b("1"), Some(0)).expect("i1");
    assert_eq!(
        log.last_if_id("t.log.i", "i1").expect("i1"),
        Some(first.seq)
    );
    assert_eq!(log.last_if_id("t.log.i", "i2").expect("unknown id"), None);
    let second = log
        .append("t.log.i", "i2", b("2"), Some(first.seq))
        .expect("i2");
    // No longer the last record: another one follows it.
    assert_eq!(log.last_if_id("t.log.i", "i1").expect("i1"), None);
    assert_eq!(
        log.last_if_id("t.log.i", "i2").expect("i2"),
        Some(second.seq)
    );
    // Another subject's last record is not this one's.
    assert_eq!(
        log.last_if_id("t.log.j", "i2").expect("other subject"),
        None
    );
}

/// A replay of large records (snapshot chunks, split batches) more than
/// a client may have in flight at once (NATS's default `max_pending` is
/// 64 MiB) arrives whole, slowly consumed.
fn log_replays_large_records_consumed_slowly(be: Backend) {
    let log = &*be.log;
    let record = Bytes::from(vec![7u8; 256 * 1024]);
    let mut last = 0;
    for i in 0..320 {
        last = log
            .append("t.log.big", &format!("big{i}"), record.clone(), None)
            .expect("append")
            .seq;
    }
    let mut n = 0;
    let seen = log
        .replay("t.log.big", 0, &mut |r| {
            assert_eq!(r.payload.len(), record.len());
            n += 1;
            if n % 64 == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
        .expect("replay");
    assert_eq!((n, seen), (320, last));
}

fn log_replays_many_records(be: Backend) {
    let log = &*be.log;
    let mut last = 0;
    for i in 0..500 {
        last = log
            .append("t.log.m", &format!("m{i}"), b(&i.to_string()), Some(last))
            .expect("append")
            .seq;
    }
    let all = replay_all(log, "t.log.m", 0);
    assert_eq!(all.len(), 500);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(all[499].1, b("499"));
    // An error from the callback stops the replay.
    let mut n = 0;
    let stopped = log.replay("t.log.m", 0, &mut |_| {
        n += 1;
        if n == 10 {
            Err(BusError::Invalid("stop".into()))
        } else {
            Ok(())
        }
    });
    assert!(stopped.is_err());
    assert_eq!(n, 10);
}

fn kv_compare_and_set(be: Backend) {
    let kv = &*be.kv;
    assert_eq!(kv.get("k1").expect("get"), None);
    let r1 = kv.create("k1", b("v1")).expect("create");
    assert!(matches!(kv.create("k1", b("v2")), Err(BusError::Exists)));
    let got = kv.get("k1").expect("get").expect("value");
    assert_eq!((got.value, got.revision), (b("v1"), r1));
    let r2 = kv.update("k1", b("v2"), r1).expect("update");
    assert!(r2 > r1);
    assert!(matches!(
        kv.update("k1", b("v3"), r1),
        Err(BusError::Conflict(_))
    ));
    assert!(matches!(
        kv.delete("k1", Some(r1)),
        Err(BusError::Conflict(_))
    ));
    kv.delete("k1", Some(r2)).expect("delete");
    assert_eq!(kv.get("k1").expect("get"), None);
    // A deleted key can be created again.
    kv.create("k1", b("again")).expect("create after delete");
    kv.put("k1", b("put")).expect("put");
    kv.put("k2.x", b("x")).expect("put");
    kv.put("k3", b("y")).expect("put");
    kv.delete("k3", None).expect("delete");
    assert_eq!(kv.keys("k").expect("keys"), vec!["k1", "k2.x"]);
    assert_eq!(kv.keys("k2.").expect("keys"), vec!["k2.x"]);
    assert!(kv.keys("zz").expect("keys").is_empty());
    assert_eq!(kv.get("k1").expect("get").expect("value").value, b("put"));
    assert!(matches!(kv.get("bad key"), Err(BusError::Invalid(_))));
}

fn kv_entries_expire_after_their_last_write(be: Backend) {
    let kv = &*be.kv;
    let r = kv.create("ttl.a", b("a")).expect("create");
    kv.create("ttl.b", b("b")).expect("create");
    // Keep `a` alive past `b`'s expiry by rewriting it.
    let mut revision = r;
    let started = Instant::now();
    while started.elapsed() < TTL + Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(400));
        revision = kv.update("ttl.a", b("a"), revision).expect("renew");
    }
    assert!(
        kv.get("ttl.a").expect("get").is_some(),
        "renewed entry lives"
    );
    wait_for(|| kv.get("ttl.b").expect("get").is_none(), "b expires");
    // Once expired, the key can be created by someone else.
    kv.create("ttl.b", b("new owner"))
        .expect("create after expiry");
}

fn leases_pass_on_when_the_owner_stops(be: Backend) {
    let kv = be.kv.clone();
    let mut first = Lease::try_acquire(&kv, "lease.p0", b"router-a")
        .expect("acquire")
        .expect("free");
    assert!(Lease::try_acquire(&kv, "lease.p0", b"router-b")
        .expect("acquire")
        .is_none());
    first.renew().expect("renew");
    assert!(first.valid_for().expect("ttl") > Duration::ZERO);
    assert_eq!(
        Lease::holder(&kv, "lease.p0").expect("holder"),
        Some(b("router-a"))
    );
    // The owner stops renewing: another takes over once the TTL runs out.
    let started = Instant::now();
    let second = loop {
        if let Some(l) = Lease::try_acquire(&kv, "lease.p0", b"router-b").expect("acquire") {
            break l;
        }
        assert!(started.elapsed() < TTL * 5, "lease never expired");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(started.elapsed() >= TTL - Duration::from_millis(500));
    // The old owner learns it lost the lease on its next renewal.
    assert!(matches!(first.renew(), Err(BusError::Conflict(_))));
    second.release().expect("release");
    assert!(Lease::try_acquire(&kv, "lease.p0", b"router-c")
        .expect("acquire")
        .is_some());
}

fn pubsub_reaches_matching_subscribers(be: Backend) {
    let ps = &*be.pubsub;
    let all = ps.subscribe("t.ev.>").expect("subscribe");
    let one = ps.subscribe("t.ev.*.typing").expect("subscribe");
    ps.publish("t.ev.c1.typing", b("t")).expect("publish");
    ps.publish("t.ev.c1.presence", b("p")).expect("publish");
    let got = all.recv_timeout(Duration::from_secs(5)).expect("first");
    assert_eq!(
        (got.subject.as_str(), got.payload),
        ("t.ev.c1.typing", b("t"))
    );
    let got = all.recv_timeout(Duration::from_secs(5)).expect("second");
    assert_eq!(got.subject, "t.ev.c1.presence");
    let got = one.recv_timeout(Duration::from_secs(5)).expect("typing");
    assert_eq!(got.subject, "t.ev.c1.typing");
    assert!(one.recv_timeout(Duration::from_millis(300)).is_none());
    drop(one);
    ps.publish("t.ev.c2.typing", b("t"))
        .expect("publish after unsubscribe");
    assert!(all.recv_timeout(Duration::from_secs(5)).is_some());
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod embedded { $( #[test] fn $name() { super::$name(super::local()) } )* }
        mod jetstream { $( #[test] fn $name() { super::$name(super::nats()) } )* }
    };
}

both!(
    log_appends_in_order_and_replays,
    log_purges_a_subject_below_a_sequence,
    log_dedupes_a_retried_append,
    log_fences_a_stale_writer,
    log_tells_whether_its_last_record_has_an_id,
    log_replays_many_records,
    log_replays_large_records_consumed_slowly,
    kv_compare_and_set,
    kv_entries_expire_after_their_last_write,
    leases_pass_on_when_the_owner_stops,
    pubsub_reaches_matching_subscribers,
);

/// One value of a scrape, 0 when absent.
fn scraped(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The NATS link's metrics count each call by kind (a fenced append the
/// stream refuses is an answer, not a failure), probe the round trip, and
/// carry the client's counters; a call to a server that is gone counts as
/// a failure and the probe stops answering.
#[test]
fn nats_link_metrics_count_calls_failures_and_round_trips() {
    use courier_bus::metrics::LinkMetrics;
    use prometheus_client::registry::Registry;

    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(dir.path()).expect("nats-server");
    let mut registry = Registry::default();
    let metrics = LinkMetrics::register(&mut registry);
    let scrape = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    };
    let nats = Nats::connect(&NatsConfig {
        servers: vec![server.url()],
        request_timeout: Duration::from_secs(1),
        metrics: Some(metrics),
        ..Default::default()
    })
    .expect("connect");
    let log = nats
        .log("TEST", &["t.log.>"], 1, Duration::from_secs(120))
        .expect("stream");
    let first = log
        .append("t.log.a", "a1", b("one"), Some(0))
        .expect("append");
    log.append("t.log.a", "a2", b("two"), Some(first.seq))
        .expect("append");
    let refused = log.append("t.log.a", "a3", b("three"), Some(first.seq));
    assert!(matches!(refused, Err(BusError::Conflict(_))), "{refused:?}");
    nats.pubsub().publish("t.note", b("hi")).expect("publish");

    wait_for(
        || scraped(&scrape(&registry), "courier_nats_rtt_seconds_count") >= 1.0,
        "a round trip probed",
    );
    let text = scrape(&registry);
    assert_eq!(
        scraped(&text, "courier_nats_call_seconds_count{op=\"append\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        scraped(&text, "courier_nats_call_failures_total{op=\"append\"}"),
        0.0,
        "{text}"
    );
    assert_eq!(
        scraped(&text, "courier_nats_call_seconds_count{op=\"publish\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(scraped(&text, "courier_nats_connected"), 1.0, "{text}");
    assert_eq!(scraped(&text, "courier_nats_connects_total"), 1.0, "{text}");
    assert!(
        scraped(&text, "courier_nats_sent_messages_total") >= 4.0,
        "{text}"
    );
    assert!(
        scraped(&text, "courier_nats_sent_bytes_total") >= 14.0,
        "{text}"
    );
    // The probe is one trip through a server on loopback.
    assert!(
        scraped(&text, "courier_nats_rtt_seconds_sum") < 1.0,
        "{text}"
    );

    drop(server);
    let lost = log.append("t.log.a", "a4", b("four"), None);
    assert!(matches!(lost, Err(BusError::Unavailable(_))), "{lost:?}");
    wait_for(
        || {
            let text = scrape(&registry);
            scraped(&text, "courier_nats_connected") == 0.0
                && scraped(&text, "courier_nats_rtt_probe_failures_total") >= 1.0
        },
        "the lost server seen by the gauge and the probe",
    );
    let text = scrape(&registry);
    assert_eq!(
        scraped(&text, "courier_nats_call_failures_total{op=\"append\"}"),
        1.0,
        "{text}"
    );
}
