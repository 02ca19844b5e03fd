//! A fake push webhook: a plain HTTP/1.1 server on loopback that records
//! every notification (the JSON body, checked to be signed), and the
//! flags that point a gateway or router at it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the fake saw: the JSON body and whether it answered 200.
#[derive(Clone, Debug)]
pub struct Hit {
    pub body: serde_json::Value,
    pub accepted: bool,
}

/// A webhook receiver on 127.0.0.1. While `refuse` is set it answers 503
/// with `Retry-After: 60`. The thread ends with the test process.
pub struct Receiver {
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    pub refuse: Arc<AtomicBool>,
}

impl Receiver {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(false));
        let (h, r) = (hits.clone(), refuse.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (h, r) = (h.clone(), r.clone());
                std::thread::spawn(move || serve(stream, &h, &r));
            }
        });
        Self { addr, hits, refuse }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> Vec<serde_json::Value> {
        self.hits()
            .into_iter()
            .filter(|h| h.accepted)
            .map(|h| h.body)
            .collect()
    }

    /// Waits (bounded) until `pred` holds for the hits.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Hit]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pred(&self.hits()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.hits()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Serves keep-alive HTTP/1.1 requests on one connection.
fn serve(stream: std::net::TcpStream, hits: &Mutex<Vec<Hit>>, refuse: &AtomicBool) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        assert!(line.starts_with("POST /hook "), "request line {line:?}");
        let mut length = 0;
        let mut signed = false;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "x-courier-signature" => signed = value.trim().starts_with("sha256="),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        assert!(signed, "every notification is signed");
        let accepted = !refuse.load(Ordering::SeqCst);
        hits.lock().unwrap().push(Hit {
            body: serde_json::from_slice(&body).unwrap(),
            accepted,
        });
        let answer = if accepted {
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        } else {
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 60\r\ncontent-length: 0\r\n\r\n"
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

pub fn push_flags(dir: &std::path::Path, receiver: &Receiver, delay_ms: &str) -> Vec<String> {
    let secret = dir.join("webhook.secret");
    std::fs::write(&secret, "test-secret\n").unwrap();
    [
        "--push-webhook-url",
        &format!("http://{}/hook", receiver.addr),
        "--push-webhook-secret-file",
        secret.to_str().unwrap(),
        "--push-delay-ms",
        delay_ms,
        "--push-coalesce-ms",
        "60000",
        "--push-backoff-ms",
        "50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
