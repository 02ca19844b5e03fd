//! Sends: SENT, fan-out, sequences, dedupe, validation, rate, group commit.

use bytes::Bytes;
use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{ClientFrame, EntryKind, ServerFrame};

use super::{sent_fields, Harness};
use crate::api::{Class, Delivery};

const AB: &str = "d:alice:bob";

#[test]
fn direct_send_acks_then_fans_out_to_other_devices() {
    let mut h = Harness::new();
    let alice1 = h.client("alice", 1, 0);
    let alice2 = h.client("alice", 2, 1);
    let bob = h.client("bob", 1, 1);
    let carol = h.client("carol", 1, 0);
    for c in [&alice1, &alice2, &bob, &carol] {
        h.connect(c);
    }

    let out = h.step(vec![alice1.send(AB, 7, b"hello")]);
    let sent = out.classified(&alice1);
    assert_eq!(
        sent.len(),
        1,
        "the sending device gets only its Sent: {sent:?}"
    );
    assert_eq!(sent[0].0, Class::Reply);
    let (conversation, seq, server_id, timestamp_ms) = sent_fields(&sent[0].1);
    assert_eq!((conversation.as_str(), seq), (AB, 1));
    assert_eq!(timestamp_ms, h.now_ms - 1);
    assert_eq!(server_id >> 22, timestamp_ms, "snowflake carries the time");
    assert_eq!((server_id >> 12) & 0x3ff, 3, "and the node id");

    for c in [&bob, &alice2] {
        let got = out.classified(c);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, Class::Message);
        assert_eq!(
            got[0].1,
            ServerFrame::Message {
                conversation: AB.into(),
                seq: 1,
                server_id,
                timestamp_ms,
                kind: EntryKind::Message,
                sender: "alice".into(),
                sender_device: 1,
                client_id: 7,
                body: Bytes::from_static(b"hello"),
            }
        );
    }
    assert!(out.frames(&carol).is_empty(), "a stranger gets nothing");

    // Live messages carry their origin; one frame is shared by all recipients.
    let raw_bob = out.raw(&bob);
    let raw_alice2 = out.raw(&alice2);
    assert_eq!(
        raw_bob[0].as_ptr(),
        raw_alice2[0].as_ptr(),
        "encoded once, shared"
    );
    for d in &out.items {
        if let Delivery::Frame {
            class: Class::Message,
            origin,
            ..
        } = d
        {
            assert!(origin.is_some());
        }
    }
}

#[test]
fn sequences_are_contiguous_per_conversation() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    let ac_id = "d:alice:carol";

    let mut ab = Vec::new();
    let mut ac = Vec::new();
    let mut ids = Vec::new();
    for round in 0..5u64 {
        let mut cmds = Vec::new();
        for i in 0..4 {
            cmds.push(alice.send(AB, round * 100 + i, b"x"));
            cmds.push(bob.send(AB, round * 100 + i, b"y"));
            cmds.push(alice.send(ac_id, round * 100 + 50 + i, b"z"));
        }
        let out = h.step(cmds);
        for f in out.frames(&alice).iter().chain(out.frames(&bob).iter()) {
            if let ServerFrame::Sent {
                conversation,
                seq,
                server_id,
                ..
            } = f
            {
                ids.push(*server_id);
                if conversation == AB {
                    ab.push(*seq);
                } else {
                    ac.push(*seq);
                }
            }
        }
    }
    ab.sort_unstable();
    ac.sort_unstable();
    assert_eq!(ab, (1..=40).collect::<Vec<u64>>());
    assert_eq!(ac, (1..=20).collect::<Vec<u64>>());
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "server ids are unique");
}

#[test]
fn a_batch_of_sends_costs_one_fsync() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let before = h.core().store_fsyncs();
    let cmds = (0..100).map(|i| alice.send(AB, i, b"m")).collect();
    let out = h.step(cmds);
    assert_eq!(out.frames(&alice).len(), 100);
    assert_eq!(h.core().store_fsyncs() - before, 1);
    assert!(h
        .metrics_text()
        .contains("courier_messages_stored_total 100"));

    // A batch with nothing to write costs none.
    h.step(vec![alice.sync(vec![])]);
    assert_eq!(h.core().store_fsyncs() - before, 1);
}

