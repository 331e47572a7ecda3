//! Incidents (docs/incident-response.md): opened by an admin or operator through the API,
//! or automatically by the engine when something it sees means the fleet may be
//! compromised. Critical and high incidents freeze automatic merges (fleet-wide or for one
//! repository) until an admin resolves them; every step is in the audit trail's `incident`
//! category (`incident.opened`, `incident.linked`, `incident.resolved`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{Actor, Change, Engine, EngineError, NewTask, lock_task};
use crate::audit;
use crate::state::{Event, Risk};

/// Longest incident title, in characters.
pub const MAX_TITLE: usize = 200;
/// Longest resolution text, in characters.
pub const MAX_RESOLUTION: usize = 2000;
/// Most tasks one incident may name when it is opened.
pub const MAX_TASKS: usize = 64;

/// How bad an incident is, and so what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Recorded and audited only.
    Low,
    /// Recorded, audited and alerted.
    Medium,
    /// Also freezes automatic merges (its repository, or all of them).
    High,
    /// Also freezes automatic merges; the fleet may be compromised.
    Critical,
}

impl Severity {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    fn parse(s: &str) -> Result<Self, sqlx::Error> {
        Ok(match s {
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            other => return Err(sqlx::Error::Decode(format!("unknown incident severity {other:?}").into())),
        })
    }

    /// Whether pushes wait until the incident is resolved.
    pub fn freezes_merges(self) -> bool {
        self >= Severity::High
    }
}

/// What opened an incident automatically (the operator's is `operator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// An admin or operator opened it.
    Operator,
    /// An approved change, about to be pushed, carries a credential.
    SecretAfterApproval,
    /// An approved change, about to be pushed, carries dangerous shell or code injection
    /// (what Review's rules refuse).
    CriticalFindingAfterApproval,
    /// A sandbox run ended at a containment limit (network attempt, pids or memory kill).
    SandboxContainment,
    /// One sender's refused envelopes passed the audited rate (a worker that may be
    /// compromised).
    RejectionBurst,
    /// `fleetctl audit verify` found the chain broken.
    AuditVerify,
    /// The budget manager pulled the kill switch.
    BudgetKill,
    /// An operator quarantined a worker (`fleetctl quarantine`).
    Quarantine,
}

impl Trigger {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Operator => "operator",
            Trigger::SecretAfterApproval => "secret_after_approval",
            Trigger::CriticalFindingAfterApproval => "critical_finding_after_approval",
            Trigger::SandboxContainment => "sandbox_containment",
            Trigger::RejectionBurst => "rejection_burst",
            Trigger::AuditVerify => "audit_verify",
            Trigger::BudgetKill => "budget_kill",
            Trigger::Quarantine => "quarantine",
        }
    }

    /// The names an API caller may give as `trigger` (an operator reports what a tool of
    /// theirs found, such as a failed `fleetctl audit verify`).
    pub const REPORTABLE: [&'static str; 3] = ["operator", "audit_verify", "quarantine"];
}

/// A fix task an incident sends to Refactor: it starts at Refactor with critical priority
/// (issued before every other due step) and CRITICAL risk (a second person approves it).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FixTask {
    /// What Refactor should do (1 byte to 64 KiB).
    #[schema(min_length = 1, max_length = 65536)]
    pub instructions: String,
    /// Paths it may change (as a task's `scope`).
    #[serde(default)]
    #[schema(max_items = 64)]
    pub scope: Vec<String>,
    /// The test command QA runs on the fix.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub test_command: Option<String>,
}

/// An incident to open.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewIncident {
    /// `critical` or `high` freeze merges; `medium` alerts; `low` is only recorded.
    pub severity: Severity,
    /// One line saying what happened (1 to 200 characters; redacted).
    #[schema(min_length = 1, max_length = 200)]
    pub title: String,
    /// `operator` (the default), `audit_verify` (a failed `fleetctl audit verify`) or
    /// `quarantine` (`fleetctl quarantine`).
    #[serde(default)]
    pub trigger: Option<String>,
    /// The repository whose merges it freezes; none: every repository.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub repository: Option<String>,
    /// The tasks it concerns (at most 64).
    #[serde(default)]
    #[schema(max_items = 64)]
    pub tasks: Vec<Uuid>,
    /// Figures of what was found (any JSON object; redacted; at most 16 KiB as text).
    #[serde(default)]
    pub details: Option<Value>,
    /// Send a fix task to Refactor (needs `repository`).
    #[serde(default)]
    pub fix: Option<FixTask>,
}

