//! The router's CPU per message, without sockets, threads or fsyncs.
//!
//! Drives [`RouterCore`] the way the single-node scenario does
//! (`benches/scripts/single_node.sh`): 10,000 users with one device each,
//! live; 10,000 direct conversations and 500 groups (sizes 3 to 62, mean
//! 20); one send in five to a group; every recipient acks each message
//! with `Delivered` in the next batch, as loadgen does. Each batch carries
//! `SENDS` new sends plus the acks for the previous batch's messages
//! (about 28 commands at 5 sends, as the router sees at 5,000 msg/s).
//!
//! Batches go through `prepare` and `finish` with no sync in between, so
//! the figure is the router thread's own work: decide, the memtable
//! inserts of the commit, answers and fan-out. The clock steps 1 ms per
//! batch, so cursors are written behind and the dedupe window is real.
//!
//! ```sh
//! cargo run --release -p courier-benches --example router_batch -- [SENDS_TOTAL] [ROUNDS]
//! ```
//!
//! (Run it with `MIMALLOC_PURGE_DELAY=0`, as the gateway configures its
//! allocator.) Prints the time per send and per command of each round; compare the
//! best round of two builds run back to back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_protocol::ids;
use courier_router::api::{Command, Delivery, Device, SessionKey};
use courier_router::{RouterConfig, RouterCore};
use prometheus_client::registry::Registry;

// The gateway binary's allocator, so allocation costs what it costs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USERS: usize = 10_000;
const GROUPS: usize = 500;
const GROUP_SIZES: [usize; 10] = [3, 5, 8, 10, 12, 15, 20, 25, 40, 62];
const SENDS: usize = 5;

/// A small deterministic generator (xorshift64), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

struct Driver {
    core: RouterCore,
    now_ms: u64,
    users: Vec<Device>,
    /// Sessions by user index; a session's slot is its user index.
    sessions: Vec<SessionKey>,
    /// Timed work only: prepare + finish.
    busy: Duration,
    commands: usize,
}

impl Driver {
    /// Runs one batch and returns the frames it delivered, by user index.
    fn step(&mut self, commands: Vec<Command>) -> Vec<(usize, ServerFrame)> {
        self.commands += commands.len();
        let started = Instant::now();
        let written = self.core.prepare(commands, self.now_ms);
        let out = self.core.finish(written, Ok(Duration::ZERO));
        self.busy += started.elapsed();
        self.now_ms += 1;
        let mut frames = Vec::new();
        for (_, deliveries) in out {
            for d in deliveries {
                if let Delivery::Frame { session, frame, .. } = d {
                    if let Some(f) = decode(&frame) {
                        frames.push((session.slot as usize, f));
                    }
                }
            }
        }
        frames
    }

    fn frame(&self, user: usize, frame: ClientFrame) -> Command {
        Command::Frame {
            session: self.sessions[user],
            device: self.users[user].clone(),
            frame,
            received_at: Instant::now(),
        }
    }
}

