//! Command-line flags and the typed configuration a run is started with.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use courier_protocol::token::Secret;

use crate::body::HEADER_LEN;
use crate::handshake::{Target, TokenIn, UrlError};
use crate::plan::{BodySizes, PhasePlan, PlanParams};
use crate::threshold::Threshold;

/// Sockets one worker process holds at most when `--workers` is not given
/// (the per-process descriptor limit here is 20,000; the rest is loadgen's
/// own reserve and a margin).
pub const CONNECTIONS_PER_PROCESS: u32 = 18_000;

/// Drive real WebSocket clients against a Courier node and check that every
/// acknowledged message arrived exactly once, in order.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about,
    long_about = None,
    after_help = "Other commands (each with its own --help):\n  \
        loadgen size REPORT.json   size a fleet from a saved --report\n  \
        loadgen push ...           push notifications under load, checked end to end\n  \
        loadgen peer ...           Courier and peer servers measured in their own protocols"
)]
pub struct Args {
    /// The gateway to load (ws:// on a loopback address).
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    pub url: String,
    /// The node's data directory; its jwt.secret signs loadgen's tokens.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Connections to open, one user (device 1) each.
    #[arg(long, default_value_t = 1000)]
    pub connections: u32,
    /// Messages per second over all senders; 0 holds the connections idle,
    /// heartbeating.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long traffic runs, e.g. 30s, 2m, 1m30s, 500ms.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// New connections per second while connecting, over all workers
    /// (also `--ramp-rate`).
    #[arg(long, alias = "ramp-rate", default_value_t = 2000.0)]
    pub ramp: f64,
    /// Share of messages sent to a group (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    pub group_share: f64,
    /// Groups to create [default: connections / group-mean, so each user is
    /// in about one group].
    #[arg(long)]
    pub groups: Option<u32>,
    /// Smallest group.
    #[arg(long, default_value_t = 3)]
    pub group_min: u32,
    /// Largest group.
    #[arg(long, default_value_t = 200)]
    pub group_max: u32,
    /// Mean group size the size distribution is fitted to.
    #[arg(long, default_value_t = 20.0)]
    pub group_mean: f64,
    /// Bytes in each message body (at least 28: loadgen's stamp); the mean
    /// when --body-min or --body-max draw sizes.
    #[arg(long, default_value_t = 200)]
    pub body_bytes: usize,
    /// Smallest body when sizes are drawn [default: --body-bytes].
    #[arg(long)]
    pub body_min: Option<u32>,
    /// Largest body when sizes are drawn [default: --body-bytes].
    #[arg(long)]
    pub body_max: Option<u32>,
    /// Share of delivered messages the recipient marks read.
    #[arg(long, default_value_t = 0.0)]
    pub read_share: f64,
    /// Share of messages whose sender sends `Typing` just before.
    #[arg(long, default_value_t = 0.0)]
    pub typing_share: f64,
    /// Write the JSON report here (and the HTML report beside it, with
    /// .html for .json).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// A scenario file (TOML): connections, ramp, phases, mix, thresholds.
    /// Flags given on the command line override its values.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// A threshold such as `e2e_p99_ms < 50` or `lost == 0`; repeatable.
    #[arg(long = "threshold", value_name = "EXPR")]
    pub thresholds: Vec<String>,
    /// Worker processes to spread the connections over [default: enough
    /// that each holds at most 18,000].
    #[arg(long)]
    pub workers: Option<u32>,
    /// Source addresses in 127.0.0.0/8 to bind connections to:
    /// `127.0.1.1-127.0.1.64`, a list `a,b,c`, or a count (from 127.0.1.1)
    /// [default: the kernel's choice, or enough addresses for the
    /// ephemeral port range when the connections need them].
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// The gateway's process ids, for memory and CPU measurements.
    #[arg(long, value_delimiter = ',')]
    pub gateway_pid: Vec<u32>,
    /// The gateway's metrics endpoint, read for process_resident_memory_bytes
    /// and process_cpu_seconds_total when no --gateway-pid is given.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Seed of the plan and schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run id in hex, part of every user name [default: random, so each run
    /// has fresh users].
    #[arg(long, value_parser = parse_run_id)]
    pub run_id: Option<u32>,
    /// Runtime threads, each owning a share of the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Use monoio's legacy (epoll) driver even where io_uring works.
    #[arg(long)]
    pub legacy: bool,
    /// Reconnect dropped connections (with backoff), catch up and resend
    /// what was not acked.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub reconnect: bool,
    /// After traffic, wait at most this long for SENTs and deliveries still
    /// in flight.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Give up connecting after this long past the ramp.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub setup_timeout: Duration,
    /// Where the token goes in the upgrade request.
    #[arg(long, value_enum, default_value_t = TokenIn::Header)]
    pub token_in: TokenIn,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// A value that stops the start, naming the flag.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// `--url` is not a usable target.
    #[error("--url: {0}")]
    Url(#[from] UrlError),
    /// The scenario file is unreadable or invalid.
    #[error("--scenario {path}: {why}")]
    Scenario {
        /// The file.
        path: String,
        /// What is wrong, naming the key.
        why: String,
    },
    /// A number is out of its range.
    #[error("--{flag}: {why}")]
    Range {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Everything a run needs. [`Config::default`] is what `loadgen` with no
/// flags runs. It crosses the pipe to worker processes as JSON (all but the
/// secret, which travels beside it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// The gateway.
    #[serde(with = "target_url")]
    pub target: Target,
    /// Where `jwt.secret` is read from when `secret` is `None`.
    pub data_dir: PathBuf,
    /// The signing secret, when the caller has it (tests).
    #[serde(skip)]
    pub secret: Option<Secret>,
    /// Connections (users) to open.
    pub connections: u32,
    /// Messages per second (0: idle).
    pub rate: f64,
    /// Traffic duration.
    pub duration: Duration,
    /// Connections opened per second.
    pub ramp: f64,
    /// Share of messages to groups.
    pub group_share: f64,
    /// Groups to create (None: connections / group_mean).
    pub groups: Option<u32>,
    /// Smallest group.
    pub group_min: u32,
    /// Largest group.
    pub group_max: u32,
    /// Target mean group size.
    pub group_mean: f64,
    /// Body size in bytes.
    pub body_bytes: usize,
    /// Seed of the plan.
    pub seed: u64,
    /// Run id (None: random).
    pub run_id: Option<u32>,
    /// Runtime threads.
    pub threads: usize,
    /// Force the legacy driver.
    pub legacy: bool,
    /// Reconnect dropped connections.
    pub reconnect: bool,
    /// Longest wait after traffic.
    pub drain: Duration,
    /// Longest wait for connections past the ramp.
    pub setup_timeout: Duration,
    /// Where the token goes.
    pub token_in: TokenIn,
    /// Print the live progress line.
    pub progress: bool,
    /// The traffic phases (empty: one phase of `rate`, `duration` and
    /// `group_share`).
    pub phases: Vec<PhasePlan>,
    /// Smallest and largest body when sizes are drawn around `body_bytes`
    /// (None: every body is `body_bytes`).
    pub body_min: Option<u32>,
    /// See `body_min`.
    pub body_max: Option<u32>,
    /// Read share of the single phase built from the flags.
    pub read_share: f64,
    /// Typing share of the single phase built from the flags.
    pub typing_share: f64,
    /// Worker processes (None: one per 18,000 connections, in-process
    /// threads when that is one).
    pub workers: Option<u32>,
    /// Source addresses connections bind to (empty: the kernel's choice).
    pub source_addrs: Vec<Ipv4Addr>,
    /// Thresholds judged against the report.
    pub thresholds: Vec<Threshold>,
    /// Gateway processes to measure.
    pub gateway_pids: Vec<u32>,
    /// Metrics endpoint to measure when no pid is given.
    pub metrics_url: Option<String>,
    /// The `loadgen` binary worker processes are started from (None: this
    /// executable, which must then be `loadgen`).
    pub worker_exe: Option<PathBuf>,
    /// The scenario's name, when one was loaded.
    pub scenario: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        // The defaults of `Args` are valid; parsing them cannot fail.
        Args::parse_from(["loadgen"])
            .into_config()
            .expect("default flags are valid")
    }
}

impl Args {
    /// Checks the flags and builds the configuration.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let range = |flag: &'static str, why: String| Err(ConfigError::Range { flag, why });
        if self.connections < 2 {
            return range(
                "connections",
                "at least 2 (a conversation needs two users)".into(),
            );
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return range("rate", format!("must be 0 or more, got {}", self.rate));
        }
        if !(self.ramp > 0.0 && self.ramp.is_finite()) {
            return range("ramp", format!("must be more than 0, got {}", self.ramp));
        }
        if !(0.0..=1.0).contains(&self.group_share) {
            return range(
                "group-share",
                format!("must be between 0 and 1, got {}", self.group_share),
            );
        }
        if self.group_min < 3 || self.group_min > self.group_max {
            return range(
                "group-min",
                format!(
                    "need 3 <= group-min <= group-max, got {}..{}",
                    self.group_min, self.group_max
                ),
            );
        }
        if !(self.group_mean >= f64::from(self.group_min)
            && self.group_mean <= f64::from(self.group_max))
        {
            return range(
                "group-mean",
                format!("must lie in {}..={}", self.group_min, self.group_max),
            );
        }
        if self.body_bytes < HEADER_LEN {
            return range(
                "body-bytes",
                format!("at least {HEADER_LEN} (the stamp loadgen checks bodies by)"),
            );
        }
        if self.threads == 0 {
            return range("threads", "at least 1".into());
        }
        if self.duration.is_zero() {
            return range("duration", "must be more than 0".into());
        }
        if !(0.0..=1.0).contains(&self.read_share) {
            return range(
                "read-share",
                format!("must be between 0 and 1, got {}", self.read_share),
            );
        }
        if !(0.0..=1.0).contains(&self.typing_share) {
            return range(
                "typing-share",
                format!("must be between 0 and 1, got {}", self.typing_share),
            );
        }
        let mean = self.body_bytes as u32;
        let (bmin, bmax) = (self.body_min.unwrap_or(mean), self.body_max.unwrap_or(mean));
        if (bmin as usize) < HEADER_LEN || bmin > mean || mean > bmax {
            return range(
                "body-min",
                format!("need {HEADER_LEN} <= body-min <= body-bytes <= body-max, got {bmin}, {mean}, {bmax}"),
            );
        }
        if self.workers == Some(0) {
            return range("workers", "at least 1".into());
        }
        let source_addrs = match &self.source_addrs {
            Some(spec) => parse_source_addrs(spec).map_err(|why| ConfigError::Range {
                flag: "source-addrs",
                why,
            })?,
            None => Vec::new(),
        };
        let mut thresholds = Vec::with_capacity(self.thresholds.len());
        for t in &self.thresholds {
            thresholds.push(Threshold::parse(t).map_err(|why| ConfigError::Range {
                flag: "threshold",
                why,
            })?);
        }
        if let Some(url) = &self.metrics_url {
            crate::probe::parse_metrics_url(url).map_err(|why| ConfigError::Range {
                flag: "metrics-url",
                why,
            })?;
        }
        Ok(Config {
            target: Target::parse(&self.url)?,
            data_dir: self.data_dir,
            secret: None,
            connections: self.connections,
            rate: self.rate,
            duration: self.duration,
            ramp: self.ramp,
            group_share: self.group_share,
            groups: self.groups,
            group_min: self.group_min,
            group_max: self.group_max,
            group_mean: self.group_mean,
            body_bytes: self.body_bytes,
            seed: self.seed,
            run_id: self.run_id,
            threads: self.threads,
            legacy: self.legacy,
            reconnect: self.reconnect,
            drain: self.drain,
            setup_timeout: self.setup_timeout,
            token_in: self.token_in,
            progress: !self.quiet,
            phases: Vec::new(),
            body_min: self.body_min,
            body_max: self.body_max,
            read_share: self.read_share,
            typing_share: self.typing_share,
            workers: self.workers,
            source_addrs,
            thresholds,
            gateway_pids: self.gateway_pid,
            metrics_url: self.metrics_url,
            worker_exe: None,
            scenario: None,
        })
    }
}