/// A task an incident concerns.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct IncidentTask {
    /// The task.
    pub task_id: Uuid,
    /// `cause` (what it is about) or `fix` (the task sent to Refactor).
    pub link: String,
}

/// An incident as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Incident {
    /// Id.
    pub id: Uuid,
    /// Severity.
    pub severity: Severity,
    /// `open` or `resolved`.
    pub state: String,
    /// What opened it.
    pub trigger: String,
    /// What happened (redacted).
    pub title: String,
    /// The trigger's figures (redacted).
    pub details: Value,
    /// The repository it concerns; none: the whole fleet.
    pub repository: Option<String>,
    /// Whether it freezes merges (while open).
    pub freezes_merges: bool,
    /// Who opened it: an operator's name, or `orchestrator/<instance>`.
    pub opened_by: String,
    /// When.
    pub opened_at: DateTime<Utc>,
    /// The admin who resolved it.
    pub resolved_by: Option<String>,
    /// When.
    pub resolved_at: Option<DateTime<Utc>>,
    /// What was done (redacted).
    pub resolution: Option<String>,
    /// Its tasks.
    pub tasks: Vec<IncidentTask>,
}

const COLUMNS: &str = "id, severity, trigger, title, details, repository, freezes_merges, opened_by, opened_at, \
                       resolved_by, resolved_at, resolution";

fn from_row(r: &sqlx::postgres::PgRow) -> Result<Incident, sqlx::Error> {
    let resolved_at: Option<DateTime<Utc>> = r.try_get("resolved_at")?;
    Ok(Incident {
        id: r.try_get("id")?,
        severity: Severity::parse(r.try_get("severity")?)?,
        state: if resolved_at.is_some() { "resolved" } else { "open" }.to_owned(),
        trigger: r.try_get("trigger")?,
        title: r.try_get("title")?,
        details: r.try_get("details")?,
        repository: r.try_get("repository")?,
        freezes_merges: r.try_get("freezes_merges")?,
        opened_by: r.try_get("opened_by")?,
        opened_at: r.try_get("opened_at")?,
        resolved_by: r.try_get("resolved_by")?,
        resolved_at,
        resolution: r.try_get("resolution")?,
        tasks: Vec::new(),
    })
}

/// What the engine itself opens (see [`Trigger`]).
#[derive(Debug, Clone)]
pub(crate) struct AutoIncident {
    pub trigger: Trigger,
    pub severity: Severity,
    pub title: String,
    pub details: Value,
    pub repository: Option<String>,
    pub task: Option<Uuid>,
    /// One open incident per key: a repeated cause links to it instead of opening another.
    pub dedup_key: String,
}

impl NewIncident {
    fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Invalid(m));
        let title = self.title.trim();
        if title.is_empty() || title.chars().count() > MAX_TITLE || title.contains('\0') {
            return bad(format!("`title` must be 1 to {MAX_TITLE} characters without NUL"));
        }
        if let Some(t) = &self.trigger
            && !Trigger::REPORTABLE.contains(&t.as_str())
        {
            return bad(format!(
                "`trigger` {:?} cannot be reported through the API; use one of {}",
                t.chars().take(40).collect::<String>(),
                Trigger::REPORTABLE.join(", ")
            ));
        }
        if self.tasks.len() > MAX_TASKS {
            return bad(format!("`tasks` may name at most {MAX_TASKS} tasks"));
        }
        if let Some(d) = &self.details {
            if !d.is_object() {
                return bad("`details` must be a JSON object".into());
            }
            if d.to_string().len() > 16 * 1024 || d.to_string().contains("\\u0000") {
                return bad("`details` must be at most 16 KiB of JSON without NUL characters".into());
            }
        }
        if self.repository.as_ref().is_some_and(|r| r.is_empty() || r.len() > 2048 || r.contains('\0')) {
            return bad("`repository` must be 1 to 2048 characters".into());
        }
        if self.fix.is_some() && self.repository.is_none() {
            return bad(
                "a `fix` task needs the incident's `repository`: say which repository Refactor should fix".into()
            );
        }
        Ok(())
    }
}

