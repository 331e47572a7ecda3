//! Sealing and publishing.
//!
//! The last `XADD` to each stream in a pipeline carries `MAXLEN ~ cap` (the others need not:
//! approximate trimming removes whole nodes of about 100 entries, so trimming after a
//! batch leaves the stream as trimming after each entry would, and a trim check costs Redis
//! a tenth of an `XADD`; `docs/benchmarks.md`). The rule that keeps trimming away from
//! unacknowledged work: before publishing to a stream, the publisher knows (re-read at most
//! every `backlog_check_every`) the stream's largest per-group backlog — entries not yet
//! delivered plus delivered but unacknowledged — and refuses to publish
//! ([`BusError::Backpressure`]) once it reaches 90% of the cap. Redis's approximate trimming
//! only removes whole nodes of the oldest entries and never goes below the cap, so the
//! entries it removes are always older than every group's backlog. (A stream without any
//! group counts its whole length as backlog.) The 10% headroom must exceed what publishers
//! can add within one check interval; at the default cap of 1,000,000 that is 100,000
//! entries per second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::Conn;
use envelope::{Envelope, LiveKeyring, StreamName};

use crate::BusError;
use crate::config::PublisherConfig;
use crate::names::ENV_FIELD;
use crate::reply;

/// Seals envelopes with this process's keyring and appends them to streams. Cheap to share
/// (`Arc`) between tasks: calls are multiplexed over one connection.
pub struct Publisher {
    pool: crate::RedisPool,
    /// The shared connection; replaced after an error.
    conn: Mutex<Option<Conn>>,
    /// Read on every seal, so a reloaded keyset signs from the next message on.
    keyring: LiveKeyring,
    config: PublisherConfig,
    /// Per stream: when its backlog was last read, and the value.
    backlog: Mutex<HashMap<String, (Instant, u64)>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("keyring", &self.keyring)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `env`, with the current span's `traceparent` when it has none, so the receiver's span
/// continues the sender's trace.
pub fn traced(env: &Envelope) -> std::borrow::Cow<'_, Envelope> {
    let current = if env.traceparent.is_none() { telemetry::propagate::current() } else { None };
    traced_with(env, current.as_deref())
}

/// `env`, with `current` (the caller's span's `traceparent`, looked up once per batch: it
/// builds an OpenTelemetry context each time) when it has none.
fn traced_with<'a>(env: &'a Envelope, current: Option<&str>) -> std::borrow::Cow<'a, Envelope> {
    match (&env.traceparent, current) {
        (None, Some(tp)) => {
            let mut env = env.clone();
            env.traceparent = Some(tp.to_owned());
            std::borrow::Cow::Owned(env)
        }
        _ => std::borrow::Cow::Borrowed(env),
    }
}

/// How many times a publish is attempted when Redis fails. Re-sending is safe: an `XADD`
/// that did land twice carries the same envelope id, which consumers drop as a duplicate.
const ATTEMPTS: usize = 4;

impl Publisher {
    /// A publisher over `pool`, signing with `keyring` (an `Arc<Keyring>`, or a
    /// [`LiveKeyring`] to sign with whatever keyring it holds at each publish).
    /// A URL with `wait_replicas` sets [`PublisherConfig::wait_replicas`] (and its timeout)
    /// where `config` leaves it at 0.
    pub fn new(pool: crate::RedisPool, keyring: impl Into<LiveKeyring>, mut config: PublisherConfig) -> Self {
        if let (0, Some(wait)) = (config.wait_replicas, pool.wait()) {
            config.wait_replicas = wait.replicas;
            config.wait_timeout = wait.timeout;
        }
        Self { pool, conn: Mutex::new(None), keyring: keyring.into(), config, backlog: Mutex::new(HashMap::new()) }
    }

    /// The keyring this publisher signs with.
    pub fn keyring(&self) -> &LiveKeyring {
        &self.keyring
    }

    /// Seals and appends one envelope; returns its entry id.
    /// An envelope without a `traceparent` gets the current span's.
    pub async fn publish(&self, stream: &StreamName, env: &Envelope) -> Result<String, BusError> {
        let wire = self.keyring.seal(&traced(env))?;
        let mut ids = self.publish_wire_batch(&[(stream.as_str(), wire.as_slice())]).await?;
        ids.pop().ok_or_else(|| BusError::Reply { command: "XADD", detail: "no id returned".into() })
    }

    /// Seals and appends several envelopes in one pipelined round trip, in order. Envelopes
    /// without a `traceparent` get the current span's.
    pub async fn publish_batch(&self, items: &[(StreamName, Envelope)]) -> Result<Vec<String>, BusError> {
        let current =
            if items.iter().any(|(_, e)| e.traceparent.is_none()) { telemetry::propagate::current() } else { None };
        let mut sealed = Vec::with_capacity(items.len());
        for (stream, env) in items {
            sealed.push((stream.as_str(), self.keyring.seal(&traced_with(env, current.as_deref()))?));
        }
        let refs: Vec<(&str, &[u8])> = sealed.iter().map(|(s, w)| (*s, w.as_slice())).collect();
        self.publish_wire_batch(&refs).await
    }

