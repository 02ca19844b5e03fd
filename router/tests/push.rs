//! The push worker against local fakes of each provider: a webhook and FCM
//! over plain HTTP/1.1, APNs over HTTP/2 with TLS and a certificate made
//! here. Every request's method, path, headers, auth and body are checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use courier_router::push::{
    ApnsConfig, FcmConfig, Job, JobSender, Outcome, Payload, PushConfig, PushMetrics, PushProvider,
    ServiceAccount, WebhookConfig, Worker,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

const WAIT: Duration = Duration::from_secs(30);

/// One request as the fake saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    version: hyper::Version,
    headers: hyper::HeaderMap,
    body: Bytes,
    at: Instant,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

/// A scripted answer: status, extra headers, body.
type Reply = (u16, Vec<(&'static str, String)>, String);

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A fake provider on 127.0.0.1: records every request and answers with
/// the handler's reply. With `tls`, HTTP/2 (ALPN h2) over TLS.
struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    fn start(handler: Handler, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log = seen.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let (handler, log, acceptor) = (handler.clone(), log.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let (handler, log) = (handler.clone(), log.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let seen = Seen {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_owned(),
                                    version: parts.version,
                                    headers: parts.headers,
                                    body,
                                    at: Instant::now(),
                                };
                                let (status, headers, body) = handler(&seen);
                                log.lock().unwrap().push(seen);
                                let mut resp = Response::builder().status(status);
                                for (k, v) in headers {
                                    resp = resp.header(k, v);
                                }
                                Ok::<_, std::convert::Infallible>(
                                    resp.body(Full::new(Bytes::from(body))).unwrap(),
                                )
                            }
                        });
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        match acceptor {
                            Some(acceptor) => {
                                if let Ok(tls) = acceptor.accept(tcp).await {
                                    let _ =
                                        builder.serve_connection(TokioIo::new(tls), service).await;
                                }
                            }
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                            }
                        }
                    });
                }
            });
        });
        let addr = rx.recv_timeout(WAIT).expect("fake bound");
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Answers from a list, then 200 with `{}` once it runs out.
fn script(replies: Vec<Reply>) -> Handler {
    let replies = Mutex::new(VecDeque::from(replies));
    Arc::new(move |_| {
        replies
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((200, vec![], "{}".into()))
    })
}

fn base_config() -> PushConfig {
    PushConfig {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_secs(5),
        max_attempts: 4,
        ..PushConfig::default()
    }
}

fn start(config: PushConfig) -> (JobSender, mpsc::Receiver<Outcome>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let sink = Arc::new(move |o| {
        let _ = tx.lock().unwrap().send(o);
    });
    let jobs = Worker::start(config, PushMetrics::unregistered(), sink).expect("worker starts");
    (jobs, rx)
}

fn message_job(
    id: u64,
    provider: PushProvider,
    token: &str,
    ciphertext: Option<&'static [u8]>,
) -> Job {
    Job {
        id,
        provider,
        token: token.into(),
        user: "bob".into(),
        device: 2,
        payload: Payload::Message {
            conversation: "d:alice:bob".into(),
            sender: "alice".into(),
            sender_device: 1,
            count: 20,
            seq: 41,
            ciphertext: ciphertext.map(Bytes::from_static),
        },
    }
}

fn hmac_hex(secret: &[u8], msg: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(msg);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn webhook_requests_are_signed_and_a_503_is_retried_after_its_retry_after() {
    let fake = Fake::start(
        script(vec![(
            503,
            vec![("retry-after", "1".into())],
            String::new(),
        )]),
        None,
    );
    let secret: Arc<[u8]> = Arc::from(&b"webhook-secret"[..]);
    let (jobs, outcomes) = start(PushConfig {
        webhook: Some(WebhookConfig {
            url: format!("http://{}/hook", fake.addr),
            secret: secret.clone(),
        }),
        ..base_config()
    });
    jobs.send(message_job(
        7,
        PushProvider::Webhook,
        "hook-token",
        Some(b"\x01sealed"),
    ));
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::Sent { id: 7 }
    );
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "one 503, one retry");
    assert!(
        seen[1].at.duration_since(seen[0].at) >= Duration::from_millis(900),
        "the retry waited for Retry-After"
    );
    for s in &seen {
        assert_eq!((s.method.as_str(), s.path.as_str()), ("POST", "/hook"));
        assert_eq!(s.version, hyper::Version::HTTP_11);
        assert_eq!(s.header("content-type"), "application/json");
        let ts = s.header("x-courier-timestamp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(ts.parse::<u64>().unwrap().abs_diff(now) < 120);
        let mut signed = format!("{ts}.").into_bytes();
        signed.extend_from_slice(&s.body);
        assert_eq!(
            s.header("x-courier-signature"),
            format!("sha256={}", hmac_hex(&secret, &signed))
        );
        let v = s.json();
        assert_eq!(v["type"], "message");
        assert_eq!(v["token"], "hook-token");
        assert_eq!(v["conversation"], "d:alice:bob");
        assert_eq!(v["sender"], "alice");
        assert_eq!(v["count"], 20);
        assert_eq!(v["seq"], 41);
        assert_eq!(v["ciphertext"], "AXNlYWxlZA==");
    }
}