#[test]
fn a_retry_gets_the_original_sent() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);

    // Twice in one batch: stored once, the same answer twice.
    let out = h.step(vec![alice.send(AB, 1, b"a"), alice.send(AB, 1, b"a")]);
    let frames = out.frames(&alice);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0], frames[1]);
    assert_eq!(out.messages(&bob).len(), 1, "delivered once");
    let original = frames[0].clone();

    // In a later batch, after other sends moved the sequence on.
    h.step(vec![alice.send(AB, 2, b"b")]);
    h.advance(3_600_000);
    let out = h.step(vec![alice.send(AB, 1, b"a")]);
    assert_eq!(out.frames(&alice), vec![original.clone()]);
    assert!(
        out.frames(&bob).is_empty(),
        "a retry is not delivered again"
    );

    // After a restart (the dedupe record is durable).
    h.restart();
    let alice = alice.reconnect();
    h.connect(&alice);
    let out = h.step(vec![alice.send(AB, 1, b"a")]);
    assert_eq!(out.frames(&alice), vec![original]);
    let out = h.step(vec![alice.send(AB, 3, b"c")]);
    assert_eq!(out.sent(&alice).0, 3, "nothing was stored for the retries");

    // Another device's client id 1 is its own message.
    let alice2 = h.client("alice", 2, 0);
    h.connect(&alice2);
    let out = h.step(vec![alice2.send(AB, 1, b"d")]);
    assert_eq!(out.sent(&alice2).0, 4);
}

#[test]
fn dedupe_records_expire_after_the_window() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let out = h.step(vec![alice.send(AB, 1, b"a")]);
    assert_eq!(out.sent(&alice).0, 1);

    // Past the window (7 days), the sweep runs and the id is free again.
    h.advance(7 * 24 * 3600 * 1000 + 61_000);
    h.step(vec![]);
    let out = h.step(vec![alice.send(AB, 1, b"a")]);
    assert_eq!(
        out.sent(&alice).0,
        2,
        "an expired client id is a new message"
    );
    // The new record is not swept by the old index entry.
    let out = h.step(vec![alice.send(AB, 1, b"a")]);
    assert_eq!(out.sent(&alice).0, 2);
}

