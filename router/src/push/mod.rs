//! Push notifications: waking devices that have no live session.
//!
//! Two halves, on two threads:
//!
//! ```text
//!  router thread                                   push thread (tokio, current-thread)
//!  ─────────────                                   ──────────────────────────────────
//!  send ─► device offline + token? ─► Queue        Worker: per provider a semaphore
//!          (record in the batch's WriteSet)        (concurrency) and a token bucket
//!  Delivered / Sync ─► cancel                      (rate), retries with backoff +
//!  Read elsewhere   ─► badge job                   jitter honouring Retry-After
//!  tick: due ─► Job ──────────── channel ────────► webhook │ FCM v1 │ APNs (HTTP/2)
//!  Command::Push(Outcome) ◄───── submit ────────── result: sent, failed, token invalid
//!  (delete record, remove token)
//! ```
//!
//! The router thread stays the only writer of the store: the worker never
//! touches it, it reports what happened and the router decides. What the
//! worker is given never holds a message's plaintext: the conversation,
//! the sender, a count, and the opaque body only for a device that opted in.
//!
//! [`Queue`] is the router's bookkeeping (no I/O, a clock passed in);
//! [`Worker`] runs the providers. Both are public so the tests can drive
//! the worker against local fakes without a router.

mod apns;
mod fcm;
mod http;
mod metrics;
pub(crate) mod queue;
pub(crate) mod record;
mod webhook;
mod worker;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use courier_protocol::frame::PushProvider;

pub use metrics::PushMetrics;
pub(crate) use queue::{Queue, QueueKey};
pub(crate) use record::{QueueRecord, TokenRecord};
pub use worker::{JobSender, Worker};

/// Push settings. Push is off for a provider whose section is `None`; a
/// device cannot register a token for it.
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// How long a message waits for its device to come back (ack or sync)
    /// before the device is woken.
    pub delay: Duration,
    /// After a notification for a (device, conversation) went out, further
    /// messages of that conversation wait at least this long, so a steady
    /// stream wakes the phone once per window with a count.
    pub coalesce_window: Duration,
    /// Attempts per notification before it is given up (1 = no retry).
    pub max_attempts: u32,
    /// First retry delay; doubled each attempt, with full jitter.
    pub backoff_base: Duration,
    /// Longest wait between attempts, Retry-After included.
    pub backoff_max: Duration,
    /// Requests in flight at once, per provider.
    pub concurrency: usize,
    /// Requests started per second, per provider (a burst of a second's
    /// worth is allowed).
    pub rate_per_s: f64,
    /// Extra trusted root certificates (PEM) for the providers' TLS, beside
    /// the built-in web roots: a private webhook CA, or a test CA.
    pub ca_file: Option<PathBuf>,
    /// Largest ciphertext a notification carries for a device that opted
    /// in; a larger body is left out (the app fetches it when it connects).
    /// Providers cap payloads at 4 KiB.
    pub max_ciphertext: usize,
    pub webhook: Option<WebhookConfig>,
    pub fcm: Option<FcmConfig>,
    pub apns: Option<ApnsConfig>,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_secs(2),
            coalesce_window: Duration::from_secs(10),
            max_attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(300),
            concurrency: 64,
            rate_per_s: 500.0,
            ca_file: None,
            max_ciphertext: 2048,
            webhook: None,
            fcm: None,
            apns: None,
        }
    }
}

impl PushConfig {
    /// True when devices may register tokens for `provider`.
    pub fn enabled(&self, provider: PushProvider) -> bool {
        match provider {
            PushProvider::Webhook => self.webhook.is_some(),
            PushProvider::Fcm => self.fcm.is_some(),
            PushProvider::Apns => self.apns.is_some(),
        }
    }

    /// True when any provider is configured.
    pub fn any_enabled(&self) -> bool {
        PushProvider::ALL.iter().any(|p| self.enabled(*p))
    }

