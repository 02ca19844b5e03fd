//! The NATS client protocol (text, CRLF-terminated), as `loadgen peer`
//! speaks it inside WebSocket messages to nats-server's WebSocket
//! listener. The server may split or join protocol lines across WebSocket
//! messages, so input is a byte stream here.
//!
//! ```text
//!  ◄ INFO {...}        ► CONNECT {"user","pass",...} PING   ◄ PONG: ready
//!  ► SUB <subject> 1 PING                                   ◄ PONG: subscribed
//!  ► PUB <subject> <n> <payload> PING                       ◄ PONG: acked
//!  ◄ MSG <subject> <sid> [reply] <n> <payload>: a delivery
//!  ◄ PING ► PONG; ► PING every keepalive interval
//! ```
//!
//! Core NATS has no publish acknowledgement; a `PING` after each `PUB` is
//! answered once the server has processed the `PUB` (it handles a
//! connection's input in order), so its `PONG` is the acknowledgement.

use std::collections::VecDeque;

use super::session::{payload_index, Note, Out, Session, SessionError};

/// Longest protocol line accepted (INFO carries the server's JSON).
const MAX_LINE: usize = 64 * 1024;

/// What an outstanding `PING` was for; `PONG`s come back in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ping {
    Login,
    Subscribe,
    Publish,
    Keepalive,
}

/// One NATS session. Created per connection, dropped with it.
#[derive(Debug)]
pub struct Nats {
    user: String,
    pass: String,
    subject: String,
    connected: bool,
    buf: Vec<u8>,
    pings: VecDeque<Ping>,
}

impl Nats {
    /// A session that logs in as `user` with `pass` (an empty user logs in
    /// with `pass` as the token) and fans out on `subject`.
    pub fn new(user: &str, pass: &str, subject: &str) -> Self {
        Self {
            user: user.to_owned(),
            pass: pass.to_owned(),
            subject: subject.to_owned(),
            connected: false,
            buf: Vec::new(),
            pings: VecDeque::new(),
        }
    }

    fn connect_line(&self) -> Vec<u8> {
        let auth = if self.user.is_empty() {
            format!("\"auth_token\":{}", json_string(&self.pass))
        } else {
            format!(
                "\"user\":{},\"pass\":{}",
                json_string(&self.user),
                json_string(&self.pass)
            )
        };
        format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"tls_required\":false,{auth},\
             \"name\":\"loadgen\",\"lang\":\"rust\",\"version\":\"0\",\"protocol\":1,\
             \"headers\":false,\"no_responders\":false}}\r\nPING\r\n"
        )
        .into_bytes()
    }

    /// Handles one complete line (without CRLF) and, for `MSG`, its
    /// payload. Returns how many bytes of `buf` it consumed, or None when
    /// the payload is not all there yet.
    fn line(
        &mut self,
        end: usize,
        out: &mut Out,
        notes: &mut Vec<Note>,
    ) -> Result<Option<usize>, SessionError> {
        let line = &self.buf[..end];
        let mut consumed = end + 2;
        if line.starts_with(b"MSG ") {
            let text = std::str::from_utf8(line).map_err(|_| SessionError::Malformed("msg"))?;
            let len: usize = text
                .split_ascii_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .ok_or(SessionError::Malformed("msg"))?;
            if self.buf.len() < consumed + len + 2 {
                return Ok(None);
            }
            let body = &self.buf[consumed..consumed + len];
            if let Some(i) = payload_index(body) {
                notes.push(Note::Delivery(i));
            }
            consumed += len + 2;
        } else if line == b"PING" {
            out.push(b"PONG\r\n".to_vec());
        } else if line == b"PONG" {
            match self.pings.pop_front() {
                Some(Ping::Login) => notes.push(Note::Ready),
                Some(Ping::Subscribe) => notes.push(Note::Subscribed),
                Some(Ping::Publish) => notes.push(Note::Acked(1)),
                Some(Ping::Keepalive) | None => {}
            }
        } else if line.starts_with(b"INFO ") {
            if !self.connected {
                self.connected = true;
                out.push(self.connect_line());
                self.pings.push_back(Ping::Login);
            }
        } else if line.starts_with(b"-ERR") {
            let text = String::from_utf8_lossy(line).into_owned();
            if text.contains("Authorization") || text.contains("Authentication") {
                return Err(SessionError::Refused(text));
            }
            return Err(SessionError::Server(text));
        } else if line != b"+OK" {
            return Err(SessionError::Malformed("line"));
        }
        Ok(Some(consumed))
    }
}

impl Session for Nats {
    fn start(&mut self, _out: &mut Out) {
        // The server speaks first (INFO).
    }

