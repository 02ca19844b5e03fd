//! Presence across partitions: each user's presence is kept by the user's
//! own partition, the only one that announces the user's comings and
//! goings and records last-seen (every other partition holds the user's
//! sessions only as routes). So the link splits a `PresenceQuery` or
//! `PresenceSubscribe` by the named users' partitions and merges the
//! answers into the one `Presence` the client expects, entries in the
//! order it named the users.
//!
//! - A query goes to the partitions of the users it names.
//! - A subscription goes to every partition, each with its share of the
//!   users (possibly none), because it replaces the session's earlier
//!   subscription wherever that was. Pushes (`request` 0) come straight
//!   from the watched user's partition.
//! - A request over the documented limits, or naming one partition's
//!   users only, is not split: it goes whole to one partition, which
//!   answers it (400 for the former) as on a single node.
//! - A request numbered 0 is split but not merged: its answers look like
//!   pushes, and reach the client as they come.
//! - The first error goes to the client at once; an answer missing after
//!   [`PRESENCE_WAIT`] is answered 504. A partition that changes owner is
//!   sent again what it owes, and every session's share of subscriptions
//!   there (numbered 0, so the answer reaches the client as a push with
//!   the watched users' state at that moment), because a new owner starts
//!   with no subscriptions.

use std::time::{Duration, Instant};

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{ClientFrame, PresenceEntry, ServerFrame};
use courier_router::api::{Command, Delivery, Device, SessionKey};
use courier_router::fleet::partition_of;
use rustc_hash::FxHashMap;

use super::{reply, Gathered};

/// How long a split request waits for every partition's answer before the
/// client is answered 504 (as long as a chat list waits).
const PRESENCE_WAIT: Duration = Duration::from_secs(5);

/// Most users one query may name, as docs/protocol.md gives it.
const MAX_QUERY: usize = 256;

/// Most users one subscription may name: the routers' default, as
/// docs/protocol.md gives it.
const MAX_SUBSCRIBE: usize = 16;

/// Most split requests one session may have waiting; one more goes whole
/// to the asker's partition, which answers it for its own users only.
const WAITING_PER_SESSION: usize = 8;

/// One split request waiting for its partitions' answers.
#[derive(Debug)]
struct Merge {
    request: u32,
    /// The users named, each once, in the order named.
    named: Vec<String>,
    /// What each partition was sent and has not answered (index:
    /// partition).
    owed: Vec<Option<ClientFrame>>,
    entries: Vec<PresenceEntry>,
    /// The client has its answer already (the first error).
    answered: bool,
    deadline: Instant,
    device: Device,
}

/// Split presence requests waiting for answers, and each session's
/// subscription, by session.
#[derive(Debug, Default)]
pub(super) struct PresenceSplits {
    waiting: FxHashMap<SessionKey, Vec<Merge>>,
    /// Each session's subscribed users, to subscribe again at a partition's
    /// new owner.
    subscribed: FxHashMap<SessionKey, (Device, Vec<String>)>,
}

