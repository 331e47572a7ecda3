//! Prometheus metrics: the `[metrics]` settings every long-running binary shares, and the
//! endpoint that serves a [`Registry`] at `GET /metrics`.
//!
//! The registry is `prometheus-client`'s (the Prometheus project's own Rust client): the
//! answer is OpenMetrics text, which Prometheus negotiates and scrapes natively. Figures
//! that live elsewhere (Redis's consumer-group lag, Postgres's outbox backlog) are read
//! by a [`Refresh`] hook right before each scrape's encoding, bounded by
//! [`REFRESH_BUDGET`], so a slow dependency costs a stale figure, never a failed scrape.
//!
//! Names follow Prometheus's conventions: a `fleet_` namespace, base units (`_seconds`),
//! `_total` on counters (added by the client), labels for dimensions, never for ids. Every
//! binary also serves `fleet_build_info{binary, version} 1`. docs/observability.md lists
//! every series.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
pub use prometheus_client;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

/// The `[metrics]` table of a binary's configuration (`FLEET_METRICS__LISTEN`,
/// `FLEET_METRICS__TOKEN` or `FLEET_METRICS__TOKEN_FILE`).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where to serve `GET /metrics` (`0.0.0.0:9464` in a container, so Prometheus on
    /// another host reaches it). Unset serves nothing: several processes of one host (the
    /// demo's) would otherwise fight over one default port.
    pub listen: Option<SocketAddr>,
    /// When set, a scrape must send `Authorization: Bearer <token>` (Prometheus's
    /// `authorization.credentials_file`); anything else gets 401.
    pub token: Option<SecretString>,
}

impl std::fmt::Debug for MetricsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| crate::REDACTED))
            .finish()
    }
}

/// The dotted name of the token setting, for each binary's list of secrets.
pub const TOKEN_SETTING: &str = "metrics.token";

/// The refresh before a scrape may take this long; past it the scrape answers with what
/// the registry holds (the figures of the previous refresh).
pub const REFRESH_BUDGET: Duration = Duration::from_secs(3);

