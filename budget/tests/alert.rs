//! Alerts end to end: a real `redis-server` (the outbox), and local Telegram and webhook
//! receivers on `127.0.0.1:0` that check every request (path with the bot token, chat id
//! and text; Standard Webhooks signature) and can be told to fail, rate-limit, answer
//! slowly or not listen at all.
//!
//! Time is real (the dispatcher talks to real sockets), but the retry delays are tens of
//! milliseconds, so every test takes about a second or two.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use budget::alert::render::{escape, utc};
use budget::alert::standard_webhooks::{self, WebhookSecret};
use budget::alert::{
    Alert, AlertDispatcher, AlertSender, AlertsConfig, Cause, Enqueued, Incident, KillRef, Scope, Severity,
    TelegramConfig, WebhookConfig, names,
};
use fleet_testkit::RedisServer;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BOT_TOKEN: &str = "123456789:AAE-test-token-do-not-log";
const CHAT_ID: i64 = -1_001_234_567_890;
const WEBHOOK_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
/// Part of the webhook's path, standing for the credential chat tools put in their URLs.
const WEBHOOK_PATH: &str = "/hooks/agentfleet-path-secret";
const WAIT: Duration = Duration::from_secs(20);
const DEPLOYMENT: &str = "prod-eu";

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis() as u64
}

/// `by` is `budget` (automatic) or an operator's name, possibly `operator alice`.
fn cause(by: &str, reason: &str) -> Cause {
    match by {
        "budget" => Cause::automatic("daily_budget", "budget-0", reason),
        name => Cause::operator(Some(name.trim_start_matches("operator ")), "orchestrator-0", reason),
    }
}

fn kill_alert(epoch: u64, by: &str, reason: &str, details: Value) -> Alert {
    Alert::kill_engaged(DEPLOYMENT, epoch, cause(by, reason), now_ms(), details)
}

fn resumed_alert(epoch: u64, by: &str, details: Value) -> Alert {
    Alert::resumed(DEPLOYMENT, epoch, cause(by, ""), now_ms(), None, details)
}

