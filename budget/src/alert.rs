//! Alerts: telling operators that the kill switch was engaged, that the fleet resumed, that
//! a soft limit is near, or that an incident was opened, over Telegram (Bot API
//! `sendMessage`) and a generic JSON webhook signed per Standard Webhooks.
//!
//! **Something a person can act on from a phone.** Every alert carries [`Facts`]: the
//! deployment (the `deployment` setting), when it happened, who did it (the admin's name
//! when a person did) or which trigger with its figures, what is affected (tasks halted,
//! merges frozen, roles paused), and the exact `fleetctl` commands to act. A resume also
//! names the kill it ends. Telegram gets them as HTML rendered at each attempt (with the
//! event's age then); the webhook gets them as structured fields, plus the plain `text`.
//!
//! An alert is **persisted before any send attempt**: [`AlertSender::enqueue`] appends it to
//! the Redis stream [`names::STREAM`] in the same Lua script that claims its deduplication
//! marker, so either both happen or neither does. Each channel reads the stream in a
//! consumer group of its own (named after the channel), and the [`AlertDispatcher`]
//! acknowledges an entry only once the channel confirmed it (a 2xx answer; for Telegram
//! also `"ok": true`). Until then it retries with exponential backoff, honouring the
//! channel's `retry_after`, for as long as it takes. An alert read but not acknowledged
//! stays in the group's pending list, so a restarted `budget` (same consumer name) picks it
//! up again first: delivery survives restarts of `budget`, and of Redis if it runs with AOF.
//!
//! **Once per engagement**: an alert carries a deduplication key
//! (`kill_engaged:<engagement>`, `resumed:<epoch>`, `soft_limit_warning:<scope>`,
//! `incident:<id>`), and enqueueing claims
//! `fleet:alerts:dedup:<key>` with `SET NX`; a second trigger for the same epoch finds the
//! marker and enqueues nothing. Soft-limit markers expire after
//! [`AlertsConfig::soft_limit_every`], which is the rate limit.
//!
//! **Delivery is at least once per channel.** A crash (or a lost connection to Redis)
//! between the channel's "ok" and the `XACK` sends the alert again after the restart. The
//! webhook carries the alert id as `webhook-id` on every attempt, so a receiver drops the
//! repeat by id; Telegram has no such key, so a duplicate message there is possible, if
//! rare.
//!
//! # Layout
//! - [`config`]: [`AlertsConfig`], [`TelegramConfig`], [`WebhookConfig`].
//! - [`facts`]: what an alert reports ([`Facts`], [`Cause`], [`Affected`], [`Incident`], …).
//! - [`render`]: the facts as plain text and as Telegram HTML (escaped, within 4,096).
//! - [`outbox`]: [`AlertSender`], the enqueue script (dedup + `XADD`).
//! - [`dispatcher`]: [`AlertDispatcher`], one read → deliver → ack loop per channel.
//! - [`channel`]: one delivery attempt over Telegram or the webhook, classified.
//! - [`standard_webhooks`]: `sign` and `verify` of the Standard Webhooks scheme.
//! - [`names`]: the Redis keys and group names.

pub mod channel;
pub mod config;
pub mod dispatcher;
pub mod facts;
pub mod outbox;
pub mod render;
pub mod standard_webhooks;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use config::{AlertsConfig, TelegramConfig, WebhookConfig};
pub use dispatcher::AlertDispatcher;
pub use facts::{Action, Affected, Cause, Facts, Incident, KillRef, Scope, Severity};
pub use outbox::{AlertSender, Enqueued};

/// Redis keys and consumer groups of the alert outbox.
pub mod names {
    /// The outbox: one entry per alert, field [`FIELD`] holding its JSON.
    pub const STREAM: &str = "fleet:alerts";
    /// The entry field carrying the alert.
    pub const FIELD: &str = "alert";
    /// Prefix of the deduplication markers; the key is followed by the alert's dedup key.
    pub const DEDUP_PREFIX: &str = "fleet:alerts:dedup:";
    /// Consumer group of the Telegram channel.
    pub const TELEGRAM_GROUP: &str = "telegram";
    /// Consumer group of the webhook channel.
    pub const WEBHOOK_GROUP: &str = "webhook";

