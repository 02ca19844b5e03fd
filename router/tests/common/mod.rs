//! Helpers shared by the router's integration tests: a recording outlet,
//! sessions and commands, decoding what the router sends.

// Helpers here panic on purpose: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, dead_code)]

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_protocol::ws::{Decoder, Event, Limits, Role};
use courier_router::api::{Command, Delivery, Device, Outlet, SessionKey};

/// Forwards every batch to a channel; can be told to hold the router
/// thread inside `deliver` so the test controls the queue.
pub struct ChannelOutlet {
    tx: Mutex<Sender<(u16, Vec<Delivery>)>>,
    pub hold: Arc<(Mutex<bool>, Condvar)>,
}

impl Outlet for ChannelOutlet {
    fn deliver(&self, core: u16, batch: Vec<Delivery>) {
        let _ = self.tx.lock().unwrap().send((core, batch));
        let (held, cv) = &*self.hold;
        let mut held = held.lock().unwrap();
        while *held {
            held = cv.wait(held).unwrap();
        }
    }
}

pub fn outlet() -> (Arc<ChannelOutlet>, Receiver<(u16, Vec<Delivery>)>) {
    let (tx, rx) = mpsc::channel();
    (
        Arc::new(ChannelOutlet {
            tx: Mutex::new(tx),
            hold: Arc::new((Mutex::new(false), Condvar::new())),
        }),
        rx,
    )
}

pub fn session(core: u16, slot: u32) -> SessionKey {
    SessionKey {
        node: 0,
        core,
        slot,
        generation: 1,
    }
}

pub fn device(user: &str) -> Device {
    Device {
        user: Arc::from(user),
        device: 1,
    }
}

pub fn frame(s: SessionKey, user: &str, frame: ClientFrame) -> Command {
    Command::Frame {
        session: s,
        device: device(user),
        frame,
        received_at: Instant::now(),
    }
}

pub fn decode(ws: &Bytes) -> ServerFrame {
    let mut decoder = Decoder::new(
        Role::Client,
        Limits {
            max_frame: 1 << 20,
            max_message: 1 << 20,
        },
    );
    let Some((Some(Event::Binary(payload)), _)) = decoder.decode(ws).unwrap() else {
        panic!("not a binary frame")
    };
    ServerFrame::decode(&payload).unwrap()
}

/// Collects frames until `until` says stop (or 10 s pass).
pub fn collect(
    rx: &Receiver<(u16, Vec<Delivery>)>,
    mut until: impl FnMut(&[(SessionKey, ServerFrame)]) -> bool,
) -> Vec<(SessionKey, ServerFrame)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !until(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((core, batch)) => {
                for d in batch {
                    assert_eq!(d.session().core, core);
                    if let Delivery::Frame { session, frame, .. } = d {
                        got.push((session, decode(&frame)));
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("timed out; got {got:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("outlet dropped"),
        }
    }
    got
}

pub fn sync_done(frames: &[(SessionKey, ServerFrame)], s: SessionKey) -> bool {
    frames
        .iter()
        .any(|(k, f)| *k == s && *f == ServerFrame::SyncDone { more: false })
}
