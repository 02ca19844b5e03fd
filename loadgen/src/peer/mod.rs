//! `loadgen peer`: the same two measurements against Courier and against
//! other servers that hold many persistent connections, each spoken to in
//! its own protocol, so they can be compared in one run on one machine.
//!
//! 1. **Idle connections.** `--connections` authenticated connections,
//!    ramped, spread over worker processes and loopback source addresses
//!    as in a normal run, kept alive with the protocol's own keepalive for
//!    `--idle`; the server's RSS (`--server-pid`) and the kernel's socket
//!    memory are read before and after, as `probe` does for the gateway.
//! 2. **Fan-out.** The first `--subscribers` connections join one topic
//!    (NATS subject, MQTT topic, XMPP multi-user chat room, Courier
//!    groups); one publisher sends `~--body-bytes` messages for
//!    `--fanout-duration` (paced at `--rate`, or as fast as the server
//!    acknowledges with `--window` outstanding); every subscriber counts
//!    what it receives, so the run reports deliveries per second and loss.
//!
//! ```text
//!  parent ── stdin: Start{job, process p of P}, Subscribe, Publish, Finish ─► peer-worker p
//!         ◄─ stdout: Progress(Tally) every 250 ms, Done(Tally) ─────────────┘
//! ```
//!
//! The protocol clients (`nats`, `mqtt`, `xmpp`, `courier`) are sans-IO
//! sessions (`session::Session`); `client` runs them on monoio sockets.
//! What this does not do: TLS, server clusters, persistence settings of
//! the peers (each runs as `benches/scripts/peers.sh` configures it).

mod client;
pub mod courier;
pub mod mqtt;
pub mod nats;
pub mod session;
pub mod xmpp;

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::config::{parse_duration, parse_source_addrs, CONNECTIONS_PER_PROCESS};
use crate::control::{Control, Phase};
use crate::handshake::Target;
use crate::probe::{Probe, Sample};
use crate::procs::{spawn_child, Children};
use crate::run::{open_files_limit, source_addrs_for, FD_RESERVE};

pub use client::Tally;

/// The protocol `loadgen peer` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// NATS client protocol over WebSocket (nats-server's websocket block).
    NatsWs,
    /// NATS client protocol over plain TCP (its native listener).
    Nats,
    /// MQTT 3.1.1 over TCP.
    Mqtt,
    /// XMPP over WebSocket (RFC 7395), multi-user chat for the fan-out.
    XmppWs,
    /// Courier's own protocol over WebSocket, groups for the fan-out.
    Courier,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Self::NatsWs => "nats-ws",
            Self::Nats => "nats",
            Self::Mqtt => "mqtt",
            Self::XmppWs => "xmpp-ws",
            Self::Courier => "courier",
        }
    }
}

