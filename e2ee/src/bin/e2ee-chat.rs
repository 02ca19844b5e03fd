//! `e2ee-chat`: two users talking end to end through a real gateway
//! (`demo`), and the encrypted pairs scenario with its plain twin
//! (`bench`). Tokens are minted with the node's secret, read from its data
//! directory, so run it beside the node it talks to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use courier_e2ee::bench::{self, BenchConfig};
use courier_e2ee::net::Conn;
use courier_e2ee::{safety_number, Device};
use courier_protocol::frame::{ClientFrame, E2eeFrame, Incoming, ServerFrame};
use courier_protocol::ids::direct_conversation;
use courier_protocol::token::{self, Secret};

#[derive(Parser, Debug)]
#[command(about = "End-to-end encrypted Courier clients: a demo and a throughput driver")]
struct Cli {
    /// The gateway's WebSocket address.
    #[arg(long, default_value = "127.0.0.1:8080", global = true)]
    addr: SocketAddr,
    /// The node's data directory (its `jwt.secret` signs the tokens).
    #[arg(long, default_value = "data", global = true)]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Two users (alice-e2ee and bob-e2ee, so the demo's ciphertext stays
    /// out of a plain alice and bob's conversation) set up a session
    /// through the key directory and exchange encrypted messages; prints
    /// what each decrypted. Each run uploads fresh keys and sends with
    /// fresh client ids, so it can be run again against the same node.
    Demo {
        /// The messages alice sends (bob answers each).
        #[arg(default_values_t = ["hello, bob".to_string(), "this is end to end".to_string()])]
        messages: Vec<String>,
    },
    /// N pairs exchanging messages at a rate; reports throughput.
    Bench {
        #[arg(long, default_value_t = 10)]
        pairs: usize,
        /// Messages per second per pair.
        #[arg(long, default_value_t = 40.0)]
        rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 200)]
        body_bytes: usize,
        /// Send plaintext with ordinary `Send` frames (the comparison run).
        #[arg(long)]
        plain: bool,
        /// Prefix of the user ids.
        #[arg(long, default_value = "bench")]
        prefix: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let raw = std::fs::read(cli.data_dir.join("jwt.secret"))
        .with_context(|| format!("reading {}/jwt.secret", cli.data_dir.display()))?;
    let secret = Secret::new(raw);
    match cli.command {
        Command::Demo { messages } => demo(cli.addr, &secret, &messages),
        Command::Bench {
            pairs,
            rate,
            seconds,
            body_bytes,
            plain,
            prefix,
        } => {
            let cfg = BenchConfig {
                addr: cli.addr,
                secret: Arc::new(secret),
                pairs,
                rate,
                duration: Duration::from_secs(seconds),
                body_bytes,
                encrypted: !plain,
                prefix,
            };
            let r = bench::run(&cfg)?;
            println!(
                "mode={} pairs={pairs} rate_per_pair={rate} seconds={seconds} body_bytes={body_bytes}",
                if plain { "plain" } else { "encrypted" }
            );
            println!(
                "sent={} acked={} received={} bad={} duplicates={} throughput={:.0} msg/s",
                r.sent,
                r.acked,
                r.received,
                r.bad,
                r.duplicates,
                r.throughput()
            );
            println!(
                "latency_ms p50={:.2} p99={:.2} max={:.2}",
                r.latency_p50_ms, r.latency_p99_ms, r.latency_max_ms
            );
            if r.bad > 0 || r.received < r.sent {
                bail!("{} bad, {} of {} received", r.bad, r.received, r.sent);
            }
            Ok(())
        }
    }
}

fn connect(addr: SocketAddr, secret: &Secret, user: &str) -> anyhow::Result<Conn> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut c = Conn::connect(
        addr,
        &token::mint(secret, &token::claims_for(user, 1, now, 3600)),
    )?;
    c.sync()?;
    Ok(c)
}

fn demo(addr: SocketAddr, secret: &Secret, messages: &[String]) -> anyhow::Result<()> {
    let t = Duration::from_secs(10);
    let (alice_id, bob_id) = ("alice-e2ee", "bob-e2ee");
    let conv = direct_conversation(alice_id, bob_id);
    let (mut a, mut b) = (
        connect(addr, secret, alice_id)?,
        connect(addr, secret, bob_id)?,
    );
    let (mut alice, mut bob) = (Device::new(alice_id, 1), Device::new(bob_id, 1));
    // Client ids are deduplicated for days: a run's ids must not repeat an
    // earlier run's, or its sends would be answered as retries of those.
    let first_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
        << 12;
    a.send(&alice.upload(1, 20))?;
    b.send(&bob.upload(1, 20))?;
    b.wait_for(t, |f| {
        matches!(f, Incoming::E2ee(E2eeFrame::KeyCount { request: 1, .. })).then_some(())
    })?;
    a.send(&ClientFrame::BundleFetch {
        request: 2,
        user: bob_id.into(),
    })?;
    let bundle = a.wait_for(t, |f| match f {
        Incoming::E2ee(E2eeFrame::Bundle { devices, .. }) => devices.first().copied(),
        _ => None,
    })?;
    alice.start_session(bob_id, &bundle)?;
    println!(
        "safety number: {}",
        safety_number(&alice.identity(), &bundle.identity)
    );
    for (i, text) in messages.iter().enumerate() {
        let client_id = first_id + 2 * i as u64 + 1;
        a.send(&ClientFrame::SendPerDevice {
            conversation: conv.clone(),
            client_id,
            ciphertexts: alice.encrypt_for(&[(bob_id.into(), 1)], text.as_bytes())?,
        })?;
        let plain = receive(&mut b, &mut bob, alice_id)?;
        println!("bob got:   {}", String::from_utf8_lossy(&plain));
        let answer = format!("got \"{}\"", String::from_utf8_lossy(&plain));
        b.send(&ClientFrame::SendPerDevice {
            conversation: conv.clone(),
            client_id,
            ciphertexts: bob.encrypt_for(&[(alice_id.into(), 1)], answer.as_bytes())?,
        })?;
        let plain = receive(&mut a, &mut alice, bob_id)?;
        println!("alice got: {}", String::from_utf8_lossy(&plain));
    }
    Ok(())
}

/// Waits for a message from `from` and decrypts it.
fn receive(conn: &mut Conn, device: &mut Device, from: &str) -> anyhow::Result<Vec<u8>> {
    let (sender_device, body) = conn.wait_for(Duration::from_secs(10), |f| match f {
        Incoming::Frame(ServerFrame::Message {
            sender,
            sender_device,
            body,
            ..
        }) if sender == from => Some((*sender_device, body.clone())),
        Incoming::Frame(ServerFrame::Error { code, detail, .. }) => {
            eprintln!("error {code}: {detail}");
            None
        }
        _ => None,
    })?;
    Ok(device.decrypt(from, sender_device, &body)?)
}
