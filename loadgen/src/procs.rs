//! Worker processes: the same workers as threads, behind a pipe.
//!
//! A process may hold 20,000 file descriptors here, so a run of more
//! connections than that spreads them over worker processes. The parent
//! re-executes the `loadgen` binary as `loadgen worker`, and speaks JSON
//! lines with each child over its stdin and stdout:
//!
//! ```text
//!  parent ── stdin: Start{config, tokens, process p of P} ─────────► child p
//!         ── stdin: Groups, Traffic{t0 as Unix ns}, Finish ────────►
//!         ◄─ stdout: Progress{counters, errors, histograms} every 250 ms
//!         ◄─ stdout: Done{counters, errors, histograms, tally} ─── once per thread
//! ```
//!
//! Child `p` runs `threads` worker threads whose global indices are
//! `p * threads .. (p + 1) * threads` out of `P * threads`, so user `u`
//! lives on the same global worker `u % (P * threads)` as it would with
//! threads only, and everything the parent merges (counters, HDR
//! histograms, tallies) is what threads would have handed over. The
//! checker's audit runs in the parent over every worker's tally, so a
//! message from a sender in one process to a recipient in another is
//! judged exactly as within one.
//!
//! The parent mints every user's token and sends each child its users'
//! tokens: the node's secret never crosses the pipe. The traffic start
//! travels as wall-clock time, converted by each child to its own
//! monotonic clock (both read within microseconds of each other); it is
//! fixed far enough ahead that every child has it before it is due.
//!
//! A child whose stdin closes (the parent died) finishes its run and
//! exits; a parent that loses a child's stdout reports that worker failed.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use courier_protocol::token::{self, Secret};

use crate::check::Tally;
use crate::config::Config;
use crate::control::{Control, Outcome, Phase, WorkerEvent};
use crate::latency::{Encoded, Latencies};
use crate::plan::Plan;
use crate::stats::{Counters, Errors};
use crate::worker::{run_worker, Tokens, WorkerSetup, TOKEN_TTL_S};

/// What the parent tells a child.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ToWorker {
    /// The first line: everything the child needs to build its workers.
    Start {
        config: Box<Config>,
        run_id: u32,
        process: u32,
        processes: u32,
        /// Token of every user this child holds.
        tokens: Vec<(u32, String)>,
    },
    /// Create the groups.
    Groups,
    /// Run the schedule from `t0_unix_ns` (wall clock).
    Traffic { t0_unix_ns: u64 },
    /// Close everything and hand over the outcomes.
    Finish,
}

/// What a child tells the parent, one per line. (Externally tagged: an
/// internally tagged enum buffers its content, and integer map keys then
/// no longer decode.)
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FromWorker {
    Progress {
        worker: usize,
        counters: Counters,
        errors: Errors,
        interval: Encoded,
    },
    Done {
        worker: usize,
        counters: Counters,
        errors: Errors,
        latencies: Encoded,
        tally: Tally,
        driver: String,
    },
    Failed {
        worker: usize,
        error: String,
    },
}

/// Nanoseconds since the Unix epoch, now.
pub(crate) fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The local monotonic instant of wall-clock time `ns`.
pub(crate) fn instant_of(ns: u64) -> Instant {
    let (now, wall) = (Instant::now(), unix_ns());
    if ns >= wall {
        now + Duration::from_nanos(ns - wall)
    } else {
        now.checked_sub(Duration::from_nanos(wall - ns))
            .unwrap_or(now)
    }
}

/// The users global worker `index` of `count` holds.
fn users_of(users: u32, first: u32, last: u32, count: u32) -> impl Iterator<Item = u32> {
    (0..users).filter(move |u| (first..last).contains(&(u % count)))
}

// ---- the parent's side ----

/// Child processes with a line pipe to each: what `loadgen` and `loadgen
/// peer` hold of their workers. Children still running when it is dropped
/// are killed, so a failed run leaves no orphans.
#[derive(Debug, Default)]
pub(crate) struct Children {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
}

impl Children {
    /// Adds a child started by [`spawn_child`].
    pub fn add(&mut self, child: Child, stdin: ChildStdin) {
        self.children.push(child);
        self.stdins.push(Some(stdin));
    }

    /// Writes `line` to every child still listening; a child whose pipe
    /// broke is not written to again (its reader reports its failure).
    pub fn send_line(&mut self, line: &str) {
        for stdin in &mut self.stdins {
            let ok = stdin
                .as_mut()
                .is_some_and(|s| writeln!(s, "{line}").and_then(|()| s.flush()).is_ok());
            if !ok {
                *stdin = None;
            }
        }
    }

