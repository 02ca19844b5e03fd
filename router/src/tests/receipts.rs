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
    // within the flush interval; a batch of receipts alone costs no sync,
    // even the one that writes them: the next batch that syncs covers them.
    h.step(vec![bob.frame(delivered(1))]);
    let before = h.core().store_fsyncs();
    h.step(vec![
        bob.frame(delivered(2)),
        bob.frame(delivered(4)),
        bob.frame(read(1)),
    ]);
    assert_eq!(h.core().store_fsyncs() - before, 0, "written behind");
    h.advance(6_000);
    let written = h.core().store_writes();
    h.step(vec![bob.frame(delivered(4))]);
    assert_eq!(
        h.core().store_writes() - written,
        1,
        "written once the interval is up"
    );
    assert_eq!(
        h.core().store_fsyncs() - before,
        0,
        "with no sync of its own"
    );
    h.step(vec![alice.send(AB, 6, b"m")]);
    assert_eq!(
        h.core().store_fsyncs() - before,
        1,
        "a send's sync covers it"
    );

    h.restart();
    let alice = alice.reconnect();
    h.connect(&alice);
    let bob = bob.reconnect();
    let got: Vec<u64> = super::messages(&h.connect(&bob))
        .iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(got, vec![5, 6], "resumes after the stored delivered cursor");
    // Still monotonic after the restart.
    let out = h.step(vec![bob.frame(delivered(3))]);
    assert!(out.frames(&alice).is_empty());
    let out = h.step(vec![bob.frame(delivered(5))]);
    assert_eq!(out.frames(&alice).len(), 1);
}

#[test]
fn on_a_quiet_node_the_idle_tick_syncs_cursors_written_without_a_sync() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.step(vec![alice.send(AB, 1, b"m")]);
    h.step(vec![bob.frame(read(1))]);
    h.advance(6_000);
    // The read cursor reaches the store with the next batch, unsynced.
    let (written, synced) = (h.core().store_writes(), h.core().store_fsyncs());
    h.step(vec![]);
    assert_eq!(h.core().store_writes() - written, 1);
    assert_eq!(h.core().store_fsyncs() - synced, 0, "not synced yet");
    h.advance(4_000);
    h.step(vec![]);
    assert_eq!(h.core().store_fsyncs() - synced, 0, "not due yet");
    h.advance(1_000);
    h.step(vec![]);
    assert_eq!(h.core().store_fsyncs() - synced, 1, "the tick syncs it");
    h.advance(10_000);
    h.step(vec![]);
    assert_eq!(h.core().store_fsyncs() - synced, 1, "and only once");
}

#[test]
fn a_receipt_writes_only_its_devices_cursor_and_the_users_is_derived() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob1 = h.client("bob", 1, 0);
    let bob2 = h.client("bob", 2, 1);
    for c in [&alice, &bob1, &bob2] {
        h.connect(c);
    }
    h.step((1..=4).map(|i| alice.send(AB, i, b"m")).collect());
    // Bob's first device gets 1..=2, his second reads up to 3.
    h.step(vec![bob1.frame(delivered(2))]);
    let out = h.step(vec![bob2.frame(read(3))]);
    assert_eq!(
        out.frames(&bob1),
        vec![ServerFrame::Receipt {
            conversation: AB.into(),
            seq: 3,
            user: "bob".into(),
            device: 2,
            kind: ReceiptKind::Read,
        }],
        "the user's read cursor moved: his other device hears it"
    );
    h.advance(6_000);
    h.step(vec![]);
    let stored = |h: &Harness, user: &str, device: u32| {
        let c = h.core.as_ref().unwrap().stored_cursor(user, device, AB);
        (c.delivered, c.read)
    };
    assert_eq!(stored(&h, "bob", 1), (2, 0));
    assert_eq!(stored(&h, "bob", 2), (3, 3));
    assert_eq!(stored(&h, "bob", 0), (0, 0), "no user record written");
    // A send is the one thing that writes the user's own record: alice's
    // read cursor moved to her last message without any device reading.
    assert_eq!(stored(&h, "alice", 0), (0, 4));

    // Unlinking the device that read does not take the user's read back,
    // also after a restart.
    let out = h.step(vec![bob1.frame(ClientFrame::DeviceRemove {
        request: 1,
        device: 2,
    })]);
    assert_eq!(out.frames(&bob1), vec![ServerFrame::Done { request: 1 }]);
    h.restart();
    let bob1 = bob1.reconnect();
    h.connect(&bob1);
    let out = h.step(vec![bob1.frame(ClientFrame::ChatList {
        request: 2,
        before_ms: 0,
        before_conversation: String::new(),
        limit: 0,
    })]);
    match out.frames(&bob1).pop() {
        Some(ServerFrame::Chats { chats, .. }) => {
            let c = &chats[0];
            assert_eq!((c.last_seq, c.read_seq, c.unread), (4, 3, 1));
        }
        other => panic!("{other:?}"),
    }
    // The user's delivered cursor is 3 (from the read): a Delivered of 3
    // by the first device moves only that device, and nobody is told.
    let alice = alice.reconnect();
    h.connect(&alice);
    let out = h.step(vec![bob1.frame(delivered(3))]);
    assert!(out.frames(&alice).is_empty(), "{:?}", out.items);
    let out = h.step(vec![bob1.frame(delivered(4))]);
    assert_eq!(out.frames(&alice).len(), 1, "delivered moved to 4");
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
