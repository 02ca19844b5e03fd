//! Fleet sizing from a run's measurements: how many gateway and router
//! nodes of a stated server size serve a stated peak.
//!
//! ```text
//!  report.measurements ──► Measured (bytes per connection, CPU per
//!  (marks: start,          delivery, idle CPU per connection, fan-out)
//!   connected, phases,          │
//!   drained)                    ▼
//!                    Assumptions (peak connections, messages/s, server
//!                    cores and memory, headroom, ...: flags, defaults
//!                    printed)
//!                               │
//!                               ▼
//!                    SizingResult: every figure with the line it came from
//! ```
//!
//! Nothing here is a constant of its own: a figure is measured (and says
//! from which marks), an assumption (and names the flag that changes it),
//! or derived from those (and says how). A figure that could not be
//! measured leaves the number it drives unset, with the reason, unless it
//! is given as a flag.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::probe::Sample;
use crate::report::Report;

/// What the run measured; each `None` when it could not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Measured {
    /// Connections up at the idle mark.
    pub connections: Option<u64>,
    /// The mark the memory figures are read at: the end of the last phase
    /// at rate 0 (after a full heartbeat cycle when it lasts long enough),
    /// else `connected`.
    pub idle_mark: Option<String>,
    /// Gateway RSS before any connection.
    pub gateway_rss_base_bytes: Option<f64>,
    /// Gateway RSS growth per connection from `start` to the idle mark.
    pub gateway_bytes_per_connection: Option<f64>,
    /// Kernel memory growth (slab plus TCP buffer pages) per connection
    /// from `start` to the idle mark. On loopback this holds both ends.
    pub kernel_bytes_per_loopback_pair: Option<f64>,
    /// `core-*` threads of the gateway processes.
    pub gateway_cores: Option<u32>,
    /// Connections held per gateway core in this run (a density reached,
    /// not a limit found).
    pub connections_per_core: Option<f64>,
    /// Gateway CPU per idle connection per hour, in seconds (heartbeats),
    /// over the last rate-0 phase.
    pub idle_cpu_s_per_connection_hour: Option<f64>,
    /// The same for the `core-*` threads only.
    pub idle_core_cpu_s_per_connection_hour: Option<f64>,
    /// Deliveries counted from the first traffic phase's start to `drained`.
    pub deliveries: Option<u64>,
    /// Gateway process CPU per million deliveries over that window, the
    /// idle cost of the connections taken out.
    pub cpu_s_per_million_deliveries: Option<f64>,
    /// The `core-*` threads' part (the connection tier).
    pub core_cpu_s_per_million_deliveries: Option<f64>,
    /// The rest: the embedded router, its store and fsync threads.
    pub router_cpu_s_per_million_deliveries: Option<f64>,
    /// Deliveries per acked message.
    pub fanout: Option<f64>,
}

/// The peak to size for and the server to size with. Every field is a
/// `loadgen size` flag of the same name (dashes for underscores).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct Assumptions {
    /// Concurrent connections at peak.
    #[arg(long, default_value_t = 300e6)]
    pub connections: f64,
    /// Messages sent per second at peak.
    #[arg(long, default_value_t = 3e6)]
    pub msgs_per_s: f64,
    /// Daily users (only to show the average rate and peak factor).
    #[arg(long, default_value_t = 1e9)]
    pub daily_users: f64,
    /// Messages per user per day (same).
    #[arg(long, default_value_t = 80.0)]
    pub msgs_per_user_day: f64,
    /// Cores per server.
    #[arg(long, default_value_t = 32.0)]
    pub server_cores: f64,
    /// Memory per server, GiB.
    #[arg(long, default_value_t = 128.0)]
    pub server_mem_gib: f64,
    /// Memory per server kept for the OS and everything else, GiB.
    #[arg(long, default_value_t = 4.0)]
    pub os_reserve_gib: f64,
    /// Share of every resource left unused at peak (0 to 1).
    #[arg(long, default_value_t = 0.3)]
    pub headroom: f64,
    /// Share of a loopback pair's kernel memory that is the server's end.
    #[arg(long, default_value_t = 0.5)]
    pub kernel_server_share: f64,
    /// Deliveries per message [default: measured].
    #[arg(long)]
    pub fanout: Option<f64>,
    /// Gateway bytes per connection [default: measured].
    #[arg(long)]
    pub gateway_bytes_per_conn: Option<f64>,
    /// Kernel bytes per loopback pair [default: measured].
    #[arg(long)]
    pub kernel_bytes_per_pair: Option<f64>,
    /// Connection-tier CPU per delivery, µs [default: measured].
    #[arg(long)]
    pub gateway_cpu_us_per_delivery: Option<f64>,
    /// Router CPU per delivery, µs [default: measured].
    #[arg(long)]
    pub router_cpu_us_per_delivery: Option<f64>,
    /// Gateway CPU per idle connection per hour, s [default: measured].
    #[arg(long)]
    pub idle_cpu_s_per_conn_hour: Option<f64>,
}

