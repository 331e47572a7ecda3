//! One delivery attempt over one channel, classified as delivered or failed (with the
//! channel's own retry hint).
//!
//! No error or log line made here contains a token, a chat id or a webhook URL: the Telegram
//! URL embeds the bot token, and reqwest's errors print the URL, so every reqwest error is
//! stripped with `without_url` before it is turned into text.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::standard_webhooks::{self, WebhookSecret};
use super::{Alert, AlertError, AlertsConfig, TelegramConfig, WebhookConfig, names};

/// Longest piece of a channel's answer kept in a failure reason.
const MAX_REASON_CHARS: usize = 300;

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The channel confirmed the alert; it may be acknowledged.
    Delivered,
    /// Not delivered; try again.
    Failed {
        /// The channel's own hint (Telegram's `parameters.retry_after`, a `Retry-After`
        /// header in seconds); the dispatcher's backoff applies when absent.
        retry_after: Option<Duration>,
        /// What went wrong, for the log. Never contains a secret.
        reason: String,
    },
}

/// A configured alert channel.
pub enum Channel {
    /// Telegram Bot API `sendMessage`.
    Telegram(Telegram),
    /// A JSON webhook signed per Standard Webhooks.
    Webhook(Webhook),
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({})", self.name())
    }
}

impl Channel {
    /// The channel's name, which is also its consumer group in the outbox stream.
    pub fn name(&self) -> &'static str {
        match self {
            Channel::Telegram(_) => names::TELEGRAM_GROUP,
            Channel::Webhook(_) => names::WEBHOOK_GROUP,
        }
    }

    /// The channels `cfg` configures, in a fixed order (Telegram, then the webhook).
    pub fn from_config(cfg: &AlertsConfig) -> Result<Vec<Channel>, AlertError> {
        let mut channels = Vec::new();
        if let Some(telegram) = &cfg.telegram {
            channels.push(Channel::Telegram(Telegram::new(telegram, cfg.request_timeout)?));
        }
        if let Some(webhook) = &cfg.webhook {
            channels.push(Channel::Webhook(Webhook::new(webhook, cfg.request_timeout)?));
        }
        Ok(channels)
    }

    /// Sends `alert` once.
    pub async fn attempt(&self, alert: &Alert) -> Attempt {
        match self {
            Channel::Telegram(t) => t.attempt(alert).await,
            Channel::Webhook(w) => w.attempt(alert).await,
        }
    }
}

fn http_client(timeout: Duration) -> Result<reqwest::Client, AlertError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        // A redirect would re-send a signed body (or a token-bearing request) somewhere the
        // operator did not configure.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| AlertError::Config { setting: "http", problem: describe(e) })
}

fn parse_http_url(setting: &'static str, text: &str) -> Result<reqwest::Url, AlertError> {
    // The parse error says what is wrong, never which value was given.
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| AlertError::Config { setting, problem: format!("not a URL ({e})") })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(AlertError::Config { setting, problem: "must be an http or https URL".to_owned() });
    }
    Ok(url)
}

/// A reqwest error as text, with its causes, and without the URL (which may carry a token).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = if e.is_timeout() { format!("{e} (timed out)") } else { e.to_string() };
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn cut(text: &str) -> String {
    text.chars().take(MAX_REASON_CHARS).collect()
}

/// Telegram Bot API `sendMessage`.
pub struct Telegram {
    /// Shared HTTP client.
    client: reqwest::Client,
    /// `{base}/bot{token}/sendMessage`: secret, because of the token.
    send_url: SecretString,
    /// The target chat, as Telegram wants it: a number when the id is numeric.
    chat_id: SecretString,
}

impl fmt::Debug for Telegram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Telegram(**REDACTED**)")
    }
}

/// `sendMessage`'s request body.
#[derive(Serialize)]
struct SendMessage<'a> {
    chat_id: ChatId<'a>,
    text: &'a str,
    /// `HTML`; absent for the plain-text fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    parse_mode: Option<&'static str>,
    /// No link previews: an alert is read, not browsed.
    link_preview_options: LinkPreview,
}

