//! Catch-up and routes: paging, liveness, replaced sessions, reconnects.

use courier_protocol::close;
use courier_protocol::frame::{ClientFrame, ServerFrame};

use super::{messages, Harness};
use crate::api::Class;

const AB: &str = "d:alice:bob";
const AC: &str = "d:alice:carol";

#[test]
fn an_offline_device_catches_up_after_reconnecting() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.step(vec![alice.send(AB, 1, b"1")]);
    h.step(vec![bob.detach()]);

    // Offline: nothing is pushed, everything waits.
    let out = h.step(vec![alice.send(AB, 2, b"2"), alice.send(AB, 3, b"3")]);
    assert!(out.frames(&bob).is_empty());

    // Back with the last sequence it holds.
    let bob = bob.reconnect();
    let out = h.step(vec![bob.attach(), bob.sync(vec![(AB, 1)])]);
    let frames = out.classified(&bob);
    assert!(
        frames.iter().all(|(class, _)| *class == Class::Reply),
        "catch-up pages are replies"
    );
    let frames: Vec<_> = frames.into_iter().map(|f| f.1).collect();
    let got: Vec<u64> = messages(&frames).iter().map(|m| m.1).collect();
    assert_eq!(got, vec![2, 3]);
    assert_eq!(frames.last(), Some(&ServerFrame::SyncDone { more: false }));

    // Now live again.
    let out = h.step(vec![alice.send(AB, 4, b"4")]);
    assert_eq!(out.messages(&bob).len(), 1);
}

#[test]
fn without_a_cursor_catch_up_resumes_from_the_stored_delivered_cursor() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.step((1..=4).map(|i| alice.send(AB, i, b"m")).collect());
    h.step(vec![
        bob.frame(ClientFrame::Delivered {
            conversation: AB.into(),
            seq: 3,
        }),
        bob.detach(),
    ]);

    let bob = bob.reconnect();
    let got: Vec<u64> = messages(&h.connect(&bob)).iter().map(|m| m.1).collect();
    assert_eq!(got, vec![4]);
    // A cursor the client names wins over the stored one (a reinstall).
    let bob = bob.reconnect();
    let out = h.step(vec![bob.attach(), bob.sync(vec![(AB, 0)])]);
    let got: Vec<u64> = out.messages(&bob).iter().map(|m| m.1).collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
}

#[test]
fn catch_up_pages_and_the_session_stays_not_live_until_the_last_page() {
    let mut h = Harness::with(|c| c.sync_page = 3);
    let alice = h.client("alice", 1, 0);
    let carol = h.client("carol", 1, 0);
    h.connect(&alice);
    h.connect(&carol);
    // Four in one conversation and two in another, while bob is away.
    h.step((1..=4).map(|i| alice.send(AB, i, b"ab")).collect());
    h.step((1..=2).map(|i| alice.send(AC, i, b"ac")).collect());

    let bob = h.client("bob", 1, 0);
    let out = h.step(vec![bob.attach(), bob.sync(vec![])]);
    let page1 = out.frames(&bob);
    assert_eq!(page1.last(), Some(&ServerFrame::SyncDone { more: true }));
    let mut got: Vec<u64> = messages(&page1).iter().map(|m| m.1).collect();
    assert_eq!(got, vec![1, 2, 3]);

    // Not live yet: a new message waits for catch-up.
    let out = h.step(vec![alice.send(AB, 5, b"ab")]);
    assert!(
        out.frames(&bob).is_empty(),
        "no live message before the catch-up ends"
    );

    let out = h.step(vec![bob.sync(vec![(AB, 3)])]);
    let page2 = out.frames(&bob);
    assert_eq!(page2.last(), Some(&ServerFrame::SyncDone { more: false }));
    got.extend(messages(&page2).iter().map(|m| m.1));
    assert_eq!(got, vec![1, 2, 3, 4, 5]);

    // Live from here.
    let out = h.step(vec![alice.send(AB, 6, b"ab")]);
    assert_eq!(
        out.messages(&bob).iter().map(|m| m.1).collect::<Vec<_>>(),
        vec![6]
    );
    // Bob is not in AC: it never appeared.
}

#[test]
fn catch_up_pages_across_conversations() {
    let mut h = Harness::with(|c| c.sync_page = 2);
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step(vec![
        alice.send(AB, 1, b"x"),
        alice.send(AB, 2, b"x"),
        alice.send(AC, 3, b"y"),
    ]);

    // Exactly a page in the first conversation, more in the second.
    let alice2 = h.client("alice", 2, 0);
    let out = h.step(vec![alice2.attach(), alice2.sync(vec![])]);
    let frames = out.frames(&alice2);
    assert_eq!(frames.last(), Some(&ServerFrame::SyncDone { more: true }));
    assert_eq!(messages(&frames).len(), 2);
    let mut cursors: Vec<(String, u64)> = Vec::new();
    for m in messages(&frames) {
        cursors.retain(|c| c.0 != m.0);
        cursors.push((m.0, m.1));
    }
    let cursors: Vec<(&str, u64)> = cursors.iter().map(|(c, s)| (c.as_str(), *s)).collect();
    let out = h.step(vec![alice2.sync(cursors)]);
    let frames = out.frames(&alice2);
    assert_eq!(
        messages(&frames)
            .iter()
            .map(|m| (m.0.as_str(), m.1))
            .collect::<Vec<_>>(),
        vec![(AC, 1)]
    );
    assert_eq!(frames.last(), Some(&ServerFrame::SyncDone { more: false }));
}