impl Engine {
    /// Opens an incident for `by` (an operator through the API). Its tasks must exist; a
    /// fix task is submitted to Refactor in the same transaction.
    pub async fn open_incident(&self, by: &Actor, new: NewIncident) -> Result<Incident, EngineError> {
        new.validate()?;
        let trigger = match new.trigger.as_deref() {
            Some("audit_verify") => Trigger::AuditVerify,
            Some("quarantine") => Trigger::Quarantine,
            _ => Trigger::Operator,
        };
        let fix = match &new.fix {
            Some(f) => {
                let task = NewTask {
                    title: format!("Incident fix: {}", cut(new.title.trim(), 186)),
                    instructions: f.instructions.clone(),
                    repository: new.repository.clone(),
                    test_command: f.test_command.clone(),
                    risk: Risk::Critical,
                    scope: f.scope.clone(),
                };
                task.validate()?;
                if let Some(repo) = &task.repository {
                    self.cfg.repositories.check(repo, &self.cfg.workspace_root).map_err(EngineError::Invalid)?;
                }
                Some(task)
            }
            None => None,
        };
        let mut details = new.details.clone().unwrap_or_else(|| json!({}));
        telemetry::redact_json(&mut details);
        let mut tx = self.pool.begin().await?;
        for t in &new.tasks {
            lock_task(&mut tx, *t).await?;
        }
        let id = Uuid::now_v7();
        self.insert_incident(
            &mut tx,
            id,
            by,
            trigger,
            new.severity,
            new.title.trim(),
            &details,
            new.repository.as_deref(),
            None,
        )
        .await?;
        for t in &new.tasks {
            self.link_incident(&mut tx, id, *t, "cause", by).await?;
        }
        if let Some(task) = fix {
            let fix_id = self.submit_fix(&mut tx, by, task).await?;
            self.link_incident(&mut tx, id, fix_id, "fix", by).await?;
        }
        self.announce(&mut tx, id).await?;
        tx.commit().await?;
        tracing::warn!(incident = %id, severity = new.severity.as_str(), by = %by.instance, "Incident opened.");
        self.incident(id).await
    }

