//! The client side of the WebSocket opening handshake (RFC 6455 section 4),
//! as pure functions over bytes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};

use courier_protocol::SUBPROTOCOL_V1;

/// Where loadgen connects: a parsed `ws://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// The socket address connected to.
    pub addr: SocketAddr,
    /// The `Host` header value.
    pub host: String,
    /// Path and query of the request line.
    pub path: String,
}

/// Why a URL is not a target.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Only plain `ws://` is spoken.
    #[error("only ws:// URLs are supported")]
    Scheme,
    /// The host is not an IP literal or `localhost`.
    #[error("host `{0}` must be an IP address or localhost")]
    Host(String),
    /// The port is not a number.
    #[error("bad port in URL")]
    Port,
    /// The address is not on this machine.
    #[error("{0} is not a loopback address; loadgen only targets 127.0.0.0/8 and ::1")]
    NotLoopback(IpAddr),
}

impl Target {
    /// Parses `ws://host[:port][/path][?query]` (port 80 by default).
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let rest = url.strip_prefix("ws://").ok_or(UrlError::Scheme)?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let (host, port) = split_host_port(authority)?;
        let ip: IpAddr = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| UrlError::Host(h.to_owned()))?,
        };
        if !ip.is_loopback() {
            return Err(UrlError::NotLoopback(ip));
        }
        Ok(Self {
            url: url.to_owned(),
            addr: SocketAddr::new(ip, port),
            host: authority.to_owned(),
            path,
        })
    }
}

fn split_host_port(authority: &str) -> Result<(&str, u16), UrlError> {
    // An IPv6 literal is bracketed: [::1]:8080.
    let colon = if authority.starts_with('[') {
        authority
            .find(']')
            .and_then(|end| authority[end..].find(':').map(|c| end + c))
    } else {
        authority.rfind(':')
    };
    match colon {
        Some(i) => Ok((
            &authority[..i],
            authority[i + 1..].parse().map_err(|_| UrlError::Port)?,
        )),
        None => Ok((authority, 80)),
    }
}

/// How the token travels in the upgrade request.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TokenIn {
    /// `Authorization: Bearer <token>`.
    #[default]
    Header,
    /// `?access_token=<token>` in the request target.
    Query,
}

/// The `Sec-WebSocket-Key` for 16 random bytes.
pub fn client_key(nonce: [u8; 16]) -> String {
    BASE64.encode(nonce)
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    BASE64.encode(sha.finalize())
}

/// The upgrade request for `target`, authenticated with `token`.
pub fn request(target: &Target, token: &str, token_in: TokenIn, key: &str) -> Vec<u8> {
    let path = match token_in {
        TokenIn::Header => target.path.clone(),
        TokenIn::Query => {
            let sep = if target.path.contains('?') { '&' } else { '?' };
            format!("{}{sep}access_token={token}", target.path)
        }
    };
    let bearer = (token_in == TokenIn::Header).then_some(token);
    request_for(target, &path, key, Some(SUBPROTOCOL_V1), bearer)
}

/// An upgrade request to `path` on `target` asking for `subprotocol` (none:
/// no `Sec-WebSocket-Protocol` header), with `Authorization: Bearer` when a
/// bearer token is given. `loadgen peer` uses it for other servers'
/// WebSocket listeners (NATS, XMPP).
pub fn request_for(
    target: &Target,
    path: &str,
    key: &str,
    subprotocol: Option<&str>,
    bearer: Option<&str>,
) -> Vec<u8> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        target.host
    );
    if let Some(p) = subprotocol {
        req.push_str("Sec-WebSocket-Protocol: ");
        req.push_str(p);
        req.push_str("\r\n");
    }
    if let Some(token) = bearer {
        req.push_str("Authorization: Bearer ");
        req.push_str(token);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Largest response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 8192;

/// Why an upgrade failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The server answered with another status (401: bad token, ...).
    #[error("server answered {0} instead of 101")]
    Status(u16),
    /// The response is not HTTP or its head is too long.
    #[error("malformed upgrade response")]
    Malformed,
    /// `Sec-WebSocket-Accept` is missing or wrong.
    #[error("wrong Sec-WebSocket-Accept")]
    Accept,
    /// The server did not pick the subprotocol asked for (`courier.v1`).
    #[error("server did not select the subprotocol asked for")]
    Subprotocol,
    /// `Upgrade: websocket` is missing.
    #[error("response does not upgrade to websocket")]
    Upgrade,
}

