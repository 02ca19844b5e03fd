//! RFC 6455 conformance over raw sockets: every way a client can break the
//! framing rules, the close code the gateway answers with and how soon,
//! reserved close codes, close reasons, control frames that must not wait
//! behind a full outbound queue, and the Origin allow-list. The suite runs
//! under both monoio drivers (`COURIER_DRIVER`).
//!
//! Timing: a violation must be answered at once, without the gateway waiting
//! for more bytes. The tests assert a bound loose enough for a loaded
//! machine (2 s) and print what they measured (`close after … µs`), which on
//! an idle machine is well under a millisecond; docs/benchmarks.md records it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{raw_upgrade, upgrade_request, Client, TestNode, TIMEOUT};
use courier_protocol::close;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use courier_protocol::ids::direct_conversation;
use courier_protocol::ws::{self, Event, Opcode, MAX_CLOSE_REASON};

/// A bound on "at once" that a loaded 2-core machine still meets.
const PROMPT: Duration = Duration::from_secs(2);
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked frame with `first` as its first byte (FIN, RSV bits, opcode)
/// and a length field that says `len` (which may be more than `payload`).
fn frame_claiming(first: u8, len: usize, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    match len {
        0..=125 => out.push(0x80 | len as u8),
        126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    let start = out.len();
    out.extend_from_slice(payload);
    ws::apply_mask(&mut out[start..], MASK);
    out
}

fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame_claiming(first, payload.len(), payload)
}

fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason);
    body
}

/// Sends `bytes` on a fresh live session and returns the close the gateway
/// answers with, checking what every close of ours must satisfy.
fn close_for(node: &TestNode, device: u32, bytes: &[u8]) -> (u16, String, Duration) {
    // One user per case: a user may link only a few devices.
    let (mut c, _) = node.online(&format!("case{device}"), 1);
    let start = Instant::now();
    c.send_raw(bytes);
    let (code, reason) = c.expect_close();
    let elapsed = start.elapsed();
    assert!(
        close::is_sendable(code),
        "the gateway sent reserved code {code}"
    );
    assert!(reason.len() <= MAX_CLOSE_REASON, "reason {reason:?}");
    (code, reason, elapsed)
}

