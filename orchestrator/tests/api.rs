//! The HTTP API against a real Postgres and a real Redis, driven through
//! `router(..).oneshot(..)` without a socket: authentication and roles, the intake rate
//! limit, input errors, the task lifecycle with the kill switch, health, readiness and
//! metrics.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use envelope::{Instance, Keyring, MasterFile, MasterSecret, PermissionTable, Process, Role};
use fleet_testkit::{Postgres, RedisServer};
use orchestrator::api::auth::{AUDIENCE, ApiRole, Claims, ISSUER, TokenKeys};
use orchestrator::api::{self, ApiConfig, ApiState};
use orchestrator::audit::AuditKey;
use orchestrator::tasks::{Engine, EngineConfig};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;

const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";
const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

struct App {
    router: Router,
    keys: TokenKeys,
    pool: PgPool,
    redis: RedisServer,
    _pg: Postgres,
}

fn engine(pool: PgPool) -> Engine {
    let keyring = Keyring::derive(
        &MasterFile::new(MasterSecret::from_bytes([1; 32])),
        Process::Role(Role::Orchestrator),
        &PermissionTable::parse(PERMISSIONS).unwrap(),
    )
    .unwrap();
    Engine::new(
        pool,
        Arc::new(keyring),
        AuditKey::new(vec![7; 32]).unwrap(),
        EngineConfig::new(Instance::parse("orchestrator-0").unwrap()),
    )
}

async fn app(tune: impl FnOnce(&mut ApiConfig)) -> App {
    let pg = Postgres::start().expect("postgres must be installed; tests never skip");
    let redis = RedisServer::start().expect("redis-server must be installed; tests never skip");
    let url = pg.create_database().unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    orchestrator::db::migrate(&pool).await.unwrap();
    let redis_pool = bus::pool(&SecretString::from(redis.url()), 4, Duration::from_secs(1)).unwrap();
    let mut config = ApiConfig::new(SecretString::from(SECRET));
    tune(&mut config);
    let state = ApiState::new(engine(pool.clone()), redis_pool, &config).unwrap();
    App { router: api::router(state), keys: TokenKeys::new(&SecretString::from(SECRET)).unwrap(), pool, redis, _pg: pg }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `error` of a JSON error body (and insists it is one).
    fn error(&self) -> String {
        let v = self.json();
        v["error"].as_str().unwrap_or_else(|| panic!("no `error` in {v}")).to_owned()
    }
}

impl App {
    fn token(&self, role: ApiRole, sub: &str) -> String {
        self.keys.issue(sub, role, Duration::from_secs(600)).unwrap()
    }

    async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Body>) -> Answer {
        call(&self.router, method, uri, token, body).await
    }

    async fn submit(&self, token: &str, title: &str) -> Answer {
        let body = json!({"title": title, "instructions": "Add input validation to login()"});
        self.call(Method::POST, "/v1/tasks", Some(token), Some(json_body(&body))).await
    }
}

fn json_body(v: &Value) -> Body {
    Body::from(v.to_string())
}

async fn call(router: &Router, method: Method, uri: &str, token: Option<&str>, body: Option<Body>) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let resp = router.clone().oneshot(req.body(body.unwrap_or_else(Body::empty)).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    Answer { status, headers, text: String::from_utf8(bytes.to_vec()).unwrap() }
}

fn claims(sub: &str, role: ApiRole) -> Claims {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    Claims { sub: sub.into(), role, iat: now, exp: now + 600, iss: ISSUER.into(), aud: AUDIENCE.into() }
}

