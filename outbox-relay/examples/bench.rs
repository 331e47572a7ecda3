//! Outbox relay benchmark: relay throughput (claim + XADD + mark) against the raw claim rate
//! (claim + mark, no XADD) on the same Postgres, and commit → visible-on-stream latency.
//!
//! ```sh
//! cargo run --release -p outbox-relay --example bench            # 3 runs, medians
//! cargo run --release -p outbox-relay --example bench -- --runs 1 --rows 20000 --explain
//! ```
//!
//! Starts its own PostgreSQL and redis-server through fleet-testkit: Postgres runs with
//! `fsync=off`, `synchronous_commit=off`, `full_page_writes=off`, Redis without persistence,
//! both on loopback on the same machine as the relay. Every measurement gets a fresh
//! database (no bloat carried over) and an empty Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_testkit::{Postgres, RedisServer};
use outbox_relay::config::Endpoints;
use outbox_relay::{Relay, RelayConfig, outbox};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../orchestrator/migrations");

const STREAMS: [&str; 4] = ["fleet:tasks:dev", "fleet:tasks:qa", "fleet:tasks:review", "fleet:tasks:refactor"];
const FRAME_LEN: usize = 512;
const BATCH: u32 = 256;
/// Rows per inserting transaction when pre-filling.
const FILL_TX_ROWS: i64 = 500;

struct Args {
    runs: usize,
    rows: i64,
    samples: usize,
    explain: bool,
    latency_only: bool,
}

fn args() -> Args {
    let mut a = Args { runs: 3, rows: 100_000, samples: 1000, explain: false, latency_only: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<i64>().ok()).expect("a number after the flag");
        match arg.as_str() {
            "--runs" => a.runs = num() as usize,
            "--rows" => a.rows = num(),
            "--samples" => a.samples = num() as usize,
            "--explain" => a.explain = true,
            "--latency-only" => a.latency_only = true,
            // `cargo bench`-style harness flags are ignored.
            "--bench" => {}
            other => panic!("unknown argument {other}; use --runs N --rows N --samples N --explain"),
        }
    }
    a
}

#[tokio::main]
async fn main() {
    let args = args();
    let postgres = Postgres::start().expect("PostgreSQL must be installed");
    let redis = RedisServer::start().expect("redis-server must be installed");
    println!(
        "outbox relay bench: {} rows of {FRAME_LEN}-byte frames over {} streams, batches of {BATCH}, {} runs, {} latency samples",
        args.rows,
        STREAMS.len(),
        args.runs,
        args.samples
    );
    let mut raw = Vec::new();
    let mut bare = Vec::new();
    let mut relay = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for run in 1..=args.runs {
        if args.latency_only {
            let (pool, url) = fresh(&postgres, &redis, 0).await;
            let (l50, l99, lmax) = latency(&pool, &url, &redis, args.samples).await;
            println!("run {run}: commit→stream p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", ms(l50), ms(l99), ms(lmax));
            continue;
        }
        let bare_rate = {
            let (pool, _) = fresh(&postgres, &redis, args.rows).await;
            if args.explain && run == 1 {
                explain(&pool).await;
            }
            claim_rate(&pool, args.rows, ClaimKind::Bare).await
        };
        let raw_rate = {
            let (pool, _) = fresh(&postgres, &redis, args.rows).await;
            claim_rate(&pool, args.rows, ClaimKind::Relay).await
        };
        let relay_rate = {
            let (pool, url) = fresh(&postgres, &redis, args.rows).await;
            relay_rate(&pool, &url, &redis, args.rows).await
        };
        let (l50, l99, lmax) = {
            let (pool, url) = fresh(&postgres, &redis, 0).await;
            latency(&pool, &url, &redis, args.samples).await
        };
        println!(
            "run {run}: bare claim {:>8.0} rows/s | relay's claim, no XADD {:>8.0} rows/s | relay with XADD {:>8.0} rows/s (ratio {:.2}) | commit→stream p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            bare_rate,
            raw_rate,
            relay_rate,
            relay_rate / raw_rate,
            ms(l50),
            ms(l99),
            ms(lmax)
        );
        bare.push(bare_rate);
        raw.push(raw_rate);
        relay.push(relay_rate);
        p50.push(ms(l50));
        p99.push(ms(l99));
    }
    if args.latency_only {
        return;
    }
    let (raw_m, relay_m) = (median(&raw), median(&relay));
    let ratios: Vec<f64> = relay.iter().zip(&raw).map(|(r, c)| r / c).collect();
    println!(
        "median: bare claim {:.0} rows/s | relay's claim, no XADD {raw_m:.0} rows/s | relay with XADD {relay_m:.0} rows/s | ratio of medians {:.2}, median of per-run ratios {:.2} (target >= 0.8) | p50 {:.2} ms | p99 {:.2} ms (target <= 20 ms)",
        median(&bare),
        relay_m / raw_m,
        median(&ratios),
        median(&p50),
        median(&p99)
    );
}

