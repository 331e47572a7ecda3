//! Configuration and wiring of the `budget` binary: [`Config::load`], then [`App::build`],
//! then [`App::run`] until shutdown.
//!
//! ```toml
//! instance = "budget-0"
//! deployment = "prod-eu"                                  # named in every alert
//! redis_url = "redis://budget:PASSWORD@127.0.0.1:6379"   # or FLEET_REDIS_URL
//! keyset = "keys/budget.toml"                             # fleetctl keys derive --process budget
//! permissions = "config/permissions.toml"
//! grace_secs = 10
//!
//! [ledger]          # budget::ledger::LedgerConfig: daily/per-task limits, per_role, prices
//! [killswitch]      # budget::service::TriggerConfig: failure_threshold, known_error_kinds, …
//! [alerts]          # budget::alert::AlertsConfig: telegram, webhook, retry tunables
//! ```
//!
//! Loaded by `fleetconf`: the file, then `FLEET_<KEY>` for every setting
//! (`FLEET_INSTANCE`, `FLEET_ALERTS__TELEGRAM__CHAT_ID`), then `FLEET_<KEY>_FILE` for the
//! secrets in [`SECRETS`] (`FLEET_REDIS_URL_FILE`, `FLEET_ALERTS__WEBHOOK__SECRET_FILE`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bus::{KillEpoch, Publisher, PublisherConfig};
use envelope::{Instance, Keyset, PermissionTable, Role, StreamName, Verifier, VerifierConfig, streams};
use secrecy::SecretString;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::alert::{AlertDispatcher, AlertSender, AlertsConfig};
use crate::killswitch::KillSwitch;
use crate::ledger::{Ledger, LedgerConfig};
use crate::service::{Budget, ControlHandler, OutcomeHandler, TriggerConfig, UsageHandler};

/// The configuration file (TOML). Unknown keys are refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// This process's instance name: its consumer name in every group, and the sender of
    /// the pauses. Stable across restarts.
    #[serde(default = "default_instance")]
    instance: String,
    /// The name of this deployment, in every alert, so an operator with several fleets
    /// knows which one a message is about.
    #[serde(default = "default_deployment")]
    deployment: String,
    /// Redis URL (secret: it may carry a password).
    redis_url: Option<SecretString>,
    /// PEM file of the CA that signs the Redis server's certificate (`rediss://` only);
    /// unset trusts the system's roots.
    redis_ca_file: Option<PathBuf>,
    /// The budget's keyset (`fleetctl keys derive --process budget`).
    keyset: PathBuf,
    /// Seconds between two reads of the keyset file; a changed file is put in force without
    /// a restart (SIGHUP reads it at once). Keep it well under `fleetctl keys rotate --wait`.
    #[serde(default = "default_keyset_reload")]
    keyset_reload_secs: u64,
    /// The permission table.
    #[serde(default = "default_permissions")]
    permissions: PathBuf,
    /// Seconds a running handler gets on shutdown.
    #[serde(default = "default_grace")]
    grace_secs: u64,
    /// Limits and prices; the same section the orchestrator's model proxy uses.
    #[serde(default)]
    ledger: LedgerConfig,
    /// When the kill switch engages.
    #[serde(default)]
    killswitch: TriggerConfig,
    /// Alert channels.
    #[serde(default)]
    alerts: AlertsConfig,
    /// The Prometheus endpoint (`listen`, `token`); none when `listen` is unset.
    #[serde(default)]
    metrics: telemetry::metrics::MetricsSettings,
}

fn default_instance() -> String {
    "budget-0".into()
}
fn default_deployment() -> String {
    crate::alert::DEFAULT_DEPLOYMENT.into()
}
fn default_permissions() -> PathBuf {
    "config/permissions.toml".into()
}
fn default_keyset_reload() -> u64 {
    bus::keyreload::DEFAULT_INTERVAL.as_secs()
}
fn default_grace() -> u64 {
    10
}

/// A configuration problem: the message names the setting, never a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Everything `budget` needs, loaded and checked.
pub struct Config {
    /// Consumer name and sender instance.
    pub instance: Instance,
    /// The deployment's name, in every alert.
    pub deployment: String,
    redis: bus::RedisEndpoint,
    keyset: Keyset,
    /// The keyset file and how often it is re-read.
    keyset_reload: (PathBuf, Duration),
    permissions: PermissionTable,
    /// Limits and prices.
    pub ledger: LedgerConfig,
    /// Kill-switch triggers.
    pub triggers: TriggerConfig,
    /// Alert channels and tunables.
    pub alerts: AlertsConfig,
    /// Shutdown grace.
    pub grace: Duration,
    /// The Prometheus endpoint.
    pub metrics: telemetry::metrics::MetricsSettings,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("instance", &self.instance)
            .field("deployment", &self.deployment)
            .field("redis", &self.redis)
            .field("ledger", &self.ledger)
            .field("triggers", &self.triggers)
            .field("alerts", &self.alerts)
            .finish_non_exhaustive()
    }
}

