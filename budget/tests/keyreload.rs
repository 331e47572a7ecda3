//! The `budget` binary picks up a new keyset on SIGHUP, without a restart: an envelope signed
//! with a generation it does not hold yet is refused (`unknown_kid`), the same kind of
//! envelope after `kill -HUP` is accepted, another process's keyset swapped in is refused,
//! and the process id never changed.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bus::Publisher;
use envelope::*;
use fleet_testkit::RedisServer;
use uuid::Uuid;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

fn permissions() -> PermissionTable {
    PermissionTable::parse(PERMISSIONS).unwrap()
}

/// The test master after `rotations` stage + promote steps.
fn master(rotations: u32) -> MasterFile {
    let mut m = MasterFile::new(MasterSecret::from_bytes([11; 32]));
    for _ in 0..rotations {
        m.rotate().unwrap();
        m.promote();
    }
    m
}

async fn xlen(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN").arg(stream).query_async(conn).await.unwrap()
}

async fn send_usage(publisher: &Publisher) {
    let from = Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-0").unwrap() };
    let usage = Usage { role: Role::Dev, model: "m".into(), input_tokens: 1, output_tokens: 1, cost_micro_usd: 1 };
    let mut env = Envelope::new(from, Role::Budget, bus::now_ms(), 60_000, 0, usage.into());
    env.task_id = Some(Uuid::now_v7());
    publisher.publish(&StreamName::parse(streams::USAGE).unwrap(), &env).await.unwrap();
}

/// Polls `f` every 20 ms for up to 20 s.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, log: &dyn Fn() -> String, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; budget's log:\n{}", log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_keyset_without_a_restart() {
    let redis = RedisServer::start().expect("redis-server must be installed; tests never skip");
    let dir = tempfile::tempdir().unwrap();
    let keyset = dir.path().join("budget.keyset.toml");
    let budget_keys = |m: &MasterFile| m.derive_keyset(Process::Role(Role::Budget), &permissions()).to_toml();
    std::fs::write(&keyset, budget_keys(&master(0)).as_bytes()).unwrap();
    std::fs::write(dir.path().join("permissions.toml"), PERMISSIONS).unwrap();
    let config = dir.path().join("budget.toml");
    // An hour between polls: only SIGHUP can make this reload happen within the test.
    std::fs::write(
        &config,
        format!(
            "instance = \"budget-0\"\nkeyset = \"{}\"\npermissions = \"{}/permissions.toml\"\nkeyset_reload_secs = 3600\ngrace_secs = 1\n",
            keyset.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("budget.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_budget"))
        .arg("--config")
        .arg(&config)
        .env("FLEET_REDIS_URL", redis.url())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log_path).unwrap())
        .stderr(std::fs::File::create(log_path.with_extension("err")).unwrap())
        .spawn()
        .expect("the budget binary starts");
    let pid = child.id();
    let log = || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
            + &std::fs::read_to_string(log_path.with_extension("err")).unwrap_or_default()
    };
    eventually("the budget manager to run", &log, async || log().contains("Budget manager running.")).await;

    let pool = bus::pool(secrecy::SecretString::from(redis.url()), 4, Duration::from_secs(2)).unwrap();
    let signs_2 = Keyring::derive(&master(1), Process::Role(Role::Orchestrator), &permissions()).unwrap();
    let orchestrator = Publisher::new(pool, signs_2, bus::PublisherConfig::default());
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();

    // Before: generation 2 is unknown to the budget manager.
    send_usage(&orchestrator).await;
    eventually("the refusal", &log, async || xlen(&mut conn, streams::REJECTED).await == 1).await;
    let reasons: Vec<redis::Value> =
        redis::cmd("XRANGE").arg(streams::REJECTED).arg("-").arg("+").query_async(&mut conn).await.unwrap();
    assert!(format!("{reasons:?}").contains("unknown_kid"), "{reasons:?}");

    // Rename a generation-2 keyset over the file, then SIGHUP.
    let tmp = dir.path().join("budget.keyset.toml.new");
    std::fs::write(&tmp, budget_keys(&master(1)).as_bytes()).unwrap();
    std::fs::rename(&tmp, &keyset).unwrap();
    let hup = Command::new("kill").arg("-HUP").arg(pid.to_string()).status().unwrap();
    assert!(hup.success());
    eventually("the reload", &log, async || log().contains("Reloaded the keyset")).await;
    assert!(log().contains("signing_generation=2") || log().contains("\"signing_generation\":2"), "{}", log());

    // The attack angle: another process's keyset (dev's, which holds no orchestrator>budget
    // key) swapped in is refused, and the keys in force stay.
    std::fs::write(&tmp, master(1).derive_keyset(Process::Role(Role::Dev), &permissions()).to_toml().as_bytes())
        .unwrap();
    std::fs::rename(&tmp, &keyset).unwrap();
    let hup = Command::new("kill").arg("-HUP").arg(pid.to_string()).status().unwrap();
    assert!(hup.success());
    eventually("the refusal of dev's keyset", &log, async || log().contains("is the keyset of dev, not of budget"))
        .await;

    // After: accepted (consumed, nothing more refused or dead-lettered), same process.
    send_usage(&orchestrator).await;
    eventually("the usage to be consumed", &log, async || {
        let groups: redis::Value =
            redis::cmd("XINFO").arg("GROUPS").arg(streams::USAGE).query_async(&mut conn).await.unwrap();
        let groups = bus::reply::info_maps("XINFO GROUPS", &groups).unwrap();
        groups.iter().any(|g| {
            let get = |k| bus::reply::info_get(g, k).and_then(bus::reply::int);
            get("entries-read") == Some(2) && get("pending") == Some(0)
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(xlen(&mut conn, streams::REJECTED).await, 1, "nothing refused after the reload");
    assert_eq!(xlen(&mut conn, streams::DLQ).await, 0);
    assert!(child.try_wait().unwrap().is_none(), "the budget manager is still the same running process");

    let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    let _ = child.wait();
}
