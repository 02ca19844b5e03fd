//! Device-ack probes: the last hop of a message's life, from the gateway
//! writing it on a recipient's socket to that device's `Delivered` for it.
//!
//! Every other hop is timed from clocks the message carries through the
//! node; this one needs to remember what was written where until the device
//! answers. Remembering every message would cost memory per message in
//! flight, so a core keeps at most one probe per session: when a live
//! message is written to a session that has none, the core notes its
//! conversation, sequence and write time; the first `Delivered` (or
//! `Read`, which implies it) from that session covering that sequence in
//! that conversation ends the probe and is observed. The histogram is
//! therefore a sample, biased towards nothing in particular: the probed
//! message is whichever live one a session is written first after its last
//! probe ended.
//!
//! An idle session costs nothing here: probes live in a per-core map, not
//! in the session's slot, are removed when the session ends, and are
//! dropped unanswered after [`MAX_AGE`] (a device that never acks). The map
//! holds at most [`MAX_PROBES`] entries; past that no new probe starts.

use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_protocol::frame::ServerFrame;
use courier_router::api::SessionKey;
use rustc_hash::FxHashMap;

/// Probes a core keeps at once, at most (about 80 bytes each).
pub const MAX_PROBES: usize = 16 * 1024;
/// A probe not answered within this is dropped without an observation.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// One core's probes, by slot. Owned by the core; used from its session
/// tasks (write and read steps) and its sweep.
#[derive(Debug, Default)]
pub struct Probes {
    by_slot: FxHashMap<u32, Probe>,
}

#[derive(Debug)]
struct Probe {
    generation: u32,
    conversation: Box<str>,
    seq: u64,
    written: Instant,
}

impl Probes {
    /// Notes that `frame` (a complete server WebSocket frame holding a live
    /// `Message`) was written to `session` at `now`, unless the session
    /// already has a probe or the map is full.
    pub fn handle_written(&mut self, session: SessionKey, frame: &Bytes, now: Instant) {
        if let Some(p) = self.by_slot.get(&session.slot) {
            if p.generation == session.generation {
                return;
            }
        } else if self.by_slot.len() >= MAX_PROBES {
            return;
        }
        let Some(ServerFrame::Message {
            conversation, seq, ..
        }) = payload(frame).and_then(|p| ServerFrame::decode(&p).ok())
        else {
            return;
        };
        self.by_slot.insert(
            session.slot,
            Probe {
                generation: session.generation,
                conversation: conversation.into_boxed_str(),
                seq,
                written: now,
            },
        );
    }

    /// A `Delivered` or `Read` up to `seq` in `conversation` arrived from
    /// `session` at `now`: the probe's time, if this ends it.
    pub fn handle_ack(
        &mut self,
        session: SessionKey,
        conversation: &str,
        seq: u64,
        now: Instant,
    ) -> Option<Duration> {
        let p = self.by_slot.get(&session.slot)?;
        if p.generation != session.generation || *p.conversation != *conversation || seq < p.seq {
            return None;
        }
        let elapsed = now.saturating_duration_since(p.written);
        self.by_slot.remove(&session.slot);
        Some(elapsed)
    }

    /// The session ended: its probe, if any, goes unanswered.
    pub fn forget(&mut self, session: SessionKey) {
        if self
            .by_slot
            .get(&session.slot)
            .is_some_and(|p| p.generation == session.generation)
        {
            self.by_slot.remove(&session.slot);
        }
    }

    /// Drops probes older than [`MAX_AGE`]; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.by_slot.len();
        self.by_slot
            .retain(|_, p| now.saturating_duration_since(p.written) < MAX_AGE);
        before - self.by_slot.len()
    }

    /// Probes waiting for an answer.
    pub fn len(&self) -> usize {
        self.by_slot.len()
    }

    /// True when no probe waits.
    pub fn is_empty(&self) -> bool {
        self.by_slot.is_empty()
    }
}

/// The payload of an unmasked server WebSocket frame, or `None` if `frame`
/// is not one whole frame.
fn payload(frame: &Bytes) -> Option<Bytes> {
    let len7 = *frame.get(1)? & 0x7f;
    let start = match len7 {
        0..=125 => 2,
        126 => 4,
        _ => 10,
    };
    (frame.len() >= start).then(|| frame.slice(start..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::encode_server;
    use courier_protocol::frame::EntryKind;

    fn key(slot: u32, generation: u32) -> SessionKey {
        SessionKey {
            node: 0,
            core: 0,
            slot,
            generation,
        }
    }

    fn message(conversation: &str, seq: u64, body_len: usize) -> Bytes {
        encode_server(&ServerFrame::Message {
            conversation: conversation.into(),
            seq,
            server_id: 1,
            timestamp_ms: 0,
            kind: EntryKind::Message,
            sender: "alice".into(),
            sender_device: 1,
            client_id: 7,
            body: Bytes::from(vec![b'x'; body_len]),
        })
    }

    #[test]
    fn an_ack_covering_the_probed_message_ends_the_probe() {
        let mut probes = Probes::default();
        let t0 = Instant::now();
        probes.handle_written(key(3, 1), &message("c1", 5, 10), t0);
        // A later write to the same session does not replace the probe.
        probes.handle_written(key(3, 1), &message("c1", 6, 10), t0);
        assert_eq!(probes.len(), 1);
        let later = t0 + Duration::from_millis(7);
        assert_eq!(probes.handle_ack(key(3, 1), "c2", 9, later), None);
        assert_eq!(probes.handle_ack(key(3, 1), "c1", 4, later), None);
        assert_eq!(probes.handle_ack(key(3, 2), "c1", 5, later), None);
        assert_eq!(
            probes.handle_ack(key(3, 1), "c1", 6, later),
            Some(Duration::from_millis(7))
        );
        assert!(probes.is_empty());
    }

    #[test]
    fn large_frames_decode_and_old_or_ended_probes_go() {
        let mut probes = Probes::default();
        let t0 = Instant::now();
        // 126-byte and 64 KiB-plus payloads use the longer length headers.
        probes.handle_written(key(1, 1), &message("c", 1, 200), t0);
        probes.handle_written(key(2, 1), &message("c", 1, 70_000), t0);
        assert_eq!(probes.len(), 2);
        // A frame that is not a message starts nothing.
        probes.handle_written(key(4, 1), &Bytes::from_static(b"\x8a\x00"), t0);
        assert_eq!(probes.len(), 2);
        probes.forget(key(1, 2));
        assert_eq!(probes.len(), 2, "another generation's end leaves it");
        probes.forget(key(1, 1));
        assert_eq!(probes.expire(t0 + MAX_AGE), 1);
        assert!(probes.is_empty());
    }
}
