//! Metrics of a process's link to NATS: what each call cost, how often one
//! failed, the round trip to the server, and the client's own counters.
//!
//! A fleet's latency is the sum of its hops, and the hop over NATS is the
//! one an operator cannot see from the gateway's or the router's own
//! series: a changelog append's wait is inside the router's commit time, a
//! slow or lost server shows only as a slower fan-out. These series give
//! each call kind its own histogram (a JetStream append at R3 waits for a
//! majority of the replicas to store and fsync, a core publish only for the
//! local buffer), count the calls that failed (the caller retries most),
//! and probe the server's round trip every [`PROBE_INTERVAL`] with a
//! request no one answers: the server itself replies "no responders", so
//! the time is one trip through the server with nothing else in it.
//!
//! [`LinkMetrics::register`] adds them to a registry before NATS is
//! reached (so the endpoint can serve while the process waits for a
//! server); [`crate::nats::NatsConfig::metrics`] hands them to the
//! connection, which fills them from then on.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// How often the round trip to the server is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Bucket bounds of the link's histograms, in seconds: 50 µs (a loopback
/// round trip) to 10 s (past the 5 s request timeout, so a call that timed
/// out still lands in a finite bucket).
const BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// What a timed call did.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the label's values, as they are exported
pub enum Op {
    /// A JetStream publish, until the stream's acknowledgement.
    append,
    /// Reading a subject's last record (`last`, `last_if_id`).
    last,
    /// Replaying a subject, from the consumer's creation to the last record.
    replay,
    /// Deleting a subject's records below a sequence (after a snapshot).
    purge,
    kv_get,
    kv_create,
    kv_update,
    kv_put,
    kv_delete,
    kv_keys,
    /// A core NATS publish, until it is in the client's write buffer.
    publish,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: Op,
}

/// The link's series. Cheap to clone; every clone fills the same series.
#[derive(Clone, Debug)]
pub struct LinkMetrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    calls: Family<OpLabel, Histogram>,
    failures: Family<OpLabel, Counter>,
    rtt: Histogram,
    probe_failures: Counter,
    /// The connected client, once there is one (read at each scrape).
    client: OnceLock<async_nats::Client>,
}

impl LinkMetrics {
    /// Registers the link's series (`courier_nats_*`) in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let calls = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(BUCKETS.iter().copied())
        });
        let failures = Family::<OpLabel, Counter>::default();
        let rtt = Histogram::new(BUCKETS.iter().copied());
        let probe_failures = Counter::default();
        registry.register_with_unit(
            "courier_nats_call",
            "Time of each call over the NATS link, by kind, from its start until its answer (a JetStream append until the stream acknowledged it)",
            Unit::Seconds,
            calls.clone(),
        );
        registry.register(
            "courier_nats_call_failures",
            "Calls over the NATS link that failed, by kind (unreachable, timed out, refused); most are retried by their caller",
            failures.clone(),
        );
        registry.register_with_unit(
            "courier_nats_rtt",
            "Round trip to the NATS server, probed every 2 s with a request the server answers itself (no responders)",
            Unit::Seconds,
            rtt.clone(),
        );
        registry.register(
            "courier_nats_rtt_probe_failures",
            "Round-trip probes that got no answer within the request timeout",
            probe_failures.clone(),
        );
        let metrics = Self {
            inner: Arc::new(Inner {
                calls,
                failures,
                rtt,
                probe_failures,
                client: OnceLock::new(),
            }),
        };
        registry.register_collector(Box::new(ClientCollector(metrics.clone())));
        metrics
    }

    /// Records one call of kind `op` that took `took`.
    pub fn observe(&self, op: Op, took: Duration, ok: bool) {
        let label = OpLabel { op };
        self.inner
            .calls
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if !ok {
            self.inner.failures.get_or_create(&label).inc();
        }
    }

    pub(crate) fn probed(&self, took: Option<Duration>) {
        match took {
            Some(t) => self.inner.rtt.observe(t.as_secs_f64()),
            None => {
                self.inner.probe_failures.inc();
            }
        }
    }

    pub(crate) fn attach(&self, client: async_nats::Client) {
        let _ = self.inner.client.set(client);
    }
}

/// The client's own counters and its connection state, read at each
/// scrape; absent until the first connection.
#[derive(Debug)]
struct ClientCollector(LinkMetrics);

impl Collector for ClientCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(client) = self.0.inner.client.get() else {
            return Ok(());
        };
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        let g = ConstGauge::new(i64::from(connected));
        g.encode(encoder.encode_descriptor(
            "courier_nats_connected",
            "1 while the link to NATS is connected, 0 while it is reconnecting",
            None,
            g.metric_type(),
        )?)?;
        let stats = client.statistics();
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let counters: [(&str, &str, Option<Unit>, u64); 5] = [
            (
                "courier_nats_connects",
                "Connections made to a NATS server, the first one included (so reconnects are this less one)",
                None,
                stats.connects.load(relaxed),
            ),
            (
                "courier_nats_sent_messages",
                "Messages this process sent over the link",
                None,
                stats.out_messages.load(relaxed),
            ),
            (
                "courier_nats_received_messages",
                "Messages this process received over the link",
                None,
                stats.in_messages.load(relaxed),
            ),
            (
                "courier_nats_sent",
                "Payload and header bytes this process sent over the link (the protocol's own bytes not counted)",
                Some(Unit::Bytes),
                stats.out_bytes.load(relaxed),
            ),
            (
                "courier_nats_received",
                "Payload and header bytes this process received over the link (the protocol's own bytes not counted)",
                Some(Unit::Bytes),
                stats.in_bytes.load(relaxed),
            ),
        ];
        for (name, help, unit, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, unit.as_ref(), c.metric_type())?)?;
        }
        Ok(())
    }
}
