//! The conversation experience over real sockets: receipts reaching an
//! offline sender, group receipt summaries, read-receipt privacy, linked
//! devices agreeing on the chat list, typing, presence and device limits.
//! Runs under both monoio drivers (`COURIER_DRIVER`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestNode, TIMEOUT};
use courier_protocol::close;
use courier_protocol::frame::{
    settings, Chat, ClientFrame, ConversationSummary, ReceiptKind, ServerFrame,
};
use courier_protocol::ids::direct_conversation;

/// Reads frames until one matches `pick`, skipping others.
fn wait_for<T>(c: &mut Client, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if let Some(f) = c.try_next(Duration::from_millis(200)) {
            if let Some(t) = pick(&f) {
                return t;
            }
        }
    }
    panic!("the expected frame did not arrive")
}

/// Connects and runs a summary catch-up; returns the summary rows.
fn connect_with_summary(
    node: &TestNode,
    user: &str,
    device: u32,
) -> (Client, Vec<ConversationSummary>) {
    let mut c = node.connect(user, device);
    c.send(&ClientFrame::Sync {
        tail: 0,
        summary: true,
        cursors: vec![],
    });
    let mut rows = Vec::new();
    loop {
        match c.next() {
            ServerFrame::SyncSummary { conversations } => rows.extend(conversations),
            ServerFrame::SyncDone { more: false } => return (c, rows),
            ServerFrame::SyncDone { more: true } => panic!("one page expected"),
            _ => {}
        }
    }
}

fn settings_off(c: &mut Client, bits: u8) {
    c.send(&ClientFrame::Settings {
        request: 77,
        mask: bits,
        flags: bits,
    });
    wait_for(c, |f| {
        matches!(f, ServerFrame::Settings { request: 77, .. }).then_some(())
    });
}

#[test]
fn a_receipt_made_while_the_sender_was_offline_reaches_it_on_reconnect() {
    let node = TestNode::start(&[]);
    let conv = direct_conversation("alice", "bob");
    let (mut alice, _) = node.online("alice", 1);
    let (mut bob, _) = node.online("bob", 1);
    let seq = alice.send_acked(&conv, 1, b"are you there?");
    wait_for(&mut bob, |f| {
        matches!(f, ServerFrame::Message { .. }).then_some(())
    });
    drop(alice);
    // Give the gateway time to see alice gone, then bob reads.
    std::thread::sleep(Duration::from_millis(300));
    bob.send(&ClientFrame::Read {
        conversation: conv.clone(),
        seq,
    });
    std::thread::sleep(Duration::from_millis(300));

    let (_alice, rows) = connect_with_summary(&node, "alice", 1);
    let row = rows.iter().find(|r| r.conversation == conv).expect("row");
    assert_eq!((row.peer_delivered, row.peer_read), (seq, seq), "{row:?}");
}

