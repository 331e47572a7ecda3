//! The relay against real Postgres and Redis: delivery, exactly-once across relays, the
//! visibility horizon, per-task order, wake-ups, outages, backpressure, pruning.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use outbox_relay::{RelayConfig, RelayStats, Step, outbox};
use uuid::Uuid;

#[tokio::test]
async fn publishes_every_row_with_its_exact_bytes_in_id_order() {
    let env = Env::start().await;
    // 100 rows over two streams and ten tasks, in ten transactions, frames of varied sizes.
    let mut written: Vec<(i64, TestRow)> = Vec::new();
    for t in 0..10u64 {
        let rows: Vec<TestRow> = (0..10u64)
            .map(|i| {
                let stream = if i % 3 == 0 { QA } else { DEV };
                TestRow::new(stream, Uuid::now_v7(), t * 10 + i, 24 + (i as usize * 97) % 700)
            })
            .collect();
        let ids = insert_committed(&env.pool, &rows).await;
        written.extend(ids.into_iter().zip(rows));
    }
    let relay = spawn(env.relay(fast()));
    env.drained(Duration::from_secs(10)).await;

    let mut redis = env.redis().await;
    for stream in [DEV, QA] {
        let mut expected: Vec<&(i64, TestRow)> = written.iter().filter(|(_, r)| r.stream == stream).collect();
        expected.sort_by_key(|(id, _)| *id);
        let expected: Vec<&[u8]> = expected.iter().map(|(_, r)| r.frame.as_slice()).collect();
        let got = read_stream(&mut redis, stream).await;
        assert_eq!(got.len(), expected.len(), "{stream}: one entry per row");
        assert!(got.iter().map(Vec::as_slice).eq(expected.iter().copied()), "{stream}: exact bytes, in id order");
    }
    let unmarked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dispatched_at IS NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    assert_eq!(unmarked, 0);
    assert_eq!(load(&relay.stats, |s| &s.published), 100);
    relay.shutdown().await;
}

