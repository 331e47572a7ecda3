//! `fleetctl acl …` against a real redis-server (7.0 on Debian bookworm): the binary makes
//! a secrets file and an ACL file from the shipped `config/permissions.toml`, the harness
//! starts Redis with that file, and every user is tried, through the `redis` crate as the
//! fleet's processes connect, on every command that matters.
//!
//! What is allowed comes from the permission table through the small oracles below
//! ([`may_xadd`], [`receives_on`]), written against the table's rules and not against the
//! ACL code, and the oracles are pinned on the cases the design names (dev may not XADD to
//! `fleet:tasks:qa`, nor to its own inbox). Each test collects every mismatch and fails
//! once with all of them, each naming the user, the command and the key.
//!
//! A missing `redis-server` fails every Redis test with the harness's message (how to
//! install it); nothing is skipped.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use envelope::{Instance, PermissionTable, Role, StreamName, streams};
use fleet_testkit::RedisServer;
use fleetctl::acl::{Passwords, User};
use redis::Value;
use redis::aio::MultiplexedConnection;
use sha2::Digest as _;
use tempfile::TempDir;

const EX_USAGE: i32 = 64;

/// A user of the tests' own, added after the generated ones by [`Fleet::start_inspected`]:
/// reads `ACL LOG`, nothing else.
const INSPECTOR: &str = "acl-inspector";
const INSPECTOR_PASSWORD: &str = "inspector-password-0123456789";

// ---------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary in `dir` (never changing this process's environment).
fn fleetctl(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetctl")).args(args).current_dir(dir).output().unwrap();
    Output {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = fleetctl(dir, args);
    assert_eq!(out.code, 0, "{args:?} failed: {}", out.stderr);
    out.stdout
}

fn permissions_file() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    root.join("config/permissions.toml").to_str().unwrap().to_owned()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---------------------------------------------------------------------------------------
// What the permission table allows, independently of the ACL code
// ---------------------------------------------------------------------------------------

/// True when `role` publishes to `stream` under some rule.
fn publishes_to(table: &PermissionTable, role: Role, stream: &str) -> bool {
    table.rules().iter().any(|rule| rule.from == role && rule.stream.matches(stream))
}

/// True when some rule addresses `role` on `stream`: its consumer group reads it.
fn receives_on(table: &PermissionTable, role: Role, stream: &str) -> bool {
    table.rules().iter().any(|rule| rule.to == role && rule.stream.matches(stream))
}

/// True when `role` consumes anything, and so writes `fleet:rejected` and `fleet:dlq`.
fn is_consumer(table: &PermissionTable, role: Role) -> bool {
    table.rules().iter().any(|rule| rule.to == role)
}

/// Whether `user` may XADD to `key`.
fn may_xadd(table: &PermissionTable, user: User, key: &str) -> bool {
    match user.role() {
        Some(role) => {
            publishes_to(table, role, key)
                || (is_consumer(table, role) && [streams::REJECTED, streams::DLQ].contains(&key))
        }
        None if user == User::OutboxRelay => publishes_to(table, Role::Orchestrator, key),
        // The operators' administrative user may do anything; no fleet process has it.
        None if user == User::Admin => true,
        None => false,
    }
}

/// The users the fleet's processes, `fleetctl` and monitoring connect as: all but `admin`.
fn fleet_users() -> impl Iterator<Item = User> {
    User::ALL.into_iter().filter(|user| *user != User::Admin)
}

/// Every concrete stream of the fleet: per-role, per-instance and shared.
fn fleet_streams() -> Vec<String> {
    let instance = Instance::parse("inst-1").unwrap();
    let mut names = Vec::new();
    for role in Role::WORKERS {
        names.push(StreamName::tasks(*role).to_string());
        names.push(StreamName::tool_responses(*role, &instance).to_string());
    }
    for role in Role::ALL {
        names.push(StreamName::control(*role).to_string());
    }
    for name in [
        streams::RESULTS,
        streams::HEARTBEATS,
        streams::QUESTIONS,
        streams::TOOL_REQUESTS,
        streams::USAGE,
        streams::OUTCOMES,
        streams::REJECTED,
        streams::DLQ,
    ] {
        names.push(name.to_owned());
    }
    names
}

/// Keys nobody may XADD to: outside the fleet, near misses of real names, and keys that
/// some user may touch with other commands.
const NOT_STREAMS: &[&str] = &[
    "other:key",
    "fleet:unknown",
    "fleet:tasks:devops",
    "fleet:tasks",
    "fleet:budget:probe",
    "fleet:killswitch",
    "fleet:seen:dev:probe",
    "fleet:done:orchestrator:probe",
];

#[test]
fn the_oracle_agrees_with_the_design() {
    let t = PermissionTable::parse(&fs::read_to_string(permissions_file()).unwrap()).unwrap();
    assert!(!may_xadd(&t, User::Dev, "fleet:tasks:qa"));
    assert!(!may_xadd(&t, User::Dev, "fleet:tasks:dev"));
    assert!(may_xadd(&t, User::Dev, "fleet:results"));
    assert!(may_xadd(&t, User::Dev, "fleet:dlq"));
    assert!(may_xadd(&t, User::Orchestrator, "fleet:tool:responses:qa:inst-1"));
    assert!(may_xadd(&t, User::Budget, "fleet:control:orchestrator"));
    assert!(may_xadd(&t, User::OutboxRelay, "fleet:tasks:dev"));
    assert!(!may_xadd(&t, User::OutboxRelay, "fleet:results"));
    assert!(!may_xadd(&t, User::OutboxRelay, "fleet:rejected"));
    for key in fleet_streams() {
        assert!(!may_xadd(&t, User::Operator, &key));
        assert!(!may_xadd(&t, User::Monitor, &key));
    }
    assert!(receives_on(&t, Role::Dev, "fleet:tool:responses:dev:inst-1"));
    assert!(!receives_on(&t, Role::Dev, "fleet:tasks:qa"));
}

// ---------------------------------------------------------------------------------------
// A Redis server with the generated users
// ---------------------------------------------------------------------------------------

/// A redis-server loaded with the ACL file that `fleetctl acl generate` wrote for the
/// shipped permission file and fresh passwords.
struct Fleet {
    /// Declared first so it stops before its files disappear.
    redis: RedisServer,
    passwords: Passwords,
    table: PermissionTable,
    connections: BTreeMap<User, MultiplexedConnection>,
    /// The secrets file and the ACL file.
    _dir: TempDir,
}

/// What a command must do.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Succeed, with any reply.
    Allowed,
    /// Succeed with exactly this reply.
    Returns(Value),
    /// Fail with NOPERM: the ACL refused it.
    NoPerm,
    /// Fail with an error whose text contains this (a script's refused inner command).
    Error(&'static str),
    /// Permitted: success, or an error that is not NOPERM (`XINFO` of a stream that does
    /// not exist yet answers "no such key").
    Permitted,
}

/// One command of a table: who runs it, the command, and what must happen.
struct Case {
    user: User,
    args: Vec<String>,
    expect: Expect,
}

fn case(user: User, expect: Expect, args: &[&str]) -> Case {
    Case { user, args: args.iter().map(|a| (*a).to_owned()).collect(), expect }
}

fn allowed_if(yes: bool) -> Expect {
    if yes { Expect::Allowed } else { Expect::NoPerm }
}

impl Fleet {
    fn start() -> Fleet {
        Self::start_with(None)
    }

    /// [`Fleet::start`], plus one user of the test's own, [`INSPECTOR`], who may read the
    /// server's `ACL LOG` and nothing else: every refusal of every user, whatever the
    /// client did with the error.
    fn start_inspected() -> Fleet {
        Self::start_with(Some(&format!(
            "user {INSPECTOR} on #{} resetchannels -@all +hello +auth +acl|log\n",
            hex::encode(sha2::Sha256::digest(INSPECTOR_PASSWORD))
        )))
    }

    fn start_with(extra_user: Option<&str>) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        ok(dir.path(), &["acl", "secrets", "new", "--out", "secrets.toml"]);
        ok(
            dir.path(),
            &[
                "acl",
                "generate",
                "--secrets",
                "secrets.toml",
                "--permissions",
                &permissions_file(),
                "--out",
                "users.acl",
            ],
        );
        if let Some(line) = extra_user {
            let acl = dir.path().join("users.acl");
            let generated = fs::read_to_string(&acl).unwrap();
            fs::write(&acl, format!("{generated}{line}")).unwrap();
        }
        let passwords = Passwords::parse(&fs::read_to_string(dir.path().join("secrets.toml")).unwrap()).unwrap();
        let table = PermissionTable::parse(&fs::read_to_string(permissions_file()).unwrap()).unwrap();
        let redis = RedisServer::builder()
            .acl_file(dir.path().join("users.acl"))
            .start()
            .unwrap_or_else(|err| panic!("cannot start redis-server with the generated ACL file: {err}"));
        Fleet { redis, passwords, table, connections: BTreeMap::new(), _dir: dir }
    }

    fn url(&self, user: User, query: &str) -> String {
        format!("redis://{user}:{}@127.0.0.1:{}/{query}", self.passwords.get(user).expose(), self.redis.port())
    }

    /// A connection authenticated as `user`, as the fleet's processes make them.
    async fn connection(&mut self, user: User) -> &mut MultiplexedConnection {
        if !self.connections.contains_key(&user) {
            let connection =
                connect(&self.url(user, "")).await.unwrap_or_else(|err| panic!("{user} cannot connect: {err}"));
            self.connections.insert(user, connection);
        }
        self.connections.get_mut(&user).unwrap()
    }

    async fn run(&mut self, user: User, args: &[String]) -> redis::RedisResult<Value> {
        let mut command = redis::cmd(&args[0]);
        for arg in &args[1..] {
            command.arg(arg);
        }
        command.query_async(self.connection(user).await).await
    }

    /// Runs `cases` in order and fails once, listing every case that did not do what it
    /// should.
    async fn expect_all(&mut self, what: &str, cases: Vec<Case>) {
        let mut failures = Vec::new();
        for Case { user, args, expect } in &cases {
            let result = self.run(*user, args).await;
            if let Some(problem) = mismatch(expect, &result) {
                failures.push(format!("user {user}: `{}`: {problem}", args.join(" ")));
            }
        }
        assert_failures(what, cases.len(), &failures);
    }

    /// The server's `ACL LOG` (newest first): one line per refusal, as
    /// `<reason> <object> by <user>` (`command multi by budget`), read as [`INSPECTOR`].
    async fn acl_log(&self) -> Vec<String> {
        let url = format!("redis://{INSPECTOR}:{INSPECTOR_PASSWORD}@127.0.0.1:{}/", self.redis.port());
        let mut inspector = connect(&url).await.unwrap_or_else(|err| panic!("{INSPECTOR} cannot connect: {err}"));
        let entries: Vec<BTreeMap<String, Value>> =
            redis::cmd("ACL").arg("LOG").query_async(&mut inspector).await.unwrap();
        let text = |entry: &BTreeMap<String, Value>, field: &str| match entry.get(field) {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            other => format!("{other:?}"),
        };
        entries
            .iter()
            .map(|e| format!("{} {} by {}", text(e, "reason"), text(e, "object"), text(e, "username")))
            .collect()
    }

    /// XADDs an entry to `stream` as `user` and returns its id.
    async fn seed(&mut self, user: User, stream: &str) -> String {
        let args: Vec<String> = ["XADD", stream, "*", "seed", "1"].map(str::to_owned).to_vec();
        match self.run(user, &args).await {
            Ok(Value::BulkString(id)) => String::from_utf8(id).unwrap(),
            other => panic!("user {user} could not seed {stream}: {other:?}"),
        }
    }
}

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?.get_multiplexed_async_connection().await
}