#[test]
fn every_framing_violation_closes_at_once_with_its_rfc_code() {
    // Frames and messages up to 2,048 bytes.
    let node = TestNode::start(&["--max-body", "1024"]);
    let fragment = |first: u8, payload: &[u8], then: Vec<u8>| {
        let mut v = frame(first, payload);
        v.extend(then);
        v
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked frame",
            vec![0x82, 0x01, 0x09],
            close::PROTOCOL_ERROR,
        ),
        ("RSV1", frame(0xc2, b"x"), close::PROTOCOL_ERROR),
        ("RSV2", frame(0xa2, b"x"), close::PROTOCOL_ERROR),
        ("RSV3", frame(0x92, b"x"), close::PROTOCOL_ERROR),
        ("opcode 3", frame(0x83, b"x"), close::PROTOCOL_ERROR),
        ("opcode 7", frame(0x87, b"x"), close::PROTOCOL_ERROR),
        ("opcode 0xB", frame(0x8b, b"x"), close::PROTOCOL_ERROR),
        ("opcode 0xF", frame(0x8f, b"x"), close::PROTOCOL_ERROR),
        ("fragmented ping", frame(0x09, b"x"), close::PROTOCOL_ERROR),
        (
            "fragmented close",
            frame(0x08, &close_body(1000, b"")),
            close::PROTOCOL_ERROR,
        ),
        // Over 125 bytes, and only the header sent: no need to wait for it.
        (
            "126-byte ping",
            frame_claiming(0x89, 126, b""),
            close::PROTOCOL_ERROR,
        ),
        (
            "126-byte close",
            frame(0x88, &close_body(1000, &[b'r'; 124])),
            close::PROTOCOL_ERROR,
        ),
        (
            "continuation without a message",
            frame(0x80, b"x"),
            close::PROTOCOL_ERROR,
        ),
        (
            "new message inside a fragmented one",
            fragment(0x02, b"ab", frame(0x82, b"cd")),
            close::PROTOCOL_ERROR,
        ),
        (
            "one-byte close body",
            frame(0x88, &[3]),
            close::PROTOCOL_ERROR,
        ),
        (
            "invalid UTF-8 in a text frame",
            frame(0x81, &[0xc3, 0x28]),
            close::INVALID_PAYLOAD,
        ),
        (
            "invalid UTF-8 across text fragments",
            fragment(0x01, &[b'a', 0xe2, 0x82], frame(0x80, b"b")),
            close::INVALID_PAYLOAD,
        ),
        (
            "invalid UTF-8 in a close reason",
            frame(0x88, &close_body(1000, &[0xff])),
            close::INVALID_PAYLOAD,
        ),
        (
            "frame over the limit, header only",
            frame_claiming(0x82, 2049, b""),
            close::MESSAGE_TOO_BIG,
        ),
        (
            "64-bit length over the limit, header only",
            frame_claiming(0x82, 1 << 40, b""),
            close::MESSAGE_TOO_BIG,
        ),
        (
            "message over the limit in fragments, last header only",
            fragment(0x02, &[0; 1500], frame_claiming(0x80, 600, b"")),
            close::MESSAGE_TOO_BIG,
        ),
        (
            "a valid text message",
            frame(0x81, b"hello"),
            close::UNSUPPORTED_DATA,
        ),
    ];
    let mut slowest = Duration::ZERO;
    for (device, (what, bytes, want)) in (1u32..).zip(cases) {
        let (code, reason, elapsed) = close_for(&node, device, &bytes);
        eprintln!(
            "{what}: close {code} {reason:?} after {} µs",
            elapsed.as_micros()
        );
        assert_eq!(code, want, "{what}: reason {reason:?}");
        assert!(!reason.is_empty(), "{what}: a failing close says why");
        if what.starts_with("opcode") {
            assert_eq!(reason, "reserved opcode");
        }
        assert!(elapsed < PROMPT, "{what}: close after {elapsed:?}");
        slowest = slowest.max(elapsed);
    }
    eprintln!("slowest close: {} µs", slowest.as_micros());
}

#[test]
fn reserved_or_unassigned_close_codes_from_the_client_are_protocol_errors() {
    let node = TestNode::start(&[]);
    for (device, code) in (1u32..).zip([1005u16, 1006, 1015, 0, 999, 1004, 1016, 2999, 5000]) {
        let (got, reason, elapsed) = close_for(&node, device, &frame(0x88, &close_body(code, b"")));
        eprintln!(
            "client close {code}: close {got} {reason:?} after {} µs",
            elapsed.as_micros()
        );
        assert_eq!(got, close::PROTOCOL_ERROR, "client sent {code}");
        assert!(elapsed < PROMPT);
    }
    // Codes a client may send are echoed, and a close without a body is
    // answered with 1000, never 1005.
    for (device, code) in (20u32..).zip([1000u16, 1001, 1003, 1011, 3000, 4999]) {
        let (got, reason, _) = close_for(&node, device, &frame(0x88, &close_body(code, b"bye")));
        assert_eq!((got, reason.as_str()), (code, ""), "client sent {code}");
    }
    assert_eq!(close_for(&node, 40, &frame(0x88, b"")).0, close::NORMAL);
}

#[test]
fn a_close_reason_of_123_bytes_is_accepted_and_answered() {
    let node = TestNode::start(&[]);
    let reason = "r".repeat(MAX_CLOSE_REASON);
    let (code, echoed, _) = close_for(&node, 1, &frame(0x88, &close_body(4000, reason.as_bytes())));
    assert_eq!((code, echoed.as_str()), (4000, ""));
}

#[test]
fn after_a_violation_the_gateway_ignores_data_and_ends_the_connection() {
    let node = TestNode::start(&[]);
    let (mut c, _) = node.online("alice", 1);
    c.send_raw(&frame(0xc2, b"x"));
    c.send(&ClientFrame::Ping { nonce: 5 });
    assert_eq!(c.expect_close().0, close::PROTOCOL_ERROR);
    // Our answer to its close; then the gateway ends the TCP connection and
    // nothing (no Pong for the ping sent after the violation) comes first.
    let mut answer = Vec::new();
    ws::encode_close(&mut answer, close::PROTOCOL_ERROR, "", Some(MASK));
    c.send_raw(&answer);
    assert_eq!(c.event(TIMEOUT), None, "end of stream, nothing more");
}

