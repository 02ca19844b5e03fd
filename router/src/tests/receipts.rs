//! Receipts: cursors stored, monotonic, forwarded in direct conversations.

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{ClientFrame, ReceiptKind, ServerFrame};

use super::Harness;
use crate::api::Class;

const AB: &str = "d:alice:bob";

fn delivered(seq: u64) -> ClientFrame {
    ClientFrame::Delivered {
        conversation: AB.into(),
        seq,
    }
}

fn read(seq: u64) -> ClientFrame {
    ClientFrame::Read {
        conversation: AB.into(),
        seq,
    }
}

#[test]
fn receipts_are_forwarded_to_the_other_participant_and_only_forward() {
    let mut h = Harness::new();
    let alice1 = h.client("alice", 1, 0);
    let alice2 = h.client("alice", 2, 0);
    let bob = h.client("bob", 1, 0);
    for c in [&alice1, &alice2, &bob] {
        h.connect(c);
    }
    h.step((1..=3).map(|i| alice1.send(AB, i, b"m")).collect());

    let out = h.step(vec![bob.frame(delivered(2))]);
    let expect = ServerFrame::Receipt {
        conversation: AB.into(),
        seq: 2,
        user: "bob".into(),
        device: 1,
        kind: ReceiptKind::Delivered,
    };
    for alice in [&alice1, &alice2] {
        assert_eq!(
            out.classified(alice),
            vec![(Class::Message, expect.clone())]
        );
    }
    assert!(out.frames(&bob).is_empty());

    // Backwards or repeated: stored cursor unchanged, nothing forwarded.
    for frame in [delivered(1), delivered(2)] {
        let out = h.step(vec![bob.frame(frame)]);
        assert!(out.items.is_empty(), "{:?}", out.items);
    }

    // Read moves both cursors; the forward says read.
    let out = h.step(vec![bob.frame(read(3))]);
    assert_eq!(
        out.frames(&alice1),
        vec![ServerFrame::Receipt {
            conversation: AB.into(),
            seq: 3,
            user: "bob".into(),
            device: 1,
            kind: ReceiptKind::Read
        }]
    );
    let out = h.step(vec![bob.frame(delivered(3))]);
    assert!(out.items.is_empty(), "delivered already moved with read");
}

#[test]
fn receipt_cursors_are_durable_and_drive_catch_up() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.step((1..=5).map(|i| alice.send(AB, i, b"m")).collect());
    // Receipts move the cached cursor at once and reach the store behind,
    // within the flush interval: a batch of receipts alone costs no sync
    // until the interval is up.
    h.step(vec![bob.frame(delivered(1))]);
    let before = h.core().store_fsyncs();
    h.step(vec![
        bob.frame(delivered(2)),
        bob.frame(delivered(4)),
        bob.frame(read(1)),
    ]);
    assert_eq!(h.core().store_fsyncs() - before, 0, "written behind");
    h.advance(2_000);
    h.step(vec![bob.frame(delivered(4))]);
    assert_eq!(
        h.core().store_fsyncs() - before,
        1,
        "flushed once the interval is up"
    );

    h.restart();
    let alice = alice.reconnect();
    h.connect(&alice);
    let bob = bob.reconnect();
    let got: Vec<u64> = super::messages(&h.connect(&bob))
        .iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(got, vec![5], "resumes after the stored delivered cursor");
    // Still monotonic after the restart.
    let out = h.step(vec![bob.frame(delivered(3))]);
    assert!(out.frames(&alice).is_empty());
    let out = h.step(vec![bob.frame(delivered(5))]);
    assert_eq!(out.frames(&alice).len(), 1);
}

#[test]
fn bad_receipts_get_bad_request_with_reference_zero() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let carol = h.client("carol", 1, 0);
    h.connect(&alice);
    h.connect(&carol);
    h.step(vec![alice.send(AB, 1, b"m")]);

    let bad = ErrorCode::BadRequest as u16;
    let cases = [
        (&alice, delivered(2)),
        (&alice, delivered(0)),
        (
            &alice,
            ClientFrame::Read {
                conversation: "d:x".into(),
                seq: 1,
            },
        ),
        (
            &alice,
            ClientFrame::Read {
                conversation: "d:alice:zed".into(),
                seq: 1,
            },
        ),
        (&carol, delivered(1)),
    ];
    for (client, frame) in cases {
        let out = h.step(vec![client.frame(frame)]);
        assert_eq!(out.errors(client), vec![(bad, 0)]);
    }
}

#[test]
fn group_receipts_are_stored_but_not_pushed() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    let out = h.step(vec![alice.frame(ClientFrame::GroupCreate {
        request: 1,
        members: vec!["bob".into()],
    })]);
    let Some(ServerFrame::GroupCreated { conversation, .. }) = out.frames(&alice).first().cloned()
    else {
        panic!()
    };
    h.step(vec![alice.send(&conversation, 1, b"m")]);
    let out = h.step(vec![bob.frame(ClientFrame::Read {
        conversation: conversation.clone(),
        seq: 2,
    })]);
    assert!(out.items.is_empty(), "not pushed");
    h.restart();
    let bob = bob.reconnect();
    h.connect(&bob);

    // A former member may still acknowledge up to its removal.
    h.step(vec![bob.frame(ClientFrame::GroupRemove {
        request: 2,
        conversation: conversation.clone(),
        members: vec!["bob".into()],
    })]);
    h.step(vec![alice.send(&conversation, 2, b"after")]);
    let out = h.step(vec![bob.frame(ClientFrame::Delivered {
        conversation: conversation.clone(),
        seq: 3,
    })]);
    assert!(out.errors(&bob).is_empty());
    let out = h.step(vec![bob.frame(ClientFrame::Delivered {
        conversation,
        seq: 4,
    })]);
    assert_eq!(out.errors(&bob), vec![(ErrorCode::BadRequest as u16, 0)]);
}
