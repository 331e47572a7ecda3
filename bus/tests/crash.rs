//! Crashes and restarts: Redis restarting under load, a consumer dying between its handler
//! and its ack, graceful shutdown, crash loops, and the pruning of consumers long gone.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::names::{done_key, fields};
use common::*;
use envelope::streams;
use fleet_testkit::RedisServer;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// redis-server (AOF, fsync on every write) restarts twice while a publisher publishes
/// continuously, once cleanly and once after SIGKILL: every publish that returned `Ok` is
/// handled, the consumers reconnect by themselves, and everything ends acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_publishers_ride_out_two_redis_restarts() {
    let mut server = RedisServer::builder()
        .appendonly(true)
        .config("appendfsync", "always")
        .start()
        .expect("redis-server must be installed (apt-get install redis-server); tests never skip");
    let (rec, mut rx) = recorder();
    let consumers = [
        spawn(&server, config(GROUP, "orch-a"), rec.clone().named("orch-a")),
        spawn(&server, config(GROUP, "orch-b"), rec.clone().named("orch-b")),
    ];

    // Publishes result 0, 1, 2, … until told to stop; a publish that fails is retried with
    // the same envelope until it returns Ok. Records what returned Ok.
    let published: Arc<Mutex<Vec<Uuid>>> = Arc::default();
    let failed_publishes = Arc::new(AtomicU64::new(0));
    let stop_publishing = CancellationToken::new();
    let publishing = {
        let publisher = dev_publisher(&server);
        let stream = results_stream();
        let published = published.clone();
        let failed = failed_publishes.clone();
        let stop = stop_publishing.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                let env = result(n);
                while let Err(e) = publisher.publish(&stream, &env).await {
                    assert!(matches!(e, bus::BusError::Redis(_) | bus::BusError::Pool(_)), "{e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                published.lock().unwrap().push(env.id);
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let published_count = || published.lock().unwrap().len();

    // Both consumers make progress, restart, both make progress again, restart, again.
    for restart in 0..=2 {
        let before: Vec<u64> = consumers.iter().map(|r| load(&r.stats.handled)).collect();
        for (r, before) in consumers.iter().zip(before) {
            let stats = r.stats.clone();
            eventually(Duration::from_secs(20), "each consumer handles entries after the (re)start", || {
                let n = load(&stats.handled);
                async move { n >= before + 20 }
            })
            .await;
        }
        match restart {
            // A clean restart: SIGTERM, then start again on the same port and directory.
            0 => tokio::task::block_in_place(|| server.restart()).expect("restart redis-server"),
            // A crash: SIGKILL. With `appendfsync always` every acknowledged write survives.
            1 => tokio::task::block_in_place(|| {
                server.kill();
                server.restart()
            })
            .expect("restart redis-server after a crash"),
            _ => {}
        }
    }
    let target = published_count() + 50;
    eventually(Duration::from_secs(20), "the publisher goes on after the restarts", || {
        let n = published_count();
        async move { n >= target }
    })
    .await;
    stop_publishing.cancel();
    publishing.await.expect("publisher task");

    let published: BTreeSet<Uuid> = published.lock().unwrap().iter().copied().collect();
    eventually(Duration::from_secs(30), "every published envelope is handled", || {
        let handled: BTreeSet<Uuid> = rec.calls().iter().map(|g| g.id).collect();
        let done = published.is_subset(&handled);
        async move { done }
    })
    .await;
    let mut c = connect(&server).await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(20)).await;
    let stats: Vec<_> = consumers.iter().map(|r| r.stats.clone()).collect();
    for r in consumers {
        r.shutdown().await;
    }
    let got = drain(&mut rx);

    let mut by_id: BTreeMap<Uuid, Vec<&Got>> = BTreeMap::new();
    for g in &got {
        by_id.entry(g.id).or_default().push(g);
    }
    let handled: BTreeSet<Uuid> = by_id.keys().copied().collect();
    assert_eq!(handled, published, "exactly the published envelopes were handled");
    // At least once. A handler that succeeded just before Redis went away can't record
    // that; its entry is redelivered and handled again. But never through another entry:
    // a publish retried after its XADD did land is dropped by the replay guard.
    let mut twice = 0;
    for (id, gs) in &by_id {
        if gs.len() > 1 {
            twice += 1;
            assert!(gs.iter().all(|g| g.entry == gs[0].entry), "envelope {id} handled via two entries: {gs:?}");
            assert!(gs[1..].iter().all(|g| g.deliveries > 1), "{gs:?}");
        }
    }
    for (name, s) in ["orch-a", "orch-b"].iter().zip(&stats) {
        assert!(load(&s.reconnects) >= 2, "{name} lost Redis twice and reconnected: {}", load(&s.reconnects));
        assert_eq!(load(&s.dead_lettered), 0);
        let reasons = s.rejected_by_reason();
        assert!(reasons.keys().all(|r| *r == "replay"), "only duplicates of retried publishes: {reasons:?}");
    }
    assert_eq!(xlen(&mut c, streams::DLQ).await, 0);
    eprintln!(
        "{} envelopes published ({} failed attempts retried), {} handled twice",
        published.len(),
        load(&failed_publishes),
        twice
    );
}

/// Shutdown does not wait for Redis: a consumer whose Redis went away stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stops_promptly_while_redis_is_down() {
    let mut server = redis();
    let publisher = dev_publisher(&server);
    let (rec, mut rx) = recorder();
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec);
    publisher.publish(&results_stream(), &result(0)).await.unwrap();
    take(&mut rx, 1, Duration::from_secs(10)).await;
    tokio::task::block_in_place(|| server.stop());
    let stats = consumer.stats.clone();
    eventually(Duration::from_secs(10), "the consumer noticed", || {
        let n = load(&stats.reconnects);
        async move { n >= 2 }
    })
    .await;
    let asked = std::time::Instant::now();
    consumer.shutdown().await;
    assert!(asked.elapsed() < Duration::from_secs(3), "stopped {:?} after being asked", asked.elapsed());
}

