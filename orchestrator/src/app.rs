//! Configuration and wiring of the `orchestrator` binary: [`Config::load`], then
//! [`App::build`], then [`App::run`] until shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bus::KillEpoch;
use envelope::{Instance, Keyset, PermissionTable, Role, StreamName, Verifier, VerifierConfig, streams};
use secrecy::SecretString;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiConfig, ApiState};
use crate::audit::AuditKey;
use crate::service::{Heartbeats, Questions, Results, tick_loop};
use crate::tasks::{Engine, EngineConfig};

/// Concurrent tool-request consumers (model calls in flight at once).
const TOOL_CONSUMERS: usize = 4;

/// Consumers of a worker role's task group with nothing pending and idle this long are
/// deleted by the orchestrator (workers' own consumers do not prune: they lack
/// `XGROUP DELCONSUMER`). A live worker reads every `block_ms`, so it is never this idle.
const WORKER_CONSUMERS_IDLE: Duration = Duration::from_secs(3600);

/// How often the orchestrator checks that Redis still holds its sentinel (that Redis did
/// not lose its data); a loss is recovered within this and one tick.
const SENTINEL_EVERY: Duration = Duration::from_secs(2);

/// How often the worker groups are looked at for idle consumers.
const WORKER_CONSUMERS_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The configuration file (TOML). Unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// This process's instance name (`orchestrator-0`).
    instance: String,
    /// Postgres URL (secret: it may carry a password).
    database_url: Option<SecretString>,
    /// Redis URL (secret: it may carry a password).
    redis_url: Option<SecretString>,
    /// PEM file of the CA that signs the Redis server's certificate (`rediss://` only);
    /// unset trusts the system's roots.
    redis_ca_file: Option<PathBuf>,
    /// The orchestrator's keyset (`fleetctl keys derive --process orchestrator`).
    keyset: PathBuf,
    /// Seconds between two reads of the keyset file; a changed file is put in force without
    /// a restart (SIGHUP reads it at once). Keep it well under `fleetctl keys rotate --wait`.
    #[serde(default = "default_keyset_reload")]
    keyset_reload_secs: u64,
    /// The permission table.
    #[serde(default = "default_permissions")]
    permissions: PathBuf,
    /// Hex file with the audit trail's HMAC key (`fleetctl audit key new`).
    audit_key_file: PathBuf,
    /// File with the secret that signs operator JWTs.
    jwt_secret_file: PathBuf,
    /// HTTP API address.
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    /// `retries.max_per_task`.
    #[serde(default = "default_max_retries")]
    max_retries: u32,
    /// Seconds a worker may stay silent on a step.
    #[serde(default = "default_step_deadline")]
    step_deadline_secs: u64,
    /// Seconds the worker holding a step may stay silent before a peer that reclaimed its
    /// task entry takes the step's lease over (below the workers' `claim_idle_secs`).
    #[serde(default = "default_takeover_after")]
    takeover_after_secs: u64,
    /// Seconds between deadline checks.
    #[serde(default = "default_tick")]
    tick_secs: u64,
    /// Task intake burst per client.
    #[serde(default = "default_burst")]
    rate_limit_burst: u32,
    /// Task intake refill per client per second.
    #[serde(default = "default_rate")]
    rate_limit_per_second: f64,
    /// Largest HTTP request body accepted, in bytes (at least 1024).
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    /// Seconds an HTTP request may take before it is answered with 503.
    #[serde(default = "default_request_timeout")]
    request_timeout_secs: u64,
    /// Seconds a running handler gets on shutdown.
    #[serde(default = "default_grace")]
    grace_secs: u64,
    /// Apply migrations at start. Set false when connecting as the application role
    /// (docs/operations.md): it may not create tables, so run `fleetctl db migrate` as the
    /// owner instead; audit partitions are still ensured.
    #[serde(default = "default_true")]
    migrate_on_start: bool,
    /// Workspaces are `<workspace_root>/task-<id>`; workers refuse one outside their own root.
    #[serde(default = "default_workspace_root")]
    workspace_root: String,
    /// Where a task's repository may come from (`[repositories]`): allowed https hosts,
    /// local roots, plaintext. Nothing by default.
    #[serde(default)]
    repositories: crate::repos::RepoPolicy,
    /// Four eyes: a HIGH or CRITICAL task needs an approver other than its submitter
    /// (HTTP 403 otherwise, audited). Turn off only where one person runs the fleet alone.
    #[serde(default = "default_true")]
    four_eyes: bool,
    /// The tool proxy and capability leases; without it workers get no leases and tool
    /// requests go unanswered.
    #[serde(default)]
    tools: Option<ToolsFile>,
}