impl Default for Assumptions {
    fn default() -> Self {
        Self {
            connections: 300e6,
            msgs_per_s: 3e6,
            daily_users: 1e9,
            msgs_per_user_day: 80.0,
            server_cores: 32.0,
            server_mem_gib: 128.0,
            os_reserve_gib: 4.0,
            headroom: 0.3,
            kernel_server_share: 0.5,
            fanout: None,
            gateway_bytes_per_conn: None,
            kernel_bytes_per_pair: None,
            gateway_cpu_us_per_delivery: None,
            router_cpu_us_per_delivery: None,
            idle_cpu_s_per_conn_hour: None,
        }
    }
}

/// One figure of the sizing and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// What it is.
    pub what: String,
    /// Its value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// `measured: …`, `assumption: --flag`, `given: --flag` or
    /// `derived: formula`.
    pub from: String,
}

/// The sizing's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SizingResult {
    /// Gateway nodes (the larger of the memory and CPU bounds).
    pub gateway_nodes: Option<u64>,
    /// Gateway nodes memory alone needs.
    pub gateway_nodes_for_memory: Option<u64>,
    /// Gateway nodes CPU alone needs.
    pub gateway_nodes_for_cpu: Option<u64>,
    /// Router nodes (CPU-bound).
    pub router_nodes: Option<u64>,
    /// Connections per gateway node at peak.
    pub connections_per_gateway_node: Option<f64>,
    /// Every figure, in the order it was worked out.
    pub lines: Vec<Line>,
    /// What is missing for a number left unset.
    pub missing: Vec<String>,
}

/// The report's sizing section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sizing {
    /// What the run measured.
    pub measured: Measured,
    /// What the result assumes.
    pub assumptions: Assumptions,
    /// The result.
    pub result: SizingResult,
}

impl Sizing {
    /// The sizing of a finished run under `a`.
    pub fn from_report(report: &Report, a: &Assumptions) -> Self {
        let rate_of = |label: &str| {
            report
                .phases
                .iter()
                .find(|p| p.name == label)
                .map(|p| p.rate)
        };
        let fanout = (report.acked > 0).then(|| report.delivered as f64 / report.acked as f64);
        let measured = measure(&report.measurements, &rate_of, fanout);
        Self::compute(measured, a)
    }

    /// The sizing of `measured` under `a`.
    pub fn compute(measured: Measured, a: &Assumptions) -> Self {
        let result = work_out(&measured, a);
        Self {
            measured,
            assumptions: a.clone(),
            result,
        }
    }

    /// The sizing as text, one figure a line with its source.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "fleet sizing");
        for l in &self.result.lines {
            let _ = writeln!(
                s,
                "  {:<48} {:>16} {:<10} {}",
                l.what,
                num(l.value),
                l.unit,
                l.from
            );
        }
        for m in &self.result.missing {
            let _ = writeln!(s, "  not computed: {m}");
        }
        let r = &self.result;
        let show = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "  => {} gateway nodes (memory {}, CPU {}), {} router nodes",
            show(r.gateway_nodes),
            show(r.gateway_nodes_for_memory),
            show(r.gateway_nodes_for_cpu),
            show(r.router_nodes)
        );
        if let Some(caution) = self.measured.caution() {
            let _ = writeln!(s, "  caution: {caution}");
        }
        s
    }
}

