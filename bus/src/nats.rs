//! The implementations on NATS JetStream, for the fleet.
//!
//! [`Nats`] owns one async-nats client and the tokio runtime that drives it,
//! on a thread of its own (the bus thread). Every trait call is a blocking
//! call from a plain thread into that runtime; subscriptions are forwarded
//! from the runtime into crossbeam channels.
//!
//! - [`NatsLog`]: a JetStream stream with file storage. An append is a
//!   JetStream publish with `Nats-Msg-Id` (the stream's duplicate window
//!   dedupes a retried append) and, when fenced,
//!   `Nats-Expected-Last-Subject-Sequence`; it returns after the stream's
//!   acknowledgement, which at R3 means a majority of the replicas stored it
//!   (and, with `sync_interval: always` in the server's config, fsynced it).
//! - [`NatsKv`]: a JetStream key-value bucket; its `max_age` is the TTL, and
//!   every write restarts an entry's age.
//! - [`NatsPubSub`]: core NATS subjects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::runtime::Runtime;

use crate::metrics::{LinkMetrics, Op};
use crate::{
    check_name, Appended, BusError, Entry, Kv, Log, Message, PubSub, Record, Subscription,
};

/// How to reach NATS.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`); the client fails over among them.
    pub servers: Vec<String>,
    /// The connection's name, shown by the server's monitoring.
    pub name: String,
    /// How long a JetStream request (publish ack, KV write) may take.
    pub request_timeout: Duration,
    /// Where the link's call times, failures and round trips go
    /// (`courier_nats_*`); none for a client that exports no metrics.
    pub metrics: Option<LinkMetrics>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            name: "courier".into(),
            request_timeout: Duration::from_secs(5),
            metrics: None,
        }
    }
}

