//! The push worker: its own thread with a current-thread tokio runtime,
//! where the provider requests run, away from the router thread.
//!
//! Each job is a task: it takes a slot of its provider's semaphore
//! (concurrency), waits for its provider's token bucket (rate), makes one
//! request, and on a retryable failure gives the slot back and sleeps
//! before the next attempt: Retry-After when the provider sent one,
//! otherwise `base × 2^(attempt-1)` with full jitter, at most
//! `backoff_max`. Its [`Outcome`] goes to the sink (the router's command
//! channel). The thread ends when every [`JobSender`] is dropped; jobs
//! still in flight then are abandoned, and their durable records make the
//! next start send them again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio::sync::Semaphore;

use super::apns::Apns;
use super::fcm::Fcm;
use super::http::{self, Failure};
use super::metrics::FailureLabel;
use super::webhook::Webhook;
use super::{Job, Outcome, OutcomeSink, PushConfig, PushMetrics, PushProvider};

/// Hands jobs to the worker (or, in tests, anywhere). Cheap to clone.
#[derive(Clone)]
pub struct JobSender(Arc<dyn Fn(Job) + Send + Sync>);

impl std::fmt::Debug for JobSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobSender")
    }
}

impl JobSender {
    /// A sender that calls `f` with each job.
    pub fn from_fn(f: impl Fn(Job) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Hands `job` over; never blocks.
    pub fn send(&self, job: Job) {
        (self.0)(job)
    }
}

/// Starts push workers.
#[derive(Debug)]
pub struct Worker;

struct Lane {
    slots: Semaphore,
    bucket: Mutex<(f64, Instant)>,
    rate: f64,
}

impl Lane {
    /// Takes one token, sleeping until it is there (a reservation: tokens
    /// may go negative, each waiter sleeps off its own deficit).
    async fn pace(&self) {
        let wait = {
            let mut b = match self.bucket.lock() {
                Ok(b) => b,
                Err(poisoned) => poisoned.into_inner(),
            };
            let now = Instant::now();
            let (tokens, at) = *b;
            let burst = self.rate.max(1.0);
            let tokens =
                (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(burst) - 1.0;
            *b = (tokens, now);
            (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / self.rate))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

struct Shared {
    config: PushConfig,
    metrics: PushMetrics,
    sink: OutcomeSink,
    webhook: Option<Webhook>,
    fcm: Option<Fcm>,
    apns: Option<Apns>,
    lanes: [Lane; 3],
}

impl Worker {
    /// Builds the configured providers (a bad key or CA file stops the
    /// start with a message naming it) and starts the thread.
    pub fn start(
        config: PushConfig,
        metrics: PushMetrics,
        sink: OutcomeSink,
    ) -> Result<JobSender, String> {
        let tls = http::tls_config(config.ca_file.as_deref())?;
        let general = http::client(tls.clone(), false);
        let webhook = config
            .webhook
            .clone()
            .map(|c| Webhook::new(c, general.clone()));
        let fcm = match config.fcm.clone() {
            Some(c) => Some(Fcm::new(c, general.clone()).map_err(|e| format!("push.fcm: {e}"))?),
            None => None,
        };
        let apns = match config.apns.clone() {
            Some(c) => {
                Some(Apns::new(c, http::client(tls, true)).map_err(|e| format!("push.apns: {e}"))?)
            }
            None => None,
        };
        let lane = || Lane {
            slots: Semaphore::new(config.concurrency),
            bucket: Mutex::new((config.rate_per_s.max(1.0), Instant::now())),
            rate: config.rate_per_s,
        };
        let shared = Arc::new(Shared {
            lanes: [lane(), lane(), lane()],
            config,
            metrics,
            sink,
            webhook,
            fcm,
            apns,
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot build the push runtime: {e}"))?;
        std::thread::Builder::new()
            .name("courier-push".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(run(shared.clone(), job));
                    }
                });
                tracing::debug!("push worker stopped");
            })
            .map_err(|e| format!("cannot start the push thread: {e}"))?;
        Ok(JobSender::from_fn(move |job| {
            // Fails only once the thread has ended (the process is stopping).
            let _ = tx.send(job);
        }))
    }
}

fn lane_of(p: PushProvider) -> usize {
    p as usize - 1
}

async fn run(shared: Arc<Shared>, job: Job) {
    let provider = job.provider;
    let label = PushMetrics::provider(provider);
    let m = &shared.metrics;
    m.queue_depth.get_or_create(&label).inc();
    let lane = &shared.lanes[lane_of(provider)];
    let mut attempt = 0u32;
    let outcome = loop {
        attempt += 1;
        let result = match lane.slots.acquire().await {
            Ok(_permit) => {
                lane.pace().await;
                let started = Instant::now();
                let result = attempt_once(&shared, &job).await;
                m.duration
                    .get_or_create(&label)
                    .observe(started.elapsed().as_secs_f64());
                result
            }
            Err(_) => Err(Failure::Permanent { reason: "stopping" }),
        };
        let fail = |reason: &'static str| {
            m.failed
                .get_or_create(&FailureLabel {
                    provider: provider.name(),
                    reason,
                })
                .inc();
        };
        match result {
            Ok(()) => {
                m.sent.get_or_create(&label).inc();
                break Outcome::Sent { id: job.id };
            }
            Err(Failure::InvalidToken) => {
                fail("invalid_token");
                break Outcome::InvalidToken {
                    id: job.id,
                    user: job.user.clone(),
                    device: job.device,
                    token: job.token.clone(),
                };
            }
            Err(Failure::Permanent { reason }) => {
                fail(reason);
                break Outcome::Failed { id: job.id, reason };
            }
            Err(Failure::Retry { reason, after }) => {
                fail(reason);
                if attempt >= shared.config.max_attempts {
                    tracing::debug!(
                        push.provider = provider.name(),
                        push.reason = reason,
                        "push given up"
                    );
                    break Outcome::Failed { id: job.id, reason };
                }
                m.retried.get_or_create(&label).inc();
                let wait = after
                    .unwrap_or_else(|| backoff(&shared.config, attempt))
                    .min(shared.config.backoff_max);
                tokio::time::sleep(wait).await;
            }
        }
    };
    m.queue_depth.get_or_create(&label).dec();
    (shared.sink)(outcome);
}

async fn attempt_once(shared: &Shared, job: &Job) -> Result<(), Failure> {
    let missing = Failure::Permanent {
        reason: "not_configured",
    };
    match job.provider {
        PushProvider::Webhook => match &shared.webhook {
            Some(p) => p.send(job).await,
            None => Err(missing),
        },
        PushProvider::Fcm => match &shared.fcm {
            Some(p) => p.send(job).await,
            None => Err(missing),
        },
        PushProvider::Apns => match &shared.apns {
            Some(p) => p.send(job).await,
            None => Err(missing),
        },
    }
}

/// Full jitter: uniform in [0, min(max, base × 2^(attempt-1))].
fn backoff(config: &PushConfig, attempt: u32) -> Duration {
    let exp = config
        .backoff_base
        .saturating_mul(1u32 << (attempt - 1).min(20))
        .min(config.backoff_max);
    let ms = exp.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}
