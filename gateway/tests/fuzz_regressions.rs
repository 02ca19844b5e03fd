//! Replays the handshake fuzz target's committed inputs (the seed corpus
//! fuzz/corpus/handshake/ and any crash input in fuzz/regressions/handshake/)
//! through the checks the target makes, so a bug the fuzzer found stays
//! fixed without a nightly toolchain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use courier_gateway::handshake::{self, parse, Request};
use courier_gateway::web;

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

#[test]
fn handshake_inputs_parse_to_an_answer_at_every_prefix() {
    let all = inputs("handshake");
    assert!(!all.is_empty(), "the seed corpus is missing");
    let mut accepted = 0;
    for (name, data) in all {
        for end in 0..=data.len() {
            match parse(&data[..end], 8192, true) {
                Ok(None) => {}
                Ok(Some(Request::Upgrade(up))) => {
                    assert!(up.consumed <= end, "{name}");
                    assert!(handshake::accept_response(&up).starts_with(b"HTTP/1.1 101 "));
                    accepted += usize::from(end == data.len());
                }
                Ok(Some(Request::Page(page))) => {
                    assert!(web::response(page).starts_with(b"HTTP/1.1 "), "{name}");
                }
                Err(refusal) => {
                    assert!((400..600).contains(&refusal.status), "{name}");
                    let resp = handshake::refusal_response(refusal);
                    assert!(resp.ends_with(refusal.reason.as_bytes()), "{name}");
                }
            }
        }
        let _ = parse(&data, data.len() / 2, true);
    }
    assert!(accepted >= 2, "the real clients' requests are accepted");
}