    /// Closes the pipes and waits for the children, killing any still
    /// running after `grace`.
    pub fn wait(&mut self, grace: Duration) {
        self.stdins.clear();
        let deadline = Instant::now() + grace;
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The parent's handle on its worker processes. Created by
/// [`Fleet::spawn`]; [`Fleet::stop`] waits for them to exit.
#[derive(Debug)]
pub(crate) struct Fleet {
    children: Children,
    readers: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts `processes` children of `exe`, `config.threads` workers each,
    /// relaying their events to `events` with global worker indices.
    pub fn spawn(
        exe: &Path,
        config: &Config,
        secret: &Secret,
        plan: &Plan,
        processes: u32,
        events: &Sender<WorkerEvent>,
    ) -> Result<Self, String> {
        let threads = config.threads as u32;
        let count = processes * threads;
        let now_s = unix_ns() / 1_000_000_000;
        let mut fleet = Self {
            children: Children::default(),
            readers: Vec::new(),
        };
        for p in 0..processes {
            let tokens = users_of(plan.users(), p * threads, (p + 1) * threads, count)
                .map(|u| {
                    let claims = token::claims_for(&plan.user_name(u), 1, now_s, TOKEN_TTL_S);
                    (u, token::mint(secret, &claims))
                })
                .collect();
            let start = ToWorker::Start {
                config: Box::new(config.clone()),
                run_id: plan.run_id,
                process: p,
                processes,
                tokens,
            };
            let line = serde_json::to_string(&start).map_err(|e| e.to_string())?;
            let (child, stdin, stdout) = spawn_child(exe, "worker", &line)
                .map_err(|e| format!("worker process {p}: {e}"))?;
            fleet.children.add(child, stdin);
            let events = events.clone();
            let first = (p * threads) as usize;
            let reader = std::thread::Builder::new()
                .name(format!("loadgen-pipe{p}"))
                .spawn(move || relay(BufReader::new(stdout), first, threads as usize, &events))
                .map_err(|e| format!("cannot start a pipe reader: {e}"))?;
            fleet.readers.push(reader);
        }
        Ok(fleet)
    }

    /// Sends `msg` to every child still listening.
    pub fn send(&mut self, msg: &ToWorker) {
        if let Ok(line) = serde_json::to_string(msg) {
            self.children.send_line(&line);
        }
    }

    /// Closes the children's stdin and waits for them (killing any still
    /// running after `grace`).
    pub fn stop(mut self, grace: Duration) {
        self.children.wait(grace);
        for r in self.readers {
            let _ = r.join();
        }
    }
}

/// Starts `exe subcommand` with piped stdin and stdout (stderr inherited)
/// and writes `first` to it as its first line. `loadgen peer` starts its
/// worker processes with it too.
pub(crate) fn spawn_child(
    exe: &Path,
    subcommand: &str,
    first: &str,
) -> Result<(Child, ChildStdin, ChildStdout), String> {
    let mut child = Command::new(exe)
        .arg(subcommand)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {} {subcommand}: {e}", exe.display()))?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("worker process without pipes".into());
    };
    if let Err(e) = writeln!(stdin, "{first}").and_then(|()| stdin.flush()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("cannot send its start: {e}"));
    }
    Ok((child, stdin, stdout))
}

/// Turns a child's lines into worker events until its stdout closes.
fn relay(out: impl BufRead, first: usize, threads: usize, events: &Sender<WorkerEvent>) {
    let mut done = 0;
    for line in out.lines() {
        let Ok(line) = line else { break };
        let event = match serde_json::from_str::<FromWorker>(&line) {
            Ok(msg) => into_event(msg),
            Err(e) => Err(format!("undecodable line from worker process: {e}")),
        };
        let event = event.unwrap_or_else(|error| WorkerEvent::Failed {
            worker: first,
            error,
        });
        if matches!(event, WorkerEvent::Done { .. } | WorkerEvent::Failed { .. }) {
            done += 1;
        }
        if events.send(event).is_err() {
            return;
        }
    }
    if done < threads {
        let _ = events.send(WorkerEvent::Failed {
            worker: first,
            error: "its worker process ended before handing over its outcome (see its stderr)"
                .into(),
        });
    }
}

fn into_event(msg: FromWorker) -> Result<WorkerEvent, String> {
    Ok(match msg {
        FromWorker::Progress {
            worker,
            counters,
            errors,
            interval,
        } => WorkerEvent::Progress {
            worker,
            counters,
            errors,
            interval: Box::new(Latencies::decode(&interval)?),
        },
        FromWorker::Done {
            worker,
            counters,
            errors,
            latencies,
            tally,
            driver,
        } => WorkerEvent::Done {
            worker,
            outcome: Box::new(Outcome {
                counters,
                errors,
                latencies: Latencies::decode(&latencies)?,
                tally,
                driver: match driver.as_str() {
                    "io_uring" => "io_uring",
                    "legacy" => "legacy",
                    _ => "mixed",
                },
            }),
        },
        FromWorker::Failed { worker, error } => WorkerEvent::Failed { worker, error },
    })
}

