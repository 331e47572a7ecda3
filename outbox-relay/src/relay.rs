//! The relay: claim → `XADD` → mark, woken by `LISTEN`, with a poll as fallback, plus pruning.
//!
//! [`Relay::step`] is one batch, so tests (and the benchmark) can drive the relay one step at
//! a time; [`Relay::run`] loops until the shutdown token is cancelled. Three loops run
//! concurrently inside `run`, all racing the same token:
//! - the publish loop: drains batches while they come back full, re-checks quickly while rows
//!   wait on the visibility horizon or on another relay, otherwise waits for a notification,
//!   the poll interval, or the end of a backpressure pause;
//! - the listen loop: `LISTEN fleet_outbox`, turning each notification (and each reconnect,
//!   since notifications may have been missed) into a wake-up of the publish loop;
//! - the prune loop: deletes dispatched rows past the retention, in small batches.
//!
//! Failures never end the relay: a failed batch rolls back (its rows stay undispatched), is
//! counted and logged, and the next attempt waits with exponential backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::{BusError, Publisher};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Endpoints, RelayConfig};
use crate::outbox;

/// Shortest and longest re-check delay while committed rows wait on the horizon or on
/// another relay's batch: those clear within milliseconds and announce nothing.
const RECHECK_MIN: Duration = Duration::from_millis(1);
const RECHECK_MAX: Duration = Duration::from_millis(25);

/// Counters of one relay, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows published and marked dispatched (committed).
    pub published: AtomicU64,
    /// Transactions that published at least one row.
    pub batches: AtomicU64,
    /// Failed batches, listener and pruning failures (Postgres or Redis).
    pub errors: AtomicU64,
    /// Publishes refused by backpressure (the stream is then paused).
    pub backpressured: AtomicU64,
    /// Claimed rows held back because an earlier row of their task was elsewhere.
    pub blocked: AtomicU64,
    /// Dispatched rows deleted by pruning.
    pub pruned: AtomicU64,
    /// Times committed rows were found waiting on the visibility horizon (an older
    /// transaction still running) or on another relay's batch, so the relay re-checked soon.
    pub rechecks: AtomicU64,
    /// Notifications received.
    pub notifications: AtomicU64,
    /// Whether `LISTEN` is currently active.
    pub listening: AtomicBool,
}

impl RelayStats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A batch or a side task failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Postgres failed: the transaction was rolled back, nothing was marked.
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Redis failed after the publisher's own retries: the batch was rolled back.
    #[error("Redis: {0}")]
    Redis(#[from] BusError),
    /// The metrics endpoint could not start.
    #[error("{0}")]
    Metrics(String),
}

/// What one [`Relay::step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    /// Rows locked by the claim (published or not).
    pub claimed: usize,
    /// Rows published and marked.
    pub published: usize,
    /// Rows held back for per-task order (see [`crate::outbox`]).
    pub blocked: usize,
    /// The stream that refused the batch with backpressure, now paused.
    pub backpressured: Option<String>,
}

/// Forwards outbox rows to their streams. Holds a Postgres pool, a Redis publisher (with an
/// empty keyring: the relay never signs), and its counters.
pub struct Relay {
    /// The orchestrator's database.
    pool: PgPool,
    /// `XADD`s frames as they are; its keyring is empty.
    publisher: Arc<Publisher>,
    cfg: RelayConfig,
    stats: Arc<RelayStats>,
    /// Streams that answered with backpressure, and until when they are left alone.
    paused: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("cfg", &self.cfg).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay over an existing pool and publisher.
    pub fn new(pool: PgPool, publisher: Arc<Publisher>, cfg: RelayConfig) -> Self {
        Self { pool, publisher, cfg, stats: Arc::default(), paused: Mutex::new(HashMap::new()) }
    }