    /// The marker key for `dedup_key`. Its hash tag is the stream's name, so on a Redis
    /// Cluster the script that sets the marker and appends to [`STREAM`] runs on one node.
    pub fn dedup_key(dedup_key: &str) -> String {
        format!("{DEDUP_PREFIX}{{{STREAM}}}:{dedup_key}")
    }
}

/// What happened. Serialised in snake case (`kill_engaged`); the webhook's event `type` is
/// `alert.<kind>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// The kill switch was engaged: every role paused, merges frozen.
    KillEngaged,
    /// An operator resumed the fleet.
    Resumed,
    /// A soft limit (per role, or of the day) was reached; nothing was stopped yet.
    SoftLimitWarning,
    /// An incident was opened ([`Incident`]).
    Incident,
}

impl AlertKind {
    /// The snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::KillEngaged => "kill_engaged",
            AlertKind::Resumed => "resumed",
            AlertKind::SoftLimitWarning => "soft_limit_warning",
            AlertKind::Incident => "incident",
        }
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert, as stored in the outbox and sent (whole) as the webhook's `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// UUIDv7, fixed at creation: the webhook's `webhook-id` on every attempt, so receivers
    /// can drop repeats.
    pub id: Uuid,
    /// What happened.
    pub kind: AlertKind,
    /// The kill epoch in force (for machines; never in the text).
    pub epoch: u64,
    /// At most one alert per dedup key is enqueued (per rate-limit interval for soft-limit
    /// warnings): `kill_engaged:<engagement>`, `resumed:<epoch>`,
    /// `soft_limit_warning:<scope>`, `incident:<id>`.
    pub dedup_key: String,
    /// The message as plain text (rendered from the facts when the alert was made, without
    /// the age). Telegram gets the same facts as HTML ([`render::telegram_html`]).
    pub text: String,
    /// Structured context for machines (the trigger's own figures).
    pub details: serde_json::Value,
    /// When the alert was raised, Unix milliseconds.
    pub created_at_ms: u64,
    /// Deployment, time, cause, what is affected, the commands to act (flattened into the
    /// JSON: `deployment`, `occurred_at`, `cause`, …).
    #[serde(flatten)]
    pub facts: Facts,
}

/// Longest `text` kept; Telegram refuses messages over 4096 characters.
pub const MAX_TEXT_CHARS: usize = 4000;

/// The deployment name when none is configured.
pub const DEFAULT_DEPLOYMENT: &str = "agentfleet";

fn resume_action() -> Action {
    Action::new("Resume", "fleetctl resume")
}

fn status_action() -> Action {
    Action::new("State", "fleetctl status")
}

impl Alert {
    /// An alert of `kind` with a fresh id and the current time. The facts and `details` are
    /// redacted ([`telemetry::redact()`]: a reason may quote a credential) before anything
    /// is stored or sent; `text` is rendered from them and cut to [`MAX_TEXT_CHARS`].
    pub fn new(
        kind: AlertKind,
        epoch: u64,
        dedup_key: impl Into<String>,
        mut facts: Facts,
        details: serde_json::Value,
    ) -> Self {
        facts.redact();
        facts.occurred_at = render::rfc3339(facts.occurred_at_ms);
        if let Some(kill) = &mut facts.ends {
            kill.at = render::rfc3339(kill.at_ms);
        }
        let mut details = details;
        telemetry::redact_json(&mut details);
        let mut alert = Self {
            id: Uuid::now_v7(),
            kind,
            epoch,
            dedup_key: dedup_key.into(),
            text: String::new(),
            details,
            created_at_ms: now_ms(),
            facts,
        };
        let mut text = render::plain(&alert);
        telemetry::redact_string(&mut text);
        if let Some((cut, _)) = text.char_indices().nth(MAX_TEXT_CHARS) {
            text.truncate(cut);
        }
        alert.text = text;
        alert
    }

