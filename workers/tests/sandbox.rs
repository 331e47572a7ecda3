//! The sandbox against the real local Docker engine: no mocks.
//!
//! Each test builds the image first if it is missing (`deploy/sandbox-image.sh`, which is
//! idempotent and serialises concurrent builds with flock) and FAILS, never skips, when
//! the engine or the image is unavailable. Every test uses its own instance label, so
//! tests run in parallel and check that their own containers are gone afterwards.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{CreateContainerOptions, ListContainersOptions};
use tokio_util::sync::CancellationToken;
use workers::sandbox::{
    LABEL_INSTANCE, LABEL_SANDBOX, RunOutput, RunSpec, Sandbox, SandboxConfig, SandboxError, SandboxLabels,
};

/// Builds the image if missing and returns its name (the script's last stdout line).
async fn image() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sandbox-image.sh");
    let out = tokio::process::Command::new(&script)
        .env("CI", "true")
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "deploy/sandbox-image.sh failed ({}): the sandbox tests need the Docker engine and the sandbox image; \
         is the Docker engine running? Run deploy/sandbox-image.sh as root to see why",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().expect("deploy/sandbox-image.sh printed no image name").trim().to_owned()
}

async fn sandbox_with(cfg: SandboxConfig) -> Sandbox {
    let image = image().await;
    Sandbox::connect(SandboxConfig { image, ..cfg }).await.unwrap_or_else(|e| {
        panic!("sandbox unavailable: {e} (run deploy/sandbox-image.sh; is the Docker engine running?)")
    })
}

async fn sandbox() -> Sandbox {
    sandbox_with(SandboxConfig::default()).await
}

async fn docker() -> Docker {
    Docker::connect_with_local_defaults().unwrap().negotiate_version().await.unwrap()
}

/// A workspace uid 10001 can write.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn instance(test: &str) -> String {
    format!("test-{test}-{}", uuid::Uuid::now_v7().simple())
}

fn spec(workspace: &Path, instance: &str, command: &[&str]) -> RunSpec {
    let labels = SandboxLabels { task: "task-0001".into(), role: "qa".into(), instance: instance.into() };
    RunSpec::new(command.iter().map(|s| (*s).to_owned()).collect(), workspace, labels)
}

async fn run(sandbox: &Sandbox, spec: RunSpec) -> RunOutput {
    sandbox.run(spec, &CancellationToken::new()).await.unwrap()
}

fn text(out: &RunOutput) -> String {
    String::from_utf8_lossy(&out.output).into_owned()
}

/// How many containers (running or not) carry this instance's label.
async fn containers_of(instance: &str) -> usize {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_INSTANCE}={instance}")])]);
    let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    docker().await.list_containers(Some(options)).await.unwrap().len()
}

async fn assert_gone(instance: &str) {
    assert_eq!(containers_of(instance).await, 0, "containers of {instance} left behind");
}

/// The host's address on its default route (no packet is sent).
fn host_address() -> String {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect("192.0.2.1:9").unwrap();
    socket.local_addr().unwrap().ip().to_string()
}

#[tokio::test]
async fn no_network_reaches_the_host() {
    let sandbox = sandbox().await;
    let ws = workspace();
    let inst = instance("network");
    // A host listener proves the point: with any network it would accept.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let targets =
        format!("172.17.0.1:6379 127.0.0.1:6379 {host}:6379 172.17.0.1:{port} {host}:{port}", host = host_address());
    let script = r#"
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        print("CONNECTED", target)
    except OSError as e:
        print("BLOCKED", target, e.errno, e)
"#;
    let mut command = vec!["python3", "-c", script];
    command.extend(targets.split(' '));
    let out = run(&sandbox, spec(ws.path(), &inst, &command)).await;
    let output = text(&out);
    assert_eq!(out.exit_code, Some(0), "{output}");
    assert!(!output.contains("CONNECTED"), "{output}");
    assert_eq!(output.matches("BLOCKED").count(), 5, "{output}");
    // Off-loopback there is no route at all (ENETUNREACH; EHOSTUNREACH under gVisor), not
    // merely nothing listening.
    for line in output.lines().filter(|l| !l.contains("127.0.0.1")) {
        assert!(line.contains(" 101 ") || line.contains(" 113 "), "expected no route: {line}");
    }
    // The attempt is reported with the step's result, once (issue 14: an incident).
    assert_eq!(sandbox.take_containment("task-0001"), ["network"], "{output}");
    assert!(sandbox.take_containment("task-0001").is_empty());
    // A test that merely fails is not containment.
    run(&sandbox, spec(ws.path(), &inst, &["sh", "-c", "echo FAILED test_add; exit 1"])).await;
    assert!(sandbox.take_containment("task-0001").is_empty());
    assert_gone(&inst).await;
}