/// The server frame inside one unmasked WebSocket frame.
fn decode(ws: &Bytes) -> Option<ServerFrame> {
    let len = usize::from(*ws.get(1)? & 0x7f);
    let header = match len {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    ServerFrame::decode(&ws.slice(header..)).ok()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    for round in 1..=rounds {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = run(dir.path(), total);
        println!(
            "round {round}: {total} sends in {} batches: router {:.2} us per send, {:.2} us \
             per command; thread CPU {:.2} us per send",
            f.batches, f.per_send, f.per_command, f.cpu_per_send
        );
    }
}

fn run(dir: &std::path::Path, total: usize) -> Figures {
    let config = RouterConfig {
        data_dir: dir.join("store"),
        send_rate_per_s: 1e9,
        send_burst: 1e9,
        ..RouterConfig::default()
    };
    let core = RouterCore::open(config, &mut Registry::default()).expect("open");
    let users: Vec<Device> = (0..USERS)
        .map(|i| Device {
            user: Arc::from(format!("u{i:05}")),
            device: 1,
        })
        .collect();
    let sessions = (0..USERS)
        .map(|i| SessionKey {
            node: 0,
            core: (i % 2) as u16,
            slot: i as u32,
            generation: 1,
        })
        .collect();
    let mut d = Driver {
        core,
        now_ms: 1_700_000_000_000,
        users,
        sessions,
        busy: Duration::ZERO,
        commands: 0,
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // Everyone attaches and catches up (nothing to catch up), so is live.
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(500) {
        let mut commands = Vec::new();
        for &i in chunk {
            commands.push(Command::Attach {
                session: d.sessions[i],
                device: d.users[i].clone(),
                issued_at_s: 0,
            });
            commands.push(d.frame(
                i,
                ClientFrame::Sync {
                    tail: 0,
                    summary: false,
                    cursors: Vec::new(),
                },
            ));
        }
        d.step(commands);
    }
    let directs: Vec<(usize, String)> = (0..USERS)
        .map(|i| {
            let peer = (i + 1 + rng.below(USERS - 1)) % USERS;
            let id = ids::direct_conversation(&d.users[i].user, &d.users[peer].user);
            (i, id)
        })
        .collect();
    let mut groups: Vec<(Vec<usize>, String)> = Vec::new();
    for g in 0..GROUPS {
        let size = GROUP_SIZES[g % GROUP_SIZES.len()];
        let mut members = vec![rng.below(USERS)];
        while members.len() < size {
            let m = rng.below(USERS);
            if !members.contains(&m) {
                members.push(m);
            }
        }
        let names = members[1..]
            .iter()
            .map(|&m| d.users[m].user.to_string())
            .collect();
        let create = d.frame(
            members[0],
            ClientFrame::GroupCreate {
                request: g as u32,
                members: names,
            },
        );
        for (_, f) in d.step(vec![create]) {
            if let ServerFrame::GroupCreated { conversation, .. } = f {
                groups.push((members.clone(), conversation));
            }
        }
    }
    assert_eq!(groups.len(), GROUPS, "every group was created");

    // The measured part.
    let cpu_before = thread_cpu_ns();
    d.busy = Duration::ZERO;
    d.commands = 0;
    let body = Bytes::from(vec![0x5a; 200]);
    let mut acks: Vec<Command> = Vec::new();
    let mut sent = 0;
    let mut batches = 0;
    let mut client_id = 0u64;
    while sent < total {
        let mut commands = std::mem::take(&mut acks);
        for _ in 0..SENDS {
            client_id += 1;
            let (sender, conversation) = if rng.below(5) == 0 {
                let (members, id) = &groups[rng.below(GROUPS)];
                (members[rng.below(members.len())], id.clone())
            } else {
                let (sender, id) = &directs[rng.below(USERS)];
                (*sender, id.clone())
            };
            commands.push(d.frame(
                sender,
                ClientFrame::Send {
                    conversation,
                    client_id,
                    body: body.clone(),
                },
            ));
        }
        sent += SENDS;
        batches += 1;
        for (user, frame) in d.step(commands) {
            if let ServerFrame::Message {
                conversation, seq, ..
            } = frame
            {
                acks.push(d.frame(user, ClientFrame::Delivered { conversation, seq }));
            }
        }
    }
    let busy_us = d.busy.as_secs_f64() * 1e6;
    // Closing writes what is still written behind (cursors): part of the
    // cost, so inside the CPU figure.
    d.core.close();
    let cpu_us = thread_cpu_ns().saturating_sub(cpu_before) as f64 / 1e3;
    Figures {
        per_send: busy_us / sent as f64,
        per_command: busy_us / d.commands as f64,
        cpu_per_send: cpu_us / sent as f64,
        batches,
    }
}

/// What one round measured.
struct Figures {
    /// Wall time in `prepare` + `finish`, per send and per command.
    per_send: f64,
    per_command: f64,
    /// This thread's CPU time over the whole measured loop and the close
    /// that writes what is still behind (the driver's own work included),
    /// per send: unlike wall time, not inflated when other processes take
    /// the core.
    cpu_per_send: f64,
    batches: usize,
}

/// This thread's time on a CPU so far, in nanoseconds (Linux
/// `/proc/thread-self/schedstat`; 0 where it cannot be read).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