/// What is wrong with `result`, if anything.
fn mismatch(expect: &Expect, result: &redis::RedisResult<Value>) -> Option<String> {
    match (expect, result) {
        (Expect::Allowed, Ok(_)) => None,
        (Expect::Returns(want), Ok(got)) if got == want => None,
        (Expect::Returns(want), Ok(got)) => Some(format!("expected {want:?}, got {got:?}")),
        (Expect::NoPerm, Err(err)) if err.code() == Some("NOPERM") => None,
        (Expect::NoPerm, Ok(got)) => Some(format!("expected NOPERM, but it succeeded ({got:?})")),
        (Expect::NoPerm, Err(err)) => Some(format!("expected NOPERM, got another error: {err}")),
        (Expect::Error(text), Err(err)) if err.to_string().contains(text) => None,
        (Expect::Error(text), Err(err)) => Some(format!("expected an error with {text:?}, got: {err}")),
        (Expect::Error(text), Ok(got)) => Some(format!("expected an error with {text:?}, but it succeeded ({got:?})")),
        (Expect::Allowed | Expect::Returns(_), Err(err)) => Some(format!("expected success, got: {err}")),
        (Expect::Permitted, Err(err)) if err.code() == Some("NOPERM") => {
            Some(format!("expected no NOPERM, got: {err}"))
        }
        (Expect::Permitted, _) => None,
    }
}

