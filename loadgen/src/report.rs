//! The run's result: a JSON report and a readable summary.
//!
//! Every field is documented in `docs/loadgen.md`; change both together.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::check::{Findings, LostExample};
use crate::config::{Config, ConfigEcho};
use crate::control::Outcome;
use crate::latency::{Encoded, Summary};
use crate::plan::{PhaseSpan, Plan};
use crate::probe::Sample;
use crate::sizing::{Assumptions, Sizing};
use crate::stats::Counters;
use crate::threshold::Verdict;

/// What a run found. Serialized as the `--report` JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// loadgen's version.
    pub loadgen_version: &'static str,
    /// The run id (hex), part of every user name.
    pub run_id: String,
    /// The I/O driver the workers ran on: `io_uring`, `legacy` or `mixed`.
    pub driver: String,
    /// The configuration of the run.
    pub config: ConfigEcho,
    /// The world the plan drew.
    pub plan: PlanSummary,
    /// Most connections up (upgraded and caught up) at once.
    pub connections: u64,
    /// Connections up when traffic ended.
    pub connections_at_end: u64,
    /// Successful upgrades, reconnects included.
    pub connects: u64,
    /// Upgrades after a connection's first.
    pub reconnects: u64,
    /// Sessions that ended before the run did.
    pub disconnects: u64,
    /// Distinct messages sent.
    pub sent: u64,
    /// Transmissions after the first (reconnect or retryable error).
    pub resent: u64,
    /// Distinct messages acknowledged with SENT.
    pub acked: u64,
    /// Messages sent but never acked (includes `unknown_outcome` and
    /// `send_failed`).
    pub unacked: u64,
    /// Messages refused with a non-retryable error.
    pub send_failed: u64,
    /// Scheduled messages not sent because their group's id was unknown.
    pub skipped: u64,
    /// Deliveries the acked messages owe (one per member device but the
    /// sender's).
    pub expected_deliveries: u64,
    /// First arrivals of messages at recipient devices.
    pub delivered: u64,
    /// Owed deliveries missing at the end.
    pub lost: u64,
    /// Arrivals of something the device already had.
    pub duplicates: u64,
    /// First arrivals below a sequence already received.
    pub reordered: u64,
    /// Catch-up resends above the requested cursor (expected).
    pub redelivered: u64,
    /// Messages some device holds whose SENT never arrived.
    pub unknown_outcome: u64,
    /// Deliveries that were never sent as such (wrong body, sender,
    /// conversation or recipient).
    pub invalid: u64,
    /// The sender's own device received its message.
    pub own_echoes: u64,
    /// Messages acked at two different sequences (a retry stored twice).
    pub dedupe_mismatches: u64,
    /// Repeated SENTs for the same message and sequence.
    pub repeated_acks: u64,
    /// Membership entries received (group creations).
    pub membership_entries: u64,
    /// Groups created.
    pub groups_created: u64,
    /// Sessions closed on purpose and reconnected (churn).
    pub churned: u64,
    /// `Read` receipts sent.
    pub reads_sent: u64,
    /// `Receipt` frames received.
    pub receipts_received: u64,
    /// Live receipts that told a state change the device already knew.
    pub receipt_duplicates: u64,
    /// Own acked direct messages whose delivered receipt never reached the
    /// sender's device (live or in a catch-up summary).
    pub receipts_missing: u64,
    /// Acked direct messages their recipient read whose sender never
    /// learned of the read.
    pub reads_missing: u64,
    /// Typing frames sent and typing events received.
    pub typing_sent: u64,
    pub typing_received: u64,
    /// The phases of the schedule and what happened in each.
    pub phases: Vec<PhaseReport>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Latency percentiles in milliseconds.
    pub latency_ms: LatencyReport,
    /// Average rates over the traffic phase, per second.
    pub rates: Rates,
    /// How long each phase took, in seconds.
    pub timing: Timing,
    /// Up to ten lost deliveries by name.
    pub lost_examples: Vec<LostExample>,
    /// True when nothing was lost, reordered or invalid and something was acked.
    pub passed: bool,
    /// Why the run failed, one line per reason.
    pub failures: Vec<String>,
    /// Each threshold with the value it was judged on.
    pub thresholds: Vec<Verdict>,
    /// True when every threshold held (and when there are none).
    pub thresholds_passed: bool,
    /// The HDR histograms themselves (V2-deflate, base64), for plots and
    /// for merging runs.
    pub histograms: Encoded,
    /// Gateway and kernel readings at each mark of the run.
    pub measurements: Vec<Sample>,
    /// What the measurements say about a fleet (see `loadgen size`).
    pub sizing: Sizing,
}

