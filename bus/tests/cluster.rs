//! The JetStream log at R3 on a real 3-server cluster: killing one server
//! with SIGKILL in the middle of fenced appends loses no acknowledged
//! record, and a retry of an append whose answer was lost is deduplicated.
//! And a client whose server restarts counts the gap of its link.

use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::testing::NatsCluster;
use courier_bus::{BusError, Log};

#[test]
fn r3_log_keeps_every_acknowledged_append_when_a_server_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = NatsCluster::start(dir.path(), 3).expect("cluster");
    let config = NatsConfig {
        servers: cluster.urls(),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let nats = Nats::connect(&config).expect("connect");
    // The cluster elects its meta leader after it starts: retry until the
    // stream can be created.
    let started = Instant::now();
    let log = loop {
        match nats.log("R3", &["r3.>"], 3, Duration::from_secs(120)) {
            Ok(log) => break log,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no R3 stream: {e}"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    };

    let mut last = 0;
    let mut acked = Vec::new();
    let mut retried = 0;
    let mut fenced_retries = 0;
    let mut longest_gap = Duration::ZERO;
    for i in 0..300u32 {
        if i == 150 {
            // Kill the server leading the stream's replicas.
            let leader = log.leader().expect("stream leader");
            let index: usize = leader
                .strip_prefix("nats-")
                .and_then(|n| n.parse().ok())
                .expect("server name");
            eprintln!("killing the stream leader {leader}");
            cluster.kill(index);
        }
        let id = format!("w.{i}");
        let payload = Bytes::from(i.to_string());
        let began = Instant::now();
        let mut attempts = 0;
        let appended = loop {
            attempts += 1;
            match log.append("r3.p", &id, payload.clone(), Some(last)) {
                Ok(a) => break a,
                // Unknown outcome: retry the same id with the same fence.
                // A first attempt that landed comes back as a duplicate.
                Err(BusError::Unavailable(_)) => {
                    retried += 1;
                    assert!(
                        began.elapsed() < Duration::from_secs(60),
                        "append {i} never succeeded"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                // After a leader change the retry of an attempt that
                // landed can meet the fence before the dedupe: the last
                // record is then this append's own.
                Err(BusError::Conflict(why)) if attempts > 1 => {
                    match log.last_if_id("r3.p", &id).expect("the last record") {
                        Some(seq) => {
                            fenced_retries += 1;
                            break courier_bus::Appended {
                                seq,
                                duplicate: true,
                            };
                        }
                        None => panic!("append {i} fenced out by another writer: {why}"),
                    }
                }
                Err(e) => panic!("append {i}: {e}"),
            }
        };
        longest_gap = longest_gap.max(began.elapsed());
        last = appended.seq;
        acked.push((appended.seq, payload));
    }
    eprintln!(
        "retried appends: {retried} ({fenced_retries} refused at the fence after landing); longest wait for one append: {longest_gap:?}"
    );

    // A replay right after the leader moved may find the new leader not
    // yet answering consumer requests: retried like any Unavailable.
    let mut replayed = Vec::new();
    let mut attempts = 0;
    loop {
        replayed.clear();
        match log.replay("r3.p", 0, &mut |r| {
            replayed.push((r.seq, r.payload));
            Ok(())
        }) {
            Ok(_) => break,
            Err(e) => {
                attempts += 1;
                eprintln!("replay attempt {attempts}: {e}");
                assert!(attempts < 20, "replay with a server down: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    assert_eq!(replayed, acked, "every acknowledged append, once, in order");
}

/// A client whose server goes away and comes back counts one gap of its
/// link (what was published to it meanwhile is gone), and its
/// subscriptions work again after it reconnects.
#[test]
fn a_reconnect_is_counted_as_a_gap_of_the_link() {
    use courier_bus::testing::NatsServer;
    use courier_bus::PubSub;

    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path()).unwrap();
    let nats = Nats::connect(&NatsConfig {
        servers: vec![server.url()],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(nats.gaps(), 0, "the first connection is no gap");
    let bus = nats.pubsub();
    let sub = bus.subscribe("gap.test").unwrap();
    server.kill();
    let _again = NatsServer::start_on(dir.path(), server.port()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while nats.gaps() == 0 {
        assert!(Instant::now() < deadline, "the reconnect was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(nats.gaps(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        bus.publish("gap.test", bytes::Bytes::from_static(b"after"))
            .unwrap();
        if sub.recv_timeout(Duration::from_millis(200)).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no delivery after the reconnect");
    }
}
