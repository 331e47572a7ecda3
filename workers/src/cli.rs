//! The command line of `dev-worker`, `qa-worker`, `review-worker` and `refactor-worker`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use envelope::Role;

use crate::config::WorkerConfig;

/// An agentfleet worker: consumes its role's tasks from Redis, runs code in Docker
/// sandboxes, asks the orchestrator's tool proxy for model calls, and sends signed results.
#[derive(Debug, Parser)]
#[command(
    version,
    after_long_help = concat!(
        "Settings come from the TOML file, then FLEET_<KEY> variables for every setting (nested keys\n",
        "joined with __, e.g. FLEET_SANDBOX__IMAGE), then FLEET_REDIS_URL_FILE for the secret URL\n",
        "(docs/deployment.md). Unknown keys are refused. Settings (defaults in brackets):\n",
        "  redis_url            redis://… or rediss://… (secret) [required]\n",
        "  redis_ca_file        PEM CA of Redis's certificate (rediss:// only) [system roots]\n",
        "  keyset               this role's keyset file (fleetctl keys derive --process <role>) [required]\n",
        "  keyset_reload_secs   re-read the keyset file this often; SIGHUP: at once [5]\n",
        "  permissions          the permission table [config/permissions.toml]\n",
        "  instance             consumer name, stable per process slot [<role>-<host_name>-<slot>]\n",
        "  host_name            host part of the default instance name [the kernel's hostname];\n",
        "                       set it in containers, whose hostname changes when recreated\n",
        "  workspace_root       assignments' workspaces must be inside it [/workspace]\n",
        "  heartbeat_secs       [5]     tool_timeout_secs [180]\n",
        "  git_timeout_secs     [120]   grace_secs (drain on SIGTERM) [10]\n",
        "  git_output_cap_bytes [8388608] (a git command printing more is killed)\n",
        "  [sandbox]            image [agentfleet/sandbox:current], runtime, runtime_by_risk,\n",
        "                       memory_bytes, nano_cpus, pids_limit, timeout_secs [300],\n",
        "                       output_cap_bytes, tmpfs_bytes, workspace_max_bytes [1 GiB],\n",
        "                       workspace_poll_ms [100], seccomp_profile (docs/sandbox.md)\n",
        "  [consumer]           claim_idle_secs [60], block_ms [1000], retry_max_secs [30],\n",
        "                       max_deliveries [5]\n",
        "  [metrics]            listen (e.g. 0.0.0.0:9464) [unset: no endpoint], token (secret,\n",
        "                       FLEET_METRICS__TOKEN_FILE) [unset: no token]; GET /metrics\n",
        "\n",
        "Environment: FLEET_CONFIG (same as --config), FLEET_INSTANCE (same as --instance),\n",
        "DOCKER_HOST (the engine; default /var/run/docker.sock), RUST_LOG (log filter).\n",
        "Needs: a reachable Redis, the Docker engine with the sandbox image (deploy/sandbox-image.sh),\n",
        "git on PATH. See docs/workers.md.\n",
        "Exit codes: 0 after a clean shutdown, 64 for invalid arguments or configuration, 1 when startup fails."
    )
)]
pub struct Cli {
    /// The TOML configuration file. Optional: every setting can come from FLEET_<KEY>
    /// variables instead (see below).
    #[arg(long, env = "FLEET_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This process's instance name (overrides `instance` in the file). Keep it stable
    /// across restarts of the same process slot: a restarted worker then finds its own
    /// unfinished task at once and removes its own leftover sandboxes.
    #[arg(long, env = "FLEET_INSTANCE", value_name = "NAME")]
    pub instance: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub json_logs: bool,
}

/// `main` of the worker binary for `role`.
pub async fn main(role: Role) -> ExitCode {
    let cli: Cli = match telemetry::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let service = match role {
        Role::Dev => "dev-worker",
        Role::Qa => "qa-worker",
        Role::Review => "review-worker",
        Role::Refactor => "refactor-worker",
        _ => "worker",
    };
    let _telemetry = match telemetry::init(service, cli.json_logs) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let cfg = WorkerConfig::load(cli.config.as_deref(), role, cli.instance, &fleetconf::Env::process());
    telemetry::serve(service, cfg, crate::runtime::run).await
}
