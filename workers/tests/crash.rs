//! The real `dev-worker` binary killed while its sandbox runs: a new process with the same
//! instance name removes the leftover container, redoes the step, and it completes once.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use envelope::{Role, Status};
use uuid::Uuid;

fn spawn(fleet: &Fleet) -> Child {
    let cfg = fleet.worker_config(Role::Dev, "dev-crash", "");
    Command::new(env!("CARGO_BIN_EXE_dev-worker"))
        .arg("--config")
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_task_is_replaced_and_the_step_completes_once() {
    let fleet = Fleet::new();
    // A slow build check, so the kill lands while the sandbox runs.
    let origin = fleet.origin("slow", |dir| {
        let build = dir.join(".agentfleet/build");
        let script = std::fs::read_to_string(&build).unwrap().replace("set -e\n", "set -e\nsleep 6\n");
        std::fs::write(build, script).unwrap();
    });
    fleet.proxy_text(fixture_dev_answer());
    let mut first = spawn(&fleet);
    let task = Uuid::now_v7();
    let id = fleet.assign(Role::Dev, task, fleet.assignment(task, &origin), 0).await;
    wait_until("the build's sandbox", Duration::from_secs(90), async || !containers_of("dev-crash").is_empty()).await;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert!(!containers_of("dev-crash").is_empty(), "the killed worker's container outlives it");
    assert!(fleet.results_of(task).await.is_empty());

    let mut second = spawn(&fleet);
    let (_, r) = fleet.result(id, Duration::from_secs(120)).await;
    assert_eq!(r.status, Status::Success, "{r:?}");
    assert!(String::from_utf8_lossy(r.diff.as_deref().unwrap()).contains("+    return a + b"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fleet.results_of(task).await.len(), 1, "the step completed exactly once");
    assert_eq!(fleet.pending(Role::Dev).await, 0, "the entry is acknowledged");
    assert!(containers_of("dev-crash").is_empty());

    // SIGTERM: a clean exit.
    Command::new("kill").arg("-TERM").arg(second.id().to_string()).status().unwrap();
    let status = second.wait().unwrap();
    assert!(status.success(), "{status}");
}