    fn handle(
        &mut self,
        input: &[u8],
        out: &mut Out,
        notes: &mut Vec<Note>,
    ) -> Result<(), SessionError> {
        self.buf.extend_from_slice(input);
        let mut start = 0;
        loop {
            let Some(end) = self.buf[start..].windows(2).position(|w| w == b"\r\n") else {
                if self.buf.len() - start > MAX_LINE {
                    return Err(SessionError::Malformed("line_too_long"));
                }
                break;
            };
            // Work on the unconsumed tail.
            if start > 0 {
                self.buf.drain(..start);
                start = 0;
            }
            match self.line(end, out, notes)? {
                Some(n) => start = n,
                None => break,
            }
        }
        self.buf.drain(..start);
        Ok(())
    }

    fn keepalive(&mut self, out: &mut Out) {
        out.push(b"PING\r\n".to_vec());
        self.pings.push_back(Ping::Keepalive);
    }

    fn subscribe(&mut self, out: &mut Out) {
        out.push(format!("SUB {} 1\r\nPING\r\n", self.subject).into_bytes());
        self.pings.push_back(Ping::Subscribe);
    }

    fn publish(&mut self, _index: u64, body: &[u8], out: &mut Out) -> u64 {
        let mut m = format!("PUB {} {}\r\n", self.subject, body.len()).into_bytes();
        m.extend_from_slice(body);
        m.extend_from_slice(b"\r\nPING\r\n");
        out.push(m);
        self.pings.push_back(Ping::Publish);
        1
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::peer::session::payload;

    fn feed(n: &mut Nats, input: &[u8]) -> (Out, Vec<Note>) {
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        n.handle(input, &mut out, &mut notes).unwrap();
        (out, notes)
    }

    #[test]
    fn logs_in_after_info_and_is_ready_on_pong() {
        let mut n = Nats::new("lg", "p\"w", "fan");
        let (out, notes) = feed(&mut n, b"INFO {\"server_id\":\"x\"}\r\n");
        assert!(notes.is_empty());
        let connect = String::from_utf8(out.concat()).unwrap();
        assert!(connect.starts_with("CONNECT {"));
        assert!(connect.contains("\"user\":\"lg\",\"pass\":\"p\\\"w\""));
        assert!(connect.ends_with("}\r\nPING\r\n"));
        let (_, notes) = feed(&mut n, b"PO");
        assert!(notes.is_empty(), "half a line waits");
        let (_, notes) = feed(&mut n, b"NG\r\n");
        assert_eq!(notes, vec![Note::Ready]);
    }

    #[test]
    fn a_token_login() {
        let n = Nats::new("", "secret", "fan");
        let c = String::from_utf8(n.connect_line()).unwrap();
        assert!(c.contains("\"auth_token\":\"secret\""));
    }

    #[test]
    fn refusal_subscribe_publish_and_deliveries() {
        let mut n = Nats::new("lg", "x", "fan");
        feed(&mut n, b"INFO {}\r\n");
        let err = n
            .handle(
                b"-ERR 'Authorization Violation'\r\n",
                &mut Vec::new(),
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(matches!(err, SessionError::Refused(_)));

        let mut n = Nats::new("lg", "x", "fan");
        feed(&mut n, b"INFO {}\r\nPONG\r\n");
        let mut out = Vec::new();
        n.subscribe(&mut out);
        assert_eq!(out.concat(), b"SUB fan 1\r\nPING\r\n");
        let mut out = Vec::new();
        assert_eq!(n.publish(3, b"hi", &mut out), 1);
        assert_eq!(out.concat(), b"PUB fan 2\r\nhi\r\nPING\r\n");
        n.keepalive(&mut Vec::new());
        // Server ping, the subscribe's PONG, a delivery split mid-payload.
        let body = payload(9, 40);
        let mut msg = format!("PING\r\nPONG\r\nMSG fan 1 {}\r\n", body.len()).into_bytes();
        msg.extend_from_slice(&body[..10]);
        let (out, notes) = feed(&mut n, &msg);
        assert_eq!(out.concat(), b"PONG\r\n");
        assert_eq!(notes, vec![Note::Subscribed]);
        let mut rest = body[10..].to_vec();
        rest.extend_from_slice(b"\r\n+OK\r\nPONG\r\nPONG\r\n");
        let (_, notes) = feed(&mut n, &rest);
        assert_eq!(notes, vec![Note::Delivery(9), Note::Acked(1)]);
        assert!(n.buf.is_empty());
        assert!(n
            .handle(b"BOGUS\r\n", &mut Vec::new(), &mut Vec::new())
            .is_err());
    }
}
