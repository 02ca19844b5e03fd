//! The log an operator reads, through the real binary: with
//! `--log-format json` every line is one JSON object; each lifecycle event
//! is one line; a flood of refused upgrades is one rate-limited warning;
//! a token never appears.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::{raw_upgrade, upgrade_request, TIMEOUT};

const LIFECYCLE: [&str; 5] = [
    "driver chosen",
    "listener bound",
    "metrics endpoint bound",
    "gateway started",
    "drain started: not ready, closing sessions with 1001",
];

fn message(line: &serde_json::Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

#[test]
fn json_logs_carry_one_line_per_lifecycle_event_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--cores", "1", "--log-format", "json", "--data-dir"])
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .env_remove("COURIER_LOG_FILTER")
        .env_remove("COURIER_LOG_FORMAT")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let next = |lines: &mut Vec<serde_json::Value>| -> serde_json::Value {
        let raw = rx.recv_timeout(TIMEOUT * 2).expect("a log line in time");
        let v: serde_json::Value =
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("not a JSON line ({e}): {raw}"));
        lines.push(v.clone());
        v
    };

    let started = loop {
        let v = next(&mut lines);
        if message(&v) == "gateway started" {
            break v;
        }
    };
    let addr: std::net::SocketAddr = started["fields"]["listen.addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // A plain HTTP request (a health check, a browser) is no warning.
    let (status, _, _) = raw_upgrade(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 426);

    // Fifty clients with the same bad token: fifty refusals, one warning.
    let token = "NEVER-LOGGED-TOKEN.abc.def";
    for _ in 0..50 {
        let (status, _, _) = raw_upgrade(addr, &upgrade_request(Some(token), ""));
        assert_eq!(status, 401);
    }

    // SIGTERM drains and stops.
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    loop {
        match rx.recv_timeout(TIMEOUT * 2) {
            Ok(raw) => {
                let v: serde_json::Value = serde_json::from_str(&raw)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {raw}"));
                lines.push(v);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("the gateway did not stop: {e}"),
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    let count = |wanted: &str| lines.iter().filter(|l| message(l) == wanted).count();
    for event in LIFECYCLE {
        assert_eq!(count(event), 1, "{event:?} once in {lines:#?}");
    }
    assert_eq!(count("signal received; shutting down"), 1);
    assert_eq!(count("core drained"), 1, "one line per core");
    assert_eq!(count("gateway stopped"), 1);
    let refused: Vec<_> = lines
        .iter()
        .filter(|l| message(l) == "upgrade refused")
        .collect();
    // One warning per 10 s per core: one line, or two on a machine slow
    // enough to stretch fifty upgrades past the window.
    assert!(
        (1..=2).contains(&refused.len()),
        "rate-limited: {refused:#?}"
    );
    assert_eq!(refused[0]["level"], "WARN");
    assert!(
        refused.iter().all(|l| l["fields"]["http.status"] == 401),
        "the plain request is not among them: {refused:#?}"
    );
    for l in &lines {
        assert!(
            !l.to_string().contains("NEVER-LOGGED"),
            "a token in the log: {l}"
        );
    }
}
