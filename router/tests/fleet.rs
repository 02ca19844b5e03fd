//! Fleet mode's durability through the real router thread, against both
//! changelog backends: the embedded log and NATS JetStream (a real
//! nats-server). A partition's second owner rebuilds the store from the
//! changelog and resumes exactly: sequences go on, a retried send is
//! answered with its original `Sent`, and the first owner, still running
//! as if it owned the partition, is fenced out on its next write.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{collect, device, frame, outlet, session, sync_done, ChannelOutlet};
use courier_bus::local::LocalLog;
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::testing::NatsServer;
use courier_bus::Log;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_router::api::{Command, Delivery, SessionKey};
use courier_router::fleet::{self, Changelog};
use courier_router::{Router, RouterConfig, RouterHandle};
use prometheus_client::registry::Registry;

const SUBJECT: &str = "t.log.p0";

type Rx = std::sync::mpsc::Receiver<(u16, Vec<Delivery>)>;

/// Replays the changelog into `dir` and starts an owner writing as `writer`.
fn start_owner(
    log: &Arc<dyn Log>,
    dir: &Path,
    writer: &str,
) -> (RouterHandle, Rx, Arc<ChannelOutlet>) {
    start_owner_lingering(log, dir, writer, Duration::ZERO)
}

/// [`start_owner`] whose router waits `linger` to fill each batch.
fn start_owner_lingering(
    log: &Arc<dyn Log>,
    dir: &Path,
    writer: &str,
    linger: Duration,
) -> (RouterHandle, Rx, Arc<ChannelOutlet>) {
    start_owner_with(log, dir, writer, linger, u64::MAX).0
}

/// Restores the partition into `dir` as a new owner does (snapshot, then
/// the changelog after it) and starts an owner that snapshots every
/// `snapshot_min_bytes` of log; also returns what the restore found.
fn start_owner_with(
    log: &Arc<dyn Log>,
    dir: &Path,
    writer: &str,
    linger: Duration,
    snapshot_min_bytes: u64,
) -> ((RouterHandle, Rx, Arc<ChannelOutlet>), fleet::Restored) {
    let restored = fleet::restore(dir, Default::default(), &**log, SUBJECT).unwrap();
    let config = RouterConfig {
        data_dir: dir.to_owned(),
        changelog: Some(Changelog {
            log: log.clone(),
            subject: SUBJECT.into(),
            writer: writer.into(),
            last: restored.last,
            snapshot: restored.snapshot,
            snapshot_min_bytes,
        }),
        batch_linger: linger,
        // Bursts of sends from one user in these tests.
        send_burst: 1_000.0,
        ..RouterConfig::default()
    };
    let (out, rx) = outlet();
    let router = Router::start(config, out.clone(), &mut Registry::default()).unwrap();
    ((router, rx, out), restored)
}

fn attach_and_sync(router: &RouterHandle, rx: &Rx, s: SessionKey, user: &str) -> Vec<ServerFrame> {
    router
        .submit(Command::Attach {
            session: s,
            device: device(user),
            issued_at_s: 0,
        })
        .unwrap();
    let sync = ClientFrame::Sync {
        tail: 0,
        summary: false,
        cursors: vec![],
    };
    router.submit(frame(s, user, sync)).unwrap();
    collect(rx, |f| sync_done(f, s))
        .into_iter()
        .filter(|(k, _)| *k == s)
        .map(|(_, f)| f)
        .collect()
}

fn send(conversation: &str, client_id: u64) -> ClientFrame {
    ClientFrame::Send {
        conversation: conversation.into(),
        client_id,
        body: Bytes::from(format!("message {client_id}")),
    }
}

/// Sends and waits for the answer to `client_id` on `s`.
fn send_and_answer(router: &RouterHandle, rx: &Rx, s: SessionKey, client_id: u64) -> ServerFrame {
    router
        .submit(frame(s, "alice", send("d:alice:bob", client_id)))
        .unwrap();
    let answered = |f: &(SessionKey, ServerFrame)| {
        f.0 == s
            && matches!(&f.1, ServerFrame::Sent { client_id: c, .. }
                | ServerFrame::Error { reference: c, .. } if *c == client_id)
    };
    collect(rx, |got| got.iter().any(answered))
        .into_iter()
        .find(answered)
        .unwrap()
        .1
}