/// A consumer crashed after its handler succeeded (done marker written) but before the
/// ack. Restarted under the same name, it acknowledges the entry without running the
/// handler again. An entry whose handler had not finished (replay guard set, no done
/// marker) is handled, as delivery 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_redelivered_after_its_handler_succeeded_is_acked_without_rerunning() {
    let server = redis();
    let mut c = connect(&server).await;
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let finished = result(0);
    let unfinished = result(1);
    let finished_entry = xadd_env(&mut c, streams::RESULTS, &seal_dev(&finished)).await;
    let unfinished_entry = xadd_env(&mut c, streams::RESULTS, &seal_dev(&unfinished)).await;
    // What the crashed process left behind: both entries read, both envelope ids recorded
    // by the replay guard, one handler finished.
    assert_eq!(
        read_as(&mut c, streams::RESULTS, GROUP, "orch-1", 10).await,
        [finished_entry.clone(), unfinished_entry.clone()]
    );
    // Each id is kept until its envelope's own expiry (plus skew), as the verifier says.
    let until = |env: &envelope::Envelope| env.issued_at_ms + env.ttl_ms + envelope::VerifierConfig::default().skew_ms;
    let marked = bus::guard::mark(
        &mut c,
        streams::RESULTS,
        GROUP,
        &[
            bus::guard::Sighting { id: finished.id, until_ms: until(&finished), entry: &finished_entry },
            bus::guard::Sighting { id: unfinished.id, until_ms: until(&unfinished), entry: &unfinished_entry },
        ],
    )
    .await
    .unwrap();
    assert_eq!(marked, [None, None]);
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(done_key(GROUP, &finished.id))
        .arg(1)
        .arg("PX")
        .arg(120_000)
        .query_async(&mut c)
        .await
        .unwrap();

    let (rec, mut rx) = recorder();
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec.clone());
    let got = take(&mut rx, 1, Duration::from_secs(10)).await;
    assert_eq!((got[0].entry.as_str(), got[0].deliveries), (unfinished_entry.as_str(), 2));
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;

    assert_eq!(load(&stats.already_done), 1);
    assert_eq!(load(&stats.handled), 1);
    assert_eq!(load(&stats.rejected), 0);
    assert_eq!(rec.calls(), got, "the finished entry's handler did not run again");
}

