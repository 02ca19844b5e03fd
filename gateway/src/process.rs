//! The standard `process_*` metrics, read from `/proc/self` at each scrape.
//!
//! The connection tier's limits are memory and descriptors: resident memory
//! divided by open sessions is the bytes-per-connection figure that sizes
//! the fleet, and open against maximum descriptors says how close the node
//! is to refusing accepts. Names and units are the ones every Prometheus
//! client library exports, so existing dashboards and alerts apply.
//!
//! Runs on the metrics thread, never on a core. Counting `/proc/self/fd`
//! costs one directory read per descriptor, which is tolerable at a scrape
//! every few seconds even with a million sessions. On a system without
//! `/proc` the metrics are left out of the scrape.

use std::fs;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Registers with `Registry::register_collector`.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// One reading of `/proc/self`.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: Option<f64>,
    start_time_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    threads: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let r = read();
        if let Some(v) = r.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<Unit>, Option<f64>); 6] = [
            (
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(Unit::Seconds),
                r.start_time_seconds,
            ),
            (
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                r.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                r.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_threads",
                "OS threads",
                None,
                r.threads.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                r.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Limit on open file descriptors",
                None,
                r.max_fds.map(|v| v as f64),
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

fn read() -> Reading {
    let stat = fs::read_to_string("/proc/self/stat").ok();
    let status = fs::read_to_string("/proc/self/status").ok();
    let limits = fs::read_to_string("/proc/self/limits").ok();
    let boot = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| field_after(&s, "btime"));
    let ticks = clock_ticks();
    let mut r = Reading {
        open_fds: fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as i64 - 1), // the directory's own descriptor
        ..Reading::default()
    };
    if let Some(stat) = stat.as_deref() {
        let (cpu, start) = parse_stat(stat, ticks);
        r.cpu_seconds = cpu;
        r.start_time_seconds = start.zip(boot).map(|(s, b)| b + s);
    }
    if let Some(status) = status.as_deref() {
        r.resident_bytes = field_after(status, "VmRSS:").map(|kb| kb as i64 * 1024);
        r.virtual_bytes = field_after(status, "VmSize:").map(|kb| kb as i64 * 1024);
        r.threads = field_after(status, "Threads:").map(|n| n as i64);
    }
    r.max_fds = limits.as_deref().and_then(parse_max_fds);
    r
}

/// CPU seconds and seconds from boot to the start, from `/proc/self/stat`.
/// The command name (field 2) may hold spaces and parentheses, so fields
/// are counted from the last `)`.
fn parse_stat(stat: &str, ticks: f64) -> (Option<f64>, Option<f64>) {
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return (None, None);
    };
    // After ")": field 3 (state) is index 0, so field n is index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let cpu = num(14).zip(num(15)).map(|(u, s)| (u + s) / ticks);
    (cpu, num(22).map(|t| t / ticks))
}

/// The number after the first line starting with `name`.
fn field_after(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The soft limit from the "Max open files" line of `/proc/self/limits`.
fn parse_max_fds(limits: &str) -> Option<i64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant; it has no memory
    // arguments and no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        let stat = "4242 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 9 0 12345 999 7";
        let (cpu, start) = parse_stat(stat, 100.0);
        assert_eq!(cpu, Some(4.0));
        assert_eq!(start, Some(123.45));
        assert_eq!(parse_stat("garbage", 100.0), (None, None));
    }

    #[test]
    fn limits_and_status_lines_parse() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_max_fds(limits), Some(20000));
        assert_eq!(
            field_after("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234.0)
        );
        assert_eq!(field_after("VmRSS: lots\n", "VmRSS:"), None);
    }

    #[test]
    fn this_process_reads() {
        let r = read();
        assert!(r.resident_bytes.unwrap() > 0);
        assert!(r.open_fds.unwrap() >= 3);
        assert!(r.max_fds.unwrap() >= r.open_fds.unwrap());
        assert!(r.threads.unwrap() >= 1);
        assert!(r.cpu_seconds.is_some() && r.start_time_seconds.unwrap() > 1.6e9);
    }
}