fn takeover_resumes_exactly_and_fences_the_old_owner(log: Arc<dyn Log>) {
    let dirs = tempfile::tempdir().unwrap();
    let (alice, bob) = (session(0, 1), session(1, 1));

    // The first owner takes three messages.
    let (a, a_rx, _a_out) = start_owner(&log, &dirs.path().join("a"), "router-a.1");
    attach_and_sync(&a, &a_rx, alice, "alice");
    let mut sent = Vec::new();
    for id in 1..=3 {
        let answer = send_and_answer(&a, &a_rx, alice, id);
        assert!(
            matches!(answer, ServerFrame::Sent { seq, .. } if seq == id),
            "{answer:?}"
        );
        sent.push(answer);
    }
    assert!(log.last(SUBJECT).unwrap() > 0);

    // A second owner rebuilds the partition from the log alone, in a
    // fresh directory, while the first is still running.
    let (b, b_rx, _b_out) = start_owner(&log, &dirs.path().join("b"), "router-b.2");
    let caught_up = attach_and_sync(&b, &b_rx, bob, "bob");
    let seqs: Vec<u64> = caught_up
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message { seq, body, .. } => {
                assert_eq!(*body, Bytes::from(format!("message {seq}")));
                Some(*seq)
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3],
        "catch-up on the new owner: {caught_up:?}"
    );
    attach_and_sync(&b, &b_rx, alice, "alice");
    // A retry of an acknowledged send gets its original answer...
    assert_eq!(send_and_answer(&b, &b_rx, alice, 3), sent[2]);
    // ...and the sequence goes on where the first owner stopped.
    let fourth = send_and_answer(&b, &b_rx, alice, 4);
    assert!(
        matches!(fourth, ServerFrame::Sent { seq: 4, .. }),
        "{fourth:?}"
    );

    // The first owner, unaware, takes another send: the log refuses its
    // append, the client gets 503 (never `Sent`), and it stops serving.
    let stale = send_and_answer(&a, &a_rx, alice, 5);
    assert!(
        matches!(stale, ServerFrame::Error { code: 503, .. }),
        "{stale:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.is_stopped() {
        assert!(Instant::now() < deadline, "fenced owner kept running");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The retry reaches the real owner and is sequenced after 4.
    let fifth = send_and_answer(&b, &b_rx, alice, 5);
    assert!(
        matches!(fifth, ServerFrame::Sent { seq: 5, .. }),
        "{fifth:?}"
    );
    b.shutdown();

    // A third owner sees exactly 1..=5, once each.
    let (c, c_rx, _c_out) = start_owner(&log, &dirs.path().join("c"), "router-c.3");
    let all = attach_and_sync(&c, &c_rx, session(1, 2), "bob");
    let seqs: Vec<u64> = all
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    c.shutdown();
}