    /// Builds the pools for `endpoints` (lazily: nothing connects until the relay runs, so a
    /// database or Redis that is down at start is retried like any later outage) and a
    /// publisher without keys.
    pub fn connect(endpoints: &Endpoints, cfg: RelayConfig) -> Result<Self, RelayError> {
        let options: PgConnectOptions = endpoints.database_url.expose_secret().parse()?;
        let options = options.application_name("outbox-relay");
        let pool = PgPoolOptions::new()
            .max_connections(cfg.pg_max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        let redis = bus::pool(
            bus::RedisEndpoint::new(endpoints.redis_url.clone(), endpoints.redis_ca_file.as_deref())?,
            cfg.redis_pool_size,
            Duration::ZERO,
        )?;
        let keyless = Arc::new(envelope::Keyring::default());
        let publisher = Arc::new(Publisher::new(redis, keyless, cfg.publisher.clone()));
        Ok(Self::new(pool, publisher, cfg))
    }

    /// The relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// The Postgres pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One batch: claim, publish the ready rows in one pipeline, mark them, commit.
    ///
    /// On any error the transaction is rolled back and the rows stay undispatched. On
    /// backpressure the stream is paused for `backpressure_pause` and the batch rolled back;
    /// that is reported in [`Step::backpressured`], not as an error.
    pub async fn step(&self) -> Result<Step, RelayError> {
        let paused = self.paused_streams();
        let mut tx = self.pool.begin().await?;
        let claim = outbox::claim(&mut tx, self.cfg.batch_size, &paused).await?;
        let mut step = Step { claimed: claim.locked(), blocked: claim.blocked, ..Step::default() };
        RelayStats::add(&self.stats.blocked, claim.blocked as u64);
        if claim.ready.is_empty() {
            // Releases the locks of blocked rows.
            tx.rollback().await?;
            return Ok(step);
        }
        let items: Vec<(&str, &[u8])> = claim.ready.iter().map(|r| (r.stream.as_str(), r.frame.as_slice())).collect();
        // One span per forwarded row, in its task's trace, lasting until the batch is out.
        let _spans: Vec<tracing::Span> =
            claim.ready.iter().filter(|r| r.traceparent.is_some()).map(forward_span).collect();
        match self.publisher.publish_wire_batch(&items).await {
            Ok(_) => {}
            Err(BusError::Backpressure { stream, backlog, cap }) => {
                tx.rollback().await?;
                RelayStats::add(&self.stats.backpressured, 1);
                let pause = self.cfg.backpressure_pause;
                tracing::warn!(
                    stream = %stream, backlog, cap, pause_ms = pause.as_millis() as u64,
                    "Stream backlog is near its cap; leaving its rows in the outbox for now."
                );
                self.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(stream.clone(), Instant::now() + pause);
                step.backpressured = Some(stream);
                return Ok(step);
            }
            Err(e) => {
                // Dropping `tx` rolls back; say so explicitly to release the locks now.
                let _ = tx.rollback().await;
                return Err(e.into());
            }
        }
        let ids: Vec<i64> = claim.ready.iter().map(|r| r.id).collect();
        outbox::mark_dispatched(&mut tx, &ids).await?;
        tx.commit().await?;
        step.published = ids.len();
        RelayStats::add(&self.stats.published, ids.len() as u64);
        RelayStats::add(&self.stats.batches, 1);
        Ok(step)
    }

    /// Deletes dispatched rows past the retention, `prune_batch` at a time, until none are
    /// left or `shutdown` is cancelled. Returns how many it deleted.
    pub async fn prune(&self, shutdown: &CancellationToken) -> Result<u64, RelayError> {
        let mut total = 0;
        loop {
            let mut conn = self.pool.acquire().await?;
            let n = outbox::prune(&mut conn, self.cfg.retention, self.cfg.prune_batch).await?;
            total += n;
            RelayStats::add(&self.stats.pruned, n);
            if n < u64::from(self.cfg.prune_batch) || shutdown.is_cancelled() {
                return Ok(total);
            }
        }
    }

    /// Runs until `shutdown` is cancelled, then lets the batch in flight finish within the
    /// grace period and returns.
    pub async fn run(&self, shutdown: CancellationToken) {
        let wake = Notify::new();
        tracing::info!(
            batch_size = self.cfg.batch_size,
            poll_interval_ms = self.cfg.poll_interval.as_millis() as u64,
            "Outbox relay started."
        );
        tokio::join!(
            self.publish_loop(&shutdown, &wake),
            self.listen_loop(&shutdown, &wake),
            self.prune_loop(&shutdown)
        );
        let s = &self.stats;
        tracing::info!(
            published = RelayStats::get(&s.published),
            batches = RelayStats::get(&s.batches),
            errors = RelayStats::get(&s.errors),
            "Outbox relay stopped."
        );
    }

    async fn publish_loop(&self, shutdown: &CancellationToken, wake: &Notify) {
        let mut failures = self.backoff();
        let mut recheck = Duration::ZERO;
        while !shutdown.is_cancelled() {
            let grace_over = async {
                shutdown.cancelled().await;
                tokio::time::sleep(self.cfg.shutdown_grace).await;
            };
            let result = tokio::select! {
                r = self.step() => r,
                () = grace_over => {
                    tracing::warn!(
                        grace_ms = self.cfg.shutdown_grace.as_millis() as u64,
                        "The batch in flight did not finish within the shutdown grace period; its rows stay undispatched and will be published again."
                    );
                    return;
                }
            };
            let step = match result {
                Ok(step) => {
                    failures = self.backoff();
                    step
                }
                Err(e) => {
                    RelayStats::add(&self.stats.errors, 1);
                    let delay = failures.next().unwrap_or(self.cfg.retry_max);
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Outbox batch failed; rows stay undispatched.");
                    sleep_or_shutdown(delay, shutdown).await;
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                break;
            }
            if step.backpressured.is_some() {
                // Other streams may have rows; the paused one is now excluded.
                continue;
            }
            if step.claimed == self.cfg.batch_size as usize && step.published > 0 {
                recheck = Duration::ZERO;
                continue;
            }
            let waiting = step.blocked > 0
                || tokio::select! {
                    () = shutdown.cancelled() => break,
                    w = self.waiting_beyond_horizon() => w,
                };
            let wait = if waiting {
                RelayStats::add(&self.stats.rechecks, 1);
                recheck = (recheck * 2).clamp(RECHECK_MIN, RECHECK_MAX);
                recheck
            } else {
                recheck = Duration::ZERO;
                self.idle_wait()
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// How long to wait with nothing to do: the poll interval, or less if a paused stream
    /// becomes claimable sooner.
    fn idle_wait(&self) -> Duration {
        let now = Instant::now();
        let paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        paused
            .values()
            .filter(|until| **until > now)
            .map(|until| *until - now)
            .min()
            .map_or(self.cfg.poll_interval, |d| d.min(self.cfg.poll_interval))
    }

    async fn waiting_beyond_horizon(&self) -> bool {
        let check = async {
            let mut conn = self.pool.acquire().await?;
            outbox::waiting_beyond_horizon(&mut conn).await
        };
        // A failure here is harmless (the next poll finds the rows); the batch path logs.
        check.await.unwrap_or(false)
    }

    /// Streams still paused for backpressure; forgets pauses that ended.
    fn paused_streams(&self) -> Vec<String> {
        let now = Instant::now();
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        paused.retain(|_, until| *until > now);
        paused.keys().cloned().collect()
    }

    async fn listen_loop(&self, shutdown: &CancellationToken, wake: &Notify) {
        let mut failures = self.backoff();
        while !shutdown.is_cancelled() {
            let connect = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(outbox::NOTIFY_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                () = shutdown.cancelled() => return,
                r = connect => match r {
                    Ok(l) => l,
                    Err(e) => {
                        self.listener_failed(&e, &mut failures, shutdown).await;
                        continue;
                    }
                },
            };
            self.stats.listening.store(true, Ordering::Relaxed);
            tracing::debug!(channel = outbox::NOTIFY_CHANNEL, "Listening for outbox notifications.");
            // Rows may have been committed while nobody listened.
            wake.notify_one();
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = listener.try_recv() => r,
                };
                match received {
                    Ok(Some(_)) => {
                        RelayStats::add(&self.stats.notifications, 1);
                        failures = self.backoff();
                        wake.notify_one();
                    }
                    Ok(None) => {
                        // The connection dropped and was re-established: anything sent in
                        // between is lost, so look at the table.
                        tracing::warn!("Listener connection to Postgres was lost and re-established.");
                        wake.notify_one();
                    }
                    Err(e) => {
                        self.stats.listening.store(false, Ordering::Relaxed);
                        self.listener_failed(&e, &mut failures, shutdown).await;
                        break;
                    }
                }
            }
        }
    }

    async fn listener_failed(
        &self,
        e: &sqlx::Error,
        failures: &mut backon::ExponentialBackoff,
        shutdown: &CancellationToken,
    ) {
        RelayStats::add(&self.stats.errors, 1);
        let delay = failures.next().unwrap_or(self.cfg.retry_max);
        tracing::warn!(
            error = %e, retry_in_ms = delay.as_millis() as u64,
            "Cannot listen for outbox notifications; polling every poll interval meanwhile."
        );
        sleep_or_shutdown(delay, shutdown).await;
    }

    async fn prune_loop(&self, shutdown: &CancellationToken) {
        loop {
            // A DELETE cut short by shutdown is rolled back; nothing is lost.
            let pruned = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.prune(shutdown) => r,
            };
            match pruned {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "Pruned dispatched outbox rows."),
                Err(e) => {
                    RelayStats::add(&self.stats.errors, 1);
                    tracing::warn!(error = %e, "Pruning the outbox failed; trying again next interval.");
                }
            }
            if !sleep_or_shutdown(self.cfg.prune_interval, shutdown).await {
                return;
            }
        }
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        bus::backoff(self.cfg.retry_min, self.cfg.retry_max)
    }
}

/// Sleeps for `d` unless `shutdown` comes first; returns whether the full sleep happened.
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// The span of forwarding `row`: a child of the span that enqueued it.
fn forward_span(row: &outbox::ClaimedRow) -> tracing::Span {
    let span = tracing::info_span!(
        "outbox.forward",
        otel.name = format!("{} publish", row.stream),
        otel.kind = "producer",
        messaging.system = "redis",
        messaging.destination.name = %row.stream,
        outbox_id = row.id,
    );
    telemetry::propagate::set_parent(&span, row.traceparent.as_deref());
    span
}

/// The relay's Prometheus series, read from its [`RelayStats`] at each scrape:
/// `fleet_relay_published_total`, `fleet_relay_batches_total`, `fleet_relay_errors_total`,
/// `fleet_relay_backpressured_total`, `fleet_relay_blocked_total`, `fleet_relay_pruned_total`,
/// `fleet_relay_rechecks_total`, `fleet_relay_notifications_total` and `fleet_relay_listening`.
/// (The outbox's backlog and its oldest row's age are the orchestrator's series: the relay's
/// database role may not read `created_at`.)
#[derive(Debug)]
pub struct RelayMetrics(pub Arc<RelayStats>);

impl prometheus_client::collector::Collector for RelayMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let s = &self.0;
        let counters: [(&str, &str, &AtomicU64); 8] = [
            ("fleet_relay_published", "Outbox rows published to their streams and marked dispatched.", &s.published),
            ("fleet_relay_batches", "Transactions that published at least one row.", &s.batches),
            ("fleet_relay_errors", "Failed batches, listener and pruning failures (Postgres or Redis).", &s.errors),
            ("fleet_relay_backpressured", "Publishes refused because the stream was near its cap.", &s.backpressured),
            ("fleet_relay_blocked", "Rows held back behind an earlier row of their task.", &s.blocked),
            ("fleet_relay_pruned", "Dispatched rows deleted after their retention.", &s.pruned),
            ("fleet_relay_rechecks", "Early re-checks for rows behind an older open transaction.", &s.rechecks),
            ("fleet_relay_notifications", "NOTIFY wake-ups received.", &s.notifications),
        ];
        for (name, help, counter) in counters {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(RelayStats::get(counter)).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "fleet_relay_listening",
            "1 while LISTEN is active (else the relay polls).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(s.listening.load(Ordering::Relaxed))).encode(m)?;
        Ok(())
    }
}
