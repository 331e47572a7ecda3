//! The orchestrator's side of the kill switch: it follows `fleet:control:orchestrator`
//! (the budget manager's pauses and resumes) and the state record `fleet:killswitch` with a
//! [`bus::ControlListener`], which raises this process's [`KillEpoch`] (so its verifiers
//! refuse envelopes issued before a kill), and halts the fleet in Postgres on a pause with
//! [`Engine::kill_at`]: open tasks halted, merges and approvals refused until an admin
//! resumes.
//!
//! It does not loop: `kill_at` tells the budget manager (`control.pause` on
//! `fleet:control:budget`), and a pause reaching an engaged budget is a no-op. A pause the
//! fleet already resumed from (an admin's resume the budget had not processed yet, found
//! again in the state record) is ignored by `kill_at`.

use std::sync::Arc;
use std::time::Duration;

use bus::{ControlEvent, ControlListener, Gate, KillEpoch};
use envelope::{Role, Verifier};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::tasks::{Actor, Engine};

/// The actor of a kill the budget manager engaged, in task events and the audit trail.
pub fn budget_actor() -> Actor {
    Actor { role: "budget".into(), instance: "kill switch".into() }
}

/// Follows the control stream until `shutdown`; halts the fleet on every pause. The state
/// record is read first, so an orchestrator started during a kill halts at once.
pub async fn run(
    engine: Engine,
    redis: bus::RedisPool,
    verifier: Arc<Verifier>,
    epoch: KillEpoch,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = ControlListener::new(redis, verifier, Role::Orchestrator, epoch, Gate::default()).with_events(tx);
    if let Err(e) = listener.sync().await {
        tracing::warn!(error = %e, "Cannot read the kill-switch record yet; the listener retries.");
    }
    let listening = tokio::spawn(listener.run(shutdown.clone()));
    loop {
        let event = tokio::select! {
            e = rx.recv() => e,
            () = shutdown.cancelled() => None,
        };
        let Some(event) = event else { break };
        match event {
            ControlEvent::Pause { epoch, reason } => halt(&engine, epoch, &reason, &shutdown).await,
            ControlEvent::Resume { epoch } => {
                tracing::info!(epoch, "The budget manager released the kill switch.");
            }
        }
    }
    let _ = listening.await;
}

/// [`Engine::kill_at`], retried with backoff while Postgres fails.
async fn halt(engine: &Engine, epoch: u64, reason: &str, shutdown: &CancellationToken) {
    let mut delays = bus::backoff(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match engine.kill_at(&budget_actor(), epoch, reason).await {
            Ok(now) => {
                tracing::warn!(epoch = now, reason, "Kill switch: the fleet is halted.");
                return;
            }
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot halt the fleet for the kill switch; retrying.");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}