/// Below these a run's per-connection and per-delivery figures are mostly
/// fixed costs and noise (docs/loadgen.md).
const SMALL_RUN_CONNECTIONS: u64 = 10_000;
const SMALL_RUN_DELIVERIES: u64 = 1_000_000;

impl Measured {
    /// Why the sizing of this run should not be trusted, if it should not.
    pub fn caution(&self) -> Option<String> {
        let few_connections = self
            .connections
            .filter(|&c| c < SMALL_RUN_CONNECTIONS)
            .map(|c| format!("{c} connections"));
        let few_deliveries = self
            .deliveries
            .filter(|&d| d < SMALL_RUN_DELIVERIES)
            .map(|d| format!("{d} deliveries"));
        let small: Vec<String> = few_connections.into_iter().chain(few_deliveries).collect();
        (!small.is_empty()).then(|| {
            format!(
                "measured on {}: a run this small is mostly fixed costs and noise; size from \
                 one of at least {SMALL_RUN_CONNECTIONS} connections and {SMALL_RUN_DELIVERIES} \
                 deliveries",
                small.join(" and ")
            )
        })
    }
}

/// A number for people: integers plain, small values with digits.
fn num(v: f64) -> String {
    if v.abs() >= 1000.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Reads the measured figures out of the marks. `rate_of(label)` is the
/// rate of the phase a mark ends (None for `start`, `connected`, `drained`).
fn measure(
    marks: &[Sample],
    rate_of: &dyn Fn(&str) -> Option<f64>,
    fanout: Option<f64>,
) -> Measured {
    let mut m = Measured {
        fanout,
        ..Measured::default()
    };
    let Some(start) = marks.iter().find(|s| s.label == "start") else {
        return m;
    };
    // The idle mark: end of the last rate-0 phase, else `connected`.
    let idle_at = marks
        .iter()
        .rposition(|s| rate_of(&s.label) == Some(0.0))
        .or_else(|| marks.iter().position(|s| s.label == "connected"));
    let Some(idle_at) = idle_at else { return m };
    let idle = &marks[idle_at];
    let conns = idle.connections_up;
    m.connections = Some(conns);
    m.idle_mark = Some(idle.label.clone());
    let per_conn = |bytes: f64| (conns > 0).then(|| bytes / conns as f64);
    if let (Some(g0), Some(g1)) = (&start.gateway, &idle.gateway) {
        m.gateway_rss_base_bytes = Some(g0.rss_bytes as f64);
        m.gateway_bytes_per_connection = per_conn(g1.rss_bytes as f64 - g0.rss_bytes as f64);
        if g1.core_threads > 0 {
            m.gateway_cores = Some(g1.core_threads);
            m.connections_per_core = Some(conns as f64 / f64::from(g1.core_threads));
        }
    }
    if let (Some(k0), Some(k1)) = (&start.kernel, &idle.kernel) {
        let slab = k1.slab_bytes as f64 - k0.slab_bytes as f64;
        let tcp = (k1.tcp_mem_pages as f64 - k0.tcp_mem_pages as f64) * k1.page_size as f64;
        m.kernel_bytes_per_loopback_pair = per_conn(slab + tcp);
    }

    // Idle CPU: over the last rate-0 phase that follows another mark.
    let idle_cpu = (idle_at > 0 && rate_of(&idle.label) == Some(0.0))
        .then(|| (&marks[idle_at - 1], idle))
        .and_then(|(a, b)| {
            let (ga, gb) = (a.gateway.as_ref()?, b.gateway.as_ref()?);
            let secs = b.at_s - a.at_s;
            let conns = b.connections_up.max(1) as f64;
            let rate = |c: f64| c / secs / conns * 3600.0;
            let core = match (ga.core_threads_cpu_s, gb.core_threads_cpu_s) {
                (Some(x), Some(y)) => Some(rate(y - x)),
                _ => None,
            };
            (secs > 0.0).then(|| (rate(gb.cpu_s - ga.cpu_s), core))
        });
    if let Some((all, core)) = idle_cpu {
        m.idle_cpu_s_per_connection_hour = Some(all);
        m.idle_core_cpu_s_per_connection_hour = core;
    }

    // Traffic: from the mark before the first phase with messages to `drained`.
    let first_traffic = marks
        .iter()
        .position(|s| rate_of(&s.label).is_some_and(|r| r > 0.0));
    let drained = marks.iter().rposition(|s| s.label == "drained");
    if let (Some(ft), Some(dr)) = (first_traffic, drained) {
        let (a, b) = (&marks[ft.saturating_sub(1)], &marks[dr]);
        let deliveries = b.delivered.saturating_sub(a.delivered);
        m.deliveries = Some(deliveries);
        if let (Some(ga), Some(gb), true) = (&a.gateway, &b.gateway, deliveries > 0) {
            let secs = b.at_s - a.at_s;
            // Hold-only cost of the connections over the window.
            let conns = b.connections_up.max(a.connections_up) as f64;
            let base = |per_hour: Option<f64>| per_hour.unwrap_or(0.0) * conns * secs / 3600.0;
            let per_m = |cpu: f64| (cpu.max(0.0) / deliveries as f64) * 1e6;
            let all = gb.cpu_s - ga.cpu_s;
            m.cpu_s_per_million_deliveries =
                Some(per_m(all - base(m.idle_cpu_s_per_connection_hour)));
            if let (Some(ca), Some(cb)) = (ga.core_threads_cpu_s, gb.core_threads_cpu_s) {
                let core = cb - ca;
                let idle_core = base(m.idle_core_cpu_s_per_connection_hour);
                let idle_rest = base(m.idle_cpu_s_per_connection_hour) - idle_core;
                m.core_cpu_s_per_million_deliveries = Some(per_m(core - idle_core));
                m.router_cpu_s_per_million_deliveries =
                    Some(per_m(all - core - idle_rest.max(0.0)));
            }
        }
    }
    m
}

/// The sizing arithmetic. Each step pushes the line it used.
fn work_out(m: &Measured, a: &Assumptions) -> SizingResult {
    let mut r = SizingResult::default();
    let mut line = |what: &str, value: f64, unit: &str, from: String| {
        r.lines.push(Line {
            what: what.into(),
            value,
            unit: unit.into(),
            from,
        });
        value
    };
    let assumed = |flag: &str| format!("assumption: --{flag}");
    let pick = |given: Option<f64>, flag: &str, measured: Option<f64>, how: &str| match given {
        Some(v) => Some((v, format!("given: --{flag}"))),
        None => measured.map(|v| (v, format!("measured: {how}"))),
    };

    // The peak.
    let conns = line(
        "peak concurrent connections",
        a.connections,
        "",
        assumed("connections"),
    );
    let msgs = line(
        "peak messages sent per second",
        a.msgs_per_s,
        "msg/s",
        assumed("msgs-per-s"),
    );
    let avg = line(
        "average messages per second over a day",
        a.daily_users * a.msgs_per_user_day / 86_400.0,
        "msg/s",
        "derived: --daily-users x --msgs-per-user-day / 86400".into(),
    );
    if avg > 0.0 {
        line(
            "peak / average",
            msgs / avg,
            "x",
            "derived: --msgs-per-s / average".into(),
        );
    }
    let fanout = pick(
        a.fanout,
        "fanout",
        m.fanout,
        "deliveries / acked in this run",
    );
    let deliveries = fanout.map(|(f, from)| {
        line("deliveries per message", f, "", from);
        line(
            "peak deliveries per second",
            msgs * f,
            "/s",
            "derived: messages/s x deliveries per message".into(),
        )
    });

    // The server.
    let cores = line(
        "server cores",
        a.server_cores,
        "cores",
        assumed("server-cores"),
    );
    let mem = line(
        "server memory",
        a.server_mem_gib,
        "GiB",
        assumed("server-mem-gib"),
    );
    let reserve = line(
        "memory kept for the OS",
        a.os_reserve_gib,
        "GiB",
        assumed("os-reserve-gib"),
    );
    let headroom = line(
        "headroom (share of each resource unused)",
        a.headroom,
        "",
        assumed("headroom"),
    );
    let usable_cores = line(
        "usable cores per node",
        cores * (1.0 - headroom),
        "cores",
        "derived: cores x (1 - headroom)".into(),
    );

    // Memory per connection.
    let gw_bytes = pick(
        a.gateway_bytes_per_conn,
        "gateway-bytes-per-conn",
        m.gateway_bytes_per_connection,
        "gateway RSS delta / connections",
    );
    let pair = pick(
        a.kernel_bytes_per_pair,
        "kernel-bytes-per-pair",
        m.kernel_bytes_per_loopback_pair,
        "kernel slab + TCP pages delta / connections (both loopback ends)",
    );
    let base = m.gateway_rss_base_bytes.unwrap_or(0.0);
    match (gw_bytes, pair) {
        (Some((g, gf)), Some((p, pf))) => {
            line("gateway bytes per connection", g, "B", gf);
            line("kernel bytes per loopback pair", p, "B", pf);
            let share = line(
                "server's share of a pair",
                a.kernel_server_share,
                "",
                assumed("kernel-server-share"),
            );
            let per = line(
                "memory per connection",
                g + p * share,
                "B",
                "derived: gateway + kernel pair x share".into(),
            );
            line(
                "gateway base RSS (no connections)",
                base,
                "B",
                if m.gateway_rss_base_bytes.is_some() {
                    "measured: RSS at start".into()
                } else {
                    "not measured: taken as 0".into()
                },
            );
            let usable = line(
                "usable memory per node",
                ((mem - reserve) * 1024f64.powi(3) - base).max(0.0) * (1.0 - headroom),
                "B",
                "derived: (memory - reserve - base RSS) x (1 - headroom)".into(),
            );
            if usable > 0.0 && per > 0.0 {
                let per_node = line(
                    "connections per node by memory",
                    (usable / per).floor(),
                    "",
                    "derived: usable memory / memory per connection".into(),
                );
                r.gateway_nodes_for_memory = Some((conns / per_node.max(1.0)).ceil() as u64);
            }
        }
        _ => r
            .missing
            .push("memory bound: bytes per connection not measured (run with --gateway-pid and an idle phase, or give --gateway-bytes-per-conn and --kernel-bytes-per-pair)".into()),
    }

    // CPU.
    let idle = pick(
        a.idle_cpu_s_per_conn_hour,
        "idle-cpu-s-per-conn-hour",
        m.idle_cpu_s_per_connection_hour,
        "gateway CPU over the idle phase / connections / hours",
    );
    let gw_cpu = pick(
        a.gateway_cpu_us_per_delivery,
        "gateway-cpu-us-per-delivery",
        m.core_cpu_s_per_million_deliveries
            .or(m.cpu_s_per_million_deliveries),
        if m.core_cpu_s_per_million_deliveries.is_some() {
            "core-* threads' CPU / deliveries, idle cost removed"
        } else {
            "gateway process CPU / deliveries, idle cost removed"
        },
    );
    let router_cpu = pick(
        a.router_cpu_us_per_delivery,
        "router-cpu-us-per-delivery",
        m.router_cpu_s_per_million_deliveries,
        "non-core threads' CPU (embedded router, store, fsync) / deliveries",
    );
    match (gw_cpu, deliveries) {
        (Some((us, from)), Some(dps)) => {
            let us = line("gateway CPU per delivery", us, "µs", from);
            let idle_cores = match idle {
                Some((h, from)) => {
                    let h = line("gateway CPU per idle connection-hour", h, "s", from);
                    line(
                        "cores to hold the connections",
                        conns * h / 3600.0,
                        "cores",
                        "derived: connections x idle CPU / 3600".into(),
                    )
                }
                None => {
                    r.missing.push(
                        "idle CPU not measured (no rate-0 phase with --gateway-pid): holding connections counted as free".into(),
                    );
                    0.0
                }
            };
            let msg_cores = line(
                "cores to deliver at peak",
                dps * us / 1e6,
                "cores",
                "derived: deliveries/s x CPU per delivery".into(),
            );
            if usable_cores > 0.0 {
                let n = line(
                    "gateway nodes by CPU",
                    ((idle_cores + msg_cores) / usable_cores).ceil(),
                    "nodes",
                    "derived: (hold + deliver cores) / usable cores".into(),
                );
                r.gateway_nodes_for_cpu = Some(n as u64);
            }
        }
        _ => r.missing.push(
            "CPU bound: CPU per delivery or fan-out not measured (run traffic with --gateway-pid, or give --gateway-cpu-us-per-delivery and --fanout)".into(),
        ),
    }
    match (router_cpu, deliveries) {
        (Some((us, from)), Some(dps)) if usable_cores > 0.0 => {
            let us = line("router CPU per delivery", us, "µs", from);
            let cores = line(
                "router cores at peak",
                dps * us / 1e6,
                "cores",
                "derived: deliveries/s x router CPU per delivery".into(),
            );
            r.router_nodes = Some((cores / usable_cores).ceil() as u64);
        }
        _ => r.missing.push(
            "router nodes: router CPU not measured apart (needs --gateway-pid; the metrics endpoint gives one process total) — or give --router-cpu-us-per-delivery".into(),
        ),
    }
    r.gateway_nodes = match (r.gateway_nodes_for_memory, r.gateway_nodes_for_cpu) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    if let Some(n) = r.gateway_nodes.filter(|&n| n > 0) {
        r.connections_per_gateway_node = Some(conns / n as f64);
    }
    r
}

/// `loadgen size REPORT.json [assumptions]`.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "loadgen size",
    about = "Size a fleet from a saved loadgen report: gateway and router nodes for a stated peak"
)]
pub struct SizeArgs {
    /// The JSON report of a run (`--report`).
    pub report: std::path::PathBuf,
    /// Print the sizing as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The peak and the server.
    #[command(flatten)]
    pub assumptions: Assumptions,
}