    /// The kill switch was engaged at `at_ms` under `epoch` by `cause`. Every role paused,
    /// every open task halted, merges frozen. Sent once per engagement.
    pub fn kill_engaged(deployment: &str, epoch: u64, cause: Cause, at_ms: u64, details: serde_json::Value) -> Self {
        let facts = Facts {
            deployment: deployment.to_owned(),
            occurred_at_ms: at_ms,
            cause,
            affected: Affected {
                roles_paused: crate::killswitch::PAUSED_ROLES.iter().map(|r| r.as_str().to_owned()).collect(),
                tasks_halted: Scope::All,
                merges_frozen: Scope::All,
                tasks: Vec::new(),
                frozen_repository: None,
            },
            actions: vec![resume_action(), status_action()],
            ..Facts::default()
        };
        Self::new(AlertKind::KillEngaged, epoch, format!("{}:{epoch}", AlertKind::KillEngaged), facts, details)
    }

    /// The fleet resumed at `at_ms` on `cause`'s command, ending the kill `ends` (when the
    /// record still told it). Sent once per epoch.
    pub fn resumed(
        deployment: &str,
        epoch: u64,
        cause: Cause,
        at_ms: u64,
        ends: Option<KillRef>,
        details: serde_json::Value,
    ) -> Self {
        let facts = Facts {
            deployment: deployment.to_owned(),
            occurred_at_ms: at_ms,
            cause,
            ends,
            actions: vec![status_action()],
            ..Facts::default()
        };
        Self::new(AlertKind::Resumed, epoch, format!("{}:{epoch}", AlertKind::Resumed), facts, details)
    }

    /// A soft limit of `scope` (a role such as `dev`, or `daily`) was reached just now;
    /// `cause.reason` says which and by how much. At most one per scope per
    /// [`AlertsConfig::soft_limit_every`].
    pub fn soft_limit_warning(
        deployment: &str,
        epoch: u64,
        scope: &str,
        cause: Cause,
        details: serde_json::Value,
    ) -> Self {
        let shown: String = scope.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).collect();
        let facts = Facts {
            deployment: deployment.to_owned(),
            occurred_at_ms: now_ms(),
            cause,
            scope: Some(scope.to_owned()),
            actions: vec![
                status_action(),
                Action::new("Stop everything", format!("fleetctl kill --reason 'soft limit reached for {shown}'")),
            ],
            ..Facts::default()
        };
        Self::new(
            AlertKind::SoftLimitWarning,
            epoch,
            format!("{}:{scope}", AlertKind::SoftLimitWarning),
            facts,
            details,
        )
    }

    /// `incident` was opened at `at_ms` by `cause`. Sent once per incident.
    pub fn incident(
        deployment: &str,
        epoch: u64,
        incident: Incident,
        cause: Cause,
        at_ms: u64,
        details: serde_json::Value,
    ) -> Self {
        let facts = Facts {
            deployment: deployment.to_owned(),
            occurred_at_ms: at_ms,
            cause,
            affected: Affected {
                roles_paused: Vec::new(),
                tasks_halted: Scope::None,
                merges_frozen: incident.merges_frozen,
                tasks: incident.tasks.clone(),
                frozen_repository: incident.repository.clone(),
            },
            actions: vec![Action::new("Details", format!("fleetctl incident show {}", incident.id)), status_action()],
            incident: Some(incident),
            ..Facts::default()
        };
        let dedup_key =
            format!("{}:{}", AlertKind::Incident, facts.incident.as_ref().map(|i| i.id).unwrap_or_default());
        Self::new(AlertKind::Incident, epoch, dedup_key, facts, details)
    }
}

