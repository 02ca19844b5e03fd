//! What every protocol client of `loadgen peer` has in common: the notes a
//! session hands its connection, the errors it fails with, and the fan-out
//! payload that carries a message's index.
//!
//! A session is sans-IO (no socket, no clock): `start` once the transport
//! is up, then `handle` for every input (one WebSocket message, or a chunk
//! of a TCP stream for MQTT), and `keepalive`, `subscribe`, `publish`,
//! `flush` when the connection asks. Every output is one message in `Out`
//! (the connection frames each as one WebSocket message, or writes them
//! back to back on TCP).

/// Messages to write, in order.
pub type Out = Vec<Vec<u8>>;

/// What a session tells its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// Authenticated and ready: the connection counts as up.
    Ready,
    /// The subscription (subject, topic, room, group) is in place.
    Subscribed,
    /// Fan-out message `index` arrived.
    Delivery(u64),
    /// The server accepted this many published messages.
    Acked(u64),
    /// A refusal the session survives (an error stanza, an `Error` frame).
    Error(String),
}

/// Why a session cannot go on; the connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The server refused the credentials.
    #[error("credentials refused: {0}")]
    Refused(String),
    /// The server broke the protocol, or said something this client does
    /// not speak.
    #[error("malformed input: {0}")]
    Malformed(&'static str),
    /// The server reported an error that ends the session.
    #[error("server error: {0}")]
    Server(String),
}

impl SessionError {
    /// A short label for the error counters.
    pub fn kind(&self) -> String {
        match self {
            Self::Refused(_) => "session.refused".into(),
            Self::Malformed(what) => format!("session.malformed.{what}"),
            Self::Server(_) => "session.server_error".into(),
        }
    }
}

/// One protocol client's session.
pub trait Session {
    /// The transport is up: what to write first (may be nothing when the
    /// server speaks first).
    fn start(&mut self, out: &mut Out);
    /// Input from the server.
    fn handle(
        &mut self,
        input: &[u8],
        out: &mut Out,
        notes: &mut Vec<Note>,
    ) -> Result<(), SessionError>;
    /// After a batch of input: acknowledgements batched per read, if any.
    fn flush(&mut self, _out: &mut Out) {}
    /// The protocol's own keepalive.
    fn keepalive(&mut self, out: &mut Out);
    /// Join the fan-out: subscribe, join the room, or (the publisher of a
    /// Courier run) create the groups. `Note::Subscribed` follows.
    fn subscribe(&mut self, out: &mut Out);
    /// Publish fan-out message `index` with `body`; returns how many
    /// acknowledgements (`Note::Acked`) to expect for it.
    fn publish(&mut self, index: u64, body: &[u8], out: &mut Out) -> u64;
    /// A polite goodbye before the socket closes.
    fn goodbye(&mut self, _out: &mut Out) {}
}

const MARK: &[u8] = b"pm";
const DIGITS: usize = 12;

/// The fan-out payload of message `index`: `pm<12 digits>.` padded with
/// `x` to `len` bytes (at least the 15 of the mark). Plain ASCII, so it
/// travels unescaped in XML and JSON.
pub fn payload(index: u64, len: usize) -> Vec<u8> {
    let mut p = format!("pm{index:0DIGITS$}.").into_bytes();
    if p.len() < len {
        p.resize(len, b'x');
    }
    p
}

/// The index of the first fan-out mark in `bytes`.
pub fn payload_index(bytes: &[u8]) -> Option<u64> {
    let mut from = 0;
    while let Some(at) = find(&bytes[from..], MARK) {
        let start = from + at + MARK.len();
        let digits = bytes.get(start..start + DIGITS)?;
        if digits.iter().all(u8::is_ascii_digit) && bytes.get(start + DIGITS) == Some(&b'.') {
            return std::str::from_utf8(digits).ok()?.parse().ok();
        }
        from = start;
    }
    None
}

/// The position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_index() {
        let p = payload(42, 200);
        assert_eq!(p.len(), 200);
        assert!(p.starts_with(b"pm000000000042.xx"));
        assert_eq!(payload_index(&p), Some(42));
        let mut framed = b"<body>pmx pm12".to_vec();
        framed.extend_from_slice(&payload(7, 20));
        assert_eq!(payload_index(&framed), Some(7));
        assert_eq!(payload_index(b"pm0000000000"), None);
        assert_eq!(payload(1, 3).len(), 15, "never shorter than the mark");
    }
}