#[derive(Serialize)]
struct LinkPreview {
    is_disabled: bool,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChatId<'a> {
    Number(i64),
    Name(&'a str),
}

/// The fields of a Bot API answer that matter here.
#[derive(Deserialize)]
struct BotAnswer {
    ok: bool,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<BotParameters>,
}

#[derive(Deserialize)]
struct BotParameters {
    #[serde(default)]
    retry_after: Option<u64>,
    #[serde(default)]
    migrate_to_chat_id: Option<i64>,
}

impl Telegram {
    /// Checks the settings (without ever echoing them) and prepares the client.
    pub fn new(cfg: &TelegramConfig, timeout: Duration) -> Result<Self, AlertError> {
        let base = parse_http_url("telegram.base_url", &cfg.base_url)?;
        let token = cfg.bot_token.expose_secret().trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '%')) {
            return Err(AlertError::Config {
                setting: "telegram.bot_token",
                problem: "empty, or contains characters a bot token cannot have".to_owned(),
            });
        }
        let chat_id = cfg.chat_id.expose_secret().trim();
        if chat_id.is_empty() {
            return Err(AlertError::Config { setting: "telegram.chat_id", problem: "empty".to_owned() });
        }
        let send_url = format!("{}/bot{token}/sendMessage", base.as_str().trim_end_matches('/'));
        Ok(Self {
            client: http_client(timeout)?,
            send_url: send_url.into(),
            chat_id: SecretString::from(chat_id.to_owned()),
        })
    }

    /// Sends the alert as HTML, rendered now (so its age is current). Should Telegram refuse
    /// the markup (`can't parse entities`: a renderer bug, never a value, since every value is
    /// escaped), the same attempt sends the plain text instead, rather than blocking the
    /// channel on an alert that can never pass.
    async fn attempt(&self, alert: &Alert) -> Attempt {
        let html = super::render::telegram_html(alert, super::now_ms());
        match self.send(&html, Some("HTML")).await {
            Attempt::Failed { reason, .. } if reason.contains("can't parse entities") => {
                tracing::warn!(alert_id = %alert.id, error = %reason, "Telegram refused the alert's markup; sending it as plain text.");
                let plain: String = alert.text.chars().take(super::MAX_TEXT_CHARS).collect();
                self.send(&plain, None).await
            }
            other => other,
        }
    }

    async fn send(&self, text: &str, parse_mode: Option<&'static str>) -> Attempt {
        let chat = self.chat_id.expose_secret();
        let chat_id = chat.parse::<i64>().map_or(ChatId::Name(chat), ChatId::Number);
        let body = SendMessage { chat_id, text, parse_mode, link_preview_options: LinkPreview { is_disabled: true } };
        let request = self.client.post(self.send_url.expose_secret()).json(&body);
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Failed { retry_after: None, reason: describe(e) },
        };
        let status = response.status().as_u16();
        match response.bytes().await {
            Ok(body) => classify_telegram(status, &body),
            Err(e) => Attempt::Failed {
                retry_after: None,
                reason: format!("HTTP {status}, body unreadable: {}", describe(e)),
            },
        }
    }
}

/// Delivered only on a 2xx answer whose JSON says `"ok": true`.
fn classify_telegram(status: u16, body: &[u8]) -> Attempt {
    let answer = serde_json::from_slice::<BotAnswer>(body).ok();
    if (200..300).contains(&status) && answer.as_ref().is_some_and(|a| a.ok) {
        return Attempt::Delivered;
    }
    let Some(answer) = answer else {
        return Attempt::Failed { retry_after: None, reason: format!("HTTP {status}, not a Bot API answer") };
    };
    let parameters = answer.parameters.as_ref();
    let retry_after = parameters.and_then(|p| p.retry_after).map(Duration::from_secs);
    let mut reason = format!("HTTP {status}: {}", cut(answer.description.as_deref().unwrap_or("ok: false")));
    if parameters.and_then(|p| p.migrate_to_chat_id).is_some() {
        // Telegram tells us the new id; it goes into the configuration, not into the log.
        reason.push_str(" (the group became a supergroup: update alerts.telegram.chat_id)");
    }
    Attempt::Failed { retry_after, reason }
}

/// A JSON webhook signed per Standard Webhooks.
pub struct Webhook {
    /// Shared HTTP client.
    client: reqwest::Client,
    /// Where to post; never logged.
    url: reqwest::Url,
    /// The signing key.
    secret: WebhookSecret,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Webhook(**REDACTED**)")
    }
}

/// The webhook's body, in the shape the Standard Webhooks spec recommends.
#[derive(Debug, Serialize)]
pub struct WebhookPayload<'a> {
    /// `alert.<kind>`, e.g. `alert.kill_engaged`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the alert was raised, RFC 3339 with milliseconds.
    pub timestamp: String,
    /// The alert itself.
    pub data: &'a Alert,
}

impl<'a> WebhookPayload<'a> {
    /// The payload of `alert`. Deterministic, so every attempt sends the same bytes.
    pub fn new(alert: &'a Alert) -> Self {
        let timestamp = chrono::DateTime::from_timestamp_millis(alert.created_at_ms as i64)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        Self { event_type: format!("alert.{}", alert.kind), timestamp, data: alert }
    }
}

impl Webhook {
    /// Checks the URL and the secret (without ever echoing them) and prepares the client.
    pub fn new(cfg: &WebhookConfig, timeout: Duration) -> Result<Self, AlertError> {
        let url = parse_http_url("webhook.url", cfg.url.expose_secret())?;
        let secret = WebhookSecret::parse(cfg.secret.expose_secret())
            .map_err(|e| AlertError::Config { setting: "webhook.secret", problem: e.to_string() })?;
        Ok(Self { client: http_client(timeout)?, url, secret })
    }

