//! The coordinator: starts the workers, moves the run through its phases,
//! prints progress, merges the outcomes and audits them.

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use courier_protocol::token::Secret;

use crate::check::audit;
use crate::config::Config;
use crate::control::{Control, Outcome, Phase, WorkerEvent};
use crate::latency::{Latencies, Summary};
use crate::plan::{Plan, PlanError};
use crate::probe::{Probe, Sample};
use crate::procs::{unix_ns, Fleet, ToWorker};
use crate::report::{Observed, PhaseReport, Report, Timing};
use crate::rng::mix;
use crate::stats::{Counters, Errors};
use crate::worker::{run_worker, Tokens, WorkerSetup};

/// Why a run could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The node's signing secret could not be read.
    #[error("cannot read the node's token secret {path}: {source} (start the gateway once so it creates it, or pass --data-dir)")]
    Secret {
        /// The file tried.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The plan's parameters are inconsistent.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Every connection attempt was refused.
    #[error("nothing is listening on {0} (connection refused); start the gateway first")]
    NoServer(String),
    /// The gateway refuses the tokens loadgen signs.
    #[error("the gateway at {0} refuses loadgen's tokens (HTTP 401); is --data-dir the node's data directory?")]
    Unauthorized(String),
    /// No connection came up in time.
    #[error("no connection came up within the setup timeout (errors: {0})")]
    NoConnections(String),
    /// A worker failed or stopped reporting.
    #[error("worker {worker}: {error}")]
    Worker {
        /// Its index.
        worker: usize,
        /// What happened.
        error: String,
    },
    /// The process may not open a socket per connection.
    #[error("--connections: {connections} connections need about {needed} file descriptors, but this process may open {limit} (raise `ulimit -n` or use fewer connections)")]
    FdLimit {
        /// Connections asked for.
        connections: u32,
        /// Descriptors they need with loadgen's own.
        needed: u64,
        /// The soft limit.
        limit: u64,
    },
    /// A worker thread could not be started.
    #[error("could not start a worker thread: {0}")]
    Spawn(std::io::Error),
    /// The worker processes could not be started.
    #[error("--workers: {0}")]
    Processes(String),
}

/// How long the coordinator waits, at most, for the groups to be known
/// everywhere once their creation was asked for.
const GROUPS_TIMEOUT: Duration = Duration::from_secs(30);
/// Gap between fixing the traffic start and the start itself, so every
/// worker sees it before its first message is due.
const START_LEAD: Duration = Duration::from_millis(50);
/// The same across a pipe to worker processes.
const START_LEAD_PROCESSES: Duration = Duration::from_millis(300);
/// How long workers get to hand over their outcome after `Finish`.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(20);
/// A run whose connections were all refused for this long stops early.
const FAST_FAIL: Duration = Duration::from_secs(3);

