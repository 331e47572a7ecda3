//! Handlers that fail, hang or die: retries with Redis's delivery counter, the dead-letter
//! stream, and taking over entries from consumers that stopped answering.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bus::HandlerError;
use bus::names::{ENV_FIELD, fields};
use common::*;
use envelope::streams;

/// Entries whose handler fails transiently on their first two deliveries are retried
/// (deliveries 2 and 3, counted by Redis) and handled once; nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_until_handled() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let flaky = |n: u64| n % 10 == 3;
    let (rec, mut rx) = recorder();
    let rec = rec.failing(move |d| {
        (flaky(number(&summary(d))) && d.deliveries <= 2)
            .then(|| HandlerError::Transient(format!("dependency down (delivery {})", d.deliveries)))
    });
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec.clone());
    let batch: Vec<_> = (0..100).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&batch).await.unwrap();

    let mut got = take(&mut rx, 100, Duration::from_secs(20)).await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;
    got.extend(drain(&mut rx));

    assert_eq!(got.len(), 100, "each handled once");
    for g in &got {
        let want = if flaky(number(&g.summary)) { 3 } else { 1 };
        assert_eq!(g.deliveries, want, "{g:?}");
    }
    let mut attempts: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for call in rec.calls() {
        attempts.entry(number(&call.summary)).or_default().push(call.deliveries);
    }
    for (n, seen) in &attempts {
        let want = if flaky(*n) { vec![1, 2, 3] } else { vec![1] };
        assert_eq!(seen, &want, "deliveries of result {n}");
    }
    assert_eq!(attempts.len(), 100);
    assert_eq!(load(&stats.handler_failures), 20);
    assert_eq!(load(&stats.handled), 100);
    assert_eq!(load(&stats.dead_lettered), 0);
    assert_eq!(xlen(&mut c, streams::DLQ).await, 0, "nothing dead-lettered");
}

/// A handler that always fails transiently is called exactly `max_deliveries` times
/// (here 4, not the default), then the entry goes to `fleet:dlq` with everything an
/// operator needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_after_exactly_max_deliveries() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let (rec, mut rx) = recorder();
    let rec = rec.failing(|d| {
        (summary(d) == "result 1").then(|| HandlerError::Transient(format!("boom on delivery {}", d.deliveries)))
    });
    let mut cfg = config(GROUP, "orch-1");
    cfg.max_deliveries = 4;
    let consumer = spawn(&server, cfg, rec.clone());
    let entries = publisher
        .publish_batch(&[(stream.clone(), result(0)), (stream.clone(), result(1)), (stream.clone(), result(2))])
        .await
        .unwrap();
    let poison_entry = entries[1].clone();

    let got = take(&mut rx, 2, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "the poison entry is in fleet:dlq", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::DLQ).await == 1 }
    })
    .await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;

    assert_eq!(
        got.iter().map(|g| g.summary.as_str()).collect::<BTreeSet<_>>(),
        BTreeSet::from(["result 0", "result 2"])
    );
    let poison_calls: Vec<u64> = rec.calls().iter().filter(|g| g.summary == "result 1").map(|g| g.deliveries).collect();
    assert_eq!(poison_calls, vec![1, 2, 3, 4], "called exactly max_deliveries times");
    assert_eq!(load(&stats.dead_lettered), 1);
    assert_eq!(load(&stats.handler_failures), 4);
    assert_eq!(load(&stats.handled), 2);

    let original = read_stream(&mut c, streams::RESULTS).await.into_iter().find(|r| r.id == poison_entry).unwrap();
    let dlq = read_stream(&mut c, streams::DLQ).await;
    let [dead] = &dlq[..] else { panic!("one DLQ entry: {dlq:?}") };
    assert_eq!(dead.text(fields::STREAM), streams::RESULTS);
    assert_eq!(dead.text(fields::ENTRY), poison_entry);
    assert_eq!(dead.text(fields::GROUP), GROUP);
    assert_eq!(dead.text(fields::CONSUMER), "orch-1");
    assert_eq!(dead.text(fields::DELIVERIES), "4");
    let detail = dead.text(fields::DETAIL);
    assert!(detail.contains("failed 4 deliveries") && detail.contains("boom on delivery 4"), "{detail}");
    assert!(dead.text(fields::AT_MS).parse::<u64>().unwrap() > 0);
    assert_eq!(dead.bytes(ENV_FIELD), original.bytes(ENV_FIELD), "the original frame, byte for byte");
    assert_eq!(xlen(&mut c, streams::REJECTED).await, 0);
}