#[test]
fn webhook_410_removes_the_token_and_a_400_is_not_retried() {
    let fake = Fake::start(
        script(vec![
            (410, vec![], String::new()),
            (400, vec![], String::new()),
        ]),
        None,
    );
    let (jobs, outcomes) = start(PushConfig {
        webhook: Some(WebhookConfig {
            url: format!("http://{}/hook", fake.addr),
            secret: Arc::from(&b"k"[..]),
        }),
        ..base_config()
    });
    jobs.send(message_job(1, PushProvider::Webhook, "gone", None));
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::InvalidToken {
            id: 1,
            user: "bob".into(),
            device: 2,
            token: "gone".into()
        }
    );
    jobs.send(message_job(2, PushProvider::Webhook, "t", None));
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::Failed {
            id: 2,
            reason: "rejected"
        }
    );
    assert_eq!(fake.seen().len(), 2);
    assert!(fake.seen()[0].json().get("ciphertext").is_none());
}

/// The FCM fake: `/token` checks the JWT assertion and hands out
/// `access-N` for two seconds; the send path answers from `sends`.
fn fcm_fake(sends: Vec<Reply>) -> Fake {
    let public = include_str!("data/fcm_test_key.pub.pem");
    let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap();
    let issued = Mutex::new(0u32);
    let sends = script(sends);
    Fake::start(
        Arc::new(move |s: &Seen| {
            if s.path != "/token" {
                return sends(s);
            }
            let form = std::str::from_utf8(&s.body).unwrap();
            let mut grant = None;
            let mut assertion = None;
            for pair in form.split('&') {
                match pair.split_once('=') {
                    Some(("grant_type", v)) => grant = Some(v.to_owned()),
                    Some(("assertion", v)) => assertion = Some(v.to_owned()),
                    _ => {}
                }
            }
            assert_eq!(
                grant.as_deref(),
                Some("urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer")
            );
            assert_eq!(
                s.header("content-type"),
                "application/x-www-form-urlencoded"
            );
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            v.validate_aud = false;
            let claims =
                jsonwebtoken::decode::<serde_json::Value>(&assertion.unwrap(), &decoding, &v)
                    .expect("assertion verifies with the account's public key")
                    .claims;
            assert_eq!(claims["iss"], "push@courier-test.iam.gserviceaccount.com");
            assert_eq!(
                claims["scope"],
                "https://www.googleapis.com/auth/firebase.messaging"
            );
            assert!(claims["aud"].as_str().unwrap().ends_with("/token"));
            assert_eq!(
                claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
                3600
            );
            let mut n = issued.lock().unwrap();
            *n += 1;
            (
                200,
                vec![("content-type", "application/json".into())],
                format!(r#"{{"access_token":"access-{n}","expires_in":4,"token_type":"Bearer"}}"#),
            )
        }),
        None,
    )
}

fn fcm_config(fake: &Fake) -> PushConfig {
    PushConfig {
        fcm: Some(FcmConfig {
            account: ServiceAccount {
                client_email: "push@courier-test.iam.gserviceaccount.com".into(),
                private_key: include_str!("data/fcm_test_key.pem").into(),
                token_uri: format!("http://{}/token", fake.addr),
                project_id: "courier-test".into(),
            },
            endpoint: format!("http://{}", fake.addr),
        }),
        ..base_config()
    }
}

#[test]
fn fcm_exchanges_a_signed_jwt_for_an_access_token_caches_it_and_refreshes_it() {
    let fake = fcm_fake(vec![]);
    let (jobs, outcomes) = start(fcm_config(&fake));
    jobs.send(message_job(1, PushProvider::Fcm, "fcm-token-1", None));
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::Sent { id: 1 }
    );
    jobs.send(message_job(2, PushProvider::Fcm, "fcm-token-1", None));
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::Sent { id: 2 }
    );
    // Short-lived tokens are renewed halfway (two seconds for four).
    std::thread::sleep(Duration::from_millis(2500));
    jobs.send(Job {
        id: 3,
        provider: PushProvider::Fcm,
        token: "fcm-token-1".into(),
        user: "bob".into(),
        device: 2,
        payload: Payload::Badge {
            conversation: "d:alice:bob".into(),
            unread: 4,
        },
    });
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::Sent { id: 3 }
    );

    let seen = fake.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    let send = "/v1/projects/courier-test/messages:send";
    assert_eq!(paths, ["/token", send, send, "/token", send]);
    let sends: Vec<&Seen> = seen.iter().filter(|s| s.path == send).collect();
    let bearers: Vec<&str> = sends.iter().map(|s| s.header("authorization")).collect();
    assert_eq!(
        bearers,
        ["Bearer access-1", "Bearer access-1", "Bearer access-2"]
    );
    let m = sends[0].json();
    assert_eq!(
        sends[0].header("content-type"),
        "application/json; charset=UTF-8"
    );
    assert_eq!(m["message"]["token"], "fcm-token-1");
    assert_eq!(m["message"]["data"]["type"], "message");
    assert_eq!(
        m["message"]["data"]["count"], "20",
        "data values are strings"
    );
    assert_eq!(m["message"]["data"]["sender"], "alice");
    assert!(m["message"]["data"].get("ciphertext").is_none());
    assert!(
        m["message"].get("notification").is_none(),
        "no visible text"
    );
    assert_eq!(m["message"]["android"]["priority"], "HIGH");
    assert_eq!(m["message"]["android"]["collapse_key"], "d:alice:bob");
    let badge = sends[2].json();
    assert_eq!(badge["message"]["data"]["type"], "badge");
    assert_eq!(badge["message"]["data"]["unread"], "4");
    assert_eq!(badge["message"]["android"]["priority"], "NORMAL");
}

