//! A real `gateway` process drained with SIGTERM while loadgen runs against
//! it with reconnects: the closes are spread over the drain window, and
//! after a second node starts on the same data directory and port,
//! loadgen's checker finds nothing lost or reordered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http_get;
use courier_loadgen::handshake::Target;
use courier_loadgen::{run, Config};

const CONNECTIONS: u32 = 300;
const WINDOW_MS: u64 = 2000;

fn spawn_gateway(dir: &std::path::Path, port: u16, metrics: u16) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--drain-window-ms",
            &WINDOW_MS.to_string(),
        ])
        .args(["--cores", "2", "--data-dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("gateway starts");
    // The metrics endpoint binds after the listener: wait for both.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err()
        || TcpStream::connect(("127.0.0.1", metrics)).is_err()
    {
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

/// `courier_session_closes_total{code="1001"}`, or `None` once the
/// endpoint is gone.
fn going_away_closes(metrics: SocketAddr) -> Option<u64> {
    TcpStream::connect(metrics).ok()?;
    let (status, body) = std::panic::catch_unwind(|| http_get(metrics, "/metrics")).ok()?;
    if status != 200 {
        return None;
    }
    Some(
        body.lines()
            .find_map(|l| l.strip_prefix("courier_session_closes_total{code=\"1001\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
    )
}

fn sessions(metrics: SocketAddr) -> u64 {
    let (_, body) = http_get(metrics, "/admin/connections");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["process"].as_u64())
        .unwrap_or(0)
}

#[test]
fn drain_under_load_spreads_the_closes_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let mut a = spawn_gateway(dir.path(), port, metrics_port);
    let secret = courier_gateway::secret::load_or_create(dir.path()).unwrap();
    let config = Config {
        target: Target::parse(&format!("ws://127.0.0.1:{port}/")).unwrap(),
        secret: Some(secret),
        connections: CONNECTIONS,
        rate: 300.0,
        duration: Duration::from_secs(12),
        drain: Duration::from_secs(15),
        groups: Some(10),
        group_max: 30,
        group_mean: 8.0,
        progress: false,
        reconnect: true,
        legacy: std::env::var("COURIER_DRIVER").is_ok_and(|d| d == "legacy"),
        ..Config::default()
    };
    let load = std::thread::spawn(move || run(config));

    // Drain once every connection is up and traffic flows.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sessions(metrics) < u64::from(CONNECTIONS) {
        assert!(Instant::now() < deadline, "loadgen's connections came up");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let before = going_away_closes(metrics).unwrap();
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    unsafe {
        libc::kill(a.id() as i32, libc::SIGTERM);
    }
    let sigterm = Instant::now();
    let mut samples = vec![(Duration::ZERO, 0)];
    while let Some(v) = going_away_closes(metrics) {
        samples.push((sigterm.elapsed(), v - before));
        std::thread::sleep(Duration::from_millis(20));
        if sigterm.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let status = a.wait().unwrap();
    assert!(status.success(), "the drained node exits 0: {status}");
    let mut b = spawn_gateway(dir.path(), port, metrics_port);
    let report = load.join().unwrap().expect("the run completes");
    b.kill().ok();
    b.wait().ok();

    assert!(report.passed, "{:?}", report.failures);
    assert_eq!(report.lost, 0, "nothing SENT-acked is lost");
    assert_eq!(report.reordered, 0);
    assert!(
        report.reconnects >= u64::from(CONNECTIONS) / 2,
        "the clients reconnected"
    );

    let n = u64::from(CONNECTIONS);
    let total = samples.last().map_or(0, |s| s.1);
    assert!(
        total >= n * 9 / 10,
        "{total} of {n} sessions closed with 1001"
    );
    // The peak close rate, over windows of at least 100 ms, stays near
    // n / window (15 per 100 ms here); all at once would be all n in one.
    let bound = n / 4;
    let mut peak = 0.0f64;
    for (i, &(t, v)) in samples.iter().enumerate() {
        let Some(&(t0, v0)) = samples[..i]
            .iter()
            .rev()
            .find(|(t0, _)| t.saturating_sub(*t0) >= Duration::from_millis(100))
        else {
            continue;
        };
        let per_100ms = (v - v0) as f64 * 0.1 / (t - t0).as_secs_f64();
        peak = peak.max(per_100ms);
    }
    eprintln!(
        "{total} closes; peak {peak:.1} per 100 ms (bound {bound}); {} reconnects",
        report.reconnects
    );
    assert!(
        peak <= bound as f64,
        "peak {peak:.0} closes per 100 ms, bound {bound}: {samples:?}"
    );
    // And the closes took most of the window.
    let when = |share: u64| {
        samples
            .iter()
            .find(|s| s.1 * 10 >= total * share)
            .unwrap()
            .0
    };
    let span = when(9) - when(1);
    assert!(
        span >= Duration::from_millis(WINDOW_MS / 2),
        "10% to 90% of the closes in {span:?}"
    );
}
