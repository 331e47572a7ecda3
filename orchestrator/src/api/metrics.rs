//! `GET /metrics`: Prometheus text format (0.0.4).
//!
//! - `fleet_api_requests_total{method, route, status}`: requests answered, by route
//!   template (`/v1/tasks/{id}`, never the id itself; `unmatched` for unknown paths).
//! - `fleet_tasks{state}`: tasks per state, every state listed (0 when none).
//! - `fleet_kill_epoch`, `fleet_halted`: the kill switch.
//! - `fleet_db_up`: 1 when the database answered this scrape (the task and kill-switch
//!   metrics are left out when it did not).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::state::TaskState;
use crate::tasks::{Engine, EngineError};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Metric names, in one place.
pub mod names {
    /// Counter of answered requests.
    pub const REQUESTS: &str = "fleet_api_requests_total";
    /// Gauge of tasks per state.
    pub const TASKS: &str = "fleet_tasks";
    /// Gauge of the kill epoch.
    pub const KILL_EPOCH: &str = "fleet_kill_epoch";
    /// Gauge: 1 while halted.
    pub const HALTED: &str = "fleet_halted";
    /// Gauge: 1 when the database answered the scrape.
    pub const DB_UP: &str = "fleet_db_up";
}

/// Request counters, keyed by (method, route, status).
#[derive(Debug, Default)]
pub struct Metrics {
    /// A std mutex: held for one map update, never across an await.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl Metrics {
    fn record(&self, method: &str, route: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *map.entry((method.to_owned(), route.to_owned(), status)).or_default() += 1;
    }

    /// The request counters, then the task and kill-switch gauges read through `engine`.
    pub async fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP {} HTTP requests answered, by route and status.", names::REQUESTS);
        let _ = writeln!(out, "# TYPE {} counter", names::REQUESTS);
        {
            let map = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for ((method, route, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "{}{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                    names::REQUESTS,
                    escape(route)
                );
            }
        }
        match read_fleet(engine).await {
            Ok((counts, epoch, halted)) => {
                let _ = writeln!(out, "# HELP {} Tasks by state.", names::TASKS);
                let _ = writeln!(out, "# TYPE {} gauge", names::TASKS);
                for state in TaskState::ALL {
                    let n = counts.get(state.as_str()).copied().unwrap_or(0);
                    let _ = writeln!(out, "{}{{state=\"{state}\"}} {n}", names::TASKS);
                }
                let _ = writeln!(out, "# HELP {} The kill switch's epoch.", names::KILL_EPOCH);
                let _ = writeln!(out, "# TYPE {} gauge", names::KILL_EPOCH);
                let _ = writeln!(out, "{} {epoch}", names::KILL_EPOCH);
                let _ = writeln!(out, "# HELP {} 1 while the fleet is halted by the kill switch.", names::HALTED);
                let _ = writeln!(out, "# TYPE {} gauge", names::HALTED);
                let _ = writeln!(out, "{} {}", names::HALTED, u8::from(halted));
                db_up(&mut out, 1);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Metrics cannot read the database.");
                db_up(&mut out, 0);
            }
        }
        out
    }
}

fn db_up(out: &mut String, up: u8) {
    let _ = writeln!(out, "# HELP {} 1 when the database answered this scrape.", names::DB_UP);
    let _ = writeln!(out, "# TYPE {} gauge", names::DB_UP);
    let _ = writeln!(out, "{} {up}", names::DB_UP);
}

async fn read_fleet(engine: &Engine) -> Result<(BTreeMap<String, i64>, u64, bool), EngineError> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state").fetch_all(engine.pool()).await?;
    let (epoch, halted) = engine.fleet_state().await?;
    Ok((rows.into_iter().collect(), epoch, halted))
}

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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
