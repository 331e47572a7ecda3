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
        EngineError::NotFound(_)
        | EngineError::IncidentNotFound(_)
        | EngineError::Illegal(_)
        | EngineError::Invalid(_)
        | EngineError::Halted
        | EngineError::Conflict(_)
        | EngineError::SelfApproval { .. } => HandlerError::Permanent(e.to_string()),
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
            Applied::Refused(hold) => {
                tracing::warn!(envelope = %d.envelope.id, task = ?d.envelope.task_id, from = %d.envelope.from.instance, code = hold.code(), "Refused a result from an instance that does not hold the assignment.")
            }
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

/// How often the next month's audit partition is made sure of.
const PARTITION_CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Runs [`Engine::tick`] every `every` until shutdown; errors are logged and retried next
/// tick. Hourly it also makes sure next month's audit partition exists, so a long-running
/// orchestrator never reaches a month it cannot append to.
pub async fn tick_loop(engine: Engine, every: Duration, shutdown: CancellationToken) {
    let mut next_partition_check = tokio::time::Instant::now() + PARTITION_CHECK_EVERY;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        if tokio::time::Instant::now() >= next_partition_check {
            next_partition_check += PARTITION_CHECK_EVERY;
            if let Err(e) = crate::db::ensure_audit_partitions(engine.pool()).await {
                tracing::error!(error = %e, "Cannot create next month's audit partition; appends will fail when the month turns.");
            }
        }
        match engine.tick().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tasks = n, "Reassigned or issued steps."),
            Err(e) => tracing::warn!(error = %e, "Tick failed; retrying next tick."),
        }
        if let Err(e) = engine.flush_refusal_summaries(false).await {
            tracing::warn!(error = %e, "Cannot write the suppressed refusals' summary rows; retrying next tick.");
        }
    }
}
