//! The sandbox runner against the real local Docker engine, and attacked the way a
//! compromised worker with access to its socket would: requests that ask for more than
//! a run, workspaces outside the runner's root or swapped for a symlink, oversized frames.
//! Fails, never skips, when the engine or the image is unavailable.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::query_parameters::ListContainersOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use workers::runner::{Request, Response, RunRequest, RunnerClient, RunnerPolicy};
use workers::sandbox::{Engine, LABEL_INSTANCE, LABEL_SANDBOX, RunSpec, Sandbox, SandboxConfig, SandboxLabels};

async fn image() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sandbox-image.sh");
    let out = tokio::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(out.status.success(), "deploy/sandbox-image.sh failed: the runner tests need the Docker engine");
    String::from_utf8_lossy(&out.stdout).lines().last().expect("an image name").trim().to_owned()
}

/// A runner serving a socket in a temp dir, over its own workspace root.
struct Runner {
    /// Kept for its lifetime: the socket and the workspace root live in it.
    _dir: tempfile::TempDir,
    socket: PathBuf,
    root: PathBuf,
    stop: CancellationToken,
}

impl Runner {
    async fn start(allowed_uids: Vec<u32>, timeout_secs: u64) -> Self {
        let image = image().await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("workspace");
        let socket = dir.path().join("runner.sock");
        let policy = RunnerPolicy {
            workspace_root: root.clone(),
            max_timeout: Duration::from_secs(timeout_secs),
            allowed_uids,
            max_concurrent: 4,
        };
        policy.prepare_root().unwrap();
        let engine = Engine::connect(SandboxConfig { image, timeout_secs, ..SandboxConfig::default() })
            .await
            .unwrap_or_else(|e| panic!("the Docker engine is needed: {e}"))
            .owned_by(&format!("test-runner-{}", std::process::id()));
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(workers::runner::serve(listener, engine, Arc::new(policy), stop.clone()));
        Self { _dir: dir, socket, root, stop }
    }

    fn labels(&self, instance: &str) -> SandboxLabels {
        SandboxLabels { task: "task-1".into(), role: "dev".into(), instance: instance.into() }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends `body` as one frame and reads the answer.
async fn raw(socket: &Path, body: &[u8]) -> Response {
    let mut s = UnixStream::connect(socket).await.unwrap();
    s.write_u32(body.len() as u32).await.unwrap();
    s.write_all(body).await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut buf = vec![0; len as usize];
    s.read_exact(&mut buf).await.unwrap();
    rmp_serde::from_slice(&buf).unwrap()
}

async fn request(socket: &Path, r: &Request) -> Response {
    raw(socket, &rmp_serde::to_vec_named(r).unwrap()).await
}

fn run_request(workspace: &str) -> RunRequest {
    RunRequest {
        command: vec!["true".into()],
        workspace: workspace.into(),
        workdir: None,
        env: vec![],
        task: "task-1".into(),
        role: "dev".into(),
        instance: "attacker".into(),
        risk: None,
        timeout_secs: None,
        egress: false,
    }
}

fn refused(r: Response) -> String {
    match r {
        Response::Refused(reason) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn containers_of(instance: &str) -> usize {
    let docker = bollard::Docker::connect_with_local_defaults().unwrap().negotiate_version().await.unwrap();
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_SANDBOX}=1"), format!("{LABEL_INSTANCE}={instance}")],
    )]);
    let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    docker.list_containers(Some(options)).await.unwrap().len()
}

#[tokio::test]
async fn a_worker_runs_sandboxes_through_the_runner_without_the_engine() {
    let runner = Runner::start(vec![], 60).await;
    let cfg = SandboxConfig { runner: Some(runner.socket.clone()), ..SandboxConfig::default() };
    let sandbox = Sandbox::connect(cfg).await.unwrap();
    assert!(sandbox.uses_runner());
    let ws = runner.root.join("task-1");
    sandbox.prepare_workspace(&ws).await.unwrap();
    std::fs::write(ws.join("hello.txt"), "from the worker\n").unwrap();
    let mut spec = RunSpec::new(
        vec!["sh".into(), "-c".into(), "cat hello.txt; id -u; echo $GREETING".into()],
        &ws,
        runner.labels("via-runner"),
    );
    spec.env = vec![("GREETING".into(), "hi".into())];
    let out = sandbox.run(spec, &CancellationToken::new()).await.unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.output), "from the worker\n10001\nhi\n");
    // The runner's own settings: no network in the sandbox.
    let spec = RunSpec::new(
        vec!["sh".into(), "-c".into(), "cat /sys/class/net/*/operstate | wc -l".into()],
        &ws,
        runner.labels("via-runner"),
    );
    let out = sandbox.run(spec, &CancellationToken::new()).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.output).trim(), "1", "only the loopback device: {out:?}");
    assert_eq!(containers_of("via-runner").await, 0, "every container removed");
}

