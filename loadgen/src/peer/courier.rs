//! Courier's own protocol (docs/protocol.md) as a `loadgen peer` session:
//! the same job as the peers, with the codec of `courier-protocol`.
//!
//! ```text
//!  ◄ Welcome ► Sync ◄ SyncDone: ready          ► Ping every keepalive ◄ Pong
//!  publisher: ► GroupCreate(members) per group ◄ GroupCreated: subscribed
//!  member:    ◄ Message(MembersAdded): subscribed
//!  publisher: ► Send to every group            ◄ Sent: acked
//!  member:    ◄ Message: a delivery; ► Delivered(highest seq) once per read
//! ```
//!
//! A group holds at most the node's `max_group_members` (512 by default),
//! so a fan-out to more subscribers uses several groups, each of the
//! publisher and up to `group_max - 1` subscribers, and the publisher sends
//! every message once per group.

use bytes::Bytes;

use courier_protocol::frame::{ClientFrame, EntryKind, ServerFrame};

use super::session::{payload_index, Note, Out, Session, SessionError};

/// One Courier session. Created per connection, dropped with it.
#[derive(Debug)]
pub struct Courier {
    /// The publisher's groups: the members of each (user names, without
    /// the publisher), and the conversation id once created.
    groups: Vec<(Vec<String>, Option<String>)>,
    ready: bool,
    next_id: u64,
    /// The highest sequence received per conversation since the last
    /// `Delivered`.
    unacked: Vec<(String, u64)>,
}

impl Courier {
    /// A member's session.
    pub fn member() -> Self {
        Self::publisher(Vec::new())
    }

    /// The publisher's session: it creates one group per entry of
    /// `groups` (the other members' user names).
    pub fn publisher(groups: Vec<Vec<String>>) -> Self {
        Self {
            groups: groups.into_iter().map(|m| (m, None)).collect(),
            ready: false,
            next_id: 0,
            unacked: Vec::new(),
        }
    }

    fn push(out: &mut Out, frame: &ClientFrame) {
        let mut v = Vec::new();
        frame.encode(&mut v);
        out.push(v);
    }
}

impl Session for Courier {
    fn start(&mut self, _out: &mut Out) {
        // The gateway speaks first (Welcome).
    }

