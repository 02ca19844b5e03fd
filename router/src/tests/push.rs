//! Push scheduling in the router: who is notified, when, how often, what
//! cancels it, and what survives a restart. The worker is replaced by a
//! list the test reads; outcomes go back as the worker would send them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_protocol::frame::{ClientFrame, PushProvider, ServerFrame};

use super::{Client, Harness};
use crate::api::Command;
use crate::push::{Job, JobSender, Outcome, Payload, PushMetrics, WebhookConfig};

const AB: &str = "d:alice:bob";

type Jobs = Arc<Mutex<Vec<Job>>>;

fn harness() -> (Harness, Jobs) {
    let mut h = Harness::with(|c| {
        c.push.delay = Duration::from_millis(2_000);
        c.push.coalesce_window = Duration::from_millis(10_000);
        c.push.webhook = Some(WebhookConfig {
            url: "http://127.0.0.1:9/unused".into(),
            secret: Arc::from(&b"k"[..]),
        });
    });
    let jobs = connect_worker(&mut h);
    (h, jobs)
}

fn connect_worker(h: &mut Harness) -> Jobs {
    let jobs: Jobs = Arc::default();
    let sink = jobs.clone();
    h.core().set_push(
        JobSender::from_fn(move |j| sink.lock().unwrap().push(j)),
        PushMetrics::unregistered(),
    );
    jobs
}

fn take(jobs: &Jobs) -> Vec<Job> {
    std::mem::take(&mut *jobs.lock().unwrap())
}

fn register(h: &mut Harness, c: &Client, token: &str, ciphertext: bool) {
    let out = h.step(vec![c.frame(ClientFrame::PushRegister {
        request: 1,
        provider: PushProvider::Webhook,
        token: token.into(),
        ciphertext,
    })]);
    assert_eq!(out.frames(c), vec![ServerFrame::Done { request: 1 }]);
}

/// A device that registered a token and went away.
fn offline(h: &mut Harness, user: &str, device: u32, token: &str) -> Client {
    let c = h.client(user, device, 0);
    h.step(vec![c.attach()]);
    register(h, &c, token, false);
    h.step(vec![c.detach()]);
    c
}

fn count_and_seq(job: &Job) -> (u32, u64) {
    match &job.payload {
        Payload::Message { count, seq, .. } => (*count, *seq),
        other => panic!("not a message notification: {other:?}"),
    }
}

fn outcome(h: &mut Harness, o: Outcome) {
    h.step(vec![Command::Push(o)]);
}

#[test]
fn a_burst_for_an_offline_device_is_one_notification_after_the_delay() {
    let (mut h, jobs) = harness();
    offline(&mut h, "bob", 1, "bob-phone");
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step((1..=20).map(|i| alice.send(AB, i, b"plaintext")).collect());
    h.advance(1_900);
    h.step(vec![]);
    assert!(take(&jobs).is_empty(), "not before the delay");
    h.advance(200);
    h.step(vec![]);
    let got = take(&jobs);
    assert_eq!(got.len(), 1);
    assert_eq!(count_and_seq(&got[0]), (20, 20));
    assert_eq!((got[0].token.as_str(), got[0].device), ("bob-phone", 1));
    match &got[0].payload {
        Payload::Message {
            conversation,
            sender,
            ciphertext,
            ..
        } => {
            assert_eq!((conversation.as_str(), sender.as_str()), (AB, "alice"));
            assert_eq!(ciphertext, &None, "bob did not opt in");
        }
        other => panic!("{other:?}"),
    }
    // Messages inside the coalescing window wait for its end.
    outcome(&mut h, Outcome::Sent { id: got[0].id });
    h.step(vec![alice.send(AB, 21, b"m")]);
    h.advance(5_000);
    h.step(vec![]);
    assert!(take(&jobs).is_empty(), "inside the window");
    h.advance(6_000);
    h.step(vec![]);
    let got = take(&jobs);
    assert_eq!(got.len(), 1);
    assert_eq!(count_and_seq(&got[0]), (1, 21));
    // Sent: nothing is left to send after a restart.
    outcome(&mut h, Outcome::Sent { id: got[0].id });
    h.restart();
    let jobs = connect_worker(&mut h);
    h.advance(60_000);
    h.step(vec![]);
    assert!(take(&jobs).is_empty());
}

#[test]
fn a_live_device_an_ack_or_a_sync_means_no_notification() {
    let (mut h, jobs) = harness();
    let carol = h.client("carol", 1, 0);
    h.connect(&carol);
    register(&mut h, &carol, "carol-phone", false);
    let bob = offline(&mut h, "bob", 1, "bob-phone");
    let dave = offline(&mut h, "dave", 1, "dave-phone");
    // The sender's own offline phone is not woken by its own messages.
    offline(&mut h, "alice", 2, "alice-phone");
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step(vec![
        alice.send("d:alice:carol", 1, b"m"),
        alice.send(AB, 2, b"m"),
        alice.send(AB, 3, b"m"),
        alice.send("d:alice:dave", 4, b"m"),
    ]);
    // bob comes back and acks only the first: still owed a wake-up.
    let bob = bob.reconnect();
    h.step(vec![
        bob.attach(),
        bob.frame(ClientFrame::Delivered {
            conversation: AB.into(),
            seq: 1,
        }),
    ]);
    h.advance(2_100);
    h.step(vec![]);
    let got = take(&jobs);
    let mut tokens: Vec<&str> = got.iter().map(|j| j.token.as_str()).collect();
    tokens.sort_unstable();
    assert_eq!(tokens, ["bob-phone", "dave-phone"]);
    // Now bob acks all of it and dave syncs before their delay.
    h.step(vec![
        alice.send(AB, 5, b"m"),
        alice.send("d:alice:dave", 6, b"m"),
    ]);
    let dave = dave.reconnect();
    h.step(vec![
        bob.frame(ClientFrame::Delivered {
            conversation: AB.into(),
            seq: 3,
        }),
        dave.attach(),
        dave.sync(vec![]),
    ]);
    for j in &got {
        outcome(&mut h, Outcome::Sent { id: j.id });
    }
    assert!(take(&jobs).is_empty());
    h.advance(20_000);
    h.step(vec![]);
    let tokens: Vec<String> = take(&jobs).into_iter().map(|j| j.token).collect();
    assert!(tokens.is_empty(), "acked or synced in time: {tokens:?}");
}