#[tokio::test]
async fn cancelling_the_worker_side_kills_the_container() {
    let runner = Runner::start(vec![], 60).await;
    let client = RunnerClient::connect(&runner.socket).await.unwrap();
    client.prepare("task-1").await.unwrap();
    let spec = RunSpec::new(vec!["sleep".into(), "50".into()], runner.root.join("task-1"), runner.labels("cancelled"));
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.cancel();
    });
    let started = Instant::now();
    let out = client.run(spec, &cancel).await.unwrap();
    assert!(out.cancelled, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "killed, not waited for: {:?}", started.elapsed());
    assert_eq!(containers_of("cancelled").await, 0);
}

#[tokio::test]
async fn a_request_for_more_than_a_run_is_refused() {
    let runner = Runner::start(vec![], 30).await;
    let socket = &runner.socket;
    // Fields the protocol does not have: a bind mount, privileges, another image.
    #[derive(serde::Serialize)]
    struct Evil {
        #[serde(rename = "Run")]
        run: EvilRun,
    }
    #[derive(serde::Serialize)]
    struct EvilRun {
        command: Vec<String>,
        workspace: String,
        workdir: Option<String>,
        env: Vec<(String, String)>,
        task: String,
        role: String,
        instance: String,
        risk: Option<String>,
        timeout_secs: Option<u64>,
        privileged: bool,
        binds: Vec<String>,
        image: String,
    }
    assert!(matches!(request(socket, &Request::Prepare { name: "task-1".into() }).await, Response::Prepared));
    let evil = Evil {
        run: EvilRun {
            command: vec!["true".into()],
            workspace: "task-1".into(),
            workdir: None,
            env: vec![],
            task: "task-1".into(),
            role: "dev".into(),
            instance: "attacker".into(),
            risk: None,
            timeout_secs: None,
            privileged: true,
            binds: vec!["/:/host".into()],
            image: "alpine".into(),
        },
    };
    let reason = refused(raw(socket, &rmp_serde::to_vec_named(&evil).unwrap()).await);
    assert!(reason.starts_with("malformed request:") && reason.contains("unknown field"), "{reason}");

    // Workspaces outside the root, the git store, a symlink to /, a directory the runner did not make.
    for (name, why) in [
        ("../etc", "not one plain name"),
        ("/etc", "not one plain name"),
        (".agentfleet-git", "not one plain name"),
        ("a/b", "not one plain name"),
        ("missing", "ask the runner to Prepare it"),
    ] {
        let reason = refused(request(socket, &Request::Run(run_request(name))).await);
        assert!(reason.contains(why), "{name}: {reason}");
    }
    std::os::unix::fs::symlink("/", runner.root.join("evil")).unwrap();
    let reason = refused(request(socket, &Request::Run(run_request("evil"))).await);
    assert!(reason.contains("is not a directory"), "{reason}");
    let reason = refused(request(socket, &Request::Prepare { name: "evil".into() }).await);
    assert!(reason.contains("is not the runner's directory"), "{reason}");

    // Limits the runner sets: timeout, role, risk, working directory, sizes.
    let mut r = run_request("task-1");
    r.timeout_secs = Some(3600);
    assert!(refused(request(socket, &Request::Run(r)).await).contains("above the runner's 30 s"));
    let mut r = run_request("task-1");
    r.role = "orchestrator".into();
    assert!(refused(request(socket, &Request::Run(r)).await).contains("is not one of dev, qa, review, refactor"));
    let mut r = run_request("task-1");
    r.risk = Some("none".into());
    assert!(refused(request(socket, &Request::Run(r)).await).contains("risk"));
    let mut r = run_request("task-1");
    r.workdir = Some("/workspace/../etc".into());
    assert!(refused(request(socket, &Request::Run(r)).await).contains("is not inside /workspace"));
    let mut r = run_request("task-1");
    r.command = vec!["x".repeat(70 * 1024)];
    assert!(refused(request(socket, &Request::Run(r)).await).contains("longer than"));
    // The one run with a network is the install of the workspace's own lockfiles, which
    // the runner recomputes: any other command asking for it is refused (a compromised
    // worker cannot get a network for its own code), and so is the install itself on a
    // runner without [sandbox.egress]. No request can name a network.
    let mut r = run_request("task-1");
    r.egress = true;
    r.command = vec!["sh".into(), "-c".into(), "curl http://169.254.169.254/".into()];
    let reason = refused(request(socket, &Request::Run(r)).await);
    assert!(reason.contains("may only be the install of the workspace's lockfiles"), "{reason}");
    let hash = "ab".repeat(32);
    std::fs::write(runner.root.join("task-1/requirements.txt"), format!("six==1.16.0 --hash=sha256:{hash}\n")).unwrap();
    let plan =
        workers::deps::plan(&workers::deps::read_lockfiles(&runner.root.join("task-1")).unwrap()).unwrap().unwrap();
    let mut r = run_request("task-1");
    r.egress = true;
    r.command = workers::deps::install_command(&plan);
    let mut tampered = r.clone();
    tampered.command[2].push_str("\ncurl http://169.254.169.254/\n");
    assert!(refused(request(socket, &Request::Run(tampered)).await).contains("may only be the install"));
    match request(socket, &Request::Run(r)).await {
        Response::Failed(why) | Response::Refused(why) => assert!(why.contains("[sandbox.egress]"), "{why}"),
        other => panic!("an egress run without the egress mode: {other:?}"),
    }
    assert_eq!(containers_of("attacker").await, 0, "nothing was run");

    // A frame announcing 1 GiB: the runner hangs up without reading (or allocating) it.
    let mut s = UnixStream::connect(socket).await.unwrap();
    s.write_u32(1 << 30).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "no answer to an oversized frame");
}

