//! The engine: every change of task state, each in one transaction that also writes the
//! `task_events` row, the audit row and the outgoing envelopes (outbox).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use envelope::{Envelope, Instance, Keyring, Outcome, Payload, Role, Sender, Status, StreamName, TaskAssign, Verified};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::audit::{self, AuditEntry, AuditKey};
use crate::lease::LeaseIssuer;
use crate::outbox::{self, OutboxError};
use crate::refusals::{Admission, RefusalLimiter, RefusalLimits};
use crate::state::{self, Context, Event, IllegalTransition, Risk, TaskState};

mod binding;
mod drive;
pub mod incidents;
mod tools;
pub use binding::{HOLD_ELSEWHERE, HOLD_STALE, Hold};
pub use drive::Question;
pub use tools::{AtPush, PushJob, credentials_added, critical_at_push};

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No such task.
    #[error("task {0} not found")]
    NotFound(Uuid),
    /// No such incident.
    #[error("incident {0} not found; `fleetctl incident list --all` lists them")]
    IncidentNotFound(Uuid),
    /// The cycle does not allow it.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The input is unusable (explains what).
    #[error("{0}")]
    Invalid(String),
    /// The fleet is halted: no new work, no approvals, no merges.
    #[error("the fleet is halted by the kill switch; an admin must resume it first")]
    Halted,
    /// The task's state allows the action, but something else it needs is missing (an
    /// answer without an open question); the message says what.
    #[error("{0}")]
    Conflict(String),
    /// Four eyes: the submitter of a HIGH or CRITICAL task tried to approve it.
    #[error(
        "{approver:?} submitted task {task} ({risk} risk) and cannot also approve it: a HIGH or CRITICAL \
         change needs a second person; ask another operator to approve it"
    )]
    SelfApproval {
        /// The task.
        task: Uuid,
        /// Its risk (`HIGH`, `CRITICAL`).
        risk: &'static str,
        /// The operator who submitted it and tried to approve it.
        approver: String,
    },
    /// Sealing an outgoing envelope failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// Postgres failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This orchestrator's instance name (in envelopes and the audit trail).
    pub instance: Instance,
    /// `retries.max_per_task`.
    pub max_retries: u32,
    /// How long a worker may stay silent (no heartbeat, no result) before the step is reassigned.
    pub step_deadline: Duration,
    /// How long the instance holding a step may stay silent before another instance that
    /// uses the same assignment (having reclaimed its task entry) takes the binding over.
    pub takeover_after: Duration,
    /// `ttl_ms` of assignments.
    pub assign_ttl: Duration,
    /// First retry delay; doubles per retry.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Workspaces live at `<root>/task-<id>`.
    pub workspace_root: String,
    /// Where a task's repository may come from; nothing by default.
    pub repositories: crate::repos::RepoPolicy,
    /// Four eyes: a HIGH or CRITICAL task must be approved by someone other than its
    /// submitter. On by default; off only where one person runs the fleet alone.
    pub four_eyes: bool,
}

impl EngineConfig {
    /// Defaults for `instance`.
    pub fn new(instance: Instance) -> Self {
        Self {
            instance,
            max_retries: 3,
            step_deadline: Duration::from_secs(300),
            takeover_after: Duration::from_secs(30),
            assign_ttl: Duration::from_secs(3600),
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
            workspace_root: "/workspace".into(),
            repositories: crate::repos::RepoPolicy::default(),
            four_eyes: true,
        }
    }

    fn backoff(&self, retries: u32) -> Duration {
        self.retry_base.saturating_mul(1 << retries.saturating_sub(1).min(16)).min(self.retry_max)
    }
}

/// A task submission (`POST /v1/tasks`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// Short title (1 to 200 bytes, not only spaces).
    #[schema(min_length = 1, max_length = 200, pattern = "\\S")]
    pub title: String,
    /// What Dev should do (1 byte to 64 KiB, not only spaces).
    #[schema(min_length = 1, max_length = 65536, pattern = "\\S")]
    pub instructions: String,
    /// Repository to work on; it must be one the orchestrator's `repositories` setting
    /// allows (none by default).
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub repository: Option<String>,
    /// QA's test command.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub test_command: Option<String>,
    /// Risk from the risk matrix; LOW by default.
    #[serde(default = "low")]
    pub risk: Risk,
    /// Repository paths (relative prefixes, such as `src/`) the task may change; empty: the
    /// whole repository. At most 64.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub scope: Vec<String>,
}

fn low() -> Risk {
    Risk::Low
}

impl NewTask {
    /// Checks sizes and required text.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Invalid(m));
        // Postgres stores no NUL in text or JSON.
        let texts = [Some(&self.title), Some(&self.instructions), self.repository.as_ref(), self.test_command.as_ref()];
        if texts.into_iter().flatten().chain(&self.scope).any(|t| t.contains('\0')) {
            return bad("no field of a task may contain a NUL character".into());
        }
        if self.title.trim().is_empty() || self.title.len() > 200 {
            return bad("`title` must be 1 to 200 characters".into());
        }
        if self.instructions.trim().is_empty() || self.instructions.len() > 64 * 1024 {
            return bad("`instructions` must be 1 byte to 64 KiB".into());
        }
        for (name, v) in [("repository", &self.repository), ("test_command", &self.test_command)] {
            if v.as_ref().is_some_and(|s| s.len() > 2048) {
                return bad(format!("`{name}` must be at most 2048 characters"));
            }
        }
        if self.scope.len() > 64 {
            return bad("`scope` may list at most 64 paths".into());
        }
        for p in &self.scope {
            let parts_ok = p.split('/').all(|c| !c.is_empty() || p.ends_with('/')) && !p.split('/').any(|c| c == "..");
            if p.is_empty() || p.len() > 512 || p.starts_with('/') || p.contains('\\') || !parts_ok {
                return bad(format!(
                    "`scope` entry {p:?} must be a relative path inside the repository, like \"src/\" or \"tests/test_calc.py\""
                ));
            }
        }
        Ok(())
    }
}

