//! Starting and stopping a whole node: listeners, router, cores, metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use courier_router::api::{Delivery, Outlet};
use courier_router::{Router, RouterConfig};
use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol, Socket, Type};

use crate::admin::{Access, AdminToken};
use crate::config::{DriverChoice, Role, ServeArgs, StoreCompaction};
use crate::core::{self, CoreMsg, Shared};
use crate::fleet::{FleetLink, Upstream};
use crate::mailbox::Mailbox;
use crate::metrics::{self, GatewayMetrics};
use crate::process;
use crate::secret;

/// Which monoio driver the cores run, once chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// io_uring.
    Uring,
    /// The legacy epoll driver.
    Legacy,
}

impl Driver {
    /// Resolves the configured choice against what the kernel allows.
    pub fn choose(choice: DriverChoice) -> anyhow::Result<Self> {
        let uring = monoio::utils::detect_uring();
        Ok(match (choice, uring) {
            (DriverChoice::Auto, true) | (DriverChoice::Uring, true) => Self::Uring,
            (DriverChoice::Uring, false) => {
                bail!("driver = uring, but io_uring is not available on this kernel")
            }
            (DriverChoice::Auto, false) | (DriverChoice::Legacy, _) => Self::Legacy,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Uring => "io_uring",
            Self::Legacy => "legacy (epoll)",
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    cores: Vec<JoinHandle<()>>,
    /// The WebSocket address the cores listen on.
    pub listen_addr: SocketAddr,
    /// The metrics endpoint's address.
    pub metrics_addr: SocketAddr,
    /// The driver the cores run.
    pub driver: Driver,
    /// The exclusive lock on the data directory, held while the node runs.
    _data_lock: std::fs::File,
}

struct CoreOutlet(Vec<Arc<Mailbox<CoreMsg>>>);

impl Outlet for CoreOutlet {
    fn deliver(&self, core: u16, batch: Vec<Delivery>) {
        if let Some(mailbox) = self.0.get(usize::from(core)) {
            mailbox.push(CoreMsg::Deliveries(batch));
        }
    }
}

impl Node {
    /// Starts a node; returns once every listener is bound and every core runs.
    pub fn start(args: ServeArgs) -> anyhow::Result<Self> {
        let data_lock = lock_data_dir(&args.data_dir)?;
        let secret = secret::load_or_create(&args.data_dir)
            .with_context(|| format!("token secret in {}", args.data_dir.display()))?;
        let admin_token = match &args.admin_token_file {
            Some(path) => Some(AdminToken::load(path)?),
            None => None,
        };
        let driver = Driver::choose(args.driver)?;
        tracing::info!(
            driver = driver.name(),
            driver.requested = ?args.driver,
            "driver chosen"
        );
        let cores = args.core_count();
        if !args.share_port {
            probe_port(args.listen)?;
        }
        let listeners = bind_listeners(args.listen, cores)?;
        let listen_addr = listeners[0].local_addr()?;
        tracing::info!(
            listen.addr = %listen_addr,
            listeners = cores,
            share_port = args.share_port,
            "listener bound"
        );

        let mailboxes: Vec<_> = (0..cores).map(|_| Arc::new(Mailbox::new())).collect();
        let mut registry = Registry::default();
        let router = match args.role {
            Role::Gateway => {
                Upstream::Fleet(FleetLink::start(&args, mailboxes.clone(), &mut registry)?)
            }
            _ => Upstream::Embedded(
                Router::start(
                    RouterConfig {
                        push: push_config(&args)?,
                        ..router_config(&args)
                    },
                    Arc::new(CoreOutlet(mailboxes.clone())),
                    &mut registry,
                )
                .context("starting the router and its store")?,
            ),
        };
        let gateway_metrics = GatewayMetrics::register(&mut registry);
        registry.register_collector(Box::new(process::ProcessCollector));
        let ready = Arc::new(AtomicBool::new(true));
        let metrics_listen = args.metrics_listen;
        let access = Access::new(metrics_listen.ip().is_loopback(), admin_token);
        let ip_limits = ip_limits_for(&args);
        let shared = Arc::new(Shared {
            ip_limits,
            queued_per_core: (0..cores).map(|_| AtomicUsize::new(0)).collect(),
            config: args,
            secret,
            router,
            mailboxes,
            metrics: gateway_metrics,
            ready,
            connections: AtomicUsize::new(0),
        });
        let admin = match &access {
            Access::Loopback => "open on loopback",
            Access::Token(_) => "bearer token",
            Access::Refused => "refused (not loopback and no admin token file)",
        };
        let metrics_addr =
            metrics::serve(metrics_listen, Arc::new(registry), shared.clone(), access)
                .with_context(|| format!("binding the metrics endpoint {metrics_listen}"))?;
        tracing::info!(metrics.addr = %metrics_addr, admin, "metrics endpoint bound");

        let mut handles = Vec::with_capacity(cores);
        for (id, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("core-{id}"))
                .spawn(move || run_core(id as u16, shared, listener, driver))
                .context("spawning a core thread")?;
            handles.push(handle);
        }
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            listen.addr = %listen_addr,
            metrics.addr = %metrics_addr,
            cores,
            driver = driver.name(),
            node.id = shared.config.node_id,
            data.dir = %shared.config.data_dir.display(),
            "gateway started"
        );
        Ok(Self {
            shared,
            cores: handles,
            listen_addr,
            metrics_addr,
            driver,
            _data_lock: data_lock,
        })
    }

    /// Asks the node to shut down (as SIGTERM does); returns at once.
    pub fn begin_shutdown(&self) {
        self.shared.begin_shutdown();
    }

    /// A handle that can start the shutdown from another thread.
    pub fn shutdown_trigger(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.begin_shutdown()
    }

    /// Waits for every core to drain, then stops the router, which commits
    /// what it holds and closes the store.
    pub fn wait(self) {
        for handle in self.cores {
            let _ = handle.join();
        }
        tracing::info!("drain finished; stopping the router");
        self.shared.router.shutdown();
        tracing::info!("gateway stopped");
    }
}

fn run_core(id: u16, shared: Arc<Shared>, listener: std::net::TcpListener, driver: Driver) {
    let result = match driver {
        Driver::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(ring_builder())
            .with_entries(4096)
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(core::run(id, shared.clone(), listener))),
        Driver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(core::run(id, shared.clone(), listener))),
    };
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) | Err(e) => {
            tracing::error!(conn.core = id, error = %e, "core stopped with an error");
            shared.begin_shutdown();
        }
    }
}