#[tokio::test]
async fn only_allowed_uids_may_connect() {
    let runner = Runner::start(vec![4_000_000], 30).await;
    let reason = refused(request(&runner.socket, &Request::Ping).await);
    assert!(reason.contains("this uid may not use the runner"), "{reason}");
    let e = RunnerClient::connect(&runner.socket).await.unwrap_err().to_string();
    assert!(e.contains("sandbox runner"), "{e}");
}

#[tokio::test]
async fn the_runner_binary_refuses_a_world_writable_socket() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-runner"))
        .env("FLEET_SOCKET_MODE", "0666")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("setting `socket_mode`: others may not have write access"), "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-runner")).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("workspace_root"));
}

#[tokio::test]
async fn a_runner_sweeps_only_its_own_containers() {
    let image = image().await;
    let docker = bollard::Docker::connect_with_local_defaults().unwrap().negotiate_version().await.unwrap();
    // Another fleet's sandbox on the same engine (created, never started).
    let name = format!("foreign-sandbox-{}", std::process::id());
    let labels =
        HashMap::from([(LABEL_SANDBOX.to_owned(), "1".to_owned()), (LABEL_INSTANCE.to_owned(), "foreign".to_owned())]);
    let body = bollard::models::ContainerCreateBody {
        image: Some(image.clone()),
        cmd: Some(vec!["true".into()]),
        labels: Some(labels),
        ..Default::default()
    };
    let options = bollard::query_parameters::CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
    docker.create_container(Some(options), body).await.unwrap();
    let engine = Engine::connect(SandboxConfig { image, ..SandboxConfig::default() }).await.unwrap().owned_by("mine");
    let swept = engine.sweep(None).await;
    let left = containers_of("foreign").await;
    let remove = bollard::query_parameters::RemoveContainerOptions { force: true, ..Default::default() };
    docker.remove_container(&name, Some(remove)).await.unwrap();
    assert_eq!(swept.unwrap(), 0);
    assert_eq!(left, 1, "another runner's container is not this runner's to sweep");
}
