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
//! Then a fifth of the users go offline for another fifth of the sends and
//! come back: each attaches and syncs, and the catch-up (range reads of the
//! entries stored meanwhile, over every table of the store) is timed too.
//!
//! ```sh
//! cargo run --release -p courier-benches --example router_batch -- [SENDS_TOTAL] [ROUNDS] [tiered|leveled] [RECENT_MIB] [restart]
//! ```
//!
//! The third argument is the store's compaction of the messages
//! (`--store-entries-compaction`), the fourth the MiB of recent entries the
//! router keeps for catch-up (`--recent-entries-mib`; 0 makes every
//! catch-up read the store); both as in the gateway by default. With
//! `restart` the router is closed and opened again on its store before the
//! absent users come back, as after a node restart: the recent entries
//! start empty, and only the returning users are attached.
//!
//! (Run it with `MIMALLOC_PURGE_DELAY=0`, as the gateway configures its
//! allocator.) Prints the time per send and per command of each round; compare the
//! best round of two builds run back to back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, Cursor, ServerFrame};
use courier_protocol::ids;
use courier_router::api::{Command, Delivery, Device, SessionKey};
use courier_router::{Compaction, RouterConfig, RouterCore, StoreLimits};
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
    /// `None` only while the router restarts.
    core: Option<RouterCore>,
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
        let core = self.core.as_mut().expect("the router is open");
        let written = core.prepare(commands, self.now_ms);
        let out = core.finish(written, Ok(Duration::ZERO));
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

    /// A user's session attaching, and its `Sync` listing `cursors` (none:
    /// resume from its delivery cursors).
    fn attach_and_sync(&self, user: usize, cursors: Vec<Cursor>) -> [Command; 2] {
        let attach = Command::Attach {
            session: self.sessions[user],
            device: self.users[user].clone(),
            issued_at_s: 0,
        };
        let sync = ClientFrame::Sync {
            tail: 0,
            summary: false,
            cursors,
        };
        [attach, self.frame(user, sync)]
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
    let compaction = match args.next().as_deref() {
        None | Some("tiered") => Compaction::Tiered,
        Some("leveled") => Compaction::Leveled,
        Some(other) => panic!("compaction {other}: tiered or leveled"),
    };
    let recent_bytes = match args.next() {
        None => RouterConfig::default().recent_entries_bytes,
        Some(mib) => mib.parse::<usize>().expect("RECENT_MIB: a number") << 20,
    };
    let restart = match args.next().as_deref() {
        None => false,
        Some("restart") => true,
        Some(other) => panic!("{other}: the fifth argument is `restart` or nothing"),
    };
    for round in 1..=rounds {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = run(dir.path(), total, compaction, recent_bytes, restart);
        println!(
            "round {round}: {total} sends in {} batches: router {:.2} us per send, {:.2} us \
             per command; thread CPU {:.2} us per send; store wrote {:.1} MB",
            f.batches,
            f.per_send,
            f.per_command,
            f.cpu_per_send,
            f.written as f64 / 1e6
        );
        let c = &f.catch_up;
        println!(
            "  catch-up: {} users back after {} sends, {} messages: {:.1} us per user, \
             {:.2} us per message; entry reads {} from memory, {} from the store",
            c.users,
            c.sends,
            c.messages,
            c.busy.as_secs_f64() * 1e6 / c.users as f64,
            c.busy.as_secs_f64() * 1e6 / c.messages.max(1) as f64,
            c.reads.0,
            c.reads.1
        );
    }
}

fn run(
    dir: &std::path::Path,
    total: usize,
    compaction: Compaction,
    recent: usize,
    restart: bool,
) -> Figures {
    let config = RouterConfig {
        data_dir: dir.join("store"),
        send_rate_per_s: 1e9,
        send_burst: 1e9,
        recent_entries_bytes: recent,
        store: StoreLimits {
            entries_compaction: compaction,
            ..StoreLimits::default()
        },
        ..RouterConfig::default()
    };
    let mut registry = Registry::default();
    let core = RouterCore::open(config.clone(), &mut registry).expect("open");
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
        core: Some(core),
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
            commands.extend(d.attach_and_sync(i, Vec::new()));
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
    let written_before = process_write_bytes();
    d.busy = Duration::ZERO;
    d.commands = 0;
    let mut traffic = Traffic {
        rng,
        directs,
        groups,
        body: Bytes::from(vec![0x5a; 200]),
        client_id: 0,
        online: vec![true; USERS],
        heads: std::collections::HashMap::new(),
    };
    let batches = traffic.drive(&mut d, total);
    let busy_us = d.busy.as_secs_f64() * 1e6;
    let per_command = busy_us / d.commands as f64;
    // The catch-up phase is timed on its own, and its CPU kept out of the
    // per-send figure, which stays comparable with earlier rounds.
    let cpu_away = thread_cpu_ns();
    let reopen = restart.then_some(&config);
    let catch_up = catch_up(&mut d, &mut traffic, total / 5, &mut registry, reopen);
    let cpu_away = thread_cpu_ns().saturating_sub(cpu_away);
    // Closing writes what is still written behind (cursors): part of the
    // cost, so inside the CPU figure.
    d.core.take().expect("the router is open").close();
    let cpu_us = thread_cpu_ns().saturating_sub(cpu_before + cpu_away) as f64 / 1e3;
    Figures {
        per_send: busy_us / total as f64,
        per_command,
        cpu_per_send: cpu_us / total as f64,
        batches,
        written: process_write_bytes().saturating_sub(written_before),
        catch_up,
    }
}