/// Idle connections and a fan-out against Courier or a peer server, in
/// the server's own protocol.
#[derive(Clone, Debug, Parser)]
#[command(name = "loadgen peer", about, long_about = None)]
pub struct PeerArgs {
    /// The protocol to speak.
    #[arg(long, value_enum)]
    pub protocol: Protocol,
    /// The server: ws://host:port/path for the WebSocket protocols,
    /// mqtt://host:port for MQTT, nats://host:port for NATS over TCP;
    /// loopback only.
    #[arg(long)]
    pub url: String,
    /// Idle connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub connections: u32,
    /// Of those, how many join the fan-out (0: no fan-out phase).
    #[arg(long, default_value_t = 100)]
    pub subscribers: u32,
    /// New connections per second, over all worker processes.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// How long to hold the connections idle once all are up, before the
    /// server is measured.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub idle: Duration,
    /// Send the protocol's keepalive after this long without writing.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// User name; `{n}` is replaced by the connection's number (Courier
    /// ignores it: its users are named per run, with tokens signed by the
    /// node's secret).
    #[arg(long, default_value = "lg{n}")]
    pub user: String,
    /// Password (NATS: the token when `--user ''`).
    #[arg(long, default_value = "lg")]
    pub password: String,
    /// NATS subject, MQTT topic, or the XMPP room's bare JID.
    #[arg(long, default_value = "fan")]
    pub topic: String,
    /// XMPP domain.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// MQTT QoS of the subscriptions and the publishes (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Courier: the node's data directory (its jwt.secret signs tokens).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Courier: the node's largest group (publisher included); more
    /// subscribers use several groups.
    #[arg(long, default_value_t = 512)]
    pub group_max: u32,
    /// How long the publisher publishes.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub fanout_duration: Duration,
    /// Stop after this many messages (0: only the duration bounds it).
    #[arg(long, default_value_t = 0)]
    pub messages: u64,
    /// Messages per second (0: as fast as acknowledged, within --window).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Acknowledgements the publisher may wait for at once.
    #[arg(long, default_value_t = 32)]
    pub window: u32,
    /// Bytes per message.
    #[arg(long, default_value_t = 200)]
    pub body_bytes: usize,
    /// After publishing, wait at most this long for deliveries.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Stop waiting for connections this long after the ramp should have
    /// ended.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub setup_timeout: Duration,
    /// Worker processes (default: connections / 18,000, rounded up).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Source addresses, as for a normal run.
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// The server processes to measure (RSS, CPU), summed.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Use monoio's legacy epoll driver.
    #[arg(long)]
    pub legacy: bool,
    /// No progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// What every worker process is told: the run's settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub protocol: Protocol,
    pub url: String,
    pub connections: u32,
    pub subscribers: u32,
    pub ramp: f64,
    pub keepalive: Duration,
    pub user: String,
    pub password: String,
    pub topic: String,
    pub domain: String,
    pub qos: u8,
    pub data_dir: PathBuf,
    pub group_max: u32,
    pub fanout_duration: Duration,
    pub messages: u64,
    pub rate: f64,
    pub window: u32,
    pub body_bytes: usize,
    pub source_addrs: Vec<Ipv4Addr>,
    pub run_id: u32,
    pub legacy: bool,
}

impl Job {
    /// The server's address (the MQTT URL is checked like a ws:// one).
    pub fn target(&self) -> Result<Target, String> {
        let url = match self.protocol {
            Protocol::Mqtt | Protocol::Nats => self
                .url
                .strip_prefix("mqtt://")
                .or_else(|| self.url.strip_prefix("nats://"))
                .or_else(|| self.url.strip_prefix("tcp://"))
                .map(|rest| format!("ws://{rest}"))
                .ok_or_else(|| {
                    format!("--url {}: expected mqtt:// or nats://host:port", self.url)
                })?,
            _ => self.url.clone(),
        };
        Target::parse(&url).map_err(|e| format!("--url {}: {e}", self.url))
    }

    /// The user name of connection `u` (the publisher is `connections`).
    pub fn user_name(&self, u: u32) -> String {
        match self.protocol {
            Protocol::Courier => format!("pr-{:08x}-{u}", self.run_id),
            _ => self.user.replace("{n}", &u.to_string()),
        }
    }
}

/// Parent to worker process, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToPeerWorker {
    Start {
        job: Box<Job>,
        process: u32,
        processes: u32,
    },
    Subscribe,
    Publish,
    Finish,
}

/// Worker process to parent, one JSON line each.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FromPeerWorker {
    Progress(Tally),
    Done(Tally),
    Failed(String),
}