/// One phase of the schedule as it ran.
#[derive(Clone, Debug, Serialize)]
#[allow(missing_docs)]
pub struct PhaseReport {
    pub name: String,
    pub duration_s: f64,
    pub rate: f64,
    pub group_share: f64,
    pub read_share: f64,
    pub churn_per_s: f64,
    pub messages_scheduled: u64,
    /// Counted while the phase ran (loadgen's progress counters, up to a
    /// quarter second stale at either end).
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub churned: u64,
    pub errors: u64,
}

impl PhaseReport {
    pub(crate) fn new(span: &PhaseSpan, before: &Counters, after: &Counters) -> Self {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Self {
            name: span.plan.name.clone(),
            duration_s: span.plan.duration.as_secs_f64(),
            rate: span.plan.rate,
            group_share: span.plan.group_share,
            read_share: span.plan.read_share,
            churn_per_s: span.plan.churn_per_s,
            messages_scheduled: span.messages,
            sent: d(after.sent, before.sent),
            acked: d(after.acked, before.acked),
            delivered: d(after.delivered, before.delivered),
            churned: d(after.churned, before.churned),
            errors: d(after.errors, before.errors),
        }
    }
}

/// The drawn world.
#[derive(Clone, Debug, Serialize)]
#[allow(missing_docs)]
pub struct PlanSummary {
    pub users: u32,
    pub direct_conversations: u32,
    pub groups: u32,
    pub group_size_mean: f64,
    pub group_size_max: u32,
    pub group_size_exponent: f64,
    pub messages_scheduled: u64,
}

/// The three latency histograms.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyReport {
    /// Intended send to SENT.
    pub sent_ack: Summary,
    /// Intended send to a recipient's receipt.
    pub end_to_end: Summary,
    /// Intended send to actual send (loadgen's own lag).
    pub schedule_lag: Summary,
    /// Intended send of a direct message to its sender learning it was
    /// delivered, and read.
    pub receipt_delivered: Summary,
    pub receipt_read: Summary,
    /// A session ended unasked to the device caught up on its next one.
    pub reconnect: Summary,
}

/// Average rates over the traffic phase.
#[derive(Clone, Debug, Serialize)]
#[allow(missing_docs)]
pub struct Rates {
    pub sent_per_s: f64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
}

/// Phase durations in seconds.
#[derive(Clone, Debug, Serialize)]
#[allow(missing_docs)]
pub struct Timing {
    pub setup_s: f64,
    pub traffic_s: f64,
    pub drain_s: f64,
}

/// What the coordinator measured itself, beside the workers' outcome.
#[derive(Clone, Debug)]
pub(crate) struct Observed {
    pub connections_peak: u64,
    pub connections_at_end: u64,
    pub timing: Timing,
    pub phases: Vec<PhaseReport>,
    pub marks: Vec<Sample>,
}

