//! The `outbox-relay` binary as an operator runs it: configuration errors, environment
//! overrides, SIGTERM, and SIGKILL in the middle of a backlog.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rustix::process::{Pid, Signal, kill_process};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The binary with `--config path`, the URLs given only through the environment of the
/// child (this process's environment is left alone). Its log goes to `relay.log` beside
/// the config file.
fn start(env: &Env, config: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_file_name("relay.log"))
        .expect("open the log file");
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .env("FLEET_DATABASE_URL", &env.database_url)
        .env("FLEET_REDIS_URL", env.redis.url())
        .env("RUST_LOG", "outbox_relay=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start outbox-relay")
}

fn signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(child.id() as i32).expect("pid");
    kill_process(pid, signal).expect("kill");
}

fn wait_with_timeout(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "outbox-relay did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn invalid_configuration_exits_64_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("redis_url = \"redis://127.0.0.1:1\"\n", "database_url"),
        (
            "database_url = \"postgres://u:hunter2@127.0.0.1/db\"\nredis_url = \"redis://h\"\nbatch_size = 0\n",
            "batch_size",
        ),
        (
            "database_url = \"postgres://u:hunter2@127.0.0.1/db\"\nredis_url = \"redis://h\"\npoll_intervall_ms = 5\n",
            "poll_intervall_ms",
        ),
        ("database_url = \"postgres://u:hunter2@127.0.0.1/db\"\nredis_url = \"nope://u:hunter2@h\"\n", "redis_url"),
    ];
    for (text, setting) in cases {
        let config = write_config(dir.path(), text);
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env_remove("FLEET_DATABASE_URL")
            .env_remove("FLEET_REDIS_URL")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {stderr}");
        assert!(stderr.contains(setting), "{text}: the message names {setting}: {stderr}");
        assert!(!stderr.contains("hunter2"), "no secret in the message: {stderr}");
    }
    let out = Command::new(BIN).output().expect("run without --config");
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN).arg("--help").output().expect("run --help");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FLEET_DATABASE_URL"));
}

#[tokio::test]
async fn sigterm_stops_the_relay_cleanly() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "poll_interval_ms = 100\n");
    let mut child = start(&env, &config);
    let row = TestRow::new(DEV, Uuid::now_v7(), 1, 64);
    insert_committed(&env.pool, std::slice::from_ref(&row)).await;
    env.drained(Duration::from_secs(10)).await;
    let mut redis = env.redis().await;
    assert_eq!(read_stream(&mut redis, DEV).await, vec![row.frame]);

    signal(&child, Signal::TERM);
    let status = wait_with_timeout(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    let stderr = std::fs::read_to_string(dir.path().join("relay.log")).expect("read the log");
    assert!(stderr.contains("Outbox relay stopped."), "{stderr}");
    assert!(!stderr.contains(&env.database_url), "the URL is never logged");
}

/// SIGKILL in the middle of a backlog, then a fresh relay: every row ends up on the stream
/// (some possibly twice: those of the batch that was between XADD and COMMIT), and every
/// row marked dispatched by the killed relay was on the stream before it died.
#[tokio::test]
async fn sigkill_mid_stream_loses_nothing() {
    const ROWS: usize = 20_000;
    let env = Env::start().await;
    let rows: Vec<TestRow> = (0..ROWS).map(|i| TestRow::new(DEV, Uuid::now_v7(), i as u64, 128)).collect();
    for chunk in rows.chunks(2000) {
        insert_committed(&env.pool, chunk).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "batch_size = 32\npoll_interval_ms = 100\n");
    let mut child = start(&env, &config);
    eventually(Duration::from_secs(20), "the relay is part-way through", || async {
        env.undispatched().await < (ROWS - 2000) as i64
    })
    .await;
    signal(&child, Signal::KILL);
    wait_with_timeout(&mut child, Duration::from_secs(5));

    let mut redis = env.redis().await;
    let marked: Vec<Uuid> = sqlx::query_scalar("SELECT envelope_id FROM outbox WHERE dispatched_at IS NOT NULL")
        .fetch_all(&env.pool)
        .await
        .expect("marked rows");
    assert!(marked.len() < ROWS, "killed before the end");
    let on_stream: HashMap<Uuid, usize> = count(&read_stream(&mut redis, DEV).await);
    for id in &marked {
        assert!(on_stream.contains_key(id), "row {id} was marked dispatched but never published");
    }

    let mut child = start(&env, &config);
    env.drained(Duration::from_secs(60)).await;
    signal(&child, Signal::TERM);
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(10)).code(), Some(0));

    let on_stream = count(&read_stream(&mut redis, DEV).await);
    let missing = rows.iter().filter(|r| !on_stream.contains_key(&r.envelope_id)).count();
    assert_eq!(missing, 0, "no row lost");
    let duplicates: usize = on_stream.values().map(|n| n - 1).sum();
    assert!(duplicates <= 32, "at most the batch in flight is published twice, got {duplicates}");
    eprintln!("rows published twice after SIGKILL: {duplicates}");
}

fn count(frames: &[Vec<u8>]) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for f in frames {
        *counts.entry(decode(f).0).or_default() += 1;
    }
    counts
}