fn warn_alert(epoch: u64, scope: &str, message: &str, details: Value) -> Alert {
    Alert::soft_limit_warning(DEPLOYMENT, epoch, scope, Cause::automatic("soft_limit", "budget-0", message), details)
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

fn start_redis() -> RedisServer {
    // No Redis, no test: the harness reports a missing redis-server as an error.
    RedisServer::start().expect("the alert tests need a real redis-server")
}

fn pool(redis: &RedisServer) -> bus::RedisPool {
    bus::pool(SecretString::from(redis.url()), 8, Duration::from_secs(2)).unwrap()
}

async fn xlen(pool: &bus::RedisPool) -> i64 {
    let mut c = pool.get().await.unwrap();
    redis::cmd("XLEN").arg(names::STREAM).query_async(&mut c).await.unwrap()
}

/// How many entries `group` has read but not acknowledged.
async fn pending(pool: &bus::RedisPool, group: &str) -> i64 {
    let mut c = pool.get().await.unwrap();
    let reply: redis::Value = redis::cmd("XPENDING").arg(names::STREAM).arg(group).query_async(&mut c).await.unwrap();
    match reply {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("unexpected XPENDING summary {other:?}"),
        },
        other => panic!("unexpected XPENDING reply {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------------

/// What a receiver answers to the first `fail_first` well-formed requests.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// 503.
    Unavailable,
    /// 429 with Telegram's `parameters.retry_after` (and `Retry-After` for the webhook).
    TooManyRequests { retry_after_secs: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Behaviour {
    fail_first: usize,
    failure: Failure,
    /// How long to wait after accepting before answering: a crash of the sender in this
    /// window leaves an alert delivered but not acknowledged.
    respond_delay: Duration,
    /// Telegram only: answer every HTML message as Telegram answers markup it cannot parse
    /// (400, `can't parse entities`), and accept plain text (no `parse_mode`).
    refuse_html: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self { fail_first: 0, failure: Failure::Unavailable, respond_delay: Duration::ZERO, refuse_html: false }
    }
}

#[derive(Debug, Default)]
struct Seen {
    /// Arrival time of every well-formed request (accepted or answered with a failure).
    arrivals: Vec<Instant>,
    /// Requests that failed the receiver's checks, with what was wrong.
    problems: Vec<String>,
    /// Accepted requests' JSON bodies, repeats included.
    accepted: Vec<Value>,
    /// Webhook ids accepted, each once (the receiver dedupes by `webhook-id`).
    ids: Vec<String>,
    /// Accepted requests whose `webhook-id` had been accepted before.
    duplicates: usize,
}

#[derive(Debug, Default)]
struct Shared {
    seen: Mutex<Seen>,
    behaviour: Mutex<Behaviour>,
}

#[derive(Clone)]
struct Receiver {
    base_url: String,
    shared: Arc<Shared>,
}

impl Receiver {
    fn set(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().unwrap() = behaviour;
    }

    fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.shared.seen.lock().unwrap())
    }

    fn arrivals(&self) -> usize {
        self.with(|s| s.arrivals.len())
    }

    fn accepted(&self) -> Vec<Value> {
        self.with(|s| s.accepted.clone())
    }

    fn ids(&self) -> Vec<String> {
        self.with(|s| s.ids.clone())
    }

    fn problems(&self) -> Vec<String> {
        self.with(|s| s.problems.clone())
    }

    fn assert_no_problems(&self) {
        let problems = self.problems();
        assert!(problems.is_empty(), "the receiver refused requests: {problems:?}");
    }

    fn telegram_config(&self) -> TelegramConfig {
        TelegramConfig {
            base_url: self.base_url.clone(),
            bot_token: SecretString::from(BOT_TOKEN),
            chat_id: SecretString::from(CHAT_ID.to_string()),
        }
    }

    fn webhook_config(&self) -> WebhookConfig {
        WebhookConfig {
            url: SecretString::from(format!("{}{WEBHOOK_PATH}", self.base_url)),
            secret: SecretString::from(WEBHOOK_SECRET),
        }
    }
}

/// What Telegram checks of an HTML message, for the markup this crate writes: 1 to 4,096
/// characters (counted here in UTF-16 units, markup included, which is stricter), only the
/// tags `b` and `code`, properly nested, and `&` only as `&lt;`, `&gt;`, `&amp;`, `&quot;`.
fn check_telegram_html(text: &str) -> Result<(), String> {
    let units = text.encode_utf16().count();
    if units == 0 || units > 4096 {
        return Err(format!("{units} UTF-16 units"));
    }
    let mut open: Vec<&str> = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(['<', '>', '&']) {
        let at = &rest[i..];
        if at.starts_with('>') {
            return Err(format!("a bare > at {:?}", &at[..at.len().min(20)]));
        }
        if at.starts_with('&') {
            let Some(entity) = ["&lt;", "&gt;", "&amp;", "&quot;"].into_iter().find(|e| at.starts_with(e)) else {
                return Err(format!("a bare & at {:?}", &at[..at.len().min(20)]));
            };
            rest = &at[entity.len()..];
            continue;
        }
        let end = at.find('>').ok_or("an unclosed <")?;
        let tag = &at[1..end];
        match tag {
            "b" | "code" => open.push(tag),
            "/b" | "/code" => {
                if open.pop() != Some(&tag[1..]) {
                    return Err(format!("</{}> closes nothing", &tag[1..]));
                }
            }
            other => return Err(format!("unsupported tag <{other}>")),
        }
        rest = &at[end + 1..];
    }
    if !open.is_empty() {
        return Err(format!("unclosed {open:?}"));
    }
    Ok(())
}

/// Records a well-formed request and decides the answer: `Err(failure)` for the first
/// `fail_first`, else `Ok(respond_delay)`.
fn admit(shared: &Shared) -> Result<Duration, Failure> {
    let behaviour = *shared.behaviour.lock().unwrap();
    let mut seen = shared.seen.lock().unwrap();
    seen.arrivals.push(Instant::now());
    if seen.arrivals.len() <= behaviour.fail_first { Err(behaviour.failure) } else { Ok(behaviour.respond_delay) }
}

fn problem(shared: &Shared, what: String) {
    shared.seen.lock().unwrap().problems.push(what);
}

async fn telegram_handler(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bad = |what: String| {
        problem(&shared, what.clone());
        let answer = json!({"ok": false, "error_code": 400, "description": format!("Bad Request: {what}")});
        (StatusCode::BAD_REQUEST, axum::Json(answer)).into_response()
    };
    if method != Method::POST {
        return bad(format!("method {method}"));
    }
    if uri.path() != format!("/bot{BOT_TOKEN}/sendMessage") {
        return bad(format!("path {}", uri.path()));
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/json") {
        return bad(format!("content-type {content_type:?}"));
    }
    let Ok(message) = serde_json::from_slice::<Value>(&body) else { return bad("body is not JSON".into()) };
    if message["chat_id"] != json!(CHAT_ID) {
        return bad(format!("chat_id {}", message["chat_id"]));
    }
    let refuse_html = shared.behaviour.lock().unwrap().refuse_html;
    if refuse_html && message["parse_mode"] == "HTML" {
        shared.seen.lock().unwrap().arrivals.push(Instant::now());
        let description = "Bad Request: can't parse entities: unsupported start tag \"x\" at byte offset 0";
        let answer = json!({"ok": false, "error_code": 400, "description": description});
        return (StatusCode::BAD_REQUEST, axum::Json(answer)).into_response();
    }
    if refuse_html && message.get("parse_mode").is_none() && message["text"].as_str().is_some_and(|t| !t.is_empty()) {
        // The plain-text fallback: accepted as it is.
    } else if message["parse_mode"] != "HTML" || message["link_preview_options"] != json!({"is_disabled": true}) {
        return bad(format!(
            "parse_mode {} / link_preview_options {}",
            message["parse_mode"], message["link_preview_options"]
        ));
    }
    if !refuse_html
        && let Err(e) = message["text"].as_str().ok_or_else(|| "no text".to_owned()).and_then(check_telegram_html)
    {
        return bad(format!("can't parse entities: {e}"));
    }
    match admit(&shared) {
        Err(Failure::Unavailable) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Err(Failure::TooManyRequests { retry_after_secs }) => {
            let answer = json!({
                "ok": false,
                "error_code": 429,
                "description": format!("Too Many Requests: retry after {retry_after_secs}"),
                "parameters": {"retry_after": retry_after_secs},
            });
            (StatusCode::TOO_MANY_REQUESTS, axum::Json(answer)).into_response()
        }
        Ok(delay) => {
            let message_id = {
                let mut seen = shared.seen.lock().unwrap();
                seen.accepted.push(message);
                seen.accepted.len()
            };
            tokio::time::sleep(delay).await;
            axum::Json(json!({"ok": true, "result": {"message_id": message_id}})).into_response()
        }
    }
}

async fn webhook_handler(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let refuse = |what: String| {
        problem(&shared, what);
        StatusCode::UNAUTHORIZED.into_response()
    };
    if uri.path() != WEBHOOK_PATH {
        return refuse(format!("path {}", uri.path()));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (Some(id), Some(timestamp), Some(signature)) = (
        header(standard_webhooks::HEADER_ID),
        header(standard_webhooks::HEADER_TIMESTAMP),
        header(standard_webhooks::HEADER_SIGNATURE),
    ) else {
        return refuse("missing webhook-* headers".into());
    };
    let secret = WebhookSecret::parse(WEBHOOK_SECRET).unwrap();
    let now = chrono::Utc::now().timestamp();
    if let Err(e) = standard_webhooks::verify(&secret, &id, &timestamp, &signature, &body, now) {
        return refuse(format!("signature: {e}"));
    }
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else { return refuse("body is not JSON".into()) };
    if payload["data"]["id"] != json!(id) {
        return refuse(format!("webhook-id {id} is not the alert id {}", payload["data"]["id"]));
    }
    if payload["type"].as_str() != Some(&format!("alert.{}", payload["data"]["kind"].as_str().unwrap_or("?"))) {
        return refuse(format!("type {}", payload["type"]));
    }
    match admit(&shared) {
        Err(Failure::Unavailable) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Err(Failure::TooManyRequests { retry_after_secs }) => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", retry_after_secs.to_string())]).into_response()
        }
        Ok(delay) => {
            {
                let mut seen = shared.seen.lock().unwrap();
                if seen.ids.contains(&id) {
                    seen.duplicates += 1;
                } else {
                    seen.ids.push(id);
                }
                seen.accepted.push(payload);
            }
            tokio::time::sleep(delay).await;
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, router: Router) {
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
}

/// A Telegram Bot API stand-in on `listener`.
async fn telegram_on(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> Receiver {
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    serve(listener, Router::new().fallback(telegram_handler).with_state(Arc::clone(&shared))).await;
    Receiver { base_url, shared }
}

async fn telegram_receiver() -> Receiver {
    telegram_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), Arc::default()).await
}

async fn webhook_receiver() -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let shared: Arc<Shared> = Arc::default();
    serve(listener, Router::new().fallback(webhook_handler).with_state(Arc::clone(&shared))).await;
    Receiver { base_url, shared }
}

/// A loopback port nobody listens on (yet).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------
// Dispatcher
// ---------------------------------------------------------------------------------------

fn config(telegram: Option<&Receiver>, webhook: Option<&Receiver>) -> AlertsConfig {
    AlertsConfig {
        telegram: telegram.map(Receiver::telegram_config),
        webhook: webhook.map(Receiver::webhook_config),
        block: Duration::from_millis(100),
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_millis(500),
        ..AlertsConfig::default()
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<budget::alert::dispatcher::DispatchStats>,
}

impl Running {
    fn start(pool: &bus::RedisPool, cfg: &AlertsConfig) -> Self {
        let dispatcher = AlertDispatcher::new(pool.clone(), cfg).unwrap();
        let stats = dispatcher.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(dispatcher.run(shutdown.clone()));
        Self { shutdown, task, stats }
    }

    /// A clean stop: must return promptly, because every wait races the shutdown.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("the dispatcher stops promptly").unwrap();
    }

    /// A crash: the task is dropped wherever it is.
    async fn crash(self) {
        self.task.abort();
        assert!(self.task.await.unwrap_err().is_cancelled());
    }

    fn failed_attempts(&self) -> u64 {
        self.stats.failed_attempts.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn eventually_acked(pool: &bus::RedisPool, group: &str) {
    let deadline = Instant::now() + WAIT;
    while pending(pool, group).await != 0 {
        assert!(Instant::now() < deadline, "timed out waiting for {group} to acknowledge everything");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn queued(outcome: Enqueued) -> String {
    match outcome {
        Enqueued::Queued { entry } => entry,
        Enqueued::Duplicate { first } => panic!("expected a new alert, got a duplicate of {first}"),
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn one_engagement_sends_one_message_per_channel() {
    let redis = start_redis();
    let pool = pool(&redis);
    let (telegram, webhook) = (telegram_receiver().await, webhook_receiver().await);
    let cfg = config(Some(&telegram), Some(&webhook));
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);

    let kill = kill_alert(7, "budget", "daily budget exceeded", json!({"spent_micro_usd": 10_000_001}));
    queued(sender.enqueue(&kill).await.unwrap());
    // The same engagement noticed again (another trigger, or after a restart of budget).
    let again = kill_alert(7, "operator alice", "manual", json!({}));
    assert_eq!(sender.enqueue(&again).await.unwrap(), Enqueued::Duplicate { first: kill.id.to_string() });

    eventually("both channels delivered", || telegram.accepted().len() == 1 && webhook.accepted().len() == 1).await;
    eventually_acked(&pool, names::TELEGRAM_GROUP).await;
    eventually_acked(&pool, names::WEBHOOK_GROUP).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(telegram.arrivals(), 1, "one Telegram request");
    assert_eq!(webhook.arrivals(), 1, "one webhook request");
    assert_eq!(xlen(&pool).await, 1, "one alert persisted");

    let message = &telegram.accepted()[0];
    let html = message["text"].as_str().unwrap();
    assert!(html.contains("<b>Why:</b> daily budget exceeded\n"), "{html}");
    assert!(kill.text.contains("Why: daily budget exceeded\n") && !kill.text.contains("epoch"), "{}", kill.text);
    let payload = &webhook.accepted()[0];
    assert_eq!(webhook.ids(), vec![kill.id.to_string()], "webhook-id is the alert id");
    assert_eq!(payload["type"], "alert.kill_engaged");
    assert_eq!(payload["data"]["epoch"], 7);
    assert_eq!(payload["data"]["text"], json!(kill.text));
    assert_eq!(payload["data"]["details"]["spent_micro_usd"], 10_000_001);

    // Resuming is a new alert (new epoch); engaging again under it would be another.
    let resumed = resumed_alert(8, "operator alice", json!({}));
    queued(sender.enqueue(&resumed).await.unwrap());
    assert!(matches!(sender.enqueue(&resumed_alert(8, "bob", json!({}))).await.unwrap(), Enqueued::Duplicate { .. }));
    eventually("the resume went out", || telegram.accepted().len() == 2 && webhook.accepted().len() == 2).await;
    let texts: Vec<String> = telegram.accepted().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect();
    assert!(texts[0].contains("KILL SWITCH ENGAGED") && texts[1].contains("Fleet resumed"), "in order: {texts:?}");
    assert_eq!(webhook.ids(), vec![kill.id.to_string(), resumed.id.to_string()]);

    running.stop().await;
    telegram.assert_no_problems();
    webhook.assert_no_problems();
}

#[tokio::test]
async fn alerts_wait_until_the_endpoints_are_back() {
    let redis = start_redis();
    let pool = pool(&redis);
    let webhook = webhook_receiver().await;
    webhook.set(Behaviour { fail_first: 3, ..Behaviour::default() });
    // Telegram is not even listening yet.
    let port = closed_port();
    let telegram_shared: Arc<Shared> = Arc::default();
    let telegram = Receiver { base_url: format!("http://127.0.0.1:{port}"), shared: Arc::clone(&telegram_shared) };
    let cfg = config(Some(&telegram), Some(&webhook));
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);

    let kill = kill_alert(1, "budget", "3 consecutive failures", json!({}));
    queued(sender.enqueue(&kill).await.unwrap());

    eventually("the webhook was retried through its outage", || webhook.accepted().len() == 1).await;
    assert_eq!(webhook.arrivals(), 4, "three 503s, then one delivery");
    eventually("Telegram was tried a few times", || running.failed_attempts() >= 3 + 3).await;
    assert_eq!(pending(&pool, names::TELEGRAM_GROUP).await, 1, "undelivered alerts stay pending");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let telegram = telegram_on(listener, telegram_shared).await;
    eventually("Telegram delivered once it was back", || telegram.accepted().len() == 1).await;
    eventually_acked(&pool, names::TELEGRAM_GROUP).await;
    eventually_acked(&pool, names::WEBHOOK_GROUP).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(telegram.accepted().len(), 1);
    assert_eq!(webhook.ids(), vec![kill.id.to_string()]);
    assert_eq!(webhook.accepted().len(), 1);

    running.stop().await;
    telegram.assert_no_problems();
    webhook.assert_no_problems();
}

#[tokio::test]
async fn a_restarted_dispatcher_finishes_what_a_crashed_one_was_retrying() {
    let redis = start_redis();
    let pool = pool(&redis);
    let (telegram, webhook) = (telegram_receiver().await, webhook_receiver().await);
    telegram.set(Behaviour { fail_first: usize::MAX, ..Behaviour::default() });
    webhook.set(Behaviour { fail_first: usize::MAX, ..Behaviour::default() });
    let cfg = config(Some(&telegram), Some(&webhook));
    let sender = AlertSender::new(pool.clone(), &cfg);

    let first = Running::start(&pool, &cfg);
    let kill = kill_alert(3, "budget", "unknown error type", json!({}));
    queued(sender.enqueue(&kill).await.unwrap());
    eventually("both channels are retrying", || telegram.arrivals() >= 2 && webhook.arrivals() >= 2).await;
    first.crash().await;
    assert_eq!(pending(&pool, names::TELEGRAM_GROUP).await, 1);
    assert_eq!(pending(&pool, names::WEBHOOK_GROUP).await, 1);

    // The endpoints recover (every request from now on succeeds); a new budget process
    // starts, with the same consumer name. The pause lets the aborted tasks' last requests,
    // if any, land first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    telegram.set(Behaviour { fail_first: telegram.arrivals(), ..Behaviour::default() });
    webhook.set(Behaviour { fail_first: webhook.arrivals(), ..Behaviour::default() });
    let second = Running::start(&pool, &cfg);
    eventually("the new dispatcher delivered", || telegram.accepted().len() == 1 && webhook.accepted().len() == 1)
        .await;
    eventually_acked(&pool, names::TELEGRAM_GROUP).await;
    eventually_acked(&pool, names::WEBHOOK_GROUP).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(telegram.accepted().len(), 1);
    assert_eq!(webhook.ids(), vec![kill.id.to_string()]);
    assert_eq!(webhook.accepted().len(), 1);
    second.stop().await;
    telegram.assert_no_problems();
    webhook.assert_no_problems();
}

#[tokio::test]
async fn a_crash_between_delivery_and_ack_resends_and_the_receiver_dedupes_by_webhook_id() {
    let redis = start_redis();
    let pool = pool(&redis);
    let webhook = webhook_receiver().await;
    // The receiver accepts, then takes its time to answer: the crash lands in between.
    webhook.set(Behaviour { respond_delay: Duration::from_secs(30), ..Behaviour::default() });
    let cfg = config(None, Some(&webhook));
    let sender = AlertSender::new(pool.clone(), &cfg);

    let first = Running::start(&pool, &cfg);
    let kill = kill_alert(5, "budget", "operator command", json!({}));
    queued(sender.enqueue(&kill).await.unwrap());
    eventually("the receiver accepted the alert", || webhook.ids().len() == 1).await;
    first.crash().await;
    assert_eq!(pending(&pool, names::WEBHOOK_GROUP).await, 1, "never acknowledged");

    webhook.set(Behaviour::default());
    let second = Running::start(&pool, &cfg);
    eventually("the alert was sent again", || webhook.accepted().len() == 2).await;
    eventually_acked(&pool, names::WEBHOOK_GROUP).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(webhook.ids(), vec![kill.id.to_string()], "exactly once after deduplication");
    assert_eq!(webhook.with(|s| s.duplicates), 1, "at least once: the repeat carried the same webhook-id");
    let bodies = webhook.accepted();
    assert_eq!(bodies[0], bodies[1], "the repeat is the same payload");
    second.stop().await;
    webhook.assert_no_problems();
}

#[tokio::test]
async fn telegram_retry_after_is_honoured() {
    let redis = start_redis();
    let pool = pool(&redis);
    let telegram = telegram_receiver().await;
    telegram.set(Behaviour {
        fail_first: 1,
        failure: Failure::TooManyRequests { retry_after_secs: 1 },
        ..Behaviour::default()
    });
    // Backoff alone would retry within 20 ms.
    let cfg = config(Some(&telegram), None);
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);

    queued(sender.enqueue(&kill_alert(2, "budget", "daily budget exceeded", json!({}))).await.unwrap());
    eventually("delivered after the 429", || telegram.accepted().len() == 1).await;
    let arrivals = telegram.with(|s| s.arrivals.clone());
    assert_eq!(arrivals.len(), 2, "one 429, then one delivery");
    let waited = arrivals[1] - arrivals[0];
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}, before retry_after");
    assert!(waited < Duration::from_secs(3), "retried after {waited:?}, far later than retry_after");
    running.stop().await;
    telegram.assert_no_problems();
}

#[tokio::test]
async fn soft_limit_warnings_are_rate_limited_per_scope() {
    let redis = start_redis();
    let pool = pool(&redis);
    let webhook = webhook_receiver().await;
    let cfg = AlertsConfig { soft_limit_every: Duration::from_millis(700), ..config(None, Some(&webhook)) };
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);

    let warn = |scope: &str| warn_alert(1, scope, "80% of the daily tokens", json!({"percent": 80}));
    let dev = warn("dev");
    queued(sender.enqueue(&dev).await.unwrap());
    for _ in 0..3 {
        assert_eq!(sender.enqueue(&warn("dev")).await.unwrap(), Enqueued::Duplicate { first: dev.id.to_string() });
    }
    let qa = warn("qa");
    queued(sender.enqueue(&qa).await.unwrap());
    // Rate limits do not swallow engagements.
    let kill = kill_alert(1, "budget", "daily budget exceeded", json!({}));
    queued(sender.enqueue(&kill).await.unwrap());
    eventually("three alerts delivered", || webhook.ids().len() == 3).await;

    tokio::time::sleep(Duration::from_millis(800)).await;
    let later = warn("dev");
    queued(sender.enqueue(&later).await.unwrap());
    eventually("the next interval's warning delivered", || webhook.ids().len() == 4).await;
    assert_eq!(webhook.ids(), [&dev, &qa, &kill, &later].map(|a| a.id.to_string()).to_vec());
    assert_eq!(xlen(&pool).await, 4);
    running.stop().await;
    webhook.assert_no_problems();
}

#[tokio::test]
async fn the_webhook_receiver_refuses_bad_signatures_and_alerts_wait_for_the_right_secret() {
    let redis = start_redis();
    let pool = pool(&redis);
    let webhook = webhook_receiver().await;

    // The receiver really checks: a forged signature, a stale timestamp, missing headers.
    let client = reqwest::Client::new();
    let url = format!("{}{WEBHOOK_PATH}", webhook.base_url);
    let body = br#"{"type":"alert.kill_engaged","timestamp":"x","data":{"id":"m1","kind":"kill_engaged"}}"#.to_vec();
    let now = chrono::Utc::now().timestamp();
    let right = WebhookSecret::parse(WEBHOOK_SECRET).unwrap();
    let wrong = WebhookSecret::from_key(vec![9; 32]).unwrap();
    let cases = [
        ("m1", now, standard_webhooks::sign(&wrong, "m1", now, &body)),
        ("m1", now - 3600, standard_webhooks::sign(&right, "m1", now - 3600, &body)),
        ("m2", now, standard_webhooks::sign(&right, "m1", now, &body)),
    ];
    for (id, ts, sig) in cases {
        let response = client
            .post(&url)
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    assert_eq!(client.post(&url).body(body.clone()).send().await.unwrap().status(), 401);
    let good = standard_webhooks::sign(&right, "m1", now, &body);
    let response = client
        .post(&url)
        .header("webhook-id", "m1")
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", format!("v1,bm9wZQ== {good}"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "a valid signature among several is accepted");
    assert_eq!(webhook.problems().len(), 4);

    // A dispatcher signing with another secret never gets through; the alert stays queued.
    let mut cfg = config(None, Some(&webhook));
    cfg.webhook.as_mut().unwrap().secret = wrong.to_whsec();
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);
    queued(sender.enqueue(&kill_alert(9, "budget", "manual", json!({}))).await.unwrap());
    eventually("several refused attempts", || webhook.problems().len() >= 4 + 3).await;
    assert_eq!(webhook.ids(), vec!["m1".to_owned()], "nothing from the dispatcher was accepted");
    assert_eq!(pending(&pool, names::WEBHOOK_GROUP).await, 1);
    running.stop().await;

    // With the right secret, the queued alert goes out.
    let cfg = config(None, Some(&webhook));
    let running = Running::start(&pool, &cfg);
    eventually("delivered with the right secret", || webhook.ids().len() == 2).await;
    eventually_acked(&pool, names::WEBHOOK_GROUP).await;
    running.stop().await;
}

#[tokio::test]
async fn an_alert_queued_before_a_redis_crash_is_delivered_after_it() {
    let mut redis = RedisServer::builder().appendonly(true).start().expect("the alert tests need a real redis-server");
    let (telegram, webhook) = (telegram_receiver().await, webhook_receiver().await);
    let cfg = config(Some(&telegram), Some(&webhook));
    let kill = kill_alert(11, "budget", "daily budget exceeded", json!({}));
    {
        let pool = pool(&redis);
        queued(AlertSender::new(pool.clone(), &cfg).enqueue(&kill).await.unwrap());
        assert_eq!(xlen(&pool).await, 1, "persisted before any send attempt");
    }
    redis.kill();
    redis.restart().unwrap();

    let pool = pool(&redis);
    let sender = AlertSender::new(pool.clone(), &cfg);
    assert!(matches!(sender.enqueue(&kill).await.unwrap(), Enqueued::Duplicate { .. }), "the marker survived too");
    let running = Running::start(&pool, &cfg);
    eventually("delivered after the restart", || telegram.accepted().len() == 1 && webhook.ids().len() == 1).await;
    eventually_acked(&pool, names::TELEGRAM_GROUP).await;
    eventually_acked(&pool, names::WEBHOOK_GROUP).await;
    running.stop().await;
    telegram.assert_no_problems();
    webhook.assert_no_problems();
}

/// Captures this thread's log output (the runtime is single-threaded, so that is all of it).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_secret_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let redis = start_redis();
    let pool = pool(&redis);
    // Both endpoints refuse connections; the webhook's also answers slowly… not at all.
    let nowhere = Receiver { base_url: format!("http://127.0.0.1:{}", closed_port()), shared: Arc::default() };
    let cfg = config(Some(&nowhere), Some(&nowhere));
    let sender = AlertSender::new(pool.clone(), &cfg);
    let dispatcher = AlertDispatcher::new(pool.clone(), &cfg).unwrap();
    let shown = format!("{dispatcher:?} {sender:?} {cfg:?}");
    let stats = dispatcher.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(dispatcher.run(shutdown.clone()));

    queued(sender.enqueue(&kill_alert(4, "budget", "manual", json!({}))).await.unwrap());
    eventually("a few failed attempts", || stats.failed_attempts.load(std::sync::atomic::Ordering::Relaxed) >= 6).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("Alert delivery failed; retrying."), "{logs}");
    assert!(logs.contains("channel=\"telegram\"") || logs.contains("channel=telegram"), "{logs}");
    let token_secret = BOT_TOKEN.split(':').nth(1).unwrap();
    let whsec_body = WEBHOOK_SECRET.trim_start_matches("whsec_");
    for (name, secret) in [
        ("bot token", token_secret),
        ("chat id", &CHAT_ID.to_string()),
        ("webhook path", WEBHOOK_PATH),
        ("webhook secret", whsec_body),
    ] {
        assert!(!logs.contains(secret), "the {name} leaked into the logs:\n{logs}");
        assert!(!shown.contains(secret), "the {name} leaked into Debug output: {shown}");
    }
}

