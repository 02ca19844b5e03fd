//! Tests of [`RouterCore`] driven batch by batch with a clock the test
//! steps, over a store in a temporary directory. Deliveries are decoded
//! back into [`ServerFrame`]s so assertions read like the protocol.

mod catchup;
mod failure;
mod groups;
mod keys;
mod peer;
mod push;
mod receipts;
mod send;
mod social;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, Cursor, E2eeFrame, Incoming, ServerFrame};
use courier_protocol::ws::{Decoder, Event, Limits, Role};
use prometheus_client::registry::Registry;

use crate::api::{Class, Command, Delivery, Device, SessionKey};
use crate::{RouterConfig, RouterCore};

/// A router core over a temporary store, with a stepped clock.
pub struct Harness {
    /// Holds the store's directory until the test ends.
    _dir: tempfile::TempDir,
    pub config: RouterConfig,
    pub core: Option<RouterCore>,
    pub registry: Registry,
    pub now_ms: u64,
    next_slot: u32,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(tweak: impl FnOnce(&mut RouterConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RouterConfig {
            data_dir: dir.path().join("store"),
            node_id: 3,
            ..RouterConfig::default()
        };
        tweak(&mut config);
        let mut registry = Registry::default();
        let core = RouterCore::open(config.clone(), &mut registry).unwrap();
        Self {
            _dir: dir,
            config,
            core: Some(core),
            registry,
            now_ms: 1_700_000_000_000,
            next_slot: 0,
        }
    }

    pub fn core(&mut self) -> &mut RouterCore {
        self.core.as_mut().unwrap()
    }

    /// Handles one batch at the current time and advances the clock 1 ms.
    pub fn step(&mut self, commands: Vec<Command>) -> Out {
        let now = self.now_ms;
        self.now_ms += 1;
        let batches = self.core().handle_batch(commands, now);
        let mut items = Vec::new();
        for (core, deliveries) in batches {
            for d in deliveries {
                assert_eq!(
                    d.session().core,
                    core,
                    "a delivery handed to the wrong core"
                );
                items.push(d);
            }
        }
        // Fleet mode: what the batch made of other partitions' relays.
        for (_, relayed) in self.core().take_relayed() {
            items.extend(relayed);
        }
        Out { items }
    }

    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    /// Closes the core and opens a new one on the same store, as a restart.
    pub fn restart(&mut self) {
        self.core.take().unwrap().close();
        self.registry = Registry::default();
        self.core = Some(RouterCore::open(self.config.clone(), &mut self.registry).unwrap());
    }

    /// A new device session (not attached yet) on gateway core `core`.
    pub fn client(&mut self, user: &str, device: u32, core: u16) -> Client {
        self.next_slot += 1;
        Client {
            session: SessionKey {
                node: 0,
                core,
                slot: self.next_slot,
                generation: 1,
            },
            device: Device {
                user: Arc::from(user),
                device,
            },
        }
    }

    /// Attaches `client` and runs its catch-up to the end; returns what the
    /// catch-up delivered.
    pub fn connect(&mut self, client: &Client) -> Vec<ServerFrame> {
        let out = self.step(vec![client.attach(), client.sync(vec![])]);
        let frames = out.frames(client);
        assert_eq!(
            frames.last(),
            Some(&ServerFrame::SyncDone { more: false }),
            "catch-up ended"
        );
        frames
    }

    /// The rendered metrics text.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }
}

/// One device session as the gateway would name it.
#[derive(Clone, Debug)]
pub struct Client {
    pub session: SessionKey,
    pub device: Device,
}

impl Client {
    pub fn attach(&self) -> Command {
        Command::Attach {
            session: self.session,
            device: self.device.clone(),
            issued_at_s: 0,
        }
    }

    pub fn detach(&self) -> Command {
        Command::Detach {
            session: self.session,
            device: self.device.clone(),
            last_seen_ms: 0,
        }
    }

    pub fn frame(&self, frame: ClientFrame) -> Command {
        Command::Frame {
            session: self.session,
            device: self.device.clone(),
            frame,
            received_at: Instant::now(),
        }
    }

    pub fn send(&self, conversation: &str, client_id: u64, body: &'static [u8]) -> Command {
        self.frame(ClientFrame::Send {
            conversation: conversation.to_owned(),
            client_id,
            body: Bytes::from_static(body),
        })
    }

    pub fn sync(&self, cursors: Vec<(&str, u64)>) -> Command {
        let cursors = cursors
            .into_iter()
            .map(|(c, seq)| Cursor {
                conversation: c.to_owned(),
                seq,
            })
            .collect();
        self.frame(ClientFrame::Sync {
            tail: 0,
            summary: false,
            cursors,
        })
    }

