//! Command line and environment configuration.
//!
//! Every setting is a flag with an environment variable of the same name in
//! upper case with a `COURIER_` prefix, and a key of the TOML file named by
//! `--config` ([`crate::config_file`] reads it and says which key is which).
//! A flag beats its variable, the variable beats the file, and the file beats
//! the default; the defaults run a complete node on loopback with its data
//! under `./data`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Courier gateway: a WebSocket chat node with the router and its store embedded.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; without a subcommand the gateway serves.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serving options (also accepted after `serve`).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket clients (the default).
    Serve(ServeArgs),
    /// Print a session token valid for the node that uses the same data directory.
    Token(TokenArgs),
}

/// Which monoio driver the cores run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DriverChoice {
    /// io_uring when the kernel allows it, else the legacy epoll driver.
    Auto,
    /// io_uring; refuse to start without it.
    Uring,
    /// The legacy epoll driver.
    Legacy,
}

/// What this process is in a deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The single node: gateway with the router and its store embedded.
    Node,
    /// Fleet mode's connection tier: sessions only; commands go to the
    /// routers over NATS.
    Gateway,
    /// Fleet mode's message tier: serves its share of the partitions, no
    /// WebSocket listener.
    Router,
}

/// How the store compacts a part written on every send (the messages, the
/// dedupe records).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreCompaction {
    /// Size-tiered: a record is rewritten about once a level; a lookup
    /// checks a few more tables' bloom filters.
    Tiered,
    /// Levelled (fjall's default): fewer tables, several times the
    /// background writes.
    Leveled,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Options for `gateway serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file; flags and environment variables override its keys.
    #[arg(long, env = "COURIER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Address the WebSocket listener binds (each core binds it with SO_REUSEPORT).
    #[arg(long, env = "COURIER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the metrics and admin endpoint (`/metrics`, `/healthz`,
    /// `/readyz`, `/admin/...`).
    #[arg(long, env = "COURIER_METRICS_LISTEN", default_value = "127.0.0.1:9100")]
    pub metrics_listen: SocketAddr,
    /// File holding the admin token. When set, the `/admin/` endpoints need
    /// `Authorization: Bearer <token>`; without it they answer only on a
    /// loopback metrics address.
    #[arg(long, env = "COURIER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Milliseconds a message waits for an offline device to ack or sync
    /// before the device is woken by a push notification.
    #[arg(long, env = "COURIER_PUSH_DELAY_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub push_delay_ms: u64,
    /// Milliseconds after a notification during which further messages of
    /// the same conversation wait, to wake the device once with a count.
    #[arg(long, env = "COURIER_PUSH_COALESCE_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub push_coalesce_ms: u64,
    /// Attempts per notification before it is given up.
    #[arg(long, env = "COURIER_PUSH_MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub push_max_attempts: u32,
    /// First retry delay in milliseconds (doubled per attempt, jittered).
    #[arg(long, env = "COURIER_PUSH_BACKOFF_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub push_backoff_ms: u64,
    /// Longest wait between attempts in milliseconds, Retry-After included.
    #[arg(long, env = "COURIER_PUSH_BACKOFF_MAX_MS", default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub push_backoff_max_ms: u64,
    /// Provider requests in flight at once, per provider.
    #[arg(long, env = "COURIER_PUSH_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub push_concurrency: u32,
    /// Provider requests started per second, per provider.
    #[arg(long, env = "COURIER_PUSH_RATE", default_value_t = 500.0)]
    pub push_rate: f64,
    /// Largest message ciphertext a notification carries for a device that
    /// opted in, in bytes (providers cap payloads at 4 KiB).
    #[arg(long, env = "COURIER_PUSH_MAX_CIPHERTEXT", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(0..=3072))]
    pub push_max_ciphertext: u32,
    /// Extra trusted root certificates (PEM) for the push providers' TLS.
    #[arg(long, env = "COURIER_PUSH_CA_FILE")]
    pub push_ca_file: Option<PathBuf>,
    /// Webhook URL; with a secret file it turns the webhook provider on.
    #[arg(long, env = "COURIER_PUSH_WEBHOOK_URL")]
    pub push_webhook_url: Option<String>,
    /// File holding the webhook's HMAC-SHA256 key (its bytes, trailing
    /// newline dropped).
    #[arg(long, env = "COURIER_PUSH_WEBHOOK_SECRET_FILE")]
    pub push_webhook_secret_file: Option<PathBuf>,
    /// FCM service-account JSON key file; turns the FCM provider on.
    #[arg(long, env = "COURIER_PUSH_FCM_CREDENTIALS")]
    pub push_fcm_credentials: Option<PathBuf>,
    /// Base URL of the FCM HTTP v1 API.
    #[arg(
        long,
        env = "COURIER_PUSH_FCM_ENDPOINT",
        default_value = "https://fcm.googleapis.com"
    )]
    pub push_fcm_endpoint: String,
    /// APNs token signing key (.p8, PKCS#8 PEM); with key id, team id and
    /// topic it turns the APNs provider on.
    #[arg(long, env = "COURIER_PUSH_APNS_KEY_FILE")]
    pub push_apns_key_file: Option<PathBuf>,
    /// APNs signing key id (the provider token's `kid`).
    #[arg(long, env = "COURIER_PUSH_APNS_KEY_ID")]
    pub push_apns_key_id: Option<String>,
    /// Apple developer team id (the provider token's `iss`).
    #[arg(long, env = "COURIER_PUSH_APNS_TEAM_ID")]
    pub push_apns_team_id: Option<String>,
    /// The app's bundle id (`apns-topic`).
    #[arg(long, env = "COURIER_PUSH_APNS_TOPIC")]
    pub push_apns_topic: Option<String>,
    /// Base URL of APNs (HTTP/2 over TLS); the sandbox is
    /// https://api.sandbox.push.apple.com.
    #[arg(
        long,
        env = "COURIER_PUSH_APNS_ENDPOINT",
        default_value = "https://api.push.apple.com"
    )]
    pub push_apns_endpoint: String,
    /// Milliseconds over which a drain (SIGTERM) spreads its 1001 closes;
    /// 0 closes every session at once.
    #[arg(long, env = "COURIER_DRAIN_WINDOW_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=300_000))]
    pub drain_window_ms: u64,
    /// Directory for the store and the token secret.
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Gateway cores (threads, each with its own runtime and listener); 0 = all CPUs.
    #[arg(long, env = "COURIER_CORES", default_value_t = 0)]
    pub cores: usize,
    /// monoio driver.
    #[arg(long, env = "COURIER_DRIVER", value_enum, default_value_t = DriverChoice::Auto)]
    pub driver: DriverChoice,
    /// Node number (0..1023), part of every server id.
    #[arg(long, env = "COURIER_NODE_ID", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..1024))]
    pub node_id: u16,
    /// Largest message body in bytes.
    #[arg(long, env = "COURIER_MAX_BODY", default_value_t = 65536)]
    pub max_body: usize,
    /// Most members a group may have.
    #[arg(long, env = "COURIER_MAX_GROUP_MEMBERS", default_value_t = 512)]
    pub max_group_members: usize,
    /// Most concurrent connections (upgrading or open) from one IP address;
    /// more get HTTP 429. 0: no limit (the default; set it when clients
    /// connect directly rather than through a proxy).
    #[arg(long, env = "COURIER_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: u32,
    /// New connections per second allowed from one IP address (burst: ten
    /// times as many); more get HTTP 429. 0: no limit.
    #[arg(long, env = "COURIER_CONNECT_RATE_PER_IP", default_value_t = 0.0, value_parser = non_negative)]
    pub connect_rate_per_ip: f64,
    /// Most linked devices per user; a session of one more is closed (4006).
    #[arg(long, env = "COURIER_MAX_DEVICES", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_devices: u16,
    /// How long a typing indicator lasts unless renewed, in milliseconds.
    #[arg(long, env = "COURIER_TYPING_TTL_MS", default_value_t = 6000, value_parser = clap::value_parser!(u64).range(1000..=60000))]
    pub typing_ttl_ms: u64,
    /// How long a user with no session left still shows online, so a quick
    /// reconnect is never announced, in milliseconds.
    #[arg(long, env = "COURIER_PRESENCE_DEBOUNCE_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(0..=300000))]
    pub presence_debounce_ms: u64,
    /// Most last-seen records written per second (a mass disconnect is
    /// written at this rate).
    #[arg(long, env = "COURIER_PRESENCE_WRITES_PER_S", default_value_t = 2000.0)]
    pub presence_writes_per_s: f64,
    /// Sustained sends per second allowed per user.
    #[arg(long, env = "COURIER_SEND_RATE", default_value_t = 50.0)]
    pub send_rate: f64,
    /// Burst of sends allowed per user above the sustained rate.
    #[arg(long, env = "COURIER_SEND_BURST", default_value_t = 100.0)]
    pub send_burst: f64,
    /// How long a client id is remembered for idempotent retries, in hours (at least 24).
    #[arg(long, env = "COURIER_DEDUPE_HOURS", default_value_t = 168, value_parser = clap::value_parser!(u64).range(24..))]
    pub dedupe_hours: u64,
    /// Seconds of silence after which the gateway pings a client.
    #[arg(
        long = "ping-interval",
        env = "COURIER_PING_INTERVAL",
        default_value_t = 25
    )]
    pub ping_interval_s: u32,
    /// Seconds of silence after which a session is closed (4004).
    #[arg(
        long = "idle-timeout",
        env = "COURIER_IDLE_TIMEOUT",
        default_value_t = 75
    )]
    pub idle_timeout_s: u32,
    /// Milliseconds a client has to complete the upgrade.
    #[arg(long, env = "COURIER_HANDSHAKE_TIMEOUT_MS", default_value_t = 5000)]
    pub handshake_timeout_ms: u64,
    /// Largest upgrade request (request line and headers) in bytes.
    #[arg(long, env = "COURIER_MAX_HEADER_BYTES", default_value_t = 8192)]
    pub max_header_bytes: usize,
    /// Bytes that may wait in one session's outbound queue before it is
    /// closed as a slow consumer (4003).
    #[arg(long, env = "COURIER_MAX_OUTBOUND_BYTES", default_value_t = 1 << 20)]
    pub max_outbound_bytes: usize,
    /// Bytes that may wait in all outbound queues of the process together.
    /// Over it, typing and presence are dropped for every session and the
    /// sessions with the most queued (over 64 KiB) are closed as slow
    /// consumers (4003), largest first, until the total is under it again;
    /// messages are never dropped (closed sessions catch up). 0: no cap.
    #[arg(long, env = "COURIER_MAX_OUTBOUND_TOTAL_BYTES", default_value_t = 2 << 30)]
    pub max_outbound_total_bytes: usize,
    /// Most sessions this process holds; further upgrades get 503.
    #[arg(long, env = "COURIER_MAX_CONNECTIONS", default_value_t = 1_000_000)]
    pub max_connections: usize,
    /// Microseconds an idle router waits after a first command for more to
    /// join its batch (fewer fsyncs and wake-ups, at most this much latency).
    #[arg(long, env = "COURIER_BATCH_LINGER_US", default_value_t = 0)]
    pub batch_linger_us: u64,
    /// fsync each batch on a thread of its own while the router decides
    /// the next, instead of in the router thread (single node; for disks
    /// whose fsync is slow next to deciding a batch).
    #[arg(long, env = "COURIER_SYNC_THREAD")]
    pub sync_thread: bool,
    /// MiB of the store's block cache (recently read blocks).
    #[arg(long, env = "COURIER_STORE_CACHE_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub store_cache_mib: u64,
    /// MiB all of the store's memtables may hold before the largest are
    /// flushed to disk.
    #[arg(long, env = "COURIER_STORE_WRITE_BUFFER_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub store_write_buffer_mib: u64,
    /// MiB one memtable of the store may hold before it is flushed. Fixed
    /// for each part of the store when the store is created.
    #[arg(long, env = "COURIER_STORE_MEMTABLE_MIB", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub store_memtable_mib: u32,
    /// Niceness of the store's flush and compaction threads (0 to 19; 0:
    /// the same priority as the rest of the process). They run at a lower
    /// priority so their bursts of CPU do not delay live messages.
    #[arg(long, env = "COURIER_STORE_BACKGROUND_NICE", default_value_t = 19, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub store_background_nice: u8,
    /// How the store compacts its dedupe records, written on every send.
    /// Fixed for each of its parts when the store is created.
    #[arg(long, env = "COURIER_STORE_DEDUPE_COMPACTION", value_enum, default_value_t = StoreCompaction::Tiered)]
    pub store_dedupe_compaction: StoreCompaction,
    /// How the store compacts the messages. Fixed for each of its parts
    /// when the store is created.
    #[arg(long, env = "COURIER_STORE_ENTRIES_COMPACTION", value_enum, default_value_t = StoreCompaction::Tiered)]
    pub store_entries_compaction: StoreCompaction,
    /// MiB of the newest messages the router keeps in memory for catch-up
    /// and history (0: none; fleet mode: per partition served).
    #[arg(long, env = "COURIER_RECENT_ENTRIES_MIB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=65536))]
    pub recent_entries_mib: u64,
    /// Browser origins allowed to open a session, comma-separated (for
    /// example `https://chat.example,https://web.chat.example`). Empty:
    /// every origin. A request without an `Origin` header (native apps send
    /// none) is always allowed; a listed origin is matched exactly, ignoring
    /// ASCII case. Others get 403.
    #[arg(long, env = "COURIER_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Serve the browser client's files (`/app/`) on the WebSocket listener
    /// to plain GETs; `false` answers those paths 404 like any other.
    #[arg(long, env = "COURIER_WEB_CLIENT", default_value_t = true, action = clap::ArgAction::Set)]
    pub web_client: bool,
    /// Join other processes already listening on `--listen` (SO_REUSEPORT)
    /// instead of refusing to start.
    #[arg(long, env = "COURIER_SHARE_PORT")]
    pub share_port: bool,
    /// Log filter in `tracing` syntax (`info`, `courier_gateway=debug,info`);
    /// `RUST_LOG`, when set, replaces it. The store's own crates log at warn
    /// by default: their info lines (one per partition on every open) would
    /// flood the log while a full disk makes the router reopen the store.
    #[arg(long, env = "COURIER_LOG_FILTER", default_value = "info,fjall=warn,lsm_tree=warn", value_parser = parse_log_filter)]
    pub log_filter: String,
    /// Log format.
    #[arg(long, env = "COURIER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What this process is: `node` (the single node, the default),
    /// or fleet mode's `gateway` or `router`.
    #[arg(long, env = "COURIER_ROLE", value_enum, default_value_t = Role::Node)]
    pub role: Role,
    /// Fleet mode: NATS server URLs, comma-separated.
    #[arg(
        long,
        env = "COURIER_NATS",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: Vec<String>,
    /// Fleet mode: partitions the conversations are spread over; every
    /// gateway and router of a fleet must agree.
    #[arg(long, env = "COURIER_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub partitions: u16,
    /// Fleet mode: replicas of the changelog stream and the lease bucket
    /// (3 on a 3-server cluster; 1 on a single test server).
    #[arg(long, env = "COURIER_NATS_REPLICAS", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=5))]
    pub nats_replicas: u16,
    /// Fleet mode: milliseconds a router's partition lease lives without a
    /// renewal; a dead router's partitions are taken over after about this.
    #[arg(long, env = "COURIER_LEASE_TTL_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(500..=60_000))]
    pub lease_ttl_ms: u64,
    /// Fleet mode: milliseconds a gateway's liveness key lives without a
    /// refresh (the gateway refreshes it every third of this). Routers
    /// detach a gateway's sessions once its key has expired, so a crashed
    /// gateway's users show offline after about this plus a router scan.
    /// Gateways and routers of a fleet must agree.
    #[arg(long, env = "COURIER_GATEWAY_TTL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub gateway_ttl_ms: u64,
    /// Fleet mode, routers: KiB a partition's changelog grows by before
    /// its store is snapshotted into the log (or by the last snapshot's
    /// size, if larger), so a takeover replays at most about that much
    /// after loading the snapshot.
    #[arg(long, env = "COURIER_SNAPSHOT_MIN_KIB", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    pub snapshot_min_kib: u64,
}

