//! The `budget` process's bus side: the handlers of `fleet:usage`, `fleet:outcomes` and
//! `fleet:control:budget`, the counters they keep in Redis, and the triggers that engage
//! the kill switch.
//!
//! # Counters (Redis, under `fleet:budget:counters:`)
//! | key | type | content |
//! |---|---|---|
//! | `usage:YYYYMMDD` | hash | the UTC day's usage reports: `t` (tokens), `in`, `out`, `m` (µ$), `calls`; per role `role:<role>:{t,m,calls}`; per model `model:<model>:{t,m,calls}`. Kept 40 days. |
//! | `seen:<envelope id>` | string | the usage report was counted (kept 2 days); set by the same script as the increments |
//! | `failures` | string | consecutive failed steps; a success and a resume reset it |
//!
//! # Triggers
//! - **Daily budget**: after every usage report and every `check_every`, the day's spend —
//!   the ledger's committed figures, and the usage reports' totals — plus the configured
//!   headroom reaches the daily limit in tokens or money.
//! - **Consecutive failures**: `failure_threshold` outcomes in a row whose status is in
//!   `failure_statuses`; any other outcome resets the count.
//! - **Unknown error kind**: an outcome whose `error_kind` is not in `known_error_kinds`.
//! - **Operator**: `control.pause` from the orchestrator (an admin's `fleetctl kill`).
//!
//! Soft limits: a role whose spend of the day reaches its soft limit (ledger config
//! `per_role`), and the day at `daily_warn_percent` of its limit, raise a soft-limit alert,
//! at most one per scope per `alerts.soft_limit_every_secs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus::{Delivery, Handler, HandlerError};
use envelope::{Payload, Role, Status};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::alert::facts::ORCHESTRATOR_TRIGGER;
use crate::alert::render::thousands;
use crate::alert::{Alert, AlertSender, Cause};
use crate::killswitch::{FAILURES_KEY, KillSwitch};
use crate::ledger::{Day, Ledger};

/// Prefix of the counters this process keeps.
pub const COUNTERS_PREFIX: &str = "fleet:budget:counters:";

/// The usage counters of `day`.
pub fn usage_key(day: Day) -> String {
    format!("{COUNTERS_PREFIX}usage:{}", day.compact())
}

/// Marks usage report `id` as counted into `day`'s totals. Its hash tag is the day's key, so
/// on a Redis Cluster the script that sets both runs on one node.
pub fn usage_seen_key(day: Day, id: &uuid::Uuid) -> String {
    format!("{COUNTERS_PREFIX}seen:{{{}}}:{id}", usage_key(day))
}

/// How long a day's usage counters are kept.
const USAGE_RETENTION: Duration = Duration::from_secs(40 * 24 * 3600);
/// How long a counted usage report's marker is kept: longer than any redelivery.
const SEEN_RETENTION: Duration = Duration::from_secs(2 * 24 * 3600);
/// Counts a usage report once: marker and increments in one script.
const COUNT_USAGE_LUA: &str = include_str!("service/count_usage.lua");

/// When the kill switch engages. `[killswitch]` in the budget's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TriggerConfig {
    /// Consecutive failed steps that engage the switch.
    pub failure_threshold: u64,
    /// Outcome statuses that count as failures (`failure`: tests failed or review
    /// rejected; `error`: the step could not run).
    pub failure_statuses: Vec<String>,
    /// Error kinds the fleet knows; any other engages the switch.
    pub known_error_kinds: Vec<String>,
    /// The switch engages when the day's spend is within this many tokens of the daily
    /// limit (0: when the limit is reached).
    pub daily_headroom_tokens: u64,
    /// Likewise in micro-dollars.
    pub daily_headroom_micro_usd: u64,
    /// A soft-limit alert for the whole day at this percentage of the daily limit (0: none).
    pub daily_warn_percent: u64,
    /// How often the ledger's daily totals are checked besides each usage report.
    #[serde(rename = "check_every_ms")]
    pub check_every_ms: u64,
    /// `ttl_ms` of the pauses and resumes sent: a pause left in a stream is ignored after it.
    pub control_ttl_secs: u64,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            failure_statuses: vec!["failure".into(), "error".into()],
            known_error_kinds: [
                "timeout",
                "sandbox_timeout",
                "sandbox_oom",
                "sandbox_error",
                "build_failed",
                "tests_failed",
                "tool_denied",
                "lease_expired",
                "budget_exceeded",
                "provider_error",
                "output_too_large",
            ]
            .map(str::to_owned)
            .to_vec(),
            daily_headroom_tokens: 0,
            daily_headroom_micro_usd: 0,
            daily_warn_percent: 80,
            check_every_ms: 2000,
            control_ttl_secs: 60,
        }
    }
}

