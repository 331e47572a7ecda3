//! Noticing that Redis lost its data, and recovering within seconds.
//!
//! Redis keeps every stream, group, pending entry and the kill record; Postgres keeps the
//! tasks. If Redis loses its data (a crash with no persisted append-only file, a lost
//! volume, a fresh replica promoted) the open steps' assignments are gone, and without
//! this the tasks would wait for their step deadline (minutes). So the orchestrator keeps
//! a random value both in Postgres (`fleet_state.redis_sentinel`) and in Redis
//! (`fleet:sentinel`), and checks every few seconds that Redis still has it. When Redis
//! answers without it, [`Engine::reissue_after_redis_loss`] re-issues every open step
//! and restores the kill record through the budget manager; then the value is written
//! again. Consumer groups come back by themselves: every consumer re-creates its group
//! when a read fails.
//!
//! Two orchestrators may both notice the loss; each then re-issues, and the results of
//! the first re-issue are refused as stale: wasted work, never a lost or doubled task.

use std::time::Duration;

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::tasks::{Engine, EngineError};

/// The key in Redis (granted to the orchestrator's ACL user by `fleetctl acl generate`).
pub const KEY: &str = "fleet:sentinel";

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Redis has the value Postgres has.
    Intact,
    /// There was no value yet (a new fleet): one was made and written to both.
    Initialised,
    /// Redis had lost it: this many steps were re-issued and the value written again.
    Recovered(u64),
    /// Redis holds another value: it is another fleet's Redis, or someone wrote the key.
    /// Nothing is done (re-issuing into another fleet's Redis would be wrong).
    Foreign,
}

/// A check failed (Redis or Postgres unreachable); the next one tries again.
#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error("Redis: {0}")]
    Redis(String),
    #[error("Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn redis_error(e: impl std::fmt::Display) -> SentinelError {
    SentinelError::Redis(e.to_string().chars().take(300).collect())
}

/// One check (see the module's documentation).
pub async fn check(engine: &Engine, redis: &bus::RedisPool) -> Result<Check, SentinelError> {
    let expected: Option<String> =
        sqlx::query_scalar("SELECT redis_sentinel FROM fleet_state").fetch_one(engine.pool()).await?;
    let mut c = redis.get().await.map_err(redis_error)?;
    let found: Option<String> = c.get(KEY).await.map_err(redis_error)?;
    match (expected, found) {
        (Some(e), Some(f)) if e == f => Ok(Check::Intact),
        (Some(_), Some(_)) => Ok(Check::Foreign),
        (None, _) => {
            let fresh = uuid::Uuid::now_v7().to_string();
            // Another orchestrator may have made one meanwhile: the stored one wins.
            let value: String = sqlx::query_scalar(
                "UPDATE fleet_state SET redis_sentinel = coalesce(redis_sentinel, $1) RETURNING redis_sentinel",
            )
            .bind(&fresh)
            .fetch_one(engine.pool())
            .await?;
            let () = c.set(KEY, &value).await.map_err(redis_error)?;
            Ok(Check::Initialised)
        }
        (Some(e), None) => {
            // Re-issue first, then mark: a crash in between means the next check (here or
            // at the next start) recovers again, not that the loss goes unnoticed.
            let n = engine.reissue_after_redis_loss("fleet:sentinel missing from Redis").await?;
            let () = c.set(KEY, &e).await.map_err(redis_error)?;
            Ok(Check::Recovered(n))
        }
    }
}

/// Checks every `every` until `shutdown`.
pub async fn watch(engine: Engine, redis: bus::RedisPool, every: Duration, shutdown: CancellationToken) {
    let mut foreign_reported = false;
    loop {
        match check(&engine, &redis).await {
            Ok(Check::Intact) => foreign_reported = false,
            Ok(Check::Initialised) => tracing::info!(key = KEY, "Redis sentinel written."),
            Ok(Check::Recovered(steps)) => tracing::error!(
                steps,
                "Redis lost its data (its sentinel is gone): every open step was issued again and the kill record restored."
            ),
            Ok(Check::Foreign) => {
                if !foreign_reported {
                    tracing::error!(
                        key = KEY,
                        "Redis holds another fleet's sentinel: is redis_url this fleet's Redis? Nothing is re-issued."
                    );
                    foreign_reported = true;
                }
            }
            Err(e) => tracing::debug!(error = %e, "Redis sentinel check failed; trying again."),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
