//! XMPP over WebSocket (RFC 7395): each WebSocket text message is one
//! framing element (`<open/>`, `<close/>`) or one stanza. Enough of RFC
//! 6120, RFC 6121 and XEP-0045 (multi-user chat) for `loadgen peer`:
//!
//! ```text
//!  ► <open to=domain/>          ◄ <open/> <features> (mechanisms)
//!  ► <auth PLAIN>               ◄ <success/>          (<failure/>: refused)
//!  ► <open to=domain/>          ◄ <open/> <features> (bind)
//!  ► <iq set bind resource>     ◄ <iq result>
//!  ► <presence/>                                      ready
//!  ► <presence to=room/nick>    ◄ occupants' presence, then our own with
//!                                 status 110: subscribed
//!  ► <message groupchat>        ◄ the room reflects it to every occupant:
//!                                 to the sender that is its ack
//!  ► <iq get ping> every keepalive interval (XEP-0199) ◄ <iq result>
//! ```
//!
//! The XML is read only as far as this needs: the first tag's name and
//! attributes, and a few well-known child markers. It is not a general XML
//! parser; ejabberd's output is well-formed and unprefixed apart from
//! `stream:features`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::session::{find, payload_index, Note, Out, Session, SessionError};

const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";

/// Where the login is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// `<open/>` sent; waiting for the features with SASL mechanisms.
    Mechanisms,
    /// `<auth/>` sent.
    Auth,
    /// Restarted after SASL; waiting for the features with bind.
    Bind,
    /// Bind requested.
    Binding,
    /// Bound and available.
    Ready,
}

/// One XMPP session. Created per connection, dropped with it.
#[derive(Debug)]
pub struct Xmpp {
    domain: String,
    user: String,
    pass: String,
    resource: String,
    room: String,
    nick: String,
    step: Step,
    next_id: u64,
}

impl Xmpp {
    /// A session of `user@domain/resource` that joins `room` (a bare room
    /// JID) as `nick`.
    pub fn new(
        domain: &str,
        user: &str,
        pass: &str,
        resource: &str,
        room: &str,
        nick: &str,
    ) -> Self {
        Self {
            domain: domain.to_owned(),
            user: user.to_owned(),
            pass: pass.to_owned(),
            resource: resource.to_owned(),
            room: room.to_owned(),
            nick: nick.to_owned(),
            step: Step::Mechanisms,
            next_id: 0,
        }
    }

    fn open(&self) -> Vec<u8> {
        format!(
            "<open xmlns=\"{FRAMING}\" to=\"{}\" version=\"1.0\"/>",
            escape(&self.domain)
        )
        .into_bytes()
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn features(&mut self, xml: &[u8], out: &mut Out) -> Result<(), SessionError> {
        match self.step {
            Step::Mechanisms => {
                if find(xml, b">PLAIN<").is_none() {
                    return Err(SessionError::Malformed("no_sasl_plain"));
                }
                let creds = format!("\0{}\0{}", self.user, self.pass);
                out.push(
                    format!(
                        "<auth xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\" mechanism=\"PLAIN\">{}</auth>",
                        BASE64.encode(creds)
                    )
                    .into_bytes(),
                );
                self.step = Step::Auth;
            }
            Step::Bind => {
                out.push(
                    format!(
                        "<iq type=\"set\" id=\"bind\"><bind xmlns=\"urn:ietf:params:xml:ns:xmpp-bind\">\
                         <resource>{}</resource></bind></iq>",
                        escape(&self.resource)
                    )
                    .into_bytes(),
                );
                self.step = Step::Binding;
            }
            _ => return Err(SessionError::Malformed("features")),
        }
        Ok(())
    }

    fn iq(&mut self, xml: &[u8], out: &mut Out, notes: &mut Vec<Note>) -> Result<(), SessionError> {
        let kind = attr(xml, "type").unwrap_or_default();
        let id = attr(xml, "id").unwrap_or_default();
        match kind.as_str() {
            "result" if self.step == Step::Binding && id == "bind" => {
                out.push(b"<presence/>".to_vec());
                self.step = Step::Ready;
                notes.push(Note::Ready);
            }
            "error" if id == "bind" => return Err(SessionError::Server("bind refused".into())),
            // A server's ping (or any query) is answered, as RFC 6120 asks:
            // a result for ping, service-unavailable for the rest.
            "get" | "set" => {
                let from = attr(xml, "from").map(|f| format!(" to=\"{}\"", escape(&f)));
                let from = from.unwrap_or_default();
                let reply = if find(xml, b"urn:xmpp:ping").is_some() {
                    format!("<iq type=\"result\" id=\"{}\"{from}/>", escape(&id))
                } else {
                    format!(
                        "<iq type=\"error\" id=\"{}\"{from}><error type=\"cancel\">\
                         <service-unavailable xmlns=\"urn:ietf:params:xml:ns:xmpp-stanzas\"/>\
                         </error></iq>",
                        escape(&id)
                    )
                };
                out.push(reply.into_bytes());
            }
            "error" => notes.push(Note::Error("xmpp.iq_error".into())),
            _ => {}
        }
        Ok(())
    }

    /// The occupant JID of this session in the room.
    fn occupant(&self) -> String {
        format!("{}/{}", self.room, self.nick)
    }
}

impl Session for Xmpp {
    fn start(&mut self, out: &mut Out) {
        out.push(self.open());
    }

