//! The router's Prometheus metrics. Labels never carry a user, device or
//! conversation: their number would grow with the user base.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Latency buckets, in seconds: 50 µs to 10 s. The gateway's histograms use
/// the same bounds, so the hops of a message compare bucket by bucket. The
/// bounds go past 1 s so that `histogram_quantile` can report a p99 above
/// the 1 s the alert rules watch; with 1 s as the last bound it would never
/// read more than 1.0.
pub(crate) const LATENCY_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// The `code` label of `courier_send_errors_total`: an `ErrorCode::name()`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

/// The `kind` label of `courier_prekeys_handed_total`: `one_time` or
/// `last_resort`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// The `source` label of `courier_router_entry_reads_total`: `memory` (the
/// recent entries) or `store`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

/// Handles to every router metric. Created once per router and registered
/// in the registry the gateway serves.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// One observation per durable commit (one fdatasync).
    pub commit_duration: Histogram,
    /// One observation per batch written to the store before its sync:
    /// the memtable inserts, and when a memtable fills, its seal and the
    /// journal rotation that comes with it.
    pub write_duration: Histogram,
    /// Commands per batch.
    pub batch_commands: Histogram,
    /// Bytes in the store's memtables after the last commit.
    pub store_write_buffer: Gauge,
    /// Bytes the recent entries hold, as counted against their limit.
    pub recent_entries_bytes: Gauge,
    /// Catch-up and history reads of a conversation's entries answered by
    /// the recent entries, and by the store.
    pub entry_reads_memory: Counter,
    pub entry_reads_store: Counter,
    /// From the gateway reading a send to its `Sent` being handed out.
    pub sent_ack_duration: Histogram,
    /// From the gateway reading a send to the router starting to decide
    /// it: the hop across the command queue.
    pub queue_wait_duration: Histogram,
    /// Messages made durable (membership entries are not counted).
    pub messages_stored: Counter,
    /// Sends answered with an error, by code.
    pub send_errors: Family<CodeLabel, Counter>,
    /// Commands submitted and not yet taken by the router thread.
    pub queue_depth: Gauge,
    /// Commits that failed (each fails its whole batch).
    pub commit_failures: Counter,
    /// Device routes currently attached.
    pub routes_online: Gauge,
    /// Device presence records (last seen) written to the store.
    pub presence_writes: Counter,
    /// Device presence records waiting for the write rate.
    pub presence_pending: Gauge,
    /// Presence changes pushed to subscribed sessions.
    pub presence_pushes: Counter,
    /// Typing events relayed to sessions.
    pub typing_relayed: Counter,
    /// Typing events refused over a user's typing rate.
    pub typing_limited: Counter,
    /// One-time prekeys stored, over every device.
    pub prekey_stock: Gauge,
    /// Prekeys handed out in bundles, by kind.
    pub prekeys_handed: Family<KindLabel, Counter>,
    /// Low-prekey notices pushed to devices.
    pub prekey_low: Counter,
    /// Identity key changes announced.
    pub key_changes: Counter,
    /// Per-device sends refused for a device-list mismatch.
    pub device_mismatches: Counter,
    /// Fleet mode: device-list queries sent to other partitions.
    pub peer_queries: Counter,
    /// Fleet mode: per-device sends answered 504 because a partition did
    /// not send its device lists in time.
    pub peer_timeouts: Counter,
    /// Fleet mode: sessions detached because their gateway was gone.
    pub gateway_sessions_dropped: Counter,
    /// Fleet mode: reliable messages to other partitions not acknowledged
    /// yet (token copies, dead tokens, unlinks).
    pub peer_outbox: Gauge,
    /// Fleet mode: reliable messages sent again for want of an answer.
    pub peer_resent: Counter,
    /// Fleet mode: changelog snapshots.
    pub snapshots: SnapshotMetrics,
}

