//! The HTML report: one self-contained page (inline SVG and CSS, no
//! script, nothing fetched) with the latency percentile plots, the
//! counters, the phases, the thresholds and the sizing.
//!
//! The plots follow HdrHistogram's percentile plots: the x axis is the
//! percentile on a log scale of `1 / (1 - p)` (0 %, 90 %, 99 %, 99.9 % … are
//! equally spaced), so the tail gets as much room as the median.
//! The page is well-formed XML as well as HTML, so any XML parser reads it.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::latency::{decode, Summary};
use crate::report::Report;

const W: f64 = 760.0;
const H: f64 = 340.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 48.0;

/// The page for `report`.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    let title = format!("loadgen run {}", report.run_id);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\" />\n<title>{}</title>\n<style>{}</style>\n</head>\n<body>\n",
        esc(&title),
        CSS
    );
    let verdict = if report.passed && report.thresholds_passed {
        "<span class=\"pass\">PASS</span>"
    } else {
        "<span class=\"fail\">FAIL</span>"
    };
    let c = &report.config;
    let _ = writeln!(
        s,
        "<h1>{} {verdict}</h1>\n<p>{} connections to {} over {} worker process(es), {} source address(es); {} phase(s), {:.0} s of traffic; driver {}{}.</p>",
        esc(&title),
        c.connections,
        esc(&c.url),
        c.workers,
        c.source_addrs.len().max(1),
        report.phases.len(),
        report.timing.traffic_s,
        esc(&report.driver),
        c.scenario
            .as_ref()
            .map_or(String::new(), |n| format!("; scenario {}", esc(n))),
    );
    for f in &report.failures {
        let _ = writeln!(s, "<p class=\"fail\">{}</p>", esc(f));
    }

    s.push_str("<h2>Latency by percentile</h2>\n");
    s.push_str("<p>Timed from each message's intended send time (coordinated omission corrected), milliseconds.</p>\n");
    let series: Vec<(&str, &str, Histogram<u64>)> = [
        ("SENT ack", "#1f77b4", &report.histograms.sent_ack),
        ("end to end", "#d62728", &report.histograms.end_to_end),
        ("schedule lag", "#7f7f7f", &report.histograms.schedule_lag),
        (
            "delivered tick",
            "#2ca02c",
            &report.histograms.receipt_delivered,
        ),
        ("read tick", "#9467bd", &report.histograms.receipt_read),
    ]
    .into_iter()
    .filter_map(|(n, col, enc)| decode(enc).ok().map(|h| (n, col, h)))
    .collect();
    s.push_str(&plot(&series));
    s.push_str("<table>\n<tr><th>latency (ms)</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>mean</th><th>count</th></tr>\n");
    for (name, l) in [
        ("SENT ack", &report.latency_ms.sent_ack),
        ("end to end", &report.latency_ms.end_to_end),
        ("schedule lag", &report.latency_ms.schedule_lag),
        ("delivered tick", &report.latency_ms.receipt_delivered),
        ("read tick", &report.latency_ms.receipt_read),
        // Timed from a session's unasked end, not from a send, and in
        // seconds rather than milliseconds: in the table, not on the plot,
        // whose shared axis it would flatten.
        ("back after drop", &report.latency_ms.reconnect),
    ] {
        summary_row(&mut s, name, l);
    }
    s.push_str("</table>\n");

    if !report.thresholds.is_empty() {
        s.push_str("<h2>Thresholds</h2>\n<table>\n<tr><th>threshold</th><th>value</th><th>result</th></tr>\n");
        for t in &report.thresholds {
            let _ = writeln!(
                s,
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                esc(&t.expr),
                t.value.map_or("missing".into(), |v| format!("{v}")),
                if t.passed { "pass" } else { "fail" },
                if t.passed { "pass" } else { "FAIL" }
            );
        }
        s.push_str("</table>\n");
    }

    s.push_str("<h2>Counts</h2>\n<table>\n");
    let counts: [(&str, u64); 25] = [
        ("connections (peak)", report.connections),
        ("connections at end", report.connections_at_end),
        ("connects", report.connects),
        ("reconnects", report.reconnects),
        ("disconnects", report.disconnects),
        ("churned", report.churned),
        ("sent", report.sent),
        ("acked", report.acked),
        ("unacked", report.unacked),
        ("resent", report.resent),
        ("expected deliveries", report.expected_deliveries),
        ("delivered", report.delivered),
        ("lost", report.lost),
        ("duplicates", report.duplicates),
        ("reordered", report.reordered),
        ("invalid", report.invalid),
        ("redelivered", report.redelivered),
        ("unknown outcome", report.unknown_outcome),
        ("reads sent", report.reads_sent),
        ("receipts received", report.receipts_received),
        ("receipt duplicates", report.receipt_duplicates),
        ("receipts missing", report.receipts_missing),
        ("reads missing", report.reads_missing),
        ("typing sent", report.typing_sent),
        ("typing received", report.typing_received),
    ];
    for (name, v) in counts {
        let bad = matches!(name, "lost" | "reordered" | "invalid" | "duplicates") && v > 0;
        let _ = writeln!(
            s,
            "<tr><td>{name}</td><td{}>{v}</td></tr>",
            if bad { " class=\"fail\"" } else { "" }
        );
    }
    s.push_str("</table>\n");
    if !report.errors.is_empty() {
        s.push_str("<h2>Errors</h2>\n<table>\n");
        for (k, v) in &report.errors {
            let _ = writeln!(s, "<tr><td>{}</td><td>{v}</td></tr>", esc(k));
        }
        s.push_str("</table>\n");
    }

    s.push_str("<h2>Phases</h2>\n<table>\n<tr><th>phase</th><th>s</th><th>rate</th><th>group share</th><th>read share</th><th>churn/s</th><th>scheduled</th><th>sent</th><th>acked</th><th>delivered</th><th>churned</th><th>errors</th></tr>\n");
    for p in &report.phases {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&p.name),
            p.duration_s,
            p.rate,
            p.group_share,
            p.read_share,
            p.churn_per_s,
            p.messages_scheduled,
            p.sent,
            p.acked,
            p.delivered,
            p.churned,
            p.errors
        );
    }
    s.push_str("</table>\n");

    s.push_str("<h2>Sizing</h2>\n<table>\n<tr><th>figure</th><th>value</th><th>unit</th><th>from</th></tr>\n");
    for l in &report.sizing.result.lines {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.what),
            l.value,
            esc(&l.unit),
            esc(&l.from)
        );
    }
    s.push_str("</table>\n");
    let r = &report.sizing.result;
    let show = |v: Option<u64>| v.map_or("not computed".to_string(), |v| v.to_string());
    let _ = writeln!(
        s,
        "<p>Gateway nodes: <b>{}</b> (memory {}, CPU {}); router nodes: <b>{}</b>.</p>",
        show(r.gateway_nodes),
        show(r.gateway_nodes_for_memory),
        show(r.gateway_nodes_for_cpu),
        show(r.router_nodes)
    );
    for m in &r.missing {
        let _ = writeln!(s, "<p class=\"note\">Not computed: {}</p>", esc(m));
    }
    let _ = writeln!(
        s,
        "<p class=\"note\">loadgen {}; the JSON report beside this page holds every figure and the histograms.</p>\n</body>\n</html>",
        esc(report.loadgen_version)
    );
    s
}