impl SizeArgs {
    /// Reads the report and works the sizing out.
    pub fn run(&self) -> Result<Sizing, String> {
        let text = std::fs::read_to_string(&self.report)
            .map_err(|e| format!("cannot read {}: {e}", self.report.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", self.report.display()))?;
        let measured = value
            .get("sizing")
            .and_then(|s| s.get("measured"))
            .ok_or_else(|| {
                format!(
                    "{} has no sizing.measured section (a report of an older loadgen?)",
                    self.report.display()
                )
            })?;
        let measured: Measured = serde_json::from_value(measured.clone())
            .map_err(|e| format!("sizing.measured: {e}"))?;
        if !(0.0..1.0).contains(&self.assumptions.headroom) {
            return Err("--headroom: must be at least 0 and below 1".into());
        }
        Ok(Sizing::compute(measured, &self.assumptions))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::probe::{KernelSample, ProcessSample};

    fn mark(
        label: &str,
        at_s: f64,
        conns: u64,
        delivered: u64,
        rss: u64,
        cpu: f64,
        core: f64,
    ) -> Sample {
        Sample {
            label: label.into(),
            at_s,
            connections_up: conns,
            delivered,
            gateway: Some(ProcessSample {
                source: "proc".into(),
                rss_bytes: rss,
                cpu_s: cpu,
                core_threads_cpu_s: Some(core),
                core_threads: 2,
            }),
            kernel: Some(KernelSample {
                slab_bytes: 1_000_000 + conns * 4000,
                tcp_mem_pages: 10,
                page_size: 4096,
                ..KernelSample::default()
            }),
            ..Sample::default()
        }
    }

    #[test]
    fn measured_figures_come_from_the_right_marks() {
        let marks = vec![
            mark("start", 0.0, 0, 0, 10_000_000, 1.0, 0.5),
            mark("connected", 5.0, 1000, 0, 11_000_000, 2.0, 1.0),
            // idle for 10 s: 0.36 CPU-s, 0.18 of it on the cores
            mark("idle", 15.0, 1000, 0, 11_500_000, 2.36, 1.18),
            // 10 s of traffic, 100,000 deliveries: 3.36 CPU-s of which
            // 0.36 is the idle cost; cores 1.18 + 0.18 idle + 1.5
            mark("traffic", 25.0, 1000, 90_000, 12_000_000, 5.0, 2.0),
            mark("drained", 26.0, 1000, 100_000, 12_000_000, 5.72, 2.86),
        ];
        let rate_of = |l: &str| match l {
            "idle" => Some(0.0),
            "traffic" => Some(100.0),
            _ => None,
        };
        let m = measure(&marks, &rate_of, Some(10.0));
        assert_eq!(m.idle_mark.as_deref(), Some("idle"));
        assert_eq!(m.gateway_bytes_per_connection, Some(1500.0));
        assert_eq!(m.kernel_bytes_per_loopback_pair, Some(4000.0));
        assert_eq!(m.connections_per_core, Some(500.0));
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-6;
        // 0.36 s / 10 s / 1000 conns x 3600 = 0.1296 s per connection-hour
        assert!(close(m.idle_cpu_s_per_connection_hour, 0.1296));
        assert!(close(m.idle_core_cpu_s_per_connection_hour, 0.0648));
        assert_eq!(m.deliveries, Some(100_000));
        // window 15..26 s: all 3.36, idle 0.1296*1000*11/3600 = 0.396
        assert!(close(m.cpu_s_per_million_deliveries, (3.36 - 0.396) * 10.0));
        // cores 1.68, idle cores 0.198; rest 1.68, idle rest 0.198
        assert!(close(
            m.core_cpu_s_per_million_deliveries,
            (1.68 - 0.198) * 10.0
        ));
        assert!(close(
            m.router_cpu_s_per_million_deliveries,
            (1.68 - 0.198) * 10.0
        ));
    }

    #[test]
    fn nothing_measured_leaves_the_nodes_unset_with_reasons() {
        let s = Sizing::compute(Measured::default(), &Assumptions::default());
        assert_eq!(s.result.gateway_nodes, None);
        assert_eq!(s.result.missing.len(), 3, "{:?}", s.result.missing);
        assert!(s.text().contains("not computed"));
    }

    #[test]
    fn the_arithmetic_by_hand() {
        let m = Measured {
            gateway_rss_base_bytes: Some(0.0),
            gateway_bytes_per_connection: Some(1024.0),
            kernel_bytes_per_loopback_pair: Some(8192.0),
            idle_cpu_s_per_connection_hour: Some(0.036),
            core_cpu_s_per_million_deliveries: Some(5.0),
            router_cpu_s_per_million_deliveries: Some(10.0),
            fanout: Some(2.0),
            ..Measured::default()
        };
        let a = Assumptions {
            connections: 1e6,
            msgs_per_s: 1e5,
            server_cores: 10.0,
            server_mem_gib: 5.0,
            os_reserve_gib: 1.0,
            headroom: 0.5,
            ..Assumptions::default()
        };
        let r = Sizing::compute(m, &a).result;
        // memory: 1024 + 8192/2 = 5120 B; usable 4 GiB x 0.5 = 2 GiB
        // -> 419,430 connections per node -> 3 nodes for 1M
        assert_eq!(r.gateway_nodes_for_memory, Some(3));
        // CPU: hold 1e6 x 0.036 / 3600 = 10 cores; deliver 2e5 x 5 µs = 1
        // core; 11 / (10 x 0.5) -> 3 nodes
        assert_eq!(r.gateway_nodes_for_cpu, Some(3));
        // router: 2e5 x 10 µs = 2 cores / 5 -> 1 node
        assert_eq!(r.router_nodes, Some(1));
        assert_eq!(r.gateway_nodes, Some(3));
        assert!(r.missing.is_empty(), "{:?}", r.missing);
        assert!(r.lines.iter().all(|l| !l.from.is_empty()));
    }

    #[test]
    fn a_small_run_is_sized_with_a_caution() {
        let small = Measured {
            connections: Some(200),
            deliveries: Some(4_283),
            ..Measured::default()
        };
        let text = Sizing::compute(small, &Assumptions::default()).text();
        assert!(
            text.contains("caution: measured on 200 connections and 4283 deliveries"),
            "{text}"
        );
        let issue_run = Measured {
            connections: Some(10_000),
            deliveries: Some(1_371_361),
            ..Measured::default()
        };
        assert_eq!(issue_run.caution(), None);
        assert!(!Sizing::compute(issue_run, &Assumptions::default())
            .text()
            .contains("caution"));
    }
}
