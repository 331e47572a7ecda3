//! The relay's configuration, loaded by `fleetconf`: the TOML file (optional), then
//! `FLEET_<KEY>` for every setting, then `FLEET_DATABASE_URL_FILE` and
//! `FLEET_REDIS_URL_FILE` for the secret URLs.
//!
//! The environment is passed in ([`Config::load`] takes a `fleetconf::Env`), so tests
//! never touch `std::env`. Every error names the setting that is wrong, and none ever
//! contains a secret.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Settings that are secrets: also read from `FLEET_<KEY>_FILE`.
pub const SECRETS: &[&str] = &["database_url", "redis_url", telemetry::metrics::TOKEN_SETTING];

/// The configuration file as written. Every field is optional except the two URLs (which
/// may come from the environment instead); defaults are in [`RelayConfig::default`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// `postgres://user:password@host/db`. Secret: may carry a password.
    database_url: Option<SecretString>,
    /// `redis://outbox-relay:password@host:6379`. Secret: may carry a password.
    redis_url: Option<SecretString>,
    /// PEM file of the CA that signs the Redis server's certificate (`rediss://` only).
    redis_ca_file: Option<std::path::PathBuf>,
    /// Rows claimed per transaction.
    batch_size: Option<u32>,
    /// How often the outbox is polled when no notification arrives (a missed `NOTIFY`).
    poll_interval_ms: Option<u64>,
    /// Dispatched rows older than this are deleted.
    retention_secs: Option<u64>,
    /// How often dispatched rows are pruned.
    prune_interval_secs: Option<u64>,
    /// Rows deleted per pruning statement.
    prune_batch: Option<u32>,
    /// On shutdown, how long the batch in flight may take to finish.
    shutdown_grace_ms: Option<u64>,
    /// How long a stream that refused a publish (backpressure) is left alone.
    backpressure_pause_ms: Option<u64>,
    /// First retry delay after a Postgres or Redis failure; doubles up to `retry_max_ms`.
    retry_min_ms: Option<u64>,
    /// Longest retry delay after failures.
    retry_max_ms: Option<u64>,
    /// Postgres connections: one listens, one claims, one prunes.
    pg_max_connections: Option<u32>,
    /// Redis connections (the publisher multiplexes one; the pool refills it after errors).
    redis_pool_size: Option<usize>,
    /// Approximate `MAXLEN` of streams not in `stream_caps`.
    default_stream_cap: Option<u64>,
    /// Approximate `MAXLEN` per stream.
    stream_caps: Option<BTreeMap<String, u64>>,
    /// The Prometheus endpoint (`listen`, `token`); none when `listen` is unset.
    #[serde(default)]
    metrics: telemetry::metrics::MetricsSettings,
}

/// Where the relay connects. `Debug` prints the URLs as `**REDACTED**`.
#[derive(Clone)]
pub struct Endpoints {
    /// The orchestrator's database (the `outbox` table).
    pub database_url: SecretString,
    /// The Redis the fleet's streams live on.
    pub redis_url: SecretString,
    /// The CA of the Redis server's certificate, for `rediss://`; `None` trusts the system's roots.
    pub redis_ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints").field("database_url", &"**REDACTED**").field("redis_url", &"**REDACTED**").finish()
    }
}

