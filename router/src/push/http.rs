//! The HTTP client the providers share: hyper 1 over rustls (ring), with
//! the built-in web roots and any extra roots the operator names.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Legacy;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A pooled client; cheap to clone.
pub(super) type Client = Legacy<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Longest a provider request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest answer body read; providers answer with small JSON.
const MAX_ANSWER: usize = 64 * 1024;

/// Why a provider attempt failed, and what the worker does about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// Try again, after `after` if the provider said (Retry-After).
    Retry {
        reason: &'static str,
        after: Option<Duration>,
    },
    /// The token is not (or no longer) valid: remove it.
    InvalidToken,
    /// Refused for good.
    Permanent { reason: &'static str },
}

impl Failure {
    /// The provider refused our credential (expired or revoked early): the
    /// caller dropped its cached one, so retry at once with a new one.
    pub(super) const CREDENTIAL_RENEWED: Self = Self::Retry {
        reason: "auth",
        after: Some(Duration::ZERO),
    };

    /// Getting a credential failed; retry after the usual backoff.
    pub(super) const CREDENTIAL_UNAVAILABLE: Self = Self::Retry {
        reason: "auth",
        after: None,
    };
}

/// An answer: status, headers, body.
pub(super) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The TLS settings: web roots plus the PEM certificates in `ca_file`.
pub(super) fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client speaking HTTP/1.1 or HTTP/2 (by ALPN) over http or https; with
/// `http2_only`, HTTP/2 over TLS only (APNs).
pub(super) fn client(tls: rustls::ClientConfig, http2_only: bool) -> Client {
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let connector = if http2_only {
        builder.https_only().enable_http2().build()
    } else {
        builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build()
    };
    Legacy::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .http2_only(http2_only)
        .build(connector)
}

/// Sends `req` and reads the answer; a transport failure or timeout is a
/// retryable failure.
pub(super) async fn exchange(
    client: &Client,
    req: Request<Full<Bytes>>,
) -> Result<Answer, Failure> {
    let transport = |reason| Failure::Retry {
        reason,
        after: None,
    };
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.request(req))
        .await
        .map_err(|_| transport("timeout"))?
        .map_err(|e| {
            tracing::debug!(error = %e, "push request failed");
            transport("connect")
        })?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(body, MAX_ANSWER).collect())
        .await
        .map_err(|_| transport("timeout"))?
        .map_err(|_| transport("read"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Retry-After in seconds (an HTTP-date is not understood and reads as
/// absent, so the worker's own backoff applies).
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The failure for a status every provider treats alike: 429 and 5xx are
/// retried, honouring Retry-After.
pub(super) fn common_failure(a: &Answer) -> Option<Failure> {
    let reason = match a.status.as_u16() {
        429 => "rate_limited",
        500 => "server_error",
        502..=504 => "unavailable",
        _ => return None,
    };
    Some(Failure::Retry {
        reason,
        after: retry_after(&a.headers),
    })
}

/// Seconds since 1970.
pub(super) fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
