//! Server ids: unique, increasing 64-bit numbers, snowflake style.
//!
//! ```text
//!  63                     22 21        12 11          0
//! ┌─────────────────────────┬────────────┬─────────────┐
//! │ milliseconds since 1970 │ node (10b) │ counter(12b)│
//! └─────────────────────────┴────────────┴─────────────┘
//! ```
//!
//! 42 bits of milliseconds last until the year 2109. Ids never go backwards:
//! a clock that steps back keeps the last millisecond and counts on, and a
//! millisecond that runs out of its 4096 counter values borrows the next
//! one. The highest id issued is stored with every batch that issued one,
//! so a restart with a clock that stepped back still issues larger ids.

/// The highest node number an id can carry.
pub const MAX_NODE_ID: u16 = (1 << 10) - 1;

const COUNTER_BITS: u32 = 12;
const NODE_BITS: u32 = 10;
const COUNTER_MAX: u64 = (1 << COUNTER_BITS) - 1;

/// Issues server ids for one node. Owned by the router thread.
#[derive(Debug)]
pub struct ServerIds {
    node: u64,
    last_ms: u64,
    counter: u64,
    issued: u64,
}

impl ServerIds {
    /// Starts after `high`, the highest id an earlier run issued (0: none).
    pub fn resume(node: u16, high: u64) -> Self {
        Self {
            node: u64::from(node & MAX_NODE_ID),
            last_ms: high >> (COUNTER_BITS + NODE_BITS),
            counter: high & COUNTER_MAX,
            issued: high,
        }
    }

    /// The next id at wall-clock time `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> u64 {
        if now_ms > self.last_ms {
            self.last_ms = now_ms;
            self.counter = 0;
        } else if self.counter < COUNTER_MAX {
            self.counter += 1;
        } else {
            self.last_ms += 1;
            self.counter = 0;
        }
        let id = (self.last_ms << (COUNTER_BITS + NODE_BITS))
            | (self.node << COUNTER_BITS)
            | self.counter;
        // Another node's high-water mark (a node id changed between runs)
        // can sit in the same millisecond with a larger node number; the
        // max keeps "increasing" true for what this node hands out.
        let id = id.max(self.issued + 1);
        self.issued = id;
        id
    }

    /// The highest id issued so far.
    pub fn high(&self) -> u64 {
        self.issued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_even_when_the_clock_steps_back() {
        let mut ids = ServerIds::resume(5, 0);
        let a = ids.next(1_000);
        let b = ids.next(1_000);
        let c = ids.next(900);
        assert!(a < b && b < c);
        assert_eq!(a >> 22, 1_000);
        assert_eq!((a >> 12) & 0x3ff, 5);
        let mut last = c;
        for _ in 0..10_000 {
            let next = ids.next(1_000);
            assert!(next > last);
            last = next;
        }
    }

    #[test]
    fn resume_continues_above_the_high_water_mark() {
        let mut first = ServerIds::resume(1, 0);
        let high = (0..50).map(|_| first.next(5_000)).last().unwrap_or(0);
        let mut second = ServerIds::resume(1, high);
        assert!(
            second.next(4_000) > high,
            "a clock that stepped back across a restart"
        );
        let mut renamed = ServerIds::resume(0, high);
        assert!(
            renamed.next(5_000) > high,
            "a smaller node id in the same millisecond"
        );
    }
}
