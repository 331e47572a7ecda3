//! The per-host sandbox runner: the one process on a host that holds the Docker engine.
//!
//! A worker in a container must not have the engine's socket: whoever has it is root on the
//! host. So workers ask `sandbox-runner` over a unix socket, and the runner starts the
//! container with *its own* settings (image, network none, read-only root, user, no
//! capabilities, seccomp, limits, runtime): a request names only the command, the task's
//! workspace directory, the environment, the labels, the risk level and a timeout no
//! longer than the runner allows. Nothing in the protocol can ask for a mount, a device, a
//! capability, a network or another image (unknown fields are refused).
//!
//! # The workspace directory
//! The runner owns the workspace root (mode 0755, the runner's user): workers cannot add,
//! rename or replace its entries. A worker asks the runner to [`Request::Prepare`] a task's
//! directory (`<root>/<name>`, one plain component, made 0777 for the worker and the sandbox
//! user), and fills it; the runner bind-mounts exactly that directory. Because its parent
//! is the runner's, no worker can swap it for a symlink to `/` between the check and the
//! mount. The git store `<root>/.agentfleet-git` is the workers' (0777) and never mounted.
//!
//! # Protocol
//! One request per connection, each way one frame: a 4-byte big-endian length and a
//! MessagePack body (at most [`MAX_FRAME`]). While a `Run` goes on the runner watches the
//! connection: when the worker closes its side (it was cancelled, or died), the container
//! is killed and removed.
//!
//! # Layout
//! - [`Request`], [`Response`]: the wire ([`RunOutput`] travels as it is).
//! - [`RunnerPolicy`], [`serve`]: the runner's side.
//! - [`RunnerClient`]: the workers' side, behind [`crate::sandbox::Sandbox`].

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::sandbox::{Engine, RunOutput, RunSpec, SandboxError, SandboxLabels};
use crate::workspace::GIT_STORE;

/// Largest frame either side accepts (a run's output is capped far below this).
pub const MAX_FRAME: u32 = 4 * 1024 * 1024;
/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most arguments, environment variables and bytes per string a run may carry.
const MAX_ARGS: usize = 256;
const MAX_ENV: usize = 128;
const MAX_STRING: usize = 64 * 1024;
/// The roles whose workers may use the runner (the `agentfleet.role` label).
const ROLES: [&str; 4] = ["dev", "qa", "review", "refactor"];
/// The risk levels a run may name (they choose the runtime).
const RISKS: [&str; 4] = ["low", "medium", "high", "critical"];

/// What a worker asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Request {
    /// Is the runner there? Answered with [`Response::Pong`].
    Ping,
    /// Create (if missing) the workspace directory `<root>/<name>`.
    Prepare { name: String },
    /// Run one command in a fresh container over the workspace `<root>/<workspace>`.
    Run(RunRequest),
    /// Remove every sandbox container, or only those of `instance`.
    Sweep { instance: Option<String> },
    /// Kill and remove every sandbox container of `task`.
    Quiesce { task: String },
}

/// One run, as a worker may ask for it. Everything else is the runner's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The workspace directory's name under the runner's root.
    pub workspace: String,
    /// Working directory inside the container (under `/workspace`).
    pub workdir: Option<String>,
    /// The command's environment.
    pub env: Vec<(String, String)>,
    /// Labels: the task, the worker's role and instance.
    pub task: String,
    pub role: String,
    pub instance: String,
    /// Risk level (chooses the runtime).
    pub risk: Option<String>,
    /// Wall-clock limit; at most the runner's own.
    pub timeout_secs: Option<u64>,
    /// An install run: the runner's own egress mode (its `[sandbox.egress]` network and
    /// proxy), never a network the worker names. Refused where the runner has none.
    #[serde(default)]
    pub egress: bool,
}

/// What the runner answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Pong,
    Prepared,
    Ran(RunOutput),
    Removed(usize),
    /// The request broke the runner's rules (the reason says which); nothing was run.
    Refused(String),
    /// The engine failed.
    Failed(String),
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let len = r.read_u32().await?;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut buf = vec![0; len as usize];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, value: &T) -> std::io::Result<()> {
    let body = rmp_serde::to_vec_named(value).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    w.write_u32(len).await?;
    w.write_all(&body).await?;
    w.flush().await
}

/// What the runner allows, besides what its [`Engine`]'s settings enforce.
#[derive(Debug, Clone)]
pub struct RunnerPolicy {
    /// The workspace root: the runner's own directory, shared with the workers (and the
    /// engine) at the same path.
    pub workspace_root: PathBuf,
    /// The longest run a request may ask for; also the default.
    pub max_timeout: Duration,
    /// Peer uids allowed to connect; empty allows any (the socket's mode then decides).
    pub allowed_uids: Vec<u32>,
    /// Runs at once; more wait.
    pub max_concurrent: usize,
}