/// What `loadgen peer` found; `--report` writes it as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct PeerReport {
    pub protocol: String,
    pub url: String,
    pub connections: u32,
    pub worker_processes: u32,
    pub source_addrs: usize,
    /// Connections up when the server was measured.
    pub connections_up: u64,
    pub idle_s: f64,
    /// Server RSS before any connection, and after the idle hold.
    pub server_rss_start_bytes: Option<u64>,
    pub server_rss_idle_bytes: Option<u64>,
    /// (RSS after the idle hold - RSS at start) / connections up.
    pub server_bytes_per_connection: Option<f64>,
    /// Server CPU seconds over the idle hold, per connection-hour.
    pub server_idle_cpu_s_per_connection_hour: Option<f64>,
    /// Kernel: (Slab + TCP pages) delta per connection; both ends of each
    /// loopback pair, and whatever else the machine did meanwhile.
    pub kernel_bytes_per_loopback_pair: Option<f64>,
    pub kernel_tcp_inuse: Option<u64>,
    pub kernel_tcp_mem_pages: Option<u64>,
    pub subscribers: u32,
    pub subscribers_joined: u64,
    /// Courier: groups the subscribers were split into.
    pub groups: u32,
    pub published: u64,
    pub acks_expected: u64,
    pub acked: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// From the first publish to the last delivery.
    pub fanout_s: f64,
    pub deliveries_per_s: f64,
    pub published_per_s: f64,
    /// Server CPU seconds from the fan-out's start to its end.
    pub server_fanout_cpu_s: Option<f64>,
    pub disconnects: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub marks: Vec<Sample>,
}