#[test]
fn a_two_hundred_member_group_reports_who_delivered_and_read() {
    let node = TestNode::start(&[]);
    let (mut owner, _) = node.online("owner", 1);
    let names: Vec<String> = (0..199).map(|i| format!("member{i:03}")).collect();
    let mut members: Vec<Client> = names.iter().map(|n| node.online(n, 1).0).collect();
    owner.send(&ClientFrame::GroupCreate {
        request: 1,
        members: names.clone(),
    });
    let group = wait_for(&mut owner, |f| match f {
        ServerFrame::GroupCreated { conversation, .. } => Some(conversation.clone()),
        _ => None,
    });
    let seq = owner.send_acked(&group, 1, b"hello everyone");
    for (i, m) in members.iter_mut().enumerate() {
        wait_for(m, |f| match f {
            ServerFrame::Message { seq: s, .. } if *s == seq => Some(()),
            _ => None,
        });
        if i < 150 {
            m.send(&ClientFrame::Delivered {
                conversation: group.clone(),
                seq,
            });
        }
        if i < 60 {
            m.send(&ClientFrame::Read {
                conversation: group.clone(),
                seq,
            });
        }
    }
    // The receipts reach the router from every core; ask until all are in.
    let deadline = Instant::now() + TIMEOUT;
    let (recipients, delivered, read) = loop {
        owner.send(&ClientFrame::ReceiptQuery {
            request: 9,
            conversation: group.clone(),
            seq,
        });
        let got = wait_for(&mut owner, |f| match f {
            ServerFrame::ReceiptSummary {
                request: 9,
                recipients,
                delivered,
                read,
                ..
            } => Some((*recipients, delivered.clone(), read.clone())),
            ServerFrame::Receipt { .. } => panic!("no per-member receipt is pushed in a group"),
            _ => None,
        });
        if got.1.len() == 150 && got.2.len() == 60 || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(recipients, 199);
    assert_eq!(delivered.len(), 150, "delivered to 150 of 199");
    assert_eq!(read.len(), 60, "read by 60 of 199");
    assert!(read.iter().all(|u| delivered.contains(u)));
}

#[test]
fn read_receipts_off_on_either_side_suppress_read_both_ways() {
    for off in ["alice", "bob"] {
        let dir = tempfile::tempdir().unwrap();
        let node = TestNode::start_in(dir.path(), &[]);
        let conv = direct_conversation("alice", "bob");
        let (mut alice, _) = node.online("alice", 1);
        let (mut bob, _) = node.online("bob", 1);
        settings_off(
            if off == "alice" { &mut alice } else { &mut bob },
            settings::READ_RECEIPTS_OFF,
        );

        let seq = alice.send_acked(&conv, 1, b"one");
        wait_for(&mut bob, |f| {
            matches!(f, ServerFrame::Message { .. }).then_some(())
        });
        bob.send(&ClientFrame::Read {
            conversation: conv.clone(),
            seq,
        });
        let kind = wait_for(&mut alice, |f| match f {
            ServerFrame::Receipt { kind, seq: s, .. } if *s == seq => Some(*kind),
            _ => None,
        });
        assert_eq!(
            kind,
            ReceiptKind::Delivered,
            "{off} off: bob's read is not told"
        );

        let seq = bob.send_acked(&conv, 1, b"two");
        wait_for(&mut alice, |f| {
            matches!(f, ServerFrame::Message { .. }).then_some(())
        });
        alice.send(&ClientFrame::Read {
            conversation: conv.clone(),
            seq,
        });
        let kind = wait_for(&mut bob, |f| match f {
            ServerFrame::Receipt { kind, seq: s, .. } if *s == seq => Some(*kind),
            _ => None,
        });
        assert_eq!(
            kind,
            ReceiptKind::Delivered,
            "{off} off: alice's read is not told"
        );
        // And nothing else follows.
        assert!(bob.try_next(Duration::from_millis(300)).is_none());
        node.stop();
    }
}

fn chat_list(c: &mut Client) -> Vec<Chat> {
    c.send(&ClientFrame::ChatList {
        request: 3,
        before_ms: 0,
        before_conversation: String::new(),
        limit: 0,
    });
    wait_for(c, |f| match f {
        ServerFrame::Chats {
            request: 3, chats, ..
        } => Some(chats.clone()),
        _ => None,
    })
}

fn listed(chats: &[Chat]) -> Vec<(String, u64, u64, u64)> {
    chats
        .iter()
        .map(|c| (c.conversation.clone(), c.last_seq, c.read_seq, c.unread))
        .collect()
}

#[test]
fn four_devices_of_one_user_converge_on_the_chat_list_and_unread_counts() {
    let node = TestNode::start(&[]);
    let ab = direct_conversation("alice", "bob");
    let bc = direct_conversation("bob", "carol");
    let mut bobs: Vec<Client> = (1..=4).map(|d| node.online("bob", d).0).collect();
    let (mut alice, _) = node.online("alice", 1);
    let (mut carol, _) = node.online("carol", 1);
    for i in 1..=5 {
        alice.send_acked(&ab, i, b"from alice");
    }
    std::thread::sleep(Duration::from_millis(20));
    for i in 1..=3 {
        carol.send_acked(&bc, i, b"from carol");
    }
    // Every device gets all eight messages.
    for b in &mut bobs {
        let mut n = 0;
        wait_for(b, |f| {
            if matches!(f, ServerFrame::Message { .. }) {
                n += 1;
            }
            (n == 8).then_some(())
        });
    }
    // Device 3 reads two of alice's; device 2 replies to carol.
    bobs[2].send(&ClientFrame::Read {
        conversation: ab.clone(),
        seq: 2,
    });
    for (i, b) in bobs.iter_mut().enumerate() {
        if i != 2 {
            // The read is reflected on the other devices.
            wait_for(b, |f| match f {
                ServerFrame::Receipt {
                    kind: ReceiptKind::Read,
                    seq: 2,
                    user,
                    ..
                } if user == "bob" => Some(()),
                _ => None,
            });
        }
    }
    bobs[1].send_acked(&bc, 100, b"reply");

    let expect = vec![(bc.clone(), 4, 4, 0), (ab.clone(), 5, 2, 3)];
    for b in &mut bobs {
        assert_eq!(listed(&chat_list(b)), expect);
    }
    // Reconnect every device, after a restart: still the same.
    drop(bobs);
    drop(alice);
    drop(carol);
    let node = node.restart(&[]);
    for d in 1..=4 {
        let (mut b, rows) = connect_with_summary(&node, "bob", d);
        assert_eq!(listed(&chat_list(&mut b)), expect, "device {d}");
        for row in rows {
            let want = expect.iter().find(|e| e.0 == row.conversation).unwrap();
            assert_eq!(row.unread, want.3, "summary unread of {}", row.conversation);
        }
    }
}

#[test]
fn typing_is_relayed_and_presence_is_pushed_to_subscribers() {
    let node = TestNode::start(&["--presence-debounce-ms", "200"]);
    let conv = direct_conversation("alice", "bob");
    let (mut alice, _) = node.online("alice", 1);
    let (mut bob, _) = node.online("bob", 1);
    alice.send(&ClientFrame::Typing {
        conversation: conv.clone(),
        active: true,
    });
    let (user, ttl) = wait_for(&mut bob, |f| match f {
        ServerFrame::Typing {
            user,
            active: true,
            ttl_ms,
            ..
        } => Some((user.clone(), *ttl_ms)),
        _ => None,
    });
    assert_eq!((user.as_str(), ttl), ("alice", 6000));

    bob.send(&ClientFrame::PresenceSubscribe {
        request: 4,
        users: vec!["alice".into()],
    });
    let online = wait_for(&mut bob, |f| match f {
        ServerFrame::Presence {
            request: 4,
            entries,
        } => Some(entries[0].online),
        _ => None,
    });
    assert!(online);
    let before = common::now_s() * 1000;
    drop(alice);
    let entry = wait_for(&mut bob, |f| match f {
        ServerFrame::Presence {
            request: 0,
            entries,
        } => Some(entries[0].clone()),
        _ => None,
    });
    assert!(!entry.online);
    assert!(entry.last_seen_ms + 2_000 >= before, "{entry:?}");
}

#[test]
fn a_fifth_device_is_refused_and_an_unlinked_one_is_closed() {
    let node = TestNode::start(&[]);
    let mut devices: Vec<Client> = (1..=4).map(|d| node.online("dana", d).0).collect();
    // The session opens (Welcome) and is then closed by the router.
    let mut fifth = node.connect("dana", 5);
    assert_eq!(fifth.expect_close().0, close::DEVICE_LIMIT);

    devices[0].send(&ClientFrame::DeviceRemove {
        request: 1,
        device: 4,
    });
    wait_for(&mut devices[0], |f| {
        matches!(f, ServerFrame::Done { request: 1 }).then_some(())
    });
    assert_eq!(devices[3].expect_close().0, close::DEVICE_REMOVED);
    // Its old token is refused from now on.
    let mut again = node.connect("dana", 4);
    assert_eq!(again.expect_close().0, close::DEVICE_REMOVED);
    // The freed slot takes the fifth device.
    let (mut fifth, _) = node.online("dana", 5);
    fifth.send(&ClientFrame::DeviceList { request: 2 });
    let ids = wait_for(&mut fifth, |f| match f {
        ServerFrame::Devices {
            request: 2,
            devices,
        } => Some(devices.iter().map(|d| d.device).collect::<Vec<_>>()),
        _ => None,
    });
    assert_eq!(ids, vec![1, 2, 3, 5]);
}

#[test]
fn an_outsider_can_neither_read_nor_write_nor_see_receipts_of_a_conversation() {
    let node = TestNode::start(&[]);
    let conv = direct_conversation("alice", "bob");
    let (mut alice, _) = node.online("alice", 1);
    let (mut bob, _) = node.online("bob", 1);
    let seq = alice.send_acked(&conv, 1, b"for bob only");
    alice.send(&ClientFrame::GroupCreate {
        request: 2,
        members: vec!["bob".into()],
    });
    let group = wait_for(&mut alice, |f| match f {
        ServerFrame::GroupCreated { conversation, .. } => Some(conversation.clone()),
        _ => None,
    });
    let gseq = alice.send_acked(&group, 3, b"group secret");
    wait_for(&mut bob, |f| {
        matches!(f, ServerFrame::Message { seq: 2, .. }).then_some(())
    });

    let (mut eve, caught_up) = node.online("eve", 1);
    assert!(caught_up
        .iter()
        .all(|f| !matches!(f, ServerFrame::Message { .. })));
    let code = |f: &ServerFrame, want: u64| match f {
        ServerFrame::Error {
            code, reference, ..
        } if *reference == want => Some(*code),
        _ => None,
    };
    // Send, history, receipts, typing, members: refused.
    eve.send_text(&conv, 10, b"let me in");
    assert_eq!(wait_for(&mut eve, |f| code(f, 10)), 403);
    eve.send_text(&group, 11, b"let me in");
    assert_eq!(wait_for(&mut eve, |f| code(f, 11)), 403);
    for (request, conversation) in [(12u32, &conv), (13, &group)] {
        eve.send(&ClientFrame::History {
            request,
            conversation: conversation.clone(),
            before_seq: 0,
            limit: 10,
        });
        assert_eq!(wait_for(&mut eve, |f| code(f, u64::from(request))), 403);
    }
    eve.send(&ClientFrame::ReceiptQuery {
        request: 14,
        conversation: group.clone(),
        seq: gseq,
    });
    assert_eq!(wait_for(&mut eve, |f| code(f, 14)), 403);
    eve.send(&ClientFrame::GroupMembers {
        request: 15,
        conversation: group.clone(),
    });
    assert_eq!(wait_for(&mut eve, |f| code(f, 15)), 403);
    eve.send(&ClientFrame::Typing {
        conversation: conv.clone(),
        active: true,
    });
    assert_eq!(wait_for(&mut eve, |f| code(f, 0)), 403);
    // A receipt for it is refused and moves nothing alice sees.
    eve.send(&ClientFrame::Read {
        conversation: conv.clone(),
        seq,
    });
    assert_eq!(wait_for(&mut eve, |f| code(f, 0)), 400);
    // Naming it in a catch-up returns nothing of it.
    eve.send(&ClientFrame::Sync {
        tail: 0,
        summary: true,
        cursors: vec![courier_protocol::frame::Cursor {
            conversation: conv.clone(),
            seq: 0,
        }],
    });
    loop {
        match eve.next() {
            ServerFrame::SyncDone { more: false } => break,
            ServerFrame::Message { conversation, .. } => panic!("eve got {conversation}"),
            ServerFrame::SyncSummary { conversations } => {
                assert!(conversations
                    .iter()
                    .all(|c| c.conversation != conv && c.conversation != group));
            }
            _ => {}
        }
    }
    // Nothing of eve's reached alice or bob.
    assert!(alice.try_next(Duration::from_millis(300)).is_none());
    // And eve cannot become alice: a refresh with alice's token is refused.
    eve.send(&ClientFrame::Refresh {
        request: 16,
        token: node.token("alice", 1),
    });
    assert_eq!(wait_for(&mut eve, |f| code(f, 16)), 400);
}
