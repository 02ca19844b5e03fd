//! The browser client's files on the WebSocket listener: plain GETs under
//! `/app/` get the embedded files with their type and policy, everything
//! else keeps its refusal, the flag turns the page off, and serving a page
//! opens no session and leaves upgrades as they were.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::{TestNode, TIMEOUT};
use courier_gateway::web;

/// A plain GET; returns the status, the head (lowercased) and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    // What a browser sends, keep-alive included: the gateway still closes.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(out[..end].to_vec())
        .unwrap()
        .to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    (status, head, out[end + 4..].to_vec())
}

#[test]
fn the_page_and_its_modules_are_served_with_type_and_policy() {
    let node = TestNode::start(&[]);
    let (status, head, body) = get(node.addr, "/app/");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(head.contains("content-security-policy: default-src 'none'"));
    assert!(head.contains("connection: close"));
    assert_eq!(body, web::ASSETS[0].body);
    // A query (a demo link, say) does not change the answer.
    assert_eq!(get(node.addr, "/app/?from=readme").2, body);

    for (path, kind) in [
        ("/app/app.mjs", "text/javascript"),
        ("/app/codec.mjs", "text/javascript"),
        ("/app/style.css", "text/css"),
        ("/app/icon.svg", "image/svg+xml"),
    ] {
        let (status, head, body) = get(node.addr, path);
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains(&format!("content-type: {kind}")),
            "{path}: {head}"
        );
        assert!(head.contains("x-content-type-options: nosniff"), "{path}");
        assert!(!body.is_empty());
    }
    let (status, head, _) = get(node.addr, "/app");
    assert_eq!(status, 308);
    assert!(head.contains("location: /app/"), "{head}");

    // Serving files opens no session.
    let text = node.metrics();
    assert!(text.contains("courier_web_files_total 7"), "{text}");
    assert!(
        !text.contains("courier_gateway_connections{core=\"0\"} 1"),
        "{text}"
    );
}

#[test]
fn other_paths_keep_their_refusals_and_upgrades_still_work() {
    let node = TestNode::start(&[]);
    assert_eq!(get(node.addr, "/").0, 426);
    assert_eq!(get(node.addr, "/ws").0, 426);
    assert_eq!(get(node.addr, "/favicon.ico").0, 404);
    assert_eq!(get(node.addr, "/app/missing.js").0, 404);
    assert_eq!(get(node.addr, "/app/%2e%2e/Cargo.toml").0, 404);
    // A session right after a page works as before.
    let (mut alice, _) = node.online("alice", 1);
    let seq = alice.send_acked("d:alice:bob", 1, b"after the page");
    assert_eq!(seq, 1);
}

#[test]
fn the_flag_turns_the_page_off() {
    let node = TestNode::start(&["--web-client", "false"]);
    for path in ["/app/", "/app", "/app/app.mjs"] {
        assert_eq!(get(node.addr, path).0, 404, "{path}");
    }
    assert!(node.metrics().contains("courier_web_files_total 0"));
    // The listener still upgrades.
    let (mut alice, _) = node.online("alice", 1);
    assert_eq!(alice.send_acked("d:alice:bob", 1, b"still here"), 1);
}