impl Config {
    /// The plan parameters for run `run_id`.
    pub fn plan_params(&self, run_id: u32) -> PlanParams {
        PlanParams {
            run_id,
            seed: self.seed,
            users: self.connections,
            groups: self.groups,
            group_min: self.group_min,
            group_max: self.group_max,
            group_mean: self.group_mean,
            group_share: self.group_share,
            rate: self.rate,
            duration: self.duration,
            phases: self.phase_plans(),
            body: self.body_sizes(),
        }
    }

    /// The phases of the run: the scenario's, or one built from the flags.
    pub fn phase_plans(&self) -> Vec<PhasePlan> {
        if !self.phases.is_empty() {
            return self.phases.clone();
        }
        vec![PhasePlan {
            name: "traffic".into(),
            duration: self.duration,
            rate: self.rate,
            group_share: self.group_share,
            read_share: self.read_share,
            typing_share: self.typing_share,
            churn_per_s: 0.0,
        }]
    }

    /// The body sizes of the run.
    pub fn body_sizes(&self) -> BodySizes {
        let mean = self.body_bytes as u32;
        BodySizes {
            min: self.body_min.unwrap_or(mean),
            mean: self.body_bytes as f64,
            max: self.body_max.unwrap_or(mean),
        }
    }

    /// Worker processes the run uses (1: the workers are threads of this
    /// process).
    pub fn worker_processes(&self) -> u32 {
        self.workers
            .unwrap_or_else(|| self.connections.div_ceil(CONNECTIONS_PER_PROCESS))
            .clamp(1, self.connections.max(1))
    }