/// What can go wrong enqueueing or reading alerts. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// A Redis command failed (connection lost, `NOPERM`, …).
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No Redis connection could be had from the pool.
    #[error("Redis pool: {0}")]
    Pool(#[from] bus::RedisPoolError),
    /// Redis answered something this code does not understand.
    #[error("unexpected Redis reply to {command}: {detail}")]
    Reply {
        /// The command.
        command: &'static str,
        /// What was wrong with the reply.
        detail: String,
    },
    /// An alert could not be serialised.
    #[error("cannot encode the alert: {0}")]
    Encode(#[from] serde_json::Error),
    /// A channel's configuration is unusable; the message names the setting, not its value.
    #[error("alerts.{setting}: {problem}")]
    Config {
        /// The setting (`telegram.base_url`, `webhook.secret`, …).
        setting: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// Unix milliseconds from the system clock (0 on a clock before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cause() -> Cause {
        Cause::automatic("daily_budget", "budget-0", "daily budget exceeded")
    }

    #[test]
    fn dedup_keys_follow_kind_and_epoch_or_scope() {
        let kill = Alert::kill_engaged("prod", 7, cause(), 1, serde_json::json!({}));
        assert_eq!(kill.dedup_key, "kill_engaged:7");
        assert_eq!(kill.id.get_version_num(), 7);
        assert!(kill.text.contains("daily budget exceeded") && !kill.text.contains("epoch"), "{}", kill.text);
        let alice = Cause::operator(Some("alice"), "orchestrator-0", "");
        assert_eq!(Alert::resumed("prod", 8, alice, 2, None, serde_json::json!({})).dedup_key, "resumed:8");
        assert_eq!(
            Alert::soft_limit_warning("prod", 8, "dev", cause(), serde_json::json!({})).dedup_key,
            "soft_limit_warning:dev"
        );
        let incident = Incident {
            id: Uuid::nil(),
            severity: Severity::High,
            title: "t".into(),
            trigger: "operator".into(),
            tasks: vec![],
            merges_frozen: Scope::All,
            repository: None,
        };
        assert_eq!(
            Alert::incident("prod", 8, incident, cause(), 3, serde_json::json!({})).dedup_key,
            "incident:00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(names::dedup_key("kill_engaged:7"), "fleet:alerts:dedup:{fleet:alerts}:kill_engaged:7");
    }

    #[test]
    fn serialises_kinds_in_snake_case_and_round_trips() {
        let alert = Alert::soft_limit_warning("prod", 3, "daily", cause(), serde_json::json!({"used": 80}));
        let json = serde_json::to_value(&alert).unwrap();
        assert_eq!(json["kind"], "soft_limit_warning");
        assert_eq!(json["epoch"], 3);
        assert_eq!(json["deployment"], "prod");
        assert_eq!(json["cause"]["trigger"], "daily_budget");
        let back: Alert = serde_json::from_value(json).unwrap();
        assert_eq!(back, alert);
    }

    #[test]
    fn reads_alerts_queued_before_the_facts_existed() {
        let old = serde_json::json!({"id": Uuid::now_v7(), "kind": "kill_engaged", "epoch": 7,
            "dedup_key": "kill_engaged:x", "text": "agentfleet: KILL SWITCH ENGAGED (epoch 7) by budget: <x>",
            "details": {}, "created_at_ms": 1});
        let alert: Alert = serde_json::from_value(old).unwrap();
        assert_eq!(alert.facts, Facts::default());
        assert_eq!(
            render::telegram_html(&alert, 2),
            "agentfleet: KILL SWITCH ENGAGED (epoch 7) by budget: &lt;x&gt;",
            "sent as its stored text"
        );
    }

    #[test]
    fn cuts_long_texts_on_a_char_boundary() {
        let long = Cause::automatic("daily_budget", "budget-0", &"é".repeat(MAX_TEXT_CHARS + 10));
        let alert = Alert::kill_engaged("prod", 1, long, 1, serde_json::Value::Null);
        assert_eq!(alert.text.chars().count(), MAX_TEXT_CHARS);
    }
}
