//! [`AlertDispatcher`]: one loop per channel that reads the outbox in the channel's consumer
//! group, delivers each alert (retrying until the channel confirms) and only then
//! acknowledges it.
//!
//! Per channel, alerts go out one at a time and in order: a kill alert is never overtaken
//! by the resume that followed it. The price is head-of-line blocking: while a channel
//! refuses an alert, later ones wait behind it (logged at ERROR after
//! [`AlertsConfig::error_after_attempts`] attempts, because an operator must act). The other
//! channel is unaffected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bus::Conn;
use bus::reply::{self, Entry};
use tokio_util::sync::CancellationToken;

use super::channel::{Attempt, Channel};
use super::{Alert, AlertError, AlertsConfig, names};

/// Counters of a dispatcher, over all its channels; shareable with a metrics endpoint.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Alerts a channel confirmed.
    pub delivered: AtomicU64,
    /// Attempts that failed (each one is retried).
    pub failed_attempts: AtomicU64,
    /// Entries acknowledged without delivery because they could not be read (trimmed from
    /// the stream while pending, or not an alert).
    pub unreadable: AtomicU64,
    /// Redis errors that made a channel loop reconnect.
    pub reconnects: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The tunables a channel loop needs (no secrets).
#[derive(Debug, Clone)]
struct Tunables {
    consumer: String,
    backfill: Duration,
    block: Duration,
    retry_min: Duration,
    retry_max: Duration,
    retry_after_max: Duration,
    shutdown_grace: Duration,
    error_after_attempts: u32,
}

/// Delivers queued alerts over every configured channel. See the [module docs](self).
pub struct AlertDispatcher {
    /// Each channel loop takes one dedicated connection from it (a blocking `XREADGROUP`
    /// must not hold up anyone else's commands).
    pool: bus::RedisPool,
    /// The configured channels; may be empty (alerts are then only recorded).
    channels: Vec<Channel>,
    tunables: Tunables,
    stats: Arc<DispatchStats>,
}

impl std::fmt::Debug for AlertDispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertDispatcher")
            .field("channels", &self.channel_names())
            .field("tunables", &self.tunables)
            .finish_non_exhaustive()
    }
}

impl AlertDispatcher {
    /// Checks the channels' settings and prepares their HTTP clients.
    ///
    /// `pool`'s response timeout must exceed [`AlertsConfig::block`] (`bus::pool` sets it
    /// from its `longest_block` argument); it needs one connection per channel plus what
    /// [`super::AlertSender`] uses.
    pub fn new(pool: bus::RedisPool, cfg: &AlertsConfig) -> Result<Self, AlertError> {
        if cfg.consumer.trim().is_empty() {
            return Err(AlertError::Config { setting: "consumer", problem: "empty".to_owned() });
        }
        if cfg.retry_min.is_zero() || cfg.retry_max < cfg.retry_min {
            return Err(AlertError::Config {
                setting: "retry_min_ms",
                problem: "must be positive and not above retry_max_ms".to_owned(),
            });
        }
        Ok(Self {
            pool,
            channels: Channel::from_config(cfg)?,
            tunables: Tunables {
                consumer: cfg.consumer.trim().to_owned(),
                backfill: cfg.backfill,
                block: cfg.block.max(Duration::from_millis(1)),
                retry_min: cfg.retry_min,
                retry_max: cfg.retry_max,
                retry_after_max: cfg.retry_after_max,
                shutdown_grace: cfg.shutdown_grace,
                error_after_attempts: cfg.error_after_attempts.max(1),
            },
            stats: Arc::default(),
        })
    }