#[test]
fn nothing_is_lost_or_reordered_between_catch_up_and_live() {
    // Messages keep arriving in every batch while bob pages through his
    // catch-up one small page at a time: he must see 1..=N exactly once,
    // in order.
    let mut h = Harness::with(|c| c.sync_page = 2);
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step((1..=5).map(|i| alice.send(AB, i, b"m")).collect());

    let bob = h.client("bob", 1, 0);
    let mut seen = Vec::new();
    let mut next_id = 6;
    let mut out = h.step(vec![
        bob.attach(),
        bob.sync(vec![]),
        alice.send(AB, next_id, b"m"),
    ]);
    loop {
        let frames = out.frames(&bob);
        seen.extend(messages(&frames).iter().map(|m| m.1));
        let done = frames.contains(&ServerFrame::SyncDone { more: false });
        next_id += 1;
        let send = alice.send(AB, next_id, b"m");
        if done {
            // Live now: two more batches arrive live.
            out = h.step(vec![send]);
            seen.extend(out.messages(&bob).iter().map(|m| m.1));
            next_id += 1;
            out = h.step(vec![alice.send(AB, next_id, b"m")]);
            seen.extend(out.messages(&bob).iter().map(|m| m.1));
            break;
        }
        // The next page request and a new message in the same batch.
        let cursor = *seen.last().unwrap_or(&0);
        out = h.step(vec![send, bob.sync(vec![(AB, cursor)])]);
        assert!(seen.len() < 100, "catch-up converges");
    }
    let expected: Vec<u64> = (1..=next_id).collect();
    assert_eq!(seen, expected);
}

#[test]
fn a_new_session_replaces_the_old_one_of_the_same_device() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);

    let bob_new = bob.reconnect();
    let out = h.step(vec![bob_new.attach()]);
    assert_eq!(out.closes(), vec![(bob.session, close::REPLACED)]);

    // The old session's late Detach does not remove the new route.
    h.step(vec![bob.detach(), bob_new.sync(vec![])]);
    let out = h.step(vec![alice.send(AB, 1, b"x")]);
    assert!(out.frames(&bob).is_empty());
    assert_eq!(out.messages(&bob_new).len(), 1);
    // Attaching the same session twice is harmless.
    let out = h.step(vec![bob_new.attach()]);
    assert!(out.closes().is_empty());
    assert!(
        h.metrics_text().contains("courier_routes_online 2"),
        "{}",
        h.metrics_text()
    );
    h.step(vec![bob_new.detach(), bob_new.detach()]);
    assert!(h.metrics_text().contains("courier_routes_online 1"));
}

#[test]
fn a_new_sync_pauses_live_delivery_until_it_completes() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    // One batch holds bob's fresh Sync and a send: he gets the message
    // once, in his catch-up, and not live as well.
    let out = h.step(vec![bob.sync(vec![(AB, 0)]), alice.send(AB, 1, b"x")]);
    let frames = out.classified(&bob);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0].0, Class::Reply);
    assert!(matches!(frames[0].1, ServerFrame::Message { seq: 1, .. }));
    assert_eq!(frames[1].1, ServerFrame::SyncDone { more: false });
}

#[test]
fn a_catch_up_page_stops_at_its_byte_budget() {
    let mut h = Harness::with(|c| c.sync_page_bytes = 10);
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.step((1..=5).map(|i| alice.send(AB, i, b"1234")).collect());

    // 4-byte bodies against a 10-byte budget: two entries a page.
    let out = h.step(vec![bob.attach(), bob.sync(vec![])]);
    let frames = out.frames(&bob);
    let got: Vec<u64> = messages(&frames).iter().map(|m| m.1).collect();
    assert_eq!(got, vec![1, 2]);
    assert_eq!(frames.last(), Some(&ServerFrame::SyncDone { more: true }));
    let out = h.step(vec![bob.sync(vec![(AB, 2)])]);
    let got: Vec<u64> = messages(&out.frames(&bob)).iter().map(|m| m.1).collect();
    assert_eq!(got, vec![3, 4]);
}

/// What bob's catch-up from nothing and his history page of `AB` show
/// after alice and carol sent him 30 messages while he was away,
/// with `recent` bytes of recent entries; and the router's metrics.
const BC: &str = "d:bob:carol";