/// A batch whose writes are larger than one changelog record (here 24
/// sends of 60 KB in one batch, 1.4 MB, over NATS's 1 MiB payload limit)
/// goes as several records and comes back whole on the next owner.
/// Catch-up of such bodies pages over several `Sync`s, so the check is on
/// the sends' answers.
fn a_batch_larger_than_a_record_is_replayed_whole(log: Arc<dyn Log>) {
    let dirs = tempfile::tempdir().unwrap();
    let alice = session(0, 1);
    let (a, a_rx, _a_out) = start_owner_lingering(
        &log,
        &dirs.path().join("a"),
        "router-a.1",
        Duration::from_millis(200),
    );
    attach_and_sync(&a, &a_rx, alice, "alice");
    let body = |id: u64| Bytes::from(vec![b'a' + id as u8; 60_000]);
    for id in 1..=24 {
        let send = ClientFrame::Send {
            conversation: "d:alice:bob".into(),
            client_id: id,
            body: body(id),
        };
        a.submit(frame(alice, "alice", send)).unwrap();
    }
    let sent = |got: &[(SessionKey, ServerFrame)]| {
        got.iter()
            .filter(|(s, f)| *s == alice && matches!(f, ServerFrame::Sent { .. }))
            .count()
    };
    let answers = collect(&a_rx, |got| sent(got) == 24);
    assert_eq!(sent(&answers), 24, "{answers:?}");
    assert!(
        log.last(SUBJECT).unwrap() >= 3,
        "the big batch went as pieces"
    );
    a.shutdown();

    // The next owner has the whole batch: each send's dedupe record (a
    // retry gets its original `Sent`) and the sequence after it.
    let (b, b_rx, _b_out) = start_owner(&log, &dirs.path().join("b"), "router-b.2");
    b.submit(Command::Attach {
        session: alice,
        device: device("alice"),
        issued_at_s: 0,
    })
    .unwrap();
    let original = |id: u64| {
        answers
            .iter()
            .find(|(s, f)| {
                *s == alice && matches!(f, ServerFrame::Sent { client_id, .. } if *client_id == id)
            })
            .map(|(_, f)| f.clone())
            .unwrap()
    };
    for id in [1, 12, 24] {
        assert_eq!(send_and_answer(&b, &b_rx, alice, id), original(id));
    }
    let next = send_and_answer(&b, &b_rx, alice, 25);
    assert!(
        matches!(next, ServerFrame::Sent { seq: 25, .. }),
        "{next:?}"
    );
    b.shutdown();
}

/// The changelog's records, in order.
fn changelog_seqs(log: &dyn Log) -> Vec<u64> {
    let mut seqs = Vec::new();
    log.replay(SUBJECT, 0, &mut |r| {
        seqs.push(r.seq);
        Ok(())
    })
    .unwrap();
    seqs
}

