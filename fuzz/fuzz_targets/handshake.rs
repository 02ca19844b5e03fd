//! The HTTP upgrade parser on arbitrary bytes, as the upgrade task calls it:
//! once per read, on everything read so far, under the header-size limit.

#![no_main]

use courier_gateway::handshake::{self, parse, Request};
use courier_gateway::web;
use libfuzzer_sys::fuzz_target;

/// The default `--max-header-bytes`.
const MAX_HEADER_BYTES: usize = 8192;

fuzz_target!(|data: &[u8]| {
    // The request as it arrives, growing a read at a time: every prefix is
    // parsed the way `read_upgrade` parses it, and parsing stops at the
    // first answer.
    let step = (data.len() / 7).max(1);
    let mut end = 0;
    loop {
        end = (end + step).min(data.len());
        match parse(&data[..end], MAX_HEADER_BYTES, true) {
            Ok(None) if end < data.len() => continue,
            Ok(None) => break,
            Ok(Some(Request::Page(page))) => {
                assert!(web::response(page).starts_with(b"HTTP/1.1 "));
                break;
            }
            Ok(Some(Request::Upgrade(up))) => {
                assert!(up.consumed <= end, "consumed past the input");
                assert_eq!(up.accept_key.len(), 28, "accept key is base64 of SHA-1");
                let resp = handshake::accept_response(&up);
                assert!(resp.starts_with(b"HTTP/1.1 101 "));
                break;
            }
            Err(refusal) => {
                assert!((400..600).contains(&refusal.status));
                let resp = handshake::refusal_response(refusal);
                assert!(resp.ends_with(refusal.reason.as_bytes()));
                break;
            }
        }
    }
    // A small limit must refuse, never read past it.
    let _ = parse(data, data.len() / 2, true);
});