impl PresenceSplits {
    /// Where `frame` (a `PresenceQuery` or `PresenceSubscribe` of
    /// `session`) goes: one frame per partition. A split answered by more
    /// than one partition is remembered for the merge.
    pub(super) fn split(
        &mut self,
        session: SessionKey,
        device: &Device,
        frame: &ClientFrame,
        partitions: u16,
        now: Instant,
    ) -> Vec<(u16, ClientFrame)> {
        let home = partition_of(&device.user, partitions);
        let (request, users, subscribe) = match frame {
            ClientFrame::PresenceQuery { request, users } => (*request, users, false),
            ClientFrame::PresenceSubscribe { request, users } => (*request, users, true),
            other => return vec![(home, other.clone())],
        };
        let limit = if subscribe { MAX_SUBSCRIBE } else { MAX_QUERY };
        let busy = self
            .waiting
            .get(&session)
            .is_some_and(|w| w.len() >= WAITING_PER_SESSION);
        if users.len() > limit || busy {
            // Whole to one partition: it refuses the oversized request as
            // a single node would, or answers for its own users.
            return vec![(home, frame.clone())];
        }
        let mut named: Vec<String> = Vec::with_capacity(users.len());
        for u in users {
            if !named.contains(u) {
                named.push(u.clone());
            }
        }
        let mut shares: Vec<Vec<String>> = vec![Vec::new(); usize::from(partitions)];
        for u in &named {
            shares[usize::from(partition_of(u, partitions))].push(u.clone());
        }
        if subscribe {
            if named.is_empty() {
                self.subscribed.remove(&session);
            } else {
                self.subscribed
                    .insert(session, (device.clone(), named.clone()));
            }
        }
        let make = |users: Vec<String>| {
            if subscribe {
                ClientFrame::PresenceSubscribe { request, users }
            } else {
                ClientFrame::PresenceQuery { request, users }
            }
        };
        let mut out: Vec<(u16, ClientFrame)> = shares
            .into_iter()
            .enumerate()
            .filter(|(_, share)| subscribe || !share.is_empty())
            .map(|(p, share)| (p as u16, make(share)))
            .collect();
        if out.is_empty() {
            // A query naming nobody: any partition answers it, empty.
            out.push((home, make(Vec::new())));
        }
        if out.len() > 1 && request != 0 {
            let mut owed = vec![None; usize::from(partitions)];
            for (p, f) in &out {
                owed[usize::from(*p)] = Some(f.clone());
            }
            self.waiting.entry(session).or_default().push(Merge {
                request,
                named,
                owed,
                entries: Vec::new(),
                answered: false,
                deadline: now + PRESENCE_WAIT,
                device: device.clone(),
            });
        }
        out
    }

    /// Takes partition `p`'s answer to request `request` of `session`:
    /// its entries, or `None` for an error.
    pub(super) fn answer(
        &mut self,
        session: SessionKey,
        p: u16,
        request: u32,
        entries: Option<Vec<PresenceEntry>>,
    ) -> Gathered {
        if request == 0 {
            return Gathered::Unclaimed;
        }
        let Some(list) = self.waiting.get_mut(&session) else {
            return Gathered::Unclaimed;
        };
        let owes = |m: &Merge| {
            m.request == request && m.owed.get(usize::from(p)).is_some_and(Option::is_some)
        };
        let Some(i) = list.iter().position(owes) else {
            return Gathered::Unclaimed;
        };
        let merge = &mut list[i];
        merge.owed[usize::from(p)] = None;
        let first_error = entries.is_none() && !merge.answered;
        merge.answered |= first_error;
        merge.entries.extend(entries.unwrap_or_default());
        let complete = merge.owed.iter().all(Option::is_none);
        let fate = Gathered::fate(first_error, merge.answered, complete);
        if !complete {
            return fate.unwrap_or(Gathered::Held);
        }
        let merge = list.remove(i);
        if list.is_empty() {
            self.waiting.remove(&session);
        }
        if let Some(fate) = fate {
            return fate;
        }
        let mut by_user: FxHashMap<String, PresenceEntry> = merge
            .entries
            .into_iter()
            .map(|e| (e.user.clone(), e))
            .collect();
        let entries = merge
            .named
            .iter()
            .filter_map(|u| by_user.remove(u))
            .collect();
        Gathered::Merged(reply(session, &ServerFrame::Presence { request, entries }))
    }

    /// The session ended.
    pub(super) fn forget(&mut self, session: SessionKey) {
        self.waiting.remove(&session);
        self.subscribed.remove(&session);
    }

    /// Forgets every split past its deadline, with a 504 for each client
    /// still waiting.
    pub(super) fn poll_expired(&mut self, now: Instant) -> Vec<Delivery> {
        let mut expired = Vec::new();
        self.waiting.retain(|session, list| {
            list.retain(|merge| {
                if merge.deadline > now {
                    return true;
                }
                if !merge.answered {
                    let timeout = ServerFrame::Error {
                        code: ErrorCode::Unavailable as u16,
                        reference: u64::from(merge.request),
                        detail: "not every partition answered the presence request in time; retry"
                            .into(),
                    };
                    expired.push(reply(*session, &timeout));
                }
                false
            });
            !list.is_empty()
        });
        expired
    }