    /// The configuration as the report prints it.
    pub fn echo(&self, run_id: u32) -> ConfigEcho {
        ConfigEcho {
            url: self.target.url.clone(),
            run_id: format!("{run_id:08x}"),
            connections: self.connections,
            // With phases: their mean rate and whole length.
            rate: if self.phases.is_empty() {
                self.rate
            } else {
                let secs: f64 = self.phases.iter().map(|p| p.duration.as_secs_f64()).sum();
                let msgs: f64 = self
                    .phases
                    .iter()
                    .map(|p| (p.rate * p.duration.as_secs_f64()).floor())
                    .sum();
                msgs / secs.max(1e-9)
            },
            duration_s: self
                .phase_plans()
                .iter()
                .map(|p| p.duration.as_secs_f64())
                .sum(),
            ramp: self.ramp,
            group_share: self.group_share,
            groups: self.groups,
            group_min: self.group_min,
            group_max: self.group_max,
            group_mean: self.group_mean,
            body_bytes: self.body_bytes,
            seed: self.seed,
            threads: self.threads,
            legacy: self.legacy,
            reconnect: self.reconnect,
            drain_s: self.drain.as_secs_f64(),
            setup_timeout_s: self.setup_timeout.as_secs_f64(),
            token_in: self.token_in,
            workers: self.worker_processes(),
            source_addrs: self.source_addrs.iter().map(|a| a.to_string()).collect(),
            body_min: self.body_sizes().min,
            body_max: self.body_sizes().max,
            scenario: self.scenario.clone(),
            thresholds: self.thresholds.iter().map(|t| t.expr.clone()).collect(),
            gateway_pids: self.gateway_pids.clone(),
        }
    }
}