/// A new database with the schema and `rows` undispatched rows, and an empty Redis.
async fn fresh(postgres: &Postgres, redis: &RedisServer, rows: i64) -> (PgPool, String) {
    let url = postgres.create_database().expect("create database");
    let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.expect("connect");
    MIGRATOR.run(&pool).await.expect("migrate");
    let frame = vec![0xA5u8; FRAME_LEN];
    let streams: Vec<String> = STREAMS.iter().map(|s| (*s).to_owned()).collect();
    let mut inserted = 0;
    while inserted < rows {
        let n = FILL_TX_ROWS.min(rows - inserted);
        // One row per task, as many transactions as a busy orchestrator would commit.
        sqlx::query(
            "INSERT INTO outbox (stream, envelope_id, task_id, frame)
             SELECT ($1::text[])[1 + i % 4], gen_random_uuid(), gen_random_uuid(), $2
             FROM generate_series(1, $3) AS i",
        )
        .bind(&streams)
        .bind(&frame)
        .bind(n)
        .execute(&pool)
        .await
        .expect("fill");
        inserted += n;
    }
    sqlx::query("VACUUM ANALYZE outbox").execute(&pool).await.expect("vacuum");
    let mut c = redis_conn(redis).await;
    let () = redis::cmd("FLUSHALL").query_async(&mut c).await.expect("FLUSHALL");
    (pool, url)
}

#[derive(Clone, Copy)]
enum ClaimKind {
    /// Only `SELECT … WHERE txid < xmin ORDER BY txid, id LIMIT n FOR UPDATE SKIP LOCKED`.
    Bare,
    /// The relay's claim statement (with the per-task order check).
    Relay,
}

const BARE_CLAIM: &str = "SELECT id, stream, frame FROM outbox
    WHERE dispatched_at IS NULL AND txid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY txid, id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Claim + mark + commit in batches, no XADD, until the outbox is empty: rows per second.
async fn claim_rate(pool: &PgPool, rows: i64, kind: ClaimKind) -> f64 {
    let started = Instant::now();
    let mut done = 0i64;
    loop {
        let mut tx = pool.begin().await.expect("begin");
        let ids: Vec<i64> = match kind {
            ClaimKind::Relay => {
                let claim = outbox::claim(&mut tx, BATCH, &[]).await.expect("claim");
                claim.ready.iter().map(|r| r.id).collect()
            }
            ClaimKind::Bare => {
                let rows: Vec<(i64, String, Vec<u8>)> =
                    sqlx::query_as(BARE_CLAIM).bind(i64::from(BATCH)).fetch_all(&mut *tx).await.expect("claim");
                rows.into_iter().map(|r| r.0).collect()
            }
        };
        if ids.is_empty() {
            break;
        }
        outbox::mark_dispatched(&mut tx, &ids).await.expect("mark");
        tx.commit().await.expect("commit");
        done += ids.len() as i64;
    }
    assert_eq!(done, rows);
    done as f64 / started.elapsed().as_secs_f64()
}

