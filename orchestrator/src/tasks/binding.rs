//! Binding an assignment to the one worker instance that holds it.
//!
//! Every instance of a role reads every assignment on `fleet:tasks:<role>`, so a lease by
//! itself says only "some dev worker". The first `tool.request`, `heartbeat` or
//! `task.result` that names the current assignment (its envelope id, the lease's `jti`)
//! binds it to the sender's instance (`tasks.assigned_to`, set under the task's row lock).
//! From then on only that instance may use the lease, keep the step alive or report its
//! result; anyone else is refused with [`HOLD_ELSEWHERE`] and audited. A new assignment
//! (reassignment after the deadline, a new step, a resume) clears the binding and carries a
//! new lease.
//!
//! Every use by the holder is a sign of life and pushes the step's deadline back. A holder
//! silent for longer than `takeover_after` (it crashed or was killed; the bus then lets a
//! peer reclaim its task entry) loses the binding to the next instance that uses the
//! assignment, audited as `task.rebound`, so a crashed worker's step is finished by the peer
//! that took its entry over instead of waiting for the step's deadline.
//!
//! The instance is what the envelope's `from.instance` says, and all instances of a role
//! share their edge key, so it is a claim, not a proof: binding stops an instance from using
//! the lease its live peer holds, and an instance that binds an unclaimed (or abandoned)
//! assignment first is no worse than one the assignment was delivered to.

use chrono::{DateTime, Utc};
use envelope::{Envelope, Role, Verified};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Actor, Engine, EngineError, Task, lock_task};
use crate::audit;

/// Reason code: the assignment is bound to another instance of the role.
pub const HOLD_ELSEWHERE: &str = "lease_bound_elsewhere";

/// Reason code: the assignment named is not the task's current one.
pub const HOLD_STALE: &str = "lease_stale";

/// Whether an instance holds a task's current assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// It does (it did already, or it bound the assignment just now).
    Held,
    /// The assignment named is not the task's current one (or the task has none, or it is
    /// another role's).
    Stale,
    /// Another, live instance holds it.
    Elsewhere {
        /// The holder.
        holder: String,
    },
}

impl Hold {
    /// The reason code of a refusal; `None` for [`Hold::Held`].
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Hold::Held => None,
            Hold::Stale => Some(HOLD_STALE),
            Hold::Elsewhere { .. } => Some(HOLD_ELSEWHERE),
        }
    }
}

/// What `instance` of `role` may do with `assignment` of `task`: `Ok(previous)` when it
/// holds it or may bind it now (`previous`: the silent holder it takes over from), or the
/// refusal. A holder whose deadline is before `silent_before` has been silent for longer
/// than `takeover_after`.
fn claim_of(
    task: &Task,
    assignment: Option<Uuid>,
    role: Role,
    instance: &str,
    silent_before: DateTime<Utc>,
) -> Result<Option<String>, Hold> {
    if assignment.is_none() || task.assignment_id != assignment || task.state.worker() != Some(role) {
        return Err(Hold::Stale);
    }
    match task.assigned_to.as_deref() {
        None => Ok(None),
        Some(holder) if holder == instance => Ok(None),
        Some(holder) if task.deadline_at.is_some_and(|d| d < silent_before) => Ok(Some(holder.to_owned())),
        Some(holder) => Err(Hold::Elsewhere { holder: holder.to_owned() }),
    }
}

impl Engine {
    /// The deadline a step gets from a sign of life now, and the deadline before which its
    /// holder counts as silent for longer than `takeover_after`.
    fn liveness(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        let deadline = Utc::now() + self.cfg.step_deadline;
        (deadline, deadline - self.cfg.takeover_after)
    }

    /// Binds `assignment` of `task` to `instance` of `role` unless another, live instance
    /// holds it, and pushes the step's deadline back (a use is a sign of life); says whether
    /// `instance` holds it now. Under the task's row lock, so two instances racing for an
    /// unbound assignment cannot both win.
    pub async fn hold(
        &self,
        task: Uuid,
        assignment: Option<Uuid>,
        role: Role,
        instance: &str,
    ) -> Result<Hold, EngineError> {
        let mut tx = self.pool.begin().await?;
        let t = match lock_task(&mut tx, task).await {
            Ok(t) => t,
            Err(EngineError::NotFound(_)) => return Ok(Hold::Stale),
            Err(e) => return Err(e),
        };
        let (deadline, silent_before) = self.liveness();
        let previous = match claim_of(&t, assignment, role, instance, silent_before) {
            Ok(previous) => previous,
            Err(refused) => return Ok(refused),
        };
        sqlx::query("UPDATE tasks SET assigned_to = $2, deadline_at = $3 WHERE id = $1")
            .bind(task)
            .bind(instance)
            .bind(deadline)
            .execute(&mut *tx)
            .await?;
        if let Some(previous) = previous {
            self.audit_rebound(&mut tx, &t, role, &previous, instance).await?;
        }
        tx.commit().await?;
        Ok(Hold::Held)
    }

    /// A worker is alive: pushes back the deadline of the assignment it names
    /// (`causation_id`), binding it if nobody (alive) holds it. A heartbeat from an instance
    /// that does not hold the task's current assignment (another one holds it, or it names
    /// an old one or none) keeps nothing alive and is audited as `heartbeat.refused`.
    /// Returns whether the deadline moved.
    pub async fn heartbeat(&self, env: &Verified<Envelope>) -> Result<bool, EngineError> {
        let Some(task_id) = env.task_id else { return Ok(false) };
        let instance = env.from.instance.as_str();
        let hold = self.hold(task_id, env.causation_id, env.from.role, instance).await?;
        if hold == Hold::Held {
            return Ok(true);
        }
        tracing::warn!(task = %task_id, from = %instance, code = hold.code(), "Refused a heartbeat for an assignment the sender does not hold.");
        let mut tx = self.pool.begin().await?;
        self.audit_not_held(&mut tx, env, "heartbeat.refused", &hold).await?;
        tx.commit().await?;
        Ok(false)
    }

