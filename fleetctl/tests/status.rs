//! `fleetctl status` against a real redis-server: the kill switch, the day's budget from the
//! ledger, stream backlog per group, and live workers from verified heartbeats.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use budget::ledger::{Ledger, LedgerConfig, SystemClock};
use envelope::*;
use fleet_testkit::RedisServer;
use serde_json::Value;

const PERMISSIONS: &str = include_str!("../../config/permissions.toml");

fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([5; 32]))
}

fn permissions() -> PermissionTable {
    PermissionTable::parse(PERMISSIONS).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_switch_the_budget_the_backlog_and_the_live_workers() {
    let redis = RedisServer::start().expect("redis-server must be installed; tests never skip");
    let dir = tempfile::tempdir().unwrap();
    let keyset = master().derive_keyset(Process::Operator, &permissions());
    std::fs::write(dir.path().join("operator.toml"), keyset.to_toml().as_bytes()).unwrap();
    std::fs::write(dir.path().join("permissions.toml"), PERMISSIONS).unwrap();
    let budget_toml = "[ledger]\ndaily_tokens = 10_000\n[ledger.per_role.dev]\nsoft_tokens = 5_000\n\
                       [ledger.prices.m]\ninput_micro_usd_per_mtok = 1_000_000\noutput_micro_usd_per_mtok = 1_000_000\n";
    std::fs::write(dir.path().join("budget.toml"), budget_toml).unwrap();

    let pool = bus::pool(secrecy::SecretString::from(redis.url()), 4, Duration::from_secs(2)).unwrap();
    let cfg = LedgerConfig::from_toml(&budget_toml.replace("[ledger]\n", "").replace("[ledger.", "[")).unwrap();
    let ledger = Ledger::with_clock(pool.clone(), cfg, Arc::new(SystemClock)).unwrap();
    let r = ledger.reserve(uuid::Uuid::now_v7(), Role::Dev, "m", 1_000, 500).await.unwrap();
    ledger.commit(&r, 1_000, 500).await.unwrap();
    let mut c = pool.dedicated().await.unwrap();
    let () = redis::cmd("HSET")
        .arg("fleet:killswitch")
        .arg(&["epoch", "4", "engaged", "1", "by", "budget", "reason", "3 consecutive task failures", "at_ms", "1"])
        .query_async(&mut c)
        .await
        .unwrap();
    // Two dev workers and a qa worker beat; one forged heartbeat does not count.
    let dev = Keyring::derive(&master(), Process::Role(Role::Dev), &permissions()).unwrap();
    let qa = Keyring::derive(&master(), Process::Role(Role::Qa), &permissions()).unwrap();
    let task = uuid::Uuid::now_v7();
    for (ring, role, instance, busy) in
        [(&dev, Role::Dev, "dev-1", true), (&dev, Role::Dev, "dev-2", false), (&qa, Role::Qa, "qa-1", false)]
    {
        for seq in 0..3 {
            let from = Sender { role, instance: Instance::parse(instance).unwrap() };
            let mut env =
                Envelope::new(from, Role::Orchestrator, bus::now_ms(), 60_000, 4, Heartbeat { seq, busy }.into());
            env.task_id = busy.then_some(task);
            let wire = ring.seal(&env).unwrap();
            let _: String = redis::cmd("XADD")
                .arg(streams::HEARTBEATS)
                .arg("*")
                .arg("env")
                .arg(wire)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }
    let _: String = redis::cmd("XADD")
        .arg(streams::HEARTBEATS)
        .arg("*")
        .arg("env")
        .arg(b"forged".as_slice())
        .query_async(&mut c)
        .await
        .unwrap();
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(streams::HEARTBEATS)
        .arg("orchestrator")
        .arg("0")
        .query_async(&mut c)
        .await
        .unwrap();

    let run = |json: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
        cmd.current_dir(dir.path())
            .args([
                "status",
                "--keyset",
                "operator.toml",
                "--permissions",
                "permissions.toml",
                "--budget-config",
                "budget.toml",
            ])
            .env("FLEET_REDIS_URL", redis.url());
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let v: Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(v["kill_switch"]["engaged"], true);
    assert_eq!(v["kill_switch"]["epoch"], 4);
    assert_eq!(v["budget"]["tokens"]["used"], 1_500);
    assert_eq!(v["budget"]["tokens"]["limit"], 10_000);
    let dev_spend = v["budget"]["roles"].as_array().unwrap().iter().find(|r| r["role"] == "dev").unwrap().clone();
    assert_eq!((dev_spend["tokens"].clone(), dev_spend["soft_tokens"].clone()), (1_500.into(), 5_000.into()));
    let beats = v["streams"].as_array().unwrap().iter().find(|s| s["stream"] == "fleet:heartbeats").unwrap().clone();
    assert_eq!(beats["length"], 10);
    assert_eq!(beats["groups"][0]["group"], "orchestrator");
    assert_eq!(beats["groups"][0]["lag"], 10);
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{workers:?}");
    let dev1 = workers.iter().find(|w| w["instance"] == "dev-1").unwrap();
    assert_eq!((dev1["busy"].clone(), dev1["task_id"].clone()), (true.into(), task.to_string().into()));
    assert_eq!(v["unverified_heartbeats"], 1);

    let text = run(false);
    for expected in
        ["KILL SWITCH  ENGAGED  epoch 4", "3 consecutive task failures", "fleet:heartbeats", "dev-2", "qa-1"]
    {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    println!("{text}");
}
