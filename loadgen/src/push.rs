//! `loadgen push`: push notifications under load, checked end to end.
//!
//! A share of devices register a webhook token and go away (offline), the
//! rest register one and stay caught up (online); senders drive direct
//! messages to both at a fixed rate. loadgen itself is the webhook
//! receiver (plain HTTP/1.1 on a loopback port the node is pointed at), so
//! it sees every notification and checks, per (offline device,
//! conversation), that the counts of its notifications add up to the
//! messages sent there (each pending message announced exactly once, in
//! coalesced notifications), and that no online device was notified. It
//! times each notification from the send of the first message it
//! announces (the wake-up latency, the configured delay included).
//!
//! Blocking sockets and one thread per live connection: the point is the
//! node's push path, not connection count (the main loadgen does that).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use courier_protocol::frame::{ClientFrame, Incoming, PushProvider, ServerFrame};
use courier_protocol::token::{self, Secret};
use courier_protocol::ws::{self, Decoder, Event, Limits, Opcode, Role};
use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use crate::handshake::{self, Target, TokenIn};

/// `loadgen push` flags.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen push",
    about = "push notifications under load, checked end to end"
)]
pub struct PushArgs {
    /// The gateway's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/")]
    pub url: String,
    /// The node's data directory (its jwt.secret signs the tokens).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Where loadgen listens as the webhook receiver; start the node with
    /// `--push-webhook-url http://<this>/hook`.
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub receiver: SocketAddr,
    /// Devices that register a token and disconnect.
    #[arg(long, default_value_t = 2000)]
    pub offline: usize,
    /// Devices that register a token and stay caught up.
    #[arg(long, default_value_t = 100)]
    pub online: usize,
    /// Sending connections.
    #[arg(long, default_value_t = 20)]
    pub senders: usize,
    /// Messages per second over all senders.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Consecutive messages a sender sends to one recipient before moving
    /// on: a burst the node should announce in one notification.
    #[arg(long, default_value_t = 5)]
    pub burst: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds to wait after the last send for the last notifications
    /// (more than the node's push delay plus its coalescing window).
    #[arg(long, default_value_t = 10)]
    pub settle: u64,
    /// Where to write the JSON report.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// One notification the receiver accepted.
#[derive(Debug)]
struct Hit {
    token: String,
    conversation: String,
    count: u64,
    seq: u64,
    at: Instant,
}

/// Runs the scenario; the exit code is 0 when every check held, 1 when
/// one failed, 2 when the run could not be made.
pub fn main(argv: &[String]) -> std::process::ExitCode {
    let args = match PushArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(&args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen push: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: &PushArgs) -> Result<bool, String> {
    let target = Target::parse(&args.url).map_err(|e| e.to_string())?;
    if !args.receiver.ip().is_loopback() {
        return Err("the receiver must listen on a loopback address".into());
    }
    let secret = std::fs::read(args.data_dir.join("jwt.secret"))
        .map(Secret::new)
        .map_err(|e| format!("reading jwt.secret: {e}"))?;
    let hits = Arc::new(Mutex::new(Vec::new()));
    receive(args.receiver, hits.clone())?;
    let run_id = now_s() % 100_000;
    let name = |kind: &str, i: usize| format!("p{run_id}{kind}{i}");

    // Offline devices: register, then leave.
    let started = Instant::now();
    for i in 0..args.offline {
        let mut c = Conn::open(&target, &secret, &name("f", i))?;
        c.register(&format!("off-{i}"))?;
    }
    // Online devices: register, catch up, keep reading.
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for i in 0..args.online {
        let mut c = Conn::open(&target, &secret, &name("n", i))?;
        c.register(&format!("on-{i}"))?;
        c.sync()?;
        let stop = stop.clone();
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if c.event(Duration::from_millis(200)).is_err() {
                    return;
                }
            }
        }));
    }
    eprintln!(
        "loadgen push: {} offline and {} online devices registered in {:.1}s",
        args.offline,
        args.online,
        started.elapsed().as_secs_f64()
    );

    // Senders: each its own share of the rate, round-robin over recipients.
    let sent: Arc<Mutex<FxHashMap<String, BTreeMap<u64, Instant>>>> = Arc::default();
    let recipients: Vec<(String, bool)> = (0..args.offline)
        .map(|i| (name("f", i), true))
        .chain((0..args.online).map(|i| (name("n", i), false)))
        .collect();
    let recipients = Arc::new(recipients);
    let per_sender = args.rate / args.senders.max(1) as f64;
    let total = (args.rate * args.duration as f64) as usize;
    let mut threads = Vec::new();
    let send_start = Instant::now();
    for s in 0..args.senders {
        let mut c = Conn::open(&target, &secret, &name("s", s))?;
        let (sent, recipients) = (sent.clone(), recipients.clone());
        let me = name("s", s);
        let mine = total / args.senders + usize::from(s < total % args.senders);
        let burst = args.burst.max(1);
        threads.push(std::thread::spawn(move || -> Result<(), String> {
            for k in 0..mine {
                let due = send_start + Duration::from_secs_f64(k as f64 / per_sender);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (to, offline) = &recipients[(s * 7919 + (k / burst) * 31) % recipients.len()];
                let conv = direct(&me, to);
                let at = Instant::now();
                let seq = c.send_acked(&conv, k as u64 + 1)?;
                if *offline {
                    sent.lock()
                        .map_err(|_| "poisoned")?
                        .entry(conv)
                        .or_default()
                        .insert(seq, at);
                }
            }
            Ok(())
        }));
    }
    for t in threads {
        t.join().map_err(|_| "a sender panicked")??;
    }
    let sending = send_start.elapsed();
    std::thread::sleep(Duration::from_secs(args.settle));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }

    let hits = std::mem::take(&mut *hits.lock().map_err(|_| "poisoned")?);
    let sent = std::mem::take(&mut *sent.lock().map_err(|_| "poisoned")?);
    Ok(judge(args, &hits, &sent, sending))
}

