//! Binding an assignment to the one worker instance that holds it.
//!
//! Every instance of a role reads every assignment on `fleet:tasks:<role>`, so a lease by
//! itself says only "some dev worker". The first `tool.request`, `heartbeat` or
//! `task.result` that names the current assignment (its envelope id, the lease's `jti`)
//! binds it to the sender's instance: `tasks.assigned_to` is set, atomically, only while it
//! is empty. From then on only that instance may use the lease, keep the step alive or
//! report its result; anyone else is refused with [`HOLD_ELSEWHERE`] and audited. A new
//! assignment (reassignment after the deadline, a new step, a resume) clears the binding and
//! carries a new lease.
//!
//! The instance is what the envelope's `from.instance` says, and all instances of a role
//! share their edge key, so it is a claim, not a proof: binding stops an instance from using
//! the lease its peer already holds, and an instance that binds an unclaimed assignment
//! first is no worse than one the assignment was delivered to.

use envelope::{Envelope, Role, Verified};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Actor, Engine, EngineError, Task};
use crate::audit;
use crate::state::TaskState;

/// Reason code: the assignment is bound to another instance of the role.
pub const HOLD_ELSEWHERE: &str = "lease_bound_elsewhere";

/// Reason code: the assignment named is not the task's current one.
pub const HOLD_STALE: &str = "lease_stale";

/// Whether an instance holds a task's current assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// It does (it did already, or it bound the assignment just now).
    Held,
    /// The assignment named is not the task's current one (or the task has none).
    Stale,
    /// Another instance holds it.
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

/// What a task row says about `instance` of `role` and `assignment`.
pub(super) fn hold_of(task: &Task, assignment: Option<Uuid>, role: Role, instance: &str) -> Hold {
    if assignment.is_none() || task.assignment_id != assignment || task.state.worker() != Some(role) {
        return Hold::Stale;
    }
    match task.assigned_to.as_deref() {
        Some(holder) if holder != instance => Hold::Elsewhere { holder: holder.to_owned() },
        _ => Hold::Held,
    }
}

/// The task state in which `role` works (`dev`, …); a role that never works on tasks gets
/// a name no task state has, so nothing matches.
fn worker_state(role: Role) -> &'static str {
    match role {
        Role::Dev => TaskState::Dev.as_str(),
        Role::Qa => TaskState::Qa.as_str(),
        Role::Review => TaskState::Review.as_str(),
        Role::Refactor => TaskState::Refactor.as_str(),
        Role::Orchestrator | Role::Budget => "-",
    }
}

impl Engine {
    /// Binds `assignment` of `task` to `instance` of `role` unless another instance holds
    /// it; says whether `instance` holds it now. One `UPDATE`, so two instances racing for
    /// an unbound assignment cannot both win.
    pub async fn hold(&self, task: Uuid, assignment: Uuid, role: Role, instance: &str) -> Result<Hold, EngineError> {
        let bound = sqlx::query(
            "UPDATE tasks SET assigned_to = $4 WHERE id = $1 AND assignment_id = $2 AND state = $3 \
             AND (assigned_to IS NULL OR assigned_to = $4)",
        )
        .bind(task)
        .bind(assignment)
        .bind(worker_state(role))
        .bind(instance)
        .execute(&self.pool)
        .await?;
        if bound.rows_affected() > 0 {
            return Ok(Hold::Held);
        }
        Ok(hold_of(&self.get(task).await?, Some(assignment), role, instance))
    }

    /// A worker is alive: pushes back the deadline of the assignment it names
    /// (`causation_id`), binding it if nobody holds it yet. A heartbeat from an instance
    /// that does not hold the task's current assignment (another one holds it, or it names
    /// an old one or none) keeps nothing alive and is audited as `heartbeat.refused`.
    /// Returns whether the deadline moved.
    pub async fn heartbeat(&self, env: &Verified<Envelope>) -> Result<bool, EngineError> {
        let Some(task_id) = env.task_id else { return Ok(false) };
        let instance = env.from.instance.as_str();
        let deadline = chrono::Utc::now() + self.cfg.step_deadline;
        let updated = sqlx::query(
            "UPDATE tasks SET deadline_at = $1, assigned_to = $2 WHERE id = $3 AND assignment_id = $4 \
             AND state = $5 AND (assigned_to IS NULL OR assigned_to = $2)",
        )
        .bind(deadline)
        .bind(instance)
        .bind(task_id)
        .bind(env.causation_id)
        .bind(worker_state(env.from.role))
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() > 0 {
            return Ok(true);
        }
        let hold = match self.get(task_id).await {
            Ok(task) => match hold_of(&task, env.causation_id, env.from.role, instance) {
                // Bound between the two statements by this very instance: nothing to refuse.
                Hold::Held => return Ok(false),
                refused => refused,
            },
            Err(EngineError::NotFound(_)) => Hold::Stale,
            Err(e) => return Err(e),
        };
        tracing::warn!(task = %task_id, from = %instance, code = hold.code(), "Refused a heartbeat for an assignment the sender does not hold.");
        let mut tx = self.pool.begin().await?;
        self.audit_not_held(&mut tx, env, "heartbeat.refused", &hold).await?;
        tx.commit().await?;
        Ok(false)
    }

    /// The binding check of a `task.result` on a task locked in `tx`: binds an unbound
    /// current assignment to the sender; `Err(hold)` (after auditing
    /// `task.result.refused`) when the sender does not hold it. Stale results are the
    /// caller's business; this sees only current ones.
    pub(super) async fn hold_for_result(
        &self,
        tx: &mut PgConnection,
        task: &Task,
        env: &Verified<Envelope>,
    ) -> Result<Result<(), Hold>, EngineError> {
        let instance = env.from.instance.as_str();
        match hold_of(task, env.causation_id, env.from.role, instance) {
            Hold::Held if task.assigned_to.is_none() => {
                sqlx::query("UPDATE tasks SET assigned_to = $2 WHERE id = $1")
                    .bind(task.id)
                    .bind(instance)
                    .execute(&mut *tx)
                    .await?;
                Ok(Ok(()))
            }
            Hold::Held => Ok(Ok(())),
            refused => {
                self.audit_not_held(tx, env, "task.result.refused", &refused).await?;
                Ok(Err(refused))
            }
        }
    }

    /// Appends `action` for an envelope from an instance that does not hold the assignment.
    pub(super) async fn audit_not_held(
        &self,
        tx: &mut PgConnection,
        env: &Verified<Envelope>,
        action: &str,
        hold: &Hold,
    ) -> Result<(), EngineError> {
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
