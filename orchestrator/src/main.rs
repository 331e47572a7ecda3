//! `orchestrator`: owns task state; consumes results, heartbeats and questions; serves the API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The agentfleet orchestrator: the only process that changes task state. It keeps tasks in
/// Postgres, writes every outgoing envelope into the outbox in the same transaction (the
/// outbox-relay publishes them), consumes fleet:results, fleet:heartbeats and
/// fleet:questions, reassigns steps whose worker went silent, serves the HTTP API, mints a
/// capability lease into every assignment, answers workers' tool requests (model calls
/// metered by the budget ledger) and pushes approved tasks' branches.
#[derive(Debug, Parser)]
#[command(
    version,
    after_long_help = concat!(
        "Settings come from the TOML file, then FLEET_<KEY> variables for every setting (nested keys\n",
        "joined with __, e.g. FLEET_TOOLS__GIT__PUSH_ON_APPROVE), then FLEET_<KEY>_FILE for the\n",
        "secrets database_url, redis_url and tools.provider.api_key (docs/deployment.md).\n",
        "Unknown keys are refused. Every setting, its default and its variable: docs/deployment.md.\n",
        "Settings (defaults in brackets):\n",
        "  instance              this process's name, e.g. orchestrator-0 [required]\n",
        "  database_url          postgres://… (secret) [required]\n",
        "  redis_url             redis://… or rediss://… (secret) [required]\n",
        "  redis_ca_file         PEM CA of the Redis server's certificate (rediss:// only) [system roots]\n",
        "  keyset                fleetctl keys derive --process orchestrator [required]\n",
        "  keyset_reload_secs    re-read the keyset file this often; SIGHUP: at once [5]\n",
        "  permissions           [config/permissions.toml]\n",
        "  audit_key_file        fleetctl audit key new [required]\n",
        "  jwt_secret_file       fleetctl token secret new [required]\n",
        "  listen                HTTP API address [127.0.0.1:8080]\n",
        "  workspace_root        workspaces are <root>/task-<id>, as the workers' [/workspace]\n",
        "  max_retries [3]  step_deadline_secs [300]  takeover_after_secs [30]  tick_secs [1]\n",
        "  grace_secs [10]  four_eyes [true]  migrate_on_start [true]\n",
        "  rate_limit_burst [10]  rate_limit_per_second [1.0]  max_body_bytes [262144]\n",
        "  request_timeout_secs [30]\n",
        "  [repositories]        where tasks' repositories may come from (nothing by default):\n",
        "                        allowed_hosts (https), local_roots (absolute paths),\n",
        "                        allow_plaintext (http:// and git://) [false]\n",
        "  [tools]               the tool proxy (docs/tool-proxy.md): lease_secret_file (fleetctl\n",
        "                        token secret new --for lease), risk_matrix\n",
        "                        [config/risk_matrix.toml], ledger (limits and prices),\n",
        "                        [tools.provider] kind = openai | anthropic | scripted,\n",
        "                        [tools.models] default, per_role, [tools.git] push_on_approve\n",
        "\n",
        "Logs go to stderr (text, or JSON lines with --json-logs); RUST_LOG=debug for more.\n",
        "Exit codes: 0 after a clean shutdown, 64 for invalid arguments or configuration, 1 otherwise."
    )
)]
struct Cli {
    /// The TOML configuration file (docs/deployment.md). Optional: every setting can come
    /// from FLEET_<KEY> variables instead, and they win over the file.
    #[arg(long, env = "FLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
    /// Ask the running orchestrator of this configuration whether it is ready (GET /readyz
    /// on its `listen` address) and exit 0 if so, 1 if not: the container health check
    /// (the image has no shell and no curl).
    #[arg(long)]
    healthcheck: bool,
}

/// `--healthcheck`: 0 when /readyz answers 200 within 5 s.
async fn healthcheck(config: Result<orchestrator::app::Config, orchestrator::app::ConfigError>) -> ExitCode {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("orchestrator: invalid configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let mut addr = config.listen();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/readyz");
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build();
    match client.map(|c| c.get(&url)) {
        Ok(request) => match request.send().await {
            Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
            Ok(r) => {
                eprintln!("orchestrator: {url} answered {}", r.status());
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("orchestrator: {url}: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("orchestrator: cannot build an HTTP client: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match telemetry::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let config = orchestrator::app::Config::load(cli.config.as_deref(), &fleetconf::Env::process());
    if cli.healthcheck {
        return healthcheck(config).await;
    }
    let _telemetry = match telemetry::init("orchestrator", cli.json_logs) {
        Ok(t) => t,
        Err(code) => return code,
    };
    telemetry::serve("orchestrator", config, |config, shutdown| async move {
        use anyhow::Context;
        let app = orchestrator::app::App::build(config).await.context("Failed to start")?;
        app.run(shutdown).await
    })
    .await
}