impl Report {
    pub(crate) fn build(
        run_config: &Config,
        config: ConfigEcho,
        plan: &Plan,
        outcome: &Outcome,
        findings: &Findings,
        seen: Observed,
    ) -> Self {
        let c = &outcome.counters;
        let traffic = seen.timing.traffic_s.max(1e-9);
        let mut report = Self {
            loadgen_version: env!("CARGO_PKG_VERSION"),
            run_id: config.run_id.clone(),
            driver: outcome.driver.to_owned(),
            config,
            plan: PlanSummary {
                users: plan.users(),
                direct_conversations: plan.directs(),
                groups: plan.groups(),
                group_size_mean: plan.group_size_mean(),
                group_size_max: plan.group_size_max(),
                group_size_exponent: plan.size_exponent(),
                messages_scheduled: plan.total_messages(),
            },
            connections: seen.connections_peak,
            connections_at_end: seen.connections_at_end,
            connects: c.connects,
            reconnects: c.reconnects,
            disconnects: c.disconnects,
            sent: c.sent,
            resent: c.resent,
            acked: findings.acked,
            unacked: c.sent.saturating_sub(findings.acked),
            send_failed: c.send_failed,
            skipped: c.skipped,
            expected_deliveries: findings.expected,
            delivered: c.delivered,
            lost: findings.lost,
            duplicates: c.duplicates,
            reordered: c.reordered,
            redelivered: c.redelivered,
            unknown_outcome: findings.unknown_outcome,
            invalid: c.invalid,
            own_echoes: c.own_echoes,
            dedupe_mismatches: findings.dedupe_mismatches,
            repeated_acks: findings.repeated_acks,
            membership_entries: c.membership_entries,
            groups_created: c.groups_created,
            churned: c.churned,
            reads_sent: c.reads_sent,
            receipts_received: c.receipts_received,
            receipt_duplicates: c.receipt_duplicates,
            receipts_missing: c.receipts_expected.saturating_sub(c.receipts_covered),
            reads_missing: findings.reads_missing,
            typing_sent: c.typing_sent,
            typing_received: c.typing_received,
            phases: seen.phases,
            errors: outcome.errors.0.clone(),
            latency_ms: LatencyReport {
                sent_ack: Summary::of(&outcome.latencies.sent_ack),
                end_to_end: Summary::of(&outcome.latencies.end_to_end),
                schedule_lag: Summary::of(&outcome.latencies.schedule_lag),
                receipt_delivered: Summary::of(&outcome.latencies.receipt_delivered),
                receipt_read: Summary::of(&outcome.latencies.receipt_read),
                reconnect: Summary::of(&outcome.latencies.reconnect),
            },
            rates: Rates {
                sent_per_s: c.sent as f64 / traffic,
                acked_per_s: findings.acked as f64 / traffic,
                delivered_per_s: c.delivered as f64 / traffic,
            },
            timing: seen.timing,
            lost_examples: findings.lost_examples.clone(),
            passed: false,
            failures: Vec::new(),
            thresholds: Vec::new(),
            thresholds_passed: true,
            histograms: outcome.latencies.encode(),
            measurements: seen.marks,
            sizing: Sizing::default(),
        };
        report.failures = report.judge();
        report.passed = report.failures.is_empty();
        report.sizing = Sizing::from_report(&report, &Assumptions::default());
        // Thresholds last: they may name any field above, sizing included.
        let value = serde_json::to_value(&report).unwrap_or_default();
        report.thresholds = run_config
            .thresholds
            .iter()
            .map(|t| t.judge(&value))
            .collect();
        report.thresholds_passed = report.thresholds.iter().all(|v| v.passed);
        report
    }

