//! The real `orchestrator` binary follows its keyset file without a restart: after the file
//! is replaced by one that signs generation 2, it accepts results signed with generation 2
//! and its outbox seals the next assignment with `orchestrator>qa:2`, in the same process.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envelope::*;
use orchestrator::audit::AuditKey;
use orchestrator::state::{Risk, TaskState};
use orchestrator::tasks::{Actor, Engine, EngineConfig, NewTask};
use sqlx::PgPool;
use uuid::Uuid;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

/// The test master after `rotations` stage + promote steps.
fn master(rotations: u32) -> MasterFile {
    let mut m = MasterFile::new(MasterSecret::from_bytes([6; 32]));
    for _ in 0..rotations {
        m.rotate().unwrap();
        m.promote();
    }
    m
}

fn keyset(rotations: u32, role: Role) -> Keyset {
    master(rotations).derive_keyset(Process::Role(role), &PermissionTable::parse(PERMISSIONS).unwrap())
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

/// Answers the task's current assignment as `role`, signed with generation `rotations + 1`.
async fn answer(pool: &PgPool, redis_url: &str, id: Uuid, role: Role, rotations: u32) {
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
    let ring = Arc::new(keyset(rotations, role).into_keyring());
    let pool_r = bus::pool(secrecy::SecretString::from(redis_url.to_owned()), 2, Duration::from_secs(2)).unwrap();
    bus::Publisher::new(pool_r, ring, bus::PublisherConfig::default())
        .publish(&StreamName::parse(streams::RESULTS).unwrap(), &env)
        .await
        .unwrap();
}

/// The kid of the newest outbox frame for `stream`.
async fn last_outbox_kid(pool: &PgPool, stream: &str) -> String {
    let frame: Vec<u8> = sqlx::query_scalar("SELECT frame FROM outbox WHERE stream = $1 ORDER BY id DESC LIMIT 1")
        .bind(stream)
        .fetch_one(pool)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&frame);
    let role = stream.trim_start_matches("fleet:tasks:");
    (1..=2).map(|g| format!("orchestrator>{role}:{g}")).find(|k| text.contains(k.as_str())).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_verifies_and_seals_with_a_reloaded_keyset() {
    let pg = fleet_testkit::Postgres::start().expect("postgres must be installed; tests never skip");
    let redis = fleet_testkit::RedisServer::start().expect("redis-server must be installed; tests never skip");
    let db_url = pg.create_database().unwrap();
    let pool = PgPool::connect(&db_url).await.unwrap();
    orchestrator::db::migrate(&pool).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keyset_path = d.join("orchestrator.keyset.toml");
    std::fs::write(&keyset_path, keyset(0, Role::Orchestrator).to_toml().as_bytes()).unwrap();
    std::fs::write(d.join("audit.key"), hex::encode([3u8; 32])).unwrap();
    std::fs::write(d.join("jwt.secret"), "x".repeat(40)).unwrap();
    let perms = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/permissions.toml");
    let cfg = d.join("orchestrator.toml");
    std::fs::write(
        &cfg,
        format!(
            "instance = \"orchestrator-0\"\nkeyset = \"{}\"\npermissions = \"{perms}\"\naudit_key_file = \"{}\"\n\
             jwt_secret_file = \"{}\"\nlisten = \"127.0.0.1:0\"\ntick_secs = 1\ngrace_secs = 2\nkeyset_reload_secs = 1\n",
            keyset_path.display(),
            d.join("audit.key").display(),
            d.join("jwt.secret").display(),
        ),
    )
    .unwrap();
    let mut orch = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .arg("--config")
        .arg(&cfg)
        .env("FLEET_DATABASE_URL", &db_url)
        .env("FLEET_REDIS_URL", redis.url())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let engine = Engine::new(
        pool.clone(),
        Arc::new(keyset(0, Role::Orchestrator).into_keyring()),
        AuditKey::new(vec![3; 32]).unwrap(),
        EngineConfig::new(Instance::parse("test-submitter").unwrap()),
    );
    let new_task = NewTask {
        title: "t".into(),
        instructions: "do it".into(),
        repository: None,
        test_command: None,
        risk: Risk::Low,
        scope: vec![],
    };
    let task = engine.submit(&Actor::operator("tester"), new_task).await.unwrap();
    answer(&pool, &redis.url(), task.id, Role::Dev, 0).await;
    wait_state(&pool, task.id, TaskState::Qa, Duration::from_secs(20)).await;
    assert_eq!(last_outbox_kid(&pool, "fleet:tasks:qa").await, "orchestrator>qa:1");

    // The rotation's promote step reaches the file (renamed over it, as fleetctl writes).
    let tmp = d.join("orchestrator.keyset.toml.new");
    std::fs::write(&tmp, keyset(1, Role::Orchestrator).to_toml().as_bytes()).unwrap();
    std::fs::rename(&tmp, &keyset_path).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // A QA result signed with generation 2 is accepted, and the review assignment the
    // orchestrator writes next is sealed with generation 2; the process never restarted.
    answer(&pool, &redis.url(), task.id, Role::Qa, 1).await;
    wait_state(&pool, task.id, TaskState::Review, Duration::from_secs(20)).await;
    assert_eq!(last_outbox_kid(&pool, "fleet:tasks:review").await, "orchestrator>review:2");
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let rejected: u64 = redis::cmd("XLEN").arg(streams::REJECTED).query_async(&mut conn).await.unwrap();
    assert_eq!(rejected, 0);
    assert!(orch.try_wait().unwrap().is_none(), "the same orchestrator process");

    Command::new("kill").arg("-TERM").arg(orch.id().to_string()).status().unwrap();
    let status = orch.wait().unwrap();
    assert!(status.success(), "orchestrator exited with {status}");
}
