//! `orchestrator`: owns task state; consumes results, heartbeats and questions; serves the API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The agentfleet orchestrator: the only process that changes task state. It keeps tasks in
/// Postgres, writes every outgoing envelope into the outbox in the same transaction (the
/// outbox-relay publishes them), consumes fleet:results, fleet:heartbeats and
/// fleet:questions, reassigns steps whose worker went silent, and serves the HTTP API.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The TOML configuration file (see docs/operations.md). FLEET_DATABASE_URL and
    /// FLEET_REDIS_URL override the URLs in it.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
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
    telemetry::init("orchestrator", cli.json_logs);
    let config = match orchestrator::app::Config::load(&cli.config, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Invalid configuration.");
            eprintln!("orchestrator: {e}");
            return ExitCode::from(telemetry::EX_USAGE);
        }
    };
    let shutdown = telemetry::shutdown();
    let app = match orchestrator::app::App::build(config).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Failed to start.");
            return ExitCode::FAILURE;
        }
    };
    match app.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Stopped on an error.");
            ExitCode::FAILURE
        }
    }
}