impl TriggerConfig {
    /// Checks what serde cannot; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.failure_threshold == 0 {
            return Err("killswitch.failure_threshold must be at least 1".into());
        }
        for s in &self.failure_statuses {
            if status_name_ok(s).is_none() {
                return Err(format!("killswitch.failure_statuses: unknown status {s:?} (success, failure, error)"));
            }
        }
        if self.daily_warn_percent > 100 {
            return Err("killswitch.daily_warn_percent must be 0 to 100".into());
        }
        if self.check_every_ms == 0 || self.control_ttl_secs == 0 {
            return Err("killswitch.check_every_ms and killswitch.control_ttl_secs must be at least 1".into());
        }
        Ok(())
    }

    fn counts_as_failure(&self, status: Status) -> bool {
        self.failure_statuses.iter().any(|s| status_name_ok(s) == Some(status))
    }
}

fn status_name_ok(s: &str) -> Option<Status> {
    match s {
        "success" => Some(Status::Success),
        "failure" => Some(Status::Failure),
        "error" => Some(Status::Error),
        _ => None,
    }
}

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Engages and releases.
    pub killswitch: KillSwitch,
    /// The ledger (daily totals, limits, soft limits).
    pub ledger: Ledger,
    /// Soft-limit alerts.
    pub alerts: AlertSender,
    /// Connections for the counters.
    pub pool: bus::RedisPool,
    /// When to engage.
    pub triggers: Arc<TriggerConfig>,
    /// An engagement whose pauses or alert failed after its record was written: the
    /// periodic check sends them again.
    pub needs_reassert: Arc<AtomicBool>,
    /// Tokens, cost and calls by role and model.
    pub metrics: crate::metrics::BudgetMetrics,
}

fn transient(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Transient(e.to_string())
}

impl Budget {
    /// An automatic `trigger` noticed by this process, with `reason` giving its figures.
    fn automatic(&self, trigger: &str, reason: &str) -> Cause {
        Cause::automatic(trigger, self.killswitch.instance().as_str(), reason)
    }

