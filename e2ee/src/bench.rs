//! The encrypted scenario: `pairs` pairs of users, each a sender and a
//! receiver with one device, exchanging messages at a fixed rate through a
//! real gateway. Encrypted, each pair runs X3DH through the key directory
//! and every message is a per-device send the receiver decrypts; plain,
//! the same driver sends the same plaintext as an ordinary `Send`. Both
//! report throughput and end-to-end latency, so the cost of encryption
//! (client CPU, larger bodies, bundle fetches) reads off the difference.
//!
//! The plaintext is 16 bytes of header (send time in µs since the run's
//! start, message number) padded to `body_bytes`. Every message a receiver
//! gets is checked: decrypts, carries the right number, arrives once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use courier_protocol::frame::{ClientFrame, E2eeFrame, Incoming, ServerFrame};
use courier_protocol::ids::direct_conversation;
use courier_protocol::token::{self, Secret};
use hdrhistogram::Histogram;

use crate::net::Conn;
use crate::Device;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub addr: SocketAddr,
    pub secret: Arc<Secret>,
    pub pairs: usize,
    /// Messages per second per pair.
    pub rate: f64,
    pub duration: Duration,
    pub body_bytes: usize,
    pub encrypted: bool,
    /// Prefix of the user ids, so runs on one node do not share users.
    pub prefix: String,
}

/// What a pair's sender tells its receiver: how many it sent, and that it
/// is done.
#[derive(Debug, Default)]
struct PairState {
    sent: AtomicU64,
    done: AtomicBool,
}

/// What a run measured.
#[derive(Debug)]
pub struct BenchReport {
    pub sent: u64,
    pub acked: u64,
    pub received: u64,
    /// Messages that did not decrypt or carried a wrong number.
    pub bad: u64,
    pub duplicates: u64,
    pub elapsed: Duration,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
}

