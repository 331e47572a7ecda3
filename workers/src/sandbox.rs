//! Throwaway Docker sandboxes (bollard): one container per execution, removed afterwards.
//!
//! A container gets no network, a read-only root filesystem, a small `noexec` tmpfs at
//! `/tmp`, the task's workspace as its only bind mount, an unprivileged user, no
//! capabilities, `no-new-privileges`, a seccomp profile (Docker's default unless one is
//! configured), pids/memory/CPU limits, a wall-clock timeout and an output cap. Every
//! container carries the label `agentfleet.sandbox=1` plus task, role and instance
//! labels, so [`Sandbox::sweep`] can find leftovers of a crashed worker.
//!
//! The image is built locally by `deploy/sandbox-image.sh` (no registry is reachable);
//! `docs/sandbox.md` explains each setting and the measured costs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, KillContainerOptions, ListContainersOptions,
    RemoveContainerOptions, StartContainerOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The label every sandbox container carries; [`Sandbox::sweep`] removes what has it.
pub const LABEL_SANDBOX: &str = "agentfleet.sandbox";
/// The label naming the task a container runs for.
pub const LABEL_TASK: &str = "agentfleet.task";
/// The label naming the role (dev, qa, review, refactor) of the worker that started it.
pub const LABEL_ROLE: &str = "agentfleet.role";
/// The label naming the worker instance that started it (what `sweep(Some(..))` matches).
pub const LABEL_INSTANCE: &str = "agentfleet.instance";
/// The label naming the sandbox runner that started it: a runner's sweeps and quiesces
/// touch only its own containers, whoever else shares the engine.
pub const LABEL_RUNNER: &str = "agentfleet.runner";
/// The image name `deploy/sandbox-image.sh` tags on every build, and the default image.
pub const DEFAULT_IMAGE: &str = "agentfleet/sandbox:current";
/// Where the workspace is mounted inside the container, and the default working directory.
pub const WORKSPACE_MOUNT: &str = "/workspace";
/// The uid:gid every sandbox process runs as (the `sandbox` user of the image).
pub const SANDBOX_USER: &str = "10001:10001";

/// How long to wait for a killed container to be reported as stopped before inspecting it.
const KILL_SETTLE: Duration = Duration::from_secs(10);
/// How long a sweep waits for the engine to remove one container.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);
/// The engine-side log of a container (one json-file, rotated in place): bounds its disk use.
const LOG_MAX_SIZE: &str = "1m";
/// The directory of the workspace that an install run fills with the task's dependencies
/// (`crate::deps`). Every other run gets it mounted read-only over the writable workspace,
/// so tests can import from it but cannot change what later runs import; the worker's git
/// ignores it (`info/exclude`), so it is never part of a change.
pub const DEPS_DIR: &str = ".agentfleet-deps";
/// Docker refuses memory limits below 6 MiB.
const MIN_MEMORY_BYTES: i64 = 6 * 1024 * 1024;

/// Sandbox settings of a worker, loaded from its TOML configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The local image to run; `deploy/sandbox-image.sh` builds it and tags it
    /// `agentfleet/sandbox:current` (the default).
    pub image: String,
    /// The OCI runtime registered with the engine; `None` is the engine's default (runc).
    pub runtime: Option<String>,
    /// A stronger runtime per risk level (e.g. `high = "runsc"`), see [`Self::runtime_for`].
    /// Keys compare case-insensitively; levels not listed use [`Self::runtime`].
    pub runtime_by_risk: BTreeMap<String, String>,
    /// Memory limit; swap is disabled (memory_swap = memory), so this is the whole budget.
    pub memory_bytes: i64,
    /// CPU quota in billionths of a CPU (1_000_000_000 = one CPU).
    pub nano_cpus: i64,
    /// Maximum number of processes and threads: what stops a fork bomb.
    pub pids_limit: i64,
    /// Wall-clock limit of one run, unless the [`RunSpec`] sets its own.
    pub timeout_secs: u64,
    /// How much of stdout+stderr is kept; the rest is drained and dropped.
    pub output_cap_bytes: usize,
    /// Size of the `/tmp` tmpfs (counted against the memory limit).
    pub tmpfs_bytes: u64,
    /// A seccomp profile (JSON) to apply instead of Docker's default one. `None` keeps
    /// Docker's default profile; there is no way to run unconfined.
    pub seccomp_profile: Option<PathBuf>,
    /// Most the workspace may hold while a run goes on, in bytes (each file counts its
    /// apparent or allocated size, whichever is larger, and at least 4 KiB, so a flood of
    /// empty files counts too). Past it the container is killed and the run reports
    /// [`RunOutput::disk_limit_exceeded`]. See `docs/sandbox.md` for why a watchdog and
    /// not a mount option.
    pub workspace_max_bytes: u64,
    /// How often the watchdog measures the workspace during a run, in milliseconds. What
    /// a run can write past the limit is its write rate times this period.
    pub workspace_poll_ms: u64,
    /// The unix socket of this host's sandbox runner (`sandbox-runner`). When set, this
    /// process never talks to the Docker engine: the runner holds the engine, and its own
    /// settings (image, limits, runtime, seccomp) decide every container. Workers in
    /// containers must use it: a container with the engine's socket is root on the host.
    pub runner: Option<PathBuf>,
    /// The egress mode (issue 15): where an install run may reach the allowlisted package
    /// registries. Without it no run ever gets a network, and installs are refused.
    pub egress: Option<EgressConfig>,
}

/// How an install run reaches the registries: attached to an internal Docker network whose
/// only way out is the egress proxy (`deploy/egress-proxy-image.sh`, its policy written by
/// [`crate::egress::EgressPolicy`]), with the proxy in `HTTP(S)_PROXY`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// The internal network (`docker network create --internal`); the proxy is attached to
    /// it and to a network with a way out.
    pub network: String,
    /// The proxy as seen from that network, e.g. `http://egress-proxy:3128`.
    pub proxy_url: String,
    /// The Python package index an install uses (the proxy must allow its host), e.g.
    /// `https://pypi.org/simple` (the default).
    #[serde(default = "default_python_index")]
    pub python_index_url: String,
    /// The npm registry an install uses, e.g. `https://registry.npmjs.org/` (the default).
    #[serde(default = "default_npm_registry")]
    pub npm_registry: String,
}

