//! Measurements of the gateway and the kernel while a run goes: what the
//! sizing section is computed from.
//!
//! At each mark of the run (start, connected, the end of every phase,
//! drained) the coordinator takes a [`Sample`]:
//!
//! - the gateway processes (`--gateway-pid`): resident memory from
//!   `/proc/<pid>/status` (`VmRSS`), CPU time from `/proc/<pid>/stat`
//!   (user + system, in clock ticks of `getconf CLK_TCK`), and the part of
//!   it spent on the gateway's `core-*` threads (the rest is the embedded
//!   router, its store and fsync threads, and the metrics thread); or,
//!   without a pid, `process_resident_memory_bytes` and
//!   `process_cpu_seconds_total` from the metrics endpoint when it has them;
//! - the kernel: `/proc/net/sockstat` (TCP sockets and their buffer pages)
//!   and `Slab` from `/proc/meminfo` (socket, inode, file and epoll objects
//!   live there). These are machine-wide: on loopback they hold both ends
//!   of every connection, and whatever else the machine does meanwhile.
//!
//! Every figure is read, not assumed; what could not be read is `None`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One reading at one mark of the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The mark: `start`, `connected`, a phase name, `drained`.
    pub label: String,
    /// Seconds since the run started.
    pub at_s: f64,
    /// Connections up (loadgen's count).
    pub connections_up: u64,
    /// Messages sent, acked and delivered so far (loadgen's counts).
    pub sent: u64,
    /// See `sent`.
    pub acked: u64,
    /// See `sent`.
    pub delivered: u64,
    /// The gateway processes, summed (None: none given or unreadable).
    pub gateway: Option<ProcessSample>,
    /// The kernel (None: /proc unreadable).
    pub kernel: Option<KernelSample>,
}

/// The gateway processes at one mark, summed over the pids.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessSample {
    /// Where it was read: `proc` or `metrics`.
    pub source: String,
    /// Resident memory.
    pub rss_bytes: u64,
    /// CPU time, user and system, all threads that ever ran.
    pub cpu_s: f64,
    /// CPU time of the `core-*` threads (None from the metrics endpoint).
    pub core_threads_cpu_s: Option<f64>,
    /// `core-*` threads seen (the gateway's cores).
    pub core_threads: u32,
}

/// The kernel at one mark.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelSample {
    /// `sockets: used`.
    pub sockets_used: u64,
    /// `TCP: inuse`.
    pub tcp_inuse: u64,
    /// `TCP: alloc`.
    pub tcp_alloc: u64,
    /// `TCP: mem`, in pages: socket buffer memory.
    pub tcp_mem_pages: u64,
    /// `Slab` of /proc/meminfo.
    pub slab_bytes: u64,
    /// The page size `tcp_mem_pages` counts in.
    pub page_size: u64,
}

/// What to measure. Built once per run.
#[derive(Clone, Debug, Default)]
pub struct Probe {
    pids: Vec<u32>,
    metrics: Option<MetricsUrl>,
    clk_tck: f64,
    page_size: u64,
}

/// A parsed `http://` metrics URL on loopback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsUrl {
    addr: SocketAddr,
    host: String,
    path: String,
}

/// Parses `http://127.0.0.1:9100/metrics` (loopback only, like `--url`).
pub fn parse_metrics_url(url: &str) -> Result<MetricsUrl, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: expected http://host:port/path"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let host = authority.replace("localhost", "127.0.0.1");
    let addr: SocketAddr = host
        .parse()
        .map_err(|_| format!("`{url}`: expected a loopback ip:port"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("`{url}`: only loopback addresses are measured"));
    }
    Ok(MetricsUrl {
        addr,
        host: authority.to_owned(),
        path: path.to_owned(),
    })
}

impl Probe {
    /// A probe of `pids`, or of the metrics endpoint when there are none.
    pub fn new(pids: &[u32], metrics_url: Option<&str>) -> Self {
        Self {
            pids: pids.to_vec(),
            metrics: metrics_url.and_then(|u| parse_metrics_url(u).ok()),
            clk_tck: getconf("CLK_TCK").unwrap_or(100) as f64,
            page_size: getconf("PAGESIZE").unwrap_or(4096),
        }
    }

    /// True when there is a gateway to measure.
    pub fn has_gateway(&self) -> bool {
        !self.pids.is_empty() || self.metrics.is_some()
    }