/// The relay's tunables; everything but where to connect.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed (and `XADD`ed in one pipeline) per transaction. Larger batches amortise
    /// round trips; smaller ones shorten the time row locks and the transaction's xid are
    /// held (which holds back the visibility horizon of every other relay).
    pub batch_size: u32,
    /// Fallback poll when no `NOTIFY` arrives; `LISTEN` is the normal wake-up.
    pub poll_interval: Duration,
    /// How long dispatched rows are kept (for inspection) before pruning.
    pub retention: Duration,
    /// How often pruning runs.
    pub prune_interval: Duration,
    /// Rows per `DELETE`, so pruning never holds many locks or one long transaction.
    pub prune_batch: u32,
    /// On shutdown, the batch in flight gets this long to be published and marked.
    pub shutdown_grace: Duration,
    /// A stream that answered [`bus::BusError::Backpressure`] is not claimed for this long;
    /// its rows stay in the outbox, other streams go on.
    pub backpressure_pause: Duration,
    /// First delay after a failed batch; doubles (with jitter) up to `retry_max`.
    pub retry_min: Duration,
    /// Longest delay between failed attempts.
    pub retry_max: Duration,
    /// Size of the Postgres pool (the listener keeps one connection for itself).
    pub pg_max_connections: u32,
    /// Size of the Redis pool.
    pub redis_pool_size: usize,
    /// Stream caps and backpressure, passed to the bus publisher.
    pub publisher: bus::PublisherConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            prune_interval: Duration::from_secs(300),
            prune_batch: 1000,
            shutdown_grace: Duration::from_secs(10),
            backpressure_pause: Duration::from_secs(1),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            pg_max_connections: 4,
            redis_pool_size: 4,
            publisher: bus::PublisherConfig::default(),
        }
    }
}

/// The whole configuration of the `outbox-relay` binary.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to connect.
    pub endpoints: Endpoints,
    /// How to behave.
    pub relay: RelayConfig,
    /// The Prometheus endpoint.
    pub metrics: telemetry::metrics::MetricsSettings,
}

/// A setting is missing or wrong. The message names it and never contains its value when
/// the value may be secret.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    /// The setting (file key or environment variable).
    pub setting: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    fn new(setting: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { setting: setting.into(), problem: problem.into() }
    }
}

impl Config {
    /// Loads the file at `path` (if any) under the environment `env`.
    pub fn load(path: Option<&std::path::Path>, env: &fleetconf::Env) -> Result<Self, ConfigError> {
        let file: File = fleetconf::Layers::new(path, env, SECRETS).extract().map_err(|e| ConfigError {
            setting: e.setting().unwrap_or("configuration").to_owned(),
            problem: e.0.clone(),
        })?;
        let missing = |key: &str| {
            let var = fleetconf::Env::variable_of(key);
            ConfigError::new(key, format!("missing (set it in the file, or with {var} or {var}_FILE)"))
        };
        let database_url = file.database_url.ok_or_else(|| missing("database_url"))?;
        let redis_url = file.redis_url.ok_or_else(|| missing("redis_url"))?;
        check_database_url(&database_url)?;
        check_redis_url(&redis_url)?;
        bus::RedisEndpoint::new(redis_url.clone(), file.redis_ca_file.as_deref())
            .map_err(|e| ConfigError::new("redis_ca_file", e.to_string()))?;

        let d = RelayConfig::default();
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        let mut publisher = bus::PublisherConfig::default();
        if let Some(cap) = file.default_stream_cap {
            publisher.default_cap = at_least("default_stream_cap", cap, 100)?;
        }
        for (stream, cap) in file.stream_caps.unwrap_or_default() {
            envelope::StreamName::parse(&stream)
                .map_err(|e| ConfigError::new(format!("stream_caps.{stream}"), e.to_string()))?;
            let cap = at_least(&format!("stream_caps.{stream}"), cap, 100)?;
            publisher.caps.insert(stream, cap);
        }
        let relay = RelayConfig {
            batch_size: within("batch_size", file.batch_size.unwrap_or(d.batch_size), 1, 10_000)?,
            poll_interval: file
                .poll_interval_ms
                .map(|v| at_least("poll_interval_ms", v, 1).map(ms))
                .transpose()?
                .unwrap_or(d.poll_interval),
            retention: file.retention_secs.map(secs).unwrap_or(d.retention),
            prune_interval: file
                .prune_interval_secs
                .map(|v| at_least("prune_interval_secs", v, 1).map(secs))
                .transpose()?
                .unwrap_or(d.prune_interval),
            prune_batch: within("prune_batch", file.prune_batch.unwrap_or(d.prune_batch), 1, 100_000)?,
            shutdown_grace: file.shutdown_grace_ms.map(ms).unwrap_or(d.shutdown_grace),
            backpressure_pause: file
                .backpressure_pause_ms
                .map(|v| at_least("backpressure_pause_ms", v, 1).map(ms))
                .transpose()?
                .unwrap_or(d.backpressure_pause),
            retry_min: file
                .retry_min_ms
                .map(|v| at_least("retry_min_ms", v, 1).map(ms))
                .transpose()?
                .unwrap_or(d.retry_min),
            retry_max: file.retry_max_ms.map(ms).unwrap_or(d.retry_max),
            pg_max_connections: within(
                "pg_max_connections",
                file.pg_max_connections.unwrap_or(d.pg_max_connections),
                3,
                1000,
            )?,
            redis_pool_size: within("redis_pool_size", file.redis_pool_size.unwrap_or(d.redis_pool_size), 1, 1000)?,
            publisher,
        };
        if relay.retry_max < relay.retry_min {
            return Err(ConfigError::new("retry_max_ms", "must not be below retry_min_ms"));
        }
        Ok(Config {
            endpoints: Endpoints { database_url, redis_url, redis_ca_file: file.redis_ca_file },
            relay,
            metrics: file.metrics,
        })
    }
}