    /// The configured channels' names (`telegram`, `webhook`).
    pub fn channel_names(&self) -> Vec<&'static str> {
        self.channels.iter().map(Channel::name).collect()
    }

    /// Counters, shareable with a metrics endpoint.
    pub fn stats(&self) -> Arc<DispatchStats> {
        Arc::clone(&self.stats)
    }

    /// Runs every channel's loop until `shutdown` is cancelled. Redis and channel failures
    /// never end a loop. On shutdown an attempt in flight gets
    /// [`AlertsConfig::shutdown_grace`] to finish; whatever is not acknowledged stays
    /// pending and is delivered after the next start.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.channels.is_empty() {
            tracing::warn!(stream = names::STREAM, "No alert channel is configured; alerts are only recorded.");
            shutdown.cancelled().await;
            return;
        }
        let mut loops = tokio::task::JoinSet::new();
        for channel in self.channels {
            let channel_loop = ChannelLoop {
                pool: self.pool.clone(),
                channel,
                tunables: self.tunables.clone(),
                stats: Arc::clone(&self.stats),
                group_ready: false,
                delivered_unacked: None,
            };
            loops.spawn(channel_loop.run(shutdown.clone()));
        }
        while let Some(result) = loops.join_next().await {
            if let Err(e) = result {
                tracing::error!(error = %e, "An alert channel loop panicked.");
            }
        }
    }
}

/// The read → deliver → ack loop of one channel.
struct ChannelLoop {
    pool: bus::RedisPool,
    channel: Channel,
    tunables: Tunables,
    stats: Arc<DispatchStats>,
    /// Whether the consumer group is known to exist on the current connection's server.
    group_ready: bool,
    /// An entry the channel confirmed but whose `XACK` failed: when it comes back from the
    /// pending list it is acknowledged without being sent again.
    delivered_unacked: Option<String>,
}

/// How an alert's delivery ended.
enum Delivery {
    Delivered,
    /// Shutdown came first; the entry stays pending.
    Stopped,
}

