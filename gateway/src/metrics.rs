//! The gateway's metrics and the HTTP endpoint that serves them.
//!
//! Metrics are prometheus-client atomics shared by every core. The endpoint
//! runs hyper on its own thread with a small tokio runtime, apart from the
//! cores, so a scrape never competes with session I/O on a core's loop.
//! Paths: `/metrics` (OpenMetrics text), `/healthz` (the process is up),
//! `/readyz` (the node takes new sessions; 503 while shutting down), and
//! the operator's `/admin/` endpoints ([`crate::admin`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use courier_router::fleet::PartitionMetrics;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::admin::{self, Access};
use crate::core::Shared;

/// Latency buckets in seconds, the same as the router's histograms use
/// (50 µs to 10 s; a test compares the two on a running node), so the
/// hops of a message compare bucket by bucket.
const LATENCY_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Label set naming a gateway core.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoreLabel {
    /// The core's number.
    pub core: String,
}

/// Label set naming a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why, in snake case (`token_expired`).
    pub reason: String,
}

impl ReasonLabel {
    /// The label for a refusal's reason text ("token expired" becomes
    /// `token_expired`). Reasons are fixed strings in the code, so the
    /// label's values are a small fixed set.
    pub fn from_reason(reason: &str) -> Self {
        let mut out = String::with_capacity(reason.len());
        for c in reason.chars() {
            if c.is_ascii_alphanumeric() {
                out.push(c.to_ascii_lowercase());
            } else if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
        }
        while out.ends_with('_') {
            out.pop();
        }
        Self { reason: out }
    }
}

/// Label set of `courier_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    /// The crate version.
    pub version: String,
}

/// Label set naming a close code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The WebSocket close code.
    pub code: String,
}

/// Everything the gateway counts.
#[derive(Debug)]
pub struct GatewayMetrics {
    /// Open sessions per core.
    pub connections: Family<CoreLabel, Gauge>,
    /// Bytes waiting in outbound queues, per core (sampled each second).
    pub outbound_queue_bytes: Family<CoreLabel, Gauge>,
    /// WebSocket data frames read from clients.
    pub frames_in: Counter,
    /// WebSocket frames written to clients.
    pub frames_out: Counter,
    /// `Send` frames read from clients.
    pub messages_in: Counter,
    /// Live messages written to recipients' sockets.
    pub messages_out: Counter,
    /// Gateway receipt of a send to its write on a recipient's socket.
    pub delivery_latency: Histogram,
    /// From writing a live message on a recipient's socket to that device's
    /// `Delivered` for it, sampled (see `probe`).
    pub device_ack_latency: Histogram,
    /// Sends refused by a session's own gate, before the router.
    pub gateway_send_refusals: Counter,
    /// Typing indicators refused by a session's own gate, before the router.
    pub gateway_typing_refusals: Counter,
    /// Sessions closed because their outbound queue stayed full.
    pub slow_consumer_closes: Counter,
    /// Of those, the ones closed for the process-wide outbound cap.
    pub outbound_cap_closes: Counter,
    /// Typing and presence frames dropped while the process's outbound
    /// queues were over their cap.
    pub ephemeral_shed: Counter,
    /// 1 while the process's outbound queues are over their cap.
    pub outbound_pressure: Gauge,
    /// Upgrades refused because of the token, by reason.
    pub auth_failures: Family<ReasonLabel, Counter>,
    /// Upgrades refused for other reasons, by reason.
    pub handshake_refusals: Family<ReasonLabel, Counter>,
    /// Sessions closed, by close code.
    pub closes: Family<CodeLabel, Counter>,
    /// Files of the browser client served on the WebSocket listener.
    pub web_files: Counter,
    /// Accept errors (out of file descriptors and the like).
    pub accept_errors: Counter,
    /// Frames refused because the router's queue was full.
    pub router_refusals: Counter,
    /// Always 1, labelled with the version: joins a version to any series.
    pub build_info: Family<BuildLabel, Gauge>,
    /// 1 while the node takes new sessions, 0 once it drains (as `/readyz`).
    pub ready: Gauge,
}