    /// What partition `p`'s new owner must be sent: the requests it owes,
    /// and every session's share of subscriptions there (numbered 0).
    pub(super) fn owed_by(&self, p: u16, partitions: u16) -> Vec<Command> {
        let mut commands = Vec::new();
        for (session, list) in &self.waiting {
            for merge in list.iter().filter(|m| !m.answered) {
                if let Some(Some(frame)) = merge.owed.get(usize::from(p)) {
                    commands.push(Command::Frame {
                        session: *session,
                        device: merge.device.clone(),
                        frame: frame.clone(),
                        received_at: Instant::now(),
                    });
                }
            }
        }
        for (session, (device, users)) in &self.subscribed {
            let share: Vec<String> = users
                .iter()
                .filter(|u| partition_of(u, partitions) == p)
                .cloned()
                .collect();
            if !share.is_empty() {
                commands.push(Command::Frame {
                    session: *session,
                    device: device.clone(),
                    frame: ClientFrame::PresenceSubscribe {
                        request: 0,
                        users: share,
                    },
                    received_at: Instant::now(),
                });
            }
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const PARTITIONS: u16 = 4;

    fn session() -> SessionKey {
        SessionKey {
            node: 1,
            core: 0,
            slot: 7,
            generation: 1,
        }
    }

    fn device() -> Device {
        Device {
            user: Arc::from("watcher"),
            device: 1,
        }
    }

    /// Users spread over at least three partitions.
    fn users() -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for i in 0.. {
            let u = format!("user{i}");
            let p = partition_of(&u, PARTITIONS);
            if !seen.contains(&p) || out.len() < 6 {
                seen.push(p);
                out.push(u);
            }
            if seen.len() >= 3 && out.len() >= 6 {
                break;
            }
        }
        out
    }

    fn entry(user: &str) -> PresenceEntry {
        PresenceEntry {
            user: user.into(),
            online: true,
            last_seen_ms: 1,
        }
    }

    fn frame_of(d: &Delivery) -> ServerFrame {
        let Delivery::Frame { frame, .. } = d else {
            panic!("{d:?}")
        };
        ServerFrame::decode(&frame.slice(2..)).expect("frame")
    }

    fn answer_all(splits: &mut PresenceSplits, out: &[(u16, ClientFrame)]) -> Vec<Gathered> {
        out.iter()
            .map(|(p, f)| {
                let (ClientFrame::PresenceQuery { request, users }
                | ClientFrame::PresenceSubscribe { request, users }) = f
                else {
                    panic!("{f:?}")
                };
                let entries = users.iter().map(|u| entry(u)).collect();
                splits.answer(session(), *p, *request, Some(entries))
            })
            .collect()
    }

    #[test]
    fn a_query_goes_to_the_named_users_partitions_and_is_answered_in_the_order_named() {
        let mut splits = PresenceSplits::default();
        let mut named = users();
        named.reverse();
        named.push(named[0].clone());
        let query = ClientFrame::PresenceQuery {
            request: 9,
            users: named.clone(),
        };
        let out = splits.split(session(), &device(), &query, PARTITIONS, Instant::now());
        assert!(out.len() >= 3, "{out:?}");
        for (p, f) in &out {
            let ClientFrame::PresenceQuery { users, .. } = f else {
                panic!()
            };
            assert!(users.iter().all(|u| partition_of(u, PARTITIONS) == *p));
        }
        let mut gathered = answer_all(&mut splits, &out);
        let last = gathered.pop().expect("answers");
        assert!(gathered.iter().all(|g| matches!(g, Gathered::Held)));
        let Gathered::Merged(merged) = last else {
            panic!("{last:?}")
        };
        let ServerFrame::Presence { request, entries } = frame_of(&merged) else {
            panic!()
        };
        assert_eq!(request, 9);
        let order: Vec<String> = entries.into_iter().map(|e| e.user).collect();
        named.pop();
        assert_eq!(order, named);
        assert!(splits.waiting.is_empty());
    }

    #[test]
    fn a_subscription_goes_to_every_partition_and_is_renewed_at_a_new_owner() {
        let mut splits = PresenceSplits::default();
        let named = users();
        let subscribe = ClientFrame::PresenceSubscribe {
            request: 3,
            users: named.clone(),
        };
        let out = splits.split(session(), &device(), &subscribe, PARTITIONS, Instant::now());
        assert_eq!(out.len(), usize::from(PARTITIONS), "also empty shares");
        let p = partition_of(&named[0], PARTITIONS);
        // The new owner of `p` is sent what it owes and the subscription.
        let again = splits.owed_by(p, PARTITIONS);
        assert_eq!(again.len(), 2, "{again:?}");
        assert!(matches!(
            &again[1],
            Command::Frame { frame: ClientFrame::PresenceSubscribe { request: 0, users }, .. }
                if users.iter().all(|u| partition_of(u, PARTITIONS) == p) && users.contains(&named[0])
        ));
        answer_all(&mut splits, &out);
        assert_eq!(
            splits.owed_by(p, PARTITIONS).len(),
            1,
            "the subscription only"
        );
        // Unsubscribing everywhere forgets it.
        let none = ClientFrame::PresenceSubscribe {
            request: 4,
            users: vec![],
        };
        let out = splits.split(session(), &device(), &none, PARTITIONS, Instant::now());
        assert_eq!(out.len(), usize::from(PARTITIONS));
        answer_all(&mut splits, &out);
        assert!(splits.owed_by(p, PARTITIONS).is_empty());
    }

    #[test]
    fn oversized_and_one_partition_requests_are_not_split() {
        let mut splits = PresenceSplits::default();
        let many: Vec<String> = (0..=MAX_SUBSCRIBE).map(|i| format!("u{i}")).collect();
        let subscribe = ClientFrame::PresenceSubscribe {
            request: 1,
            users: many,
        };
        let out = splits.split(session(), &device(), &subscribe, PARTITIONS, Instant::now());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, subscribe);
        let one = users()[0].clone();
        let query = ClientFrame::PresenceQuery {
            request: 2,
            users: vec![one.clone()],
        };
        let out = splits.split(session(), &device(), &query, PARTITIONS, Instant::now());
        assert_eq!(out, vec![(partition_of(&one, PARTITIONS), query)]);
        assert!(splits.waiting.is_empty());
    }

    #[test]
    fn the_first_error_passes_and_a_missing_answer_is_504() {
        let mut splits = PresenceSplits::default();
        let query = ClientFrame::PresenceQuery {
            request: 5,
            users: users(),
        };
        let now = Instant::now();
        let out = splits.split(session(), &device(), &query, PARTITIONS, now);
        assert!(matches!(
            splits.answer(session(), out[0].0, 5, None),
            Gathered::Pass
        ));
        let rest = answer_all(&mut splits, &out[1..]);
        assert!(rest.iter().all(|g| matches!(g, Gathered::Held)), "{rest:?}");

        let out = splits.split(session(), &device(), &query, PARTITIONS, now);
        answer_all(&mut splits, &out[1..]);
        assert!(splits.poll_expired(now).is_empty());
        let expired = splits.poll_expired(now + PRESENCE_WAIT);
        assert_eq!(expired.len(), 1);
        assert!(matches!(
            frame_of(&expired[0]),
            ServerFrame::Error { code, reference: 5, .. } if code == ErrorCode::Unavailable as u16
        ));
        // A late answer is not the client's any more.
        assert!(matches!(
            splits.answer(session(), out[0].0, 5, Some(vec![])),
            Gathered::Unclaimed
        ));
    }
}