impl ChannelLoop {
    fn name(&self) -> &'static str {
        self.channel.name()
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut conn: Option<Conn> = None;
        let mut delays = bus::reconnect_delays();
        while !shutdown.is_cancelled() {
            let result = match conn.as_mut() {
                Some(c) => self.step(c, &shutdown).await,
                None => match self.pool.dedicated().await {
                    Ok(c) => {
                        conn = Some(c);
                        continue;
                    }
                    Err(e) => Err(AlertError::from(e)),
                },
            };
            match result {
                Ok(()) => delays = bus::reconnect_delays(),
                Err(e) => {
                    bump(&self.stats.reconnects);
                    conn = None;
                    self.group_ready = false;
                    let delay = delays.next().unwrap_or(self.tunables.retry_max);
                    tracing::warn!(channel = self.name(), error = %e, retry_in_ms = delay.as_millis() as u64, "Alert channel lost Redis; reconnecting.");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        }
        tracing::info!(channel = self.name(), "Alert channel stopped.");
    }

    /// Settles the oldest alert of this consumer's pending list, or else waits up to
    /// `block` for a new one and settles it.
    async fn step(&mut self, c: &mut Conn, shutdown: &CancellationToken) -> Result<(), AlertError> {
        if !self.group_ready {
            self.ensure_group(c).await?;
            self.group_ready = true;
        }
        // Pending first: alerts read before a restart or a lost connection and not yet
        // acknowledged. `0` reads this consumer's pending list without blocking.
        let mut entries = self.read(c, "0", None, shutdown).await?;
        if entries.is_empty() {
            entries = self.read(c, ">", Some(self.tunables.block), shutdown).await?;
        }
        for entry in entries {
            if shutdown.is_cancelled() {
                break;
            }
            self.settle(c, entry, shutdown).await?;
        }
        Ok(())
    }

    async fn ensure_group(&self, c: &mut Conn) -> Result<(), AlertError> {
        // A new group starts `backfill` ago: alerts queued before the first start are
        // delivered, while a channel added months later does not replay old history.
        let start_ms = super::now_ms().saturating_sub(self.tunables.backfill.as_millis() as u64);
        let start = if start_ms == 0 { "0".to_owned() } else { format!("{start_ms}-0") };
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(names::STREAM)
            .arg(self.name())
            .arg(&start)
            .arg("MKSTREAM")
            .query_async(c)
            .await;
        match created {
            Ok(()) => {
                tracing::info!(channel = self.name(), stream = names::STREAM, start = %start, "Created the alert channel's consumer group.");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn read(
        &self,
        c: &mut Conn,
        from: &str,
        block: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Entry>, AlertError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(self.name()).arg(&self.tunables.consumer).arg("COUNT").arg(1);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(names::STREAM).arg(from);
        let reply = tokio::select! {
            r = cmd.query_async::<redis::Value>(c) => r?,
            // An entry this read may have claimed stays pending and is read again first.
            () = shutdown.cancelled() => return Ok(Vec::new()),
        };
        reply::read_one_stream(&reply).map_err(|e| AlertError::Reply { command: "XREADGROUP", detail: e.to_string() })
    }

    async fn settle(&mut self, c: &mut Conn, entry: Entry, shutdown: &CancellationToken) -> Result<(), AlertError> {
        if self.delivered_unacked.as_deref() == Some(entry.id.as_str()) {
            self.ack(c, &entry.id).await?;
            self.delivered_unacked = None;
            return Ok(());
        }
        if entry.fields.is_none() {
            bump(&self.stats.unreadable);
            tracing::error!(channel = self.name(), entry = %entry.id, "Alert was trimmed from the stream before it was delivered; it is lost. Raise alerts.stream_max_len.");
            return self.ack(c, &entry.id).await;
        }
        let alert = match entry.field(names::FIELD).map(serde_json::from_slice::<Alert>) {
            Some(Ok(alert)) => alert,
            Some(Err(e)) => {
                bump(&self.stats.unreadable);
                tracing::error!(channel = self.name(), entry = %entry.id, error = %e, "Alert entry is not a readable alert; dropped.");
                return self.ack(c, &entry.id).await;
            }
            None => {
                bump(&self.stats.unreadable);
                tracing::error!(channel = self.name(), entry = %entry.id, "Alert entry has no alert field; dropped.");
                return self.ack(c, &entry.id).await;
            }
        };
        match self.deliver(&alert, shutdown).await {
            Delivery::Stopped => Ok(()),
            Delivery::Delivered => {
                bump(&self.stats.delivered);
                tracing::info!(channel = self.name(), alert_id = %alert.id, kind = %alert.kind, epoch = alert.epoch, "Alert delivered.");
                self.delivered_unacked = Some(entry.id.clone());
                self.ack(c, &entry.id).await?;
                self.delivered_unacked = None;
                Ok(())
            }
        }
    }

    async fn ack(&self, c: &mut Conn, entry: &str) -> Result<(), AlertError> {
        let _: i64 = redis::cmd("XACK").arg(names::STREAM).arg(self.name()).arg(entry).query_async(c).await?;
        Ok(())
    }

    /// Attempts until the channel confirms or shutdown comes. Each failure waits the
    /// channel's own hint (capped) or the next exponential backoff delay.
    async fn deliver(&self, alert: &Alert, shutdown: &CancellationToken) -> Delivery {
        let t = &self.tunables;
        let mut backoff = bus::backoff(t.retry_min, t.retry_max);
        let mut attempts: u32 = 0;
        loop {
            attempts = attempts.saturating_add(1);
            let attempt = self.channel.attempt(alert);
            tokio::pin!(attempt);
            let outcome = tokio::select! {
                biased;
                outcome = &mut attempt => outcome,
                () = shutdown.cancelled() => match tokio::time::timeout(t.shutdown_grace, &mut attempt).await {
                    Ok(outcome) => outcome,
                    Err(_) => return Delivery::Stopped,
                },
            };
            let (retry_after, reason) = match outcome {
                Attempt::Delivered => return Delivery::Delivered,
                Attempt::Failed { retry_after, reason } => (retry_after, reason),
            };
            bump(&self.stats.failed_attempts);
            let delay = match retry_after {
                Some(hint) => hint.min(t.retry_after_max),
                None => backoff.next().unwrap_or(t.retry_max),
            };
            let retry_in_ms = delay.as_millis() as u64;
            if attempts >= t.error_after_attempts {
                tracing::error!(channel = self.name(), alert_id = %alert.id, kind = %alert.kind, attempts, retry_in_ms, error = %reason, "Alert still not delivered; check the channel.");
            } else {
                tracing::warn!(channel = self.name(), alert_id = %alert.id, kind = %alert.kind, attempts, retry_in_ms, error = %reason, "Alert delivery failed; retrying.");
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Delivery::Stopped,
            }
        }
    }
}
