//! RFC 6455 framing over caller-owned buffers.
//!
//! The gateway reads socket bytes into a buffer shared by every session of a
//! core and hands the filled slice to [`Decoder::decode`], one frame at a
//! time. A frame that is not complete yet is `Ok(None)`: the caller keeps the
//! unread tail (in a small per-session buffer, only for as long as the frame
//! is in flight) and calls again when more bytes arrive. Nothing here holds a
//! read buffer between frames, which is what lets an idle session own none.
//!
//! Header parsing and formatting are tungstenite's; this module adds the
//! rules a server must enforce and names the close code each one earns.

use std::io::Cursor as IoCursor;

use bytes::{Bytes, BytesMut};
use tungstenite::error::ProtocolError;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::close;

/// Which end of the connection the decoder runs at. A server requires every
/// frame to be masked; a client requires none to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Decoding frames a client sent.
    Server,
    /// Decoding frames a server sent.
    Client,
}

/// Size limits, in payload bytes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest single frame accepted.
    pub max_frame: usize,
    /// Largest message (all fragments together) accepted.
    pub max_message: usize,
}

/// A complete message or control frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A binary message, reassembled if it was fragmented.
    Binary(Bytes),
    /// A text message; its payload was checked to be UTF-8.
    Text(Bytes),
    /// A ping with its application data.
    Ping(Bytes),
    /// A pong with its application data.
    Pong(Bytes),
    /// A close frame: its code and reason, or `None` when it carried no body.
    Close(Option<(u16, String)>),
}

/// A framing violation. The connection must be failed with [`Self::close_code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A framing rule of RFC 6455 was broken.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A frame or message exceeded the limits.
    #[error("frame or message too big")]
    TooBig,
    /// A text message or close reason was not UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
}

impl WsError {
    /// The close code RFC 6455 names for this violation.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Protocol(_) => close::PROTOCOL_ERROR,
            Self::TooBig => close::MESSAGE_TOO_BIG,
            Self::InvalidUtf8 => close::INVALID_PAYLOAD,
        }
    }
}

/// Longest payload of a control frame (RFC 6455 section 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest close reason: a control payload less the two-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Decodes frames one at a time. The only state kept between calls is a
/// fragmented message being reassembled.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    limits: Limits,
    /// A fragmented data message in progress: whether it is text, and the
    /// fragments so far. Created by a non-final data frame, dropped when the
    /// final continuation arrives or the connection fails.
    partial: Option<(bool, BytesMut)>,
}

impl Decoder {
    /// A decoder for `role` with `limits`.
    pub fn new(role: Role, limits: Limits) -> Self {
        Self {
            role,
            limits,
            partial: None,
        }
    }

