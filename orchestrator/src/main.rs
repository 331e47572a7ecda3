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
    let config = orchestrator::app::Config::load(&cli.config, &|k| std::env::var(k).ok());
    telemetry::serve("orchestrator", config, |config, shutdown| async move {
        use anyhow::Context;
        let app = orchestrator::app::App::build(config).await.context("Failed to start")?;
        app.run(shutdown).await
    })
    .await
}