/// Runs loadgen with `config` and returns its report. Blocks the calling
/// thread for the whole run (connect, groups, traffic, drain); the work
/// happens on `config.threads` worker threads of their own.
pub fn run(mut config: Config) -> Result<Report, RunError> {
    let started = Instant::now();
    let run_id = config.run_id.unwrap_or_else(random_run_id);
    let secret = match config.secret.clone() {
        Some(s) => s,
        None => read_secret(&config)?,
    };
    let processes = config.worker_processes();
    if processes > 1 {
        // Every worker thread of every process holds at least one user.
        let per = (config.connections / processes).max(1) as usize;
        config.threads = config.threads.min(per).max(1);
    }
    let auto_sources = config.source_addrs.is_empty() && auto_source_addrs(&mut config);
    let plan = Arc::new(Plan::new(&config.plan_params(run_id))?);
    let per_process = config.connections.div_ceil(processes);
    let needed = u64::from(per_process) + FD_RESERVE;
    if let Some(limit) = open_files_limit().filter(|&l| l < needed) {
        return Err(RunError::FdLimit {
            connections: config.connections,
            needed,
            limit,
        });
    }
    let probe = Probe::new(&config.gateway_pids, config.metrics_url.as_deref());
    let first_mark = probe.sample("start", 0.0);
    let config = Arc::new(config);
    let control = Arc::new(Control::default());
    let (tx, rx) = mpsc::channel();
    let mut seam = Seam {
        control: control.clone(),
        fleet: None,
    };
    let mut handles = Vec::new();
    let workers = if processes > 1 {
        let exe = config
            .worker_exe
            .clone()
            .or_else(|| std::env::current_exe().ok())
            .ok_or_else(|| RunError::Processes("cannot find the loadgen binary".into()))?;
        let fleet = Fleet::spawn(&exe, &config, &secret, &plan, processes, &tx)
            .map_err(RunError::Processes)?;
        seam.fleet = Some(fleet);
        processes as usize * config.threads
    } else {
        let workers = config.threads.min(config.connections as usize).max(1);
        for index in 0..workers {
            let setup = WorkerSetup {
                index: index as u32,
                count: workers as u32,
                plan: plan.clone(),
                config: config.clone(),
                tokens: Tokens::Secret(secret.clone()),
                control: control.clone(),
                events: tx.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("loadgen-w{index}"))
                .spawn(move || run_worker(setup))
                .map_err(RunError::Spawn);
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    control.advance(Phase::Finish);
                    return Err(e);
                }
            }
        }
        workers
    };
    drop(tx);
    let mut co = Coordinator::new(rx, workers, &config, probe, started);
    co.marks.push(first_mark);
    if config.progress {
        eprintln!(
            "loadgen: run {run_id:08x}: {} users, {} direct conversations, {} groups (sizes {}..{}, mean {:.1}, exponent {:.2}), {} messages in {} phase{}; {} worker process{} x {} thread{}, {} source address{}",
            plan.users(),
            plan.directs(),
            plan.groups(),
            config.group_min,
            config.group_max,
            plan.group_size_mean(),
            plan.size_exponent(),
            plan.total_messages(),
            plan.phases().len(),
            if plan.phases().len() == 1 { "" } else { "s" },
            processes,
            if processes == 1 { "" } else { "es" },
            config.threads,
            if config.threads == 1 { "" } else { "s" },
            if config.source_addrs.is_empty() { "kernel-chosen".to_string() } else { config.source_addrs.len().to_string() },
            if config.source_addrs.len() == 1 { "" } else { "es" },
        );
        if auto_sources {
            eprintln!(
                "loadgen: {} connections exceed one source address's ephemeral ports; spreading them over {}..{}",
                config.connections,
                config.source_addrs[0],
                config.source_addrs[config.source_addrs.len() - 1]
            );
        }
    }
    let result = co.drive(&config, &plan, &mut seam);
    // Whatever happened, the workers stop now.
    seam.advance(Phase::Finish);
    let result = result.and_then(|seen| co.collect().map(|outcome| (seen, outcome)));
    co.end_line();
    for h in handles {
        // A worker that panicked has already failed the run through its
        // missing outcome.
        let _ = h.join();
    }
    if let Some(fleet) = seam.fleet.take() {
        fleet.stop(COLLECT_TIMEOUT);
    }
    let (seen, outcome) = result?;
    let findings = audit(&plan, &outcome.tally);
    Ok(Report::build(
        &config,
        config.echo(run_id),
        &plan,
        &outcome,
        &findings,
        seen,
    ))
}

/// Fills in source addresses when the connections need more ephemeral
/// ports than one source address has (the kernel's default source,
/// 127.0.0.1, gives one address). Returns true when it did.
fn auto_source_addrs(config: &mut Config) -> bool {
    config.source_addrs = source_addrs_for(config.connections);
    !config.source_addrs.is_empty()
}

