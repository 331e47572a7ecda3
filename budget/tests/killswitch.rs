//! The `budget` binary as a separate process against a real redis-server, fed by the
//! orchestrator's signed usage, outcome and control envelopes, alerting a local Telegram
//! stand-in (checks the Bot API request) and a local webhook receiver (verifies the
//! Standard Webhooks signature).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use budget::alert::standard_webhooks::{self, WebhookSecret};
use budget::ledger::{Ledger, LedgerConfig, Refusal, ReserveError, SystemClock};
use bus::Publisher;
use bus::control::read_state;
use envelope::*;
use fleet_testkit::RedisServer;
use serde_json::Value;
use uuid::Uuid;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");
const BOT_TOKEN: &str = "123456:TEST-token";
const CHAT_ID: &str = "-1001";
const WEBHOOK_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const KILL_TEXT: &str = "KILL SWITCH ENGAGED";

fn permissions() -> PermissionTable {
    PermissionTable::parse(PERMISSIONS).unwrap()
}

fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([7; 32]))
}

fn keyring(role: Role) -> Arc<Keyring> {
    Arc::new(Keyring::derive(&master(), Process::Role(role), &permissions()).unwrap())
}

fn verifier(role: Role) -> Verifier {
    Verifier::new((*keyring(role)).clone(), permissions(), VerifierConfig::default())
}

/// What a receiver accepted and refused.
#[derive(Default)]
struct Seen {
    /// Alerts accepted, as JSON (Telegram: `{"text": …}`; webhook: the whole body).
    accepted: Vec<Value>,
    /// Requests refused because the receiver was "down".
    refused_while_down: usize,
    /// Requests that were wrong (path, JSON, signature): must stay empty.
    problems: Vec<String>,
    down: bool,
}

#[derive(Clone, Default)]
struct Receiver {
    base_url: String,
    seen: Arc<Mutex<Seen>>,
}

impl Receiver {
    fn set_down(&self, down: bool) {
        self.seen.lock().unwrap().down = down;
    }
    fn kills(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        assert!(seen.problems.is_empty(), "bad requests: {:?}", seen.problems);
        seen.accepted
            .iter()
            .filter(|v| v["text"].as_str().is_some_and(|t| t.contains(KILL_TEXT)) || v["type"] == "alert.kill_engaged")
            .count()
    }
    fn count(&self, what: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.accepted.iter().filter(|v| v.to_string().contains(what)).count()
    }
}

fn admit(seen: &Mutex<Seen>) -> bool {
    let mut s = seen.lock().unwrap();
    if s.down {
        s.refused_while_down += 1;
        return false;
    }
    true
}

