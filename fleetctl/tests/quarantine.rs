//! `fleetctl quarantine` (issue 14, item 2) through the binary, on a Redis running the
//! generated ACL file with two dev instances that have users of their own, the real API on
//! a real Postgres, and a real master file and keysets: the quarantined worker's next
//! `XADD` is `NOPERM`, what it signed with its old key is refused as `retired_kid`, its
//! pending tasks go to the healthy instance, and a critical incident is open.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envelope::{
    Envelope, Instance, Keyring, Keyset, MasterFile, MemoryReplayGuard, PermissionTable, Process, Role, Sender,
    Verifier, VerifierConfig, VerifyContext,
};
use fleet_testkit::{Postgres, RedisServer};
use fleetctl::acl::{Passwords, User};
use orchestrator::api::auth::{ApiRole, TokenKeys};
use orchestrator::api::{self, ApiConfig, ApiState};
use orchestrator::audit::AuditKey;
use orchestrator::tasks::{Engine, EngineConfig};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const EX_USAGE: i32 = 64;
const SECRET: &str = "5f1c0e9a7b3d2f4e6a8c0b1d3f5e7a9c5f1c0e9a7b3d2f4e6a8c0b1d3f5e7a9c";
const PERMISSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/permissions.toml");

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn fleetctl(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    cmd.args(args).current_dir(dir);
    for var in ["FLEET_REDIS_URL", "FLEET_API_URL", "FLEET_TOKEN"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let out = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    for (_, v) in env {
        if v.contains('@') || v.starts_with("ey") {
            assert!(!out.stdout.contains(v) && !out.stderr.contains(v), "a secret was printed by {args:?}");
        }
    }
    out
}

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn xadd(c: &mut redis::aio::MultiplexedConnection, stream: &str) -> redis::RedisResult<String> {
    redis::cmd("XADD").arg(stream).arg("*").arg("env").arg("x").query_async(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_instance_is_refused_by_redis_and_its_old_key_is_retired_and_its_tasks_go_to_a_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let none: [(&str, &str); 0] = [];

    // Redis: the generated ACL file, two dev instances with users of their own.
    let made = fleetctl(
        dir,
        &none,
        &["acl", "secrets", "new", "--out", "secrets.toml", "--instance", "dev/dev-1", "--instance", "dev/dev-2"],
    )
    .await;
    assert_eq!(made.code, 0, "{}", made.stderr);
    let secrets = fs::read_to_string(dir.join("secrets.toml")).unwrap();
    assert!(secrets.contains("[instances]\n\"dev/dev-1\" = \""), "{secrets}");
    let bad = fleetctl(dir, &none, &["acl", "secrets", "new", "--out", "other.toml", "--instance", "budget/b-1"]).await;
    assert_eq!(bad.code, EX_USAGE, "{}", bad.stderr);
    assert!(bad.stderr.contains("--instance: bad name \"budget/b-1\""), "{}", bad.stderr);
    let generated = fleetctl(
        dir,
        &none,
        &["acl", "generate", "--secrets", "secrets.toml", "--permissions", PERMISSIONS, "--out", "users.acl"],
    )
    .await;
    assert_eq!(generated.code, 0, "{}", generated.stderr);
    let acl = fs::read_to_string(dir.join("users.acl")).unwrap();
    assert!(acl.contains("user dev.dev-2 reset on #"), "{acl}");
    assert!(acl.contains("fleet:tool:responses:dev:dev-2") && !acl.contains("dev.dev-2 reset on #x"), "{acl}");
    let passwords = Passwords::parse(&secrets).unwrap();
    let own = |name: &str| {
        let (_, _, p) = passwords.instances().iter().find(|(r, i, _)| format!("{r}/{i}") == name).unwrap();
        p.expose().to_owned()
    };
    let redis = RedisServer::builder().acl_file(dir.join("users.acl")).start().unwrap();
    let url = |user: &str, password: &str| format!("redis://{user}:{password}@127.0.0.1:{}/", redis.port());
    let admin_url = url("admin", passwords.get(User::Admin).expose());
    let mut admin = connect(&admin_url).await;
    let mut dev1 = connect(&url("dev.dev-1", &own("dev/dev-1"))).await;
    let mut dev2 = connect(&url("dev.dev-2", &own("dev/dev-2"))).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("fleet:tasks:dev")
        .arg("dev")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .unwrap();
    for _ in 0..3 {
        xadd(&mut admin, "fleet:tasks:dev").await.unwrap();
    }
    // dev-2 takes two tasks and can publish, like any healthy worker.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("dev")
        .arg("dev-2")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg("fleet:tasks:dev")
        .arg(">")
        .query_async(&mut dev2)
        .await
        .unwrap();
    xadd(&mut dev2, "fleet:results").await.unwrap();
    // An instance may not read a peer's tool answers.
    let peer: redis::RedisResult<redis::Value> =
        redis::cmd("XREAD").arg("STREAMS").arg("fleet:tool:responses:dev:dev-1").arg("0").query_async(&mut dev2).await;
    assert_eq!(peer.unwrap_err().code(), Some("NOPERM"));

    // The API, for the incident.
    let pg = Postgres::start().expect("postgres must be installed; tests never skip");
    let pool = PgPool::connect(&pg.create_database().unwrap()).await.unwrap();
    orchestrator::db::migrate(&pool).await.unwrap();
    let redis_pool = bus::pool(&SecretString::from(redis.url()), 2, Duration::from_secs(1)).unwrap();
    let permissions = PermissionTable::parse(&fs::read_to_string(PERMISSIONS).unwrap()).unwrap();
    let master_made = fleetctl(dir, &none, &["keys", "master", "new", "--out", "master.toml"]).await;
    assert_eq!(master_made.code, 0, "{}", master_made.stderr);
    let master = MasterFile::parse(&fs::read_to_string(dir.join("master.toml")).unwrap()).unwrap();
    let orchestrator_ring = Keyring::derive(&master, Process::Role(Role::Orchestrator), &permissions).unwrap();
    let engine = Engine::new(
        pool.clone(),
        Arc::new(orchestrator_ring),
        AuditKey::new(vec![7; 32]).unwrap(),
        EngineConfig::new(Instance::parse("orchestrator-0").unwrap()),
    );
    let state = ApiState::new(engine.clone(), redis_pool, &ApiConfig::new(SecretString::from(SECRET))).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api::serve(listener, api::router(state), shutdown.clone()));
    let token = TokenKeys::new(&SecretString::from(SECRET))
        .unwrap()
        .issue("olga", ApiRole::Operator, Duration::from_secs(600))
        .unwrap();

    // What dev-2 signed with its key before the quarantine.
    let dev_ring = Keyring::derive(&master, Process::Role(Role::Dev), &permissions).unwrap();
    let old = Envelope::new(
        Sender { role: Role::Dev, instance: Instance::parse("dev-2").unwrap() },
        Role::Orchestrator,
        bus::now_ms(),
        3_600_000,
        0,
        envelope::Heartbeat { seq: 1, busy: true }.into(),
    );
    let old_frame = dev_ring.seal(&old).unwrap();
    fs::create_dir(dir.join("keys")).unwrap();

    let env = [("FLEET_REDIS_URL", admin_url.as_str()), ("FLEET_API_URL", api_url.as_str()), ("FLEET_TOKEN", &token)];
    // Mistakes exit 64 and change nothing.
    for (target, says) in [
        ("qa/qa-1", "qa/qa-1 has no Redis user of its own (qa.qa-1)"),
        ("orchestrator", "orchestrator is not a worker"),
        ("dev/../x", "is not an instance name"),
    ] {
        let out = fleetctl(dir, &env, &["quarantine", target, "--reason", "drill"]).await;
        assert_eq!(out.code, EX_USAGE, "{target}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(says), "{target}: {}", out.stderr);
    }
    xadd(&mut dev2, "fleet:results").await.unwrap();

    let out = fleetctl(
        dir,
        &env,
        &[
            "quarantine",
            "dev/dev-2",
            "--reason",
            "forged results",
            "--master",
            "master.toml",
            "--keysets",
            "keys",
            "--permissions",
            PERMISSIONS,
            "--wait",
            "1s",
            "--max-ttl",
            "1s",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("redis user dev.dev-2 disabled"), "{}", out.stdout);
    assert!(out.stdout.contains("returned 2 pending task entries of dev/dev-2"), "{}", out.stdout);
    assert!(out.stdout.contains("opened incident "), "{}", out.stdout);

    // 1. Its next XADD, on the connection it already had, is NOPERM; it cannot log in again.
    assert_eq!(xadd(&mut dev2, "fleet:results").await.unwrap_err().code(), Some("NOPERM"));
    let again = redis::Client::open(url("dev.dev-2", &own("dev/dev-2")).as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    assert!(again.is_err(), "the quarantined user logged in again");
    // 2. Its tasks go to the healthy instance at its next claim, which still publishes.
    let claimed: redis::Value = redis::cmd("XAUTOCLAIM")
        .arg("fleet:tasks:dev")
        .arg("dev")
        .arg("dev-1")
        .arg(60_000)
        .arg("0")
        .query_async(&mut dev1)
        .await
        .unwrap();
    let redis::Value::Array(parts) = &claimed else { panic!("{claimed:?}") };
    let redis::Value::Array(entries) = &parts[1] else { panic!("{claimed:?}") };
    assert_eq!(entries.len(), 2, "{claimed:?}");
    xadd(&mut dev1, "fleet:results").await.unwrap();
    // 3. Its old key is retired in the keysets every process now reloads.
    let keyset = Keyset::parse(&fs::read_to_string(dir.join("keys/orchestrator.keyset.toml")).unwrap()).unwrap();
    let verifier = Verifier::new(keyset.into_keyring(), permissions, VerifierConfig::default());
    let refused = verifier
        .verify(
            "fleet:heartbeats",
            &old_frame,
            VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 },
            &mut MemoryReplayGuard::new(),
        )
        .unwrap_err();
    assert_eq!(refused.reason(), "retired_kid", "{refused}");
    // 4. A critical incident freezes every merge.
    let open = engine.incidents(false, 10).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    let i = &open[0];
    assert_eq!((i.severity.as_str(), i.trigger.as_str()), ("critical", "quarantine"));
    assert!(i.freezes_merges && i.repository.is_none());
    assert_eq!(i.details["redis_user"], "dev.dev-2");
    assert_eq!(i.details["pending_returned"], 2);
    assert_eq!(i.opened_by, "olga");
    assert!(i.title.contains("Quarantined dev/dev-2: forged results"), "{}", i.title);

    // A whole role (its instances share one user): every instance of it stops; without
    // --master the keys stay and the command says so.
    let mut review = connect(&url("review", passwords.get(User::Review).expose())).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("fleet:tasks:review")
        .arg("review")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut admin)
        .await
        .unwrap();
    xadd(&mut admin, "fleet:tasks:review").await.unwrap();
    for consumer in ["review-1", "review-2"] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("review")
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg("fleet:tasks:review")
            .arg(">")
            .query_async(&mut review)
            .await
            .unwrap();
    }
    let out = fleetctl(dir, &env, &["quarantine", "review", "--reason", "prompt-injected approvals"]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("returned 1 pending task entry of review (every instance)"), "{}", out.stdout);
    assert!(out.stdout.contains("keys not rotated"), "{}", out.stdout);
    assert_eq!(xadd(&mut review, "fleet:results").await.unwrap_err().code(), Some("NOPERM"));
    assert_eq!(engine.incidents(false, 10).await.unwrap().len(), 2);

    shutdown.cancel();
    server.await.unwrap().unwrap();
}
