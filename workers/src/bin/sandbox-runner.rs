//! `sandbox-runner`: the one process on a host that holds the Docker engine; workers ask it
//! for sandboxes over a unix socket (see `workers::runner`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use workers::runner::RunnerPolicy;
use workers::sandbox::{Engine, SandboxConfig};

/// The agentfleet sandbox runner. It alone talks to the Docker engine on this host, and
/// starts every sandbox with its own hardened settings (no network, read-only root,
/// unprivileged user, no capabilities, seccomp, pids/memory/CPU limits, timeout, output
/// cap). Local workers ask it over a unix socket for a run of a command in a task's
/// workspace; nothing they send can add a mount, a device, a capability, a network or
/// another image. Workers set `sandbox.runner` to the socket's path.
#[derive(Debug, Parser)]
#[command(
    version,
    after_long_help = concat!(
        "Settings come from the TOML file, then FLEET_<KEY> variables (nested keys joined with __,\n",
        "e.g. FLEET_SANDBOX__MEMORY_BYTES). Unknown keys are refused. Settings (defaults in brackets):\n",
        "  name             this runner's name, on its containers' agentfleet.runner label; it\n",
        "                   sweeps only those [sandbox-runner]\n",
        "  socket           the unix socket workers connect to [/run/agentfleet/runner.sock]\n",
        "  socket_mode      its permission bits, octal [0660]\n",
        "  socket_group     gid given the socket (the workers' group) [unchanged]\n",
        "  workspace_root   the runner-owned directory of task workspaces, at the same path in\n",
        "                   the workers and the engine [/var/lib/agentfleet/workspace]\n",
        "  allowed_uids     peer uids that may connect; empty allows any the socket mode lets in [[]]\n",
        "  max_concurrent   sandboxes at once; more wait [8]\n",
        "  [sandbox]        image, runtime, runtime_by_risk, memory_bytes, nano_cpus, pids_limit,\n",
        "                   timeout_secs (the longest a request may ask) [300], output_cap_bytes,\n",
        "                   tmpfs_bytes, workspace_max_bytes, workspace_poll_ms, seccomp_profile,\n",
        "                   egress (network, proxy_url, python_index_url, npm_registry: the\n",
        "                   install runs' way out, through the egress proxy) (docs/sandbox.md)\n",
        "\n",
        "Needs the Docker engine (DOCKER_HOST or /var/run/docker.sock) and the sandbox image.\n",
        "Exit codes: 0 after a clean shutdown, 64 for invalid arguments or configuration, 1 otherwise."
    )
)]
struct Cli {
    /// The TOML configuration file (optional: FLEET_<KEY> variables work alone).
    #[arg(long, env = "FLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print the egress proxy's configuration (squid.conf) for install runs and exit: only
    /// the listed registry hosts are reachable, by name; private, loopback, link-local (the
    /// metadata address 169.254.169.254 included) and other reserved ranges are refused
    /// after DNS resolution, unless listed as in-house mirrors; every request is logged.
    /// Mount the output at /etc/squid/agentfleet.conf of the image that
    /// deploy/egress-proxy-image.sh builds.
    EgressPolicy {
        /// A registry host name to allow (repeat): pypi.org, files.pythonhosted.org,
        /// registry.npmjs.org, or a mirror's name.
        #[arg(long = "registry", value_name = "HOST", required = true)]
        registries: Vec<String>,
        /// A private CIDR an in-house mirror lives in, exempt from the refused ranges
        /// (repeat); none by default.
        #[arg(long = "private-mirror", value_name = "CIDR")]
        private_mirrors: Vec<String>,
        /// A port plain HTTP may use besides 80 (repeat); CONNECT is 443 only.
        #[arg(long = "port", value_name = "PORT")]
        extra_ports: Vec<u16>,
        /// The port the proxy listens on.
        #[arg(long, default_value_t = 3128)]
        listen_port: u16,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_name")]
    name: String,
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default = "default_mode")]
    socket_mode: String,
    socket_group: Option<u32>,
    #[serde(default = "default_root")]
    workspace_root: PathBuf,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    #[serde(default = "default_concurrent")]
    max_concurrent: usize,
    #[serde(default)]
    sandbox: SandboxConfig,
}

fn default_name() -> String {
    "sandbox-runner".into()
}
fn default_socket() -> PathBuf {
    "/run/agentfleet/runner.sock".into()
}
fn default_mode() -> String {
    "0660".into()
}
fn default_root() -> PathBuf {
    "/var/lib/agentfleet/workspace".into()
}
fn default_concurrent() -> usize {
    8
}

struct Config {
    name: String,
    socket: PathBuf,
    mode: u32,
    group: Option<u32>,
    policy: RunnerPolicy,
    sandbox: SandboxConfig,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config").field("socket", &self.socket).field("policy", &self.policy).finish_non_exhaustive()
    }
}

