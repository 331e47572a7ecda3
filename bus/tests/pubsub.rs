//! Publish/subscribe against a real redis-server: payloads, many consumers in one group,
//! a consumer leaving, several groups. (The cases of Watermill's universal pub/sub suite
//! that apply to consumer groups.)

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use envelope::streams;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_100_with_payloads_checked() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let (rec, mut rx) = recorder();
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec);
    let batch: Vec<_> = (0..50).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&batch).await.unwrap();
    for n in 50..100 {
        publisher.publish(&stream, &result(n)).await.unwrap();
    }
    let mut got: Vec<String> = take(&mut rx, 100, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|g| {
            assert_eq!(g.deliveries, 1);
            g.summary
        })
        .collect();
    got.sort_by_key(|s| number(s));
    let want: Vec<String> = (0..100).map(|n| format!("result {n}")).collect();
    assert_eq!(got, want);
    let stats = consumer.stats.clone();
    consumer.shutdown().await;
    assert_eq!(load(&stats.handled), 100);
    assert_eq!(load(&stats.rejected), 0);
    // One replay-guard field per envelope, written when it is read, in a bucket hash that
    // expires whole; the acknowledgement is the "done" mark, so nothing more per entry
    // (issue 16).
    let mut c = connect(&server).await;
    let buckets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("fleet:seen:{{{}}}:{GROUP}:*", stream.as_str()))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=2).contains(&buckets.len()), "envelopes sent together share a bucket or two: {buckets:?}");
    for b in &buckets {
        let ttl: i64 = redis::cmd("PTTL").arg(b).query_async(&mut c).await.unwrap();
        assert!(ttl > 0, "{b} expires");
    }
    let done: Vec<String> = redis::cmd("KEYS").arg("fleet:done:*").query_async(&mut c).await.unwrap();
    assert_eq!((guarded_ids(&mut c, stream.as_str(), GROUP).await, done.len()), (100, 0));
}

/// 5,000 messages from four concurrent publishers (two pipelining batches, two publishing
/// one by one) to 50 consumers of one group: each message is handled exactly once, and
/// everything is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_subscribe_5000_messages_50_consumers_one_group() {
    const MESSAGES: u64 = 5_000;
    const CONSUMERS: usize = 50;
    const PUBLISHERS: u64 = 4;
    let server = redis();
    let mut c = connect(&server).await;
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let (rec, mut rx) = recorder();
    let running: Vec<Running> = (0..CONSUMERS)
        .map(|i| {
            let name = format!("orch-{i}");
            let mut cfg = config(GROUP, &name);
            cfg.batch = 16;
            // Not about takeovers (failures.rs is): on a loaded 2-core machine a consumer task
            // may wait long for a thread, and must not look dead meanwhile.
            cfg.claim_idle = Duration::from_secs(10);
            spawn(&server, cfg, rec.clone().named(&name))
        })
        .collect();
    let stats: Vec<_> = running.iter().map(|r| r.stats.clone()).collect();

    let mut publishers = tokio::task::JoinSet::new();
    let per = MESSAGES / PUBLISHERS;
    for p in 0..PUBLISHERS {
        let publisher = dev_publisher(&server);
        let stream = results_stream();
        let numbers: Vec<u64> = (p * per..(p + 1) * per).collect();
        publishers.spawn(async move {
            if p % 2 == 0 {
                for chunk in numbers.chunks(50) {
                    let batch: Vec<_> = chunk.iter().map(|n| (stream.clone(), result(*n))).collect();
                    assert_eq!(publisher.publish_batch(&batch).await.expect("publish batch").len(), chunk.len());
                }
            } else {
                for n in numbers {
                    publisher.publish(&stream, &result(n)).await.expect("publish");
                }
            }
        });
    }
    while let Some(r) = publishers.join_next().await {
        r.expect("publisher task");
    }

    let mut got = take(&mut rx, MESSAGES as usize, Duration::from_secs(60)).await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(30)).await;
    for r in running {
        r.shutdown().await;
    }
    // Every consumer has stopped: anything handled twice is in the channel by now.
    let late = drain(&mut rx);
    assert!(late.is_empty(), "{} deliveries beyond {MESSAGES}, e.g. {:?}", late.len(), &late[..late.len().min(3)]);
    got.extend(late);

    let ids: BTreeSet<_> = got.iter().map(|g| g.id).collect();
    assert_eq!(ids.len(), MESSAGES as usize, "envelope ids handled more than once");
    let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
    assert_eq!(numbers, (0..MESSAGES).collect::<BTreeSet<_>>());
    assert!(got.iter().all(|g| g.deliveries == 1), "no entry needed a second delivery");
    assert_eq!(rec.call_count(), MESSAGES as usize, "the handler ran once per message");

    let sum = |f: fn(&bus::ConsumerStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    assert_eq!(sum(|s| load(&s.handled)), MESSAGES);
    assert_eq!(sum(|s| load(&s.rejected)), 0);
    assert_eq!(sum(|s| load(&s.dead_lettered)), 0);
    assert_eq!(sum(|s| load(&s.handler_failures)), 0);
    assert_eq!(pending_count(&mut c, streams::RESULTS, GROUP).await, 0);

    let mut per_consumer: BTreeMap<&str, usize> = BTreeMap::new();
    for g in &got {
        *per_consumer.entry(g.by.as_str()).or_default() += 1;
    }
    assert!(per_consumer.len() > 1, "the group spread the work over its consumers: {per_consumer:?}");
}