#[tokio::test]
async fn tokens_and_roles_are_checked_before_anything_else() {
    let app = app(|_| {}).await;

    let none = app.call(Method::GET, "/v1/tasks", None, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(none.headers[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));
    assert!(none.error().contains("no bearer token"), "{}", none.text);

    let req =
        Request::get("/v1/tasks").header(header::AUTHORIZATION, "Basic YWxpY2U6cHc=").body(Body::empty()).unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Bearer"));

    let foreign = TokenKeys::new(&SecretString::from("another-secret-0123456789abcdef0123456789")).unwrap();
    let forged = foreign.issue("mallory", ApiRole::Admin, Duration::from_secs(600)).unwrap();
    let bad_sig = app.call(Method::GET, "/v1/tasks", Some(&forged), None).await;
    assert_eq!(bad_sig.status, StatusCode::UNAUTHORIZED);
    assert!(bad_sig.error().contains("signature"), "{}", bad_sig.text);
    assert!(bad_sig.headers[header::WWW_AUTHENTICATE].to_str().unwrap().contains("invalid_token"));

    let mut old = claims("alice", ApiRole::Admin);
    old.iat -= 7200;
    old.exp -= 7200;
    let expired = app.call(Method::GET, "/v1/tasks", Some(&app.keys.issue_claims(&old).unwrap()), None).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert!(expired.error().contains("expired"), "{}", expired.text);

    let mut elsewhere = claims("alice", ApiRole::Admin);
    elsewhere.aud = "some-other-api".into();
    let wrong_aud = app.call(Method::GET, "/v1/tasks", Some(&app.keys.issue_claims(&elsewhere).unwrap()), None).await;
    assert_eq!(wrong_aud.status, StatusCode::UNAUTHORIZED);
    assert!(wrong_aud.error().contains("audience"), "{}", wrong_aud.text);

    let garbage = app.call(Method::GET, "/v1/tasks", Some("not-a-token"), None).await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
    assert!(garbage.error().contains("malformed"), "{}", garbage.text);

    let viewer = app.token(ApiRole::Viewer, "vera");
    assert_eq!(app.call(Method::GET, "/v1/tasks", Some(&viewer), None).await.status, StatusCode::OK);
    let denied = app.submit(&viewer, "nope").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert!(denied.error().contains("operator role"), "{}", denied.text);

    let operator = app.token(ApiRole::Operator, "olga");
    let kill = app.call(Method::POST, "/v1/kill", Some(&operator), Some(json_body(&json!({"reason": "x"})))).await;
    assert_eq!(kill.status, StatusCode::FORBIDDEN);
    assert!(kill.error().contains("admin role"), "{}", kill.text);
    let resume = app.call(Method::POST, "/v1/resume", Some(&operator), None).await;
    assert_eq!(resume.status, StatusCode::FORBIDDEN);

    // A forbidden request changed nothing.
    let (_, halted): (i64, bool) =
        sqlx::query_as("SELECT kill_epoch, halted FROM fleet_state").fetch_one(&app.pool).await.unwrap();
    assert!(!halted);
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&app.pool).await.unwrap();
    assert_eq!(tasks, 0);
}

#[tokio::test]
async fn intake_is_rate_limited_per_client_and_fails_closed_without_redis() {
    let mut app = app(|c| {
        c.rate_limit_burst = 3;
        c.rate_limit_per_second = 0.05;
    })
    .await;
    let alice = app.token(ApiRole::Operator, "alice");
    for i in 0..3 {
        let a = app.submit(&alice, &format!("task {i}")).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    }
    let limited = app.submit(&alice, "one too many").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "{}", limited.text);
    let retry: u64 = limited.headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    assert!(limited.error().contains("too many task submissions"), "{}", limited.text);

    // Reads are not limited, and another client has a bucket of its own.
    assert_eq!(app.call(Method::GET, "/v1/tasks", Some(&alice), None).await.status, StatusCode::OK);
    let bob = app.token(ApiRole::Admin, "bob");
    assert_eq!(app.submit(&bob, "bob's").await.status, StatusCode::CREATED);

    app.redis.stop();
    let down = app.submit(&bob, "while redis is down").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{}", down.text);
    assert!(down.error().contains("rate limiter"), "{}", down.text);
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&app.pool).await.unwrap();
    assert_eq!(tasks, 4);
}