    /// The binding check of a `task.result` on a task locked in `tx`: binds an unbound (or
    /// abandoned) current assignment to the sender; `Err(hold)` (after auditing
    /// `task.result.refused`) when another, live instance holds it. Stale results are the
    /// caller's business; this sees only current ones.
    pub(super) async fn hold_for_result(
        &self,
        tx: &mut PgConnection,
        task: &Task,
        env: &Verified<Envelope>,
    ) -> Result<Result<(), Hold>, EngineError> {
        let instance = env.from.instance.as_str();
        let (_, silent_before) = self.liveness();
        match claim_of(task, env.causation_id, env.from.role, instance, silent_before) {
            Ok(previous) => {
                if task.assigned_to.as_deref() != Some(instance) {
                    sqlx::query("UPDATE tasks SET assigned_to = $2 WHERE id = $1")
                        .bind(task.id)
                        .bind(instance)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(previous) = previous {
                    self.audit_rebound(tx, task, env.from.role, &previous, instance).await?;
                }
                Ok(Ok(()))
            }
            Err(refused) => {
                self.audit_not_held(tx, env, "task.result.refused", &refused).await?;
                Ok(Err(refused))
            }
        }
    }

    /// Appends `task.rebound`: `to` took over the current assignment of `task` from `from`,
    /// which had been silent for longer than `takeover_after`.
    async fn audit_rebound(
        &self,
        tx: &mut PgConnection,
        task: &Task,
        role: Role,
        from: &str,
        to: &str,
    ) -> Result<(), EngineError> {
        tracing::warn!(task = %task.id, from, to, "A worker took over the step of a silent one.");
        let actor = Actor { role: role.as_str().into(), instance: to.into() };
        let detail = json!({
            "assignment_id": task.assignment_id.map(|id| id.to_string()),
            "from": from,
            "to": to,
            "last_seen_deadline": task.deadline_at,
        });
        audit::append(tx, &self.audit_key, actor.entry("task.rebound", Some(task.id), detail)).await?;
        Ok(())
    }

    /// Appends `action` for an envelope from an instance that does not hold the assignment.
    pub(super) async fn audit_not_held(
        &self,
        tx: &mut PgConnection,
        env: &Verified<Envelope>,
        action: &str,
        hold: &Hold,
    ) -> Result<(), EngineError> {
        // A worker that is not the holder can send these as fast as it likes: audited per
        // sender at the refusal rate, counted beyond it (crate::refusals).
        if !self.audit_refusal(env) {
            return Ok(());
        }
        let holder = match hold {
            Hold::Elsewhere { holder } => Some(holder.as_str()),
            _ => None,
        };
        let detail = json!({
            "envelope_id": env.id.to_string(),
            "assignment_id": env.causation_id.map(|id| id.to_string()),
            "code": hold.code(),
            "holder": holder,
        });
        audit::append(tx, &self.audit_key, Actor::of(env).entry(action, env.task_id, detail)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TaskState;

    fn task(state: TaskState, assignment: Uuid, holder: Option<&str>, deadline: DateTime<Utc>) -> Task {
        let now = Utc::now();
        Task {
            id: Uuid::now_v7(),
            state,
            resume_state: None,
            title: "t".into(),
            spec: json!({}),
            risk: crate::state::Risk::Low,
            attempt: 1,
            retries: 0,
            assignment_id: Some(assignment),
            assigned_to: holder.map(str::to_owned),
            deadline_at: Some(deadline),
            submitted_by: "op".into(),
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn only_the_holder_or_a_peer_of_a_silent_one_may_use_an_assignment() {
        let a = Uuid::now_v7();
        let now = Utc::now();
        let (live, silent) = (now + chrono::Duration::seconds(60), now - chrono::Duration::seconds(1));
        let unbound = task(TaskState::Dev, a, None, live);
        assert_eq!(claim_of(&unbound, Some(a), Role::Dev, "dev-1", now), Ok(None));
        assert_eq!(claim_of(&unbound, Some(Uuid::now_v7()), Role::Dev, "dev-1", now), Err(Hold::Stale));
        assert_eq!(claim_of(&unbound, None, Role::Dev, "dev-1", now), Err(Hold::Stale));
        assert_eq!(claim_of(&unbound, Some(a), Role::Qa, "qa-1", now), Err(Hold::Stale));
        let bound = task(TaskState::Dev, a, Some("dev-1"), live);
        assert_eq!(claim_of(&bound, Some(a), Role::Dev, "dev-1", now), Ok(None));
        assert_eq!(claim_of(&bound, Some(a), Role::Dev, "dev-2", now), Err(Hold::Elsewhere { holder: "dev-1".into() }));
        let abandoned = task(TaskState::Dev, a, Some("dev-1"), silent);
        assert_eq!(claim_of(&abandoned, Some(a), Role::Dev, "dev-2", now), Ok(Some("dev-1".into())));
        let halted = task(TaskState::Halted, a, Some("dev-1"), live);
        assert_eq!(claim_of(&halted, Some(a), Role::Dev, "dev-1", now), Err(Hold::Stale));
    }
}