fn assert_failures(what: &str, total: usize, failures: &[String]) {
    if failures.is_empty() {
        return;
    }
    let mut message = format!("{what}: {} of {total} cases went wrong:\n", failures.len());
    for failure in failures {
        let _ = writeln!(message, "  - {failure}");
    }
    panic!("{message}");
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn xadd_is_allowed_exactly_where_the_permission_table_says() {
    let mut fleet = Fleet::start();
    let mut cases = Vec::new();
    let mut allowed = 0;
    for user in User::ALL {
        for key in fleet_streams().iter().map(String::as_str).chain(NOT_STREAMS.iter().copied()) {
            let may = may_xadd(&fleet.table, user, key);
            allowed += usize::from(may && user != User::Admin);
            cases.push(case(user, allowed_if(may), &["XADD", key, "*", "probe", user.as_str()]));
            // The capped form publishers use.
            cases.push(case(user, allowed_if(may), &["XADD", key, "MAXLEN", "~", "100000", "*", "probe", "1"]));
        }
    }
    // 4 workers x (4 streams + rejected + dlq), orchestrator 11 + 2, budget 5 + 2, relay 11.
    assert_eq!(allowed, 4 * 6 + 13 + 7 + 11, "the shipped permission file changed: update this count");
    fleet.expect_all("XADD by every user to every stream", cases).await;
}

#[tokio::test]
async fn consumers_work_their_own_streams_and_nobody_elses() {
    let mut fleet = Fleet::start();
    let all_streams = fleet_streams();
    let mut cases = Vec::new();
    for role in Role::ALL {
        let user = User::of_role(*role);
        let group = role.as_str();
        let (c1, c2) = (format!("{role}-1"), format!("{role}-2"));
        let (c1, c2) = (c1.as_str(), c2.as_str());
        for stream in &all_streams {
            let s = stream.as_str();
            if receives_on(&fleet.table, *role, s) {
                // Someone else publishes an entry for the group to work on.
                let publisher = fleet_users()
                    .find(|u| *u != user && may_xadd(&fleet.table, *u, s))
                    .unwrap_or_else(|| panic!("nobody may publish to {s}"));
                let id = fleet.seed(publisher, s).await;
                let id = id.as_str();
                // A worker may neither create nor delete consumers: every instance of the role
                // shares the user, and deleting a peer's consumer drops the peer's task.
                let (create, delete) = if role.is_worker() {
                    (Expect::NoPerm, Expect::NoPerm)
                } else {
                    (Expect::Returns(Value::Int(1)), Expect::Allowed)
                };
                for (expect, args) in [
                    (Expect::Returns(Value::Okay), &["XGROUP", "CREATE", s, group, "0", "MKSTREAM"][..]),
                    (create, &["XGROUP", "CREATECONSUMER", s, group, c2]),
                    (Expect::Allowed, &["XREADGROUP", "GROUP", group, c1, "COUNT", "10", "STREAMS", s, ">"]),
                    (Expect::Allowed, &["XPENDING", s, group]),
                    (Expect::Allowed, &["XPENDING", s, group, "-", "+", "10"]),
                    (Expect::Allowed, &["XAUTOCLAIM", s, group, c2, "0", "0-0", "COUNT", "10"]),
                    (Expect::Allowed, &["XCLAIM", s, group, c1, "0", id]),
                    (Expect::Returns(Value::Int(1)), &["XACK", s, group, id]),
                    (Expect::Allowed, &["XINFO", "GROUPS", s]),
                    (Expect::Allowed, &["XINFO", "CONSUMERS", s, group]),
                    (Expect::Allowed, &["XINFO", "STREAM", s]),
                    (Expect::Returns(Value::Int(1)), &["XLEN", s]),
                    (Expect::Allowed, &["XRANGE", s, "-", "+"]),
                    (delete, &["XGROUP", "DELCONSUMER", s, group, c2]),
                    // Its own inbox is not its to write.
                    (Expect::NoPerm, &["XADD", s, "*", "forged", "1"]),
                    (Expect::NoPerm, &["XDEL", s, id]),
                    (Expect::NoPerm, &["XTRIM", s, "MAXLEN", "0"]),
                    (Expect::NoPerm, &["XGROUP", "SETID", s, group, "0"]),
                    (Expect::NoPerm, &["XGROUP", "DESTROY", s, group]),
                ] {
                    cases.push(case(user, expect, args));
                }
            } else {
                for args in [
                    &["XGROUP", "CREATE", s, group, "0", "MKSTREAM"][..],
                    &["XGROUP", "CREATECONSUMER", s, group, c2],
                    &["XREADGROUP", "GROUP", group, c1, "COUNT", "10", "STREAMS", s, ">"],
                    &["XPENDING", s, group],
                    &["XAUTOCLAIM", s, group, c2, "0", "0-0"],
                    &["XCLAIM", s, group, c1, "0", "0-1"],
                    &["XACK", s, group, "0-1"],
                    &["XINFO", "GROUPS", s],
                    &["XINFO", "CONSUMERS", s, group],
                    &["XINFO", "STREAM", s],
                    &["XLEN", s],
                    &["XRANGE", s, "-", "+"],
                    &["XGROUP", "DELCONSUMER", s, group, c2],
                ] {
                    // A publisher reads the length and group lag of what it publishes to
                    // (the bus's backpressure), and nothing else of it.
                    let backlog = matches!(args[..2], ["XINFO", "GROUPS"] | ["XLEN", _]);
                    // The orchestrator prunes the workers' task groups for them.
                    let prune = user == User::Orchestrator
                        && Role::WORKERS.iter().any(|w| StreamName::tasks(*w).as_str() == s)
                        && matches!(args[..2], ["XINFO", "CONSUMERS"] | ["XGROUP", "DELCONSUMER"]);
                    let expect = if (backlog && may_xadd(&fleet.table, user, s)) || prune {
                        Expect::Permitted
                    } else {
                        Expect::NoPerm
                    };
                    cases.push(case(user, expect, args));
                }
            }
        }
        // One read over an own and a foreign stream needs both in one grant: refused.
        let own = StreamName::control(*role).to_string();
        let foreign = if *role == Role::Qa { "fleet:tasks:dev" } else { "fleet:tasks:qa" };
        cases.push(case(
            user,
            Expect::NoPerm,
            &["XREADGROUP", "GROUP", group, c1, "STREAMS", own.as_str(), foreign, ">", ">"],
        ));
    }
    fleet.expect_all("consumer commands on own and foreign streams", cases).await;
}

/// Issue 10, item 3: a compromised worker cannot delete a peer's consumer (which would drop
/// the task the peer is working on from the group's pending list); the orchestrator prunes
/// the workers' idle consumers for them, under the generated ACL.
#[tokio::test]
async fn a_worker_cannot_delete_a_peers_consumer_and_the_orchestrator_prunes_idle_ones() {
    let mut fleet = Fleet::start();
    let stream = StreamName::tasks(Role::Dev).to_string();
    let s = stream.as_str();
    fleet.seed(User::OutboxRelay, s).await;
    let id = fleet.seed(User::OutboxRelay, s).await;
    let cases = vec![
        case(User::Dev, Expect::Returns(Value::Okay), &["XGROUP", "CREATE", s, "dev", "0"]),
        // dev-1 is working on the first task; dev-2 read the second and is done with it.
        case(User::Dev, Expect::Allowed, &["XREADGROUP", "GROUP", "dev", "dev-1", "COUNT", "1", "STREAMS", s, ">"]),
        case(User::Dev, Expect::Allowed, &["XREADGROUP", "GROUP", "dev", "dev-2", "COUNT", "1", "STREAMS", s, ">"]),
        case(User::Dev, Expect::Returns(Value::Int(1)), &["XACK", s, "dev", id.as_str()]),
        // A compromised instance tries to make dev-1's task vanish.
        case(User::Dev, Expect::NoPerm, &["XGROUP", "DELCONSUMER", s, "dev", "dev-1"]),
        case(User::Dev, Expect::NoPerm, &["XGROUP", "DELCONSUMER", s, "dev", "dev-2"]),
    ];
    fleet.expect_all("a worker deleting consumers", cases).await;

    // "Idle longer than zero" is strict and Redis counts idle time in whole milliseconds:
    // pruning within the millisecond of dev-2's last command would rightly keep it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let orchestrator = fleet.connection(User::Orchestrator).await;
    let removed = bus::pruner::prune_idle_consumers(orchestrator, s, "dev", None, Duration::ZERO).await.unwrap();
    assert_eq!(removed, 1, "only dev-2, which holds nothing, is pruned");
    let args = |a: &[&str]| a.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    let pending = fleet.run(User::Dev, &args(&["XPENDING", s, "dev"])).await.unwrap();
    let Value::Array(summary) = pending else { panic!("XPENDING: {pending:?}") };
    assert_eq!(summary[0], Value::Int(1), "dev-1 still holds its task");
    let consumers = fleet.run(User::Dev, &args(&["XINFO", "CONSUMERS", s, "dev"])).await.unwrap();
    let Value::Array(consumers) = consumers else { panic!("XINFO CONSUMERS: {consumers:?}") };
    assert_eq!(consumers.len(), 1, "dev-1 is kept: {consumers:?}");
}

#[tokio::test]
async fn each_consumer_group_has_its_own_replay_guard_keys() {
    let mut fleet = Fleet::start();
    let mut cases = Vec::new();
    for role in Role::ALL {
        let user = User::of_role(*role);
        // Guard keys carry the stream they guard as their hash tag; older consumers' done
        // markers do not.
        let key = |prefix: &str, stream_of: Role, group: Role| match prefix {
            "fleet:seen" => format!("{prefix}:{{{}}}:{group}:env-1", StreamName::control(stream_of)),
            _ => format!("{prefix}:{group}:env-1"),
        };
        // The guard's buckets (bus::guard): HSETNX, HGET, PEXPIREAT, and nothing else.
        let own = key("fleet:seen", *role, *role);
        let own = own.as_str();
        let later = (bus::now_ms() + 120_000).to_string();
        cases.push(case(user, Expect::Returns(Value::Int(1)), &["HSETNX", own, "env-1", "1-1"]));
        cases.push(case(user, Expect::Returns(Value::Int(0)), &["HSETNX", own, "env-1", "1-2"]));
        cases.push(case(user, Expect::Returns(Value::BulkString(b"1-1".to_vec())), &["HGET", own, "env-1"]));
        cases.push(case(user, Expect::Returns(Value::Int(1)), &["PEXPIREAT", own, &later]));
        cases.push(case(user, Expect::Returns(Value::Int(1)), &["EXISTS", own]));
        cases.push(case(user, Expect::NoPerm, &["HSET", own, "env-1", "9-9"]));
        cases.push(case(user, Expect::NoPerm, &["DEL", own]));
        cases.push(case(user, Expect::NoPerm, &["HDEL", own, "env-1"]));
        cases.push(case(user, Expect::NoPerm, &["PERSIST", own]));
        cases.push(case(user, Expect::NoPerm, &["SET", own, "1"]));
        // No scripts for any worker: EVAL could run a loop that stalls Redis for everyone.
        let trusted = matches!(role, Role::Orchestrator | Role::Budget);
        cases.push(case(user, allowed_if(trusted), &["EVAL", "return 1", "0"]));
        // Older consumers' done markers: looked up, never written.
        let done = key("fleet:done", *role, *role);
        cases.push(case(user, Expect::Returns(Value::Int(0)), &["EXISTS", &done]));
        cases.push(case(user, Expect::NoPerm, &["SET", &done, "1"]));
        for other in Role::ALL.iter().filter(|other| *other != role) {
            let theirs = key("fleet:seen", *other, *other);
            cases.push(case(user, Expect::NoPerm, &["HSETNX", &theirs, "env-1", "1-1"]));
            cases.push(case(user, Expect::NoPerm, &["HGET", &theirs, "env-1"]));
            cases.push(case(user, Expect::NoPerm, &["EXISTS", &key("fleet:done", *other, *other)]));
            // Another group's bucket in one of its own streams' slots, and its own group's
            // bucket tagged with another role's stream.
            for forged in [key("fleet:seen", *role, *other), key("fleet:seen", *other, *role)] {
                cases.push(case(user, Expect::NoPerm, &["HSETNX", &forged, "env-1", "1-1"]));
            }
        }
        // The guard's commands are granted on its keys only: not on streams, not elsewhere.
        let inbox = StreamName::control(*role).to_string();
        cases.push(case(user, Expect::NoPerm, &["HSETNX", &inbox, "f", "x"]));
        cases.push(case(user, Expect::NoPerm, &["HSETNX", "other:key", "f", "x"]));
    }
    for user in [User::OutboxRelay, User::Operator] {
        cases.push(case(user, Expect::NoPerm, &["HSETNX", "fleet:seen:{fleet:control:dev}:dev:1", "env-2", "1"]));
        cases.push(case(user, Expect::NoPerm, &["HGET", "fleet:seen:{fleet:control:dev}:dev:1", "env-1"]));
    }
    fleet.expect_all("replay guard keys", cases).await;
}

#[tokio::test]
async fn only_the_orchestrator_and_budget_run_ledger_scripts_on_ledger_keys() {
    let mut fleet = Fleet::start();
    const INCRBY: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
    const INCRBY_SHA: &str = "8cd00688c05c46bde4a2e60658ef20a2e5c0b248";
    let mut cases = Vec::new();
    for user in [User::Orchestrator, User::Budget] {
        cases.extend([
            case(user, Expect::Allowed, &["SCRIPT", "LOAD", INCRBY]),
            case(user, Expect::Allowed, &["EVAL", INCRBY, "1", "fleet:budget:task-1", "5"]),
            // Only the budget manager writes the kill switch's record.
            case(
                user,
                allowed_if(user == User::Budget),
                &["EVAL", "return redis.call('HSET', KEYS[1], 'engaged', '1')", "1", "fleet:killswitch"],
            ),
            case(
                user,
                Expect::Allowed,
                &["EVAL", "return redis.call('HINCRBY', KEYS[1], 'tokens', 7)", "1", "fleet:budget:h"],
            ),
            // Keys outside the ledger, declared or not, and commands the ledger doesn't use.
            case(user, Expect::NoPerm, &["EVAL", INCRBY, "1", "fleet:tasks:dev", "5"]),
            case(user, Expect::NoPerm, &["EVAL", INCRBY, "1", "other:key", "5"]),
            case(user, Expect::Error("can't access"), &["EVAL", "return redis.call('SET', 'fleet:results', 1)", "0"]),
            case(user, Expect::Error("can't run"), &["EVAL", "return redis.call('FLUSHALL')", "0"]),
            case(
                user,
                Expect::Error("can't run"),
                &["EVAL", "return redis.call('DEL', KEYS[1])", "1", "fleet:budget:h"],
            ),
            case(
                user,
                Expect::Error("executing the script can't"),
                &["EVAL", "return redis.call('XADD', KEYS[1], '*', 'a', 1)", "1", "fleet:budget:s"],
            ),
            case(user, Expect::NoPerm, &["SCRIPT", "FLUSH"]),
            case(
                user,
                Expect::NoPerm,
                &["FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('x', function() return 1 end)"],
            ),
        ]);
    }
    for user in [User::Dev, User::Qa, User::Review, User::Refactor, User::OutboxRelay, User::Operator] {
        cases.extend([
            case(user, Expect::NoPerm, &["EVAL", "return 1", "0"]),
            case(user, Expect::NoPerm, &["EVAL", INCRBY, "1", "fleet:budget:task-1", "5"]),
            case(user, Expect::NoPerm, &["EVALSHA", INCRBY_SHA, "1", "fleet:budget:task-1", "5"]),
            case(user, Expect::NoPerm, &["SCRIPT", "LOAD", "return 1"]),
            // The operator reads the budget's keys for `fleetctl status`; nobody else does.
            case(user, allowed_if(user == User::Operator), &["GET", "fleet:budget:task-1"]),
            case(user, Expect::NoPerm, &["SET", "fleet:killswitch", "0"]),
        ]);
    }
    fleet.expect_all("ledger scripts", cases).await;

    // The script cache holds what SCRIPT LOAD returned: EVALSHA works for both.
    let sha = match fleet.run(User::Budget, &["SCRIPT".into(), "LOAD".into(), INCRBY.into()]).await {
        Ok(Value::BulkString(sha)) => String::from_utf8(sha).unwrap(),
        other => panic!("SCRIPT LOAD as budget: {other:?}"),
    };
    assert_eq!(sha, INCRBY_SHA);
    let cases = [User::Orchestrator, User::Budget]
        .map(|user| case(user, Expect::Allowed, &["EVALSHA", &sha, "1", "fleet:budget:task-1", "1"]))
        .into();
    fleet.expect_all("EVALSHA", cases).await;
}

#[tokio::test]
async fn only_the_orchestrator_runs_the_intake_rate_limiter() {
    let mut fleet = Fleet::start();
    // The shape of orchestrator/src/api/ratelimit.rs's bucket: read, refill by TIME, write, expire.
    const BUCKET: &str = "local t = redis.call('TIME') \
        local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts') \
        redis.call('HSET', KEYS[1], 'tokens', 1, 'ts', t[1]) \
        return redis.call('PEXPIRE', KEYS[1], 60000)";
    let mut cases = vec![
        case(User::Orchestrator, Expect::Allowed, &["SCRIPT", "LOAD", BUCKET]),
        case(User::Orchestrator, Expect::Allowed, &["EVAL", BUCKET, "1", "fleet:ratelimit:alice"]),
        case(User::Orchestrator, Expect::NoPerm, &["EVAL", BUCKET, "1", "fleet:tasks:dev"]),
        case(User::Orchestrator, Expect::NoPerm, &["DEL", "fleet:ratelimit:alice"]),
    ];
    for user in [User::Budget, User::Dev, User::Qa, User::Review, User::Refactor, User::OutboxRelay, User::Operator] {
        cases.push(case(user, Expect::NoPerm, &["EVAL", BUCKET, "1", "fleet:ratelimit:alice"]));
        cases.push(case(user, Expect::NoPerm, &["HSET", "fleet:ratelimit:alice", "tokens", "99"]));
    }
    fleet.expect_all("rate limiter", cases).await;
}

#[tokio::test]
async fn only_budget_queues_and_dispatches_alerts() {
    let mut fleet = Fleet::start();
    const ENQUEUE: &str = "if redis.call('SET', KEYS[2], '1', 'NX') then return redis.call('XADD', KEYS[1], '*', 'a', ARGV[1]) end \
        return redis.call('GET', KEYS[2])";
    let mut cases = vec![
        case(User::Budget, Expect::Allowed, &["EVAL", ENQUEUE, "2", "fleet:alerts", "fleet:alerts:dedup:k1", "x"]),
        case(User::Budget, Expect::Allowed, &["XGROUP", "CREATE", "fleet:alerts", "telegram", "0", "MKSTREAM"]),
        case(
            User::Budget,
            Expect::Allowed,
            &["XREADGROUP", "GROUP", "telegram", "c1", "COUNT", "1", "STREAMS", "fleet:alerts", ">"],
        ),
        case(User::Budget, Expect::Allowed, &["XACK", "fleet:alerts", "telegram", "0-1"]),
        case(User::Budget, Expect::NoPerm, &["XADD", "fleet:alerts:other", "*", "a", "1"]),
        case(User::Budget, Expect::NoPerm, &["DEL", "fleet:alerts"]),
    ];
    for user in [User::Orchestrator, User::Dev, User::Qa, User::Review, User::Refactor, User::OutboxRelay] {
        cases.push(case(user, Expect::NoPerm, &["XADD", "fleet:alerts", "*", "a", "1"]));
        cases.push(case(user, Expect::NoPerm, &["SET", "fleet:alerts:dedup:k2", "1"]));
    }
    fleet.expect_all("alerts", cases).await;
}

#[tokio::test]
async fn the_operator_reads_everything_under_fleet_and_writes_nothing() {
    let mut fleet = Fleet::start();
    let id = fleet.seed(User::Dev, streams::RESULTS).await;
    fleet.seed(User::Orchestrator, "fleet:tasks:dev").await;
    let group: Vec<String> = ["XGROUP", "CREATE", "fleet:tasks:dev", "dev", "0"].map(str::to_owned).to_vec();
    fleet.run(User::Dev, &group).await.unwrap();

    let op = User::Operator;
    let mut cases = vec![
        case(op, Expect::Allowed, &["XRANGE", "fleet:results", "-", "+"]),
        case(op, Expect::Allowed, &["XREVRANGE", "fleet:results", "+", "-", "COUNT", "5"]),
        case(op, Expect::Returns(Value::Int(1)), &["XLEN", "fleet:results"]),
        case(op, Expect::Allowed, &["XREAD", "COUNT", "10", "STREAMS", "fleet:results", "fleet:tasks:dev", "0", "0"]),
        case(op, Expect::Allowed, &["XINFO", "STREAM", "fleet:results"]),
        case(op, Expect::Allowed, &["XINFO", "GROUPS", "fleet:tasks:dev"]),
        case(op, Expect::Allowed, &["XINFO", "CONSUMERS", "fleet:tasks:dev", "dev"]),
        case(op, Expect::Allowed, &["XPENDING", "fleet:tasks:dev", "dev"]),
        case(op, Expect::Allowed, &["XLEN", "fleet:tool:responses:qa:inst-9"]),
        // Reads, but not outside the fleet, and nothing a consumer group would notice.
        case(op, Expect::NoPerm, &["XRANGE", "other:key", "-", "+"]),
        case(op, Expect::NoPerm, &["XREADGROUP", "GROUP", "dev", "op", "STREAMS", "fleet:tasks:dev", ">"]),
        case(op, Expect::NoPerm, &["XGROUP", "CREATE", "fleet:results", "operator", "0"]),
        case(op, Expect::NoPerm, &["XACK", "fleet:results", "orchestrator", &id]),
        case(op, Expect::NoPerm, &["XCLAIM", "fleet:tasks:dev", "dev", "op", "0", "0-1"]),
        case(op, Expect::NoPerm, &["GET", "fleet:seen:dev:env-1"]),
    ];
    for key in fleet_streams().iter().map(String::as_str).chain(["other:key"]) {
        cases.push(case(op, Expect::NoPerm, &["XADD", key, "*", "a", "1"]));
        cases.push(case(op, Expect::NoPerm, &["DEL", key]));
        cases.push(case(op, Expect::NoPerm, &["XDEL", key, "0-1"]));
        cases.push(case(op, Expect::NoPerm, &["XTRIM", key, "MAXLEN", "0"]));
        cases.push(case(op, Expect::NoPerm, &["SET", key, "1"]));
    }
    fleet.expect_all("operator", cases).await;
}

#[tokio::test]
async fn the_outbox_relay_only_forwards() {
    let mut fleet = Fleet::start();
    let relay = User::OutboxRelay;
    let cases = vec![
        case(relay, Expect::Allowed, &["XADD", "fleet:tasks:dev", "*", "frame", "signed-by-orchestrator"]),
        case(relay, Expect::Allowed, &["XADD", "fleet:tool:responses:review:inst-7", "*", "frame", "x"]),
        case(relay, Expect::NoPerm, &["XADD", "fleet:results", "*", "frame", "x"]),
        case(relay, Expect::NoPerm, &["XADD", "fleet:control:dev", "*", "frame", "x"]),
        case(relay, Expect::NoPerm, &["XREADGROUP", "GROUP", "dev", "relay", "STREAMS", "fleet:tasks:dev", ">"]),
        case(relay, Expect::NoPerm, &["XGROUP", "CREATE", "fleet:tasks:dev", "relay", "0"]),
        case(relay, Expect::NoPerm, &["XRANGE", "fleet:tasks:dev", "-", "+"]),
        // Its backpressure reads the length and group lag of what it forwards to, not the entries.
        case(relay, Expect::Allowed, &["XLEN", "fleet:tasks:dev"]),
        case(relay, Expect::Permitted, &["XINFO", "GROUPS", "fleet:tasks:dev"]),
        case(relay, Expect::NoPerm, &["XINFO", "STREAM", "fleet:tasks:dev"]),
        case(relay, Expect::NoPerm, &["XREAD", "STREAMS", "fleet:tasks:dev", "0"]),
    ];
    fleet.expect_all("outbox-relay", cases).await;
}

/// The monitor sees how much is where (lengths, groups, consumers, pending entries, the
/// server's INFO) and nothing of what the entries say, and changes nothing.
#[tokio::test]
async fn the_monitor_counts_but_reads_no_entry_and_writes_nothing() {
    let mut fleet = Fleet::start();
    let id = fleet.seed(User::OutboxRelay, "fleet:tasks:dev").await;
    let args = |a: &[&str]| a.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    fleet.run(User::Dev, &args(&["XGROUP", "CREATE", "fleet:tasks:dev", "dev", "0"])).await.unwrap();
    fleet
        .run(
            User::Dev,
            &args(&["XREADGROUP", "GROUP", "dev", "dev-1", "COUNT", "1", "STREAMS", "fleet:tasks:dev", ">"]),
        )
        .await
        .unwrap();

    let m = User::Monitor;
    let s = "fleet:tasks:dev";
    let mut cases = vec![
        case(m, Expect::Returns(Value::SimpleString("PONG".into())), &["PING"]),
        case(m, Expect::Allowed, &["INFO"]),
        case(m, Expect::Allowed, &["INFO", "clients"]),
        case(m, Expect::Returns(Value::Int(1)), &["XLEN", s]),
        case(m, Expect::Allowed, &["XINFO", "GROUPS", s]),
        case(m, Expect::Allowed, &["XINFO", "CONSUMERS", s, "dev"]),
        case(m, Expect::Allowed, &["XPENDING", s, "dev"]),
        case(m, Expect::Allowed, &["XPENDING", s, "dev", "-", "+", "10"]),
        case(m, Expect::Permitted, &["XINFO", "GROUPS", "fleet:alerts"]),
        case(m, Expect::Returns(Value::Int(0)), &["XLEN", "fleet:results"]),
        // No entry's contents: XINFO STREAM answers with the first and last entries.
        case(m, Expect::NoPerm, &["XRANGE", s, "-", "+"]),
        case(m, Expect::NoPerm, &["XREVRANGE", s, "+", "-", "COUNT", "1"]),
        case(m, Expect::NoPerm, &["XREAD", "STREAMS", s, "0"]),
        case(m, Expect::NoPerm, &["XREADGROUP", "GROUP", "dev", "spy", "STREAMS", s, ">"]),
        case(m, Expect::NoPerm, &["XINFO", "STREAM", s]),
        case(m, Expect::NoPerm, &["XINFO", "STREAM", s, "FULL"]),
        case(m, Expect::NoPerm, &["XCLAIM", s, "dev", "spy", "0", &id]),
        case(m, Expect::NoPerm, &["XAUTOCLAIM", s, "dev", "spy", "0", "0-0"]),
        case(m, Expect::NoPerm, &["HGETALL", "fleet:killswitch"]),
        case(m, Expect::NoPerm, &["GET", "fleet:budget:counters:failures"]),
        case(m, Expect::NoPerm, &["SLOWLOG", "GET"]),
        // No writes, no administration, nothing outside the fleet's keys.
        case(m, Expect::NoPerm, &["XADD", s, "*", "forged", "1"]),
        case(m, Expect::NoPerm, &["XACK", s, "dev", &id]),
        case(m, Expect::NoPerm, &["XGROUP", "CREATE", s, "monitor", "0"]),
        case(m, Expect::NoPerm, &["XGROUP", "DELCONSUMER", s, "dev", "dev-1"]),
        case(m, Expect::NoPerm, &["XTRIM", s, "MAXLEN", "0"]),
        case(m, Expect::NoPerm, &["DEL", s]),
        case(m, Expect::NoPerm, &["CONFIG", "GET", "maxmemory"]),
        case(m, Expect::NoPerm, &["CONFIG", "SET", "maxmemory", "1mb"]),
        case(m, Expect::NoPerm, &["ACL", "LIST"]),
        case(m, Expect::NoPerm, &["CLIENT", "LIST"]),
        case(m, Expect::NoPerm, &["KEYS", "*"]),
        case(m, Expect::NoPerm, &["XLEN", "other:key"]),
        case(m, Expect::NoPerm, &["XPENDING", "other:key", "g"]),
    ];
    for stream in fleet_streams() {
        cases.push(case(m, Expect::NoPerm, &["XADD", &stream, "*", "a", "1"]));
        cases.push(case(m, Expect::NoPerm, &["XRANGE", &stream, "-", "+"]));
    }
    fleet.expect_all("monitor", cases).await;
}

/// The operators' own user administers the server; no fleet process has its password.
#[tokio::test]
async fn the_admin_administers() {
    let mut fleet = Fleet::start();
    let a = User::Admin;
    let cases = vec![
        case(a, Expect::Returns(Value::BulkString(b"admin".to_vec())), &["ACL", "WHOAMI"]),
        case(a, Expect::Allowed, &["CONFIG", "GET", "maxmemory"]),
        case(a, Expect::Allowed, &["ACL", "LIST"]),
        case(a, Expect::Allowed, &["ACL", "LOG"]),
        case(a, Expect::Allowed, &["INFO", "persistence"]),
        case(a, Expect::Allowed, &["XADD", "fleet:results", "*", "a", "1"]),
        case(a, Expect::Returns(Value::Int(1)), &["XLEN", "fleet:results"]),
        case(a, Expect::Allowed, &["XRANGE", "fleet:results", "-", "+"]),
        case(a, Expect::Returns(Value::Int(1)), &["DEL", "fleet:results"]),
        case(a, Expect::Allowed, &["SCAN", "0"]),
        case(a, Expect::Allowed, &["CLIENT", "LIST"]),
    ];
    fleet.expect_all("admin", cases).await;
    // `ACL LOAD` as admin re-reads the generated file, the way a regenerated one is applied.
    let load: Vec<String> = ["ACL", "LOAD"].map(str::to_owned).to_vec();
    assert_eq!(fleet.run(a, &load).await.unwrap(), Value::Okay);
}

/// Every `redis-cli … --user NAME …` line of the guides works as written under the
/// generated ACLs: run with the real `redis-cli`, as that user (`REDISCLI_AUTH`), against a
/// fleet whose alert stream has its two groups and a pending alert.
#[tokio::test]
async fn the_redis_cli_commands_in_the_docs_work_under_the_generated_acls() {
    let mut fleet = Fleet::start();
    let admin = |a: &[&str]| a.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    for args in [
        &["XADD", "fleet:alerts", "*", "alert", "{}"][..],
        &["XGROUP", "CREATE", "fleet:alerts", "telegram", "0"],
        &["XGROUP", "CREATE", "fleet:alerts", "webhook", "0"],
        &["XREADGROUP", "GROUP", "telegram", "budget-0", "COUNT", "1", "STREAMS", "fleet:alerts", ">"],
        &["XADD", "fleet:tasks:dev", "*", "env", "x"],
        &["XGROUP", "CREATE", "fleet:tasks:dev", "dev", "0"],
    ] {
        fleet.run(User::Admin, &admin(args)).await.unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut ran = 0;
    let mut failures = Vec::new();
    for doc in ["docs/operations.md", "docs/deployment.md"] {
        let text = fs::read_to_string(root.join(doc)).unwrap();
        // Lines of fenced code blocks only.
        let mut fenced = false;
        let code = text.lines().filter(|l| {
            if l.starts_with("```") {
                fenced = !fenced;
                return false;
            }
            fenced
        });
        for line in code.filter(|l| l.contains("redis-cli ") && l.contains(" --user ")) {
            let command = line.split(" # ").next().unwrap();
            let words: Vec<&str> = command.split_whitespace().collect();
            let start = words.iter().position(|w| *w == "redis-cli").unwrap() + 1;
            let (mut user, mut args) = (None, Vec::new());
            let mut rest = words[start..].iter();
            while let Some(word) = rest.next() {
                match *word {
                    "-h" => {
                        rest.next();
                    }
                    "--user" => user = rest.next().and_then(|name| User::parse(name)),
                    other => args.push(other.to_owned()),
                }
            }
            let Some(user) = user else {
                failures.push(format!("{doc}: `{line}`: --user names no generated user"));
                continue;
            };
            let out = Command::new("redis-cli")
                .args(["-p", &fleet.redis.port().to_string(), "--no-auth-warning", "--user", user.as_str()])
                .args(&args)
                .env("REDISCLI_AUTH", fleet.passwords.get(user).expose())
                .output()
                .expect("redis-cli must be installed (apt-get install redis-tools); tests never skip");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let refused = stdout.lines().any(|l| {
                ["NOPERM", "ERR", "NOGROUP", "WRONGPASS", "NOAUTH", "WRONGTYPE"].iter().any(|e| l.starts_with(e))
            });
            if !out.status.success() || refused {
                failures.push(format!(
                    "{doc}: `{}` as {user}: {stdout}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            ran += 1;
        }
    }
    assert!(ran >= 5, "the guides' redis-cli examples are gone ({ran} found)");
    assert_failures("redis-cli examples", ran, &failures);
}

#[tokio::test]
async fn the_default_user_can_do_nothing() {
    let fleet = Fleet::start();

    // Without credentials the connection opens (the crate sends nothing that needs a
    // user), and every command is refused.
    let mut anonymous = connect(&fleet.redis.url()).await.unwrap();
    let mut failures = Vec::new();
    for args in [
        &["PING"][..],
        &["XADD", "fleet:tasks:qa", "*", "a", "1"],
        &["XRANGE", "fleet:results", "-", "+"],
        &["GET", "other:key"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "maxmemory"],
    ] {
        let result: redis::RedisResult<Value> = redis::cmd(args[0]).arg(&args[1..]).query_async(&mut anonymous).await;
        match result {
            Err(err) if err.code() == Some("NOAUTH") => {}
            other => failures.push(format!("unauthenticated `{}`: expected NOAUTH, got {other:?}", args.join(" "))),
        }
    }
    // Logging in as `default`, with nothing or with another user's password, fails.
    for password in ["x", fleet.passwords.get(User::Dev).expose()] {
        let url = format!("redis://default:{password}@127.0.0.1:{}/", fleet.redis.port());
        match connect(&url).await {
            Err(err) if err.kind() == redis::ErrorKind::AuthenticationFailed || err.code() == Some("WRONGPASS") => {}
            Err(err) => failures.push(format!("AUTH default: expected an authentication failure, got: {err}")),
            Ok(_) => failures.push("AUTH default succeeded".to_owned()),
        }
    }
    // A user's own name with another's password fails too.
    let url = format!("redis://dev:{}@127.0.0.1:{}/", fleet.passwords.get(User::Qa).expose(), fleet.redis.port());
    if connect(&url).await.is_ok() {
        failures.push("dev authenticated with qa's password".to_owned());
    }
    assert_failures("default user and wrong passwords", 9, &failures);
}

#[tokio::test]
async fn nobody_administers_deletes_or_reaches_outside_its_grants() {
    let mut fleet = Fleet::start();
    let forbidden: &[&[&str]] = &[
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["CONFIG", "GET", "maxmemory"],
        &["CONFIG", "SET", "maxmemory", "1mb"],
        &["KEYS", "*"],
        &["SCAN", "0"],
        &["DEL", "fleet:tasks:dev"],
        &["DEL", "fleet:results"],
        &["DEL", "fleet:seen:dev:env-1"],
        &["UNLINK", "fleet:results"],
        &["RENAME", "fleet:tasks:dev", "fleet:tasks:qa"],
        &["EXPIRE", "fleet:results", "1"],
        &["XSETID", "fleet:results", "99999999999999-0"],
        &["ACL", "WHOAMI"],
        &["ACL", "LIST"],
        &["ACL", "SETUSER", "intruder", "on", ">x", "+@all", "~*"],
        &["ACL", "LOAD"],
        &["ACL", "SAVE"],
        &["ACL", "LOG"],
        &["SELECT", "1"],
        &["SWAPDB", "0", "1"],
        &["CLIENT", "LIST"],
        &["CLIENT", "KILL", "ID", "999999"],
        &["PUBLISH", "fleet:events", "x"],
        &["BGSAVE"],
        &["BGREWRITEAOF"],
        &["REPLICAOF", "NO", "ONE"],
        &["FUNCTION", "FLUSH"],
        &["MODULE", "LIST"],
        &["OBJECT", "ENCODING", "fleet:results"],
        &["SHUTDOWN", "NOSAVE"],
    ];
    let mut cases = Vec::new();
    for user in fleet_users() {
        for args in forbidden {
            cases.push(case(user, Expect::NoPerm, args));
        }
    }
    fleet.expect_all("administration and deletion", cases).await;
}

#[tokio::test]
async fn every_user_connects_the_way_the_fleet_does() {
    let mut fleet = Fleet::start_inspected();
    let mut failures = Vec::new();
    for user in User::ALL {
        // RESP2 (AUTH) and RESP3 (HELLO 3 AUTH); both also send CLIENT SETINFO, which 7.0
        // answers with an error the crate ignores.
        for query in ["", "?protocol=resp3"] {
            match connect(&fleet.url(user, query)).await {
                Ok(mut connection) => {
                    for args in [&["PING"][..], &["CLIENT", "SETNAME", "probe-1"]] {
                        let result: redis::RedisResult<Value> =
                            redis::cmd(args[0]).arg(&args[1..]).query_async(&mut connection).await;
                        if let Err(err) = result {
                            failures.push(format!("user {user} ({query:?}): `{}`: {err}", args.join(" ")));
                        }
                    }
                }
                Err(err) => failures.push(format!("user {user} ({query:?}) cannot connect: {err}")),
            }
        }
        // deadpool-redis recycles connections with `UNWATCH` and `PING <n>`, ignoring
        // UNWATCH's error: only the server's ACL LOG would show a refusal.
        let cases = vec![case(user, Expect::Returns(Value::BulkString(b"42".to_vec())), &["PING", "42"])];
        fleet.expect_all("PING", cases).await;
        let url = secrecy::SecretString::from(fleet.url(user, ""));
        let pool = bus::pool(&url, 1, std::time::Duration::from_secs(1)).unwrap();
        for round in 0..3 {
            let mut connection = pool.get().await.unwrap_or_else(|err| panic!("{user}: pooled connection: {err}"));
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut connection).await;
            if let Err(err) = pong {
                failures.push(format!("user {user}: PING on a pooled connection (round {round}): {err}"));
            }
        }
    }
    assert_failures("connecting", User::ALL.len() * 7, &failures);
    assert_eq!(fleet.acl_log().await, Vec::<String>::new(), "Redis refused what the clients send on their own");
}

/// Why the generator needs selectors, checked on the server itself: a read-only key
/// permission can't acknowledge or reclaim, so without selectors a consumer's inbox must be
/// writable, and then `+xadd` anywhere in the user would apply to it too.
#[tokio::test]
async fn redis_needs_write_access_to_acknowledge_which_is_why_there_are_selectors() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("naive.acl");
    // sha256("consumer-password-0123")
    let hash = "3d6c3bba78b888a2b552f398cb95aa4863eac5f9f27b89a54173139a3955896d";
    let naive = format!(
        "user default off\n\
         user writer on #{hash} resetchannels -@all +xadd +xgroup|create ~inbox\n\
         user reader on #{hash} resetchannels -@all +xreadgroup +xack +xautoclaim +xclaim %R~inbox\n"
    );
    fs::write(&acl, naive).unwrap();
    let redis = RedisServer::builder().acl_file(&acl).start().unwrap_or_else(|err| panic!("{err}"));
    let url = |user: &str| format!("redis://{user}:consumer-password-0123@127.0.0.1:{}/", redis.port());
    let mut writer = connect(&url("writer")).await.unwrap();
    let mut reader = connect(&url("reader")).await.unwrap();
    let run = |args: &'static [&'static str]| {
        let mut command = redis::cmd(args[0]);
        command.arg(&args[1..]);
        command
    };
    let id: String = run(&["XADD", "inbox", "*", "a", "1"]).query_async(&mut writer).await.unwrap();
    let _: () = run(&["XGROUP", "CREATE", "inbox", "g", "0"]).query_async(&mut writer).await.unwrap();
    let read: redis::RedisResult<Value> =
        run(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "inbox", ">"]).query_async(&mut reader).await;
    assert!(read.is_ok(), "XREADGROUP under %R~: {read:?}");
    let mut ack = redis::cmd("XACK");
    ack.arg("inbox").arg("g").arg(&id);
    let acked: redis::RedisResult<Value> = ack.query_async(&mut reader).await;
    assert_eq!(acked.unwrap_err().code(), Some("NOPERM"), "XACK under %R~ is refused");
    let claimed: redis::RedisResult<Value> =
        run(&["XAUTOCLAIM", "inbox", "g", "c2", "0", "0-0"]).query_async(&mut reader).await;
    assert_eq!(claimed.unwrap_err().code(), Some("NOPERM"), "XAUTOCLAIM under %R~ is refused");
}

/// Redis 7.0 replays a MULTI/EXEC block of its append-only file as the `default` user and
/// re-checks every queued command against that user's grants; every Lua script's effects
/// are logged as such a block. With a `-@all` default, a restart silently dropped every
/// write the ledger's, the kill switch's and the replay guard's scripts had made. The
/// generated file keeps `default` unusable (off, no password) and still lets the replay
/// through; `the_default_user_can_do_nothing` checks that no one can act as it.
#[tokio::test]
async fn scripts_and_transactions_survive_a_restart_from_the_append_only_file() {
    let dir = tempfile::tempdir().unwrap();
    ok(dir.path(), &["acl", "secrets", "new", "--out", "secrets.toml"]);
    let generate = ["acl", "generate", "--secrets", "secrets.toml", "--permissions", &permissions_file()];
    ok(dir.path(), &[&generate[..], &["--out", "users.acl"]].concat());
    let passwords = Passwords::parse(&fs::read_to_string(dir.path().join("secrets.toml")).unwrap()).unwrap();
    let mut redis = RedisServer::builder()
        .appendonly(true)
        .acl_file(dir.path().join("users.acl"))
        .start()
        .unwrap_or_else(|err| panic!("cannot start redis-server with the generated ACL file: {err}"));
    let admin = format!("redis://admin:{}@127.0.0.1:{}/", passwords.get(User::Admin).expose(), redis.port());

    let mut conn = connect(&admin).await.unwrap();
    let script =
        redis::Script::new("redis.call('SET', KEYS[1], 'a'); redis.call('XADD', KEYS[2], '*', 'f', 'v'); return 1");
    let _: i64 = script.key("fleet:t:script").key("fleet:t:stream").invoke_async(&mut conn).await.unwrap();
    let _: () = redis::pipe()
        .atomic()
        .set("fleet:t:multi-1", "1")
        .ignore()
        .set("fleet:t:multi-2", "2")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET").arg("fleet:t:plain").arg("p").query_async(&mut conn).await.unwrap();
    drop(conn);

    redis.restart().unwrap_or_else(|err| panic!("restart: {err}"));
    let mut conn = connect(&admin).await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("fleet:t:*").query_async(&mut conn).await.unwrap();
    keys.sort();
    assert_eq!(
        keys,
        ["fleet:t:multi-1", "fleet:t:multi-2", "fleet:t:plain", "fleet:t:script", "fleet:t:stream"],
        "keys after a restart from the append-only file; Redis's log:\n{}",
        fs::read_to_string(redis.log_path()).unwrap_or_default()
    );
    let log = fs::read_to_string(redis.log_path()).unwrap();
    assert!(!log.contains("NOPERM"), "Redis refused part of its own append-only file:\n{log}");
}

// ---------------------------------------------------------------------------------------
// The command line, without Redis
// ---------------------------------------------------------------------------------------

#[test]
fn secrets_new_writes_a_private_file_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let report = ok(dir.path(), &["acl", "secrets", "new", "--out", "secrets.toml"]);
    let path = dir.path().join("secrets.toml");
    assert_eq!(mode(&path), 0o600);
    let text = fs::read_to_string(&path).unwrap();
    let passwords = Passwords::parse(&text).unwrap();
    for user in User::ALL {
        let password = passwords.get(user).expose();
        assert!(text.contains(&format!("\n{user} = \"{password}\"\n")), "{user} in:\n{text}");
        assert!(!report.contains(password), "the report shows {user}'s password");
    }

    let again = fleetctl(dir.path(), &["acl", "secrets", "new", "--out", "secrets.toml"]);
    assert_eq!(again.code, EX_USAGE, "{}", again.stderr);
    assert!(again.stderr.contains("'secrets.toml' already exists"), "{}", again.stderr);
    assert_eq!(fs::read_to_string(&path).unwrap(), text, "the existing file changed");
}

