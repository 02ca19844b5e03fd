//! The metrics of a fleet router's partitions, served on its one endpoint.
//!
//! Each partition's router registers its metrics (commit and SENT-ack
//! latency, batches, queue depth, send errors...) in a registry of its own,
//! since partitions come and go as leases move while the endpoint's registry
//! is fixed at start. A scrape encodes every live partition's registry and
//! merges them metric by metric: one `# HELP`/`# TYPE` block per metric, with
//! each partition's samples labelled `partition="<p>"`, so the families stay
//! whole as the exposition format requires. A partition handed away leaves
//! the scrape with it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use prometheus_client::registry::Registry;

/// The registries of the partitions this process serves, by partition.
#[derive(Default)]
pub struct PartitionMetrics {
    registries: Mutex<BTreeMap<u16, Registry>>,
}

impl std::fmt::Debug for PartitionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let served: Vec<u16> = self.lock().keys().copied().collect();
        f.debug_struct("PartitionMetrics")
            .field("partitions", &served)
            .finish()
    }
}

impl PartitionMetrics {
    /// An empty set: no partition served yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `registry` as partition `p`'s, replacing an earlier one.
    pub fn insert(&self, p: u16, registry: Registry) {
        self.lock().insert(p, registry);
    }

    /// Drops partition `p`'s metrics (the partition was handed away).
    pub fn remove(&self, p: u16) {
        self.lock().remove(&p);
    }

    /// Appends every live partition's metrics to `out` in the text
    /// exposition format, without the final `# EOF`: each metric once, with
    /// the samples of every partition under it.
    pub fn encode(&self, out: &mut String) -> std::fmt::Result {
        let registries = self.lock();
        // Metric name → its header lines and its samples, in the order
        // the metrics first appear.
        let mut order: Vec<String> = Vec::new();
        let mut families: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut text = String::new();
        for (p, registry) in registries.iter() {
            text.clear();
            prometheus_client::encoding::text::encode_registry(&mut text, registry)?;
            let label = format!("partition=\"{p}\"");
            let mut current: Option<String> = None;
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# HELP ") {
                    let name = rest.split(' ').next().unwrap_or(rest).to_owned();
                    let first = !families.contains_key(&name);
                    if first {
                        order.push(name.clone());
                    }
                    let family = families.entry(name.clone()).or_default();
                    if first {
                        family.0.push_str(line);
                        family.0.push('\n');
                    }
                    current = Some(name);
                } else if line.starts_with('#') {
                    // `# TYPE` and `# UNIT` follow their `# HELP`.
                    if let Some(family) = current.as_ref().and_then(|n| families.get_mut(n)) {
                        if !family.0.contains(line) {
                            family.0.push_str(line);
                            family.0.push('\n');
                        }
                    }
                } else if let Some(family) = current.as_ref().and_then(|n| families.get_mut(n)) {
                    labelled(&mut family.1, line, &label)?;
                }
            }
        }
        for name in order {
            if let Some((header, samples)) = families.get(&name) {
                out.push_str(header);
                out.push_str(samples);
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Registry>> {
        match self.registries.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Writes the sample `line` to `out` with `label` first among its labels:
/// `name{a="b"} 1` becomes `name{label,a="b"} 1` and `name 1` becomes
/// `name{label} 1`.
fn labelled(out: &mut String, line: &str, label: &str) -> std::fmt::Result {
    match line.find(['{', ' ']) {
        Some(at) if line.as_bytes()[at] == b'{' => {
            let (name, rest) = line.split_at(at + 1);
            writeln!(out, "{name}{label},{rest}")
        }
        Some(at) => {
            let (name, rest) = line.split_at(at);
            writeln!(out, "{name}{{{label}}}{rest}")
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct Code {
        code: &'static str,
    }

    fn partition(stored: u64, errors: u64) -> Registry {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        counter.inc_by(stored);
        registry.register("courier_messages_stored", "Messages made durable", counter);
        let family = Family::<Code, Counter>::default();
        family
            .get_or_create(&Code {
                code: "rate_limited",
            })
            .inc_by(errors);
        registry.register("courier_send_errors", "Sends refused, by code", family);
        let histogram = Histogram::new([0.001, 0.01]);
        histogram.observe(0.005);
        registry.register_with_unit(
            "courier_sent_ack_duration",
            "SENT latency",
            prometheus_client::registry::Unit::Seconds,
            histogram,
        );
        registry
    }

    #[test]
    fn every_metric_appears_once_with_each_partitions_samples_labelled() {
        let metrics = PartitionMetrics::new();
        metrics.insert(3, partition(7, 1));
        metrics.insert(1, partition(5, 2));
        let mut out = String::new();
        metrics.encode(&mut out).unwrap();

        for header in [
            "# HELP courier_messages_stored Messages made durable.",
            "# TYPE courier_messages_stored counter",
            "# TYPE courier_send_errors counter",
            "# TYPE courier_sent_ack_duration_seconds histogram",
            "# UNIT courier_sent_ack_duration_seconds seconds",
        ] {
            assert_eq!(
                out.matches(&format!("{header}\n")).count(),
                1,
                "{header}\n{out}"
            );
        }
        for sample in [
            "courier_messages_stored_total{partition=\"1\"} 5",
            "courier_messages_stored_total{partition=\"3\"} 7",
            "courier_send_errors_total{partition=\"1\",code=\"rate_limited\"} 2",
            "courier_send_errors_total{partition=\"3\",code=\"rate_limited\"} 1",
            "courier_sent_ack_duration_seconds_bucket{partition=\"3\",le=\"0.01\"} 1",
            "courier_sent_ack_duration_seconds_count{partition=\"1\"} 1",
        ] {
            assert!(out.lines().any(|l| l == sample), "{sample} missing:\n{out}");
        }
        // A family's samples follow its own header, never another's.
        let stored_at = out.find("# TYPE courier_send_errors").unwrap();
        let last_stored = out.rfind("courier_messages_stored_total{").unwrap();
        assert!(last_stored < stored_at, "{out}");

        metrics.remove(3);
        let mut out = String::new();
        metrics.encode(&mut out).unwrap();
        assert!(!out.contains("partition=\"3\""), "{out}");
        assert!(out.contains("courier_messages_stored_total{partition=\"1\"} 5"));
    }

    #[test]
    fn nothing_served_encodes_nothing() {
        let mut out = String::new();
        PartitionMetrics::new().encode(&mut out).unwrap();
        assert!(out.is_empty());
    }
}
