//! Rate-limited warnings for per-connection trouble.
//!
//! A flood of bad clients must not become a flood of log lines: each kind of
//! trouble on a core logs at most one warning per [`EVERY`], and that line
//! says how many like it were held back since the last one. The metrics
//! count every occurrence; the log only points an operator at them.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The shortest gap between two warnings of one kind on one core.
pub const EVERY: Duration = Duration::from_secs(10);

/// One kind of warning on one core (not `Sync`: a core's own state).
#[derive(Debug, Default)]
pub struct Throttle {
    last: Cell<Option<Instant>>,
    held: Cell<u64>,
}

impl Throttle {
    /// `Some(held back)` when a warning may be logged now, counting the
    /// ones held back since the last; `None` (and one more held back)
    /// otherwise.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        match self.last.get() {
            Some(t) if now.duration_since(t) < EVERY => {
                self.held.set(self.held.get() + 1);
                None
            }
            _ => {
                self.last.set(Some(now));
                Some(self.held.replace(0))
            }
        }
    }
}

/// The throttled warnings of one core.
#[derive(Debug, Default)]
pub struct Warnings {
    /// `accept(2)` failed.
    pub accept: Throttle,
    /// An upgrade was refused (bad request, bad token, full node).
    pub upgrade: Throttle,
    /// A session was closed as a slow consumer.
    pub slow_consumer: Throttle,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_window_counts_the_rest() {
        let t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.admit(start), Some(0));
        for i in 1..=1000 {
            assert_eq!(t.admit(start + Duration::from_millis(i)), None);
        }
        assert_eq!(t.admit(start + EVERY), Some(1000));
        assert_eq!(t.admit(start + EVERY), None);
        assert_eq!(t.admit(start + EVERY * 3), Some(1));
    }
}
