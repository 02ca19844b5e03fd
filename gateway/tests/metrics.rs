//! The metrics endpoint of a running node: conventions the dashboard and
//! the alert rules rely on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{http_get, TestNode};

/// The `le` bounds of histogram `name`, in scrape order.
fn bounds(text: &str, name: &str) -> Vec<String> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

#[test]
fn every_latency_histogram_shares_bounds_past_one_second() {
    let node = TestNode::start(&[]);
    let text = node.metrics();
    let delivery = bounds(&text, "courier_delivery_duration_seconds");
    assert!(delivery.len() > 10, "{text}");
    for other in [
        "courier_sent_ack_duration_seconds",
        "courier_store_commit_duration_seconds",
        "courier_store_write_duration_seconds",
    ] {
        assert_eq!(bounds(&text, other), delivery, "{other}");
    }
    // A p99 over the alert's 1 s needs finite bounds above 1 s.
    let finite: Vec<f64> = delivery.iter().filter_map(|b| b.parse().ok()).collect();
    assert!(finite.iter().any(|b| *b > 1.0), "{delivery:?}");
    assert!(text.contains("# UNIT courier_sent_ack_duration_seconds seconds"));
}

#[test]
fn readiness_shows_in_the_gauge_and_the_endpoint() {
    let node = TestNode::start(&[]);
    assert!(node.metrics().contains("courier_ready 1"));
    assert!(node.metrics().contains(&format!(
        "courier_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert_eq!(http_get(node.metrics_addr, "/readyz").0, 200);
    node.begin_shutdown();
    assert_eq!(http_get(node.metrics_addr, "/readyz").0, 503);
    assert!(node.metrics().contains("courier_ready 0"));
}

#[test]
fn refusal_reasons_are_snake_case_labels() {
    let node = TestNode::start(&[]);
    let (status, _, _) = common::raw_upgrade(node.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 426);
    assert_eq!(
        common::Client::connect(node.addr, "not-a-token").err(),
        Some(401)
    );
    let text = node.metrics();
    assert!(
        text.contains("courier_handshake_refusals_total{reason=\"websocket_upgrade_required\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("courier_auth_failures_total{reason=\"token_invalid\"} 1"),
        "{text}"
    );
}