fn away_and_back(recent: usize) -> (Vec<(String, u64, bytes::Bytes)>, Vec<u64>, String) {
    let mut h = Harness::with(|c| {
        c.recent_entries_bytes = recent;
        c.sync_page = 7;
    });
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    let carol = h.client("carol", 1, 0);
    h.connect(&alice);
    h.connect(&carol);
    let bodies: [&'static [u8]; 3] = [b"first", b"second", b"third"];
    for i in 0..15u64 {
        h.step(vec![
            alice.send(AB, i + 1, bodies[(i % 3) as usize]),
            carol.send(BC, i + 1, bodies[((i + 1) % 3) as usize]),
        ]);
    }
    let mut caught = Vec::new();
    let mut out = h.step(vec![bob.attach(), bob.sync(vec![])]);
    loop {
        let frames = out.frames(&bob);
        caught.extend(messages(&frames));
        if frames.last() == Some(&ServerFrame::SyncDone { more: false }) {
            break;
        }
        let held = |c: &str| caught.iter().filter(|m| m.0 == c).map(|m| m.1).max();
        let cursors = [AB, BC]
            .into_iter()
            .filter_map(|c| held(c).map(|s| (c, s)))
            .collect();
        out = h.step(vec![bob.sync(cursors)]);
    }
    let out = h.step(vec![bob.frame(ClientFrame::History {
        request: 1,
        conversation: AB.into(),
        before_seq: 0,
        limit: 10,
    })]);
    let history = match out.frames(&bob).pop() {
        Some(ServerFrame::History { entries, .. }) => entries.iter().map(|e| e.seq).collect(),
        other => panic!("{other:?}"),
    };
    (caught, history, h.metrics_text())
}

fn reads(metrics: &str, source: &str) -> u64 {
    let name = format!("courier_router_entry_reads_total{{source=\"{source}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[test]
fn catch_up_and_history_read_the_same_from_memory_as_from_the_store() {
    let (from_store, history_store, metrics) = away_and_back(0);
    assert_eq!(reads(&metrics, "memory"), 0);
    assert_eq!(from_store.len(), 30);
    assert_eq!(history_store, (6..=15).collect::<Vec<_>>());

    // All of it in memory: no read goes to the store.
    let (from_memory, history_memory, metrics) = away_and_back(1 << 20);
    assert_eq!(from_memory, from_store);
    assert_eq!(history_memory, history_store);
    assert_eq!(reads(&metrics, "store"), 0);
    assert!(reads(&metrics, "memory") > 0);

    // Room for about the last dozen entries: the older pages come from the
    // store, the newer from memory, and the whole is the same.
    let (mixed, history_mixed, metrics) = away_and_back(4_000);
    assert_eq!(mixed, from_store);
    assert_eq!(history_mixed, history_store);
    assert!(reads(&metrics, "store") > 0, "{metrics}");
    assert!(reads(&metrics, "memory") > 0, "{metrics}");
    assert!(metrics.contains("courier_router_recent_entries_bytes "));
}

#[test]
fn after_a_restart_the_first_catch_up_of_a_group_from_the_store_serves_the_next_from_memory() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let out = h.step(vec![alice.frame(ClientFrame::GroupCreate {
        request: 1,
        members: vec!["bob".into(), "carol".into(), "dave".into()],
    })]);
    let group = match out.frames(&alice).as_slice() {
        [ServerFrame::GroupCreated { conversation, .. }] => conversation.clone(),
        other => panic!("{other:?}"),
    };
    let bodies: [&'static [u8]; 3] = [b"one", b"two", b"three"];
    for (i, body) in bodies.iter().enumerate() {
        h.step(vec![alice.send(&group, i as u64 + 1, body)]);
    }
    h.restart();

    // Each comes back holding the group's first entry (its creation).
    let mut caught = Vec::new();
    for name in ["bob", "carol", "dave"] {
        let c = h.client(name, 1, 0);
        let out = h.step(vec![c.attach(), c.sync(vec![(group.as_str(), 1)])]);
        caught.push(messages(&out.frames(&c)));
    }
    assert_eq!(caught[0].iter().map(|m| m.1).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(caught[1], caught[0]);
    assert_eq!(caught[2], caught[0]);
    let metrics = h.metrics_text();
    assert_eq!(reads(&metrics, "store"), 1, "{metrics}");
    assert_eq!(reads(&metrics, "memory"), 2, "{metrics}");

    // A send after them extends the run the read started.
    let alice = alice.reconnect();
    h.step(vec![alice.attach(), alice.sync(vec![(group.as_str(), 4)])]);
    h.step(vec![alice.send(&group, 9, b"four")]);
    let erin = h.client("dave", 2, 0);
    let out = h.step(vec![erin.attach(), erin.sync(vec![(group.as_str(), 1)])]);
    let got: Vec<u64> = messages(&out.frames(&erin)).iter().map(|m| m.1).collect();
    assert_eq!(got, [2, 3, 4, 5]);
    assert_eq!(reads(&h.metrics_text(), "store"), 1);
}
