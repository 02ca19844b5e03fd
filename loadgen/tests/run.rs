//! The library API's failure paths, on real sockets, under both drivers.
//! (Runs against a live gateway belong to the gateway's integration tests.)

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use courier_loadgen::handshake::Target;
use courier_loadgen::{run, Config, RunError};
use courier_protocol::token::Secret;

/// A loopback URL where nothing listens: a port the kernel just handed out
/// and took back.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("ws://127.0.0.1:{port}/")
}

fn config(legacy: bool) -> Config {
    Config {
        target: Target::parse(&dead_url()).unwrap(),
        connections: 4,
        rate: 10.0,
        duration: Duration::from_secs(1),
        secret: Some(Secret::new(b"test secret, not a node's".to_vec())),
        progress: false,
        legacy,
        ..Config::default()
    }
}

#[test]
fn nothing_listening_fails_fast_with_a_clear_error() {
    for legacy in [false, true] {
        let started = Instant::now();
        let err = run(config(legacy)).unwrap_err();
        assert!(
            matches!(err, RunError::NoServer(_)),
            "legacy={legacy}: {err}"
        );
        assert!(err.to_string().contains("start the gateway first"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_missing_secret_names_the_file() {
    let mut c = config(false);
    c.secret = None;
    c.data_dir = std::env::temp_dir().join(format!("loadgen-no-such-dir-{}", std::process::id()));
    let err = run(c).unwrap_err();
    assert!(matches!(err, RunError::Secret { .. }), "{err}");
    assert!(err.to_string().contains("jwt.secret"), "{err}");
}

#[test]
fn more_connections_than_file_descriptors_is_refused_up_front() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| {
            l["Max open files".len()..]
                .split_whitespace()
                .next()?
                .parse::<u32>()
                .ok()
        });
    let Some(soft) = soft else { return }; // unlimited: nothing to refuse
    let c = Config {
        connections: soft,
        // One process holding them all; more would each hold a share.
        workers: Some(1),
        ..config(false)
    };
    let err = run(c).unwrap_err();
    assert!(matches!(err, RunError::FdLimit { .. }), "{err}");
    assert!(err.to_string().contains("ulimit -n"), "{err}");
}