/// Consumer A handles some entries and is shut down; B (another name, same group) carries
/// on with new entries and takes over what A had read but not handled. A, restarted under
/// its name, finds nothing left and shares new work. Nothing lost, nothing handled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_continue_after_one_closes() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let (rec, mut rx) = recorder();
    let mut cfg_a = config(GROUP, "orch-a");
    cfg_a.batch = 10;
    let a = spawn(&server, cfg_a.clone(), rec.clone().named("orch-a").slow(Duration::from_millis(5)));
    let first: Vec<_> = (0..100).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&first).await.unwrap();

    let mut got = take(&mut rx, 30, Duration::from_secs(10)).await;
    a.shutdown().await;
    got.extend(drain(&mut rx));
    assert!(got.iter().all(|g| g.by == "orch-a"));
    let by_a = got.len();
    // What A read but had not started stays pending under its name.
    let left_by_a: BTreeSet<String> = pending_entries(&mut c, streams::RESULTS, GROUP)
        .await
        .into_iter()
        .map(|p| {
            assert_eq!(p.consumer, "orch-a");
            p.id
        })
        .collect();
    assert!(left_by_a.len() < 10, "at most one batch of A is left: {left_by_a:?}");

    let b = spawn(&server, config(GROUP, "orch-b"), rec.clone().named("orch-b"));
    let second: Vec<_> = (100..200).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&second).await.unwrap();
    let rest = take(&mut rx, 200 - by_a, Duration::from_secs(20)).await;
    assert!(rest.iter().all(|g| g.by == "orch-b"), "only B runs now");
    for g in rest.iter().filter(|g| left_by_a.contains(&g.entry)) {
        assert!(g.deliveries >= 2, "taken over from A, so delivered again: {g:?}");
    }
    got.extend(rest);
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    assert_eq!(consumers(&mut c, streams::RESULTS, GROUP).await.get("orch-a"), Some(&0), "nothing left pending for A");

    let a = spawn(&server, cfg_a, rec.clone().named("orch-a"));
    let third: Vec<_> = (200..220).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&third).await.unwrap();
    got.extend(take(&mut rx, 20, Duration::from_secs(10)).await);
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let a_stats = a.stats.clone();
    a.shutdown().await;
    b.shutdown().await;
    got.extend(drain(&mut rx));

    assert_eq!(got.len(), 220, "each message handled exactly once");
    let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
    assert_eq!(numbers, (0..220).collect::<BTreeSet<_>>());
    assert_eq!(rec.call_count(), 220);
    assert_eq!(load(&a_stats.already_done) + load(&a_stats.rejected), 0, "restarted A found nothing old to settle");
}

