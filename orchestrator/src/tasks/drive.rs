//! What operators do to drive a task beyond approving it: answer a worker's question (the
//! step is issued again with the answer among its findings), cancel the task, retry a
//! failed or blocked one. Each is one transaction with its event and audit rows.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{Actor, Change, Engine, EngineError, Task, cut, fleet_halted, lock_task};
use crate::audit;
use crate::state::{Event, TaskState};

/// A worker's question that no person has answered yet.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Question {
    /// The question envelope's id.
    pub id: Uuid,
    /// The task it is about.
    pub task_id: Uuid,
    /// The task's state now.
    pub task_state: TaskState,
    /// The question (redacted, at most 2000 characters).
    pub text: String,
    /// The role of the worker that asked (`dev`, `qa`, …).
    pub asked_by_role: String,
    /// The worker instance that asked.
    pub asked_by_instance: String,
    /// When the orchestrator received it.
    pub asked_at: DateTime<Utc>,
}

/// Longest question quoted back in the answer's finding, in characters.
const QUOTED_QUESTION: usize = 300;

impl Engine {
    /// Open questions of unfinished tasks, oldest first, at most `limit` (a failed task's
    /// questions show again when it is retried).
    pub async fn open_questions(&self, limit: i64) -> Result<Vec<Question>, EngineError> {
        let rows = sqlx::query(
            "SELECT q.id, q.task_id, t.state, q.text, q.asked_by_role, q.asked_by_instance, q.asked_at
             FROM questions q JOIN tasks t ON t.id = q.task_id
             WHERE q.closed_at IS NULL AND t.state NOT IN ('merged', 'failed', 'cancelled')
             ORDER BY q.asked_at, q.id LIMIT $1",
        )
        .bind(limit.clamp(1, 1000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(Question {
                    id: r.try_get("id")?,
                    task_id: r.try_get("task_id")?,
                    task_state: super::parse_state(&state)?,
                    text: r.try_get("text")?,
                    asked_by_role: r.try_get("asked_by_role")?,
                    asked_by_instance: r.try_get("asked_by_instance")?,
                    asked_at: r.try_get("asked_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(EngineError::from)
    }

    /// An operator answers the task's open questions: the answer is recorded and audited
    /// (`task.answer`), the questions are closed, and the current step is issued again
    /// (attempt + 1) with `answer from <operator> to "<question>": <text>` appended to the
    /// findings it was issued with. The previous assignment becomes stale: its worker's
    /// result is ignored and its tool requests are refused (`lease_stale`).
    pub async fn answer(&self, id: Uuid, by: &Actor, text: &str) -> Result<Task, EngineError> {
        let text = telemetry::redact(text).into_owned();
        let mut tx = self.pool.begin().await?;
        let task = lock_task(&mut tx, id).await?;
        let open: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, text FROM questions WHERE task_id = $1 AND closed_at IS NULL ORDER BY asked_at, id FOR UPDATE",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let Some((_, asked)) = open.last() else {
            return Err(EngineError::Conflict(format!(
                "task {id} has no open question (state `{}`); `fleetctl questions` lists the open ones",
                task.state
            )));
        };
        if task.state.worker().is_none() {
            return Err(EngineError::Conflict(format!(
                "cannot answer a task in state `{}`: answering issues the task's step again, and only tasks in dev, \
                 qa, review or refactor have a step running; retry or resume it first",
                task.state
            )));
        }
        let stored: Value =
            sqlx::query_scalar("SELECT findings FROM tasks WHERE id = $1").bind(id).fetch_one(&mut *tx).await?;
        let mut findings: Vec<String> = serde_json::from_value(stored).unwrap_or_default();
        findings.push(format!("answer from {} to the question {:?}: {text}", by.instance, cut(asked, QUOTED_QUESTION)));
        sqlx::query("UPDATE tasks SET findings = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(json!(findings))
            .execute(&mut *tx)
            .await?;
        let ids: Vec<String> = open.iter().map(|(q, _)| q.to_string()).collect();
        sqlx::query(
            "UPDATE questions SET answer = $2, answered_by = $3, closed_at = now() WHERE task_id = $1 AND closed_at IS NULL",
        )
        .bind(id)
        .bind(&text)
        .bind(&by.instance)
        .execute(&mut *tx)
        .await?;
        let detail = json!({
            "questions": ids,
            "text": text,
            "replaced_assignment": task.assignment_id.map(|a| a.to_string()),
        });
        sqlx::query(
            "INSERT INTO task_events (task_id, from_state, to_state, cause, detail) VALUES ($1, $2, $2, 'answered', $3)",
        )
        .bind(id)
        .bind(task.state.as_str())
        .bind(&detail)
        .execute(&mut *tx)
        .await?;
        audit::append(&mut tx, &self.audit_key, by.entry("task.answer", Some(id), detail)).await?;
        self.assign(&mut tx, &task).await?;
        let task = lock_task(&mut tx, id).await?;
        tx.commit().await?;
        Ok(task)
    }

    /// An operator cancels a task that is not finished: it becomes `cancelled` (final), its
    /// assignment is withdrawn (a late result is stale, the worker's next tool request is
    /// refused with `lease_stale`), its open questions are closed, and the push loop never
    /// sees it (it pushes `approved` tasks only). Audited as `task.cancel`.
    pub async fn cancel(&self, id: Uuid, by: &Actor, reason: Option<&str>) -> Result<Task, EngineError> {
        let reason = reason.map(|r| telemetry::redact(r).into_owned());
        let mut tx = self.pool.begin().await?;
        let task = lock_task(&mut tx, id).await?;
        let detail = json!({
            "reason": reason,
            "withdrawn_assignment": task.assignment_id.map(|a| a.to_string()),
        });
        self.apply(&mut tx, &task, Change::new(Event::Cancel, "cancelled", detail.clone(), by)).await?;
        let closed = sqlx::query("UPDATE questions SET closed_at = now() WHERE task_id = $1 AND closed_at IS NULL")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let audit =
            json!({"from": task.state.as_str(), "reason": reason, "closed_questions": closed, "detail": detail});
        audit::append(&mut tx, &self.audit_key, by.entry("task.cancel", Some(id), audit)).await?;
        let task = lock_task(&mut tx, id).await?;
        tx.commit().await?;
        Ok(task)
    }

    /// An operator retries a `failed` or `blocked` task, with its retries counted afresh.
    /// A blocked task returns to the step it was blocked in. A failed task returns to the
    /// step that failed; when QA or Review sent it back once too often, or it failed outside
    /// a working step (rejected, refused push), it returns to Dev. The findings it failed
    /// with go with the new assignment. Refused while the fleet is halted. Audited as
    /// `task.retry`.
    pub async fn retry(&self, id: Uuid, by: &Actor, reason: Option<&str>) -> Result<Task, EngineError> {
        let reason = reason.map(|r| telemetry::redact(r).into_owned());
        let mut tx = self.pool.begin().await?;
        if fleet_halted(&mut tx).await? {
            return Err(EngineError::Halted);
        }
        let mut task = lock_task(&mut tx, id).await?;
        let from = task.state;
        if from == TaskState::Failed {
            task.resume_state = Some(failed_step(&mut tx, id).await?);
        }
        let stored: Value =
            sqlx::query_scalar("SELECT findings FROM tasks WHERE id = $1").bind(id).fetch_one(&mut *tx).await?;
        let findings: Vec<String> = serde_json::from_value(stored).unwrap_or_default();
        let detail = json!({"reason": reason});
        let change = Change { findings, ..Change::new(Event::Reopen, "retried", detail, by) };
        let to = self.apply(&mut tx, &task, change).await?;
        let audit = json!({"from": from.as_str(), "to": to.as_str(), "reason": reason, "retries_before": task.retries});
        audit::append(&mut tx, &self.audit_key, by.entry("task.retry", Some(id), audit)).await?;
        let task = lock_task(&mut tx, id).await?;
        tx.commit().await?;
        Ok(task)
    }
}

/// The step a failed task is retried in (see [`Engine::retry`]).
async fn failed_step(tx: &mut PgConnection, id: Uuid) -> Result<TaskState, EngineError> {
    let last: Option<(Option<String>, Value)> = sqlx::query_as(
        "SELECT from_state, detail FROM task_events WHERE task_id = $1 AND to_state = 'failed' ORDER BY seq DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((Some(from), detail)) = last else { return Ok(TaskState::Dev) };
    let from = super::parse_state(&from)?;
    let sent_back = detail.get("status").and_then(Value::as_str) == Some("failure")
        && matches!(from, TaskState::Qa | TaskState::Review);
    Ok(match from {
        TaskState::Dev | TaskState::Qa | TaskState::Review | TaskState::Refactor if !sent_back => from,
        _ => TaskState::Dev,
    })
}