/// The scenario's traffic: who talks in which conversation.
struct Traffic {
    rng: Rng,
    directs: Vec<(usize, String)>,
    groups: Vec<(Vec<usize>, String)>,
    body: Bytes,
    client_id: u64,
    /// Users who ack what they receive (the others are offline).
    online: Vec<bool>,
    /// Each conversation's newest sequence, from the `Sent` answers.
    heads: std::collections::HashMap<String, u64>,
}

impl Traffic {
    /// Sends `total` messages, `SENDS` a batch, each batch carrying the
    /// online recipients' acks for the batch before; returns the batches.
    fn drive(&mut self, d: &mut Driver, total: usize) -> usize {
        let mut acks: Vec<Command> = Vec::new();
        let mut sent = 0;
        let mut batches = 0;
        while sent < total {
            let mut commands = std::mem::take(&mut acks);
            for _ in 0..SENDS {
                self.client_id += 1;
                let (sender, conversation) = if self.rng.below(5) == 0 {
                    let (members, id) = &self.groups[self.rng.below(GROUPS)];
                    (members[self.rng.below(members.len())], id.clone())
                } else {
                    let (sender, id) = &self.directs[self.rng.below(USERS)];
                    (*sender, id.clone())
                };
                if !self.online[sender] {
                    continue;
                }
                commands.push(d.frame(
                    sender,
                    ClientFrame::Send {
                        conversation,
                        client_id: self.client_id,
                        body: self.body.clone(),
                    },
                ));
                sent += 1;
            }
            batches += 1;
            for (user, frame) in d.step(commands) {
                match frame {
                    ServerFrame::Message {
                        conversation, seq, ..
                    } => acks.push(d.frame(user, ClientFrame::Delivered { conversation, seq })),
                    ServerFrame::Sent {
                        conversation, seq, ..
                    } => {
                        self.heads.insert(conversation, seq);
                    }
                    _ => {}
                }
            }
        }
        batches
    }
}

/// A fifth of the users detach, `sends` more messages go out, and they
/// come back: attach and sync, `CATCH_UP_BATCH` users a batch. Only the
/// returning users' batches are timed. With `reopen`, the router is closed
/// and opened again on its store before they come back.
fn catch_up(
    d: &mut Driver,
    traffic: &mut Traffic,
    sends: usize,
    registry: &mut Registry,
    reopen: Option<&RouterConfig>,
) -> CatchUp {
    let away: Vec<usize> = (0..USERS).step_by(5).collect();
    // Each holds everything up to the moment it goes, its own sends
    // included, and lists that in its `Sync` on return, as a client with a
    // local copy does (loadgen's too).
    let mut convs_of: Vec<Vec<&str>> = vec![Vec::new(); USERS];
    for (_, id) in &traffic.directs {
        // "d:u00012:u04711": both users are in it.
        for name in id.split(':').skip(1) {
            convs_of[name[1..].parse::<usize>().expect("a user number")].push(id);
        }
    }
    for (members, id) in &traffic.groups {
        for &m in members {
            convs_of[m].push(id);
        }
    }
    let held: Vec<Vec<Cursor>> = away
        .iter()
        .map(|&i| {
            convs_of[i]
                .iter()
                .map(|&id| Cursor {
                    conversation: id.to_owned(),
                    seq: traffic.heads.get(id).copied().unwrap_or(0),
                })
                .collect()
        })
        .collect();
    drop(convs_of);
    let detach = away
        .iter()
        .map(|&i| {
            traffic.online[i] = false;
            Command::Detach {
                session: d.sessions[i],
                device: d.users[i].clone(),
                last_seen_ms: d.now_ms,
            }
        })
        .collect();
    d.step(detach);
    traffic.drive(d, sends);
    if let Some(config) = reopen {
        d.core.take().expect("the router is open").close();
        *registry = Registry::default();
        d.core = Some(RouterCore::open(config.clone(), registry).expect("open again"));
    }
    d.busy = Duration::ZERO;
    let reads_before = entry_reads(registry);
    let mut messages = 0;
    let mut held = held.into_iter();
    for chunk in away.chunks(CATCH_UP_BATCH) {
        let mut commands = Vec::new();
        for &i in chunk {
            d.sessions[i].generation += 1;
            traffic.online[i] = true;
            let cursors = held.next().expect("one list per returning user");
            commands.extend(d.attach_and_sync(i, cursors));
        }
        let frames = d.step(commands);
        messages += frames
            .iter()
            .filter(|(_, f)| matches!(f, ServerFrame::Message { .. }))
            .count();
    }
    let reads = entry_reads(registry);
    CatchUp {
        users: away.len(),
        sends,
        messages,
        busy: d.busy,
        reads: (reads.0 - reads_before.0, reads.1 - reads_before.1),
    }
}

/// The router's entry reads so far: (from memory, from the store).
fn entry_reads(registry: &Registry) -> (u64, u64) {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    let count = |source: &str| {
        let name = format!("courier_router_entry_reads_total{{source=\"{source}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (count("memory"), count("store"))
}

/// Users attaching and syncing in one batch of the catch-up.
const CATCH_UP_BATCH: usize = 100;

/// What the catch-up phase measured.
struct CatchUp {
    users: usize,
    /// Sends while they were away.
    sends: usize,
    /// Messages their syncs delivered.
    messages: usize,
    /// Wall time in `prepare` + `finish` of their attach and sync batches.
    busy: Duration,
    /// Their reads of entries answered from the recent entries, and from
    /// the store.
    reads: (u64, u64),
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
    /// Bytes the process handed to the file system over both timed phases
    /// (journal, flushes and the compactions that ran meanwhile).
    written: u64,
    catch_up: CatchUp,
}

/// This thread's time on a CPU so far, in nanoseconds (Linux
/// `/proc/thread-self/schedstat`; 0 where it cannot be read).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Bytes this process has handed to the file system so far (Linux
/// `/proc/self/io`, `write_bytes`; 0 where it cannot be read).
fn process_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