/// The run's configuration, as written into the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[allow(missing_docs)]
pub struct ConfigEcho {
    pub url: String,
    pub run_id: String,
    pub connections: u32,
    pub rate: f64,
    pub duration_s: f64,
    pub ramp: f64,
    pub group_share: f64,
    pub groups: Option<u32>,
    pub group_min: u32,
    pub group_max: u32,
    pub group_mean: f64,
    pub body_bytes: usize,
    pub seed: u64,
    pub threads: usize,
    pub legacy: bool,
    pub reconnect: bool,
    pub drain_s: f64,
    pub setup_timeout_s: f64,
    pub token_in: TokenIn,
    pub workers: u32,
    pub source_addrs: Vec<String>,
    pub body_min: u32,
    pub body_max: u32,
    pub scenario: Option<String>,
    pub thresholds: Vec<String>,
    pub gateway_pids: Vec<u32>,
}

/// Parses `90`, `90s`, `500ms`, `2m`, `1h`, `1m30s`: a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_duration(secs, s);
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("`{s}`: expected a number before `{rest}`"));
        }
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: bad number"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "" => {
                return Err(format!(
                    "`{s}`: a unit (ms, s, m, h) must follow every number but a lone one"
                ))
            }
            u => return Err(format!("`{s}`: unknown unit `{u}` (use ms, s, m or h)")),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    secs_to_duration(total, s)
}

fn secs_to_duration(secs: f64, s: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is not a duration"))
}

