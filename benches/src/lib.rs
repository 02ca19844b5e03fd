//! Benchmark support: the frames the benchmarks encode and decode, built
//! the way a real session sees them.
//!
//! The criterion benchmarks are in `benches/` (`cargo bench -p
//! courier-benches`); end-to-end runs that start a node and drive it with
//! loadgen are in `scripts/`. Figures and the commands that produced them
//! are in `docs/benchmarks.md`.

#![forbid(unsafe_code)]

use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, EntryKind, ServerFrame};
use courier_protocol::ws::{self, Opcode};

/// A client's `Send` of a `body_len`-byte body, as the masked WebSocket
/// frame that arrives on the socket.
pub fn masked_send_frame(body_len: usize) -> Vec<u8> {
    let frame = ClientFrame::Send {
        conversation: "d:alice-000001:bob-000002".into(),
        client_id: 0x1234_5678_9abc_def0,
        body: Bytes::from(vec![0xa5; body_len]),
    };
    let mut payload = Vec::new();
    frame.encode(&mut payload);
    let mut out = Vec::new();
    ws::encode_frame(
        &mut out,
        Opcode::Binary,
        &payload,
        Some([0x11, 0x22, 0x33, 0x44]),
    );
    out
}

/// The `Message` frame a recipient gets for a `body_len`-byte body.
pub fn message_frame(body_len: usize) -> ServerFrame {
    ServerFrame::Message {
        conversation: "g:00000000deadbeef".into(),
        seq: 123_456,
        server_id: 7_534_628_197_925_650_432,
        timestamp_ms: 1_796_395_349_008,
        kind: EntryKind::Message,
        sender: "alice-000001".into(),
        sender_device: 1,
        client_id: 42,
        body: Bytes::from(vec![0x5a; body_len]),
    }
}

#[cfg(test)]
mod tests {
    use courier_protocol::ws::{Decoder, Event, Limits, Role};

    use super::*;

    #[test]
    fn fixtures_decode() {
        let raw = masked_send_frame(200);
        let mut d = Decoder::new(
            Role::Server,
            Limits {
                max_frame: 1 << 16,
                max_message: 1 << 16,
            },
        );
        let Ok(Some((Some(Event::Binary(payload)), used))) = d.decode(&raw) else {
            panic!("decodes")
        };
        assert_eq!(used, raw.len());
        assert!(matches!(
            ClientFrame::decode(&payload),
            Ok(ClientFrame::Send { .. })
        ));
        let mut out = Vec::new();
        message_frame(200).encode(&mut out);
        assert_eq!(
            ServerFrame::decode(&Bytes::from(out)).ok(),
            Some(message_frame(200))
        );
    }
}