fn summary_row(s: &mut String, name: &str, l: &Summary) {
    let _ = writeln!(
        s,
        "<tr><td>{name}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
    );
}

/// The percentile plot of `series` as an inline SVG.
fn plot(series: &[(&str, &str, Histogram<u64>)]) -> String {
    let count = series.iter().map(|(_, _, h)| h.len()).max().unwrap_or(0);
    // Decades of the percentile axis: enough to reach the largest count's
    // last sample, at least to 99 % and at most to 99.9999 %.
    let decades = ((count.max(1) as f64).log10().ceil() as u32).clamp(2, 6);
    let xmax = f64::from(decades);
    let max_ms = series
        .iter()
        .filter(|(_, _, h)| !h.is_empty())
        .map(|(_, _, h)| h.max() as f64 / 1000.0)
        .fold(0.0, f64::max);
    let ymax = nice_ceiling(max_ms.max(0.001) * 1.05);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x_of = |q: f64| {
        let x = if q >= 1.0 {
            xmax
        } else {
            (1.0 / (1.0 - q)).log10().min(xmax)
        };
        LEFT + x / xmax * pw
    };
    let y_of = |ms: f64| TOP + ph - (ms / ymax).min(1.0) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\"><title>latency by percentile</title>"
    );
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"#fafafa\" stroke=\"#999\" />"
    );
    for d in 0..=decades {
        let x = LEFT + f64::from(d) / xmax * pw;
        let label = match d {
            0 => "0%".to_string(),
            d => {
                let nines = 100.0 - 100.0 / 10f64.powi(d as i32);
                format!("{}%", trim(nines))
            }
        };
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\" /><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            TOP + ph,
            TOP + ph + 16.0
        );
    }
    for k in 0..=4 {
        let ms = ymax * f64::from(k) / 4.0;
        let y = y_of(ms);
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\" /><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            trim(ms)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text><text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">ms</text>",
        LEFT + pw / 2.0,
        H - 8.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    for (i, (name, colour, h)) in series.iter().enumerate() {
        if !h.is_empty() {
            let mut points = String::new();
            for v in h.iter_quantiles(1) {
                let q = v.quantile_iterated_to();
                let ms = h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
                let _ = write!(points, "{:.1},{:.1} ", x_of(q), y_of(ms));
            }
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\" />",
                points.trim_end()
            );
        }
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{colour}\" /><text x=\"{:.1}\" y=\"{:.1}\">{} ({} samples)</text>",
            LEFT + 12.0,
            ly - 4.0,
            LEFT + 30.0,
            ly,
            esc(name),
            h.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn trim(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Escapes text for HTML and XML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;max-width:60em;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}\
td:first-child,th:first-child{text-align:left}.pass{color:#080}.fail{color:#c00;font-weight:bold}\
.note{color:#666;font-size:90%}svg text{font-size:11px;fill:#333}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(13.0), 20.0);
        assert_eq!(nice_ceiling(51.0), 100.0);
        assert_eq!(trim(99.9), "99.9");
        assert_eq!(trim(90.0), "90");
        assert_eq!(esc("<a & 'b'>"), "&lt;a &amp; &#39;b&#39;&gt;");
    }
}