/// A connection to NATS and the runtime thread that drives it.
pub struct Nats {
    runtime: Arc<Runtime>,
    client: async_nats::Client,
    js: jetstream::Context,
    metrics: Option<LinkMetrics>,
    /// Connections made (the first one included) and slow-consumer drops
    /// reported by the client: see [`Nats::gaps`].
    connects: Arc<AtomicU64>,
    slow_drops: Arc<AtomicU64>,
    /// The round-trip probe, stopped with the connection.
    _probe: Option<Forwarder>,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl Nats {
    /// Connects, waiting up to `request_timeout` for a first server.
    pub fn connect(config: &NatsConfig) -> Result<Arc<Self>, BusError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("courier-bus")
            .enable_all()
            .build()
            .map_err(unavailable)?;
        let servers: Vec<async_nats::ServerAddr> = config
            .servers
            .iter()
            .map(|s| s.parse().map_err(|_| BusError::Invalid(s.clone())))
            .collect::<Result<_, _>>()?;
        let connects = Arc::new(AtomicU64::new(0));
        let slow_drops = Arc::new(AtomicU64::new(0));
        let (counted, dropped) = (connects.clone(), slow_drops.clone());
        let options = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                match event {
                    async_nats::Event::Connected => {
                        counted.fetch_add(1, Ordering::AcqRel);
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        dropped.fetch_add(1, Ordering::AcqRel);
                    }
                    _ => {}
                }
                std::future::ready(())
            })
            .name(&config.name)
            .connection_timeout(config.request_timeout)
            .request_timeout(Some(config.request_timeout))
            .retry_on_initial_connect()
            .max_reconnects(None);
        let timeout = config.request_timeout;
        let client = runtime.block_on(async {
            let connecting = options.connect(servers);
            let client = tokio::time::timeout(timeout * 2, connecting)
                .await
                .map_err(|_| BusError::Unavailable("no NATS server answered".into()))?
                .map_err(unavailable)?;
            // retry_on_initial_connect returns at once; wait for the first
            // connection so the first call does not fail.
            let deadline = tokio::time::Instant::now() + timeout * 2;
            while client.connection_state() != async_nats::connection::State::Connected {
                if tokio::time::Instant::now() > deadline {
                    return Err(BusError::Unavailable("no NATS server answered".into()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, BusError>(client)
        })?;
        // The context spawns its acknowledgement task on the runtime.
        let _entered = runtime.enter();
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        let probe = config.metrics.as_ref().map(|metrics| {
            metrics.attach(client.clone());
            Forwarder(runtime.spawn(probe(client.clone(), metrics.clone(), timeout)))
        });
        Ok(Arc::new(Self {
            runtime: Arc::new(runtime),
            client,
            js,
            metrics: config.metrics.clone(),
            connects,
            slow_drops,
            _probe: probe,
        }))
    }

    /// How many times this link may have lost messages since it first
    /// connected: each reconnect (what was in flight to or from the
    /// server that went away is gone, and nothing was delivered to this
    /// client's subscriptions until they were made again) and each
    /// slow-consumer drop. Plain subjects do not resend, so a caller that
    /// sees this grow repairs what it may have missed.
    pub fn gaps(&self) -> u64 {
        let connects = self.connects.load(Ordering::Acquire);
        connects.saturating_sub(1) + self.slow_drops.load(Ordering::Acquire)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Runs one call of kind `op` and records its time. A conflict or an
    /// existing key is an answer, not a failure of the link.
    fn timed<T>(
        &self,
        op: Op,
        f: impl std::future::Future<Output = Result<T, BusError>>,
    ) -> Result<T, BusError> {
        let start = Instant::now();
        let result = self.block_on(f);
        if let Some(m) = &self.metrics {
            let ok = !matches!(result, Err(BusError::Unavailable(_)));
            m.observe(op, start.elapsed(), ok);
        }
        result
    }

    /// The log on stream `name` carrying `subjects` (created if missing,
    /// its replica count and duplicate window updated if it exists).
    pub fn log(
        self: &Arc<Self>,
        name: &str,
        subjects: &[&str],
        replicas: usize,
        dedupe_window: Duration,
    ) -> Result<NatsLog, BusError> {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: dedupe_window,
            allow_direct: true,
            ..Default::default()
        };
        let stream = self.block_on(async {
            match self.js.get_stream(name).await {
                Ok(_) => {
                    self.js.update_stream(&config).await.map_err(unavailable)?;
                }
                Err(_) => {
                    self.js.create_stream(config).await.map_err(unavailable)?;
                }
            }
            self.js.get_stream(name).await.map_err(unavailable)
        })?;
        Ok(NatsLog {
            nats: self.clone(),
            stream,
        })
    }

    /// The key-value bucket `bucket` with entries living `ttl` after their
    /// last write (created if missing).
    pub fn kv(
        self: &Arc<Self>,
        bucket: &str,
        ttl: Option<Duration>,
        replicas: usize,
    ) -> Result<NatsKv, BusError> {
        let store = self.block_on(async {
            match self.js.get_key_value(bucket).await {
                Ok(store) => Ok(store),
                Err(_) => self
                    .js
                    .create_key_value(kv::Config {
                        bucket: bucket.to_owned(),
                        history: 1,
                        max_age: ttl.unwrap_or_default(),
                        storage: stream::StorageType::File,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable),
            }
        })?;
        Ok(NatsKv {
            nats: self.clone(),
            store,
            ttl,
        })
    }

    /// Core NATS publish/subscribe on this connection.
    pub fn pubsub(self: &Arc<Self>) -> NatsPubSub {
        NatsPubSub { nats: self.clone() }
    }

    /// Sends everything buffered to the server and waits for its answer.
    pub fn flush(&self) -> Result<(), BusError> {
        self.block_on(self.client.flush()).map_err(unavailable)
    }
}

/// Times a request to a subject nobody serves, every
/// [`crate::metrics::PROBE_INTERVAL`]: the server answers it itself (no
/// responders), so its time is one round trip through the server.
async fn probe(client: async_nats::Client, metrics: LinkMetrics, timeout: Duration) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let subject = format!("_courier.rtt.{}.{nanos}", std::process::id());
    let mut every = tokio::time::interval(crate::metrics::PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if client.connection_state() != async_nats::connection::State::Connected {
            metrics.probed(None);
            continue;
        }
        let start = Instant::now();
        let request = client.request(subject.clone(), Bytes::new());
        let answered = match tokio::time::timeout(timeout, request).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == async_nats::RequestErrorKind::NoResponders,
            Err(_) => false,
        };
        metrics.probed(answered.then(|| start.elapsed()));
    }
}

/// How long a replay waits for its next record before it reads on with a
/// new consumer, and how long it may go without any record before it
/// fails.
const REPLAY_IDLE: Duration = Duration::from_secs(2);

/// What a replay's consumer pulls at a time.
const REPLAY_BATCH: usize = 256;
const REPLAY_BATCH_BYTES: usize = 16 << 20;
const REPLAY_HEARTBEAT: Duration = Duration::from_millis(500);
const REPLAY_STALL: Duration = Duration::from_secs(30);

/// A [`Log`] on a JetStream stream.
pub struct NatsLog {
    nats: Arc<Nats>,
    stream: stream::Stream,
}

impl std::fmt::Debug for NatsLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsLog")
            .field("stream", &self.stream.cached_info().config.name)
            .finish()
    }
}

