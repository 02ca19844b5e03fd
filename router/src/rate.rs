//! Per-user send rate limits: token buckets refilled by the clock passed in.

/// One user's bucket. Created full on the user's first send; dropped by the
/// router's periodic sweep once it has refilled (an idle user costs nothing).
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    at_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn full(burst: f64, now_ms: u64) -> Self {
        Self {
            tokens: burst,
            at_ms: now_ms,
        }
    }

    /// Takes one token, or says in how many milliseconds one will be there.
    pub fn take(&mut self, now_ms: u64, rate_per_s: f64, burst: f64) -> Result<(), u64> {
        self.refill(now_ms, rate_per_s, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - self.tokens) / rate_per_s) * 1000.0).ceil() as u64)
        }
    }

    /// Gives back a token taken for a send that did not happen.
    pub fn refund(&mut self, burst: f64) {
        self.tokens = (self.tokens + 1.0).min(burst);
    }

    /// True when the bucket is full again at `now_ms`.
    pub fn is_full(&mut self, now_ms: u64, rate_per_s: f64, burst: f64) -> bool {
        self.refill(now_ms, rate_per_s, burst);
        self.tokens >= burst
    }

    fn refill(&mut self, now_ms: u64, rate_per_s: f64, burst: f64) {
        // A clock that steps back moves the mark back with it: the bucket
        // refills from the new time on. Keeping the old mark instead would
        // refill nothing until the clock caught up with it, so a user who
        // had emptied the bucket would be refused for as long as the step
        // (an hour for a step of an hour), each refusal naming a retry
        // time that is wrong. The cost: a clock that steps back and then
        // forward again counts the time in between twice, which refills at
        // most one burst.
        if now_ms > self.at_ms {
            let elapsed_s = (now_ms - self.at_ms) as f64 / 1000.0;
            self.tokens = (self.tokens + elapsed_s * rate_per_s).min(burst);
        }
        self.at_ms = now_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let mut b = TokenBucket::full(3.0, 0);
        for _ in 0..3 {
            assert_eq!(b.take(0, 10.0, 3.0), Ok(()));
        }
        assert_eq!(b.take(0, 10.0, 3.0), Err(100));
        assert_eq!(b.take(50, 10.0, 3.0), Err(50));
        assert_eq!(b.take(100, 10.0, 3.0), Ok(()));
        assert!(!b.is_full(100, 10.0, 3.0));
        assert!(b.is_full(400, 10.0, 3.0));
    }

    #[test]
    fn a_clock_stepped_back_refills_from_the_new_time() {
        // Emptied at t = 1 h; the wall clock then steps back to t = 0.
        let hour = 3_600_000;
        let mut b = TokenBucket::full(3.0, hour);
        for _ in 0..3 {
            assert_eq!(b.take(hour, 10.0, 3.0), Ok(()));
        }
        assert_eq!(b.take(0, 10.0, 3.0), Err(100));
        // 100 ms after the step one token is back, as it would be without
        // the step (it used to take an hour).
        assert_eq!(b.take(100, 10.0, 3.0), Ok(()));
        assert_eq!(b.take(100, 10.0, 3.0), Err(100));
        assert!(b.is_full(400, 10.0, 3.0));
    }
}