#[test]
fn fcm_429_waits_for_retry_after_a_401_renews_the_token_and_unregistered_removes_it() {
    let unregistered = r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
    let fake = fcm_fake(vec![
        (
            429,
            vec![("retry-after", "1".into())],
            r#"{"error":{"code":429}}"#.into(),
        ),
        (401, vec![], r#"{"error":{"code":401}}"#.into()),
        (500, vec![], String::new()),
        (404, vec![], unregistered.into()),
    ]);
    let (jobs, outcomes) = start(fcm_config(&fake));
    jobs.send(message_job(9, PushProvider::Fcm, "stale", None));
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::InvalidToken {
            id: 9,
            user: "bob".into(),
            device: 2,
            token: "stale".into()
        }
    );
    let seen = fake.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    let send = "/v1/projects/courier-test/messages:send";
    // 429, (wait) 401, new token, 500, (backoff) 404 UNREGISTERED.
    assert_eq!(paths, ["/token", send, send, "/token", send, send]);
    assert!(seen[2].at.duration_since(seen[1].at) >= Duration::from_millis(900));
    assert_eq!(seen[4].header("authorization"), "Bearer access-2");
}

/// A CA, a server certificate for 127.0.0.1 signed by it (PEM of the CA
/// written to `dir`), and the server's TLS config offering only h2.
fn test_tls(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    (ca_file, Arc::new(config))
}

