//! The bus on a Redis Cluster of three primaries and three replicas (issue 16, item 1):
//! publish and consume, reclaim from a dead consumer, dead letters and replays, with the
//! side streams in other slots than the stream they come from; and a primary killed while
//! envelopes flow, with no acknowledged publish lost.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bus::{Consumer, KillEpoch, Publisher, PublisherConfig};
use common::*;
use envelope::{Role, StreamName, streams};
use fleet_testkit::RedisCluster;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

fn cluster() -> RedisCluster {
    RedisCluster::start()
        .expect("redis-server and redis-cli must be installed (apt-get install redis-server); tests never skip")
}

fn cluster_pool(cluster: &RedisCluster) -> bus::RedisPool {
    let pool = bus::pool(SecretString::from(cluster.url()), 16, Duration::from_secs(2)).expect("cluster pool");
    assert!(pool.is_cluster(), "a redis+cluster:// URL gives the cluster client");
    pool
}

fn spawn_on(pool: &bus::RedisPool, cfg: bus::ConsumerConfig, rec: Recorder) -> Running {
    let epoch = KillEpoch::new(0);
    let consumer =
        Consumer::new(cfg, pool.clone(), verifier(Role::Orchestrator), epoch.clone(), rec).expect("consumer");
    let stats = consumer.stats();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(consumer.run(stop.clone()));
    Running { stop, handle, stats, epoch }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_reclaim_dead_letter_and_replay_on_a_cluster() {
    let cluster = cluster();
    // The streams this test touches live on more than one node, so settles and batches
    // cross slots (the bus splits them into ordered per-slot runs).
    let nodes: BTreeSet<usize> = [streams::RESULTS, streams::HEARTBEATS, streams::REJECTED, streams::DLQ]
        .iter()
        .map(|s| cluster.primary_for(s).expect("primary"))
        .collect();
    assert!(nodes.len() >= 2, "the streams should span nodes: {nodes:?}");

    let pool = cluster_pool(&cluster);
    let mut c = pool.get().await.expect("connection");
    create_group(&mut c, streams::RESULTS, GROUP).await;

    // A consumer that read three entries and died: they are taken over.
    for n in 1000..1003 {
        xadd_env(&mut c, streams::RESULTS, &seal_dev(&result(n))).await;
    }
    assert_eq!(read_as(&mut c, streams::RESULTS, GROUP, "dead-1", 10).await.len(), 3);

    // 100 results, batched with heartbeats to another stream (another slot).
    let publisher = Publisher::new(pool.clone(), keyring(Role::Dev), PublisherConfig::default());
    let heartbeats = StreamName::parse(streams::HEARTBEATS).unwrap();
    for chunk in (0..100u64).collect::<Vec<_>>().chunks(10) {
        let mut batch = Vec::new();
        for n in chunk {
            batch.push((results_stream(), result(*n)));
            batch.push((heartbeats.clone(), heartbeat(*n)));
        }
        assert_eq!(publisher.publish_batch(&batch).await.expect("publish").len(), 20);
    }

    // A replay: the same signed frame twice.
    let replayed = seal_dev(&result(500));
    xadd_env(&mut c, streams::RESULTS, &replayed).await;
    xadd_env(&mut c, streams::RESULTS, &replayed).await;

    let (rec, mut rx) = recorder();
    let rec =
        rec.failing(|d| (summary(d) == "result 7").then(|| bus::HandlerError::Permanent("cannot act on it".into())));
    let mut cfg = config(GROUP, "orch-1");
    cfg.claim_idle = Duration::from_millis(300);
    let running = spawn_on(&pool, cfg, rec.clone());

    // 99 successes of the batch, 3 reclaimed, 1 of the replayed pair.
    let got = take(&mut rx, 103, Duration::from_secs(60)).await;
    let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
    let mut want: BTreeSet<u64> = (0..100).filter(|n| *n != 7).collect();
    want.extend([1000, 1001, 1002, 500]);
    assert_eq!(numbers, want);
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(30)).await;

    let rejected = read_stream(&mut c, streams::REJECTED).await;
    assert_eq!(rejected.len(), 1, "one replay rejected: {rejected:?}");
    assert_eq!(rejected[0].text("reason"), "replay");
    let dead = read_stream(&mut c, streams::DLQ).await;
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert!(dead[0].text("detail").contains("cannot act on it"), "{:?}", dead[0].text("detail"));
    assert_eq!(xlen(&mut c, streams::HEARTBEATS).await, 100);
    assert_eq!(rec.calls().iter().filter(|g| g.summary == "result 7").count(), 1, "a permanent failure is not retried");
    assert_eq!(load(&running.stats.rejected), 1);
    running.shutdown().await;

    // The replay guard's buckets live in the stream's slot, on its node.
    let mut node = bus::Conn::Single(
        redis::Client::open(cluster.node_url(cluster.primary_for(streams::RESULTS).unwrap()))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap(),
    );
    assert_eq!(guarded_ids(&mut node, streams::RESULTS, GROUP).await, 104, "one guard field per envelope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_flow_fails_over_and_no_acknowledged_publish_is_lost() {
    let mut cluster = cluster();
    let pool = cluster_pool(&cluster);
    let mut c = pool.get().await.expect("connection");
    create_group(&mut c, streams::RESULTS, GROUP).await;
    // The operator's setting: every publish waits until one replica holds its entry.
    let url = format!("{}/?wait_replicas=1&wait_timeout_ms=500", cluster.url());
    let durable = bus::pool(SecretString::from(url), 4, Duration::from_secs(2)).expect("pool");
    let publisher = Publisher::new(durable, keyring(Role::Dev), PublisherConfig::default());
    let (rec, mut rx) = recorder();
    let running = spawn_on(&pool, config_for(results_stream(), GROUP, "orch-1"), rec);

    // Publishing runs in its own task while the primary of the stream is killed, a replica
    // takes over, and the killed node comes back as the new primary's replica (until then
    // `WAIT 1` cannot be satisfied, so publishes fail and are retried, as they should).
    const N: u64 = 600;
    let victim = cluster.primary_for(streams::RESULTS).expect("primary");
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel(0u64);
    let publishing = tokio::spawn(async move {
        let mut failed_attempts = 0u32;
        for n in 0..N {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            loop {
                match publisher.publish(&results_stream(), &result(n)).await {
                    Ok(_) => {
                        let _ = acked_tx.send(n);
                        let _ = progress_tx.send(n);
                        break;
                    }
                    Err(e) => {
                        failed_attempts += 1;
                        assert!(tokio::time::Instant::now() < deadline, "publish {n} kept failing: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        failed_attempts
    });
    progress_rx.wait_for(|n| *n >= N / 3).await.expect("publishing reached a third");
    cluster.kill(victim);
    let promoted =
        tokio::task::block_in_place(|| cluster.wait_failover(streams::RESULTS, victim, Duration::from_secs(30)))
            .expect("a replica took over");
    assert_ne!(promoted, victim);
    tokio::task::block_in_place(|| cluster.restart(victim)).expect("the killed node comes back");
    let failed_attempts = tokio::time::timeout(Duration::from_secs(180), publishing)
        .await
        .expect("publishing finishes")
        .expect("the publishing task does not panic");
    assert!(failed_attempts > 0, "the kill interrupted publishing (else this test proved nothing)");
    let mut acknowledged = BTreeSet::new();
    while let Ok(n) = acked_rx.try_recv() {
        acknowledged.insert(n);
    }
    assert_eq!(acknowledged.len() as u64, N);

    // Every acknowledged publish is handled, despite the primary that took some of them dying.
    let mut handled = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while handled.len() < acknowledged.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(g)) => {
                handled.insert(number(&g.summary));
            }
            _ => break,
        }
    }
    let lost: Vec<&u64> = acknowledged.difference(&handled).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged publishes were lost: {:?}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    running.shutdown().await;
}

/// The slot of `fleet:results` (the stream, its group and its replay-guard buckets) moves
/// to another primary while envelopes are published and consumed: the clients follow `ASK`
/// while keys move and `MOVED` after, and every publish is handled, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_mid_flow_is_followed_through_ask_and_moved() {
    let cluster = std::sync::Arc::new(cluster());
    let pool = cluster_pool(&cluster);
    let mut c = pool.get().await.expect("connection");
    create_group(&mut c, streams::RESULTS, GROUP).await;
    let publisher = Publisher::new(pool.clone(), keyring(Role::Dev), PublisherConfig::default());
    let (rec, mut rx) = recorder();
    let running = spawn_on(&pool, config_for(results_stream(), GROUP, "orch-1"), rec.clone());

    let from = cluster.primary_for(streams::RESULTS).expect("primary");
    let to = (0..3)
        .map(|i| (from + 1 + i) % cluster.len())
        .find(|i| cluster.cli(*i, &["ROLE"]).is_ok_and(|r| r.starts_with("master")));
    let to = to.expect("another primary");
    const N: u64 = 400;
    let mut mover = None;
    for n in 0..N {
        if n == N / 4 {
            let cluster = std::sync::Arc::clone(&cluster);
            mover = Some(tokio::task::spawn_blocking(move || {
                cluster.migrate_slot_of(streams::RESULTS, to, Duration::from_millis(20))
            }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while let Err(e) = publisher.publish(&results_stream(), &result(n)).await {
            assert!(tokio::time::Instant::now() < deadline, "publish {n} kept failing: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    mover.expect("the move started").await.expect("the mover does not panic").expect("the slot moved");
    assert_eq!(cluster.primary_for(streams::RESULTS).expect("primary"), to, "the slot is on its new node");

    let got = take(&mut rx, N as usize, Duration::from_secs(60)).await;
    let numbers: BTreeSet<u64> = got.iter().map(|g| number(&g.summary)).collect();
    assert_eq!(numbers, (0..N).collect::<BTreeSet<_>>(), "every publish handled");
    wait_all_acked(&mut c, streams::RESULTS, GROUP, Duration::from_secs(30)).await;
    assert_eq!(load(&running.stats.rejected), 0, "nothing refused while the slot moved");
    running.shutdown().await;
    assert_eq!(rec.call_count(), N as usize, "no handler ran twice");
}