/// The checks and the report; true when every check held.
fn judge(
    args: &PushArgs,
    hits: &[Hit],
    sent: &FxHashMap<String, BTreeMap<u64, Instant>>,
    sending: Duration,
) -> bool {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000, 3).expect("bounds");
    let mut announced: FxHashMap<&str, u64> = FxHashMap::default();
    let mut online_notified = 0u64;
    let mut unknown = 0u64;
    for h in hits {
        if h.token.starts_with("on-") {
            online_notified += 1;
            continue;
        }
        let Some(times) = sent.get(&h.conversation) else {
            unknown += 1;
            continue;
        };
        *announced.entry(&h.conversation).or_default() += h.count;
        let first = h.seq + 1 - h.count.min(h.seq);
        if let Some(at) = times.get(&first) {
            let _ = latency.record(h.at.duration_since(*at).as_millis().max(1) as u64);
        }
    }
    let offline_messages: u64 = sent.values().map(|t| t.len() as u64).sum();
    let mut mismatched = 0u64;
    for (conv, times) in sent {
        if announced.get(conv.as_str()).copied().unwrap_or(0) != times.len() as u64 {
            mismatched += 1;
        }
    }
    let notifications = hits.len() as u64 - online_notified;
    let first = hits.iter().map(|h| h.at).min();
    let last = hits.iter().map(|h| h.at).max();
    let span = first
        .zip(last)
        .map_or(0.0, |(a, b)| b.duration_since(a).as_secs_f64());
    let report = serde_json::json!({
        "offline_devices": args.offline,
        "online_devices": args.online,
        "rate": args.rate,
        "burst": args.burst,
        "sending_s": sending.as_secs_f64(),
        "messages_to_offline": offline_messages,
        "conversations_to_offline": sent.len(),
        "notifications": notifications,
        "notifications_per_s": if span > 0.0 { notifications as f64 / span } else { 0.0 },
        "wake_latency_ms": {
            "p50": latency.value_at_quantile(0.5),
            "p90": latency.value_at_quantile(0.9),
            "p99": latency.value_at_quantile(0.99),
            "max": latency.max(),
        },
        "online_notified": online_notified,
        "unknown_notifications": unknown,
        "conversations_miscounted": mismatched,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    if let Some(path) = &args.report {
        if let Err(e) = std::fs::write(path, report.to_string()) {
            eprintln!("loadgen push: cannot write {}: {e}", path.display());
        }
    }
    online_notified == 0 && unknown == 0 && mismatched == 0
}

fn direct(a: &str, b: &str) -> String {
    if a < b {
        format!("d:{a}:{b}")
    } else {
        format!("d:{b}:{a}")
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The webhook receiver: a thread per connection, keep-alive HTTP/1.1,
/// 200 for every POST; records each body's token, conversation and count.
fn receive(addr: SocketAddr, hits: Arc<Mutex<Vec<Hit>>>) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("receiver {addr}: {e}"))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let hits = hits.clone();
            std::thread::spawn(move || {
                let _ = serve(stream, &hits);
            });
        }
    });
    Ok(())
}