/// Source addresses from 127.0.1.1 enough for `connections` (none when the
/// kernel's default source has ports enough). Also used by `loadgen peer`.
pub(crate) fn source_addrs_for(connections: u32) -> Vec<std::net::Ipv4Addr> {
    let ports = ephemeral_ports().unwrap_or(28_232);
    // Keep a fifth of each address's ports free for everything else.
    let per_addr = (ports * 4 / 5).max(1);
    if connections <= per_addr {
        return Vec::new();
    }
    let count = connections.div_ceil(per_addr);
    let first = u32::from(std::net::Ipv4Addr::new(127, 0, 1, 1));
    (0..count)
        .map(|k| std::net::Ipv4Addr::from(first + k))
        .collect()
}

/// Size of the ephemeral port range, from /proc.
fn ephemeral_ports() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u32>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}

/// How the coordinator tells the workers what to do: an atomic for worker
/// threads of this process, a line on each child's stdin for processes.
struct Seam {
    control: Arc<Control>,
    fleet: Option<Fleet>,
}

impl Seam {
    fn advance(&mut self, phase: Phase) {
        self.control.advance(phase);
        if let Some(fleet) = &mut self.fleet {
            match phase {
                Phase::Groups => fleet.send(&ToWorker::Groups),
                Phase::Finish => fleet.send(&ToWorker::Finish),
                Phase::Connect | Phase::Traffic => {}
            }
        }
    }

    /// Fixes the traffic start a little ahead and tells every worker.
    fn start_traffic(&mut self) -> Instant {
        let lead = if self.fleet.is_some() {
            START_LEAD_PROCESSES
        } else {
            START_LEAD
        };
        let (t0, t0_unix_ns) = (Instant::now() + lead, unix_ns() + lead.as_nanos() as u64);
        self.control.start_traffic(t0);
        if let Some(fleet) = &mut self.fleet {
            fleet.send(&ToWorker::Traffic { t0_unix_ns });
        }
        t0
    }
}

/// Descriptors loadgen needs beside one per connection (runtime, pacer,
/// stdio, the report).
pub(crate) const FD_RESERVE: u64 = 64;

/// The soft limit on open files, from `/proc/self/limits` (None where that
/// file is missing or unreadable, or the limit is unlimited).
pub(crate) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn read_secret(config: &Config) -> Result<Secret, RunError> {
    let path = config.data_dir.join("jwt.secret");
    std::fs::read(&path)
        .map(Secret::new)
        .map_err(|source| RunError::Secret { path, source })
}

fn random_run_id() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    mix(nanos, u64::from(std::process::id())) as u32
}

/// The coordinator's view of the workers.
struct Coordinator {
    rx: Receiver<WorkerEvent>,
    /// Latest counters and errors per worker.
    counters: Vec<Counters>,
    errors: Vec<Errors>,
    outcomes: Vec<Option<Outcome>>,
    /// Every latency sample reported so far (for the progress line).
    so_far: Latencies,
    target: u64,
    peak: u64,
    started: Instant,
    phase: String,
    probe: Probe,
    /// Measurements at each mark of the run.
    marks: Vec<Sample>,
    progress: bool,
    tty: bool,
    last_print: Instant,
    last: Counters,
    printed: bool,
}

impl Coordinator {
    fn new(
        rx: Receiver<WorkerEvent>,
        workers: usize,
        config: &Config,
        probe: Probe,
        started: Instant,
    ) -> Self {
        let now = Instant::now();
        Self {
            probe,
            marks: Vec::new(),
            rx,
            counters: vec![Counters::default(); workers],
            errors: vec![Errors::default(); workers],
            outcomes: (0..workers).map(|_| None).collect(),
            so_far: Latencies::new(),
            target: u64::from(config.connections),
            peak: 0,
            started,
            phase: "connect".into(),
            progress: config.progress,
            tty: std::io::stderr().is_terminal(),
            last_print: now,
            last: Counters::default(),
            printed: false,
        }
    }