    /// Engages the switch; on a failure after the record was written, the periodic check
    /// finishes the job.
    pub async fn engage(&self, cause: &Cause, proposed: u64, details: serde_json::Value) -> Result<(), HandlerError> {
        match self.killswitch.engage(cause, proposed, details).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.needs_reassert.store(true, Ordering::Release);
                Err(transient(e))
            }
        }
    }

    /// Checks the day's spend against the daily limits (and the warning threshold); engages
    /// or warns. `reported` are the usage reports' totals (tokens, µ$), if known.
    pub async fn check_daily(&self, reported: Option<(u64, u64)>) -> Result<(), HandlerError> {
        let day = self.ledger.today();
        let daily = self.ledger.usage(day).await.map_err(transient)?;
        let (rt, rm) = reported.unwrap_or((0, 0));
        let tokens = daily.usage.tokens.max(rt);
        let cost = daily.usage.cost.0.max(rm);
        let t = &self.triggers;
        let over_tokens = tokens.saturating_add(t.daily_headroom_tokens) >= daily.limit_tokens;
        let over_cost = cost.saturating_add(t.daily_headroom_micro_usd) >= daily.limit_cost.0;
        if over_tokens || over_cost {
            let reason = if over_tokens {
                format!(
                    "daily budget exceeded: {} of {} tokens used on {day}",
                    thousands(tokens),
                    thousands(daily.limit_tokens)
                )
            } else {
                format!(
                    "daily budget exceeded: {} of {} spent on {day}",
                    crate::ledger::MicroUsd(cost),
                    daily.limit_cost
                )
            };
            let details = json!({"trigger": "daily_budget", "day": day.to_string(), "tokens": tokens,
                "limit_tokens": daily.limit_tokens, "micro_usd": cost, "limit_micro_usd": daily.limit_cost.0});
            return self.engage(&self.automatic("daily_budget", &reason), 0, details).await;
        }
        if t.daily_warn_percent > 0
            && (tokens.saturating_mul(100) >= daily.limit_tokens.saturating_mul(t.daily_warn_percent)
                || cost.saturating_mul(100) >= daily.limit_cost.0.saturating_mul(t.daily_warn_percent))
        {
            let msg = format!(
                "{} of {} tokens and {} of {} used today ({day}); the kill switch engages at the limit",
                thousands(tokens),
                thousands(daily.limit_tokens),
                crate::ledger::MicroUsd(cost),
                daily.limit_cost
            );
            let cause = self.automatic("daily_soft_limit", &msg);
            self.warn("daily", cause, json!({"tokens": tokens, "micro_usd": cost})).await?;
        }
        Ok(())
    }

    /// Queues the alert of an incident the orchestrator opened (sent once per incident:
    /// the alert's dedup key is the incident's id, so a redelivered envelope adds nothing).
    pub async fn alert_incident(&self, i: &envelope::IncidentOpened, via: &str) -> Result<(), HandlerError> {
        use crate::alert::{Incident, Scope, Severity};
        let severity = match i.severity.as_str() {
            "critical" => Severity::Critical,
            "high" => Severity::High,
            "medium" => Severity::Medium,
            "low" => Severity::Low,
            other => {
                // A newer orchestrator's word for it: page as high rather than drop it.
                tracing::warn!(severity = %other.chars().take(40).collect::<String>(), incident = %i.incident, "Unknown incident severity; alerting as high.");
                Severity::High
            }
        };
        let cause = match i.opened_by.strip_prefix("orchestrator/") {
            Some(_) => Cause::automatic(&i.trigger, via, ""),
            None => Cause::operator(Some(&i.opened_by), via, ""),
        };
        let incident = Incident {
            id: i.incident,
            severity,
            title: i.title.clone(),
            trigger: i.trigger.clone(),
            tasks: i.tasks.clone(),
            merges_frozen: if i.freezes_merges && i.repository.is_none() { Scope::All } else { Scope::None },
            repository: i.repository.clone().filter(|_| i.freezes_merges),
        };
        let epoch = self.killswitch.state().await.map_err(transient)?.epoch;
        let details = json!({"incident": i.incident, "trigger": i.trigger, "severity": i.severity});
        let alert = Alert::incident(self.alerts.deployment(), epoch, incident, cause, i.opened_at_ms, details);
        self.alerts.enqueue(&alert).await.map_err(transient)?;
        Ok(())
    }

    async fn warn(&self, scope: &str, cause: Cause, details: serde_json::Value) -> Result<(), HandlerError> {
        let epoch = self.killswitch.state().await.map_err(transient)?.epoch;
        let alert = Alert::soft_limit_warning(self.alerts.deployment(), epoch, scope, cause, details);
        self.alerts.enqueue(&alert).await.map_err(transient)?;
        Ok(())
    }

    /// Records one usage report and checks the limits it may have crossed.
    ///
    /// Counting is once per envelope (`id`): one Lua script sets the report's marker and,
    /// only if it was new, adds the increments (`service/count_usage.lua`). A redelivery (the
    /// check after the counting failed, or a second consumer that took the entry over
    /// while the first still ran) finds the marker and only re-checks the totals, so a
    /// report is never counted twice, nor half. The script needs nothing beyond the budget
    /// user's ledger commands on `fleet:budget:counters:*` (no `MULTI`/`EXEC`).
    pub async fn record_usage(&self, id: uuid::Uuid, u: &envelope::Usage, at_ms: u64) -> Result<(), HandlerError> {
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(COUNT_USAGE_LUA));
        let day = Day::from_unix_ms(at_ms);
        let tokens = u.input_tokens.saturating_add(u.output_tokens);
        let m = u.cost_micro_usd;
        let role = u.role.as_str();
        let model = &u.model;
        let mut call = SCRIPT.key(usage_key(day));
        call.key(usage_seen_key(day, &id))
            .arg(SEEN_RETENTION.as_millis() as u64)
            .arg(USAGE_RETENTION.as_millis() as u64)
            .arg(format!("role:{role}:t"))
            .arg(format!("role:{role}:m"));
        for (field, by) in [
            ("t".to_owned(), tokens),
            ("m".to_owned(), m),
            ("in".to_owned(), u.input_tokens),
            ("out".to_owned(), u.output_tokens),
            ("calls".to_owned(), 1),
            (format!("role:{role}:t"), tokens),
            (format!("role:{role}:m"), m),
            (format!("role:{role}:calls"), 1),
            (format!("model:{model}:t"), tokens),
            (format!("model:{model}:m"), m),
            (format!("model:{model}:calls"), 1),
        ] {
            call.arg(field).arg(by);
        }
        let mut c = self.pool.get().await.map_err(transient)?;
        let (counted, t, m, role_t, role_m): (u8, u64, u64, u64, u64) =
            call.invoke_async(&mut c).await.map_err(transient)?;
        drop(c);
        if counted == 0 {
            tracing::debug!(envelope = %id, "Usage already counted; re-checking the limits only.");
        } else {
            self.metrics.usage(u);
        }
        self.check_usage(u, day, (t, m), (role_t, role_m)).await
    }

    /// The daily and soft-limit checks after a usage report.
    async fn check_usage(
        &self,
        u: &envelope::Usage,
        day: Day,
        (t, m): (u64, u64),
        (role_t, role_m): (u64, u64),
    ) -> Result<(), HandlerError> {
        let role = u.role.as_str();
        self.check_daily(Some((t, m))).await?;
        // Soft limits of the role: the ledger's committed figures or the reports, whichever is higher.
        if let Some(limits) = self.ledger.config().per_role.get(&u.role) {
            let ledger = self.ledger.role_usage(u.role, day).await.map_err(transient)?;
            let (rt, rm) = (ledger.tokens.max(role_t), ledger.cost.0.max(role_m));
            let over_t = limits.soft_tokens.is_some_and(|l| rt >= l);
            let over_m = limits.soft_micro_usd.is_some_and(|l| rm >= l.0);
            if over_t || over_m {
                let msg = format!(
                    "role {role} used {} tokens and {} today (soft limits: {} tokens, {}){}",
                    thousands(rt),
                    crate::ledger::MicroUsd(rm),
                    limits.soft_tokens.map_or("none".to_owned(), thousands),
                    limits.soft_micro_usd.map_or("none".to_owned(), |v| v.to_string()),
                    limits.cheaper_model.as_deref().map_or(String::new(), |m| format!("; calls move to {m}"))
                );
                let cause = self.automatic("soft_limit", &msg);
                self.warn(role, cause, json!({"role": role, "tokens": rt, "micro_usd": rm})).await?;
            }
        }
        Ok(())
    }

    /// Counts one step's outcome; engages on the failure threshold or an unknown error kind.
    pub async fn record_outcome(&self, o: &envelope::Outcome, task: Option<uuid::Uuid>) -> Result<(), HandlerError> {
        let t = &self.triggers;
        if let Some(kind) = o.error_kind.as_deref()
            && !t.known_error_kinds.iter().any(|k| k == kind)
        {
            let shown: String = kind.chars().filter(|c| !c.is_control()).take(80).collect();
            let reason = format!("unknown error kind {shown:?} from a {} step", o.role);
            let details =
                json!({"trigger": "unknown_error_kind", "error_kind": shown, "role": o.role.as_str(), "task_id": task});
            return self.engage(&self.automatic("unknown_error_kind", &reason), 0, details).await;
        }
        let mut c = self.pool.get().await.map_err(transient)?;
        if t.counts_as_failure(o.status) {
            let n: u64 = redis::cmd("INCRBY").arg(FAILURES_KEY).arg(1).query_async(&mut c).await.map_err(transient)?;
            drop(c);
            tracing::info!(failures = n, threshold = t.failure_threshold, role = %o.role, "A step failed.");
            if n >= t.failure_threshold {
                let reason = format!("{n} consecutive task failures (threshold {})", t.failure_threshold);
                let details = json!({"trigger": "consecutive_failures", "failures": n, "last_role": o.role.as_str(), "task_id": task});
                return self.engage(&self.automatic("consecutive_failures", &reason), 0, details).await;
            }
        } else {
            let () = redis::cmd("SET").arg(FAILURES_KEY).arg(0).query_async(&mut c).await.map_err(transient)?;
        }
        Ok(())
    }

    /// The periodic check: the daily totals, and an engagement left half done.
    pub async fn tick(&self) {
        if self.needs_reassert.swap(false, Ordering::AcqRel)
            && let Err(e) = self.killswitch.reassert().await
        {
            self.needs_reassert.store(true, Ordering::Release);
            tracing::warn!(error = %e, "Cannot send the pauses again yet; retrying.");
        }
        if let Err(e) = self.check_daily(None).await {
            tracing::warn!(error = %e, "Cannot check the daily budget; retrying.");
        }
    }

    /// Runs [`Budget::tick`] every `check_every` until shutdown.
    pub async fn tick_loop(self, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.triggers.check_every_ms);
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            self.tick().await;
        }
    }
}