/// `loadgen peer [flags]`.
pub fn main(argv: &[String]) -> ExitCode {
    let args = match PeerArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(&args) {
        Ok(report) => {
            print!("{}", summary(&report));
            if let Some(path) = &args.report {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default() + "\n";
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("loadgen peer: cannot write {}: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
            let complete = report.connections_up >= u64::from(report.connections)
                && report.subscribers_joined >= u64::from(report.subscribers);
            if complete {
                ExitCode::SUCCESS
            } else {
                eprintln!("loadgen peer: not every connection came up or joined");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("loadgen peer: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the two measurements; blocks until done.
pub fn run(args: &PeerArgs) -> Result<PeerReport, String> {
    let job = job_of(args)?;
    job.target()?;
    if job.protocol == Protocol::Courier {
        let secret = job.data_dir.join("jwt.secret");
        if !secret.exists() {
            return Err(format!("{}: not found (see --data-dir)", secret.display()));
        }
    }
    let processes = args
        .workers
        .unwrap_or_else(|| (job.connections + 1).div_ceil(CONNECTIONS_PER_PROCESS))
        .clamp(1, job.connections.max(1));
    let needed = u64::from((job.connections + 1).div_ceil(processes)) + FD_RESERVE;
    if let Some(limit) = open_files_limit().filter(|&l| l < needed) {
        return Err(format!(
            "{needed} descriptors per worker process needed, the limit is {limit}; raise --workers"
        ));
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the loadgen binary: {e}"))?;
    let probe = Probe::new(&args.server_pid, None);
    let started = Instant::now();
    let mut marks = vec![probe.sample("start", 0.0)];
    let (tx, rx) = mpsc::channel();
    let mut fleet = PeerFleet::default();
    for p in 0..processes {
        let start = ToPeerWorker::Start {
            job: Box::new(job.clone()),
            process: p,
            processes,
        };
        let line = serde_json::to_string(&start).map_err(|e| e.to_string())?;
        let (child, stdin, stdout) = spawn_child(&exe, "peer-worker", &line)?;
        fleet.0.add(child, stdin);
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("peer-pipe{p}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let msg = serde_json::from_str(&line)
                        .unwrap_or_else(|e| FromPeerWorker::Failed(format!("bad line: {e}")));
                    if tx.send((p as usize, msg)).is_err() {
                        return;
                    }
                }
                let _ = tx.send((p as usize, FromPeerWorker::Failed("pipe closed".into())));
            })
            .map_err(|e| e.to_string())?;
    }
    drop(tx);
    let mut c = Coordinator {
        rx,
        tallies: vec![Tally::default(); processes as usize],
        done: vec![false; processes as usize],
        quiet: args.quiet,
        last_line: Instant::now(),
        protocol: job.protocol.name(),
    };

    // 1. Connect and hold idle.
    let ramp_end = Duration::from_secs_f64(f64::from(job.connections) / job.ramp);
    let deadline = Instant::now() + ramp_end + args.setup_timeout;
    c.pump_until(deadline, |t| t.up >= u64::from(job.connections))?;
    let connected_at = started.elapsed().as_secs_f64();
    marks.push(probe.sample("connected", connected_at));
    c.pump_until(Instant::now() + args.idle, |_| false)?;
    let up = c.total().up;
    marks.push(probe.sample("idle", started.elapsed().as_secs_f64()));

    // 2. The fan-out.
    let mut fanout_cpu = None;
    let mut subscribers_joined = 0;
    if job.subscribers > 0 {
        fleet.send(&ToPeerWorker::Subscribe);
        let joined =
            |t: &Tally| t.subscribed >= u64::from(job.subscribers) && t.publisher_ready > 0;
        c.pump_until(Instant::now() + args.setup_timeout, joined)?;
        subscribers_joined = c.total().subscribed;
        marks.push(probe.sample("joined", started.elapsed().as_secs_f64()));
        fleet.send(&ToPeerWorker::Publish);
        c.pump_until(
            Instant::now() + job.fanout_duration + args.setup_timeout,
            |t| t.publishing_done > 0,
        )?;
        let subs = c.total().subscribed;
        c.pump_until(Instant::now() + args.drain, |t| {
            t.delivered >= t.published * subs
        })?;
        marks.push(probe.sample("drained", started.elapsed().as_secs_f64()));
        let cpu = |label: &str| {
            marks
                .iter()
                .find(|m| m.label == label)
                .and_then(|m| m.gateway.as_ref())
                .map(|g| g.cpu_s)
        };
        fanout_cpu = cpu("drained").zip(cpu("joined")).map(|(b, a)| b - a);
    }
    fleet.send(&ToPeerWorker::Finish);
    c.pump_until(Instant::now() + Duration::from_secs(10), |_| false)
        .or_else(|e| {
            if c.done.iter().all(|d| *d) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    fleet.stop();

    let t = c.total();
    let mark = |label: &str| marks.iter().find(|m| m.label == label);
    let (start, idle) = (mark("start"), mark("idle"));
    let rss = |m: Option<&Sample>| m.and_then(|m| m.gateway.as_ref()).map(|g| g.rss_bytes);
    let per_conn = |d: f64| (up > 0).then(|| d / up as f64);
    let server_bytes = rss(idle)
        .zip(rss(start))
        .and_then(|(b, a)| per_conn(b as f64 - a as f64));
    let kernel_bytes = |m: Option<&Sample>| {
        m.and_then(|m| m.kernel.as_ref())
            .map(|k| k.slab_bytes as f64 + (k.tcp_mem_pages * k.page_size) as f64)
    };
    let kernel = kernel_bytes(idle)
        .zip(kernel_bytes(start))
        .and_then(|(b, a)| per_conn(b - a));
    let connected = mark("connected");
    let idle_cpu = connected.zip(idle).and_then(|(a, b)| {
        let (ga, gb) = (a.gateway.as_ref()?, b.gateway.as_ref()?);
        let hours = (b.at_s - a.at_s) / 3600.0;
        (hours > 0.0 && up > 0).then(|| (gb.cpu_s - ga.cpu_s) / up as f64 / hours)
    });
    let expected = t.published * u64::from(job.subscribers);
    let fanout_s = if t.last_delivery_ns > t.first_publish_ns && t.first_publish_ns > 0 {
        (t.last_delivery_ns - t.first_publish_ns) as f64 / 1e9
    } else {
        0.0
    };
    let publish_s = (t.last_publish_ns.saturating_sub(t.first_publish_ns)) as f64 / 1e9;
    let per = (job.group_max.max(2) - 1).max(1);
    Ok(PeerReport {
        protocol: job.protocol.name().to_owned(),
        url: job.url.clone(),
        connections: job.connections,
        worker_processes: processes,
        source_addrs: job.source_addrs.len(),
        connections_up: up,
        idle_s: args.idle.as_secs_f64(),
        server_rss_start_bytes: rss(start),
        server_rss_idle_bytes: rss(idle),
        server_bytes_per_connection: server_bytes,
        server_idle_cpu_s_per_connection_hour: idle_cpu,
        kernel_bytes_per_loopback_pair: kernel,
        kernel_tcp_inuse: idle.and_then(|m| m.kernel.as_ref()).map(|k| k.tcp_inuse),
        kernel_tcp_mem_pages: idle
            .and_then(|m| m.kernel.as_ref())
            .map(|k| k.tcp_mem_pages),
        subscribers: job.subscribers,
        subscribers_joined,
        groups: match job.protocol {
            Protocol::Courier => job.subscribers.div_ceil(per),
            _ => 0,
        },
        published: t.published,
        acks_expected: t.acks_expected,
        acked: t.acked,
        expected_deliveries: expected,
        delivered: t.delivered,
        duplicates: t.duplicates,
        lost: expected.saturating_sub(t.delivered),
        fanout_s,
        deliveries_per_s: if fanout_s > 0.0 {
            t.delivered as f64 / fanout_s
        } else {
            0.0
        },
        published_per_s: if publish_s > 0.0 {
            t.published as f64 / publish_s
        } else {
            0.0
        },
        server_fanout_cpu_s: fanout_cpu,
        disconnects: t.disconnects,
        errors: t.errors.clone(),
        marks,
    })
}

fn job_of(args: &PeerArgs) -> Result<Job, String> {
    if args.connections == 0 {
        return Err("--connections: at least 1".into());
    }
    if args.subscribers > args.connections {
        return Err("--subscribers: at most --connections".into());
    }
    if args.ramp.is_nan() || args.ramp <= 0.0 {
        return Err("--ramp: must be positive".into());
    }
    if args.rate < 0.0 || (args.rate == 0.0 && args.window == 0) {
        return Err("--rate 0 needs a --window of at least 1".into());
    }
    let source_addrs = match &args.source_addrs {
        Some(spec) => parse_source_addrs(spec).map_err(|e| format!("--source-addrs: {e}"))?,
        None => source_addrs_for(args.connections + 1),
    };
    let run_id = (crate::procs::unix_ns() as u32) ^ std::process::id().rotate_left(16);
    Ok(Job {
        protocol: args.protocol,
        url: args.url.clone(),
        connections: args.connections,
        subscribers: args.subscribers,
        ramp: args.ramp,
        keepalive: args.keepalive,
        user: args.user.clone(),
        password: args.password.clone(),
        topic: args.topic.clone(),
        domain: args.domain.clone(),
        qos: args.qos,
        data_dir: args.data_dir.clone(),
        group_max: args.group_max,
        fanout_duration: args.fanout_duration,
        messages: args.messages,
        rate: args.rate,
        window: args.window,
        body_bytes: args.body_bytes,
        source_addrs,
        run_id,
        legacy: args.legacy,
    })
}

/// The summary `loadgen peer` prints.
pub fn summary(r: &PeerReport) -> String {
    let mut s = format!(
        "peer {}: {} of {} connections up, {} worker processes, {} source addresses\n",
        r.protocol, r.connections_up, r.connections, r.worker_processes, r.source_addrs
    );
    if let (Some(b), Some(a), Some(per)) = (
        r.server_rss_start_bytes,
        r.server_rss_idle_bytes,
        r.server_bytes_per_connection,
    ) {
        s += &format!(
            "server {per:.0} B per idle connection (RSS {:.1} -> {:.1} MB after {:.0} s idle)",
            b as f64 / 1e6,
            a as f64 / 1e6,
            r.idle_s
        );
        if let Some(k) = r.kernel_bytes_per_loopback_pair {
            s += &format!(", kernel {k:.0} B per loopback pair");
        }
        if let Some(cpu) = r.server_idle_cpu_s_per_connection_hour {
            s += &format!(", idle CPU {cpu:.4} s per connection-hour");
        }
        s += "\n";
    }
    if r.subscribers > 0 {
        s += &format!(
            "fan-out to {} of {} subscribers: {} published ({:.0}/s), {} of {} delivered in {:.2} s: \
             {:.0} deliveries/s; lost {}, duplicates {}",
            r.subscribers_joined,
            r.subscribers,
            r.published,
            r.published_per_s,
            r.delivered,
            r.expected_deliveries,
            r.fanout_s,
            r.deliveries_per_s,
            r.lost,
            r.duplicates
        );
        if let Some(cpu) = r.server_fanout_cpu_s {
            s += &format!(", server CPU {cpu:.2} s");
        }
        s += "\n";
    }
    if !r.errors.is_empty() || r.disconnects > 0 {
        s += &format!("disconnects {}, errors {:?}\n", r.disconnects, r.errors);
    }
    s
}

/// The parent's side of the worker processes.
#[derive(Default)]
struct PeerFleet(Children);

impl PeerFleet {
    fn send(&mut self, msg: &ToPeerWorker) {
        if let Ok(line) = serde_json::to_string(msg) {
            self.0.send_line(&line);
        }
    }

    /// Closes the pipes and waits for the children (killing any that is
    /// still there after 5 s).
    fn stop(mut self) {
        self.0.wait(Duration::from_secs(5));
    }
}

struct Coordinator {
    rx: mpsc::Receiver<(usize, FromPeerWorker)>,
    tallies: Vec<Tally>,
    done: Vec<bool>,
    quiet: bool,
    last_line: Instant,
    protocol: &'static str,
}

impl Coordinator {
    fn total(&self) -> Tally {
        let mut t = Tally::default();
        for x in &self.tallies {
            t.merge(x);
        }
        t
    }

    /// Takes progress until `until` or until `enough` holds for the
    /// total; a failed worker stops the run.
    fn pump_until(
        &mut self,
        until: Instant,
        enough: impl Fn(&Tally) -> bool,
    ) -> Result<(), String> {
        loop {
            if enough(&self.total()) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(5) {
                self.last_line = Instant::now();
                let t = self.total();
                eprintln!(
                    "peer {}: up {} subscribed {} published {} acked {} delivered {} errors {}",
                    self.protocol,
                    t.up,
                    t.subscribed,
                    t.published,
                    t.acked,
                    t.delivered,
                    t.errors.values().sum::<u64>()
                );
            }
            match self
                .rx
                .recv_timeout((until - now).min(Duration::from_millis(100)))
            {
                Ok((p, FromPeerWorker::Progress(t))) => {
                    if !self.done[p] {
                        self.tallies[p] = t;
                    }
                }
                Ok((p, FromPeerWorker::Done(t))) => {
                    self.tallies[p] = t;
                    self.done[p] = true;
                    if self.done.iter().all(|d| *d) {
                        return Ok(());
                    }
                }
                Ok((p, FromPeerWorker::Failed(e))) => {
                    if !self.done[p] {
                        return Err(format!("worker process {p}: {e}"));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("every worker process is gone".into())
                }
            }
        }
    }
}

/// `loadgen peer-worker`: one worker process of `loadgen peer`, driven
/// over stdin and stdout by its parent. Not meant to be started by hand.
pub fn worker_process() -> ExitCode {
    let mut first = String::new();
    let _ = std::io::stdin().read_line(&mut first);
    let Ok(ToPeerWorker::Start {
        job,
        process,
        processes,
    }) = serde_json::from_str(&first)
    else {
        eprintln!("loadgen peer-worker: expected a start line from loadgen peer on stdin");
        return ExitCode::from(2);
    };
    let control = Arc::new(Control::default());
    let steer = control.clone();
    let _ = std::thread::Builder::new()
        .name("peer-ctl".into())
        .spawn(move || {
            for line in std::io::stdin().lines() {
                match line.ok().and_then(|l| serde_json::from_str(&l).ok()) {
                    Some(ToPeerWorker::Subscribe) => steer.advance(Phase::Groups),
                    Some(ToPeerWorker::Publish) => steer.advance(Phase::Traffic),
                    Some(ToPeerWorker::Finish) | None => break,
                    Some(ToPeerWorker::Start { .. }) => {}
                }
            }
            steer.advance(Phase::Finish);
        });
    let msg = match client::run(Arc::new(*job), process, processes, control) {
        Ok(t) => FromPeerWorker::Done(t),
        Err(e) => FromPeerWorker::Failed(e),
    };
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_string(&msg).map(|l| writeln!(out, "{l}").and_then(|()| out.flush()));
    ExitCode::SUCCESS
}
