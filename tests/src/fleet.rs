//! A whole fleet on this machine, every binary a separate OS process: a private Redis
//! running the ACLs `fleetctl acl generate` makes (every process connects as its own user,
//! the default user is off), a private Postgres, the orchestrator with the offline
//! `scripted` model, the outbox relay, the budget manager, and as many workers of each role
//! as the caller adds, sandboxing in the image `deploy/sandbox-image.sh` builds.
//!
//! Every secret is made the way an operator makes it, with `fleetctl` (`keys master new`,
//! `keys derive`, `audit key new`, `token secret new`, `token issue`), so this module needs
//! none of the fleet's crates: the crates that use the testkit in their own tests are free to
//! be used by it.
//!
//! The binaries are the workspace's own, next to the running executable
//! (`target/<profile>/`, whether it runs from `deps/` or `examples/`); a missing one is an
//! error that names the build command. A missing Redis, Postgres or Docker engine is an
//! error too: nothing that uses this is ever skipped.
//!
//! ```no_run
//! # fn main() -> Result<(), fleet_testkit::fleet::FleetError> {
//! let fixture = std::fs::read_to_string("config/fixtures/demo.toml").expect("fixture");
//! let mut fleet = fleet_testkit::fleet::FleetBuilder::new(fixture).start()?;
//! fleet.add_worker("dev", "dev-1")?;
//! // POST tasks to `fleet.api()` with `fleet.token()`; read `fleet.database_url()`.
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{HarnessError, Postgres, RedisServer};

/// The processes a fleet has besides its workers, by their binary's name (also their
/// Redis user's, and their log file's).
const SERVICES: [&str; 3] = ["orchestrator", "outbox-relay", "budget"];

/// The worker roles, by their binary's prefix (`<role>-worker`) and Redis user.
pub const ROLES: [&str; 4] = ["dev", "qa", "review", "refactor"];

/// How long the orchestrator may take to listen on its API port (it migrates first).
const API_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of each process's log quoted in [`Fleet::log_tails`].
const TAIL_LINES: usize = 30;

/// What went wrong while starting or driving a fleet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// Redis or Postgres could not be started.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// A fleet binary has not been built for this profile.
    #[error("{path} is missing: build the fleet first with `{build}`")]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
        /// The command that builds it.
        build: String,
    },
    /// A file or process operation failed.
    #[error("Failed to {action}: {source}")]
    Io {
        /// What was being done, phrased to follow "Failed to".
        action: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A helper command (`fleetctl …`, `deploy/sandbox-image.sh`, `git`) failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line, for the reader to rerun.
        command: String,
        /// How it ended.
        status: String,
        /// What it printed.
        output: String,
    },
    /// The fleet did not come up; the processes' last log lines say why.
    #[error("{what}\n{logs}")]
    NotReady {
        /// What did not happen in time.
        what: String,
        /// The tail of every process's log.
        logs: String,
    },
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> FleetError {
    let action = action.into();
    move |source| FleetError::Io { action, source }
}

/// The passwords of a secrets file `fleetctl acl secrets new` wrote, by Redis user.
pub fn redis_passwords(secrets: &str) -> HashMap<String, String> {
    secrets
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        })
        .filter(|(k, v)| !k.starts_with('[') && !v.is_empty())
        .collect()
}

