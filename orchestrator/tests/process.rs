//! The real `orchestrator` binary against real Postgres and Redis: it consumes results from
//! the bus, and resumes where it was after being killed mid-cycle.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envelope::*;
use orchestrator::audit::AuditKey;
use orchestrator::state::{Risk, TaskState};
use orchestrator::tasks::{Actor, Engine, EngineConfig, NewTask};
use sqlx::PgPool;
use uuid::Uuid;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([5; 32]))
}

fn keyset(role: Role) -> Keyset {
    master().derive_keyset(Process::Role(role), &PermissionTable::parse(PERMISSIONS).unwrap())
}

struct Setup {
    dir: tempfile::TempDir,
    db_url: String,
    redis_url: String,
}

impl Setup {
    fn config(&self) -> std::path::PathBuf {
        let d = self.dir.path();
        std::fs::write(d.join("orchestrator.keyset.toml"), keyset(Role::Orchestrator).to_toml().as_bytes()).unwrap();
        std::fs::write(d.join("audit.key"), hex::encode([3u8; 32])).unwrap();
        std::fs::write(d.join("jwt.secret"), "x".repeat(40)).unwrap();
        let perms = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/permissions.toml");
        let cfg = format!(
            "instance = \"orchestrator-0\"\nkeyset = \"{}\"\npermissions = \"{perms}\"\naudit_key_file = \"{}\"\n\
             jwt_secret_file = \"{}\"\nlisten = \"127.0.0.1:0\"\ntick_secs = 1\ngrace_secs = 2\n",
            d.join("orchestrator.keyset.toml").display(),
            d.join("audit.key").display(),
            d.join("jwt.secret").display(),
        );
        let path = d.join("orchestrator.toml");
        std::fs::write(&path, cfg).unwrap();
        path
    }

    fn start(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .arg("--config")
            .arg(self.config())
            .env("FLEET_DATABASE_URL", &self.db_url)
            .env("FLEET_REDIS_URL", &self.redis_url)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }
}

async fn state_of(pool: &PgPool, id: Uuid) -> String {
    sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1").bind(id).fetch_one(pool).await.unwrap()
}

async fn wait_state(pool: &PgPool, id: Uuid, want: TaskState, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = state_of(pool, id).await;
        if s == want.as_str() {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} still {s}, expected {want} after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Answers the task's current assignment as `role` through the bus.
async fn answer(pool: &PgPool, redis_url: &str, id: Uuid, role: Role) {
    let assignment: Uuid =
        sqlx::query_scalar("SELECT assignment_id FROM tasks WHERE id = $1").bind(id).fetch_one(pool).await.unwrap();
    let mut env = Envelope::new(
        Sender { role, instance: Instance::parse(&format!("{role}-1")).unwrap() },
        Role::Orchestrator,
        bus::now_ms(),
        120_000,
        0,
        TaskResult {
            attempt: 1,
            status: Status::Success,
            summary: "done".into(),
            findings: vec![],
            diff: None,
            log: None,
            change_sha256: None,
            calls: Vec::new(),
            containment: Vec::new(),
        }
        .into(),
    );
    env.task_id = Some(id);
    env.causation_id = Some(assignment);
    // Each role signs with its own keyring.
    let ring = Arc::new(keyset(role).into_keyring());
    let pool_r = bus::pool(secrecy::SecretString::from(redis_url.to_owned()), 2, Duration::from_secs(2)).unwrap();
    bus::Publisher::new(pool_r, ring, bus::PublisherConfig::default())
        .publish(&StreamName::parse(streams::RESULTS).unwrap(), &env)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_applies_results_and_resumes_after_being_killed_mid_cycle() {
    let pg = fleet_testkit::Postgres::start().expect("postgres must be installed; tests never skip");
    let redis = fleet_testkit::RedisServer::builder().appendonly(true).start().expect("redis-server must be installed");
    let setup =
        Setup { dir: tempfile::tempdir().unwrap(), db_url: pg.create_database().unwrap(), redis_url: redis.url() };
    let pool = PgPool::connect(&setup.db_url).await.unwrap();
    orchestrator::db::migrate(&pool).await.unwrap();
    let engine = Engine::new(
        pool.clone(),
        Arc::new(keyset(Role::Orchestrator).into_keyring()),
        AuditKey::new(vec![3; 32]).unwrap(),
        EngineConfig::new(Instance::parse("test-submitter").unwrap()),
    );

    let mut orch = setup.start();
    let task = engine
        .submit(
            &Actor::operator("tester"),
            NewTask {
                title: "t".into(),
                instructions: "do it".into(),
                repository: None,
                test_command: None,
                risk: Risk::Low,
                scope: vec![],
            },
        )
        .await
        .unwrap();
    answer(&pool, &setup.redis_url, task.id, Role::Dev).await;
    wait_state(&pool, task.id, TaskState::Qa, Duration::from_secs(20)).await;

    // Killed mid-cycle: the QA result arrives while it is down, and is applied after restart.
    orch.kill().unwrap();
    orch.wait().unwrap();
    answer(&pool, &setup.redis_url, task.id, Role::Qa).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state_of(&pool, task.id).await, "qa", "nothing applies results while the orchestrator is down");
    let mut orch = setup.start();
    wait_state(&pool, task.id, TaskState::Review, Duration::from_secs(20)).await;

    // A graceful stop (SIGTERM) exits 0.
    rustix_kill(&orch);
    let status = orch.wait().unwrap();
    assert!(status.success(), "orchestrator exited with {status}");
    let report = orchestrator::audit::verify(&pool, &AuditKey::new(vec![3; 32]).unwrap()).await.unwrap();
    assert_eq!(report.first_broken, None);
}

fn rustix_kill(child: &Child) {
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
}

#[test]
fn invalid_configuration_exits_64_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "instance = \"orchestrator-0\"\nkeyset = \"/nonexistent/k.toml\"\naudit_key_file = \"a\"\njwt_secret_file = \"j\"\ndatabase_url = \"postgres://x\"\nredis_url = \"redis://x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator")).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keyset") && err.contains("/nonexistent/k.toml"), "{err}");
    std::fs::write(&path, "instance = \"o\"\nbogus = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator")).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator")).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}