    fn handle(
        &mut self,
        xml: &[u8],
        out: &mut Out,
        notes: &mut Vec<Note>,
    ) -> Result<(), SessionError> {
        let name = tag_name(xml).ok_or(SessionError::Malformed("not_xml"))?;
        match name {
            "open" => {}
            "close" => return Err(SessionError::Server("stream closed".into())),
            "stream:features" | "features" => self.features(xml, out)?,
            "success" if self.step == Step::Auth => {
                out.push(self.open());
                self.step = Step::Bind;
            }
            "failure" => {
                return Err(SessionError::Refused(
                    String::from_utf8_lossy(xml).into_owned(),
                ))
            }
            "stream:error" | "error" => {
                return Err(SessionError::Server(
                    String::from_utf8_lossy(xml).into_owned(),
                ))
            }
            "iq" => self.iq(xml, out, notes)?,
            "presence" => {
                let from = attr(xml, "from").unwrap_or_default();
                if from == self.occupant() {
                    if attr(xml, "type").as_deref() == Some("error") {
                        return Err(SessionError::Server("room join refused".into()));
                    }
                    if find(xml, b"code=\"110\"")
                        .or(find(xml, b"code='110'"))
                        .is_some()
                    {
                        notes.push(Note::Subscribed);
                    }
                }
            }
            "message" => {
                if attr(xml, "type").as_deref() == Some("error") {
                    notes.push(Note::Error("xmpp.message_error".into()));
                    return Ok(());
                }
                let Some(i) = find(xml, b"<body").and_then(|at| payload_index(&xml[at..])) else {
                    return Ok(());
                };
                if attr(xml, "from").is_some_and(|f| f == self.occupant()) {
                    notes.push(Note::Acked(1));
                } else {
                    notes.push(Note::Delivery(i));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn keepalive(&mut self, out: &mut Out) {
        let id = self.id();
        out.push(
            format!(
                "<iq type=\"get\" id=\"ka{id}\" to=\"{}\"><ping xmlns=\"urn:xmpp:ping\"/></iq>",
                escape(&self.domain)
            )
            .into_bytes(),
        );
    }

    fn subscribe(&mut self, out: &mut Out) {
        out.push(
            format!(
                "<presence to=\"{}\"><x xmlns=\"http://jabber.org/protocol/muc\">\
                 <history maxstanzas=\"0\"/></x></presence>",
                escape(&self.occupant())
            )
            .into_bytes(),
        );
    }

    fn publish(&mut self, index: u64, body: &[u8], out: &mut Out) -> u64 {
        let mut m = format!(
            "<message to=\"{}\" type=\"groupchat\" id=\"m{index}\"><body>",
            escape(&self.room)
        )
        .into_bytes();
        // The fan-out payload is plain ASCII without markup characters.
        m.extend_from_slice(body);
        m.extend_from_slice(b"</body></message>");
        out.push(m);
        1
    }

    fn goodbye(&mut self, out: &mut Out) {
        out.push(format!("<close xmlns=\"{FRAMING}\"/>").into_bytes());
    }
}

/// The name of the first tag of `xml`.
fn tag_name(xml: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(xml).ok()?.trim_start();
    let s = s.strip_prefix("<?xml").map_or(s, |rest| {
        rest.find("?>").map_or("", |e| rest[e + 2..].trim_start())
    });
    let rest = s.strip_prefix('<')?;
    let end = rest.find(|c: char| c.is_whitespace() || c == '/' || c == '>')?;
    Some(&rest[..end])
}

/// The value of attribute `name` on the first tag of `xml`, unescaped.
fn attr(xml: &[u8], name: &str) -> Option<String> {
    let s = std::str::from_utf8(xml).ok()?;
    let tag = &s[..s.find('>')?];
    let mut rest = tag;
    while let Some(at) = rest.find(name) {
        let before = rest[..at].chars().last();
        let after = &rest[at + name.len()..];
        if before.is_some_and(char::is_whitespace) {
            if let Some(v) = after.trim_start().strip_prefix('=') {
                let v = v.trim_start();
                let quote = v.chars().next()?;
                if quote == '"' || quote == '\'' {
                    let v = &v[1..];
                    return Some(unescape(&v[..v.find(quote)?]));
                }
            }
        }
        rest = after;
    }
    None
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::peer::session::payload;

    fn feed(x: &mut Xmpp, input: &str) -> Result<(Vec<String>, Vec<Note>), SessionError> {
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        x.handle(input.as_bytes(), &mut out, &mut notes)?;
        let out = out
            .into_iter()
            .map(|m| String::from_utf8(m).unwrap())
            .collect();
        Ok((out, notes))
    }

    fn session() -> Xmpp {
        Xmpp::new(
            "localhost",
            "u1",
            "pw",
            "r1",
            "fan@conference.localhost",
            "n1",
        )
    }

    #[test]
    fn logs_in_with_sasl_plain_and_binds() {
        let mut x = session();
        let mut out = Vec::new();
        x.start(&mut out);
        assert_eq!(
            String::from_utf8(out.concat()).unwrap(),
            "<open xmlns=\"urn:ietf:params:xml:ns:xmpp-framing\" to=\"localhost\" version=\"1.0\"/>"
        );
        feed(&mut x, "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' id='1' from='localhost' version='1.0'/>").unwrap();
        let (out, _) = feed(
            &mut x,
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'>\
             <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism>\
             </mechanisms></stream:features>",
        )
        .unwrap();
        // base64("\0u1\0pw")
        assert!(
            out[0].contains("mechanism=\"PLAIN\">AHUxAHB3</auth>"),
            "{}",
            out[0]
        );
        let (out, _) = feed(
            &mut x,
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        )
        .unwrap();
        assert!(out[0].starts_with("<open "));
        let (out, _) = feed(
            &mut x,
            "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>",
        )
        .unwrap();
        assert!(out[0].contains("<resource>r1</resource>"));
        let (out, notes) = feed(
            &mut x,
            "<iq type='result' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <jid>u1@localhost/r1</jid></bind></iq>",
        )
        .unwrap();
        assert_eq!(out, vec!["<presence/>".to_owned()]);
        assert_eq!(notes, vec![Note::Ready]);
    }

    #[test]
    fn a_refused_login() {
        let mut x = session();
        feed(&mut x, "<stream:features><mechanisms><mechanism>PLAIN</mechanism></mechanisms></stream:features>").unwrap();
        let e = feed(
            &mut x,
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>",
        );
        assert!(matches!(e, Err(SessionError::Refused(_))));
    }

    #[test]
    fn joins_the_room_and_tells_deliveries_from_its_own_echo() {
        let mut x = session();
        let mut out = Vec::new();
        x.subscribe(&mut out);
        let join = String::from_utf8(out.concat()).unwrap();
        assert!(join.starts_with("<presence to=\"fan@conference.localhost/n1\">"));
        assert!(join.contains("<history maxstanzas=\"0\"/>"));
        let (_, notes) = feed(
            &mut x,
            "<presence from='fan@conference.localhost/n2'><x><status code='110'/></x></presence>",
        )
        .unwrap();
        assert!(notes.is_empty(), "another occupant's presence");
        let (_, notes) = feed(&mut x, "<presence from='fan@conference.localhost/n1' to='u1@localhost/r1'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant'/><status code='110'/></x></presence>").unwrap();
        assert_eq!(notes, vec![Note::Subscribed]);
        let body = String::from_utf8(payload(12, 50)).unwrap();
        let (_, notes) = feed(&mut x, &format!("<message from='fan@conference.localhost/pub' type='groupchat' id='m12'><body>{body}</body></message>")).unwrap();
        assert_eq!(notes, vec![Note::Delivery(12)]);
        let (_, notes) = feed(&mut x, &format!("<message from=\"fan@conference.localhost/n1\" type=\"groupchat\"><body>{body}</body></message>")).unwrap();
        assert_eq!(notes, vec![Note::Acked(1)]);
        let (_, notes) = feed(
            &mut x,
            "<message from='fan@conference.localhost' type='groupchat'><subject/></message>",
        )
        .unwrap();
        assert!(notes.is_empty(), "the room subject is no delivery");
        let mut out = Vec::new();
        assert_eq!(x.publish(3, b"pm000000000003.", &mut out), 1);
        assert_eq!(
            String::from_utf8(out.concat()).unwrap(),
            "<message to=\"fan@conference.localhost\" type=\"groupchat\" id=\"m3\"><body>pm000000000003.</body></message>"
        );
    }

    #[test]
    fn pings_both_ways() {
        let mut x = session();
        let mut out = Vec::new();
        x.keepalive(&mut out);
        assert!(String::from_utf8(out.concat())
            .unwrap()
            .contains("<ping xmlns=\"urn:xmpp:ping\"/>"));
        let (out, _) = feed(
            &mut x,
            "<iq from='localhost' type='get' id='s1'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .unwrap();
        assert_eq!(
            out,
            vec!["<iq type=\"result\" id=\"s1\" to=\"localhost\"/>".to_owned()]
        );
    }

    #[test]
    fn attributes_and_names() {
        assert_eq!(
            tag_name(b"<stream:features xmlns:stream='x'>"),
            Some("stream:features")
        );
        assert_eq!(tag_name(b"<?xml version='1.0'?><open/>"), Some("open"));
        assert_eq!(tag_name(b"hello"), None);
        let x = b"<message xml:lang='en' to='a' from=\"b&amp;c\" type='chat'><body type='x'/>";
        assert_eq!(attr(x, "from").as_deref(), Some("b&c"));
        assert_eq!(attr(x, "type").as_deref(), Some("chat"));
        assert_eq!(attr(x, "lang"), None, "xml:lang is not lang");
        assert_eq!(attr(x, "id"), None);
    }
}
