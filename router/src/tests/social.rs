//! The conversation experience: receipts across devices and privacy,
//! group receipt summaries, linked devices, presence, typing, history, the
//! chat list and the catch-up summary.

use courier_protocol::close;
use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{
    settings, ClientFrame, ConversationSummary, ReceiptKind, ServerFrame,
};

use super::{Client, Harness, Out};
use crate::api::{Class, Command};

const AB: &str = "d:alice:bob";

/// The row for `conversation` of the `SyncSummary` `client` got in `out`.
fn summary_row(out: &Out, client: &Client, conversation: &str) -> ConversationSummary {
    out.frames(client)
        .into_iter()
        .find_map(|f| match f {
            ServerFrame::SyncSummary { conversations } => Some(conversations),
            _ => None,
        })
        .expect("a summary")
        .into_iter()
        .find(|r| r.conversation == conversation)
        .unwrap_or_else(|| panic!("no row for {conversation}"))
}

fn attach_issued(c: &Client, issued_at_s: u64) -> Command {
    Command::Attach {
        session: c.session,
        device: c.device.clone(),
        issued_at_s,
    }
}

fn detach_seen(c: &Client, last_seen_ms: u64) -> Command {
    Command::Detach {
        session: c.session,
        device: c.device.clone(),
        last_seen_ms,
    }
}

fn receipts(frames: &[ServerFrame]) -> Vec<(String, u64, ReceiptKind)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Receipt {
                user, seq, kind, ..
            } => Some((user.clone(), *seq, *kind)),
            _ => None,
        })
        .collect()
}

fn read(conversation: &str, seq: u64) -> ClientFrame {
    ClientFrame::Read {
        conversation: conversation.into(),
        seq,
    }
}

fn delivered(conversation: &str, seq: u64) -> ClientFrame {
    ClientFrame::Delivered {
        conversation: conversation.into(),
        seq,
    }
}

fn set(request: u32, mask: u8, flags: u8) -> ClientFrame {
    ClientFrame::Settings {
        request,
        mask,
        flags,
    }
}

fn summary_sync(c: &Client, tail: u16) -> Command {
    c.frame(ClientFrame::Sync {
        tail,
        summary: true,
        cursors: vec![],
    })
}

#[test]
fn a_read_on_one_device_reaches_the_users_other_devices_and_the_sender() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob1 = h.client("bob", 1, 0);
    let bob2 = h.client("bob", 2, 1);
    for c in [&alice, &bob1, &bob2] {
        h.connect(c);
    }
    h.step((1..=3).map(|i| alice.send(AB, i, b"m")).collect());

    // Delivered to one device of bob's is delivered to bob: once.
    let out = h.step(vec![bob1.frame(delivered(AB, 3))]);
    assert_eq!(
        receipts(&out.frames(&alice)),
        vec![("bob".into(), 3, ReceiptKind::Delivered)]
    );
    let out = h.step(vec![bob2.frame(delivered(AB, 3))]);
    assert!(out.frames(&alice).is_empty(), "bob's cursor did not move");

    // A read on bob2 tells alice, and bob1 (so its unread count clears),
    // but not bob2 itself.
    let out = h.step(vec![bob2.frame(read(AB, 2))]);
    assert_eq!(
        receipts(&out.frames(&alice)),
        vec![("bob".into(), 2, ReceiptKind::Read)]
    );
    assert_eq!(
        receipts(&out.frames(&bob1)),
        vec![("bob".into(), 2, ReceiptKind::Read)]
    );
    assert!(out.frames(&bob2).is_empty());
    // The same read from bob1 changes nothing for the user.
    let out = h.step(vec![bob1.frame(read(AB, 2))]);
    assert!(out.frames(&alice).is_empty());
    assert!(out.frames(&bob2).is_empty());
}