/// The relay's own `step` (claim + pipelined XADD + mark + commit) until the outbox is empty.
async fn relay_rate(pool: &PgPool, url: &str, redis: &RedisServer, rows: i64) -> f64 {
    let relay = relay_for(url, redis);
    let started = Instant::now();
    let mut done = 0;
    loop {
        let step = relay.step().await.expect("step");
        if step.claimed == 0 {
            break;
        }
        done += step.published as i64;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    assert_eq!(done, rows);
    assert_eq!(outbox::backlog(&mut pool.acquire().await.expect("conn")).await.expect("backlog"), 0);
    let mut c = redis_conn(redis).await;
    let mut total = 0u64;
    for s in STREAMS {
        let n: u64 = redis::cmd("XLEN").arg(s).query_async(&mut c).await.expect("XLEN");
        total += n;
    }
    assert_eq!(total as i64, rows, "every row is on a stream");
    rate
}

/// Commit of a one-row transaction → the entry returned by a blocking `XREAD` on another
/// connection, with the relay running as in production (LISTEN, 1 s poll fallback).
async fn latency(pool: &PgPool, url: &str, redis: &RedisServer, samples: usize) -> (Duration, Duration, Duration) {
    let relay = Arc::new(relay_for(url, redis));
    let stop = CancellationToken::new();
    let running = {
        let relay = relay.clone();
        let stop = stop.clone();
        tokio::spawn(async move { relay.run(stop).await })
    };
    let stats = relay.stats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stats.listening.load(std::sync::atomic::Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "relay never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut reader = redis_conn(redis).await;
    let stream = STREAMS[0];
    let frame = vec![0x5Au8; FRAME_LEN];
    let mut last = "0-0".to_owned();
    let mut got = Vec::with_capacity(samples);
    for _ in 0..samples {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("INSERT INTO outbox (stream, envelope_id, task_id, frame) VALUES ($1, gen_random_uuid(), gen_random_uuid(), $2)")
            .bind(stream)
            .bind(&frame)
            .execute(&mut *tx)
            .await
            .expect("insert");
        let t0 = Instant::now();
        tx.commit().await.expect("commit");
        let v: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(5000)
            .arg("STREAMS")
            .arg(stream)
            .arg(&last)
            .query_async(&mut reader)
            .await
            .expect("XREAD");
        got.push(t0.elapsed());
        let entries = bus::reply::read_one_stream(&v).expect("entries");
        last = entries.first().map(|e| e.id.clone()).expect("the row arrived within 5 s");
    }
    stop.cancel();
    running.await.expect("relay task");
    let slow: Vec<String> =
        got.iter().filter(|d| **d > Duration::from_millis(5)).map(|d| format!("{:.1}", ms(*d))).collect();
    println!(
        "  latency: {} samples over 5 ms [{}]; relay re-checks while rows waited on the horizon: {}; notifications: {}",
        slow.len(),
        slow.join(", "),
        outbox_relay::RelayStats::get(&stats.rechecks),
        outbox_relay::RelayStats::get(&stats.notifications)
    );
    got.sort();
    let pick = |q: f64| got[((got.len() as f64 * q).ceil() as usize).clamp(1, got.len()) - 1];
    (pick(0.50), pick(0.99), *got.last().expect("samples"))
}

fn relay_for(url: &str, redis: &RedisServer) -> Relay {
    let endpoints =
        Endpoints { database_url: url.to_owned().into(), redis_url: redis.url().into(), redis_ca_file: None };
    Relay::connect(&endpoints, RelayConfig { batch_size: BATCH, ..RelayConfig::default() }).expect("relay")
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect")
}

async fn explain(pool: &PgPool) {
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) {}",
        outbox_claim_sql()
    )))
    .bind(i64::from(BATCH))
    .bind(Vec::<String>::new())
    .fetch_all(pool)
    .await
    .expect("explain");
    println!("claim plan at a full backlog:\n  {}", plan.join("\n  "));
}

fn outbox_claim_sql() -> &'static str {
    outbox::CLAIM_SQL
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