impl HandshakeError {
    /// A short label for the error counters.
    pub fn kind(&self) -> String {
        match self {
            Self::Status(code) => format!("handshake.status_{code}"),
            Self::Malformed => "handshake.malformed".into(),
            Self::Accept => "handshake.accept".into(),
            Self::Subprotocol => "handshake.subprotocol".into(),
            Self::Upgrade => "handshake.upgrade".into(),
        }
    }
}

/// Checks the response to an upgrade sent with `key`. `Ok(None)`: the head
/// is not complete yet; `Ok(Some(n))`: the first `n` bytes were the head and
/// what follows is WebSocket frames.
pub fn check_response(buf: &[u8], key: &str) -> Result<Option<usize>, HandshakeError> {
    check_response_for(buf, key, Some(SUBPROTOCOL_V1))
}

/// [`check_response`] for a request that asked for `subprotocol` (none: the
/// response's choice is not checked).
pub fn check_response_for(
    buf: &[u8],
    key: &str,
    subprotocol: Option<&str>,
) -> Result<Option<usize>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(HandshakeError::Malformed),
    };
    match resp.code {
        Some(101) => {}
        Some(code) => return Err(HandshakeError::Status(code)),
        None => return Err(HandshakeError::Malformed),
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::Upgrade);
    }
    if header("sec-websocket-accept") != Some(accept_key(key).as_str()) {
        return Err(HandshakeError::Accept);
    }
    if subprotocol.is_some() && header("sec-websocket-protocol") != subprotocol {
        return Err(HandshakeError::Subprotocol);
    }
    Ok(Some(head))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("ws://127.0.0.1:8080/").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((t.host.as_str(), t.path.as_str()), ("127.0.0.1:8080", "/"));
        let t = Target::parse("ws://localhost:9000/ws?x=1").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (9000, "/ws?x=1"));
        assert_eq!(Target::parse("ws://127.0.0.9").unwrap().addr.port(), 80);
        assert_eq!(Target::parse("ws://[::1]:81?a=b").unwrap().path, "/?a=b");
        assert_eq!(Target::parse("wss://127.0.0.1/"), Err(UrlError::Scheme));
        assert_eq!(
            Target::parse("ws://example.com/"),
            Err(UrlError::Host("example.com".into()))
        );
        assert!(matches!(
            Target::parse("ws://10.0.0.1:8080/"),
            Err(UrlError::NotLoopback(_))
        ));
        assert_eq!(Target::parse("ws://127.0.0.1:x/"), Err(UrlError::Port));
    }

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn request_carries_the_token_where_asked() {
        let t = Target::parse("ws://127.0.0.1:8080/").unwrap();
        let r = String::from_utf8(request(&t, "TOK", TokenIn::Header, "KEY")).unwrap();
        assert!(r.starts_with("GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(r.contains("\r\nAuthorization: Bearer TOK\r\n"));
        assert!(r.contains("\r\nSec-WebSocket-Protocol: courier.v1\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        let r = String::from_utf8(request(&t, "TOK", TokenIn::Query, "KEY")).unwrap();
        assert!(r.starts_with("GET /?access_token=TOK HTTP/1.1\r\n"));
        assert!(!r.contains("Authorization"));
    }

    fn response(accept: &str, protocol: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn responses_are_checked() {
        let key = client_key([7; 16]);
        let good = response(&accept_key(&key), "courier.v1");
        let mut with_frame = good.clone();
        with_frame.extend_from_slice(&[0x82, 0x00]);
        assert_eq!(check_response(&with_frame, &key), Ok(Some(good.len())));
        assert_eq!(check_response(&good[..good.len() - 1], &key), Ok(None));
        assert_eq!(
            check_response(&response("nope", "courier.v1"), &key),
            Err(HandshakeError::Accept)
        );
        assert_eq!(
            check_response(&response(&accept_key(&key), "chat"), &key),
            Err(HandshakeError::Subprotocol)
        );
        let denied = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_response(denied, &key),
            Err(HandshakeError::Status(401))
        );
        assert_eq!(HandshakeError::Status(401).kind(), "handshake.status_401");
        assert_eq!(
            check_response(b"SSH-2.0-OpenSSH\r\n\r\n", &key),
            Err(HandshakeError::Malformed)
        );
        assert_eq!(
            check_response(&vec![b'a'; MAX_RESPONSE_HEAD], &key),
            Err(HandshakeError::Malformed)
        );
    }
}