fn default_python_index() -> String {
    "https://pypi.org/simple".to_owned()
}

fn default_npm_registry() -> String {
    "https://registry.npmjs.org/".to_owned()
}

impl EgressConfig {
    /// The variables of an egress run: the proxy (curl and pip read the lower-case names,
    /// npm and others the upper-case ones; `NO_PROXY` emptied so nothing goes around it,
    /// which could not get anywhere anyway on an internal network), and where pip and npm
    /// fetch from. pip ignores a plain-HTTP index unless its host is trusted: an in-house
    /// mirror often is one, and integrity rests on the lockfile's hashes, not on TLS.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("HTTP_PROXY", self.proxy_url.clone()),
            ("HTTPS_PROXY", self.proxy_url.clone()),
            ("http_proxy", self.proxy_url.clone()),
            ("https_proxy", self.proxy_url.clone()),
            ("NO_PROXY", String::new()),
            ("no_proxy", String::new()),
            ("PIP_INDEX_URL", self.python_index_url.clone()),
            ("npm_config_registry", self.npm_registry.clone()),
        ];
        if let Some(host) = self.python_index_url.strip_prefix("http://").and_then(|rest| rest.split('/').next()) {
            vars.push(("PIP_TRUSTED_HOST", host.to_owned()));
        }
        vars
    }

    fn validate(&self) -> Result<(), SandboxError> {
        let invalid = |setting: &'static str, reason: &str| {
            Err(SandboxError::InvalidConfig { setting, reason: reason.to_owned() })
        };
        let name_ok = !self.network.is_empty()
            && self.network.len() <= 128
            && self.network.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok || matches!(self.network.as_str(), "host" | "bridge" | "default" | "none") {
            return invalid(
                "egress.network",
                "must name an internal Docker network ([A-Za-z0-9._-]; not host, bridge, default or none)",
            );
        }
        for (setting, url) in [
            ("egress.proxy_url", &self.proxy_url),
            ("egress.python_index_url", &self.python_index_url),
            ("egress.npm_registry", &self.npm_registry),
        ] {
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            // No credentials: the URLs go into the install run's environment.
            let clean = !url.contains(['@', ' ', '\n', '\r', '\t', '\0']) && url.len() <= 512;
            if !scheme_ok || !clean {
                return invalid(setting, "must be an http(s) URL without credentials or whitespace");
            }
        }
        Ok(())
    }
}

/// Whether a run has a network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// None at all (every run but an install).
    #[default]
    None,
    /// The egress mode: the internal network of [`SandboxConfig::egress`], the proxy its
    /// only way out.
    Egress,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            runtime: None,
            runtime_by_risk: BTreeMap::new(),
            memory_bytes: 512 * 1024 * 1024,
            nano_cpus: 1_000_000_000,
            pids_limit: 128,
            timeout_secs: 300,
            output_cap_bytes: 64 * 1024,
            tmpfs_bytes: 64 * 1024 * 1024,
            seccomp_profile: None,
            workspace_max_bytes: 1024 * 1024 * 1024,
            workspace_poll_ms: 100,
            runner: None,
            egress: None,
        }
    }
}

impl SandboxConfig {
    /// The runtime for a task of this risk level: `runtime_by_risk[risk]`, else `runtime`.
    pub fn runtime_for(&self, risk: &str) -> Option<&str> {
        self.runtime_by_risk
            .iter()
            .find(|(level, _)| level.eq_ignore_ascii_case(risk))
            .map(|(_, runtime)| runtime.as_str())
            .or(self.runtime.as_deref())
    }

    /// Refuses settings the engine would reject or that would make the sandbox useless.
    fn validate(&self) -> Result<(), SandboxError> {
        let invalid = |setting: &'static str, reason: &str| {
            Err(SandboxError::InvalidConfig { setting, reason: reason.to_owned() })
        };
        if self.image.trim().is_empty() {
            return invalid("image", "must name a local image (deploy/sandbox-image.sh prints it)");
        }
        if self.memory_bytes < MIN_MEMORY_BYTES {
            return invalid("memory_bytes", "must be at least 6 MiB (6291456), Docker's minimum");
        }
        if self.nano_cpus <= 0 {
            return invalid("nano_cpus", "must be positive (1000000000 = one CPU)");
        }
        if self.pids_limit <= 0 {
            return invalid("pids_limit", "must be positive; without it a fork bomb exhausts the host");
        }
        if self.timeout_secs == 0 {
            return invalid("timeout_secs", "must be positive");
        }
        if self.output_cap_bytes == 0 {
            return invalid("output_cap_bytes", "must be positive");
        }
        if self.tmpfs_bytes == 0 {
            return invalid("tmpfs_bytes", "must be positive");
        }
        if self.workspace_max_bytes == 0 {
            return invalid("workspace_max_bytes", "must be positive (1073741824 = 1 GiB)");
        }
        if self.workspace_poll_ms == 0 {
            return invalid("workspace_poll_ms", "must be positive");
        }
        if let Some(egress) = &self.egress {
            egress.validate()?;
        }
        let runtimes = self.runtime.iter().chain(self.runtime_by_risk.values());
        if runtimes.into_iter().any(|r| r.trim().is_empty()) {
            return invalid("runtime", "must name a runtime registered with the engine (e.g. \"runsc\")");
        }
        Ok(())
    }
}

/// What the worker and its task are, written on the container as labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLabels {
    /// The task id (its first characters also go into the container name).
    pub task: String,
    /// The worker's role: dev, qa, review or refactor.
    pub role: String,
    /// The worker instance; `sweep(Some(instance))` removes only this instance's containers.
    pub instance: String,
}

/// One execution: a command run in the workspace.
#[derive(Clone)]
pub struct RunSpec {
    /// The program and its arguments (no shell unless the command names one).
    pub command: Vec<String>,
    /// Host directory mounted read-write at `/workspace`; must be absolute and exist.
    /// uid 10001 must be able to write it if the command writes.
    pub workspace: PathBuf,
    /// Working directory inside the container; defaults to `/workspace`.
    pub workdir: Option<String>,
    /// The whole environment of the command, besides `HOME=/tmp` (and Docker's `PATH`,
    /// `HOSTNAME`). Nothing of the worker's own environment is passed.
    pub env: Vec<(String, String)>,
    /// Written on the container as labels.
    pub labels: SandboxLabels,
    /// Risk level of the task; chooses the runtime through [`SandboxConfig::runtime_for`].
    pub risk: Option<String>,
    /// Wall-clock limit of this run; defaults to [`SandboxConfig::timeout_secs`].
    pub timeout: Option<Duration>,
    /// [`Network::None`] unless this is an install run.
    pub network: Network,
}