/// The io_uring setup of a core's ring. Completions run cooperatively
/// (`IORING_SETUP_COOP_TASKRUN`, Linux 5.19): the kernel leaves their work
/// for the core's next entry into the kernel instead of interrupting it
/// with an inter-processor interrupt and a signal-delivery pass, which a
/// profile of loadgen at 5,000 messages/s showed costing about a tenth of
/// its CPU (docs/benchmarks.md). A core enters the kernel at every turn of
/// its loop (to submit, or to wait), so no completion waits longer than
/// that turn. A kernel without the flag gets a plain ring.
pub fn ring_builder() -> io_uring::Builder {
    let mut urb = io_uring::IoUring::builder();
    if coop_taskrun_supported() {
        urb.setup_coop_taskrun();
    }
    urb
}

/// Whether this kernel accepts `IORING_SETUP_COOP_TASKRUN`: a ring of the
/// fewest entries is set up with it once and dropped.
fn coop_taskrun_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let supported = io_uring::IoUring::<io_uring::squeue::Entry>::builder()
            .setup_coop_taskrun()
            .build(1)
            .is_ok();
        if !supported {
            tracing::info!("this kernel has no cooperative io_uring task running; cores take completions by interrupt");
        }
        supported
    })
}

/// Takes an exclusive lock on `<data dir>/LOCK`, so a second node can never
/// open the same store: two writers would each assign the same sequences
/// and one's acknowledged messages would be lost. The lock is released when
/// the process exits, however it exits.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!(
                "data directory {} is in use by another gateway (its LOCK is held)",
                dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Refuses to start on an address another process already listens on.
/// SO_REUSEPORT would otherwise let this node silently share the port with
/// a stranger (another node with another store and secret) and split the
/// connections between them. `--share-port` skips the check, for several
/// gateway processes of one deployment on one port.
fn probe_port(addr: SocketAddr) -> anyhow::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "{addr} is already in use by another process \
             (pass --share-port to join its SO_REUSEPORT group on purpose)"
        ),
        Err(e) => Err(e).with_context(|| format!("binding {addr}")),
    }
}

/// Binds one listener per core on the same address with SO_REUSEPORT, so
/// the kernel spreads connections across cores.
///
/// Port 0 is resolved first with a plain bind (no SO_REUSEPORT): the kernel
/// may hand a reuseport bind to port 0 a port that another process's
/// reuseport listeners of the same user already hold, and the two would
/// then share connections.
fn bind_listeners(addr: SocketAddr, cores: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    if addr.port() == 0 {
        addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    }
    let mut out = Vec::with_capacity(cores);
    for _ in 0..cores {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("binding {addr}"))?;
        socket.listen(4096)?;
        out.push(socket.into());
    }
    Ok(out)
}

