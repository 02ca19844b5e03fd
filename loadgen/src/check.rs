//! The delivery checker: per device while the run goes, merged at the end.
//!
//! ```text
//!  sender's shard:     Sent{seq} ──► Ack {conv, seq, msg, sender} ──┐
//!                                                                    ├─► audit()
//!  recipient's shard:  Message{seq} ──► DeviceBook ──► Held sets ───┘
//!                              └─► Arrival: delivered / duplicate /
//!                                  reordered / redelivered
//! ```
//!
//! While the run goes, each device's [`DeviceBook`] classifies every entry
//! it receives. At the end each worker hands over a [`Tally`]: the acks its
//! senders got and the sequences its devices hold. Tallies from any number
//! of workers (threads now, processes later) merge by concatenation, because
//! every ack belongs to one sender and every held set to one device. Then
//! [`audit`] compares the two sides: an acked message missing at a member's
//! device is lost; an entry held somewhere that no sender saw acked, and that
//! is not a membership entry, had an unknown outcome (sent, stored and
//! delivered, but its SENT never reached the sender).

use std::collections::BTreeMap;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::rangeset::RangeSet;

/// How one received entry was judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// First arrival, in order.
    Delivered,
    /// First arrival, but after an entry with a higher sequence (the
    /// conversation's order was broken). It still counts as delivered.
    Reordered,
    /// The device already held this entry, or the same message at another
    /// sequence: the server delivered it twice.
    Duplicate,
    /// A catch-up page resent an entry above the cursor the device asked
    /// from that it already held (its cursor stopped below a hole, such as
    /// its own send whose SENT was lost). Expected; not a duplicate.
    Redelivered,
}

/// One conversation as one device sees it.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Sequences the device holds: received entries and its own acked sends.
    pub held: RangeSet,
    /// Highest sequence received from the server (own sends excluded), for
    /// the order check.
    max_received: u64,
    /// Highest sequence acknowledged with `Delivered` (or `Read`).
    pub acked_upto: u64,
    /// Highest sequence acknowledged with `Read`.
    pub read_upto: u64,
}

/// What one device holds and has seen. Created with the device's
/// connection, lives across its reconnects, handed to the [`Tally`] at
/// the end of the run.
#[derive(Clone, Debug, Default)]
pub struct DeviceBook {
    /// (conversation, ledger); a device is in a handful of conversations.
    convs: Vec<(u32, Ledger)>,
    /// Message indices received, to catch one message stored twice.
    seen: FxHashSet<u64>,
}

impl DeviceBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ledger of `conv`, created empty if needed.
    pub fn ledger(&mut self, conv: u32) -> &mut Ledger {
        let i = match self.convs.iter().position(|(c, _)| *c == conv) {
            Some(i) => i,
            None => {
                self.convs.push((conv, Ledger::default()));
                self.convs.len() - 1
            }
        };
        &mut self.convs[i].1
    }

    /// The ledgers held, by conversation.
    pub fn ledgers(&self) -> impl Iterator<Item = (u32, &Ledger)> {
        self.convs.iter().map(|(c, l)| (*c, l))
    }

    /// Where this device resumes `conv` from: every sequence up to it is held.
    pub fn cursor(&self, conv: u32) -> u64 {
        self.convs
            .iter()
            .find(|(c, _)| *c == conv)
            .map_or(0, |(_, l)| l.held.prefix())
    }

    /// Records the device's own acked send (or a membership entry it made,
    /// such as its group's creation): held, but not an arrival.
    pub fn handle_own(&mut self, conv: u32, seq: u64) {
        self.ledger(conv).held.insert(seq);
    }

    /// Judges an entry received from the server. `msg` names the message
    /// (None for membership entries); `catchup_from` is the cursor the
    /// current catch-up started from, while one is running.
    pub fn handle_entry(
        &mut self,
        conv: u32,
        seq: u64,
        msg: Option<u64>,
        catchup_from: Option<u64>,
    ) -> Arrival {
        let ledger = self.ledger(conv);
        if ledger.held.contains(seq) {
            return match catchup_from {
                Some(from) if seq > from => Arrival::Redelivered,
                _ => Arrival::Duplicate,
            };
        }
        ledger.held.insert(seq);
        let reordered = seq < ledger.max_received;
        ledger.max_received = ledger.max_received.max(seq);
        if let Some(msg) = msg {
            if !self.seen.insert(msg) {
                return Arrival::Duplicate;
            }
        }
        if reordered {
            Arrival::Reordered
        } else {
            Arrival::Delivered
        }
    }
}

