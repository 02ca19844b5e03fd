//! The router through its real thread: start, submit, deliver, shut down.

// Helpers here panic on purpose: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::{collect, device, frame, outlet, session, sync_done};
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_router::api::Command;
use courier_router::{Overloaded, Router, RouterConfig};
use prometheus_client::registry::Registry;

#[test]
fn messages_flow_through_the_router_thread_and_survive_a_restart() {
    flow_and_restart(false);
}

/// The same with the fsync on a syncer thread (`--sync-thread`).
#[test]
fn messages_flow_through_the_sync_pipeline_and_survive_a_restart() {
    flow_and_restart(true);
}

fn flow_and_restart(sync_thread: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = RouterConfig {
        data_dir: dir.path().to_owned(),
        sync_thread,
        ..RouterConfig::default()
    };
    let (out, rx) = outlet();
    let mut registry = Registry::default();
    let router = Router::start(config.clone(), out, &mut registry).unwrap();

    let (alice, bob) = (session(0, 1), session(1, 1));
    for (s, user) in [(alice, "alice"), (bob, "bob")] {
        router
            .submit(Command::Attach {
                session: s,
                device: device(user),
                issued_at_s: 0,
            })
            .unwrap();
        router
            .submit(frame(
                s,
                user,
                ClientFrame::Sync {
                    tail: 0,
                    summary: false,
                    cursors: vec![],
                },
            ))
            .unwrap();
    }
    collect(&rx, |f| sync_done(f, alice) && sync_done(f, bob));

    let handle = router.clone();
    let body = Bytes::from_static(b"over the thread");
    let send = ClientFrame::Send {
        conversation: "d:alice:bob".into(),
        client_id: 42,
        body: body.clone(),
    };
    handle.submit(frame(alice, "alice", send.clone())).unwrap();
    let got = collect(&rx, |f| f.len() >= 2);
    let sent = got
        .iter()
        .find(|(s, _)| *s == alice)
        .map(|(_, f)| f.clone())
        .unwrap();
    assert!(
        matches!(
            sent,
            ServerFrame::Sent {
                seq: 1,
                client_id: 42,
                ..
            }
        ),
        "{sent:?}"
    );
    let message = got
        .iter()
        .find(|(s, _)| *s == bob)
        .map(|(_, f)| f.clone())
        .unwrap();
    assert!(
        matches!(&message, ServerFrame::Message { seq: 1, body: b, .. } if *b == body),
        "{message:?}"
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for name in [
        // The devices' first sessions link them: at least one commit
        // before the send's.
        "courier_store_commit_duration_seconds_count",
        "courier_sent_ack_duration_seconds_count 1",
        "courier_messages_stored_total 1",
        "courier_router_batch_commands_count",
        "courier_routes_online 2",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }

    router.shutdown();
    handle.shutdown();
    assert_eq!(
        handle.submit(frame(alice, "alice", send.clone())),
        Err(Overloaded)
    );

    // A new router on the same store answers the retry with the original.
    let (out, rx) = outlet();
    let router = Router::start(config, out, &mut Registry::default()).unwrap();
    router.submit(frame(alice, "alice", send)).unwrap();
    let got = collect(&rx, |f| !f.is_empty());
    assert_eq!(got, vec![(alice, sent)]);
    router.shutdown();
}

#[test]
fn sends_are_refused_when_the_queue_is_full_but_attach_and_receipts_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = RouterConfig {
        data_dir: dir.path().to_owned(),
        max_inflight: 3,
        ..RouterConfig::default()
    };
    let (out, rx) = outlet();
    let hold = out.hold.clone();
    let router = Router::start(config, out, &mut Registry::default()).unwrap();
    let alice = session(0, 1);
    let send = |id| {
        frame(
            alice,
            "alice",
            ClientFrame::Send {
                conversation: "d:alice:bob".into(),
                client_id: id,
                body: Bytes::new(),
            },
        )
    };

    // Hold the router thread inside a delivery.
    *hold.0.lock().unwrap() = true;
    router
        .submit(frame(alice, "alice", ClientFrame::Ping { nonce: 1 }))
        .unwrap();
    collect(&rx, |f| !f.is_empty());

    for id in 1..=3 {
        router.submit(send(id)).unwrap();
    }
    assert_eq!(router.submit(send(4)), Err(Overloaded));
    let receipt = ClientFrame::Delivered {
        conversation: "d:alice:bob".into(),
        seq: 1,
    };
    router.submit(frame(alice, "alice", receipt)).unwrap();
    router
        .submit(Command::Attach {
            session: alice,
            device: device("alice"),
            issued_at_s: 0,
        })
        .unwrap();

    // Released, the queued sends are handled in one batch.
    *hold.0.lock().unwrap() = false;
    hold.1.notify_all();
    let got = collect(&rx, |f| {
        f.iter()
            .filter(|(_, f)| matches!(f, ServerFrame::Sent { .. }))
            .count()
            == 3
    });
    let seqs: Vec<u64> = got
        .iter()
        .filter_map(|(_, f)| match f {
            ServerFrame::Sent { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    router.submit(send(4)).unwrap();
    router.shutdown();
}
