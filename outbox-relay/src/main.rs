//! `outbox-relay`: forwards the orchestrator's outbox to Redis Streams.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use outbox_relay::{Config, Relay};

/// Forwards the orchestrator's transactional outbox (rows of already-signed envelopes in
/// Postgres) to the Redis Streams they name. Holds no signing key.
#[derive(Debug, Parser)]
#[command(
    version,
    after_long_help = concat!(
        "Settings come from the TOML file, then FLEET_<KEY> variables for every setting, then\n",
        "FLEET_DATABASE_URL_FILE / FLEET_REDIS_URL_FILE for the secret URLs (docs/deployment.md).\n",
        "Unknown keys are refused. Settings (defaults in brackets):\n",
        "  database_url            postgres://… (secret) [required]\n",
        "  redis_url               redis://… or rediss://… (secret) [required]\n",
        "  redis_ca_file           PEM CA of Redis's certificate (rediss:// only) [system roots]\n",
        "  batch_size              rows per claim and XADD pipeline [256]\n",
        "  poll_interval_ms        poll when no NOTIFY arrives [1000]\n",
        "  retention_secs          keep dispatched rows this long [86400]\n",
        "  prune_interval_secs     how often to prune [300]\n",
        "  prune_batch             rows per DELETE [1000]\n",
        "  shutdown_grace_ms       time for the batch in flight on SIGINT/SIGTERM [10000]\n",
        "  backpressure_pause_ms   leave a stream near its cap alone this long [1000]\n",
        "  retry_min_ms, retry_max_ms   backoff after Postgres/Redis failures [100, 10000]\n",
        "  pg_max_connections      Postgres pool size, at least 3 [4]\n",
        "  redis_pool_size         Redis pool size [4]\n",
        "  default_stream_cap      approximate MAXLEN of every stream [1000000]\n",
        "  [stream_caps]           per-stream MAXLEN, e.g. \"fleet:tasks:dev\" = 100000\n",
        "  [metrics]               listen (e.g. 0.0.0.0:9464) [unset: no endpoint], token (secret,\n",
        "                          FLEET_METRICS__TOKEN_FILE) [unset]; GET /metrics\n",
        "\n",
        "Logs go to stderr (text, or JSON lines with --json-logs); RUST_LOG=debug for more.\n",
        "Exit codes: 0 after a clean shutdown, 64 for invalid arguments or configuration, 1 otherwise."
    )
)]
struct Cli {
    /// The TOML configuration file. Optional: every setting can come from FLEET_<KEY>
    /// variables instead.
    #[arg(long, env = "FLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = match telemetry::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let _telemetry = match telemetry::init("outbox-relay", cli.json_logs) {
        Ok(t) => t,
        Err(code) => return code,
    };
    telemetry::serve(
        "outbox-relay",
        Config::load(cli.config.as_deref(), &fleetconf::Env::process()),
        |cfg, shutdown| async move {
            let relay = Relay::connect(&cfg.endpoints, cfg.relay)?;
            let mut registry = telemetry::metrics::registry("outbox-relay");
            registry.register_collector(Box::new(outbox_relay::relay::RelayMetrics(relay.stats())));
            telemetry::metrics::serve(&cfg.metrics, registry, None, shutdown.clone())
                .await
                .map_err(|e| outbox_relay::RelayError::Metrics(e.to_string()))?;
            // The relay drains itself: on cancellation it lets the batch in flight finish within
            // `shutdown_grace`, then returns.
            relay.run(shutdown).await;
            Ok::<(), outbox_relay::RelayError>(())
        },
    )
    .await
}
