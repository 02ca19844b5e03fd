//! The operator's endpoints under `/admin/`, served beside `/metrics` on
//! the metrics thread.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /admin/connections` | sessions per core and per process (JSON) |
//! | `GET /admin/devices?user=U` | `U`'s sessions on this node: device, core, connected since (JSON) |
//! | `POST /admin/disconnect?user=U&device=D` | closes that device's sessions with 4007 (JSON count) |
//!
//! The cores own their sessions, so a question about sessions travels to
//! each core as a message in its mailbox ([`CoreMsg::Devices`],
//! [`CoreMsg::Disconnect`]) and the core answers on a oneshot channel after
//! scanning its slab. No index is kept for it: attach and detach, which run
//! for every connection, pay nothing, and a rare operator query pays one
//! scan per core (docs/architecture.md has the reasoning). The counts come
//! from the per-core connection gauges the cores already keep.
//!
//! Access: with an admin token file configured, every `/admin/` request
//! needs `Authorization: Bearer <token>` (401 otherwise); without one, the
//! endpoints answer only while the metrics address is a loopback address
//! (403 otherwise).

use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use courier_protocol::ids;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::oneshot;

use crate::core::{CoreMsg, SessionInfo, Shared};
use crate::metrics::CoreLabel;

/// How long an admin request waits for the cores' answers.
const CORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin token: a bearer secret read from a file at start.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the token from `path`; surrounding whitespace is dropped. An
    /// empty file is refused, since it would make the token guessable.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the admin token file {}", path.display()))?;
        let token = text.trim();
        anyhow::ensure!(
            token.len() >= 16 && !token.contains(char::is_whitespace),
            "the admin token file {} must hold one token of at least 16 characters",
            path.display()
        );
        Ok(Self(token.to_owned()))
    }

    /// Whether an `Authorization` header value carries this token. The
    /// comparison takes the same time wherever the first difference is.
    fn admits(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let want = self.0.as_bytes();
        given.len() == want.len()
            && given
                .iter()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Who may use the admin endpoints, fixed at start.
#[derive(Clone, Debug)]
pub enum Access {
    /// Anyone who reaches the (loopback) metrics address.
    Loopback,
    /// Requests bearing this token.
    Token(AdminToken),
    /// Nobody: the metrics address is not loopback and no token is set.
    Refused,
}

impl Access {
    /// The rule for a metrics endpoint bound to a loopback address or not,
    /// with or without a token.
    pub fn new(loopback: bool, token: Option<AdminToken>) -> Self {
        match (token, loopback) {
            (Some(token), _) => Self::Token(token),
            (None, true) => Self::Loopback,
            (None, false) => Self::Refused,
        }
    }
}

/// Answers one request whose path starts with `/admin/`.
pub async fn respond(
    req: &Request<hyper::body::Incoming>,
    shared: &Arc<Shared>,
    access: &Access,
) -> Response<Full<Bytes>> {
    match access {
        Access::Loopback => {}
        Access::Token(token) => {
            let header = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !token.admits(header) {
                let mut r = json(
                    StatusCode::UNAUTHORIZED,
                    error("admin endpoints need Authorization: Bearer <admin token>"),
                );
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        Access::Refused => {
            return json(
                StatusCode::FORBIDDEN,
                error("admin endpoints on a non-loopback address need --admin-token-file"),
            )
        }
    }
    let query = Query(req.uri().query().unwrap_or(""));
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/admin/connections") => connections(shared),
        (&Method::GET, "/admin/devices") => match query.user() {
            Ok(user) => devices(shared, user).await,
            Err(e) => json(StatusCode::BAD_REQUEST, error(e)),
        },
        (&Method::POST, "/admin/disconnect") => match (query.user(), query.device()) {
            (Ok(user), Ok(device)) => disconnect(shared, user, device).await,
            (Err(e), _) | (_, Err(e)) => json(StatusCode::BAD_REQUEST, error(e)),
        },
        (_, "/admin/connections" | "/admin/devices" | "/admin/disconnect") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            error("method not allowed (connections, devices: GET; disconnect: POST)"),
        ),
        _ => json(StatusCode::NOT_FOUND, error("no such admin endpoint")),
    }
}

fn connections(shared: &Shared) -> Response<Full<Bytes>> {
    let mut cores = Vec::with_capacity(shared.mailboxes.len());
    for core in 0..shared.mailboxes.len() {
        let label = CoreLabel {
            core: core.to_string(),
        };
        let n = shared.metrics.connections.get_or_create(&label).get();
        cores.push(format!(r#"{{"core":{core},"connections":{n}}}"#));
    }
    let process = shared.connections.load(Ordering::Relaxed);
    json(
        StatusCode::OK,
        format!(r#"{{"process":{process},"cores":[{}]}}"#, cores.join(",")),
    )
}

async fn devices(shared: &Shared, user: String) -> Response<Full<Bytes>> {
    let user: Arc<str> = Arc::from(user);
    let mut answers = Vec::with_capacity(shared.mailboxes.len());
    for mailbox in &shared.mailboxes {
        let (reply, answer) = oneshot::channel();
        mailbox.push(CoreMsg::Devices {
            user: user.clone(),
            reply,
        });
        answers.push(answer);
    }
    let mut sessions: Vec<SessionInfo> = Vec::new();
    for answer in answers {
        match tokio::time::timeout(CORE_ANSWER_TIMEOUT, answer).await {
            Ok(Ok(found)) => sessions.extend(found),
            _ => return core_unavailable(),
        }
    }
    sessions.sort_by_key(|s| (s.device, s.connected_since_s));
    let list: Vec<String> = sessions
        .iter()
        .map(|s| {
            format!(
                r#"{{"device":{},"core":{},"connected_since_s":{}}}"#,
                s.device, s.core, s.connected_since_s
            )
        })
        .collect();
    json(
        StatusCode::OK,
        format!(
            r#"{{"user":{},"devices":[{}]}}"#,
            json_string(&user),
            list.join(",")
        ),
    )
}

async fn disconnect(shared: &Shared, user: String, device: u32) -> Response<Full<Bytes>> {
    let user: Arc<str> = Arc::from(user);
    let mut answers = Vec::with_capacity(shared.mailboxes.len());
    for mailbox in &shared.mailboxes {
        let (reply, answer) = oneshot::channel();
        mailbox.push(CoreMsg::Disconnect {
            user: user.clone(),
            device,
            reply,
        });
        answers.push(answer);
    }
    let mut closed = 0;
    for answer in answers {
        match tokio::time::timeout(CORE_ANSWER_TIMEOUT, answer).await {
            Ok(Ok(n)) => closed += n,
            _ => return core_unavailable(),
        }
    }
    tracing::info!(
        sessions.closed = closed,
        "operator disconnect (4007) through the admin endpoint"
    );
    let status = if closed == 0 {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    json(
        status,
        format!(
            r#"{{"user":{},"device":{device},"closed":{closed}}}"#,
            json_string(&user)
        ),
    )
}

fn core_unavailable() -> Response<Full<Bytes>> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        error("a core did not answer (the node is stopping)"),
    )
}

/// The query string of an admin request.
struct Query<'a>(&'a str);

impl Query<'_> {
    fn get(&self, name: &str) -> Option<Result<String, &'static str>> {
        self.0
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v).ok_or("a query value is not valid percent-encoding"))
    }

    fn user(&self) -> Result<String, &'static str> {
        let user = self.get("user").ok_or("missing query parameter user")??;
        if ids::is_valid_user_id(&user) {
            Ok(user)
        } else {
            Err("user: 1 to 64 characters of [A-Za-z0-9._@+-]")
        }
    }

    fn device(&self) -> Result<u32, &'static str> {
        let device = self
            .get("device")
            .ok_or("missing query parameter device")??;
        match device.parse::<u32>() {
            Ok(d) if d >= 1 => Ok(d),
            _ => Err("device: a number from 1"),
        }
    }
}