/// `target/<profile>`: the directory the running test (`deps/`) or example (`examples/`)
/// executable sits one level under, where cargo puts the workspace's binaries.
pub fn target_dir() -> Result<PathBuf, FleetError> {
    let exe = std::env::current_exe().map_err(io("find the running executable's path"))?;
    exe.parent().and_then(Path::parent).map(Path::to_path_buf).ok_or_else(|| FleetError::Io {
        action: format!("find target/<profile> above {}", exe.display()),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// The workspace binary `name` of the running executable's profile.
pub fn binary(name: &str) -> Result<PathBuf, FleetError> {
    let dir = target_dir()?;
    let path = dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    let release = dir.file_name().is_some_and(|p| p == "release");
    let build = if release { "cargo build --release --workspace --bins" } else { "cargo build --workspace --bins" };
    Err(FleetError::MissingBinary { path, build: build.to_owned() })
}

/// The repository's root (the testkit is its `tests/` directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// Runs `program` with `args` and returns its standard output, or the error that quotes
/// what it printed.
pub fn run(program: &Path, args: &[&str], dir: Option<&Path>) -> Result<String, FleetError> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let line = format!("{} {}", program.display(), args.join(" "));
    let out = cmd.output().map_err(io(format!("run `{line}`")))?;
    if !out.status.success() {
        return Err(FleetError::Command {
            command: line,
            status: out.status.to_string(),
            output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sandbox image, built by the project's script if it is missing (minutes the first
/// time: debootstrap; a tenth of a second once it exists).
pub fn sandbox_image() -> Result<String, FleetError> {
    let out = run(&repo_root().join("deploy/sandbox-image.sh"), &[], None)?;
    out.lines().last().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).ok_or_else(|| FleetError::Command {
        command: "deploy/sandbox-image.sh".into(),
        status: "success".into(),
        output: "it printed no image name (is the Docker engine running?)".into(),
    })
}

/// A git repository of `files` (path, content) on branch `main`, cloned bare under `dir`
/// as `<name>.git`; returns the bare repository's path, what a task names.
pub fn bare_repository(dir: &Path, name: &str, files: &[(&str, &str)]) -> Result<String, FleetError> {
    let work = dir.join(name);
    for (path, content) in files {
        let file = work.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
        }
        std::fs::write(&file, content).map_err(io(format!("write {}", file.display())))?;
    }
    let git = Path::new("git");
    run(git, &["init", "-q", "-b", "main"], Some(&work))?;
    run(git, &["add", "-A"], Some(&work))?;
    run(git, &["-c", "user.name=fleet", "-c", "user.email=fleet@localhost", "commit", "-qm", name], Some(&work))?;
    let bare = dir.join(format!("{name}.git"));
    let (work, bare_text) = (work.to_string_lossy().into_owned(), bare.to_string_lossy().into_owned());
    run(git, &["clone", "-q", "--bare", &work, &bare_text], Some(dir))?;
    Ok(bare_text)
}

/// How to start a [`Fleet`].
#[derive(Debug, Clone)]
pub struct FleetBuilder {
    fixture: String,
    env: Vec<(String, String)>,
    orchestrator_settings: String,
    worker_settings: String,
    rust_log: String,
}

impl FleetBuilder {
    /// A fleet whose scripted model answers from `fixture` (the format of
    /// `orchestrator/src/providers/scripted.rs`).
    pub fn new(fixture: impl Into<String>) -> Self {
        Self {
            fixture: fixture.into(),
            env: Vec::new(),
            orchestrator_settings: String::new(),
            worker_settings: String::new(),
            rust_log: "info".into(),
        }
    }

    /// Gives every process of the fleet (workers too) the variable `key` (the `OTEL_…`
    /// settings, say).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Top-level TOML lines added to the orchestrator's configuration (before its tables).
    pub fn orchestrator_settings(mut self, toml: impl Into<String>) -> Self {
        self.orchestrator_settings = toml.into();
        self
    }

    /// Top-level TOML lines added to every worker's configuration (before its tables).
    pub fn worker_settings(mut self, toml: impl Into<String>) -> Self {
        self.worker_settings = toml.into();
        self
    }

    /// `RUST_LOG` of every process (`info` unless set).
    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.rust_log = filter.into();
        self
    }

    /// Starts Redis, Postgres, the orchestrator, the relay and the budget manager, and
    /// waits until the orchestrator listens. Blocks the calling thread (seconds).
    pub fn start(self) -> Result<Fleet, FleetError> {
        Fleet::start(self)
    }
}

/// One process of the fleet, killed (and reaped) when dropped.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running fleet. Dropping it kills every process, removes the sandbox containers its
/// workers may have left, and stops Redis and Postgres.
#[derive(Debug)]
pub struct Fleet {
    // Killed first: processes before the servers they talk to.
    procs: Vec<Proc>,
    redis: RedisServer,
    _postgres: Postgres,
    dir: tempfile::TempDir,
    /// Each Redis user's password, from `fleetctl acl secrets new`.
    passwords: HashMap<String, String>,
    database_url: String,
    api: String,
    token: String,
    sandbox_image: String,
    /// Prefix of every worker instance name, so the drop removes only this fleet's sandboxes.
    tag: String,
    builder: FleetBuilder,
}

impl Fleet {
    fn start(builder: FleetBuilder) -> Result<Self, FleetError> {
        let fleetctl = binary("fleetctl")?;
        for name in SERVICES {
            binary(name)?;
        }
        for role in ROLES {
            binary(&format!("{role}-worker"))?;
        }
        let sandbox_image = sandbox_image()?;
        let dir = tempfile::Builder::new().prefix("agentfleet-fleet.").tempdir().map_err(io("create a temp dir"))?;
        let d = dir.path().to_path_buf();
        let path = |name: &str| d.join(name).to_string_lossy().into_owned();
        let ctl = |args: &[&str]| run(&fleetctl, args, None);
        let permissions = repo_root().join("config/permissions.toml").to_string_lossy().into_owned();

        // Redis with the fleet's ACLs: one user per process.
        ctl(&["acl", "secrets", "new", "--out", &path("redis-secrets.toml")])?;
        let acl_args =
            ["acl", "generate", "--secrets", &path("redis-secrets.toml"), "--permissions", &permissions, "--out"];
        ctl(&[&acl_args[..], &[&path("users.acl")]].concat())?;
        let secrets = std::fs::read_to_string(d.join("redis-secrets.toml")).map_err(io("read the Redis secrets"))?;
        let passwords = redis_passwords(&secrets);
        let redis = RedisServer::builder().acl_file(d.join("users.acl")).start()?;
        let postgres = Postgres::start()?;
        let database_url = postgres.create_database()?;

        // The operator's secrets, as deploy/demo.sh makes them.
        ctl(&["keys", "master", "new", "--out", &path("master.toml")])?;
        for p in ["orchestrator", "budget", "operator"].into_iter().chain(ROLES) {
            let out = path(&format!("{p}.keyset.toml"));
            ctl(&["keys", "derive", "--master", &path("master.toml"), "--process", p, "--out", &out])?;
        }
        ctl(&["audit", "key", "new", "--out", &path("audit.key")])?;
        ctl(&["token", "secret", "new", "--out", &path("jwt.secret")])?;
        ctl(&["token", "secret", "new", "--for", "lease", "--out", &path("lease.secret")])?;
        let token_args = ["token", "issue", "--role", "admin", "--sub", "fleet-testkit", "--ttl", "12h"];
        let token = ctl(&[&token_args[..], &["--secret-file", &path("jwt.secret")]].concat())?.trim().to_owned();

        // Budgets far above anything a run spends: the ledger is exercised, never the limit.
        let ledger = "daily_tokens = 10000000000\ndaily_micro_usd = 10000000000000\nper_task_tokens = 100000000\n\
                      per_task_micro_usd = 100000000000\nreservation_ttl_secs = 600\n";
        let prices = "[prices.scripted-1]\ninput_micro_usd_per_mtok = 3000000\noutput_micro_usd_per_mtok = 15000000\n";
        let write = |name: &str, text: &str| std::fs::write(d.join(name), text).map_err(io(format!("write {name}")));
        write("ledger.toml", &format!("{ledger}{prices}"))?;
        write("fixture.toml", &builder.fixture)?;
        std::fs::create_dir_all(d.join("workspaces")).map_err(io("create the workspace root"))?;
        let api_port = crate::process::free_port()?;
        write(
            "orchestrator.toml",
            &format!(
                "instance = \"orchestrator-0\"\nkeyset = \"{keyset}\"\npermissions = \"{permissions}\"\n\
                 audit_key_file = \"{audit}\"\njwt_secret_file = \"{jwt}\"\nlisten = \"127.0.0.1:{api_port}\"\n\
                 workspace_root = \"{workspaces}\"\n{extra}\n\
                 [repositories]\nlocal_roots = [\"{root}\"]\n\
                 [tools]\nlease_secret_file = \"{lease}\"\nrisk_matrix = \"{matrix}\"\nledger = \"{ledger}\"\n\
                 [tools.provider]\nkind = \"scripted\"\nfixture = \"{fixture}\"\n[tools.models]\ndefault = \"scripted-1\"\n",
                keyset = path("orchestrator.keyset.toml"),
                audit = path("audit.key"),
                jwt = path("jwt.secret"),
                workspaces = path("workspaces"),
                extra = builder.orchestrator_settings,
                root = d.display(),
                lease = path("lease.secret"),
                matrix = repo_root().join("config/risk_matrix.toml").display(),
                ledger = path("ledger.toml"),
                fixture = path("fixture.toml"),
            ),
        )?;
        write("outbox-relay.toml", "")?;
        let budget_ledger = format!("{ledger}{}", prices.replace("[prices.", "[ledger.prices."));
        write(
            "budget.toml",
            &format!(
                "instance = \"budget-0\"\nkeyset = \"{}\"\npermissions = \"{permissions}\"\n[ledger]\n{budget_ledger}",
                path("budget.keyset.toml")
            ),
        )?;

        let tag = format!("f{}", &uuid::Uuid::now_v7().simple().to_string()[24..]);
        let mut fleet = Self {
            procs: Vec::new(),
            redis,
            _postgres: postgres,
            dir,
            passwords,
            database_url,
            api: format!("http://127.0.0.1:{api_port}"),
            token,
            sandbox_image,
            tag,
            builder,
        };
        for name in SERVICES {
            let mut env = vec![("FLEET_REDIS_URL".to_owned(), fleet.redis_url(name)?)];
            // Each process gets only its own settings: the budget refuses FLEET_DATABASE_URL.
            if name != "budget" {
                env.push(("FLEET_DATABASE_URL".to_owned(), fleet.database_url.clone()));
            }
            let config = fleet.path(&format!("{name}.toml"));
            fleet.spawn(name, name, &config, env)?;
        }
        let deadline = Instant::now() + API_READY_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", api_port)).is_err() {
            if Instant::now() >= deadline || fleet.exited().is_some() {
                return Err(FleetError::NotReady {
                    what: format!("the orchestrator did not listen on 127.0.0.1:{api_port}"),
                    logs: fleet.log_tails(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(fleet)
    }

    fn spawn(
        &mut self,
        name: &str,
        binary_name: &str,
        config: &Path,
        env: Vec<(String, String)>,
    ) -> Result<u32, FleetError> {
        let program = binary(binary_name)?;
        let log = self.path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicate a log file handle"))?;
        let mut cmd = Command::new(&program);
        cmd.arg("--config").arg(config).stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.env("RUST_LOG", &self.builder.rust_log);
        for (k, v) in env.iter().chain(&self.builder.env) {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(io(format!("start {}", program.display())))?;
        let pid = child.id();
        self.procs.push(Proc { name: name.to_owned(), child, log });
        Ok(pid)
    }

    /// Starts a `<role>-worker` named `<tag>-<instance>` (the tag keeps this fleet's
    /// sandboxes apart from any other's) and returns its pid.
    pub fn add_worker(&mut self, role: &str, instance: &str) -> Result<u32, FleetError> {
        let name = format!("{}-{instance}", self.tag);
        let config = self.path(&format!("{name}.toml"));
        let text = format!(
            "keyset = \"{keyset}\"\npermissions = \"{permissions}\"\ninstance = \"{name}\"\nworkspace_root = \"{ws}\"\n{extra}\n\
             [sandbox]\nimage = \"{image}\"\ntimeout_secs = 120\n",
            keyset = self.keyset_path(role).display(),
            permissions = self.permissions_path().display(),
            ws = self.path("workspaces").display(),
            extra = self.builder.worker_settings,
            image = self.sandbox_image,
        );
        std::fs::write(&config, text).map_err(io(format!("write {}", config.display())))?;
        let env = vec![("FLEET_REDIS_URL".to_owned(), self.redis_url(role)?)];
        self.spawn(&name, &format!("{role}-worker"), &config, env)
    }

    /// The first process that has exited, with how, if any has.
    pub fn exited(&mut self) -> Option<String> {
        self.procs.iter_mut().find_map(|p| match p.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status})", p.name)),
            _ => None,
        })
    }

    /// The pid of the process `name` (`orchestrator`, `outbox-relay`, `budget`, or a
    /// worker's full instance name).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.iter().find(|p| p.name == name).map(|p| p.child.id())
    }

    /// The last lines of every process's log, each under its name.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ({}) ---\n", p.name, p.log.display()));
            out.push_str(&lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n"));
            out.push('\n');
        }
        out
    }

    /// The Redis URL of fleet user `user` (`orchestrator`, `dev`, `operator`, …).
    pub fn redis_url(&self, user: &str) -> Result<String, FleetError> {
        let password = self.passwords.get(user).ok_or_else(|| FleetError::NotReady {
            what: format!("no Redis password for user {user} in the generated secrets"),
            logs: String::new(),
        })?;
        Ok(format!("redis://{user}:{password}@127.0.0.1:{}", self.redis.port()))
    }

    /// The Redis server (for its port, its log).
    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    /// The fleet's database, as the orchestrator's owner role.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The orchestrator's API base URL, `http://127.0.0.1:<port>`.
    pub fn api(&self) -> &str {
        &self.api
    }

    /// An admin bearer token for the API.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The fleet's directory: configurations, secrets, logs, workspaces, repositories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `<dir>/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The keyset file of `process` (`dev`, `orchestrator`, `operator`, …).
    pub fn keyset_path(&self, process: &str) -> PathBuf {
        self.path(&format!("{process}.keyset.toml"))
    }

    /// The permission table every process reads.
    pub fn permissions_path(&self) -> PathBuf {
        repo_root().join("config/permissions.toml")
    }

    /// The sandbox image the workers use.
    pub fn sandbox_image(&self) -> &str {
        &self.sandbox_image
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
        // Sandboxes a killed worker may have left: ours carry the fleet's tag in their
        // instance label.
        let listed = Command::new("docker")
            .args(["ps", "-aq", "--filter", "label=agentfleet.sandbox=1", "--format", "{{.ID}} {{.Labels}}"])
            .output();
        if let Ok(out) = listed {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.contains(&self.tag)
                    && let Some(id) = line.split_whitespace().next()
                {
                    let _ = Command::new("docker").args(["rm", "-f", id]).output();
                }
            }
        }
    }
}