    /// Connect, groups, traffic, drain. Returns what the coordinator saw.
    fn drive(
        &mut self,
        config: &Config,
        plan: &Plan,
        control: &mut Seam,
    ) -> Result<Observed, RunError> {
        // Connect: every connection up and caught up, or the setup timeout.
        let ramp = Duration::from_secs_f64(f64::from(config.connections) / config.ramp);
        let setup_deadline = self.started + ramp + config.setup_timeout;
        loop {
            self.pump(Instant::now() + Duration::from_millis(100))?;
            let (c, e) = self.totals();
            if c.connections_up >= self.target || Instant::now() >= setup_deadline {
                break;
            }
            if c.connects == 0 && self.started.elapsed() >= FAST_FAIL {
                if e.0.contains_key("connect.refused") {
                    return Err(RunError::NoServer(config.target.url.clone()));
                }
                if e.0.contains_key("handshake.status_401") {
                    return Err(RunError::Unauthorized(config.target.url.clone()));
                }
            }
        }
        let (c, e) = self.totals();
        if c.connections_up == 0 {
            let list: Vec<String> = e.0.iter().map(|(k, v)| format!("{k} {v}")).collect();
            return Err(RunError::NoConnections(if list.is_empty() {
                "none".into()
            } else {
                list.join(", ")
            }));
        }
        if c.connections_up < self.target {
            self.note(&format!(
                "continuing with {} of {} connections up",
                c.connections_up, self.target
            ));
        }

        // Groups: creators ask, members learn the ids from the creation entry.
        self.phase = "groups".into();
        control.advance(Phase::Groups);
        let groups_deadline = Instant::now() + GROUPS_TIMEOUT;
        while plan.groups() > 0 && Instant::now() < groups_deadline {
            self.pump(Instant::now() + Duration::from_millis(50))?;
            if self.totals().0.groups_missing == 0 {
                break;
            }
        }
        let missing = self.totals().0.groups_missing;
        if missing > 0 {
            self.note(&format!(
                "{missing} group ids still unknown to some worker; their messages are skipped"
            ));
        }

        self.mark("connected");

        // Traffic: the open-loop schedule from t0, phase after phase.
        let t0 = control.start_traffic();
        let setup_s = (t0 - self.started).as_secs_f64();
        let mut phases = Vec::with_capacity(plan.phases().len());
        for span in plan.phases() {
            self.phase.clone_from(&span.plan.name);
            let (before, _) = self.totals();
            self.pump(t0 + Duration::from_nanos(span.end_ns()))?;
            let (after, _) = self.totals();
            self.mark(&span.plan.name);
            phases.push(PhaseReport::new(span, &before, &after));
        }
        let traffic_end = t0 + plan.duration();

        // Drain: wait for SENTs and deliveries still in flight.
        self.phase = "drain".into();
        let drain_deadline = Instant::now() + config.drain;
        loop {
            let (c, _) = self.totals();
            let workers = self.counters.len() as u64;
            let settled = c.shards_done_sending == workers
                && c.pending == 0
                && c.delivered >= c.expected
                && c.connections_up >= self.target;
            if settled || Instant::now() >= drain_deadline {
                break;
            }
            self.pump(Instant::now() + Duration::from_millis(50))?;
        }
        let drain_s = traffic_end.elapsed().as_secs_f64();
        let connections_at_end = self.totals().0.connections_up;
        self.mark("drained");
        self.phase = "finish".into();
        Ok(Observed {
            connections_peak: self.peak,
            connections_at_end,
            timing: Timing {
                setup_s,
                traffic_s: plan.duration().as_secs_f64(),
                drain_s,
            },
            phases,
            marks: std::mem::take(&mut self.marks),
        })
    }

    /// Measures the gateway and the kernel at a mark of the run.
    fn mark(&mut self, label: &str) {
        let (c, _) = self.totals();
        let mut sample = self
            .probe
            .sample(label, self.started.elapsed().as_secs_f64());
        sample.connections_up = c.connections_up;
        sample.sent = c.sent;
        sample.acked = c.acked;
        sample.delivered = c.delivered;
        self.marks.push(sample);
    }