    async fn attempt(&self, alert: &Alert) -> Attempt {
        let body = match serde_json::to_vec(&WebhookPayload::new(alert)) {
            Ok(b) => b,
            Err(e) => return Attempt::Failed { retry_after: None, reason: format!("cannot encode the payload: {e}") },
        };
        let id = alert.id.to_string();
        let timestamp = (super::now_ms() / 1000) as i64;
        let signature = standard_webhooks::sign(&self.secret, &id, timestamp, &body);
        let request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(standard_webhooks::HEADER_ID, id)
            .header(standard_webhooks::HEADER_TIMESTAMP, timestamp.to_string())
            .header(standard_webhooks::HEADER_SIGNATURE, signature)
            .body(body);
        match request.send().await {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                classify_webhook(response.status().as_u16(), retry_after.as_deref())
            }
            Err(e) => Attempt::Failed { retry_after: None, reason: describe(e) },
        }
    }
}

/// Delivered on any 2xx; otherwise failed, with `Retry-After` (delay in seconds) as the hint.
fn classify_webhook(status: u16, retry_after: Option<&str>) -> Attempt {
    if (200..300).contains(&status) {
        return Attempt::Delivered;
    }
    let retry_after = retry_after.and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
    Attempt::Failed { retry_after, reason: format!("HTTP {status}") }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn telegram_needs_2xx_and_ok_true() {
        assert_eq!(classify_telegram(200, br#"{"ok":true,"result":{}}"#), Attempt::Delivered);
        let Attempt::Failed { retry_after: None, reason } =
            classify_telegram(200, br#"{"ok":false,"description":"nope"}"#)
        else {
            panic!("ok:false must fail")
        };
        assert!(reason.contains("nope"));
        assert!(matches!(classify_telegram(200, b"<html>"), Attempt::Failed { retry_after: None, .. }));
        assert!(matches!(classify_telegram(502, b""), Attempt::Failed { retry_after: None, .. }));
    }

    #[test]
    fn telegram_429_carries_retry_after() {
        let body = br#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 3","parameters":{"retry_after":3}}"#;
        let Attempt::Failed { retry_after, reason } = classify_telegram(429, body) else { panic!("429 must fail") };
        assert_eq!(retry_after, Some(Duration::from_secs(3)));
        assert!(reason.starts_with("HTTP 429: Too Many Requests"));
    }

    #[test]
    fn telegram_migration_is_reported_without_the_new_id() {
        let body = br#"{"ok":false,"error_code":400,"description":"Bad Request: group chat was upgraded to a supergroup chat","parameters":{"migrate_to_chat_id":-1009876543210}}"#;
        let Attempt::Failed { reason, .. } = classify_telegram(400, body) else { panic!("must fail") };
        assert!(reason.contains("update alerts.telegram.chat_id") && !reason.contains("9876543210"), "{reason}");
    }

    #[test]
    fn webhook_needs_2xx_and_reads_retry_after_seconds() {
        assert_eq!(classify_webhook(204, None), Attempt::Delivered);
        assert_eq!(
            classify_webhook(503, Some("7")),
            Attempt::Failed { retry_after: Some(Duration::from_secs(7)), reason: "HTTP 503".into() }
        );
        assert_eq!(
            classify_webhook(429, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Attempt::Failed { retry_after: None, reason: "HTTP 429".into() }
        );
        assert!(matches!(classify_webhook(301, None), Attempt::Failed { .. }));
    }

    #[test]
    fn webhook_payload_has_type_timestamp_and_data() {
        let cause = super::super::Cause::automatic("consecutive_failures", "budget-0", "3 consecutive failures");
        let mut alert = Alert::kill_engaged("prod", 4, cause, 1_700_000_000_000, serde_json::json!({"n": 3}));
        alert.created_at_ms = 1_700_000_000_123;
        let json = serde_json::to_value(WebhookPayload::new(&alert)).unwrap();
        assert_eq!(json["type"], "alert.kill_engaged");
        assert_eq!(json["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["data"]["id"], alert.id.to_string());
        assert_eq!(json["data"]["details"]["n"], 3);
        assert_eq!(json["data"]["deployment"], "prod");
        assert_eq!(json["data"]["occurred_at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["data"]["cause"]["trigger"], "consecutive_failures");
        assert_eq!(json["data"]["affected"]["merges_frozen"], "all");
        assert_eq!(json["data"]["actions"][0]["command"], "fleetctl resume");
    }

    #[test]
    fn settings_errors_never_echo_values() {
        let timeout = Duration::from_secs(1);
        let bad_token = TelegramConfig::new("12/34 secret-token".to_owned().into(), "1".to_owned().into());
        let e = Telegram::new(&bad_token, timeout).unwrap_err().to_string();
        assert!(e.starts_with("alerts.telegram.bot_token") && !e.contains("secret-token"), "{e}");
        let bad_url = WebhookConfig {
            url: "ftp://user:hunter2@example.com".to_owned().into(),
            secret: "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_owned().into(),
        };
        let e = Webhook::new(&bad_url, timeout).unwrap_err().to_string();
        assert!(e.starts_with("alerts.webhook.url") && !e.contains("hunter2"), "{e}");
        let bad_secret = WebhookConfig {
            url: "https://example.com/hook".to_owned().into(),
            secret: "whsec_dG9vLXNob3J0".to_owned().into(),
        };
        let e = Webhook::new(&bad_secret, timeout).unwrap_err().to_string();
        assert!(e.starts_with("alerts.webhook.secret") && !e.contains("dG9vLXNob3J0"), "{e}");
    }
}
