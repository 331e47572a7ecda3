//! The HTTP API commands through the real binary, against the real API served on
//! 127.0.0.1:0 in this test's runtime (Postgres and Redis from fleet-testkit).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envelope::{Instance, Keyring, MasterFile, MasterSecret, PermissionTable, Process, Role};
use orchestrator::api::{self, ApiConfig, ApiState};
use orchestrator::audit::AuditKey;
use orchestrator::tasks::{Engine, EngineConfig};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::PgPool;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const EX_USAGE: i32 = 64;
const SECRET: &str = "5f1c0e9a7b3d2f4e6a8c0b1d3f5e7a9c5f1c0e9a7b3d2f4e6a8c0b1d3f5e7a9c";
const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `FLEET_TOKEN` set to `token` (in the child only).
async fn fleetctl(dir: &Path, api: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    cmd.args(args).current_dir(dir).env("FLEET_API_URL", api).env_remove("FLEET_TOKEN");
    if let Some(t) = token {
        cmd.env("FLEET_TOKEN", t);
    }
    let out = cmd.output().await.unwrap();
    let out = Output {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    if let Some(t) = token {
        assert!(!out.stdout.contains(t) && !out.stderr.contains(t), "the token was printed by {args:?}");
    }
    out
}

async fn ok(dir: &Path, api: &str, token: Option<&str>, args: &[&str]) -> String {
    let out = fleetctl(dir, api, token, args).await;
    assert_eq!(out.code, 0, "{args:?} failed: {}", out.stderr);
    out.stdout
}

async fn fails(dir: &Path, api: &str, token: Option<&str>, args: &[&str], code: i32, needle: &str) {
    let out = fleetctl(dir, api, token, args).await;
    assert_eq!(out.code, code, "{args:?}: stdout {} stderr {}", out.stdout, out.stderr);
    assert!(out.stderr.contains(needle), "{args:?}: expected {needle:?} in {}", out.stderr);
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

/// The API on 127.0.0.1:0 over a migrated database of its own.
struct Served {
    pg: fleet_testkit::Postgres,
    _redis: fleet_testkit::RedisServer,
    /// The database's URL as created (no password).
    plain: String,
    pool: PgPool,
    url: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start() -> Self {
        let pg = fleet_testkit::Postgres::start().expect("postgres must be installed; tests never skip");
        let redis = fleet_testkit::RedisServer::start().expect("redis-server must be installed; tests never skip");
        let plain = pg.create_database().unwrap();
        let pool = PgPool::connect(&plain).await.unwrap();
        orchestrator::db::migrate(&pool).await.unwrap();
        let redis_pool = bus::pool(&SecretString::from(redis.url()), 4, Duration::from_secs(1)).unwrap();
        let state =
            ApiState::new(engine(pool.clone()), redis_pool, &ApiConfig::new(SecretString::from(SECRET))).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(api::serve(listener, api::router(state), shutdown.clone()));
        Self { pg, _redis: redis, plain, pool, url, shutdown, server }
    }
}

#[tokio::test]
async fn tokens_tasks_and_the_kill_switch_through_the_binary() {
    // Every field bound (a `..` would drop the servers at once).
    let Served { pg: _pg, _redis, plain: _plain, pool, url, shutdown, server } = Served::start().await;

    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let api = url.as_str();
    fs::write(dir.join("jwt.secret"), format!("{SECRET}\n")).unwrap();
    fs::set_permissions(dir.join("jwt.secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let issue = |role: &'static str, sub: &'static str| {
        let args = ["token", "issue", "--role", role, "--sub", sub, "--ttl", "10m", "--secret-file", "jwt.secret"];
        async move { ok(dir, api, None, &args).await.trim().to_owned() }
    };
    let operator = issue("operator", "alice").await;
    let viewer = issue("viewer", "vera").await;
    let admin = issue("admin", "ada").await;
    assert_eq!(operator.split('.').count(), 3, "a JWT: {operator}");

    // Submit, then find the task in the table, by id, and as JSON.
    fs::write(
        dir.join("task.json"),
        r#"{"title": "Validate login input", "instructions": "Add input validation to login()", "risk": "LOW"}"#,
    )
    .unwrap();
    let submitted = ok(dir, api, Some(&operator), &["submit", "task.json"]).await;
    let (id, state) = submitted.trim().split_once(' ').unwrap();
    assert_eq!(state, "dev", "{submitted}");
    uuid::Uuid::parse_str(id).unwrap();

    let table = ok(dir, api, Some(&viewer), &["tasks", "--state", "dev"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("STATE") && lines[0].ends_with("TITLE"), "{table}");
    assert!(lines[1].starts_with(id) && lines[1].contains(" dev ") && lines[1].ends_with("Validate login input"));
    assert_eq!(ok(dir, api, Some(&viewer), &["tasks", "--state", "qa"]).await, "no tasks\n");
    let listed: Value = serde_json::from_str(&ok(dir, api, Some(&viewer), &["tasks", "--json"]).await).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id);

    let shown = ok(dir, api, Some(&viewer), &["task", id]).await;
    assert!(shown.contains(&format!("id:           {id}")), "{shown}");
    assert!(shown.contains("state:        dev") && shown.contains("submitted_by: alice"), "{shown}");
    assert!(shown.contains("instructions:\n  Add input validation to login()"), "{shown}");
    let json: Value = serde_json::from_str(&ok(dir, api, Some(&viewer), &["task", id, "--json"]).await).unwrap();
    assert_eq!(json["state"], "dev");

    // The operator's mistakes exit 64 with a message; refusals by the API exit 1 with its message.
    fs::write(dir.join("bad.json"), r#"{"title": "t", "instructions": "i", "colour": "red"}"#).unwrap();
    fails(dir, api, Some(&operator), &["submit", "bad.json"], EX_USAGE, "unknown field `colour`").await;
    fs::write(dir.join("empty-title.json"), r#"{"title": "", "instructions": "i"}"#).unwrap();
    fails(dir, api, Some(&operator), &["submit", "empty-title.json"], EX_USAGE, "`title` must be").await;
    fails(dir, api, Some(&operator), &["submit", "missing.json"], EX_USAGE, "cannot read task file").await;
    fails(dir, api, None, &["tasks"], EX_USAGE, "no API token").await;
    fails(dir, api, Some(&operator), &["task", "not-a-uuid"], EX_USAGE, "invalid").await;
    fails(dir, api, Some(&operator), &["tasks", "--state", "sleeping"], EX_USAGE, "unknown task state").await;
    fails(dir, api, Some(&admin), &["kill", "--reason", "   "], EX_USAGE, "`reason` must be").await;
    fails(dir, api, Some(&viewer), &["submit", "task.json"], 1, "operator role").await;
    fails(dir, api, Some(&operator), &["approve", id, "--reason", "lgtm"], 1, "cannot approve a task in state `dev`")
        .await;
    fails(dir, api, Some(&operator), &["kill", "--reason", "stop"], 1, "admin role").await;
    fails(dir, api, Some("not-a-token"), &["tasks"], 1, "malformed").await;
    fails(dir, "http://127.0.0.1:1", Some(&viewer), &["tasks"], 1, "cannot reach the API").await;

    // Token issuing refuses what would not work.
    let bad_role = ["token", "issue", "--role", "root", "--sub", "x", "--secret-file", "jwt.secret"];
    fails(dir, api, None, &bad_role, EX_USAGE, "unknown role").await;
    let bad_ttl = ["token", "issue", "--role", "viewer", "--sub", "x", "--ttl", "1w", "--secret-file", "jwt.secret"];
    fails(dir, api, None, &bad_ttl, EX_USAGE, "not a lifetime").await;
    let no_secret = ["token", "issue", "--role", "viewer", "--sub", "x", "--secret-file", "nope.secret"];
    fails(dir, api, None, &no_secret, EX_USAGE, "cannot read secret file").await;
    fs::write(dir.join("short.secret"), "too short").unwrap();
    let short = ["token", "issue", "--role", "viewer", "--sub", "x", "--secret-file", "short.secret"];
    fails(dir, api, None, &short, EX_USAGE, "at least 32 bytes").await;

    // A fresh secret from `token secret new` makes tokens this API refuses: another secret.
    ok(dir, api, None, &["token", "secret", "new", "--out", "new.secret"]).await;
    assert_eq!(fs::metadata(dir.join("new.secret")).unwrap().permissions().mode() & 0o777, 0o600);
    let foreign = ["token", "issue", "--role", "admin", "--sub", "x", "--secret-file", "new.secret"];
    let foreign = ok(dir, api, None, &foreign).await.trim().to_owned();
    fails(dir, api, Some(&foreign), &["tasks"], 1, "signature").await;
    fails(dir, api, None, &["token", "secret", "new", "--out", "new.secret"], EX_USAGE, "already exists").await;
    // The report says what the file is for: the API's secret mints admin tokens, the
    // lease secret does not.
    let report = ok(dir, api, None, &["token", "secret", "new", "--out", "api2.secret"]).await;
    assert!(report.contains("jwt_secret_file") && report.contains("admin token"), "{report}");
    let report = ok(dir, api, None, &["token", "secret", "new", "--for", "lease", "--out", "lease.secret"]).await;
    assert!(report.contains("lease_secret_file") && report.contains("mints no API token"), "{report}");
    assert!(!report.contains("can mint"), "{report}");
    assert_eq!(fs::metadata(dir.join("lease.secret")).unwrap().permissions().mode() & 0o777, 0o600);

    // The kill switch.
    assert_eq!(
        ok(dir, api, Some(&admin), &["kill", "--reason", "runaway spend"]).await,
        "fleet halted (kill epoch 1)\n"
    );
    assert!(ok(dir, api, Some(&viewer), &["task", id]).await.contains("state:        halted"));
    fails(dir, api, Some(&operator), &["submit", "task.json"], 1, "halted").await;
    assert_eq!(ok(dir, api, Some(&admin), &["resume"]).await, "fleet resumed (kill epoch 1)\n");
    assert!(ok(dir, api, Some(&viewer), &["task", id]).await.contains("state:        dev"));

    // A worker's question, listed and answered: the step is issued again.
    assert_eq!(ok(dir, api, Some(&viewer), &["questions"]).await, "no open questions\n");
    sqlx::query(
        "INSERT INTO questions (id, task_id, asked_by_role, asked_by_instance, text) VALUES ($1, $2::uuid, 'dev', 'dev-1', 'Which hash?')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let table = ok(dir, api, Some(&viewer), &["questions"]).await;
    let row = table.lines().nth(1).unwrap();
    assert!(row.starts_with(id) && row.contains(" dev/dev-1 ") && row.ends_with("Which hash?"), "{table}");
    let listed: Value = serde_json::from_str(&ok(dir, api, Some(&viewer), &["questions", "--json"]).await).unwrap();
    assert_eq!(listed[0]["task_id"], id);
    fails(dir, api, Some(&viewer), &["answer", id, "argon2id"], 1, "operator role").await;
    fails(dir, api, Some(&operator), &["answer", id, "  "], EX_USAGE, "the answer is empty").await;
    assert_eq!(ok(dir, api, Some(&operator), &["answer", id, "argon2id"]).await, format!("{id} dev attempt 2\n"));
    fails(dir, api, Some(&operator), &["answer", id, "again"], 1, "has no open question").await;

    // Retry only what failed; cancel what is unfinished, once.
    fails(dir, api, Some(&operator), &["retry", id], 1, "cannot retry a task in state `dev`").await;
    sqlx::query("UPDATE tasks SET state = 'failed', assignment_id = NULL WHERE id = $1::uuid")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let retried: Value =
        serde_json::from_str(&ok(dir, api, Some(&operator), &["retry", id, "--reason", "fixed", "--json"]).await)
            .unwrap();
    assert_eq!((retried["state"].as_str(), retried["retries"].as_i64()), (Some("dev"), Some(0)));
    fails(dir, api, Some(&viewer), &["cancel", id], 1, "operator role").await;
    assert_eq!(
        ok(dir, api, Some(&operator), &["cancel", id, "--reason", "duplicate"]).await,
        format!("{id} cancelled\n")
    );
    fails(dir, api, Some(&operator), &["cancel", id], 1, "cannot cancel a task in state `cancelled`").await;
    fails(dir, api, Some(&operator), &["cancel", "not-a-uuid"], EX_USAGE, "invalid").await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap().unwrap();
}

/// `fleetctl incident open|list|show|resolve` through the binary: an operator opens, a
/// viewer reads, only an admin resolves; the operator's mistakes exit 64.
#[tokio::test]
async fn incidents_through_the_binary() {
    let Served { pg, _redis, plain, pool, url, shutdown, server } = Served::start().await;
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let api = url.as_str();
    let keys = orchestrator::api::auth::TokenKeys::new(&SecretString::from(SECRET)).unwrap();
    let token = |role, sub: &str| keys.issue(sub, role, Duration::from_secs(600)).unwrap();
    use orchestrator::api::auth::ApiRole;
    let (viewer, olga, root) =
        (token(ApiRole::Viewer, "vera"), token(ApiRole::Operator, "olga"), token(ApiRole::Admin, "root"));

    assert_eq!(ok(dir, api, Some(&viewer), &["incident", "list"]).await, "no open incidents\n");
    fs::write(dir.join("details.json"), r#"{"sender": "dev/dev-2", "refused": 40}"#).unwrap();
    let opened = ok(
        dir,
        api,
        Some(&olga),
        &[
            "incident",
            "open",
            "--severity",
            "high",
            "--title",
            "dev-2 sends forged results",
            "--details",
            "details.json",
        ],
    )
    .await;
    let (id, rest) = opened.trim().split_once(' ').unwrap();
    assert_eq!(rest, "high open", "{opened}");
    let table = ok(dir, api, Some(&viewer), &["incident", "list"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "SEVERITY", "STATE", "FREEZES", "TRIGGER", "OPENED", "TITLE"]
    );
    assert!(lines[1].starts_with(id) && lines[1].contains(" high ") && lines[1].contains(" all "), "{table}");
    assert!(lines[1].ends_with("dev-2 sends forged results"), "{table}");
    let shown = ok(dir, api, Some(&viewer), &["incident", "show", id]).await;
    assert!(shown.contains("freezes      all") && shown.contains("opened") && shown.contains("by olga"), "{shown}");
    assert!(shown.contains(r#""refused":40"#), "{shown}");
    assert!(shown.contains(&format!("fleetctl incident resolve {id} --resolution")), "{shown}");

    // Mistakes the operator can fix, and refusals the API makes.
    fails(
        dir,
        api,
        Some(&olga),
        &["incident", "open", "--severity", "urgent", "--title", "x"],
        EX_USAGE,
        "invalid value 'urgent'",
    )
    .await;
    fails(
        dir,
        api,
        Some(&olga),
        &["incident", "open", "--severity", "low", "--title", " "],
        EX_USAGE,
        "--title is empty",
    )
    .await;
    fails(
        dir,
        api,
        Some(&olga),
        &["incident", "open", "--severity", "low", "--title", "x", "--fix", "do it"],
        EX_USAGE,
        "--fix needs --repository",
    )
    .await;
    fs::write(dir.join("list.json"), "[1]").unwrap();
    fails(
        dir,
        api,
        Some(&olga),
        &["incident", "open", "--severity", "low", "--title", "x", "--details", "list.json"],
        EX_USAGE,
        "must hold a JSON object",
    )
    .await;
    fails(dir, api, Some(&olga), &["incident", "resolve", id, "--resolution", "fixed"], 1, "admin").await;
    fails(dir, api, Some(&root), &["incident", "resolve", id, "--resolution", " "], EX_USAGE, "--resolution is empty")
        .await;

    assert_eq!(
        ok(dir, api, Some(&root), &["incident", "resolve", id, "--resolution", "dev-2 rebuilt, keys rotated"]).await,
        format!("{id} high resolved\n")
    );
    assert_eq!(ok(dir, api, Some(&viewer), &["incident", "list"]).await, "no open incidents\n");
    let all: Value =
        serde_json::from_str(&ok(dir, api, Some(&viewer), &["incident", "list", "--all", "--json"]).await).unwrap();
    assert_eq!(all[0]["resolved_by"], "root");
    fails(dir, api, Some(&root), &["incident", "resolve", id, "--resolution", "again"], 1, "already resolved").await;

    // A scheduled `audit verify --open-incident` that finds the trail rewritten opens a
    // critical incident that freezes every merge.
    let db_url =
        format!("postgres://postgres:s3cret-db-pw@127.0.0.1:{}/{}", pg.port(), plain.rsplit('/').next().unwrap());
    fs::write(dir.join("audit.key"), format!("{}\n", "07".repeat(32))).unwrap();
    fs::set_permissions(dir.join("audit.key"), fs::Permissions::from_mode(0o600)).unwrap();
    let verify = ["audit", "verify", "--database-url", &db_url, "--audit-key-file", "audit.key", "--open-incident"];
    assert!(ok(dir, api, Some(&olga), &verify).await.contains("intact"));
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE audit_trail DISABLE TRIGGER audit_no_update").execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE audit_trail SET details = '{\"title\": \"nothing happened\"}' WHERE seq = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let out = fleetctl(dir, api, Some(&olga), &verify).await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("the audit trail is broken at seq 1") && out.stderr.contains("opened incident"),
        "{}",
        out.stderr
    );
    let open: Value =
        serde_json::from_str(&ok(dir, api, Some(&viewer), &["incident", "list", "--json"]).await).unwrap();
    assert_eq!(open.as_array().unwrap().len(), 1, "{open}");
    assert_eq!((open[0]["severity"].as_str(), open[0]["trigger"].as_str()), (Some("critical"), Some("audit_verify")));
    assert_eq!(open[0]["freezes_merges"], true);
    assert_eq!(open[0]["repository"], Value::Null);
    assert_eq!(open[0]["details"]["broken"]["seq"], 1, "{open}");
    assert!(!open[0].to_string().contains("s3cret-db-pw"), "{open}");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