    /// Waits for every worker's outcome and merges them.
    fn collect(&mut self) -> Result<Outcome, RunError> {
        let deadline = Instant::now() + COLLECT_TIMEOUT;
        while self.outcomes.iter().any(Option::is_none) && Instant::now() < deadline {
            self.pump(Instant::now() + Duration::from_millis(100))?;
        }
        let mut merged = Outcome::default();
        for (worker, outcome) in self.outcomes.iter_mut().enumerate() {
            let outcome = outcome.take().ok_or(RunError::Worker {
                worker,
                error: "did not hand over its outcome".into(),
            })?;
            merged.merge(outcome);
        }
        Ok(merged)
    }

    /// Handles worker events until `until`, printing progress once a second.
    fn pump(&mut self, until: Instant) -> Result<(), RunError> {
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            match self
                .rx
                .recv_timeout((until - now).min(Duration::from_millis(100)))
            {
                Ok(event) => self.handle(event)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every worker has ended; nothing more will come.
                    std::thread::sleep(
                        until
                            .saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(100)),
                    );
                    if self.outcomes.iter().all(Option::is_some) {
                        return Ok(());
                    }
                }
            }
            if self.last_print.elapsed() >= Duration::from_secs(1) {
                self.print_progress();
            }
        }
    }

    fn handle(&mut self, event: WorkerEvent) -> Result<(), RunError> {
        match event {
            WorkerEvent::Progress {
                worker,
                counters,
                errors,
                interval,
            } => {
                if let Some(slot) = self.counters.get_mut(worker) {
                    *slot = counters;
                }
                if let Some(slot) = self.errors.get_mut(worker) {
                    *slot = errors;
                }
                self.so_far.merge(&interval);
                let up = self.counters.iter().map(|c| c.connections_up).sum();
                self.peak = self.peak.max(up);
            }
            WorkerEvent::Done { worker, outcome } => {
                if let Some(slot) = self.counters.get_mut(worker) {
                    *slot = outcome.counters.clone();
                }
                if let Some(slot) = self.outcomes.get_mut(worker) {
                    *slot = Some(*outcome);
                }
            }
            WorkerEvent::Failed { worker, error } => {
                return Err(RunError::Worker { worker, error })
            }
        }
        Ok(())
    }

    fn totals(&self) -> (Counters, Errors) {
        let mut c = Counters::default();
        for w in &self.counters {
            c += w;
        }
        let mut e = Errors::default();
        for w in &self.errors {
            e.merge(w);
        }
        (c, e)
    }

    fn print_progress(&mut self) {
        let elapsed = self.last_print.elapsed().as_secs_f64().max(1e-9);
        self.last_print = Instant::now();
        let (c, _) = self.totals();
        if self.progress {
            let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / elapsed;
            let ack = Summary::of(&self.so_far.sent_ack);
            let e2e = Summary::of(&self.so_far.end_to_end);
            let line = format!(
                "[{:>6.1}s {:<7}] conns {}/{} | sent {:.0}/s acked {:.0}/s delivered {:.0}/s | pending {} | errors {} | churned {} | p99 ack {:.2} ms, e2e {:.2} ms",
                self.started.elapsed().as_secs_f64(),
                self.phase,
                c.connections_up,
                self.target,
                rate(c.sent, self.last.sent),
                rate(c.acked, self.last.acked),
                rate(c.delivered, self.last.delivered),
                c.pending,
                c.errors,
                c.churned,
                ack.p99,
                e2e.p99,
            );
            let mut err = std::io::stderr().lock();
            // A closed stderr costs the progress line and nothing else.
            let _ = if self.tty {
                write!(err, "\r\x1b[2K{line}")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            self.printed = true;
        }
        self.last = c;
    }

    /// Prints a note on its own line.
    fn note(&mut self, text: &str) {
        if self.progress {
            self.end_line();
            eprintln!("loadgen: {text}");
        }
    }

    /// Ends a progress line left open on a terminal.
    fn end_line(&mut self) {
        if self.progress && self.tty && self.printed {
            eprintln!();
            self.printed = false;
        }
    }
}
