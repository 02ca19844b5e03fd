//! Server frames, encode after decode: any payload the client-side decoder
//! accepts encodes back to the same bytes, and those decode to the same frame.

#![no_main]

use bytes::Bytes;
use courier_protocol::frame::ServerFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = ServerFrame::decode(&Bytes::copy_from_slice(data)) else {
        return;
    };
    let mut wire = Vec::new();
    frame.encode(&mut wire);
    assert_eq!(wire, data, "{frame:?} encodes differently");
    assert_eq!(ServerFrame::decode(&Bytes::from(wire)), Ok(frame));
});