fn load(path: Option<&Path>) -> Result<Config, String> {
    let file: FileConfig = fleetconf::Layers::new(path, &fleetconf::Env::process(), &[]).extract().map_err(|e| e.0)?;
    let mode =
        u32::from_str_radix(file.socket_mode.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777).ok_or_else(
            || format!("setting `socket_mode`: {:?} is not octal permission bits like 0660", file.socket_mode),
        )?;
    if mode & 0o002 != 0 {
        return Err("setting `socket_mode`: others may not have write access (anyone could run sandboxes)".into());
    }
    if file.sandbox.runner.is_some() {
        return Err("setting `sandbox.runner`: the runner itself talks to the engine; remove it".into());
    }
    if !file.socket.is_absolute() || !file.workspace_root.is_absolute() {
        return Err("settings `socket` and `workspace_root` must be absolute paths".into());
    }
    let policy = RunnerPolicy {
        workspace_root: file.workspace_root,
        max_timeout: Duration::from_secs(file.sandbox.timeout_secs.max(1)),
        allowed_uids: file.allowed_uids,
        max_concurrent: file.max_concurrent.max(1),
    };
    if file.name.is_empty() || !file.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!("setting `name`: {:?} is not 1 or more of [A-Za-z0-9._-]", file.name));
    }
    Ok(Config { name: file.name, socket: file.socket, mode, group: file.socket_group, policy, sandbox: file.sandbox })
}

/// Runs one sandbox over a directory of the workspace root holding a fresh marker, and
/// checks that the sandbox reads the marker: the engine resolves mount paths on its own
/// host, so a runner whose workspace_root is mounted at another path than the host's would
/// otherwise hand sandboxes directories they cannot see.
async fn probe(engine: &Engine, root: &Path, name: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let marker = uuid::Uuid::now_v7().to_string();
    let dir = root.join(format!(".probe-{marker}"));
    std::fs::create_dir(&dir).with_context(|| format!("Failed to create {}", dir.display()))?;
    let result = async {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(dir.join("marker"), &marker)?;
        let labels =
            workers::sandbox::SandboxLabels { task: "probe".into(), role: "probe".into(), instance: name.into() };
        let spec = workers::sandbox::RunSpec::new(vec!["cat".into(), "/workspace/marker".into()], &dir, labels);
        let out = engine.run(spec, &tokio_util::sync::CancellationToken::new()).await?;
        anyhow::ensure!(
            out.success() && out.output == marker.as_bytes(),
            "a sandbox over {} did not see the runner's files (exit {:?})",
            dir.display(),
            out.exit_code
        );
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result.with_context(|| {
        format!(
            "The engine does not see workspace_root {} as this runner does: mount the host's directory at the same path in the runner's container",
            root.display()
        )
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match telemetry::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(Command::EgressPolicy { registries, private_mirrors, extra_ports, listen_port }) = cli.command {
        let policy = workers::egress::EgressPolicy { registries, private_mirrors, extra_ports, listen_port };
        return match policy.squid_conf() {
            Ok(conf) => {
                print!("{conf}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sandbox-runner egress-policy: {e}");
                ExitCode::from(64)
            }
        };
    }
    let _telemetry = match telemetry::init("sandbox-runner", cli.json_logs) {
        Ok(t) => t,
        Err(code) => return code,
    };
    telemetry::serve("sandbox-runner", load(cli.config.as_deref()), |cfg, shutdown| async move {
        use anyhow::Context;
        cfg.policy.prepare_root().map_err(anyhow::Error::msg).context("Failed to prepare the workspace root")?;
        let engine =
            Engine::connect(cfg.sandbox).await.context("Failed to set up the sandbox engine")?.owned_by(&cfg.name);
        let swept = engine.sweep(None).await.context("Failed to sweep leftover sandboxes")?;
        probe(&engine, &cfg.policy.workspace_root, &cfg.name).await?;
        if let Some(dir) = cfg.socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("Failed to create {}", dir.display()))?;
        }
        // A socket left by a previous run would make bind fail.
        match std::fs::remove_file(&cfg.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("Failed to remove the old {}", cfg.socket.display()))),
        }
        let listener = tokio::net::UnixListener::bind(&cfg.socket)
            .with_context(|| format!("Failed to listen on {}", cfg.socket.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(cfg.mode))
            .with_context(|| format!("Failed to chmod {}", cfg.socket.display()))?;
        if let Some(gid) = cfg.group {
            std::os::unix::fs::chown(&cfg.socket, None, Some(gid))
                .with_context(|| format!("Failed to give {} to gid {gid}", cfg.socket.display()))?;
        }
        tracing::info!(socket = %cfg.socket.display(), root = %cfg.policy.workspace_root.display(), swept, "Sandbox runner listening.");
        workers::runner::serve(listener, engine, Arc::new(cfg.policy), shutdown).await;
        let _ = std::fs::remove_file(&cfg.socket);
        Ok::<(), anyhow::Error>(())
    })
    .await
}
