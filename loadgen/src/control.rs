//! What the coordinator and the workers tell each other.
//!
//! ```text
//!   coordinator ── Control (phase, traffic start) ──► worker 0..n
//!   coordinator ◄── WorkerEvent (progress, outcome) ── worker 0..n
//! ```
//!
//! Workers are runtime threads of this process today. Everything that
//! crosses this seam is either an atomic phase or a plain value (counters,
//! histograms, a [`Tally`]) that merges by addition, so the same seam can
//! later run over a pipe to worker processes.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use crate::check::Tally;
use crate::latency::Latencies;
use crate::stats::{Counters, Errors};

/// The phases of a run, in order. Workers only ever move forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Open connections (ramped) and catch each up once.
    Connect = 0,
    /// Creators send `GroupCreate`; members learn the groups' ids.
    Groups = 1,
    /// Run the schedule from the traffic start.
    Traffic = 2,
    /// Close connections and hand over the outcome.
    Finish = 3,
}

/// The coordinator's side of the seam.
#[derive(Debug)]
pub struct Control {
    phase: AtomicU8,
    /// The traffic start: message `i` is due at `t0 + i / rate`. Set once,
    /// before the phase becomes `Traffic`.
    t0: OnceLock<Instant>,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Connect as u8),
            t0: OnceLock::new(),
        }
    }
}

impl Control {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Connect,
            1 => Phase::Groups,
            2 => Phase::Traffic,
            _ => Phase::Finish,
        }
    }

    /// Moves to `phase` (never backwards).
    pub fn advance(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
    }

    /// Fixes the traffic start and moves to `Traffic`.
    pub fn start_traffic(&self, t0: Instant) {
        let _ = self.t0.set(t0);
        self.advance(Phase::Traffic);
    }

    /// The traffic start, once set.
    pub fn t0(&self) -> Option<Instant> {
        self.t0.get().copied()
    }
}

/// What a worker reports.
#[derive(Debug)]
pub enum WorkerEvent {
    /// Sent every 250 ms: counters and errors so far, and the latency
    /// samples recorded since the previous progress event.
    Progress {
        /// The worker's index.
        worker: usize,
        /// Counters so far.
        counters: Counters,
        /// Errors so far.
        errors: Errors,
        /// Samples since the last event.
        interval: Box<Latencies>,
    },
    /// The worker's final outcome, sent once after `Finish`.
    Done {
        /// The worker's index.
        worker: usize,
        /// What it saw.
        outcome: Box<Outcome>,
    },
    /// The worker could not run (its runtime failed to start).
    Failed {
        /// The worker's index.
        worker: usize,
        /// Why.
        error: String,
    },
}

/// Everything a worker saw, in mergeable form.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Final counters.
    pub counters: Counters,
    /// Final errors.
    pub errors: Errors,
    /// All latency samples.
    pub latencies: Latencies,
    /// Acks and held sequences for the audit.
    pub tally: Tally,
    /// The I/O driver the worker ran on.
    pub driver: &'static str,
}

impl Outcome {
    /// Folds another worker's outcome into this one.
    pub fn merge(&mut self, other: Outcome) {
        self.counters += &other.counters;
        self.errors.merge(&other.errors);
        self.latencies.merge(&other.latencies);
        self.tally.merge(other.tally);
        if self.driver.is_empty() {
            self.driver = other.driver;
        } else if !other.driver.is_empty() && other.driver != self.driver {
            self.driver = "mixed";
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let c = Control::default();
        assert_eq!(c.phase(), Phase::Connect);
        c.advance(Phase::Groups);
        c.advance(Phase::Connect);
        assert_eq!(c.phase(), Phase::Groups);
        let t0 = Instant::now();
        c.start_traffic(t0);
        assert_eq!((c.phase(), c.t0()), (Phase::Traffic, Some(t0)));
        c.advance(Phase::Finish);
        assert_eq!(c.phase(), Phase::Finish);
    }

    #[test]
    fn outcomes_merge() {
        let mut a = Outcome {
            driver: "io_uring",
            ..Outcome::default()
        };
        a.counters.sent = 2;
        let mut b = Outcome {
            driver: "io_uring",
            ..Outcome::default()
        };
        b.counters.sent = 3;
        b.errors.add("close.4003");
        a.merge(b);
        assert_eq!(
            (a.counters.sent, a.errors.total(), a.driver),
            (5, 1, "io_uring")
        );
        a.merge(Outcome {
            driver: "legacy",
            ..Outcome::default()
        });
        assert_eq!(a.driver, "mixed");
    }
}
