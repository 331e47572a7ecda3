//! A worker's configuration, loaded by `fleetconf`: the TOML file (`--config`, optional),
//! then `FLEET_<KEY>` for every setting (`FLEET_SANDBOX__IMAGE`), then
//! `FLEET_REDIS_URL_FILE` for the secret URL; `--instance` wins over all of them. Unknown
//! keys are refused. Relative paths are relative to the file's directory when they exist
//! there, else to the working directory.
//!
//! ```toml
//! redis_url = "redis://dev:…@127.0.0.1:6379"   # or FLEET_REDIS_URL (wins)
//! keyset = "secrets/dev.keyset.toml"            # fleetctl keys derive --process dev
//! permissions = "config/permissions.toml"       # default
//! agents = "config/agents.toml"                 # the agents' tools and limits; built in when unset
//! instance = "dev-1"                            # default <role>-<hostname>-<slot>, stable across restarts
//! workspace_root = "/workspace"                 # default; assignments outside it are refused
//! heartbeat_secs = 5
//! tool_timeout_secs = 180
//! git_timeout_secs = 120
//! git_output_cap_bytes = 8388608                # a git command printing more is killed
//! grace_secs = 10
//!
//! [sandbox]                                     # workers::sandbox::SandboxConfig
//! image = "agentfleet/sandbox:current"
//! timeout_secs = 300
//!
//! [consumer]
//! claim_idle_secs = 60
//! block_ms = 1000
//! retry_max_secs = 30
//! max_deliveries = 5
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use envelope::{Instance, Keyset, PermissionTable, Process, Role};
use secrecy::SecretString;
use serde::Deserialize;

use crate::sandbox::SandboxConfig;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Redis URL (secret: it may carry a password).
    redis_url: Option<SecretString>,
    /// PEM file of the CA that signs the Redis server's certificate (`rediss://` only);
    /// unset trusts the system's roots.
    redis_ca_file: Option<PathBuf>,
    /// This role's keyset (`fleetctl keys derive --process <role>`).
    keyset: PathBuf,
    /// Seconds between two reads of the keyset file; a changed file is put in force without
    /// a restart (SIGHUP reads it at once). Keep it well under `fleetctl keys rotate --wait`.
    #[serde(default = "default_keyset_reload")]
    keyset_reload_secs: u64,
    /// The permission table every verifier checks against.
    #[serde(default = "default_permissions")]
    permissions: PathBuf,
    /// What each role's model may do (`config/agents.toml`); the built-in copy when unset.
    agents: Option<PathBuf>,
    /// This process's name: its consumer name in the role's group and the suffix of its
    /// tool-response stream. Must stay the same across restarts of one process slot, so a
    /// restarted worker finds its own pending entries.
    instance: Option<String>,
    /// The host part of the default instance name `<role>-<host>-<slot>`; the kernel's
    /// hostname when unset. Containers should set it: their hostname changes whenever they
    /// are recreated, and the name must not.
    host_name: Option<String>,
    /// Every assignment's workspace must be inside this directory.
    #[serde(default = "default_workspace_root")]
    workspace_root: PathBuf,
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat")]
    heartbeat_secs: u64,
    /// Seconds to wait for a tool response.
    #[serde(default = "default_tool_timeout")]
    tool_timeout_secs: u64,
    /// Seconds one git command may take (clone included).
    #[serde(default = "default_git_timeout")]
    git_timeout_secs: u64,
    /// Most bytes one git command may print before it is killed (the step fails).
    #[serde(default = "default_git_output_cap")]
    git_output_cap_bytes: usize,
    /// Seconds a running task gets on SIGTERM before it is abandoned (left pending).
    #[serde(default = "default_grace")]
    grace_secs: u64,
    /// The sandbox.
    #[serde(default)]
    sandbox: SandboxConfig,
    /// Task-stream consumer tunables.
    #[serde(default)]
    consumer: ConsumerTunables,
    /// The Prometheus endpoint (`listen`, `token`); none when `listen` is unset.
    #[serde(default)]
    metrics: telemetry::metrics::MetricsSettings,
}

/// How the worker reads its role's task stream (see `docs/bus.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerTunables {
    /// Another consumer's entry idle this long is taken over (that worker is presumed
    /// dead). A running task keeps its own entry fresh, so this need not exceed the longest
    /// task, only a few keep-alive periods (a quarter of it each).
    pub claim_idle_secs: u64,
    /// How long one blocking read waits.
    pub block_ms: u64,
    /// Longest retry delay of a failed entry; must be below `claim_idle_secs`.
    pub retry_max_secs: u64,
    /// Deliveries before an entry goes to `fleet:dlq`.
    pub max_deliveries: u64,
}

