//! Fixtures for the relay's integration tests: a real Postgres (own database, the
//! orchestrator's migrations) and a real redis-server per test, relays running in tasks,
//! rows inserted with plain SQL, streams read back with `XRANGE`.
//!
//! Test frames are arbitrary bytes that start with the row's envelope id (16 bytes) and its
//! task sequence number (8 bytes, big-endian), so stream entries map back to rows.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fleet_testkit::{Postgres, RedisServer};
use outbox_relay::config::Endpoints;
use outbox_relay::{Relay, RelayConfig, RelayStats};
use redis::aio::MultiplexedConnection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The orchestrator's schema, from its migrations directory: the same files
/// `orchestrator::db::MIGRATOR` embeds, applied without compiling the orchestrator crate.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../orchestrator/migrations");

pub const DEV: &str = "fleet:tasks:dev";
pub const QA: &str = "fleet:tasks:qa";
pub const REVIEW: &str = "fleet:tasks:review";

/// A test's own servers and database.
pub struct Env {
    pub postgres: Postgres,
    pub redis: RedisServer,
    pub database_url: String,
    /// For the test's own SQL (inserts, checks).
    pub pool: PgPool,
}

impl Env {
    /// Starts Postgres and Redis (blocking, before any work is spawned), creates a database
    /// and runs the migrations.
    pub async fn start() -> Env {
        let postgres =
            Postgres::start().expect("PostgreSQL must be installed (apt-get install postgresql); tests never skip");
        let redis = RedisServer::start()
            .expect("redis-server must be installed (apt-get install redis-server); tests never skip");
        let database_url = postgres.create_database().expect("create a database");
        let pool = PgPoolOptions::new().max_connections(16).connect(&database_url).await.expect("connect to Postgres");
        MIGRATOR.run(&pool).await.expect("migrate");
        Env { postgres, redis, database_url, pool }
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            database_url: self.database_url.clone().into(),
            redis_url: self.redis.url().into(),
            redis_ca_file: None,
        }
    }

    /// A relay for this environment with `cfg`.
    pub fn relay(&self, cfg: RelayConfig) -> Relay {
        Relay::connect(&self.endpoints(), cfg).expect("relay")
    }

    /// A publisher like the relay's (no keys), for tests that play a relay by hand.
    pub fn publisher(&self) -> bus::Publisher {
        let pool = bus::pool(secrecy::SecretString::from(self.redis.url()), 4, Duration::ZERO).expect("redis pool");
        bus::Publisher::new(pool, Arc::new(envelope::Keyring::default()), bus::PublisherConfig::default())
    }

    pub async fn redis(&self) -> MultiplexedConnection {
        // redis's default response timeout (500 ms) is short for reading 20,000 entries
        // on a loaded test machine.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        redis::Client::open(self.redis.url())
            .expect("client")
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to Redis")
    }

    pub async fn undispatched(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dispatched_at IS NULL")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Waits until every row is dispatched.
    pub async fn drained(&self, within: Duration) {
        eventually(within, "every outbox row is dispatched", || async { self.undispatched().await == 0 }).await;
    }
}

/// Fast timings for tests.
pub fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval: Duration::from_millis(100),
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(2),
        ..RelayConfig::default()
    }
}

/// A relay running in a task.
pub struct Running {
    pub stop: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub stats: Arc<RelayStats>,
}

impl Running {
    /// Cancels the relay and waits (at most 10 s) until `run` returned.
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("the relay stops within 10 s of being cancelled")
            .expect("the relay task does not panic");
    }
}

pub fn spawn(relay: Relay) -> Running {
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let handle = tokio::spawn(async move { relay.run(token).await });
    Running { stop, handle, stats }
}

/// A row as the tests write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRow {
    pub envelope_id: Uuid,
    pub task_id: Uuid,
    /// Position of this row among its task's rows (0, 1, …).
    pub seq: u64,
    pub stream: &'static str,
    pub frame: Vec<u8>,
}

impl TestRow {
    /// A row with a frame of `len` bytes (at least 24) that starts with its envelope id and
    /// `seq`, then arbitrary bytes (every value 0..=255 shows up, so nothing relies on text).
    pub fn new(stream: &'static str, task_id: Uuid, seq: u64, len: usize) -> Self {
        let envelope_id = Uuid::now_v7();
        let mut frame = Vec::with_capacity(len.max(24));
        frame.extend_from_slice(envelope_id.as_bytes());
        frame.extend_from_slice(&seq.to_be_bytes());
        let salt = envelope_id.as_bytes()[15];
        frame.extend((frame.len()..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)));
        Self { envelope_id, task_id, seq, stream, frame }
    }
}

/// `(envelope id, seq)` from a test frame.
pub fn decode(frame: &[u8]) -> (Uuid, u64) {
    let id = Uuid::from_slice(&frame[..16]).expect("frame starts with an envelope id");
    let seq = u64::from_be_bytes(frame[16..24].try_into().expect("8 bytes"));
    (id, seq)
}

/// Inserts rows on `conn` (in whatever transaction it is in); returns their outbox ids.
pub async fn insert(conn: &mut PgConnection, rows: &[TestRow]) -> Vec<i64> {
    let mut ids = Vec::with_capacity(rows.len());
    for r in rows {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (stream, envelope_id, task_id, frame) VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(r.stream)
        .bind(r.envelope_id)
        .bind(r.task_id)
        .bind(&r.frame)
        .fetch_one(&mut *conn)
        .await
        .expect("insert into outbox");
        ids.push(id);
    }
    ids
}

/// Inserts rows in one committed transaction.
pub async fn insert_committed(pool: &PgPool, rows: &[TestRow]) -> Vec<i64> {
    let mut tx = pool.begin().await.expect("begin");
    let ids = insert(&mut tx, rows).await;
    tx.commit().await.expect("commit");
    ids
}

/// The `env` field of every entry of `stream`, oldest first (`XRANGE` in pages).
pub async fn read_stream(c: &mut MultiplexedConnection, stream: &str) -> Vec<Vec<u8>> {
    const PAGE: usize = 2000;
    let mut frames = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(c)
            .await
            .expect("XRANGE");
        let entries = bus::reply::entries("XRANGE", &v).expect("entries");
        let n = entries.len();
        if let Some(last) = entries.last() {
            start = format!("({}", last.id);
        }
        frames.extend(entries.into_iter().map(|e| {
            e.fields
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k.as_slice() == bus::names::ENV_FIELD.as_bytes())
                .map(|(_, v)| v)
                .expect("entry has an env field")
        }));
        if n < PAGE {
            return frames;
        }
    }
}

/// Polls `check` every 10 ms until it is true; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn load(stats: &RelayStats, f: impl Fn(&RelayStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    RelayStats::get(f(stats))
}
