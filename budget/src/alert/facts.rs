//! What an alert reports, as structured facts: the deployment, when it happened, who or what
//! caused it, what it affects and the commands that act on it. The Telegram message and the
//! plain [`super::Alert::text`] are rendered from these ([`super::render`]); the webhook
//! sends them as they are.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The facts every alert carries, beside its id, kind and dedup key. Flattened into the
/// alert's JSON (the webhook's `data`); absent in alerts queued by an older `budget`, which
/// then read as the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Facts {
    /// The deployment the alert comes from (the `deployment` setting), so an operator
    /// with several fleets knows which one.
    pub deployment: String,
    /// When what the alert reports happened (the kill, the resume, the crossing of a soft
    /// limit, the incident), Unix milliseconds. May be earlier than the alert: a kill
    /// noticed again after a restart keeps its first time.
    pub occurred_at_ms: u64,
    /// The same instant, RFC 3339 UTC, for receivers that do not want to convert.
    pub occurred_at: String,
    /// Who or what caused it.
    pub cause: Cause,
    /// What it affects.
    pub affected: Affected,
    /// Commands an operator can run about it, most useful first.
    pub actions: Vec<Action>,
    /// For a resume: the kill it ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends: Option<KillRef>,
    /// For an incident: the incident.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident: Option<Incident>,
    /// For a soft-limit warning: the role whose limit it is, or `daily`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The trigger of an operator's action.
pub const OPERATOR: &str = "operator";
/// The trigger of a kill or resume the orchestrator relayed without an operator's name: its
/// own (the model proxy found the day spent; the record restored after Redis lost it).
pub const ORCHESTRATOR_TRIGGER: &str = "orchestrator";

/// Who or what caused an alert.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Cause {
    /// What set it off: `operator` when a person did, else the automatic trigger
    /// (`daily_budget`, `consecutive_failures`, `unknown_error_kind`, `soft_limit`,
    /// `daily_soft_limit`, or an incident's trigger).
    pub trigger: String,
    /// The person, when one did it: the subject of the admin token the orchestrator
    /// accepted. `None` for automatic triggers, and for an operator's command relayed by an
    /// orchestrator that does not pass the name on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The process that acted or relayed the command (`budget-0`, `orchestrator-0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// What happened, with its figures: the operator's reason, or `daily budget exceeded:
    /// 812,400 of 800,000 tokens used on 2026-12-02`.
    pub reason: String,
}

impl Cause {
    /// An operator's command: `name` when the relaying process knows it.
    pub fn operator(name: Option<&str>, via: &str, reason: &str) -> Self {
        Self {
            trigger: OPERATOR.to_owned(),
            operator: name.map(str::to_owned).filter(|n| !n.trim().is_empty()),
            via: Some(via.to_owned()),
            reason: reason.to_owned(),
        }
    }

    /// An automatic trigger noticed by `via`, with `reason` giving its figures.
    pub fn automatic(trigger: &str, via: &str, reason: &str) -> Self {
        Self { trigger: trigger.to_owned(), operator: None, via: Some(via.to_owned()), reason: reason.to_owned() }
    }

    /// Whether a person did it.
    pub fn is_operator(&self) -> bool {
        self.trigger == OPERATOR
    }

    /// Short, for the kill-switch record's `by` (shown by `fleetctl status`): the person's
    /// name, `operator via orchestrator-0` when it is not known, else the acting process.
    pub fn by(&self) -> String {
        match (&self.operator, &self.via) {
            (Some(name), _) => name.clone(),
            (None, Some(via)) if self.is_operator() => format!("operator via {via}"),
            (None, Some(via)) => via.clone(),
            (None, None) => "budget".to_owned(),
        }
    }
}

/// Which tasks or merges something reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// None.
    #[default]
    None,
    /// Only the tasks listed in [`Affected::tasks`].
    Tasks,
    /// All of them, fleet-wide.
    All,
}

/// What an alert's event affects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Affected {
    /// Roles told to stop claiming work.
    pub roles_paused: Vec<String>,
    /// Which tasks are halted.
    pub tasks_halted: Scope,
    /// Which merges are frozen.
    pub merges_frozen: Scope,
    /// The tasks concerned, when they are known one by one (an incident's).
    pub tasks: Vec<Uuid>,
    /// The one repository whose merges are frozen (an incident's), when not all are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_repository: Option<String>,
}

/// One command an operator can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    /// What it does: `resume the fleet`.
    pub label: String,
    /// The exact command line: `fleetctl resume`.
    pub command: String,
}

impl Action {
    /// `label`: `command`.
    pub fn new(label: &str, command: impl Into<String>) -> Self {
        Self { label: label.to_owned(), command: command.into() }
    }
}

/// The engagement of the kill switch that a resume ends.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KillRef {
    /// The engagement's id (the kill alert's dedup key is `kill_engaged:<engagement>`).
    pub engagement: String,
    /// When it was engaged, Unix milliseconds.
    pub at_ms: u64,
    /// The same, RFC 3339 UTC.
    pub at: String,
    /// Who or what engaged it.
    pub cause: Cause,
}

/// How bad an incident is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Look today.
    Medium,
    /// Look now.
    High,
    /// Look now; the fleet may be compromised.
    Critical,
}

impl Severity {
    /// Upper case, for the message: `HIGH`.
    pub fn shout(self) -> &'static str {
        match self {
            Severity::Low => "LOW",
            Severity::Medium => "MEDIUM",
            Severity::High => "HIGH",
            Severity::Critical => "CRITICAL",
        }
    }
}

/// An incident, as its alert reports it. A later change enqueues these (automatic on a
/// secret found after approval, a suspicious sandbox kill, a burst of forged envelopes, a
/// failed audit verify, a budget kill; or an operator's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// Its id, as `fleetctl incident show` takes it.
    pub id: Uuid,
    /// How bad it is.
    pub severity: Severity,
    /// One line saying what it is.
    pub title: String,
    /// What opened it (`secret_after_approval`, `forged_envelopes`, `audit_verify`,
    /// `budget_kill`, `operator`, …).
    pub trigger: String,
    /// The tasks concerned.
    pub tasks: Vec<Uuid>,
    /// Which merges it froze.
    pub merges_frozen: Scope,
    /// The repository it froze, when it froze only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
}

fn redact(s: &mut String) {
    telemetry::redact_string(s);
}

impl Cause {
    fn redact(&mut self) {
        [&mut self.trigger, &mut self.reason].into_iter().for_each(redact);
        self.operator.iter_mut().chain(self.via.iter_mut()).for_each(redact);
    }
}

impl Facts {
    /// Every free text through the fleet's redaction set ([`telemetry::redact()`]): a reason
    /// or a title may quote a credential.
    pub fn redact(&mut self) {
        redact(&mut self.deployment);
        self.cause.redact();
        self.affected.roles_paused.iter_mut().for_each(redact);
        for a in &mut self.actions {
            redact(&mut a.label);
            redact(&mut a.command);
        }
        if let Some(kill) = &mut self.ends {
            redact(&mut kill.engagement);
            kill.cause.redact();
        }
        if let Some(i) = &mut self.incident {
            redact(&mut i.title);
            redact(&mut i.trigger);
        }
        self.affected.frozen_repository.iter_mut().for_each(redact);
        self.scope.iter_mut().for_each(redact);
    }
}