impl Default for ConsumerTunables {
    fn default() -> Self {
        Self { claim_idle_secs: 60, block_ms: 1000, retry_max_secs: 30, max_deliveries: 5 }
    }
}

fn default_permissions() -> PathBuf {
    "config/permissions.toml".into()
}
fn default_workspace_root() -> PathBuf {
    "/workspace".into()
}
fn default_heartbeat() -> u64 {
    5
}
fn default_tool_timeout() -> u64 {
    180
}
fn default_git_timeout() -> u64 {
    120
}
fn default_git_output_cap() -> usize {
    crate::workspace::DEFAULT_GIT_OUTPUT_CAP
}
fn default_keyset_reload() -> u64 {
    bus::keyreload::DEFAULT_INTERVAL.as_secs()
}
fn default_grace() -> u64 {
    10
}

/// A configuration problem; the message names the setting and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Everything a worker needs, loaded and checked.
pub struct WorkerConfig {
    /// The role this process works as.
    pub role: Role,
    /// This process's instance name.
    pub instance: Instance,
    /// The Redis server (its URL is a secret: it may carry a password).
    pub redis: bus::RedisEndpoint,
    /// The role's keyset.
    pub keyset: Keyset,
    /// The keyset file (resolved), re-read every `keyset_reload`.
    pub keyset_path: PathBuf,
    /// Time between reads of the keyset file.
    pub keyset_reload: Duration,
    /// The permission table.
    pub permissions: PermissionTable,
    /// Absolute root of all workspaces.
    pub workspace_root: PathBuf,
    /// Heartbeat period.
    pub heartbeat_every: Duration,
    /// Tool response timeout.
    pub tool_timeout: Duration,
    /// Git command timeout.
    pub git_timeout: Duration,
    /// Cap of one git command's output.
    pub git_output_cap: usize,
    /// The lock on this process's instance slot when the name is the default one: held
    /// for the life of the process, so no other worker of the role on this host takes the
    /// same name while this one runs, and a restarted one takes it again.
    pub instance_slot: Option<std::fs::File>,
    /// Drain period on shutdown.
    pub grace: Duration,
    /// The sandbox settings.
    pub sandbox: SandboxConfig,
    /// The agents' grants and limits (`agents`).
    pub agents: std::sync::Arc<crate::agent::policy::AgentsFile>,
    /// The task consumer's tunables.
    pub consumer: ConsumerTunables,
    /// The Prometheus endpoint.
    pub metrics: telemetry::metrics::MetricsSettings,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("role", &self.role)
            .field("instance", &self.instance)
            .field("redis", &self.redis)
            .field("workspace_root", &self.workspace_root)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

/// Settings that are secrets: also read from `FLEET_<KEY>_FILE`.
pub const SECRETS: &[&str] = &["redis_url", telemetry::metrics::TOKEN_SETTING];

fn read(path: &Path, what: &str, fix: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {what} '{}': {e}; {fix}", path.display())))
}

/// How many workers of one role one host may run under default names.
const INSTANCE_SLOTS: u32 = 64;

/// The default instance name, `<role>-<hostname>-<slot>`: the lowest slot that no live
/// worker of this role holds, locked (`flock`) under `<workspace_root>/.agentfleet-git/
/// instances/`. The name is stable across restarts: a restarted worker takes its
/// predecessor's slot again (the dead process's lock is gone), so its start-up sweep finds
/// the predecessor's sandbox containers and its consumer name finds the predecessor's
/// pending entries. Two live workers never share a name. Returns the name and the lock,
/// which must be held for as long as the process runs.
pub fn default_instance(
    role: Role,
    workspace_root: &Path,
    host: Option<&str>,
) -> Result<(String, std::fs::File), ConfigError> {
    let host = match host {
        Some(h) => h.to_owned(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_else(|_| "host".into()),
    };
    let host: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .take(40)
        .collect();
    let dir = workspace_root.join(crate::workspace::GIT_STORE).join("instances");
    std::fs::create_dir_all(&dir).map_err(|e| {
        ConfigError(format!(
            "setting `instance` is unset and the default needs {}: {e}; set `instance` or fix `workspace_root`",
            dir.display()
        ))
    })?;
    for slot in 0..INSTANCE_SLOTS {
        let path = dir.join(format!("{role}-{slot}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ConfigError(format!("cannot open the instance slot {}: {e}", path.display())))?;
        if file.try_lock().is_ok() {
            return Ok((format!("{role}-{host}-{slot}"), file));
        }
    }
    Err(ConfigError(format!(
        "setting `instance` is unset and all {INSTANCE_SLOTS} default names of {role} on this host are taken; set `instance`"
    )))
}

impl WorkerConfig {
    /// Loads `role`'s settings from the file at `path` (if any) and `env`; `instance`
    /// (from `--instance`) wins over both.
    pub fn load(
        path: Option<&Path>,
        role: Role,
        instance: Option<String>,
        env: &fleetconf::Env,
    ) -> Result<Self, ConfigError> {
        if !role.is_worker() {
            return Err(ConfigError(format!("{role} is not a worker role")));
        }
        let file: FileConfig = fleetconf::Layers::new(path, env, SECRETS).extract().map_err(|e| ConfigError(e.0))?;
        let base = path.and_then(Path::parent).unwrap_or(Path::new("."));
        let resolve = |p: &Path| if p.is_absolute() || p.exists() { p.to_path_buf() } else { base.join(p) };

        if !file.workspace_root.is_absolute() {
            return Err(ConfigError(format!(
                "setting `workspace_root` ('{}'): must be an absolute path",
                file.workspace_root.display()
            )));
        }
        let (instance, instance_slot) = match instance.or(file.instance) {
            Some(name) => (name, None),
            None => {
                let (name, slot) = default_instance(role, &file.workspace_root, file.host_name.as_deref())?;
                (name, Some(slot))
            }
        };
        if instance.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError(format!(
                "setting `instance` {instance:?}: use lower case (it is part of a stream name)"
            )));
        }
        let instance = Instance::parse(&instance).map_err(|e| ConfigError(format!("setting `instance`: {e}")))?;
        let redis_url = file.redis_url.ok_or_else(|| {
            ConfigError(
                "setting `redis_url` is missing: set it in the configuration file or with FLEET_REDIS_URL or FLEET_REDIS_URL_FILE"
                    .into(),
            )
        })?;
        let redis = bus::RedisEndpoint::new(redis_url, file.redis_ca_file.as_deref().map(|p| resolve(p)).as_deref())
            .map_err(|e| ConfigError(format!("setting `redis_url` / `redis_ca_file`: {e}")))?;
        let keyset_path = resolve(&file.keyset);
        let keyset = Keyset::parse(&read(
            &keyset_path,
            "keyset",
            &format!("derive it with `fleetctl keys derive --process {role}`"),
        )?)
        .map_err(|e| ConfigError(format!("setting `keyset` ('{}'): {e}", keyset_path.display())))?;
        if keyset.process != Process::Role(role) {
            return Err(ConfigError(format!(
                "setting `keyset`: '{}' is the keyset of {}, not of {role}",
                keyset_path.display(),
                keyset.process
            )));
        }
        let permissions_path = resolve(&file.permissions);
        let permissions = PermissionTable::parse(&read(
            &permissions_path,
            "permission file",
            "set `permissions` to config/permissions.toml",
        )?)
        .map_err(|e| ConfigError(format!("setting `permissions`: {e}")))?;
        let agents = match &file.agents {
            None => crate::agent::policy::AgentsFile::parse(crate::agent::policy::BUILT_IN)
                .map_err(|e| ConfigError(format!("the built-in agents file: {e}")))?,
            Some(p) => {
                let p = resolve(p);
                crate::agent::policy::AgentsFile::parse(&read(
                    &p,
                    "agents file",
                    "set `agents` to config/agents.toml or leave it unset",
                )?)
                .map_err(|e| ConfigError(format!("setting `agents` ('{}'): {e}", p.display())))?
            }
        };
        for (name, v) in [
            ("heartbeat_secs", file.heartbeat_secs),
            ("keyset_reload_secs", file.keyset_reload_secs),
            ("tool_timeout_secs", file.tool_timeout_secs),
            ("git_timeout_secs", file.git_timeout_secs),
            ("git_output_cap_bytes", file.git_output_cap_bytes as u64),
            ("consumer.claim_idle_secs", file.consumer.claim_idle_secs),
            ("consumer.block_ms", file.consumer.block_ms),
            ("consumer.max_deliveries", file.consumer.max_deliveries),
        ] {
            if v == 0 {
                return Err(ConfigError(format!("setting `{name}` must be at least 1")));
            }
        }
        if file.consumer.retry_max_secs >= file.consumer.claim_idle_secs {
            return Err(ConfigError(
                "setting `consumer.retry_max_secs` must be below `consumer.claim_idle_secs`".into(),
            ));
        }
        Ok(Self {
            role,
            instance,
            redis,
            keyset,
            keyset_path,
            keyset_reload: Duration::from_secs(file.keyset_reload_secs),
            permissions,
            workspace_root: file.workspace_root,
            heartbeat_every: Duration::from_secs(file.heartbeat_secs),
            tool_timeout: Duration::from_secs(file.tool_timeout_secs),
            git_timeout: Duration::from_secs(file.git_timeout_secs),
            git_output_cap: file.git_output_cap_bytes,
            instance_slot,
            grace: Duration::from_secs(file.grace_secs),
            sandbox: file.sandbox,
            agents: std::sync::Arc::new(agents),
            consumer: file.consumer,
            metrics: file.metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_instance_is_a_valid_lower_case_name() {
        let root = tempfile::tempdir().unwrap();
        let (i, _slot) = default_instance(Role::Qa, root.path(), None).unwrap();
        assert!(i.starts_with("qa-"), "{i}");
        assert!(Instance::parse(&i).is_ok(), "{i}");
        assert!(!i.bytes().any(|b| b.is_ascii_uppercase()));
    }

    /// A restarted worker (its predecessor's lock gone with the process) gets the same
    /// default name, so its start-up sweep finds the predecessor's containers; two live
    /// workers of a role never share one. The old default (`<role>-<host>-<pid>`) changed
    /// on every restart.
    #[test]
    fn default_instance_is_stable_across_restarts_and_unique_among_live_workers() {
        let root = tempfile::tempdir().unwrap();
        let (first, first_slot) = default_instance(Role::Dev, root.path(), None).unwrap();
        let (second, second_slot) = default_instance(Role::Dev, root.path(), None).unwrap();
        assert_ne!(first, second, "two live workers of one role");
        assert!(first.ends_with("-0") && second.ends_with("-1"), "{first} {second}");
        let (qa, _qa_slot) = default_instance(Role::Qa, root.path(), None).unwrap();
        let (named, _named_slot) = default_instance(Role::Qa, root.path(), Some("Compose_Host")).unwrap();
        assert_eq!(named, "qa-compose-host-1", "the configured host, cleaned, and the next slot");
        assert!(qa.starts_with("qa-") && qa.ends_with("-0"), "slots are per role: {qa}");
        drop(first_slot); // the first worker dies
        let (restarted, _slot) = default_instance(Role::Dev, root.path(), None).unwrap();
        assert_eq!(restarted, first, "the restarted worker takes its predecessor's name");
        drop(second_slot);
        // A lock taken by another process (flock, as a separate worker would) counts too.
        let path = root.path().join(crate::workspace::GIT_STORE).join("instances/review-0.lock");
        std::fs::write(&path, b"").unwrap();
        let mut holder = std::process::Command::new("flock")
            .arg("--no-fork")
            .arg(&path)
            .args(["sleep", "30"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("flock(1) is needed");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (review, _slot) = default_instance(Role::Review, root.path(), None).unwrap();
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert!(review.ends_with("-1"), "{review}");
    }

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// `docs/deployment.md` has a row for every setting the loader accepts.
    #[test]
    fn every_setting_has_a_row_in_docs_deployment_md() {
        let probe = |text: &str| {
            let file = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(file.path(), text).expect("write");
            WorkerConfig::load(Some(file.path()), Role::Dev, Some("dev-probe".into()), &fleetconf::Env::default())
                .err()
                .map(|e| e.0)
        };
        let settings = fleetconf::settings::discover(&probe);
        for key in ["redis_ca_file", "sandbox.memory_bytes", "sandbox.runtime_by_risk", "consumer.block_ms"] {
            assert!(settings.contains(key), "{key} was not discovered: {settings:?}");
        }
        let doc = std::fs::read_to_string(root().join("docs/deployment.md")).expect("docs/deployment.md");
        let problems = fleetconf::settings::undocumented(&doc, "workers", &settings, SECRETS);
        assert!(problems.is_empty(), "docs/deployment.md is out of date:\n{}", problems.join("\n"));
    }

    /// `config/examples/dev-worker.toml` loads for Dev, and (with its keyset) for every
    /// other worker role: the four share the format.
    #[test]
    fn the_example_configuration_loads_for_every_worker_role() {
        let dir = tempfile::tempdir().unwrap();
        let master = envelope::MasterFile::new(envelope::MasterSecret::from_bytes([7; 32]));
        let perms_path = root().join("config/permissions.toml");
        let perms = PermissionTable::parse(&std::fs::read_to_string(&perms_path).unwrap()).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, fleet_testkit::tls::TestCa::new().cert_pem).unwrap();
        let url = dir.path().join("redis-url");
        std::fs::write(&url, "rediss://dev:pw@127.0.0.1:6380\n").unwrap();
        let example = root().join("config/examples/dev-worker.toml");
        for role in [Role::Dev, Role::Qa, Role::Review, Role::Refactor] {
            let keyset = dir.path().join(format!("{role}.keyset.toml"));
            std::fs::write(&keyset, master.derive_keyset(Process::Role(role), &perms).to_toml().as_bytes()).unwrap();
            let env = fleetconf::Env::from_pairs([
                ("FLEET_KEYSET", keyset.display().to_string()),
                ("FLEET_PERMISSIONS", perms_path.display().to_string()),
                ("FLEET_REDIS_CA_FILE", ca.display().to_string()),
                ("FLEET_REDIS_URL_FILE", url.display().to_string()),
            ]);
            let c = WorkerConfig::load(Some(&example), role, None, &env)
                .unwrap_or_else(|e| panic!("config/examples/dev-worker.toml does not load as {role}: {e}"));
            assert_eq!(c.instance.as_str(), "dev-1");
            assert!(c.redis.is_tls());
            assert_eq!(c.sandbox.image, crate::sandbox::DEFAULT_IMAGE);
            assert_eq!(c.workspace_root, PathBuf::from("/srv/agentfleet/workspaces"));
            assert!(c.instance_slot.is_none(), "a named instance takes no slot under workspace_root");
        }
    }

    #[test]
    fn load_checks_settings() {
        let dir = tempfile::tempdir().unwrap();
        let master = envelope::MasterFile::new(envelope::MasterSecret::from_bytes([7; 32]));
        let perms_text = include_str!("../../config/permissions.toml");
        let perms = PermissionTable::parse(perms_text).unwrap();
        std::fs::write(dir.path().join("perms.toml"), perms_text).unwrap();
        std::fs::write(
            dir.path().join("dev.keyset.toml"),
            master.derive_keyset(Process::Role(Role::Dev), &perms).to_toml().as_bytes(),
        )
        .unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "keyset = \"dev.keyset.toml\"\npermissions = \"perms.toml\"\n[sandbox]\ntimeout_secs = 30\n",
        )
        .unwrap();
        let env = fleetconf::Env::from_pairs([("FLEET_REDIS_URL", "redis://127.0.0.1:1")]);
        let c = WorkerConfig::load(Some(&cfg), Role::Dev, Some("dev-a".into()), &env).unwrap();
        assert_eq!(c.instance.as_str(), "dev-a");
        assert_eq!(c.sandbox.timeout_secs, 30);
        assert_eq!(c.workspace_root, PathBuf::from("/workspace"));
        // The wrong role's keyset, an unknown key, no Redis URL.
        let e = WorkerConfig::load(Some(&cfg), Role::Qa, None, &env).err().unwrap().0;
        assert!(e.contains("not of qa"), "{e}");
        std::fs::write(&cfg, "keyset = \"dev.keyset.toml\"\nbogus = 1\n").unwrap();
        let e = WorkerConfig::load(Some(&cfg), Role::Dev, None, &env).err().unwrap().0;
        assert!(e.contains("bogus"), "{e}");
        std::fs::write(&cfg, "keyset = \"dev.keyset.toml\"\npermissions = \"perms.toml\"\n").unwrap();
        let e = WorkerConfig::load(Some(&cfg), Role::Dev, None, &fleetconf::Env::default()).err().unwrap().0;
        assert!(e.contains("FLEET_REDIS_URL or FLEET_REDIS_URL_FILE"), "{e}");
        // Every setting from the environment, the secret from a file, no configuration file.
        let url = dir.path().join("redis-url");
        std::fs::write(&url, "redis://127.0.0.1:2\n").unwrap();
        let env = fleetconf::Env::from_pairs([
            ("FLEET_KEYSET", dir.path().join("dev.keyset.toml").display().to_string()),
            ("FLEET_PERMISSIONS", dir.path().join("perms.toml").display().to_string()),
            ("FLEET_REDIS_URL_FILE", url.display().to_string()),
            ("FLEET_INSTANCE", "dev-env".to_owned()),
            ("FLEET_SANDBOX__TIMEOUT_SECS", "45".to_owned()),
            ("FLEET_CONSUMER__BLOCK_MS", "250".to_owned()),
        ]);
        let c = WorkerConfig::load(None, Role::Dev, None, &env).unwrap();
        assert!(!c.redis.is_tls());
        assert!(!format!("{c:?}").contains("127.0.0.1:2"), "the URL is not in Debug");
        assert_eq!(c.instance.as_str(), "dev-env");
        assert_eq!(c.sandbox.timeout_secs, 45);
        assert_eq!(c.consumer.block_ms, 250);
    }
}