/// Shutdown while a slow handler runs: the handler finishes within the grace period and
/// its entry is acknowledged; the rest of the batch, never started, stays pending and is
/// handled by the next instance under the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_running_handler_and_leaves_the_rest_pending() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let entries =
        publisher.publish_batch(&(0..5).map(|n| (stream.clone(), result(n))).collect::<Vec<_>>()).await.unwrap();

    let (slow_rec, mut rx) = recorder();
    let slow_rec = slow_rec.slow(Duration::from_millis(400));
    let cfg = config(GROUP, "orch-1");
    assert!(cfg.grace > Duration::from_millis(400));
    let first = spawn(&server, cfg.clone(), slow_rec.clone());
    eventually(Duration::from_secs(5), "the first handler is running", || {
        let n = slow_rec.call_count();
        async move { n == 1 }
    })
    .await;
    let first_stats = first.stats.clone();
    first.shutdown().await;

    let done = drain(&mut rx);
    assert_eq!(done.len(), 1, "the running handler finished");
    assert_eq!(done[0].entry, entries[0]);
    assert_eq!(slow_rec.call_count(), 1, "no handler started after the shutdown signal");
    assert_eq!(load(&first_stats.handled), 1);
    let pending = pending_entries(&mut c, streams::RESULTS, GROUP).await;
    assert_eq!(pending.iter().map(|p| p.id.clone()).collect::<Vec<_>>(), entries[1..].to_vec());
    assert!(pending.iter().all(|p| p.consumer == "orch-1" && p.deliveries == 1), "{pending:?}");

    let (rec, mut rx) = recorder();
    let second = spawn(&server, cfg, rec.clone());
    let mut got = take(&mut rx, 4, Duration::from_secs(10)).await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    second.shutdown().await;
    got.sort_by(|a, b| a.entry.cmp(&b.entry));
    assert_eq!(got.iter().map(|g| g.entry.clone()).collect::<Vec<_>>(), entries[1..].to_vec());
    assert!(got.iter().all(|g| g.deliveries == 2), "{got:?}");
    assert_eq!(rec.call_count(), 4);
}

/// A handler still running when the grace period ends is abandoned: the consumer stops
/// anyway, and the entry is not acknowledged; the next instance handles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_outliving_the_grace_period_leaves_its_entry_pending() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let mut c = connect(&server).await;
    let entry = publisher.publish(&results_stream(), &result(0)).await.unwrap();

    let (slow_rec, mut slow_rx) = recorder();
    let slow_rec = slow_rec.slow(Duration::from_secs(3600));
    let mut cfg = config(GROUP, "orch-1");
    cfg.grace = Duration::from_millis(200);
    let first = spawn(&server, cfg.clone(), slow_rec.clone());
    eventually(Duration::from_secs(5), "the handler is running", || {
        let n = slow_rec.call_count();
        async move { n == 1 }
    })
    .await;
    let stats = first.stats.clone();
    first.shutdown().await;
    assert!(drain(&mut slow_rx).is_empty());
    assert_eq!(load(&stats.handled), 0);
    let pending = pending_entries(&mut c, streams::RESULTS, GROUP).await;
    assert_eq!(pending.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), [entry.as_str()]);

    let (rec, mut rx) = recorder();
    let second = spawn(&server, cfg, rec);
    let got = take(&mut rx, 1, Duration::from_secs(10)).await;
    assert_eq!((got[0].entry.as_str(), got[0].deliveries), (entry.as_str(), 2));
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    second.shutdown().await;
}