impl RunSpec {
    /// A spec with the default working directory, no environment, no risk and the default timeout.
    pub fn new(command: Vec<String>, workspace: impl Into<PathBuf>, labels: SandboxLabels) -> Self {
        Self {
            command,
            workspace: workspace.into(),
            workdir: None,
            env: Vec::new(),
            labels,
            risk: None,
            timeout: None,
            network: Network::None,
        }
    }
}

impl std::fmt::Debug for RunSpec {
    /// Environment values stay out of logs; only their names are printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env_names: Vec<&str> = self.env.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("RunSpec")
            .field("command", &self.command)
            .field("workspace", &self.workspace)
            .field("workdir", &self.workdir)
            .field("env", &env_names)
            .field("labels", &self.labels)
            .field("risk", &self.risk)
            .field("timeout", &self.timeout)
            .field("network", &self.network)
            .finish()
    }
}

/// What a run produced.
/// Serialized as is on the sandbox runner's wire (`crate::runner`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunOutput {
    /// The exit code the engine recorded (137 after a SIGKILL); `None` if it never ran.
    pub exit_code: Option<i64>,
    /// stdout and stderr interleaved in arrival order, at most `output_cap_bytes`.
    #[serde(with = "serde_bytes")]
    pub output: Vec<u8>,
    /// True if output past the cap was dropped.
    pub truncated: bool,
    /// True if the run was killed at its wall-clock limit.
    pub timed_out: bool,
    /// True if the kernel's OOM killer killed a process of the container.
    pub oom_killed: bool,
    /// True if the cancellation token fired and the container was killed.
    pub cancelled: bool,
    /// True if the workspace grew past [`SandboxConfig::workspace_max_bytes`] and the
    /// container was killed; what it wrote is still there (the caller resets it).
    pub disk_limit_exceeded: bool,
    /// Wall-clock time from creating the container to having removed it.
    #[serde(with = "millis")]
    pub duration: Duration,
}

/// A duration as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl RunOutput {
    /// True if the command ran to completion and exited 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.cancelled && !self.oom_killed && !self.disk_limit_exceeded
    }
}

/// Why the sandbox could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The engine did not answer.
    #[error(
        "cannot reach the Docker engine ({source}); is the Docker engine running? \
         Check that /var/run/docker.sock (or DOCKER_HOST) exists and this user may use it"
    )]
    EngineUnreachable {
        #[source]
        source: DockerError,
    },
    /// The configured image is not in the local engine.
    #[error("the sandbox image {image} is not in the local Docker engine; run deploy/sandbox-image.sh to build it")]
    ImageMissing { image: String },
    /// A configured runtime is not registered with the engine.
    #[error(
        "the runtime {runtime:?} is not registered with the Docker engine (registered: {registered}); \
         register it in /etc/docker/daemon.json or remove it from the sandbox configuration (see docs/sandbox.md)"
    )]
    RuntimeMissing { runtime: String, registered: String },
    /// A setting of [`SandboxConfig`] is unusable.
    #[error("invalid sandbox setting {setting}: {reason}")]
    InvalidConfig { setting: &'static str, reason: String },
    /// The configured seccomp profile cannot be read or is not JSON.
    #[error("cannot use the seccomp profile {path}: {reason}; fix the file or unset seccomp_profile")]
    SeccompProfile { path: PathBuf, reason: String },
    /// The workspace of a [`RunSpec`] cannot be mounted.
    #[error("cannot mount the workspace {path}: {reason}")]
    InvalidWorkspace { path: PathBuf, reason: String },
    /// A [`RunSpec`] is malformed (empty command, bad environment name, zero timeout).
    #[error("invalid sandbox run: {0}")]
    InvalidSpec(String),
    /// The engine did not remove a container in time.
    #[error(
        "the Docker engine did not remove sandbox container {container} within {waited:?}; the engine may be wedged \
         on it (docker rm -f hangs): restart dockerd, then sweep again"
    )]
    RemoveStuck { container: String, waited: Duration },
    /// The sandbox runner could not be reached, or broke the protocol.
    #[error(
        "the sandbox runner at {socket} {problem}; is sandbox-runner running on this host, and may this user use its socket?"
    )]
    RunnerUnreachable { socket: PathBuf, problem: String },
    /// The sandbox runner refused the request or failed to carry it out.
    #[error("the sandbox runner: {0}")]
    Runner(String),
    /// An engine call failed; the sandbox container (if any) has been removed.
    #[error("the Docker engine failed to {action}: {source}")]
    Docker {
        action: &'static str,
        #[source]
        source: DockerError,
    },
}

impl SandboxError {
    fn docker(action: &'static str) -> impl FnOnce(DockerError) -> Self {
        move |source| Self::Docker { action, source }
    }
}

/// Where sandboxes run: the local Docker engine, or the host's sandbox runner
/// (`sandbox.runner`), which holds the engine so that this process need not. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Sandbox {
    backend: Backend,
    config: Arc<SandboxConfig>,
    /// Every run is counted here, by the role on its labels.
    metrics: crate::metrics::SandboxMetrics,
    /// Per task (its label), the containment limits its runs hit in a suspicious way, until
    /// the step's result takes them ([`Sandbox::take_containment`]).
    containment: Arc<std::sync::Mutex<std::collections::HashMap<String, std::collections::BTreeSet<&'static str>>>>,
}

#[derive(Debug, Clone)]
enum Backend {
    Engine(Engine),
    Runner(crate::runner::RunnerClient),
}

