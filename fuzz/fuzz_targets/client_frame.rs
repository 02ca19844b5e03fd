//! The client-protocol decoder on arbitrary payloads: it never panics, and
//! whatever it accepts has exactly one encoding, the input itself.

#![no_main]

use bytes::Bytes;
use courier_protocol::frame::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    let Ok(frame) = ClientFrame::decode(&payload) else {
        return;
    };
    let mut again = Vec::new();
    frame.encode(&mut again);
    assert_eq!(again, data, "{frame:?} encodes differently");
    let _ = frame.name();
});