#[test]
fn generate_writes_hashes_only_and_refuses_incomplete_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["acl", "secrets", "new", "--out", "secrets.toml"]);
    let passwords = Passwords::parse(&fs::read_to_string(d.join("secrets.toml")).unwrap()).unwrap();
    let perms = permissions_file();
    let generate = ["acl", "generate", "--secrets", "secrets.toml", "--permissions", perms.as_str()];

    let stdout = ok(d, &generate);
    let report = ok(d, &[&generate[..], &["--out", "users.acl"]].concat());
    let file = fs::read_to_string(d.join("users.acl")).unwrap();
    assert_eq!(file, stdout, "--out and stdout differ");
    assert_eq!(mode(&d.join("users.acl")), 0o600);
    assert!(report.contains("--aclfile"), "{report}");
    assert_eq!(file.lines().count(), 1 + User::ALL.len());
    assert!(file.starts_with("user default reset off "), "{file}");
    for user in User::ALL {
        let password = passwords.get(user);
        assert!(!file.contains(password.expose()), "plaintext password of {user} in the ACL file");
        assert!(file.contains(&format!("user {user} reset on #{} ", password.redis_hash())), "{user}");
    }

    // An existing file is replaced only with --force.
    let again = fleetctl(d, &[&generate[..], &["--out", "users.acl"]].concat());
    assert_eq!(again.code, EX_USAGE, "{}", again.stderr);
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    ok(d, &[&generate[..], &["--out", "users.acl", "--force"]].concat());

    // A secrets file without qa's password: exit 64, naming qa.
    let text = fs::read_to_string(d.join("secrets.toml")).unwrap();
    let without_qa: String = text.lines().filter(|l| !l.starts_with("qa = ")).map(|l| format!("{l}\n")).collect();
    fs::write(d.join("partial.toml"), without_qa).unwrap();
    fs::set_permissions(d.join("partial.toml"), fs::Permissions::from_mode(0o600)).unwrap();
    let out = fleetctl(d, &["acl", "generate", "--secrets", "partial.toml", "--permissions", &perms]);
    assert_eq!(out.code, EX_USAGE, "{}", out.stderr);
    assert!(out.stderr.contains("no password for user qa"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "an ACL file was printed anyway");

    // No secrets file at all.
    let out = fleetctl(d, &["acl", "generate", "--secrets", "nope.toml", "--permissions", &perms]);
    assert_eq!(out.code, EX_USAGE, "{}", out.stderr);
    assert!(out.stderr.contains("fleetctl acl secrets new"), "{}", out.stderr);
}