impl NatsLog {
    /// The name of the server leading the stream's replicas, if known.
    pub fn leader(&self) -> Option<String> {
        let info = self.nats.block_on(self.stream.get_info()).ok()?;
        info.cluster.and_then(|c| c.leader)
    }
}

impl Log for NatsLog {
    fn append(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
        expect_last: Option<u64>,
    ) -> Result<Appended, BusError> {
        check_name(subject)?;
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id);
        if let Some(last) = expect_last {
            publish = publish.expected_last_subject_sequence(last);
        }
        let nats = &self.nats;
        nats.timed(Op::append, async {
            let ack = nats
                .js
                .send_publish(subject.to_owned(), publish)
                .await
                .map_err(unavailable)?
                .await;
            match ack {
                Ok(ack) => Ok(Appended {
                    seq: ack.sequence,
                    duplicate: ack.duplicate,
                }),
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    Err(BusError::Conflict(e.to_string()))
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn last(&self, subject: &str) -> Result<u64, BusError> {
        check_name(subject)?;
        self.nats.timed(Op::last, async {
            match self.stream.get_last_raw_message_by_subject(subject).await {
                Ok(m) => Ok(m.sequence),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn last_if_id(&self, subject: &str, id: &str) -> Result<Option<u64>, BusError> {
        check_name(subject)?;
        self.nats.timed(Op::last, async {
            match self.stream.get_last_raw_message_by_subject(subject).await {
                Ok(m) => {
                    let ours = m
                        .headers
                        .get(async_nats::header::NATS_MESSAGE_ID)
                        .is_some_and(|v| v.as_str() == id);
                    Ok(ours.then_some(m.sequence))
                }
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn last_record(&self, subject: &str) -> Result<Option<Record>, BusError> {
        check_name(subject)?;
        self.nats.timed(Op::last, async {
            match self.stream.get_last_raw_message_by_subject(subject).await {
                Ok(m) => Ok(Some(Record {
                    seq: m.sequence,
                    payload: m.payload,
                })),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn purge(&self, subject: &str, below: u64) -> Result<(), BusError> {
        check_name(subject)?;
        // Nothing is below 1; and JetStream reads a sequence of 0 as none
        // given, which would purge the whole subject.
        if below <= 1 {
            return Ok(());
        }
        self.nats.timed(Op::purge, async {
            // JetStream's purge by sequence keeps `below` and later.
            self.stream
                .purge()
                .filter(subject)
                .sequence(below)
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }

    fn replay(
        &self,
        subject: &str,
        after: u64,
        each: &mut dyn FnMut(Record) -> Result<(), BusError>,
    ) -> Result<u64, BusError> {
        let until = self.last(subject)?;
        if until <= after {
            return Ok(after);
        }
        let nats = &self.nats;
        nats.timed(Op::replay, async {
            let mut seen = after;
            let mut progress_at = Instant::now();
            'consumers: while seen < until {
                // An ephemeral pull consumer without acks, from the first
                // record not seen yet, pulling a bounded number of bytes
                // at a time (records are up to 512 KiB).
                let consumer = self
                    .stream
                    .create_consumer(consumer::pull::Config {
                        filter_subject: subject.to_owned(),
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: seen + 1,
                        },
                        ack_policy: consumer::AckPolicy::None,
                        inactive_threshold: Duration::from_secs(30),
                        memory_storage: true,
                        num_replicas: 1,
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable)?;
                let mut messages = consumer
                    .stream()
                    .max_messages_per_batch(REPLAY_BATCH)
                    .max_bytes_per_batch(REPLAY_BATCH_BYTES)
                    .heartbeat(REPLAY_HEARTBEAT)
                    .messages()
                    .await
                    .map_err(unavailable)?;
                while seen < until {
                    let next = tokio::time::timeout(REPLAY_IDLE, messages.next()).await;
                    let message = match next {
                        Ok(Some(Ok(m))) => m,
                        // Records that exist stopped arriving (seen when
                        // the stream is purged while a consumer reads),
                        // the stream ended, or it reported an error (a
                        // missed heartbeat while the caller was slow): a
                        // new consumer takes up from the last record seen,
                        // and a replay that makes no progress at all for
                        // REPLAY_STALL fails rather than hang a takeover.
                        failed if progress_at.elapsed() < REPLAY_STALL => {
                            let why = match failed {
                                Ok(Some(Err(e))) => e.to_string(),
                                Ok(None) => "stream ended".to_owned(),
                                _ => "idle".to_owned(),
                            };
                            tracing::debug!(
                                subject,
                                seen,
                                until,
                                why,
                                "replay restarted with a new consumer"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue 'consumers;
                        }
                        _ => {
                            return Err(BusError::Unavailable(format!(
                                "replay of {subject} stalled at {seen} of {until}"
                            )))
                        }
                    };
                    let seq = message.info().map_err(unavailable)?.stream_sequence;
                    if seq <= seen {
                        continue;
                    }
                    seen = seq;
                    progress_at = Instant::now();
                    each(Record {
                        seq,
                        payload: message.payload.clone(),
                    })?;
                }
            }
            Ok(seen)
        })
    }
}

/// A [`Kv`] on a JetStream key-value bucket.
pub struct NatsKv {
    nats: Arc<Nats>,
    store: kv::Store,
    ttl: Option<Duration>,
}

impl std::fmt::Debug for NatsKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsKv")
            .field("bucket", &self.store.name)
            .finish()
    }
}

impl Kv for NatsKv {
    fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    fn get(&self, key: &str) -> Result<Option<Entry>, BusError> {
        check_name(key)?;
        let entry = self.nats.timed(Op::kv_get, async {
            self.store.entry(key).await.map_err(unavailable)
        })?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| Entry {
                value: e.value,
                revision: e.revision,
            }))
    }

    fn create(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        check_name(key)?;
        self.nats.timed(Op::kv_create, async {
            match self.store.create(key, value).await {
                Ok(revision) => Ok(revision),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(BusError::Exists),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, BusError> {
        check_name(key)?;
        self.nats.timed(Op::kv_update, async {
            match self.store.update(key, value, revision).await {
                Ok(revision) => Ok(revision),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    Err(BusError::Conflict(e.to_string()))
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn put(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        check_name(key)?;
        self.nats.timed(Op::kv_put, async {
            self.store.put(key, value).await.map_err(unavailable)
        })
    }

    fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), BusError> {
        check_name(key)?;
        self.nats.timed(Op::kv_delete, async {
            let result = match revision {
                Some(r) => self.store.delete_expect_revision(key, Some(r)).await,
                None => self.store.delete(key).await,
            };
            result.map_err(|e| match revision {
                Some(_) => BusError::Conflict(e.to_string()),
                None => unavailable(e),
            })
        })
    }

    fn keys(&self, prefix: &str) -> Result<Vec<String>, BusError> {
        self.nats.timed(Op::kv_keys, async {
            let mut keys = Vec::new();
            let mut all = self.store.keys().await.map_err(unavailable)?;
            while let Some(key) = all.next().await {
                let key = key.map_err(unavailable)?;
                if key.starts_with(prefix) {
                    keys.push(key);
                }
            }
            keys.sort_unstable();
            Ok(keys)
        })
    }
}

/// [`PubSub`] on core NATS subjects.
#[derive(Debug)]
pub struct NatsPubSub {
    nats: Arc<Nats>,
}

/// Ends the forwarding task of a NATS subscription when dropped.
struct Forwarder(tokio::task::JoinHandle<()>);

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forwarder")
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PubSub for NatsPubSub {
    fn publish(&self, subject: &str, payload: Bytes) -> Result<(), BusError> {
        check_name(subject)?;
        let client = &self.nats.client;
        self.nats.timed(Op::publish, async {
            client
                .publish(subject.to_owned(), payload)
                .await
                .map_err(unavailable)
        })
    }

    fn subscribe(&self, pattern: &str) -> Result<Subscription, BusError> {
        let nats = &self.nats;
        let mut subscriber = nats
            .block_on(nats.client.subscribe(pattern.to_owned()))
            .map_err(|e| BusError::Invalid(format!("{pattern}: {e}")))?;
        // The SUB must reach the server before this returns, or a publish
        // right after could miss the new subscription.
        nats.flush()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let task = nats.runtime.spawn(async move {
            while let Some(m) = subscriber.next().await {
                let message = Message {
                    subject: m.subject.to_string(),
                    payload: m.payload,
                };
                if tx.send(message).is_err() {
                    break;
                }
            }
        });
        Ok(Subscription::new(rx, Box::new(Forwarder(task))))
    }
}