/// Fleet mode: the partition's changelog snapshots.
#[derive(Clone, Debug, Default)]
pub struct SnapshotMetrics {
    /// Snapshots completed.
    pub taken: Counter,
    /// Snapshots that failed (the log refused or was unreachable).
    pub failures: Counter,
    /// The size of the last complete snapshot.
    pub bytes: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        // Both sources are listed from the start; the handles share the
        // family's counters. (Each guard `get_or_create` returns is dropped
        // before the next call, which takes the family's lock to write.)
        let reads = Family::<SourceLabel, Counter>::default();
        let from_memory = reads
            .get_or_create(&SourceLabel { source: "memory" })
            .clone();
        let from_store = reads
            .get_or_create(&SourceLabel { source: "store" })
            .clone();
        let m = Self {
            commit_duration: Histogram::new(LATENCY_BUCKETS),
            write_duration: Histogram::new(LATENCY_BUCKETS),
            batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            store_write_buffer: Gauge::default(),
            recent_entries_bytes: Gauge::default(),
            entry_reads_memory: from_memory,
            entry_reads_store: from_store,
            sent_ack_duration: Histogram::new(LATENCY_BUCKETS),
            queue_wait_duration: Histogram::new(LATENCY_BUCKETS),
            messages_stored: Counter::default(),
            send_errors: Family::default(),
            queue_depth: Gauge::default(),
            commit_failures: Counter::default(),
            routes_online: Gauge::default(),
            presence_writes: Counter::default(),
            presence_pending: Gauge::default(),
            presence_pushes: Counter::default(),
            typing_relayed: Counter::default(),
            typing_limited: Counter::default(),
            prekey_stock: Gauge::default(),
            prekeys_handed: Family::default(),
            prekey_low: Counter::default(),
            key_changes: Counter::default(),
            device_mismatches: Counter::default(),
            peer_queries: Counter::default(),
            peer_timeouts: Counter::default(),
            gateway_sessions_dropped: Counter::default(),
            peer_outbox: Gauge::default(),
            peer_resent: Counter::default(),
            snapshots: SnapshotMetrics::default(),
        };
        // Units are registered as such: the encoder appends the suffix to
        // the name and writes the OpenMetrics `# UNIT` line.
        registry.register_with_unit(
            "courier_store_commit_duration",
            "Time to make one batch durable: its fdatasync (fleet mode: its changelog append)",
            Unit::Seconds,
            m.commit_duration.clone(),
        );
        registry.register_with_unit(
            "courier_store_write_duration",
            "Time to write one batch into the store before its sync (a memtable seal and journal rotation included)",
            Unit::Seconds,
            m.write_duration.clone(),
        );
        registry.register_with_unit(
            "courier_store_write_buffer",
            "Bytes held in the store's memtables (bounded by the store's write buffer limit)",
            Unit::Bytes,
            m.store_write_buffer.clone(),
        );
        registry.register_with_unit(
            "courier_router_recent_entries",
            "Bytes held by the router's recent entries (the newest messages, read by catch-up and history)",
            Unit::Bytes,
            m.recent_entries_bytes.clone(),
        );
        registry.register(
            "courier_router_entry_reads",
            "Reads of a conversation's entries by catch-up and history, by where they were answered: memory (the recent entries) or store",
            reads,
        );
        registry.register(
            "courier_router_batch_commands",
            "Commands handled per router batch",
            m.batch_commands.clone(),
        );
        registry.register_with_unit(
            "courier_router_queue_wait_duration",
            "From the gateway reading a send to the router deciding it (the command queue hop)",
            Unit::Seconds,
            m.queue_wait_duration.clone(),
        );
        registry.register_with_unit(
            "courier_sent_ack_duration",
            "From the gateway reading a send to the router emitting its SENT ack",
            Unit::Seconds,
            m.sent_ack_duration.clone(),
        );
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "courier_messages_stored",
            "Messages made durable",
            m.messages_stored.clone(),
        );
        registry.register(
            "courier_send_errors",
            "Sends answered with an error frame, by code",
            m.send_errors.clone(),
        );
        registry.register(
            "courier_router_queue_depth",
            "Commands waiting for the router thread",
            m.queue_depth.clone(),
        );
        registry.register(
            "courier_store_commit_failures",
            "Store commits that failed; every send in the batch was refused",
            m.commit_failures.clone(),
        );
        registry.register(
            "courier_routes_online",
            "Device routes attached to this router",
            m.routes_online.clone(),
        );
        registry.register(
            "courier_presence_writes",
            "Device last-seen records written to the store",
            m.presence_writes.clone(),
        );
        registry.register(
            "courier_presence_pending_writes",
            "Device last-seen records waiting for the presence write rate",
            m.presence_pending.clone(),
        );
        registry.register(
            "courier_presence_pushes",
            "Presence changes pushed to subscribed sessions",
            m.presence_pushes.clone(),
        );
        registry.register(
            "courier_typing_relayed",
            "Typing events relayed to sessions",
            m.typing_relayed.clone(),
        );
        registry.register(
            "courier_typing_rate_limited",
            "Typing events refused over the user's typing rate",
            m.typing_limited.clone(),
        );
        registry.register(
            "courier_prekeys_stock",
            "One-time prekeys stored, over every device",
            m.prekey_stock.clone(),
        );
        registry.register(
            "courier_prekeys_handed",
            "Prekeys handed out in key bundles, by kind (one_time, last_resort)",
            m.prekeys_handed.clone(),
        );
        registry.register(
            "courier_prekeys_low",
            "Notices pushed to devices whose one-time prekeys ran low",
            m.prekey_low.clone(),
        );
        registry.register(
            "courier_identity_key_changes",
            "Device identity keys replaced by a different one",
            m.key_changes.clone(),
        );
        registry.register(
            "courier_device_mismatches",
            "Per-device sends refused because their device list was wrong",
            m.device_mismatches.clone(),
        );
        registry.register(
            "courier_peer_device_queries",
            "Fleet mode: device-list queries sent to other partitions",
            m.peer_queries.clone(),
        );
        registry.register(
            "courier_peer_device_timeouts",
            "Fleet mode: per-device sends refused because device lists did not arrive in time",
            m.peer_timeouts.clone(),
        );
        registry.register(
            "courier_gateway_sessions_dropped",
            "Fleet mode: sessions detached because their gateway's liveness key expired or it restarted",
            m.gateway_sessions_dropped.clone(),
        );
        registry.register(
            "courier_peer_outbox_messages",
            "Fleet mode: messages to other partitions waiting for their acknowledgement",
            m.peer_outbox.clone(),
        );
        registry.register(
            "courier_peer_resent",
            "Fleet mode: messages to other partitions sent again for want of an acknowledgement",
            m.peer_resent.clone(),
        );
        registry.register(
            "courier_changelog_snapshots",
            "Fleet mode: snapshots of the partition's store written to its changelog",
            m.snapshots.taken.clone(),
        );
        registry.register(
            "courier_changelog_snapshot_failures",
            "Fleet mode: changelog snapshots that could not be written",
            m.snapshots.failures.clone(),
        );
        registry.register_with_unit(
            "courier_changelog_snapshot_size",
            "Fleet mode: size of the partition's last complete changelog snapshot",
            prometheus_client::registry::Unit::Bytes,
            m.snapshots.bytes.clone(),
        );
        m
    }
}
