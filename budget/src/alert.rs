//! Alerts: telling operators that the kill switch was engaged, that the fleet resumed, or
//! that a soft limit is near, over Telegram (Bot API `sendMessage`) and a generic JSON
//! webhook signed per Standard Webhooks.
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
//! **Once per engagement**: an alert carries a deduplication key (`kill_engaged:<epoch>`,
//! `resumed:<epoch>`, `soft_limit_warning:<scope>`), and enqueueing claims
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
//! - [`outbox`]: [`AlertSender`], the enqueue script (dedup + `XADD`).
//! - [`dispatcher`]: [`AlertDispatcher`], one read → deliver → ack loop per channel.
//! - [`channel`]: one delivery attempt over Telegram or the webhook, classified.
//! - [`standard_webhooks`]: `sign` and `verify` of the Standard Webhooks scheme.
//! - [`names`]: the Redis keys and group names.

pub mod channel;
pub mod config;
pub mod dispatcher;
pub mod outbox;
pub mod standard_webhooks;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use config::{AlertsConfig, TelegramConfig, WebhookConfig};
pub use dispatcher::AlertDispatcher;
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

    /// The marker key for `dedup_key`.
    pub fn dedup_key(dedup_key: &str) -> String {
        format!("{DEDUP_PREFIX}{dedup_key}")
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
    /// An operator resumed the fleet under a new epoch.
    Resumed,
    /// A soft limit (per role, or of the day) was reached; nothing was stopped yet.
    SoftLimitWarning,
}

impl AlertKind {
    /// The snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::KillEngaged => "kill_engaged",
            AlertKind::Resumed => "resumed",
            AlertKind::SoftLimitWarning => "soft_limit_warning",
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
    /// The kill epoch the alert is about (the new one for `resumed`).
    pub epoch: u64,
    /// At most one alert per dedup key is enqueued (per rate-limit interval for soft-limit
    /// warnings): `kill_engaged:<epoch>`, `resumed:<epoch>`, `soft_limit_warning:<scope>`.
    pub dedup_key: String,
    /// The human-readable message; Telegram sends exactly this.
    pub text: String,
    /// Structured context for machines (who, why, counters).
    pub details: serde_json::Value,
    /// When the alert was raised, Unix milliseconds.
    pub created_at_ms: u64,
}

/// Longest `text` kept; Telegram refuses messages over 4096 characters.
pub const MAX_TEXT_CHARS: usize = 4000;

impl Alert {
    /// An alert of `kind` with a fresh id and the current time. `text` and `details` are
    /// redacted ([`telemetry::redact`]: a reason may quote a credential), before anything
    /// is stored or sent, and `text` is then cut to [`MAX_TEXT_CHARS`].
    pub fn new(
        kind: AlertKind,
        epoch: u64,
        dedup_key: impl Into<String>,
        text: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        let mut text: String = text.into();
        telemetry::redact_string(&mut text);
        let mut details = details;
        telemetry::redact_json(&mut details);
        if let Some((cut, _)) = text.char_indices().nth(MAX_TEXT_CHARS) {
            text.truncate(cut);
        }
        Self { id: Uuid::now_v7(), kind, epoch, dedup_key: dedup_key.into(), text, details, created_at_ms: now_ms() }
    }

    /// The kill switch was engaged at `epoch` by `by` (`budget`, an operator's name) because
    /// of `reason`. Sent once per epoch.
    pub fn kill_engaged(epoch: u64, by: &str, reason: &str, details: serde_json::Value) -> Self {
        Self::new(
            AlertKind::KillEngaged,
            epoch,
            format!("{}:{epoch}", AlertKind::KillEngaged),
            format!(
                "agentfleet: KILL SWITCH ENGAGED (epoch {epoch}) by {by}: {reason}. All roles paused, merges frozen; resuming needs an operator."
            ),
            details,
        )
    }

    /// The fleet resumed under `epoch` on `by`'s command. Sent once per epoch.
    pub fn resumed(epoch: u64, by: &str, details: serde_json::Value) -> Self {
        Self::new(
            AlertKind::Resumed,
            epoch,
            format!("{}:{epoch}", AlertKind::Resumed),
            format!("agentfleet: resumed (epoch {epoch}) by {by}. Open tasks are re-issued under the new epoch."),
            details,
        )
    }

    /// A soft limit of `scope` (a role such as `dev`, or `daily`) was reached: `message` says
    /// which and by how much. At most one per scope per [`AlertsConfig::soft_limit_every`].
    pub fn soft_limit_warning(epoch: u64, scope: &str, message: &str, details: serde_json::Value) -> Self {
        Self::new(
            AlertKind::SoftLimitWarning,
            epoch,
            format!("{}:{scope}", AlertKind::SoftLimitWarning),
            format!("agentfleet: soft limit reached for {scope}: {message}"),
            details,
        )
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
    Pool(#[from] deadpool_redis::PoolError),
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

    #[test]
    fn dedup_keys_follow_kind_and_epoch_or_scope() {
        let kill = Alert::kill_engaged(7, "budget", "daily budget exceeded", serde_json::json!({}));
        assert_eq!(kill.dedup_key, "kill_engaged:7");
        assert_eq!(kill.id.get_version_num(), 7);
        assert!(kill.text.contains("epoch 7") && kill.text.contains("daily budget exceeded"));
        assert_eq!(Alert::resumed(8, "alice", serde_json::json!({})).dedup_key, "resumed:8");
        assert_eq!(
            Alert::soft_limit_warning(8, "dev", "90%", serde_json::json!({})).dedup_key,
            "soft_limit_warning:dev"
        );
        assert_eq!(names::dedup_key("kill_engaged:7"), "fleet:alerts:dedup:kill_engaged:7");
    }

    #[test]
    fn serialises_kinds_in_snake_case_and_round_trips() {
        let alert = Alert::soft_limit_warning(3, "daily", "80% of tokens", serde_json::json!({"used": 80}));
        let json = serde_json::to_value(&alert).unwrap();
        assert_eq!(json["kind"], "soft_limit_warning");
        assert_eq!(json["epoch"], 3);
        let back: Alert = serde_json::from_value(json).unwrap();
        assert_eq!(back, alert);
    }

    #[test]
    fn cuts_long_texts_on_a_char_boundary() {
        let alert = Alert::new(AlertKind::Resumed, 1, "k", "é".repeat(MAX_TEXT_CHARS + 10), serde_json::Value::Null);
        assert_eq!(alert.text.chars().count(), MAX_TEXT_CHARS);
    }
}