#[test]
fn a_fragmented_message_with_pings_between_its_fragments_is_reassembled() {
    let node = TestNode::start(&[]);
    let (mut c, _) = node.online("alice", 1);
    let mut payload = Vec::new();
    ClientFrame::Send {
        conversation: direct_conversation("alice", "bob"),
        client_id: 9,
        body: bytes::Bytes::from(vec![b'f'; 3000]),
    }
    .encode(&mut payload);
    let mut wire = frame(0x02, &payload[..10]);
    wire.extend(frame(0x89, b"between"));
    wire.extend(frame(0x00, &payload[10..2000]));
    wire.extend(frame(0x8a, b"unsolicited pong"));
    wire.extend(frame(0x80, &payload[2000..]));
    c.send_raw(&wire);
    match c.event(TIMEOUT) {
        Some(Event::Pong(data)) => assert_eq!(&data[..], b"between"),
        other => panic!("expected the pong first, got {other:?}"),
    }
    assert!(matches!(
        c.next(),
        ServerFrame::Sent {
            client_id: 9,
            seq: 1,
            ..
        }
    ));
}

// ----- control frames and a full outbound queue ------------------------------

/// A session whose socket takes little: a 4 KiB receive buffer, set before
/// the connection so the window stays small.
fn tight_client(node: &TestNode, user: &str) -> Client {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&node.addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let token = node.token(user, 1);
    stream
        .write_all(upgrade_request(Some(&token), "").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "upgrade answer");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));
    let mut c = Client::over(stream, Vec::new());
    assert!(matches!(c.next(), ServerFrame::Welcome { .. }));
    c.sync(vec![]);
    c
}

/// Bytes the kernel can hold between the gateway and a client that does not
/// read: the gateway's send buffer at its largest, plus slack for the small
/// receive window and one coalesced write of the gateway's.
fn kernel_can_hold() -> usize {
    let wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap_or_default();
    let max: usize = wmem
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or(4 << 20);
    max + (256 << 10)
}

/// Alice sends bob (who reads nothing) three times what the kernel can
/// hold, so most of it waits in bob's outbound queue at the gateway.
/// Returns bob and the number of messages and bytes sent.
fn pile_up(node: &TestNode) -> (Client, usize, usize) {
    let (mut alice, _) = node.online("alice", 1);
    let bob = tight_client(node, "bob");
    let conv = direct_conversation("alice", "bob");
    let body = vec![b'x'; 60_000];
    let count = (3 * kernel_can_hold()).div_ceil(body.len());
    for id in 1..=count as u64 {
        alice.send_text(&conv, id, &body);
    }
    for _ in 0..count {
        assert!(matches!(alice.next(), ServerFrame::Sent { .. }));
    }
    (bob, count, count * body.len())
}

