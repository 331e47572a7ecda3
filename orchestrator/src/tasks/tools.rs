//! The engine's side of the tool proxy: answering `tool.request`s through the outbox with
//! their audit rows, blocking a task over budget, and the push of approved tasks.

use envelope::{Envelope, Payload, Role, StreamName, ToolResponse, Usage, Verified, streams};
use serde_json::{Value, json};
use uuid::Uuid;

use super::incidents::{AutoIncident, Severity, Trigger};
use super::{Actor, Change, Engine, EngineError, Task, fleet_halted, lock_task, try_lock_task};
use crate::audit;
use crate::state::{Event, TaskState};

/// An approved task waiting for its branch to be pushed.
#[derive(Debug, Clone)]
pub struct PushJob {
    /// The task.
    pub task: Task,
    /// The task's current change (the newest diff Dev or Refactor returned); empty if it
    /// has none.
    pub diff: Vec<u8>,
    /// The SHA-256 of the current change.
    pub change: Option<String>,
    /// The change QA last passed.
    pub qa_passed: Option<String>,
    /// The change Review last approved.
    pub review_approved: Option<String>,
    /// When the task was approved: the pushed commit's dates, so that pushing it again
    /// makes the same commit.
    pub approved_at: chrono::DateTime<chrono::Utc>,
}

impl PushJob {
    /// Whether these bytes are the change that QA passed and Review approved; the reason
    /// if not.
    pub fn vouched(&self) -> Result<(), String> {
        let Some(change) = &self.change else {
            return Err("the task has no change to push".into());
        };
        let actual = changeset::ChangeId::of(&self.diff);
        if actual.as_str() != change {
            return Err(format!("the stored change hashes to {actual}, not to the task's change {change}"));
        }
        let said = |v: &Option<String>| v.clone().unwrap_or_else(|| "nothing".into());
        if self.qa_passed.as_ref() != Some(change) || self.review_approved.as_ref() != Some(change) {
            return Err(format!(
                "change {change} was not both passed by QA and approved by Review (QA passed {}, Review approved {})",
                said(&self.qa_passed),
                said(&self.review_approved)
            ));
        }
        Ok(())
    }
}

impl Engine {
    /// Answers `request` with `response` on the requester's own response stream, appends
    /// the audit row `action` with `detail`, and (for a model call) sends `usage` to the
    /// budget manager: one transaction, so an answer is never sent without its audit row.
    pub async fn answer_tool(
        &self,
        request: &Verified<Envelope>,
        response: ToolResponse,
        action: &str,
        detail: Value,
        usage: Option<Usage>,
    ) -> Result<(), EngineError> {
        self.answer_tool_audited(request, response, Some((action, detail)), usage).await
    }

    /// Answers a refused tool request: audited as `tool.refused` with `detail` while the
    /// sender is within its refusal rate ([`crate::refusals`]), otherwise answered and
    /// only counted.
    pub async fn refuse_tool(
        &self,
        request: &Verified<Envelope>,
        response: ToolResponse,
        detail: Value,
    ) -> Result<(), EngineError> {
        let audit = self.audit_refusal(request).then_some(("tool.refused", detail));
        self.answer_tool_audited(request, response, audit, None).await
    }

