//! The scale machinery, scaled down: the real `loadgen` binary spreading a
//! few hundred connections over two worker processes and four source
//! addresses against the real `gateway` binary, a scenario with an idle
//! phase, read receipts and reconnect churn; thresholds and their exit
//! code; scenario files refused by key; the HTML report; `loadgen size`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// The gateway binary beside loadgen's, built if it is not there yet.
fn gateway_bin() -> PathBuf {
    let bin = Path::new(LOADGEN).with_file_name("gateway");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "courier-gateway", "--bin", "gateway"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the gateway failed");
    }
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn legacy() -> bool {
    std::env::var("COURIER_DRIVER").is_ok_and(|d| d == "legacy")
}

/// A gateway process with its own data directory; killed on drop.
struct Gateway {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Gateway {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (port, metrics) = (free_port(), free_port());
        let child = Command::new(gateway_bin())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .args(["--cores", "1", "--data-dir", dir.path().to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gateway starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "gateway did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, dir }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    /// Runs loadgen against this gateway (its URL and data directory for
    /// the token secret) with `args` after them.
    fn loadgen(&self, args: &[&str]) -> Output {
        let url = self.url();
        let dir = self.dir.path().to_str().unwrap();
        let mut all = vec!["--url", url.as_str(), "--data-dir", dir];
        all.extend_from_slice(args);
        loadgen(&all)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn loadgen(args: &[&str]) -> Output {
    let mut cmd = Command::new(LOADGEN);
    cmd.args(args).arg("--quiet");
    if legacy() {
        cmd.arg("--legacy");
    }
    cmd.output().expect("loadgen runs")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const SCENARIO: &str = r#"
name = "suite"
connections = 300
ramp_rate = 1000
workers = 2
source_addrs = "127.0.1.1-127.0.1.4"
drain = "20s"
thresholds = ["lost == 0", "reordered == 0", "duplicates == 0", "invalid == 0"]

[groups]
count = 12
max = 40
mean = 8

[body]
min = 40
mean = 200
max = 800

[[phase]]
name = "idle"
duration = "1s"

[[phase]]
name = "traffic"
duration = "3s"
rate = 150
read_share = 0.3

[[phase]]
name = "churn"
duration = "3s"
rate = 100
churn_per_s = 0.05
"#;

#[test]
fn two_worker_processes_over_four_source_addresses_lose_nothing() {
    let gw = Gateway::start();
    let out = tempfile::tempdir().unwrap();
    let scenario = out.path().join("suite.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let report = out.path().join("run.json");
    let pid = gw.child.id().to_string();
    let o = gw.loadgen(&[
        "--scenario",
        scenario.to_str().unwrap(),
        "--gateway-pid",
        &pid,
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));

    // The spread: two processes, four source addresses, every connection up.
    assert_eq!(r["config"]["workers"], 2);
    assert_eq!(r["config"]["source_addrs"].as_array().unwrap().len(), 4);
    assert_eq!(r["config"]["scenario"], "suite");
    assert_eq!(n("connections"), 300);

    // Merged counts are exact: everything sent was acked, every owed
    // delivery arrived once, in order, across processes.
    assert_eq!(n("lost"), 0);
    assert_eq!(n("duplicates"), 0);
    assert_eq!(n("reordered"), 0);
    assert_eq!(n("invalid"), 0);
    let scheduled = r["plan"]["messages_scheduled"].as_u64().unwrap();
    assert_eq!(scheduled, 3 * 150 + 3 * 100);
    assert_eq!(n("sent") + n("skipped"), scheduled);
    assert_eq!(n("skipped"), 0, "every group was known");
    assert_eq!(n("acked"), n("sent"));
    assert_eq!(n("delivered"), n("expected_deliveries"));
    assert!(n("delivered") > n("acked"), "groups fan out");
    // The scenario's parts ran: churn reconnected, receipts were read.
    assert!(
        n("churned") > 0 && n("reconnects") >= n("churned") / 2,
        "{r}"
    );
    assert!(n("reads_sent") > 0);
    assert_eq!(r["phases"].as_array().unwrap().len(), 3);
    assert_eq!(r["latency_ms"]["end_to_end"]["count"], n("delivered"));
    assert!(r["thresholds_passed"].as_bool().unwrap());
    assert_eq!(r["thresholds"].as_array().unwrap().len(), 4);

    // The gateway was measured at every mark.
    let marks = r["measurements"].as_array().unwrap();
    let labels: Vec<&str> = marks.iter().map(|m| m["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        ["start", "connected", "idle", "traffic", "churn", "drained"]
    );
    assert!(marks
        .iter()
        .all(|m| m["gateway"]["rss_bytes"].as_u64() > Some(0)));
    let measured = &r["sizing"]["measured"];
    assert!(
        measured["gateway_bytes_per_connection"].is_number(),
        "{measured}"
    );
    assert!(
        measured["cpu_s_per_million_deliveries"].is_number(),
        "{measured}"
    );

    // The HTML report beside it: well-formed, self-contained, with plots.
    let html = std::fs::read_to_string(report.with_extension("html")).unwrap();
    assert_well_formed(&html);
    assert!(html.contains("<svg") && html.contains("<polyline"));
    assert!(!html.contains("<script"));
    for needle in ["end to end", "SENT ack", "lost == 0", "Sizing"] {
        assert!(html.contains(needle), "{needle}");
    }

    // `loadgen size` on the saved report agrees with its own sizing.
    let o = Command::new(LOADGEN)
        .args(["size", report.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let sized: Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in [
        "gateway_nodes",
        "gateway_nodes_for_memory",
        "gateway_nodes_for_cpu",
        "router_nodes",
    ] {
        assert_eq!(sized["result"][k], r["sizing"]["result"][k], "{k}");
    }
}

/// Loadgen's own heartbeats keep idle connections open: the gateway never
/// pings first here, and closes a session silent for 4 s, so each of
/// loadgen's connections must write a ping within that, though a worker
/// checks only a twentieth of its connections per tick.
#[test]
fn idle_connections_outlive_a_short_idle_timeout_on_loadgens_pings() {
    let gw = Gateway::start_with(&["--idle-timeout", "4", "--ping-interval", "3600"]);
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("idle.json");
    let o = gw.loadgen(&[
        "--connections",
        "200",
        "--rate",
        "0",
        "--duration",
        "10s",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["connections"], 200, "{r}");
    assert_eq!(r["connections_at_end"], 200, "{r}");
    assert_eq!(r["disconnects"], 0, "{r}");
    assert_eq!(r["reconnects"], 0, "{r}");
}

#[test]
fn a_broken_threshold_exits_3_and_names_it() {
    let gw = Gateway::start();
    let o = gw.loadgen(&[
        "--connections",
        "20",
        "--rate",
        "20",
        "--duration",
        "1s",
        "--threshold",
        "lost == 0",
        "--threshold",
        "e2e_p99_ms < 0.000001",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("threshold broken: e2e_p99_ms < 0.000001"),
        "{err}"
    );
    assert!(!err.contains("lost == 0"), "{err}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("threshold    ok   lost == 0"), "{out}");
}

#[test]
fn bad_scenarios_and_thresholds_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("conections = 5\n", "`conections`"),
        ("[[phase]]\nduration = \"1s\"\nchurn = 0.1\n", "`churn`"),
        (
            "[[phase]]\nname = \"x\"\nduration = \"1s\"\nrate = -3\n",
            "key `rate`",
        ),
    ];
    for (body, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, body).unwrap();
        let o = loadgen(&["--scenario", path.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{body}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--scenario") && err.contains(needle),
            "{body}: {err}"
        );
    }
    let o = loadgen(&["--threshold", "p99 is small"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--threshold"));
    let o = loadgen(&["--source-addrs", "10.0.0.1-10.0.0.4"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a loopback address"));
}

#[test]
fn size_on_a_saved_report_matches_the_arithmetic_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saved.json");
    // Round figures: 1 KiB gateway + 8 KiB per loopback pair (4 KiB the
    // server's), 36 ms of idle CPU per connection-hour, 5 µs per delivery on
    // the cores and 10 µs on the router, two deliveries per message.
    let saved = serde_json::json!({
        "sizing": { "measured": {
            "gateway_rss_base_bytes": 0.0,
            "gateway_bytes_per_connection": 1024.0,
            "kernel_bytes_per_loopback_pair": 8192.0,
            "idle_cpu_s_per_connection_hour": 0.036,
            "core_cpu_s_per_million_deliveries": 5.0,
            "router_cpu_s_per_million_deliveries": 10.0,
            "fanout": 2.0
        } }
    });
    std::fs::write(&path, saved.to_string()).unwrap();
    let o = Command::new(LOADGEN)
        .args(["size", path.to_str().unwrap(), "--json"])
        .args(["--connections", "1e6", "--msgs-per-s", "1e5"])
        .args(["--server-cores", "10", "--server-mem-gib", "5"])
        .args(["--os-reserve-gib", "1", "--headroom", "0.5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &s["result"];
    // Memory: 1024 + 8192 x 0.5 = 5120 B a connection; (5 - 1) GiB x 0.5
    // = 2 GiB usable -> 419,430 a node -> 3 nodes for a million.
    assert_eq!(r["gateway_nodes_for_memory"], 3);
    // CPU: holding 1e6 x 0.036 / 3600 = 10 cores, delivering 2e5/s x 5 µs
    // = 1 core; 11 / (10 x 0.5) -> 3 nodes.
    assert_eq!(r["gateway_nodes_for_cpu"], 3);
    assert_eq!(r["gateway_nodes"], 3);
    // Router: 2e5/s x 10 µs = 2 cores / 5 usable -> 1 node.
    assert_eq!(r["router_nodes"], 1);
    let conns_per_node = r["connections_per_gateway_node"].as_f64().unwrap();
    assert!((conns_per_node - 1e6 / 3.0).abs() < 1.0);

    // As text, every line says where its number comes from.
    let o = Command::new(LOADGEN)
        .args(["size", path.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("assumption: --connections"), "{out}");
    assert!(out.contains("measured: gateway RSS delta"), "{out}");
    assert!(out.contains("gateway nodes"), "{out}");

    // A report without a sizing section is refused with a reason.
    std::fs::write(&path, "{}").unwrap();
    let o = Command::new(LOADGEN)
        .args(["size", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sizing.measured"));
}

/// Every element closed in order, every attribute quoted: the page reads as
/// XML as well as HTML.
fn assert_well_formed(doc: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = doc;
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let close = rest.find('>').expect("every tag ends");
        let tag = &rest[..close];
        rest = &rest[close + 1..];
        if tag.starts_with('!') {
            continue; // <!DOCTYPE html>
        }
        assert!(!tag.contains('<'), "stray < in {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack
                .pop()
                .unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(top, name.trim(), "</{name}> closes <{top}>");
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            stack.push(name);
        }
        // Attribute values are quoted: an even number of quotes.
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    // Text holds no raw ampersand that is not an entity.
    for (i, _) in doc.match_indices('&') {
        let entity = &doc[i..(i + 6).min(doc.len())];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
                .iter()
                .any(|e| entity.starts_with(e)),
            "bare & at {i}: {entity}"
        );
    }
}

/// `loadgen peer --protocol courier`: idle connections over two worker
/// processes and two source addresses, then a fan-out split over three
/// groups (at most 8 members each), every delivery counted once.
#[test]
fn peer_mode_against_courier() {
    let gw = Gateway::start();
    let pid = gw.child.id().to_string();
    let report = gw.dir.path().join("peer.json");
    let out = loadgen(&[
        "peer",
        "--protocol",
        "courier",
        "--url",
        &gw.url(),
        "--data-dir",
        gw.dir.path().to_str().unwrap(),
        "--connections",
        "60",
        "--subscribers",
        "20",
        "--group-max",
        "8",
        "--workers",
        "2",
        "--source-addrs",
        "127.0.1.1-127.0.1.2",
        "--idle",
        "1s",
        "--messages",
        "20",
        "--fanout-duration",
        "5s",
        "--drain",
        "10s",
        "--server-pid",
        &pid,
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["connections_up"], 60, "{r}");
    assert_eq!(r["worker_processes"], 2);
    assert_eq!(r["subscribers_joined"], 20);
    assert_eq!(r["groups"], 3);
    assert_eq!(r["published"], 20);
    assert_eq!(r["acked"], 60, "one Sent per group and message");
    assert_eq!(r["delivered"], 400);
    assert_eq!(
        (r["lost"].as_u64(), r["duplicates"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(r["server_bytes_per_connection"].is_number(), "{r}");
}