    /// The same device on a new session (a reconnect).
    pub fn reconnect(&self) -> Client {
        let mut session = self.session;
        session.generation += 1;
        Client {
            session,
            device: self.device.clone(),
        }
    }
}

/// What one batch delivered, in order.
pub struct Out {
    pub items: Vec<Delivery>,
}

impl Out {
    /// The frames for `client`'s session, decoded, in order.
    pub fn frames(&self, client: &Client) -> Vec<ServerFrame> {
        self.classified(client)
            .into_iter()
            .map(|(_, f)| f)
            .collect()
    }

    /// The frames for `client`'s session with their class (end-to-end
    /// encryption frames left out: see [`Out::e2ee`]).
    pub fn classified(&self, client: &Client) -> Vec<(Class, ServerFrame)> {
        self.items
            .iter()
            .filter_map(|d| match d {
                Delivery::Frame {
                    session,
                    class,
                    frame,
                    ..
                } if *session == client.session => match decode_any(frame) {
                    Incoming::Frame(f) => Some((*class, f)),
                    Incoming::E2ee(_) => None,
                },
                _ => None,
            })
            .collect()
    }

    /// The end-to-end encryption frames for `client`'s session, in order.
    pub fn e2ee(&self, client: &Client) -> Vec<E2eeFrame> {
        self.items
            .iter()
            .filter_map(|d| match d {
                Delivery::Frame { session, frame, .. } if *session == client.session => {
                    match decode_any(frame) {
                        Incoming::E2ee(f) => Some(f),
                        Incoming::Frame(_) => None,
                    }
                }
                _ => None,
            })
            .collect()
    }

    /// The raw frame bytes delivered to `client`.
    pub fn raw(&self, client: &Client) -> Vec<Bytes> {
        self.items
            .iter()
            .filter_map(|d| match d {
                Delivery::Frame { session, frame, .. } if *session == client.session => {
                    Some(frame.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// The close deliveries, as (session, code).
    pub fn closes(&self) -> Vec<(SessionKey, u16)> {
        self.items
            .iter()
            .filter_map(|d| match d {
                Delivery::Close { session, code, .. } => Some((*session, *code)),
                _ => None,
            })
            .collect()
    }

    /// The only `Sent` for `client`, or a panic naming what came instead.
    pub fn sent(&self, client: &Client) -> (u64, u64) {
        let sent: Vec<_> = self
            .frames(client)
            .into_iter()
            .filter_map(|f| match f {
                ServerFrame::Sent { seq, server_id, .. } => Some((seq, server_id)),
                _ => None,
            })
            .collect();
        assert_eq!(
            sent.len(),
            1,
            "one Sent expected, got {:?}",
            self.frames(client)
        );
        sent[0]
    }

    /// The `Message` frames for `client`, as (conversation, seq, body).
    pub fn messages(&self, client: &Client) -> Vec<(String, u64, Bytes)> {
        messages(&self.frames(client))
    }

    /// The error codes for `client`, as (code, reference).
    pub fn errors(&self, client: &Client) -> Vec<(u16, u64)> {
        self.frames(client)
            .into_iter()
            .filter_map(|f| match f {
                ServerFrame::Error {
                    code, reference, ..
                } => Some((code, reference)),
                _ => None,
            })
            .collect()
    }
}

/// The (conversation, seq, body) of every `Message` in `frames`.
pub fn messages(frames: &[ServerFrame]) -> Vec<(String, u64, Bytes)> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Message {
                conversation,
                seq,
                body,
                ..
            } => Some((conversation.clone(), *seq, body.clone())),
            _ => None,
        })
        .collect()
}

/// Decodes a delivered WebSocket frame of either family.
pub fn decode_any(ws: &Bytes) -> Incoming {
    let mut decoder = Decoder::new(
        Role::Client,
        Limits {
            max_frame: 1 << 24,
            max_message: 1 << 24,
        },
    );
    let Some((Some(Event::Binary(payload)), used)) = decoder.decode(ws).unwrap() else {
        panic!("not one complete binary frame");
    };
    assert_eq!(used, ws.len(), "one frame per delivery");
    Incoming::decode(&payload).unwrap()
}

/// The `Sent` fields of a frame, or a panic.
pub fn sent_fields(frame: &ServerFrame) -> (String, u64, u64, u64) {
    match frame {
        ServerFrame::Sent {
            conversation,
            seq,
            server_id,
            timestamp_ms,
            ..
        } => (conversation.clone(), *seq, *server_id, *timestamp_ms),
        other => panic!("expected Sent, got {other:?}"),
    }
}