impl RunnerPolicy {
    /// Creates the workspace root and the workers' git store if missing, and checks that
    /// the root is this process's and writable by nobody else: the guarantee that a
    /// workspace cannot be swapped for a symlink rests on it.
    pub fn prepare_root(&self) -> Result<(), String> {
        let root = &self.workspace_root;
        if !root.is_absolute() {
            return Err(format!("workspace_root {} is not absolute", root.display()));
        }
        std::fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let meta = std::fs::symlink_metadata(root).map_err(|e| format!("cannot stat {}: {e}", root.display()))?;
        if !meta.is_dir() {
            return Err(format!("workspace_root {} is not a directory (a symlink?)", root.display()));
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            std::os::unix::fs::chown(root, Some(me), None).map_err(|e| {
                format!(
                    "workspace_root {} belongs to uid {}, not to the runner (uid {me}): {e}",
                    root.display(),
                    meta.uid()
                )
            })?;
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod 0755 {}: {e}", root.display()))?;
        let store = root.join(GIT_STORE);
        std::fs::create_dir_all(&store).map_err(|e| format!("cannot create {}: {e}", store.display()))?;
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| format!("cannot chmod {}: {e}", store.display()))?;
        Ok(())
    }

    /// `<root>/<name>` for a name that is one plain component.
    fn directory(&self, name: &str) -> Result<PathBuf, String> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(format!(
                "workspace {:?} is not one plain name ([A-Za-z0-9._-], not starting with '.')",
                truncate(name)
            ));
        }
        Ok(self.workspace_root.join(name))
    }

    /// Checks a run against the rules and makes the engine's spec of it.
    fn spec(&self, r: RunRequest) -> Result<RunSpec, String> {
        let dir = self.directory(&r.workspace)?;
        let meta = std::fs::symlink_metadata(&dir)
            .map_err(|e| format!("workspace {} cannot be used: {e}; ask the runner to Prepare it", r.workspace))?;
        if !meta.is_dir() {
            return Err(format!("workspace {} is not a directory", r.workspace));
        }
        if meta.uid() != rustix::process::geteuid().as_raw() {
            return Err(format!("workspace {} was not made by the runner (Prepare it)", r.workspace));
        }
        if r.command.is_empty() || r.command.len() > MAX_ARGS {
            return Err(format!("a command has 1 to {MAX_ARGS} arguments"));
        }
        if r.env.len() > MAX_ENV {
            return Err(format!("at most {MAX_ENV} environment variables"));
        }
        let strings = r.command.iter().chain(r.env.iter().flat_map(|(k, v)| [k, v]));
        if strings.into_iter().any(|s| s.len() > MAX_STRING || s.contains('\0')) {
            return Err(format!("an argument or variable is longer than {MAX_STRING} bytes or holds a NUL"));
        }
        if let Some(w) = &r.workdir
            && (!(w == "/workspace" || w.starts_with("/workspace/")) || w.split('/').any(|c| c == ".."))
        {
            return Err(format!("workdir {:?} is not inside /workspace", truncate(w)));
        }
        let label_ok = |s: &str| {
            !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        };
        if !label_ok(&r.task) || !label_ok(&r.instance) {
            return Err("task and instance are 1 to 128 of [A-Za-z0-9_-]".into());
        }
        if !ROLES.contains(&r.role.as_str()) {
            return Err(format!("role {:?} is not one of {}", truncate(&r.role), ROLES.join(", ")));
        }
        if let Some(risk) = &r.risk
            && !RISKS.iter().any(|k| k.eq_ignore_ascii_case(risk))
        {
            return Err(format!("risk {:?} is not one of {}", truncate(risk), RISKS.join(", ")));
        }
        let timeout = match r.timeout_secs {
            None => self.max_timeout,
            Some(0) => return Err("the timeout must be positive".into()),
            Some(s) if Duration::from_secs(s) > self.max_timeout => {
                return Err(format!("a timeout of {s} s is above the runner's {} s", self.max_timeout.as_secs()));
            }
            Some(s) => Duration::from_secs(s),
        };
        let labels = SandboxLabels { task: r.task, role: r.role, instance: r.instance };
        let mut spec = RunSpec::new(r.command, dir, labels);
        spec.workdir = r.workdir;
        spec.env = r.env;
        spec.risk = r.risk;
        spec.timeout = Some(timeout);
        if r.egress {
            // The one run with a network runs the install of the workspace's own lockfiles
            // and nothing else, whatever a (compromised) worker asks: the runner recomputes
            // the command. Nothing of the files goes back in the refusal.
            let expected = crate::deps::read_lockfiles(&spec.workspace)
                .and_then(|files| crate::deps::plan(&files))
                .ok()
                .flatten()
                .map(|plan| crate::deps::install_command(&plan));
            if expected.as_ref() != Some(&spec.command) || !spec.env.is_empty() || spec.workdir.is_some() {
                return Err("an egress run may only be the install of the workspace's lockfiles \
                            (workers::deps::install_command), with no environment or working directory of its own"
                    .into());
            }
            spec.network = crate::sandbox::Network::Egress;
        }
        Ok(spec)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Serves `listener` until `shutdown`; each connection is one request.
pub async fn serve(listener: UnixListener, engine: Engine, policy: Arc<RunnerPolicy>, shutdown: CancellationToken) {
    let permits = Arc::new(tokio::sync::Semaphore::new(policy.max_concurrent.max(1)));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "Accepting a connection failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (engine, policy, permits, shutdown) = (engine.clone(), policy.clone(), permits.clone(), shutdown.clone());
        tasks.spawn(async move { handle(stream, &engine, &policy, &permits, &shutdown).await });
    }
    tasks.close();
    tasks.wait().await;
}