/// Redaction that holds (issue 10, item 7): a kill reason quoting a credential reaches
/// neither the alert outbox nor Telegram nor the webhook; every sample comes out exactly
/// redacted on both channels.
#[tokio::test]
async fn every_secret_in_an_alert_is_redacted_on_every_channel() {
    use fleet_testkit::secrets::SAMPLES;
    let redis = start_redis();
    let pool = pool(&redis);
    let (telegram, webhook) = (telegram_receiver().await, webhook_receiver().await);
    let cfg = config(Some(&telegram), Some(&webhook));
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);

    for (epoch, s) in (1u64..).zip(SAMPLES) {
        let kill = kill_alert(epoch, "operator olga", s.text, json!({"reason": s.text}));
        queued(sender.enqueue(&kill).await.unwrap());
    }
    eventually("every alert delivered", || {
        telegram.accepted().len() == SAMPLES.len() && webhook.accepted().len() == SAMPLES.len()
    })
    .await;
    eventually_acked(&pool, names::TELEGRAM_GROUP).await;
    eventually_acked(&pool, names::WEBHOOK_GROUP).await;
    running.stop().await;

    let (messages, payloads) = (telegram.accepted(), webhook.accepted());
    for ((epoch, s), (message, payload)) in (1u64..).zip(SAMPLES).zip(messages.iter().zip(&payloads)) {
        assert_eq!(payload["data"]["epoch"], epoch);
        let why: String = s.redacted.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let html = message["text"].as_str().unwrap();
        assert!(html.contains(&format!("\n<b>Why:</b> {}\n", escape(&why))), "{}: Telegram {html}", s.name);
        let text = payload["data"]["text"].as_str().unwrap();
        assert!(text.contains(&format!("\nWhy: {why}\n")), "{}: webhook {text}", s.name);
        assert_eq!(payload["data"]["cause"]["reason"], json!(s.redacted), "{}: webhook cause", s.name);
        assert_eq!(payload["data"]["cause"]["operator"], "olga");
        assert_eq!(payload["data"]["details"], json!({"reason": s.redacted}), "{}: webhook details", s.name);
    }
    // Nor in the outbox, which outlives the delivery.
    let mut conn = pool.get().await.unwrap();
    let stored: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg(names::STREAM).arg("-").arg("+").query_async(&mut conn).await.unwrap();
    assert_eq!(stored.len(), SAMPLES.len());
    let everything = format!("{stored:?} {messages:?} {payloads:?}");
    for s in SAMPLES {
        assert!(!everything.contains(s.secret), "{} leaked", s.name);
    }
    telegram.assert_no_problems();
    webhook.assert_no_problems();
}