/// Work run before each scrape, such as reading a consumer group's lag from Redis.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A refresh hook made from an async closure.
pub fn refresh<F, Fut>(f: F) -> Refresh
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// A registry with `fleet_build_info{binary, version} 1` in it.
pub fn registry(binary: &str) -> Registry {
    let mut registry = Registry::default();
    let info = Family::<[(&'static str, String); 2], Gauge>::default();
    info.get_or_create(&[("binary", binary.to_owned()), ("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
    registry.register("fleet_build_info", "Always 1; the labels name the binary and its version.", info);
    registry
}

/// The encoded registry, as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Encoding into a String only fails if a metric's own encoder does, which would be a
    // bug in a label type; an empty answer is the safe outcome.
    if let Err(e) = encode(&mut out, registry) {
        tracing::error!(error = %e, "Cannot encode the metrics.");
        out.clear();
    }
    out
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("setting `metrics.listen` ({addr}): cannot listen: {source}; choose a free address or port")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

#[derive(Clone)]
struct Endpoint {
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    /// SHA-256 of the token: compared in constant time, and the token itself is not kept.
    token: Option<[u8; 32]>,
}

/// Binds `settings.listen` (if set) and serves the registry there until `shutdown`. Returns
/// the bound address (a `:0` port resolved), or `None` when no address is configured.
pub async fn serve(
    settings: &MetricsSettings,
    registry: Registry,
    refresh: Option<Refresh>,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, BindError> {
    let Some(addr) = settings.listen else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| BindError { addr, source })?;
    let endpoint = Endpoint {
        registry: Arc::new(registry),
        refresh,
        token: settings.token.as_ref().map(|t| Sha256::digest(t.expose_secret().as_bytes()).into()),
    };
    let app = router(endpoint);
    tracing::info!(address = %bound, token = settings.token.is_some(), "Serving metrics at /metrics.");
    tokio::spawn(async move {
        let result = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = result {
            tracing::error!(error = %e, "The metrics endpoint stopped.");
        }
    });
    Ok(Some(bound))
}

fn router(endpoint: Endpoint) -> axum::Router {
    axum::Router::new().route("/metrics", get(scrape)).with_state(endpoint)
}

async fn scrape(State(endpoint): State<Endpoint>, headers: HeaderMap) -> Response {
    if let Some(expected) = &endpoint.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        let ok = given.is_some_and(|g| bool::from(g.ct_eq(expected)));
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this endpoint needs `Authorization: Bearer <metrics token>`\n",
            )
                .into_response();
        }
    }
    if let Some(refresh) = &endpoint.refresh
        && tokio::time::timeout(REFRESH_BUDGET, refresh()).await.is_err()
    {
        tracing::warn!("Refreshing the metrics took too long; serving the previous figures.");
    }
    let body = render(&endpoint.registry);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn get(addr: SocketAddr, auth: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        (status, out)
    }

    #[tokio::test]
    async fn serves_the_registry_after_its_refresh_and_stops_on_shutdown() {
        let mut registry = registry("test-binary");
        let refreshed = Counter::<u64>::default();
        registry.register("fleet_test_refreshes", "Refreshes.", refreshed.clone());
        let settings = MetricsSettings { listen: Some("127.0.0.1:0".parse().unwrap()), token: None };
        let shutdown = CancellationToken::new();
        let r = refreshed.clone();
        let hook = refresh(move || {
            let r = r.clone();
            async move {
                r.inc();
            }
        });
        let addr = serve(&settings, registry, Some(hook), shutdown.clone()).await.unwrap().unwrap();
        let (status, body) = get(addr, None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("content-type: application/openmetrics-text"), "{body}");
        assert!(body.contains("fleet_build_info{binary=\"test-binary\",version=\""), "{body}");
        assert!(body.contains("fleet_test_refreshes_total 1\n"), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        let (_, body) = get(addr, None).await;
        assert!(body.contains("fleet_test_refreshes_total 2\n"), "{body}");
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener closed on shutdown");
    }

    #[tokio::test]
    async fn a_token_is_required_when_set_and_never_printed() {
        let settings = MetricsSettings {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            token: Some(SecretString::from("s3cret-metrics-token")),
        };
        assert!(!format!("{settings:?}").contains("s3cret"), "{settings:?}");
        let addr = serve(&settings, registry("t"), None, CancellationToken::new()).await.unwrap().unwrap();
        for bad in [None, Some("Bearer wrong"), Some("Basic czNjcmV0LW1ldHJpY3MtdG9rZW4="), Some("Bearer ")] {
            let (status, body) = get(addr, bad).await;
            assert_eq!(status, 401, "{bad:?}: {body}");
            assert!(!body.contains("fleet_build_info"), "{body}");
            assert!(body.to_lowercase().contains("www-authenticate: bearer"), "{body}");
        }
        let (status, body) = get(addr, Some("Bearer s3cret-metrics-token")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("fleet_build_info"), "{body}");
    }

    #[tokio::test]
    async fn unset_listen_serves_nothing_and_a_taken_port_says_which_setting() {
        let none = serve(&MetricsSettings::default(), registry("t"), None, CancellationToken::new()).await.unwrap();
        assert_eq!(none, None);
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let settings = MetricsSettings { listen: Some(taken.local_addr().unwrap()), token: None };
        let e = serve(&settings, registry("t"), None, CancellationToken::new()).await.unwrap_err().to_string();
        assert!(e.starts_with("setting `metrics.listen` (127.0.0.1:"), "{e}");
        assert!(e.contains("choose a free address"), "{e}");
    }

    #[tokio::test]
    async fn a_slow_refresh_costs_freshness_not_the_scrape() {
        tokio::time::pause();
        let settings = MetricsSettings { listen: Some("127.0.0.1:0".parse().unwrap()), token: None };
        let hook = refresh(std::future::pending::<()>);
        let addr = serve(&settings, registry("t"), Some(hook), CancellationToken::new()).await.unwrap().unwrap();
        let (status, body) = get(addr, None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("fleet_build_info"), "{body}");
    }
}