/// A task as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Task {
    /// Id.
    pub id: Uuid,
    /// State.
    pub state: TaskState,
    /// The state a side state returns to.
    pub resume_state: Option<TaskState>,
    /// Title.
    pub title: String,
    /// Submission (instructions, repository, test command).
    pub spec: Value,
    /// Risk.
    pub risk: Risk,
    /// Attempt of the current step.
    pub attempt: i32,
    /// Retries used.
    pub retries: i32,
    /// The current step's assignment envelope.
    pub assignment_id: Option<Uuid>,
    /// The worker instance the current step is bound to: the first to use its assignment
    /// (tool request, heartbeat or result); only it may go on using it.
    pub assigned_to: Option<String>,
    /// Silence past this reassigns the step.
    pub deadline_at: Option<DateTime<Utc>>,
    /// Who submitted it.
    pub submitted_by: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

fn parse_state(s: &str) -> Result<TaskState, sqlx::Error> {
    s.parse().map_err(|e: state::UnknownState| sqlx::Error::Decode(Box::new(e)))
}

fn task_from_row(r: &sqlx::postgres::PgRow) -> Result<Task, sqlx::Error> {
    let resume: Option<String> = r.try_get("resume_state")?;
    let risk: String = r.try_get("risk")?;
    Ok(Task {
        id: r.try_get("id")?,
        state: parse_state(r.try_get("state")?)?,
        resume_state: resume.as_deref().map(parse_state).transpose()?,
        title: r.try_get("title")?,
        spec: r.try_get("spec")?,
        risk: Risk::parse(&risk).unwrap_or(Risk::Critical),
        attempt: r.try_get("attempt")?,
        retries: r.try_get("retries")?,
        assignment_id: r.try_get("assignment_id")?,
        assigned_to: r.try_get("assigned_to")?,
        deadline_at: r.try_get("deadline_at")?,
        submitted_by: r.try_get("submitted_by")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Refused tool calls of one result audited one row each (the worker sends at most 1,024, a
/// flood of over-the-limit calls as one); the rest are counted in one row.
const MAX_REFUSED_AUDITED: usize = 256;

const TASK_COLUMNS: &str = "id, state, resume_state, title, spec, risk, attempt, retries, assignment_id, assigned_to, deadline_at, submitted_by, created_at, updated_at";

/// What applying a worker's result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The task moved to this state.
    Moved(TaskState),
    /// Already applied (same envelope id): nothing changed.
    Duplicate,
    /// It answers an assignment that is no longer current (reassigned, halted): ignored.
    Stale,
    /// It answers the current assignment, which another instance holds: refused, audited.
    Refused(Hold),
}

/// Who causes a change, for events and the audit trail.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Role (`orchestrator`, `operator`, `dev`, …).
    pub role: String,
    /// Instance or operator name.
    pub instance: String,
}

impl Actor {
    /// An audit entry of an action by this actor.
    fn entry<'a>(&'a self, action: &'a str, task_id: Option<Uuid>, details: Value) -> AuditEntry<'a> {
        AuditEntry {
            actor_role: &self.role,
            actor_instance: &self.instance,
            action,
            task_id,
            prompt_version: None,
            details,
        }
    }

    /// The actor who signed `env`.
    fn of(env: &Envelope) -> Self {
        Self { role: env.from.role.as_str().into(), instance: env.from.instance.as_str().into() }
    }

    /// An operator known by the subject of their token.
    pub fn operator(name: &str) -> Self {
        Self { role: "operator".into(), instance: name.into() }
    }

    /// The person's name when an operator acted (for the budget manager's alerts).
    fn person(&self) -> Option<String> {
        (self.role == "operator").then(|| self.instance.clone())
    }
}

/// The orchestrator's state engine.
#[derive(Debug, Clone)]
pub struct Engine {
    pool: PgPool,
    keyring: Arc<Keyring>,
    audit_key: AuditKey,
    cfg: EngineConfig,
    /// Mints each assignment's capability lease; without it assignments carry none (tests
    /// of the cycle alone).
    leases: Option<Arc<LeaseIssuer>>,
    /// Per-sender rate limit of audited refusals (see [`crate::refusals`]).
    refusals: Arc<RefusalLimiter>,
}

struct Change<'a> {
    event: Event,
    cause: &'a str,
    envelope_id: Option<Uuid>,
    detail: Value,
    actor: &'a Actor,
    /// Findings to pass to the next Dev assignment.
    findings: Vec<String>,
}

impl<'a> Change<'a> {
    /// A change not caused by an envelope and carrying no findings.
    fn new(event: Event, cause: &'a str, detail: Value, actor: &'a Actor) -> Self {
        Self { event, cause, envelope_id: None, detail, actor, findings: vec![] }
    }
}

impl Engine {
    /// An engine over `pool`, signing with `keyring`, auditing with `audit_key`.
    pub fn new(pool: PgPool, keyring: Arc<Keyring>, audit_key: AuditKey, cfg: EngineConfig) -> Self {
        Self {
            pool,
            keyring,
            audit_key,
            cfg,
            leases: None,
            refusals: Arc::new(RefusalLimiter::new(Default::default())),
        }
    }

    /// The per-sender refusal limits in force.
    pub fn refusal_limits(&self) -> RefusalLimits {
        self.refusals.limits()
    }

    /// Audits refusals per sender at most as `limits` allow (default: 20, then 6 a minute).
    pub fn with_refusal_limits(mut self, limits: RefusalLimits) -> Self {
        self.refusals = Arc::new(RefusalLimiter::new(limits));
        self
    }

    /// Whether a refusal of `env`'s sender gets its own audit row now (else it is counted
    /// for the next `audit.refusals.suppressed` row).
    pub fn audit_refusal(&self, env: &Envelope) -> bool {
        self.refusals.admit(env.from.role.as_str(), env.from.instance.as_str()) == Admission::Audit
    }

    /// Writes one `audit.refusals.suppressed` row per sender whose refusals were counted
    /// instead of audited (at most one per sender a minute, unless `force`); returns how
    /// many rows it wrote. Called from the tick loop.
    pub async fn flush_refusal_summaries(&self, force: bool) -> Result<usize, EngineError> {
        let due = self.refusals.take_suppressed(force);
        if due.is_empty() {
            return Ok(0);
        }
        let write = async {
            let mut tx = self.pool.begin().await?;
            for s in &due {
                let actor = Actor { role: s.role.clone(), instance: s.instance.clone() };
                let detail = json!({ "count": s.count, "reason": "refusals over the per-sender audit rate" });
                audit::append(&mut tx, &self.audit_key, actor.entry("audit.refusals.suppressed", None, detail)).await?;
                // A sender refused past its audited burst is acting like a compromised
                // worker: one open incident per sender, however long the burst lasts.
                let limits = self.refusals.limits();
                let found = incidents::AutoIncident {
                    trigger: incidents::Trigger::RejectionBurst,
                    severity: incidents::Severity::High,
                    title: format!(
                        "Burst of refused envelopes from {}/{}: {} past the audited burst of {}",
                        s.role, s.instance, s.count, limits.burst
                    ),
                    details: json!({
                        "sender": {"role": s.role, "instance": s.instance},
                        "refused_past_burst": s.count,
                        "burst": limits.burst,
                        "per_minute": limits.per_minute,
                        "next": format!("fleetctl quarantine {}/{}", s.role, s.instance),
                    }),
                    repository: None,
                    task: None,
                    dedup_key: format!("rejection_burst:{}/{}", s.role, s.instance),
                };
                self.open_auto_incident(&mut tx, found).await?;
            }
            tx.commit().await?;
            Ok::<_, EngineError>(())
        };
        if let Err(e) = write.await {
            self.refusals.restore(&due);
            return Err(e);
        }
        Ok(due.len())
    }

    /// Mints a capability lease into every assignment from now on.
    pub fn with_leases(mut self, leases: Arc<LeaseIssuer>) -> Self {
        self.leases = Some(leases);
        self
    }

    /// The pool (for health checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn me(&self) -> Actor {
        Actor { role: Role::Orchestrator.as_str().into(), instance: self.cfg.instance.as_str().into() }
    }

    /// Accepts a task and assigns it to Dev, in one transaction. Starts the task's trace.
    pub async fn submit(&self, by: &Actor, new: NewTask) -> Result<Task, EngineError> {
        self.submit_traced(by, new, None).await
    }

    /// [`Engine::submit`], continuing the submitter's W3C `traceparent` (an HTTP header)
    /// when it is valid: the task's root span, `task.submit`, is its child; without one the
    /// root span starts a new trace. The root's context is stored with the task and carried
    /// by every envelope about it.
    pub async fn submit_traced(
        &self,
        by: &Actor,
        new: NewTask,
        traceparent: Option<&str>,
    ) -> Result<Task, EngineError> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "task.submit",
            otel.kind = "server",
            task_id = tracing::field::Empty,
            role = Role::Orchestrator.as_str(),
            instance = %self.cfg.instance,
        );
        if !telemetry::propagate::set_parent(&span, traceparent) {
            // A task is one trace of its own, not a part of the HTTP request's.
            let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, opentelemetry::Context::new());
        }
        self.submit_in_span(by, new).instrument(span).await
    }

    async fn submit_in_span(&self, by: &Actor, new: NewTask) -> Result<Task, EngineError> {
        new.validate()?;
        if let Some(repo) = &new.repository {
            self.cfg.repositories.check(repo, &self.cfg.workspace_root).map_err(EngineError::Invalid)?;
        }
        let mut tx = self.pool.begin().await?;
        if fleet_halted(&mut tx).await? {
            return Err(EngineError::Halted);
        }
        let id = Uuid::now_v7();
        tracing::Span::current().record("task_id", tracing::field::display(id));
        self.insert_task(&mut tx, id, by, &new, 0, "submitted").await?;
        let task = lock_task(&mut tx, id).await?;
        let change = Change::new(Event::Start, "submitted", json!({}), by);
        self.apply(&mut tx, &task, change).await?;
        let task = lock_task(&mut tx, id).await?;
        tx.commit().await?;
        Ok(task)
    }

    /// Stores a new task `id` as `submitted` with its first event and its `task.submit`
    /// audit row, in `tx` (`priority` 1: an incident's fix task, issued before the others).
    async fn insert_task(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        by: &Actor,
        new: &NewTask,
        priority: i16,
        cause: &str,
    ) -> Result<(), EngineError> {
        let spec = json!({
            "instructions": new.instructions,
            "repository": new.repository,
            "test_command": new.test_command,
            "scope": new.scope,
        });
        sqlx::query(
            "INSERT INTO tasks (id, state, title, spec, risk, submitted_by, traceparent, priority) \
             VALUES ($1, 'submitted', $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(&new.title)
        .bind(&spec)
        .bind(new.risk.as_str())
        .bind(&by.instance)
        .bind(telemetry::propagate::current())
        .bind(priority)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO task_events (task_id, to_state, cause, detail) VALUES ($1, 'submitted', $2, $3)")
            .bind(id)
            .bind(cause)
            .bind(json!({"by": by.instance}))
            .execute(&mut *tx)
            .await?;
        let mut details = json!({"title": new.title, "risk": new.risk.as_str()});
        if priority > 0 {
            details["priority"] = json!("critical");
        }
        audit::append(&mut *tx, &self.audit_key, by.entry("task.submit", Some(id), details)).await?;
        Ok(())
    }

    /// The W3C trace context of `id`'s root span, when the task was submitted with tracing on.
    pub async fn traceparent_of(&self, id: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT traceparent FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .ok()
            .flatten()
            .flatten()
    }

    /// One task.
    pub async fn get(&self, id: Uuid) -> Result<Task, EngineError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(task_from_row).transpose()?.ok_or(EngineError::NotFound(id))
    }

    /// Tasks, newest first, optionally in one state.
    pub async fn list(&self, state: Option<TaskState>, limit: i64) -> Result<Vec<Task>, EngineError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE ($1::text IS NULL OR state = $1) ORDER BY created_at DESC, id DESC LIMIT $2"
        )))
        .bind(state.map(TaskState::as_str))
        .bind(limit.clamp(1, 1000))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(task_from_row).collect::<Result<_, _>>()?)
    }

    /// Applies a worker's `task.result`. Idempotent: the same envelope twice changes nothing.
    pub async fn apply_result(&self, env: &Verified<Envelope>) -> Result<Applied, EngineError> {
        let Payload::TaskResult(result) = &env.payload else {
            return Err(EngineError::Invalid(format!("expected task.result, got {}", env.message_type())));
        };
        let task_id = env.task_id.ok_or_else(|| EngineError::Invalid("task.result without task_id".into()))?;
        let mut tx = self.pool.begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        let seen: Option<i64> = sqlx::query_scalar("SELECT seq FROM task_events WHERE envelope_id = $1")
            .bind(env.id)
            .fetch_optional(&mut *tx)
            .await?;
        if seen.is_some() {
            return Ok(Applied::Duplicate);
        }
        let answers_current = env.causation_id.is_some() && env.causation_id == task.assignment_id;
        if !answers_current || task.state.worker() != Some(env.from.role) {
            let actor = Actor::of(env);
            if self.audit_refusal(env) {
                // A late result's refused calls are evidence too (a model that kept trying).
                self.audit_refused_calls(&mut tx, env, task_id, result).await?;
                audit::append(
                    &mut tx,
                    &self.audit_key,
                    actor.entry(
                        "task.result.stale",
                        Some(task_id),
                        json!({"envelope_id": env.id.to_string(), "state": task.state.as_str()}),
                    ),
                )
                .await?;
            }
            tx.commit().await?;
            return Ok(Applied::Stale);
        }
        if let Err(hold) = self.hold_for_result(&mut tx, &task, env).await? {
            tx.commit().await?;
            return Ok(Applied::Refused(hold));
        }
        if !result.containment.is_empty() {
            self.sandbox_contained(&mut tx, env, &task, &result.containment).await?;
        }
        // QA's pass and Review's approval count only for the change they name, and that
        // must be the task's current change: a result about other bytes moves nothing
        // forward (the step is retried) and is audited.
        let current_change = current_change(&mut tx, task_id).await?;
        let judges =
            matches!(env.from.role, Role::Qa | Role::Review | Role::Refactor) && result.status != Status::Error;
        if judges && result.change_sha256 != current_change {
            let actor = Actor::of(env);
            let detail = json!({
                "reason": "change_mismatch",
                "envelope_id": env.id.to_string(),
                "judged": result.change_sha256,
                "current": current_change,
            });
            if self.audit_refusal(env) {
                audit::append(
                    &mut tx,
                    &self.audit_key,
                    actor.entry("task.result.refused", Some(task_id), detail.clone()),
                )
                .await?;
            }
            let change = Change {
                event: Event::Retry,
                cause: "result names another change",
                envelope_id: Some(env.id),
                detail,
                actor: &actor,
                findings: vec![],
            };
            let to = self.apply(&mut tx, &task, change).await?;
            tx.commit().await?;
            return Ok(Applied::Moved(to));
        }
        let event = match (task.state, result.status) {
            (TaskState::Review, Status::Success)
                if !result.findings.is_empty() && !self.refactored(&mut tx, task_id).await? =>
            {
                Event::RefactorRequested
            }
            (_, Status::Success) => Event::StepSucceeded,
            (TaskState::Qa | TaskState::Review, Status::Failure) => Event::SentBack,
            _ => Event::Retry,
        };
        // Only Dev and Refactor make the change: a diff in anyone else's result (Review
        // reports what it looked at) must never become what is pushed.
        let makes_change = matches!(env.from.role, Role::Dev | Role::Refactor) && result.status == Status::Success;
        let diff = if makes_change { &result.diff } else { &None };
        for (kind, name, content) in [("diff", "change.diff", diff), ("test_log", "test.log", &result.log)] {
            if let Some(bytes) = content {
                store_artifact(&mut tx, task_id, kind, name, bytes).await?;
            }
        }
        record_change(&mut tx, task_id, env.from.role, result.status, diff.as_deref(), current_change.as_deref())
            .await?;
        let actor = Actor::of(env);
        let refused = self.audit_refused_calls(&mut tx, env, task_id, result).await?;
        let detail = json!({
            "status": status_str(result.status),
            "summary": cut(&result.summary, 500),
            "attempt": result.attempt,
            "tool_calls": result.calls.len(),
            "refused_calls": refused,
        });
        let outcome = Outcome { role: env.from.role, status: result.status, error_kind: None };
        self.enqueue(
            &mut tx,
            &StreamName::parse(envelope::streams::OUTCOMES).expect("valid"),
            Role::Budget,
            Some(task_id),
            Some(env.id),
            outcome.into(),
        )
        .await?;
        let change = Change {
            event,
            cause: "result",
            envelope_id: Some(env.id),
            detail,
            actor: &actor,
            findings: result.findings.clone(),
        };
        let to = self.apply(&mut tx, &task, change).await?;
        tx.commit().await?;
        Ok(Applied::Moved(to))
    }

    /// Audits every tool call of `result` the worker's policy refused, one row each (at most
    /// [`MAX_REFUSED_AUDITED`], then one row counting the rest), so the trail names each
    /// attempt (a prompt injection obeyed, a tool the role lacks). Returns how many there were.
    async fn audit_refused_calls(
        &self,
        tx: &mut PgConnection,
        env: &Verified<Envelope>,
        task_id: Uuid,
        result: &envelope::TaskResult,
    ) -> Result<usize, EngineError> {
        let actor = Actor::of(env);
        let refused: Vec<&envelope::ToolCallRecord> =
            result.calls.iter().filter(|c| c.verdict == envelope::CallVerdict::Refused).collect();
        for c in refused.iter().take(MAX_REFUSED_AUDITED) {
            let detail = json!({
                "tool": cut(&c.tool, 64),
                "args": cut(&c.args, 200),
                "reason": cut(c.reason.as_deref().unwrap_or(""), 300),
                "attempt": result.attempt,
                "envelope_id": env.id.to_string(),
            });
            audit::append(&mut *tx, &self.audit_key, actor.entry("tool.call.refused", Some(task_id), detail)).await?;
        }
        if refused.len() > MAX_REFUSED_AUDITED {
            let detail = json!({"more": refused.len() - MAX_REFUSED_AUDITED, "envelope_id": env.id.to_string()});
            audit::append(&mut *tx, &self.audit_key, actor.entry("tool.call.refused.more", Some(task_id), detail))
                .await?;
        }
        Ok(refused.len())
    }

    async fn refactored(&self, tx: &mut PgConnection, task_id: Uuid) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM task_events WHERE task_id = $1 AND to_state = 'refactor')")
            .bind(task_id)
            .fetch_one(tx)
            .await
    }

    /// Records a worker's question for a human: audited (`task.question`), and kept open for
    /// `GET /v1/questions` when it names a task that is not finished (the task keeps its
    /// state). Delivering the same envelope twice keeps one question.
    pub async fn record_question(&self, env: &Verified<Envelope>, text: &str) -> Result<(), EngineError> {
        let mut tx = self.pool.begin().await?;
        let actor = Actor::of(env);
        if let Some(task_id) = env.task_id {
            sqlx::query(
                "INSERT INTO questions (id, task_id, asked_by_role, asked_by_instance, text, assignment_id)
                 SELECT $1, id, $3, $4, $5, $6 FROM tasks WHERE id = $2 AND state NOT IN ('merged', 'failed', 'cancelled')
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(env.id)
            .bind(task_id)
            .bind(&actor.role)
            .bind(&actor.instance)
            .bind(cut(text, 2000))
            .bind(env.causation_id)
            .execute(&mut *tx)
            .await?;
        }
        audit::append(
            &mut tx,
            &self.audit_key,
            actor.entry(
                "task.question",
                env.task_id,
                json!({"envelope_id": env.id.to_string(), "text": cut(text, 2000)}),
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Reassigns steps whose worker stayed silent past the deadline (or fails them once
    /// retries are spent), and issues assignments whose backoff has passed. Returns how many
    /// tasks it touched. Safe to run from several orchestrators (`SKIP LOCKED`).
    pub async fn tick(&self) -> Result<usize, EngineError> {
        let mut touched = 0;
        let me = self.me();
        let overdue: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE state IN ('dev', 'qa', 'review', 'refactor') AND deadline_at < now() LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        for id in overdue {
            let mut tx = self.pool.begin().await?;
            let Some(task) = try_lock_task(&mut tx, id).await? else { continue };
            if task.deadline_at.is_none_or(|d| d >= Utc::now()) || task.state.worker().is_none() {
                continue;
            }
            let change =
                Change::new(Event::Retry, "worker silent past deadline", json!({"assigned_to": task.assigned_to}), &me);
            self.apply(&mut tx, &task, change).await?;
            tx.commit().await?;
            touched += 1;
        }
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE state IN ('dev', 'qa', 'review', 'refactor') AND assignment_id IS NULL AND not_before <= now() \
             ORDER BY priority DESC, not_before LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        for id in due {
            let mut tx = self.pool.begin().await?;
            let Some(task) = try_lock_task(&mut tx, id).await? else { continue };
            if task.assignment_id.is_some() || task.state.worker().is_none() || fleet_halted(&mut tx).await? {
                continue;
            }
            self.assign(&mut tx, &task).await?;
            tx.commit().await?;
            touched += 1;
        }
        Ok(touched)
    }

    /// A human approves a HIGH/CRITICAL task. Refused while the fleet is halted, and (four
    /// eyes, [`EngineConfig::four_eyes`]) when the approver submitted the task: that refusal
    /// is audited (`task.approve.refused`) and changes nothing else.
    pub async fn approve(&self, id: Uuid, by: &Actor, reason: Option<String>) -> Result<Task, EngineError> {
        let reason = reason.map(|r| telemetry::redact(&r).into_owned());
        let mut tx = self.pool.begin().await?;
        if fleet_halted(&mut tx).await? {
            return Err(EngineError::Halted);
        }
        let task = lock_task(&mut tx, id).await?;
        let self_approval = task.submitted_by.eq_ignore_ascii_case(&by.instance);
        if self.cfg.four_eyes
            && self_approval
            && task.state == TaskState::AwaitingApproval
            && matches!(task.risk, Risk::High | Risk::Critical)
        {
            let details = json!({"rule": "four_eyes", "risk": task.risk.as_str(), "submitted_by": task.submitted_by});
            audit::append(&mut tx, &self.audit_key, by.entry("task.approve.refused", Some(id), details)).await?;
            tx.commit().await?;
            tracing::warn!(task_id = %id, by = %by.instance, "Refused a self-approval (four eyes).");
            return Err(EngineError::SelfApproval {
                task: id,
                risk: task.risk.as_str(),
                approver: by.instance.clone(),
            });
        }
        let change = Change::new(Event::Approved, "approved", json!({"reason": reason}), by);
        self.apply(&mut tx, &task, change).await?;
        sqlx::query("INSERT INTO approvals (id, task_id, decided_at, decided_by, decision, reason) VALUES ($1, $2, now(), $3, 'approved', $4)")
            .bind(Uuid::now_v7())
            .bind(id)
            .bind(&by.instance)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        let task = lock_task(&mut tx, id).await?;
        tx.commit().await?;
        Ok(task)
    }

    /// Records that an approved change was merged. Refused while the fleet is halted.
    pub async fn mark_merged(&self, id: Uuid, by: &Actor) -> Result<Task, EngineError> {
        let mut tx = self.pool.begin().await?;
        if fleet_halted(&mut tx).await? {
            return Err(EngineError::Halted);
        }
        let task = lock_task(&mut tx, id).await?;
        self.apply(&mut tx, &task, Change::new(Event::Merged, "merged", json!({}), by)).await?;
        let task = lock_task(&mut tx, id).await?;
        tx.commit().await?;
        Ok(task)
    }

    /// The kill switch, from an operator: raises the kill epoch, halts every open task and
    /// tells the budget manager (`control.pause` on `fleet:control:budget`). Idempotent.
    pub async fn kill(&self, by: &Actor, reason: &str) -> Result<u64, EngineError> {
        self.halt_fleet(by, reason, None).await
    }

    /// The kill switch, from the budget manager (`control.pause` on
    /// `fleet:control:orchestrator`): the kill epoch becomes `max(current, epoch)`, every open
    /// task is halted, and the budget manager is told (a pause reaching an engaged budget is
    /// a no-op, so this does not loop). Idempotent: a halted fleet stays as it is, and a pause
    /// whose epoch is not above the current one while the fleet runs was already answered by
    /// an admin's resume (the budget had not processed it yet) and is ignored.
    pub async fn kill_at(&self, by: &Actor, epoch: u64, reason: &str) -> Result<u64, EngineError> {
        self.halt_fleet(by, reason, Some(epoch)).await
    }

    /// The shared body of [`Engine::kill`] (`at` = None: the next epoch) and
    /// [`Engine::kill_at`].
    async fn halt_fleet(&self, by: &Actor, reason: &str, at: Option<u64>) -> Result<u64, EngineError> {
        // Kept in `fleet_state`, sent to the budget manager, shown by `fleetctl status`.
        let reason = telemetry::redact(reason);
        let reason: &str = &reason;
        let mut tx = self.pool.begin().await?;
        let (epoch, halted): (i64, bool) =
            sqlx::query_as("SELECT kill_epoch, halted FROM fleet_state FOR UPDATE").fetch_one(&mut *tx).await?;
        if halted {
            return Ok(epoch as u64);
        }
        let epoch = match at {
            None => epoch + 1,
            Some(at) if at <= epoch as u64 => {
                tracing::info!(epoch, pause_epoch = at, "Ignored a pause the fleet already resumed from.");
                return Ok(epoch as u64);
            }
            Some(at) => i64::try_from(at).map_err(|_| EngineError::Invalid(format!("kill epoch {at} out of range")))?,
        };
        sqlx::query(
            "UPDATE fleet_state SET kill_epoch = $1, halted = true, changed_by = $2, reason = $3, changed_at = now()",
        )
        .bind(epoch)
        .bind(&by.instance)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        let open: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE state NOT IN ('merged', 'failed', 'cancelled', 'halted') FOR UPDATE",
        )
        .fetch_all(&mut *tx)
        .await?;
        if at.is_some() {
            let found = incidents::AutoIncident {
                trigger: incidents::Trigger::BudgetKill,
                severity: incidents::Severity::Medium,
                title: format!("The budget manager halted the fleet: {}", reason.chars().take(150).collect::<String>()),
                details: json!({"epoch": epoch, "reason": reason, "by": format!("{}/{}", by.role, by.instance)}),
                repository: None,
                task: None,
                dedup_key: format!("budget_kill:{epoch}"),
            };
            self.open_auto_incident(&mut tx, found).await?;
        }
        let pause = envelope::ControlPause { epoch: epoch as u64, reason: reason.to_owned(), by: by.person() };
        let audit = by.entry("fleet.kill", None, json!({"epoch": epoch, "reason": reason}));
        self.switch_fleet(
            &mut tx,
            open,
            Change::new(Event::Halt, "kill switch", json!({"epoch": epoch}), by),
            audit,
            pause.into(),
        )
        .await?;
        tx.commit().await?;
        Ok(epoch as u64)
    }

    /// Resumes the fleet: every halted task returns to its step, and working steps are
    /// re-issued under the current (raised) epoch so no task is lost. Idempotent.
    pub async fn resume(&self, by: &Actor) -> Result<u64, EngineError> {
        let mut tx = self.pool.begin().await?;
        let (epoch, halted): (i64, bool) =
            sqlx::query_as("SELECT kill_epoch, halted FROM fleet_state FOR UPDATE").fetch_one(&mut *tx).await?;
        if !halted {
            return Ok(epoch as u64);
        }
        sqlx::query("UPDATE fleet_state SET halted = false, changed_by = $1, reason = 'resumed', changed_at = now()")
            .bind(&by.instance)
            .execute(&mut *tx)
            .await?;
        let halted_tasks: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM tasks WHERE state = 'halted' ORDER BY created_at FOR UPDATE")
                .fetch_all(&mut *tx)
                .await?;
        let resume = envelope::ControlResume { epoch: epoch as u64, by: by.person() };
        let audit = by.entry("fleet.resume", None, json!({"epoch": epoch}));
        let change = Change::new(Event::Resume, "resume", json!({"epoch": epoch}), by);
        self.switch_fleet(&mut tx, halted_tasks, change, audit, resume.into()).await?;
        tx.commit().await?;
        Ok(epoch as u64)
    }

    /// The shared body of kill and resume: moves every task in `ids` by `change`, audits the
    /// fleet-wide action, and tells the budget manager (`control` on `fleet:control:budget`).
    async fn switch_fleet(
        &self,
        tx: &mut PgConnection,
        ids: Vec<Uuid>,
        change: Change<'_>,
        audit: AuditEntry<'_>,
        control: Payload,
    ) -> Result<(), EngineError> {
        for id in ids {
            let task = lock_task(tx, id).await?;
            let each =
                Change { event: change.event.clone(), detail: change.detail.clone(), findings: vec![], ..change };
            self.apply(tx, &task, each).await?;
        }
        audit::append(tx, &self.audit_key, audit).await?;
        self.enqueue(tx, &StreamName::control(Role::Budget), Role::Budget, None, None, control).await?;
        Ok(())
    }

    /// Redis lost its data, and every assignment and kill record with it: clears the
    /// working steps' assignments so that the next tick issues each one again under the
    /// current epoch (within a tick, not at the step deadline), tells the budget manager
    /// the kill state again if the fleet is halted, and audits it. Results for the lost
    /// assignments that still arrive are refused as stale. Returns how many steps.
    pub async fn reissue_after_redis_loss(&self, detail: &str) -> Result<u64, EngineError> {
        let me = self.me();
        let mut tx = self.pool.begin().await?;
        let (epoch, halted, reason): (i64, bool, Option<String>) =
            sqlx::query_as("SELECT kill_epoch, halted, reason FROM fleet_state FOR UPDATE").fetch_one(&mut *tx).await?;
        let cleared = sqlx::query(
            "UPDATE tasks SET assignment_id = NULL, not_before = now()
             WHERE state IN ('dev', 'qa', 'review', 'refactor') AND assignment_id IS NOT NULL",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let audit = me.entry(
            "fleet.redis_lost",
            None,
            json!({"detail": detail, "reissued_steps": cleared, "epoch": epoch, "halted": halted}),
        );
        audit::append(&mut tx, &self.audit_key, audit).await?;
        if epoch > 0 {
            // The kill record went too: every process that reads it afresh would take epoch 0
            // and have its envelopes refused as stale. The budget manager writes it again on
            // a pause at the same epoch (and pauses every role); a running fleet is resumed
            // at once under that epoch (the budget manager alerts both, which an operator
            // should hear about after losing Redis's data).
            let budget = StreamName::control(Role::Budget);
            let pause = envelope::ControlPause {
                epoch: epoch as u64,
                reason: if halted {
                    reason.unwrap_or_else(|| "kill switch (restored after Redis lost its data)".into())
                } else {
                    "restoring the kill record after Redis lost its data".into()
                },
                by: None,
            };
            self.enqueue(&mut tx, &budget, Role::Budget, None, None, pause.into()).await?;
            if !halted {
                let resume = envelope::ControlResume { epoch: epoch as u64, by: None };
                self.enqueue(&mut tx, &budget, Role::Budget, None, None, resume.into()).await?;
            }
        }
        tx.commit().await?;
        Ok(cleared)
    }

    /// The fleet's kill state: (epoch, halted).
    pub async fn fleet_state(&self) -> Result<(u64, bool), EngineError> {
        let (epoch, halted): (i64, bool) =
            sqlx::query_as("SELECT kill_epoch, halted FROM fleet_state").fetch_one(&self.pool).await?;
        Ok((epoch as u64, halted))
    }

    /// Moves `task` by `change`: task row, event, audit, and (for a working state) the new
    /// assignment, all in `tx`.
    async fn apply(&self, tx: &mut PgConnection, task: &Task, change: Change<'_>) -> Result<TaskState, EngineError> {
        let ctx = Context {
            risk: task.risk,
            retries: task.retries as u32,
            max_retries: self.cfg.max_retries,
            resume: task.resume_state,
        };
        let to = state::next(task.state, &change.event, ctx)?;
        // What workers and operators wrote (summaries, findings, reasons) is kept and shown
        // only redacted; findings also reach the next assignment only so.
        let mut change = change;
        telemetry::redact_json(&mut change.detail);
        change.findings.iter_mut().for_each(telemetry::redact_string);
        let counts_retry = matches!(change.event, Event::Retry | Event::SentBack) && to != TaskState::Failed;
        // An operator's retry starts the task's retry budget afresh.
        let retries = if change.event == Event::Reopen { 0 } else { task.retries + i32::from(counts_retry) };
        let resume_state = match to {
            TaskState::Halted | TaskState::Blocked => Some(task.state),
            _ => None,
        };
        let not_before = if counts_retry { Utc::now() + self.cfg.backoff(retries as u32) } else { Utc::now() };
        // A new step starts counting attempts afresh; a retry of the same step goes on counting.
        let attempt = if to == task.state { task.attempt } else { 0 };
        sqlx::query(
            "UPDATE tasks SET state = $2, resume_state = $3, retries = $4, assignment_id = NULL, deadline_at = NULL, \
             not_before = $5, attempt = $6, findings = $7, updated_at = now() WHERE id = $1",
        )
        .bind(task.id)
        .bind(to.as_str())
        .bind(resume_state.map(TaskState::as_str))
        .bind(retries)
        .bind(not_before)
        .bind(attempt)
        .bind(json!(change.findings))
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO task_events (task_id, from_state, to_state, cause, envelope_id, detail) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(task.id)
            .bind(task.state.as_str())
            .bind(to.as_str())
            .bind(change.cause)
            .bind(change.envelope_id)
            .bind(&change.detail)
            .execute(&mut *tx)
            .await?;
        audit::append(
            &mut *tx,
            &self.audit_key,
            change.actor.entry(
                "task.transition",
                Some(task.id),
                json!({"from": task.state.as_str(), "to": to.as_str(), "cause": change.cause, "detail": change.detail}),
            ),
        )
        .await?;
        if to.worker().is_some() && !counts_retry {
            let task = lock_task(tx, task.id).await?;
            self.assign(tx, &task).await?;
        }
        Ok(to)
    }

    /// Issues the current step's `task.assign` (attempt + 1, with the findings stored by the
    /// transition that led here) through the outbox.
    async fn assign(&self, tx: &mut PgConnection, task: &Task) -> Result<(), EngineError> {
        let Some(role) = task.state.worker() else { return Ok(()) };
        let findings: Value =
            sqlx::query_scalar("SELECT findings FROM tasks WHERE id = $1").bind(task.id).fetch_one(&mut *tx).await?;
        let findings: Vec<String> = serde_json::from_value(findings).unwrap_or_default();
        let spec = &task.spec;
        let text = |k: &str| spec.get(k).and_then(Value::as_str).map(str::to_owned);
        let attempt = task.attempt + 1;
        let assign = TaskAssign {
            attempt: attempt as u32,
            instructions: text("instructions").unwrap_or_default(),
            workspace: format!("{}/task-{}", self.cfg.workspace_root, task.id),
            repository: text("repository"),
            test_command: text("test_command"),
            findings,
            scope: spec.get("scope").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default(),
            change: None,
            change_sha256: None,
        };
        let mut assign = assign;
        if role != Role::Dev {
            // QA, Review and Refactor work on exactly the change that would be pushed, named
            // by its hash so that their results can say which bytes they judged.
            if let Some(id) = current_change(tx, task.id).await? {
                assign.change = Some(change_bytes(tx, task.id, &id).await?);
                assign.change_sha256 = Some(id);
            }
        }
        let workspace = assign.workspace.clone();
        let scope = assign.scope.clone();
        let mut env = self.envelope(tx, role, Some(task.id), None, assign.into()).await?;
        if let Some(leases) = &self.leases {
            let lease = leases
                .issue(env.id, task.id, role, &workspace, &scope, task.risk)
                .map_err(|e| EngineError::Invalid(format!("cannot mint the capability lease: {e}")))?;
            env.lease = Some(lease);
        }
        outbox::enqueue(tx, &self.keyring, &StreamName::tasks(role), &env).await?;
        let id = env.id;
        sqlx::query(
            "UPDATE tasks SET attempt = $2, assignment_id = $3, deadline_at = $4, assigned_to = NULL WHERE id = $1",
        )
        .bind(task.id)
        .bind(attempt)
        .bind(id)
        .bind(Utc::now() + self.cfg.step_deadline)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Seals an envelope from this orchestrator under the current kill epoch into the outbox.
    async fn enqueue(
        &self,
        tx: &mut PgConnection,
        stream: &StreamName,
        to: Role,
        task_id: Option<Uuid>,
        causation_id: Option<Uuid>,
        payload: Payload,
    ) -> Result<Uuid, EngineError> {
        let env = self.envelope(tx, to, task_id, causation_id, payload).await?;
        outbox::enqueue(tx, &self.keyring, stream, &env).await?;
        Ok(env.id)
    }

    /// An envelope from this orchestrator under the current kill epoch (read in `tx`). Its
    /// `traceparent` is the current span's (handling a result, a tool call), else the task's
    /// root span's (a step re-issued by the timer).
    async fn envelope(
        &self,
        tx: &mut PgConnection,
        to: Role,
        task_id: Option<Uuid>,
        causation_id: Option<Uuid>,
        payload: Payload,
    ) -> Result<Envelope, EngineError> {
        let epoch: i64 = sqlx::query_scalar("SELECT kill_epoch FROM fleet_state").fetch_one(&mut *tx).await?;
        let from = Sender { role: Role::Orchestrator, instance: self.cfg.instance.clone() };
        let mut env =
            Envelope::new(from, to, bus::now_ms(), self.cfg.assign_ttl.as_millis() as u64, epoch as u64, payload);
        env.task_id = task_id;
        env.causation_id = causation_id;
        env.traceparent = match (telemetry::propagate::current(), task_id) {
            (Some(tp), _) => Some(tp),
            (None, Some(id)) => sqlx::query_scalar("SELECT traceparent FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .flatten(),
            (None, None) => None,
        };
        Ok(env)
    }
}

async fn fleet_halted(tx: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT halted FROM fleet_state").fetch_one(tx).await
}

async fn lock_task(tx: &mut PgConnection, id: Uuid) -> Result<Task, EngineError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 FOR UPDATE")))
        .bind(id)
        .fetch_optional(tx)
        .await?;
    row.as_ref().map(task_from_row).transpose()?.ok_or(EngineError::NotFound(id))
}

async fn try_lock_task(tx: &mut PgConnection, id: Uuid) -> Result<Option<Task>, EngineError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 FOR UPDATE SKIP LOCKED"
    )))
    .bind(id)
    .fetch_optional(tx)
    .await?;
    Ok(row.as_ref().map(task_from_row).transpose()?)
}