/// `[tools]`: the tool proxy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsFile {
    /// File with the secret that signs capability leases (32+ characters).
    lease_secret_file: PathBuf,
    /// The risk matrix.
    #[serde(default = "default_risk_matrix")]
    risk_matrix: PathBuf,
    /// The budget ledger's limits and price table (TOML; see the budget crate).
    ledger: PathBuf,
    /// The model provider.
    provider: crate::providers::ProviderConfig,
    /// Which model each role uses.
    models: crate::proxy::ModelConfig,
    /// `git.push_branch`.
    #[serde(default)]
    git: crate::gitops::GitConfig,
}

fn default_workspace_root() -> String {
    "/workspace".into()
}

fn default_risk_matrix() -> PathBuf {
    "config/risk_matrix.toml".into()
}

/// The loaded `[tools]` section.
struct Tools {
    leases: crate::lease::LeaseKeys,
    matrix: Arc<crate::risk::RiskMatrix>,
    ledger: budget::ledger::LedgerConfig,
    provider: crate::providers::AnyProvider,
    models: crate::proxy::ModelConfig,
    git: crate::gitops::GitConfig,
}

impl Tools {
    /// `jwt_secret` is the API's token secret, which the lease secret must not be.
    fn load(file: ToolsFile, lease_ttl: Duration, env: &fleetconf::Env, jwt_secret: &str) -> Result<Self, ConfigError> {
        let secret = read(
            &file.lease_secret_file,
            "lease secret file",
            "create one with `fleetctl token secret new --for lease --out FILE`",
        )?;
        if secret.trim() == jwt_secret {
            return Err(ConfigError(
                "settings `tools.lease_secret_file` and `jwt_secret_file` hold the same secret: whoever could mint \
                 leases could mint admin tokens; make a lease secret of its own with `fleetctl token secret new --for lease`"
                    .into(),
            ));
        }
        let leases = crate::lease::LeaseKeys::new(&SecretString::from(secret.trim().to_owned()), lease_ttl)
            .map_err(|e| ConfigError(format!("setting `tools.lease_secret_file`: {e}")))?;
        let matrix = Arc::new(
            crate::risk::RiskMatrix::load(&file.risk_matrix)
                .map_err(|e| ConfigError(format!("setting `tools.risk_matrix`: {e}")))?,
        );
        let ledger = budget::ledger::LedgerConfig::from_toml(&read(
            &file.ledger,
            "ledger configuration",
            "point `tools.ledger` at the ledger's limits and prices (config/examples/ledger.toml, docs/deployment.md)",
        )?)
        .map_err(|e| ConfigError(format!("setting `tools.ledger` ('{}'): {e}", file.ledger.display())))?;
        for model in std::iter::once(&file.models.default).chain(file.models.per_role.values()) {
            if !ledger.prices.contains_key(model) {
                return Err(ConfigError(format!(
                    "model {model:?} has no price in '{}': add a [prices.{model}] table, or the ledger cannot meter it",
                    file.ledger.display()
                )));
            }
        }
        let provider = crate::providers::build_with_env(&file.provider, |k| env.get(k).map(str::to_owned))
            .map_err(|e| ConfigError(format!("setting `tools.provider`: {e}")))?;
        // The LLM reviewer is the second review only if it is a different model: the same
        // model that wrote a change shares its blind spots when it reviews it.
        if file.models.model_for(Role::Review) == file.models.model_for(Role::Dev) {
            tracing::warn!(
                model = file.models.model_for(Role::Dev),
                "The LLM reviewer uses the same model as Dev; set tools.models.per_role.review to another model."
            );
        }
        Ok(Self { leases, matrix, ledger, provider, models: file.models, git: file.git })
    }
}