#[tokio::test]
async fn writes_only_to_workspace_and_tmp() {
    let sandbox = sandbox().await;
    let ws = workspace();
    let inst = instance("readonly");
    let script = "for d in / /etc /usr /home /root /var /workspace /tmp; do \
                  if touch $d/probe 2>/dev/null; then echo WROTE $d; else echo DENIED $d; fi; done";
    let out = run(&sandbox, spec(ws.path(), &inst, &["sh", "-c", script])).await;
    let output = text(&out);
    for dir in ["/", "/etc", "/usr", "/home", "/root", "/var"] {
        assert!(output.lines().any(|l| l == format!("DENIED {dir}")), "{dir} writable: {output}");
    }
    assert!(output.lines().any(|l| l == "WROTE /workspace"), "{output}");
    assert!(output.lines().any(|l| l == "WROTE /tmp"), "{output}");
    assert!(ws.path().join("probe").exists(), "the write to /workspace did not reach the host directory");
    assert_gone(&inst).await;
}

#[tokio::test]
async fn runs_as_the_unprivileged_user_without_capabilities() {
    let sandbox = sandbox().await;
    let ws = workspace();
    let inst = instance("uid");
    let out = run(&sandbox, spec(ws.path(), &inst, &["sh", "-c", "id -u; id -g; grep CapEff /proc/self/status"])).await;
    let output = text(&out);
    assert!(out.success(), "{output}");
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[..2], ["10001", "10001"], "{output}");
    assert_eq!(lines[2].split_whitespace().nth(1), Some("0000000000000000"), "{output}");
    assert_gone(&inst).await;
}

#[tokio::test]
async fn fork_bomb_is_stopped_by_the_pids_limit() {
    let sandbox = sandbox_with(SandboxConfig { pids_limit: 64, ..Default::default() }).await;
    let ws = workspace();
    let inst = instance("forkbomb");
    let mut bomb = spec(ws.path(), &inst, &["sh", "-c", "bomb() { bomb | bomb; }; bomb"]);
    bomb.timeout = Some(Duration::from_secs(5));
    let started = Instant::now();
    let out = run(&sandbox, bomb).await;
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let output = text(&out);
    eprintln!(
        "fork bomb: exit {:?}, timed out {}, output {:?}",
        out.exit_code,
        out.timed_out,
        &output[..output.len().min(300)]
    );
    assert!(output.contains("fork"), "no fork failure reported: {output}");
    assert_eq!(sandbox.take_containment("task-0001"), ["pids_limit"], "{output}");
    // It ended, one way or the other, and the host still runs sandboxes.
    assert!(out.timed_out || out.exit_code.is_some(), "{out:?}");
    assert_gone(&inst).await;

    // A process tree can never exceed the limit.
    let count = "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30); os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('fork failed after', n, e)\n";
    let out = run(&sandbox, spec(ws.path(), &inst, &["python3", "-c", count])).await;
    let output = text(&out);
    let n: i64 = output.split_whitespace().nth(3).and_then(|n| n.parse().ok()).unwrap_or(i64::MAX);
    assert!(n < 64, "{output}");
    assert_gone(&inst).await;
}

#[tokio::test]
async fn memory_hog_is_oom_killed() {
    let cfg = SandboxConfig { memory_bytes: 128 * 1024 * 1024, tmpfs_bytes: 16 * 1024 * 1024, ..Default::default() };
    let sandbox = sandbox_with(cfg).await;
    let ws = workspace();
    let inst = instance("oom");
    let mut hog = spec(ws.path(), &inst, &["python3", "-c", "x = b'x' * (2 * 1024 ** 3); print('survived')"]);
    hog.timeout = Some(Duration::from_secs(60));
    let out = run(&sandbox, hog).await;
    eprintln!("memory hog: exit {:?}, oom_killed {}", out.exit_code, out.oom_killed);
    assert!(!text(&out).contains("survived"), "{out:?}");
    assert!(out.oom_killed || out.exit_code == Some(137), "{out:?}");
    assert!(!out.timed_out, "{out:?}");
    if out.oom_killed {
        assert_eq!(sandbox.take_containment("task-0001"), ["oom_killed"]);
    }
    assert_gone(&inst).await;
}

