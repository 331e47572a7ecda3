//! Where alerts go and how hard the dispatcher tries: [`AlertsConfig`].
//!
//! ```toml
//! [alerts]
//! soft_limit_every_secs = 86400      # at most one soft-limit warning per scope per day
//!
//! [alerts.telegram]
//! # base_url = "https://api.telegram.org"
//! bot_token = "123456:ABC…"         # secret: prefer FLEET_… environment overrides
//! chat_id = "-1001234567890"        # secret
//!
//! [alerts.webhook]
//! url = "https://hooks.example.com/agentfleet"   # secret: such URLs often embed a token
//! secret = "whsec_…"                              # secret
//! ```
//!
//! Every secret is a [`SecretString`]: `Debug` prints `[REDACTED]`, and nothing here or in
//! the dispatcher ever logs it or puts it into an error.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// The public Bot API endpoint.
pub const DEFAULT_TELEGRAM_BASE_URL: &str = "https://api.telegram.org";

/// Alert channels, deduplication and delivery tunables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The Telegram channel; none when absent.
    pub telegram: Option<TelegramConfig>,
    /// The signed-webhook channel; none when absent.
    pub webhook: Option<WebhookConfig>,
    /// A soft-limit warning for one scope (a role, or the daily total) is sent at most once
    /// per this interval; later ones within it are dropped at enqueue time.
    #[serde(rename = "soft_limit_every_secs", with = "secs")]
    pub soft_limit_every: Duration,
    /// How long the "already sent for this epoch" marker of a kill or resume alert is kept.
    /// Longer than any plausible re-trigger of the same epoch; bounded so markers do not
    /// pile up forever.
    #[serde(rename = "epoch_dedup_ttl_secs", with = "secs")]
    pub epoch_dedup_ttl: Duration,
    /// Approximate `MAXLEN` of the `fleet:alerts` stream. Old, delivered alerts fall off;
    /// keep it far above the number of alerts a channel could be behind.
    pub stream_max_len: u64,
    /// This process's consumer name in each channel's group. Stable across restarts, so a
    /// restarted `budget` finds the alerts it had not delivered yet.
    pub consumer: String,
    /// When a channel's group is created (first start, or a channel added later), alerts
    /// younger than this are delivered to it; older ones are history.
    #[serde(rename = "backfill_secs", with = "secs")]
    pub backfill: Duration,
    /// How long one `XREADGROUP` waits for a new alert. The Redis pool's response timeout
    /// must exceed it (see `bus::pool`).
    #[serde(rename = "block_ms", with = "millis")]
    pub block: Duration,
    /// First delay after a failed delivery; doubles up to `retry_max`, and jitter adds up to
    /// as much again to each delay.
    #[serde(rename = "retry_min_ms", with = "millis")]
    pub retry_min: Duration,
    /// Longest delay between two attempts at one alert (unless the channel asks for more).
    #[serde(rename = "retry_max_ms", with = "millis")]
    pub retry_max: Duration,
    /// Cap on a channel's own `retry_after`/`Retry-After`, so a confused endpoint cannot
    /// park alerts for days.
    #[serde(rename = "retry_after_max_secs", with = "secs")]
    pub retry_after_max: Duration,
    /// Timeout of one HTTP request, connection included.
    #[serde(rename = "request_timeout_ms", with = "millis")]
    pub request_timeout: Duration,
    /// On shutdown, how long a request in flight may take to finish (so a delivered alert
    /// is acknowledged rather than sent again after the restart).
    #[serde(rename = "shutdown_grace_ms", with = "millis")]
    pub shutdown_grace: Duration,
    /// From this many failed attempts at one alert on, failures are logged at ERROR: an
    /// operator must look at the channel.
    pub error_after_attempts: u32,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            telegram: None,
            webhook: None,
            soft_limit_every: Duration::from_secs(24 * 3600),
            epoch_dedup_ttl: Duration::from_secs(90 * 24 * 3600),
            stream_max_len: 10_000,
            consumer: "budget".to_owned(),
            backfill: Duration::from_secs(24 * 3600),
            block: Duration::from_secs(1),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            retry_after_max: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            error_after_attempts: 5,
        }
    }
}

/// Telegram Bot API `sendMessage`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    /// Bot API base URL, without the `/bot<token>` part; a local server in tests.
    #[serde(default = "default_telegram_base_url")]
    pub base_url: String,
    /// The bot's token (`123456:ABC…`). It is part of the request path, so the URL is never
    /// logged either.
    pub bot_token: SecretString,
    /// Target chat: a numeric id (groups and channels are negative) or `@channelname`.
    pub chat_id: SecretString,
}

impl TelegramConfig {
    /// The public Bot API with `bot_token` and `chat_id`.
    pub fn new(bot_token: SecretString, chat_id: SecretString) -> Self {
        Self { base_url: default_telegram_base_url(), bot_token, chat_id }
    }
}

/// A generic JSON webhook signed per Standard Webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to `POST`. Secret: chat-tool webhook URLs carry their credential in the path.
    pub url: SecretString,
    /// The endpoint's signing secret, `whsec_<base64>`.
    pub secret: SecretString,
}

fn default_telegram_base_url() -> String {
    DEFAULT_TELEGRAM_BASE_URL.to_owned()
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn reads_a_file_section_and_keeps_defaults() {
        let cfg: AlertsConfig = toml::from_str(
            r#"
            soft_limit_every_secs = 3600
            retry_min_ms = 250
            [telegram]
            bot_token = "123:abc"
            chat_id = "-100"
            [webhook]
            url = "https://hooks.example.com/x"
            secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.soft_limit_every, Duration::from_secs(3600));
        assert_eq!(cfg.retry_min, Duration::from_millis(250));
        assert_eq!(cfg.retry_max, AlertsConfig::default().retry_max);
        let telegram = cfg.telegram.as_ref().unwrap();
        assert_eq!(telegram.base_url, DEFAULT_TELEGRAM_BASE_URL);
        assert_eq!(telegram.bot_token.expose_secret(), "123:abc");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("123:abc") && !shown.contains("whsec_") && !shown.contains("hooks.example"), "{shown}");
    }

    #[test]
    fn refuses_unknown_settings() {
        let e = toml::from_str::<AlertsConfig>("[telegram]\nbot_token = \"t\"\nchat_id = \"1\"\ntoken = \"x\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
