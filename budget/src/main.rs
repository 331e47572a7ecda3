//! `budget`: meters the fleet's model spend, keeps its counters, engages the kill switch
//! and sends the alerts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The agentfleet budget manager. It consumes fleet:usage, fleet:outcomes and
/// fleet:control:budget (consumer group "budget"), keeps usage and failure counters in
/// Redis, and engages the kill switch when the daily budget is spent, after N consecutive
/// failed steps (default 3), on an outcome with an unknown error kind, or on an operator's
/// kill (relayed by the orchestrator). Engaging writes the state record fleet:killswitch
/// once (new epoch, who, why, when), sends a signed control.pause to fleet:control:<role>
/// for dev, qa, review, refactor and orchestrator, and sends one alert (Telegram and/or a
/// Standard Webhooks signed webhook), retried until delivered. Only an admin's resume
/// (API or `fleetctl resume`) releases it. See docs/operations.md, "Kill switch".
///
/// Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM), 64 for an invalid command line
/// or configuration (the message names the setting), 1 when Redis cannot be reached at
/// start or another failure stops it.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The TOML configuration file (config/examples/budget.toml). Optional: FLEET_<KEY>
    /// variables set every setting (nested keys joined with __, e.g.
    /// FLEET_ALERTS__TELEGRAM__CHAT_ID) and win over the file; FLEET_<KEY>_FILE reads a
    /// secret (redis_url, alerts.telegram.bot_token, alerts.telegram.chat_id,
    /// alerts.webhook.url, alerts.webhook.secret, metrics.token) from a file. Prometheus
    /// metrics are served at GET /metrics on [metrics] listen (FLEET_METRICS__LISTEN, e.g.
    /// 0.0.0.0:9464; unset serves none). See docs/deployment.md.
    #[arg(long, env = "FLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match telemetry::parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _telemetry = match telemetry::init("budget", cli.json_logs) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let config = budget::app::Config::load(cli.config.as_deref(), &fleetconf::Env::process());
    telemetry::serve("budget", config, |config, shutdown| async move {
        let app = budget::app::App::build(config).await?;
        app.run(shutdown).await
    })
    .await
}