/// Reads bob's stream until `stop(event)`; returns the messages read before.
fn messages_before(bob: &mut Client, mut stop: impl FnMut(&Event) -> bool) -> usize {
    let mut messages = 0;
    loop {
        let event = bob
            .event(TIMEOUT)
            .expect("the stream goes on until the awaited frame");
        if stop(&event) {
            return messages;
        }
        match event {
            Event::Binary(_) => messages += 1,
            Event::Ping(_) | Event::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn pile_node() -> TestNode {
    // A queue big enough to hold the pile without a slow-consumer close.
    TestNode::start(&[
        "--max-outbound-bytes",
        "268435456",
        "--send-rate",
        "100000",
        "--send-burst",
        "100000",
    ])
}

#[test]
fn a_pong_overtakes_a_full_outbound_queue_and_pings_coalesce() {
    let node = pile_node();
    let (mut bob, count, bytes) = pile_up(&node);
    // A burst of pings while bob still reads nothing: one pong, for the
    // latest, is what RFC 6455 section 5.5.3 asks at the least, and all the
    // queue need hold.
    for i in 0..2000u32 {
        bob.send_ws(
            Opcode::Ping,
            format!("ping {i:04} {}", "p".repeat(100)).as_bytes(),
        );
    }
    bob.send_ws(Opcode::Ping, b"the last ping");
    // Let the gateway read them before bob drains anything.
    std::thread::sleep(Duration::from_millis(300));
    let mut pongs = Vec::new();
    let before = messages_before(&mut bob, |e| {
        if let Event::Pong(data) = e {
            pongs.push(data.clone());
        }
        matches!(e, Event::Pong(data) if &data[..] == b"the last ping")
    });
    eprintln!(
        "{count} messages ({bytes} B) queued; last pong after {before}, {} pongs for 2001 pings",
        pongs.len()
    );
    assert!(
        before * 60_000 <= kernel_can_hold(),
        "the pong waited behind {before} queued messages"
    );
    assert!(
        pongs.len() < 100,
        "{} pongs: queued pongs coalesce",
        pongs.len()
    );
    // Nothing was dropped: the rest of the pile still arrives.
    let mut rest = 0;
    while before + rest < count {
        match bob.event(TIMEOUT).expect("the rest of the pile") {
            Event::Binary(_) => rest += 1,
            Event::Ping(_) | Event::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_close_answer_overtakes_a_full_outbound_queue() {
    let node = pile_node();
    let (mut bob, count, _) = pile_up(&node);
    bob.send_ws(Opcode::Close, &close_body(1000, b"done"));
    let start = Instant::now();
    let before = messages_before(&mut bob, |e| matches!(e, Event::Close(_)));
    eprintln!(
        "close answered after {before} of {count} queued messages, {:?}",
        start.elapsed()
    );
    assert!(
        before * 60_000 <= kernel_can_hold(),
        "{before} messages came first"
    );
}

#[test]
fn a_failing_close_overtakes_a_full_outbound_queue() {
    let node = pile_node();
    let (mut bob, count, _) = pile_up(&node);
    bob.send_raw(&[0x82, 0x01, 0x00]); // unmasked
    let mut code = 0;
    let before = messages_before(&mut bob, |e| match e {
        Event::Close(Some((c, _))) => {
            code = *c;
            true
        }
        _ => false,
    });
    eprintln!("close {code} after {before} of {count} queued messages");
    assert_eq!(code, close::PROTOCOL_ERROR);
    assert!(
        before * 60_000 <= kernel_can_hold(),
        "{before} messages came first"
    );
}

// ----- Origin ------------------------------------------------------------------

#[test]
fn origin_allow_list_refuses_other_origins_with_403() {
    let node = TestNode::start(&[
        "--allowed-origins",
        "https://chat.example,https://web.chat.example",
    ]);
    let token = node.token("alice", 1);
    let with_origin =
        |origin: &str| upgrade_request(Some(&token), &format!("Origin: {origin}\r\n"));

    let (status, _, _) = raw_upgrade(node.addr, &with_origin("https://web.chat.example"));
    assert_eq!(status, 101, "a listed origin");
    let (status, _, _) = raw_upgrade(node.addr, &with_origin("HTTPS://CHAT.EXAMPLE"));
    assert_eq!(status, 101, "origins ignore ASCII case");
    let (status, _, _) = raw_upgrade(node.addr, &upgrade_request(Some(&token), ""));
    assert_eq!(status, 101, "no Origin header: a native client");

    let (status, mut stream, mut body) =
        raw_upgrade(node.addr, &with_origin("https://evil.example"));
    assert_eq!(status, 403, "an origin not listed");
    stream.read_to_end(&mut body).unwrap();
    assert_eq!(String::from_utf8_lossy(&body), "origin not allowed");
    let (status, _, _) = raw_upgrade(node.addr, &with_origin("null"));
    assert_eq!(status, 403, "an opaque origin");
    assert!(node.metrics().contains("reason=\"origin_not_allowed\""));
}

#[test]
fn without_an_allow_list_every_origin_is_served() {
    let node = TestNode::start(&[]);
    let token = node.token("alice", 1);
    let req = upgrade_request(Some(&token), "Origin: https://anywhere.example\r\n");
    assert_eq!(raw_upgrade(node.addr, &req).0, 101);
}