impl Sandbox {
    /// With `config.runner` set, checks that the runner answers; otherwise connects to the
    /// local engine ([`Engine::connect`]).
    pub async fn connect(config: SandboxConfig) -> Result<Self, SandboxError> {
        let backend = match &config.runner {
            Some(socket) => Backend::Runner(crate::runner::RunnerClient::connect(socket).await?),
            None => Backend::Engine(Engine::connect(config.clone()).await?),
        };
        Ok(Self {
            backend,
            config: Arc::new(config),
            metrics: crate::metrics::SandboxMetrics::default(),
            containment: Arc::default(),
        })
    }

    /// Counts this sandbox's runs in `metrics` (shared with the process's registry).
    pub fn with_metrics(mut self, metrics: crate::metrics::SandboxMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The configuration this sandbox was connected with. With a runner, the runner's own
    /// settings decide the container; this process's decide only what it asks for.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Runs one command in a fresh container that is removed afterwards ([`Engine::run`]).
    pub async fn run(&self, spec: RunSpec, cancel: &CancellationToken) -> Result<RunOutput, SandboxError> {
        let role = spec.labels.role.clone();
        let spec_labels_task = spec.labels.task.clone();
        // An install run has a network by design: a failed fetch there is pip's error, not
        // sandboxed code trying to get out.
        let egress = spec.network == Network::Egress;
        let run = match &self.backend {
            Backend::Engine(engine) => engine.run(spec, cancel).await,
            Backend::Runner(runner) => runner.run(spec, cancel).await,
        };
        self.metrics.observe(&role, &run);
        if let Ok(out) = &run {
            let mut hit = containment_hits(out);
            if egress {
                hit.retain(|h| *h != "network");
            }
            if !hit.is_empty() {
                tracing::warn!(task = %spec_labels_task, kinds = ?hit, "A sandbox run hit a containment limit; the result reports it.");
                let mut all = self.containment.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                // Bounded: one entry per task this worker runs, taken by each result.
                if all.len() < 4096 {
                    all.entry(spec_labels_task.clone()).or_default().extend(hit);
                }
            }
        }
        run
    }

    /// The containment limits `task`'s runs hit since the last call, sorted, and forgets
    /// them: they go into the step's `task.result` (`containment`).
    pub fn take_containment(&self, task: &str) -> Vec<String> {
        let mut all = self.containment.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.remove(task).map(|s| s.into_iter().map(str::to_owned).collect()).unwrap_or_default()
    }

    /// Removes every sandbox container, or only `instance`'s ([`Engine::sweep`]).
    pub async fn sweep(&self, instance: Option<&str>) -> Result<usize, SandboxError> {
        match &self.backend {
            Backend::Engine(engine) => engine.sweep(instance).await,
            Backend::Runner(runner) => runner.sweep(instance).await,
        }
    }

    /// Whether sandboxes run through the host's runner rather than a local engine.
    pub fn uses_runner(&self) -> bool {
        matches!(self.backend, Backend::Runner(_))
    }

    /// Makes sure the task's workspace directory exists and sandboxes may mount it. With a
    /// runner, the runner creates it under its root (workers cannot add entries there:
    /// see `crate::runner`); with the local engine, the caller's own directory is used.
    pub async fn prepare_workspace(&self, workspace: &Path) -> Result<(), SandboxError> {
        match &self.backend {
            Backend::Engine(_) => Ok(()),
            Backend::Runner(runner) => runner.prepare(crate::runner::workspace_name(workspace)?).await,
        }
    }

    /// Kills and removes every sandbox container of `task` ([`Engine::quiesce_task`]).
    pub async fn quiesce_task(&self, task: &str) -> Result<usize, SandboxError> {
        match &self.backend {
            Backend::Engine(engine) => engine.quiesce_task(task).await,
            Backend::Runner(runner) => runner.quiesce_task(task).await,
        }
    }
}

/// A handle on the local Docker engine that runs sandboxes. Cheap to clone. Workers use it
/// through [`Sandbox`]; the sandbox runner (`crate::runner`) directly.
#[derive(Debug, Clone)]
pub struct Engine {
    /// The runner this engine handle works for ([`Engine::owned_by`]).
    owner: Option<Arc<str>>,
    docker: Docker,
    config: Arc<SandboxConfig>,
    /// The seccomp profile's JSON, read once at connect.
    seccomp: Option<Arc<str>>,
}

impl Engine {
    /// Containers this handle starts carry `agentfleet.runner=<name>`, and its sweeps and
    /// quiesces touch only such containers.
    pub fn owned_by(mut self, name: &str) -> Self {
        self.owner = Some(Arc::from(name));
        self
    }

    fn own_labels(&self) -> Vec<String> {
        let mut labels = vec![format!("{LABEL_SANDBOX}=1")];
        if let Some(owner) = &self.owner {
            labels.push(format!("{LABEL_RUNNER}={owner}"));
        }
        labels
    }

    /// Connects to the local engine (`DOCKER_HOST` or `/var/run/docker.sock`), checks that
    /// it answers, that the image exists locally and that every configured runtime is
    /// registered, and reads the seccomp profile.
    pub async fn connect(config: SandboxConfig) -> Result<Self, SandboxError> {
        config.validate()?;
        let seccomp = match &config.seccomp_profile {
            None => None,
            Some(path) => Some(read_seccomp_profile(path)?),
        };
        let docker = Docker::connect_with_local_defaults()
            .map_err(|source| SandboxError::EngineUnreachable { source })?
            .negotiate_version()
            .await
            .map_err(|source| SandboxError::EngineUnreachable { source })?;
        docker.ping().await.map_err(|source| SandboxError::EngineUnreachable { source })?;

        match docker.inspect_image(&config.image).await {
            Ok(_) => {}
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {
                return Err(SandboxError::ImageMissing { image: config.image.clone() });
            }
            Err(source) => return Err(SandboxError::Docker { action: "inspect the sandbox image", source }),
        }

        let wanted: Vec<&String> = config.runtime.iter().chain(config.runtime_by_risk.values()).collect();
        if !wanted.is_empty() {
            let info = docker.info().await.map_err(SandboxError::docker("list the registered runtimes"))?;
            let registered: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
            if let Some(missing) = wanted.into_iter().find(|r| !registered.contains(r)) {
                let mut registered = registered;
                registered.sort();
                return Err(SandboxError::RuntimeMissing {
                    runtime: missing.clone(),
                    registered: registered.join(", "),
                });
            }
        }
        tracing::debug!(image = %config.image, "Sandbox engine connected.");
        Ok(Self { owner: None, docker, config: Arc::new(config), seccomp })
    }