    /// Opens an incident the engine found, inside the caller's transaction, or links the
    /// task to the incident already open for the same cause. Returns the incident's id and
    /// whether it is new.
    pub(crate) async fn open_auto_incident(
        &self,
        tx: &mut PgConnection,
        found: AutoIncident,
    ) -> Result<(Uuid, bool), EngineError> {
        let me = self.me();
        let existing: Option<Uuid> =
            sqlx::query_scalar("SELECT id FROM incidents WHERE dedup_key = $1 AND resolved_at IS NULL FOR UPDATE")
                .bind(&found.dedup_key)
                .fetch_optional(&mut *tx)
                .await?;
        let (id, new) = match existing {
            Some(id) => (id, false),
            None => {
                let id = Uuid::now_v7();
                let mut details = found.details;
                telemetry::redact_json(&mut details);
                self.insert_incident(
                    tx,
                    id,
                    &me,
                    found.trigger,
                    found.severity,
                    &found.title,
                    &details,
                    found.repository.as_deref(),
                    Some(&found.dedup_key),
                )
                .await?;
                tracing::error!(incident = %id, trigger = found.trigger.as_str(), severity = found.severity.as_str(), title = %found.title, "Incident opened automatically; see docs/incident-response.md.");
                (id, true)
            }
        };
        if let Some(task) = found.task {
            self.link_incident(tx, id, task, "cause", &me).await?;
        }
        if new {
            self.announce(tx, id).await?;
        }
        Ok((id, new))
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_incident(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        by: &Actor,
        trigger: Trigger,
        severity: Severity,
        title: &str,
        details: &Value,
        repository: Option<&str>,
        dedup_key: Option<&str>,
    ) -> Result<(), EngineError> {
        let title = telemetry::redact(title).into_owned();
        let opened_by =
            if by.role == "operator" { by.instance.clone() } else { format!("{}/{}", by.role, by.instance) };
        sqlx::query(
            "INSERT INTO incidents (id, severity, trigger, title, details, repository, freezes_merges, dedup_key, opened_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(severity.as_str())
        .bind(trigger.as_str())
        .bind(&title)
        .bind(details)
        .bind(repository)
        .bind(severity.freezes_merges())
        .bind(dedup_key)
        .bind(&opened_by)
        .execute(&mut *tx)
        .await?;
        let audit_details = json!({
            "incident": id,
            "severity": severity.as_str(),
            "trigger": trigger.as_str(),
            "title": title,
            "repository": repository,
            "freezes_merges": severity.freezes_merges(),
            "details": details,
        });
        audit::append(&mut *tx, &self.audit_key, by.entry("incident.opened", None, audit_details)).await?;
        Ok(())
    }

    /// Tells the budget manager, whose channels reach people, about a medium or worse
    /// incident (`incident.opened` through the outbox, so it goes out exactly when the
    /// incident is committed). A low one is only recorded.
    async fn announce(&self, tx: &mut PgConnection, id: Uuid) -> Result<(), EngineError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM incidents WHERE id = $1")))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let incident = from_row(&row)?;
        if incident.severity < Severity::Medium {
            return Ok(());
        }
        let tasks: Vec<Uuid> =
            sqlx::query_scalar("SELECT task_id FROM incident_tasks WHERE incident_id = $1 ORDER BY linked_at, task_id")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        let payload = envelope::IncidentOpened {
            incident: id,
            severity: incident.severity.as_str().to_owned(),
            trigger: incident.trigger,
            title: incident.title,
            repository: incident.repository,
            freezes_merges: incident.freezes_merges,
            opened_at_ms: u64::try_from(incident.opened_at.timestamp_millis()).unwrap_or(0),
            opened_by: incident.opened_by,
            tasks,
        };
        let stream = envelope::StreamName::control(envelope::Role::Budget);
        self.enqueue(tx, &stream, envelope::Role::Budget, None, None, payload.into()).await?;
        Ok(())
    }

    async fn link_incident(
        &self,
        tx: &mut PgConnection,
        incident: Uuid,
        task: Uuid,
        link: &str,
        by: &Actor,
    ) -> Result<(), EngineError> {
        let inserted = sqlx::query(
            "INSERT INTO incident_tasks (incident_id, task_id, link) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(incident)
        .bind(task)
        .bind(link)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            let details = json!({"incident": incident, "link": link});
            audit::append(&mut *tx, &self.audit_key, by.entry("incident.linked", Some(task), details)).await?;
        }
        Ok(())
    }

    /// Submits an incident's fix task: it starts at Refactor with critical priority.
    async fn submit_fix(&self, tx: &mut PgConnection, by: &Actor, new: NewTask) -> Result<Uuid, EngineError> {
        if super::fleet_halted(tx).await? {
            return Err(EngineError::Halted);
        }
        let id = Uuid::now_v7();
        self.insert_task(tx, id, by, &new, 1, "incident fix").await?;
        let task = lock_task(tx, id).await?;
        self.apply(tx, &task, Change::new(Event::StartFix, "incident fix", json!({}), by)).await?;
        Ok(id)
    }

    /// One incident with its tasks.
    pub async fn incident(&self, id: Uuid) -> Result<Incident, EngineError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM incidents WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let mut incident = row.as_ref().map(from_row).transpose()?.ok_or(EngineError::IncidentNotFound(id))?;
        let links =
            sqlx::query("SELECT task_id, link FROM incident_tasks WHERE incident_id = $1 ORDER BY linked_at, task_id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        for r in links {
            incident.tasks.push(IncidentTask { task_id: r.try_get("task_id")?, link: r.try_get("link")? });
        }
        Ok(incident)
    }

    /// Incidents, newest first; only open ones unless `all`.
    pub async fn incidents(&self, all: bool, limit: i64) -> Result<Vec<Incident>, EngineError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM incidents WHERE $1 OR resolved_at IS NULL ORDER BY opened_at DESC, id DESC LIMIT $2"
        )))
        .bind(all)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut i = from_row(r)?;
            let links = sqlx::query(
                "SELECT task_id, link FROM incident_tasks WHERE incident_id = $1 ORDER BY linked_at, task_id",
            )
            .bind(i.id)
            .fetch_all(&self.pool)
            .await?;
            for l in links {
                i.tasks.push(IncidentTask { task_id: l.try_get("task_id")?, link: l.try_get("link")? });
            }
            out.push(i);
        }
        Ok(out)
    }

    /// An admin resolves an incident: its freeze lifts. Resolving twice is a conflict.
    pub async fn resolve_incident(&self, id: Uuid, by: &Actor, resolution: &str) -> Result<Incident, EngineError> {
        let resolution = telemetry::redact(resolution).into_owned();
        let mut tx = self.pool.begin().await?;
        let state: Option<Option<DateTime<Utc>>> =
            sqlx::query_scalar("SELECT resolved_at FROM incidents WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        match state {
            None => return Err(EngineError::IncidentNotFound(id)),
            Some(Some(at)) => {
                return Err(EngineError::Conflict(format!(
                    "incident {id} was already resolved at {}; open a new incident if it is back",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )));
            }
            Some(None) => {}
        }
        sqlx::query("UPDATE incidents SET resolved_by = $2, resolved_at = now(), resolution = $3 WHERE id = $1")
            .bind(id)
            .bind(&by.instance)
            .bind(&resolution)
            .execute(&mut *tx)
            .await?;
        let details = json!({"incident": id, "resolution": resolution});
        audit::append(&mut tx, &self.audit_key, by.entry("incident.resolved", None, details)).await?;
        tx.commit().await?;
        tracing::warn!(incident = %id, by = %by.instance, "Incident resolved.");
        self.incident(id).await
    }
}