fn within<T: PartialOrd + std::fmt::Display + Copy>(setting: &str, v: T, lo: T, hi: T) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::new(setting, format!("{v} is out of range ({lo} to {hi})")));
    }
    Ok(v)
}

fn at_least(setting: &str, v: u64, lo: u64) -> Result<u64, ConfigError> {
    if v < lo {
        return Err(ConfigError::new(setting, format!("{v} is too small (at least {lo})")));
    }
    Ok(v)
}

/// The URL must parse as Postgres connect options. The parser's message is not repeated:
/// it could quote the URL.
fn check_database_url(url: &SecretString) -> Result<(), ConfigError> {
    let text = url.expose_secret();
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err(ConfigError::new("database_url", "must be a postgres:// or postgresql:// URL"));
    }
    text.parse::<sqlx::postgres::PgConnectOptions>()
        .map(drop)
        .map_err(|_| ConfigError::new("database_url", "is not a valid PostgreSQL URL"))
}

fn check_redis_url(url: &SecretString) -> Result<(), ConfigError> {
    // The bus's own parser: it knows cluster URLs (`redis+cluster://a:6379,b:6379`) too.
    bus::RedisEndpoint::new(url.clone(), None).map(drop).map_err(|_| {
        ConfigError::new(
            "redis_url",
            "is not a valid Redis URL (redis://[user:password@]host[:port][/db], or \
             redis+cluster://[user:password@]host:port[,host:port...] for a Redis Cluster)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "database_url = \"postgres://relay:pw@127.0.0.1/fleet\"\nredis_url = \"redis://127.0.0.1:6379\"\n";

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        Config::load(Some(file.path()), &fleetconf::Env::from_pairs(env.iter().copied()))
    }

    #[test]
    fn defaults_apply() {
        let c = parse(MINIMAL, &[]).expect("valid");
        assert_eq!(c.relay.batch_size, 256);
        assert_eq!(c.relay.poll_interval, Duration::from_secs(1));
        assert_eq!(c.relay.retention, Duration::from_secs(86_400));
    }

    #[test]
    fn environment_overrides_the_file() {
        let c =
            parse(MINIMAL, &[("FLEET_REDIS_URL", "redis://other:7000"), ("FLEET_BATCH_SIZE", "17")]).expect("valid");
        assert_eq!(c.endpoints.redis_url.expose_secret(), "redis://other:7000");
        assert_eq!(c.relay.batch_size, 17);
        let c = parse("redis_url = \"redis://h\"", &[("FLEET_DATABASE_URL", "postgres://x@h/db")])
            .expect("URL from the environment");
        assert_eq!(c.endpoints.database_url.expose_secret(), "postgres://x@h/db");
        let secret = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(secret.path(), "postgres://y@h/db\n").expect("write");
        let path = secret.path().display().to_string();
        let c = Config::load(
            None,
            &fleetconf::Env::from_pairs([("FLEET_DATABASE_URL_FILE", path.as_str()), ("FLEET_REDIS_URL", "redis://h")]),
        )
        .expect("no file, the secret from a file");
        assert_eq!(c.endpoints.database_url.expose_secret(), "postgres://y@h/db");
    }

    #[test]
    fn errors_name_the_setting() {
        let cases = [
            ("redis_url = \"redis://h\"", "database_url"),
            (&format!("{MINIMAL}batch_size = 0"), "batch_size"),
            (&format!("{MINIMAL}bacth_size = 10"), "bacth_size"),
            (&format!("{MINIMAL}batch_size = \"many\""), "batch_size"),
            (&format!("{MINIMAL}poll_interval_ms = 0"), "poll_interval_ms"),
            (&format!("{MINIMAL}[stream_caps]\n\"tasks\" = 1000"), "stream_caps.tasks"),
            ("database_url = \"mysql://u:secretpw@h/db\"\nredis_url = \"redis://h\"", "database_url"),
            ("database_url = \"postgres://h/db\"\nredis_url = \"http://u:secretpw@h\"", "redis_url"),
        ];
        for (text, setting) in cases {
            let e = parse(text, &[]).expect_err(text);
            assert_eq!(e.setting, setting, "{text}: {e}");
            assert!(!e.to_string().contains("secretpw"), "{e}");
        }
    }

    fn root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// `docs/deployment.md` has a row for every setting the loader accepts.
    #[test]
    fn every_setting_has_a_row_in_docs_deployment_md() {
        let probe = |text: &str| parse(text, &[]).err().map(|e| e.to_string());
        let settings = fleetconf::settings::discover(&probe);
        for key in ["database_url", "redis_ca_file", "stream_caps", "batch_size"] {
            assert!(settings.contains(key), "{key} was not discovered: {settings:?}");
        }
        let doc = std::fs::read_to_string(root().join("docs/deployment.md")).expect("docs/deployment.md");
        let problems = fleetconf::settings::undocumented(&doc, "outbox-relay", &settings, SECRETS);
        assert!(problems.is_empty(), "docs/deployment.md is out of date:\n{}", problems.join("\n"));
    }

    /// `config/examples/outbox-relay.toml` loads, with the URLs from the environment as the
    /// example says (the database's from a file).
    #[test]
    fn the_example_configuration_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = dir.path().join("database-url");
        std::fs::write(
            &url,
            "postgres://fleet_relay:pw@127.0.0.1:5432/agentfleet?sslmode=verify-full&sslrootcert=/ca.pem\n",
        )
        .expect("write");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, fleet_testkit::tls::TestCa::new().cert_pem).expect("write");
        let env = fleetconf::Env::from_pairs([
            ("FLEET_DATABASE_URL_FILE", url.display().to_string()),
            ("FLEET_REDIS_URL", "rediss://outbox-relay:pw@127.0.0.1:6380".to_owned()),
            ("FLEET_REDIS_CA_FILE", ca.display().to_string()),
        ]);
        let c = Config::load(Some(&root().join("config/examples/outbox-relay.toml")), &env)
            .unwrap_or_else(|e| panic!("config/examples/outbox-relay.toml does not load: {e}"));
        assert_eq!(c.relay.batch_size, RelayConfig::default().batch_size);
        assert_eq!(c.relay.publisher.caps.get("fleet:tasks:dev"), Some(&200_000));
        assert!(c.endpoints.redis_ca_file.is_some());
    }

    #[test]
    fn debug_redacts_urls() {
        let c = parse(MINIMAL, &[]).expect("valid");
        let text = format!("{c:?}");
        assert!(!text.contains("pw@"), "{text}");
        assert!(text.contains("REDACTED"));
    }
}