/// Several writers insert 10,000 rows while two relays run. Every row reaches its stream
/// exactly once, and each task's rows arrive in the order they were written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_every_row_exactly_once_and_each_task_in_order() {
    const WRITERS: u64 = 8;
    const PER_WRITER: u64 = 1250;
    const TASKS_PER_WRITER: u64 = 10;
    let env = Env::start().await;
    let small_batches = RelayConfig { batch_size: 64, ..fast() };
    let a = spawn(env.relay(small_batches.clone()));
    let b = spawn(env.relay(small_batches));

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = env.pool.clone();
        writers.push(tokio::spawn(async move {
            // Each writer owns its tasks and writes each task's rows in order, one
            // transaction after the other, as the orchestrator does under the task lock.
            let tasks: Vec<(Uuid, &'static str)> =
                (0..TASKS_PER_WRITER).map(|t| (Uuid::now_v7(), [DEV, QA, REVIEW][((w + t) % 3) as usize])).collect();
            let mut next_seq = vec![0u64; tasks.len()];
            let mut written = 0u64;
            let mut n = 0u64;
            while written < PER_WRITER {
                let size = (1 + (w * 7 + n * 13) % 25).min(PER_WRITER - written);
                let rows: Vec<TestRow> = (0..size)
                    .map(|k| {
                        let t = ((n + k) % TASKS_PER_WRITER) as usize;
                        next_seq[t] += 1;
                        TestRow::new(tasks[t].1, tasks[t].0, next_seq[t], 64)
                    })
                    .collect();
                insert_committed(&pool, &rows).await;
                written += size;
                n += 1;
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    env.drained(Duration::from_secs(60)).await;

    let total = WRITERS * PER_WRITER;
    assert_eq!(
        load(&a.stats, |s| &s.published) + load(&b.stats, |s| &s.published),
        total,
        "the relays' committed batches add up to the rows, none counted twice"
    );
    let mut redis = env.redis().await;
    let mut seen: HashMap<Uuid, u32> = HashMap::new();
    let mut last_seq: HashMap<Uuid, u64> = HashMap::new();
    let task_of: HashMap<Uuid, Uuid> = sqlx::query_as::<_, (Uuid, Uuid)>("SELECT envelope_id, task_id FROM outbox")
        .fetch_all(&env.pool)
        .await
        .expect("rows")
        .into_iter()
        .collect();
    for stream in [DEV, QA, REVIEW] {
        for frame in read_stream(&mut redis, stream).await {
            let (id, seq) = decode(&frame);
            *seen.entry(id).or_default() += 1;
            let task = task_of[&id];
            let before = last_seq.insert(task, seq).unwrap_or(0);
            assert!(seq > before, "task {task}: seq {seq} arrived after seq {before} on {stream}");
        }
    }
    assert_eq!(seen.len() as u64, total, "every row published");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows published more than once: {twice:?}");
    eprintln!(
        "relay a: {} rows in {} batches; relay b: {} rows in {} batches; rows held back for order: {}",
        load(&a.stats, |s| &s.published),
        load(&a.stats, |s| &s.batches),
        load(&b.stats, |s| &s.published),
        load(&b.stats, |s| &s.batches),
        load(&a.stats, |s| &s.blocked) + load(&b.stats, |s| &s.blocked),
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Writer A opens a transaction and inserts a row (it gets the lower id and txid) and stays
/// open; writer B then inserts and commits three rows of the same task, and C one row of
/// another task. B's and C's rows are committed and visible, but their txids are above the
/// horizon A holds, so the relay leaves them alone: nothing may overtake A's row. When A
/// commits, all five go out, A's row first on the stream, and nothing is skipped.
#[tokio::test]
async fn a_long_open_transaction_holds_later_rows_back_and_nothing_is_skipped() {
    let env = Env::start().await;
    let relay = spawn(env.relay(fast()));
    let task = Uuid::now_v7();

    let a_row = TestRow::new(DEV, task, 1, 40);
    let mut a = env.pool.begin().await.expect("begin A");
    let a_id = insert(&mut a, std::slice::from_ref(&a_row)).await[0];

    let b_rows: Vec<TestRow> = (2..=4).map(|seq| TestRow::new(DEV, task, seq, 40)).collect();
    let b_ids = insert_committed(&env.pool, &b_rows).await;
    let c_row = TestRow::new(QA, Uuid::now_v7(), 1, 40);
    insert_committed(&env.pool, std::slice::from_ref(&c_row)).await;
    assert!(b_ids.iter().all(|id| *id > a_id), "A's row has the lowest id");

    // Several polls and re-checks go by; B's and C's rows must still be waiting.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut redis = env.redis().await;
    assert!(read_stream(&mut redis, DEV).await.is_empty(), "B's rows wait behind A's open transaction");
    assert!(read_stream(&mut redis, QA).await.is_empty(), "the horizon is global: C's row waits too");
    assert_eq!(env.undispatched().await, 4);

    a.commit().await.expect("commit A");
    env.drained(Duration::from_secs(5)).await;
    let dev: Vec<u64> = read_stream(&mut redis, DEV).await.iter().map(|f| decode(f).1).collect();
    assert_eq!(dev, vec![1, 2, 3, 4], "A's row first, then B's in id order");
    assert_eq!(read_stream(&mut redis, QA).await, vec![c_row.frame]);
    relay.shutdown().await;
}

/// Relay B has claimed R1 (task T) and not yet committed; relay A must not publish R2 (task
/// T, later) ahead of it, but publishes other tasks' rows. Whether B then commits or rolls
/// back, R1 reaches the stream before R2.
#[tokio::test]
async fn a_row_waits_while_an_earlier_row_of_its_task_is_held_by_another_relay() {
    for b_commits in [true, false] {
        let env = Env::start().await;
        let t = Uuid::now_v7();
        let r1 = TestRow::new(DEV, t, 1, 30);
        let r2 = TestRow::new(DEV, t, 2, 30);
        let other = TestRow::new(DEV, Uuid::now_v7(), 1, 30);
        insert_committed(&env.pool, std::slice::from_ref(&r1)).await;
        insert_committed(&env.pool, std::slice::from_ref(&r2)).await;
        insert_committed(&env.pool, std::slice::from_ref(&other)).await;

        // Relay B, by hand: claims one row (R1, the oldest) and keeps its transaction open.
        let publisher = env.publisher();
        let mut b = env.pool.begin().await.expect("begin B");
        let b_claim = outbox::claim(&mut b, 1, &[]).await.expect("claim");
        assert_eq!(b_claim.ready.len(), 1);
        assert_eq!(b_claim.ready[0].frame, r1.frame);

        let a = env.relay(fast());
        let step = a.step().await.expect("step");
        assert_eq!(step, Step { claimed: 2, published: 1, blocked: 1, backpressured: None });
        let mut redis = env.redis().await;
        assert_eq!(read_stream(&mut redis, DEV).await, vec![other.frame.clone()], "only the other task's row");

        if b_commits {
            publisher.publish_wire_batch(&[(DEV, &b_claim.ready[0].frame)]).await.expect("XADD");
            outbox::mark_dispatched(&mut b, &[b_claim.ready[0].id]).await.expect("mark");
            b.commit().await.expect("commit B");
        } else {
            b.rollback().await.expect("B gives up before publishing");
        }
        let step = a.step().await.expect("step");
        assert_eq!(step.blocked, 0);
        assert_eq!(step.published, if b_commits { 1 } else { 2 });
        assert_eq!(read_stream(&mut redis, DEV).await, vec![other.frame.clone(), r1.frame.clone(), r2.frame.clone()]);
        assert_eq!(env.undispatched().await, 0);
    }
}

/// With a 60 s poll, only a notification can wake the relay.
#[tokio::test]
async fn a_notification_wakes_the_relay_without_waiting_for_the_poll() {
    let env = Env::start().await;
    let relay = spawn(env.relay(RelayConfig { poll_interval: Duration::from_secs(60), ..fast() }));
    eventually(Duration::from_secs(10), "the relay listens", || async {
        relay.stats.listening.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    // Let the start-up drain finish so the relay is parked on its 60 s wait.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut redis = env.redis().await;
    for _ in 0..3 {
        let row = TestRow::new(DEV, Uuid::now_v7(), 1, 100);
        let committed = Instant::now();
        insert_committed(&env.pool, std::slice::from_ref(&row)).await;
        eventually(Duration::from_secs(1), "the row is on the stream within 1 s", || {
            let mut redis = redis.clone();
            let frame = row.frame.clone();
            async move { read_stream(&mut redis, DEV).await.contains(&frame) }
        })
        .await;
        eprintln!("commit to stream: {:?}", committed.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(load(&relay.stats, |s| &s.notifications) >= 3);
    let _ = &mut redis;
    relay.shutdown().await;
}

/// A notification can be lost (the listener reconnecting, say): the poll still finds the
/// row. Here the trigger is switched off so no notification is ever sent.
#[tokio::test]
async fn the_poll_finds_rows_that_no_notification_announced() {
    let env = Env::start().await;
    sqlx::query("ALTER TABLE outbox DISABLE TRIGGER outbox_notify").execute(&env.pool).await.expect("disable trigger");
    let relay = spawn(env.relay(RelayConfig { poll_interval: Duration::from_millis(300), ..fast() }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let row = TestRow::new(DEV, Uuid::now_v7(), 1, 64);
    insert_committed(&env.pool, std::slice::from_ref(&row)).await;
    env.drained(Duration::from_secs(3)).await;
    let mut redis = env.redis().await;
    assert_eq!(read_stream(&mut redis, DEV).await, vec![row.frame]);
    assert_eq!(load(&relay.stats, |s| &s.notifications), 0);
    relay.shutdown().await;
}

/// While Redis is down, rows stay in the outbox (errors counted, the relay keeps going);
/// once it is back, they are published.
#[tokio::test]
async fn rows_wait_out_a_redis_outage_and_are_published_when_it_ends() {
    let mut env = Env::start().await;
    let relay = spawn(env.relay(fast()));
    let before: Vec<TestRow> = (0..10).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 50)).collect();
    insert_committed(&env.pool, &before).await;
    env.drained(Duration::from_secs(5)).await;

    env.redis.stop();
    let during: Vec<TestRow> = (0..10).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 50)).collect();
    insert_committed(&env.pool, &during).await;
    eventually(Duration::from_secs(10), "the relay has failed at least twice", || async {
        load(&relay.stats, |s| &s.errors) >= 2
    })
    .await;
    assert_eq!(env.undispatched().await, 10, "nothing is marked while Redis is down");

    env.redis.restart().expect("restart redis");
    env.drained(Duration::from_secs(10)).await;
    // The restarted server kept no data (no persistence): the stream holds what came after.
    let mut redis = env.redis().await;
    let got = read_stream(&mut redis, DEV).await;
    for row in &during {
        assert!(got.contains(&row.frame), "row {} published after the outage", row.envelope_id);
    }
    relay.shutdown().await;
}

/// A stream whose backlog nears its cap refuses publishes: its rows stay in the outbox while
/// other streams go on, and go out once the backlog shrinks.
#[tokio::test]
async fn backpressure_leaves_rows_in_the_outbox_and_other_streams_go_on() {
    let env = Env::start().await;
    let mut cfg = RelayConfig { backpressure_pause: Duration::from_millis(200), ..fast() };
    cfg.publisher.caps.insert(DEV.to_owned(), 100);
    cfg.publisher.backlog_check_every = Duration::from_millis(50);
    let relay = spawn(env.relay(cfg));

    // No consumer group: the whole stream counts as backlog. 95 entries is over 90% of 100.
    let first: Vec<TestRow> = (0..95).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 20)).collect();
    insert_committed(&env.pool, &first).await;
    env.drained(Duration::from_secs(5)).await;
    // The publisher re-reads a stream's backlog at most every `backlog_check_every`.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let held: Vec<TestRow> = (0..5).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 20)).collect();
    let free: Vec<TestRow> = (0..5).map(|i| TestRow::new(QA, Uuid::now_v7(), i, 20)).collect();
    insert_committed(&env.pool, &[held.clone(), free.clone()].concat()).await;
    let mut redis = env.redis().await;
    eventually(Duration::from_secs(5), "the other stream's rows are published", || {
        let mut redis = redis.clone();
        async move { read_stream(&mut redis, QA).await.len() == 5 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.undispatched().await, 5, "the refused stream's rows stay in the outbox");
    assert_eq!(read_stream(&mut redis, DEV).await.len(), 95);
    assert!(load(&relay.stats, |s| &s.backpressured) >= 1);

    // Consumers catch up (here: the stream is emptied); the rows go out.
    let _: u64 = redis::cmd("XTRIM").arg(DEV).arg("MAXLEN").arg(0).query_async(&mut redis).await.expect("XTRIM");
    env.drained(Duration::from_secs(5)).await;
    let dev = read_stream(&mut redis, DEV).await;
    assert_eq!(dev, held.iter().map(|r| r.frame.clone()).collect::<Vec<_>>());
    relay.shutdown().await;
}

#[tokio::test]
async fn pruning_deletes_only_dispatched_rows_past_the_retention() {
    let env = Env::start().await;
    let rows: Vec<TestRow> = (0..30).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 20)).collect();
    let ids = insert_committed(&env.pool, &rows).await;
    let relay = env.relay(RelayConfig { prune_batch: 7, ..fast() });
    while relay.step().await.expect("step").published > 0 {}
    // 20 rows were dispatched two days ago, 10 just now; 5 new rows are undispatched.
    sqlx::query("UPDATE outbox SET dispatched_at = now() - interval '2 days' WHERE id = ANY($1)")
        .bind(&ids[..20])
        .execute(&env.pool)
        .await
        .expect("age rows");
    let fresh: Vec<TestRow> = (0..5).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 20)).collect();
    insert_committed(&env.pool, &fresh).await;

    let deleted = relay.prune(&tokio_util::sync::CancellationToken::new()).await.expect("prune");
    assert_eq!(deleted, 20, "in batches of 7 until none are left");
    let left: BTreeMap<bool, i64> =
        sqlx::query_as::<_, (bool, i64)>("SELECT dispatched_at IS NULL, count(*) FROM outbox GROUP BY 1")
            .fetch_all(&env.pool)
            .await
            .expect("count")
            .into_iter()
            .collect();
    assert_eq!(left, BTreeMap::from([(false, 10), (true, 5)]));
    assert_eq!(RelayStats::get(&relay.stats().pruned), 20);
}

/// On shutdown the relay stops promptly when idle, and a batch in flight is finished.
#[tokio::test]
async fn shutdown_is_prompt_and_leaves_no_batch_half_done() {
    let env = Env::start().await;
    let rows: Vec<TestRow> = (0..2000).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 200)).collect();
    insert_committed(&env.pool, &rows).await;
    let relay = spawn(env.relay(RelayConfig { batch_size: 16, ..fast() }));
    eventually(Duration::from_secs(10), "some rows are published", || async {
        load(&relay.stats, |s| &s.published) > 0
    })
    .await;
    let stats = relay.stats.clone();
    let started = Instant::now();
    relay.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(2), "stopped within the grace period");
    // Every committed (marked) row is on the stream, and only those: no batch was cut short
    // between its XADD and its COMMIT.
    let marked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE dispatched_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .expect("count");
    let mut redis = env.redis().await;
    assert_eq!(read_stream(&mut redis, DEV).await.len() as i64, marked);
    assert_eq!(RelayStats::get(&stats.published) as i64, marked);
}

/// The relay connected as a role with only `sql/relay_role.sql`'s grants does all of its
/// work (claim, mark, LISTEN wake-ups, the horizon check, pruning), and that role can do
/// nothing else to the outbox or any other table.
#[tokio::test]
async fn the_relay_role_of_relay_role_sql_is_enough_and_no_more() {
    const RELAY_ROLE_SQL: &str = include_str!("../sql/relay_role.sql");
    let env = Env::start().await;
    let database = env.database_url.rsplit('/').next().expect("a database name").to_owned();
    let su = |sql: &str| env.postgres.psql(&database, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    su("CREATE ROLE fleet_relay LOGIN PASSWORD 'relay-password'");
    su(RELAY_ROLE_SQL);
    su(RELAY_ROLE_SQL); // idempotent: run again after every migration
    // docs/deployment.md shows what the script grants on `outbox`, as plain SQL.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/deployment.md")).expect("doc");
    let grants: Vec<String> = RELAY_ROLE_SQL
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EXECUTE format('"))
        .filter_map(|l| l.split_once("', relay);"))
        .map(|(grant, _)| format!("{};", grant.replace("%I", "fleet_relay")))
        .filter(|grant| grant.starts_with("GRANT") && grant.contains(" ON outbox "))
        .collect();
    assert_eq!(grants.len(), 3, "{grants:?}");
    for grant in grants {
        assert!(doc.contains(&grant), "docs/deployment.md does not show `{grant}`");
    }
    let relay_url = format!("postgres://fleet_relay:relay-password@127.0.0.1:{}/{database}", env.postgres.port());
    let endpoints = outbox_relay::config::Endpoints { database_url: relay_url.clone().into(), ..env.endpoints() };

    // Rows before the relay starts (found by its first claim), and after (a notification).
    let before: Vec<TestRow> = (0..5).map(|i| TestRow::new(DEV, Uuid::now_v7(), i, 40)).collect();
    let ids = insert_committed(&env.pool, &before).await;
    let cfg = RelayConfig { poll_interval: Duration::from_secs(60), ..fast() };
    let running = spawn(outbox_relay::Relay::connect(&endpoints, cfg.clone()).expect("relay"));
    env.drained(Duration::from_secs(10)).await;
    let after: Vec<TestRow> = (0..3).map(|i| TestRow::new(QA, Uuid::now_v7(), i, 40)).collect();
    insert_committed(&env.pool, &after).await;
    env.drained(Duration::from_secs(10)).await;
    assert_eq!(load(&running.stats, |s| &s.published), 8);
    assert_eq!(load(&running.stats, |s| &s.errors), 0, "no statement was refused");
    running.shutdown().await;
    let mut redis = env.redis().await;
    assert_eq!(read_stream(&mut redis, DEV).await.len(), 5);
    assert_eq!(read_stream(&mut redis, QA).await.len(), 3);

    // Pruning, and the status queries, as the relay's role.
    sqlx::query("UPDATE outbox SET dispatched_at = now() - interval '2 days' WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&env.pool)
        .await
        .expect("age rows");
    let relay = outbox_relay::Relay::connect(&endpoints, cfg).expect("relay");
    assert_eq!(relay.prune(&tokio_util::sync::CancellationToken::new()).await.expect("prune as the relay"), 5);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&relay_url).await.expect("connect");
    assert_eq!(outbox::backlog(&mut conn).await.expect("backlog"), 0);
    assert!(!outbox::waiting_beyond_horizon(&mut conn).await.expect("horizon"));

    // Nothing else: no new rows, no other column, no other table.
    for sql in [
        "INSERT INTO outbox (stream, envelope_id, frame) VALUES ('fleet:tasks:dev', gen_random_uuid(), '\\x00')",
        "UPDATE outbox SET frame = '\\x00'",
        "UPDATE outbox SET stream = 'fleet:tasks:qa'",
        "SELECT envelope_id FROM outbox",
        "SELECT * FROM outbox",
        "SELECT count(*) FROM tasks",
        "SELECT count(*) FROM audit_trail",
        "UPDATE fleet_state SET halted = true",
        "TRUNCATE outbox",
        "CREATE TABLE intruder (x int)",
    ] {
        let e = sqlx::query(sql).execute(&mut conn).await.expect_err(sql).to_string();
        assert!(e.contains("permission denied"), "{sql}: {e}");
    }
}