fn serve(stream: TcpStream, hits: &Mutex<Vec<Hit>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let at = Instant::now();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
            if v["type"] == "message" {
                let hit = Hit {
                    token: v["token"].as_str().unwrap_or("").to_owned(),
                    conversation: v["conversation"].as_str().unwrap_or("").to_owned(),
                    count: v["count"].as_u64().unwrap_or(0),
                    seq: v["seq"].as_u64().unwrap_or(0),
                    at,
                };
                if let Ok(mut h) = hits.lock() {
                    h.push(hit);
                }
            }
        }
        out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
    }
}

/// A blocking session.
struct Conn {
    stream: TcpStream,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl Conn {
    fn open(target: &Target, secret: &Secret, user: &str) -> Result<Self, String> {
        let token = token::mint(secret, &token::claims_for(user, 1, now_s(), 3600));
        let mut stream = TcpStream::connect(target.addr).map_err(|e| format!("connect: {e}"))?;
        let key = handshake::client_key(rand_nonce());
        stream
            .write_all(&handshake::request(target, &token, TokenIn::Header, &key))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let head = loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the node closed during the upgrade".into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(n) = handshake::check_response(&buf, &key).map_err(|e| e.to_string())? {
                break n;
            }
        };
        buf.drain(..head);
        let limits = Limits {
            max_frame: 1 << 20,
            max_message: 1 << 20,
        };
        let mut c = Self {
            stream,
            decoder: Decoder::new(Role::Client, limits),
            buf,
        };
        match c.frame()? {
            ServerFrame::Welcome { .. } => Ok(c),
            other => Err(format!("expected Welcome, got {other:?}")),
        }
    }

    fn send(&mut self, frame: &ClientFrame) -> Result<(), String> {
        let mut payload = Vec::new();
        frame.encode(&mut payload);
        let mut out = Vec::new();
        let n = rand_nonce();
        ws::encode_frame(
            &mut out,
            Opcode::Binary,
            &payload,
            Some([n[0], n[1], n[2], n[3]]),
        );
        self.stream.write_all(&out).map_err(|e| e.to_string())
    }

    fn register(&mut self, token: &str) -> Result<(), String> {
        self.send(&ClientFrame::PushRegister {
            request: 1,
            provider: PushProvider::Webhook,
            token: token.into(),
            ciphertext: false,
        })?;
        match self.frame()? {
            ServerFrame::Done { request: 1 } => Ok(()),
            other => Err(format!(
                "push registration refused: {other:?} (is the node's webhook configured?)"
            )),
        }
    }

    fn sync(&mut self) -> Result<(), String> {
        self.send(&ClientFrame::Sync {
            tail: 0,
            summary: false,
            cursors: vec![],
        })?;
        loop {
            if let ServerFrame::SyncDone { more: false } = self.frame()? {
                return Ok(());
            }
        }
    }

    fn send_acked(&mut self, conversation: &str, client_id: u64) -> Result<u64, String> {
        self.send(&ClientFrame::Send {
            conversation: conversation.into(),
            client_id,
            body: Bytes::from_static(b"opaque push load body"),
        })?;
        loop {
            match self.frame()? {
                ServerFrame::Sent {
                    client_id: id, seq, ..
                } if id == client_id => return Ok(seq),
                ServerFrame::Error { code, detail, .. } => {
                    return Err(format!("send refused: {code} {detail}"))
                }
                _ => {}
            }
        }
    }

    /// The next server frame (pings answered); an error on close or EOF.
    fn frame(&mut self) -> Result<ServerFrame, String> {
        loop {
            match self.event(Duration::from_secs(30))? {
                Some(Event::Binary(payload)) => {
                    if let Ok(Incoming::Frame(f)) = Incoming::decode(&payload) {
                        return Ok(f);
                    }
                }
                Some(_) => {}
                None => return Err("no frame within 30 s".into()),
            }
        }
    }

    /// One event within `timeout` (`None`: none yet), answering pings.
    fn event(&mut self, timeout: Duration) -> Result<Option<Event>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.decoder.decode(&self.buf) {
                Ok(Some((event, used))) => {
                    self.buf.drain(..used);
                    match event {
                        Some(Event::Ping(data)) => {
                            let mut out = Vec::new();
                            ws::encode_frame(&mut out, Opcode::Pong, &data, Some([3, 1, 4, 1]));
                            self.stream.write_all(&out).map_err(|e| e.to_string())?;
                        }
                        Some(Event::Close(c)) => return Err(format!("closed by the node: {c:?}")),
                        Some(e) => return Ok(Some(e)),
                        None => {}
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("bad frame from the node: {e:?}")),
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("end of stream".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

fn rand_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    n.copy_from_slice(&t.to_le_bytes());
    n
}