/// The router settings the flags ask for.
pub fn router_config(args: &ServeArgs) -> RouterConfig {
    RouterConfig {
        data_dir: args.data_dir.join("store"),
        store: courier_router::StoreLimits {
            cache_bytes: args.store_cache_mib << 20,
            write_buffer_bytes: args.store_write_buffer_mib << 20,
            memtable_bytes: args.store_memtable_mib << 20,
            background_nice: i32::from(args.store_background_nice),
            dedupe_compaction: compaction(args.store_dedupe_compaction),
            entries_compaction: compaction(args.store_entries_compaction),
        },
        recent_entries_bytes: usize::try_from(args.recent_entries_mib << 20).unwrap_or(usize::MAX),
        node_id: args.node_id,
        max_body: args.max_body,
        max_group_members: args.max_group_members,
        send_rate_per_s: args.send_rate,
        send_burst: args.send_burst,
        dedupe_window: Duration::from_secs(args.dedupe_hours * 3600),
        batch_linger: Duration::from_micros(args.batch_linger_us),
        sync_thread: args.sync_thread,
        max_devices: usize::from(args.max_devices),
        typing_ttl: Duration::from_millis(args.typing_ttl_ms),
        presence_debounce: Duration::from_millis(args.presence_debounce_ms),
        presence_writes_per_s: args.presence_writes_per_s,
        ..RouterConfig::default()
    }
}

fn compaction(c: StoreCompaction) -> courier_router::Compaction {
    match c {
        StoreCompaction::Tiered => courier_router::Compaction::Tiered,
        StoreCompaction::Leveled => courier_router::Compaction::Leveled,
    }
}

/// The per-IP limits the flags ask for (`None`: both off).
fn ip_limits_for(args: &ServeArgs) -> Option<crate::iplimit::IpLimits> {
    let rate = args.connect_rate_per_ip;
    crate::iplimit::IpLimits::new(args.max_connections_per_ip, rate, rate * 10.0)
}

/// The push settings from the flags, reading the key files they name. A
/// provider is on when its required settings are all given; some but not
/// all stop the start, naming what is missing.
pub(crate) fn push_config(args: &ServeArgs) -> anyhow::Result<courier_router::push::PushConfig> {
    use courier_router::push::{ApnsConfig, FcmConfig, PushConfig, ServiceAccount, WebhookConfig};
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))
    };
    let webhook = match (&args.push_webhook_url, &args.push_webhook_secret_file) {
        (None, None) => None,
        (Some(url), Some(file)) => {
            let secret = read(file, "push_webhook.secret_file")?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!secret.is_empty(), "push_webhook.secret_file is empty");
            Some(WebhookConfig {
                url: url.clone(),
                secret: std::sync::Arc::from(secret.as_bytes()),
            })
        }
        _ => anyhow::bail!("push_webhook needs both url and secret_file"),
    };
    let fcm = match &args.push_fcm_credentials {
        None => None,
        Some(file) => Some(FcmConfig {
            account: ServiceAccount::from_json(&read(file, "push_fcm.credentials")?)
                .map_err(|e| anyhow::anyhow!("push_fcm.credentials: {e}"))?,
            endpoint: args.push_fcm_endpoint.clone(),
        }),
    };
    let apns_parts = (
        &args.push_apns_key_file,
        &args.push_apns_key_id,
        &args.push_apns_team_id,
        &args.push_apns_topic,
    );
    let apns = match apns_parts {
        (None, None, None, None) => None,
        (Some(file), Some(key_id), Some(team_id), Some(topic)) => Some(ApnsConfig {
            key_pem: std::sync::Arc::from(read(file, "push_apns.key_file")?),
            key_id: key_id.clone(),
            team_id: team_id.clone(),
            topic: topic.clone(),
            endpoint: args.push_apns_endpoint.clone(),
            token_ttl: Duration::from_secs(30 * 60),
        }),
        _ => anyhow::bail!("push_apns needs key_file, key_id, team_id and topic together"),
    };
    anyhow::ensure!(
        args.push_rate.is_finite() && args.push_rate > 0.0,
        "push.rate must be a positive number"
    );
    Ok(PushConfig {
        delay: Duration::from_millis(args.push_delay_ms),
        coalesce_window: Duration::from_millis(args.push_coalesce_ms),
        max_attempts: args.push_max_attempts,
        backoff_base: Duration::from_millis(args.push_backoff_ms),
        backoff_max: Duration::from_millis(args.push_backoff_max_ms),
        concurrency: args.push_concurrency as usize,
        rate_per_s: args.push_rate,
        ca_file: args.push_ca_file.clone(),
        max_ciphertext: args.push_max_ciphertext as usize,
        webhook,
        fcm,
        apns,
    })
}