/// What an operator reads on a phone (issue 14, item 5): the exact Telegram message of each
/// kind (HTML, with the age at send time), and the webhook's structured facts.
#[tokio::test]
async fn every_alert_says_where_when_who_what_and_the_command_to_act() {
    let redis = start_redis();
    let pool = pool(&redis);
    let (telegram, webhook) = (telegram_receiver().await, webhook_receiver().await);
    let cfg = config(Some(&telegram), Some(&webhook));
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);

    // Three minutes and five seconds ago, on a whole second; the kill twelve minutes before.
    let at = (now_ms() - 185_000) / 1000 * 1000;
    let kill_at = at - 12 * 60_000;
    let alice = Cause::operator(Some("alice"), "orchestrator-0", "deploying a hotfix");
    let by_alice = Alert::kill_engaged(DEPLOYMENT, 7, alice.clone(), at, json!({}));
    let daily = Cause::automatic(
        "daily_budget",
        "budget-0",
        "daily budget exceeded: 812,400 of 800,000 tokens used on 2026-12-02",
    );
    let automatic = Alert::kill_engaged(DEPLOYMENT, 8, daily, at, json!({"tokens": 812_400}));
    let ended = KillRef { engagement: "e-1".into(), at_ms: kill_at, at: String::new(), cause: alice };
    let bob = Cause::operator(Some("bob"), "orchestrator-0", "");
    let resumed = Alert::resumed(DEPLOYMENT, 8, bob, at, Some(ended), json!({}));
    let soft = Alert::soft_limit_warning(
        DEPLOYMENT,
        8,
        "dev",
        Cause::automatic(
            "soft_limit",
            "budget-0",
            "role dev used 300,000 tokens and $6.000000 today (soft limits: 300,000 tokens, $6.000000); calls move to gpt-4o-mini",
        ),
        json!({}),
    );
    let (task_1, task_2) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
    let incident_id = uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0042);
    let incident = Alert::incident(
        DEPLOYMENT,
        8,
        Incident {
            id: incident_id,
            severity: Severity::High,
            title: "secret found in an approved change".into(),
            trigger: "secret_after_approval".into(),
            tasks: vec![task_1, task_2],
            merges_frozen: Scope::Tasks,
            repository: None,
        },
        Cause::automatic("secret_after_approval", "orchestrator-0", "a private key in deploy/key.pem"),
        at,
        json!({}),
    );
    let all = [&by_alice, &automatic, &resumed, &soft, &incident];
    for alert in all {
        queued(sender.enqueue(alert).await.unwrap());
    }
    eventually("every alert delivered", || telegram.accepted().len() == 5 && webhook.ids().len() == 5).await;
    running.stop().await;
    telegram.assert_no_problems();
    webhook.assert_no_problems();

    let when = utc(at);
    let messages: Vec<String> = telegram.accepted().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(
        messages[0],
        format!(
            "🛑 <b>KILL SWITCH ENGAGED</b> on <b>prod-eu</b>\n\
             <b>When:</b> {when} (3 min ago)\n\
             <b>By:</b> alice (operator, via orchestrator-0)\n\
             <b>Why:</b> deploying a hotfix\n\
             <b>Affected:</b> every open task halted; all merges frozen; dev, qa, review, refactor, orchestrator paused\n\
             <b>Resume:</b> <code>fleetctl resume</code>\n\
             <b>State:</b> <code>fleetctl status</code>"
        )
    );
    assert_eq!(
        messages[1],
        format!(
            "🛑 <b>KILL SWITCH ENGAGED</b> on <b>prod-eu</b>\n\
             <b>When:</b> {when} (3 min ago)\n\
             <b>By:</b> budget-0, automatically (daily budget)\n\
             <b>Why:</b> daily budget exceeded: 812,400 of 800,000 tokens used on 2026-12-02\n\
             <b>Affected:</b> every open task halted; all merges frozen; dev, qa, review, refactor, orchestrator paused\n\
             <b>Resume:</b> <code>fleetctl resume</code>\n\
             <b>State:</b> <code>fleetctl status</code>"
        )
    );
    assert_eq!(
        messages[2],
        format!(
            "✅ <b>Fleet resumed</b> on <b>prod-eu</b>\n\
             <b>When:</b> {when} (3 min ago)\n\
             <b>By:</b> bob (operator, via orchestrator-0)\n\
             <b>Ends:</b> the kill of {} (lasted 12 min) by alice: deploying a hotfix\n\
             <b>Affected:</b> halted tasks re-issued at their current step; merges allowed again\n\
             <b>State:</b> <code>fleetctl status</code>",
            utc(kill_at)
        )
    );
    assert_eq!(
        messages[3],
        format!(
            "⚠️ <b>Soft limit reached</b> on <b>prod-eu</b>: dev\n\
             <b>When:</b> {} (just now)\n\
             <b>By:</b> budget-0, automatically (role soft limit)\n\
             <b>What:</b> role dev used 300,000 tokens and $6.000000 today (soft limits: 300,000 tokens, $6.000000); calls move to gpt-4o-mini\n\
             <b>Affected:</b> nothing stopped yet\n\
             <b>State:</b> <code>fleetctl status</code>\n\
             <b>Stop everything:</b> <code>fleetctl kill --reason 'soft limit reached for dev'</code>",
            utc(soft.facts.occurred_at_ms)
        )
    );
    assert_eq!(
        messages[4],
        format!(
            "🚨 <b>INCIDENT HIGH</b> on <b>prod-eu</b>: secret found in an approved change\n\
             <b>When:</b> {when} (3 min ago)\n\
             <b>By:</b> orchestrator-0, automatically (secret after approval)\n\
             <b>Why:</b> a private key in deploy/key.pem\n\
             <b>Tasks:</b> {task_1}, {task_2}\n\
             <b>Affected:</b> merges of these tasks frozen\n\
             <b>Details:</b> <code>fleetctl incident show {incident_id}</code>\n\
             <b>State:</b> <code>fleetctl status</code>"
        )
    );
    for m in &messages {
        assert!(!m.to_lowercase().contains("epoch"), "no internal words: {m}");
    }

    // The plain text (the webhook's `text`) says the same without markup or age.
    let payloads = webhook.accepted();
    assert_eq!(
        payloads[0]["data"]["text"],
        format!(
            "🛑 KILL SWITCH ENGAGED on prod-eu\n\
             When: {when}\n\
             By: alice (operator, via orchestrator-0)\n\
             Why: deploying a hotfix\n\
             Affected: every open task halted; all merges frozen; dev, qa, review, refactor, orchestrator paused\n\
             Resume: fleetctl resume\n\
             State: fleetctl status"
        )
    );
    // And the facts, structured.
    let rfc = |ms: u64| budget::alert::render::rfc3339(ms);
    let data = |i: usize| payloads[i]["data"].clone();
    assert_eq!(data(0)["deployment"], "prod-eu");
    assert_eq!(data(0)["occurred_at_ms"], at);
    assert_eq!(data(0)["occurred_at"], rfc(at));
    assert_eq!(
        data(0)["cause"],
        json!({"trigger": "operator", "operator": "alice", "via": "orchestrator-0", "reason": "deploying a hotfix"})
    );
    assert_eq!(
        data(0)["affected"],
        json!({"roles_paused": ["dev", "qa", "review", "refactor", "orchestrator"], "tasks_halted": "all",
               "merges_frozen": "all", "tasks": []})
    );
    assert_eq!(
        data(0)["actions"],
        json!([{"label": "Resume", "command": "fleetctl resume"}, {"label": "State", "command": "fleetctl status"}])
    );
    assert_eq!(data(1)["cause"]["trigger"], "daily_budget");
    assert_eq!(data(1)["cause"].get("operator"), None);
    assert_eq!(data(1)["details"], json!({"tokens": 812_400}));
    assert_eq!(
        data(2)["ends"],
        json!({"engagement": "e-1", "at_ms": kill_at, "at": rfc(kill_at),
               "cause": {"trigger": "operator", "operator": "alice", "via": "orchestrator-0", "reason": "deploying a hotfix"}})
    );
    assert_eq!(data(3)["scope"], "dev");
    assert_eq!(data(3)["affected"]["merges_frozen"], "none");
    assert_eq!(payloads[4]["type"], "alert.incident");
    assert_eq!(
        data(4)["incident"],
        json!({"id": incident_id, "severity": "high", "title": "secret found in an approved change",
               "trigger": "secret_after_approval", "tasks": [task_1, task_2], "merges_frozen": "tasks"})
    );
    assert_eq!(data(4)["dedup_key"], format!("incident:{incident_id}"));
    assert_eq!(data(4)["affected"]["tasks"], json!([task_1, task_2]));
}