    /// Appends frames that are already signed (the outbox relay, which holds no key), in one
    /// pipelined round trip, in order. Retries Redis failures with backoff.
    pub async fn publish_wire_batch(&self, items: &[(&str, &[u8])]) -> Result<Vec<String>, BusError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut delays =
            crate::backoff(std::time::Duration::from_millis(50), std::time::Duration::from_secs(2)).take(ATTEMPTS - 1);
        loop {
            match self.try_publish(items).await {
                Ok(ids) => return Ok(ids),
                Err(e @ (BusError::Redis(_) | BusError::Pool(_))) => {
                    self.invalidate();
                    let Some(delay) = delays.next() else { return Err(e) };
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Publish failed; retrying.");
                    tokio::time::sleep(delay).await;
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn try_publish(&self, items: &[(&str, &[u8])]) -> Result<Vec<String>, BusError> {
        let mut conn = self.conn().await?;
        let mut streams: Vec<&str> = items.iter().map(|(s, _)| *s).collect();
        streams.sort_unstable();
        streams.dedup();
        for stream in streams {
            self.check_backlog(&mut conn, stream).await?;
        }
        let wait = self.config.wait_replicas;
        let run_ends = |i: usize| {
            items.get(i + 1).is_none_or(|(next, _)| {
                crate::conn::slot_of(next.as_bytes()) != crate::conn::slot_of(items[i].0.as_bytes())
            })
        };
        // Which XADD is the last to its stream: a batch has few distinct streams.
        let mut last_to_its_stream = vec![false; items.len()];
        let mut seen: Vec<&str> = Vec::with_capacity(2);
        for (i, (stream, _)) in items.iter().enumerate().rev() {
            if !seen.contains(stream) {
                seen.push(stream);
                last_to_its_stream[i] = true;
            }
        }
        let mut pipe = redis::pipe();
        for (i, (stream, wire)) in items.iter().enumerate() {
            let xadd = pipe.cmd("XADD").arg(*stream);
            if last_to_its_stream[i] {
                xadd.arg("MAXLEN").arg("~").arg(self.config.cap(stream));
            }
            xadd.arg("*").arg(ENV_FIELD).arg(*wire);
            // One WAIT after each run of writes to one slot: a cluster connection sends it to
            // the node that took them (see `crate::conn`), and it covers every earlier write
            // of this connection there.
            if wait > 0 && run_ends(i) {
                pipe.cmd("WAIT").arg(wait).arg(self.config.wait_timeout.as_millis() as u64);
            }
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let mut ids = Vec::with_capacity(items.len());
        let mut replies = replies.iter();
        for (i, (stream, _)) in items.iter().enumerate() {
            let v =
                replies.next().ok_or_else(|| BusError::Reply { command: "XADD", detail: "missing reply".into() })?;
            ids.push(reply::text(v).ok_or_else(|| BusError::Reply { command: "XADD", detail: format!("{v:?}") })?);
            if wait > 0 && run_ends(i) {
                let acked = replies.next().and_then(reply::int).unwrap_or(0);
                if acked < i64::from(wait) {
                    return Err(BusError::Redis(format!(
                        "{acked} of {wait} replicas confirmed the write to {stream} within {} ms \
                         (publisher wait_replicas); retrying",
                        self.config.wait_timeout.as_millis()
                    )));
                }
            }
        }
        Ok(ids)
    }

    async fn check_backlog(&self, conn: &mut Conn, stream: &str) -> Result<(), BusError> {
        let cap = self.config.cap(stream);
        let fresh = {
            let cache = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(stream).filter(|(at, _)| at.elapsed() < self.config.backlog_check_every).map(|(_, b)| *b)
        };
        let backlog = match fresh {
            Some(b) => b,
            None => {
                let b = stream_backlog(conn, stream).await?;
                self.backlog.lock().unwrap_or_else(|p| p.into_inner()).insert(stream.to_owned(), (Instant::now(), b));
                b
            }
        };
        if backlog.saturating_mul(10) >= cap.saturating_mul(9) {
            return Err(BusError::Backpressure { stream: stream.to_owned(), backlog, cap });
        }
        Ok(())
    }

    async fn conn(&self) -> Result<Conn, BusError> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(c.clone());
        }
        // Taken out of the pool for good: a multiplexed connection is shared by all callers,
        // and the pool's per-checkout PING would double every publish's round trips.
        let c = self.pool.dedicated().await?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }

    fn invalidate(&self) {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// The largest per-group backlog of `stream` (undelivered + pending), or its length when no
/// group exists or Redis can't tell a group's lag.
pub async fn stream_backlog(conn: &mut Conn, stream: &str) -> Result<u64, BusError> {
    let (len, groups): (u64, redis::Value) =
        redis::pipe().cmd("XLEN").arg(stream).cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await.or_else(
            |e| if e.to_string().contains("no such key") { Ok((0, redis::Value::Array(vec![]))) } else { Err(e) },
        )?;
    let groups = reply::info_maps("XINFO GROUPS", &groups)?;
    if groups.is_empty() {
        return Ok(len);
    }
    Ok(groups
        .iter()
        .map(|g| {
            let pending = reply::info_get(g, "pending").and_then(reply::int).unwrap_or(0).max(0) as u64;
            let lag = reply::info_get(g, "lag").and_then(reply::int).map(|l| l.max(0) as u64).unwrap_or(len);
            lag + pending
        })
        .max()
        .unwrap_or(len))
}