    /// The configuration this sandbox was connected with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Runs one command in a fresh container and removes the container, whatever happens:
    /// create → attach → start → read output (capped) until exit, timeout or cancel → kill
    /// if still running → inspect (exit code, OOM) → remove. If this future is dropped
    /// midway, the container is removed by a background task.
    pub async fn run(&self, spec: RunSpec, cancel: &CancellationToken) -> Result<RunOutput, SandboxError> {
        let started = Instant::now();
        let timeout = spec.timeout.unwrap_or(Duration::from_secs(self.config.timeout_secs));
        if timeout.is_zero() {
            return Err(SandboxError::InvalidSpec("the timeout must be positive".to_owned()));
        }
        let body = self.container_body(&spec)?;
        let name = container_name(&spec.labels);
        if cancel.is_cancelled() {
            return Ok(RunOutput {
                exit_code: None,
                output: Vec::new(),
                truncated: false,
                timed_out: false,
                cancelled: true,
                oom_killed: false,
                disk_limit_exceeded: false,
                duration: started.elapsed(),
            });
        }

        let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(SandboxError::docker("create the sandbox container"))?;
        let mut guard = RemoveOnDrop { docker: Some(self.docker.clone()), name: name.clone() };
        tracing::debug!(container = %name, task = %spec.labels.task, "Sandbox container created.");

        let result = self.drive(&name, &spec.workspace, timeout, cancel).await;
        guard.docker = None;
        let removed = tokio::time::timeout(REMOVE_TIMEOUT, remove_container(&self.docker, &name)).await;
        let mut output = result?;
        match removed {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(container = %name, error = %error, "Sandbox container not removed; the next sweep will.");
            }
            Err(_) => {
                tracing::warn!(container = %name, "Sandbox container removal timed out; the engine may be wedged.")
            }
        }
        output.duration = started.elapsed();
        Ok(output)
    }

    /// Removes (force) every sandbox container, or only those of `instance`; returns how
    /// many it removed. Workers call it at start and when the kill switch engages. It tries
    /// every container, each for at most 30 s, then reports the first failure.
    pub async fn sweep(&self, instance: Option<&str>) -> Result<usize, SandboxError> {
        let mut labels = self.own_labels();
        if let Some(instance) = instance {
            labels.push(format!("{LABEL_INSTANCE}={instance}"));
        }
        let removed = self.remove_labelled(labels).await?;
        if removed > 0 {
            tracing::info!(removed, instance = instance.unwrap_or("*"), "Sandbox containers swept.");
        }
        Ok(removed)
    }

    /// Kills and removes every sandbox container of `task`, whichever worker started it (a
    /// dead predecessor's under another instance name included), and checks with the
    /// engine that none is left. Host-side git calls this before it reads, resets or
    /// patches the task's workspace: no container may write the workspace meanwhile.
    /// Returns how many containers it removed.
    pub async fn quiesce_task(&self, task: &str) -> Result<usize, SandboxError> {
        let mut labels = self.own_labels();
        labels.push(format!("{LABEL_TASK}={task}"));
        let removed = self.remove_labelled(labels.clone()).await?;
        // `rm -f` returns once the container is gone; make sure nothing slipped in between.
        let left = self.list_labelled(labels).await?;
        if let Some(id) = left.into_iter().next() {
            return Err(SandboxError::RemoveStuck { container: id, waited: REMOVE_TIMEOUT });
        }
        if removed > 0 {
            tracing::warn!(
                task,
                removed,
                "Removed live sandbox containers of this task before touching its workspace."
            );
        }
        Ok(removed)
    }

