//! The workers' integration harness: a real Redis, the real Docker sandbox, a bare git
//! repository made from `deploy/example-repo`, and the test acting as the orchestrator
//! (assignments, tool proxy, reading results) and as the budget manager (kill switch).
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{Publisher, PublisherConfig, now_ms, reply};
use envelope::*;
use fleet_testkit::RedisServer;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PERMISSIONS: &str = include_str!("../../../config/permissions.toml");
pub const PERMISSIONS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/permissions.toml");
pub const EXAMPLE_REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/example-repo");

/// A capability lease as the orchestrator mints it (the worker reads its claims; only the
/// orchestrator checks the signature, so the test's is a placeholder), granting what the
/// risk matrix grants `role`.
pub fn lease(task: Uuid, role: Role) -> String {
    lease_granting(task, role, &grants(role))
}

/// The risk matrix's grants of `role`, as shipped.
pub fn grants(role: Role) -> Vec<&'static str> {
    match role {
        Role::Dev => vec!["llm.complete", "read_files", "write_to_task_branch", "run_tests", "linter", "pkg_install"],
        Role::Qa => vec!["llm.complete", "read_files", "run_tests", "pkg_install"],
        Role::Review => vec!["llm.complete", "read_files"],
        _ => vec!["llm.complete", "read_files", "write_to_task_branch", "linter", "pkg_install"],
    }
}

