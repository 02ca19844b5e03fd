//! Thresholds: `metric op value` statements judged against the report, so
//! a run can gate a pipeline (`e2e_p99_ms < 50`, `lost == 0`).
//!
//! A metric is one of the short names below or a dotted path into the JSON
//! report (`latency_ms.end_to_end.p999`, `sizing.result.gateway_nodes`). A
//! metric the report does not hold (null or missing, e.g. sizing without a
//! measured gateway) breaks its threshold: a gate must not pass on a figure
//! nobody measured.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Short metric names and the report paths they stand for.
pub const ALIASES: &[(&str, &str)] = &[
    ("e2e_p50_ms", "latency_ms.end_to_end.p50"),
    ("e2e_p90_ms", "latency_ms.end_to_end.p90"),
    ("e2e_p99_ms", "latency_ms.end_to_end.p99"),
    ("e2e_p999_ms", "latency_ms.end_to_end.p999"),
    ("e2e_max_ms", "latency_ms.end_to_end.max"),
    ("e2e_mean_ms", "latency_ms.end_to_end.mean"),
    ("ack_p50_ms", "latency_ms.sent_ack.p50"),
    ("ack_p90_ms", "latency_ms.sent_ack.p90"),
    ("ack_p99_ms", "latency_ms.sent_ack.p99"),
    ("ack_p999_ms", "latency_ms.sent_ack.p999"),
    ("ack_max_ms", "latency_ms.sent_ack.max"),
    ("ack_mean_ms", "latency_ms.sent_ack.mean"),
    ("lag_p99_ms", "latency_ms.schedule_lag.p99"),
    ("receipt_p99_ms", "latency_ms.receipt_delivered.p99"),
    ("read_receipt_p99_ms", "latency_ms.receipt_read.p99"),
    ("reconnect_p99_ms", "latency_ms.reconnect.p99"),
    ("reconnect_max_ms", "latency_ms.reconnect.max"),
    ("sent_per_s", "rates.sent_per_s"),
    ("acked_per_s", "rates.acked_per_s"),
    ("delivered_per_s", "rates.delivered_per_s"),
    (
        "gateway_bytes_per_connection",
        "sizing.measured.gateway_bytes_per_connection",
    ),
    (
        "kernel_bytes_per_loopback_pair",
        "sizing.measured.kernel_bytes_per_loopback_pair",
    ),
    ("gateway_nodes", "sizing.result.gateway_nodes"),
    ("router_nodes", "sizing.result.router_nodes"),
];

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
    /// `==`
    #[serde(rename = "==")]
    Eq,
    /// `!=`
    #[serde(rename = "!=")]
    Ne,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Self::Lt => a < b,
            Self::Le => a <= b,
            Self::Gt => a > b,
            Self::Ge => a >= b,
            Self::Eq => a == b,
            Self::Ne => a != b,
        }
    }
}

/// One parsed threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    /// As written.
    pub expr: String,
    /// The metric as written (a short name or a path).
    pub metric: String,
    /// The comparison.
    pub op: Op,
    /// The bound.
    pub bound: f64,
}

/// A threshold judged against a report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The threshold as written.
    pub expr: String,
    /// The metric's value in the report (None: not in the report).
    pub value: Option<f64>,
    /// True when the value exists and satisfies the comparison.
    pub passed: bool,
}

impl Threshold {
    /// Parses `metric op number`, e.g. `e2e_p99_ms < 50`.
    pub fn parse(expr: &str) -> Result<Self, String> {
        let expr = expr.trim();
        // Two-character operators first, so `<=` is not read as `<`.
        const OPS: [(&str, Op); 6] = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        let (at, tok, op) = OPS
            .iter()
            .filter_map(|&(tok, op)| expr.find(tok).map(|at| (at, tok, op)))
            .min_by_key(|&(at, tok, _)| (at, std::cmp::Reverse(tok.len())))
            .ok_or_else(|| {
                format!("`{expr}`: expected `metric op number` with op one of < <= > >= == !=")
            })?;
        let metric = expr[..at].trim();
        let bound = expr[at + tok.len()..].trim();
        if metric.is_empty()
            || !metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(format!("`{expr}`: `{metric}` is not a metric name"));
        }
        let bound: f64 = bound
            .parse()
            .ok()
            .filter(|b: &f64| b.is_finite())
            .ok_or_else(|| format!("`{expr}`: `{bound}` is not a number"))?;
        Ok(Self {
            expr: expr.to_owned(),
            metric: metric.to_owned(),
            op,
            bound,
        })
    }

    /// The report path the metric names.
    pub fn path(&self) -> &str {
        ALIASES
            .iter()
            .find(|(name, _)| *name == self.metric)
            .map_or(&self.metric, |(_, path)| path)
    }

    /// Judges the threshold against `report` (the JSON report as a value).
    pub fn judge(&self, report: &Value) -> Verdict {
        let value = if self.metric == "errors" {
            // The errors field is a map by kind; its total is the metric.
            report
                .get("errors")
                .and_then(Value::as_object)
                .map(|m| m.values().filter_map(Value::as_f64).sum())
        } else {
            self.path()
                .split('.')
                .try_fold(report, |v, key| v.get(key))
                .and_then(Value::as_f64)
        };
        Verdict {
            expr: self.expr.clone(),
            value,
            passed: value.is_some_and(|v| self.op.holds(v, self.bound)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operator() {
        for (text, op, bound) in [
            ("e2e_p99_ms < 50", Op::Lt, 50.0),
            ("lost==0", Op::Eq, 0.0),
            ("ack_p99_ms <= 100.5", Op::Le, 100.5),
            ("connections >= 200000", Op::Ge, 200_000.0),
            ("reordered != 1", Op::Ne, 1.0),
            ("delivered_per_s > 1e3", Op::Gt, 1000.0),
        ] {
            let t = Threshold::parse(text).unwrap();
            assert_eq!((t.op, t.bound), (op, bound), "{text}");
        }
        assert_eq!(Threshold::parse(" lost == 0 ").unwrap().metric, "lost");
    }

    #[test]
    fn bad_thresholds_say_why() {
        for bad in [
            "lost",
            "lost = 0",
            "== 3",
            "lost < soon",
            "lo st < 3",
            "x < inf",
        ] {
            assert!(Threshold::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn judged_against_the_report() {
        let report = serde_json::json!({
            "lost": 0,
            "reordered": 2,
            "latency_ms": { "end_to_end": { "p99": 12.5 } },
            "errors": { "close.4003": 2, "session.eof": 1 },
            "sizing": { "measured": { "gateway_bytes_per_connection": null } }
        });
        let judge = |t: &str| Threshold::parse(t).unwrap().judge(&report);
        assert!(judge("lost == 0").passed);
        assert!(!judge("reordered == 0").passed);
        assert!(judge("e2e_p99_ms < 50").passed);
        assert!(!judge("e2e_p99_ms < 10").passed);
        assert_eq!(judge("latency_ms.end_to_end.p99 < 13").value, Some(12.5));
        assert_eq!(judge("errors <= 3").value, Some(3.0));
        let missing = judge("gateway_bytes_per_connection < 2048");
        assert_eq!((missing.value, missing.passed), (None, false));
        assert!(!judge("no_such_metric < 1").passed);
    }
}