    async fn list_labelled(&self, labels: Vec<String>) -> Result<Vec<String>, SandboxError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), labels)])),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(SandboxError::docker("list sandbox containers"))?;
        Ok(containers.into_iter().filter_map(|c| c.id).collect())
    }

    /// Force-removes (SIGKILL, then remove) every container carrying all of `labels`, each
    /// for at most 30 s; reports the first failure after trying them all.
    async fn remove_labelled(&self, labels: Vec<String>) -> Result<usize, SandboxError> {
        let containers = self.list_labelled(labels).await?;
        let mut removed = 0;
        let mut first_failure = None;
        for id in containers {
            let outcome = match tokio::time::timeout(REMOVE_TIMEOUT, remove_container(&self.docker, &id)).await {
                Ok(Ok(gone)) => Ok(gone),
                Ok(Err(source)) => Err(SandboxError::Docker { action: "remove a sandbox container", source }),
                Err(_) => Err(SandboxError::RemoveStuck { container: id.clone(), waited: REMOVE_TIMEOUT }),
            };
            match outcome {
                Ok(true) => removed += 1,
                Ok(false) => {} // gone meanwhile (its run removed it)
                Err(error) => {
                    tracing::warn!(container = %id, error = %error, "Sandbox container not swept.");
                    first_failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_failure {
            return Err(error);
        }
        Ok(removed)
    }

    /// Everything between create and remove.
    async fn drive(
        &self,
        name: &str,
        workspace: &Path,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<RunOutput, SandboxError> {
        let watchdog = watch_workspace(
            workspace.to_owned(),
            self.config.workspace_max_bytes,
            Duration::from_millis(self.config.workspace_poll_ms),
        );
        let attach =
            AttachContainerOptions { stream: true, logs: false, stdout: true, stderr: true, ..Default::default() };
        let attached = self
            .docker
            .attach_container(name, Some(attach))
            .await
            .map_err(SandboxError::docker("attach to the sandbox container"))?;
        self.docker
            .start_container(name, None::<StartContainerOptions>)
            .await
            .map_err(SandboxError::docker("start the sandbox container"))?;

        let mut collector = Collector::new(self.config.output_cap_bytes);
        let ending = {
            let mut stream = attached.output;
            let collector = &mut collector;
            let docker = &self.docker;
            let finished = pin!(async move {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(SandboxError::docker("read the sandbox output"))?;
                    collector.push(chunk.as_ref());
                }
                wait_stopped(docker, name).await
            });
            tokio::select! {
                result = finished => match result {
                    Ok(()) => Ending::Exited,
                    Err(error) => return Err(error),
                },
                () = tokio::time::sleep(timeout) => Ending::TimedOut,
                () = cancel.cancelled() => Ending::Cancelled,
                used = watchdog => {
                    tracing::warn!(container = %name, used, limit = self.config.workspace_max_bytes, "The sandbox filled its workspace past the limit; killing it.");
                    Ending::DiskLimit
                }
            }
        };

        if ending != Ending::Exited {
            let kill = KillContainerOptions { signal: "SIGKILL".to_owned() };
            match self.docker.kill_container(name, Some(kill)).await {
                // 409: it stopped on its own in the meantime.
                Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {}
                Err(source) => return Err(SandboxError::Docker { action: "kill the sandbox container", source }),
            }
            match tokio::time::timeout(KILL_SETTLE, wait_stopped(&self.docker, name)).await {
                Ok(result) => result?,
                Err(_) => tracing::warn!(container = %name, "Killed sandbox container still reported running."),
            }
            tracing::info!(container = %name, reason = ?ending, "Sandbox container killed.");
        }

        let inspected = self
            .docker
            .inspect_container(name, None::<bollard::query_parameters::InspectContainerOptions>)
            .await
            .map_err(SandboxError::docker("inspect the sandbox container"))?;
        let state = inspected.state.unwrap_or_default();
        let (output, truncated) = collector.finish();
        Ok(RunOutput {
            exit_code: state.exit_code,
            output,
            truncated,
            timed_out: ending == Ending::TimedOut,
            oom_killed: state.oom_killed.unwrap_or(false),
            cancelled: ending == Ending::Cancelled,
            disk_limit_exceeded: ending == Ending::DiskLimit,
            duration: Duration::ZERO,
        })
    }

    /// The container's configuration: every isolation setting lives here.
    fn container_body(&self, spec: &RunSpec) -> Result<ContainerCreateBody, SandboxError> {
        if spec.command.is_empty() {
            return Err(SandboxError::InvalidSpec("the command is empty".to_owned()));
        }
        let workdir = spec.workdir.clone().unwrap_or_else(|| WORKSPACE_MOUNT.to_owned());
        if !workdir.starts_with('/') {
            return Err(SandboxError::InvalidSpec(format!("the working directory {workdir:?} is not absolute")));
        }
        let workspace = workspace_source(&spec.workspace)?;
        let mut env = container_env(&spec.env)?;
        let cfg = &*self.config;
        let network_mode = match spec.network {
            Network::None => "none".to_owned(),
            Network::Egress => {
                let egress = cfg.egress.as_ref().ok_or_else(|| {
                    SandboxError::InvalidSpec(
                        "an install run needs the egress mode, and this sandbox has none: set [sandbox.egress] \
                         (network, proxy_url) to an internal network whose only way out is the egress proxy"
                            .to_owned(),
                    )
                })?;
                // The egress settings win over any of the spec's own variables.
                let ours = egress.env();
                env.retain(|kv| !ours.iter().any(|(name, _)| kv.split_once('=').is_some_and(|(k, _)| k == *name)));
                env.extend(ours.into_iter().map(|(name, value)| format!("{name}={value}")));
                egress.network.clone()
            }
        };
        let runtime = spec.risk.as_deref().map_or(cfg.runtime.as_deref(), |risk| cfg.runtime_for(risk));

        let mut security_opt = vec!["no-new-privileges:true".to_owned()];
        if let Some(profile) = &self.seccomp {
            security_opt.push(format!("seccomp={profile}"));
        }
        let labels = HashMap::from([
            (LABEL_SANDBOX.to_owned(), "1".to_owned()),
            (LABEL_TASK.to_owned(), spec.labels.task.clone()),
            (LABEL_ROLE.to_owned(), spec.labels.role.clone()),
            (LABEL_INSTANCE.to_owned(), spec.labels.instance.clone()),
        ]);
        let mut labels = labels;
        if let Some(owner) = &self.owner {
            labels.insert(LABEL_RUNNER.to_owned(), owner.to_string());
        }
        let mut mounts = vec![bollard::models::Mount {
            target: Some(WORKSPACE_MOUNT.to_owned()),
            source: Some(workspace.clone()),
            typ: Some(bollard::models::MountTypeEnum::BIND),
            read_only: Some(false),
            ..Default::default()
        }];
        if spec.network == Network::None
            && let Some(deps) = deps_source(Path::new(&workspace))?
        {
            mounts.push(bollard::models::Mount {
                target: Some(format!("{WORKSPACE_MOUNT}/{DEPS_DIR}")),
                source: Some(deps),
                typ: Some(bollard::models::MountTypeEnum::BIND),
                read_only: Some(true),
                ..Default::default()
            });
        }
        let host_config = HostConfig {
            network_mode: Some(network_mode),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_owned(),
                format!("rw,noexec,nosuid,nodev,size={}", cfg.tmpfs_bytes),
            )])),
            // A `mount` rather than a `bind`: the engine refuses a source that does not exist
            // where it looks (its own host), where a bind would quietly create an empty
            // directory. A runner whose workspace path differs from the host's gets an error,
            // not sandboxes that see nothing.
            mounts: Some(mounts),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(security_opt),
            pids_limit: Some(cfg.pids_limit),
            memory: Some(cfg.memory_bytes),
            memory_swap: Some(cfg.memory_bytes),
            nano_cpus: Some(cfg.nano_cpus),
            runtime: runtime.map(str::to_owned),
            auto_remove: Some(false),
            privileged: Some(false),
            // A bounded json-file log: the engine always has a consumer of the container's
            // output besides our attach stream. With the `none` driver, Docker 20.10 wedged a
            // container whose attach client went away (unremovable until dockerd restarts).
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), LOG_MAX_SIZE.to_owned()),
                    ("max-file".to_owned(), "1".to_owned()),
                ])),
            }),
            ..Default::default()
        };
        Ok(ContainerCreateBody {
            image: Some(cfg.image.clone()),
            cmd: Some(spec.command.clone()),
            entrypoint: Some(Vec::new()),
            user: Some(SANDBOX_USER.to_owned()),
            working_dir: Some(workdir),
            env: Some(env),
            labels: Some(labels),
            network_disabled: Some(spec.network == Network::None),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(false),
            open_stdin: Some(false),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        })
    }
}

