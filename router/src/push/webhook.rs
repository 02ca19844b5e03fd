//! The generic webhook: one JSON POST per notification, signed so the
//! receiver can tell it came from this node and is fresh.
//!
//! Headers: `X-Courier-Timestamp` (seconds since 1970) and
//! `X-Courier-Signature: sha256=<hex>`, the HMAC-SHA256 with the shared
//! secret of `<timestamp>.<body>`. A receiver recomputes it, compares in
//! constant time and refuses timestamps older than a few minutes. 2xx is
//! success, 404 and 410 mean the token is gone, 429 and 5xx are retried.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::Request;
use sha2::Sha256;

use super::http::{self, Client, Failure};
use super::{Job, Payload, WebhookConfig};

/// The webhook provider.
pub(super) struct Webhook {
    config: WebhookConfig,
    client: Client,
}

impl Webhook {
    pub fn new(config: WebhookConfig, client: Client) -> Self {
        Self { config, client }
    }

    pub async fn send(&self, job: &Job) -> Result<(), Failure> {
        let body = serde_json::to_vec(&body(job)).unwrap_or_default();
        let ts = http::unix_s();
        let req = Request::post(&self.config.url)
            .header("content-type", "application/json")
            .header("x-courier-timestamp", ts.to_string())
            .header(
                "x-courier-signature",
                signature(&self.config.secret, ts, &body),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Failure::Permanent {
                reason: "bad_request",
            })?;
        let a = http::exchange(&self.client, req).await?;
        match a.status.as_u16() {
            200..=299 => Ok(()),
            404 | 410 => Err(Failure::InvalidToken),
            _ => Err(http::common_failure(&a).unwrap_or(Failure::Permanent { reason: "rejected" })),
        }
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `<ts>.<body>` under `secret`.
pub fn signature(secret: &[u8], ts: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn body(job: &Job) -> serde_json::Value {
    use base64::Engine as _;
    let mut v = serde_json::json!({
        "token": job.token,
        "user": job.user,
        "device": job.device,
    });
    match &job.payload {
        Payload::Message {
            conversation,
            sender,
            sender_device,
            count,
            seq,
            ciphertext,
        } => {
            v["type"] = "message".into();
            v["conversation"] = conversation.as_str().into();
            v["sender"] = sender.as_str().into();
            v["sender_device"] = (*sender_device).into();
            v["count"] = (*count).into();
            v["seq"] = (*seq).into();
            if let Some(c) = ciphertext {
                v["ciphertext"] = base64::engine::general_purpose::STANDARD.encode(c).into();
            }
        }
        Payload::Badge {
            conversation,
            unread,
        } => {
            v["type"] = "badge".into();
            v["conversation"] = conversation.as_str().into();
            v["unread"] = (*unread).into();
        }
    }
    v
}
