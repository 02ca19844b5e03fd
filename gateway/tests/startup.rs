//! What the gateway refuses at start, with the reason named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use clap::Parser;
use common::TestNode;
use courier_gateway::config::Cli;
use courier_gateway::node::Node;

fn args(extra: &[&str]) -> courier_gateway::config::ServeArgs {
    let mut argv = vec!["gateway", "--metrics-listen", "127.0.0.1:0", "--cores", "1"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).unwrap().serve
}

#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let node = TestNode::start(&[]);
    let dir = node.dir.to_str().unwrap().to_owned();
    let err = Node::start(args(&["--listen", "127.0.0.1:0", "--data-dir", &dir])).unwrap_err();
    assert!(
        format!("{err:#}").contains("in use by another gateway"),
        "{err:#}"
    );
    // The first node is untouched and still serves.
    let (_alice, _) = node.online("alice", 1);
}

#[test]
fn a_port_another_process_listens_on_is_refused_unless_shared_on_purpose() {
    let node = TestNode::start(&[]);
    let other = tempfile::tempdir().unwrap();
    let addr = node.addr.to_string();
    let dir = other.path().to_str().unwrap().to_owned();
    let err = Node::start(args(&["--listen", &addr, "--data-dir", &dir])).unwrap_err();
    assert!(
        format!("{err:#}").contains("already in use by another process"),
        "{err:#}"
    );
    let shared = Node::start(args(&[
        "--listen",
        &addr,
        "--data-dir",
        &dir,
        "--share-port",
    ]))
    .expect("--share-port joins the port");
    shared.begin_shutdown();
    shared.wait();
}

#[test]
fn token_for_a_data_directory_without_a_secret_is_an_error() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["token", "--user", "alice", "--data-dir"])
        .arg(empty.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no token secret"), "{stderr}");
    assert!(
        !empty.path().join("nowhere").exists(),
        "nothing was created"
    );
}

#[test]
fn sigterm_still_stops_a_node_whose_log_reader_went_away() {
    use std::io::Read;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--drain-window-ms", "0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the log up to the start summary (the signal handler is set
    // right after it; a fresh store can take a few hundred milliseconds on
    // a loaded machine), then close the pipe: every later log write fails
    // with EPIPE.
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("gateway started") {
        let mut chunk = [0u8; 256];
        let n = stderr.read(&mut chunk).unwrap();
        assert!(n > 0, "the log ended before the start summary");
        seen.extend_from_slice(&chunk[..n]);
    }
    drop(stderr);
    std::thread::sleep(std::time::Duration::from_millis(300));
    send_sigterm(child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            return;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the node did not stop on SIGTERM after its log pipe closed");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends SIGTERM with the `kill` command (the suite has no libc binding).
fn send_sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}
