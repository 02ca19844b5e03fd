//! The HTTP/1.1 upgrade that opens a session, parsed from bytes.
//!
//! [`parse`] looks at the bytes read so far: not enough yet is `Ok(None)`;
//! a complete request is either an [`Upgrade`] to accept, a file of the
//! browser client to serve ([`Request::Page`], only when the caller serves
//! it), or a [`Refusal`] naming the HTTP status to answer with.
//! Authentication is the caller's: this module only finds the token
//! (`Authorization: Bearer` or the `access_token` query parameter, for
//! browsers, which cannot set headers on a WebSocket).

use courier_protocol::SUBPROTOCOL_V1;
use tungstenite::handshake::derive_accept_key;

use crate::web;

/// Most headers a request may have.
const MAX_HEADERS: usize = 32;

/// What a complete, acceptable request asks for.
#[derive(Debug)]
pub enum Request {
    /// A WebSocket upgrade.
    Upgrade(Upgrade),
    /// A plain GET (no `Upgrade: websocket`) of one of the browser
    /// client's paths; answer with [`web::response`] and close.
    Page(web::Page),
}

/// An upgrade request that passed every check but authentication.
#[derive(Debug)]
pub struct Upgrade {
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept_key: String,
    /// The bearer token, if the client sent one.
    pub token: Option<String>,
    /// The `Origin` header, if any.
    pub origin: Option<String>,
    /// Bytes of `buf` the request took; anything after them is the first
    /// WebSocket data.
    pub consumed: usize,
}

/// A request the gateway answers with an HTTP error and a close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status code.
    pub status: u16,
    /// A short explanation, sent as the response body and used as a metrics label.
    pub reason: &'static str,
}

impl Refusal {
    const fn new(status: u16, reason: &'static str) -> Self {
        Self { status, reason }
    }
}

/// Parses the request at the front of `buf`, which must not exceed
/// `max_bytes` before the request is complete. With `pages` set, a plain
/// GET of a path [`web::lookup`] knows is a [`Request::Page`]; without it,
/// and for every other path but `/` and `/ws`, the answer is 404 as before.
pub fn parse(buf: &[u8], max_bytes: usize, pages: bool) -> Result<Option<Request>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(status) => status,
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::new(431, "too many headers")),
        Err(_) => return Err(Refusal::new(400, "malformed HTTP request")),
    };
    let consumed = match status {
        httparse::Status::Partial if buf.len() >= max_bytes => {
            return Err(Refusal::new(431, "request headers too large"));
        }
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) if n > max_bytes => {
            return Err(Refusal::new(431, "request headers too large"));
        }
        httparse::Status::Complete(n) => n,
    };
    if req.method != Some("GET") {
        return Err(Refusal::new(405, "only GET upgrades are served"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, wanted: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(wanted)))
    };
    let path = req.path.unwrap_or("/");
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    if route != "/" && route != "/ws" {
        // The page's files answer plain GETs only; an upgrade aimed at
        // them is refused as any other path's.
        return match web::lookup(route) {
            Some(page) if pages && !has_token("upgrade", "websocket") => {
                Ok(Some(Request::Page(page)))
            }
            _ => Err(Refusal::new(404, "no such path")),
        };
    }

    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Refusal::new(426, "WebSocket upgrade required"));
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Refusal::new(426, "Sec-WebSocket-Version 13 required"));
    }
    let Some(key) = header("sec-websocket-key")
        .map(str::trim)
        .filter(|k| k.len() == 24)
    else {
        return Err(Refusal::new(400, "missing or malformed Sec-WebSocket-Key"));
    };
    let protocols = header("sec-websocket-protocol").unwrap_or("");
    if !protocols.split(',').any(|p| p.trim() == SUBPROTOCOL_V1) {
        return Err(Refusal::new(400, "subprotocol courier.v1 required"));
    }

    let bearer = header("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned());
    let from_query = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
        .map(percent_decode);
    Ok(Some(Request::Upgrade(Upgrade {
        accept_key: derive_accept_key(key.as_bytes()),
        token: bearer.or(from_query),
        origin: header("origin").map(str::to_owned),
        consumed,
    })))
}

/// Whether a request with `origin` may open a session, given the
/// configured allow-list: an empty list allows every origin, and a request
/// without an `Origin` header is allowed (only browsers send one, and the
/// list is there to keep other sites' pages from using a browser's
/// credentials). Origins compare exactly, ignoring ASCII case.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    let listed = || allowed.iter().filter(|a| !a.trim().is_empty());
    match origin {
        _ if listed().next().is_none() => true,
        None => true,
        Some(origin) => listed().any(|a| a.trim().eq_ignore_ascii_case(origin.trim())),
    }
}

/// The `101 Switching Protocols` response for `upgrade`.
pub fn accept_response(upgrade: &Upgrade) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL_V1}\r\n\r\n",
        upgrade.accept_key
    )
    .into_bytes()
}

/// An HTTP error response that ends the connection.
pub fn refusal_response(refusal: Refusal) -> Vec<u8> {
    let reason = match refusal.status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let extra = match refusal.status {
        401 => "WWW-Authenticate: Bearer\r\n",
        426 => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
        _ => "",
    };
    let body = refusal.reason;
    format!(
        "HTTP/1.1 {} {reason}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        refusal.status,
        body.len()
    )
    .into_bytes()
}