fn default_true() -> bool {
    true
}

fn default_permissions() -> PathBuf {
    "config/permissions.toml".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_retries() -> u32 {
    3
}
fn default_step_deadline() -> u64 {
    300
}
fn default_takeover_after() -> u64 {
    30
}
fn default_tick() -> u64 {
    1
}
fn default_burst() -> u32 {
    10
}
fn default_rate() -> f64 {
    1.0
}
fn default_keyset_reload() -> u64 {
    bus::keyreload::DEFAULT_INTERVAL.as_secs()
}
fn default_grace() -> u64 {
    10
}
fn default_max_body() -> usize {
    256 * 1024
}
fn default_request_timeout() -> u64 {
    30
}

/// A configuration problem: the message names the setting and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Everything the orchestrator needs, loaded and checked.
pub struct Config {
    instance: Instance,
    database_url: SecretString,
    redis: bus::RedisEndpoint,
    keyset: Keyset,
    /// The keyset file and how often it is re-read.
    keyset_reload: (PathBuf, Duration),
    permissions: PermissionTable,
    audit_key: AuditKey,
    api: ApiConfig,
    engine: EngineConfig,
    tick: Duration,
    grace: Duration,
    migrate_on_start: bool,
    tools: Option<Tools>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("instance", &self.instance)
            .field("audit_key", &self.audit_key)
            .finish_non_exhaustive()
    }
}

/// Settings that are secrets: also read from `FLEET_<KEY>_FILE`.
pub const SECRETS: &[&str] = &["database_url", "redis_url", "tools.provider.api_key"];

/// `keyset_reload_secs` as a duration: 1 s to 1 h.
fn reload_interval(secs: u64) -> Result<Duration, ConfigError> {
    if !(1..=3600).contains(&secs) {
        return Err(ConfigError(format!(
            "setting `keyset_reload_secs` is {secs}: it must be 1 to 3600 (seconds between reads of the keyset file)"
        )));
    }
    Ok(Duration::from_secs(secs))
}

fn read(path: &Path, what: &str, fix: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {what} '{}': {e}; {fix}", path.display())))
}

impl Config {
    /// Where the HTTP API listens.
    pub fn listen(&self) -> SocketAddr {
        self.api.listen
    }

