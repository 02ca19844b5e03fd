//! Counters a worker keeps, summed across workers.

use std::collections::BTreeMap;
use std::ops::AddAssign;

use serde::{Deserialize, Serialize};

/// Event counts of one worker. Gauges (`connections_up`, `pending`,
/// `groups_missing`) are current values; everything else only grows.
/// Summing two workers' counters gives the counters of both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Connections upgraded, authenticated and through their first catch-up
    /// right now.
    pub connections_up: u64,
    /// Successful WebSocket upgrades, reconnects included.
    pub connects: u64,
    /// Upgrades after the first one of a connection.
    pub reconnects: u64,
    /// Sessions that ended before the run did.
    pub disconnects: u64,
    /// Distinct messages handed to a connection.
    pub sent: u64,
    /// Transmissions after the first (after a reconnect or a retryable error).
    pub resent: u64,
    /// Distinct messages whose SENT arrived.
    pub acked: u64,
    /// SENTs for a message already acked or not outstanding.
    pub repeated_acks: u64,
    /// Messages refused with a non-retryable error.
    pub send_failed: u64,
    /// Messages whose group id was never learned, so they were not sent.
    pub skipped: u64,
    /// Messages sent and neither acked nor refused yet.
    pub pending: u64,
    /// Deliveries the acked messages owe (recipients per message), summed.
    pub expected: u64,
    /// First arrivals of messages at a recipient device.
    pub delivered: u64,
    /// Arrivals of something the device already had.
    pub duplicates: u64,
    /// First arrivals below a sequence already received.
    pub reordered: u64,
    /// Catch-up resends above the device's cursor (expected, benign).
    pub redelivered: u64,
    /// Deliveries that were never sent: wrong body, sender, conversation or
    /// recipient.
    pub invalid: u64,
    /// The sender's own device got its message back.
    pub own_echoes: u64,
    /// Membership entries received (group creations).
    pub membership_entries: u64,
    /// Groups this worker created.
    pub groups_created: u64,
    /// Groups with a member here whose id is not known here yet.
    pub groups_missing: u64,
    /// Errors of every kind (the by-kind map is in [`Errors`]).
    pub errors: u64,
    /// Workers that finished their schedule (1 per worker once done).
    pub shards_done_sending: u64,
    /// Sessions loadgen closed on purpose to reconnect (churn).
    pub churned: u64,
    /// `Read` receipts sent.
    pub reads_sent: u64,
    /// `Receipt` frames received (the other side of a direct conversation
    /// moved its cursor).
    pub receipts_received: u64,
    /// Live receipts that did not move what the device knew (the same
    /// state change told twice, or a cursor going back).
    pub receipt_duplicates: u64,
    /// Own acked direct messages that need a delivered receipt, and those
    /// a receipt (live or in a catch-up summary) covered.
    pub receipts_expected: u64,
    pub receipts_covered: u64,
    /// Typing frames sent, and typing events received.
    pub typing_sent: u64,
    pub typing_received: u64,
}

impl AddAssign<&Counters> for Counters {
    fn add_assign(&mut self, o: &Counters) {
        self.connections_up += o.connections_up;
        self.connects += o.connects;
        self.reconnects += o.reconnects;
        self.disconnects += o.disconnects;
        self.sent += o.sent;
        self.resent += o.resent;
        self.acked += o.acked;
        self.repeated_acks += o.repeated_acks;
        self.send_failed += o.send_failed;
        self.skipped += o.skipped;
        self.pending += o.pending;
        self.expected += o.expected;
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.redelivered += o.redelivered;
        self.invalid += o.invalid;
        self.own_echoes += o.own_echoes;
        self.membership_entries += o.membership_entries;
        self.groups_created += o.groups_created;
        self.groups_missing += o.groups_missing;
        self.errors += o.errors;
        self.shards_done_sending += o.shards_done_sending;
        self.churned += o.churned;
        self.reads_sent += o.reads_sent;
        self.receipts_received += o.receipts_received;
        self.receipt_duplicates += o.receipt_duplicates;
        self.receipts_expected += o.receipts_expected;
        self.receipts_covered += o.receipts_covered;
        self.typing_sent += o.typing_sent;
        self.typing_received += o.typing_received;
    }
}

/// Errors by kind, e.g. `connect.refused`, `close.4003`, `error.rate_limited`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    /// Counts one error of `kind`.
    pub fn add(&mut self, kind: &str) {
        match self.0.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.0.insert(kind.to_owned(), 1);
            }
        }
    }

    /// Adds another worker's errors.
    pub fn merge(&mut self, other: &Errors) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// Errors of every kind.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_errors_sum() {
        let mut a = Counters {
            sent: 3,
            delivered: 10,
            connections_up: 2,
            ..Counters::default()
        };
        let b = Counters {
            sent: 4,
            delivered: 1,
            connections_up: 5,
            ..Counters::default()
        };
        a += &b;
        assert_eq!((a.sent, a.delivered, a.connections_up), (7, 11, 7));
        let mut e = Errors::default();
        e.add("close.4003");
        e.add("close.4003");
        let mut f = Errors::default();
        f.add("connect.refused");
        f.add("close.4003");
        e.merge(&f);
        assert_eq!(e.0.get("close.4003"), Some(&3));
        assert_eq!(e.total(), 4);
    }
}