#[test]
fn a_peer_who_only_sent_counts_as_delivered_as_far_as_read() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.step(vec![alice.send(AB, 1, b"one")]);
    h.step(vec![alice.detach()]);
    // bob answers without a receipt: his send marks the conversation read
    // up to his message, and what he has read he has.
    h.step(vec![bob.send(AB, 1, b"two")]);
    let alice = alice.reconnect();
    let out = h.step(vec![alice.attach(), summary_sync(&alice, 0)]);
    let row = summary_row(&out, &alice, AB);
    assert_eq!((row.peer_delivered, row.peer_read), (2, 2), "{row:?}");
}

#[test]
fn receipts_made_while_the_sender_was_offline_reach_it_on_reconnect() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.step(vec![alice.send(AB, 1, b"one"), alice.send(AB, 2, b"two")]);
    h.step(vec![alice.detach()]);
    h.advance(10);
    h.step(vec![bob.frame(read(AB, 2))]);

    let alice = alice.reconnect();
    let out = h.step(vec![alice.attach(), summary_sync(&alice, 0)]);
    let row = summary_row(&out, &alice, AB);
    assert_eq!((row.peer_delivered, row.peer_read), (2, 2), "{row:?}");
    assert_eq!(row.last_seq, 2);

    // Once caught up, an unchanged conversation is not summarised again.
    h.advance(10);
    let alice = alice.reconnect();
    let out = h.step(vec![
        alice.attach(),
        alice.frame(ClientFrame::Sync {
            tail: 0,
            summary: true,
            cursors: vec![courier_protocol::frame::Cursor {
                conversation: AB.into(),
                seq: 2,
            }],
        }),
    ]);
    let rows: Vec<_> = out
        .frames(&alice)
        .into_iter()
        .filter_map(|f| match f {
            ServerFrame::SyncSummary { conversations } => Some(conversations),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(rows.is_empty(), "{rows:?}");
}

#[test]
fn read_receipts_off_on_either_side_suppress_read_both_ways() {
    for who_turns_off in ["alice", "bob"] {
        let mut h = Harness::new();
        let alice = h.client("alice", 1, 0);
        let bob = h.client("bob", 1, 0);
        h.connect(&alice);
        h.connect(&bob);
        let off = if who_turns_off == "alice" {
            &alice
        } else {
            &bob
        };
        let out = h.step(vec![off.frame(set(
            1,
            settings::READ_RECEIPTS_OFF,
            settings::READ_RECEIPTS_OFF,
        ))]);
        assert_eq!(
            out.frames(off),
            vec![ServerFrame::Settings {
                request: 1,
                flags: settings::READ_RECEIPTS_OFF
            }]
        );
        // Each reads the other's message: DELIVERED flows, READ does not.
        h.step(vec![alice.send(AB, 1, b"a")]);
        let out = h.step(vec![bob.frame(read(AB, 1))]);
        assert_eq!(
            receipts(&out.frames(&alice)),
            vec![("bob".to_string(), 1, ReceiptKind::Delivered)],
            "{who_turns_off} off"
        );
        h.step(vec![bob.send(AB, 1, b"b")]);
        let out = h.step(vec![alice.frame(read(AB, 2))]);
        assert_eq!(
            receipts(&out.frames(&bob)),
            vec![("alice".to_string(), 2, ReceiptKind::Delivered)],
            "{who_turns_off} off"
        );
        // Nor does it show in the summary.
        let alice = alice.reconnect();
        let out = h.step(vec![alice.attach(), summary_sync(&alice, 0)]);
        let row = out
            .frames(&alice)
            .into_iter()
            .find_map(|f| match f {
                ServerFrame::SyncSummary { conversations } => conversations.into_iter().next(),
                _ => None,
            })
            .expect("summary row");
        // Bob holds alice's message (seq 1); his own reply is not counted.
        assert_eq!((row.peer_delivered, row.peer_read), (1, 0));
    }
}

#[test]
fn group_receipt_summary_for_two_hundred_members() {
    let mut h = Harness::new();
    let owner = h.client("owner", 1, 0);
    h.connect(&owner);
    let names: Vec<String> = (0..199).map(|i| format!("m{i:03}")).collect();
    let out = h.step(vec![owner.frame(ClientFrame::GroupCreate {
        request: 1,
        members: names.clone(),
    })]);
    let group = match &out.frames(&owner)[0] {
        ServerFrame::GroupCreated { conversation, .. } => conversation.clone(),
        other => panic!("{other:?}"),
    };
    let members: Vec<Client> = names
        .iter()
        .enumerate()
        .map(|(i, n)| h.client(n, 1, (i % 2) as u16))
        .collect();
    for m in &members {
        h.connect(m);
    }
    let out = h.step(vec![owner.send(&group, 1, b"hello all")]);
    let seq = out.sent(&owner).0;
    // Nothing is pushed to the owner per member: 120 deliver, 50 of them read.
    let mut acks: Vec<Command> = members[..120]
        .iter()
        .map(|m| m.frame(delivered(&group, seq)))
        .collect();
    acks.extend(members[..50].iter().map(|m| m.frame(read(&group, seq))));
    // One member has read receipts off: counted delivered, not read.
    acks.push(members[0].frame(set(
        9,
        settings::READ_RECEIPTS_OFF,
        settings::READ_RECEIPTS_OFF,
    )));
    let out = h.step(acks);
    assert!(
        out.frames(&owner).is_empty(),
        "no per-member receipts pushed"
    );

    let out = h.step(vec![owner.frame(ClientFrame::ReceiptQuery {
        request: 7,
        conversation: group.clone(),
        seq,
    })]);
    match &out.frames(&owner)[..] {
        [ServerFrame::ReceiptSummary {
            request: 7,
            recipients,
            delivered,
            read,
            ..
        }] => {
            assert_eq!(*recipients, 199);
            assert_eq!(delivered.len(), 120);
            assert_eq!(read.len(), 49);
            assert!(!read.contains(&"m000".to_string()));
        }
        other => panic!("{other:?}"),
    }
    // Only the sender may ask.
    let out = h.step(vec![members[1].frame(ClientFrame::ReceiptQuery {
        request: 8,
        conversation: group,
        seq,
    })]);
    assert_eq!(
        out.errors(&members[1]),
        vec![(ErrorCode::NotMember as u16, 8)]
    );
}

#[test]
fn devices_are_limited_unlinked_and_refused_with_old_tokens() {
    let mut h = Harness::with(|c| c.max_devices = 2);
    let d1 = h.client("alice", 1, 0);
    let d2 = h.client("alice", 2, 0);
    let d3 = h.client("alice", 3, 0);
    h.step(vec![attach_issued(&d1, 100), attach_issued(&d2, 100)]);
    let out = h.step(vec![attach_issued(&d3, 100)]);
    assert_eq!(out.closes(), vec![(d3.session, close::DEVICE_LIMIT)]);

    let out = h.step(vec![d1.frame(ClientFrame::DeviceList { request: 1 })]);
    match &out.frames(&d1)[..] {
        [ServerFrame::Devices { devices, .. }] => {
            let ids: Vec<u32> = devices.iter().map(|d| d.device).collect();
            assert_eq!(ids, vec![1, 2]);
            assert!(devices.iter().all(|d| d.online));
        }
        other => panic!("{other:?}"),
    }

    // d1 unlinks d2: d2's session is closed, its old token refused.
    let out = h.step(vec![d1.frame(ClientFrame::DeviceRemove {
        request: 2,
        device: 2,
    })]);
    assert_eq!(out.frames(&d1), vec![ServerFrame::Done { request: 2 }]);
    assert_eq!(out.closes(), vec![(d2.session, close::DEVICE_REMOVED)]);
    h.step(vec![d2.detach()]);
    let d2b = d2.reconnect();
    let out = h.step(vec![attach_issued(&d2b, 100)]);
    assert_eq!(out.closes(), vec![(d2b.session, close::DEVICE_REMOVED)]);
    // A slot is free again for a new device, and d2 may re-link with a
    // token issued after its removal.
    let out = h.step(vec![attach_issued(&d3, 100)]);
    assert!(out.closes().is_empty());
    let d2c = d2b.reconnect();
    let later = h.now_ms / 1000 + 1;
    let out = h.step(vec![attach_issued(&d2c, later)]);
    assert_eq!(out.closes(), vec![(d2c.session, close::DEVICE_LIMIT)]);
    let out = h.step(vec![d1.frame(ClientFrame::DeviceRemove {
        request: 3,
        device: 9,
    })]);
    assert_eq!(out.errors(&d1), vec![(ErrorCode::BadRequest as u16, 3)]);

    // Device records survive a restart.
    h.restart();
    let d2d = d2c.reconnect();
    let out = h.step(vec![attach_issued(&d2d, 100)]);
    assert_eq!(out.closes(), vec![(d2d.session, close::DEVICE_REMOVED)]);
}

#[test]
fn presence_is_pulled_pushed_to_subscribers_debounced_and_can_hide_last_seen() {
    let mut h = Harness::with(|c| c.presence_debounce = std::time::Duration::from_secs(5));
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    let carol = h.client("carol", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.connect(&carol);
    let out = h.step(vec![alice.frame(ClientFrame::PresenceSubscribe {
        request: 1,
        users: vec!["bob".into()],
    })]);
    match &out.frames(&alice)[..] {
        [ServerFrame::Presence {
            request: 1,
            entries,
        }] => {
            assert!(entries[0].online);
        }
        other => panic!("{other:?}"),
    }

    // A flap: gone and back within the debounce window is never told.
    h.step(vec![detach_seen(&bob, 1)]);
    h.advance(2_000);
    let bob = bob.reconnect();
    let out = h.step(vec![bob.attach()]);
    assert!(out.frames(&alice).is_empty());
    h.advance(10_000);
    let out = h.step(vec![]);
    assert!(
        out.frames(&alice).is_empty(),
        "no late offline after a flap"
    );

    // Gone for good: told once the window has passed, with last seen.
    let seen = h.now_ms - 500;
    h.step(vec![detach_seen(&bob, seen)]);
    h.advance(4_000);
    assert!(h.step(vec![]).frames(&alice).is_empty(), "still debounced");
    h.advance(2_000);
    let out = h.step(vec![]);
    match &out.classified(&alice)[..] {
        [(
            Class::Ephemeral,
            ServerFrame::Presence {
                request: 0,
                entries,
            },
        )] => {
            assert!(!entries[0].online);
            assert_eq!(entries[0].last_seen_ms, seen);
        }
        other => panic!("{other:?}"),
    }
    // Carol did not subscribe: told nothing, but may ask.
    assert!(out.frames(&carol).is_empty());

    // Hidden last seen.
    let bob = bob.reconnect();
    h.step(vec![
        bob.attach(),
        bob.frame(set(2, settings::HIDE_LAST_SEEN, settings::HIDE_LAST_SEEN)),
    ]);
    h.step(vec![detach_seen(&bob, h.now_ms)]);
    h.advance(6_000);
    let out = h.step(vec![carol.frame(ClientFrame::PresenceQuery {
        request: 3,
        users: vec!["bob".into(), "nobody".into()],
    })]);
    match &out.frames(&carol)[..] {
        [ServerFrame::Presence { entries, .. }] => {
            assert_eq!(entries.len(), 2);
            assert!(!entries[0].online);
            assert_eq!(entries[0].last_seen_ms, 0, "hidden");
            assert!(!entries[1].online);
        }
        other => panic!("{other:?}"),
    }
    // Too many subscriptions.
    let many: Vec<String> = (0..17).map(|i| format!("u{i}")).collect();
    let out = h.step(vec![carol.frame(ClientFrame::PresenceSubscribe {
        request: 4,
        users: many,
    })]);
    assert_eq!(out.errors(&carol), vec![(ErrorCode::BadRequest as u16, 4)]);
}

#[test]
fn presence_writes_are_spread_at_the_configured_rate() {
    let mut h = Harness::with(|c| {
        c.presence_writes_per_s = 100.0;
        c.presence_debounce = std::time::Duration::ZERO;
    });
    let clients: Vec<Client> = (0..500).map(|i| h.client(&format!("u{i}"), 1, 0)).collect();
    h.step(clients.iter().map(|c| c.attach()).collect());
    h.advance(1_000);
    h.step(vec![]);
    // A mass disconnect: 500 last-seen records to write.
    h.step(clients.iter().map(|c| detach_seen(c, 5)).collect());
    let written = |h: &Harness| -> u64 {
        let text = h.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix("courier_presence_writes_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let start = written(&h);
    for _ in 0..10 {
        h.advance(100);
        h.step(vec![]);
    }
    let in_one_second = written(&h) - start;
    assert!(
        (90..=210).contains(&in_one_second),
        "about 100 writes a second, got {in_one_second}"
    );
    for _ in 0..60 {
        h.advance(100);
        h.step(vec![]);
    }
    assert!(h
        .metrics_text()
        .contains("courier_presence_pending_writes 0"));
}

#[test]
fn presence_writes_go_on_after_the_clock_steps_back() {
    let mut h = Harness::with(|c| {
        c.presence_writes_per_s = 100.0;
        c.presence_debounce = std::time::Duration::ZERO;
    });
    let clients: Vec<Client> = (0..200).map(|i| h.client(&format!("u{i}"), 1, 0)).collect();
    h.step(clients.iter().map(|c| c.attach()).collect());
    h.advance(1_000);
    h.step(vec![]);
    h.step(clients.iter().map(|c| detach_seen(c, 5)).collect());
    // The wall clock steps back an hour; the writes must go on at their
    // rate from there, not wait for the clock to come back.
    h.now_ms -= 3_600_000;
    for _ in 0..40 {
        h.advance(100);
        h.step(vec![]);
    }
    assert!(
        h.metrics_text()
            .contains("courier_presence_pending_writes 0"),
        "presence writes stalled after the clock stepped back"
    );
}

#[test]
fn typing_is_relayed_expires_ends_with_the_message_and_is_rate_limited() {
    let mut h = Harness::with(|c| {
        c.typing_ttl = std::time::Duration::from_secs(6);
        c.typing_burst = 3.0;
        c.typing_rate_per_s = 1.0;
    });
    let alice = h.client("alice", 1, 0);
    let alice2 = h.client("alice", 2, 0);
    let bob = h.client("bob", 1, 0);
    let eve = h.client("eve", 1, 0);
    for c in [&alice, &alice2, &bob, &eve] {
        h.connect(c);
    }
    let typing = |active| {
        alice.frame(ClientFrame::Typing {
            conversation: AB.into(),
            active,
        })
    };
    let out = h.step(vec![typing(true)]);
    match &out.classified(&bob)[..] {
        [(
            Class::Ephemeral,
            ServerFrame::Typing {
                user,
                active: true,
                ttl_ms: 6000,
                ..
            },
        )] => {
            assert_eq!(user, "alice")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        out.frames(&alice2).is_empty(),
        "not to the typist's own devices"
    );
    assert!(out.frames(&eve).is_empty());

    // The server ends it after the TTL.
    h.advance(6_001);
    let out = h.step(vec![]);
    assert!(matches!(
        &out.frames(&bob)[..],
        [ServerFrame::Typing { active: false, .. }]
    ));

    // A message ends it without a stop event, and no late expiry follows.
    h.step(vec![typing(true)]);
    let out = h.step(vec![alice.send(AB, 1, b"hi")]);
    assert_eq!(out.messages(&bob).len(), 1);
    h.advance(7_000);
    let out = h.step(vec![]);
    assert!(out.frames(&bob).is_empty(), "{:?}", out.frames(&bob));

    // Over the rate (a burst of 3): the fourth at once is refused with 429
    // and not relayed.
    let out = h.step((0..4).map(|_| typing(true)).collect());
    assert_eq!(out.errors(&alice), vec![(ErrorCode::RateLimited as u16, 0)]);
    assert_eq!(out.frames(&bob).len(), 3);

    // Not a member.
    let out = h.step(vec![eve.frame(ClientFrame::Typing {
        conversation: AB.into(),
        active: true,
    })]);
    assert_eq!(out.errors(&eve), vec![(ErrorCode::NotMember as u16, 0)]);
}

#[test]
fn history_pages_backwards_within_membership() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    let eve = h.client("eve", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.connect(&eve);
    h.step((1..=25).map(|i| alice.send(AB, i, b"m")).collect());
    let page = |h: &mut Harness, before_seq| {
        let out = h.step(vec![bob.frame(ClientFrame::History {
            request: 5,
            conversation: AB.into(),
            before_seq,
            limit: 10,
        })]);
        match out.frames(&bob).pop() {
            Some(ServerFrame::History { entries, more, .. }) => {
                (entries.iter().map(|e| e.seq).collect::<Vec<_>>(), more)
            }
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(page(&mut h, 0), ((16..=25).collect(), true));
    assert_eq!(page(&mut h, 16), ((6..=15).collect(), true));
    assert_eq!(page(&mut h, 6), ((1..=5).collect(), false));
    let out = h.step(vec![eve.frame(ClientFrame::History {
        request: 6,
        conversation: AB.into(),
        before_seq: 0,
        limit: 10,
    })]);
    assert_eq!(out.errors(&eve), vec![(ErrorCode::NotMember as u16, 6)]);
}

#[test]
fn catch_up_tail_leaves_older_entries_behind_and_says_where() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.step((1..=30).map(|i| alice.send(AB, i, b"m")).collect());
    h.advance(5);
    h.step(vec![alice.send("d:alice:carol", 100, b"c")]);
    let out = h.step(vec![bob.attach(), summary_sync(&bob, 10)]);
    let frames = out.frames(&bob);
    let ServerFrame::SyncSummary { conversations } = &frames[0] else {
        panic!("summary first: {frames:?}")
    };
    assert_eq!(conversations.len(), 1);
    let row = &conversations[0];
    assert_eq!(
        (row.last_seq, row.delivered, row.from_seq, row.unread),
        (30, 0, 21, 30)
    );
    let seqs: Vec<u64> = super::messages(&frames).iter().map(|m| m.1).collect();
    assert_eq!(seqs, (21..=30).collect::<Vec<_>>());
    assert_eq!(frames.last(), Some(&ServerFrame::SyncDone { more: false }));

    // Alice sees her conversations newest first in catch-up.
    let alice = alice.reconnect();
    let out = h.step(vec![alice.attach(), summary_sync(&alice, 1)]);
    let convs: Vec<String> = super::messages(&out.frames(&alice))
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(convs, vec!["d:alice:carol".to_string(), AB.to_string()]);
}

#[test]
fn four_devices_agree_on_the_chat_list_and_unread_counts() {
    let mut h = Harness::new();
    let devices: Vec<Client> = (1..=4)
        .map(|d| h.client("bob", d, (d % 2) as u16))
        .collect();
    let alice = h.client("alice", 1, 0);
    let carol = h.client("carol", 1, 0);
    for c in devices.iter().chain([&alice, &carol]) {
        h.connect(c);
    }
    h.step((1..=5).map(|i| alice.send(AB, i, b"a")).collect());
    h.advance(10);
    h.step(
        (1..=3)
            .map(|i| carol.send("d:bob:carol", i, b"c"))
            .collect(),
    );
    h.advance(10);
    // Bob reads two of alice's on device 3, and replies to carol on device 2.
    h.step(vec![devices[2].frame(read(AB, 2))]);
    h.step(vec![devices[1].send("d:bob:carol", 1, b"r")]);

    let list = |h: &mut Harness, c: &Client| {
        let out = h.step(vec![c.frame(ClientFrame::ChatList {
            request: 1,
            before_ms: 0,
            before_conversation: String::new(),
            limit: 0,
        })]);
        match out.frames(c).pop() {
            Some(ServerFrame::Chats {
                chats, more: false, ..
            }) => chats
                .into_iter()
                .map(|c| (c.conversation, c.last_seq, c.read_seq, c.unread))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        }
    };
    let expect = vec![
        ("d:bob:carol".to_string(), 4, 4, 0),
        (AB.to_string(), 5, 2, 3),
    ];
    for d in &devices {
        assert_eq!(list(&mut h, d), expect);
    }
    // After a reconnect (and a restart) every device still agrees.
    h.advance(2_000);
    h.step(vec![]);
    h.restart();
    for d in &devices {
        let d = d.reconnect();
        h.connect(&d);
        assert_eq!(list(&mut h, &d), expect);
    }
    // Paging: one at a time.
    let d = devices[0].reconnect().reconnect();
    h.connect(&d);
    let out = h.step(vec![d.frame(ClientFrame::ChatList {
        request: 2,
        before_ms: 0,
        before_conversation: String::new(),
        limit: 1,
    })]);
    let Some(ServerFrame::Chats {
        chats, more: true, ..
    }) = out.frames(&d).pop()
    else {
        panic!("first page")
    };
    let out = h.step(vec![d.frame(ClientFrame::ChatList {
        request: 3,
        before_ms: chats[0].last_ms,
        before_conversation: chats[0].conversation.clone(),
        limit: 1,
    })]);
    let Some(ServerFrame::Chats {
        chats, more: false, ..
    }) = out.frames(&d).pop()
    else {
        panic!("second page")
    };
    assert_eq!(chats[0].conversation, AB);
}

#[test]
fn a_removed_device_frees_its_slot_for_a_refused_one() {
    let mut h = Harness::new();
    let d: Vec<Client> = (1..=5).map(|i| h.client("dana", i, 0)).collect();
    for c in &d[..4] {
        h.step(vec![attach_issued(c, 100), c.sync(vec![])]);
    }
    let out = h.step(vec![attach_issued(&d[4], 100)]);
    assert_eq!(out.closes(), vec![(d[4].session, close::DEVICE_LIMIT)]);
    h.step(vec![d[4].detach()]);
    let out = h.step(vec![d[0].frame(ClientFrame::DeviceRemove {
        request: 1,
        device: 4,
    })]);
    assert_eq!(out.closes(), vec![(d[3].session, close::DEVICE_REMOVED)]);
    h.step(vec![detach_seen(&d[3], 5)]);
    let again = d[3].reconnect();
    let out = h.step(vec![attach_issued(&again, 100)]);
    assert_eq!(out.closes(), vec![(again.session, close::DEVICE_REMOVED)]);
    h.step(vec![again.detach()]);
    let fifth = d[4].reconnect();
    let out = h.step(vec![attach_issued(&fifth, 100)]);
    assert!(out.closes().is_empty(), "{:?}", out.closes());
}

#[test]
fn a_reply_reads_what_it_answers_and_says_so_once() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    h.step(vec![alice.send(AB, 1, b"question")]);
    // Bob replies without a Read: alice learns bob read up to his reply.
    let out = h.step(vec![bob.send(AB, 1, b"answer")]);
    assert_eq!(out.messages(&alice).len(), 1);
    assert_eq!(
        receipts(&out.frames(&alice)),
        vec![("bob".into(), 2, ReceiptKind::Read)]
    );
    // A second message of bob's answers nothing new: no receipt.
    let out = h.step(vec![bob.send(AB, 2, b"and more")]);
    assert!(receipts(&out.frames(&alice)).is_empty());
    // Delivered of alice's message still flows when bob's device acks it.
    let out = h.step(vec![bob.frame(delivered(AB, 1))]);
    assert_eq!(
        receipts(&out.frames(&alice)),
        vec![("bob".into(), 1, ReceiptKind::Delivered)]
    );
}