/// Values nobody controls in this crate (an operator's name and reason, a deployment name, an
/// incident's title) are escaped for Telegram's HTML, cannot add lines, and a message stays
/// within 4,096 characters however long they are, cut between characters and entities.
#[tokio::test]
async fn hostile_values_are_escaped_and_long_ones_cut_within_telegrams_limit() {
    let redis = start_redis();
    let pool = pool(&redis);
    let telegram = telegram_receiver().await;
    let cfg = config(Some(&telegram), None);
    let sender = AlertSender::new(pool.clone(), &cfg).with_deployment("<b>prod</b> & \"eu\"");
    let running = Running::start(&pool, &cfg);

    let hostile = "<script>alert(1)</script> _*[]()~`>#+-=|{}.! &amp; \nBy: root";
    let at = now_ms();
    let short = Alert::kill_engaged(
        sender.deployment(),
        1,
        Cause::operator(Some("<i>mallory</i>"), "orchestrator-0", hostile),
        at,
        json!({}),
    );
    // Long: every character escapes to an entity or is outside the BMP (two UTF-16 units).
    let long_reason = format!("{}{}", "<&>\"🦀é".repeat(2_000), hostile);
    let long = Alert::kill_engaged(
        sender.deployment(),
        2,
        Cause::operator(Some(&"ű".repeat(500)), "orchestrator-0", &long_reason),
        at,
        json!({}),
    );
    let incident = Alert::incident(
        sender.deployment(),
        2,
        Incident {
            id: uuid::Uuid::from_u128(7),
            severity: Severity::Critical,
            title: "&".repeat(5_000),
            trigger: "operator".into(),
            tasks: (0..50).map(uuid::Uuid::from_u128).collect(),
            merges_frozen: Scope::All,
            repository: None,
        },
        Cause::operator(Some("olga"), "orchestrator-0", &long_reason),
        at,
        json!({}),
    );
    for alert in [&short, &long, &incident] {
        queued(sender.enqueue(alert).await.unwrap());
    }
    eventually("delivered", || telegram.accepted().len() == 3).await;
    running.stop().await;
    // The receiver parsed every message as Telegram would (tags, entities, length).
    telegram.assert_no_problems();

    let messages: Vec<String> = telegram.accepted().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(
        messages[0],
        format!(
            "🛑 <b>KILL SWITCH ENGAGED</b> on <b>&lt;b&gt;prod&lt;/b&gt; &amp; &quot;eu&quot;</b>\n\
             <b>When:</b> {} (just now)\n\
             <b>By:</b> &lt;i&gt;mallory&lt;/i&gt; (operator, via orchestrator-0)\n\
             <b>Why:</b> &lt;script&gt;alert(1)&lt;/script&gt; _*[]()~`&gt;#+-=|{{}}.! &amp;amp;  By: root\n\
             <b>Affected:</b> every open task halted; all merges frozen; dev, qa, review, refactor, orchestrator paused\n\
             <b>Resume:</b> <code>fleetctl resume</code>\n\
             <b>State:</b> <code>fleetctl status</code>",
            utc(at)
        )
    );
    for m in &messages[1..] {
        let units = m.encode_utf16().count();
        assert!(units <= 4096 && units > 4000, "{units} UTF-16 units: as much as fits, no more");
        assert!(m.contains("…\n<b>"), "the cut is marked");
        assert!(m.ends_with("<b>State:</b> <code>fleetctl status</code>"), "the commands survive the cut");
    }
    assert!(messages[1].contains("<b>Why:</b> &lt;&amp;&gt;&quot;🦀é&lt;"), "{}", messages[1]);
    assert!(messages[1].contains(&format!("<b>By:</b> {}… (operator", "ű".repeat(99))));
    assert!(
        messages[2]
            .contains(&format!("on <b>&lt;b&gt;prod&lt;/b&gt; &amp; &quot;eu&quot;</b>: {}…\n", "&amp;".repeat(299)))
    );
    assert!(messages[2].contains("and 40 more\n"));
    assert!(
        messages[2]
            .contains("<b>Details:</b> <code>fleetctl incident show 00000000-0000-0000-0000-000000000007</code>")
    );
}

