//! What one partition's router pays for the fleet's connects.
//!
//! In fleet mode a gateway sends every attach, and every catch-up, to
//! every partition, so each partition's router sees all the fleet's
//! connects, of which only 1/P are its own users'. This drives one
//! partition's [`RouterCore`] (partition 0 of `PARTITIONS`) with `USERS`
//! connects, each an `Attach` and an empty `Sync` as a gateway sends
//! them, in batches of 500, and reports per connect: the router thread's
//! time, the bytes its batches add to the changelog, and the growth of the
//! process's resident memory (the store's memtables included).
//!
//! Nobody has conversations, so this is the cost of the connect alone,
//! which is what a router pays for each of the other partitions' users.
//!
//! ```sh
//! cargo run --release -p courier-benches --example attach_cost -- [USERS] [PARTITIONS]
//! ```
//!
//! Run it with `MIMALLOC_PURGE_DELAY=0`, as the gateway configures its
//! allocator.

use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_bus::local::LocalLog;
use courier_protocol::frame::ClientFrame;
use courier_router::api::{Command, Device, SessionKey};
use courier_router::fleet::{partition_of, Changelog};
use courier_router::{RouterConfig, RouterCore};
use prometheus_client::registry::Registry;

// The gateway binary's allocator, so memory is what it is there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 500;

fn main() {
    let mut args = std::env::args().skip(1);
    let users: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let partitions: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LocalLog::open(&dir.path().join("log"), Duration::from_secs(120)).expect("log");
    let config = RouterConfig {
        data_dir: dir.path().join("store"),
        partition: Some((0, partitions)),
        changelog: Some(Changelog {
            log: Arc::new(log),
            subject: "bench.changelog.0".into(),
            writer: "bench".into(),
            last: 0,
            snapshot: None,
            snapshot_min_bytes: u64::MAX,
        }),
        ..RouterConfig::default()
    };
    let mut core = RouterCore::open(config, &mut Registry::default()).expect("open");
    let devices: Vec<Device> = (0..users)
        .map(|i| Device {
            user: Arc::from(format!("user{i:07}")),
            device: 1,
        })
        .collect();
    let own = devices
        .iter()
        .filter(|d| partition_of(&d.user, partitions) == 0)
        .count();

    let rss_before = rss_bytes();
    let mut busy = Duration::ZERO;
    let mut changelog_bytes = 0usize;
    let mut now_ms = 1_700_000_000_000u64;
    for (b, chunk) in devices.chunks(BATCH).enumerate() {
        let mut commands = Vec::with_capacity(2 * chunk.len());
        for (i, device) in chunk.iter().enumerate() {
            let session = SessionKey {
                node: 1,
                core: (i % 2) as u16,
                slot: (b * BATCH + i) as u32,
                generation: 1,
            };
            commands.push(Command::Attach {
                session,
                device: device.clone(),
                issued_at_s: now_ms / 1000,
            });
            commands.push(Command::Frame {
                session,
                device: device.clone(),
                frame: ClientFrame::Sync {
                    tail: 0,
                    summary: false,
                    cursors: Vec::new(),
                },
                received_at: Instant::now(),
            });
        }
        let started = Instant::now();
        let mut written = core.prepare(commands, now_ms);
        changelog_bytes += written.take_encoded().map_or(0, |e| e.len());
        drop(core.finish(written, Ok(Duration::ZERO)));
        busy += started.elapsed();
        now_ms += 10;
    }
    let rss_after = rss_bytes();
    let n = users as f64;
    println!(
        "{users} connects at partition 0 of {partitions} ({own} of its own users): \
         router {:.2} us per connect, changelog {:.1} B per connect ({:.1} MiB), \
         RSS +{:.0} B per connect ({:.1} MiB)",
        busy.as_secs_f64() * 1e6 / n,
        changelog_bytes as f64 / n,
        changelog_bytes as f64 / (1 << 20) as f64,
        rss_after.saturating_sub(rss_before) as f64 / n,
        rss_after.saturating_sub(rss_before) as f64 / (1 << 20) as f64,
    );
    drop(core.close());
}

/// The process's resident set, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