/// Why the container stopped running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    Cancelled,
    DiskLimit,
}

/// Resolves (with the size measured) once `dir` holds more than `max` bytes, measuring it
/// every `every`; never resolves otherwise.
async fn watch_workspace(dir: PathBuf, max: u64, every: Duration) -> u64 {
    loop {
        tokio::time::sleep(every).await;
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || disk_usage(&d, max)).await {
            Ok(used) if used > max => return used,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Cannot measure the workspace."),
        }
    }
}

/// What `root` holds, for the workspace limit: per entry the larger of its apparent and
/// allocated size, and at least 4 KiB (so empty files and directories count). Symlinks
/// are not followed. Stops counting once past `stop_above`.
pub fn disk_usage(root: &Path, stop_above: u64) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            total = total.saturating_add(meta.len().max(meta.blocks().saturating_mul(512)).max(4096));
            if meta.is_dir() {
                stack.push(entry.path());
            }
            if total > stop_above {
                return total;
            }
        }
    }
    total
}

/// Keeps the first `cap` bytes and counts the rest as truncated.
struct Collector {
    cap: usize,
    kept: Vec<u8>,
    truncated: bool,
}

impl Collector {
    fn new(cap: usize) -> Self {
        Self { cap, kept: Vec::with_capacity(cap.min(64 * 1024)), truncated: false }
    }

    fn push(&mut self, chunk: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    fn finish(self) -> (Vec<u8>, bool) {
        (self.kept, self.truncated)
    }
}

/// Removes the container from a background task if `run` is dropped before it could.
struct RemoveOnDrop {
    docker: Option<Docker>,
    name: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(docker) = self.docker.take() else { return };
        let name = std::mem::take(&mut self.name);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(error) = remove_container(&docker, &name).await {
                        tracing::warn!(container = %name, error = %error, "Sandbox container not removed; the next sweep will.");
                    }
                });
            }
            Err(_) => tracing::warn!(container = %name, "Sandbox container left behind; the next sweep removes it."),
        }
    }
}

/// Force-removes a container with its anonymous volumes; `Ok(false)` if it was already gone.
async fn remove_container(docker: &Docker, name: &str) -> Result<bool, DockerError> {
    let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => Ok(true),
        Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
        // 409: removal already in progress (a concurrent sweep or run).
        Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Waits until the engine reports the container not running.
async fn wait_stopped(docker: &Docker, name: &str) -> Result<(), SandboxError> {
    let mut waits = docker.wait_container(name, None::<WaitContainerOptions>);
    match waits.next().await {
        // bollard reports a non-zero exit status as an error; the status is read by inspect.
        None | Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) => Ok(()),
        Some(Err(source)) => Err(SandboxError::Docker { action: "wait for the sandbox container", source }),
    }
}

/// The canonical host path of the workspace, refusing what cannot be bound safely.
fn workspace_source(path: &Path) -> Result<String, SandboxError> {
    let invalid = |reason: &str| SandboxError::InvalidWorkspace { path: path.to_owned(), reason: reason.to_owned() };
    if !path.is_absolute() {
        return Err(invalid("the path is relative; give an absolute host path"));
    }
    let canonical = path.canonicalize().map_err(|e| invalid(&format!("{e}; create the directory first")))?;
    if !canonical.is_dir() {
        return Err(invalid("not a directory"));
    }
    if canonical == Path::new("/") {
        return Err(invalid("refusing to mount the host's root directory"));
    }
    let Some(text) = canonical.to_str() else {
        return Err(invalid("the path is not UTF-8"));
    };
    if text.contains([':', ',']) {
        return Err(invalid("the path contains ':' or ',', which Docker's bind syntax cannot carry"));
    }
    Ok(text.to_owned())
}

/// The workspace's [`DEPS_DIR`] (under the already canonical `workspace`) if it is a
/// directory of its own; a symlink there is refused, since Docker would follow it on the
/// host and mount whatever it points at. No container of the task runs between two runs
/// (each ends with a quiesce), so nothing can swap it after this check.
fn deps_source(workspace: &Path) -> Result<Option<String>, SandboxError> {
    let path = workspace.join(DEPS_DIR);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SandboxError::InvalidWorkspace { path, reason: format!("cannot inspect it: {e}") }),
        Ok(meta) if meta.file_type().is_dir() => Ok(path.to_str().map(str::to_owned)),
        Ok(_) => Err(SandboxError::InvalidWorkspace {
            path,
            reason: "is not a directory (a link or a file left by a run?); reset the workspace".to_owned(),
        }),
    }
}