async fn telegram(State(r): State<Receiver>, uri: Uri, body: Bytes) -> Response {
    let problem = |what: String| {
        r.seen.lock().unwrap().problems.push(what);
        StatusCode::BAD_REQUEST.into_response()
    };
    if uri.path() != format!("/bot{BOT_TOKEN}/sendMessage") {
        return problem(format!("path {}", uri.path()));
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else { return problem("not JSON".into()) };
    // A numeric chat id is sent as a JSON number, `@channel` as a string.
    if v["chat_id"].to_string().trim_matches('"') != CHAT_ID || !v["text"].is_string() {
        return problem(format!("body {v}"));
    }
    if !admit(&r.seen) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    r.seen.lock().unwrap().accepted.push(v);
    axum::Json(serde_json::json!({"ok": true, "result": {"message_id": 1}})).into_response()
}

async fn webhook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let secret = WebhookSecret::parse(WEBHOOK_SECRET).unwrap();
    let (id, ts, sig) = (
        header(standard_webhooks::HEADER_ID),
        header(standard_webhooks::HEADER_TIMESTAMP),
        header(standard_webhooks::HEADER_SIGNATURE),
    );
    if let Err(e) = standard_webhooks::verify(&secret, &id, &ts, &sig, &body, chrono::Utc::now().timestamp()) {
        r.seen.lock().unwrap().problems.push(format!("signature: {e}"));
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if !admit(&r.seen) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    let mut seen = r.seen.lock().unwrap();
    // Receivers drop repeats by webhook-id.
    if !seen.accepted.iter().any(|a| a["data"]["id"] == v["data"]["id"]) {
        seen.accepted.push(v);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn receivers() -> (Receiver, Receiver) {
    let mut out = Vec::new();
    for tg in [true, false] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver { base_url: format!("http://{}", listener.local_addr().unwrap()), ..Receiver::default() };
        let router = if tg {
            Router::new().fallback(telegram).with_state(r.clone())
        } else {
            Router::new().fallback(webhook).with_state(r.clone())
        };
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        out.push(r);
    }
    let webhook = out.pop().unwrap();
    (out.pop().unwrap(), webhook)
}

/// The budget process, killed on drop.
struct BudgetProcess {
    child: Child,
    log: PathBuf,
}

impl BudgetProcess {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn log(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        out + &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }
}

impl Drop for BudgetProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Fleet {
    redis: RedisServer,
    dir: tempfile::TempDir,
    telegram: Receiver,
    webhook: Receiver,
    orchestrator: Arc<Publisher>,
    pool: bus::RedisPool,
    ledger: LedgerConfig,
    starts: usize,
}

const LEDGER: &str = r#"
daily_tokens = 120_000
daily_micro_usd = 1_000_000_000
per_task_tokens = 100_000
per_task_micro_usd = 1_000_000_000
[per_role.dev]
soft_tokens = 60_000
[prices.m]
input_micro_usd_per_mtok = 1_000_000
output_micro_usd_per_mtok = 2_000_000
"#;

async fn fleet() -> Fleet {
    let redis = RedisServer::start().expect("redis-server must be installed; tests never skip");
    let dir = tempfile::tempdir().unwrap();
    let keyset = master().derive_keyset(Process::Role(Role::Budget), &permissions());
    std::fs::write(dir.path().join("budget-keys.toml"), keyset.to_toml().as_bytes()).unwrap();
    std::fs::write(dir.path().join("permissions.toml"), PERMISSIONS).unwrap();
    let (telegram, webhook) = receivers().await;
    let pool = bus::pool(secrecy::SecretString::from(redis.url()), 8, Duration::from_secs(2)).unwrap();
    let orchestrator =
        Arc::new(Publisher::new(pool.clone(), keyring(Role::Orchestrator), bus::PublisherConfig::default()));
    let ledger = LedgerConfig::from_toml(LEDGER).unwrap();
    Fleet { redis, dir, telegram, webhook, orchestrator, pool, ledger, starts: 0 }
}

impl Fleet {
    fn config(&self) -> String {
        let d = self.dir.path().display();
        format!(
            r#"
instance = "budget-0"
deployment = "staging"
keyset = "{d}/budget-keys.toml"
permissions = "{d}/permissions.toml"
grace_secs = 2
[ledger]
{LEDGER}
[killswitch]
check_every_ms = 200
[alerts]
retry_min_ms = 50
retry_max_ms = 300
block_ms = 200
[alerts.telegram]
base_url = "{}"
bot_token = "{BOT_TOKEN}"
chat_id = "{CHAT_ID}"
[alerts.webhook]
url = "{}/hook"
secret = "{WEBHOOK_SECRET}"
"#,
            self.telegram.base_url, self.webhook.base_url
        )
        .replace("[per_role", "[ledger.per_role")
        .replace("[prices", "[ledger.prices")
    }

    fn start_budget(&mut self) -> BudgetProcess {
        let path = self.dir.path().join("budget.toml");
        std::fs::write(&path, self.config()).unwrap();
        self.starts += 1;
        let log = self.dir.path().join(format!("budget-{}.log", self.starts));
        let child = Command::new(env!("CARGO_BIN_EXE_budget"))
            .arg("--config")
            .arg(&path)
            .env("FLEET_REDIS_URL", self.redis.url())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("the budget binary starts");
        BudgetProcess { child, log }
    }

    async fn conn(&self) -> bus::Conn {
        self.pool.get().await.unwrap()
    }

    async fn state(&self) -> bus::KillState {
        let mut c = self.conn().await;
        read_state(&mut c).await.unwrap()
    }

    /// An orchestrator → budget envelope under the current epoch.
    async fn send(&self, stream: &str, payload: Payload, task: Option<Uuid>) {
        let epoch = self.state().await.epoch;
        let from = Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-0").unwrap() };
        let mut env = Envelope::new(from, Role::Budget, bus::now_ms(), 60_000, epoch, payload);
        env.task_id = task;
        self.orchestrator.publish(&StreamName::parse(stream).unwrap(), &env).await.unwrap();
    }

    async fn outcome(&self, status: Status, error_kind: Option<&str>) {
        let o = Outcome { role: Role::Qa, status, error_kind: error_kind.map(str::to_owned) };
        self.send(streams::OUTCOMES, o.into(), Some(Uuid::now_v7())).await;
    }

    /// The control messages on `role`'s stream, verified as that role would.
    async fn controls(&self, role: Role) -> Vec<Payload> {
        let stream = StreamName::control(role);
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(stream.as_str())
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
        bus::reply::entries("XRANGE", &v)
            .unwrap()
            .iter()
            .map(|e| {
                let wire = e.field("env").unwrap();
                verifier(role).check(stream.as_str(), wire, ctx).unwrap().envelope().payload.clone()
            })
            .collect()
    }

    async fn failures(&self) -> u64 {
        let v: Option<u64> =
            redis::cmd("GET").arg(budget::killswitch::FAILURES_KEY).query_async(&mut self.conn().await).await.unwrap();
        v.unwrap_or(0)
    }
}

async fn eventually(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `budget` has created its consumer groups (it is up).
async fn wait_up(f: &Fleet, p: &BudgetProcess) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v: redis::RedisResult<redis::Value> =
            redis::cmd("XINFO").arg("GROUPS").arg(streams::OUTCOMES).query_async(&mut f.conn().await).await;
        if v.is_ok_and(|v| matches!(v, redis::Value::Array(a) if !a.is_empty())) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the budget process did not come up:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pauses(payloads: &[Payload]) -> Vec<u64> {
    payloads
        .iter()
        .filter_map(|p| match p {
            Payload::ControlPause(p) => Some(p.epoch),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reservers_spend_the_day_exactly_and_engage_the_switch_once() {
    let mut f = fleet().await;
    let budget = f.start_budget();
    wait_up(&f, &budget).await;
    let ledger = Ledger::with_clock(f.pool.clone(), f.ledger.clone(), Arc::new(SystemClock)).unwrap();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (ledger, publisher) = (ledger.clone(), f.orchestrator.clone());
        callers.spawn(async move {
            let task = Uuid::now_v7();
            let mut calls = 0u64;
            loop {
                match ledger.reserve(task, Role::Dev, "m", 100, 200).await {
                    Ok(r) => {
                        ledger.commit(&r, 100, 200).await.unwrap();
                        calls += 1;
                        let usage = Usage {
                            role: Role::Dev,
                            model: "m".into(),
                            input_tokens: 100,
                            output_tokens: 200,
                            cost_micro_usd: 500,
                        };
                        send_usage(&publisher, usage, task).await;
                    }
                    Err(ReserveError::Refused(Refusal::DailyLimit { .. })) => return calls,
                    Err(e) => panic!("reserve: {e}"),
                }
            }
        });
    }
    let calls: u64 = callers.join_all().await.into_iter().sum();
    let day = ledger.usage(ledger.today()).await.unwrap();
    assert_eq!(calls * 300, day.usage.tokens);
    assert_eq!(day.usage.tokens, 120_000, "the day is spent to the token, never beyond");
    assert_eq!(day.usage.held_tokens, 0);

    eventually("the switch is engaged", Duration::from_secs(10), async || f.state().await.engaged).await;
    eventually("both channels delivered the kill", Duration::from_secs(20), async || {
        f.telegram.kills() >= 1 && f.webhook.kills() >= 1
    })
    .await;
    // Usage reports keep arriving for a while; give extra engagements every chance to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = f.state().await;
    assert_eq!((state.epoch, state.engaged), (1, true));
    assert!(state.reason.unwrap().contains("daily budget"));
    for role in budget::killswitch::PAUSED_ROLES {
        assert_eq!(pauses(&f.controls(*role).await), [1], "exactly one pause on {role}'s control stream");
    }
    assert_eq!(f.telegram.kills(), 1, "exactly one kill message on Telegram");
    assert_eq!(f.webhook.kills(), 1, "exactly one kill alert at the webhook");
    assert!(f.telegram.count("soft limit reached for dev") <= 1);
    drop(budget);
}

/// A usage report as the model proxy sends it. Reports sealed under epoch 0 after the
/// switch raised the epoch are refused (`stale_epoch`): expected.
async fn send_usage(publisher: &Publisher, usage: Usage, task: Uuid) {
    let from = Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-0").unwrap() };
    let mut env = Envelope::new(from, Role::Budget, bus::now_ms(), 60_000, 0, usage.into());
    env.task_id = Some(task);
    publisher.publish(&StreamName::parse(streams::USAGE).unwrap(), &env).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consecutive_failures_engage_a_success_resets_and_the_operator_resumes() {
    let mut f = fleet().await;
    let budget = f.start_budget();
    wait_up(&f, &budget).await;
    for s in [Status::Failure, Status::Error, Status::Success, Status::Failure, Status::Failure] {
        f.outcome(s, None).await;
    }
    eventually("two failures counted", Duration::from_secs(10), async || f.failures().await == 2).await;
    assert!(!f.state().await.engaged, "a success in between resets the count");
    f.outcome(Status::Failure, Some("timeout")).await;
    eventually("the switch is engaged", Duration::from_secs(10), async || f.state().await.engaged).await;
    let state = f.state().await;
    assert_eq!(state.epoch, 1);
    assert!(state.reason.as_deref().unwrap().contains("3 consecutive task failures"), "{state:?}");
    eventually("the kill alert is delivered", Duration::from_secs(20), async || {
        f.telegram.kills() == 1 && f.webhook.kills() == 1
    })
    .await;
    assert_eq!(f.telegram.count("KILL SWITCH ENGAGED</b> on <b>staging</b>"), 1, "the deployment is named");
    assert_eq!(f.telegram.count("<b>By:</b> budget-0, automatically (consecutive failures)"), 1);
    assert_eq!(f.telegram.count("<b>Why:</b> 3 consecutive task failures (threshold 3)"), 1);
    assert_eq!(f.telegram.count("<b>Resume:</b> <code>fleetctl resume</code>"), 1);

    // The operator resumes through the orchestrator: control.resume on fleet:control:budget.
    let resume = ControlResume { epoch: 1, by: Some("bob".into()) };
    f.send(StreamName::control(Role::Budget).as_str(), resume.into(), None).await;
    eventually("the switch is released", Duration::from_secs(10), async || !f.state().await.engaged).await;
    assert_eq!(f.state().await.epoch, 1, "the epoch stays");
    assert_eq!(f.failures().await, 0);
    // The record is released first, then each role's control.resume is published.
    for role in budget::killswitch::PAUSED_ROLES {
        eventually(&format!("{role}'s control.resume"), Duration::from_secs(10), async || {
            f.controls(*role).await.len() >= 2
        })
        .await;
        let got = f.controls(*role).await;
        assert!(
            matches!(&got[..], [Payload::ControlPause(p), Payload::ControlResume(r)] if p.epoch == 1 && r.epoch == 1),
            "{role}: {got:?}"
        );
    }
    eventually("the resumed alert is delivered", Duration::from_secs(20), async || {
        f.telegram.count("Fleet resumed") == 1 && f.webhook.count("alert.resumed") == 1
    })
    .await;
    // It says which kill it ends: when, and why.
    let kill_at = budget::alert::render::utc(state.at_ms.unwrap());
    assert_eq!(
        f.telegram.count(&format!(
            "<b>Ends:</b> the kill of {kill_at} (lasted 0 s) by consecutive failures: 3 consecutive task failures (threshold 3)"
        )) + f.telegram.count(&format!("<b>Ends:</b> the kill of {kill_at} (lasted 1 s) by consecutive failures")),
        1,
        "{:?}",
        f.telegram.seen.lock().unwrap().accepted
    );
    {
        let seen = f.webhook.seen.lock().unwrap();
        let resumed = seen.accepted.iter().find(|v| v["type"] == "alert.resumed").unwrap();
        let kill = seen.accepted.iter().find(|v| v["type"] == "alert.kill_engaged").unwrap();
        assert_eq!(resumed["data"]["ends"]["engagement"], kill["data"]["details"]["engagement"]);
        assert_eq!(resumed["data"]["ends"]["at_ms"], state.at_ms.unwrap());
        assert_eq!(resumed["data"]["ends"]["cause"]["trigger"], "consecutive_failures");
        assert_eq!(kill["data"]["deployment"], "staging");
        assert_eq!(resumed["data"]["cause"]["trigger"], "operator");
        assert_eq!(resumed["data"]["cause"]["operator"], "bob", "the admin who resumed");
    }
    // A second engagement gets its own epoch and its own alert.
    // By an admin whose name the orchestrator passes on (the subject of their token).
    let pause = ControlPause { epoch: 0, reason: "drill".into(), by: Some("alice".into()) };
    f.send(StreamName::control(Role::Budget).as_str(), pause.into(), None).await;
    eventually("engaged again", Duration::from_secs(10), async || f.state().await.engaged).await;
    assert_eq!(f.state().await.epoch, 2);
    assert_eq!(f.state().await.by.as_deref(), Some("alice"));
    eventually("the second kill alert", Duration::from_secs(20), async || f.telegram.kills() == 2).await;
    assert_eq!(f.telegram.count("<b>By:</b> alice (operator, via orchestrator-0)"), 1);
    assert_eq!(f.telegram.count("<b>Why:</b> drill"), 1);
    drop(budget);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_error_kind_engages_the_switch() {
    let mut f = fleet().await;
    let budget = f.start_budget();
    wait_up(&f, &budget).await;
    f.outcome(Status::Error, Some("sandbox_oom")).await;
    f.outcome(Status::Success, None).await;
    eventually("the outcomes are counted", Duration::from_secs(10), async || {
        let v: Option<u64> =
            redis::cmd("GET").arg(budget::killswitch::FAILURES_KEY).query_async(&mut f.conn().await).await.unwrap();
        v == Some(0)
    })
    .await;
    assert!(!f.state().await.engaged, "a known kind does not engage");
    f.outcome(Status::Error, Some("cosmic_ray")).await;
    eventually("the switch is engaged", Duration::from_secs(10), async || f.state().await.engaged).await;
    assert!(f.state().await.reason.unwrap().contains("unknown error kind \"cosmic_ray\""));
    drop(budget);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_kill_takes_the_orchestrators_epoch_and_an_alert_waits_for_its_endpoint_across_a_restart() {
    let mut f = fleet().await;
    f.telegram.set_down(true);
    f.webhook.set_down(true);
    let mut budget = f.start_budget();
    wait_up(&f, &budget).await;
    // The orchestrator's kill raised its epoch to 7 and tells the budget.
    f.send(
        StreamName::control(Role::Budget).as_str(),
        ControlPause { epoch: 7, reason: "operator drill".into(), by: Some("carol".into()) }.into(),
        None,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f.state().await.engaged {
        if tokio::time::Instant::now() > deadline {
            let out = std::fs::read_to_string(&budget.log).unwrap_or_default()
                + &std::fs::read_to_string(budget.log.with_extension("err")).unwrap_or_default();
            panic!("timed out waiting until engaged; the budget process said:\n{out}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(f.state().await.epoch, 7);
    eventually("the endpoints were tried while down", Duration::from_secs(20), async || {
        f.telegram.seen.lock().unwrap().refused_while_down >= 2
            && f.webhook.seen.lock().unwrap().refused_while_down >= 2
    })
    .await;
    // The budget dies with the alert undelivered; the endpoints come back; a new budget starts.
    budget.kill();
    f.telegram.set_down(false);
    f.webhook.set_down(false);
    let budget = f.start_budget();
    eventually("the alert is delivered after the restart", Duration::from_secs(30), async || {
        f.telegram.kills() == 1 && f.webhook.kills() == 1
    })
    .await;
    // On start it sent the pauses again (idempotent for listeners): same epoch, same reason.
    eventually("pauses re-sent", Duration::from_secs(10), async || pauses(&f.controls(Role::Dev).await) == [7, 7])
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!((f.telegram.kills(), f.webhook.kills()), (1, 1), "one alert per engagement, also across the restart");
    assert_eq!(f.telegram.count("<b>By:</b> carol (operator, via orchestrator-0)"), 1, "the admin, from the record");
    drop(budget);
}

/// The orchestrator's `incident.opened` becomes one alert on every channel, naming what it
/// froze and the command to look at it, even when the envelope is delivered twice; it does
/// not pull the kill switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_the_orchestrator_opened_is_alerted_once_with_what_it_froze_and_the_command() {
    let mut f = fleet().await;
    let budget = f.start_budget();
    wait_up(&f, &budget).await;
    let (id, task) = (Uuid::now_v7(), Uuid::now_v7());
    let opened = IncidentOpened {
        incident: id,
        severity: "critical".into(),
        trigger: "secret_after_approval".into(),
        title: "Approved change carries a credential (src/calc.py:3) <b>".into(),
        repository: Some("https://git.example/app.git".into()),
        freezes_merges: true,
        opened_at_ms: bus::now_ms(),
        opened_by: "orchestrator/orchestrator-0".into(),
        tasks: vec![task],
    };
    for _ in 0..2 {
        f.send(StreamName::control(Role::Budget).as_str(), opened.clone().into(), None).await;
    }
    let show = format!("fleetctl incident show {id}");
    eventually("the incident alert on both channels", Duration::from_secs(20), async || {
        f.telegram.count(&show) >= 1 && f.webhook.count("alert.incident") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(f.telegram.count(&show), 1, "once: {:?}", f.telegram.seen.lock().unwrap().accepted);
    assert_eq!(f.webhook.count("alert.incident"), 1);
    let text = f.telegram.seen.lock().unwrap().accepted[0]["text"].as_str().unwrap().to_owned();
    assert!(text.contains("INCIDENT CRITICAL"), "{text}");
    assert!(text.contains("merges to https://git.example/app.git frozen"), "{text}");
    assert!(text.contains("&lt;b&gt;"), "the title is escaped: {text}");
    assert!(!text.contains("<b>\n") && !text.contains("credential (src/calc.py:3) <b>"), "{text}");
    {
        let seen = f.webhook.seen.lock().unwrap();
        let a = seen.accepted.iter().find(|v| v["type"] == "alert.incident").unwrap();
        assert_eq!(a["data"]["incident"]["id"], id.to_string(), "{a}");
        assert_eq!(a["data"]["incident"]["trigger"], "secret_after_approval", "{a}");
        assert_eq!(a["data"]["affected"]["tasks"][0], task.to_string(), "{a}");
        assert_eq!(a["data"]["affected"]["frozen_repository"], "https://git.example/app.git", "{a}");
    }
    assert!(!f.state().await.engaged, "an incident alerts; it does not pull the kill switch");
    drop(budget);
}
