//! The bus's Prometheus series: each consumer's counters and handler durations, and its
//! group's lag and pending count as Redis reports them.
//!
//! The counters are the [`ConsumerStats`] every [`crate::Consumer`] keeps anyway; a
//! [`BusMetrics`] only remembers which stats belong to which (stream, group) and encodes
//! them on each scrape, so nothing is counted twice. Lag and pending live in Redis:
//! [`BusMetrics::refresh`] reads them with one `XINFO GROUPS` per stream (a command every
//! consumer's ACL user holds), run by the metrics endpoint right before it encodes.
//!
//! Series (labels `stream`, `group`; `reason` on rejections):
//! - `fleet_bus_handled_total`, `fleet_bus_rejected_total{reason}`,
//!   `fleet_bus_dead_lettered_total`, `fleet_bus_handler_failures_total`,
//!   `fleet_bus_already_done_total`, `fleet_bus_reconnects_total`;
//! - `fleet_bus_handler_duration_seconds` (histogram);
//! - `fleet_bus_group_lag` (entries not yet delivered to the group), `fleet_bus_group_pending`
//!   (delivered, not acknowledged);
//! - `fleet_bus_redis_up`: 1 when the last refresh reached Redis.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use redis::aio::ConnectionLike;

use crate::consumer::ConsumerStats;
use crate::reply;

/// (stream, group)
type Key = (String, String);

#[derive(Debug, Default)]
struct Inner {
    watched: Mutex<BTreeMap<Key, Arc<ConsumerStats>>>,
    /// The last refresh's (lag, pending) per group; lag is absent when Redis cannot tell
    /// (after an `XDEL` or trim past the group's position).
    groups: Mutex<BTreeMap<Key, (Option<u64>, u64)>>,
    redis_up: AtomicBool,
}

/// Which consumer stats this process exports; cheap to clone (one shared set).
#[derive(Debug, Clone, Default)]
pub struct BusMetrics(Arc<Inner>);

impl BusMetrics {
    /// An empty set; [`BusMetrics::register`] puts it in a registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Exports `stats` as the consumer of `group` on `stream`. One process has one consumer
    /// per (stream, group); a second one for the same pair replaces the first.
    pub fn watch(&self, stream: &str, group: &str, stats: Arc<ConsumerStats>) {
        lock(&self.0.watched).insert((stream.to_owned(), group.to_owned()), stats);
    }

    /// Adds the bus series to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(Encoder(Arc::clone(&self.0))));
    }

    /// Reads every watched group's lag and pending count from Redis. A failure is logged
    /// and leaves the previous figures (and `fleet_bus_redis_up 0`).
    pub async fn refresh<C: ConnectionLike + Send>(&self, c: &mut C) {
        let keys: Vec<Key> = lock(&self.0.watched).keys().cloned().collect();
        let mut streams: Vec<&str> = keys.iter().map(|(s, _)| s.as_str()).collect();
        streams.dedup();
        let mut up = true;
        for stream in streams {
            match groups_of(c, stream).await {
                Ok(found) => {
                    let mut groups = lock(&self.0.groups);
                    for (group, figures) in found {
                        let key = (stream.to_owned(), group);
                        if keys.contains(&key) {
                            groups.insert(key, figures);
                        }
                    }
                }
                Err(e) => {
                    up = false;
                    tracing::warn!(stream, error = %e, "Metrics cannot read the stream's consumer groups.");
                }
            }
        }
        self.0.redis_up.store(up, Ordering::Relaxed);
    }
}

/// `XINFO GROUPS`: each group's name, lag and pending count. A stream that does not exist
/// yet has no groups.
async fn groups_of<C: ConnectionLike + Send>(
    c: &mut C,
    stream: &str,
) -> Result<Vec<(String, (Option<u64>, u64))>, crate::BusError> {
    let v: redis::RedisResult<redis::Value> = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(c).await;
    let v = match v {
        Ok(v) => v,
        Err(e) if e.to_string().contains("no such key") => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for info in reply::info_maps("XINFO GROUPS", &v)? {
        let Some(name) = reply::info_get(&info, "name").and_then(reply::text) else { continue };
        let lag = reply::info_get(&info, "lag").and_then(reply::int).map(|l| l.max(0) as u64);
        let pending = reply::info_get(&info, "pending").and_then(reply::int).unwrap_or(0).max(0) as u64;
        out.push((name, (lag, pending)));
    }
    Ok(out)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct Encoder(Arc<Inner>);

type Counters = [(&'static str, &'static str, fn(&ConsumerStats) -> &AtomicU64); 5];

const COUNTERS: Counters = [
    ("fleet_bus_handled", "Entries whose handler succeeded, acknowledged.", |s| &s.handled),
    ("fleet_bus_dead_lettered", "Entries copied to fleet:dlq after failing every delivery.", |s| &s.dead_lettered),
    ("fleet_bus_handler_failures", "Handler calls that returned an error (each attempt).", |s| &s.handler_failures),
    (
        "fleet_bus_already_done",
        "Redeliveries of entries already handled: acknowledged without running the handler again.",
        |s| &s.already_done,
    ),
    ("fleet_bus_reconnects", "Times the consumer lost Redis (or got an error) and started over.", |s| &s.reconnects),
];

impl Collector for Encoder {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let watched = lock(&self.0.watched).clone();
        let labels = |(stream, group): &Key| [("stream", stream.clone()), ("group", group.clone())];
        for (name, help, field) in COUNTERS {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (key, stats) in &watched {
                let l = labels(key);
                ConstCounter::new(field(stats).load(Ordering::Relaxed)).encode(m.encode_family(&l)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "fleet_bus_rejected",
                "Entries that failed verification, copied to fleet:rejected, by the verifier's reason code.",
                None,
                MetricType::Counter,
            )?;
            for ((stream, group), stats) in &watched {
                for (reason, n) in stats.rejected_by_reason() {
                    let l = [("stream", stream.clone()), ("group", group.clone()), ("reason", reason.to_owned())];
                    ConstCounter::new(n).encode(m.encode_family(&l)?)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "fleet_bus_handler_duration_seconds",
                "Seconds one handler call took (a whole worker step, for a task stream).",
                None,
                MetricType::Histogram,
            )?;
            for (key, stats) in &watched {
                let l = labels(key);
                stats.handler_seconds.encode(m.encode_family(&l)?)?;
            }
        }
        let groups = lock(&self.0.groups).clone();
        {
            let mut m = encoder.encode_descriptor(
                "fleet_bus_group_lag",
                "Entries in the stream not yet delivered to the group (Redis's XINFO GROUPS lag).",
                None,
                MetricType::Gauge,
            )?;
            for (key, (lag, _)) in &groups {
                if let Some(lag) = lag {
                    let l = labels(key);
                    ConstGauge::new(*lag as i64).encode(m.encode_family(&l)?)?;
                }
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "fleet_bus_group_pending",
                "Entries delivered to the group's consumers and not yet acknowledged.",
                None,
                MetricType::Gauge,
            )?;
            for (key, (_, pending)) in &groups {
                let l = labels(key);
                ConstGauge::new(*pending as i64).encode(m.encode_family(&l)?)?;
            }
        }
        let up = i64::from(self.0.redis_up.load(Ordering::Relaxed));
        let m = encoder.encode_descriptor(
            "fleet_bus_redis_up",
            "1 when the last refresh before a scrape reached Redis.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(up).encode(m)?;
        Ok(())
    }
}