#[test]
fn help_says_what_the_file_is_for_and_how_to_load_it() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(dir.path(), &["acl", "generate", "--help"]);
    for needle in ["redis-server --aclfile FILE", "ACL LOAD", "NOPERM", "selector", "#<sha256>"] {
        assert!(help.contains(needle), "`acl generate --help` lacks {needle:?}:\n{help}");
    }
    let help = ok(dir.path(), &["acl", "--help"]);
    assert!(help.contains("fleet:tasks:qa") && help.contains("default"), "{help}");
}

#[tokio::test]
async fn every_process_follows_its_own_control_stream_and_reads_the_kill_switch() {
    let mut fleet = Fleet::start();
    // The budget manager engages: its script writes the record, then it pauses every role.
    let engage = "return redis.call('HSET', KEYS[1], 'epoch', '1', 'engaged', '1')";
    fleet
        .expect_all(
            "budget engages",
            vec![case(User::Budget, Expect::Allowed, &["EVAL", engage, "1", "fleet:killswitch"])],
        )
        .await;
    for role in ["orchestrator", "dev", "qa", "review", "refactor"] {
        fleet.seed(User::Budget, &format!("fleet:control:{role}")).await;
    }
    let mut cases = Vec::new();
    for (user, role) in [
        (User::Orchestrator, "orchestrator"),
        (User::Dev, "dev"),
        (User::Qa, "qa"),
        (User::Review, "review"),
        (User::Refactor, "refactor"),
    ] {
        let own = format!("fleet:control:{role}");
        let other = if role == "dev" { "fleet:control:qa" } else { "fleet:control:dev" };
        cases.push(case(user, Expect::Allowed, &["HGETALL", "fleet:killswitch"]));
        cases.push(case(user, Expect::Allowed, &["XREVRANGE", &own, "+", "-", "COUNT", "1"]));
        cases.push(case(user, Expect::Allowed, &["XREAD", "COUNT", "16", "STREAMS", &own, "0-0"]));
        // Not another role's pauses, and never the record itself.
        cases.push(case(user, Expect::NoPerm, &["XREAD", "STREAMS", other, "0-0"]));
        cases.push(case(user, Expect::NoPerm, &["HSET", "fleet:killswitch", "engaged", "0"]));
        cases.push(case(user, Expect::NoPerm, &["XADD", &own, "*", "env", "forged-resume"]));
        if role != "orchestrator" {
            // A worker's tool client reads its own response stream without a group; not
            // another role's, and it may not write one.
            let mine = format!("fleet:tool:responses:{role}:{role}-1");
            let theirs = if role == "dev" { "fleet:tool:responses:qa:qa-1" } else { "fleet:tool:responses:dev:dev-1" };
            cases.push(case(user, Expect::Allowed, &["XREVRANGE", &mine, "+", "-", "COUNT", "1"]));
            cases.push(case(user, Expect::Allowed, &["XREAD", "COUNT", "16", "STREAMS", &mine, "0-0"]));
            cases.push(case(user, Expect::NoPerm, &["XREAD", "STREAMS", theirs, "0-0"]));
            cases.push(case(user, Expect::NoPerm, &["XADD", &mine, "*", "env", "forged-answer"]));
        }
    }
    // The budget manager writes the record and its counters, and XADDs every control stream.
    let b = User::Budget;
    cases.push(case(b, Expect::Allowed, &["HGETALL", "fleet:killswitch"]));
    cases.push(case(b, Expect::Allowed, &["HINCRBY", "fleet:budget:counters:usage:20260101", "t", "5"]));
    cases.push(case(b, Expect::Allowed, &["INCRBY", "fleet:budget:counters:failures", "1"]));
    // The operator reads the switch and the counters, and writes neither.
    let op = User::Operator;
    cases.push(case(op, Expect::Allowed, &["HGETALL", "fleet:killswitch"]));
    cases.push(case(op, Expect::Allowed, &["HMGET", "fleet:budget:counters:usage:20260101", "t", "m"]));
    cases.push(case(op, Expect::Allowed, &["GET", "fleet:budget:counters:failures"]));
    cases.push(case(op, Expect::NoPerm, &["HSET", "fleet:killswitch", "engaged", "0"]));
    cases.push(case(op, Expect::NoPerm, &["SET", "fleet:budget:counters:failures", "0"]));
    cases.push(case(op, Expect::NoPerm, &["GET", "fleet:seen:dev:x"]));
    fleet.expect_all("kill switch", cases).await;
}

