//! Replays the fuzz targets' committed inputs through the checks the
//! targets make: the seed corpora (fuzz/corpus/<target>/) and every crash
//! input a fuzz run found (fuzz/regressions/<target>/), so a bug the fuzzer
//! found stays fixed without a nightly toolchain. The fuzz targets are in
//! fuzz/fuzz_targets/; benches/scripts/fuzz.sh runs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bytes::Bytes;
use courier_protocol::close;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_protocol::ws::{Decoder, Event, Limits, Role, WsError};

/// Every committed input of `target`, with its file name.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let name = format!(
                "{dir}/{target}/{}",
                path.file_name().unwrap().to_string_lossy()
            );
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

// ----- ws_decoder ------------------------------------------------------------

/// The limits the ws_decoder target runs with.
const LIMITS: Limits = Limits {
    max_frame: 300,
    max_message: 700,
};

type Outcome = (Vec<Event>, Option<WsError>);

fn decode_whole(role: Role, mut input: &[u8]) -> Outcome {
    let mut d = Decoder::new(role, LIMITS);
    let mut events = Vec::new();
    loop {
        match d.decode(input) {
            Ok(None) => return (events, None),
            Ok(Some((event, used))) => {
                assert!(used > 0 && used <= input.len());
                if let Some(Event::Close(Some((code, reason)))) = &event {
                    assert!(close::is_sendable(*code) && reason.len() <= 123);
                }
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

#[test]
fn ws_decoder_inputs_decode_the_same_whatever_the_read_split() {
    let all = inputs("ws_decoder");
    assert!(!all.is_empty(), "the seed corpus is missing");
    for (name, data) in all {
        let Some((&ctl, input)) = data.split_first() else {
            continue;
        };
        let role = if ctl & 0x80 == 0 {
            Role::Server
        } else {
            Role::Client
        };
        let whole = decode_whole(role, input);
        // The target's own split, and a byte at a time.
        for chunk in [usize::from(ctl & 0x7f) + 1, 1] {
            assert_eq!(
                decode_in_pieces(role, input, chunk),
                whole,
                "{name}, reads of {chunk}"
            );
        }
    }
}

// ----- client_frame and server_roundtrip -------------------------------------

#[test]
fn client_frame_inputs_decode_to_their_only_encoding() {
    let all = inputs("client_frame");
    assert!(!all.is_empty(), "the seed corpus is missing");
    for (name, data) in all {
        if let Ok(frame) = ClientFrame::decode(&Bytes::from(data.clone())) {
            let mut again = Vec::new();
            frame.encode(&mut again);
            assert_eq!(again, data, "{name}: {frame:?}");
        }
    }
}

#[test]
fn server_frame_inputs_round_trip() {
    let all = inputs("server_roundtrip");
    assert!(!all.is_empty(), "the seed corpus is missing");
    for (name, data) in all {
        if let Ok(frame) = ServerFrame::decode(&Bytes::from(data.clone())) {
            let mut wire = Vec::new();
            frame.encode(&mut wire);
            assert_eq!(wire, data, "{name}: {frame:?}");
            assert_eq!(ServerFrame::decode(&Bytes::from(wire)), Ok(frame), "{name}");
        }
    }
}
