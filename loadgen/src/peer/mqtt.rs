//! MQTT 3.1.1 over TCP (OASIS standard, sections 2 and 3), as much as
//! `loadgen peer` needs: CONNECT with a user name and password, SUBSCRIBE,
//! PUBLISH at QoS 0 or 1 with PUBACK, PINGREQ, DISCONNECT.
//!
//! ```text
//!  ► CONNECT(client id, user, password, keep alive)   ◄ CONNACK 0: ready
//!  ► SUBSCRIBE(topic, qos)                            ◄ SUBACK: subscribed
//!  ► PUBLISH(topic, id, payload) at QoS 1             ◄ PUBACK(id): acked
//!  ◄ PUBLISH: a delivery (► PUBACK when QoS 1)
//!  ► PINGREQ every keepalive interval                 ◄ PINGRESP
//! ```

use super::session::{payload_index, Note, Out, Session, SessionError};

/// Largest packet accepted from the server.
const MAX_PACKET: usize = 1 << 20;

/// One MQTT session. Created per connection, dropped with it.
#[derive(Debug)]
pub struct Mqtt {
    client_id: String,
    user: String,
    pass: String,
    topic: String,
    /// QoS of the subscription and of publishes.
    qos: u8,
    /// Keep alive stated in CONNECT, seconds.
    keep_alive_s: u16,
    next_id: u16,
    buf: Vec<u8>,
}

impl Mqtt {
    /// A session of `client_id` logging in as `user`, fanning out on
    /// `topic` at `qos` (0 or 1).
    pub fn new(
        client_id: &str,
        user: &str,
        pass: &str,
        topic: &str,
        qos: u8,
        keep_alive_s: u16,
    ) -> Self {
        Self {
            client_id: client_id.to_owned(),
            user: user.to_owned(),
            pass: pass.to_owned(),
            topic: topic.to_owned(),
            qos: qos.min(1),
            keep_alive_s,
            next_id: 0,
            buf: Vec::new(),
        }
    }

    fn packet_id(&mut self) -> u16 {
        // Packet ids are 1..=65535.
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        self.next_id
    }

    /// Handles one complete packet.
    fn packet(
        &self,
        kind: u8,
        flags: u8,
        body: &[u8],
        out: &mut Out,
        notes: &mut Vec<Note>,
    ) -> Result<(), SessionError> {
        match kind {
            // CONNACK: session present flags, return code.
            2 => match body {
                [_, 0] => notes.push(Note::Ready),
                [_, 4 | 5] => return Err(SessionError::Refused(format!("CONNACK {}", body[1]))),
                [_, code] => return Err(SessionError::Server(format!("CONNACK {code}"))),
                _ => return Err(SessionError::Malformed("connack")),
            },
            // PUBLISH: topic, packet id when QoS > 0, payload.
            3 => {
                let qos = (flags >> 1) & 3;
                let tlen = usize::from(u16::from_be_bytes(
                    body.get(..2)
                        .and_then(|b| b.try_into().ok())
                        .ok_or(SessionError::Malformed("publish"))?,
                ));
                let mut at = 2 + tlen;
                if qos > 0 {
                    let id = body
                        .get(at..at + 2)
                        .ok_or(SessionError::Malformed("publish"))?;
                    out.push(vec![0x40, 2, id[0], id[1]]);
                    at += 2;
                }
                let payload = body.get(at..).ok_or(SessionError::Malformed("publish"))?;
                if let Some(i) = payload_index(payload) {
                    notes.push(Note::Delivery(i));
                }
            }
            // PUBACK of one of ours.
            4 => notes.push(Note::Acked(1)),
            // SUBACK: packet id, one return code per filter.
            9 => match body.get(2) {
                Some(0x80) | None => return Err(SessionError::Server("SUBACK refused".into())),
                Some(_) => notes.push(Note::Subscribed),
            },
            // PINGRESP.
            13 => {}
            _ => return Err(SessionError::Malformed("packet_type")),
        }
        Ok(())
    }
}

impl Session for Mqtt {
    fn start(&mut self, out: &mut Out) {
        let mut v = Vec::new();
        put_str(&mut v, "MQTT");
        v.push(4); // protocol level 3.1.1
        v.push(0x80 | 0x40 | 0x02); // user name, password, clean session
        v.extend_from_slice(&self.keep_alive_s.to_be_bytes());
        put_str(&mut v, &self.client_id);
        put_str(&mut v, &self.user);
        put_str(&mut v, &self.pass);
        out.push(packet(0x10, &v));
    }

    fn handle(
        &mut self,
        input: &[u8],
        out: &mut Out,
        notes: &mut Vec<Note>,
    ) -> Result<(), SessionError> {
        self.buf.extend_from_slice(input);
        let mut at = 0;
        while let Some((header, len)) = fixed_header(&self.buf[at..])? {
            if len > MAX_PACKET {
                return Err(SessionError::Malformed("packet_too_big"));
            }
            let start = at + header;
            if self.buf.len() < start + len {
                break;
            }
            let first = self.buf[at];
            self.packet(
                first >> 4,
                first & 0x0f,
                &self.buf[start..start + len],
                out,
                notes,
            )?;
            at = start + len;
        }
        self.buf.drain(..at);
        Ok(())
    }

    fn keepalive(&mut self, out: &mut Out) {
        out.push(vec![0xc0, 0]);
    }

    fn subscribe(&mut self, out: &mut Out) {
        let mut v = self.packet_id().to_be_bytes().to_vec();
        put_str(&mut v, &self.topic);
        v.push(self.qos);
        out.push(packet(0x82, &v));
    }