/// An entry whose consumer kept dying mid-handler has used up its deliveries: the next
/// maintenance pass dead-letters it without running the handler once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_out_of_deliveries_after_crashes_is_dead_lettered_without_a_call() {
    let server = redis();
    let mut c = connect(&server).await;
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let wire = seal_dev(&result(0));
    let entry = xadd_env(&mut c, streams::RESULTS, &wire).await;
    read_as(&mut c, streams::RESULTS, GROUP, "orch-1", 1).await;
    // Four more crashed attempts.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(streams::RESULTS)
        .arg(GROUP)
        .arg("orch-1")
        .arg(0)
        .arg(&entry)
        .arg("RETRYCOUNT")
        .arg(5)
        .arg("JUSTID")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending_entries(&mut c, streams::RESULTS, GROUP).await[0].deliveries, 5);

    let (rec, _rx) = recorder();
    let cfg = config(GROUP, "orch-1");
    assert_eq!(cfg.max_deliveries, 5);
    let consumer = spawn(&server, cfg, rec.clone());
    eventually(Duration::from_secs(10), "the entry is in fleet:dlq", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::DLQ).await == 1 }
    })
    .await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;

    assert_eq!(rec.call_count(), 0);
    assert_eq!(load(&stats.dead_lettered), 1);
    let dlq = read_stream(&mut c, streams::DLQ).await;
    assert_eq!(dlq[0].text(fields::ENTRY), entry);
    assert_eq!(dlq[0].text(fields::DELIVERIES), "5");
    assert!(dlq[0].text(fields::DETAIL).contains("handler did not succeed"), "{}", dlq[0].text(fields::DETAIL));
    assert_eq!(dlq[0].bytes(bus::names::ENV_FIELD), Some(wire.as_slice()));
}

/// Consumers that hold nothing and have been idle long enough are removed from the group;
/// one that still holds a pending entry is kept until that entry is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_with_nothing_pending_are_pruned() {
    let server = redis();
    let mut c = connect(&server).await;
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let entry = xadd_env(&mut c, streams::RESULTS, &seal_dev(&result(0))).await;
    assert_eq!(read_as(&mut c, streams::RESULTS, GROUP, "holder", 1).await, std::slice::from_ref(&entry));
    let created: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(streams::RESULTS)
        .arg(GROUP)
        .arg("gone")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(created, 1);
    // Redis (7.0) lists a consumer once it has read something: give "live" one entry.
    let for_live = xadd_env(&mut c, streams::RESULTS, &seal_dev(&result(1))).await;

    let (rec, mut rx) = recorder();
    let mut cfg = config(GROUP, "live");
    cfg.remove_idle_consumers_after = Some(Duration::from_millis(300));
    cfg.prune_every = Duration::from_millis(50);
    cfg.claim_idle = Duration::from_secs(60); // "holder" is not taken over here
    let consumer = spawn(&server, cfg, rec.clone());
    assert_eq!(take(&mut rx, 1, Duration::from_secs(10)).await[0].entry, for_live);
    eventually(Duration::from_secs(10), "\"gone\" is removed from the group", || {
        let mut c = c.clone();
        async move { !consumers(&mut c, streams::RESULTS, GROUP).await.contains_key("gone") }
    })
    .await;
    let now = consumers(&mut c, streams::RESULTS, GROUP).await;
    assert_eq!(now.get("holder"), Some(&1), "a consumer with a pending entry stays: {now:?}");

    let acked: i64 = redis::cmd("XACK").arg(streams::RESULTS).arg(GROUP).arg(&entry).query_async(&mut c).await.unwrap();
    assert_eq!(acked, 1);
    eventually(Duration::from_secs(10), "\"holder\" is removed once it holds nothing", || {
        let mut c = c.clone();
        async move { !consumers(&mut c, streams::RESULTS, GROUP).await.contains_key("holder") }
    })
    .await;
    consumer.shutdown().await;
    let now = consumers(&mut c, streams::RESULTS, GROUP).await;
    assert_eq!(now.get("live"), Some(&0), "the pruner never removes its own consumer: {now:?}");
    assert_eq!(rec.call_count(), 1);
}