    fn handle(
        &mut self,
        input: &[u8],
        out: &mut Out,
        notes: &mut Vec<Note>,
    ) -> Result<(), SessionError> {
        let frame = ServerFrame::decode(&Bytes::copy_from_slice(input))
            .map_err(|_| SessionError::Malformed("frame"))?;
        match frame {
            ServerFrame::Welcome { .. } => Self::push(
                out,
                &ClientFrame::Sync {
                    tail: 0,
                    summary: false,
                    cursors: Vec::new(),
                },
            ),
            // A fresh user has nothing to catch up on; a page with more
            // is still taken as the end (nothing here is counted from it).
            ServerFrame::SyncDone { .. } if !self.ready => {
                self.ready = true;
                notes.push(Note::Ready);
            }
            ServerFrame::GroupCreated {
                request,
                conversation,
                ..
            } => {
                let slot = self.groups.get_mut(request as usize);
                let Some(slot) = slot.filter(|s| s.1.is_none()) else {
                    return Err(SessionError::Malformed("group_created"));
                };
                slot.1 = Some(conversation);
                if self.groups.iter().all(|g| g.1.is_some()) {
                    notes.push(Note::Subscribed);
                }
            }
            ServerFrame::Message {
                conversation,
                seq,
                kind,
                body,
                ..
            } => {
                match kind {
                    EntryKind::MembersAdded if self.groups.is_empty() => {
                        notes.push(Note::Subscribed);
                    }
                    EntryKind::Message => {
                        if let Some(i) = payload_index(&body) {
                            notes.push(Note::Delivery(i));
                        }
                    }
                    _ => {}
                }
                match self.unacked.iter_mut().find(|u| u.0 == conversation) {
                    Some(u) => u.1 = u.1.max(seq),
                    None => self.unacked.push((conversation, seq)),
                }
            }
            ServerFrame::Sent { .. } => notes.push(Note::Acked(1)),
            ServerFrame::Error { code, .. } => notes.push(Note::Error(format!("error.{code}"))),
            _ => {}
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Out) {
        for (conversation, seq) in self.unacked.drain(..) {
            let mut v = Vec::new();
            ClientFrame::Delivered { conversation, seq }.encode(&mut v);
            out.push(v);
        }
    }

    fn keepalive(&mut self, out: &mut Out) {
        self.next_id += 1;
        Self::push(
            out,
            &ClientFrame::Ping {
                nonce: self.next_id,
            },
        );
    }

    fn subscribe(&mut self, out: &mut Out) {
        // Members are subscribed by the publisher's group creation.
        for (g, (members, _)) in self.groups.iter().enumerate() {
            Self::push(
                out,
                &ClientFrame::GroupCreate {
                    request: g as u32,
                    members: members.clone(),
                },
            );
        }
    }

    fn publish(&mut self, index: u64, body: &[u8], out: &mut Out) -> u64 {
        let groups = self.groups.len() as u64;
        let mut sends = 0;
        for (g, (_, conv)) in self.groups.iter().enumerate() {
            let Some(conversation) = conv.clone() else {
                continue;
            };
            Self::push(
                out,
                &ClientFrame::Send {
                    conversation,
                    client_id: index * groups + g as u64 + 1,
                    body: Bytes::copy_from_slice(body),
                },
            );
            sends += 1;
        }
        sends
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::peer::session::payload;

    fn encode(f: &ServerFrame) -> Vec<u8> {
        let mut v = Vec::new();
        f.encode(&mut v);
        v
    }

    fn feed(c: &mut Courier, f: &ServerFrame) -> (Vec<ClientFrame>, Vec<Note>) {
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        c.handle(&encode(f), &mut out, &mut notes).unwrap();
        let frames = out
            .into_iter()
            .map(|m| ClientFrame::decode(&Bytes::from(m)).unwrap())
            .collect();
        (frames, notes)
    }

    fn entry(kind: EntryKind, seq: u64, body: Vec<u8>) -> ServerFrame {
        ServerFrame::Message {
            conversation: "g:1".into(),
            seq,
            server_id: seq,
            timestamp_ms: 0,
            kind,
            sender: "pub".into(),
            sender_device: 1,
            client_id: seq,
            body: Bytes::from(body),
        }
    }

    #[test]
    fn a_member_catches_up_joins_and_acknowledges_per_read() {
        let mut c = Courier::member();
        let welcome = ServerFrame::Welcome {
            user: "u".into(),
            device: 1,
            server_time_ms: 0,
            max_body: 4096,
            idle_timeout_s: 60,
        };
        let (frames, _) = feed(&mut c, &welcome);
        assert!(matches!(frames[..], [ClientFrame::Sync { .. }]));
        assert_eq!(
            feed(&mut c, &ServerFrame::SyncDone { more: false }).1,
            vec![Note::Ready]
        );
        let added = entry(EntryKind::MembersAdded, 1, Vec::new());
        assert_eq!(feed(&mut c, &added).1, vec![Note::Subscribed]);
        assert_eq!(
            feed(&mut c, &entry(EntryKind::Message, 2, payload(0, 200))).1,
            vec![Note::Delivery(0)]
        );
        assert_eq!(
            feed(&mut c, &entry(EntryKind::Message, 3, payload(1, 200))).1,
            vec![Note::Delivery(1)]
        );
        let mut out = Vec::new();
        c.flush(&mut out);
        let frames: Vec<ClientFrame> = out
            .into_iter()
            .map(|m| ClientFrame::decode(&Bytes::from(m)).unwrap())
            .collect();
        assert_eq!(
            frames,
            vec![ClientFrame::Delivered {
                conversation: "g:1".into(),
                seq: 3
            }]
        );
    }

    #[test]
    fn the_publisher_creates_its_groups_and_sends_to_each() {
        let mut c = Courier::publisher(vec![vec!["a".into()], vec!["b".into(), "c".into()]]);
        let mut out = Vec::new();
        c.subscribe(&mut out);
        assert_eq!(out.len(), 2);
        let created = |request, conversation: &str| ServerFrame::GroupCreated {
            request,
            conversation: conversation.into(),
            seq: 1,
        };
        assert!(feed(&mut c, &created(1, "g:b")).1.is_empty());
        assert_eq!(feed(&mut c, &created(0, "g:a")).1, vec![Note::Subscribed]);
        let mut out = Vec::new();
        assert_eq!(c.publish(4, b"pm000000000004.", &mut out), 2);
        let ids: Vec<u64> = out
            .into_iter()
            .map(|m| match ClientFrame::decode(&Bytes::from(m)).unwrap() {
                ClientFrame::Send { client_id, .. } => client_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![9, 10]);
        let sent = ServerFrame::Sent {
            client_id: 9,
            conversation: "g:a".into(),
            seq: 2,
            server_id: 1,
            timestamp_ms: 0,
        };
        assert_eq!(feed(&mut c, &sent).1, vec![Note::Acked(1)]);
    }
}
