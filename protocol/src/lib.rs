//! Courier's wire formats, with no sockets and no clock.
//!
//! Two layers live here, each a pure function of the bytes it is given:
//!
//! ```text
//!  socket bytes ──► ws::FrameDecoder ──► ws::Event::Message(payload)
//!                                              │
//!                                              ▼
//!                                   frame::ClientFrame::decode
//!
//!  frame::ServerFrame::encode ──► ws::encode_frame ──► socket bytes
//! ```
//!
//! * [`ws`] parses and builds RFC 6455 frames over buffers the caller owns,
//!   using tungstenite's frame header codec. It enforces the framing rules
//!   (masking, reserved bits, control-frame limits, fragmentation, UTF-8 in
//!   text, size limits) and names the close code each violation earns.
//! * [`frame`] is client protocol v1: the binary frames a client and the
//!   gateway exchange inside WebSocket binary messages. `docs/protocol.md`
//!   is its reference.
//! * [`ids`] validates user and conversation identifiers.
//! * [`token`] mints and checks the signed session tokens (JWT, HS256), with
//!   the time passed in.
//!
//! What this crate does not do: read sockets, keep time, authenticate, or
//! decide what a frame means for a session. The gateway and the router do.

#![forbid(unsafe_code)]

pub mod close;
pub mod error;
pub mod frame;
pub mod ids;
pub mod token;
pub mod ws;

/// The WebSocket subprotocol that names client protocol v1.
pub const SUBPROTOCOL_V1: &str = "courier.v1";