impl BenchReport {
    /// Received messages per second over the sending window.
    pub fn throughput(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn connect(cfg: &BenchConfig, user: &str) -> anyhow::Result<Conn> {
    let t = token::mint(&cfg.secret, &token::claims_for(user, 1, now_s(), 3600));
    let mut c = Conn::connect(cfg.addr, &t)?;
    c.sync()?;
    Ok(c)
}

/// Runs the scenario and waits for it to end.
pub fn run(cfg: &BenchConfig) -> anyhow::Result<BenchReport> {
    let base = Instant::now();
    let mut handles = Vec::new();
    for i in 0..cfg.pairs {
        let (ready_tx, ready_rx) = mpsc::channel();
        let rcfg = cfg.clone();
        let pair = Arc::new(PairState::default());
        let theirs = pair.clone();
        let receiver = thread::spawn(move || receive(&rcfg, i, base, ready_tx, &theirs));
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("a receiver did not get ready")?;
        let scfg = cfg.clone();
        let sender = thread::spawn(move || {
            let result = send(&scfg, i, base, &pair);
            pair.done.store(true, Ordering::Release);
            result
        });
        handles.push((sender, receiver));
    }
    let mut report = BenchReport {
        sent: 0,
        acked: 0,
        received: 0,
        bad: 0,
        duplicates: 0,
        elapsed: cfg.duration,
        latency_p50_ms: 0.0,
        latency_p99_ms: 0.0,
        latency_max_ms: 0.0,
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for (sender, receiver) in handles {
        let (sent, acked) = join(sender)?;
        let got = join(receiver)?;
        report.sent += sent;
        report.acked += acked;
        report.received += got.received;
        report.bad += got.bad;
        report.duplicates += got.duplicates;
        hist.add(&got.latency_us)?;
    }
    report.latency_p50_ms = hist.value_at_quantile(0.5) as f64 / 1000.0;
    report.latency_p99_ms = hist.value_at_quantile(0.99) as f64 / 1000.0;
    report.latency_max_ms = hist.max() as f64 / 1000.0;
    Ok(report)
}

fn join<T>(h: thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    match h.join() {
        Ok(r) => r,
        Err(_) => bail!("a driver thread panicked"),
    }
}

fn users(cfg: &BenchConfig, i: usize) -> (String, String) {
    (format!("{}s{i}", cfg.prefix), format!("{}r{i}", cfg.prefix))
}

fn plaintext(cfg: &BenchConfig, n: u64, base: Instant) -> Vec<u8> {
    let mut p = Vec::with_capacity(cfg.body_bytes.max(16));
    p.extend_from_slice(&(base.elapsed().as_micros() as u64).to_le_bytes());
    p.extend_from_slice(&n.to_le_bytes());
    p.resize(cfg.body_bytes.max(16), b'.');
    p
}

fn send(
    cfg: &BenchConfig,
    i: usize,
    base: Instant,
    pair: &PairState,
) -> anyhow::Result<(u64, u64)> {
    let (me, peer) = users(cfg, i);
    let conversation = direct_conversation(&me, &peer);
    let mut conn = connect(cfg, &me)?;
    let mut device = Device::new(&me, 1);
    if cfg.encrypted {
        conn.send(&device.upload(1, 10))?;
        conn.send(&ClientFrame::BundleFetch {
            request: 2,
            user: peer.clone(),
        })?;
        let bundle = conn.wait_for(Duration::from_secs(10), |f| match f {
            Incoming::E2ee(E2eeFrame::Bundle {
                request: 2,
                devices,
                ..
            }) => Some(devices.clone()),
            _ => None,
        })?;
        let Some(b) = bundle.first() else {
            bail!("{peer} has no keys");
        };
        device.start_session(&peer, b)?;
    }
    let to = [(peer.clone(), 1u32)];
    let interval = Duration::from_secs_f64(1.0 / cfg.rate.max(0.001));
    let start = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    while start.elapsed() < cfg.duration {
        let due = start + interval.mul_f64(sent as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            if let Some(f) = conn.next(wait)? {
                acked += handle_sender_frame(&mut device, &peer, f)?;
            }
            continue;
        }
        let p = plaintext(cfg, sent, base);
        let frame = if cfg.encrypted {
            ClientFrame::SendPerDevice {
                conversation: conversation.clone(),
                client_id: sent + 1,
                ciphertexts: device.encrypt_for(&to, &p)?,
            }
        } else {
            ClientFrame::Send {
                conversation: conversation.clone(),
                client_id: sent + 1,
                body: Bytes::from(p),
            }
        };
        conn.send(&frame)?;
        sent += 1;
        pair.sent.store(sent, Ordering::Release);
    }
    // Collect the remaining acks.
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked < sent && Instant::now() < deadline {
        if let Some(f) = conn.next(Duration::from_millis(200))? {
            acked += handle_sender_frame(&mut device, &peer, f)?;
        }
    }
    Ok((sent, acked))
}

/// Counts `Sent` acks and takes the receiver's reply (which moves the
/// sender's session to plain headers).
fn handle_sender_frame(device: &mut Device, peer: &str, f: Incoming) -> anyhow::Result<u64> {
    match f {
        Incoming::Frame(ServerFrame::Sent { .. }) => Ok(1),
        Incoming::Frame(ServerFrame::Message {
            sender,
            sender_device,
            body,
            ..
        }) if sender == peer => {
            device.decrypt(&sender, sender_device, &body)?;
            Ok(0)
        }
        Incoming::Frame(ServerFrame::Error { code, detail, .. }) => {
            bail!("send refused: {code} {detail}")
        }
        _ => Ok(0),
    }
}

struct Received {
    received: u64,
    bad: u64,
    duplicates: u64,
    latency_us: Histogram<u64>,
}

fn receive(
    cfg: &BenchConfig,
    i: usize,
    base: Instant,
    ready: mpsc::Sender<()>,
    pair: &PairState,
) -> anyhow::Result<Received> {
    let (peer, me) = users(cfg, i);
    let conversation = direct_conversation(&me, &peer);
    let mut conn = connect(cfg, &me)?;
    let mut device = Device::new(&me, 1);
    if cfg.encrypted {
        conn.send(&device.upload(1, 10))?;
        conn.wait_for(Duration::from_secs(10), |f| {
            matches!(f, Incoming::E2ee(E2eeFrame::KeyCount { request: 1, .. })).then_some(())
        })?;
    }
    let _ = ready.send(());
    let mut got = Received {
        received: 0,
        bad: 0,
        duplicates: 0,
        latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
    };
    let mut seen = vec![false; 0];
    let mut replied = false;
    // Until the sender is done and everything it sent arrived, or a grace
    // period after the run (what is missing then counts as lost).
    let end = Instant::now() + cfg.duration + Duration::from_secs(30);
    let finished = |got: &Received| {
        pair.done.load(Ordering::Acquire) && got.received >= pair.sent.load(Ordering::Acquire)
    };
    while Instant::now() < end && !finished(&got) {
        let Some(f) = conn.next(Duration::from_millis(200))? else {
            continue;
        };
        let Incoming::Frame(ServerFrame::Message {
            sender,
            sender_device,
            body,
            seq,
            ..
        }) = f
        else {
            continue;
        };
        let plain = if cfg.encrypted {
            match device.decrypt(&sender, sender_device, &body) {
                Ok(p) => p,
                Err(_) => {
                    got.bad += 1;
                    continue;
                }
            }
        } else {
            body.to_vec()
        };
        let (Some(t), Some(n)) = (
            plain.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
            plain.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        ) else {
            got.bad += 1;
            continue;
        };
        let n = u64::from_le_bytes(n) as usize;
        if seen.len() <= n {
            seen.resize(n + 1, false);
        }
        if seen[n] {
            got.duplicates += 1;
            continue;
        }
        seen[n] = true;
        got.received += 1;
        let sent_us = u64::from_le_bytes(t);
        let now_us = base.elapsed().as_micros() as u64;
        got.latency_us
            .saturating_record(now_us.saturating_sub(sent_us).max(1));
        conn.send(&ClientFrame::Delivered {
            conversation: conversation.clone(),
            seq,
        })?;
        if cfg.encrypted && !replied {
            replied = true;
            conn.send(&ClientFrame::SendPerDevice {
                conversation: conversation.clone(),
                client_id: 1,
                ciphertexts: device.encrypt_for(&[(sender.clone(), sender_device)], b"got it")?,
            })?;
        }
    }
    Ok(got)
}