    /// True while a fragmented message is being reassembled.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Decodes one frame from the front of `input`.
    ///
    /// `Ok(None)`: the frame is not complete; read more and call again with
    /// the same bytes plus the new ones. `Ok(Some((event, used)))`: `used`
    /// bytes were consumed; `event` is `None` for a fragment that did not
    /// complete its message.
    pub fn decode(&mut self, input: &[u8]) -> Result<Option<(Option<Event>, usize)>, WsError> {
        let mut cursor = IoCursor::new(input);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return Ok(None),
            // tungstenite refuses reserved opcodes itself, once the whole
            // header is in; name that violation rather than a generic one.
            Err(tungstenite::Error::Protocol(ProtocolError::InvalidOpcode(_))) => {
                return Err(WsError::Protocol("reserved opcode"));
            }
            Err(_) => return Err(WsError::Protocol("unparseable frame header")),
        };
        self.check_header(&header, len)?;
        let start = cursor.position() as usize;
        // `len` is bounded by max_frame (checked above), so it fits in usize.
        let end = start + len as usize;
        if input.len() < end {
            return Ok(None);
        }
        let mut payload = BytesMut::from(&input[start..end]);
        if let Some(mask) = header.mask {
            apply_mask(&mut payload, mask);
        }
        let event = self.handle_frame(&header, payload)?;
        Ok(Some((event, end)))
    }

    /// Checks everything the header alone can tell, before the payload is
    /// read, so an oversized frame fails without waiting for its bytes.
    fn check_header(&self, header: &FrameHeader, len: u64) -> Result<(), WsError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Protocol("reserved bits set without an extension"));
        }
        match (self.role, header.mask.is_some()) {
            (Role::Server, false) => return Err(WsError::Protocol("client frame not masked")),
            (Role::Client, true) => return Err(WsError::Protocol("server frame masked")),
            _ => {}
        }
        match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(WsError::Protocol("reserved opcode"))
            }
            OpCode::Control(_) if !header.is_final => {
                Err(WsError::Protocol("fragmented control frame"))
            }
            OpCode::Control(_) if len > MAX_CONTROL_PAYLOAD as u64 => {
                Err(WsError::Protocol("control frame payload over 125 bytes"))
            }
            OpCode::Data(Data::Continue) if self.partial.is_none() => {
                Err(WsError::Protocol("continuation frame without a message"))
            }
            OpCode::Data(Data::Text | Data::Binary) if self.partial.is_some() => Err(
                WsError::Protocol("new message before the fragmented one ended"),
            ),
            _ if len > self.limits.max_frame as u64 => Err(WsError::TooBig),
            OpCode::Data(Data::Continue) => {
                let so_far = self.partial.as_ref().map_or(0, |(_, b)| b.len()) as u64;
                if so_far + len > self.limits.max_message as u64 {
                    Err(WsError::TooBig)
                } else {
                    Ok(())
                }
            }
            _ if len > self.limits.max_message as u64 => Err(WsError::TooBig),
            _ => Ok(()),
        }
    }

    fn handle_frame(
        &mut self,
        header: &FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Event>, WsError> {
        let event = match header.opcode {
            OpCode::Control(Control::Ping) => Event::Ping(payload.freeze()),
            OpCode::Control(Control::Pong) => Event::Pong(payload.freeze()),
            OpCode::Control(Control::Close) => Event::Close(parse_close(&payload)?),
            OpCode::Data(kind @ (Data::Text | Data::Binary)) => {
                let text = kind == Data::Text;
                if !header.is_final {
                    self.partial = Some((text, payload));
                    return Ok(None);
                }
                data_event(text, payload)?
            }
            OpCode::Data(Data::Continue) => {
                let Some((text, mut buf)) = self.partial.take() else {
                    return Err(WsError::Protocol("continuation frame without a message"));
                };
                buf.extend_from_slice(&payload);
                if !header.is_final {
                    self.partial = Some((text, buf));
                    return Ok(None);
                }
                data_event(text, buf)?
            }
            OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                return Err(WsError::Protocol("reserved opcode"));
            }
        };
        Ok(Some(event))
    }
}