/// A lease of `task` for `role` granting `actions`, valid for ten minutes.
pub fn lease_granting(task: Uuid, role: Role, actions: &[&str]) -> String {
    use base64::Engine as _;
    let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let actions: Vec<_> = actions.iter().map(|a| serde_json::json!({"action": a, "risk": "low"})).collect();
    let claims = serde_json::json!({"task": task, "role": role.as_str(), "exp": exp, "actions": actions, "risk": "low", "max_tokens": 100000});
    format!("{}.{}.test-signature", b(r#"{"alg":"HS256","typ":"JWT"}"#), b(&claims.to_string()))
}

pub fn master() -> MasterFile {
    MasterFile::new(MasterSecret::from_bytes([11; 32]))
}

pub fn keyset(process: Process) -> Keyset {
    master().derive_keyset(process, &PermissionTable::parse(PERMISSIONS).unwrap())
}

pub fn verifier(role: Role) -> Verifier {
    Verifier::new(
        keyset(Process::Role(role)).into_keyring(),
        PermissionTable::parse(PERMISSIONS).unwrap(),
        VerifierConfig::default(),
    )
}

/// A Dev answer from a model without tool support: the demo's fix as a unified diff in
/// plain text (trailing whitespace on purpose, for Refactor's formatter).
pub fn fixture_dev_answer() -> String {
    "Here is the fix:\n\n```diff\ndiff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -3,7 +3,7 @@\n \n def add(a, b):\n     \"\"\"Return the sum of a and b.\"\"\"\n-    return a - b\n+    return a + b \n \n \n def sub(a, b):\n```\n".to_owned()
}

fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@localhost"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A tool call the test proxy saw.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub envelope: Envelope,
    pub request: ToolRequest,
}

/// How the test proxy answers: `(ok, output JSON)`.
pub type Answer = Arc<dyn Fn(&SeenRequest) -> (bool, String) + Send + Sync>;

pub struct Fleet {
    pub redis: RedisServer,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub pool: bus::RedisPool,
    orchestrator: Publisher,
    budget: Publisher,
    pub shutdown: CancellationToken,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Fleet {
    pub fn new() -> Self {
        let redis = RedisServer::start().expect("redis-server is needed (apt-get install redis-server)");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("workspaces");
        std::fs::create_dir_all(&root).unwrap();
        let url = secrecy::SecretString::from(redis.url());
        let pool = bus::pool(&url, 16, Duration::from_secs(2)).unwrap();
        let orchestrator = Publisher::new(
            pool.clone(),
            Arc::new(keyset(Process::Role(Role::Orchestrator)).into_keyring()),
            PublisherConfig::default(),
        );
        let budget = Publisher::new(
            pool.clone(),
            Arc::new(keyset(Process::Role(Role::Budget)).into_keyring()),
            PublisherConfig::default(),
        );
        Self { redis, dir, root, pool, orchestrator, budget, shutdown: CancellationToken::new() }
    }

    /// A bare repository made from `deploy/example-repo`, with `edit` applied to the copy first.
    pub fn origin(&self, name: &str, edit: impl FnOnce(&Path)) -> String {
        let src = self.dir.path().join(format!("{name}-src"));
        copy_dir(Path::new(EXAMPLE_REPO), &src);
        edit(&src);
        git(&src, &["init", "-q", "-b", "main"]);
        git(&src, &["add", "-A"]);
        git(&src, &["commit", "-qm", "example"]);
        let bare = self.dir.path().join(format!("{name}.git"));
        git(self.dir.path(), &["clone", "-q", "--bare", src.to_str().unwrap(), bare.to_str().unwrap()]);
        bare.to_string_lossy().into_owned()
    }

    /// Writes the worker's keyset and configuration; returns the configuration's path.
    pub fn worker_config(&self, role: Role, instance: &str, extra: &str) -> PathBuf {
        self.worker_config_with(role, instance, extra, "")
    }

    /// [`Self::worker_config`] with `sandbox_extra` lines in its `[sandbox]` table.
    pub fn worker_config_with(&self, role: Role, instance: &str, extra: &str, sandbox_extra: &str) -> PathBuf {
        let ks = self.dir.path().join(format!("{role}.keyset.toml"));
        std::fs::write(&ks, keyset(Process::Role(role)).to_toml().as_bytes()).unwrap();
        let cfg = format!(
            "redis_url = \"{}\"\nkeyset = \"{}\"\npermissions = \"{PERMISSIONS_PATH}\"\ninstance = \"{instance}\"\n\
             workspace_root = \"{}\"\nheartbeat_secs = 1\ntool_timeout_secs = 20\ngrace_secs = 2\n{extra}\n\
             [sandbox]\ntimeout_secs = 60\n{sandbox_extra}\n[consumer]\nclaim_idle_secs = 20\nretry_max_secs = 2\nblock_ms = 500\n",
            self.redis.url(),
            ks.display(),
            self.root.display()
        );
        let path = self.dir.path().join(format!("{instance}.toml"));
        std::fs::write(&path, cfg).unwrap();
        path
    }

    /// Starts a worker inside this test process.
    pub fn start_worker(&self, role: Role, instance: &str) -> tokio::task::JoinHandle<()> {
        self.start_worker_with(role, instance, "")
    }

    /// [`Self::start_worker`] with `sandbox_extra` lines in its `[sandbox]` table.
    pub fn start_worker_with(&self, role: Role, instance: &str, sandbox_extra: &str) -> tokio::task::JoinHandle<()> {
        let path = self.worker_config_with(role, instance, "", sandbox_extra);
        let cfg = workers::config::WorkerConfig::load(Some(&path), role, None, &fleetconf::Env::default()).unwrap();
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = workers::runtime::run(cfg, stop).await {
                panic!("worker failed: {e:#}");
            }
        })
    }

    /// The workspace of `task`.
    pub fn workspace(&self, task: Uuid) -> PathBuf {
        self.root.join(format!("task-{task}"))
    }

    pub fn assignment(&self, task: Uuid, repository: &str) -> TaskAssign {
        TaskAssign {
            attempt: 1,
            instructions: "The test suite of this project fails: fix the failing test by correcting calc.py.".into(),
            workspace: self.workspace(task).to_string_lossy().into_owned(),
            repository: Some(repository.to_owned()),
            test_command: None,
            findings: Vec::new(),
            scope: vec!["calc.py".into(), "tests/".into()],
            change: None,
            change_sha256: None,
        }
    }

    /// Publishes `task.assign` to `role` under kill epoch `epoch`; returns the envelope id.
    pub async fn assign(&self, role: Role, task: Uuid, a: TaskAssign, epoch: u64) -> Uuid {
        let from = Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-test").unwrap() };
        let mut env = Envelope::new(from, role, now_ms(), 600_000, epoch, Payload::TaskAssign(a));
        env.task_id = Some(task);
        env.lease = Some(lease(task, role));
        self.orchestrator.publish(&StreamName::tasks(role), &env).await.unwrap();
        env.id
    }

    /// Entries of `stream` after `cursor`, verified as the orchestrator would.
    pub async fn read(&self, stream: &str, cursor: &mut String) -> Vec<Envelope> {
        let v = verifier(Role::Orchestrator);
        let mut c = self.pool.get().await.unwrap();
        let reply: redis::Value =
            redis::cmd("XRANGE").arg(stream).arg(format!("({cursor}")).arg("+").query_async(&mut c).await.unwrap();
        let mut out = Vec::new();
        for e in reply::entries("XRANGE", &reply).unwrap() {
            cursor.clone_from(&e.id);
            let ctx = VerifyContext { now_ms: now_ms(), kill_epoch: 0 };
            let checked = v.check(stream, e.field("env").unwrap(), ctx).unwrap();
            out.push(checked.envelope().clone());
        }
        out
    }

    /// Waits for the result answering assignment `assignment`.
    pub async fn result(&self, assignment: Uuid, within: Duration) -> (Envelope, TaskResult) {
        let deadline = Instant::now() + within;
        let mut cursor = "0-0".to_owned();
        loop {
            for env in self.read(streams::RESULTS, &mut cursor).await {
                if env.causation_id == Some(assignment) {
                    let Payload::TaskResult(r) = env.payload.clone() else { panic!("not a result: {env:?}") };
                    return (env, r);
                }
            }
            assert!(Instant::now() < deadline, "no result for assignment {assignment} within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// All results of `task` so far.
    pub async fn results_of(&self, task: Uuid) -> Vec<TaskResult> {
        let mut cursor = "0-0".to_owned();
        self.read(streams::RESULTS, &mut cursor)
            .await
            .into_iter()
            .filter(|e| e.task_id == Some(task))
            .filter_map(|e| match e.payload {
                Payload::TaskResult(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// Runs the test's tool proxy: answers every `tool.request` with `answer`, on the
    /// requester's own response stream. Returns what it saw.
    pub fn proxy(&self, answer: Answer) -> Arc<std::sync::Mutex<Vec<SeenRequest>>> {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let pool = self.pool.clone();
        let publisher = Publisher::new(
            pool.clone(),
            Arc::new(keyset(Process::Role(Role::Orchestrator)).into_keyring()),
            PublisherConfig::default(),
        );
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            let v = verifier(Role::Orchestrator);
            let mut guard = MemoryReplayGuard::new();
            let mut cursor = "0-0".to_owned();
            let mut c = pool.dedicated().await.unwrap();
            while !stop.is_cancelled() {
                let reply: redis::Value = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(200)
                    .arg("STREAMS")
                    .arg(streams::TOOL_REQUESTS)
                    .arg(&cursor)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                for e in reply::read_one_stream(&reply).unwrap() {
                    cursor.clone_from(&e.id);
                    let now = now_ms();
                    let env = v
                        .verify(
                            streams::TOOL_REQUESTS,
                            e.field("env").unwrap(),
                            VerifyContext { now_ms: now, kill_epoch: 0 },
                            &mut guard,
                        )
                        .unwrap()
                        .into_inner();
                    let Payload::ToolRequest(request) = env.payload.clone() else { panic!("{env:?}") };
                    let req = SeenRequest { envelope: env.clone(), request: request.clone() };
                    let (ok, output) = answer(&req);
                    seen2.lock().unwrap().push(req);
                    let from =
                        Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-test").unwrap() };
                    let mut reply_env = Envelope::new(
                        from,
                        env.from.role,
                        now_ms(),
                        60_000,
                        0,
                        Payload::ToolResponse(ToolResponse { request_id: request.request_id, ok, output }),
                    );
                    reply_env.task_id = env.task_id;
                    reply_env.causation_id = Some(env.id);
                    let stream = StreamName::tool_responses(env.from.role, &env.from.instance);
                    publisher.publish(&stream, &reply_env).await.unwrap();
                }
            }
        });
        seen
    }

    /// Answers every `llm.complete` with `text`, except the LLM reviewer's, which approves
    /// through `finish`.
    pub fn proxy_text(&self, text: String) -> Arc<std::sync::Mutex<Vec<SeenRequest>>> {
        self.proxy(Arc::new(move |req| {
            if req.envelope.from.role == Role::Review {
                return (true, approve_answer());
            }
            let out = serde_json::json!({"text": text, "model": "scripted-1", "input_tokens": 10, "output_tokens": 5});
            (true, out.to_string())
        }))
    }

    /// Engages (`pause`) or releases the kill switch as the budget manager does: the state
    /// record, then the control message on the role's stream.
    pub async fn kill_switch(&self, role: Role, epoch: u64, pause: bool) {
        let mut c = self.pool.get().await.unwrap();
        let _: () = redis::cmd("HSET")
            .arg(bus::control::KILLSWITCH_KEY)
            .arg("epoch")
            .arg(epoch)
            .arg("engaged")
            .arg(if pause { "1" } else { "0" })
            .arg("by")
            .arg("test")
            .arg("reason")
            .arg("test pause")
            .arg("at_ms")
            .arg(now_ms())
            .query_async(&mut c)
            .await
            .unwrap();
        let from = Sender { role: Role::Budget, instance: Instance::parse("budget-test").unwrap() };
        let payload = if pause {
            Payload::ControlPause(ControlPause { epoch, reason: "test pause".into(), by: None })
        } else {
            Payload::ControlResume(ControlResume { epoch, by: None })
        };
        let env = Envelope::new(from, role, now_ms(), 60_000, epoch, payload);
        self.budget.publish(&StreamName::control(role), &env).await.unwrap();
    }

    /// Pending entries and undelivered count of the role's task group.
    pub async fn pending(&self, role: Role) -> u64 {
        let mut c = self.pool.get().await.unwrap();
        let v: redis::Value = redis::cmd("XPENDING")
            .arg(StreamName::tasks(role).as_str())
            .arg(role.as_str())
            .query_async(&mut c)
            .await
            .unwrap();
        match v {
            redis::Value::Array(items) => items.first().and_then(reply::int).unwrap_or(0) as u64,
            _ => 0,
        }
    }
}

/// Sandbox containers of `instance` (running or not), via the Docker CLI.
pub fn containers_of(instance: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=agentfleet.instance={instance}")])
        .output()
        .expect("the docker CLI is needed");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// Waits until `cond` holds.
/// The LLM reviewer's approval: one `finish` call.
pub fn approve_answer() -> String {
    tool_answer(&[("finish", serde_json::json!({"verdict": "approve", "reasons": ["does what the task asks"]}))])
}

/// A model answer calling `calls` (name, arguments), as the tool proxy returns it.
pub fn tool_answer(calls: &[(&str, serde_json::Value)]) -> String {
    let calls: Vec<_> = calls
        .iter()
        .enumerate()
        .map(|(i, (name, args))| serde_json::json!({"id": format!("call_{i}"), "name": name, "arguments": args}))
        .collect();
    serde_json::json!({"text": "", "tool_calls": calls, "finish_reason": "tool_calls", "model": "scripted-1", "input_tokens": 10, "output_tokens": 5}).to_string()
}

pub async fn wait_until(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes the file system holding `path` has available, as `df` reports them.
pub fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}