/// Should Telegram refuse the markup (a renderer bug: every value is escaped), the same
/// attempt sends the plain text, rather than blocking the channel for ever.
#[tokio::test]
async fn markup_telegram_cannot_parse_is_sent_again_as_plain_text() {
    let redis = start_redis();
    let pool = pool(&redis);
    let telegram = telegram_receiver().await;
    telegram.set(Behaviour { refuse_html: true, ..Behaviour::default() });
    let cfg = config(Some(&telegram), None);
    let sender = AlertSender::new(pool.clone(), &cfg);
    let running = Running::start(&pool, &cfg);
    let kill = kill_alert(3, "operator alice", "drill", json!({}));
    queued(sender.enqueue(&kill).await.unwrap());
    eventually("delivered as plain text", || telegram.accepted().len() == 1).await;
    eventually_acked(&pool, names::TELEGRAM_GROUP).await;
    assert_eq!(running.failed_attempts(), 0, "no retry: the fallback is part of the attempt");
    running.stop().await;
    let message = &telegram.accepted()[0];
    assert_eq!(message["text"], json!(kill.text));
    assert_eq!(message.get("parse_mode"), None);
    assert_eq!(telegram.arrivals(), 2, "one refused HTML message, then the plain text, in the same attempt");
    telegram.assert_no_problems();
}
