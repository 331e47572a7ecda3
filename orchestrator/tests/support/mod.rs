//! What the security tests of the orchestrator share: the HTTP API over a real Postgres and
//! a real Redis (`router(..).oneshot(..)`, no socket), and workers' results sealed with the
//! workers' keys, so a task moves through its steps exactly as in production.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use envelope::*;
use fleet_testkit::{Postgres, RedisServer};
use orchestrator::api::auth::{ApiRole, TokenKeys};
use orchestrator::api::{self, ApiConfig, ApiState};
use orchestrator::audit::AuditKey;
use orchestrator::tasks::{Applied, Engine, EngineConfig};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt;

const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";
const PERMISSIONS: &str = include_str!("../../../config/permissions.toml");

fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([5; 32]))
}

/// The keyring of `role`'s process.
pub fn ring(role: Role) -> Keyring {
    Keyring::derive(&master(), Process::Role(role), &PermissionTable::parse(PERMISSIONS).unwrap()).unwrap()
}

/// `frame` from `stream`, verified as `role`'s process would.
pub fn verify_as(role: Role, stream: &str, frame: &[u8]) -> Verified {
    let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
    verifier(role).verify(stream, frame, ctx, &mut MemoryReplayGuard::new()).unwrap()
}

fn verifier(role: Role) -> Verifier {
    Verifier::new(ring(role), PermissionTable::parse(PERMISSIONS).unwrap(), VerifierConfig::default())
}

/// The API and the engine behind it, on servers of their own.
pub struct App {
    pub router: Router,
    pub engine: Engine,
    pub keys: TokenKeys,
    pub pool: PgPool,
    /// A pool on the Redis the API uses.
    pub redis: bus::RedisPool,
    _redis: RedisServer,
    _pg: Postgres,
}

/// Starts Postgres and Redis, migrates, and builds the API with `tune`d engine settings.
pub async fn app(tune: impl FnOnce(&mut EngineConfig)) -> App {
    let pg = Postgres::start().expect("postgres must be installed; tests never skip");
    let redis = RedisServer::start().expect("redis-server must be installed; tests never skip");
    let url = pg.create_database().unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    orchestrator::db::migrate(&pool).await.unwrap();
    let mut cfg = EngineConfig::new(Instance::parse("orchestrator-0").unwrap());
    tune(&mut cfg);
    let engine =
        Engine::new(pool.clone(), Arc::new(ring(Role::Orchestrator)), AuditKey::new(vec![7; 32]).unwrap(), cfg);
    let redis_pool = bus::pool(&SecretString::from(redis.url()), 4, Duration::from_secs(1)).unwrap();
    let state = ApiState::new(engine.clone(), redis_pool.clone(), &ApiConfig::new(SecretString::from(SECRET))).unwrap();
    App {
        router: api::router(state),
        engine,
        keys: TokenKeys::new(&SecretString::from(SECRET)).unwrap(),
        pool,
        redis: redis_pool,
        _redis: redis,
        _pg: pg,
    }
}

/// An HTTP answer.
pub struct Answer {
    pub status: StatusCode,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

impl App {
    pub fn token(&self, role: ApiRole, sub: &str) -> String {
        self.keys.issue(sub, role, Duration::from_secs(600)).unwrap()
    }

    pub async fn call(&self, method: Method, uri: &str, token: &str, body: Option<&Value>) -> Answer {
        let mut req =
            Request::builder().method(method).uri(uri).header(header::AUTHORIZATION, format!("Bearer {token}"));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let resp = self.router.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await.unwrap();
        Answer { status, text: String::from_utf8(bytes.to_vec()).unwrap() }
    }

    /// The newest assignment on `fleet:tasks:<role>`, verified as the worker would.
    pub async fn last_assignment(&self, role: Role) -> Verified {
        let stream = format!("fleet:tasks:{role}");
        let frame: Vec<u8> = sqlx::query_scalar("SELECT frame FROM outbox WHERE stream = $1 ORDER BY id DESC LIMIT 1")
            .bind(&stream)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("nothing sent on {stream}: {e}"));
        let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
        verifier(role).verify(&stream, &frame, ctx, &mut MemoryReplayGuard::new()).unwrap()
    }

    /// `role`'s worker answers its current assignment with `status`, `summary` and
    /// `findings`; the engine applies it as the orchestrator's consumer would.
    pub async fn step(&self, role: Role, status: Status, summary: &str, findings: &[&str]) -> Applied {
        let assign = self.last_assignment(role).await;
        // As a worker does: the result names the change it was given.
        let judged = match &assign.payload {
            Payload::TaskAssign(a) => a.change.as_deref().map(|c| changeset::ChangeId::of(c).to_string()),
            _ => None,
        };
        let mut env = Envelope::new(
            Sender { role, instance: Instance::parse(&format!("{role}-1")).unwrap() },
            Role::Orchestrator,
            bus::now_ms(),
            60_000,
            0,
            TaskResult {
                attempt: 1,
                status,
                summary: summary.to_owned(),
                findings: findings.iter().map(|s| (*s).to_owned()).collect(),
                diff: (role == Role::Dev).then(|| b"--- a/x\n+++ b/x\n".to_vec()),
                log: None,
                change_sha256: judged,
                calls: Vec::new(),
                containment: Vec::new(),
            }
            .into(),
        );
        env.task_id = assign.task_id;
        env.causation_id = Some(assign.id);
        self.engine.apply_result(&deliver(&env, streams::RESULTS)).await.unwrap()
    }
}

/// Seals as the sender and verifies as the orchestrator: the only way to get a `Verified`.
pub fn deliver(env: &Envelope, stream: &str) -> Verified {
    let wire = ring(env.from.role).seal(env).unwrap();
    verifier(Role::Orchestrator)
        .verify(stream, &wire, VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 }, &mut MemoryReplayGuard::new())
        .unwrap()
}
