//! A live orchestrator API on throwaway servers, for tools that test it over HTTP
//! (deploy/schemathesis.sh): Postgres and Redis started by fleet-testkit, the schema
//! migrated, and the real [`orchestrator::api::router`] served on 127.0.0.1 at a free
//! port. No workers run; one task waits in Dev with an open question, so that the
//! question routes have something to list and answer.
//!
//! Usage: `cargo run -p orchestrator --example live_api -- DIR`. Writes `DIR/url` (the
//! API's base URL) and `DIR/jwt.secret` (a fresh secret to issue tokens with: `fleetctl
//! token issue --secret-file DIR/jwt.secret`), then serves until SIGINT or SIGTERM and
//! stops its servers.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use envelope::{Instance, Keyring, MasterFile, MasterSecret, PermissionTable, Process, Role};
use orchestrator::api::{self, ApiConfig, ApiState};
use orchestrator::audit::AuditKey;
use orchestrator::tasks::{Actor, Engine, EngineConfig, NewTask};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: live_api DIR")?);
    let pg = fleet_testkit::Postgres::start().context("Failed to start Postgres")?;
    let redis = fleet_testkit::RedisServer::start().context("Failed to start redis-server")?;
    let pool = PgPool::connect(&pg.create_database()?).await.context("Failed to connect to Postgres")?;
    orchestrator::db::migrate(&pool).await.context("Failed to migrate")?;

    let master = MasterFile::new(MasterSecret::from_bytes(rand_bytes()));
    let keyring = Keyring::derive(&master, Process::Role(Role::Orchestrator), &PermissionTable::parse(PERMISSIONS)?)?;
    let engine = Engine::new(
        pool.clone(),
        Arc::new(keyring),
        AuditKey::new(rand_bytes().to_vec()).map_err(anyhow::Error::msg)?,
        EngineConfig::new(Instance::parse("orchestrator-0")?),
    );
    let task = engine
        .submit(
            &Actor::operator("seed"),
            NewTask {
                title: "Seeded task".into(),
                instructions: "Add input validation to login()".into(),
                repository: None,
                test_command: None,
                risk: orchestrator::state::Risk::Low,
                scope: vec![],
            },
        )
        .await?;
    sqlx::query(
        "INSERT INTO questions (id, task_id, asked_by_role, asked_by_instance, text) VALUES ($1, $2, 'dev', 'dev-1', 'Which hash?')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(task.id)
    .execute(&pool)
    .await?;

    let secret = hex::encode(rand_bytes());
    let redis_pool = bus::pool(SecretString::from(redis.url()), 4, Duration::from_secs(1))?;
    let mut config = ApiConfig::new(SecretString::from(secret.clone()));
    // Fuzzing submits many tasks; the limit itself is tested elsewhere.
    config.rate_limit_burst = 100_000;
    config.rate_limit_per_second = 10_000.0;
    let state = ApiState::new(engine, redis_pool, &config)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join("jwt.secret"))?;
        writeln!(file, "{secret}")?;
    }
    std::fs::write(dir.join("url"), &url)?;
    println!("Serving the API at {url} (task {} waits with a question).", task.id);

    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api::serve(listener, api::router(state), shutdown.clone()));
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    drop((pool, redis, pg));
    Ok(())
}

/// 32 bytes that differ per run (a throwaway secret on loopback, not a key to keep).
fn rand_bytes() -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let seed = format!("{:?}{:?}{}", std::time::SystemTime::now(), std::thread::current().id(), std::process::id());
    Sha256::digest(seed.as_bytes()).into()
}