// ---------------------------------------------------------------------------------------
// The budget manager's own code under its user
// ---------------------------------------------------------------------------------------

/// The budget manager's usage handler, run as the generated `budget` user, counts one
/// report exactly once however often the bus hands it over: four deliveries at once (a
/// consumer took the entry over while the first still ran), a handling that fails after
/// counting (the ledger unreachable) and its redelivery, and a last redelivery. Redis
/// refuses none of its commands (`ACL LOG` stays empty): a refused `MULTI` used to leave
/// the increments to run one by one, outside any transaction, and concurrent deliveries
/// each counted the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_report_is_counted_exactly_once_under_the_generated_acls_however_often_it_is_handled() {
    use budget::alert::{AlertSender, AlertsConfig};
    use budget::killswitch::KillSwitch;
    use budget::ledger::{Ledger, LedgerConfig};
    use budget::service::{Budget, TriggerConfig, UsageHandler, usage_key};
    use bus::{Delivery, Handler, HandlerError, Publisher, PublisherConfig};
    use envelope::{
        Envelope, Keyring, MasterFile, MasterSecret, MemoryReplayGuard, Process, Sender, Usage, Verifier,
        VerifierConfig, VerifyContext,
    };
    use secrecy::SecretString;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    let fleet = Fleet::start_inspected();
    let table = fleet.table.clone();
    let master = MasterFile::new(MasterSecret::from_bytes([9; 32]));
    let keyring = |role| Keyring::derive(&master, Process::Role(role), &table).unwrap();
    let budget_url = SecretString::from(fleet.url(User::Budget, ""));
    let pool = bus::pool(&budget_url, 8, Duration::from_secs(1)).unwrap();
    let ledger_cfg = LedgerConfig::from_toml(
        "daily_tokens = 500000\ndaily_micro_usd = 10000000\nper_task_tokens = 100000\nper_task_micro_usd = 2000000\n\
         reservation_ttl_secs = 60\n[prices.m-1]\ninput_micro_usd_per_mtok = 1000000\noutput_micro_usd_per_mtok = 2000000\n",
    )
    .unwrap();
    let metrics = budget::metrics::BudgetMetrics::default();
    let budget_with = |ledger_pool: bus::RedisPool| {
        let alerts = AlertSender::new(pool.clone(), &AlertsConfig::default());
        let publisher =
            Arc::new(Publisher::new(pool.clone(), Arc::new(keyring(Role::Budget)), PublisherConfig::default()));
        Budget {
            killswitch: KillSwitch::new(pool.clone(), publisher, alerts.clone(), Instance::parse("budget-0").unwrap()),
            ledger: Ledger::new(ledger_pool, ledger_cfg.clone()).unwrap(),
            alerts,
            pool: pool.clone(),
            triggers: Arc::new(TriggerConfig::default()),
            needs_reassert: Arc::new(AtomicBool::new(false)),
            metrics: metrics.clone(),
        }
    };
    let handler = UsageHandler(budget_with(pool.clone()));
    // The same budget manager, but its ledger (read after counting) cannot be reached: the
    // handling fails after the report was counted, and the bus delivers it again.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let unreachable = SecretString::from(format!("redis://127.0.0.1:{closed_port}/"));
    let failing = UsageHandler(budget_with(bus::pool(&unreachable, 1, Duration::from_secs(1)).unwrap()));

    let usage =
        Usage { role: Role::Dev, model: "m-1".into(), input_tokens: 120, output_tokens: 30, cost_micro_usd: 180 };
    let from = Sender { role: Role::Orchestrator, instance: Instance::parse("orchestrator-0").unwrap() };
    let env = Envelope::new(from, Role::Budget, bus::now_ms(), 60_000, 0, usage.into());
    let wire = keyring(Role::Orchestrator).seal(&env).unwrap();
    let verifier = Verifier::new(keyring(Role::Budget), table.clone(), VerifierConfig::default());
    let delivery = |n: u64| {
        let ctx = VerifyContext { now_ms: bus::now_ms(), kill_epoch: 0 };
        let envelope = verifier.verify(streams::USAGE, &wire, ctx, &mut MemoryReplayGuard::new()).unwrap();
        Delivery { envelope, stream: streams::USAGE.into(), entry_id: "1-1".into(), deliveries: n }
    };

    let mut at_once = tokio::task::JoinSet::new();
    for n in 1..=4 {
        let (handler, d) = (handler.clone(), delivery(n));
        at_once.spawn(async move { handler.handle(d).await });
    }
    let mut results = Vec::new();
    while let Some(r) = at_once.join_next().await {
        results.push(r.unwrap().map_err(|e| e.to_string()));
    }
    assert_eq!(results, vec![Ok(()); 4], "every concurrent delivery is handled");
    match failing.handle(delivery(5)).await {
        Err(HandlerError::Transient(_)) => {}
        other => panic!("the ledger is unreachable: the handling must fail, got {other:?}"),
    }
    handler.handle(delivery(6)).await.unwrap();
    handler.handle(delivery(7)).await.unwrap();

    let day = budget::ledger::Day::from_unix_ms(env.issued_at_ms);
    let mut operator = connect(&fleet.url(User::Operator, "")).await.unwrap();
    let counters: BTreeMap<String, u64> =
        redis::cmd("HGETALL").arg(usage_key(day)).query_async(&mut operator).await.unwrap();
    let expected: BTreeMap<String, u64> = [
        ("t", 150),
        ("in", 120),
        ("out", 30),
        ("m", 180),
        ("calls", 1),
        ("role:dev:t", 150),
        ("role:dev:m", 180),
        ("role:dev:calls", 1),
        ("model:m-1:t", 150),
        ("model:m-1:m", 180),
        ("model:m-1:calls", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(counters, expected, "one report, counted once");
    // Its Prometheus series too, however often it was handled.
    let mut registry = telemetry::metrics::registry("budget");
    metrics.register(&mut registry);
    let text = telemetry::metrics::render(&registry);
    for line in [
        "fleet_model_calls_total{role=\"dev\",model=\"m-1\"} 1\n",
        "fleet_model_tokens_total{role=\"dev\",model=\"m-1\",direction=\"input\"} 120\n",
        "fleet_model_tokens_total{role=\"dev\",model=\"m-1\",direction=\"output\"} 30\n",
        "fleet_model_cost_usd_total{role=\"dev\",model=\"m-1\"} 0.00018\n",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert_eq!(fleet.acl_log().await, Vec::<String>::new(), "Redis refused the budget manager's own commands");
}

// ---------------------------------------------------------------------------------------
// A Redis Cluster (issue 16)
// ---------------------------------------------------------------------------------------

/// The generated file loaded by every node of a cluster of three primaries and three
/// replicas; each process's work done as its own user through the cluster client: the bus
/// (publish, consume with the replay guard), the kill switch's record and its alerts, the
/// ledger, the usage counters and the intake rate limiter. A compromised dev worker, with
/// its own user, still cannot write where it may not, on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_acls_and_every_script_work_on_a_redis_cluster() {
    use budget::alert::{AlertSender, AlertsConfig};
    use budget::killswitch::KillSwitch;
    use budget::ledger::{Ledger, LedgerConfig};
    use budget::service::{Budget, TriggerConfig};
    use bus::{Consumer, ConsumerConfig, Delivery, Handler, HandlerError, KillEpoch, Publisher, PublisherConfig};
    use envelope::{
        Envelope, Heartbeat, Keyring, MasterFile, MasterSecret, Process, Sender, Usage, Verifier, VerifierConfig,
    };
    use secrecy::SecretString;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let dir = tempfile::tempdir().unwrap();
    ok(dir.path(), &["acl", "secrets", "new", "--out", "secrets.toml"]);
    ok(
        dir.path(),
        &["acl", "generate", "--secrets", "secrets.toml", "--permissions", &permissions_file(), "--out", "users.acl"],
    );
    let passwords = Passwords::parse(&fs::read_to_string(dir.path().join("secrets.toml")).unwrap()).unwrap();
    let table = PermissionTable::parse(&fs::read_to_string(permissions_file()).unwrap()).unwrap();
    let cluster = fleet_testkit::RedisCluster::builder()
        .acl_file(dir.path().join("users.acl"), "admin", passwords.get(User::Admin).expose())
        .start()
        .unwrap_or_else(|err| panic!("cannot start a Redis Cluster with the generated ACL file: {err}"));
    let url = |user: User| {
        let name = user.to_string();
        SecretString::from(cluster.url_as(Some((name.as_str(), passwords.get(user).expose()))))
    };
    let pool = |user: User| bus::pool(&url(user), 8, Duration::from_secs(1)).unwrap();
    let master = MasterFile::new(MasterSecret::from_bytes([7; 32]));
    let keyring = |role| Arc::new(Keyring::derive(&master, Process::Role(role), &table).unwrap());

    // The bus: dev publishes heartbeats, the orchestrator consumes them with its replay guard.
    let dev = Publisher::new(pool(User::Dev), keyring(Role::Dev), PublisherConfig::default());
    let results = StreamName::parse(streams::HEARTBEATS).unwrap();
    let from = Sender { role: Role::Dev, instance: Instance::parse("dev-1").unwrap() };
    for seq in 0..20u64 {
        let body = Heartbeat { seq, busy: false };
        let env = Envelope::new(from.clone(), Role::Orchestrator, bus::now_ms(), 60_000, 0, body.into());
        dev.publish(&results, &env).await.unwrap_or_else(|e| panic!("dev publishes heartbeat {seq}: {e}"));
    }
    #[derive(Clone)]
    struct Count(tokio::sync::mpsc::UnboundedSender<()>);
    impl Handler for Count {
        async fn handle(&self, _: Delivery) -> Result<(), HandlerError> {
            let _ = self.0.send(());
            Ok(())
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let verifier = Arc::new(Verifier::new(
        Keyring::derive(&master, Process::Role(Role::Orchestrator), &table).unwrap(),
        table.clone(),
        VerifierConfig::default(),
    ));
    let mut cfg = ConsumerConfig::new(results.clone(), "orchestrator", "orchestrator-0");
    cfg.block = Duration::from_millis(100);
    let consumer = Consumer::new(cfg, pool(User::Orchestrator), verifier, KillEpoch::new(0), Count(tx)).unwrap();
    let stats = consumer.stats();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(consumer.run(stop.clone()));
    for n in 0..20 {
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {n} of 20 heartbeats handled; reconnects: {:?}", stats.reconnects));
    }
    stop.cancel();
    running.await.unwrap();
    assert_eq!(stats.rejected.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A compromised dev worker with its own user: refused on whichever node holds the key.
    let mut devc = pool(User::Dev).get().await.unwrap();
    for (what, cmd) in [
        ("forge an assignment for qa", redis::cmd("XADD").arg("fleet:tasks:qa").arg("*").arg("env").arg("x").clone()),
        ("write the orchestrator's replay guard", {
            let bucket = format!("fleet:seen:{{{}}}:orchestrator:{}", streams::HEARTBEATS, u64::MAX);
            redis::cmd("HSETNX").arg(bucket).arg("0".repeat(32)).arg("1-1").clone()
        }),
        ("engage the kill switch", redis::cmd("HSET").arg("fleet:killswitch").arg("engaged").arg("1").clone()),
        ("queue an alert", redis::cmd("XADD").arg("fleet:alerts").arg("*").arg("a").arg("1").clone()),
    ] {
        let err = cmd.query_async::<Value>(&mut devc).await.expect_err(what);
        assert!(err.to_string().to_uppercase().contains("NOPERM"), "dev may not {what}: {err}");
    }

    // The budget manager: kill switch (record, pauses, alerts), usage counters, ledger.
    let budget_pool = pool(User::Budget);
    let alerts = AlertSender::new(budget_pool.clone(), &AlertsConfig::default());
    let publisher = Arc::new(Publisher::new(budget_pool.clone(), keyring(Role::Budget), PublisherConfig::default()));
    let ledger_cfg = LedgerConfig::from_toml(
        "daily_tokens = 500000\ndaily_micro_usd = 10000000\nper_task_tokens = 100000\nper_task_micro_usd = 2000000\n\
         reservation_ttl_secs = 60\n[prices.m-1]\ninput_micro_usd_per_mtok = 1000000\noutput_micro_usd_per_mtok = 2000000\n",
    )
    .unwrap();
    let budget = Budget {
        killswitch: KillSwitch::new(
            budget_pool.clone(),
            publisher,
            alerts.clone(),
            Instance::parse("budget-0").unwrap(),
        ),
        ledger: Ledger::new(budget_pool.clone(), ledger_cfg.clone()).unwrap(),
        alerts,
        pool: budget_pool.clone(),
        triggers: Arc::new(TriggerConfig::default()),
        needs_reassert: Arc::new(AtomicBool::new(false)),
        metrics: budget::metrics::BudgetMetrics::default(),
    };
    let cause = budget::alert::Cause::automatic("daily_budget", "budget-0", "daily budget exceeded");
    let engaged = budget.killswitch.engage(&cause, 1, serde_json::json!({})).await.expect("engage on a cluster");
    assert!(engaged.fresh && engaged.state.engaged);
    let (epoch, released) = budget.killswitch.resume(&cause, engaged.state.epoch).await.expect("resume on a cluster");
    assert!(released && epoch == engaged.state.epoch);
    let mut operator = pool(User::Operator).get().await.unwrap();
    let failures: Option<u64> =
        redis::cmd("GET").arg(budget::killswitch::FAILURES_KEY).query_async(&mut operator).await.unwrap();
    assert_eq!(failures, Some(0), "the resume script reset the failure counter in the same EVAL");
    let alerts_queued: u64 = redis::cmd("XLEN").arg("fleet:alerts").query_async(&mut operator).await.unwrap();
    assert_eq!(alerts_queued, 2, "one alert for the kill, one for the resume");

    let usage =
        Usage { role: Role::Dev, model: "m-1".into(), input_tokens: 120, output_tokens: 30, cost_micro_usd: 180 };
    let id = uuid::Uuid::now_v7();
    let at = bus::now_ms();
    for _ in 0..3 {
        budget.record_usage(id, &usage, at).await.expect("count usage on a cluster");
    }
    let day = budget::ledger::Day::from_unix_ms(at);
    let calls: Option<u64> =
        redis::cmd("HGET").arg(budget::service::usage_key(day)).arg("calls").query_async(&mut operator).await.unwrap();
    assert_eq!(calls, Some(1), "a report counted once however often it is handled");

    // The orchestrator: the ledger's reserve and commit, and the intake rate limiter.
    let ledger = Ledger::new(pool(User::Orchestrator), ledger_cfg).unwrap();
    let held = ledger.reserve(uuid::Uuid::now_v7(), Role::Dev, "m-1", 1000, 500).await.expect("reserve on a cluster");
    let commit = ledger.commit(&held, 800, 200).await.expect("commit on a cluster");
    assert!(!commit.duplicate);
    let limiter = orchestrator::api::ratelimit::RateLimiter::new(pool(User::Orchestrator), 2, 0.001).unwrap();
    use orchestrator::api::ratelimit::Decision;
    let decisions = [
        limiter.take("alice").await.unwrap(),
        limiter.take("alice").await.unwrap(),
        limiter.take("alice").await.unwrap(),
    ];
    assert!(matches!(decisions, [Decision::Allowed, Decision::Allowed, Decision::Limited(_)]), "{decisions:?}");
}