/// An acked message as its sender saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ack {
    /// The conversation number.
    pub conv: u32,
    /// The sequence the server gave it.
    pub seq: u64,
    /// The message index.
    pub msg: u64,
    /// The sending user.
    pub sender: u32,
}

/// What one device holds of one conversation at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The device's user (device 1).
    pub user: u32,
    /// The conversation number.
    pub conv: u32,
    /// The sequences held.
    pub seqs: RangeSet,
    /// Highest sequence this device acknowledged with `Read`.
    #[serde(default)]
    pub read_upto: u64,
}

/// What a worker hands over for the audit. Merges by concatenation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Every SENT its senders received (a repeated SENT appears twice).
    pub acks: Vec<Ack>,
    /// What each of its devices holds.
    pub held: Vec<Held>,
    /// Sequences of membership entries (group creation) seen, per conversation.
    pub membership: Vec<(u32, u64)>,
    /// Group ids learned, by conversation number (for readable examples).
    pub group_ids: BTreeMap<u32, String>,
    /// Per (sender user, direct conversation): the highest READ the
    /// sender's device learned of (live or from a catch-up summary).
    #[serde(default)]
    pub reads_known: Vec<(u32, u32, u64)>,
}

impl Tally {
    /// Adds a device's final state.
    pub fn add_book(&mut self, user: u32, book: &DeviceBook) {
        for (conv, ledger) in book.ledgers() {
            self.held.push(Held {
                user,
                conv,
                seqs: ledger.held.clone(),
                read_upto: ledger.read_upto,
            });
        }
    }

    /// Folds another worker's tally into this one.
    pub fn merge(&mut self, other: Tally) {
        self.acks.extend(other.acks);
        self.held.extend(other.held);
        self.membership.extend(other.membership);
        self.group_ids.extend(other.group_ids);
        self.reads_known.extend(other.reads_known);
    }
}

/// One acked message missing at one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LostExample {
    /// The conversation (its id when known, else `#<number>`).
    pub conversation: String,
    /// The sequence missing.
    pub seq: u64,
    /// The message index.
    pub msg: u64,
    /// The device's user that lacks it.
    pub recipient: String,
}

/// What the audit found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Findings {
    /// Distinct messages acked.
    pub acked: u64,
    /// Deliveries the acked messages owed: one per member device but the
    /// sender's.
    pub expected: u64,
    /// Owed deliveries missing at the end.
    pub lost: u64,
    /// Up to [`MAX_EXAMPLES`] of them.
    pub lost_examples: Vec<LostExample>,
    /// Message entries held by some device whose SENT no sender saw.
    pub unknown_outcome: u64,
    /// Messages acked at two different sequences (the server stored a retry
    /// as a new message instead of deduplicating it).
    pub dedupe_mismatches: u64,
    /// Repeated SENTs for the same message and sequence (harmless).
    pub repeated_acks: u64,
    /// Acked direct messages their recipient marked read whose sender never
    /// learned of the read.
    pub reads_missing: u64,
}

/// How many lost deliveries the findings list by name.
pub const MAX_EXAMPLES: usize = 10;

