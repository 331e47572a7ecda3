//! `GET /metrics`: the orchestrator's Prometheus series, as OpenMetrics text
//! (`prometheus-client`, like every other fleet binary; `telemetry::metrics`).
//!
//! - `fleet_api_requests_total{method, route, status}`: requests answered, by route
//!   template (`/v1/tasks/{id}`, never the id itself; `unmatched` for unknown paths).
//! - `fleet_tasks{state}`: tasks per state, every state listed (0 when none).
//! - `fleet_kill_epoch`, `fleet_halted`: the kill switch as the database records it.
//! - `fleet_outbox_backlog`, `fleet_outbox_oldest_age_seconds`: outbox rows not yet
//!   forwarded by the relay, and how long the oldest has waited (0 when none).
//! - `fleet_db_up`: 1 when the database answered this scrape (the figures above then keep
//!   the previous scrape's values).
//! - The bus's series of the orchestrator's consumers (`bus::metrics`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::state::TaskState;
use crate::tasks::{Engine, EngineError};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bus::metrics::BusMetrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The orchestrator's series and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<[(&'static str, String); 3], Counter>,
    tasks: Family<[(&'static str, &'static str); 1], Gauge>,
    kill_epoch: Gauge,
    halted: Gauge,
    backlog: Gauge,
    oldest: Gauge<f64, AtomicU64>,
    db_up: Gauge,
    /// The consumers' series; `App` hands it to `bus::Consumers`.
    bus: BusMetrics,
    /// The keyset reloader's series; `App` hands it to `bus::KeysetReloader`.
    keyset: bus::keyreload::KeysetMetrics,
    /// Where the consumer groups' lag is read.
    redis: bus::RedisPool,
}

impl Metrics {
    /// Every series registered, reading consumer groups through `redis`.
    pub fn new(redis: bus::RedisPool) -> Self {
        let mut registry = telemetry::metrics::registry("orchestrator");
        let requests = Family::default();
        registry.register(
            "fleet_api_requests",
            "HTTP requests answered, by route and status.",
            Family::clone(&requests),
        );
        let tasks = Family::default();
        registry.register("fleet_tasks", "Tasks by state.", Family::clone(&tasks));
        let kill_epoch = Gauge::default();
        registry.register(
            "fleet_kill_epoch",
            "The kill switch's epoch (each engagement raises it).",
            kill_epoch.clone(),
        );
        let halted = Gauge::default();
        registry.register("fleet_halted", "1 while the fleet is halted by the kill switch.", halted.clone());
        let backlog = Gauge::default();
        registry.register("fleet_outbox_backlog", "Outbox rows the relay has not forwarded yet.", backlog.clone());
        let oldest = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "fleet_outbox_oldest_age_seconds",
            "Seconds the oldest outbox row not yet forwarded has waited (0 when none).",
            oldest.clone(),
        );
        let db_up = Gauge::default();
        registry.register("fleet_db_up", "1 when the database answered this scrape.", db_up.clone());
        let bus = BusMetrics::new();
        bus.register(&mut registry);
        let keyset = bus::keyreload::KeysetMetrics::default();
        keyset.register(&mut registry);
        Self { registry, requests, tasks, kill_epoch, halted, backlog, oldest, db_up, bus, keyset, redis }
    }

    /// The keyset reloader's series, for `bus::KeysetReloader::with_metrics`.
    pub fn keyset(&self) -> bus::keyreload::KeysetMetrics {
        self.keyset.clone()
    }

    /// The consumers' series, for `bus::Consumers::with_metrics`.
    pub fn bus(&self) -> BusMetrics {
        self.bus.clone()
    }

    fn record(&self, method: &str, route: &str, status: u16) {
        self.requests
            .get_or_create(&[
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Reads the database's and Redis's figures, then encodes every series.
    pub async fn render(&self, engine: &Engine) -> String {
        let refresh = async {
            match read_fleet(engine).await {
                Ok(fleet) => {
                    for state in TaskState::ALL {
                        let n = fleet.counts.iter().find(|(s, _)| s == state.as_str()).map_or(0, |(_, n)| *n);
                        self.tasks.get_or_create(&[("state", state.as_str())]).set(n);
                    }
                    self.kill_epoch.set(fleet.epoch as i64);
                    self.halted.set(i64::from(fleet.halted));
                    self.backlog.set(fleet.backlog);
                    self.oldest.set(fleet.oldest_secs);
                    self.db_up.set(1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Metrics cannot read the database.");
                    self.db_up.set(0);
                }
            }
            match self.redis.get().await {
                Ok(mut c) => self.bus.refresh(&mut c).await,
                Err(e) => tracing::warn!(error = %e, "Metrics cannot reach Redis."),
            }
        };
        if tokio::time::timeout(telemetry::metrics::REFRESH_BUDGET, refresh).await.is_err() {
            tracing::warn!("Refreshing the metrics took too long; serving the previous figures.");
            self.db_up.set(0);
        }
        telemetry::metrics::render(&self.registry)
    }
}

struct Fleet {
    counts: Vec<(String, i64)>,
    epoch: u64,
    halted: bool,
    backlog: i64,
    oldest_secs: f64,
}

async fn read_fleet(engine: &Engine) -> Result<Fleet, EngineError> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state").fetch_all(engine.pool()).await?;
    let (backlog, oldest_secs): (i64, f64) = sqlx::query_as(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 \
         FROM outbox WHERE dispatched_at IS NULL",
    )
    .fetch_one(engine.pool())
    .await?;
    let (epoch, halted) = engine.fleet_state().await?;
    Ok(Fleet { counts, epoch, halted, backlog, oldest_secs: oldest_secs.max(0.0) })
}

/// Middleware: counts every answered request under its route template.
pub(crate) async fn count(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m,
        // Any token is a valid method: keep made-up ones from growing the label set.
        _ => "other",
    }
    .to_owned();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let response = next.run(request).await;
    metrics.record(&method, &route, response.status().as_u16());
    response
}
