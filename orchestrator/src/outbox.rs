//! Writing outgoing envelopes into the outbox, inside the caller's transaction.
//!
//! The envelope is sealed here, so the relay forwards bytes and never needs a key; the row
//! commits or vanishes with the state change that produced it.

use envelope::{Envelope, Keyring, StreamName};
use sqlx::PgConnection;

/// Sealing or inserting failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// No key for the envelope's edge in the orchestrator's keyset.
    #[error("cannot seal: {0}")]
    Seal(#[from] envelope::KeyError),
    /// Postgres refused the insert.
    #[error("cannot insert into the outbox: {0}")]
    Db(#[from] sqlx::Error),
}

/// Seals `env` and inserts it for `stream`.
pub async fn enqueue(
    conn: &mut PgConnection,
    keyring: &Keyring,
    stream: &StreamName,
    env: &Envelope,
) -> Result<(), OutboxError> {
    let frame = keyring.seal(env)?;
    sqlx::query("INSERT INTO outbox (stream, envelope_id, task_id, frame, traceparent) VALUES ($1, $2, $3, $4, $5)")
        .bind(stream.as_str())
        .bind(env.id)
        .bind(env.task_id)
        .bind(frame)
        .bind(env.traceparent.as_deref())
        .execute(conn)
        .await?;
    Ok(())
}