/// Compares what senders saw acked with what devices hold.
pub fn audit(plan: &Plan, tally: &Tally) -> Findings {
    let mut f = Findings::default();

    // One ack per (conversation, sequence); the same message at two
    // sequences is a dedupe failure.
    let mut acks = tally.acks.clone();
    acks.sort_unstable();
    let before = acks.len();
    acks.dedup_by_key(|a| (a.conv, a.seq));
    f.repeated_acks = (before - acks.len()) as u64;
    let mut seq_of_msg: FxHashMap<u64, u64> = FxHashMap::default();
    for a in &acks {
        if let Some(&seq) = seq_of_msg.get(&a.msg) {
            if seq != a.seq {
                f.dedupe_mismatches += 1;
            }
        } else {
            seq_of_msg.insert(a.msg, a.seq);
        }
    }
    f.acked = seq_of_msg.len() as u64;

    let held: FxHashMap<(u32, u32), &RangeSet> = tally
        .held
        .iter()
        .map(|h| ((h.user, h.conv), &h.seqs))
        .collect();
    let empty = RangeSet::new();
    let conv_name = |conv: u32| match plan.conv_group(conv) {
        Some(_) => tally
            .group_ids
            .get(&conv)
            .cloned()
            .unwrap_or_else(|| format!("#{conv}")),
        None => plan.direct_id(conv),
    };

    // Every acked message must be held by every member but its sender.
    for a in &acks {
        for &m in plan.members(a.conv).as_slice() {
            if m == a.sender {
                continue;
            }
            f.expected += 1;
            if !held
                .get(&(m, a.conv))
                .copied()
                .unwrap_or(&empty)
                .contains(a.seq)
            {
                f.lost += 1;
                if f.lost_examples.len() < MAX_EXAMPLES {
                    f.lost_examples.push(LostExample {
                        conversation: conv_name(a.conv),
                        seq: a.seq,
                        msg: a.msg,
                        recipient: plan.user_name(m),
                    });
                }
            }
        }
    }

    // Entries held somewhere that no ack and no membership change explains.
    let mut union: FxHashMap<u32, RangeSet> = FxHashMap::default();
    for h in &tally.held {
        union.entry(h.conv).or_default().union(&h.seqs);
    }
    let mut known: FxHashMap<u32, FxHashSet<u64>> = FxHashMap::default();
    for a in &acks {
        known.entry(a.conv).or_default().insert(a.seq);
    }
    for &(conv, seq) in &tally.membership {
        known.entry(conv).or_default().insert(seq);
    }
    for (conv, seqs) in &union {
        let known = known.get(conv);
        for &(start, end) in seqs.ranges() {
            for seq in start..=end {
                if !known.is_some_and(|k| k.contains(&seq)) {
                    f.unknown_outcome += 1;
                }
            }
        }
    }

    // Every READ a recipient made of a direct message reached its sender.
    let reads_known: FxHashMap<(u32, u32), u64> = tally
        .reads_known
        .iter()
        .map(|&(user, conv, upto)| ((user, conv), upto))
        .collect();
    let read_upto: FxHashMap<(u32, u32), u64> = tally
        .held
        .iter()
        .map(|h| ((h.user, h.conv), h.read_upto))
        .collect();
    for a in &acks {
        if plan.conv_group(a.conv).is_some() {
            continue;
        }
        let (x, y) = plan.direct_pair(a.conv);
        let recipient = if a.sender == x { y } else { x };
        let read = read_upto.get(&(recipient, a.conv)).copied().unwrap_or(0);
        let known = reads_known.get(&(a.sender, a.conv)).copied().unwrap_or(0);
        if read >= a.seq && known < a.seq {
            f.reads_missing += 1;
        }
    }
    f
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::plan::PlanParams;

    #[test]
    fn in_order_entries_are_delivered() {
        let mut b = DeviceBook::new();
        assert_eq!(b.handle_entry(0, 1, Some(10), None), Arrival::Delivered);
        b.handle_own(0, 2);
        assert_eq!(b.handle_entry(0, 3, Some(11), None), Arrival::Delivered);
        assert_eq!(b.cursor(0), 3);
        assert_eq!(b.cursor(9), 0);
    }

    #[test]
    fn a_repeat_is_a_duplicate_outside_catch_up() {
        let mut b = DeviceBook::new();
        b.handle_entry(0, 1, Some(10), None);
        assert_eq!(b.handle_entry(0, 1, Some(10), None), Arrival::Duplicate);
        // The same message at a new sequence: stored twice by the server.
        assert_eq!(b.handle_entry(0, 2, Some(10), None), Arrival::Duplicate);
    }

    #[test]
    fn a_late_lower_sequence_is_reordered() {
        let mut b = DeviceBook::new();
        b.handle_entry(0, 1, Some(1), None);
        b.handle_entry(0, 3, Some(3), None);
        assert_eq!(b.handle_entry(0, 2, Some(2), None), Arrival::Reordered);
        assert_eq!(b.cursor(0), 3);
        // Own sends are not arrivals: a received 4 after own 5 is in order.
        b.handle_own(0, 5);
        assert_eq!(b.handle_entry(0, 4, Some(4), None), Arrival::Delivered);
    }

    #[test]
    fn catch_up_above_the_cursor_is_a_redelivery() {
        let mut b = DeviceBook::new();
        // Holds 1..3 and 5 (4 was its own send, SENT lost in a crash).
        for (seq, msg) in [(1, 1), (2, 2), (3, 3), (5, 5)] {
            b.handle_entry(0, seq, Some(msg), None);
        }
        let from = b.cursor(0);
        assert_eq!(from, 3);
        assert_eq!(
            b.handle_entry(0, 5, Some(5), Some(from)),
            Arrival::Redelivered
        );
        assert_eq!(
            b.handle_entry(0, 3, Some(3), Some(from)),
            Arrival::Duplicate,
            "at or below the cursor"
        );
        assert_eq!(
            b.handle_entry(0, 6, Some(6), Some(from)),
            Arrival::Delivered
        );
    }

    fn plan(users: u32) -> Plan {
        Plan::new(&PlanParams {
            run_id: 1,
            seed: 7,
            users,
            groups: Some(1),
            group_min: 3,
            group_max: 3,
            group_mean: 3.0,
            group_share: 0.5,
            rate: 10.0,
            duration: Duration::from_secs(1),
            phases: Vec::new(),
            body: crate::plan::BodySizes::fixed(200),
        })
        .unwrap()
    }

    fn held(user: u32, conv: u32, seqs: &[u64]) -> Held {
        let mut s = RangeSet::new();
        for &q in seqs {
            s.insert(q);
        }
        Held {
            user,
            conv,
            seqs: s,
            read_upto: 0,
        }
    }

    #[test]
    fn audit_finds_loss_unknown_outcome_and_dedupe_failures() {
        let p = plan(4); // directs 0..4 (ring), group conv 4
        let g = p.group_conv(0);
        let members = p.group_members(0).to_vec();
        let (a, b) = p.direct_pair(0);
        let mut t = Tally::default();
        // Direct 0: a sent 1 and 2 (acked); b holds only 1.
        t.acks.push(Ack {
            conv: 0,
            seq: 1,
            msg: 100,
            sender: a,
        });
        t.acks.push(Ack {
            conv: 0,
            seq: 2,
            msg: 101,
            sender: a,
        });
        t.acks.push(Ack {
            conv: 0,
            seq: 2,
            msg: 101,
            sender: a,
        }); // repeated SENT
        t.held.push(held(a, 0, &[1, 2]));
        t.held.push(held(b, 0, &[1, 3])); // 3: delivered, SENT never seen
                                          // Group: creation entry 1, message at 2 acked to members[0], and the
                                          // same message again at 3 (a retry stored twice).
        t.membership.push((g, 1));
        t.acks.push(Ack {
            conv: g,
            seq: 2,
            msg: 200,
            sender: members[0],
        });
        t.acks.push(Ack {
            conv: g,
            seq: 3,
            msg: 200,
            sender: members[0],
        });
        for &m in &members {
            t.held.push(held(m, g, &[1, 2, 3]));
        }
        let f = audit(&p, &t);
        assert_eq!(f.lost, 1);
        assert_eq!(f.lost_examples[0].seq, 2);
        assert_eq!(f.lost_examples[0].recipient, p.user_name(b));
        assert_eq!(f.unknown_outcome, 1);
        assert_eq!(f.dedupe_mismatches, 1);
        assert_eq!(f.repeated_acks, 1);
        assert_eq!(f.acked, 3);
        assert_eq!(f.expected, 2 + 2 * 2);
    }

    #[test]
    fn audit_finds_reads_the_sender_never_learned_of() {
        let p = plan(4);
        let (a, b) = p.direct_pair(0);
        let mut t = Tally::default();
        for seq in 1..=3 {
            t.acks.push(Ack {
                conv: 0,
                seq,
                msg: 100 + seq,
                sender: a,
            });
        }
        t.held.push(held(a, 0, &[1, 2, 3]));
        let mut bh = held(b, 0, &[1, 2, 3]);
        bh.read_upto = 3; // b read all three...
        t.held.push(bh);
        t.reads_known.push((a, 0, 1)); // ...a learned of a read up to 1
        assert_eq!(audit(&p, &t).reads_missing, 2);
        t.reads_known.push((a, 0, 3));
        t.reads_known.retain(|r| r.2 == 3);
        assert_eq!(audit(&p, &t).reads_missing, 0);
    }

    #[test]
    fn tallies_merge_to_the_same_audit_as_one_worker() {
        let p = plan(6);
        let mut whole = Tally::default();
        let mut parts = [Tally::default(), Tally::default()];
        for i in 0..40u64 {
            let m = p.message(i);
            let ack = Ack {
                conv: m.conv,
                seq: i + 1,
                msg: i,
                sender: m.sender,
            };
            whole.acks.push(ack);
            parts[(m.sender % 2) as usize].acks.push(ack);
        }
        for user in 0..p.users() {
            for &conv in p.user_conversations(user) {
                // Hold everything but sequence 7 of every conversation.
                let seqs: Vec<u64> = (1..=40).filter(|&s| s != 7).collect();
                whole.held.push(held(user, conv, &seqs));
                parts[(user % 2) as usize]
                    .held
                    .push(held(user, conv, &seqs));
            }
        }
        let [first, second] = parts;
        let mut merged = first;
        merged.merge(second);
        let a = audit(&p, &whole);
        let b = audit(&p, &merged);
        assert_eq!(a, b);
        assert!(a.lost > 0, "sequence 7 is missing wherever it was acked");
        // The merge also survives a trip through JSON, as it will between
        // worker processes.
        let json = serde_json::to_string(&merged).unwrap();
        let back: Tally = serde_json::from_str(&json).unwrap();
        assert_eq!(audit(&p, &back), a);
    }
}