/// Decodes `%XX` escapes; `+` stays a plus (user ids may contain it).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(message: &str) -> String {
    format!(r#"{{"error":{}}}"#, json_string(message))
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_compared_whole() {
        let t = AdminToken("0123456789abcdef".into());
        assert!(t.admits(Some(b"Bearer 0123456789abcdef")));
        for bad in [
            &b"Bearer 0123456789abcdeg"[..],
            b"Bearer 0123456789abcde",
            b"Bearer 0123456789abcdef0",
            b"bearer 0123456789abcdef",
            b"0123456789abcdef",
            b"",
        ] {
            assert!(!t.admits(Some(bad)), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!t.admits(None));
        assert_eq!(format!("{t:?}"), "AdminToken(..)");
    }

    #[test]
    fn query_values_are_percent_decoded_and_checked() {
        let q = Query("user=a%40b.c+d&device=3");
        assert_eq!(q.user(), Ok("a@b.c+d".into()));
        assert_eq!(q.device(), Ok(3));
        assert!(Query("device=0").device().is_err());
        assert!(Query("device=x").device().is_err());
        assert!(Query("").user().is_err());
        assert!(Query("user=%zz").user().is_err());
        assert!(
            Query("user=a%20b").user().is_err(),
            "space is not in a user id"
        );
        assert_eq!(json_string("a\"\\\n"), r#""a\"\\\u000a""#);
    }

    #[test]
    fn access_follows_the_bind_and_the_token() {
        let t = AdminToken("0123456789abcdef".into());
        assert!(matches!(Access::new(true, None), Access::Loopback));
        assert!(matches!(Access::new(false, None), Access::Refused));
        assert!(matches!(
            Access::new(true, Some(t.clone())),
            Access::Token(_)
        ));
        assert!(matches!(Access::new(false, Some(t)), Access::Token(_)));
    }
}