impl GatewayMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            connections: Family::default(),
            outbound_queue_bytes: Family::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            delivery_latency: Histogram::new(LATENCY_BUCKETS),
            device_ack_latency: Histogram::new(LATENCY_BUCKETS),
            gateway_send_refusals: Counter::default(),
            gateway_typing_refusals: Counter::default(),
            slow_consumer_closes: Counter::default(),
            outbound_cap_closes: Counter::default(),
            ephemeral_shed: Counter::default(),
            outbound_pressure: Gauge::default(),
            auth_failures: Family::default(),
            handshake_refusals: Family::default(),
            closes: Family::default(),
            web_files: Counter::default(),
            accept_errors: Counter::default(),
            router_refusals: Counter::default(),
            build_info: Family::default(),
            ready: Gauge::default(),
        };
        m.ready.set(1);
        m.build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        let r = registry;
        r.register(
            "courier_gateway_connections",
            "Open sessions per core",
            m.connections.clone(),
        );
        r.register_with_unit(
            "courier_outbound_queue",
            "Bytes queued for clients, per core",
            Unit::Bytes,
            m.outbound_queue_bytes.clone(),
        );
        r.register(
            "courier_frames_in",
            "WebSocket data frames read from clients",
            m.frames_in.clone(),
        );
        r.register(
            "courier_frames_out",
            "WebSocket frames written to clients",
            m.frames_out.clone(),
        );
        r.register(
            "courier_messages_in",
            "Send frames read from clients",
            m.messages_in.clone(),
        );
        r.register(
            "courier_messages_out",
            "Live messages written to recipient sockets",
            m.messages_out.clone(),
        );
        r.register_with_unit(
            "courier_delivery_duration",
            "From the gateway reading a send to writing it on a recipient's socket",
            Unit::Seconds,
            m.delivery_latency.clone(),
        );
        r.register_with_unit(
            "courier_device_ack_duration",
            "From writing a live message on a recipient's socket to that device's Delivered for it (sampled: one message in flight per session)",
            Unit::Seconds,
            m.device_ack_latency.clone(),
        );
        r.register(
            "courier_gateway_send_refusals",
            "Sends refused by the session's own gate (over twice the user's send rate) before reaching the router",
            m.gateway_send_refusals.clone(),
        );
        r.register(
            "courier_gateway_typing_refusals",
            "Typing indicators refused by the session's own gate (over twice the user's typing rate) before reaching the router",
            m.gateway_typing_refusals.clone(),
        );
        r.register(
            "courier_outbound_ephemeral_shed",
            "Typing and presence frames dropped while outbound queues were over the process cap",
            m.ephemeral_shed.clone(),
        );
        r.register(
            "courier_outbound_pressure",
            "1 while the outbound queues of the process are over --max-outbound-total-bytes",
            m.outbound_pressure.clone(),
        );
        r.register(
            "courier_slow_consumer_closes",
            "Sessions closed (4003) because their outbound queue stayed full, or for the process-wide outbound cap",
            m.slow_consumer_closes.clone(),
        );
        r.register(
            "courier_outbound_cap_closes",
            "Of the slow-consumer closes, those made because the process's outbound queues together were over max_outbound_total_bytes (the largest queues are closed first)",
            m.outbound_cap_closes.clone(),
        );
        r.register(
            "courier_auth_failures",
            "Upgrades refused for the token",
            m.auth_failures.clone(),
        );
        r.register(
            "courier_handshake_refusals",
            "Upgrades refused for other reasons",
            m.handshake_refusals.clone(),
        );
        r.register(
            "courier_session_closes",
            "Sessions closed, by close code",
            m.closes.clone(),
        );
        r.register(
            "courier_web_files",
            "Files of the browser client served on the WebSocket listener",
            m.web_files.clone(),
        );
        r.register(
            "courier_accept_errors",
            "Errors accepting connections",
            m.accept_errors.clone(),
        );
        r.register(
            "courier_router_refusals",
            "Frames refused because the router queue was full (answered with an error)",
            m.router_refusals.clone(),
        );
        r.register(
            "courier_ready",
            "1 while the node takes new sessions, 0 once it drains",
            m.ready.clone(),
        );
        r.register(
            "courier_build_info",
            "Always 1; the version of the running gateway",
            m.build_info.clone(),
        );
        Arc::new(m)
    }

    /// Counts an upgrade refused for its token.
    pub fn auth_failed(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&ReasonLabel::from_reason(reason))
            .inc();
    }

    /// Counts an upgrade refused for any other reason.
    pub fn handshake_refused(&self, reason: &str) {
        self.handshake_refusals
            .get_or_create(&ReasonLabel::from_reason(reason))
            .inc();
    }

    /// Counts a session closed with `code`.
    pub fn closed(&self, code: u16) {
        self.closes
            .get_or_create(&CodeLabel {
                code: code.to_string(),
            })
            .inc();
    }
}

/// Serves the registry and the admin endpoints ([`crate::admin`]) on
/// `addr` until the process exits. `shared.ready` is false once the node
/// starts shutting down. The listener is bound before this returns, so a
/// bind error stops the start.
pub fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shared: Arc<Shared>,
    access: Access,
) -> std::io::Result<SocketAddr> {
    let ready = shared.ready.clone();
    let registry = Arc::new(Served {
        registry,
        partitions: None,
    });
    serve_with(addr, registry, ready, Some(Arc::new((shared, access))))
}

/// Serves `/metrics`, `/healthz` and `/readyz` (ready while `ready` is
/// true) on `addr`, without the admin endpoints: the router role's
/// endpoint, which holds no sessions to administer. `/metrics` also
/// carries the metrics of the partitions in `partitions`, each labelled
/// with its partition.
pub fn serve_plain(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    partitions: Arc<PartitionMetrics>,
) -> std::io::Result<SocketAddr> {
    let registry = Arc::new(Served {
        registry,
        partitions: Some(partitions),
    });
    serve_with(addr, registry, ready, None)
}

/// What `/metrics` encodes: the process's registry, then the metrics of
/// the partitions a fleet router serves.
struct Served {
    registry: Arc<Registry>,
    partitions: Option<Arc<PartitionMetrics>>,
}

impl Served {
    fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)?;
        if let Some(partitions) = &self.partitions {
            partitions.encode(out)?;
        }
        prometheus_client::encoding::text::encode_eof(out)
    }
}

fn serve_with(
    addr: SocketAddr,
    registry: Arc<Served>,
    ready: Arc<AtomicBool>,
    admin: Option<Arc<(Arc<Shared>, Access)>>,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (registry, ready, admin) = (registry.clone(), ready.clone(), admin.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (registry, ready, admin) =
                                (registry.clone(), ready.clone(), admin.clone());
                            async move {
                                let response = match &admin {
                                    Some(a) if req.uri().path().starts_with("/admin/") => {
                                        admin::respond(&req, &a.0, &a.1).await
                                    }
                                    _ => respond(&req, &registry, &ready),
                                };
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
        })?;
    Ok(local)
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    registry: &Served,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r
    };
    match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            if registry.encode(&mut body).is_err() {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
            }
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