/// The containment kinds a worker may report; anything else is counted as `other`, so a
/// compromised worker cannot write free text into the incident's title.
const CONTAINMENT_KINDS: [&str; 4] = ["oom_killed", "pids_limit", "disk_limit", "network"];

impl Engine {
    /// The bus refused a burst of entries claiming to come from one sender (bad signatures,
    /// forbidden types): one high incident per claimed sender while open, freezing every
    /// merge. Its id.
    pub async fn rejection_burst(&self, b: &crate::refusals::Burst) -> Result<Uuid, EngineError> {
        let mut tx = self.pool.begin().await?;
        let reasons: Vec<String> = b.reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        let found = AutoIncident {
            trigger: Trigger::RejectionBurst,
            severity: Severity::High,
            title: format!(
                "Burst of rejected entries claiming to be from {}/{}: {} in a minute ({})",
                b.role,
                b.instance,
                b.count,
                reasons.join(", ")
            ),
            details: json!({
                "sender": {"role": b.role, "instance": b.instance},
                "claimed_not_verified": true,
                "rejected": b.count,
                "reasons": b.reasons,
                "next": format!("fleetctl quarantine {}/{}", b.role, b.instance),
            }),
            repository: None,
            task: None,
            dedup_key: format!("rejection_burst:{}/{}", b.role, b.instance),
        };
        let (id, _) = self.open_auto_incident(&mut tx, found).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// A step's sandbox runs hit containment limits in a way that looks like an attack: a
    /// high incident freezes the task's repository (one per task while open).
    pub(super) async fn sandbox_contained(
        &self,
        tx: &mut PgConnection,
        env: &envelope::Verified<envelope::Envelope>,
        task: &super::Task,
        reported: &[String],
    ) -> Result<(), EngineError> {
        let mut kinds: Vec<&str> = reported
            .iter()
            .map(|k| CONTAINMENT_KINDS.iter().copied().find(|known| known == k).unwrap_or("other"))
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        let sender = format!("{}/{}", env.from.role, env.from.instance);
        let found = AutoIncident {
            trigger: Trigger::SandboxContainment,
            severity: Severity::High,
            title: format!("Sandbox of task {} hit {} ({sender})", task.id, kinds.join(", ")),
            details: json!({"kinds": kinds, "worker": sender, "attempt": task.attempt, "state": task.state.as_str()}),
            repository: task.spec.get("repository").and_then(Value::as_str).map(str::to_owned),
            task: Some(task.id),
            dedup_key: format!("sandbox_containment:{}", task.id),
        };
        self.open_auto_incident(tx, found).await?;
        Ok(())
    }

    /// The open incident that freezes `task`'s push to `repository` (a fleet-wide one
    /// freezes every repository), unless `task` is that incident's own fix. Checked again
    /// right before each push: an incident opened by an earlier push of the same batch
    /// stops the rest.
    pub async fn merge_freeze(&self, task: Uuid, repository: &str) -> Result<Option<Uuid>, EngineError> {
        Ok(sqlx::query_scalar(
            "SELECT i.id FROM incidents i WHERE i.resolved_at IS NULL AND i.freezes_merges \
               AND (i.repository IS NULL OR i.repository = $2) \
               AND NOT EXISTS (SELECT 1 FROM incident_tasks l WHERE l.incident_id = i.id AND l.task_id = $1 AND l.link = 'fix') \
             ORDER BY i.opened_at LIMIT 1",
        )
        .bind(task)
        .bind(repository)
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (task titles are limited in
/// bytes).
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
