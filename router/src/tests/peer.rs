//! Fleet mode between partitions: token copies, dead tokens and unlinks
//! arrive once and in order although the plain subject between two
//! routers loses whatever is published while a partition changes owner.
//! Two cores, one per partition of two, exchange their peer commands
//! through the test, which drops, reorders and repeats them.

use std::sync::Arc;
use std::time::Duration;

use courier_protocol::frame::{ClientFrame, PushProvider, ServerFrame};

use super::Harness;
use crate::api::{Command, PeerMsg};
use crate::core::PEER_RESEND_MS;
use crate::fleet::partition_of;
use crate::push::WebhookConfig;

const BOB: &str = "bob";

/// The core of partition `p` of two.
fn partition(p: u16) -> Harness {
    Harness::with(|c| {
        c.partition = Some((p, 2));
        c.push.delay = Duration::from_millis(2_000);
        c.push.webhook = Some(WebhookConfig {
            url: "http://127.0.0.1:9/unused".into(),
            secret: Arc::from(&b"k"[..]),
        });
    })
}

/// Bob's partition (the writer of his tokens) and the other one.
fn pair() -> (Harness, Harness) {
    let home = partition_of(BOB, 2);
    (partition(home), partition(1 - home))
}

/// Bob's phone registers `token` with his partition; returns what that
/// partition sent to the other.
fn register(home: &mut Harness, token: &str) -> Vec<Command> {
    let phone = home.client(BOB, 1, 0);
    home.step(vec![phone.attach()]);
    let out = home.step(vec![phone.frame(ClientFrame::PushRegister {
        request: 1,
        provider: PushProvider::Webhook,
        token: token.into(),
        ciphertext: false,
    })]);
    assert_eq!(out.frames(&phone), vec![ServerFrame::Done { request: 1 }]);
    home.step(vec![phone.detach()]);
    sent(home)
}

/// What `h` sent to other partitions since the last call.
fn sent(h: &mut Harness) -> Vec<Command> {
    h.core()
        .take_peer_commands()
        .into_iter()
        .map(|(_, c)| c)
        .collect()
}

/// Only the reliable messages of `commands`.
fn reliable(commands: Vec<Command>) -> Vec<PeerMsg> {
    commands
        .into_iter()
        .filter_map(|c| match c {
            Command::Peer(m @ PeerMsg::Reliable { .. }) => Some(m),
            _ => None,
        })
        .collect()
}