fn data_event(text: bool, payload: BytesMut) -> Result<Event, WsError> {
    if text {
        std::str::from_utf8(&payload).map_err(|_| WsError::InvalidUtf8)?;
        Ok(Event::Text(payload.freeze()))
    } else {
        Ok(Event::Binary(payload.freeze()))
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol("close frame with a one-byte body")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::is_sendable(code) {
                return Err(WsError::Protocol("close code not allowed on the wire"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

/// The kinds of frame a sender writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// A binary data frame.
    Binary,
    /// A text data frame.
    Text,
    /// A ping.
    Ping,
    /// A pong.
    Pong,
    /// A close frame.
    Close,
}

impl From<Opcode> for OpCode {
    fn from(op: Opcode) -> Self {
        match op {
            Opcode::Binary => OpCode::Data(Data::Binary),
            Opcode::Text => OpCode::Data(Data::Text),
            Opcode::Ping => OpCode::Control(Control::Ping),
            Opcode::Pong => OpCode::Control(Control::Pong),
            Opcode::Close => OpCode::Control(Control::Close),
        }
    }
}

/// Longest header a frame can have (a 64-bit length and a mask).
pub const MAX_HEADER: usize = 14;

/// Appends one final frame carrying `payload` to `out`, masked with `mask`
/// when given (clients must mask, servers must not).
pub fn encode_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: opcode.into(),
        mask,
    };
    // Formatting into a Vec cannot fail: its Write impl never errors.
    let _ = header.format(payload.len() as u64, out);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(mask) = mask {
        apply_mask(&mut out[start..], mask);
    }
}

/// Appends a close frame with `code` and `reason`, the reason cut to
/// [`MAX_CLOSE_REASON`] bytes at a character boundary.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(out, Opcode::Close, &payload, mask);
}

/// XORs `buf` with the repeating 4-byte `mask`, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_frame: 1024,
        max_message: 4096,
    };
    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn server() -> Decoder {
        Decoder::new(Role::Server, LIMITS)
    }

    fn raw(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut out = vec![
            first,
            payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 },
        ];
        let start = out.len() + if mask.is_some() { 4 } else { 0 };
        if let Some(m) = mask {
            out.extend_from_slice(&m);
        }
        out.extend_from_slice(payload);
        if let Some(m) = mask {
            apply_mask(&mut out[start..], m);
        }
        out
    }

    fn decode_all(d: &mut Decoder, mut input: &[u8]) -> Result<Vec<Event>, WsError> {
        let mut events = Vec::new();
        while let Some((event, used)) = d.decode(input)? {
            events.extend(event);
            input = &input[used..];
        }
        Ok(events)
    }

    #[test]
    fn masked_binary_round_trip() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, Opcode::Binary, b"hello world, masked", Some(MASK));
        let events = decode_all(&mut server(), &buf).unwrap();
        assert_eq!(
            events,
            vec![Event::Binary(Bytes::from_static(b"hello world, masked"))]
        );
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, Opcode::Binary, &[7; 300], Some(MASK));
        let mut d = server();
        for cut in [0, 1, 2, 5, 8, 299] {
            assert_eq!(d.decode(&buf[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(matches!(d.decode(&buf), Ok(Some((Some(Event::Binary(_)), n))) if n == buf.len()));
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut input = raw(0x02, b"ab", Some(MASK)); // binary, not final
        input.extend(raw(0x89, b"p", Some(MASK))); // ping in the middle
        input.extend(raw(0x80, b"cd", Some(MASK))); // final continuation
        let events = decode_all(&mut server(), &input).unwrap();
        assert_eq!(
            events,
            vec![
                Event::Ping(Bytes::from_static(b"p")),
                Event::Binary(Bytes::from_static(b"abcd"))
            ]
        );
    }

    #[test]
    fn violations_name_their_close_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (raw(0x82, b"x", None), close::PROTOCOL_ERROR), // unmasked
            (raw(0xc2, b"x", Some(MASK)), close::PROTOCOL_ERROR), // rsv1
            (raw(0x83, b"x", Some(MASK)), close::PROTOCOL_ERROR), // reserved data opcode
            (raw(0x8b, b"x", Some(MASK)), close::PROTOCOL_ERROR), // reserved control opcode
            (raw(0x09, b"x", Some(MASK)), close::PROTOCOL_ERROR), // fragmented ping
            (raw(0x80, b"x", Some(MASK)), close::PROTOCOL_ERROR), // lone continuation
            (raw(0x81, &[0xff, 0xfe], Some(MASK)), close::INVALID_PAYLOAD), // bad UTF-8 text
            (raw(0x88, &[3], Some(MASK)), close::PROTOCOL_ERROR), // one-byte close
            (raw(0x88, &[0x03, 0xed], Some(MASK)), close::PROTOCOL_ERROR), // close 1005
            (raw(0x88, &[0x03, 0xee], Some(MASK)), close::PROTOCOL_ERROR), // close 1006
            (raw(0x88, &[0x03, 0xf7], Some(MASK)), close::PROTOCOL_ERROR), // close 1015
            (
                raw(0x88, &[0x03, 0xe8, 0xff], Some(MASK)),
                close::INVALID_PAYLOAD,
            ), // bad reason
        ];
        for (input, code) in cases {
            let err = decode_all(&mut server(), &input).expect_err("must fail");
            assert_eq!(err.close_code(), code, "{input:02x?}: {err}");
        }
    }

    #[test]
    fn oversized_fails_from_the_header_alone() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, Opcode::Binary, &[0; 2000], Some(MASK));
        // Only the header is present: the decoder must not wait for the rest.
        assert_eq!(server().decode(&buf[..8]), Err(WsError::TooBig));
        let mut ping = Vec::new();
        encode_frame(&mut ping, Opcode::Ping, &[0; 126], Some(MASK));
        assert!(matches!(server().decode(&ping), Err(WsError::Protocol(_))));
    }

    #[test]
    fn fragmented_message_over_the_limit() {
        let mut d = server();
        let mut input = Vec::new();
        let chunk = vec![0u8; 1000];
        let mut first = Vec::new();
        encode_frame(&mut first, Opcode::Binary, &chunk, Some(MASK));
        first[0] &= 0x7f; // not final
        input.extend(first);
        for _ in 0..5 {
            let mut cont = Vec::new();
            encode_frame(&mut cont, Opcode::Binary, &chunk, Some(MASK));
            cont[0] = 0x00; // continuation, not final
            input.extend(cont);
        }
        assert_eq!(decode_all(&mut d, &input), Err(WsError::TooBig));
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let mut buf = Vec::new();
        encode_close(&mut buf, close::GOING_AWAY, &"é".repeat(100), None);
        let mut client = Decoder::new(Role::Client, LIMITS);
        let events = decode_all(&mut client, &buf).unwrap();
        let [Event::Close(Some((code, reason)))] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(*code, close::GOING_AWAY);
        assert!(reason.len() <= MAX_CLOSE_REASON && reason.len() % 2 == 0);
    }

    #[test]
    fn mask_matches_bytewise_xor() {
        let data: Vec<u8> = (0..=255).collect();
        for len in [0, 1, 7, 8, 9, 255] {
            let mut fast = data[..len].to_vec();
            apply_mask(&mut fast, MASK);
            let slow: Vec<u8> = data[..len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ MASK[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }
}