/// `HOME=/tmp` plus exactly the spec's variables (a spec's `HOME` wins).
fn container_env(vars: &[(String, String)]) -> Result<Vec<String>, SandboxError> {
    let mut env = Vec::with_capacity(vars.len() + 1);
    if !vars.iter().any(|(name, _)| name == "HOME") {
        env.push("HOME=/tmp".to_owned());
    }
    for (name, value) in vars {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(SandboxError::InvalidSpec(format!(
                "environment variable {name:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
        env.push(format!("{name}={value}"));
    }
    Ok(env)
}

/// `agentfleet-<role>-<first 8 of task>-<12 random hex>`, within Docker's name alphabet.
fn container_name(labels: &SandboxLabels) -> String {
    fn clean(text: &str, max: usize) -> String {
        let cleaned: String = text
            .chars()
            .filter(|c| c.is_ascii())
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' { c } else { '-' })
            .take(max)
            .collect();
        if cleaned.is_empty() { "x".to_owned() } else { cleaned }
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    // The last 12 hex digits of a UUIDv7 are random; the first ones are the clock.
    let short = &id[id.len() - 12..];
    format!("agentfleet-{}-{}-{short}", clean(&labels.role, 16), clean(&labels.task, 8))
}

/// Reads and checks the seccomp profile once, at connect.
fn read_seccomp_profile(path: &Path) -> Result<Arc<str>, SandboxError> {
    let invalid = |reason: String| SandboxError::SeccompProfile { path: path.to_owned(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    if !value.is_object() {
        return Err(invalid("not a JSON object".to_owned()));
    }
    Ok(Arc::from(text))
}

/// What in `out` looks like code testing its cage rather than a failing test: the kernel's
/// OOM kill, the workspace limit, forks refused at the pids limit, and attempts to reach the
/// network (the sandbox has none, so any such attempt fails with one of these messages).
/// Output is the sandboxed code's own: a repository can print these on purpose, which only
/// opens an incident about itself.
pub fn containment_hits(out: &RunOutput) -> Vec<&'static str> {
    const PIDS: &[&str] = &[
        "fork: Resource temporarily unavailable",
        "fork: retry: Resource temporarily unavailable",
        "Cannot fork",
        "can't fork",
    ];
    const NETWORK: &[&str] = &[
        "Network is unreachable",
        "Temporary failure in name resolution",
        "Could not resolve host",
        "Name or service not known",
        "No address associated with hostname",
    ];
    let mut hits = Vec::new();
    if out.oom_killed {
        hits.push("oom_killed");
    }
    if out.disk_limit_exceeded {
        hits.push("disk_limit");
    }
    let text = String::from_utf8_lossy(&out.output);
    if PIDS.iter().any(|p| text.contains(p)) {
        hits.push("pids_limit");
    }
    if NETWORK.iter().any(|p| text.contains(p)) {
        hits.push("network");
    }
    hits
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_egress_settings_refuse_a_network_that_is_not_internal_and_urls_with_credentials() {
        let good = EgressConfig {
            network: "fleet-egress".into(),
            proxy_url: "http://egress-proxy:3128".into(),
            python_index_url: "http://mirror.internal:8080/simple".into(),
            npm_registry: default_npm_registry(),
        };
        let with = |edit: fn(&mut EgressConfig)| {
            let mut e = good.clone();
            edit(&mut e);
            SandboxConfig { egress: Some(e), ..SandboxConfig::default() }.validate()
        };
        assert!(with(|_| {}).is_ok());
        assert!(good.env().contains(&("PIP_TRUSTED_HOST", "mirror.internal:8080".to_owned())));
        for edit in [
            (|e: &mut EgressConfig| e.network = "host".into()) as fn(&mut EgressConfig),
            |e| e.network = "bridge".into(),
            |e| e.network = "a b".into(),
            |e| e.proxy_url = "http://user:secret@proxy:3128".into(),
            |e| e.python_index_url = "ftp://mirror/simple".into(),
            |e| e.npm_registry = "https://registry.npmjs.org/\nX".into(),
        ] {
            assert!(matches!(with(edit), Err(SandboxError::InvalidConfig { .. })));
        }
    }

    #[test]
    fn containment_is_the_cage_being_tested_not_a_failing_test() {
        let out = |output: &str, oom: bool, disk: bool| RunOutput {
            exit_code: Some(1),
            output: output.as_bytes().to_vec(),
            truncated: false,
            timed_out: false,
            oom_killed: oom,
            cancelled: false,
            disk_limit_exceeded: disk,
            duration: Duration::from_millis(5),
        };
        assert!(containment_hits(&out("FAILED test_add (tests.test_calc)\n", false, false)).is_empty());
        assert_eq!(containment_hits(&out("", true, true)), ["oom_killed", "disk_limit"]);
        assert_eq!(containment_hits(&out("sh: 1: Cannot fork\n", false, false)), ["pids_limit"]);
        let curl = "curl: (6) Could not resolve host: evil.example\n";
        assert_eq!(containment_hits(&out(curl, false, false)), ["network"]);
        let py = "OSError: [Errno 101] Network is unreachable\n";
        assert_eq!(containment_hits(&out(py, false, false)), ["network"]);
    }

    fn labels() -> SandboxLabels {
        SandboxLabels { task: "0192f0aa-bbbb-7ccc".into(), role: "qa".into(), instance: "qa-1".into() }
    }

    #[test]
    fn defaults_load_from_empty_toml_and_unknown_fields_are_refused() {
        let cfg: SandboxConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, SandboxConfig::default());
        assert_eq!(cfg.image, DEFAULT_IMAGE);
        assert_eq!(cfg.memory_bytes, 512 * 1024 * 1024);
        assert!(toml::from_str::<SandboxConfig>("memroy_bytes = 1").is_err());
    }

    #[test]
    fn runtime_for_prefers_the_risk_level_then_the_default() {
        let cfg: SandboxConfig = toml::from_str("runtime_by_risk = { high = \"runsc\" }").unwrap();
        assert_eq!(cfg.runtime_for("HIGH"), Some("runsc"));
        assert_eq!(cfg.runtime_for("low"), None);
        let cfg = SandboxConfig { runtime: Some("runc".into()), ..cfg };
        assert_eq!(cfg.runtime_for("low"), Some("runc"));
    }

    #[test]
    fn validation_names_the_setting() {
        let cfg = SandboxConfig { pids_limit: 0, ..Default::default() };
        let error = cfg.validate().unwrap_err().to_string();
        assert!(error.contains("pids_limit"), "{error}");
    }

    #[test]
    fn collector_keeps_the_cap_and_marks_truncation() {
        let mut c = Collector::new(4);
        c.push(b"ab");
        c.push(b"cdef");
        c.push(b"g");
        assert_eq!(c.finish(), (b"abcd".to_vec(), true));
        let mut c = Collector::new(4);
        c.push(b"abcd");
        assert_eq!(c.finish(), (b"abcd".to_vec(), false));
    }

    #[test]
    fn container_names_are_docker_safe_and_unique() {
        let a = container_name(&SandboxLabels { role: "q a/".into(), ..labels() });
        let b = container_name(&labels());
        assert!(a.starts_with("agentfleet-q-a--0192f0aa-"), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn env_is_only_the_spec_plus_home() {
        let env = container_env(&[("A".into(), "1".into())]).unwrap();
        assert_eq!(env, ["HOME=/tmp", "A=1"]);
        assert!(container_env(&[("A=B".into(), "1".into())]).is_err());
    }

    #[test]
    fn workspace_must_be_absolute_and_exist() {
        assert!(matches!(workspace_source(Path::new("rel")), Err(SandboxError::InvalidWorkspace { .. })));
        assert!(workspace_source(Path::new("/nonexistent/agentfleet")).is_err());
        assert!(workspace_source(Path::new("/")).is_err());
        assert!(workspace_source(&std::env::temp_dir()).is_ok());
    }
}