/// The task's current change: the SHA-256 (hex) of the newest diff Dev or Refactor made.
async fn current_change(tx: &mut PgConnection, task: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT change_sha256 FROM tasks WHERE id = $1").bind(task).fetch_one(tx).await
}

/// The bytes of the change `id` of `task`.
async fn change_bytes(tx: &mut PgConnection, task: Uuid, id: &str) -> Result<Vec<u8>, EngineError> {
    let bytes: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT content FROM artifacts WHERE task_id = $1 AND kind = 'diff' AND sha256 = decode($2, 'hex') LIMIT 1",
    )
    .bind(task)
    .bind(id)
    .fetch_optional(tx)
    .await?;
    bytes.ok_or_else(|| EngineError::Invalid(format!("task {task}: its change {id} is missing from the artifacts")))
}

/// What a result vouches for: Dev's or Refactor's diff becomes the current change (and any
/// earlier pass or approval no longer counts); QA's pass and Review's approval are recorded
/// against the change they judged, which the caller checked is the current one.
async fn record_change(
    tx: &mut PgConnection,
    task: Uuid,
    role: Role,
    status: Status,
    diff: Option<&[u8]>,
    current: Option<&str>,
) -> Result<(), sqlx::Error> {
    if status != Status::Success {
        return Ok(());
    }
    let sql = match (role, diff) {
        (Role::Dev | Role::Refactor, Some(diff)) => {
            let id = changeset::ChangeId::of(diff).to_string();
            if current == Some(id.as_str()) {
                return Ok(());
            }
            return sqlx::query(
                "UPDATE tasks SET change_sha256 = $2, qa_passed_sha256 = NULL, review_approved_sha256 = NULL WHERE id = $1",
            )
            .bind(task)
            .bind(id)
            .execute(tx)
            .await
            .map(drop);
        }
        (Role::Qa, _) => "UPDATE tasks SET qa_passed_sha256 = change_sha256 WHERE id = $1",
        (Role::Review, _) => "UPDATE tasks SET review_approved_sha256 = change_sha256 WHERE id = $1",
        _ => return Ok(()),
    };
    sqlx::query(sql).bind(task).execute(tx).await.map(drop)
}

async fn store_artifact(
    tx: &mut PgConnection,
    task_id: Uuid,
    kind: &str,
    name: &str,
    content: &[u8],
) -> Result<(), sqlx::Error> {
    use sha2::{Digest, Sha256};
    sqlx::query("INSERT INTO artifacts (id, task_id, kind, name, sha256, content) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(Uuid::now_v7())
        .bind(task_id)
        .bind(kind)
        .bind(name)
        .bind(Sha256::digest(content).to_vec())
        .bind(content)
        .execute(tx)
        .await?;
    Ok(())
}

fn status_str(s: Status) -> &'static str {
    match s {
        Status::Success => "success",
        Status::Failure => "failure",
        Status::Error => "error",
    }
}

/// `s` redacted, then cut to `max` characters: in that order, since a secret cut in two
/// may no longer look like one.
fn cut(s: &str, max: usize) -> String {
    telemetry::redact(s).chars().take(max).collect()
}