/// Settings that are secrets: also read from `FLEET_<KEY>_FILE`.
pub const SECRETS: &[&str] = &[
    "redis_url",
    "alerts.telegram.bot_token",
    "alerts.telegram.chat_id",
    "alerts.webhook.url",
    "alerts.webhook.secret",
    telemetry::metrics::TOKEN_SETTING,
];

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
    /// Loads the file at `path` (if any) under the environment `env`.
    pub fn load(path: Option<&Path>, env: &fleetconf::Env) -> Result<Self, ConfigError> {
        let file: FileConfig = fleetconf::Layers::new(path, env, SECRETS).extract().map_err(|e| ConfigError(e.0))?;
        let instance = Instance::parse(&file.instance).map_err(|e| ConfigError(format!("setting `instance`: {e}")))?;
        let deployment = file.deployment.trim().to_owned();
        if deployment.is_empty() || deployment.chars().count() > 64 || deployment.chars().any(char::is_control) {
            return Err(ConfigError(
                "setting `deployment`: must be 1 to 64 characters without control characters".into(),
            ));
        }
        let redis_url = file.redis_url.ok_or_else(|| {
            ConfigError(
                "setting `redis_url` is missing: set it in the configuration file or with FLEET_REDIS_URL or FLEET_REDIS_URL_FILE"
                    .into(),
            )
        })?;
        let redis = bus::RedisEndpoint::new(redis_url, file.redis_ca_file.as_deref())
            .map_err(|e| ConfigError(format!("setting `redis_url` / `redis_ca_file`: {e}")))?;
        let keyset =
            Keyset::parse(&read(&file.keyset, "keyset", "derive it with `fleetctl keys derive --process budget`")?)
                .map_err(|e| ConfigError(format!("setting `keyset` ('{}'): {e}", file.keyset.display())))?;
        if keyset.process != envelope::Process::Role(Role::Budget) {
            return Err(ConfigError(format!(
                "setting `keyset`: '{}' is the keyset of {}, not of the budget manager",
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
        file.ledger.validate().map_err(|e| ConfigError(format!("section [ledger]: {e}")))?;
        file.killswitch.validate().map_err(ConfigError)?;
        Ok(Self {
            instance,
            deployment,
            redis,
            keyset,
            keyset_reload: (file.keyset.clone(), reload_interval(file.keyset_reload_secs)?),
            permissions,
            ledger: file.ledger,
            triggers: file.killswitch,
            alerts: file.alerts,
            grace: Duration::from_secs(file.grace_secs),
            metrics: file.metrics,
        })
    }
}

/// The running budget manager's parts.
pub struct App {
    budget: Budget,
    redis: bus::RedisPool,
    verifier: Arc<Verifier>,
    /// Puts a changed keyset file into the verifier's and publisher's keyring.
    reloader: bus::KeysetReloader,
    dispatcher: AlertDispatcher,
    instance: Instance,
    grace: Duration,
    metrics: telemetry::metrics::MetricsSettings,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl App {
    /// Sets up the pool, the ledger, the alert channels and the kill switch. Invalid alert
    /// settings are configuration errors (the message names the setting).
    pub async fn build(cfg: Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let block = cfg.alerts.block.max(Duration::from_secs(2));
        let redis = bus::pool(&cfg.redis, 16, block).context("Failed to set up the Redis pool")?;
        // One keyring for the verifier and the publisher, replaced when the keyset file
        // changes (docs/keys.md, Rotation).
        let live = envelope::LiveKeyring::new(cfg.keyset.into_keyring());
        let (keyset_path, reload_every) = cfg.keyset_reload;
        let reloader =
            bus::KeysetReloader::new(keyset_path, envelope::Process::Role(Role::Budget), live.clone(), reload_every);
        let verifier = Arc::new(Verifier::new(&live, cfg.permissions, VerifierConfig::default()));
        let publisher = Arc::new(Publisher::new(redis.clone(), live, PublisherConfig::default()));
        let alerts = AlertSender::new(redis.clone(), &cfg.alerts).with_deployment(&cfg.deployment);
        let dispatcher = AlertDispatcher::new(redis.clone(), &cfg.alerts).context("Invalid alert configuration")?;
        let ledger = Ledger::new(redis.clone(), cfg.ledger).context("Invalid ledger configuration")?;
        let killswitch = KillSwitch::new(redis.clone(), publisher, alerts.clone(), cfg.instance.clone())
            .with_control_ttl(Duration::from_secs(cfg.triggers.control_ttl_secs));
        let budget = Budget {
            killswitch,
            ledger,
            alerts,
            pool: redis.clone(),
            triggers: Arc::new(cfg.triggers),
            needs_reassert: Arc::new(AtomicBool::new(false)),
            metrics: crate::metrics::BudgetMetrics::default(),
        };
        Ok(Self {
            budget,
            redis,
            verifier,
            reloader,
            dispatcher,
            instance: cfg.instance,
            grace: cfg.grace,
            metrics: cfg.metrics,
        })
    }

    /// Runs the consumers, the periodic check, the control listener and the alert
    /// dispatcher until `shutdown`, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        use anyhow::Context;
        // An engagement left half done by a crash: send its pauses and alert again.
        let state = self.budget.killswitch.reassert().await.context("Failed to read the kill-switch record")?;
        let epoch = KillEpoch::new(state.epoch);
        let mut tasks = tokio::task::JoinSet::new();
        // The epoch this process's verifiers use follows the record.
        let listener = bus::ControlListener::new(
            self.redis.clone(),
            self.verifier.clone(),
            Role::Budget,
            epoch.clone(),
            bus::Gate::default(),
        )
        .record_only()
        .with_resync(Duration::from_secs(1));
        tasks.spawn(listener.run(shutdown.clone()));
        let bus_metrics = bus::metrics::BusMetrics::new();
        let consumers = bus::Consumers::new(
            self.redis.clone(),
            self.verifier.clone(),
            epoch.clone(),
            "budget",
            self.instance.as_str(),
            self.grace,
        )
        .with_metrics(bus_metrics.clone());
        let fleet_stream = |s: &str| StreamName::parse(s).expect("fleet stream names are valid");
        consumers.spawn(
            &mut tasks,
            consumers.config(fleet_stream(streams::USAGE)),
            UsageHandler(self.budget.clone()),
            &shutdown,
        )?;
        consumers.spawn(
            &mut tasks,
            consumers.config(fleet_stream(streams::OUTCOMES)),
            OutcomeHandler(self.budget.clone()),
            &shutdown,
        )?;
        consumers.spawn(
            &mut tasks,
            consumers.config(StreamName::control(Role::Budget)),
            ControlHandler(self.budget.clone()),
            &shutdown,
        )?;
        let mut registry = telemetry::metrics::registry("budget");
        bus_metrics.register(&mut registry);
        self.budget.metrics.register(&mut registry);
        let keyset_metrics = bus::keyreload::KeysetMetrics::default();
        keyset_metrics.register(&mut registry);
        tasks.spawn(self.reloader.with_metrics(keyset_metrics).run(shutdown.clone()));
        self.budget.metrics.kill_switch(state.epoch, state.engaged);
        let refresh = {
            let (pool, budget) = (self.redis.clone(), self.budget.clone());
            telemetry::metrics::refresh(move || {
                let (pool, budget, bus_metrics) = (pool.clone(), budget.clone(), bus_metrics.clone());
                async move {
                    match budget.killswitch.state().await {
                        Ok(s) => budget.metrics.kill_switch(s.epoch, s.engaged),
                        Err(e) => tracing::warn!(error = %e, "Metrics cannot read the kill switch's record."),
                    }
                    match pool.get().await {
                        Ok(mut c) => bus_metrics.refresh(&mut c).await,
                        Err(e) => tracing::warn!(error = %e, "Metrics cannot reach Redis."),
                    }
                }
            })
        };
        telemetry::metrics::serve(&self.metrics, registry, Some(refresh), shutdown.clone()).await?;
        tasks.spawn(self.budget.clone().tick_loop(shutdown.clone()));
        tasks.spawn(self.dispatcher.run(shutdown.clone()));
        tracing::info!(instance = %self.instance, epoch = state.epoch, engaged = state.engaged, "Budget manager running.");
        shutdown.cancelled().await;
        telemetry::drain(async { while tasks.join_next().await.is_some() {} }, self.grace + Duration::from_secs(1))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
