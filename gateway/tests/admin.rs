//! The admin endpoints on the metrics port, over real sockets: connection
//! counts, a user's devices, an operator disconnect (close 4007), and the
//! bearer token rule when an admin token file is configured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use clap::Parser;
use common::{now_s, TestNode, TIMEOUT};
use courier_gateway::config::Cli;
use courier_gateway::node::Node;
use courier_protocol::close;
use courier_protocol::frame::{ClientFrame, ServerFrame};
use serde_json::Value;

/// One HTTP/1.1 request; returns the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn connections_are_counted_per_core_and_per_process() {
    let node = TestNode::start(&[]);
    let clients: Vec<_> = (0..5).map(|i| node.online(&format!("u{i}"), 1).0).collect();
    let (status, body) = http(node.metrics_addr, "GET", "/admin/connections", None);
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["process"], 5, "{v}");
    let cores = v["cores"].as_array().unwrap();
    assert_eq!(cores.len(), 2, "one entry per core: {v}");
    let sum: u64 = cores
        .iter()
        .map(|c| c["connections"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, 5, "{v}");
    assert_eq!(cores[1]["core"], 1);
    drop(clients);
}

#[test]
fn devices_lists_a_users_sessions_on_this_node() {
    let node = TestNode::start(&[]);
    let before = now_s();
    let (_a1, _) = node.online("alice", 1);
    let (_a2, _) = node.online("alice", 2);
    let (_b, _) = node.online("bob", 1);
    let (status, body) = http(node.metrics_addr, "GET", "/admin/devices?user=alice", None);
    assert_eq!(status, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["user"], "alice");
    let devices = v["devices"].as_array().unwrap();
    let numbers: Vec<u64> = devices
        .iter()
        .map(|d| d["device"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2], "{v}");
    for d in devices {
        assert!(d["core"].as_u64().unwrap() < 2, "{v}");
        let since = d["connected_since_s"].as_u64().unwrap();
        assert!(
            since + 2 >= before && since <= now_s() + 1,
            "connected since {since}, test began {before}"
        );
    }

    let (status, body) = http(node.metrics_addr, "GET", "/admin/devices?user=carol", None);
    assert_eq!(status, 200);
    assert_eq!(json(&body)["devices"].as_array().unwrap().len(), 0);
    for bad in [
        "/admin/devices",
        "/admin/devices?user=",
        "/admin/devices?user=a%20b",
    ] {
        let (status, body) = http(node.metrics_addr, "GET", bad, None);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(json(&body)["error"].is_string());
    }
    let (status, _) = http(node.metrics_addr, "GET", "/admin/nothing", None);
    assert_eq!(status, 404);
}

#[test]
fn disconnect_closes_one_device_with_4007() {
    let node = TestNode::start(&[]);
    let (mut a1, _) = node.online("alice", 1);
    let (mut a2, _) = node.online("alice", 2);
    let path = "/admin/disconnect?user=alice&device=2";
    let (status, _) = http(node.metrics_addr, "GET", path, None);
    assert_eq!(status, 405, "disconnect is a POST");
    let (status, body) = http(node.metrics_addr, "POST", path, None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["closed"], 1);
    let (code, reason) = a2.expect_close();
    assert_eq!(code, close::OPERATOR_DISCONNECT);
    assert_eq!(reason, "disconnected by an operator");

    // The other device is untouched.
    a1.send(&ClientFrame::Ping { nonce: 7 });
    assert!(matches!(a1.next(), ServerFrame::Pong { nonce: 7 }));

    // Nothing left to close: 404, and bad parameters: 400.
    let (status, body) = http(node.metrics_addr, "POST", path, None);
    assert_eq!((status, json(&body)["closed"].as_u64()), (404, Some(0)));
    for bad in [
        "/admin/disconnect?user=alice",
        "/admin/disconnect?user=alice&device=0",
        "/admin/disconnect?device=1",
    ] {
        let (status, _) = http(node.metrics_addr, "POST", bad, None);
        assert_eq!(status, 400, "{bad}");
    }
    // The device may come back.
    let (_again, _) = node.online("alice", 2);
}

#[test]
fn an_admin_token_file_makes_the_admin_endpoints_need_the_token() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("admin.token");
    std::fs::write(&token_file, "s3cret-admin-token-0123\n").unwrap();
    let node = TestNode::start(&["--admin-token-file", token_file.to_str().unwrap()]);
    let (_a, _) = node.online("alice", 1);
    let m = node.metrics_addr;
    for auth in [
        None,
        Some("Bearer wrong-token-wrong-token"),
        Some("Bearer s3cret-admin-token-012"),
        Some("Basic s3cret-admin-token-0123"),
    ] {
        let (status, body) = http(m, "GET", "/admin/connections", auth);
        assert_eq!(status, 401, "{auth:?}: {body}");
        let (status, _) = http(m, "POST", "/admin/disconnect?user=alice&device=1", auth);
        assert_eq!(status, 401, "{auth:?}");
    }
    let good = Some("Bearer s3cret-admin-token-0123");
    let (status, body) = http(m, "GET", "/admin/connections", good);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["process"], 1);
    let (status, _) = http(m, "GET", "/admin/devices?user=alice", good);
    assert_eq!(status, 200);
    // The operator view stays open.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(http(m, "GET", path, None).0, 200, "{path}");
    }
}

#[test]
fn a_missing_or_weak_admin_token_file_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let weak = tmp.path().join("weak.token");
    std::fs::write(&weak, "short\n").unwrap();
    let missing = tmp.path().join("absent.token");
    for file in [&weak, &missing] {
        let data = tmp.path().join("data");
        let argv = [
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--admin-token-file",
            file.to_str().unwrap(),
        ];
        let args = Cli::try_parse_from(argv).unwrap().serve;
        let err = Node::start(args).expect_err("refused");
        assert!(format!("{err:#}").contains("admin token file"), "{err:#}");
    }
}