// ---- the child's side ----

/// `loadgen worker`: runs one worker process's share of a run, driven over
/// stdin and stdout by its parent. Not meant to be started by hand.
pub fn worker_process() -> ExitCode {
    let mut first = String::new();
    let _ = std::io::stdin().read_line(&mut first);
    let (config, run_id, process, processes, tokens) = match serde_json::from_str(&first) {
        Ok(ToWorker::Start {
            config,
            run_id,
            process,
            processes,
            tokens,
        }) => (config, run_id, process, processes, tokens),
        Ok(_) | Err(_) => {
            eprintln!("loadgen worker: expected a start line from the parent loadgen on stdin");
            return ExitCode::from(2);
        }
    };
    let plan = match Plan::new(&config.plan_params(run_id)) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("loadgen worker: {e}");
            return ExitCode::from(2);
        }
    };
    let threads = config.threads as u32;
    let config = Arc::new(*config);
    let tokens: Arc<FxHashMap<u32, String>> = Arc::new(tokens.into_iter().collect());
    let control = Arc::new(Control::default());
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for t in 0..threads {
        let setup = WorkerSetup {
            index: process * threads + t,
            count: processes * threads,
            plan: plan.clone(),
            config: config.clone(),
            tokens: Tokens::Minted(tokens.clone()),
            control: control.clone(),
            events: tx.clone(),
        };
        match std::thread::Builder::new()
            .name(format!("loadgen-w{}", setup.index))
            .spawn(move || run_worker(setup))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                let _ = tx.send(WorkerEvent::Failed {
                    worker: (process * threads + t) as usize,
                    error: format!("could not start a worker thread: {e}"),
                });
            }
        }
    }
    drop(tx);
    drop(tokens);

    // Control lines from the parent; its end of the pipe closing means it
    // is gone, and the run is over.
    let steer = control.clone();
    let _ = std::thread::Builder::new()
        .name("loadgen-ctl".into())
        .spawn(move || {
            for line in std::io::stdin().lines() {
                match line.ok().and_then(|l| serde_json::from_str(&l).ok()) {
                    Some(ToWorker::Groups) => steer.advance(Phase::Groups),
                    Some(ToWorker::Traffic { t0_unix_ns }) => {
                        steer.start_traffic(instant_of(t0_unix_ns));
                    }
                    Some(ToWorker::Finish) | None => break,
                    Some(ToWorker::Start { .. }) => {}
                }
            }
            steer.advance(Phase::Finish);
        });

    let mut out = std::io::stdout().lock();
    for event in rx {
        let msg = match event {
            WorkerEvent::Progress {
                worker,
                counters,
                errors,
                interval,
            } => FromWorker::Progress {
                worker,
                counters,
                errors,
                interval: interval.encode(),
            },
            WorkerEvent::Done { worker, outcome } => FromWorker::Done {
                worker,
                counters: outcome.counters,
                errors: outcome.errors,
                latencies: outcome.latencies.encode(),
                tally: outcome.tally,
                driver: outcome.driver.to_owned(),
            },
            WorkerEvent::Failed { worker, error } => FromWorker::Failed { worker, error },
        };
        let written = serde_json::to_string(&msg)
            .map_err(std::io::Error::other)
            .and_then(|line| writeln!(out, "{line}"))
            .and_then(|()| out.flush());
        if written.is_err() {
            // Nobody reads any more: finish the run and stop.
            control.advance(Phase::Finish);
        }
    }
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_split_over_processes_like_over_threads() {
        // 2 processes of 3 threads: process 1 holds global workers 3..6.
        let of_p1: Vec<u32> = users_of(20, 3, 6, 6).collect();
        assert_eq!(of_p1, vec![3, 4, 5, 9, 10, 11, 15, 16, 17]);
        let all: usize = (0..2)
            .map(|p| users_of(20, p * 3, p * 3 + 3, 6).count())
            .sum();
        assert_eq!(all, 20);
    }

    #[test]
    fn wall_clock_instants_round_trip() {
        let later = instant_of(unix_ns() + 500_000_000);
        let ahead = later.saturating_duration_since(Instant::now());
        assert!(ahead > Duration::from_millis(400) && ahead <= Duration::from_millis(500));
        let _ = instant_of(0); // long past: clamps, does not panic
    }
}