/// Decodes `%XX` escapes (a token is base64url and needs none, but a
/// client library may escape it anyway). Invalid escapes are kept as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &str) -> String {
        format!(
            "GET /?access_token=abc%2Edef HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: other, courier.v1\r\n{extra}\r\n"
        )
    }

    /// The upgrade `req` parses to, pages served.
    fn upgrade(req: &str) -> Upgrade {
        match parse(req.as_bytes(), 8192, true) {
            Ok(Some(Request::Upgrade(up))) => up,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    #[test]
    fn accepts_a_well_formed_upgrade() {
        let up = upgrade(&request(""));
        // The accept key of RFC 6455's own example.
        assert_eq!(up.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(up.token.as_deref(), Some("abc.def"));
        let resp = String::from_utf8(accept_response(&up)).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 101 ")
                && resp.contains("Sec-WebSocket-Protocol: courier.v1\r\n")
        );
    }

    #[test]
    fn bearer_header_wins_over_query() {
        let up = upgrade(&request("Authorization: Bearer xyz\r\n"));
        assert_eq!(up.token.as_deref(), Some("xyz"));
    }

    #[test]
    fn partial_requests_ask_for_more_until_the_limit() {
        let req = request("");
        assert!(matches!(parse(&req.as_bytes()[..40], 8192, true), Ok(None)));
        assert_eq!(
            parse(&req.as_bytes()[..40], 40, true).unwrap_err().status,
            431
        );
        let big = request(&format!("X-Pad: {}\r\n", "p".repeat(9000)));
        assert_eq!(parse(big.as_bytes(), 8192, true).unwrap_err().status, 431);
    }

    #[test]
    fn refusals() {
        let cases = [
            ("POST / HTTP/1.1\r\n\r\n".to_string(), 405),
            ("GET /nope HTTP/1.1\r\n\r\n".to_string(), 404),
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), 426),
            (request("").replace("Version: 13", "Version: 8"), 426),
            (
                request("").replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
                400,
            ),
            (request("").replace("other, courier.v1", "other"), 400),
            ("\x01\x02 garbage\r\n\r\n".to_string(), 400),
        ];
        // The same answers whether the page is served or not.
        for pages in [true, false] {
            for (req, status) in &cases {
                assert_eq!(
                    parse(req.as_bytes(), 8192, pages).unwrap_err().status,
                    *status,
                    "{req:?}"
                );
            }
            let many: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
            assert_eq!(
                parse(request(&many).as_bytes(), 8192, pages)
                    .unwrap_err()
                    .status,
                431
            );
        }
    }

    #[test]
    fn plain_gets_of_the_page_are_pages_only_when_served() {
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let page = |req: &str, pages: bool| match parse(req.as_bytes(), 8192, pages) {
            Ok(Some(Request::Page(p))) => Ok(p),
            Ok(other) => panic!("{req:?}: {other:?}"),
            Err(r) => Err(r.status),
        };
        let index = web::lookup("/app/").unwrap();
        assert_eq!(page(&get("/app/"), true), Ok(index));
        // The fragment never reaches the server; a query is ignored.
        assert_eq!(page(&get("/app/?from=demo"), true), Ok(index));
        assert_eq!(page(&get("/app"), true), Ok(web::Page::ToIndex));
        assert!(page(&get("/app/app.mjs"), true).is_ok());
        // Unknown files, and every page when it is off: 404 as before.
        assert_eq!(page(&get("/app/secret"), true), Err(404));
        assert_eq!(page(&get("/favicon.ico"), true), Err(404));
        assert_eq!(page(&get("/app/"), false), Err(404));
        // Other methods are refused before the path is looked at.
        assert_eq!(page("HEAD /app/ HTTP/1.1\r\n\r\n", true), Err(405));
        assert_eq!(page("POST /app/ HTTP/1.1\r\n\r\n", true), Err(405));
        // The upgrade paths keep their 426 for a plain GET.
        assert_eq!(page(&get("/"), true), Err(426));
        assert_eq!(page(&get("/ws"), true), Err(426));
        // An upgrade aimed at the page is no page.
        let to_app = request("").replace("GET /?", "GET /app/?");
        assert_eq!(page(&to_app, true), Err(404));
        // Partial requests still ask for more.
        assert!(matches!(
            parse(&get("/app/").as_bytes()[..10], 8192, true),
            Ok(None)
        ));
    }

    #[test]
    fn origins_are_checked_only_against_a_non_empty_list() {
        let list = vec![
            "https://chat.example".to_string(),
            " http://LOCALHOST:3000".into(),
        ];
        assert!(origin_allowed(Some("https://evil.example"), &[]));
        assert!(origin_allowed(
            Some("https://evil.example"),
            &[String::new()]
        ));
        assert!(origin_allowed(None, &list));
        assert!(origin_allowed(Some("https://chat.example"), &list));
        assert!(origin_allowed(Some("http://localhost:3000"), &list));
        assert!(!origin_allowed(Some("https://chat.example.evil"), &list));
        assert!(!origin_allowed(Some("null"), &list));
        assert!(!origin_allowed(Some("http://chat.example"), &list));
    }

    #[test]
    fn refusal_response_is_complete_http() {
        let resp = String::from_utf8(refusal_response(Refusal::new(401, "bad token"))).unwrap();
        assert!(resp.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(resp.contains("Content-Length: 9\r\n") && resp.ends_with("\r\n\r\nbad token"));
    }
}
