//! The bus's Prometheus series against a real Redis: what a consumer counted, and its
//! group's lag and pending count as Redis reports them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bus::metrics::BusMetrics;
use common::*;
use envelope::streams;

/// The value of the series `line_start` (name and labels, as encoded) in `text`.
fn value(text: &str, line_start: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(line_start)).map(|v| v.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumers_counts_durations_lag_and_pending_are_exported() {
    let server = redis();
    let mut c = connect(&server).await;
    let results = streams::RESULTS;
    for n in 1..=3 {
        xadd_env(&mut c, results, &seal_dev(&result(n))).await;
    }
    xadd_env(&mut c, results, b"\x93not a frame").await;
    let wrong_type = seal_dev(&heartbeat(1));
    xadd_env(&mut c, results, &wrong_type).await;

    let (rec, mut rx) = recorder();
    let running = spawn(&server, config(GROUP, "orchestrator-1"), rec);
    let metrics = BusMetrics::new();
    metrics.watch(results, GROUP, running.stats.clone());
    let mut registry = telemetry::metrics::registry("bus-test");
    metrics.register(&mut registry);
    take(&mut rx, 3, Duration::from_secs(10)).await;
    eventually(Duration::from_secs(10), "both rejects are counted", || {
        let r = load(&running.stats.rejected);
        async move { r == 2 }
    })
    .await;
    running.shutdown().await;
    // A blocking read in flight when the consumer stopped stays on the server for up to
    // `block` (100 ms) and would take the next entry (pending, reclaimed later: not lost,
    // but not the "not read yet" this test counts).
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Two entries the group has not read yet, and one read by a consumer that never acks.
    for n in 4..=6 {
        xadd_env(&mut c, results, &seal_dev(&result(n))).await;
    }
    read_as(&mut c, results, GROUP, "orchestrator-2", 1).await;
    metrics.refresh(&mut c).await;
    let text = telemetry::metrics::render(&registry);

    let l = format!("{{stream=\"{results}\",group=\"{GROUP}\"}}");
    assert_eq!(value(&text, &format!("fleet_bus_handled_total{l}")).as_deref(), Some("3"), "{text}");
    assert_eq!(value(&text, &format!("fleet_bus_dead_lettered_total{l}")).as_deref(), Some("0"), "{text}");
    assert_eq!(value(&text, &format!("fleet_bus_handler_failures_total{l}")).as_deref(), Some("0"), "{text}");
    let rejected = |reason: &str| {
        value(&text, &format!("fleet_bus_rejected_total{{stream=\"{results}\",group=\"{GROUP}\",reason=\"{reason}\"}}"))
    };
    assert_eq!(rejected("decode").as_deref(), Some("1"), "{text}");
    assert_eq!(rejected("forbidden_type").as_deref(), Some("1"), "{text}");
    assert_eq!(value(&text, &format!("fleet_bus_handler_duration_seconds_count{l}")).as_deref(), Some("3"), "{text}");
    assert!(text.contains("fleet_bus_handler_duration_seconds_bucket{le=\"0.001\","), "{text}");
    assert_eq!(value(&text, &format!("fleet_bus_group_lag{l}")).as_deref(), Some("2"), "{text}");
    assert_eq!(value(&text, &format!("fleet_bus_group_pending{l}")).as_deref(), Some("1"), "{text}");
    assert_eq!(value(&text, "fleet_bus_redis_up").as_deref(), Some("1"), "{text}");
    assert!(text.contains("# TYPE fleet_bus_handler_duration_seconds histogram"), "{text}");

    // Redis gone: the figures stay, and the scrape says Redis was not reached.
    drop(server);
    metrics.refresh(&mut c).await;
    let text = telemetry::metrics::render(&registry);
    assert_eq!(value(&text, "fleet_bus_redis_up").as_deref(), Some("0"), "{text}");
    assert_eq!(value(&text, &format!("fleet_bus_group_lag{l}")).as_deref(), Some("2"), "{text}");
}