impl ServeArgs {
    /// The core count to run, resolving 0 to the CPUs available.
    pub fn core_count(&self) -> usize {
        match self.cores {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// The drain window.
    pub fn drain_window(&self) -> Duration {
        Duration::from_millis(self.drain_window_ms)
    }

    /// The upgrade deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Largest WebSocket message accepted: the body limit plus room for the
    /// frame's other fields (conversation id, client id, lengths).
    pub fn max_message(&self) -> usize {
        self.max_body + 1024
    }
}

/// Options for `gateway token`.
#[derive(Clone, Debug, Args)]
pub struct TokenArgs {
    /// The user the token is for.
    #[arg(long, value_parser = user_id)]
    pub user: String,
    /// The device number of the user, from 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub device: u32,
    /// Seconds the token stays valid.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: u64,
    /// The node's data directory (where its secret is).
    #[arg(long, env = "COURIER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// The node's TOML configuration file, for its `store.data_dir`.
    #[arg(long, env = "COURIER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// A user id a token may name.
fn user_id(s: &str) -> Result<String, String> {
    match courier_protocol::ids::is_valid_user_id(s) {
        true => Ok(s.to_owned()),
        false => Err("1 to 64 characters of [A-Za-z0-9._@+-]".into()),
    }
}

/// A finite number, 0 or more.
fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of 0 or more")),
    }
}

/// Accepts what `tracing_subscriber::EnvFilter` accepts.
fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}
