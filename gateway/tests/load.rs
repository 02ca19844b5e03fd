//! The load generator against a real node, scaled down to fit the suite:
//! many connections, 1:1 and group traffic, and the guarantees checked by
//! loadgen's own checker (nothing lost, duplicated or reordered). The
//! second test kills the real `gateway` binary with SIGKILL mid-run and
//! starts it again on the same data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestNode;
use courier_loadgen::handshake::Target;
use courier_loadgen::{run, Config};

fn scenario(url: &str, secret: courier_protocol::token::Secret, seconds: u64) -> Config {
    Config {
        target: Target::parse(url).unwrap(),
        secret: Some(secret),
        connections: 300,
        rate: 400.0,
        duration: Duration::from_secs(seconds),
        groups: Some(12),
        group_max: 40,
        group_mean: 8.0,
        progress: false,
        legacy: std::env::var("COURIER_DRIVER").is_ok_and(|d| d == "legacy"),
        ..Config::default()
    }
}

#[test]
fn loadgen_run_loses_nothing() {
    let node = TestNode::start(&[]);
    let url = format!("ws://{}/", node.addr);
    let report = run(scenario(&url, node.secret(), 4)).expect("the run completes");
    assert!(report.passed, "{:?}", report.failures);
    assert!(report.acked > 1000, "acked {}", report.acked);
    assert_eq!(
        (report.lost, report.duplicates, report.reordered),
        (0, 0, 0)
    );
    assert!(report.delivered >= report.acked);
}

/// A gateway process on `port`, data in `dir`. Its store seals a memtable
/// (and starts a journal) about every 512 KiB, so the run leaves the restarted
/// node dozens of journals and several sealed memtables per part to
/// recover, as hours of traffic would.
fn spawn_gateway(dir: &std::path::Path, port: u16, metrics: u16) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ])
        .args(["--cores", "1", "--data-dir", dir.to_str().unwrap()])
        .args(["--store-memtable-mib", "1", "--store-write-buffer-mib", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gateway starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gateway did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn sigkill_mid_run_loses_no_acked_message() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (free_port(), free_port());
    let mut gateway = spawn_gateway(dir.path(), port, metrics);
    let secret = courier_gateway::secret::load_or_create(dir.path()).unwrap();
    let mut config = scenario(&format!("ws://127.0.0.1:{port}/"), secret, 10);
    config.rate = 1_500.0;
    config.drain = Duration::from_secs(10);
    let load = std::thread::spawn(move || run(config));

    std::thread::sleep(Duration::from_secs(3));
    gateway.kill().expect("SIGKILL");
    gateway.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut gateway = spawn_gateway(dir.path(), port, metrics);

    let report = load.join().unwrap().expect("the run completes");
    gateway.kill().ok();
    gateway.wait().ok();
    assert!(report.reconnects > 0, "the clients reconnected");
    // Each device cut off was timed from its drop to its catch-up on the
    // restarted node: at least the half second the node was down.
    let back = &report.latency_ms.reconnect;
    assert!(
        back.count > 0 && back.count <= report.disconnects,
        "{back:?}, {} disconnects",
        report.disconnects
    );
    assert!(back.p50 >= 500.0 && back.max < 8_000.0, "{back:?}");
    assert!(report.passed, "{:?}", report.failures);
    assert_eq!(report.lost, 0, "nothing SENT-acked is lost");
    assert_eq!(report.reordered, 0);
    // The restarted node kept committing: every send was acked in the end
    // (a node whose store halted its writes after recovery left a third of
    // them unacked, and lost none).
    assert_eq!(
        (report.acked, report.unacked),
        (report.sent, 0),
        "every send acked"
    );
}
