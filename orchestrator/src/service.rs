//! The orchestrator's bus side: handlers for `fleet:results`, `fleet:heartbeats` and
//! `fleet:questions`, and the periodic tick (deadlines, retries after backoff).

use std::time::Duration;

use bus::{Delivery, Handler, HandlerError};
use envelope::Payload;
use tokio_util::sync::CancellationToken;

use crate::tasks::{Applied, Engine, EngineError};

/// Maps engine failures to the bus's retry policy: database trouble is worth retrying;
/// content the engine can't use never will be.
fn classify(e: EngineError) -> HandlerError {
    match e {
        EngineError::Db(_) | EngineError::Outbox(_) => HandlerError::Transient(e.to_string()),
        EngineError::NotFound(_) | EngineError::Illegal(_) | EngineError::Invalid(_) | EngineError::Halted => {
            HandlerError::Permanent(e.to_string())
        }
    }
}

/// Applies `task.result`s.
#[derive(Debug, Clone)]
pub struct Results(pub Engine);

impl Handler for Results {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        match self.0.apply_result(&d.envelope).await.map_err(classify)? {
            Applied::Moved(to) => {
                tracing::info!(task = ?d.envelope.task_id, to = %to, from = %d.envelope.from.instance, "Applied a result.")
            }
            Applied::Duplicate => tracing::debug!(envelope = %d.envelope.id, "Result already applied."),
            Applied::Stale => {
                tracing::warn!(envelope = %d.envelope.id, task = ?d.envelope.task_id, "Ignored a result for an assignment that is no longer current.")
            }
        }
        Ok(())
    }
}

/// Tracks liveness from heartbeats.
#[derive(Debug, Clone)]
pub struct Heartbeats(pub Engine);

impl Handler for Heartbeats {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        if matches!(d.envelope.payload, Payload::Heartbeat(_)) {
            self.0.heartbeat(&d.envelope).await.map_err(classify)?;
        }
        Ok(())
    }
}

/// Records questions for humans in the audit trail.
#[derive(Debug, Clone)]
pub struct Questions(pub Engine);

impl Handler for Questions {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        if let Payload::Question(q) = &d.envelope.payload {
            self.0.record_question(&d.envelope, &q.text).await.map_err(classify)?;
        }
        Ok(())
    }
}

/// Runs [`Engine::tick`] every `every` until shutdown; errors are logged and retried next tick.
pub async fn tick_loop(engine: Engine, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        match engine.tick().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tasks = n, "Reassigned or issued steps."),
            Err(e) => tracing::warn!(error = %e, "Tick failed; retrying next tick."),
        }
    }
}