    fn publish(&mut self, _index: u64, body: &[u8], out: &mut Out) -> u64 {
        let mut v = Vec::with_capacity(body.len() + self.topic.len() + 4);
        put_str(&mut v, &self.topic);
        if self.qos > 0 {
            let id = self.packet_id();
            v.extend_from_slice(&id.to_be_bytes());
        }
        v.extend_from_slice(body);
        out.push(packet(0x30 | (self.qos << 1), &v));
        // At QoS 0 nothing comes back: count it accepted once written.
        u64::from(self.qos)
    }

    fn goodbye(&mut self, out: &mut Out) {
        out.push(vec![0xe0, 0]);
    }
}

/// A packet: first byte, remaining length, `body`.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        p.push(byte);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(body);
    p
}

/// The fixed header at the start of `buf`: its length and the remaining
/// length it states. None until it is complete.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, SessionError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(SessionError::Malformed("remaining_length"))
}

/// A UTF-8 string with its 16-bit length.
fn put_str(v: &mut Vec<u8>, s: &str) {
    let len = s.len().min(usize::from(u16::MAX));
    v.extend_from_slice(&(len as u16).to_be_bytes());
    v.extend_from_slice(&s.as_bytes()[..len]);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::peer::session::payload;

    fn feed(m: &mut Mqtt, input: &[u8]) -> Result<(Out, Vec<Note>), SessionError> {
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        m.handle(input, &mut out, &mut notes)?;
        Ok((out, notes))
    }

    #[test]
    fn connect_packet_is_3_1_1_with_credentials() {
        let mut m = Mqtt::new("c1", "lg", "pw", "fan", 1, 60);
        let mut out = Vec::new();
        m.start(&mut out);
        let expect = [
            &[0x10, 22, 0, 4][..],
            b"MQTT",
            &[4, 0xc2, 0, 60, 0, 2],
            b"c1",
            &[0, 2],
            b"lg",
            &[0, 2],
            b"pw",
        ]
        .concat();
        assert_eq!(out.concat(), expect);
        assert_eq!(feed(&mut m, &[0x20, 2, 0, 0]).unwrap().1, vec![Note::Ready]);
        let refused = feed(&mut Mqtt::new("c", "u", "p", "t", 0, 60), &[0x20, 2, 0, 5]);
        assert!(matches!(refused, Err(SessionError::Refused(_))));
    }

    #[test]
    fn remaining_length_varint() {
        assert_eq!(packet(0x30, &[0; 127])[1..2], [127]);
        assert_eq!(packet(0x30, &[0; 128])[1..3], [0x80, 1]);
        assert_eq!(packet(0x30, &[0; 16_384])[1..4], [0x80, 0x80, 1]);
        assert_eq!(fixed_header(&[0x30, 0x80, 1]).unwrap(), Some((3, 128)));
        assert_eq!(fixed_header(&[0x30, 0x80]).unwrap(), None);
        assert!(fixed_header(&[0x30, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn subscribe_publish_and_deliveries_at_qos_1() {
        let mut m = Mqtt::new("c1", "lg", "pw", "fan", 1, 60);
        let mut out = Vec::new();
        m.subscribe(&mut out);
        assert_eq!(
            out.concat(),
            [&[0x82, 8, 0, 1, 0, 3][..], b"fan", &[1]].concat()
        );
        let mut out = Vec::new();
        assert_eq!(m.publish(0, b"hi", &mut out), 1);
        assert_eq!(
            out.concat(),
            [&[0x32, 9, 0, 3][..], b"fan", &[0, 2], b"hi"].concat()
        );
        // SUBACK, PUBACK, then a QoS 1 delivery split in two reads.
        let body = payload(5, 30);
        let mut deliver = vec![0x32, (2 + 3 + 2 + body.len()) as u8, 0, 3];
        deliver.extend_from_slice(b"fan");
        deliver.extend_from_slice(&[0x12, 0x34]);
        deliver.extend_from_slice(&body);
        let mut input = vec![0x90, 3, 0, 1, 1, 0x40, 2, 0, 2];
        input.extend_from_slice(&deliver[..8]);
        let (out, notes) = feed(&mut m, &input).unwrap();
        assert!(out.is_empty());
        assert_eq!(notes, vec![Note::Subscribed, Note::Acked(1)]);
        let (out, notes) = feed(&mut m, &deliver[8..]).unwrap();
        assert_eq!(out, vec![vec![0x40, 2, 0x12, 0x34]], "PUBACK");
        assert_eq!(notes, vec![Note::Delivery(5)]);
        let mut refused = Mqtt::new("c2", "lg", "pw", "fan", 1, 60);
        assert!(feed(&mut refused, &[0x90, 3, 0, 2, 0x80]).is_err());
        let mut ping = Vec::new();
        m.keepalive(&mut ping);
        assert_eq!(ping.concat(), [0xc0, 0]);
        assert!(feed(&mut m, &[0xd0, 0]).unwrap().1.is_empty());
    }

    #[test]
    fn qos_0_expects_no_ack() {
        let mut m = Mqtt::new("c1", "lg", "pw", "fan", 0, 60);
        let mut out = Vec::new();
        assert_eq!(m.publish(0, b"hi", &mut out), 0);
        assert_eq!(out[0][0], 0x30);
        let (out, notes) = feed(&mut m, &[&[0x30, 7, 0, 3][..], b"fan", b"ab"].concat()).unwrap();
        assert!(out.is_empty() && notes.is_empty());
    }
}
