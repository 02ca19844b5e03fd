//! A failed commit: every answer of the batch says 503, nothing is acked
//! or delivered, and the next batch carries on from the durable state.

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{ClientFrame, ServerFrame};

use super::{messages, Harness};

const AB: &str = "d:alice:bob";

#[test]
fn a_failed_commit_refuses_the_batch_and_leaves_no_gap() {
    let mut h = Harness::with(|c| {
        c.send_rate_per_s = 0.001;
        c.send_burst = 3.0;
    });
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    let out = h.step(vec![alice.send(AB, 1, b"one")]);
    let original = out.frames(&alice);

    h.core().fail_next_commits(1);
    let out = h.step(vec![
        alice.send(AB, 2, b"two"),
        alice.send(AB, 3, b"three"),
        alice.send(AB, 1, b"one"),
        bob.frame(ClientFrame::Delivered {
            conversation: AB.into(),
            seq: 1,
        }),
        bob.frame(ClientFrame::GroupCreate {
            request: 8,
            members: vec!["alice".into()],
        }),
        // Answers decided against the batch's uncommitted view say 503 too.
        alice.send("g:00000000000000aa", 9, b"x"),
        bob.frame(ClientFrame::GroupMembers {
            request: 10,
            conversation: "d:alice:bob".into(),
        }),
    ]);
    let unavailable = ErrorCode::StoreUnavailable as u16;
    assert_eq!(
        out.errors(&alice),
        vec![
            (unavailable, 2),
            (unavailable, 3),
            (unavailable, 1),
            (unavailable, 9)
        ]
    );
    assert_eq!(
        out.errors(&bob),
        vec![(unavailable, 0), (unavailable, 8), (unavailable, 10)]
    );
    assert!(
        out.messages(&bob).is_empty(),
        "nothing unacked is delivered"
    );
    assert!(out.messages(&alice).is_empty());
    let text = h.metrics_text();
    assert!(
        text.contains("courier_store_commit_failures_total 1"),
        "{text}"
    );
    assert!(
        text.contains("courier_send_errors_total{code=\"store_unavailable\"} 4"),
        "{text}"
    );

    // The retries take the sequences the failed batch did not keep, and
    // the rate tokens the failed batch spent were given back.
    let out = h.step(vec![alice.send(AB, 2, b"two"), alice.send(AB, 3, b"three")]);
    let seqs: Vec<u64> = out
        .frames(&alice)
        .iter()
        .map(|f| match f {
            ServerFrame::Sent { seq, .. } => *seq,
            other => panic!("expected Sent, got {other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![2, 3]);
    assert_eq!(
        out.messages(&bob).iter().map(|m| m.1).collect::<Vec<_>>(),
        vec![2, 3]
    );
    let out = h.step(vec![alice.send(AB, 1, b"one")]);
    assert_eq!(
        out.frames(&alice),
        original,
        "a durable send is still deduped"
    );

    // What a new device sees, and what a restart resumes from, agree.
    let alice2 = h.client("alice", 2, 0);
    let bodies: Vec<_> = messages(&h.connect(&alice2))
        .into_iter()
        .map(|m| (m.1, m.2))
        .collect();
    assert_eq!(
        bodies,
        vec![(1, "one".into()), (2, "two".into()), (3, "three".into())]
    );
    h.restart();
    let alice = alice.reconnect();
    h.connect(&alice);
    h.advance(10_000_000);
    let out = h.step(vec![alice.send(AB, 4, b"four")]);
    assert_eq!(out.sent(&alice).0, 4);
}

#[test]
fn a_failed_commit_forgets_a_direct_conversation_it_would_have_created() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.core().fail_next_commits(1);
    let out = h.step(vec![alice.send(AB, 1, b"first")]);
    assert_eq!(
        out.errors(&alice),
        vec![(ErrorCode::StoreUnavailable as u16, 1)]
    );

    // Bob has no trace of it; the retry creates it with sequence 1.
    let frames = h.connect(&bob);
    assert_eq!(frames, vec![ServerFrame::SyncDone { more: false }]);
    let out = h.step(vec![alice.send(AB, 1, b"first")]);
    assert_eq!(out.sent(&alice).0, 1);
    assert_eq!(out.messages(&bob).len(), 1);
}

#[test]
fn repeated_failures_reopen_the_store_at_most_once_a_second() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let unavailable = ErrorCode::StoreUnavailable as u16;
    // Two failures in a row: the first reopens the store, the second
    // closes it until a second has passed.
    h.core().fail_next_commits(2);
    for id in 1..=2 {
        let out = h.step(vec![alice.send(AB, id, b"m")]);
        assert_eq!(out.errors(&alice), vec![(unavailable, id)]);
    }
    // Within the second the store stays closed: refused at once.
    h.advance(100);
    let out = h.step(vec![alice.send(AB, 3, b"m")]);
    assert_eq!(out.errors(&alice), vec![(unavailable, 3)]);
    // Past it, the next batch reopens the store first, even one that only
    // reads (a catch-up), and sends commit again.
    h.advance(1_000);
    let alice = alice.reconnect();
    h.connect(&alice);
    let out = h.step(vec![alice.send(AB, 4, b"m")]);
    assert_eq!(out.sent(&alice).0, 1, "the sequence continues with no gap");
}

#[test]
fn entries_a_failed_commit_wrote_are_never_read_back() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.step(vec![alice.send(AB, 1, b"one")]);
    // The failed batch wrote sequences 2 and 3 before its commit failed.
    h.core().fail_next_commits(1);
    h.step(vec![alice.send(AB, 2, b"lost"), alice.send(AB, 3, b"lost")]);
    // Sequence 2 is given again, to another message.
    let out = h.step(vec![alice.send(AB, 4, b"kept")]);
    assert_eq!(out.sent(&alice).0, 2);

    let got: Vec<_> = messages(&h.connect(&bob))
        .into_iter()
        .map(|m| (m.1, m.2))
        .collect();
    assert_eq!(got, vec![(1, "one".into()), (2, "kept".into())]);
    let out = h.step(vec![bob.frame(ClientFrame::History {
        request: 1,
        conversation: AB.into(),
        before_seq: 0,
        limit: 10,
    })]);
    match out.frames(&bob).pop() {
        Some(ServerFrame::History { entries, .. }) => {
            let got: Vec<_> = entries.iter().map(|e| (e.seq, e.body.clone())).collect();
            assert_eq!(got, vec![(1, "one".into()), (2, "kept".into())]);
        }
        other => panic!("{other:?}"),
    }
}
