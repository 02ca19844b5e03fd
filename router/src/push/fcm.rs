//! Firebase Cloud Messaging, HTTP v1.
//!
//! Auth: an RS256 JWT signed with the service account's key (`iss` the
//! account's email, `scope` firebase.messaging, `aud` the token URI, one
//! hour) is exchanged at the token URI (`grant_type` jwt-bearer) for an
//! OAuth2 access token, cached until shortly before it expires and dropped
//! early on a 401. Send: `POST {endpoint}/v1/projects/{project}/messages:send`
//! with a data-only message (the app draws the notification; no text of
//! the message is in it), high priority and the conversation as collapse
//! key. 404 or `UNREGISTERED` (and `SENDER_ID_MISMATCH`) remove the token;
//! 429 and 5xx are retried honouring Retry-After.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::http::{self, Client, Failure};
use super::{FcmConfig, Job, Payload};

/// The OAuth2 scope for sending.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The FCM provider.
pub(super) struct Fcm {
    config: FcmConfig,
    key: EncodingKey,
    client: Client,
    /// The access token and when to get a new one.
    access: tokio::sync::Mutex<Option<(String, Instant)>>,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

impl Fcm {
    pub fn new(config: FcmConfig, client: Client) -> Result<Self, String> {
        let key = EncodingKey::from_rsa_pem(config.account.private_key.as_bytes())
            .map_err(|e| format!("service account private_key is not an RSA PEM key: {e}"))?;
        Ok(Self {
            config,
            key,
            client,
            access: tokio::sync::Mutex::new(None),
        })
    }

    pub async fn send(&self, job: &Job) -> Result<(), Failure> {
        let token = self.access_token().await?;
        let url = format!(
            "{}/v1/projects/{}/messages:send",
            self.config.endpoint.trim_end_matches('/'),
            self.config.account.project_id
        );
        let body = serde_json::to_vec(&message(job)).unwrap_or_default();
        let req = Request::post(url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json; charset=UTF-8")
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Failure::Permanent {
                reason: "bad_request",
            })?;
        let a = http::exchange(&self.client, req).await?;
        let code = error_code(&a.body);
        match (a.status.as_u16(), code.as_deref()) {
            (200, _) => Ok(()),
            (_, Some("UNREGISTERED")) | (404, _) | (_, Some("SENDER_ID_MISMATCH")) => {
                Err(Failure::InvalidToken)
            }
            (401, _) => {
                // The access token was revoked or expired early.
                *self.access.lock().await = None;
                Err(Failure::CREDENTIAL_RENEWED)
            }
            _ => Err(http::common_failure(&a).unwrap_or(Failure::Permanent { reason: "rejected" })),
        }
    }

    async fn access_token(&self) -> Result<String, Failure> {
        let mut slot = self.access.lock().await;
        if let Some((token, refresh_at)) = slot.as_ref() {
            if Instant::now() < *refresh_at {
                return Ok(token.clone());
            }
        }
        let account = &self.config.account;
        let iat = http::unix_s();
        let claims = Claims {
            iss: &account.client_email,
            scope: SCOPE,
            aud: &account.token_uri,
            iat,
            exp: iat + 3600,
        };
        let assertion = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &self.key)
            .map_err(|_| Failure::Permanent { reason: "jwt" })?;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let req = Request::post(&account.token_uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(|_| Failure::Permanent {
                reason: "bad_request",
            })?;
        let a = http::exchange(&self.client, req).await?;
        if !a.status.is_success() {
            return Err(http::common_failure(&a).unwrap_or(Failure::CREDENTIAL_UNAVAILABLE));
        }
        let answer: TokenAnswer =
            serde_json::from_slice(&a.body).map_err(|_| Failure::CREDENTIAL_UNAVAILABLE)?;
        // Renew five minutes before expiry, or halfway through a short one.
        let life = answer.expires_in;
        let renew = life.saturating_sub(300).max(life / 2);
        *slot = Some((
            answer.access_token.clone(),
            Instant::now() + Duration::from_secs(renew),
        ));
        Ok(answer.access_token)
    }
}

/// The v1 `message` for a job.
fn message(job: &Job) -> serde_json::Value {
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
            let mut data = serde_json::json!({
                "type": "message",
                "conversation": conversation,
                "sender": sender,
                "sender_device": sender_device.to_string(),
                "count": count.to_string(),
                "seq": seq.to_string(),
            });
            if let Some(c) = ciphertext {
                data["ciphertext"] = base64::engine::general_purpose::STANDARD.encode(c).into();
            }
            serde_json::json!({"message": {
                "token": job.token,
                "data": data,
                "android": {"priority": "HIGH", "collapse_key": conversation, "ttl": "86400s"},
            }})
        }
        Payload::Badge {
            conversation,
            unread,
        } => serde_json::json!({"message": {
            "token": job.token,
            "data": {"type": "badge", "conversation": conversation, "unread": unread.to_string()},
            "android": {"priority": "NORMAL", "collapse_key": "badge", "ttl": "86400s"},
        }}),
    }
}

/// The `errorCode` of an FCM error answer's `FcmError` detail, if any.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["details"]
        .as_array()?
        .iter()
        .find_map(|d| d["errorCode"].as_str().map(str::to_owned))
}