/// Parses `--source-addrs`: `127.0.1.1-127.0.1.64`, `a,b,c`, or a count of
/// addresses from 127.0.1.1. Every address must be in 127.0.0.0/8.
pub fn parse_source_addrs(spec: &str) -> Result<Vec<Ipv4Addr>, String> {
    const MAX: usize = 1 << 16;
    let spec = spec.trim();
    let addr = |s: &str| -> Result<Ipv4Addr, String> {
        let a: Ipv4Addr = s
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not an IPv4 address", s.trim()))?;
        if a.octets()[0] != 127 {
            return Err(format!("{a} is not a loopback address (127.0.0.0/8)"));
        }
        Ok(a)
    };
    let list = if let Ok(n) = spec.parse::<u32>() {
        if n == 0 || n as usize > MAX {
            return Err(format!("a count must be 1 to {MAX}, got {n}"));
        }
        let first = u32::from(Ipv4Addr::new(127, 0, 1, 1));
        (0..n).map(|k| Ipv4Addr::from(first + k)).collect()
    } else if let Some((a, b)) = spec.split_once('-') {
        let (a, b) = (u32::from(addr(a)?), u32::from(addr(b)?));
        if a > b {
            return Err(format!("range `{spec}` runs backwards"));
        }
        if (b - a) as usize >= MAX {
            return Err(format!("range `{spec}` holds more than {MAX} addresses"));
        }
        (a..=b).map(Ipv4Addr::from).collect()
    } else {
        spec.split(',').map(addr).collect::<Result<Vec<_>, _>>()?
    };
    if list
        .iter()
        .any(|a| a.octets()[3] == 0 || a.octets()[3] == 255)
    {
        return Err("addresses ending in .0 or .255 cannot be bound".into());
    }
    Ok(list)
}

/// `Target` as its URL in JSON.
mod target_url {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::handshake::Target;

    pub fn serialize<S: Serializer>(t: &Target, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.url)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Target, D::Error> {
        let url = String::deserialize(d)?;
        Target::parse(&url).map_err(serde::de::Error::custom)
    }
}

fn parse_run_id(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 16).map_err(|_| format!("`{s}` is not a hex number of at most 8 digits"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["loadgen"];
        all.extend_from_slice(args);
        let args = Args::try_parse_from(all).map_err(|e| e.to_string())?;
        args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration(" 10s "), Ok(Duration::from_secs(10)));
        for bad in ["", "s", "10x", "1m30", "-5s", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.target.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(
            (c.connections, c.rate, c.duration),
            (1000, 1000.0, Duration::from_secs(30))
        );
        assert_eq!((c.ramp, c.group_share, c.body_bytes), (2000.0, 0.2, 200));
        assert_eq!((c.group_min, c.group_max, c.group_mean), (3, 200, 20.0));
        assert_eq!(
            (c.threads, c.legacy, c.reconnect, c.progress),
            (1, false, true, true)
        );
        assert_eq!(c.drain, Duration::from_secs(5));
        assert_eq!(c.token_in, TokenIn::Header);
        assert_eq!(Config::default().connections, 1000);
    }

    #[test]
    fn everyday_flags() {
        let c = parse(&[
            "--connections",
            "10000",
            "--rate",
            "5000",
            "--duration",
            "60s",
            "--threads",
            "2",
            "--reconnect",
            "false",
            "--run-id",
            "beef",
            "--legacy",
            "--token-in",
            "query",
            "--quiet",
        ])
        .unwrap();
        assert_eq!(
            (c.connections, c.rate, c.duration),
            (10_000, 5000.0, Duration::from_secs(60))
        );
        assert_eq!(
            (c.threads, c.reconnect, c.run_id, c.legacy),
            (2, false, Some(0xbeef), true)
        );
        assert_eq!((c.token_in, c.progress), (TokenIn::Query, false));
        assert_eq!(parse(&["--rate", "0"]).unwrap().rate, 0.0);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--connections", "1"], "--connections"),
            (&["--rate=-1"], "--rate"),
            (&["--group-share", "1.5"], "--group-share"),
            (&["--group-min", "2"], "--group-min"),
            (&["--group-mean", "500"], "--group-mean"),
            (&["--body-bytes", "10"], "--body-bytes"),
            (&["--threads", "0"], "--threads"),
            (&["--url", "ws://192.168.1.1:8080/"], "--url"),
            (&["--duration", "soon"], "--duration"),
            (&["--ramp", "0"], "--ramp"),
        ];
        for (args, flag) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }
}
