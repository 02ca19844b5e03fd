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