#[test]
fn apns_goes_over_http2_and_tls_with_an_es256_token_and_the_documented_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, tls) = test_tls(dir.path());
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let decoding =
        jsonwebtoken::DecodingKey::from_ec_pem(signing.public_key_pem().as_bytes()).unwrap();
    let fake = Fake::start(
        script(vec![
            (403, vec![], r#"{"reason":"ExpiredProviderToken"}"#.into()),
            (200, vec![("apns-id", "a".into())], String::new()),
            (
                503,
                vec![("retry-after", "1".into())],
                r#"{"reason":"ServiceUnavailable"}"#.into(),
            ),
            (200, vec![], String::new()),
            (
                410,
                vec![],
                r#"{"reason":"Unregistered","timestamp":1}"#.into(),
            ),
            (400, vec![], r#"{"reason":"BadDeviceToken"}"#.into()),
        ]),
        Some(tls),
    );
    let (jobs, outcomes) = start(PushConfig {
        ca_file: Some(ca_file),
        apns: Some(ApnsConfig {
            key_pem: Arc::from(signing.serialize_pem()),
            key_id: "KEYID12345".into(),
            team_id: "TEAMID6789".into(),
            topic: "com.example.courier".into(),
            endpoint: format!("https://127.0.0.1:{}", fake.addr.port()),
            token_ttl: Duration::from_millis(1500),
        }),
        ..base_config()
    });
    let token = "00fe".repeat(16);
    jobs.send(message_job(1, PushProvider::Apns, &token, Some(b"ct")));
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::Sent { id: 1 }
    );
    // The token is reused within its lifetime, and made anew after it.
    std::thread::sleep(Duration::from_millis(1600));
    jobs.send(Job {
        id: 2,
        provider: PushProvider::Apns,
        token: token.clone(),
        user: "bob".into(),
        device: 2,
        payload: Payload::Badge {
            conversation: "d:alice:bob".into(),
            unread: 3,
        },
    });
    assert_eq!(
        outcomes.recv_timeout(WAIT).unwrap(),
        Outcome::Sent { id: 2 }
    );
    for (id, t) in [(3, "abcd"), (4, "ef01")] {
        jobs.send(message_job(id, PushProvider::Apns, t, None));
        assert_eq!(
            outcomes.recv_timeout(WAIT).unwrap(),
            Outcome::InvalidToken {
                id,
                user: "bob".into(),
                device: 2,
                token: t.into()
            }
        );
    }

    let seen = fake.seen();
    assert_eq!(seen.len(), 6);
    let mut iats = Vec::new();
    for s in &seen {
        assert_eq!(s.version, hyper::Version::HTTP_2, "APNs speaks HTTP/2 only");
        assert_eq!(s.method, "POST");
        assert!(s.path.starts_with("/3/device/"));
        assert_eq!(s.header("apns-topic"), "com.example.courier");
        let exp: u64 = s.header("apns-expiration").parse().unwrap();
        assert!(exp > 1_700_000_000);
        let bearer = s.header("authorization").strip_prefix("bearer ").unwrap();
        let header = jsonwebtoken::decode_header(bearer).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KEYID12345"));
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        let claims = jsonwebtoken::decode::<serde_json::Value>(bearer, &decoding, &v)
            .unwrap()
            .claims;
        assert_eq!(claims["iss"], "TEAMID6789");
        iats.push((bearer.to_owned(), claims["iat"].as_u64().unwrap()));
    }
    assert_eq!(seen[0].path, format!("/3/device/{token}"));
    let alert = &seen[1];
    assert_eq!(alert.header("apns-push-type"), "alert");
    assert_eq!(alert.header("apns-priority"), "10");
    assert_eq!(alert.header("apns-collapse-id"), "d:alice:bob");
    let body = alert.json();
    assert_eq!(body["aps"]["alert"]["loc-key"], "COURIER_NEW_MESSAGES");
    assert_eq!(body["aps"]["alert"]["loc-args"][1], "20");
    assert_eq!(body["aps"]["mutable-content"], 1);
    assert_eq!(body["ciphertext"], "Y3Q=");
    assert_eq!(body["count"], 20);
    assert!(body["aps"]["alert"].get("body").is_none());
    let badge = &seen[2];
    assert_eq!(badge.header("apns-push-type"), "background");
    assert_eq!(badge.header("apns-priority"), "5");
    assert!(badge.headers.get("apns-collapse-id").is_none());
    assert_eq!(badge.json()["aps"]["content-available"], 1);
    assert_eq!(badge.json()["aps"]["badge"], 3);
    // 503 then its retry a second later.
    assert!(seen[3].at.duration_since(seen[2].at) >= Duration::from_millis(900));
    // After ExpiredProviderToken a new token (at most once a second by
    // its iat), and after the lifetime another one.
    assert!(
        iats[2].1 > iats[0].1,
        "token refreshed after its lifetime: {iats:?}"
    );
    assert_eq!(iats[2].0, iats[3].0, "reused within its lifetime");
}

#[test]
fn each_provider_is_held_to_its_rate() {
    let fake = Fake::start(script(vec![]), None);
    let (jobs, outcomes) = start(PushConfig {
        rate_per_s: 2.0,
        concurrency: 1,
        webhook: Some(WebhookConfig {
            url: format!("http://{}/hook", fake.addr),
            secret: Arc::from(&b"k"[..]),
        }),
        ..base_config()
    });
    let started = Instant::now();
    for id in 1..=5 {
        jobs.send(message_job(id, PushProvider::Webhook, "t", None));
    }
    for _ in 1..=5 {
        assert!(matches!(
            outcomes.recv_timeout(WAIT).unwrap(),
            Outcome::Sent { .. }
        ));
    }
    // A burst of two, then one every half second: at least 1.5 s for five.
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.seen().len(), 5);
}
