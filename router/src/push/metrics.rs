//! Push metrics, per provider. Labels carry a provider and a failure
//! reason, never a user, device or token.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::PushProvider;
use crate::metrics::LATENCY_BUCKETS;

/// The `provider` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: &'static str,
}

/// The labels of `courier_push_failed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    pub provider: &'static str,
    pub reason: &'static str,
}

/// Handles to every push metric; cloned into the router core and the
/// push worker.
#[derive(Clone, Debug)]
pub struct PushMetrics {
    /// Notifications the provider accepted.
    pub sent: Family<ProviderLabel, Counter>,
    /// Attempts that failed, by reason (each retry that fails counts).
    pub failed: Family<FailureLabel, Counter>,
    /// Attempts that were retried.
    pub retried: Family<ProviderLabel, Counter>,
    /// One provider request, from sending it to its answer.
    pub duration: Family<ProviderLabel, Histogram, fn() -> Histogram>,
    /// Jobs with the worker, not yet done (waiting for a slot, the rate,
    /// a retry or an answer).
    pub queue_depth: Family<ProviderLabel, Gauge>,
    /// Tokens removed because the provider called them invalid.
    pub tokens_removed: Family<ProviderLabel, Counter>,
    /// Notifications waiting in the router for their delay.
    pub scheduled: Gauge,
    /// Notifications cancelled because the device acked or synced first.
    pub cancelled: Counter,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl PushMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::unregistered();
        registry.register(
            "courier_push_sent",
            "Push notifications the provider accepted",
            m.sent.clone(),
        );
        registry.register(
            "courier_push_failed",
            "Push attempts that failed, by provider and reason",
            m.failed.clone(),
        );
        registry.register(
            "courier_push_retried",
            "Push attempts retried after a failure",
            m.retried.clone(),
        );
        registry.register_with_unit(
            "courier_push_request_duration",
            "One push provider request, from sending it to its answer",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "courier_push_queue_depth",
            "Push jobs handed to the worker and not yet done",
            m.queue_depth.clone(),
        );
        registry.register(
            "courier_push_tokens_removed",
            "Push tokens removed after the provider called them invalid",
            m.tokens_removed.clone(),
        );
        registry.register(
            "courier_push_scheduled",
            "Push notifications waiting in the router for their delay",
            m.scheduled.clone(),
        );
        registry.register(
            "courier_push_cancelled",
            "Push notifications cancelled because the device acked or synced first",
            m.cancelled.clone(),
        );
        m
    }

    /// The metrics without a registry (router unit tests).
    pub fn unregistered() -> Self {
        Self {
            sent: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            tokens_removed: Family::default(),
            scheduled: Gauge::default(),
            cancelled: Counter::default(),
        }
    }

    pub(crate) fn provider(p: PushProvider) -> ProviderLabel {
        ProviderLabel { provider: p.name() }
    }
}