#[tokio::test]
async fn endless_loop_is_killed_at_the_timeout() {
    let sandbox = sandbox().await;
    let ws = workspace();
    let inst = instance("timeout");
    let mut looping = spec(ws.path(), &inst, &["sh", "-c", "while :; do :; done"]);
    looping.timeout = Some(Duration::from_secs(2));
    let started = Instant::now();
    let out = run(&sandbox, looping).await;
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(out.timed_out && !out.cancelled, "{out:?}");
    assert_eq!(out.exit_code, Some(137), "{out:?}");
    assert_gone(&inst).await;
}

#[tokio::test]
async fn environment_is_only_what_the_spec_sets() {
    let sandbox = sandbox().await;
    let ws = workspace();
    let inst = instance("env");
    let mut printenv = spec(ws.path(), &inst, &["env"]);
    printenv.env = vec![("TASK_KIND".into(), "unit".into())];
    let out = run(&sandbox, printenv).await;
    let output = text(&out);
    assert!(out.success(), "{output}");
    let names: BTreeSet<&str> = output.lines().filter_map(|l| l.split_once('=').map(|(n, _)| n)).collect();
    assert_eq!(names, BTreeSet::from(["HOME", "HOSTNAME", "PATH", "TASK_KIND"]), "{output}");
    assert!(output.lines().any(|l| l == "HOME=/tmp") && output.lines().any(|l| l == "TASK_KIND=unit"), "{output}");
    // Nothing of this process leaks: its variables (CARGO_*, NEXTEST_*, and FLEET_SECRET when
    // the run sets it; edition 2024 makes set_var unsafe, which the workspace forbids).
    for (name, value) in std::env::vars().filter(|(n, _)| !["HOME", "PATH", "HOSTNAME"].contains(&n.as_str())) {
        assert!(!output.contains(&format!("{name}=")), "{name} leaked into the sandbox");
        if value.len() >= 8 {
            assert!(!output.contains(&value), "the value of {name} leaked into the sandbox");
        }
    }
    assert_gone(&inst).await;
}

#[tokio::test]
async fn output_is_capped() {
    let sandbox = sandbox_with(SandboxConfig { output_cap_bytes: 64 * 1024, ..Default::default() }).await;
    let ws = workspace();
    let inst = instance("cap");
    let command = ["python3", "-c", "import sys; sys.stdout.write('x' * (1 << 20)); sys.stderr.write('done')"];
    let out = run(&sandbox, spec(ws.path(), &inst, &command)).await;
    assert!(out.success(), "{:?}", out.exit_code);
    assert!(out.truncated);
    assert_eq!(out.output.len(), 64 * 1024);
    assert_gone(&inst).await;

    let out = run(&sandbox, spec(ws.path(), &inst, &["echo", "small"])).await;
    assert_eq!((text(&out).as_str(), out.truncated), ("small\n", false));
    assert_gone(&inst).await;
}

#[tokio::test]
async fn cancellation_kills_the_container() {
    let sandbox = sandbox().await;
    let ws = workspace();
    let inst = instance("cancel");
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let out = sandbox.run(spec(ws.path(), &inst, &["sleep", "120"]), &cancel).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(out.cancelled && !out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, Some(137), "{out:?}");
    assert_gone(&inst).await;

    // Already cancelled: nothing is created.
    let out = sandbox.run(spec(ws.path(), &inst, &["true"]), &cancel).await.unwrap();
    assert!(out.cancelled && out.exit_code.is_none());
}

#[tokio::test]
async fn dropping_the_run_removes_the_container() {
    let sandbox = sandbox().await;
    let ws = workspace();
    let inst = instance("drop");
    let never = CancellationToken::new();
    // It keeps writing after its reader went away: the engine must still remove it.
    let chatty = spec(ws.path(), &inst, &["sh", "-c", "while :; do echo chatter; done"]);
    let running = sandbox.run(chatty, &never);
    assert!(tokio::time::timeout(Duration::from_secs(3), running).await.is_err());
    let deadline = Instant::now() + Duration::from_secs(15);
    while containers_of(&inst).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_gone(&inst).await;
}

#[tokio::test]
async fn sweep_removes_leftovers_of_one_instance() {
    let sandbox = sandbox().await;
    let docker = docker().await;
    let (mine, other) = (instance("sweep"), instance("sweep-other"));
    for inst in [&mine, &mine, &other] {
        let labels =
            HashMap::from([(LABEL_SANDBOX.to_owned(), "1".to_owned()), (LABEL_INSTANCE.to_owned(), inst.clone())]);
        let body = ContainerCreateBody {
            image: Some(sandbox.config().image.clone()),
            cmd: Some(vec!["sleep".into(), "120".into()]),
            labels: Some(labels),
            ..Default::default()
        };
        let created = docker.create_container(None::<CreateContainerOptions>, body).await.unwrap();
        docker.start_container(&created.id, None::<bollard::query_parameters::StartContainerOptions>).await.unwrap();
    }
    assert_eq!(sandbox.sweep(Some(&mine)).await.unwrap(), 2);
    assert_gone(&mine).await;
    assert_eq!(containers_of(&other).await, 1, "sweep touched another instance");
    assert_eq!(sandbox.sweep(Some(&other)).await.unwrap(), 1);
    assert_eq!(sandbox.sweep(Some(&other)).await.unwrap(), 0);
    assert_gone(&other).await;
}