    /// Reads the gateway and the kernel now.
    pub fn sample(&self, label: &str, at_s: f64) -> Sample {
        Sample {
            label: label.to_owned(),
            at_s,
            gateway: self.gateway(),
            kernel: self.kernel(),
            ..Sample::default()
        }
    }

    fn gateway(&self) -> Option<ProcessSample> {
        if self.pids.is_empty() {
            return self.metrics.as_ref().and_then(read_metrics);
        }
        let mut total = ProcessSample {
            source: "proc".into(),
            core_threads_cpu_s: Some(0.0),
            ..ProcessSample::default()
        };
        for &pid in &self.pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            total.rss_bytes += kib_field(&status, "VmRSS:")? * 1024;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            total.cpu_s += stat_cpu_ticks(&stat)? as f64 / self.clk_tck;
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            for task in tasks.flatten() {
                let dir = task.path();
                let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                if !comm.starts_with("core-") {
                    continue;
                }
                total.core_threads += 1;
                let ticks = std::fs::read_to_string(dir.join("stat"))
                    .ok()
                    .and_then(|s| stat_cpu_ticks(&s))
                    .unwrap_or(0);
                if let Some(c) = total.core_threads_cpu_s.as_mut() {
                    *c += ticks as f64 / self.clk_tck;
                }
            }
        }
        Some(total)
    }

    fn kernel(&self) -> Option<KernelSample> {
        let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let mut k = KernelSample {
            page_size: self.page_size,
            slab_bytes: kib_field(&meminfo, "Slab:")? * 1024,
            ..KernelSample::default()
        };
        for line in sockstat.lines() {
            let mut words = line.split_whitespace();
            let head = words.next().unwrap_or_default();
            let rest: Vec<&str> = words.collect();
            let field = |name: &str| {
                rest.iter()
                    .position(|w| *w == name)
                    .and_then(|i| rest.get(i + 1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            match head {
                "sockets:" => k.sockets_used = field("used"),
                "TCP:" => {
                    k.tcp_inuse = field("inuse");
                    k.tcp_alloc = field("alloc");
                    k.tcp_mem_pages = field("mem");
                }
                _ => {}
            }
        }
        Some(k)
    }
}

/// `NAME: <n> kB` from a /proc file, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime (fields 14 and 15) of a /proc stat line. The command name
/// in parentheses may hold spaces, so fields count from the last `)`.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn getconf(name: &str) -> Option<u64> {
    let out = std::process::Command::new("getconf")
        .arg(name)
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

fn read_metrics(url: &MetricsUrl) -> Option<ProcessSample> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&url.addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
        url.path, url.host
    )
    .ok()?;
    let mut body = String::new();
    s.take(16 << 20).read_to_string(&mut body).ok()?;
    let value = |name: &str| {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')))
            .and_then(|r| r.trim().parse::<f64>().ok())
    };
    Some(ProcessSample {
        source: "metrics".into(),
        rss_bytes: value("process_resident_memory_bytes")? as u64,
        cpu_s: value("process_cpu_seconds_total")?,
        core_threads_cpu_s: None,
        core_threads: 0,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name() {
        let line = "4242 (core 0) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 100";
        assert_eq!(stat_cpu_ticks(line), Some(300));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let me = std::process::id();
        let s = Probe::new(&[me], None).sample("now", 0.0);
        let g = s.gateway.unwrap();
        assert!(g.rss_bytes > 1 << 20, "rss {}", g.rss_bytes);
        assert_eq!(g.core_threads, 0);
        let k = s.kernel.unwrap();
        assert!(k.slab_bytes > 0 && k.page_size >= 4096);
        assert!(Probe::new(&[u32::MAX], None)
            .sample("x", 0.0)
            .gateway
            .is_none());
    }

    #[test]
    fn metrics_urls_are_loopback_only() {
        assert!(parse_metrics_url("http://127.0.0.1:9100/metrics").is_ok());
        assert_eq!(
            parse_metrics_url("http://localhost:9100").unwrap().path,
            "/metrics"
        );
        for bad in ["ws://127.0.0.1:1/", "http://10.0.0.1:9100/", "http://host/"] {
            assert!(parse_metrics_url(bad).is_err(), "{bad}");
        }
    }
}
