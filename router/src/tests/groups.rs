//! Groups: create, add, remove, list, their rules and the member cap.

use courier_protocol::error::ErrorCode;
use courier_protocol::frame::{decode_members, ClientFrame, EntryKind, ServerFrame};

use super::{Client, Harness};

fn create(h: &mut Harness, creator: &Client, members: &[&str]) -> String {
    let members = members.iter().map(|m| m.to_string()).collect();
    let out = h.step(vec![creator.frame(ClientFrame::GroupCreate {
        request: 9,
        members,
    })]);
    match out.frames(creator).as_slice() {
        [ServerFrame::GroupCreated {
            request: 9,
            conversation,
            seq: 1,
        }] => conversation.clone(),
        other => panic!("expected GroupCreated, got {other:?}"),
    }
}

fn add(c: &Client, group: &str, members: &[&str]) -> crate::api::Command {
    c.frame(ClientFrame::GroupAdd {
        request: 2,
        conversation: group.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    })
}

fn remove(c: &Client, group: &str, members: &[&str]) -> crate::api::Command {
    c.frame(ClientFrame::GroupRemove {
        request: 3,
        conversation: group.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    })
}

fn list(c: &Client, group: &str) -> crate::api::Command {
    c.frame(ClientFrame::GroupMembers {
        request: 4,
        conversation: group.into(),
    })
}

