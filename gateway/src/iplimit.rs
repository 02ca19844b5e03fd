//! Per-IP limits: concurrent sessions and new connections per second from
//! one address, shared by every core of the process.
//!
//! One mutex-guarded map, touched twice per connection (when it is accepted
//! and when it ends), never per message; an address is in the map only
//! while it has a connection or a bucket that has not refilled, so an idle
//! node holds nothing. Nothing is stored per session: the session's end
//! looks its address up again from the socket.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use rustc_hash::FxHashMap;

/// Addresses beyond which refilled, unconnected entries are swept.
const SWEEP_ABOVE: usize = 65_536;

/// The limits and what each address uses of them.
#[derive(Debug)]
pub struct IpLimits {
    /// Most concurrent connections (upgrading or open) per address; 0: none.
    max_connections: u32,
    /// New connections per second per address, and the burst; 0: none.
    rate_per_s: f64,
    burst: f64,
    table: Mutex<FxHashMap<IpAddr, Entry>>,
}

#[derive(Debug)]
struct Entry {
    connections: u32,
    tokens: f64,
    at: Instant,
}

/// Why an address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It already has `max_connections`.
    TooMany,
    /// It connects faster than the rate.
    TooFast,
}

impl IpLimits {
    /// `None` when both limits are off.
    pub fn new(max_connections: u32, rate_per_s: f64, burst: f64) -> Option<Self> {
        (max_connections > 0 || rate_per_s > 0.0).then(|| Self {
            max_connections,
            rate_per_s,
            burst: burst.max(1.0),
            table: Mutex::new(FxHashMap::default()),
        })
    }

    /// Counts a new connection from `ip`, or refuses it. Each admitted
    /// connection must be [`release`](Self::release)d once when it ends.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refused> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() > SWEEP_ABOVE {
            let (rate, burst) = (self.rate_per_s, self.burst);
            table.retain(|_, e| e.connections > 0 || refilled(e, now, rate) < burst);
        }
        let e = table.entry(ip).or_insert(Entry {
            connections: 0,
            tokens: self.burst,
            at: now,
        });
        if self.max_connections > 0 && e.connections >= self.max_connections {
            return Err(Refused::TooMany);
        }
        if self.rate_per_s > 0.0 {
            e.tokens = refilled(e, now, self.rate_per_s).min(self.burst);
            e.at = now;
            if e.tokens < 1.0 {
                return Err(Refused::TooFast);
            }
            e.tokens -= 1.0;
        }
        e.connections += 1;
        Ok(())
    }

    /// A connection admitted from `ip` ended.
    pub fn release(&self, ip: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = table.get_mut(&ip) {
            e.connections = e.connections.saturating_sub(1);
            if e.connections == 0 && self.rate_per_s == 0.0 {
                table.remove(&ip);
            }
        }
    }

    /// Connections counted now for `ip` (tests, admin).
    pub fn connections(&self, ip: IpAddr) -> u32 {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.get(&ip).map_or(0, |e| e.connections)
    }
}

fn refilled(e: &Entry, now: Instant, rate: f64) -> f64 {
    e.tokens + now.saturating_duration_since(e.at).as_secs_f64() * rate
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn concurrent_limit_counts_until_released() {
        let l = IpLimits::new(2, 0.0, 0.0).unwrap();
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        assert_eq!(l.admit(a, now), Ok(()));
        assert_eq!(l.admit(a, now), Ok(()));
        assert_eq!(l.admit(a, now), Err(Refused::TooMany));
        assert_eq!(l.admit(b, now), Ok(()), "another address is not affected");
        l.release(a);
        assert_eq!(l.admit(a, now), Ok(()));
        assert_eq!(l.connections(a), 2);
    }

    #[test]
    fn rate_limit_refills() {
        let l = IpLimits::new(0, 10.0, 3.0).unwrap();
        let a: IpAddr = "::1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit(a, t0), Ok(()));
        }
        assert_eq!(l.admit(a, t0), Err(Refused::TooFast));
        assert_eq!(l.admit(a, t0 + Duration::from_millis(100)), Ok(()));
        assert!(
            IpLimits::new(0, 0.0, 0.0).is_none(),
            "both off: no table at all"
        );
    }
}
