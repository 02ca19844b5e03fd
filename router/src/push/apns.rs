//! Apple Push Notification service: the HTTP/2 provider API with a token
//! (.p8) key.
//!
//! Auth: an ES256 JWT (`kid` the key id, `iss` the team id, `iat` now),
//! reused for `token_ttl` (30 minutes by default: Apple refuses one older
//! than an hour and throttles refreshing more often than every 20) and
//! made anew early after `ExpiredProviderToken`. Send:
//! `POST {endpoint}/3/device/{token}` over HTTP/2 and TLS with
//! `apns-topic`, `apns-push-type` (`alert` for messages, `background` for
//! a badge update), `apns-priority` (10, or 5 for background),
//! `apns-expiration` (a day) and, for messages, `apns-collapse-id` (the
//! conversation, hashed when longer than Apple's 64 bytes). The alert is
//! a localisation key with the sender and count as arguments, never text
//! of the message; `mutable-content` lets the app's extension decrypt the
//! ciphertext when the device opted in. 410, and 400 with `BadDeviceToken`
//! or `DeviceTokenNotForTopic`, remove the token.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sha2::{Digest, Sha256};

use super::http::{self, Client, Failure};
use super::{ApnsConfig, Job, Payload};

/// How long a notification may wait at Apple for an unreachable device.
const EXPIRATION: Duration = Duration::from_secs(24 * 3600);

/// The APNs provider.
pub(super) struct Apns {
    config: ApnsConfig,
    key: EncodingKey,
    client: Client,
    /// The provider token and when it was made.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

impl Apns {
    pub fn new(config: ApnsConfig, client: Client) -> Result<Self, String> {
        let key = EncodingKey::from_ec_pem(config.key_pem.as_bytes())
            .map_err(|e| format!("APNs key is not a PKCS#8 P-256 PEM key: {e}"))?;
        Ok(Self {
            config,
            key,
            client,
            token: tokio::sync::Mutex::new(None),
        })
    }

    pub async fn send(&self, job: &Job) -> Result<(), Failure> {
        let bearer = self.provider_token().await?;
        let url = format!(
            "{}/3/device/{}",
            self.config.endpoint.trim_end_matches('/'),
            job.token
        );
        let expiration = http::unix_s() + EXPIRATION.as_secs();
        let mut req = Request::post(url)
            .header("authorization", format!("bearer {bearer}"))
            .header("apns-topic", &self.config.topic)
            .header("apns-expiration", expiration.to_string());
        req = match &job.payload {
            Payload::Message { conversation, .. } => req
                .header("apns-push-type", "alert")
                .header("apns-priority", "10")
                .header("apns-collapse-id", collapse_id(conversation)),
            Payload::Badge { .. } => req
                .header("apns-push-type", "background")
                .header("apns-priority", "5"),
        };
        let body = serde_json::to_vec(&payload(job)).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Failure::Permanent {
                reason: "bad_request",
            })?;
        let a = http::exchange(&self.client, req).await?;
        let reason = serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|v| v["reason"].as_str().map(str::to_owned));
        match (a.status.as_u16(), reason.as_deref()) {
            (200, _) => Ok(()),
            (410, _) | (400, Some("BadDeviceToken" | "DeviceTokenNotForTopic")) => {
                Err(Failure::InvalidToken)
            }
            (403, Some("ExpiredProviderToken" | "InvalidProviderToken")) => {
                *self.token.lock().await = None;
                Err(Failure::CREDENTIAL_RENEWED)
            }
            _ => Err(http::common_failure(&a).unwrap_or(Failure::Permanent { reason: "rejected" })),
        }
    }

    async fn provider_token(&self) -> Result<String, Failure> {
        let mut slot = self.token.lock().await;
        if let Some((token, made)) = slot.as_ref() {
            if made.elapsed() < self.config.token_ttl {
                return Ok(token.clone());
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.config.key_id.clone());
        let claims = Claims {
            iss: &self.config.team_id,
            iat: http::unix_s(),
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|_| Failure::Permanent { reason: "jwt" })?;
        *slot = Some((token.clone(), Instant::now()));
        Ok(token)
    }
}

/// The conversation id, or the hex of its SHA-256's first 32 bytes when it
/// is over Apple's 64-byte limit.
fn collapse_id(conversation: &str) -> String {
    if conversation.len() <= 64 {
        return conversation.to_owned();
    }
    Sha256::digest(conversation.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn payload(job: &Job) -> serde_json::Value {
    use base64::Engine as _;
    match &job.payload {
        Payload::Message {
            conversation,
            sender,
            sender_device,
            count,
            seq,
            ciphertext,
        } => {
            let mut v = serde_json::json!({
                "aps": {
                    "alert": {"loc-key": "COURIER_NEW_MESSAGES", "loc-args": [sender, count.to_string()]},
                    "sound": "default",
                    "mutable-content": 1,
                    "thread-id": conversation,
                },
                "conversation": conversation,
                "sender": sender,
                "sender_device": sender_device,
                "count": count,
                "seq": seq,
            });
            if let Some(c) = ciphertext {
                v["ciphertext"] = base64::engine::general_purpose::STANDARD.encode(c).into();
            }
            v
        }
        Payload::Badge {
            conversation,
            unread,
        } => serde_json::json!({
            "aps": {"content-available": 1, "badge": unread},
            "conversation": conversation,
            "unread": unread,
        }),
    }
}