fn membership_change(frames: &[ServerFrame]) -> Vec<(u64, EntryKind, Vec<String>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message {
                seq, kind, body, ..
            } if *kind != EntryKind::Message => Some((*seq, *kind, decode_members(body).unwrap())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_group_message_reaches_every_member_device_but_the_senders() {
    let mut h = Harness::new();
    let alice1 = h.client("alice", 1, 0);
    let alice2 = h.client("alice", 2, 1);
    let bob = h.client("bob", 1, 0);
    let carol = h.client("carol", 1, 1);
    for c in [&alice1, &alice2, &bob, &carol] {
        h.connect(c);
    }
    let out = h.step(vec![alice1.frame(ClientFrame::GroupCreate {
        request: 1,
        members: vec!["bob".into(), "carol".into(), "bob".into(), "alice".into()],
    })]);
    let ServerFrame::GroupCreated {
        conversation: group,
        seq: 1,
        ..
    } = out.frames(&alice1)[0].clone()
    else {
        panic!("{:?}", out.frames(&alice1))
    };
    // The creation entry lists every member once, the creator first.
    for c in [&alice2, &bob, &carol] {
        let changes = membership_change(&out.frames(c));
        assert_eq!(
            changes,
            vec![(
                1,
                EntryKind::MembersAdded,
                vec!["alice".into(), "bob".into(), "carol".into()]
            )]
        );
    }
    assert_eq!(
        out.frames(&alice1).len(),
        1,
        "the acting device gets only the result"
    );

    let out = h.step(vec![alice1.send(&group, 1, b"hi all")]);
    assert_eq!(out.sent(&alice1).0, 2);
    for c in [&alice2, &bob, &carol] {
        assert_eq!(out.messages(c).len(), 1);
    }
    assert_eq!(out.frames(&alice1).len(), 1);
    // One encoding for the whole group.
    let ptrs: Vec<_> = [&alice2, &bob, &carol]
        .iter()
        .map(|c| out.raw(c)[0].as_ptr())
        .collect();
    assert!(ptrs.windows(2).all(|w| w[0] == w[1]));

    let out = h.step(vec![list(&carol, &group)]);
    assert_eq!(
        out.frames(&carol),
        vec![ServerFrame::Members {
            request: 4,
            conversation: group.clone(),
            members: vec!["alice".into(), "bob".into(), "carol".into()]
        }]
    );
}

#[test]
fn create_validates_its_member_list_and_the_cap() {
    let mut h = Harness::with(|c| c.max_group_members = 3);
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    let cases = [
        (vec![], ErrorCode::BadRequest),
        (
            vec!["bob".to_string(), "no:colons".into()],
            ErrorCode::BadRequest,
        ),
        (
            vec!["bob".into(), "carol".into(), "dave".into()],
            ErrorCode::GroupFull,
        ),
    ];
    for (members, code) in cases {
        let out = h.step(vec![alice.frame(ClientFrame::GroupCreate {
            request: 5,
            members,
        })]);
        assert_eq!(out.errors(&alice), vec![(code as u16, 5)]);
    }
    // The creator counts once even when listed: three members fit.
    create(&mut h, &alice, &["bob", "carol", "alice", "bob"]);
}

#[test]
fn add_needs_a_member_and_respects_the_cap() {
    let mut h = Harness::with(|c| c.max_group_members = 4);
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    let dave = h.client("dave", 1, 0);
    let erin = h.client("erin", 1, 0);
    for c in [&alice, &bob, &dave, &erin] {
        h.connect(c);
    }
    let group = create(&mut h, &alice, &["bob"]);
    h.step(vec![alice.send(&group, 1, b"before dave")]);

    // A non-member cannot add.
    let out = h.step(vec![dave.frame(ClientFrame::GroupAdd {
        request: 2,
        conversation: group.clone(),
        members: vec!["dave".into()],
    })]);
    assert_eq!(out.errors(&dave), vec![(ErrorCode::NotMember as u16, 2)]);

    // Any member can; the new member joins at the entry's sequence.
    let out = h.step(vec![add(&bob, &group, &["dave", "bob"])]);
    assert_eq!(out.frames(&bob), vec![ServerFrame::Done { request: 2 }]);
    assert_eq!(
        membership_change(&out.frames(&alice)),
        vec![(3, EntryKind::MembersAdded, vec!["dave".into()])]
    );
    assert_eq!(
        membership_change(&out.frames(&dave)),
        vec![(3, EntryKind::MembersAdded, vec!["dave".into()])]
    );

    // Dave's catch-up starts at his join: no earlier history.
    let dave2 = h.client("dave", 2, 0);
    let frames = h.connect(&dave2);
    let seqs: Vec<u64> = super::messages(&frames).iter().map(|m| m.1).collect();
    assert_eq!(seqs, vec![3]);

    // Over the cap.
    let out = h.step(vec![add(&alice, &group, &["erin", "frank"])]);
    assert_eq!(out.errors(&alice), vec![(ErrorCode::GroupFull as u16, 2)]);
    // Adding only existing members changes nothing.
    let out = h.step(vec![add(&alice, &group, &["bob"])]);
    assert_eq!(out.frames(&alice), vec![ServerFrame::Done { request: 2 }]);
    assert!(out.frames(&bob).is_empty());
    // A direct conversation's members are fixed.
    let out = h.step(vec![add(&alice, "d:alice:bob", &["erin"])]);
    assert_eq!(out.errors(&alice), vec![(ErrorCode::BadRequest as u16, 2)]);
    // An unknown group.
    let out = h.step(vec![add(&alice, "g:0000000000000001", &["erin"])]);
    assert_eq!(
        out.errors(&alice),
        vec![(ErrorCode::UnknownConversation as u16, 2)]
    );
}

#[test]
fn only_the_creator_removes_others_and_anyone_may_leave() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    let carol = h.client("carol", 1, 0);
    for c in [&alice, &bob, &carol] {
        h.connect(c);
    }
    let group = create(&mut h, &alice, &["bob", "carol"]);

    let out = h.step(vec![remove(&bob, &group, &["carol"])]);
    assert_eq!(out.errors(&bob), vec![(ErrorCode::NotMember as u16, 3)]);

    // Bob leaves; everyone, bob included, gets the entry.
    let out = h.step(vec![remove(&bob, &group, &["bob"])]);
    assert_eq!(out.frames(&bob), vec![ServerFrame::Done { request: 3 }]);
    for c in [&alice, &carol] {
        assert_eq!(
            membership_change(&out.frames(c)),
            vec![(2, EntryKind::MembersRemoved, vec!["bob".into()])]
        );
    }
    // The creator removes carol, who receives her removal.
    let out = h.step(vec![remove(&alice, &group, &["carol"])]);
    assert_eq!(
        membership_change(&out.frames(&carol)),
        vec![(3, EntryKind::MembersRemoved, vec!["carol".into()])]
    );
    assert!(out.frames(&bob).is_empty(), "bob already left");

    let out = h.step(vec![list(&alice, &group)]);
    assert_eq!(
        out.frames(&alice),
        vec![ServerFrame::Members {
            request: 4,
            conversation: group.clone(),
            members: vec!["alice".into()]
        }]
    );
    let out = h.step(vec![list(&carol, &group)]);
    assert_eq!(out.errors(&carol), vec![(ErrorCode::NotMember as u16, 4)]);
    // A former member cannot send.
    let out = h.step(vec![carol.send(&group, 1, b"still here?")]);
    assert_eq!(out.errors(&carol), vec![(ErrorCode::NotMember as u16, 1)]);
    // A former member cannot remove anyone either.
    let out = h.step(vec![remove(&carol, &group, &["alice"])]);
    assert_eq!(out.errors(&carol), vec![(ErrorCode::NotMember as u16, 3)]);
}

#[test]
fn a_removed_member_stops_receiving_after_the_removal_entry() {
    let mut h = Harness::new();
    let alice = h.client("alice", 1, 0);
    let bob = h.client("bob", 1, 0);
    h.connect(&alice);
    h.connect(&bob);
    let group = create(&mut h, &alice, &["bob"]);

    // In one batch: a message, the removal, another message.
    let out = h.step(vec![
        alice.send(&group, 1, b"one"),
        remove(&alice, &group, &["bob"]),
        alice.send(&group, 2, b"two"),
    ]);
    let seqs: Vec<u64> = out.messages(&bob).iter().map(|m| m.1).collect();
    assert_eq!(
        seqs,
        vec![2, 3],
        "bob gets the message and his removal, not what follows"
    );

    let out = h.step(vec![alice.send(&group, 3, b"three")]);
    assert!(out.frames(&bob).is_empty());

    // His catch-up from another device stops at the removal too.
    let bob2 = h.client("bob", 2, 0);
    let seqs: Vec<u64> = super::messages(&h.connect(&bob2))
        .iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);

    // Re-added later, he receives again from his new join.
    h.step(vec![add(&alice, &group, &["bob"])]);
    let out = h.step(vec![alice.send(&group, 4, b"welcome back")]);
    assert_eq!(out.messages(&bob).len(), 1);
}