/// Each consumer group sees every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_each_see_every_message() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let (rec1, mut rx1) = recorder();
    let (rec2, mut rx2) = recorder();
    let g1 = spawn(&server, config("orchestrator", "orch-1"), rec1.named("orch-1"));
    let g2 = spawn(&server, config("audit", "audit-1"), rec2.named("audit-1"));
    for chunk in (0..100).collect::<Vec<u64>>().chunks(25) {
        let batch: Vec<_> = chunk.iter().map(|n| (stream.clone(), result(*n))).collect();
        publisher.publish_batch(&batch).await.unwrap();
    }
    let mut got1 = take(&mut rx1, 100, Duration::from_secs(10)).await;
    let mut got2 = take(&mut rx2, 100, Duration::from_secs(10)).await;
    wait_all_acked(&mut c, streams::RESULTS, "orchestrator", Duration::from_secs(10)).await;
    wait_all_acked(&mut c, streams::RESULTS, "audit", Duration::from_secs(10)).await;
    g1.shutdown().await;
    g2.shutdown().await;
    got1.extend(drain(&mut rx1));
    got2.extend(drain(&mut rx2));
    for got in [&got1, &got2] {
        assert_eq!(got.len(), 100);
        let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
        assert_eq!(numbers, (0..100).collect::<BTreeSet<_>>());
    }
    // The same entries, seen by both.
    let entries = |got: &[Got]| got.iter().map(|g| g.entry.clone()).collect::<BTreeSet<_>>();
    assert_eq!(entries(&got1), entries(&got2));
}

/// While a group leaves entries unacknowledged, a publisher refuses to fill the stream past
/// 90% of its cap (approximate trimming could otherwise drop them); once the group has
/// caught up, publishing resumes. Nothing published is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_applies_backpressure_near_the_cap_until_the_group_catches_up() {
    let server = redis();
    let stream = results_stream();
    let mut c = connect(&server).await;
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let mut cfg = bus::PublisherConfig::default();
    cfg.caps.insert(streams::RESULTS.to_owned(), 20);
    cfg.backlog_check_every = Duration::ZERO;
    let publisher = bus::Publisher::new(pool(&server), keyring(envelope::Role::Dev), cfg);
    for n in 0..18 {
        publisher.publish(&stream, &result(n)).await.unwrap();
    }
    match publisher.publish(&stream, &result(18)).await {
        Err(bus::BusError::Backpressure { stream, backlog, cap }) => {
            assert_eq!((stream.as_str(), backlog, cap), (streams::RESULTS, 18, 20));
        }
        other => panic!("expected backpressure, got {other:?}"),
    }
    assert_eq!(xlen(&mut c, streams::RESULTS).await, 18, "the refused publish wrote nothing");

    let (rec, mut rx) = recorder();
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec);
    let mut got = take(&mut rx, 18, Duration::from_secs(10)).await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    publisher.publish(&stream, &result(18)).await.expect("publishing resumes once the backlog is handled");
    got.extend(take(&mut rx, 1, Duration::from_secs(10)).await);
    consumer.shutdown().await;
    let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
    assert_eq!(numbers, (0..19).collect());
}

/// Only the last `XADD` to each stream of a batch carries `MAXLEN ~ cap`: a stream written
/// in batches, mixed with another stream's entries, is still held near its cap (approximate
/// trimming keeps at least the cap, plus at most one node of 100 entries), and the other
/// stream, under its cap, keeps everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_mixing_streams_trim_each_stream_to_its_cap() {
    let server = redis();
    let results = results_stream();
    let heartbeats = envelope::StreamName::parse(streams::HEARTBEATS).unwrap();
    let mut c = connect(&server).await;
    let mut cfg = bus::PublisherConfig::default();
    cfg.caps.insert(streams::RESULTS.to_owned(), 100);
    cfg.backlog_check_every = Duration::ZERO;
    let publisher = bus::Publisher::new(pool(&server), keyring(envelope::Role::Dev), cfg);
    // A group that keeps up, so the backlog (not the length) stays under the cap.
    let (rec, mut rx) = recorder();
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec);
    for round in 0..20u64 {
        let batch: Vec<_> = (0..40u64)
            .flat_map(|n| {
                let n = round * 40 + n;
                [(results.clone(), result(n)), (heartbeats.clone(), heartbeat(n))]
            })
            .collect();
        publisher.publish_batch(&batch).await.unwrap();
        take(&mut rx, 40, Duration::from_secs(10)).await;
        wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    }
    consumer.shutdown().await;
    let len = xlen(&mut c, streams::RESULTS).await;
    assert!((100..=200).contains(&len), "{len} results kept of 800 with a cap of 100");
    assert_eq!(xlen(&mut c, streams::HEARTBEATS).await, 800, "heartbeats are under their cap");
}