    /// The reasons the run failed (empty: it passed).
    fn judge(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.lost > 0 {
            let eg = self.lost_examples.first().map_or(String::new(), |e| {
                format!(
                    " (e.g. seq {} of {} missing at {})",
                    e.seq, e.conversation, e.recipient
                )
            });
            why.push(format!("{} acked deliveries lost{eg}", self.lost));
        }
        if self.reordered > 0 {
            why.push(format!(
                "{} entries arrived out of sequence order",
                self.reordered
            ));
        }
        if self.invalid > 0 {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .filter(|(k, _)| k.starts_with("invalid.") || k.starts_with("sent."))
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            why.push(format!(
                "{} deliveries or SENTs that were never sent ({})",
                self.invalid,
                kinds.join(", ")
            ));
        }
        if self.plan.messages_scheduled > 0 && self.acked == 0 {
            why.push("no message was acked".to_owned());
        }
        why
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A readable summary for the terminal.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let cfg = &self.config;
        let _ = writeln!(
            s,
            "loadgen run {}: {} connections to {}, {} for {:.0}s ({}, {} worker process{} x {} thread{}{})",
            self.run_id,
            cfg.connections,
            cfg.url,
            match self.phases.as_slice() {
                [one] => format!("{} msg/s", one.rate),
                many => format!("{} phases", many.len()),
            },
            self.timing.traffic_s,
            self.driver,
            cfg.workers,
            if cfg.workers == 1 { "" } else { "es" },
            cfg.threads,
            if cfg.threads == 1 { "" } else { "s" },
            cfg.scenario
                .as_ref()
                .map_or(String::new(), |n| format!(", scenario {n}")),
        );
        let p = &self.plan;
        let _ = writeln!(
            s,
            "  plan         {} direct conversations, {} groups (sizes {}..{}, mean {:.1}, max {}), {} messages",
            p.direct_conversations, p.groups, cfg.group_min, cfg.group_max, p.group_size_mean, p.group_size_max,
            p.messages_scheduled
        );
        let _ = writeln!(
            s,
            "  connections  {} up at peak, {} at end; {} upgrades, {} reconnects, {} disconnects",
            self.connections,
            self.connections_at_end,
            self.connects,
            self.reconnects,
            self.disconnects
        );
        let _ = writeln!(
            s,
            "  messages     sent {}, acked {}, unacked {} (unknown outcome {}, refused {}), resent {}, skipped {}",
            self.sent, self.acked, self.unacked, self.unknown_outcome, self.send_failed, self.resent, self.skipped
        );
        let _ = writeln!(
            s,
            "  deliveries   expected {}, delivered {}, lost {}, duplicates {}, reordered {}, invalid {}, redelivered {}",
            self.expected_deliveries, self.delivered, self.lost, self.duplicates, self.reordered, self.invalid,
            self.redelivered
        );
        if self.phases.len() > 1 || self.churned + self.reads_sent > 0 {
            for p in &self.phases {
                let _ = writeln!(
                    s,
                    "  phase        {:<10} {:>6.1}s at {}/s: sent {}, acked {}, delivered {}, churned {}, errors {}",
                    p.name, p.duration_s, p.rate, p.sent, p.acked, p.delivered, p.churned, p.errors
                );
            }
            let _ = writeln!(
                s,
                "  receipts     read sent {}, receipts received {}, duplicates {}, delivered missing {}, reads missing {}; typing sent {}, received {}; churned {}",
                self.reads_sent,
                self.receipts_received,
                self.receipt_duplicates,
                self.receipts_missing,
                self.reads_missing,
                self.typing_sent,
                self.typing_received,
                self.churned
            );
        }
        let _ = writeln!(
            s,
            "  rates        sent {:.0}/s, acked {:.0}/s, delivered {:.0}/s",
            self.rates.sent_per_s, self.rates.acked_per_s, self.rates.delivered_per_s
        );
        let _ = writeln!(
            s,
            "  {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "latency (ms)", "p50", "p90", "p99", "p99.9", "max", "count"
        );
        for (name, l) in [
            ("SENT ack", &self.latency_ms.sent_ack),
            ("end to end", &self.latency_ms.end_to_end),
            ("schedule lag", &self.latency_ms.schedule_lag),
            ("delivered tick", &self.latency_ms.receipt_delivered),
            ("read tick", &self.latency_ms.receipt_read),
            ("back after drop", &self.latency_ms.reconnect),
        ] {
            let _ = writeln!(
                s,
                "    {name:<14} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8}",
                l.p50, l.p90, l.p99, l.p999, l.max, l.count
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors       none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "  errors       {}", list.join(", "));
        }
        for e in &self.lost_examples {
            let _ = writeln!(
                s,
                "  lost         seq {} of {} (message {}) at {}",
                e.seq, e.conversation, e.msg, e.recipient
            );
        }
        {
            let m = &self.sizing.measured;
            let fmt = |v: Option<f64>, unit: &str| {
                v.map_or("not measured".to_string(), |v| format!("{v:.0} {unit}"))
            };
            let _ = writeln!(
                s,
                "  measured     gateway {} per connection, kernel {} per loopback pair, {} per million deliveries",
                fmt(m.gateway_bytes_per_connection, "B"),
                fmt(m.kernel_bytes_per_loopback_pair, "B"),
                fmt(m.cpu_s_per_million_deliveries, "CPU-s"),
            );
        }
        for t in &self.thresholds {
            let _ = writeln!(
                s,
                "  threshold    {:<4} {} (value {})",
                if t.passed { "ok" } else { "FAIL" },
                t.expr,
                t.value.map_or("missing".to_string(), |v| format!("{v}"))
            );
        }
        if self.passed {
            let _ = writeln!(s, "  result       PASS");
        } else {
            for f in &self.failures {
                let _ = writeln!(s, "  result       FAIL: {f}");
            }
        }
        s
    }
}