async fn handle(
    mut stream: UnixStream,
    engine: &Engine,
    policy: &RunnerPolicy,
    permits: &tokio::sync::Semaphore,
    shutdown: &CancellationToken,
) {
    let peer = stream.peer_cred().ok();
    let uid = peer.map(|p| p.uid());
    let pid = peer.and_then(|p| p.pid());
    if !policy.allowed_uids.is_empty() && !uid.is_some_and(|u| policy.allowed_uids.contains(&u)) {
        tracing::warn!(uid, pid, "Refused a connection from a uid not in allowed_uids.");
        let _ = write_frame(&mut stream, &Response::Refused("this uid may not use the runner".into())).await;
        return;
    }
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut stream)).await {
        Ok(Ok(body)) => match rmp_serde::from_slice::<Request>(&body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(uid, pid, error = %e, "Refused a malformed request.");
                let _ = write_frame(&mut stream, &Response::Refused(format!("malformed request: {e}"))).await;
                return;
            }
        },
        Ok(Err(e)) => {
            tracing::debug!(uid, pid, error = %e, "A connection ended before its request.");
            return;
        }
        Err(_) => {
            tracing::warn!(uid, pid, "A connection sent no request in time.");
            return;
        }
    };
    let response = match request {
        Request::Ping => Response::Pong,
        Request::Prepare { name } => match prepare(policy, &name) {
            Ok(()) => Response::Prepared,
            Err(reason) => refuse(uid, pid, reason),
        },
        Request::Sweep { instance } => {
            if instance.as_deref().is_some_and(|i| i.is_empty() || i.len() > 128) {
                refuse(uid, pid, "an instance name is 1 to 128 bytes".into())
            } else {
                removed(engine.sweep(instance.as_deref()).await)
            }
        }
        Request::Quiesce { task } => {
            if task.is_empty() || task.len() > 128 {
                refuse(uid, pid, "a task id is 1 to 128 bytes".into())
            } else {
                removed(engine.quiesce_task(&task).await)
            }
        }
        Request::Run(run) => match policy.spec(run) {
            Err(reason) => refuse(uid, pid, reason),
            Ok(spec) => {
                let Ok(_permit) = permits.acquire().await else { return };
                tracing::info!(uid, pid, task = %spec.labels.task, instance = %spec.labels.instance, "Running a sandbox.");
                let (mut read, mut write) = stream.into_split();
                let cancel = shutdown.child_token();
                // The worker closing its side (cancelled or dead) ends the run.
                let watcher = {
                    let cancel = cancel.clone();
                    tokio::spawn(async move {
                        let mut byte = [0u8; 1];
                        let _ = read.read(&mut byte).await;
                        cancel.cancel();
                    })
                };
                let result = engine.run(spec, &cancel).await;
                watcher.abort();
                let response = match result {
                    Ok(output) => Response::Ran(output),
                    Err(e) => Response::Failed(e.to_string()),
                };
                if let Err(e) = write_frame(&mut write, &response).await {
                    tracing::debug!(error = %e, "The worker left before the result.");
                }
                return;
            }
        },
    };
    if let Err(e) = write_frame(&mut stream, &response).await {
        tracing::debug!(error = %e, "The worker left before the answer.");
    }
}

fn refuse(uid: Option<u32>, pid: Option<i32>, reason: String) -> Response {
    tracing::warn!(uid, pid, reason = %reason, "Refused a request.");
    Response::Refused(reason)
}

fn removed(result: Result<usize, SandboxError>) -> Response {
    match result {
        Ok(n) => Response::Removed(n),
        Err(e) => Response::Failed(e.to_string()),
    }
}