/// `fleet:usage`.
#[derive(Debug, Clone)]
pub struct UsageHandler(pub Budget);

impl Handler for UsageHandler {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        match &d.envelope.payload {
            Payload::Usage(u) => self.0.record_usage(d.envelope.id, u, d.envelope.issued_at_ms).await,
            other => Err(HandlerError::Permanent(format!("unexpected {} on fleet:usage", other.message_type()))),
        }
    }
}

/// `fleet:outcomes`.
#[derive(Debug, Clone)]
pub struct OutcomeHandler(pub Budget);

impl Handler for OutcomeHandler {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        match &d.envelope.payload {
            Payload::Outcome(o) => self.0.record_outcome(o, d.envelope.task_id).await,
            other => Err(HandlerError::Permanent(format!("unexpected {} on fleet:outcomes", other.message_type()))),
        }
    }
}

/// `fleet:control:budget`: the operator's kill and resume, relayed by the orchestrator.
#[derive(Debug, Clone)]
pub struct ControlHandler(pub Budget);

impl Handler for ControlHandler {
    async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let via = d.envelope.from.instance.as_str();
        // An admin's command names the admin; without a name, the orchestrator acted itself
        // (its model proxy found the day spent, or it restores the record after Redis lost it).
        let cause = |by: Option<&str>, reason: &str| match by {
            Some(name) => Cause::operator(Some(name), via, reason),
            None => Cause::automatic(ORCHESTRATOR_TRIGGER, via, reason),
        };
        match &d.envelope.payload {
            Payload::ControlPause(p) => {
                let cause = cause(p.by.as_deref(), &p.reason);
                let details = json!({"trigger": cause.trigger, "orchestrator": via});
                self.0.engage(&cause, p.epoch, details).await
            }
            Payload::ControlResume(r) => {
                self.0.killswitch.resume(&cause(r.by.as_deref(), ""), r.epoch).await.map_err(transient)?;
                Ok(())
            }
            Payload::IncidentOpened(i) => self.0.alert_incident(i, via).await,
            other => {
                Err(HandlerError::Permanent(format!("unexpected {} on fleet:control:budget", other.message_type())))
            }
        }
    }
}

/// The roles paused on an engagement (re-exported for the docs and `fleetctl status`).
pub const ROLES: &[Role] = crate::killswitch::PAUSED_ROLES;