#[tokio::test]
async fn workspace_is_checked_and_a_risky_task_gets_its_runtime() {
    let cfg = SandboxConfig { runtime_by_risk: [("high".to_owned(), "runc".to_owned())].into(), ..Default::default() };
    let sandbox = sandbox_with(cfg).await;
    let ws = workspace();
    let inst = instance("spec");
    let relative = spec(Path::new("relative/dir"), &inst, &["true"]);
    assert!(matches!(
        sandbox.run(relative, &CancellationToken::new()).await,
        Err(SandboxError::InvalidWorkspace { .. })
    ));
    let missing = spec(Path::new("/nonexistent/agentfleet"), &inst, &["true"]);
    assert!(matches!(
        sandbox.run(missing, &CancellationToken::new()).await,
        Err(SandboxError::InvalidWorkspace { .. })
    ));

    let mut risky = spec(ws.path(), &inst, &["true"]);
    risky.risk = Some("HIGH".into());
    assert!(run(&sandbox, risky).await.success());
    assert_gone(&inst).await;
}

#[tokio::test]
async fn connect_names_what_is_missing() {
    let image = image().await;
    let missing = SandboxConfig { image: "agentfleet/sandbox:no-such-tag".into(), ..Default::default() };
    let error = Sandbox::connect(missing).await.unwrap_err();
    assert!(error.to_string().contains("run deploy/sandbox-image.sh"), "{error}");

    let no_runtime =
        SandboxConfig { image: image.clone(), runtime: Some("no-such-runtime".into()), ..Default::default() };
    let error = Sandbox::connect(no_runtime).await.unwrap_err();
    assert!(matches!(error, SandboxError::RuntimeMissing { .. }), "{error}");

    let bad_profile =
        SandboxConfig { image, seccomp_profile: Some("/nonexistent/seccomp.json".into()), ..Default::default() };
    let error = Sandbox::connect(bad_profile).await.unwrap_err();
    assert!(matches!(error, SandboxError::SeccompProfile { .. }), "{error}");
}

fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

/// Item 5 of issue 10: `dd` writing 4 GiB into `/workspace` under a 64 MiB limit. The
/// watchdog kills the container long before dd finishes, the run reports it and is not a
/// success, and the host disk keeps its space (less than 1 GiB was ever written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_the_workspace_past_its_limit_kills_the_run() {
    let limit: u64 = 64 * 1024 * 1024;
    let sandbox = sandbox_with(SandboxConfig { workspace_max_bytes: limit, ..Default::default() }).await;
    let ws = workspace();
    let id = instance("disk");
    let free_before = free_bytes(ws.path());
    let command = "dd if=/dev/zero of=/workspace/big bs=1M count=4096 2>/dev/null; echo dd finished";
    let out = run(&sandbox, spec(ws.path(), &id, &["sh", "-c", command])).await;
    assert!(out.disk_limit_exceeded, "{out:?}");
    assert!(!out.success());
    assert!(!text(&out).contains("dd finished"), "dd ran to its end: {}", text(&out));
    let written = std::fs::metadata(ws.path().join("big")).unwrap().len();
    eprintln!("dd wrote {written} bytes against a limit of {limit} before the watchdog killed it");
    assert!(written > limit && written < 1024 * 1024 * 1024, "dd was stopped after {written} bytes");
    let free_after = free_bytes(ws.path());
    assert!(
        free_after + 1024 * 1024 * 1024 > free_before,
        "the host disk lost {} bytes",
        free_before.saturating_sub(free_after)
    );
    assert_gone(&id).await;
    // Under the limit nothing happens: the same command writing 8 MiB succeeds.
    let small = "dd if=/dev/zero of=/workspace/small bs=1M count=8 2>/dev/null && echo ok";
    std::fs::remove_file(ws.path().join("big")).unwrap();
    let out = run(&sandbox, spec(ws.path(), &id, &["sh", "-c", small])).await;
    assert!(out.success() && !out.disk_limit_exceeded, "{out:?}");
    assert_gone(&id).await;
}
