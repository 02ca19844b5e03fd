//! The RFC 6455 frame decoder on arbitrary bytes, fed the way a session
//! task feeds it: in reads of varying size, with the unread tail kept and
//! joined to the next read. Whatever the split, the events and the verdict
//! must be those of decoding the whole input at once.

#![no_main]

use courier_protocol::ws::{Decoder, Event, Limits, Role, WsError};
use libfuzzer_sys::fuzz_target;

/// Small limits, so the size checks are reachable with small inputs.
const LIMITS: Limits = Limits {
    max_frame: 300,
    max_message: 700,
};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let role = if ctl & 0x80 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let chunk = usize::from(ctl & 0x7f) + 1;
    let whole = decode_whole(role, input);
    let pieces = decode_in_pieces(role, input, chunk);
    assert_eq!(whole, pieces, "the read split changed the outcome");
});

/// Events decoded, and the error that stopped decoding, if any.
type Outcome = (Vec<Event>, Option<WsError>);

fn decode_whole(role: Role, mut input: &[u8]) -> Outcome {
    let mut d = Decoder::new(role, LIMITS);
    let mut events = Vec::new();
    loop {
        match d.decode(input) {
            Ok(None) => return (events, None),
            Ok(Some((event, used))) => {
                assert!(
                    used > 0 && used <= input.len(),
                    "used {used} of {}",
                    input.len()
                );
                check(role, event.as_ref());
                events.extend(event);
                input = &input[used..];
            }
            Err(e) => return (events, Some(e)),
        }
    }
}

fn decode_in_pieces(role: Role, input: &[u8], chunk: usize) -> Outcome {
    let mut d = Decoder::new(role, LIMITS);
    let mut events = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    for read in input.chunks(chunk) {
        tail.extend_from_slice(read);
        let mut pos = 0;
        loop {
            match d.decode(&tail[pos..]) {
                Ok(None) => break,
                Ok(Some((event, used))) => {
                    events.extend(event);
                    pos += used;
                }
                Err(e) => return (events, Some(e)),
            }
        }
        tail.drain(..pos);
    }
    (events, None)
}

/// What every decoded event must satisfy.
fn check(role: Role, event: Option<&Event>) {
    match event {
        Some(Event::Binary(p) | Event::Text(p)) => assert!(p.len() <= LIMITS.max_message),
        Some(Event::Ping(p) | Event::Pong(p)) => assert!(p.len() <= 125),
        Some(Event::Close(Some((code, reason)))) => {
            assert!(
                courier_protocol::close::is_sendable(*code),
                "{role:?} got {code}"
            );
            assert!(reason.len() <= 123);
        }
        Some(Event::Close(None)) | None => {}
    }
    if let Some(Event::Text(p)) = event {
        assert!(std::str::from_utf8(p).is_ok());
    }
}
