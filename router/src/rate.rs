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
        // A clock that steps back refills nothing until it passes `at_ms`.
        if now_ms > self.at_ms {
            let elapsed_s = (now_ms - self.at_ms) as f64 / 1000.0;
            self.tokens = (self.tokens + elapsed_s * rate_per_s).min(burst);
            self.at_ms = now_ms;
        }
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
}