    async fn answer_tool_audited(
        &self,
        request: &Verified<Envelope>,
        response: ToolResponse,
        audit: Option<(&str, Value)>,
        usage: Option<Usage>,
    ) -> Result<(), EngineError> {
        let mut tx = self.pool.begin().await?;
        if let Some((action, detail)) = audit {
            let actor = Actor::of(request);
            // A model call names the prompt it was made with in the row's own column.
            let version = detail.get("prompt_version").and_then(Value::as_str).map(str::to_owned);
            let mut entry = actor.entry(action, request.task_id, detail);
            entry.prompt_version = version.as_deref();
            audit::append(&mut tx, &self.audit_key, entry).await?;
        }
        if let Some(usage) = usage {
            let stream = StreamName::parse(streams::USAGE).expect("fleet:usage is a valid stream name");
            self.enqueue(&mut tx, &stream, Role::Budget, request.task_id, Some(request.id), usage.into()).await?;
        }
        let stream = StreamName::tool_responses(request.from.role, &request.from.instance);
        self.enqueue(
            &mut tx,
            &stream,
            request.from.role,
            request.task_id,
            Some(request.id),
            Payload::ToolResponse(response),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether an operator approved `task` (HIGH and CRITICAL actions need it).
    pub async fn has_approval(&self, task: Uuid) -> Result<bool, EngineError> {
        Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM approvals WHERE task_id = $1 AND decision = 'approved')")
            .bind(task)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Blocks `task` (over its budget): its step stops until an operator unblocks it.
    pub async fn block(&self, task: Uuid, reason: &str) -> Result<(), EngineError> {
        let mut tx = self.pool.begin().await?;
        let t = lock_task(&mut tx, task).await?;
        if !matches!(t.state, TaskState::Dev | TaskState::Qa | TaskState::Review | TaskState::Refactor) {
            return Ok(());
        }
        let me = self.me();
        self.apply(&mut tx, &t, Change::new(Event::Block, "budget", json!({ "reason": reason }), &me)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Approved tasks whose branch has not been pushed yet (oldest first), with their newest
    /// diff. A task without any diff is returned with an empty one (the push refuses it).
    pub async fn push_jobs(&self, limit: i64) -> Result<Vec<PushJob>, EngineError> {
        // An open critical or high incident freezes its repository's pushes (all of them
        // when it names none), except its own fix task's.
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT t.id FROM tasks t WHERE t.state = 'approved' AND NOT EXISTS ( \
                 SELECT 1 FROM incidents i WHERE i.resolved_at IS NULL AND i.freezes_merges \
                    AND (i.repository IS NULL OR i.repository = t.spec->>'repository') \
                    AND NOT EXISTS (SELECT 1 FROM incident_tasks l \
                                    WHERE l.incident_id = i.id AND l.task_id = t.id AND l.link = 'fix')) \
             ORDER BY t.priority DESC, t.updated_at LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            let task = self.get(id).await?;
            let (change, qa_passed, review_approved): (Option<String>, Option<String>, Option<String>) =
                sqlx::query_as(
                    "SELECT change_sha256, qa_passed_sha256, review_approved_sha256 FROM tasks WHERE id = $1",
                )
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
            let diff: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT content FROM artifacts WHERE task_id = $1 AND kind = 'diff' AND sha256 = decode($2, 'hex') LIMIT 1",
            )
            .bind(id)
            .bind(change.as_deref().unwrap_or(""))
            .fetch_optional(&self.pool)
            .await?;
            let approved_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
                "SELECT coalesce(max(at), now()) FROM task_events WHERE task_id = $1 AND to_state = 'approved'",
            )
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
            jobs.push(PushJob {
                task,
                diff: diff.unwrap_or_default(),
                change,
                qa_passed,
                review_approved,
                approved_at,
            });
        }
        Ok(jobs)
    }

    /// Records the push of `task`'s branch and moves it to `merged`. Does nothing if the
    /// task moved on meanwhile (another orchestrator pushed it, an operator failed it).
    pub async fn pushed(&self, task: Uuid, branch: &str, commit: &str) -> Result<bool, EngineError> {
        let mut tx = self.pool.begin().await?;
        if fleet_halted(&mut tx).await? {
            return Ok(false);
        }
        let Some(t) = try_lock_task(&mut tx, task).await? else { return Ok(false) };
        if t.state != TaskState::Approved {
            return Ok(false);
        }
        let me = self.me();
        let detail = json!({ "branch": branch, "commit": commit });
        audit::append(&mut tx, &self.audit_key, me.entry("tool.git.push_branch", Some(task), detail.clone())).await?;
        self.apply(&mut tx, &t, Change::new(Event::Merged, "branch pushed", detail, &me)).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// An approved change about to be pushed carries what Review refuses (a credential,
    /// dangerous shell, code injection; `found`: where, never the value): the push is
    /// refused, the task fails, and a critical incident freezes the repository's merges, in
    /// one transaction.
    pub async fn unsafe_after_approval(&self, task: Uuid, at_push: &AtPush) -> Result<Option<Uuid>, EngineError> {
        let found = &at_push.found;
        let mut tx = self.pool.begin().await?;
        let Some(t) = try_lock_task(&mut tx, task).await? else { return Ok(None) };
        if t.state != TaskState::Approved {
            return Ok(None);
        }
        let me = self.me();
        let what = if at_push.credential { "a credential" } else { "what Review refuses" };
        let reason = format!(
            "the approved change adds {what} ({}); nothing was pushed and an incident was opened",
            found.join(", ")
        );
        let repository = t.spec.get("repository").and_then(Value::as_str).map(str::to_owned);
        let (incident, _) = self
            .open_auto_incident(
                &mut tx,
                AutoIncident {
                    trigger: if at_push.credential {
                        Trigger::SecretAfterApproval
                    } else {
                        Trigger::CriticalFindingAfterApproval
                    },
                    severity: Severity::Critical,
                    title: format!("Approved change of task {task} carries {what}"),
                    details: json!({"found": found, "qa_and_review_passed": true}),
                    repository,
                    task: Some(task),
                    dedup_key: format!("unsafe_after_approval:{task}"),
                },
            )
            .await?;
        audit::append(
            &mut tx,
            &self.audit_key,
            me.entry(
                "tool.refused",
                Some(task),
                json!({"action": "git.push_branch", "reason": reason, "incident": incident}),
            ),
        )
        .await?;
        self.apply(
            &mut tx,
            &t,
            Change::new(Event::Fail, "unsafe approved change", json!({"reason": reason, "incident": incident}), &me),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(incident))
    }

    /// Records a refused push (outside the scope, protected branch): the task fails, with
    /// the reason in its events and the audit trail.
    pub async fn push_refused(&self, task: Uuid, reason: &str) -> Result<(), EngineError> {
        let mut tx = self.pool.begin().await?;
        let Some(t) = try_lock_task(&mut tx, task).await? else { return Ok(()) };
        if t.state != TaskState::Approved {
            return Ok(());
        }
        let me = self.me();
        let detail = json!({ "reason": reason });
        audit::append(
            &mut tx,
            &self.audit_key,
            me.entry("tool.refused", Some(task), json!({"action": "git.push_branch", "reason": reason})),
        )
        .await?;
        self.apply(&mut tx, &t, Change::new(Event::Fail, "push refused", detail, &me)).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// What an approved change must not carry, found again at push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtPush {
    /// A credential is among them (the incident's trigger is `secret_after_approval`).
    pub credential: bool,
    /// Each finding, `what in path:line`, never the value.
    pub found: Vec<String>,
}

/// Review's rules (changeset::checks: credentials, dangerous shell, code injection) and
/// the fleet's redaction set, run again over the lines `diff` adds. Review refuses any of
/// them, so one found at push means Review was bypassed or compromised. `None`: clean.
pub fn critical_at_push(diff: &[u8]) -> Option<AtPush> {
    use changeset::checks::{Family, scan_added};
    let text = String::from_utf8_lossy(diff);
    let families = [Family::Secret, Family::DangerousShell, Family::CodeInjection];
    let mut found: Vec<String> = Vec::new();
    let mut credential = false;
    for f in scan_added(&text, &families) {
        credential |= f.family == Family::Secret;
        let line = f.line.map(|l| format!(":{l}")).unwrap_or_default();
        found.push(format!(
            "{} ({}) in {}{line}",
            f.family.label(),
            f.rule,
            f.file.chars().take(200).collect::<String>()
        ));
    }
    for place in credentials_added(diff) {
        credential = true;
        if !found.iter().any(|f| f.ends_with(&format!(" in {place}"))) {
            found.push(format!("credential (redaction set) in {place}"));
        }
    }
    found.truncate(20);
    (!found.is_empty()).then_some(AtPush { credential, found })
}

/// Where `diff` adds a line that the fleet's redaction set ([`telemetry::redact()`]) takes for
/// a credential: `path:line` in the new file, never the value. Review's rules should have
/// refused such a change; finding one at push means something let it through.
pub fn credentials_added(diff: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(diff);
    let mut found = Vec::new();
    let mut file = String::new();
    let mut line = 0u64;
    for l in text.lines() {
        if let Some(path) = l.strip_prefix("+++ ") {
            file = path.strip_prefix("b/").unwrap_or(path).to_owned();
        } else if let Some(hunk) = l.strip_prefix("@@ ") {
            // `@@ -a,b +c,d @@`: the new file's lines start at c.
            line = hunk
                .split_whitespace()
                .find_map(|w| w.strip_prefix('+'))
                .and_then(|w| w.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
        } else if let Some(added) = l.strip_prefix('+') {
            if matches!(telemetry::redact(added), std::borrow::Cow::Owned(_)) && found.len() < 20 {
                found.push(format!("{}:{line}", file.chars().take(200).collect::<String>()));
            }
            line += 1;
        } else if !l.starts_with('-') && !l.starts_with('\\') {
            line += 1;
        }
    }
    found
}
