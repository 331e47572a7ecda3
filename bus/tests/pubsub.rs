//! Publish/subscribe against a real redis-server.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_100_with_payloads_checked() {
    let server = redis();
    let publisher = dev_publisher(&server);
    let stream = envelope::StreamName::parse(envelope::streams::RESULTS).unwrap();
    let (rec, mut rx) = recorder();
    let (stop, handle, stats) = spawn(&server, config("orchestrator", "orch-1"), rec);
    let batch: Vec<_> = (0..50).map(|n| (stream.clone(), result(n))).collect();
    publisher.publish_batch(&batch).await.unwrap();
    for n in 50..100 {
        publisher.publish(&stream, &result(n)).await.unwrap();
    }
    let mut got: Vec<String> = take(&mut rx, 100, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|(s, d, _)| {
            assert_eq!(d, 1);
            s
        })
        .collect();
    got.sort_by_key(|s| s.trim_start_matches("result ").parse::<u64>().unwrap());
    let want: Vec<String> = (0..100).map(|n| format!("result {n}")).collect();
    assert_eq!(got, want);
    stop.cancel();
    handle.await.unwrap();
    assert_eq!(stats.handled.load(std::sync::atomic::Ordering::Relaxed), 100);
    assert_eq!(stats.rejected.load(std::sync::atomic::Ordering::Relaxed), 0);
}