/// Hands `messages` to `to` in one batch; returns its answers.
fn hand(to: &mut Harness, messages: Vec<PeerMsg>) -> Vec<PeerMsg> {
    to.step(messages.into_iter().map(Command::Peer).collect());
    sent(to)
        .into_iter()
        .filter_map(|c| match c {
            Command::Peer(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn outbox(h: &Harness) -> String {
    h.metrics_text()
        .lines()
        .find(|l| l.starts_with("courier_peer_outbox_messages "))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_lost_token_copy_is_sent_again_until_the_other_partition_applies_it() {
    let (mut home, mut away) = pair();
    let lost = reliable(register(&mut home, "phone-1"));
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(outbox(&home), "courier_peer_outbox_messages 1");
    assert_eq!(away.core().push_token_of(BOB, 1), None);

    // Not before its time.
    home.step(vec![]);
    assert!(sent(&mut home).is_empty());
    home.advance(PEER_RESEND_MS);
    home.step(vec![]);
    let again = reliable(sent(&mut home));
    assert_eq!(again, lost, "the same message, same number");

    let answers = hand(&mut away, again);
    assert_eq!(
        away.core().push_token_of(BOB, 1).as_deref(),
        Some("phone-1")
    );
    assert!(matches!(
        answers.as_slice(),
        [PeerMsg::Applied { through: 1, .. }]
    ));
    hand(&mut home, answers);
    assert_eq!(outbox(&home), "courier_peer_outbox_messages 0");
    home.advance(10 * PEER_RESEND_MS);
    home.step(vec![]);
    assert!(sent(&mut home).is_empty(), "nothing left to resend");
}

#[test]
fn a_sender_killed_before_it_sent_resends_from_its_store_when_it_comes_back() {
    let (mut home, mut away) = pair();
    // Committed, then the process dies before publishing.
    drop(register(&mut home, "phone-1"));
    home.restart();
    home.step(vec![]);
    let resent = reliable(sent(&mut home));
    assert_eq!(resent.len(), 1, "resent at once by the next owner");
    hand(&mut away, resent);
    assert_eq!(
        away.core().push_token_of(BOB, 1).as_deref(),
        Some("phone-1")
    );
}

#[test]
fn an_older_token_copy_never_replaces_a_newer_one() {
    let (mut home, mut away) = pair();
    let first = reliable(register(&mut home, "phone-1"));
    let second = reliable(register(&mut home, "phone-2"));

    // The second arrives first: past a gap, it waits for the first.
    let answers = hand(&mut away, second.clone());
    assert!(answers.is_empty(), "nothing applied yet: {answers:?}");
    assert_eq!(away.core().push_token_of(BOB, 1), None);
    hand(&mut away, first.clone());
    assert_eq!(
        away.core().push_token_of(BOB, 1).as_deref(),
        Some("phone-1")
    );
    hand(&mut away, second);
    assert_eq!(
        away.core().push_token_of(BOB, 1).as_deref(),
        Some("phone-2")
    );

    // A late repeat of the first, before and after the receiver restarts,
    // is acknowledged and changes nothing.
    let answers = hand(&mut away, first.clone());
    assert!(matches!(
        answers.as_slice(),
        [PeerMsg::Applied { through: 2, .. }]
    ));
    away.restart();
    hand(&mut away, first);
    assert_eq!(
        away.core().push_token_of(BOB, 1).as_deref(),
        Some("phone-2")
    );

    // Both acknowledged at once by the cumulative answer.
    hand(&mut home, answers);
    assert_eq!(outbox(&home), "courier_peer_outbox_messages 0");
}

#[test]
fn a_single_node_sends_nothing_between_partitions() {
    let mut h = Harness::with(|c| {
        c.push.webhook = Some(WebhookConfig {
            url: "http://127.0.0.1:9/unused".into(),
            secret: Arc::from(&b"k"[..]),
        });
    });
    assert!(register(&mut h, "phone-1").is_empty());
    h.advance(PEER_RESEND_MS);
    h.step(vec![]);
    assert!(sent(&mut h).is_empty());
}

/// Bob's phone registers `token` in one batch, which fails to commit.
fn register_failing(home: &mut Harness, token: &str) {
    let phone = home.client(BOB, 1, 0);
    home.step(vec![phone.attach()]);
    home.core().fail_next_commits(1);
    let out = home.step(vec![phone.frame(ClientFrame::PushRegister {
        request: 1,
        provider: PushProvider::Webhook,
        token: token.into(),
        ciphertext: false,
    })]);
    assert!(
        matches!(out.frames(&phone).as_slice(), [ServerFrame::Error { .. }]),
        "refused: {:?}",
        out.frames(&phone)
    );
}

/// A batch that does not commit (a full disk) leaves the numbering as it
/// was, on both sides: the sender numbers its next message as if the
/// failed one never was, and a receiver whose apply failed applies the
/// resend, although the store may be closed and cannot be read back.
#[test]
fn a_batch_that_does_not_commit_leaves_the_numbering_as_it_was() {
    let (mut home, mut away) = pair();
    register_failing(&mut home, "phone-0");
    assert!(sent(&mut home).is_empty(), "nothing published");
    assert_eq!(outbox(&home), "courier_peer_outbox_messages 0");
    // Past the store's reopening interval.
    home.advance(2_000);
    let first = reliable(register(&mut home, "phone-1"));
    assert!(
        matches!(first.as_slice(), [PeerMsg::Reliable { seq: 1, .. }]),
        "{first:?}"
    );
    let answers = hand(&mut away, first);
    assert_eq!(
        away.core().push_token_of(BOB, 1).as_deref(),
        Some("phone-1")
    );
    hand(&mut home, answers);

    // The receiver fails to apply the next one: no answer, and the
    // resend is applied.
    let second = reliable(register(&mut home, "phone-2"));
    away.core().fail_next_commits(1);
    assert!(
        hand(&mut away, second).is_empty(),
        "no answer for a failed apply"
    );
    away.advance(2_000);
    home.advance(PEER_RESEND_MS);
    home.step(vec![]);
    let resent = reliable(sent(&mut home));
    assert!(
        matches!(resent.as_slice(), [PeerMsg::Reliable { seq: 2, .. }]),
        "{resent:?}"
    );
    let answers = hand(&mut away, resent);
    assert!(
        matches!(answers.as_slice(), [PeerMsg::Applied { through: 2, .. }]),
        "{answers:?}"
    );
    assert_eq!(
        away.core().push_token_of(BOB, 1).as_deref(),
        Some("phone-2")
    );
    hand(&mut home, answers);
    assert_eq!(outbox(&home), "courier_peer_outbox_messages 0");
}

/// Two users of a 1:1 conversation in partitions of two: `(user, peer,
/// conversation)`, the conversation in `peer`'s partition and `user` in
/// the other one.
fn away_conversation() -> (String, String, String) {
    (0..)
        .flat_map(|i| (0..8).map(move |j| (format!("reader{i}"), format!("writer{j}"))))
        .map(|(user, peer)| {
            let conversation = courier_protocol::ids::direct_conversation(&user, &peer);
            (user, peer, conversation)
        })
        .find(|(user, peer, c)| {
            partition_of(user, 2) != partition_of(c, 2)
                && partition_of(peer, 2) == partition_of(c, 2)
        })
        .expect("some names hash apart")
}

/// Only the partition of a message's recipient holds the recipient's
/// route; the conversation's partition relays the message there, which
/// queues it on the recipient's session as the conversation partition's.
/// The recipient's catch-up reaches the conversation's partition from the
/// recipient's, after the route exists.
#[test]
fn a_message_for_another_partitions_user_is_relayed_to_that_users_partition() {
    let (reader, writer, conversation) = away_conversation();
    let (h, c) = (partition_of(&reader, 2), partition_of(&conversation, 2));
    let mut home = partition(h);
    let mut away = partition(c);
    let phone = home.client(&reader, 1, 0);
    home.connect(&phone);
    let handed = home.core().take_peer_commands();
    assert!(
        matches!(&handed[..], [(to, Command::Frame { frame: ClientFrame::Sync { .. }, .. })] if *to == c),
        "the catch-up is handed to the other partition: {handed:?}"
    );
    // Served there, straight to the session, with no route there.
    let (_, sync) = handed.into_iter().next().unwrap();
    let out = away.step(vec![sync]);
    assert_eq!(
        out.frames(&phone),
        vec![ServerFrame::SyncDone { more: false }]
    );

    let pen = away.client(&writer, 1, 1);
    away.connect(&pen);
    let out = away.step(vec![pen.send(&conversation, 1, b"hi")]);
    assert!(out.frames(&phone).is_empty(), "no route of the reader here");
    let relays: Vec<PeerMsg> = away
        .core()
        .take_peer_commands()
        .into_iter()
        .filter(|(to, _)| *to == h)
        .filter_map(|(_, c)| match c {
            Command::Peer(m @ PeerMsg::Relay(_)) => Some(m),
            _ => None,
        })
        .collect();
    assert!(
        matches!(&relays[..], [PeerMsg::Relay(r)] if r.from == c && r.items.len() == 1),
        "{relays:?}"
    );
    let out = home.step(relays.into_iter().map(Command::Peer).collect());
    let got = out.frames(&phone);
    assert!(
        matches!(&got[..], [ServerFrame::Message { seq: 1, sender, .. }] if *sender == writer),
        "{got:?}"
    );
}

#[test]
fn read_receipts_off_reaches_the_partition_of_the_users_conversations() {
    let (reader, writer, conversation) = away_conversation();
    let mut home = partition(partition_of(&reader, 2));
    let mut away = partition(partition_of(&conversation, 2));
    let writer = away.client(&writer, 1, 0);
    let in_away = away.client(&reader, 1, 0);
    away.connect(&writer);
    away.connect(&in_away);
    let read = |seq| {
        in_away.frame(ClientFrame::Read {
            conversation: conversation.clone(),
            seq,
        })
    };
    let reads_seen = |out: &super::Out| {
        out.frames(&writer)
            .into_iter()
            .filter(|f| {
                matches!(f, ServerFrame::Receipt { kind, .. } if *kind == courier_protocol::frame::ReceiptKind::Read)
            })
            .count()
    };

    // Before: the reader's READ reaches the writer.
    away.step(vec![writer.send(&conversation, 1, b"one")]);
    let out = away.step(vec![read(1)]);
    assert_eq!(reads_seen(&out), 1);

    // The reader turns read receipts off at the user's partition.
    let phone = home.client(&reader, 1, 0);
    home.connect(&phone);
    home.step(vec![phone.frame(ClientFrame::Settings {
        request: 1,
        mask: courier_protocol::frame::settings::READ_RECEIPTS_OFF,
        flags: courier_protocol::frame::settings::READ_RECEIPTS_OFF,
    })]);
    let copies = reliable(sent(&mut home));
    assert_eq!(copies.len(), 1, "{copies:?}");
    // (What the conversation's partition relayed to the reader's so far.)
    sent(&mut away);
    let answers = hand(&mut away, copies);
    assert!(matches!(
        answers.as_slice(),
        [PeerMsg::Applied { through: 1, .. }]
    ));
    hand(&mut home, answers);
    assert_eq!(outbox(&home), "courier_peer_outbox_messages 0");

    // After, and after the conversation's router restarts (the copy was
    // written): no READ reaches the writer.
    away.step(vec![writer.send(&conversation, 2, b"two")]);
    let out = away.step(vec![read(2)]);
    assert_eq!(reads_seen(&out), 0);
    away.restart();
    away.connect(&writer);
    away.connect(&in_away);
    away.step(vec![writer.send(&conversation, 3, b"three")]);
    let out = away.step(vec![read(3)]);
    assert_eq!(reads_seen(&out), 0);
}

/// Only the user's partition routes and links the user's sessions: an
/// attach anywhere else is ignored (no route, no record, no presence, no
/// device limit).
#[test]
fn a_session_is_attached_only_by_its_users_partition() {
    // Device limit 1 in both: the second device is over it.
    let limited = |p: u16| {
        Harness::with(|c| {
            c.partition = Some((p, 2));
            c.max_devices = 1;
        })
    };
    let (mut home, mut away) = (
        limited(partition_of(BOB, 2)),
        limited(1 - partition_of(BOB, 2)),
    );
    let phone = away.client(BOB, 1, 0);
    let tablet = away.client(BOB, 2, 0);
    let out = away.step(vec![phone.attach(), phone.sync(vec![]), tablet.attach()]);
    assert!(
        out.closes().is_empty(),
        "the user's partition enforces the limit"
    );
    away.step(vec![]);
    assert_eq!(
        away.core().stored_device(BOB, 1),
        None,
        "no record elsewhere"
    );
    assert!(sent(&mut away).is_empty());

    // A visitor's presence is the user's partition's to announce: a
    // watcher here hears nothing when Bob comes and goes.
    let watcher = away.client("watcher", 1, 1);
    away.connect(&watcher);
    away.step(vec![watcher.frame(ClientFrame::PresenceSubscribe {
        request: 1,
        users: vec![BOB.into()],
    })]);
    let laptop = away.client(BOB, 3, 0);
    let out = away.step(vec![phone.detach(), tablet.detach(), laptop.attach()]);
    assert!(
        out.frames(&watcher).is_empty(),
        "{:?}",
        out.frames(&watcher)
    );

    // At home the same connects link, and the second device is refused.
    let phone_home = home.client(BOB, 1, 0);
    let tablet_home = home.client(BOB, 2, 0);
    let out = home.step(vec![phone_home.attach(), tablet_home.attach()]);
    assert_eq!(
        out.closes(),
        vec![(tablet_home.session, courier_protocol::close::DEVICE_LIMIT)]
    );
    assert!(home.core().stored_device(BOB, 1).is_some());
}

/// A partition that detaches a gateway's sessions says so, once, with the
/// `GatewayGone`'s last seen: a gateway taken for dead while alive learns
/// that this partition no longer delivers to its sessions. A partition
/// that held none of them says nothing.
#[test]
fn detaching_a_gateways_sessions_is_told_to_that_gateway() {
    let (mut home, _) = pair();
    let phone = home.client(BOB, 1, 0);
    home.connect(&phone);
    let gone = |node, last_seen_ms| Command::Peer(PeerMsg::GatewayGone { node, last_seen_ms });

    home.step(vec![gone(7, 500)]);
    assert!(
        home.core().take_detached_gateways().is_empty(),
        "gateway 7 held no session here"
    );
    home.step(vec![gone(phone.session.node, 1_234)]);
    assert_eq!(
        home.core().take_detached_gateways(),
        vec![(phone.session.node, 1_234)]
    );
    home.step(vec![gone(phone.session.node, 1_300)]);
    assert!(
        home.core().take_detached_gateways().is_empty(),
        "nothing was left to detach"
    );

    // What the gateway does on the notice: attach again and catch up.
    // The session is routed again.
    let sender = home.client("alice", 1, 1);
    home.connect(&sender);
    home.connect(&phone);
    let direct = courier_protocol::ids::direct_conversation("alice", BOB);
    let out = home.step(vec![sender.send(&direct, 1, b"hi")]);
    assert!(
        out.frames(&phone)
            .iter()
            .any(|f| matches!(f, ServerFrame::Message { seq: 1, .. })),
        "delivered live after attaching again: {:?}",
        out.frames(&phone)
    );
}