#[test]
fn a_read_on_another_device_sends_a_badge_and_cancels_that_conversation() {
    let (mut h, jobs) = harness();
    offline(&mut h, "bob", 1, "bob-phone");
    let bob2 = h.client("bob", 2, 0);
    h.connect(&bob2);
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step((1..=3).map(|i| alice.send(AB, i, b"m")).collect());
    h.step(vec![bob2.frame(ClientFrame::Read {
        conversation: AB.into(),
        seq: 2,
    })]);
    let got = take(&jobs);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].payload,
        Payload::Badge {
            conversation: AB.into(),
            unread: 1
        }
    );
    assert_eq!(got[0].token, "bob-phone");
    h.step(vec![bob2.frame(ClientFrame::Read {
        conversation: AB.into(),
        seq: 3,
    })]);
    assert_eq!(take(&jobs).len(), 1, "a badge of 0");
    h.advance(30_000);
    h.step(vec![]);
    assert!(take(&jobs).is_empty(), "read elsewhere: not woken");
}

#[test]
fn a_restart_restores_waiting_and_in_flight_notifications_with_their_counts() {
    let (mut h, jobs) = harness();
    offline(&mut h, "bob", 1, "bob-phone");
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step((1..=3).map(|i| alice.send(AB, i, b"m")).collect());
    h.advance(2_100);
    h.step(vec![]);
    assert_eq!(take(&jobs).len(), 1, "in flight, no outcome yet");
    h.step((4..=5).map(|i| alice.send(AB, i, b"m")).collect());
    h.restart();
    let jobs = connect_worker(&mut h);
    h.advance(2_100);
    h.step(vec![]);
    let got = take(&jobs);
    assert_eq!(got.len(), 1, "both folded into one");
    assert_eq!(count_and_seq(&got[0]), (5, 5));
}

#[test]
fn an_invalid_token_is_removed_unless_it_was_replaced() {
    let (mut h, jobs) = harness();
    let bob = offline(&mut h, "bob", 1, "old");
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step(vec![alice.send(AB, 1, b"m")]);
    h.advance(2_100);
    h.step(vec![]);
    let job = take(&jobs).remove(0);
    // Replaced before the answer: the new token stays.
    let bob = bob.reconnect();
    h.step(vec![bob.attach()]);
    register(&mut h, &bob, "new", false);
    h.step(vec![bob.detach()]);
    let invalid = |job: &Job| Outcome::InvalidToken {
        id: job.id,
        user: job.user.clone(),
        device: job.device,
        token: job.token.clone(),
    };
    outcome(&mut h, invalid(&job));
    h.advance(20_000);
    h.step(vec![alice.send(AB, 2, b"m")]);
    h.advance(2_100);
    h.step(vec![]);
    let job = take(&jobs).remove(0);
    assert_eq!(job.token, "new");
    outcome(&mut h, invalid(&job));
    h.advance(20_000);
    h.step(vec![alice.send(AB, 3, b"m")]);
    h.advance(2_100);
    h.step(vec![]);
    assert!(take(&jobs).is_empty(), "the invalid token is gone");
}

#[test]
fn unlinking_a_device_removes_its_token_and_opted_in_devices_get_the_ciphertext() {
    let (mut h, jobs) = harness();
    let bob1 = h.client("bob", 1, 0);
    h.step(vec![bob1.attach()]);
    register(&mut h, &bob1, "phone", true);
    let bob2 = h.client("bob", 2, 0);
    h.step(vec![bob2.attach()]);
    register(&mut h, &bob2, "tablet", false);
    let out = h.step(vec![bob1.frame(ClientFrame::DeviceRemove {
        request: 3,
        device: 2,
    })]);
    assert_eq!(out.frames(&bob1), vec![ServerFrame::Done { request: 3 }]);
    h.step(vec![bob1.detach(), bob2.detach()]);
    let alice = h.client("alice", 1, 0);
    h.connect(&alice);
    h.step(vec![alice.send(AB, 1, b"sealed")]);
    h.advance(2_100);
    h.step(vec![]);
    let got = take(&jobs);
    assert_eq!(got.len(), 1, "the unlinked tablet is not woken");
    match &got[0].payload {
        Payload::Message { ciphertext, .. } => {
            assert_eq!(ciphertext.as_deref(), Some(&b"sealed"[..]))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_provider_that_is_not_enabled_is_refused() {
    let (mut h, _jobs) = harness();
    let bob = h.client("bob", 1, 0);
    h.step(vec![bob.attach()]);
    let out = h.step(vec![bob.frame(ClientFrame::PushRegister {
        request: 4,
        provider: PushProvider::Fcm,
        token: "abc".into(),
        ciphertext: false,
    })]);
    assert_eq!(out.errors(&bob), vec![(400, 4)]);
}