    /// Loads the file at `path` (if any) under the environment `env` (passed in, so tests
    /// never touch the process environment).
    pub fn load(path: Option<&Path>, env: &fleetconf::Env) -> Result<Self, ConfigError> {
        let file: FileConfig = fleetconf::Layers::new(path, env, SECRETS).extract().map_err(|e| ConfigError(e.0))?;
        let instance = Instance::parse(&file.instance).map_err(|e| ConfigError(format!("setting `instance`: {e}")))?;
        let missing = |key: &str| {
            let var = fleetconf::Env::variable_of(key);
            ConfigError(format!(
                "setting `{key}` is missing: set it in the configuration file or with {var} or {var}_FILE"
            ))
        };
        let database_url = file.database_url.ok_or_else(|| missing("database_url"))?;
        let redis_url = file.redis_url.ok_or_else(|| missing("redis_url"))?;
        let redis = bus::RedisEndpoint::new(redis_url, file.redis_ca_file.as_deref())
            .map_err(|e| ConfigError(format!("setting `redis_url` / `redis_ca_file`: {e}")))?;
        let keyset = Keyset::parse(&read(
            &file.keyset,
            "keyset",
            "derive it with `fleetctl keys derive --process orchestrator`",
        )?)
        .map_err(|e| ConfigError(format!("setting `keyset` ('{}'): {e}", file.keyset.display())))?;
        if keyset.process != envelope::Process::Role(Role::Orchestrator) {
            return Err(ConfigError(format!(
                "setting `keyset`: '{}' is the keyset of {}, not of the orchestrator",
                file.keyset.display(),
                keyset.process
            )));
        }
        let permissions = PermissionTable::parse(&read(
            &file.permissions,
            "permission file",
            "set `permissions` to config/permissions.toml",
        )?)
        .map_err(|e| ConfigError(format!("setting `permissions`: {e}")))?;
        let audit_key = AuditKey::from_hex(&read(
            &file.audit_key_file,
            "audit key file",
            "create one with `fleetctl audit key new`",
        )?)
        .map_err(|e| ConfigError(format!("setting `audit_key_file`: {e}")))?;
        let jwt =
            read(&file.jwt_secret_file, "JWT secret file", "create one with `fleetctl token secret new --out FILE`")?;
        if jwt.trim().len() < 32 {
            return Err(ConfigError("setting `jwt_secret_file`: the secret must be at least 32 characters".into()));
        }
        let mut api = ApiConfig::new(SecretString::from(jwt.trim().to_owned()));
        api.listen = file.listen;
        api.rate_limit_burst = file.rate_limit_burst;
        api.rate_limit_per_second = file.rate_limit_per_second;
        api.max_body_bytes = file.max_body_bytes;
        api.request_timeout_secs = file.request_timeout_secs;
        if file.max_body_bytes < 1024 {
            return Err(ConfigError("setting `max_body_bytes` must be at least 1024".into()));
        }
        if file.request_timeout_secs == 0 || file.rate_limit_burst == 0 {
            return Err(ConfigError(
                "settings `request_timeout_secs` and `rate_limit_burst` must be at least 1".into(),
            ));
        }
        if !(file.rate_limit_per_second.is_finite() && file.rate_limit_per_second > 0.0) {
            return Err(ConfigError("setting `rate_limit_per_second` must be a positive number".into()));
        }
        if file.step_deadline_secs == 0 || file.tick_secs == 0 || file.takeover_after_secs == 0 {
            return Err(ConfigError(
                "settings `step_deadline_secs`, `takeover_after_secs` and `tick_secs` must be at least 1".into(),
            ));
        }
        let mut engine = EngineConfig::new(instance.clone());
        engine.max_retries = file.max_retries;
        engine.step_deadline = Duration::from_secs(file.step_deadline_secs);
        engine.takeover_after = Duration::from_secs(file.takeover_after_secs);
        if !file.workspace_root.starts_with('/') {
            return Err(ConfigError("setting `workspace_root` must be an absolute path".into()));
        }
        engine.workspace_root = file.workspace_root.trim_end_matches('/').to_owned();
        if let Some(bad) = file.repositories.local_roots.iter().find(|r| !r.is_absolute()) {
            return Err(ConfigError(format!(
                "setting `repositories.local_roots`: {} is not an absolute path",
                bad.display()
            )));
        }
        engine.repositories = file.repositories;
        engine.four_eyes = file.four_eyes;
        let tools = file.tools.map(|t| Tools::load(t, engine.assign_ttl, env, jwt.trim())).transpose()?;
        Ok(Self {
            instance,
            database_url,
            redis,
            keyset,
            keyset_reload: (file.keyset.clone(), reload_interval(file.keyset_reload_secs)?),
            permissions,
            audit_key,
            api,
            engine,
            tick: Duration::from_secs(file.tick_secs),
            grace: Duration::from_secs(file.grace_secs),
            migrate_on_start: file.migrate_on_start,
            tools,
        })
    }
}

