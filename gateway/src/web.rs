//! The browser client's files, built into the binary and served on the
//! WebSocket listener.
//!
//! `gateway/web/` holds a small chat page: HTML, CSS and plain ES modules,
//! no build step. They are embedded with `include_bytes!`, so a node serves
//! the page of its own version and needs no file on disk. [`lookup`] maps a
//! path under [`PREFIX`] to one of them; [`response`] is the complete HTTP
//! answer, sent on a connection that is closed after it (the upgrade task
//! never keeps an HTTP connection alive). What is served and why this path
//! is in docs/web-client.md.
//!
//! Every answer carries a Content-Security-Policy that lets the page load
//! only its own files and open WebSockets only to its own origin, with no
//! inline script or style, so a message body that slipped into the page as
//! markup could still run nothing.

/// Where the page lives. Not `/` or `/ws`: those are the upgrade paths,
/// where a GET without an upgrade keeps its 426.
pub const PREFIX: &str = "/app/";

/// The policy every file is served with: scripts, styles and images from
/// this origin only, WebSockets to this origin only, no plugins, no forms
/// posted anywhere, never framed, and DOM sinks that take strings refused
/// (the page builds its DOM with `textContent`).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'";

/// One embedded file.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    /// The path it is served at.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// What a GET under the page's path is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// A file.
    File(&'static Asset),
    /// `/app` without its slash: a redirect to [`PREFIX`], so relative
    /// links in the page resolve under it.
    ToIndex,
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the client. `codec.mjs` is also what the Node and browser
/// test suites import (tests/node/courier.mjs), so the page and the tests
/// share one encoder and decoder.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: PREFIX,
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../web/index.html"),
    },
    Asset {
        path: "/app/app.mjs",
        content_type: JS,
        body: include_bytes!("../web/app.mjs"),
    },
    Asset {
        path: "/app/codec.mjs",
        content_type: JS,
        body: include_bytes!("../web/codec.mjs"),
    },
    Asset {
        path: "/app/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../web/style.css"),
    },
    Asset {
        path: "/app/icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../web/icon.svg"),
    },
];

/// The answer for `route` (the request path without its query), if it is
/// one of the page's.
pub fn lookup(route: &str) -> Option<Page> {
    if route == "/app" {
        return Some(Page::ToIndex);
    }
    ASSETS.iter().find(|a| a.path == route).map(Page::File)
}

/// The complete HTTP response for `page`, ending the connection.
pub fn response(page: Page) -> Vec<u8> {
    let (status, extra, content_type, body): (_, &str, _, &[u8]) = match page {
        Page::File(asset) => ("200 OK", "", asset.content_type, asset.body),
        Page::ToIndex => (
            "308 Permanent Redirect",
            "Location: /app/\r\n",
            "text/plain",
            b"moved to /app/",
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: {content_type}\r\nContent-Length: {}\r\n\
         Content-Security-Policy: {CONTENT_SECURITY_POLICY}\r\n\
         X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n\
         Cross-Origin-Opener-Policy: same-origin\r\nCache-Control: no-cache\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_under_the_prefix_and_not_empty() {
        for a in ASSETS {
            assert!(a.path.starts_with(PREFIX), "{}", a.path);
            assert!(!a.body.is_empty(), "{}", a.path);
            assert!(std::str::from_utf8(a.body).is_ok(), "{} is text", a.path);
        }
        assert_eq!(lookup("/app/"), Some(Page::File(&ASSETS[0])));
        assert_eq!(lookup("/app"), Some(Page::ToIndex));
        assert_eq!(lookup("/app/nope.js"), None);
        assert_eq!(lookup("/app/../Cargo.toml"), None);
    }

    #[test]
    fn files_name_their_type_and_carry_the_policy() {
        let Some(Page::File(js)) = lookup("/app/app.mjs") else {
            panic!("app.mjs is served");
        };
        let resp = response(Page::File(js));
        let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = std::str::from_utf8(&resp[..head_end]).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Content-Type: text/javascript; charset=utf-8\r\n"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", js.body.len())));
        assert!(head.contains("Content-Security-Policy: default-src 'none'; script-src 'self';"));
        assert!(head.contains("X-Content-Type-Options: nosniff\r\n"));
        assert!(head.contains("Connection: close\r\n"));
        assert_eq!(&resp[head_end..], js.body);

        let redirect = String::from_utf8(response(Page::ToIndex)).unwrap();
        assert!(redirect.starts_with("HTTP/1.1 308 Permanent Redirect\r\nLocation: /app/\r\n"));
    }

    #[test]
    fn the_page_loads_only_what_is_embedded() {
        // Every file index.html and app.mjs name is one of ours, so the
        // policy's 'self' finds it.
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        for name in ["style.css", "app.mjs", "icon.svg"] {
            assert!(
                html.contains(&format!("\"{name}\"")),
                "index.html loads {name}"
            );
            assert!(
                lookup(&format!("{PREFIX}{name}")).is_some(),
                "{name} is embedded"
            );
        }
        assert!(!html.contains("<script>"), "no inline script");
        assert!(!html.contains("style="), "no inline style");
    }
}