#[test]
fn validation_errors_store_nothing() {
    let mut h = Harness::with(|c| c.max_body = 8);
    let alice = h.client("alice", 1, 0);
    let carol = h.client("carol", 1, 0);
    h.connect(&alice);
    h.connect(&carol);
    // Let the devices' catch-up records (written behind) reach the store.
    h.advance(1_000);
    h.step(vec![]);
    let before = h.core().store_fsyncs();

    let cases: Vec<(crate::api::Command, ErrorCode, u64)> = vec![
        (
            alice.send(AB, 10, b"123456789"),
            ErrorCode::BodyTooLarge,
            10,
        ),
        (
            alice.send("d:bob:alice", 11, b"x"),
            ErrorCode::BadRequest,
            11,
        ),
        (alice.send("nonsense", 12, b"x"), ErrorCode::BadRequest, 12),
        (carol.send(AB, 13, b"x"), ErrorCode::NotMember, 13),
        (
            alice.send("g:00000000000000aa", 14, b"x"),
            ErrorCode::UnknownConversation,
            14,
        ),
    ];
    for (cmd, code, reference) in cases {
        let sender = if reference == 13 { &carol } else { &alice };
        let out = h.step(vec![cmd]);
        let frames = out.frames(sender);
        assert_eq!(frames.len(), 1);
        match &frames[0] {
            ServerFrame::Error {
                code: got,
                reference: r,
                detail,
            } => {
                assert_eq!((*got, *r), (code as u16, reference), "{detail}");
                assert!(!detail.is_empty());
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
    assert_eq!(h.core().store_fsyncs(), before, "nothing was written");

    // A group the sender is not in: create one with bob only.
    let bob = h.client("bob", 1, 0);
    h.connect(&bob);
    let out = h.step(vec![bob.frame(ClientFrame::GroupCreate {
        request: 1,
        members: vec!["dave".into()],
    })]);
    let ServerFrame::GroupCreated { conversation, .. } = &out.frames(&bob)[0] else {
        panic!()
    };
    let out = h.step(vec![alice.send(conversation, 15, b"x")]);
    assert_eq!(out.errors(&alice), vec![(ErrorCode::NotMember as u16, 15)]);

    let text = h.metrics_text();
    for name in [
        "body_too_large",
        "bad_request",
        "not_member",
        "unknown_conversation",
    ] {
        assert!(
            text.contains(&format!("courier_send_errors_total{{code=\"{name}\"}}")),
            "{name}: {text}"
        );
    }
    // The first message still gets sequence 1.
    let out = h.step(vec![alice.send(AB, 16, b"ok")]);
    assert_eq!(out.sent(&alice).0, 1);
}

#[test]
fn the_send_rate_is_limited_per_user() {
    let mut h = Harness::with(|c| {
        c.send_rate_per_s = 10.0;
        c.send_burst = 5.0;
    });
    let alice1 = h.client("alice", 1, 0);
    let alice2 = h.client("alice", 2, 0);
    let bob = h.client("bob", 1, 0);
    for c in [&alice1, &alice2, &bob] {
        h.connect(c);
    }

    // The burst is shared by the user's devices.
    let mut cmds: Vec<_> = (0..3).map(|i| alice1.send(AB, i, b"x")).collect();
    cmds.extend((0..3).map(|i| alice2.send(AB, i, b"x")));
    cmds.push(bob.send(AB, 1, b"y"));
    let out = h.step(cmds);
    assert_eq!(out.errors(&alice1), vec![]);
    let errors: Vec<_> = out
        .frames(&alice2)
        .into_iter()
        .filter(|f| matches!(f, ServerFrame::Error { .. }))
        .collect();
    match errors.as_slice() {
        [ServerFrame::Error {
            code,
            reference,
            detail,
        }] => {
            assert_eq!((*code, *reference), (ErrorCode::RateLimited as u16, 2));
            assert!(detail.contains("retry in 100 ms"), "{detail}");
        }
        other => panic!("expected rate limited, got {other:?}"),
    }
    assert_eq!(
        out.errors(&bob),
        vec![],
        "other users have their own bucket"
    );

    // A retry after the hinted wait goes through, with the next sequence.
    h.advance(100);
    let out = h.step(vec![alice2.send(AB, 2, b"x")]);
    assert_eq!(out.sent(&alice2).0, 7);
    assert!(h
        .metrics_text()
        .contains("courier_send_errors_total{code=\"rate_limited\"} 1"));
}

#[test]
fn a_restart_resumes_sequences_and_server_ids() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let mut last_id = 0;
    for i in 0..3 {
        let out = h.step(vec![alice.send(AB, i, b"x")]);
        last_id = out.sent(&alice).1;
    }
    let out = h.step(vec![alice.frame(ClientFrame::GroupCreate {
        request: 1,
        members: vec!["bob".into()],
    })]);
    let ServerFrame::GroupCreated {
        conversation: group,
        seq: 1,
        ..
    } = out.frames(&alice)[0].clone()
    else {
        panic!()
    };
    let out = h.step(vec![alice.send(&group, 100, b"g")]);
    assert_eq!(out.sent(&alice).0, 2);

    h.restart();
    // The clock stepped back an hour across the restart.
    h.now_ms -= 3_600_000;
    let alice = alice.reconnect();
    h.connect(&alice);
    let out = h.step(vec![
        alice.send(AB, 10, b"x"),
        alice.send(&group, 101, b"g"),
    ]);
    let frames = out.frames(&alice);
    let (_, seq_ab, id_ab, _) = sent_fields(&frames[0]);
    let (_, seq_g, _, _) = sent_fields(&frames[1]);
    assert_eq!((seq_ab, seq_g), (4, 3));
    assert!(
        id_ab > last_id,
        "server ids keep increasing across a restart"
    );
}

#[test]
fn a_send_from_a_stale_session_is_still_acked_to_that_session() {
    // The gateway may submit a frame just before the session's Detach.
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let out = h.step(vec![alice.detach(), alice.send(AB, 1, b"x")]);
    assert_eq!(out.sent(&alice).0, 1);
}