/// The running orchestrator's parts.
pub struct App {
    engine: Engine,
    redis: bus::RedisPool,
    verifier: Arc<Verifier>,
    /// Puts a changed keyset file into the verifier's keyring.
    reloader: Option<bus::KeysetReloader>,
    listener: tokio::net::TcpListener,
    router: axum::Router,
    /// The consumers' series, served by the API's `/metrics`.
    bus_metrics: bus::metrics::BusMetrics,
    instance: Instance,
    tick: Duration,
    grace: Duration,
    proxy: Option<(crate::proxy::ToolProxy, Arc<crate::risk::RiskMatrix>, crate::gitops::GitConfig)>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl App {
    /// Connects, migrates, binds the listener.
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let pool = crate::db::connect(&cfg.database_url, 16).await.context("Failed to connect to Postgres")?;
        if cfg.migrate_on_start {
            crate::db::migrate(&pool).await.context("Failed to apply the database migrations")?;
        } else {
            crate::db::ensure_audit_partitions(&pool)
                .await
                .context("Failed to create this and next month's audit partitions")?;
        }
        let redis = bus::pool(&cfg.redis, 16, Duration::from_secs(2)).context("Failed to set up the Redis pool")?;
        // The verifier and the engine's outbox follow the keyset file (docs/keys.md,
        // Rotation): the engine takes a plain `Keyring`, so it gets one that follows `live`.
        let live = envelope::LiveKeyring::new(cfg.keyset.into_keyring());
        let keyring = Arc::new(envelope::Keyring::following(&live));
        let (keyset_path, reload_every) = cfg.keyset_reload;
        let reloader = bus::KeysetReloader::new(
            keyset_path,
            envelope::Process::Role(Role::Orchestrator),
            live.clone(),
            reload_every,
        );
        let verifier = Arc::new(Verifier::new(live, cfg.permissions, VerifierConfig::default()));
        let mut engine = Engine::new(pool, keyring, cfg.audit_key, cfg.engine);
        let mut proxy = None;
        if let Some(t) = cfg.tools {
            let issuer = crate::lease::LeaseIssuer {
                keys: t.leases.clone(),
                matrix: t.matrix.clone(),
                per_task_tokens: t.ledger.per_task_tokens,
                per_task_micro_usd: t.ledger.per_task_micro_usd.0,
            };
            engine = engine.with_leases(Arc::new(issuer));
            // One multiplexed connection for the ledger's scripts: concurrent model calls'
            // reservations reach Redis together (docs/benchmarks.md, "Budget ledger": 1.4x
            // the throughput of a connection per caller). A cluster pool's connections are
            // already that: one multiplexed connection per node, shared.
            let ledger = if cfg.redis.is_cluster() {
                budget::ledger::Ledger::new(redis.clone(), t.ledger).context("Invalid ledger configuration")?
            } else {
                let ledger_conn = cfg
                    .redis
                    .client()
                    .context("Invalid Redis URL")?
                    .get_connection_manager()
                    .await
                    .context("Failed to connect the budget ledger to Redis")?;
                budget::ledger::Ledger::with_shared_connection(
                    ledger_conn,
                    t.ledger,
                    Arc::new(budget::ledger::SystemClock),
                )
                .context("Invalid ledger configuration")?
            };
            let handler = crate::proxy::ToolProxy::new(
                engine.clone(),
                t.leases,
                t.matrix.clone(),
                t.provider,
                ledger,
                t.models,
                redis.clone(),
            );
            proxy = Some((handler, t.matrix, t.git));
        } else {
            tracing::warn!(
                "No [tools] section: assignments carry no capability lease and tool requests are not served."
            );
        }
        let state = ApiState::new(engine.clone(), redis.clone(), &cfg.api).context("Invalid API configuration")?;
        let bus_metrics = state.bus_metrics();
        let reloader = reloader.with_metrics(state.keyset_metrics());
        let listener = tokio::net::TcpListener::bind(cfg.api.listen)
            .await
            .with_context(|| format!("Failed to listen on {}", cfg.api.listen))?;
        Ok(Self {
            engine,
            redis,
            verifier,
            reloader: Some(reloader),
            listener,
            router: api::router(state),
            bus_metrics,
            instance: cfg.instance,
            tick: cfg.tick,
            grace: cfg.grace,
            proxy,
        })
    }