/// `HandlerError::Permanent` dead-letters at once: one call, delivery count 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_is_dead_lettered_at_once() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let (rec, mut rx) = recorder();
    let rec = rec.failing(|d| (summary(d) == "result 1").then(|| HandlerError::Permanent("cannot act on it".into())));
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec.clone());
    let entries = publisher
        .publish_batch(&[(stream.clone(), result(0)), (stream.clone(), result(1)), (stream.clone(), result(2))])
        .await
        .unwrap();

    take(&mut rx, 2, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "the entry is in fleet:dlq", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::DLQ).await == 1 }
    })
    .await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    let stats = consumer.stats.clone();
    consumer.shutdown().await;

    assert_eq!(rec.calls().iter().filter(|g| g.summary == "result 1").count(), 1, "no retry after a permanent failure");
    assert_eq!(load(&stats.dead_lettered), 1);
    let original = read_stream(&mut c, streams::RESULTS).await.into_iter().find(|r| r.id == entries[1]).unwrap();
    let dlq = read_stream(&mut c, streams::DLQ).await;
    let [dead] = &dlq[..] else { panic!("one DLQ entry: {dlq:?}") };
    assert_eq!(dead.text(fields::STREAM), streams::RESULTS);
    assert_eq!(dead.text(fields::ENTRY), entries[1]);
    assert_eq!(dead.text(fields::GROUP), GROUP);
    assert_eq!(dead.text(fields::DELIVERIES), "1");
    assert!(dead.text(fields::DETAIL).contains("permanent failure: cannot act on it"));
    assert_eq!(dead.bytes(ENV_FIELD), original.bytes(ENV_FIELD));
}

/// A consumer read entries (raw `XREADGROUP` as "dead") and vanished without acking them.
/// A live consumer takes them over once they have been idle for `claim_idle`, and
/// handles them (delivery 2); new entries meanwhile flow as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_consumer_are_taken_over_after_claim_idle() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let batch: Vec<_> = (0..20).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&batch).await.unwrap();
    let read_at = Instant::now();
    let dead_entries: BTreeSet<String> =
        read_as(&mut c, streams::RESULTS, GROUP, "dead", 100).await.into_iter().collect();
    assert_eq!(dead_entries.len(), 20);

    let (rec, mut rx) = recorder();
    let cfg = config(GROUP, "live");
    let claim_idle = cfg.claim_idle;
    let live = spawn(&server, cfg, rec.clone().named("live"));
    let batch: Vec<_> = (20..25).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&batch).await.unwrap();

    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < 25 {
        let g = tokio::time::timeout_at(deadline, rx.recv()).await.expect("25 deliveries within 15 s").unwrap();
        if dead_entries.contains(&g.entry) {
            assert!(read_at.elapsed() >= claim_idle, "taken over only after claim_idle: {g:?}");
            assert_eq!(g.deliveries, 2, "the dead consumer's read counted as delivery 1: {g:?}");
        } else {
            assert_eq!(g.deliveries, 1);
        }
        got.push(g);
    }
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    live.shutdown().await;
    got.extend(drain(&mut rx));
    assert_eq!(got.len(), 25);
    let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
    assert_eq!(numbers, (0..25).collect());
    assert_eq!(consumers(&mut c, streams::RESULTS, GROUP).await.get("dead"), Some(&0));
}

