//! Courier's load generator.
//!
//! loadgen opens many real WebSocket connections to a Courier gateway, one
//! user (device 1) each, authenticated with tokens it signs with the node's
//! own secret. It creates groups, drives 1:1 and group messages on an
//! open-loop schedule, and checks per recipient device that every message
//! the server acknowledged with SENT arrived exactly once and in sequence
//! order. Latencies (SENT ack, end to end) go into HDR histograms timed
//! from each message's *intended* send time, so a stalled server cannot
//! hide behind a stalled generator.
//!
//! ```text
//!            Config ─► Plan (users, conversations, groups, schedule: pure)
//!                          │
//!      coordinator ── Control ──► worker 0 … worker n-1   (monoio threads)
//!            ▲                       │  connections, sends, checks
//!            └── WorkerEvent ────────┘  progress every 250 ms, Outcome at end
//!            │
//!            ▼
//!      merge Outcomes ─► audit (lost / unknown outcome) ─► Report
//! ```
//!
//! The plan and schedule are computed from the seed alone, so every worker
//! knows who sends what without being told, and a recipient can check that
//! a message it received is one its sender really sent. Worker outcomes are
//! plain values that merge by addition, so the same workers also run in
//! worker processes (`loadgen worker`, over a pipe; see `procs`) when one
//! process may not hold every socket, and the audit in the parent stays
//! exact across them.
//!
//! Around the run: scenario files of phases (`scenario`), thresholds
//! judged against the report (`threshold`), gateway and kernel
//! measurements (`probe`), the fleet sizing they feed (`sizing`, also
//! `loadgen size`), and an HTML report with percentile plots (`html`).
//! `loadgen peer` (`peer`) makes the idle-memory and fan-out measurements
//! against Courier and against other servers (NATS, MQTT, XMPP) in their
//! own protocols, for comparison in one run.
//!
//! What it does not do (yet): TLS, typing or presence, receipt latency. It
//! only targets loopback addresses.
//!
//! Use [`run`] with a [`Config`] to drive a run from code; the `loadgen`
//! binary is a thin wrapper around it.

#![forbid(unsafe_code)]

pub mod body;
pub mod check;
pub mod config;
mod conn;
pub mod control;
pub mod handshake;
pub mod html;
pub mod latency;
mod pacer;
pub mod peer;
pub mod plan;
pub mod probe;
mod procs;
pub mod push;
pub mod rangeset;
pub mod report;
pub mod rng;
mod run;
pub mod scenario;
pub mod sizing;
pub mod stats;
pub mod threshold;
mod worker;

pub use config::{Args, Config, ConfigError};
pub use procs::worker_process;
pub use report::Report;
pub use run::{run, RunError};