    /// The bound HTTP port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Runs consumers, the tick loop and the HTTP API until `shutdown`, then drains.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (epoch, _) = self.engine.fleet_state().await?;
        let kill_epoch = KillEpoch::new(epoch);
        let mut tasks = tokio::task::JoinSet::new();
        let consumers = bus::Consumers::new(
            self.redis.clone(),
            self.verifier.clone(),
            kill_epoch.clone(),
            "orchestrator",
            self.instance.as_str(),
            self.grace,
        )
        .with_metrics(self.bus_metrics.clone());
        // A burst of refused entries from one claimed sender opens an incident.
        let (watch, mut bursts) = crate::refusals::RejectionWatch::new(self.engine.refusal_limits().burst);
        let consumers = consumers.with_reject_hook(watch.hook());
        let engine = self.engine.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                let burst = tokio::select! {
                    b = bursts.recv() => match b { Some(b) => b, None => return },
                    () = stop.cancelled() => return,
                };
                match engine.rejection_burst(&burst).await {
                    Ok(id) => tracing::error!(incident = %id, role = %burst.role, instance = %burst.instance, count = burst.count, "A burst of rejected entries from one claimed sender: incident open."),
                    Err(e) => tracing::error!(error = %e, role = %burst.role, instance = %burst.instance, "A burst of rejected entries, and the incident could not be opened."),
                }
            }
        });
        let fleet_stream = |s: &str| StreamName::parse(s).expect("fleet stream names are valid");
        consumers.spawn(
            &mut tasks,
            consumers.config(fleet_stream(streams::RESULTS)),
            Results(self.engine.clone()),
            &shutdown,
        )?;
        consumers.spawn(
            &mut tasks,
            consumers.config(fleet_stream(streams::HEARTBEATS)),
            Heartbeats(self.engine.clone()),
            &shutdown,
        )?;
        consumers.spawn(
            &mut tasks,
            consumers.config(fleet_stream(streams::QUESTIONS)),
            Questions(self.engine.clone()),
            &shutdown,
        )?;
        tasks.spawn(tick_loop(self.engine.clone(), self.tick, shutdown.clone()));
        if let Some(reloader) = self.reloader.take() {
            tasks.spawn(reloader.run(shutdown.clone()));
        }
        tasks.spawn(crate::sentinel::watch(self.engine.clone(), self.redis.clone(), SENTINEL_EVERY, shutdown.clone()));
        // Workers may not run XGROUP DELCONSUMER (it would let one drop a peer's task):
        // the orchestrator prunes their groups' idle consumers for them.
        let worker_groups = Role::ALL
            .iter()
            .filter(|r| r.is_worker())
            .map(|r| (StreamName::tasks(*r).as_str().to_owned(), r.as_str().to_owned()))
            .collect();
        tasks.spawn(bus::pruner::run(
            self.redis.clone(),
            worker_groups,
            WORKER_CONSUMERS_IDLE,
            WORKER_CONSUMERS_PRUNE_EVERY,
            shutdown.clone(),
        ));
        if let Some((handler, matrix, git)) = self.proxy.take() {
            // Model calls take seconds to minutes: several consumers in the group, one entry
            // at a time each, so one slow call does not hold up every worker's request.
            for n in 0..TOOL_CONSUMERS {
                let mut cfg = consumers.config(fleet_stream(streams::TOOL_REQUESTS));
                cfg.consumer = format!("{}-tools-{n}", self.instance.as_str());
                cfg.batch = 1;
                // A model call may take minutes; its entry must not be taken over meanwhile.
                cfg.claim_idle = Duration::from_secs(600);
                consumers.spawn(&mut tasks, cfg, handler.clone(), &shutdown)?;
            }
            // A crashed push leaves its clone behind; nothing else would remove it.
            let swept = crate::gitops::sweep_scratch(&git);
            if swept > 0 {
                tracing::info!(swept, "Removed the scratch clones of pushes that did not finish.");
            }
            tasks.spawn(crate::proxy::push_loop(self.engine.clone(), matrix, git, self.tick, shutdown.clone()));
        }
        // The budget manager's pauses: halt the fleet, raise this process's kill epoch.
        tasks.spawn(crate::control::run(
            self.engine.clone(),
            self.redis.clone(),
            self.verifier.clone(),
            kill_epoch.clone(),
            shutdown.clone(),
        ));
        // The kill epoch of this process follows the database (a kill through any orchestrator).
        let engine = self.engine.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.cancelled() => return,
                }
                if let Ok((e, _)) = engine.fleet_state().await {
                    kill_epoch.raise(e);
                }
            }
        });
        tracing::info!(port = self.port(), instance = %self.instance, "Orchestrator running.");
        let server = api::serve(self.listener, self.router, shutdown.clone());
        let serve_result = server.await;
        shutdown.cancel();
        telemetry::drain(async { while tasks.join_next().await.is_some() {} }, self.grace + Duration::from_secs(1))
            .await;
        serve_result.map_err(anyhow::Error::from)
    }
}

#[cfg(test)]
mod tests;
