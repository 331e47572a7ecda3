//! The operators' HTTP API (axum): task intake, listing, approval, workers' questions and
//! their answers, cancelling and retrying tasks, the kill switch, and
//! the health, readiness and metrics endpoints. docs/operations.md, "HTTP API", is the
//! operator's description; this is the implementer's.
//!
//! [`router`] builds the whole [`Router`] from an [`ApiState`], so tests drive it with
//! `router(state).oneshot(request)` and no socket; [`serve`] runs it on a listener until
//! a [`CancellationToken`] fires, then finishes the requests in flight.
//!
//! Every answer that is not a success carries a JSON body `{"error": "…"}` saying what is
//! wrong and what to do; none carries a secret, and causes the client cannot act on
//! (database, outbox) are logged, not shown.
//!
//! # Layout
//! - [`auth`]: the bearer tokens: claims, roles, issuing ([`auth::TokenKeys::issue`],
//!   also used by `fleetctl token issue`) and the extractors that check them.
//! - [`error`]: [`ApiError`], its status codes, and the JSON extractors whose rejections
//!   become JSON errors.
//! - [`ratelimit`]: the per-client token bucket in Redis that guards task intake.
//! - [`metrics`]: the series of `GET /metrics` (requests, tasks, kill switch, outbox,
//!   consumers).
//! - [`openapi`]: the OpenAPI document of these routes (`GET /v1/openapi.json`,
//!   docs/openapi.json).
//! - `handlers`: one function per route.

pub mod auth;
pub mod error;
mod handlers;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use secrecy::SecretString;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use error::ApiError;

use crate::tasks::Engine;

/// The API's settings, filled from top-level keys of the orchestrator's configuration
/// (`listen`, `jwt_secret_file`, `rate_limit_burst`, …; there is no `[api]` table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Where to listen. Loopback by default: put a TLS-terminating proxy in front of
    /// anything wider, since bearer tokens travel in every request.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The HS256 secret operator tokens are signed with (surrounding whitespace is
    /// ignored; at least 32 bytes). Whoever holds it can mint an admin token.
    pub jwt_secret: SecretString,
    /// Task submissions a client may make at once (the token bucket's capacity).
    #[serde(default = "default_burst")]
    pub rate_limit_burst: u32,
    /// Submissions per second a client gets back (the bucket's refill rate).
    #[serde(default = "default_per_second")]
    pub rate_limit_per_second: f64,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long a request may take before it is answered with 503, in seconds.
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_burst() -> u32 {
    10
}
fn default_per_second() -> f64 {
    1.0
}
fn default_max_body() -> usize {
    256 * 1024
}
fn default_timeout() -> u64 {
    30
}

impl ApiConfig {
    /// The defaults, with `jwt_secret`.
    pub fn new(jwt_secret: SecretString) -> Self {
        Self {
            listen: default_listen(),
            jwt_secret,
            rate_limit_burst: default_burst(),
            rate_limit_per_second: default_per_second(),
            max_body_bytes: default_max_body(),
            request_timeout_secs: default_timeout(),
        }
    }
}

/// A setting of [`ApiConfig`] that can't work; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("invalid API configuration: {0}")]
pub struct ApiConfigError(String);

/// What the handlers share. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Every change of task state goes through it.
    engine: Engine,
    /// Verifies bearer tokens.
    keys: Arc<auth::TokenKeys>,
    /// Guards `POST /v1/tasks`.
    limiter: ratelimit::RateLimiter,
    /// The series of `/metrics`.
    metrics: Arc<metrics::Metrics>,
    /// Largest body accepted.
    max_body_bytes: usize,
    /// Per-request time limit.
    timeout: Duration,
}

impl ApiState {
    /// The state for `engine`, with the rate limiter's buckets in `redis`. Fails on a
    /// setting that can't work (short secret, empty bucket, zero limits).
    pub fn new(engine: Engine, redis: bus::RedisPool, config: &ApiConfig) -> Result<Self, ApiConfigError> {
        let keys = auth::TokenKeys::new(&config.jwt_secret)
            .map_err(|e| ApiConfigError(format!("setting `jwt_secret_file`: {e}")))?;
        let metrics = Arc::new(metrics::Metrics::new(redis.clone()));
        let limiter = ratelimit::RateLimiter::new(redis, config.rate_limit_burst, config.rate_limit_per_second)
            .map_err(|e| ApiConfigError(e.to_string()))?;
        if config.max_body_bytes < 1024 {
            return Err(ApiConfigError("setting `max_body_bytes` must be at least 1024".into()));
        }
        if config.request_timeout_secs == 0 {
            return Err(ApiConfigError("setting `request_timeout_secs` must be at least 1".into()));
        }
        Ok(Self {
            engine,
            keys: Arc::new(keys),
            limiter,
            metrics,
            max_body_bytes: config.max_body_bytes,
            timeout: Duration::from_secs(config.request_timeout_secs),
        })
    }

    /// The engine behind the API.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The bus series served at `/metrics`, for the process's consumers.
    pub fn bus_metrics(&self) -> bus::metrics::BusMetrics {
        self.metrics.bus()
    }

    /// The keyset series served at `/metrics`, for the process's keyset reloader.
    pub fn keyset_metrics(&self) -> bus::keyreload::KeysetMetrics {
        self.metrics.keyset()
    }
}

/// The whole API. Layers, outermost first: tracing (method and path only, never
/// headers, so tokens stay out of the logs), request counting, JSON bodies for bare
/// error answers, the request timeout (503), and the body size limit.
pub fn router(state: ApiState) -> Router {
    let timeout = state.timeout;
    let max_body = state.max_body_bytes;
    let metrics = state.metrics.clone();
    Router::new()
        .route("/v1/tasks", post(handlers::submit).get(handlers::list))
        .route("/v1/tasks/{id}", get(handlers::get_task))
        .route("/v1/tasks/{id}/approve", post(handlers::approve))
        .route("/v1/tasks/{id}/answer", post(handlers::answer))
        .route("/v1/tasks/{id}/cancel", post(handlers::cancel))
        .route("/v1/tasks/{id}/retry", post(handlers::retry))
        .route("/v1/questions", get(handlers::questions))
        .route("/v1/openapi.json", get(handlers::openapi))
        .route("/v1/incidents", post(handlers::open_incident).get(handlers::incidents))
        .route("/v1/incidents/{id}", get(handlers::get_incident))
        .route("/v1/incidents/{id}/resolve", post(handlers::resolve_incident))
        .route("/v1/kill", post(handlers::kill))
        .route("/v1/resume", post(handlers::resume))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::no_route)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, timeout))
        .layer(axum::middleware::map_response(error::json_for_bare_errors))
        .layer(axum::middleware::from_fn_with_state(metrics, metrics::count))
        // 5xx at WARN: the causes an operator must act on are logged at ERROR where they happen.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting, lets the
/// requests in flight finish and returns. The caller caps that drain with its grace
/// period (requests themselves are capped by the request timeout).
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled_owned().await }).await
}