/// With snapshots every few KiB of log, an owner's store goes into the
/// log as snapshots and the log is purged behind them; the next owner
/// loads the latest snapshot, replays only the records after it, and
/// resumes exactly (catch-up, a retried send's original answer, the next
/// sequence), also when a snapshot was left half written at the tail.
fn snapshots_bound_what_a_takeover_replays(log: Arc<dyn Log>) {
    let dirs = tempfile::tempdir().unwrap();
    let alice = session(0, 1);
    let ((a, a_rx, _a_out), first) = start_owner_with(
        &log,
        &dirs.path().join("a"),
        "router-a.1",
        Duration::ZERO,
        4096,
    );
    assert!(first.snapshot.is_none());
    attach_and_sync(&a, &a_rx, alice, "alice");
    let mut answers = Vec::new();
    for id in 1..=60 {
        let answer = send_and_answer(&a, &a_rx, alice, id);
        assert!(
            matches!(answer, ServerFrame::Sent { seq, .. } if seq == id),
            "{answer:?}"
        );
        answers.push(answer);
    }
    // Then 140 more at once, so batches are decided while others are
    // being appended, and snapshots are taken between them.
    for id in 61..=200 {
        a.submit(frame(alice, "alice", send("d:alice:bob", id)))
            .unwrap();
    }
    let acked = |got: &[(SessionKey, ServerFrame)]| {
        got.iter()
            .filter(|(s, f)| *s == alice && matches!(f, ServerFrame::Sent { .. }))
            .count()
    };
    let burst = collect(&a_rx, |got| acked(got) == 140);
    assert_eq!(acked(&burst), 140);
    // Snapshots are written behind the router: wait until one exists
    // and the log before the one preceding it is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let taken = loop {
        let latest = courier_router::snapshot::latest(&*log, SUBJECT).unwrap();
        let seqs = changelog_seqs(&*log);
        if let Some(t) = latest.filter(|_| seqs.first().is_some_and(|s| *s > 1)) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot and purge: {latest:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(taken.records > 0 && taken.chunks > 0, "{taken:?}");
    a.shutdown();
    let left = changelog_seqs(&*log);
    let appended = log.last(SUBJECT).unwrap();

    // A snapshot whose writer stopped half way, at the subject's tail.
    let mut stray = vec![0xC1];
    stray.extend_from_slice(&(appended + 1000).to_be_bytes());
    stray.extend_from_slice(&0u32.to_be_bytes());
    stray.extend_from_slice(b"not a write set");
    log.append(
        &courier_router::snapshot::subject(SUBJECT),
        "stray.0",
        Bytes::from(stray),
        None,
    )
    .unwrap();

    let ((b, b_rx, _b_out), restored) = start_owner_with(
        &log,
        &dirs.path().join("b"),
        "router-b.2",
        Duration::ZERO,
        4096,
    );
    let loaded = restored.snapshot.expect("a snapshot was loaded");
    assert!(loaded.at >= taken.at);
    assert!(
        restored.replayed < left.len() as u64 && (left.len() as u64) < 200,
        "replayed {} of {} records left (200 sends)",
        restored.replayed,
        left.len()
    );
    assert_eq!(
        restored.last, appended,
        "the fence is the log's last record"
    );
    let caught_up = attach_and_sync(&b, &b_rx, session(1, 1), "bob");
    let seqs: Vec<u64> = caught_up
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    attach_and_sync(&b, &b_rx, alice, "alice");
    assert_eq!(send_and_answer(&b, &b_rx, alice, 1), answers[0]);
    assert_eq!(send_and_answer(&b, &b_rx, alice, 60), answers[59]);
    let again = send_and_answer(&b, &b_rx, alice, 200);
    assert!(
        matches!(again, ServerFrame::Sent { seq: 200, .. }),
        "{again:?}"
    );
    let next = send_and_answer(&b, &b_rx, alice, 201);
    assert!(
        matches!(next, ServerFrame::Sent { seq: 201, .. }),
        "{next:?}"
    );
    b.shutdown();
}

/// The embedded changelog under `dir`.
fn embedded_log(dir: &Path) -> Arc<dyn Log> {
    Arc::new(LocalLog::open(dir, Duration::from_secs(120)).unwrap())
}

/// A nats-server under `dir` and a JetStream changelog on it; the server
/// and the connection last as long as this value.
struct JetStream {
    _server: NatsServer,
    _nats: Arc<Nats>,
    log: Arc<dyn Log>,
}

fn jetstream_log(dir: &Path) -> JetStream {
    let server = NatsServer::start(dir).unwrap();
    let nats = Nats::connect(&NatsConfig {
        servers: vec![server.url()],
        ..Default::default()
    })
    .unwrap();
    let log = nats
        .log("COURIER_TEST", &["t.log.>"], 1, Duration::from_secs(120))
        .unwrap();
    JetStream {
        _server: server,
        _nats: nats,
        log: Arc::new(log),
    }
}

#[test]
fn embedded_log_replays_a_batch_larger_than_a_record_whole() {
    let dir = tempfile::tempdir().unwrap();
    a_batch_larger_than_a_record_is_replayed_whole(embedded_log(dir.path()));
}

#[test]
fn jetstream_replays_a_batch_larger_than_a_record_whole() {
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream_log(dir.path());
    a_batch_larger_than_a_record_is_replayed_whole(js.log.clone());
}

#[test]
fn embedded_log_takeover_resumes_exactly_and_fences_the_old_owner() {
    let dir = tempfile::tempdir().unwrap();
    takeover_resumes_exactly_and_fences_the_old_owner(embedded_log(dir.path()));
}

#[test]
fn jetstream_takeover_resumes_exactly_and_fences_the_old_owner() {
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream_log(dir.path());
    takeover_resumes_exactly_and_fences_the_old_owner(js.log.clone());
}

#[test]
fn embedded_log_snapshots_bound_what_a_takeover_replays() {
    let dir = tempfile::tempdir().unwrap();
    snapshots_bound_what_a_takeover_replays(embedded_log(dir.path()));
}

#[test]
fn jetstream_snapshots_bound_what_a_takeover_replays() {
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream_log(dir.path());
    snapshots_bound_what_a_takeover_replays(js.log.clone());
}