/// A consumer whose handler hangs holds a whole batch; another consumer of the group takes
/// all of it over after `claim_idle` and finishes it. The hung consumer still stops on
/// shutdown (after its grace period) without acknowledging anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_consumer_stuck_in_its_handler_are_taken_over() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let batch: Vec<_> = (0..10).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&batch).await.unwrap();

    let (stuck_rec, mut stuck_rx) = recorder();
    let stuck_rec = stuck_rec.named("stuck").slow(Duration::from_secs(3600));
    let mut cfg = config(GROUP, "stuck");
    cfg.grace = Duration::from_millis(200);
    let stuck = spawn(&server, cfg, stuck_rec.clone());
    eventually(Duration::from_secs(5), "the stuck consumer is in its first handler", || {
        let n = stuck_rec.call_count();
        async move { n == 1 }
    })
    .await;
    assert_eq!(pending_entries(&mut c, streams::RESULTS, GROUP).await.len(), 10, "it read all ten");

    let (rec, mut rx) = recorder();
    let rescuer = spawn(&server, config(GROUP, "rescuer"), rec.named("rescuer"));
    let mut got = take(&mut rx, 10, Duration::from_secs(15)).await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    assert_eq!(stuck_rec.call_count(), 1, "a hung handler holds up its own consumer");
    let stuck_stats = stuck.stats.clone();
    stuck.shutdown().await;
    rescuer.shutdown().await;
    got.extend(drain(&mut rx));

    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|g| g.deliveries == 2), "{got:?}");
    let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
    assert_eq!(numbers, (0..10).collect());
    assert_eq!(load(&stuck_stats.handled), 0);
    assert!(drain(&mut stuck_rx).is_empty());
}

/// A live consumer working through a batch whose handlers are each well under
/// `claim_idle`, but which together take longer, keeps its entries: nobody else in the
/// group takes over (and handles again) the entries still waiting in its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_consumer_working_through_a_slow_batch_keeps_its_entries() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let batch: Vec<_> = (0..10).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&batch).await.unwrap();

    // Ten handlers of 250 ms: 2.5 s for the batch, claim_idle 1 s.
    let (slow_rec, mut slow_rx) = recorder();
    let slow_rec = slow_rec.named("slow").slow(Duration::from_millis(250));
    let mut cfg = config(GROUP, "slow");
    cfg.batch = 10;
    let slow = spawn(&server, cfg, slow_rec.clone());
    eventually(Duration::from_secs(5), "the slow consumer is in its first handler", || {
        let n = slow_rec.call_count();
        async move { n >= 1 }
    })
    .await;
    let (other_rec, mut other_rx) = recorder();
    let other = spawn(&server, config(GROUP, "other"), other_rec.clone().named("other"));

    let mut got = take(&mut slow_rx, 10, Duration::from_secs(15)).await;
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(10)).await;
    slow.shutdown().await;
    other.shutdown().await;
    got.extend(drain(&mut slow_rx));
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|g| g.deliveries == 1), "{got:?}");
    assert_eq!(other_rec.calls(), vec![], "nothing was taken from the live consumer");
    assert!(drain(&mut other_rx).is_empty());
}

/// A poison entry of 300 KiB (within the verifier's limit, so its handler sees it and
/// fails for good) is dead-lettered as its first 4096 bytes plus its length and SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_poison_entry_is_kept_in_fleet_dlq_as_a_prefix_and_its_hash() {
    use sha2::Digest as _;
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = results_stream();
    let mut c = connect(&server).await;
    let (rec, _rx) = recorder();
    let rec = rec.failing(|_| Some(HandlerError::Permanent("x".repeat(10_000))));
    let consumer = spawn(&server, config(GROUP, "orch-1"), rec.clone());
    let mut big = result(1);
    if let envelope::Payload::TaskResult(r) = &mut big.payload {
        r.diff = Some(vec![b'+'; 300 * 1024]);
    }
    let entry = publisher.publish(&stream, &big).await.unwrap();
    eventually(Duration::from_secs(10), "the entry is in fleet:dlq", || {
        let mut c = c.clone();
        async move { xlen(&mut c, streams::DLQ).await == 1 }
    })
    .await;
    consumer.shutdown().await;

    let original = read_stream(&mut c, streams::RESULTS).await.into_iter().find(|r| r.id == entry).unwrap();
    let wire = original.bytes(ENV_FIELD).unwrap().to_vec();
    assert!(wire.len() > 300 * 1024);
    let dlq = read_stream(&mut c, streams::DLQ).await;
    let [dead] = &dlq[..] else { panic!("one DLQ entry: {dlq:?}") };
    assert_eq!(dead.text(fields::ENTRY), entry);
    assert_eq!(dead.bytes(ENV_FIELD).unwrap(), &wire[..4096], "exactly the first 4096 bytes");
    assert_eq!(dead.text(fields::ENV_LEN), wire.len().to_string());
    assert_eq!(dead.text(fields::ENV_SHA256), hex::encode(sha2::Sha256::digest(&wire)));
    assert_eq!(dead.text(fields::DETAIL).len(), bus::names::SIDE_DETAIL_MAX, "the handler's long error is cut");
}