#[tokio::test]
async fn bad_input_gets_a_json_error_that_says_what_is_wrong() {
    let app = app(|_| {}).await;
    let op = app.token(ApiRole::Operator, "olga");
    let post = |body: Body| app.call(Method::POST, "/v1/tasks", Some(&op), Some(body));

    let syntax = post(Body::from("{\"title\": ")).await;
    assert_eq!(syntax.status, StatusCode::BAD_REQUEST);
    assert!(syntax.error().contains("not valid JSON"), "{}", syntax.text);

    let unknown = post(json_body(&json!({"title": "t", "instructions": "i", "colour": "red"}))).await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(unknown.error().contains("unknown field `colour`"), "{}", unknown.text);

    let wrong_type = post(json_body(&json!({"title": 5, "instructions": "i"}))).await;
    assert_eq!(wrong_type.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(wrong_type.error().contains("title"), "{}", wrong_type.text);

    let missing = post(json_body(&json!({"title": "t"}))).await;
    assert_eq!(missing.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(missing.error().contains("instructions"), "{}", missing.text);

    let bad_risk = post(json_body(&json!({"title": "t", "instructions": "i", "risk": "EXTREME"}))).await;
    assert_eq!(bad_risk.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad_risk.error().contains("EXTREME"), "{}", bad_risk.text);

    let empty_title = post(json_body(&json!({"title": "  ", "instructions": "i"}))).await;
    assert_eq!(empty_title.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(empty_title.error().contains("`title`"), "{}", empty_title.text);

    let huge = "x".repeat(300 * 1024);
    let too_big = post(json_body(&json!({"title": "t", "instructions": huge}))).await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(too_big.error().contains("larger than"), "{}", too_big.text);

    let req = Request::post("/v1/tasks")
        .header(header::AUTHORIZATION, format!("Bearer {op}"))
        .body(Body::from("{}"))
        .unwrap();
    let no_type = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(no_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let bad_id = app.call(Method::GET, "/v1/tasks/not-a-uuid", Some(&op), None).await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST);
    assert!(bad_id.error().contains("not a task id"), "{}", bad_id.text);
    let bad_approve = app.call(Method::POST, "/v1/tasks/123/approve", Some(&op), None).await;
    assert_eq!(bad_approve.status, StatusCode::BAD_REQUEST);

    let unknown_task = app.call(Method::GET, "/v1/tasks/0190a5e2-7c1d-7b3e-9f00-1a2b3c4d5e6f", Some(&op), None).await;
    assert_eq!(unknown_task.status, StatusCode::NOT_FOUND);
    assert!(unknown_task.error().contains("not found"), "{}", unknown_task.text);

    let bad_state = app.call(Method::GET, "/v1/tasks?state=sleeping", Some(&op), None).await;
    assert_eq!(bad_state.status, StatusCode::BAD_REQUEST);
    assert!(bad_state.error().contains("unknown task state"), "{}", bad_state.text);
    let bad_limit = app.call(Method::GET, "/v1/tasks?limit=lots", Some(&op), None).await;
    assert_eq!(bad_limit.status, StatusCode::BAD_REQUEST);
    assert!(bad_limit.error().contains("limit"), "{}", bad_limit.text);
    let typo = app.call(Method::GET, "/v1/tasks?stat=dev", Some(&op), None).await;
    assert_eq!(typo.status, StatusCode::BAD_REQUEST);
    assert!(typo.error().contains("stat"), "{}", typo.text);

    let admin = app.token(ApiRole::Admin, "ada");
    let no_reason = app.call(Method::POST, "/v1/kill", Some(&admin), Some(json_body(&json!({})))).await;
    assert_eq!(no_reason.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(no_reason.error().contains("reason"), "{}", no_reason.text);
    let blank_reason = app.call(Method::POST, "/v1/kill", Some(&admin), Some(json_body(&json!({"reason": " "})))).await;
    assert_eq!(blank_reason.status, StatusCode::UNPROCESSABLE_ENTITY);
    let no_body = app.call(Method::POST, "/v1/kill", Some(&admin), None).await;
    assert_eq!(no_body.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    no_body.error();

    let nowhere = app.call(Method::GET, "/v2/everything", Some(&op), None).await;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    assert!(nowhere.error().contains("no route"), "{}", nowhere.text);
    let wrong_method = app.call(Method::DELETE, "/v1/tasks", Some(&op), None).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    wrong_method.error();

    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&app.pool).await.unwrap();
    assert_eq!(tasks, 0, "no bad request created a task");
}

#[tokio::test]
async fn submit_list_approve_kill_and_resume() {
    let app = app(|_| {}).await;
    let op = app.token(ApiRole::Operator, "olga");
    let viewer = app.token(ApiRole::Viewer, "vera");
    let admin = app.token(ApiRole::Admin, "ada");

    let created = app.submit(&op, "Validate login input").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let task = created.json();
    let id = task["id"].as_str().unwrap().to_owned();
    assert_eq!(task["state"], "dev");
    assert_eq!(task["risk"], "LOW");
    assert_eq!(task["submitted_by"], "olga");
    assert_eq!(created.headers[header::LOCATION], format!("/v1/tasks/{id}").as_str());

    let got = app.call(Method::GET, &format!("/v1/tasks/{id}"), Some(&viewer), None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["state"], "dev");
    assert_eq!(got.json()["title"], "Validate login input");

    let in_dev = app.call(Method::GET, "/v1/tasks?state=dev&limit=10", Some(&viewer), None).await;
    assert_eq!(in_dev.status, StatusCode::OK);
    let listed = in_dev.json()["tasks"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    let in_qa = app.call(Method::GET, "/v1/tasks?state=qa", Some(&viewer), None).await;
    assert!(in_qa.json()["tasks"].as_array().unwrap().is_empty());

    // A LOW task in dev does not wait for approval.
    let early = app
        .call(Method::POST, &format!("/v1/tasks/{id}/approve"), Some(&op), Some(json_body(&json!({"reason": "lgtm"}))))
        .await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{}", early.text);
    assert!(early.error().contains("approve") && early.error().contains("`dev`"), "{}", early.text);
    let no_body = app.call(Method::POST, &format!("/v1/tasks/{id}/approve"), Some(&op), None).await;
    assert_eq!(no_body.status, StatusCode::CONFLICT, "an empty body is an approval without a reason");
    let unknown = app
        .call(Method::POST, &format!("/v1/tasks/{id}/approve"), Some(&op), Some(json_body(&json!({"why": "x"}))))
        .await;
    assert_eq!(unknown.status, StatusCode::UNPROCESSABLE_ENTITY);

    let killed =
        app.call(Method::POST, "/v1/kill", Some(&admin), Some(json_body(&json!({"reason": "runaway spend"})))).await;
    assert_eq!(killed.status, StatusCode::OK, "{}", killed.text);
    assert_eq!(killed.json(), json!({"kill_epoch": 1, "halted": true}));
    let halted = app.call(Method::GET, &format!("/v1/tasks/{id}"), Some(&viewer), None).await;
    assert_eq!(halted.json()["state"], "halted");
    let again = app.call(Method::POST, "/v1/kill", Some(&admin), Some(json_body(&json!({"reason": "again"})))).await;
    assert_eq!(again.json(), json!({"kill_epoch": 1, "halted": true}), "kill is idempotent");

    let refused = app.submit(&op, "during the halt").await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert!(refused.error().contains("halted"), "{}", refused.text);
    let approve_halted = app.call(Method::POST, &format!("/v1/tasks/{id}/approve"), Some(&op), None).await;
    assert_eq!(approve_halted.status, StatusCode::CONFLICT);

    let resumed = app.call(Method::POST, "/v1/resume", Some(&admin), None).await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text);
    assert_eq!(resumed.json(), json!({"kill_epoch": 1, "halted": false}));
    let back = app.call(Method::GET, &format!("/v1/tasks/{id}"), Some(&viewer), None).await;
    assert_eq!(back.json()["state"], "dev");
    assert_eq!(app.submit(&op, "after the resume").await.status, StatusCode::CREATED);

    // The operator's name is the actor in the audit trail.
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT actor_instance FROM audit_trail WHERE action IN ('task.submit', 'fleet.kill', 'fleet.resume')",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert!(actors.contains(&"olga".to_owned()) && actors.contains(&"ada".to_owned()), "{actors:?}");
}

#[tokio::test]
async fn health_readiness_metrics_and_timeouts() {
    let app = app(|c| c.request_timeout_secs = 1).await;
    let op = app.token(ApiRole::Operator, "olga");
    assert_eq!(app.submit(&op, "one").await.status, StatusCode::CREATED);
    assert_eq!(app.submit(&op, "two").await.status, StatusCode::CREATED);

    let health = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);

    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = metrics.text;
    assert!(text.contains("fleet_tasks{state=\"dev\"} 2"), "{text}");
    assert!(text.contains("fleet_tasks{state=\"merged\"} 0"), "{text}");
    assert!(text.contains("fleet_api_requests_total{method=\"POST\",route=\"/v1/tasks\",status=\"201\"} 2"), "{text}");
    assert!(text.contains("fleet_api_requests_total{method=\"GET\",route=\"/readyz\",status=\"200\"} 1"), "{text}");
    assert!(text.contains("fleet_kill_epoch 0") && text.contains("fleet_halted 0") && text.contains("fleet_db_up 1"));
    // No relay runs here: both tasks' assignments wait in the outbox.
    assert!(text.contains("\nfleet_outbox_backlog 2\n"), "{text}");
    let age: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fleet_outbox_oldest_age_seconds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no outbox age: {text}"));
    assert!((0.0..60.0).contains(&age), "{text}");
    assert!(text.contains("fleet_build_info{binary=\"orchestrator\""), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // A request that outlives the timeout: the kill waits for a row another transaction holds.
    let mut blocker = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM fleet_state FOR UPDATE").execute(&mut *blocker).await.unwrap();
    let admin = app.token(ApiRole::Admin, "ada");
    let slow = app.call(Method::POST, "/v1/kill", Some(&admin), Some(json_body(&json!({"reason": "slow"})))).await;
    assert_eq!(slow.status, StatusCode::SERVICE_UNAVAILABLE, "{}", slow.text);
    assert!(slow.error().contains("request_timeout_secs"), "{}", slow.text);
    blocker.rollback().await.unwrap();
    let (_, halted): (i64, bool) =
        sqlx::query_as("SELECT kill_epoch, halted FROM fleet_state").fetch_one(&app.pool).await.unwrap();
    assert!(!halted, "the cut-off kill was rolled back");

    // An API whose database is gone: alive, not ready.
    let dead = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    let redis_pool = bus::pool(&SecretString::from(app.redis.url()), 2, Duration::from_secs(1)).unwrap();
    let state = ApiState::new(engine(dead), redis_pool, &ApiConfig::new(SecretString::from(SECRET))).unwrap();
    let orphan = api::router(state);
    assert_eq!(call(&orphan, Method::GET, "/healthz", None, None).await.status, StatusCode::OK);
    let not_ready = call(&orphan, Method::GET, "/readyz", None, None).await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(not_ready.error().contains("Postgres"), "{}", not_ready.text);
    let partial = call(&orphan, Method::GET, "/metrics", None, None).await;
    assert_eq!(partial.status, StatusCode::OK);
    assert!(partial.text.contains("fleet_db_up 0"), "{}", partial.text);
    let failed = call(&orphan, Method::GET, "/v1/tasks", Some(&op), None).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!failed.error().contains("127.0.0.1"), "internal causes stay in the log: {}", failed.text);
}