    /// Checks the values, naming the first one out of range.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.delay > Duration::from_secs(3600) {
            return Err(("push.delay", "must be at most an hour"));
        }
        if self.coalesce_window > Duration::from_secs(3600) {
            return Err(("push.coalesce_window", "must be at most an hour"));
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(("push.max_attempts", "must be between 1 and 100"));
        }
        if self.backoff_base.is_zero() || self.backoff_base > self.backoff_max {
            return Err((
                "push.backoff_base",
                "must be positive and at most backoff_max",
            ));
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(("push.concurrency", "must be between 1 and 10000"));
        }
        if !(self.rate_per_s.is_finite() && self.rate_per_s > 0.0) {
            return Err(("push.rate_per_s", "must be a positive number"));
        }
        Ok(())
    }
}

/// The generic webhook: a signed JSON POST per notification.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Where to POST (http or https).
    pub url: String,
    /// The HMAC-SHA256 key the signature header is made with.
    pub secret: Arc<[u8]>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &"<hmac key>")
            .finish()
    }
}

/// Firebase Cloud Messaging, HTTP v1.
#[derive(Clone)]
pub struct FcmConfig {
    /// The service account's key: `client_email`, `private_key` (PEM,
    /// RSA), `token_uri` and `project_id`, as the console exports them.
    pub account: ServiceAccount,
    /// Base URL of the send API; `/v1/projects/{id}/messages:send` is
    /// appended.
    pub endpoint: String,
}

impl fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmConfig")
            .field("project_id", &self.account.project_id)
            .field("endpoint", &self.endpoint)
            .field("account", &"<service account key>")
            .finish()
    }
}

/// The fields of a service-account JSON key that FCM needs.
#[derive(Clone, serde::Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: String,
    pub token_uri: String,
    pub project_id: String,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("project_id", &self.project_id)
            .field("private_key", &"<rsa key>")
            .finish()
    }
}

impl ServiceAccount {
    /// Parses a service-account JSON key file's contents.
    pub fn from_json(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("not a service-account key: {e}"))
    }
}

/// Apple Push Notification service, token-based (a .p8 signing key).
#[derive(Clone)]
pub struct ApnsConfig {
    /// The signing key: PKCS#8 PEM of a P-256 key (Apple's .p8 file).
    pub key_pem: Arc<str>,
    /// The key's id (the JWT header's `kid`).
    pub key_id: String,
    /// The team id (the JWT's `iss`).
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// Base URL; `/3/device/{token}` is appended. HTTP/2 over TLS.
    pub endpoint: String,
    /// How long one provider token is reused. Apple refuses tokens older
    /// than an hour and refreshes more often than every 20 minutes.
    pub token_ttl: Duration,
}

impl fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("endpoint", &self.endpoint)
            .field("key", &"<p8 signing key>")
            .finish()
    }
}

/// What a notification says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Messages wait in `conversation`: `count` of them since the last
    /// notification, the newest `seq` from `sender`.
    Message {
        conversation: String,
        sender: String,
        sender_device: u32,
        count: u32,
        seq: u64,
        /// The newest message's opaque body, for a device that opted in.
        ciphertext: Option<Bytes>,
    },
    /// A silent update: `conversation` now has `unread` entries unread
    /// (read on another device).
    Badge { conversation: String, unread: u64 },
}

/// One notification for the worker.
#[derive(Clone)]
pub struct Job {
    /// The router's name for it, echoed in the [`Outcome`].
    pub id: u64,
    pub provider: PushProvider,
    /// The device's token at the provider.
    pub token: String,
    /// The device it wakes (for the outcome and the webhook body).
    pub user: String,
    pub device: u32,
    pub payload: Payload,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("token", &"<push token>")
            .finish_non_exhaustive()
    }
}

/// What became of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted it.
    Sent { id: u64 },
    /// The provider said the token is no longer valid: remove it.
    InvalidToken {
        id: u64,
        user: String,
        device: u32,
        token: String,
    },
    /// Given up: a permanent refusal or every attempt failed.
    Failed { id: u64, reason: &'static str },
}

impl Outcome {
    /// The job this is about.
    pub fn id(&self) -> u64 {
        match self {
            Self::Sent { id } | Self::InvalidToken { id, .. } | Self::Failed { id, .. } => *id,
        }
    }
}

/// Where the worker hands its outcomes (the router's command channel; a
/// test's channel).
pub type OutcomeSink = Arc<dyn Fn(Outcome) + Send + Sync>;