fn prepare(policy: &RunnerPolicy, name: &str) -> Result<(), String> {
    let dir = policy.directory(name)?;
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() && meta.uid() == rustix::process::geteuid().as_raw() => return Ok(()),
        Ok(_) => return Err(format!("{name} exists and is not the runner's directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot stat {name}: {e}")),
    }
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {name}: {e}"))?;
    // The worker (another uid) fills it; the sandbox user writes it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("cannot chmod {name}: {e}"))
}

/// The name under the runner's root of a worker's workspace directory (its last component).
pub(crate) fn workspace_name(workspace: &Path) -> Result<&str, SandboxError> {
    workspace
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| SandboxError::InvalidSpec(format!("workspace {} has no name", workspace.display())))
}

/// The workers' side: one connection per request to the runner's socket.
#[derive(Debug, Clone)]
pub struct RunnerClient {
    socket: PathBuf,
}

impl RunnerClient {
    /// Checks that the runner at `socket` answers.
    pub async fn connect(socket: &Path) -> Result<Self, SandboxError> {
        let client = Self { socket: socket.to_owned() };
        match client.call(&Request::Ping).await? {
            Response::Pong => Ok(client),
            other => Err(client.protocol(format!("answered {other:?} to a ping"))),
        }
    }

    fn protocol(&self, problem: String) -> SandboxError {
        SandboxError::RunnerUnreachable { socket: self.socket.clone(), problem }
    }

    async fn open(&self) -> Result<UnixStream, SandboxError> {
        UnixStream::connect(&self.socket).await.map_err(|e| self.protocol(format!("cannot be reached ({e})")))
    }

    async fn call(&self, request: &Request) -> Result<Response, SandboxError> {
        let mut stream = self.open().await?;
        write_frame(&mut stream, request).await.map_err(|e| self.protocol(format!("took no request ({e})")))?;
        let body = read_frame(&mut stream).await.map_err(|e| self.protocol(format!("gave no answer ({e})")))?;
        rmp_serde::from_slice(&body).map_err(|e| self.protocol(format!("answered something unreadable ({e})")))
    }

    /// Has the runner create the workspace directory `name` under its root.
    pub async fn prepare(&self, name: &str) -> Result<(), SandboxError> {
        match self.call(&Request::Prepare { name: name.to_owned() }).await? {
            Response::Prepared => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// [`crate::sandbox::Sandbox::run`] through the runner. The workspace must be a
    /// directory directly under the runner's root; cancelling closes the request's write
    /// side, and the runner kills the container and reports the run as cancelled.
    pub async fn run(&self, spec: RunSpec, cancel: &CancellationToken) -> Result<RunOutput, SandboxError> {
        let name = workspace_name(&spec.workspace)?.to_owned();
        let request = Request::Run(RunRequest {
            command: spec.command,
            workspace: name,
            workdir: spec.workdir,
            env: spec.env,
            task: spec.labels.task,
            role: spec.labels.role,
            instance: spec.labels.instance,
            risk: spec.risk,
            timeout_secs: spec.timeout.map(|t| t.as_secs().max(1)),
            egress: spec.network == crate::sandbox::Network::Egress,
        });
        let stream = self.open().await?;
        let (mut read, mut write) = stream.into_split();
        write_frame(&mut write, &request).await.map_err(|e| self.protocol(format!("took no request ({e})")))?;
        let answer = tokio::select! {
            answer = read_frame(&mut read) => answer,
            () = cancel.cancelled() => {
                // Half-close: the runner stops the run and still answers.
                drop(write);
                read_frame(&mut read).await
            }
        };
        let body = answer.map_err(|e| self.protocol(format!("gave no result ({e})")))?;
        match rmp_serde::from_slice(&body).map_err(|e| self.protocol(format!("answered something unreadable ({e})")))? {
            Response::Ran(output) => Ok(output),
            other => Err(unexpected(other)),
        }
    }

    /// [`crate::sandbox::Sandbox::sweep`] through the runner.
    pub async fn sweep(&self, instance: Option<&str>) -> Result<usize, SandboxError> {
        match self.call(&Request::Sweep { instance: instance.map(str::to_owned) }).await? {
            Response::Removed(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    /// [`crate::sandbox::Sandbox::quiesce_task`] through the runner.
    pub async fn quiesce_task(&self, task: &str) -> Result<usize, SandboxError> {
        match self.call(&Request::Quiesce { task: task.to_owned() }).await? {
            Response::Removed(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(response: Response) -> SandboxError {
    match response {
        Response::Refused(reason) => SandboxError::Runner(format!("refused: {reason}")),
        Response::Failed(reason) => SandboxError::Runner(format!("failed: {reason}")),
        other => SandboxError::Runner(format!("unexpected answer {other:?}")),
    }
}
