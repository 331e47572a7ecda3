//! agentfleet's transport: signed envelopes over Redis Streams.
//!
//! A [`Publisher`] seals envelopes with its process's keyring and `XADD`s them (one, or a
//! pipelined batch). A [`Consumer`] reads its role's stream in a consumer group, verifies
//! every entry against the stream it came from, hands only [`envelope::Verified`] envelopes
//! to its [`Handler`], and acknowledges an entry only once its handler succeeded — or once
//! the entry has been copied to `fleet:rejected` (failed verification) or `fleet:dlq`
//! (handler kept failing).
//!
//! Crash safety comes from Redis's pending-entries list: anything read but not acknowledged
//! stays pending. A consumer retries its own pending entries with exponential backoff using
//! Redis's delivery counter, takes over entries of consumers that went silent
//! (`XAUTOCLAIM`), and drops duplicates (relay re-publishes, replays) with a replay guard
//! kept in Redis, shared by every consumer of a group.
//!
//! # Layout
//! - [`config`]: tunables with their defaults.
//! - [`publisher`]: sealing and `XADD`, batch pipelining, backlog-aware trimming.
//! - [`consumer`]: the read → verify → dedup → handle → ack loop, retries, reclaim, DLQ.
//! - [`keyreload`]: [`KeysetReloader`], which puts a changed keyset file into the process's
//!   [`envelope::LiveKeyring`] (poll and SIGHUP), refusing bad or foreign files.
//! - [`metrics`]: [`metrics::BusMetrics`], the consumers' Prometheus series (counters,
//!   handler durations, group lag and pending).
//! - [`pruner`]: deleting a group's idle consumers, also on behalf of consumers whose Redis
//!   user may not (`XGROUP DELCONSUMER` is not granted to workers).
//! - [`reply`]: parsing of Redis stream replies (`XREADGROUP`, `XAUTOCLAIM`, `XPENDING`, …).
//! - [`endpoint`]: [`RedisEndpoint`], a server's (or a cluster's) URL and, for TLS, its CA.
//! - [`conn`]: [`RedisPool`] and [`Conn`], one Redis server or a Redis Cluster behind one
//!   type; a cluster's multi-slot pipelines are sent as ordered per-slot runs.
//! - [`error`]: [`BusError`] and [`HandlerError`].
//! - [`guard`]: the shared replay guard (hash buckets per stream and group, one script call
//!   per batch).
//! - [`names`]: the keys the bus writes besides streams (replay guard, done markers) and the
//!   field names of stream entries.

pub mod config;
pub mod conn;
pub mod consumer;
pub mod control;
pub mod endpoint;
pub mod error;
pub mod guard;
pub mod keyreload;
pub mod metrics;
pub mod names;
pub mod pruner;
pub mod publisher;
pub mod reply;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use config::{ConsumerConfig, PublisherConfig};
pub use conn::{Conn, RedisPool, RedisPoolError};
pub use consumer::{Consumer, ConsumerStats, Consumers, Delivery, Handler, RejectHook, Rejection};
pub use control::{ControlEvent, ControlListener, Gate, KillState};
pub use endpoint::RedisEndpoint;
pub use error::{BusError, HandlerError};
pub use keyreload::KeysetReloader;
pub use publisher::Publisher;

/// The current kill epoch as this process knows it; verifiers refuse envelopes issued under
/// an older one. Shared between the control-stream consumer that raises it and every verifier.
#[derive(Debug, Clone, Default)]
pub struct KillEpoch(Arc<AtomicU64>);

impl KillEpoch {
    /// Starts at `epoch`.
    pub fn new(epoch: u64) -> Self {
        Self(Arc::new(AtomicU64::new(epoch)))
    }

    /// The current epoch.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Raises the epoch; never lowers it.
    pub fn raise(&self, epoch: u64) {
        self.0.fetch_max(epoch, Ordering::AcqRel);
    }
}

/// Jittered exponential delays from `min` doubling up to `max`, without end: the retry
/// schedule of every loop in the fleet that waits for Redis or Postgres to come back.
pub fn backoff(min: std::time::Duration, max: std::time::Duration) -> backon::ExponentialBackoff {
    backon::BackoffBuilder::build(
        backon::ExponentialBuilder::default().with_min_delay(min).with_max_delay(max).with_jitter().without_max_times(),
    )
}

/// Delays between attempts to reach Redis again after a long-running loop lost it.
pub fn reconnect_delays() -> backon::ExponentialBackoff {
    backoff(std::time::Duration::from_millis(100), std::time::Duration::from_secs(5))
}

/// Unix milliseconds from the system clock.
pub fn now_ms() -> u64 {
    // A clock before 1970 is a broken host; treat it as 0 rather than panicking.
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Builds a connection pool whose connections tolerate blocking reads of `block`: a
/// deadpool for one server, the cluster client for a `redis+cluster://` URL.
///
/// redis's default response timeout (500 ms) would cut an `XREADGROUP BLOCK` short, so the
/// timeout is set above the longest block this process uses.
pub fn pool(
    endpoint: impl Into<RedisEndpoint>,
    max_size: usize,
    longest_block: std::time::Duration,
) -> Result<RedisPool, BusError> {
    let endpoint = endpoint.into();
    if endpoint.is_cluster() {
        let client = conn::cluster_client(endpoint.cluster_seeds()?, longest_block, endpoint.tls_certificates())
            .map_err(|e| BusError::Config(format!("invalid Redis Cluster settings: {}", redact_redis_error(&e))))?;
        return Ok(RedisPool::cluster(conn::ClusterPool::new(client), endpoint.wait()));
    }
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
        .set_response_timeout(Some(longest_block + std::time::Duration::from_secs(5)));
    let info = endpoint.connection_info()?;
    let manager = deadpool_redis::Manager::new_with_config(info, config)
        .map_err(|e| BusError::Config(format!("invalid Redis URL: {}", redact_redis_error(&e))))?;
    deadpool_redis::Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map(|p| RedisPool::single(p, endpoint.wait()))
        .map_err(|e| BusError::Config(format!("cannot build the Redis pool: {e}")))
}

/// A Redis error's text, which never contains the URL's password (redis reports the kind
/// and detail only), cut to a sane length.
pub(crate) fn redact_redis_error(e: &redis::RedisError) -> String {
    let text = e.to_string();
    text.chars().take(300).collect()
}
